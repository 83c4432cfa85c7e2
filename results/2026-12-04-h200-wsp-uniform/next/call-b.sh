#!/usr/bin/env bash
# Next device call B (issue 20): correctness of the new variants (wsp3, wspk, decode last) and the
# fixtures' transformers parity, then compute-sanitizer. Carry gpu-bundle. (Nsight Compute of wsp vs FA3
# over a long prior is a call of its own: ncu-long-prior.sh, ~7 min with FA3's JIT build.)
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
# (Last session: the vattention twins 102 s with wsp alone, the POD twin 95 s, ws memcheck 28 s, racecheck 31 s.)
step 170 twin-va $B/integration gpu::vattention_gpu_matches_cpu_twin gpu::vattention_ws_prefill_long_chunks --test-threads=1
step 150 twin-pod $B/integration gpu::pod_gpu_matches_cpu_twin gpu::fixtures --test-threads=1
step 100 memcheck env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 $B/integration gpu::vattention_ws --test-threads=1
step 110 racecheck env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 $B/integration gpu::vattention_ws --test-threads=1
cat $OUT/run.log; grep -hE "^test |test result|SUMMARY" $OUT/*.log
