//! `cli bench --url URL --workload serve`: the serving benchmark over HTTP,
//! as vLLM's `benchmark_serving` runs it. It replays a trace (Poisson
//! arrivals of synthetic lengths, or a CSV) against a running
//! OpenAI-compatible server with streaming completions, one client thread
//! per request in flight, and reports throughput, time to first token,
//! time between tokens and end-to-end latency (p50 / p90 / p99).
//!
//! Prompts are token ids (the same ones the in-process `serve` workload
//! uses), generation is greedy with `ignore_eos` so that every request
//! produces its planned tokens, and `return_token_ids` makes the server list
//! each chunk's token ids (text alone may hold a token back and merge it into
//! the next chunk, and a model without a tokenizer has no text), so that
//! each token's arrival is timed.

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::compare::percentile;

/// What one request measured.
#[derive(Debug, Default, Clone)]
struct Sample {
    ttft_ms: f64,
    tbt_ms: Vec<f64>,
    e2e_ms: f64,
    tokens: usize,
    error: Option<String>,
}

/// The server's model name and its vocabulary, from `/v1/models`.
fn model_info(agent: &ureq::Agent, base: &str) -> anyhow::Result<(String, usize, usize)> {
    let mut r = agent
        .get(format!("{base}/v1/models"))
        .call()
        .with_context(|| format!("cannot reach {base}/v1/models"))?;
    let v: Value = serde_json::from_str(&r.body_mut().read_to_string()?)?;
    let m = &v["data"][0];
    let name = m["id"].as_str().context("/v1/models lists no model")?.to_string();
    // Our server lists its vocabulary; others do not: stay in ids every
    // Llama-family vocabulary has.
    let vocab = m["vocab_size"].as_u64().unwrap_or(1000) as usize;
    let ctx = m["max_model_len"].as_u64().unwrap_or(u64::MAX) as usize;
    Ok((name, vocab, ctx))
}

/// One streaming request; times the first token and every one after it.
fn one(agent: &ureq::Agent, url: &str, body: &Value, sent: Instant) -> Sample {
    let mut s = Sample::default();
    let r = match agent
        .post(url)
        .header("content-type", "application/json")
        .send(body.to_string())
    {
        Ok(r) => r,
        Err(e) => {
            s.error = Some(e.to_string());
            return s;
        }
    };
    if r.status().as_u16() != 200 {
        let status = r.status();
        let text = r.into_body().read_to_string().unwrap_or_default();
        s.error = Some(format!("HTTP {status}: {text}"));
        return s;
    }
    let mut last: Option<Instant> = None;
    for line in BufReader::new(r.into_body().into_reader()).lines() {
        let Ok(line) = line else {
            s.error = Some("the stream broke off".into());
            break;
        };
        let Some(data) = line.strip_prefix("data: ") else {
            continue;
        };
        if data == "[DONE]" {
            break;
        }
        let now = Instant::now();
        let Ok(v) = serde_json::from_str::<Value>(data) else {
            s.error = Some(format!("not JSON: {data}"));
            break;
        };
        if let Some(e) = v.get("error") {
            s.error = Some(e.to_string());
            break;
        }
        // Our server (and vLLM's) lists each chunk's ids with
        // `return_token_ids`; elsewhere a chunk with text counts as one token.
        let c = &v["choices"][0];
        let n = match c["token_ids"].as_array() {
            Some(ids) => ids.len(),
            None => usize::from(c["text"].as_str().is_some_and(|t| !t.is_empty())),
        };
        for _ in 0..n {
            match last {
                None => s.ttft_ms = (now - sent).as_secs_f64() * 1e3,
                Some(t) => s.tbt_ms.push((now - t).as_secs_f64() * 1e3),
            }
            last = Some(now);
            s.tokens += 1;
        }
    }
    s.e2e_ms = (Instant::now() - sent).as_secs_f64() * 1e3;
    s
}

