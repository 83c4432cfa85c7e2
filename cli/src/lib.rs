//! The command line of the `cli` binary, over the engine crate
//! ([`vpod_engine`], re-exported here as [`engine`]).
//!
//! - [`Cli`] and [`run`]: `cli generate`, `perplexity`, `compare`, `bench`
//!   and `serve`, each a loop over the engine's verbs.
//! - [`serve`]: the OpenAI-compatible HTTP server.
//! - [`device`]: `--device` / `--dtype`, GPU checks.

pub mod compare;
pub mod device;
pub mod http_bench;
pub mod plot;
pub mod serve;

/// The engine crate, under the paths the binaries and tests use.
pub use vpod_engine as engine;
pub use vpod_engine::{sampler, scheduler};

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::sync::Arc;
use vpod_attention::BackendOptions;

use vpod_models::tp::{Communicator, LocalComm, Shard};
use vpod_models::{
    HubOptions, LoadedModel, ModelSource, fetch_model_files, load_model_shard, load_synthetic_shard, preset,
    preset_names,
};

use crate::device::{check_fits, device_label, parse_device, parse_dtype, peak_rss_mib, rank_devices};

use crate::engine::{Engine, Request};
use crate::sampler::SamplingParams;
use crate::scheduler::{Policy, SchedulerConfig};

#[derive(Debug, Parser)]
#[command(
    name = "cli",
    version,
    about = "Llama-family inference on candle with pluggable attention backends"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate text from a prompt, streaming it to stdout.
    Generate(GenerateArgs),
    /// Teacher-forced negative log-likelihood and perplexity of a text file.
    Perplexity(PerplexityArgs),
    /// The same workload on several backends (same inputs, same KV budget),
    /// checked for agreement before anything is timed.
    Compare(CompareArgs),
    /// One backend on the same workloads as `compare` (decode-sweep,
    /// hybrid-sweep, serve, memory), with p50 / p90 / p99 of the step times.
    Bench(BenchArgs),
    /// An OpenAI-compatible HTTP server (completions, chat, streaming, metrics).
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Model, device, dtype and cache options (its --backend is not used).
    #[command(flatten)]
    pub model: ModelArgs,
    /// Backends to compare; the first is the reference for the agreement check.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "reference,paged:16,paged:128,vattention,pod"
    )]
    pub backends: Vec<String>,
    #[command(flatten)]
    pub work: WorkloadArgs,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Model, device, dtype, cache options and the backend to measure.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Instead of a model in this process, a running OpenAI-compatible server
    /// (`cli serve`, vLLM, ...): the `serve` workload over HTTP with streaming
    /// requests; http_bench.json in --out.
    #[arg(long)]
    pub url: Option<String>,
    #[command(flatten)]
    pub work: WorkloadArgs,
}

