//! `cli serve`: an OpenAI-compatible HTTP server on the engine.
//!
//! ```text
//! HTTP handlers (tokio, axum)  --Command-->  engine thread (owns the Engine, steps while work is in flight)
//!        ^                                        |
//!        +------ per-request Event channel -------+   tokens, then Finished
//! ```
//!
//! Endpoints: `POST /v1/completions`, `POST /v1/chat/completions` (the
//! model's chat template), both streaming as server-sent events with
//! `"stream": true` (ending in `data: [DONE]`); `GET /v1/models`,
//! `GET /health`, `GET /metrics` (Prometheus). A client that disconnects has
//! its request aborted and its KV freed; a full queue answers 503 with
//! `Retry-After`; SIGINT/SIGTERM stop accepting, let what runs finish (for up
//! to `--shutdown-timeout` seconds, then abort it) and exit 0.

pub mod api;
pub mod chat;
pub mod metrics;
pub mod text;
pub mod worker;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{Stream, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use vpod_engine::{Engine, EngineError, NewRequest, RequestId, RequestOutput, SamplingParams};
use vpod_models::TextTokenizer;

use self::api::{ApiError, Common, Fields, Prompt, finish_reason, read_messages, read_prompt};
use self::chat::ChatTemplate;
use self::metrics::Metrics;
use self::text::OutputText;
use self::worker::{AddError, Command, EngineHandle, Event};

/// How the server runs (the engine is built separately).
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The name clients put in `model` (and `/v1/models` lists).
    pub model_name: String,
    /// Requests in flight (running + waiting) beyond which new ones get 503.
    pub max_in_flight: usize,
    /// At shutdown, how long requests in flight may run before they are aborted.
    pub shutdown_timeout: Duration,
}

/// What every handler shares.
#[derive(Debug)]
struct AppState {
    cfg: ServerConfig,
    engine: EngineHandle,
    tokenizer: Option<TextTokenizer>,
    chat: Option<ChatTemplate>,
    /// Why chat is unavailable, when it is.
    chat_missing: String,
    max_context: usize,
    vocab: usize,
    metrics: Arc<Metrics>,
    in_flight: AtomicUsize,
    stopping: AtomicBool,
    created: u64,
    next_id: AtomicUsize,
}

/// A running server: its address; [`ServerHandle::shutdown`] starts the
/// graceful stop, [`ServerHandle::join`] waits for it.
#[derive(Debug)]
pub struct ServerHandle {
    pub addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl ServerHandle {
    /// Stops accepting connections; requests in flight finish (or are
    /// aborted after the shutdown timeout).
    pub fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }

    /// Waits until the server and its engine thread have stopped.
    pub fn join(mut self) -> anyhow::Result<()> {
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => anyhow::bail!("the server thread panicked"),
            None => Ok(()),
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts the server on `listener` (already bound) with `engine` on its own
/// thread. Returns once it accepts connections. `signals`: also stop on
/// SIGINT / SIGTERM (the binary; tests stop it through the handle).
pub fn start(
    engine: Engine,
    cfg: ServerConfig,
    listener: std::net::TcpListener,
    signals: bool,
) -> anyhow::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    let model = engine.model.clone();
    let tokenizer = model.tokenizer().ok().cloned();
    let (chat, chat_missing) = match model.files.as_ref().and_then(|f| f.tokenizer_config.as_ref()) {
        Some(path) => match ChatTemplate::load(path)? {
            Some(t) => (Some(t), String::new()),
            None => (None, format!("{} has no chat_template", path.display())),
        },
        None => (
            None,
            "the model has no tokenizer_config.json (so no chat template)".to_string(),
        ),
    };
    let metrics = Arc::new(Metrics::new(&cfg.model_name));
    let (tx, rx) = std::sync::mpsc::channel();
    let engine_thread = {
        let metrics = metrics.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || worker::run(engine, rx, metrics))?
    };
    let state = Arc::new(AppState {
        max_context: model.config.max_position_embeddings,
        vocab: model.config.vocab_size,
        cfg,
        engine: EngineHandle::new(tx),
        tokenizer,
        chat,
        chat_missing,
        metrics,
        in_flight: AtomicUsize::new(0),
        stopping: AtomicBool::new(false),
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        next_id: AtomicUsize::new(0),
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("http".into())
        .spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()?;
            let r = rt.block_on(serve(state.clone(), listener, stop_rx, signals, ready_tx));
            state.engine.send(Command::Stop);
            drop(state);
            // The engine ends once its queue is empty (and every sender gone).
            let _ = engine_thread.join();
            r
        })?;
    ready_rx
        .recv_timeout(Duration::from_secs(30))
        .map_err(|_| anyhow::anyhow!("the server did not start"))??;
    Ok(ServerHandle {
        addr,
        stop: Some(stop_tx),
        thread: Some(thread),
    })
}

