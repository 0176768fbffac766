//! `veil-client precompute --server`: the server computes the unmasking terms `u = r·W` blind.
//!
//! Per batch of up to `N = 4096` slots, with a fresh RLWE key (never stored, zeroized when the
//! batch is done) and, per layer, a fresh seed: the client encrypts, for every input index `i`,
//! the masks `r[slot][i]` of all the batch's slots as one ciphertext (slots in coefficients, see
//! [`veil_core::rlwe`]), and sends its `b` half; the server multiplies by the weights and sends one
//! switched result ciphertext per output `j`, which decrypts to `u[slot][j]` for every slot. The
//! terms are written into the pool's slot-major records (one layer's run of words per slot, a
//! few hundred outputs at a time), so the online phase still reads one record per token.
//!
//! Memory is bounded and independent of the model's size but for its widest layer: a tile of
//! [`COLUMNS`] mask columns (1 MiB), [`GROUP`] decrypted columns (16 MiB), one ciphertext each
//! way, the key and scratch (about 100 KiB).
//!
//! Integrity: every decrypted term is checked ([`veil_core::rlwe::check`]: 40 secret vectors
//! modulo `2^32` per layer, from the pool's key, against projections the pool stores) before its
//! batch is committed; a failure discards the whole batch and reports the server.
//!
//! Crash safety: a batch's slots become usable only when the whole batch is written
//! ([`PoolSource::commit_filled`]); a crash leaves them beyond `filled`, and the next run
//! recomputes them (the same slots and masks: none of them was ever used online).

use std::io::{Read, Write};
use std::ops::Range;

use crate::generate::cpu_ms;
use rand_core::{CryptoRng, OsRng, RngCore};
use sha2::{Digest, Sha256};
use veil_core::mask::MaskKey;
use veil_core::model::format::LinearLayout;
use veil_core::model::{LinearId, ModelConfig};
use veil_core::rlwe::check::{accumulate, check_vectors, first_mismatch, OFFLINE_CHECKS};
use veil_core::rlwe::layer::{mask_columns, COLUMNS};
use veil_core::rlwe::{
    decrypt, encrypt, input_words, unpack_result, ErrorRng, ModSwitch, SecretKey, Seed, Workspace,
    INPUT_WORDS, N,
};
use veil_core::session::pool_record_offset;
use zeroize::Zeroize;

use crate::pool::{PoolError, PoolSource, ProjectionSink, ProjectionStream};
use crate::transport::{Connection, TransportError};

/// Decrypted output columns gathered before they are written into the slots' records (the
/// words each slot's record gets per positioned write: 4 KiB, a page).
pub const GROUP: usize = 1024;

/// Decrypted columns added into the check sums at a time, while they are in cache (1 MiB).
const CHECK_COLUMNS: usize = 64;

/// Slots transposed at a time from the gathered columns into records: one cache line of each.
const TILE: usize = 16;

/// Why the offline phase failed.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The conversation with the server failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The pool could not be written.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// Decrypted terms failed the offline check: the server did not compute `r · W` for this
    /// layer. The batch's slots are discarded (never marked usable).
    #[error(
        "the server's offline results for {linear} fail the integrity check (slot {slot} first): \
         it did not compute what was asked; this batch is discarded; do not use this server"
    )]
    CheckFailed {
        /// The layer.
        linear: LinearId,
        /// The first failing slot.
        slot: u64,
    },
    /// The weights the server sent are not the ones this client's model was made with.
    #[error(
        "linear.veil ({bytes} bytes) does not match the fingerprint in client.veil: other weights \
         (or altered ones); nothing was derived from them"
    )]
    WeightsMismatch {
        /// Bytes received.
        bytes: u64,
    },
    /// A local file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The server answered results out of order (a protocol fault).
    #[error("the server sent result {got} of {linear} when {want} was due")]
    OutOfOrder {
        /// The layer.
        linear: LinearId,
        /// The index that came.
        got: usize,
        /// The index that was due.
        want: usize,
    },
}

