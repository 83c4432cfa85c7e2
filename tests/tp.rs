//! Tensor parallelism's CPU twin (`vpod_models::tp`): N ranks as threads of
//! one process, each with its slices of the fixture's checkpoint (read from
//! the safetensors file, slices only), its own KV cache and attention
//! backend, exchanging partial sums through `LocalComm`'s in-memory
//! all-reduce; their logits equal the unsharded model's, over a prefill
//! and decode steps that read the KV cache back.

use std::sync::Arc;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use vpod_attention::{AttentionStep, BatchMeta, LogitsAt, SeqChunk, create_backend};
use vpod_models::tp::{Communicator, LocalComm, Shard};
use vpod_models::{Llama, LlamaConfig, ModelError, Weights};

use crate::common::{
    FIXTURES, cli_compare_memory, cpu_tp_engine, dir_files, fixture, max_abs_diff, reference,
};

/// The fixture's config and its (sharded) safetensors files.
fn checkpoint(name: &str) -> (LlamaConfig, Vec<std::path::PathBuf>) {
    let files = dir_files(&fixture(name)).unwrap();
    (LlamaConfig::from_file(&files.config).unwrap(), files.weights)
}

/// Logits `[tokens, vocab]` of `prompt` (one prefill of all but its last
/// 2 tokens, then one decode step each), from every rank of `comm` (its
/// `None`: the whole model on this thread), through backend `spec`.
fn run(
    name: &str,
    spec: &str,
    comm: Option<Arc<dyn Communicator>>,
    prompt: &[u32],
) -> vpod_models::Result<Tensor> {
    let (cfg, files) = checkpoint(name);
    let w = Weights::open(&files, DType::F32, &Device::Cpu)?;
    let model = Llama::load_shard(&cfg, &w, comm, &mut |_, _| {})?;
    let attn = model.attn_config(prompt.len() + 8);
    let mut backend = create_backend(spec, &attn, &Device::Cpu, &Default::default()).unwrap();
    let n = prompt.len() - 2;
    let mut rows = vec![];
    for (ctx, len) in [(0, n), (n, 1), (n + 1, 1)] {
        let chunk = SeqChunk {
            seq_id: 7,
            context_len: ctx,
            query_len: len,
        };
        let meta = BatchMeta::new(vec![chunk], LogitsAt::AllTokens, &Device::Cpu).unwrap();
        let mut step = AttentionStep::new(backend.as_mut(), &meta).unwrap();
        let tokens = Tensor::new(&prompt[ctx..ctx + len], &Device::Cpu)?;
        rows.push(model.forward(&tokens, &mut step)?);
    }
    Ok(Tensor::cat(&rows, 0)?)
}

