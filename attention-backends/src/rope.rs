//! Rotary position embedding of a step's queries and keys, taken straight
//! from the fused QKV projection: [`rope_qk`] reads the q and k columns of
//! `qkv`, rotates them and writes `q [T, heads, d]` and `k [T, kv_heads, d]`,
//! both contiguous, in one pass (our `rope_qk_bf16` kernel on a GPU, its
//! twin on the CPU). candle's `rope_thd` needed the columns copied out first
//! and left `q` strided, which the attention ops copied again.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::Result;

/// Rotates the q and k heads of `qkv [T, >= (heads + 2 * kv_heads) * d]`
/// (bf16, rows contiguous) by `cos`, `sin [T, d / 2]` (each token's angles)
/// as transformers does in bf16 (non-interleaved halves; each product
/// rounded, then the sum). Returns contiguous `(q [T, heads, d], k [T,
/// kv_heads, d])`. `d % 16 == 0`.
pub fn rope_qk(
    qkv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
    heads: usize,
    kv_heads: usize,
) -> Result<(Tensor, Tensor)> {
    let (t, half) = cos.dims2()?;
    let d = 2 * half;
    let op = RopeQk { heads, kv_heads, d };
    let out = qkv.apply_op3_no_bwd(&cos.contiguous()?, &sin.contiguous()?, &op)?;
    let q = out.narrow(0, 0, t * heads * d)?.reshape((t, heads, d))?;
    let k = out
        .narrow(0, t * heads * d, t * kv_heads * d)?
        .reshape((t, kv_heads, d))?;
    Ok((q, k))
}

struct RopeQk {
    heads: usize,
    kv_heads: usize,
    d: usize,
}

/// (T, row stride of qkv) after checking the three inputs.
fn check(op: &RopeQk, dtypes: [DType; 3], l: [&Layout; 3]) -> candle_core::Result<(usize, usize)> {
    let RopeQk { heads, kv_heads, d } = *op;
    let (t, n) = l[0].shape().dims2()?;
    let stride = l[0].stride();
    let row = if t > 1 { stride[0] } else { n };
    let tables_ok = l[1..]
        .iter()
        .all(|c| c.is_contiguous() && c.shape().dims() == [t, d / 2]);
    if dtypes.iter().any(|&x| x != DType::BF16)
        || d == 0
        || !d.is_multiple_of(16)
        || n < (heads + 2 * kv_heads) * d
        || stride[1] != 1
        || !row.is_multiple_of(8)
        || !l[0].start_offset().is_multiple_of(8)
        || !tables_ok
    {
        candle_core::bail!(
            "rope_qk: needs bf16 qkv [T, >= (heads {heads} + 2 x kv_heads {kv_heads}) x d {d}] with 16-byte aligned rows, \
             cos/sin [T, d / 2] and d % 16 == 0; got qkv {:?} (strides {stride:?}), tables {:?}",
            l[0].dims(),
            l[1].dims()
        );
    }
    Ok((t, row))
}

fn bf16s(s: &CpuStorage) -> candle_core::Result<&[bf16]> {
    match s {
        CpuStorage::BF16(v) => Ok(v),
        _ => candle_core::bail!("rope_qk: bf16 only"),
    }
}

