//! Candle custom ops around our CUDA kernels, each with its CPU twin.
//!
//! [`write_kv`] writes a step's new K or V rows into a cache tensor in the
//! paged or the per-slot layout (an `InplaceOp3`: the cache is updated in
//! place). Every argument is validated with a clear error before the single
//! `unsafe` launch; the CPU path runs the loops of `vpod_kvcache`'s layouts,
//! which define what the kernel must produce.

use candle_core::{CpuStorage, DType, InplaceOp3, Layout, Tensor};
use vpod_kvcache::{PagedLayout, SlotLayout};

use crate::{AttnError, Result};

/// Which cache layout a write targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvLayout {
    /// vLLM's paged K (`is_value == false`) or V layout; the index is a slot mapping.
    Paged { layout: PagedLayout, is_value: bool },
    /// The per-slot (vAttention) layout; the index holds rows `slot * max_len + position`.
    Slot(SlotLayout),
}

impl KvLayout {
    fn row_elems(&self) -> usize {
        match self {
            Self::Paged { layout, .. } => layout.kv_heads * layout.head_dim,
            Self::Slot(s) => s.row_elems(),
        }
    }

    fn cache_elems(&self) -> usize {
        match self {
            Self::Paged { layout, .. } => layout.elems(),
            Self::Slot(s) => s.max_seqs * s.max_len * s.row_elems(),
        }
    }

    fn heads_dim(&self) -> (usize, usize) {
        match self {
            Self::Paged { layout, .. } => (layout.kv_heads, layout.head_dim),
            Self::Slot(s) => (s.kv_heads, s.head_dim),
        }
    }
}

/// Writes `src: [T, kv_heads, head_dim]` (rows may be strided, e.g. a view of
/// a fused QKV output) into `cache` at `index: [T]` i64 (slots or rows, -1
/// skips a token). `cache` must be contiguous with `layout`'s element count.
pub fn write_kv(cache: &Tensor, src: &Tensor, index: &Tensor, layout: KvLayout) -> Result<()> {
    let (kv_heads, head_dim) = layout.heads_dim();
    let t = index.dims1()?;
    let expected = vec![t, kv_heads, head_dim];
    if src.dims() != expected.as_slice() {
        return Err(AttnError::BadShape {
            what: "new K/V rows",
            got: src.dims().to_vec(),
            expected,
        });
    }
    let bad = |m: String| Err(AttnError::InvalidBatch(m));
    if index.dtype() != DType::I64 {
        return bad(format!("KV write index must be i64, got {:?}", index.dtype()));
    }
    if cache.dtype() != src.dtype() {
        return bad(format!(
            "cache is {:?} but the new rows are {:?}",
            cache.dtype(),
            src.dtype()
        ));
    }
    if cache.elem_count() != layout.cache_elems() || !cache.is_contiguous() {
        return bad(format!(
            "cache tensor {:?} (contiguous: {}) does not hold the layout's {} elements contiguously",
            cache.dims(),
            cache.is_contiguous(),
            layout.cache_elems()
        ));
    }
    // The kernels read each row as [kv_heads * head_dim] contiguous elements.
    let src = match src.stride() {
        [_, s1, 1] if *s1 == head_dim => src.clone(),
        _ => src.contiguous()?,
    };
    let index = index.contiguous()?;
    if let KvLayout::Slot(_) = layout {
        let row_bytes = layout.row_elems() * src.dtype().size_in_bytes();
        let stride_bytes = src.stride()[0] * src.dtype().size_in_bytes();
        if !row_bytes.is_multiple_of(16) || !stride_bytes.is_multiple_of(16) {
            return bad(format!(
                "per-slot rows must be multiples of 16 bytes (row {row_bytes}, stride {stride_bytes})"
            ));
        }
    }
    cache.inplace_op3(&src, &index, &KvWrite(layout))?;
    Ok(())
}

struct KvWrite(KvLayout);

