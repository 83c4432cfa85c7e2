// POD-Attention over the per-slot (vAttention) layout: the prefill chunks and
// the decode tokens of a hybrid batch in ONE launch. Two designs:
//  - pod_bf16 / podp / pod3 (+ _tma): prefill and decode thread blocks side
//    by side on every SM (compute-bound 64-row query tiles on the tensor
//    cores next to bandwidth-bound decode splits), described first below;
//  - pod_wsd_bf16 (sm_90a, at the end of this file): the warp-specialized
//    128-row prefill tile fills an SM by itself, so the SMs are partitioned
//    by role instead (one role per block, one block per SM).
//
//   grid:   1-D, n_pre + n_dec blocks of 4 warps, pod_smem<DSTAGES>() dynamic smem
//   n_pre = n_work x heads prefill items: the 64-row query tile `work[w]`
//           of slot_prefill_w4 for one head, in the warp-specialized tile's
//           L2 order (ws_l2_order: sections of l2_heads heads, in each the
//           work items heaviest first with the section's heads fastest)
//   n_dec = splits x kv_heads x decodes decode items: slot_decode's split
//           (split, kv head, decode)
//
// Blocks per SM on the H100 / H200, two variants (the host picks one):
//   pod_bf16:  2 blocks of 128 threads. Both roles need ~220 registers per
//              thread (the query fragments and the 16 x 128 f32 accumulator
//              of a warp); the decode role keeps its 3-stage pipeline (96 KiB).
//   pod3_bf16: 3 blocks, capped at 168 registers per thread, the decode role
//              on a 2-stage pipeline (64 KiB) and the prefill role's Q passing
//              through a stage buffer (65 KiB), so 3 x 66 KiB fit in 228 KiB.
//              With the resident policy's ratio_p = 2, an SM runs two 64-row
//              query tiles (whose warpgroups hide each other's softmax behind
//              their MMAs, as in a plain prefill launch) next to a decode split.
// Four blocks per SM would need tiles under 128 registers (the accumulators
// alone take 96) and 56-KiB blocks. The 128-row prefill tiles are not used
// by these kernels: the 8-warp one at ~217 registers a thread fills an SM's
// register file with its 256 threads, the warp-specialized one (384
// threads, 240-register consumers, 161 KiB) too: see pod_wsd_bf16.
//
// Thread 0 of each block picks its kind from the SM it landed on, then takes
// the next item of that kind from a global counter (the other kind when its
// own has none left: every block gets exactly one item):
//   policy 0 (the paper's): a ticket from the SM's counter; tickets
//            t mod (ratio_p + ratio_d) < ratio_p do prefill, so every SM runs
//            the global prefill:decode ratio of blocks over time;
//   policy 1 (resident):    prefill while fewer than ratio_p prefill blocks
//            are resident on the SM (counted up at start, down at the end),
//            decode otherwise, so the mix of blocks *running together* on an
//            SM is the target one (with 2 blocks per SM and ratio_p 1: one of
//            each while both kinds last).
//
// sched (ints, zero before the first launch, allocated once):
//   [0] prefill items taken, [1] decode items taken, [2] blocks finished,
//   [3, 3 + nsm) tickets per SM, [3 + nsm, 3 + 2 nsm) resident prefill blocks
//   per SM; nsm = %nsmid (SM ids are not dense on every part). The last block
//   to finish zeroes [0..3) and the tickets (the resident counts return to 0
//   by themselves), so no per-launch memset or allocation is needed.
#include "slot_decode.cuh"
#include "slot_prefill.cuh"
#include "slot_prefill_ws.cuh"
#include "tma.cuh"

constexpr int POD_WARPS = 4;
static_assert(POD_WARPS == DEC_WARPS, "prefill and decode roles share the block");
// Dynamic shared memory of a POD block whose decode role has DSTAGES stages
// and prefill role PSTAGES.
template <int DSTAGES, int PSTAGES = 2>
constexpr int pod_smem() {
    return PrefillShape<POD_WARPS, PSTAGES>::SMEM > DSTAGES * DEC_STAGE_BYTES ? PrefillShape<POD_WARPS, PSTAGES>::SMEM
                                                                               : DSTAGES * DEC_STAGE_BYTES;
}
static_assert(3 * (pod_smem<2>() + 1024 + 128) <= 228 * 1024, "pod3_bf16: 3 blocks per SM");
static_assert(2 * (pod_smem<DEC_STAGES, 3>() + 1024 + 128) <= 228 * 1024, "podp_bf16: 2 blocks per SM");

