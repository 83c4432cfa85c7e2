// TMA (the Hopper tensor memory accelerator) for the prefill tiles' K/V
// loads over the per-slot (vAttention) cache.
//
// The virtual cache keeps every slot's rows at one stride, so one 3-D tensor
// map per (layer, K or V) describes the whole cache: dims (kv_heads * 128,
// max_len, slots), strides (pos_stride, slot_stride) in bytes, a 64 x 64
// box (128 bytes wide: the 128-byte swizzle), built on the host with
// cuTensorMapEncodeTiled. A K or V tile (64 keys x 128 dims) is two boxes,
// one per 64-dim half, which land exactly in wgmma.cuh's wg layout (half h
// at h * 64 * 128 bytes, row r at r * 128, 16-byte chunk c at c ^ (r % 8)).
//
// One thread issues a stage's four boxes and arms the stage's mbarrier with
// their bytes; every thread waits on the barrier's phase. Positions past
// max_len come back as zeros (the box is out of the tensor); keys past the
// chunk's last one but inside the slot are read as they are, so the caller
// zeroes the V rows past its last key before using the tile (a 64-aligned
// box never crosses a page when the cache's pages hold a multiple of 64 rows,
// which the host checks: it reads only mapped memory).
#pragma once
#include "wgmma.cuh"

// A CUtensorMap (128 bytes, 64-byte aligned), passed by value as a
// __grid_constant__ kernel parameter.
struct alignas(64) TmaMap {
    unsigned long long words[16];
};

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
    WG_ASM("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_init_fence() {
    WG_ASM("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
    WG_ASM("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
    WG_ASM(
        "{\n"
        ".reg .pred p;\n"
        "WAIT_%=:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
        "@!p bra WAIT_%=;\n"
        "}\n" ::"r"(bar),
        "r"(parity)
        : "memory");
}

// Box (x, y, z) of `map` into shared memory at `dst`, completing on `bar`.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const TmaMap* map, uint32_t bar, int x, int y, int z) {
    WG_ASM(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5}], "
        "[%2];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(x), "r"(y), "r"(z)
        : "memory");
}

// The per-slot layout through TMA: SlotKv's contract (slot_prefill.cuh) with
// the loads issued by thread 0 of the block and completed on mbarriers
// (`bars`: one 8-byte barrier per stage, initialised with `init` by thread
// 0, which the block syncs on before the first load).
// Whole-block tiles only (the barriers are the block's).
struct TmaSlotKv {
    static constexpr bool V_BY_DIM = false;
    static constexpr bool WG = true;
    static constexpr uint32_t TILE_BYTES = 2 * 64 * 128 * 2;  // K and V, 64 keys x 128 dims, bf16
    const TmaMap* kmap;
    const TmaMap* vmap;
    int x0;    // kv_head * 128
    int slot;
    uint32_t bars;
    __device__ __forceinline__ static void init(uint32_t bars, int stages) {
        if (threadIdx.x == 0) {
            for (int s = 0; s < stages; ++s) mbar_init(bars + 8 * s, 1);
            mbar_init_fence();
        }
    }
    __device__ __forceinline__ void load(uint32_t ks, uint32_t vs, int t0, int /*n_keys*/, int stage) const {
        if (threadIdx.x != 0) return;
        const uint32_t bar = bars + 8 * stage;
        mbar_expect_tx(bar, TILE_BYTES);
        tma_load_3d(ks, kmap, bar, x0, t0, slot);
        tma_load_3d(ks + 64 * 128, kmap, bar, x0 + 64, t0, slot);
        tma_load_3d(vs, vmap, bar, x0, t0, slot);
        tma_load_3d(vs + 64 * 128, vmap, bar, x0 + 64, t0, slot);
    }
    // Tile t0 .. t0 + 63 is in stage `stage` (its `use`-th fill); V rows from
    // `n_keys` on are zeroed (generic stores: the caller fences the async
    // proxy and syncs before the tensor cores read the tile).
    __device__ __forceinline__ void wait(uint32_t vs, int t0, int n_keys, int stage, int use, int tid,
                                         int threads) const {
        mbar_wait(bars + 8 * stage, use & 1);
        const int valid = n_keys - t0;
        if (valid >= 64) return;
        // Rows valid .. 63 of both halves: 128 bytes each, 8 16-byte chunks.
        for (int c = tid; c < (64 - valid) * 2 * 8; c += threads) {
            const int row = valid + c / 16, half = (c / 8) % 2, chunk = c % 8;
            const uint32_t a = vs + half * 64 * 128 + row * 128 + chunk * 16;
            asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(a), "r"(0) : "memory");
        }
    }
};
