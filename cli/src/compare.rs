//! `cli compare`: the same workload on several backends, in one process,
//! with the same inputs and the same KV budget. Before timing anything it
//! checks that every backend agrees with the first one (greedy tokens of a
//! fixed set of requests); a backend that disagrees is reported, not timed.
//!
//! Workloads:
//! - `decode-sweep`: batch sizes x context lengths, N generated tokens each:
//!   decode tokens/s and attention time per decode step;
//! - `hybrid-sweep`: prefill chunk sizes x decode batch x contexts: attention
//!   time per hybrid step (decodes and one prefill chunk together);
//! - `serve`: a request trace (lengths and arrival times): throughput, time
//!   to first token and time between tokens (p50 / p99);
//! - `memory`: the most requests each backend runs at once before it must
//!   preempt, for a given `--kv-memory` and request length.

use std::sync::Arc;

use candle_core::{D, DType, Tensor};
use serde_json::{Value, json};
use vpod_attention::BackendOptions;
use vpod_models::LoadedModel;

use crate::engine::{BatchOutput, Engine, Request, Result, StepRecord};
use crate::sampler::SamplingParams;
use crate::scheduler::{Policy, SchedulerConfig};

/// What to run.
#[derive(Debug, Clone, PartialEq)]
pub enum Workload {
    DecodeSweep {
        batches: Vec<usize>,
        contexts: Vec<usize>,
        tokens: usize,
    },
    /// Hybrid steps: `batches` decodes at `contexts` plus one prefill chunk
    /// of each size in `chunks`, from a prompt of `prefill_len` tokens.
    HybridSweep {
        chunks: Vec<usize>,
        batches: Vec<usize>,
        contexts: Vec<usize>,
        prefill_len: usize,
    },
    /// A request trace: (prompt tokens, generated tokens, arrival ms) per request.
    Serve { trace: Vec<(usize, usize, f64)> },
    Memory {
        requests: usize,
        prompt_len: usize,
        max_tokens: usize,
    },
}

#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// Backend specs (`paged:16`, `vattention`, ...); the first is the reference for agreement.
    pub backends: Vec<String>,
    pub workload: Workload,
    /// Cache options shared by every backend (same KV budget).
    pub cache: BackendOptions,
    /// Fault injection for tests: (backend spec, softmax-scale factor).
    pub fault: Option<(String, f32)>,
    /// Check the backends' agreement before timing (`compare`); `bench`
    /// measures one backend and skips it.
    pub check_agreement: bool,
    /// Tensor-parallel ranks 1 .. N-1 beside the model's rank 0 (empty: one
    /// rank); each backend's engine runs them in turn.
    pub ranks: Vec<Arc<vpod_models::Llama>>,
}

/// Deterministic prompt ids in `[1, vocab)`.
/// Sampling of the timed workloads: greedy, and each request runs to its
/// planned length even past an end-of-sequence token (as vLLM's benchmarks
/// do with `ignore_eos`), so that every backend does the same work.
fn timed_sampling() -> SamplingParams {
    SamplingParams {
        ignore_eos: true,
        ..Default::default()
    }
}

pub(crate) fn trace_prompt(len: usize, vocab: usize, salt: usize) -> Vec<u32> {
    (0..len)
        .map(|i| 1 + ((i * 2654435761 + salt * 40503) % (vocab - 1).max(1)) as u32)
        .collect()
}

/// The most sequences a workload runs at once: the virtual cache gets that
/// many slots (vAttention reserves virtual memory for the serving system's
/// largest batch), so that only the KV budget limits admission.
fn concurrency(w: &Workload) -> usize {
    match w {
        Workload::DecodeSweep { batches, .. } => batches.iter().copied().max().unwrap_or(1),
        Workload::HybridSweep { batches, .. } => batches.iter().copied().max().unwrap_or(0) + 1,
        Workload::Serve { .. } => SERVE_MAX_SEQS,
        Workload::Memory { requests, .. } => *requests,
    }
}

/// Concurrent requests of the `serve` workload's scheduler.
const SERVE_MAX_SEQS: usize = 64;

