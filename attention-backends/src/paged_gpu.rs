//! The GPU path of the `paged` backend (the PagedAttention baseline): per
//! step, one upload of the block tables and work lists; per layer, the
//! paged K/V write (`paged_write_kv_bf16`, through [`crate::ops::write_kv`])
//! and one candle custom op over (q, K cache, V cache) that runs the paged
//! prefill kernel on the step's prompt chunks (`paged_prefill_bf16`) and
//! vLLM v0.2.7's decode kernels on its decode tokens
//! (`paged_decode_v{1,2}_b{block}_bf16`, v2 followed by
//! `paged_decode_reduce_bf16`), each filling its own rows of the output.

use candle_core::cuda_backend::CudaDevice;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};
use candle_core::{CpuStorage, CudaStorage, CustomOp3, Layout, Shape};
use half::bf16;
use vpod_kvcache::PagedCache;

use crate::decode::DECODE_HEAD_DIM as HEAD_DIM;
use crate::ops::cuda::err;
use crate::paged::PARTITION;
use crate::vattention_gpu::{Chunks, DeviceChunks, PREFILL_SMEM, upload};
use crate::{BatchMeta, Result};

/// Warps of the paged prefill kernel (16 query rows each).
const PREFILL_WARPS: usize = 8;

/// Flattens block tables into `[rows, width]` int32 (zero-padded), width >= 1.
fn table_rows<'a>(tables: impl Iterator<Item = &'a [u32]> + Clone) -> (Vec<i32>, usize) {
    let width = tables.clone().map(<[u32]>::len).max().unwrap_or(0).max(1);
    let mut flat = Vec::new();
    for t in tables {
        flat.extend(t.iter().map(|&b| b as i32));
        flat.resize(flat.len() + width - t.len(), 0);
    }
    (flat, width)
}

/// A step's addressing on the device, shared by all layers.
#[derive(Debug)]
pub(crate) struct PagedPlan {
    tokens: usize,
    // Prompt chunks (query_len > 1) and their block tables.
    chunks: DeviceChunks,
    chunk_tables: CudaSlice<i32>,
    chunk_width: usize,
    // Decode tokens.
    n_dec: usize,
    dec_rows: CudaSlice<i32>,
    dec_lens: CudaSlice<i32>,
    dec_tables: CudaSlice<i32>,
    dec_width: usize,
    max_context: usize,
    dec: DecodeKernel,
}

/// vLLM's decode kernel for a step ([`crate::paged_use_v1`]) and v2's
/// partition scratch.
#[derive(Debug)]
struct DecodeKernel {
    v1: bool,
    partitions: usize,
    tmp_out: CudaSlice<bf16>,
    exp_sums: CudaSlice<f32>,
    max_logits: CudaSlice<f32>,
}

impl DecodeKernel {
    /// For `n_dec` decodes of at most `max_context` tokens.
    fn new(dev: &CudaDevice, max_context: usize, n_dec: usize, heads: usize) -> Result<Self> {
        let v1 = crate::paged_use_v1(max_context, n_dec, heads);
        let partitions = max_context.div_ceil(PARTITION).max(1);
        let parts = if v1 {
            1
        } else {
            (n_dec * heads * partitions).max(1)
        };
        Ok(Self {
            v1,
            partitions,
            // SAFETY: v2 writes every partition the reduce reads (those below
            // each decode's context) before the reduce runs.
            tmp_out: unsafe { dev.alloc::<bf16>(parts * HEAD_DIM) }?,
            exp_sums: unsafe { dev.alloc::<f32>(parts) }?,
            max_logits: unsafe { dev.alloc::<f32>(parts) }?,
        })
    }
}

impl PagedPlan {
    pub(crate) fn new(dev: &CudaDevice, cache: &PagedCache, meta: &BatchMeta, heads: usize) -> Result<Self> {
        let table = |seq| {
            cache
                .block_table(seq)
                .ok_or(vpod_kvcache::KvCacheError::UnknownSequence { seq })
        };
        let (mut chunks, mut chunk_tables) = (Chunks::default(), vec![]);
        let (mut dec_rows, mut dec_lens, mut dec_tables) = (vec![], vec![], vec![]);
        for (i, s) in meta.seqs().iter().enumerate() {
            let start = meta.query_range(i).start;
            if s.query_len == 1 {
                dec_rows.push(start as i32);
                dec_lens.push(s.seq_len() as i32);
                dec_tables.push(table(s.seq_id)?);
            } else {
                chunks.push(start, s.context_len, s.query_len, 16 * PREFILL_WARPS);
                chunk_tables.push(table(s.seq_id)?);
            }
        }
        let (chunk_flat, chunk_width) = table_rows(chunk_tables.iter().copied());
        let (dec_flat, dec_width) = table_rows(dec_tables.iter().copied());
        let n_dec = dec_rows.len();
        let max_context = dec_lens.iter().copied().max().unwrap_or(1) as usize;
        Ok(Self {
            tokens: meta.num_tokens(),
            chunks: chunks.upload(dev)?,
            chunk_tables: upload(dev, &chunk_flat)?,
            chunk_width,
            n_dec,
            dec_rows: upload(dev, &dec_rows)?,
            dec_lens: upload(dev, &dec_lens)?,
            dec_tables: upload(dev, &dec_flat)?,
            dec_width,
            max_context,
            dec: DecodeKernel::new(dev, max_context, n_dec, heads)?,
        })
    }
}

