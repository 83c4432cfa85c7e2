#!/usr/bin/env bash
# Runs on the GPU machine, from the repo root, after scripts/gpu-build.sh made
# gpu-bundle/ here (carry it: it is git-ignored):
#   GPU tests (kernels vs CPU twins, bf16 parity), compute-sanitizer memcheck
#   and racecheck on the kernel tests, a generate smoke run, the Llama-3-8B
#   synthetic decode benchmark, and (unless --quick) the full-size synthetic
#   sharded checkpoint through the real loader, and the vAttention benchmarks
#   (vpod-bench: decode / prefill kernels next to PyTorch SDPA, page mapping,
#   latency spikes, end-to-end decode at 16K). Logs and JSON go to $OUT
#   (default /tmp/vpod-gpu); a summary table is printed last.
#
#   bash scripts/gpu-run.sh                  everything
#   bash scripts/gpu-run.sh --quick          no ncu breakdown, no 16 GB checkpoint, no vpod-bench
#   bash scripts/gpu-run.sh STAGE...         only these: tests sanitize smoke decode ncu ckpt kernels serve,
#                                            or fig9b (decode kernels per backend) / fig9a (end to end per backend),
#                                            or pod (POD kernel tests + sanitizer + backend agreement),
#                                            podsweep (the hybrid attention sweep), podserve (Sarathi + POD end to end),
#                                            podfi (FlashInfer's POD + the 48-case sweep against it; carry .anchors),
#                                            layer (a decoder layer but attention, op by op),
#                                            compare (cli compare's four workloads on a synthetic full-size model),
#                                            httpserve (cli serve over HTTP vs the same trace in process),
#                                            graphs (CUDA graphs: greedy tokens vs eager, sanitizers on
#                                            replayed steps, vpod-bench e2e with graphs on and off),
#                                            gemv (the decode GEMV kernels vs their twin, then vpod-bench gemv),
#                                            prefillab (vpod-bench prefill A/B of PF_KERNELS on PF_CASES, twice),
#                                            twins (prefill + POD kernels vs CPU twins, fixtures' parity, sanitizers
#                                            on the warp-specialized prefill), ncuprior (Nsight Compute of our
#                                            prefill tile and FA3 on a chunk over a long prior; carry .anchors),
#                                            slim (the slim pair on two streams: premise, twins, sanitizers),
#                                            tp (issue 23, on 2+ GPUs: TP-2 greedy tokens vs TP-1 on the
#                                            fixtures, NCCL all-reduce bandwidth), tpe2e (figure 9a at TP-2 and
#                                            TP-1), tpserve (the POD serving run at TP-2 and TP-1): one call each
#   DMON=1 samples nvidia-smi dmon (power, clocks) beside the stages into $OUT/dmon.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
# Never NVLink multicast (the device tool's KINDS.md): NCCL's NVLS algorithms stay off.
export NCCL_NVLS_ENABLE=0
QUICK=0; [ "${1:-}" = "--quick" ] && { QUICK=1; shift; }
STAGES=" ${*:-tests sanitize smoke decode ncu ckpt kernels serve} "
[ $QUICK = 1 ] && STAGES=" tests sanitize smoke decode "
want() { [[ "$STAGES" == *" $1 "* ]]; }
OUT=${OUT:-/tmp/vpod-gpu}; mkdir -p "$OUT"
B=/tmp/vpod-bundle; rm -rf "$B"; mkdir -p "$B"
# BUNDLE: gpu-build.sh's plain bundle, or its NCCL one (gpu-bundle-nccl/bundle.tar.xz) for the tp stages.
BUNDLE=${BUNDLE:-gpu-bundle/bundle.tar.xz}
tar -C "$B" -xJf "$BUNDLE" || { echo "no $BUNDLE: run scripts/gpu-build.sh first" >&2; exit 1; }
# shellcheck source=scripts/cuda-libs.sh
source scripts/cuda-libs.sh
missing=$(ldd "$B/cli" | grep "not found" || true)
[ -n "$missing" ] && echo -e "the bundle's binaries miss libraries here:\n$missing" >&2
export HF_HUB_OFFLINE=1 VPOD_FIXTURES=$PWD/tests/fixtures VPOD_CLI_BIN=$B/cli
declare -A RC

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)
echo "GPU: $gpu" | tee "$OUT/gpu.txt"

