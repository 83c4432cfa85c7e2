//! `config.json` of a Llama-family checkpoint, in both generations of Hub
//! files: the older one (`rope_theta`, `rope_scaling`, `torch_dtype` at top
//! level) and the newer one (`rope_parameters` holding `rope_theta`, `dtype`).

use std::path::Path;

use candle_core::DType;
use serde::Deserialize;
use serde_json::Value;

use crate::{ModelError, Result};

/// Llama-3.1's `llama3` RoPE frequency scaling.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Llama3RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: usize,
}

/// The resolved configuration the model file is built from.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rope_scaling: Option<Llama3RopeScaling>,
    pub tie_word_embeddings: bool,
    /// The dtype the checkpoint was saved in, when the config says.
    pub weight_dtype: Option<DType>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Self::One(t) => vec![t],
            Self::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RawConfig {
    architectures: Option<Vec<String>>,
    model_type: Option<String>,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    rms_norm_eps: f64,
    #[serde(default = "default_max_pos")]
    max_position_embeddings: usize,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    rope_parameters: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    #[serde(default)]
    tie_word_embeddings: bool,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    hidden_act: Option<String>,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> usize {
    4096
}

const SUPPORTED_ARCH: &str = "LlamaForCausalLM";
const DEFAULT_ROPE_THETA: f64 = 10_000.0;

impl LlamaConfig {
    /// Reads and validates `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::BadConfig { reason, .. } => ModelError::BadConfig {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })
    }

    /// Parses the text of a `config.json`.
    pub fn from_json(text: &str) -> Result<Self> {
        let bad = |reason: String| ModelError::BadConfig {
            path: "config.json".into(),
            reason,
        };
        // Architecture first, so that e.g. a Mistral or GPT-2 config gets
        // "unsupported architecture" rather than a missing-field complaint.
        let value: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        check_architecture(&value)?;
        let raw: RawConfig = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
        let _ = (&raw.architectures, &raw.model_type);

        if let Some(act) = raw.hidden_act.as_deref().filter(|a| *a != "silu") {
            return Err(bad(format!("hidden_act '{act}' is not supported (only silu)")));
        }
        if raw.attention_bias || raw.mlp_bias {
            return Err(bad("attention or MLP biases are not supported".into()));
        }
        // Sizes that no model can have (they would fail deep inside a
        // forward pass, or divide by zero, instead of here).
        for (name, v) in [
            ("num_hidden_layers", raw.num_hidden_layers),
            ("hidden_size", raw.hidden_size),
            ("intermediate_size", raw.intermediate_size),
            ("vocab_size", raw.vocab_size),
            ("max_position_embeddings", raw.max_position_embeddings),
        ] {
            if v == 0 {
                return Err(bad(format!("{name} must be at least 1, got 0")));
            }
        }
        if !(raw.rms_norm_eps.is_finite() && raw.rms_norm_eps > 0.0) {
            return Err(bad(format!(
                "rms_norm_eps must be a positive number, got {}",
                raw.rms_norm_eps
            )));
        }
        let num_kv_heads = raw.num_key_value_heads.unwrap_or(raw.num_attention_heads);
        if raw.num_attention_heads == 0
            || num_kv_heads == 0
            || !raw.num_attention_heads.is_multiple_of(num_kv_heads)
        {
            return Err(bad(format!(
                "num_attention_heads {} is not a multiple of num_key_value_heads {}",
                raw.num_attention_heads, num_kv_heads
            )));
        }
        let head_dim = match raw.head_dim {
            Some(d) => d,
            None if raw.hidden_size.is_multiple_of(raw.num_attention_heads) => {
                raw.hidden_size / raw.num_attention_heads
            }
            None => {
                return Err(bad(format!(
                    "hidden_size {} is not divisible by num_attention_heads {} and no head_dim is given",
                    raw.hidden_size, raw.num_attention_heads
                )));
            }
        };
        if head_dim == 0 || !head_dim.is_multiple_of(2) {
            return Err(bad(format!(
                "head_dim {head_dim} must be even and positive for RoPE"
            )));
        }

        // Newer files nest everything under rope_parameters; older ones have
        // rope_theta at top level and an optional rope_scaling object.
        let (rope_theta, scaling) = match &raw.rope_parameters {
            Some(p) => {
                let theta = p.get("rope_theta").and_then(Value::as_f64).or(raw.rope_theta);
                (theta, Some(p))
            }
            None => (raw.rope_theta, raw.rope_scaling.as_ref()),
        };
        if let Some(t) = rope_theta
            && !(t.is_finite() && t > 0.0)
        {
            return Err(bad(format!("rope_theta must be a positive number, got {t}")));
        }
        let rope_scaling = match scaling {
            Some(s) if !s.is_null() => parse_rope_scaling(s).map_err(bad)?,
            _ => None,
        };
        let weight_dtype = raw
            .dtype
            .as_deref()
            .or(raw.torch_dtype.as_deref())
            .and_then(parse_dtype);
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_layers: raw.num_hidden_layers,
            num_heads: raw.num_attention_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps,
            max_position_embeddings: raw.max_position_embeddings,
            rope_theta: rope_theta.unwrap_or(DEFAULT_ROPE_THETA),
            rope_scaling,
            tie_word_embeddings: raw.tie_word_embeddings,
            weight_dtype,
            bos_token_id: raw.bos_token_id.and_then(|t| t.into_vec().first().copied()),
            eos_token_ids: raw.eos_token_id.map(TokenIds::into_vec).unwrap_or_default(),
        })
    }

    /// Query heads per key/value head.
    pub fn gqa_group(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Parameters of the model (embeddings and head included).
    pub fn num_parameters(&self) -> usize {
        let (h, f) = (self.hidden_size, self.intermediate_size);
        let attn =
            h * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim + self.num_heads * self.head_dim * h;
        let layer = attn + 3 * h * f + 2 * h;
        let head = if self.tie_word_embeddings {
            0
        } else {
            self.vocab_size * h
        };
        self.num_layers * layer + self.vocab_size * h + head + h
    }
}