/// Replays `trace` (prompt tokens, output tokens, arrival ms) against `base`.
pub fn run(base: &str, trace: &[(usize, usize, f64)], out: Option<&std::path::Path>) -> anyhow::Result<()> {
    let base = base.trim_end_matches('/').to_string();
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(3600)))
        .http_status_as_error(false)
        .max_idle_connections(1024)
        .max_idle_connections_per_host(1024)
        .build()
        .into();
    let (model, vocab, ctx) = model_info(&agent, &base)?;
    if let Some(&(p, o, _)) = trace.iter().find(|(p, o, _)| p + o > ctx) {
        bail!("a request of {p} prompt + {o} output tokens does not fit the server's context of {ctx}");
    }
    let url = format!("{base}/v1/completions");
    let bar = indicatif::ProgressBar::new(trace.len() as u64).with_message("requests");
    let start = Instant::now();
    let samples: Vec<Sample> = std::thread::scope(|scope| {
        let mut handles = Vec::with_capacity(trace.len());
        for (i, &(p, o, at)) in trace.iter().enumerate() {
            let due = start + Duration::from_secs_f64(at.max(0.0) / 1e3);
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let body = json!({
                "model": model, "prompt": crate::compare::trace_prompt(p, vocab, i), "max_tokens": o,
                "temperature": 0, "ignore_eos": true, "stream": true, "return_token_ids": true,
            });
            let (agent, url, bar) = (&agent, &url, &bar);
            handles.push(scope.spawn(move || {
                let s = one(agent, url, &body, due);
                bar.inc(1);
                s
            }));
        }
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let wall = start.elapsed().as_secs_f64();
    bar.finish_and_clear();
    let ok: Vec<&Sample> = samples.iter().filter(|s| s.error.is_none()).collect();
    let errors: Vec<&str> = samples.iter().filter_map(|s| s.error.as_deref()).collect();
    let generated: usize = ok.iter().map(|s| s.tokens).sum();
    let mut ttft: Vec<f64> = ok.iter().map(|s| s.ttft_ms).collect();
    let mut tbt: Vec<f64> = ok.iter().flat_map(|s| s.tbt_ms.iter().copied()).collect();
    let mut e2e: Vec<f64> = ok.iter().map(|s| s.e2e_ms).collect();
    let pct = |v: &mut [f64]| json!({"p50": percentile(v, 0.5), "p90": percentile(v, 0.9), "p99": percentile(v, 0.99)});
    let report = json!({
        "url": base,
        "model": model,
        "command": std::env::args().collect::<Vec<_>>().join(" "),
        "requests": trace.len(),
        "completed": ok.len(),
        "failed": errors.len(),
        "first_errors": errors.iter().take(3).collect::<Vec<_>>(),
        "prompt_tokens": trace.iter().map(|t| t.0).sum::<usize>(),
        "generated_tokens": generated,
        "wall_s": wall,
        "requests_per_s": ok.len() as f64 / wall.max(1e-9),
        "requests_per_min": ok.len() as f64 / wall.max(1e-9) * 60.0,
        "output_tokens_per_s": generated as f64 / wall.max(1e-9),
        "ttft_ms": pct(&mut ttft),
        "tbt_ms": pct(&mut tbt),
        "e2e_ms": pct(&mut e2e),
    });
    println!(
        "{} of {} requests in {wall:.2} s: {:.2} requests/s, {:.1} output tokens/s\n\
         | ms | p50 | p90 | p99 |\n|---|---|---|---|",
        ok.len(),
        trace.len(),
        report["requests_per_s"].as_f64().unwrap_or(0.0),
        report["output_tokens_per_s"].as_f64().unwrap_or(0.0),
    );
    for k in ["ttft_ms", "tbt_ms", "e2e_ms"] {
        let r = |p: &str| report[k][p].as_f64().unwrap_or(0.0);
        println!("| {k} | {:.2} | {:.2} | {:.2} |", r("p50"), r("p90"), r("p99"));
    }
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let path = dir.join("http_bench.json");
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("cannot write {}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    if !errors.is_empty() {
        bail!(
            "{} of {} requests failed; the first: {}",
            errors.len(),
            trace.len(),
            errors[0]
        );
    }
    Ok(())
}
