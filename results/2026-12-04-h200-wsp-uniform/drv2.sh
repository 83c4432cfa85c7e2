#!/usr/bin/env bash
# Device call 1 (issue 20): branch exp/wsp-dynamic (.wspd-bundle) vs main (gpu-bundle), FlashInfer in the same call.
set -uo pipefail
OUT0=$OUT; OUT=$OUT/r; mkdir -p $OUT
B=/tmp/vb; M=/tmp/vm; mkdir -p $B $M
tar -C $B -xJf .wspd-bundle/bundle.tar.xz; tar -C $M -xJf gpu-bundle/bundle.tar.xz
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli VPOD_DATE=$(date -u +%F)
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
cp .wspd-bundle/manifest.txt $OUT/manifest-branch.txt; cp gpu-bundle/manifest.txt $OUT/manifest-main.txt
S=$(date +%s)
step() { local t=$1 name=$2; shift 2; local s0; s0=$(date +%s); timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s0 )) s (at $(( $(date +%s) - S )) s)" | tee -a "$OUT/run.log"; }
nvidia-smi dmon -s pc -d 1 > $OUT/dmon.txt 2>&1 & dmon=$!
mkdir -p $OUT/pf-branch $OUT/pf-main $OUT/pf-again
step 70 pf-branch $B/vpod-bench prefill --out $OUT/pf-branch --backends vattention --models llama3-8b,yi-6b --kernels wsp,wspd

step 50 pf-again $B/vpod-bench prefill --out $OUT/pf-again --backends vattention --models llama3-8b,yi-6b --kernels wsp,wspd
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .anchors/whl/*.whl
step 260 fi env PYTHONPATH=/tmp/site FI_FORCE_JIT=1 FI_SKIP=decode FI_BUDGET_S=250 MAX_JOBS=16 OUT=$OUT/fi PYTHONUNBUFFERED=1 python3 .anchors/flashinfer/bench_fi.py
GRID=(--models llama3-8b,yi-6b --chunks 1024,2048 --positions 4096,16384 --decodes 8,32,64 --contexts 4096,16384)
FJ=(); [ -f $OUT/fi/fi.json ] && FJ=(--fi-json $OUT/fi/fi.json)
mkdir -p $OUT/hy-branch $OUT/hy-main
step 130 hy-branch $B/vpod-bench hybrid --out $OUT/hy-branch "${GRID[@]}" "${FJ[@]}" --variants serial-ws,streams,auto,wsd

step 150 tests $B/integration gpu::vattention_gpu_matches_cpu_twin gpu::vattention_ws_prefill_long_chunks --test-threads=1
kill $dmon
cat $OUT/run.log
for f in pf-branch pf-main pf-again; do echo "## $f"; grep -iE "wsp|TFLOP" $OUT/$f.log | tail -12; done
grep -E "prefill .*fa3|POD speedup|wall" $OUT/fi.log | tail -12
grep -E "^test |test result" $OUT/tests.log; for f in hy-branch; do echo "## $f"; tail -n 8 $OUT/$f.log; done
cd $OUT0 && tar czf logs.tgz r && rm -rf r
