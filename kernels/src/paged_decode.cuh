// PagedAttention decode, the baseline: the algorithm of vLLM v0.2.7's
// `paged_attention_v1/v2` kernels (csrc/attention/attention_kernels.cu of
// that release), for bf16, head_dim 128 and 128 threads per block, written
// for this project. Deliberately without what vLLM added later (GQA
// sharing of K/V reads across the query heads of a group, FP8 caches,
// multi-step / FlashInfer paths): one thread block per (query head,
// sequence[, partition]) reads the K/V of its KV head on its own, as the
// baseline the papers measured did.
//
//   q:            [rows, heads, 128]; decode b reads packed row q_rows[b]
//   K cache:      [num_blocks, kv_heads, 128 / X, BLOCK, X]   X = 8 (16 bytes of bf16)
//   V cache:      [num_blocks, kv_heads, 128, BLOCK]
//   block_tables: [batch, max_blocks] int32; context_lens[b] keys per decode (the new one included)
//   grid:         v1 (heads, batch);  v2 (heads, batch, max_partitions)
//
// Per block:
//  1. Q goes to shared memory, split into vectors among the THREAD_GROUP
//     threads of a group (2 threads for BLOCK 16, else 1).
//  2. Each warp takes KV blocks warp, warp + 4, ...; within a block each
//     thread group takes one token (BLOCK > 32: one token per 32), reads its
//     K vectors through the block table and the group reduces q.k with
//     shuffles; the logits go to shared memory (a float per token of the
//     partition, or of the whole context for v1).
//  3. Block-wide max, exp, sum and normalisation of the logits (softmax in
//     the natural-log domain, 1e-6 added to the sum as vLLM does).
//  4. P V: each warp again walks its KV blocks; a thread holds 8 tokens'
//     probabilities (converted to bf16, as vLLM converts them to the cache
//     type) and accumulates rows (dims) of V in f32; lanes of one row reduce
//     with shuffles, the 4 warps through shared memory (a tree).
//  5. v1 writes the output row; v2 writes the partition's output (bf16,
//     vLLM's tmp_out) with its max logit and exp sum, and
//     `paged_decode_reduce` merges the partitions.
#pragma once
#include <cuda_bf16.h>
#include <float.h>
#include <stdint.h>

constexpr int PD_HEAD = 128;
constexpr int PD_THREADS = 128;
constexpr int PD_WARPS = PD_THREADS / 32;
constexpr int PD_X = 8;  // elements per 16 bytes
constexpr int PD_PARTITION = 512;

// N bf16 values loaded and stored as one vector.
template <int N>
struct alignas(2 * N) BfVec {
    __nv_bfloat162 h[N / 2];
};

template <int N>
__device__ __forceinline__ float dot(const BfVec<N>& a, const BfVec<N>& b) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < N / 2; ++i) {
        const float2 x = __bfloat1622float2(a.h[i]), y = __bfloat1622float2(b.h[i]);
        s = fmaf(x.x, y.x, s);
        s = fmaf(x.y, y.y, s);
    }
    return s;
}

// Block-wide sum of 4 warps' values; `red` holds PD_WARPS floats.
__device__ __forceinline__ float pd_block_sum(float* red, float v) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int m = 16; m >= 1; m /= 2) v += __shfl_xor_sync(0xffffffff, v, m);
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < PD_WARPS ? red[lane] : 0.f;
#pragma unroll
    for (int m = PD_WARPS / 2; m >= 1; m /= 2) v += __shfl_xor_sync(0xffffffff, v, m);
    return __shfl_sync(0xffffffff, v, 0);
}

// Dynamic shared memory of a launch: the logits of a partition (or of the
// whole padded context for v1), at least the output reduction's buffer.
__host__ __device__ constexpr int pd_smem_floats(int tokens) {
    return tokens > (PD_WARPS / 2) * PD_HEAD ? tokens : (PD_WARPS / 2) * PD_HEAD;
}

