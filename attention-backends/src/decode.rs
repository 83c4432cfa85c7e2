//! Split-KV decode attention over the per-slot (vAttention) layout: one
//! query token per sequence, K/V read by (slot, position) with plain strides.
//! On CUDA it runs `slot_decode_bf16` (one block per split x KV head x
//! sequence, all query heads of the group per block as one tensor-core
//! tile) and the combine kernel;
//! on the CPU the online-softmax twin with the same split boundaries.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};

use crate::flash::{Elem, KvRows, Tiling, attend_rows, covered};
use crate::{AttnError, Result};

/// head_dim the kernel is built for.
pub const DECODE_HEAD_DIM: usize = 128;
/// Most query heads per KV head the CUDA kernel serves (one 16-row MMA tile;
/// the models need 4, 7 and 8).
pub const DECODE_MAX_GROUP: usize = 16;

/// `q: [batch, heads, 128]`, `k_cache`, `v_cache: [max_seqs, max_len, kv_heads, 128]`;
/// sequence `b` lives in slot `slots[b]` with `seq_lens[b]` keys, split into
/// `splits` partitions. Returns `[batch, heads, 128]`.
pub fn slot_decode(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &[u32],
    seq_lens: &[usize],
    splits: usize,
) -> Result<Tensor> {
    slot_decode_with(
        q,
        k_cache,
        v_cache,
        slots,
        seq_lens,
        splits,
        DecodeKernel::default(),
    )
}

/// Which kernel [`slot_decode_with`] runs on CUDA (the CPU twin is the same
/// for all), for tests and benchmarks of the kernels themselves.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DecodeKernel {
    /// A slim decode ([`crate::SlimDecode`]; GQA groups of at most
    /// [`SLIM_MAX_GROUP`]) instead of `slot_decode_bf16`.
    pub slim: Option<crate::SlimDecode>,
    /// One block an SM: each block asks for the most shared memory a block
    /// may have, so no second one fits. That is how a slim decode runs beside
    /// the slim prefill (one block an SM), here timed alone.
    pub one_block_per_sm: bool,
}

/// The largest GQA group the slim decodes take (their transposed products
/// hold 8 query heads); larger groups run `slot_decode_bf16`.
pub const SLIM_MAX_GROUP: usize = 8;

/// [`slot_decode`] with the CUDA kernel chosen by `kernel`. A slim kernel
/// for a GQA group above [`SLIM_MAX_GROUP`] is an error.
pub fn slot_decode_with(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    slots: &[u32],
    seq_lens: &[usize],
    splits: usize,
    kernel: DecodeKernel,
) -> Result<Tensor> {
    let (b, heads, d) = q.dims3()?;
    let (max_seqs, max_len, kv_heads, d2) = k_cache.dims4()?;
    let bad = |m: String| Err(AttnError::InvalidBatch(m));
    if d != DECODE_HEAD_DIM || d2 != d || v_cache.dims() != k_cache.dims() {
        return bad(format!(
            "slot decode needs head_dim {DECODE_HEAD_DIM} and equal K/V caches"
        ));
    }
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return bad(format!("{heads} heads are not a multiple of {kv_heads} KV heads"));
    }
    if !q.device().is_cpu() && heads / kv_heads > DECODE_MAX_GROUP {
        return bad(format!(
            "no decode kernel for GQA group {} (at most {DECODE_MAX_GROUP})",
            heads / kv_heads
        ));
    }
    if let Some(k) = kernel.slim.filter(|_| heads / kv_heads > SLIM_MAX_GROUP) {
        return bad(format!(
            "{k:?}: the slim decodes take GQA groups of at most {SLIM_MAX_GROUP}, not {}",
            heads / kv_heads
        ));
    }
    if slots.len() != b || seq_lens.len() != b || splits == 0 {
        return bad("one slot and one length per sequence, and at least one split".into());
    }
    for (&s, &n) in slots.iter().zip(seq_lens) {
        if s as usize >= max_seqs || n == 0 || n > max_len {
            return bad(format!(
                "slot {s} / length {n} outside the cache ({max_seqs} slots of {max_len})"
            ));
        }
    }
    if !k_cache.is_contiguous() || !v_cache.is_contiguous() {
        return bad("the caches must be contiguous".into());
    }
    let op = SlotDecode {
        slots: slots.to_vec(),
        seq_lens: seq_lens.to_vec(),
        splits,
        heads,
        kv_heads,
        max_len,
        scale: 1.0 / (d as f32).sqrt(),
        kernel,
    };
    Ok(q.contiguous()?.apply_op3_no_bwd(k_cache, v_cache, &op)?)
}

