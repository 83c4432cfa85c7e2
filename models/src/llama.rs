//! The Llama-family model (`LlamaForCausalLM`: Yi-6B, Llama-3-8B, Yi-34B):
//! token embedding, `num_layers` x (RMSNorm, GQA attention with RoPE, RMSNorm,
//! SiLU-gated MLP), final RMSNorm, untied LM head.
//!
//! The forward pass runs on a *packed batch*: the new tokens of every
//! scheduled sequence flattened into one `[T]` tensor, positions and
//! per-sequence boundaries in the step's [`BatchMeta`]. Prefill, decode and
//! hybrid (chunked-prefill + decode) steps are the same call; attention goes
//! through [`AttentionStep::attend`], once per layer.
//!
//! [`BatchMeta`]: vpod_attention::BatchMeta

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use vpod_attention::linear::{linear, linear_add, linear_swiglu};
use vpod_attention::rope::rope_qk;
use vpod_attention::{AttentionStep, AttnConfig};

use crate::config::LlamaConfig;
use crate::weights::TensorSource;
use crate::{ModelError, Result};

/// One decoder layer. The q/k/v projections are fused into one matmul, and
/// so are gate/up: fewer, larger GEMMs (a decode step is a chain of
/// bandwidth-bound GEMVs whose launch count matters on the GPU); the residual
/// adds and the SiLU gate ride in the projections' epilogues
/// (`vpod_attention::linear`).
#[derive(Debug)]
struct Layer {
    attn_norm: Tensor, // [hidden]
    qkv: Tensor,       // [(heads + 2 * kv_heads) * head_dim, hidden]
    o: Tensor,         // [hidden, heads * head_dim]
    mlp_norm: Tensor,  // [hidden]
    gate_up: Tensor,   // [2 * ffn, hidden]
    down: Tensor,      // [hidden, ffn]
}

/// RoPE tables for every position, in the compute dtype.
#[derive(Debug)]
struct Rope {
    cos: Tensor, // [max_position_embeddings, head_dim / 2]
    sin: Tensor, // [max_position_embeddings, head_dim / 2]
}

impl Rope {
    fn new(cfg: &LlamaConfig, dtype: DType, device: &Device) -> Result<Self> {
        let inv_freq = inverse_frequencies(cfg);
        let (n, half) = (cfg.max_position_embeddings, inv_freq.len());
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv_freq {
                // Angles in f64: at 100K+ positions f32 angles lose whole radians' worth of digits.
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        let t = |v: Vec<f32>| Tensor::from_vec(v, (n, half), device)?.to_dtype(dtype);
        Ok(Self {
            cos: t(cos)?,
            sin: t(sin)?,
        })
    }

    /// Rotates the q and k heads of `qkv [T, (heads + 2 kv_heads) head_dim]`
    /// by each token's angles (`cos`, `sin`: this step's rows of the tables):
    /// `(q [T, heads, head_dim], k [T, kv_heads, head_dim])`. In bf16 one
    /// pass that leaves both contiguous ([`rope_qk`]); otherwise candle's
    /// `rope_thd` over the copied-out columns.
    fn apply(
        &self,
        qkv: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        heads: usize,
        kv_heads: usize,
    ) -> Result<(Tensor, Tensor)> {
        let d = 2 * cos.dim(1)?;
        if qkv.dtype() == DType::BF16 && d.is_multiple_of(16) {
            return Ok(rope_qk(qkv, cos, sin, heads, kv_heads)?);
        }
        let t = qkv.dim(0)?;
        let qk = qkv
            .narrow(1, 0, (heads + kv_heads) * d)?
            .reshape((1, t, heads + kv_heads, d))?;
        let qk = candle_nn::rotary_emb::rope_thd(&qk.contiguous()?, cos, sin)?.squeeze(0)?;
        Ok((qk.narrow(1, 0, heads)?, qk.narrow(1, heads, kv_heads)?))
    }
}

/// `theta^(-2i/d)`, with Llama-3.1's frequency-dependent scaling when configured
/// (as transformers' `_compute_llama3_parameters`).
fn inverse_frequencies(cfg: &LlamaConfig) -> Vec<f64> {
    let d = cfg.head_dim;
    let base: Vec<f64> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf(2.0 * i as f64 / d as f64))
        .collect();
    let Some(s) = cfg.rope_scaling else { return base };
    let old_ctx = s.original_max_position_embeddings as f64;
    let low_freq_wavelen = old_ctx / s.low_freq_factor;
    let high_freq_wavelen = old_ctx / s.high_freq_factor;
    base.into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_freq_wavelen {
                f
            } else if wavelen > low_freq_wavelen {
                f / s.factor
            } else {
                let smooth =
                    (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
                (1.0 - smooth) * f / s.factor + smooth * f
            }
        })
        .collect()
}

/// A loaded Llama-family model on one device.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding, // [vocab, hidden]
    layers: Vec<Layer>,
    norm: Tensor,    // [hidden]
    lm_head: Tensor, // [vocab, hidden]
    rope: Rope,
    dtype: DType,
    device: Device,
}

