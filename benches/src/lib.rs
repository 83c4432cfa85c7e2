//! Benchmark support shared by the bench targets: timing with warm-up,
//! achieved-throughput arithmetic, and the JSON records that tables and plots
//! read. Bench targets live in `benches/benches/`; run them with
//! `cargo bench -p vpod-benches` (add `--features cuda` on a GPU machine).

pub mod energy;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::Value;

/// Runs `f` `warmup` times untimed, then `iters` times; returns the median
/// duration in milliseconds. The first calls on a fresh GPU include PTX JIT
/// compilation and allocator growth, so they must not be timed.
pub fn median_ms(
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    let mut times = Vec::with_capacity(iters.max(1));
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Matmul FLOPs of a forward pass over `tokens` tokens for a model with
/// `matmul_params` parameters in its linear layers (2 FLOPs per MAC).
pub fn matmul_flops(matmul_params: usize, tokens: usize) -> f64 {
    2.0 * matmul_params as f64 * tokens as f64
}

/// Where bench JSON goes: `$VPOD_BENCH_OUT` or `target/bench/`.
pub fn out_dir() -> PathBuf {
    std::env::var_os("VPOD_BENCH_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench"))
}

/// Writes `records` as a JSON array to `out_dir()/name`, returning the path.
pub fn write_json(name: &str, records: &[Value]) -> anyhow::Result<PathBuf> {
    let dir = out_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(records)?)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_runs() {
        let mut n = 0;
        let m = median_ms(1, 3, || {
            n += 1;
            Ok(())
        })
        .unwrap();
        assert_eq!(n, 4);
        assert!(m >= 0.0);
        assert_eq!(matmul_flops(10, 3), 60.0);
    }
}
