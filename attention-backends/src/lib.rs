//! Attention backends: the [`AttentionBackend`] trait, the per-step
//! [`BatchMeta`] every backend reads, and the backends themselves, chosen at
//! run time by name through [`create_backend`].
//!
//! The model makes exactly one call per layer, [`AttentionStep::attend`],
//! handing over this step's queries and new keys/values of the *packed
//! batch* (the tokens of all scheduled sequences, one after the other). The
//! backend writes the new K/V into its cache and attends each sequence's
//! queries over that sequence's whole context. The model never knows which
//! backend or cache it talks to.
//!
//! Index vocabulary (the same words are used in every backend and kernel):
//!
//! ```text
//!  packed batch (T = num_tokens):
//!  |<- seq 0 query ->|<---- seq 1 query ---->|<- seq 2 ->|
//!  query_start[0]     query_start[1]          query_start[2]     query_start[3] = T
//!
//!  one sequence:
//!  |<------- context_len -------->|<--- query_len --->|
//!  [ tokens already in the KV cache ][ new this step   ]
//!  |<-------------------- seq_len ------------------->|
//!  query token i sits at position context_len + i and attends to keys 0..=context_len + i
//! ```
//!
//! Backends: `reference` (plain candle ops, any device and dtype, a
//! per-sequence KV store: the oracle every other backend is tested
//! against), `paged` (vLLM's block tables; `paged:N` picks the block size),
//! `vattention` (contiguous per-slot K/V in a virtual cache) and `pod` (the
//! same cache, a hybrid batch in one call; `pod:fused|serial|streams` force
//! its GPU path). On a CPU the last three run as twins of their CUDA kernels.

pub mod decode;
mod error;
pub mod flash;
pub mod linear;
mod meta;
pub mod ops;
mod paged;
#[cfg(feature = "cuda")]
mod paged_gpu;
mod reference;
pub mod rope;
pub mod sample;
mod vattention;
#[cfg(feature = "cuda")]
mod vattention_gpu;

use candle_core::{DType, Device, Tensor};

pub use error::{AttnError, Result};
pub use meta::{BatchMeta, LogitsAt, SeqChunk};
pub use paged::{PagedBackend, paged_use_v1};
pub use reference::ReferenceBackend;
pub use vattention::{
    POD_FEW_DECODES_SPLIT_WAVES, POD_FEW_SPLITS_UP_TO, POD_MIN_SHARE, POD_SPLIT_WAVES, POD_STREAMS_ABOVE,
    POD_TWO_TO_ONE_FROM, PREFILL_L2_BUDGET, PodKernel, PodPath, TWIN_SMS, VirtualBackend, decode_splits,
    decode_splits_static, plan_pod_step, pod_decode_sms, pod_kernel_for, pod_split_waves_for,
    pod_step_halves, prefill_l2_heads, rope_write_fusion, set_rope_write_fusion,
};
pub use vpod_kvcache::{KvManager, SeqId};

/// The attention geometry of a model, as the backends and caches need it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnConfig {
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA: `num_heads` is a multiple of it).
    pub num_kv_heads: usize,
    pub head_dim: usize,
    /// Longest sequence (prompt + generated tokens) a request may reach.
    pub max_seq_len: usize,
    /// Dtype of q/k/v and of the KV cache.
    pub dtype: DType,
}

impl AttnConfig {
    /// Query heads served by each key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }
}

/// One attention implementation together with the KV cache it reads.
///
/// Shapes of one call (T = tokens of the packed batch, see [`BatchMeta`]):
/// `q: [T, num_heads, head_dim]`, `k`, `v: [T, num_kv_heads, head_dim]`,
/// result `[T, num_heads, head_dim]`.
pub trait AttentionBackend: Send + std::fmt::Debug {
    /// The name it is selected by (`--backend NAME`).
    fn name(&self) -> &'static str;

