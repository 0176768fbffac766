//! The mask pool: a file of precomputed unmasking terms `u = r · W` for future slots, each slot
//! with its own mask key, erased once the slot is taken (forward secrecy).
//!
//! Layout (little-endian): a 4096-byte header; the Freivalds projections `W · s` of every layer
//! (`integrity::projection_words(cfg)` `u64`, padded to a multiple of 4096 bytes; `s` itself is
//! derived from the check key), so replies can be checked without the weights; the offline
//! phase's projections (`rlwe::check::projection_words(cfg)` `u32`, `[in][T]` per layer in
//! forward order, padded likewise), so terms computed by the server can be checked before their
//! slots become usable; then one record per slot of `8 + pool_record_words(cfg)` `u32` words:
//! the slot's 32-byte mask key, then every linear layer's `u`, in forward order.
//!
//! | bytes     | field |
//! |-----------|-------|
//! | 0..8      | magic `VEILPOOL` |
//! | 8..12     | version (4) |
//! | 12..16    | words per record (key and terms) |
//! | 16..48    | weights fingerprint (SHA-256 of `linear.veil`) |
//! | 48..80    | check key (secret: the file is created 0600); it derives the Freivalds vectors only, never a mask |
//! | 80..88    | slots filled (records present) |
//! | 88..96    | next unused slot |
//! | 96..104   | records erased below this slot |
//!
//! Only `u` and the slot's key are stored; `r` is regenerated from the key. The online phase reads
//! the records it needs with positioned reads, so the pool is never held in memory.
//!
//! Slots are never reused, and a used slot leaves nothing behind. [`PoolSource::reserve`] claims
//! slots a few at a time: it writes the new "next unused slot" and `fsync`s, then reads the
//! claimed slots' keys into memory, overwrites them on disk with zeros and `fsync`s again, all
//! before any masked row of those slots can leave the device: a crash at any point wastes slots
//! but never reuses one, and a key once in use is never on disk. The records (terms) of the slots a
//! step used are erased (a punched hole, or zeros where the file system cannot punch) when the next
//! step reserves, when the pool is closed, and when it is dropped; the claims' `fsync` and
//! [`PoolSource::close`] make that durable. What is then left (the check key, the unused slots)
//! regenerates no used slot's masks: `r` came from keys that are gone, and `u = r · W` (which
//! would give `r` back to someone holding `W`) is gone too. Only a power cut mid-generation can
//! leave the terms of the slots used since the last claim (at most [`RESERVE_AHEAD`] + a step's
//! rows) on the medium; flash memory may keep stale copies of any overwritten block, which only
//! full-disk encryption rules out.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use veil_core::mask::{MaskKey, MaskWords, UnmaskTerms};
use veil_core::model::{LinearId, LinearWeights, ModelConfig};
use veil_core::session::{
    compute_pool_record, pool_record_offset, pool_record_words, UnmaskSource,
};
use veil_core::wire::WordBytes;
use zeroize::Zeroize;

const MAGIC: &[u8; 8] = b"VEILPOOL";
const VERSION: u32 = 4;
const HEADER: u64 = 4096;
/// Words of a slot's mask key at the head of its record.
const KEY_WORDS: usize = 8;

/// Byte offset of the first record: after the header and the projections section.
fn records_start(cfg: &ModelConfig) -> u64 {
    offline_projections_start(cfg)
        + (veil_core::rlwe::check::projection_words(cfg) as u64 * 4).div_ceil(4096) * 4096
}

/// Byte offset of the offline phase's projections: after the header and the online ones.
fn offline_projections_start(cfg: &ModelConfig) -> u64 {
    HEADER + (veil_core::integrity::projection_words(cfg) as u64 * 8).div_ceil(4096) * 4096
}

/// Where a new pool's check projections go: straight into its file, layer by layer, so that
/// making them holds one layer's worth, not the model's (`Σ in · 160` bytes: 86 MB for gpt2-xl).
#[derive(Debug)]
pub struct ProjectionSink {
    file: File,
    path: PathBuf,
    cfg: ModelConfig,
}

