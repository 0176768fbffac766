//! The transforms of [`super`] with AVX2, eight coefficients per instruction, giving the same
//! words as the portable ones (tested there).
//!
//! The first nine forward stages (the last nine inverse ones) pair values at least eight apart,
//! so each butterfly is one vector operation with a broadcast twiddle. The three stages inside a
//! block of 64 run on the block transposed into eight registers (register `j` lane `l` = value
//! `8l + j`): their partners are then whole registers apart, with one twiddle per lane from the
//! tail tables. The forward transform leaves the block transposed (the order [`super::forward`]
//! documents); the inverse starts from it and transposes back.
//!
//! AVX2 has no unsigned 32 × 32 → high-32 multiply: [`mulhi`] takes the even lanes' products and
//! the odd lanes' (shifted down) from two `vpmuludq` and blends them.

use core::arch::x86_64::{
    __m256i, _mm256_add_epi32, _mm256_add_epi64, _mm256_blend_epi32, _mm256_loadu_si256,
    _mm256_min_epu32, _mm256_mul_epu32, _mm256_mullo_epi32, _mm256_permute2x128_si256,
    _mm256_set1_epi32, _mm256_srli_epi64, _mm256_storeu_si256, _mm256_sub_epi32,
    _mm256_unpackhi_epi32, _mm256_unpackhi_epi64, _mm256_unpacklo_epi32, _mm256_unpacklo_epi64,
};

use super::{
    BLOCK, LAST_INV_N, LAST_INV_N_SHOUP, N, N_INV, N_INV_SHOUP, P, P_NEG_INV, TABLES, TAIL, TWO_P,
};
use crate::kernels::Avx2;

#[inline]
#[target_feature(enable = "avx2")]
fn splat(x: u32) -> __m256i {
    _mm256_set1_epi32(x as i32)
}

/// Loads eight words (`x` is a chunk of exactly eight).
#[inline]
#[target_feature(enable = "avx2")]
fn load(x: &[u32]) -> __m256i {
    let x: &[u32; 8] = x.try_into().expect("eight words");
    // SAFETY: `x` is 8 readable u32 (32 bytes); loadu needs no alignment.
    unsafe { _mm256_loadu_si256(x.as_ptr().cast()) }
}

/// Stores eight words (`x` is a chunk of exactly eight).
#[inline]
#[target_feature(enable = "avx2")]
fn store(x: &mut [u32], v: __m256i) {
    let x: &mut [u32; 8] = x.try_into().expect("eight words");
    // SAFETY: `x` is 8 writable u32 (32 bytes); storeu needs no alignment.
    unsafe { _mm256_storeu_si256(x.as_mut_ptr().cast(), v) }
}

/// The high 32 bits of each lane's unsigned 32 × 32 product.
#[inline]
#[target_feature(enable = "avx2")]
fn mulhi(a: __m256i, b: __m256i) -> __m256i {
    let even = _mm256_srli_epi64::<32>(_mm256_mul_epu32(a, b));
    let odd = _mm256_mul_epu32(_mm256_srli_epi64::<32>(a), _mm256_srli_epi64::<32>(b));
    _mm256_blend_epi32::<0b1010_1010>(even, odd)
}

/// `min(x, x - m)`: `x - m` where `x ≥ m`, else `x`.
#[inline]
#[target_feature(enable = "avx2")]
fn sub_if_ge(x: __m256i, m: __m256i) -> __m256i {
    _mm256_min_epu32(x, _mm256_sub_epi32(x, m))
}

/// Shoup's lazy product `x · w mod P` in `[0, 2P)` per lane.
#[inline]
#[target_feature(enable = "avx2")]
fn mul_shoup(x: __m256i, w: __m256i, ws: __m256i) -> __m256i {
    let q = mulhi(x, ws);
    _mm256_sub_epi32(_mm256_mullo_epi32(x, w), _mm256_mullo_epi32(q, splat(P)))
}

#[inline]
#[target_feature(enable = "avx2")]
fn ct(x: __m256i, y: __m256i, w: __m256i, ws: __m256i) -> (__m256i, __m256i) {
    let u = sub_if_ge(x, splat(TWO_P));
    let v = mul_shoup(y, w, ws);
    (
        _mm256_add_epi32(u, v),
        _mm256_sub_epi32(_mm256_add_epi32(u, splat(TWO_P)), v),
    )
}

#[inline]
#[target_feature(enable = "avx2")]
fn gs(x: __m256i, y: __m256i, w: __m256i, ws: __m256i) -> (__m256i, __m256i) {
    let s = sub_if_ge(_mm256_add_epi32(x, y), splat(TWO_P));
    let d = _mm256_sub_epi32(_mm256_add_epi32(x, splat(TWO_P)), y);
    (s, mul_shoup(d, w, ws))
}

