//! Weight files and tokenizer of a model directory written by `veil-tools quantize`.
//!
//! `linear.veil` is checked against the fingerprint in `client.veil`'s header (SHA-256 of the
//! whole file, what the server compares with its own copy) whenever it is opened, so a locally
//! corrupt copy is reported as such rather than as a server that altered a reply, and no pool is
//! stamped with a fingerprint its terms do not match. Hashing takes seconds for a large model on a
//! Raspberry Pi, so a verified file is remembered in a [`FingerprintCache`].

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use memmap2::Mmap;
use sha2::{Digest, Sha256};
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
    /// `linear.veil` is not the file `client.veil` was quantized with (its SHA-256 differs from
    /// the fingerprint in `client.veil`'s header).
    #[error(
        "{path} does not belong with this model's client.veil: its SHA-256 is {}, but client.veil \
         expects {}. The local file is corrupt or comes from another quantization: copy linear.veil \
         again from where the model was quantized, or re-run `veil-tools quantize`",
        hex(.actual),
        hex(.expected)
    )]
    LinearFingerprintMismatch {
        /// The local `linear.veil`.
        path: PathBuf,
        /// The fingerprint `client.veil` records (what the server is asked to match).
        expected: [u8; 32],
        /// SHA-256 of the local file.
        actual: [u8; 32],
    },
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How `linear.veil` was found to match `client.veil`'s fingerprint when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearCheck {
    /// The file was hashed: first open, a file changed since it was verified, or no usable cache.
    Hashed,
    /// A [`FingerprintCache`] entry vouched for it: the same file, unchanged since it was hashed.
    Cached,
}

/// Remembers `linear.veil` files already verified, so that a start-up need not hash hundreds of
/// megabytes again.
///
/// One text file, by default `$XDG_CACHE_HOME/veil/linear-fingerprints`, else
/// `$HOME/.cache/veil/linear-fingerprints` (outside the model directory, which may be read-only).
/// An entry holds the verified fingerprint and the file's canonical path, size, modification and
/// status-change times (ns), inode and device: any write to the file changes its status-change
/// time, so a changed file no longer matches its entry and is hashed again. The cache is only ever
/// a shortcut: a missing, unreadable, corrupt or unwritable cache means hashing, never an error.
#[derive(Debug, Clone)]
pub struct FingerprintCache {
    file: Option<PathBuf>,
}

/// First line of a cache file; a file without it is ignored (and replaced on the next write).
const CACHE_MAGIC: &str = "veil linear-fingerprints 1";
/// Entries kept at most, so the file stays small however many model directories come and go.
const CACHE_MAX_ENTRIES: usize = 32;
/// A file whose status changed less than this long before it was hashed is not cached: a write
/// within the same timestamp tick (a jiffy on ext4, 2 s on FAT) could leave its times unchanged.
const CACHE_SETTLE_NS: i128 = 2_000_000_000;

impl FingerprintCache {
    /// The per-user cache: `$XDG_CACHE_HOME/veil/` (when set to an absolute path), else
    /// `$HOME/.cache/veil/`; disabled when neither is usable.
    pub fn user_default() -> Self {
        let absolute = |var| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
        };
        let base =
            absolute("XDG_CACHE_HOME").or_else(|| absolute("HOME").map(|h| h.join(".cache")));
        FingerprintCache {
            file: base.map(|b| b.join("veil").join("linear-fingerprints")),
        }
    }

    /// A cache kept in `dir` (created when first written).
    pub fn in_dir(dir: &Path) -> Self {
        FingerprintCache {
            file: Some(dir.join("linear-fingerprints")),
        }
    }

    /// No cache: every open hashes.
    pub fn disabled() -> Self {
        FingerprintCache { file: None }
    }

    fn entries(&self) -> Vec<String> {
        let Some(text) = self
            .file
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
        else {
            return vec![];
        };
        let mut lines = text.lines();
        if lines.next() != Some(CACHE_MAGIC) {
            return vec![];
        }
        lines.map(str::to_owned).collect()
    }

    fn contains(&self, entry: &str) -> bool {
        self.entries().iter().any(|e| e == entry)
    }

    /// Records `entry` for `path`, replacing that path's old entry and dropping entries of files
    /// that no longer exist. Best effort: any failure leaves the next open to hash again.
    fn insert(&self, path: &str, entry: &str) {
        let Some(file) = &self.file else { return };
        let mut kept: Vec<String> = self
            .entries()
            .into_iter()
            .filter(|e| match entry_path(e) {
                Some(p) => p != path && Path::new(p).exists(),
                None => false,
            })
            .collect();
        kept.truncate(CACHE_MAX_ENTRIES - 1);
        kept.push(entry.to_owned());
        let mut text = format!("{CACHE_MAGIC}\n");
        for e in &kept {
            text.push_str(e);
            text.push('\n');
        }
        // Written beside and renamed over, so a concurrent reader sees the old or the new file,
        // never half of one; two clients writing at once lose an entry at worst.
        let tmp = file.with_extension(format!("{}.tmp", std::process::id()));
        let written = file
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, file));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// The path field of a cache entry (the last, as a path may contain spaces).
fn entry_path(entry: &str) -> Option<&str> {
    entry.splitn(7, ' ').nth(6)
}

