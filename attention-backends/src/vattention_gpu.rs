//! The GPU path of the `vattention` backend: per step, one upload of the
//! step's addressing (K/V write rows, prefill work list, decode list); per
//! layer, one candle custom op over (q, new k, new v) that writes the new
//! rows into the VMM-backed slots (`slot_write_kv2_bf16`, K and V in one launch), runs the causal
//! prefill kernel over the step's prompt chunks (the typed
//! [`PrefillKernel`]: `slot_prefill_w4t_bf16` by default on an H100/H200,
//! K/V by TMA; `slot_prefill_wsp_bf16`, warp-specialized; `slot_prefill_w{4p,4,8}_bf16`)
//! and the split-KV decode kernel over the decode tokens (`slot_decode_bf16`,
//! whose last block per sequence and KV head merges the splits), each filling its own
//! rows of the output. No block tables: kernels get the layer's base
//! address and the slot / position strides.
//!
//! The `pod` backend's hybrid steps take one of three paths ([`PodPath`]):
//! the same two kernels one after the other (serial), the two on two CUDA
//! streams, or a POD kernel (both in one launch, see `kernels/src/pod_bf16.cu`:
//! `podp_bf16` / `pod3_bf16`, prefill and decode blocks side by side on
//! every SM; on sm_90a `pod_wsd_bf16`, the SMs partitioned by role with the
//! warp-specialized prefill tile).

use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DeviceRepr, LaunchConfig, PushKernelArg, sys,
};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, DType, Layout, Shape};
use half::bf16;
use vpod_kvcache::{SlotView, VirtualCache};

use crate::ops::cuda::err;
use crate::{BatchMeta, PodPath, PrefillKernel, Result};

/// Dynamic shared memory of the prefill kernels (slot_prefill.cuh's
/// `PrefillShape::SMEM`, either tile): 2 stages of 64-key K and V tiles (the
/// query tile passes through the second) and 1 KiB to start the stages on a
/// 1024-byte boundary (wgmma's swizzle).
pub(crate) const PREFILL_SMEM: usize = 2 * 2 * 64 * 256 + 1024;
/// The same for the pipelined 64-row tile (`prefill_tile_pipelined`: the
/// previous tile's V holds a third stage).
const PREFILL_PIPE_SMEM: usize = 3 * 2 * 64 * 256 + 1024;
/// Up to this many splits the decode kernel merges them itself; with more,
/// one merging block per (decode, KV head) is a serial tail (H100, 16K
/// context, batch 1: 37 us fused vs 28 + 6 us with the combine kernel at 33
/// splits), so the combine kernel merges.
const FUSED_MERGE_MAX_SPLITS: usize = 16;

/// Dynamic shared memory of `slot_prefill_wsp_bf16` (slot_prefill_ws.cuh's
/// `WsShape<2>::SMEM`): Q (128 rows), 2 stages of 128-key K and V tiles, 1 KiB
/// of alignment.
const PREFILL_WS_SMEM: usize = 128 * 256 + 2 * 2 * 128 * 256 + 1024;

/// The prefill kernel a plan runs for `asked`: the kernels that load by TMA
/// need compute capability 9.0 (`dims`, [`prefill_tma`]) and pages of a
/// multiple of their box rows (a box then never reaches an unmapped page);
/// else the next one down (`Wsp` or `WspSlim` -> `Tma64` -> `W4p`).
fn resolve_prefill(asked: PrefillKernel, dims: Option<[u64; 2]>, tokens_per_page: usize) -> PrefillKernel {
    let tma = |rows: usize| dims.is_some() && tokens_per_page.is_multiple_of(rows);
    match asked {
        k if k.warp_specialized() && tma(128) => k,
        k if (k.warp_specialized() || k == PrefillKernel::Tma64) && tma(64) => PrefillKernel::Tma64,
        k if k.warp_specialized() || k == PrefillKernel::Tma64 => PrefillKernel::W4p,
        k => k,
    }
}

/// A CUtensorMap as a kernel argument (`TmaMap` in kernels/src/tma.cuh).
#[repr(C, align(128))]
#[derive(Debug, Clone, Copy)]
pub(crate) struct TmaArg([u64; 16]);

// SAFETY: plain bytes, passed by value as the kernel's `const __grid_constant__ TmaMap`.
unsafe impl DeviceRepr for TmaArg {}

/// Whether the prefill kernels may load their K/V with TMA
/// (`slot_prefill_w4t_bf16`, `slot_prefill_wsp_bf16`, `podp_tma_bf16`,
/// `pod3_tma_bf16`; kernels/src/tma.cuh): on compute capability 9.0 (the
/// sm_90a cubin). The cache's geometry `[max_len, slots]` when they may
/// ([`resolve_prefill`] checks the pages; the POD kernels' 64-row boxes also
/// need pages of a multiple of 64 rows, and [`crate::PodTuning::tma_prefill`]).
fn prefill_tma(dev: &CudaDevice, cache: &VirtualCache) -> Option<[u64; 2]> {
    use sys::CUdevice_attribute::*;
    let ctx = dev.cuda_stream().context().clone();
    let major = ctx.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR).ok()?;
    let minor = ctx.attribute(CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR).ok()?;
    let c = cache.config();
    ((major, minor) == (9, 0)).then_some([c.max_len as u64, c.max_seqs as u64])
}

/// Whether the slim pair (`slot_prefill_wsps_bf16` beside the slim decode of
/// [`crate::PodTuning::slim_decode`], [`crate::PodTuning::slim_streams`])
/// runs here: the TMA prefill on this device and cache, and GQA groups of at
/// most 8 (the slim decodes' transposed products hold 8 heads).
pub(crate) fn slim_pair_runs(dev: &CudaDevice, cache: &VirtualCache, group: usize) -> bool {
    group <= crate::decode::cuda::SLIM_MAX_GROUP
        && resolve_prefill(
            PrefillKernel::WspSlim,
            prefill_tma(dev, cache),
            cache.tokens_per_page(),
        ) == PrefillKernel::WspSlim
}

