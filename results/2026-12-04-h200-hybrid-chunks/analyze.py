#!/usr/bin/env python3
"""Issue 22 item 2: would capturing hybrid steps (a prefill chunk + decodes) as CUDA graphs pay?

Reads graphs-on/serve.json (chunks 256, 512, 1024; hybrid/vattention and hybrid/pod; decode-only
steps replayed, hybrid steps eager) and graphs-off/serve.json (chunk 256, hybrid/pod, every step
eager) and prints, per run, each step kind's mean time split as the engine's StepRecord splits it:
queued (the host queueing the step's kernels while the GPU computes), wait (the host blocked on the
results: the GPU still busy after everything was queued) and host (the host alone)."""
import json
import statistics as st
import sys
from pathlib import Path

here = Path(__file__).parent
COLS = None


def runs(path):
    d = json.load(open(path))[0]
    return d["gpu"], d["command"], d["results"]


def split(r, kind):
    global COLS
    COLS = r["step_columns"]
    i = {c: k for k, c in enumerate(COLS)}
    pick = {
        "hybrid": lambda s: s[i["decodes"]] > 0 and s[i["prefill_tokens"]] > 0,
        "decode": lambda s: s[i["prefill_tokens"]] == 0,
    }[kind]
    steps = [s for s in r["steps_detail"] if pick(s)]
    m = lambda c: st.mean(s[i[c]] for s in steps) if steps else 0.0
    return len(steps), m("ms"), m("queued_ms"), m("wait_ms"), m("host_ms"), m("decodes")


print("| graphs | backend | chunk | requests / min | step kind | steps | mean decodes | ms a step | queued | wait | host |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
table = {}
for tag in ("graphs-on", "graphs-off"):
    gpu, cmd, rows = runs(here / tag / "serve.json")
    for r in rows:
        for kind in ("hybrid", "decode"):
            n, ms, q, w, h, dec = split(r, kind)
            table[(tag, r["backend"], r["chunk"], kind)] = ms
            print(f"| {'on' if r['cuda_graphs'] in ('on', True) else 'off'} | {r['backend']} | {r['chunk']} | "
                  f"{r['requests_per_min']:.1f} | {kind} | {n} | {dec:.1f} | {ms:.2f} | {q:.2f} | {w:.2f} | {h:.3f} |")
print(f"\nGPU: {gpu}")
on = table[("graphs-on", "pod", 256, "decode")]
off = table[("graphs-off", "pod", 256, "decode")]
print(f"decode-only steps, chunk-256 run, pod: eager {off:.3f} ms, replayed {on:.3f} ms: "
      f"graphs save {off - on:.3f} ms a step")
for c in (256, 512, 1024):
    h = table[("graphs-on", "pod", c, "hybrid")]
    print(f"chunk {c}: hybrid step {h:.2f} ms; the same saving would be {100 * (off - on) / h:.1f} % of it")
sys.exit(0)
