//! GPU benchmarks of the vAttention and PagedAttention paths (`--features
//! cuda`, run on the GPU machine by `scripts/gpu-run.sh`). Each subcommand
//! prints a table and writes JSON (and an SVG for `spikes` and `e2e`) into
//! `--out`. Every run first measures this GPU's two ceilings (device-to-device
//! copy bandwidth and the bf16 matmul rate, `Ceilings`); the tables'
//! percentages divide by them, and the JSON records them with the GPU's name.
//!
//! - `decode`:  one layer's decode attention, 16K context, batch 1..32, the
//!   three models' head shapes, per backend (`vattention`'s split-KV kernel
//!   over the VMM cache, `paged:16` / `paged:128`'s vLLM v0.2.7 kernels):
//!   achieved bandwidth (K/V bytes read / time) against the measured copy
//!   ceiling, and paged / vattention latency ratios (the vAttention paper's
//!   figure 9b);
//! - `prefill`: the causal prefill kernels, a 16K prompt, a 1024-token
//!   chunk at offsets 4K and 12K and a 2048-token chunk at 16K (the hybrid
//!   grid's longest prefill), Llama-3-8B and Yi-6B heads: TFLOP/s
//!   against the measured matmul ceiling (each query tile of ours, and the
//!   paged prefill);
//! - `jit`:     the driver's JIT compilation of each of candle's kernel
//!   modules (they ship as PTX): what a process's first forward pass pays
//!   when the driver's JIT cache does not hold them (run it with
//!   `CUDA_CACHE_DISABLE=1` to see that cost);
//! - `map`:     time to map N page groups of 2 MiB (per-layer regions vs
//!   megacache) through the CUDA VMM API: GB/s;
//! - `spikes`:  Llama-3-8B synthetic, batch 4, decoding across many page
//!   boundaries: per-step latency with synchronous and overlapped mapping;
//! - `e2e`:     decode throughput of synthetic Yi-6B / Llama-3-8B / Yi-34B
//!   at a 16K context per request, batch 1..32 as the GPU's memory allows,
//!   per backend, next to the memory floor (the paper's figure 9a); a short
//!   warm-up run before each timed one, timed apart (first-use costs);
//! - `hybrid`:  one layer's attention of hybrid batches (a prefill chunk of
//!   512 / 1024 / 2048 tokens at 4K..12K of its prompt next to a decode batch
//!   sized to fill an 80 GB GPU at 4K..16K of context), Llama-3-8B and Yi-6B
//!   heads: the POD kernel (both block-role policies) and the planner's
//!   choice against the serial pair (both prefill tiles: the best is the
//!   baseline) and two CUDA streams (the POD-Attention paper's sweep);
//!   with `--energy-ms` also each variant and each half under a sustained
//!   load, read against the GPU's energy counter (NVML), and the bound the
//!   power cap puts on any overlap;
//! - `gemv`:    the decode projections' GEMV kernels (every
//!   `linear::GemvKernel`) on the models' shapes at 1..4 rows: GPU time and
//!   TB/s of the weights against the copy ceiling;
//! - `allreduce`: the tensor-parallel ranks' bf16 all-reduce over N GPUs
//!   (NCCL in `nccl` builds): time per call and bus bandwidth per size;
//! - `layer`:   the rest of a decoder layer (norms, projections, RoPE, MLP;
//!   everything but the attention call) at the token counts of prefill
//!   chunks and hybrid steps, per op: time, TFLOP/s of the projections
//!   against the bf16 matmul ceiling, GB/s of the rest;
//! - `serve`:   offline serving of 16K-token requests on synthetic weights:
//!   requests per minute for `prefill-first` + `vattention`, `hybrid` +
//!   `vattention` and `hybrid` + `pod` (one workload, or one per
//!   prefill:decode ratio with `--pd-ratios`), each run against Sarathi-Serve
//!   with the serial pair, and with `--rate` Poisson arrivals (online) TTFT
//!   and time between tokens; `--chunks` sweeps the chunk size (the JSON's
//!   `by_step_kind` and `steps_detail` say where each step's time went).

use std::time::Instant;

use anyhow::{Context, Result, bail, ensure};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use serde_json::{Value, json};
use vpod_attention::{
    AttentionBackend, AttnConfig, BackendOptions, BatchMeta, LogitsAt, PodMode, PodPolicy, PodTuning,
    PrefillKernel, SeqChunk, SlimDecode, create_backend,
};
use vpod_benches::energy::{self, Nvml, Sustained};
use vpod_kvcache::Mapping;

#[derive(Parser, Debug)]
#[command(about = "GPU benchmarks of the vAttention and PagedAttention paths")]
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
        /// Backends to compare (the first is the baseline of the ratios' denominator).
        #[arg(long, value_delimiter = ',', default_value = "vattention,paged:16,paged:128")]
        backends: Vec<String>,
    },
    Prefill {
        #[arg(long, value_delimiter = ',', default_value = "vattention,paged:16,paged:128")]
        backends: Vec<String>,
        /// Head shapes (q / KV heads) of these models.
        #[arg(long, value_delimiter = ',', default_value = "llama3-8b,yi-6b")]
        models: Vec<String>,
        /// `vattention`'s prefill kernels to time (w8, w4, w4p, tma64, wsp,
        /// wsps: the slim wsp; NAME/nol2: a
        /// warp-specialized one without its L2 sections, the order before;
        /// the other backends run their own).
        #[arg(long, value_delimiter = ',', default_value = "w8,w4,w4p,tma64,wsp")]
        kernels: Vec<String>,
        /// The cases to run (16k: a 16K causal prompt; 1k@4k, 1k@12k: a
        /// 1024-token chunk over a 4K / 12K context; 2k@16k: a 2048-token
        /// chunk over 16K), e.g. one alone under Nsight Compute.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "16k,1k@4k,1k@12k,2k@16k",
            value_parser = clap::builder::PossibleValuesParser::new(PREFILL_CASES.map(|c| c.0))
        )]
        cases: Vec<String>,
        /// Times each case on this many fresh backends, the p-th (from 0)
        /// mapping its pages after a spacer of p x 96 MiB of device memory
        /// (other physical pages): a row each, with the kernel reps' min and
        /// max, to tell a placement-dependent time from run-to-run spread.
        #[arg(long, default_value_t = 1)]
        placements: usize,
    },
    Map,
    Jit {
        /// candle kernel modules to load (default: all but `quantized`, which
        /// the Llama models never run).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "affine,binary,cast,conv,fill,indexing,reduce,sort,ternary,unary"
        )]
        modules: Vec<String>,
    },
    Spikes {
        #[arg(long, default_value_t = 512)]
        steps: usize,
    },
    E2e {
        #[arg(long, default_value_t = 16384)]
        context: usize,
        #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32")]
        batch: Vec<usize>,
        /// Model presets (synthetic weights).
        #[arg(long, value_delimiter = ',', default_value = "yi-6b,llama3-8b")]
        models: Vec<String>,
        #[arg(long, value_delimiter = ',', default_value = "vattention,paged:16,paged:128")]
        backends: Vec<String>,
        /// Tokens generated per request (the median decode step is reported).
        #[arg(long, default_value_t = 256)]
        tokens: usize,
        /// Time every attention call (CUDA events, read after the step): the
        /// JSON's per-step records then split the prefill into attention and
        /// the rest (the decode steps pay for the events too).
        #[arg(long)]
        profile_attention: bool,
        /// Shard each model over N GPUs (cuda:0 .. cuda:N-1; tensor
        /// parallelism, NCCL in builds with the `nccl` feature).
        #[arg(long, default_value_t = 1)]
        tensor_parallel: usize,
        /// CUDA graphs for the decode steps: on, off, or both (`on,off`:
        /// every point twice, rows with `cuda_graphs` true and false).
        #[arg(long, value_delimiter = ',', default_value = "on,off")]
        cuda_graphs: Vec<vpod_cli::engine::CudaGraphs>,
        /// RMSNorm fused into the next GEMV on the decode path: never (our
        /// PDL norm kernel, then the GEMV; the default), auto (fused where
        /// the persistent grid is balanced) or always (A/B end to end).
        #[arg(long, default_value = "never")]
        norm_fusion: vpod_attention::linear::NormFusion,
        /// Programmatic dependent launch of the decode path's kernels (each
        /// may start while the one before it finishes; Hopper and later):
        /// on or off (A/B end to end).
        #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
        pdl: bool,
        /// Measure the GEMV kernels on each model's weights at load and run
        /// the fastest per shape (`linear::tune_gemv`): on, or off (the
        /// default kernel everywhere).
        #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
        gemv_tune: bool,
        /// Rows (tokens) up to which the projections run the GEMV kernel
        /// rather than cuBLAS (`linear::set_gemv_rows`; at most 8, 0: never).
        #[arg(long, default_value_t = vpod_attention::linear::GEMV_DEFAULT_ROWS)]
        gemv_rows: usize,
        /// RoPE and the K/V write of `vattention` / `pod` decode steps in one
        /// kernel (`set_rope_write_fusion`): on, or off (two kernels; A/B).
        #[arg(long, default_value = "on", value_parser = on_off, action = clap::ArgAction::Set)]
        rope_write: bool,
    },
    Hybrid {
        #[arg(long, value_delimiter = ',', default_value = "llama3-8b,yi-6b")]
        models: Vec<String>,
        /// Prefill chunk sizes.
        #[arg(long, value_delimiter = ',', default_value = "512,1024,2048")]
        chunks: Vec<usize>,
        /// Prompt tokens already in the cache before the chunk.
        #[arg(long, value_delimiter = ',', default_value = "4096,8192,12288")]
        positions: Vec<usize>,
        /// Context of every decode.
        #[arg(long, value_delimiter = ',', default_value = "4096,8192,16384")]
        contexts: Vec<usize>,
        /// GPU memory the decode batch is sized to fill (weights + KV of the whole model).
        #[arg(long, default_value_t = 80.0)]
        memory_gb: f64,
        /// Decode batch sizes to run instead of the memory-filling one (e.g.
        /// `4,8,16`: a few long decodes, as in a serving run's hybrid steps).
        #[arg(long, value_delimiter = ',')]
        decodes: Vec<usize>,
        /// Variants to time (default: the serial pairs, `streams`, `pod`,
        /// `podp`, `pod3-p2`, `auto`; others, among them: `serial-ws`,
        /// `serial-wss` (the slim prefill), `streams-ws`, `streams-slim` / `streams-slimr` (the slim
        /// pair, with the slim decode's ring a warp), `auto-slim` /
        /// `auto-slimr` (the planner with the slim pair), `auto-slimrs` (and
        /// the slim tile on every step), `auto-nol2` /
        /// `serial-ws-nol2` (no L2 sections), `wsd-N` (the partitioned
        /// kernel, N decode SMs), `pod3-ticket`, `podp-nt` / `pod3-nt` (no
        /// TMA); an unknown name lists them all); at least one `serial*` one,
        /// the baseline.
        #[arg(long, value_delimiter = ',')]
        variants: Vec<String>,
        /// FlashInfer harness results of the same call (`fi.json`, its POD
        /// section): each case's planner step, timed alone as the harness
        /// times (CUDA events after a GPU spin), against FlashInfer's best
        /// serial pair; the summary row gets `vs_flashinfer_best_serial`, and
        /// for the other planner variants timed (`auto-*`, e.g. `auto-slim`)
        /// `vs_flashinfer_best_serial_by_variant`.
        #[arg(long)]
        fi_json: Option<std::path::PathBuf>,
        /// Also run each variant, and each half alone, back to back for this
        /// many ms (after half as long to settle the clocks) and read the
        /// GPU's energy counter (NVML): time, watts, energy and SM clock per
        /// step under a sustained load, and the power-cap bound of a perfect
        /// overlap ([`vpod_benches::energy::cap_bound_s`]). 0: off.
        #[arg(long, default_value_t = 0)]
        energy_ms: u64,
    },
    /// The decode projections' GEMV kernels (`linear::GemvKernel`) on each
    /// model's shapes: GPU time per kernel and the weights' TB/s against the
    /// copy ceiling, weights rotated over copies so that L2 holds none.
    Gemv {
        #[arg(long, value_delimiter = ',', default_value = "llama3-8b,yi-6b,yi-34b")]
        models: Vec<String>,
        /// Rows (tokens) of x.
        #[arg(long, value_delimiter = ',', default_value = "1,4")]
        rows: Vec<usize>,
        /// Programmatic dependent launch (on, off, or both: `on,off`): with
        /// it each launch of a chain may start while the one before finishes.
        #[arg(long, value_delimiter = ',', default_value = "on,off", value_parser = on_off)]
        pdl: Vec<bool>,
    },
    /// The tensor-parallel ranks' bf16 all-reduce (the collective after each
    /// attention and MLP block of a sharded layer), through the engine's
    /// communicators (NCCL in builds with the `nccl` feature): time per
    /// call and NCCL's bus bandwidth per message size.
    Allreduce {
        /// Ranks, one per GPU (cuda:0 .. cuda:N-1).
        #[arg(long, default_value_t = 2)]
        tensor_parallel: usize,
        /// Message sizes in KiB: a decode step's [batch, hidden] in bf16
        /// (8 KiB for one token of Llama-3-8B, 448 KiB for 32 of Yi-34B), a
        /// 1K-token chunk's (8-14 MiB), and large ones for the bus bandwidth.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "8,64,512,4096,16384,65536,262144"
        )]
        sizes_kib: Vec<usize>,
    },
    Layer {
        #[arg(long, value_delimiter = ',', default_value = "llama3-8b,yi-6b")]
        models: Vec<String>,
        /// Tokens in the step (rows of every projection).
        #[arg(long, value_delimiter = ',', default_value = "512,1024,2048,16384")]
        tokens: Vec<usize>,
    },
    Serve {
        #[arg(long, value_delimiter = ',', default_value = "yi-6b,llama3-8b")]
        models: Vec<String>,
        #[arg(long, default_value_t = 32)]
        requests: usize,
        /// Prompt tokens per request.
        #[arg(long, default_value_t = 16384 - 512)]
        prompt: usize,
        /// Generated tokens per request.
        #[arg(long, default_value_t = 512)]
        output: usize,
        /// Prefill:decode ratios (the POD paper's offline runs sweep them):
        /// each ratio r is one workload of `--request-tokens` tokens a
        /// request, prompt = tokens x r / (r + 1) (rounded), the rest
        /// generated. Replaces `--prompt` / `--output` when given.
        #[arg(long, value_delimiter = ',')]
        pd_ratios: Vec<f64>,
        /// Prompt + generated tokens of a request under `--pd-ratios`.
        #[arg(long, default_value_t = 16384)]
        request_tokens: usize,
        /// Poisson arrivals per second (0: all at once, the offline run).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        /// Chunk sizes (the token budget of a step's prefill chunk): each
        /// is a run of its own. Default: the POD paper's, Yi-6B 512 and
        /// Llama-3-8B 1024 (Yi-34B 1024).
        #[arg(long, value_delimiter = ',')]
        chunks: Vec<usize>,
        /// (scheduler/backend) runs; a backend may carry POD tuning flags
        /// over the defaults: `pod+decode-last`, `pod+slim` / `pod+noslim`
        /// (the slim pair on or off), `pod+slim+ring` / `pod+slim+tiles`
        /// (the slim pair's decode: a ring a warp, or block-wide); any
        /// backend `+wsp` / `+wsps` (the prefill kernel: the warp-specialized
        /// tile, or its slim build), e.g. `prefill-first/vattention+wsps`.
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "prefill-first/vattention,hybrid/vattention,hybrid/pod"
        )]
        runs: Vec<String>,
        /// Time every attention call (CUDA timing events around each, read
        /// after the step; nothing is synchronised): the JSON then splits
        /// each kind of step's time into attention and the rest.
        #[arg(long)]
        profile_attention: bool,
        /// CUDA graphs for the decode steps (on, off): rows carry `cuda_graphs`.
        #[arg(long, default_value = "on")]
        cuda_graphs: vpod_cli::engine::CudaGraphs,
        /// Shard each model over N GPUs (cuda:0 .. cuda:N-1; tensor
        /// parallelism, NCCL in builds with the `nccl` feature): rows carry
        /// `tensor_parallel`.
        #[arg(long, default_value_t = 1)]
        tensor_parallel: usize,
    },
}

const SHAPES: &[(&str, usize, usize)] = &[("llama3-8b", 32, 8), ("yi-6b", 32, 4), ("yi-34b", 56, 8)];

fn gpu() -> Result<Device> {
    Device::new_cuda(0).context("a CUDA device (build with --features cuda)")
}

/// The GPU's name as the driver gives it (empty if it cannot be read).
fn gpu_name(dev: &Device) -> String {
    vpod_cli::device::gpu_info(dev)
        .ok()
        .flatten()
        .map(|g| g.name)
        .unwrap_or_default()
}

/// The two ceilings every table is read against, measured on this GPU at
/// the start of the run (never a datasheet or another GPU's numbers: the
/// H100 constants this replaced were 25-40 % off on an H200).
#[derive(Debug, Clone)]
struct Ceilings {
    gpu: String,
    /// Device-to-device copy, bytes read + written per second ([`copy_bandwidth`]).
    copy_bytes_per_s: f64,
    /// bf16 matrix product through candle (cuBLAS), FLOP/s ([`matmul_rate`]).
    matmul_flop_per_s: f64,
    /// Wall time of the measurement. As the run's first GPU work it also
    /// pays the process's first use of cuBLAS and of the candle kernel
    /// modules it touches (loading them JIT-compiles their PTX).
    measured_in_s: f64,
}

impl Ceilings {
    fn measure(dev: &Device) -> Result<Self> {
        let t = Instant::now();
        let mut c = Self {
            gpu: gpu_name(dev),
            copy_bytes_per_s: copy_bandwidth(dev).context("measuring the copy bandwidth")?,
            matmul_flop_per_s: matmul_rate(dev).context("measuring the bf16 matmul rate")?,
            measured_in_s: 0.0,
        };
        c.measured_in_s = t.elapsed().as_secs_f64();
        println!(
            "{}: measured ceilings: copy {:.2} TB/s (cuMemcpyDtoD of 2 GiB, read + write), bf16 matmul {:.0} TFLOP/s ({MATMUL_N}^3, random data); {:.2} s with first use\n",
            c.gpu,
            c.tbps(),
            c.tflops(),
            c.measured_in_s
        );
        Ok(c)
    }

    fn tbps(&self) -> f64 {
        self.copy_bytes_per_s / 1e12
    }

    fn tflops(&self) -> f64 {
        self.matmul_flop_per_s / 1e12
    }

    fn json(&self) -> Value {
        json!({"copy_tb_per_s": self.tbps(), "matmul_tflop_per_s": self.tflops(), "measured_in_s": self.measured_in_s,
            "copy": "cuMemcpyDtoD of 2 GiB, (read + written bytes) / time, median of 5 rounds of 5",
            "matmul": format!("candle bf16 matmul (cuBLAS) {MATMUL_N} x {MATMUL_N} x {MATMUL_N} on N(0, 1) data, 2 n^3 / time, median of 5 rounds of 10")})
    }
}

/// Side of the square bf16 product the matmul ceiling is measured with:
/// large enough that cuBLAS runs at its peak (1.1 TFLOP, ~1.4 ms a product).
const MATMUL_N: usize = 8192;

