//! The `vattention` and `pod` backends over the virtual KV cache: each
//! sequence's K/V is contiguous in its slot, read by (slot, position) with
//! plain strides, no block tables.
//!
//! CPU twins of the kernels: prefill chunks walk keys in 64-key tiles
//! (FlashAttention-2 style); decode tokens use split-KV with the split count
//! chosen to fill the GPU even at batch 1, merged by a combine step.
//! `vattention` runs a step as two calls (prefill chunks, then decodes: the
//! serial pair); `pod` computes a hybrid batch in one call.
//!
//! On a CUDA device both keep the cache in GPU virtual memory
//! (`VirtualCache::on_cuda`: CUDA VMM, pages mapped ahead on the mapper
//! thread) and run our kernels (see `vattention_gpu.rs`): `vattention` the
//! prefill kernel then the decode kernel; `pod` the fused POD kernel for a
//! hybrid step where [`plan_pod_step`] predicts a gain (the serial pair
//! otherwise, with the reason in [`AttentionBackend::step_path`]), the
//! plain kernels for prefill-only and decode-only steps.

use candle_core::{CpuStorage, CustomOp1, Device, Layout, Shape, Tensor};
use vpod_kvcache::{Kv, KvManager, VirtualCache, VirtualConfig};

use crate::flash::{Elem, KvRows, Tiling, attend_rows, covered};
use crate::{AttentionBackend, AttnConfig, AttnError, BackendOptions, BatchMeta, Result, SeqId};

/// Key tile of the prefill kernel.
const PREFILL_TILE: usize = 64;
/// Key tile of a decode split.
const DECODE_TILE: usize = 64;
/// Decode thread blocks resident per SM (the kernel's registers and shared
/// memory allow 2).
const DECODE_BLOCKS_PER_SM: usize = 2;
/// SMs the CPU twin plans for (the H100's), so that it splits as the kernel does there.
pub const TWIN_SMS: usize = 132;

/// Our prefill kernel's rate on the H100 (the wgmma tile, a 1K chunk over
/// 4K-12K of context: 340-390 TFLOP/s, results/2026-11-21-h100-wgmma) and
/// our decode kernel's (2.8 TB/s at batch >= 8): what [`plan_pod_step`]
/// weighs a hybrid step's halves with. Only their ratio matters.
const PREFILL_FLOP_PER_S: f64 = 3.7e14;
const DECODE_BYTES_PER_S: f64 = 2.8e12;
/// The `pod` backend fuses a hybrid step when its smaller half is at least
/// this share of the predicted serial time (below, the fused kernel cannot
/// gain enough to pay for its scheduling; see the POD results' sweep).
pub const POD_MIN_SHARE: f64 = 0.1;
/// From this predicted prefill : decode ratio up, a fused step partitions
/// the SMs by role ([`PodKernel::Partitioned`]: the warp-specialized
/// prefill tile, on sm_90a; elsewhere two 64-row prefill tiles per SM next
/// to one decode split, [`PodKernel::TwoToOne`]); below, one 64-row tile and
/// one decode split per SM ([`PodKernel::OneToOne`]) (the ratio from the
/// 66-case sweep in results/2026-11-21-h100-pod-planner, where it predicted
/// the measured one within ~15 %). On FlashInfer's 48-case grid on the
/// H200 (results/2026-12-04-h200-pod-partitioned) the partitioned kernel
/// beat the 2:1 kernel in 11 of the 13 steps where the planner fused 2:1
/// (1.04-1.15x over the best serial pair where 2:1 gave 1.02-1.12x), and
/// lost to the 1:1 kernel in all 4 of its steps (1.02-1.05x vs 1.06-1.11x). Above [`POD_STREAMS_ABOVE`] the two-stream
/// pair is faster than either kernel: the serial and two-stream paths run
/// the warp-specialized prefill tile, the 2:1 / 1:1 kernels a 4-warp tile,
/// so a prefill-heavy step loses by fusing (1.5 was fitted against the 2:1
/// kernel; the partitioned kernel, which runs the warp-specialized tile,
/// lost to the planner's streams / serial choice in 27 of those 31 steps,
/// by 0.10x on average: results/2026-12-04-h200-pod-partitioned, `wsd`). On FlashInfer's 48-case grid on the
/// H200 (results/2026-12-04-h200-podfi) the fused 2:1 step beat the
/// warp-specialized serial pair wherever the predicted ratio was <= 1.21
/// (1.00-1.11x) and lost wherever it was >= 1.99 (0.87-0.97x, 9 of those
/// 10 cases by more than 3 %), while the two-stream steps ran 1-5 % faster
/// than that serial pair; hence 1.5 (it was 3.0, fitted before the
/// warp-specialized tile).
pub const POD_TWO_TO_ONE_FROM: f64 = 0.4;
pub const POD_STREAMS_ABOVE: f64 = 1.5;

/// Waves' worth of decode splits a fused step hands out ([`pod_split_waves_for`]):
/// finer splits than a plain decode launch's one wave keep the fused
/// kernel's tail short and fill the gaps around the prefill tiles ...
pub const POD_SPLIT_WAVES: usize = 4;
/// ... except for a few long decodes next to a shorter prefill half, where
/// finer splits only add partials to merge.
pub const POD_FEW_DECODES_SPLIT_WAVES: usize = 2;
/// See [`pod_split_waves_for`].
pub const POD_FEW_SPLITS_UP_TO: f64 = 1.5;

