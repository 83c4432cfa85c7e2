//! GPU checks (`--features cuda`, run on the GPU machine by
//! `scripts/gpu-run.sh`): our kernels against their CPU twins on random
//! inputs with poisoned outputs, and the fixtures' parity with transformers
//! in bf16 on the GPU.

use candle_core::{DType, Device, Tensor};
use vpod_attention::ops::{KvLayout, write_kv};
use vpod_attention::{LogitsAt, SeqChunk};
use vpod_cli::engine::Engine;
use vpod_kvcache::{PagedLayout, SlotLayout};
use vpod_models::{ModelSource, fetch_model_files, load_model};

use crate::common::*;

fn gpu() -> Device {
    Device::new_cuda(0).expect("a CUDA device")
}

/// A slot permutation with every 5th token skipped (-1): blocks deliberately out of order.
fn shuffled(n: usize, total: usize, seed: u64) -> Vec<i64> {
    let mut all: Vec<i64> = (0..total as i64).collect();
    let mut s = seed;
    for i in (1..all.len()).rev() {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        all.swap(i, (s >> 33) as usize % (i + 1));
    }
    all.truncate(n);
    for (i, v) in all.iter_mut().enumerate() {
        if i % 5 == 4 {
            *v = -1;
        }
    }
    all
}