/// The workload of `compare` and `bench`.
#[derive(Debug, Args)]
pub struct WorkloadArgs {
    #[arg(long, default_value = "decode-sweep", value_parser = ["decode-sweep", "hybrid-sweep", "serve", "memory"])]
    pub workload: String,
    /// hybrid-sweep: prefill chunk sizes.
    #[arg(long, value_delimiter = ',', default_value = "16,64")]
    pub chunks: Vec<usize>,
    /// hybrid-sweep: tokens of the prompt being prefilled alongside the decodes.
    #[arg(long, default_value_t = 128)]
    pub prefill_len: usize,
    /// decode-sweep: batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub batches: Vec<usize>,
    /// decode-sweep: context lengths (prompt tokens).
    #[arg(long, value_delimiter = ',', default_value = "64,256")]
    pub contexts: Vec<usize>,
    /// decode-sweep: tokens generated per request.
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// memory: requests offered at once.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// memory: prompt tokens per request.
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// memory: generated tokens per request.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// serve: Poisson arrival rate in requests/s (0: all at once); lengths are
    /// uniform around --prompt-len / --max-tokens (from half to 1.5 times).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    /// serve: a CSV trace, `prompt_tokens,output_tokens[,arrival_ms]` per line, instead.
    #[arg(long)]
    pub trace: Option<PathBuf>,
    /// Directory for the JSON report (compare.json / bench.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Which model, where it runs, how attention is computed.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A preset (yi-6b, llama3-8b, yi-34b), a Hub repo id (owner/name) or a
    /// local directory; `demo` (the default) is the tiny Llama trained on
    /// Jules Verne that ships in the repo (demo/tiny-verne).
    #[arg(long, default_value = "demo")]
    pub model: String,
    /// Hub revision (branch, tag or commit).
    #[arg(long, default_value = "main")]
    pub revision: String,
    /// Attention backend.
    #[arg(long, default_value = "reference")]
    pub backend: String,
    /// cpu, cuda or cuda:N (default: cuda:0 when built with CUDA and a GPU is present, else cpu).
    #[arg(long)]
    pub device: Option<String>,
    /// Compute dtype: f32, bf16 or f16 (default: bf16 on GPU, f32 on CPU).
    #[arg(long)]
    pub dtype: Option<String>,
    /// Random weights with the preset's exact shapes, made on the device (no download, no tokenizer).
    #[arg(long)]
    pub synthetic: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// KV memory budget of the paged / virtual caches, e.g. 2GiB, 512MiB
    /// (default: room for --max-seqs sequences of the full context).
    #[arg(long, value_parser = parse_size)]
    pub kv_memory: Option<usize>,
    /// Tokens per block of the paged cache (16, 32, 64, 128; `--backend paged:N` also sets it).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Physical page size of the virtual cache, e.g. 2MiB.
    #[arg(long, value_parser = parse_size, default_value = "2MiB")]
    pub page_size: usize,
    /// Most sequences running at once (and slots of the virtual cache).
    #[arg(long, default_value_t = 8, value_parser = positive)]
    pub max_seqs: usize,
    /// Virtual cache: all layers of a token in one region (finer pages).
    #[arg(long)]
    pub megacache: bool,
    /// Virtual cache: map pages synchronously when a sequence grows, instead
    /// of ahead on the mapper thread while the GPU runs the previous step.
    #[arg(long)]
    pub sync_mapping: bool,
    /// Shard the model over N ranks (tensor parallelism, Megatron-style):
    /// N GPUs from --device's on (cuda:K .. cuda:K+N-1), or N threads on the
    /// CPU. Each rank holds its heads' KV cache.
    #[arg(long, default_value_t = 1, value_parser = positive)]
    pub tensor_parallel: usize,
    /// On a GPU, replay decode steps as CUDA graphs captured per batch-size
    /// bucket (1, 2, 4, 8, 16, 24, ... --max-seqs); off: every step eager.
    #[arg(long, default_value = "on")]
    pub cuda_graphs: vpod_engine::CudaGraphs,
}

impl ModelArgs {
    fn backend_options(&self) -> BackendOptions {
        BackendOptions {
            block_size: self.block_size,
            page_size: self.page_size,
            kv_memory: self.kv_memory,
            max_seqs: self.max_seqs,
            megacache: self.megacache,
            mapping: if self.sync_mapping {
                vpod_kvcache::Mapping::Sync
            } else {
                vpod_kvcache::Mapping::Overlapped
            },
            cuda_graphs: self.cuda_graphs == vpod_engine::CudaGraphs::On,
            ..Default::default()
        }
    }
}

/// Parses a whole number of at least 1.
pub fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("'{s}' is not a whole number >= 1")),
    }
}