impl ProjectionSink {
    fn io(&self, source: std::io::Error) -> PoolError {
        PoolError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// The online check's projections of `linear` (`in_dim` elements of F_p).
    pub fn online(&self, linear: LinearId, w: &[u64]) -> Result<(), PoolError> {
        let (_, wo) = veil_core::integrity::offsets(&self.cfg, linear);
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.file
            .write_all_at(&bytes, HEADER + wo as u64 * 8)
            .map_err(|e| self.io(e))
    }

    /// The offline check's projections of `linear` (`in_dim · T` words).
    pub fn offline(&self, linear: LinearId, p: &[u32]) -> Result<(), PoolError> {
        let at = veil_core::rlwe::check::projection_offset(&self.cfg, linear) as u64 * 4;
        let bytes: Vec<u8> = p.iter().flat_map(|x| x.to_le_bytes()).collect();
        self.file
            .write_all_at(&bytes, offline_projections_start(&self.cfg) + at)
            .map_err(|e| self.io(e))
    }
}

/// Both check projections of a new pool, built row by row as the weights go by (from memory, or
/// streamed once by a client that does not store them) and written layer by layer into the
/// pool's file: memory `O(widest layer · T)`.
pub struct ProjectionStream {
    cfg: ModelConfig,
    key: MaskKey,
    sink: ProjectionSink,
    /// The layer being streamed: its check vectors and projection accumulators.
    current: Option<LinearId>,
    online_s: Vec<u64>,
    online_acc: Vec<i128>,
    online: Vec<u64>,
    offline_s: Vec<u32>,
    offline: Vec<u32>,
}

impl std::fmt::Debug for ProjectionStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionStream")
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

impl ProjectionStream {
    /// Ready for the rows of `cfg`'s layers, in [`ModelConfig::linears`] order.
    pub fn new(key: &MaskKey, cfg: &ModelConfig, sink: ProjectionSink) -> Self {
        ProjectionStream {
            cfg: *cfg,
            key: key.clone(),
            sink,
            current: None,
            online_s: Vec::new(),
            online_acc: Vec::new(),
            online: Vec::new(),
            offline_s: Vec::new(),
            offline: Vec::new(),
        }
    }

    /// Both projections of the weights in memory, in one pass.
    pub fn from_weights(
        key: &MaskKey,
        weights: &LinearWeights<'_>,
        sink: ProjectionSink,
    ) -> Result<(), PoolError> {
        let cfg = *weights.config();
        let mut p = ProjectionStream::new(key, &cfg, sink);
        for linear in cfg.linears() {
            let in_dim = linear.dims(&cfg).0;
            for (j, row) in weights.matrix(linear).chunks_exact(in_dim).enumerate() {
                p.row(linear, j, row)?;
            }
        }
        p.finish()
    }

    /// Row `j` of `linear`'s `[out][in]` matrix (rows of a layer in order, layers in order).
    pub fn row(&mut self, linear: LinearId, j: usize, row: &[u8]) -> Result<(), PoolError> {
        use veil_core::rlwe::check::{check_vectors, project_row, OFFLINE_CHECKS};
        let (i, o) = linear.dims(&self.cfg);
        if self.current != Some(linear) {
            self.end_layer()?;
            self.current = Some(linear);
            self.online_s.resize(o, 0);
            veil_core::integrity::fill_layer_check_vector(
                &self.key,
                &self.cfg,
                linear,
                &mut self.online_s,
            );
            self.online_acc.clear();
            self.online_acc.resize(i, 0);
            self.offline_s.resize(o * OFFLINE_CHECKS, 0);
            check_vectors(&self.key, &self.cfg, linear, &mut self.offline_s);
            self.offline.clear();
            self.offline.resize(i * OFFLINE_CHECKS, 0);
        }
        veil_core::integrity::project_row(row, self.online_s[j], &mut self.online_acc);
        project_row(
            row,
            &self.offline_s[j * OFFLINE_CHECKS..(j + 1) * OFFLINE_CHECKS],
            &mut self.offline,
        );
        Ok(())
    }

