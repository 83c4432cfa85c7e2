//! CUDA kernel sources (`kernels/src/*.cu`, one instantiation per file), their
//! nvcc build (`build.rs`) and the kernels' calling conventions.
//!
//! With the `cuda` feature every kernel is compiled to a fatbin (sm_90a
//! cubin + compute_80 PTX) and embedded here as a [`Kernel`]; the safe
//! wrappers (candle custom ops) that load and launch them live with the
//! attention backends. Without the feature [`KERNELS`] is empty and no CUDA
//! toolkit is needed.
//!
//! Signatures (all `extern "C"`, one thread block per token):
//!
//! ```text
//! paged_write_kv_{bf16,f32}(T* cache, const T* src, const int64_t* slot_mapping,
//!                           int64_t src_stride, int kv_heads, int head_dim, int block_size, int is_value)
//!     K cache [num_blocks, kv_heads, head_dim/x, block_size, x] (x = 16 bytes) when is_value == 0,
//!     V cache [num_blocks, kv_heads, head_dim, block_size] otherwise; slot -1 skips a token.
//! slot_write_kv_{bf16,f32}(T* cache, const T* src, const int64_t* rows, int64_t src_stride, int row_elems)
//!     cache [rows, row_elems]; row = slot * max_len + position for a dense cache tensor, or
//!     (slot * slot_stride + position * pos_stride) / row_elems in the VMM cache; -1 skips a token;
//!     row_elems and src_stride in bytes must be multiples of 16.
//! gemv_bf16(const bf16* w, const bf16* x, const bf16* residual, bf16* y, int M, int N, int K, int epi)
//!     y [M, N] = x [M, K] . w [N, K]^T, M <= 8, K % 8 == 0; epi 1 adds residual [M, N];
//!     epi 2: w = [gate; up] with 2N rows, y = silu(x gate^T) * (x up^T).
//! swiglu_bf16(const bf16* gu, bf16* y, int rows, int F)
//!     y [rows, F] = silu(gu[:, :F]) * gu[:, F:] (gu = x . [gate; up]^T, [rows, 2F]), F % 8 == 0, 8 outputs a thread.
//! rope_qk_bf16(const bf16* qkv, const bf16* cos, const bf16* sin, bf16* out, int T, int heads, int kv_heads,
//!              int d, int64_t row)
//!     qkv [T, row] (q heads, k heads, v heads), cos/sin [T, d/2] -> out = q [T, heads, d] then k [T, kv_heads, d],
//!     rotated (non-interleaved halves); d % 16 == 0, 16-byte aligned rows; 8 pairs a thread.
//! argmax_f32(const float* logits, uint32_t* out, int n)
//!     grid rows, 1024 threads: out[r] = first index of the maximum of logits row r ([rows, n]); NaNs never
//!     win; a row whose element 0 is NaN gives 0 (the CPU argmax's strict `>` scan).
//! slot_decode_bf16(const bf16* q, const int* q_rows, const bf16* k_base, const bf16* v_base, const int* slots,
//!                  const int* seq_lens, float* part_o, float* part_ml, int* counters, bf16* out, int heads,
//!                  int group, int64_t slot_stride, int64_t pos_stride, int splits, float scale)
//!     grid (splits, kv_heads, batch), 128 threads, 96 KiB dynamic smem; K/V row of (slot, position) at
//!     base + slot * slot_stride + position * pos_stride (+ kv_head * 128) elements; group <= 16;
//!     partials [batch * heads, splits] x (o[128], (m, l)) in the log2 domain; with counters
//!     ([batch * kv_heads], zeroed) the last block merges into out rows q_rows, else (null) the combine does.
//! slot_decode_slim_bf16(the same arguments)
//!     the same with transposed products (GQA group <= 8): 128 threads (4 warps, one per SM
//!     sub-partition), 64-key tiles, 64 KiB dynamic smem (2 stages), at most 104 registers a thread:
//!     a block fits on an SM beside a slot_prefill_wsps_bf16 block.
//! slot_decode_slimr_bf16(the same arguments)
//!     slot_decode_slim_bf16 with a ring a warp: each warp streams its own 16 keys of every 64-key tile
//!     through 4 slots of 4 KiB (K and V apart) of the same 64 KiB, refilled as soon as read (48 KiB in
//!     flight a block), no block barrier in the key loop; 104 registers, no spills.
//! slot_decode_combine_bf16(const float* part_o, const float* part_ml, const int* q_rows, bf16* out,
//!                          int heads, int splits)
//!     grid batch * heads, 128 threads: out = sum_p 2^(m_p - M) o_p / sum_p 2^(m_p - M) l_p.
//! paged_decode_v{1,2}_b{16,32,64,128}_bf16(float* exp_sums, float* max_logits, bf16* out, const bf16* q,
//!                          const int* q_rows, const bf16* k_cache, const bf16* v_cache, const int* block_tables,
//!                          const int* context_lens, int max_blocks, int heads, int kv_heads, float scale)
//!     vLLM v0.2.7's algorithm (paged_decode.cuh). v1: grid (heads, batch), out = rows q_rows of [rows, heads,
//!     128]; v2: grid (heads, batch, max_partitions of 512 tokens), out = tmp_out [batch, heads, max_partitions,
//!     128] with exp_sums / max_logits [batch, heads, max_partitions]; 128 threads; dynamic smem 4 *
//!     max(tokens, 256) bytes (tokens: the padded context for v1, 512 for v2).
//! paged_decode_reduce_bf16(bf16* out, const float* exp_sums, const float* max_logits, const bf16* tmp_out,
//!                          const int* q_rows, const int* context_lens, int heads, int max_partitions)
//!     grid (heads, batch), 128 threads, 8 * max_partitions bytes of dynamic smem.
//! paged_prefill_bf16(const bf16* q, bf16* out, const bf16* k_cache, const bf16* v_cache, const int* work,
//!                    const int* q_start, const int* ctx_len, const int* q_len, const int* block_tables,
//!                    int max_blocks, int heads, int group, int kv_heads, int block_log2, float scale)
//!     slot_prefill_w8's tiles over the paged layout; chunk c's block table is row c of block_tables.
//! slot_prefill_w{4,8}_bf16(const bf16* q, bf16* out, const bf16* k_base, const bf16* v_base, const int* work,
//!                          const int* q_start, const int* ctx_len, const int* q_len, const int* slots,
//!                          int heads, int group, int64_t slot_stride, int64_t pos_stride, float scale)
//!     grid (work items, heads), 32 * {4,8} threads, 65 KiB dynamic smem (1 KiB to align the K/V stages; Q passes through a stage); work = (chunk, first
//!     query row) per 16 * {4,8}-row query tile; causal over keys 0 ..= ctx_len + j of the chunk's slot.
//! slot_prefill_w4p_bf16(the same arguments)
//!     slot_prefill_w4 with the softmax of key tile i overlapped with the PV wgmma of tile i-1
//!     (prefill_tile_pipelined<3>), 97 KiB dynamic smem (3 K/V stages).
//! slot_prefill_w4t_bf16(const bf16* q, bf16* out, const int* work, const int* q_start, const int* ctx_len,
//!                       const int* q_len, const int* slots, int heads, int group, float scale,
//!                       __grid_constant__ TmaMap kmap, __grid_constant__ TmaMap vmap)
//!     slot_prefill_w4p with K/V tiles by TMA (sm_90a): kmap / vmap are CUtensorMaps of the layer's K and V,
//!     dims (kv_heads * 128, max_len, slots), 64 x 64 boxes, 128-byte swizzle (tma.cuh).
//! gpu_spin(long long cycles)
//!     grid 1, 1 thread: spins for `cycles` SM cycles (benchmarks).
//! slot_prefill_wsp_bf16(slot_prefill_w4t_bf16's arguments, then int l2_heads)
//!     warp-specialized (sm_90a): grid heads x work items (1-D) with 128-row work items, the CTAs in
//!     sections of l2_heads query heads (whole KV heads whose K/V fit in L2; <= 0: one section), in a
//!     section by work item (heaviest first) with its heads fastest (ws_l2_order), 384 threads
//!     (a TMA producer warpgroup loading K one tile ahead of V, two 64-row consumer warpgroups in
//!     ping-pong), WsShape<2>::SMEM dynamic smem (2 K/V stages); the tensor maps' boxes are 64
//!     dims x 128 rows (slot_prefill_ws.cuh).
//! slot_prefill_wsps_bf16(the same arguments)
//!     the same launched at 136 registers a thread (consumers 192, producer 24; 52 K a block), leaving
//!     an SM room for a slot_decode_slim_bf16 block.
//! pod_bf16(const bf16* q, bf16* out, const bf16* k_base, const bf16* v_base, int heads, int group,
//!          int64_t slot_stride, int64_t pos_stride, float scale, const int* work, const int* q_start,
//!          const int* ctx_len, const int* q_len, const int* slots, int n_work, const int* dec_rows,
//!          const int* dec_slots, const int* dec_lens, float* part_o, float* part_ml, int* counters,
//!          int kv_heads, int splits, int n_decodes, int* sched, int nsm, int policy, int ratio_p, int ratio_d,
//!          int l2_heads, __grid_constant__ TmaMap kmap, __grid_constant__ TmaMap vmap)
//! podp_bf16, pod3_bf16, podp_tma_bf16, pod3_tma_bf16, pod_wsd_bf16, pod_wsds_bf16 (the same arguments)
//!     kmap / vmap: read by the _tma entries only (as slot_prefill_w4t's).
//!     1-D grid of n_work * heads + splits * kv_heads * n_decodes blocks, 128 threads, 96 KiB dynamic smem
//!     (podp: 97 KiB, the pipelined prefill tile; pod3: 65 KiB, 3 blocks per SM, 2-stage decode pipeline):
//!     each block runs one slot_prefill_w4 tile or one slot_decode split, picked by the SM it runs on
//!     (pod_bf16.cu); sched holds 3 + 2 * nsm ints, zero before the first launch (the kernel re-zeroes them).
//!     pod_wsd_bf16 (sm_90a): n_work * heads + SMs blocks of 384 threads, 192 KiB dynamic smem,
//!     work items of 128 rows, kmap / vmap with 128-row boxes; the first ratio_d blocks to start stream
//!     decode items (2 warpgroups x 3 stages), every other block runs one warp-specialized prefill
//!     tile (slot_prefill_ws.cuh) or, once those are gone, decode items; policy and ratio_p unused.
//!     pod_wsds_bf16: the same with the prefill role's consumers at 192 registers (slot_prefill_wsps').
//!     Every entry takes its prefill items in slot_prefill_wsp's L2 order (sections of l2_heads).
//! pod_nsmid(int* out)
//!     one thread: out = %nsmid (the SM-id range pod_bf16's sched is sized by).
//! ```

/// One compiled kernel.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// The `.cu` file's stem (one module).
    pub name: &'static str,
    /// Its `extern "C"` kernels (usually just `name`).
    pub symbols: &'static [&'static str],
    pub doc: &'static str,
    /// Fatbin image for `cuModuleLoadData`.
    pub fatbin: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The compiled module holding the kernel `symbol`, if this build has it.
pub fn kernel(symbol: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.symbols.contains(&symbol))
}

/// Whether this build was made with the `cuda` feature.
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");