async fn serve(
    state: Arc<AppState>,
    listener: std::net::TcpListener,
    stop: tokio::sync::oneshot::Receiver<()>,
    signals: bool,
    ready: std::sync::mpsc::Sender<anyhow::Result<()>>,
) -> anyhow::Result<()> {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            let _ = ready.send(Err(e.into()));
            return Ok(());
        }
    };
    let app = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .with_state(state.clone());
    let _ = ready.send(Ok(()));
    let shutdown = {
        let state = state.clone();
        async move {
            wait_for_stop(stop, signals).await;
            eprintln!("shutting down: no new requests; waiting for the ones in flight");
            state.stopping.store(true, Ordering::SeqCst);
            // Past the grace period, abort what still runs: its streams end
            // with finish_reason "abort" and the connections close.
            let timeout = state.cfg.shutdown_timeout;
            let engine = state.engine.clone();
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                engine.send(Command::AbortAll);
            });
        }
    };
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await?;
    Ok(())
}

async fn wait_for_stop(stop: tokio::sync::oneshot::Receiver<()>, signals: bool) {
    if !signals {
        let _ = stop.await;
        return;
    }
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = stop => {}
        _ = ctrl_c => {}
        _ = term => {}
    }
}

async fn not_found() -> ApiError {
    ApiError::with_status(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.stopping.load(Ordering::SeqCst) {
        return ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")
            .into_response();
    }
    (StatusCode::OK, axum::Json(json!({"status": "ok"}))).into_response()
}

async fn metrics_text(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
        .into_response()
}

async fn models(State(s): State<Arc<AppState>>) -> axum::Json<Value> {
    axum::Json(json!({
        "object": "list",
        "data": [{
            "id": s.cfg.model_name,
            "object": "model",
            "created": s.created,
            "owned_by": "vpod",
            "max_model_len": s.max_context,
            "vocab_size": s.vocab,
        }],
    }))
}

/// Which endpoint a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Completion,
    Chat,
}

/// A request, checked and tokenized.
#[derive(Debug)]
struct Prepared {
    kind: Kind,
    prompt: Vec<u32>,
    common: Common,
    max_tokens: usize,
    logprobs: bool,
    /// Add each chunk's generated ids (`return_token_ids`, and always for a
    /// model without a tokenizer, whose output has no text).
    token_ids: bool,
    received: Instant,
}

async fn completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let received = Instant::now();
    match prepare_completion(&s, &body, received) {
        Ok(p) => run(s, p).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(State(s): State<Arc<AppState>>, body: Bytes) -> Response {
    let received = Instant::now();
    match prepare_chat(&s, &body, received) {
        Ok(p) => run(s, p).await,
        Err(e) => e.into_response(),
    }
}

fn return_token_ids(s: &AppState, f: &Fields) -> Result<bool, ApiError> {
    Ok(f.bool("return_token_ids")?.unwrap_or(false) || s.tokenizer.is_none())
}

fn check_model(s: &AppState, c: &Common) -> Result<(), ApiError> {
    match &c.model {
        Some(m) if *m != s.cfg.model_name => Err(ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!(
                "The model `{m}` does not exist; this server serves `{}`.",
                s.cfg.model_name
            ),
            param: Some("model".into()),
            code: Some("model_not_found"),
            retry_after: None,
        }),
        _ => Ok(()),
    }
}

