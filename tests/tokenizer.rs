//! Tokenizers: the SentencePiece `tokenizer.model` loader against the
//! `sentencepiece` library's own ids (recorded by the fixture script), and
//! streaming detokenization.

use serde::Deserialize;
use vpod_models::{TextTokenizer, TokenizerFile};

use crate::common::*;

#[derive(Deserialize)]
struct Probe {
    text: String,
    ids: Vec<u32>,
    decoded: String,
}

#[test]
fn sentencepiece_model_matches_sentencepiece() {
    let dir = fixture("tiny-yi-gqa8");
    let tok = TextTokenizer::load(
        &TokenizerFile::SentencePiece(dir.join("tokenizer.model")),
        Some(1),
        vec![2],
    )
    .unwrap();
    let probes: Vec<Probe> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("spm_probes.json")).unwrap()).unwrap();
    for p in &probes {
        assert_eq!(tok.encode(&p.text).unwrap(), p.ids, "encoding {:?}", p.text);
        assert_eq!(tok.decode(&p.ids).unwrap(), p.decoded, "decoding {:?}", p.text);
    }
    // BOS is the model's, prepended once; control tokens are skipped on decode.
    let ids = tok.encode_with_bos("Hello").unwrap();
    assert_eq!(ids[0], 1);
    assert_eq!(tok.decode(&ids).unwrap(), "Hello");
}

#[test]
fn streaming_decode_equals_full_decode() {
    for name in FIXTURES {
        let e = engine(name);
        let tok = e.model.tokenizer().unwrap();
        let text = "naïve café — 東京 🙂, line one\nline two";
        let ids = tok.encode(text).unwrap();
        let mut stream = tok.stream();
        let mut out = String::new();
        for &id in &ids {
            if let Some(piece) = stream.push(id).unwrap() {
                assert!(!piece.contains('\u{FFFD}'), "{name}: partial character streamed");
                out.push_str(&piece);
            }
        }
        out.push_str(&stream.finish().unwrap().unwrap_or_default());
        assert_eq!(out, tok.decode(&ids).unwrap(), "{name}");
    }
}

#[test]
fn corrupt_tokenizer_model_is_an_error() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("tokenizer.model");
    std::fs::write(&p, b"\x0a\xff\xff\xff").unwrap();
    let err = TextTokenizer::load(&TokenizerFile::SentencePiece(p), None, vec![]).unwrap_err();
    assert!(err.to_string().contains("cannot load tokenizer"), "{err}");
}
