//! The engine: a loaded model, one attention backend (with its KV cache),
//! and the loops that drive them, generation and teacher-forced scoring.
//!
//! Every model call goes through [`Engine::step`], which builds the step's
//! [`BatchMeta`] once and runs the packed batch; the scheduler of the serving
//! engine drives the same call with many sequences.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use candle_core::{D, DType, Tensor};
use vpod_attention::{
    AttentionBackend, AttentionStep, BackendOptions, BatchMeta, LogitsAt, SeqChunk, SeqId, create_backend,
};
use vpod_models::LoadedModel;

use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::{Plan, Policy, Scheduler, SchedulerConfig, SeqState};

/// Errors of running requests.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("the prompt is empty (no tokens after tokenization)")]
    EmptyPrompt,
    #[error("the prompt has {prompt} tokens but the context holds {limit} (max_position_embeddings{note})")]
    PromptTooLong {
        prompt: usize,
        limit: usize,
        note: &'static str,
    },
    #[error("need at least 2 tokens to score, got {0}")]
    TooFewTokens(usize),
    #[error(
        "the KV cache holds {total} tokens ({usable} usable by one request, in whole blocks or pages after the 1 % \
         reserve) but request {request} needs {needed}: raise --kv-memory or lower --max-tokens"
    )]
    KvTooSmall {
        request: usize,
        needed: usize,
        total: usize,
        usable: usize,
    },
    #[error("{0}")]
    BadWorkload(String),
    #[error("the scheduler made no progress with {waiting} waiting and {running} running sequences")]
    Stalled { waiting: usize, running: usize },
    #[error(transparent)]
    Model(#[from] vpod_models::ModelError),
    #[error(transparent)]
    Attention(#[from] vpod_attention::AttnError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, EngineError>;

/// Why generation stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token (not included in the output).
    Eos,
    /// `max_tokens` were generated.
    Length,
    /// The sequence reached the model's context length.
    ContextFull,
}

/// The result of one generation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Time to the first token: the prefill step, including its sampling.
    pub prefill_ms: f64,
    /// First token to last token.
    pub decode_ms: f64,
    /// Decode steps that produced a returned token (generated tokens after the first).
    pub decode_steps: usize,
}

impl Generation {
    pub fn decode_tokens_per_s(&self) -> f64 {
        if self.decode_ms > 0.0 {
            self.decode_steps as f64 / (self.decode_ms / 1e3)
        } else {
            0.0
        }
    }
}

/// Teacher-forced negative log-likelihood of a token sequence.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Score {
    /// Mean NLL (nats) over the predicted tokens.
    pub nll: f64,
    pub ppl: f64,
    /// Tokens scored in total (BOS included).
    pub tokens: usize,
    /// Tokens predicted (`tokens - windows`).
    pub predicted: usize,
    /// Independent context windows the tokens were split into.
    pub windows: usize,
    pub elapsed_ms: f64,
}

/// One request of a batch.
#[derive(Debug, Clone)]
pub struct Request {
    /// Token ids, BOS included when wanted.
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// When the request arrives, in ms after the start of the run (0: at once).
    pub arrival_ms: f64,
}

/// What became of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestOutput {
    pub prompt_tokens: usize,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Time to first token, from the request's arrival.
    pub ttft_ms: f64,
    /// Times between consecutive tokens.
    pub tbt_ms: Vec<f64>,
    /// Arrival to the last token.
    pub e2e_ms: f64,
    pub preemptions: usize,
}

/// One engine step.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    /// Sequences admitted (running) during the step.
    pub running: usize,
    /// Time in attention calls, when [`Engine::profile_attention`] is on (on
    /// a GPU: the device's time between events around each call).
    pub attention_ms: f64,
    pub decodes: usize,
    pub prefill_chunks: usize,
    pub prefill_tokens: usize,
    pub preempted: usize,
    pub ms: f64,
    /// Of `ms`: queuing the step's forward and preparing the next step's KV
    /// pages (the device computes meanwhile) ...
    pub queued_ms: f64,
    /// ... waiting for the step's tokens (or logits) to reach the host ...
    pub wait_ms: f64,
    /// ... and the host alone (scheduling, sampling, bookkeeping), while the
    /// device has nothing queued.
    pub host_ms: f64,
    /// How the backend ran the step's attention, when it chooses per step
    /// (`pod` on a GPU: fused, or serial and why).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_path: Option<String>,
}