struct SlotDecode {
    slots: Vec<u32>,
    seq_lens: Vec<usize>,
    splits: usize,
    heads: usize,
    kv_heads: usize,
    max_len: usize,
    scale: f32,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: DecodeKernel,
}

struct Dense<'a, T> {
    k: &'a [T],
    v: &'a [T],
    slot: usize,
    max_len: usize,
    kv_heads: usize,
}

impl<T: Elem> KvRows for Dense<'_, T> {
    fn key(&self, pos: usize, h: usize, out: &mut [f32]) {
        let at = ((self.slot * self.max_len + pos) * self.kv_heads + h) * out.len();
        out.iter_mut()
            .zip(&self.k[at..])
            .for_each(|(o, x)| *o = x.to_f32());
    }
    fn value(&self, pos: usize, h: usize, out: &mut [f32]) {
        let at = ((self.slot * self.max_len + pos) * self.kv_heads + h) * out.len();
        out.iter_mut()
            .zip(&self.v[at..])
            .for_each(|(o, x)| *o = x.to_f32());
    }
}

impl SlotDecode {
    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let mut out = vec![T::from_f32(0.0); q.len()];
        for (b, (&slot, &n)) in self.slots.iter().zip(&self.seq_lens).enumerate() {
            let rows = Dense {
                k,
                v,
                slot: slot as usize,
                max_len: self.max_len,
                kv_heads: self.kv_heads,
            };
            // Tile 1: partition p holds keys [p * ceil(n / splits), ...), as the kernel's.
            let tiling = Tiling {
                tile: 1,
                splits: self.splits,
            };
            let (h, kvh, scale) = (self.heads, self.kv_heads, self.scale);
            attend_rows(
                q,
                &mut out,
                b,
                &rows,
                n - 1,
                1,
                h,
                kvh,
                DECODE_HEAD_DIM,
                scale,
                tiling,
            );
        }
        out
    }
}