/// Decode split waves of a fused step whose halves are predicted to take
/// `tp` and `td` ms, with `decodes` decodes of `kv_heads` KV heads on `sms`
/// SMs: [`POD_FEW_DECODES_SPLIT_WAVES`] when the decode half is the longer
/// one and there is at most one (decode, KV head) pair per two SMs, else
/// [`POD_SPLIT_WAVES`]. "Longer" is on the predicted times, which put the
/// prefill half ~25 % above the measured one in these steps: the decode half
/// counts as the longer one up to `tp` = [`POD_FEW_SPLITS_UP_TO`] x `td`.
/// Measured in results/2026-11-21-h100-engine: with <= 64 pairs, 2 waves
/// made the 2:1 kernel 4-8 % faster wherever the measured prefill half was
/// at most ~1.1x the decode half (Yi-6B's serving steps: 16 decodes x 4 KV
/// heads next to a 512-token chunk, 1.27x -> 1.33x over serial), equal at
/// 1.26x, and 1-7 % slower from 1.45x; with 208+ pairs within noise.
pub fn pod_split_waves_for(tp: f64, td: f64, decodes: usize, kv_heads: usize, sms: usize) -> usize {
    if tp <= POD_FEW_SPLITS_UP_TO * td && 2 * decodes * kv_heads <= sms {
        POD_FEW_DECODES_SPLIT_WAVES
    } else {
        POD_SPLIT_WAVES
    }
}

/// The POD kernel a fused step runs (`kernels/src/pod_bf16.cu`): how the
/// blocks on an SM split between the roles while both kinds of work last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodKernel {
    /// `podp_bf16`: 2 blocks per SM, one pipelined 64-row prefill tile next
    /// to one 3-stage decode split (decode-heavy steps).
    OneToOne,
    /// `pod3_bf16`: 3 blocks per SM, two 64-row prefill tiles next to one
    /// 2-stage decode split.
    TwoToOne,
    /// `pod_wsd_bf16`: the SMs split by role, one block per SM: the first
    /// [`pod_decode_sms`] blocks stream the decodes, the others run the
    /// warp-specialized 128-row prefill tile (the plain kernel's); a kind's
    /// SMs go to the other once it runs out (sm_90a and TMA pages of 128
    /// rows; else [`Self::TwoToOne`] stands in). `pod_wsds_bf16` where the
    /// plain prefill kernel is [`crate::PrefillKernel::WspSlim`]: the
    /// prefill role at that tile's consumer registers.
    Partitioned,
}

/// Decode-first blocks (SMs) of a [`PodKernel::Partitioned`] step on `sms`
/// SMs: a quarter of them. Measured on the H200
/// (results/2026-12-04-h200-pod-partitioned, 8 hybrid steps, 16 to 66
/// decode SMs): 33 was the best fixed count (mean 1.034x over the best
/// serial pair; 16: 1.001x, 48: 1.007x, 66: 1.006x), and sizing it by the
/// decode half's predicted share of the step (clamped to 17..66) did no
/// better (1.007x): the decode items finish early and hand their SMs to the
/// prefill tiles either way, while too few decode SMs cannot draw the copy rate.
pub fn pod_decode_sms(sms: usize) -> usize {
    sms.div_ceil(4).max(1)
}

/// How the `pod` backend runs a hybrid step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodPath {
    /// The prefill kernel, then the decode kernel.
    Serial,
    /// The two kernels on two CUDA streams.
    Streams,
    /// One POD kernel launch.
    Fused(PodKernel),
}

/// The fused kernel for a step whose halves are predicted to take `tp` and `td`.
pub fn pod_kernel_for(tp: f64, td: f64) -> PodKernel {
    if tp >= POD_TWO_TO_ONE_FROM * td {
        PodKernel::Partitioned
    } else {
        PodKernel::OneToOne
    }
}

/// A hybrid step's two halves as our kernels' predicted times in ms
/// (prefill FLOPs and decode K/V bytes over the rates above); `None`
/// unless the step has both prompt chunks and decodes.
pub fn pod_step_halves(meta: &BatchMeta, cfg: &AttnConfig) -> Option<(f64, f64)> {
    let (mut flops, mut bytes) = (0f64, 0f64);
    let d = cfg.head_dim as f64;
    let row = (cfg.num_kv_heads * cfg.head_dim * cfg.dtype.size_in_bytes()) as f64;
    for s in meta.seqs() {
        let (ctx, ql) = (s.context_len as f64, s.query_len as f64);
        if s.query_len > 1 {
            flops += 4.0 * d * cfg.num_heads as f64 * (ql * ctx + ql * (ql + 1.0) / 2.0);
        } else {
            bytes += 2.0 * (ctx + 1.0) * row;
        }
    }
    let (tp, td) = (flops / PREFILL_FLOP_PER_S * 1e3, bytes / DECODE_BYTES_PER_S * 1e3);
    (tp > 0.0 && td > 0.0).then_some((tp, td))
}

/// The `pod` backend's choice for a hybrid step (see [`PodPath`]) and a note
/// saying why (see [`pod_step_halves`]). Single-kind steps run the plain
/// kernels (`Serial`).
pub fn plan_pod_step(meta: &BatchMeta, cfg: &AttnConfig) -> (PodPath, String) {
    let Some((tp, td)) = pod_step_halves(meta, cfg) else {
        let prefill = meta.seqs().iter().any(|s| s.query_len > 1);
        let only = if prefill { "prefill" } else { "decode" };
        return (PodPath::Serial, format!("{only} only: plain kernel"));
    };
    let share = tp.min(td) / (tp + td);
    let (path, verdict) = if share < POD_MIN_SHARE {
        (
            PodPath::Serial,
            format!(
                "serial: the smaller half is {:.0} % < {:.0} %",
                share * 100.0,
                POD_MIN_SHARE * 100.0
            ),
        )
    } else if tp > POD_STREAMS_ABOVE * td {
        (
            PodPath::Streams,
            format!("two streams: the prefill half is {:.1}x the decode half", tp / td),
        )
    } else {
        let k = pod_kernel_for(tp, td);
        let blocks = match k {
            PodKernel::OneToOne => "1 prefill : 1 decode blocks per SM",
            PodKernel::TwoToOne => "2 prefill : 1 decode blocks per SM",
            PodKernel::Partitioned => "SMs partitioned by role",
        };
        (PodPath::Fused(k), format!("fused, {blocks}"))
    };
    (
        path,
        format!("{verdict} (predicted prefill {tp:.3} ms, decode {td:.3} ms)"),
    )
}

