#!/usr/bin/env python3
"""Make the tiny Llama-family test checkpoints and their Hugging Face reference outputs.

transformers is the reference implementation: every fixture is a random
`LlamaForCausalLM` built and run by transformers in fp32, saved with bf16
weights (the reference runs on exactly the bf16-representable values, so the
Rust side can be held to 1e-4 in f32).

Fixtures (all head_dim 128, 2 layers, untied embeddings, one per GQA group the
real models use: Llama-3-8B 4, Yi-34B 7, Yi-6B 8):

  tiny-llama3-gqa4   new config generation (`rope_parameters`, `dtype`), Llama-3.1
                     `llama3` rope scaling, byte-level BPE tokenizer.json
  tiny-yi-gqa7       old config generation (`rope_theta`, `torch_dtype` at top level),
                     hidden size != heads * head_dim, BPE tokenizer.json
  tiny-yi-gqa8       old config generation, *sharded* safetensors with
                     model.safetensors.index.json, SentencePiece tokenizer.model
                     only (as the Yi repos ship), no tokenizer.json

Each fixture directory holds the checkpoint files plus
  reference.safetensors   logits [T, V] f32 of the prompt, input_ids [T] i64,
                          ppl_logits [N, V] f32 and ppl_ids [N] i64 of ../ppl.txt
  reference.json          prompt, ids, greedy continuation, perplexity of ../ppl.txt

Run where transformers, tokenizers and sentencepiece are installed (the GPU
machine has them; no GPU is used):

  python3 scripts/make_fixtures.py --out tests/fixtures
"""
import argparse
import copy
import json
import math
import os
import shutil
import tempfile

import torch

TRAIN_TEXT = """\
It is a truth universally acknowledged, that a single man in possession of a good
fortune, must be in want of a wife. However little known the feelings or views of
such a man may be on his first entering a neighbourhood, this truth is so well fixed
in the minds of the surrounding families, that he is considered the rightful property
of some one or other of their daughters.
Call me Ishmael. Some years ago, never mind how long precisely, having little or no
money in my purse, and nothing particular to interest me on shore, I thought I would
sail about a little and see the watery part of the world. It is a way I have of driving
off the spleen and regulating the circulation.
Alice was beginning to get very tired of sitting by her sister on the bank, and of
having nothing to do: once or twice she had peeped into the book her sister was
reading, but it had no pictures or conversations in it, and what is the use of a book,
thought Alice, without pictures or conversations?
The quick brown fox jumps over the lazy dog 0123456789 times, then 42 more times.
"""

PPL_TEXT = """\
It was the best of times, it was the worst of times, it was the age of wisdom, it was
the age of foolishness, it was the epoch of belief, it was the epoch of incredulity, it
was the season of Light, it was the season of Darkness, it was the spring of hope, it was
the winter of despair, we had everything before us, we had nothing before us.
"""

PROMPT = "Alice was beginning to get very tired of"

# Strings whose SentencePiece ids the Rust loader must reproduce exactly:
# leading/trailing/multiple spaces, digits, newlines, and characters outside the
# vocabulary (byte fallback).
SPM_PROBES = [
    PROMPT,
    "Hello world",
    " leading space",
    "two  spaces and trailing ",
    "digits 0123456789 and 3.14159",
    "line one\nline two",
    "naïve café — 東京 🙂",
    "",
]

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def train_bpe_tokenizer(path, vocab_size):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[UNK, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TRAIN_TEXT.splitlines(), trainer=trainer)
    tok.save(path)
    return tok


def train_spm_tokenizer(path_prefix, vocab_size):
    import sentencepiece as spm

    # Yi-style model: BPE with byte fallback, identity normalisation, no dummy prefix.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT.splitlines()),
        model_prefix=path_prefix,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_file=path_prefix + ".model")


