use crate::SeqId;

/// Errors of the KV-cache layer. "Cannot fit" conditions are values the
/// scheduler acts on (preempt, wait), never panics.
#[derive(Debug, thiserror::Error)]
pub enum KvCacheError {
    #[error("sequence {seq} is not in the KV cache")]
    UnknownSequence { seq: SeqId },
    #[error("layer {layer} out of range: the cache holds {num_layers} layers")]
    LayerOutOfRange { layer: usize, num_layers: usize },
    #[error(
        "KV for sequence {seq} layer {layer} has length {have} but the step expects {expected} cached tokens"
    )]
    LengthMismatch {
        seq: SeqId,
        layer: usize,
        have: usize,
        expected: usize,
    },
    #[error("wrong K/V shape {got:?}: expected (tokens, {kv_heads}, {head_dim})")]
    BadShape {
        got: Vec<usize>,
        kv_heads: usize,
        head_dim: usize,
    },
    #[error(
        "KV cache full: sequence {seq} needs {needed} tokens but the limit is {limit} tokens per sequence"
    )]
    SequenceTooLong { seq: SeqId, needed: usize, limit: usize },
    #[error(
        "KV cache out of memory: sequence {seq} needs {needed_tokens} more tokens, {free_tokens} are free"
    )]
    OutOfMemory {
        seq: SeqId,
        needed_tokens: usize,
        free_tokens: usize,
    },
    #[error("no free slot for sequence {seq}: all {max_seqs} are taken")]
    OutOfSlots { seq: SeqId, max_seqs: usize },
    #[error("KV cache device memory: {0}")]
    Device(String),
    #[error("KV layout: {0}")]
    Layout(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, KvCacheError>;
