#!/usr/bin/env bash
set -uo pipefail
OUT0=$OUT; OUT=$OUT/r; mkdir -p $OUT/serve
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli VPOD_DATE=$(date -u +%F)
nvidia-smi dmon -s pucm -d 1 > $OUT/serve/dmon.log 2>&1 & dmon=$!
timeout 450 $B/vpod-bench serve --out $OUT/serve --models llama3-8b,yi-6b --requests 48 --pd-ratios 31,50 > $OUT/serve/vb-serve.log 2>&1; echo "serve rc=$?" | tee -a $OUT/serve/vb-serve.log
kill $dmon; tail -n 30 $OUT/serve/vb-serve.log
cd $OUT0 && tar czf logs.tgz r && rm -rf r