/// bf16 matmul rate (FLOP/s) of an `MATMUL_N`^3 product on random data
/// (zeros ran 13 % faster on an H200: METHOD.md), warmed up, median round.
fn matmul_rate(dev: &Device) -> Result<f64> {
    let n = MATMUL_N;
    let a = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(DType::BF16)?;
    let b = Tensor::randn(0f32, 1.0, (n, n), dev)?.to_dtype(DType::BF16)?;
    let secs = time(dev, 10, || {
        a.matmul(&b)?;
        Ok(())
    })?;
    Ok(2.0 * (n * n * n) as f64 / secs)
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

/// A 2-layer backend `spec` with these head counts, room for `seqs` x `max_len`.
fn backend(
    spec: &str,
    heads: usize,
    kv_heads: usize,
    seqs: usize,
    max_len: usize,
    dev: &Device,
) -> Result<Box<dyn AttentionBackend>> {
    backend_with(
        spec,
        heads,
        kv_heads,
        seqs,
        max_len,
        dev,
        PrefillKernel::default(),
    )
}

/// [`backend`] with this prefill kernel.
fn backend_with(
    spec: &str,
    heads: usize,
    kv_heads: usize,
    seqs: usize,
    max_len: usize,
    dev: &Device,
    prefill_kernel: PrefillKernel,
) -> Result<Box<dyn AttentionBackend>> {
    let opts = BackendOptions {
        prefill_kernel,
        ..Default::default()
    };
    backend_opts(spec, heads, kv_heads, seqs, max_len, dev, opts)
}

/// [`backend`] with these options (room for `seqs` sequences).
fn backend_opts(
    spec: &str,
    heads: usize,
    kv_heads: usize,
    seqs: usize,
    max_len: usize,
    dev: &Device,
    opts: BackendOptions,
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
        ..opts
    };
    Ok(create_backend(spec, &cfg, dev, &opts)?)
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

/// SM cycles of the GPU spin before each timed kernel (~2 ms at 1.98 GHz,
/// the FlashInfer harness's `torch.cuda._sleep` before each rep).
const SPIN_CYCLES: u64 = 4_000_000;

/// The plain prefill kernel a step record names (`prefill SYMBOL`).
fn ran_prefill(note: &str) -> Option<&str> {
    note.split("prefill ").nth(1)?.split([',', ';', ' ']).next()
}

/// The plain prefill kernel alone (`None` where the backend does not time
/// it): per rep a GPU spin ([`SPIN_CYCLES`]), then layer 1 of the step with
/// CUDA events around its prefill kernel ([`BackendOptions::time_kernels`]);
/// its `iters` reps in ms after 3 warm-up ones (the benchmarks report
/// their median). The same method as the
/// FlashInfer harness's GPU times (each rep starts from a light load and
/// with its launches queued), so the two compare kernel to kernel.
fn prefill_kernel_samples(
    b: &mut dyn AttentionBackend,
    chunks: Vec<SeqChunk>,
    heads: usize,
    kvh: usize,
    dev: &Device,
    iters: usize,
) -> Result<Option<Vec<f64>>> {
    prefill_kernel_samples_clocked(b, chunks, heads, kvh, dev, iters, None).map(|s| s.map(|(ms, _)| ms))
}

/// The SM clock and NVML's clocks event reasons read right after a timed
/// rep (the host has waited for the kernel's end event, so the reading is
/// from within a few microseconds of the kernel's end).
#[derive(Debug, Clone, Copy)]
struct RepClock {
    sm_mhz: f64,
    reasons: Option<energy::ClockReasons>,
}

/// [`prefill_kernel_samples`], with each rep's [`RepClock`] where `nvml`
/// reads them (an NVML error leaves the rest of the run's clocks out).
fn prefill_kernel_samples_clocked(
    b: &mut dyn AttentionBackend,
    chunks: Vec<SeqChunk>,
    heads: usize,
    kvh: usize,
    dev: &Device,
    iters: usize,
    nvml: Option<&Nvml>,
) -> Result<Option<(Vec<f64>, Vec<RepClock>)>> {
    let (meta, [q, k, v]) = inputs(chunks, heads, kvh, dev)?;
    b.forward(0, &q, &k, &v, &meta)?;
    let (mut clocks, mut nvml) = (vec![], nvml);
    let ms = samples_after_spin(dev, iters, || {
        b.forward(1, &q, &k, &v, &meta)?;
        let ms = b.prefill_kernel_ms();
        if let (Some(_), Some(n)) = (ms, nvml) {
            match n.sm_mhz() {
                Ok(sm_mhz) => clocks.push(RepClock {
                    sm_mhz,
                    reasons: n.clock_reasons().ok(),
                }),
                Err(e) => {
                    eprintln!("prefill: SM clock not read ({e:#}); the clock columns stay empty");
                    (clocks, nvml) = (vec![], None);
                }
            }
        }
        Ok(ms)
    })?;
    // The clocks of the timed reps (samples_after_spin drops 3 warm-up reps).
    Ok(ms.map(|ms| {
        let skip = clocks.len().saturating_sub(ms.len());
        (ms, clocks.split_off(skip))
    }))
}

/// FlashInfer's harness's way of timing a call: per rep a GPU spin
/// ([`SPIN_CYCLES`]: the launches are queued behind it and the GPU starts
/// from a light load), then `measure` (one rep's time, `None`: nothing to
/// time, which ends it); the `reps` after 3 warm-up ones (the benchmarks
/// report their median).
fn samples_after_spin(
    dev: &Device,
    reps: usize,
    mut measure: impl FnMut() -> Result<Option<f64>>,
) -> Result<Option<Vec<f64>>> {
    let mut v = Vec::with_capacity(reps.max(1));
    for rep in 0..reps.max(1) + 3 {
        vpod_attention::ops::gpu_spin(dev, SPIN_CYCLES)?;
        let Some(t) = measure()? else {
            return Ok(None);
        };
        if rep >= 3 {
            v.push(t);
        }
    }
    Ok(Some(v))
}

fn decode(
    context: usize,
    batches: &[usize],
    backends: &[String],
    iters: usize,
    ceil: &Ceilings,
) -> Result<Vec<Value>> {
    let dev = gpu()?;
    let mut rows = vec![];
    println!(
        "| backend | model heads | batch | us / layer | K/V TB/s | % of {:.2} TB/s |\n|---|---|---|---|---|---|",
        ceil.tbps()
    );
    for spec in backends {
        for &(model, heads, kvh) in SHAPES {
            for &bsz in batches {
                let mut b = backend(spec, heads, kvh, bsz, context + 64, &dev)?;
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
                    "| {spec} | {model} {heads}/{kvh} | {bsz} | {:.1} | {tbps:.2} | {:.0} |",
                    secs * 1e6,
                    tbps / ceil.tbps() * 100.0
                );
                rows.push(
                    json!({"backend": spec, "model": model, "heads": heads, "kv_heads": kvh, "batch": bsz,
                    "context": context, "us_per_layer": secs * 1e6, "kv_bytes": bytes, "tb_per_s": tbps,
                    "percent_of_copy": tbps / ceil.tbps() * 100.0,
                    "what": "one layer's attention call: K/V write + decode kernels"}),
                );
            }
        }
    }
    // The paper's figure 9b: latency of each backend relative to the first.
    if backends.len() > 1 {
        let us = |spec: &str, model: &str, bsz: usize| {
            rows.iter()
                .find(|r| r["backend"] == spec && r["model"] == model && r["batch"] == bsz)
                .and_then(|r| r["us_per_layer"].as_f64())
                .unwrap_or(f64::NAN)
        };
        let base = &backends[0];
        print!("\n| model | batch | {base} us |");
        for other in &backends[1..] {
            print!(" {other} us | {other} / {base} |");
        }
        println!("\n|---|---|---|{}", "---|---|".repeat(backends.len() - 1));
        for &(model, _, _) in SHAPES {
            for &bsz in batches {
                let b0 = us(base, model, bsz);
                print!("| {model} | {bsz} | {b0:.1} |");
                for other in &backends[1..] {
                    let o = us(other, model, bsz);
                    print!(" {o:.1} | {:.2} |", o / b0);
                }
                println!();
            }
        }
    }
    Ok(rows)
}

/// A `--kernels` name: a [`PrefillKernel`], and its L2 budget
/// ([`BackendOptions::prefill_l2_budget`]): the default, or 0 for a name
/// with `/nol2` (the warp-specialized tiles' order before the L2 sections).
fn prefill_kernel(name: &str) -> Result<(PrefillKernel, usize)> {
    let (kernel, budget) = match name.split_once('/') {
        None => (name, vpod_attention::PREFILL_L2_BUDGET),
        Some((k, "nol2")) => (k, 0),
        Some((_, flag)) => bail!("prefill: unknown kernel flag /{flag} in {name} (known: /nol2)"),
    };
    Ok((prefill_kernel_named(kernel)?, budget))
}

/// A [`PrefillKernel`] by its `--kernels` name.
fn prefill_kernel_named(name: &str) -> Result<PrefillKernel> {
    Ok(match name {
        "w8" => PrefillKernel::W8,
        "w4" => PrefillKernel::W4,
        "w4p" => PrefillKernel::W4p,
        "tma64" => PrefillKernel::Tma64,
        "wsp" => PrefillKernel::Wsp,
        "wsps" => PrefillKernel::WspSlim,
        "wspg" => bail!(
            "prefill: kernel wspg (the GQA-packed wsp) was removed: no faster than wsp on the H200 \
             (results/2026-12-05-h200-podfi-energy)"
        ),
        _ => bail!("prefill: unknown kernel {name} (known: w8, w4, w4p, tma64, wsp, wsps)"),
    })
}

/// `vpod-bench prefill`'s cases: `--cases` name, table label, context
/// before the chunk, chunk tokens.
const PREFILL_CASES: [(&str, &str, usize, usize); 4] = [
    ("16k", "16K causal prompt", 0, 16384),
    ("1k@4k", "1024 chunk at 4K", 4096, 1024),
    ("1k@12k", "1024 chunk at 12K", 12288, 1024),
    ("2k@16k", "2048 chunk at 16K", 16384, 2048),
];

/// `--cases` names of [`PREFILL_CASES`], in the order given.
fn prefill_cases(names: &[String]) -> Result<Vec<(&'static str, &'static str, usize, usize)>> {
    names
        .iter()
        .map(|n| {
            PREFILL_CASES.iter().find(|c| c.0 == n).copied().with_context(|| {
                let known: Vec<_> = PREFILL_CASES.iter().map(|c| c.0).collect();
                format!("prefill: unknown case {n} (known: {})", known.join(", "))
            })
        })
        .collect()
}

fn prefill(
    models: &[String],
    backends: &[String],
    kernels: &[String],
    cases: &[String],
    placements: usize,
    iters: usize,
    ceil: &Ceilings,
) -> Result<Vec<Value>> {
    ensure!(placements >= 1, "prefill: --placements must be at least 1");
    let cases = prefill_cases(cases)?;
    let dev = gpu()?;
    let mut shapes = vec![];
    for m in models {
        let &shape = SHAPES.iter().find(|s| s.0 == m).with_context(|| {
            let known: Vec<_> = SHAPES.iter().map(|s| s.0).collect();
            format!("prefill: unknown model {m} (known: {})", known.join(", "))
        })?;
        shapes.push(shape);
    }
    let mut rows = vec![];
    // Each rep's SM clock and clocks event reasons (is the power cap
    // holding the clock down?): a kernel's spread across reps that follows
    // the clock is the GPU's, not the kernel's.
    let nvml = nvml(&dev)
        .map_err(|e| eprintln!("prefill: no SM clocks per rep ({e:#})"))
        .ok();
    println!(
        "| backend | heads | case | query tile | ms / layer | TFLOP/s | % of {:.0} | kernel ms | kernel TFLOP/s | SM MHz | reps power-capped | kernel Mcycles |\n|---|---|---|---|---|---|---|---|---|---|---|---|",
        ceil.tflops()
    );
    // `vattention`'s prefill kernels (typed, BackendOptions::prefill_kernel);
    // the other backends run their own (one row each).
    let kernels: Vec<(PrefillKernel, usize)> =
        kernels.iter().map(|k| prefill_kernel(k)).collect::<Result<_>>()?;
    let runs = backends.iter().flat_map(|b| {
        let ks = if b == "vattention" {
            &kernels[..]
        } else {
            &[(PrefillKernel::W8, vpod_attention::PREFILL_L2_BUDGET)][..]
        };
        ks.iter().map(move |k| (b.as_str(), *k))
    });
    for ((spec, (asked, l2_budget)), &(model, heads, kvh)) in
        runs.flat_map(|r| shapes.iter().map(move |s| (r, s)))
    {
        for (&(_, name, ctx, ql), p) in cases.iter().flat_map(|c| (0..placements).map(move |p| (c, p))) {
            // Other physical pages for the p-th placement: a spacer held
            // while the backend maps its cache.
            let spacer_mib = 96 * p;
            let _spacer = (p > 0)
                .then(|| Tensor::zeros(spacer_mib << 19, DType::BF16, &dev))
                .transpose()?;
            let opts = BackendOptions {
                prefill_kernel: asked,
                prefill_l2_budget: l2_budget,
                time_kernels: true,
                ..Default::default()
            };
            let mut b = backend_opts(spec, heads, kvh, 1, ctx + ql + 64, &dev, opts)?;
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
            let chunk = SeqChunk {
                seq_id: 0,
                context_len: ctx,
                query_len: ql,
            };
            let secs = time_layer(b.as_mut(), vec![chunk], heads, kvh, &dev, iters)?;
            let clocked = prefill_kernel_samples_clocked(
                b.as_mut(),
                vec![chunk],
                heads,
                kvh,
                &dev,
                iters,
                nvml.as_ref(),
            )?;
            let (samples, clocks) = clocked.map_or((None, vec![]), |(ms, clocks)| (Some(ms), clocks));
            let clock = rep_clock_summary(samples.as_deref(), &clocks);
            // The kernel that ran (a fallback where the device or the pages
            // rule the asked one out), as the step record names it.
            let note = b.step_path();
            let ran = note.as_deref().and_then(ran_prefill);
            let kernel = PrefillKernel::ALL
                .into_iter()
                .find(|k| ran == Some(k.symbol()))
                .unwrap_or(asked);
            let tile = match (spec, l2_budget) {
                ("vattention", 0) if kernel.warp_specialized() => {
                    format!("{} (no L2 sections)", kernel.symbol())
                }
                ("vattention", _) => kernel.symbol().to_string(),
                _ => "128 rows".into(),
            };
            let kernel_ms = samples.as_deref().map(|v| percentile(v, 0.5));
            let kernel_range = samples
                .as_deref()
                .map(|v| (percentile(v, 0.0), percentile(v, 1.0)));
            // Each query row j sees ctx + j + 1 keys: QK^T and PV, 2 FLOPs per MAC.
            let pairs = (ql * ctx + ql * (ql + 1) / 2) as f64;
            let flops = 4.0 * 128.0 * heads as f64 * pairs;
            let tf = flops / secs / 1e12;
            let kernel_tf = kernel_ms.map(|ms| flops / (ms * 1e-3) / 1e12);
            let cell = |x: Option<f64>, digits: usize| x.map_or("-".into(), |x| format!("{x:.digits$}"));
            // With several placements: which one, and the kernel reps' range.
            let (case, range) = match (placements, kernel_range) {
                (1, _) => (name.to_string(), String::new()),
                (_, Some((lo, hi))) => (format!("{name} #{p}"), format!(" ({lo:.3}-{hi:.3})")),
                (_, None) => (format!("{name} #{p}"), String::new()),
            };
            println!(
                "| {spec} | {model} {heads}/{kvh} | {case} | {tile} | {:.3} | {tf:.0} | {:.0} | {}{range} | {} | {} |",
                secs * 1e3,
                tf / ceil.tflops() * 100.0,
                cell(kernel_ms, 3),
                cell(kernel_tf, 0),
                clock.cells(),
            );
            rows.push(
                json!({"backend": spec, "model": model, "case": name, "context": ctx, "query_len": ql, "heads": heads,
                "kv_heads": kvh, "query_tile": kernel.rows(), "tile": tile, "ms_per_layer": secs * 1e3,
                "tflop_per_s": tf, "percent_of_matmul": tf / ceil.tflops() * 100.0,
                "what": "one layer's attention call incl. the K/V write of the chunk, back-to-back calls",
                "kernel_ms": kernel_ms, "kernel_tflop_per_s": kernel_tf,
                "kernel_ms_min": kernel_range.map(|r| r.0), "kernel_ms_max": kernel_range.map(|r| r.1),
                "placement": p, "spacer_mib": spacer_mib, "l2_budget_bytes": l2_budget,
                "rep_kernel_ms": samples, "rep_sm_mhz": clocks.iter().map(|c| c.sm_mhz).collect::<Vec<_>>(),
                "rep_power_capped": clocks.iter().map(|c| c.reasons.map(|r| r.power_capped())).collect::<Vec<_>>(),
                "sm_mhz_median": clock.mhz.map(|m| m.0), "reps_power_capped": clock.capped,
                "kernel_mcycles_median": clock.mcycles.map(|m| m.0),
                "kernel_mcycles_min": clock.mcycles.map(|m| m.1), "kernel_mcycles_max": clock.mcycles.map(|m| m.2),
                "clock_what": "NVML's SM clock and clocks event reasons read right after each timed rep; kernel Mcycles: a rep's ms x its clock (a spread in ms that the cycles lose is the clock's)",
                "kernel_what": "the prefill kernel alone: CUDA events around it, a 2 ms GPU spin before each rep (FlashInfer harness's method), median"}),
            );
        }
    }
    Ok(rows)
}

/// The prefill reps' clocks in brief: the SM clock's median (min, max),
/// the reps NVML saw power-capped, and each rep's kernel time in clock
/// cycles (ms x MHz / 1000: millions) as median (min, max).
#[derive(Debug, Default, PartialEq)]
struct ClockSummary {
    mhz: Option<(f64, f64, f64)>,
    capped: Option<(usize, usize)>,
    mcycles: Option<(f64, f64, f64)>,
}

impl ClockSummary {
    /// The table's three clock cells.
    fn cells(&self) -> String {
        let range = |r: Option<(f64, f64, f64)>, d: usize| {
            r.map_or("-".into(), |(m, lo, hi)| format!("{m:.d$} ({lo:.d$}-{hi:.d$})"))
        };
        let capped = self.capped.map_or("-".into(), |(n, of)| format!("{n} of {of}"));
        format!("{} | {capped} | {}", range(self.mhz, 0), range(self.mcycles, 2))
    }
}

fn rep_clock_summary(ms: Option<&[f64]>, clocks: &[RepClock]) -> ClockSummary {
    let Some(ms) = ms.filter(|ms| !clocks.is_empty() && ms.len() == clocks.len()) else {
        return ClockSummary::default();
    };
    let stats = |v: &[f64]| (percentile(v, 0.5), percentile(v, 0.0), percentile(v, 1.0));
    let mhz: Vec<f64> = clocks.iter().map(|c| c.sm_mhz).collect();
    let mcycles: Vec<f64> = ms.iter().zip(&mhz).map(|(ms, mhz)| ms * mhz / 1e3).collect();
    let read: Vec<bool> = clocks
        .iter()
        .filter_map(|c| c.reasons.map(|r| r.power_capped()))
        .collect();
    ClockSummary {
        mhz: Some(stats(&mhz)),
        capped: (!read.is_empty()).then(|| (read.iter().filter(|&&c| c).count(), read.len())),
        mcycles: Some(stats(&mcycles)),
    }
}

#[cfg(not(feature = "cuda"))]
fn jit(_: &[String]) -> Result<Vec<Value>> {
    bail!("the JIT benchmark needs a CUDA build (--features cuda)")
}