/// The tensor map of one layer's K or V for the TMA prefill kernels: dims
/// (kv_heads * 128, max_len, slots), boxes of 64 dims x `box_rows` positions,
/// 128-byte swizzle.
fn tensor_map(
    view: &SlotView,
    kv_heads: usize,
    [max_len, slots]: [u64; 2],
    box_rows: u32,
) -> candle_core::Result<TmaArg> {
    use sys::*;
    let dims: [u64; 3] = [(kv_heads * crate::decode::DECODE_HEAD_DIM) as u64, max_len, slots];
    let strides: [u64; 2] = [view.pos_stride as u64 * 2, view.slot_stride as u64 * 2];
    let boxes: [u32; 3] = [64, box_rows, 1];
    let elem: [u32; 3] = [1, 1, 1];
    let mut map = std::mem::MaybeUninit::<CUtensorMap>::zeroed();
    // SAFETY: the arrays outlive the call, which only writes `map`; base and
    // strides are 16-byte multiples (bf16 rows of kv_heads * 128).
    unsafe {
        cuTensorMapEncodeTiled(
            map.as_mut_ptr(),
            CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
            3,
            view.base as *mut std::ffi::c_void,
            dims.as_ptr(),
            strides.as_ptr(),
            boxes.as_ptr(),
            elem.as_ptr(),
            CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
        .result()
        .map_err(err)?;
    }
    // SAFETY: initialised by the call above (or zeroed).
    let map = unsafe { map.assume_init() };
    let mut words = [0u64; 16];
    words.copy_from_slice(&map.opaque[..16]);
    Ok(TmaArg(words))
}

/// Warps of a POD kernel block (either role; pod_wsd_bf16's block has three such groups).
const POD_WARPS: usize = 4;

/// pod_wsd_bf16's dynamic shared memory (`POD_WSD_SMEM`, pod_bf16.cu): six
/// decode stages (two warpgroups of 3), more than the
/// warp-specialized prefill tile's [`PREFILL_WS_SMEM`].
const POD_WSD_SMEM: usize = 6 * 2 * 64 * 256;
const _: () = assert!(POD_WSD_SMEM >= PREFILL_WS_SMEM);

/// Which POD kernel runs a fused step (`pod_bf16.cu`, "Blocks per SM"):
/// (kernel, dynamic shared memory, blocks per SM). The planner's choice
/// ([`crate::PodKernel`]): `podp_bf16` (one to one: 2 blocks per SM, the
/// pipelined prefill tile, a 3-stage decode pipeline, 97 KiB) or
/// `pod3_bf16` (two to one: 3 blocks per SM, 168 registers per thread, a
/// 2-stage decode pipeline, 65 KiB), as their `_tma` entries when `tma`
/// (the prefill role loads by TMA, [`prefill_tma`]).
/// [`crate::PodTuning::blocks_per_sm`] overrides it: 2 (`podp_bf16`, or
/// `pod_bf16` without the pipelined prefill) or 3 (`pod3_bf16`).
/// [`crate::PodKernel::Partitioned`] is `pod_wsd_bf16` (one block per SM),
/// or `pod_wsds_bf16` where the step's plain prefill kernel is
/// [`PrefillKernel::WspSlim`]: its prefill role then runs at the slim
/// tile's consumer registers (192 instead of 240), as that kernel does.
fn pod_kernel(
    k: crate::PodKernel,
    tma: bool,
    t: &crate::PodTuning,
    prefill: PrefillKernel,
) -> (&'static str, usize, i32) {
    if k == crate::PodKernel::Partitioned {
        // One block per SM, either role ([`crate::PodKernel::Partitioned`]).
        let name = match prefill {
            PrefillKernel::WspSlim => "pod_wsds_bf16",
            _ => "pod_wsd_bf16",
        };
        return (name, POD_WSD_SMEM, 1);
    }
    let blocks = match (t.blocks_per_sm, k) {
        (Some(b @ 2..=3), _) => b,
        (_, crate::PodKernel::OneToOne) => 2,
        // (Partitioned returned above.)
        _ => 3,
    };
    match blocks {
        3 => (
            if tma { "pod3_tma_bf16" } else { "pod3_bf16" },
            PREFILL_SMEM.max(2 * crate::decode::cuda::DECODE_STAGE_BYTES),
            3,
        ),
        _ if t.pipelined_prefill => (
            if tma { "podp_tma_bf16" } else { "podp_bf16" },
            PREFILL_PIPE_SMEM.max(crate::decode::cuda::DECODE_SMEM),
            2,
        ),
        _ => ("pod_bf16", PREFILL_SMEM.max(crate::decode::cuda::DECODE_SMEM), 2),
    }
}

/// Prefill blocks the resident policy keeps on an SM (the tuning's, within
/// 1 ..= blocks per SM - 1; default blocks per SM - 1: 1 of 2, 2 of 3): the
/// other blocks run decode splits while both kinds last.
fn pod_resident_prefill(blocks_per_sm: i32, t: &crate::PodTuning) -> i32 {
    let most = (blocks_per_sm - 1).max(1);
    t.resident_prefill.map_or(most, |r| r as i32).clamp(1, most)
}

/// `p : d` with `p + d <= 8`, both >= 1, closest to `n_pre : n_dec` (the
/// ticket policy's per-SM ratio).
fn small_ratio(n_pre: usize, n_dec: usize) -> (i32, i32) {
    let r = n_pre as f64 / (n_pre + n_dec).max(1) as f64;
    let mut best = (1, 1);
    for total in 2..=8 {
        for p in 1..total {
            let e = (p as f64 / total as f64 - r).abs();
            let b = best.0 as f64 / (best.0 + best.1) as f64;
            if e < (b - r).abs() {
                best = (p, total - p);
            }
        }
    }
    best
}

/// State the POD path keeps across steps: the kernel's scheduling counters
/// (sized by the SM-id range `%nsmid`, zeroed once; the kernel's last block
/// re-zeroes them) and the second stream of the two-stream path.
#[derive(Debug)]
pub(crate) struct PodState {
    sched: CudaSlice<i32>,
    nsm: i32,
    side: SideStream,
}

/// A raw second stream and two events (cudarc's own streams would switch
/// the context to per-buffer event tracking, which would order the second
/// stream's kernels after the first's).
#[derive(Debug)]
struct SideStream {
    stream: sys::CUstream,
    fork: sys::CUevent,
    join: sys::CUevent,
}

// SAFETY: the raw handles are only used from the backend's owner, one step at a time.
unsafe impl Send for SideStream {}

impl Drop for SideStream {
    fn drop(&mut self) {
        // SAFETY: created in PodState::new, used by no one else; errors at teardown are ignored.
        unsafe {
            let _ = cudarc::driver::result::event::destroy(self.fork);
            let _ = cudarc::driver::result::event::destroy(self.join);
            let _ = cudarc::driver::result::stream::destroy(self.stream);
        }
    }
}

impl PodState {
    pub(crate) fn new(dev: &CudaDevice) -> Result<Self> {
        let f = crate::ops::cuda::function(dev, "pod_nsmid")?;
        let mut n = dev.alloc_zeros::<i32>(1)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&mut n);
        // SAFETY: one thread writes one int.
        let one = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (1, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { b.launch(one) }.map_err(err)?;
        let nsm = dev.clone_dtoh(&n)?[0].max(1);
        let flags = sys::CUevent_flags::CU_EVENT_DISABLE_TIMING;
        // Plain handle creation on the current context (bound by the calls above).
        let side = {
            SideStream {
                stream: cudarc::driver::result::stream::create(
                    cudarc::driver::result::stream::StreamKind::NonBlocking,
                )
                .map_err(err)?,
                fork: cudarc::driver::result::event::create(flags).map_err(err)?,
                join: cudarc::driver::result::event::create(flags).map_err(err)?,
            }
        };
        Ok(Self {
            sched: dev.alloc_zeros::<i32>(3 + 2 * nsm as usize)?,
            nsm,
            side,
        })
    }
}

pub(crate) fn upload<T: DeviceRepr + Copy + Default + 'static>(
    dev: &CudaDevice,
    v: &[T],
) -> Result<CudaSlice<T>> {
    // Never an empty buffer: kernels that do not run still get an argument.
    let v: Vec<T> = if v.is_empty() {
        vec![T::default()]
    } else {
        v.to_vec()
    };
    Ok(dev.clone_htod(&v)?)
}

