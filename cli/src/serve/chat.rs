//! The model's own chat template: `chat_template` of its
//! `tokenizer_config.json` (a string, or a list of named templates of which
//! `default` is used), rendered with minijinja the way transformers'
//! `apply_chat_template` renders it: `messages`, `add_generation_prompt`,
//! `bos_token`, `eos_token`, and a `raise_exception(message)` function.

use std::path::Path;

use minijinja::{Environment, Error, ErrorKind, Value};
use serde::Serialize;

/// One chat message as the template sees it.
#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

/// A parsed chat template and the special tokens it may print.
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: String,
    eos_token: String,
}

/// Why the template cannot be loaded or rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the chat template of {path} does not parse: {reason}")]
    Parse { path: String, reason: String },
    #[error("the chat template failed: {0}")]
    Render(String),
}

/// A special token as `tokenizer_config.json` writes it: a string, or an
/// object with its `content`.
fn token_text(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Object(o)) => o
            .get("content")
            .and_then(|c| c.as_str())
            .unwrap_or("")
            .to_string(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of `tokenizer_config.json`, or `None` when it has none.
    pub fn load(path: &Path) -> Result<Option<Self>, ChatError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ChatError::Read {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let cfg: serde_json::Value = serde_json::from_str(&text).map_err(|e| ChatError::Read {
            path: p.clone(),
            reason: e.to_string(),
        })?;
        let source = match cfg.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => {
                let named = |name: &str| {
                    list.iter()
                        .find(|t| t.get("name").and_then(|n| n.as_str()) == Some(name))
                };
                match named("default")
                    .and_then(|t| t.get("template"))
                    .and_then(|t| t.as_str())
                {
                    Some(s) => s.to_string(),
                    None => return Ok(None),
                }
            }
            _ => return Ok(None),
        };
        Self::new(
            &source,
            token_text(cfg.get("bos_token")),
            token_text(cfg.get("eos_token")),
        )
        .map(Some)
        .map_err(|reason| ChatError::Parse { path: p, reason })
    }

    /// A template from its source.
    pub fn new(source: &str, bos_token: String, eos_token: String) -> Result<Self, String> {
        let mut env = Environment::new();
        // Python's str methods (`.strip()`, `.startswith()`), which HF templates use.
        env.set_unknown_method_callback(minijinja_py_methods);
        env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
            Err(Error::new(ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| e.to_string())?;
        Ok(Self {
            env,
            bos_token,
            eos_token,
        })
    }

    /// The prompt text of `messages`, ending with the assistant's turn.
    pub fn render(&self, messages: &[Message]) -> Result<String, ChatError> {
        let t = self
            .env
            .get_template("chat")
            .map_err(|e| ChatError::Render(e.to_string()))?;
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => true,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ChatError::Render(e.to_string()))
    }
}

/// The few Python string methods chat templates call on strings.
fn minijinja_py_methods(
    _state: &minijinja::State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let Some(s) = value.as_str() else {
        return Err(Error::from(ErrorKind::UnknownMethod));
    };
    let arg = |i: usize| args.get(i).and_then(|a| a.as_str()).unwrap_or("");
    Ok(match method {
        "strip" if args.is_empty() => Value::from(s.trim()),
        "strip" => Value::from(s.trim_matches(|c| arg(0).contains(c))),
        "lstrip" => Value::from(s.trim_start()),
        "rstrip" => Value::from(s.trim_end()),
        "startswith" => Value::from(s.starts_with(arg(0))),
        "endswith" => Value::from(s.ends_with(arg(0))),
        "upper" => Value::from(s.to_uppercase()),
        "lower" => Value::from(s.to_lowercase()),
        _ => return Err(Error::from(ErrorKind::UnknownMethod)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_llama3_style_template() {
        let src = "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n\
                   {{ m['content'] | trim }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}\
                   <|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";
        let t = ChatTemplate::new(src, "<s>".into(), "</s>".into()).unwrap();
        let out = t
            .render(&[Message {
                role: "user".into(),
                content: " Hi ".into(),
            }])
            .unwrap();
        assert_eq!(
            out,
            "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        );
    }

    #[test]
    fn raise_exception_is_an_error() {
        let src =
            "{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}ok";
        let t = ChatTemplate::new(src, String::new(), String::new()).unwrap();
        let e = t
            .render(&[Message {
                role: "assistant".into(),
                content: String::new(),
            }])
            .unwrap_err();
        assert!(e.to_string().contains("first must be user"), "{e}");
    }
}
