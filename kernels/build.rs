//! Compiles the CUDA kernels with nvcc when the `cuda` feature is on.
//!
//! Each `.cu` file in [`KERNELS`] holds one kernel instantiation and becomes
//! a fatbin with a cubin for sm_90a (H100/H200: no JIT at first use) and PTX
//! for compute_80 (any Ampere-or-newer GPU, JIT-compiled by the driver). The
//! fatbins are embedded in the binary through the generated `kernels.rs`.
//!
//! nvcc is found through `NVCC`, then `CUDA_HOME`/`CUDA_PATH` (`bin/nvcc`),
//! then `PATH`. Without the feature nothing is compiled and no CUDA toolkit
//! is needed (CI).

use std::path::{Path, PathBuf};
use std::process::Command;

/// (file stem = module name, what it does). A file holds the `extern "C"`
/// kernel of its own name, or the symbols listed in [`SYMBOLS`].
const KERNELS: &[(&str, &str)] = &[
    (
        "paged_write_kv_bf16",
        "write new K or V rows into vLLM's paged layout, bf16",
    ),
    (
        "paged_write_kv_f32",
        "write new K or V rows into vLLM's paged layout, f32",
    ),
    (
        "slot_write_kv_bf16",
        "write new K or V rows (or both in one launch) into the per-slot (vAttention) layout, bf16",
    ),
    (
        "slot_write_kv_f32",
        "write new K or V rows into the per-slot (vAttention) layout, f32",
    ),
    (
        "gemv_bf16",
        "decode projections x [M<=8, K] . w [N, K]^T, bf16, fused residual / SiLU-gate epilogues and RMSNorm prologue",
    ),
    (
        "rms_norm_bf16",
        "RMSNorm of each row, bf16, candle's arithmetic, one CTA a row, for programmatic dependent launch chains",
    ),
    (
        "swiglu_bf16",
        "the MLP's SiLU gate over a [rows, 2F] gate/up product, bf16, transformers' roundings",
    ),
    (
        "rope_qk_bf16",
        "RoPE on the q and k heads of the fused QKV projection's output in one pass, bf16, transformers' roundings (or, for decode steps, with k and v written straight into the per-slot cache)",
    ),
    (
        "argmax_f32",
        "greedy sampling: the first maximum of each logits row, f32 (the CPU argmax's ties and NaNs)",
    ),
    (
        "slot_decode_bf16",
        "split-KV decode over the per-slot layout on tensor cores, bf16, head_dim 128, GQA group <= 16",
    ),
    (
        "slot_prefill_w4_bf16",
        "causal FlashAttention-2-style prefill over the per-slot layout, bf16, head_dim 128, 64-row query tiles (w4p: softmax overlapped with wgmma)",
    ),
    (
        "gpu_spin",
        "one thread spinning for a number of SM cycles (benchmarks: the timed launch is queued behind it)",
    ),
    (
        "slot_prefill_wsp_bf16",
        "warp-specialized causal prefill over the per-slot layout (sm_90a): TMA producer warp, 2-stage K/V ring of 128-key tiles, two 64-row consumer warpgroups in ping-pong (one's softmax under the other's GEMMs)",
    ),
    (
        "slot_prefill_w8_bf16",
        "the same with 128-row query tiles (8 warps)",
    ),
    (
        "slot_decode_combine_bf16",
        "merges the split-KV decode partials with log-sum-exp weights",
    ),
    (
        "paged_decode_bf16",
        "vLLM v0.2.7 PagedAttention decode v1 / v2 (+ v2's reduce), bf16, head_dim 128, block 16/32/64/128",
    ),
    (
        "paged_prefill_bf16",
        "causal FlashAttention-2-style prefill over vLLM's paged layout, bf16, head_dim 128, 128-row query tiles",
    ),
    (
        "pod_bf16",
        "POD-Attention: a hybrid batch's prefill tiles and decode splits in one launch, SM-aware block roles",
    ),
];