fn cpu_write<T: Copy>(
    op: &KvLayout,
    cache: &mut [T],
    src: &[T],
    index: &[i64],
    src_stride: usize,
) -> vpod_kvcache::Result<()> {
    match op {
        KvLayout::Paged { layout, is_value } => layout.write(cache, src, index, src_stride, *is_value),
        KvLayout::Slot(s) => s.write(cache, src, index, src_stride),
    }
}

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        cache: &mut CpuStorage,
        l_cache: &Layout,
        src: &CpuStorage,
        l_src: &Layout,
        index: &CpuStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        let c0 = l_cache.start_offset();
        let s0 = l_src.start_offset();
        let stride = l_src.stride()[0];
        let CpuStorage::I64(idx) = index else {
            candle_core::bail!("kv-write: index must be i64")
        };
        let idx = &idx[l_index.start_offset()..l_index.start_offset() + l_index.shape().elem_count()];
        let r = match (cache, src) {
            (CpuStorage::BF16(c), CpuStorage::BF16(s)) => {
                cpu_write(&self.0, &mut c[c0..], &s[s0..], idx, stride)
            }
            (CpuStorage::F16(c), CpuStorage::F16(s)) => {
                cpu_write(&self.0, &mut c[c0..], &s[s0..], idx, stride)
            }
            (CpuStorage::F32(c), CpuStorage::F32(s)) => {
                cpu_write(&self.0, &mut c[c0..], &s[s0..], idx, stride)
            }
            _ => candle_core::bail!("kv-write: cache and rows must both be bf16, f16 or f32"),
        };
        r.map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        cache: &mut candle_core::CudaStorage,
        l_cache: &Layout,
        src: &candle_core::CudaStorage,
        l_src: &Layout,
        index: &candle_core::CudaStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        cuda::write_kv(&self.0, cache, l_cache, src, l_src, index, l_index)
    }
}

/// Benchmarks: queues a one-thread kernel on `dev`'s stream that spins for
/// `cycles` SM cycles (kernels/src/gpu_spin.cu), so that launches queued
/// after it start only once the host has queued them all (no launch latency
/// inside events recorded around them). A no-op on the CPU.
pub fn gpu_spin(dev: &candle_core::Device, cycles: u64) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = dev {
        use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
        let f = cuda::function(dev, "gpu_spin")?;
        let cycles = cycles.min(i64::MAX as u64) as i64;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&cycles);
        // SAFETY: gpu_spin(long long) reads no memory.
        unsafe { b.launch(LaunchConfig::for_num_elems(1)) }.map_err(cuda::err)?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (dev, cycles);
    Ok(())
}

