// Warp-specialized causal prefill over the per-slot layout (FlashAttention-3's
// structure, sm_90a): 128 query rows of one head per CTA, a producer warp's
// TMA ring of 128-key K/V tiles (2 stages, K one tile ahead of V), two
// consumer warpgroups taking turns on the tensor cores (ping-pong: one's
// softmax under the other's GEMMs); see slot_prefill_ws.cuh. Arguments as
// kernels/src/lib.rs lists them.
#include "slot_prefill_ws.cuh"

extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)
    slot_prefill_wsp_bf16(const __nv_bfloat16* q, __nv_bfloat16* out, const int32_t* work, const int32_t* q_start,
                          const int32_t* ctx_len, const int32_t* q_len, const int32_t* slots, int heads, int group,
                          float scale, const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap,
                          int l2_heads) {
#if ATT_WGMMA
    prefill_ws_nth<2>(q, out, work, q_start, ctx_len, q_len, slots, heads, group, scale, &kmap, &vmap, blockIdx.x,
                      gridDim.x, l2_heads);
#else
    __trap();  // sm_90a only (the host checks)
#endif
}

// The slim variant (the same arguments): launched at 136 registers a thread
// (the producer warpgroup keeps 24, the consumers take 192), 52 K registers a
// block instead of 64.5 K, so that a slot_decode_slim_bf16 block (4 warps at
// 104, 13 K; 64 KiB) fits on the same SM: with the two kernels on two streams, the
// decodes' memory traffic runs beside the prefill's GEMMs.
extern "C" __global__ void __maxnreg__(136)
    slot_prefill_wsps_bf16(const __nv_bfloat16* q, __nv_bfloat16* out, const int32_t* work, const int32_t* q_start,
                           const int32_t* ctx_len, const int32_t* q_len, const int32_t* slots, int heads, int group,
                           float scale, const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap,
                           int l2_heads) {
#if ATT_WGMMA
    prefill_ws_nth<2, 192>(q, out, work, q_start, ctx_len, q_len, slots, heads, group, scale, &kmap, &vmap,
                           blockIdx.x, gridDim.x, l2_heads);
#else
    __trap();  // sm_90a only (the host checks)
#endif
}
