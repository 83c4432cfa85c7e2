"""Kernel times of `vpod-bench decode` from Nsight Compute's CSV
(`ncu --csv --metrics gpu__time_duration.sum -k regex:slot_decode ...`):
groups consecutive launches of one sweep point (same grid), takes the median
duration of the split kernel and of the combine, and prints the achieved K/V
bandwidth of the kernels alone. Usage: kernel_times.py NCU_CSV --context 16384
[--out JSON]."""
import argparse, csv, json, statistics

SHAPES = [("llama3-8b", 32, 8), ("yi-6b", 32, 4), ("yi-34b", 56, 8)]
BATCHES = [1, 2, 4, 8, 16, 32]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--out")
    a = ap.parse_args()
    rows = [r for r in csv.DictReader(l for l in open(a.csv) if l.startswith('"'))]
    # [(grid, {kernel: [ns]})] in launch order; a new point starts when the split kernel's grid changes.
    points = []
    for r in rows:
        name, grid = r["Kernel Name"], r["Grid Size"]
        ns = float(r["Metric Value"].replace(",", ""))
        if name.startswith("slot_decode_bf16"):
            if not points or points[-1][0] != grid:
                points.append((grid, {"split": [], "combine": []}))
            points[-1][1]["split"].append(ns)
        elif name.startswith("slot_decode_combine") and points:
            points[-1][1]["combine"].append(ns)
    labels = [(m, h, k, b) for (m, h, k) in SHAPES for b in BATCHES]
    out = []
    print("| model | batch | grid | split us | combine us | kernels TB/s |\n|---|---|---|---|---|---|")
    for (grid, t), (m, h, k, b) in zip(points, labels):
        s = statistics.median(t["split"]) / 1e3
        c = statistics.median(t["combine"]) / 1e3 if t["combine"] else 0.0
        bytes_ = 2 * b * (a.context + 1) * k * 128 * 2
        tb = bytes_ / ((s + c) * 1e-6) / 1e12
        print(f"| {m} {h}/{k} | {b} | {grid} | {s:.1f} | {c:.1f} | {tb:.2f} |")
        out.append(dict(model=m, heads=h, kv_heads=k, batch=b, grid=grid, split_us=s, combine_us=c, tb_per_s=tb))
    if a.out:
        json.dump(dict(benchmark="decode-kernels-ncu", context=a.context, results=out), open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()