/// Checks that every request of the workload fits the model's context
/// (a request cut short by the context would measure nothing).
fn check_fits_context(w: &Workload, max: usize) -> Result<()> {
    let too_long = |what: String, n: usize| {
        Err(crate::engine::EngineError::BadWorkload(format!(
            "{what} = {n} tokens, more than the model's {max}-token context"
        )))
    };
    match w {
        Workload::DecodeSweep { contexts, tokens, .. } => {
            let c = contexts.iter().copied().max().unwrap_or(0);
            if c + tokens > max {
                return too_long(
                    format!("decode-sweep: context {c} + {tokens} generated"),
                    c + tokens,
                );
            }
        }
        Workload::HybridSweep {
            chunks,
            batches,
            contexts,
            prefill_len,
        } => {
            if *prefill_len > max {
                return too_long("hybrid-sweep: --prefill-len".into(), *prefill_len);
            }
            for &p in chunks {
                for &b in batches {
                    for &c in contexts {
                        let n = c + hybrid_decode_tokens(b, c, p, *prefill_len);
                        if n > max {
                            return too_long(
                                format!(
                                    "hybrid-sweep: chunk {p}, {b} decodes at context {c}: the decodes must outlive the prefills, context + generated"
                                ),
                                n,
                            );
                        }
                    }
                }
            }
        }
        Workload::Serve { .. } | Workload::Memory { .. } => {}
    }
    Ok(())
}

/// Tokens each decoding request of a hybrid-sweep cell generates: b
/// decoders (admitted first), then one prompt of `prefill_len` prefilled p
/// tokens a step while they decode. A step holds one prefill chunk of at
/// least p tokens (budget b + p, decodes take at most b), so every prompt
/// (the decoders' own, then the long one) is prefilled within
/// b * ceil(c / p) + ceil(prefill_len / p) steps: the decoders must still be
/// running then.
fn hybrid_decode_tokens(b: usize, c: usize, p: usize, prefill_len: usize) -> usize {
    let p = p.max(1);
    b * c.div_ceil(p) + prefill_len.div_ceil(p) + 3
}

/// Backend `spec` for the workload: the KV budget is fixed first (the
/// default one, if none was given, is sized by the configured `max_seqs`),
/// then the virtual cache gets a slot per concurrent request.
fn engine(model: &Arc<LoadedModel>, spec: &str, o: &CompareOptions) -> Result<Engine> {
    let mut cache = o.cache.clone();
    let attn = model.model.attn_config(model.config.max_position_embeddings);
    cache.kv_memory = Some(cache.kv_budget_bytes(&attn));
    cache.max_seqs = cache.max_seqs.max(concurrency(&o.workload));
    build(model, spec, cache, o)
}

/// The agreement check's three fixed prompts (short, medium, chunked-prefill long).
fn agreement_prompts(e: &Engine) -> Vec<Vec<u32>> {
    let vocab = e.model.config.vocab_size;
    let max = e.max_seq_len();
    [5usize, 17, 40]
        .iter()
        .enumerate()
        .map(|(i, &n)| trace_prompt(n.min(max - 17), vocab, i))
        .collect()
}

/// Backend `spec` for the agreement check: the cache options as given
/// (three short requests).
fn agreement_engine(model: &Arc<LoadedModel>, spec: &str, o: &CompareOptions) -> Result<Engine> {
    build(model, spec, o.cache.clone(), o)
}

/// Backend `spec` with `cache`, and the test's fault if it names `spec`.
fn build(
    model: &Arc<LoadedModel>,
    spec: &str,
    mut cache: BackendOptions,
    o: &CompareOptions,
) -> Result<Engine> {
    if let Some((b, f)) = &o.fault
        && b == spec
    {
        cache.fault_scale = Some(*f);
    }
    if o.ranks.is_empty() {
        Engine::with_options(model.clone(), spec, &cache)
    } else {
        Engine::with_tensor_parallel(model.clone(), o.ranks.clone(), spec, &cache)
    }
}

