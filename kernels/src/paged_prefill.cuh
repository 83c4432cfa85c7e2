// Causal prefill (prompt chunks at any offset) over vLLM's paged layout: the
// FlashAttention-2-style tile loop of slot_prefill.cuh with a KV source that
// finds each key through the chunk's block table.
//
//   K cache: [num_blocks, kv_heads, 128 / 8, BLOCK, 8]   V cache: [num_blocks, kv_heads, 128, BLOCK]
//   key p of the chunk's sequence: block tables[chunk * max_blocks + p / BLOCK], offset p % BLOCK
//
// vLLM v0.2.7 had no chunked prefill over a paged context (its prompts ran
// through xformers on the new tokens only); this is what our `paged`
// backend needs so that it can run every batch the scheduler makes. The K
// tile is [64 keys][128] as in the per-slot kernel: a warp copies chunk c of
// 32 consecutive keys (16 bytes each, consecutive in a block). V's layout
// keeps 8 consecutive keys of one dimension in 16 bytes, so its tile is
// stored by dimension ([128][64]) and read with plain ldmatrix.
#pragma once
#include "slot_prefill.cuh"

template <int THREADS>
struct PagedKv {
    static constexpr bool V_BY_DIM = true;
    static constexpr bool WG = false;
    const __nv_bfloat16* k;  // cache + kv_head * 128 * BLOCK
    const __nv_bfloat16* v;
    const int32_t* table;    // the chunk's block table
    int64_t block_stride;    // kv_heads * 128 * BLOCK elements
    int block_log2;
    __device__ __forceinline__ void wait(uint32_t, int, int, int, int, int, int) const {}
    __device__ __forceinline__ void load(uint32_t ks, uint32_t vs, int t0, int n_keys, int /*stage*/) const {
        const int bs = 1 << block_log2;
        static_assert(PF_TILE_N * ATT_ROW_CHUNKS % THREADS == 0, "whole chunks per thread");
#pragma unroll
        for (int j = 0; j < PF_TILE_N * ATT_ROW_CHUNKS / THREADS; ++j) {
            const int i = threadIdx.x + j * THREADS;
            const int r = i % PF_TILE_N, c = i / PF_TILE_N;
            const int p = t0 + r;
            const bool ok = p < n_keys;
            const __nv_bfloat16* src = k;
            if (ok) src = k + (int64_t)__ldg(table + (p >> block_log2)) * block_stride + ((c * bs) + (p & (bs - 1))) * 8;
            cp_async16(ks + tile_off(r, c), src, ok);
        }
#pragma unroll
        for (int j = 0; j < ATT_HEAD_DIM * (PF_TILE_N / 8) / THREADS; ++j) {
            const int i = threadIdx.x + j * THREADS;
            const int c = i % (PF_TILE_N / 8), d = i / (PF_TILE_N / 8);
            const int p = t0 + 8 * c;
            const int n = min(max(n_keys - p, 0), 8);
            const __nv_bfloat16* src = v;
            if (n > 0) src = v + (int64_t)__ldg(table + (p >> block_log2)) * block_stride + d * bs + (p & (bs - 1));
            cp_async16_n(vs + vdim_off(d, c), src, 2 * n);
        }
    }
};
