#!/usr/bin/env bash
# Issue 20: the wsp prefill's CTA order, heads fastest (wsp) vs KV-head-major (wsp-kv), same binary, alternated.
set -uo pipefail
OUT0=$OUT; OUT=$OUT/r; mkdir -p $OUT
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli VPOD_DATE=$(date -u +%F)
nvidia-smi --query-gpu=name,driver_version,power.limit,clocks.max.sm --format=csv,noheader > $OUT/gpu.txt
cp gpu-bundle/manifest.txt $OUT/
S=$(date +%s)
step() { local t=$1 name=$2; shift 2; local s0; s0=$(date +%s); timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s0 )) s (at $(( $(date +%s) - S )) s)" | tee -a "$OUT/run.log"; }
for i in 1 2; do mkdir -p $OUT/pf$i; step 60 pf$i $B/vpod-bench prefill --out $OUT/pf$i --backends vattention --models llama3-8b,yi-6b --kernels wsp,wsp-kv,wsp; done
step 150 tests $B/integration gpu::vattention_gpu_matches_cpu_twin --test-threads=1
cat $OUT/run.log; grep -E "^test |test result" $OUT/tests.log
for i in 1 2; do grep -E "^\| vattention" $OUT/pf$i.log; done
cd $OUT0 && tar czf logs.tgz r && rm -rf r