/// Parses `2GiB`, `512MiB`, `1.5GB`, `4096` (bytes).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a size (e.g. 2GiB, 512MiB, 4096)"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "kib" => 1024.0,
        "m" | "mb" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "g" | "gb" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("unknown size unit '{u}' in '{s}'")),
    };
    if n.is_nan() || n < 0.0 {
        return Err(format!("'{s}' is not a size"));
    }
    Ok((n * mult) as usize)
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text; repeat for a batch.
    #[arg(long, required_unless_present_any = ["prompt_len", "prompts_file"], conflicts_with = "prompt_len")]
    pub prompt: Vec<String>,
    /// A file with one prompt per line, run as one batch.
    #[arg(long)]
    pub prompts_file: Option<PathBuf>,
    #[command(flatten)]
    pub sched: SchedulerArgs,
    /// Instead of a text, a prompt of N pseudo-random token ids (seeded by --seed), BOS first.
    #[arg(long)]
    pub prompt_len: Option<usize>,
    /// Most tokens to generate.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling mass (1 = off).
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep the k most likely tokens (0 = off).
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Generate --max-tokens tokens even past an end-of-sequence token
    /// (benchmarks, synthetic weights).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl GenerateArgs {
    fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            ignore_eos: self.ignore_eos,
        }
    }
}

/// How the engine batches requests (`generate` with several prompts, `serve`).
#[derive(Debug, Args)]
pub struct SchedulerArgs {
    /// Batch scheduling: prefill-first (vLLM v0.2.7) or hybrid (Sarathi-Serve chunked prefills).
    #[arg(long, default_value = "hybrid", value_parser = ["prefill-first", "hybrid"])]
    pub scheduler: String,
    /// Token budget of a step (hybrid) or most prefill tokens of a step (prefill-first).
    #[arg(long, default_value_t = 512, value_parser = positive)]
    pub chunk_size: usize,
    /// Hybrid: at most one prefill chunk per step (as in the POD-Attention paper).
    #[arg(long)]
    pub one_prefill: bool,
}

impl SchedulerArgs {
    pub fn config(&self, max_seqs: usize) -> SchedulerConfig {
        SchedulerConfig {
            policy: match self.scheduler.as_str() {
                "prefill-first" => Policy::PrefillFirst,
                _ => Policy::Hybrid {
                    one_prefill: self.one_prefill,
                },
            },
            chunk_size: self.chunk_size,
            max_seqs,
        }
    }
}

/// `cli serve`: the model behind an OpenAI-compatible HTTP API.
#[derive(Debug, Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sched: SchedulerArgs,
    /// Address to listen on (0.0.0.0 for every interface).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0: any free port, printed at start).
    #[arg(long, default_value_t = 8000)]
    pub port: u16,
    /// The model name clients send in `model` (default: --model as given).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// Requests that may wait beyond the --max-seqs running ones; past that, 503 with Retry-After.
    #[arg(long, default_value_t = 256)]
    pub max_waiting: usize,
    /// Seconds requests in flight may still run after SIGINT/SIGTERM before they are aborted.
    #[arg(long, default_value_t = 30.0)]
    pub shutdown_timeout: f64,
}

#[derive(Debug, Args)]
pub struct PerplexityArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Text file to score (BOS is prepended).
    #[arg(long)]
    pub file: PathBuf,
    /// Tokens per prefill chunk (the KV cache carries the context between chunks).
    #[arg(long, default_value_t = 512)]
    pub chunk_size: usize,
}

/// Runs one command.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate(a) => generate(a),
        Command::Perplexity(a) => perplexity(a),
        Command::Compare(a) => run_workload(&a.model, &a.backends, &a.work, true),
        Command::Bench(a) => match &a.url {
            Some(url) => {
                if a.work.workload != "serve" {
                    bail!(
                        "--url benchmarks a server with the serve workload, not {}",
                        a.work.workload
                    );
                }
                http_bench::run(url, &serve_trace(&a.work)?, a.work.out.as_deref())
            }
            None => run_workload(&a.model, std::slice::from_ref(&a.model.backend), &a.work, false),
        },
        Command::Serve(a) => serve_http(a),
    }
}

