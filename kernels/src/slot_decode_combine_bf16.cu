// The combine step of the split-KV decode: one block per (sequence, head), one thread per dim.
#include "pdl.cuh"
#include "slot_decode.cuh"

extern "C" __global__ void slot_decode_combine_bf16(const float* part_o, const float* part_ml, const int32_t* q_rows,
                                                    __nv_bfloat16* out, int heads, int splits) {
    pdl_wait();
    pdl_launch_dependents();
    slot_decode_merge(part_o, part_ml, q_rows, out, heads, splits);
}
