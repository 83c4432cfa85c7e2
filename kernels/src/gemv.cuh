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

#include "pdl.cuh"
#include "swiglu.cuh"

// Before pdl_wait() (pdl.cuh) each warp issues its first UNROLL weight
// loads into registers: they stream while the previous kernel finishes,
// and the products start from them once x may be read. (Asking whole rows
// into L2 with cp.async.bulk.prefetch instead made every projection 2-9 %
// slower on the H200, the LM head too: results/2026-12-04-h200-pdl/.)

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

// acc[m] += w_row . x[m] over the row's vectors [i0, end) that are this
// lane's (i0 = lane, or further when the caller consumed a prefix or takes
// a part of the row; x's rows are kv vectors apart), summed over the warp.
// x may point to global or shared memory.
template <int MAX_M, int UNROLL>
__device__ __forceinline__ void row_dot_range(const uint4* __restrict__ wr, const __nv_bfloat16* __restrict__ x,
                                              int M, int kv, float acc[MAX_M], int lane, int i0, int end) {
    int i = i0;
    for (; i + 32 * (UNROLL - 1) < end; i += 32 * UNROLL) {
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
    for (; i < end; i += 32) {
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

// row_dot_range over the rest of the row (kv vectors).
template <int MAX_M, int UNROLL>
__device__ __forceinline__ void row_dot(const uint4* __restrict__ wr, const __nv_bfloat16* __restrict__ x, int M,
                                        int kv, float acc[MAX_M], int lane, int i0) {
    row_dot_range<MAX_M, UNROLL>(wr, x, M, kv, acc, lane, i0, kv);
}

// row_dot with the weight loads software-pipelined: the next UNROLL vectors
// are in flight while the current ones are applied, so a lane always has a
// load outstanding (row_dot issues its next loads only after the current
// products; ptxas may also interleave loads with their uses).
template <int MAX_M, int UNROLL>
__device__ __forceinline__ void row_dot_pipe(const uint4* __restrict__ wr, const __nv_bfloat16* __restrict__ x, int M,
                                             int kv, float acc[MAX_M], int lane) {
    constexpr int STEP = 32 * UNROLL;
    int i = lane;
    uint4 cur[UNROLL];
    bool have = i + 32 * (UNROLL - 1) < kv;
    if (have) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) cur[u] = load_stream(wr + i + 32 * u);
    }
    while (have) {
        const bool next = i + STEP + 32 * (UNROLL - 1) < kv;
        uint4 nxt[UNROLL];
        if (next) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) nxt[u] = load_stream(wr + i + STEP + 32 * u);
        }
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m < M) {
                const uint4* xr = reinterpret_cast<const uint4*>(x) + (size_t)m * kv;
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) acc[m] += dot8(cur[u], xr[i + 32 * u]);
            }
        }
        i += STEP;
        have = next;
        if (next) {
#pragma unroll
            for (int u = 0; u < UNROLL; ++u) cur[u] = nxt[u];
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

template <int MAX_M, int UNROLL, bool PIPE = false>
__device__ __forceinline__ void gemv_impl(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                          const __nv_bfloat16* __restrict__ residual, __nv_bfloat16* __restrict__ y,
                                          int M, int N, int K, int epi) {
    const int lane = threadIdx.x & 31;
    const int n = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const int kv = K / 8;
    const uint4* wr = reinterpret_cast<const uint4*>(w) + (size_t)n * kv;
    // The first weight vectors in flight before the wait (not for the
    // pipelined variant, which keeps its own loads ahead).
    const bool pre = !PIPE && n < N && kv >= 32 * UNROLL;
    uint4 p0[UNROLL];
    if (pre) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) p0[u] = load_stream(wr + lane + 32 * u);
    }
    pdl_wait();
    pdl_launch_dependents();
    if (n >= N) return;
    float acc[MAX_M];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[m] = 0.f;
    if (pre) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m < M) {
                const uint4* xr = reinterpret_cast<const uint4*>(x) + (size_t)m * kv;
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) acc[m] += dot8(p0[u], xr[lane + 32 * u]);
            }
        }
    }
    if (PIPE)
        row_dot_pipe<MAX_M, UNROLL>(wr, x, M, kv, acc, lane);
    else
        row_dot<MAX_M, UNROLL>(wr, x, M, kv, acc, lane, pre ? lane + 32 * UNROLL : lane);
    if (epi == 2) {
        // Second row: up_proj row n sits N rows further down.
        float up[MAX_M];
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) up[m] = 0.f;
        if (PIPE)
            row_dot_pipe<MAX_M, UNROLL>(reinterpret_cast<const uint4*>(w) + (size_t)(n + N) * kv, x, M, kv, up, lane);
        else
            row_dot<MAX_M, UNROLL>(reinterpret_cast<const uint4*>(w) + (size_t)(n + N) * kv, x, M, kv, up, lane, lane);
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

