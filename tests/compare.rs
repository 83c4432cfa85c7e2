//! `cli compare`: agreement before timing, on all backends; a deliberately
//! broken backend is caught and reported, not timed.

use std::sync::Arc;

use vpod_attention::BackendOptions;
use vpod_cli::compare::{CompareOptions, Workload, compare, progress_steps, table};

use crate::common::*;

fn options(fault: Option<(&str, f32)>) -> CompareOptions {
    CompareOptions {
        backends: ["reference", "paged:16", "paged:128", "vattention", "pod"]
            .map(String::from)
            .to_vec(),
        workload: Workload::DecodeSweep {
            batches: vec![1, 3],
            contexts: vec![12],
            tokens: 4,
        },
        cache: BackendOptions::default(),
        fault: fault.map(|(b, f)| (b.to_string(), f)),
        check_agreement: true,
        ranks: vec![],
    }
}

#[test]
fn all_backends_agree_and_are_measured() {
    let model = Arc::new(load_dir(&fixture("tiny-llama3-gqa4")).unwrap());
    let rows = compare(&model, &options(None), &mut |_| {}).unwrap();
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    for r in rows {
        assert_eq!(r["agrees"], true, "{r}");
        let cells = r["results"].as_array().unwrap();
        assert_eq!(cells.len(), 2);
        assert!(
            cells
                .iter()
                .all(|c| c["decode_tokens_per_s"].as_f64().unwrap() > 0.0)
        );
        assert!(
            cells
                .iter()
                .all(|c| c["attention_ms_per_step"].as_f64().unwrap() > 0.0)
        );
    }
}

#[test]
fn a_broken_backend_is_caught_not_timed() {
    let model = Arc::new(load_dir(&fixture("tiny-yi-gqa7")).unwrap());
    // A wrong softmax scale in the paged twin.
    let rows = compare(&model, &options(Some(("paged:16", 1.7))), &mut |_| {}).unwrap();
    let broken = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["backend"] == "paged:16")
        .unwrap();
    assert_eq!(broken["agrees"], false);
    assert!(
        broken["results"].is_null(),
        "a disagreeing backend must not be timed"
    );
    let why = broken["disagreement"].as_str().unwrap();
    assert!(
        why.contains("request") && why.contains("teacher-forced logits differ"),
        "{why}"
    );
    let a = &broken["agreement"];
    assert!(
        a["max_logit_diff_of_range"].as_f64().unwrap() > a["tolerance"].as_f64().unwrap(),
        "{a}"
    );
    assert!(table(&rows).contains("paged:16     DISAGREES"));
    let others_ok = rows
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["backend"] != "paged:16")
        .all(|r| r["agrees"] == true);
    assert!(others_ok);
}

