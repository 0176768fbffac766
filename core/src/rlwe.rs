//! Secret-key RLWE for the blind offline phase: the server computes the unmasking terms
//! `u = r·W (mod 2^32)` from encryptions of the masks, without learning them.
//!
//! # Scheme
//!
//! Ring `R_q = Z_q[X]/(X^N + 1)` with `N = 4096` ([`N`]) and `q = 2^64`: every ciphertext word is a
//! `u64` and every server operation is wrapping `u64` arithmetic. Plaintexts live in `Z_2^32`
//! (the ring of the online masks) and are scaled by `Δ = 2^32`, so decryption lands in `Z_2^32`
//! exactly, with no rounding of the message itself.
//!
//! - Secret key `s ∈ R` with uniform ternary coefficients in `{-1, 0, 1}` ([`SecretKey`]), fresh per
//!   batch, zeroized on drop, never serialised.
//! - Encryption of `m ∈ Z_2^32[X]/(X^N + 1)` under a public seed and an index ([`encrypt`]):
//!   `a = expand(seed, index)` uniform in `R_q` ([`expand_a`]), `e` with independent centred
//!   binomial coefficients of parameter `η = 21` ([`ETA`]), and
//!   `b = -a·s + e + Δ·m (mod 2^64)`. Only `b` is sent (8 bytes per coefficient); the server expands
//!   `a` itself from the 32-byte seed.
//! - Decryption of `(a, b)` ([`decrypt`]): `b + a·s = Δ·m + e (mod 2^64)`, so
//!   `m = round((b + a·s) / Δ) mod 2^32` whenever the accumulated noise satisfies `|e| < 2^31`.
//!
//! # Layout: slots in coefficients
//!
//! A batch holds `N` future mask slots. For each input index `i` of a layer, ciphertext `C_i`
//! encrypts `m_i(X) = Σ_slot r[slot][i] · X^slot`: coefficient `slot` of the message is the mask of
//! input `i` in that slot. The server computes, for every output `j`,
//! `C_out[j] = Σ_i W[j][i] · C_i` (both halves, wrapping `u64`: [`gemm_i8_u64`], weights in Veil's
//! `[out][in]` int8 layout), which encrypts `Σ_i W[j][i] · m_i(X)`, whose coefficient `slot` is
//! `u[slot][j] = Σ_i W[j][i] · r[slot][i] (mod 2^32)`: one decryption yields output `j`'s unmasking
//! term for all `N` slots at once. No polynomial product is needed on the server because the
//! weights are scalars; the only products, `a·s`, are the client's.
//!
//! # Parameters and security
//!
//! Source: the Homomorphic Encryption Standard (M. Albrecht, M. Chase, H. Chen, J. Ding,
//! S. Goldwasser, S. Gorbunov, S. Halevi, J. Hoffstein, K. Laine, K. Lauter, S. Lokam,
//! D. Micciancio, D. Moody, T. Morrison, A. Sahai, V. Vaikuntanathan; HomomorphicEncryption.org,
//! November 21, 2018; also IACR ePrint 2019/939), its tables of maximal `log2 q` per ring dimension
//! for a uniform ternary secret and error standard deviation `σ ≈ 3.2`, estimated with the lattice
//! estimator against the primal (uSVP, decoding) and dual attacks. For `n = 4096`, ternary secret:
//!
//! | security | max `log2 q` |
//! |---|---|
//! | 128-bit classical | 109 |
//! | 192-bit classical | 75 |
//! | 256-bit classical | 58 |
//! | 128-bit quantum | 101 |
//!
//! (For `n = 2048` the 128-bit classical bound is 54, so `q = 2^64` needs `n = 4096` at this `σ`.)
//! These figures are as transcribed from the standard by two independent libraries: Microsoft
//! SEAL's `native/src/seal/util/hestdparms.h` ("Largest allowed bit counts for coeff_modulus based
//! on the security estimates from HomomorphicEncryption.org security standard. Microsoft SEAL samples
//! the secret key from a ternary {-1, 0, 1} distribution", `SEAL_HE_STD_PARMS_128_TC(4096) = 109`,
//! `..._192_TC(4096) = 75`, `..._256_TC(4096) = 58`, `..._128_TQ(4096) = 101`, error standard
//! deviation 3.20) and OpenFHE's `src/core/lib/lattice/stdlatticeparms.cpp`
//! (`StdLatticeParm(HEStd_ternary, 4096, HEStd_128_classic, 109)`, `... HEStd_192_classic, 75`,
//! `... HEStd_256_classic, 58`). `log2 q = 64` is far inside the 128-bit bound (109) and inside the
//! 192-bit one (75); a smaller modulus at fixed `n` and `σ` only makes the estimated attacks harder.
//! The estimates model generic LWE attacks, which do not use the factorisation of `q`; RLWE with a
//! power-of-two modulus over `X^N + 1` is also what TFHE-style libraries deploy.
//!
//! Error distribution: a centred binomial `ψ_η`, `e = Σ_{k<η} (x_k - y_k)` with `2η` independent
//! fair bits, as NewHope (Alkim, Ducas, Pöppelmann, Schwabe, USENIX Security 2016; NIST submission,
//! §4.1.1 "Binomial noise distribution") uses in place of a discrete Gaussian. With `η = 21` its
//! variance is `η/2 = 10.5` (`σ ≈ 3.24`), slightly above the standard's `σ = 8/√(2π) ≈ 3.19`
//! (variance 10.19): the lattice estimator models the error only through its standard deviation,
//! and a larger one makes the attacks harder. It is sampled with two popcounts, with no table and
//! no branch, and its support is bounded (`|e| ≤ 21`), which gives the rigorous tail bound of
//! [`noise`].
//!
//! Ternary secret: `t = floor(3x / 2^128)` for 128 uniform bits `x`, mapped to `t - 1`: rejection-
//! and branch-free; each value has probability within `2^-128` of `1/3`, so `s` is within
//! statistical distance `N · 2^-128 = 2^-116` of uniform ternary.
//!
//! Rules for the caller (the protocol):
//! - A (seed, index) pair is used at most once per key: two encryptions with the same `a` and `s`
//!   differ by `e - e' + Δ(m - m')`, which reveals `m - m'`. Draw a fresh seed per key (or per
//!   layer) from the client's CSPRNG and give every ciphertext its own index.
//! - The seed is chosen by the client, never by the server (a chosen `a`, e.g. zero, would reveal
//!   `m`).
//! - A key encrypts one ciphertext per input index of every offloaded layer in its batch (`Σ in`:
//!   33 024 for distilgpt2 with its LM head); the estimates above allow any polynomial number of
//!   RLWE samples.
//!
//! # The client's products `a·s` (exact modulo 2^64)
//!
//! `a` is uniform modulo 2^64 and `s` ternary, so the integer negacyclic product has coefficients
//! up to `N · 2^64`. [`SecretKey`] caches `NTT(s)` modulo the 30-bit prime `P` of [`ntt`] (in
//! Montgomery form). A word is split into 16-bit limbs: each limb's product with `s` has
//! coefficients below `N · 2^16 = 2^28 < P/2` in magnitude, so its centred residue modulo `P` *is*
//! the integer product, and the limbs recombine modulo 2^64 as `Σ_k 2^(16k) · (a_k · s)`.
//! Cost per product: encryption (64-bit `a`) four limbs, 8 transforms (4 forward, 4 inverse);
//! decryption after modulus switching by `k_a` bits `ceil((64 - k_a) / 16)` limbs (three for
//! `k_a = 23`). Each transform of size 4096 is `12 · 2048` butterflies, eight per AVX2 instruction
//! on x86_64 (about 4 µs here); other CPUs run the portable transform (a NEON one, for 32-bit
//! lanes like AVX2, is not written yet).
//!
//! # Modulus switching
//!
//! Before sending `C_out`, the server may round `a` and `b` to their top `64 - k` bits
//! ([`ModSwitch`], [`mod_switch`]); the client multiplies back by `2^k`. The rounding errors add
//! `ε_b + ε_a·s` to the noise; [`noise`] bounds it and [`ModSwitch::RECOMMENDED`]
//! (`k_a = 23, k_b = 28`: 41 + 36 = 77 bits down per coefficient instead of 128) keeps the failure
//! probability below `2^-59` per term for every int8 layer up to `in = 3072` with all weights at
//! ±127.

