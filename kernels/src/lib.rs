//! CUDA kernel sources (`kernels/src/*.cu`), their nvcc build (`build.rs`) and
//! the FFI declarations the attention backends' candle custom ops call.
//!
//! The `reference` backend needs no kernel of ours (candle's own CUDA kernels
//! run it), so the list of compiled kernels is still empty; the paged,
//! vAttention and POD kernels are added here, one instantiation per `.cu`
//! file, each listed in `build.rs`.

/// Names of the kernels compiled into this build (empty without the `cuda`
/// feature, or before any kernel exists).
pub const COMPILED_KERNELS: &[&str] = &[];

/// Whether this build was made with the `cuda` feature.
pub const CUDA_ENABLED: bool = cfg!(feature = "cuda");
