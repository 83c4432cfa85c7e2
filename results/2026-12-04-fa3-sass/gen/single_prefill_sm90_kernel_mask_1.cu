#include <flashinfer/attention/hopper/prefill_sm90.cuh>
#include "single_prefill_sm90_config.inc"

using namespace flashinfer;

namespace flashinfer {

template cudaError_t SinglePrefillWithKVCacheDispatched
    <128, 128, MaskMode::kCausal, /*USE_SLIDING_WINDOW=*/false, DefaultAttention<false>, Params>(
    Params& params, cudaStream_t stream);

};
