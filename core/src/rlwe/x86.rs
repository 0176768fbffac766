//! The client's RLWE passes around the transforms (limb splitting, recombination with the message
//! and the errors, decryption's rounding) compiled for AVX2: the portable code of [`super`], which
//! LLVM vectorises 256 bits wide here (the x86_64 baseline only gets SSE2, without a popcount or
//! 64-bit lane shifts by a vector). Same code, so the same words; the tests check it anyway.

use core::arch::x86_64::{
    __m256i, _mm256_add_epi32, _mm256_loadu_si256, _mm256_or_si256, _mm256_permute2x128_si256,
    _mm256_set1_epi32, _mm256_setr_epi8, _mm256_shuffle_epi8, _mm256_slli_epi32, _mm256_srli_epi32,
    _mm256_storeu_si256, _mm256_unpackhi_epi32, _mm256_unpackhi_epi64, _mm256_unpacklo_epi32,
    _mm256_unpacklo_epi64, _mm256_xor_si256,
};

use super::{ModSwitch, N};
use crate::kernels::Avx2;

/// [`super::split_limbs`] on AVX2.
#[inline]
pub(super) fn split_limbs(_: Avx2, src: &[u64], count: usize, limbs: &mut [u32]) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { split_limbs_avx2(src, count, limbs) }
}

/// [`super::finish_encryption`] on AVX2.
#[inline]
pub(super) fn finish_encryption(
    _: Avx2,
    limbs: &[u32],
    i0: usize,
    c0: usize,
    bits: &[u8],
    m: &[u32],
    out: &mut [u64],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { finish_encryption_avx2(limbs, i0, c0, bits, m, out) }
}

/// [`super::finish_decryption`] on AVX2.
#[inline]
pub(super) fn finish_decryption(
    _: Avx2,
    limbs: &[u32],
    count: usize,
    b: &[u64],
    switch: ModSwitch,
    out: &mut [u32],
) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { finish_decryption_avx2(limbs, count, b, switch, out) }
}

