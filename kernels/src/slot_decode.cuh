// Split-KV decode attention ("flash-decoding") over the per-slot
// (vAttention) layout: the keys and values of a sequence are contiguous in
// its slot, addressed by (slot, position) with plain strides, no block table.
//
//   K, V rows:  base + slot * slot_stride + position * pos_stride  (elements;
//               the KV head's 128 dims follow at + kv_head * 128)
//   q:          [rows, heads, 128]; decode b reads packed row q_rows[b]
//   grid:       (splits, kv_heads, batch); block: 4 warps; 96 KiB dynamic smem
//
// A block takes one KV head of one sequence and one split of its keys, and
// all `group` (<= 16) query heads of that KV head as the 16 rows of an MMA
// tile (padded with zeros), so each K/V row is read once for the whole
// group, on tensor cores. Keys come in tiles of 64 through a 3-stage cp.async
// pipeline (64 KiB in flight per block; the POD kernel's 3-per-SM variant
// uses 2 stages); each warp takes 16 keys of a tile
// and keeps its own online softmax; the warps merge in shared memory and
// write the split's (m, l, o) to the partial buffers, merged with log-sum-exp
// weights (log2 domain):
//   out = sum_p 2^(m_p - M) o_p / sum_p 2^(m_p - M) l_p,   M = max_p m_p.
// With `counters` (one zeroed int per (sequence, KV head)), the last split
// block of a (sequence, KV head) to finish does that merge itself and resets
// its counter (no second launch); without, slot_decode_combine does it.
//
// slot_decode_split_t is the same split with the products transposed (GQA
// groups <= 8 on the MMA's N side): half the registers, for the slim decode
// (slot_decode_slim_bf16, 104 registers, 2 stages, 64 KiB) that shares its
// SMs with slot_prefill_wsps_bf16; slot_decode_slimr_bf16 runs it with a
// ring of K and V slots a warp (decode_warp_ring) in the same 64 KiB.
#pragma once
#include "attn_mma.cuh"

constexpr int DEC_WARPS = 4;
constexpr int DEC_TILE = 64;
constexpr int DEC_STAGES = 3;
constexpr int DEC_STAGE_BYTES = 2 * DEC_TILE * ATT_ROW_BYTES;
constexpr int DEC_SMEM = DEC_STAGES * DEC_STAGE_BYTES;