pub mod check;
pub mod layer;
pub mod noise;
pub mod ntt;
pub mod server;
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
// `#[target_feature]` builds of the portable passes: each `unsafe` has its SAFETY.
mod x86;

pub use noise::{log2_failure_bound, max_column_norm2};
pub use server::{gemm_i8_u64, mod_switch};

use rand_chacha::rand_core::{CryptoRng, RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroize;

/// Log2 of the ring degree.
pub const LOG_N: u32 = 12;
/// Ring degree: coefficients per polynomial, and mask slots per batch.
pub const N: usize = 1 << LOG_N;
/// Log2 of the plaintext scale `Δ`: messages are in `Z_2^32`, scaled into the top half of a word.
pub const DELTA_BITS: u32 = 32;
/// Parameter of the centred binomial error distribution (variance `η/2`).
pub const ETA: u32 = 21;

/// The public 32-byte seed from which the server expands the random halves `a` of ciphertexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Seed(pub [u8; 32]);

impl Seed {
    /// A fresh seed from the client's CSPRNG.
    pub fn random(rng: &mut (impl CryptoRng + RngCore)) -> Seed {
        let mut s = [0u8; 32];
        rng.fill_bytes(&mut s);
        Seed(s)
    }
}

/// Expands coefficients `first..first + out.len()` of the uniform polynomial `a` of ciphertext
/// `index`: ChaCha20 (rand_chacha's `ChaCha20Rng`) keyed by the seed, stream `index`, coefficient
/// `l` being the `l`-th `u64` of the keystream (`next_u64`: two little-endian 32-bit words). The
/// server can expand any coefficient range, e.g. one column tile of its product.
pub fn expand_a(seed: &Seed, index: u64, first: usize, out: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return x86::expand_a(t, &seed.0, index, first, out);
    }
    expand_a_portable(seed, index, first, out)
}

/// The portable [`expand_a`]: rand_chacha's `ChaCha20Rng` itself.
fn expand_a_portable(seed: &Seed, index: u64, first: usize, out: &mut [u64]) {
    let mut rng = ChaCha20Rng::from_seed(seed.0);
    rng.set_stream(index);
    rng.set_word_pos(2 * first as u128);
    for x in out.iter_mut() {
        *x = rng.next_u64();
    }
}

/// A ChaCha20 keystream (stream 0 of a 32-byte key, as rand_chacha's `ChaCha20Rng`) for a batch's
/// secret randomness, above all the errors of [`encrypt`] (22 KB per ciphertext): keyed once, e.g.
/// from the operating system's CSPRNG, generated eight blocks at a time (AVX2 on x86_64), its key
/// and buffered output zeroized on drop. Its `Debug` shows no contents.
pub struct ErrorRng {
    key: [u8; 32],
    /// The next block to generate.
    block: u64,
    /// Eight blocks of output, `at` the first unused word.
    buf: [u32; 128],
    at: usize,
}

impl ErrorRng {
    /// The stream of `key` (which the caller then zeroizes).
    pub fn from_key(key: &[u8; 32]) -> Self {
        ErrorRng {
            key: *key,
            block: 0,
            buf: [0; 128],
            at: 128,
        }
    }

    fn refill(&mut self) {
        chacha20_eight_blocks(&self.key, 0, self.block, &mut self.buf);
        self.block = self.block.wrapping_add(8);
        self.at = 0;
    }
}

/// ChaCha20 blocks `block..block + 8` of `(key, stream)` into `out`, block after block: on AVX2,
/// else rand_chacha's words (the same words, as the tests check).
fn chacha20_eight_blocks(key: &[u8; 32], stream: u64, block: u64, out: &mut [u32; 128]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return x86::chacha20_eight_blocks(t, key, stream, block, out);
    }
    let mut rng = ChaCha20Rng::from_seed(*key);
    rng.set_stream(stream);
    rng.set_word_pos(16 * block as u128);
    for o in out.iter_mut() {
        *o = rng.next_u32();
    }
}

/// Block `block` of ChaCha20 under eight (key, stream) pairs at once: `out[w][l]` is word `w` of
/// that block of `(keys[l], streams[l])` (rand_chacha's `ChaCha20Rng` words `16·block + w` after
/// `set_stream(streams[l])`). Word-major, so that eight slots' words land next to each other,
/// e.g. mask words of eight slots (one stream each) for a column of [`layer::mask_columns`]'s
/// output. On AVX2 one block per lane; else rand_chacha.
pub fn chacha20_lanes(
    keys: &[[u8; 32]; 8],
    streams: &[u64; 8],
    block: u64,
    out: &mut [[u32; 8]; 16],
) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return x86::chacha20_lanes(t, keys, streams, block, out);
    }
    for (l, (key, &stream)) in keys.iter().zip(streams).enumerate() {
        let mut rng = ChaCha20Rng::from_seed(*key);
        rng.set_stream(stream);
        rng.set_word_pos(16 * block as u128);
        for w in out.iter_mut() {
            w[l] = rng.next_u32();
        }
    }
}

impl RngCore for ErrorRng {
    fn next_u32(&mut self) -> u32 {
        if self.at == self.buf.len() {
            self.refill();
        }
        self.at += 1;
        self.buf[self.at - 1]
    }

    fn next_u64(&mut self) -> u64 {
        let lo = self.next_u32() as u64;
        lo | (self.next_u32() as u64) << 32
    }

    /// Whole words, little-endian; a last partial word's unused bytes are discarded.
    fn fill_bytes(&mut self, mut dest: &mut [u8]) {
        while !dest.is_empty() {
            if self.at == self.buf.len() {
                self.refill();
            }
            let words = (self.buf.len() - self.at).min(dest.len().div_ceil(4));
            let bytes = dest.len().min(4 * words);
            let (head, rest) = dest.split_at_mut(bytes);
            let src = &self.buf[self.at..self.at + words];
            let mut whole = head.chunks_exact_mut(4);
            for (d, w) in (&mut whole).zip(src) {
                d.copy_from_slice(&w.to_le_bytes());
            }
            let tail = whole.into_remainder();
            if let Some(w) = src.get(bytes / 4) {
                tail.copy_from_slice(&w.to_le_bytes()[..tail.len()]);
            }
            self.at += words;
            dest = rest;
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand_chacha::rand_core::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

// ChaCha20 under a key the caller draws from a CSPRNG.
impl CryptoRng for ErrorRng {}

impl Drop for ErrorRng {
    fn drop(&mut self) {
        self.key.zeroize();
        self.buf.zeroize();
    }
}

impl core::fmt::Debug for ErrorRng {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("ErrorRng(<secret>)")
    }
}

/// The secret key `s`, held as `NTT(s) mod P` in Montgomery form ([`ntt`]) in a caller-provided
/// buffer of [`SecretKey::WORDS`] words, which is zeroized when the key is dropped. Its `Debug`
/// shows no contents.
pub struct SecretKey<'a> {
    ntt: &'a mut [u32; N],
}

impl<'a> SecretKey<'a> {
    /// Words of storage a key needs.
    pub const WORDS: usize = N;

