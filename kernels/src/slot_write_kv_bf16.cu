// Per-slot (vAttention) K or V write, __nv_bfloat16; see kv_write.cuh.
#include "kv_write.cuh"

extern "C" __global__ void slot_write_kv_bf16(__nv_bfloat16* cache, const __nv_bfloat16* src, const int64_t* rows, int64_t src_stride,
                                            int row_elems) {
    slot_write<__nv_bfloat16>(cache, src, rows, src_stride, row_elems);
}