// The end of a split (slot_decode_split, slot_decode_split_t): the WARPS
// warps' (m, l) and o per query row of the group, in shared memory as
// sm [WARPS][16], sl [WARPS][16], so [WARPS][16][128] (f32, log2 domain),
// merged into the split's partials; with `counters`, the last split of the
// (sequence, KV head) merges them all into `out`.
template <int WARPS, typename Ctx>
__device__ __forceinline__ void slot_decode_split_finish(uint8_t* smem, const int32_t* __restrict__ q_rows,
                                                         float* __restrict__ part_o, float* __restrict__ part_ml,
                                                         int* __restrict__ counters, __nv_bfloat16* __restrict__ out,
                                                         int heads, int group, int splits, int split, int kvh, int b,
                                                         int kv_heads, Ctx ctx) {
    constexpr int THREADS = WARPS * 32;
    auto sync = [&] { ctx.sync(); };
    const int tid = threadIdx.x % THREADS;
    float* sm = reinterpret_cast<float*>(smem);  // [WARPS][16]
    float* sl = sm + WARPS * 16;                  // [WARPS][16]
    float* so = sl + WARPS * 16;                  // [WARPS][16][128]
    sync();
    for (int idx = tid; idx < group * ATT_HEAD_DIM; idx += THREADS) {
        const int row = idx / ATT_HEAD_DIM, d = idx % ATT_HEAD_DIM;
        float big = -INFINITY;
        for (int w = 0; w < WARPS; ++w) big = fmaxf(big, sm[w * 16 + row]);
        float lsum = 0.f, acc = 0.f;
        if (big != -INFINITY) {
            for (int w = 0; w < WARPS; ++w) {
                const float wgt = exp2f(sm[w * 16 + row] - big);  // 0 for a warp that saw no key
                lsum += wgt * sl[w * 16 + row];
                acc += wgt * so[(w * 16 + row) * ATT_HEAD_DIM + d];
            }
        }
        const size_t h = (size_t)b * heads + (size_t)kvh * group + row;
        part_o[(h * splits + split) * ATT_HEAD_DIM + d] = acc;
        if (d == 0) {
            part_ml[(h * splits + split) * 2] = big;
            part_ml[(h * splits + split) * 2 + 1] = lsum;
        }
    }
    if (counters == nullptr) return;
    // Fused combine: the last block of this (sequence, KV head) merges.
    // One flag per thread group of the block (pod_wsd_bf16 runs two; a block
    // has at most 1024 threads = 8 groups).
    __shared__ bool last_of[1024 / THREADS];
    bool& last = last_of[threadIdx.x / THREADS];
    __threadfence();
    sync();
    if (tid == 0) last = atomicAdd(&counters[b * kv_heads + kvh], 1) == splits - 1;
    sync();
    if (!last) return;
    __threadfence();
    // Split weights 2^(m_p - M) per row in shared memory (the pipeline's
    // buffers are free now), then every (row, dim) sums its splits with
    // independent loads.
    float* wts = reinterpret_cast<float*>(smem);  // [group][splits]
    float* inv = wts + group * splits;            // [group]: 1 / sum_p w_p l_p
    const size_t h0 = (size_t)b * heads + (size_t)kvh * group;
    for (int i = tid; i < group * splits; i += THREADS)
        wts[i] = __ldcg(&part_ml[((h0 + i / splits) * splits + i % splits) * 2]);
    sync();
    if (tid < group) {
        const int row = tid;
        float big = -INFINITY;
        for (int p = 0; p < splits; ++p) big = fmaxf(big, wts[row * splits + p]);
        float lsum = 0.f;
        for (int p = 0; p < splits; ++p) {
            const float mp = wts[row * splits + p];
            const float w = mp == -INFINITY ? 0.f : exp2f(mp - big);  // 0 for an empty split
            wts[row * splits + p] = w;
            lsum += w * __ldcg(&part_ml[((h0 + row) * splits + p) * 2 + 1]);
        }
        inv[row] = 1.f / lsum;
    }
    sync();
    for (int idx = tid; idx < group * ATT_HEAD_DIM; idx += THREADS) {
        const int row = idx / ATT_HEAD_DIM, d = idx % ATT_HEAD_DIM;
        const float* po = part_o + (h0 + row) * splits * ATT_HEAD_DIM + d;
        float acc = 0.f;
#pragma unroll 8
        for (int p = 0; p < splits; ++p) acc += wts[row * splits + p] * __ldcg(po + (size_t)p * ATT_HEAD_DIM);
        out[((size_t)q_rows[b] * heads + (size_t)kvh * group + row) * ATT_HEAD_DIM + d] = __float2bfloat16(acc * inv[row]);
    }
    if (tid == 0) counters[b * kv_heads + kvh] = 0;  // ready for the next launch
}

// The keys [x, y) of split `split` of `splits` (even shares of seq_len; the
// last ones may be short or empty).
__device__ __forceinline__ int2 decode_split_range(int seq_len, int splits, int split) {
    const int per_split = (seq_len + splits - 1) / splits;
    const int start = min(seq_len, split * per_split);
    return make_int2(start, min(seq_len, start + per_split));
}