fn serve_http(a: ServeArgs) -> anyhow::Result<()> {
    if !a.shutdown_timeout.is_finite() || a.shutdown_timeout < 0.0 {
        bail!(
            "--shutdown-timeout must be a number of seconds >= 0, got {}",
            a.shutdown_timeout
        );
    }
    let listener = std::net::TcpListener::bind((a.host.as_str(), a.port))
        .with_context(|| format!("cannot listen on {}:{}", a.host, a.port))?;
    let mut s = open_session(&a.model)?;
    s.engine.set_scheduler(a.sched.config(a.model.max_seqs))?;
    let cfg = serve::ServerConfig {
        model_name: a
            .served_model_name
            .clone()
            .unwrap_or_else(|| a.model.model.clone()),
        max_in_flight: a.model.max_seqs + a.max_waiting,
        shutdown_timeout: std::time::Duration::from_secs_f64(a.shutdown_timeout),
    };
    eprintln!(
        "serving {} ({}, backend {} on {}) as `{}`",
        s.model_name,
        format!("{:?}", s.dtype).to_lowercase(),
        s.engine.backend_name(),
        s.device,
        cfg.model_name
    );
    let server = serve::start(s.engine, cfg, listener, true)?;
    eprintln!("listening on http://{}", server.addr);
    server.join()?;
    eprintln!("stopped");
    Ok(())
}

/// A loaded engine and what the JSON reports about it.
struct Session {
    engine: Engine,
    /// Tensor-parallel ranks 1 .. N-1 (shared with the engine).
    ranks: Vec<Arc<vpod_models::Llama>>,
    model_name: String,
    device: String,
    dtype: DType,
    load_ms: f64,
}

fn open_session(a: &ModelArgs) -> anyhow::Result<Session> {
    let device = parse_device(a.device.as_deref())?;
    let dtype = parse_dtype(a.dtype.as_deref(), &device)?;
    // Check the backend name before any download.
    vpod_attention::backend_info(&a.backend)?;
    let start = Instant::now();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
            .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let n = a.tensor_parallel;
    let devices = rank_devices(&device, a.device.as_deref(), n)?;
    let comms: Vec<Option<Arc<dyn Communicator>>> = if n == 1 {
        vec![None]
    } else {
        rank_comms(&devices)?.into_iter().map(Some).collect()
    };
    // Rank r's model: its slices only, on its device.
    let mut ranks: Vec<LoadedModel> = Vec::with_capacity(n);
    let model_name = if a.synthetic {
        let p = preset(&a.model).with_context(|| {
            format!(
                "--synthetic needs a preset ({}), not '{}'",
                preset_names(),
                a.model
            )
        })?;
        let bytes = p.config().num_parameters() * dtype.size_in_bytes() / n;
        check_tp(&p.config(), n)?;
        for (dev, comm) in devices.iter().zip(comms) {
            check_fits(dev, bytes, &format!("synthetic {} weights in {dtype:?}", p.alias))?;
            bar.set_message(format!("building synthetic {}", p.alias));
            ranks.push(load_synthetic_shard(p, dtype, dev, 1234, comm, &mut progress)?);
        }
        format!("{} (synthetic)", p.alias)
    } else {
        let source = ModelSource::parse(&demo_or(&a.model)?, &a.revision)?;
        let files = fetch_model_files(&source, &HubOptions::from_env())?;
        let cfg = vpod_models::LlamaConfig::from_file(&files.config)?;
        check_tp(&cfg, n)?;
        for (dev, comm) in devices.iter().zip(comms) {
            check_fits(
                dev,
                cfg.num_parameters() * dtype.size_in_bytes() / n,
                &format!("the weights in {dtype:?}"),
            )?;
            bar.set_message(format!("loading {}", source.describe()));
            ranks.push(load_model_shard(files.clone(), dtype, dev, comm, &mut progress)?);
        }
        source.describe()
    };
    let loaded = ranks.remove(0);
    bar.finish_and_clear();
    device.synchronize()?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let ranks: Vec<Arc<vpod_models::Llama>> = ranks.into_iter().map(|m| Arc::new(m.model)).collect();
    let mut engine = if n == 1 {
        Engine::with_options(loaded, &a.backend, &a.backend_options())?
    } else {
        Engine::with_tensor_parallel(loaded, ranks.clone(), &a.backend, &a.backend_options())?
    };
    if device.is_cuda() {
        // The first forward pass of a process compiles candle's kernels (the
        // driver's PTX JIT): do it here, not in the first request's timings.
        let t = Instant::now();
        engine.warm_up()?;
        let s = t.elapsed().as_secs_f64();
        if s > 2.0 {
            eprintln!(
                "note: warming up took {s:.1} s: the driver compiled candle's CUDA kernels \
                 (cached for later runs in ~/.nv/ComputeCache, or $CUDA_CACHE_PATH)"
            );
        }
    }
    Ok(Session {
        engine,
        ranks,
        model_name,
        device: device_label(&device),
        dtype,
        load_ms,
    })
}