/// The checks both GPU attention ops start with: three bf16 inputs and a
/// contiguous `q [tokens, heads, 128]`.
pub(crate) fn check_inputs(
    op: &str,
    inputs: [&CudaStorage; 3],
    lq: &Layout,
    tokens: usize,
    heads: usize,
) -> candle_core::Result<()> {
    use candle_core::backend::BackendStorage;
    if inputs.iter().any(|s| s.dtype() != DType::BF16) {
        candle_core::bail!("{op}: q and the K/V inputs must be bf16");
    }
    let d = crate::decode::DECODE_HEAD_DIM;
    if !lq.is_contiguous() || lq.shape().dims() != [tokens, heads, d] {
        candle_core::bail!("{op}: q must be contiguous [{tokens}, {heads}, {d}]");
    }
    Ok(())
}

/// A step's prompt chunks as the prefill kernels take them (slot and paged
/// alike): per chunk its first packed row, context and length, and one
/// work item (chunk, first query row) per tile of `rows` query rows.
#[derive(Debug, Default)]
pub(crate) struct Chunks {
    q_start: Vec<i32>,
    ctx: Vec<i32>,
    q_len: Vec<i32>,
    /// (chunk, first query row, keys the tile's last row sees)
    work: Vec<(i32, i32, usize)>,
}

impl Chunks {
    pub(crate) fn push(&mut self, start: usize, context_len: usize, query_len: usize, rows: usize) {
        let c = self.q_start.len() as i32;
        self.q_start.push(start as i32);
        self.ctx.push(context_len as i32);
        self.q_len.push(query_len as i32);
        for j0 in (0..query_len).step_by(rows) {
            self.work
                .push((c, j0 as i32, context_len + query_len.min(j0 + rows)));
        }
    }

    /// Keys the longest work item's last row sees (0 without one).
    pub(crate) fn max_keys(&self) -> usize {
        self.work.iter().map(|w| w.2).max().unwrap_or(0)
    }

    /// On the device, the work items heaviest first (the causal tail evens out).
    pub(crate) fn upload(mut self, dev: &CudaDevice) -> Result<DeviceChunks> {
        self.work.sort_by_key(|w| std::cmp::Reverse(w.2));
        let work: Vec<i32> = self.work.iter().flat_map(|w| [w.0, w.1]).collect();
        Ok(DeviceChunks {
            n_work: self.work.len(),
            work: upload(dev, &work)?,
            q_start: upload(dev, &self.q_start)?,
            ctx: upload(dev, &self.ctx)?,
            q_len: upload(dev, &self.q_len)?,
        })
    }
}

/// [`Chunks`] on the device (the prefill kernels' `work, q_start, ctx_len, q_len`).
#[derive(Debug)]
pub(crate) struct DeviceChunks {
    pub n_work: usize,
    pub work: CudaSlice<i32>,
    pub q_start: CudaSlice<i32>,
    pub ctx: CudaSlice<i32>,
    pub q_len: CudaSlice<i32>,
}

/// A step's addressing on the device, shared by all layers.
#[derive(Debug)]
pub(crate) struct StepPlan {
    pub path: PodPath,
    /// The device's SM count (pod_wsd_bf16's grid).
    sms: usize,
    tokens: usize,
    write_rows: CudaSlice<i64>,
    /// The plain prefill kernel ([`resolve_prefill`]).
    prefill: PrefillKernel,
    /// The cache's `[max_len, slots]` when the prefill may load by TMA ([`prefill_tma`]).
    tma: Option<[u64; 2]>,
    /// Whether the POD kernels' prefill role loads by TMA.
    pod_tma: bool,
    /// The POD kernel settings ([`crate::PodTuning`]).
    tuning: crate::PodTuning,
    /// Decode-first blocks of the partitioned POD kernel ([`crate::pod_decode_sms`]).
    decode_sms: usize,
    /// The warp-specialized prefill's L2 sections, query heads ([`crate::prefill_l2_heads`]).
    l2_heads: i32,
    chunks: DeviceChunks,
    /// The slot of each prompt chunk.
    slots: CudaSlice<i32>,
    n_dec: usize,
    splits: usize,
    dec_rows: CudaSlice<i32>,
    dec_slots: CudaSlice<i32>,
    dec_lens: CudaSlice<i32>,
    partials: Partials,
}

/// The decode splits' partial results and merge counters.
#[derive(Debug)]
struct Partials {
    part_o: CudaSlice<f32>,
    part_ml: CudaSlice<f32>,
    /// Per (decode, KV head): split blocks done (the last one merges; reset to 0 by it).
    counters: CudaSlice<i32>,
}

