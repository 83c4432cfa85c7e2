"""Merges the three e2e runs of this directory into fig9a.json and fig9a.svg
(decode tokens/s vs batch, one line per model and backend): the batch-8
points come from the re-run with the GEMV limited to 4 rows
(vb-e2e-batch8-gemv4.log), the others from vb-e2e-yi6b-llama3.log and
vb-e2e-yi34b.log. Usage: python3 fig9a.py (in this directory)."""
import json, re

rows = {}


def parse(f, only_batch=None):
    for line in open(f):
        m = re.match(r"\| (\S+) \| (\S+) \| (\d+) \| ([\d.]+) \| ([\d.]+) \|", line)
        if m and (only_batch is None or int(m[3]) == only_batch):
            rows[(m[1], m[2], int(m[3]))] = dict(model=m[1], backend=m[2], batch=int(m[3]),
                                                decode_tokens_per_s=float(m[4]), median_step_ms=float(m[5]), source=f)


parse("vb-e2e-yi6b-llama3.log")
parse("vb-e2e-yi34b.log")
parse("vb-e2e-batch8-gemv4.log", 8)
data = sorted(rows.values(), key=lambda r: (r["model"], r["backend"], r["batch"]))
json.dump(dict(benchmark="e2e decode throughput, 16K context per request, 128 generated tokens",
               gpu="NVIDIA H200", results=data), open("fig9a.json", "w"), indent=1)
W, H, P = 960, 460, 60
colors = {"vattention": "#d62728", "paged:16": "#1f77b4", "paged:128": "#2ca02c"}
dash = {"yi-6b": "", "llama3-8b": "6,3", "yi-34b": "2,2"}
ymax = max(r["decode_tokens_per_s"] for r in data) * 1.1
xs = [1, 2, 4, 8, 16, 32]
X = lambda b: P + xs.index(b) / (len(xs) - 1) * (W - 2 * P)
Y = lambda v: H - P - v / ymax * (H - 2 * P)
s = [f"<svg xmlns='http://www.w3.org/2000/svg' width='{W}' height='{H}' font-family='sans-serif' font-size='12'>",
     "<rect width='100%' height='100%' fill='white'/>",
     f"<text x='{P}' y='22'>Decode throughput (tokens/s), 16K context per request, H200, synthetic weights</text>",
     f"<line x1='{P}' y1='{H - P}' x2='{W - P}' y2='{H - P}' stroke='black'/><line x1='{P}' y1='{P}' x2='{P}' y2='{H - P}' stroke='black'/>"]
for b in xs:
    s.append(f"<text x='{X(b) - 5:.0f}' y='{H - P + 18}'>{b}</text>")
for v in range(0, int(ymax), 200):
    s.append(f"<text x='10' y='{Y(v) + 4:.0f}'>{v}</text><line x1='{P}' y1='{Y(v):.0f}' x2='{W - P}' y2='{Y(v):.0f}' stroke='#eee'/>")
s.append(f"<text x='{W / 2 - 30:.0f}' y='{H - 15}'>batch size</text>")
i = 0
for m in dash:
    for be in colors:
        pts = [r for r in data if r["model"] == m and r["backend"] == be]
        if not pts:
            continue
        xy = " ".join(f"{X(r['batch']):.1f},{Y(r['decode_tokens_per_s']):.1f}" for r in pts)
        s.append(f"<polyline fill='none' stroke='{colors[be]}' stroke-width='2' stroke-dasharray='{dash[m]}' points='{xy}'/>")
        s.append(f"<text x='{P + 10}' y='{P + 14 * i}' fill='{colors[be]}'>{m} {be}</text>")
        i += 1
s.append("</svg>")
open("fig9a.svg", "w").write("\n".join(s) + "\n")
print(f"{len(data)} points -> fig9a.json, fig9a.svg")
