//! The OpenAI request bodies, read field by field so that every wrong type
//! or value is answered with the field's name (`param`) and what was
//! expected, and OpenAI-style error objects. Unknown fields are ignored, as
//! OpenAI's API ignores them; parameters we know but do not implement
//! (penalties, `logit_bias`, `n` > 1, `echo`, ...) are refused when they ask
//! for something other than their neutral value, never silently dropped.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};

use super::chat::Message;

/// An error answered as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
    /// Seconds, for 503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn bad(param: Option<&str>, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            param: param.map(String::from),
            code: None,
            retry_after: None,
        }
    }

    pub fn with_status(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            code: None,
            retry_after: None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status.as_u16() {
            400 | 404 | 422 => "invalid_request_error",
            503 => "service_unavailable",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.code,
        }});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

type Result<T> = std::result::Result<T, ApiError>;

/// A JSON object's fields, read with typed errors.
#[derive(Debug)]
pub struct Fields<'a>(&'a Map<String, Value>);

/// JSON's name for a value's type, for error messages.
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl<'a> Fields<'a> {
    /// The body as an object (a body that is not JSON, or not an object, is a 400).
    pub fn parse(body: &[u8]) -> Result<Map<String, Value>> {
        match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(m)) => Ok(m),
            Ok(v) => Err(ApiError::bad(
                None,
                format!("the request body must be a JSON object, got {}", type_name(&v)),
            )),
            Err(e) => Err(ApiError::bad(
                None,
                format!("the request body is not valid JSON: {e}"),
            )),
        }
    }

    pub fn new(m: &'a Map<String, Value>) -> Self {
        Self(m)
    }

    /// A field's value; JSON `null` counts as absent.
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }

    fn wrong(&self, k: &str, want: &str) -> ApiError {
        let got = self.0.get(k).map_or("nothing", type_name);
        ApiError::bad(Some(k), format!("`{k}` must be {want}, got {got}"))
    }

    pub fn f32(&self, k: &str) -> Result<Option<f32>> {
        self.get(k)
            .map(|v| {
                v.as_f64()
                    .map(|x| x as f32)
                    .ok_or_else(|| self.wrong(k, "a number"))
            })
            .transpose()
    }

    pub fn i64(&self, k: &str) -> Result<Option<i64>> {
        self.get(k)
            .map(|v| v.as_i64().ok_or_else(|| self.wrong(k, "an integer")))
            .transpose()
    }

    pub fn u64(&self, k: &str) -> Result<Option<u64>> {
        self.get(k)
            .map(|v| v.as_u64().ok_or_else(|| self.wrong(k, "a non-negative integer")))
            .transpose()
    }

    pub fn bool(&self, k: &str) -> Result<Option<bool>> {
        self.get(k)
            .map(|v| v.as_bool().ok_or_else(|| self.wrong(k, "a boolean")))
            .transpose()
    }

    pub fn str(&self, k: &str) -> Result<Option<&'a str>> {
        self.get(k)
            .map(|v| v.as_str().ok_or_else(|| self.wrong(k, "a string")))
            .transpose()
    }

    /// `stop`: a string or an array of strings.
    pub fn stop(&self) -> Result<Vec<String>> {
        match self.get("stop") {
            None => Ok(vec![]),
            Some(Value::String(s)) => Ok(vec![s.clone()]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|s| {
                    s.as_str()
                        .map(String::from)
                        .ok_or_else(|| self.wrong("stop", "a string or an array of strings"))
                })
                .collect(),
            Some(_) => Err(self.wrong("stop", "a string or an array of strings")),
        }
    }
}

/// The sampling and stopping parameters both endpoints share.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: usize,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
    pub ignore_eos: bool,
}

