// Per-slot (vAttention) K or V write, float; see kv_write.cuh.
#include "kv_write.cuh"

extern "C" __global__ void slot_write_kv_f32(float* cache, const float* src, const int64_t* rows, int64_t src_stride,
                                            int row_elems) {
    slot_write<float>(cache, src, rows, src_stride, row_elems);
}
