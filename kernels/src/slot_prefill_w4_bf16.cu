// Causal prefill over the per-slot layout, bf16, head_dim 128, 4 warps = 64 query rows per block; see slot_prefill.cuh.
// slot_prefill_w4p_bf16: the same tile with its softmax overlapped with the tensor cores
// (prefill_tile_pipelined, 3 stages: 97 KiB of dynamic smem).
#include "slot_prefill.cuh"
#include "tma.cuh"

extern "C" __global__ void __launch_bounds__(4 * 32)
    slot_prefill_w4_bf16(const __nv_bfloat16* q, __nv_bfloat16* out, const __nv_bfloat16* k_base,
                         const __nv_bfloat16* v_base, const int32_t* work, const int32_t* q_start,
                         const int32_t* ctx_len, const int32_t* q_len, const int32_t* slots, int heads, int group,
                         int64_t slot_stride, int64_t pos_stride, float scale) {
    prefill_tile<4, 2>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, [=](int chunk, int kvh) {
        const size_t off = (size_t)slots[chunk] * slot_stride + (size_t)kvh * ATT_HEAD_DIM;
        return SlotKv<4 * 32>{k_base + off, v_base + off, pos_stride};
    }, blockIdx.x, blockIdx.y);
}

extern "C" __global__ void __launch_bounds__(4 * 32)
    slot_prefill_w4p_bf16(const __nv_bfloat16* q, __nv_bfloat16* out, const __nv_bfloat16* k_base,
                          const __nv_bfloat16* v_base, const int32_t* work, const int32_t* q_start,
                          const int32_t* ctx_len, const int32_t* q_len, const int32_t* slots, int heads, int group,
                          int64_t slot_stride, int64_t pos_stride, float scale) {
    prefill_tile_pipelined<3>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, [=](int chunk, int kvh) {
        const size_t off = (size_t)slots[chunk] * slot_stride + (size_t)kvh * ATT_HEAD_DIM;
        return SlotKv<4 * 32>{k_base + off, v_base + off, pos_stride};
    }, blockIdx.x, blockIdx.y);
}

// slot_prefill_w4p with its K/V tiles loaded by TMA (tma.cuh): one tensor map
// per K and V of the layer, dims (kv_heads * 128, max_len, slots).
extern "C" __global__ void __launch_bounds__(4 * 32)
    slot_prefill_w4t_bf16(const __nv_bfloat16* q, __nv_bfloat16* out, const int32_t* work, const int32_t* q_start,
                          const int32_t* ctx_len, const int32_t* q_len, const int32_t* slots, int heads, int group,
                          float scale, const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap) {
#if ATT_WGMMA
    __shared__ __align__(8) uint64_t bars[3];
    const uint32_t b = smem_addr(bars);
    TmaSlotKv::init(b, 3);
    __syncthreads();
    prefill_tile_pipelined<3>(q, out, work, q_start, ctx_len, q_len, heads, group, scale, [&](int chunk, int kvh) {
        return TmaSlotKv{&kmap, &vmap, kvh * ATT_HEAD_DIM, slots[chunk], b};
    }, blockIdx.x, blockIdx.y);
#else
    __trap();  // sm_90a only (the host checks)
#endif
}