impl Llama {
    /// Builds the model from checkpoint (or synthetic) weights, checking
    /// every tensor's shape against the config. `progress(done, total)` is
    /// called per layer.
    pub fn load(
        cfg: &LlamaConfig,
        w: &dyn TensorSource,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim);
        let get = |name: String, shape: &[usize]| w.get(&name, shape);
        let embed_w = get("model.embed_tokens.weight".into(), &[cfg.vocab_size, h])?;
        let total = cfg.num_layers + 1;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let qkv = Tensor::cat(
                &[
                    get(format!("{p}.self_attn.q_proj.weight"), &[qd, h])?,
                    get(format!("{p}.self_attn.k_proj.weight"), &[kvd, h])?,
                    get(format!("{p}.self_attn.v_proj.weight"), &[kvd, h])?,
                ],
                0,
            )?;
            let gate_up = Tensor::cat(
                &[
                    get(format!("{p}.mlp.gate_proj.weight"), &[f, h])?,
                    get(format!("{p}.mlp.up_proj.weight"), &[f, h])?,
                ],
                0,
            )?;
            layers.push(Layer {
                attn_norm: get(format!("{p}.input_layernorm.weight"), &[h])?,
                qkv,
                o: get(format!("{p}.self_attn.o_proj.weight"), &[h, qd])?,
                mlp_norm: get(format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down: get(format!("{p}.mlp.down_proj.weight"), &[h, f])?,
            });
            progress(i + 1, total);
        }
        let norm = get("model.norm.weight".into(), &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed_w.clone()
        } else {
            get("lm_head.weight".into(), &[cfg.vocab_size, h])?
        };
        progress(total, total);
        Ok(Self {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, h),
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, w.dtype(), w.device())?,
            dtype: w.dtype(),
            device: w.device().clone(),
        })
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The attention geometry for building a backend; `max_seq_len` is the
    /// longest sequence the backend must hold.
    pub fn attn_config(&self, max_seq_len: usize) -> AttnConfig {
        AttnConfig {
            num_layers: self.cfg.num_layers,
            num_heads: self.cfg.num_heads,
            num_kv_heads: self.cfg.num_kv_heads,
            head_dim: self.cfg.head_dim,
            max_seq_len,
            dtype: self.dtype,
        }
    }

    /// One step over a packed batch.
    ///
    /// `tokens: [T]` u32, the step's tokens of every sequence, in the order of
    /// `attn.meta()`. Returns f32 logits `[rows, vocab]`: one row per sequence
    /// (its last token) or one per token, as the metadata asks.
    pub fn forward(&self, tokens: &Tensor, attn: &mut AttentionStep<'_>) -> Result<Tensor> {
        let c = &self.cfg;
        let t = tokens.dims1()?;
        if t != attn.meta().num_tokens() {
            return Err(ModelError::Batch(format!(
                "{t} tokens but the step's metadata describes {}",
                attn.meta().num_tokens()
            )));
        }
        let positions = attn.meta().positions();
        let max_pos = attn.meta().max_seq_len();
        if max_pos > c.max_position_embeddings {
            return Err(ModelError::ContextTooLong {
                needed: max_pos,
                limit: c.max_position_embeddings,
            });
        }
        let cos = self.rope.cos.index_select(positions, 0)?; // [T, head_dim / 2]
        let sin = self.rope.sin.index_select(positions, 0)?;
        let eps = c.rms_norm_eps as f32;
        let (qd, kvd) = (c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim);
        let mut x = self.embed.forward(tokens)?; // [T, hidden]
        for (i, l) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &l.attn_norm, eps)?;
            let qkv = linear(&h, &l.qkv)?; // [T, (heads + 2 * kv_heads) * head_dim]
            let (q, k) = self.rope.apply(&qkv, &cos, &sin, c.num_heads, c.num_kv_heads)?;
            let v = qkv
                .narrow(1, qd + kvd, kvd)?
                .reshape((t, c.num_kv_heads, c.head_dim))?;
            let a = attn.attend(i, &q, &k, &v)?; // [T, heads, head_dim]
            x = linear_add(&a.reshape((t, qd))?, &l.o, &x)?;
            let h = candle_nn::ops::rms_norm(&x, &l.mlp_norm, eps)?;
            let gated = linear_swiglu(&h, &l.gate_up)?; // [T, ffn]
            x = linear_add(&gated, &l.down, &x)?;
        }
        if let Some(rows) = attn.meta().logit_rows() {
            x = x.index_select(rows, 0)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        Ok(linear(&x, &self.lm_head)?.to_dtype(DType::F32)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_transformers_formula() {
        let mut cfg = LlamaConfig::from_json(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
               "num_hidden_layers": 1, "num_attention_heads": 32, "num_key_value_heads": 8,
               "vocab_size": 10, "rope_theta": 500000.0}"#,
        )
        .unwrap();
        let plain = inverse_frequencies(&cfg);
        cfg.rope_scaling = Some(crate::config::Llama3RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        });
        let scaled = inverse_frequencies(&cfg);
        // High frequencies (short wavelengths) are untouched, the lowest are divided by the factor.
        assert_eq!(scaled[0], plain[0]);
        assert!((scaled[63] - plain[63] / 8.0).abs() < 1e-20);
        // In between, the scaled frequency lies between f / factor and f.
        let mid = scaled
            .iter()
            .zip(&plain)
            .filter(|(s, p)| *s < *p && **s > **p / 8.0)
            .count();
        assert!(mid > 0);
    }
}
