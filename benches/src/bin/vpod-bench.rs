//! GPU benchmarks of the vAttention path (`--features cuda`, run on the GPU
//! machine by `scripts/gpu-run.sh`). Each subcommand prints a table and
//! writes JSON (and an SVG for `spikes`) into `--out`:
//!
//! - `decode`:  the split-KV decode kernel over the VMM cache, one layer,
//!   16K context, batch 1..32, the three models' head shapes: achieved
//!   bandwidth (K/V bytes read / time) against the 3.0 TB/s copy ceiling;
//! - `prefill`: the causal prefill kernel, a 16K prompt and a 1024-token
//!   chunk at offsets 4K and 12K: TFLOP/s (both query-tile sizes);
//! - `map`:     time to map N page groups of 2 MiB (per-layer regions vs
//!   megacache) through the CUDA VMM API: GB/s;
//! - `spikes`:  Llama-3-8B synthetic, batch 4, decoding across many page
//!   boundaries: per-step latency with synchronous and overlapped mapping;
//! - `e2e`:     Llama-3-8B synthetic decode throughput at a 16K context,
//!   batch 1..16, next to the memory floor.

use std::time::Instant;

use anyhow::{Context, Result, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use vpod_attention::{
    AttentionBackend, AttnConfig, BackendOptions, BatchMeta, LogitsAt, SeqChunk, create_backend,
};
use vpod_kvcache::Mapping;

/// Copy bandwidth ceiling of the H100 used for the percentages (DESIGN.md).
const COPY_TBPS: f64 = 3.0;

#[derive(Parser, Debug)]
#[command(about = "GPU benchmarks of the vAttention path")]
struct Args {
    #[command(subcommand)]
    what: What,
    /// Directory for the JSON (and SVG) results.
    #[arg(long, global = true, default_value = "target/bench")]
    out: std::path::PathBuf,
    /// Timed iterations per point (after 3 warm-up runs).
    #[arg(long, global = true, default_value_t = 20)]
    iters: usize,
}

#[derive(Subcommand, Debug)]
enum What {
    Decode {
        #[arg(long, default_value_t = 16384)]
        context: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
        batch: Vec<usize>,
    },
    Prefill,
    Map,
    Spikes {
        #[arg(long, default_value_t = 512)]
        steps: usize,
    },
    E2e {
        #[arg(long, default_value_t = 16384)]
        context: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
        batch: Vec<usize>,
    },
}

const SHAPES: &[(&str, usize, usize)] = &[("llama3-8b", 32, 8), ("yi-6b", 32, 4), ("yi-34b", 56, 8)];

fn gpu() -> Result<Device> {
    Device::new_cuda(0).context("a CUDA device (build with --features cuda)")
}

fn gpu_name() -> String {
    std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name", "--format=csv,noheader"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.lines().next().unwrap_or("").trim().to_string())
        .unwrap_or_default()
}

fn rand(shape: (usize, usize, usize), dev: &Device) -> Result<Tensor> {
    Ok(Tensor::randn(0f32, 1.0, shape, dev)?.to_dtype(DType::BF16)?)
}

/// Seconds per call of `f`: 3 warm-ups, then 5 rounds of `iters` calls
/// queued back to back (as a model's layers are) with one synchronisation
/// each; the median round. Kernel times proper come from Nsight Compute
/// (`scripts/gpu-run.sh kernels` runs it).
fn time(dev: &Device, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    dev.synchronize()?;
    let n = iters.max(1);
    let mut v = Vec::with_capacity(5);
    for _ in 0..5 {
        let t = Instant::now();
        for _ in 0..n {
            f()?;
        }
        dev.synchronize()?;
        v.push(t.elapsed().as_secs_f64() / n as f64);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[v.len() / 2])
}

/// A 2-layer `vattention` backend with these head counts, room for `seqs` x `max_len`.
fn backend(
    heads: usize,
    kv_heads: usize,
    seqs: usize,
    max_len: usize,
    dev: &Device,
) -> Result<Box<dyn AttentionBackend>> {
    let cfg = AttnConfig {
        num_layers: 2,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: 128,
        max_seq_len: max_len,
        dtype: DType::BF16,
    };
    let opts = BackendOptions {
        max_seqs: seqs,
        ..Default::default()
    };
    Ok(create_backend("vattention", &cfg, dev, &opts)?)
}

/// A step's metadata and random q, k, v for it.
fn inputs(chunks: Vec<SeqChunk>, heads: usize, kvh: usize, dev: &Device) -> Result<(BatchMeta, [Tensor; 3])> {
    let t: usize = chunks.iter().map(|c| c.query_len).sum();
    let meta = BatchMeta::new(chunks, LogitsAt::LastToken, dev)?;
    Ok((
        meta,
        [
            rand((t, heads, 128), dev)?,
            rand((t, kvh, 128), dev)?,
            rand((t, kvh, 128), dev)?,
        ],
    ))
}

/// Runs one step on both layers (prefills, grows).
fn step(
    b: &mut dyn AttentionBackend,
    chunks: Vec<SeqChunk>,
    heads: usize,
    kvh: usize,
    dev: &Device,
) -> Result<()> {
    let (meta, [q, k, v]) = inputs(chunks, heads, kvh, dev)?;
    for layer in 0..2 {
        b.forward(layer, &q, &k, &v, &meta)?;
    }
    Ok(())
}

/// Times layer 1 of a step (its plan is built by a layer-0 call first).
fn time_layer(
    b: &mut dyn AttentionBackend,
    chunks: Vec<SeqChunk>,
    heads: usize,
    kvh: usize,
    dev: &Device,
    iters: usize,
) -> Result<f64> {
    let (meta, [q, k, v]) = inputs(chunks, heads, kvh, dev)?;
    b.forward(0, &q, &k, &v, &meta)?;
    time(dev, iters, || {
        b.forward(1, &q, &k, &v, &meta)?;
        Ok(())
    })
}

fn decode(context: usize, batches: &[usize], iters: usize) -> Result<Vec<Value>> {
    let dev = gpu()?;
    let mut rows = vec![];
    println!(
        "| model heads | batch | us / layer | K/V TB/s | % of {COPY_TBPS} TB/s |\n|---|---|---|---|---|"
    );
    for &(model, heads, kvh) in SHAPES {
        for &bsz in batches {
            let mut b = backend(heads, kvh, bsz, context + 64, &dev)?;
            for s in 0..bsz as u64 {
                step(
                    b.as_mut(),
                    vec![SeqChunk {
                        seq_id: s,
                        context_len: 0,
                        query_len: context,
                    }],
                    heads,
                    kvh,
                    &dev,
                )?;
            }
            let chunks: Vec<SeqChunk> = (0..bsz as u64)
                .map(|s| SeqChunk {
                    seq_id: s,
                    context_len: context,
                    query_len: 1,
                })
                .collect();
            let secs = time_layer(b.as_mut(), chunks, heads, kvh, &dev, iters)?;
            let bytes = (bsz * (context + 1) * kvh * 128 * 2 * 2) as f64;
            let tbps = bytes / secs / 1e12;
            println!(
                "| {model} {heads}/{kvh} | {bsz} | {:.1} | {tbps:.2} | {:.0} |",
                secs * 1e6,
                tbps / COPY_TBPS * 100.0
            );
            rows.push(
                json!({"model": model, "heads": heads, "kv_heads": kvh, "batch": bsz, "context": context,
                "us_per_layer": secs * 1e6, "kv_bytes": bytes, "tb_per_s": tbps,
                "what": "one layer's attention call: K/V write + split-KV decode + combine"}),
            );
        }
    }
    Ok(rows)
}

fn prefill(iters: usize) -> Result<Vec<Value>> {
    let dev = gpu()?;
    let (heads, kvh) = (32, 8);
    let mut rows = vec![];
    println!("| case | query tile | ms / layer | TFLOP/s |\n|---|---|---|---|");
    for warps in ["8", "4"] {
        // SAFETY: single-threaded here; read by the backend when it plans a step.
        unsafe { std::env::set_var("VPOD_PREFILL_WARPS", warps) };
        for (name, ctx, ql) in [
            ("16K causal prompt", 0usize, 16384usize),
            ("1024 chunk at 4K", 4096, 1024),
            ("1024 chunk at 12K", 12288, 1024),
        ] {
            let mut b = backend(heads, kvh, 1, 16384 + 64, &dev)?;
            let mut done = 0;
            while done < ctx {
                let n = (ctx - done).min(4096);
                step(
                    b.as_mut(),
                    vec![SeqChunk {
                        seq_id: 0,
                        context_len: done,
                        query_len: n,
                    }],
                    heads,
                    kvh,
                    &dev,
                )?;
                done += n;
            }
            let secs = time_layer(
                b.as_mut(),
                vec![SeqChunk {
                    seq_id: 0,
                    context_len: ctx,
                    query_len: ql,
                }],
                heads,
                kvh,
                &dev,
                iters,
            )?;
            // Each query row j sees ctx + j + 1 keys: QK^T and PV, 2 FLOPs per MAC.
            let pairs = (ql * ctx + ql * (ql + 1) / 2) as f64;
            let flops = 4.0 * 128.0 * heads as f64 * pairs;
            let tf = flops / secs / 1e12;
            println!(
                "| {name} | {} rows | {:.3} | {tf:.0} |",
                16 * warps.parse::<usize>()?,
                secs * 1e3
            );
            rows.push(
                json!({"case": name, "context": ctx, "query_len": ql, "heads": heads, "kv_heads": kvh,
                "query_tile": 16 * warps.parse::<usize>()?, "ms_per_layer": secs * 1e3, "tflop_per_s": tf,
                "what": "one layer's attention call incl. the K/V write of the chunk"}),
            );
        }
    }
    unsafe { std::env::remove_var("VPOD_PREFILL_WARPS") };
    Ok(rows)
}

#[cfg(not(feature = "cuda"))]
fn map(_: usize) -> Result<Vec<Value>> {
    bail!("the mapping benchmark needs a CUDA build (--features cuda)")
}

#[cfg(feature = "cuda")]
fn map(iters: usize) -> Result<Vec<Value>> {
    use vpod_kvcache::{KvManager, VirtualCache, VirtualConfig};
    let Device::Cuda(dev) = gpu()? else {
        bail!("no CUDA device")
    };
    let ctx = dev.cuda_stream().context().clone();
    let mut rows = vec![];
    println!("| layout | page groups | pages | map ms | GB/s | unmap ms |\n|---|---|---|---|---|---|");
    for megacache in [false, true] {
        for groups in [1usize, 8, 64] {
            // Llama-3-8B: 32 layers, 8 KV heads of 128 bf16.
            let regions = if megacache { 2 } else { 64 };
            let cfg = VirtualConfig {
                num_layers: 32,
                kv_heads: 8,
                head_dim: 128,
                elem_bytes: 2,
                max_seqs: 2,
                max_len: 131072,
                page_size: 2 << 20,
                budget_bytes: groups * regions * (2 << 20),
                megacache,
                mapping: Mapping::Sync,
            };
            let (mut map_s, mut unmap_s) = (vec![], vec![]);
            for _ in 0..iters.clamp(3, 7) {
                // A fresh cache each round (its pool is created outside the timing):
                // deferred reclamation would otherwise reuse the mapped slot.
                let mut c = VirtualCache::on_cuda(cfg, ctx.clone())?;
                let tokens = c.total_tokens();
                let t = Instant::now();
                c.admit(1, tokens)?;
                let m = t.elapsed().as_secs_f64();
                c.release(1);
                // Another slot takes every page: all are unmapped, then mapped again.
                c.admit(2, 0)?;
                let t = Instant::now();
                c.grow(2, tokens)?;
                let both = t.elapsed().as_secs_f64();
                map_s.push(m);
                unmap_s.push((both - m).max(0.0));
            }
            map_s.sort_by(f64::total_cmp);
            unmap_s.sort_by(f64::total_cmp);
            let (m, u) = (map_s[map_s.len() / 2], unmap_s[unmap_s.len() / 2]);
            let bytes = (groups * regions * (2 << 20)) as f64;
            println!(
                "| {} | {groups} | {} | {:.2} | {:.1} | {:.2} |",
                if megacache { "megacache" } else { "per layer" },
                groups * regions,
                m * 1e3,
                bytes / m / 1e9,
                u * 1e3
            );
            rows.push(json!({"layout": if megacache { "megacache" } else { "per-layer" }, "page_groups": groups,
                "pages": groups * regions, "page_bytes": 2 << 20, "map_ms": m * 1e3, "map_gb_per_s": bytes / m / 1e9,
                "unmap_ms_estimate": u * 1e3}));
        }
    }
    Ok(rows)
}

fn synthetic_llama(dev: &Device, max_pos: usize) -> Result<vpod_models::LoadedModel> {
    let mut p = *vpod_models::preset("llama3-8b").context("preset")?;
    p.max_position_embeddings = p.max_position_embeddings.max(max_pos);
    Ok(vpod_models::load_synthetic(
        &p,
        DType::BF16,
        dev,
        0,
        &mut |_, _| {},
    )?)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s[((s.len() - 1) as f64 * p).round() as usize]
}

fn spikes(steps: usize) -> Result<Vec<Value>> {
    use vpod_cli::engine::{Engine, Request};
    use vpod_cli::sampler::SamplingParams;
    use vpod_cli::scheduler::{Policy, SchedulerConfig};
    let dev = gpu()?;
    let model = std::sync::Arc::new(synthetic_llama(&dev, 8192)?);
    let mut rows = vec![];
    let mut traces = vec![];
    println!(
        "| layout | mapping | decode steps | p50 ms | p99 ms | max ms | p99/p50 | mapped groups |\n|---|---|---|---|---|---|---|---|"
    );
    for megacache in [true, false] {
        for mapping in [Mapping::Sync, Mapping::Overlapped] {
            let opts = BackendOptions {
                max_seqs: 4,
                megacache,
                mapping,
                kv_memory: Some(8 << 30),
                ..Default::default()
            };
            let mut e = Engine::with_options(model.clone(), "vattention", &opts)?;
            // Staggered lengths: the four sequences cross page boundaries at different steps.
            let reqs: Vec<Request> = (0..4)
                .map(|i| Request {
                    prompt: (0..1000 + 9 * i).map(|t| (t * 7 % 1000) as u32 + 10).collect(),
                    max_tokens: steps,
                    sampling: SamplingParams::default(),
                    arrival_ms: 0.0,
                })
                .collect();
            let sched = SchedulerConfig {
                policy: Policy::PrefillFirst,
                chunk_size: 8192,
                max_seqs: 4,
            };
            let out = e.run_batch(&reqs, sched, &mut |_, _| Ok(()))?;
            let ms: Vec<f64> = out
                .steps
                .iter()
                .filter(|s| s.decodes == 4 && s.prefill_chunks == 0)
                .map(|s| s.ms)
                .collect();
            if ms.len() < 10 {
                bail!("too few decode steps ({})", ms.len());
            }
            let (p50, p99, max) = (percentile(&ms, 0.5), percentile(&ms, 0.99), percentile(&ms, 1.0));
            let layout = if megacache { "megacache" } else { "per-layer" };
            let mode = if mapping == Mapping::Sync {
                "sync"
            } else {
                "overlapped"
            };
            println!(
                "| {layout} | {mode} | {} | {p50:.2} | {p99:.2} | {max:.2} | {:.3} | |",
                ms.len(),
                p99 / p50
            );
            rows.push(json!({"layout": layout, "mapping": mode, "decode_steps": ms.len(), "p50_ms": p50, "p99_ms": p99,
                "max_ms": max, "p99_over_p50": p99 / p50, "step_ms": ms}));
            traces.push((format!("{layout}, {mode}"), ms));
        }
    }
    svg_traces(
        &traces,
        "Llama-3-8B synthetic, batch 4: decode step latency (ms) per step",
        "spikes.svg",
    )?;
    Ok(rows)
}

/// A minimal SVG line chart of several traces (no plotting dependency).
fn svg_traces(traces: &[(String, Vec<f64>)], title: &str, name: &str) -> Result<()> {
    let (w, h, pad) = (900.0, 420.0, 50.0);
    let n = traces.iter().map(|t| t.1.len()).max().unwrap_or(1).max(2) as f64;
    let ymax = traces
        .iter()
        .flat_map(|t| t.1.iter().copied())
        .fold(0.0, f64::max)
        * 1.1;
    let colors = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c"];
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/><text x='{pad}' y='20'>{title}</text>\
         <line x1='{pad}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{pad}' y1='{pad}' x2='{pad}' y2='{}' stroke='black'/>\
         <text x='5' y='{pad}'>{ymax:.1}</text><text x='5' y='{}'>0</text><text x='{}' y='{}'>step</text>",
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        h - pad,
        w / 2.0,
        h - 15.0
    );
    for (i, (label, ys)) in traces.iter().enumerate() {
        let pts: Vec<String> = ys
            .iter()
            .enumerate()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    pad + x as f64 / (n - 1.0) * (w - 2.0 * pad),
                    h - pad - y / ymax * (h - 2.0 * pad)
                )
            })
            .collect();
        let c = colors[i % colors.len()];
        s += &format!(
            "<polyline fill='none' stroke='{c}' stroke-width='1' points='{}'/>",
            pts.join(" ")
        );
        s += &format!(
            "<text x='{}' y='{}' fill='{c}'>{label}</text>",
            w - 260.0,
            40.0 + 16.0 * i as f64
        );
    }
    s += "</svg>\n";
    std::fs::write(vpod_benches::out_dir().join(name), s)?;
    Ok(())
}

