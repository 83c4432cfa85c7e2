#!/usr/bin/env bash
# Device call 3 (issue 20): main with the uniform wgmma descriptors (gpu-bundle), FlashInfer (FA3 prefill, POD, its serial pairs) in the same call.
set -uo pipefail
OUT0=$OUT; OUT=$OUT/r; mkdir -p $OUT
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli VPOD_DATE=$(date -u +%F)
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
cp gpu-bundle/manifest.txt $OUT/manifest.txt
S=$(date +%s)
step() { local t=$1 name=$2; shift 2; local s0; s0=$(date +%s); timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s0 )) s (at $(( $(date +%s) - S )) s)" | tee -a "$OUT/run.log"; }
nvidia-smi dmon -s pc -d 1 > $OUT/dmon.txt 2>&1 & dmon=$!
mkdir -p $OUT/prefill $OUT/hybrid
step 60 prefill $B/vpod-bench prefill --out $OUT/prefill --backends vattention --models llama3-8b,yi-6b --kernels wsp
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .anchors/whl/*.whl > /dev/null 2>&1
step 300 fi env PYTHONPATH=/tmp/site FI_FORCE_JIT=1 FI_SKIP=decode FI_BUDGET_S=290 FI_JIT_BUDGET_S=230 MAX_JOBS=16 OUT=$OUT/fi PYTHONUNBUFFERED=1 python3 .anchors/flashinfer/bench_fi.py
GRID=(--models llama3-8b,yi-6b --chunks 1024,2048 --positions 4096,16384 --decodes 8,32,64 --contexts 4096,16384)
FJ=(); [ -f $OUT/fi/fi.json ] && FJ=(--fi-json $OUT/fi/fi.json)
step 90 hybrid $B/vpod-bench hybrid --out $OUT/hybrid "${GRID[@]}" "${FJ[@]}" --variants serial-ws,streams,auto,wsd
kill $dmon
left=$(( 560 - ($(date +%s) - S) ))
[ $left -gt 40 ] && step $left memcheck-ws env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 $B/integration gpu::vattention_ws --test-threads=1
cat $OUT/run.log
grep -iE "wsp|TFLOP" $OUT/prefill.log | tail -7
grep -E "compiled in|prefill .*fa3|POD speedup|wall" $OUT/fi.log | tail -14
tail -n 7 $OUT/hybrid.log; tail -n 3 $OUT/memcheck-ws.log 2>/dev/null
cd $OUT0 && tar czf logs.tgz r && rm -rf r