// Column n of y from its sums (one lane): epi 0 y = acc; epi 1 y = bf16(acc)
// + residual (rounded as a separate add would); epi 2 y = silu(bf16(acc)) *
// bf16(up) (transformers rounds gate and up to bf16 before silu(gate) * up).
template <int MAX_M>
__device__ __forceinline__ void store_col(__nv_bfloat16* __restrict__ y, const __nv_bfloat16* __restrict__ residual,
                                          int M, int N, int n, int epi, const float acc[MAX_M],
                                          const float up[MAX_M]) {
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m < M) {
            if (epi == 2) {
                const float g = __bfloat162float(__float2bfloat16(acc[m]));
                const float u = __bfloat162float(__float2bfloat16(up[m]));
                y[(size_t)m * N + n] = silu_gate_bf16(g, u);
            } else {
                float v = acc[m];
                if (epi == 1) v = __bfloat162float(__float2bfloat16(v)) + __bfloat162float(residual[(size_t)m * N + n]);
                y[(size_t)m * N + n] = __float2bfloat16(v);
            }
        }
    }
}

// Each output column split over two warps (the K halves; 4 warps, 2 columns
// a CTA of 128 threads), the halves summed through shared memory: twice the
// warps for few-column projections (Llama-3-8B's O: 4096 columns against
// ~3200-3600 resident warps on an H200, i.e. 1.1-1.3 waves of whole rows).
template <int MAX_M, int UNROLL>
__device__ __forceinline__ void gemv_split_impl(const __nv_bfloat16* __restrict__ w,
                                                const __nv_bfloat16* __restrict__ x,
                                                const __nv_bfloat16* __restrict__ residual,
                                                __nv_bfloat16* __restrict__ y, int M, int N, int K, int epi) {
    __shared__ float part[4][2][MAX_M];  // [warp][gate, up][row]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = blockIdx.x * 2 + (warp >> 1);
    const int half = warp & 1;
    const int kv = K / 8;
    const int mid = min(kv, (kv / 2 + 31) / 32 * 32);
    const int i0 = half ? mid + lane : lane, end = half ? kv : mid;
    float acc[MAX_M], up[MAX_M];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) acc[m] = up[m] = 0.f;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    // This warp's first weight vectors in flight before the wait.
    const bool pre = n < N && i0 + 32 * (UNROLL - 1) < end;
    uint4 p0[UNROLL];
    if (pre) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) p0[u] = load_stream(wv + (size_t)n * kv + i0 + 32 * u);
    }
    pdl_wait();
    pdl_launch_dependents();
    if (pre) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            if (m < M) {
                const uint4* xr = reinterpret_cast<const uint4*>(x) + (size_t)m * kv;
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) acc[m] += dot8(p0[u], xr[i0 + 32 * u]);
            }
        }
    }
    if (n < N) {
        row_dot_range<MAX_M, UNROLL>(wv + (size_t)n * kv, x, M, kv, acc, lane, pre ? i0 + 32 * UNROLL : i0, end);
        if (epi == 2) row_dot_range<MAX_M, UNROLL>(wv + (size_t)(n + N) * kv, x, M, kv, up, lane, i0, end);
    }
    if (lane == 0 && half == 1) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            part[warp][0][m] = acc[m];
            part[warp][1][m] = up[m];
        }
    }
    __syncthreads();
    if (lane == 0 && half == 0 && n < N) {
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) {
            acc[m] += part[warp + 1][0][m];
            up[m] += part[warp + 1][1][m];
        }
        store_col<MAX_M>(y, residual, M, N, n, epi, acc, up);
    }
}