    /// Builds the step's plan from its batch metadata, once per step, before
    /// the first layer's call (vLLM's metadata builder): cache growth for the
    /// new tokens, and on a GPU the step's addressing, work lists and (`pod`)
    /// the choice of kernel. [`AttentionStep::new`] calls it; every
    /// [`Self::forward`] of the step only executes the plan (a `forward` with
    /// a `meta` that was not planned plans it first).
    fn plan_step(&mut self, _meta: &BatchMeta) -> Result<()> {
        Ok(())
    }

    /// CUDA graphs: plans a decode step padded to its batch bucket
    /// ([`BatchMeta::padded`]) into device buffers that keep their addresses
    /// across every step planned under the same [`StaticPlan::key`], so that
    /// a step captured over them replays with a later step's values (the
    /// host rewrites the buffers here, in stream order, before the replay).
    /// Grows the cache for the new tokens as [`Self::plan_step`] does.
    /// `Ok(None)`: this backend or device has no such plan (the step runs
    /// eagerly, planned by [`Self::plan_step`]).
    fn plan_static_step(&mut self, _meta: &BatchMeta) -> Result<Option<StaticPlan>> {
        Ok(None)
    }

    /// Writes the step's new `k`/`v` of `layer` into the cache after each
    /// sequence's `context_len` cached tokens, then attends every query token
    /// causally over its sequence's first `context_len + i + 1` keys.
    fn forward(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        meta: &BatchMeta,
    ) -> Result<Tensor>;

    /// RoPE, the K/V write and attention straight from the QKV projection's
    /// output, in fewer launches, where the backend has such a path for this
    /// step: `qkv [T, (heads + 2 kv_heads) head_dim]` (q heads, k heads, v
    /// heads), `cos`, `sin [T, head_dim / 2]` (the step's rows of the
    /// rotary tables) -> `Some([T, heads, head_dim])`, what [`Self::forward`]
    /// gives on the rotated q and k and on v. `None` (the default): no such
    /// path; the caller rotates and calls [`Self::forward`].
    fn forward_rope(
        &mut self,
        _layer: usize,
        _qkv: &Tensor,
        _cos: &Tensor,
        _sin: &Tensor,
        _meta: &BatchMeta,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// Frees the KV of a finished (or preempted) sequence.
    fn release(&mut self, seq: SeqId);

    /// The cache's admission interface, for a scheduler; `None` for a
    /// backend whose store grows without a budget (`reference`).
    fn kv_manager(&mut self) -> Option<&mut dyn KvManager> {
        None
    }

    /// Called right after a step has been launched (before its results are
    /// read), with each running sequence's length after the *next* step:
    /// a backend may prepare memory for it while the GPU works (the
    /// vAttention backends map the pages ahead). A hint: the next step may
    /// differ.
    fn prepare_next(&mut self, _next: &[(SeqId, usize)]) -> Result<()> {
        Ok(())
    }

    /// How the last step's attention ran, when the backend chooses per step
    /// (the `pod` backend on a GPU: fused, or serial and why); for the
    /// engine's step records.
    fn step_path(&self) -> Option<String> {
        None
    }

    /// Benchmarks: the kernel choices of later steps (`prefill_kernel`,
    /// `pod_mode`, `pod_tuning` and `time_kernels` of `opts`; the cache's
    /// options stay as built), so that variants run on one filled cache. Backends without
    /// such choices refuse.
    fn retune(&mut self, _opts: &BackendOptions) -> Result<()> {
        Err(AttnError::Unsupported {
            backend: self.name(),
            reasons: "it has no kernel choices to change".into(),
        })
    }

    /// GPU milliseconds of the plain prefill kernel in the last forward
    /// that ran one, with [`BackendOptions::time_kernels`] set (waits for
    /// it); `None` without timing, on the CPU, or where no such kernel ran.
    fn prefill_kernel_ms(&self) -> Option<f64> {
        None
    }
}

/// A decode step's plan in fixed device buffers
/// ([`AttentionBackend::plan_static_step`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StaticPlan {
    /// Steps with the same key run the same kernels with the same launch
    /// shapes over the same buffers (rows, decode splits or partitions).
    pub key: String,
}