/// Split count of a decode launch over `sms` SMs: as many (sequence x KV
/// head x split) blocks as fit on the GPU at once, never more (a partial
/// second wave doubles the time of its blocks: 2.2 TB/s instead of 2.7 at
/// batch 2 when rounding up), at least one 64-key tile per split and at
/// most 1024 splits (the kernel's merge keeps group x splits weights in
/// shared memory).
pub fn decode_splits(seq_len: usize, num_decodes: usize, kv_heads: usize, sms: usize) -> usize {
    decode_wave(num_decodes, kv_heads, sms).min(seq_len.div_ceil(DECODE_TILE).max(1))
}

/// Splits that fill one wave of `sms` SMs with `num_decodes` x `kv_heads`
/// blocks, within 1 ..= 1024.
fn decode_wave(num_decodes: usize, kv_heads: usize, sms: usize) -> usize {
    ((DECODE_BLOCKS_PER_SM * sms) / (num_decodes * kv_heads).max(1)).clamp(1, 1024)
}

/// Decode splits of a captured (CUDA graph) decode step of `rows` rows whose
/// longest sequence holds `seq_len` keys: the launch's full wave
/// ([`decode_splits`] without the length cap), capped at the next power of
/// two of the sequence's 64-key tiles; a power of two so that a growing
/// context needs a new graph only when its tile count doubles.
pub fn decode_splits_static(seq_len: usize, rows: usize, kv_heads: usize, sms: usize) -> usize {
    decode_wave(rows, kv_heads, sms).min(seq_len.div_ceil(DECODE_TILE).max(1).next_power_of_two())
}

/// The default [`crate::BackendOptions::prefill_l2_budget`]: 32 MiB of the
/// H100 / H200's 50 MB L2 (FlashAttention-3's budget for the same order;
/// the rest holds Q, O and what other streams read).
pub const PREFILL_L2_BUDGET: usize = 32 << 20;

/// Query heads of a section of the warp-specialized prefill's L2 order
/// (`ws_l2_order`, slot_prefill_ws.cuh): whole KV heads, as many as keep
/// their K and V over `max_keys` keys (the longest work item's) within
/// `budget` bytes, rounded down to a power of two (even sections of the
/// models' 4 / 8 KV heads), at least one; every head for a budget of 0 or
/// where all fit. Over a 4K prior context every Llama-3-8B head fits (one
/// section, the order before); over 16K two KV heads do.
pub fn prefill_l2_heads(max_keys: usize, kv_heads: usize, group: usize, budget: usize) -> usize {
    let per_kv_head = max_keys.max(1) * crate::decode::DECODE_HEAD_DIM * 2 * 2; // K and V, bf16
    let fit = budget / per_kv_head;
    if budget == 0 || fit >= kv_heads {
        return kv_heads * group;
    }
    let fit = fit.max(1);
    (1 << fit.ilog2()) * group
}

#[derive(Debug)]
pub struct VirtualBackend {
    name: &'static str,
    cfg: AttnConfig,
    cache: VirtualCache,
    scale: f32,
    /// The step [`AttentionBackend::plan_step`] last planned.
    planned: Option<u64>,
    #[cfg(feature = "cuda")]
    gpu: Option<Gpu>,
}

/// GPU state: the device, its SM count, the current step's plan and how
/// it runs, and (`pod` only) the POD kernel's state and mode.
#[cfg(feature = "cuda")]
#[derive(Debug)]
struct Gpu {
    dev: candle_core::cuda_backend::CudaDevice,
    sms: usize,
    plan: Option<crate::vattention_gpu::StepPlan>,
    pod: Option<(crate::PodMode, crate::vattention_gpu::PodState)>,
    /// The prefill kernel asked for ([`BackendOptions::prefill_kernel`]).
    prefill: crate::PrefillKernel,
    /// [`BackendOptions::prefill_l2_budget`].
    l2_budget: usize,
    /// [`BackendOptions::pod_tuning`].
    tuning: crate::PodTuning,
    path_note: Option<String>,
    /// [`BackendOptions::time_kernels`].
    timer: Option<crate::vattention_gpu::KernelTimer>,
    /// Decode plans in fixed buffers, by (rows, splits)
    /// ([`AttentionBackend::plan_static_step`]); `plan` holds the one of
    /// `current_static` while its step runs.
    statics: std::collections::HashMap<(usize, usize), crate::vattention_gpu::StepPlan>,
    current_static: Option<(usize, usize)>,
}

#[cfg(feature = "cuda")]
impl Gpu {
    /// Puts the current static plan back with the others.
    fn park_static(&mut self) {
        if let Some(key) = self.current_static.take()
            && let Some(plan) = self.plan.take()
        {
            self.statics.insert(key, plan);
        }
    }
}