/// What one run of the offline phase did.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OfflineStats {
    /// Slots filled.
    pub slots: u64,
    /// RLWE batches (keys) used.
    pub batches: u64,
    /// Input ciphertexts encrypted and sent.
    pub inputs: u64,
    /// Result ciphertexts received and decrypted.
    pub outputs: u64,
    /// Process CPU (ms) spent on the input side: masks, their check sums, encryption, upload.
    pub input_cpu_ms: f64,
    /// Process CPU (ms) spent on the output side: download, unpacking, decryption, the check
    /// sums, the pool writes.
    pub output_cpu_ms: f64,
}

impl OfflineStats {
    /// Client CPU per encrypted input term (one input of one slot: a ciphertext holds `N`),
    /// in ns: independent of the model's shape, so it prices any model's offline phase.
    pub fn ns_per_input_term(&self) -> f64 {
        self.input_cpu_ms * 1e6 / (self.inputs as f64 * N as f64)
    }

    /// Client CPU per decrypted output term, in ns (as [`OfflineStats::ns_per_input_term`]).
    pub fn ns_per_output_term(&self) -> f64 {
        self.output_cpu_ms * 1e6 / (self.outputs as f64 * N as f64)
    }
}

/// `linear.veil` read as a stream of bytes (from the server, or from a local file read
/// sequentially, so that no page of it stays mapped): hashed, and its weight rows handed to a
/// [`ProjectionStream`] as they complete. Memory: one row.
#[derive(Debug)]
pub struct WeightsParser {
    cfg: ModelConfig,
    layers: Vec<(LinearId, Range<usize>)>,
    expected: u64,
    projections: ProjectionStream,
    /// The first failure to write a layer's projections (reported by `finish`).
    failed: Option<PoolError>,
    hash: Sha256,
    pos: usize,
    at: usize,
    j: usize,
    row: Vec<u8>,
}

impl WeightsParser {
    /// For the check data of `key` over a model of shape `cfg`, written into `sink`.
    pub fn new(key: &MaskKey, cfg: &ModelConfig, sink: ProjectionSink) -> Self {
        let layout = LinearLayout::new(cfg);
        WeightsParser {
            cfg: *cfg,
            layers: cfg.linears().map(|l| (l, layout.matrix(l))).collect(),
            expected: layout.total_len as u64,
            projections: ProjectionStream::new(key, cfg, sink),
            failed: None,
            hash: Sha256::new(),
            pos: 0,
            at: 0,
            j: 0,
            row: Vec::new(),
        }
    }

    /// The file's expected length.
    pub fn expected_bytes(&self) -> u64 {
        self.expected
    }

    /// Bytes taken so far.
    pub fn bytes_seen(&self) -> u64 {
        self.pos as u64
    }

    /// The next bytes of the file.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        self.hash.update(bytes);
        while !bytes.is_empty() {
            let Some((linear, range)) = self.layers.get(self.at) else {
                self.pos += bytes.len();
                break;
            };
            if self.pos >= range.end {
                (self.at, self.j) = (self.at + 1, 0);
                continue;
            }
            if self.pos < range.start {
                // The header and alignment padding: hashed, not projected.
                let skip = (range.start - self.pos).min(bytes.len());
                self.pos += skip;
                bytes = &bytes[skip..];
                continue;
            }
            let in_dim = linear.dims(&self.cfg).0;
            let take = (range.end - self.pos)
                .min(bytes.len())
                .min(in_dim - self.row.len());
            self.row.extend_from_slice(&bytes[..take]);
            self.pos += take;
            bytes = &bytes[take..];
            if self.row.len() == in_dim {
                if let Err(e) = self.projections.row(*linear, self.j, &self.row) {
                    self.failed.get_or_insert(e);
                }
                self.j += 1;
                self.row.clear();
            }
        }
    }

    /// Ok once the whole file went by, is the one `fingerprint` names, and its projections are
    /// written (a pool whose projections came from other weights is never used: its creation
    /// fails).
    pub fn finish(self, fingerprint: &[u8; 32]) -> Result<(), OfflineError> {
        let digest: [u8; 32] = self.hash.finalize().into();
        if self.pos as u64 != self.expected || digest != *fingerprint {
            return Err(OfflineError::WeightsMismatch {
                bytes: self.pos as u64,
            });
        }
        if let Some(e) = self.failed {
            return Err(e.into());
        }
        Ok(self.projections.finish()?)
    }
}

