"""Trains the demo checkpoint that `cli generate` uses by default: a tiny
Llama (transformers' LlamaForCausalLM) with a byte-level BPE tokenizer, both
trained from scratch on demo/text/around-the-world-in-80-days.txt (public
domain, see demo/text/SOURCE.md).

Shape: vocab 2048, hidden 256, 4 layers, 2 query heads of head_dim 128
sharing 1 KV head (GQA 2, head_dim 128 so that the CUDA kernels run it too),
SwiGLU 768, tied embeddings: 3.7 M parameters, 7 MB in bf16. A few minutes
on one GPU (or much longer on a CPU) memorise much of the book, so greedy
generation prints readable Verne-like text.

Writes to --out (default demo/tiny-verne): config.json,
generation_config.json, model.safetensors (bf16), tokenizer.json, and
sample.json (a prompt and transformers' greedy continuation in fp32 from the
saved bf16 weights, which tests/demo.rs checks our engine against).

Usage: python3 scripts/train_demo.py [--steps 2000] [--out demo/tiny-verne]
Needs torch, transformers, tokenizers, safetensors.
"""
import argparse, json, math, os, time

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "..", "demo", "text", "around-the-world-in-80-days.txt")
PROMPT = "Phileas Fogg was"


def train_tokenizer(text, vocab):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "demo", "tiny-verne"))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    # Paragraphs joined with single newlines: the hard line breaks of the
    # e-text become spaces, so generated text reads as prose.
    raw = open(TEXT, encoding="utf-8").read()
    paras = [" ".join(p.split()) for p in raw.split("\n\n") if p.strip()]
    text = "\n".join(paras)
    tok = train_tokenizer(text, 2048)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    print(f"{len(text)} characters -> {len(ids)} tokens (vocab {tok.get_vocab_size()}), device {dev}")

    cfg = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        max_position_embeddings=1024,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=1,
        hidden_act="silu",
        attention_bias=False,
    )
    model = LlamaForCausalLM(cfg).to(dev)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params / 1e6:.2f} M parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * 0.5 * (1 + math.cos(math.pi * min(s, a.steps) / a.steps))
    )
    data = ids.to(dev)
    t0 = time.time()
    model.train()
    for step in range(a.steps):
        starts = torch.randint(0, len(data) - a.seq - 1, (a.batch,), device=dev)
        x = torch.stack([data[s : s + a.seq] for s in starts.tolist()])
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=dev == "cuda"):
            loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == a.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)

    os.makedirs(a.out, exist_ok=True)
    model = model.to(torch.bfloat16).cpu()
    model.save_pretrained(a.out, safe_serialization=True)
    tok.save(os.path.join(a.out, "tokenizer.json"))
    # The reference continuation: the saved bf16 weights, computed in fp32 on the CPU.
    ref = LlamaForCausalLM.from_pretrained(a.out, torch_dtype=torch.float32).eval()
    prompt_ids = [cfg.bos_token_id] + tok.encode(PROMPT).ids
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt_ids]), max_new_tokens=48, do_sample=False, eos_token_id=None, pad_token_id=1
        )[0].tolist()
    new = out[len(prompt_ids) :]
    sample = {"prompt": PROMPT, "prompt_ids": prompt_ids, "greedy_ids": new, "text": tok.decode(new),
              "final_loss": loss.item(), "steps": a.steps, "parameters": params, "train_seconds": time.time() - t0}
    json.dump(sample, open(os.path.join(a.out, "sample.json"), "w"), indent=1)
    print(f"{PROMPT}{sample['text']}")


if __name__ == "__main__":
    main()
