"""Kernel times of `vpod-bench decode` from Nsight Compute's CSV
(`ncu --csv --metrics gpu__time_duration.sum -k regex:"slot_decode|paged_decode" ...`):
groups consecutive launches of one sweep point (the same main kernel and
grid), takes the median duration of the main kernel (vattention's split-KV
`slot_decode_bf16`, or the paged backend's `paged_decode_v1/v2_b*`) and of its
second kernel (the split combine, or v2's reduce), and prints the achieved
K/V bandwidth of the kernels alone, then each backend's latency relative to
the first (the vAttention paper's figure 9b).
Usage: kernel_times.py NCU_CSV [--context 16384] [--backends vattention,paged:16,paged:128] [--out JSON]."""
import argparse, csv, json, statistics

SHAPES = [("llama3-8b", 32, 8), ("yi-6b", 32, 4), ("yi-34b", 56, 8)]
BATCHES = [1, 2, 4, 8, 16, 32]
AUX = ("slot_decode_combine", "paged_decode_reduce")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--backends", default="vattention,paged:16,paged:128")
    ap.add_argument("--out")
    a = ap.parse_args()
    backends = a.backends.split(",")
    rows = [r for r in csv.DictReader(l for l in open(a.csv) if l.startswith('"'))]
    # [(key, {"main": [ns], "aux": [ns], "kernel": name})] in launch order.
    points = []
    for r in rows:
        name, grid = r["Kernel Name"].split("(")[0], r["Grid Size"]
        ns = float(r["Metric Value"].replace(",", ""))
        if name.startswith(AUX):
            if points:
                points[-1][1]["aux"].append(ns)
        elif name.startswith(("slot_decode", "paged_decode")):
            if not points or points[-1][0] != (name, grid):
                points.append(((name, grid), {"main": [], "aux": [], "kernel": name}))
            points[-1][1]["main"].append(ns)
    labels = [(be, m, h, k, b) for be in backends for (m, h, k) in SHAPES for b in BATCHES]
    if len(points) != len(labels):
        print(f"warning: {len(points)} sweep points in the profile, {len(labels)} expected")
    out = []
    print("| backend | model | batch | kernel | grid | main us | 2nd us | kernels TB/s |\n|---|---|---|---|---|---|---|---|")
    for ((name, grid), t), (be, m, h, k, b) in zip(points, labels):
        s = statistics.median(t["main"]) / 1e3
        c = statistics.median(t["aux"]) / 1e3 if t["aux"] else 0.0
        bytes_ = 2 * b * (a.context + 1) * k * 128 * 2
        tb = bytes_ / ((s + c) * 1e-6) / 1e12
        print(f"| {be} | {m} {h}/{k} | {b} | {name} | {grid} | {s:.1f} | {c:.1f} | {tb:.2f} |")
        out.append(dict(backend=be, model=m, heads=h, kv_heads=k, batch=b, kernel=name, grid=grid, main_us=s,
                        second_us=c, total_us=s + c, tb_per_s=tb))
    if len(backends) > 1:
        base = backends[0]
        us = {(r["backend"], r["model"], r["batch"]): r["total_us"] for r in out}
        print(f"\n| model | batch | {base} us | " + " | ".join(f"{o} us | {o} / {base}" for o in backends[1:]) + " |")
        print("|---|---|---|" + "---|---|" * (len(backends) - 1))
        for (m, _, _) in SHAPES:
            for b in BATCHES:
                b0 = us.get((base, m, b))
                if b0 is None:
                    continue
                cells = []
                for o in backends[1:]:
                    x = us.get((o, m, b))
                    cells.append("- | -" if x is None else f"{x:.1f} | {x / b0:.2f}")
                print(f"| {m} | {b} | {b0:.1f} | " + " | ".join(cells) + " |")
    if a.out:
        json.dump(dict(benchmark="decode-kernels-ncu", context=a.context, results=out), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
