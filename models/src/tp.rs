//! Tensor parallelism of the Llama family, Megatron-style: rank r of N holds
//! its query heads' columns of q/k/v (whole KV heads; where a model has
//! fewer KV heads than ranks, each rank holds the one KV head its query
//! heads share, so KV heads are replicated), its slice of the gate/up rows,
//! the matching columns of o and down (one all-reduce after each), and a
//! slice of the vocabulary for the embedding (all-reduce) and the LM head
//! (all-gather of the logits). Norms are replicated.
//!
//! [`Shard`] says which slices a rank holds; [`Communicator`] is the
//! collective layer: [`LocalComm`] runs N ranks as threads of one process
//! with an in-memory all-reduce (the CPU twin of NCCL that CI checks
//! sharded == unsharded logits with).

use std::fmt;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use candle_core::{DType, Tensor};

use crate::config::LlamaConfig;
use crate::{ModelError, Result};

/// Rank `rank` of `world` tensor-parallel ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self::WHOLE
    }
}

impl Shard {
    /// The whole model on one rank.
    pub const WHOLE: Shard = Shard { rank: 0, world: 1 };

    pub fn new(rank: usize, world: usize) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(ModelError::TensorParallel(format!(
                "rank {rank} of {world} ranks: need 1 <= ranks and rank < ranks"
            )));
        }
        Ok(Self { rank, world })
    }

    /// Why `cfg` cannot be split over `world` ranks (empty: it can).
    pub fn unsupported_reasons(cfg: &LlamaConfig, world: usize) -> Vec<String> {
        let mut r = vec![];
        if world == 0 {
            r.push("tensor parallelism needs at least 1 rank".into());
            return r;
        }
        let (h, kv) = (cfg.num_heads, cfg.num_kv_heads);
        if !h.is_multiple_of(world) {
            r.push(format!("{h} attention heads do not split over {world} ranks"));
        }
        if !(kv.is_multiple_of(world) || world.is_multiple_of(kv.max(1))) {
            r.push(format!(
                "{kv} key/value heads neither split over {world} ranks nor divide them (to be replicated)"
            ));
        }
        if !cfg.intermediate_size.is_multiple_of(world) {
            r.push(format!(
                "the MLP's {} columns do not split over {world} ranks",
                cfg.intermediate_size
            ));
        }
        if cfg.vocab_size < world {
            r.push(format!(
                "a vocabulary of {} does not split over {world} ranks",
                cfg.vocab_size
            ));
        }
        r
    }

    /// Checks that `cfg` splits over this shard's ranks.
    pub fn check(&self, cfg: &LlamaConfig) -> Result<()> {
        let r = Self::unsupported_reasons(cfg, self.world);
        if r.is_empty() {
            Ok(())
        } else {
            Err(ModelError::TensorParallel(format!(
                "the model over {} ranks: {}",
                self.world,
                r.join("; ")
            )))
        }
    }

    fn split(&self, n: usize) -> Range<usize> {
        let per = n / self.world;
        self.rank * per..(self.rank + 1) * per
    }

    /// This rank's query heads.
    pub fn heads(&self, cfg: &LlamaConfig) -> Range<usize> {
        self.split(cfg.num_heads)
    }

    /// This rank's KV heads: its share where they split, else the one KV
    /// head its query heads share (replicated over world / kv_heads ranks).
    pub fn kv_heads(&self, cfg: &LlamaConfig) -> Range<usize> {
        let kv = cfg.num_kv_heads;
        if kv.is_multiple_of(self.world) {
            self.split(kv)
        } else {
            let head = self.heads(cfg).start / (cfg.num_heads / kv);
            head..head + 1
        }
    }

    /// This rank's MLP columns (rows of gate and up, columns of down).
    pub fn ffn(&self, cfg: &LlamaConfig) -> Range<usize> {
        self.split(cfg.intermediate_size)
    }

    /// This rank's vocabulary rows (embedding, LM head): ceil-sized slices,
    /// the last one shorter where the vocabulary does not divide.
    pub fn vocab(&self, cfg: &LlamaConfig) -> Range<usize> {
        let per = cfg.vocab_size.div_ceil(self.world);
        let start = (self.rank * per).min(cfg.vocab_size);
        start..((self.rank + 1) * per).min(cfg.vocab_size)
    }
}

/// The collectives a tensor-parallel forward needs. Every rank calls the
/// same collectives in the same order; each returns the same tensor on
/// every rank.
pub trait Communicator: Send + Sync + fmt::Debug {
    fn rank(&self) -> usize;
    fn world(&self) -> usize;
    /// The element-wise sum of `t` over the ranks.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// The ranks' `t` concatenated along `dim`, in rank order (the shapes
    /// may differ along `dim`).
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor>;
    /// Called by a rank that fails between collectives: the others' pending
    /// and later collectives return an error instead of waiting for it.
    fn abort(&self, why: &str);
}