/// Loads each named candle kernel module from its PTX as candle does on the
/// first use of one of its kernels (`CudaDevice::get_or_load_func`: the
/// driver JIT-compiles the whole module), timing each load. A fresh load
/// every time, independent of candle's own module cache.
#[cfg(feature = "cuda")]
fn jit(modules: &[String]) -> Result<Vec<Value>> {
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::kernels as k;
    let Device::Cuda(dev) = gpu()? else {
        bail!("no CUDA device")
    };
    let ctx = dev.cuda_stream().context().clone();
    let all = [
        ("affine", k::AFFINE),
        ("binary", k::BINARY),
        ("cast", k::CAST),
        ("conv", k::CONV),
        ("fill", k::FILL),
        ("indexing", k::INDEXING),
        ("quantized", k::QUANTIZED),
        ("reduce", k::REDUCE),
        ("sort", k::SORT),
        ("ternary", k::TERNARY),
        ("unary", k::UNARY),
    ];
    let cache = std::env::var("CUDA_CACHE_DISABLE").is_ok_and(|v| v == "1");
    println!(
        "driver JIT cache {}\n\n| module | PTX KiB | load s |\n|---|---|---|",
        if cache {
            "disabled (CUDA_CACHE_DISABLE=1)"
        } else {
            "enabled: loads it holds are fast"
        }
    );
    let mut rows = vec![];
    let mut total = 0.0;
    for name in modules {
        let (_, m) = all.iter().find(|(n, _)| n == name).with_context(|| {
            let known: Vec<_> = all.iter().map(|(n, _)| *n).collect();
            format!("jit: unknown candle module {name} (known: {})", known.join(", "))
        })?;
        let t = Instant::now();
        let module = ctx
            .load_module(Ptx::from_src(m.ptx()))
            .with_context(|| format!("loading candle's {name} module"))?;
        let secs = t.elapsed().as_secs_f64();
        drop(module);
        total += secs;
        println!("| {name} | {} | {secs:.2} |", m.ptx().len() >> 10);
        rows.push(json!({"module": name, "ptx_bytes": m.ptx().len(), "load_s": secs}));
    }
    println!("| total | | {total:.2} |");
    rows.push(json!({"total_load_s": total, "jit_cache_disabled": cache}));
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

/// Runs the prompts as one batch (`prefill-first`, `chunk` prompt tokens a
/// step, every request generating `tokens` tokens past any EOS) and returns
/// the times of the decode steps in which the whole batch decoded, with the
/// run's records.
/// The first (request, token) where two runs' generated tokens differ
/// (a missing token counts), or `None` when they are the same.
fn first_differing_token(a: &[Vec<u32>], b: &[Vec<u32>]) -> Option<(usize, usize)> {
    for r in 0..a.len().max(b.len()) {
        let (x, y) = (a.get(r).map_or(&[][..], |v| v), b.get(r).map_or(&[][..], |v| v));
        if let Some(i) = (0..x.len().max(y.len())).find(|&i| x.get(i) != y.get(i)) {
            return Some((r, i));
        }
    }
    None
}

fn decode_run(
    e: &mut vpod_cli::engine::Engine,
    prompts: Vec<Vec<u32>>,
    tokens: usize,
    chunk: usize,
) -> Result<(Vec<f64>, vpod_cli::engine::BatchOutput)> {
    use vpod_cli::engine::Request;
    use vpod_cli::sampler::SamplingParams;
    use vpod_cli::scheduler::{Policy, SchedulerConfig};
    let n = prompts.len();
    let reqs: Vec<Request> = prompts
        .into_iter()
        .map(|prompt| Request {
            prompt,
            max_tokens: tokens,
            sampling: SamplingParams {
                ignore_eos: true,
                ..Default::default()
            },
            arrival_ms: 0.0,
        })
        .collect();
    let sched = SchedulerConfig {
        policy: Policy::PrefillFirst,
        chunk_size: chunk,
        max_seqs: n,
    };
    let out = e.run_batch(&reqs, sched, &mut |_, _| Ok(()))?;
    let ms = out
        .steps
        .iter()
        .filter(|s| s.decodes == n && s.prefill_chunks == 0)
        .map(|s| s.ms)
        .collect();
    Ok((ms, out))
}

fn spikes(steps: usize) -> Result<Vec<Value>> {
    use vpod_cli::engine::Engine;
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
            let prompts = (0..4)
                .map(|i| (0..1000 + 9 * i).map(|t| (t * 7 % 1000) as u32 + 10).collect())
                .collect();
            let (ms, _) = decode_run(&mut e, prompts, steps, 8192)?;
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
            let pts = ms.iter().enumerate().map(|(i, &y)| (i as f64, y)).collect();
            traces.push((format!("{layout}, {mode}"), pts));
        }
    }
    svg_lines(
        &traces,
        "Llama-3-8B synthetic, batch 4: decode step latency (ms) per step",
        "decode step",
        "spikes.svg",
    )?;
    Ok(rows)
}

/// A minimal SVG line chart (no plotting dependency): one polyline per
/// (label, points), x and y axes from 0 to the data's maxima.
fn svg_lines(series: &[(String, Vec<(f64, f64)>)], title: &str, xlabel: &str, name: &str) -> Result<()> {
    let (w, h, pad) = (900.0, 420.0, 50.0);
    let all = || series.iter().flat_map(|t| t.1.iter().copied());
    let xmax = all().map(|p| p.0).fold(1.0, f64::max);
    let ymax = all().map(|p| p.1).fold(0.0, f64::max) * 1.1;
    let colors = ["#d62728", "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b"];
    let mut s = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/><text x='{pad}' y='20'>{title}</text>\
         <line x1='{pad}' y1='{}' x2='{}' y2='{}' stroke='black'/><line x1='{pad}' y1='{pad}' x2='{pad}' y2='{}' stroke='black'/>\
         <text x='5' y='{pad}'>{ymax:.1}</text><text x='5' y='{}'>0</text><text x='{}' y='{}'>{xlabel} (0 .. {xmax})</text>",
        h - pad,
        w - pad,
        h - pad,
        h - pad,
        h - pad,
        w / 2.0 - 60.0,
        h - 15.0
    );
    for (i, (label, pts)) in series.iter().enumerate() {
        let xy: Vec<String> = pts
            .iter()
            .map(|(x, y)| {
                format!(
                    "{:.1},{:.1}",
                    pad + x / xmax * (w - 2.0 * pad),
                    h - pad - y / ymax * (h - 2.0 * pad)
                )
            })
            .collect();
        let c = colors[i % colors.len()];
        s += &format!(
            "<polyline fill='none' stroke='{c}' stroke-width='1.5' points='{}'/>",
            xy.join(" ")
        );
        s += &format!(
            "<text x='{}' y='{}' fill='{c}'>{label}</text>",
            w - 300.0,
            40.0 + 16.0 * i as f64
        );
    }
    s += "</svg>\n";
    std::fs::write(vpod_benches::out_dir().join(name), s)?;
    Ok(())
}

/// A preset's synthetic model sharded over `devices` (one rank each; the
/// whole model for one device): rank 0's model and the other ranks' shards.
type Shards = (
    vpod_models::Preset,
    std::sync::Arc<vpod_models::LoadedModel>,
    Vec<std::sync::Arc<vpod_models::Llama>>,
);

fn synthetic_tp(name: &str, max_len: usize, devices: &[Device]) -> Result<Shards> {
    let mut p = *vpod_models::preset(name).with_context(|| format!("unknown preset {name}"))?;
    p.max_position_embeddings = p.max_position_embeddings.max(max_len);
    let comms: Vec<Option<std::sync::Arc<dyn vpod_models::tp::Communicator>>> = if devices.len() == 1 {
        vec![None]
    } else {
        vpod_cli::rank_comms(devices)?.into_iter().map(Some).collect()
    };
    let mut shards = devices
        .iter()
        .zip(comms)
        .map(|(d, c)| vpod_models::load_synthetic_shard(&p, DType::BF16, d, 0, c, &mut |_, _| {}))
        .collect::<vpod_models::Result<Vec<_>>>()?;
    let rank0 = shards.remove(0);
    let rest = shards.into_iter().map(|m| std::sync::Arc::new(m.model)).collect();
    Ok((p, std::sync::Arc::new(rank0), rest))
}

/// The GEMV kernels measured at load (`linear::tune_gemv`), one entry per
/// shape: the chosen kernel and every candidate's time; printed too.
fn gemv_choices(t: &[vpod_attention::linear::GemvTiming]) -> Value {
    let mut out = vec![];
    for c in t.iter().filter(|c| c.chosen) {
        let all: serde_json::Map<String, Value> = t
            .iter()
            .filter(|o| o.shape == c.shape)
            .map(|o| (format!("{:?}", o.kernel), json!(o.us)))
            .collect();
        let s = c.shape;
        println!(
            "gemv [{}, {}] epilogue {} rows {}: {:?} ({all:?} us)",
            s.n, s.k, s.epilogue, s.rows, c.kernel
        );
        out.push(json!({"n": s.n, "k": s.k, "epilogue": s.epilogue, "rows": s.rows,
            "kernel": format!("{:?}", c.kernel), "us": all}));
    }
    Value::Array(out)
}

/// Bytes of a preset's bf16 weights (embedding, untied LM head, per layer
/// QKV / O / gate-up-down projections and two norms, final norm).
fn weight_bytes(p: &vpod_models::Preset) -> f64 {
    let d = p.hidden / p.heads;
    let layer = p.hidden * (p.hidden + 2 * p.kv_heads * d)
        + p.hidden * p.hidden
        + 3 * p.hidden * p.ffn
        + 2 * p.hidden;
    2.0 * (2 * p.vocab * p.hidden + p.layers * layer + p.hidden) as f64
}

#[cfg(not(feature = "cuda"))]
fn copy_bandwidth(_: &Device) -> Result<f64> {
    bail!("the copy bandwidth needs a CUDA build (--features cuda)")
}

/// Device-to-device copy bandwidth (bytes read + written per second) of a
/// 2 GiB `cuMemcpyDtoD`: the memory ceiling of this GPU for the e2e floors.
/// (candle's copy kernel reaches only ~2.5 TB/s on an H200.)
#[cfg(feature = "cuda")]
fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let Device::Cuda(d) = dev else {
        bail!("not a CUDA device")
    };
    let stream = d.cuda_stream();
    let n = 2usize << 30;
    let src = stream.alloc_zeros::<u8>(n)?;
    let mut dst = stream.alloc_zeros::<u8>(n)?;
    let secs = time(dev, 5, || {
        stream.memcpy_dtod(&src, &mut dst)?;
        Ok(())
    })?;
    Ok(2.0 * n as f64 / secs)
}

/// `e2e`'s untimed warm-up before each timed run: this many prompt tokens
/// per request, and generated tokens.
const E2E_WARMUP: (usize, usize) = (256, 4);