impl Partials {
    fn new(dev: &CudaDevice, n_dec: usize, cfg: &crate::AttnConfig, splits: usize) -> Result<Self> {
        let parts = (n_dec * cfg.num_heads * splits).max(1);
        Ok(Self {
            // SAFETY: the decode kernel writes every partial before the combine reads it.
            part_o: unsafe { dev.alloc::<f32>(parts * crate::decode::DECODE_HEAD_DIM) }?,
            part_ml: unsafe { dev.alloc::<f32>(parts * 2) }?,
            counters: dev.alloc_zeros::<i32>((n_dec * cfg.num_kv_heads).max(1))?,
        })
    }
}

impl StepPlan {
    /// Whether the step holds decode tokens only (no prompt chunk).
    pub(crate) fn decode_only(&self) -> bool {
        self.chunks.n_work == 0 && self.n_dec > 0
    }

    /// The POD kernel a fused hybrid step runs, for the step record
    /// (`None` on the other paths).
    pub(crate) fn pod_note(&self) -> Option<String> {
        let PodPath::Fused(k) = self.path else { return None };
        if self.chunks.n_work == 0 || self.n_dec == 0 {
            return None;
        }
        let (name, _, _) = pod_kernel(k, self.pod_tma, &self.tuning, self.prefill);
        Some(match k {
            crate::PodKernel::Partitioned => format!("kernel {name}, {} decode SMs", self.decode_sms),
            _ => format!("kernel {name}"),
        })
    }

    /// Whether a hybrid step of GQA `group` runs the slim pair:
    /// `slot_prefill_wsps_bf16` and, on the side stream, the slim decode of
    /// [`crate::PodTuning::slim_decode`] (groups up to
    /// [`crate::decode::SLIM_MAX_GROUP`]; above, the plain decode runs
    /// beside the slim prefill).
    pub(crate) fn slim_pair(&self, group: usize) -> bool {
        group <= crate::decode::cuda::SLIM_MAX_GROUP
            && self.path == PodPath::Streams
            && self.prefill == PrefillKernel::WspSlim
            && self.chunks.n_work > 0
            && self.n_dec > 0
    }

    /// The plain prefill kernel this step runs, if it runs one (prompt
    /// chunks, and not all of them inside the fused POD kernel).
    pub(crate) fn prefill_kernel(&self) -> Option<PrefillKernel> {
        let fused = matches!(self.path, PodPath::Fused(_)) && self.n_dec > 0;
        (self.chunks.n_work > 0 && !fused).then_some(self.prefill)
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        dev: &CudaDevice,
        cache: &VirtualCache,
        meta: &BatchMeta,
        cfg: &crate::AttnConfig,
        sms: usize,
        path: PodPath,
        waves: usize,
        kernel: PrefillKernel,
        l2_budget: usize,
        tuning: crate::PodTuning,
        decode_sms: usize,
    ) -> Result<Self> {
        let kv_heads = cfg.num_kv_heads;
        let view = cache.view(0, vpod_kvcache::Kv::K);
        let row = kv_heads * crate::decode::DECODE_HEAD_DIM;
        let tma = prefill_tma(dev, cache);
        let group = cfg.num_heads / kv_heads.max(1);
        let prefill = resolve_prefill(kernel, tma, cache.tokens_per_page());
        // The partitioned kernel's prefill role is the TMA wsp tile: where
        // that cannot run (or TMA is tuned off), the 2:1 kernel stands in
        // (the record names the kernel that ran).
        let path = match path {
            PodPath::Fused(crate::PodKernel::Partitioned)
                if !tuning.tma_prefill
                    || resolve_prefill(PrefillKernel::Wsp, tma, cache.tokens_per_page())
                        != PrefillKernel::Wsp =>
            {
                PodPath::Fused(crate::PodKernel::TwoToOne)
            }
            p => p,
        };
        // Work items of the kernel that runs: the POD kernels' 64-row tile
        // on the fused path (the partitioned one's 128-row), else the plain
        // kernel's.
        let bm = match path {
            PodPath::Fused(crate::PodKernel::Partitioned) => PrefillKernel::Wsp.rows(),
            PodPath::Fused(_) => 16 * POD_WARPS,
            _ => prefill.rows(),
        };
        let mut write_rows = Vec::with_capacity(meta.num_tokens());
        let (mut chunks, mut slots) = (Chunks::default(), vec![]);
        let (mut dec_rows, mut dec_slots, mut dec_lens) = (vec![], vec![], vec![]);
        for (i, s) in meta.seqs().iter().enumerate() {
            let slot = cache
                .slot_of(s.seq_id)
                .ok_or(vpod_kvcache::KvCacheError::UnknownSequence { seq: s.seq_id })?;
            let start = meta.query_range(i).start;
            for p in s.context_len..s.seq_len() {
                write_rows.push(((slot * view.slot_stride + p * view.pos_stride) / row) as i64);
            }
            if s.query_len == 1 {
                dec_rows.push(start as i32);
                dec_slots.push(slot as i32);
                dec_lens.push(s.seq_len() as i32);
            } else {
                chunks.push(start, s.context_len, s.query_len, bm);
                slots.push(slot as i32);
            }
        }
        let n_dec = dec_rows.len();
        let max_len = dec_lens.iter().copied().max().unwrap_or(1) as usize;
        // The POD kernel hands out its items dynamically: finer decode splits
        // (`waves` waves' worth) keep its tail short; a plain launch wants one wave.
        let splits = crate::decode_splits(max_len, n_dec, kv_heads, sms * waves);
        let l2_heads = crate::prefill_l2_heads(chunks.max_keys(), kv_heads, group, l2_budget) as i32;
        Ok(Self {
            path,
            sms,
            tokens: meta.num_tokens(),
            write_rows: upload(dev, &write_rows)?,
            prefill,
            tma,
            pod_tma: tma.is_some() && cache.tokens_per_page().is_multiple_of(64) && tuning.tma_prefill,
            tuning,
            decode_sms,
            l2_heads,
            chunks: chunks.upload(dev)?,
            slots: upload(dev, &slots)?,
            n_dec,
            splits,
            dec_rows: upload(dev, &dec_rows)?,
            dec_slots: upload(dev, &dec_slots)?,
            dec_lens: upload(dev, &dec_lens)?,
            partials: Partials::new(dev, n_dec, cfg, splits)?,
        })
    }
}

