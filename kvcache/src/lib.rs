//! KV-cache storage for the attention backends.
//!
//! This crate owns *where* keys and values live and how that memory is
//! accounted; it knows no attention math. Its principal type today is
//! [`SeqKvStore`], the simple per-sequence store behind the `reference`
//! backend: one growable contiguous K and V tensor per (sequence, layer).
//! [`PagedCache`] is vLLM's block pool with per-sequence block tables, and
//! [`VirtualCache`] the vAttention cache (virtually contiguous slots, pages
//! committed on demand; this is its CPU twin over `mmap`). Both serve the
//! scheduler through [`KvManager`]: `can_admit / admit / can_grow / grow /
//! release` and a free-capacity count.
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
mod manager;
mod memory;
mod paged;
mod seq_store;
mod virt;
#[cfg(feature = "cuda")]
mod vmm;

#[cfg(test)]
mod props;

pub use error::{KvCacheError, Result};
pub use layout::{BLOCK_SIZES, PagedLayout, SlotLayout};
pub use manager::KvManager;
pub use paged::{BlockPool, PagedCache};
pub use seq_store::{KvShape, SeqKvStore};
pub use virt::{DEFAULT_PAGE_SIZE, Kv, Mapping, SlotView, VirtualCache, VirtualConfig};
#[cfg(feature = "cuda")]
pub use vmm::vmm_granularity;

/// Identifies one sequence (request) across steps.
pub type SeqId = u64;