#[allow(clippy::too_many_arguments)]
fn e2e(
    context: usize,
    batches: &[usize],
    models: &[String],
    backends: &[String],
    tokens: usize,
    profile_attention: bool,
    tensor_parallel: usize,
    graphs: &[vpod_cli::engine::CudaGraphs],
    ceil: &Ceilings,
) -> Result<Vec<Value>> {
    use vpod_cli::engine::{CudaGraphs, Engine};
    let dev = gpu()?;
    let tp = tensor_parallel.max(1);
    let devices = vpod_cli::device::rank_devices(&dev, Some("cuda:0"), tp)?;
    let copy = ceil.copy_bytes_per_s;
    let mut rows = vec![json!({"copy_bandwidth_tb_per_s": copy / 1e12})];
    let mut series = vec![];
    println!(
        "| model | backend | graphs | batch | tok/s | ms / step | floor ms | % of floor | host ms / step | replayed | prefill s | warm-up s |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let first_graphs = graphs.first().copied().unwrap_or_default();
    // Greedy tokens of each (model, backend, batch) under the first graphs
    // mode, which the other mode must reproduce (issue 22: graphs change
    // no token, on synthetic full-size models too).
    let mut first_tokens: std::collections::HashMap<(String, String, usize), Vec<Vec<u32>>> =
        Default::default();
    let mut token_checks = vec![];
    for name in models {
        let (p, model, ranks) = synthetic_tp(name, context + tokens + 64, &devices)?;
        let gemv = gemv_choices(model.model.gemv_timings());
        // One rank's share: its slices of the weights, its KV heads (one,
        // replicated, where the model has fewer KV heads than ranks).
        let rank_kv_heads = if p.kv_heads.is_multiple_of(tp) {
            p.kv_heads / tp
        } else {
            1
        };
        let weights = weight_bytes(&p) / tp as f64;
        let kv_per_token = (p.layers * 2 * rank_kv_heads * (p.hidden / p.heads) * 2) as f64;
        for (spec, &cg) in backends.iter().flat_map(|b| graphs.iter().map(move |g| (b, g))) {
            let on = cg == CudaGraphs::On;
            let label = if on { "on" } else { "off" };
            let mut pts = vec![];
            for &bsz in batches {
                // Each sequence's tokens rounded up to whole 2 MiB pages of a K or V
                // region (the virtual cache's unit; the paged cache's blocks are finer),
                // plus the schedulers' 1 % reserve.
                let page_tokens = (2usize << 20) / (rank_kv_heads * (p.hidden / p.heads) * 2);
                let per_seq = (context + tokens + 64).div_ceil(page_tokens) * page_tokens;
                let kv = (bsz as f64 * per_seq as f64 * kv_per_token * 1.02) as usize + (256 << 20);
                // Room for the cache and the prefill's activations (a 16K-token
                // forward pass: ~2.5 GB for an 8B model), else the point is skipped.
                let free = vpod_cli::device::gpu_info(&dev)?.map_or(0, |g| g.free_bytes);
                let activations = (context as f64 * (p.ffn * 6 + p.hidden * 12) as f64 * 1.3) as usize;
                if kv + activations > free {
                    println!(
                        "| {name} | {spec} | {bsz} | skipped: needs {:.1} GB of KV + ~{:.1} GB of activations, {:.1} GB free | | | | | |",
                        kv as f64 / 1e9,
                        activations as f64 / 1e9,
                        free as f64 / 1e9
                    );
                    rows.push(
                        json!({"model": name, "backend": spec, "batch": bsz, "context": context,
                        "skipped": "GPU memory", "kv_bytes": kv, "free_bytes": free}),
                    );
                    continue;
                }
                let opts = BackendOptions {
                    max_seqs: bsz,
                    kv_memory: Some(kv),
                    cuda_graphs: on,
                    ..Default::default()
                };
                let mut e = if ranks.is_empty() {
                    Engine::with_options(model.clone(), spec, &opts)?
                } else {
                    Engine::with_tensor_parallel(model.clone(), ranks.clone(), spec, &opts)?
                };
                let prompts = |len: usize| {
                    (0..bsz)
                        .map(|i| (0..len).map(|t| ((t * 31 + i * 7) % 30000) as u32 + 10).collect())
                        .collect::<Vec<Vec<u32>>>()
                };
                // Warm-up (timed apart, not in the results' prefill or decode):
                // the first forward pass of a process loads candle's kernel
                // modules, which ship as PTX that the driver compiles at load
                // (seconds, once per process unless its JIT cache holds them),
                // and creates the cuBLAS handles; without it that cost landed
                // in the first run's prefill (results/2026-12-03-h200-prefill-baseline).
                // The requests it leaves keep one page group per slot mapped
                // (deferred reclamation): 1 of the 16+ a 16K request maps.
                let t = Instant::now();
                let (_, warm) = decode_run(&mut e, prompts(E2E_WARMUP.0), E2E_WARMUP.1, context)?;
                let warmup_s = t.elapsed().as_secs_f64();
                e.profile_attention = profile_attention;
                let (ms, out) = decode_run(&mut e, prompts(context), tokens, context)?;
                if ms.is_empty() {
                    println!(
                        "| {name} | {spec} | {bsz} | no step decoded all {bsz} requests at once | | | | | |"
                    );
                    rows.push(
                        json!({"model": name, "backend": spec, "batch": bsz, "context": context,
                        "skipped": "no step with the whole batch decoding"}),
                    );
                    continue;
                }
                let prefill_s: f64 = out
                    .steps
                    .iter()
                    .filter(|s| s.prefill_chunks > 0)
                    .map(|s| s.ms)
                    .sum::<f64>()
                    / 1e3;
                // Where each prefill step's time went (StepRecord's split; the
                // attention calls' device time with --profile-attention).
                let r3 = |x: f64| (x * 1e3).round() / 1e3;
                let breakdown = |o: &vpod_cli::engine::BatchOutput| -> Vec<Value> {
                    o.steps
                        .iter()
                        .filter(|s| s.prefill_chunks > 0)
                        .map(|s| {
                            json!([
                                s.prefill_tokens,
                                r3(s.ms),
                                r3(s.queued_ms),
                                r3(s.wait_ms),
                                r3(s.host_ms),
                                r3(s.attention_ms)
                            ])
                        })
                        .collect()
                };
                let step_ms = percentile(&ms, 0.5);
                let floor_ms =
                    (weights + bsz as f64 * (context + tokens / 2) as f64 * kv_per_token) / copy * 1e3;
                let tps = bsz as f64 / step_ms * 1e3;
                // The decode steps' host side: queuing the forward (launches or
                // a replay, and mapping ahead), and how many replayed a graph.
                let decode_steps: Vec<_> = out
                    .steps
                    .iter()
                    .filter(|s| s.decodes == bsz && s.prefill_chunks == 0)
                    .collect();
                let queued: Vec<f64> = decode_steps.iter().map(|s| s.queued_ms).collect();
                let host_ms = percentile(&queued, 0.5);
                let replayed = decode_steps
                    .iter()
                    .filter(|s| s.cuda_graph.as_ref().is_some_and(|g| g.replayed))
                    .count();
                let eager_notes: std::collections::BTreeSet<String> = decode_steps
                    .iter()
                    .filter_map(|s| {
                        s.cuda_graph
                            .as_ref()
                            .filter(|g| !g.replayed)
                            .map(|g| g.note.clone())
                    })
                    .collect();
                let generated: Vec<Vec<u32>> = out.requests.iter().map(|r| r.tokens.clone()).collect();
                let key = (name.clone(), spec.clone(), bsz);
                let tokens_equal = match first_tokens.get(&key) {
                    None => {
                        first_tokens.insert(key, generated);
                        None
                    }
                    Some(first) => {
                        let diff = first_differing_token(first, &generated);
                        token_checks.push(match diff {
                            None => format!(
                                "{name} {spec} batch {bsz}: graphs {label} gives the same greedy tokens"
                            ),
                            Some((r, i)) => format!(
                                "{name} {spec} batch {bsz}: graphs {label} DIFFERS at request {r}, token {i}"
                            ),
                        });
                        Some(diff.is_none())
                    }
                };
                let captures = e.graph_captures();
                // Kernel launches a step: the nodes of its bucket's graph (the
                // eager step launches them one by one; a replay is one launch).
                let nodes = captures.iter().filter(|c| c.rows >= bsz).map(|c| c.nodes).min();
                println!(
                    "| {name} | {spec} | {label} | {bsz} | {tps:.1} | {step_ms:.2} | {floor_ms:.2} | {:.0} | {host_ms:.3} | {replayed}/{} | {prefill_s:.2} | {warmup_s:.2} |",
                    floor_ms / step_ms * 100.0,
                    decode_steps.len()
                );
                rows.push(json!({"model": name, "backend": spec, "batch": bsz, "context": context,
                    "cuda_graphs": on, "decode_host_queued_ms_p50": host_ms,
                    "graph_replayed_steps": replayed, "graph_eager_reasons": eager_notes,
                    "graph_nodes_per_step": nodes, "graph_captures": captures,
                    "tensor_parallel": tp, "pdl": vpod_attention::ops::pdl(), "gemv_kernels": gemv,
                    "gemv_rows": vpod_attention::linear::gemv_rows(),
                    "norm_fusion": format!("{:?}", vpod_attention::linear::norm_fusion()).to_lowercase(),
                    "rope_write_fusion": vpod_attention::rope_write_fusion(),
                    "generated": tokens, "decode_steps": ms.len(), "decode_tokens_per_s": tps,
                    "tokens_equal_to_first_graphs_mode": tokens_equal,
                    "median_step_ms": step_ms, "floor_ms": floor_ms, "percent_of_floor": floor_ms / step_ms * 100.0,
                    "prefill_s": prefill_s, "warmup_s": warmup_s,
                    "warmup": {"prompt": E2E_WARMUP.0, "generated": E2E_WARMUP.1},
                    "profile_attention": profile_attention,
                    "step_columns": ["prefill_tokens", "ms", "queued_ms", "wait_ms", "host_ms", "attention_ms"],
                    "prefill_steps": breakdown(&out), "warmup_prefill_steps": breakdown(&warm)}));
                pts.push((bsz as f64, tps));
            }
            series.push((format!("{name} {spec} graphs {label}"), pts));
        }
    }
    for line in &token_checks {
        println!("{line}");
    }
    // The paper's figure 9a: throughput relative to the first backend.
    if backends.len() > 1 {
        let tps = |m: &str, b: &str, n: usize| {
            rows.iter()
                .find(|r| {
                    r["model"] == m
                        && r["backend"] == b
                        && r["batch"] == n
                        && r["cuda_graphs"] == (first_graphs == CudaGraphs::On)
                })
                .and_then(|r| r["decode_tokens_per_s"].as_f64())
        };
        let base = &backends[0];
        println!(
            "\n| model | batch | {} |\n|---|---|{}",
            backends[1..]
                .iter()
                .map(|o| format!("{base} / {o}"))
                .collect::<Vec<_>>()
                .join(" | "),
            "---|".repeat(backends.len() - 1)
        );
        for m in models {
            for &n in batches {
                let Some(t0) = tps(m, base, n) else { continue };
                let cells: Vec<String> = backends[1..]
                    .iter()
                    .map(|o| tps(m, o, n).map_or("-".into(), |t| format!("{:.2}x", t0 / t)))
                    .collect();
                println!("| {m} | {n} | {} |", cells.join(" | "));
            }
        }
    }
    svg_lines(
        &series,
        &format!("decode throughput (tokens/s) at {context} tokens of context per request"),
        "batch size",
        "e2e.svg",
    )?;
    Ok(rows)
}

/// How each variant of the `hybrid` sweep runs a step: the kernel choices
/// it gives the `pod` backend ([`variant_options`]) before planning one, as
/// nine settings: the POD mode (serial / streams / fused / auto); the block
/// policy (1 resident, 0 the paper's tickets); the serial prefill tile's
/// warps (8: 128-row `w8`; 4: the 64-row tiles, then chosen by the last two
/// settings; empty: the default `wsp`); decode split waves; POD blocks per SM
/// (2 or 3); resident prefill blocks per SM;
/// the 64-row prefill tiles overlap their softmax with the tensor cores (1)
/// or not (0); they load K/V by TMA (1) or not (0); the SM-partitioned kernel
/// (`pod_wsd_bf16`) with this many decode-first SMs ("auto": the rule's;
/// empty: not partitioned). Empty: the default, so
/// `auto` is what the `pod` backend does. `streams` pairs the 64-row TMA
/// prefill with the decode kernel. Every variant but the serial ones gets a
/// speedup over the best serial pair.
const HYBRID_VARIANTS: &[(&str, [&str; 9])] = &[
    ("serial", ["serial", "1", "8", "4", "2", "1", "0", "0", ""]),
    ("serial-64", ["serial", "1", "4", "4", "2", "1", "0", "0", ""]),
    ("serial-64p", ["serial", "1", "4", "4", "2", "1", "1", "0", ""]),
    ("serial-64t", ["serial", "1", "4", "4", "2", "1", "1", "1", ""]),
    // The warp-specialized tile (the default prefill since 2026-12-03), then decode.
    ("serial-ws", ["serial", "1", "", "4", "2", "1", "1", "1", ""]),
    ("streams", ["streams", "1", "4", "4", "2", "1", "1", "1", ""]),
    // The slim warp-specialized prefill (136 registers a thread) and, on
    // two streams, the slim decode blocks that fit on its SMs beside it.
    ("serial-wss", ["serial", "1", "slim", "4", "2", "1", "1", "1", ""]),
    ("streams-ws", ["streams", "1", "", "4", "2", "1", "1", "1", ""]),
    (
        "streams-slim",
        ["streams", "1", "slim", "4", "2", "1", "1", "1", ""],
    ),
    // The same pair with the slim decode's ring a warp (SlimDecode::WarpRing).
    (
        "streams-slimr",
        ["streams/ring", "1", "slim", "4", "2", "1", "1", "1", ""],
    ),
    ("pod", ["fused", "1", "8", "4", "2", "1", "0", "0", ""]),
    ("pod-sw1", ["fused", "1", "8", "1", "2", "1", "0", "0", ""]),
    ("podp", ["fused", "1", "8", "4", "2", "1", "1", "1", ""]),
    ("podp-nt", ["fused", "1", "8", "4", "2", "1", "1", "0", ""]),
    ("podp-sw1", ["fused", "1", "8", "1", "2", "1", "1", "1", ""]),
    ("pod3-p2", ["fused", "1", "8", "4", "3", "2", "0", "1", ""]),
    ("pod3-nt", ["fused", "1", "8", "4", "3", "2", "0", "0", ""]),
    ("pod3-p2-sw1", ["fused", "1", "8", "1", "3", "2", "0", "1", ""]),
    ("pod3-ticket", ["fused", "0", "8", "4", "3", "2", "0", "1", ""]),
    // One prefill and two decode blocks per SM (for decode-heavy steps).
    ("pod3-p1", ["fused", "1", "8", "4", "3", "1", "0", "1", ""]),
    ("pod3-p1-sw2", ["fused", "1", "8", "2", "3", "1", "0", "1", ""]),
    ("pod3-p2-sw2", ["fused", "1", "8", "2", "3", "2", "0", "1", ""]),
    // The SM-partitioned kernel (warp-specialized prefill tile; decode-first
    // SMs by the rule or a fixed count).
    ("wsd", ["fused", "1", "", "4", "", "", "1", "1", "auto"]),
    // No decode-first SMs: the decodes fill the prefill's last wave, then all SMs.
    ("wsd-0", ["fused", "1", "", "4", "", "", "1", "1", "0"]),
    ("wsd-4", ["fused", "1", "", "4", "", "", "1", "1", "4"]),
    ("wsd-8", ["fused", "1", "", "4", "", "", "1", "1", "8"]),
    ("wsd-16", ["fused", "1", "", "4", "", "", "1", "1", "16"]),
    ("wsd-24", ["fused", "1", "", "4", "", "", "1", "1", "24"]),
    ("wsd-48", ["fused", "1", "", "4", "", "", "1", "1", "48"]),
    ("wsd-66", ["fused", "1", "", "4", "", "", "1", "1", "66"]),
    ("wsd-sw2", ["fused", "1", "", "2", "", "", "1", "1", "auto"]),
    // The planner with the partitioned kernel on its fused steps.
    ("auto-wsd", ["auto", "", "", "", "", "", "", "", "auto"]),
    // The planner with its serial and two-stream verdicts run as the slim
    // pair (slot_prefill_wsps_bf16 beside slot_decode_slim_bf16, or
    // slot_decode_slimr_bf16 with /ring) on two streams, the wsp tile on the
    // other steps.
    ("auto-slim", ["auto-slim", "", "", "", "", "", "", "", ""]),
    ("auto-slimr", ["auto-slim/ring", "", "", "", "", "", "", "", ""]),
    // The same with the slim tile (PrefillKernel::WspSlim) on every step:
    // its plain prefills, and its fused steps' partitioned kernel at the
    // slim tile's consumer registers (pod_wsds_bf16). What PodTuning's and
    // BackendOptions' defaults become once the slim pair ships.
    (
        "auto-slimrs",
        ["auto-slim/ring", "", "slim", "", "", "", "", "", ""],
    ),
    // The planner without the slim pair, the wsp tile.
    ("auto-noslim", ["auto-noslim", "", "", "", "", "", "", "", ""]),
    // The planner as it ships: BackendOptions' and PodTuning's defaults.
    ("auto", ["auto", "", "default", "", "", "", "", "", ""]),
    // The warp-specialized tiles in their order before the L2 sections
    // (BackendOptions::prefill_l2_budget 0): the serial pair and the planner
    // as it ships.
    (
        "serial-ws-nol2",
        ["serial/nol2", "1", "", "4", "2", "1", "1", "1", ""],
    ),
    ("auto-nol2", ["auto/nol2", "", "default", "", "", "", "", "", ""]),
];
/// The variants `vpod-bench hybrid` times unless `--variants` names others:
/// the serial pairs, two streams, each POD kernel's best settings and the
/// planner (the rest lost in results/2026-11-21-h100-pod-planner).
const HYBRID_DEFAULT: &[&str] = &[
    "serial",
    "serial-64",
    "serial-64p",
    "serial-64t",
    "serial-ws",
    "serial-wss",
    "pod3-nt",
    "streams",
    "pod",
    "podp",
    "pod3-p2",
    "auto",
];
/// The relative L2 error of a hybrid variant's output against the serial
/// pair's above which `vpod-bench hybrid` reports it as wrong (the GPU
/// tests' bf16 bound against the CPU twins).
const OUTPUT_TOLERANCE: f64 = 1e-2;

/// `|got - want| / |want|` over every element, in f32 on the tensors' device
/// (NaN where either holds NaN or infinity, so a check `e <= tol` fails).
fn rel_l2(got: &Tensor, want: &Tensor) -> Result<f64> {
    let (g, w) = (got.to_dtype(DType::F32)?, want.to_dtype(DType::F32)?);
    let num = (&g - &w)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = w.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((num / den.max(f64::MIN_POSITIVE)).sqrt())
}

/// A variant's settings ([`HYBRID_VARIANTS`]) as the kernel choices of
/// [`AttentionBackend::retune`].
fn variant_options(v: &[&str; 9]) -> Result<BackendOptions> {
    let num = |s: &str, what: &str| -> Result<Option<usize>> {
        if s.is_empty() {
            return Ok(None);
        }
        Ok(Some(s.parse().with_context(|| {
            format!("hybrid variant: {what} '{s}' is not a number")
        })?))
    };
    // MODE/FLAG...: /nol2, the warp-specialized tiles without L2 sections;
    // /ring, the slim pair's decode with a ring a warp (SlimDecode::WarpRing).
    let mut flags = v[0].split('/');
    let mode = flags.next().unwrap_or_default();
    // "auto": the planner as it ships (PodTuning's defaults); the other
    // modes name their slim pair, or none, themselves.
    let shipped = PodTuning::default();
    let mut slim_decode = match mode {
        "auto" => shipped.slim_decode,
        _ => SlimDecode::Tiles,
    };
    let (mut prefill_l2_budget, mut ring) = (vpod_attention::PREFILL_L2_BUDGET, false);
    for flag in flags {
        match flag {
            "nol2" => prefill_l2_budget = 0,
            "ring" => (slim_decode, ring) = (SlimDecode::WarpRing, true),
            f => bail!(
                "hybrid variant: unknown flag /{f} in {} (known: nol2, ring)",
                v[0]
            ),
        }
    }
    let pod_mode = match mode {
        "serial" => PodMode::Serial,
        "streams" => PodMode::Streams,
        "fused" => PodMode::Fused,
        "auto" | "auto-slim" | "auto-noslim" | "" => PodMode::Auto,
        m => bail!("hybrid variant: unknown POD mode {m}"),
    };
    let (pipe, tma) = (v[6] != "0", v[7] != "0");
    // "slim": the warp-specialized tile launched at 136 registers (PrefillKernel::WspSlim).
    // "default":
    // BackendOptions' (the planner as it ships); none: the wsp tile.
    let prefill_kernel = match v[2] {
        "slim" => PrefillKernel::WspSlim,
        "default" => PrefillKernel::default(),
        warps => match num(warps, "prefill warps")? {
            None => PrefillKernel::Wsp,
            Some(8) => PrefillKernel::W8,
            Some(_) if !pipe => PrefillKernel::W4,
            Some(_) if !tma => PrefillKernel::W4p,
            Some(_) => PrefillKernel::Tma64,
        },
    };
    let mut pod_tuning = PodTuning {
        policy: if v[1] == "0" {
            PodPolicy::Ticket
        } else {
            PodPolicy::Resident
        },
        split_waves: num(v[3], "split waves")?,
        blocks_per_sm: num(v[4], "blocks per SM")?,
        resident_prefill: num(v[5], "resident prefill blocks")?,
        pipelined_prefill: pipe,
        tma_prefill: tma,
        slim_decode,
        ..Default::default()
    };
    // "auto-slim": the planner with its prefill-heavy steps as the slim
    // pair on two streams (PodTuning::slim_streams); "auto" as it ships.
    pod_tuning.slim_streams = match mode {
        "auto" => shipped.slim_streams,
        m => m == "auto-slim",
    };
    // /ring picks the slim pair's decode: only where a slim pair runs.
    let slim_pair =
        pod_tuning.slim_streams || (pod_mode == PodMode::Streams && prefill_kernel == PrefillKernel::WspSlim);
    if ring && !slim_pair {
        bail!(
            "hybrid variant: /ring picks the slim pair's decode, and {} runs no slim pair",
            v[0]
        );
    }
    if !v[8].is_empty() {
        pod_tuning.partitioned = true;
        pod_tuning.decode_sms = match v[8] {
            "auto" => None,
            n => num(n, "decode SMs")?,
        };
    }
    Ok(BackendOptions {
        prefill_kernel,
        prefill_l2_budget,
        pod_mode,
        pod_tuning,
        ..Default::default()
    })
}

/// `b` under a hybrid variant's settings (`opts`, [`HYBRID_VARIANTS`]) with
/// the step `meta` planned and layer 0 run once, ready for its layer-1
/// calls to be timed.
fn ready_variant(
    b: &mut dyn AttentionBackend,
    opts: &[&str; 9],
    meta: &BatchMeta,
    [q, k, v]: &[Tensor; 3],
) -> Result<()> {
    b.retune(&variant_options(opts)?)?;
    b.plan_step(meta)?;
    b.forward(0, q, k, v, meta)?;
    Ok(())
}

/// The variants `hybrid --variants` names (none: [`HYBRID_DEFAULT`]), each
/// checked to map to kernel choices; at least one `serial*` one.
fn hybrid_variants(names: &[String]) -> Result<Vec<(&'static str, [&'static str; 9])>> {
    let variants: Vec<(&str, [&str; 9])> = if names.is_empty() {
        HYBRID_VARIANTS
            .iter()
            .filter(|v| HYBRID_DEFAULT.contains(&v.0))
            .copied()
            .collect()
    } else {
        let mut picked = vec![];
        for name in names {
            let v = HYBRID_VARIANTS.iter().find(|v| v.0 == name).with_context(|| {
                let known: Vec<_> = HYBRID_VARIANTS.iter().map(|v| v.0).collect();
                format!("unknown variant {name} (known: {})", known.join(", "))
            })?;
            ensure!(!picked.contains(v), "variant {name} given twice");
            picked.push(*v);
        }
        picked
    };
    ensure!(
        variants.iter().any(|v| v.0.starts_with("serial")),
        "--variants needs a serial one (the baseline)"
    );
    for (name, v) in &variants {
        variant_options(v).with_context(|| format!("variant {name}"))?;
    }
    Ok(variants)
}