fn tokenizer(s: &AppState) -> Result<&TextTokenizer, ApiError> {
    s.tokenizer.as_ref().ok_or_else(|| {
        ApiError::bad(
            None,
            "this model has no tokenizer (synthetic weights): send `prompt` as token ids",
        )
    })
}

fn prepare_completion(s: &AppState, body: &[u8], received: Instant) -> Result<Prepared, ApiError> {
    let map = Fields::parse(body)?;
    let f = Fields::new(&map);
    let common = Common::read(&f, &["max_tokens"])?;
    check_model(s, &common)?;
    for k in ["echo"] {
        if f.bool(k)? == Some(true) {
            return Err(ApiError::bad(Some(k), format!("`{k}` is not supported")));
        }
    }
    if f.str("suffix")?.is_some_and(|x| !x.is_empty()) {
        return Err(ApiError::bad(Some("suffix"), "`suffix` is not supported"));
    }
    if let Some(b) = f.u64("best_of")?
        && b != 1
    {
        return Err(ApiError::bad(
            Some("best_of"),
            format!("only `best_of` = 1 is supported, got {b}"),
        ));
    }
    // Completions' `logprobs` is how many alternatives to list beside the
    // sampled token; we report the sampled token's alone (0).
    let logprobs = match f.u64("logprobs")? {
        None => false,
        Some(0) => true,
        Some(n) => {
            return Err(ApiError::bad(
                Some("logprobs"),
                format!(
                    "only the sampled token's log-probability is reported: `logprobs` must be 0, got {n}"
                ),
            ));
        }
    };
    let prompt = match read_prompt(&f)? {
        Prompt::Text(t) => tokenizer(s)?
            .encode_with_bos(&t)
            .map_err(|e| ApiError::bad(Some("prompt"), e.to_string()))?,
        Prompt::Ids(ids) => ids,
    };
    let max_tokens = common.max_tokens.unwrap_or(16);
    check_lengths(s, &prompt, max_tokens, common.max_tokens.is_some())?;
    Ok(Prepared {
        kind: Kind::Completion,
        prompt,
        common,
        max_tokens,
        logprobs,
        token_ids: return_token_ids(s, &f)?,
        received,
    })
}

fn prepare_chat(s: &AppState, body: &[u8], received: Instant) -> Result<Prepared, ApiError> {
    let map = Fields::parse(body)?;
    let f = Fields::new(&map);
    let common = Common::read(&f, &["max_tokens", "max_completion_tokens"])?;
    check_model(s, &common)?;
    let logprobs = f.bool("logprobs")?.unwrap_or(false);
    if let Some(n) = f.u64("top_logprobs")?
        && n > 0
    {
        return Err(ApiError::bad(
            Some("top_logprobs"),
            format!(
                "only the sampled token's log-probability is reported: `top_logprobs` must be 0, got {n}"
            ),
        ));
    }
    let messages = read_messages(&f)?;
    let template = s.chat.as_ref().ok_or_else(|| {
        ApiError::bad(
            Some("messages"),
            format!(
                "this model has no chat template ({}): use /v1/completions",
                s.chat_missing
            ),
        )
    })?;
    let text = template
        .render(&messages)
        .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
    // The template writes the special tokens (BOS included) itself.
    let prompt = tokenizer(s)?
        .encode(&text)
        .map_err(|e| ApiError::bad(Some("messages"), e.to_string()))?;
    let max_tokens = common
        .max_tokens
        .unwrap_or_else(|| s.max_context.saturating_sub(prompt.len()).max(1));
    check_lengths(s, &prompt, max_tokens, common.max_tokens.is_some())?;
    Ok(Prepared {
        kind: Kind::Chat,
        prompt,
        common,
        max_tokens,
        logprobs,
        token_ids: return_token_ids(s, &f)?,
        received,
    })
}

