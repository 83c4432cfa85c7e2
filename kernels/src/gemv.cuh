// Skinny matmul for decode (instantiated by gemv_bf16.cu): y[m, n] = sum_k x[m, k] * w[n, k] for M <= 8 rows
// of x (a decode step's tokens) against a Linear weight w [N, K] (bf16,
// row-major). At batch 1 a decode step is a chain of such products and is
// bound by reading w once: one warp per output column streams its row of w
// with 16-byte loads (4 in flight per lane) and applies it to all M rows of
// x (cached in L1), accumulating in f32.
//
// Epilogues, fused so that the activations are not re-read by extra kernels:
//   epi 0: y = x w^T                                   y [M, N]
//   epi 1: y = x w^T + residual                        y, residual [M, N]
//   epi 2: w = [gate; up] ([2F, K]); y = silu(x gate^T) * (x up^T)   y [M, F], N = F
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

#include "swiglu.cuh"

// UNROLL loads of 16 bytes in flight per lane: with ~24 resident warps per
// SM, enough bytes in flight to approach the HBM bandwidth (measured on the
// H100: 2.84 TB/s on the 235 MB gate/up projection, 3.06 TB/s on the LM head;
// 8 loads in flight and a 37-register M = 1 variant were no faster).

__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const __nv_bfloat162* a2 = reinterpret_cast<const __nv_bfloat162*>(&a);
    const __nv_bfloat162* b2 = reinterpret_cast<const __nv_bfloat162*>(&b);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 fa = __bfloat1622float2(a2[i]);
        const float2 fb = __bfloat1622float2(b2[i]);
        s = fmaf(fa.x, fb.x, s);
        s = fmaf(fa.y, fb.y, s);
    }
    return s;
}

// Streams one weight row (read once: no L1 allocation).
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}

// acc[m] += w_row . x[m] over the row's K / 8 vectors, this lane's share.
template <int MAX_M, int UNROLL>
__device__ __forceinline__ void row_dot(const uint4* __restrict__ wr, const __nv_bfloat16* __restrict__ x, int M,
                                        int kv, float acc[MAX_M], int lane) {
    int i = lane;
    for (; i + 32 * (UNROLL - 1) < kv; i += 32 * UNROLL) {
        uint4 wv[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) wv[u] = load_stream(wr + i + 32 * u);
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m < M) {
                const uint4* xr = reinterpret_cast<const uint4*>(x) + (size_t)m * kv;
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) acc[m] += dot8(wv[u], xr[i + 32 * u]);
            }
        }
    }
    for (; i < kv; i += 32) {
        const uint4 wv = load_stream(wr + i);
#pragma unroll
        for (int m = 0; m < MAX_M; ++m)
            if (m < M) acc[m] += dot8(wv, reinterpret_cast<const uint4*>(x)[(size_t)m * kv + i]);
    }
#pragma unroll
    for (int m = 0; m < MAX_M; ++m)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc[m] += __shfl_xor_sync(0xffffffff, acc[m], o);
}

template <int MAX_M, int UNROLL>
__device__ __forceinline__ void gemv_impl(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                          int M, int N, int K, int epi) {
    const int lane = threadIdx.x & 31;
    const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (n >= N) return;
    const int kv = K / 8;
    float acc[MAX_M];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[m] = 0.f;
    row_dot<MAX_M, UNROLL>(reinterpret_cast<const uint4*>(w) + (size_t)n * kv, x, M, kv, acc, lane);
    if (epi == 2) {
        // Second row: up_proj row n sits N rows further down.
        float up[MAX_M];
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) up[m] = 0.f;
        row_dot<MAX_M, UNROLL>(reinterpret_cast<const uint4*>(w) + (size_t)(n + N) * kv, x, M, kv, up, lane);
        if (lane == 0) {
#pragma unroll
            for (int m = 0; m < MAX_M; ++m) {
                if (m < M) {
                    // transformers rounds gate and up to bf16 before silu(gate) * up.
                    const float g = __bfloat162float(__float2bfloat16(acc[m]));
                    const float u = __bfloat162float(__float2bfloat16(up[m]));
                    y[(size_t)m * N + n] = silu_gate_bf16(g, u);
                }
            }
        }
        return;
    }
    if (lane == 0) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m < M) {
                float v = acc[m];
                if (epi == 1) {
                    // As a separate add would: round the product to bf16, then add.
                    v = __bfloat162float(__float2bfloat16(v)) + __bfloat162float(residual[(size_t)m * N + n]);
                }
                y[(size_t)m * N + n] = __float2bfloat16(v);
            }
        }
    }
}
