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

/// The online verbs: requests added while others run, abort (KV freed at
/// once, wherever the request is), stats, and what `add_request` refuses.
mod online {
    use vpod_attention::BackendOptions;
    use vpod_cli::engine::{Engine, EngineError, FinishReason, NewRequest, SchedulerConfig};
    use vpod_cli::sampler::SamplingParams;

    use crate::common::*;

    fn engine(backend: &str) -> Engine {
        let opts = BackendOptions {
            max_seqs: 4,
            ..Default::default()
        };
        let mut e =
            Engine::with_options(load_dir(&fixture("tiny-llama3-gqa4")).unwrap(), backend, &opts).unwrap();
        e.set_scheduler(SchedulerConfig {
            max_seqs: 4,
            chunk_size: 32,
            ..Default::default()
        })
        .unwrap();
        e
    }

    fn request(len: usize, max_tokens: usize) -> NewRequest {
        NewRequest::new((1..=len as u32).collect(), max_tokens, SamplingParams::default())
    }

    #[test]
    fn requests_join_a_running_batch_and_match_running_alone() {
        for backend in ["reference", "paged:16", "vattention"] {
            let mut alone = engine(backend);
            let want = alone
                .generate(
                    &(1..=20).collect::<Vec<u32>>(),
                    10,
                    SamplingParams::default(),
                    &mut |_| Ok(()),
                )
                .unwrap()
                .tokens;
            let mut e = engine(backend);
            let a = e.add_request(request(20, 10)).unwrap();
            let mut got = vec![];
            let mut b = None;
            while e.has_unfinished() {
                let out = e.step().unwrap();
                got.extend(out.tokens.iter().filter(|t| t.id == a).map(|t| t.token));
                // A second request arrives while the first decodes.
                if b.is_none() && !got.is_empty() {
                    b = Some(e.add_request(request(37, 6)).unwrap());
                }
                for f in &out.finished {
                    assert_eq!(f.output.finish_reason, FinishReason::Length);
                }
            }
            assert_eq!(got, want, "{backend}");
            assert_eq!(e.stats().running + e.stats().waiting, 0);
        }
    }

    #[test]
    fn abort_frees_the_kv_at_once() {
        let mut e = engine("vattention");
        let a = e.add_request(request(40, 50)).unwrap();
        let b = e.add_request(request(10, 50)).unwrap();
        for _ in 0..4 {
            e.step().unwrap();
        }
        let before = e.stats();
        assert_eq!(before.running, 2);
        assert!(before.kv_used_tokens.unwrap() > 0);
        let out = e.abort(a).unwrap();
        assert_eq!(out.finish_reason, FinishReason::Aborted);
        assert!(!out.tokens.is_empty());
        let after = e.stats();
        assert_eq!(after.running, 1);
        assert!(after.kv_used_tokens.unwrap() < before.kv_used_tokens.unwrap());
        assert!(e.abort(a).is_none(), "a second abort finds nothing");
        // A waiting request can be aborted too.
        let c = e.add_request(request(10, 5)).unwrap();
        assert_eq!(e.abort(c).unwrap().tokens.len(), 0);
        e.abort(b).unwrap();
        assert_eq!(e.stats().kv_used_tokens, Some(0));
        assert!(!e.has_unfinished());
        assert!(e.step().unwrap().record.is_none(), "nothing to run");
    }

    #[test]
    fn add_request_refuses_what_cannot_run() {
        let mut e = engine("vattention");
        let vocab = e.model.config.vocab_size as u32;
        let bad = |e: &mut Engine, r: NewRequest| e.add_request(r).unwrap_err();
        assert!(matches!(bad(&mut e, request(0, 4)), EngineError::EmptyPrompt));
        let too_long = request(e.max_seq_len() + 1, 4);
        assert!(matches!(bad(&mut e, too_long), EngineError::PromptTooLong { .. }));
        let out_of_vocab = NewRequest::new(vec![1, vocab], 4, SamplingParams::default());
        assert!(matches!(bad(&mut e, out_of_vocab), EngineError::BadToken { .. }));
        for (t, p) in [(f32::NAN, 1.0), (-1.0, 1.0), (1.0, 0.0), (f32::INFINITY, 1.0)] {
            let mut r = request(4, 4);
            r.sampling.temperature = t;
            r.sampling.top_p = p;
            let err = bad(&mut e, r).to_string();
            assert!(err.contains("bad sampling parameters"), "{err}");
        }
        // The scheduler cannot change under running requests.
        e.add_request(request(4, 4)).unwrap();
        assert!(matches!(
            e.set_scheduler(SchedulerConfig::default()),
            Err(EngineError::Busy(1))
        ));
    }

    #[test]
    fn warm_up_leaves_nothing_behind() {
        let mut e = engine("vattention");
        e.warm_up().unwrap();
        assert_eq!(e.stats().kv_used_tokens, Some(0));
        assert!(!e.has_unfinished());
        e.add_request(request(4, 4)).unwrap();
        assert!(matches!(e.warm_up(), Err(EngineError::Busy(1))));
    }

    /// A model whose logits are NaN: the request ends with an error, nothing
    /// is sampled, and the engine goes on.
    #[test]
    fn non_finite_logits_end_the_request_with_an_error() {
        let tmp = scratch_copy("tiny-llama3-gqa4");
        let path = tmp.path().join("model.safetensors");
        let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
        let norm = tensors["model.norm.weight"].clone();
        let nan = (norm.ones_like().unwrap() * f64::NAN)
            .unwrap()
            .to_dtype(norm.dtype())
            .unwrap();
        tensors.insert("model.norm.weight".into(), nan);
        candle_core::safetensors::save(&tensors, &path).unwrap();
        for sampling in [
            SamplingParams::default(),
            SamplingParams {
                temperature: 0.8,
                ..Default::default()
            },
        ] {
            let mut e = Engine::new(load_dir(tmp.path()).unwrap(), "vattention").unwrap();
            let id = e
                .add_request(NewRequest::new(vec![1, 2, 3], 5, sampling))
                .unwrap();
            let out = e.step().unwrap();
            assert!(out.tokens.is_empty());
            assert_eq!(out.finished.len(), 1);
            assert_eq!(out.finished[0].id, id);
            assert_eq!(out.finished[0].output.finish_reason, FinishReason::Error);
            assert!(
                out.finished[0]
                    .output
                    .error
                    .as_deref()
                    .unwrap()
                    .contains("not finite")
            );
            assert_eq!(e.stats().kv_used_tokens, Some(0));
        }
    }
}