/// A padded decode step's addressing on the host ([`BatchMeta::padded`]):
/// per row, its K/V write row, query row, slot and length; the padding
/// rows repeat row 0's.
struct DecodeRows {
    write_rows: Vec<i64>,
    dec_rows: Vec<i32>,
    dec_slots: Vec<i32>,
    dec_lens: Vec<i32>,
}

impl DecodeRows {
    fn new(cache: &VirtualCache, meta: &BatchMeta, kv_heads: usize) -> Result<Self> {
        let view = cache.view(0, vpod_kvcache::Kv::K);
        let row = kv_heads * crate::decode::DECODE_HEAD_DIM;
        let rows = meta.num_rows();
        let mut r = Self {
            write_rows: Vec::with_capacity(rows),
            dec_rows: (0..rows as i32).collect(),
            dec_slots: Vec::with_capacity(rows),
            dec_lens: Vec::with_capacity(rows),
        };
        for s in meta.seqs() {
            let slot = cache
                .slot_of(s.seq_id)
                .ok_or(vpod_kvcache::KvCacheError::UnknownSequence { seq: s.seq_id })?;
            r.write_rows
                .push(((slot * view.slot_stride + s.context_len * view.pos_stride) / row) as i64);
            r.dec_slots.push(slot as i32);
            r.dec_lens.push(s.seq_len() as i32);
        }
        for _ in 0..meta.padding() {
            r.write_rows.push(r.write_rows[0]);
            r.dec_slots.push(r.dec_slots[0]);
            r.dec_lens.push(r.dec_lens[0]);
        }
        Ok(r)
    }
}

/// Copies `v` into `dst` in stream order (a buffer a captured step reads in
/// place; not through candle's upload cache, which a capture turns on).
pub(crate) fn refill<T: DeviceRepr + Copy>(dev: &CudaDevice, v: &[T], dst: &mut CudaSlice<T>) -> Result<()> {
    if v.len() != dst.len() {
        return Err(crate::AttnError::InvalidBatch(format!(
            "a static plan buffer holds {} values, the step has {}",
            dst.len(),
            v.len()
        )));
    }
    dev.cuda_stream()
        .memcpy_htod(v, dst)
        .map_err(|e| crate::AttnError::Candle(err(e)))
}

impl StepPlan {
    /// The plan of a padded decode step ([`BatchMeta::padded`]) in buffers
    /// that [`Self::refill_decode`] rewrites for later steps of the same
    /// rows and `splits` (the splits of a captured step are fixed: empty
    /// splits of a shorter sequence cost a block each and merge as nothing).
    pub(crate) fn decode_static(
        dev: &CudaDevice,
        cache: &VirtualCache,
        meta: &BatchMeta,
        cfg: &crate::AttnConfig,
        sms: usize,
        splits: usize,
    ) -> Result<Self> {
        let r = DecodeRows::new(cache, meta, cfg.num_kv_heads)?;
        let rows = meta.num_rows();
        Ok(Self {
            path: PodPath::Serial,
            sms,
            tokens: rows,
            write_rows: upload(dev, &r.write_rows)?,
            // Decodes only: no prefill or POD kernel runs.
            prefill: PrefillKernel::default(),
            tma: None,
            pod_tma: false,
            tuning: crate::PodTuning::default(),
            decode_sms: 1,
            l2_heads: 0,
            chunks: Chunks::default().upload(dev)?,
            slots: upload::<i32>(dev, &[])?,
            n_dec: rows,
            splits,
            dec_rows: upload(dev, &r.dec_rows)?,
            dec_slots: upload(dev, &r.dec_slots)?,
            dec_lens: upload(dev, &r.dec_lens)?,
            partials: Partials::new(dev, rows, cfg, splits)?,
        })
    }

    /// Rewrites a [`Self::decode_static`] plan's buffers for `meta` (same
    /// rows), in stream order.
    pub(crate) fn refill_decode(
        &mut self,
        dev: &CudaDevice,
        cache: &VirtualCache,
        meta: &BatchMeta,
        kv_heads: usize,
    ) -> Result<()> {
        let r = DecodeRows::new(cache, meta, kv_heads)?;
        refill(dev, &r.write_rows, &mut self.write_rows)?;
        refill(dev, &r.dec_rows, &mut self.dec_rows)?;
        refill(dev, &r.dec_slots, &mut self.dec_slots)?;
        refill(dev, &r.dec_lens, &mut self.dec_lens)
    }
}

/// One layer's attention over the VMM cache (see the module docs).
/// CUDA events around the plain prefill kernel of a forward
/// ([`crate::BackendOptions::time_kernels`]).
#[derive(Debug)]
pub(crate) struct KernelTimer {
    start: cudarc::driver::CudaEvent,
    end: cudarc::driver::CudaEvent,
    /// Whether the last forward recorded them (ran a plain prefill kernel).
    recorded: std::sync::atomic::AtomicBool,
}

impl KernelTimer {
    pub(crate) fn new(dev: &CudaDevice) -> Result<Self> {
        let ctx = dev.cuda_stream().context().clone();
        let timed = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        Ok(Self {
            start: ctx.new_event(timed).map_err(err)?,
            end: ctx.new_event(timed).map_err(err)?,
            recorded: false.into(),
        })
    }

    /// Called at the start of a forward: nothing timed yet.
    pub(crate) fn reset(&self) {
        self.recorded.store(false, std::sync::atomic::Ordering::Relaxed);
    }

    /// The GPU milliseconds between the events (waits for the end event).
    pub(crate) fn ms(&self) -> Option<f64> {
        if !self.recorded.load(std::sync::atomic::Ordering::Relaxed) {
            return None;
        }
        self.start.elapsed_ms(&self.end).ok().map(f64::from)
    }
}

pub(crate) struct GpuAttention<'a> {
    pub plan: &'a StepPlan,
    /// Events around the plain prefill kernel ([`KernelTimer`]).
    pub timer: Option<&'a KernelTimer>,
    pub k: SlotView,
    pub v: SlotView,
    pub heads: usize,
    pub kv_heads: usize,
    pub scale: f32,
    /// The POD path's state (the `pod` backend only).
    pub pod: Option<&'a PodState>,
}