// Runs `tile(ks, vs, t0)` on every K/V tile of the keys [start, end) of
// one slot (rows kb / vb + position * pos_stride): tiles of 16 x WARPS keys
// through a STAGES-deep cp.async pipeline at smem0 (STAGES x 2 tiles), the
// next ones loading while `tile` runs; ks and vs are the stage's K and V
// tiles, t0 the tile's first key (warp w takes keys t0 + 16 w ..). Ends with
// every load waited for and the group synced: the stages are free again.
template <int STAGES, int WARPS, typename Ctx, typename Tile>
__device__ __forceinline__ void decode_split_tiles(const __nv_bfloat16* kb, const __nv_bfloat16* vb, int64_t pos_stride,
                                                   int start, int end, uint32_t smem0, Ctx ctx, Tile tile) {
    constexpr int THREADS = WARPS * 32, TILE = 16 * WARPS, STAGE_BYTES = 2 * TILE * ATT_ROW_BYTES;
    const int ntiles = (end - start + TILE - 1) / TILE;
    auto load = [&](int i, int stage) {
        const int t0 = start + i * TILE;
        const uint32_t ks = smem0 + stage * STAGE_BYTES, vs = ks + TILE * ATT_ROW_BYTES;
        auto valid = [&](int r) { return t0 + r < end; };
        load_tile<TILE, THREADS>(ks, [&](int r) { return kb + (size_t)(t0 + r) * pos_stride; }, valid);
        load_tile<TILE, THREADS>(vs, [&](int r) { return vb + (size_t)(t0 + r) * pos_stride; }, valid);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < ntiles) load(s, s);
        cp_async_commit();
    }
    for (int i = 0; i < ntiles; ++i) {
        cp_async_wait<STAGES - 2>();
        ctx.sync();
        if (i + STAGES - 1 < ntiles) load(i + STAGES - 1, (i + STAGES - 1) % STAGES);
        cp_async_commit();
        const uint32_t ks = smem0 + (i % STAGES) * STAGE_BYTES;
        tile(ks, ks + TILE * ATT_ROW_BYTES, start + i * TILE);
    }
    cp_async_wait<0>();
    ctx.sync();
}

// decode_split_tiles with a ring a warp (slot_decode_slimr_bf16): each warp
// streams its own keys of every (16 x WARPS)-key tile (warp w: keys
// t0 + 16 w .. + 16, as there) through SLOTS slots of 16 rows (4 KiB) of its
// own at smem0 + w * SLOTS * 4 KiB, K and V of a tile in two slots one after
// the other, and refills a slot as soon as it has read it. So SLOTS - 1
// slots of every warp are in flight while it computes, where the
// block-wide pipeline of 2 stages keeps at most one tile in flight and then
// waits for all of it; and the warps meet at no barrier in the loop, only
// their own (__syncwarp). k_step(ks, t0) then v_step(vs) run for every tile,
// ks / vs shifted so that the rows 16 w .. of tile_off's block-wide layout
// address the warp's slot (the swizzle depends on the row mod 8 only). The
// same shared memory as decode_split_tiles<SLOTS / 2> (2 x SLOTS x 16 rows x
// WARPS / 2). Ends with every load waited for and the group synced.
template <int SLOTS, int WARPS, typename Ctx, typename KStep, typename VStep>
__device__ __forceinline__ void decode_warp_ring(const __nv_bfloat16* kb, const __nv_bfloat16* vb, int64_t pos_stride,
                                                 int start, int end, uint32_t smem0, Ctx ctx, KStep k_step,
                                                 VStep v_step) {
    constexpr int THREADS = WARPS * 32, TILE = 16 * WARPS, SLOT_BYTES = 16 * ATT_ROW_BYTES;
    static_assert(SLOTS >= 2, "a slot to read and one to fill");
    const int warp = (threadIdx.x % THREADS) / 32, lane = threadIdx.x % 32;
    const int ntiles = (end - start + TILE - 1) / TILE, halves = 2 * ntiles;
    const uint32_t ring = smem0 + warp * SLOTS * SLOT_BYTES;
    const uint32_t shift = warp * 16 * ATT_ROW_BYTES;  // rows 16 w .. of tile_off
    // Half-tile h: the K (h even) or V (h odd) rows of tile h / 2, into slot
    // h % SLOTS; rows past `end` as zeros (read from nowhere: the address is
    // the slot's first row, mapped for any sequence). A lane copies chunk
    // lane % 16 of rows lane / 16 + 2 j, j < 8.
    auto load = [&](int h) {
        const int r0 = lane / ATT_ROW_CHUNKS, c0 = lane % ATT_ROW_CHUNKS;
        const int k0 = start + (h / 2) * TILE + warp * 16 + r0;
        const __nv_bfloat16* base = h % 2 == 0 ? kb : vb;
        const __nv_bfloat16* row = base + (size_t)k0 * pos_stride + c0 * 8;
        // tile_off(r0 + 2 j, c0): row r0 + 2 j, chunk c0 ^ ((r0 + 2 j) % 8),
        // where (r0 + 2 j) % 8 = r0 ^ 2 (j % 4) (r0 < 2): one XOR a row from
        // the offset of row r0 (the slot's base needs no alignment for it).
        const uint32_t slot = ring + (h % SLOTS) * SLOT_BYTES;
        const uint32_t off = r0 * ATT_ROW_BYTES + ((c0 ^ r0) << 4);
#pragma unroll
        for (int j = 0; j < 16 * ATT_ROW_CHUNKS / 32; ++j) {
            const bool ok = k0 + 2 * j < end;
            cp_async16(slot + (off ^ ((2 * (j % 4)) << 4)) + 2 * j * ATT_ROW_BYTES, ok ? row : base, ok);
            row += 2 * pos_stride;
        }
    };
    // Half-tile h, waited for: first the slot that h - 1 was read from (by
    // every lane: the warp barrier) is refilled with h + SLOTS - 1, one
    // commit group a half-tile (empty past the end, so the count holds).
    auto next = [&](int h) -> uint32_t {
        __syncwarp();
        if (h + SLOTS - 1 < halves) load(h + SLOTS - 1);
        cp_async_commit();
        cp_async_wait<SLOTS - 1>();
        __syncwarp();  // the other lanes' copies too
        return ring + (h % SLOTS) * SLOT_BYTES - shift;
    };
#pragma unroll
    for (int s = 0; s < SLOTS - 1; ++s) {
        if (s < halves) load(s);
        cp_async_commit();
    }
    for (int i = 0; i < ntiles; ++i) {
        k_step(next(2 * i), start + i * TILE);
        v_step(next(2 * i + 1));
    }
    cp_async_wait<0>();
    ctx.sync();
}

