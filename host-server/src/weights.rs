//! The server's weights: the memory-mapped `linear.veil`, its validated layout and its SHA-256
//! fingerprint (what the client compares in the hello).

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use memmap2::Mmap;
use sha2::{Digest, Sha256};
use veil_core::model::format::{LinearLayout, LINEAR_FILE};
use veil_core::model::{FormatError, LinearId, LinearWeights, ModelConfig};

/// Where the weight bytes live.
enum Backing {
    /// A read-only map of `linear.veil`.
    Mapped(Mmap),
    /// Bytes in memory (tests, or hosts without mmap).
    Owned(Box<[u8]>),
}

/// The server's weights: `linear.veil` only (never biases, embeddings or scales).
///
/// Owns the bytes and keeps the layout validated at load time, so [`ServerWeights::matrix`] is a
/// plain slice of the bytes; [`ServerWeights::linear`] re-parses (header checks only) for callers
/// that want veil-core's view.
pub struct ServerWeights {
    backing: Backing,
    layout: LinearLayout,
    fingerprint: [u8; 32],
    source: Option<PathBuf>,
    /// Requests computed with these weights, all connections together.
    computed: AtomicU64,
}

impl fmt::Debug for ServerWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerWeights")
            .field("source", &self.source)
            .field("config", self.config())
            .field("bytes", &self.bytes().len())
            .field("fingerprint", &hex(&self.fingerprint))
            .finish()
    }
}

impl ServerWeights {
    /// Loads `dir/linear.veil`.
    pub fn open_dir(dir: &Path) -> anyhow::Result<Self> {
        Self::open_file(&dir.join(LINEAR_FILE))
    }

    /// Memory-maps and validates one `linear.veil` file and computes its fingerprint.
    pub fn open_file(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and private to this process; we never create a mutable
        // reference into it. The remaining hazard of any file map is another process truncating
        // or rewriting `linear.veil` while we serve (SIGBUS or changed bytes); weight files are
        // written once by `tools/` and treated as immutable, as documented in the README.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let mut weights = Self::from_backing(Backing::Mapped(map))
            .with_context(|| format!("{} is not a valid linear.veil", path.display()))?;
        weights.source = Some(path.to_path_buf());
        Ok(weights)
    }

    /// Validates weight bytes held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, FormatError> {
        Self::from_backing(Backing::Owned(bytes.into_boxed_slice()))
    }

    fn from_backing(backing: Backing) -> Result<Self, FormatError> {
        let bytes: &[u8] = match &backing {
            Backing::Mapped(m) => m,
            Backing::Owned(b) => b,
        };
        let layout = LinearLayout::new(LinearWeights::parse(bytes)?.config());
        let fingerprint: [u8; 32] = Sha256::digest(bytes).into();
        Ok(ServerWeights {
            backing,
            layout,
            fingerprint,
            source: None,
            computed: AtomicU64::new(0),
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped(m) => m,
            Backing::Owned(b) => b,
        }
    }

    /// The model shape from the header.
    pub fn config(&self) -> &ModelConfig {
        self.layout.config()
    }

    /// SHA-256 of the whole file (what clients compare in the hello).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The fingerprint as lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        hex(&self.fingerprint)
    }

    /// veil-core's view of the weights (re-validates the header; cheap).
    pub fn linear(&self) -> Result<LinearWeights<'_>, FormatError> {
        LinearWeights::parse(self.bytes())
    }

    /// A layer's `[out][in]` int8 matrix, or `None` if `id` names no layer of this model.
    pub fn matrix(&self, id: LinearId) -> Option<&[u8]> {
        if !id.is_valid(self.config()) {
            return None;
        }
        self.bytes().get(self.layout.matrix(id))
    }

    /// How many `Compute` requests were multiplied with these weights so far, over all
    /// connections (a request counts once its product is computed).
    pub fn computed_requests(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// Counts one computed request.
    pub(crate) fn count_computed(&self) {
        self.computed.fetch_add(1, Ordering::Relaxed);
    }

    /// A one-line description of the model shape for logs.
    pub fn describe(&self) -> String {
        let c = self.config();
        format!(
            "{} blocks, d={}, {} heads, inner={}, vocab={}, {} positions; {} linear layers, {} bytes",
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_inner,
            c.vocab_size,
            c.n_positions,
            c.linear_count(),
            self.bytes().len()
        )
    }
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