__device__ __forceinline__ int pod_smid() {
    int id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    return id;
}

// The SM-id range of this GPU, for sizing `sched` (one thread).
extern "C" __global__ void pod_nsmid(int* out) {
    int n;
    asm volatile("mov.u32 %0, %%nsmid;" : "=r"(n));
    *out = n;
}

// The kernel's arguments (every entry point takes the same: POD_PARAMS and
// the K and V tensor maps of the layer, used by the *_tma entries only).
#define POD_PARAMS                                                                                                  \
    const __nv_bfloat16 *q, __nv_bfloat16 *out, const __nv_bfloat16 *k_base, const __nv_bfloat16 *v_base, int heads, \
        int group, int64_t slot_stride, int64_t pos_stride, float scale,                                            \
        /* prefill chunks (slot_prefill_w4's arguments) */                                                          \
        const int32_t *work, const int32_t *q_start, const int32_t *ctx_len, const int32_t *q_len,                  \
        const int32_t *slots, int n_work, /* decodes (slot_decode's arguments) */                                   \
        const int32_t *dec_rows, const int32_t *dec_slots, const int32_t *dec_lens, float *part_o, float *part_ml,  \
        int *counters, int kv_heads, int splits, int n_decodes, /* scheduling */                                    \
        int *sched, int nsm, int policy, int ratio_p, int ratio_d, int l2_heads
#define POD_ARGS                                                                                                \
    q, out, k_base, v_base, heads, group, slot_stride, pos_stride, scale, work, q_start, ctx_len, q_len, slots, \
        n_work, dec_rows, dec_slots, dec_lens, part_o, part_ml, counters, kv_heads, splits, n_decodes, sched, nsm, \
        policy, ratio_p, ratio_d, l2_heads
#define POD_MAPS const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap

// DSTAGES: the decode role's pipeline; PIPE: the prefill role runs
// prefill_tile_pipelined<3> (else prefill_tile<4, 2>); TMA: its K/V tiles
// come by TMA through kmap / vmap (tma.cuh; sm_90a, else cp.async).
template <int DSTAGES, bool PIPE, bool TMA>
__device__ __forceinline__ void pod_body(POD_PARAMS, const TmaMap& kmap, const TmaMap& vmap) {
    constexpr bool USE_TMA = TMA && ATT_WGMMA;
    __shared__ int s_item;  // >= 0: prefill item; < 0: decode item -1 - s_item
    __shared__ __align__(8) uint64_t bars[USE_TMA ? 3 : 1];
    const int n_pre = n_work * heads, n_dec = splits * kv_heads * n_decodes;
    int* tickets = sched + 3;
    int* resident = sched + 3 + nsm;
    int sm = 0;
    bool held = false;  // this block counts in resident[sm]
    if (threadIdx.x == 0) {
        if constexpr (USE_TMA) TmaSlotKv::init(smem_addr(bars), 3);  // the barrier below orders it
        sm = pod_smid() % nsm;
        bool pre;
        if (policy == 0) {
            pre = atomicAdd(&tickets[sm], 1) % (ratio_p + ratio_d) < ratio_p;
        } else {
            pre = atomicAdd(&resident[sm], 1) < ratio_p;
            held = pre;
            if (!pre) atomicSub(&resident[sm], 1);
        }
        int item = -1;
        if (pre) {
            item = atomicAdd(&sched[0], 1);
            if (item >= n_pre) pre = false;
        }
        if (!pre) {
            item = atomicAdd(&sched[1], 1);
            if (item >= n_dec) {
                pre = true;
                item = atomicAdd(&sched[0], 1);
            }
        }
        if (held && !pre) {
            atomicSub(&resident[sm], 1);
            held = false;
        }
        s_item = pre ? item : -1 - item;
    }
    __syncthreads();
    const int item = s_item;
    if (item >= 0) {
        // Prefill items in the warp-specialized tile's L2 order (sections
        // of l2_heads query heads, slot_prefill_ws.cuh).
        const WsPick pk = ws_l2_order(item, heads, n_work, l2_heads);
        const int w = pk.item, head = pk.head;
        auto kv = [&](int chunk, int kvh) {
            if constexpr (USE_TMA) {
                return TmaSlotKv{&kmap, &vmap, kvh * ATT_HEAD_DIM, slots[chunk], smem_addr(bars)};
            } else {
                const size_t off = (size_t)slots[chunk] * slot_stride + (size_t)kvh * ATT_HEAD_DIM;
                return SlotKv<POD_WARPS * 32>{k_base + off, v_base + off, pos_stride};
            }
        };
        if constexpr (PIPE)
            prefill_tile_pipelined<3>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, kv, w, head);
        else
            prefill_tile<POD_WARPS, 2>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, kv, w, head);
        __syncthreads();  // the block's work is done before it stops counting as resident
    } else {
        const int d = -1 - item;
        const int split = d % splits, kvh = (d / splits) % kv_heads, b = d / (splits * kv_heads);
        slot_decode_split<DSTAGES>(q, dec_rows, k_base, v_base, dec_slots, dec_lens, part_o, part_ml, counters, out, heads,
                          group, slot_stride, pos_stride, splits, scale, split, kvh, b, kv_heads,
                          WholeBlock{});
    }
    if (threadIdx.x != 0) return;
    if (held) atomicSub(&resident[sm], 1);
    __threadfence();
    if (atomicAdd(&sched[2], 1) == (int)gridDim.x - 1) {
        // Every other block has finished its counter updates: ready the next launch.
        sched[0] = sched[1] = 0;
        for (int i = 0; i < nsm; ++i) tickets[i] = 0;
        __threadfence();
        sched[2] = 0;
    }
}

