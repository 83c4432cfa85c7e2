//! The model's projections: `x [T, K] · w [N, K]^T`, with the epilogues a
//! decoder layer needs fused in (residual add; SiLU-gated product).
//!
//! On a CUDA device in bf16 with at most [`GEMV_DEFAULT_ROWS`] rows (decode
//! steps) they run our `gemv_bf16` kernel, which streams each weight row
//! once at close to the memory bandwidth and fuses the epilogue; otherwise
//! (CPU, prefill, other dtypes) candle's matmul and element-wise ops compute
//! the same thing. Both paths round where transformers' bf16 modules round
//! (the product, then the activation, then the product of the two), so the
//! choice is invisible to the model.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::Result;

/// Most rows (tokens) the GEMV kernel takes at once.
pub const GEMV_MAX_ROWS: usize = 8;

/// Rows up to which the projections use the GEMV kernel by default. Each
/// lane re-reads the M rows of x for every weight vector, so past a few
/// rows the kernel is load-bound: Llama-3-8B decode at batch 8 (H200, 1K
/// context) took 17.8 ms per step with it and 10.7 ms with cuBLAS, batch 4
/// 10.4 ms either way (`results/2026-11-21-h200-paged/gemv-rows-*.log`).
pub const GEMV_DEFAULT_ROWS: usize = 4;

/// Which GEMV kernel runs a projection ([`GemvKernel::for_rows`] picks the
/// model's); `vpod-bench gemv` measures them all on the same shapes (the
/// twin is the same for all).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemvKernel {
    /// `gemv_bf16`: up to 8 rows, 4 loads of 16 bytes in flight a lane.
    #[default]
    Rows8,
    /// `gemv_m4_bf16`: up to 4 rows (68 registers instead of 78).
    Rows4,
    /// `gemv_m1_bf16`: one row (36 registers: twice the warps an SM).
    Row1,
    /// `gemv_pipe_bf16`: up to 4 rows, the next weight vectors loaded while
    /// the current ones are applied.
    Pipelined,
    /// `gemv_split_bf16`: up to 4 rows, each output column split over two
    /// warps (the halves of K, summed through shared memory): twice the
    /// warps for projections with few columns.
    Split2,
}

impl GemvKernel {
    /// Every kernel, for benchmarks and tests.
    pub const ALL: [GemvKernel; 5] = [
        Self::Rows8,
        Self::Rows4,
        Self::Row1,
        Self::Pipelined,
        Self::Split2,
    ];

    /// The kernel's symbol.
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Rows8 => "gemv_bf16",
            Self::Rows4 => "gemv_m4_bf16",
            Self::Row1 => "gemv_m1_bf16",
            Self::Pipelined => "gemv_pipe_bf16",
            Self::Split2 => "gemv_split_bf16",
        }
    }

    /// The kernel the model's projections run for `rows` rows: `Rows4` up
    /// to 4 (on the H200 at 1 and 4 rows it was as fast as `Rows8` or up to
    /// 9 % faster on every Llama-3-8B and Yi-34B projection, e.g. Yi-34B's
    /// `down` 70.0 against 76.5 us at one row; `Pipelined` won two shapes
    /// by <= 6 % and lost others, `Row1` lost everywhere:
    /// `results/2026-12-03-h200-gemv-kernels/`), else `Rows8`.
    pub fn for_rows(rows: usize) -> Self {
        if rows <= 4 { Self::Rows4 } else { Self::Rows8 }
    }

    /// Output columns a CTA of 128 threads (4 warps) computes.
    #[cfg(feature = "cuda")]
    fn columns_per_cta(self) -> u32 {
        if self == Self::Split2 { 2 } else { 4 }
    }

    /// Most rows (tokens) it takes.
    pub fn max_rows(self) -> usize {
        match self {
            Self::Rows8 => GEMV_MAX_ROWS,
            Self::Rows4 | Self::Pipelined | Self::Split2 => 4,
            Self::Row1 => 1,
        }
    }
}

static GEMV_ROWS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(GEMV_DEFAULT_ROWS);

/// Sets the rows up to which the projections use the GEMV kernel rather
/// than candle's matmul (cuBLAS), for the process: [`GEMV_DEFAULT_ROWS`] by
/// default; at most [`GEMV_MAX_ROWS`] (more is an error); 0 turns the GEMV
/// path off. For measuring where the kernel pays off (`vpod-bench e2e
/// --gemv-rows N`).
pub fn set_gemv_rows(rows: usize) -> Result<()> {
    if rows > GEMV_MAX_ROWS {
        return Err(candle_core::Error::Msg(format!(
            "the GEMV kernel takes at most {GEMV_MAX_ROWS} rows, not {rows}"
        ))
        .into());
    }
    GEMV_ROWS.store(rows, std::sync::atomic::Ordering::Relaxed);
    Ok(())
}

/// See [`set_gemv_rows`].
pub fn gemv_rows() -> usize {
    GEMV_ROWS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A projection's shape as the GEMV kernels see it, on one GPU: the key of
/// the measured kernel choice ([`tune_gemv`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemvShape {
    /// CUDA ordinal.
    pub gpu: usize,
    /// Weight rows (`2F` for the gated projection).
    pub n: usize,
    pub k: usize,
    /// 0 plain, 1 residual add, 2 SiLU gate.
    pub epilogue: u8,
    /// Rows (tokens) of x.
    pub rows: usize,
}

/// One candidate measured by [`tune_gemv`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GemvTiming {
    pub shape: GemvShape,
    pub kernel: GemvKernel,
    /// GPU time per launch, microseconds.
    pub us: f64,
    /// Whether it was chosen for the shape.
    pub chosen: bool,
}

/// The kernels [`tune_gemv`] measures (all take up to 4 rows).
pub const GEMV_TUNE_CANDIDATES: [GemvKernel; 3] =
    [GemvKernel::Rows4, GemvKernel::Split2, GemvKernel::Pipelined];

/// How much faster than the default ([`GemvKernel::for_rows`]), or than
/// the candidate picked before it, a kernel must measure to be chosen:
/// near-ties keep the earlier kernel, so runs do not flip between kernels
/// (whose sums round differently) on noise.
pub const GEMV_TUNE_MARGIN: f64 = 0.03;

