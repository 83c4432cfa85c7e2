// Per-slot (vAttention) K or V write, __nv_bfloat16; see kv_write.cuh.
#include "kv_write.cuh"
#include "pdl.cuh"

extern "C" __global__ void slot_write_kv_bf16(__nv_bfloat16* cache, const __nv_bfloat16* src, const int64_t* rows, int64_t src_stride,
                                            int row_elems) {
    slot_write<__nv_bfloat16>(cache, src, rows, src_stride, row_elems);
}

// K and V in one launch (grid (tokens, 2): blockIdx.y 0 writes K, 1 writes V):
// one kernel a layer instead of two in a decode step.
extern "C" __global__ void slot_write_kv2_bf16(__nv_bfloat16* kcache, __nv_bfloat16* vcache, const __nv_bfloat16* ksrc,
                                             const __nv_bfloat16* vsrc, const int64_t* rows, int64_t k_stride,
                                             int64_t v_stride, int row_elems) {
    pdl_wait();
    pdl_launch_dependents();
    if (blockIdx.y == 0)
        slot_write<__nv_bfloat16>(kcache, ksrc, rows, k_stride, row_elems);
    else
        slot_write<__nv_bfloat16>(vcache, vsrc, rows, v_stride, row_elems);
}