#[cfg(feature = "cuda")]
pub mod cuda {
    //! Loading our fatbins (once per device) and launching them.

    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
    use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
    use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId};
    use candle_core::{CudaStorage, DType, Layout};
    use half::bf16;

    use super::KvLayout;

    type ModuleCache = Mutex<HashMap<(DeviceId, &'static str), Arc<CudaModule>>>;
    static MODULES: OnceLock<ModuleCache> = OnceLock::new();

    /// A CUDA driver (or any) error as a candle error.
    pub(crate) fn err(e: impl std::fmt::Display) -> candle_core::Error {
        candle_core::Error::Cuda(e.to_string().into())
    }

    /// The kernel `name` on `dev`, loading its module's fatbin on first use.
    pub fn function(dev: &CudaDevice, name: &str) -> candle_core::Result<CudaFunction> {
        let kernel = vpod_kernels::kernel(name)
            .ok_or_else(|| err(format!("kernel {name} is not compiled into this build")))?;
        let mut modules = MODULES.get_or_init(Default::default).lock().map_err(err)?;
        let module = match modules.get(&(dev.id(), kernel.name)) {
            Some(m) => m.clone(),
            None => {
                let ctx = dev.cuda_stream().context().clone();
                let m = ctx
                    .load_module(Ptx::from_binary(kernel.fatbin.to_vec()))
                    .map_err(err)?;
                modules.insert((dev.id(), kernel.name), m.clone());
                m
            }
        };
        module.load_function(name).map_err(err)
    }

    /// Copies `v` over the first `v.len()` elements of the contiguous CUDA
    /// tensor `t`, in stream order, without moving it: a buffer that a
    /// captured CUDA graph reads in place (candle has no in-place upload;
    /// its own uploads go through a content cache while a capture is on).
    pub fn write_host<
        T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + CudaDType + candle_core::WithDType,
    >(
        t: &candle_core::Tensor,
        v: &[T],
    ) -> candle_core::Result<()> {
        use candle_core::cuda_backend::cudarc::driver::DevicePtr;
        if t.dtype() != T::DTYPE || !t.is_contiguous() || v.len() > t.elem_count() {
            candle_core::bail!(
                "write_host: {} {:?} values into a {:?} tensor of {} elements (contiguous: {})",
                v.len(),
                T::DTYPE,
                t.dtype(),
                t.elem_count(),
                t.is_contiguous()
            );
        }
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cuda(cs) = &*storage else {
            candle_core::bail!("write_host: not a CUDA tensor")
        };
        let stream = cs.device.cuda_stream();
        let slice = cs.as_cuda_slice::<T>()?;
        let (base, _sync) = slice.device_ptr(&stream);
        let dst = base + (layout.start_offset() * size_of::<T>()) as u64;
        // SAFETY: dst .. dst + v.len() lies inside the tensor's allocation
        // (checked above); the copy is ordered on the tensor's stream, and a
        // pageable source is staged before the call returns.
        unsafe {
            candle_core::cuda_backend::cudarc::driver::result::memcpy_htod_async(dst, v, stream.cu_stream())
        }
        .map_err(err)
    }

    /// [`function`], allowed `smem` bytes of dynamic shared memory (above
    /// the default 48 KiB a launch must ask for).
    pub fn function_with_smem(
        dev: &CudaDevice,
        name: &str,
        smem: usize,
    ) -> candle_core::Result<CudaFunction> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
        let f = function(dev, name)?;
        if smem > 48 * 1024 {
            f.set_attribute(
                CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(err)?;
        }
        Ok(f)
    }

    pub fn write_kv(
        op: &KvLayout,
        cache: &mut CudaStorage,
        l_cache: &Layout,
        src: &CudaStorage,
        l_src: &Layout,
        index: &CudaStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        match candle_core::backend::BackendStorage::dtype(cache) {
            DType::BF16 => launch::<bf16>(op, "bf16", cache, l_cache, src, l_src, index, l_index),
            DType::F32 => launch::<f32>(op, "f32", cache, l_cache, src, l_src, index, l_index),
            d => candle_core::bail!("kv-write: no CUDA kernel for {d:?} (bf16 and f32 are built)"),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn launch<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        op: &KvLayout,
        suffix: &str,
        cache: &mut CudaStorage,
        l_cache: &Layout,
        src: &CudaStorage,
        l_src: &Layout,
        index: &CudaStorage,
        l_index: &Layout,
    ) -> candle_core::Result<()> {
        let dev = cache.device.clone();
        let tokens = l_index.shape().elem_count();
        if tokens == 0 {
            return Ok(());
        }
        let src_stride = l_src.stride()[0] as i64;
        let src = src.as_cuda_slice::<T>()?.slice(l_src.start_offset()..);
        let index = index.as_cuda_slice::<i64>()?.slice(l_index.start_offset()..);
        let mut cache = cache
            .as_cuda_slice_mut::<T>()?
            .slice_mut(l_cache.start_offset()..);
        let stream = dev.cuda_stream();
        let row_elems = op.row_elems();
        let vector = 16 / size_of::<T>();
        let threads = (row_elems / vector).clamp(32, 512) as u32;
        let cfg = LaunchConfig {
            grid_dim: (tokens as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        match op {
            KvLayout::Paged { layout, is_value } => {
                let name = if suffix == "bf16" {
                    "paged_write_kv_bf16"
                } else {
                    "paged_write_kv_f32"
                };
                let f = function(&dev, name)?;
                let (h, d, b, v) = (
                    layout.kv_heads as i32,
                    layout.head_dim as i32,
                    layout.block_size as i32,
                    *is_value as i32,
                );
                let mut builder = stream.launch_builder(&f);
                builder
                    .arg(&mut cache)
                    .arg(&src)
                    .arg(&index)
                    .arg(&src_stride)
                    .arg(&h)
                    .arg(&d)
                    .arg(&b)
                    .arg(&v);
                // SAFETY: write_kv() checked the shapes, dtypes, contiguity and the
                // index range (the CPU twin's bounds are the kernel's); the views
                // start at the tensors' offsets.
                unsafe { builder.launch(cfg) }.map_err(err)?;
            }
            KvLayout::Slot(_) => {
                let name = if suffix == "bf16" {
                    "slot_write_kv_bf16"
                } else {
                    "slot_write_kv_f32"
                };
                let f = function(&dev, name)?;
                let n = row_elems as i32;
                let mut builder = stream.launch_builder(&f);
                builder
                    .arg(&mut cache)
                    .arg(&src)
                    .arg(&index)
                    .arg(&src_stride)
                    .arg(&n);
                // SAFETY: as above; rows and strides are 16-byte multiples (checked).
                unsafe { builder.launch(cfg) }.map_err(err)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn op_matches_the_layout_loops_and_checks_arguments() -> Result<()> {
        let dev = Device::Cpu;
        let layout = PagedLayout::new(4, 16, 2, 8, 4)?;
        let src = Tensor::randn(0f32, 1.0, (3, 2, 8), &dev)?;
        let slots = Tensor::new(&[5i64, -1, 63], &dev)?;
        let cache = Tensor::full(-7f32, layout.elems(), &dev)?;
        write_kv(
            &cache,
            &src,
            &slots,
            KvLayout::Paged {
                layout,
                is_value: false,
            },
        )?;
        let mut want = vec![-7f32; layout.elems()];
        layout.write(
            &mut want,
            &src.flatten_all()?.to_vec1::<f32>()?,
            &[5, -1, 63],
            16,
            false,
        )?;
        assert_eq!(cache.to_vec1::<f32>()?, want);

        // A strided view (like K out of a fused QKV) is accepted.
        let wide = Tensor::randn(0f32, 1.0, (3, 4, 8), &dev)?;
        let view = wide.narrow(1, 2, 2)?;
        let s = SlotLayout {
            max_seqs: 2,
            max_len: 4,
            kv_heads: 2,
            head_dim: 8,
        };
        let cache = Tensor::zeros(s.shape().to_vec(), DType::F32, &dev)?;
        write_kv(
            &cache,
            &view,
            &Tensor::new(&[7i64, 0, -1], &dev)?,
            KvLayout::Slot(s),
        )?;
        let got = cache.flatten_to(1)?.get(7)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(got, view.get(0)?.flatten_all()?.to_vec1::<f32>()?);

        let too_big = Tensor::new(&[64i64, 0, 0], &dev)?;
        let cache = Tensor::zeros(layout.elems(), DType::F32, &dev)?;
        assert!(
            write_kv(
                &cache,
                &src,
                &too_big,
                KvLayout::Paged {
                    layout,
                    is_value: true
                }
            )
            .is_err()
        );
        assert!(
            write_kv(
                &cache,
                &src.narrow(0, 0, 2)?,
                &slots,
                KvLayout::Paged {
                    layout,
                    is_value: true
                }
            )
            .is_err()
        );
        Ok(())
    }
}