/// The file identity an entry is keyed by: canonical path, size, mtime and ctime in ns, inode,
/// device. `None` when the path cannot be written on one line of text (then nothing is cached).
fn cache_key(canonical: &Path, meta: &std::fs::Metadata) -> Option<(String, String)> {
    let path = canonical.to_str().filter(|p| !p.contains('\n'))?;
    let key = format!(
        "{} {}.{:09} {}.{:09} {} {} {path}",
        meta.size(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino(),
        meta.dev(),
    );
    Some((path.to_owned(), key))
}

/// SHA-256 of everything `file` holds from its start, read in 256 KiB chunks rather than through
/// the mapping, so that hashing does not leave the whole file resident in this process.
fn sha256_of(mut file: &File) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(hasher.finalize().into()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Checks that `file` (opened from `path`) hashes to `expected`, unless `cache` vouches for it.
fn verify_linear(
    file: &File,
    path: &Path,
    expected: &[u8; 32],
    cache: &FingerprintCache,
) -> Result<LinearCheck, FilesError> {
    let io = |source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    };
    let before = file.metadata().map_err(io)?;
    let key = std::fs::canonicalize(path)
        .ok()
        .and_then(|c| cache_key(&c, &before));
    let entry = key.as_ref().map(|(_, k)| format!("{} {k}", hex(expected)));
    if let Some(e) = &entry {
        if cache.contains(e) {
            return Ok(LinearCheck::Cached);
        }
    }
    let now = SystemTime::now();
    let actual = sha256_of(file).map_err(io)?;
    if &actual != expected {
        return Err(FilesError::LinearFingerprintMismatch {
            path: path.to_path_buf(),
            expected: *expected,
            actual,
        });
    }
    let after = file.metadata().map_err(io)?;
    let settled = now.duration_since(UNIX_EPOCH).is_ok_and(|t| {
        let ctime = i128::from(before.ctime()) * 1_000_000_000 + i128::from(before.ctime_nsec());
        ctime + CACHE_SETTLE_NS <= t.as_nanos() as i128
    });
    // Cached only if the file did not change while it was read, and is old enough that a later
    // write cannot share its timestamps.
    if let (Some((p, k)), Some(e)) = (&key, &entry) {
        if settled && cache_key(Path::new(p), &after).as_ref().map(|(_, k2)| k2) == Some(k) {
            cache.insert(p, e);
        }
    }
    Ok(LinearCheck::Hashed)
}

fn open_file(path: &Path) -> Result<File, FilesError> {
    File::open(path).map_err(|source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn map(path: &Path, file: &File) -> Result<Mmap, FilesError> {
    // SAFETY: the weight files are written once by `veil-tools quantize` (via rename) and only read
    // afterwards; a concurrent truncation by another process would be a misuse we cannot guard
    // against with any mapping, and every read goes through bounds-checked slices.
    unsafe { Mmap::map(file) }.map_err(|source| FilesError::Io {
        path: path.to_path_buf(),
        source,
    })
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
    linear_check: Option<LinearCheck>,
}

impl ModelFiles {
    /// Opens `client.veil` and, when `with_linear`, `linear.veil` (needed for the online mask
    /// source, the local reference and pool precomputation; not for the pool source), checking
    /// that `linear.veil` is the file `client.veil` was made with (see
    /// [`FilesError::LinearFingerprintMismatch`]), with the per-user
    /// [`FingerprintCache::user_default`] to skip hashing a file already verified.
    pub fn open(dir: &Path, with_linear: bool) -> Result<Self, FilesError> {
        Self::open_with_cache(dir, with_linear, &FingerprintCache::user_default())
    }

    /// [`ModelFiles::open`] with the given fingerprint cache.
    pub fn open_with_cache(
        dir: &Path,
        with_linear: bool,
        cache: &FingerprintCache,
    ) -> Result<Self, FilesError> {
        let client_path = dir.join(CLIENT_FILE);
        let client = map(&client_path, &open_file(&client_path)?)?;
        let mut files = ModelFiles {
            dir: dir.to_path_buf(),
            client,
            linear: None,
            linear_check: None,
        };
        let expected = files.client()?.header().linear_fingerprint;
        if with_linear {
            let path = dir.join(LINEAR_FILE);
            let file = open_file(&path)?;
            // Before parsing: a corrupt file gets this advice rather than a format error.
            let check = verify_linear(&file, &path, &expected, cache)?;
            files.linear = Some(map(&path, &file)?);
            files.linear_check = Some(check);
        }
        let cw = files.client()?;
        let layout = veil_core::model::format::ClientLayout::new(cw.config());
        hint_scattered(&client_path, &files.client, layout.wte);
        if let Some(lw) = files.linear()? {
            check_pair(&cw, &lw).map_err(|source| FilesError::Format {
                path: dir.join(LINEAR_FILE),
                source,
            })?;
        }
        Ok(files)
    }

    /// How `linear.veil` was verified when opened (`None` when it was not opened).
    pub fn linear_check(&self) -> Option<LinearCheck> {
        self.linear_check
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