/// [`super::unpack_bits`] on AVX2.
#[inline]
pub(super) fn unpack_bits(_: Avx2, words: &[u32], width: u32, values: &mut [u64]) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { unpack_bits_avx2(words, width, values) }
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn split_limbs_avx2(src: &[u64], count: usize, limbs: &mut [u32]) {
    debug_assert_eq!(src.len(), N);
    super::split_limbs_portable(src, count, limbs)
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn finish_encryption_avx2(
    limbs: &[u32],
    i0: usize,
    c0: usize,
    bits: &[u8],
    m: &[u32],
    out: &mut [u64],
) {
    super::finish_encryption_portable(limbs, i0, c0, bits, m, out)
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn finish_decryption_avx2(
    limbs: &[u32],
    count: usize,
    b: &[u64],
    switch: ModSwitch,
    out: &mut [u32],
) {
    super::finish_decryption_portable(limbs, count, b, switch, out)
}

/// For widths up to 57 bits, value `k` (bits `k·w..k·w + w` of the stream) lies in the eight
/// bytes from byte `k·w / 8` on: one unaligned little-endian load, a shift and a mask, where the
/// portable code assembles three words into a `u128`. Values whose eight bytes would run past the
/// stream, and wider values, take the portable path.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn unpack_bits_avx2(words: &[u32], width: u32, values: &mut [u64]) {
    let w = width as usize;
    if !(1..=57).contains(&w) {
        return super::unpack_bits_portable(words, width, values);
    }
    let mask = (1u64 << w) - 1;
    let bytes = words.len() * 4;
    // Value `k` reads bytes `k·w/8 .. k·w/8 + 8`: in the stream while `k·w/8 + 8 ≤ bytes`.
    let fast = values.len().min(match bytes.checked_sub(8) {
        Some(last) => (last * 8) / w + 1,
        None => 0,
    });
    let base = words.as_ptr().cast::<u8>();
    for (k, v) in values[..fast].iter_mut().enumerate() {
        let pos = k * w;
        // SAFETY: `pos / 8 + 8 ≤ bytes` for `k < fast` (above), so the eight bytes lie inside
        // `words`; `read_unaligned` needs no alignment and any bytes are a valid `u64`.
        let x = unsafe { base.add(pos / 8).cast::<u64>().read_unaligned() };
        *v = (u64::from_le(x) >> (pos % 8)) & mask;
    }
    for (k, v) in values.iter_mut().enumerate().skip(fast) {
        let pos = k * w;
        let i = pos / 32;
        let word = |j: usize| words.get(j).copied().unwrap_or(0) as u128;
        let x = word(i) | word(i + 1) << 32 | word(i + 2) << 64;
        *v = (x >> (pos % 32)) as u64 & mask;
    }
}

/// [`super::expand_a`] on AVX2: ChaCha20 eight blocks at a time, one block per 32-bit lane
/// ([`chacha20_blocks`]), the same keystream as rand_chacha's `ChaCha20Rng` (state words 0-3 the
/// constants, 4-11 the key, 12-13 the 64-bit block counter, 14-15 the 64-bit stream).
pub(super) fn expand_a(_: Avx2, key: &[u8; 32], stream: u64, first: usize, out: &mut [u64]) {
    let k = key_words(key);
    let word = 2 * first as u64;
    let (mut block, mut skip) = (word / 16, (word % 16) as usize);
    let mut buf = [0u32; 8 * 16];
    let mut done = 0;
    while done < out.len() {
        // SAFETY: the `Avx2` token proves the CPU supports AVX2.
        unsafe { chacha20_blocks(&k, stream, block, &mut buf) };
        let n = ((buf.len() - skip) / 2).min(out.len() - done);
        for (o, w) in out[done..done + n]
            .iter_mut()
            .zip(buf[skip..].chunks_exact(2))
        {
            *o = w[0] as u64 | (w[1] as u64) << 32;
        }
        (done, skip, block) = (done + n, 0, block.wrapping_add(8));
    }
}

/// The key's eight little-endian words.
fn key_words(key: &[u8; 32]) -> [u32; 8] {
    let mut k = [0u32; 8];
    for (w, b) in k.iter_mut().zip(key.chunks_exact(4)) {
        *w = u32::from_le_bytes(b.try_into().expect("4 bytes"));
    }
    k
}

/// ChaCha20 blocks `block..block + 8` of `(key, stream)` into `out` on AVX2 (see
/// [`chacha20_blocks`]). The key's words on the stack are zeroized.
pub(super) fn chacha20_eight_blocks(
    _: Avx2,
    key: &[u8; 32],
    stream: u64,
    block: u64,
    out: &mut [u32; 128],
) {
    let mut k = key_words(key);
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { chacha20_blocks(&k, stream, block, out) };
    zeroize::Zeroize::zeroize(&mut k);
}

/// `x <<< r` in every 32-bit lane (for the rotations that are not whole bytes).
#[inline(always)]
fn rotl<const L: i32, const R: i32>(x: __m256i) -> __m256i {
    // SAFETY: AVX2 shifts and or, inlined into `chacha20_blocks`, compiled for AVX2.
    unsafe { _mm256_or_si256(_mm256_slli_epi32::<L>(x), _mm256_srli_epi32::<R>(x)) }
}

/// ChaCha20 blocks `block..block + 8` of `(key, stream)` into `out`, block after block (16 words
/// each, as the reference serialises a block's state words).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn chacha20_blocks(key: &[u32; 8], stream: u64, block: u64, out: &mut [u32; 128]) {
    let (mut lo, mut hi) = ([0u32; 8], [0u32; 8]);
    for (l, (lo, hi)) in lo.iter_mut().zip(hi.iter_mut()).enumerate() {
        let b = block.wrapping_add(l as u64);
        (*lo, *hi) = (b as u32, (b >> 32) as u32);
    }
    let splat = |x: u32| _mm256_set1_epi32(x as i32);
    let mut init = [splat(0); 16];
    for (i, &k) in key.iter().enumerate() {
        init[4 + i] = splat(k);
    }
    // SAFETY: `lo` and `hi` are 8 readable u32 each; loadu needs no alignment.
    (init[12], init[13]) = unsafe {
        (
            _mm256_loadu_si256(lo.as_ptr().cast()),
            _mm256_loadu_si256(hi.as_ptr().cast()),
        )
    };
    (init[14], init[15]) = (splat(stream as u32), splat((stream >> 32) as u32));
    // SAFETY: this function is compiled for AVX2 (its caller's contract).
    let x = unsafe { chacha20_lanes_state(init) };
    store_blocks(&x, out);
}

/// [`super::chacha20_lanes`] on AVX2: lane `l` runs block `block` of `(keys[l], streams[l])`, so
/// `out[w]` holds word `w` of the eight blocks, slot-major already.
pub(super) fn chacha20_lanes(
    _: Avx2,
    keys: &[[u8; 32]; 8],
    streams: &[u64; 8],
    block: u64,
    out: &mut [[u32; 8]; 16],
) {
    let mut words = [[0u32; 8]; 16];
    for (l, key) in keys.iter().enumerate() {
        for (i, k) in key_words(key).iter().enumerate() {
            words[4 + i][l] = *k;
        }
        words[12][l] = block as u32;
        words[13][l] = (block >> 32) as u32;
        words[14][l] = streams[l] as u32;
        words[15][l] = (streams[l] >> 32) as u32;
    }
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { chacha20_lanes_avx2(&words, out) };
    zeroize::Zeroize::zeroize(&mut words);
}

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn chacha20_lanes_avx2(words: &[[u32; 8]; 16], out: &mut [[u32; 8]; 16]) {
    let mut init = [_mm256_set1_epi32(0); 16];
    for (v, w) in init.iter_mut().zip(words).skip(4) {
        // SAFETY: `w` is 8 readable u32; loadu needs no alignment.
        *v = unsafe { _mm256_loadu_si256(w.as_ptr().cast()) };
    }
    // SAFETY: this function is compiled for AVX2 (its caller's contract).
    let x = unsafe { chacha20_lanes_state(init) };
    for (o, v) in out.iter_mut().zip(x) {
        // SAFETY: `o` is 8 writable u32; storeu needs no alignment.
        unsafe { _mm256_storeu_si256(o.as_mut_ptr().cast(), v) };
    }
}