impl CustomOp3 for SlotDecode {
    fn name(&self) -> &'static str {
        "slot-decode"
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
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run(covered(q, lq), covered(k, lk), covered(v, lv)))
            }
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(covered(q, lq), covered(k, lk), covered(v, lv)))
            }
            _ => candle_core::bail!("slot-decode: q and the caches must all be bf16 or all f32"),
        };
        Ok((out, lq.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sq: &candle_core::CudaStorage,
        lq: &Layout,
        sk: &candle_core::CudaStorage,
        lk: &Layout,
        sv: &candle_core::CudaStorage,
        lv: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        use half::bf16;

        if candle_core::backend::BackendStorage::dtype(sq) != candle_core::DType::BF16 {
            candle_core::bail!("slot-decode: the CUDA kernel is bf16 only");
        }
        let dev = sq.device.clone();
        let stream = dev.cuda_stream();
        let b = self.slots.len();
        let q = sq.as_cuda_slice::<bf16>()?.slice(lq.start_offset()..);
        let k = sk.as_cuda_slice::<bf16>()?.slice(lk.start_offset()..);
        let v = sv.as_cuda_slice::<bf16>()?.slice(lv.start_offset()..);
        let (k_ptr, _k_used) = k.device_ptr(&stream);
        let (v_ptr, _v_used) = v.device_ptr(&stream);
        let slots: Vec<i32> = self.slots.iter().map(|&s| s as i32).collect();
        let lens: Vec<i32> = self.seq_lens.iter().map(|&n| n as i32).collect();
        let rows: Vec<i32> = (0..b as i32).collect();
        let parts = b * self.heads * self.splits;
        let row = (self.kv_heads * DECODE_HEAD_DIM) as i64;
        // SAFETY: the split kernel writes every (head, split) entry of both
        // buffers before the combine kernel reads them, and every output row.
        let (part_o, part_ml, mut out) = unsafe {
            (
                dev.alloc::<f32>(parts * DECODE_HEAD_DIM)?,
                dev.alloc::<f32>(parts * 2)?,
                dev.alloc::<bf16>(b * self.heads * DECODE_HEAD_DIM)?,
            )
        };
        let launch = cuda::DecodeLaunch {
            q: &q,
            q_rows: &dev.clone_htod(&rows)?,
            k: k_ptr,
            v: v_ptr,
            slots: &dev.clone_htod(&slots)?,
            seq_lens: &dev.clone_htod(&lens)?,
            part_o: &part_o,
            part_ml: &part_ml,
            counters: None,
            batch: b,
            heads: self.heads,
            kv_heads: self.kv_heads,
            slot_stride: self.max_len as i64 * row,
            pos_stride: row,
            splits: self.splits,
            scale: self.scale,
            slim: self.kernel.slim,
            one_block_per_sm: self.kernel.one_block_per_sm,
        };
        // SAFETY: slot_decode() checked shapes, slots and lengths against the cache.
        unsafe { cuda::launch(&dev, &launch, &mut out, None, None) }?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            lq.shape().clone(),
        ))
    }
}

/// Launching the decode kernels; shared by [`slot_decode`] (dense cache
/// tensors) and the `vattention` backend (the VMM cache).
#[cfg(feature = "cuda")]
pub(crate) mod cuda {
    use std::ffi::c_void;

