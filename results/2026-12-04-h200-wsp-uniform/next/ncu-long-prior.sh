#!/usr/bin/env bash
# Next device call (issue 20): why our wsp tile trails FA3 on chunks over a long prior context
# (0.85-0.87x at a 2K chunk over 16K, level at 4K prior). Nsight Compute on both kernels, same
# case, same call, clocks left as they are (--clock-control none: the 700 W cap stays in play).
# From the repo root, carry gpu-bundle and .anchors:
#   export OUT0=$OUT; OUT=$OUT/r bash results/2026-12-04-h200-wsp-uniform/next/ncu-long-prior.sh; cd $OUT0 && tar czf logs.tgz r
set -uo pipefail
OUT=${OUT:-/tmp/ncu-long-prior}; mkdir -p "$OUT"
HERE=results/2026-12-04-h200-wsp-uniform/next
B=/tmp/vb; rm -rf $B; mkdir -p $B; tar -C $B -xJf gpu-bundle/bundle.tar.xz
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1
SECTIONS=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
          --section WarpStateStats --section SchedulerStats --section InstructionStats --section LaunchStats
          --metrics sm__cycles_elapsed.avg.per_second,gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .anchors/whl/*.whl > /dev/null 2>&1
# FA3 first without ncu: its JIT build of the one module (~1-2 min on 16 cores).
MAX_JOBS=16 PYTHONPATH=/tmp/site timeout 200 python3 $HERE/fa3_one.py 2048 16384 32 8 > "$OUT/fa3-jit.log" 2>&1
# Our launches to skip: vpod-bench prefill fills the context in 4096-token steps of 2 layers first (2 launches
# each), then times the case; skip the setup and a few of the case's own launches (warm-up).
for c in "2048 16384 2k@16k 12" "1024 4096 1k@4k 6"; do
    set -- $c; tag=$1-$2
    MAX_JOBS=16 PYTHONPATH=/tmp/site timeout 90 ncu --clock-control none -k regex:Prefill --launch-skip 3 -c 1 \
        "${SECTIONS[@]}" python3 $HERE/fa3_one.py $1 $2 32 8 > "$OUT/ncu-fa3-$tag.txt" 2>&1
    timeout 90 ncu --clock-control none -k regex:slot_prefill_wsp_bf16 --launch-skip $4 -c 1 "${SECTIONS[@]}" \
        $B/vpod-bench --iters 3 --out /tmp/ncu prefill --backends vattention --models llama3-8b --kernels wsp \
        --cases $3 > "$OUT/ncu-wsp-$tag.txt" 2>&1
done
for f in "$OUT"/ncu-*.txt; do
    echo "## $f"
    grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Executed Ipc A|L2 Hit Rate|DRAM Throughput|Tensor|hit_rate|dram__bytes|Stall|Warp Cycles Per Issued" "$f" | head -30
done