/// Transposes eight registers as an 8 × 8 matrix of words.
#[inline]
#[target_feature(enable = "avx2")]
fn transpose(v: &mut [__m256i; 8]) {
    let t0 = _mm256_unpacklo_epi32(v[0], v[1]);
    let t1 = _mm256_unpackhi_epi32(v[0], v[1]);
    let t2 = _mm256_unpacklo_epi32(v[2], v[3]);
    let t3 = _mm256_unpackhi_epi32(v[2], v[3]);
    let t4 = _mm256_unpacklo_epi32(v[4], v[5]);
    let t5 = _mm256_unpackhi_epi32(v[4], v[5]);
    let t6 = _mm256_unpacklo_epi32(v[6], v[7]);
    let t7 = _mm256_unpackhi_epi32(v[6], v[7]);
    let u0 = _mm256_unpacklo_epi64(t0, t2);
    let u1 = _mm256_unpackhi_epi64(t0, t2);
    let u2 = _mm256_unpacklo_epi64(t1, t3);
    let u3 = _mm256_unpackhi_epi64(t1, t3);
    let u4 = _mm256_unpacklo_epi64(t4, t6);
    let u5 = _mm256_unpackhi_epi64(t4, t6);
    let u6 = _mm256_unpacklo_epi64(t5, t7);
    let u7 = _mm256_unpackhi_epi64(t5, t7);
    v[0] = _mm256_permute2x128_si256::<0x20>(u0, u4);
    v[1] = _mm256_permute2x128_si256::<0x20>(u1, u5);
    v[2] = _mm256_permute2x128_si256::<0x20>(u2, u6);
    v[3] = _mm256_permute2x128_si256::<0x20>(u3, u7);
    v[4] = _mm256_permute2x128_si256::<0x31>(u0, u4);
    v[5] = _mm256_permute2x128_si256::<0x31>(u1, u5);
    v[6] = _mm256_permute2x128_si256::<0x31>(u2, u6);
    v[7] = _mm256_permute2x128_si256::<0x31>(u3, u7);
}

#[inline]
#[target_feature(enable = "avx2")]
fn load_block(block: &[u32]) -> [__m256i; 8] {
    core::array::from_fn(|r| load(&block[8 * r..8 * r + 8]))
}

/// The forward transform (see [`super::forward`]).
pub(super) fn forward(_: Avx2, a: &mut [u32; N]) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { forward_avx2(a) }
}

/// The inverse transform (see [`super::inverse`]).
pub(super) fn inverse(_: Avx2, a: &mut [u32; N]) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { inverse_avx2(a) }
}

/// The Montgomery pointwise product (see [`super::mul_montgomery`]).
pub(super) fn mul_montgomery(_: Avx2, a: &mut [u32; N], b: &[u32; N]) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { mul_montgomery_avx2(a, b) }
}

/// [`super::forward_mul_montgomery`] on AVX2.
pub(super) fn forward_mul_montgomery(_: Avx2, a: &mut [u32; N], b: &[u32; N]) {
    // SAFETY: the `Avx2` token proves the CPU supports AVX2.
    unsafe { forward_mul_avx2(a, Some(b)) }
}

#[target_feature(enable = "avx2")]
fn forward_avx2(a: &mut [u32; N]) {
    forward_mul_avx2(a, None)
}

/// The forward transform, and if `b` is given the Montgomery product with it in the same last
/// pass (the values are in registers there).
#[target_feature(enable = "avx2")]
#[inline]
fn forward_mul_avx2(a: &mut [u32; N], b: Option<&[u32; N]>) {
    let tw = &TABLES;
    // Stages with partners t ≥ 8 apart: m blocks of 2t values, t/8 registers per half.
    let (mut t, mut m) = (N, 1);
    while m < N / 8 {
        t >>= 1;
        for (b, block) in a.chunks_exact_mut(2 * t).enumerate() {
            let (w, ws) = (splat(tw.fwd[m + b]), splat(tw.fwd_shoup[m + b]));
            let (lo, hi) = block.split_at_mut(t);
            for (x, y) in lo.chunks_exact_mut(8).zip(hi.chunks_exact_mut(8)) {
                let (p, q) = ct(load(x), load(y), w, ws);
                store(x, p);
                store(y, q);
            }
        }
        m <<= 1;
    }
    let tails = tw
        .fwd_tail
        .chunks_exact(TAIL)
        .zip(tw.fwd_tail_shoup.chunks_exact(TAIL));
    for (i, (block, (wt, wst))) in a.chunks_exact_mut(BLOCK).zip(tails).enumerate() {
        let mut v = load_block(block);
        transpose(&mut v);
        let lane = |k: usize| (load(&wt[8 * k..8 * k + 8]), load(&wst[8 * k..8 * k + 8]));
        let (w, ws) = lane(0);
        for j in 0..4 {
            (v[j], v[j + 4]) = ct(v[j], v[j + 4], w, ws);
        }
        for half in 0..2 {
            let (w, ws) = lane(1 + half);
            for j in [4 * half, 4 * half + 1] {
                (v[j], v[j + 2]) = ct(v[j], v[j + 2], w, ws);
            }
        }
        for k in 0..4 {
            let (w, ws) = lane(3 + k);
            (v[2 * k], v[2 * k + 1]) = ct(v[2 * k], v[2 * k + 1], w, ws);
        }
        for (k, (dst, x)) in block.chunks_exact_mut(8).zip(v).enumerate() {
            let x = sub_if_ge(sub_if_ge(x, splat(TWO_P)), splat(P));
            match b {
                Some(b) => {
                    let at = BLOCK * i + 8 * k;
                    store(dst, montgomery(x, load(&b[at..at + 8])));
                }
                None => store(dst, x),
            }
        }
    }
}