    use candle_core::cuda_backend::CudaDevice;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaStream, CudaView, DevicePtr, LaunchConfig, sys,
    };
    use half::bf16;

    use super::DECODE_HEAD_DIM;

    /// One pipeline stage of a decode split: a 64-key K and V tile (slot_decode.cuh's `DEC_STAGE_BYTES`).
    pub const DECODE_STAGE_BYTES: usize = 2 * 64 * 256;
    /// Dynamic shared memory of `slot_decode_bf16`: 3 stages.
    pub const DECODE_SMEM: usize = 3 * DECODE_STAGE_BYTES;
    /// Dynamic shared memory of the slim decodes (`slot_decode_slim_bf16`,
    /// `slot_decode_slimr_bf16`): 2 stages of 64-key K and V tiles, or a
    /// ring of 4 slots of 16 rows a warp.
    pub const DECODE_SLIM_SMEM: usize = 2 * DECODE_STAGE_BYTES;
    pub use super::SLIM_MAX_GROUP;

    /// What the split-KV decode reads and writes: `q` rows `q_rows[b]`, K/V
    /// rows at `k` / `v` + `slots[b] * slot_stride + position * pos_stride`
    /// elements, partials for `batch * heads * splits`; with `counters`
    /// (zeroed, `batch * kv_heads`) the kernel merges the splits itself,
    /// without them the combine kernel does.
    pub(crate) struct DecodeLaunch<'a> {
        pub q: &'a CudaView<'a, bf16>,
        pub q_rows: &'a CudaSlice<i32>,
        pub k: u64,
        pub v: u64,
        pub slots: &'a CudaSlice<i32>,
        pub seq_lens: &'a CudaSlice<i32>,
        pub part_o: &'a CudaSlice<f32>,
        pub part_ml: &'a CudaSlice<f32>,
        pub counters: Option<&'a CudaSlice<i32>>,
        pub batch: usize,
        pub heads: usize,
        pub kv_heads: usize,
        pub slot_stride: i64,
        pub pos_stride: i64,
        pub splits: usize,
        pub scale: f32,
        /// A slim kernel ([`crate::SlimDecode`]: transposed products, GQA
        /// groups of at most 8, 64 KiB, at most 104 registers a thread),
        /// whose blocks fit beside a `slot_prefill_wsps_bf16` block on one
        /// SM. Ignored (the plain kernel runs) for a larger group.
        pub slim: Option<crate::SlimDecode>,
        /// Each block asks for the most shared memory a block may have, so
        /// one block runs an SM ([`super::DecodeKernel::one_block_per_sm`]).
        pub one_block_per_sm: bool,
    }

    use crate::ops::cuda::err;

    /// The device's stream (its context bound to this thread, for raw
    /// launches) and the stream to launch on: `stream`, else that one.
    fn streams(
        dev: &CudaDevice,
        stream: Option<sys::CUstream>,
    ) -> candle_core::Result<(std::sync::Arc<CudaStream>, sys::CUstream)> {
        let main = dev.cuda_stream();
        main.context().bind_to_thread().map_err(err)?;
        let on = stream.unwrap_or_else(|| main.cu_stream());
        Ok((main, on))
    }

    /// Runs the split kernel (and the combine kernel when `counters` is
    /// `None`), writing rows `q_rows` of `out`, on the device's stream or on
    /// `stream` (a raw stream of the same context: the two-stream path).
    ///
    /// # Safety
    /// Every key below `seq_lens[b]` of slot `slots[b]` must be readable
    /// device memory, and the buffers must have the sizes documented on
    /// [`DecodeLaunch`]; on another stream, the caller orders it after the
    /// writes of `q`, the cache and the buffers, and `out`'s readers after it.
    pub(crate) unsafe fn launch(
        dev: &CudaDevice,
        l: &DecodeLaunch<'_>,
        out: &mut CudaSlice<bf16>,
        stream: Option<sys::CUstream>,
        chain: Option<crate::ops::cuda::PdlChain>,
    ) -> candle_core::Result<()> {
        if stream.is_some() && chain.is_some() {
            candle_core::bail!(
                "decode launch: a PDL chain belongs to the device's stream, not a side stream"
            );
        }
        let (main, on) = streams(dev, stream)?;
        // Device addresses (cudarc's guards are no-ops with one cudarc stream).
        let ptr = |s: &CudaSlice<i32>| s.device_ptr(&main).0;
        let fptr = |s: &CudaSlice<f32>| s.device_ptr(&main).0;
        let mut q = l.q.device_ptr(&main).0;
        let (mut q_rows, mut slots, mut lens) = (ptr(l.q_rows), ptr(l.slots), ptr(l.seq_lens));
        let (mut part_o, mut part_ml) = (fptr(l.part_o), fptr(l.part_ml));
        let mut counters = l.counters.map_or(0, ptr);
        let mut out_ptr = out.device_ptr(&main).0;
        let (mut k, mut v) = (l.k, l.v);
        let (mut heads, mut group, mut splits) =
            (l.heads as i32, (l.heads / l.kv_heads) as i32, l.splits as i32);
        let (mut ss, mut ps, mut scale) = (l.slot_stride, l.pos_stride, l.scale);
        let slim = l.slim.filter(|_| group as usize <= SLIM_MAX_GROUP);
        let (f, mut smem) = match slim {
            Some(k) => (
                crate::ops::cuda::function_max_carveout(dev, k.symbol(), DECODE_SLIM_SMEM)?,
                DECODE_SLIM_SMEM,
            ),
            None => (
                crate::ops::cuda::function_with_smem(dev, "slot_decode_bf16", DECODE_SMEM)?,
                DECODE_SMEM,
            ),
        };
        if l.one_block_per_sm {
            use candle_core::cuda_backend::cudarc::driver::sys::{
                CUdevice_attribute as A, CUfunction_attribute as F,
            };
            let most = main
                .context()
                .attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
                .map_err(err)? as usize;
            // The block's static shared memory counts against the same limit.
            let fixed = f
                .get_attribute(F::CU_FUNC_ATTRIBUTE_SHARED_SIZE_BYTES)
                .map_err(err)? as usize;
            smem = smem.max(most.saturating_sub(fixed));
            f.set_attribute(F::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32)
                .map_err(err)?;
        }
        let mut args = [
            (&raw mut q).cast::<c_void>(),
            (&raw mut q_rows).cast(),
            (&raw mut k).cast(),
            (&raw mut v).cast(),
            (&raw mut slots).cast(),
            (&raw mut lens).cast(),
            (&raw mut part_o).cast(),
            (&raw mut part_ml).cast(),
            (&raw mut counters).cast(),
            (&raw mut out_ptr).cast(),
            (&raw mut heads).cast(),
            (&raw mut group).cast(),
            (&raw mut ss).cast(),
            (&raw mut ps).cast(),
            (&raw mut splits).cast(),
            (&raw mut scale).cast(),
        ];
        let grid = (l.splits as u32, l.kv_heads as u32, l.batch as u32);
        // SAFETY: the arguments match the kernel's signature (lib.rs of vpod-kernels);
        // the caller vouches for the memory (see above).
        // The kernel waits (pdl.cuh).
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        unsafe { crate::ops::cuda::launch_raw(dev, &f, cfg, on, &mut args, chain) }?;
        if l.counters.is_none() {
            // SAFETY: the partials were written above, in stream order.
            unsafe { combine(dev, l, out, stream) }?;
        }
        Ok(())
    }

    /// The combine kernel alone: merges the partials of `l` into rows `q_rows` of `out`.
    ///
    /// # Safety
    /// The split kernel (or the POD kernel) wrote every partial, in stream order.
    pub(crate) unsafe fn combine(
        dev: &CudaDevice,
        l: &DecodeLaunch<'_>,
        out: &mut CudaSlice<bf16>,
        stream: Option<sys::CUstream>,
    ) -> candle_core::Result<()> {
        let (main, on) = streams(dev, stream)?;
        let mut part_o = l.part_o.device_ptr(&main).0;
        let mut part_ml = l.part_ml.device_ptr(&main).0;
        let mut q_rows = l.q_rows.device_ptr(&main).0;
        let mut out_ptr = out.device_ptr(&main).0;
        let (mut heads, mut splits) = (l.heads as i32, l.splits as i32);
        let f = crate::ops::cuda::function(dev, "slot_decode_combine_bf16")?;
        let mut args = [
            (&raw mut part_o).cast::<c_void>(),
            (&raw mut part_ml).cast(),
            (&raw mut q_rows).cast(),
            (&raw mut out_ptr).cast(),
            (&raw mut heads).cast(),
            (&raw mut splits).cast(),
        ];
        let grid = ((l.batch * l.heads) as u32, 1, 1);
        // SAFETY: the arguments match slot_decode_combine_bf16; reads the partials,
        // writes rows q_rows of out.
        // The kernel waits (pdl.cuh).
        let cfg = LaunchConfig {
            grid_dim: grid,
            block_dim: (DECODE_HEAD_DIM as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { crate::ops::cuda::launch_raw(dev, &f, cfg, on, &mut args, None) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The split count does not change the result, and bad shapes are refused.
    #[test]
    fn splits_agree_and_arguments_are_checked() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 8, 128), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (3, 50, 2, 128), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (3, 50, 2, 128), &dev)?;
        let one = slot_decode(&q, &k, &v, &[2, 0], &[50, 7], 1)?;
        let many = slot_decode(&q, &k, &v, &[2, 0], &[50, 7], 5)?;
        let diff = (one - many)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        assert!(slot_decode(&q, &k, &v, &[3, 0], &[50, 7], 1).is_err());
        assert!(slot_decode(&q, &k, &v, &[2, 0], &[51, 7], 1).is_err());
        Ok(())
    }
}
