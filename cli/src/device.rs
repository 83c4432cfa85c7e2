//! Choosing and checking the device: `--device` / `--dtype` parsing, what the
//! GPU is, whether it can run the dtype and hold the weights, and the
//! process's peak memory for reports.

use anyhow::{Context, bail};
use candle_core::{DType, Device};

/// Parses `--device`; `None` picks the GPU when this build and machine have one.
pub fn parse_device(arg: Option<&str>) -> anyhow::Result<Device> {
    let want_cuda = |ordinal: usize| -> anyhow::Result<Device> {
        if !cfg!(feature = "cuda") {
            bail!(
                "--device cuda: this binary was built without CUDA support; rebuild with the `cuda` feature \
                 (cargo build --release -p vpod-cli --features cuda)"
            );
        }
        let device = Device::new_cuda(ordinal).with_context(|| {
            format!(
                "cannot open CUDA device {ordinal} (is there a GPU and an NVIDIA driver on this machine?)"
            )
        })?;
        single_stream(&device);
        Ok(device)
    };
    match arg {
        None => Ok(
            if cfg!(feature = "cuda") && candle_core::utils::cuda_is_available() {
                want_cuda(0)?
            } else {
                Device::Cpu
            },
        ),
        Some("cpu") => Ok(Device::Cpu),
        Some("cuda") => want_cuda(0),
        Some(s) => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(i)) => want_cuda(i),
            _ => bail!("unknown device '{s}' (expected cpu, cuda or cuda:N)"),
        },
    }
}

/// The devices of `n` tensor-parallel ranks: `device` (parsed from `arg`)
/// and, on CUDA, the next n - 1 GPUs after it; n CPU "ranks" on the CPU.
pub fn rank_devices(device: &Device, arg: Option<&str>, n: usize) -> anyhow::Result<Vec<Device>> {
    if n == 1 || device.is_cpu() {
        return Ok(vec![device.clone(); n]);
    }
    let first = arg
        .and_then(|s| s.strip_prefix("cuda:"))
        .and_then(|i| i.parse::<usize>().ok())
        .unwrap_or(0);
    let mut devices = vec![device.clone()];
    for r in 1..n {
        let d = parse_device(Some(&format!("cuda:{}", first + r))).with_context(|| {
            format!(
                "--tensor-parallel {n} needs GPUs cuda:{first} .. cuda:{}",
                first + n - 1
            )
        })?;
        devices.push(d);
    }
    Ok(devices)
}

/// Everything the engine launches goes to the device's one stream, so
/// candle's cross-stream event tracking (an event record + wait per tensor
/// use, a few microseconds of CPU time per op) buys nothing; turn it off.
fn single_stream(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device {
        // SAFETY: one stream only: no tensor is used on another stream, so
        // stream-ordered allocation and frees need no events.
        unsafe { d.disable_event_tracking() }
    }
    let _ = device;
}

/// Parses `--dtype`, defaulting to bf16 on GPU and f32 on CPU, and checks
/// that the device can compute in it.
pub fn parse_dtype(arg: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    let dtype = match arg {
        None if device.is_cpu() => DType::F32,
        None => DType::BF16,
        Some("f32" | "float32") => DType::F32,
        Some("bf16" | "bfloat16") => DType::BF16,
        Some("f16" | "float16") => DType::F16,
        Some(s) => bail!("unknown dtype '{s}' (expected f32, bf16 or f16)"),
    };
    if let Some(info) = gpu_info(device)?
        && dtype == DType::BF16
        && info.compute_capability.0 < 8
    {
        bail!(
            "{} has compute capability {}.{}; bf16 needs 8.0 or newer (Ampere, Hopper): use --dtype f16 or f32",
            info.name,
            info.compute_capability.0,
            info.compute_capability.1
        );
    }
    Ok(dtype)
}

/// What a GPU is and how much memory it has free.
#[derive(Debug, Clone)]
pub struct GpuInfo {
    pub name: String,
    pub compute_capability: (i32, i32),
    pub free_bytes: usize,
    pub total_bytes: usize,
}

/// `None` on the CPU. Synchronises the device first: memory freed on its
/// stream (stream-ordered frees) only counts as free after that.
pub fn gpu_info(device: &Device) -> anyhow::Result<Option<GpuInfo>> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            device.synchronize()?;
            let stream = d.cuda_stream();
            let ctx = stream.context();
            let (free_bytes, total_bytes) = ctx.mem_get_info().context("cuMemGetInfo")?;
            Ok(Some(GpuInfo {
                name: ctx.name().context("cuDeviceGetName")?,
                compute_capability: ctx.compute_capability().context("compute capability")?,
                free_bytes,
                total_bytes,
            }))
        }
        _ => Ok(None),
    }
}

/// `cpu`, or `cuda:N (NAME)`.
pub fn device_label(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => match gpu_info(device) {
            Ok(Some(g)) => format!("cuda ({})", g.name),
            _ => "cuda".into(),
        },
        Device::Metal(_) => "metal".into(),
    }
}

/// Refuses to start loading `bytes` of weights onto a GPU that cannot hold them.
pub fn check_fits(device: &Device, bytes: usize, what: &str) -> anyhow::Result<()> {
    if let Some(g) = gpu_info(device)?
        && bytes > g.free_bytes
    {
        let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
        bail!(
            "{what} need {:.1} GiB but {} has {:.1} GiB free of {:.1} GiB: use a smaller model or dtype, or a larger GPU",
            gib(bytes),
            g.name,
            gib(g.free_bytes),
            gib(g.total_bytes)
        );
    }
    Ok(())
}

/// Peak resident memory of this process (VmHWM), in MiB, where Linux reports it.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
