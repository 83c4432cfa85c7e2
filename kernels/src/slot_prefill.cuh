// FlashAttention-2-style causal prefill over the per-slot (vAttention)
// layout (or, through another KV source, vLLM's paged one), for a batch of query chunks at arbitrary offsets: chunk c has
// q_len[c] query rows (packed rows q_start[c] ..) at positions ctx[c] ..
// of its sequence, whose keys 0 .. ctx[c] + q_len[c] - 1 (the earlier
// context and the chunk's own rows, written before) are in slot slots[c].
// Query row j sees keys 0 ..= ctx[c] + j.
//
//   q, out:   [rows, heads, 128] bf16 (out rows of other sequences untouched)
//   K, V:     base + slot * slot_stride + position * pos_stride (+ kv_head * 128)
//   work:     (chunk, first query row) per query tile, heaviest first
//   grid:     (work items, heads); block: WARPS warps, a tile of 16 * WARPS query rows
//             (the POD kernel passes its own work item and head instead of blockIdx)
//
// Each warp owns 16 query rows (Q kept in registers as A fragments) and the
// whole key tile: S = Q K^T (16 x 64) and O += P V on tensor cores, online
// softmax in f32 (log2 domain), K/V tiles of 64 keys through a STAGES-deep
// cp.async pipeline shared by the warps. Masking only on tiles that cross
// the diagonal.
//
// Compiled for sm_90a (ATT_WGMMA) with a KV source that stores its tiles in
// the wg layout (SlotKv), each warpgroup (4 warps, 64 query rows) runs
// S = Q K^T and O += P V as warpgroup MMAs (wgmma, B from shared memory
// through descriptors) instead of per-warp mma.sync; the tile loop, masking
// and online softmax are the same (wgmma.cuh).
#pragma once
#include "attn_mma.cuh"
#include "wgmma.cuh"

constexpr int PF_TILE_N = 64;

template <int WARPS, int STAGES>
struct PrefillShape {
    static constexpr int BM = 16 * WARPS;
    static constexpr int THREADS = 32 * WARPS;
    static constexpr int Q_BYTES = BM * ATT_ROW_BYTES;
    static constexpr int STAGE_BYTES = 2 * PF_TILE_N * ATT_ROW_BYTES;
    // Q has no buffer of its own: it comes in through the last stage's,
    // which its first K/V tile fills only once Q is in registers. + 1 KiB:
    // the stages start at the next 1024-byte boundary (the wg layout's
    // swizzle atoms).
    static constexpr int SMEM = STAGES * STAGE_BYTES + 1024;
    static_assert(Q_BYTES <= STAGE_BYTES && STAGES >= 2, "Q goes through a stage buffer");
};

// load_tile_at into the wg layout (wgmma.cuh).
template <int ROWS, int THREADS, typename Src, typename Valid>
__device__ __forceinline__ void load_tile_wg(uint32_t tile, Src src, Valid valid) {
    load_tile_at<ROWS, THREADS>(tile, src, valid, [](int r, int c) { return wg_off<ROWS>(r, c); });
}

// Where a chunk's keys and values come from: `load(k_tile, v_tile, t0,
// n_keys, stage)` issues the copies of keys t0 .. t0 + 63 into the pipeline
// stage `stage` (zeros from n_keys on); `wait(v_tile, t0, n_keys, stage, use,
// tid, threads)`, called by every thread once the tile's commit group is in
// and before the block's barrier, completes what the commit groups do not
// cover (nothing for cp.async sources; the mbarrier of a TMA source,
// tma.cuh); `V_BY_DIM` says whether the V tile is stored by key ([64][128],
// read with ldmatrix.trans) or by dimension ([128][64], plain ldmatrix);
// `WG` says that both tiles are in the wg layout, for wgmma.

// The per-slot (vAttention) layout: rows base + position * pos_stride.
template <int THREADS>
struct SlotKv {
    static constexpr bool V_BY_DIM = false;
    static constexpr bool WG = ATT_WGMMA;
    const __nv_bfloat16* k;
    const __nv_bfloat16* v;
    int64_t pos_stride;
    __device__ __forceinline__ void wait(uint32_t, int, int, int, int, int, int) const {}
    __device__ __forceinline__ void load(uint32_t ks, uint32_t vs, int t0, int n_keys, int /*stage*/) const {
        auto valid = [&](int r) { return t0 + r < n_keys; };
        auto krow = [&](int r) { return k + (size_t)(t0 + r) * pos_stride; };
        auto vrow = [&](int r) { return v + (size_t)(t0 + r) * pos_stride; };
        if constexpr (WG) {
            load_tile_wg<PF_TILE_N, THREADS>(ks, krow, valid);
            load_tile_wg<PF_TILE_N, THREADS>(vs, vrow, valid);
        } else {
            load_tile<PF_TILE_N, THREADS>(ks, krow, valid);
            load_tile<PF_TILE_N, THREADS>(vs, vrow, valid);
        }
    }
};

