"""FlashInfer's FA3 single prefill on one case (a chunk over a prior context), launched a few
times, for Nsight Compute to profile one launch. Usage (carry .anchors; scripts/gpu-run.sh ncuprior runs it):
    PYTHONPATH=/tmp/site python3 fa3_one.py CHUNK PRIOR HEADS KV_HEADS"""
import sys

import torch
import flashinfer

chunk, prior, heads, kv_heads = (int(x) for x in sys.argv[1:5])
torch.manual_seed(0)
dev = torch.device("cuda")
q = torch.randn(chunk, heads, 128, dtype=torch.bfloat16, device=dev)
k = torch.randn(prior + chunk, kv_heads, 128, dtype=torch.bfloat16, device=dev)
v = torch.randn(prior + chunk, kv_heads, 128, dtype=torch.bfloat16, device=dev)
for _ in range(5):
    o = flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True, backend="fa3")
torch.cuda.synchronize()
print("fa3 ok", tuple(o.shape), float(o.float().abs().mean()))
