//! Greedy sampling where the logits are: [`argmax_rows`] picks every row's
//! token on the logits' device (our `argmax_f32` kernel on a GPU), so that a
//! greedy step brings 4 bytes a row to the host instead of the whole row
//! (0.5 MB with a 128K vocabulary) and the host does not scan it while the
//! GPU waits for the next step.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::Result;

/// Index of the largest logit; the first one on ties (as `torch.argmax`).
/// A strict `>` scan from index 0: NaNs never win, and a row whose element 0
/// is NaN gives 0. The GPU kernel returns the same index.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Bit 31 of an [`argmax_rows`] entry: the row holds a NaN or an infinity.
pub const ARGMAX_NONFINITE: u32 = 1 << 31;

/// `[rows]` u32: [`argmax`] of every row of f32 `logits [rows, vocab]`,
/// with [`ARGMAX_NONFINITE`] set where the row is not all finite (one pass,
/// one copy to the host for a greedy step's tokens and their check).
pub fn argmax_rows(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.contiguous()?.apply_op1_no_bwd(&ArgmaxRows)?)
}

struct ArgmaxRows;

/// (rows, vocab) of a contiguous f32 logits tensor.
fn rows_dims(l: &Layout, dtype: DType) -> candle_core::Result<(usize, usize)> {
    let (rows, n) = l.shape().dims2()?;
    if dtype != DType::F32 || !l.is_contiguous() || n == 0 || n > i32::MAX as usize {
        candle_core::bail!(
            "argmax_rows: needs contiguous f32 logits [rows, vocab], got {dtype:?} {:?}",
            l.dims()
        );
    }
    Ok((rows, n))
}

impl CustomOp1 for ArgmaxRows {
    fn name(&self) -> &'static str {
        "argmax-rows-f32"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let (rows, n) = rows_dims(l, s.dtype())?;
        let CpuStorage::F32(v) = s else {
            candle_core::bail!("argmax_rows: f32 only")
        };
        let x = &v[l.start_offset()..l.start_offset() + rows * n];
        let out = x
            .chunks_exact(n)
            .map(|r| {
                argmax(r)
                    | if r.iter().all(|v| v.is_finite()) {
                        0
                    } else {
                        ARGMAX_NONFINITE
                    }
            })
            .collect();
        Ok((CpuStorage::U32(out), Shape::from(rows)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
        let (rows, n) = rows_dims(l, s.dtype())?;
        let dev = s.device.clone();
        let x = s.as_cuda_slice::<f32>()?.slice(l.start_offset()..);
        let pdl = crate::ops::cuda::PdlChain::begin(&dev, rows * 4)?;
        // SAFETY: the kernel writes all `rows` outputs.
        let mut out = unsafe { dev.alloc::<u32>(rows.max(1)) }?;
        if rows > 0 {
            let func = crate::ops::cuda::function(&dev, "argmax_f32")?;
            let cfg = LaunchConfig {
                grid_dim: (rows as u32, 1, 1),
                block_dim: (1024, 1, 1),
                shared_mem_bytes: 0,
            };
            let ni = n as i32;
            let stream = dev.cuda_stream();
            let mut b = crate::ops::cuda::Launch::new(&stream);
            b.after(pdl).buf(&x).buf_mut(&mut out).val(&ni);
            // SAFETY: rows_dims checked a contiguous [rows, n] f32 tensor starting at
            // x; one block reads one row and writes out[block]; out holds rows values;
            // the kernel waits (pdl.cuh).
            unsafe { b.run(&dev, &func, cfg) }?;
        }
        Ok((
            candle_core::CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from(rows),
        ))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn first_maximum_and_nans() {
        assert_eq!(argmax(&[0.1, 3.0, -1.0, 3.0]), 1);
        assert_eq!(argmax(&[1.0, f32::NAN, 2.0]), 2);
        assert_eq!(argmax(&[f32::NAN, 5.0]), 0);
        assert_eq!(argmax(&[f32::NEG_INFINITY; 3]), 0);
    }

    #[test]
    fn rows_on_the_cpu() -> Result<()> {
        let l = Tensor::new(&[[0f32, 2.0, 2.0, -1.0], [7.0, 1.0, 8.0, 8.0]], &Device::Cpu)?;
        assert_eq!(argmax_rows(&l)?.to_vec1::<u32>()?, vec![1, 2]);
        let l = Tensor::new(&[[0f32, f32::NAN, 2.0], [f32::INFINITY, 1.0, 0.0]], &Device::Cpu)?;
        assert_eq!(
            argmax_rows(&l)?.to_vec1::<u32>()?,
            vec![2 | ARGMAX_NONFINITE, ARGMAX_NONFINITE]
        );
        assert!(argmax_rows(&l.to_dtype(DType::BF16)?).is_err());
        Ok(())
    }
}