/// The outputs of [`Engine::run_batch`], in request order, and its steps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchOutput {
    pub requests: Vec<RequestOutput>,
    pub steps: Vec<StepRecord>,
}

/// A request in flight.
struct Live {
    request: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    times: Vec<f64>,
    preemptions: usize,
    /// ms after the start of the run.
    arrival: f64,
}

/// The state of one `run_batch`.
struct Run {
    scheduler: Scheduler,
    live: HashMap<SeqId, Live>,
    outputs: Vec<Option<RequestOutput>>,
    steps: Vec<StepRecord>,
    /// Requests not arrived yet, by arrival time.
    pending: std::collections::VecDeque<(f64, SeqState)>,
    start: Instant,
}

/// A step's results on the host: every row's greedy token, picked on the
/// logits' device (4 bytes a row come over), or, when some request samples,
/// the logits themselves (a 128K vocabulary is 0.5 MB a row).
enum Picked {
    Tokens(Vec<u32>),
    Logits(Vec<Vec<f32>>),
}

impl Picked {
    /// One copy to the host (this waits for the step). A row at a time
    /// would copy the whole tensor per row: candle's `to_vec1` of a row view
    /// brings its entire storage over.
    fn new(logits: &Tensor, all_greedy: bool) -> Result<Self> {
        Ok(if all_greedy {
            Self::Tokens(vpod_attention::sample::argmax_rows(logits)?.to_vec1::<u32>()?)
        } else {
            Self::Logits(logits.to_vec2::<f32>()?)
        })
    }

    fn rows(&self) -> usize {
        match self {
            Self::Tokens(t) => t.len(),
            Self::Logits(l) => l.len(),
        }
    }
}

/// A model (shareable between engines) plus one attention backend.
#[derive(Debug)]
pub struct Engine {
    pub model: Arc<LoadedModel>,
    backend: Box<dyn AttentionBackend>,
    next_seq: SeqId,
    /// Longest sequence a request may reach (the model's context).
    max_seq_len: usize,
    /// Time attention calls and put the total in each [`StepRecord`] (on a
    /// GPU with timing events, without synchronising the device).
    pub profile_attention: bool,
    attention_time: AttentionTimes,
}

/// Forwards to a backend and adds up the time its calls take: on a CUDA
/// device by a pair of timing events around each call on the device's
/// stream (nothing waits; [`AttentionTimes::take_ms`] reads them once the
/// step's results are on the host), elsewhere by the host clock.
#[derive(Debug)]
struct Timed<'a> {
    inner: &'a mut dyn AttentionBackend,
    device: candle_core::Device,
    times: &'a mut AttentionTimes,
}

/// The attention time of the step in flight.
#[derive(Debug, Default)]
struct AttentionTimes {
    host: Duration,
    #[cfg(feature = "cuda")]
    events: Vec<(
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
        candle_core::cuda_backend::cudarc::driver::CudaEvent,
    )>,
}

impl AttentionTimes {
    /// The step's total in ms (waits for its events: call after the step's
    /// results have arrived, when they are all complete), and resets.
    fn take_ms(&mut self) -> Result<f64> {
        #[allow(unused_mut)]
        let mut ms = std::mem::take(&mut self.host).as_secs_f64() * 1e3;
        #[cfg(feature = "cuda")]
        for (a, b) in self.events.drain(..) {
            ms += a.elapsed_ms(&b).map_err(event_err)? as f64;
        }
        Ok(ms)
    }
}

#[cfg(feature = "cuda")]
fn event_err(e: impl std::fmt::Debug) -> candle_core::Error {
    candle_core::Error::Msg(format!("CUDA event: {e:?}"))
}

impl AttentionBackend for Timed<'_> {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn forward(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        meta: &BatchMeta,
    ) -> vpod_attention::Result<Tensor> {
        #[cfg(feature = "cuda")]
        if let candle_core::Device::Cuda(dev) = &self.device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
            let stream = dev.cuda_stream();
            let event = || {
                stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(event_err)
            };
            let start = event()?;
            let out = self.inner.forward(layer, q, k, v, meta)?;
            self.times.events.push((start, event()?));
            return Ok(out);
        }
        self.device.synchronize()?;
        let t = Instant::now();
        let out = self.inner.forward(layer, q, k, v, meta)?;
        self.device.synchronize()?;
        self.times.host += t.elapsed();
        Ok(out)
    }

    fn release(&mut self, seq: SeqId) {
        self.inner.release(seq)
    }
}

