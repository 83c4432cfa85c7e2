// Paged K/V write, float. `is_value` picks the V layout (else K); see kv_write.cuh.
#include "kv_write.cuh"

extern "C" __global__ void paged_write_kv_f32(float* cache, const float* src, const int64_t* slot_mapping,
                                             int64_t src_stride, int kv_heads, int head_dim, int block_size,
                                             int is_value) {
    if (is_value) {
        paged_write_v<float>(cache, src, slot_mapping, src_stride, kv_heads, head_dim, block_size);
    } else {
        paged_write_k<float>(cache, src, slot_mapping, src_stride, kv_heads, head_dim, block_size);
    }
}
