//! The inference engine as a library, and the command line of the `cli`
//! binary that drives it.
//!
//! - [`engine::Engine`]: a loaded model plus one attention backend; `step`
//!   runs one packed batch, `generate` and `score` drive it.
//! - [`sampler::Sampler`]: greedy / temperature / top-k / top-p.
//! - [`Cli`] and [`run`]: `cli generate` and `cli perplexity`.

pub mod engine;
pub mod sampler;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use vpod_models::{HubOptions, LoadedModel, ModelSource, fetch_model_files, load_model};

use crate::engine::Engine;
use crate::sampler::SamplingParams;

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
}

/// Which model, where it runs, how attention is computed.
#[derive(Debug, Args)]
pub struct ModelArgs {
    /// A preset (yi-6b, llama3-8b, yi-34b), a Hub repo id (owner/name) or a local directory.
    #[arg(long)]
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
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long)]
    pub prompt: String,
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
    }
}

/// Parses `--device`; `None` picks the GPU when this build and machine have one.
pub fn parse_device(arg: Option<&str>) -> anyhow::Result<Device> {
    let want_cuda = |ordinal: usize| -> anyhow::Result<Device> {
        if !cfg!(feature = "cuda") {
            bail!(
                "--device cuda: this binary was built without CUDA support; rebuild with the `cuda` feature \
                 (cargo build --release --features cuda)"
            );
        }
        Device::new_cuda(ordinal).with_context(|| format!("cannot open CUDA device {ordinal}"))
    };
    match arg {
        None => Ok(
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                want_cuda(0)?
            } else {
                Device::Cpu
            },
        ),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => want_cuda(0),
        Some(s) => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => want_cuda(i),
            _ => bail!("unknown device '{s}' (expected cpu, cuda or cuda:N)"),
        },
    }
}

/// Parses `--dtype`, defaulting to bf16 on GPU and f32 on CPU.
pub fn parse_dtype(arg: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    Ok(match arg {
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
        Some("f32" | "float32") => DType::F32,
        Some("bf16" | "bfloat16") => DType::BF16,
        Some("f16" | "float16") => DType::F16,
        Some(s) => bail!("unknown dtype '{s}' (expected f32, bf16 or f16)"),
    })
}

fn device_name(d: &Device) -> String {
    match d {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda".into(),
        Device::Metal(_) => "metal".into(),
    }
}

/// A loaded engine and what the JSON reports about it.
struct Session {
    engine: Engine,
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
    let source = ModelSource::parse(&a.model, &a.revision)?;
    let start = Instant::now();
    let files = fetch_model_files(&source, &HubOptions::from_env())?;
    let loaded: LoadedModel = {
        let bar = indicatif::ProgressBar::new(0).with_message(format!("loading {}", source.describe()));
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        );
        let r = load_model(files, dtype, &device, &mut |done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        });
        bar.finish_and_clear();
        r?
    };
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let engine = Engine::new(loaded, &a.backend)?;
    Ok(Session {
        engine,
        model_name: source.describe(),
        device: device_name(&device),
        dtype,
        load_ms,
    })
}

fn generate(a: GenerateArgs) -> anyhow::Result<()> {
    if a.temperature < 0.0 || !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let mut s = open_session(&a.model)?;
    let prompt = s.engine.model.tokenizer.encode_with_bos(&a.prompt)?;
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
    let json_out = a.model.json;
    let tok = s.engine.model.tokenizer.clone();
    let mut stream = tok.stream();
    let mut stdout = std::io::stdout().lock();
    let mut write_err = None;
    let g = s.engine.generate(&prompt, a.max_tokens, sampling, &mut |id| {
        if !json_out
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
    let text = tok.decode(&g.tokens)?;
    if json_out {
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
            "decode_tokens_per_s": g.decode_tokens_per_s(),
        });
        writeln!(stdout, "{out}")?;
    } else {
        if let Some(rest) = stream.finish()? {
            write!(stdout, "{rest}")?;
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

fn perplexity(a: PerplexityArgs) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(&a.file).with_context(|| format!("cannot read {}", a.file.display()))?;
    let mut s = open_session(&a.model)?;
    let ids = s.engine.model.tokenizer.encode_with_bos(&text)?;
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