/// The 20 rounds and the final addition for eight independent blocks, one per lane: `init`
/// holds state words 4-15 per lane (the constants, words 0-3, are set here).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn chacha20_lanes_state(mut init: [__m256i; 16]) -> [__m256i; 16] {
    const SIGMA: [u32; 4] = [0x6170_7865, 0x3320_646e, 0x7962_2d32, 0x6b20_6574];
    for (v, &c) in init.iter_mut().zip(&SIGMA) {
        *v = _mm256_set1_epi32(c as i32);
    }
    let rot16 = _mm256_setr_epi8(
        2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9,
        14, 15, 12, 13,
    );
    let rot8 = _mm256_setr_epi8(
        3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10, 15, 12, 13, 14, 3, 0, 1, 2, 7, 4, 5, 6, 11, 8, 9, 10,
        15, 12, 13, 14,
    );
    let mut x = init;
    let qr = |x: &mut [__m256i; 16], a: usize, b: usize, c: usize, d: usize| {
        x[a] = _mm256_add_epi32(x[a], x[b]);
        x[d] = _mm256_shuffle_epi8(_mm256_xor_si256(x[d], x[a]), rot16);
        x[c] = _mm256_add_epi32(x[c], x[d]);
        x[b] = rotl::<12, 20>(_mm256_xor_si256(x[b], x[c]));
        x[a] = _mm256_add_epi32(x[a], x[b]);
        x[d] = _mm256_shuffle_epi8(_mm256_xor_si256(x[d], x[a]), rot8);
        x[c] = _mm256_add_epi32(x[c], x[d]);
        x[b] = rotl::<7, 25>(_mm256_xor_si256(x[b], x[c]));
    };
    for _ in 0..10 {
        qr(&mut x, 0, 4, 8, 12);
        qr(&mut x, 1, 5, 9, 13);
        qr(&mut x, 2, 6, 10, 14);
        qr(&mut x, 3, 7, 11, 15);
        qr(&mut x, 0, 5, 10, 15);
        qr(&mut x, 1, 6, 11, 12);
        qr(&mut x, 2, 7, 8, 13);
        qr(&mut x, 3, 4, 9, 14);
    }
    for (v, &i) in x.iter_mut().zip(&init) {
        *v = _mm256_add_epi32(*v, i);
    }
    x
}

/// Stores eight blocks computed lane by lane ([`chacha20_lanes_state`]) block after block.
#[target_feature(enable = "avx2")]
#[inline]
fn store_blocks(x: &[__m256i; 16], out: &mut [u32; 128]) {
    // Lane `l` of register `w` is word `w` of block `l`: transpose each half (words 0-7, 8-15).
    for (half, rows) in x.chunks_exact(8).enumerate() {
        let t: [__m256i; 8] = core::array::from_fn(|i| {
            let (a, b) = (rows[i & !1], rows[i | 1]);
            if i & 1 == 0 {
                _mm256_unpacklo_epi32(a, b)
            } else {
                _mm256_unpackhi_epi32(a, b)
            }
        });
        // t[0] = lo(r0, r1), t[1] = hi(r0, r1), t[2] = lo(r2, r3), ... t[7] = hi(r6, r7).
        let u: [__m256i; 8] = [
            _mm256_unpacklo_epi64(t[0], t[2]),
            _mm256_unpackhi_epi64(t[0], t[2]),
            _mm256_unpacklo_epi64(t[1], t[3]),
            _mm256_unpackhi_epi64(t[1], t[3]),
            _mm256_unpacklo_epi64(t[4], t[6]),
            _mm256_unpackhi_epi64(t[4], t[6]),
            _mm256_unpacklo_epi64(t[5], t[7]),
            _mm256_unpackhi_epi64(t[5], t[7]),
        ];
        for l in 0..8 {
            let (a, b) = (u[l % 4], u[l % 4 + 4]);
            let v = if l < 4 {
                _mm256_permute2x128_si256::<0x20>(a, b)
            } else {
                _mm256_permute2x128_si256::<0x31>(a, b)
            };
            let at = 16 * l + 8 * half;
            // SAFETY: `at + 8 ≤ 128`: 8 writable u32 of `out`; storeu needs no alignment.
            unsafe { _mm256_storeu_si256(out[at..at + 8].as_mut_ptr().cast(), v) };
        }
    }
}