type GemvChoices = std::sync::Mutex<std::collections::HashMap<GemvShape, GemvKernel>>;
static GEMV_CHOICES: std::sync::OnceLock<GemvChoices> = std::sync::OnceLock::new();
static GEMV_TUNING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Turns [`tune_gemv`] on or off for the process (off: every projection
/// runs [`GemvKernel::for_rows`]; shapes already measured keep their
/// choice).
pub fn set_gemv_tuning(on: bool) {
    GEMV_TUNING.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// Whether [`tune_gemv`] measures (on by default).
pub fn gemv_tuning() -> bool {
    GEMV_TUNING.load(std::sync::atomic::Ordering::Relaxed)
}

/// The kernel for `x · w^T` with `epi`: the measured choice for the shape
/// on this GPU, else [`GemvKernel::for_rows`].
fn kernel_for(x: &Tensor, w: &Tensor, epi: Epilogue) -> Result<GemvKernel> {
    let rows = x.dim(0)?;
    if let candle_core::DeviceLocation::Cuda { gpu_id } = x.device().location() {
        let shape = GemvShape {
            gpu: gpu_id,
            n: w.dim(0)?,
            k: w.dim(1)?,
            epilogue: epi as u8,
            rows,
        };
        let choices = GEMV_CHOICES.get_or_init(Default::default).lock();
        if let Some(&k) = choices.as_ref().ok().and_then(|c| c.get(&shape)) {
            return Ok(k);
        }
    }
    Ok(GemvKernel::for_rows(rows))
}

/// Measures [`GEMV_TUNE_CANDIDATES`] on one projection of a model, at 1 to
/// 4 rows, and records the fastest for its shape (where it beats the
/// default by [`GEMV_TUNE_MARGIN`]): `weights` are that projection of
/// every layer (same shape), streamed one after another as a decode step
/// streams them, so that L2 holds none (one weight of 1 GB, such as an LM
/// head, needs no rotation). Which kernel wins depends on the shape and the
/// GPU: on the H200, splitting each column over two warps saved 14 % on
/// Llama-3-8B's `down` and 7 % on its `o` but lost 4-7 % on Yi-34B's
/// (`results/2026-12-04-h200-pdl/`). Shapes already measured are skipped;
/// returns every measurement made. Nothing to do (an empty list) off CUDA,
/// for other dtypes, or with [`set_gemv_tuning`] off.
pub fn tune_gemv(weights: &[&Tensor], residual: bool, gated: bool) -> Result<Vec<GemvTiming>> {
    let Some(w0) = weights.first() else {
        return Ok(vec![]);
    };
    let candle_core::DeviceLocation::Cuda { gpu_id } = w0.device().location() else {
        return Ok(vec![]);
    };
    if !gemv_tuning() || w0.dtype() != DType::BF16 {
        return Ok(vec![]);
    }
    let (n, k) = w0.dims2()?;
    if weights.iter().any(|w| w.dims() != [n, k]) {
        return Err(candle_core::Error::Msg(format!("tune_gemv: the weights must all be [{n}, {k}]")).into());
    }
    let epi = match (residual, gated) {
        (true, _) => Epilogue::Residual,
        (false, true) => Epilogue::SwiGlu,
        (false, false) => Epilogue::None,
    };
    let cols = if gated { n / 2 } else { n };
    let dev = w0.device();
    let mut out = vec![];
    for rows in 1..=gemv_rows().min(4) {
        let shape = GemvShape {
            gpu: gpu_id,
            n,
            k,
            epilogue: epi as u8,
            rows,
        };
        if GEMV_CHOICES
            .get_or_init(Default::default)
            .lock()
            .map_err(|e| candle_core::Error::Msg(format!("tune_gemv: {e}")))?
            .contains_key(&shape)
        {
            continue;
        }
        // The values do not matter to the time; small ones keep the sums finite.
        let x = (Tensor::ones((rows, k), DType::BF16, dev)? * 0.01)?;
        if !use_gemv(&x, w0) {
            // (The projections take candle's matmul for this shape anyway.)
            continue;
        }
        let r = Tensor::zeros((rows, cols), DType::BF16, dev)?;
        let mut times = vec![];
        for kernel in GEMV_TUNE_CANDIDATES {
            let us = time_gpu_us(dev, weights.len(), || {
                for w in weights {
                    gemv_with(kernel, &x, w, residual.then_some(&r), gated)?;
                }
                Ok(())
            })? / weights.len() as f64;
            times.push((kernel, us));
        }
        let chosen = pick_gemv(&times, GemvKernel::for_rows(rows));
        GEMV_CHOICES
            .get_or_init(Default::default)
            .lock()
            .map_err(|e| candle_core::Error::Msg(format!("tune_gemv: {e}")))?
            .insert(shape, chosen);
        out.extend(times.into_iter().map(|(kernel, us)| GemvTiming {
            shape,
            kernel,
            us,
            chosen: kernel == chosen,
        }));
    }
    Ok(out)
}

/// The kernel [`tune_gemv`] keeps among measured `(kernel, us)`: from
/// `default`, a kernel takes over only where it is faster by
/// [`GEMV_TUNE_MARGIN`] than the pick so far (candidates in their order), so
/// near ties keep the earlier kernel instead of following timing noise.
fn pick_gemv(times: &[(GemvKernel, f64)], default: GemvKernel) -> GemvKernel {
    let mut pick = times
        .iter()
        .copied()
        .find(|t| t.0 == default)
        .unwrap_or((default, f64::INFINITY));
    for &t in times {
        if t.1 < pick.1 * (1.0 - GEMV_TUNE_MARGIN) {
            pick = t;
        }
    }
    pick.0
}

/// GPU time of `f`'s `launches` kernels in microseconds: queued behind a
/// GPU spin so that host launch costs are hidden, once to warm up, then the
/// median of three runs between CUDA events.
#[cfg(feature = "cuda")]
fn time_gpu_us(dev: &candle_core::Device, launches: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
    let candle_core::Device::Cuda(cd) = dev else {
        return Ok(0.0);
    };
    let stream = cd.cuda_stream();
    let err = |e: candle_core::cuda_backend::cudarc::driver::DriverError| {
        crate::AttnError::Candle(crate::ops::cuda::err(e))
    };
    f()?;
    let mut v = vec![];
    for _ in 0..3 {
        // ~55 us a launch at H100/H200 clocks (1 ms at least): longer than
        // the host takes to queue them.
        crate::ops::gpu_spin(dev, (launches as u64 * 100_000).max(2_000_000))?;
        let a = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err)?;
        f()?;
        let b = stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(err)?;
        b.synchronize().map_err(err)?;
        v.push(f64::from(a.elapsed_ms(&b).map_err(err)?) * 1e3);
    }
    v.sort_by(f64::total_cmp);
    Ok(v[1])
}

#[cfg(not(feature = "cuda"))]
fn time_gpu_us(_: &candle_core::Device, _: usize, _: impl FnMut() -> Result<()>) -> Result<f64> {
    Ok(0.0)
}

/// `x · w^T`: `x [T, K]`, `w [N, K]` -> `[T, N]`.
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if use_gemv(x, w) {
        let g = kernel_for(x, w, Epilogue::None)?;
        return Ok(x.contiguous()?.apply_op2_no_bwd(w, &Gemv(Epilogue::None, g))?);
    }
    Ok(x.matmul(&w.t()?)?)
}

