#!/usr/bin/env bash
# Call 2: correctness of the warp-specialized kernels (call 1's test stages
# ran past their timeouts: the CPU twins of its 1024-token chunks were too
# slow). T_TESTS / T_SAN: the timeouts (call 2 ran with the defaults, too short:
# README). The twin table (VPOD_QUICK: Llama-3-8B heads, every prefill kernel),
# the ws/wsp chunk test, and compute-sanitizer memcheck + racecheck on it.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h200-ws2}; mkdir -p "$OUT"
B=/tmp/vpod-bundle; rm -rf "$B"; mkdir -p "$B"
tar -C "$B" -xJf gpu-bundle/bundle.tar.xz || { echo "no gpu-bundle/bundle.tar.xz" >&2; exit 1; }
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
cp gpu-bundle/manifest.txt "$OUT/manifest.txt" 2>/dev/null
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"; }
stamp tests
VPOD_QUICK=1 timeout "${T_TESTS:-50}" "$B/integration" gpu::vattention --test-threads=1 > "$OUT/tests.log" 2>&1
echo "rc $?" >> "$OUT/tests.log"; tail -n 6 "$OUT/tests.log" >> "$OUT/log.txt"
for tool in memcheck racecheck; do
    stamp "$tool"
    timeout "${T_SAN:-45}" compute-sanitizer --tool $tool --error-exitcode 9 "$B/integration" gpu::vattention_ws --test-threads=1 \
        > "$OUT/$tool.log" 2>&1; echo "rc $?" >> "$OUT/$tool.log"
    tail -n 4 "$OUT/$tool.log" >> "$OUT/log.txt"
done
stamp done
cat "$OUT/log.txt"
