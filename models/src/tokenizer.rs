//! Text <-> token ids: a `tokenizer.json` through the `tokenizers` crate, or
//! a SentencePiece `tokenizer.model` (see [`crate::spm`]), with the model's
//! BOS/EOS ids.

use std::path::Path;

use tokenizers::Tokenizer;

use crate::hub::TokenizerFile;
use crate::{ModelError, Result};

/// A tokenizer plus the special ids generation needs.
#[derive(Debug, Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    bos: Option<u32>,
    eos: Vec<u32>,
}

impl TextTokenizer {
    /// Loads the tokenizer file; `bos` / `eos` come from the model's
    /// (generation) config.
    pub fn load(file: &TokenizerFile, bos: Option<u32>, eos: Vec<u32>) -> Result<Self> {
        let err = |path: &Path, reason: String| ModelError::Tokenizer {
            path: path.to_path_buf(),
            reason,
        };
        let inner = match file {
            TokenizerFile::Json(p) => Tokenizer::from_file(p).map_err(|e| err(p, e.to_string()))?,
            TokenizerFile::SentencePiece(p) => crate::spm::load_sentencepiece(p).map_err(|e| err(p, e))?,
        };
        Ok(Self { inner, bos, eos })
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    pub fn eos_ids(&self) -> &[u32] {
        &self.eos
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos.contains(&id)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| ModelError::Encode(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with the BOS id prepended (when the model has one),
    /// as the models were trained.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.bos.into_iter().collect();
        ids.extend(self.encode(text)?);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, true)
            .map_err(|e| ModelError::Encode(e.to_string()))
    }

    /// A decoder that turns a growing list of ids into text pieces.
    pub fn stream(&self) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            state: Detokenizer::default(),
        }
    }
}

/// Incremental detokenization for streaming output. Decodes a small window
/// of ids (so that multi-token characters and leading-space rules come out
/// right) and holds text back while it ends in an incomplete UTF-8 sequence.
/// It owns no tokenizer (each call takes one), so that it can live in a
/// server's per-request state; [`TokenStream`] pairs it with one.
#[derive(Debug, Clone, Default)]
pub struct Detokenizer {
    ids: Vec<u32>,
    /// Start of the decode window.
    prefix: usize,
    /// End of the text already emitted.
    read: usize,
}

impl Detokenizer {
    /// Adds one id; returns newly completed text, if any.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        if now.len() > before.len() && !now.ends_with('\u{FFFD}') && now.is_char_boundary(before.len()) {
            let piece = now[before.len()..].to_string();
            self.prefix = self.read;
            self.read = self.ids.len();
            Ok(Some(piece))
        } else {
            Ok(None)
        }
    }

    /// Text still held back (an incomplete character at the end), as decoded now.
    pub fn finish(&self, tok: &TextTokenizer) -> Result<Option<String>> {
        let before = tok.decode(&self.ids[self.prefix..self.read])?;
        let now = tok.decode(&self.ids[self.prefix..])?;
        Ok((now.len() > before.len() && now.is_char_boundary(before.len()))
            .then(|| now[before.len()..].to_string()))
    }
}

/// A [`Detokenizer`] bound to its tokenizer.
#[derive(Debug)]
pub struct TokenStream<'a> {
    tok: &'a TextTokenizer,
    state: Detokenizer,
}

impl TokenStream<'_> {
    /// Adds one id; returns newly completed text, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.state.push(self.tok, id)
    }

    /// Text still held back (an incomplete character at the end), as decoded now.
    pub fn finish(&self) -> Result<Option<String>> {
        self.state.finish(self.tok)
    }
}
