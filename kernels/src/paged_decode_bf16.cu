// PagedAttention decode (vLLM v0.2.7's v1 / v2 kernels and v2's reduce), bf16,
// head_dim 128, block sizes 16 / 32 / 64 / 128; see paged_decode.cuh.
#include "paged_decode.cuh"

#define PD_ARGS                                                                                                    \
    float *exp_sums, float *max_logits, __nv_bfloat16 *out, const __nv_bfloat16 *q, const int32_t *q_rows,        \
        const __nv_bfloat16 *k_cache, const __nv_bfloat16 *v_cache, const int32_t *block_tables,                  \
        const int32_t *context_lens, int max_blocks, int heads, int kv_heads, float scale
#define PD_PASS exp_sums, max_logits, out, q, q_rows, k_cache, v_cache, block_tables, context_lens, max_blocks, heads, \
                kv_heads, scale

#define PD_KERNELS(B)                                                                                              \
    extern "C" __global__ void __launch_bounds__(PD_THREADS) paged_decode_v1_b##B##_bf16(PD_ARGS) {                \
        paged_decode<B, 0>(PD_PASS);                                                                               \
    }                                                                                                              \
    extern "C" __global__ void __launch_bounds__(PD_THREADS) paged_decode_v2_b##B##_bf16(PD_ARGS) {                \
        paged_decode<B, PD_PARTITION>(PD_PASS);                                                                    \
    }

PD_KERNELS(16)
PD_KERNELS(32)
PD_KERNELS(64)
PD_KERNELS(128)

extern "C" __global__ void __launch_bounds__(PD_THREADS)
    paged_decode_reduce_bf16(__nv_bfloat16* out, const float* exp_sums, const float* max_logits,
                             const __nv_bfloat16* tmp_out, const int32_t* q_rows, const int32_t* context_lens,
                             int heads, int max_partitions) {
    paged_decode_reduce(out, exp_sums, max_logits, tmp_out, q_rows, context_lens, heads, max_partitions);
}
