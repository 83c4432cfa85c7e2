//! Fixture helpers shared by the test modules.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;
use vpod_attention::BackendOptions;
use vpod_cli::engine::Engine;
use vpod_models::tp::{Communicator, LocalComm};
use vpod_models::{
    HubOptions, Llama, LoadedModel, ModelFiles, ModelSource, fetch_model_files, load_model, load_model_shard,
};

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

/// A local checkpoint directory's files, found offline.
pub fn dir_files(dir: &Path) -> vpod_models::Result<ModelFiles> {
    fetch_model_files(
        &ModelSource::Local(dir.to_path_buf()),
        &offline(Path::new("/nonexistent")),
    )
}

pub fn load_dir(dir: &Path) -> vpod_models::Result<LoadedModel> {
    load_model(dir_files(dir)?, DType::F32, &Device::Cpu, &mut |_, _| {})
}

/// `files` in f32 on `world` CPU ranks (`LocalComm`, 60 s collective
/// timeout): rank 0's model and the other ranks' shards (one rank: the
/// whole model and none).
pub fn cpu_shards(files: &ModelFiles, world: usize) -> (LoadedModel, Vec<Arc<Llama>>) {
    let mut models: Vec<LoadedModel> = LocalComm::group_with_timeout(world, Duration::from_secs(60))
        .into_iter()
        .map(|c| {
            let comm: Option<Arc<dyn Communicator>> = (world > 1).then(|| Arc::new(c) as _);
            load_model_shard(files.clone(), DType::F32, &Device::Cpu, comm, &mut |_, _| {}).unwrap()
        })
        .collect();
    let rank0 = models.remove(0);
    (rank0, models.into_iter().map(|m| Arc::new(m.model)).collect())
}

/// An engine of backend `backend` over `files` on `world` CPU ranks
/// ([`cpu_shards`]; one rank: a plain engine).
pub fn cpu_tp_engine(files: &ModelFiles, world: usize, backend: &str, opts: &BackendOptions) -> Engine {
    let (rank0, rest) = cpu_shards(files, world);
    if world == 1 {
        Engine::with_options(rank0, backend, opts).unwrap()
    } else {
        Engine::with_tensor_parallel(rank0, rest, backend, opts).unwrap()
    }
}

/// `cli compare --workload memory` on checkpoint `model` with a KV budget
/// that makes the paged cache preempt (8 requests of 10 + 10 tokens in
/// 64 KiB, 4 KiB pages), the three CPU backends, JSON out; `extra` appended.
pub fn cli_compare_memory(model: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "compare",
        "--model",
        model.to_str().unwrap(),
        "--workload",
        "memory",
        "--kv-memory",
        "64KiB",
        "--page-size",
        "4KiB",
        "--backends",
        "reference,paged:16,vattention",
        "--requests",
        "8",
        "--prompt-len",
        "10",
        "--max-tokens",
        "10",
        "--json",
    ];
    args.extend_from_slice(extra);
    cli(&args, &[])
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
