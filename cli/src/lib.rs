//! The inference engine as a library, and the command line of the `cli`
//! binary that drives it.
//!
//! - [`engine::Engine`]: a loaded model plus one attention backend; `step`
//!   runs one packed batch, `generate` and `score` drive it.
//! - [`sampler::Sampler`]: greedy / temperature / top-k / top-p.
//! - [`device`]: `--device` / `--dtype`, GPU checks.
//! - [`Cli`] and [`run`]: `cli generate` and `cli perplexity`.

pub mod device;
pub mod engine;
pub mod sampler;
pub mod scheduler;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::DType;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use vpod_models::{
    HubOptions, LoadedModel, ModelSource, fetch_model_files, load_model, load_synthetic, preset, preset_names,
};

use crate::device::{check_fits, device_label, parse_device, parse_dtype, peak_rss_mib};

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
    /// Random weights with the preset's exact shapes, made on the device (no download, no tokenizer).
    #[arg(long)]
    pub synthetic: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long, required_unless_present = "prompt_len", conflicts_with = "prompt_len")]
    pub prompt: Option<String>,
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
    let (loaded, model_name): (LoadedModel, String) = if a.synthetic {
        let p = preset(&a.model).with_context(|| {
            format!(
                "--synthetic needs a preset ({}), not '{}'",
                preset_names(),
                a.model
            )
        })?;
        let bytes = p.config().num_parameters() * dtype.size_in_bytes();
        check_fits(
            &device,
            bytes,
            &format!("synthetic {} weights in {dtype:?}", p.alias),
        )?;
        bar.set_message(format!("building synthetic {}", p.alias));
        (
            load_synthetic(p, dtype, &device, 1234, &mut progress)?,
            format!("{} (synthetic)", p.alias),
        )
    } else {
        let source = ModelSource::parse(&a.model, &a.revision)?;
        let files = fetch_model_files(&source, &HubOptions::from_env())?;
        let cfg = vpod_models::LlamaConfig::from_file(&files.config)?;
        check_fits(
            &device,
            cfg.num_parameters() * dtype.size_in_bytes(),
            &format!("the weights in {dtype:?}"),
        )?;
        bar.set_message(format!("loading {}", source.describe()));
        (
            load_model(files, dtype, &device, &mut progress)?,
            source.describe(),
        )
    };
    bar.finish_and_clear();
    device.synchronize()?;
    let load_ms = start.elapsed().as_secs_f64() * 1e3;
    let engine = Engine::new(loaded, &a.backend)?;
    Ok(Session {
        engine,
        model_name,
        device: device_label(&device),
        dtype,
        load_ms,
    })
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
    if a.temperature < 0.0 || !(a.top_p > 0.0 && a.top_p <= 1.0) {
        bail!("--temperature must be >= 0 and --top-p in (0, 1]");
    }
    let mut s = open_session(&a.model)?;
    let m = &s.engine.model;
    let prompt = match (&a.prompt, a.prompt_len) {
        (Some(text), _) => m.tokenizer()?.encode_with_bos(text)?,
        (None, Some(n)) => synthetic_prompt(n, m.config.vocab_size, m.bos_id, a.seed),
        (None, None) => bail!("give --prompt TEXT or --prompt-len N"),
    };
    let sampling = SamplingParams {
        temperature: a.temperature,
        top_p: a.top_p,
        top_k: a.top_k,
        seed: a.seed,
    };
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
