//! The `paged` backend (vLLM v0.2.7's PagedAttention, the baseline): K/V in
//! fixed-size blocks reached through per-sequence block tables.
//!
//! Its CPU twin reads keys block by block through the table (one tile per
//! block) and, for contexts past 512 tokens, in partitions of 512 merged at
//! the end, as vLLM's v2 kernel and its reduce kernel do. On a CUDA device
//! the cache tensors live on the GPU and `paged_gpu.rs` runs the kernels:
//! vLLM v0.2.7's decode v1/v2 (`kernels/src/paged_decode.cuh`) and a paged
//! FlashAttention-2-style prefill for prompt chunks.

use candle_core::{CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};
use vpod_kvcache::{KvManager, PagedCache, PagedLayout};

use crate::flash::{Elem, KvRows, Tiling, attend_rows, covered};
use crate::ops::{KvLayout, write_kv};
use crate::{AttentionBackend, AttnConfig, AttnError, BackendOptions, BatchMeta, Result, SeqId};

/// vLLM v2's partition size.
pub(crate) const PARTITION: usize = 512;

/// vLLM v0.2.7's choice of decode kernel: v1 (one thread block per head and
/// sequence over the whole context) unless the longest context exceeds 8192
/// tokens or it spans several partitions with at most 512 (sequence, head)
/// blocks; then v2 (partitions of 512 and a reduce kernel).
pub fn paged_use_v1(max_context: usize, decodes: usize, heads: usize) -> bool {
    max_context <= 8192 && (max_context.div_ceil(PARTITION) == 1 || decodes * heads > 512)
}

#[derive(Debug)]
pub struct PagedBackend {
    cfg: AttnConfig,
    cache: PagedCache,
    scale: f32,
    /// `[T]` i64 slot of each token of the planned step, and that step's id.
    slots: Option<(u64, Tensor)>,
    /// The step's block tables and work lists on the GPU (CUDA device only).
    #[cfg(feature = "cuda")]
    gpu: Option<crate::paged_gpu::PagedPlan>,
    /// Decode plans in fixed buffers (their `[rows]` slots and GPU plan), by
    /// (rows, max context) ([`AttentionBackend::plan_static_step`]);
    /// `slots` and `gpu` hold the one of `current_static` while its step runs.
    #[cfg(feature = "cuda")]
    statics: std::collections::HashMap<(usize, usize), (Tensor, crate::paged_gpu::PagedPlan)>,
    #[cfg(feature = "cuda")]
    current_static: Option<(usize, usize)>,
}

impl PagedBackend {
    pub fn new(cfg: AttnConfig, device: &Device, opts: &BackendOptions) -> Result<Self> {
        let reasons = Self::unsupported_reasons(&cfg, device, opts);
        if !reasons.is_empty() {
            return Err(AttnError::Unsupported {
                backend: "paged",
                reasons: reasons.join("; "),
            });
        }
        let budget = opts.kv_budget_bytes(&cfg);
        let num_blocks = PagedCache::blocks_for_budget(
            budget,
            cfg.num_layers,
            opts.block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.dtype,
        );
        let layout = PagedLayout::new(
            num_blocks,
            opts.block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            cfg.dtype.size_in_bytes(),
        )?;
        let cache = PagedCache::new(cfg.num_layers, layout, cfg.max_seq_len, cfg.dtype, device)?;
        let scale = opts.fault_scale.unwrap_or(1.0) / (cfg.head_dim as f32).sqrt();
        Ok(Self {
            cfg,
            cache,
            scale,
            slots: None,
            #[cfg(feature = "cuda")]
            gpu: None,
            #[cfg(feature = "cuda")]
            statics: Default::default(),
            #[cfg(feature = "cuda")]
            current_static: None,
        })
    }

    pub fn unsupported_reasons(cfg: &AttnConfig, device: &Device, opts: &BackendOptions) -> Vec<String> {
        let mut r = crate::device_reasons("paged", cfg, device, None);
        if !vpod_kvcache::BLOCK_SIZES.contains(&opts.block_size) {
            r.push(format!(
                "block size {} is not one of {:?}",
                opts.block_size,
                vpod_kvcache::BLOCK_SIZES
            ));
        }
        if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            r.push("query heads are not a multiple of key/value heads".into());
        }
        if !cfg.head_dim.is_multiple_of(16 / cfg.dtype.size_in_bytes().max(1)) {
            r.push(format!(
                "head_dim {} does not split into 16-byte chunks",
                cfg.head_dim
            ));
        }
        r
    }

    pub fn cache(&self) -> &PagedCache {
        &self.cache
    }

    /// Puts the current static plan back with the others.
    #[cfg(feature = "cuda")]
    fn park_static(&mut self) {
        if let Some(key) = self.current_static.take()
            && let (Some((_, slots)), Some(plan)) = (self.slots.take(), self.gpu.take())
        {
            self.statics.insert(key, (slots, plan));
        }
    }
}