/// How the `pod` backend runs a hybrid step on the GPU (`pod:MODE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodMode {
    /// The fused kernel where the planner predicts a gain, else serial (`pod`).
    #[default]
    Auto,
    /// Always the fused kernel (`pod:fused`).
    Fused,
    /// The prefill kernel, then the decode kernel (`pod:serial`, = `vattention`).
    Serial,
    /// The prefill and decode kernels on two CUDA streams (`pod:streams`).
    Streams,
}

impl PodMode {
    const NAMES: [(&'static str, PodMode); 4] = [
        ("auto", PodMode::Auto),
        ("fused", PodMode::Fused),
        ("serial", PodMode::Serial),
        ("streams", PodMode::Streams),
    ];

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Self::NAMES.iter().find(|(n, _)| *n == s).map(|(_, m)| *m)
    }
}

/// The causal prefill kernel of the `vattention` backend (and of the `pod`
/// backend's steps that do not run fused) over the virtual cache; every
/// kernel computes the same function. Where the device or the cache's pages
/// do not allow a kernel's TMA loads, the plan takes the next one down
/// (`Wsp` -> `Tma64` -> `W4p`) and the step record names the kernel that ran
/// ([`AttentionBackend::step_path`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PrefillKernel {
    /// 128-row query tiles, 8 warps (`slot_prefill_w8_bf16`).
    W8,
    /// 64-row query tiles, 4 warps (`slot_prefill_w4_bf16`).
    W4,
    /// 64-row tiles with the softmax overlapped with the tensor cores
    /// (`slot_prefill_w4p_bf16`).
    W4p,
    /// `W4p` with its K/V tiles loaded by TMA (`slot_prefill_w4t_bf16`,
    /// sm_90a, pages of a multiple of 64 rows).
    Tma64,
    /// Warp-specialized (`slot_prefill_wsp_bf16`, sm_90a, pages of a
    /// multiple of 128 rows): a TMA producer warp, a 2-stage ring of 128-key
    /// K/V tiles loaded K one tile ahead of V (FA3's order), two 64-row
    /// consumer warpgroups sharing each tile and taking turns issuing GEMMs
    /// (ping-pong), so one's softmax runs under the other's, each turn
    /// issuing QK_i before it waits for V_{i-1}. ~700 TFLOP/s on a 16K
    /// causal prompt and ~620 on a 1024-token chunk over 4K on an H200,
    /// 1.00x and 1.04x of FlashAttention-3's single-request kernel in the
    /// same call (results/2026-12-04-h200-wspk). Lost against it: K and V
    /// loaded in tile order (-3-7 %, -wspk), no ping-pong (-10-20 %,
    /// results/2026-12-03-h200-prefill-ws), a 3-stage ring (no faster, -ws2
    /// and -wspk), statically strided persistent CTAs (-2-4 %, -ws2),
    /// dynamically scheduled persistent CTAs (-1-6 %) and a KV-head-major grid
    /// (-3-5 % on a chunk over 4K; results/2026-12-04-h200-wsp-uniform).
    /// The default, until [`Self::WspSlim`] (faster in every case measured)
    /// takes its place with the slim pair ([`PodTuning::slim_streams`]):
    /// as the default prefill, `WspSlim` makes the planner's two-stream
    /// steps run the slim decode beside it, which has not yet run under
    /// compute-sanitizer (`bash scripts/gpu-run.sh slim twins`).
    #[default]
    Wsp,
    /// `Wsp` launched at 136 registers a thread (`slot_prefill_wsps_bf16`:
    /// the consumers, which use ~190, get 192, the producer warpgroup 24),
    /// 52 K registers a block instead of 64.5 K, so that the two-stream
    /// path's slim decode blocks ([`SlimDecode`]: 4 warps at 104
    /// registers, one a sub-partition, 64 KiB; GQA groups of at most 8) fit
    /// on the prefill's SMs beside it: the decodes' memory traffic under the
    /// prefill's GEMMs instead of after its last wave. Alone it is also the
    /// fastest tile, 1-4 % ahead of `Wsp` in every case of
    /// the H200's A/B (kernel medians, three placements and two runs each:
    /// 718-720 TFLOP/s on a 16K causal prompt where FA3 ran 694-712 in the
    /// same call, 644-651 on a 1024-token chunk over 4K where FA3 ran
    /// 594-609, 713-715 on a 2048-token chunk over 16K;
    /// results/2026-12-05-h200-podfi-energy), and it was 0-4 % ahead as the
    /// serial pair's prefill (results/2026-12-04-h200-slim). Same
    /// instructions as `Wsp`; at 192 registers ptxas waits for each tile's
    /// PV product ~140 instructions earlier and so returns the V stage to
    /// the ring sooner (results/2026-12-05-wsds-sass). The partitioned POD
    /// kernel's prefill role follows it (`pod_wsds_bf16`).
    WspSlim,
}

