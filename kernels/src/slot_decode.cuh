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
// the whole group. Warps take keys in turn; lane l owns dims 4l..4l+3. Each
// warp keeps, per query head, the running max m, sum l and unnormalised
// output (online softmax); the block merges its warps in shared memory and
// writes the split's (m, l, o) to the partial buffers, which the combine
// kernel (slot_decode_combine) merges with log-sum-exp weights:
//   out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p,   M = max_p m_p.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

constexpr int DEC_HEAD_DIM = 128;
constexpr int DEC_WARPS = 4;
// Keys a warp loads before using any of them (bytes in flight); fewer for
// the large groups, whose per-head state already fills the registers.
template <int GROUP>
__host__ __device__ constexpr int keys_in_flight() { return GROUP >= 7 ? 2 : 4; }

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
    constexpr int KEYS_IN_FLIGHT = keys_in_flight<GROUP>();
    const int seq_len = seq_lens[b];
    const int per_split = (seq_len + splits - 1) / splits;
    const int start = split * per_split;
    const int end = min(seq_len, start + per_split);

    // This lane's 4 dims of the group's queries, pre-scaled.
    float qv[GROUP][4];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        {
            load4(q + ((size_t)b * heads + kvh * group + g) * DEC_HEAD_DIM + lane * 4, qv[g]);
#pragma unroll
            for (int d = 0; d < 4; ++d) qv[g][d] *= scale;
        }
    }
    float m[GROUP], l[GROUP], acc[GROUP][4];
#pragma unroll
    for (int g = 0; g < GROUP; ++g) {
        m[g] = -INFINITY;
        l[g] = 0.f;
#pragma unroll
        for (int d = 0; d < 4; ++d) acc[g][d] = 0.f;
    }
    const size_t row = (size_t)kv_heads * DEC_HEAD_DIM;
    const size_t base = (size_t)slots[b] * max_len * row + (size_t)kvh * DEC_HEAD_DIM + lane * 4;
    // Each warp takes KEYS_IN_FLIGHT keys per iteration (positions
    // pos, pos + 4, ...): their K and V rows are loaded before any of them is
    // used, so that enough bytes are in flight to approach the bandwidth.
    // Software pipelining: the next iteration's rows are loaded while this
    // iteration's are used.
    float kf[KEYS_IN_FLIGHT][4], vf[KEYS_IN_FLIGHT][4];
    auto load_rows = [&](int pos0, float (*kd)[4], float (*vd)[4]) {
#pragma unroll
        for (int u = 0; u < KEYS_IN_FLIGHT; ++u) {
            const int pos = max(min(pos0 + u * DEC_WARPS, end - 1), 0);  // a valid row; masked below
            load4(k_cache + base + (size_t)pos * row, kd[u]);
            load4(v_cache + base + (size_t)pos * row, vd[u]);
        }
    };
    if (start + warp < end) load_rows(start + warp, kf, vf);
    for (int pos0 = start + warp; pos0 < end; pos0 += DEC_WARPS * KEYS_IN_FLIGHT) {
        float kn[KEYS_IN_FLIGHT][4], vn[KEYS_IN_FLIGHT][4];
        const int next = pos0 + DEC_WARPS * KEYS_IN_FLIGHT;
        if (next < end) load_rows(next, kn, vn);
#pragma unroll
        for (int u = 0; u < KEYS_IN_FLIGHT; ++u) {
            const bool valid = pos0 + u * DEC_WARPS < end;  // uniform across the warp
#pragma unroll
            for (int g = 0; g < GROUP; ++g) {
                float s = qv[g][0] * kf[u][0] + qv[g][1] * kf[u][1] + qv[g][2] * kf[u][2] + qv[g][3] * kf[u][3];
#pragma unroll
                for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffff, s, o);
                if (valid) {
                    const float m_new = fmaxf(m[g], s);
                    const float alpha = __expf(m[g] - m_new), p = __expf(s - m_new);
                    l[g] = l[g] * alpha + p;
#pragma unroll
                    for (int d = 0; d < 4; ++d) acc[g][d] = acc[g][d] * alpha + p * vf[u][d];
                    m[g] = m_new;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < KEYS_IN_FLIGHT; ++u)
#pragma unroll
            for (int d = 0; d < 4; ++d) {
                kf[u][d] = kn[u][d];
                vf[u][d] = vn[u][d];
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