/// Makes room for every sequence of the step and returns its `[T]` slots.
fn prepare(cache: &mut PagedCache, meta: &BatchMeta, device: &Device) -> Result<Tensor> {
    let mut slots = Vec::with_capacity(meta.num_tokens());
    crate::make_room(cache, meta)?;
    for s in meta.seqs() {
        for p in s.context_len..s.seq_len() {
            slots.push(cache.slot(s.seq_id, p)?);
        }
    }
    Ok(Tensor::new(slots.as_slice(), device)?)
}

impl AttentionBackend for PagedBackend {
    fn name(&self) -> &'static str {
        "paged"
    }

    /// Grows the sequences' block tables for the new tokens and builds the
    /// step's slot mapping (and, on a GPU, its block tables and work lists).
    fn plan_step(&mut self, meta: &BatchMeta) -> Result<()> {
        #[cfg(feature = "cuda")]
        self.park_static();
        let device = meta.positions().device().clone();
        self.slots = Some((meta.id(), prepare(&mut self.cache, meta, &device)?));
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &device {
            self.gpu = Some(crate::paged_gpu::PagedPlan::new(
                dev,
                &self.cache,
                meta,
                self.cfg.num_heads,
            )?);
        }
        Ok(())
    }

    /// Decode steps on a GPU: `[rows]` slots and a
    /// `PagedPlan::decode_static` plan (`paged_gpu.rs`) per (rows, max
    /// context: the longest sequence's length rounded up to a power of two,
    /// at least one 512-token partition, at most the model's context).
    fn plan_static_step(&mut self, meta: &BatchMeta) -> Result<Option<crate::StaticPlan>> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = meta.positions().device()
            && meta.is_decode_only()
        {
            self.park_static();
            crate::make_room(&mut self.cache, meta)?;
            let mut slots = Vec::with_capacity(meta.num_rows());
            for s in meta.seqs() {
                slots.push(self.cache.slot(s.seq_id, s.context_len)?);
            }
            for _ in 0..meta.padding() {
                slots.push(slots[0]);
            }
            let rows = meta.num_rows();
            let max_context = meta
                .max_seq_len()
                .next_power_of_two()
                .max(PARTITION)
                .min(self.cfg.max_seq_len.max(meta.max_seq_len()));
            let key = (rows, max_context);
            // Refilled in the map: a failed refill keeps the plan (a captured
            // step may read its buffers).
            if let Some((t, plan)) = self.statics.get_mut(&key) {
                crate::ops::cuda::write_host(t, &slots)?;
                plan.refill_decode(dev, &self.cache, meta)?;
            }
            let (slot_t, plan) = match self.statics.remove(&key) {
                Some(entry) => entry,
                None => (
                    Tensor::new(slots.as_slice(), meta.positions().device())?,
                    crate::paged_gpu::PagedPlan::decode_static(
                        dev,
                        &self.cache,
                        meta,
                        self.cfg.num_heads,
                        max_context,
                    )?,
                ),
            };
            self.slots = Some((meta.id(), slot_t));
            self.gpu = Some(plan);
            self.current_static = Some(key);
            return Ok(Some(crate::StaticPlan {
                key: format!("rows {rows}, max context {max_context}"),
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
        if self.slots.as_ref().is_none_or(|(id, _)| *id != meta.id()) {
            self.plan_step(meta)?;
        }
        let Some((_, slots)) = self.slots.as_ref() else {
            unreachable!("planned above")
        };
        let layout = *self.cache.layout();
        write_kv(
            self.cache.k(layer),
            k,
            slots,
            KvLayout::Paged {
                layout,
                is_value: false,
            },
        )?;
        write_kv(
            self.cache.v(layer),
            v,
            slots,
            KvLayout::Paged {
                layout,
                is_value: true,
            },
        )?;
        #[cfg(feature = "cuda")]
        if let Some(plan) = &self.gpu {
            let op = crate::paged_gpu::GpuPaged {
                plan,
                block_size: layout.block_size,
                heads: self.cfg.num_heads,
                kv_heads: self.cfg.num_kv_heads,
                scale: self.scale,
            };
            let q = q.contiguous()?;
            return Ok(q.apply_op3_no_bwd(self.cache.k(layer), self.cache.v(layer), &op)?);
        }
        let op = PagedAttention {
            layout,
            seqs: meta
                .seqs()
                .iter()
                .enumerate()
                .map(|(i, s)| {
                    let table = self.cache.block_table(s.seq_id).unwrap_or_default().to_vec();
                    (meta.query_range(i).start, s.context_len, s.query_len, table)
                })
                .collect(),
            heads: self.cfg.num_heads,
            kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            scale: self.scale,
        };
        let q = q.contiguous()?;
        Ok(q.apply_op3_no_bwd(self.cache.k(layer), self.cache.v(layer), &op)?)
    }

    fn release(&mut self, seq: SeqId) {
        self.cache.release(seq);
    }

    fn kv_manager(&mut self) -> Option<&mut dyn KvManager> {
        Some(&mut self.cache)
    }
}

/// The paged attention op: `q [T, H, D]`, K cache, V cache -> `[T, H, D]`.
struct PagedAttention {
    layout: PagedLayout,
    /// (first packed row, context_len, query_len, block table) per sequence.
    seqs: Vec<(usize, usize, usize, Vec<u32>)>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f32,
}

struct PagedRows<'a, T> {
    k: &'a [T],
    v: &'a [T],
    layout: &'a PagedLayout,
    table: &'a [u32],
}

impl<T: Elem> PagedRows<'_, T> {
    fn slot(&self, position: usize) -> usize {
        let bs = self.layout.block_size;
        self.table[position / bs] as usize * bs + position % bs
    }
}