/// `x · y · 2^-32 mod P` in `[0, 2P)` per lane (Montgomery reduction of each product).
#[inline]
#[target_feature(enable = "avx2")]
fn montgomery(xv: __m256i, yv: __m256i) -> __m256i {
    let (pv, pinv) = (splat(P), splat(P_NEG_INV));
    // Per 64-bit lane: z = x·y, m = (z mod 2^32)·(-1/P), (z + m·P) / 2^32 (`vpmuludq` reads the
    // low 32 bits of each 64-bit lane, so the even words go as they are and the odd ones shifted).
    let redc = |x: __m256i, y: __m256i| {
        let z = _mm256_mul_epu32(x, y);
        let m = _mm256_mul_epu32(z, pinv);
        _mm256_add_epi64(z, _mm256_mul_epu32(m, pv))
    };
    let even = _mm256_srli_epi64::<32>(redc(xv, yv));
    let odd = redc(_mm256_srli_epi64::<32>(xv), _mm256_srli_epi64::<32>(yv));
    _mm256_blend_epi32::<0b1010_1010>(even, odd)
}

#[target_feature(enable = "avx2")]
fn inverse_avx2(a: &mut [u32; N]) {
    let tw = &TABLES;
    let tails = tw
        .inv_tail
        .chunks_exact(TAIL)
        .zip(tw.inv_tail_shoup.chunks_exact(TAIL));
    for (block, (wt, wst)) in a.chunks_exact_mut(BLOCK).zip(tails) {
        let mut v = load_block(block);
        let lane = |k: usize| (load(&wt[8 * k..8 * k + 8]), load(&wst[8 * k..8 * k + 8]));
        for k in 0..4 {
            let (w, ws) = lane(3 + k);
            (v[2 * k], v[2 * k + 1]) = gs(v[2 * k], v[2 * k + 1], w, ws);
        }
        for half in 0..2 {
            let (w, ws) = lane(1 + half);
            for j in [4 * half, 4 * half + 1] {
                (v[j], v[j + 2]) = gs(v[j], v[j + 2], w, ws);
            }
        }
        let (w, ws) = lane(0);
        for j in 0..4 {
            (v[j], v[j + 4]) = gs(v[j], v[j + 4], w, ws);
        }
        transpose(&mut v);
        for (dst, x) in block.chunks_exact_mut(8).zip(v) {
            store(dst, x);
        }
    }
    // Stages with partners t ≥ 8 apart, from m = N/16 blocks of 16 values down to two blocks;
    // the last stage (one block) below, with the scaling by N^-1.
    let (mut t, mut m) = (8, N / 8);
    while m > 2 {
        let h = m >> 1;
        for (b, block) in a.chunks_exact_mut(2 * t).enumerate() {
            let (w, ws) = (splat(tw.inv[h + b]), splat(tw.inv_shoup[h + b]));
            let (lo, hi) = block.split_at_mut(t);
            for (x, y) in lo.chunks_exact_mut(8).zip(hi.chunks_exact_mut(8)) {
                let (p, q) = gs(load(x), load(y), w, ws);
                store(x, p);
                store(y, q);
            }
        }
        t <<= 1;
        m = h;
    }
    // The last stage with N^-1 folded in: (x + y)·N^-1 and (x - y)·(w·N^-1), each reduced to
    // [0, P) (the lazy product is below 2P for any 32-bit input, and x + y < 4P).
    let (ni, nis) = (splat(N_INV), splat(N_INV_SHOUP));
    let (wn, wns) = (splat(LAST_INV_N), splat(LAST_INV_N_SHOUP));
    let (pv, two_p) = (splat(P), splat(TWO_P));
    let (lo, hi) = a.split_at_mut(N / 2);
    for (x, y) in lo.chunks_exact_mut(8).zip(hi.chunks_exact_mut(8)) {
        let (u, v) = (load(x), load(y));
        let sum = _mm256_add_epi32(u, v);
        let diff = _mm256_sub_epi32(_mm256_add_epi32(u, two_p), v);
        store(x, sub_if_ge(mul_shoup(sum, ni, nis), pv));
        store(y, sub_if_ge(mul_shoup(diff, wn, wns), pv));
    }
}

#[target_feature(enable = "avx2")]
fn mul_montgomery_avx2(a: &mut [u32; N], b: &[u32; N]) {
    for (x, y) in a.chunks_exact_mut(8).zip(b.chunks_exact(8)) {
        store(x, montgomery(load(x), load(y)));
    }
}