// A warp's 16 rows of the Q tile at `qsm` (swizzled like the K/V tiles)
// as mma A fragments (qa[kk]: columns 16 kk .. 16 kk + 15).
__device__ __forceinline__ void q_fragments(uint32_t qsm, int warp, int lane, uint32_t (&qa)[8][4]) {
    const int m = lane / 8;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
        ldsm_x4(qsm + tile_off(warp * 16 + (m % 2) * 8 + lane % 8, 2 * kk + m / 2), qa[kk][0], qa[kk][1], qa[kk][2],
                qa[kk][3]);
}

// A warp's 16 x 64 score tile (keys t0 .. t0 + 63) scaled by qk_scale, the
// keys past each row's last (lim0 for row g, lim0 + 8 for row g + 8) at
// -inf; a tile below the diagonal for all 16 rows skips the compares.
__device__ __forceinline__ void scale_mask(float s[8][4], int t0, int lim0, int lane, float qk_scale) {
    if (t0 + PF_TILE_N - 1 > lim0 - lane / 4) {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                s[n][e] = t0 + n * 8 + 2 * (lane % 4) + (e & 1) <= lim0 + 8 * (e / 2) ? s[n][e] * qk_scale : -INFINITY;
    } else {
#pragma unroll
        for (int n = 0; n < 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] *= qk_scale;
    }
}

// A warp's 16 query rows (row0 .. row0 + 15 of the chunk starting at packed
// row qs; rows >= ql are padding) normalised into `out`.
__device__ __forceinline__ void store_rows(__nv_bfloat16* __restrict__ out, const float o[16][4], const RowState& st,
                                           int qs, int row0, int ql, int heads, int head, int lane) {
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int j = row0 + g + 8 * r;
        const float l = quad_sum(st.l[r]);
        if (j >= ql) continue;
        const float inv = 1.f / l;
        __nv_bfloat16* orow = out + ((size_t)(qs + j) * heads + head) * ATT_HEAD_DIM;
#pragma unroll
        for (int d = 0; d < 16; ++d)
            *reinterpret_cast<__nv_bfloat162*>(orow + 8 * d + 2 * t) =
                __floats2bfloat162_rn(o[d][2 * r] * inv, o[d][2 * r + 1] * inv);
    }
}

// A prefill work item as both tile functions start it: its chunk's geometry,
// its K/V source, the K/V stages (1024-aligned in the group's region) with Q's
// buffer in the last one, Q issued by cp.async as the oldest committed group,
// and the K/V tile loads.
template <typename S, int STAGES, typename Kv>
struct PrefillItem {
    int qs, ctx, ql, j0;
    int n_keys;  // keys the tile's last real row sees
    int ntiles;
    Kv kv;
    uint32_t kv0, qsm;
    __device__ __forceinline__ void load(int tile, int stage) const {
        const uint32_t ks = kv0 + stage * S::STAGE_BYTES;
        kv.load(ks, ks + PF_TILE_N * ATT_ROW_BYTES, tile * PF_TILE_N, n_keys, stage);
    }
    // K/V tiles 0 .. N - 1 into stages 0 .. N - 1, a cp.async group each.
    template <int N>
    __device__ __forceinline__ void prefetch() const {
#pragma unroll
        for (int s = 0; s < N; ++s) {
            if (s < ntiles) load(s, s);
            cp_async_commit();
        }
    }
};