/// The ranks' communicators: NCCL on GPUs in builds with the `nccl`
/// feature, else the in-memory one (on GPUs through host memory: correct,
/// slow; said on stderr).
pub fn rank_comms(devices: &[candle_core::Device]) -> anyhow::Result<Vec<Arc<dyn Communicator>>> {
    #[cfg(feature = "nccl")]
    if devices[0].is_cuda() {
        return Ok(vpod_models::tp::NcclComm::group(devices)?
            .into_iter()
            .map(|c| Arc::new(c) as Arc<dyn Communicator>)
            .collect());
    }
    if devices[0].is_cuda() {
        eprintln!(
            "note: --tensor-parallel {}: this build exchanges the ranks' partial sums through host memory \
             (correct, but slow); build with --features nccl for NCCL",
            devices.len()
        );
    }
    Ok(LocalComm::group(devices.len())
        .into_iter()
        .map(|c| Arc::new(c) as Arc<dyn Communicator>)
        .collect())
}

/// Refuses, before loading, a model whose heads or MLP do not split over `n` ranks.
fn check_tp(cfg: &vpod_models::LlamaConfig, n: usize) -> anyhow::Result<()> {
    let why = Shard::unsupported_reasons(cfg, n);
    if !why.is_empty() {
        bail!("--tensor-parallel {n}: {}", why.join("; "));
    }
    Ok(())
}

/// Where the demo checkpoint was at build time (the repo's demo/tiny-verne).
pub const DEMO_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../demo/tiny-verne");

/// `demo` names the shipped demo checkpoint; anything else is passed through.
fn demo_or(model: &str) -> anyhow::Result<String> {
    if model != "demo" {
        return Ok(model.to_string());
    }
    let dir = std::path::Path::new(DEMO_DIR);
    if !dir.join("config.json").is_file() {
        bail!(
            "the demo checkpoint is not at {} (this binary was built from a checkout that has it); \
             give --model with a preset, a Hub repo id or a local directory",
            dir.display()
        );
    }
    Ok(dir.to_string_lossy().into_owned())
}