/// Runs the write on the GPU and on the CPU twin from the same random inputs
/// into caches poisoned with the same sentinel; the bytes must be identical.
fn check_write(layout: KvLayout, tokens: usize, index: Vec<i64>, dtype: DType, cache_elems: usize) {
    let (dev, cpu) = (gpu(), Device::Cpu);
    let (h, d) = match layout {
        KvLayout::Paged { layout, .. } => (layout.kv_heads, layout.head_dim),
        KvLayout::Slot(s) => (s.kv_heads, s.head_dim),
    };
    // Rows come out of a wider tensor, as K/V come out of a fused QKV projection.
    let wide = Tensor::randn(0f32, 1.0, (tokens, 3 * h, d), &cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let src = wide.narrow(1, h, h).unwrap();
    let idx = Tensor::new(index.as_slice(), &cpu).unwrap();
    let poison = Tensor::full(-3.5f32, cache_elems, &cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap();
    let cache_cpu = poison.copy().unwrap();
    write_kv(&cache_cpu, &src, &idx, layout).unwrap();
    let cache_gpu = poison.to_device(&dev).unwrap();
    write_kv(
        &cache_gpu,
        &src.to_device(&dev).unwrap(),
        &idx.to_device(&dev).unwrap(),
        layout,
    )
    .unwrap();
    let (a, b) = (host_f32(&cache_cpu), host_f32(&cache_gpu));
    assert!(
        a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()),
        "{layout:?} {dtype:?}"
    );
    assert!(a.iter().any(|&v| v != -3.5), "nothing was written");
}

#[test]
fn paged_write_matches_cpu_twin() {
    for dtype in [DType::BF16, DType::F32] {
        for (block, kv_heads) in [(16, 8), (128, 4), (32, 1)] {
            let blocks = 6;
            let layout = PagedLayout::new(blocks, block, kv_heads, 128, dtype.size_in_bytes()).unwrap();
            for is_value in [false, true] {
                let n = 37.min(blocks * block);
                let slots = shuffled(n, blocks * block, block as u64);
                check_write(
                    KvLayout::Paged { layout, is_value },
                    n,
                    slots,
                    dtype,
                    layout.elems(),
                );
            }
        }
    }
}

#[test]
fn slot_write_matches_cpu_twin() {
    for dtype in [DType::BF16, DType::F32] {
        let s = SlotLayout {
            max_seqs: 5,
            max_len: 64,
            kv_heads: 8,
            head_dim: 128,
        };
        let rows = shuffled(50, s.max_seqs * s.max_len, 9);
        check_write(
            KvLayout::Slot(s),
            50,
            rows,
            dtype,
            s.max_seqs * s.max_len * s.row_elems(),
        );
    }
}

/// Uniform values in [-scale, scale) from a fixed LCG (reproducible inputs), as bf16.
fn pseudo_random(shape: (usize, usize), scale: f32, seed: u64) -> Tensor {
    let mut state = seed.wrapping_mul(0x9E3779B97F4A7C15);
    let data: Vec<f32> = (0..shape.0 * shape.1)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
}

/// Every element of `t` as f32, on the host, in order.
fn host_f32(t: &Tensor) -> Vec<f32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// `got` (GPU) and `want` (CPU twin) a few bf16 ulps apart at most, at the
/// operands' scale (4 %, at least 0.04): roundings that land an ulp or two
/// apart pass, an indexing error (off by O(1)) does not.
fn assert_within_ulps(got: &Tensor, want: &Tensor, what: &str) {
    let (a, b) = (host_f32(got), host_f32(want));
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let bad: Vec<(usize, f32, f32)> = a
        .iter()
        .zip(&b)
        .enumerate()
        .filter(|(_, (x, y))| (*x - *y).abs() > 0.04 * y.abs().max(1.0))
        .map(|(i, (x, y))| (i, *x, *y))
        .take(5)
        .collect();
    assert!(bad.is_empty(), "{what}: (index, gpu, cpu) {bad:?}");
}

/// The decode GEMV kernels (every `GemvKernel`, all three epilogues)
/// against the CPU twin, on shapes with M = 1..8 (up to each kernel's
/// rows), K that is and is not a multiple of the unrolled (and pipelined)
/// stride, and odd N.
#[test]
fn gemv_matches_cpu_twin() {
    use vpod_attention::linear::{GemvKernel, gemv, gemv_with};
    let (dev, cpu) = (gpu(), Device::Cpu);
    let shapes = [
        (1, 6144, 4096),
        (3, 37, 200),
        (8, 130, 14336),
        (2, 64, 8),
        (1, 99, 1032),
        (4, 300, 4104),
    ];
    for ((m, n, k), kernel) in shapes
        .into_iter()
        .flat_map(|s| GemvKernel::ALL.into_iter().map(move |g| (s, g)))
        .filter(|((m, _, _), g)| *m <= g.max_rows())
    {
        let x = pseudo_random((m, k), 1.0, 1);
        let w = pseudo_random((2 * n, k), 0.05, 2);
        let r = pseudo_random((m, 2 * n), 1.0, 3);
        for (res, swiglu) in [(None, false), (Some(&r), false), (None, true)] {
            let res = if swiglu { None } else { res };
            let want = gemv(&x, &w, res, swiglu).unwrap();
            let got = gemv_with(
                kernel,
                &x.to_device(&dev).unwrap(),
                &w.to_device(&dev).unwrap(),
                res.map(|r| r.to_device(&dev).unwrap()).as_ref(),
                swiglu,
            )
            .unwrap()
            .to_device(&cpu)
            .unwrap();
            // Summation order differs, so a bf16 rounding of the product (and
            // one of the sum) may land an ulp or two apart.
            assert_within_ulps(
                &got,
                &want,
                &format!(
                    "{kernel:?}: m {m} n {n} k {k} residual {} swiglu {swiglu}",
                    res.is_some()
                ),
            );
        }
    }
}

/// RMSNorm fused into the GEMV (plain and gated epilogues) against its CPU
/// twin: M = 1..4, K up to Yi-34B's 7168 (more than 48 KiB of shared memory
/// at M = 4), an N larger than one column per resident warp (the grid
/// stride: the LM head's case) and a K shorter than the prefetched prefix;
/// with persistent CTAs and with one column a warp.
#[test]
fn gemv_norm_matches_cpu_twin() {
    use vpod_attention::linear::gemv_norm;
    let (dev, cpu) = (gpu(), Device::Cpu);
    for (m, n, k) in [
        (1, 6144, 4096),
        (4, 3000, 7168),
        (4, 20000, 1024),
        (2, 37, 64),
        (3, 130, 200),
    ] {
        let x = pseudo_random((m, k), 3.0, 4);
        let g = pseudo_random((1, k), 1.0, 5).reshape(k).unwrap();
        let w = pseudo_random((2 * n, k), 0.05, 6);
        for (swiglu, persistent) in [(false, true), (true, true), (false, false), (true, false)] {
            let want = gemv_norm(&x, &g, 1e-5, &w, swiglu, persistent).unwrap();
            let got = gemv_norm(
                &x.to_device(&dev).unwrap(),
                &g.to_device(&dev).unwrap(),
                1e-5,
                &w.to_device(&dev).unwrap(),
                swiglu,
                persistent,
            )
            .unwrap()
            .to_device(&cpu)
            .unwrap();
            // The norm's sum runs in another order too.
            assert_within_ulps(
                &got,
                &want,
                &format!("m {m} n {n} k {k} swiglu {swiglu} persistent {persistent}"),
            );
        }
    }
}

/// Our PDL-aware RMSNorm kernel against candle's CPU norm (f32): one CTA a
/// row, K of Llama-3-8B's and Yi-34B's hidden sizes, a short row, and one
/// longer than the kernel holds in registers.
#[test]
fn rms_norm_matches_candle() {
    use vpod_attention::linear::rms_norm;
    let (dev, cpu) = (gpu(), Device::Cpu);
    for (t, k) in [(1, 4096), (3, 7168), (17, 64), (2, 8200)] {
        let x = pseudo_random((t, k), 3.0, 11);
        let g = pseudo_random((1, k), 1.0, 12).reshape(k).unwrap();
        // (On the CPU, rms_norm is candle's op.)
        let want = rms_norm(
            &x.to_dtype(DType::F32).unwrap(),
            &g.to_dtype(DType::F32).unwrap(),
            1e-5,
        )
        .unwrap();
        let got = rms_norm(&x.to_device(&dev).unwrap(), &g.to_device(&dev).unwrap(), 1e-5)
            .unwrap()
            .to_device(&cpu)
            .unwrap();
        assert_eq!(got.dims(), [t, k]);
        assert_within_ulps(&got.to_dtype(DType::F32).unwrap(), &want, &format!("t {t} k {k}"));
    }
}

/// RoPE straight out of the QKV projection on the device equals its CPU twin
/// bit for bit (the same bf16 roundings, no FMA across them), for Llama-3-8B's
/// and Yi-6B's head counts and a small odd token count, q and k contiguous.
#[test]
fn rope_qk_matches_cpu_twin() {
    use vpod_attention::rope::rope_qk;
    for (t, heads, kv) in [(1024, 32, 8), (77, 32, 4), (3, 4, 2)] {
        let d = 128;
        let qkv = pseudo_random((t, (heads + 2 * kv) * d), 3.0, 21);
        let cos = pseudo_random((t, d / 2), 1.0, 22);
        let sin = pseudo_random((t, d / 2), 1.0, 23);
        let (wq, wk) = rope_qk(&qkv, &cos, &sin, heads, kv).unwrap();
        let g = |x: &Tensor| x.to_device(&gpu()).unwrap();
        let (q, k) = rope_qk(&g(&qkv), &g(&cos), &g(&sin), heads, kv).unwrap();
        assert!(q.is_contiguous() && k.is_contiguous());
        assert_eq!(host_f32(&q), host_f32(&wq), "q: t {t} heads {heads}");
        assert_eq!(host_f32(&k), host_f32(&wk), "k: t {t} kv {kv}");
    }
}

/// Greedy sampling on the device picks exactly the CPU argmax's token: rows
/// of bf16-rounded logits (many exact ties), a planted tie (the first wins),
/// NaNs (never win; element 0 NaN gives 0; the row is flagged), an all -inf
/// row (flagged), and Llama-3's,
/// Yi's and a small odd vocabulary.
#[test]
fn argmax_rows_matches_cpu_twin() {
    use vpod_attention::sample::argmax_rows;
    for (rows, n) in [(33, 128_256), (5, 64_000), (4, 7)] {
        let mut x = host_f32(&pseudo_random((rows, n), 8.0, 11));
        let row = |r: usize| r * n;
        // Row 0: the maximum twice, late then early (the early one wins).
        x[row(0) + n - 1] = 100.0;
        x[row(0) + n / 2] = 100.0;
        // Row 1: NaNs around a maximum; row 2: element 0 NaN; row 3: all -inf.
        x[row(1) + n / 3] = 50.0;
        x[row(1) + n / 3 + 1] = f32::NAN;
        x[row(1)] = 1.0;
        x[row(1) + 1] = f32::NAN;
        x[row(2)] = f32::NAN;
        x[row(3)..row(4)].fill(f32::NEG_INFINITY);
        let t = Tensor::from_vec(x, (rows, n), &Device::Cpu).unwrap();
        let want = argmax_rows(&t).unwrap().to_vec1::<u32>().unwrap();
        let got = argmax_rows(&t.to_device(&gpu()).unwrap())
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(got, want, "rows {rows} vocab {n}");
        use vpod_attention::sample::ARGMAX_NONFINITE as BAD;
        assert_eq!(
            want[..4],
            [(n / 2) as u32, (n / 3) as u32 | BAD, BAD, BAD],
            "vocab {n}"
        );
    }
}

/// The MLP's one-pass SiLU gate kernel against its CPU twin (the same
/// roundings; __expf vs exp may move a rounding by an ulp), on Llama-3-8B's
/// and Yi-6B's FFN widths and a small odd row count.
#[test]
fn silu_gate_matches_cpu_twin() {
    use vpod_attention::linear::silu_gate;
    let dev = gpu();
    for (t, f) in [(1024, 14336), (7, 11008), (3, 8)] {
        let gu = pseudo_random((t, 2 * f), 4.0, 5);
        let want = silu_gate(&gu).unwrap();
        let got = silu_gate(&gu.to_device(&dev).unwrap()).unwrap();
        let (a, b) = (host_f32(&got), host_f32(&want));
        let bad = a
            .iter()
            .zip(&b)
            .filter(|(x, y)| (*x - *y).abs() > 0.02 * y.abs().max(0.1))
            .count();
        assert_eq!(
            bad,
            0,
            "t {t} f {f}: {bad} of {} outputs differ by more than 2 %",
            a.len()
        );
    }
}

/// bf16 on the GPU vs transformers' fp32: per-position top-1 agreement
/// (prompt and perplexity text, ~200 positions per fixture) and perplexity
/// (tolerances of the CUDA issue: >= 95 %, within 2 %).
#[test]
fn fixtures_match_transformers_in_bf16_on_gpu() {
    for backend in ["reference", "vattention", "paged:16", "paged:128", "pod"] {
        fixtures_parity(backend);
    }
}

fn fixtures_parity(backend: &str) {
    let dev = gpu();
    let (mut agree_all, mut total_all) = (0, 0);
    for name in FIXTURES {
        let mut e = Engine::new(bf16_fixture(name, &dev), backend).unwrap();
        let r = reference(name);
        let refs = candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu)
            .unwrap();
        let ppl_ids: Vec<u32> = refs["ppl_ids"]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|i| i as u32)
            .collect();
        let mut line = format!("GPU-PARITY {backend} {name}:");
        for (what, ids, want) in [
            ("prompt", &r.prompt_ids, &refs["logits"]),
            ("ppl text", &ppl_ids, &refs["ppl_logits"]),
        ] {
            let chunk = SeqChunk {
                seq_id: 1,
                context_len: 0,
                query_len: ids.len(),
            };
            let got = e
                .forward(vec![chunk], ids, LogitsAt::AllTokens)
                .unwrap()
                .to_device(&Device::Cpu)
                .unwrap();
            e.release(1);
            let a = got.argmax(1).unwrap().to_vec1::<u32>().unwrap();
            let b = want.argmax(1).unwrap().to_vec1::<u32>().unwrap();
            let agree = a.iter().zip(&b).filter(|(x, y)| x == y).count();
            let max_diff = max_abs_diff(&got, want);
            line += &format!(
                " {what} top-1 {agree}/{} (max |logit diff| {max_diff:.2e});",
                a.len()
            );
            agree_all += agree;
            total_all += a.len();
        }
        let s = e.score(&ppl_ids, 64, &mut |_, _| {}).unwrap();
        let rel = (s.ppl - r.ppl).abs() / r.ppl;
        println!(
            "{line} ppl {:.3} vs {:.3} ({:+.3} %)",
            s.ppl,
            r.ppl,
            (s.ppl / r.ppl - 1.0) * 100.0
        );
        assert!(rel < 0.02, "{backend} {name}: ppl {} vs {}", s.ppl, r.ppl);
    }
    let rate = agree_all as f64 / total_all as f64;
    println!(
        "GPU-PARITY {backend} all fixtures: top-1 agreement {agree_all}/{total_all} = {:.1} %",
        rate * 100.0
    );
    assert!(rate >= 0.95, "top-1 agreement {rate}");
}