/// The prompt (and, when the client set it, prompt + `max_tokens`) must fit
/// the context; answered with the numbers.
fn check_lengths(s: &AppState, prompt: &[u32], max_tokens: usize, explicit: bool) -> Result<(), ApiError> {
    if prompt.is_empty() {
        return Err(ApiError::bad(Some("prompt"), "the prompt is empty (no tokens)"));
    }
    if let Some(&id) = prompt.iter().find(|&&t| t as usize >= s.vocab) {
        return Err(ApiError::bad(
            Some("prompt"),
            format!("token id {id} is outside the model's vocabulary of {}", s.vocab),
        ));
    }
    let ctx = s.max_context;
    if prompt.len() >= ctx || (explicit && prompt.len() + max_tokens > ctx) {
        return Err(ApiError::bad(
            Some(if prompt.len() >= ctx {
                "prompt"
            } else {
                "max_tokens"
            }),
            format!(
                "This model's maximum context length is {ctx} tokens. However, you requested {} tokens ({} in the \
                 prompt, {max_tokens} for the completion). Please reduce the length of the prompt or max_tokens.",
                prompt.len() + max_tokens,
                prompt.len()
            ),
        ));
    }
    Ok(())
}

/// Counts a request in flight until dropped.
struct InFlight(Arc<AppState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Aborts the engine request when the response is dropped before it
/// finished (the client went away, or a stop string ended it early).
struct AbortOnDrop {
    id: RequestId,
    engine: EngineHandle,
    done: bool,
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if !self.done {
            self.engine.send(Command::Abort(self.id));
        }
    }
}

async fn run(s: Arc<AppState>, p: Prepared) -> Response {
    if s.stopping.load(Ordering::SeqCst) {
        return ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, "the server is shutting down")
            .into_response();
    }
    let limit = s.cfg.max_in_flight;
    if s.in_flight.fetch_add(1, Ordering::SeqCst) >= limit {
        s.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut e = ApiError::with_status(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the server is at capacity ({limit} requests in flight); retry later"),
        );
        e.retry_after = Some(1);
        return e.into_response();
    }
    let in_flight = InFlight(s.clone());
    let c = &p.common;
    let request = NewRequest {
        prompt: p.prompt.clone(),
        max_tokens: p.max_tokens,
        sampling: SamplingParams {
            temperature: c.temperature,
            top_p: c.top_p,
            top_k: c.top_k,
            seed: c.seed.unwrap_or_else(|| {
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64)
            }),
            ignore_eos: c.ignore_eos,
        },
        stop_token_ids: vec![],
        logprobs: p.logprobs,
        arrival: Some(p.received),
    };
    let (id, rx) = match s.engine.add(request).await {
        Ok(x) => x,
        Err(AddError::Stopped) => {
            return ApiError::with_status(StatusCode::SERVICE_UNAVAILABLE, "the engine has stopped")
                .into_response();
        }
        Err(AddError::Refused(e)) => {
            let param = match e {
                EngineError::BadSampling(_) => Some("temperature"),
                _ => Some("prompt"),
            };
            return ApiError::bad(param, e.to_string()).into_response();
        }
    };
    let n = s.next_id.fetch_add(1, Ordering::Relaxed);
    let prefix = if p.kind == Kind::Chat { "chatcmpl" } else { "cmpl" };
    let generation = Generation {
        id: format!("{prefix}-{:x}{n:06x}", s.created),
        guard: AbortOnDrop {
            id,
            engine: s.engine.clone(),
            done: false,
        },
        out: OutputText::new(p.common.stop.clone()),
        rx,
        logprobs: vec![],
        ids: vec![],
        finish: None,
        error: None,
        _in_flight: in_flight,
        state: s,
        p,
    };
    if generation.p.common.stream {
        stream_response(generation)
    } else {
        whole_response(generation).await
    }
}

/// One request's generation as the handler sees it.
struct Generation {
    id: String,
    state: Arc<AppState>,
    p: Prepared,
    rx: mpsc::UnboundedReceiver<Event>,
    guard: AbortOnDrop,
    out: OutputText,
    /// (token text, logprob) of each token, when asked for.
    logprobs: Vec<(String, f32)>,
    /// The generated ids (their count is `completion_tokens`).
    ids: Vec<u32>,
    finish: Option<&'static str>,
    error: Option<String>,
    _in_flight: InFlight,
}