    /// Samples a fresh uniform ternary key into `storage` (length [`SecretKey::WORDS`]) from the
    /// client's CSPRNG, in time independent of the key.
    pub fn generate(rng: &mut (impl CryptoRng + RngCore), storage: &'a mut [u32]) -> Self {
        let ntt: &mut [u32; N] = storage
            .try_into()
            .expect("secret key storage is SecretKey::WORDS words");
        for c in ntt.iter_mut() {
            *c = ntt::ternary_residue(sample_ternary_01_2(rng) as u32);
        }
        ntt::forward(ntt);
        ntt::to_montgomery(ntt);
        SecretKey { ntt }
    }
}

impl Drop for SecretKey<'_> {
    fn drop(&mut self) {
        self.ntt.zeroize();
    }
}

impl core::fmt::Debug for SecretKey<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SecretKey(<secret>)")
    }
}

/// Bits per limb of a product with the key: `N · (2^16 - 1) < 2^28 < P/2`, so every limb's
/// product has its exact (centred) value as residue modulo `P`.
const LIMB_BITS: u32 = 16;
/// Most limbs of a word.
const LIMBS: usize = (64 / LIMB_BITS) as usize;

/// `limbs[k] ← limb k of (src · s)` for the `count` low 16-bit limbs of every `src` word: the
/// limbs split off (one pass over `src`), each transformed, multiplied by the key and transformed
/// back, leaving residues in `[0, P)` whose [`ntt::centred`] values are the exact integer products
/// (`|·| < 2^28`). The buffers then hold key-dependent values (the [`Workspace`] zeroizes them on
/// drop).
fn limb_products(key: &SecretKey<'_>, src: &[u64], count: usize, limbs: &mut [u32]) {
    debug_assert!(src.len() == N && count <= LIMBS && limbs.len() == LIMBS * N);
    split_limbs(src, count, limbs);
    for limb in limbs.chunks_exact_mut(N).take(count) {
        let limb: &mut [u32; N] = limb.try_into().expect("N words per limb");
        ntt::forward_mul_montgomery(limb, key.ntt);
        ntt::inverse(limb);
    }
}

/// `limbs[k][i] ← bits 16k..16k + 16 of src[i]` for `k < count`, on the best kernel for this CPU.
fn split_limbs(src: &[u64], count: usize, limbs: &mut [u32]) {
    assert!(src.len() == N && count <= LIMBS && limbs.len() == LIMBS * N);
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return x86::split_limbs(t, src, count, limbs);
    }
    split_limbs_portable(src, count, limbs)
}

/// Coefficients per block of the passes that recombine limbs: a block's accumulators stay in
/// registers or L1 while every limb's words of that block are added in.
const BLOCK: usize = 64;

/// The portable [`split_limbs`] (shapes checked there); blocks of [`BLOCK`] words, each read once
/// per limb while it is in L1, in fixed-width loops that LLVM vectorises.
#[inline(always)] // so that the AVX2 build in `x86` compiles its own copy
fn split_limbs_portable(src: &[u64], count: usize, limbs: &mut [u32]) {
    for (i0, block) in (0..N).step_by(BLOCK).zip(src.chunks_exact(BLOCK)) {
        let block: &[u64; BLOCK] = block.try_into().expect("a block");
        for (k, limb) in limbs.chunks_exact_mut(N).enumerate().take(count) {
            let shift = LIMB_BITS * k as u32;
            let out: &mut [u32; BLOCK] = (&mut limb[i0..i0 + BLOCK]).try_into().expect("a block");
            for (o, &x) in out.iter_mut().zip(block) {
                *o = (x >> shift) as u32 & 0xffff;
            }
        }
    }
}

/// `acc[t] += Σ_k centred(limbs[k][i0 + t]) · 2^(16k + shift) (mod 2^64)` for `k < count`: the
/// product [`limb_products`] split, for one block of coefficients, shifted up by `shift` bits.
#[inline(always)]
fn add_products(acc: &mut [u64; BLOCK], limbs: &[u32], count: usize, i0: usize, shift: u32) {
    for (k, limb) in limbs.chunks_exact(N).enumerate().take(count) {
        let s = LIMB_BITS * k as u32 + shift;
        let words: &[u32; BLOCK] = limb[i0..i0 + BLOCK].try_into().expect("a block");
        for (a, &x) in acc.iter_mut().zip(words) {
            *a = a.wrapping_add(centred(x) << s);
        }
    }
}

/// [`ntt::centred`], written on 32-bit lanes (the residue is below `2^30`) so that it vectorises.
#[inline(always)]
fn centred(x: u32) -> u64 {
    let neg = (((ntt::P / 2).wrapping_sub(x) as i32) >> 31) as u32;
    (x as i32).wrapping_sub((ntt::P & neg) as i32) as i64 as u64
}

/// `Σ_k centred(limbs[k][i]) · 2^(16k) (mod 2^64)`: coefficient `i` of the product
/// [`limb_products`] split (the tests' reading of the limbs).
#[cfg(test)]
fn recombine(limbs: &[u32], count: usize, i: usize) -> u64 {
    let mut v = 0u64;
    for k in 0..count {
        v = v.wrapping_add(ntt::centred(limbs[k * N + i]) << (LIMB_BITS * k as u32));
    }
    v
}

/// `t ∈ {0, 1, 2}` with `t = floor(3x / 2^128)` for 128 uniform bits `x`: no rejection, no branch.
fn sample_ternary_01_2(rng: &mut impl RngCore) -> u64 {
    let (lo, hi) = (rng.next_u64() as u128, rng.next_u64() as u128);
    let carry = (3 * lo) >> 64;
    ((3 * hi + carry) >> 64) as u64
}

/// Caller-provided scratch for [`encrypt`] and [`decrypt`] ([`Workspace::WORDS`] words: the
/// limbs of one product). It holds products with the secret key between calls (from which, with
/// the public `a`, the key could be recomputed), so it is zeroized on drop like the key.
pub struct Workspace<'a> {
    /// `LIMBS` polynomials of `N` words, one after another.
    limbs: &'a mut [u32],
}

impl<'a> Workspace<'a> {
    /// Words of scratch [`encrypt`] and [`decrypt`] need.
    pub const WORDS: usize = LIMBS * N;

    /// Wraps `words` (length [`Workspace::WORDS`]).
    pub fn new(words: &'a mut [u32]) -> Self {
        assert_eq!(words.len(), Self::WORDS, "workspace length");
        Workspace { limbs: words }
    }
}

impl Drop for Workspace<'_> {
    fn drop(&mut self) {
        self.limbs.zeroize();
    }
}

impl core::fmt::Debug for Workspace<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Workspace(<secret>)")
    }
}

