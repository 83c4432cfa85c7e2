#!/usr/bin/env bash
# The device calls behind this folder's README (one H200), from the repo root
# with gpu-bundle/ (scripts/gpu-build.sh) and, for the fi stage, .anchors/
# (../shared/anchors/flashinfer/RUN.md) carried. STAGES picks what runs:
#   bench  vpod-bench prefill: tma64 / wsp / wsp3 on Llama-3-8B and Yi-6B heads,
#          each row timed two ways (the layer call back to back; the kernel
#          alone between CUDA events after a GPU spin, the FlashInfer
#          harness's method), ceilings measured in the same process;
#   fi     FlashInfer 0.5.3's FA2/FA3 prefill on the same cases (its JIT build
#          first), in the same call as bench;
#   tests  the vattention GPU tests (every prefill kernel vs its CPU twin,
#          GQA 4/7/8; the warp-specialized kernels on long chunks, with and
#          without a K ramp that keeps moving the running max);
#   san    compute-sanitizer memcheck and racecheck on the ws tests (VPOD_QUICK);
#   ncu    Nsight Compute (--clock-control none) of one wsp launch, 16K prompt.
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/h200-ws2}; mkdir -p "$OUT"
STAGES=${STAGES:-bench fi}
B=/tmp/vpod-bundle; rm -rf "$B"; mkdir -p "$B"
tar -C "$B" -xJf gpu-bundle/bundle.tar.xz || { echo "no gpu-bundle/bundle.tar.xz" >&2; exit 1; }
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli
nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm --format=csv > "$OUT/gpu.txt"
cp gpu-bundle/manifest.txt "$OUT/manifest.txt" 2>/dev/null
t0=$(date +%s)
stamp() { echo "== $1 at +$(( $(date +%s) - t0 )) s" | tee -a "$OUT/log.txt"; }
for s in $STAGES; do
    case $s in
    bench)
        stamp bench
        nvidia-smi dmon -s pc -d 1 > "$OUT/dmon.txt" 2>&1 & dmon=$!
        timeout "${T_BENCH:-200}" "$B/vpod-bench" prefill --out "$OUT/prefill" --backends vattention \
            --models llama3-8b,yi-6b --kernels "${KERNELS:-tma64,wsp,wsp3}" > "$OUT/prefill.log" 2>&1
        echo "rc $?" >> "$OUT/prefill.log"; kill $dmon 2>/dev/null
        ;;
    fi)
        stamp fi
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .anchors/whl/*.whl \
            && PYTHONPATH=/tmp/site FI_FORCE_JIT=1 FI_SKIP=${FI_SKIP:-decode,pod} MAX_JOBS=16 OUT=$OUT/fi PYTHONUNBUFFERED=1 \
            timeout "${T_FI:-330}" python3 .anchors/flashinfer/bench_fi.py > "$OUT/fi.log" 2>&1
        echo "rc $?" >> "$OUT/fi.log"
        ;;
    tests)
        stamp tests
        timeout "${T_TESTS:-240}" "$B/integration" gpu::vattention --test-threads=1 > "$OUT/tests.log" 2>&1
        echo "rc $?" >> "$OUT/tests.log"; grep -E "^test |test result|rc |panicked" "$OUT/tests.log" >> "$OUT/log.txt"
        ;;
    san)
        for tool in memcheck racecheck; do
            stamp "$tool"
            VPOD_QUICK=1 timeout "${T_SAN:-150}" compute-sanitizer --tool $tool --error-exitcode 9 "$B/integration" \
                gpu::vattention_ws --test-threads=1 > "$OUT/$tool.log" 2>&1; echo "rc $?" >> "$OUT/$tool.log"
            tail -n 4 "$OUT/$tool.log" >> "$OUT/log.txt"
        done
        ;;
    ncu)
        stamp ncu
        timeout 120 ncu --clock-control none -k regex:slot_prefill_wsp_bf16 --launch-skip 3 -c 1 \
            --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
            --section SchedulerStats --section InstructionStats \
            --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active,smsp__pcsamp_warps_issue_stalled_barrier,smsp__pcsamp_warps_issue_stalled_long_scoreboard,smsp__pcsamp_warps_issue_stalled_wait,smsp__pcsamp_warps_issue_stalled_math_pipe_throttle,smsp__pcsamp_warps_issue_stalled_short_scoreboard,smsp__pcsamp_warps_issue_stalled_selected,smsp__pcsamp_warps_issue_stalled_not_selected \
            "$B/vpod-bench" --iters 2 --out /tmp/ncu prefill --backends vattention --models llama3-8b --kernels wsp \
            > "$OUT/ncu.txt" 2>&1; echo "rc $?" >> "$OUT/ncu.txt"
        grep -E "Duration|SM Frequency|hmma|pipe_xu|stalled|Issue Slots Busy|No Eligible|Executed Ipc A|rc " "$OUT/ncu.txt" >> "$OUT/log.txt"
        ;;
    esac
done
stamp done
[ -f "$OUT/prefill.log" ] && cat "$OUT/prefill.log"
[ -f "$OUT/fi.log" ] && grep -iE "prefill|fa3|fa2|prompt|chunk|TFLOP|error|wall" "$OUT/fi.log" | tail -30
cat "$OUT/log.txt"
# $OUT brings back at most 8 files: everything in one archive.
cd "$OUT" && tar czf /tmp/logs.tgz ./* && rm -rf ./* && mv /tmp/logs.tgz .
