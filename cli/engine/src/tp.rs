//! Tensor-parallel ranks 1 .. N-1 of an [`crate::Engine`] (rank 0 is the
//! engine's own model and backend). Each rank is a thread that owns its
//! model shard ([`vpod_models::Llama::load_shard`]) and its attention
//! backend (its own KV cache on its own device); the engine's scheduler runs
//! once and every rank executes the same steps: the engine sends a step to
//! the ranks, runs its own shard's forward (the shards meet in the
//! collectives of their communicator), then collects the ranks' results.
//! Frees and map-ahead hints are mirrored the same way, so every rank's
//! cache holds the same sequences (each admits and grows them as its forward
//! plans them).
//!
//! Threads, not processes: one address space keeps the engine, the server
//! and the ranks in one program with no launcher, and NCCL drives one GPU per
//! thread as well as per process; a rank that fails aborts its communicator,
//! so the others' collectives return an error instead of waiting.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use vpod_attention::{AttentionStep, BackendOptions, BatchMeta, LogitsAt, SeqChunk, SeqId, create_backend};
use vpod_models::Llama;
use vpod_models::tp::Communicator;

use crate::engine::{EngineError, Result};

/// What a rank thread is asked to do.
enum Cmd {
    Forward(Vec<SeqChunk>, Vec<u32>, LogitsAt),
    Release(SeqId),
    PrepareNext(Vec<(SeqId, usize)>),
}

/// One rank thread: its command channel, its replies (one per command) and
/// its handle.
#[derive(Debug)]
struct Rank {
    rank: usize,
    tx: Option<Sender<Cmd>>,
    rx: Receiver<std::result::Result<(), String>>,
    handle: Option<JoinHandle<()>>,
}

/// Ranks 1 .. N-1 of a tensor-parallel engine.
#[derive(Debug)]
pub struct RankGroup {
    ranks: Vec<Rank>,
    /// Rank 0's end of the communicator (aborted when rank 0 fails mid-step).
    comm0: Arc<dyn Communicator>,
}

impl RankGroup {
    /// Starts one thread per model shard (ranks 1 .. N-1, in order, each
    /// loaded with its end of `comm0`'s communicator, on its device; engines
    /// that run one after another may share them), each
    /// building backend `spec` for its shard with `opts` and room for
    /// `max_seq_len` tokens a sequence. Fails if any rank's backend cannot
    /// be built there.
    pub fn start(
        ranks: Vec<Arc<Llama>>,
        comm0: Arc<dyn Communicator>,
        spec: &str,
        opts: &BackendOptions,
        max_seq_len: usize,
    ) -> Result<Self> {
        let mut group = RankGroup { ranks: vec![], comm0 };
        for (i, model) in ranks.into_iter().enumerate() {
            let rank = i + 1;
            let Some(comm) = model.comm().cloned() else {
                return Err(EngineError::TensorParallel(format!(
                    "rank {rank}'s model has no communicator"
                )));
            };
            let (tx, cmd_rx) = channel::<Cmd>();
            let (reply_tx, rx) = channel();
            let (spec, opts) = (spec.to_string(), opts.clone());
            let handle = std::thread::Builder::new()
                .name(format!("vpod-rank-{rank}"))
                .spawn(move || rank_main(model, comm, &spec, &opts, max_seq_len, cmd_rx, reply_tx))
                .map_err(|e| {
                    EngineError::TensorParallel(format!("could not start rank {rank}'s thread: {e}"))
                })?;
            group.ranks.push(Rank {
                rank,
                tx: Some(tx),
                rx,
                handle: Some(handle),
            });
            // The first reply says whether the rank's backend was built.
            group.reply(group.ranks.len() - 1)?;
        }
        Ok(group)
    }

    /// Tensor-parallel ranks in all, rank 0 included.
    pub fn world(&self) -> usize {
        self.ranks.len() + 1
    }

    /// Sends a command to every rank; if one has stopped, the ranks it
    /// reached are released from their collectives and answered for before
    /// the error returns.
    fn send(&self, make: impl Fn() -> Cmd) -> Result<()> {
        for (i, r) in self.ranks.iter().enumerate() {
            let sent = r.tx.as_ref().is_some_and(|tx| tx.send(make()).is_ok());
            if !sent {
                self.comm0.abort(&format!("rank {} has stopped", r.rank));
                for j in 0..i {
                    let _ = self.reply(j);
                }
                return Err(EngineError::TensorParallel(format!(
                    "rank {} has stopped",
                    r.rank
                )));
            }
        }
        Ok(())
    }

