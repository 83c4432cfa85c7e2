// Tile building blocks shared by the attention kernels over the per-slot
// (vAttention) layout: bf16, head_dim 128, tensor cores through `mma.sync`
// (m16n8k16, f32 accumulators; sm_80 and newer), tiles staged in shared
// memory with `cp.async` and read back with `ldmatrix`.
//
// A K or V tile is [rows][128] bf16 = 256 bytes per row = 16 chunks of 16
// bytes. Chunk c of row r is stored at chunk position c ^ (r % 8): the 8 rows
// an `ldmatrix` phase reads at the same logical chunk land in 8 different
// 16-byte bank groups (no bank conflicts), and cp.async writes whole chunks.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 with .bf16; g = lane / 4, t = lane % 4):
//   A (16 x 16, row-major):  a[0] = (row g,   k 2t..2t+1)   a[1] = (row g+8, k 2t..)
//                            a[2] = (row g,   k 2t+8..)     a[3] = (row g+8, k 2t+8..)
//   B (16 x 8, "col"):       b[0] = (k 2t..2t+1, col g)     b[1] = (k 2t+8.., col g)
//   C (16 x 8, f32):         c[0..1] = (row g, cols 2t, 2t+1)   c[2..3] = (row g+8, ...)
// S = Q K^T takes B from K rows with a plain ldmatrix (keys are B's
// columns); O += P V takes B from V rows with ldmatrix.trans; P goes from C
// fragments to A fragments in registers (the FlashAttention-2 register reuse).
//
// On sm_90a the prefill tile replaces the mma.sync inner loops with
// warpgroup MMAs (wgmma.cuh); the work split, addressing and softmax
// bookkeeping stay the same.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

constexpr int ATT_HEAD_DIM = 128;
constexpr int ATT_ROW_BYTES = ATT_HEAD_DIM * 2;
constexpr int ATT_ROW_CHUNKS = ATT_ROW_BYTES / 16;
constexpr float ATT_LOG2E = 1.4426950408889634f;

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Byte offset of chunk c of row r in a swizzled tile.
__device__ __forceinline__ uint32_t tile_off(int r, int c) {
    return static_cast<uint32_t>(r * ATT_ROW_BYTES + ((c ^ (r & 7)) << 4));
}

// 16 bytes global -> shared, bypassing L1; `valid == false` writes zeros and
// reads nothing (src must still be a valid address expression).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// The same with `bytes` (0 ..= 16) bytes read and the rest zero-filled.
__device__ __forceinline__ void cp_async16_n(uint32_t dst, const void* src, int bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldsm_x4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// c += a * b (16x8x16, bf16 inputs, f32 accumulators).
__device__ __forceinline__ void mma_bf16(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t*>(&v);
}

// Copies `rows` K/V rows (16 chunks each) to a tile with `threads` threads;
// row r comes from `src(r)` (a row pointer) when `valid(r)`, else zeros, and
// chunk c of row r goes to byte `off(r, c)` of the tile. Rows past the
// sequence are never read.
template <int ROWS, int THREADS, typename Src, typename Valid, typename Off>
__device__ __forceinline__ void load_tile_at(uint32_t tile, Src src, Valid valid, Off off) {
    static_assert(ROWS * ATT_ROW_CHUNKS % THREADS == 0, "whole chunks per thread");
#pragma unroll
    for (int j = 0; j < ROWS * ATT_ROW_CHUNKS / THREADS; ++j) {
        const int i = threadIdx.x % THREADS + j * THREADS;
        const int r = i / ATT_ROW_CHUNKS, c = i % ATT_ROW_CHUNKS;
        const bool ok = valid(r);
        cp_async16(tile + off(r, c), src(ok ? r : 0) + c * 8, ok);
    }
}
// Where a tile's threads work together: their shared memory and their
// barrier. A kernel whose block is one such group passes WholeBlock (the
// dynamic shared memory, __syncthreads); pod_wsd_bf16's decode blocks run one per warpgroup
// (WarpGroupPart: its part of the shared memory, a named barrier). The tile
// code indexes its threads by threadIdx.x % THREADS.
struct WholeBlock {
    __device__ __forceinline__ uint8_t* region() const {
        extern __shared__ __align__(128) uint8_t smem[];
        return smem;
    }
    __device__ __forceinline__ void sync() const { __syncthreads(); }
};
struct WarpGroupPart {
    uint8_t* base;
    int barrier;  // 1 + the warpgroup (0 is __syncthreads')
    __device__ __forceinline__ uint8_t* region() const { return base; }
    __device__ __forceinline__ void sync() const { asm volatile("bar.sync %0, 128;\n" ::"r"(barrier) : "memory"); }
};

// load_tile_at into the swizzled layout of tile_off.
template <int ROWS, int THREADS, typename Src, typename Valid>
__device__ __forceinline__ void load_tile(uint32_t tile, Src src, Valid valid) {
    load_tile_at<ROWS, THREADS>(tile, src, valid, [](int r, int c) { return tile_off(r, c); });
}

// S[16 x 16] (two n-tiles of 8 keys) += Q(16 x 128, A fragments) K[key0 .. key0+16)^T.
__device__ __forceinline__ void qk_16(float s[2][4], const uint32_t qa[8][4], uint32_t k_tile, int key0, int lane) {
    const int m = lane / 8;
#pragma unroll
    for (int kk = 0; kk < 8; ++kk) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(k_tile + tile_off(key0 + (m / 2) * 8 + lane % 8, 2 * kk + (m % 2)), b0, b1, b2, b3);
        mma_bf16(s[0], qa[kk], b0, b1);
        mma_bf16(s[1], qa[kk], b2, b3);
    }
}