/// Greedy tokens of the agreement prompts, 16 each.
fn agreement_run(e: &mut Engine) -> Result<Vec<Vec<u32>>> {
    let reqs: Vec<Request> = agreement_prompts(e)
        .into_iter()
        .map(|p| Request {
            prompt: p,
            max_tokens: 16,
            sampling: SamplingParams::default(),
            arrival_ms: 0.0,
        })
        .collect();
    let cfg = SchedulerConfig {
        policy: Policy::Hybrid { one_prefill: false },
        chunk_size: 24,
        max_seqs: 3,
    };
    Ok(e.run_batch(&reqs, cfg, &mut |_, _| Ok(()))?
        .requests
        .into_iter()
        .map(|r| r.tokens)
        .collect())
}

/// Largest logit difference a backend may show against the first one, as a
/// fraction of the reference row's logit range, in the model's dtype: f32
/// kernels agree to rounding; bf16/f16 activations round at every layer, so
/// two correct kernels summing in different orders drift further apart.
pub fn logit_tolerance(dtype: DType) -> f64 {
    if dtype == DType::F32 { 1e-3 } else { 5e-2 }
}

/// Teacher-forced logits of every agreement sequence (prompt + the first
/// backend's greedy tokens): the prompts prefilled in chunks of 16 and the
/// generated tokens fed as decodes, all sequences in the same steps (the
/// kinds of step the greedy run made: prefill, hybrid, batched decode).
fn forced(e: &mut Engine, seqs: &[Vec<u32>], prompt_lens: &[usize]) -> Result<Vec<Tensor>> {
    e.forced_logits(seqs, prompt_lens, 16)
}

/// The agreement sequences, their prompt lengths, and the first backend's
/// teacher-forced logits of them.
type ForcedRun = (Vec<Vec<u32>>, Vec<usize>, Vec<Tensor>);

/// Positions with the same top-1 that a backend needs, besides the logit
/// tolerance, when its greedy tokens part from the first backend's.
pub const MIN_TOP1: f64 = 0.9;

/// (largest logit difference / the reference row's range, fraction of
/// positions with the same top-1) over all sequences; a non-finite logit
/// of the candidate makes the difference infinite.
pub fn logit_agreement(want: &[Tensor], got: &[Tensor]) -> Result<(f64, f64)> {
    let (mut worst, mut same, mut rows) = (0f64, 0usize, 0usize);
    for (w, g) in want.iter().zip(got) {
        if !g.sum_all()?.to_scalar::<f32>()?.is_finite() {
            worst = f64::INFINITY;
        }
        let diff = (w - g)?.abs()?.max(D::Minus1)?;
        let range = (w.max(D::Minus1)? - w.min(D::Minus1)?)?;
        let ratio = diff.div(&range)?.max(0)?.to_scalar::<f32>()?;
        worst = if ratio.is_nan() {
            f64::INFINITY
        } else {
            worst.max(ratio as f64)
        };
        let (a, b) = (
            w.argmax(D::Minus1)?.to_vec1::<u32>()?,
            g.argmax(D::Minus1)?.to_vec1::<u32>()?,
        );
        same += a.iter().zip(&b).filter(|(x, y)| x == y).count();
        rows += a.len();
    }
    Ok((worst, same as f64 / rows.max(1) as f64))
}