impl PagedPlan {
    /// The plan of a padded decode step ([`BatchMeta::padded`]) in buffers
    /// that [`Self::refill_decode`] rewrites for later steps with the same
    /// rows and `max_context` (a bound on every sequence's length, as vLLM
    /// pads its captured steps' `max_context_len`: it picks v1 or v2, the
    /// partitions and the table width, `max_context` / block size).
    pub(crate) fn decode_static(
        dev: &CudaDevice,
        cache: &PagedCache,
        meta: &BatchMeta,
        heads: usize,
        max_context: usize,
    ) -> Result<Self> {
        let rows = meta.num_rows();
        let width = max_context.div_ceil(cache.layout().block_size).max(1);
        let (dec_lens, dec_flat) = Self::decode_rows(cache, meta, width)?;
        Ok(Self {
            tokens: rows,
            chunks: Chunks::default().upload(dev)?,
            chunk_tables: upload::<i32>(dev, &[])?,
            chunk_width: 1,
            n_dec: rows,
            dec_rows: upload(dev, &(0..rows as i32).collect::<Vec<_>>())?,
            dec_lens: upload(dev, &dec_lens)?,
            dec_tables: upload(dev, &dec_flat)?,
            dec_width: width,
            max_context,
            dec: DecodeKernel::new(dev, max_context, rows, heads)?,
        })
    }

    /// Per row of a padded decode step: its length and its block table
    /// (`width` entries, zero-padded); padding rows repeat row 0's.
    fn decode_rows(cache: &PagedCache, meta: &BatchMeta, width: usize) -> Result<(Vec<i32>, Vec<i32>)> {
        let mut lens = Vec::with_capacity(meta.num_rows());
        let mut tables = Vec::with_capacity(meta.num_rows() * width);
        for s in meta.seqs() {
            let t = cache
                .block_table(s.seq_id)
                .ok_or(vpod_kvcache::KvCacheError::UnknownSequence { seq: s.seq_id })?;
            if t.len() > width {
                return Err(crate::AttnError::InvalidBatch(format!(
                    "sequence {} holds {} blocks, more than the static plan's {width}",
                    s.seq_id,
                    t.len()
                )));
            }
            lens.push(s.seq_len() as i32);
            tables.extend(t.iter().map(|&b| b as i32));
            tables.resize(lens.len() * width, 0);
        }
        for _ in 0..meta.padding() {
            lens.push(lens[0]);
            tables.extend_from_within(..width);
        }
        Ok((lens, tables))
    }

    /// Rewrites a [`Self::decode_static`] plan's buffers for `meta`, in
    /// stream order.
    pub(crate) fn refill_decode(
        &mut self,
        dev: &CudaDevice,
        cache: &PagedCache,
        meta: &BatchMeta,
    ) -> Result<()> {
        if meta.num_rows() != self.tokens || meta.max_seq_len() > self.max_context {
            return Err(crate::AttnError::InvalidBatch(format!(
                "a step of {} rows up to {} tokens does not fit a static plan of {} rows up to {}",
                meta.num_rows(),
                meta.max_seq_len(),
                self.tokens,
                self.max_context
            )));
        }
        let (lens, tables) = Self::decode_rows(cache, meta, self.dec_width)?;
        crate::vattention_gpu::refill(dev, &lens, &mut self.dec_lens)?;
        crate::vattention_gpu::refill(dev, &tables, &mut self.dec_tables)
    }
}

/// One layer's attention over the paged cache (see the module docs); the
/// step's new K/V rows are already written.
pub(crate) struct GpuPaged<'a> {
    pub plan: &'a PagedPlan,
    pub block_size: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub scale: f32,
}