// The two entry points (see "Blocks per SM" above); same arguments.
#define POD_ENTRY(NAME, BLOCKS_PER_SM, DSTAGES, PIPE, TMA)                                                         \
    extern "C" __global__ void __launch_bounds__(POD_WARPS * 32, BLOCKS_PER_SM) NAME(POD_PARAMS, POD_MAPS) { \
        pod_body<DSTAGES, PIPE, TMA>(POD_ARGS, kmap, vmap);                                                      \
    }
POD_ENTRY(pod_bf16, 2, DEC_STAGES, false, false)
POD_ENTRY(pod3_bf16, 3, 2, false, false)
POD_ENTRY(podp_bf16, 2, DEC_STAGES, true, false)
// The same with the prefill role's K/V tiles loaded by TMA (the host picks
// them on compute capability 9.0, see tma.cuh).
POD_ENTRY(pod3_tma_bf16, 3, 2, false, true)
POD_ENTRY(podp_tma_bf16, 2, DEC_STAGES, true, true)

// pod_wsd_bf16: the SMs partitioned by role, with the
// warp-specialized prefill tile (slot_prefill_ws.cuh) as the prefill role.
// Its 384 threads, up to 240 registers a consumer thread and 161 KiB leave
// no room on an SM for a decode block beside it, so instead of sharing an SM
// the two roles share the GPU: one block per SM (384 threads, POD_WSD_SMEM),
// each block ONE role for its whole life:
//   - the first `ratio_d` blocks to start (an arrival ticket) are decode
//     workers: two warpgroups, each with its own 3-stage part of the shared
//     memory (two plain decode blocks' worth), take decode items
//     (slot_decode_split) from a global counter until none is left, then the
//     block ends and its SM takes prefill blocks; the third warpgroup idles
//     and gives its registers to the other two;
//     (ratio_d = 0: none; the decodes then fill the prefill's last wave);
//   - every other block takes the next prefill item (heaviest first): a
//     128-row query tile of one head, run as slot_prefill_wsp_bf16 runs it
//     (producer warpgroup + two consumer warpgroups, setmaxnreg 24 / 240);
//     a block that finds no prefill item left becomes a decode worker.
// So while both kinds last, `ratio_d` SMs stream the decodes' K/V (enough of
// them to draw the copy rate) and the rest run prefill tiles at the plain
// kernel's speed; whichever kind runs out first hands its SMs to the other.
// grid: n_pre + SMs blocks (a block per prefill item plus enough late blocks
// to put every SM on decode once the prefill items are gone).
// Prefill items: n_work x heads 128-row query tiles of one head, taken in
// the plain kernel's L2 order (ws_l2_order, sections of l2_heads query
// heads); decode items as pod_bf16.
// sched: [0] prefill items taken, [1] decode items taken, [2] blocks
// finished, [3] arrival tickets; the last block zeroes them. policy and
// ratio_p are unused. kmap / vmap: 128-row boxes (the plain wsp kernel's).
constexpr int POD_WSD_SMEM = 6 * DEC_STAGE_BYTES;  // 2 x 3 decode stages
static_assert(POD_WSD_SMEM >= WsShape<2>::SMEM, "the prefill role fits");
static_assert(POD_WSD_SMEM + 1024 <= 227 * 1024, "one block per SM");