/// Runs the comparison; `progress(message)` is called as each agreement
/// check and each cell completes ([`progress_steps`] times in all when every
/// backend agrees).
pub fn compare(
    model: &Arc<LoadedModel>,
    o: &CompareOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Value> {
    check_fits_context(&o.workload, model.config.max_position_embeddings)?;
    let mut reference: Option<Vec<Vec<u32>>> = None;
    // The first backend's teacher-forced logits, made when a backend's greedy
    // tokens first differ: (sequences, logits).
    let mut reference_logits: Option<ForcedRun> = None;
    let tolerance = logit_tolerance(model.model.dtype());
    let mut rows = Vec::new();
    for spec in &o.backends {
        if !o.check_agreement {
            let mut e = engine(model, spec, o)?;
            let results = run(&mut e, &o.workload, spec, progress)?;
            rows.push(json!({ "backend": spec, "agrees": Value::Null, "results": results }));
            continue;
        }
        // The agreement check runs with the default (ample) KV budget, so
        // that a tight --kv-memory for the memory workload does not refuse it.
        let ample = CompareOptions {
            cache: BackendOptions {
                kv_memory: None,
                ..o.cache.clone()
            },
            ..o.clone()
        };
        let mut candidate = agreement_engine(model, spec, &ample)?;
        let tokens = agreement_run(&mut candidate)?;
        let (disagreement, agreement) = match &reference {
            None => {
                reference = Some(tokens);
                (None, json!({ "greedy_tokens": "reference" }))
            }
            Some(r) => match first_difference(r, &tokens) {
                None => (None, json!({ "greedy_tokens": "identical" })),
                // Greedy tokens part at a near tie unless the logits say
                // otherwise: compare them, teacher-forced on the first
                // backend's sequences, within the dtype's tolerance.
                Some(d) => {
                    if reference_logits.is_none() {
                        let mut first = agreement_engine(model, &o.backends[0], &ample)?;
                        let prompts = agreement_prompts(&first);
                        let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
                        let seqs: Vec<Vec<u32>> = prompts
                            .into_iter()
                            .zip(r)
                            .map(|(p, t)| [p, t.clone()].concat())
                            .collect();
                        let logits = forced(&mut first, &seqs, &lens)?;
                        reference_logits = Some((seqs, lens, logits));
                    }
                    let (seqs, lens, want) = reference_logits.as_ref().expect("made above");
                    let got = forced(&mut candidate, seqs, lens)?;
                    let (worst, top1) = logit_agreement(want, &got)?;
                    let a = json!({
                        "greedy_tokens": d,
                        "max_logit_diff_of_range": worst,
                        "tolerance": tolerance,
                        "teacher_forced_top1": top1,
                    });
                    if worst <= tolerance && top1 >= MIN_TOP1 {
                        (None, a)
                    } else {
                        let why = format!(
                            "{d}; teacher-forced logits differ by {:.2} % of their range (tolerance {:.2} %), the same top-1 at {:.1} % of positions (at least {:.0} % needed)",
                            worst * 100.0,
                            tolerance * 100.0,
                            top1 * 100.0,
                            MIN_TOP1 * 100.0
                        );
                        (Some(why), a)
                    }
                }
            },
        };
        drop(candidate);
        progress(&format!(
            "{spec}: agreement {}",
            if disagreement.is_none() { "ok" } else { "FAILED" }
        ));
        if let Some(d) = disagreement {
            rows.push(json!({ "backend": spec, "agrees": false, "disagreement": d, "agreement": agreement, "results": Value::Null }));
            continue;
        }
        let mut e = engine(model, spec, o)?;
        let results = run(&mut e, &o.workload, spec, progress)?;
        rows.push(json!({ "backend": spec, "agrees": true, "agreement": agreement, "results": results }));
    }
    Ok(Value::Array(rows))
}

fn run(e: &mut Engine, w: &Workload, spec: &str, progress: &mut dyn FnMut(&str)) -> Result<Value> {
    match w {
        Workload::DecodeSweep {
            batches,
            contexts,
            tokens,
        } => decode_sweep(e, batches, contexts, *tokens, spec, progress),
        Workload::HybridSweep {
            chunks,
            batches,
            contexts,
            prefill_len,
        } => hybrid_sweep(e, chunks, batches, contexts, *prefill_len, spec, progress),
        Workload::Serve { trace } => {
            let r = serve(e, trace)?;
            progress(&format!("{spec}: {} requests served", trace.len()));
            Ok(r)
        }
        Workload::Memory {
            requests,
            prompt_len,
            max_tokens,
        } => {
            let r = memory(e, *requests, *prompt_len, *max_tokens)?;
            progress(&format!("{spec}: memory run"));
            Ok(r)
        }
    }
}

/// How many times [`compare`] calls `progress`: one agreement check (when
/// on) and one per measured cell, for each backend.
pub fn progress_steps(o: &CompareOptions) -> usize {
    let cells = match &o.workload {
        Workload::DecodeSweep {
            batches, contexts, ..
        } => batches.len() * contexts.len(),
        Workload::HybridSweep {
            chunks,
            batches,
            contexts,
            ..
        } => chunks.len() * batches.len() * contexts.len(),
        Workload::Serve { .. } | Workload::Memory { .. } => 1,
    };
    o.backends.len() * (cells + usize::from(o.check_agreement))
}

/// The mean of `f` over `steps` (None, written as null, when no step ran).
fn mean(steps: &[&StepRecord], f: impl Fn(&StepRecord) -> f64) -> Option<f64> {
    (!steps.is_empty()).then(|| steps.iter().map(|s| f(s)).sum::<f64>() / steps.len() as f64)
}

/// p50 / p90 / p99 of `v` (nulls when empty).
fn spread(v: impl Iterator<Item = f64>) -> Value {
    let mut v: Vec<f64> = v.collect();
    if v.is_empty() {
        return json!({"p50": null, "p90": null, "p99": null});
    }
    json!({"p50": percentile(&mut v, 0.5), "p90": percentile(&mut v, 0.9), "p99": percentile(&mut v, 0.99)})
}

fn first_difference(want: &[Vec<u32>], got: &[Vec<u32>]) -> Option<String> {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        if let Some(j) = (0..w.len().max(g.len())).find(|&j| w.get(j) != g.get(j)) {
            return Some(format!(
                "request {i}, token {j}: {:?} where the first backend produced {:?}",
                g.get(j),
                w.get(j)
            ));
        }
    }
    None
}