impl VirtualBackend {
    pub fn new(name: &'static str, cfg: AttnConfig, device: &Device, opts: &BackendOptions) -> Result<Self> {
        let reasons = Self::unsupported_reasons(name, &cfg, device, opts);
        if !reasons.is_empty() {
            return Err(AttnError::Unsupported {
                backend: name,
                reasons: reasons.join("; "),
            });
        }
        let vcfg = VirtualConfig {
            num_layers: cfg.num_layers,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            elem_bytes: cfg.dtype.size_in_bytes(),
            max_seqs: opts.max_seqs,
            max_len: cfg.max_seq_len,
            page_size: opts.page_size,
            budget_bytes: opts.kv_budget_bytes(&cfg),
            megacache: opts.megacache,
            mapping: opts.mapping,
        };
        let scale = opts.fault_scale.unwrap_or(1.0) / (cfg.head_dim as f32).sqrt();
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
            let ctx = dev.cuda_stream().context().clone();
            let sms = ctx
                .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                .map_err(crate::ops::cuda::err)?;
            let cache = VirtualCache::on_cuda(vcfg, ctx)?;
            let pod = match name {
                "pod" => Some((opts.pod_mode, crate::vattention_gpu::PodState::new(dev)?)),
                _ => None,
            };
            return Ok(Self {
                name,
                cfg,
                cache,
                scale,
                planned: None,
                gpu: Some(Gpu {
                    dev: dev.clone(),
                    sms: sms.max(1) as usize,
                    plan: None,
                    pod,
                    prefill: opts.prefill_kernel,
                    l2_budget: opts.prefill_l2_budget,
                    tuning: opts.pod_tuning,
                    path_note: None,
                    timer: match opts.time_kernels {
                        true => Some(crate::vattention_gpu::KernelTimer::new(dev)?),
                        false => None,
                    },
                    statics: Default::default(),
                    current_static: None,
                }),
            });
        }
        Ok(Self {
            name,
            cfg,
            cache: VirtualCache::new(vcfg)?,
            scale,
            planned: None,
            #[cfg(feature = "cuda")]
            gpu: None,
        })
    }

    pub fn unsupported_reasons(
        name: &str,
        cfg: &AttnConfig,
        device: &Device,
        opts: &BackendOptions,
    ) -> Vec<String> {
        let mut r = crate::device_reasons(name, cfg, device, Some(crate::decode::DECODE_MAX_GROUP));
        if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            r.push("query heads are not a multiple of key/value heads".into());
        }
        let row = cfg.num_kv_heads * cfg.head_dim * cfg.dtype.size_in_bytes();
        let token = if opts.megacache { row * cfg.num_layers } else { row };
        if opts.page_size == 0
            || !opts.page_size.is_multiple_of(4096)
            || !opts.page_size.is_multiple_of(token.max(1))
        {
            r.push(format!(
                "page size {} must be a multiple of 4096 bytes and of the {token} byte token row",
                opts.page_size
            ));
        }
        r
    }

    pub fn cache(&self) -> &VirtualCache {
        &self.cache
    }

    /// Copies the step's new K/V rows into the slots (the CPU twin of the
    /// per-slot write kernel).
    fn write(&mut self, layer: usize, k: &Tensor, v: &Tensor, meta: &BatchMeta) -> Result<()> {
        let bytes = |t: &Tensor| -> Result<Vec<u8>> {
            let t = t.to_dtype(self.cfg.dtype)?.contiguous()?.flatten_all()?;
            Ok(match self.cfg.dtype {
                candle_core::DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
                candle_core::DType::BF16 => t
                    .to_vec1::<half::bf16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                candle_core::DType::F16 => t
                    .to_vec1::<half::f16>()?
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                d => return Err(AttnError::InvalidBatch(format!("unsupported KV dtype {d:?}"))),
            })
        };
        let (kb, vb) = (bytes(k)?, bytes(v)?);
        let row = self.cfg.num_kv_heads * self.cfg.head_dim * self.cfg.dtype.size_in_bytes();
        for (i, s) in meta.seqs().iter().enumerate() {
            let slot = self
                .cache
                .slot_of(s.seq_id)
                .ok_or(vpod_kvcache::KvCacheError::UnknownSequence { seq: s.seq_id })?;
            for (j, t) in meta.query_range(i).enumerate() {
                let pos = s.context_len + j;
                self.cache
                    .row_mut(layer, Kv::K, slot, pos)?
                    .copy_from_slice(&kb[t * row..(t + 1) * row]);
                self.cache
                    .row_mut(layer, Kv::V, slot, pos)?
                    .copy_from_slice(&vb[t * row..(t + 1) * row]);
            }
        }
        Ok(())
    }

    fn op(&self, layer: usize, meta: &BatchMeta, pick: impl Fn(usize) -> bool) -> VirtualAttention<'_> {
        let decodes = meta.seqs().iter().filter(|s| s.query_len == 1).count();
        VirtualAttention {
            cache: &self.cache,
            layer,
            seqs: meta
                .seqs()
                .iter()
                .enumerate()
                .filter(|(_, s)| pick(s.query_len))
                .map(|(i, s)| {
                    let tiling = if s.query_len == 1 {
                        Tiling {
                            tile: DECODE_TILE,
                            splits: decode_splits(s.seq_len(), decodes, self.cfg.num_kv_heads, TWIN_SMS),
                        }
                    } else {
                        Tiling {
                            tile: PREFILL_TILE,
                            splits: 1,
                        }
                    };
                    let slot = self.cache.slot_of(s.seq_id).unwrap_or(usize::MAX);
                    (
                        meta.query_range(i).start,
                        s.context_len,
                        s.query_len,
                        slot,
                        tiling,
                    )
                })
                .collect(),
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            scale: self.scale,
        }
    }

    /// The GPU attention op of `layer` over the planned step (its prefill
    /// timer reset), or `None` off the GPU or before a plan.
    #[cfg(feature = "cuda")]
    fn gpu_op(&self, layer: usize) -> Option<crate::vattention_gpu::GpuAttention<'_>> {
        let gpu = self.gpu.as_ref()?;
        let plan = gpu.plan.as_ref()?;
        if let Some(t) = &gpu.timer {
            t.reset();
        }
        Some(crate::vattention_gpu::GpuAttention {
            plan,
            timer: gpu.timer.as_ref(),
            k: self.cache.view(layer, Kv::K),
            v: self.cache.view(layer, Kv::V),
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            scale: self.scale,
            pod: gpu.pod.as_ref().map(|p| &p.1),
        })
    }
}