#[test]
fn cli_compare_memory_workload_and_bad_backends() {
    let model = fixture("tiny-yi-gqa8");
    let m = model.to_str().unwrap();
    let out = cli_compare_memory(&model, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows = v["backends"].as_array().unwrap();
    assert_eq!(
        rows[0]["results"]["max_concurrent_before_preemption"], 8,
        "reference has no budget"
    );
    assert!(rows[1]["results"]["preemptions"].as_u64().unwrap() > 0);
    assert_eq!(v["device"], "cpu");

    let out = cli(&["compare", "--model", m, "--backends", "reference,flash"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("'flash' is not a backend") && err.contains("paged (runs here)"),
        "{err}"
    );
    let out = cli(&["compare", "--model", m, "--workload", "memory"], &[]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs --kv-memory"));
}

#[test]
fn hybrid_sweep_measures_mixed_steps() {
    let model = Arc::new(load_dir(&fixture("tiny-llama3-gqa4")).unwrap());
    let o = CompareOptions {
        backends: ["reference", "pod"].map(String::from).to_vec(),
        workload: Workload::HybridSweep {
            chunks: vec![8],
            batches: vec![2],
            contexts: vec![8],
            prefill_len: 24,
        },
        cache: BackendOptions::default(),
        fault: None,
        check_agreement: true,
        ranks: vec![],
    };
    let mut ticks = 0;
    let rows = compare(&model, &o, &mut |_| ticks += 1).unwrap();
    assert_eq!(ticks, progress_steps(&o), "the progress bar's length");
    for r in rows.as_array().unwrap() {
        assert_eq!(r["agrees"], true);
        let c = &r["results"][0];
        assert_eq!(
            c["hybrid_steps"], 3,
            "24 prompt tokens in chunks of 8 beside 2 decodes: {c}"
        );
        assert!(c["attention_ms_per_step"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn serve_replays_a_trace_with_arrivals() {
    use vpod_cli::compare::{read_trace, synthetic_trace};
    let trace = synthetic_trace(10, 16, 6, 400.0, 7);
    assert!(trace.windows(2).all(|w| w[1].2 >= w[0].2), "arrivals are ordered");
    assert!(trace.last().unwrap().2 > 0.0);
    let model = Arc::new(load_dir(&fixture("tiny-llama3-gqa4")).unwrap());
    let o = CompareOptions {
        backends: ["reference", "vattention"].map(String::from).to_vec(),
        workload: Workload::Serve { trace },
        cache: BackendOptions::default(),
        fault: None,
        check_agreement: true,
        ranks: vec![],
    };
    let rows = compare(&model, &o, &mut |_| {}).unwrap();
    for r in rows.as_array().unwrap() {
        let s = &r["results"];
        assert_eq!(s["requests"], 10);
        assert!(s["tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(s["ttft_ms_p99"].as_f64().unwrap() >= s["ttft_ms_p50"].as_f64().unwrap());
        assert!(s["ttft_ms_p50"].as_f64().unwrap() >= 0.0);
    }
    assert_eq!(
        read_trace("prompt,output\n12,4\n\n30,2,15.5\n").unwrap(),
        vec![(12, 4, 0.0), (30, 2, 15.5)]
    );
    assert!(
        read_trace("prompt,output\n12;4\n")
            .unwrap_err()
            .contains("line 2")
    );
    assert!(read_trace("prompt,output\n").is_err());

    // Through the binary, from a CSV trace file.
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("trace.csv");
    std::fs::write(
        &f,
        "prompt_tokens,output_tokens,arrival_ms\n8,3,0\n20,5,2\n5,4,4\n",
    )
    .unwrap();
    let m = fixture("tiny-yi-gqa7");
    let out = cli(
        &[
            "compare",
            "--model",
            m.to_str().unwrap(),
            "--workload",
            "serve",
            "--trace",
            f.to_str().unwrap(),
            "--backends",
            "reference,paged:32",
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["backends"][1]["results"]["generated_tokens"], 12);
}

#[test]
fn bench_measures_one_backend_with_percentiles() {
    let m = fixture("tiny-llama3-gqa4");
    let args = [
        "bench",
        "--model",
        m.to_str().unwrap(),
        "--backend",
        "paged:16",
        "--workload",
        "decode-sweep",
        "--batches",
        "2",
        "--contexts",
        "8",
        "--tokens",
        "6",
        "--json",
        "--out",
    ];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().join("run");
    let mut args = args.to_vec();
    args.push(d.to_str().unwrap());
    let out = cli(&args, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // --out: the JSON and the figure, as PNG and SVG.
    let saved: serde_json::Value =
        serde_json::from_slice(&std::fs::read(d.join("bench.json")).unwrap()).unwrap();
    assert_eq!(saved["workload"], "decode-sweep");
    assert!(saved["command"].as_array().unwrap().iter().any(|a| a == "--out"));
    assert!(
        std::fs::read(d.join("decode-sweep.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    let svg = std::fs::read_to_string(d.join("decode-sweep.svg")).unwrap();
    assert!(svg.contains("paged:16") && svg.contains("batch size"));
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["tool"], "vpod cli bench");
    let row = &r["backends"][0];
    assert_eq!(row["backend"], "paged:16");
    let c = &row["results"][0];
    assert_eq!(
        c["decode_steps"], 5,
        "6 tokens: 1 from the prefill, 5 decode steps: {c}"
    );
    let p = &c["step_ms_percentiles"];
    assert!(p["p99"].as_f64().unwrap() >= p["p50"].as_f64().unwrap());
    let out = cli(
        &["bench", "--model", m.to_str().unwrap(), "--backend", "nope"],
        &[],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("unknown attention backend 'nope'") && err.contains("vattention"),
        "{err}"
    );
}

#[test]
fn vattention_gets_a_slot_per_concurrent_request_and_workloads_must_fit_the_context() {
    let model = Arc::new(load_dir(&fixture("tiny-llama3-gqa4")).unwrap());
    // 8 decodes + the prefilling prompt: 9 sequences, more than the default 8 slots.
    let o = CompareOptions {
        backends: vec!["vattention".into()],
        workload: Workload::HybridSweep {
            chunks: vec![8],
            batches: vec![8],
            contexts: vec![8],
            prefill_len: 16,
        },
        cache: BackendOptions {
            kv_memory: Some(256 << 20),
            ..Default::default()
        },
        fault: None,
        check_agreement: false,
        ranks: vec![],
    };
    let rows = compare(&model, &o, &mut |_| {}).unwrap();
    assert_eq!(rows[0]["results"][0]["hybrid_steps"], 2, "{rows}");

    let o = CompareOptions {
        workload: Workload::DecodeSweep {
            batches: vec![1],
            contexts: vec![510],
            tokens: 8,
        },
        ..o
    };
    let err = compare(&model, &o, &mut |_| {}).unwrap_err().to_string();
    assert!(
        err.contains("518 tokens, more than the model's 512-token context"),
        "{err}"
    );
}

#[test]
fn forced_logits_batched_like_serving_match_one_prefill() {
    use vpod_cli::engine::Engine;
    let model = Arc::new(load_dir(&fixture("tiny-llama3-gqa4")).unwrap());
    let vocab = model.config.vocab_size as u32;
    let seqs: Vec<Vec<u32>> = [30usize, 9]
        .iter()
        .map(|&n| {
            (0..n as u32)
                .map(|t| 1 + (t * 7 + n as u32) % (vocab - 1))
                .collect()
        })
        .collect();
    let mut e = Engine::new(model.clone(), "reference").unwrap();
    // Prompts of 20 and 5 tokens in chunks of 8, the rest fed as decodes, both in the same steps.
    let got = e.forced_logits(&seqs, &[20, 5], 8).unwrap();
    for (s, g) in seqs.iter().zip(&got) {
        assert_eq!(g.dims(), &[s.len(), vocab as usize]);
        let one = e
            .forced_logits(std::slice::from_ref(s), &[s.len()], 1 << 10)
            .unwrap();
        let diff = (g - &one[0]).unwrap().abs().unwrap().max_all().unwrap();
        assert!(
            diff.to_scalar::<f32>().unwrap() < 1e-3,
            "rows in the wrong order?"
        );
    }
}
