// Split-KV decode attention ("flash-decoding") over the per-slot
// (vAttention) layout: keys and values of a sequence are contiguous in its
// slot, addressed by (slot, position) with plain strides, no block table.
//
//   K, V:  [max_seqs, max_len, kv_heads, head_dim]  (bf16, head_dim 128)
//   q:     [batch, heads, head_dim]; query head h reads KV head h / group
//   grid:  (splits, kv_heads, batch); block: 4 warps
//
// A block takes one KV head of one sequence and one split of its keys, and
// all `group` query heads of that KV head, so each K/V row is read once for
// the whole group. Warps take tiles of 32 keys in turn, one key per lane for
// the scores, one 4-dim slice per lane for P V. Each warp keeps, per query
// head, the running max m, sum l and unnormalised output (online softmax);
// the block merges its warps in shared memory and writes the split's
// (m, l, o) to the partial buffers, which the combine kernel
// (slot_decode_combine) merges with log-sum-exp weights:
//   out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p,   M = max_p m_p.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

constexpr int DEC_HEAD_DIM = 128;
constexpr int DEC_WARPS = 4;

__device__ __forceinline__ void load4(const __nv_bfloat16* p, float out[4]) {
    const uint2 raw = *reinterpret_cast<const uint2*>(p);
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&raw);
    const float2 a = __bfloat1622float2(h[0]), b = __bfloat1622float2(h[1]);
    out[0] = a.x; out[1] = a.y; out[2] = b.x; out[3] = b.y;
}

// GROUP (query heads per KV head) is a compile-time constant so that the
// per-head state lives in registers (a runtime group spilled it to local
// memory: 0.64 TB/s instead of the bandwidth).
template <int GROUP>
__device__ __forceinline__ void slot_decode_split(
    const __nv_bfloat16* __restrict__ q, const __nv_bfloat16* __restrict__ k_cache,
    const __nv_bfloat16* __restrict__ v_cache, const int32_t* __restrict__ slots,
    const int32_t* __restrict__ seq_lens, float* __restrict__ part_o, float* __restrict__ part_ml,
    int heads, int kv_heads, int max_len, int splits, float scale) {
    const int split = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int group = GROUP;
    const int seq_len = seq_lens[b];
    const int per_split = (seq_len + splits - 1) / splits;
    const int start = split * per_split;
    const int end = min(seq_len, start + per_split);

    // The group's queries, pre-scaled, in shared memory: every lane reads
    // them (broadcast) against its own key.
    __shared__ __align__(16) float qs[GROUP][DEC_HEAD_DIM];
    for (int i = threadIdx.x; i < GROUP * DEC_HEAD_DIM; i += blockDim.x) {
        const int g = i / DEC_HEAD_DIM, d = i % DEC_HEAD_DIM;
        qs[g][d] = __bfloat162float(q[((size_t)b * heads + kvh * group + g) * DEC_HEAD_DIM + d]) * scale;
    }
    __syncthreads();

    float m[GROUP], l[GROUP], acc[GROUP][4];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int d = 0; d < 4; ++d) acc[g][d] = 0.f;
    }
    const size_t row = (size_t)kv_heads * DEC_HEAD_DIM;
    const __nv_bfloat16* kbase = k_cache + (size_t)slots[b] * max_len * row + (size_t)kvh * DEC_HEAD_DIM;
    const __nv_bfloat16* vbase = v_cache + (size_t)slots[b] * max_len * row + (size_t)kvh * DEC_HEAD_DIM;
    // Tiles of 32 keys, one key per lane, taken by the warps in turn. Scores:
    // each lane dots its key with the group's queries (no shuffles, one exp
    // per key and head). Then P V: lane l owns dims 4l..4l+3 and accumulates
    // every key of the tile, its probability broadcast from the key's lane.
    for (int t0 = start + warp * 32; t0 < end; t0 += DEC_WARPS * 32) {
        const int key = t0 + lane;
        const bool valid = key < end;
        float s[GROUP];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) s[g] = 0.f;
        if (valid) {
            const uint4* kr = reinterpret_cast<const uint4*>(kbase + (size_t)key * row);
#pragma unroll 4
            for (int c = 0; c < DEC_HEAD_DIM / 8; ++c) {
                const uint4 raw = kr[c];
                const __nv_bfloat162* h2 = reinterpret_cast<const __nv_bfloat162*>(&raw);
                float kf[8];
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    const float2 f = __bfloat1622float2(h2[j]);
                    kf[2 * j] = f.x;
                    kf[2 * j + 1] = f.y;
                }
#pragma unroll
                for (int g = 0; g < GROUP; ++g) {
                    const float4 qa = *reinterpret_cast<const float4*>(&qs[g][c * 8]);
                    const float4 qb = *reinterpret_cast<const float4*>(&qs[g][c * 8 + 4]);
                    s[g] += qa.x * kf[0] + qa.y * kf[1] + qa.z * kf[2] + qa.w * kf[3] + qb.x * kf[4] + qb.y * kf[5] +
                            qb.z * kf[6] + qb.w * kf[7];
                }
            }
        }
        float p[GROUP];
