//! The one interface the scheduler sees for every KV cache: admission,
//! growth and release, counted in tokens. "Cannot" is a value (`false`, or
//! [`KvCacheError::OutOfMemory`]), never a panic.
//!
//! [`KvCacheError::OutOfMemory`]: crate::KvCacheError::OutOfMemory

use crate::{Result, SeqId};

pub trait KvManager: std::fmt::Debug {
    /// Tokens that the cache could still hold for new or growing sequences
    /// (for the virtual cache this counts pages mapped to idle slots too).
    fn free_tokens(&self) -> usize;

    /// Tokens the whole cache holds.
    fn total_tokens(&self) -> usize;

    /// Longest sequence one request may reach.
    fn max_seq_len(&self) -> usize;

    /// Whether a new sequence of `tokens` tokens fits while keeping
    /// `reserve_tokens` free (the scheduler's watermark).
    fn can_admit(&self, tokens: usize, reserve_tokens: usize) -> bool;

    /// The longest sequence the *empty* cache would admit while keeping
    /// `reserve_tokens` free, in its own units (whole blocks or pages): a
    /// request longer than this can never run.
    fn max_admissible(&self, reserve_tokens: usize) -> usize;

    /// Allocates room for the first `tokens` tokens of a new sequence.
    fn admit(&mut self, seq: SeqId, tokens: usize) -> Result<()>;

    /// Whether `seq` can grow to `new_len` tokens.
    fn can_grow(&self, seq: SeqId, new_len: usize) -> bool;

    /// Makes room for `seq` to hold `new_len` tokens (no-op if it already can).
    fn grow(&mut self, seq: SeqId, new_len: usize) -> Result<()>;

    /// Frees `seq`'s KV (or, for the virtual cache, parks it for reuse).
    fn release(&mut self, seq: SeqId);

    /// Tokens `seq` can hold without growing; `None` if unknown.
    fn capacity(&self, seq: SeqId) -> Option<usize>;
}