impl PrefillKernel {
    /// Every kernel, in the order the benchmarks list them.
    pub const ALL: [PrefillKernel; 6] = [
        Self::W8,
        Self::W4,
        Self::W4p,
        Self::Tma64,
        Self::Wsp,
        Self::WspSlim,
    ];

    /// The kernel's `extern "C"` symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::W8 => "slot_prefill_w8_bf16",
            Self::W4 => "slot_prefill_w4_bf16",
            Self::W4p => "slot_prefill_w4p_bf16",
            Self::Tma64 => "slot_prefill_w4t_bf16",
            Self::Wsp => "slot_prefill_wsp_bf16",
            Self::WspSlim => "slot_prefill_wsps_bf16",
        }
    }

    /// The warp-specialized tile (`slot_prefill_ws.cuh`): sm_90a, TMA boxes
    /// of 128 rows.
    pub fn warp_specialized(self) -> bool {
        matches!(self, Self::Wsp | Self::WspSlim)
    }

    /// Query rows of one work item, per query head.
    pub fn rows(self) -> usize {
        match self {
            Self::W8 | Self::Wsp | Self::WspSlim => 128,
            Self::W4 | Self::W4p | Self::Tma64 => 64,
        }
    }
}

/// How the fused POD kernel's blocks pick their role (`pod_bf16.cu`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodPolicy {
    /// A fixed number of prefill blocks stays resident per SM
    /// ([`PodTuning::resident_prefill`]); the others run decode splits
    /// while both kinds of work last (the measured best).
    #[default]
    Resident,
    /// The POD paper's per-SM ticket ratio.
    Ticket,
}

/// The POD path's kernel settings. The defaults are the measured best;
/// benchmarks and tests sweep the others (`vpod-bench hybrid --variants`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodTuning {
    /// Blocks per SM of the fused kernel: `None` = the planner's kernel (2
    /// for its 1:1 choice, partitioned or 3 for 2:1); 2 = `podp_bf16`
    /// (`pod_bf16` without [`Self::pipelined_prefill`]), 3 = `pod3_bf16`
    /// (other values: the planner's; the two-warpgroup `pod_ws_bf16` that 1
    /// picked lost and is gone, results/2026-11-21-h100-pod3).
    pub blocks_per_sm: Option<usize>,
    pub policy: PodPolicy,
    /// Prefill blocks resident per SM under [`PodPolicy::Resident`]
    /// (clamped to 1 ..= blocks per SM - 1; `None`: blocks per SM - 1).
    pub resident_prefill: Option<usize>,
    /// Decode splits of a fused step for this many waves of decode blocks
    /// (`None`: [`pod_split_waves_for`]'s choice).
    pub split_waves: Option<usize>,
    /// The fused kernels' 64-row prefill role overlaps its softmax with the
    /// tensor cores.
    pub pipelined_prefill: bool,
    /// The fused kernels' prefill role loads K/V by TMA (where the device
    /// and the pages allow).
    pub tma_prefill: bool,
    /// Fused steps run the SM-partitioned kernel ([`PodKernel::Partitioned`])
    /// whatever kernel the planner picked.
    pub partitioned: bool,
    /// The partitioned kernel's decode-first blocks, one per SM (`None`:
    /// [`pod_decode_sms`]'s rule). 0: decode last: every block takes a
    /// prefill tile while any is left, and the decodes run on the SMs that
    /// the prefill's last wave leaves idle, then on all.
    pub decode_sms: Option<usize>,
    /// The planner's prefill-heavy hybrid steps (its serial and two-stream
    /// verdicts) run the slim pair on two streams: `slot_prefill_wsps_bf16`
    /// beside the slim decode of [`Self::slim_decode`], whose blocks share
    /// the SMs (where the prefill is [`PrefillKernel::Wsp`] or
    /// [`PrefillKernel::WspSlim`], the device runs the TMA tile and the GQA
    /// group is at most 8). On the H200's 48-case grid the planner with it
    /// (and [`SlimDecode::WarpRing`]) ran 1.078x mean over our best serial
    /// pair with no step > 3 % slower, and median 1.087x over FlashInfer's
    /// best serial pair (FA3, then its best decode) in the same call, where
    /// the planner without it ran 1.013x and 1.014x
    /// (results/2026-12-05-h200-podfi-energy). Off by default until both
    /// slim decodes pass their CPU twins and compute-sanitizer on a GPU
    /// (`bash scripts/gpu-run.sh slim twins`; the call was lost to the
    /// device pool): then it ships on, with `WarpRing` and
    /// [`PrefillKernel::WspSlim`] as the default prefill.
    pub slim_streams: bool,
    /// The slim pair's decode kernel: [`SlimDecode::Tiles`] (the default,
    /// checked against its twin on the H200) or [`SlimDecode::WarpRing`]
    /// (the faster in the pair, not yet checked on a GPU).
    pub slim_decode: SlimDecode,
}

