// The SiLU gate of a Llama MLP as transformers computes it in bf16: gate and
// up are bf16 (the projections' outputs), silu(gate) is rounded to bf16,
// then the product. Shared by the GEMV epilogue and the gate kernel.
#pragma once
#include <cuda_bf16.h>

__device__ __forceinline__ __nv_bfloat16 silu_gate_bf16(float g, float u) {
    const float s = __bfloat162float(__float2bfloat16(g / (1.f + __expf(-g))));
    return __float2bfloat16(s * u);
}
