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
//!     cache [rows, row_elems]; row = slot * max_len + position; -1 skips a token;
//!     row_elems and src_stride in bytes must be multiples of 16.
//! gemv_bf16(const bf16* w, const bf16* x, const bf16* residual, bf16* y, int M, int N, int K, int epi)
//!     y [M, N] = x [M, K] . w [N, K]^T, M <= 8, K % 8 == 0; epi 1 adds residual [M, N];
//!     epi 2: w = [gate; up] with 2N rows, y = silu(x gate^T) * (x up^T).
//! slot_decode_g{1,4,7,8}_bf16(const bf16* q, const bf16* k, const bf16* v, const int* slots, const int* seq_lens,
//!                  float* part_o, float* part_ml, int heads, int kv_heads, int max_len, int splits, float scale)
//!     grid (splits, kv_heads, batch), 128 threads; K/V [max_seqs, max_len, kv_heads, 128];
//!     partials [batch * heads, splits] x (o[128], (m, l)).
//! slot_decode_combine_bf16(const float* part_o, const float* part_ml, bf16* out, int splits)
//!     grid batch * heads, 128 threads: out = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p.
//! ```

/// One compiled kernel.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// The `extern "C"` symbol, also the `.cu` file's stem.
    pub name: &'static str,
    pub doc: &'static str,
    /// Fatbin image for `cuModuleLoadData`.
    pub fatbin: &'static [u8],
}

include!(concat!(env!("OUT_DIR"), "/kernels.rs"));

/// The compiled kernel called `name`, if this build has it.
pub fn kernel(name: &str) -> Option<&'static Kernel> {
    KERNELS.iter().find(|k| k.name == name)
}

/// Whether this build was made with the `cuda` feature.
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");
