"""PyTorch SDPA next to our kernels (run on the GPU machine, same device call):
decode (one query token per sequence, 16K context, batch 1..32, the three
models' head shapes) and prefill (16K causal prompt; a 1024-token chunk at
offsets 4K and 12K, bottom-right causal), with the FlashAttention-2 and cuDNN
backends. Writes JSON to --out (sdpa.json) and prints tables.
"""
import argparse, json, os
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [("llama3-8b", 32, 8), ("yi-6b", 32, 4), ("yi-34b", 56, 8)]
BACKENDS = {"flash2": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return times[len(times) // 2]


def expand(kv, group):
    # [B, kvh, S, D] -> [B, kvh * group, S, D] as a view (no copy) where possible
    b, h, s, d = kv.shape
    return kv[:, :, None].expand(b, h, group, s, d).reshape(b, h * group, s, d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/vpod-gpu")
    ap.add_argument("--context", type=int, default=16384)
    args = ap.parse_args()
    dev = torch.device("cuda")
    rows = []
    print("| SDPA backend | model | batch | us | K/V TB/s |\n|---|---|---|---|---|")
    for name, heads, kvh in SHAPES:
        for b in [1, 2, 4, 8, 16, 32]:
            ctx = args.context + 1
            q = torch.randn(b, heads, 1, 128, device=dev, dtype=torch.bfloat16)
            k = torch.randn(b, kvh, ctx, 128, device=dev, dtype=torch.bfloat16)
            v = torch.randn(b, kvh, ctx, 128, device=dev, dtype=torch.bfloat16)
            for bk, be in BACKENDS.items():
                try:
                    with sdpa_kernel(be):
                        # enable_gqa reads each KV head once where the backend supports it
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                        s = timed(fn)
                except Exception as e:  # backend refuses the shape
                    try:
                        ke, ve = expand(k, heads // kvh), expand(v, heads // kvh)
                        with sdpa_kernel(be):
                            fn = lambda: F.scaled_dot_product_attention(q, ke, ve)
                            s = timed(fn)
                    except Exception as e2:
                        print(f"| {bk} | {name} | {b} | n/a: {str(e2).splitlines()[0][:60]} | |")
                        continue
                tb = 2 * b * ctx * kvh * 128 * 2 / s / 1e12
                print(f"| {bk} | {name} {heads}/{kvh} | {b} | {s * 1e6:.1f} | {tb:.2f} |")
                rows.append(dict(kind="decode", backend=bk, model=name, heads=heads, kv_heads=kvh, batch=b,
                                 context=args.context, us=s * 1e6, tb_per_s=tb))
            del q, k, v
    print("\n| SDPA backend | case | ms | TFLOP/s |\n|---|---|---|---|")
    heads, kvh = 32, 8
    for case, ctx, ql in [("16K causal prompt", 0, 16384), ("1024 chunk at 4K", 4096, 1024),
                          ("1024 chunk at 12K", 12288, 1024)]:
        q = torch.randn(1, heads, ql, 128, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, kvh, ctx + ql, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn(1, kvh, ctx + ql, 128, device=dev, dtype=torch.bfloat16)
        ke, ve = expand(k, heads // kvh), expand(v, heads // kvh)
        if ctx == 0:
            kwargs = dict(is_causal=True)
        else:
            from torch.nn.attention.bias import causal_lower_right
            kwargs = dict(attn_mask=causal_lower_right(ql, ctx + ql))
        pairs = ql * ctx + ql * (ql + 1) / 2
        flops = 4 * 128 * heads * pairs
        for bk, be in BACKENDS.items():
            try:
                with sdpa_kernel(be):
                    s = timed(lambda: F.scaled_dot_product_attention(q, ke, ve, **kwargs))
            except Exception as e:
                print(f"| {bk} | {case} | n/a: {str(e).splitlines()[0][:60]} | |")
                continue
            print(f"| {bk} | {case} | {s * 1e3:.3f} | {flops / s / 1e12:.0f} |")
            rows.append(dict(kind="prefill", backend=bk, case=case, context=ctx, query_len=ql, heads=heads,
                             kv_heads=kvh, ms=s * 1e3, tflop_per_s=flops / s / 1e12))
    os.makedirs(args.out, exist_ok=True)
    json.dump(dict(benchmark="sdpa", gpu=torch.cuda.get_device_name(), torch=torch.__version__, results=rows),
              open(os.path.join(args.out, "sdpa.json"), "w"), indent=1)


if __name__ == "__main__":
    main()