#[allow(clippy::too_many_arguments)]
fn hybrid(
    models: &[String],
    chunks: &[usize],
    positions: &[usize],
    contexts: &[usize],
    memory_gb: f64,
    decodes: &[usize],
    variants: &[String],
    iters: usize,
    fi_json: Option<&std::path::Path>,
    energy_ms: u64,
) -> Result<Vec<Value>> {
    // FlashInfer's POD section, read first: a bad file fails before the sweep.
    let fi: Option<Vec<Value>> = match fi_json {
        None => None,
        Some(path) => {
            let text =
                std::fs::read_to_string(path).with_context(|| format!("--fi-json {}", path.display()))?;
            let v: Value = serde_json::from_str(&text)
                .with_context(|| format!("--fi-json {}: not JSON", path.display()))?;
            let pod = v["pod"].as_array().with_context(|| {
                format!(
                    "--fi-json {}: no \"pod\" list (the harness's POD section)",
                    path.display()
                )
            })?;
            Some(pod.clone())
        }
    };
    let variants = &hybrid_variants(variants)?[..];
    let mut rng = StdRng::seed_from_u64(7);
    let dev = gpu()?;
    // Where the energy counter cannot be read the sweep still runs (its
    // times are the point of a scarce GPU call), without the sustained part.
    let mut power = match energy_ms {
        0 => None,
        ms => match Power::measure(&dev, ms) {
            Ok(p) => Some(p),
            Err(e) => {
                println!("--energy-ms: not measured, the sweep runs without it: {e:#}\n");
                None
            }
        },
    };
    // Outputs against the first serial variant's: the largest error, and
    // the variant steps past OUTPUT_TOLERANCE.
    let (mut rows, mut mismatches, mut max_err) = (vec![], vec![], 0.0f64);
    print!("| model | chunk @ pos | decodes x ctx | smaller half |");
    for v in variants {
        print!(" {} us |", v.0);
    }
    let fast: Vec<&str> = variants
        .iter()
        .map(|v| v.0)
        .filter(|v| !v.starts_with("serial"))
        .collect();
    for v in &fast {
        print!(" {v} / best serial |");
    }
    println!(" prefill alone us | prefill kernel us | decode alone us | perfect overlap x | planner |");
    println!("|{}", "---|".repeat(4 + variants.len() + fast.len() + 5));
    let max_pos = positions.iter().max().copied().unwrap_or(0) + chunks.iter().max().copied().unwrap_or(0);
    for name in models {
        let p = *vpod_models::preset(name).with_context(|| format!("unknown preset {name}"))?;
        let (heads, kvh) = (p.heads, p.kv_heads);
        // The decode batch of a full model on `memory_gb`: 90 % for weights + KV.
        let kv_per_token = (p.layers * 2 * kvh * 128 * 2) as f64;
        let kv_tokens = ((memory_gb * 0.9e9 - weight_bytes(&p)) / kv_per_token).max(0.0);
        let cells: Vec<(usize, usize)> = contexts
            .iter()
            .flat_map(|&ctx| {
                let fill = ((kv_tokens / ctx as f64) as usize).clamp(1, 256);
                let batches = if decodes.is_empty() {
                    vec![fill]
                } else {
                    decodes.to_vec()
                };
                batches.into_iter().map(move |b| (ctx, b))
            })
            .collect();
        for (ctx, batch) in cells {
            let max_len = ctx.max(max_pos) + 64;
            let mut b = backend("pod", heads, kvh, batch + positions.len(), max_len, &dev)?;
            // The decodes' context, 8 prompts a step.
            for group in (0..batch as u64).collect::<Vec<_>>().chunks(8) {
                let prompts = group
                    .iter()
                    .map(|&s| SeqChunk {
                        seq_id: s,
                        context_len: 0,
                        query_len: ctx,
                    })
                    .collect();
                step(b.as_mut(), prompts, heads, kvh, &dev)?;
            }
            // One prompt per chunk position, filled up to it.
            for (i, &pos) in positions.iter().enumerate() {
                let mut done = 0;
                while done < pos {
                    let n = (pos - done).min(4096);
                    let c = SeqChunk {
                        seq_id: 10_000 + i as u64,
                        context_len: done,
                        query_len: n,
                    };
                    step(b.as_mut(), vec![c], heads, kvh, &dev)?;
                    done += n;
                }
            }
            for &chunk in chunks {
                for (i, &pos) in positions.iter().enumerate() {
                    let mut seqs = vec![SeqChunk {
                        seq_id: 10_000 + i as u64,
                        context_len: pos,
                        query_len: chunk,
                    }];
                    seqs.extend((0..batch as u64).map(|s| SeqChunk {
                        seq_id: s,
                        context_len: ctx,
                        query_len: 1,
                    }));
                    let meta = BatchMeta::new(seqs.clone(), LogitsAt::LastToken, &Device::Cpu)?;
                    let cfg = AttnConfig {
                        num_layers: 2,
                        num_heads: heads,
                        num_kv_heads: kvh,
                        head_dim: 128,
                        max_seq_len: max_len,
                        dtype: DType::BF16,
                    };
                    let (path, note) = vpod_attention::plan_pod_step(&meta, &cfg);
                    let fused = matches!(path, vpod_attention::PodPath::Fused(_));
                    // Rounds of every variant, each round in a fresh random order,
                    // the median round per variant: the GPU's clocks drift under a
                    // long run (its power cap), and a fixed order favoured some
                    // variants by up to 8 % (results/2026-11-21-h100-pod-planner).
                    let (qkv_meta, qkv) = inputs(seqs.clone(), heads, kvh, &dev)?;
                    let [q, k, v] = &qkv;
                    let mut rounds = vec![Vec::with_capacity(5); variants.len()];
                    // Each variant's output of the warm-up round: this sweep
                    // times kernels, and a wrong one must not pass as a fast one.
                    let mut outputs: Vec<Option<Tensor>> = vec![None; variants.len()];
                    let mut order: Vec<usize> = (0..variants.len()).collect();
                    for round in 0..6 {
                        order.shuffle(&mut rng);
                        for &i in &order {
                            // Plan the step under this variant's settings.
                            ready_variant(b.as_mut(), &variants[i].1, &qkv_meta, &qkv)?;
                            let out = b.forward(1, q, k, v, &qkv_meta)?;
                            if round == 0 {
                                outputs[i] = Some(out);
                            }
                            dev.synchronize()?;
                            let t = Instant::now();
                            for _ in 0..iters.max(1) {
                                b.forward(1, q, k, v, &qkv_meta)?;
                            }
                            dev.synchronize()?;
                            // Round 0 warms up.
                            if round > 0 {
                                rounds[i].push(t.elapsed().as_secs_f64() / iters.max(1) as f64);
                            }
                        }
                    }
                    // The planner's step alone, as FlashInfer's harness times
                    // (only with --fi-json: it costs a spin per rep): the
                    // default planner (`auto`, whether or not the sweep times
                    // it) and the sweep's other planner variants (`auto-*`:
                    // the planner under other tunings), so that each one meets
                    // FlashInfer the same way.
                    let mut planner_variants_gpu_us = serde_json::Map::new();
                    if fi.is_some() {
                        let auto = HYBRID_VARIANTS.iter().filter(|v| v.0 == "auto");
                        for (name, opts) in auto.chain(variants.iter().filter(|v| v.0.starts_with("auto-"))) {
                            ready_variant(b.as_mut(), opts, &qkv_meta, &qkv)?;
                            let us = gpu_alone_us(&dev, iters, || {
                                b.forward(1, q, k, v, &qkv_meta)?;
                                Ok(())
                            })?;
                            planner_variants_gpu_us.insert((*name).into(), json!(us));
                        }
                    }
                    let planner_gpu_us = planner_variants_gpu_us.remove("auto");
                    // Every variant's output against the first serial one's.
                    let reference = variants.iter().position(|v| v.0.starts_with("serial"));
                    let mut rel_err = serde_json::Map::new();
                    if let Some((r, Some(want))) = reference.map(|r| (r, &outputs[r])) {
                        for ((v, _), got) in variants.iter().zip(&outputs) {
                            if let Some(got) = got {
                                let e = rel_l2(got, want)?;
                                max_err = max_err.max(e);
                                if e.is_nan() || e > OUTPUT_TOLERANCE {
                                    mismatches.push(format!(
                                        "{name} {chunk} @ {pos}, {batch} x {ctx}: {v} rel. L2 error {e:.2e} against {}",
                                        variants[r].0
                                    ));
                                }
                                rel_err.insert((*v).into(), json!(e));
                            }
                        }
                    }
                    drop(outputs);
                    let mut us = serde_json::Map::new();
                    for ((v, _), mut r) in variants.iter().zip(rounds) {
                        r.sort_by(f64::total_cmp);
                        us.insert((*v).into(), json!(r[r.len() / 2] * 1e6));
                    }
                    // Each half alone (the plain kernels; the prefill's faster
                    // tile, among them the other warp-specialized tiles where
                    // this run has their serial pairs, as best_serial below):
                    // perfect overlap would take the longer of the two.
                    let (pre, dec) = seqs.split_at(1);
                    let (mut prefill_us, mut decode_us) = (f64::INFINITY, f64::INFINITY);
                    let other_ws = ["serial-wss"]
                        .into_iter()
                        .filter(|n| variants.iter().any(|(v, _)| *v == *n));
                    for serial in ["serial", "serial-64p", "serial-64t", "serial-ws"]
                        .into_iter()
                        .chain(other_ws)
                    {
                        if let Some(v) = HYBRID_VARIANTS.iter().find(|v| v.0 == serial) {
                            b.retune(&variant_options(&v.1)?)?;
                        }
                        let secs = time_layer(b.as_mut(), pre.to_vec(), heads, kvh, &dev, iters)?;
                        prefill_us = prefill_us.min(1e6 * secs);
                        if serial == "serial" {
                            decode_us = 1e6 * time_layer(b.as_mut(), dec.to_vec(), heads, kvh, &dev, iters)?;
                        }
                    }
                    // The default prefill kernel alone, GPU time as FlashInfer's
                    // harness times its FA3 (a spin before each rep): kernel to
                    // kernel, where the layer call above adds the K/V write.
                    let prefill_kernel_us = {
                        let ws = HYBRID_VARIANTS.iter().find(|v| v.0 == "serial-ws");
                        let mut o = variant_options(&ws.context("no serial-ws variant")?.1)?;
                        o.time_kernels = true;
                        b.retune(&o)?;
                        let ms = prefill_kernel_samples(b.as_mut(), pre.to_vec(), heads, kvh, &dev, iters)?
                            .map(|v| percentile(&v, 0.5));
                        o.time_kernels = false;
                        b.retune(&o)?;
                        ms.map(|ms| ms * 1e3)
                    };
                    // A failure here (NVML, mostly) ends the sustained part
                    // for the rest of the sweep, not the sweep: its times stand.
                    let sustained = power.as_ref().map(|pw| {
                        (|| -> Result<Value> {
                            let mut runs = vec![];
                            for (name, opts) in variants {
                                ready_variant(b.as_mut(), opts, &qkv_meta, &qkv)?;
                                let run = pw.sustained(&dev, || {
                                    b.forward(1, q, k, v, &qkv_meta)?;
                                    Ok(())
                                })?;
                                runs.push((*name, run));
                            }
                            // Each half alone with the default kernels (serial-ws).
                            let ws = HYBRID_VARIANTS.iter().find(|v| v.0 == "serial-ws");
                            b.retune(&variant_options(&ws.context("no serial-ws variant")?.1)?)?;
                            let mut halves = vec![];
                            for half in [pre, dec] {
                                let (m, [hq, hk, hv]) = inputs(half.to_vec(), heads, kvh, &dev)?;
                                b.forward(0, &hq, &hk, &hv, &m)?;
                                halves.push(pw.sustained(&dev, || {
                                    b.forward(1, &hq, &hk, &hv, &m)?;
                                    Ok(())
                                })?);
                            }
                            Ok(pw.case_json(&runs, halves[0], halves[1]))
                        })()
                    });
                    let sustained = match sustained {
                        Some(Err(e)) => {
                            println!(
                                "--energy-ms: the sustained runs failed, the sweep goes on without them: {e:#}"
                            );
                            power = None;
                            None
                        }
                        Some(Ok(v)) => Some(v),
                        None => None,
                    };
                    let t = |v: &str| us.get(v).and_then(Value::as_f64).unwrap_or(f64::NAN);
                    // Every serial pair this run times.
                    let best_serial = variants
                        .iter()
                        .filter(|v| v.0.starts_with("serial"))
                        .map(|v| t(v.0))
                        .fold(f64::INFINITY, f64::min);
                    let ideal = best_serial / prefill_us.max(decode_us);
                    let share = note_share(&meta, &cfg);
                    print!(
                        "| {name} | {chunk} @ {pos} | {batch} x {ctx} | {:.0} % |",
                        share * 100.0
                    );
                    for v in variants {
                        print!(" {:.0} |", t(v.0));
                    }
                    let mut speedup = serde_json::Map::new();
                    for v in &fast {
                        print!(" {:.2} |", best_serial / t(v));
                        speedup.insert((*v).into(), json!(best_serial / t(v)));
                    }
                    println!(
                        " {prefill_us:.0} | {} | {decode_us:.0} | {ideal:.2} | {} |",
                        prefill_kernel_us.map_or("-".into(), |u| format!("{u:.0}")),
                        match path {
                            vpod_attention::PodPath::Fused(vpod_attention::PodKernel::OneToOne) =>
                                "fused 1:1",
                            vpod_attention::PodPath::Fused(vpod_attention::PodKernel::TwoToOne) =>
                                "fused 2:1",
                            vpod_attention::PodPath::Fused(vpod_attention::PodKernel::Partitioned) =>
                                "fused partitioned",
                            vpod_attention::PodPath::Streams => "streams",
                            vpod_attention::PodPath::Serial => "serial",
                        }
                    );
                    rows.push(json!({"model": name, "heads": heads, "kv_heads": kvh, "chunk": chunk,
                        "position": pos, "decodes": batch, "decode_context": ctx, "us_per_layer": us,
                        "prefill_alone_us": prefill_us, "prefill_kernel_us": prefill_kernel_us,
                        "decode_alone_us": decode_us,
                        "perfect_overlap_speedup": ideal,
                        "best_serial_us": best_serial, "speedup_over_best_serial": speedup,
                        "planner": note, "planner_fused": fused, "smaller_half_share": share,
                        "planner_gpu_us": planner_gpu_us, "sustained": sustained,
                        "planner_variants_gpu_us": (!planner_variants_gpu_us.is_empty()).then_some(planner_variants_gpu_us),
                        "rel_l2_error_vs_serial": rel_err,
                        "what": "one layer's attention call (K/V write + attention kernels), median of 5 rounds, the variants timed in turn within a round"}));
                }
            }
        }
    }
    // The summary the issue's targets are stated in.
    let speed = |key: &str| -> Vec<f64> {
        rows.iter()
            .filter_map(|r| r["speedup_over_best_serial"][key].as_f64())
            .collect()
    };
    let mut summary = serde_json::Map::new();
    for key in fast {
        let v = speed(key);
        if v.is_empty() {
            continue;
        }
        let mean = v.iter().sum::<f64>() / v.len() as f64;
        let geo = (v.iter().map(|x| x.ln()).sum::<f64>() / v.len() as f64).exp();
        let max = v.iter().copied().fold(f64::MIN, f64::max);
        let min = v.iter().copied().fold(f64::MAX, f64::min);
        let slower = v.iter().filter(|&&x| x < 1.0 / 1.03).count();
        println!(
            "{key}: mean {mean:.3}x (geomean {geo:.3}x), max {max:.2}x, min {min:.2}x, {slower} of {} cases > 3 % slower than the best serial pair",
            v.len()
        );
        summary.insert(
            key.into(),
            json!({"mean": mean, "geomean": geo, "max": max, "min": min, "cases": v.len(), "slower_than_3pct": slower}),
        );
    }
    let ideal: Vec<f64> = rows
        .iter()
        .filter_map(|r| r["perfect_overlap_speedup"].as_f64())
        .collect();
    if !ideal.is_empty() {
        let mean = ideal.iter().sum::<f64>() / ideal.len() as f64;
        println!("perfect overlap (best serial / the longer half alone): mean {mean:.3}x");
        summary.insert(
            "perfect_overlap".into(),
            json!({"mean": mean, "cases": ideal.len()}),
        );
    }
    if let Some(pw) = &power {
        summary.insert("sustained".into(), pw.summary(&rows));
    }
    match mismatches.is_empty() {
        true => println!(
            "outputs: every variant agrees with the first serial one (max rel. L2 error {max_err:.2e}, tolerance {OUTPUT_TOLERANCE:.0e})"
        ),
        false => {
            println!(
                "OUTPUT MISMATCH: {} variant steps differ from the first serial one by more than {OUTPUT_TOLERANCE:.0e} (rel. L2): their times are not valid:",
                mismatches.len()
            );
            for m in &mismatches {
                println!("  {m}");
            }
        }
    }
    summary.insert(
        "outputs_vs_serial".into(),
        json!({"max_rel_l2_error": max_err, "tolerance": OUTPUT_TOLERANCE, "mismatches": mismatches}),
    );
    if let Some(fi) = &fi {
        let comparisons = [
            (
                vs_flashinfer(&mut rows, fi),
                "vs_flashinfer_best_serial",
                "planner vs FlashInfer's best serial pair (both timed alone)",
                "FlashInfer serial_best_ms (fastest prefill then fastest decode, GPU time) / the planner's step timed the same way",
            ),
            (
                prefill_vs_fa3(&mut rows, fi),
                "prefill_kernel_vs_fa3",
                "our prefill kernel vs FlashInfer's FA3 on the same chunk (GPU times)",
                "FlashInfer pre_fa3_ms / our default prefill kernel's GPU time on the same chunk",
            ),
        ];
        for (ratios, key, label, what) in comparisons {
            if ratios.is_empty() {
                println!("{label}: no case of this sweep is in --fi-json");
                continue;
            }
            let mut s = ratio_summary(label, &ratios);
            s["what"] = json!(what);
            summary.insert(key.into(), s);
        }
        let mut s = serde_json::Map::new();
        for (name, ratios) in vs_flashinfer_by_variant(&mut rows, fi) {
            let label = format!("planner {name} vs FlashInfer's best serial pair (both timed alone)");
            s.insert(name, ratio_summary(&label, &ratios));
        }
        if !s.is_empty() {
            summary.insert("vs_flashinfer_best_serial_by_variant".into(), Value::Object(s));
        }
    }
    rows.push(json!({"summary": summary}));
    Ok(rows)
}

/// Median, min and max of `ratios` (not empty), printed after `label`, and
/// as a summary entry with the case count.
fn ratio_summary(label: &str, ratios: &[f64]) -> Value {
    let (median, min, max) = (
        percentile(ratios, 0.5),
        ratios.iter().copied().fold(f64::MAX, f64::min),
        ratios.iter().copied().fold(f64::MIN, f64::max),
    );
    println!(
        "{label}: median {median:.3}x, min {min:.2}x, max {max:.2}x over {} cases",
        ratios.len()
    );
    json!({"median": median, "min": min, "max": max, "cases": ratios.len()})
}

/// `hybrid --energy-ms`: sustained runs read against the GPU's energy
/// counter (NVML), with the power limit and the idle draw read at the start.
#[derive(Debug)]
struct Power {
    nvml: Nvml,
    /// Length of each sustained run (after half as long to settle).
    ms: u64,
    cap_w: f64,
    idle_w: f64,
}

/// What one sustained run saw: time and energy per step, the SM clock's median.
#[derive(Debug, Clone, Copy)]
struct SustainedRun {
    per_step: Sustained,
    sm_mhz: f64,
}

impl SustainedRun {
    fn json(&self) -> Value {
        json!({"us": self.per_step.secs * 1e6, "watts": self.per_step.watts(),
            "mj_per_step": self.per_step.joules * 1e3, "sm_mhz": self.sm_mhz})
    }
}

impl Power {
    fn measure(dev: &Device, ms: u64) -> Result<Self> {
        let nvml = nvml(dev)?;
        let cap_w = nvml.power_limit_w()?;
        // The idle draw: this context open, nothing queued, over a second
        // (after the ceilings' load has had 0.3 s to wind down).
        dev.synchronize()?;
        std::thread::sleep(std::time::Duration::from_millis(300));
        let mut p = Self {
            nvml,
            ms,
            cap_w,
            idle_w: 0.0,
        };
        let mut idle = || Ok(());
        let (e0, t0) = p.energy_edge(&mut idle, 1.0)?;
        std::thread::sleep(std::time::Duration::from_secs(1));
        let (e1, t1) = p.energy_edge(&mut idle, 1.0)?;
        ensure!(
            e1 > e0,
            "NVML's energy counter did not move in {:.1} s",
            (t1 - t0).as_secs_f64()
        );
        let idle_w = (e1 - e0) / (t1 - t0).as_secs_f64().max(1e-6);
        p.idle_w = idle_w;
        let nvml = &p.nvml;
        ensure!(
            idle_w < cap_w,
            "NVML's energy counter gave {idle_w:.0} W at idle, above the {cap_w:.0} W limit"
        );
        // Shown only: a GPU without these readings still has the counter.
        let now = |r: Result<f64>, unit: &str| {
            r.map_or_else(|e| format!("? {unit} ({e})"), |v| format!("{v:.0} {unit}"))
        };
        println!(
            "power: limit {cap_w:.0} W, idle {idle_w:.0} W, now {} at {} (NVML); sustained runs of {ms} ms\n",
            now(nvml.power_w(), "W"),
            now(nvml.sm_mhz(), "MHz")
        );
        Ok(p)
    }

    /// `f` back to back for `ms` after `ms / 2` to settle the clocks, in
    /// batches of ~5 ms with one synchronisation each (the SM clock read
    /// while a batch runs): time per step over the run, and power between
    /// two updates of the energy counter inside it ([`Self::energy_edge`]).
    fn sustained(&self, dev: &Device, mut f: impl FnMut() -> Result<()>) -> Result<SustainedRun> {
        let (secs, settle) = (self.ms as f64 * 1e-3, Instant::now());
        let mut calls = 0usize;
        while calls < 4 || settle.elapsed().as_secs_f64() < secs / 2.0 {
            for _ in 0..4 {
                f()?;
            }
            dev.synchronize()?;
            calls += 4;
        }
        let per_call = settle.elapsed().as_secs_f64() / calls as f64;
        let batch = ((5e-3 / per_call) as usize).clamp(4, 1000);
        let batch_secs = batch as f64 * per_call;
        let (t0, mut n, mut mhz) = (Instant::now(), 0usize, vec![]);
        let mut feed = || -> Result<usize> {
            for _ in 0..batch {
                f()?;
            }
            Ok(batch)
        };
        // The energy window runs from one update of the counter to another
        // (the GPU busy throughout), not over the counter's coarse steps.
        n += feed()?;
        let (e0, te0) = self.energy_edge(&mut || feed().map(|k| n += k), batch_secs)?;
        while t0.elapsed().as_secs_f64() < secs {
            mhz.push(self.nvml.sm_mhz()?);
            dev.synchronize()?;
            n += feed()?;
        }
        let (e1, te1) = self.energy_edge(&mut || feed().map(|k| n += k), batch_secs)?;
        mhz.push(self.nvml.sm_mhz()?);
        dev.synchronize()?;
        let step = t0.elapsed().as_secs_f64() / n as f64;
        let watts = (e1 - e0) / (te1 - te0).as_secs_f64().max(1e-6);
        Ok(SustainedRun {
            per_step: Sustained {
                secs: step,
                joules: watts * step,
            },
            sm_mhz: percentile(&mhz, 0.5),
        })
    }

    /// The energy counter at its next update, and when that was seen
    /// (polled every 50 us; `feed` queues more work every `feed_every`
    /// seconds meanwhile, so that the GPU stays busy): the counter moves in
    /// steps of several ms, so a window between two of its updates
    /// measures power far better than one between two arbitrary reads. A
    /// counter that does not move in 0.5 s is read as it is.
    fn energy_edge(&self, feed: &mut dyn FnMut() -> Result<()>, feed_every: f64) -> Result<(f64, Instant)> {
        counter_edge(&mut || self.nvml.energy_j(), feed, feed_every, 0.5)
    }

    fn case_json(&self, runs: &[(&str, SustainedRun)], prefill: SustainedRun, decode: SustainedRun) -> Value {
        sustained_case(runs, prefill, decode, self.cap_w, self.idle_w)
    }

    fn summary(&self, rows: &[Value]) -> Value {
        sustained_summary(rows, self.ms, self.cap_w, self.idle_w)
    }
}

/// [`Power::energy_edge`] over any counter `read`: its value at its next
/// change (or after `timeout` seconds) and when that was seen, calling
/// `feed` every `feed_every` seconds meanwhile.
fn counter_edge(
    read: &mut dyn FnMut() -> Result<f64>,
    feed: &mut dyn FnMut() -> Result<()>,
    feed_every: f64,
    timeout: f64,
) -> Result<(f64, Instant)> {
    let (e, start) = (read()?, Instant::now());
    let mut fed = Instant::now();
    loop {
        let now = read()?;
        if now != e || start.elapsed().as_secs_f64() > timeout {
            return Ok((now, Instant::now()));
        }
        if fed.elapsed().as_secs_f64() > 0.8 * feed_every {
            feed()?;
            fed = Instant::now();
        }
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

/// One case's sustained record: each variant, each half alone, and the
/// ceilings of a perfect overlap (the longer half) and of one under the
/// power cap ([`energy::cap_bound_s`]), as speedups over the best
/// serial variant's sustained time.
fn sustained_case(
    runs: &[(&str, SustainedRun)],
    prefill: SustainedRun,
    decode: SustainedRun,
    cap_w: f64,
    idle_w: f64,
) -> Value {
    let best_serial = runs
        .iter()
        .filter(|(n, _)| n.starts_with("serial"))
        .map(|(_, r)| r.per_step.secs)
        .fold(f64::INFINITY, f64::min);
    let bound = energy::cap_bound_s(prefill.per_step, decode.per_step, cap_w, idle_w);
    let speedup: serde_json::Map<String, Value> = runs
        .iter()
        .filter(|(n, _)| !n.starts_with("serial"))
        .map(|(n, r)| ((*n).to_string(), json!(best_serial / r.per_step.secs)))
        .collect();
    let variants: serde_json::Map<String, Value> =
        runs.iter().map(|(n, r)| ((*n).to_string(), r.json())).collect();
    json!({"variants": variants, "prefill_alone": prefill.json(), "decode_alone": decode.json(),
        "best_serial_us": best_serial * 1e6, "speedup_over_best_serial": speedup,
        "perfect_overlap_speedup": best_serial / prefill.per_step.secs.max(decode.per_step.secs),
        "power_cap_bound_us": bound * 1e6, "power_cap_speedup": best_serial / bound})
}

/// The sustained table (printed) and the summary row's `sustained`, over
/// the rows that have a sustained record (runs of `ms`).
fn sustained_summary(rows: &[Value], ms: u64, cap_w: f64, idle_w: f64) -> Value {
    let cases: Vec<&Value> = rows.iter().filter(|r| r["sustained"].is_object()).collect();
    let Some(first) = cases.first() else {
        return Value::Null;
    };
    let names: Vec<String> = first["sustained"]["variants"]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default();
    let fast: Vec<&String> = names.iter().filter(|n| !n.starts_with("serial")).collect();
    println!(
        "\nSustained ({} ms a run; limit {:.0} W, idle {:.0} W): us per step (W)",
        ms, cap_w, idle_w
    );
    print!("| model | chunk @ pos | decodes x ctx |");
    for n in &names {
        print!(" {n} |");
    }
    for n in &fast {
        print!(" {n} / best serial |");
    }
    println!(" prefill alone | decode alone | perfect overlap x | power-cap bound x |");
    println!("|{}", "---|".repeat(3 + names.len() + fast.len() + 4));
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let run = |v: &Value| format!("{:.0} ({:.0} W)", f(&v["us"]), f(&v["watts"]));
    for r in &cases {
        let s = &r["sustained"];
        print!(
            "| {} | {} @ {} | {} x {} |",
            r["model"].as_str().unwrap_or("?"),
            r["chunk"],
            r["position"],
            r["decodes"],
            r["decode_context"]
        );
        for n in &names {
            print!(" {} |", run(&s["variants"][n.as_str()]));
        }
        for n in &fast {
            print!(" {:.3} |", f(&s["speedup_over_best_serial"][n.as_str()]));
        }
        println!(
            " {} | {} | {:.2} | {:.2} |",
            run(&s["prefill_alone"]),
            run(&s["decode_alone"]),
            f(&s["perfect_overlap_speedup"]),
            f(&s["power_cap_speedup"])
        );
    }
    let stats = |key: &dyn Fn(&Value) -> Option<f64>| -> Value {
        let v: Vec<f64> = cases.iter().filter_map(|r| key(&r["sustained"])).collect();
        if v.is_empty() {
            return Value::Null;
        }
        json!({"mean": v.iter().sum::<f64>() / v.len() as f64, "median": percentile(&v, 0.5),
            "min": percentile(&v, 0.0), "max": percentile(&v, 1.0), "cases": v.len()})
    };
    let mut out = serde_json::Map::new();
    for n in &fast {
        let st = stats(&|s: &Value| s["speedup_over_best_serial"][n.as_str()].as_f64());
        println!("sustained {n} / best serial: {st}");
        out.insert((*n).clone(), st);
    }
    for key in ["perfect_overlap_speedup", "power_cap_speedup"] {
        let st = stats(&|s: &Value| s[key].as_f64());
        println!("sustained {key}: {st}");
        out.insert(key.into(), st);
    }
    out.insert("run_ms".into(), json!(ms));
    out.insert("power_limit_w".into(), json!(cap_w));
    out.insert("idle_w".into(), json!(idle_w));
    out.insert(
        "what".into(),
        json!("each variant and each half (serial-ws kernels) run back to back after a settling run of half the length; time per step over the run, power between two updates of NVML's energy counter inside it; speedups over the best serial variant's sustained time; power_cap_speedup: best serial / the power-cap bound of a perfect overlap (vpod_benches::energy::cap_bound_s: the longer half, or both halves' energy above idle at the limit's headroom above idle; a first-order model that takes each half's energy as fixed, so an overlap that saves energy beats it, as on the H200)"),
    );
    Value::Object(out)
}

/// This CUDA device's NVML handle (matched by its PCI address).
#[cfg(feature = "cuda")]
fn nvml(dev: &Device) -> Result<Nvml> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    let Device::Cuda(d) = dev else {
        bail!("not a CUDA device")
    };
    let ctx = d.cuda_stream().context().clone();
    let id = energy::pci_bus_id(
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID)?,
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_BUS_ID)?,
        ctx.attribute(A::CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID)?,
    );
    Nvml::open(&id)
}