/// `residual + x · w^T`: `residual [T, N]`.
pub fn linear_add(x: &Tensor, w: &Tensor, residual: &Tensor) -> Result<Tensor> {
    if use_gemv(x, w) && residual.dtype() == DType::BF16 {
        let r = residual.contiguous()?;
        return Ok(x.contiguous()?.apply_op3_no_bwd(
            w,
            &r,
            &Gemv(Epilogue::Residual, kernel_for(x, w, Epilogue::Residual)?),
        )?);
    }
    Ok((residual + x.matmul(&w.t()?)?)?)
}

/// `silu(x · gate^T) * (x · up^T)` with `w = [gate; up]` (`[2F, K]`) -> `[T, F]`.
pub fn linear_swiglu(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if use_gemv(x, w) {
        let g = kernel_for(x, w, Epilogue::SwiGlu)?;
        return Ok(x.contiguous()?.apply_op2_no_bwd(w, &Gemv(Epilogue::SwiGlu, g))?);
    }
    let f = w.dim(0)? / 2;
    let gu = x.matmul(&w.t()?)?;
    if gu.dtype() == DType::BF16 && f.is_multiple_of(8) {
        return silu_gate(&gu);
    }
    Ok((gu.narrow(1, 0, f)?.silu()? * gu.narrow(1, f, f)?)?)
}

/// `rms_norm(x, gamma, eps) · w^T`: the RMSNorm that precedes a projection
/// (candle's `rms_norm`: f32 arithmetic, one bf16 rounding of the product
/// `x * scale * gamma`). On the GEMV path the norm runs in the projection
/// kernel's prologue (`gemv_norm_bf16`): one launch instead of two, which is
/// what a decode step at batch 1 is short of.
pub fn norm_linear(x: &Tensor, gamma: &Tensor, eps: f32, w: &Tensor) -> Result<Tensor> {
    norm_then(x, gamma, eps, w, Epilogue::None)
}

/// `silu(h · gate^T) * (h · up^T)` over `h = rms_norm(x, gamma, eps)`, as
/// [`norm_linear`] and [`linear_swiglu`] together.
pub fn norm_linear_swiglu(x: &Tensor, gamma: &Tensor, eps: f32, w: &Tensor) -> Result<Tensor> {
    norm_then(x, gamma, eps, w, Epilogue::SwiGlu)
}

/// Bytes of shared memory a CTA of the fused norm holds (h: M rows of K);
/// past this the norm runs as its own kernel.
const NORM_SMEM_MAX: usize = 96 * 1024;

/// Most rows the fused norm kernel takes (its registers are sized for 4).
pub const NORM_MAX_ROWS: usize = 4;

fn norm_then(x: &Tensor, gamma: &Tensor, eps: f32, w: &Tensor, epi: Epilogue) -> Result<Tensor> {
    let fusable = use_gemv(x, w)
        && gamma.dtype() == DType::BF16
        && gamma.dims() == [x.dim(1)?]
        && x.dim(0)? <= NORM_MAX_ROWS
        && x.elem_count() * 2 <= NORM_SMEM_MAX;
    if fusable {
        let balanced = balanced_norm_grid(x, w, epi);
        match norm_fusion() {
            NormFusion::Auto if balanced => return gemv_norm_op(x, gamma, eps, w, epi, true),
            NormFusion::Always => return gemv_norm_op(x, gamma, eps, w, epi, balanced),
            _ => {}
        }
    }
    let h = rms_norm(x, gamma, eps)?;
    match epi {
        Epilogue::SwiGlu => linear_swiglu(&h, w),
        _ => linear(&h, w),
    }
}

/// candle's `rms_norm` over the last dimension (f32 sums, one bf16 rounding
/// of `x * scale * gamma`): on CUDA in bf16 (rows of `K % 8 == 0`) our
/// `rms_norm_bf16`, one CTA a row, which takes part in programmatic
/// dependent launch (candle's kernel neither waits nor lets the GEMV after
/// it start early, so the GEMV could not stream its first weights while the
/// norm ran); candle's op elsewhere (other dtypes, ranks, a strided or
/// unaligned operand). `gamma` must be a weight: the kernel reads it before
/// it waits for the previous kernel (`pdl.cuh`), so it must be contiguous
/// already (no copy in the step) and written by no kernel of the step.
pub fn rms_norm(x: &Tensor, gamma: &Tensor, eps: f32) -> Result<Tensor> {
    let k = x.dim(candle_core::D::Minus1)?;
    let aligned = |t: &Tensor| t.is_contiguous() && t.layout().start_offset().is_multiple_of(8);
    if x.device().is_cuda()
        && x.dtype() == DType::BF16
        && gamma.dtype() == DType::BF16
        && x.rank() == 2
        && gamma.dims() == [k]
        && k.is_multiple_of(8)
        && x.dim(0)? > 0
        && aligned(x)
        && aligned(gamma)
    {
        return Ok(x.apply_op2_no_bwd(gamma, &RmsNorm(eps))?);
    }
    Ok(candle_nn::ops::rms_norm(x, gamma, eps)?)
}

/// (x [T, K], gamma [K]) -> the norm of each row of x.
struct RmsNorm(f32);

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-bf16"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, k) = lx.shape().dims2()?;
        if lg.shape().dims() != [k] {
            candle_core::bail!("rms-norm: gamma {:?} is not [{k}]", lg.shape());
        }
        let h = cpu_rms_norm(bf16_slice(sx, lx)?, bf16_slice(sg, lg)?, k, self.0);
        Ok((CpuStorage::BF16(h), lx.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::rms_norm(self.0, sx, lx, sg, lg)
    }
}