// One split of one (sequence b, KV head kvh), run by the DEC_WARPS warps of
// a 128-thread group that meet at `ctx.sync()` in the shared memory of
// `ctx.region()` (WholeBlock in the plain and the 1-role POD kernels; a
// warpgroup's WarpGroupPart in pod_wsd_bf16's decode blocks),
// through a STAGES-deep pipeline (STAGES * DEC_STAGE_BYTES of shared memory;
// the warps' merge needs 33 KiB of it).
//
// WARPS: the warps of the group (4 in every kernel); a K/V tile has 16 keys
// a warp (decode_split_tiles).
template <int STAGES, typename Ctx, int WARPS = DEC_WARPS>
__device__ __forceinline__ void slot_decode_split(
    const __nv_bfloat16* __restrict__ q, const int32_t* __restrict__ q_rows, const __nv_bfloat16* __restrict__ k_base,
    const __nv_bfloat16* __restrict__ v_base, const int32_t* __restrict__ slots, const int32_t* __restrict__ seq_lens,
    float* __restrict__ part_o, float* __restrict__ part_ml, int* __restrict__ counters,
    __nv_bfloat16* __restrict__ out, int heads, int group, int64_t slot_stride, int64_t pos_stride, int splits,
    float scale, int split, int kvh, int b, int kv_heads, Ctx ctx) {
    constexpr int THREADS = WARPS * 32, TILE = 16 * WARPS, STAGE_BYTES = 2 * TILE * ATT_ROW_BYTES;
    static_assert(STAGES >= 2 && STAGES * STAGE_BYTES >= WARPS * 16 * (ATT_HEAD_DIM + 2) * 4, "the merge reuses the stages");
    uint8_t* smem = ctx.region();
    const int warp = (threadIdx.x % THREADS) / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int2 keys = decode_split_range(seq_lens[b], splits, split);
    const int start = keys.x, end = keys.y;
    const float qk_scale = scale * ATT_LOG2E;

    // The group's query rows as A fragments (rows >= group are zero).
    uint32_t qa[8][4];
    {
        const __nv_bfloat16* qh = q + ((size_t)q_rows[b] * heads + (size_t)kvh * group) * ATT_HEAD_DIM;
        auto ld = [&](int row, int col) -> uint32_t {
            return row < group ? *reinterpret_cast<const uint32_t*>(qh + row * ATT_HEAD_DIM + col) : 0u;
        };
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            qa[kk][0] = ld(g, 16 * kk + 2 * t);
            qa[kk][1] = ld(g + 8, 16 * kk + 2 * t);
            qa[kk][2] = ld(g, 16 * kk + 8 + 2 * t);
            qa[kk][3] = ld(g + 8, 16 * kk + 8 + 2 * t);
        }
    }
    const size_t slot_off = (size_t)slots[b] * slot_stride + (size_t)kvh * ATT_HEAD_DIM;
    const __nv_bfloat16* kb = k_base + slot_off;
    const __nv_bfloat16* vb = v_base + slot_off;

    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    RowState st;
    decode_split_tiles<STAGES, WARPS>(kb, vb, pos_stride, start, end, smem_addr(smem), ctx,
                                      [&](uint32_t ks, uint32_t vs, int t0) {
        float s[2][4] = {};
        qk_16(s, qa, ks, warp * 16, lane);
        const int key0 = t0 + warp * 16;
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                s[n][e] = key0 + n * 8 + 2 * t + (e & 1) < end ? s[n][e] * qk_scale : -INFINITY;
        online_softmax<2>(st, s, o);
        uint32_t pa[4];
        p_to_a(pa, s[0], s[1]);
        pv_16(o, pa, vs, warp * 16, lane);
    });

    // Merge the warps: (m, l) and o per warp and row in shared memory.
    float* sm = reinterpret_cast<float*>(smem);  // [WARPS][16]
    float* sl = sm + WARPS * 16;                  // [WARPS][16]
    float* so = sl + WARPS * 16;                  // [WARPS][16][128]
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l = quad_sum(st.l[r]);
        const int row = g + 8 * r;
        if (t == 0) {
            sm[warp * 16 + row] = st.m[r];
            sl[warp * 16 + row] = l;
        }