/// Encrypts the `N` slot values `msg` (`msg[slot] = r[slot][i]`) as ciphertext `index` under
/// `seed`: writes `b = -a·s + e + 2^32·msg (mod 2^64)` into `b` (`N` words), with `a` from
/// [`expand_a`] and `e` centred binomial from `rng`. Never use a (seed, index) twice with one key.
pub fn encrypt(
    key: &SecretKey<'_>,
    seed: &Seed,
    index: u64,
    msg: &[u32],
    rng: &mut (impl CryptoRng + RngCore),
    ws: &mut Workspace<'_>,
    b: &mut [u64],
) {
    assert!(msg.len() == N && b.len() == N, "one polynomial is N words");
    // `b` holds `a` until its limbs are split off.
    expand_a(seed, index, 0, b);
    limb_products(key, b, LIMBS, ws.limbs);
    let mut bits = [0u8; NOISE_BYTES];
    for (i0, (out, m)) in (0..N)
        .step_by(BLOCK)
        .zip(b.chunks_exact_mut(BLOCK).zip(msg.chunks_exact(BLOCK)))
    {
        // Three errors per 128 random bits: 2·21 bits each, chunks of three coefficients from
        // coefficient 0 on (so a block's last chunk may reach into the next block).
        let (c0, c1) = (i0 / 3, (i0 + BLOCK).div_ceil(3));
        let bits = &mut bits[..(c1 - c0) * 16];
        rng.fill_bytes(bits);
        finish_encryption(ws.limbs, i0, c0, bits, m, out);
    }
    bits.zeroize();
}

/// Random bytes one block of [`encrypt`]'s errors draws at most: the chunks of three
/// coefficients that meet a block of [`BLOCK`] (22 of 16 bytes, whatever the block's offset).
const NOISE_BYTES: usize = (BLOCK + 2).div_ceil(3) * 16;

/// `out[t] ← 2^32·m[t] - (a·s)[i0 + t] + e[i0 + t]` for one block of coefficients, `e` from the
/// random `bits` of chunks `c0..` (chunk `c` gives the errors of coefficients `3c..3c + 3`), on
/// the best kernel for this CPU. The temporaries holding errors are zeroized.
fn finish_encryption(limbs: &[u32], i0: usize, c0: usize, bits: &[u8], m: &[u32], out: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return x86::finish_encryption(t, limbs, i0, c0, bits, m, out);
    }
    finish_encryption_portable(limbs, i0, c0, bits, m, out)
}

/// The portable [`finish_encryption`].
#[inline(always)]
fn finish_encryption_portable(
    limbs: &[u32],
    i0: usize,
    c0: usize,
    bits: &[u8],
    m: &[u32],
    out: &mut [u64],
) {
    let (m, out): (&[u32; BLOCK], &mut [u64; BLOCK]) = (
        m.try_into().expect("a block"),
        out.try_into().expect("a block"),
    );
    // The 42 random bits of every coefficient of the chunks (coefficient `3·c0 + t` in `t`).
    let mut fields = [0u64; NOISE_BYTES / 16 * 3];
    for (f, x) in fields.chunks_exact_mut(3).zip(bits.chunks_exact(16)) {
        let x = u128::from_le_bytes(x.try_into().expect("16 bytes"));
        for (k, f) in f.iter_mut().enumerate() {
            *f = (x >> (2 * ETA as usize * k)) as u64;
        }
    }
    let at = i0 - 3 * c0;
    let mut acc = [0u64; BLOCK];
    add_products(&mut acc, limbs, LIMBS, i0, 0);
    let block_fields = &fields[at..at + BLOCK];
    for ((o, (&a, &f)), &m) in out.iter_mut().zip(acc.iter().zip(block_fields)).zip(m) {
        *o = ((m as u64) << DELTA_BITS)
            .wrapping_sub(a)
            .wrapping_add(centred_binomial(f as u128));
    }
    fields.zeroize();
}

/// `popcount(bits 0..η) - popcount(bits η..2η)` of `x` as a two's-complement word.
#[inline(always)]
fn centred_binomial(x: u128) -> u64 {
    let mask = (1u64 << ETA) - 1;
    let w = x as u64;
    ((w & mask).count_ones() as u64).wrapping_sub(((w >> ETA) & mask).count_ones() as u64)
}

/// How many low bits the server drops from each half of a result ciphertext before sending it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModSwitch {
    /// Bits dropped from the `a` half (its rounding error is multiplied by `s`).
    pub drop_a: u32,
    /// Bits dropped from the `b` half (its rounding error adds directly).
    pub drop_b: u32,
}

impl ModSwitch {
    /// No modulus switching: 128 bits per coefficient.
    pub const NONE: ModSwitch = ModSwitch {
        drop_a: 0,
        drop_b: 0,
    };
    /// 41 + 36 = 77 bits per coefficient; failure probability at most `2^-59.9` per term for the
    /// worst int8 layer of GPT-2 up to `in = 3072` ([`noise`]).
    pub const RECOMMENDED: ModSwitch = ModSwitch {
        drop_a: 23,
        drop_b: 28,
    };

    /// Bits per coefficient on the wire: `(64 - drop_a) + (64 - drop_b)`.
    pub const fn bits_per_coefficient(self) -> u32 {
        128 - self.drop_a - self.drop_b
    }

    /// The switch with the fewest bits on the wire whose failure bound ([`log2_failure_bound`])
    /// stays at or below [`noise::MAX_LOG2_FAILURE`] for weight columns of squared norm up to
    /// `column_norm2` (e.g. `in · 127²`, the worst int8 column of a layer with `in` inputs).
    /// [`ModSwitch::NONE`] if even that exceeds the bound.
    pub fn fewest_bits_for(column_norm2: u64) -> ModSwitch {
        let mut best = ModSwitch::NONE;
        for drop_a in 0..48 {
            for drop_b in 0..48 {
                let s = ModSwitch { drop_a, drop_b };
                if s.bits_per_coefficient() < best.bits_per_coefficient()
                    && log2_failure_bound(column_norm2, s) <= noise::MAX_LOG2_FAILURE
                {
                    best = s;
                }
            }
        }
        best
    }

    /// `u32` words of one switched result ciphertext on the wire ([`pack_result`]).
    pub const fn result_words(self) -> usize {
        N * self.bits_per_coefficient() as usize / 32
    }
}

/// `u32` words of one input ciphertext on the wire: its `b` half, `N` little-endian `u64` as
/// `(low, high)` word pairs (`a` is expanded from the seed by the server).
pub const INPUT_WORDS: usize = 2 * N;

/// Writes the `b` half of an input ciphertext as the [`INPUT_WORDS`] words sent.
pub fn input_words(b: &[u64], out: &mut [u32]) {
    assert!(b.len() == N && out.len() == INPUT_WORDS, "one polynomial");
    for (o, &x) in out.chunks_exact_mut(2).zip(b) {
        o[0] = x as u32;
        o[1] = (x >> 32) as u32;
    }
}

/// Reads an input ciphertext's `b` half from its [`INPUT_WORDS`] words.
pub fn input_from_words(words: &[u32], b: &mut [u64]) {
    assert!(b.len() == N && words.len() == INPUT_WORDS, "one polynomial");
    for (x, w) in b.iter_mut().zip(words.chunks_exact(2)) {
        *x = w[0] as u64 | (w[1] as u64) << 32;
    }
}

