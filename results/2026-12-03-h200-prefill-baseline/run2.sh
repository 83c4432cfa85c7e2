#!/usr/bin/env bash
# Second device call of this folder (after run.sh): where the first-use cost
# of a process goes, with the driver's JIT cache disabled throughout:
#   1. `vpod-bench jit`: each of candle's kernel modules loaded from its PTX, timed;
#   2. `vpod-bench e2e` Yi-34B with the backends in the other order
#      (paged:16 first): the first-use cost follows the first run, whichever backend.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h200-baseline}; R=$OUT/run2; mkdir -p "$R"
B=/tmp/vpod-bundle; rm -rf "$B"; mkdir -p "$B"
tar -C "$B" -xJf gpu-bundle/bundle.tar.xz || { echo "no gpu-bundle/bundle.tar.xz" >&2; exit 1; }
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export VPOD_DATE=2026-12-03 CUDA_CACHE_DISABLE=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$R/gpu.txt"
cp gpu-bundle/manifest.txt "$R/" 2>/dev/null
timeout 120 "$B/vpod-bench" jit --out "$R/jit" > "$R/jit.log" 2>&1; echo "rc $?" >> "$R/jit.log"
cat "$R/jit.log"
timeout 240 "$B/vpod-bench" e2e --out "$R/e2e-paged-first" --models yi-34b --backends paged:16,vattention --batch 1 \
    --tokens 16 --profile-attention > "$R/e2e-paged-first.log" 2>&1; echo "rc $?" >> "$R/e2e-paged-first.log"
cat "$R/e2e-paged-first.log"
tar -C "$R" -czf "$OUT/run2.tgz" .