#pragma unroll
        for (int d = 0; d < 16; ++d) {
            so[(warp * 16 + row) * ATT_HEAD_DIM + 8 * d + 2 * t] = o[d][2 * r];
            so[(warp * 16 + row) * ATT_HEAD_DIM + 8 * d + 2 * t + 1] = o[d][2 * r + 1];
        }
    }
    slot_decode_split_finish<WARPS>(smem, q_rows, part_o, part_ml, counters, out, heads, group, splits, split, kvh, b,
                                    kv_heads, ctx);
}

// The transpose of an 8 x 8 b16 matrix held in the mma fragment layout.
__device__ __forceinline__ uint32_t movmatrix_t(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}

// slot_decode_split with the products transposed, for GQA groups of at most
// 8 query heads (the host checks): S^T (16 keys x 8 heads) = K q^T with K as
// the A operand (from shared memory) and q^T as B fragments (16 registers a
// thread: the group's heads on the MMA's N side, not padded to 16 rows), and
// O^T (128 dims x 8 heads) += V^T P^T, P^T from S^T's accumulators by
// movmatrix. Each warp takes 16 keys of every (16 x WARPS)-key tile. O^T is
// 32 f32 a thread instead of 64 and q 16 registers instead of 32: the slim
// decode (slot_decode_slim_bf16) runs it in 104 registers a thread, one warp
// per SM sub-partition beside a slot_prefill_wsps_bf16 block. RING: the keys
// through decode_warp_ring (a ring a warp, slot_decode_slimr_bf16) instead
// of decode_split_tiles.
template <int STAGES, typename Ctx, int WARPS = DEC_WARPS, bool RING = false>
__device__ __forceinline__ void slot_decode_split_t(
    const __nv_bfloat16* __restrict__ q, const int32_t* __restrict__ q_rows, const __nv_bfloat16* __restrict__ k_base,
    const __nv_bfloat16* __restrict__ v_base, const int32_t* __restrict__ slots, const int32_t* __restrict__ seq_lens,
    float* __restrict__ part_o, float* __restrict__ part_ml, int* __restrict__ counters,
    __nv_bfloat16* __restrict__ out, int heads, int group, int64_t slot_stride, int64_t pos_stride, int splits,
    float scale, int split, int kvh, int b, int kv_heads, Ctx ctx) {
    constexpr int THREADS = WARPS * 32, TILE = 16 * WARPS, STAGE_BYTES = 2 * TILE * ATT_ROW_BYTES;
    static_assert(STAGES >= 2 && STAGES * STAGE_BYTES >= WARPS * 16 * (ATT_HEAD_DIM + 2) * 4, "the merge reuses the stages");
    uint8_t* smem = ctx.region();
    const int lane = threadIdx.x % 32, warp = (threadIdx.x % THREADS) / 32, g = lane / 4, t = lane % 4, m8 = lane / 8;
    const int2 keys = decode_split_range(seq_lens[b], splits, split);
    const int start = keys.x, end = keys.y;
    const float qk_scale = scale * ATT_LOG2E;

    // q^T of the group's heads as B fragments: column g = head g (zero past
    // the group), rows = dims 16 kk + 2t, +1 (and + 8).
    uint32_t qb[8][2];
    {
        const __nv_bfloat16* qh = q + ((size_t)q_rows[b] * heads + (size_t)kvh * group) * ATT_HEAD_DIM;
        auto ld = [&](int col) -> uint32_t {
            return g < group ? *reinterpret_cast<const uint32_t*>(qh + g * ATT_HEAD_DIM + col) : 0u;
        };
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            qb[kk][0] = ld(16 * kk + 2 * t);
            qb[kk][1] = ld(16 * kk + 8 + 2 * t);
        }
    }
    const size_t slot_off = (size_t)slots[b] * slot_stride + (size_t)kvh * ATT_HEAD_DIM;
    const __nv_bfloat16* kb = k_base + slot_off;
    const __nv_bfloat16* vb = v_base + slot_off;

    float o[8][4];  // O^T: dims 16 dm + g (+ 8) x heads 2t, 2t + 1