/// The slim decode kernel of the slim pair ([`PodTuning::slim_streams`]):
/// transposed products, GQA groups of at most 8, 64 KiB, at most 104
/// registers a thread, one block an SM beside `slot_prefill_wsps_bf16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SlimDecode {
    /// `slot_decode_slim_bf16`: 64-key K and V tiles through a block-wide
    /// ring of 2 stages, so at most one tile (32 KiB) is in flight while the
    /// block computes, and every tile ends at a block barrier. On the H200's
    /// 48-case grid the planner with it ran 1.057x mean over our best serial
    /// pair, 1.076x median over FlashInfer's (results/2026-12-05-h200-podfi-energy).
    #[default]
    Tiles,
    /// `slot_decode_slimr_bf16`: each warp streams its own 16 keys of every
    /// tile through a ring of 4 slots of 4 KiB (K and V apart) in the same
    /// 64 KiB, refilling a slot as soon as it has read it: 48 KiB of a block
    /// in flight while it computes, no block barrier in the key loop. The
    /// planner with it ran 1.078x mean over our best serial
    /// pair and 1.087x median over FlashInfer's on the same grid, ahead of
    /// [`Self::Tiles`] on 33 of the 48 steps and level on 4 (up to 1.14x
    /// against 1.04x: a 2K chunk over 16K beside 32 decodes of 4K). Not
    /// yet run against its twin or under compute-sanitizer.
    WarpRing,
}

impl SlimDecode {
    /// Both slim decodes.
    pub const ALL: [SlimDecode; 2] = [Self::Tiles, Self::WarpRing];

    /// The kernel's `extern "C"` symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Tiles => "slot_decode_slim_bf16",
            Self::WarpRing => "slot_decode_slimr_bf16",
        }
    }
}

impl Default for PodTuning {
    fn default() -> Self {
        Self {
            blocks_per_sm: None,
            policy: PodPolicy::Resident,
            resident_prefill: None,
            split_waves: None,
            pipelined_prefill: true,
            tma_prefill: true,
            partitioned: false,
            decode_sms: None,
            slim_streams: false,
            slim_decode: SlimDecode::Tiles,
        }
    }
}