// PARTITION == 0: v1 (the whole context in one block, output to `out`);
// otherwise v2: block z takes tokens [z * PARTITION, (z + 1) * PARTITION).
template <int BLOCK, int PARTITION>
__device__ __forceinline__ void paged_decode(float* __restrict__ exp_sums, float* __restrict__ max_logits,
                                             __nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,
                                             const int32_t* __restrict__ q_rows,
                                             const __nv_bfloat16* __restrict__ k_cache,
                                             const __nv_bfloat16* __restrict__ v_cache,
                                             const int32_t* __restrict__ block_tables,
                                             const int32_t* __restrict__ context_lens, int max_blocks, int heads,
                                             int kv_heads, float scale) {
    constexpr int TG = BLOCK < 32 ? 32 / BLOCK : 1;          // threads per group (one token)
    constexpr int GROUPS = PD_THREADS / TG;                  // thread groups per block
    constexpr int TOKENS_PER_GROUP = (BLOCK + 31) / 32;      // tokens a group takes per KV block
    constexpr int VEC = 16 / (TG * 2) > 1 ? 16 / (TG * 2) : 1;  // q/k elements per vector
    constexpr int VECS = PD_HEAD / (TG * VEC);               // vectors per thread
    constexpr int V_VEC = 8 < BLOCK ? 8 : BLOCK;             // tokens per V vector
    constexpr int V_VECS_PER_ROW = BLOCK / V_VEC;
    constexpr int ROWS_PER_ITER = 32 / V_VECS_PER_ROW;
    constexpr int ROWS_PER_THREAD = (PD_HEAD + ROWS_PER_ITER - 1) / ROWS_PER_ITER;
    static_assert(32 % TG == 0 && VECS * TG * VEC == PD_HEAD, "head split among the group");

    const int head = blockIdx.x, b = blockIdx.y, part = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int ctx = context_lens[b];
    if (PARTITION > 0 && part * PARTITION >= ctx) return;  // nothing in this partition
    const int num_blocks = (ctx + BLOCK - 1) / BLOCK;
    const int blocks_per_part = PARTITION > 0 ? PARTITION / BLOCK : num_blocks;
    const int start_block = PARTITION > 0 ? part * blocks_per_part : 0;
    const int end_block = min(start_block + blocks_per_part, num_blocks);
    const int start_tok = start_block * BLOCK;
    const int end_tok = min(end_block * BLOCK, ctx);
    const int ntok = end_tok - start_tok;

    const int group_idx = threadIdx.x / TG, group_off = threadIdx.x % TG;
    const int kvh = head / (heads / kv_heads);
    const int64_t block_stride = (int64_t)kv_heads * PD_HEAD * BLOCK;
    const int64_t head_stride = (int64_t)PD_HEAD * BLOCK;
    const int32_t* table = block_tables + (int64_t)b * max_blocks;

    extern __shared__ __align__(16) float pd_smem[];
    float* logits = pd_smem;
    __shared__ float red[2 * PD_WARPS];
    __shared__ BfVec<VEC> q_vecs[TG][VECS];

    // 1. Q to shared memory: group offset o holds vectors o, o + TG, ...
    const __nv_bfloat16* qp = q + ((int64_t)q_rows[b] * heads + head) * PD_HEAD;
    for (int i = group_idx; i < VECS; i += GROUPS)
        q_vecs[group_off][i] = reinterpret_cast<const BfVec<VEC>*>(qp)[group_off + i * TG];
    __syncthreads();

    // 2. q.k for every token of the partition.
    float qk_max = -FLT_MAX;
    for (int blk = start_block + warp; blk < end_block; blk += PD_WARPS) {
        const int64_t phys = table[blk];
        const __nv_bfloat16* kb = k_cache + phys * block_stride + kvh * head_stride;
#pragma unroll
        for (int i = 0; i < TOKENS_PER_GROUP; ++i) {
            const int off = (group_idx + i * 32) % BLOCK;
            const int tok = blk * BLOCK + off;
            float qk = 0.f;
#pragma unroll
            for (int j = 0; j < VECS; ++j) {
                const int e = (group_off + j * TG) * VEC;  // first element of the vector
                const BfVec<VEC> kv =
                    *reinterpret_cast<const BfVec<VEC>*>(kb + (e / PD_X) * BLOCK * PD_X + off * PD_X + e % PD_X);
                qk += dot(q_vecs[group_off][j], kv);
            }
#pragma unroll
            for (int m = TG / 2; m >= 1; m /= 2) qk += __shfl_xor_sync(0xffffffff, qk, m);
            qk *= scale;
            if (group_off == 0) {
                const bool masked = tok >= ctx;
                logits[tok - start_tok] = masked ? 0.f : qk;
                qk_max = masked ? qk_max : fmaxf(qk_max, qk);
            }
        }
    }

    // 3. Softmax over the partition.
#pragma unroll
    for (int m = 16; m >= TG; m /= 2) qk_max = fmaxf(qk_max, __shfl_xor_sync(0xffffffff, qk_max, m));
    if (lane == 0) red[warp] = qk_max;
    __syncthreads();
    qk_max = lane < PD_WARPS ? red[lane] : -FLT_MAX;
#pragma unroll
    for (int m = PD_WARPS / 2; m >= 1; m /= 2) qk_max = fmaxf(qk_max, __shfl_xor_sync(0xffffffff, qk_max, m));
    qk_max = __shfl_sync(0xffffffff, qk_max, 0);

    float exp_sum = 0.f;
    for (int i = threadIdx.x; i < ntok; i += PD_THREADS) {
        const float v = __expf(logits[i] - qk_max);
        logits[i] = v;
        exp_sum += v;
    }
    exp_sum = pd_block_sum(&red[PD_WARPS], exp_sum);
    const float inv_sum = __fdividef(1.f, exp_sum + 1e-6f);
    for (int i = threadIdx.x; i < ntok; i += PD_THREADS) logits[i] *= inv_sum;
    __syncthreads();
    const int64_t part_idx = ((int64_t)b * heads + head) * gridDim.z + part;
    if (PARTITION > 0 && threadIdx.x == 0) {
        max_logits[part_idx] = qk_max;
        exp_sums[part_idx] = exp_sum;
    }

    // 4. P V.
    float accs[ROWS_PER_THREAD];
#pragma unroll
    for (int i = 0; i < ROWS_PER_THREAD; ++i) accs[i] = 0.f;
    for (int blk = start_block + warp; blk < end_block; blk += PD_WARPS) {
        const int64_t phys = table[blk];
        const int off = (lane % V_VECS_PER_ROW) * V_VEC;
        const int tok = blk * BLOCK + off;
        BfVec<V_VEC> p;
#pragma unroll
        for (int j = 0; j < V_VEC / 2; ++j)
            p.h[j] = __floats2bfloat162_rn(logits[tok - start_tok + 2 * j], logits[tok - start_tok + 2 * j + 1]);
        const __nv_bfloat16* vb = v_cache + phys * block_stride + kvh * head_stride;
#pragma unroll
        for (int i = 0; i < ROWS_PER_THREAD; ++i) {
            const int row = lane / V_VECS_PER_ROW + i * ROWS_PER_ITER;
            if (row < PD_HEAD) {
                BfVec<V_VEC> v = *reinterpret_cast<const BfVec<V_VEC>*>(vb + row * BLOCK + off);
                if (blk == num_blocks - 1) {
                    // Values past the context may be anything (even NaN): zero them.
                    __nv_bfloat16* e = reinterpret_cast<__nv_bfloat16*>(&v);
#pragma unroll
                    for (int j = 0; j < V_VEC; ++j)
                        if (tok + j >= ctx) e[j] = __float2bfloat16(0.f);
                }
                accs[i] += dot(p, v);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < ROWS_PER_THREAD; ++i) {
        float a = accs[i];
#pragma unroll
        for (int m = V_VECS_PER_ROW / 2; m >= 1; m /= 2) a += __shfl_xor_sync(0xffffffff, a, m);
        accs[i] = a;
    }
    __syncthreads();  // the logits are no longer read: their memory takes the warps' rows
    float* out_smem = pd_smem;
#pragma unroll
    for (int i = PD_WARPS; i > 1; i /= 2) {
        const int mid = i / 2;
        if (warp >= mid && warp < i) {
            float* dst = out_smem + (warp - mid) * PD_HEAD;
#pragma unroll
            for (int r = 0; r < ROWS_PER_THREAD; ++r) {
                const int row = lane / V_VECS_PER_ROW + r * ROWS_PER_ITER;
                if (row < PD_HEAD && lane % V_VECS_PER_ROW == 0) dst[row] = accs[r];
            }
        }
        __syncthreads();
        if (warp < mid) {
            const float* src = out_smem + warp * PD_HEAD;
#pragma unroll
            for (int r = 0; r < ROWS_PER_THREAD; ++r) {
                const int row = lane / V_VECS_PER_ROW + r * ROWS_PER_ITER;
                if (row < PD_HEAD && lane % V_VECS_PER_ROW == 0) accs[r] += src[row];
            }
        }
        __syncthreads();
    }

    // 5. Output: the row (v1) or the partition's row of tmp_out (v2).
    if (warp == 0) {
        __nv_bfloat16* o = PARTITION > 0 ? out + part_idx * PD_HEAD : out + ((int64_t)q_rows[b] * heads + head) * PD_HEAD;
#pragma unroll
        for (int r = 0; r < ROWS_PER_THREAD; ++r) {
            const int row = lane / V_VECS_PER_ROW + r * ROWS_PER_ITER;
            if (row < PD_HEAD && lane % V_VECS_PER_ROW == 0) o[row] = __float2bfloat16(accs[r]);
        }
    }
}

// v2's reduce: grid (heads, batch), 128 threads, 2 * max_partitions floats of
// dynamic shared memory. out = sum_p tmp_out_p * exp_sum_p e^(max_p - M) / sum_p exp_sum_p e^(max_p - M).
__device__ __forceinline__ void paged_decode_reduce(__nv_bfloat16* __restrict__ out,
                                                    const float* __restrict__ exp_sums,
                                                    const float* __restrict__ max_logits,
                                                    const __nv_bfloat16* __restrict__ tmp_out,
                                                    const int32_t* __restrict__ q_rows,
                                                    const int32_t* __restrict__ context_lens, int heads,
                                                    int max_partitions) {
    const int head = blockIdx.x, b = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int parts = (context_lens[b] + PD_PARTITION - 1) / PD_PARTITION;
    const int64_t base = ((int64_t)b * heads + head) * max_partitions;
    __nv_bfloat16* o = out + ((int64_t)q_rows[b] * heads + head) * PD_HEAD;
    const __nv_bfloat16* t = tmp_out + base * PD_HEAD;
    if (parts == 1) {
        for (int i = threadIdx.x; i < PD_HEAD; i += PD_THREADS) o[i] = t[i];
        return;
    }
    extern __shared__ __align__(16) float pd_smem[];
    float* shared_max = pd_smem;
    float* shared_exp = pd_smem + max_partitions;
    __shared__ float red[2 * PD_WARPS];
    float mx = -FLT_MAX;
    for (int i = threadIdx.x; i < parts; i += PD_THREADS) {
        const float l = max_logits[base + i];
        shared_max[i] = l;
        mx = fmaxf(mx, l);
    }
    __syncthreads();
#pragma unroll
    for (int m = 16; m >= 1; m /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, m));
    if (lane == 0) red[warp] = mx;
    __syncthreads();
    mx = lane < PD_WARPS ? red[lane] : -FLT_MAX;
#pragma unroll
    for (int m = PD_WARPS / 2; m >= 1; m /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, m));
    mx = __shfl_sync(0xffffffff, mx, 0);

    float sum = 0.f;
    for (int i = threadIdx.x; i < parts; i += PD_THREADS) {
        const float e = exp_sums[base + i] * __expf(shared_max[i] - mx);
        shared_exp[i] = e;
        sum += e;
    }
    __syncthreads();
    sum = pd_block_sum(&red[PD_WARPS], sum);
    const float inv = __fdividef(1.f, sum + 1e-6f);
    for (int i = threadIdx.x; i < PD_HEAD; i += PD_THREADS) {
        float acc = 0.f;
        for (int p = 0; p < parts; ++p) acc += __bfloat162float(t[p * PD_HEAD + i]) * shared_exp[p] * inv;
        o[i] = __float2bfloat16(acc);
    }
}