impl Engine {
    /// Builds backend `backend` for this model (or says why it cannot run here).
    pub fn new(model: impl Into<Arc<LoadedModel>>, backend: &str) -> Result<Self> {
        Self::with_options(model, backend, &BackendOptions::default())
    }

    /// As [`Self::new`], with the cache's block/page size and KV budget.
    pub fn with_options(
        model: impl Into<Arc<LoadedModel>>,
        backend: &str,
        opts: &BackendOptions,
    ) -> Result<Self> {
        let model = model.into();
        let max_seq_len = model.config.max_position_embeddings;
        let cfg = model.model.attn_config(max_seq_len);
        let backend = create_backend(backend, &cfg, model.model.device(), opts)?;
        Ok(Self {
            model,
            backend,
            next_seq: 0,
            max_seq_len,
            profile_attention: false,
            attention_time: AttentionTimes::default(),
        })
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    /// Runs one packed batch: `chunks[i]` describes sequence i's share and
    /// `tokens` holds all their new tokens in the same order. Returns f32
    /// logits `[rows, vocab]` as `logits` asks.
    pub fn step(&mut self, chunks: Vec<SeqChunk>, tokens: &[u32], logits: LogitsAt) -> Result<Tensor> {
        let device = self.model.model.device().clone();
        let meta = BatchMeta::new(chunks, logits, &device)?;
        let tokens = Tensor::new(tokens, &device)?;
        if self.profile_attention {
            let mut timed = Timed {
                inner: self.backend.as_mut(),
                device,
                times: &mut self.attention_time,
            };
            let mut attn = AttentionStep::new(&mut timed, &meta);
            return Ok(self.model.model.forward(&tokens, &mut attn)?);
        }
        let mut attn = AttentionStep::new(self.backend.as_mut(), &meta);
        Ok(self.model.model.forward(&tokens, &mut attn)?)
    }

    /// Runs `requests` to completion as one batch under `sched`, calling
    /// `on_token(request, id)` for every generated token.
    pub fn run_batch(
        &mut self,
        requests: &[Request],
        sched: SchedulerConfig,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<BatchOutput> {
        for (i, r) in requests.iter().enumerate() {
            if r.prompt.is_empty() {
                return Err(EngineError::EmptyPrompt);
            }
            if r.prompt.len() > self.max_seq_len {
                return Err(EngineError::PromptTooLong {
                    prompt: r.prompt.len(),
                    limit: self.max_seq_len,
                    note: "",
                });
            }
            self.check_fits(i, (r.prompt.len() + r.max_tokens).min(self.max_seq_len))?;
        }
        let mut run = Run {
            scheduler: Scheduler::new(sched),
            live: HashMap::new(),
            outputs: vec![None; requests.len()],
            steps: Vec::new(),
            pending: Default::default(),
            start: Instant::now(),
        };
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by(|&a, &b| requests[a].arrival_ms.total_cmp(&requests[b].arrival_ms));
        for i in order {
            let r = &requests[i];
            let id = self.new_seq();
            if r.max_tokens == 0 {
                run.outputs[i] = Some(finished(
                    r.prompt.len(),
                    vec![],
                    FinishReason::Length,
                    &[],
                    0,
                    0.0,
                ));
                continue;
            }
            run.pending.push_back((
                r.arrival_ms.max(0.0),
                SeqState {
                    id,
                    len: r.prompt.len(),
                    computed: 0,
                },
            ));
            let l = Live {
                request: i,
                tokens: r.prompt.clone(),
                prompt_len: r.prompt.len(),
                max_tokens: r.max_tokens,
                sampler: Sampler::new(r.sampling),
                times: vec![],
                preemptions: 0,
                arrival: r.arrival_ms.max(0.0),
            };
            run.live.insert(id, l);
        }
        if let Err(e) = self.drive(&mut run, on_token) {
            // Leave the cache as we found it: free every sequence still in flight.
            for id in run.live.keys() {
                self.backend.release(*id);
            }
            return Err(e);
        }
        let (outputs, steps) = (run.outputs, run.steps);
        let requests = outputs
            .into_iter()
            .map(|o| {
                o.ok_or(EngineError::Stalled {
                    waiting: 0,
                    running: 0,
                })
            })
            .collect::<Result<_>>()?;
        Ok(BatchOutput { requests, steps })
    }

    /// Steps the scheduler until every request is done, letting requests
    /// in as they arrive.
    fn drive(&mut self, run: &mut Run, on_token: &mut dyn FnMut(usize, u32) -> Result<()>) -> Result<()> {
        let Run {
            scheduler,
            live,
            outputs,
            steps,
            pending,
            start,
        } = run;
        let start = *start;
        loop {
            let now = start.elapsed().as_secs_f64() * 1e3;
            while pending.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, s)) = pending.pop_front() {
                    scheduler.add(s);
                }
            }
            if scheduler.is_idle() {
                match pending.front() {
                    None => break,
                    Some((at, _)) => {
                        std::thread::sleep(Duration::from_secs_f64((at - now).max(0.0) / 1e3));
                        continue;
                    }
                }
            }
            let t0 = Instant::now();
            let Plan { chunks, preempted } = scheduler.schedule(self.backend.kv_manager());
            for id in &preempted {
                if let Some(l) = live.get_mut(id) {
                    l.preemptions += 1;
                }
            }
            if chunks.is_empty() {
                return Err(EngineError::Stalled {
                    waiting: scheduler.waiting.len(),
                    running: scheduler.running.len(),
                });
            }
            let tokens: Vec<u32> = chunks
                .iter()
                .flat_map(|c| {
                    live[&c.seq_id].tokens[c.context_len..c.context_len + c.query_len]
                        .iter()
                        .copied()
                })
                .collect();
            let t_queue = Instant::now();
            let logits = self.step(chunks.clone(), &tokens, LogitsAt::LastToken)?;
            // While the GPU runs this step: each sequence's length after the
            // next one (a decode, or the next prompt chunk), so that a
            // backend can map KV pages off the critical path.
            let next: Vec<(SeqId, usize)> = chunks
                .iter()
                .map(|c| {
                    let done = c.seq_len();
                    let len = live.get(&c.seq_id).map_or(done, |l| l.tokens.len());
                    let next_chunk = if done >= len {
                        1
                    } else {
                        (len - done).min(scheduler.config().chunk_size.max(1))
                    };
                    (c.seq_id, done + next_chunk)
                })
                .collect();
            self.backend.prepare_next(&next)?;
            let t_wait = Instant::now();
            let picked = Picked::new(
                &logits,
                chunks
                    .iter()
                    .all(|c| live.get(&c.seq_id).is_none_or(|l| l.sampler.is_greedy())),
            )?;
            let (queued_ms, wait_ms) = (
                (t_wait - t_queue).as_secs_f64() * 1e3,
                t_wait.elapsed().as_secs_f64() * 1e3,
            );
            if picked.rows() != chunks.len() {
                return Err(EngineError::Candle(candle_core::Error::Msg(format!(
                    "the model returned {} logit rows for a step of {} sequences",
                    picked.rows(),
                    chunks.len()
                ))));
            }
            let now = start.elapsed().as_secs_f64() * 1e3;
            let mut finished_now = 0;
            for (row, c) in chunks.iter().enumerate() {
                let l = live.get_mut(&c.seq_id).ok_or(EngineError::Stalled {
                    waiting: 0,
                    running: 0,
                })?;
                let produced = c.context_len + c.query_len == l.tokens.len();
                if !produced {
                    scheduler.advance(c.seq_id, c.query_len, false);
                    continue;
                }
                let next = match &picked {
                    Picked::Tokens(t) => t[row],
                    Picked::Logits(rows) => l.sampler.sample(&rows[row]),
                };
                let reason = if self.model.is_eos(next) && !l.sampler.params().ignore_eos {
                    Some(FinishReason::Eos)
                } else {
                    l.tokens.push(next);
                    l.times.push(now);
                    on_token(l.request, next)?;
                    let generated = l.tokens.len() - l.prompt_len;
                    if generated >= l.max_tokens {
                        Some(FinishReason::Length)
                    } else if l.tokens.len() > self.max_seq_len {
                        Some(FinishReason::ContextFull)
                    } else {
                        None
                    }
                };
                match reason {
                    None => scheduler.advance(c.seq_id, c.query_len, true),
                    Some(reason) => {
                        scheduler.finish(c.seq_id);
                        finished_now += 1;
                        self.backend.release(c.seq_id);
                        let l = live.remove(&c.seq_id).ok_or(EngineError::Stalled {
                            waiting: 0,
                            running: 0,
                        })?;
                        let generated = l.tokens[l.prompt_len..].to_vec();
                        outputs[l.request] = Some(finished(
                            l.prompt_len,
                            generated,
                            reason,
                            &l.times,
                            l.preemptions,
                            l.arrival,
                        ));
                    }
                }
            }
            let attention_ms = self.attention_time.take_ms()?;
            let ms = t0.elapsed().as_secs_f64() * 1e3;
            steps.push(StepRecord {
                running: scheduler.running.len() + finished_now,
                attention_ms,
                decodes: chunks
                    .iter()
                    .filter(|c| c.query_len == 1 && c.context_len > 0)
                    .count(),
                prefill_chunks: chunks
                    .iter()
                    .filter(|c| !(c.query_len == 1 && c.context_len > 0))
                    .count(),
                prefill_tokens: chunks
                    .iter()
                    .filter(|c| !(c.query_len == 1 && c.context_len > 0))
                    .map(|c| c.query_len)
                    .sum(),
                preempted: preempted.len(),
                ms,
                queued_ms,
                wait_ms,
                host_ms: ms - queued_ms - wait_ms,
                attention_path: self.backend.step_path(),
            });
        }
        Ok(())
    }

    /// Refuses, up front, a request that could never fit the KV cache (it
    /// would otherwise be preempted forever).
    fn check_fits(&mut self, request: usize, needed: usize) -> Result<()> {
        if let Some(kv) = self.backend.kv_manager() {
            let total = kv.total_tokens();
            // The scheduler's 1 % reserve, in the cache's own block/page units.
            let usable = kv.max_admissible(total / 100);
            if needed > usable {
                return Err(EngineError::KvTooSmall {
                    request,
                    needed,
                    total,
                    usable,
                });
            }
        }
        Ok(())
    }

    /// Frees a sequence's KV.
    pub fn release(&mut self, seq: SeqId) {
        self.backend.release(seq);
    }

    fn new_seq(&mut self) -> SeqId {
        self.next_seq += 1;
        self.next_seq
    }

    /// Generates up to `max_tokens` tokens after `prompt` (ids, BOS included
    /// when wanted), calling `on_token` with each new id as it is sampled.
    /// Stops at an EOS id, at `max_tokens`, or when the context is full.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        max_tokens: usize,
        sampling: SamplingParams,
        on_token: &mut dyn FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        // One request through the batch loop, its whole prompt in one prefill step.
        let request = Request {
            prompt: prompt.to_vec(),
            max_tokens,
            sampling,
            arrival_ms: 0.0,
        };
        let sched = SchedulerConfig {
            policy: Policy::Hybrid { one_prefill: false },
            chunk_size: prompt.len().max(1),
            max_seqs: 1,
        };
        let out = self.run_batch(std::slice::from_ref(&request), sched, &mut |_, id| on_token(id))?;
        let r = out.requests.into_iter().next().ok_or(EngineError::Stalled {
            waiting: 0,
            running: 0,
        })?;
        Ok(Generation {
            decode_steps: r.tokens.len().saturating_sub(1),
            finish_reason: r.finish_reason,
            prefill_ms: r.ttft_ms,
            decode_ms: r.e2e_ms - r.ttft_ms,
            tokens: r.tokens,
        })
    }

    /// Teacher-forced NLL of `ids`, run as chunked prefill (`chunk` tokens per
    /// step through the KV cache). Sequences longer than the context are cut
    /// into independent windows of the context length.
    /// `progress(done, total)` is called after every chunk.
    pub fn score(
        &mut self,
        ids: &[u32],
        chunk: usize,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Score> {
        if ids.len() < 2 {
            return Err(EngineError::TooFewTokens(ids.len()));
        }
        let start = Instant::now();
        let chunk = chunk.max(1);
        let (mut nll_sum, mut predicted, mut windows, mut done) = (0f64, 0usize, 0usize, 0usize);
        for window in ids.chunks(self.max_seq_len) {
            windows += 1;
            if window.len() < 2 {
                done += window.len();
                continue;
            }
            let seq = self.new_seq();
            let r = self.score_window(seq, window, chunk, &mut |n| {
                done += n;
                progress(done, ids.len())
            });
            self.release(seq);
            let (sum, n) = r?;
            nll_sum += sum;
            predicted += n;
        }
        let nll = nll_sum / predicted.max(1) as f64;
        Ok(Score {
            nll,
            ppl: nll.exp(),
            tokens: ids.len(),
            predicted,
            windows,
            elapsed_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Teacher-forced f32 logits of several sequences run together as a
    /// server would run them: sequence i's first `prompt_lens[i]` tokens are
    /// prefilled up to `chunk` tokens a step, the rest fed one token a step
    /// (decodes), all sequences in the same packed steps, so that prefill,
    /// decode and hybrid steps (decodes beside prefill chunks) all run.
    /// Returns `[seqs[i].len(), vocab]` per sequence; the sequences are
    /// released afterwards.
    pub fn forced_logits(
        &mut self,
        seqs: &[Vec<u32>],
        prompt_lens: &[usize],
        chunk: usize,
    ) -> Result<Vec<Tensor>> {
        if let Some(s) = seqs.iter().find(|s| s.len() > self.max_seq_len) {
            return Err(EngineError::PromptTooLong {
                prompt: s.len(),
                limit: self.max_seq_len,
                note: "",
            });
        }
        let ids: Vec<SeqId> = seqs.iter().map(|_| self.new_seq()).collect();
        let mut rows: Vec<Vec<Tensor>> = vec![Vec::new(); seqs.len()];
        let mut run = || -> Result<()> {
            let mut done = vec![0usize; seqs.len()];
            while done.iter().zip(seqs).any(|(d, s)| d < &s.len()) {
                let (mut chunks, mut tokens) = (Vec::new(), Vec::new());
                for (i, s) in seqs.iter().enumerate() {
                    let d = done[i];
                    if d == s.len() {
                        continue;
                    }
                    let n = if d < prompt_lens[i] {
                        (prompt_lens[i] - d).min(chunk.max(1))
                    } else {
                        1
                    };
                    chunks.push((
                        i,
                        SeqChunk {
                            seq_id: ids[i],
                            context_len: d,
                            query_len: n,
                        },
                    ));
                    tokens.extend_from_slice(&s[d..d + n]);
                    done[i] += n;
                }
                let logits = self
                    .step(
                        chunks.iter().map(|(_, c)| *c).collect(),
                        &tokens,
                        LogitsAt::AllTokens,
                    )?
                    .to_dtype(DType::F32)?;
                let mut row = 0;
                for (i, c) in &chunks {
                    rows[*i].push(logits.narrow(0, row, c.query_len)?);
                    row += c.query_len;
                }
            }
            Ok(())
        };
        let r = run();
        for id in ids {
            self.release(id);
        }
        r?;
        rows.iter().map(|r| Ok(Tensor::cat(r, 0)?)).collect()
    }

    /// Sum of NLL over `window[1..]` and the count of predicted tokens.
    fn score_window(
        &mut self,
        seq: SeqId,
        window: &[u32],
        chunk: usize,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(f64, usize)> {
        let (mut sum, mut n) = (0f64, 0usize);
        let mut context_len = 0;
        for part in window.chunks(chunk) {
            let c = SeqChunk {
                seq_id: seq,
                context_len,
                query_len: part.len(),
            };
            let logits = self.step(vec![c], part, LogitsAt::AllTokens)?; // [len, vocab]
            // Row i predicts window[context_len + i + 1].
            let targets: Vec<u32> = window
                .iter()
                .skip(context_len + 1)
                .take(part.len())
                .copied()
                .collect();
            let rows = targets.len();
            if rows > 0 {
                let logits = logits.narrow(0, 0, rows)?;
                let nll = token_nll(&logits, &targets)?;
                sum += nll.iter().map(|&x| x as f64).sum::<f64>();
                n += rows;
            }
            context_len += part.len();
            progress(part.len());
        }
        Ok((sum, n))
    }
}

fn finished(
    prompt_tokens: usize,
    tokens: Vec<u32>,
    reason: FinishReason,
    times: &[f64],
    preemptions: usize,
    arrival: f64,
) -> RequestOutput {
    RequestOutput {
        prompt_tokens,
        tokens,
        finish_reason: reason,
        ttft_ms: times.first().map_or(0.0, |t| t - arrival),
        tbt_ms: times.windows(2).map(|w| w[1] - w[0]).collect(),
        e2e_ms: times.last().map_or(0.0, |t| t - arrival),
        preemptions,
    }
}

/// `-log softmax(logits)[target]` per row; `logits: [rows, vocab]` f32.
fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?; // [rows, 1]
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = logits.gather(&idx, 1)?; // [rows, 1]
    Ok((lse - picked)?.squeeze(1)?.to_vec1::<f32>()?)
}