static ROPE_WRITE_FUSION: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Whether the `vattention` and `pod` backends run a decode-only step's RoPE
/// and K/V write as one kernel on the GPU ([`AttentionBackend::forward_rope`];
/// on by default); off, the model rotates q and k (`rope_qk`) and the
/// backend writes K/V (`slot_write_kv2`) apart. For A/B runs.
pub fn set_rope_write_fusion(on: bool) {
    ROPE_WRITE_FUSION.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_rope_write_fusion`].
pub fn rope_write_fusion() -> bool {
    ROPE_WRITE_FUSION.load(std::sync::atomic::Ordering::Relaxed)
}

impl AttentionBackend for VirtualBackend {
    fn name(&self) -> &'static str {
        self.name
    }

    /// Grows the sequences for the new tokens and waits for the pages mapped
    /// for this step; on a GPU, builds the step's addressing and (`pod`)
    /// picks how its hybrid attention runs.
    fn plan_step(&mut self, meta: &BatchMeta) -> Result<()> {
        crate::make_room(&mut self.cache, meta)?;
        // Pages mapped for this step (here or ahead) must be in place.
        self.cache.fence()?;
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &mut self.gpu {
            gpu.park_static();
            gpu.plan = None;
            use crate::PodMode;
            let mode = gpu.pod.as_ref().map(|p| p.0);
            // The step's two halves, predicted (`None`: one kind only,
            // which runs the plain kernels whatever the mode).
            let halves = pod_step_halves(meta, &self.cfg);
            let single = halves.is_none();
            let (path, note) = match mode {
                None => (PodPath::Serial, None),
                Some(_) if single => (PodPath::Serial, Some(plan_pod_step(meta, &self.cfg).1)),
                Some(PodMode::Serial) => (PodPath::Serial, Some("serial (pod:serial)".to_string())),
                Some(PodMode::Streams) => (PodPath::Streams, Some("two streams (pod:streams)".to_string())),
                Some(PodMode::Fused) => {
                    // The kernel still suits the step's halves.
                    let k = halves.map_or(PodKernel::OneToOne, |(tp, td)| pod_kernel_for(tp, td));
                    (PodPath::Fused(k), Some("fused (pod:fused)".to_string()))
                }
                Some(PodMode::Auto) => {
                    let (path, note) = plan_pod_step(meta, &self.cfg);
                    (path, Some(note))
                }
            };
            // The planner's prefill-heavy steps (serial and two-stream
            // verdicts) as the slim pair on two streams, where it runs.
            let group = self.cfg.num_heads / self.cfg.num_kv_heads.max(1);
            let slim = mode == Some(PodMode::Auto)
                && !single
                && gpu.tuning.slim_streams
                && matches!(path, PodPath::Serial | PodPath::Streams)
                // Prefill-heavy: a serial verdict for a small prefill half stays serial.
                && halves.is_some_and(|(tp, td)| tp > td)
                && matches!(gpu.prefill, crate::PrefillKernel::Wsp | crate::PrefillKernel::WspSlim)
                && crate::vattention_gpu::slim_pair_runs(&gpu.dev, &self.cache, group);
            let (path, prefill) = match slim {
                true => (PodPath::Streams, crate::PrefillKernel::WspSlim),
                false => (path, gpu.prefill),
            };
            let note = note.map(|n| match slim {
                true => format!("{n}; run as the slim pair on two streams"),
                false => n,
            });
            let planned = path;
            let path = match path {
                PodPath::Fused(_) if gpu.tuning.partitioned => PodPath::Fused(PodKernel::Partitioned),
                // A fixed block count per SM asks for an SM-sharing kernel.
                PodPath::Fused(PodKernel::Partitioned) if matches!(gpu.tuning.blocks_per_sm, Some(2..=3)) => {
                    PodPath::Fused(PodKernel::TwoToOne)
                }
                p => p,
            };
            // The partitioned kernel's decode-first SMs: the tuning's or the
            // rule's (0: none, the decodes fill the prefill's tail).
            let decode_sms = gpu
                .tuning
                .decode_sms
                .unwrap_or_else(|| pod_decode_sms(gpu.sms))
                .min(gpu.sms);
            // Decode split waves: one for a plain decode launch; for a
            // fused one the tuning's or the rule's.
            let waves = match path {
                PodPath::Fused(_) => gpu.tuning.split_waves.filter(|&w| w >= 1).unwrap_or_else(|| {
                    let decodes = meta.seqs().iter().filter(|s| s.query_len == 1).count();
                    halves.map_or(POD_SPLIT_WAVES, |(tp, td)| {
                        pod_split_waves_for(tp, td, decodes, self.cfg.num_kv_heads, gpu.sms)
                    })
                }),
                _ => 1,
            };
            gpu.path_note = note.map(|n| match waves {
                1 | POD_SPLIT_WAVES => n,
                w => format!("{n}; decode splits for {w} waves"),
            });
            let plan = crate::vattention_gpu::StepPlan::new(
                &gpu.dev,
                &self.cache,
                meta,
                &self.cfg,
                gpu.sms,
                path,
                waves,
                prefill,
                gpu.l2_budget,
                gpu.tuning,
                decode_sms,
            )?;
            // The record names the prefill kernel a step ran (when not
            // fused), else the POD kernel, and says when the planner's
            // partitioned kernel could not run (tuning, device or pages).
            let instead = (planned == PodPath::Fused(PodKernel::Partitioned) && plan.path != planned)
                .then_some(
                    "the partitioned kernel cannot run here (sm_90a, TMA, 128-row pages) or is tuned off: ",
                );
            // The slim decode beside the slim prefill (for GQA groups it takes).
            let slim_decode = match plan.slim_pair(group) {
                true => format!(", decode {}", gpu.tuning.slim_decode.symbol()),
                false => String::new(),
            };
            if let Some(k) = plan
                .prefill_kernel()
                .map(|k| format!("prefill {}{slim_decode}", k.symbol()))
                .or(plan.pod_note())
                .map(|k| format!("{}{k}", instead.unwrap_or("")))
            {
                gpu.path_note = Some(match gpu.path_note.take() {
                    Some(n) => format!("{n}; {k}"),
                    None => k,
                });
            }
            gpu.plan = Some(plan);
        }
        self.planned = Some(meta.id());
        Ok(())
    }

    /// Decode steps only, on a GPU, without kernel timing: the plan of
    /// `StepPlan::decode_static` (`vattention_gpu.rs`), one per (rows,
    /// splits of [`decode_splits_static`]).
    fn plan_static_step(&mut self, meta: &BatchMeta) -> Result<Option<crate::StaticPlan>> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &mut self.gpu
            && gpu.timer.is_none()
            && meta.is_decode_only()
        {
            crate::make_room(&mut self.cache, meta)?;
            self.cache.fence()?;
            gpu.park_static();
            gpu.plan = None;
            let rows = meta.num_rows();
            let splits = decode_splits_static(meta.max_seq_len(), rows, self.cfg.num_kv_heads, gpu.sms);
            let key = (rows, splits);
            // Refilled in the map: a failed refill keeps the plan (a captured
            // step may read its buffers).
            if let Some(plan) = gpu.statics.get_mut(&key) {
                plan.refill_decode(&gpu.dev, &self.cache, meta, self.cfg.num_kv_heads)?;
            }
            let plan = match gpu.statics.remove(&key) {
                Some(plan) => plan,
                None => crate::vattention_gpu::StepPlan::decode_static(
                    &gpu.dev,
                    &self.cache,
                    meta,
                    &self.cfg,
                    gpu.sms,
                    splits,
                )?,
            };
            gpu.plan = Some(plan);
            gpu.current_static = Some(key);
            gpu.path_note = gpu.pod.as_ref().map(|_| "decode only".to_string());
            self.planned = Some(meta.id());
            return Ok(Some(crate::StaticPlan {
                key: format!("rows {rows}, splits {splits}"),
            }));
        }
        let _ = meta;
        Ok(None)
    }

    fn forward(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        meta: &BatchMeta,
    ) -> Result<Tensor> {
        if self.planned != Some(meta.id()) {
            self.plan_step(meta)?;
        }
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() {
            let Some(op) = self.gpu_op(layer) else {
                unreachable!("planned above")
            };
            let dense = |t: &Tensor| -> Result<Tensor> {
                Ok(if t.stride()[1..] == [self.cfg.head_dim, 1] {
                    t.clone()
                } else {
                    t.contiguous()?
                })
            };
            let q = q.contiguous()?;
            return Ok(q.apply_op3_no_bwd(&dense(k)?, &dense(v)?, &op)?);
        }
        self.write(layer, k, v, meta)?;
        let q = q.contiguous()?;
        if self.name == "pod" {
            // One call for the whole hybrid batch.
            return Ok(q.apply_op1_no_bwd(&self.op(layer, meta, |_| true))?);
        }
        // The serial pair: prefill chunks, then decodes; each call fills its rows.
        let prefill = q.apply_op1_no_bwd(&self.op(layer, meta, |ql| ql > 1))?;
        let decode = q.apply_op1_no_bwd(&self.op(layer, meta, |ql| ql == 1))?;
        Ok((prefill + decode)?)
    }

    /// On the GPU, decode-only steps: RoPE and the K/V write in one kernel
    /// (`vattention_gpu::GpuRopeAttention`, one `rope_write_kv_bf16` launch; see [`set_rope_write_fusion`]).
    fn forward_rope(
        &mut self,
        layer: usize,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        meta: &BatchMeta,
    ) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if self.gpu.is_some() && rope_write_fusion() {
            if self.planned != Some(meta.id()) {
                self.plan_step(meta)?;
            }
            let d = self.cfg.head_dim;
            let row = (self.cfg.num_heads + 2 * self.cfg.num_kv_heads) * d;
            let bf16 = |t: &Tensor| t.dtype() == candle_core::DType::BF16;
            let fits = qkv.dims() == [meta.num_rows(), row]
                && cos.dims() == [meta.num_rows(), d / 2]
                && sin.dims() == [meta.num_rows(), d / 2]
                && d == crate::decode::DECODE_HEAD_DIM
                && bf16(qkv)
                && bf16(cos)
                && bf16(sin);
            if let Some(op) = self.gpu_op(layer).filter(|op| fits && op.plan.decode_only()) {
                let op = crate::vattention_gpu::GpuRopeAttention(op);
                let out = qkv
                    .contiguous()?
                    .apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?;
                return Ok(Some(out));
            }
        }
        let _ = (layer, qkv, cos, sin, meta);
        Ok(None)
    }

    fn release(&mut self, seq: SeqId) {
        self.cache.release(seq);
    }

    fn kv_manager(&mut self) -> Option<&mut dyn KvManager> {
        Some(&mut self.cache)
    }

    fn prepare_next(&mut self, next: &[(SeqId, usize)]) -> Result<()> {
        for &(seq, len) in next {
            self.cache.map_ahead(seq, len)?;
        }
        Ok(())
    }

    fn step_path(&self) -> Option<String> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.path_note.clone();
        }
        None
    }

    fn retune(&mut self, opts: &BackendOptions) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &mut self.gpu {
            match &mut gpu.pod {
                Some(p) => p.0 = opts.pod_mode,
                None if opts.pod_mode != crate::PodMode::default() => {
                    return Err(AttnError::Unsupported {
                        backend: self.name,
                        reasons: format!("a POD mode ({:?}) applies to the pod backend only", opts.pod_mode),
                    });
                }
                None => {}
            }
            gpu.prefill = opts.prefill_kernel;
            gpu.l2_budget = opts.prefill_l2_budget;
            gpu.tuning = opts.pod_tuning;
            if opts.time_kernels != gpu.timer.is_some() {
                gpu.timer = match opts.time_kernels {
                    true => Some(crate::vattention_gpu::KernelTimer::new(&gpu.dev)?),
                    false => None,
                };
            }
            // The next step is planned afresh (static plans are kept: a
            // captured step may still read them).
            gpu.park_static();
            gpu.plan = None;
            self.planned = None;
            return Ok(());
        }
        let _ = opts;
        Err(AttnError::Unsupported {
            backend: self.name,
            reasons: "kernel choices exist on the GPU only".into(),
        })
    }

    fn prefill_kernel_ms(&self) -> Option<f64> {
        #[cfg(feature = "cuda")]
        if let Some(gpu) = &self.gpu {
            return gpu.timer.as_ref()?.ms();
        }
        None
    }
}

/// Attention of the chosen sequences over their slots; rows of other
/// sequences are left zero.
struct VirtualAttention<'a> {
    cache: &'a VirtualCache,
    layer: usize,
    /// (first packed row, context_len, query_len, slot, tiling)
    seqs: Vec<(usize, usize, usize, usize, Tiling)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

struct SlotRows<'a, T> {
    cache: &'a VirtualCache,
    layer: usize,
    slot: usize,
    head_dim: usize,
    _t: std::marker::PhantomData<T>,
}

impl<T: Elem> SlotRows<'_, T> {
    fn read(&self, kv: Kv, position: usize, h: usize, out: &mut [f32]) {
        let Ok(bytes) = self.cache.row(self.layer, kv, self.slot, position) else {
            debug_assert!(false, "reading an unmapped row");
            return;
        };
        let n = size_of::<T>();
        for (d, o) in out.iter_mut().enumerate() {
            let at = (h * self.head_dim + d) * n;
            // SAFETY: `at + n <= bytes.len()` (the row holds kv_heads * head_dim
            // elements); read_unaligned has no alignment requirement.
            *o = unsafe { std::ptr::read_unaligned(bytes[at..at + n].as_ptr().cast::<T>()) }.to_f32();
        }
    }
}

impl<T: Elem> KvRows for SlotRows<'_, T> {
    fn key(&self, position: usize, h: usize, out: &mut [f32]) {
        self.read(Kv::K, position, h, out)
    }
    fn value(&self, position: usize, h: usize, out: &mut [f32]) {
        self.read(Kv::V, position, h, out)
    }
}

impl VirtualAttention<'_> {
    fn run<T: Elem>(&self, q: &[T]) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); q.len()];
        for &(start, ctx, ql, slot, tiling) in &self.seqs {
            let rows = SlotRows::<T> {
                cache: self.cache,
                layer: self.layer,
                slot,
                head_dim: self.head_dim,
                _t: std::marker::PhantomData,
            };
            let (h, kvh, d, scale) = (self.heads, self.kv_heads, self.head_dim, self.scale);
            attend_rows(q, &mut out, start, &rows, ctx, ql, h, kvh, d, scale, tiling);
        }
        out
    }
}

impl CustomOp1 for VirtualAttention<'_> {
    fn name(&self) -> &'static str {
        "virtual-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match s {
            CpuStorage::F32(q) => CpuStorage::F32(self.run(covered(q, l))),
            CpuStorage::BF16(q) => CpuStorage::BF16(self.run(covered(q, l))),
            CpuStorage::F16(q) => CpuStorage::F16(self.run(covered(q, l))),
            _ => candle_core::bail!("virtual-attention: q must be f32, bf16 or f16"),
        };
        Ok((out, l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{LogitsAt, SeqChunk};

    #[test]
    fn l2_sections_hold_whole_kv_heads() {
        let b = PREFILL_L2_BUDGET;
        // Llama-3-8B (8 KV heads, group 4): a 1K chunk over 4K: all fit.
        assert_eq!(prefill_l2_heads(5 << 10, 8, 4, b), 32);
        // 2K over 16K: 9.4 MB a KV head, 3 fit, 2 taken (a power of two).
        assert_eq!(prefill_l2_heads(18 << 10, 8, 4, b), 8);
        // Yi-6B (4 KV heads, group 8) over 16K: 2 KV heads, 16 query heads.
        assert_eq!(prefill_l2_heads(18 << 10, 4, 8, b), 16);
        // Yi-34B (8 KV heads, group 7) over 64K: 33.6 MB, one KV head.
        assert_eq!(prefill_l2_heads(64 << 10, 8, 7, b), 7);
        // Budget 0: one section of every head; no work item: every head.
        assert_eq!(prefill_l2_heads(18 << 10, 8, 4, 0), 32);
        assert_eq!(prefill_l2_heads(0, 8, 4, b), 32);
    }

    /// slot_prefill_ws.cuh's `ws_l2_order`, mirrored: its CTA order must
    /// visit every (query head, work item) once.
    fn ws_l2_order(lin: usize, heads: usize, items: usize, sec: usize) -> (usize, usize) {
        let sec = if sec == 0 || sec > heads { heads } else { sec };
        let per = sec * items;
        let (s, r) = (lin / per, lin % per);
        let width = sec.min(heads - s * sec);
        (s * sec + r % width, r / width)
    }

    #[test]
    fn l2_order_visits_every_tile_once_section_by_section() {
        for (heads, items, sec) in [
            (32, 16, 8),
            (32, 16, 32),
            (28, 5, 7),
            (16, 3, 4),
            (56, 9, 16),
            (6, 1, 4),
        ] {
            let mut seen = vec![false; heads * items];
            let mut last_section = 0;
            for lin in 0..heads * items {
                let (head, item) = ws_l2_order(lin, heads, items, sec);
                assert!(head < heads && item < items, "{lin}: ({head}, {item})");
                assert!(
                    !std::mem::replace(&mut seen[item * heads + head], true),
                    "twice: {head} {item}"
                );
                // Sections in order, and in one the items heaviest (first) first.
                assert!(head / sec >= last_section);
                last_section = head / sec;
            }
            assert!(seen.iter().all(|&s| s));
        }
        // One section: the order before (heads fastest, then items).
        assert_eq!(ws_l2_order(33, 32, 16, 0), (1, 1));
        // Sections of 8: the first 16 x 8 CTAs are heads 0..8 of every item.
        assert_eq!(ws_l2_order(127, 32, 16, 8), (7, 15));
        assert_eq!(ws_l2_order(128, 32, 16, 8), (8, 0));
    }

    fn step(seqs: &[(usize, usize)]) -> BatchMeta {
        let chunks = seqs
            .iter()
            .enumerate()
            .map(|(i, &(context_len, query_len))| SeqChunk {
                seq_id: i as u64,
                context_len,
                query_len,
            })
            .collect();
        BatchMeta::new(chunks, LogitsAt::LastToken, &Device::Cpu).unwrap()
    }

    /// A captured decode step's splits: the launch's wave once the context
    /// is long, else the power of two at or above its 64-key tiles (so a
    /// growing context changes the key only when its tiles double); never
    /// fewer than the plain launch's.
    #[test]
    fn static_decode_splits() {
        // H200: 132 SMs, Llama-3-8B's 8 KV heads.
        assert_eq!(decode_splits_static(16384, 1, 8, 132), 33);
        assert_eq!(decode_splits_static(100, 1, 8, 132), 2);
        assert_eq!(decode_splits_static(129, 1, 8, 132), 4);
        assert_eq!(decode_splits_static(256, 1, 8, 132), 4);
        assert_eq!(decode_splits_static(16384, 32, 8, 132), 1);
        for len in [1, 63, 64, 65, 1000, 4096, 9000] {
            for rows in [1, 2, 8, 16] {
                let s = decode_splits_static(len, rows, 8, 132);
                assert!(s >= decode_splits(len, rows, 8, 132), "{len} {rows}");
                // A power of two, or the whole wave (2 blocks per SM).
                assert!(s.is_power_of_two() || s == 264 / (rows * 8), "{len} {rows}");
            }
        }
    }

    /// Fewer, longer decode splits only for a few decodes next to a shorter
    /// prefill half (Yi-6B's serving steps: 16 decodes x 4 KV heads).
    #[test]
    fn split_waves_for_few_long_decodes() {
        assert_eq!(
            pod_split_waves_for(0.16, 0.20, 16, 4, 132),
            POD_FEW_DECODES_SPLIT_WAVES
        );
        assert_eq!(
            pod_split_waves_for(0.24, 0.20, 16, 4, 132),
            POD_FEW_DECODES_SPLIT_WAVES
        );
        // The prefill half clearly longer: finer splits fill the gaps around its tiles.
        assert_eq!(pod_split_waves_for(0.40, 0.20, 16, 4, 132), POD_SPLIT_WAVES);
        // Llama-3-8B's 26 decodes x 8 KV heads: many pairs.
        assert_eq!(pod_split_waves_for(0.30, 0.60, 26, 8, 132), POD_SPLIT_WAVES);
    }

    /// The planner fuses balanced hybrid steps, keeps lopsided ones serial
    /// (saying why) and leaves single-kind steps to the plain kernels.
    #[test]
    fn pod_planner_weighs_the_halves() {
        let cfg = AttnConfig {
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            max_seq_len: 32768,
            dtype: candle_core::DType::BF16,
        };
        // A 1K chunk at 12K next to 26 decodes at 16K: ~0.58 ms vs ~0.62 ms.
        let mut balanced = vec![(12288, 1024)];
        balanced.extend(std::iter::repeat_n((16384, 1), 26));
        let (path, note) = plan_pod_step(&step(&balanced), &cfg);
        assert_eq!(path, PodPath::Fused(PodKernel::Partitioned), "{note}");
        assert!(note.starts_with("fused, SMs partitioned by role"), "{note}");
        let (tp, td) = pod_step_halves(&step(&balanced), &cfg).unwrap();
        assert!((tp / td - 0.94).abs() < 0.1, "{tp} {td}");
        // A 512 chunk at 4K next to 52 decodes at 8K: decode-heavy, one of each per SM.
        let mut heavy = vec![(4096, 512)];
        heavy.extend(std::iter::repeat_n((8192, 1), 52));
        let (path, note) = plan_pod_step(&step(&heavy), &cfg);
        assert_eq!(path, PodPath::Fused(PodKernel::OneToOne), "{note}");
        // A 1K chunk at 8K next to 4 decodes at 16K: prefill-heavy, two streams.
        let mut light = vec![(8192, 1024)];
        light.extend(std::iter::repeat_n((16384, 1), 4));
        let (path, note) = plan_pod_step(&step(&light), &cfg);
        assert_eq!(path, PodPath::Streams, "{note}");
        // A 2K chunk at 12K next to one short decode: serial, with the share in the note.
        let (path, note) = plan_pod_step(&step(&[(12288, 2048), (100, 1)]), &cfg);
        assert!(
            path == PodPath::Serial && note.starts_with("serial: the smaller half is 0 %"),
            "{note}"
        );
        assert_eq!(
            plan_pod_step(&step(&[(0, 64)]), &cfg).1,
            "prefill only: plain kernel"
        );
        assert_eq!(
            plan_pod_step(&step(&[(9, 1), (3, 1)]), &cfg).1,
            "decode only: plain kernel"
        );
    }
}