fn e2e(context: usize, batches: &[usize]) -> Result<Vec<Value>> {
    use vpod_cli::engine::{Engine, Request};
    use vpod_cli::sampler::SamplingParams;
    use vpod_cli::scheduler::{Policy, SchedulerConfig};
    let dev = gpu()?;
    let model = std::sync::Arc::new(synthetic_llama(&dev, context + 256)?);
    let weights = 16.06e9; // Llama-3-8B bf16 weights (DESIGN.md)
    let kv_per_token = 32.0 * 2.0 * 8.0 * 128.0 * 2.0;
    let mut rows = vec![];
    println!("| batch | tok/s | ms / step | floor ms | % of floor |\n|---|---|---|---|---|");
    for &bsz in batches {
        let opts = BackendOptions {
            max_seqs: bsz,
            kv_memory: Some(
                (bsz as f64 * (context + 128) as f64 * kv_per_token * 1.05) as usize + (256 << 20),
            ),
            ..Default::default()
        };
        let mut e = Engine::with_options(model.clone(), "vattention", &opts)?;
        let reqs: Vec<Request> = (0..bsz)
            .map(|i| Request {
                prompt: (0..context)
                    .map(|t| ((t * 31 + i * 7) % 30000) as u32 + 10)
                    .collect(),
                max_tokens: 32,
                sampling: SamplingParams::default(),
                arrival_ms: 0.0,
            })
            .collect();
        let sched = SchedulerConfig {
            policy: Policy::PrefillFirst,
            chunk_size: context,
            max_seqs: bsz,
        };
        let out = e.run_batch(&reqs, sched, &mut |_, _| Ok(()))?;
        let ms: Vec<f64> = out
            .steps
            .iter()
            .filter(|s| s.decodes == bsz && s.prefill_chunks == 0)
            .map(|s| s.ms)
            .collect();
        let step_ms = percentile(&ms, 0.5);
        let floor_ms =
            (weights + bsz as f64 * (context + 16) as f64 * kv_per_token) / (COPY_TBPS * 1e12) * 1e3;
        let tps = bsz as f64 / step_ms * 1e3;
        println!(
            "| {bsz} | {tps:.1} | {step_ms:.2} | {floor_ms:.2} | {:.0} |",
            floor_ms / step_ms * 100.0
        );
        rows.push(
            json!({"batch": bsz, "context": context, "decode_tokens_per_s": tps, "median_step_ms": step_ms,
            "floor_ms": floor_ms, "percent_of_floor": floor_ms / step_ms * 100.0}),
        );
    }
    Ok(rows)
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: before any thread is started.
    unsafe { std::env::set_var("VPOD_BENCH_OUT", &args.out) };
    std::fs::create_dir_all(&args.out)?;
    let (name, rows) = match &args.what {
        What::Decode { context, batch } => ("decode", decode(*context, batch, args.iters)?),
        What::Prefill => ("prefill", prefill(args.iters)?),
        What::Map => ("map", map(args.iters)?),
        What::Spikes { steps } => ("spikes", spikes(*steps)?),
        What::E2e { context, batch } => ("e2e", e2e(*context, batch)?),
    };
    let record = json!({"benchmark": name, "gpu": gpu_name(), "date": std::env::var("VPOD_DATE").unwrap_or_default(),
        "command": std::env::args().collect::<Vec<_>>().join(" "), "results": rows});
    let path = vpod_benches::write_json(&format!("{name}.json"), &[record])?;
    println!("wrote {}", path.display());
    Ok(())
}
