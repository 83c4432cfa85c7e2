// Greedy sampling on the device: out[r] = the index of the first maximum of
// logits row r ([rows, n] f32), exactly as the engine's CPU `argmax` picks it
// (a strict `>` scan from index 0: NaNs never win, the first of equal maxima
// wins, and a row whose element 0 is NaN gives 0). One block per row; a step
// then copies 4 bytes a row to the host instead of its whole logits row (0.5 MB
// with a 128K vocabulary) and the host no longer scans it. Bit 31 of out[r]
// is set when the row holds a NaN or an infinity (ARGMAX_NONFINITE): the
// engine refuses such a row, and needs no second pass or copy to know it.
#include <stdint.h>

#include "pdl.cuh"

// (value, index) pairs: b replaces a when it is larger, or equal and earlier.
__device__ __forceinline__ void better(float& v, int& i, float bv, int bi) {
    if (bv > v || (bv == v && bi < i)) {
        v = bv;
        i = bi;
    }
}

extern "C" __global__ void argmax_f32(const float* __restrict__ logits, uint32_t* __restrict__ out, int n) {
    const float* x = logits + (size_t)blockIdx.x * n;
    pdl_wait();
    pdl_launch_dependents();
    // Starting at -inf, an all -inf row still picks its first index (by equality).
    float v = __int_as_float(0xff800000);
    int i = INT32_MAX;
    int bad = 0;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float xj = x[j];
        bad |= !isfinite(xj);
        better(v, i, xj, j);
    }
    bad = __syncthreads_or(bad);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        better(v, i, ov, oi);
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
        sv[warp] = v;
        si[warp] = i;
    }
    __syncthreads();
    if (warp == 0) {
        const int warps = blockDim.x / 32;
        v = lane < warps ? sv[lane] : __int_as_float(0xff800000);
        i = lane < warps ? si[lane] : INT32_MAX;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, v, o);
            const int oi = __shfl_xor_sync(0xffffffffu, i, o);
            better(v, i, ov, oi);
        }
        // Element 0 NaN: the CPU scan compares everything against NaN and
        // keeps 0; an all-NaN row also ends at 0.
        if (lane == 0)
            out[blockIdx.x] = ((x[0] != x[0] || i == INT32_MAX) ? 0u : (uint32_t)i) | (bad ? 0x80000000u : 0u);
    }
}
