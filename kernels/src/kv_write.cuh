// Writing a step's new keys/values into the KV cache layouts.
//
// Index vocabulary: a step has `num_tokens` new tokens; token t's K (or V) row
// is `src[t * src_stride .. + kv_heads * head_dim]` laid out [kv_heads, head_dim].
//
// Paged layout (vLLM v0.2.7), one tensor per layer:
//   K: [num_blocks, kv_heads, head_dim / x, block_size, x]   x = 16 bytes of elements
//   V: [num_blocks, kv_heads, head_dim, block_size]
//   slot = block * block_size + offset, from `slot_mapping[t]` (-1: skip the token).
// Per-slot layout (vAttention), one K and one V region per layer:
//   [max_seqs, max_len, kv_heads, head_dim]; row = slot * max_len + position, from `rows[t]`.
//
// One thread block per token; threads stride over the token's row. Both are
// memory-bound copies: K moves 16-byte chunks (contiguous in source and
// destination), V scatters elements (stride block_size in the destination).
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

template <typename T>
__device__ __forceinline__ void paged_write_k(T* __restrict__ cache, const T* __restrict__ src,
                                              const int64_t* __restrict__ slot_mapping, int64_t src_stride,
                                              int kv_heads, int head_dim, int block_size) {
    const int64_t t = blockIdx.x;
    const int64_t slot = slot_mapping[t];
    if (slot < 0) return;
    constexpr int x = 16 / sizeof(T);
    const int64_t block = slot / block_size, offset = slot % block_size;
    const int chunks_per_head = head_dim / x;
    const int chunks = kv_heads * chunks_per_head;
    const T* row = src + t * src_stride;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const int h = c / chunks_per_head, dc = c % chunks_per_head;
        const int64_t dst = (((block * kv_heads + h) * chunks_per_head + dc) * block_size + offset) * x;
        *reinterpret_cast<uint4*>(cache + dst) = *reinterpret_cast<const uint4*>(row + c * x);
    }
}

template <typename T>
__device__ __forceinline__ void paged_write_v(T* __restrict__ cache, const T* __restrict__ src,
                                              const int64_t* __restrict__ slot_mapping, int64_t src_stride,
                                              int kv_heads, int head_dim, int block_size) {
    const int64_t t = blockIdx.x;
    const int64_t slot = slot_mapping[t];
    if (slot < 0) return;
    const int64_t block = slot / block_size, offset = slot % block_size;
    const int n = kv_heads * head_dim;
    const T* row = src + t * src_stride;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        const int h = i / head_dim, d = i % head_dim;
        cache[((block * kv_heads + h) * head_dim + d) * block_size + offset] = row[i];
    }
}

// Whole rows of `row_elems` elements; the Rust side guarantees that
// row_elems * sizeof(T) and src_stride * sizeof(T) are multiples of 16 bytes.
template <typename T>
__device__ __forceinline__ void slot_write(T* __restrict__ cache, const T* __restrict__ src,
                                           const int64_t* __restrict__ rows, int64_t src_stride,
                                           int row_elems) {
    const int64_t t = blockIdx.x;
    const int64_t row = rows[t];
    if (row < 0) return;
    const uint4* s = reinterpret_cast<const uint4*>(src + t * src_stride);
    uint4* d = reinterpret_cast<uint4*>(cache + row * row_elems);
    const int n = row_elems * (int)sizeof(T) / 16;
    for (int i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}
