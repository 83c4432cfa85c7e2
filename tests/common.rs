//! Fixture helpers shared by the test modules.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use vpod_cli::engine::Engine;
use vpod_models::{HubOptions, LoadedModel, ModelSource, fetch_model_files, load_model};

pub const FIXTURES: &[&str] = &["tiny-llama3-gqa4", "tiny-yi-gqa7", "tiny-yi-gqa8"];

/// `tests/fixtures`, or `$VPOD_FIXTURES` (the test binary runs on the GPU
/// machine from another checkout path).
pub fn fixtures_dir() -> PathBuf {
    match std::env::var_os("VPOD_FIXTURES") {
        Some(p) => PathBuf::from(p),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures"),
    }
}

pub fn fixture(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// `reference.json` of a fixture: what transformers computed.
#[derive(Debug, Deserialize)]
pub struct Reference {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub greedy_new_tokens: Vec<u32>,
    pub greedy_text: String,
    pub ppl_file: String,
    pub ppl_tokens: usize,
    pub nll: f64,
    pub ppl: f64,
}

pub fn reference(name: &str) -> Reference {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// `reference.safetensors`: per-position logits `[T, vocab]` of the prompt.
pub fn reference_logits(name: &str) -> Tensor {
    let t =
        candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap();
    t["logits"].clone()
}

/// Offline options that never touch the network or the user's cache.
pub fn offline(cache: &Path) -> HubOptions {
    HubOptions {
        cache_dir: cache.to_path_buf(),
        token: None,
        offline: true,
        progress: false,
        endpoint: None,
    }
}

pub fn load_dir(dir: &Path) -> vpod_models::Result<LoadedModel> {
    let files = fetch_model_files(
        &ModelSource::Local(dir.to_path_buf()),
        &offline(Path::new("/nonexistent")),
    )?;
    load_model(files, DType::F32, &Device::Cpu, &mut |_, _| {})
}

pub fn engine(name: &str) -> Engine {
    Engine::new(load_dir(&fixture(name)).unwrap(), "reference").unwrap()
}

/// Runs the `cli` binary with a clean Hugging Face environment.
pub fn cli(args: &[&str], envs: &[(&str, &Path)]) -> Output {
    let bin = std::env::var_os("VPOD_CLI_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_cli").into());
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env_remove("HF_TOKEN")
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_HOME", "/nonexistent-hf-home");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

/// Copies a fixture into a temp dir so that a test can damage it.
pub fn scratch_copy(name: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), tmp.path().join(e.file_name())).unwrap();
    }
    tmp
}

/// Largest |a - b| over all elements (same shapes and dtype).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
