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
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        use half::bf16;

        if candle_core::backend::BackendStorage::dtype(sq) != candle_core::DType::BF16 {
            candle_core::bail!("slot-decode: the CUDA kernel is bf16 only");
        }
        let dev = sq.device.clone();
        let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
            candle_core::Error::Cuda(e.to_string().into())
        };
        let b = self.slots.len();
        let q = sq.as_cuda_slice::<bf16>()?.slice(lq.start_offset()..);
        let k = sk.as_cuda_slice::<bf16>()?.slice(lk.start_offset()..);
        let v = sv.as_cuda_slice::<bf16>()?.slice(lv.start_offset()..);
        let slots: Vec<i32> = self.slots.iter().map(|&s| s as i32).collect();
        let lens: Vec<i32> = self.seq_lens.iter().map(|&n| n as i32).collect();
        let slots = dev.clone_htod(&slots)?;
        let lens = dev.clone_htod(&lens)?;
        let parts = b * self.heads * self.splits;
        // SAFETY: the split kernel writes every (head, split) entry of both
        // buffers before the combine kernel reads them.
        let mut part_o = unsafe { dev.alloc::<f32>(parts * DECODE_HEAD_DIM) }?;
        let mut part_ml = unsafe { dev.alloc::<f32>(parts * 2) }?;
        let mut out = unsafe { dev.alloc::<bf16>(b * self.heads * DECODE_HEAD_DIM) }?;
        let stream = dev.cuda_stream();
        let (h, kvh, ml, sp) = (
            self.heads as i32,
            self.kv_heads as i32,
            self.max_len as i32,
            self.splits as i32,
        );
        let group = h / kvh;
        let rows: Vec<i32> = (0..b as i32).collect();
        let rows = dev.clone_htod(&rows)?;
        let row = (self.kv_heads * DECODE_HEAD_DIM) as i64;
        let (slot_stride, pos_stride) = (ml as i64 * row, row);
        let smem = 3 * 2 * 64 * 256;
        let f = crate::ops::cuda::function(&dev, "slot_decode_bf16")?;
        f.set_attribute(
            candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            smem,
        )
        .map_err(err)?;
        let cfg = LaunchConfig {
            grid_dim: (self.splits as u32, self.kv_heads as u32, b as u32),
            block_dim: (128, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&q)
            .arg(&rows)
            .arg(&k)
            .arg(&v)
            .arg(&slots)
            .arg(&lens)
            .arg(&mut part_o)
            .arg(&mut part_ml);
        // No counters: the combine kernel below merges the splits.
        let no_counters = 0u64;
        l.arg(&no_counters).arg(&mut out);
        l.arg(&h)
            .arg(&group)
            .arg(&slot_stride)
            .arg(&pos_stride)
            .arg(&sp)
            .arg(&self.scale);
        // SAFETY: slot_decode() checked shapes, slots and lengths against the cache.
        unsafe { l.launch(cfg) }.map_err(err)?;
        let f = crate::ops::cuda::function(&dev, "slot_decode_combine_bf16")?;
        let cfg = LaunchConfig {
            grid_dim: ((b * self.heads) as u32, 1, 1),
            block_dim: (DECODE_HEAD_DIM as u32, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut l = stream.launch_builder(&f);
        l.arg(&part_o)
            .arg(&part_ml)
            .arg(&rows)
            .arg(&mut out)
            .arg(&h)
            .arg(&sp);
        // SAFETY: the buffers hold b * heads * splits partials, written above.
        unsafe { l.launch(cfg) }.map_err(err)?;
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            lq.shape().clone(),
        ))
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
