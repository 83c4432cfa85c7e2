#!/usr/bin/env python3
"""Write a synthetic full-size checkpoint of a preset in the Hugging Face Hub
cache layout, so that the real loader (hf-hub cache lookup, sharded
safetensors, mmap, dtype conversion) runs at full size with HF_HUB_OFFLINE=1
on a machine with no network.

  python3 scripts/make_synthetic_checkpoint.py --preset llama3-8b --cache /tmp/hf/hub

Weights are N(0, 0.02) bf16 (norms 1) in shards of at most --shard-gb GB,
with model.safetensors.index.json, config.json, generation_config.json and a
tokenizer.json (the tiny fixture's: ids stay below the vocabulary size).
Uses the GPU for the random numbers when there is one.
"""
import argparse
import hashlib
import json
import os
import shutil
import time

import torch
from safetensors.torch import save_file

PRESETS = {
    # alias: (repo, layers, hidden, heads, kv_heads, ffn, vocab, rope_theta, max_pos, bos, eos)
    "yi-6b": ("01-ai/Yi-6B", 32, 4096, 32, 4, 11008, 64000, 5e6, 4096, 1, 2),
    "llama3-8b": ("meta-llama/Meta-Llama-3-8B", 32, 4096, 32, 8, 14336, 128256, 5e5, 8192, 128000, 128001),
    "yi-34b": ("01-ai/Yi-34B", 60, 7168, 56, 8, 20480, 64000, 5e6, 4096, 1, 2),
}


def tensors(layers, hidden, heads, kv, ffn, vocab):
    hd = hidden // heads
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (hidden,)
        yield f"{p}.self_attn.q_proj.weight", (heads * hd, hidden)
        yield f"{p}.self_attn.k_proj.weight", (kv * hd, hidden)
        yield f"{p}.self_attn.v_proj.weight", (kv * hd, hidden)
        yield f"{p}.self_attn.o_proj.weight", (hidden, heads * hd)
        yield f"{p}.post_attention_layernorm.weight", (hidden,)
        yield f"{p}.mlp.gate_proj.weight", (ffn, hidden)
        yield f"{p}.mlp.up_proj.weight", (ffn, hidden)
        yield f"{p}.mlp.down_proj.weight", (hidden, ffn)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--cache", required=True, help="Hub cache directory (what HF_HUB_CACHE points to)")
    ap.add_argument("--shard-gb", type=float, default=5.0)
    ap.add_argument("--tokenizer", default="tests/fixtures/tiny-llama3-gqa4/tokenizer.json")
    args = ap.parse_args()
    repo, layers, hidden, heads, kv, ffn, vocab, theta, max_pos, bos, eos = PRESETS[args.preset]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    commit = hashlib.sha1(f"synthetic-{args.preset}".encode()).hexdigest()
    root = os.path.join(args.cache, "models--" + repo.replace("/", "--"))
    snap = os.path.join(root, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(root, "refs"), exist_ok=True)
    with open(os.path.join(root, "refs", "main"), "w") as f:
        f.write(commit)

    # Group tensors into shards, then write each shard.
    shards, cur, cur_bytes = [], [], 0
    limit = int(args.shard_gb * 1e9)
    for name, shape in tensors(layers, hidden, heads, kv, ffn, vocab):
        n = 2 * int(torch.tensor(shape).prod())
        if cur and cur_bytes + n > limit:
            shards.append(cur)
            cur, cur_bytes = [], 0
        cur.append((name, shape))
        cur_bytes += n
    shards.append(cur)
    torch.manual_seed(0)
    weight_map, total, t0 = {}, 0, time.time()
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                t = (torch.randn(shape, device=dev, dtype=torch.float32) * 0.02).to(torch.bfloat16).cpu()
            data[name] = t
            weight_map[name] = fname
            total += t.numel() * 2
        save_file(data, os.path.join(snap, fname), metadata={"format": "pt"})
        print(f"  {fname}: {len(shard)} tensors ({time.time() - t0:.0f} s)", flush=True)
    with open(os.path.join(snap, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": ffn, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "vocab_size": vocab, "max_position_embeddings": max_pos,
        "rms_norm_eps": 1e-5, "rope_theta": theta, "torch_dtype": "bfloat16", "tie_word_embeddings": False,
        "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu",
    }
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(snap, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": bos, "eos_token_id": eos}, f)
    shutil.copy(args.tokenizer, os.path.join(snap, "tokenizer.json"))
    print(f"wrote {total / 1e9:.2f} GB in {len(shards)} shards to {snap} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
