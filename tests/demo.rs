//! The demo checkpoint (demo/tiny-verne, made by scripts/train_demo.py on the
//! GPU machine): our engine reproduces transformers' greedy continuation
//! stored with it, its tokenizer encodes the prompt as `tokenizers` did, and
//! `cli generate` uses it when no --model is given.

use std::path::Path;

use vpod_cli::engine::Engine;
use vpod_cli::sampler::SamplingParams;

use crate::common::*;

fn demo_dir() -> &'static Path {
    Path::new(vpod_cli::DEMO_DIR)
}

fn sample() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(demo_dir().join("sample.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

#[test]
fn demo_matches_transformers_greedy() {
    let s = sample();
    let model = load_dir(demo_dir()).unwrap();
    let prompt_ids = ids(&s["prompt_ids"]);
    assert_eq!(
        model
            .tokenizer()
            .unwrap()
            .encode_with_bos(s["prompt"].as_str().unwrap())
            .unwrap(),
        prompt_ids
    );
    let want = ids(&s["greedy_ids"]);
    let mut e = Engine::new(model, "reference").unwrap();
    let got = e
        .generate(&prompt_ids, 32, SamplingParams::default(), &mut |_| Ok(()))
        .unwrap();
    assert_eq!(got.tokens, want[..32], "greedy tokens vs transformers (fp32)");
}

#[test]
fn cli_generate_defaults_to_the_demo() {
    let out = cli(
        &["generate", "--prompt", "Phileas Fogg was", "--max-tokens", "24"],
        &[],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let want = sample()["text"].as_str().unwrap().to_string();
    let first_words: String = want.split_whitespace().take(5).collect::<Vec<_>>().join(" ");
    assert!(text.contains(&first_words), "{text:?} should start like {want:?}");
}