def make_model(spec, vocab_size, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden"],
        intermediate_size=spec["ffn"],
        num_hidden_layers=2,
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"],
        head_dim=128,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_parameters=spec["rope"],
        initializer_range=0.05,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        attention_bias=False,
        mlp_bias=False,
    )
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                # Non-trivial norm weights so that the Rust side must apply them.
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            # Round every weight to bf16: the saved checkpoint is bf16 and the
            # fp32 reference must see the very same values.
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def old_generation_config(path):
    """Rewrite a transformers-5 config.json into the older Hub layout."""
    with open(path) as f:
        cfg = json.load(f)
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        cfg["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
    if "dtype" in cfg:
        cfg["torch_dtype"] = cfg.pop("dtype")
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


@torch.no_grad()
def reference_outputs(model, prompt_ids, ppl_ids, eos_id):
    ids = torch.tensor([prompt_ids])
    logits = model(ids).logits[0].float()

    gen = model.generate(
        ids,
        max_new_tokens=24,
        do_sample=False,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )[0, len(prompt_ids):].tolist()

    # Margin between the two best logits along the greedy path: the Rust side's
    # 1e-4 logit tolerance only pins the argmax when this is comfortably larger.
    full = torch.tensor([prompt_ids + gen])
    path_logits = model(full).logits[0, len(prompt_ids) - 1 : -1].float()
    top2 = path_logits.topk(2, dim=-1).values
    min_margin = float((top2[:, 0] - top2[:, 1]).min())

    pids = torch.tensor([ppl_ids])
    ppl_logits = model(pids).logits[0].float()
    nll = float(torch.nn.functional.cross_entropy(ppl_logits[:-1], pids[0, 1:], reduction="mean"))
    return logits, gen, min_margin, nll, ppl_logits


def save_fixture(out, name, model, gen_config_eos, tokenize, decode, old_config, shard):
    from safetensors.torch import save_file

    d = os.path.join(out, name)
    os.makedirs(d, exist_ok=True)
    prompt_ids = [1] + tokenize(PROMPT)
    ppl_ids = [1] + tokenize(PPL_TEXT)
    logits, gen, margin, nll, ppl_logits = reference_outputs(model, prompt_ids, ppl_ids, gen_config_eos)

    # Save a bf16 *copy*: `.to(bfloat16)` also casts the RoPE inv_freq buffer,
    # which must stay fp32 in the reference (transformers keeps it fp32 when
    # it loads a bf16 checkpoint).
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(
        d, safe_serialization=True, max_shard_size="160KB" if shard else "1GB"
    )
    if old_config:
        old_generation_config(os.path.join(d, "config.json"))
    save_file(
        {
            "logits": logits.contiguous(),
            "input_ids": torch.tensor(prompt_ids, dtype=torch.int64),
            # Per-position logits of the perplexity text: a larger sample for
            # the bf16 top-1 agreement check on the GPU.
            "ppl_logits": ppl_logits.contiguous(),
            "ppl_ids": torch.tensor(ppl_ids, dtype=torch.int64),
        },
        os.path.join(d, "reference.safetensors"),
    )
    ref = {
        "generator": "scripts/make_fixtures.py",
        "transformers_version": __import__("transformers").__version__,
        "torch_version": torch.__version__,
        "prompt": PROMPT,
        "prompt_ids": prompt_ids,
        "greedy_new_tokens": gen,
        "greedy_text": decode(gen),
        "greedy_min_top2_margin": margin,
        "ppl_file": "ppl.txt",
        "ppl_tokens": len(ppl_ids),
        "nll": nll,
        "ppl": math.exp(nll),
    }
    with open(os.path.join(d, "reference.json"), "w") as f:
        json.dump(ref, f, indent=2)
    print(f"{name}: greedy margin {margin:.4f}, ppl {math.exp(nll):.3f}, tokens {gen}")
    return d


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures")
    args = ap.parse_args()
    out = args.out
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "ppl.txt"), "w") as f:
        f.write(PPL_TEXT)

    # Byte-level BPE tokenizer.json shared by the first two fixtures.
    tmp = tempfile.mkdtemp()
    tok_path = os.path.join(tmp, "tokenizer.json")
    tok = train_bpe_tokenizer(tok_path, vocab_size=384)
    assert tok.token_to_id(BOS) == 1 and tok.token_to_id(EOS) == 2
    bpe_encode = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    bpe_decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    bpe_vocab = tok.get_vocab_size()

    specs = [
        dict(
            name="tiny-llama3-gqa4", hidden=256, ffn=512, heads=4, kv_heads=1, old=False, shard=False,
            rope={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        ),
        dict(
            name="tiny-yi-gqa7", hidden=224, ffn=448, heads=7, kv_heads=1, old=True, shard=False,
            rope={"rope_type": "default", "rope_theta": 5000000.0},
        ),
        dict(
            name="tiny-yi-gqa8", hidden=256, ffn=512, heads=8, kv_heads=1, old=True, shard=True,
            rope={"rope_type": "default", "rope_theta": 5000000.0},
        ),
    ]
    for i, spec in enumerate(specs):
        if spec["name"] == "tiny-yi-gqa8":
            sp = train_spm_tokenizer(os.path.join(tmp, "spm"), vocab_size=400)
            vocab = sp.get_piece_size()
            encode = lambda s, sp=sp: sp.encode(s)  # noqa: E731
            decode = lambda ids, sp=sp: sp.decode(ids)  # noqa: E731
        else:
            vocab, encode, decode = bpe_vocab, bpe_encode, bpe_decode
        model = make_model(spec, vocab, seed=1234 + i)
        d = save_fixture(out, spec["name"], model, 2, encode, decode, spec["old"], spec["shard"])
        if spec["name"] == "tiny-yi-gqa8":
            shutil.copy(os.path.join(tmp, "spm.model"), os.path.join(d, "tokenizer.model"))
            probes = [{"text": s, "ids": sp.encode(s), "decoded": sp.decode(sp.encode(s))} for s in SPM_PROBES]
            with open(os.path.join(d, "spm_probes.json"), "w") as f:
                json.dump(probes, f, indent=2, ensure_ascii=False)
        else:
            shutil.copy(tok_path, os.path.join(d, "tokenizer.json"))
        with open(os.path.join(d, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": 1, "eos_token_id": [2], "do_sample": False}, f, indent=2)
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
