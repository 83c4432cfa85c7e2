//! Loads a SentencePiece `tokenizer.model` (as the Yi repos ship, with no
//! `tokenizer.json`) into a `tokenizers::Tokenizer`, in Rust.
//!
//! The file is a serialized `sentencepiece.ModelProto`; we read the handful of
//! fields that define encoding with a minimal protobuf wire reader:
//!
//! ```text
//! ModelProto      1: repeated SentencePiece pieces   3: NormalizerSpec   2: TrainerSpec
//! SentencePiece   1: piece (string)  2: score (float)  3: type (enum)
//! TrainerSpec     3: model_type (1 unigram, 2 bpe)  35: byte_fallback  40: unk_id
//! NormalizerSpec  1: name  2: precompiled_charsmap  3: add_dummy_prefix (default true)
//!                 4: remove_extra_whitespaces (default true)  5: escape_whitespaces (default true)
//! ```
//!
//! The tokenizer is assembled as the SentencePiece runtime behaves: spaces
//! become `▁`, a dummy `▁` prefix when the model asks for one, BPE merges in
//! the order of the merged piece's score (SentencePiece merges the adjacent
//! pair whose concatenation scores highest), bytes for characters outside the
//! vocabulary (`<0xNN>` pieces), and the inverse on decode.

use std::path::Path;

use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip as DecoderStrip;
use tokenizers::models::bpe::BPE;
use tokenizers::models::unigram::Unigram;
use tokenizers::normalizers::precompiled::Precompiled;
use tokenizers::normalizers::{Prepend, Replace, Sequence, Strip};
use tokenizers::{AddedToken, DecoderWrapper, ModelWrapper, NormalizerWrapper, Tokenizer};

const SPACE: &str = "\u{2581}"; // ▁

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PieceType {
    Normal,
    Unknown,
    Control,
    UserDefined,
    Unused,
    Byte,
}

#[derive(Debug)]
struct Piece {
    text: String,
    score: f32,
    kind: PieceType,
}

#[derive(Debug)]
struct SpmModel {
    pieces: Vec<Piece>,
    model_type: u64,
    byte_fallback: bool,
    unk_id: u32,
    precompiled_charsmap: Vec<u8>,
    add_dummy_prefix: bool,
    remove_extra_whitespaces: bool,
    escape_whitespaces: bool,
}

/// Reads `path` and builds the equivalent `tokenizers::Tokenizer`.
pub fn load_sentencepiece(path: &Path) -> Result<Tokenizer, String> {
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let model = parse_model(&bytes)?;
    build_tokenizer(&model)
}

fn build_tokenizer(m: &SpmModel) -> Result<Tokenizer, String> {
    if m.pieces.is_empty() {
        return Err("the model has no pieces".into());
    }
    let model: ModelWrapper = match m.model_type {
        2 => bpe_model(m)?.into(),
        1 => {
            let vocab = m
                .pieces
                .iter()
                .map(|p| (p.text.clone(), p.score as f64))
                .collect();
            Unigram::from(vocab, Some(m.unk_id as usize), m.byte_fallback)
                .map_err(|e| e.to_string())?
                .into()
        }
        t => {
            return Err(format!(
                "unsupported SentencePiece model type {t} (only BPE and unigram)"
            ));
        }
    };
    let mut tok = Tokenizer::new(model);

    let mut norms: Vec<NormalizerWrapper> = Vec::new();
    if !m.precompiled_charsmap.is_empty() {
        let pc = Precompiled::from(&m.precompiled_charsmap).map_err(|e| e.to_string())?;
        norms.push(pc.into());
    }
    if m.remove_extra_whitespaces {
        norms.push(Strip::new(true, true).into());
        let runs = tokenizers::normalizers::replace::ReplacePattern::Regex(" {2,}".into());
        norms.push(Replace::new(runs, " ").map_err(|e| e.to_string())?.into());
    }
    if m.add_dummy_prefix {
        norms.push(Prepend::new(SPACE.into()).into());
    }
    if m.escape_whitespaces {
        norms.push(Replace::new(" ", SPACE).map_err(|e| e.to_string())?.into());
    }
    tok.with_normalizer(Some(Sequence::new(norms)))
        .map_err(|e| e.to_string())?;

    let mut decoders: Vec<DecoderWrapper> = vec![
        DecoderWrapper::Replace(Replace::new(SPACE, " ").map_err(|e| e.to_string())?),
        ByteFallback::new().into(),
        Fuse::new().into(),
    ];
    if m.add_dummy_prefix {
        decoders.push(DecoderStrip::new(' ', 1, 0).into());
    }
    tok.with_decoder(Some(DecoderSequence::new(decoders)));

    // Control and unknown pieces are special tokens: skipped on decode.
    let specials: Vec<AddedToken> = m
        .pieces
        .iter()
        .filter(|p| matches!(p.kind, PieceType::Control | PieceType::Unknown))
        .map(|p| AddedToken::from(p.text.clone(), true))
        .collect();
    tok.add_special_tokens(specials).map_err(|e| e.to_string())?;
    Ok(tok)
}

