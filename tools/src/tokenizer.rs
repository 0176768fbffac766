//! The GPT-2 byte-level BPE tokenizer, loaded from a Hugging Face `tokenizer.json`.

use std::path::{Path, PathBuf};

/// File name of the tokenizer inside a checkpoint directory.
pub const TOKENIZER_FILE: &str = "tokenizer.json";

/// Why the tokenizer could not be loaded or used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenizerError {
    /// `tokenizer.json` does not exist.
    #[error(
        "{}: tokenizer file not found (a model directory needs {TOKENIZER_FILE} next to \
         config.json; copy it from the Hugging Face repository of the model)",
        path.display()
    )]
    Missing {
        /// The path looked at.
        path: PathBuf,
    },
    /// The file exists but is not a tokenizer the `tokenizers` crate accepts.
    #[error("{}: cannot load tokenizer: {message}", path.display())]
    Load {
        /// The tokenizer file.
        path: PathBuf,
        /// The `tokenizers` crate's error, rendered.
        message: String,
    },
    /// Encoding or decoding failed.
    #[error("tokenizer: {message}")]
    Codec {
        /// The `tokenizers` crate's error, rendered.
        message: String,
    },
}

/// A loaded tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `tokenizer.json` from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self, TokenizerError> {
        Self::from_file(&dir.join(TOKENIZER_FILE))
    }

    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        if !path.is_file() {
            return Err(TokenizerError::Missing {
                path: path.to_path_buf(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|e| TokenizerError::Load {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(Tokenizer { inner })
    }

    /// Token ids of `text`, with no special tokens added (GPT-2 adds none anyway; this keeps a
    /// tokenizer.json with a post-processor from silently prepending one).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(|e| TokenizerError::Codec {
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` with the tokenizer's special tokens added by its post-processor, as
    /// `transformers` encodes a prompt (the LLaMA family's BOS; nothing for GPT-2).
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| TokenizerError::Codec {
                message: e.to_string(),
            })?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; special tokens are kept so that decoding is the inverse of encoding.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner
            .decode(ids, false)
            .map_err(|e| TokenizerError::Codec {
                message: e.to_string(),
            })
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
