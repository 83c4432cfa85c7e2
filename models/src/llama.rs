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

use std::ops::Range;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::Embedding;
use vpod_attention::linear::{GemvTiming, linear, linear_add, norm_linear, norm_linear_swiglu, tune_gemv};
use vpod_attention::rope::rope_qk;
use vpod_attention::{AttentionStep, AttnConfig};

use crate::config::LlamaConfig;
use crate::tp::{Communicator, Shard};
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

/// A loaded Llama-family model on one device: the whole model, or one
/// tensor-parallel rank's slices of it ([`crate::tp`]), whose forward calls
/// the ranks' collectives.
#[derive(Debug)]
pub struct Llama {
    cfg: LlamaConfig,
    embed: Embedding, // [vocab (this rank's slice), hidden]
    layers: Vec<Layer>,
    norm: Tensor,    // [hidden]
    lm_head: Tensor, // [vocab (this rank's slice), hidden]
    rope: Rope,
    dtype: DType,
    device: Device,
    shard: Shard,
    /// The ranks' collectives (`None` for the whole model).
    comm: Option<std::sync::Arc<dyn Communicator>>,
    /// The decode projections' GEMV kernels measured at load ([`Self::gemv_timings`]).
    gemv_timings: Vec<GemvTiming>,
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
        Self::load_shard(cfg, w, None, progress)
    }

    /// [`Self::load`] of one tensor-parallel rank (`comm`'s rank of its
    /// world; `None`: the whole model): only the rank's slices are read
    /// ([`TensorSource::get_slice`]).
    pub fn load_shard(
        cfg: &LlamaConfig,
        w: &dyn TensorSource,
        comm: Option<std::sync::Arc<dyn Communicator>>,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Self> {
        let shard = match &comm {
            Some(c) => Shard::new(c.rank(), c.world())?,
            None => Shard::WHOLE,
        };
        shard.check(cfg)?;
        let (h, f, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (qd, kvd) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let get = |name: String, shape: &[usize]| w.get(&name, shape);
        // Rows (dim 0) or columns (dim 1) `r` of `name`.
        let slice = |name: String, shape: &[usize], dim: usize, r: Range<usize>| {
            if shard.world == 1 {
                w.get(&name, shape)
            } else {
                w.get_slice(&name, shape, dim, r)
            }
        };
        let scaled = |r: Range<usize>, by: usize| r.start * by..r.end * by;
        let (heads, kv_heads, ffn, vocab) = (
            shard.heads(cfg),
            shard.kv_heads(cfg),
            shard.ffn(cfg),
            shard.vocab(cfg),
        );
        let embed_w = slice(
            "model.embed_tokens.weight".into(),
            &[cfg.vocab_size, h],
            0,
            vocab.clone(),
        )?;
        let total = cfg.num_layers + 1;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("model.layers.{i}");
            let qkv = Tensor::cat(
                &[
                    slice(
                        format!("{p}.self_attn.q_proj.weight"),
                        &[qd, h],
                        0,
                        scaled(heads.clone(), hd),
                    )?,
                    slice(
                        format!("{p}.self_attn.k_proj.weight"),
                        &[kvd, h],
                        0,
                        scaled(kv_heads.clone(), hd),
                    )?,
                    slice(
                        format!("{p}.self_attn.v_proj.weight"),
                        &[kvd, h],
                        0,
                        scaled(kv_heads.clone(), hd),
                    )?,
                ],
                0,
            )?;
            let gate_up = Tensor::cat(
                &[
                    slice(format!("{p}.mlp.gate_proj.weight"), &[f, h], 0, ffn.clone())?,
                    slice(format!("{p}.mlp.up_proj.weight"), &[f, h], 0, ffn.clone())?,
                ],
                0,
            )?;
            layers.push(Layer {
                attn_norm: get(format!("{p}.input_layernorm.weight"), &[h])?,
                qkv,
                o: slice(
                    format!("{p}.self_attn.o_proj.weight"),
                    &[h, qd],
                    1,
                    scaled(heads.clone(), hd),
                )?,
                mlp_norm: get(format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate_up,
                down: slice(format!("{p}.mlp.down_proj.weight"), &[h, f], 1, ffn.clone())?,
            });
            progress(i + 1, total);
        }
        let norm = get("model.norm.weight".into(), &[h])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            embed_w.clone()
        } else {
            slice("lm_head.weight".into(), &[cfg.vocab_size, h], 0, vocab)?
        };
        progress(total, total);
        let mut model = Self {
            cfg: cfg.clone(),
            embed: Embedding::new(embed_w, h),
            layers,
            norm,
            lm_head,
            rope: Rope::new(cfg, w.dtype(), w.device())?,
            dtype: w.dtype(),
            device: w.device().clone(),
            shard,
            comm,
            gemv_timings: vec![],
        };
        model.gemv_timings = model.tune_gemv()?;
        Ok(model)
    }

    /// Measures the GEMV kernels of the decode path on this model's own
    /// weights, each projection over all layers ([`tune_gemv`]; a no-op off
    /// CUDA, for dtypes other than bf16, with tuning off, or for shapes
    /// measured before in the process), so that its decode steps run the
    /// fastest kernel per shape on this GPU.
    fn tune_gemv(&self) -> Result<Vec<GemvTiming>> {
        let all = |f: fn(&Layer) -> &Tensor| self.layers.iter().map(f).collect::<Vec<_>>();
        // O and down add the residual on the whole model and on rank 0 (row_parallel).
        let residual = self.comm.as_ref().is_none_or(|c| c.rank() == 0);
        let mut out = tune_gemv(&all(|l| &l.qkv), false, false)?;
        out.extend(tune_gemv(&all(|l| &l.o), residual, false)?);
        out.extend(tune_gemv(&all(|l| &l.gate_up), false, true)?);
        out.extend(tune_gemv(&all(|l| &l.down), residual, false)?);
        out.extend(tune_gemv(&[&self.lm_head], false, false)?);
        Ok(out)
    }

    /// What the GEMV tuning ([`tune_gemv`]) measured when this model was loaded (empty
    /// where it did not run, or where an earlier model of the same shapes
    /// had measured them).
    pub fn gemv_timings(&self) -> &[GemvTiming] {
        &self.gemv_timings
    }

    /// Which tensor-parallel slices this model holds.
    pub fn shard(&self) -> Shard {
        self.shard
    }

    /// The tensor-parallel ranks' collectives (`None`: the whole model).
    pub fn comm(&self) -> Option<&std::sync::Arc<dyn Communicator>> {
        self.comm.as_ref()
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
    /// A tensor-parallel rank's backend holds its own heads only.
    pub fn attn_config(&self, max_seq_len: usize) -> AttnConfig {
        AttnConfig {
            num_layers: self.cfg.num_layers,
            num_heads: self.shard.heads(&self.cfg).len(),
            num_kv_heads: self.shard.kv_heads(&self.cfg).len(),
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
        if t != attn.meta().num_rows() {
            return Err(ModelError::Batch(format!(
                "{t} tokens but the step's metadata describes {}",
                attn.meta().num_rows()
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
        // This rank's heads (all of them for the whole model).
        let (heads, kv_heads) = (self.shard.heads(c).len(), self.shard.kv_heads(c).len());
        let (qd, kvd) = (heads * c.head_dim, kv_heads * c.head_dim);
        let mut x = self.embed_tokens(tokens)?; // [T, hidden]
        for (i, l) in self.layers.iter().enumerate() {
            // RMSNorm then the projection (one kernel on the decode path).
            let qkv = norm_linear(&x, &l.attn_norm, eps, &l.qkv)?; // [T, (heads + 2 * kv_heads) * head_dim]
            // RoPE, the K/V write and attention: in fewer launches where the
            // backend fuses them (vattention's decode steps), else rotate, then attend.
            let a = match attn.attend_rope(i, &qkv, &cos, &sin)? {
                Some(a) => a,
                None => {
                    let (q, k) = self.rope.apply(&qkv, &cos, &sin, heads, kv_heads)?;
                    let v = qkv.narrow(1, qd + kvd, kvd)?.reshape((t, kv_heads, c.head_dim))?;
                    attn.attend(i, &q, &k, &v)?
                }
            }; // [T, heads, head_dim]
            x = self.row_parallel(&a.reshape((t, qd))?, &l.o, &x)?;
            let gated = norm_linear_swiglu(&x, &l.mlp_norm, eps, &l.gate_up)?; // [T, ffn]
            x = self.row_parallel(&gated, &l.down, &x)?;
        }
        if let Some(rows) = attn.meta().logit_rows() {
            x = x.index_select(rows, 0)?;
        }
        let logits = norm_linear(&x, &self.norm, eps, &self.lm_head)?.to_dtype(DType::F32)?;
        match &self.comm {
            Some(comm) => comm.all_gather(&logits, 1), // [rows, vocab]: the ranks' slices in order
            None => Ok(logits),
        }
    }

    /// `residual + a W^T` where `W`'s columns (and `a`'s) are split over the
    /// ranks: each rank's partial product, rank 0's with the residual, summed
    /// by one all-reduce.
    fn row_parallel(&self, a: &Tensor, w: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match &self.comm {
            None => Ok(linear_add(a, w, residual)?),
            Some(comm) if comm.rank() == 0 => comm.all_reduce_sum(&linear_add(a, w, residual)?),
            Some(comm) => comm.all_reduce_sum(&linear(a, w)?),
        }
    }

    /// The token embeddings `[T, hidden]`: with the vocabulary split over the
    /// ranks, each rank embeds the tokens of its slice (zero rows for the
    /// others) and an all-reduce sums them.
    fn embed_tokens(&self, tokens: &Tensor) -> Result<Tensor> {
        let Some(comm) = &self.comm else {
            return Ok(self.embed.forward(tokens)?);
        };
        let vocab = self.shard.vocab(&self.cfg);
        let (lo, hi) = (vocab.start as u32, vocab.end.max(vocab.start + 1) as u32 - 1);
        let ids = tokens
            .clamp(lo, hi)?
            .broadcast_sub(&Tensor::new(lo, tokens.device())?)?;
        let mine = tokens
            .ge(lo)?
            .mul(&tokens.lt(vocab.end as u32)?)?
            .to_dtype(self.dtype)?
            .unsqueeze(1)?;
        let x = self.embed.forward(&ids)?.broadcast_mul(&mine)?;
        comm.all_reduce_sum(&x)
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