impl GpuAttention<'_> {
    /// [`Self::launch_prefill`] between the timer's events, if timed.
    fn timed_prefill(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        out: &mut CudaSlice<bf16>,
    ) -> candle_core::Result<()> {
        let Some(t) = self.timer else {
            return self.launch_prefill(dev, q, out);
        };
        let stream = dev.cuda_stream();
        t.start.record(&stream).map_err(err)?;
        self.launch_prefill(dev, q, out)?;
        t.end.record(&stream).map_err(err)?;
        t.recorded.store(true, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The causal prefill kernel over the step's prompt chunks.
    fn launch_prefill(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        out: &mut CudaSlice<bf16>,
    ) -> candle_core::Result<()> {
        let p = self.plan;
        let (heads, group) = (self.heads as i32, (self.heads / self.kv_heads) as i32);
        let tma = match (p.prefill, p.tma) {
            (k, Some(dims)) if k.warp_specialized() => Some((k.symbol(), PREFILL_WS_SMEM, 128, 384, dims)),
            (PrefillKernel::Tma64, Some(dims)) => {
                Some(("slot_prefill_w4t_bf16", PREFILL_PIPE_SMEM, 64, 128, dims))
            }
            _ => None,
        };
        if let Some((name, smem, box_rows, threads, dims)) = tma {
            let (kmap, vmap) = (
                tensor_map(&self.k, self.kv_heads, dims, box_rows)?,
                tensor_map(&self.v, self.kv_heads, dims, box_rows)?,
            );
            // The slim tile shares its SMs with the slim decode: the most shared memory.
            let f = match p.prefill {
                PrefillKernel::WspSlim => crate::ops::cuda::function_max_carveout(dev, name, smem)?,
                _ => crate::ops::cuda::function_with_smem(dev, name, smem)?,
            };
            let (work, heads_u) = (p.chunks.n_work as u32, self.heads as u32);
            // slot_prefill_wsp*_bf16: one CTA per (head, work item),
            // the kernel orders them (L2 sections of p.l2_heads heads, each
            // by work item with its heads fastest); w4t: (work, heads).
            let ws = p.prefill.warp_specialized();
            let grid_dim = if ws {
                (heads_u * work, 1, 1)
            } else {
                (work, heads_u, 1)
            };
            let cfg = LaunchConfig {
                grid_dim,
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let c = &p.chunks;
            b.arg(q).arg(out);
            b.arg(&c.work)
                .arg(&c.q_start)
                .arg(&c.ctx)
                .arg(&c.q_len)
                .arg(&p.slots);
            b.arg(&heads).arg(&group).arg(&self.scale).arg(&kmap).arg(&vmap);
            if ws {
                b.arg(&p.l2_heads);
            }
            // SAFETY: as below; the tensor maps cover this layer's K and V
            // (every slot up to max_len), and a box starting below a chunk's
            // last key stays in its mapped pages (resolve_prefill); the work
            // items have the kernel's rows (StepPlan::new).
            unsafe { b.launch(cfg) }.map_err(err)?;
            return Ok(());
        }
        // (resolve_prefill leaves no TMA kernel here: W4p stands in for them.)
        let (name, smem, warps) = match p.prefill {
            PrefillKernel::W8 => ("slot_prefill_w8_bf16", PREFILL_SMEM, 8),
            PrefillKernel::W4 => ("slot_prefill_w4_bf16", PREFILL_SMEM, 4),
            _ => ("slot_prefill_w4p_bf16", PREFILL_PIPE_SMEM, 4),
        };
        let f = crate::ops::cuda::function_with_smem(dev, name, smem)?;
        let cfg = LaunchConfig {
            grid_dim: (p.chunks.n_work as u32, self.heads as u32, 1),
            block_dim: (32 * warps, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (ss, ps) = (self.k.slot_stride as i64, self.k.pos_stride as i64);
        b.arg(q).arg(out).arg(&self.k.base).arg(&self.v.base);
        let c = &p.chunks;
        b.arg(&c.work)
            .arg(&c.q_start)
            .arg(&c.ctx)
            .arg(&c.q_len)
            .arg(&p.slots);
        b.arg(&heads).arg(&group).arg(&ss).arg(&ps).arg(&self.scale);
        // SAFETY: work items index the chunk arrays; every key a tile reads is
        // below its chunk's ctx + q_len, all mapped and written.
        unsafe { b.launch(cfg) }.map_err(err)?;
        Ok(())
    }

    /// The split-KV decode of the step's decode tokens, merged by the
    /// kernel's last block per (decode, KV head) or by the combine kernel
    /// (beyond `FUSED_MERGE_MAX_SPLITS`).
    fn decode_launch<'b>(&'b self, q: &'b CudaView<'b, bf16>) -> crate::decode::cuda::DecodeLaunch<'b> {
        let p = self.plan;
        crate::decode::cuda::DecodeLaunch {
            q,
            q_rows: &p.dec_rows,
            k: self.k.base,
            v: self.v.base,
            slots: &p.dec_slots,
            seq_lens: &p.dec_lens,
            part_o: &p.partials.part_o,
            part_ml: &p.partials.part_ml,
            counters: (p.splits <= FUSED_MERGE_MAX_SPLITS).then_some(&p.partials.counters),
            batch: p.n_dec,
            heads: self.heads,
            kv_heads: self.kv_heads,
            slot_stride: self.k.slot_stride as i64,
            pos_stride: self.k.pos_stride as i64,
            splits: p.splits,
            scale: self.scale,
            slim: None,
            one_block_per_sm: false,
        }
    }

    /// The POD kernel over the whole hybrid batch (and the combine kernel
    /// when the decode splits are too many for the in-kernel merge).
    fn launch_pod(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        out: &mut CudaSlice<bf16>,
        pod: &PodState,
        k: crate::PodKernel,
    ) -> candle_core::Result<()> {
        let p = self.plan;
        let (kernel, smem, per_sm) = pod_kernel(k, p.pod_tma, &p.tuning, p.prefill);
        let partitioned = k == crate::PodKernel::Partitioned;
        // The layer's tensor maps (read by the *_tma kernels and the
        // partitioned one, whose prefill tile takes 128-row boxes; StepPlan::new
        // checked the device and the pages for it).
        let (kmap, vmap) = match (p.tma, partitioned) {
            (Some(dims), true) => (
                tensor_map(&self.k, self.kv_heads, dims, 128)?,
                tensor_map(&self.v, self.kv_heads, dims, 128)?,
            ),
            (Some(dims), false) if p.pod_tma => (
                tensor_map(&self.k, self.kv_heads, dims, 64)?,
                tensor_map(&self.v, self.kv_heads, dims, 64)?,
            ),
            _ => (TmaArg([0; 16]), TmaArg([0; 16])),
        };
        let f = crate::ops::cuda::function_with_smem(dev, kernel, smem)?;
        let n_pre = p.chunks.n_work * self.heads;
        let n_dec = p.splits * self.kv_heads * p.n_dec;
        // pod_wsd_bf16: a block per prefill item and one per SM (decode
        // workers), 384 threads; the others: one block per item.
        let (blocks, warps) = if partitioned {
            (n_pre + p.sms, 3 * POD_WARPS)
        } else {
            (n_pre + n_dec, POD_WARPS)
        };
        let cfg = LaunchConfig {
            grid_dim: (blocks as u32, 1, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let policy = match p.tuning.policy {
            crate::PodPolicy::Ticket => 0,
            crate::PodPolicy::Resident => 1,
        };
        let (rp, rd) = if partitioned {
            (1, p.decode_sms as i32) // the decode-first blocks
        } else if policy == 0 {
            small_ratio(n_pre, n_dec)
        } else {
            let rp = pod_resident_prefill(per_sm, &p.tuning);
            (rp, per_sm - rp)
        };
        let fused_merge = p.splits <= FUSED_MERGE_MAX_SPLITS;
        let no_counters = 0u64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (heads, group) = (self.heads as i32, (self.heads / self.kv_heads) as i32);
        let (ss, ps) = (self.k.slot_stride as i64, self.k.pos_stride as i64);
        let c = &p.chunks;
        let (n_work, kv_heads, splits, n_decodes) = (
            c.n_work as i32,
            self.kv_heads as i32,
            p.splits as i32,
            p.n_dec as i32,
        );
        b.arg(q).arg(&mut *out).arg(&self.k.base).arg(&self.v.base);
        b.arg(&heads).arg(&group).arg(&ss).arg(&ps).arg(&self.scale);
        b.arg(&c.work)
            .arg(&c.q_start)
            .arg(&c.ctx)
            .arg(&c.q_len)
            .arg(&p.slots)
            .arg(&n_work);
        b.arg(&p.dec_rows)
            .arg(&p.dec_slots)
            .arg(&p.dec_lens)
            .arg(&p.partials.part_o)
            .arg(&p.partials.part_ml);
        if fused_merge {
            b.arg(&p.partials.counters);
        } else {
            b.arg(&no_counters);
        }
        b.arg(&kv_heads).arg(&splits).arg(&n_decodes);
        b.arg(&pod.sched).arg(&pod.nsm).arg(&policy).arg(&rp).arg(&rd);
        // The prefill items' L2 sections (query heads; slot_prefill_ws.cuh's ws_l2_order).
        b.arg(&p.l2_heads);
        b.arg(&kmap).arg(&vmap);
        // SAFETY: the prefill items index the chunk arrays and the decode items the
        // decode arrays (sizes from the plan); keys read are mapped and written; the
        // scheduling counters hold 3 + 2 * nsm ints, zero between launches.
        unsafe { b.launch(cfg) }.map_err(err)?;
        if !fused_merge {
            // Only the combine kernel: the splits were computed above.
            // SAFETY: reads the partials the POD kernel wrote; writes the decode rows.
            unsafe { crate::decode::cuda::combine(dev, &self.decode_launch(q), out, None) }?;
        }
        Ok(())
    }
}

impl CustomOp3 for GpuAttention<'_> {
    fn name(&self) -> &'static str {
        "vattention-gpu"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("vattention-gpu runs on CUDA tensors only (the CPU twin is VirtualAttention)")
    }

    fn cuda_fwd(
        &self,
        sq: &CudaStorage,
        lq: &Layout,
        sk: &CudaStorage,
        lk: &Layout,
        sv: &CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = crate::decode::DECODE_HEAD_DIM;
        let p = self.plan;
        check_inputs("vattention-gpu", [sq, sk, sv], lq, p.tokens, self.heads)?;
        let dev = sq.device.clone();
        let stream = dev.cuda_stream();
        let row_elems = (self.kv_heads * d) as i32;
        let q = sq.as_cuda_slice::<bf16>()?.slice(lq.start_offset()..);
        // 1. The step's new K and V rows into the slots, one launch.
        let mut src = vec![];
        for (s, l) in [(sk, lk), (sv, lv)] {
            if l.dims() != [p.tokens, self.kv_heads, d] || l.stride()[1] != d || l.stride()[2] != 1 {
                candle_core::bail!("vattention-gpu: new K/V rows must be [T, kv_heads, {d}] with dense rows");
            }
            src.push((
                s.as_cuda_slice::<bf16>()?.slice(l.start_offset()..),
                l.stride()[0] as i64,
            ));
        }
        let f = crate::ops::cuda::function(&dev, "slot_write_kv2_bf16")?;
        let cfg = LaunchConfig {
            grid_dim: (p.tokens as u32, 2, 1),
            block_dim: ((row_elems as u32 / 8).clamp(32, 512), 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = crate::ops::cuda::Launch::new(&stream);
        b.after(crate::ops::cuda::PdlChain::begin(&dev, 0)?)
            .addr(self.k.base)
            .addr(self.v.base)
            .buf(&src[0].0)
            .buf(&src[1].0)
            .buf(&p.write_rows)
            .val(&src[0].1)
            .val(&src[1].1)
            .val(&row_elems);
        // SAFETY: every write row lies in a page mapped for its sequence (make_room +
        // fence ran first); each source holds T rows of row_elems at its stride; the
        // kernel waits (pdl.cuh).
        unsafe { b.run(&dev, &f, cfg) }?;
        self.attend_written(&dev, &q, lq.shape().clone())
    }
}

impl GpuAttention<'_> {
    /// Steps 2 and 3 of the attention call, once the step's K/V rows are in
    /// the slots: prompt chunks and decode tokens over q `[T, heads, d]`
    /// (`shape`), into a new output of that shape.
    fn attend_written(
        &self,
        dev: &CudaDevice,
        q: &CudaView<'_, bf16>,
        shape: Shape,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = crate::decode::DECODE_HEAD_DIM;
        let p = self.plan;
        let dev = dev.clone();
        let stream = dev.cuda_stream();
        // A decode-only step: the decode kernel may start as the K/V write
        // finishes, also in a captured graph (the chain begins before `out`).
        let pdl = (p.chunks.n_work == 0)
            .then(|| crate::ops::cuda::PdlChain::begin(&dev, p.tokens * self.heads * d * 2))
            .transpose()?;
        // SAFETY: the prefill and decode kernels below write every row of `out`
        // (each token is in exactly one prompt chunk or is one decode).
        let mut out = unsafe { dev.alloc::<bf16>(p.tokens * self.heads * d) }?;
        let hybrid = p.chunks.n_work > 0 && p.n_dec > 0;
        match (p.path, self.pod) {
            (PodPath::Fused(k), Some(pod)) if hybrid => self.launch_pod(&dev, q, &mut out, pod, k)?,
            (PodPath::Streams, Some(pod)) if hybrid => {
                let main = stream.cu_stream();
                let side = &pod.side;
                // SAFETY: events and the side stream belong to this context; the side
                // stream starts after everything queued so far (K/V writes, `out`'s
                // allocation) and the main stream continues after it.
                unsafe {
                    use cudarc::driver::result::{event, stream as st};
                    event::record(side.fork, main).map_err(err)?;
                    st::wait_event(
                        side.stream,
                        side.fork,
                        sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT,
                    )
                    .map_err(err)?;
                    self.timed_prefill(&dev, q, &mut out)?;
                    // Beside the slim prefill kernel, the slim decode: its
                    // blocks fit on the prefill's SMs (PrefillKernel::WspSlim).
                    let mut l = self.decode_launch(q);
                    l.slim = p
                        .slim_pair(self.heads / self.kv_heads)
                        .then_some(p.tuning.slim_decode);
                    crate::decode::cuda::launch(&dev, &l, &mut out, Some(side.stream), None)?;
                    event::record(side.join, side.stream).map_err(err)?;
                    st::wait_event(main, side.join, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT)
                        .map_err(err)?;
                }
            }
            _ => {
                // 2. Prompt chunks, then 3. decode tokens.
                if p.chunks.n_work > 0 {
                    self.timed_prefill(&dev, q, &mut out)?;
                }
                if p.n_dec > 0 {
                    // SAFETY: keys below each decode's length are mapped and written; the
                    // plan's partials hold n_dec * heads * splits entries and its counters
                    // n_dec * kv_heads (zero between launches; stream-ordered reuse by the layers).
                    unsafe {
                        crate::decode::cuda::launch(&dev, &self.decode_launch(q), &mut out, None, pdl)
                    }?;
                }
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), shape))
    }
}

/// [`GpuAttention`] from the QKV projection's output on a decode-only step:
/// (qkv `[T, (heads + 2 kv_heads) 128]`, cos, sin `[T, 64]`). One kernel
/// (`rope_write_kv_bf16`) rotates q into a new buffer and writes the rotated
/// k and the v rows into the slots, instead of RoPE and the K/V write
/// apart: one launch a layer fewer.
pub(crate) struct GpuRopeAttention<'a>(pub GpuAttention<'a>);

impl CustomOp3 for GpuRopeAttention<'_> {
    fn name(&self) -> &'static str {
        "vattention-gpu-rope"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("vattention-gpu-rope runs on CUDA tensors only")
    }

    fn cuda_fwd(
        &self,
        sqkv: &CudaStorage,
        lqkv: &Layout,
        scos: &CudaStorage,
        lcos: &Layout,
        ssin: &CudaStorage,
        lsin: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let d = crate::decode::DECODE_HEAD_DIM;
        let a = &self.0;
        let p = a.plan;
        let (t, row) = lqkv.shape().dims2()?;
        let (heads, kv_heads) = (a.heads, a.kv_heads);
        let fits = |l: &Layout, cols: usize| {
            l.is_contiguous() && l.dims() == [t, cols] && l.start_offset().is_multiple_of(8)
        };
        if t != p.tokens
            || row != (heads + 2 * kv_heads) * d
            || !fits(lqkv, row)
            || !fits(lcos, d / 2)
            || !fits(lsin, d / 2)
        {
            candle_core::bail!(
                "vattention-gpu-rope: qkv {:?}, cos {:?}, sin {:?} do not fit {} tokens of {heads} + 2 x {kv_heads} heads of {d} (contiguous, 16-byte aligned)",
                lqkv.shape(),
                lcos.shape(),
                lsin.shape(),
                p.tokens
            );
        }
        let dev = sqkv.device.clone();
        let stream = dev.cuda_stream();
        let qkv = sqkv.as_cuda_slice::<bf16>()?.slice(lqkv.start_offset()..);
        let cos = scos.as_cuda_slice::<bf16>()?.slice(lcos.start_offset()..);
        let sin = ssin.as_cuda_slice::<bf16>()?.slice(lsin.start_offset()..);
        let chain = crate::ops::cuda::PdlChain::begin(&dev, t * heads * d * 2)?;
        // SAFETY: the kernel writes every element of q (each q head of each token).
        let mut q = unsafe { dev.alloc::<bf16>(t * heads * d) }?;
        let f = crate::ops::cuda::function(&dev, "rope_write_kv_bf16")?;
        const THREADS: u32 = 256;
        let threads = t * (heads + kv_heads) * d / 16 + t * kv_heads * d / 8;
        let cfg = LaunchConfig {
            grid_dim: ((threads as u32).div_ceil(THREADS), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ti, hi, kvi, di, rowi) = (t as i32, heads as i32, kv_heads as i32, d as i32, row as i64);
        let mut b = crate::ops::cuda::Launch::new(&stream);
        b.after(chain)
            .buf(&qkv)
            .buf(&cos)
            .buf(&sin)
            .buf_mut(&mut q)
            .addr(a.k.base)
            .addr(a.v.base)
            .buf(&p.write_rows)
            .val(&ti)
            .val(&hi)
            .val(&kvi)
            .val(&di)
            .val(&rowi);
        // SAFETY: qkv holds t rows of (heads + 2 kv_heads) * d, cos and sin t rows of
        // d / 2 (checked above, 16-byte aligned); q holds t * heads * d; every write
        // row lies in a page mapped for its sequence (make_room + fence ran first);
        // the kernel waits (pdl.cuh).
        unsafe { b.run(&dev, &f, cfg) }?;
        a.attend_written(&dev, &q.slice(..), Shape::from((t, heads, d)))
    }
}