/// What one event added to the output.
struct Delta {
    text: String,
    logprobs: Vec<(String, f32)>,
    ids: Vec<u32>,
}

impl Generation {
    /// Waits for the next event; `None` once the request is done.
    async fn next(&mut self) -> Option<Delta> {
        if self.finish.is_some() {
            return None;
        }
        let tok = self.state.tokenizer.as_ref();
        let mut delta = Delta {
            text: String::new(),
            logprobs: vec![],
            ids: vec![],
        };
        match self.rx.recv().await {
            Some(Event::Token { token, logprob }) => {
                self.ids.push(token);
                delta.ids.push(token);
                if let Some(lp) = logprob {
                    let text = tok.and_then(|t| t.decode(&[token]).ok()).unwrap_or_default();
                    delta.logprobs.push((text.clone(), lp));
                    self.logprobs.push((text, lp));
                }
                let Some(tok) = tok else {
                    return Some(delta);
                };
                match self.out.push(tok, token) {
                    Ok(piece) => {
                        delta.text = piece.text;
                        if piece.stopped {
                            // The output ends here: abort the engine request
                            // now, so that its KV is freed at once.
                            self.finish = Some("stop");
                            self.guard.engine.send(Command::Abort(self.guard.id));
                            self.guard.done = true;
                        }
                    }
                    Err(e) => self.fail(e.to_string()),
                }
            }
            Some(Event::Finished(o)) => {
                self.guard.done = true;
                if let Some(tok) = tok {
                    match self.out.finish(tok) {
                        Ok(piece) => delta.text = piece.text,
                        Err(e) => self.fail(e.to_string()),
                    }
                }
                self.end(&o);
            }
            None => {
                self.guard.done = true;
                self.fail("the engine stopped".into());
            }
        }
        Some(delta)
    }

    fn end(&mut self, o: &RequestOutput) {
        if self.finish.is_none() {
            self.finish = Some(finish_reason(o.finish_reason));
            self.error = o.error.clone();
        }
    }

    fn fail(&mut self, e: String) {
        self.finish = Some("error");
        self.error = Some(e);
    }

    fn usage(&self) -> Value {
        let prompt = self.p.prompt.len();
        let generated = self.ids.len();
        json!({"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated})
    }

    fn model(&self) -> &str {
        &self.state.cfg.model_name
    }

    fn logprobs_json(&self, lps: &[(String, f32)], text_offset: usize) -> Value {
        if !self.p.logprobs || lps.is_empty() {
            return Value::Null;
        }
        match self.p.kind {
            Kind::Completion => {
                let mut off = text_offset;
                let offsets: Vec<usize> = lps
                    .iter()
                    .map(|(t, _)| {
                        let o = off;
                        off += t.len();
                        o
                    })
                    .collect();
                json!({
                    "tokens": lps.iter().map(|l| &l.0).collect::<Vec<_>>(),
                    "token_logprobs": lps.iter().map(|l| l.1).collect::<Vec<_>>(),
                    "top_logprobs": Value::Null,
                    "text_offset": offsets,
                })
            }
            Kind::Chat => json!({"content": lps.iter().map(|(t, lp)| json!({
                "token": t, "logprob": lp, "bytes": t.as_bytes(), "top_logprobs": [],
            })).collect::<Vec<_>>()}),
        }
    }

    /// One SSE chunk's JSON.
    fn chunk(
        &self,
        text: &str,
        lps: &[(String, f32)],
        ids: &[u32],
        offset: usize,
        finish: Option<&str>,
        first: bool,
    ) -> Value {
        let created = self.state.created;
        let mut v = match self.p.kind {
            Kind::Completion => json!({
                "id": self.id, "object": "text_completion", "created": created, "model": self.model(),
                "choices": [{"index": 0, "text": text, "logprobs": self.logprobs_json(lps, offset), "finish_reason": finish}],
            }),
            Kind::Chat => {
                let mut delta = serde_json::Map::new();
                if first {
                    delta.insert("role".into(), json!("assistant"));
                }
                if !text.is_empty() || first {
                    delta.insert("content".into(), json!(text));
                }
                json!({
                    "id": self.id, "object": "chat.completion.chunk", "created": created, "model": self.model(),
                    "choices": [{"index": 0, "delta": delta, "logprobs": self.logprobs_json(lps, offset), "finish_reason": finish}],
                })
            }
        };
        if self.p.token_ids {
            v["choices"][0]["token_ids"] = json!(ids);
        }
        v
    }
}

async fn whole_response(mut g: Generation) -> Response {
    while g.next().await.is_some() {}
    if let (Some("error"), Some(e)) = (g.finish, &g.error) {
        return ApiError::with_status(StatusCode::INTERNAL_SERVER_ERROR, e.clone()).into_response();
    }
    let text = g.out.released.clone();
    let lps = g.logprobs_json(&g.logprobs, 0);
    let body = match g.p.kind {
        Kind::Completion => json!({
            "id": g.id, "object": "text_completion", "created": g.state.created, "model": g.model(),
            "choices": [{"index": 0, "text": text, "logprobs": lps, "finish_reason": g.finish}],
            "usage": g.usage(),
        }),
        Kind::Chat => json!({
            "id": g.id, "object": "chat.completion", "created": g.state.created, "model": g.model(),
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lps,
                         "finish_reason": g.finish}],
            "usage": g.usage(),
        }),
    };
    let mut body = body;
    if g.p.token_ids {
        body["choices"][0]["token_ids"] = json!(g.ids);
    }
    axum::Json(body).into_response()
}