/// Knobs of the cache-owning backends.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendOptions {
    /// Tokens per block of the paged cache.
    pub block_size: usize,
    /// Physical page of the virtual cache, in bytes.
    pub page_size: usize,
    /// KV memory; `None`: enough for `max_seqs` sequences of `max_seq_len`.
    pub kv_memory: Option<usize>,
    /// Sequences the virtual cache has slots for.
    pub max_seqs: usize,
    /// The virtual cache's all-layers-in-one-region layout.
    pub megacache: bool,
    /// When the virtual cache maps pages: overlapped with the GPU's work on a
    /// mapper thread (default), or synchronously inside the step.
    pub mapping: vpod_kvcache::Mapping,
    /// Fault injection for tests: multiplies the softmax scale of the
    /// paged / vattention / pod twins, so that a test can check that a
    /// wrong backend is caught. Never set in normal use.
    pub fault_scale: Option<f32>,
    /// The `pod` backend's GPU path (`pod:MODE` sets it).
    pub pod_mode: PodMode,
    /// The plain prefill kernel over the virtual cache (`vattention`, and
    /// `pod` steps that do not run fused).
    pub prefill_kernel: PrefillKernel,
    /// L2 the warp-specialized prefill tiles (and the partitioned POD
    /// kernel's prefill role) may fill with K/V, bytes: their CTAs run in
    /// sections of whole KV heads whose K and V over the step's longest
    /// work item fit in it, section by section ([`prefill_l2_heads`]). 0:
    /// one section of every head (the order before, all heads of a work
    /// item together).
    pub prefill_l2_budget: usize,
    /// The `pod` backend's fused-kernel settings.
    pub pod_tuning: PodTuning,
    /// Benchmarks: record CUDA events around the plain prefill kernel of
    /// each forward, so that [`AttentionBackend::prefill_kernel_ms`] can
    /// read its GPU time (the GPU `vattention` / `pod` backends; two event
    /// records a layer).
    pub time_kernels: bool,
    /// The engine replays decode steps on a GPU as CUDA graphs over the
    /// backend's static plans ([`AttentionBackend::plan_static_step`];
    /// `--cuda-graphs on|off`, on by default).
    pub cuda_graphs: bool,
}

impl Default for BackendOptions {
    fn default() -> Self {
        Self {
            block_size: 16,
            page_size: vpod_kvcache::DEFAULT_PAGE_SIZE,
            kv_memory: None,
            max_seqs: 8,
            megacache: false,
            mapping: vpod_kvcache::Mapping::Overlapped,
            fault_scale: None,
            pod_mode: PodMode::Auto,
            prefill_kernel: PrefillKernel::default(),
            prefill_l2_budget: PREFILL_L2_BUDGET,
            pod_tuning: PodTuning::default(),
            time_kernels: false,
            cuda_graphs: true,
        }
    }
}

impl BackendOptions {
    /// The KV budget in bytes for this model: `kv_memory`, or room for
    /// `max_seqs` sequences of the full context, each K and V region of
    /// every layer rounded up to whole pages (so that the virtual cache's
    /// page granularity cannot starve it).
    pub fn kv_budget_bytes(&self, cfg: &AttnConfig) -> usize {
        self.kv_memory.unwrap_or_else(|| {
            let row = cfg.num_kv_heads * cfg.head_dim * cfg.dtype.size_in_bytes();
            let region = (cfg.max_seq_len * row).div_ceil(self.page_size) * self.page_size;
            self.max_seqs * 2 * cfg.num_layers * region
        })
    }
}

/// Why backend `name`'s kernels cannot run on `device` (none on a CPU,
/// where its twin runs): this build's CUDA support, bf16, head_dim 128 and,
/// with `max_group`, the most query heads per KV head the kernels serve.
pub(crate) fn device_reasons(
    name: &str,
    cfg: &AttnConfig,
    device: &Device,
    max_group: Option<usize>,
) -> Vec<String> {
    let mut r = Vec::new();
    if device.is_cuda() {
        if !cfg!(feature = "cuda") {
            r.push(format!(
                "this build has no CUDA support for `{name}` (build with --features cuda)"
            ));
        }
        if cfg.dtype != DType::BF16 {
            r.push(format!(
                "the CUDA kernels are bf16 only (got {:?}; use --dtype bf16)",
                cfg.dtype
            ));
        }
        if cfg.head_dim != decode::DECODE_HEAD_DIM {
            r.push(format!(
                "the CUDA kernels need head_dim 128 (got {})",
                cfg.head_dim
            ));
        }
        if let Some(g) = max_group
            && cfg.num_kv_heads > 0
            && cfg.num_heads / cfg.num_kv_heads > g
        {
            r.push(format!(
                "the CUDA kernels serve at most {g} query heads per KV head"
            ));
        }
    } else if !device.is_cpu() {
        r.push("only CPU and CUDA devices are supported".into());
    }
    r
}

