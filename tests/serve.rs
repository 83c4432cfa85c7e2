//! `cli serve` on the demo checkpoint over real HTTP on 127.0.0.1 (an
//! ephemeral port): concurrent streaming requests give `cli generate`'s
//! greedy text, a client that disconnects has its KV freed, bad requests get
//! OpenAI-style errors with the right status, a full queue answers 503, and
//! the binary exits 0 on SIGTERM. Every request has a timeout: nothing hangs.

use std::io::{BufRead, BufReader, Read};
use std::net::TcpListener;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use vpod_attention::BackendOptions;
use vpod_cli::engine::{Policy, SchedulerConfig};
use vpod_cli::serve::{ServerConfig, ServerHandle, start};

use crate::common::*;

/// The chat template of the test checkpoint: BOS, then the messages' text,
/// so that a chat request's prompt ids are `cli generate`'s for that text.
const TEMPLATE: &str = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}";

/// The demo checkpoint, with a `tokenizer_config.json` holding a chat template.
fn demo_with_template() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let demo = Path::new(vpod_cli::DEMO_DIR);
    for f in [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
    ] {
        std::fs::copy(demo.join(f), tmp.path().join(f)).unwrap();
    }
    let cfg = json!({"chat_template": TEMPLATE, "bos_token": "<s>", "eos_token": {"content": "</s>"}});
    std::fs::write(tmp.path().join("tokenizer_config.json"), cfg.to_string()).unwrap();
    tmp
}

struct Server {
    handle: ServerHandle,
    base: String,
    agent: ureq::Agent,
    _dir: Option<tempfile::TempDir>,
}

fn server(with_template: bool, max_seqs: usize, max_waiting: usize) -> Server {
    server_tp(with_template, max_seqs, max_waiting, 1)
}

/// [`server`] on `tp` tensor-parallel CPU ranks.
fn server_tp(with_template: bool, max_seqs: usize, max_waiting: usize, tp: usize) -> Server {
    let dir = with_template.then(demo_with_template);
    let path = dir.as_ref().map_or(Path::new(vpod_cli::DEMO_DIR), |d| d.path());
    let opts = BackendOptions {
        max_seqs,
        kv_memory: Some(16 << 20),
        // Small pages, so that 16 MiB hold many short requests.
        page_size: 64 << 10,
        ..Default::default()
    };
    let mut engine = cpu_tp_engine(&dir_files(path).unwrap(), tp, "vattention", &opts);
    engine
        .set_scheduler(SchedulerConfig {
            policy: Policy::Hybrid { one_prefill: false },
            chunk_size: 64,
            max_seqs,
        })
        .unwrap();
    let cfg = ServerConfig {
        model_name: "demo".into(),
        max_in_flight: max_seqs + max_waiting,
        shutdown_timeout: Duration::from_secs(5),
    };
    let handle = start(engine, cfg, TcpListener::bind("127.0.0.1:0").unwrap(), false).unwrap();
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into();
    Server {
        base: format!("http://{}", handle.addr),
        handle,
        agent,
        _dir: dir,
    }
}

impl Server {
    fn post(&self, path: &str, body: &str) -> (u16, String, Option<String>) {
        let mut r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body)
            .unwrap();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap(), retry)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let mut r = self.agent.get(format!("{}{path}", self.base)).call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    }

    /// The value of a metric line `name{...} value` (the first that matches `filter`).
    fn metric(&self, name: &str, filter: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(filter))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {name} ({filter}) in\n{text}"))
    }

    /// Opens a streaming request; returns the SSE data lines as they come.
    fn stream(&self, path: &str, body: &Value) -> impl Iterator<Item = String> + use<> {
        let r = self
            .agent
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json")
            .send(body.to_string())
            .unwrap();
        assert_eq!(r.status().as_u16(), 200);
        let reader = BufReader::new(r.into_body().into_reader());
        reader
            .lines()
            .map_while(|l| l.ok())
            .filter_map(|l| l.strip_prefix("data: ").map(String::from))
    }
}