/// `n` pseudo-random ids in `[0, vocab)` after BOS, reproducible from `seed`.
fn synthetic_prompt(n: usize, vocab: usize, bos: Option<u32>, seed: u64) -> Vec<u32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut ids: Vec<u32> = bos.into_iter().collect();
    while ids.len() < n {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ids.push(((state >> 33) % vocab as u64) as u32);
    }
    ids.truncate(n);
    ids
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    if let Err(e) = a.sampling().validate() {
        bail!("{e} (--temperature, --top-p)");
    }
    let mut texts = a.prompt.clone();
    if let Some(f) = &a.prompts_file {
        let body = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
        texts.extend(body.lines().filter(|l| !l.trim().is_empty()).map(String::from));
        if texts.is_empty() {
            bail!("{} holds no prompts", f.display());
        }
    }
    let mut s = open_session(&a.model)?;
    if texts.len() > 1 {
        return generate_batch(&a, &mut s, &texts);
    }
    let m = &s.engine.model;
    let prompt = match (texts.first(), a.prompt_len) {
        (Some(text), _) => m.tokenizer()?.encode_with_bos(text)?,
        (None, Some(n)) => synthetic_prompt(n, m.config.vocab_size, m.bos_id, a.seed),
        (None, None) => bail!("give --prompt TEXT or --prompt-len N"),
    };
    let sampling = a.sampling();
    // Stream text only when there is a tokenizer and no JSON was asked for.
    let tok = if a.model.json {
        None
    } else {
        m.tokenizer().ok().cloned()
    };
    let mut stream = tok.as_ref().map(|t| t.stream());
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let g = s.engine.generate(&prompt, a.max_tokens, sampling, &mut |id| {
        if let Some(stream) = stream.as_mut()
            && let Some(piece) = stream.push(id)?
            && let Err(e) = stdout.write_all(piece.as_bytes()).and_then(|_| stdout.flush())
        {
            write_err = Some(e);
        }
        Ok(())
    })?;
    if let Some(e) = write_err {
        return Err(e).context("writing to stdout");
    }
    let text = match s.engine.model.tokenizer() {
        Ok(t) => Some(t.decode(&g.tokens)?),
        Err(_) => None,
    };
    if a.model.json {
        let out = json!({
            "model": s.model_name,
            "backend": s.engine.backend_name(),
            "device": s.device,
            "dtype": format!("{:?}", s.dtype).to_lowercase(),
            "prompt_tokens": prompt.len(),
            "tokens": g.tokens,
            "text": text,
            "finish_reason": g.finish_reason,
            "load_ms": s.load_ms,
            "prefill_ms": g.prefill_ms,
            "decode_ms": g.decode_ms,
            "decode_steps": g.decode_steps,
            "decode_tokens_per_s": g.decode_tokens_per_s(),
            "cuda_graphs": s.engine.cuda_graphs(),
            "graph_replayed_steps": g.graph_replayed_steps,
            "peak_rss_mib": peak_rss_mib(),
        });
        writeln!(stdout, "{out}")?;
    } else {
        match stream.as_ref().map(|st| st.finish()).transpose()? {
            Some(Some(rest)) => write!(stdout, "{rest}")?,
            Some(None) => {}
            None => write!(stdout, "{:?}", g.tokens)?,
        }
        writeln!(stdout)?;
        eprintln!(
            "[{} tokens, {:?}; prompt {} tokens, prefill {:.1} ms, decode {:.1} tok/s; backend {} on {}]",
            g.tokens.len(),
            g.finish_reason,
            prompt.len(),
            g.prefill_ms,
            g.decode_tokens_per_s(),
            s.engine.backend_name(),
            s.device
        );
    }
    Ok(())
}

/// The `serve` workload's requests: `--trace`, or synthetic lengths with
/// Poisson arrivals at `--rate`.
fn serve_trace(a: &WorkloadArgs) -> anyhow::Result<Vec<(usize, usize, f64)>> {
    if !a.rate.is_finite() || a.rate < 0.0 {
        bail!("--rate must be a number of requests/s >= 0, got {}", a.rate);
    }
    Ok(match &a.trace {
        Some(f) => {
            let text = std::fs::read_to_string(f).with_context(|| format!("cannot read {}", f.display()))?;
            compare::read_trace(&text).map_err(|e| anyhow::anyhow!("{}: {e}", f.display()))?
        }
        None => compare::synthetic_trace(a.requests, a.prompt_len, a.max_tokens, a.rate, 42),
    })
}