    fn reply(&self, i: usize) -> Result<()> {
        let r = &self.ranks[i];
        match r.rx.recv_timeout(REPLY_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(EngineError::TensorParallel(format!("rank {}: {e}", r.rank))),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(EngineError::TensorParallel(format!(
                "rank {} did not finish its step within {} s",
                r.rank,
                REPLY_TIMEOUT.as_secs()
            ))),
            Err(_) => Err(EngineError::TensorParallel(format!("rank {} stopped", r.rank))),
        }
    }

    /// Every rank's reply to the last command (the first error wins).
    fn replies(&self) -> Result<()> {
        let mut first = Ok(());
        for i in 0..self.ranks.len() {
            let r = self.reply(i);
            if first.is_ok() {
                first = r;
            }
        }
        first
    }

    /// Runs one step on every rank around `own`, rank 0's forward of it.
    pub fn forward(
        &self,
        chunks: &[SeqChunk],
        tokens: &[u32],
        logits: LogitsAt,
        own: impl FnOnce() -> Result<Tensor>,
    ) -> Result<Tensor> {
        self.send(|| Cmd::Forward(chunks.to_vec(), tokens.to_vec(), logits))?;
        let out = {
            // Rank 0 panicking mid-step: the other ranks' collectives give up.
            let _guard = AbortOnPanic(&*self.comm0);
            own()
        };
        if let Err(e) = &out {
            // Ranks waiting for rank 0 in a collective give up.
            self.comm0.abort(&e.to_string());
        }
        let theirs = self.replies();
        if out.is_err() || theirs.is_err() {
            // Every rank has answered, so none is inside a collective: the
            // group can run the next step.
            self.comm0.reset()?;
        }
        let out = out?;
        theirs?;
        Ok(out)
    }

    pub fn release(&self, seq: SeqId) -> Result<()> {
        self.send(|| Cmd::Release(seq))?;
        self.replies()
    }

    pub fn prepare_next(&self, next: &[(SeqId, usize)]) -> Result<()> {
        self.send(|| Cmd::PrepareNext(next.to_vec()))?;
        self.replies()
    }
}

impl Drop for RankGroup {
    fn drop(&mut self) {
        for r in &mut self.ranks {
            r.tx = None; // the thread's loop ends
        }
        for r in &mut self.ranks {
            if let Some(h) = r.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// How long the engine waits for a rank's reply to one command (a whole
/// step's forward) before it reports the rank as stuck.
const REPLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// Aborts the communicator if dropped while its thread panics, so that the
/// other ranks' collectives return instead of waiting for this one.
struct AbortOnPanic<'a>(&'a dyn Communicator);

impl Drop for AbortOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.abort("a rank panicked");
        }
    }
}

fn rank_main(
    model: Arc<Llama>,
    comm: Arc<dyn Communicator>,
    spec: &str,
    opts: &BackendOptions,
    max_seq_len: usize,
    cmds: Receiver<Cmd>,
    reply: Sender<std::result::Result<(), String>>,
) {
    let _guard = AbortOnPanic(&*comm);
    let device: Device = model.device().clone();
    let mut backend = match create_backend(spec, &model.attn_config(max_seq_len), &device, opts) {
        Ok(b) => {
            let _ = reply.send(Ok(()));
            b
        }
        Err(e) => {
            let _ = reply.send(Err(e.to_string()));
            return;
        }
    };
    while let Ok(cmd) = cmds.recv() {
        let r: std::result::Result<(), String> = match cmd {
            Cmd::Forward(chunks, tokens, logits) => {
                let run = || -> Result<()> {
                    let meta = BatchMeta::new(chunks, logits, &device)?;
                    let tokens = Tensor::new(tokens.as_slice(), &device)?;
                    let mut attn = AttentionStep::new(backend.as_mut(), &meta)?;
                    model.forward(&tokens, &mut attn)?;
                    Ok(())
                };
                run().map_err(|e| {
                    comm.abort(&e.to_string());
                    e.to_string()
                })
            }
            Cmd::Release(seq) => {
                backend.release(seq);
                Ok(())
            }
            Cmd::PrepareNext(next) => backend.prepare_next(&next).map_err(|e| e.to_string()),
        };
        if reply.send(r).is_err() {
            return;
        }
    }
}
