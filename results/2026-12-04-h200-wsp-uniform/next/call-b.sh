#!/usr/bin/env bash
# Next device call B (issue 20): correctness of the new variants, sanitizers, then Nsight Compute of
# wsp vs FA3 over a long prior (ncu-long-prior.sh). Carry gpu-bundle and .anchors.
#   export OUT0=$OUT; OUT=$OUT/r bash results/2026-12-04-h200-wsp-uniform/next/call-b.sh; cd $OUT0 && tar czf logs.tgz r
set -uo pipefail
OUT=${OUT:-/tmp/call-b}; mkdir -p "$OUT"
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli
S=$(date +%s)
step() { local t=$1 name=$2; shift 2; local s0; s0=$(date +%s); timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s0 )) s (at $(( $(date +%s) - S )) s)" | tee -a "$OUT/run.log"; }
step 150 twin-va $B/integration gpu::vattention_gpu_matches_cpu_twin gpu::vattention_ws_prefill_long_chunks --test-threads=1
step 150 twin-pod $B/integration gpu::pod_gpu_matches_cpu_twin gpu::fixtures --test-threads=1
step 90 memcheck env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 $B/integration gpu::vattention_ws --test-threads=1
step 90 racecheck env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 $B/integration gpu::vattention_ws --test-threads=1
step 200 ncu env OUT=$OUT/ncu bash results/2026-12-04-h200-wsp-uniform/next/ncu-long-prior.sh
cat $OUT/run.log; grep -hE "^test |test result|SUMMARY" $OUT/*.log