/// `compare` (several backends, agreement first) and `bench` (one backend).
fn run_workload(
    m: &ModelArgs,
    backends: &[String],
    a: &WorkloadArgs,
    compare_backends: bool,
) -> anyhow::Result<()> {
    if backends.is_empty() {
        bail!("--backends is empty");
    }
    let s = open_session(m)?;
    let model = s.engine.model.clone();
    let cache = m.backend_options();
    // Every backend must exist and be able to run here; say which cannot and why.
    let attn = model.model.attn_config(model.config.max_position_embeddings);
    let mut problems = Vec::new();
    for spec in backends {
        match vpod_attention::backend_info(spec) {
            Err(_) => problems.push(format!("'{spec}' is not a backend")),
            Ok(info) => {
                let why = (info.check)(&attn, model.model.device(), &cache);
                if !why.is_empty() {
                    problems.push(format!("'{spec}' cannot run here: {}", why.join("; ")));
                }
            }
        }
    }
    if !problems.is_empty() {
        let known: Vec<String> = vpod_attention::BACKENDS
            .iter()
            .map(|b| {
                let why = (b.check)(&attn, model.model.device(), &cache);
                if why.is_empty() {
                    format!("{} (runs here)", b.name)
                } else {
                    format!("{} (not here: {})", b.name, why.join("; "))
                }
            })
            .collect();
        bail!("{}; backends: {}", problems.join("; "), known.join(", "));
    }
    let workload = match a.workload.as_str() {
        "memory" => {
            if m.kv_memory.is_none() {
                bail!("the memory workload needs --kv-memory (the budget every backend gets)");
            }
            compare::Workload::Memory {
                requests: a.requests,
                prompt_len: a.prompt_len,
                max_tokens: a.max_tokens,
            }
        }
        "serve" => compare::Workload::Serve {
            trace: serve_trace(a)?,
        },
        "hybrid-sweep" => compare::Workload::HybridSweep {
            chunks: a.chunks.clone(),
            batches: a.batches.clone(),
            contexts: a.contexts.clone(),
            prefill_len: a.prefill_len,
        },
        _ => compare::Workload::DecodeSweep {
            batches: a.batches.clone(),
            contexts: a.contexts.clone(),
            tokens: a.tokens,
        },
    };
    let opts = compare::CompareOptions {
        backends: backends.to_vec(),
        workload,
        cache,
        fault: None,
        check_agreement: compare_backends,
        ranks: s.ranks.clone(),
    };
    // One tick per agreement check and per measured cell (drawn on stderr
    // when it is a terminal; nothing otherwise).
    let bar = indicatif::ProgressBar::new(compare::progress_steps(&opts) as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?,
    );
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar.set_message(format!("{}: agreement", backends[0]));
    let rows = compare::compare(&model, &opts, &mut |m| {
        bar.inc(1);
        bar.set_message(m.to_string());
    });
    bar.finish_and_clear();
    let rows = rows?;
    let tool = if compare_backends { "compare" } else { "bench" };
    let report = json!({
        "tool": format!("vpod cli {tool}"),
        "version": env!("CARGO_PKG_VERSION"),
        "model": s.model_name,
        "device": s.device,
        "dtype": format!("{:?}", s.dtype).to_lowercase(),
        "workload": a.workload,
        "command": std::env::args().skip(1).collect::<Vec<_>>(),
        "git_commit": option_env!("VPOD_GIT_COMMIT"),
        "candle_version": option_env!("VPOD_CANDLE_VERSION"),
        "kv_memory": m.kv_memory,
        "block_size": m.block_size,
        "page_size": m.page_size,
        "backends": rows,
    });
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join(format!("{tool}.json"));
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
        // A figure that cannot be drawn must not hide the measurements.
        match plot::write_figures(&report, dir) {
            Ok(files) => files.iter().for_each(|f| eprintln!("wrote {}", f.display())),
            Err(e) => eprintln!("warning: no figure written: {e:#}"),
        }
    }
    if m.json {
        println!("{report}");
    } else {
        print!("{}", compare::table(&report["backends"]));
    }
    if rows
        .as_array()
        .into_iter()
        .flatten()
        .any(|r| r["agrees"] == false)
    {
        bail!(
            "a backend disagreed with {} (see above); its numbers were not taken",
            backends[0]
        );
    }
    Ok(())
}