template <typename S, int STAGES, typename MakeKv>
__device__ __forceinline__ auto prefill_item(const __nv_bfloat16* __restrict__ q, const int32_t* __restrict__ work,
                                             const int32_t* __restrict__ q_start,
                                             const int32_t* __restrict__ ctx_len, const int32_t* __restrict__ q_len,
                                             int heads, int group, MakeKv make_kv, int item, int head,
                                             uint8_t* smem) {
    const int kvh = head / group;
    const int chunk = work[2 * item], j0 = work[2 * item + 1];
    const int qs = q_start[chunk], ctx = ctx_len[chunk], ql = q_len[chunk];
    const int n_keys = ctx + min(ql, j0 + S::BM);
    const uint32_t kv0 = (smem_addr(smem) + 1023) & ~1023u;
    const PrefillItem<S, STAGES, decltype(make_kv(chunk, kvh))> it{
        qs, ctx, ql, j0, n_keys, (n_keys + PF_TILE_N - 1) / PF_TILE_N, make_kv(chunk, kvh), kv0,
        kv0 + (STAGES - 1) * S::STAGE_BYTES};
    load_tile<S::BM, S::THREADS>(
        it.qsm, [&](int r) { return q + ((size_t)(qs + j0 + r) * heads + head) * ATT_HEAD_DIM; },
        [&](int r) { return j0 + r < ql; });
    cp_async_commit();
    return it;
}

// The warpgroup's wgmma products of a 64-row tile, issued only (the callers
// fence, commit and wait): S (64 x 64) = Q K^T from Q's A fragments and the K
// tile at ks; O (64 x 128) += P V from P's A fragments and the V tile at vs.
__device__ __forceinline__ void wg_issue_qk(float s[8][4], const uint32_t qa[8][4], uint32_t ks) {
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
        wgmma_qk_m64n64k16(&s[0][0], qa[kk], wg_desc(ks + (kk / 4) * PF_TILE_N * 128 + (kk % 4) * 32, 16, 1024), kk);
}

__device__ __forceinline__ void wg_issue_pv(float o[16][4], const uint32_t pa[4][4], uint32_t vs) {
#pragma unroll
    for (int j = 0; j < 4; ++j)
        wgmma_pv_m64n128k16(&o[0][0], pa[j], wg_desc(vs + j * 16 * 128, PF_TILE_N * 128, 1024), 1);
}

template <int WARPS, int STAGES, typename MakeKv, typename Ctx = WholeBlock>
__device__ __forceinline__ void prefill_tile(const __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ out,
                                             const int32_t* __restrict__ work, const int32_t* __restrict__ q_start,
                                             const int32_t* __restrict__ ctx_len, const int32_t* __restrict__ q_len,
                                             int heads, int group, float scale, MakeKv make_kv, int item,
                                             int head, Ctx grp = {}) {
    using S = PrefillShape<WARPS, STAGES>;
    const auto it =
        prefill_item<S, STAGES>(q, work, q_start, ctx_len, q_len, heads, group, make_kv, item, head, grp.region());
    const int warp = threadIdx.x / 32 % WARPS, lane = threadIdx.x % 32, g = lane / 4;
    const float qk_scale = scale * ATT_LOG2E;
    using Kv = decltype(it.kv);
    static_assert(!Kv::WG || WARPS % 4 == 0, "wg-layout tiles need whole warpgroups (the mma.sync path reads tile_off)");
    constexpr bool WG = Kv::WG;
    it.template prefetch<STAGES - 1>();
    // Q (the oldest group) is in: its A fragments to registers, read before
    // the loop's first barrier, after which tile STAGES - 1 overwrites it.
    cp_async_wait<STAGES - 1>();
    grp.sync();
    uint32_t qa[8][4];
    q_fragments(it.qsm, warp, lane, qa);
    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    RowState st;
    // Row g (+ 8) of this warp sees keys <= lim0 (+ 8).
    const int lim0 = it.ctx + it.j0 + warp * 16 + g;
    // wgmma: a warpgroup's 64 rows see keys <= lim_wg.
    const int lim_wg = it.ctx + it.j0 + (warp / 4) * 64 + 63;
    for (int i = 0; i < it.ntiles; ++i) {
        cp_async_wait<STAGES - 2>();
        const uint32_t ks = it.kv0 + (i % STAGES) * S::STAGE_BYTES, vs = ks + PF_TILE_N * ATT_ROW_BYTES;
        const int t0 = i * PF_TILE_N;
        it.kv.wait(vs, t0, it.n_keys, i % STAGES, i / STAGES, threadIdx.x % S::THREADS, S::THREADS);
        if constexpr (WG) fence_proxy_async();
        grp.sync();
        if (i + STAGES - 1 < it.ntiles) it.load(i + STAGES - 1, (i + STAGES - 1) % STAGES);
        cp_async_commit();
        // This warp's (warpgroup's) rows see no key of the tile: nothing to
        // do (their state is unchanged by an all -inf tile).
        if (WG ? t0 > lim_wg : t0 > lim0 - g + 15) continue;
        float s[8][4] = {};
        if constexpr (WG) {
            wg_fence_operands<32>(&s[0][0]);
            wg_fence();
            wg_issue_qk(s, qa, ks);
            wg_commit();
            wg_wait<0>();
            wg_fence_operands<32>(&s[0][0]);
        } else {
            const int m = lane / 8;
#pragma unroll
            for (int kk = 0; kk < 8; ++kk) {
#pragma unroll
                for (int np = 0; np < 4; ++np) {
                    uint32_t b0, b1, b2, b3;
                    ldsm_x4(ks + tile_off(np * 16 + (m / 2) * 8 + lane % 8, 2 * kk + (m % 2)), b0, b1, b2, b3);
                    mma_bf16(s[2 * np], qa[kk], b0, b1);
                    mma_bf16(s[2 * np + 1], qa[kk], b2, b3);
                }
            }
        }
        scale_mask(s, t0, lim0, lane, qk_scale);
        online_softmax<8>(st, s, o);
        if constexpr (WG) {
            uint32_t pa[4][4];
#pragma unroll
            for (int j = 0; j < 4; ++j) p_to_a(pa[j], s[2 * j], s[2 * j + 1]);
            wg_fence_operands<64>(&o[0][0]);
            wg_fence();
            wg_issue_pv(o, pa, vs);
            wg_commit();
            wg_wait<0>();
            wg_fence_operands<64>(&o[0][0]);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                uint32_t pa[4];
                p_to_a(pa, s[2 * j], s[2 * j + 1]);
                if constexpr (Kv::V_BY_DIM)
                    pv_16_by_dim(o, pa, vs, 16 * j, lane);
                else
                    pv_16(o, pa, vs, 16 * j, lane);
            }
        }
    }
    cp_async_wait<0>();
    store_rows(out, o, st, it.qs, it.j0 + warp * 16, it.ql, heads, head, lane);
}