#[cfg(not(feature = "cuda"))]
fn nvml(_: &Device) -> Result<Nvml> {
    bail!("energy readings need a CUDA build (--features cuda)")
}

/// Each sweep row's planner time against FlashInfer's best serial pair
/// for the same case ([`fi_case`]), written into the row as
/// `vs_flashinfer_best_serial` (and FlashInfer's time as
/// `flashinfer_best_serial_us`); the ratios, > 1 where ours is faster.
fn vs_flashinfer(rows: &mut [Value], fi: &[Value]) -> Vec<f64> {
    fi_ratios(
        rows,
        fi,
        |r| r["planner_gpu_us"].as_f64(),
        "serial_best_ms",
        |r, x, theirs_us| {
            r["vs_flashinfer_best_serial"] = json!(x);
            r["flashinfer_best_serial_us"] = json!(theirs_us);
        },
    )
}

/// The sweep's other planner variants (`planner_variants_gpu_us`: the
/// `auto-*` ones, timed as `auto` is) against FlashInfer's best serial pair,
/// as [`vs_flashinfer`] for `auto`: written into each row as
/// `vs_flashinfer_best_serial_by_variant` ({variant: ratio}, > 1 where ours
/// is faster); the ratios by variant, only where both were timed.
fn vs_flashinfer_by_variant(
    rows: &mut [Value],
    fi: &[Value],
) -> std::collections::BTreeMap<String, Vec<f64>> {
    let names: std::collections::BTreeSet<String> = rows
        .iter()
        .filter_map(|r| r["planner_variants_gpu_us"].as_object())
        .flat_map(|m| m.keys().cloned())
        .collect();
    names
        .into_iter()
        .map(|name| {
            let ratios = fi_ratios(
                rows,
                fi,
                |r| {
                    r["planner_variants_gpu_us"][&name]
                        .as_f64()
                        .filter(|&us| us > 0.0)
                },
                "serial_best_ms",
                |r, x, _| r["vs_flashinfer_best_serial_by_variant"][&name] = json!(x),
            );
            (name, ratios)
        })
        .filter(|(_, ratios)| !ratios.is_empty())
        .collect()
}

/// Our prefill kernel's speed relative to FlashInfer's FA3 on each case's
/// chunk (`pre_fa3_ms` / `prefill_kernel_us`, both GPU times after a spin),
/// written into the rows as `prefill_kernel_vs_fa3`; the ratios found.
fn prefill_vs_fa3(rows: &mut [Value], fi: &[Value]) -> Vec<f64> {
    fi_ratios(
        rows,
        fi,
        |r| r["prefill_kernel_us"].as_f64(),
        "pre_fa3_ms",
        |r, x, _| r["prefill_kernel_vs_fa3"] = json!(x),
    )
}

/// FlashInfer's time `theirs_ms` of each row's case ([`fi_case`]) over the
/// row's time `ours_us` (`None`: not timed), handed to `write` with the row
/// (the ratio, then FlashInfer's time in microseconds); the ratios, only
/// where both were timed.
fn fi_ratios(
    rows: &mut [Value],
    fi: &[Value],
    ours_us: impl Fn(&Value) -> Option<f64>,
    theirs_ms: &str,
    mut write: impl FnMut(&mut Value, f64, f64),
) -> Vec<f64> {
    let mut ratios = vec![];
    for r in rows.iter_mut() {
        let Some(ours) = ours_us(r) else {
            continue;
        };
        let Some(theirs) = fi_case(fi, r).and_then(|f| f[theirs_ms].as_f64()) else {
            continue;
        };
        let x = theirs * 1e3 / ours;
        write(r, x, theirs * 1e3);
        ratios.push(x);
    }
    ratios
}

/// FlashInfer's POD row (`fi.json`) of the hybrid sweep's row `r`: the same
/// model, chunk, prior context, decodes and decode context.
fn fi_case<'a>(fi: &'a [Value], r: &Value) -> Option<&'a Value> {
    fi.iter().find(|f| {
        f["model"] == r["model"]
            && f["chunk"] == r["chunk"]
            && f["prior"] == r["position"]
            && f["n_dec"] == r["decodes"]
            && f["dec_ctx"] == r["decode_context"]
    })
}

/// Median GPU microseconds of `f` alone, CUDA events around it, timed by
/// [`samples_after_spin`] (their median).
#[cfg(feature = "cuda")]
fn gpu_alone_us(dev: &Device, reps: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let Device::Cuda(d) = dev else {
        bail!("not a CUDA device")
    };
    let stream = d.cuda_stream();
    let ctx = stream.context().clone();
    let (start, end) = (
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?,
    );
    let us = samples_after_spin(dev, reps, || {
        start.record(&stream)?;
        f()?;
        end.record(&stream)?;
        Ok(Some(start.elapsed_ms(&end)? as f64 * 1e3))
    })?;
    us.map(|v| percentile(&v, 0.5)).context("no rep timed")
}

#[cfg(not(feature = "cuda"))]
fn gpu_alone_us(_: &Device, _: usize, _: impl FnMut() -> Result<()>) -> Result<f64> {
    bail!("GPU timing needs a CUDA build (--features cuda)")
}

/// The smaller half's share of the predicted serial time (as the planner computes it).
fn note_share(meta: &BatchMeta, cfg: &AttnConfig) -> f64 {
    vpod_attention::pod_step_halves(meta, cfg).map_or(0.0, |(tp, td)| tp.min(td) / (tp + td))
}

/// `vpod-bench allreduce`: each message size's all-reduce over `tp` GPUs
/// through [`vpod_cli::rank_comms`] (what the engine's ranks use): time per
/// call (the slowest rank's), the algorithm bandwidth (bytes / time) and
/// NCCL's bus bandwidth ([`bus_bandwidth`]).
fn all_reduce(tp: usize, sizes_kib: &[usize], iters: usize) -> Result<Vec<Value>> {
    ensure!(
        tp >= 2,
        "allreduce: --tensor-parallel must be at least 2 (GPUs to reduce over)"
    );
    ensure!(
        sizes_kib.iter().all(|&s| s >= 2),
        "allreduce: --sizes-kib: each size must be at least 2 KiB"
    );
    let dev = gpu()?;
    let devices = vpod_cli::device::rank_devices(&dev, Some("cuda:0"), tp)?;
    let comms = vpod_cli::rank_comms(&devices)?;
    // rank_comms' rule: NCCL between GPUs where the build has it.
    let via = if cfg!(feature = "nccl") {
        "NCCL"
    } else {
        "host memory (a build without the nccl feature)"
    };
    println!(
        "all-reduce of bf16 over {tp} GPUs ({via}; {}):\n| KiB | us / call | algorithm GB/s | bus GB/s |\n|---|---|---|---|",
        gpu_name(&dev)
    );
    let mut rows = vec![];
    for &kib in sizes_kib {
        let elems = kib * 1024 / 2;
        let tensors = devices
            .iter()
            .map(|d| Tensor::ones(elems, DType::BF16, d))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let secs = all_reduce_times(&comms, &tensors, iters)?;
        let t = secs.iter().copied().fold(0.0, f64::max);
        let bytes = (elems * 2) as f64;
        let (alg, bus) = (bytes / t, bus_bandwidth(bytes, t, tp));
        println!("| {kib} | {:.1} | {:.1} | {:.1} |", t * 1e6, alg / 1e9, bus / 1e9);
        rows.push(json!({"tensor_parallel": tp, "via": via, "kib": kib, "us_per_call": t * 1e6,
            "per_rank_us": secs.iter().map(|s| s * 1e6).collect::<Vec<_>>(),
            "algorithm_gb_per_s": alg / 1e9, "bus_gb_per_s": bus / 1e9,
            "what": "Communicator::all_reduce_sum of a bf16 vector on every rank (a thread each), back to back after 3 warm-up calls, each rank's device synchronised; the slowest rank's time; bus = algorithm x 2 (n - 1) / n (NCCL's all-reduce bus bandwidth)"}));
    }
    Ok(rows)
}

/// NCCL's bus bandwidth of an all-reduce of `bytes` over `n` ranks in
/// `secs`: each rank sends and receives 2 (n - 1) / n of the message
/// (ring), so this compares with a link's bandwidth whatever n is.
fn bus_bandwidth(bytes: f64, secs: f64, n: usize) -> f64 {
    bytes / secs * 2.0 * (n as f64 - 1.0) / n as f64
}

/// Seconds per all-reduce of each rank's tensor: a thread a rank, 3
/// warm-up calls, a barrier, then `iters` calls back to back and the
/// rank's device synchronised. A rank that fails aborts the others'
/// collectives.
fn all_reduce_times(
    comms: &[std::sync::Arc<dyn vpod_models::tp::Communicator>],
    tensors: &[Tensor],
    iters: usize,
) -> Result<Vec<f64>> {
    let n = iters.max(1);
    let barrier = std::sync::Barrier::new(comms.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .zip(tensors)
            .map(|(c, t)| {
                let barrier = &barrier;
                s.spawn(move || -> Result<f64> {
                    let run = || -> Result<f64> {
                        for _ in 0..3 {
                            c.all_reduce_sum(t)?;
                        }
                        t.device().synchronize()?;
                        barrier.wait();
                        let start = Instant::now();
                        for _ in 0..n {
                            c.all_reduce_sum(t)?;
                        }
                        t.device().synchronize()?;
                        Ok(start.elapsed().as_secs_f64() / n as f64)
                    };
                    run().inspect_err(|e| c.abort(&format!("{e:#}")))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("an all-reduce rank panicked"))?
            })
            .collect()
    })
}

/// Bytes of weight copies a GEMV point rotates over (several times the
/// H200's 60 MB L2, so that every launch streams its weights from HBM).
const GEMV_ROTATE_BYTES: usize = 512 << 20;

/// Each GEMV kernel on each decode projection of the models: per point, a
/// chain of launches over rotating weight copies queued behind a GPU spin
/// ([`gpu_alone_us`]), so the time is the kernels' back to back on one
/// stream (as in a replayed graph), host launches hidden.
fn gemv_kernels(
    models: &[String],
    rows: &[usize],
    pdl: &[bool],
    iters: usize,
    ceil: &Ceilings,
) -> Result<Vec<Value>> {
    use vpod_attention::linear::{GemvKernel, gemv_with};
    let dev = gpu()?;
    let pdl_before = vpod_attention::ops::pdl();
    let mut out = vec![];
    println!(
        "| model | projection | rows | kernel | PDL | us | TB/s | % of {:.2} TB/s |\n|---|---|---|---|---|---|---|---|",
        ceil.tbps()
    );
    for name in models {
        let p = *vpod_models::preset(name).with_context(|| format!("unknown preset {name}"))?;
        let (h, d, f) = (p.hidden, p.hidden / p.heads, p.ffn);
        let (qd, kvd) = (p.heads * d, p.kv_heads * d);
        // (projection, weight rows, K, residual, gated)
        let shapes = [
            ("qkv", qd + 2 * kvd, h, false, false),
            ("o + residual", h, qd, true, false),
            ("gate_up + SiLU gate", 2 * f, h, false, true),
            ("down + residual", h, f, true, false),
            ("lm_head", p.vocab, h, false, false),
        ];
        for (proj, n, k, residual, gated) in shapes {
            let bytes = n * k * 2;
            let copies = GEMV_ROTATE_BYTES.div_ceil(bytes).clamp(1, 16);
            let ws: Vec<Tensor> = (0..copies)
                .map(|_| Ok((Tensor::randn(0f32, 1.0, (n, k), &dev)? * 0.02)?.to_dtype(DType::BF16)?))
                .collect::<Result<_>>()?;
            let launches = copies.max(8);
            let cols = if gated { n / 2 } else { n };
            for &m in rows {
                let x = Tensor::randn(0f32, 1.0, (m, k), &dev)?.to_dtype(DType::BF16)?;
                let r = Tensor::randn(0f32, 1.0, (m, cols), &dev)?.to_dtype(DType::BF16)?;
                for (kernel, &on) in GemvKernel::ALL
                    .into_iter()
                    .filter(|g| m <= g.max_rows())
                    .flat_map(|g| pdl.iter().map(move |p| (g, p)))
                {
                    vpod_attention::ops::set_pdl(on);
                    let us = gpu_alone_us(&dev, iters, || {
                        for i in 0..launches {
                            gemv_with(kernel, &x, &ws[i % copies], residual.then_some(&r), gated)?;
                        }
                        Ok(())
                    })? / launches as f64;
                    let tbps = bytes as f64 / us / 1e6;
                    println!(
                        "| {name} | {proj} | {m} | {kernel:?} | {} | {us:.1} | {tbps:.2} | {:.0} % |",
                        if on { "on" } else { "off" },
                        tbps / ceil.tbps() * 100.0
                    );
                    out.push(
                        json!({"model": name, "projection": proj, "rows": m, "kernel": format!("{kernel:?}"), "pdl": on,
                        "symbol": kernel.symbol(), "n": cols, "k": k, "weight_bytes": bytes, "us": us,
                        "tb_per_s": tbps, "of_copy_ceiling": tbps / ceil.tbps(), "weight_copies": copies}),
                    );
                }
            }
        }
    }
    vpod_attention::ops::set_pdl(pdl_before);
    Ok(out)
}

/// Everything of a decoder layer but the attention call, op by op, as
/// `Llama::forward` runs it (the same functions on random weights of the
/// preset's shapes), at each token count; and the ops queued back to back.
fn layer(models: &[String], tokens: &[usize], iters: usize, ceil: &Ceilings) -> Result<Vec<Value>> {
    use vpod_attention::linear::{linear, linear_add, linear_swiglu};
    use vpod_attention::rope::rope_qk;
    let dev = gpu()?;
    let mut rows = vec![];
    println!(
        "| model | tokens | op | us | TFLOP/s | % of {:.0} | GB/s |\n|---|---|---|---|---|---|---|",
        ceil.tflops()
    );
    for name in models {
        let p = *vpod_models::preset(name).with_context(|| format!("unknown preset {name}"))?;
        let (h, d, f) = (p.hidden, p.hidden / p.heads, p.ffn);
        let (qd, kvd) = (p.heads * d, p.kv_heads * d);
        let w2 = |n: usize, k: usize| -> Result<Tensor> {
            Ok((Tensor::randn(0f32, 1.0, (n, k), &dev)? * 0.02)?.to_dtype(DType::BF16)?)
        };
        let (qkv_w, o_w, gu_w, down_w) = (w2(qd + 2 * kvd, h)?, w2(h, qd)?, w2(2 * f, h)?, w2(h, f)?);
        let norm_w = Tensor::ones(h, DType::BF16, &dev)?;
        let table = |n: usize| -> Result<Tensor> {
            Ok(Tensor::randn(0f32, 1.0, (n, d / 2), &dev)?.to_dtype(DType::BF16)?)
        };
        for &t in tokens {
            let x = w2(t, h)?;
            let a = w2(t, qd)?;
            let g = w2(t, f)?;
            let (cos, sin) = (table(t)?, table(t)?);
            let qkv = linear(&x, &qkv_w)?;
            // As Llama::forward: q and k rotated out of qkv in one pass.
            let rope = || -> Result<Tensor> { Ok(rope_qk(&qkv, &cos, &sin, p.heads, p.kv_heads)?.0) };
            let gemm = |n: usize, k: usize| 2.0 * (t * n * k) as f64;
            let act = (t * h * 2) as f64;
            // (op, FLOPs, bytes moved, the op)
            type Op<'a> = (&'a str, f64, f64, Box<dyn Fn() -> Result<Tensor> + 'a>);
            let ops: Vec<Op> = vec![
                (
                    "attn_norm",
                    0.0,
                    2.0 * act,
                    Box::new(|| Ok(candle_nn::ops::rms_norm(&x, &norm_w, 1e-5)?)),
                ),
                (
                    "qkv",
                    gemm(qd + 2 * kvd, h),
                    0.0,
                    Box::new(|| Ok(linear(&x, &qkv_w)?)),
                ),
                (
                    "rope (q, k)",
                    0.0,
                    2.0 * (t * (qd + kvd) * 2) as f64,
                    Box::new(rope),
                ),
                (
                    "o + residual",
                    gemm(h, qd),
                    0.0,
                    Box::new(|| Ok(linear_add(&a, &o_w, &x)?)),
                ),
                (
                    "mlp_norm",
                    0.0,
                    2.0 * act,
                    Box::new(|| Ok(candle_nn::ops::rms_norm(&x, &norm_w, 1e-5)?)),
                ),
                (
                    "gate_up + SiLU gate",
                    gemm(2 * f, h),
                    0.0,
                    Box::new(|| Ok(linear_swiglu(&x, &gu_w)?)),
                ),
                (
                    "down + residual",
                    gemm(h, f),
                    0.0,
                    Box::new(|| Ok(linear_add(&g, &down_w, &x)?)),
                ),
            ];
            let mut total = 0.0;
            for (op, flops, bytes, run) in &ops {
                let s = time(&dev, iters, || run().map(drop))?;
                total += s;
                let tf = flops / s / 1e12;
                println!(
                    "| {name} | {t} | {op} | {:.1} | {} | {} | {} |",
                    s * 1e6,
                    if *flops > 0.0 {
                        format!("{tf:.0}")
                    } else {
                        "".into()
                    },
                    if *flops > 0.0 {
                        format!("{:.0} %", tf / ceil.tflops() * 100.0)
                    } else {
                        "".into()
                    },
                    if *bytes > 0.0 {
                        format!("{:.0}", bytes / s / 1e9)
                    } else {
                        "".into()
                    },
                );
                rows.push(json!({"model": name, "tokens": t, "op": op, "us": s * 1e6, "flops": flops, "bytes": bytes}));
            }
            let chain = time(&dev, iters, || {
                for (_, _, _, run) in &ops {
                    run()?;
                }
                Ok(())
            })?;
            let flops: f64 = ops.iter().map(|o| o.1).sum();
            println!(
                "| {name} | {t} | sum of the ops / queued back to back | {:.1} / {:.1} | {:.0} | | |",
                total * 1e6,
                chain * 1e6,
                flops / chain / 1e12
            );
            println!(
                "| {name} | {t} | x {} layers | {:.2} ms | | | |",
                p.layers,
                chain * p.layers as f64 * 1e3
            );
            rows.push(
                json!({"model": name, "tokens": t, "op": "chain", "us": chain * 1e6, "flops": flops,
                "layers": p.layers, "ms_all_layers": chain * p.layers as f64 * 1e3}),
            );
        }
    }
    Ok(rows)
}

