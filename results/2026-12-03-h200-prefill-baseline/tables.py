#!/usr/bin/env python3
"""Tables of this folder's README from the run's JSON (run.sh's baseline.tgz
unpacked here): ceilings, our prefill beside FlashInfer's FA2/FA3, the e2e
first-use breakdown.  python3 tables.py [DIR]"""
import json
import sys
from pathlib import Path

d = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).parent)


def load(p):
    try:
        return json.loads((d / p).read_text())
    except (OSError, ValueError):
        return None


pre = load("prefill/prefill.json")
fi = load("fi.json")
e2e = load("e2e/e2e.json")

for name, rec in [("prefill", pre), ("e2e", e2e)]:
    if rec:
        c = rec[0]["ceilings"]
        print(f"{name}: {rec[0]['gpu']}: copy {c['copy_tb_per_s']:.2f} TB/s, bf16 matmul {c['matmul_tflop_per_s']:.0f} TFLOP/s "
              f"(measured in {c['measured_in_s']:.2f} s, first use included)")

CASES = {"16K causal prompt": "prompt16k", "1024 chunk at 4K": "chunk1k+4k"}
if pre:
    rows = pre[0]["results"]
    fir = fi["prefill"] if fi else []
    def fa(model, case, impl):
        r = [x for x in fir if x["model"] == model and x["case"] == case and x["impl"] == impl and "tflops" in x]
        return r[0]["tflops"] if r else None
    print("\n| heads | case | ours: " + " | ours: ".join(sorted({r["tile"] for r in rows}, key=lambda t: [x["tile"] for x in rows].index(t)))
          + " | FA2 single | FA2 ragged | FA3 single | FA3 ragged | ours best / FA3 best |")
    tiles = list(dict.fromkeys(r["tile"] for r in rows))
    print("|---|---|" + "---|" * (len(tiles) + 5))
    for model in dict.fromkeys(r["model"] for r in rows):
        for case in dict.fromkeys(r["case"] for r in rows):
            mine = {r["tile"]: r["tflop_per_s"] for r in rows if r["model"] == model and r["case"] == case}
            h = next(r for r in rows if r["model"] == model)
            cells = [f"{mine[t]:.0f}" if t in mine else "-" for t in tiles]
            fic = CASES.get(case)
            f = [fa(model, fic, i) if fic else None for i in ("single_fa2", "ragged_fa2", "single_fa3", "ragged_fa3")]
            best3 = max([x for x in f[2:] if x] or [0])
            ratio = f"{max(mine.values()) / best3:.2f}x" if best3 else "-"
            print(f"| {model} {h['heads']}/{h['kv_heads']} | {case} | " + " | ".join(cells) + " | "
                  + " | ".join(f"{x:.0f}" if x else "-" for x in f) + f" | {ratio} |")

if e2e:
    print("\n| model | backend | batch | prefill s (timed run) | warm-up s | decode tok/s | first prefill step ms: total / queued / wait / host / attention | warm-up prefill step ms: same |")
    print("|---|---|---|---|---|---|---|---|")
    for r in e2e[0]["results"]:
        if "backend" not in r or "prefill_s" not in r:
            continue
        f = lambda s: " / ".join(f"{x:.0f}" for x in s[1:]) if s else "-"
        print(f"| {r['model']} | {r['backend']} | {r['batch']} | {r['prefill_s']:.2f} | {r['warmup_s']:.2f} | "
              f"{r['decode_tokens_per_s']:.1f} | {f(r['prefill_steps'][0] if r['prefill_steps'] else None)} | "
              f"{f(r['warmup_prefill_steps'][0] if r['warmup_prefill_steps'] else None)} |")
for mode in ("warm-cache", "no-cache"):
    r = load(f"first-use-{mode}/e2e.json")
    if r:
        c = r[0]["ceilings"]["measured_in_s"]
        w = [x for x in r[0]["results"] if "warmup_s" in x]
        print(f"first use, new process, JIT cache {mode}: ceilings {c:.2f} s, warm-up {w[0]['warmup_s']:.2f} s" if w else mode)
