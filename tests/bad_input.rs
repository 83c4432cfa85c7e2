//! Bad input: each case must end with a clear message on stderr and a
//! non-zero exit code, never a panic.

use std::path::Path;

use crate::common::*;

/// Runs `cli generate` on `model` and returns stderr, asserting failure without panic.
fn fails(args: &[&str]) -> String {
    let out = cli(args, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}");
    assert!(!stderr.contains("panicked"), "panic for {args:?}: {stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    stderr
}

fn generate(model: &Path) -> String {
    fails(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "Alice was",
        "--max-tokens",
        "2",
    ])
}

fn assert_contains(haystack: &str, needles: &[&str]) {
    for n in needles {
        assert!(haystack.contains(n), "expected {n:?} in: {haystack}");
    }
}

#[test]
fn unknown_preset_lists_the_known_ones() {
    let e = fails(&["generate", "--model", "yi-7b", "--prompt", "x"]);
    assert_contains(&e, &["unknown model 'yi-7b'", "yi-6b, llama3-8b, yi-34b"]);
}

#[test]
fn missing_path() {
    let e = fails(&["generate", "--model", "./no/such/model", "--prompt", "x"]);
    assert_contains(&e, &["./no/such/model", "does not exist"]);
}

#[test]
fn missing_config() {
    let t = scratch_copy("tiny-llama3-gqa4");
    std::fs::remove_file(t.path().join("config.json")).unwrap();
    assert_contains(&generate(t.path()), &["config.json not found"]);
}

#[test]
fn missing_weights() {
    let t = scratch_copy("tiny-llama3-gqa4");
    std::fs::remove_file(t.path().join("model.safetensors")).unwrap();
    assert_contains(&generate(t.path()), &["weights", "not found"]);
}

#[test]
fn missing_shard() {
    let t = scratch_copy("tiny-yi-gqa8");
    std::fs::remove_file(t.path().join("model-00003-of-00014.safetensors")).unwrap();
    assert_contains(
        &generate(t.path()),
        &["model-00003-of-00014.safetensors not found"],
    );
}

#[test]
fn missing_tokenizer() {
    let t = scratch_copy("tiny-llama3-gqa4");
    std::fs::remove_file(t.path().join("tokenizer.json")).unwrap();
    assert_contains(&generate(t.path()), &["tokenizer", "not found"]);
}

#[test]
fn corrupt_tokenizer_json() {
    let t = scratch_copy("tiny-llama3-gqa4");
    std::fs::write(t.path().join("tokenizer.json"), "{\"version\": ").unwrap();
    assert_contains(&generate(t.path()), &["cannot load tokenizer", "tokenizer.json"]);
}

#[test]
fn non_llama_architecture() {
    let t = scratch_copy("tiny-llama3-gqa4");
    let p = t.path().join("config.json");
    let cfg = std::fs::read_to_string(&p)
        .unwrap()
        .replace("LlamaForCausalLM", "MistralForCausalLM");
    std::fs::write(&p, cfg).unwrap();
    assert_contains(
        &generate(t.path()),
        &["unsupported architecture MistralForCausalLM"],
    );
}

#[test]
fn tensor_with_wrong_shape_is_named() {
    let t = scratch_copy("tiny-llama3-gqa4");
    let p = t.path().join("config.json");
    let cfg = std::fs::read_to_string(&p).unwrap();
    std::fs::write(
        &p,
        cfg.replace("\"intermediate_size\": 512", "\"intermediate_size\": 500"),
    )
    .unwrap();
    assert_contains(
        &generate(t.path()),
        &[
            "tensor 'model.layers.0.mlp.gate_proj.weight'",
            "[512, 256]",
            "[500, 256]",
        ],
    );
}

#[test]
fn truncated_safetensors() {
    let t = scratch_copy("tiny-llama3-gqa4");
    let p = t.path().join("model.safetensors");
    let bytes = std::fs::read(&p).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    assert_contains(
        &generate(t.path()),
        &["cannot read safetensors file", "model.safetensors", "truncated"],
    );
}

#[test]
fn prompt_longer_than_the_context() {
    let model = fixture("tiny-llama3-gqa4");
    let prompt = "Alice was beginning to get very tired. ".repeat(60);
    let e = fails(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        &prompt,
    ]);
    assert_contains(&e, &["prompt has", "context holds 512"]);
}

#[test]
fn unknown_backend_lists_the_known_ones() {
    let model = fixture("tiny-llama3-gqa4");
    let e = fails(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--backend",
        "flash",
    ]);
    assert_contains(&e, &["unknown attention backend 'flash'", "known: reference"]);
}

