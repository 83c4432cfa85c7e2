#!/usr/bin/env bash
set -uo pipefail
OUT0=$OUT; OUT=$OUT/r; mkdir -p $OUT
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli VPOD_DATE=$(date -u +%F)
S=$(date +%s)
step() { local t=$1 name=$2; shift 2; local s0; s0=$(date +%s); timeout "$t" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc=$? $(( $(date +%s) - s0 )) s (at $(( $(date +%s) - S )) s)" | tee -a "$OUT/run.log"; }
step 120 racecheck-ws env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 $B/integration gpu::vattention_ws --test-threads=1
step 170 memcheck-pod env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 $B/integration gpu::pod --test-threads=1
step 200 racecheck-pod env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 $B/integration gpu::pod --test-threads=1
cat $OUT/run.log; for f in $OUT/*check*.log; do echo "## $f"; grep -E "^test |SUMMARY" $f; done
cd $OUT0 && tar czf logs.tgz r && rm -rf r