/// N ranks in one process (threads), exchanging tensors through shared
/// memory: the CPU twin of NCCL. Sums run in rank order on every rank, so
/// every rank gets the same bits. Ranks on different GPUs also work (each
/// copies the others' tensors to its device through the host): correct but
/// slow, the fallback of builds without NCCL.
#[derive(Debug, Clone)]
pub struct LocalComm {
    rank: usize,
    group: Arc<LocalGroup>,
}

#[derive(Debug)]
struct LocalGroup {
    world: usize,
    state: Mutex<GroupState>,
    cv: Condvar,
    /// How long a rank waits for the others before it gives up.
    timeout: Duration,
}

#[derive(Debug, Default)]
struct GroupState {
    /// The tensors of the collective in progress, by rank.
    slots: Vec<Option<Tensor>>,
    /// Ranks that have arrived at the current barrier, and its generation.
    arrived: usize,
    generation: u64,
    aborted: Option<String>,
}

impl LocalComm {
    /// The `world` communicators of one group (give one to each rank).
    pub fn group(world: usize) -> Vec<LocalComm> {
        Self::group_with_timeout(world, Duration::from_secs(600))
    }

    /// [`Self::group`], a collective failing once a rank waited `timeout`
    /// for the others.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<LocalComm> {
        let group = Arc::new(LocalGroup {
            world,
            state: Mutex::new(GroupState {
                slots: vec![None; world],
                ..Default::default()
            }),
            cv: Condvar::new(),
            timeout,
        });
        (0..world)
            .map(|rank| LocalComm {
                rank,
                group: group.clone(),
            })
            .collect()
    }

    fn poisoned() -> ModelError {
        ModelError::TensorParallel("a rank panicked inside a collective".into())
    }

    /// Waits until every rank has arrived (a generation-counting barrier).
    fn barrier<'a>(
        &'a self,
        mut st: std::sync::MutexGuard<'a, GroupState>,
    ) -> Result<std::sync::MutexGuard<'a, GroupState>> {
        let g = &self.group;
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == g.world {
            st.arrived = 0;
            st.generation += 1;
            g.cv.notify_all();
            return Ok(st);
        }
        loop {
            if let Some(why) = &st.aborted {
                return Err(ModelError::TensorParallel(format!("another rank failed: {why}")));
            }
            if st.generation != generation {
                return Ok(st);
            }
            let (next, wait) = g.cv.wait_timeout(st, g.timeout).map_err(|_| Self::poisoned())?;
            st = next;
            if wait.timed_out() && st.generation == generation && st.aborted.is_none() {
                st.aborted = Some(format!(
                    "rank {} waited {:?} for the other ranks in a collective",
                    self.rank, g.timeout
                ));
                g.cv.notify_all();
            }
        }
    }

    /// Puts `t` in this rank's slot, waits for all, reads every slot, then
    /// waits again so that no slot is overwritten before all have read.
    fn exchange(&self, t: &Tensor) -> Result<Vec<Tensor>> {
        let g = &self.group;
        let mut st = g.state.lock().map_err(|_| Self::poisoned())?;
        if let Some(why) = &st.aborted {
            return Err(ModelError::TensorParallel(format!("another rank failed: {why}")));
        }
        st.slots[self.rank] = Some(t.clone());
        let st = self.barrier(st)?;
        let all = st
            .slots
            .iter()
            .map(|s| {
                s.clone()
                    .ok_or_else(|| ModelError::TensorParallel("a rank's tensor is missing".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut st = self.barrier(st)?;
        st.slots[self.rank] = None;
        Ok(all)
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        if self.group.world == 1 {
            return Ok(t.clone());
        }
        let all = self.exchange(t)?;
        // In f32, in rank order: every rank the same bits, little rounding.
        // Other ranks' tensors on other GPUs come over through the host.
        let dev = t.device();
        let mut sum = all[0].to_device(dev)?.to_dtype(DType::F32)?;
        for x in &all[1..] {
            sum = (sum + x.to_device(dev)?.to_dtype(DType::F32)?)?;
        }
        Ok(sum.to_dtype(t.dtype())?)
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        if self.group.world == 1 {
            return Ok(t.clone());
        }
        let all = self.exchange(t)?;
        let all = all
            .iter()
            .map(|x| x.to_device(t.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&all, dim)?)
    }

    fn abort(&self, why: &str) {
        if let Ok(mut st) = self.group.state.lock() {
            if st.aborted.is_none() {
                st.aborted = Some(format!("rank {}: {why}", self.rank));
            }
            self.group.cv.notify_all();
        }
    }
}