/// Downloads the server's `linear.veil` once, streaming, and derives the pool's check
/// projections for `key` from it ([`WeightsParser`]); nothing is kept of the file.
/// `progress` gets (bytes so far, bytes in all).
pub fn download_projections<R: Read, W: Write>(
    conn: &mut Connection<R, W>,
    key: &MaskKey,
    cfg: &ModelConfig,
    fingerprint: &[u8; 32],
    sink: ProjectionSink,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), OfflineError> {
    let mut parser = WeightsParser::new(key, cfg, sink);
    let expected = parser.expected_bytes();
    // A length other than the model's is refused before any byte is read.
    let announced = conn.download_weights(expected, &mut |bytes: &[u8]| {
        parser.feed(bytes);
        progress(parser.bytes_seen(), expected);
    })?;
    if announced != expected {
        return Err(OfflineError::WeightsMismatch { bytes: announced });
    }
    parser.finish(fingerprint)
}

/// The same from a local `linear.veil`, read sequentially in 1 MiB pieces (none of it stays
/// resident: the precompute's memory stays that of the offline phase).
pub fn file_projections(
    path: &std::path::Path,
    key: &MaskKey,
    cfg: &ModelConfig,
    fingerprint: &[u8; 32],
    sink: ProjectionSink,
) -> Result<(), OfflineError> {
    let io = |source| OfflineError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut parser = WeightsParser::new(key, cfg, sink);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        parser.feed(&buf[..n]);
    }
    parser.finish(fingerprint)
}

/// The modulus switch asked for a layer with `in_dim` inputs: the fewest bits down whose failure
/// bound holds for every int8 weight column (all at ±127).
pub fn switch_for(in_dim: usize) -> ModSwitch {
    ModSwitch::fewest_bits_for(in_dim as u64 * 127 * 127)
}

