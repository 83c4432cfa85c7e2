//! The `reference` backend: attention with plain candle ops over a
//! per-sequence KV store. Slow and simple on purpose: it is the oracle that
//! the paged, vAttention and POD backends are pinned to.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use vpod_kvcache::{KvShape, SeqKvStore};

use crate::{AttentionBackend, AttnConfig, AttnError, BatchMeta, Result, SeqId};

#[derive(Debug)]
pub struct ReferenceBackend {
    cfg: AttnConfig,
    store: SeqKvStore,
    /// 1 / sqrt(head_dim)
    scale: f64,
    /// Causal masks by (context_len, query_len): every layer of a step uses
    /// the same ones, so each is built and uploaded once.
    masks: HashMap<(usize, usize), Tensor>,
}

impl ReferenceBackend {
    pub fn new(cfg: AttnConfig, device: Device) -> Result<Self> {
        let reasons = Self::unsupported_reasons(&cfg, &device);
        if !reasons.is_empty() {
            return Err(AttnError::Unsupported {
                backend: "reference",
                reasons: reasons.join("; "),
            });
        }
        let store = SeqKvStore::new(KvShape {
            num_layers: cfg.num_layers,
            kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            max_seq_len: cfg.max_seq_len,
            dtype: cfg.dtype,
            device,
        });
        let scale = 1.0 / (cfg.head_dim as f64).sqrt();
        Ok(Self {
            cfg,
            store,
            scale,
            masks: HashMap::new(),
        })
    }

    /// The reference runs on any device and dtype; it only needs a sane shape.
    pub fn unsupported_reasons(cfg: &AttnConfig, _device: &Device) -> Vec<String> {
        let mut reasons = Vec::new();
        if cfg.num_kv_heads == 0 || !cfg.num_heads.is_multiple_of(cfg.num_kv_heads) {
            reasons.push(format!(
                "{} query heads are not a multiple of {} key/value heads",
                cfg.num_heads, cfg.num_kv_heads
            ));
        }
        if cfg.head_dim == 0 {
            reasons.push("head_dim is 0".into());
        }
        reasons
    }