T0=$(date +%s)
step() { # name, command...  (each step's exit and seconds also go to $OUT/run.log)
    local name=$1; shift
    local s0; s0=$(date +%s)
    echo "== $name"
    "$@" > "$OUT/$name.log" 2>&1
    RC[$name]=$?
    echo "$name rc=${RC[$name]} $(( $(date +%s) - s0 )) s (at $(( $(date +%s) - T0 )) s)" >> "$OUT/run.log"
    tail -n 5 "$OUT/$name.log"
}
tstep() { step "$2" timeout "$1" "${@:3}"; } # seconds, name, command...: the same, under a time limit
if [ "${DMON:-0}" = 1 ]; then
    nvidia-smi dmon -s pucm -d 1 > "$OUT/dmon.txt" 2>&1 &
    DMON_PID=$!
    trap 'kill $DMON_PID 2>/dev/null' EXIT
fi
# FlashInfer from the carried wheel (.anchors/, ../shared/anchors/flashinfer/RUN.md), once.
fi_install() {
    [ -d /tmp/site/flashinfer ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/site .anchors/whl/*.whl > /dev/null 2>&1
}

if want tests; then
    step gpu-tests "$B/integration" gpu:: --test-threads=1 --nocapture
fi
if want sanitize; then
    SAN="gpu::paged gpu::slot gpu::vattention gpu::vmm gpu::pod"
    step memcheck env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/integration" $SAN --test-threads=1
    step racecheck env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 "$B/integration" $SAN --test-threads=1
fi
if want graphs; then
    # Issue 22: replayed decode steps give the eager greedy tokens (every backend,
    # the fixtures); memcheck on replays; e2e decode with graphs on and off.
    step graphs-tests "$B/integration" gpu::cuda_graphs gpu::argmax gpu::gemv gpu::decode_steps gpu::slot_write --test-threads=1 --nocapture
    step graphs-vattention-twin env VPOD_QUICK=1 "$B/integration" gpu::vattention_gpu --test-threads=1
    # The fused RMSNorm + GEMV (shared memory written in place between barriers).
    [ "${GRAPHS_MEMCHECK:-1}" = 1 ] && step gemv-racecheck compute-sanitizer --tool racecheck --error-exitcode 9 "$B/integration" gpu::gemv_norm --test-threads=1
    [ "${GRAPHS_MEMCHECK:-1}" = 1 ] && step graphs-memcheck env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/integration" gpu::cuda_graphs --test-threads=1
    grep GRAPHS "$OUT/graphs-tests.log"
    if [ "${GRAPHS_E2E:-1}" = 1 ]; then
    # shellcheck disable=SC2086
    step vb-e2e-graphs "$B/vpod-bench" e2e --out "$OUT" ${GRAPHS_E2E_ARGS:---models llama3-8b,yi-6b,yi-34b --backends vattention,paged:16 --batch 1,16 --tokens 128}
    cat "$OUT/vb-e2e-graphs.log"
    fi
    if [ "${GRAPHS_NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
        # Kernel times of a replayed decode step (graph nodes profiled one by one).
        timeout 240 ncu --csv --metrics gpu__time_duration.sum --print-units base --clock-control none --cache-control none \
            --graph-profiling node "$B/cli" generate --model llama3-8b --backend vattention --synthetic --device cuda --prompt-len 64 --max-tokens 4 --json \
            > "$OUT/ncu-graphs.csv" 2> "$OUT/ncu-graphs.err"
        "$B/cli" generate --model llama3-8b --backend vattention --synthetic --device cuda --prompt-len 64 --max-tokens 128 --json > "$OUT/graphs-decode.log" 2>&1
        ms=$(grep '^{' "$OUT/graphs-decode.log" | python3 -c 'import json,sys; print(1e3 / json.load(sys.stdin)["decode_tokens_per_s"])')
        step graphs-breakdown python3 scripts/decode_breakdown.py "$OUT/ncu-graphs.csv" --step-ms "$ms"
        cat "$OUT/graphs-breakdown.log"
    fi
fi
if want gemv; then
    step gemv-tests "$B/integration" gpu::gemv --test-threads=1
    # shellcheck disable=SC2086
    step vb-gemv "$B/vpod-bench" gemv --out "$OUT" ${GEMV_ARGS:---models llama3-8b,yi-6b,yi-34b --rows 1,2,4}
    cat "$OUT/vb-gemv.log"
fi
if want pod; then
    # shellcheck disable=SC2086
    tstep 400 pod-tests "$B/integration" ${POD_TESTS:-gpu::pod gpu::fixtures} --test-threads=1 --nocapture
    [ "${POD_SAN:-1}" = 1 ] && tstep 300 pod-memcheck env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/integration" gpu::pod --test-threads=1
    [ "${POD_SAN:-1}" = 1 ] && tstep 300 pod-racecheck env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 "$B/integration" gpu::pod --test-threads=1
    # Hybrid steps end to end: pod (planner), pod:fused and pod:streams must give vattention's greedy tokens.
    step pod-agree "$B/cli" compare --model tests/fixtures/tiny-llama3-gqa4 --device cuda \
        --backends vattention,pod,pod:fused,pod:streams --workload serve --requests 12 --prompt-len 400 --max-tokens 48
    for f in pod-tests pod-memcheck pod-racecheck pod-agree; do tail -n 12 "$OUT/$f.log"; done
fi
if want podsweep; then
    # shellcheck disable=SC2086
    step vb-hybrid "$B/vpod-bench" hybrid --out "$OUT" ${HYBRID_ARGS:-}
    cat "$OUT/vb-hybrid.log"
fi
if want prefillab; then
    # Prefill kernel variants A/B on the same cases, twice (the first kernel again last, to see drift).
    # PF_PLACEMENTS=N: each case on N fresh caches at other physical pages (a row each, with the reps' range).
    for i in 1 2; do
        mkdir -p "$OUT/pf$i"
        tstep "${PF_TIMEOUT:-120}" "pf$i" "$B/vpod-bench" prefill --out "$OUT/pf$i" --backends vattention \
            --models "${PF_MODELS:-llama3-8b,yi-6b}" --kernels "${PF_KERNELS:-wsp,w8,wsp}" \
            --cases "${PF_CASES:-16k,1k@4k,1k@12k,2k@16k}" --placements "${PF_PLACEMENTS:-1}"
    done
    for i in 1 2; do grep -E "^\| vattention" "$OUT/pf$i.log"; done
fi
if want podfi; then
    # Issue 20's comparison: FlashInfer's FA3 prefill, POD and serial pairs
    # (its JIT build first), then the hybrid grid in the same call, each
    # planner step against FlashInfer's best serial pair
    # (vs_flashinfer_best_serial). The budgets leave the POD section its full
    # 72 cases (with under 240 s left after the JIT it goes quick).
    fi_install
    tstep 420 fi env PYTHONPATH=/tmp/site FI_FORCE_JIT=1 FI_SKIP=decode FI_BUDGET_S="${FI_BUDGET_S:-480}" \
        FI_JIT_BUDGET_S="${FI_JIT_BUDGET_S:-230}" MAX_JOBS=16 OUT="$OUT/fi" PYTHONUNBUFFERED=1 \
        python3 .anchors/flashinfer/bench_fi.py
    FJ=(); [ -f "$OUT/fi/fi.json" ] && FJ=(--fi-json "$OUT/fi/fi.json")
    # shellcheck disable=SC2086
    # Its own folder: podsweep's hybrid.json stays beside it.
    mkdir -p "$OUT/podfi"
    tstep "${PODFI_TIMEOUT:-300}" vb-hybrid-fi "$B/vpod-bench" hybrid --out "$OUT/podfi" --models llama3-8b,yi-6b \
        --chunks "${PODFI_CHUNKS:-1024,2048}" --positions 4096,16384 --decodes 8,32,64 --contexts 4096,16384 \
        "${FJ[@]}" ${PODFI_ARGS:-}
    grep -E "prefill .*fa3|POD speedup|wall" "$OUT/fi.log" | tail -14
    cat "$OUT/vb-hybrid-fi.log"
fi
if want twins; then
    # Every prefill kernel and the POD kernels against their CPU twins (chunks at offsets, GQA 4/7/8),
    # the fixtures against transformers, then compute-sanitizer on the warp-specialized prefill.
    tstep 240 twin-va "$B/integration" gpu::vattention_gpu_matches_cpu_twin gpu::vattention_ws_prefill_long_chunks --test-threads=1
    tstep 170 twin-pod "$B/integration" gpu::pod_gpu_matches_cpu_twin gpu::fixtures --test-threads=1
    tstep 110 ws-memcheck env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/integration" gpu::vattention_ws --test-threads=1
    tstep 120 ws-racecheck env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 "$B/integration" gpu::vattention_ws --test-threads=1
    grep -hE "^test |test result|SUMMARY" "$OUT"/twin-*.log "$OUT"/ws-*.log
fi
if want slim; then
    # The slim pair (PodTuning::slim_streams: slot_prefill_wsps_bf16 beside
    # slot_decode_slim_bf16, or slot_decode_slimr_bf16 with its ring a warp,
    # on two streams): the per-sub-partition premise, the pair and the
    # planner with it against the CPU twin (GQA 4/7/8, both slim decodes),
    # then both twins under memcheck and racecheck (Llama-3-8B heads).
    # gpu::slot_decode_matches: every decode kernel (and the slim ones at one
    # block an SM) against the twin, with empty and one-key splits, and
    # each one's bandwidth at 16K x 8 (BENCH lines).
    SLIM=(gpu::slim_kernels gpu::slot_decode_matches gpu::pod_streams_slim gpu::pod_planner_slim)
    tstep 300 slim-tests "$B/integration" "${SLIM[@]}" --test-threads=1 --nocapture
    tstep 260 slim-memcheck env VPOD_QUICK=1 compute-sanitizer --tool memcheck --error-exitcode 9 "$B/integration" "${SLIM[@]:1}" --test-threads=1
    tstep 260 slim-racecheck env VPOD_QUICK=1 compute-sanitizer --tool racecheck --error-exitcode 9 "$B/integration" "${SLIM[@]:1}" --test-threads=1
    grep -h "^BENCH slot_decode\|^SLIMR-VS-SLIM" "$OUT"/slim-tests.log
    grep -hE "^test |test result|SUMMARY" "$OUT"/slim-*.log
fi
if want ncuprior && command -v ncu >/dev/null; then
    # Why our prefill tile trails FA3 over a long prior context: Nsight Compute of one launch of each, same
    # case, clocks left as they are (--clock-control none: the power cap stays in play).
    fi_install
    SECTIONS=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
              --section WarpStateStats --section SchedulerStats --section InstructionStats --section LaunchStats
              --metrics sm__cycles_elapsed.avg.per_second,gpu__time_duration.sum,lts__t_sector_hit_rate.pct,dram__bytes_read.sum)
    # FA3's JIT build of the one module first, outside ncu (~1-2 min on 16 cores).
    tstep 200 fa3-jit env MAX_JOBS=16 PYTHONPATH=/tmp/site python3 scripts/fa3_one.py 2048 16384 32 8
    # vpod-bench prefill fills the context in 4096-token steps of 2 layers (2 launches each) before it times a
    # case: skip those and a few of the case's own launches (warm-up).
    for c in "2048 16384 2k@16k 12" "1024 4096 1k@4k 6"; do
        read -r chunk prior case skip <<< "$c"
        tag=$chunk-$prior
        timeout 90 env MAX_JOBS=16 PYTHONPATH=/tmp/site ncu --clock-control none -k regex:Prefill --launch-skip 3 -c 1 \
            "${SECTIONS[@]}" python3 scripts/fa3_one.py "$chunk" "$prior" 32 8 > "$OUT/ncu-fa3-$tag.txt" 2>&1
        # Three launches of ours: its time over a long prior varies run to run (844-1022 us on 2K over
        # 16K where FA3 holds 831-833; results/2026-12-04-h200-slim), so one launch may not show why.
        # Each of NCU_VARIANTS (default: the tile in L2 sections, and in the order before them).
        for v in ${NCU_VARIANTS:-wsp wsp/nol2}; do
            timeout 120 ncu --clock-control none -k "regex:${NCU_KERNEL:-slot_prefill_wsp_bf16}" --launch-skip "$skip" \
                -c 3 "${SECTIONS[@]}" "$B/vpod-bench" --iters 6 --out /tmp/ncu prefill --backends vattention \
                --models llama3-8b --kernels "$v" --cases "$case" > "$OUT/ncu-ours-$tag-${v//\//-}.txt" 2>&1
        done
    done
    for f in "$OUT"/ncu-fa3-*.txt "$OUT"/ncu-ours-*.txt; do
        echo "## $f"
        grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|Issue Slots Busy|No Eligible|Executed Ipc A|L2 Hit Rate|DRAM Throughput|Tensor|hit_rate|dram__bytes|Stall|Warp Cycles Per Issued" "$f" | head -90
    done
fi
if want layer; then
    step vb-layer "$B/vpod-bench" layer --iters 10 --out "$OUT"
    cat "$OUT/vb-layer.log"
fi
# Issue 23 on a machine of 2+ GPUs (the nvidia-h200-x2 kind), with the NCCL bundle:
#   VPOD_FEATURES=cuda,nccl bash scripts/gpu-build.sh   (here; scripts/setup-nccl-build.sh first)
#   BUNDLE=gpu-bundle-nccl/bundle.tar.xz bash scripts/gpu-run.sh tp   (there; then tpe2e, then tpserve: a call each)
# TP_GPUS ranks (default 2).
tp_ready() {
    local n; n=$(nvidia-smi -L | wc -l)
    if [ "$n" -lt "${TP_GPUS:-2}" ]; then
        echo "tp: needs ${TP_GPUS:-2} GPUs, this machine has $n" | tee -a "$OUT/run.log"; return 1
    fi
    [[ "$BUNDLE" == *nccl* ]] ||
        echo "tp: $BUNDLE has no nccl feature: the ranks go through host memory" | tee -a "$OUT/run.log"
    nvidia-smi topo -m > "$OUT/topo.txt" 2>&1 || true
}
if want tp && tp_ready; then
    tstep 400 tp-tests env VPOD_TP_GPUS="${TP_GPUS:-2}" "$B/integration" gpu::tensor_parallel --test-threads=1 --nocapture
    grep -E "greedy tokens|panicked|skipped" "$OUT/tp-tests.log"
    mkdir -p "$OUT/tp"
    tstep 120 tp-allreduce "$B/vpod-bench" --out "$OUT/tp" allreduce --tensor-parallel "${TP_GPUS:-2}"
    cat "$OUT/tp-allreduce.log"
fi
if want tpe2e && tp_ready; then
    # Figure 9a (decode at 16K, batch 1-32) at TP-N and TP-1, the same models and backends (a 16K
    # prefill per sequence first: Yi-34B's batch 32 alone is ~35 PFLOP at TP-1, where it may not fit).
    for n in ${TP_E2E_RANKS:-${TP_GPUS:-2} 1}; do
        mkdir -p "$OUT/tp/e2e-tp$n"
        # shellcheck disable=SC2086
        tstep "${TP_E2E_TIMEOUT:-280}" "tp-e2e-tp$n" "$B/vpod-bench" e2e --out "$OUT/tp/e2e-tp$n" --tensor-parallel "$n" \
            --cuda-graphs on ${TP_E2E_ARGS:---models llama3-8b,yi-34b --backends vattention,paged:16 --batch 1,8,32 --tokens 64}
        grep -E "^\|" "$OUT/tp-e2e-tp$n.log" | head -30
    done
fi
if want tpserve && tp_ready; then
    # The POD end-to-end run at TP-N next to TP-1 (Llama-3-8B by default; TP_SERVE_ARGS to change).
    for n in ${TP_SERVE_RANKS:-${TP_GPUS:-2} 1}; do
        mkdir -p "$OUT/tp/serve-tp$n"
        # shellcheck disable=SC2086
        tstep "${TP_SERVE_TIMEOUT:-280}" "tp-serve-tp$n" "$B/vpod-bench" serve --out "$OUT/tp/serve-tp$n" --tensor-parallel "$n" \
            ${TP_SERVE_ARGS:---models llama3-8b --requests 48 --pd-ratios 50 --runs prefill-first/vattention,hybrid/vattention,hybrid/pod}
        grep -E "^\||over hybrid" "$OUT/tp-serve-tp$n.log"
    done
fi
if want podserve; then
    # SERVE_ARGS: e.g. "--models yi-6b --requests 96 --pd-ratios 31,50 --runs hybrid/pod,hybrid/pod+decode-last".
    # shellcheck disable=SC2086
    tstep "${SERVE_TIMEOUT:-560}" vb-serve "$B/vpod-bench" serve --out "$OUT" ${SERVE_ARGS:-}
    cat "$OUT/vb-serve.log"
fi
# cli serve over HTTP (synthetic Llama-3-8B): cli bench --url replays a Poisson trace with streaming
# requests; the same trace in process (cli bench --workload serve) for the throughput comparison;
# SIGTERM must stop the server with exit 0. HTTP_BACKENDS, HTTP_ARGS (the trace) override.
if want httpserve; then
    HTTP_ARGS=${HTTP_ARGS:---requests 160 --rate 12 --prompt-len 512 --max-tokens 128}
    # The in-process serve workload schedules with a 512-token budget and 64 sequences: the server too.
    ENGINE_ARGS="--model llama3-8b --synthetic --device cuda --max-seqs 64 --kv-memory 40GiB"
    echo "| backend | HTTP req/s | in-process req/s | HTTP / in-process | TTFT p50/p99 ms (HTTP) | TBT p50/p99 ms (HTTP) | exit on SIGTERM |" > "$OUT/httpserve.md"
    echo "|---|---|---|---|---|---|---|" >> "$OUT/httpserve.md"
    for be in ${HTTP_BACKENDS:-pod vattention paged:16}; do
        tag=${be//:/}
        # shellcheck disable=SC2086
        "$B/cli" serve $ENGINE_ARGS --chunk-size 512 --backend "$be" --port 8000 > "$OUT/serve-$tag.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 240); do grep -q "listening on" "$OUT/serve-$tag.log" && break; sleep 0.5; done
        # shellcheck disable=SC2086
        step "http-$tag" timeout 300 "$B/cli" bench --url http://127.0.0.1:8000 --workload serve $HTTP_ARGS --out "$OUT/http-$tag"
        kill -TERM $pid; wait $pid; rc=$?
        # shellcheck disable=SC2086
        step "inproc-$tag" timeout 300 "$B/cli" bench $ENGINE_ARGS --backend "$be" --workload serve $HTTP_ARGS --json --out "$OUT/inproc-$tag"
        python3 - "$OUT" "$tag" "$be" "$rc" >> "$OUT/httpserve.md" <<'PY'
import json, sys
out, tag, be, rc = sys.argv[1:]
h = json.load(open(f"{out}/http-{tag}/http_bench.json"))
b = json.load(open(f"{out}/inproc-{tag}/bench.json"))
def find(v):
    if isinstance(v, dict):
        if "requests_per_min" in v:
            return v
        for x in v.values():
            r = find(x)
            if r: return r
    if isinstance(v, list):
        for x in v:
            r = find(x)
            if r: return r
i = find(b)
hr, ir = h["requests_per_s"], i["requests_per_min"] / 60
print(f"| {be} | {hr:.3f} | {ir:.3f} | {hr/ir:.3f} | {h['ttft_ms']['p50']:.1f} / {h['ttft_ms']['p99']:.1f} | "
      f"{h['tbt_ms']['p50']:.2f} / {h['tbt_ms']['p99']:.2f} | {rc} |")
PY
    done
    cat "$OUT/httpserve.md"
fi
# cli compare on a full-size synthetic model (the README's compare figures): decode-sweep,
# hybrid-sweep, serve and memory, each into $OUT/compare-<workload>/ (JSON, PNG, SVG).
# CMP_MODEL (default llama3-8b), CMP_BACKENDS, CMP_KV (the KV budget every backend gets),
# CMP_WORKLOADS (a subset of the four, space-separated).
if want compare; then
    M=${CMP_MODEL:-llama3-8b}; BK=${CMP_BACKENDS:-vattention,paged:16,pod}; KV=${CMP_KV:-40GiB}
    CMP_WORKLOADS=" ${CMP_WORKLOADS:-decode-sweep hybrid-sweep serve memory} "
    cmp() { # workload, KV budget, args...
        local w=$1 kv=$2; shift 2
        [[ "$CMP_WORKLOADS" == *" $w "* ]] || return 0
        step "compare-$w" timeout 560 "$B/cli" compare --model "$M" --synthetic --device cuda --kv-memory "$kv" \
            --workload "$w" --out "$OUT/compare-$w" "$@"
        cat "$OUT/compare-$w.log"
    }
    # shellcheck disable=SC2086
    cmp decode-sweep "$KV" --backends "$BK" --batches 1,8,32 --contexts 1024,4096 --tokens 64 ${CMP_DECODE_ARGS:-}
    # shellcheck disable=SC2086
    cmp hybrid-sweep "$KV" --backends "$BK" --chunks 512,1024,2048 --batches 16 --contexts 2048,4096 --prefill-len 4096 ${CMP_HYBRID_ARGS:-}
    # shellcheck disable=SC2086
    cmp serve "$KV" --backends "$BK" --requests 32 --prompt-len 2048 --max-tokens 128 ${CMP_SERVE_ARGS:-}
    # shellcheck disable=SC2086
    cmp memory "${CMP_MEM_KV:-8GiB}" --backends vattention,paged:16,paged:128 --requests 64 --prompt-len 2048 --max-tokens 256 ${CMP_MEMORY_ARGS:-}
fi
if want smoke; then
    step smoke "$B/cli" generate --model tests/fixtures/tiny-llama3-gqa4 --device cuda --prompt "Alice was beginning to" --max-tokens 24 --json
    step smoke-vattention "$B/cli" generate --model tests/fixtures/tiny-llama3-gqa4 --device cuda --backend vattention --prompt "Alice was beginning to" --max-tokens 24 --json
    step smoke-paged "$B/cli" generate --model tests/fixtures/tiny-llama3-gqa4 --device cuda --backend paged:16 --prompt "Alice was beginning to" --max-tokens 24 --json
fi

if want decode; then
    # Decode benchmark at batch 1: warm-up process first (cuBLAS, allocator, disk cache).
    "$B/cli" generate --model llama3-8b --synthetic --device cuda --prompt-len 64 --max-tokens 8 --json > /dev/null 2>&1
    step bench-decode "$B/cli" generate --model llama3-8b --synthetic --device cuda --prompt-len 1024 --max-tokens 128 --json
    grep '^{' "$OUT/bench-decode.log" > "$OUT/bench-decode.json" || true
    step bench-decode-vattention "$B/cli" generate --model llama3-8b --synthetic --device cuda --backend vattention --prompt-len 1024 --max-tokens 128 --json
    grep '^{' "$OUT/bench-decode-vattention.log" > "$OUT/bench-decode-vattention.json" || true
fi
export VPOD_DATE=$(date -u +%F)
# fig9b: one layer's decode attention per backend (vattention, paged:16, paged:128), three head
# shapes, 16K context, batch 1..32: back-to-back call times and Nsight Compute kernel durations.
if want kernels || want fig9b; then
    step vb-decode "$B/vpod-bench" decode --out "$OUT"
    if command -v ncu >/dev/null; then
        # The decode kernels alone (no launch gaps, no K/V write): Nsight Compute durations.
        timeout 400 ncu --csv --metrics gpu__time_duration.sum --print-units base --clock-control none \
            --cache-control none -k regex:"slot_decode|paged_decode" "$B/vpod-bench" decode --iters 1 --out "$OUT/ncu-run" \
            > "$OUT/ncu-decode.csv" 2> "$OUT/ncu-decode.err"
        step vb-decode-kernels python3 scripts/kernel_times.py "$OUT/ncu-decode.csv" --out "$OUT/decode-kernels.json"
    fi
    for f in vb-decode vb-decode-kernels; do cat "$OUT/$f.log"; done
fi
if want kernels; then
    step vb-prefill "$B/vpod-bench" prefill --out "$OUT"
    step vb-map "$B/vpod-bench" map --out "$OUT"
    step sdpa python3 scripts/bench_sdpa.py --out "$OUT"
    for f in vb-prefill vb-map sdpa; do cat "$OUT/$f.log"; done
fi
if want serve; then
    step vb-spikes "$B/vpod-bench" spikes --out "$OUT"
    cat "$OUT/vb-spikes.log"
fi
# fig9a: end-to-end decode throughput at 16K per request, per model and backend.
# E2E_ARGS: e.g. "--tokens 64 --batch 1,4,16" for a shorter run.
if want serve || want fig9a; then
    # shellcheck disable=SC2086
    step vb-e2e "$B/vpod-bench" e2e --out "$OUT" ${E2E_ARGS:-}
    cat "$OUT/vb-e2e.log"
fi

# Bad input on the GPU: weights that cannot fit must be refused up front, with the numbers.
# (Yi-34B in f32 is 128 GiB: more than an H100 holds, less than an H200.)
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if want smoke && [ "${mem_mib:-0}" -lt 130000 ]; then
    "$B/cli" generate --model yi-34b --synthetic --device cuda --dtype f32 --prompt-len 8 --max-tokens 1 > "$OUT/oom.log" 2>&1
    RC[oom-refused]=$([ $? -ne 0 ] && grep -q "GiB free" "$OUT/oom.log" && echo 0 || echo 1)
    cat "$OUT/oom.log"
fi

# Where a decode step's time goes: kernel times of the last decode step (Nsight Compute).
if want ncu && [ -f "$OUT/bench-decode.json" ] && command -v ncu >/dev/null; then
    step_ms=$(python3 -c 'import json,sys; print(1e3 / json.load(open(sys.argv[1]))["decode_tokens_per_s"])' "$OUT/bench-decode.json")
    timeout 400 ncu --csv --metrics gpu__time_duration.sum --print-units base --clock-control none --cache-control none \
        "$B/cli" generate --model llama3-8b --synthetic --device cuda --prompt-len 1024 --max-tokens 2 --json \
        > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
    step breakdown python3 scripts/decode_breakdown.py "$OUT/ncu.csv" --step-ms "$step_ms"
    cat "$OUT/breakdown.log"
fi

if want ckpt; then
    step synth-ckpt python3 scripts/make_synthetic_checkpoint.py --preset llama3-8b --cache /tmp/vpod-hf/hub
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    step load-full env HF_HUB_CACHE=/tmp/vpod-hf/hub "$B/cli" generate --model llama3-8b --device cuda --prompt-len 32 --max-tokens 16 --json
    grep '^{' "$OUT/load-full.log" > "$OUT/load-full.json" || true
fi

python3 - "$OUT" "$gpu" <<'PY'
import json, os, sys
out, gpu = sys.argv[1], sys.argv[2]
def load(name):
    try:
        return json.load(open(os.path.join(out, name)))
    except Exception:
        return None
rows = []
# The copy ceiling measured in this run by any vpod-bench subcommand (each
# records it in its JSON); without one, no floor is printed (no constants).
def measured_copy():
    for f in sorted(os.listdir(out)):
        recs = load(f) if f.endswith(".json") else None
        for r in recs if isinstance(recs, list) else []:
            if isinstance(r, dict) and "ceilings" in r:
                return r["ceilings"]["copy_tb_per_s"] * 1e12
    return None
copy = measured_copy()
def floor_note(step_ms):
    if copy is None:
        return "no copy ceiling measured in this run (run a vpod-bench stage)"
    floor_ms = 16.06e9 / copy * 1e3  # Llama-3-8B weights / measured copy bandwidth
    return (f'floor {floor_ms:.2f} ms at {copy / 1e12:.2f} TB/s ({1e3 / floor_ms:.0f} tok/s): '
            f'{floor_ms / step_ms * 100:.0f} % of the floor')
b = load("bench-decode.json")
if b:
    step_ms = 1e3 / b["decode_tokens_per_s"]
    rows.append(("llama3-8b synthetic decode, batch 1, ctx 1024-1152",
                 f'{b["decode_tokens_per_s"]:.1f} tok/s = {step_ms:.2f} ms/token; {floor_note(step_ms)}; '
                 f'prefill 1024 tokens {b["prefill_ms"]:.1f} ms'))
bv = load("bench-decode-vattention.json")
if bv:
    step_ms = 1e3 / bv["decode_tokens_per_s"]
    rows.append(("same, --backend vattention",
                 f'{bv["decode_tokens_per_s"]:.1f} tok/s = {step_ms:.2f} ms/token; {floor_note(step_ms)}; '
                 f'prefill 1024 tokens {bv["prefill_ms"]:.1f} ms'))
l = load("load-full.json")
if l:
    rows.append(("llama3-8b 16 GB sharded checkpoint load (HF cache, offline)",
                 f'{l["load_ms"] / 1e3:.1f} s, peak host RSS {l["peak_rss_mib"]:.0f} MiB'))
summary = {"gpu": gpu, "bench_decode": b, "bench_decode_vattention": bv, "load_full": l}
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=2)
print("\n| check | result |\n|---|---|")
for k, v in rows:
    print(f"| {k} | {v} |")
PY
echo
printf '| step | exit |\n|---|---|\n'
fail=0
for k in "${!RC[@]}"; do printf '| %s | %s |\n' "$k" "${RC[$k]}"; [ "${RC[$k]}" = 0 ] || fail=1; done
grep -h "GPU-PARITY" "$OUT/gpu-tests.log" || true
grep -h "ERROR SUMMARY\|RACECHECK SUMMARY" "$OUT/memcheck.log" "$OUT/racecheck.log" || true
# Everything in one archive where PACK_TO asks (the device tool fetches only a few files).
if [ -n "${PACK_TO:-}" ]; then
    tar -C "$OUT" -czf "$PACK_TO" --exclude='*.csv' .
fi
exit $fail
