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
        // Ceil-sized slices: the last rank must still get at least one row.
        if cfg.vocab_size.div_ceil(world) * (world - 1) >= cfg.vocab_size {
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
    /// Called once every rank is out of its collectives after a failed
    /// step (the engine has every rank's reply): later collectives work
    /// again. Communicators that cannot recover say why.
    fn reset(&self) -> Result<()>;
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

    /// Clears the abort and whatever the failed collective left (arrivals,
    /// slots), for the whole group.
    fn reset(&self) -> Result<()> {
        let mut st = self.group.state.lock().map_err(|_| Self::poisoned())?;
        st.aborted = None;
        st.arrived = 0;
        st.generation += 1;
        st.slots.iter_mut().for_each(|s| *s = None);
        Ok(())
    }
}

/// One rank of a group of GPUs in this process talking through NCCL (the
/// `nccl` feature, which links libnccl: candle links its CUDA libraries at
/// build time, and so cudarc links NCCL's). Built for all ranks at
/// once ([`NcclComm::group`], `ncclCommInitAll`), one per GPU, each used by
/// its rank's thread; collectives are queued on the GPU's stream, in the
/// order the model calls them, with no host synchronisation.
#[cfg(feature = "nccl")]
pub struct NcclComm {
    /// `None` once aborted.
    comm: Mutex<Option<cudarc::nccl::safe::Comm>>,
    rank: usize,
    world: usize,
}

// SAFETY: an NCCL communicator may be called from any thread as long as no
// two calls on it run at once (the Mutex); the stream and context it holds
// are thread-safe CUDA handles.
#[cfg(feature = "nccl")]
unsafe impl Send for NcclComm {}
// SAFETY: as above: every use goes through the Mutex.
#[cfg(feature = "nccl")]
unsafe impl Sync for NcclComm {}

#[cfg(feature = "nccl")]
impl fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NcclComm(rank {} of {})", self.rank, self.world)
    }
}

#[cfg(feature = "nccl")]
impl NcclComm {
    /// One communicator per device (rank = index), all CUDA devices of
    /// this process, on each device's stream.
    pub fn group(devices: &[candle_core::Device]) -> Result<Vec<NcclComm>> {
        use cudarc::nccl::safe::Comm;
        let streams = devices
            .iter()
            .map(|d| match d {
                candle_core::Device::Cuda(c) => Ok(c.cuda_stream()),
                _ => Err(ModelError::TensorParallel(
                    "NCCL ranks must be CUDA devices".into(),
                )),
            })
            .collect::<Result<Vec<_>>>()?;
        let world = streams.len();
        let comms = Comm::from_devices(streams)
            .map_err(|e| ModelError::TensorParallel(format!("NCCL could not set up {world} ranks: {e:?}")))?;
        Ok(comms
            .into_iter()
            .enumerate()
            .map(|(rank, c)| NcclComm {
                comm: Mutex::new(Some(c)),
                rank,
                world,
            })
            .collect())
    }

    fn collective(&self, t: &Tensor, op: NcclOp) -> Result<Tensor> {
        let guard = self
            .comm
            .lock()
            .map_err(|_| ModelError::TensorParallel("a rank panicked in NCCL".into()))?;
        let Some(comm) = guard.as_ref() else {
            return Err(ModelError::TensorParallel(format!(
                "rank {}'s NCCL communicator was aborted",
                self.rank
            )));
        };
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&NcclCall { comm, op })?)
    }
}

#[cfg(feature = "nccl")]
#[derive(Clone, Copy)]
enum NcclOp {
    Sum,
    Gather,
}

/// One NCCL collective as a candle op on a contiguous CUDA tensor: `Sum`
/// keeps the shape; `Gather` returns the ranks' tensors stacked along a new
/// leading dim (`[world, ..]`).
#[cfg(feature = "nccl")]
struct NcclCall<'a> {
    comm: &'a cudarc::nccl::safe::Comm,
    op: NcclOp,
}

#[cfg(feature = "nccl")]
impl candle_core::CustomOp1 for NcclCall<'_> {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("NCCL collectives run on CUDA tensors")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::backend::BackendStorage;
        use cudarc::nccl::safe::ReduceOp;
        let world = self.comm.world_size();
        let n = l.shape().elem_count();
        let shape = match self.op {
            NcclOp::Sum => l.shape().clone(),
            NcclOp::Gather => {
                let mut d = vec![world];
                d.extend_from_slice(l.dims());
                candle_core::Shape::from(d)
            }
        };
        let dev = s.device.clone();
        let err = |e| candle_core::Error::Cuda(format!("NCCL: {e:?}").into());
        macro_rules! run {
            ($t:ty) => {{
                let src = s
                    .as_cuda_slice::<$t>()?
                    .slice(l.start_offset()..l.start_offset() + n);
                // SAFETY: NCCL writes every element of the output.
                let mut dst = unsafe { dev.alloc::<$t>(shape.elem_count()) }?;
                match self.op {
                    NcclOp::Sum => self
                        .comm
                        .all_reduce(&src, &mut dst, &ReduceOp::Sum)
                        .map_err(err)?,
                    NcclOp::Gather => self.comm.all_gather(&src, &mut dst).map_err(err)?,
                };
                candle_core::CudaStorage::wrap_cuda_slice(dst, dev)
            }};
        }
        let out = match s.dtype() {
            DType::BF16 => run!(half::bf16),
            DType::F16 => run!(half::f16),
            DType::F32 => run!(f32),
            d => candle_core::bail!("NCCL collectives of {d:?} tensors are not supported"),
        };
        Ok((out, shape))
    }
}

#[cfg(feature = "nccl")]
impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        self.collective(t, NcclOp::Sum)
    }

    /// Pads each rank's slice along `dim` to the largest (the vocabulary's
    /// last slice may be shorter), gathers, and cuts the padding out.
    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let len = t.dim(dim)?;
        // Every rank's length along `dim`, gathered first (tiny).
        let lens = self.collective(&Tensor::new(&[len as f32], t.device())?, NcclOp::Gather)?;
        let lens: Vec<usize> = lens
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .map(|&x| x as usize)
            .collect();
        let max = lens.iter().copied().max().unwrap_or(len);
        let padded = if len < max {
            t.pad_with_zeros(dim, 0, max - len)?
        } else {
            t.clone()
        };
        let all = self.collective(&padded, NcclOp::Gather)?; // [world, ..]
        let parts = lens
            .iter()
            .enumerate()
            .map(|(r, &l)| all.get(r)?.narrow(dim, 0, l))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    /// Ends this rank's communicator (`ncclCommAbort`, on drop): its later
    /// collectives fail. Peers already inside a collective with it are not
    /// woken by NCCL's blocking communicators (that needs non-blocking
    /// communicators polled with ncclCommGetAsyncError: not done yet).
    fn abort(&self, _why: &str) {
        if let Ok(mut c) = self.comm.lock() {
            c.take();
        }
    }

    fn reset(&self) -> Result<()> {
        match self.comm.lock() {
            Ok(c) if c.is_some() => Ok(()),
            _ => Err(ModelError::TensorParallel(format!(
                "rank {}'s NCCL communicator was aborted after a failed step; restart the engine",
                self.rank
            ))),
        }
    }
}