fn check_architecture(v: &Value) -> Result<()> {
    let archs: Vec<&str> = v
        .get("architectures")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if archs.is_empty() {
        // No architectures list (some hand-written configs): fall back on model_type.
        return match v.get("model_type").and_then(Value::as_str) {
            Some("llama") | None => Ok(()),
            Some(other) => Err(ModelError::UnsupportedArchitecture {
                found: format!("model_type '{other}'"),
            }),
        };
    }
    if archs.contains(&SUPPORTED_ARCH) {
        Ok(())
    } else {
        Err(ModelError::UnsupportedArchitecture {
            found: archs.join(", "),
        })
    }
}

fn parse_rope_scaling(s: &Value) -> std::result::Result<Option<Llama3RopeScaling>, String> {
    let kind = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    match kind {
        "default" => Ok(None),
        "llama3" => {
            let f = |k: &str| {
                s.get(k)
                    .and_then(Value::as_f64)
                    .ok_or_else(|| format!("llama3 rope scaling lacks '{k}'"))
            };
            Ok(Some(Llama3RopeScaling {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")? as usize,
            }))
        }
        other => Err(format!(
            "rope scaling type '{other}' is not supported (only default and llama3)"
        )),
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "bfloat16" => Some(DType::BF16),
        "float16" => Some(DType::F16),
        "float32" => Some(DType::F32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const YI_6B_OLD: &str = r#"{
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 4, "vocab_size": 64000,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 5000000.0,
        "rope_scaling": null, "torch_dtype": "bfloat16", "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu"
    }"#;

    #[test]
    fn old_generation_without_head_dim() {
        let c = LlamaConfig::from_json(YI_6B_OLD).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.gqa_group(), 8);
        assert_eq!(c.rope_theta, 5e6);
        assert_eq!(c.weight_dtype, Some(DType::BF16));
        assert_eq!(c.rope_scaling, None);
        assert_eq!(c.eos_token_ids, vec![2]);
        // Yi-6B has about 6.06 B parameters.
        assert!(
            (c.num_parameters() as f64 / 1e9 - 6.06).abs() < 0.01,
            "{}",
            c.num_parameters()
        );
    }

    #[test]
    fn new_generation_with_llama3_scaling() {
        let text = r#"{
            "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-05, "dtype": "bfloat16", "bos_token_id": 128000,
            "eos_token_id": [128001, 128008, 128009],
            "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        }"#;
        let c = LlamaConfig::from_json(text).unwrap();
        assert_eq!(c.rope_theta, 5e5);
        let s = c.rope_scaling.unwrap();
        assert_eq!((s.factor, s.original_max_position_embeddings), (8.0, 8192));
        assert_eq!(c.eos_token_ids, vec![128001, 128008, 128009]);
        assert_eq!(c.gqa_group(), 4);
    }

    #[test]
    fn old_generation_llama31_rope_scaling() {
        let text = YI_6B_OLD.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}"#,
        );
        assert!(LlamaConfig::from_json(&text).unwrap().rope_scaling.is_some());
        let yarn = YI_6B_OLD.replace(
            r#""rope_scaling": null"#,
            r#""rope_scaling": {"type": "yarn", "factor": 4.0}"#,
        );
        let err = LlamaConfig::from_json(&yarn).unwrap_err().to_string();
        assert!(err.contains("'yarn' is not supported"), "{err}");
    }

    #[test]
    fn refuses_other_architectures() {
        let text = YI_6B_OLD.replace("LlamaForCausalLM", "MistralForCausalLM");
        let err = LlamaConfig::from_json(&text).unwrap_err();
        assert!(matches!(err, ModelError::UnsupportedArchitecture { .. }));
        assert!(err.to_string().contains("MistralForCausalLM"), "{err}");
        let gpt2 = r#"{"model_type": "gpt2", "n_embd": 768}"#;
        assert!(matches!(
            LlamaConfig::from_json(gpt2),
            Err(ModelError::UnsupportedArchitecture { .. })
        ));
    }

    #[test]
    fn refuses_impossible_values() {
        for (from, to, want) in [
            (
                r#""num_hidden_layers": 32"#,
                r#""num_hidden_layers": 0"#,
                "num_hidden_layers must be at least 1",
            ),
            (
                r#""vocab_size": 64000"#,
                r#""vocab_size": 0"#,
                "vocab_size must be at least 1",
            ),
            (
                r#""rope_theta": 5000000.0"#,
                r#""rope_theta": -1.0"#,
                "rope_theta must be a positive number",
            ),
            (
                r#""rope_theta": 5000000.0"#,
                r#""rope_theta": 0"#,
                "rope_theta must be a positive number",
            ),
            (
                r#""rms_norm_eps": 1e-05"#,
                r#""rms_norm_eps": 0"#,
                "rms_norm_eps must be a positive number",
            ),
            (
                r#""num_key_value_heads": 4"#,
                r#""num_key_value_heads": 0"#,
                "num_key_value_heads 0",
            ),
            (
                r#""max_position_embeddings": 4096"#,
                r#""max_position_embeddings": 0"#,
                "max_position_embeddings",
            ),
        ] {
            let text = YI_6B_OLD.replace(from, to);
            assert_ne!(text, YI_6B_OLD);
            let err = LlamaConfig::from_json(&text).unwrap_err().to_string();
            assert!(err.contains(want), "{to}: {err}");
        }
    }
}
