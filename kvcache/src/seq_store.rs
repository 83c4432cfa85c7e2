//! The per-sequence KV store of the `reference` backend.
//!
//! Every (sequence, layer) owns one K and one V tensor laid out heads-major,
//! `[kv_heads, capacity, head_dim]`, of which the first `len` positions are
//! valid: a view `[kv_heads, len, head_dim]` is what a batched attention
//! matmul reads directly, with no transposing copy.
//! Appending writes the new rows in place (`slice_set`); when the capacity is
//! exhausted the tensor is reallocated at twice the size (capped at the
//! per-sequence limit), so a generation of `n` tokens costs O(n) copies in
//! total rather than the O(n^2) of concatenating each step.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use crate::{KvCacheError, Result, SeqId};

/// The geometry every stored K/V tensor shares.
#[derive(Debug, Clone)]
pub struct KvShape {
    pub num_layers: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Longest sequence (context + query tokens) the store accepts.
    pub max_seq_len: usize,
    pub dtype: DType,
    pub device: Device,
}

#[derive(Debug)]
struct LayerKv {
    /// [kv_heads, capacity, head_dim]
    k: Tensor,
    /// [kv_heads, capacity, head_dim]
    v: Tensor,
    /// Valid rows of `k` and `v`.
    len: usize,
}

/// Simple per-sequence KV storage, keyed by [`SeqId`].
#[derive(Debug)]
pub struct SeqKvStore {
    shape: KvShape,
    seqs: HashMap<SeqId, Vec<Option<LayerKv>>>,
}

const MIN_CAPACITY: usize = 16;

impl SeqKvStore {
    pub fn new(shape: KvShape) -> Self {
        Self {
            shape,
            seqs: HashMap::new(),
        }
    }

    pub fn shape(&self) -> &KvShape {
        &self.shape
    }

    /// Number of sequences holding KV.
    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Tokens cached for `seq` (at layer 0), `None` if the sequence is unknown.
    pub fn seq_len(&self, seq: SeqId) -> Option<usize> {
        let layers = self.seqs.get(&seq)?;
        Some(layers.first()?.as_ref().map_or(0, |l| l.len))
    }

    /// Bytes held by all K/V tensors (allocated capacity, not only valid rows).
    pub fn allocated_bytes(&self) -> usize {
        let row = self.shape.kv_heads * self.shape.head_dim * self.shape.dtype.size_in_bytes();
        self.seqs
            .values()
            .flatten()
            .flatten()
            .map(|l| 2 * l.k.dim(1).unwrap_or(0) * row)
            .sum()
    }