/// Packs a switched result ciphertext (`a` and `b`, each `N` values below `2^(64 - drop)`, as
/// [`mod_switch`] leaves them) into [`ModSwitch::result_words`] words: first the `a` values, then
/// the `b` values, each `64 - drop` bits wide, as one little-endian bit stream.
pub fn pack_result(a: &[u64], b: &[u64], switch: ModSwitch, out: &mut [u32]) {
    assert!(a.len() == N && b.len() == N, "one polynomial each");
    assert_eq!(out.len(), switch.result_words(), "packed length");
    let split = N * (64 - switch.drop_a as usize) / 32;
    let (oa, ob) = out.split_at_mut(split);
    pack_bits(a, 64 - switch.drop_a, oa);
    pack_bits(b, 64 - switch.drop_b, ob);
}

/// Unpacks [`pack_result`]'s words into `a` and `b` (values below `2^(64 - drop)`, what
/// [`decrypt`] reads).
pub fn unpack_result(words: &[u32], switch: ModSwitch, a: &mut [u64], b: &mut [u64]) {
    assert!(a.len() == N && b.len() == N, "one polynomial each");
    assert_eq!(words.len(), switch.result_words(), "packed length");
    let split = N * (64 - switch.drop_a as usize) / 32;
    let (wa, wb) = words.split_at(split);
    unpack_bits(wa, 64 - switch.drop_a, a);
    unpack_bits(wb, 64 - switch.drop_b, b);
}

/// `width`-bit values (`1..=64`) as one little-endian bit stream of `u32` words.
fn pack_bits(values: &[u64], width: u32, out: &mut [u32]) {
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1 << width) - 1
    };
    let (mut acc, mut bits, mut at) = (0u128, 0u32, 0usize);
    for &v in values {
        acc |= ((v & mask) as u128) << bits;
        bits += width;
        while bits >= 32 {
            out[at] = acc as u32;
            at += 1;
            acc >>= 32;
            bits -= 32;
        }
    }
    if bits > 0 {
        out[at] = acc as u32;
    }
}

/// Reads [`pack_bits`]'s stream back, on the best kernel for this CPU.
fn unpack_bits(words: &[u32], width: u32, values: &mut [u64]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return x86::unpack_bits(t, words, width, values);
    }
    unpack_bits_portable(words, width, values)
}

/// The portable [`unpack_bits`].
#[inline(always)]
fn unpack_bits_portable(words: &[u32], width: u32, values: &mut [u64]) {
    let mask = if width == 64 {
        u64::MAX
    } else {
        (1 << width) - 1
    };
    let w = width as usize;
    // Value `k` lies in words `i..i + 3` (`i = k·w / 32`, at most 64 + 31 bits): independent
    // iterations, no carried state, so the loop pipelines.
    let safe = values
        .len()
        .min(words.len().saturating_sub(2) * 32 / w.max(1));
    let (fast, rest) = values.split_at_mut(safe.min(values.len()));
    for (k, v) in fast.iter_mut().enumerate() {
        let pos = k * w;
        let i = pos / 32;
        let x = words[i] as u128 | (words[i + 1] as u128) << 32 | (words[i + 2] as u128) << 64;
        *v = (x >> (pos % 32)) as u64 & mask;
    }
    for (k, v) in rest.iter_mut().enumerate() {
        let pos = (safe + k) * w;
        let i = pos / 32;
        let word = |j: usize| words.get(j).copied().unwrap_or(0) as u128;
        let x = word(i) | word(i + 1) << 32 | word(i + 2) << 64;
        *v = (x >> (pos % 32)) as u64 & mask;
    }
}

/// Decrypts a result ciphertext `(a, b)` (each `N` words, switched by `switch`: only the low
/// `64 - drop` bits of each word are read) into `out[slot] = m[slot]`, in time independent of the
/// key and the message.
pub fn decrypt(
    key: &SecretKey<'_>,
    a: &[u64],
    b: &[u64],
    switch: ModSwitch,
    ws: &mut Workspace<'_>,
    out: &mut [u32],
) {
    assert!(
        a.len() == N && b.len() == N && out.len() == N,
        "one polynomial is N words"
    );
    assert!(
        switch.drop_a < 64 && switch.drop_b < 64,
        "drop fewer than 64 bits"
    );
    // Only `a mod 2^(64 - drop_a)` counts (the product is shifted up by `drop_a`), so only the
    // limbs that hold those bits are multiplied: how many depends on the public switch alone. Bits
    // above them in the top limb add multiples of `2^(64 - drop_a)`, which the shift discards.
    let count = (64 - switch.drop_a).div_ceil(LIMB_BITS) as usize;
    limb_products(key, a, count, ws.limbs);
    finish_decryption(ws.limbs, count, b, switch, out);
}

/// `out[i] ← round((b[i]·2^drop_b + (a·s)[i]·2^drop_a) / 2^32)` from the `count` limbs of `a·s`,
/// on the best kernel for this CPU.
fn finish_decryption(limbs: &[u32], count: usize, b: &[u64], switch: ModSwitch, out: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return x86::finish_decryption(t, limbs, count, b, switch, out);
    }
    finish_decryption_portable(limbs, count, b, switch, out)
}

