//! Per-step batch metadata, built once on the host by [`BatchMeta::new`] and
//! passed explicitly to every layer's attention call.

use std::collections::HashSet;
use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::{AttnError, Result, SeqId};

/// One sequence's share of a step: `query_len` new tokens after
/// `context_len` tokens already in the KV cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqChunk {
    pub seq_id: SeqId,
    pub context_len: usize,
    pub query_len: usize,
}

impl SeqChunk {
    /// `context_len + query_len`: the sequence's length after this step.
    pub fn seq_len(&self) -> usize {
        self.context_len + self.query_len
    }
}

/// Which rows of the packed batch the model turns into logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsAt {
    /// One row per sequence, at its last query token (generation).
    LastToken,
    /// Every token (teacher-forced scoring, perplexity).
    AllTokens,
}

/// Everything a backend needs to know about this step's packed batch.
#[derive(Debug)]
pub struct BatchMeta {
    /// One entry per sequence, in packed order.
    seqs: Vec<SeqChunk>,
    /// `[num_seqs + 1]`: first packed row of each sequence's queries; the last entry is T.
    query_start: Vec<usize>,
    /// `[T]` u32: absolute position of each packed token (`context_len + i`).
    positions: Tensor,
    /// `[num_seqs]` u32 rows whose logits are wanted, or `None` for all rows.
    logit_rows: Option<Tensor>,
    /// Rows after the last sequence's that repeat the first sequence's
    /// decode ([`Self::padded`]; 0 otherwise).
    pad: usize,
    /// Unique per `BatchMeta::new`: a backend's step plan records the step
    /// it was built for, so that it is never used for another one.
    id: u64,
}

impl BatchMeta {
    /// Builds the metadata of a step. Refuses an empty batch, an empty chunk
    /// and a sequence scheduled twice.
    pub fn new(seqs: Vec<SeqChunk>, logits: LogitsAt, device: &Device) -> Result<Self> {
        if seqs.is_empty() {
            return Err(AttnError::InvalidBatch("no sequences in the batch".into()));
        }
        let mut seen = HashSet::new();
        let mut query_start = Vec::with_capacity(seqs.len() + 1);
        let mut positions = Vec::new();
        let mut last_rows = Vec::with_capacity(seqs.len());
        for s in &seqs {
            if s.query_len == 0 {
                return Err(AttnError::InvalidBatch(format!(
                    "sequence {} has no query tokens",
                    s.seq_id
                )));
            }
            if !seen.insert(s.seq_id) {
                return Err(AttnError::InvalidBatch(format!(
                    "sequence {} appears twice",
                    s.seq_id
                )));
            }
            query_start.push(positions.len());
            positions.extend((s.context_len..s.seq_len()).map(|p| p as u32));
            last_rows.push((positions.len() - 1) as u32);
        }
        query_start.push(positions.len());
        let n = positions.len();
        let positions = Tensor::from_vec(positions, n, device)?;
        let logit_rows = match logits {
            LogitsAt::LastToken => Some(Tensor::from_vec(last_rows, seqs.len(), device)?),
            LogitsAt::AllTokens => None,
        };
        Ok(Self {
            seqs,
            query_start,
            positions,
            logit_rows,
            pad: 0,
            id: next_id(),
        })
    }

    /// A decode step padded to `rows` rows, for a CUDA graph captured at that
    /// batch size: every sequence decodes one token (`query_len` 1), row i
    /// is sequence i's and rows `seqs.len()..rows` repeat sequence 0's (its
    /// token, position, cache row: they write the same K/V bytes to the same
    /// place and their outputs are dropped). `positions: [rows]` u32 is a
    /// buffer the caller has filled (a captured step reads it in place);
    /// logits come for every row.
    pub fn padded(seqs: Vec<SeqChunk>, rows: usize, positions: Tensor) -> Result<Self> {
        let n = seqs.len();
        if n == 0 || rows < n {
            return Err(AttnError::InvalidBatch(format!(
                "a padded decode step of {rows} rows cannot hold {n} sequences"
            )));
        }
        if let Some(s) = seqs.iter().find(|s| s.query_len != 1) {
            return Err(AttnError::InvalidBatch(format!(
                "sequence {} has {} query tokens; a padded step holds decodes only",
                s.seq_id, s.query_len
            )));
        }
        if positions.dims() != [rows] || positions.dtype() != candle_core::DType::U32 {
            return Err(AttnError::BadShape {
                what: "padded step positions (u32)",
                got: positions.dims().to_vec(),
                expected: vec![rows],
            });
        }
        let mut seen = HashSet::new();
        if let Some(s) = seqs.iter().find(|s| !seen.insert(s.seq_id)) {
            return Err(AttnError::InvalidBatch(format!(
                "sequence {} appears twice",
                s.seq_id
            )));
        }
        Ok(Self {
            query_start: (0..=n).collect(),
            seqs,
            positions,
            logit_rows: None,
            pad: rows - n,
            id: next_id(),
        })
    }