impl CustomOp3 for GpuPaged<'_> {
    fn name(&self) -> &'static str {
        "paged-gpu"
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
        candle_core::bail!("paged-gpu runs on CUDA tensors only (the CPU twin is PagedAttention)")
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
        let p = self.plan;
        crate::vattention_gpu::check_inputs("paged-gpu", [sq, sk, sv], lq, p.tokens, self.heads)?;
        if !lk.is_contiguous() || !lv.is_contiguous() || lk.shape().elem_count() != lv.shape().elem_count() {
            candle_core::bail!("paged-gpu: the K and V caches must be contiguous tensors of one size");
        }
        let dev = sq.device.clone();
        let stream = dev.cuda_stream();
        let q = sq.as_cuda_slice::<bf16>()?.slice(lq.start_offset()..);
        let k = sk.as_cuda_slice::<bf16>()?.slice(lk.start_offset()..);
        let v = sv.as_cuda_slice::<bf16>()?.slice(lv.start_offset()..);
        // SAFETY: the prefill and decode kernels below write every row of `out`
        // (each token is in exactly one prompt chunk or is one decode).
        let mut out = unsafe { dev.alloc::<bf16>(p.tokens * self.heads * HEAD_DIM) }?;
        let (heads, kv_heads) = (self.heads as i32, self.kv_heads as i32);
        // 1. Prompt chunks.
        if p.chunks.n_work > 0 {
            let f = crate::ops::cuda::function_with_smem(&dev, "paged_prefill_bf16", PREFILL_SMEM)?;
            let cfg = LaunchConfig {
                grid_dim: (p.chunks.n_work as u32, self.heads as u32, 1),
                block_dim: (32 * PREFILL_WARPS as u32, 1, 1),
                shared_mem_bytes: PREFILL_SMEM as u32,
            };
            let (width, group) = (p.chunk_width as i32, heads / kv_heads);
            let block_log2 = self.block_size.trailing_zeros() as i32;
            let mut b = stream.launch_builder(&f);
            b.arg(&q).arg(&mut out).arg(&k).arg(&v);
            let c = &p.chunks;
            b.arg(&c.work).arg(&c.q_start).arg(&c.ctx).arg(&c.q_len);
            b.arg(&p.chunk_tables).arg(&width);
            b.arg(&heads)
                .arg(&group)
                .arg(&kv_heads)
                .arg(&block_log2)
                .arg(&self.scale);
            // SAFETY: work items index the chunk arrays; every key a tile reads is
            // below its chunk's ctx + q_len, in blocks of its table (make_room +
            // the K/V write ran first).
            unsafe { b.launch(cfg) }.map_err(err)?;
        }
        // 2. Decode tokens.
        if p.n_dec > 0 {
            let (bs, width) = (self.block_size, p.dec_width as i32);
            let (tokens, grid_z, name) = if p.dec.v1 {
                (
                    p.max_context.div_ceil(bs) * bs,
                    1,
                    format!("paged_decode_v1_b{bs}_bf16"),
                )
            } else {
                (PARTITION, p.dec.partitions, format!("paged_decode_v2_b{bs}_bf16"))
            };
            let smem = 4 * tokens.max(256);
            let f = crate::ops::cuda::function_with_smem(&dev, &name, smem)?;
            let cfg = LaunchConfig {
                grid_dim: (self.heads as u32, p.n_dec as u32, grid_z as u32),
                block_dim: (128, 1, 1),
                shared_mem_bytes: smem as u32,
            };
            let mut b = stream.launch_builder(&f);
            b.arg(&p.dec.exp_sums).arg(&p.dec.max_logits);
            if p.dec.v1 {
                b.arg(&mut out);
            } else {
                b.arg(&p.dec.tmp_out);
            }
            b.arg(&q)
                .arg(&p.dec_rows)
                .arg(&k)
                .arg(&v)
                .arg(&p.dec_tables)
                .arg(&p.dec_lens)
                .arg(&width)
                .arg(&heads)
                .arg(&kv_heads)
                .arg(&self.scale);
            // SAFETY: the tables cover every decode's context_len keys (written);
            // v2's partials hold n_dec * heads * partitions entries.
            unsafe { b.launch(cfg) }.map_err(err)?;
            if !p.dec.v1 {
                let smem = 8 * p.dec.partitions;
                let f = crate::ops::cuda::function_with_smem(&dev, "paged_decode_reduce_bf16", smem)?;
                let cfg = LaunchConfig {
                    grid_dim: (self.heads as u32, p.n_dec as u32, 1),
                    block_dim: (128, 1, 1),
                    shared_mem_bytes: smem as u32,
                };
                let parts = p.dec.partitions as i32;
                let mut b = stream.launch_builder(&f);
                b.arg(&mut out)
                    .arg(&p.dec.exp_sums)
                    .arg(&p.dec.max_logits)
                    .arg(&p.dec.tmp_out)
                    .arg(&p.dec_rows)
                    .arg(&p.dec_lens)
                    .arg(&heads)
                    .arg(&parts);
                // SAFETY: reads the partitions v2 wrote (stream order), writes the decode rows.
                unsafe { b.launch(cfg) }.map_err(err)?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev), lq.shape().clone()))
    }
}