/// `run_batch` with the attention calls timed (timing events on a GPU), so
/// that each step record carries its attention time.
fn profiled_run(e: &mut Engine, reqs: &[Request], cfg: SchedulerConfig) -> Result<BatchOutput> {
    e.profile_attention = true;
    let out = e.run_batch(reqs, cfg, &mut |_, _| Ok(()));
    e.profile_attention = false;
    out
}

fn decode_sweep(
    e: &mut Engine,
    batches: &[usize],
    contexts: &[usize],
    tokens: usize,
    spec: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Value> {
    let vocab = e.model.config.vocab_size;
    let mut cells = Vec::new();
    for &b in batches {
        for &c in contexts {
            let reqs: Vec<Request> = (0..b)
                .map(|i| Request {
                    prompt: trace_prompt(c, vocab, i),
                    max_tokens: tokens,
                    sampling: timed_sampling(),
                    arrival_ms: 0.0,
                })
                .collect();
            // Every prompt is prefilled (whole, up to 8K tokens a step) before
            // the first decode step, so each decode step holds all b requests.
            let cfg = SchedulerConfig {
                policy: Policy::PrefillFirst,
                chunk_size: c.max(8192),
                max_seqs: b,
            };
            let out = profiled_run(e, &reqs, cfg)?;
            let decode: Vec<_> = out
                .steps
                .iter()
                .filter(|s| s.prefill_tokens == 0 && s.decodes > 0)
                .collect();
            let (n, ms): (usize, f64) = decode
                .iter()
                .fold((0, 0.0), |(n, t), s| (n + s.decodes, t + s.ms));
            let attn = mean(&decode, |s| s.attention_ms);
            let step = mean(&decode, |s| s.ms);
            cells.push(json!({
                "batch": b,
                "context": c,
                "generated": tokens,
                "decode_steps": decode.len(),
                "decode_tokens_per_s": (ms > 0.0).then(|| n as f64 / (ms / 1e3)),
                "step_ms": step,
                "attention_ms_per_step": attn,
                "step_ms_percentiles": spread(decode.iter().map(|s| s.ms)),
                "attention_ms_percentiles": spread(decode.iter().map(|s| s.attention_ms)),
                "preemptions": out.requests.iter().map(|r| r.preemptions).sum::<usize>(),
            }));
            progress(&format!("{spec}: batch {b}, context {c}"));
        }
    }
    Ok(Value::Array(cells))
}

fn hybrid_sweep(
    e: &mut Engine,
    chunks: &[usize],
    batches: &[usize],
    contexts: &[usize],
    prefill_len: usize,
    spec: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Value> {
    let vocab = e.model.config.vocab_size;
    let mut cells = Vec::new();
    for &p in chunks {
        for &b in batches {
            for &c in contexts {
                // b decoding requests (admitted first), then one long prompt
                // prefilled p tokens a step while they decode.
                let mut reqs: Vec<Request> = (0..b)
                    .map(|i| Request {
                        prompt: trace_prompt(c, vocab, i),
                        max_tokens: hybrid_decode_tokens(b, c, p, prefill_len),
                        sampling: timed_sampling(),
                        arrival_ms: 0.0,
                    })
                    .collect();
                reqs.push(Request {
                    prompt: trace_prompt(prefill_len, vocab, 99),
                    max_tokens: 1,
                    sampling: timed_sampling(),
                    arrival_ms: 0.0,
                });
                let cfg = SchedulerConfig {
                    policy: Policy::Hybrid { one_prefill: true },
                    chunk_size: b + p,
                    max_seqs: b + 1,
                };
                let out = profiled_run(e, &reqs, cfg)?;
                let hybrid: Vec<_> = out
                    .steps
                    .iter()
                    .filter(|s| s.decodes == b && s.prefill_tokens > 0 && s.prefill_chunks == 1)
                    .collect();
                // Means over the hybrid steps (null when none ran).
                let attn = mean(&hybrid, |s| s.attention_ms);
                let step = mean(&hybrid, |s| s.ms);
                // How the backend ran them (`pod` on a GPU: fused or serial, and why).
                let mut paths = serde_json::Map::new();
                for s in &hybrid {
                    if let Some(p) = &s.attention_path {
                        let n = paths.entry(p.clone()).or_insert(json!(0));
                        *n = json!(n.as_u64().unwrap_or(0) + 1);
                    }
                }
                cells.push(json!({
                    "chunk": p,
                    "batch": b,
                    "context": c,
                    "hybrid_steps": hybrid.len(),
                    "attention_ms_per_step": attn,
                    "step_ms": step,
                    "step_ms_percentiles": spread(hybrid.iter().map(|s| s.ms)),
                    "attention_ms_percentiles": spread(hybrid.iter().map(|s| s.attention_ms)),
                    "attention_paths": paths,
                }));
                progress(&format!("{spec}: chunk {p}, batch {b}, context {c}"));
            }
        }
    }
    Ok(Value::Array(cells))
}

/// Synthetic trace: `n` requests with lengths uniform in [mean/2, 3 mean/2],
/// arriving as a Poisson process of `rate` requests/s (all at once if 0).
pub fn synthetic_trace(
    n: usize,
    prompt_mean: usize,
    output_mean: usize,
    rate: f64,
    seed: u64,
) -> Vec<(usize, usize, f64)> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    };
    let mut t = 0.0;
    (0..n)
        .map(|_| {
            let around = |mean: usize, u: f64| ((mean as f64) * (0.5 + u)).round().max(1.0) as usize;
            let p = around(prompt_mean, uniform());
            let o = around(output_mean, uniform());
            if rate > 0.0 {
                t += -uniform().ln() / rate * 1e3;
            }
            (p, o, t)
        })
        .collect()
}

