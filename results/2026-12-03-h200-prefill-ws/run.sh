#!/usr/bin/env bash
# The device call behind this folder's README (one H200), from the repo root
# with gpu-bundle/ (scripts/gpu-build.sh) and .cubins/ (the new kernels'
# sm_90a cubins from nvcc -cubin here, for cuobjdump there) carried:
#   1. SASS of the warp-specialized kernels: HGMMA, setmaxnreg, no local memory;
#   2. the vattention GPU tests (every prefill kernel vs the CPU twin, GQA 4/7/8);
#   3. compute-sanitizer memcheck and racecheck on the ws/wsp long-chunk test;
#   4. vpod-bench prefill: today's default tile (tma64) vs ws vs wsp, Llama-3-8B
#      and Yi-6B heads, in one process (ceilings measured in it).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h200-ws}; mkdir -p "$OUT"
B=/tmp/vpod-bundle; rm -rf "$B"; mkdir -p "$B"
tar -C "$B" -xJf gpu-bundle/bundle.tar.xz || { echo "no gpu-bundle/bundle.tar.xz" >&2; exit 1; }
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv > "$OUT/gpu.txt"
cp gpu-bundle/manifest.txt "$OUT/manifest.txt" 2>/dev/null
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"; }

stamp sass
for f in .cubins/*.cubin; do
    echo "$f: $(cuobjdump --dump-sass "$f" | grep -oE 'HGMMA[.A-Z0-9x]*|USETMAXREG[.A-Z]*|UTMALDG[.A-Z0-9]*|LDL|STL' | sort | uniq -c | tr '\n' ' ')"
done >> "$OUT/log.txt" 2>&1

stamp ws-test
timeout 90 "$B/integration" gpu::vattention_ws --test-threads=1 > "$OUT/ws-test.log" 2>&1; echo "rc $?" >> "$OUT/ws-test.log"
tail -n 4 "$OUT/ws-test.log" >> "$OUT/log.txt"

stamp bench
timeout 240 "$B/vpod-bench" prefill --out "$OUT/prefill" --backends vattention --models llama3-8b,yi-6b \
    --kernels "${KERNELS:-tma64,ws,wsp}" > "$OUT/prefill.log" 2>&1; echo "rc $?" >> "$OUT/prefill.log"

stamp tests
timeout 150 "$B/integration" gpu::vattention --test-threads=1 > "$OUT/tests.log" 2>&1; echo "rc $?" >> "$OUT/tests.log"
tail -n 4 "$OUT/tests.log" >> "$OUT/log.txt"

for tool in memcheck racecheck; do
    stamp "$tool"
    timeout 90 compute-sanitizer --tool $tool --error-exitcode 9 "$B/integration" gpu::vattention_ws --test-threads=1 \
        > "$OUT/$tool.log" 2>&1; echo "rc $?" >> "$OUT/$tool.log"
    tail -n 3 "$OUT/$tool.log" >> "$OUT/log.txt"
done
stamp done
cat "$OUT/prefill.log"
cat "$OUT/log.txt"
