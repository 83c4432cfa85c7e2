// Warp-specialized causal prefill over the per-slot layout (FlashAttention-3's
// structure, sm_90a): 128 query rows of one head per CTA, a producer warp's
// TMA ring of 128-key K/V tiles (2 stages), two consumer warpgroups taking
// turns on the tensor cores (ping-pong: one's softmax under the other's
// GEMMs); see slot_prefill_ws.cuh.
#include "slot_prefill_ws.cuh"

// One entry point per (K/V stages, K loaded ahead of V) variant; the same
// arguments (kernels/src/lib.rs).
#if ATT_WGMMA
#define WSP_BODY(STAGES, KAHEAD)                                                                                  \
    prefill_ws<STAGES, KAHEAD>(q, out, work, q_start, ctx_len, q_len, slots, heads, group, scale, &kmap, &vmap, \
                               blockIdx.x, blockIdx.y);
#else
#define WSP_BODY(STAGES, KAHEAD) __trap(); /* sm_90a only (the host checks) */
#endif
#define WSP_ENTRY(NAME, STAGES, KAHEAD)                                                                             \
    extern "C" __global__ void __launch_bounds__(WS_THREADS, 1)                                                     \
        NAME(const __nv_bfloat16* q, __nv_bfloat16* out, const int32_t* work, const int32_t* q_start,               \
             const int32_t* ctx_len, const int32_t* q_len, const int32_t* slots, int heads, int group, float scale, \
             const __grid_constant__ TmaMap kmap, const __grid_constant__ TmaMap vmap) {                            \
        WSP_BODY(STAGES, KAHEAD)                                                                                    \
    }

WSP_ENTRY(slot_prefill_wsp_bf16, 2, false)
// A/B variants: a 3-stage K/V ring (225 KiB of shared memory: a tile further
// ahead for long prior contexts), and the producer loading K one tile ahead
// of V (ws_produce's and ws_consume's KAHEAD).
WSP_ENTRY(slot_prefill_wsp3_bf16, 3, false)
WSP_ENTRY(slot_prefill_wspk_bf16, 2, true)
