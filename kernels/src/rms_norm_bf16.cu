// RMSNorm of each row of x [T, K] for the decode path's PDL chains (see
// rms_norm_row); linear::rms_norm launches it.
#include <cuda_bf16.h>
#include <stdint.h>

#include "pdl.cuh"

// Vectors of 8 bf16 a thread holds in registers (K <= 8 * 256 * NORM_VPT
// in one pass; longer rows read the rest again).
constexpr int NORM_VPT = 4;

// Sum of squares of a bf16 vector, added to ss.
__device__ __forceinline__ float sumsq8(uint4 v, float ss) {
    const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float2 f = __bfloat1622float2(v2[q]);
        ss = fmaf(f.x, f.x, ss);
        ss = fmaf(f.y, f.y, ss);
    }
    return ss;
}

// bf16(v * s * g), element-wise (candle's rms_norm rounding).
__device__ __forceinline__ uint4 scale8(uint4 v, uint4 g, float s) {
    __nv_bfloat162* v2 = reinterpret_cast<__nv_bfloat162*>(&v);
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float2 f = __bfloat1622float2(v2[q]);
        const float2 a = __bfloat1622float2(g2[q]);
        v2[q] = __floats2bfloat162_rn(s * f.x * a.x, s * f.y * a.y);
    }
    return v;
}

// The sum over the CTA of each thread's ss (all threads call it; part holds 32 floats).
__device__ __forceinline__ float block_sum(float ss, float* part, float* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
    if (lane == 0) part[warp] = ss;
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.f;
        for (int i = 0; i < warps; ++i) t += part[i];
        *total = t;
    }
    __syncthreads();
    return *total;
}


// RMSNorm of each row of x [T, K] (candle's rms_norm: f32 sums, one bf16
// rounding of x * scale * gamma), one CTA of blockDim threads a row, for
// PDL chains: candle's own norm kernel neither waits nor lets the next
// kernel start early, so the GEMV after it could not issue its first
// weight loads while the norm ran. gamma is read before the wait (a
// weight); x after it.
__device__ __forceinline__ void rms_norm_row(const __nv_bfloat16* __restrict__ x,
                                             const __nv_bfloat16* __restrict__ gamma,
                                             __nv_bfloat16* __restrict__ y, int K, float eps) {
    __shared__ float part[32];
    __shared__ float total;
    const int nv = K / 8, stride = blockDim.x * NORM_VPT;
    const size_t r = blockIdx.x;
    const uint4* xv = reinterpret_cast<const uint4*>(x) + r * nv;
    const uint4* gv = reinterpret_cast<const uint4*>(gamma);
    uint4* yv = reinterpret_cast<uint4*>(y) + r * nv;
    uint4 xr[NORM_VPT], gr[NORM_VPT];
#pragma unroll
    for (int j = 0; j < NORM_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nv) gr[j] = gv[i];
    }
    pdl_wait();
    pdl_launch_dependents();
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < NORM_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nv) xr[j] = xv[i];
    }
#pragma unroll
    for (int j = 0; j < NORM_VPT; ++j)
        if (threadIdx.x + j * blockDim.x < nv) ss = sumsq8(xr[j], ss);
    for (int i = threadIdx.x + stride; i < nv; i += blockDim.x) ss = sumsq8(xv[i], ss);
    const float s = rsqrtf(block_sum(ss, part, &total) / (float)K + eps);
#pragma unroll
    for (int j = 0; j < NORM_VPT; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nv) yv[i] = scale8(xr[j], gr[j], s);
    }
    for (int i = threadIdx.x + stride; i < nv; i += blockDim.x) yv[i] = scale8(xv[i], gv[i], s);
}

extern "C" __global__ void __launch_bounds__(256) rms_norm_bf16(const __nv_bfloat16* __restrict__ x,
                                                                const __nv_bfloat16* __restrict__ gamma,
                                                                __nv_bfloat16* __restrict__ y, int K, float eps) {
    rms_norm_row(x, gamma, y, K, eps);
}