/// Several prompts as one batch through the scheduler; prints each
/// completion (or one JSON object with per-request metrics).
fn generate_batch(a: &GenerateArgs, s: &mut Session, texts: &[String]) -> anyhow::Result<()> {
    let sampling = a.sampling();
    let tok = s.engine.model.tokenizer()?.clone();
    let requests = texts
        .iter()
        .map(|t| {
            Ok(Request {
                prompt: tok.encode_with_bos(t)?,
                max_tokens: a.max_tokens,
                sampling,
                arrival_ms: 0.0,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let cfg = a.sched.config(a.model.max_seqs);
    let out = s.engine.run_batch(&requests, cfg, &mut |_, _| Ok(()))?;
    let wall_ms: f64 = out.steps.iter().map(|st| st.ms).sum();
    let generated: usize = out.requests.iter().map(|r| r.tokens.len()).sum();
    if a.model.json {
        let reqs: Vec<_> = out
            .requests
            .iter()
            .map(|r| {
                let mean_tbt = if r.tbt_ms.is_empty() {
                    0.0
                } else {
                    r.tbt_ms.iter().sum::<f64>() / r.tbt_ms.len() as f64
                };
                Ok(json!({
                    "prompt_tokens": r.prompt_tokens,
                    "tokens": r.tokens,
                    "text": tok.decode(&r.tokens)?,
                    "finish_reason": r.finish_reason,
                    "ttft_ms": r.ttft_ms,
                    "mean_tbt_ms": mean_tbt,
                    "e2e_ms": r.e2e_ms,
                    "preemptions": r.preemptions,
                }))
            })
            .collect::<anyhow::Result<_>>()?;
        let out = json!({
            "model": s.model_name,
            "backend": s.engine.backend_name(),
            "device": s.device,
            "dtype": format!("{:?}", s.dtype).to_lowercase(),
            "scheduler": a.sched.scheduler,
            "chunk_size": a.sched.chunk_size,
            "requests": reqs,
            "steps": out.steps.len(),
            "generated_tokens": generated,
            "tokens_per_s": generated as f64 / (wall_ms / 1e3).max(1e-9),
            "load_ms": s.load_ms,
        });
        println!("{out}");
    } else {
        for (i, r) in out.requests.iter().enumerate() {
            println!("[{i}] {}{}", texts[i], tok.decode(&r.tokens)?);
        }
        eprintln!(
            "[{} requests, {generated} tokens in {} steps, {:.1} tok/s; backend {} on {}, scheduler {}]",
            out.requests.len(),
            out.steps.len(),
            generated as f64 / (wall_ms / 1e3).max(1e-9),
            s.engine.backend_name(),
            s.device,
            a.sched.scheduler
        );
    }
    Ok(())
}

fn perplexity(a: PerplexityArgs) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut s = open_session(&a.model)?;
    let ids = s.engine.model.tokenizer()?.encode_with_bos(&text)?;
    let bar = indicatif::ProgressBar::new(ids.len() as u64).with_message("scoring");
    let score = s
        .engine
        .score(&ids, a.chunk_size, &mut |done, _| bar.set_position(done as u64));
    bar.finish_and_clear();
    let score = score?;
    if a.model.json {
        let out = json!({
            "model": s.model_name,
            "backend": s.engine.backend_name(),
            "device": s.device,
            "dtype": format!("{:?}", s.dtype).to_lowercase(),
            "file": a.file.display().to_string(),
            "nll": score.nll,
            "ppl": score.ppl,
            "tokens": score.tokens,
            "predicted": score.predicted,
            "windows": score.windows,
            "chunk_size": a.chunk_size,
            "elapsed_ms": score.elapsed_ms,
        });
        println!("{out}");
    } else {
        println!(
            "perplexity {:.4} (nll {:.6} nats/token) over {} tokens of {} [{} window(s), backend {} on {}, {:.0} ms]",
            score.ppl,
            score.nll,
            score.predicted,
            a.file.display(),
            score.windows,
            s.engine.backend_name(),
            s.device,
            score.elapsed_ms
        );
    }
    Ok(())
}
