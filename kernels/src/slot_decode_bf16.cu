// Split-KV decode over the per-slot layout, bf16, head_dim 128, GQA group <= 16; see slot_decode.cuh.
#include "pdl.cuh"
#include "slot_decode.cuh"

extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)
    slot_decode_bf16(const __nv_bfloat16* q, const int32_t* q_rows, const __nv_bfloat16* k_base,
                     const __nv_bfloat16* v_base, const int32_t* slots, const int32_t* seq_lens, float* part_o,
                     float* part_ml, int* counters, __nv_bfloat16* out, int heads, int group, int64_t slot_stride,
                     int64_t pos_stride, int splits, float scale) {
    pdl_wait();
    pdl_launch_dependents();
    slot_decode_split<DEC_STAGES>(q, q_rows, k_base, v_base, slots, seq_lens, part_o, part_ml, counters, out, heads, group,
                      slot_stride, pos_stride, splits, scale, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.y,
                      WholeBlock{});
}

// The slim decode (the same arguments and grid; GQA groups of at most 8,
// the host checks): slot_decode_split_t's transposed products, 4 warps,
// 64-key tiles in 2 stages (64 KiB), at most 104 registers a thread. Next to
// a slot_prefill_wsps_bf16 block (3 warps a sub-partition at 136 registers,
// 13 K of each sub-partition's 16 K) one warp of it fits on each
// sub-partition (3.25 K), and its 64 KiB beside the prefill's 161 KiB: the
// two-stream path's decodes then share the prefill's SMs instead of waiting
// for its last wave.
constexpr int DEC_SLIM_STAGES = 2;
#define SLIM_DECODE_ENTRY(NAME, RING)                                                                                  \
    extern "C" __global__ void __maxnreg__(104)                                                                        \
        NAME(const __nv_bfloat16* q, const int32_t* q_rows, const __nv_bfloat16* k_base, const __nv_bfloat16* v_base, \
             const int32_t* slots, const int32_t* seq_lens, float* part_o, float* part_ml, int* counters,              \
             __nv_bfloat16* out, int heads, int group, int64_t slot_stride, int64_t pos_stride, int splits,            \
             float scale) {                                                                                            \
        pdl_wait();                                                                                                    \
        pdl_launch_dependents();                                                                                       \
        slot_decode_split_t<DEC_SLIM_STAGES, WholeBlock, DEC_WARPS, RING>(                                             \
            q, q_rows, k_base, v_base, slots, seq_lens, part_o, part_ml, counters, out, heads, group, slot_stride,     \
            pos_stride, splits, scale, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.y, WholeBlock{});                   \
    }
SLIM_DECODE_ENTRY(slot_decode_slim_bf16, false)

// The slim decode with a ring a warp (slot_decode.cuh's decode_warp_ring;
// the same arguments, grid, 64 KiB and register cap): each warp streams its
// own 16 keys of every tile through 4 slots of 4 KiB (K and V apart) and
// refills a slot once read, so 48 KiB of a block are in flight while it
// computes, where slot_decode_slim_bf16's 2 stages of whole tiles hold at
// most 32 KiB in flight and then wait for all of it at a block barrier. With
// one block an SM beside the slim prefill, that is the SM's whole decode
// traffic.
SLIM_DECODE_ENTRY(slot_decode_slimr_bf16, true)
