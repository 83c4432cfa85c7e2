//! The engine's packed batches: a hybrid step (one decode + one prefill
//! chunk packed together) computes what the sequences compute alone; the
//! context limit ends generation cleanly.

use vpod_attention::{LogitsAt, SeqChunk};
use vpod_cli::engine::FinishReason;
use vpod_cli::sampler::SamplingParams;

use crate::common::*;

#[test]
fn hybrid_packed_batch_equals_separate_runs() {
    for name in FIXTURES {
        let mut e = engine(name);
        let a: Vec<u32> = (3..15).collect(); // sequence A: 11 tokens of prompt, then 1 decode token
        let b: Vec<u32> = (20..27).collect(); // sequence B: 7-token prompt

        // Alone: A prefills 11, decodes its 12th; B prefills 7.
        e.forward(
            vec![SeqChunk {
                seq_id: 1,
                context_len: 0,
                query_len: 11,
            }],
            &a[..11],
            LogitsAt::LastToken,
        )
        .unwrap();
        let a_alone = e
            .forward(
                vec![SeqChunk {
                    seq_id: 1,
                    context_len: 11,
                    query_len: 1,
                }],
                &a[11..],
                LogitsAt::LastToken,
            )
            .unwrap();
        let b_alone = e
            .forward(
                vec![SeqChunk {
                    seq_id: 2,
                    context_len: 0,
                    query_len: 7,
                }],
                &b,
                LogitsAt::LastToken,
            )
            .unwrap();

        // Together: A's prefill alone, then A's decode and B's whole prompt in one packed step.
        e.forward(
            vec![SeqChunk {
                seq_id: 3,
                context_len: 0,
                query_len: 11,
            }],
            &a[..11],
            LogitsAt::LastToken,
        )
        .unwrap();
        let packed_tokens: Vec<u32> = a[11..].iter().chain(&b).copied().collect();
        let both = e
            .forward(
                vec![
                    SeqChunk {
                        seq_id: 3,
                        context_len: 11,
                        query_len: 1,
                    },
                    SeqChunk {
                        seq_id: 4,
                        context_len: 0,
                        query_len: 7,
                    },
                ],
                &packed_tokens,
                LogitsAt::LastToken,
            )
            .unwrap();
        assert_eq!(both.dims(), &[2, e.model.config.vocab_size]);
        assert!(
            max_abs_diff(&both.get(0).unwrap(), &a_alone.get(0).unwrap()) < 1e-5,
            "{name}"
        );
        assert!(
            max_abs_diff(&both.get(1).unwrap(), &b_alone.get(0).unwrap()) < 1e-5,
            "{name}"
        );
        for s in 1..=4 {
            e.release(s);
        }
    }
}

#[test]
fn generation_stops_when_the_context_is_full() {
    let tmp = scratch_copy("tiny-llama3-gqa4");
    let cfg_path = tmp.path().join("config.json");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    std::fs::write(
        &cfg_path,
        cfg.replace(
            "\"max_position_embeddings\": 512",
            "\"max_position_embeddings\": 24",
        ),
    )
    .unwrap();
    let model = load_dir(tmp.path()).unwrap();
    let mut e = vpod_cli::engine::Engine::new(model, "reference").unwrap();
    let prompt: Vec<u32> = (1..20).collect();
    let g = e
        .generate(&prompt, 100, SamplingParams::default(), &mut |_| Ok(()))
        .unwrap();
    assert_eq!(g.finish_reason, FinishReason::ContextFull);
    // The last token fed sits at position 23; the one it predicts is returned but never fed.
    assert_eq!(prompt.len() + g.tokens.len(), 25);
}

#[test]
fn sampling_is_reproducible_from_the_seed() {
    let mut e = engine("tiny-yi-gqa7");
    let p = SamplingParams {
        temperature: 1.0,
        top_p: 0.95,
        top_k: 50,
        seed: 3,
        ..Default::default()
    };
    let prompt = reference("tiny-yi-gqa7").prompt_ids;
    let a = e.generate(&prompt, 16, p, &mut |_| Ok(())).unwrap().tokens;
    let b = e.generate(&prompt, 16, p, &mut |_| Ok(())).unwrap().tokens;
    assert_eq!(a, b);
    let c = e
        .generate(&prompt, 16, SamplingParams { seed: 4, ..p }, &mut |_| Ok(()))
        .unwrap()
        .tokens;
    assert_ne!(a, c);
}

mod batch {
    use vpod_attention::BackendOptions;
    use vpod_cli::engine::{Engine, Request};
    use vpod_cli::sampler::SamplingParams;
    use vpod_cli::scheduler::{Policy, SchedulerConfig};

    use crate::common::*;

    fn requests(n: usize, max_tokens: usize) -> Vec<Request> {
        (0..n)
            .map(|i| Request {
                prompt: (0..(3 + (i * 7) % 40))
                    .map(|t| 1 + ((t * 31 + i * 17) % 300) as u32)
                    .collect(),
                max_tokens: max_tokens - i % 3,
                sampling: SamplingParams::default(),
                arrival_ms: 0.0,
            })
            .collect()
    }

