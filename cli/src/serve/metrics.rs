//! `GET /metrics` in the Prometheus text format (version 0.0.4): the
//! engine's gauges (requests running and waiting, KV tokens in use and in
//! all, preemptions, steps), token counters, finished requests by reason,
//! and histograms of time to first token, time between tokens and
//! end-to-end latency. Names follow vLLM's (`vpod:` instead of `vllm:`), so
//! dashboards made for it read these with a prefix change.

use std::fmt::Write;
use std::sync::Mutex;

use vpod_engine::{EngineStats, FinishReason, RequestOutput};

/// Upper bounds of the latency buckets, in seconds.
const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
    80.0,
];
const TBT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75,
    1.0, 2.5,
];
const E2E_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last counts values above every bound.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Self {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    fn observe(&mut self, v: f64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    fn render(&self, out: &mut String, name: &str, help: &str, labels: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut acc = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            acc += c;
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{b}\"}} {acc}");
        }
        acc += self.counts[self.bounds.len()];
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {acc}");
        let _ = writeln!(out, "{name}_sum{{{labels}}} {}", self.sum);
        let _ = writeln!(out, "{name}_count{{{labels}}} {acc}");
    }
}

#[derive(Debug)]
struct Inner {
    engine: Option<EngineStats>,
    prompt_tokens: u64,
    generated_tokens: u64,
    /// Finished requests per reason, in [`REASONS`] order.
    finished: [u64; 6],
    ttft: Histogram,
    tbt: Histogram,
    e2e: Histogram,
}

const REASONS: [(FinishReason, &str); 6] = [
    (FinishReason::Eos, "eos"),
    (FinishReason::Stop, "stop"),
    (FinishReason::Length, "length"),
    (FinishReason::ContextFull, "context_full"),
    (FinishReason::Aborted, "abort"),
    (FinishReason::Error, "error"),
];

/// The server's metrics, shared by the engine thread (which writes them) and
/// the `/metrics` handler (which renders them).
#[derive(Debug)]
pub struct Metrics {
    model: String,
    inner: Mutex<Inner>,
}

impl Metrics {
    pub fn new(model: &str) -> Self {
        Self {
            // Label values escape backslashes and quotes.
            model: model.replace('\\', "\\\\").replace('"', "\\\""),
            inner: Mutex::new(Inner {
                engine: None,
                prompt_tokens: 0,
                generated_tokens: 0,
                finished: [0; 6],
                ttft: Histogram::new(TTFT_BUCKETS),
                tbt: Histogram::new(TBT_BUCKETS),
                e2e: Histogram::new(E2E_BUCKETS),
            }),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        // A panic elsewhere while holding the lock leaves plain counters:
        // still safe to read and update.
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    pub fn set_engine(&self, s: EngineStats) {
        self.with(|m| m.engine = Some(s));
    }

    pub fn engine(&self) -> Option<EngineStats> {
        self.with(|m| m.engine)
    }

    pub fn add_prompt_tokens(&self, n: usize) {
        self.with(|m| m.prompt_tokens += n as u64);
    }

    pub fn add_generated_tokens(&self, n: usize) {
        self.with(|m| m.generated_tokens += n as u64);
    }

    /// Records a finished request's reason and latencies.
    pub fn finished(&self, o: &RequestOutput) {
        self.with(|m| {
            if let Some(i) = REASONS.iter().position(|r| r.0 == o.finish_reason) {
                m.finished[i] += 1;
            }
            if !o.tokens.is_empty() {
                m.ttft.observe(o.ttft_ms / 1e3);
                for t in &o.tbt_ms {
                    m.tbt.observe(t / 1e3);
                }
            }
            m.e2e.observe(o.e2e_ms / 1e3);
        });
    }

    /// The Prometheus text.
    pub fn render(&self) -> String {
        let l = format!("model_name=\"{}\"", self.model);
        self.with(|m| {
            let mut out = String::new();
            let mut gauge = |name: &str, help: &str, kind: &str, v: f64| {
                let _ = writeln!(out, "# HELP vpod:{name} {help}\n# TYPE vpod:{name} {kind}\nvpod:{name}{{{l}}} {v}");
            };
            let e = m.engine.unwrap_or(EngineStats {
                running: 0,
                waiting: 0,
                kv_total_tokens: None,
                kv_used_tokens: None,
                preemptions: 0,
                steps: 0,
            });
            gauge("num_requests_running", "Requests running (admitted, KV allocated).", "gauge", e.running as f64);
            gauge("num_requests_waiting", "Requests waiting for admission.", "gauge", e.waiting as f64);
            if let (Some(total), Some(used)) = (e.kv_total_tokens, e.kv_used_tokens) {
                gauge("kv_cache_tokens_used", "KV cache tokens in use (mapped pages or allocated blocks).", "gauge", used as f64);
                gauge("kv_cache_tokens_total", "KV cache tokens in all.", "gauge", total as f64);
                gauge(
                    "kv_cache_usage_perc",
                    "Fraction of the KV cache in use.",
                    "gauge",
                    if total > 0 { used as f64 / total as f64 } else { 0.0 },
                );
            }
            gauge("num_preemptions_total", "Preemptions by recompute.", "counter", e.preemptions as f64);
            gauge("engine_steps_total", "Engine steps run.", "counter", e.steps as f64);
            gauge("prompt_tokens_total", "Prompt tokens of admitted requests.", "counter", m.prompt_tokens as f64);
            gauge("generation_tokens_total", "Tokens generated.", "counter", m.generated_tokens as f64);
            let _ = writeln!(
                out,
                "# HELP vpod:request_success_total Finished requests by finish reason.\n# TYPE vpod:request_success_total counter"
            );
            for ((_, name), n) in REASONS.iter().zip(m.finished) {
                let _ = writeln!(out, "vpod:request_success_total{{{l},finished_reason=\"{name}\"}} {n}");
            }
            m.ttft.render(&mut out, "vpod:time_to_first_token_seconds", "Time to first token.", &l);
            m.tbt.render(&mut out, "vpod:time_per_output_token_seconds", "Time between consecutive tokens.", &l);
            m.e2e.render(&mut out, "vpod:e2e_request_latency_seconds", "Arrival to the last token.", &l);
            out
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::new(&[0.1, 1.0]);
        for v in [0.05, 0.5, 0.7, 3.0] {
            h.observe(v);
        }
        let mut s = String::new();
        h.render(&mut s, "x", "help", "a=\"b\"");
        assert!(s.contains("x_bucket{a=\"b\",le=\"0.1\"} 1\n"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"1\"} 3\n"));
        assert!(s.contains("x_bucket{a=\"b\",le=\"+Inf\"} 4\n"));
        assert!(s.contains("x_count{a=\"b\"} 4\n"));
    }
}