/// The (prompt, generated) tokens of each `serve` workload: one per
/// prefill:decode ratio when ratios are given, else `--prompt` / `--output`.
fn workloads(prompt: usize, output: usize, ratios: &[f64], tokens: usize) -> Result<Vec<(usize, usize)>> {
    if ratios.is_empty() {
        ensure!(
            prompt > 0 && output > 0,
            "--prompt and --output must be at least 1"
        );
        return Ok(vec![(prompt, output)]);
    }
    ratios
        .iter()
        .map(|&r| {
            ensure!(
                r.is_finite() && r > 0.0,
                "--pd-ratios: {r} is not a positive number"
            );
            let p = (tokens as f64 * r / (r + 1.0)).round() as usize;
            ensure!(
                p > 0 && p < tokens,
                "--pd-ratios {r}: {tokens} tokens a request leave no prompt or no generated token"
            );
            Ok((p, tokens - p))
        })
        .collect()
}

/// A `--runs` backend with its POD tuning and prefill kernel:
/// `SPEC[+FLAG...]` over [`PodTuning`]'s and [`PrefillKernel`]'s defaults,
/// the flags `decode-last` ([`PodTuning::decode_sms`] 0), `slim` / `noslim`
/// ([`PodTuning::slim_streams`] on or off), `ring` / `tiles` (the slim
/// pair's decode: [`SlimDecode::WarpRing`] or [`SlimDecode::Tiles`]) and
/// `wsp` / `wsps` (the prefill kernel: [`PrefillKernel::Wsp`] or
/// [`PrefillKernel::WspSlim`], which the partitioned POD kernel's prefill
/// role follows), e.g. `hybrid/pod+decode-last`, `hybrid/pod+slim+ring+wsps`
/// or `prefill-first/vattention+wsps`.
fn serve_backend(spec: &str) -> Result<(&str, PodTuning, PrefillKernel)> {
    let mut parts = spec.split('+');
    let backend = parts.next().unwrap_or_default();
    let (mut t, mut decode_flag) = (PodTuning::default(), false);
    let mut prefill = PrefillKernel::default();
    for flag in parts {
        match flag {
            "decode-last" => t.decode_sms = Some(0),
            "slim" => t.slim_streams = true,
            "noslim" => t.slim_streams = false,
            "ring" => (t.slim_decode, decode_flag) = (SlimDecode::WarpRing, true),
            "tiles" => (t.slim_decode, decode_flag) = (SlimDecode::Tiles, true),
            "wsp" => prefill = PrefillKernel::Wsp,
            "wsps" => prefill = PrefillKernel::WspSlim,
            f => bail!(
                "run backend {spec}: unknown tuning flag {f} (known: decode-last, slim, noslim, ring, tiles, wsp, wsps)"
            ),
        }
    }
    if decode_flag && !t.slim_streams {
        bail!(
            "run backend {spec}: +ring / +tiles pick the slim pair's decode, and +noslim turns the pair off"
        );
    }
    Ok((backend, t, prefill))
}

/// A `--runs` scheduler: `prefill-first` (vLLM v0.2.7) or `hybrid` (Sarathi-Serve).
fn serve_policy(sched: &str) -> Result<vpod_cli::scheduler::Policy> {
    use vpod_cli::scheduler::Policy;
    Ok(match sched {
        "prefill-first" => Policy::PrefillFirst,
        "hybrid" => Policy::Hybrid { one_prefill: false },
        other => bail!("unknown scheduler {other} (known: prefill-first, hybrid)"),
    })
}