/// The decode path (single-token steps: the GEMVs, with the RMSNorm in
/// their prologue or not, the decode attention kernels) gives the logits of
/// the prefill path (our norm kernel as on the decode path, candle's
/// matmuls; checked against transformers above) at the same positions, on every fixture, for
/// `vattention` and `paged:16`, with each norm mode (the default runs our
/// norm kernel; the fixtures are too small for Auto to fuse any norm, so
/// the fused path is forced once; a process-wide setting: the GPU tests run
/// with --test-threads=1, as gpu-run.sh runs them).
#[test]
fn decode_steps_match_prefill_logits() {
    use vpod_attention::linear::{NormFusion, set_norm_fusion};
    let _restore = Defaults;
    for mode in [NormFusion::Auto, NormFusion::Always, NormFusion::Never] {
        set_norm_fusion(mode);
        decode_vs_prefill(mode);
    }
    set_norm_fusion(NormFusion::default());
    // The decode steps above ran RoPE and the K/V write in one kernel
    // (vattention); once more with the two kernels.
    vpod_attention::set_rope_write_fusion(false);
    decode_vs_prefill(NormFusion::default());
}

/// Sets the process-wide decode-path switches back to their defaults when
/// dropped (also when a test panics, so later tests of a --test-threads=1
/// run see the defaults).
struct Defaults;

impl Drop for Defaults {
    fn drop(&mut self) {
        vpod_attention::linear::set_norm_fusion(Default::default());
        vpod_attention::set_rope_write_fusion(true);
    }
}

/// Decode steps with RoPE and the K/V write in one kernel
/// (`rope_write_kv_bf16`, vattention and pod) give the logits of the two
/// kernels apart (`rope_qk_bf16`, `slot_write_kv2_bf16`) bit for bit: the
/// same arithmetic, the same cache rows (later steps read them back). Three
/// sequences of different lengths decode together (several tokens a step).
#[test]
fn rope_write_fusion_matches_two_kernels() {
    let _restore = Defaults;
    let dev = gpu();
    for name in FIXTURES {
        let model = bf16_fixture(name, &dev);
        let ids = reference(name).prompt_ids;
        let lens = [ids.len() - 6, ids.len() - 7, ids.len() - 9];
        let chunk = |seq_id, context_len, query_len| SeqChunk {
            seq_id,
            context_len,
            query_len,
        };
        for backend in ["vattention", "pod"] {
            let mut runs = vec![];
            for fused in [true, false] {
                vpod_attention::set_rope_write_fusion(fused);
                let mut e = Engine::with_options(model.clone(), backend, &Default::default()).unwrap();
                for (s, &n) in lens.iter().enumerate() {
                    e.forward(vec![chunk(s as u64 + 1, 0, n)], &ids[..n], LogitsAt::LastToken)
                        .unwrap();
                }
                let steps: Vec<Vec<f32>> = (0..5)
                    .map(|step| {
                        let chunks = lens
                            .iter()
                            .enumerate()
                            .map(|(s, &n)| chunk(s as u64 + 1, n + step, 1))
                            .collect();
                        let tokens: Vec<u32> = lens.iter().map(|&n| ids[n + step]).collect();
                        host_f32(&e.forward(chunks, &tokens, LogitsAt::LastToken).unwrap())
                    })
                    .collect();
                runs.push(steps);
            }
            assert!(
                runs[0] == runs[1],
                "{name} {backend}: fused RoPE + K/V write changed the decode logits"
            );
        }
    }
}

/// A fixture loaded through the Hub code path onto `dev` in bf16.
fn bf16_fixture(name: &str, dev: &Device) -> std::sync::Arc<vpod_models::LoadedModel> {
    let files = fetch_model_files(
        &ModelSource::Local(fixture(name)),
        &offline(std::path::Path::new("/none")),
    )
    .unwrap();
    std::sync::Arc::new(load_model(files, DType::BF16, dev, &mut |_, _| {}).unwrap())
}

fn decode_vs_prefill(mode: vpod_attention::linear::NormFusion) {
    let dev = gpu();
    for name in FIXTURES {
        let model = bf16_fixture(name, &dev);
        let ids = reference(name).prompt_ids;
        let (n, tail) = (ids.len(), 6);
        for backend in ["vattention", "paged:16"] {
            let mut e = Engine::with_options(model.clone(), backend, &Default::default()).unwrap();
            let all = e
                .forward(
                    vec![SeqChunk {
                        seq_id: 1,
                        context_len: 0,
                        query_len: n,
                    }],
                    &ids,
                    LogitsAt::AllTokens,
                )
                .unwrap();
            e.forward(
                vec![SeqChunk {
                    seq_id: 2,
                    context_len: 0,
                    query_len: n - tail,
                }],
                &ids[..n - tail],
                LogitsAt::LastToken,
            )
            .unwrap();
            let mut worst = 0f32;
            for p in n - tail..n {
                let step = e
                    .forward(
                        vec![SeqChunk {
                            seq_id: 2,
                            context_len: p,
                            query_len: 1,
                        }],
                        &ids[p..p + 1],
                        LogitsAt::LastToken,
                    )
                    .unwrap();
                let want = all.narrow(0, p, 1).unwrap();
                let r = rel_l2(&step, &want);
                worst = worst.max(r);
                let top = |t: &Tensor| {
                    t.argmax(1)
                        .unwrap()
                        .to_device(&Device::Cpu)
                        .unwrap()
                        .to_vec1::<u32>()
                        .unwrap()
                };
                // bf16 sums in another order: a near-tie may flip, a wrong row cannot pass the l2 bound.
                assert!(r < 3e-2, "{name} {backend} {mode:?}: position {p}: rel l2 {r}");
                if top(&step) != top(&want) {
                    println!(
                        "DECODE-VS-PREFILL {name} {backend} {mode:?}: top-1 differs at {p} (rel l2 {r:.2e})"
                    );
                }
            }
            println!(
                "DECODE-VS-PREFILL {name} {backend}: worst rel l2 over the last {tail} positions {worst:.2e}"
            );
        }
    }
}