    /// Greedy tokens of a request are the same alone or in a batch of 8, for
    /// every backend and scheduler (chunked prefills at small budgets included).
    #[test]
    fn batched_equals_alone_for_every_backend_and_scheduler() {
        let name = "tiny-yi-gqa7";
        let reqs = requests(8, 12);
        let mut alone = Engine::new(load_dir(&fixture(name)).unwrap(), "reference").unwrap();
        let want: Vec<Vec<u32>> = reqs
            .iter()
            .map(|r| {
                alone
                    .run_batch(std::slice::from_ref(r), Default::default(), &mut |_, _| Ok(()))
                    .unwrap()
                    .requests[0]
                    .tokens
                    .clone()
            })
            .collect();
        let policies = [
            SchedulerConfig {
                policy: Policy::PrefillFirst,
                chunk_size: 64,
                max_seqs: 8,
            },
            SchedulerConfig {
                policy: Policy::Hybrid { one_prefill: false },
                chunk_size: 16,
                max_seqs: 8,
            },
            SchedulerConfig {
                policy: Policy::Hybrid { one_prefill: true },
                chunk_size: 24,
                max_seqs: 3,
            },
        ];
        for backend in ["reference", "paged:16", "vattention", "pod"] {
            for cfg in policies {
                let mut e = Engine::new(load_dir(&fixture(name)).unwrap(), backend).unwrap();
                let out = e.run_batch(&reqs, cfg, &mut |_, _| Ok(())).unwrap();
                for (i, r) in out.requests.iter().enumerate() {
                    assert_eq!(r.tokens, want[i], "{backend} {cfg:?} request {i}");
                }
                let budget_ok = out.steps.iter().all(|s| match cfg.policy {
                    Policy::Hybrid { .. } => s.decodes + s.prefill_tokens <= cfg.chunk_size,
                    Policy::PrefillFirst => s.decodes == 0 || s.prefill_tokens == 0,
                });
                assert!(budget_ok, "{backend} {cfg:?}: a step broke the policy");
                if let Policy::Hybrid { one_prefill: true } = cfg.policy {
                    assert!(out.steps.iter().all(|s| s.prefill_chunks <= 1));
                }
            }
        }
    }

    /// 200 requests under a KV budget so small that preemption (by
    /// recompute) happens often all complete with the ample budget's output.
    #[test]
    fn preemption_keeps_outputs() {
        let name = "tiny-llama3-gqa4";
        let reqs = requests(200, 20);
        let cfg = SchedulerConfig {
            policy: Policy::Hybrid { one_prefill: false },
            chunk_size: 64,
            max_seqs: 8,
        };
        let mut ample = Engine::new(load_dir(&fixture(name)).unwrap(), "paged:16").unwrap();
        let want = ample.run_batch(&reqs, cfg, &mut |_, _| Ok(())).unwrap();
        // 2 layers x 1 KV head x 128 dims x 4 B x 2 (K, V) = 2 KiB a token: 8 blocks of 16 tokens.
        let opts = BackendOptions {
            kv_memory: Some(8 * 16 * 2048),
            ..Default::default()
        };
        let mut tight = Engine::with_options(load_dir(&fixture(name)).unwrap(), "paged:16", &opts).unwrap();
        let got = tight.run_batch(&reqs, cfg, &mut |_, _| Ok(())).unwrap();
        let preemptions: usize = got.requests.iter().map(|r| r.preemptions).sum();
        assert!(preemptions > 20, "only {preemptions} preemptions");
        for (i, (a, b)) in got.requests.iter().zip(&want.requests).enumerate() {
            assert_eq!(a.tokens, b.tokens, "request {i}");
        }
    }

    /// An error in the middle of a batch (here from the token callback)
    /// frees the KV of every sequence in flight: the engine runs on.
    #[test]
    fn an_error_mid_batch_frees_the_cache() {
        let opts = BackendOptions {
            kv_memory: Some(8 * 16 * 2048),
            ..Default::default()
        };
        let mut e =
            Engine::with_options(load_dir(&fixture("tiny-llama3-gqa4")).unwrap(), "paged:16", &opts).unwrap();
        let reqs = requests(6, 20);
        let mut n = 0;
        let failed = e.run_batch(&reqs, Default::default(), &mut |_, _| {
            n += 1;
            if n == 5 {
                Err(vpod_cli::engine::EngineError::EmptyPrompt)
            } else {
                Ok(())
            }
        });
        assert!(failed.is_err());
        let out = e
            .run_batch(&reqs, Default::default(), &mut |_, _| Ok(()))
            .unwrap();
        assert_eq!(out.requests.len(), 6);
    }

    #[test]
    fn a_kv_budget_too_small_for_one_request_is_refused_with_numbers() {
        let opts = BackendOptions {
            kv_memory: Some(2 * 16 * 2048),
            ..Default::default()
        };
        let mut e =
            Engine::with_options(load_dir(&fixture("tiny-llama3-gqa4")).unwrap(), "paged:16", &opts).unwrap();
        let err = e
            .run_batch(&requests(1, 60), Default::default(), &mut |_, _| Ok(()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("holds 32 tokens") && err.contains("needs"), "{err}");
    }
}
