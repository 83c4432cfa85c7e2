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

// The slim decode (the same arguments and grid): 2 warps, 32-key tiles in 2
// stages (32 KiB), at most 208 registers a thread (13 K a block), so that
// one block fits on an SM beside a slot_prefill_wsps_bf16 block (52 K
// registers, 161 KiB): the two-stream path's decodes then share the
// prefill's SMs instead of waiting for its last wave.
constexpr int DEC_SLIM_WARPS = 2, DEC_SLIM_STAGES = 2;
extern "C" __global__ void __maxnreg__(208)
    slot_decode_slim_bf16(const __nv_bfloat16* q, const int32_t* q_rows, const __nv_bfloat16* k_base,
                          const __nv_bfloat16* v_base, const int32_t* slots, const int32_t* seq_lens, float* part_o,
                          float* part_ml, int* counters, __nv_bfloat16* out, int heads, int group,
                          int64_t slot_stride, int64_t pos_stride, int splits, float scale) {
    pdl_wait();
    pdl_launch_dependents();
    slot_decode_split<DEC_SLIM_STAGES, WholeBlock, DEC_SLIM_WARPS>(
        q, q_rows, k_base, v_base, slots, seq_lens, part_o, part_ml, counters, out, heads, group, slot_stride,
        pos_stride, splits, scale, blockIdx.x, blockIdx.y, blockIdx.z, gridDim.y, WholeBlock{});
}
