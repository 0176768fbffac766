//! Weight files and tokenizer of a model directory written by `veil-tools quantize`.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use veil_core::model::format::{check_pair, CLIENT_FILE, LINEAR_FILE};
use veil_core::model::{ClientWeights, LinearWeights};

/// Why a model directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file could not be opened or mapped.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A weight file is malformed.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: veil_core::model::FormatError,
    },
    /// The tokenizer could not be loaded.
    #[error("{path}: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// The cause.
        message: String,
    },
}

fn map(path: &Path) -> Result<Mmap, FilesError> {
    let io = |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    // SAFETY: the weight files are written once by `veil-tools quantize` (via rename) and only read
    // afterwards; a concurrent truncation by another process would be a misuse we cannot guard
    // against with any mapping, and every read goes through bounds-checked slices.
    unsafe { Mmap::map(&file) }.map_err(io)
}

/// Marks `range` of a mapping of `path` as read a row here and there (the embedding table): its
/// cached pages are dropped and the range is advised random-access, so a fault brings in one page
/// rather than a neighbourhood. Without this, a freshly written `client.veil` sits in the page
/// cache in large folios that the kernel (6.18 here) maps whole on a fault, and touching a few
/// hundred embedding rows made 27 MiB resident instead of 2 (measured, memory.md). Hints only:
/// where refused, the mapping works the same. The rest of the file (LayerNorm, biases, scales,
/// read in full every step) keeps its cache and read-ahead.
fn hint_scattered(path: &Path, mapped: &Mmap, range: std::ops::Range<usize>) {
    #[cfg(target_os = "linux")]
    if let Ok(file) = File::open(path) {
        use std::os::fd::AsRawFd;
        // SAFETY: an advisory call on a descriptor we own for the duration of the call; it reads
        // and writes no memory of ours.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                range.start as libc::off_t,
                range.len() as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
        };
    }
    let _ = mapped.advise_range(memmap2::Advice::Random, range.start, range.len());
}

/// A model directory, memory-mapped: only the pages actually touched become resident (embedding
/// rows of the tokens used, for instance).
#[derive(Debug)]
pub struct ModelFiles {
    dir: PathBuf,
    client: Mmap,
    linear: Option<Mmap>,
}

impl ModelFiles {
    /// Opens `client.veil` and, when `with_linear`, `linear.veil` (needed for the online mask
    /// source, the local reference and pool precomputation; not for the pool source).
    pub fn open(dir: &Path, with_linear: bool) -> Result<Self, FilesError> {
        let client = map(&dir.join(CLIENT_FILE))?;
        let linear = if with_linear {
            Some(map(&dir.join(LINEAR_FILE))?)
        } else {
            None
        };
        let files = ModelFiles {
            dir: dir.to_path_buf(),
            client,
            linear,
        };
        let cw = files.client()?;
        let layout = veil_core::model::format::ClientLayout::new(cw.config());
        hint_scattered(&dir.join(CLIENT_FILE), &files.client, layout.wte);
        if let Some(lw) = files.linear()? {
            check_pair(&cw, &lw).map_err(|source| FilesError::Format {
                path: dir.join(LINEAR_FILE),
                source,
            })?;
        }
        Ok(files)
    }

    /// The client part.
    pub fn client(&self) -> Result<ClientWeights<'_>, FilesError> {
        ClientWeights::parse(&self.client).map_err(|source| FilesError::Format {
            path: self.dir.join(CLIENT_FILE),
            source,
        })
    }

    /// The linear part, when opened.
    pub fn linear(&self) -> Result<Option<LinearWeights<'_>>, FilesError> {
        match &self.linear {
            None => Ok(None),
            Some(m) => LinearWeights::parse(m)
                .map(Some)
                .map_err(|source| FilesError::Format {
                    path: self.dir.join(LINEAR_FILE),
                    source,
                }),
        }
    }

    /// The weights fingerprint the server must match (from `client.veil`'s header).
    pub fn fingerprint(&self) -> Result<[u8; 32], FilesError> {
        Ok(self.client()?.header().linear_fingerprint)
    }

    /// The model's tokenizer (`tokenizer.json` in the directory).
    pub fn tokenizer(&self) -> Result<tokenizers::Tokenizer, FilesError> {
        let path = self.dir.join("tokenizer.json");
        tokenizers::Tokenizer::from_file(&path).map_err(|e| FilesError::Tokenizer {
            path,
            message: e.to_string(),
        })
    }
}