// O[16 x 128] (16 n-tiles of 8 dims) += P(16 x 16 keys, A fragment) V[key0 .. key0+16).
__device__ __forceinline__ void pv_16(float o[16][4], const uint32_t pa[4], uint32_t v_tile, int key0, int lane) {
    const int m = lane / 8;
#pragma unroll
    for (int dn = 0; dn < 8; ++dn) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4_t(v_tile + tile_off(key0 + (m % 2) * 8 + lane % 8, 2 * dn + m / 2), b0, b1, b2, b3);
        mma_bf16(o[2 * dn], pa, b0, b1);
        mma_bf16(o[2 * dn + 1], pa, b2, b3);
    }
}

// Byte offset of chunk c (8 keys) of dimension row d in a V tile stored by
// dimension ([128][64 keys], 128-byte rows), swizzled like tile_off.
__device__ __forceinline__ uint32_t vdim_off(int d, int c) {
    return static_cast<uint32_t>(d * 128 + ((c ^ (d & 7)) << 4));
}

// pv_16 for a V tile stored by dimension (vdim_off): the rows of an 8 x 8
// matrix are dimensions (B's columns), so a plain ldmatrix gives the B
// fragments, as qk_16 does with keys.
__device__ __forceinline__ void pv_16_by_dim(float o[16][4], const uint32_t pa[4], uint32_t v_tile, int key0,
                                             int lane) {
    const int m = lane / 8;
#pragma unroll
    for (int dn = 0; dn < 8; ++dn) {
        uint32_t b0, b1, b2, b3;
        ldsm_x4(v_tile + vdim_off(16 * dn + (m / 2) * 8 + lane % 8, key0 / 8 + (m % 2)), b0, b1, b2, b3);
        mma_bf16(o[2 * dn], pa, b0, b1);
        mma_bf16(o[2 * dn + 1], pa, b2, b3);
    }
}

// The A fragment of P for keys [16j, 16j + 16) from the C fragments of S
// n-tiles 2j and 2j + 1.
__device__ __forceinline__ void p_to_a(uint32_t pa[4], const float s0[4], const float s1[4]) {
    pa[0] = pack_bf16(s0[0], s0[1]);
    pa[1] = pack_bf16(s0[2], s0[3]);
    pa[2] = pack_bf16(s1[0], s1[1]);
    pa[3] = pack_bf16(s1[2], s1[3]);
}

__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
}
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffff, x, 1);
    return x + __shfl_xor_sync(0xffffffff, x, 2);
}

// Online-softmax state of the two rows (g, g + 8) a thread holds, in the
// log2 domain (scores pre-multiplied by scale * log2 e).
struct RowState {
    float m[2] = {-INFINITY, -INFINITY};
    float l[2] = {0.f, 0.f};  // this thread's partial sums; quad_sum at the end
};

// Folds S n-tiles (2 * NT of them, rows g and g + 8, already scaled and
// masked with -inf) into the state: new max, S := P, and the factor O must
// be scaled by (alpha[r] for row r), which the caller applies: at once
// (online_softmax), or once an asynchronous MMA still accumulating into O
// has finished (the pipelined prefill tile).
template <int NT>
__device__ __forceinline__ void online_softmax_deferred(RowState& st, float s[][4], float alpha[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float mx = -INFINITY;
#pragma unroll
        for (int n = 0; n < NT; ++n) mx = fmaxf(mx, fmaxf(s[n][2 * r], s[n][2 * r + 1]));
        mx = quad_max(mx);
        const float m_new = fmaxf(st.m[r], mx);
        // A row that has seen no key yet keeps exponent base 0 (no inf - inf).
        const float base = m_new == -INFINITY ? 0.f : m_new;
        alpha[r] = exp2f(st.m[r] - base);
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            s[n][2 * r] = exp2f(s[n][2 * r] - base);
            s[n][2 * r + 1] = exp2f(s[n][2 * r + 1] - base);
            sum += s[n][2 * r] + s[n][2 * r + 1];
        }
        st.l[r] = st.l[r] * alpha[r] + sum;
        st.m[r] = m_new;
    }
}

__device__ __forceinline__ void rescale_o(float o[16][4], const float alpha[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int d = 0; d < 16; ++d) {
            o[d][2 * r] *= alpha[r];
            o[d][2 * r + 1] *= alpha[r];
        }
}

// online_softmax_deferred, then O's rescale.
template <int NT>
__device__ __forceinline__ void online_softmax(RowState& st, float s[][4], float o[16][4]) {
    float alpha[2];
    online_softmax_deferred<NT>(st, s, alpha);
    rescale_o(o, alpha);
}