// CREGS: the prefill role's consumer registers a thread (setmaxnreg, as
// prefill_ws's): 240 in pod_wsd_bf16, 192 in pod_wsds_bf16, the budget of
// the slim tile (slot_prefill_wsps_bf16), the faster one alone. With 192
// ptxas waits for a tile's PV product about 140 instructions earlier in the
// softmax and so releases the V stage sooner (the SASS of the two plain
// entries); pod_wsd_bf16's prefill role compiles as the 240 one does.
template <int CREGS>
__device__ __forceinline__ void pod_wsd_body(POD_PARAMS, const TmaMap& kmap, const TmaMap& vmap) {
    constexpr int DEC_WGS = 2, DSTAGES = 3;
    static_assert(DEC_WGS * DSTAGES * DEC_STAGE_BYTES <= POD_WSD_SMEM, "decode parts fit");
    static_assert(WS_THREADS == 3 * 128, "two decode warpgroups and an idle one");
    __shared__ int s_role;    // >= 0: a prefill item; -1: a decode worker
    __shared__ int s_dec[2];  // per decode warpgroup: its next decode item, -1 none
    const int n_pre = n_work * heads, n_dec = splits * kv_heads * n_decodes;
    if (threadIdx.x == 0) {
        int role = -1;
        if (atomicAdd(&sched[3], 1) >= ratio_d) {
            const int p = atomicAdd(&sched[0], 1);
            if (p < n_pre) role = p;
        }
        s_role = role;
    }
    __syncthreads();
    const int role = s_role;
    if (role >= 0) {
#if ATT_WGMMA
        prefill_ws_nth<2, CREGS>(q, out, work, q_start, ctx_len, q_len, slots, heads, group, scale, &kmap, &vmap, role,
                                 n_pre, l2_heads);
#else
        __trap();  // sm_90a only (the host checks)
#endif
    } else if (const int wg = threadIdx.x / 128; wg < DEC_WGS) {
        // The decode warpgroups' registers, stated (else ptxas spills the
        // decode loop of this kernel at the launch's 168): the idle
        // warpgroup gives its share to the other two.
#if ATT_WGMMA
        setmaxnreg_inc<232>();
#endif
        const WarpGroupPart part{WholeBlock{}.region() + wg * DSTAGES * DEC_STAGE_BYTES, 1 + wg};
        for (;;) {
            if (threadIdx.x % 128 == 0) {
                const int d = atomicAdd(&sched[1], 1);
                s_dec[wg] = d < n_dec ? d : -1;
            }
            part.sync();
            const int d = s_dec[wg];
            part.sync();  // read by all before thread 0 writes the next one
            if (d < 0) break;
            const int split = d % splits, kvh = (d / splits) % kv_heads, b = d / (splits * kv_heads);
            slot_decode_split<DSTAGES>(q, dec_rows, k_base, v_base, dec_slots, dec_lens, part_o, part_ml, counters,
                                       out, heads, group, slot_stride, pos_stride, splits, scale, split, kvh, b,
                                       kv_heads, part);
            part.sync();  // the part's shared memory is free again
        }
    } else {
#if ATT_WGMMA
        setmaxnreg_dec<24>();  // the idle warpgroup
#endif
    }
    __syncthreads();  // no thread of the block touches sched after this
    if (threadIdx.x != 0) return;
    __threadfence();
    if (atomicAdd(&sched[2], 1) == (int)gridDim.x - 1) {
        // Every other block has finished its counter updates: ready the next launch.
        sched[0] = sched[1] = sched[3] = 0;
        __threadfence();
        sched[2] = 0;
    }
}

extern "C" __global__ void __launch_bounds__(WS_THREADS, 1) pod_wsd_bf16(POD_PARAMS, POD_MAPS) {
    pod_wsd_body<240>(POD_ARGS, kmap, vmap);
}
// The same with the slim tile's consumer budget (the host runs it where the
// step's prefill kernel is the slim one, PrefillKernel::WspSlim): 2 x 128 x
// 192 + 128 x 24 registers for the prefill role, 2 x 128 x 232 + 128 x 24
// for the decode role, both within the launch's 384 x 168.
extern "C" __global__ void __launch_bounds__(WS_THREADS, 1) pod_wsds_bf16(POD_PARAMS, POD_MAPS) {
    pod_wsd_body<192>(POD_ARGS, kmap, vmap);
}