/// Makes room in `kv` for every sequence of the step: admits a new sequence
/// (context 0), grows a known one to its `seq_len`. A scheduler usually did
/// this already; then it is a no-op.
pub(crate) fn make_room(kv: &mut dyn KvManager, meta: &BatchMeta) -> Result<()> {
    for s in meta.seqs() {
        match kv.capacity(s.seq_id) {
            None if s.context_len == 0 => kv.admit(s.seq_id, s.seq_len())?,
            None => return Err(vpod_kvcache::KvCacheError::UnknownSequence { seq: s.seq_id }.into()),
            Some(_) => kv.grow(s.seq_id, s.seq_len())?,
        }
    }
    Ok(())
}

/// What one model forward pass needs to call attention: the backend (with
/// its cache) and this step's metadata. Each layer calls [`Self::attend`] once.
#[derive(Debug)]
pub struct AttentionStep<'a> {
    backend: &'a mut dyn AttentionBackend,
    meta: &'a BatchMeta,
}

impl<'a> AttentionStep<'a> {
    /// Plans the step on `backend` ([`AttentionBackend::plan_step`]); the
    /// layers' [`Self::attend`] calls then execute that plan.
    pub fn new(backend: &'a mut dyn AttentionBackend, meta: &'a BatchMeta) -> Result<Self> {
        backend.plan_step(meta)?;
        Ok(Self { backend, meta })
    }

    /// A step whose plan the backend already holds
    /// ([`AttentionBackend::plan_static_step`] for this `meta`).
    pub fn planned(backend: &'a mut dyn AttentionBackend, meta: &'a BatchMeta) -> Self {
        Self { backend, meta }
    }

    pub fn meta(&self) -> &BatchMeta {
        self.meta
    }

    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// `q: [T, num_heads, head_dim]`, `k`, `v: [T, num_kv_heads, head_dim]` -> `[T, num_heads, head_dim]`.
    pub fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.backend.forward(layer, q, k, v, self.meta)
    }

    /// [`AttentionBackend::forward_rope`]: attention straight from the QKV
    /// projection's output where the backend fuses RoPE and the K/V write
    /// for this step; `None`: rotate, then [`Self::attend`].
    pub fn attend_rope(
        &mut self,
        layer: usize,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
    ) -> Result<Option<Tensor>> {
        self.backend.forward_rope(layer, qkv, cos, sin, self.meta)
    }
}

/// A backend the registry knows: its name, what it is, whether it can run
/// here and how to build it.
#[derive(Debug, Clone, Copy)]
pub struct BackendInfo {
    pub name: &'static str,
    pub description: &'static str,
    /// Reasons it cannot run this model on this device; empty when it can.
    pub check: fn(&AttnConfig, &Device, &BackendOptions) -> Vec<String>,
    build: fn(&AttnConfig, &Device, &BackendOptions) -> Result<Box<dyn AttentionBackend>>,
}