    fn end_layer(&mut self) -> Result<(), PoolError> {
        if let Some(linear) = self.current.take() {
            self.online.resize(self.online_acc.len(), 0);
            veil_core::integrity::finish_projection(&self.online_acc, &mut self.online);
            self.sink.online(linear, &self.online)?;
            self.sink.offline(linear, &self.offline)?;
        }
        Ok(())
    }

    /// Writes the last layer's projections, once every row went by.
    pub fn finish(mut self) -> Result<(), PoolError> {
        self.end_layer()
    }
}

impl Drop for ProjectionStream {
    fn drop(&mut self) {
        self.online_s.zeroize();
        self.offline_s.zeroize();
    }
}

const FILLED_AT: u64 = 80;
const NEXT_AT: u64 = 88;
const ERASED_AT: u64 = 96;

/// Why the pool cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// File IO failed.
    #[error("mask pool {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Not a pool file, or another version.
    #[error("{0} is not a Veil mask pool of this version (a pool from an older Veil must be precomputed again)")]
    NotAPool(PathBuf),
    /// The pool was made for other weights.
    #[error("mask pool {0} was precomputed for different weights; precompute a new one")]
    WrongWeights(PathBuf),
    /// Not enough unused slots left.
    #[error("mask pool {path} is exhausted: {left} slots left, {wanted} needed; run `veil-client precompute` to extend it")]
    Exhausted {
        /// The file.
        path: PathBuf,
        /// Slots left.
        left: u64,
        /// Slots asked for.
        wanted: u64,
    },
    /// The header's counters are inconsistent (a corrupted or tampered file).
    #[error("mask pool {0} is corrupt (counters beyond the records present)")]
    Corrupt(PathBuf),
    /// An unused slot's key is missing (a damaged file): the slot cannot be used.
    #[error("mask pool {path} is damaged: slot {slot} has no key although it was never used; precompute a new pool")]
    KeyMissing {
        /// The file.
        path: PathBuf,
        /// The slot.
        slot: u64,
    },
    /// A mask key was asked for a slot not taken by the last reservation (a caller's bug).
    #[error("mask pool {path}: slot {slot} was not reserved")]
    NotReserved {
        /// The file.
        path: PathBuf,
        /// The slot.
        slot: u64,
    },
}

/// An open pool file.
#[derive(Debug)]
pub struct PoolSource {
    file: File,
    path: PathBuf,
    cfg: ModelConfig,
    /// Derives the Freivalds check vectors, never a mask.
    check_key: MaskKey,
    /// Words per record: the slot's key, then its terms.
    record_words: usize,
    filled: u64,
    next: u64,
    /// The next-slot counter as last made durable: slots below it may already have left masked,
    /// so a later run never starts below it; `next..durable` are claimed but unused.
    durable: u64,
    /// The keys of slots `claimed_from..claimed_from + claimed.len()`, read at their claim and
    /// erased from the file then: from here on they exist only in memory (zeroized when dropped).
    claimed: Vec<MaskKey>,
    claimed_from: u64,
    /// The records of slots below this one are erased (every slot below `next` is used).
    erased_below: u64,
    /// [`PoolSource::close`] ran: nothing is left for the drop to erase.
    closed: bool,
    /// Read buffer, kept between calls so the online phase does not allocate per token.
    io_buf: Vec<u8>,
    /// The whole record of one slot (every layer's terms), read with one `pread` when a decode
    /// step (one row) first needs it: one system call per token instead of one per layer.
    record: Vec<u8>,
    /// The slot whose record `record` holds.
    record_slot: Option<u64>,
}

