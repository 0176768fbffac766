//! The client's RLWE passes around the transforms (limb splitting, recombination with the message
//! and the errors, decryption's rounding) compiled for AVX2: the portable code of [`super`], which
//! LLVM vectorises 256 bits wide here (the x86_64 baseline only gets SSE2, without a popcount or
//! 64-bit lane shifts by a vector). Same code, so the same words; the tests check it anyway.

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

/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn unpack_bits_avx2(words: &[u32], width: u32, values: &mut [u64]) {
    super::unpack_bits_portable(words, width, values)
}
