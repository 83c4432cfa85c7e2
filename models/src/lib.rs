//! Llama-family models on candle tensors: Yi-6B, Llama-3-8B and Yi-34B (all
//! `LlamaForCausalLM`), their Hub presets, loading (`hf-hub`, memory-mapped
//! safetensors) and tokenizers.
//!
//! The principal type is [`Llama`], whose [`Llama::forward`] runs one step of
//! a packed batch and calls attention through a backend it never names.
//! [`load_model`] goes from the files of a checkpoint ([`fetch_model_files`])
//! to a ready model and tokenizer.

mod config;
mod error;
mod hub;
mod llama;
mod presets;
mod spm;
mod tokenizer;
pub mod tp;
mod weights;

use std::path::Path;

use candle_core::{DType, Device};

pub use config::{Llama3RopeScaling, LlamaConfig};
pub use error::{ModelError, Result};
pub use hub::{HubOptions, ModelFiles, ModelSource, TokenizerFile, fetch_model_files, shard_names};
pub use llama::Llama;
pub use presets::{PRESETS, Preset, preset, preset_names};
pub use tokenizer::{Detokenizer, TextTokenizer, TokenStream};
pub use weights::{SyntheticWeights, TensorSource, Weights};

/// A model ready to run: its config, weights on the device, tokenizer and
/// special ids. Synthetic models have no files and no tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    pub files: Option<ModelFiles>,
    pub config: LlamaConfig,
    pub model: Llama,
    tokenizer: Option<TextTokenizer>,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
}

impl LoadedModel {
    /// The tokenizer; synthetic models have none.
    pub fn tokenizer(&self) -> Result<&TextTokenizer> {
        self.tokenizer.as_ref().ok_or(ModelError::NoTokenizer)
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

/// Loads config, tokenizer and weights (converted to `dtype` on `device`).
/// `progress(done, total)` reports weight loading, layer by layer.
pub fn load_model(
    files: ModelFiles,
    dtype: DType,
    device: &Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    load_model_shard(files, dtype, device, None, progress)
}

/// [`load_model`] of one tensor-parallel rank (`comm`'s rank of its world;
/// `None`: the whole model): only the rank's slices of the weights are read
/// ([`tp`]).
pub fn load_model_shard(
    files: ModelFiles,
    dtype: DType,
    device: &Device,
    comm: Option<std::sync::Arc<dyn tp::Communicator>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    let config = LlamaConfig::from_file(&files.config)?;
    let (mut bos, mut eos) = (config.bos_token_id, config.eos_token_ids.clone());
    if let Some(path) = &files.generation_config {
        let (gb, ge) = generation_special_ids(path)?;
        bos = gb.or(bos);
        if !ge.is_empty() {
            eos = ge;
        }
    }
    let tokenizer = TextTokenizer::load(&files.tokenizer, bos, eos.clone())?;
    let weights = Weights::open(&files.weights, dtype, device)?;
    let model = Llama::load_shard(&config, &weights, comm, progress)?;
    Ok(LoadedModel {
        files: Some(files),
        config,
        model,
        tokenizer: Some(tokenizer),
        bos_id: bos,
        eos_ids: eos,
    })
}

/// A preset's exact shapes with random weights made on `device` (no files,
/// no tokenizer): for benchmarks on machines without the checkpoints.
/// EOS is ignored so that runs generate exactly the tokens asked for.
pub fn load_synthetic(
    preset: &Preset,
    dtype: DType,
    device: &Device,
    seed: u64,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    load_synthetic_shard(preset, dtype, device, seed, None, progress)
}

/// [`load_synthetic`] of one tensor-parallel rank: every rank draws the
/// whole model's tensors in the same order from the same seed and keeps its
/// slices, so the ranks together hold the same model as one rank would.
pub fn load_synthetic_shard(
    preset: &Preset,
    dtype: DType,
    device: &Device,
    seed: u64,
    comm: Option<std::sync::Arc<dyn tp::Communicator>>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<LoadedModel> {
    let config = preset.config();
    let weights = SyntheticWeights::new(dtype, device, seed)?;
    let model = Llama::load_shard(&config, &weights, comm, progress)?;
    Ok(LoadedModel {
        files: None,
        bos_id: config.bos_token_id,
        config,
        model,
        tokenizer: None,
        eos_ids: vec![],
    })
}

/// BOS and EOS ids of a `generation_config.json` (EOS may be a list).
fn generation_special_ids(path: &Path) -> Result<(Option<u32>, Vec<u32>)> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::BadConfig {
        path: path.display().to_string(),
        reason: e.to_string(),
    })?;
    let id = |x: &serde_json::Value| x.as_u64().map(|i| i as u32);
    let bos = v.get("bos_token_id").and_then(id);
    let eos = match v.get("eos_token_id") {
        Some(serde_json::Value::Array(a)) => a.iter().filter_map(id).collect(),
        Some(x) => id(x).into_iter().collect(),
        None => vec![],
    };
    Ok((bos, eos))
}