    /// The additive causal mask `[query_len, seq_len]` (0 or -inf) for
    /// queries at positions `context_len..`, in the softmax's dtype.
    fn mask(&mut self, context_len: usize, query_len: usize, like: &Tensor) -> Result<Tensor> {
        if let Some(m) = self.masks.get(&(context_len, query_len)) {
            return Ok(m.clone());
        }
        if self.masks.len() >= 64 {
            self.masks.clear();
        }
        let seq_len = context_len + query_len;
        let mask: Vec<f32> = (0..query_len)
            .flat_map(|i| {
                (0..seq_len).map(move |j| {
                    if j <= context_len + i {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
            .collect();
        let m = Tensor::from_vec(mask, (query_len, seq_len), like.device())?.to_dtype(softmax_dtype(like))?;
        self.masks.insert((context_len, query_len), m.clone());
        Ok(m)
    }

    /// Sequences currently holding KV.
    pub fn num_cached_seqs(&self) -> usize {
        self.store.num_seqs()
    }

    fn check_shape(&self, what: &'static str, t: &Tensor, heads: usize, tokens: usize) -> Result<()> {
        let expected = vec![tokens, heads, self.cfg.head_dim];
        if t.dims() != expected.as_slice() {
            return Err(AttnError::BadShape {
                what,
                got: t.dims().to_vec(),
                expected,
            });
        }
        Ok(())
    }
}

impl AttentionBackend for ReferenceBackend {
    fn name(&self) -> &'static str {
        "reference"
    }

    fn forward(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        meta: &BatchMeta,
    ) -> Result<Tensor> {
        let t = meta.num_tokens();
        self.check_shape("q", q, self.cfg.num_heads, t)?;
        self.check_shape("k", k, self.cfg.num_kv_heads, t)?;
        self.check_shape("v", v, self.cfg.num_kv_heads, t)?;
        let mut outs = Vec::with_capacity(meta.num_seqs());
        for (i, s) in meta.seqs().iter().enumerate() {
            let rows = meta.query_range(i);
            let (k_all, v_all) = self.store.append(
                s.seq_id,
                layer,
                s.context_len,
                &k.narrow(0, rows.start, s.query_len)?,
                &v.narrow(0, rows.start, s.query_len)?,
            )?;
            let qs = q.narrow(0, rows.start, s.query_len)?;
            let mask = match s.query_len {
                1 => None,
                _ => Some(self.mask(s.context_len, s.query_len, q)?),
            };
            outs.push(attend_causal(&qs, &k_all, &v_all, mask.as_ref(), self.scale)?);
        }
        match outs.len() {
            1 => Ok(outs.remove(0)),
            _ => Ok(Tensor::cat(&outs, 0)?),
        }
    }

    fn release(&mut self, seq: SeqId) {
        self.store.release(seq);
    }
}

/// The dtype the softmax computes in: candle's CUDA softmax reads bf16/f16
/// and computes in f32 (as transformers upcasts before its softmax); its CPU
/// softmax computes in the input type, so on the CPU we upcast.
fn softmax_dtype(like: &Tensor) -> DType {
    if like.device().is_cpu() {
        DType::F32
    } else {
        like.dtype()
    }
}

/// Causal attention of one sequence's queries over its whole K/V.
///
/// `q: [query_len, H, D]`, `k`, `v: [Hkv, seq_len, D]` (heads-major, as the
/// store keeps them); `mask: [query_len, seq_len]` additive (0 / -inf), or
/// `None` for a single query (it sees every key). Query head `h` reads
/// key/value head `h / (H / Hkv)` (as transformers' `repeat_kv`). The matmuls
/// run in q's dtype (f32 accumulation), the softmax's arithmetic in f32, as
/// transformers' eager attention does. Returns `[query_len, H, D]`.
pub fn attend_causal(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> candle_core::Result<Tensor> {
    let (query_len, num_heads, head_dim) = q.dims3()?;
    let (kv_heads, seq_len, _) = k.dims3()?;
    let group = num_heads / kv_heads;
    // [Hkv, group * query_len, D]: the `group` query heads of a KV head stacked.
    // One query token (decode) needs no transpose.
    let qh = if query_len == 1 {
        q.reshape((kv_heads, group, head_dim))?
    } else {
        q.transpose(0, 1)?
            .contiguous()?
            .reshape((kv_heads, group * query_len, head_dim))?
    };
    // [Hkv, group * query_len, seq_len]
    let mut scores = (qh.matmul(&k.t()?)? * scale)?.to_dtype(softmax_dtype(q))?;
    if let Some(mask) = mask {
        scores = scores
            .reshape((kv_heads, group, query_len, seq_len))?
            .broadcast_add(mask)?
            .reshape((kv_heads, group * query_len, seq_len))?;
    }
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
    if query_len == 1 {
        // out^T = V^T P^T: cuBLAS spreads this [head_dim x group] product
        // with the long seq_len reduction over more blocks than the
        // [group x head_dim] one (on the H100 it cut a Llama-3-8B decode
        // step's matmul time by 0.18 ms, for one extra ~3 us copy a layer).
        let out_t = v.t()?.matmul(&probs.t()?)?; // [Hkv, D, group]
        return out_t.t()?.contiguous()?.reshape((1, num_heads, head_dim));
    }
    let out = probs.matmul(v)?; // [Hkv, group * query_len, D]
    out.reshape((num_heads, query_len, head_dim))?
        .transpose(0, 1)?
        .contiguous()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::{LogitsAt, SeqChunk};

    /// A small f32 attention shape (4 heads, GQA 2, head_dim 8) for unit tests.
    pub(crate) fn cfg() -> AttnConfig {
        AttnConfig {
            num_layers: 1,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            max_seq_len: 64,
            dtype: DType::F32,
        }
    }

    /// Naive per-head softmax(q k^T) v, one query at a time.
    fn naive(q: &[f32], k: &[f32], v: &[f32], len: usize, d: usize) -> Vec<f32> {
        let scores: Vec<f32> = (0..len)
            .map(|j| (0..d).map(|x| q[x] * k[j * d + x]).sum::<f32>() / (d as f32).sqrt())
            .collect();
        let m = scores.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let e: Vec<f32> = scores.iter().map(|s| (s - m).exp()).collect();
        let z: f32 = e.iter().sum();
        (0..d)
            .map(|x| (0..len).map(|j| e[j] / z * v[j * d + x]).sum())
            .collect()
    }

    /// Chunked prefill (5 tokens, then 3) plus a decode must equal the naive
    /// causal attention of the whole 9-token sequence, head by head.
    #[test]
    fn chunked_matches_naive_causal() -> Result<()> {
        let dev = Device::Cpu;
        let c = cfg();
        let n = 9;
        let q = Tensor::randn(0f32, 1.0, (n, 4, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (n, 2, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (n, 2, 8), &dev)?;
        let mut b = ReferenceBackend::new(c, dev.clone())?;
        let mut outs = vec![];
        for (start, len) in [(0, 5), (5, 3), (8, 1)] {
            let meta = BatchMeta::new(
                vec![SeqChunk {
                    seq_id: 1,
                    context_len: start,
                    query_len: len,
                }],
                LogitsAt::LastToken,
                &dev,
            )?;
            let (qs, ks, vs) = (
                q.narrow(0, start, len)?,
                k.narrow(0, start, len)?,
                v.narrow(0, start, len)?,
            );
            outs.push(b.forward(0, &qs, &ks, &vs, &meta)?);
        }
        let got = Tensor::cat(&outs, 0)?;
        for i in 0..n {
            for h in 0..4 {
                let kvh = h / 2;
                let qv = q.get(i)?.get(h)?.to_vec1::<f32>()?;
                let kk = k
                    .narrow(0, 0, i + 1)?
                    .narrow(1, kvh, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let vv = v
                    .narrow(0, 0, i + 1)?
                    .narrow(1, kvh, 1)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                let want = naive(&qv, &kk, &vv, i + 1, 8);
                let have = got.get(i)?.get(h)?.to_vec1::<f32>()?;
                for (a, b) in want.iter().zip(&have) {
                    assert!((a - b).abs() < 1e-5, "token {i} head {h}: {a} vs {b}");
                }
            }
        }
        b.release(1);
        assert_eq!(b.num_cached_seqs(), 0);
        Ok(())
    }

    #[test]
    fn rejects_wrong_shapes_and_unknown_backends() {
        let dev = Device::Cpu;
        let mut b = ReferenceBackend::new(cfg(), dev.clone()).unwrap();
        let meta = BatchMeta::new(
            vec![SeqChunk {
                seq_id: 1,
                context_len: 0,
                query_len: 2,
            }],
            LogitsAt::LastToken,
            &dev,
        )
        .unwrap();
        let q = Tensor::zeros((2, 3, 8), DType::F32, &dev).unwrap();
        let k = Tensor::zeros((2, 2, 8), DType::F32, &dev).unwrap();
        let err = b.forward(0, &q, &k, &k, &meta).unwrap_err();
        assert!(err.to_string().contains("q has shape [2, 3, 8]"), "{err}");
        let err = crate::create_backend("flashy", &cfg(), &dev, &Default::default()).unwrap_err();
        assert!(
            err.to_string()
                .contains("known: reference, paged, vattention, pod"),
            "{err}"
        );
        let mut bad = cfg();
        bad.num_kv_heads = 3;
        assert!(crate::create_backend("reference", &bad, &dev, &Default::default()).is_err());
    }
}