/// Largest share of a column-time that the fused kernel's warps may sit
/// idle at its end, and most columns a warp may take (see
/// [`balanced_norm_grid`]).
#[cfg(feature = "cuda")]
const NORM_MAX_IDLE: f64 = 0.25;
#[cfg(feature = "cuda")]
const NORM_MAX_COLUMNS: f64 = 3.0;

/// Where [`norm_linear`] and [`norm_linear_swiglu`] fuse the norm into
/// the GEMV (where the GEMV path applies at all; tests and benchmarks
/// compare the paths end to end).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormFusion {
    /// Where the last round of the persistent CTAs' columns is nearly full
    /// (a quarter of a column-time idle at most, at most 3 columns a warp):
    /// Llama-3-8B's QKV. It paid against candle's norm kernel; against
    /// [`rms_norm`] (PDL) it loses 0.6 % of a batch-1 step.
    Auto,
    /// Everywhere: persistent CTAs where balanced, else one output column
    /// a warp (every CTA computing the norm in its prologue).
    Always,
    /// Nowhere: the norm as its own kernel ([`rms_norm`], which takes part
    /// in programmatic dependent launch), then the GEMV. The default: on
    /// the H200 with CUDA graphs and PDL, batch 1 at 16K, Llama-3-8B 4.675
    /// ms a step against Auto's 4.709, Yi-34B 17.31 against 17.41
    /// (`results/2026-12-04-h200-norm-epilogue/`).
    #[default]
    Never,
}

impl std::str::FromStr for NormFusion {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "always" => Ok(Self::Always),
            "never" => Ok(Self::Never),
            _ => Err(format!("norm fusion must be auto, always or never, not {s:?}")),
        }
    }
}

static NORM_FUSION: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(NormFusion::Never as u8);

/// Sets [`NormFusion`] for the process (every model, every device).
pub fn set_norm_fusion(mode: NormFusion) {
    NORM_FUSION.store(mode as u8, std::sync::atomic::Ordering::Relaxed);
}

/// The process's [`NormFusion`].
pub fn norm_fusion() -> NormFusion {
    match NORM_FUSION.load(std::sync::atomic::Ordering::Relaxed) {
        0 => NormFusion::Auto,
        1 => NormFusion::Always,
        _ => NormFusion::Never,
    }
}

/// Whether the fused kernel's persistent warps (W of them on this GPU)
/// share the N output columns evenly. Each warp takes ceil(N / W) or
/// floor(N / W) columns, so the kernel lasts ceil(N / W) column-times while
/// the plain kernel's CTAs balance themselves. Measured on the H200
/// (Llama-3-8B, batch 1, `results/2026-12-03-h200-gemv-norm/`): QKV
/// (N / W = 1.94) 17.0 us fused against 16.0 + 3.9 us for the GEMV and the
/// norm; gate/up (4.53) 62.0 against 56.5 + 4.0; the LM head (40.5) 247.6
/// against 236.7 + 4.0 (its last round is half full too, but that is 1 % of
/// its time: the persistent warps also stream more slowly over many
/// columns). So the norm is fused only where the last round of columns is
/// nearly full and a warp takes at most 3. A failed occupancy query only
/// means no fusion.
fn balanced_norm_grid(x: &Tensor, w: &Tensor, epi: Epilogue) -> bool {
    #[cfg(feature = "cuda")]
    if let candle_core::Device::Cuda(dev) = x.device() {
        let out = w.dim(0).unwrap_or(0) / if epi == Epilogue::SwiGlu { 2 } else { 1 };
        let Ok(warps) = cuda::resident_norm_warps(dev, x.elem_count() * 2) else {
            return false;
        };
        let r = out as f64 / warps as f64;
        return r.ceil() - r <= NORM_MAX_IDLE && r <= NORM_MAX_COLUMNS;
    }
    let _ = (x, w, epi);
    false
}

/// Runs the fused norm + projection op on any device (on the CPU, the
/// kernel's twin).
/// `persistent`: see [`NormFusion::Always`].
pub fn gemv_norm(
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    w: &Tensor,
    swiglu: bool,
    persistent: bool,
) -> Result<Tensor> {
    let epi = if swiglu { Epilogue::SwiGlu } else { Epilogue::None };
    gemv_norm_op(x, gamma, eps, w, epi, persistent)
}

fn gemv_norm_op(
    x: &Tensor,
    gamma: &Tensor,
    eps: f32,
    w: &Tensor,
    epi: Epilogue,
    persistent: bool,
) -> Result<Tensor> {
    Ok(x.contiguous()?
        .apply_op3_no_bwd(&gamma.contiguous()?, w, &GemvNorm { epi, eps, persistent })?)
}

/// `silu(gu[:, ..F]) * gu[:, F..]` for `gu [T, 2F]` bf16 (`F % 8 == 0`), in
/// one pass with transformers' roundings: our `swiglu_bf16` kernel on a
/// GPU, its twin on the CPU. candle's `silu` and `mul` over the two strided
/// halves of a 1024 x 28672 product took as long as the matmul itself
/// (Llama-3-8B's gate/up at 341 TFLOP/s with them, the QKV product at 712:
/// `results/2026-11-21-h100-pod3`, `vpod-bench layer`).
pub fn silu_gate(gu: &Tensor) -> Result<Tensor> {
    Ok(gu.contiguous()?.apply_op1_no_bwd(&SiluGate)?)
}

struct SiluGate;

/// (rows, F) of a gate/up product.
fn gate_dims(l: &Layout) -> candle_core::Result<(usize, usize)> {
    let (t, n) = l.shape().dims2()?;
    if !n.is_multiple_of(16) || !l.is_contiguous() || !l.start_offset().is_multiple_of(8) {
        candle_core::bail!(
            "silu_gate: [{t}, {n}] needs a contiguous, 16-byte aligned bf16 [T, 2F] with F % 8 == 0"
        );
    }
    Ok((t, n / 2))
}

