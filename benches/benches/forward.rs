//! Forward-pass throughput of a checkpoint with the `reference` backend:
//! prefill tokens/s and achieved matmul FLOP/s, decode tokens/s and achieved
//! weight-read bandwidth (a decode step reads every weight once).
//!
//! `cargo bench -p vpod-benches --bench forward -- [--model DIR] [--prompt-len N] [--decode-steps N]`
//! (defaults: the tiny Llama-3 fixture, 128, 32). Prints a table and writes
//! `forward.json` (see `vpod_benches::out_dir`). The full-size presets need
//! the synthetic weights of the CUDA issue; on the CPU this measures the
//! engine's overheads rather than a roofline.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Parser;
use serde_json::json;
use vpod_attention::{LogitsAt, SeqChunk};
use vpod_benches::{matmul_flops, median_ms, write_json};
use vpod_cli::engine::Engine;
use vpod_models::{HubOptions, ModelSource, fetch_model_files, load_model};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    decode_steps: usize,
    /// Accepted and ignored: cargo bench passes it to every bench target.
    #[arg(long)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.model.unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-llama3-gqa4")
    });
    let files = fetch_model_files(&ModelSource::Local(dir.clone()), &HubOptions::from_env())?;
    let device = Device::Cpu;
    let model = load_model(files, DType::F32, &device, &mut |_, _| {})?;
    let cfg = model.config.clone();
    let mut engine = Engine::new(model, "reference")?;
    let n = args
        .prompt_len
        .min(cfg.max_position_embeddings - args.decode_steps - 1);
    let prompt: Vec<u32> = (0..n).map(|i| (i * 7 % cfg.vocab_size) as u32).collect();
    let linear_params = cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size; // embedding lookup is not a matmul
    let weight_bytes = cfg.num_parameters() * DType::F32.size_in_bytes();

    let mut seq = 0;
    let prefill_ms = median_ms(1, 5, || {
        seq += 1;
        engine.forward(
            vec![SeqChunk {
                seq_id: seq,
                context_len: 0,
                query_len: n,
            }],
            &prompt,
            LogitsAt::LastToken,
        )?;
        engine.release(seq);
        Ok(())
    })?;
    seq += 1;
    engine.forward(
        vec![SeqChunk {
            seq_id: seq,
            context_len: 0,
            query_len: n,
        }],
        &prompt,
        LogitsAt::LastToken,
    )?;
    let mut ctx = n;
    let decode_ms = median_ms(2, args.decode_steps, || {
        engine.forward(
            vec![SeqChunk {
                seq_id: seq,
                context_len: ctx,
                query_len: 1,
            }],
            &[1],
            LogitsAt::LastToken,
        )?;
        ctx += 1;
        Ok(())
    })?;

    let prefill_tflops = matmul_flops(linear_params, n) / (prefill_ms / 1e3) / 1e12;
    let decode_gbs = weight_bytes as f64 / (decode_ms / 1e3) / 1e9;
    let rec = json!({
        "bench": "forward",
        "model": dir.display().to_string(),
        "device": "cpu",
        "dtype": "f32",
        "backend": "reference",
        "prompt_len": n,
        "prefill_ms": prefill_ms,
        "prefill_tokens_per_s": n as f64 / (prefill_ms / 1e3),
        "prefill_matmul_tflops": prefill_tflops,
        "decode_step_ms": decode_ms,
        "decode_tokens_per_s": 1e3 / decode_ms,
        "decode_weight_read_gb_per_s": decode_gbs,
    });
    println!(
        "| model | prompt | prefill ms | prefill tok/s | TFLOP/s | decode ms/step | decode tok/s | weights GB/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {n} | {prefill_ms:.2} | {:.0} | {prefill_tflops:.4} | {decode_ms:.3} | {:.1} | {decode_gbs:.2} |",
        dir.file_name()
            .map_or_else(String::new, |f| f.to_string_lossy().into()),
        n as f64 / (prefill_ms / 1e3),
        1e3 / decode_ms
    );
    let path = write_json("forward.json", &[rec]).context("writing forward.json")?;
    println!("wrote {}", path.display());
    Ok(())
}