fn stream_response(g: Generation) -> Response {
    Sse::new(sse_events(g))
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The request's SSE events: a chunk per piece of text (chat: a first one
/// with the role), a last chunk with `finish_reason` and `usage` (and, with
/// `stream_options.include_usage`, OpenAI's extra usage-only chunk), then
/// `[DONE]`. Dropping the stream (the client went away) aborts the request.
fn sse_events(g: Generation) -> impl Stream<Item = Result<SseEvent, std::convert::Infallible>> {
    enum Phase {
        Start,
        Tokens,
        Done,
    }
    let data = |v: Value| SseEvent::default().data(v.to_string());
    futures_util::stream::unfold((g, Phase::Start, 0usize), move |(mut g, phase, offset)| async move {
        match phase {
            Phase::Start if g.p.kind == Kind::Chat => {
                let c = g.chunk("", &[], &[], 0, None, true);
                Some((vec![data(c)], (g, Phase::Tokens, offset)))
            }
            Phase::Start | Phase::Tokens => {
                let Some(d) = g.next().await else {
                    return Some((vec![SseEvent::default().data("[DONE]")], (g, Phase::Done, offset)));
                };
                let mut events = vec![];
                if let (Some("error"), Some(e)) = (g.finish, &g.error) {
                    events.push(data(json!({"error": {"message": e, "type": "server_error", "param": null, "code": null}})));
                    return Some((events, (g, Phase::Tokens, offset)));
                }
                if !d.text.is_empty() || !d.logprobs.is_empty() || (g.p.token_ids && !d.ids.is_empty()) {
                    events.push(data(g.chunk(&d.text, &d.logprobs, &d.ids, offset, None, false)));
                }
                let offset = offset + d.text.len();
                if let Some(f) = g.finish {
                    let mut last = g.chunk("", &[], &[], offset, Some(f), false);
                    last["usage"] = g.usage();
                    events.push(data(last));
                    if g.p.common.include_usage {
                        let mut u = g.chunk("", &[], &[], offset, None, false);
                        u["choices"] = json!([]);
                        u["usage"] = g.usage();
                        events.push(data(u));
                    }
                }
                Some((events, (g, Phase::Tokens, offset)))
            }
            Phase::Done => None,
        }
    })
    .flat_map(|events| futures_util::stream::iter(events.into_iter().map(Ok)))
}
