// y[r, j] = silu(gu[r, j]) * gu[r, F + j] for gu = x . [gate; up]^T
// ([rows, 2F], the matmul's output) -> y [rows, F], bf16, 8 outputs a thread
// (16-byte loads and stores: F % 8 == 0, 16-byte aligned rows). One pass
// over gu instead of candle's strided silu and mul over its two halves.
#include "pdl.cuh"
#include "swiglu.cuh"

extern "C" __global__ void swiglu_bf16(const __nv_bfloat16* __restrict__ gu, __nv_bfloat16* __restrict__ y, int rows,
                                       int F) {
    const int per_row = F / 8;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    pdl_wait();
    pdl_launch_dependents();
    if (i >= (size_t)rows * per_row) return;
    const size_t r = i / per_row, c = (i % per_row) * 8;
    const uint4 g4 = *reinterpret_cast<const uint4*>(gu + r * 2 * F + c);
    const uint4 u4 = *reinterpret_cast<const uint4*>(gu + r * 2 * F + F + c);
    const __nv_bfloat16* g = reinterpret_cast<const __nv_bfloat16*>(&g4);
    const __nv_bfloat16* u = reinterpret_cast<const __nv_bfloat16*>(&u4);
    uint4 o4;
    __nv_bfloat16* o = reinterpret_cast<__nv_bfloat16*>(&o4);
#pragma unroll
    for (int k = 0; k < 8; ++k) o[k] = silu_gate_bf16(__bfloat162float(g[k]), __bfloat162float(u[k]));
    *reinterpret_cast<uint4*>(y + r * F + c) = o4;
}
