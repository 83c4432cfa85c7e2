// Hopper (sm_90a) warpgroup MMA for the attention tiles: `wgmma.mma_async`
// with A (Q, or P) in registers and B (K, or V) in shared memory through a
// matrix descriptor, f32 accumulators. Used by prefill_tile when the kernel
// is compiled for sm_90a (ATT_WGMMA); other targets keep the mma.sync path.
//
// K/V tiles for wgmma ("wg layout"): a tile of ROWS keys x 128 dims is two
// halves (dims 0..63, 64..127), each ROWS rows of 128 bytes with the 16-byte
// chunk c of row r at chunk position c ^ (r % 8): the hardware's 128-byte
// swizzle, so each 8-row group is one 1024-byte swizzle atom (tile base
// 1024-byte aligned). Descriptors (PTX ISA 9.7.15.5.1.2; checked on an H200
// against a CPU product):
//   S = Q K^T, B = K "K-major" (keys are N, dims are K), m64n64k16, step kk
//     of 16 dims: start = tile + (kk / 4) * ROWS * 128 + (kk % 4) * 32,
//     SBO = 1024 (next 8 keys), LBO unused (16).
//   O += P V, B = V "N-major" (trans-b; keys are K, dims are N), m64n128k16,
//     step j of 16 keys: start = tile + j * 16 * 128, LBO = ROWS * 128 (the
//     next 64 dims: the other half), SBO = 1024 (the next 8 keys).
// The accumulator fragment of m64nN is, per warp of the warpgroup, the
// mma.m16n8k16 C layout of its 16 rows repeated over N / 8 column blocks
// (s[8][4], o[16][4] as in the mma.sync path), and A from registers is the
// m16n8k16 A fragment: the FlashAttention-2 register reuse carries over.
//
// Generated wrappers below (one asm per shape); `accumulate == 0` ignores
// d's old values (D = A B), else D += A B.
#pragma once
#include <stdint.h>

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define ATT_WGMMA 1
#else
#define ATT_WGMMA 0
#endif

// Byte offset of chunk c (0..15) of row r in a wg-layout tile of ROWS rows.
template <int ROWS>
__device__ __forceinline__ uint32_t wg_off(int r, int c) {
    return static_cast<uint32_t>((c >> 3) * ROWS * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

// Shared-memory matrix descriptor, 128-byte swizzle, base offset 0.
__device__ __forceinline__ uint64_t wg_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
    return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>((lbo & 0x3FFFF) >> 4) << 16) |
           (static_cast<uint64_t>((sbo & 0x3FFFF) >> 4) << 32) | (1ull << 62);
}

// The wrappers exist on every target (so that `if constexpr` code using them
// compiles everywhere) but emit their instructions only under ATT_WGMMA; the
// kernels call them only when ATT_WGMMA is set.
#if ATT_WGMMA
#define WG_ASM(...) asm volatile(__VA_ARGS__)
#else
#define WG_ASM(...) \
    do {            \
    } while (0)
#endif

// Orders register writes before the next wgmma and makes later reads wait
// for wgmma.wait_group (the compiler sees the register "change" here).
__device__ __forceinline__ void wg_fence_operand(float& x) { WG_ASM("" : "+f"(x)::"memory"); }
template <int N>
__device__ __forceinline__ void wg_fence_operands(float* x) {
#pragma unroll
    for (int i = 0; i < N; ++i) wg_fence_operand(x[i]);
}
__device__ __forceinline__ void wg_fence() { WG_ASM("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { WG_ASM("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wg_wait() {
    WG_ASM("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Shared-memory writes of the generic proxy (cp.async) become visible to
// wgmma (async proxy) reads: each writing thread, before the barrier.
__device__ __forceinline__ void fence_proxy_async() { WG_ASM("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d[64 x 64] += a[64 x 16] (registers) * B[16 x 64] (K-major descriptor).
__device__ __forceinline__ void wgmma_qk_m64n64k16(float* d, const uint32_t a[4], uint64_t desc, int accumulate) {
    WG_ASM(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "
        "{%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

// d[64 x 128] += a[64 x 16] (registers) * B[16 x 128] (N-major descriptor, trans-b).
__device__ __forceinline__ void wgmma_pv_m64n128k16(float* d, const uint32_t a[4], uint64_t desc, int accumulate) {
    WG_ASM(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(accumulate));
}

// d[64 x 128] (+)= A[64 x 16] (shared memory, K-major descriptor) * B[16 x 128]
// (K-major descriptor): S = Q K^T of a 128-key tile with Q in shared memory
// (slot_prefill_ws.cuh; A's descriptor as B's with the Q tile's 64 rows).
__device__ __forceinline__ void wgmma_ss_m64n128k16(float* d, uint64_t adesc, uint64_t bdesc, int accumulate) {
    WG_ASM(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1, 0, 0;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(adesc), "l"(bdesc), "r"(accumulate));
}
