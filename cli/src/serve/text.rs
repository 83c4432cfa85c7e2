//! A request's output text as it streams: token ids become text
//! incrementally, stop strings are matched on the decoded text (not on
//! tokens: a stop string may span tokens or end mid-token), and text that
//! could still turn out to be the start of a stop string is held back until
//! it cannot.

use vpod_models::{Detokenizer, TextTokenizer};

/// What a piece of output did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Piece {
    /// Text that is final and may be sent.
    pub text: String,
    /// A stop string matched: the request is done, the string and what
    /// follows it are not part of the output.
    pub stopped: bool,
}

#[derive(Debug)]
pub struct OutputText {
    detok: Detokenizer,
    stops: Vec<String>,
    /// Decoded text not yet released (it may begin a stop string).
    held: String,
    /// All text released so far.
    pub released: String,
}

impl OutputText {
    pub fn new(stops: Vec<String>) -> Self {
        Self {
            detok: Detokenizer::default(),
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
            released: String::new(),
        }
    }

    /// Adds one generated token.
    pub fn push(&mut self, tok: &TextTokenizer, id: u32) -> vpod_models::Result<Piece> {
        let new = self.detok.push(tok, id)?.unwrap_or_default();
        Ok(self.take(new, false))
    }

    /// The request ended: release what is held (with any incomplete
    /// character the decoder kept back), minus a stop string.
    pub fn finish(&mut self, tok: &TextTokenizer) -> vpod_models::Result<Piece> {
        let rest = self.detok.finish(tok)?.unwrap_or_default();
        Ok(self.take(rest, true))
    }

    fn take(&mut self, new: String, last: bool) -> Piece {
        self.held.push_str(&new);
        // The earliest stop string in the held text ends the output there.
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            self.held.truncate(at);
            let text = std::mem::take(&mut self.held);
            self.released.push_str(&text);
            return Piece { text, stopped: true };
        }
        // Keep back the longest tail that is a proper prefix of a stop string.
        let keep = if last {
            0
        } else {
            self.stops
                .iter()
                .flat_map(|s| {
                    (1..s.len())
                        .rev()
                        .filter(|&n| s.is_char_boundary(n))
                        .find(|&n| self.held.ends_with(&s[..n]))
                })
                .max()
                .unwrap_or(0)
        };
        let text = self.held[..self.held.len() - keep].to_string();
        self.held.drain(..text.len());
        self.released.push_str(&text);
        Piece { text, stopped: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(stops: &[&str], parts: &[&str]) -> (String, bool) {
        let mut o = OutputText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for p in parts {
            let piece = o.take(p.to_string(), false);
            out.push_str(&piece.text);
            if piece.stopped {
                return (out, true);
            }
        }
        let piece = o.take(String::new(), true);
        out.push_str(&piece.text);
        (out, piece.stopped)
    }

    #[test]
    fn stop_strings_end_the_text_and_are_left_out() {
        assert_eq!(
            feed(&["\n\n"], &["Hello", " world", "\n", "\nmore"]),
            ("Hello world".into(), true)
        );
        assert_eq!(feed(&["END"], &["abcE", "N", "Dxyz"]), ("abc".into(), true));
        // A held prefix that turns out not to be a stop string is released.
        assert_eq!(feed(&["END"], &["abcE", "x"]), ("abcEx".into(), false));
        assert_eq!(feed(&["END"], &["abcEN"]), ("abcEN".into(), false));
        assert_eq!(feed(&[], &["a", "b"]), ("ab".into(), false));
        // The earliest of several.
        assert_eq!(feed(&["c", "b"], &["abc"]), ("a".into(), true));
    }
}
