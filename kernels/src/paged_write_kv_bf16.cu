// Paged K/V write, __nv_bfloat16. `is_value` picks the V layout (else K); see kv_write.cuh.
#include "kv_write.cuh"

extern "C" __global__ void paged_write_kv_bf16(__nv_bfloat16* cache, const __nv_bfloat16* src, const int64_t* slot_mapping,
                                             int64_t src_stride, int kv_heads, int head_dim, int block_size,
                                             int is_value) {
    if (is_value) {
        paged_write_v<__nv_bfloat16>(cache, src, slot_mapping, src_stride, kv_heads, head_dim, block_size);
    } else {
        paged_write_k<__nv_bfloat16>(cache, src, slot_mapping, src_stride, kv_heads, head_dim, block_size);
    }
}
