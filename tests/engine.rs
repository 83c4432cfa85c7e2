//! The engine's packed batches: a hybrid step (one decode + one prefill
//! chunk packed together) computes what the sequences compute alone; the
//! context limit ends generation cleanly.

use vpod_attention::{LogitsAt, SeqChunk};
use vpod_cli::engine::FinishReason;
use vpod_cli::sampler::SamplingParams;

use crate::common::*;
use crate::parity::max_abs_diff;

#[test]
fn hybrid_packed_batch_equals_separate_runs() {
    for name in FIXTURES {
        let mut e = engine(name);
        let a: Vec<u32> = (3..15).collect(); // sequence A: 11 tokens of prompt, then 1 decode token
        let b: Vec<u32> = (20..27).collect(); // sequence B: 7-token prompt

        // Alone: A prefills 11, decodes its 12th; B prefills 7.
        e.step(
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
            .step(
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
            .step(
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
        e.step(
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
            .step(
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
