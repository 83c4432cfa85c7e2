// Causal prefill over the per-slot layout, bf16, head_dim 128, 4 warps = 64 query rows per block; see slot_prefill.cuh.
#include "slot_prefill.cuh"

extern "C" __global__ void __launch_bounds__(4 * 32)
    slot_prefill_w4_bf16(const __nv_bfloat16* q, __nv_bfloat16* out, const __nv_bfloat16* k_base,
                         const __nv_bfloat16* v_base, const int32_t* work, const int32_t* q_start,
                         const int32_t* ctx_len, const int32_t* q_len, const int32_t* slots, int heads, int group,
                         int64_t slot_stride, int64_t pos_stride, float scale) {
    slot_prefill_tile<4, 2>(q, out, k_base, v_base, work, q_start, ctx_len, q_len, slots, heads, group,
                               slot_stride, pos_stride, scale);
}
