#!/usr/bin/env bash
# Next device calls C/D (issue 20's end-to-end check): vpod-bench serve with 96 requests at P:D 31 and 50
# for one model a call (48 requests of both models took 436 s; 96 of one model should fit one call), with
# nvidia-smi dmon beside it. PROFILE=1: 48 requests at P:D 31 with --profile-attention instead; RUNS: --runs
# (e.g. hybrid/vattention,hybrid/pod,hybrid/pod+whole-rounds,hybrid/pod+decode-last).
#   export OUT0=$OUT; OUT=$OUT/r MODEL=yi-6b bash results/2026-12-04-h200-wsp-uniform/next/serve.sh; cd $OUT0 && tar czf logs.tgz r
set -uo pipefail
OUT=${OUT:-/tmp/serve}; mkdir -p "$OUT"
MODEL=${MODEL:-yi-6b}
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli VPOD_DATE=$(date -u +%F)
cp gpu-bundle/manifest.txt $OUT/
nvidia-smi dmon -s pucm -d 1 > $OUT/dmon.log 2>&1 & dmon=$!
if [ "${PROFILE:-0}" = 1 ]; then
    ARGS=(--requests 48 --pd-ratios 31 --profile-attention)
else
    ARGS=(--requests 96 --pd-ratios 31,50)
fi
if [ -n "${RUNS:-}" ]; then ARGS+=(--runs "$RUNS")
fi
timeout 560 $B/vpod-bench serve --out $OUT --models $MODEL "${ARGS[@]}" > $OUT/vb-serve.log 2>&1
echo "serve rc=$?" | tee -a $OUT/vb-serve.log
kill $dmon; tail -n 16 $OUT/vb-serve.log
gzip -9 $OUT/serve.json 2>/dev/null