/// The logits of `world` ranks (threads), each checked to be the same.
fn sharded(name: &str, spec: &str, world: usize, prompt: &[u32]) -> Tensor {
    let comms = LocalComm::group_with_timeout(world, Duration::from_secs(60));
    let outs: Vec<Tensor> = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .into_iter()
            .map(|c| {
                s.spawn(move || {
                    let comm: Arc<dyn Communicator> = Arc::new(c.clone());
                    run(name, spec, Some(comm), prompt).inspect_err(|e| c.abort(&e.to_string()))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
    });
    for (r, o) in outs.iter().enumerate().skip(1) {
        let d = max_abs_diff(o, &outs[0]);
        assert_eq!(
            d, 0.0,
            "{name} TP-{world}: rank {r}'s logits differ from rank 0's by {d}"
        );
    }
    outs.into_iter().next().unwrap()
}

/// Sharded == unsharded logits on every fixture (GQA 4/7/8) for the ranks
/// its heads divide (1, 2, 4, 7; a single KV head is replicated), through the
/// reference backend and the `vattention` backend's CPU twin.
#[test]
fn tensor_parallel_logits_equal_unsharded() {
    let mut checked = 0;
    for name in FIXTURES {
        let (cfg, _) = checkpoint(name);
        let prompt = reference(name).prompt_ids;
        for spec in ["reference", "vattention"] {
            let whole = run(name, spec, None, &prompt).unwrap();
            for world in [1, 2, 4, 7] {
                if !Shard::unsupported_reasons(&cfg, world).is_empty() {
                    continue;
                }
                let got = sharded(name, spec, world, &prompt);
                assert_eq!(got.dims(), whole.dims(), "{name} TP-{world} {spec}");
                let d = max_abs_diff(&got, &whole);
                println!("{name} {spec} TP-{world}: max |logit - unsharded| = {d:.2e}");
                assert!(
                    d < 1e-4,
                    "{name} {spec} TP-{world}: logits differ from unsharded by {d}"
                );
                checked += 1;
            }
        }
    }
    // GQA 4 and 8 at 1, 2, 4 ranks, GQA 7 (7 heads) at 1 and 7 ranks (a
    // vocabulary of 384 over 7: the last slice is shorter), two backends.
    assert_eq!(checked, 16);
}

/// A rank's slices hold only its share of the weights.
#[test]
fn tensor_parallel_ranks_hold_their_slices() {
    let name = "tiny-yi-gqa8";
    let (cfg, files) = checkpoint(name);
    let w = Weights::open(&files, DType::F32, &Device::Cpu).unwrap();
    let comms = LocalComm::group(4);
    let model = Llama::load_shard(&cfg, &w, Some(Arc::new(comms[1].clone())), &mut |_, _| {}).unwrap();
    let a = model.attn_config(64);
    assert_eq!((a.num_heads, a.num_kv_heads), (cfg.num_heads / 4, 1));
    let s = model.shard();
    assert_eq!((s.rank, s.world), (1, 4));
    assert_eq!(s.vocab(&cfg), 100..200);
    assert_eq!(s.ffn(&cfg), cfg.intermediate_size / 4..cfg.intermediate_size / 2);
}

/// Shapes that do not split get a clear error naming the numbers, never a
/// wrong model; a failing rank releases the others' collectives.
#[test]
fn tensor_parallel_refuses_what_does_not_split() {
    let (cfg, files) = checkpoint("tiny-yi-gqa7");
    let w = Weights::open(&files, DType::F32, &Device::Cpu).unwrap();
    let comms = LocalComm::group(2);
    let err = Llama::load_shard(&cfg, &w, Some(Arc::new(comms[0].clone())), &mut |_, _| {}).unwrap_err();
    assert!(matches!(err, ModelError::TensorParallel(_)), "{err}");
    assert!(
        err.to_string()
            .contains("7 attention heads do not split over 2 ranks"),
        "{err}"
    );
    assert!(Shard::new(2, 2).is_err() && Shard::new(0, 0).is_err());

    // Rank 1 fails before its first collective: rank 0's all-reduce errors out.
    let comms = LocalComm::group_with_timeout(2, Duration::from_secs(30));
    comms[1].abort("could not load its weights");
    let x = Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap();
    let e = comms[0].all_reduce_sum(&x).unwrap_err().to_string();
    assert!(e.contains("could not load its weights"), "{e}");
}

/// The in-memory collectives: sums in rank order, gathers along a dim.
#[test]
fn local_comm_collectives() {
    let comms = LocalComm::group(3);
    let outs: Vec<(Tensor, Tensor)> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let r = c.rank() as f32;
                    let x = Tensor::new(&[[r, 1.0]], &Device::Cpu).unwrap();
                    let sum = c.all_reduce_sum(&x).unwrap();
                    let cols = Tensor::full(r, (1, c.rank() + 1), &Device::Cpu).unwrap();
                    (sum, c.all_gather(&cols, 1).unwrap())
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (sum, gathered) in outs {
        assert_eq!(sum.to_vec2::<f32>().unwrap(), vec![vec![3.0, 3.0]]);
        assert_eq!(
            gathered.to_vec2::<f32>().unwrap(),
            vec![vec![0.0, 1.0, 1.0, 2.0, 2.0, 2.0]]
        );
    }
}

/// A tensor-parallel engine (rank 0 on the engine's thread, the others on
/// theirs, each with its own `vattention` KV cache): a batch through
/// chunked-prefill hybrid steps gives the greedy tokens of transformers and
/// of the unsharded engine; aborting frees every rank's cache.
#[test]
fn tensor_parallel_engine_generates_the_same_tokens() {
    use vpod_cli::engine::Request;
    use vpod_cli::sampler::SamplingParams;
    use vpod_cli::scheduler::SchedulerConfig;
    for name in ["tiny-llama3-gqa4", "tiny-yi-gqa8"] {
        let r = reference(name);
        let files = dir_files(&fixture(name)).unwrap();
        let requests: Vec<Request> = [
            r.prompt_ids.clone(),
            r.prompt_ids[..5].to_vec(),
            r.prompt_ids[2..].to_vec(),
        ]
        .into_iter()
        .map(|prompt| Request {
            prompt,
            max_tokens: 24,
            sampling: SamplingParams::default(),
            arrival_ms: 0.0,
        })
        .collect();
        let sched = SchedulerConfig {
            chunk_size: 4,
            ..Default::default()
        };
        let mut tokens = vec![];
        for world in [1, 2, 4] {
            let mut e = cpu_tp_engine(&files, world, "vattention", &Default::default());
            assert_eq!(e.tensor_parallel(), world);
            let out = e.run_batch(&requests, sched, &mut |_, _| Ok(())).unwrap();
            let got: Vec<Vec<u32>> = out.requests.iter().map(|g| g.tokens.clone()).collect();
            assert_eq!(
                got[0], r.greedy_new_tokens,
                "{name} TP-{world}: transformers' greedy tokens"
            );
            tokens.push(got);
        }
        assert_eq!(tokens[1], tokens[0], "{name}: TP-2 vs TP-1");
        assert_eq!(tokens[2], tokens[0], "{name}: TP-4 vs TP-1");
    }
}

/// `cli generate --tensor-parallel 2` on the CPU prints what one rank does;
/// a model whose heads do not split gets a clear error before loading.
#[test]
fn tensor_parallel_cli_generate() {
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--prompt",
            "Phileas Fogg was",
            "--max-tokens",
            "24",
            "--json",
        ];
        args.extend_from_slice(extra);
        crate::common::cli(&args, &[])
    };
    let text = |o: &std::process::Output| {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["text"].as_str().unwrap().to_string()
    };
    let one = text(&run(&["--backend", "vattention"]));
    let two = text(&run(&["--backend", "vattention", "--tensor-parallel", "2"]));
    assert_eq!(two, one);
    let bad = run(&["--tensor-parallel", "3"]);
    assert!(!bad.status.success());
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("--tensor-parallel 3: 2 attention heads do not split over 3 ranks"),
        "{err}"
    );
}