// RMSNorm fused into the projection that follows it (epi 0 or 2 only): x is
// the residual stream [M, K]; the product is taken over
//   h[m, k] = bf16(x[m, k] * rsqrt(mean_k(x[m, :]^2) + eps) * gamma[k])
// (candle's rms_norm, one rounding), which each CTA computes once into
// shared memory (M * K * 2 bytes, dynamic); the CTAs are persistent (the
// grid is what fits on the GPU at once) and their warps walk the output
// columns with a grid stride, so the prologue is paid once per CTA. A decode
// step then has no separate norm kernel (4 us each on the H200 at batch 1,
// two a layer), and the prologue's reads of x overlap each warp's first
// weight loads, which it issues before the prologue.
template <int MAX_M, int UNROLL>
__device__ __forceinline__ void gemv_norm_impl(const __nv_bfloat16* __restrict__ w, const __nv_bfloat16* __restrict__ x,
                                               const __nv_bfloat16* __restrict__ gamma, __nv_bfloat16* __restrict__ y,
                                               int M, int N, int K, int epi, float eps) {
    extern __shared__ uint4 hs[];  // [M][K / 8] vectors of h
    __shared__ float part[32][MAX_M];
    __shared__ float scale[MAX_M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int kv = K / 8;
    const uint4* wv = reinterpret_cast<const uint4*>(w);
    // 1. This warp's first weight vectors in flight before the prologue.
    const int n0 = blockIdx.x * warps + warp;
    const bool pre = n0 < N && kv >= 32 * UNROLL;
    // (Only the first row's: the gated epilogue's second row waits, or the
    // registers of both spill.)
    uint4 p0[UNROLL];
    if (pre) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) p0[u] = load_stream(wv + (size_t)n0 * kv + lane + 32 * u);
    }
    // 2. x into shared memory, with each row's sum of squares (x is the
    // previous kernel's output: from here on it must have finished).
    pdl_wait();
    pdl_launch_dependents();
    const uint4* xv = reinterpret_cast<const uint4*>(x);
    float ss[MAX_M];
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) ss[m] = 0.f;
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
        if (m < M) {
            for (int i = threadIdx.x; i < kv; i += blockDim.x) {
                const uint4 v = xv[(size_t)m * kv + i];
                hs[m * kv + i] = v;
                const __nv_bfloat162* v2 = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __bfloat1622float2(v2[j]);
                    ss[m] = fmaf(f.x, f.x, ss[m]);
                    ss[m] = fmaf(f.y, f.y, ss[m]);
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < MAX_M; ++m) {
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss[m] += __shfl_xor_sync(0xffffffff, ss[m], o);
        if (lane == 0) part[warp][m] = ss[m];
    }
    __syncthreads();
    if (threadIdx.x < MAX_M && threadIdx.x < M) {
        float t = 0.f;
        for (int i = 0; i < warps; ++i) t += part[i][threadIdx.x];
        scale[threadIdx.x] = rsqrtf(t / (float)K + eps);
    }
    __syncthreads();
    // 3. h = x * scale * gamma in place (each thread its own vectors).
    const uint4* gv = reinterpret_cast<const uint4*>(gamma);
    for (int i = threadIdx.x; i < kv; i += blockDim.x) {
        const uint4 g = gv[i];
        const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&g);
        for (int m = 0; m < M; ++m) {
            uint4 v = hs[m * kv + i];
            __nv_bfloat162* v2 = reinterpret_cast<__nv_bfloat162*>(&v);
            const float s = scale[m];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float2 f = __bfloat1622float2(v2[j]);
                const float2 a = __bfloat1622float2(g2[j]);
                v2[j] = __floats2bfloat162_rn(s * f.x * a.x, s * f.y * a.y);
            }
            hs[m * kv + i] = v;
        }
    }
    __syncthreads();
    // 4. The products over h, the first column starting with the prefetched vectors.
    const __nv_bfloat16* h = reinterpret_cast<const __nv_bfloat16*>(hs);
    for (int n = n0; n < N; n += gridDim.x * warps) {
        float acc[MAX_M], up[MAX_M];
#pragma unroll
        for (int m = 0; m < MAX_M; ++m) acc[m] = up[m] = 0.f;
        const bool first = pre && n == n0;
        if (first) {
#pragma unroll
            for (int m = 0; m < MAX_M; ++m) {
                if (m < M) {
#pragma unroll
                    for (int u = 0; u < UNROLL; ++u) acc[m] += dot8(p0[u], hs[m * kv + lane + 32 * u]);
                }
            }
        }
        row_dot<MAX_M, UNROLL>(wv + (size_t)n * kv, h, M, kv, acc, lane, first ? lane + 32 * UNROLL : lane);
        if (epi == 2) row_dot<MAX_M, UNROLL>(wv + (size_t)(n + N) * kv, h, M, kv, up, lane, lane);
        if (lane == 0) store_col<MAX_M>(y, nullptr, M, N, n, epi, acc, up);  // epi 0 or 2: no residual
    }
}