fn read_u64(f: &File, at: u64, path: &Path) -> Result<u64, PoolError> {
    let mut b = [0u8; 8];
    f.read_exact_at(&mut b, at)
        .map_err(|source| PoolError::Io {
            path: path.into(),
            source,
        })?;
    Ok(u64::from_le_bytes(b))
}

/// Zeros for erasing where a hole cannot be punched.
static ZEROS: [u8; 4096] = [0; 4096];

impl PoolSource {
    /// Opens an existing pool for weights with `fingerprint`. Records a crashed run left behind
    /// (used, not yet erased) are erased first.
    pub fn open(path: &Path, cfg: &ModelConfig, fingerprint: &[u8; 32]) -> Result<Self, PoolError> {
        let io = |source| PoolError::Io {
            path: path.into(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io)?;
        let mut h = [0u8; 104];
        file.read_exact_at(&mut h, 0)
            .map_err(|_| PoolError::NotAPool(path.into()))?;
        let record_words = KEY_WORDS + pool_record_words(cfg);
        if &h[0..8] != MAGIC
            || u32::from_le_bytes([h[8], h[9], h[10], h[11]]) != VERSION
            || u32::from_le_bytes([h[12], h[13], h[14], h[15]]) as usize != record_words
        {
            return Err(PoolError::NotAPool(path.into()));
        }
        if &h[16..48] != fingerprint {
            return Err(PoolError::WrongWeights(path.into()));
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(&h[48..80]);
        h.zeroize();
        let check_key = MaskKey::from_bytes(key);
        key.zeroize();
        let filled = read_u64(&file, FILLED_AT, path)?;
        let next = read_u64(&file, NEXT_AT, path)?;
        let erased = read_u64(&file, ERASED_AT, path)?;
        let len = file.metadata().map_err(io)?.len();
        if next > filled
            || erased > next
            || records_start(cfg) + filled * record_words as u64 * 4 > len
        {
            return Err(PoolError::Corrupt(path.into()));
        }
        let mut pool = PoolSource {
            file,
            path: path.into(),
            cfg: *cfg,
            check_key,
            record_words,
            filled,
            next,
            durable: next,
            claimed: Vec::new(),
            claimed_from: next,
            erased_below: erased,
            closed: false,
            io_buf: Vec::new(),
            record: Vec::new(),
            record_slot: None,
        };
        if erased < next {
            pool.erase_used()?;
            pool.sync()?;
            pool.write_u64(ERASED_AT, next)?;
            pool.sync()?;
        }
        Ok(pool)
    }

    /// Creates a pool with a fresh random check key, its check projections written by
    /// `projections` (called once with the new key and the new file's [`ProjectionSink`], e.g.
    /// through a [`ProjectionStream`]), or opens the existing one. The file appears under `path`
    /// only complete.
    pub fn create_or_open<E: From<PoolError>>(
        path: &Path,
        cfg: &ModelConfig,
        fingerprint: &[u8; 32],
        projections: impl FnOnce(&MaskKey, ProjectionSink) -> Result<(), E>,
    ) -> Result<Self, E> {
        let io = |source| PoolError::Io {
            path: path.into(),
            source,
        };
        if !path.exists() {
            let mut key = random_key().map_err(io)?;
            let mut h = vec![0u8; HEADER as usize];
            h[0..8].copy_from_slice(MAGIC);
            h[8..12].copy_from_slice(&VERSION.to_le_bytes());
            h[12..16].copy_from_slice(&((KEY_WORDS + pool_record_words(cfg)) as u32).to_le_bytes());
            h[16..48].copy_from_slice(fingerprint);
            h[48..80].copy_from_slice(&key);
            let tmp = path.with_extension("tmp");
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(io)?;
            f.write_all_at(&h, 0).map_err(io)?;
            h.zeroize();
            f.set_len(records_start(cfg)).map_err(io)?;
            let sink = ProjectionSink {
                file: f.try_clone().map_err(io)?,
                path: tmp.clone(),
                cfg: *cfg,
            };
            let made = projections(&MaskKey::from_bytes(key), sink);
            key.zeroize();
            if let Err(e) = made {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
            f.sync_all().map_err(io)?;
            std::fs::rename(&tmp, path).map_err(io)?;
        }
        Ok(Self::open(path, cfg, fingerprint)?)
    }

    /// Creates a pool with a fresh random check key, or opens the existing one, and precomputes
    /// `tokens` more slots with the local weights, each under a fresh key. `progress` gets
    /// (slots done, slots to do).
    pub fn precompute(
        path: &Path,
        weights: &LinearWeights<'_>,
        fingerprint: &[u8; 32],
        tokens: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<Self, PoolError> {
        let cfg = *weights.config();
        // The integrity projections, computed once per check key.
        let mut pool = Self::create_or_open(path, &cfg, fingerprint, |key, sink| {
            ProjectionStream::from_weights(key, weights, sink)
        })?;
        let mut r = vec![0u32; cfg.d().max(cfg.n_inner as usize)];
        let mut rec = vec![0u32; pool.record_words - KEY_WORDS];
        for i in 0..tokens {
            let slot = pool.filled + i;
            let key = pool.fresh_key()?;
            compute_pool_record(&key, weights, slot, &mut r, &mut rec);
            pool.write_key(slot, &key)?;
            pool.write_terms(slot, 0, &rec)?;
            progress(i + 1, tokens);
        }
        r.zeroize();
        rec.zeroize();
        pool.commit_filled(tokens)?;
        Ok(pool)
    }

    /// A fresh slot key from the operating system's CSPRNG.
    pub fn fresh_key(&self) -> Result<MaskKey, PoolError> {
        let mut key = random_key().map_err(|source| self.io(source))?;
        let k = MaskKey::from_bytes(key);
        key.zeroize();
        Ok(k)
    }

    fn io(&self, source: std::io::Error) -> PoolError {
        PoolError::Io {
            path: self.path.clone(),
            source,
        }
    }

    /// Reads slot `slot`'s terms of `linear` into `out` (`out_dim` words), as they are on disk
    /// (for checks; the online phase reads through [`UnmaskSource`]). A used slot's are zeros.
    pub fn read_terms(
        &self,
        slot: u64,
        linear: LinearId,
        out: &mut [u32],
    ) -> Result<(), PoolError> {
        if slot >= self.filled || out.len() != linear.dims(&self.cfg).1 {
            return Err(PoolError::Corrupt(self.path.clone()));
        }
        self.read_words(
            self.record_at(slot, KEY_WORDS + pool_record_offset(&self.cfg, linear)),
            out,
        )
    }

    /// The key of a slot no reservation has claimed (as on disk), e.g. to recompute its terms
    /// for a check. Claimed and used slots have none.
    pub fn unused_slot_key(&self, slot: u64) -> Result<MaskKey, PoolError> {
        if slot < self.durable || slot >= self.filled {
            return Err(PoolError::NotReserved {
                path: self.path.clone(),
                slot,
            });
        }
        self.read_key(slot)
    }

    fn read_key(&self, slot: u64) -> Result<MaskKey, PoolError> {
        let mut key = [0u8; 32];
        self.file
            .read_exact_at(&mut key, self.record_at(slot, 0))
            .map_err(|e| self.io(e))?;
        // All zeros: erased, so this slot was claimed by a run whose counter did not survive.
        // Never the key of a fresh slot, but for a 2^-256 chance. The check does not leak the
        // key's value: it only says whether it was erased.
        let erased = key.iter().fold(0u8, |acc, &b| acc | b) == 0;
        let k = MaskKey::from_bytes(key);
        key.zeroize();
        if erased {
            return Err(PoolError::KeyMissing {
                path: self.path.clone(),
                slot,
            });
        }
        Ok(k)
    }

    /// Little-endian words at byte offset `at` into `out`.
    fn read_words(&self, at: u64, out: &mut [u32]) -> Result<(), PoolError> {
        let mut bytes = vec![0u8; out.len() * 4];
        self.file
            .read_exact_at(&mut bytes, at)
            .map_err(|e| self.io(e))?;
        for (w, v) in out.iter_mut().zip(WordBytes(&bytes).iter()) {
            *w = v;
        }
        Ok(())
    }

    /// `linear`'s offline check projections (`in_dim · T` words, see [`veil_core::rlwe::check`]).
    pub fn read_offline_projection(
        &self,
        linear: LinearId,
        out: &mut [u32],
    ) -> Result<(), PoolError> {
        use veil_core::rlwe::check::{projection_offset, OFFLINE_CHECKS};
        if out.len() != linear.dims(&self.cfg).0 * OFFLINE_CHECKS {
            return Err(PoolError::Corrupt(self.path.clone()));
        }
        let at =
            offline_projections_start(&self.cfg) + projection_offset(&self.cfg, linear) as u64 * 4;
        self.read_words(at, out)
    }

    /// Slots whose records are present (used or not).
    pub fn filled(&self) -> u64 {
        self.filled
    }

    /// Writes slot `slot`'s mask key. Only for slots beyond [`PoolSource::filled`].
    pub fn write_key(&mut self, slot: u64, key: &MaskKey) -> Result<(), PoolError> {
        if slot < self.filled {
            return Err(PoolError::Corrupt(self.path.clone()));
        }
        self.file
            .write_all_at(key.as_bytes(), self.record_at(slot, 0))
            .map_err(|e| self.io(e))
    }

    /// Writes terms of slot `slot` from term `word` on (e.g. one layer's terms at
    /// [`pool_record_offset`]). Only for slots beyond [`PoolSource::filled`], which
    /// [`PoolSource::commit_filled`] then makes usable.
    pub fn write_terms(&mut self, slot: u64, word: usize, terms: &[u32]) -> Result<(), PoolError> {
        if slot < self.filled || KEY_WORDS + word + terms.len() > self.record_words {
            return Err(PoolError::Corrupt(self.path.clone()));
        }
        self.io_buf.clear();
        self.io_buf
            .extend(terms.iter().flat_map(|w| w.to_le_bytes()));
        self.file
            .write_all_at(&self.io_buf, self.record_at(slot, KEY_WORDS + word))
            .map_err(|source| PoolError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// Makes the next `slots` records (all written) usable: records on disk first, then the
    /// counter that makes them visible.
    pub fn commit_filled(&mut self, slots: u64) -> Result<(), PoolError> {
        self.sync()?;
        self.filled += slots;
        self.write_u64(FILLED_AT, self.filled)?;
        self.sync()
    }

    fn record_at(&self, slot: u64, word: usize) -> u64 {
        records_start(&self.cfg) + (slot * self.record_words as u64 + word as u64) * 4
    }

    /// The Freivalds check data: vectors from the pool's check key, projections from the file.
    pub fn verification(&self) -> Result<crate::generate::Verification, PoolError> {
        let (s, mut w) = crate::generate::Verification::check_vectors(&self.check_key, &self.cfg);
        let mut bytes = vec![0u8; w.len() * 8];
        self.file
            .read_exact_at(&mut bytes, HEADER)
            .map_err(|e| self.io(e))?;
        for (v, b) in w.iter_mut().zip(bytes.chunks_exact(8)) {
            *v = u64::from_le_bytes(b.try_into().unwrap_or([0; 8]));
        }
        Ok(crate::generate::Verification { s, w })
    }

    /// The pool's check key (the Freivalds vectors of both phases come from it; no mask does).
    pub fn check_key(&self) -> MaskKey {
        self.check_key.clone()
    }

    /// Unused slots left.
    pub fn remaining(&self) -> u64 {
        self.filled - self.next
    }

    /// Next unused slot.
    pub fn next_slot(&self) -> u64 {
        self.next
    }

    fn write_u64(&self, at: u64, v: u64) -> Result<(), PoolError> {
        self.file
            .write_all_at(&v.to_le_bytes(), at)
            .map_err(|e| self.io(e))
    }

    fn sync(&self) -> Result<(), PoolError> {
        self.file.sync_data().map_err(|e| self.io(e))
    }

    /// Erases bytes `at..at + len` of the file: a punched hole where the file system can (no
    /// data blocks left to read back, and no write of the whole range), zeros written elsewhere.
    fn erase(&self, at: u64, len: u64) -> Result<(), PoolError> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: fallocate only reads its integer arguments; the descriptor is open and owned
            // by `self.file` for the duration of the call.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    at as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            if !matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
            ) {
                return Err(self.io(e));
            }
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZEROS.len() as u64);
            self.file
                .write_all_at(&ZEROS[..n as usize], at + done)
                .map_err(|e| self.io(e))?;
            done += n;
        }
        Ok(())
    }

    /// Erases the records of the used slots not yet erased (every slot below `next`: call it
    /// only between steps). Durable at the next [`PoolSource::sync`].
    fn erase_used(&mut self) -> Result<(), PoolError> {
        if self.erased_below < self.next {
            let at = self.record_at(self.erased_below, 0);
            let end = self.record_at(self.next, 0);
            self.erase(at, end - at)?;
            self.erased_below = self.next;
        }
        if self.record_slot.is_some_and(|s| s < self.next) {
            self.record.zeroize();
            self.record_slot = None;
        }
        Ok(())
    }

    /// One past the last slot whose key is in memory.
    fn claimed_end(&self) -> u64 {
        self.claimed_from + self.claimed.len() as u64
    }

    /// Gives back the slots claimed ahead but not used (their keys written back), so the next
    /// run starts right after the last slot whose masks were used, and erases the used slots'
    /// records durably. Dropping without `close` erases them too; a crash only skips the
    /// claimed slots, and the next [`PoolSource::open`] erases what it left.
    pub fn close(mut self) -> Result<(), PoolError> {
        self.erase_used()?;
        let mut next = self.durable;
        if self.durable > self.next && self.claimed_end() == self.durable {
            for slot in self.next..self.durable {
                let key = &self.claimed[(slot - self.claimed_from) as usize];
                self.file
                    .write_all_at(key.as_bytes(), self.record_at(slot, 0))
                    .map_err(|e| self.io(e))?;
            }
            next = self.next;
        }
        // The erasures and the keys given back are on disk before the counters that rely on them.
        self.sync()?;
        self.write_u64(NEXT_AT, next)?;
        self.write_u64(ERASED_AT, self.erased_below)?;
        self.sync()?;
        self.durable = next;
        self.closed = true;
        Ok(())
    }
}

impl Drop for PoolSource {
    fn drop(&mut self) {
        if !self.closed {
            // Best effort (errors have nowhere to go): the next open erases what this leaves.
            if self.erase_used().is_ok() && self.sync().is_ok() {
                let _ = self.write_u64(ERASED_AT, self.erased_below);
                let _ = self.sync();
            }
        }
        self.record.zeroize();
        self.io_buf.zeroize();
    }
}

impl PoolSource {
    /// Claims slots up to `first + rows` and a few ahead: durable before any masked row of them
    /// exists, so a decode step costs no write and no fsync most of the time. Claimed slots a
    /// crash leaves unused are skipped, never reused (a clean close gives them back). Their keys
    /// move from the file into memory.
    fn claim(&mut self, first: u64, rows: u64) -> Result<(), PoolError> {
        let mark = (first + rows + RESERVE_AHEAD).min(self.filled);
        // With the records `erase_used` just erased.
        self.write_u64(NEXT_AT, mark)?;
        self.sync()?;
        let from = self.durable;
        self.durable = mark;
        // The used slots' keys leave memory (zeroized), the claimed ones' leave the file.
        let used = (first.saturating_sub(self.claimed_from) as usize).min(self.claimed.len());
        self.claimed.drain(..used);
        self.claimed_from = first;
        debug_assert_eq!(
            self.claimed_end(),
            from,
            "keys of every claimed unused slot"
        );
        for slot in from..mark {
            let key = self.read_key(slot)?;
            self.file
                .write_all_at(&ZEROS[..32], self.record_at(slot, 0))
                .map_err(|e| self.io(e))?;
            self.claimed.push(key);
        }
        self.write_u64(ERASED_AT, self.erased_below)?;
        self.sync()
    }
}

/// 32 bytes from the operating system's CSPRNG.
fn random_key() -> std::io::Result<[u8; 32]> {
    let mut key = [0u8; 32];
    rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut key)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(key)
}

/// Slots claimed beyond a step's need whenever the durable counter must move (two fsyncs per
/// this many decode tokens instead of per token).
pub const RESERVE_AHEAD: u64 = 16;

impl UnmaskSource for PoolSource {
    type Error = PoolError;

