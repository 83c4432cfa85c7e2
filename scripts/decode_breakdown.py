#!/usr/bin/env python3
"""Where a decode step's time goes, from an Nsight Compute CSV of one run.

  ncu --csv --metrics gpu__time_duration.sum --print-units base <cli generate ... --max-tokens 2> > ncu.csv
  python3 scripts/decode_breakdown.py ncu.csv --step-ms 9.5

A forward pass starts with three `index_select` kernels (token embedding,
RoPE cos and sin); the kernels from the last such triple to the end are the
last decode step. Kernel time is summed by category and compared with the
measured wall time of a step (--step-ms, from the benchmark run without the
profiler): the difference is launch overhead and idle gaps on the GPU.
"""
import argparse
import csv
import json
import re
import sys

# candle names its index_select kernels is_<index dtype>_<dtype>.
IS_INDEX_SELECT = re.compile(r"^is_u32_|index_select")

CATEGORIES = [
    ("matmul (cuBLAS)", re.compile(r"gemm|gemv|cutlass|xmma|nvjet|splitK|cublas", re.I)),
    ("rms_norm", re.compile(r"rmsnorm|rms_norm", re.I)),
    ("rope", re.compile(r"rope", re.I)),
    ("softmax", re.compile(r"softmax", re.I)),
    ("copies (KV append, cat, contiguous)", re.compile(r"copy|ucopy|slice|fill", re.I)),
    ("dtype casts", re.compile(r"cast", re.I)),
    ("elementwise (add, mul, silu, scale)", re.compile(r"badd|bmul|bsub|bdiv|affine|usilu|silu|uexp", re.I)),
    ("index_select / gather / reduce", re.compile(r"^is_|index_select|gather|reduce|fast_max|fast_sum|argmax", re.I)),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--step-ms", type=float, required=True)
    args = ap.parse_args()
    rows = []
    with open(args.csv) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            rows.append((r["Kernel Name"], float(r["Metric Value"].replace(",", "")) / 1e6))  # ns -> ms
    starts = [i for i in range(len(rows) - 2)
              if all(IS_INDEX_SELECT.search(rows[i + j][0]) for j in range(3))]
    if not starts:
        sys.exit("no forward pass found")
    step = rows[starts[-1]:]
    cats = {}
    for name, ms in step:
        cat = next((c for c, rx in CATEGORIES if rx.search(name)), "other")
        n, t = cats.get(cat, (0, 0.0))
        cats[cat] = (n + 1, t + ms)
    kernel_ms = sum(t for _, t in cats.values())
    print(f"| category | kernels | GPU ms | share of step |\n|---|---|---|---|")
    for cat, (n, t) in sorted(cats.items(), key=lambda kv: -kv[1][1]):
        print(f"| {cat} | {n} | {t:.3f} | {t / args.step_ms * 100:.1f} % |")
    gap = args.step_ms - kernel_ms
    print(f"| launch overhead and gaps (wall - kernel time) | | {gap:.3f} | {gap / args.step_ms * 100:.1f} % |")
    print(f"| **step (wall, measured without profiler)** | {len(step)} | {args.step_ms:.3f} | 100 % |")
    json.dump({"step_ms": args.step_ms, "kernels": len(step), "kernel_ms": kernel_ms,
               "categories": {c: {"kernels": n, "ms": t} for c, (n, t) in cats.items()}},
              open(args.csv + ".json", "w"), indent=2)


if __name__ == "__main__":
    main()
