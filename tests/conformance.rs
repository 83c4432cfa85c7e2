//! Backend conformance: every backend runs the same table of batch specs
//! (decode-only, prefill-only, decodes mixed with chunks at non-zero
//! offsets, long contexts; GQA groups 1, 4, 7, 8) and must match the
//! `reference` backend, with the paged blocks and virtual pages deliberately
//! shuffled beforehand. End to end on the fixtures: the same greedy tokens
//! and perplexity on every backend.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use vpod_attention::{
    AttentionBackend, AttnConfig, BackendOptions, BatchMeta, LogitsAt, SeqChunk, create_backend,
};
use vpod_cli::engine::Engine;
use vpod_cli::sampler::SamplingParams;

use crate::common::*;

const BACKENDS: &[&str] = &["paged:16", "paged:128", "vattention", "pod"];

/// A named list of steps; each step schedules (sequence, new tokens).
struct Spec {
    name: &'static str,
    steps: Vec<Vec<(u64, usize)>>,
}

fn specs() -> Vec<Spec> {
    let chunks = |seq: u64, total: usize, chunk: usize| -> Vec<Vec<(u64, usize)>> {
        (0..total)
            .step_by(chunk)
            .map(|s| vec![(seq, chunk.min(total - s))])
            .collect()
    };
    let mut long = chunks(1, 600, 256); // crosses vLLM's 512-token partition
    long.push(vec![(1, 1)]);
    long.push(vec![(1, 1), (2, 3)]);
    vec![
        Spec {
            name: "prefill-only",
            steps: vec![vec![(1, 37), (2, 5), (3, 1)]],
        },
        Spec {
            name: "decode-only",
            steps: vec![
                vec![(1, 20), (2, 33), (3, 2)],
                vec![(1, 1), (2, 1), (3, 1)],
                vec![(1, 1), (2, 1), (3, 1)],
            ],
        },
        Spec {
            name: "mixed decodes + chunks at offsets",
            steps: vec![
                vec![(1, 40), (2, 20)],
                vec![(1, 1), (2, 13), (3, 9)],
                vec![(3, 1), (2, 17), (1, 1), (4, 30)],
            ],
        },
        Spec {
            name: "long context",
            steps: long,
        },
    ]
}

/// Admits and frees throwaway sequences in a scrambled order so that the
/// real ones get non-contiguous, out-of-order blocks, slots and pages.
fn shuffle_cache(b: &mut dyn AttentionBackend) {
    let Some(kv) = b.kv_manager() else { return };
    for s in 0..6u64 {
        let _ = kv.admit(1000 + s, 1 + (s as usize * 37) % 90);
    }
    for s in [1003u64, 1000, 1005, 1001] {
        kv.release(s);
    }
}

fn run(
    backend: &mut dyn AttentionBackend,
    cfg: &AttnConfig,
    spec: &Spec,
    data: &[(Tensor, Tensor, Tensor)],
) -> Vec<Tensor> {
    let mut ctx: HashMap<u64, usize> = HashMap::new();
    let mut outs = Vec::new();
    for (step, (q, k, v)) in spec.steps.iter().zip(data) {
        let chunks: Vec<SeqChunk> = step
            .iter()
            .map(|&(seq, n)| SeqChunk {
                seq_id: seq,
                context_len: *ctx.get(&seq).unwrap_or(&0),
                query_len: n,
            })
            .collect();
        let meta = BatchMeta::new(chunks, LogitsAt::LastToken, &Device::Cpu).unwrap();
        for layer in 0..cfg.num_layers {
            outs.push(
                backend
                    .forward(
                        layer,
                        &q.get(layer).unwrap(),
                        &k.get(layer).unwrap(),
                        &v.get(layer).unwrap(),
                        &meta,
                    )
                    .unwrap(),
            );
        }
        for &(seq, n) in step {
            *ctx.entry(seq).or_default() += n;
        }
    }
    outs
}

#[test]
fn every_backend_matches_the_reference() {
    let dev = Device::Cpu;
    for (heads, kv_heads) in [(2, 2), (4, 1), (7, 1), (8, 1)] {
        let cfg = AttnConfig {
            num_layers: 2,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim: 16,
            max_seq_len: 700,
            dtype: DType::F32,
        };
        let opts = BackendOptions {
            page_size: 4096,
            kv_memory: Some(4 << 20),
            max_seqs: 12,
            ..Default::default()
        };
        for spec in specs() {
            // The same random q/k/v for every backend: per step [layers, T, heads, D].
            let data: Vec<_> = spec
                .steps
                .iter()
                .map(|step| {
                    let t: usize = step.iter().map(|s| s.1).sum();
                    let r = |h: usize| {
                        Tensor::randn(0f32, 1.0, (cfg.num_layers, t, h, cfg.head_dim), &dev).unwrap()
                    };
                    (r(heads), r(kv_heads), r(kv_heads))
                })
                .collect();
            let mut reference = create_backend("reference", &cfg, &dev, &opts).unwrap();
            let want = run(reference.as_mut(), &cfg, &spec, &data);
            for name in BACKENDS {
                let mut b = create_backend(name, &cfg, &dev, &opts).unwrap();
                shuffle_cache(b.as_mut());
                let got = run(b.as_mut(), &cfg, &spec, &data);
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    let d = max_abs_diff(g, w);
                    assert!(
                        d < 1e-5,
                        "{name}, GQA {heads}/{kv_heads}, {}: call {i} differs by {d}",
                        spec.name
                    );
                }
            }
        }
    }
}

#[test]
fn backends_agree_end_to_end_on_the_fixtures() {
    for name in FIXTURES {
        let r = reference(name);
        let text = std::fs::read_to_string(fixtures_dir().join(&r.ppl_file)).unwrap();
        let mut base: Option<(Vec<u32>, f64)> = None;
        for backend in ["reference", "paged:16", "paged:128", "vattention", "pod"] {
            let mut e = Engine::new(load_dir(&fixture(name)).unwrap(), backend).unwrap();
            let g = e
                .generate(&r.prompt_ids, 24, SamplingParams::default(), &mut |_| Ok(()))
                .unwrap();
            let ids = e.model.tokenizer().unwrap().encode_with_bos(&text).unwrap();
            let ppl = e.score(&ids, 64, &mut |_, _| {}).unwrap().ppl;
            match &base {
                None => {
                    assert_eq!(g.tokens, r.greedy_new_tokens, "{name} {backend}");
                    base = Some((g.tokens, ppl));
                }
                Some((tokens, p)) => {
                    assert_eq!(&g.tokens, tokens, "{name}: {backend} greedy tokens");
                    assert!((ppl - p).abs() / p < 1e-5, "{name}: {backend} ppl {ppl} vs {p}");
                }
            }
        }
    }
}
