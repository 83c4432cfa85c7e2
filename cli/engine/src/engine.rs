//! The engine: a loaded model, one attention backend (with its KV cache), the
//! scheduler and the requests in flight, driven by four verbs:
//!
//! ```text
//! add_request(NewRequest) -> RequestId     validate, queue (FCFS)
//! step() -> StepOutput                      schedule, one packed forward, sample, finish
//! abort(RequestId)                          drop it wherever it is; its KV is freed at once
//! stats() -> EngineStats                    running, waiting, KV in use / free, preemptions
//! ```
//!
//! One `step` reads top to bottom: [`Scheduler::schedule`] picks the chunks
//! (decodes first, then prefill chunks within the token budget, preempting by
//! recompute when the cache is full), [`Engine::forward`] runs them as one
//! packed batch (the backend plans the step once from its [`BatchMeta`]), the
//! backend maps the next step's KV pages while the device computes, the
//! last-token logits come to the host (only the greedy ids when every request
//! is greedy), each request that produced a token samples it, and finished
//! requests free their KV.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use candle_core::Tensor;
use vpod_attention::{
    AttentionBackend, AttentionStep, BackendOptions, BatchMeta, LogitsAt, SeqChunk, SeqId, create_backend,
};
use vpod_models::LoadedModel;

use crate::sampler::{Sampler, SamplingParams};
use crate::scheduler::{Plan, Scheduler, SchedulerConfig, SeqState};
use crate::timing::{AttentionTimes, Timed};

/// Errors of the engine.
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
    #[error("bad sampling parameters: {0}")]
    BadSampling(String),
    #[error("token id {id} is outside the model's vocabulary of {vocab}")]
    BadToken { id: u32, vocab: usize },
    #[error("{0}")]
    BadWorkload(String),
    #[error("the scheduler cannot change while {0} requests are in flight")]
    Busy(usize),
    #[error("tensor parallelism: {0}")]
    TensorParallel(String),
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

/// A request's handle; also its sequence id in the KV cache (kept across
/// preemptions).
pub type RequestId = SeqId;

/// Why a request stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// The model produced an end-of-sequence token (not included in the output).
    Eos,
    /// The model produced one of the request's stop token ids (not included).
    Stop,
    /// `max_tokens` were generated.
    Length,
    /// The sequence reached the model's context length.
    ContextFull,
    /// [`Engine::abort`] ended it.
    Aborted,
    /// The step's logits for it were not finite (NaN or infinite); nothing
    /// was sampled from them. [`RequestOutput::error`] says more.
    Error,
}

/// A request for [`Engine::add_request`].
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// Token ids, BOS included when wanted.
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Ids that end the request (not included in the output) besides EOS.
    pub stop_token_ids: Vec<u32>,
    /// Report the log-probability of every sampled token.
    pub logprobs: bool,
    /// When it arrived (TTFT and end-to-end times count from here); `None`:
    /// when it is added.
    pub arrival: Option<Instant>,
}

impl NewRequest {
    pub fn new(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> Self {
        Self {
            prompt,
            max_tokens,
            sampling,
            stop_token_ids: Vec::new(),
            logprobs: false,
            arrival: None,
        }
    }
}

/// A token one step generated for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NewToken {
    pub id: RequestId,
    pub token: u32,
    /// `log softmax(logits)[token]` of the model's own distribution (before
    /// temperature and filtering), when the request asked for it.
    pub logprob: Option<f32>,
}

/// What became of one request.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RequestOutput {
    pub prompt_tokens: usize,
    /// Generated tokens (EOS and stop ids excluded).
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    /// Time to first token, from the request's arrival.
    pub ttft_ms: f64,
    /// Times between consecutive tokens.
    pub tbt_ms: Vec<f64>,
    /// Arrival to the last token (to the finish, for a request that produced none).
    pub e2e_ms: f64,
    pub preemptions: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A request that finished during a step.
#[derive(Debug, Clone)]
pub struct Finished {
    pub id: RequestId,
    pub output: RequestOutput,
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
    /// A decode step on a GPU with CUDA graphs on: whether it replayed a
    /// captured graph, its bucket, and the graph's key or why it ran
    /// eagerly ([`crate::graphs`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cuda_graph: Option<crate::graphs::GraphStep>,
}

