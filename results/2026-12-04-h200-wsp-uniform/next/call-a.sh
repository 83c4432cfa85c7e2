#!/usr/bin/env bash
# Next device call A (issue 20), from the repo root with gpu-bundle (scripts/gpu-build.sh) and .anchors
# carried:  export OUT0=$OUT; OUT=$OUT/r bash results/2026-12-04-h200-wsp-uniform/next/call-a.sh; cd $OUT0 && tar czf logs.tgz r
#  1. the prefill variants A/B (wsp, 3-stage ring wsp3, K-ahead producer wspk, wsp again), twice;
#  2. FlashInfer 0.5.3 (FA3 prefill + POD + its serial pairs) in the same call (~140 s with its JIT build);
#  3. the hybrid grid (FlashInfer's 48 cases + 512-token chunks) with the decode-last partitioned kernel (wsd-0)
#     and the planner with whole rounds (auto-r), over our best serial pair; the FlashInfer column is the
#     plain planner's (auto-r differs from it only on the 512-token chunks, which FlashInfer's grid lacks).
set -uo pipefail
OUT=${OUT:-/tmp/call-a}; mkdir -p "$OUT"
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli VPOD_DATE=$(date -u +%F)
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
cp gpu-bundle/manifest.txt $OUT/
S=$(date +%s)
step() { local t=$1 name=$2; shift 2; local s0; s0=$(date +%s); timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s0 )) s (at $(( $(date +%s) - S )) s)" | tee -a "$OUT/run.log"; }
nvidia-smi dmon -s pc -d 1 > $OUT/dmon.txt 2>&1 & dmon=$!
for i in 1 2; do
    mkdir -p $OUT/pf$i
    step 90 pf$i $B/vpod-bench prefill --out $OUT/pf$i --backends vattention --models llama3-8b,yi-6b \
        --kernels wsp,wsp3,wspk,wsp --cases 16k,1k@4k,1k@12k,2k@16k
done
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .anchors/whl/*.whl > /dev/null 2>&1
# The budget must leave the POD section its full 72 cases (under 240 s left after the JIT it goes quick).
step 420 fi env PYTHONPATH=/tmp/site FI_FORCE_JIT=1 FI_SKIP=decode FI_BUDGET_S=480 FI_JIT_BUDGET_S=230 MAX_JOBS=16 \
    OUT=$OUT/fi PYTHONUNBUFFERED=1 python3 .anchors/flashinfer/bench_fi.py
GRID=(--models llama3-8b,yi-6b --chunks 512,1024,2048 --positions 4096,16384 --decodes 8,32,64 --contexts 4096,16384)
FJ=(); [ -f $OUT/fi/fi.json ] && FJ=(--fi-json $OUT/fi/fi.json)
mkdir -p $OUT/hybrid
step 170 hybrid $B/vpod-bench hybrid --out $OUT/hybrid "${GRID[@]}" "${FJ[@]}" --variants serial-ws,auto,auto-r,wsd,wsd-0,wsd-4
kill $dmon
cat $OUT/run.log
for i in 1 2; do grep -E "^\| vattention" $OUT/pf$i.log; done
grep -E "prefill .*fa3|POD speedup|wall" $OUT/fi.log | tail -14
tail -n 8 $OUT/hybrid.log