#[test]
fn bad_device_and_dtype() {
    let model = fixture("tiny-llama3-gqa4");
    let m = model.to_str().unwrap();
    let e = fails(&["generate", "--model", m, "--prompt", "x", "--device", "tpu"]);
    assert_contains(&e, &["unknown device 'tpu'"]);
    let e = fails(&["generate", "--model", m, "--prompt", "x", "--dtype", "int3"]);
    assert_contains(&e, &["unknown dtype 'int3'"]);
}

#[cfg(not(feature = "cuda"))]
#[test]
fn cuda_device_without_cuda_build_names_the_feature() {
    let model = fixture("tiny-llama3-gqa4");
    let e = fails(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--device",
        "cuda",
    ]);
    assert_contains(&e, &["built without CUDA support", "`cuda` feature"]);
}

#[test]
fn offline_cache_miss() {
    let e = fails(&["generate", "--model", "yi-6b", "--prompt", "x"]);
    assert_contains(&e, &["01-ai/Yi-6B", "not in the Hub cache", "HF_HUB_OFFLINE"]);
}

#[test]
fn perplexity_of_a_missing_file() {
    let model = fixture("tiny-llama3-gqa4");
    let e = fails(&[
        "perplexity",
        "--model",
        model.to_str().unwrap(),
        "--file",
        "/no/such.txt",
    ]);
    assert_contains(&e, &["cannot read /no/such.txt"]);
}

#[test]
fn kv_budget_too_small_for_one_request() {
    let model = fixture("tiny-llama3-gqa4");
    let m = model.to_str().unwrap();
    let e = fails(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "Alice",
        "--max-tokens",
        "300",
        "--backend",
        "paged",
        "--kv-memory",
        "64KiB",
    ]);
    assert_contains(&e, &["KV cache holds 32 tokens", "needs", "--kv-memory"]);
    let e = fails(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--backend",
        "paged",
        "--kv-memory",
        "lots",
    ]);
    assert_contains(&e, &["'lots' is not a size"]);
}

#[test]
fn block_and_page_sizes_that_do_not_fit() {
    let model = fixture("tiny-llama3-gqa4");
    let m = model.to_str().unwrap();
    let e = fails(&["generate", "--model", m, "--prompt", "x", "--backend", "paged:24"]);
    assert_contains(&e, &["block size 24 is not one of [16, 32, 64, 128]"]);
    let e = fails(&[
        "generate",
        "--model",
        m,
        "--prompt",
        "x",
        "--backend",
        "vattention",
        "--page-size",
        "1000",
    ]);
    assert_contains(&e, &["page size 1000 must be a multiple of 4096 bytes"]);
}

#[test]
fn integer_weight_tensors_are_refused() {
    let t = scratch_copy("tiny-llama3-gqa4");
    let path = t.path().join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&path, &candle_core::Device::Cpu).unwrap();
    let w = tensors["model.norm.weight"]
        .to_dtype(candle_core::DType::U32)
        .unwrap();
    tensors.insert("model.norm.weight".into(), w);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    assert_contains(
        &generate(t.path()),
        &["model.norm.weight", "U32", "must be floating point"],
    );
}

#[test]
fn impossible_config_values_are_refused() {
    for (from, to, want) in [
        (
            "\"num_hidden_layers\": 2",
            "\"num_hidden_layers\": 0",
            "num_hidden_layers must be at least 1",
        ),
        (
            "\"rms_norm_eps\": 1e-05",
            "\"rms_norm_eps\": -1",
            "rms_norm_eps must be a positive number",
        ),
    ] {
        let t = scratch_copy("tiny-llama3-gqa4");
        let p = t.path().join("config.json");
        let cfg = std::fs::read_to_string(&p).unwrap();
        assert!(cfg.contains(from), "{from} not in the fixture's config");
        std::fs::write(&p, cfg.replace(from, to)).unwrap();
        assert_contains(&generate(t.path()), &[want]);
    }
}

#[test]
fn non_finite_sampling_flags_are_refused() {
    let e = fails(&["generate", "--prompt", "x", "--temperature", "NaN"]);
    assert_contains(&e, &["temperature must be a finite number"]);
    let e = fails(&["generate", "--prompt", "x", "--top-p", "inf"]);
    assert_contains(&e, &["top_p must be in (0, 1]"]);
    let e = fails(&["serve", "--port", "0", "--shutdown-timeout=-1"]);
    assert_contains(&e, &["--shutdown-timeout"]);
}