impl Common {
    /// `max_tokens_keys`: the names the endpoint accepts for the token limit.
    pub fn read(f: &Fields, max_tokens_keys: &[&str]) -> Result<Self> {
        let model = f.str("model")?.map(String::from);
        let mut max_tokens = None;
        for k in max_tokens_keys {
            if let Some(n) = f.u64(k)? {
                if n == 0 {
                    return Err(ApiError::bad(Some(k), format!("`{k}` must be at least 1")));
                }
                max_tokens = Some(n as usize);
            }
        }
        let temperature = f.f32("temperature")?.unwrap_or(1.0);
        if !temperature.is_finite() || !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad(
                Some("temperature"),
                format!("`temperature` must be between 0 and 2, got {temperature}"),
            ));
        }
        let top_p = f.f32("top_p")?.unwrap_or(1.0);
        if !top_p.is_finite() || top_p <= 0.0 || top_p > 1.0 {
            return Err(ApiError::bad(
                Some("top_p"),
                format!("`top_p` must be in (0, 1], got {top_p}"),
            ));
        }
        // vLLM's convention: -1 (or 0) turns top-k off.
        let top_k = match f.i64("top_k")? {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => {
                return Err(ApiError::bad(
                    Some("top_k"),
                    format!("`top_k` must be -1 (off) or a positive integer, got {k}"),
                ));
            }
        };
        let seed = match f.get("seed") {
            None => None,
            Some(v) => Some(
                v.as_u64()
                    .or_else(|| v.as_i64().map(|s| s as u64))
                    .ok_or_else(|| f.wrong("seed", "an integer"))?,
            ),
        };
        if let Some(n) = f.get("n")
            && n.as_u64() != Some(1)
        {
            return Err(ApiError::bad(
                Some("n"),
                format!("only `n` = 1 is supported, got {n}"),
            ));
        }
        for k in ["presence_penalty", "frequency_penalty"] {
            if let Some(p) = f.f32(k)?
                && p != 0.0
            {
                return Err(ApiError::bad(
                    Some(k),
                    format!("`{k}` is not supported (only 0), got {p}"),
                ));
            }
        }
        if let Some(p) = f.f32("repetition_penalty")?
            && p != 1.0
        {
            return Err(ApiError::bad(
                Some("repetition_penalty"),
                format!("`repetition_penalty` is not supported (only 1), got {p}"),
            ));
        }
        if let Some(b) = f.get("logit_bias")
            && b.as_object().is_none_or(|m| !m.is_empty())
        {
            return Err(ApiError::bad(Some("logit_bias"), "`logit_bias` is not supported"));
        }
        let include_usage = match f.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => Fields::new(o).bool("include_usage")?.unwrap_or(false),
            Some(_) => return Err(f.wrong("stream_options", "an object")),
        };
        Ok(Self {
            model,
            max_tokens,
            temperature,
            top_p,
            top_k,
            seed,
            stop: f.stop()?,
            stream: f.bool("stream")?.unwrap_or(false),
            include_usage,
            ignore_eos: f.bool("ignore_eos")?.unwrap_or(false),
        })
    }
}

/// `prompt` of `/v1/completions`: text, or token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

/// `prompt`: a string, an array of one string, an array of token ids, or an
/// array of one array of token ids (several prompts would need `n` choices).
pub fn read_prompt(f: &Fields) -> Result<Prompt> {
    let wrong = || {
        f.wrong(
            "prompt",
            "a string, an array of token ids, or an array holding one of these",
        )
    };
    let ids = |a: &Vec<Value>| -> Result<Vec<u32>> {
        a.iter()
            .map(|v| {
                v.as_u64()
                    .filter(|&x| x <= u32::MAX as u64)
                    .map(|x| x as u32)
                    .ok_or_else(wrong)
            })
            .collect()
    };
    match f.get("prompt") {
        None => Err(ApiError::bad(Some("prompt"), "`prompt` is required")),
        Some(Value::String(s)) => Ok(Prompt::Text(s.clone())),
        Some(Value::Array(a)) if a.iter().all(|v| v.is_number()) => Ok(Prompt::Ids(ids(a)?)),
        Some(Value::Array(a)) if a.len() == 1 => match &a[0] {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(inner) => Ok(Prompt::Ids(ids(inner)?)),
            _ => Err(wrong()),
        },
        Some(Value::Array(a)) if a.len() > 1 => Err(ApiError::bad(
            Some("prompt"),
            format!("one prompt per request is supported, got {}", a.len()),
        )),
        Some(_) => Err(wrong()),
    }
}

