//! KV-cache storage for the attention backends.
//!
//! This crate owns *where* keys and values live and how that memory is
//! accounted; it knows no attention math. Its principal type today is
//! [`SeqKvStore`], the simple per-sequence store behind the `reference`
//! backend: one growable contiguous K and V tensor per (sequence, layer).
//! The paged block pool (vLLM style) and the vAttention virtual cache join it
//! behind the scheduler-facing verbs `can_admit / admit / can_grow / grow /
//! release`.
//!
//! Index vocabulary shared with `vpod-attention`:
//!
//! ```text
//!   |<------ context_len ------>|<-- query_len -->|
//!   [ tokens already in the cache ][ new this step ]
//!   |<------------------ seq_len ------------------>|
//! ```

mod error;
mod layout;
mod seq_store;

pub use error::{KvCacheError, Result};
pub use layout::{BLOCK_SIZES, PagedLayout, SlotLayout};
pub use seq_store::{KvShape, SeqKvStore};

/// Identifies one sequence (request) across steps.
pub type SeqId = u64;