    /// Appends the step's new keys and values of `seq` at `layer` after its
    /// `context_len` cached tokens, and returns views of the whole sequence's
    /// K and V, each `[kv_heads, context_len + query_len, head_dim]`.
    ///
    /// `k`, `v`: `[query_len, kv_heads, head_dim]`. A sequence that is not yet
    /// in the store is created when `context_len == 0`.
    pub fn append(
        &mut self,
        seq: SeqId,
        layer: usize,
        context_len: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let s = &self.shape;
        if layer >= s.num_layers {
            return Err(KvCacheError::LayerOutOfRange {
                layer,
                num_layers: s.num_layers,
            });
        }
        for t in [k, v] {
            let dims = t.dims();
            if dims.len() != 3 || dims[1] != s.kv_heads || dims[2] != s.head_dim {
                return Err(KvCacheError::BadShape {
                    got: dims.to_vec(),
                    kv_heads: s.kv_heads,
                    head_dim: s.head_dim,
                });
            }
        }
        if k.dims() != v.dims() {
            return Err(KvCacheError::BadShape {
                got: v.dims().to_vec(),
                kv_heads: s.kv_heads,
                head_dim: s.head_dim,
            });
        }
        let query_len = k.dim(0)?;
        let needed = context_len + query_len;
        if needed > s.max_seq_len {
            return Err(KvCacheError::SequenceTooLong {
                seq,
                needed,
                limit: s.max_seq_len,
            });
        }
        if context_len > 0 && !self.seqs.contains_key(&seq) {
            return Err(KvCacheError::UnknownSequence { seq });
        }
        let (num_layers, shape) = (s.num_layers, s.clone());
        let layers = self
            .seqs
            .entry(seq)
            .or_insert_with(|| (0..num_layers).map(|_| None).collect());
        let slot = &mut layers[layer];
        let have = slot.as_ref().map_or(0, |l| l.len);
        if have != context_len {
            return Err(KvCacheError::LengthMismatch {
                seq,
                layer,
                have,
                expected: context_len,
            });
        }
        let capacity = slot.as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if needed > capacity {
            let new_cap = needed.max(2 * capacity).max(MIN_CAPACITY).min(shape.max_seq_len);
            let dims = (shape.kv_heads, new_cap, shape.head_dim);
            let nk = Tensor::zeros(dims, shape.dtype, &shape.device)?;
            let nv = Tensor::zeros(dims, shape.dtype, &shape.device)?;
            if let Some(old) = slot.as_ref().filter(|l| l.len > 0) {
                nk.slice_set(&old.k.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
                nv.slice_set(&old.v.narrow(1, 0, old.len)?.contiguous()?, 1, 0)?;
            }
            *slot = Some(LayerKv {
                k: nk,
                v: nv,
                len: have,
            });
        }
        let Some(l) = slot.as_mut() else {
            unreachable!("slot was filled above")
        };
        if query_len > 0 {
            // [query_len, kv_heads, head_dim] -> [kv_heads, query_len, head_dim]; no copy for one token.
            let heads_major = |t: &Tensor| t.to_dtype(shape.dtype)?.transpose(0, 1)?.contiguous();
            l.k.slice_set(&heads_major(k)?, 1, context_len)?;
            l.v.slice_set(&heads_major(v)?, 1, context_len)?;
        }
        l.len = needed;
        Ok((l.k.narrow(1, 0, needed)?, l.v.narrow(1, 0, needed)?))
    }

    /// Drops all KV of `seq`; returns whether it was present.
    pub fn release(&mut self, seq: SeqId) -> bool {
        self.seqs.remove(&seq).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store(max: usize) -> SeqKvStore {
        SeqKvStore::new(KvShape {
            num_layers: 2,
            kv_heads: 2,
            head_dim: 4,
            max_seq_len: max,
            dtype: DType::F32,
            device: Device::Cpu,
        })
    }

    fn rows(n: usize, base: f32) -> Tensor {
        let data: Vec<f32> = (0..n * 8).map(|i| base + i as f32).collect();
        Tensor::from_vec(data, (n, 2, 4), &Device::Cpu).unwrap()
    }

    #[test]
    fn append_grows_and_keeps_earlier_rows() -> Result<()> {
        let mut s = store(100);
        let a = rows(10, 0.0);
        s.append(7, 0, 0, &a, &a)?;
        // 10 + 20 crosses the initial capacity of 16: the store reallocates.
        let b = rows(20, 1000.0);
        let (k, v) = s.append(7, 0, 10, &b, &b)?;
        assert_eq!(k.dims(), &[2, 30, 4]);
        let expect = Tensor::cat(&[&a, &b], 0)?.transpose(0, 1)?;
        let diff = (k - &expect)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let diff = (v - &expect)?.abs()?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        assert_eq!(s.seq_len(7), Some(30));
        assert_eq!(s.num_seqs(), 1);
        Ok(())
    }

    #[test]
    fn refuses_inconsistent_appends() {
        let mut s = store(8);
        let a = rows(4, 0.0);
        assert!(matches!(
            s.append(1, 0, 2, &a, &a),
            Err(KvCacheError::UnknownSequence { seq: 1 })
        ));
        s.append(1, 0, 0, &a, &a).unwrap();
        assert!(matches!(
            s.append(1, 0, 3, &a, &a),
            Err(KvCacheError::LengthMismatch { have: 4, .. })
        ));
        assert!(matches!(
            s.append(1, 0, 4, &rows(5, 0.0), &rows(5, 0.0)),
            Err(KvCacheError::SequenceTooLong {
                needed: 9,
                limit: 8,
                ..
            })
        ));
        assert!(matches!(
            s.append(1, 5, 4, &a, &a),
            Err(KvCacheError::LayerOutOfRange { layer: 5, .. })
        ));
        assert!(s.release(1));
        assert!(!s.release(1));
    }
}
