use std::path::{Path, PathBuf};

/// Errors of loading and running a model. Each names the file, tensor or
/// setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
    #[error(
        "unknown model '{name}': not a preset ({presets}), not a local directory, and not a Hub repo id (owner/name)"
    )]
    UnknownModel { name: String, presets: String },
    #[error("model path {path} {reason}")]
    MissingPath { path: PathBuf, reason: String },
    #[error("{what} not found in {location}{hint}")]
    MissingFile {
        what: String,
        location: String,
        hint: String,
    },
    #[error("invalid {path}: {reason}")]
    BadConfig { path: String, reason: String },
    #[error(
        "unsupported architecture {found}: this model file serves LlamaForCausalLM checkpoints (Yi-6B, Llama-3-8B, Yi-34B)"
    )]
    UnsupportedArchitecture { found: String },
    #[error("tensor '{name}' is missing from the checkpoint ({location})")]
    MissingTensor { name: String, location: String },
    #[error("tensor '{name}' in {file} has shape {found:?}, but config.json implies {expected:?}")]
    WrongShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        file: PathBuf,
    },
    #[error(
        "tensor '{name}' in {file} holds {dtype} values; weights must be floating point (f32, f16, bf16)"
    )]
    NonFloatTensor {
        name: String,
        dtype: String,
        file: PathBuf,
    },
    #[error(
        "cannot read safetensors file {path}: {reason} (truncated or corrupt? delete it and download it again)"
    )]
    CorruptWeights { path: PathBuf, reason: String },
    #[error("cannot load tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("this model has no tokenizer (synthetic weights): give token ids, e.g. --prompt-len N")]
    NoTokenizer,
    #[error("tokenizer: {0}")]
    Encode(String),
    #[error("Hugging Face Hub, repo {repo}: {reason}")]
    Hub { repo: String, reason: String },
    #[error("sequence of {needed} tokens exceeds the model's context of {limit} (max_position_embeddings)")]
    ContextTooLong { needed: usize, limit: usize },
    #[error("invalid batch: {0}")]
    Batch(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Attention(#[from] vpod_attention::AttnError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl ModelError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T> = std::result::Result<T, ModelError>;
