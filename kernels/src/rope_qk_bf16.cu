// RoPE on a step's queries and keys straight out of the fused QKV projection,
// in one pass: qkv [T, row] (row >= (heads + 2 * kv_heads) * d elements: q
// heads, then k heads, then v) and cos / sin [T, d / 2] -> out = q [T, heads,
// d] followed by k [T, kv_heads, d], both contiguous (what the attention ops
// take). Non-interleaved halves (x1 = x[:d/2], x2 = x[d/2:]) with
// transformers' bf16 roundings: each product rounded, then the sum:
//   out1 = x1 cos - x2 sin,  out2 = x2 cos + x1 sin.
// Before: candle copied the q/k columns out of qkv, rotated them, and the
// attention op copied q again (three passes, 61 us at 1024 tokens of
// Llama-3-8B on the H100). 8 pairs a thread (16-byte loads), d % 16 == 0.
#include <cuda_bf16.h>
#include <stdint.h>

#include "pdl.cuh"

__device__ __forceinline__ float r16(float x) { return __bfloat162float(__float2bfloat16(x)); }

// Rotates 8 pairs of one head: x[c..c+8] with x[half+c..half+c+8] by token
// t's angles (cos / sin rows of half elements) into o at the same columns.
__device__ __forceinline__ void rotate8(const __nv_bfloat16* __restrict__ x, const __nv_bfloat16* __restrict__ cos,
                                        const __nv_bfloat16* __restrict__ sin, __nv_bfloat16* __restrict__ o,
                                        int64_t t, int half, int c) {
    const uint4 a4 = *reinterpret_cast<const uint4*>(x + c);
    const uint4 b4 = *reinterpret_cast<const uint4*>(x + half + c);
    const uint4 c4 = *reinterpret_cast<const uint4*>(cos + t * half + c);
    const uint4 s4 = *reinterpret_cast<const uint4*>(sin + t * half + c);
    const __nv_bfloat16* a = reinterpret_cast<const __nv_bfloat16*>(&a4);
    const __nv_bfloat16* b = reinterpret_cast<const __nv_bfloat16*>(&b4);
    const __nv_bfloat16* cs = reinterpret_cast<const __nv_bfloat16*>(&c4);
    const __nv_bfloat16* sn = reinterpret_cast<const __nv_bfloat16*>(&s4);
    uint4 o1, o2;
    __nv_bfloat16* p = reinterpret_cast<__nv_bfloat16*>(&o1);
    __nv_bfloat16* q = reinterpret_cast<__nv_bfloat16*>(&o2);
#pragma unroll
    for (int k = 0; k < 8; ++k) {
        const float x1 = __bfloat162float(a[k]), x2 = __bfloat162float(b[k]);
        const float co = __bfloat162float(cs[k]), si = __bfloat162float(sn[k]);
        p[k] = __float2bfloat16(r16(x1 * co) - r16(x2 * si));
        q[k] = __float2bfloat16(r16(x2 * co) + r16(x1 * si));
    }
    *reinterpret_cast<uint4*>(o + c) = o1;
    *reinterpret_cast<uint4*>(o + half + c) = o2;
}

extern "C" __global__ void rope_qk_bf16(const __nv_bfloat16* __restrict__ qkv, const __nv_bfloat16* __restrict__ cos,
                                        const __nv_bfloat16* __restrict__ sin, __nv_bfloat16* __restrict__ out, int T,
                                        int heads, int kv_heads, int d, int64_t row) {
    const int half = d / 2, per_head = half / 8, nh = heads + kv_heads;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    pdl_wait();
    pdl_launch_dependents();
    if (i >= (int64_t)T * nh * per_head) return;
    const int c = (int)(i % per_head) * 8;
    const int h = (int)(i / per_head % nh);
    const int64_t t = i / per_head / nh;
    const __nv_bfloat16* x = qkv + t * row + (int64_t)h * d;
    __nv_bfloat16* o = h < heads ? out + (t * heads + h) * d
                                 : out + (int64_t)T * heads * d + (t * kv_heads + (h - heads)) * d;
    rotate8(x, cos, sin, o, t, half, c);
}

// A decode step's RoPE and K/V write in one launch (the vattention backend's
// decode-only steps): the q heads rotated into q_out [T, heads, d] as
// rope_qk_bf16 writes them, the k heads rotated and the v heads copied
// straight into the per-slot caches at row rows[t] (row_elems = kv_heads * d
// elements a row; -1 skips the token's K/V). Same arithmetic as
// rope_qk_bf16 followed by slot_write_kv2_bf16, one kernel a layer fewer.
// Threads: T * (heads + kv_heads) * d / 16 rotate 8 pairs each, then
// T * kv_heads * d / 8 copy 8 v elements each.
extern "C" __global__ void rope_write_kv_bf16(const __nv_bfloat16* __restrict__ qkv,
                                              const __nv_bfloat16* __restrict__ cos,
                                              const __nv_bfloat16* __restrict__ sin,
                                              __nv_bfloat16* __restrict__ q_out, __nv_bfloat16* __restrict__ kcache,
                                              __nv_bfloat16* __restrict__ vcache, const int64_t* __restrict__ rows,
                                              int T, int heads, int kv_heads, int d, int64_t row) {
    const int half = d / 2, per_head = half / 8, nh = heads + kv_heads;
    const int64_t row_elems = (int64_t)kv_heads * d;
    const int64_t rot = (int64_t)T * nh * per_head;
    const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    pdl_wait();
    pdl_launch_dependents();
    if (i >= rot) {
        // V: 8 elements a thread.
        const int64_t j = i - rot, per_tok = row_elems / 8;
        if (j >= (int64_t)T * per_tok) return;
        const int64_t t = j / per_tok, e = (j % per_tok) * 8;
        const int64_t r = rows[t];
        if (r < 0) return;
        *reinterpret_cast<uint4*>(vcache + r * row_elems + e) =
            *reinterpret_cast<const uint4*>(qkv + t * row + (int64_t)nh * d + e);
        return;
    }
    const int c = (int)(i % per_head) * 8;
    const int h = (int)(i / per_head % nh);
    const int64_t t = i / per_head / nh;
    __nv_bfloat16* o;
    if (h < heads) {
        o = q_out + (t * heads + h) * d;
    } else {
        const int64_t r = rows[t];
        if (r < 0) return;
        o = kcache + r * row_elems + (int64_t)(h - heads) * d;
    }
    const __nv_bfloat16* x = qkv + t * row + (int64_t)h * d;
    rotate8(x, cos, sin, o, t, half, c);
}