/// Files with several kernels: (file stem, its `extern "C"` symbols).
const SYMBOLS: &[(&str, &[&str])] = &[
    (
        "paged_decode_bf16",
        &[
            "paged_decode_v1_b16_bf16",
            "paged_decode_v2_b16_bf16",
            "paged_decode_v1_b32_bf16",
            "paged_decode_v2_b32_bf16",
            "paged_decode_v1_b64_bf16",
            "paged_decode_v2_b64_bf16",
            "paged_decode_v1_b128_bf16",
            "paged_decode_v2_b128_bf16",
            "paged_decode_reduce_bf16",
        ],
    ),
    (
        "pod_bf16",
        &[
            "pod_bf16",
            "pod3_bf16",
            "podp_bf16",
            "pod3_tma_bf16",
            "podp_tma_bf16",
            "pod_wsd_bf16",
            "pod_wsds_bf16",
            "pod_nsmid",
        ],
    ),
    (
        "slot_write_kv_bf16",
        &["slot_write_kv_bf16", "slot_write_kv2_bf16"],
    ),
    ("rope_qk_bf16", &["rope_qk_bf16", "rope_write_kv_bf16"]),
    (
        "gemv_bf16",
        &[
            "gemv_bf16",
            "gemv_m4_bf16",
            "gemv_m1_bf16",
            "gemv_pipe_bf16",
            "gemv_split_bf16",
            "gemv_norm_bf16",
        ],
    ),
    (
        "slot_prefill_wsp_bf16",
        &["slot_prefill_wsp_bf16", "slot_prefill_wsps_bf16"],
    ),
    (
        "slot_decode_bf16",
        &[
            "slot_decode_bf16",
            "slot_decode_slim_bf16",
            "slot_decode_slimr_bf16",
        ],
    ),
    (
        "slot_prefill_w4_bf16",
        &[
            "slot_prefill_w4_bf16",
            "slot_prefill_w4p_bf16",
            "slot_prefill_w4t_bf16",
        ],
    ),
];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "VPOD_CUDA_ARCHS"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    // Every .cu file must be listed, so that none is silently left out of the build.
    for entry in std::fs::read_dir("src").expect("kernels/src") {
        let path = entry.expect("kernels/src entry").path();
        if path.extension().is_some_and(|e| e == "cu") {
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            assert!(
                KERNELS.iter().any(|(n, _)| *n == stem),
                "{} is not listed in kernels/build.rs",
                path.display()
            );
        }
    }
    let mut table =
        String::from("/// Kernels compiled into this build.\npub const KERNELS: &[Kernel] = &[\n");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        let nvcc = find_nvcc().unwrap_or_else(|| {
            panic!(
                "the `cuda` feature compiles CUDA kernels and needs nvcc: set NVCC or CUDA_HOME, or put nvcc on \
                 PATH (on a machine without a GPU: bash ../shared/tools/setup-cuda-build.sh, see the README)"
            )
        });
        for (name, doc) in KERNELS {
            let src = Path::new("src").join(format!("{name}.cu"));
            let fatbin = out.join(format!("{name}.fatbin"));
            compile(&nvcc, &src, &fatbin);
            let symbols = SYMBOLS
                .iter()
                .find(|(file, _)| file == name)
                .map_or_else(|| vec![*name], |(_, s)| s.to_vec());
            table.push_str(&format!(
                "    Kernel {{ name: {name:?}, symbols: &{symbols:?}, doc: {doc:?}, fatbin: include_bytes!({:?}) }},\n",
                fatbin.display().to_string()
            ));
        }
    }
    table.push_str("];\n");
    std::fs::write(out.join("kernels.rs"), table).expect("write kernels.rs");
}

fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("NVCC") {
        return Some(PathBuf::from(p));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var) {
            let p = Path::new(&home).join("bin/nvcc");
            if p.is_file() {
                return Some(p);
            }
        }
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join("nvcc"))
        .find(|p| p.is_file())
}

fn compile(nvcc: &Path, src: &Path, fatbin: &Path) {
    // sm_90a cubin (Hopper-specific instructions allowed) + compute_80 PTX for everything else.
    let archs = std::env::var("VPOD_CUDA_ARCHS").unwrap_or_else(|_| {
        "-gencode=arch=compute_90a,code=sm_90a -gencode=arch=compute_80,code=compute_80".into()
    });
    let status = Command::new(nvcc)
        .args([
            "-fatbin",
            "-O3",
            "-std=c++17",
            "--use_fast_math",
            "-lineinfo",
            "-Isrc",
        ])
        .args(archs.split_whitespace())
        .arg("-o")
        .arg(fatbin)
        .arg(src)
        .status()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", nvcc.display()));
    assert!(status.success(), "nvcc failed on {}", src.display());
}
