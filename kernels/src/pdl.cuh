// Programmatic dependent launch (Hopper): a kernel launched with the
// programmatic-stream-serialization attribute (`ops::cuda::Launch` with
// PDL on) may start while the kernel before it in the stream is still
// running, once every CTA of that kernel has called pdl_launch_dependents()
// or exited. It must then call pdl_wait() before it reads anything that an
// earlier kernel wrote or writes anything that an earlier kernel reads:
// pdl_wait() returns when the previous grid has completed and its memory
// is visible. Every kernel launched this way calls pdl_wait() on every
// path (so that "this grid completed" still implies "every earlier grid
// completed" for the kernel after it); before it, a kernel may only read
// what no kernel of the step writes (weights: the projections issue their
// first weight loads there).
//
// Without the attribute (or before sm_90) both are no-ops: the kernel
// starts after the previous one has finished, as any launch.
#pragma once
#include <stdint.h>

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel in the stream be scheduled (its CTAs take SM slots
// as this grid's CTAs leave). Called after pdl_wait(): at most two
// kernels overlap.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