impl candle_core::CustomOp1 for SiluGate {
    fn name(&self) -> &'static str {
        "silu-gate-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, f) = gate_dims(l)?;
        let gu = bf16_slice(s, l)?;
        let y = gu
            .chunks_exact(2 * f)
            .flat_map(|row| {
                row[..f].iter().zip(&row[f..]).map(|(g, u)| {
                    let g = g.to_f32();
                    bf16::from_f32(round(g / (1.0 + (-g).exp())) * u.to_f32())
                })
            })
            .collect();
        Ok((CpuStorage::BF16(y), Shape::from((t, f))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::silu_gate(s, l)
    }
}

fn use_gemv(x: &Tensor, w: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && x.device().is_cuda()
        && x.dtype() == DType::BF16
        && w.dtype() == DType::BF16
        && w.is_contiguous()
        && matches!(x.dims(), [t, k] if *t <= gemv_rows() && k.is_multiple_of(8) && w.dim(1).ok() == Some(*k))
}

/// Runs the GEMV op itself on any device: on the CPU this is the kernel's
/// twin (tests compare the two). `residual` selects the residual epilogue,
/// `swiglu` the gated one.
pub fn gemv(x: &Tensor, w: &Tensor, residual: Option<&Tensor>, swiglu: bool) -> Result<Tensor> {
    gemv_with(GemvKernel::Rows8, x, w, residual, swiglu)
}

/// [`gemv`] on a chosen kernel (more rows than it takes are refused).
pub fn gemv_with(
    kernel: GemvKernel,
    x: &Tensor,
    w: &Tensor,
    residual: Option<&Tensor>,
    swiglu: bool,
) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(match (residual, swiglu) {
        (Some(r), _) => x.apply_op3_no_bwd(w, &r.contiguous()?, &Gemv(Epilogue::Residual, kernel))?,
        (None, true) => x.apply_op2_no_bwd(w, &Gemv(Epilogue::SwiGlu, kernel))?,
        (None, false) => x.apply_op2_no_bwd(w, &Gemv(Epilogue::None, kernel))?,
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Epilogue {
    None = 0,
    Residual = 1,
    SwiGlu = 2,
}

struct Gemv(Epilogue, GemvKernel);

/// (rows M, weight rows N, K, output columns)
fn dims(l_x: &Layout, l_w: &Layout, epi: Epilogue) -> candle_core::Result<(usize, usize, usize, usize)> {
    dims_rows(l_x, l_w, epi, GEMV_MAX_ROWS)
}

/// [`dims`] for a kernel that takes at most `max_rows` rows.
fn dims_rows(
    l_x: &Layout,
    l_w: &Layout,
    epi: Epilogue,
    max_rows: usize,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    let (m, k) = l_x.shape().dims2()?;
    let (n, k2) = l_w.shape().dims2()?;
    if k != k2 || !k.is_multiple_of(8) || m > max_rows || m == 0 {
        candle_core::bail!(
            "gemv: x [{m}, {k}] and w [{n}, {k2}] do not fit (K % 8 == 0, 1 <= M <= {max_rows})"
        );
    }
    if !l_x.is_contiguous() || !l_w.is_contiguous() {
        candle_core::bail!("gemv: x and w must be contiguous");
    }
    if epi == Epilogue::SwiGlu && !n.is_multiple_of(2) {
        candle_core::bail!("gemv: the gated epilogue needs an even number of weight rows");
    }
    let out = if epi == Epilogue::SwiGlu { n / 2 } else { n };
    Ok((m, n, k, out))
}

fn round(v: f32) -> f32 {
    bf16::from_f32(v).to_f32()
}

/// The kernel's arithmetic on the host (f32 accumulation, bf16 roundings).
fn cpu_gemv(
    x: &[bf16],
    w: &[bf16],
    residual: Option<&[bf16]>,
    m: usize,
    k: usize,
    out: usize,
    epi: Epilogue,
) -> Vec<bf16> {
    let dot = |row: usize, mi: usize| -> f32 {
        let (wr, xr) = (&w[row * k..(row + 1) * k], &x[mi * k..(mi + 1) * k]);
        wr.iter().zip(xr).map(|(a, b)| a.to_f32() * b.to_f32()).sum()
    };
    let mut y = Vec::with_capacity(m * out);
    for mi in 0..m {
        for n in 0..out {
            let v = match epi {
                Epilogue::None => dot(n, mi),
                Epilogue::Residual => round(dot(n, mi)) + residual.map_or(0.0, |r| r[mi * out + n].to_f32()),
                Epilogue::SwiGlu => {
                    let (g, u) = (round(dot(n, mi)), round(dot(n + out, mi)));
                    round(g / (1.0 + (-g).exp())) * u
                }
            };
            y.push(bf16::from_f32(v));
        }
    }
    y
}

fn bf16_slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [bf16]> {
    match s {
        CpuStorage::BF16(v) => Ok(&v[l.start_offset()..l.start_offset() + l.shape().elem_count()]),
        _ => candle_core::bail!("gemv: bf16 only"),
    }
}

impl CustomOp2 for Gemv {
    fn name(&self) -> &'static str {
        "gemv-bf16"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _, k, out) = dims_rows(lx, lw, self.0, self.1.max_rows())?;
        let y = cpu_gemv(bf16_slice(sx, lx)?, bf16_slice(sw, lw)?, None, m, k, out, self.0);
        Ok((CpuStorage::BF16(y), Shape::from((m, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemv(self.0 as i32, self.1, sx, lx, sw, lw, None)
    }
}

impl CustomOp3 for Gemv {
    fn name(&self) -> &'static str {
        "gemv-bf16-residual"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sr: &CpuStorage,
        lr: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _, k, out) = dims_rows(lx, lw, self.0, self.1.max_rows())?;
        if lr.shape().dims() != [m, out] {
            candle_core::bail!("gemv: residual {:?} is not [{m}, {out}]", lr.shape());
        }
        let y = cpu_gemv(
            bf16_slice(sx, lx)?,
            bf16_slice(sw, lw)?,
            Some(bf16_slice(sr, lr)?),
            m,
            k,
            out,
            self.0,
        );
        Ok((CpuStorage::BF16(y), Shape::from((m, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
        sr: &candle_core::CudaStorage,
        lr: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemv(self.0 as i32, self.1, sx, lx, sw, lw, Some((sr, lr)))
    }
}

/// RMSNorm + GEMV: (x, gamma, w).
struct GemvNorm {
    epi: Epilogue,
    eps: f32,
    /// As many CTAs as fit on the GPU at once, each warp walking the
    /// columns (the norm computed once per CTA), or one column a warp (every
    /// CTA computes the norm; no last round of columns left half full).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    persistent: bool,
}

/// The fused kernel's norm on the host (as candle's CUDA `rmsnorm`:
/// `x * rsqrt(mean(x^2) + eps) * gamma` in f32, rounded once; candle's CPU
/// `rms_norm` rounds more often, which the tests' tolerance covers).
fn cpu_rms_norm(x: &[bf16], gamma: &[bf16], k: usize, eps: f32) -> Vec<bf16> {
    x.chunks_exact(k)
        .flat_map(|row| {
            let ss: f32 = row.iter().map(|v| v.to_f32() * v.to_f32()).sum();
            let scale = 1.0 / (ss / k as f32 + eps).sqrt();
            row.iter()
                .zip(gamma)
                .map(move |(v, g)| bf16::from_f32(scale * v.to_f32() * g.to_f32()))
        })
        .collect()
}

fn norm_dims(
    epi: Epilogue,
    lx: &Layout,
    lg: &Layout,
    lw: &Layout,
) -> candle_core::Result<(usize, usize, usize, usize)> {
    if epi == Epilogue::Residual {
        candle_core::bail!("gemv-norm: no residual epilogue");
    }
    let d = dims(lx, lw, epi)?;
    if d.0 > NORM_MAX_ROWS {
        candle_core::bail!("gemv-norm: {} rows (at most {NORM_MAX_ROWS})", d.0);
    }
    if lg.shape().dims() != [d.2] || !lg.is_contiguous() {
        candle_core::bail!("gemv-norm: gamma {:?} is not a contiguous [{}]", lg.shape(), d.2);
    }
    Ok(d)
}

impl CustomOp3 for GemvNorm {
    fn name(&self) -> &'static str {
        "gemv-norm-bf16"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, _, k, out) = norm_dims(self.epi, lx, lg, lw)?;
        let h = cpu_rms_norm(bf16_slice(sx, lx)?, bf16_slice(sg, lg)?, k, self.eps);
        let y = cpu_gemv(&h, bf16_slice(sw, lw)?, None, m, k, out, self.epi);
        Ok((CpuStorage::BF16(y), Shape::from((m, out))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        sx: &candle_core::CudaStorage,
        lx: &Layout,
        sg: &candle_core::CudaStorage,
        lg: &Layout,
        sw: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemv_norm(self.epi, self.eps, self.persistent, sx, lx, sg, lg, sw, lw)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::LaunchConfig;
    use candle_core::{CudaStorage, Layout, Shape};

    use crate::ops::cuda::{Launch, PdlChain};
    use half::bf16;

    use super::{Epilogue, NORM_SMEM_MAX, gate_dims, norm_dims};

    pub fn silu_gate(s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        let (t, f) = gate_dims(l)?;
        let dev = s.device.clone();
        let gu = s.as_cuda_slice::<bf16>()?.slice(l.start_offset()..);
        let pdl = PdlChain::begin(&dev, t * f * 2)?;
        // SAFETY: every element of y is written by the kernel before it is read.
        let mut y = unsafe { dev.alloc::<bf16>(t * f) }?;
        let func = crate::ops::cuda::function(&dev, "swiglu_bf16")?;
        const THREADS: u32 = 256;
        let threads = (t * f / 8) as u32;
        let cfg = LaunchConfig {
            grid_dim: (threads.div_ceil(THREADS).max(1), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ti, fi) = (t as i32, f as i32);
        let stream = dev.cuda_stream();
        let mut b = Launch::new(&stream);
        b.after(pdl).buf(&gu).buf_mut(&mut y).val(&ti).val(&fi);
        // SAFETY: gate_dims checked a contiguous [t, 2f] with f % 8 == 0 starting
        // 16-byte aligned; y holds t * f elements; the kernel waits (pdl.cuh).
        unsafe { b.run(&dev, &func, cfg) }?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((t, f))))
    }

    pub fn gemv(
        epi: i32,
        kernel: super::GemvKernel,
        sx: &CudaStorage,
        lx: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
        residual: Option<(&CudaStorage, &Layout)>,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let e = match epi {
            1 => Epilogue::Residual,
            2 => Epilogue::SwiGlu,
            _ => Epilogue::None,
        };
        let (m, _, k, out) = super::dims_rows(lx, lw, e, kernel.max_rows())?;
        aligned("gemv", &[lx, lw])?;
        let dev = sx.device.clone();
        let x = sx.as_cuda_slice::<bf16>()?.slice(lx.start_offset()..);
        let w = sw.as_cuda_slice::<bf16>()?.slice(lw.start_offset()..);
        let r = match residual {
            Some((sr, lr)) => {
                if lr.shape().dims() != [m, out] || !lr.is_contiguous() {
                    candle_core::bail!("gemv: residual {:?} is not a contiguous [{m}, {out}]", lr.shape());
                }
                sr.as_cuda_slice::<bf16>()?.slice(lr.start_offset()..)
            }
            // Not read without the residual epilogue; any valid pointer will do.
            None => sx.as_cuda_slice::<bf16>()?.slice(lx.start_offset()..),
        };
        let pdl = PdlChain::begin(&dev, m * out * 2)?;
        // SAFETY: every element of y is written by the kernel before it is read.
        let mut y = unsafe { dev.alloc::<bf16>(m * out) }?;
        let f = crate::ops::cuda::function(&dev, kernel.symbol())?;
        let (mi, ni, ki) = (m as i32, out as i32, k as i32);
        // 4 warps: one output column each, or two a column (Split2: its
        // shared memory is sized for exactly 4 warps).
        const THREADS: u32 = 128;
        let cfg = LaunchConfig {
            grid_dim: ((out as u32).div_ceil(kernel.columns_per_cta()), 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let stream = dev.cuda_stream();
        let mut b = Launch::new(&stream);
        b.after(pdl)
            .buf(&w)
            .buf(&x)
            .buf(&r)
            .buf_mut(&mut y)
            .val(&mi)
            .val(&ni)
            .val(&ki)
            .val(&epi);
        // SAFETY: dims_rows() checked M against the kernel's rows, K % 8 == 0 (16-byte rows), contiguity
        // and the weight's row count; y holds m * out elements; the kernel
        // reads only weights before it waits (pdl.cuh).
        unsafe { b.run(&dev, &f, cfg) }?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, out))))
    }
    /// One CTA of 256 threads a row of x [T, K] (K % 8 == 0, 16-byte aligned).
    pub fn rms_norm(
        eps: f32,
        sx: &CudaStorage,
        lx: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (t, k) = lx.shape().dims2()?;
        if lg.shape().dims() != [k]
            || !k.is_multiple_of(8)
            || !lx.is_contiguous()
            || !lg.is_contiguous()
            || t == 0
        {
            candle_core::bail!(
                "rms-norm: x {:?} and gamma {:?} must be a contiguous [T >= 1, K] and [K] with K % 8 == 0",
                lx.shape(),
                lg.shape()
            );
        }
        aligned("rms-norm", &[lx, lg])?;
        let dev = sx.device.clone();
        let x = sx.as_cuda_slice::<bf16>()?.slice(lx.start_offset()..);
        let g = sg.as_cuda_slice::<bf16>()?.slice(lg.start_offset()..);
        let pdl = PdlChain::begin(&dev, t * k * 2)?;
        // SAFETY: every element of y is written by the kernel before it is read.
        let mut y = unsafe { dev.alloc::<bf16>(t * k) }?;
        let f = crate::ops::cuda::function(&dev, "rms_norm_bf16")?;
        let cfg = LaunchConfig {
            grid_dim: (t as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let ki = k as i32;
        let stream = dev.cuda_stream();
        let mut b = Launch::new(&stream);
        b.after(pdl).buf(&x).buf(&g).buf_mut(&mut y).val(&ki).val(&eps);
        // SAFETY: checked above: x is a contiguous [t, k] and gamma a [k], both
        // 16-byte aligned with k % 8 == 0; y holds t * k elements; one CTA a
        // row; the kernel reads only gamma before it waits (pdl.cuh).
        unsafe { b.run(&dev, &f, cfg) }?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((t, k))))
    }

    /// x, w (and gamma) are read 16 bytes at a time: their first elements
    /// must sit on a multiple of 8 bf16 (candle's own tensors always do; a
    /// narrowed view may not).
    fn aligned(what: &str, layouts: &[&Layout]) -> candle_core::Result<()> {
        if let Some(l) = layouts.iter().find(|l| !l.start_offset().is_multiple_of(8)) {
            candle_core::bail!(
                "{what}: an operand starts at element {}, not 16-byte aligned",
                l.start_offset()
            );
        }
        Ok(())
    }

    /// (Called once per device and size: [`resident_norm_warps`] caches.)
    fn sm_count(dev: &candle_core::cuda_backend::CudaDevice) -> candle_core::Result<u32> {
        use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute;
        let n = dev
            .cuda_stream()
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .map_err(crate::ops::cuda::err)?;
        Ok(n.max(1) as u32)
    }

    /// Threads of a fused norm CTA (its launch bounds: 256 threads, 3 CTAs an SM).
    const NORM_THREADS: u32 = 256;

    /// Warps of the fused norm kernel resident on the whole GPU at once, with
    /// `smem` bytes of shared memory a CTA.
    /// (Asked of the driver once per device and size: decode steps run it
    /// for every norm.)
    pub fn resident_norm_warps(
        dev: &candle_core::cuda_backend::CudaDevice,
        smem: usize,
    ) -> candle_core::Result<u32> {
        type Cache =
            std::sync::Mutex<std::collections::HashMap<(candle_core::cuda_backend::DeviceId, usize), u32>>;
        static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(&w) = cache
            .lock()
            .map_err(crate::ops::cuda::err)?
            .get(&(dev.id(), smem))
        {
            return Ok(w);
        }
        let f = crate::ops::cuda::function_with_smem(dev, "gemv_norm_bf16", smem)?;
        let per_sm = f
            .occupancy_max_active_blocks_per_multiprocessor(NORM_THREADS, smem, None)
            .map_err(crate::ops::cuda::err)?
            .max(1);
        let warps = per_sm * sm_count(dev)? * (NORM_THREADS / 32);
        cache
            .lock()
            .map_err(crate::ops::cuda::err)?
            .insert((dev.id(), smem), warps);
        Ok(warps)
    }

    /// RMSNorm in the GEMV's prologue: x [M, K] is the residual stream,
    /// gamma [K] the norm's weight; epi 0 or 2.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_norm(
        epi: Epilogue,
        eps: f32,
        persistent: bool,
        sx: &CudaStorage,
        lx: &Layout,
        sg: &CudaStorage,
        lg: &Layout,
        sw: &CudaStorage,
        lw: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (m, _, k, out) = norm_dims(epi, lx, lg, lw)?;
        aligned("gemv-norm", &[lx, lg, lw])?;
        let smem = m * k * 2;
        if smem > NORM_SMEM_MAX {
            candle_core::bail!(
                "gemv-norm: {m} rows of {k} need {smem} bytes of shared memory (at most {NORM_SMEM_MAX})"
            );
        }
        let dev = sx.device.clone();
        let x = sx.as_cuda_slice::<bf16>()?.slice(lx.start_offset()..);
        let g = sg.as_cuda_slice::<bf16>()?.slice(lg.start_offset()..);
        let w = sw.as_cuda_slice::<bf16>()?.slice(lw.start_offset()..);
        let pdl = PdlChain::begin(&dev, m * out * 2)?;
        // SAFETY: every element of y is written by the kernel before it is read.
        let mut y = unsafe { dev.alloc::<bf16>(m * out) }?;
        let f = crate::ops::cuda::function_with_smem(&dev, "gemv_norm_bf16", smem)?;
        let (mi, ni, ki, ei) = (m as i32, out as i32, k as i32, epi as i32);
        // Persistent: as many CTAs as fit at once (by registers and shared
        // memory), each warp one output column at a time; else one column a warp.
        let mut ctas = (out as u32).div_ceil(NORM_THREADS / 32);
        if persistent {
            ctas = ctas.min(resident_norm_warps(&dev, smem)? / (NORM_THREADS / 32));
        }
        let cfg = LaunchConfig {
            grid_dim: (ctas, 1, 1),
            block_dim: (NORM_THREADS, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let stream = dev.cuda_stream();
        let mut b = Launch::new(&stream);
        b.after(pdl)
            .buf(&w)
            .buf(&x)
            .buf(&g)
            .buf_mut(&mut y)
            .val(&mi)
            .val(&ni)
            .val(&ki)
            .val(&ei)
            .val(&eps);
        // SAFETY: norm_dims() checked M <= 4, K % 8 == 0 (16-byte rows),
        // contiguity, gamma's length and the weight's rows; the launch asks for
        // the M * K * 2 bytes of shared memory h takes; y holds m * out elements;
        // the kernel reads only weights before it waits (pdl.cuh).
        unsafe { b.run(&dev, &f, cfg) }?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), Shape::from((m, out))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// More rows than the kernel takes are refused, the setting unchanged.
    #[test]
    fn gemv_rows_are_bounded() {
        assert!(set_gemv_rows(GEMV_MAX_ROWS + 1).is_err());
        assert_eq!(gemv_rows(), GEMV_DEFAULT_ROWS);
    }

    /// The tuner keeps the default on near ties and takes a kernel only by
    /// the margin over the pick so far; off CUDA it measures nothing.
    #[test]
    fn gemv_pick_follows_the_margin() -> Result<()> {
        use GemvKernel::{Pipelined, Rows4, Split2};
        assert_eq!(
            pick_gemv(&[(Rows4, 10.0), (Split2, 9.8), (Pipelined, 9.9)], Rows4),
            Rows4
        );
        assert_eq!(
            pick_gemv(&[(Rows4, 10.0), (Split2, 9.0), (Pipelined, 9.9)], Rows4),
            Split2
        );
        // Pipelined is the fastest but within the margin of Split2: Split2 stays.
        assert_eq!(
            pick_gemv(&[(Rows4, 10.0), (Split2, 9.0), (Pipelined, 8.9)], Rows4),
            Split2
        );
        assert_eq!(
            pick_gemv(&[(Rows4, 10.0), (Split2, 9.0), (Pipelined, 8.0)], Rows4),
            Pipelined
        );
        // A default that was not measured loses to any measured kernel.
        assert_eq!(pick_gemv(&[(Split2, 9.0)], Rows4), Split2);
        let w = Tensor::zeros((16, 64), DType::BF16, &Device::Cpu)?;
        assert!(tune_gemv(&[&w, &w], false, false)?.is_empty());
        assert!(tune_gemv(&[], true, false)?.is_empty());
        Ok(())
    }

    /// The CPU twin agrees with candle's ops (bf16 roundings apart).
    #[test]
    fn twin_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (3, 64), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(0f32, 0.1, (10, 64), &dev)?.to_dtype(DType::BF16)?;
        let r = Tensor::randn(0f32, 1.0, (3, 10), &dev)?.to_dtype(DType::BF16)?;
        let close = |a: &Tensor, b: &Tensor| -> Result<f32> {
            let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?
                .abs()?
                .max_all()?;
            Ok(d.to_scalar::<f32>()?)
        };
        assert!(close(&gemv(&x, &w, None, false)?, &linear(&x, &w)?)? < 2e-2);
        assert!(close(&gemv(&x, &w, Some(&r), false)?, &linear_add(&x, &w, &r)?)? < 3e-2);
        assert!(close(&gemv(&x, &w, None, true)?, &linear_swiglu(&x, &w)?)? < 2e-2);
        assert!(gemv(&x.narrow(1, 0, 60)?, &w.narrow(1, 0, 60)?, None, false).is_err());
        Ok(())
    }

    /// The fused norm's twin equals candle's rms_norm then the GEMV twin, on
    /// both epilogues; bad gamma shapes are refused.
    #[test]
    fn norm_twin_matches_rms_norm_then_gemv() -> Result<()> {
        let dev = Device::Cpu;
        // Fixed pseudo-random values (a seeded test: no flakes from rare roundings).
        let wave = |n: usize, a: f32, b: f32, c: f32| -> Result<Tensor> {
            let v: Vec<f32> = (0..n).map(|i| c + a * (i as f32 * b).sin()).collect();
            Ok(Tensor::from_vec(v, n, &dev)?.to_dtype(DType::BF16)?)
        };
        let x = wave(3 * 64, 2.0, 0.71, 0.1)?.reshape((3, 64))?;
        let g = wave(64, 0.2, 1.37, 1.0)?;
        let w = wave(10 * 64, 0.1, 2.93, 0.0)?.reshape((10, 64))?;
        let h = candle_nn::ops::rms_norm(&x, &g, 1e-5)?;
        for swiglu in [false, true] {
            let want = gemv(&h, &w, None, swiglu)?.to_dtype(DType::F32)?;
            let got = gemv_norm(&x, &g, 1e-5, &w, swiglu, true)?.to_dtype(DType::F32)?;
            // candle's norm and the twin may round an element of h one ulp apart
            // (f32 sums in another order): a bf16 ulp or two of the largest output.
            let tol = (want.abs()?.max_all()?.to_scalar::<f32>()? / 64.0).max(3e-2);
            let d = (want - &got)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d <= tol, "swiglu {swiglu}: {d} > {tol}");
            // The model's entry points agree with the op on the CPU (they take candle's path there).
            let via = if swiglu {
                norm_linear_swiglu(&x, &g, 1e-5, &w)?
            } else {
                norm_linear(&x, &g, 1e-5, &w)?
            };
            let d = (via.to_dtype(DType::F32)? - got)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d <= tol, "swiglu {swiglu}: {d} > {tol}");
        }
        assert!(gemv_norm(&x, &g.narrow(0, 0, 32)?, 1e-5, &w, false, true).is_err());
        Ok(())
    }

    /// The one-pass SiLU gate matches candle's silu and mul over the halves
    /// (in f32, rounded as transformers rounds); bad shapes are refused.
    #[test]
    fn silu_gate_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let gu = (Tensor::randn(0f32, 3.0, (5, 48), &dev)?).to_dtype(DType::BF16)?;
        let want = {
            let g = gu.narrow(1, 0, 24)?.to_dtype(DType::F32)?;
            let s = g.silu()?.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            (s * gu.narrow(1, 24, 24)?.to_dtype(DType::F32)?)?.to_dtype(DType::BF16)?
        };
        let got = silu_gate(&gu)?;
        let diff = (got.to_dtype(DType::F32)? - want.to_dtype(DType::F32)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff <= 1e-2, "{diff}");
        assert!(silu_gate(&gu.narrow(1, 0, 40)?).is_err());
        Ok(())
    }
}
