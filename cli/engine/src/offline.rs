//! Offline loops over the engine's verbs: a fixed list of requests run to
//! completion ([`Engine::run_batch`], arrival times replayed), one
//! generation ([`Engine::generate`]), and teacher-forced scoring
//! ([`Engine::score`], [`Engine::forced_logits`]), which drive
//! [`Engine::forward`] directly with their own sequences.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use candle_core::{D, DType, Tensor};
use vpod_attention::{LogitsAt, SeqChunk, SeqId};

use crate::engine::{Engine, EngineError, FinishReason, NewRequest, RequestOutput, Result, StepRecord};
use crate::sampler::SamplingParams;
use crate::scheduler::{Policy, SchedulerConfig};

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

/// The outputs of [`Engine::run_batch`], in request order, and its steps.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchOutput {
    pub requests: Vec<RequestOutput>,
    pub steps: Vec<StepRecord>,
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
    /// Decode steps that replayed a CUDA graph ([`crate::graphs`]; 0 on a CPU
    /// or with graphs off).
    pub graph_replayed_steps: usize,
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

impl Engine {
    /// Runs `requests` to completion under `sched`, each added when its
    /// arrival time comes, calling `on_token(request, id)` for every
    /// generated token. Every request is checked before anything runs.
    pub fn run_batch(
        &mut self,
        requests: &[Request],
        sched: SchedulerConfig,
        on_token: &mut dyn FnMut(usize, u32) -> Result<()>,
    ) -> Result<BatchOutput> {
        self.set_scheduler(sched)?;
        // Every request is checked before any runs, then queued as it arrives.
        let mut new: Vec<Option<NewRequest>> = Vec::with_capacity(requests.len());
        for (i, r) in requests.iter().enumerate() {
            let n = NewRequest::new(r.prompt.clone(), r.max_tokens, r.sampling);
            self.check_request(&n, i)?;
            new.push(Some(n));
        }
        let mut order: Vec<usize> = (0..requests.len()).collect();
        order.sort_by(|&a, &b| requests[a].arrival_ms.total_cmp(&requests[b].arrival_ms));
        let mut pending: VecDeque<usize> = order.into();
        let mut index: HashMap<SeqId, usize> = HashMap::new();
        let mut outputs: Vec<Option<RequestOutput>> = vec![None; requests.len()];
        let mut steps = Vec::new();
        let start = Instant::now();
        let at = |i: usize| start + Duration::from_secs_f64(requests[i].arrival_ms.max(0.0) / 1e3);
        let mut run = || -> Result<()> {
            loop {
                let now = Instant::now();
                while let Some(&i) = pending.front().filter(|&&i| at(i) <= now) {
                    pending.pop_front();
                    if let Some(r) = new[i].take() {
                        let id = self.enqueue(NewRequest {
                            arrival: Some(at(i)),
                            ..r
                        });
                        index.insert(id, i);
                    }
                }
                if !self.has_unfinished() {
                    match pending.front() {
                        None => return Ok(()),
                        Some(&i) => {
                            std::thread::sleep(at(i).saturating_duration_since(now));
                            continue;
                        }
                    }
                }
                let out = self.step()?;
                for t in &out.tokens {
                    on_token(index[&t.id], t.token)?;
                }
                for f in out.finished {
                    outputs[index[&f.id]] = Some(f.output);
                }
                steps.extend(out.record);
            }
        };
        if let Err(e) = run() {
            // Leave the cache as we found it: free every request still in flight.
            self.abort_all();
            return Err(e);
        }
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
        let graph_replayed_steps = out
            .steps
            .iter()
            .filter(|s| s.cuda_graph.as_ref().is_some_and(|g| g.replayed))
            .count();
        Ok(Generation {
            decode_steps: r.tokens.len().saturating_sub(1),
            graph_replayed_steps,
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
        for window in ids.chunks(self.max_seq_len()) {
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
        if let Some(s) = seqs.iter().find(|s| s.len() > self.max_seq_len()) {
            return Err(EngineError::PromptTooLong {
                prompt: s.len(),
                limit: self.max_seq_len(),
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
                    .forward(
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
            let logits = self.forward(vec![c], part, LogitsAt::AllTokens)?; // [len, vocab]
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

/// `-log softmax(logits)[target]` per row; `logits: [rows, vocab]` f32.
fn token_nll(logits: &Tensor, targets: &[u32]) -> Result<Vec<f32>> {
    let logits = logits.to_dtype(DType::F32)?;
    let max = logits.max_keepdim(D::Minus1)?;
    let lse = (logits.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?; // [rows, 1]
    let idx = Tensor::new(targets, logits.device())?.unsqueeze(1)?;
    let picked = logits.gather(&idx, 1)?; // [rows, 1]
    Ok((lse - picked)?.squeeze(1)?.to_vec1::<f32>()?)
}