#pragma unroll
        for (int g = 0; g < GROUP; ++g) {
            float tmax = valid ? s[g] : -INFINITY;
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffff, tmax, o));
            const float m_new = fmaxf(m[g], tmax);
            const float alpha = __expf(m[g] - m_new);
            p[g] = valid ? __expf(s[g] - m_new) : 0.f;
            float psum = p[g];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffff, psum, o);
            l[g] = l[g] * alpha + psum;
#pragma unroll
            for (int d = 0; d < 4; ++d) acc[g][d] *= alpha;
            m[g] = m_new;
        }
        const int n = min(32, end - t0);
        for (int j = 0; j < n; ++j) {
            float vf[4];
            load4(vbase + (size_t)(t0 + j) * row + lane * 4, vf);
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                const float pj = __shfl_sync(0xffffffff, p[g], j);
#pragma unroll
                for (int d = 0; d < 4; ++d) acc[g][d] += pj * vf[d];
            }
        }
    }
    // Merge the warps: shared (m, l) per warp and head, then o.
    __shared__ float sm[DEC_WARPS][GROUP], sl[DEC_WARPS][GROUP];
    __shared__ float so[DEC_WARPS][GROUP][DEC_HEAD_DIM];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        {
            if (lane == 0) {
                sm[warp][g] = m[g];
                sl[warp][g] = l[g];
            }
#pragma unroll
            for (int d = 0; d < 4; ++d) so[warp][g][lane * 4 + d] = acc[g][d];
        }
    }
    __syncthreads();
    // Thread t merges dim t % 128 of heads g = t / 128, t / 128 + 4, ...
    for (int idx = threadIdx.x; idx < group * DEC_HEAD_DIM; idx += blockDim.x) {
        const int g = idx / DEC_HEAD_DIM, d = idx % DEC_HEAD_DIM;
        float big = -INFINITY;
        for (int w = 0; w < DEC_WARPS; ++w) big = fmaxf(big, sm[w][g]);
        float lsum = 0.f, o = 0.f;
        for (int w = 0; w < DEC_WARPS; ++w) {
            if (sm[w][g] == -INFINITY) continue;  // a warp that saw no key
            const float wgt = __expf(sm[w][g] - big);
            lsum += wgt * sl[w][g];
            o += wgt * so[w][g][d];
        }
        const size_t h = (size_t)b * heads + kvh * group + g;
        part_o[(h * splits + split) * DEC_HEAD_DIM + d] = o;
        if (d == 0) {
            part_ml[(h * splits + split) * 2] = big;
            part_ml[(h * splits + split) * 2 + 1] = lsum;
        }
    }
}

__device__ __forceinline__ void slot_decode_merge(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                                  __nv_bfloat16* __restrict__ out, int splits) {
    const size_t h = blockIdx.x;  // (batch, head)
    const int d = threadIdx.x;
    float big = -INFINITY;
    for (int p = 0; p < splits; ++p) big = fmaxf(big, part_ml[(h * splits + p) * 2]);
    float lsum = 0.f, o = 0.f;
    for (int p = 0; p < splits; ++p) {
        const float mp = part_ml[(h * splits + p) * 2];
        if (mp == -INFINITY) continue;  // an empty split
        const float wgt = __expf(mp - big);
        lsum += wgt * part_ml[(h * splits + p) * 2 + 1];
        o += wgt * part_o[(h * splits + p) * DEC_HEAD_DIM + d];
    }
    out[h * DEC_HEAD_DIM + d] = __float2bfloat16(o / lsum);
}
