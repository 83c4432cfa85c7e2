#!/usr/bin/env bash
# The device call behind this folder's README (one H200, 2026-12-03), from the
# repo root with gpu-bundle/ (scripts/gpu-build.sh) and .anchors/ (FlashInfer
# harness + wheels, see ../shared/anchors/flashinfer/RUN.md) carried:
#   1. issue 20 item 5: `vpod-bench e2e` Yi-34B, vattention then paged:16,
#      batch 1, first thing in the process with an empty driver JIT cache,
#      the warm-up timed apart and the prefill steps broken down;
#   2. our prefill (`vpod-bench prefill`, vattention, Llama-3-8B / Yi-6B /
#      Yi-34B heads), `nvidia-smi dmon` sampling power and clocks meanwhile;
#   3. FlashInfer 0.5.3 FA2/FA3 prefill on the same GPU (decode and POD skipped);
#   4. page mapping cost (`vpod-bench map`);
#   5. the first-use cost again in new processes: JIT cache warm, then disabled.
# Everything lands in $OUT/baseline.tgz (plus the main logs).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h200-baseline}; R=$OUT/run; mkdir -p "$R"
B=/tmp/vpod-bundle; rm -rf "$B"; mkdir -p "$B"
tar -C "$B" -xJf gpu-bundle/bundle.tar.xz || { echo "no gpu-bundle/bundle.tar.xz" >&2; exit 1; }
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export VPOD_DATE=2026-12-03 HF_HUB_OFFLINE=1
export CUDA_CACHE_PATH=/tmp/vpod-jit-cache; rm -rf "$CUDA_CACHE_PATH"
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,power.max_limit,clocks.max.sm --format=csv | tee "$R/gpu.txt"
cp gpu-bundle/manifest.txt "$R/" 2>/dev/null
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s"; }

stamp e2e
timeout 240 "$B/vpod-bench" e2e --out "$R/e2e" --models yi-34b --backends vattention,paged:16 --batch 1 \
    --tokens 64 --profile-attention > "$R/e2e.log" 2>&1; echo "rc $?" >> "$R/e2e.log"
du -sh "$CUDA_CACHE_PATH" >> "$R/e2e.log" 2>&1
cat "$R/e2e.log"

stamp prefill
nvidia-smi dmon -s pc -d 1 > "$R/dmon.txt" 2>&1 & dmon=$!
timeout 200 "$B/vpod-bench" prefill --out "$R/prefill" --backends vattention --models llama3-8b,yi-6b,yi-34b \
    > "$R/prefill.log" 2>&1; echo "rc $?" >> "$R/prefill.log"
kill "$dmon" 2>/dev/null
cat "$R/prefill.log"

stamp flashinfer
if [ -d .anchors/whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .anchors/whl/*.whl \
        > "$R/fi-pip.log" 2>&1
    PYTHONPATH=/tmp/site FI_FORCE_JIT=1 FI_SKIP=decode,pod FI_BUDGET_S=330 FI_JIT_BUDGET_S=270 MAX_JOBS=16 \
        OUT="$R" PYTHONUNBUFFERED=1 timeout 360 python3 .anchors/flashinfer/bench_fi.py > "$R/fi.log" 2>&1
    echo "rc $?" >> "$R/fi.log"
    tail -n 30 "$R/fi.log"
fi

stamp map
timeout 60 "$B/vpod-bench" map --out "$R/map" > "$R/map.log" 2>&1; echo "rc $?" >> "$R/map.log"
cat "$R/map.log"

# A small e2e point twice more, each a new process: the first-use cost with
# the JIT cache that step 1 filled, then with the cache disabled.
for mode in warm-cache no-cache; do
    stamp "first-use $mode"
    [ $mode = no-cache ] && export CUDA_CACHE_DISABLE=1
    timeout 90 "$B/vpod-bench" e2e --out "$R/first-use-$mode" --models llama3-8b --backends vattention --batch 1 \
        --context 2048 --tokens 8 > "$R/first-use-$mode.log" 2>&1; echo "rc $?" >> "$R/first-use-$mode.log"
    cat "$R/first-use-$mode.log"
done
unset CUDA_CACHE_DISABLE
stamp done
tar -C "$R" -czf "$OUT/baseline.tgz" .
cp "$R/e2e.log" "$R/prefill.log" "$R/fi.log" "$OUT/" 2>/dev/null