/// `cli compare --tensor-parallel 2` under a KV budget small enough to
/// preempt: every rank frees and re-admits the same sequences (the
/// scheduler runs on rank 0), the backends still agree, and the numbers
/// match the unsharded run's.
#[test]
fn tensor_parallel_compare_with_preemption() {
    let model = fixture("tiny-yi-gqa8");
    let run = |tp: &str| {
        let out = cli_compare_memory(&model, &["--tensor-parallel", tp]);
        assert!(
            out.status.success(),
            "TP-{tp}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    let (one, two) = (run("1"), run("2"));
    for i in 0..3 {
        let (a, b) = (&one["backends"][i]["results"], &two["backends"][i]["results"]);
        for key in ["max_concurrent_before_preemption", "preemptions"] {
            assert_eq!(a[key], b[key], "backend {i} {key}: TP-1 vs TP-2");
        }
    }
    assert!(two["backends"][1]["results"]["preemptions"].as_u64().unwrap() > 0);
}

/// After a failed step (here: a decode of a sequence no rank knows, refused
/// by every rank's cache) the group is reset and serves the next requests;
/// the in-memory communicator itself recovers from an abort.
#[test]
fn tensor_parallel_engine_recovers_from_a_failed_step() {
    use vpod_cli::sampler::SamplingParams;
    let name = "tiny-yi-gqa8";
    let r = reference(name);
    let mut e = cpu_tp_engine(
        &dir_files(&fixture(name)).unwrap(),
        2,
        "vattention",
        &Default::default(),
    );
    let bad = SeqChunk {
        seq_id: 99,
        context_len: 5,
        query_len: 1,
    };
    let err = e
        .forward(vec![bad], &[3], LogitsAt::LastToken)
        .unwrap_err()
        .to_string();
    assert!(err.contains("99"), "{err}");
    let vocab = e.model.config.vocab_size as u32;
    assert!(
        e.forward(
            vec![SeqChunk {
                seq_id: 98,
                context_len: 0,
                query_len: 1
            }],
            &[vocab],
            LogitsAt::LastToken
        )
        .is_err()
    );
    let g = e
        .generate(&r.prompt_ids, 24, SamplingParams::default(), &mut |_| Ok(()))
        .unwrap();
    assert_eq!(g.tokens, r.greedy_new_tokens);

    let comms = LocalComm::group(2);
    comms[1].abort("test");
    let x = Tensor::ones((1, 2), DType::F32, &Device::Cpu).unwrap();
    assert!(comms[0].all_reduce_sum(&x).is_err());
    comms[0].reset().unwrap();
    let sums: Vec<Tensor> = std::thread::scope(|s| {
        let hs: Vec<_> = comms
            .iter()
            .map(|c| s.spawn(|| c.all_reduce_sum(&x).unwrap()))
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(sums[1].to_vec2::<f32>().unwrap(), vec![vec![2.0, 2.0]]);
}

/// A vocabulary whose ceil-sized slices would leave a rank nothing is
/// refused, as are heads that do not split.
#[test]
fn tensor_parallel_checks_every_split() {
    let cfg = LlamaConfig::from_json(
        r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
           "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 5}"#,
    )
    .unwrap();
    assert!(Shard::unsupported_reasons(&cfg, 2).is_empty());
    let why = Shard::unsupported_reasons(&cfg, 4).join("; ");
    assert!(
        why.contains("a vocabulary of 5 does not split over 4 ranks"),
        "{why}"
    );
    assert!(
        !why.contains("key/value heads"),
        "2 KV heads replicate over 4 ranks: {why}"
    );
    let why = Shard::unsupported_reasons(&cfg, 3).join("; ");
    assert!(
        why.contains("4 attention heads do not split over 3 ranks"),
        "{why}"
    );
}