/// `messages` of `/v1/chat/completions`: `role` strings and `content`
/// strings (or arrays of `{"type": "text", "text": ...}` parts).
pub fn read_messages(f: &Fields) -> Result<Vec<Message>> {
    let Some(Value::Array(list)) = f.get("messages") else {
        return Err(match f.get("messages") {
            None => ApiError::bad(Some("messages"), "`messages` is required"),
            Some(_) => f.wrong("messages", "an array of messages"),
        });
    };
    if list.is_empty() {
        return Err(ApiError::bad(Some("messages"), "`messages` is empty"));
    }
    list.iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |what: &str| ApiError::bad(Some("messages"), format!("messages[{i}]: {what}"));
            let m = m.as_object().ok_or_else(|| bad("must be an object"))?;
            let role = m
                .get("role")
                .and_then(|r| r.as_str())
                .ok_or_else(|| bad("`role` must be a string"))?;
            let content = match m.get("content") {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (p.get("type").and_then(|t| t.as_str()), p.get("text").and_then(|t| t.as_str())) {
                            (Some("text"), Some(t)) => s.push_str(t),
                            _ => return Err(bad("only text content parts ({\"type\": \"text\", \"text\": ...}) are supported")),
                        }
                    }
                    s
                }
                Some(_) => return Err(bad("`content` must be a string or an array of text parts")),
            };
            Ok(Message {
                role: role.to_string(),
                content,
            })
        })
        .collect()
}

/// OpenAI's finish reasons of ours: EOS and stop ids or strings are `stop`,
/// the token limit and a full context `length`; `abort` for a request the
/// server ended (shutdown).
pub fn finish_reason(r: vpod_engine::FinishReason) -> &'static str {
    use vpod_engine::FinishReason::*;
    match r {
        Eos | Stop => "stop",
        Length | ContextFull => "length",
        Aborted => "abort",
        Error => "error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn wrong_types_and_values_name_the_field() {
        let cases = [
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"temperature": 3.5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"max_tokens": -1}), "max_tokens"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"n": 2}), "n"),
            (json!({"stop": 5}), "stop"),
            (json!({"stream": "yes"}), "stream"),
            (json!({"presence_penalty": 0.5}), "presence_penalty"),
        ];
        for (body, param) in cases {
            let m = fields(body.clone());
            let e = Common::read(&Fields::new(&m), &["max_tokens"]).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}");
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
        }
        let m = fields(json!({"unknown_field": 1, "temperature": 0, "stop": ["a", "b"], "n": 1}));
        let c = Common::read(&Fields::new(&m), &["max_tokens"]).unwrap();
        assert_eq!((c.temperature, c.stop.len()), (0.0, 2));
    }

    #[test]
    fn prompts_in_every_accepted_shape() {
        let read = |v: Value| read_prompt(&Fields::new(&fields(json!({ "prompt": v }))));
        assert_eq!(read(json!("hi")).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(read(json!(["hi"])).unwrap(), Prompt::Text("hi".into()));
        assert_eq!(read(json!([1, 2])).unwrap(), Prompt::Ids(vec![1, 2]));
        assert_eq!(read(json!([[1, 2]])).unwrap(), Prompt::Ids(vec![1, 2]));
        assert!(read(json!(["a", "b"])).is_err());
        assert!(read(json!([1, -2])).is_err());
        assert!(read(json!({"a": 1})).is_err());
    }
}
