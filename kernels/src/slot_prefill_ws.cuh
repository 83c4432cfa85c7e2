// Warp-specialized causal prefill over the per-slot (vAttention) cache, sm_90a
// only: FlashAttention-3's structure (arXiv 2407.08608) on our slot layout.
// Same work list, chunk arrays and results as slot_prefill.cuh's tiles; a CTA
// covers 128 query rows of one query head and loads each K/V tile once for
// both of its consumer warpgroups.
//
//   block:  3 warpgroups (384 threads). Warpgroup 0 is the producer: one
//           thread issues the TMA loads of K and V tiles (128 keys x 128 dims,
//           two 64-dim boxes each, tma.cuh's wg layout with 128 rows) into a
//           STAGES-deep ring, K one tile ahead of V (ws_produce); the rest
//           of it idles. Warpgroups 1 and 2 are consumers in ping-pong
//           (ws_consume), 64 query rows each (rows j0 + 64 c ..), Q in
//           shared memory (cp.async, wg layout),
//           S = Q K^T with both operands from shared memory (m64n128k16),
//           O += P V with P from registers.
//   ring:   per stage a "full" mbarrier for K and one for V (the TMA's bytes
//           complete them) and an "empty" one for each (every consumer warp
//           arrives once its wgmma that read the tile has completed: 8
//           arrivals), so K of tile i + STAGES loads while V of tile i is
//           still in use.
//   regs:   setmaxnreg gives the consumers 240 registers a thread and the
//           producer 24 (S 64 + O 64 + P 32 f32/bf16x2 registers a thread).
//   grid:   one CTA per (head, work item) in L2 order (ws_l2_order): the
//           heads in sections of whole KV heads whose K and V fit in L2, and
//           in a section the heads of one work item together (GQA
//           neighbours share their K/V) with the work list heaviest first
//           (causal tail).
//
// Inside a consumer, iteration i issues S_i = Q K_i^T and O += P_{i-1} V_{i-1}
// together and runs tile i's softmax while the PV product is still on the
// tensor cores (intra-warpgroup overlap, as prefill_tile_pipelined_wg).
//
// Keys past the work item's last one (n_keys) inside its slot are read as
// they are (the host checks that a 128-row box never leaves the page of its
// first row): K there only meets masked scores; V rows there are zeroed in
// shared memory by consumer 1 before either consumer's PV reads the tile
// (a 0 probability times a NaN would still be a NaN). Consumer 1 covers every
// tile of the item (its rows see the furthest keys); consumer 0 may skip the
// last one (no key of it is visible to its rows), and then never waits for
// the zeroing.
#pragma once
#include "slot_prefill.cuh"
#include "tma.cuh"

constexpr int WS_BM = 128;       // query rows of a CTA (2 consumers x 64)
constexpr int WS_BN = 128;       // keys of a K/V tile
constexpr int WS_THREADS = 384;  // producer warpgroup + 2 consumer warpgroups
constexpr uint32_t WS_TILE_BYTES = WS_BN * ATT_ROW_BYTES;  // one K or V tile (32 KiB)

template <int STAGES>
struct WsShape {
    static constexpr int Q_BYTES = WS_BM * ATT_ROW_BYTES;  // two 64-row wg-layout tiles
    // + 1 KiB: the tiles start at the next 1024-byte boundary (swizzle atoms).
    static constexpr int SMEM = Q_BYTES + 2 * STAGES * WS_TILE_BYTES + 1024;
};

// Named barriers (0 is __syncthreads'): 1 + c: consumer c's 128 threads (Q
// in); 3: both consumers (the last tile's V rows are zeroed); 4 + c: consumer
// c may issue its next GEMMs (ping-pong, 256 threads: c waits, the other
// arrives).
constexpr int WS_BAR_Q = 1, WS_BAR_ZERO = 3, WS_BAR_TURN = 4;