/// The split-KV decode kernels (`slot_decode_bf16` and the two slim ones,
/// each also at one block an SM) against their CPU twin: GQA 4, 7, 8, one
/// to seven splits, sequences of 1 to 4100 keys in shuffled slots (so empty
/// splits, one-key splits and splits that are no multiple of 16 keys).
/// Also prints each kernel's achieved bandwidth at a 16K context (an
/// indication: the benchmarks proper are `vpod-bench decode` and `hybrid`);
/// at one block an SM, the slim decodes' lines say how much bandwidth one
/// block an SM draws (how they run beside the slim prefill). With
/// `VPOD_QUICK` (compute-sanitizer) the twin part only.
#[test]
fn slot_decode_matches_cpu_twin() {
    use vpod_attention::SlimDecode;
    use vpod_attention::decode::{DecodeKernel, slot_decode, slot_decode_with};
    let kernels = std::iter::once(None)
        .chain(SlimDecode::ALL.map(Some))
        .flat_map(|slim| {
            [false, true].map(|one_block_per_sm| DecodeKernel {
                slim,
                one_block_per_sm,
            })
        })
        .collect::<Vec<_>>();
    let (dev, cpu) = (gpu(), Device::Cpu);
    for (heads, kv_heads) in [(32, 8), (56, 8), (32, 4)] {
        let (max_seqs, max_len) = (5, 4200);
        let q = pseudo_random((3, heads * 128), 1.0, 11)
            .reshape((3, heads, 128))
            .unwrap();
        let k = pseudo_random((max_seqs * max_len, kv_heads * 128), 1.0, 12)
            .reshape((max_seqs, max_len, kv_heads, 128))
            .unwrap();
        let v = pseudo_random((max_seqs * max_len, kv_heads * 128), 1.0, 13)
            .reshape((max_seqs, max_len, kv_heads, 128))
            .unwrap();
        let (slots, lens) = ([4u32, 0, 2], [1usize, 777, 4100]);
        let (qg, kg, vg) = (
            q.to_device(&dev).unwrap(),
            k.to_device(&dev).unwrap(),
            v.to_device(&dev).unwrap(),
        );
        for splits in [1, 3, 7] {
            let want = slot_decode(&q, &k, &v, &slots, &lens, splits)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let mut slim_tiles: [Option<Tensor>; 2] = [None, None];
            for &kernel in &kernels {
                let got = slot_decode_with(&qg, &kg, &vg, &slots, &lens, splits, kernel)
                    .unwrap()
                    .to_device(&cpu)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                let d = max_abs_diff(&got, &want);
                assert!(
                    d < 2e-2,
                    "GQA {heads}/{kv_heads}, {splits} splits, {kernel:?}: differs by {d}"
                );
                // The two slim decodes give each warp the same keys in the same
                // order and share the merge: the ring a warp should match the
                // block-wide ring bit for bit (a difference points at its ring's
                // synchronisation; the twin bound above is what must hold).
                let at = usize::from(kernel.one_block_per_sm);
                match kernel.slim {
                    Some(SlimDecode::Tiles) => slim_tiles[at] = Some(got),
                    Some(SlimDecode::WarpRing) => {
                        if let Some(tiles) = &slim_tiles[at] {
                            println!(
                                "SLIMR-VS-SLIM GQA {heads}/{kv_heads}, {splits} splits, one block an SM {}: max |diff| {}",
                                kernel.one_block_per_sm,
                                max_abs_diff(&got, tiles)
                            );
                        }
                    }
                    None => {}
                }
            }
        }
    }
    // A slim kernel asked for a group it cannot hold is an error, not a fallback.
    let q16 = Tensor::zeros((1, 64, 128), DType::BF16, &dev).unwrap();
    let kv4 = Tensor::zeros((1, 64, 4, 128), DType::BF16, &dev).unwrap();
    let slim = DecodeKernel {
        slim: Some(SlimDecode::WarpRing),
        one_block_per_sm: false,
    };
    assert!(slot_decode_with(&q16, &kv4, &kv4, &[0], &[64], 1, slim).is_err());
    if std::env::var_os("VPOD_QUICK").is_some() {
        return; // under compute-sanitizer: the kernels' results only
    }
    // 16K context, batch 8, Llama-3-8B heads: bytes of K and V read per call / time.
    let (b, len, heads, kvh) = (8usize, 16384usize, 32usize, 8usize);
    let q = Tensor::randn(0f32, 1.0, (b, heads, 128), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let cache = || {
        Tensor::randn(0f32, 1.0, (b, len, kvh, 128), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    };
    let (kc, vc) = (cache(), cache());
    let slots: Vec<u32> = (0..b as u32).collect();
    let lens = vec![len; b];
    let splits = vpod_attention::decode_splits(len, b, kvh, vpod_attention::TWIN_SMS);
    for &kernel in &kernels {
        let run = || slot_decode_with(&q, &kc, &vc, &slots, &lens, splits, kernel).unwrap();
        for _ in 0..3 {
            run();
        }
        dev.synchronize().unwrap();
        let t = std::time::Instant::now();
        for _ in 0..20 {
            run();
        }
        dev.synchronize().unwrap();
        let s = t.elapsed().as_secs_f64() / 20.0;
        let bytes = 2.0 * (b * len * kvh * 128 * 2) as f64;
        let name = kernel.slim.map_or("slot_decode_bf16", |k| k.symbol());
        let per_sm = if kernel.one_block_per_sm {
            ", one block an SM"
        } else {
            ""
        };
        println!(
            "BENCH {name}{per_sm}: llama3-8b heads, batch {b}, ctx {len}, {splits} splits: {:.1} us, {:.2} TB/s (incl. launch)",
            s * 1e6,
            bytes / s / 1e12
        );
    }
}

/// Relative L2 error ||a - b|| / ||b|| over all elements.
fn rel_l2(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let b = b.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap();
    let num = (&a - &b)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let den = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(num.is_finite(), "NaN/inf in the output");
    (num / den.max(1e-30)).sqrt()
}

/// (seq, context_len, query_len) per step; a seq missing from a later step
/// is released. Prompts of mixed lengths, a chunked prompt continuing at an
/// offset, a one-token prompt, decodes next to prompt chunks, sequences
/// finishing and their cache reused. (The CPU twins are plain loops: lengths
/// stay in the hundreds.)
const TWIN_STEPS: &[&[(u64, usize, usize)]] = &[
    &[(1, 0, 300), (2, 0, 700), (3, 0, 1)],
    &[(1, 300, 200), (2, 700, 1), (3, 1, 1)],
    &[(1, 500, 1), (2, 701, 1), (4, 0, 260)],
    &[(1, 501, 1), (4, 260, 1), (5, 0, 130)],
];

/// Whether `VPOD_QUICK` is set (the compute-sanitizer runs), and the
/// (heads, KV heads) shapes the twin tests run: Llama-3-8B's only when
/// quick, else also Yi-34B's (GQA 7) and Yi-6B's (GQA 8).
fn twin_shapes() -> (bool, &'static [(usize, usize)]) {
    let quick = std::env::var_os("VPOD_QUICK").is_some();
    (
        quick,
        if quick {
            &[(32, 8)]
        } else {
            &[(32, 8), (56, 8), (32, 4)]
        },
    )
}

/// Runs `steps` through backend `spec` on the GPU and on the CPU with the
/// same random q/k/v per layer; every output within 1e-2 relative L2.
/// `scramble` first admits and frees throwaway sequences on the GPU backend
/// so that its blocks are handed out non-contiguously, out of order (the
/// virtual cache's slots are reused by the steps' own finishing sequences).
fn check_against_twin(
    spec: &str,
    shape: (usize, usize),
    opts: &vpod_attention::BackendOptions,
    steps: &[&[(u64, usize, usize)]],
    scramble: bool,
    label: &str,
) {
    check_against_twin_ramp(spec, shape, opts, steps, scramble, label, 0.0, None)
}

/// [`check_against_twin`] with each new K row scaled by `1 + k_ramp * pos /
/// 1024` (pos: its position in its sequence): with a ramp the scores grow
/// along the keys, so a row's running max keeps rising tile after tile (the
/// warp-specialized kernels' lazy rescale then moves it and rescales O).
/// With `kernel`, every step holding prompt chunks and decodes must say in
/// its record (`step_path`) that this kernel ran it (no silent fallback).
#[allow(clippy::too_many_arguments)]
fn check_against_twin_ramp(
    spec: &str,
    (heads, kv_heads): (usize, usize),
    opts: &vpod_attention::BackendOptions,
    steps: &[&[(u64, usize, usize)]],
    scramble: bool,
    label: &str,
    k_ramp: f32,
    kernel: Option<&str>,
) {
    use vpod_attention::{AttnConfig, BatchMeta, create_backend};
    let (dev, cpu) = (gpu(), Device::Cpu);
    let cfg = AttnConfig {
        num_layers: 2,
        num_heads: heads,
        num_kv_heads: kv_heads,
        head_dim: 128,
        max_seq_len: 4096,
        dtype: DType::BF16,
    };
    let mut g = create_backend(spec, &cfg, &dev, opts).unwrap();
    let mut c = create_backend(spec, &cfg, &cpu, opts).unwrap();
    // The CPU twin of `pod` and `vattention` runs one CPU path whatever the
    // POD mode, tuning or prefill kernel (those pick GPU kernels), and it
    // dominates these tests' time: its outputs for the same steps are
    // computed once and reused by every kernel entry (per cache layout).
    let cache_key = (spec.starts_with("pod") || spec == "vattention").then(|| {
        let base = spec.split(':').next().unwrap_or(spec);
        format!(
            "{base} megacache {} {heads}/{kv_heads} ramp {k_ramp} {steps:?}",
            opts.megacache
        )
    });
    let cached: Option<Vec<Tensor>> = cache_key
        .as_ref()
        .and_then(|k| twin_cache().lock().unwrap().get(k).cloned());
    let mut computed = vec![];
    if scramble && let Some(kv) = g.kv_manager() {
        for s in 0..6u64 {
            kv.admit(1000 + s, 1 + (s as usize * 97) % 300).unwrap();
        }
        for s in [1003u64, 1000, 1005, 1001] {
            kv.release(s);
        }
    }
    let mut live: Vec<u64> = vec![];
    let mut case = 0u64;
    for (i, step) in steps.iter().enumerate() {
        for s in live.iter().filter(|s| !step.iter().any(|x| x.0 == **s)) {
            g.release(*s);
            c.release(*s);
        }
        live = step.iter().map(|x| x.0).collect();
        let chunks: Vec<SeqChunk> = step
            .iter()
            .map(|&(seq_id, context_len, query_len)| SeqChunk {
                seq_id,
                context_len,
                query_len,
            })
            .collect();
        let t: usize = chunks.iter().map(|c| c.query_len).sum();
        let mg = BatchMeta::new(chunks.clone(), LogitsAt::LastToken, &dev).unwrap();
        let mc = BatchMeta::new(chunks, LogitsAt::LastToken, &cpu).unwrap();
        for layer in 0..2 {
            case += 1;
            let r = |h: usize, seed: u64| {
                pseudo_random((t, h * 128), 1.0, seed)
                    .reshape((t, h, 128))
                    .unwrap()
            };
            let (q, mut k, v) = (
                r(heads, case * 3),
                r(kv_heads, case * 3 + 1),
                r(kv_heads, case * 3 + 2),
            );
            if k_ramp != 0.0 {
                let gain: Vec<f32> = step
                    .iter()
                    .flat_map(|&(_, ctx, ql)| (ctx..ctx + ql).map(|pos| 1.0 + k_ramp * pos as f32 / 1024.0))
                    .collect();
                let gain = Tensor::from_vec(gain, (t, 1, 1), &Device::Cpu).unwrap();
                k = k
                    .to_dtype(DType::F32)
                    .unwrap()
                    .broadcast_mul(&gain)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap();
            }
            let want = match &cached {
                Some(w) => w[computed.len()].clone(),
                None => c.forward(layer, &q, &k, &v, &mc).unwrap(),
            };
            computed.push(want.clone());
            let got = g
                .forward(
                    layer,
                    &q.to_device(&dev).unwrap(),
                    &k.to_device(&dev).unwrap(),
                    &v.to_device(&dev).unwrap(),
                    &mg,
                )
                .unwrap();
            let e = rel_l2(&got, &want);
            assert!(
                e < 1e-2,
                "{spec} {label} GQA {heads}/{kv_heads} step {i} layer {layer}: rel. L2 error {e}"
            );
            // `kernel`: what the record must name on the hybrid steps (on
            // every step with a prompt chunk for `vattention`, whose steps
            // all run the plain prefill kernel).
            let prompt = step.iter().any(|x| x.2 > 1);
            let hybrid = prompt && step.iter().any(|x| x.2 == 1);
            if let (Some(k), true) = (kernel, hybrid || (prompt && spec == "vattention")) {
                let note = g.step_path().unwrap_or_default();
                assert!(note.contains(k), "{spec} {label} step {i}: ran '{note}', not {k}");
            }
        }
        let next: Vec<(u64, usize)> = step.iter().map(|&(s, c, q)| (s, c + q + 1)).collect();
        g.prepare_next(&next).unwrap();
    }
    if let (Some(k), None) = (cache_key, cached) {
        twin_cache().lock().unwrap().insert(k, computed);
    }
}

/// CPU twin outputs by (backend without its `:MODE`, cache layout, shape,
/// K ramp, steps): see `check_against_twin_ramp`.
fn twin_cache() -> &'static std::sync::Mutex<std::collections::HashMap<String, Vec<Tensor>>> {
    static CACHE: std::sync::OnceLock<std::sync::Mutex<std::collections::HashMap<String, Vec<Tensor>>>> =
        std::sync::OnceLock::new();
    CACHE.get_or_init(Default::default)
}

/// The `vattention` backend on the GPU (VMM cache, write + prefill + decode
/// kernels) against its CPU twin over the batch-spec table; GQA 4, 7 and 8;
/// per-layer regions and the megacache; overlapped and synchronous mapping;
/// every prefill kernel (`PrefillKernel`: 128 rows; 64 rows pipelined, with
/// and without TMA loads; warp-specialized; 64 rows for the megacache). The
/// table's chunks start at offsets that are no multiple of a key tile, end
/// inside one (the last tile's rows past the chunk) and leave the
/// warp-specialized kernel's first consumer a tile short of the second.
#[test]
fn vattention_gpu_matches_cpu_twin() {
    use vpod_attention::PrefillKernel;
    // VPOD_QUICK (the compute-sanitizer runs): the first shape, no megacache.
    let (quick, shapes) = twin_shapes();
    // An L2 budget of 1 byte: the warp-specialized tiles in sections of one
    // KV head (ws_l2_order's multi-section order; at these lengths the
    // default budget holds every head in one section).
    let l2 = vpod_attention::PREFILL_L2_BUDGET;
    for &shape in shapes {
        for (megacache, mapping, kernel, l2_budget) in [
            (false, vpod_kvcache::Mapping::Overlapped, PrefillKernel::Wsp, l2),
            (false, vpod_kvcache::Mapping::Overlapped, PrefillKernel::Wsp, 1),
            (
                false,
                vpod_kvcache::Mapping::Overlapped,
                PrefillKernel::WspSlim,
                l2,
            ),
            (
                false,
                vpod_kvcache::Mapping::Overlapped,
                PrefillKernel::WspSlim,
                1,
            ),
            (false, vpod_kvcache::Mapping::Overlapped, PrefillKernel::W8, l2),
            (false, vpod_kvcache::Mapping::Overlapped, PrefillKernel::Tma64, l2),
            (false, vpod_kvcache::Mapping::Overlapped, PrefillKernel::W4p, l2),
            (true, vpod_kvcache::Mapping::Sync, PrefillKernel::W4, l2),
        ] {
            if quick && megacache {
                continue;
            }
            let opts = vpod_attention::BackendOptions {
                max_seqs: 4,
                megacache,
                mapping,
                prefill_kernel: kernel,
                prefill_l2_budget: l2_budget,
                ..Default::default()
            };
            let label = format!(
                "megacache {megacache}, prefill {}, L2 budget {l2_budget}",
                kernel.symbol()
            );
            // The warp-specialized tiles must run, not a fallback (the hybrid
            // steps' records name the prefill kernel; 128-row boxes fit the
            // 2 MiB pages here).
            let ran = kernel.warp_specialized().then(|| kernel.symbol());
            check_against_twin_ramp("vattention", shape, &opts, TWIN_STEPS, false, &label, 0.0, ran);
        }
    }
}

/// The warp-specialized prefill kernel (`wsp`, and its slim build `wsps`) on
/// whole 128-key tiles (a 512-token prompt, a 384-token chunk at 512: the
/// rings wrap several times) and a
/// 200-token chunk at 896 (GQA 8), with plain random K and with K rows
/// growing along the sequence (the lazy rescale moves the running max on
/// later tiles too). The CPU twin's cost bounds the sizes: with 1024-token
/// chunks this test ran past 3 minutes on the GPU machine's 16 cores
/// (results/2026-12-03-h200-prefill-ws2).
#[test]
fn vattention_ws_prefill_long_chunks() {
    use vpod_attention::PrefillKernel;
    let steps: &[&[(u64, usize, usize)]] = &[&[(1, 0, 512)], &[(1, 512, 384)], &[(1, 896, 200)]];
    // The tile at both register budgets (wsp, wsps), each in one L2 section
    // and in sections of one KV head (a 1-byte budget).
    let kernels = [PrefillKernel::Wsp, PrefillKernel::WspSlim];
    for (kernel, l2_budget) in kernels
        .into_iter()
        .flat_map(|k| [(k, vpod_attention::PREFILL_L2_BUDGET), (k, 1)])
    {
        let opts = vpod_attention::BackendOptions {
            max_seqs: 2,
            prefill_kernel: kernel,
            prefill_l2_budget: l2_budget,
            ..Default::default()
        };
        for ramp in [0.0, 8.0] {
            let label = format!("{} (K ramp {ramp}, L2 budget {l2_budget})", kernel.symbol());
            // The asked tile ran, not a fallback.
            let ran = Some(kernel.symbol());
            check_against_twin_ramp("vattention", (32, 4), &opts, steps, false, &label, ramp, ran);
        }
    }
}

/// The hybrid steps of the POD tests: (seq, context_len, query_len) per
/// step (a sequence missing from a step is released). Prompts first (plain
/// prefill kernel), then many decodes next to one short chunk, a chunk
/// continuing at an offset among the decodes, one long chunk next to one
/// decode (with a `long` prompt of 1100, its 18 splits are past the
/// in-kernel merge: the combine kernel runs after the POD kernel), and a
/// decode-only step. (The CPU twin of the long prompt takes most of the
/// test's time: it is computed once per backend, shape and steps and shared
/// by every kernel entry, see `check_against_twin_ramp`.)
fn pod_steps(long: usize) -> Vec<Vec<(u64, usize, usize)>> {
    let len = |s: u64| 50 + 37 * s as usize;
    let decodes = |extra: usize| (2..10u64).map(move |s| (s, len(s) + extra, 1));
    let mut s0 = vec![(1, 0, long)];
    s0.extend((2..10u64).map(|s| (s, 0, len(s))));
    let mut s1 = vec![(1, long, 1), (10, 0, 200)];
    s1.extend(decodes(0));
    let mut s2 = vec![(10, 200, 300), (1, long + 1, 1)];
    s2.extend(decodes(1));
    let s3 = vec![(1, long + 2, 1), (11, 0, 700)];
    let s4 = vec![(1, long + 3, 1), (11, 700, 1)];
    vec![s0, s1, s2, s3, s4]
}

/// The `pod` backend on the GPU against its CPU twin: both fused kernels
/// (2 blocks per SM; 3 per SM with one or two resident prefill blocks) under
/// both block-role policies (resident prefill blocks per SM, the paper's
/// per-SM tickets), the pipelined prefill tile (`podp_bf16`), the TMA
/// entries (`podp_tma_bf16`, `pod3_tma_bf16`), the SM-partitioned kernel
/// with the warp-specialized prefill tile (`pod_wsd_bf16` with 4 decode-first
/// SMs, with 1 and with none: decode last; `pod_wsds_bf16`, its prefill role at
/// the slim tile's registers, with 4), the two-stream path and the planner's choice
/// on Llama-3-8B's heads; the partitioned kernels, `pod_bf16`, `podp_tma_bf16`
/// and `pod3_tma_bf16` on GQA 7 and 8 too.
#[test]
fn pod_gpu_matches_cpu_twin() {
    let (quick, shapes) = twin_shapes();
    // VPOD_QUICK (the compute-sanitizer runs): the first eight (the
    // partitioned kernel with 4 decode-first SMs, with 1 and with none, its
    // slim-register entry, then one per kernel).
    let all: &[(&str, [&str; 7])] = &[
        ("pod:fused", ["1", "", "", "1", "1", "4", "wsp"]),
        ("pod:fused", ["1", "", "", "1", "1", "1", "wsp"]),
        ("pod:fused", ["1", "", "", "1", "1", "0", "wsp"]),
        ("pod:fused", ["1", "", "", "1", "1", "4", "slim"]),
        ("pod:fused", ["1", "2", "1", "0", "0", "", ""]),
        ("pod:fused", ["1", "2", "1", "1", "1", "", ""]),
        ("pod:fused", ["1", "3", "2", "0", "1", "", ""]),
        ("pod:fused", ["1", "2", "1", "1", "0", "", ""]),
        ("pod:fused", ["1", "3", "2", "0", "0", "", ""]),
        ("pod:fused", ["1", "3", "1", "0", "1", "", ""]),
        ("pod:fused", ["0", "2", "1", "0", "0", "", ""]),
        ("pod:fused", ["0", "3", "1", "0", "1", "", ""]),
        ("pod:streams", ["1", "2", "1", "1", "1", "", ""]),
        ("pod", ["1", "2", "1", "1", "1", "", ""]),
        // The planner with the default tuning (its fused steps partitioned).
        ("pod", ["1", "", "", "1", "1", "", ""]),
    ];
    let runs = if quick { &all[..8] } else { all };
    for (i, &shape) in shapes.iter().enumerate() {
        for (j, &(spec, env)) in runs.iter().enumerate() {
            // Other head shapes: the partitioned kernels, pod_bf16,
            // podp_tma_bf16 and pod3_tma_bf16 only.
            if i > 0 && j > 6 {
                continue;
            }
            // Quick (compute-sanitizer): 300-token prompts, still several
            // query and key tiles; else a 1100-token one for the first shape.
            let steps = pod_steps(if i == 0 && j < 8 && !quick { 1100 } else { 300 });
            let steps: Vec<&[(u64, usize, usize)]> = steps.iter().map(|s| s.as_slice()).collect();
            // (policy, blocks per SM, resident prefill blocks, pipelined
            // prefill, TMA, partitioned: decode-first SMs, the plain prefill
            // kernel, which the partitioned kernel's prefill role follows:
            // "wsp", "slim" (WspSlim) or the default)
            let mut tuning = vpod_attention::PodTuning {
                policy: if env[0] == "0" {
                    vpod_attention::PodPolicy::Ticket
                } else {
                    vpod_attention::PodPolicy::Resident
                },
                blocks_per_sm: env[1].parse().ok(),
                resident_prefill: env[2].parse().ok(),
                pipelined_prefill: env[3] != "0",
                tma_prefill: env[4] != "0",
                ..Default::default()
            };
            if !env[5].is_empty() {
                tuning.partitioned = true;
                tuning.decode_sms = env[5].parse().ok();
            }
            // The partitioned kernel with one decode-first SM and the 1:1
            // pipelined TMA kernel (podp_tma_bf16) also take their prefill
            // items in L2 sections of one KV head (a 1-byte budget).
            let l2_budget = match j {
                1 | 5 => 1,
                _ => vpod_attention::PREFILL_L2_BUDGET,
            };
            let prefill_kernel = match env[6] {
                "slim" => vpod_attention::PrefillKernel::WspSlim,
                "wsp" => vpod_attention::PrefillKernel::Wsp,
                _ => vpod_attention::PrefillKernel::default(),
            };
            let opts = vpod_attention::BackendOptions {
                max_seqs: 14,
                pod_tuning: tuning,
                prefill_kernel,
                prefill_l2_budget: l2_budget,
                ..Default::default()
            };
            let label = format!(
                "policy {}, {} blocks per SM, {} resident prefill, pipelined prefill {}, TMA {}, decode-first SMs '{}', prefill {}, L2 budget {l2_budget}",
                env[0],
                env[1],
                env[2],
                env[3],
                env[4],
                env[5],
                prefill_kernel.symbol()
            );
            // The partitioned entries must have run pod_wsd_bf16 (pod_wsds_bf16 beside the slim tile).
            let wsd = match prefill_kernel {
                vpod_attention::PrefillKernel::WspSlim => "pod_wsds_bf16",
                _ => "pod_wsd_bf16",
            };
            let kernel = (!env[5].is_empty()).then_some(wsd);
            check_against_twin_ramp(spec, shape, &opts, &steps, true, &label, 0.0, kernel);
        }
    }
}

/// The slim kernels' premise: a `slot_prefill_wsps_bf16` block (384
/// threads at its launch registers) and a slim decode block
/// (`slot_decode_slim_bf16` or `slot_decode_slimr_bf16`, 128 threads) fit
/// one SM together. Registers are allocated per SM
/// sub-partition (4 on Hopper, 16 K each; warp w on sub-partition w % 4), so
/// the test is per sub-partition: the prefill puts 3 warps on each (a producer
/// warp at 24 after setmaxnreg, two consumer warps at 192: as many as its 136
/// at launch), the decode one warp on each. 16384 - 3 x 136 x 32 = 3328 =
/// 104 x 32: the decode (transposed products) is built at 104 a thread.
#[test]
fn slim_kernels_share_an_sm() {
    use candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute as A;
    let Device::Cuda(dev) = gpu() else { unreachable!() };
    let func = |name: &str| vpod_attention::ops::cuda::function(&dev, name).unwrap();
    let regs = |name: &str| func(name).num_regs().unwrap() as usize;
    // Static shared memory (mbarriers, flags) on top of the dynamic.
    let static_smem = |name: &str| func(name).shared_size_bytes().unwrap() as usize;
    let attr = |a: A| dev.cuda_stream().context().attribute(a).unwrap() as usize;
    let pre = regs("slot_prefill_wsps_bf16");
    // setmaxnreg's pool is exactly balanced at 136 ((136 - 24) x 128 = (192 - 136) x 256).
    assert_eq!(pre, 136, "slot_prefill_wsps_bf16's launch registers");
    // Registers per warp are allocated in units of 256, per sub-partition.
    let warp_regs = |r: usize| (r * 32).div_ceil(256) * 256;
    let part = attr(A::CU_DEVICE_ATTRIBUTE_MAX_REGISTERS_PER_MULTIPROCESSOR) / 4;
    let per_sm = attr(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR);
    for kind in vpod_attention::SlimDecode::ALL {
        let name = kind.symbol();
        let dec = regs(name);
        let used = 3 * warp_regs(pre) + warp_regs(dec);
        assert!(
            used <= part,
            "registers of one sub-partition: 3 prefill warps at {pre} + a {name} warp at {dec} = {used} > {part}"
        );
        // Shared memory: the ring (Q + 2 stages of K and V), the decode's
        // 64 KiB (2 stages of 64 keys, or 4 slots of 16 rows a warp), each
        // kernel's static shared memory and each block's reserved 1 KiB.
        let smem = (128 * 256 + 2 * 2 * 128 * 256 + 1024)
            + 2 * 2 * 64 * 256
            + static_smem("slot_prefill_wsps_bf16")
            + static_smem(name)
            + 2 * 1024;
        assert!(smem <= per_sm, "shared memory beside {name}: {smem} > {per_sm}");
    }
}

/// The two-stream path with the slim prefill and decode kernels
/// (`slot_prefill_wsps_bf16` beside `slot_decode_slim_bf16` or
/// `slot_decode_slimr_bf16`, sharing SMs) against the CPU twin, GQA 4/7/8,
/// on the POD tests' hybrid steps.
#[test]
fn pod_streams_slim_matches_cpu_twin() {
    let (quick, shapes) = twin_shapes();
    for slim_decode in vpod_attention::SlimDecode::ALL {
        for (i, &shape) in shapes.iter().enumerate() {
            // A 1100-token prompt for the first shape (as the POD twin), 300 for the others.
            let steps = pod_steps(if i == 0 && !quick { 1100 } else { 300 });
            let steps: Vec<&[(u64, usize, usize)]> = steps.iter().map(|s| s.as_slice()).collect();
            let opts = vpod_attention::BackendOptions {
                max_seqs: 14,
                prefill_kernel: vpod_attention::PrefillKernel::WspSlim,
                pod_tuning: vpod_attention::PodTuning {
                    slim_decode,
                    ..Default::default()
                },
                ..Default::default()
            };
            // The steps must have run the slim pair (not a fallback).
            let kernel = format!("prefill slot_prefill_wsps_bf16, decode {}", slim_decode.symbol());
            check_against_twin_ramp(
                "pod:streams",
                shape,
                &opts,
                &steps,
                true,
                &format!("slim prefill and decode ({})", slim_decode.symbol()),
                0.0,
                Some(&kernel),
            );
        }
    }
}

/// The planner with [`vpod_attention::PodTuning::slim_streams`]: hybrid
/// steps of 8 decodes of ~1500 keys beside a 2048-token prompt chunk, then
/// a 600-token one over it (the decode half 7-22 % of the step by the
/// planner's prediction: its serial or two-stream verdict) run as the slim
/// pair on two streams, against the CPU twin, GQA 4/7/8, with either slim
/// decode. The decodes' splits take 3-6 64-key tiles each, so
/// `slot_decode_slim_bf16`'s 2-stage ring and `slot_decode_slimr_bf16`'s
/// 4-slot rings a warp (2 tiles) wrap.
#[test]
fn pod_planner_slim_pair_matches_cpu_twin() {
    let (_, shapes) = twin_shapes();
    let prompts: Vec<(u64, usize, usize)> = (1..=8u64).map(|s| (s, 0, 1490 + s as usize)).collect();
    let decodes = |extra: usize| (1..=8u64).map(move |s| (s, 1490 + s as usize + extra, 1));
    let mut s1: Vec<(u64, usize, usize)> = decodes(0).collect();
    s1.push((10, 0, 2048));
    let mut s2: Vec<(u64, usize, usize)> = decodes(1).collect();
    s2.push((10, 2048, 600));
    let steps: &[&[(u64, usize, usize)]] = &[&prompts, &s1, &s2];
    for slim_decode in vpod_attention::SlimDecode::ALL {
        let opts = vpod_attention::BackendOptions {
            max_seqs: 14,
            pod_tuning: vpod_attention::PodTuning {
                slim_streams: true,
                slim_decode,
                ..Default::default()
            },
            ..Default::default()
        };
        for &shape in shapes {
            // Every hybrid step must have run the slim pair (the record names both).
            let kernel = format!("prefill slot_prefill_wsps_bf16, decode {}", slim_decode.symbol());
            check_against_twin_ramp(
                "pod",
                shape,
                &opts,
                steps,
                true,
                &format!("planner, slim pair ({})", slim_decode.symbol()),
                0.0,
                Some(&kernel),
            );
        }
    }
}

/// The `paged` backend on the GPU (paged K/V write, paged prefill, vLLM
/// v0.2.7's decode v1 and v2 + reduce) against its CPU twin over the
/// batch-spec table with scrambled block tables, block sizes 16 to 128,
/// GQA 4, 7 and 8 (v2 for the decodes past 512 tokens, v1 below).
#[test]
fn paged_gpu_matches_cpu_twin() {
    let (quick, shapes) = twin_shapes();
    for &shape in shapes {
        // Every block size for Llama-3-8B heads; the smallest and largest for the others.
        let blocks: &[usize] = if quick || shape != (32, 8) {
            &[16, 128]
        } else {
            &[16, 32, 64, 128]
        };
        for &bs in blocks {
            let opts = vpod_attention::BackendOptions {
                block_size: bs,
                max_seqs: 24,
                ..Default::default()
            };
            let label = format!("block {bs}");
            check_against_twin("paged", shape, &opts, TWIN_STEPS, true, &label);
        }
    }
}

/// The VMM cache refuses a page size the GPU cannot map, and tears down cleanly.
#[test]
fn vmm_cache_bad_page_and_teardown() {
    use vpod_kvcache::{KvManager, Mapping, VirtualCache, VirtualConfig};
    let Device::Cuda(dev) = gpu() else { unreachable!() };
    let ctx = dev.cuda_stream().context().clone();
    let cfg = VirtualConfig {
        num_layers: 4,
        kv_heads: 8,
        head_dim: 128,
        elem_bytes: 2,
        max_seqs: 4,
        max_len: 8192,
        page_size: 64 << 10,
        budget_bytes: 256 << 20,
        megacache: false,
        mapping: Mapping::Overlapped,
    };
    let e = VirtualCache::on_cuda(cfg, ctx.clone()).unwrap_err().to_string();
    assert!(e.contains("granularity"), "{e}");
    for round in 0..3 {
        let mut c = VirtualCache::on_cuda(
            VirtualConfig {
                page_size: 2 << 20,
                ..cfg
            },
            ctx.clone(),
        )
        .unwrap();
        // 256 MiB over 8 regions of 2 MiB pages: 16 page groups of 1024 tokens.
        assert_eq!(c.total_tokens(), 16 * 1024);
        c.admit(1, 5000).unwrap();
        c.admit(2, 3000).unwrap();
        c.map_ahead(2, 4097).unwrap();
        c.release(1);
        c.admit(3, 8192).unwrap(); // best fit: slot 1's 5 pages, plus reclaim
        c.fence().unwrap();
        assert!(!c.can_admit(8192, 0));
        assert!(
            c.admit(4, 8192).is_err(),
            "admission control refuses, nothing is mapped"
        );
        println!(
            "VMM round {round}: mapped {} unmapped {} page groups",
            c.mapped_total, c.unmapped_total
        );
    }
}

/// Requests of pseudo-random prompts of `lens` tokens (ids within `vocab`),
/// request i generating `max_tokens[i]` tokens past any EOS.
fn pseudo_requests(vocab: usize, lens: &[usize], max_tokens: &[usize]) -> Vec<vpod_cli::engine::Request> {
    lens.iter()
        .zip(max_tokens)
        .enumerate()
        .map(|(i, (&len, &max))| vpod_cli::engine::Request {
            prompt: (0..len)
                .map(|t| 1 + ((t * 2654435761usize + i * 977) % (vocab - 1)) as u32)
                .collect(),
            max_tokens: max,
            sampling: vpod_cli::sampler::SamplingParams {
                ignore_eos: true,
                ..Default::default()
            },
            arrival_ms: 0.0,
        })
        .collect()
}

/// CUDA graphs (issue 22): decode steps replayed from graphs give the eager
/// steps' greedy tokens on every backend, with padded buckets (5 running
/// sequences in the bucket of 6, then fewer as they finish), contexts that
/// cross the static plans' keys (decode splits, paged max context), and
/// graphs that were captured and replayed (none failed).
#[test]
fn cuda_graphs_match_eager_greedy_tokens() {
    use vpod_cli::scheduler::{Policy, SchedulerConfig};
    let dev = gpu();
    // VPOD_QUICK (the compute-sanitizer runs): one fixture, two backends.
    let quick = std::env::var_os("VPOD_QUICK").is_some();
    let backends: &[&str] = if quick {
        &["vattention", "paged:16"]
    } else {
        &["vattention", "paged:16", "paged:128", "pod"]
    };
    for name in &FIXTURES[..if quick { 1 } else { FIXTURES.len() }] {
        let model = bf16_fixture(name, &dev);
        let vocab = model.config.vocab_size;
        let reqs = pseudo_requests(vocab, &[3, 40, 130, 300, 17], &[70, 24, 90, 40, 9]);
        let sched = SchedulerConfig {
            policy: Policy::PrefillFirst,
            chunk_size: 256,
            max_seqs: 6,
        };
        for &backend in backends {
            let run = |graphs: bool| {
                let opts = vpod_attention::BackendOptions {
                    max_seqs: 6,
                    cuda_graphs: graphs,
                    ..Default::default()
                };
                let mut e = Engine::with_options(model.clone(), backend, &opts).unwrap();
                let out = e.run_batch(&reqs, sched, &mut |_, _| Ok(())).unwrap();
                (out, e.graph_captures())
            };
            let (eager, none) = run(false);
            let (graphed, captures) = run(true);
            assert!(
                none.is_empty(),
                "{backend}: graphs captured with --cuda-graphs off"
            );
            let replayed = graphed
                .steps
                .iter()
                .filter(|s| s.cuda_graph.as_ref().is_some_and(|g| g.replayed))
                .count();
            let failed: Vec<_> = graphed
                .steps
                .iter()
                .filter_map(|s| s.cuda_graph.as_ref())
                .filter(|g| g.note.contains("failed"))
                .collect();
            println!(
                "GRAPHS {name} {backend}: {} steps, {replayed} replayed, {} captures {:?}",
                graphed.steps.len(),
                captures.len(),
                captures
                    .iter()
                    .map(|c| format!(
                        "{} {} {:.1} ms {} nodes {} pdl edges",
                        c.rows, c.key, c.capture_ms, c.nodes, c.pdl_edges
                    ))
                    .collect::<Vec<_>>()
            );
            assert!(failed.is_empty(), "{name} {backend}: {failed:?}");
            assert!(
                replayed > 20 && captures.len() >= 2,
                "{name} {backend}: {replayed} replays"
            );
            for (i, (a, b)) in eager.requests.iter().zip(&graphed.requests).enumerate() {
                assert_eq!(
                    a.tokens, b.tokens,
                    "{name} {backend}: request {i} differs with graphs"
                );
            }
        }
    }
}

/// Tensor parallelism on GPUs (issue 23): each fixture whose heads split
/// over N ranks, sharded over cuda:0 .. cuda:N-1 in bf16 (NCCL in `nccl`
/// builds), gives the greedy tokens of the unsharded model on cuda:0, for
/// `vattention`, `pod` and `paged:16`, through chunked-prefill hybrid
/// steps; where they part (the ranks' partial sums round to bf16 before
/// the all-reduce adds them, so a near tie may flip), the teacher-forced
/// logits of TP-1's sequences must agree under `cli compare`'s rule (bf16
/// tolerance, the same top-1 at 90 % of positions), and the test says so.
/// Needs `VPOD_TP_GPUS=N` (N >= 2 GPUs; `gpu-run.sh tp` sets it):
/// without it the test says so and passes, as on the one-GPU machine.
#[test]
fn tensor_parallel_greedy_tokens_on_gpus() {
    use std::sync::Arc;
    use vpod_cli::scheduler::{Policy, SchedulerConfig};
    let Some(world) = std::env::var("VPOD_TP_GPUS").ok() else {
        println!("skipped: set VPOD_TP_GPUS=N (N >= 2 GPUs) to run tensor parallelism on GPUs");
        return;
    };
    let world: usize = world.parse().expect("VPOD_TP_GPUS: a number of GPUs");
    assert!(
        world >= 2,
        "VPOD_TP_GPUS={world}: tensor parallelism needs 2 GPUs or more"
    );
    let count = candle_core::cuda_backend::cudarc::driver::CudaContext::device_count()
        .expect("the CUDA device count") as usize;
    assert!(
        count >= world,
        "VPOD_TP_GPUS={world} but this machine has {count} GPUs"
    );
    let devices: Vec<Device> = (0..world)
        .map(|i| Device::new_cuda(i).expect("a CUDA device"))
        .collect();
    let mut checked = 0;
    for name in FIXTURES {
        let files = fetch_model_files(
            &ModelSource::Local(fixture(name)),
            &offline(std::path::Path::new("/none")),
        )
        .unwrap();
        let cfg = vpod_models::LlamaConfig::from_file(&files.config).unwrap();
        if !vpod_models::tp::Shard::unsupported_reasons(&cfg, world).is_empty() {
            println!("{name}: heads do not split over {world} ranks, not run");
            continue;
        }
        let whole = bf16_fixture(name, &devices[0]);
        let comms = vpod_cli::rank_comms(&devices).unwrap();
        let mut shards: Vec<vpod_models::LoadedModel> = devices
            .iter()
            .zip(comms)
            .map(|(d, c)| {
                vpod_models::load_model_shard(files.clone(), DType::BF16, d, Some(c), &mut |_, _| {}).unwrap()
            })
            .collect();
        let rank0 = Arc::new(shards.remove(0));
        let ranks: Vec<Arc<vpod_models::Llama>> = shards.into_iter().map(|m| Arc::new(m.model)).collect();
        let vocab = cfg.vocab_size;
        let reqs = pseudo_requests(vocab, &[5, 70, 130, 33], &[40, 24, 32, 48]);
        // Chunks of 32 tokens: hybrid steps (a chunk beside decodes) throughout.
        let sched = SchedulerConfig {
            policy: Policy::Hybrid { one_prefill: false },
            chunk_size: 32,
            max_seqs: 4,
        };
        for backend in ["vattention", "pod", "paged:16"] {
            let opts = vpod_attention::BackendOptions {
                max_seqs: 4,
                ..Default::default()
            };
            let tokens = |e: &mut Engine| -> Vec<Vec<u32>> {
                let out = e.run_batch(&reqs, sched, &mut |_, _| Ok(())).unwrap();
                out.requests.into_iter().map(|r| r.tokens).collect()
            };
            let mut e1 = Engine::with_options(whole.clone(), backend, &opts).unwrap();
            let mut etp = Engine::with_tensor_parallel(rank0.clone(), ranks.clone(), backend, &opts).unwrap();
            let (one, sharded) = (tokens(&mut e1), tokens(&mut etp));
            let parted = one
                .iter()
                .zip(&sharded)
                .enumerate()
                .find_map(|(i, (a, b))| (a != b).then(|| (i, a.iter().zip(b).position(|(x, y)| x != y))));
            match parted {
                None => println!(
                    "{name} {backend}: TP-{world} greedy tokens equal TP-1's ({} requests)",
                    reqs.len()
                ),
                Some((i, at)) => {
                    let seqs: Vec<Vec<u32>> = reqs
                        .iter()
                        .zip(&one)
                        .map(|(r, t)| [r.prompt.clone(), t.clone()].concat())
                        .collect();
                    let lens: Vec<usize> = reqs.iter().map(|r| r.prompt.len()).collect();
                    let want = e1.forced_logits(&seqs, &lens, 16).unwrap();
                    let got = etp.forced_logits(&seqs, &lens, 16).unwrap();
                    let (worst, top1) = vpod_cli::compare::logit_agreement(&want, &got).unwrap();
                    let tolerance = vpod_cli::compare::logit_tolerance(DType::BF16);
                    assert!(
                        worst <= tolerance && top1 >= vpod_cli::compare::MIN_TOP1,
                        "{name} {backend} TP-{world}: request {i}'s greedy tokens part from TP-1's at token {at:?}, and \
                         the teacher-forced logits differ by {:.2} % of their range (tolerance {:.2} %), the same top-1 \
                         at {:.1} % of positions",
                        worst * 100.0,
                        tolerance * 100.0,
                        top1 * 100.0
                    );
                    println!(
                        "{name} {backend}: TP-{world} greedy tokens part from TP-1's at request {i} token {at:?} (a near \
                         tie); teacher-forced logits agree: {:.2} % of their range, the same top-1 at {:.1} %",
                        worst * 100.0,
                        top1 * 100.0
                    );
                }
            }
            checked += 1;
        }
    }
    assert!(checked > 0, "no fixture splits over {world} ranks");
}
