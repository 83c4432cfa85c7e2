// Causal prefill over vLLM's paged layout, bf16, head_dim 128, 8 warps = 128 query rows per block; see
// paged_prefill.cuh (chunk c's block table is row table_rows[c] of block_tables).
#include "paged_prefill.cuh"

extern "C" __global__ void __launch_bounds__(8 * 32)
    paged_prefill_bf16(const __nv_bfloat16* q, __nv_bfloat16* out, const __nv_bfloat16* k_cache,
                       const __nv_bfloat16* v_cache, const int32_t* work, const int32_t* q_start,
                       const int32_t* ctx_len, const int32_t* q_len, const int32_t* block_tables, int max_blocks,
                       int heads, int group, int kv_heads, int block_log2, float scale) {
    prefill_tile<8, 2>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, [=](int chunk, int kvh) {
        const int64_t head_off = (int64_t)kvh * ATT_HEAD_DIM << block_log2;
        return PagedKv<8 * 32>{k_cache + head_off, v_cache + head_off, block_tables + (int64_t)chunk * max_blocks,
                               ((int64_t)kv_heads * ATT_HEAD_DIM) << block_log2, block_log2};
    }, blockIdx.x, blockIdx.y);
}
