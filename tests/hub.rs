//! Loading by Hub repo id from a Hugging Face cache layout built in a temp
//! dir, with `HF_HUB_OFFLINE=1`: single-file and sharded checkpoints,
//! branch and commit revisions, and the errors of a cache miss.

use std::path::Path;

use candle_core::{DType, Device};
use vpod_models::{ModelSource, fetch_model_files, load_model, shard_names};

use crate::common::*;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

/// Lays a fixture out as `huggingface_hub` caches a download:
/// `models--{org}--{name}/{blobs/<hash>, snapshots/<commit>/<file> -> blob, refs/main}`.
fn build_cache(cache: &Path, repo: &str, fixture_name: &str) {
    let root = cache.join(format!("models--{}", repo.replace('/', "--")));
    let (blobs, snap) = (root.join("blobs"), root.join("snapshots").join(COMMIT));
    std::fs::create_dir_all(&blobs).unwrap();
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(root.join("refs")).unwrap();
    std::fs::write(root.join("refs/main"), COMMIT).unwrap();
    for (i, e) in std::fs::read_dir(fixture(fixture_name)).unwrap().enumerate() {
        let e = e.unwrap();
        let blob = format!("{i:064x}");
        std::fs::copy(e.path(), blobs.join(&blob)).unwrap();
        std::os::unix::fs::symlink(format!("../../blobs/{blob}"), snap.join(e.file_name())).unwrap();
    }
}

#[test]
fn loads_sharded_checkpoint_by_repo_id_offline() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path(), "vpod-test/tiny-yi-gqa8", "tiny-yi-gqa8");
    for revision in ["main", COMMIT] {
        let source = ModelSource::parse("vpod-test/tiny-yi-gqa8", revision).unwrap();
        let files = fetch_model_files(&source, &offline(tmp.path())).unwrap();
        assert_eq!(files.weights.len(), 14, "every shard of the index");
        assert!(files.weights.iter().all(|p| p.starts_with(tmp.path())));
        let m = load_model(files, DType::F32, &Device::Cpu, &mut |_, _| {}).unwrap();
        assert_eq!(m.config.gqa_group(), 8);
    }
    let index = fixture("tiny-yi-gqa8").join("model.safetensors.index.json");
    assert_eq!(shard_names(&index).unwrap().len(), 14);
}

#[test]
fn cache_misses_are_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path(), "vpod-test/tiny", "tiny-llama3-gqa4");
    let source = ModelSource::parse("vpod-test/other", "main").unwrap();
    let err = fetch_model_files(&source, &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not in the Hub cache") && err.contains("HF_HUB_OFFLINE"),
        "{err}"
    );
    let source = ModelSource::parse("vpod-test/tiny", "v2").unwrap();
    let err = fetch_model_files(&source, &offline(tmp.path()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("revision 'v2'"), "{err}");
}

/// The binary, configured only through the standard environment variables.
#[test]
fn cli_generates_from_the_hub_cache_with_env_vars() {
    let tmp = tempfile::tempdir().unwrap();
    build_cache(tmp.path(), "vpod-test/tiny-llama3-gqa4", "tiny-llama3-gqa4");
    let r = reference("tiny-llama3-gqa4");
    let out = cli(
        &[
            "generate",
            "--model",
            "vpod-test/tiny-llama3-gqa4",
            "--prompt",
            &r.prompt,
            "--max-tokens",
            "24",
            "--json",
        ],
        &[("HF_HUB_CACHE", tmp.path())],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let tokens: Vec<u32> = serde_json::from_value(v["tokens"].clone()).unwrap();
    assert_eq!(tokens, r.greedy_new_tokens);
    assert_eq!(v["backend"], "reference");
    assert_eq!(v["device"], "cpu");
    assert_eq!(v["prompt_tokens"], r.prompt_ids.len());
    assert_eq!(v["text"], r.greedy_text.as_str());
    assert!(v["prefill_ms"].as_f64().unwrap() > 0.0);
    assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0);

    // HF_HOME/hub is the cache when HF_HUB_CACHE is unset.
    let home = tempfile::tempdir().unwrap();
    std::fs::rename(tmp.path(), home.path().join("hub")).unwrap();
    let out = cli(
        &[
            "generate",
            "--model",
            "vpod-test/tiny-llama3-gqa4",
            "--prompt",
            "Alice",
            "--max-tokens",
            "2",
        ],
        &[("HF_HOME", home.path())],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}