fn bpe_model(m: &SpmModel) -> Result<BPE, String> {
    let vocab: tokenizers::models::bpe::Vocab = m
        .pieces
        .iter()
        .enumerate()
        .map(|(i, p)| (p.text.clone(), i as u32))
        .collect();
    // Merge (left, right) exists when both halves and their concatenation are
    // mergeable pieces; its rank is the concatenation's rank by score (ties by
    // id, as SentencePiece breaks them).
    let mergeable = |k: PieceType| matches!(k, PieceType::Normal | PieceType::UserDefined);
    let mut merges: Vec<(f32, u32, String, String)> = Vec::new();
    for (id, p) in m.pieces.iter().enumerate() {
        if !mergeable(p.kind) {
            continue;
        }
        for (cut, _) in p.text.char_indices().skip(1) {
            let (l, r) = p.text.split_at(cut);
            let ok = |s: &str| {
                vocab
                    .get(s)
                    .is_some_and(|&i| mergeable(m.pieces[i as usize].kind))
            };
            if ok(l) && ok(r) {
                merges.push((p.score, id as u32, l.to_string(), r.to_string()));
            }
        }
    }
    merges.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let merges = merges.into_iter().map(|(_, _, l, r)| (l, r)).collect();
    let unk = m
        .pieces
        .get(m.unk_id as usize)
        .map(|p| p.text.clone())
        .ok_or("unk_id is outside the vocabulary")?;
    BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .fuse_unk(true)
        .byte_fallback(m.byte_fallback)
        .build()
        .map_err(|e| e.to_string())
}

// ---- minimal protobuf wire reading ------------------------------------------

struct Wire<'a> {
    buf: &'a [u8],
    pos: usize,
}

enum Value<'a> {
    Varint(u64),
    Fixed32(u32),
    Fixed64,
    Bytes(&'a [u8]),
}

impl<'a> Wire<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    fn varint(&mut self) -> Result<u64, String> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = *self.buf.get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err("varint too long".into())
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let end = end.ok_or("truncated field")?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    /// Next (field number, value), or `None` at the end.
    fn next_field(&mut self) -> Result<Option<(u64, Value<'a>)>, String> {
        if self.pos >= self.buf.len() {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.take(8)?;
                Value::Fixed64
            }
            2 => {
                let n = self.varint()? as usize;
                Value::Bytes(self.take(n)?)
            }
            5 => {
                let b = self.take(4)?;
                Value::Fixed32(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            }
            w => return Err(format!("unsupported protobuf wire type {w}")),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn parse_model(buf: &[u8]) -> Result<SpmModel, String> {
    let mut m = SpmModel {
        pieces: Vec::new(),
        model_type: 1,
        byte_fallback: false,
        unk_id: 0,
        precompiled_charsmap: Vec::new(),
        add_dummy_prefix: true,
        remove_extra_whitespaces: true,
        escape_whitespaces: true,
    };
    let mut w = Wire::new(buf);
    while let Some((field, value)) = w.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => m.pieces.push(parse_piece(b)?),
            (2, Value::Bytes(b)) => parse_trainer(b, &mut m)?,
            (3, Value::Bytes(b)) => parse_normalizer(b, &mut m)?,
            _ => {}
        }
    }
    Ok(m)
}

fn parse_piece(buf: &[u8]) -> Result<Piece, String> {
    let mut p = Piece {
        text: String::new(),
        score: 0.0,
        kind: PieceType::Normal,
    };
    let mut w = Wire::new(buf);
    while let Some((field, value)) = w.next_field()? {
        match (field, value) {
            (1, Value::Bytes(b)) => {
                p.text = String::from_utf8(b.to_vec()).map_err(|_| "piece is not UTF-8")?
            }
            (2, Value::Fixed32(f)) => p.score = f32::from_bits(f),
            (3, Value::Varint(t)) => {
                p.kind = match t {
                    1 => PieceType::Normal,
                    2 => PieceType::Unknown,
                    3 => PieceType::Control,
                    4 => PieceType::UserDefined,
                    5 => PieceType::Unused,
                    6 => PieceType::Byte,
                    t => return Err(format!("unknown piece type {t}")),
                }
            }
            _ => {}
        }
    }
    Ok(p)
}

fn parse_trainer(buf: &[u8], m: &mut SpmModel) -> Result<(), String> {
    let mut w = Wire::new(buf);
    while let Some((field, value)) = w.next_field()? {
        match (field, value) {
            (3, Value::Varint(v)) => m.model_type = v,
            (35, Value::Varint(v)) => m.byte_fallback = v != 0,
            (40, Value::Varint(v)) => m.unk_id = v as u32,
            _ => {}
        }
    }
    Ok(())
}

fn parse_normalizer(buf: &[u8], m: &mut SpmModel) -> Result<(), String> {
    let mut w = Wire::new(buf);
    while let Some((field, value)) = w.next_field()? {
        match (field, value) {
            (2, Value::Bytes(b)) => m.precompiled_charsmap = b.to_vec(),
            (3, Value::Varint(v)) => m.add_dummy_prefix = v != 0,
            (4, Value::Varint(v)) => m.remove_extra_whitespaces = v != 0,
            (5, Value::Varint(v)) => m.escape_whitespaces = v != 0,
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_garbage() {
        assert!(parse_model(&[0x0a, 0x05, 0x01]).is_err());
        assert!(build_tokenizer(&parse_model(&[]).unwrap()).is_err());
    }
}