__device__ __forceinline__ void named_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
    WG_ASM("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
    WG_ASM("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
    WG_ASM("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

// A warp's 16 x 128 score tile (keys t0 .. t0 + 127): keys past row g's last
// (lim0; lim0 + 8 for row g + 8) at -inf. Only tiles that reach past the
// warp's first row's last key compare (the test is warp-uniform).
__device__ __forceinline__ void ws_mask(float s[16][4], int t0, int lim0, int lane) {
    if (t0 + WS_BN - 1 > lim0 - lane / 4) {
#pragma unroll
        for (int n = 0; n < 16; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (t0 + n * 8 + 2 * (lane % 4) + (e & 1) > lim0 + 8 * (e / 2)) s[n][e] = -INFINITY;
    }
}

// How far (log2 units) a row's scores may rise above its running max before
// the max moves: see ws_softmax.
constexpr float WS_LAZY_LOG2 = 8.f;

// The online softmax of one warp's 16 x 128 raw score tile (two rows a
// thread), FA3's form with two changes from attn_mma.cuh's
// online_softmax_deferred:
//  - the scale is folded into the exponent: p = exp2(s * scale - m * scale),
//    one FFMA and one MUFU.EX2 an element (m in raw score units);
//  - lazy rescale: the running max m moves only when a tile raises some row
//    of the warp by more than WS_LAZY_LOG2 (after the scale), and only then
//    must O be rescaled (returns true, alpha in `alpha`). With a stale m the
//    probabilities reach at most 2^8; O and the row sum l share the base, so
//    O / l is unchanged (the first tile always moves it: m starts at -inf).
// Max and sum run as 4 independent chains (the fixed-latency dependency waits
// are the consumers' top stall reason: ncu, results/2026-12-03-h200-prefill-ws2).
__device__ __forceinline__ bool ws_softmax(RowState& st, float s[16][4], float alpha[2], float scale) {
    float mx[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float a[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) a[k] = fmaxf(s[k][2 * r], s[k][2 * r + 1]);
#pragma unroll
        for (int n = 4; n < 16; ++n) a[n % 4] = fmaxf(a[n % 4], fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx[r] = quad_max(fmaxf(fmaxf(a[0], a[1]), fmaxf(a[2], a[3])));
    }
    // -inf - -inf (a row with no key yet) is NaN: not "grown".
    const bool grow = (mx[0] - st.m[0]) * scale > WS_LAZY_LOG2 || (mx[1] - st.m[1]) * scale > WS_LAZY_LOG2;
    const bool moved = __any_sync(0xffffffffu, grow);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (moved) {
            const float m_new = fmaxf(st.m[r], mx[r]);
            alpha[r] = m_new == -INFINITY ? 1.f : exp2f((st.m[r] - m_new) * scale);
            st.m[r] = m_new;
        }
        // A row that has seen no key yet keeps exponent base 0 (no inf - inf).
        const float base = st.m[r] == -INFINITY ? 0.f : st.m[r] * scale;
        float sum[4];
#pragma unroll
        for (int n = 0; n < 16; ++n) {
            const float p0 = exp2f(fmaf(s[n][2 * r], scale, -base));
            const float p1 = exp2f(fmaf(s[n][2 * r + 1], scale, -base));
            s[n][2 * r] = p0;
            s[n][2 * r + 1] = p1;
            sum[n % 4] = n < 4 ? p0 + p1 : sum[n % 4] + (p0 + p1);
        }
        const float t = (sum[0] + sum[1]) + (sum[2] + sum[3]);
        st.l[r] = moved ? st.l[r] * alpha[r] + t : st.l[r] + t;
    }
    return moved;
}

// The ring's shared memory and barriers, as both roles address them.
template <int STAGES>
struct WsRing {
    uint32_t q, k, v;  // Q (2 x 64 rows), K stages, V stages
    uint32_t bars;     // full K, full V, empty K, empty V: STAGES each
    __device__ __forceinline__ uint32_t ks(int i) const { return k + (i % STAGES) * WS_TILE_BYTES; }
    __device__ __forceinline__ uint32_t vs(int i) const { return v + (i % STAGES) * WS_TILE_BYTES; }
    __device__ __forceinline__ uint32_t full_k(int i) const { return bars + 8 * (i % STAGES); }
    __device__ __forceinline__ uint32_t full_v(int i) const { return bars + 8 * (STAGES + i % STAGES); }
    __device__ __forceinline__ uint32_t empty_k(int i) const { return bars + 8 * (2 * STAGES + i % STAGES); }
    __device__ __forceinline__ uint32_t empty_v(int i) const { return bars + 8 * (3 * STAGES + i % STAGES); }
    // The parity of tile i's fill of its stage.
    __device__ __forceinline__ static uint32_t phase(int i) { return (i / STAGES) & 1; }
};

// The producer thread: K and V of tiles 0 .. ntiles - 1, each into its
// stage once the consumers released the stage's previous tile, with K one
// tile ahead of V (K_0 K_1 V_0 K_2 V_1 ...; FA3's order): the pair a turn i
// reads (K_i, V_{i-1}) are consecutive loads, K first, and the consumer
// issues QK_i as soon as K_i is in, waiting for V_{i-1} only before its PV
// (ws_consume). In tile order (K_0 V_0 K_1 V_1 ...), K_{i+2} also waited
// behind V_{i+1}, whose stage frees a turn later, and a late V held back the
// QK GEMM too: 3-7 % slower on most cases (results/2026-12-04-h200-wspk).
template <int STAGES>
__device__ __forceinline__ void ws_produce(const WsRing<STAGES>& r, const TmaMap* kmap, const TmaMap* vmap, int x0,
                                           int slot, int ntiles) {
    auto load_k = [&](int i) {
        if (i >= STAGES) mbar_wait(r.empty_k(i), WsRing<STAGES>::phase(i - STAGES));
        mbar_expect_tx(r.full_k(i), WS_TILE_BYTES);
        tma_load_3d(r.ks(i), kmap, r.full_k(i), x0, i * WS_BN, slot);
        tma_load_3d(r.ks(i) + WS_BN * 128, kmap, r.full_k(i), x0 + 64, i * WS_BN, slot);
    };
    auto load_v = [&](int i) {
        if (i >= STAGES) mbar_wait(r.empty_v(i), WsRing<STAGES>::phase(i - STAGES));
        mbar_expect_tx(r.full_v(i), WS_TILE_BYTES);
        tma_load_3d(r.vs(i), vmap, r.full_v(i), x0, i * WS_BN, slot);
        tma_load_3d(r.vs(i) + WS_BN * 128, vmap, r.full_v(i), x0 + 64, i * WS_BN, slot);
    };
    for (int i = 0; i <= ntiles; ++i) {
        if (i < ntiles) load_k(i);
        if (i > 0) load_v(i - 1);
    }
}

// A wgmma descriptor `d` moved `bytes` further into shared memory: the
// start-address field (bits 0-13, address / 16) takes bytes / 16 without a
// carry out (shared memory addresses stay below 256 KiB). One descriptor per
// tile plus constant offsets keeps the loops' descriptor math in uniform
// registers (with a wg_desc per step ptxas rebuilt each one per thread and
// moved it over with R2UR: ~100 instructions a tile; FA3's loop has none:
// results/2026-12-04-fa3-sass).
__device__ __forceinline__ uint64_t ws_desc_add(uint64_t d, uint32_t bytes) {
    return (d & 0xFFFFFFFF00000000ull) | (uint32_t)((uint32_t)d + (bytes >> 4));
}

// S (64 x 128) = Q K_i^T for consumer rows at `qc` (a 64-row wg-layout tile):
// 8 steps of 16 dims, issued only.
__device__ __forceinline__ void ws_issue_qk(float s[16][4], uint32_t qc, uint32_t ks) {
    const uint64_t qd = wg_desc(qc, 16, 1024), kd = wg_desc(ks, 16, 1024);
#pragma unroll
    for (int kk = 0; kk < 8; ++kk)
        wgmma_ss_m64n128k16(&s[0][0], ws_desc_add(qd, (kk / 4) * 64 * 128 + (kk % 4) * 32),
                            ws_desc_add(kd, (kk / 4) * WS_BN * 128 + (kk % 4) * 32), kk);
}

// O (64 x 128) += P (64 x 128 keys, A fragments) V_i: 8 steps of 16 keys.
__device__ __forceinline__ void ws_issue_pv(float o[16][4], const uint32_t pa[8][4], uint32_t vs) {
    const uint64_t vd = wg_desc(vs, WS_BN * 128, 1024);
#pragma unroll
    for (int j = 0; j < 8; ++j) wgmma_pv_m64n128k16(&o[0][0], pa[j], ws_desc_add(vd, j * 16 * 128), 1);
}

// One consumer warpgroup (c = 0, 1) over tiles 0 .. its last of the work item.
//
// The two consumers take turns on the tensor cores (FA3's
// inter-warpgroup ping-pong): each issue step (QK_0; QK_i + PV_{i-1}; the last
// PV) waits for the consumer's turn and hands the turn to the other once its
// GEMMs are issued, so one's softmax runs while the other's GEMMs do.
// Both consumers take mine + 1 turns: consumer 0, a tile short, takes an
// empty one; the last turn hands nothing on (nothing would take it).
template <int STAGES>
__device__ __forceinline__ void ws_consume(const WsRing<STAGES>& r, const __nv_bfloat16* __restrict__ q,
                                           __nv_bfloat16* __restrict__ out, int c, int qs, int ctx, int ql, int j0,
                                           int n_keys, int ntiles, int heads, int head, float qk_scale) {
    const int tid = threadIdx.x % 128, warp = tid / 32, lane = threadIdx.x % 32, g = lane / 4;
    const int row0 = j0 + 64 * c;  // this consumer's first query row (of the chunk)
    const uint32_t qc = r.q + c * 64 * ATT_ROW_BYTES;
    load_tile_at<64, 128>(
        qc, [&](int i) { return q + ((size_t)(qs + row0 + i) * heads + head) * ATT_HEAD_DIM; },
        [&](int i) { return row0 + i < ql; }, [](int i, int ch) { return wg_off<64>(i, ch); });
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();
    named_sync(WS_BAR_Q + c, 128);

    // Row g (+ 8) of this warp sees keys <= lim0 (+ 8); the warpgroup's
    // last row keys <= lim_wg: its tiles are those starting at or below it.
    const int lim0 = ctx + row0 + warp * 16 + g;
    const int lim_wg = ctx + row0 + 63;
    const int mine = min(ntiles, lim_wg / WS_BN + 1);
    // The last tile holds keys past n_keys: consumer 1 zeroes their V rows;
    // consumer 0 waits for that only if it reads the tile.
    const bool partial = n_keys % WS_BN != 0;
    const bool both_last = min(ntiles, (ctx + j0 + 63) / WS_BN + 1) == ntiles;  // consumer 0 reads it too
    auto wait_v = [&](int i) {
        mbar_wait(r.full_v(i), WsRing<STAGES>::phase(i));
        if (!partial || i != ntiles - 1) return;
        if (c == 1) {
            const int valid = n_keys - i * WS_BN;
            // Rows valid .. 127 of both 64-dim halves, 8 16-byte chunks each.
            for (int e = tid; e < (WS_BN - valid) * 16; e += 128) {
                const int row = valid + e / 16, half = (e / 8) % 2, chunk = e % 8;
                const uint32_t a = r.vs(i) + half * WS_BN * 128 + row * 128 + chunk * 16;
                asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0) : "memory");
            }
            fence_proxy_async();
        }
        if (both_last) named_sync(WS_BAR_ZERO, 256);
    };
    // Each consumer warp releases a stage once its wgmma reading it is done.
    auto release = [&](uint32_t bar) {
        if (lane == 0) mbar_arrive(bar);
    };
    const int turns = min(ntiles, (ctx + j0 + 127) / WS_BN + 1) + 1;  // consumer 1's tiles + 1
    int turn = 0;
    auto my_turn = [&] { named_sync(WS_BAR_TURN + c, 256); };
    auto hand_on = [&] {
        if (++turn < turns || c == 0) named_arrive(WS_BAR_TURN + 1 - c, 256);
    };
    if (c == 1) named_arrive(WS_BAR_TURN, 256);  // consumer 0 goes first

    float o[16][4];
#pragma unroll
    for (int d = 0; d < 16; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.f;
    RowState st;
    uint32_t pa[8][4];  // P of the previous tile (A fragments)
    {                   // tile 0: nothing to overlap with yet (O is zero: no rescale)
        float s[16][4], alpha[2];
        mbar_wait(r.full_k(0), 0);
        wg_fence_operands<64>(&s[0][0]);
        my_turn();
        wg_fence();
        ws_issue_qk(s, qc, r.ks(0));
        wg_commit();
        hand_on();
        wg_wait<0>();
        wg_fence_operands<64>(&s[0][0]);
        release(r.empty_k(0));
        ws_mask(s, 0, lim0, lane);
        ws_softmax(st, s, alpha, qk_scale);  // moves m (O is zero: nothing to rescale)
#pragma unroll
        for (int j = 0; j < 8; ++j) p_to_a(pa[j], s[2 * j], s[2 * j + 1]);
    }
    for (int i = 1; i < mine; ++i) {
        float s[16][4], alpha[2];
        mbar_wait(r.full_k(i), WsRing<STAGES>::phase(i));
        wg_fence_operands<64>(&s[0][0]);
        wg_fence_operands<64>(&o[0][0]);
        my_turn();
        wg_fence();
        ws_issue_qk(s, qc, r.ks(i));
        wg_commit();
        // V_{i-1} lands after K_i (ws_produce): wait for it only now. It
        // is a whole tile (the partial last one only comes after the loop).
        mbar_wait(r.full_v(i - 1), WsRing<STAGES>::phase(i - 1));
        wg_fence();  // (ptxas would put one here itself: C7519)
        ws_issue_pv(o, pa, r.vs(i - 1));
        wg_commit();
        hand_on();
        wg_wait<1>();  // S_i is in; P_{i-1} V_{i-1} may still run
        wg_fence_operands<64>(&s[0][0]);
        release(r.empty_k(i));
        ws_mask(s, i * WS_BN, lim0, lane);
        const bool moved = ws_softmax(st, s, alpha, qk_scale);
        wg_wait<0>();
        wg_fence_operands<64>(&o[0][0]);
        release(r.empty_v(i - 1));
        if (moved) rescale_o(o, alpha);
#pragma unroll
        for (int j = 0; j < 8; ++j) p_to_a(pa[j], s[2 * j], s[2 * j + 1]);
    }
    wait_v(mine - 1);
    wg_fence_operands<64>(&o[0][0]);
    my_turn();
    wg_fence();
    ws_issue_pv(o, pa, r.vs(mine - 1));
    wg_commit();
    hand_on();
    if (mine + 1 < turns) {  // consumer 0's empty turn
        my_turn();
        hand_on();
    }
    wg_wait<0>();
    wg_fence_operands<64>(&o[0][0]);
    release(r.empty_v(mine - 1));
    store_rows(out, o, st, qs, row0 + 16 * warp, ql, heads, head, lane);
}

// A CTA's (query head, work item) from its place in launch or ticket order
// `lin`, over `heads` query heads x `items` work items (heaviest first), in
// sections of `sec` heads (whole KV heads; the host sizes them so that their
// K and V over the longest item fit in its L2 budget, 32 MiB of 50 MB by
// default; sec <= 0 or >= heads: one section). Section by section, and in a
// section item by item with its heads fastest: the CTAs resident at a time
// then read the K/V of one section or two (one fits L2 with room, two about
// fill it), where with all heads fastest they sweep every KV head's K/V at
// once and, over a long prior context (2K rows over 16K keys: 8 x 9.4 MB),
// L2 cannot keep what a later wave's CTAs of the same KV head read again
// (FlashAttention-3 and 4 order their tiles in such L2 sections too).
struct WsPick {
    int head, item;
};
__device__ __forceinline__ WsPick ws_l2_order(int lin, int heads, int items, int sec) {
    if (sec <= 0 || sec > heads) sec = heads;
    const int per = sec * items, s = lin / per, r = lin - s * per;
    const int width = min(sec, heads - s * sec);  // the last section may be narrower
    return {s * sec + r % width, r / width};
}

// Query head `head` of work item `item` (128 rows) by the whole block
// (WS_THREADS threads, WsShape<STAGES>::SMEM of dynamic shared memory).
// CREGS: the consumers' registers a thread (setmaxnreg; they use ~190): 240
// in a block launched at 168, 192 in one launched at 136 (the slim kernel,
// 52 K registers a block).
template <int STAGES, int CREGS = 240>
__device__ __forceinline__ void prefill_ws(const __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ out,
                                           const int32_t* __restrict__ work, const int32_t* __restrict__ q_start,
                                           const int32_t* __restrict__ ctx_len, const int32_t* __restrict__ q_len,
                                           const int32_t* __restrict__ slots, int heads, int group, float scale,
                                           const TmaMap* kmap, const TmaMap* vmap, int head, int item) {
    extern __shared__ __align__(128) uint8_t smem[];
    __shared__ __align__(8) uint64_t bars[4 * STAGES];
    const int chunk = work[2 * item], j0 = work[2 * item + 1];
    const int qs = q_start[chunk], ctx = ctx_len[chunk], ql = q_len[chunk];
    const int n_keys = ctx + min(ql, j0 + WS_BM);
    const int ntiles = (n_keys + WS_BN - 1) / WS_BN;
    const uint32_t base = (smem_addr(smem) + 1023) & ~1023u;
    const WsRing<STAGES> r{base, base + WsShape<STAGES>::Q_BYTES,
                           base + WsShape<STAGES>::Q_BYTES + STAGES * WS_TILE_BYTES, smem_addr(bars)};
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(r.full_k(s), 1);
            mbar_init(r.full_v(s), 1);
            mbar_init(r.empty_k(s), 8);
            mbar_init(r.empty_v(s), 8);
        }
        mbar_init_fence();
    }
    __syncthreads();
    // The warpgroup by a shuffle: ptxas then knows it is warp-uniform, and so
    // everything derived from it (Q and ring addresses, loop bounds): the
    // descriptors stay in uniform registers.
    const int wg = __shfl_sync(0xffffffffu, (int)(threadIdx.x / 128), 0);
    if (wg == 0) {
        setmaxnreg_dec<24>();
        if (threadIdx.x == 0)
            ws_produce<STAGES>(r, kmap, vmap, (head / group) * ATT_HEAD_DIM, slots[chunk], ntiles);
    } else {
        setmaxnreg_inc<CREGS>();
        ws_consume<STAGES>(r, q, out, wg - 1, qs, ctx, ql, j0, n_keys, ntiles, heads, head,
                                 scale * ATT_LOG2E);
    }
}

// The `nth` of the `count` CTAs' worth of tiles of a launch (blockIdx.x of
// a 1-D grid) or of a ticket order (count = heads x work items), taken in ws_l2_order's sections of `l2_heads` query heads
// and run as prefill_ws runs a tile.
template <int STAGES, int CREGS = 240>
__device__ __forceinline__ void prefill_ws_nth(const __nv_bfloat16* __restrict__ q, __nv_bfloat16* __restrict__ out,
                                               const int32_t* __restrict__ work, const int32_t* __restrict__ q_start,
                                               const int32_t* __restrict__ ctx_len, const int32_t* __restrict__ q_len,
                                               const int32_t* __restrict__ slots, int heads, int group, float scale,
                                               const TmaMap* kmap, const TmaMap* vmap, int nth, int count,
                                               int l2_heads) {
    const WsPick p = ws_l2_order(nth, heads, count / heads, l2_heads);
    prefill_ws<STAGES, CREGS>(q, out, work, q_start, ctx_len, q_len, slots, heads, group, scale, kmap, vmap, p.head,
                              p.item);
}