/// Reads a trace CSV: `prompt_tokens,output_tokens[,arrival_ms]` per line
/// (a header line and blank lines are skipped).
pub fn read_trace(text: &str) -> std::result::Result<Vec<(usize, usize, f64)>, String> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        if line.trim().is_empty() || (n == 0 && f[0].parse::<usize>().is_err()) {
            continue;
        }
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
        match (num(0), num(1)) {
            (Some(p), Some(o)) if p >= 1.0 => out.push((p as usize, o as usize, num(2).unwrap_or(0.0))),
            _ => {
                return Err(format!(
                    "line {}: expected prompt_tokens,output_tokens[,arrival_ms]: {line:?}",
                    n + 1
                ));
            }
        }
    }
    if out.is_empty() {
        return Err("the trace holds no requests".into());
    }
    Ok(out)
}

pub(crate) fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn serve(e: &mut Engine, trace: &[(usize, usize, f64)]) -> Result<Value> {
    let vocab = e.model.config.vocab_size;
    let max = e.max_seq_len();
    let reqs: Vec<Request> = trace
        .iter()
        .enumerate()
        .map(|(i, &(p, o, at))| Request {
            prompt: trace_prompt(p.min(max), vocab, i),
            max_tokens: o,
            sampling: timed_sampling(),
            arrival_ms: at,
        })
        .collect();
    let cfg = SchedulerConfig {
        policy: Policy::Hybrid { one_prefill: false },
        chunk_size: 512,
        max_seqs: SERVE_MAX_SEQS,
    };
    let t = std::time::Instant::now();
    let out = e.run_batch(&reqs, cfg, &mut |_, _| Ok(()))?;
    let wall = t.elapsed().as_secs_f64();
    let generated: usize = out.requests.iter().map(|r| r.tokens.len()).sum();
    let mut ttft: Vec<f64> = out.requests.iter().map(|r| r.ttft_ms).collect();
    let mut tbt: Vec<f64> = out
        .requests
        .iter()
        .flat_map(|r| r.tbt_ms.iter().copied())
        .collect();
    let mut e2e: Vec<f64> = out.requests.iter().map(|r| r.e2e_ms).collect();
    Ok(json!({
        "requests": reqs.len(),
        "generated_tokens": generated,
        "wall_s": wall,
        "tokens_per_s": generated as f64 / wall.max(1e-9),
        "requests_per_min": reqs.len() as f64 / wall.max(1e-9) * 60.0,
        "ttft_ms_p50": percentile(&mut ttft, 0.5),
        "ttft_ms_p99": percentile(&mut ttft, 0.99),
        "tbt_ms_p50": percentile(&mut tbt, 0.5),
        "tbt_ms_p99": percentile(&mut tbt, 0.99),
        "e2e_ms_p50": percentile(&mut e2e, 0.5),
        "preemptions": out.requests.iter().map(|r| r.preemptions).sum::<usize>(),
    }))
}