/// Argument errors that need no GPU: a mistyped hybrid variant or serve run
/// fails at once, before the ceilings are measured and the device call
/// has spent its minutes.
fn check_args(what: &What) -> Result<()> {
    match what {
        What::Hybrid { variants, .. } => {
            hybrid_variants(variants)?;
        }
        What::Prefill {
            kernels,
            cases,
            placements,
            ..
        } => {
            ensure!(*placements >= 1, "prefill: --placements must be at least 1");
            prefill_cases(cases)?;
            for k in kernels {
                prefill_kernel(k)?;
            }
        }
        What::Serve { runs, .. } => {
            for run in runs {
                let (sched, spec) = run
                    .split_once('/')
                    .with_context(|| format!("run {run}: expected scheduler/backend"))?;
                serve_policy(sched)?;
                serve_backend(spec)?;
            }
        }
        _ => {}
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn serve(
    models: &[String],
    requests: usize,
    workloads: &[(usize, usize)],
    rate: f64,
    chunks: &[usize],
    runs: &[String],
    profile_attention: bool,
    cuda_graphs: vpod_cli::engine::CudaGraphs,
    tensor_parallel: usize,
) -> Result<Vec<Value>> {
    use vpod_cli::engine::{Engine, Request};
    use vpod_cli::sampler::SamplingParams;
    use vpod_cli::scheduler::SchedulerConfig;
    ensure!(
        chunks.iter().all(|&c| c > 0),
        "--chunks: a chunk size must be at least 1 token"
    );
    let dev = gpu()?;
    let tp = tensor_parallel.max(1);
    let devices = vpod_cli::device::rank_devices(&dev, Some("cuda:0"), tp)?;
    let mut rows = vec![];
    println!(
        "| model | P:D | scheduler | backend | chunk | requests / min | tok/s | TTFT p50 / p99 ms | TBT p50 / p99 ms | fused steps | s in hybrid / decode-only / prefill-only steps | host-only ms a step |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    let longest = workloads.iter().map(|(p, o)| p + o).max().unwrap_or(0);
    for name in models {
        let (p, model, ranks) = synthetic_tp(name, longest + 64, &devices)?;
        // One rank's KV heads (one, replicated, where the model has fewer than ranks).
        let rank_kv_heads = if p.kv_heads.is_multiple_of(tp) {
            p.kv_heads / tp
        } else {
            1
        };
        let label = match tp {
            1 => name.to_string(),
            n => format!("{name} (TP-{n})"),
        };
        // The POD paper's chunk sizes: Yi-6B 512, Llama-3-8B 1024.
        let default_chunk = [if name == "yi-6b" { 512 } else { 1024 }];
        let chunks = if chunks.is_empty() {
            &default_chunk[..]
        } else {
            chunks
        };
        for (&(prompt, output), &chunk) in workloads.iter().flat_map(|w| chunks.iter().map(move |c| (w, c))) {
            let pd = format!("{prompt}:{output}");
            // KV for every request at once (pages rounded up) if the GPU holds it, else what is free
            // (per rank: its KV heads, on the rank GPU with the least free memory).
            let kv_per_token = (p.layers * 2 * rank_kv_heads * (p.hidden / p.heads) * 2) as f64;
            let mut free = usize::MAX;
            for d in &devices {
                free = free.min(vpod_cli::device::gpu_info(d)?.map_or(0, |g| g.free_bytes));
            }
            let want = (requests as f64 * (prompt + output + 2048) as f64 * kv_per_token) as usize;
            let kv = want.min(free.saturating_sub(6 << 30));
            for run in runs {
                let (sched, spec) = run
                    .split_once('/')
                    .with_context(|| format!("run {run}: expected scheduler/backend"))?;
                let policy = serve_policy(sched)?;
                let (backend, pod_tuning, prefill_kernel) = serve_backend(spec)?;
                let opts = BackendOptions {
                    max_seqs: requests,
                    kv_memory: Some(kv),
                    cuda_graphs: cuda_graphs == vpod_cli::engine::CudaGraphs::On,
                    pod_tuning,
                    prefill_kernel,
                    ..Default::default()
                };
                let mut e = if ranks.is_empty() {
                    Engine::with_options(model.clone(), backend, &opts)?
                } else {
                    Engine::with_tensor_parallel(model.clone(), ranks.clone(), backend, &opts)?
                };
                let trace = vpod_cli::compare::synthetic_trace(requests, prompt, output, rate, 7);
                let vocab = p.vocab;
                let reqs: Vec<Request> = trace
                    .iter()
                    .enumerate()
                    .map(|(i, _)| Request {
                        prompt: (0..prompt)
                            .map(|t| ((t * 31 + i * 7) % (vocab - 20)) as u32 + 10)
                            .collect(),
                        max_tokens: output,
                        sampling: SamplingParams {
                            ignore_eos: true,
                            ..Default::default()
                        },
                        arrival_ms: trace[i].2,
                    })
                    .collect();
                let cfg = SchedulerConfig {
                    policy,
                    chunk_size: chunk,
                    max_seqs: requests,
                };
                // Warm-up (untimed): two short requests through prefill and
                // decode steps (hybrid ones too under `hybrid`), so that the
                // first timed run does not pay for first-use costs (PTX JIT of
                // candle's kernels, cuBLAS handles, the allocator). Without it
                // the first run of a fresh machine lost half its throughput.
                // (The virtual cache keeps the warm-up's pages mapped for reuse:
                // a few 2 MiB page groups the timed run does not map again.)
                let warm: Vec<Request> = reqs[..2.min(reqs.len())]
                    .iter()
                    .map(|r| Request {
                        prompt: r.prompt[..(2 * chunk).min(r.prompt.len())].to_vec(),
                        max_tokens: 8,
                        arrival_ms: 0.0,
                        ..r.clone()
                    })
                    .collect();
                e.run_batch(&warm, cfg, &mut |_, _| Ok(()))?;
                e.profile_attention = profile_attention;
                let t = Instant::now();
                let out = e.run_batch(&reqs, cfg, &mut |_, _| Ok(()))?;
                let wall = t.elapsed().as_secs_f64();
                let generated: usize = out.requests.iter().map(|r| r.tokens.len()).sum();
                let ttft: Vec<f64> = out.requests.iter().map(|r| r.ttft_ms).collect();
                let tbt: Vec<f64> = out
                    .requests
                    .iter()
                    .flat_map(|r| r.tbt_ms.iter().copied())
                    .collect();
                let hybrid_steps = out
                    .steps
                    .iter()
                    .filter(|s| s.prefill_chunks > 0 && s.decodes > 0)
                    .count();
                let fused = out
                    .steps
                    .iter()
                    .filter(|s| {
                        s.attention_path
                            .as_deref()
                            .is_some_and(|p| p.starts_with("fused"))
                    })
                    .count();
                // Where the wall time went, by kind of step (the steps end on the
                // results' copy to the host, so their times are the GPU's plus
                // the host's `host_ms`).
                type Step = vpod_cli::engine::StepRecord;
                type Kind<'a> = (&'a str, &'a dyn Fn(&Step) -> bool);
                let sum = |f: &dyn Fn(&Step) -> bool, t: &dyn Fn(&Step) -> f64| -> f64 {
                    // (a fold from +0.0: an empty float sum is -0.0, printed "-0")
                    out.steps.iter().filter(|s| f(s)).map(t).fold(0.0, |a, b| a + b)
                };
                let kinds: [Kind; 3] = [
                    ("hybrid", &|s| s.prefill_chunks > 0 && s.decodes > 0),
                    ("decode", &|s| s.prefill_chunks == 0),
                    ("prefill", &|s| s.decodes == 0),
                ];
                let [hybrid_ms, decode_ms, prefill_ms] = kinds.map(|(_, f)| sum(f, &|s| s.ms));
                let mut by_kind = serde_json::Map::new();
                for (kind, f) in kinds {
                    // host_s: the host alone, nothing queued on the device
                    // (scheduling, sampling); wait_s: blocked on the results.
                    let mut k = json!({"steps": out.steps.iter().filter(|s| f(s)).count(), "s": sum(f, &|s| s.ms) / 1e3,
                    "host_s": sum(f, &|s| s.host_ms) / 1e3, "wait_s": sum(f, &|s| s.wait_ms) / 1e3});
                    if profile_attention {
                        k["attention_s"] = json!(sum(f, &|s| s.attention_ms) / 1e3);
                    }
                    by_kind.insert(kind.into(), k);
                }
                // Every step (the runs of one model share the schedule, so step i
                // of two backends is the same batch): decodes, prefill tokens, ms,
                // attention ms (when profiled), fused (pod), then the step's ms
                // split as StepRecord splits it: queued, waiting, host alone.
                let r3 = |x: f64| (x * 1e3).round() / 1e3;
                let steps: Vec<Value> = out
                    .steps
                    .iter()
                    .map(|s| {
                        json!([
                            s.decodes,
                            s.prefill_tokens,
                            r3(s.ms),
                            r3(s.attention_ms),
                            s.attention_path
                                .as_deref()
                                .is_some_and(|p| p.starts_with("fused")),
                            r3(s.queued_ms),
                            r3(s.wait_ms),
                            r3(s.host_ms)
                        ])
                    })
                    .collect();
                let rpm = requests as f64 / wall * 60.0;
                println!(
                    "| {label} | {pd} | {sched} | {spec} | {chunk} | {rpm:.2} | {:.0} | {:.0} / {:.0} | {:.1} / {:.1} | {fused} of {hybrid_steps} hybrid | {:.0} / {:.0} / {:.0} | {:.2} |",
                    generated as f64 / wall,
                    percentile(&ttft, 0.5),
                    percentile(&ttft, 0.99),
                    percentile(&tbt, 0.5),
                    percentile(&tbt, 0.99),
                    hybrid_ms / 1e3,
                    decode_ms / 1e3,
                    prefill_ms / 1e3,
                    out.steps.iter().map(|s| s.host_ms).sum::<f64>() / out.steps.len().max(1) as f64,
                );
                rows.push(
                json!({"model": name, "tensor_parallel": tp, "scheduler": sched, "backend": spec, "chunk": chunk,
                // The engine runs tensor-parallel steps eagerly (collectives are not captured).
                "cuda_graphs": if tp > 1 { json!("off: tensor-parallel steps run eagerly") } else { json!(cuda_graphs) },
                "requests": requests, "prompt": prompt, "output": output, "rate_per_s": rate, "wall_s": wall,
                "requests_per_min": rpm, "tokens_per_s": generated as f64 / wall,
                "ttft_ms_p50": percentile(&ttft, 0.5), "ttft_ms_p99": percentile(&ttft, 0.99),
                "tbt_ms_p50": percentile(&tbt, 0.5), "tbt_ms_p99": percentile(&tbt, 0.99),
                "steps": out.steps.len(), "hybrid_steps": hybrid_steps, "fused_steps": fused,
                "by_step_kind": by_kind, "profile_attention": profile_attention,
                "step_columns": ["decodes", "prefill_tokens", "ms", "attention_ms", "fused", "queued_ms", "wait_ms", "host_ms"], "steps_detail": steps,
                "preemptions": out.requests.iter().map(|r| r.preemptions).sum::<usize>(), "kv_bytes": kv}),
            );
            }
        }
    }
    serve_summary(&rows);
    Ok(rows)
}

/// One line per (model, workload) with more than one run: each run's
/// requests per minute against the `hybrid/vattention` run (Sarathi-Serve
/// with the serial attention pair), the POD paper's comparison.
fn serve_summary(rows: &[Value]) {
    let key = |r: &Value| {
        (
            r["model"].clone(),
            r["prompt"].clone(),
            r["output"].clone(),
            r["chunk"].clone(),
        )
    };
    let mut seen = vec![];
    for r in rows {
        let k = key(r);
        if seen.contains(&k) {
            continue;
        }
        seen.push(k.clone());
        let same: Vec<&Value> = rows.iter().filter(|x| key(x) == k).collect();
        let Some(base) = same
            .iter()
            .find(|x| x["scheduler"] == "hybrid" && x["backend"] == "vattention")
            .and_then(|x| x["requests_per_min"].as_f64())
        else {
            continue;
        };
        let others: Vec<String> = same
            .iter()
            .filter(|x| !(x["scheduler"] == "hybrid" && x["backend"] == "vattention"))
            .filter_map(|x| {
                let rpm = x["requests_per_min"].as_f64()?;
                Some(format!(
                    "{}/{} {:+.1} %",
                    x["scheduler"].as_str()?,
                    x["backend"].as_str()?,
                    (rpm / base - 1.0) * 100.0
                ))
            })
            .collect();
        if !others.is_empty() {
            println!(
                "{} {}+{} tokens, chunk {}: over hybrid/vattention ({base:.2} requests/min): {}",
                r["model"].as_str().unwrap_or("?"),
                r["prompt"],
                r["output"],
                r["chunk"],
                others.join(", ")
            );
        }
    }
}

/// `on` / `off` as a flag's value.
fn on_off(s: &str) -> std::result::Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("expected on or off, not {s:?}")),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    // SAFETY: before any thread is started.
    unsafe { std::env::set_var("VPOD_BENCH_OUT", &args.out) };
    std::fs::create_dir_all(&args.out)?;
    check_args(&args.what)?;
    // Once per run, before any benchmark: the tables' percentages and the
    // e2e floors divide by these, and the JSON records them.
    let ceil = Ceilings::measure(&gpu()?)?;
    if let What::E2e {
        norm_fusion,
        pdl,
        gemv_tune,
        gemv_rows,
        rope_write,
        ..
    } = &args.what
    {
        vpod_attention::linear::set_gemv_rows(*gemv_rows)?;
        vpod_attention::linear::set_norm_fusion(*norm_fusion);
        vpod_attention::ops::set_pdl(*pdl);
        vpod_attention::linear::set_gemv_tuning(*gemv_tune);
        vpod_attention::set_rope_write_fusion(*rope_write);
    }
    let (name, rows) = match &args.what {
        What::Decode {
            context,
            batch,
            backends,
        } => ("decode", decode(*context, batch, backends, args.iters, &ceil)?),
        What::Prefill {
            backends,
            models,
            kernels,
            cases,
            placements,
        } => (
            "prefill",
            prefill(models, backends, kernels, cases, *placements, args.iters, &ceil)?,
        ),
        What::Map => ("map", map(args.iters)?),
        What::Jit { modules } => ("jit", jit(modules)?),
        What::Spikes { steps } => ("spikes", spikes(*steps)?),
        What::E2e {
            context,
            batch,
            models,
            backends,
            tokens,
            profile_attention,
            tensor_parallel,
            cuda_graphs,
            norm_fusion: _,
            pdl: _,
            gemv_tune: _,
            gemv_rows: _,
            rope_write: _,
        } => (
            "e2e",
            e2e(
                *context,
                batch,
                models,
                backends,
                *tokens,
                *profile_attention,
                *tensor_parallel,
                cuda_graphs,
                &ceil,
            )?,
        ),
        What::Hybrid {
            models,
            chunks,
            positions,
            contexts,
            memory_gb,
            decodes,
            variants,
            fi_json,
            energy_ms,
        } => (
            "hybrid",
            hybrid(
                models,
                chunks,
                positions,
                contexts,
                *memory_gb,
                decodes,
                variants,
                args.iters,
                fi_json.as_deref(),
                *energy_ms,
            )?,
        ),
        What::Gemv { models, rows, pdl } => ("gemv", gemv_kernels(models, rows, pdl, args.iters, &ceil)?),
        What::Layer { models, tokens } => ("layer", layer(models, tokens, args.iters, &ceil)?),
        What::Allreduce {
            tensor_parallel,
            sizes_kib,
        } => ("allreduce", all_reduce(*tensor_parallel, sizes_kib, args.iters)?),
        What::Serve {
            models,
            requests,
            prompt,
            output,
            pd_ratios,
            request_tokens,
            rate,
            chunks,
            runs,
            profile_attention,
            cuda_graphs,
            tensor_parallel,
        } => (
            "serve",
            serve(
                models,
                *requests,
                &workloads(*prompt, *output, pd_ratios, *request_tokens)?,
                *rate,
                chunks,
                runs,
                *profile_attention,
                *cuda_graphs,
                *tensor_parallel,
            )?,
        ),
    };
    let record = json!({"benchmark": name, "gpu": ceil.gpu, "ceilings": ceil.json(),
        "date": std::env::var("VPOD_DATE").unwrap_or_default(),
        "command": std::env::args().collect::<Vec<_>>().join(" "), "results": rows});
    let path = vpod_benches::write_json(&format!("{name}.json"), &[record])?;
    println!("wrote {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The energy window's edges: a counter that moves at its 50th read is
    /// caught there (the value after the move), work is fed while waiting,
    /// and a counter that never moves is read as it is after the timeout.
    #[test]
    fn counter_edges_are_caught() {
        let mut reads = 0;
        let mut read = || {
            reads += 1;
            Ok(f64::from(reads / 50))
        };
        let mut fed = 0;
        let mut feed = || {
            fed += 1;
            Ok(())
        };
        let (v, _) = counter_edge(&mut read, &mut feed, 0.0, 60.0).unwrap();
        assert_eq!(v, 1.0);
        assert_eq!(reads, 50);
        assert_eq!(fed, 48, "fed between every two reads that saw no move");
        let mut frozen = || Ok(7.0);
        let t = Instant::now();
        let (v, _) = counter_edge(&mut frozen, &mut || Ok(()), 1.0, 0.02).unwrap();
        assert_eq!(v, 7.0);
        assert!(t.elapsed().as_secs_f64() >= 0.02);
    }

    /// The all-reduce timing loop on CPU ranks (the in-memory
    /// communicator): a time per rank, and the bus bandwidth of a ring.
    #[test]
    fn all_reduce_times_every_rank() {
        let comms: Vec<std::sync::Arc<dyn vpod_models::tp::Communicator>> =
            vpod_models::tp::LocalComm::group(3)
                .into_iter()
                .map(|c| std::sync::Arc::new(c) as _)
                .collect();
        let tensors: Vec<Tensor> = (0..3)
            .map(|_| Tensor::ones(1024, DType::BF16, &Device::Cpu).unwrap())
            .collect();
        let secs = all_reduce_times(&comms, &tensors, 4).unwrap();
        assert_eq!(secs.len(), 3);
        assert!(secs.iter().all(|&s| s > 0.0 && s.is_finite()), "{secs:?}");
        // 2 ranks: each moves the whole message once; 4: 1.5 times.
        assert_eq!(bus_bandwidth(100.0, 1.0, 2), 100.0);
        assert_eq!(bus_bandwidth(100.0, 1.0, 4), 150.0);
    }

    /// The sustained record of a case and the summary over cases: the
    /// speedups over the best serial variant and the two ceilings.
    #[test]
    fn sustained_records_and_ceilings() {
        let run = |us: f64, w: f64| SustainedRun {
            per_step: Sustained {
                secs: us * 1e-6,
                joules: us * 1e-6 * w,
            },
            sm_mhz: 1600.0,
        };
        // Halves of 100 us each: the prefill at the 700 W cap, the decode
        // at 400 W, idle 100 W: the cap bounds an overlap at 150 us.
        let runs = [
            ("serial-ws", run(200.0, 550.0)),
            ("serial-wss", run(210.0, 540.0)),
            ("auto", run(160.0, 690.0)),
        ];
        let case = sustained_case(&runs, run(100.0, 700.0), run(100.0, 400.0), 700.0, 100.0);
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        assert!((f(&case["best_serial_us"]) - 200.0).abs() < 1e-9);
        assert!((f(&case["speedup_over_best_serial"]["auto"]) - 1.25).abs() < 1e-9);
        assert!(case["speedup_over_best_serial"].get("serial-wss").is_none());
        assert!((f(&case["perfect_overlap_speedup"]) - 2.0).abs() < 1e-9);
        assert!((f(&case["power_cap_bound_us"]) - 150.0).abs() < 1e-6);
        assert!((f(&case["power_cap_speedup"]) - 4.0 / 3.0).abs() < 1e-9);
        assert!((f(&case["variants"]["auto"]["watts"]) - 690.0).abs() < 1e-9);
        let rows = vec![
            json!({"model": "llama3-8b", "chunk": 1024, "position": 4096, "decodes": 8, "decode_context": 4096,
                "sustained": case}),
            json!({"model": "yi-6b", "chunk": 1024, "position": 4096, "decodes": 8, "decode_context": 4096,
                "sustained": null}),
        ];
        let s = sustained_summary(&rows, 300, 700.0, 100.0);
        assert_eq!(s["auto"]["cases"], 1);
        assert!((f(&s["power_cap_speedup"]["median"]) - 4.0 / 3.0).abs() < 1e-9);
        assert_eq!(s["power_limit_w"], 700.0);
        // No sustained record at all: nothing to summarise.
        assert!(sustained_summary(&rows[1..], 300, 700.0, 100.0).is_null());
    }

    /// Graphs on/off token check: equal runs, a changed token, a shorter
    /// request and a missing request.
    #[test]
    fn differing_tokens_are_found() {
        let a = vec![vec![1, 2, 3], vec![4, 5]];
        assert_eq!(first_differing_token(&a, &a.clone()), None);
        assert_eq!(
            first_differing_token(&a, &[vec![1, 2, 3], vec![4, 6]]),
            Some((1, 1))
        );
        assert_eq!(first_differing_token(&a, &[vec![1, 2], vec![4, 5]]), Some((0, 2)));
        assert_eq!(first_differing_token(&a, &[vec![1, 2, 3]]), Some((1, 0)));
    }

    #[test]
    fn pd_ratios_split_the_request_tokens() {
        assert_eq!(workloads(100, 7, &[], 16384).unwrap(), vec![(100, 7)]);
        assert_eq!(
            workloads(0, 0, &[31.0, 50.0, 100.0], 16384).unwrap(),
            vec![(15872, 512), (16063, 321), (16222, 162)]
        );
        assert!(workloads(0, 0, &[0.0], 16384).is_err());
        assert!(workloads(0, 0, &[f64::NAN], 16384).is_err());
        assert!(workloads(0, 0, &[1e9], 16384).is_err(), "no generated token left");
        assert!(workloads(0, 5, &[], 16384).is_err());
    }

    /// The hybrid sweep's rows meet FlashInfer's POD rows on the same case
    /// only, and the ratio is theirs over ours.
    #[test]
    fn flashinfer_cases_match_by_shape() {
        let mut rows = vec![
            json!({"model": "llama3-8b", "chunk": 1024, "position": 4096, "decodes": 8, "decode_context": 4096,
                "planner_gpu_us": 200.0}),
            json!({"model": "llama3-8b", "chunk": 2048, "position": 4096, "decodes": 8, "decode_context": 4096,
                "planner_gpu_us": 300.0}),
            json!({"summary": {}}),
        ];
        let fi = vec![
            json!({"model": "llama3-8b", "chunk": 1024, "prior": 4096, "n_dec": 8, "dec_ctx": 4096, "serial_best_ms": 0.25}),
            json!({"model": "yi-6b", "chunk": 2048, "prior": 4096, "n_dec": 8, "dec_ctx": 4096, "serial_best_ms": 9.0}),
            json!({"model": "llama3-8b", "chunk": 2048, "prior": 4096, "n_dec": 8, "dec_ctx": 4096, "err": "oom"}),
        ];
        let r = vs_flashinfer(&mut rows, &fi);
        assert_eq!(r, vec![1.25]);
        assert_eq!(rows[0]["vs_flashinfer_best_serial"], json!(1.25));
        assert!(rows[1].get("vs_flashinfer_best_serial").is_none());
        // The other planner variants, each against the same pair.
        rows[0]["planner_variants_gpu_us"] = json!({"auto-slim": 250.0, "auto-slimr": 125.0});
        rows[1]["planner_variants_gpu_us"] = json!({"auto-slim": 100.0});
        let by = vs_flashinfer_by_variant(&mut rows, &fi);
        assert_eq!(by.len(), 2);
        assert_eq!(
            (by["auto-slim"].clone(), by["auto-slimr"].clone()),
            (vec![1.0], vec![2.0])
        );
        assert_eq!(
            rows[0]["vs_flashinfer_best_serial_by_variant"]["auto-slimr"],
            json!(2.0)
        );
        assert!(rows[1].get("vs_flashinfer_best_serial_by_variant").is_none());
    }

    /// The prefill kernel against FA3 on the same chunk: theirs over ours,
    /// only where both were timed.
    #[test]
    fn prefill_kernel_against_fa3() {
        let mut rows = vec![
            json!({"model": "yi-6b", "chunk": 1024, "position": 16384, "decodes": 8, "decode_context": 4096,
                "prefill_kernel_us": 400.0}),
            json!({"model": "yi-6b", "chunk": 2048, "position": 16384, "decodes": 8, "decode_context": 4096,
                "prefill_kernel_us": null}),
        ];
        let fi = vec![
            json!({"model": "yi-6b", "chunk": 1024, "prior": 16384, "n_dec": 8, "dec_ctx": 4096, "pre_fa3_ms": 0.38}),
            json!({"model": "yi-6b", "chunk": 2048, "prior": 16384, "n_dec": 8, "dec_ctx": 4096, "pre_fa3_ms": 0.8}),
        ];
        let r = prefill_vs_fa3(&mut rows, &fi);
        assert_eq!(r.len(), 1);
        assert!((r[0] - 0.95).abs() < 1e-12);
        assert!(rows[1].get("prefill_kernel_vs_fa3").is_none());
    }

    #[test]
    fn ran_prefill_from_records() {
        assert_eq!(
            ran_prefill("prefill slot_prefill_wsp_bf16"),
            Some("slot_prefill_wsp_bf16")
        );
        let n = "two streams (pod:streams); prefill slot_prefill_wsps_bf16, decode slot_decode_slim_bf16";
        assert_eq!(ran_prefill(n), Some("slot_prefill_wsps_bf16"));
        assert_eq!(
            ran_prefill("fused, SMs partitioned by role; kernel pod_wsd_bf16"),
            None
        );
    }

    #[test]
    fn rel_l2_flags_wrong_outputs() {
        let dev = Device::Cpu;
        let want = Tensor::new(&[[1.0f32, 2.0], [3.0, 4.0]], &dev).unwrap();
        let near = Tensor::new(&[[1.0f32, 2.0], [3.02, 4.0]], &dev).unwrap();
        let e = rel_l2(&near.to_dtype(DType::BF16).unwrap(), &want).unwrap();
        assert!(e > 0.0 && e <= OUTPUT_TOLERANCE, "{e}");
        let wrong = Tensor::new(&[[1.0f32, 2.0], [3.0, 5.0]], &dev).unwrap();
        assert!(rel_l2(&wrong, &want).unwrap() > OUTPUT_TOLERANCE);
        let nan = Tensor::new(&[[1.0f32, f32::NAN], [3.0, 4.0]], &dev).unwrap();
        assert!(rel_l2(&nan, &want).unwrap().is_nan());
        assert_eq!(rel_l2(&want, &want).unwrap(), 0.0);
    }

    #[test]
    fn rep_clocks_summarise_the_spread() {
        let c = |sm_mhz, bits| RepClock {
            sm_mhz,
            reasons: Some(energy::ClockReasons(bits)),
        };
        // Two reps at the capped clock, one at the boost clock: the same
        // cycles, so the time spread is the clock's.
        let ms = [0.90, 0.90, 0.81];
        let s = rep_clock_summary(Some(&ms), &[c(1780.0, 4), c(1780.0, 4), c(1980.0, 0)]);
        assert_eq!(s.mhz, Some((1780.0, 1780.0, 1980.0)));
        assert_eq!(s.capped, Some((2, 3)));
        let (m, lo, hi) = s.mcycles.unwrap();
        assert!((m - 1.602).abs() < 1e-9 && (lo - 1.602).abs() < 1e-9 && (hi - 1.6038).abs() < 1e-9);
        assert_eq!(s.cells(), "1780 (1780-1980) | 2 of 3 | 1.60 (1.60-1.60)");
        // No clocks (no NVML) or reps that do not match: empty cells.
        assert_eq!(rep_clock_summary(Some(&ms), &[]).cells(), "- | - | -");
        assert_eq!(rep_clock_summary(None, &[c(1.0, 0)]), ClockSummary::default());
        // Reasons unread: the clock still counts, the capped cell stays empty.
        let s = rep_clock_summary(
            Some(&[1.0]),
            &[RepClock {
                sm_mhz: 1500.0,
                reasons: None,
            }],
        );
        assert_eq!(s.cells(), "1500 (1500-1500) | - | 1.50 (1.50-1.50)");
    }

    #[test]
    fn serve_backend_flags() {
        let (b, t, _) = serve_backend("pod+decode-last").unwrap();
        assert_eq!((b, t.decode_sms), ("pod", Some(0)));
        // The flags over the shipped tuning.
        let (b, t, k) = serve_backend("pod").unwrap();
        assert_eq!((b, t, k), ("pod", PodTuning::default(), PrefillKernel::default()));
        let (b, t, k) = serve_backend("vattention+wsps").unwrap();
        assert_eq!(
            (b, t, k),
            ("vattention", PodTuning::default(), PrefillKernel::WspSlim)
        );
        let (_, t, k) = serve_backend("pod+slim+ring+wsps").unwrap();
        assert_eq!(
            (t.slim_streams, t.slim_decode, k),
            (true, SlimDecode::WarpRing, PrefillKernel::WspSlim)
        );
        assert_eq!(serve_backend("pod+wsp").unwrap().2, PrefillKernel::Wsp);
        let (_, t, _) = serve_backend("pod+slim").unwrap();
        assert_eq!(
            (t.slim_streams, t.slim_decode),
            (true, PodTuning::default().slim_decode)
        );
        let (_, t, _) = serve_backend("pod+slim+ring").unwrap();
        assert_eq!((t.slim_streams, t.slim_decode), (true, SlimDecode::WarpRing));
        let (_, t, _) = serve_backend("pod+slim+tiles").unwrap();
        assert_eq!((t.slim_streams, t.slim_decode), (true, SlimDecode::Tiles));
        let (_, t, _) = serve_backend("pod+slim+noslim").unwrap();
        assert!(!t.slim_streams);
        // +tiles alone: an error while the pair is off by default.
        assert_eq!(
            serve_backend("pod+tiles").is_err(),
            !PodTuning::default().slim_streams
        );
        assert!(serve_backend("pod+noslim+ring").is_err());
        assert_eq!(serve_backend("vattention").unwrap().1, PodTuning::default());
        assert!(serve_backend("pod+fast").is_err());
    }

    #[test]
    fn bad_names_fail_before_the_gpu() {
        let what = |argv: &[&str]| Args::try_parse_from(argv).unwrap().what;
        let ok = what(&[
            "vpod-bench",
            "hybrid",
            "--variants",
            "serial-ws,auto-slimr,streams-slimr",
        ]);
        assert!(check_args(&ok).is_ok());
        let typo = what(&["vpod-bench", "hybrid", "--variants", "serial-ws,auto-slimx"]);
        let e = format!("{:#}", check_args(&typo).unwrap_err());
        assert!(e.contains("unknown variant auto-slimx"), "{e}");
        let no_serial = what(&["vpod-bench", "hybrid", "--variants", "auto"]);
        assert!(check_args(&no_serial).is_err());
        let runs = |r: &str| what(&["vpod-bench", "serve", "--runs", r]);
        assert!(check_args(&runs("hybrid/pod+slim+ring,prefill-first/vattention")).is_ok());
        assert!(check_args(&runs("hybrid/pod+noslim+tiles")).is_err());
        assert!(check_args(&runs("fcfs/pod")).is_err());
        assert!(check_args(&runs("pod")).is_err());
        let kernels = |k: &str| what(&["vpod-bench", "prefill", "--kernels", k]);
        assert!(check_args(&kernels("wsp,wsp/nol2,wsps,wsps/nol2")).is_ok());
        assert!(check_args(&kernels("wspg")).is_err());
        assert!(check_args(&kernels("wsp/l2")).is_err());
    }

    #[test]
    fn prefill_cases_by_name() {
        let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let c = prefill_cases(&names(&["2k@16k", "16k"])).unwrap();
        assert_eq!(
            c.iter().map(|c| (c.2, c.3)).collect::<Vec<_>>(),
            vec![(16384, 2048), (0, 16384)]
        );
        let e = prefill_cases(&names(&["2k@8k"])).unwrap_err().to_string();
        assert!(e.contains("unknown case 2k@8k") && e.contains("1k@12k"), "{e}");
        // The command line takes exactly these names.
        use clap::Parser;
        for c in PREFILL_CASES {
            assert!(
                Args::try_parse_from(["vpod-bench", "prefill", "--cases", c.0]).is_ok(),
                "{}",
                c.0
            );
        }
        assert!(Args::try_parse_from(["vpod-bench", "prefill", "--cases", "2k@8k"]).is_err());
        assert!(
            Args::try_parse_from(["vpod-bench", "prefill", "--cases", "2k@16k", "--placements", "4"]).is_ok()
        );
        assert!(Args::try_parse_from(["vpod-bench", "prefill", "--placements", "x"]).is_err());
    }

    #[test]
    fn hybrid_variants_map_to_kernel_choices() {
        for (name, v) in HYBRID_VARIANTS {
            let o = variant_options(v).unwrap_or_else(|e| panic!("{name}: {e}"));
            let want = match *name {
                "serial" => Some(PrefillKernel::W8),
                "serial-64" => Some(PrefillKernel::W4),
                "serial-64p" => Some(PrefillKernel::W4p),
                "serial-64t" => Some(PrefillKernel::Tma64),
                "serial-ws" | "auto-noslim" | "auto-slim" | "auto-slimr" | "streams-ws" => {
                    Some(PrefillKernel::Wsp)
                }
                "serial-wss" | "streams-slim" | "streams-slimr" | "auto-slimrs" => {
                    Some(PrefillKernel::WspSlim)
                }
                "auto" | "auto-nol2" => Some(PrefillKernel::default()),
                _ => None,
            };
            if let Some(k) = want {
                assert_eq!(o.prefill_kernel, k, "{name}");
            }
        }
        let pod3 = HYBRID_VARIANTS.iter().find(|v| v.0 == "pod3-ticket").unwrap();
        let o = variant_options(&pod3.1).unwrap();
        assert_eq!(
            (o.pod_mode, o.pod_tuning.blocks_per_sm, o.pod_tuning.policy),
            (PodMode::Fused, Some(3), PodPolicy::Ticket)
        );
        assert!(variant_options(&["warp", "", "", "", "", "", "", "", ""]).is_err());
        assert!(variant_options(&["fused", "1", "x", "", "", "", "", "", ""]).is_err());
        let wsd = HYBRID_VARIANTS.iter().find(|v| v.0 == "wsd-48").unwrap();
        let t = variant_options(&wsd.1).unwrap().pod_tuning;
        assert_eq!((t.partitioned, t.decode_sms), (true, Some(48)));
        let t = variant_options(&["auto", "", "", "", "", "", "", "", "auto"])
            .unwrap()
            .pod_tuning;
        assert_eq!((t.partitioned, t.decode_sms), (true, None));
        assert!(variant_options(&["fused", "1", "", "", "", "", "", "", "x"]).is_err());
        // auto-slim runs the planner's prefill-heavy steps as the slim pair.
        let slim = |name: &str| {
            let v = HYBRID_VARIANTS.iter().find(|v| v.0 == name).unwrap();
            (variant_options(&v.1).unwrap().pod_tuning.slim_streams, v.1[0])
        };
        assert_eq!(slim("auto"), (PodTuning::default().slim_streams, "auto"));
        assert_eq!(slim("auto-noslim"), (false, "auto-noslim"));
        assert_eq!(slim("auto-slim"), (true, "auto-slim"));
        // The /ring variants: the same with the slim decode's ring a warp.
        let ring = |name: &str| {
            let v = HYBRID_VARIANTS.iter().find(|v| v.0 == name).unwrap();
            let o = variant_options(&v.1).unwrap();
            (
                o.pod_tuning.slim_streams,
                o.pod_tuning.slim_decode,
                o.prefill_l2_budget,
            )
        };
        let l2 = vpod_attention::PREFILL_L2_BUDGET;
        assert_eq!(ring("auto-slimr"), (true, SlimDecode::WarpRing, l2));
        assert_eq!(ring("auto-slimrs"), (true, SlimDecode::WarpRing, l2));
        assert_eq!(ring("streams-slimr"), (false, SlimDecode::WarpRing, l2));
        assert_eq!(ring("streams-slim"), (false, SlimDecode::Tiles, l2));
        let shipped = PodTuning::default();
        assert_eq!(ring("auto"), (shipped.slim_streams, shipped.slim_decode, l2));
        assert_eq!(ring("auto-nol2"), (shipped.slim_streams, shipped.slim_decode, 0));
        assert_eq!(ring("auto-noslim"), (false, SlimDecode::Tiles, l2));
        let both = variant_options(&["auto-slim/nol2/ring", "", "", "", "", "", "", "", ""]).unwrap();
        assert_eq!(
            (both.prefill_l2_budget, both.pod_tuning.slim_decode),
            (0, SlimDecode::WarpRing)
        );
        assert!(variant_options(&["auto/l2", "", "", "", "", "", "", "", ""]).is_err());
        // /ring where no slim pair runs would silently change nothing.
        assert!(variant_options(&["auto-noslim/ring", "", "", "", "", "", "", "", ""]).is_err());
        assert!(variant_options(&["streams/ring", "1", "", "4", "2", "1", "1", "1", ""]).is_err());
    }
}
