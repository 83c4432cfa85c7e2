// Decode projections for up to 8 rows; see gemv.cuh.
#include "gemv.cuh"

extern "C" __global__ void gemv_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                     const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                     int M, int N, int K, int epi) {
    gemv_impl<8, 4>(w, x, residual, y, M, N, K, epi);
}

// Variants measured by `vpod-bench gemv` (linear::GemvKernel): sized for at
// most 4 rows (fewer registers, more warps an SM), for one row, and with the
// weight loads software-pipelined (at most 4 rows), with each column split
// over two warps (at most 4 rows).
extern "C" __global__ void gemv_m4_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                        const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                        int M, int N, int K, int epi) {
    gemv_impl<4, 4>(w, x, residual, y, M, N, K, epi);
}

extern "C" __global__ void gemv_m1_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                        const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                        int M, int N, int K, int epi) {
    gemv_impl<1, 4>(w, x, residual, y, M, N, K, epi);
}

extern "C" __global__ void gemv_split_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                           const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                           int M, int N, int K, int epi) {
    gemv_split_impl<4, 4>(w, x, residual, y, M, N, K, epi);
}

extern "C" __global__ void gemv_pipe_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                          int M, int N, int K, int epi) {
    gemv_impl<4, 4, true>(w, x, residual, y, M, N, K, epi);
}

// RMSNorm + projection (epi 0) or RMSNorm + gated projection (epi 2); see gemv_norm_impl.
// Up to 4 rows, at most 80 registers (3 CTAs of 8 warps an SM, the plain
// kernel's 24 warps): with 8 rows it took 146 registers (1 CTA an SM) and
// streamed the weights at half the plain kernel's rate on the H200; capped
// at 64 it spills.
extern "C" __global__ void __launch_bounds__(256, 3) gemv_norm_bf16(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ gamma, __nv_bfloat16* __restrict__ y,
                                          int M, int N, int K, int epi, float eps) {
    gemv_norm_impl<4, 4>(w, x, gamma, y, M, N, K, epi, eps);
}