fn memory(e: &mut Engine, requests: usize, prompt_len: usize, max_tokens: usize) -> Result<Value> {
    let vocab = e.model.config.vocab_size;
    let reqs: Vec<Request> = (0..requests)
        .map(|i| Request {
            prompt: trace_prompt(prompt_len, vocab, i),
            max_tokens,
            sampling: timed_sampling(),
            arrival_ms: 0.0,
        })
        .collect();
    let cfg = SchedulerConfig {
        policy: Policy::Hybrid { one_prefill: false },
        chunk_size: 1 << 20,
        max_seqs: requests,
    };
    let out = e.run_batch(&reqs, cfg, &mut |_, _| Ok(()))?;
    // Concurrency reached before the first preemption (all of the run if none).
    let before: Vec<_> = out.steps.iter().take_while(|s| s.preempted == 0).collect();
    let max_running = before.iter().map(|s| s.running).max().unwrap_or(0);
    let preemptions: usize = out.requests.iter().map(|r| r.preemptions).sum();
    Ok(json!({
        "requests": requests,
        "prompt_len": prompt_len,
        "max_tokens": max_tokens,
        "max_concurrent_before_preemption": max_running,
        "preemptions": preemptions,
        "steps": out.steps.len(),
    }))
}

/// A plain-text table of a comparison's rows.
pub fn table(rows: &Value) -> String {
    let mut out = String::new();
    for row in rows.as_array().into_iter().flatten() {
        let backend = row["backend"].as_str().unwrap_or("?");
        if row["agrees"] == false {
            out += &format!(
                "{backend:<12} DISAGREES with the first backend ({}): not timed\n",
                row["disagreement"]
            );
            continue;
        }
        if let Some(w) = row["agreement"]["max_logit_diff_of_range"].as_f64() {
            out += &format!(
                "{backend:<12} greedy tokens part at a near tie ({}); teacher-forced logits within {:.2} % of their range (tolerance {:.2} %)\n",
                row["agreement"]["greedy_tokens"].as_str().unwrap_or("?"),
                w * 100.0,
                row["agreement"]["tolerance"].as_f64().unwrap_or(0.0) * 100.0
            );
        }
        match &row["results"] {
            Value::Array(cells) if cells.first().is_some_and(|c| c.get("chunk").is_some()) => {
                for c in cells {
                    if c["hybrid_steps"] == 0 {
                        out += &format!(
                            "{backend:<12} chunk {:>5} + {:>3} decodes ctx {:>6}  no hybrid step of this shape ran\n",
                            c["chunk"], c["batch"], c["context"]
                        );
                        continue;
                    }
                    out += &format!(
                        "{backend:<12} chunk {:>5} + {:>3} decodes ctx {:>6}  step {:>8.3} ms (p99 {:>8.3})  attention {:>8.3} ms/step ({} steps)\n",
                        c["chunk"],
                        c["batch"],
                        c["context"],
                        c["step_ms"].as_f64().unwrap_or(0.0),
                        c["step_ms_percentiles"]["p99"].as_f64().unwrap_or(0.0),
                        c["attention_ms_per_step"].as_f64().unwrap_or(0.0),
                        c["hybrid_steps"]
                    );
                }
            }
            Value::Array(cells) => {
                for c in cells {
                    if c["decode_steps"] == 0 {
                        out += &format!(
                            "{backend:<12} batch {:>3} ctx {:>6}  no decode step ran (--tokens 1?)\n",
                            c["batch"], c["context"]
                        );
                        continue;
                    }
                    out += &format!(
                        "{backend:<12} batch {:>3} ctx {:>6}  {:>9.1} tok/s  step {:>8.3} ms (p99 {:>8.3})  attention {:>8.3} ms/step\n",
                        c["batch"],
                        c["context"],
                        c["decode_tokens_per_s"].as_f64().unwrap_or(0.0),
                        c["step_ms"].as_f64().unwrap_or(0.0),
                        c["step_ms_percentiles"]["p99"].as_f64().unwrap_or(0.0),
                        c["attention_ms_per_step"].as_f64().unwrap_or(0.0)
                    );
                }
            }
            r if r.get("ttft_ms_p50").is_some() => {
                out += &format!(
                    "{backend:<12} {} requests: {:.1} tok/s, {:.1} req/min, TTFT p50 {:.1} / p99 {:.1} ms, TBT p50 {:.2} / p99 {:.2} ms\n",
                    r["requests"],
                    r["tokens_per_s"].as_f64().unwrap_or(0.0),
                    r["requests_per_min"].as_f64().unwrap_or(0.0),
                    r["ttft_ms_p50"].as_f64().unwrap_or(0.0),
                    r["ttft_ms_p99"].as_f64().unwrap_or(0.0),
                    r["tbt_ms_p50"].as_f64().unwrap_or(0.0),
                    r["tbt_ms_p99"].as_f64().unwrap_or(0.0)
                );
            }
            r => {
                out += &format!(
                    "{backend:<12} {} requests of {}+{} tokens: {} at once before preempting ({} preemptions)\n",
                    r["requests"],
                    r["prompt_len"],
                    r["max_tokens"],
                    r["max_concurrent_before_preemption"],
                    r["preemptions"]
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn logit_agreement_is_relative_to_the_row_range() {
        let d = Device::Cpu;
        let want = Tensor::new(&[[0f32, 10.0, 5.0], [1.0, 2.0, 3.0]], &d).unwrap();
        // Row 0 off by 0.5 of a range of 10; row 1 top-1 moves.
        let got = Tensor::new(&[[0f32, 9.5, 5.0], [1.0, 3.1, 3.0]], &d).unwrap();
        let (worst, top1) = logit_agreement(std::slice::from_ref(&want), &[got]).unwrap();
        assert!((worst - 0.55).abs() < 1e-6, "row 1: 1.1 of a range of 2: {worst}");
        assert_eq!(top1, 0.5);
        assert_eq!(
            logit_agreement(std::slice::from_ref(&want), std::slice::from_ref(&want)).unwrap(),
            (0.0, 1.0)
        );
        assert!(logit_tolerance(DType::BF16) > logit_tolerance(DType::F32));
        // A candidate with a NaN logit never agrees.
        let nan = Tensor::new(&[[0f32, f32::NAN, 5.0], [1.0, 2.0, 3.0]], &d).unwrap();
        let (worst, _) = logit_agreement(std::slice::from_ref(&want), &[nan]).unwrap();
        assert!(worst.is_infinite());
        assert_eq!(
            hybrid_decode_tokens(16, 256, 2048, 4096),
            16 + 2 + 3,
            "one chunk a step"
        );
    }
}