#pragma unroll
    for (int d = 0; d < 8; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    float mx_run[2] = {-INFINITY, -INFINITY};  // heads 2t, 2t + 1 (log2 domain)
    float l_run[2] = {0.f, 0.f};               // this thread's keys' part of the sums
    uint32_t pb0, pb1;  // P^T of the tile, from k_step to v_step
    auto k_step = [&](uint32_t ks, int t0) {
        // S^T: keys warp * 16 + g (+ 8) x heads 2t, 2t + 1.
        float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < 8; ++kk) {
            uint32_t a[4];
            ldsm_x4(ks + tile_off(warp * 16 + (m8 % 2) * 8 + lane % 8, 2 * kk + m8 / 2), a[0], a[1], a[2], a[3]);
            mma_bf16(s, a, qb[kk][0], qb[kk][1]);
        }
        const int key0 = t0 + warp * 16;
#pragma unroll
        for (int e = 0; e < 4; ++e) s[e] = key0 + g + 8 * (e / 2) < end ? s[e] * qk_scale : -INFINITY;
        // Online softmax per head column: the max over this warp's 16 keys
        // (two keys a thread, eight lanes a column).
        float alpha[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            float mx = fmaxf(s[h], s[2 + h]);
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 4));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 8));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 16));
            const float m_new = fmaxf(mx_run[h], mx);
            // A column that has seen no key yet keeps exponent base 0 (no inf - inf).
            const float base = m_new == -INFINITY ? 0.f : m_new;
            alpha[h] = exp2f(mx_run[h] - base);
            s[h] = exp2f(s[h] - base);
            s[2 + h] = exp2f(s[2 + h] - base);
            l_run[h] = l_run[h] * alpha[h] + (s[h] + s[2 + h]);
            mx_run[h] = m_new;
        }