impl<T: Elem> KvRows for PagedRows<'_, T> {
    fn key(&self, position: usize, h: usize, out: &mut [f32]) {
        let slot = self.slot(position);
        for (d, o) in out.iter_mut().enumerate() {
            *o = self.k[self.layout.k_index(slot, h, d)].to_f32();
        }
    }
    fn value(&self, position: usize, h: usize, out: &mut [f32]) {
        let slot = self.slot(position);
        for (d, o) in out.iter_mut().enumerate() {
            *o = self.v[self.layout.v_index(slot, h, d)].to_f32();
        }
    }
}

impl PagedAttention {
    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); q.len()];
        for (start, ctx, ql, table) in &self.seqs {
            let rows = PagedRows {
                k,
                v,
                layout: &self.layout,
                table,
            };
            // v1 (one partition) up to 512 tokens, v2 partitions of 512 beyond.
            let tiling = Tiling {
                tile: self.layout.block_size,
                splits: (ctx + ql).div_ceil(PARTITION),
            };
            let (h, kvh, d, scale) = (self.heads, self.kv_heads, self.head_dim, self.scale);
            attend_rows(q, &mut out, *start, &rows, *ctx, *ql, h, kvh, d, scale, tiling);
        }
        out
    }
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq: &Layout,
        sk: &CpuStorage,
        lk: &Layout,
        sv: &CpuStorage,
        lv: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = match (sq, sk, sv) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(covered(q, lq), covered(k, lk), covered(v, lv)))
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run(covered(q, lq), covered(k, lk), covered(v, lv)))
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.run(covered(q, lq), covered(k, lk), covered(v, lv)))
            }
            _ => candle_core::bail!("paged-attention: q and the caches must share one of f32, bf16, f16"),
        };
        Ok((out, lq.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::paged_use_v1;

    #[test]
    fn vllm_decode_kernel_choice() {
        assert!(paged_use_v1(512, 1, 32), "one partition: v1");
        assert!(!paged_use_v1(513, 1, 32), "two partitions, 32 blocks: v2");
        assert!(paged_use_v1(4096, 17, 32), "17 x 32 > 512 blocks: v1");
        assert!(!paged_use_v1(4096, 16, 32), "16 x 32 = 512 blocks: v2");
        assert!(!paged_use_v1(8193, 64, 32), "past 8192 tokens: always v2");
    }
}
