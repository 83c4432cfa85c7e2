// Decode projections for up to 8 rows; see gemv.cuh.
#include "gemv.cuh"

extern "C" __global__ void gemv_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                     const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                     int M, int N, int K, int epi) {
    gemv_impl<8, 4>(w, x, residual, y, M, N, K, epi);
}

// RMSNorm + projection (epi 0) or RMSNorm + gated projection (epi 2); see gemv_norm_impl.
extern "C" __global__ void gemv_norm_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ gamma, __nv_bfloat16* __restrict__ y,
                                          int M, int N, int K, int epi, float eps) {
    gemv_norm_impl<8, 4>(w, x, gamma, y, M, N, K, epi, eps);
}
