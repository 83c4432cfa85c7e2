/// Errors of the attention layer.
#[derive(Debug, thiserror::Error)]
pub enum AttnError {
    #[error("unknown attention backend '{name}' (known: {known})")]
    UnknownBackend { name: String, known: String },
    #[error("attention backend '{backend}' cannot run here: {reasons}")]
    Unsupported { backend: &'static str, reasons: String },
    #[error("invalid batch: {0}")]
    InvalidBatch(String),
    #[error("{what} has shape {got:?}, expected {expected:?}")]
    BadShape {
        what: &'static str,
        got: Vec<usize>,
        expected: Vec<usize>,
    },
    #[error(transparent)]
    KvCache(#[from] vpod_kvcache::KvCacheError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, AttnError>;
