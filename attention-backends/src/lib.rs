//! Attention backends: the [`AttentionBackend`] trait, the per-step
//! [`BatchMeta`] every backend reads, and the backends themselves, chosen at
//! run time by name through [`create_backend`].
//!
//! The model makes exactly one call per layer, [`AttentionStep::attend`],
//! handing over this step's queries and new keys/values of the *packed
//! batch* (the tokens of all scheduled sequences, one after the other). The
//! backend writes the new K/V into its cache and attends each sequence's
//! queries over that sequence's whole context. The model never knows which
//! backend or cache it talks to.
//!
//! Index vocabulary (the same words are used in every backend and kernel):
//!
//! ```text
//!  packed batch (T = num_tokens):
//!  |<- seq 0 query ->|<---- seq 1 query ---->|<- seq 2 ->|
//!  query_start[0]     query_start[1]          query_start[2]     query_start[3] = T
//!
//!  one sequence:
//!  |<------- context_len -------->|<--- query_len --->|
//!  [ tokens already in the KV cache ][ new this step   ]
//!  |<-------------------- seq_len ------------------->|
//!  query token i sits at position context_len + i and attends to keys 0..=context_len + i
//! ```
//!
//! Backends today: `reference` (plain candle ops, any device and dtype, a
//! per-sequence KV store; the oracle every other backend is tested against).

mod error;
pub mod linear;
mod meta;
pub mod ops;
mod reference;

use candle_core::{DType, Device, Tensor};

pub use error::{AttnError, Result};
pub use meta::{BatchMeta, LogitsAt, SeqChunk};
pub use reference::ReferenceBackend;
pub use vpod_kvcache::SeqId;

/// The attention geometry of a model, as the backends and caches need it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnConfig {
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: `num_heads` is a multiple of it).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Longest sequence (prompt + generated tokens) a request may reach.
    pub max_seq_len: usize,
    /// Dtype of q/k/v and of the KV cache.
    pub dtype: DType,
}

impl AttnConfig {
    /// Query heads served by each key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// One attention implementation together with the KV cache it reads.
///
/// Shapes of one call (T = tokens of the packed batch, see [`BatchMeta`]):
/// `q: [T, num_heads, head_dim]`, `k`, `v: [T, num_kv_heads, head_dim]`,
/// result `[T, num_heads, head_dim]`.
pub trait AttentionBackend: Send + std::fmt::Debug {
    /// The name it is selected by (`--backend NAME`).
    fn name(&self) -> &'static str;

    /// Writes the step's new `k`/`v` of `layer` into the cache after each
    /// sequence's `context_len` cached tokens, then attends every query token
    /// causally over its sequence's first `context_len + i + 1` keys.
    fn forward(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        meta: &BatchMeta,
    ) -> Result<Tensor>;

    /// Frees the KV of a finished (or preempted) sequence.
    fn release(&mut self, seq: SeqId);
}

/// What one model forward pass needs to call attention: the backend (with
/// its cache) and this step's metadata. Each layer calls [`Self::attend`] once.
#[derive(Debug)]
pub struct AttentionStep<'a> {
    backend: &'a mut dyn AttentionBackend,
    meta: &'a BatchMeta,
}

impl<'a> AttentionStep<'a> {
    pub fn new(backend: &'a mut dyn AttentionBackend, meta: &'a BatchMeta) -> Self {
        Self { backend, meta }
    }

    pub fn meta(&self) -> &BatchMeta {
        self.meta
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// `q: [T, num_heads, head_dim]`, `k`, `v: [T, num_kv_heads, head_dim]` -> `[T, num_heads, head_dim]`.
    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.backend.forward(layer, q, k, v, self.meta)
    }
}

/// A backend the registry knows: its name, what it is, whether it can run
/// here and how to build it.
#[derive(Debug, Clone, Copy)]
pub struct BackendInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// Reasons it cannot run this model on this device; empty when it can.
    pub check: fn(&AttnConfig, &Device) -> Vec<String>,
    build: fn(&AttnConfig, &Device) -> Result<Box<dyn AttentionBackend>>,
}

/// Every backend, in the order `--backend` help lists them.
pub const BACKENDS: &[BackendInfo] = &[BackendInfo {
    name: "reference",
    description: "plain candle ops over a per-sequence KV store; any device, any dtype (the correctness oracle)",
    check: ReferenceBackend::unsupported_reasons,
    build: |cfg, dev| Ok(Box::new(ReferenceBackend::new(cfg.clone(), dev.clone())?)),
}];

/// Looks a backend up by name.
pub fn backend_info(name: &str) -> Result<&'static BackendInfo> {
    BACKENDS
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| AttnError::UnknownBackend {
            name: name.to_string(),
            known: backend_names(),
        })
}

/// Comma-separated names of all backends.
pub fn backend_names() -> String {
    BACKENDS.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
}

/// Builds the backend `name` for this model and device, or says why it cannot run.
pub fn create_backend(name: &str, cfg: &AttnConfig, device: &Device) -> Result<Box<dyn AttentionBackend>> {
    let info = backend_info(name)?;
    let reasons = (info.check)(cfg, device);
    if !reasons.is_empty() {
        return Err(AttnError::Unsupported {
            backend: info.name,
            reasons: reasons.join("; "),
        });
    }
    (info.build)(cfg, device)
}