    /// This step's identity (see [`crate::AttentionBackend::plan_step`]).
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn seqs(&self) -> &[SeqChunk] {
        &self.seqs
    }

    pub fn num_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// T: tokens of the sequences in the packed batch (padding rows aside).
    pub fn num_tokens(&self) -> usize {
        self.query_start[self.seqs.len()]
    }

    /// Rows of the packed batch: T and the padding rows of a
    /// [`Self::padded`] step (the model's input and output rows).
    pub fn num_rows(&self) -> usize {
        self.num_tokens() + self.pad
    }

    /// Padding rows ([`Self::padded`]).
    pub fn padding(&self) -> usize {
        self.pad
    }

    /// Packed rows of sequence `i`'s queries.
    pub fn query_range(&self, i: usize) -> Range<usize> {
        self.query_start[i]..self.query_start[i + 1]
    }

    /// `[num_seqs + 1]` offsets of each sequence's first query row.
    pub fn query_start(&self) -> &[usize] {
        &self.query_start
    }

    /// `[rows]` u32 positions, for RoPE.
    pub fn positions(&self) -> &Tensor {
        &self.positions
    }

    /// `[num_seqs]` u32 rows to compute logits at; `None` means all rows.
    pub fn logit_rows(&self) -> Option<&Tensor> {
        self.logit_rows.as_ref()
    }

    /// Longest `seq_len` in the batch.
    pub fn max_seq_len(&self) -> usize {
        self.seqs.iter().map(SeqChunk::seq_len).max().unwrap_or(0)
    }

    /// Whether every sequence contributes exactly one token (a decode step).
    pub fn is_decode_only(&self) -> bool {
        self.seqs.iter().all(|s| s.query_len == 1)
    }
}

fn next_id() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packs_positions_and_last_rows() -> Result<()> {
        let seqs = vec![
            SeqChunk {
                seq_id: 3,
                context_len: 0,
                query_len: 3,
            },
            SeqChunk {
                seq_id: 9,
                context_len: 10,
                query_len: 1,
            },
            SeqChunk {
                seq_id: 4,
                context_len: 5,
                query_len: 2,
            },
        ];
        let m = BatchMeta::new(seqs, LogitsAt::LastToken, &Device::Cpu)?;
        assert_eq!(m.num_tokens(), 6);
        assert_eq!(m.query_start(), &[0, 3, 4, 6]);
        assert_eq!(m.positions().to_vec1::<u32>()?, vec![0, 1, 2, 10, 5, 6]);
        assert_eq!(m.logit_rows().unwrap().to_vec1::<u32>()?, vec![2, 3, 5]);
        assert_eq!(m.max_seq_len(), 11);
        assert!(!m.is_decode_only());
        Ok(())
    }

    #[test]
    fn padded_decode_steps() -> Result<()> {
        let d = |seq_id, context_len| SeqChunk {
            seq_id,
            context_len,
            query_len: 1,
        };
        let pos = Tensor::new(&[7u32, 3, 7, 7], &Device::Cpu)?;
        let m = BatchMeta::padded(vec![d(1, 7), d(2, 3)], 4, pos.clone())?;
        assert_eq!((m.num_tokens(), m.num_rows(), m.padding()), (2, 4, 2));
        assert_eq!(m.query_range(1), 1..2);
        assert!(m.logit_rows().is_none() && m.is_decode_only());
        // Too few rows, a prompt chunk, positions of the wrong length, a repeated sequence.
        assert!(BatchMeta::padded(vec![d(1, 7), d(2, 3)], 1, pos.clone()).is_err());
        let chunk = SeqChunk {
            query_len: 2,
            ..d(1, 7)
        };
        assert!(BatchMeta::padded(vec![chunk], 4, pos.clone()).is_err());
        assert!(BatchMeta::padded(vec![d(1, 7)], 2, pos.clone()).is_err());
        assert!(BatchMeta::padded(vec![d(1, 7), d(1, 7)], 4, pos).is_err());
        Ok(())
    }

    #[test]
    fn refuses_bad_batches() {
        let dev = Device::Cpu;
        assert!(BatchMeta::new(vec![], LogitsAt::LastToken, &dev).is_err());
        let empty = SeqChunk {
            seq_id: 1,
            context_len: 4,
            query_len: 0,
        };
        assert!(BatchMeta::new(vec![empty], LogitsAt::LastToken, &dev).is_err());
        let s = SeqChunk {
            seq_id: 1,
            context_len: 0,
            query_len: 2,
        };
        assert!(BatchMeta::new(vec![s, s], LogitsAt::AllTokens, &dev).is_err());
    }
}