#pragma unroll
        for (int d = 0; d < 8; ++d) {
            o[d][0] *= alpha[0];
            o[d][1] *= alpha[1];
            o[d][2] *= alpha[0];
            o[d][3] *= alpha[1];
        }
        // P^T (16 keys x 8 heads) as B fragments: each 8 x 8 block of S^T's
        // accumulators (keys x heads) transposed.
        pb0 = movmatrix_t(pack_bf16(s[0], s[1]));
        pb1 = movmatrix_t(pack_bf16(s[2], s[3]));
    };
    auto v_step = [&](uint32_t vs) {
#pragma unroll
        for (int dm = 0; dm < 8; ++dm) {
            uint32_t a[4];
            ldsm_x4_t(vs + tile_off(warp * 16 + (m8 / 2) * 8 + lane % 8, 2 * dm + m8 % 2), a[0], a[1], a[2], a[3]);
            mma_bf16(o[dm], a, pb0, pb1);
        }
    };
    if constexpr (RING) {
        // Each warp its own ring (the same shared memory: 2 x STAGES slots).
        decode_warp_ring<2 * STAGES, WARPS>(kb, vb, pos_stride, start, end, smem_addr(smem), ctx, k_step, v_step);
    } else {
        decode_split_tiles<STAGES, WARPS>(kb, vb, pos_stride, start, end, smem_addr(smem), ctx,
                                          [&](uint32_t ks, uint32_t vs, int t0) {
            k_step(ks, t0);
            v_step(vs);
        });
    }

    // The warps' (m, l) and o per head (a row of slot_decode_split_finish's layout).
    float* sm = reinterpret_cast<float*>(smem);  // [WARPS][16]
    float* sl = sm + WARPS * 16;                  // [WARPS][16]
    float* so = sl + WARPS * 16;                  // [WARPS][16][128]
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        float l = l_run[h];
        l += __shfl_xor_sync(0xffffffffu, l, 4);
        l += __shfl_xor_sync(0xffffffffu, l, 8);
        l += __shfl_xor_sync(0xffffffffu, l, 16);
        const int row = 2 * t + h;
        if (g == 0) {
            sm[warp * 16 + row] = mx_run[h];
            sl[warp * 16 + row] = l;
        }
#pragma unroll
        for (int d = 0; d < 8; ++d) {
            so[(warp * 16 + row) * ATT_HEAD_DIM + 16 * d + g] = o[d][h];
            so[(warp * 16 + row) * ATT_HEAD_DIM + 16 * d + g + 8] = o[d][2 + h];
        }
    }
    slot_decode_split_finish<WARPS>(smem, q_rows, part_o, part_ml, counters, out, heads, group, splits, split, kvh, b,
                                    kv_heads, ctx);
}

// One block per (decode, head), one thread per dim; writes packed row q_rows[b].
__device__ __forceinline__ void slot_decode_merge(const float* __restrict__ part_o, const float* __restrict__ part_ml,
                                                  const int32_t* __restrict__ q_rows, __nv_bfloat16* __restrict__ out,
                                                  int heads, int splits) {
    const size_t h = blockIdx.x;  // b * heads + head
    const int d = threadIdx.x;
    float big = -INFINITY;
    for (int p = 0; p < splits; ++p) big = fmaxf(big, part_ml[(h * splits + p) * 2]);
    float lsum = 0.f, o = 0.f;
    for (int p = 0; p < splits; ++p) {
        const float mp = part_ml[(h * splits + p) * 2];
        if (mp == -INFINITY) continue;  // an empty split
        const float wgt = exp2f(mp - big);
        lsum += wgt * part_ml[(h * splits + p) * 2 + 1];
        o += wgt * part_o[(h * splits + p) * ATT_HEAD_DIM + d];
    }
    const size_t b = h / heads, head = h % heads;
    out[((size_t)q_rows[b] * heads + head) * ATT_HEAD_DIM + d] = __float2bfloat16(o / lsum);
}