/// What one [`Engine::step`] did.
#[derive(Debug, Clone, Default)]
pub struct StepOutput {
    /// Tokens generated, in the step's packed order.
    pub tokens: Vec<NewToken>,
    /// Requests that finished (by EOS, a stop id, length, context, error).
    pub finished: Vec<Finished>,
    /// `None` when there was nothing to run.
    pub record: Option<StepRecord>,
}

/// A snapshot of the engine's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    /// Tokens the KV cache holds in all (`None`: an unbounded cache).
    pub kv_total_tokens: Option<usize>,
    /// Tokens of it in use (mapped pages or allocated blocks).
    pub kv_used_tokens: Option<usize>,
    /// Preemptions by recompute since the engine started.
    pub preemptions: u64,
    pub steps: u64,
}

/// A request in flight.
#[derive(Debug)]
struct Live {
    tokens: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    sampler: Sampler,
    stop_token_ids: Vec<u32>,
    logprobs: bool,
    arrival: Instant,
    times: Vec<Instant>,
    preemptions: usize,
}

impl Live {
    fn output(&self, reason: FinishReason, error: Option<String>) -> RequestOutput {
        let ms = |t: &Instant| t.duration_since(self.arrival).as_secs_f64() * 1e3;
        RequestOutput {
            prompt_tokens: self.prompt_len,
            tokens: self.tokens[self.prompt_len..].to_vec(),
            finish_reason: reason,
            ttft_ms: self.times.first().map_or(0.0, ms),
            tbt_ms: self
                .times
                .windows(2)
                .map(|w| w[1].duration_since(w[0]).as_secs_f64() * 1e3)
                .collect(),
            e2e_ms: self.times.last().map_or_else(|| ms(&Instant::now()), ms),
            preemptions: self.preemptions,
            error,
        }
    }
}

/// A step's results on the host: every row's greedy token, picked on the
/// logits' device (4 bytes a row come over), or, when some request samples
/// or wants log-probabilities, the logits themselves (a 128K vocabulary is
/// 0.5 MB a row). `finite[row]`: no NaN or infinity in the row.
enum Picked {
    Tokens { ids: Vec<u32>, finite: Vec<bool> },
    Logits(Vec<Vec<f32>>),
}

impl Picked {
    /// One copy to the host (this waits for the step). A row at a time
    /// would copy the whole tensor per row: candle's `to_vec1` of a row view
    /// brings its entire storage over.
    fn new(logits: &Tensor, on_device: bool) -> Result<Self> {
        Ok(if on_device {
            // One pass and one copy: each row's token, flagged when the
            // row is not all finite.
            use vpod_attention::sample::{ARGMAX_NONFINITE, argmax_rows};
            let picked = argmax_rows(logits)?.to_vec1::<u32>()?;
            Self::Tokens {
                ids: picked.iter().map(|&t| t & !ARGMAX_NONFINITE).collect(),
                finite: picked.iter().map(|&t| t & ARGMAX_NONFINITE == 0).collect(),
            }
        } else {
            Self::Logits(logits.to_vec2::<f32>()?)
        })
    }

    fn rows(&self) -> usize {
        match self {
            Self::Tokens { ids, .. } => ids.len(),
            Self::Logits(l) => l.len(),
        }
    }
}

/// A model (shareable between engines), one attention backend and the
/// requests in flight.
#[derive(Debug)]
pub struct Engine {
    pub model: Arc<LoadedModel>,
    backend: Box<dyn AttentionBackend>,
    scheduler: Scheduler,
    live: HashMap<RequestId, Live>,
    /// Requests that ended without running (`max_tokens` 0, aborted while
    /// waiting are reported by `abort` itself), reported by the next step.
    done_early: Vec<Finished>,
    next_seq: SeqId,
    /// Longest sequence a request may reach (the model's context).
    max_seq_len: usize,
    /// Time attention calls and put the total in each [`StepRecord`] (on a
    /// GPU with timing events, without synchronising the device).
    pub profile_attention: bool,
    attention_time: AttentionTimes,
    preemptions: u64,
    steps: u64,
    /// Tensor-parallel ranks 1 .. N-1 (`None`: one rank, this engine).
    ranks: Option<crate::tp::RankGroup>,
    /// Whether decode steps replay CUDA graphs on a GPU.
    cuda_graphs: crate::graphs::CudaGraphs,
    #[cfg(feature = "cuda")]
    graphs: crate::graphs::Graphs,
}