impl CustomOp3 for RopeQk {
    fn name(&self) -> &'static str {
        "rope-qk-bf16"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (t, row) = check(self, [s1.dtype(), s2.dtype(), s3.dtype()], [l1, l2, l3])?;
        let (qkv, cos, sin) = (bf16s(s1)?, bf16s(s2)?, bf16s(s3)?);
        let (cos, sin) = (&cos[l2.start_offset()..], &sin[l3.start_offset()..]);
        let (d, nh) = (self.d, self.heads + self.kv_heads);
        let half = d / 2;
        let r = |x: f32| bf16::from_f32(x).to_f32();
        let mut out = vec![bf16::ZERO; t * nh * d];
        for ti in 0..t {
            let x = &qkv[l1.start_offset() + ti * row..];
            let (c, s) = (&cos[ti * half..][..half], &sin[ti * half..][..half]);
            for h in 0..nh {
                let src = &x[h * d..][..d];
                let at = if h < self.heads {
                    (ti * self.heads + h) * d
                } else {
                    t * self.heads * d + (ti * self.kv_heads + h - self.heads) * d
                };
                let o = &mut out[at..at + d];
                for j in 0..half {
                    let (x1, x2) = (src[j].to_f32(), src[half + j].to_f32());
                    let (co, si) = (c[j].to_f32(), s[j].to_f32());
                    o[j] = bf16::from_f32(r(x1 * co) - r(x2 * si));
                    o[half + j] = bf16::from_f32(r(x2 * co) + r(x1 * si));
                }
            }
        }
        Ok((CpuStorage::BF16(out), Shape::from(t * nh * d)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (t, row) = check(self, [s1.dtype(), s2.dtype(), s3.dtype()], [l1, l2, l3])?;
        let dev = s1.device.clone();
        let qkv = s1.as_cuda_slice::<bf16>()?.slice(l1.start_offset()..);
        let cos = s2.as_cuda_slice::<bf16>()?.slice(l2.start_offset()..);
        let sin = s3.as_cuda_slice::<bf16>()?.slice(l3.start_offset()..);
        let (d, nh) = (self.d, self.heads + self.kv_heads);
        let pdl = crate::ops::cuda::PdlChain::begin(&dev, t * nh * d * 2)?;
        // SAFETY: the kernel writes every element of out.
        let mut out = unsafe { dev.alloc::<bf16>((t * nh * d).max(1)) }?;
        let threads = t * nh * d / 16;
        if threads > 0 {
            let func = crate::ops::cuda::function(&dev, "rope_qk_bf16")?;
            const BLOCK: u32 = 256;
            let cfg = LaunchConfig {
                grid_dim: ((threads as u32).div_ceil(BLOCK), 1, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let (ti, hi, kvi, di, rowi) = (
                t as i32,
                self.heads as i32,
                self.kv_heads as i32,
                d as i32,
                row as i64,
            );
            let stream = dev.cuda_stream();
            let mut b = crate::ops::cuda::Launch::new(&stream);
            b.after(pdl).buf(&qkv).buf(&cos).buf(&sin).buf_mut(&mut out);
            b.val(&ti).val(&hi).val(&kvi).val(&di).val(&rowi);
            // SAFETY: check() verified T rows of qkv at stride `row` (16-byte aligned) holding
            // the q and k heads, [T, d / 2] tables and d % 16 == 0; out holds T (heads + kv_heads) d;
            // the kernel waits (pdl.cuh).
            unsafe { b.run(&dev, &func, cfg) }?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(t * nh * d),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;

    /// The one-pass op equals candle's `rope_thd` over the copied-out columns
    /// (same bf16 roundings), with a strided (row-padded) qkv; bad shapes fail.
    #[test]
    fn matches_candle_rope_thd() -> Result<()> {
        let dev = Device::Cpu;
        let (t, heads, kv, d) = (5, 4, 2, 32);
        let n = (heads + 2 * kv) * d;
        let wide = Tensor::randn(0f32, 2.0, (t, n + 16), &dev)?.to_dtype(DType::BF16)?;
        let qkv = wide.narrow(1, 0, n)?;
        let cos = Tensor::randn(0f32, 1.0, (t, d / 2), &dev)?.to_dtype(DType::BF16)?;
        let sin = Tensor::randn(0f32, 1.0, (t, d / 2), &dev)?.to_dtype(DType::BF16)?;
        let (q, k) = rope_qk(&qkv, &cos, &sin, heads, kv)?;
        assert!(q.is_contiguous() && k.is_contiguous());
        let qk = qkv
            .narrow(1, 0, (heads + kv) * d)?
            .reshape((1, t, heads + kv, d))?
            .contiguous()?;
        let want = candle_nn::rotary_emb::rope_thd(&qk, &cos, &sin)?.squeeze(0)?;
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
            let (a, b) = (
                a.to_dtype(DType::F32)?.flatten_all()?,
                b.to_dtype(DType::F32)?.flatten_all()?,
            );
            Ok(a.to_vec1::<f32>()? == b.to_vec1::<f32>()?)
        };
        assert!(same(&q, &want.i((.., ..heads))?.contiguous()?)?);
        assert!(same(&k, &want.i((.., heads..))?.contiguous()?)?);
        assert!(rope_qk(&qkv.narrow(1, 0, n - 8)?, &cos, &sin, heads, kv).is_err());
        assert!(rope_qk(&qkv.to_dtype(DType::F32)?, &cos, &sin, heads, kv).is_err());
        Ok(())
    }
}