    fn reserve(&mut self, rows: u64) -> Result<u64, PoolError> {
        if self.remaining() < rows {
            return Err(PoolError::Exhausted {
                path: self.path.clone(),
                left: self.remaining(),
                wanted: rows,
            });
        }
        // The slots handed out so far are done with: their records go.
        self.erase_used()?;
        let first = self.next;
        if first + rows > self.durable {
            if let Err(e) = self.claim(first, rows) {
                // Claimed slots whose keys did not reach memory are skipped, never used.
                self.next = self.durable.max(first);
                self.claimed.clear();
                self.claimed_from = self.next;
                return Err(e);
            }
        }
        self.next = first + rows;
        Ok(first)
    }

    fn mask_key(&mut self, slot: u64) -> Result<MaskKey, PoolError> {
        let reserved = slot >= self.erased_below && slot < self.next;
        match slot.checked_sub(self.claimed_from) {
            Some(k) if reserved && (k as usize) < self.claimed.len() => {
                Ok(self.claimed[k as usize].clone())
            }
            _ => Err(PoolError::NotReserved {
                path: self.path.clone(),
                slot,
            }),
        }
    }

    fn unmask_terms(
        &mut self,
        linear: LinearId,
        first_slot: u64,
        rows: usize,
        _r: MaskWords<'_>,
        mut out: UnmaskTerms<'_>,
    ) -> Result<(), PoolError> {
        if first_slot < self.erased_below || first_slot + rows as u64 > self.next {
            return Err(PoolError::NotReserved {
                path: self.path.clone(),
                slot: first_slot,
            });
        }
        let out = out.words_mut();
        let o = linear.dims(&self.cfg).1;
        let off = KEY_WORDS + pool_record_offset(&self.cfg, linear);
        let io = |source| PoolError::Io {
            path: self.path.clone(),
            source,
        };
        if rows == 1 {
            if self.record_slot != Some(first_slot) {
                self.record_slot = None;
                self.record.resize(self.record_words * 4, 0);
                let at = self.record_at(first_slot, 0);
                self.file.read_exact_at(&mut self.record, at).map_err(io)?;
                self.record_slot = Some(first_slot);
            }
            let words = WordBytes(&self.record[off * 4..(off + o) * 4]);
            for (w, v) in out[..o].iter_mut().zip(words.iter()) {
                *w = v;
            }
            return Ok(());
        }
        let mut bytes = std::mem::take(&mut self.io_buf);
        bytes.resize(o * 4, 0);
        for row in 0..rows {
            let at = self.record_at(first_slot + row as u64, off);
            self.file.read_exact_at(&mut bytes, at).map_err(io)?;
            for (w, v) in out[row * o..(row + 1) * o]
                .iter_mut()
                .zip(WordBytes(&bytes).iter())
            {
                *w = v;
            }
        }
        self.io_buf = bytes;
        Ok(())
    }
}