impl Engine {
    /// Builds backend `backend` for this model (or says why it cannot run here).
    pub fn new(model: impl Into<Arc<LoadedModel>>, backend: &str) -> Result<Self> {
        Self::with_options(model, backend, &BackendOptions::default())
    }

    /// As [`Self::new`], with the cache's block/page size and KV budget. The
    /// scheduler starts as [`SchedulerConfig::default`] with the options'
    /// `max_seqs`; [`Self::set_scheduler`] changes it.
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
            scheduler: Scheduler::new(SchedulerConfig {
                max_seqs: opts.max_seqs.max(1),
                ..Default::default()
            }),
            live: HashMap::new(),
            done_early: Vec::new(),
            next_seq: 0,
            max_seq_len,
            profile_attention: false,
            attention_time: AttentionTimes::default(),
            preemptions: 0,
            steps: 0,
            ranks: None,
            cuda_graphs: match opts.cuda_graphs {
                true => crate::graphs::CudaGraphs::On,
                false => crate::graphs::CudaGraphs::Off,
            },
            #[cfg(feature = "cuda")]
            graphs: Default::default(),
        })
    }

    /// A tensor-parallel engine: `model` is rank 0's shard (its
    /// [`vpod_models::Llama::comm`] set), `ranks` the shards of ranks 1 ..
    /// N-1 with their ends of the same communicator, each on its own device;
    /// every rank builds backend `backend` with `opts` for its heads.
    pub fn with_tensor_parallel(
        model: impl Into<Arc<LoadedModel>>,
        ranks: Vec<Arc<vpod_models::Llama>>,
        backend: &str,
        opts: &BackendOptions,
    ) -> Result<Self> {
        let model = model.into();
        let Some(comm0) = model.model.comm().cloned() else {
            return Err(EngineError::TensorParallel(
                "rank 0's model was loaded without a communicator".into(),
            ));
        };
        if comm0.world() != ranks.len() + 1 || comm0.rank() != 0 {
            return Err(EngineError::TensorParallel(format!(
                "rank 0's communicator is rank {} of {}, but {} more ranks were given",
                comm0.rank(),
                comm0.world(),
                ranks.len()
            )));
        }
        let mut engine = Self::with_options(model, backend, opts)?;
        let max_seq_len = engine.max_seq_len;
        if !ranks.is_empty() {
            engine.ranks = Some(crate::tp::RankGroup::start(
                ranks,
                comm0,
                backend,
                opts,
                max_seq_len,
            )?);
        }
        Ok(engine)
    }

    /// Turns CUDA graphs for decode steps on or off (on by default; they
    /// only apply on a GPU). Graphs captured so far are kept.
    pub fn set_cuda_graphs(&mut self, on: crate::graphs::CudaGraphs) {
        self.cuda_graphs = on;
    }

    pub fn cuda_graphs(&self) -> crate::graphs::CudaGraphs {
        self.cuda_graphs
    }

    /// The CUDA graphs captured so far (empty without a GPU).
    pub fn graph_captures(&self) -> Vec<crate::graphs::CaptureRecord> {
        #[cfg(feature = "cuda")]
        return self.graphs.captures.clone();
        #[cfg(not(feature = "cuda"))]
        Vec::new()
    }

    /// Tensor-parallel ranks (1: not sharded).
    pub fn tensor_parallel(&self) -> usize {
        self.ranks.as_ref().map_or(1, |r| r.world())
    }

    /// Frees `seq`'s KV on every rank. A rank that has stopped is reported
    /// by the next step's forward, which needs it.
    fn free_seq(&mut self, seq: SeqId) {
        self.backend.release(seq);
        if let Some(r) = &self.ranks {
            let _ = r.release(seq);
        }
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    pub fn max_seq_len(&self) -> usize {
        self.max_seq_len
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        self.scheduler.config()
    }

    /// Changes the scheduling policy, budget and sequence cap; only while no
    /// request is in flight.
    pub fn set_scheduler(&mut self, cfg: SchedulerConfig) -> Result<()> {
        if self.has_unfinished() {
            return Err(EngineError::Busy(self.live.len()));
        }
        if cfg.chunk_size == 0 || cfg.max_seqs == 0 {
            return Err(EngineError::BadWorkload(format!(
                "the scheduler needs a token budget and a sequence cap of at least 1, got {} and {}",
                cfg.chunk_size, cfg.max_seqs
            )));
        }
        self.scheduler = Scheduler::new(cfg);
        Ok(())
    }

    /// Whether any request is queued, running, or finished but not yet
    /// reported by a step.
    pub fn has_unfinished(&self) -> bool {
        !self.live.is_empty() || !self.done_early.is_empty()
    }

    /// Checks and queues a request; its tokens come out of later [`Self::step`]s.
    /// Refused up front: an empty prompt, one longer than the context, ids
    /// outside the vocabulary, bad sampling values, and a request whose
    /// prompt plus `max_tokens` could never fit the KV cache (it would
    /// otherwise wait, or be preempted, forever).
    pub fn add_request(&mut self, r: NewRequest) -> Result<RequestId> {
        self.check_request(&r, 0)?;
        Ok(self.enqueue(r))
    }

    /// Queues a request that [`Self::check_request`] accepted.
    pub(crate) fn enqueue(&mut self, r: NewRequest) -> RequestId {
        let id = self.new_seq();
        let now = Instant::now();
        let live = Live {
            prompt_len: r.prompt.len(),
            tokens: r.prompt,
            max_tokens: r.max_tokens,
            sampler: Sampler::new(r.sampling),
            stop_token_ids: r.stop_token_ids,
            logprobs: r.logprobs,
            arrival: r.arrival.unwrap_or(now).min(now),
            times: Vec::new(),
            preemptions: 0,
        };
        if live.max_tokens == 0 {
            self.done_early.push(Finished {
                id,
                output: live.output(FinishReason::Length, None),
            });
            return id;
        }
        self.scheduler.add(SeqState {
            id,
            len: live.tokens.len(),
            computed: 0,
        });
        self.live.insert(id, live);
        id
    }

    /// Everything [`Self::add_request`] refuses; `index` names the request
    /// in the error (its place in a batch).
    pub(crate) fn check_request(&mut self, r: &NewRequest, index: usize) -> Result<()> {
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
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = r.prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        r.sampling.validate().map_err(EngineError::BadSampling)?;
        self.check_fits(index, (r.prompt.len() + r.max_tokens).min(self.max_seq_len))
    }

    /// Ends a request wherever it is (waiting, running, between steps): its
    /// KV is freed at once. Returns what it had generated, or `None` for an
    /// unknown or already finished id.
    pub fn abort(&mut self, id: RequestId) -> Option<RequestOutput> {
        if let Some(i) = self.done_early.iter().position(|f| f.id == id) {
            let mut f = self.done_early.swap_remove(i);
            f.output.finish_reason = FinishReason::Aborted;
            return Some(f.output);
        }
        let live = self.live.remove(&id)?;
        self.scheduler.abort(id);
        self.free_seq(id);
        Some(live.output(FinishReason::Aborted, None))
    }

    /// Aborts every request in flight (after a failed step, or at shutdown).
    pub fn abort_all(&mut self) -> Vec<Finished> {
        let mut ids: Vec<RequestId> = self.live.keys().copied().collect();
        ids.extend(self.done_early.iter().map(|f| f.id));
        ids.sort_unstable();
        ids.into_iter()
            .filter_map(|id| self.abort(id).map(|output| Finished { id, output }))
            .collect()
    }

    /// Running and waiting requests, KV use, preemptions and steps so far.
    pub fn stats(&mut self) -> EngineStats {
        let (running, waiting) = (self.scheduler.running.len(), self.scheduler.waiting.len());
        let kv = self
            .backend
            .kv_manager()
            .map(|kv| (kv.total_tokens(), kv.total_tokens() - kv.free_tokens()));
        EngineStats {
            running,
            waiting,
            kv_total_tokens: kv.map(|k| k.0),
            kv_used_tokens: kv.map(|k| k.1),
            preemptions: self.preemptions,
            steps: self.steps,
        }
    }

    /// Runs one step: schedule, forward, sample, finish. With nothing to do
    /// it returns an empty output at once. On an error the requests in
    /// flight stay as they were; the caller decides (the offline loops and
    /// the server abort them all, see [`Self::abort_all`]).
    pub fn step(&mut self) -> Result<StepOutput> {
        let mut out = StepOutput {
            finished: std::mem::take(&mut self.done_early),
            ..Default::default()
        };
        if self.scheduler.is_idle() {
            return Ok(out);
        }
        let t0 = Instant::now();
        let Plan { chunks, preempted } = self.scheduler.schedule(self.backend.kv_manager());
        // The scheduler freed the victims on rank 0's cache; the other ranks follow.
        if let Some(r) = &self.ranks {
            for &id in &preempted {
                let _ = r.release(id);
            }
        }
        for id in &preempted {
            if let Some(l) = self.live.get_mut(id) {
                l.preemptions += 1;
            }
        }
        self.preemptions += preempted.len() as u64;
        if chunks.is_empty() {
            return Err(EngineError::Stalled {
                waiting: self.scheduler.waiting.len(),
                running: self.scheduler.running.len(),
            });
        }
        let live = &self.live;
        let tokens: Vec<u32> = chunks
            .iter()
            .flat_map(|c| {
                live[&c.seq_id].tokens[c.context_len..c.context_len + c.query_len]
                    .iter()
                    .copied()
            })
            .collect();
        let t_queue = Instant::now();
        let (logits, cuda_graph) = self.step_forward(&chunks, &tokens)?;
        // While the device runs this step: each sequence's length after the
        // next one (a decode, or the next prompt chunk), so that a backend
        // can map KV pages off the critical path.
        let budget = self.scheduler.config().chunk_size.max(1);
        let next: Vec<(SeqId, usize)> = chunks
            .iter()
            .map(|c| {
                let done = c.seq_len();
                let len = self.live.get(&c.seq_id).map_or(done, |l| l.tokens.len());
                let next_chunk = if done >= len { 1 } else { (len - done).min(budget) };
                (c.seq_id, done + next_chunk)
            })
            .collect();
        self.backend.prepare_next(&next)?;
        if let Some(r) = &self.ranks {
            r.prepare_next(&next)?;
        }
        let t_wait = Instant::now();
        let on_device = chunks.iter().all(|c| {
            self.live
                .get(&c.seq_id)
                .is_none_or(|l| l.sampler.is_greedy() && !l.logprobs)
        });
        let picked = Picked::new(&logits, on_device)?;
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
        let now = Instant::now();
        let mut finished_now = 0;
        for (row, c) in chunks.iter().enumerate() {
            let Some(l) = self.live.get_mut(&c.seq_id) else {
                continue;
            };
            if c.context_len + c.query_len != l.tokens.len() {
                // A prompt chunk that is not the last: no token yet.
                self.scheduler.advance(c.seq_id, c.query_len, false);
                continue;
            }
            let sampled = match &picked {
                Picked::Tokens { ids, finite } => finite[row].then(|| (ids[row], None)),
                Picked::Logits(rows) => {
                    let r = &rows[row];
                    r.iter().all(|x| x.is_finite()).then(|| {
                        let t = l.sampler.sample(r);
                        (t, l.logprobs.then(|| logprob(r, t)))
                    })
                }
            };
            let (reason, error) = match sampled {
                None => (
                    Some(FinishReason::Error),
                    Some(format!(
                        "the model's logits at position {} are not finite (NaN or infinite); nothing was sampled",
                        l.tokens.len() - 1
                    )),
                ),
                Some((next, _)) if self.model.is_eos(next) && !l.sampler.params().ignore_eos => {
                    (Some(FinishReason::Eos), None)
                }
                Some((next, _)) if l.stop_token_ids.contains(&next) => (Some(FinishReason::Stop), None),
                Some((next, logprob)) => {
                    l.tokens.push(next);
                    l.times.push(now);
                    out.tokens.push(NewToken {
                        id: c.seq_id,
                        token: next,
                        logprob,
                    });
                    let reason = if l.tokens.len() - l.prompt_len >= l.max_tokens {
                        Some(FinishReason::Length)
                    } else if l.tokens.len() > self.max_seq_len {
                        Some(FinishReason::ContextFull)
                    } else {
                        None
                    };
                    (reason, None)
                }
            };
            match reason {
                None => self.scheduler.advance(c.seq_id, c.query_len, true),
                Some(reason) => {
                    self.scheduler.finish(c.seq_id);
                    self.free_seq(c.seq_id);
                    finished_now += 1;
                    if let Some(l) = self.live.remove(&c.seq_id) {
                        out.finished.push(Finished {
                            id: c.seq_id,
                            output: l.output(reason, error),
                        });
                    }
                }
            }
        }
        let attention_ms = self.attention_time.take_ms()?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let is_decode = |c: &&SeqChunk| c.query_len == 1 && c.context_len > 0;
        self.steps += 1;
        out.record = Some(StepRecord {
            running: self.scheduler.running.len() + finished_now,
            attention_ms,
            decodes: chunks.iter().filter(is_decode).count(),
            prefill_chunks: chunks.iter().filter(|c| !is_decode(c)).count(),
            prefill_tokens: chunks.iter().filter(|c| !is_decode(c)).map(|c| c.query_len).sum(),
            preempted: preempted.len(),
            ms,
            queued_ms,
            wait_ms,
            host_ms: ms - queued_ms - wait_ms,
            attention_path: self.backend.step_path(),
            cuda_graph,
        });
        Ok(out)
    }

    /// A scheduled step's forward: a decode step on a GPU runs in its batch
    /// bucket over the backend's static plan ([`crate::graphs`]), replayed
    /// from a CUDA graph with graphs on, eagerly with them off (the same
    /// computation either way); other steps run eagerly. A decode step on a
    /// GPU says which it was.
    fn step_forward(
        &mut self,
        chunks: &[SeqChunk],
        tokens: &[u32],
    ) -> Result<(Tensor, Option<crate::graphs::GraphStep>)> {
        let decode = chunks.iter().all(|c| c.query_len == 1);
        let capture = self.cuda_graphs == crate::graphs::CudaGraphs::On;
        let eager = |note: &str| crate::graphs::GraphStep {
            replayed: false,
            rows: 0,
            note: format!("eager: {note}"),
        };
        #[cfg(feature = "cuda")]
        if decode && self.model.model.device().is_cuda() {
            let why = if self.ranks.is_some() {
                Some("tensor-parallel steps run eagerly (collectives are not captured)")
            } else if self.profile_attention {
                Some("attention profiling times each call")
            } else {
                None
            };
            let max_seqs = self.scheduler.config().max_seqs;
            let rows = crate::graphs::bucket_for(chunks.len(), max_seqs);
            let note = match (why, rows) {
                (Some(why), _) => eager(why),
                (None, None) => eager("more sequences than the largest bucket (--max-seqs)"),
                (None, Some(rows)) => {
                    match self.graphs.decode(
                        &self.model.model,
                        self.backend.as_mut(),
                        (rows, max_seqs),
                        chunks,
                        tokens,
                        capture,
                    )? {
                        Some((logits, g)) => return Ok((logits, Some(g))),
                        None => eager(&format!(
                            "backend {} has no static decode plan",
                            self.backend.name()
                        )),
                    }
                }
            };
            let logits = self.forward(chunks.to_vec(), tokens, LogitsAt::LastToken)?;
            return Ok((logits, Some(note)));
        }
        let _ = (decode, capture, eager);
        Ok((self.forward(chunks.to_vec(), tokens, LogitsAt::LastToken)?, None))
    }

    /// Runs one packed batch outside the scheduler: `chunks[i]` describes
    /// sequence i's share and `tokens` holds all their new tokens in the same
    /// order. Returns f32 logits `[rows, vocab]` as `logits` asks. Sequence
    /// ids must not be those of requests in flight ([`Self::new_seq`] makes
    /// fresh ones); [`Self::release`] frees them.
    pub fn forward(&mut self, chunks: Vec<SeqChunk>, tokens: &[u32], logits: LogitsAt) -> Result<Tensor> {
        let vocab = self.model.config.vocab_size;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken { id, vocab });
        }
        if let Some(ranks) = self.ranks.take() {
            // The other ranks run the same step while this thread runs rank 0's.
            let out = ranks.forward(&chunks, tokens, logits, || {
                self.forward_rank0(chunks.clone(), tokens, logits)
            });
            self.ranks = Some(ranks);
            return out;
        }
        self.forward_rank0(chunks, tokens, logits)
    }

    /// [`Self::forward`] on this engine's own model and backend.
    fn forward_rank0(&mut self, chunks: Vec<SeqChunk>, tokens: &[u32], logits: LogitsAt) -> Result<Tensor> {
        let device = self.model.model.device().clone();
        let meta = BatchMeta::new(chunks, logits, &device)?;
        let tokens = Tensor::new(tokens, &device)?;
        if self.profile_attention {
            let mut timed = Timed {
                inner: self.backend.as_mut(),
                device,
                times: &mut self.attention_time,
            };
            let mut attn = AttentionStep::new(&mut timed, &meta)?;
            return Ok(self.model.model.forward(&tokens, &mut attn)?);
        }
        let mut attn = AttentionStep::new(self.backend.as_mut(), &meta)?;
        Ok(self.model.model.forward(&tokens, &mut attn)?)
    }

    /// Runs a short prefill and a decode step on a scratch sequence, then
    /// frees it, so that everything a step uses is loaded before the first
    /// request. On a GPU the driver compiles candle's PTX kernels the first
    /// time each module is used: ~15-22 s on an H200 with a cold compute
    /// cache (results/2026-12-03-h200-prefill-baseline), which would
    /// otherwise land on the first request's time to first token. Only
    /// while no request is in flight.
    pub fn warm_up(&mut self) -> Result<()> {
        if self.has_unfinished() {
            return Err(EngineError::Busy(self.live.len()));
        }
        let n = 16.min(self.max_seq_len.saturating_sub(1)).max(1);
        let vocab = self.model.config.vocab_size.max(2) as u32;
        let prompt: Vec<u32> = (0..n as u32).map(|i| 1 + i % (vocab - 1)).collect();
        let seq = self.new_seq();
        let mut run = || -> Result<()> {
            let chunk = |context_len, query_len| SeqChunk {
                seq_id: seq,
                context_len,
                query_len,
            };
            let logits = self.forward(vec![chunk(0, n)], &prompt, LogitsAt::LastToken)?;
            // Both ways a step's results come to the host.
            let Picked::Tokens { ids, .. } = Picked::new(&logits, true)? else {
                unreachable!("asked for tokens")
            };
            Picked::new(&logits, false)?;
            if n < self.max_seq_len {
                self.forward(vec![chunk(n, 1)], &ids, LogitsAt::LastToken)?;
            }
            Ok(())
        };
        let r = run();
        self.release(seq);
        r
    }

    /// Refuses, up front, a request that could never fit the KV cache.
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

    /// Frees a sequence's KV (one run through [`Self::forward`]).
    pub fn release(&mut self, seq: SeqId) {
        self.free_seq(seq);
    }

    /// A sequence id no request or earlier sequence has used.
    pub fn new_seq(&mut self) -> SeqId {
        self.next_seq += 1;
        self.next_seq
    }
}

/// `log softmax(row)[token]`.
fn logprob(row: &[f32], token: u32) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
    (row[token as usize] - max) - sum.ln() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprob_is_log_softmax() {
        let row = [1.0f32, 2.0, 3.0];
        let z: f32 = row.iter().map(|x| x.exp()).sum();
        assert!((logprob(&row, 2) - (3f32.exp() / z).ln()).abs() < 1e-6);
    }
}