/// Text and finish reason of a streamed response (completions or chat),
/// checking the stream's shape: chunks, a last one with usage, `[DONE]`.
fn collect_stream(lines: impl Iterator<Item = String>, chat: bool) -> (String, String, Value) {
    let (mut text, mut finish, mut usage, mut done) = (String::new(), String::new(), Value::Null, false);
    for l in lines {
        assert!(!done, "data after [DONE]: {l}");
        if l == "[DONE]" {
            done = true;
            continue;
        }
        let v: Value = serde_json::from_str(&l).unwrap();
        let Some(c) = v["choices"].get(0) else { continue };
        let piece = if chat { &c["delta"]["content"] } else { &c["text"] };
        text.push_str(piece.as_str().unwrap_or(""));
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
            usage = v["usage"].clone();
        }
    }
    assert!(done, "the stream did not end with [DONE]");
    (text, finish, usage)
}

/// The greedy text `cli generate` gives for `prompt` (the reference the
/// server's outputs must equal).
fn cli_generate_text(prompt: &str, max_tokens: usize) -> String {
    let out = cli(
        &[
            "generate",
            "--prompt",
            prompt,
            "--max-tokens",
            &max_tokens.to_string(),
            "--json",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["text"].as_str().unwrap().to_string()
}

const PROMPTS: &[&str] = &[
    "Phileas Fogg was",
    "Passepartout",
    "The steamer",
    "Mr. Fogg",
    "Aouda",
    "Fix, the detective,",
    "In the year 1872,",
    "The Reform Club",
];

#[test]
fn concurrent_streams_equal_cli_generate() {
    let max_tokens = 20;
    // The reference: `cli generate`, one process per prompt, greedy.
    let want: Vec<String> = PROMPTS.iter().map(|p| cli_generate_text(p, max_tokens)).collect();
    let s = server(true, 8, 64);
    let start = Instant::now();
    // 32 requests at once: each prompt twice as a completion, twice as chat.
    let results: Vec<(usize, String, String, Value)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..32)
            .map(|i| {
                let s = &s;
                scope.spawn(move || {
                    let p = i % PROMPTS.len();
                    let chat = i % 2 == 1;
                    let (path, body) = if chat {
                        (
                            "/v1/chat/completions",
                            json!({"model": "demo", "messages": [{"role": "user", "content": PROMPTS[p]}],
                                   "max_tokens": max_tokens, "temperature": 0, "stream": true}),
                        )
                    } else {
                        (
                            "/v1/completions",
                            json!({"model": "demo", "prompt": PROMPTS[p], "max_tokens": max_tokens,
                                   "temperature": 0, "stream": true}),
                        )
                    };
                    let (text, finish, usage) = collect_stream(s.stream(path, &body), chat);
                    (p, text, finish, usage)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, text, finish, usage) in &results {
        assert_eq!(text, &want[*p], "prompt {:?}", PROMPTS[*p]);
        assert!(finish == "length" || finish == "stop", "{finish}");
        let n = usage["completion_tokens"].as_u64().unwrap();
        assert!(n >= 1 && n <= max_tokens as u64, "{usage}");
        assert_eq!(
            usage["total_tokens"].as_u64().unwrap(),
            usage["prompt_tokens"].as_u64().unwrap() + n
        );
    }
    assert!(start.elapsed() < Duration::from_secs(120));
    // All done: nothing running, no KV held.
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.metric("vpod:kv_cache_tokens_used", "") != 0.0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(s.metric("vpod:kv_cache_tokens_used", ""), 0.0);
    assert_eq!(s.metric("vpod:num_requests_running", ""), 0.0);
    assert!(s.metric("vpod:generation_tokens_total", "") >= 32.0);
}

/// The server over a tensor-parallel engine (2 CPU ranks): concurrent
/// streaming requests give `cli generate`'s greedy text.
#[test]
fn a_tensor_parallel_engine_serves_concurrent_streams() {
    let s = server_tp(false, 4, 16, 2);
    let prompts = ["Phileas Fogg was", "Passepartout", "The steamer"];
    let got: Vec<String> = std::thread::scope(|sc| {
        let hs: Vec<_> = prompts
            .iter()
            .map(|p| {
                let s = &s;
                sc.spawn(move || {
                    let body = json!({"model": "demo", "prompt": p, "max_tokens": 24, "temperature": 0, "stream": true});
                    collect_stream(s.stream("/v1/completions", &body), false).0
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, text) in prompts.iter().zip(got) {
        assert_eq!(text, cli_generate_text(p, 24), "{p}");
    }
}

#[test]
fn non_streaming_responses_and_stop_strings() {
    let s = server(true, 4, 16);
    let (status, body, _) = s.post(
        "/v1/completions",
        &json!({"model": "demo", "prompt": "Phileas Fogg was", "max_tokens": 24, "temperature": 0})
            .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let full: Value = serde_json::from_str(&body).unwrap();
    let text = full["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(full["object"], "text_completion");
    let tok = load_dir(Path::new(vpod_cli::DEMO_DIR))
        .unwrap()
        .tokenizer()
        .unwrap()
        .clone();
    let prompt_len = tok.encode_with_bos("Phileas Fogg was").unwrap().len();
    assert_eq!(
        full["usage"]["prompt_tokens"].as_u64().unwrap() as usize,
        prompt_len
    );
    // A stop string taken from the middle of that text ends the output just before it.
    let cut = text.char_indices().nth(text.chars().count() / 2).unwrap().0;
    let stop: String = text[cut..].chars().take(3).collect();
    let want = &text[..text.find(&stop).unwrap()];
    for stream in [false, true] {
        let body = json!({"model": "demo", "prompt": "Phileas Fogg was", "max_tokens": 24, "temperature": 0,
                          "stop": [stop.clone()], "stream": stream});
        let (got, finish) = if stream {
            let (t, f, _) = collect_stream(s.stream("/v1/completions", &body), false);
            (t, f)
        } else {
            let (status, b, _) = s.post("/v1/completions", &body.to_string());
            assert_eq!(status, 200, "{b}");
            let v: Value = serde_json::from_str(&b).unwrap();
            (
                v["choices"][0]["text"].as_str().unwrap().to_string(),
                v["choices"][0]["finish_reason"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(
            (got.as_str(), finish.as_str()),
            (want, "stop"),
            "stream {stream}, stop {stop:?}"
        );
    }
    // Chat, not streamed, with the sampled tokens' log-probabilities.
    let (status, body, _) = s.post(
        "/v1/chat/completions",
        &json!({"model": "demo", "messages": [{"role": "user", "content": "Phileas Fogg was"}],
                "max_tokens": 24, "temperature": 0, "logprobs": true})
        .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), text);
    let lps = v["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(
        lps.len() as u64,
        v["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert!(lps.iter().all(|l| l["logprob"].as_f64().unwrap() <= 0.0));
    // Sampling with a seed is reproducible.
    let sampled = || {
        let b = json!({"prompt": "Aouda", "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 7});
        let (status, body, _) = s.post("/v1/completions", &b.to_string());
        assert_eq!(status, 200, "{body}");
        serde_json::from_str::<Value>(&body).unwrap()["choices"][0]["text"].clone()
    };
    assert_eq!(sampled(), sampled());
    // Token ids on request, in whole responses and in chunks.
    let body = json!({"prompt": "Aouda", "max_tokens": 8, "temperature": 0, "return_token_ids": true});
    let (_, whole, _) = s.post("/v1/completions", &body.to_string());
    let whole: Value = serde_json::from_str(&whole).unwrap();
    let ids: Vec<u32> = serde_json::from_value(whole["choices"][0]["token_ids"].clone()).unwrap();
    assert_eq!(
        ids.len() as u64,
        whole["usage"]["completion_tokens"].as_u64().unwrap()
    );
    assert_eq!(
        tok.decode(&ids).unwrap(),
        whole["choices"][0]["text"].as_str().unwrap()
    );
    let mut streamed = vec![];
    let mut stream_body = body.clone();
    stream_body["stream"] = json!(true);
    for l in s.stream("/v1/completions", &stream_body) {
        if let Ok(v) = serde_json::from_str::<Value>(&l) {
            streamed.extend(
                v["choices"][0]["token_ids"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|x| x.as_u64().unwrap() as u32),
            );
        }
    }
    assert_eq!(streamed, ids);
    // The other endpoints.
    let (status, body) = s.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["data"][0]["id"],
        "demo"
    );
    assert_eq!(s.get("/health").0, 200);
}

#[test]
fn a_client_that_disconnects_frees_its_kv() {
    let s = server(false, 4, 16);
    let body = json!({"prompt": "Phileas Fogg was", "max_tokens": 900, "ignore_eos": true, "temperature": 0,
                      "stream": true});
    {
        let mut lines = s.stream("/v1/completions", &body);
        // A few tokens in, the client goes away.
        for _ in 0..3 {
            lines.next().unwrap();
        }
        assert!(
            s.metric("vpod:kv_cache_tokens_used", "") > 0.0,
            "the request should hold KV"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while s.metric("vpod:request_success_total", "finished_reason=\"abort\"") < 1.0
        || s.metric("vpod:kv_cache_tokens_used", "") > 0.0
    {
        assert!(
            Instant::now() < deadline,
            "the request was not aborted, or its KV not freed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        s.metric("vpod:request_success_total", "finished_reason=\"length\""),
        0.0
    );
}

#[test]
fn bad_requests_get_openai_errors() {
    let s = server(false, 2, 4);
    let long: Vec<u32> = (0..1100).map(|i| 5 + i % 100).collect();
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("/v1/completions", "{not json".into(), 400, "not valid JSON"),
        ("/v1/completions", "[1, 2]".into(), 400, "JSON object"),
        (
            "/v1/completions",
            json!({"max_tokens": 5}).to_string(),
            400,
            "`prompt` is required",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "temperature": "hot"}).to_string(),
            400,
            "`temperature` must be a number",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "temperature": -1}).to_string(),
            400,
            "between 0 and 2",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "top_p": 1.5}).to_string(),
            400,
            "`top_p`",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "top_k": -3}).to_string(),
            400,
            "`top_k`",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 0}).to_string(),
            400,
            "at least 1",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": "many"}).to_string(),
            400,
            "`max_tokens`",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "n": 3}).to_string(),
            400,
            "`n` = 1",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "stop": 7}).to_string(),
            400,
            "`stop`",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "logprobs": 5}).to_string(),
            400,
            "`logprobs` must be 0",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "presence_penalty": 1}).to_string(),
            400,
            "not supported",
        ),
        (
            "/v1/completions",
            json!({"prompt": ["a", "b"]}).to_string(),
            400,
            "one prompt",
        ),
        (
            "/v1/completions",
            json!({"prompt": [1, 99999]}).to_string(),
            400,
            "vocabulary of 2048",
        ),
        (
            "/v1/completions",
            json!({"prompt": long}).to_string(),
            400,
            "maximum context length is 1024 tokens",
        ),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 5000}).to_string(),
            400,
            "maximum context length is 1024",
        ),
        (
            "/v1/completions",
            json!({"model": "gpt-4", "prompt": "a"}).to_string(),
            404,
            "`gpt-4` does not exist",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}).to_string(),
            400,
            "`messages` must be an array",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "hi"}]}).to_string(),
            400,
            "`role`",
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "hi"}]}).to_string(),
            400,
            "no chat template",
        ),
        ("/v1/nothing", "{}".into(), 404, "no such endpoint"),
    ];
    for (path, body, status, msg) in cases {
        let (got, text, _) = s.post(path, &body);
        let v: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("{path} {body}: not JSON: {text}"));
        let m = v["error"]["message"].as_str().unwrap_or("");
        assert_eq!(got, status, "{path} {body}: {text}");
        assert!(m.contains(msg), "{path} {body}: {m:?} should contain {msg:?}");
        assert!(v["error"]["type"].is_string(), "{text}");
    }
    // Unknown fields are ignored.
    let (status, body, _) = s.post(
        "/v1/completions",
        &json!({"prompt": "a", "max_tokens": 2, "frobnicate": {"x": 1}, "user": "me"}).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    // Still serving, nothing leaked.
    assert_eq!(s.get("/health").0, 200);
    assert_eq!(s.metric("vpod:kv_cache_tokens_used", ""), 0.0);
}