/// The portable [`finish_decryption`], a block of [`BLOCK`] coefficients at a time.
#[inline(always)]
fn finish_decryption_portable(
    limbs: &[u32],
    count: usize,
    b: &[u64],
    switch: ModSwitch,
    out: &mut [u32],
) {
    for (i0, (o, y)) in (0..N)
        .step_by(BLOCK)
        .zip(out.chunks_exact_mut(BLOCK).zip(b.chunks_exact(BLOCK)))
    {
        let mut acc = [0u64; BLOCK];
        for (a, &y) in acc.iter_mut().zip(y) {
            *a = (y << switch.drop_b).wrapping_add(1 << (DELTA_BITS - 1));
        }
        add_products(&mut acc, limbs, count, i0, switch.drop_a);
        for (o, &v) in o.iter_mut().zip(&acc) {
            *o = (v >> DELTA_BITS) as u32;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn packing_round_trips_every_width_and_extreme_values() {
        let mut r = rng(11);
        for switch in [
            ModSwitch::NONE,
            ModSwitch::RECOMMENDED,
            ModSwitch {
                drop_a: 31,
                drop_b: 1,
            },
            ModSwitch {
                drop_a: 5,
                drop_b: 47,
            },
        ] {
            let ma = u64::MAX >> switch.drop_a;
            let mb = u64::MAX >> switch.drop_b;
            let mut a: Vec<u64> = (0..N).map(|_| r.next_u64() & ma).collect();
            let mut b: Vec<u64> = (0..N).map(|_| r.next_u64() & mb).collect();
            (a[0], a[N - 1], b[0], b[N - 1]) = (ma, 0, 0, mb);
            let mut words = vec![0u32; switch.result_words()];
            pack_result(&a, &b, switch, &mut words);
            let (mut a2, mut b2) = (vec![0u64; N], vec![0u64; N]);
            unpack_result(&words, switch, &mut a2, &mut b2);
            assert!(a == a2 && b == b2, "{switch:?}");
        }
        assert_eq!(ModSwitch::RECOMMENDED.result_words(), 9856);
        let mut b: Vec<u64> = (0..N).map(|_| r.next_u64()).collect();
        b[1] = u64::MAX;
        let mut w = vec![0u32; INPUT_WORDS];
        input_words(&b, &mut w);
        let mut back = vec![0u64; N];
        input_from_words(&w, &mut back);
        assert_eq!(b, back);
    }

    #[test]
    fn the_fewest_bits_switch_keeps_the_failure_bound() {
        for in_dim in [1u64, 768, 3072, 6400] {
            let norm2 = in_dim * 127 * 127;
            let s = ModSwitch::fewest_bits_for(norm2);
            assert!(
                log2_failure_bound(norm2, s) <= noise::MAX_LOG2_FAILURE,
                "{in_dim}"
            );
            // One bit fewer on either half breaks the bound.
            for t in [
                ModSwitch {
                    drop_a: s.drop_a + 1,
                    ..s
                },
                ModSwitch {
                    drop_b: s.drop_b + 1,
                    ..s
                },
            ] {
                assert!(
                    log2_failure_bound(norm2, t) > noise::MAX_LOG2_FAILURE,
                    "{in_dim} {t:?}"
                );
            }
        }
        assert!(
            ModSwitch::fewest_bits_for(3072 * 127 * 127).bits_per_coefficient()
                <= ModSwitch::RECOMMENDED.bits_per_coefficient()
        );
    }

    fn rng(seed: u64) -> ChaCha20Rng {
        ChaCha20Rng::seed_from_u64(seed)
    }

    /// The key's ternary coefficients, drawn from a clone of the RNG that generates the key.
    fn ternary(rng: &ChaCha20Rng, n: usize) -> Vec<i64> {
        let mut r = rng.clone();
        (0..n)
            .map(|_| sample_ternary_01_2(&mut r) as i64 - 1)
            .collect()
    }

    /// A key holding the given ternary coefficients, built as [`SecretKey::generate`] does.
    fn key_from<'a>(s: &[i64], storage: &'a mut [u32]) -> SecretKey<'a> {
        let ntt: &mut [u32; N] = storage.try_into().unwrap();
        for (c, &v) in ntt.iter_mut().zip(s) {
            *c = ntt::ternary_residue((v + 1) as u32);
        }
        ntt::forward(ntt);
        ntt::to_montgomery(ntt);
        SecretKey { ntt }
    }

    /// Independent reference: the negacyclic product modulo 2^64 by schoolbook wrapping sums.
    fn schoolbook_mod_2_64(a: &[u64], s: &[i64]) -> Vec<u64> {
        let n = a.len();
        let mut c = vec![0u64; n];
        for (i, &ai) in a.iter().enumerate() {
            for (j, &sj) in s.iter().enumerate() {
                let p = ai.wrapping_mul(sj as u64);
                if i + j < n {
                    c[i + j] = c[i + j].wrapping_add(p);
                } else {
                    c[i + j - n] = c[i + j - n].wrapping_sub(p);
                }
            }
        }
        c
    }

    #[test]
    fn limb_products_equal_schoolbook_mod_2_64_and_the_generated_key_is_the_sampled_one() {
        let mut g = rng(11);
        let s = ternary(&g, N);
        let mut key_words = vec![0u32; SecretKey::WORDS];
        let key = SecretKey::generate(&mut g, &mut key_words);
        let mut ws_words = vec![0u32; Workspace::WORDS];
        let ws = Workspace::new(&mut ws_words);
        let product = |key: &SecretKey<'_>, a: &[u64], bits: u32, ws: &mut Workspace<'_>| {
            let count = bits.div_ceil(LIMB_BITS) as usize;
            limb_products(key, a, count, ws.limbs);
            (0..N)
                .map(|i| recombine(ws.limbs, count, i))
                .collect::<Vec<u64>>()
        };
        let mut ws = ws;
        // 64-bit inputs (encryption) take four limbs; 41-bit ones (after switching by 23) three.
        for bits in [64, 41, 20] {
            let a: Vec<u64> = (0..N).map(|_| g.next_u64() >> (64 - bits)).collect();
            let got = product(&key, &a, bits, &mut ws);
            assert_eq!(got, schoolbook_mod_2_64(&a, &s), "bits={bits}");
        }
        // Extremes: all-ones inputs against all-minus-one and all-one keys (largest magnitudes).
        for v in [-1i64, 1] {
            let s = vec![v; N];
            let mut words = vec![0u32; SecretKey::WORDS];
            let key = key_from(&s, &mut words);
            let a = vec![u64::MAX; N];
            assert_eq!(product(&key, &a, 64, &mut ws), schoolbook_mod_2_64(&a, &s));
        }
    }

    /// The passes around the transforms, on this CPU's kernel (AVX2 on x86_64) and portably,
    /// give the same words, and the portable ones give what their definitions say.
    #[test]
    fn the_vector_passes_equal_the_portable_ones_and_their_definitions() {
        let mut g = rng(13);
        let src: Vec<u64> = (0..N).map(|_| g.next_u64()).collect();
        for count in 1..=LIMBS {
            let (mut fast, mut slow) = (vec![7u32; Workspace::WORDS], vec![7u32; Workspace::WORDS]);
            split_limbs(&src, count, &mut fast);
            split_limbs_portable(&src, count, &mut slow);
            assert_eq!(fast, slow, "split {count}");
            for (i, &x) in src.iter().enumerate() {
                for k in 0..count {
                    assert_eq!(slow[k * N + i], (x >> (16 * k)) as u32 & 0xffff);
                }
            }
        }
        // Limbs as the inverse transform leaves them: residues in [0, P), edges included.
        let mut limbs: Vec<u32> = (0..Workspace::WORDS)
            .map(|_| g.next_u32() % ntt::P)
            .collect();
        (limbs[0], limbs[1], limbs[2]) = (0, ntt::P / 2, ntt::P / 2 + 1);
        limbs[3] = ntt::P - 1;
        let msg: Vec<u32> = (0..N).map(|_| g.next_u32()).collect();
        let bits: Vec<u8> = (0..N.div_ceil(3) * 16)
            .map(|_| g.next_u32() as u8)
            .collect();
        for i0 in (0..N).step_by(BLOCK) {
            let (c0, c1) = (i0 / 3, (i0 + BLOCK).div_ceil(3));
            let bits = &bits[16 * c0..16 * c1];
            let (mut fast, mut slow) = (vec![0u64; BLOCK], vec![0u64; BLOCK]);
            let m = &msg[i0..i0 + BLOCK];
            finish_encryption(&limbs, i0, c0, bits, m, &mut fast);
            finish_encryption_portable(&limbs, i0, c0, bits, m, &mut slow);
            assert_eq!(fast, slow, "encryption block {i0}");
            for (t, &o) in slow.iter().enumerate() {
                let i = i0 + t;
                let x = u128::from_le_bytes(bits[16 * (i / 3 - c0)..][..16].try_into().unwrap());
                let e = centred_binomial(x >> (42 * (i % 3)));
                let want = ((msg[i] as u64) << 32)
                    .wrapping_sub(recombine(&limbs, LIMBS, i))
                    .wrapping_add(e);
                assert_eq!(o, want, "coefficient {i}");
            }
        }
        for switch in [
            ModSwitch::NONE,
            ModSwitch::RECOMMENDED,
            ModSwitch {
                drop_a: 40,
                drop_b: 3,
            },
        ] {
            let count = (64 - switch.drop_a).div_ceil(LIMB_BITS) as usize;
            let (mut fast, mut slow) = (vec![0u32; N], vec![0u32; N]);
            finish_decryption(&limbs, count, &src, switch, &mut fast);
            finish_decryption_portable(&limbs, count, &src, switch, &mut slow);
            assert_eq!(fast, slow, "{switch:?}");
            for (i, &o) in slow.iter().enumerate() {
                let v = (src[i] << switch.drop_b)
                    .wrapping_add(recombine(&limbs, count, i) << switch.drop_a);
                assert_eq!(o, (v.wrapping_add(1 << 31) >> 32) as u32, "{switch:?} {i}");
            }
        }
        for width in [1, 20, 36, 41, 57, 63, 64] {
            let words: Vec<u32> = (0..(N * width as usize).div_ceil(32))
                .map(|_| g.next_u32())
                .collect();
            let (mut fast, mut slow) = (vec![0u64; N], vec![0u64; N]);
            unpack_bits(&words, width, &mut fast);
            unpack_bits_portable(&words, width, &mut slow);
            assert_eq!(fast, slow, "width {width}");
        }
    }

    #[test]
    fn the_sampled_key_is_uniform_ternary_and_errors_are_centred_binomial() {
        let g = rng(3);
        let s = ternary(&g, 3 * N);
        for v in [-1, 0, 1] {
            let count = s.iter().filter(|&&c| c == v).count() as f64;
            assert!(
                (count / (3 * N) as f64 - 1.0 / 3.0).abs() < 0.02,
                "{v}: {count}"
            );
        }
        let mut g = rng(4);
        let e: Vec<i64> = (0..30_000)
            .map(|_| centred_binomial(g.next_u64() as u128) as i64)
            .collect();
        assert!(e.iter().all(|&x| x.abs() <= ETA as i64));
        let mean = e.iter().sum::<i64>() as f64 / e.len() as f64;
        let var = e.iter().map(|&x| (x * x) as f64).sum::<f64>() / e.len() as f64;
        assert!(mean.abs() < 0.1 && (var - 10.5).abs() < 0.5, "{mean} {var}");
    }

    #[test]
    fn seeded_expansion_is_deterministic_seekable_and_distinct_per_index_and_seed() {
        let seed = Seed([7; 32]);
        let mut a = vec![0u64; N];
        let mut again = vec![0u64; N];
        expand_a(&seed, 5, 0, &mut a);
        expand_a(&seed, 5, 0, &mut again);
        assert_eq!(a, again);
        let mut tail = vec![0u64; 100];
        expand_a(&seed, 5, 1000, &mut tail);
        assert_eq!(tail[..], a[1000..1100], "a coefficient range expands alone");
        expand_a(&seed, 6, 0, &mut again);
        assert!(a.iter().zip(&again).all(|(x, y)| x != y));
        expand_a(&Seed([8; 32]), 5, 0, &mut again);
        assert!(a.iter().zip(&again).all(|(x, y)| x != y));
        // The documented stream: the `l`-th `next_u64` of ChaCha20 keyed by the seed, stream 5.
        let mut reference = ChaCha20Rng::from_seed([7; 32]);
        reference.set_stream(5);
        assert!(a.iter().all(|&x| x == reference.next_u64()));
        expand_a(&seed, 5, 3, &mut tail[..1]);
        assert_eq!(tail[0], a[3], "an odd start");
        // Uniform-looking: about half of all bits set.
        let ones: u32 = a.iter().map(|x| x.count_ones()).sum();
        assert!((ones as f64 / (64 * N) as f64 - 0.5).abs() < 0.01);
    }

    /// The vector expansion (AVX2 on x86_64) gives rand_chacha's words from any start, over any
    /// length, for any stream, across the 32-bit half of the block counter.
    #[test]
    fn the_vector_expansion_equals_rand_chacha_from_any_position() {
        let mut g = rng(17);
        let carry = ((1usize << 32) - 3) * 8; // three blocks below 2^32: the counter's high word
        for (first, len) in [
            (0, N),
            (1, 1),
            (3, 77),
            (7, 64),
            (8, 65),
            (1000, 100),
            (carry, 60),
        ] {
            for _ in 0..3 {
                let seed = Seed::random(&mut g);
                let index = g.next_u64();
                let (mut fast, mut slow) = (vec![0u64; len], vec![0u64; len]);
                expand_a(&seed, index, first, &mut fast);
                expand_a_portable(&seed, index, first, &mut slow);
                assert_eq!(fast, slow, "first {first} len {len}");
            }
        }
    }

    /// The error stream is rand_chacha's ChaCha20 stream 0 of its key, word for word, whatever
    /// the sizes it is read in.
    #[test]
    fn the_error_stream_is_rand_chachas_stream() {
        let key = [0x5a; 32];
        let mut reference = ChaCha20Rng::from_seed(key);
        let want: Vec<u8> = (0..3000)
            .flat_map(|_| reference.next_u32().to_le_bytes())
            .collect();
        let mut r = ErrorRng::from_key(&key);
        let mut got = Vec::new();
        for n in [1usize, 3, 4, 7, 16, 500, 513, 1024, 2000] {
            let mut b = vec![0u8; n];
            r.fill_bytes(&mut b);
            got.extend_from_slice(&b[..n / 4 * 4]);
            if n % 4 != 0 {
                // The partial word's bytes are its first ones; the rest of that word is skipped.
                let at = got.len();
                got.extend_from_slice(&want[at..at + 4]);
                assert_eq!(b[n / 4 * 4..], want[at..at + n % 4]);
            }
        }
        let at = got.len() / 4;
        assert_eq!(got, want[..got.len()]);
        let x = r.next_u64();
        let w = |i: usize| u32::from_le_bytes(want[4 * i..4 * i + 4].try_into().unwrap()) as u64;
        assert_eq!(x, w(at) | w(at + 1) << 32);
        // The vector blocks equal rand_chacha's for another stream and block too.
        let mut out = [0u32; 128];
        chacha20_eight_blocks(&key, 9, 1 << 32, &mut out);
        let mut reference = ChaCha20Rng::from_seed(key);
        reference.set_stream(9);
        reference.set_word_pos(16 << 32);
        assert!(out.iter().all(|&x| x == reference.next_u32()));
        assert_eq!(std::format!("{r:?}"), "ErrorRng(<secret>)");
    }

    /// Eight lanes of keys and streams give each pair's rand_chacha words, at any block (the
    /// mask streams' blocks are beyond 2^52).
    #[test]
    fn the_lanes_give_each_key_and_streams_words() {
        let mut g = rng(19);
        for block in [0u64, 5, (2 << 52) | (7 << 28), u64::MAX - 1] {
            let mut keys = [[0u8; 32]; 8];
            for k in keys.iter_mut() {
                g.fill_bytes(k);
            }
            keys[3] = keys[2]; // a shared key, other streams
            let streams: [u64; 8] = core::array::from_fn(|l| g.next_u64() >> (8 * (l % 3)));
            let mut out = [[0u32; 8]; 16];
            chacha20_lanes(&keys, &streams, block, &mut out);
            for l in 0..8 {
                let mut r = ChaCha20Rng::from_seed(keys[l]);
                r.set_stream(streams[l]);
                r.set_word_pos(16 * block as u128);
                assert!(
                    out.iter().all(|w| w[l] == r.next_u32()),
                    "lane {l} block {block}"
                );
            }
        }
    }

    #[test]
    fn encryption_round_trips_and_its_noise_is_the_binomial_error() {
        let mut g = rng(21);
        let s = ternary(&g, N);
        let mut key_words = vec![0u32; SecretKey::WORDS];
        let key = SecretKey::generate(&mut g, &mut key_words);
        let mut ws_words = vec![0u32; Workspace::WORDS];
        let mut ws = Workspace::new(&mut ws_words);
        let seed = Seed::random(&mut g);
        let (mut a, mut b, mut out) = (vec![0u64; N], vec![0u64; N], vec![0u32; N]);
        for index in 0..3 {
            let msg: Vec<u32> = (0..N).map(|_| g.next_u32()).collect();
            encrypt(&key, &seed, index, &msg, &mut g, &mut ws, &mut b);
            expand_a(&seed, index, 0, &mut a);
            decrypt(&key, &a, &b, ModSwitch::NONE, &mut ws, &mut out);
            assert_eq!(out, msg);
            // The phase b + a·s - Δ·m is the error itself: |e| ≤ η, mean about 0.
            let a_s = schoolbook_mod_2_64(&a, &s);
            let e: Vec<i64> = (0..N)
                .map(|k| {
                    b[k].wrapping_add(a_s[k])
                        .wrapping_sub((msg[k] as u64) << 32) as i64
                })
                .collect();
            assert!(e.iter().all(|x| x.abs() <= ETA as i64));
            assert!(e.iter().any(|&x| x != 0));
            // Switched fresh ciphertexts decrypt too.
            let sw = ModSwitch::RECOMMENDED;
            let (mut a2, mut b2) = (a.clone(), b.clone());
            mod_switch(&mut a2, sw.drop_a);
            mod_switch(&mut b2, sw.drop_b);
            decrypt(&key, &a2, &b2, sw, &mut ws, &mut out);
            assert_eq!(out, msg);
        }
    }

    /// The whole offline path at one layer shape: the client encrypts N slots of random masks per
    /// input, the server expands the seeds and multiplies by W (in chunks of inputs, to bound
    /// memory), switches, and every decrypted term equals `r·W mod 2^32` computed directly.
    fn homomorphic_layer(in_dim: usize, g: &mut ChaCha20Rng) {
        // Outputs 0-1 uniform int8 (-128 included), 2-4 all ±127 (the worst case), 5 all +127.
        let out_dim = 6;
        let mut w = vec![0u8; out_dim * in_dim];
        for (j, row) in w.chunks_exact_mut(in_dim).enumerate() {
            for x in row.iter_mut() {
                let r = g.next_u32();
                *x = match j {
                    0 | 1 => r as u8,
                    2..=4 => {
                        if r & 1 == 0 {
                            127
                        } else {
                            127u8.wrapping_neg()
                        }
                    }
                    _ => 127,
                };
            }
        }
        let mut key_words = vec![0u32; SecretKey::WORDS];
        let key = SecretKey::generate(g, &mut key_words);
        let mut ws_words = vec![0u32; Workspace::WORDS];
        let mut ws = Workspace::new(&mut ws_words);
        let seed = Seed::random(g);
        // r[i][slot], and the reference u[j][slot] in plain wrapping u32.
        let mut u_ref = vec![0u32; out_dim * N];
        let mut acc = vec![0u64; out_dim * 2 * N];
        const CHUNK: usize = 256;
        let mut x = vec![0u64; CHUNK * 2 * N];
        let mut y = vec![0u64; out_dim * 2 * N];
        let mut msg = vec![0u32; N];
        for i0 in (0..in_dim).step_by(CHUNK) {
            let rows = CHUNK.min(in_dim - i0);
            for r in 0..rows {
                let i = i0 + r;
                for m in msg.iter_mut() {
                    *m = g.next_u32();
                }
                for j in 0..out_dim {
                    let wj = w[j * in_dim + i] as i8 as i32 as u32;
                    for (u, &m) in u_ref[j * N..(j + 1) * N].iter_mut().zip(&msg) {
                        *u = u.wrapping_add(m.wrapping_mul(wj));
                    }
                }
                // Client: upload b_i. Server: row i = a_i ‖ b_i.
                let row = &mut x[r * 2 * N..(r + 1) * 2 * N];
                let (ra, rb) = row.split_at_mut(N);
                encrypt(&key, &seed, i as u64, &msg, g, &mut ws, rb);
                expand_a(&seed, i as u64, 0, ra);
            }
            let wc: Vec<u8> = (0..out_dim)
                .flat_map(|j| w[j * in_dim + i0..j * in_dim + i0 + rows].iter().copied())
                .collect();
            let y = &mut y[..];
            gemm_i8_u64(&x[..rows * 2 * N], &wc, rows, out_dim, 2 * N, y);
            for (t, &v) in acc.iter_mut().zip(y.iter()) {
                *t = t.wrapping_add(v);
            }
        }
        let mut out = vec![0u32; N];
        for sw in [ModSwitch::NONE, ModSwitch::RECOMMENDED] {
            for j in 0..out_dim {
                let (mut a, mut b) = (
                    acc[j * 2 * N..j * 2 * N + N].to_vec(),
                    acc[j * 2 * N + N..(j + 1) * 2 * N].to_vec(),
                );
                mod_switch(&mut a, sw.drop_a);
                mod_switch(&mut b, sw.drop_b);
                decrypt(&key, &a, &b, sw, &mut ws, &mut out);
                assert_eq!(
                    out[..],
                    u_ref[j * N..(j + 1) * N],
                    "in={in_dim} output {j} {sw:?}"
                );
            }
        }
        if in_dim == 3072 {
            // Far beyond the bound, the test does see wrong terms: it exercises the noise.
            let sw = ModSwitch {
                drop_a: 27,
                drop_b: 27,
            };
            let j = 2;
            let (mut a, mut b) = (
                acc[j * 2 * N..j * 2 * N + N].to_vec(),
                acc[j * 2 * N + N..(j + 1) * 2 * N].to_vec(),
            );
            mod_switch(&mut a, sw.drop_a);
            mod_switch(&mut b, sw.drop_b);
            decrypt(&key, &a, &b, sw, &mut ws, &mut out);
            assert_ne!(out[..], u_ref[j * N..(j + 1) * N]);
        }
    }

    #[test]
    fn homomorphic_product_decrypts_to_r_times_w_at_in_768() {
        homomorphic_layer(768, &mut rng(768));
    }

    #[test]
    fn homomorphic_product_decrypts_to_r_times_w_at_in_3072() {
        homomorphic_layer(3072, &mut rng(3072));
    }

    #[test]
    fn the_key_and_the_workspace_are_zeroed_on_drop_and_never_printed() {
        let mut g = rng(5);
        let mut key_words = vec![0u32; SecretKey::WORDS];
        let mut ws_words = vec![0u32; Workspace::WORDS];
        {
            let key = SecretKey::generate(&mut g, &mut key_words);
            let mut ws = Workspace::new(&mut ws_words);
            let mut b = vec![0u64; N];
            encrypt(
                &key,
                &Seed([1; 32]),
                0,
                &vec![9; N],
                &mut g,
                &mut ws,
                &mut b,
            );
            let shown = std::format!("{key:?} {ws:?}");
            assert_eq!(shown, "SecretKey(<secret>) Workspace(<secret>)");
        }
        assert!(key_words.iter().all(|&x| x == 0), "key not zeroized");
        assert!(ws_words.iter().all(|&x| x == 0), "workspace not zeroized");
        // It did hold something before the drop.
        let key = SecretKey::generate(&mut g, &mut key_words);
        assert!(key.ntt.iter().any(|&x| x != 0));
    }
}