// prefill_tile for ONE warpgroup (4 warps, 64 query rows) with wgmma, its
// softmax overlapped with the tensor cores (FlashAttention-3's intra-warpgroup
// pipelining): iteration i issues S_i = Q K_i^T and O += P_{i-1} V_{i-1}
// together, waits for S_i only, runs tile i's softmax while the P V product
// is still on the tensor cores, then waits for it and rescales O. A lone
// warpgroup on an SM (the POD kernel's prefill role next to a decode block)
// otherwise leaves the tensor cores idle during every softmax.
//
// V_{i-1} stays in its stage until the next iteration, so a tile is loaded
// STAGES - 2 tiles ahead (STAGES >= 3 keeps prefill_tile<4, STAGES - 1>'s
// prefetch distance). Same arguments and results as prefill_tile<4, STAGES>.
// Without wgmma (not sm_90a) prefill_tile_pipelined runs prefill_tile<4, STAGES - 1>.
template <int STAGES, typename MakeKv, typename Ctx>
__device__ __forceinline__ void prefill_tile_pipelined_wg(const __nv_bfloat16* __restrict__ q,
                                                       __nv_bfloat16* __restrict__ out,
                                                       const int32_t* __restrict__ work,
                                                       const int32_t* __restrict__ q_start,
                                                       const int32_t* __restrict__ ctx_len,
                                                       const int32_t* __restrict__ q_len, int heads, int group,
                                                       float scale, MakeKv make_kv, int item, int head, Ctx grp) {
    using S = PrefillShape<4, STAGES>;
    static_assert(STAGES >= 3, "V of the previous tile holds a stage");
    const auto it =
        prefill_item<S, STAGES>(q, work, q_start, ctx_len, q_len, heads, group, make_kv, item, head, grp.region());
    const int warp = threadIdx.x / 32 % 4, lane = threadIdx.x % 32, g = lane / 4;
    const float qk_scale = scale * ATT_LOG2E;
    static_assert(decltype(it.kv)::WG, "wgmma tiles only");
    constexpr int AHEAD = STAGES - 2;  // tiles loaded before the loop
    it.template prefetch<AHEAD>();
    // Q (the oldest group) to registers; the last stage it passed through
    // is first refilled after the barrier of iteration 1.
    cp_async_wait<AHEAD>();
    grp.sync();
    uint32_t qa[8][4];
    q_fragments(it.qsm, warp, lane, qa);
    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    RowState st;
    const int lim0 = it.ctx + it.j0 + warp * 16 + g;
    uint32_t pa[4][4];      // P of the previous tile (A fragments)
    uint32_t vs_prev = 0;  // its V tile
    auto pv = [&] {
        wg_issue_pv(o, pa, vs_prev);
        wg_commit();
    };
    // Tile i is in, and every warp is past the wait for P_{i-2} V_{i-2}:
    // the stage of tile i - 2 is free for tile i + AHEAD.
    auto next_tile = [&](int i) {
        cp_async_wait<AHEAD - 1>();
        const uint32_t ks = it.kv0 + (i % STAGES) * S::STAGE_BYTES;
        it.kv.wait(ks + PF_TILE_N * ATT_ROW_BYTES, i * PF_TILE_N, it.n_keys, i % STAGES, i / STAGES,
                threadIdx.x % S::THREADS, S::THREADS);
        fence_proxy_async();
        grp.sync();
        if (i + AHEAD < it.ntiles) it.load(i + AHEAD, (i + AHEAD) % STAGES);
        cp_async_commit();
        return ks;
    };
    auto qk = [&](float s[8][4], uint32_t ks) {
        wg_issue_qk(s, qa, ks);
        wg_commit();
    };
    // Scale and mask S_i, fold it into the softmax state, alpha for O.
    auto softmax = [&](float s[8][4], int i, float alpha[2]) {
        const int t0 = i * PF_TILE_N;
        scale_mask(s, t0, lim0, lane, qk_scale);
        online_softmax_deferred<8>(st, s, alpha);
    };
    {  // tile 0: nothing to overlap with yet (O is zero: no rescale)
        float s[8][4], alpha[2];
        const uint32_t ks = next_tile(0);
        wg_fence_operands<32>(&s[0][0]);
        wg_fence();
        qk(s, ks);
        wg_wait<0>();
        wg_fence_operands<32>(&s[0][0]);
        softmax(s, 0, alpha);
#pragma unroll
        for (int j = 0; j < 4; ++j) p_to_a(pa[j], s[2 * j], s[2 * j + 1]);
        vs_prev = ks + PF_TILE_N * ATT_ROW_BYTES;
    }
    for (int i = 1; i < it.ntiles; ++i) {
        const uint32_t ks = next_tile(i);
        float s[8][4], alpha[2];
        wg_fence_operands<32>(&s[0][0]);
        wg_fence_operands<64>(&o[0][0]);
        wg_fence();
        qk(s, ks);
        pv();
        wg_wait<1>();  // S_i is in; P_{i-1} V_{i-1} may still run
        wg_fence_operands<32>(&s[0][0]);
        softmax(s, i, alpha);
        wg_wait<0>();
        wg_fence_operands<64>(&o[0][0]);
        rescale_o(o, alpha);
#pragma unroll
        for (int j = 0; j < 4; ++j) p_to_a(pa[j], s[2 * j], s[2 * j + 1]);
        vs_prev = ks + PF_TILE_N * ATT_ROW_BYTES;
    }
    wg_fence_operands<64>(&o[0][0]);
    wg_fence();
    pv();
    wg_wait<0>();
    wg_fence_operands<64>(&o[0][0]);
    cp_async_wait<0>();
    store_rows(out, o, st, it.qs, it.j0 + warp * 16, it.ql, heads, head, lane);
}

template <int STAGES, typename MakeKv, typename Ctx = WholeBlock>
__device__ __forceinline__ void prefill_tile_pipelined(const __nv_bfloat16* __restrict__ q,
                                                       __nv_bfloat16* __restrict__ out,
                                                       const int32_t* __restrict__ work,
                                                       const int32_t* __restrict__ q_start,
                                                       const int32_t* __restrict__ ctx_len,
                                                       const int32_t* __restrict__ q_len, int heads, int group,
                                                       float scale, MakeKv make_kv, int item, int head, Ctx grp = {}) {
    if constexpr (ATT_WGMMA)
        prefill_tile_pipelined_wg<STAGES>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, make_kv, item,
                                          head, grp);
    else
        prefill_tile<4, STAGES - 1>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, make_kv, item, head,
                                    grp);
}
