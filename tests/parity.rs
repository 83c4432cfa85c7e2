//! Parity with Hugging Face transformers (fp32 reference) on every fixture:
//! per-position logits within 1e-4, perplexity within 1e-4 relative, 24
//! greedy tokens identical.

use vpod_attention::{LogitsAt, SeqChunk};
use vpod_cli::sampler::SamplingParams;

use crate::common::*;

#[test]
fn prompt_ids_match_the_reference_tokenizer() {
    for name in FIXTURES {
        let e = engine(name);
        let r = reference(name);
        assert_eq!(
            e.model.tokenizer().unwrap().encode_with_bos(&r.prompt).unwrap(),
            r.prompt_ids,
            "{name}"
        );
    }
}

#[test]
fn logits_match_transformers() {
    let mut worst = 0f32;
    for name in FIXTURES {
        let mut e = engine(name);
        let r = reference(name);
        let want = reference_logits(name);
        let chunk = SeqChunk {
            seq_id: 1,
            context_len: 0,
            query_len: r.prompt_ids.len(),
        };
        let got = e
            .forward(vec![chunk], &r.prompt_ids, LogitsAt::AllTokens)
            .unwrap();
        assert_eq!(got.dims(), want.dims(), "{name}");
        let max = max_abs_diff(&got, &want);
        println!("{name}: max |logit - transformers| = {max:.2e}");
        worst = worst.max(max);
    }
    assert!(worst < 1e-4, "logits differ from transformers by {worst}");
    {}
}

#[test]
fn greedy_tokens_match_transformers() {
    for name in FIXTURES {
        let mut e = engine(name);
        let r = reference(name);
        let g = e
            .generate(&r.prompt_ids, 24, SamplingParams::default(), &mut |_| Ok(()))
            .unwrap();
        assert_eq!(g.tokens, r.greedy_new_tokens, "{name}");
        assert_eq!(
            e.model.tokenizer().unwrap().decode(&g.tokens).unwrap(),
            r.greedy_text,
            "{name}"
        );
    }
}

#[test]
fn perplexity_matches_transformers() {
    for name in FIXTURES {
        let mut e = engine(name);
        let r = reference(name);
        let text = std::fs::read_to_string(fixtures_dir().join(&r.ppl_file)).unwrap();
        let ids = e.model.tokenizer().unwrap().encode_with_bos(&text).unwrap();
        assert_eq!(ids.len(), r.ppl_tokens, "{name}");
        // Chunked prefill through the KV cache must give the same answer.
        for chunk in [512, 64] {
            let s = e.score(&ids, chunk, &mut |_, _| {}).unwrap();
            let rel = (s.ppl - r.ppl).abs() / r.ppl;
            println!(
                "{name} chunk {chunk}: ppl {:.6} vs transformers {:.6} (rel {rel:.1e})",
                s.ppl, r.ppl
            );
            assert!(rel < 1e-4, "{name}: ppl {} vs {}", s.ppl, r.ppl);
            assert!((s.nll - r.nll).abs() < 1e-4);
        }
    }
}