#[test]
fn a_full_queue_answers_503_with_retry_after() {
    // One request may be in flight.
    let s = server(false, 1, 0);
    let body = json!({"prompt": "Phileas", "max_tokens": 900, "ignore_eos": true, "stream": true});
    let mut first = s.stream("/v1/completions", &body);
    first.next().unwrap();
    let (status, text, retry) = s.post("/v1/completions", &json!({"prompt": "a"}).to_string());
    assert_eq!(status, 503, "{text}");
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(text.contains("capacity"), "{text}");
    drop(first);
}

#[test]
fn shutdown_lets_requests_in_flight_finish() {
    let mut s = server(false, 2, 4);
    let body =
        json!({"prompt": "Phileas", "max_tokens": 40, "ignore_eos": true, "stream": true, "temperature": 0});
    let mut lines = s.stream("/v1/completions", &body);
    lines.next().unwrap();
    s.handle.shutdown();
    let (_, finish, usage) = collect_stream(lines, false);
    assert_eq!(finish, "length");
    assert_eq!(usage["completion_tokens"], 40);
    let Server { handle, .. } = s;
    handle.join().unwrap();
}

#[cfg(unix)]
#[test]
fn cli_serve_exits_zero_on_sigterm() {
    let bin = std::env::var_os("VPOD_CLI_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_cli").into());
    let mut child = std::process::Command::new(bin)
        .args(["serve", "--port", "0", "--device", "cpu"])
        .env("HF_HUB_OFFLINE", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut addr = None;
    let mut log = String::new();
    for _ in 0..50 {
        let mut line = String::new();
        if err.read_line(&mut line).unwrap() == 0 {
            break;
        }
        log.push_str(&line);
        if let Some(a) = line.trim().strip_prefix("listening on http://") {
            addr = Some(a.to_string());
            break;
        }
    }
    let addr = addr.unwrap_or_else(|| panic!("no address in {log}"));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let r = agent.get(format!("http://{addr}/health")).call().unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "cli serve did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "exit {status}: {log}{rest}");
}

/// The `openai` Python package as the client. CI installs it (`.ci/run`
/// sets `VPOD_REQUIRE_OPENAI=1`); elsewhere the test says it is skipped.
#[test]
fn the_openai_python_client_works() {
    let have = std::process::Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        assert!(
            std::env::var_os("VPOD_REQUIRE_OPENAI").is_none(),
            "VPOD_REQUIRE_OPENAI is set but `python3 -c 'import openai'` fails"
        );
        eprintln!("skipped: the openai Python package is not installed (pip install openai)");
        return;
    }
    let prompts = &PROMPTS[..3];
    let want: serde_json::Map<String, Value> = prompts
        .iter()
        .map(|p| (p.to_string(), Value::from(cli_generate_text(p, 20))))
        .collect();
    let s = server(true, 4, 16);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/clients/openai_client.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg(&s.base)
        .arg(Value::Object(want).to_string())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("ok"),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
