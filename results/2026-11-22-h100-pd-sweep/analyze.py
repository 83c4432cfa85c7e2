"""Tables of this directory's README from its raw files (python3 analyze.py).

1. Hybrid steps of the serial and the POD run of each workload, by decodes in
   the step (the runs of one model and workload share the schedule: step i
   of both is the same batch), and the POD/serial ratio of their mean times.
2. Each run's mean power and SM clock over its stretch of `nvidia-smi dmon`
   samples above 250 W (the runs are the only such stretches, in the JSON's
   order), and the energy per request they imply.
3. power/: the 100 ms samples of `nvidia-smi --query-gpu` during the two timed
   runs: how often the SW power cap held the clock down.
4. ncu/: Nsight Compute counters of the serial pair's kernels and the fused
   kernel at one serving step shape (Llama-3-8B, chunk 1024 at 1K / 9K / 15K,
   26 decodes of 16K), mean over the profiled launches; then, from a second
   call, how busy L2, L1 and the tensor pipe were.
"""

import collections
import csv
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def load(name):
    with open(os.path.join(HERE, name)) as f:
        return json.load(f)[0]["results"]


def step_ratios(runs):
    by_workload = collections.defaultdict(dict)
    for r in runs:
        by_workload[(r["model"], r["prompt"], r["output"])][r["backend"]] = r
    for (model, prompt, output), pair in by_workload.items():
        serial, pod = pair["vattention"], pair["pod"]
        gain = pod["requests_per_min"] / serial["requests_per_min"] - 1
        print(f"\n{model} {prompt}+{output} (P:D {prompt / output:.0f}): requests/min "
              f"{serial['requests_per_min']:.2f} -> {pod['requests_per_min']:.2f} ({gain * 100:+.1f} %)")
        buckets = collections.defaultdict(lambda: [0, 0.0, 0.0, 0])
        for a, b in zip(serial["steps_detail"], pod["steps_detail"]):
            assert a[:2] == b[:2], "the two runs' schedules differ"
            if a[0] > 0 and a[1] > 0:
                k = buckets[a[0] // 4 * 4]
                k[0] += 1
                k[1] += a[2]
                k[2] += b[2]
                k[3] += b[4]
        print("| decodes in the step | hybrid steps | serial ms | POD ms | serial / POD | fused |")
        print("|---|---|---|---|---|---|")
        for d in sorted(buckets):
            n, ta, tb, fused = buckets[d]
            print(f"| {d}-{d + 3} | {n} | {ta / n:.1f} | {tb / n:.1f} | {ta / tb:.3f} | {fused} |")


def dmon(runs, log):
    samples = []
    with open(os.path.join(HERE, log)) as f:
        for line in f:
            cols = line.split()
            if line.startswith("#") or len(cols) < 7:
                continue
            samples.append((float(cols[2]), int(cols[6])))  # pwr W, pclk MHz
    stretches, cur = [], []
    for watts, mhz in samples + [(0.0, 0)]:
        if watts > 250:
            cur.append((watts, mhz))
        else:
            if len(cur) > 5:
                stretches.append(cur)
            cur = []
    assert len(stretches) == len(runs), f"{log}: {len(stretches)} stretches for {len(runs)} runs"
    print(f"\n{log}\n| model | prompt+output | backend | requests/min | mean W | mean SM MHz | kJ per request |")
    print("|---|---|---|---|---|---|---|")
    for r, s in zip(runs, stretches):
        watts = sum(x[0] for x in s) / len(s)
        mhz = sum(x[1] for x in s) / len(s)
        kj = watts * r["wall_s"] / r["requests"] / 1e3
        print(f"| {r['model']} | {r['prompt']}+{r['output']} | {r['backend']} | {r['requests_per_min']:.2f} "
              f"| {watts:.0f} | {mhz:.0f} | {kj:.3f} |")


def power_cap():
    def secs(stamp):
        h, m, s = stamp.strip().split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    rows = []
    with open(os.path.join(HERE, "power", "clocks.csv")) as f:
        for line in f:
            c = [x.strip() for x in line.split(",")]
            if len(c) < 10 or not c[1].endswith("W"):
                continue
            rows.append((secs(c[0].split()[1]), float(c[1].split()[0]), int(c[2].split()[0]), c[6] == "Active"))
    print("\npower/clocks.csv (100 ms samples over each timed run)")
    print("| backend | requests/min | samples | mean W | mean SM MHz | SW power cap active |")
    print("|---|---|---|---|---|---|")
    for backend in ("vattention", "pod"):
        with open(os.path.join(HERE, "power", f"serve-{backend}.json")) as f:
            r = json.load(f)[0]["results"][0]
        with open(os.path.join(HERE, "power", f"end-{backend}.txt")) as f:
            end = secs(f.read())
        s = [x for x in rows if end - r["wall_s"] - 0.3 <= x[0] <= end - 0.3]
        print(f"| {backend} | {r['requests_per_min']:.2f} | {len(s)} | {sum(x[1] for x in s) / len(s):.0f} "
              f"| {sum(x[2] for x in s) / len(s):.0f} | {100 * sum(x[3] for x in s) / len(s):.0f} % |")


def ncu():
    print("\nncu/ (Llama-3-8B heads, chunk 1024 next to 26 decodes of 16K; one layer)")
    print("| chunk at | kernel | us | DRAM read MB | DRAM TB/s | DRAM % of peak | L2 MB | SM % of peak | SM MHz |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pos in (1024, 9216, 15360):
        with open(os.path.join(HERE, "ncu", f"ncu-{pos}.csv")) as f:
            rows = list(csv.DictReader(f))
        kernels = collections.defaultdict(lambda: collections.defaultdict(list))
        for r in rows:
            kernels[r["Kernel Name"]][r["Metric Name"]].append(float(r["Metric Value"].replace(",", "")))
        for name, m in kernels.items():
            def mean(metric):
                return sum(m[metric]) / len(m[metric])
            us = mean("gpu__time_duration.sum") / 1e3
            read = mean("dram__bytes_read.sum")
            print(f"| {pos} | {name} | {us:.0f} | {read / 1e6:.0f} | {read / us / 1e6:.2f} "
                  f"| {mean('dram__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} "
                  f"| {mean('lts__t_bytes.sum') / 1e6:.0f} | {mean('sm__throughput.avg.pct_of_peak_sustained_elapsed'):.0f} "
                  f"| {mean('sm__cycles_elapsed.avg.per_second') / 1e6:.0f} |")


def ncu_pipes():
    """The second ncu call: how busy L2, L1 and the tensor pipe were."""
    cols = [
        ("lts__throughput.avg.pct_of_peak_sustained_elapsed", "L2 % of peak"),
        ("lts__t_sectors.avg.pct_of_peak_sustained_elapsed", "L2 sectors % of peak"),
        ("lts__t_sector_hit_rate.pct", "L2 hit %"),
        ("l1tex__throughput.avg.pct_of_peak_sustained_elapsed", "L1 % of peak"),
        ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_elapsed", "tensor pipe % active"),
    ]
    print("\n| chunk at | kernel | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for pos in (1024, 9216, 15360):
        kernels = collections.defaultdict(lambda: collections.defaultdict(list))
        for part in ("l2", "tensor"):
            with open(os.path.join(HERE, "ncu", f"ncu-{part}-{pos}.csv")) as f:
                for r in csv.DictReader(f):
                    kernels[r["Kernel Name"]][r["Metric Name"]].append(float(r["Metric Value"].replace(",", "")))
        for name, m in kernels.items():
            vals = " | ".join(f"{sum(m[c]) / len(m[c]):.0f}" for c, _ in cols)
            print(f"| {pos} | {name} | {vals} |")


if __name__ == "__main__":
    for model in ("llama3-8b", "yi-6b"):
        runs = load(f"serve-{model}.json")
        step_ratios(runs)
        dmon(runs, f"dmon-{model}.log")
    power_cap()
    ncu()
    ncu_pipes()