/// Every backend, in the order `--backend` help lists them.
pub const BACKENDS: &[BackendInfo] = &[
    BackendInfo {
        name: "reference",
        description: "plain candle ops over a per-sequence KV store; any device, any dtype (the correctness oracle)",
        check: |c, d, _| ReferenceBackend::unsupported_reasons(c, d),
        build: |cfg, dev, _| Ok(Box::new(ReferenceBackend::new(cfg.clone(), dev.clone())?)),
    },
    BackendInfo {
        name: "paged",
        description: "vLLM v0.2.7 PagedAttention over block tables (paged:16 .. paged:128 pick the block size)",
        check: PagedBackend::unsupported_reasons,
        build: |cfg, dev, o| Ok(Box::new(PagedBackend::new(cfg.clone(), dev, o)?)),
    },
    BackendInfo {
        name: "vattention",
        description: "FlashAttention-style kernels over the contiguous per-slot K/V of the virtual (vAttention) cache",
        check: |c, d, o| VirtualBackend::unsupported_reasons("vattention", c, d, o),
        build: |cfg, dev, o| Ok(Box::new(VirtualBackend::new("vattention", cfg.clone(), dev, o)?)),
    },
    BackendInfo {
        name: "pod",
        description: "POD-Attention: a hybrid batch's prefill chunks and decodes in one fused kernel, over the virtual cache (pod:fused|serial|streams force a GPU path)",
        check: |c, d, o| VirtualBackend::unsupported_reasons("pod", c, d, o),
        build: |cfg, dev, o| Ok(Box::new(VirtualBackend::new("pod", cfg.clone(), dev, o)?)),
    },
];

/// A backend spec's variant: `paged:N`'s block size, `pod:MODE`'s mode.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Variant {
    BlockSize(usize),
    Pod(PodMode),
}

/// Splits `name[:variant]` (e.g. `paged:128`, `pod:fused`).
fn parse_name(spec: &str) -> Result<(&str, Option<Variant>)> {
    let unknown = || AttnError::UnknownBackend {
        name: spec.to_string(),
        known: backend_names(),
    };
    match spec.split_once(':') {
        None => Ok((spec, None)),
        Some((name @ "paged", n)) => n
            .parse::<usize>()
            .map(|n| (name, Some(Variant::BlockSize(n))))
            .map_err(|_| unknown()),
        Some((name @ "pod", m)) => PodMode::parse(m)
            .map(|m| (name, Some(Variant::Pod(m))))
            .ok_or_else(unknown),
        Some(_) => Err(unknown()),
    }
}

/// Looks a backend up by name (`paged:N` included).
pub fn backend_info(spec: &str) -> Result<&'static BackendInfo> {
    let (name, _) = parse_name(spec)?;
    BACKENDS
        .iter()
        .find(|b| b.name == name)
        .ok_or_else(|| AttnError::UnknownBackend {
            name: spec.to_string(),
            known: backend_names(),
        })
}

/// Comma-separated names of all backends.
pub fn backend_names() -> String {
    BACKENDS.iter().map(|b| b.name).collect::<Vec<_>>().join(", ")
}

/// Builds backend `spec` (`name`, `paged:N` or `pod:MODE`) for this model and device, or
/// says why it cannot run.
pub fn create_backend(
    spec: &str,
    cfg: &AttnConfig,
    device: &Device,
    opts: &BackendOptions,
) -> Result<Box<dyn AttentionBackend>> {
    let info = backend_info(spec)?;
    let mut opts = opts.clone();
    match parse_name(spec)?.1 {
        Some(Variant::BlockSize(bs)) => opts.block_size = bs,
        Some(Variant::Pod(m)) => opts.pod_mode = m,
        None => {}
    }
    let reasons = (info.check)(cfg, device, &opts);
    if !reasons.is_empty() {
        return Err(AttnError::Unsupported {
            backend: info.name,
            reasons: reasons.join("; "),
        });
    }
    (info.build)(cfg, device, &opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `pod:MODE` picks the POD path, other suffixes are refused with the known names.
    #[test]
    fn pod_modes_parse() {
        assert_eq!(parse_name("pod").unwrap(), ("pod", None));
        assert_eq!(
            parse_name("pod:streams").unwrap(),
            ("pod", Some(Variant::Pod(PodMode::Streams)))
        );
        assert_eq!(
            parse_name("paged:32").unwrap(),
            ("paged", Some(Variant::BlockSize(32)))
        );
        for bad in ["pod:fast", "vattention:fused", "paged:x"] {
            let e = parse_name(bad).unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("paged, vattention, pod"), "{e}");
        }
        let cfg = reference::tests::cfg();
        let b = create_backend("pod:serial", &cfg, &Device::Cpu, &BackendOptions::default()).unwrap();
        assert_eq!(b.name(), "pod");
    }
}
