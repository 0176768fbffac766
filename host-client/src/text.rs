//! Text as tokens arrive: what a stream of generated tokens adds to the decoded text, for output
//! that streams (the terminal, server-sent events).

/// Decodes the tokens so far at each new one and yields the text that is new, holding back an
/// incomplete UTF-8 sequence (which the decoder shows as U+FFFD) until it completes.
#[derive(Debug)]
pub struct TextStream<'t> {
    tokenizer: &'t tokenizers::Tokenizer,
    skip_special: bool,
    tokens: Vec<u32>,
    shown: usize,
}

impl<'t> TextStream<'t> {
    /// A stream over `tokenizer`; `skip_special`: leave special tokens (a chat's end of turn) out.
    pub fn new(tokenizer: &'t tokenizers::Tokenizer, skip_special: bool) -> Self {
        TextStream {
            tokenizer,
            skip_special,
            tokens: Vec::new(),
            shown: 0,
        }
    }

    /// Adds a token; returns the text it completes, if any.
    pub fn push(&mut self, token: u32) -> Option<String> {
        self.tokens.push(token);
        let text = self
            .tokenizer
            .decode(&self.tokens, self.skip_special)
            .ok()?;
        if text.ends_with('\u{FFFD}') || text.len() <= self.shown {
            return None;
        }
        let new = text.get(self.shown..)?.to_owned();
        self.shown = text.len();
        Some(new)
    }
}
