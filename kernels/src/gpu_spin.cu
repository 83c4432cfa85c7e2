// One thread spinning for a number of SM cycles: benchmarks launch it before
// a timed kernel, so that the host has queued the whole timed launch by the
// time the GPU reaches it (no launch latency inside the measured interval)
// and the GPU starts it from a light load, as FlashInfer's harness does with
// torch.cuda._sleep.
#include <cstdint>

extern "C" __global__ void gpu_spin(long long cycles) {
    const long long t0 = clock64();
    while (clock64() - t0 < cycles) {
    }
}
