// Split-KV decode over the per-slot layout, bf16, head_dim 128, GQA group 7; see slot_decode.cuh.
#include "slot_decode.cuh"

extern "C" __global__ void __launch_bounds__(DEC_WARPS * 32)
    slot_decode_g7_bf16(const __nv_bfloat16* q, const __nv_bfloat16* k_cache, const __nv_bfloat16* v_cache,
                        const int32_t* slots, const int32_t* seq_lens, float* part_o, float* part_ml, int heads,
                        int kv_heads, int max_len, int splits, float scale) {
    slot_decode_split<7>(q, k_cache, v_cache, slots, seq_lens, part_o, part_ml, heads, kv_heads, max_len, splits,
                          scale);
}