/// Fills `tokens` more slots of `pool` through `conn`. `progress` gets (ciphertexts done,
/// ciphertexts to do) over the whole run.
pub fn precompute_through<R: Read, W: Write>(
    conn: &mut Connection<R, W>,
    pool: &mut PoolSource,
    cfg: &ModelConfig,
    tokens: u64,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<OfflineStats, OfflineError> {
    let per_batch: u64 = cfg
        .linears()
        .map(|l| {
            let (i, o) = l.dims(cfg);
            (i + o) as u64
        })
        .sum();
    let batches = tokens.div_ceil(N as u64);
    let total = batches * per_batch;
    let mut stats = OfflineStats::default();
    let mut buffers = Buffers::new(cfg);
    let mut done = 0u64;
    while stats.slots < tokens {
        let slots = (tokens - stats.slots).min(N as u64);
        let slot0 = pool.filled();
        let mut key_words = vec![0u32; SecretKey::WORDS];
        {
            // The batch's randomness (key, seeds, errors), from the OS once per batch.
            let mut rng = OsRandom::new();
            let key = SecretKey::generate(&mut rng, &mut key_words);
            // Each slot's mask key, written into its record (the online phase regenerates the
            // masks from it, and erases it once the slot is taken).
            let mut slot_keys = Vec::with_capacity(slots as usize);
            for k in 0..slots {
                let mut bytes = [0u8; 32];
                rng.fill_bytes(&mut bytes);
                let slot_key = MaskKey::from_bytes(bytes);
                bytes.zeroize();
                pool.write_key(slot0 + k, &slot_key)?;
                slot_keys.push(slot_key);
            }
            let batch = Batch {
                key: &key,
                slot_keys: &slot_keys,
                slot0,
            };
            for linear in cfg.linears() {
                let (input_ms, output_ms) =
                    offline_layer(conn, pool, cfg, &batch, &mut rng, &mut buffers, linear)?;
                stats.input_cpu_ms += input_ms;
                stats.output_cpu_ms += output_ms;
                let (i, o) = linear.dims(cfg);
                stats.inputs += i as u64;
                stats.outputs += o as u64;
                done += (i + o) as u64;
                progress(done, total);
            }
        } // the RLWE key and the slot keys are zeroized here
        pool.commit_filled(slots)?;
        stats.slots += slots;
        stats.batches += 1;
    }
    Ok(stats)
}

/// The batch's random numbers (key, seeds, errors): ChaCha20 ([`ErrorRng`]) keyed once per batch
/// with 32 bytes from the operating system's CSPRNG, the standard way to draw much randomness from
/// it (the errors alone are 22 KB per ciphertext; reading them from the OS cost the kernel's own
/// ChaCha20 and a system call per 64 KiB). Its key and buffered output are zeroized when dropped.
struct OsRandom {
    rng: ErrorRng,
}

impl OsRandom {
    fn new() -> Self {
        let mut seed = [0u8; 32];
        // OsRng panics only if the OS has no random numbers at all.
        OsRng.fill_bytes(&mut seed);
        let rng = ErrorRng::from_key(&seed);
        seed.zeroize();
        OsRandom { rng }
    }
}

impl RngCore for OsRandom {
    fn next_u32(&mut self) -> u32 {
        self.rng.next_u32()
    }

    fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.rng.fill_bytes(dest)
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_core::Error> {
        self.rng.try_fill_bytes(dest)
    }
}

// ChaCha20 keyed from the OS's CSPRNG.
impl CryptoRng for OsRandom {}

/// The client's scratch, allocated once per run.
struct Buffers {
    cols: Vec<u32>,
    b: Vec<u64>,
    a: Vec<u64>,
    words: Vec<u32>,
    reply: Vec<u32>,
    col: Vec<u32>,
    group: Vec<u32>,
    row: Vec<u32>,
    ws: Vec<u32>,
    /// The layer's check vectors, projections, and the two sides' accumulators.
    check_s: Vec<u32>,
    check_p: Vec<u32>,
    from_masks: Vec<u32>,
    from_terms: Vec<u32>,
}

impl Buffers {
    fn new(cfg: &ModelConfig) -> Self {
        let widest = cfg
            .linears()
            .map(|l| switch_for(l.dims(cfg).0).result_words())
            .max()
            .unwrap_or(0);
        Buffers {
            cols: vec![0; COLUMNS * N],
            b: vec![0; N],
            a: vec![0; N],
            words: vec![0; INPUT_WORDS],
            reply: vec![0; widest],
            col: vec![0; N],
            group: vec![0; GROUP * N],
            row: vec![0; GROUP * TILE],
            ws: vec![0; Workspace::WORDS],
            check_s: vec![0; cfg.widest_linear().1 * OFFLINE_CHECKS],
            check_p: vec![0; cfg.widest_linear().0 * OFFLINE_CHECKS],
            from_masks: vec![0; OFFLINE_CHECKS * N],
            from_terms: vec![0; OFFLINE_CHECKS * N],
        }
    }
}

impl Drop for Buffers {
    fn drop(&mut self) {
        // Masks and terms: secret.
        self.cols.zeroize();
        self.col.zeroize();
        self.group.zeroize();
        self.row.zeroize();
        self.check_s.zeroize();
        self.from_masks.zeroize();
        self.from_terms.zeroize();
    }
}

/// What the layers of one batch share: the RLWE key and the slots with their mask keys.
struct Batch<'b, 'k> {
    key: &'b SecretKey<'k>,
    /// One per slot of the batch, from `slot0` on.
    slot_keys: &'b [MaskKey],
    slot0: u64,
}

/// One layer of one batch: encrypt and send the masks, receive, decrypt and store the terms.
/// Returns the process CPU (ms) of its input side and of its output side.
fn offline_layer<R: Read, W: Write>(
    conn: &mut Connection<R, W>,
    pool: &mut PoolSource,
    cfg: &ModelConfig,
    batch: &Batch<'_, '_>,
    rng: &mut OsRandom,
    buf: &mut Buffers,
    linear: LinearId,
) -> Result<(f64, f64), OfflineError> {
    let (key, slot0, slots) = (batch.key, batch.slot0, batch.slot_keys.len() as u64);
    let (in_dim, out_dim) = linear.dims(cfg);
    let cpu0 = cpu_ms();
    let switch = switch_for(in_dim);
    let seed = Seed::random(rng);
    let mut ws = Workspace::new(&mut buf.ws);
    let s = &mut buf.check_s[..out_dim * OFFLINE_CHECKS];
    check_vectors(&pool.check_key(), cfg, linear, s);
    let p = &mut buf.check_p[..in_dim * OFFLINE_CHECKS];
    pool.read_offline_projection(linear, p)?;
    buf.from_masks.fill(0);
    buf.from_terms.fill(0);
    conn.begin_offline(linear, in_dim, out_dim, seed, switch)?;
    for i0 in (0..in_dim).step_by(COLUMNS) {
        let n = COLUMNS.min(in_dim - i0);
        let cols = &mut buf.cols[..n * N];
        mask_columns(
            batch.slot_keys,
            cfg,
            linear,
            slot0..slot0 + slots,
            i0..i0 + n,
            cols,
        );
        accumulate(
            &mut buf.from_masks,
            cols,
            &p[i0 * OFFLINE_CHECKS..(i0 + n) * OFFLINE_CHECKS],
        );
        for (c, msg) in cols.chunks_exact(N).enumerate() {
            let i = i0 + c;
            encrypt(key, &seed, i as u64, msg, rng, &mut ws, &mut buf.b);
            input_words(&buf.b, &mut buf.words);
            conn.send_ciphertext(&buf.words)?;
        }
    }
    // Flushed here so that the upload's system time counts on the input side.
    conn.flush()?;
    let cpu1 = cpu_ms();
    let base = pool_record_offset(cfg, linear);
    let reply = &mut buf.reply[..switch.result_words()];
    for j0 in (0..out_dim).step_by(GROUP) {
        let g = GROUP.min(out_dim - j0);
        for jj in 0..g {
            let got = conn.receive_offline_output(reply)?;
            if got != j0 + jj {
                return Err(OfflineError::OutOfOrder {
                    linear,
                    got,
                    want: j0 + jj,
                });
            }
            unpack_result(reply, switch, &mut buf.a, &mut buf.b);
            let col = &mut buf.group[jj * N..(jj + 1) * N];
            decrypt(key, &buf.a, &buf.b, switch, &mut ws, col);
            // Into the check sums while the last columns are still in cache.
            if (jj + 1) % CHECK_COLUMNS == 0 || jj + 1 == g {
                let c0 = jj / CHECK_COLUMNS * CHECK_COLUMNS;
                let (j1, j2) = (j0 + c0, j0 + jj + 1);
                accumulate(
                    &mut buf.from_terms,
                    &buf.group[c0 * N..(jj + 1) * N],
                    &s[j1 * OFFLINE_CHECKS..j2 * OFFLINE_CHECKS],
                );
            }
        }
        // Transpose into each slot's record: `g` consecutive words per slot, for a block of
        // `TILE` slots at a time (one cache line of every column, read once, instead of one
        // word of `g` lines 16 KiB apart per slot).
        for k0 in (0..slots as usize).step_by(TILE) {
            let tile = &mut buf.row[..g * TILE];
            for (jj, t) in tile.chunks_exact_mut(TILE).enumerate() {
                t.copy_from_slice(&buf.group[jj * N + k0..jj * N + k0 + TILE]);
            }
            for k in k0..(k0 + TILE).min(slots as usize) {
                for (jj, r) in buf.col[..g].iter_mut().enumerate() {
                    *r = tile[jj * TILE + k - k0];
                }
                pool.write_terms(slot0 + k as u64, base + j0, &buf.col[..g])?;
            }
        }
    }
    // Written beyond `filled`, the terms are not usable until the batch is committed.
    if let Some(k) = first_mismatch(&buf.from_masks, &buf.from_terms, slots as usize) {
        return Err(OfflineError::CheckFailed {
            linear,
            slot: slot0 + k as u64,
        });
    }
    Ok((cpu1 - cpu0, cpu_ms() - cpu1))
}
