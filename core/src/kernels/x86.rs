//! AVX2 kernels for x86_64 (the server), chosen at run time.
//!
//! AVX2 is detected with CPUID and XGETBV, the way `std::is_x86_feature_detected!` does it (which
//! the no_std core cannot call), and the answer is cached. The kernels are `unsafe` only because
//! they are compiled for AVX2; [`Avx2`] is the proof that this CPU runs them, and its methods are
//! the safe entry points.

use core::arch::x86_64::{
    __cpuid, __cpuid_count, __m128i, __m256i, _mm256_add_epi32, _mm256_castsi256_si128,
    _mm256_cvtepi8_epi16, _mm256_cvtepi8_epi32, _mm256_extracti128_si256, _mm256_loadu_si256,
    _mm256_madd_epi16, _mm256_mullo_epi32, _mm256_setzero_si256, _mm_add_epi32, _mm_cvtsi128_si32,
    _mm_loadl_epi64, _mm_loadu_si128, _mm_shuffle_epi32, _xgetbv,
};
use core::sync::atomic::{AtomicU8, Ordering};

/// A token that only exists when the running CPU and OS support AVX2.
#[derive(Clone, Copy, Debug)]
pub(super) struct Avx2(());

const UNKNOWN: u8 = 0;
const ABSENT: u8 = 1;
const PRESENT: u8 = 2;
static DETECTED: AtomicU8 = AtomicU8::new(UNKNOWN);

impl Avx2 {
    /// `Some` when AVX2 can be used here. The first call runs CPUID; later calls read the cache.
    #[inline]
    pub(super) fn detect() -> Option<Self> {
        if cfg!(target_feature = "avx2") {
            return Some(Avx2(()));
        }
        let mut state = DETECTED.load(Ordering::Relaxed);
        if state == UNKNOWN {
            state = if cpu_has_avx2() { PRESENT } else { ABSENT };
            // Racing first calls compute the same answer, so a plain store is enough.
            DETECTED.store(state, Ordering::Relaxed);
        }
        (state == PRESENT).then_some(Avx2(()))
    }

    #[inline]
    pub(super) fn dot_u32_i8(self, x: &[u32], w: &[u8]) -> u32 {
        assert_eq!(x.len(), w.len(), "dot of unequal lengths");
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { dot_u32_i8(x, w) }
    }

    #[inline]
    pub(super) fn dot4_u32_i8(self, x: [&[u32]; 4], w: &[u8]) -> [u32; 4] {
        assert!(
            x.iter().all(|x| x.len() == w.len()),
            "dot of unequal lengths"
        );
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { dot4_u32_i8(x, w) }
    }

    #[inline]
    pub(super) fn dot_i8_i8(self, x: &[i8], w: &[u8]) -> i32 {
        assert_eq!(x.len(), w.len(), "dot of unequal lengths");
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { dot_i8_i8(x, w) }
    }

    #[inline]
    pub(super) fn dot4_i8_i8(self, x: [&[i8]; 4], w: &[u8]) -> [i32; 4] {
        assert!(
            x.iter().all(|x| x.len() == w.len()),
            "dot of unequal lengths"
        );
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { dot4_i8_i8(x, w) }
    }
}

impl Avx2 {
    #[inline]
    pub(super) fn dot_i16_rows(self, q: &[i16], keys: &[i16], stride: usize, out: &mut [i64]) {
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { dot_i16_rows(q, keys, stride, out) }
    }

    #[inline]
    pub(super) fn axpy_i16_rows(
        self,
        acc: &mut [i32],
        p: &[i32],
        shift: &[i32],
        values: &[i16],
        stride: usize,
    ) {
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { axpy_i16_rows(acc, p, shift, values, stride) }
    }
}

/// The portable [`super::scalar::dot_i16_rows`] compiled for AVX2: plain integer code that LLVM
/// vectorises 256 bits wide here (the baseline build only gets SSE2, which has no widening 32-bit
/// multiply). One call per attention head, not per position.
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn dot_i16_rows(q: &[i16], keys: &[i16], stride: usize, out: &mut [i64]) {
    super::scalar::dot_i16_rows(q, keys, stride, out)
}

/// The portable [`super::scalar::axpy_i16_rows`] compiled for AVX2, as [`dot_i16_rows`].
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn axpy_i16_rows(acc: &mut [i32], p: &[i32], shift: &[i32], values: &[i16], stride: usize) {
    super::scalar::axpy_i16_rows(acc, p, shift, values, stride)
}

/// CPUID leaf 7 EBX bit 5 (AVX2), and the OS saves the AVX state: leaf 1 ECX bits 27 (OSXSAVE)
/// and 28 (AVX), XCR0 bits 1 (SSE) and 2 (AVX).
#[allow(unused_unsafe)] // CPUID is an `unsafe fn` in older Rust, safe in recent Rust.
fn cpu_has_avx2() -> bool {
    // SAFETY: CPUID exists on every x86_64 CPU and has no side effects.
    let max_leaf = unsafe { __cpuid(0) }.eax;
    if max_leaf < 7 {
        return false;
    }
    // SAFETY: as above.
    let ecx1 = unsafe { __cpuid(1) }.ecx;
    let osxsave = ecx1 & (1 << 27) != 0;
    let avx = ecx1 & (1 << 28) != 0;
    if !(osxsave && avx) {
        return false;
    }
    // SAFETY: OSXSAVE set means the OS enabled XSAVE, so XGETBV exists and XCR0 can be read.
    let xcr0 = unsafe { xcr0() };
    if xcr0 & 0b110 != 0b110 {
        return false;
    }
    // SAFETY: leaf 7 exists (checked against the maximum leaf above).
    let ebx7 = unsafe { __cpuid_count(7, 0) }.ebx;
    ebx7 & (1 << 5) != 0
}

/// # Safety
/// The CPU must support XSAVE and the OS must have enabled it (CPUID leaf 1 ECX bit 27).
#[target_feature(enable = "xsave")]
unsafe fn xcr0() -> u64 {
    // SAFETY: the caller guarantees XGETBV is available; register 0 (XCR0) always exists.
    unsafe { _xgetbv(0) }
}

/// Sum of the eight `i32` lanes (wrapping).
#[inline]
#[target_feature(enable = "avx2")]
fn hsum(v: __m256i) -> i32 {
    let s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
    let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
    _mm_cvtsi128_si32(s)
}

/// Eight u32 from `x[i..i + 8]`.
///
/// # Safety
/// `i + 8 <= x.len()`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_u32x8(x: &[u32], i: usize) -> __m256i {
    debug_assert!(i + 8 <= x.len());
    // SAFETY: the caller guarantees 8 readable u32 (32 bytes) at `i`; loadu needs no alignment.
    unsafe { _mm256_loadu_si256(x.as_ptr().add(i).cast()) }
}

/// Eight int8 from `w[i..i + 8]`, sign-extended to i32 lanes.
///
/// # Safety
/// `i + 8 <= w.len()`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_i8x8_as_i32(w: &[u8], i: usize) -> __m256i {
    debug_assert!(i + 8 <= w.len());
    // SAFETY: the caller guarantees 8 readable bytes at `i`; the load needs no alignment.
    let v = unsafe { _mm_loadl_epi64(w.as_ptr().add(i).cast::<__m128i>()) };
    _mm256_cvtepi8_epi32(v)
}

/// Sixteen int8 from `p[i..i + 16]`, sign-extended to i16 lanes.
///
/// # Safety
/// `i + 16 <= p.len()`.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn load_i8x16_as_i16<T: Int8>(p: &[T], i: usize) -> __m256i {
    debug_assert!(i + 16 <= p.len());
    // SAFETY: the caller guarantees 16 readable bytes at `i` (T is one byte); no alignment needed.
    let v = unsafe { _mm_loadu_si128(p.as_ptr().add(i).cast::<__m128i>()) };
    _mm256_cvtepi8_epi16(v)
}

/// `i8` or `u8`: a byte that holds an int8.
trait Int8: Copy {}
impl Int8 for i8 {}
impl Int8 for u8 {}

/// # Safety
/// AVX2 must be available; `x.len() == w.len()`.
#[target_feature(enable = "avx2")]
unsafe fn dot_u32_i8(x: &[u32], w: &[u8]) -> u32 {
    let n = x.len().min(w.len());
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = i + 8 * k;
            // SAFETY: at + 8 <= i + 32 <= n, within both slices.
            let (xv, wv) = unsafe { (load_u32x8(x, at), load_i8x8_as_i32(w, at)) };
            *acc = _mm256_add_epi32(*acc, _mm256_mullo_epi32(xv, wv));
        }
        i += 32;
    }
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within both slices.
        let (xv, wv) = unsafe { (load_u32x8(x, i), load_i8x8_as_i32(w, i)) };
        acc[0] = _mm256_add_epi32(acc[0], _mm256_mullo_epi32(xv, wv));
        i += 8;
    }
    let acc = _mm256_add_epi32(
        _mm256_add_epi32(acc[0], acc[1]),
        _mm256_add_epi32(acc[2], acc[3]),
    );
    let mut total = hsum(acc) as u32;
    for (&x, &w) in x[i..n].iter().zip(&w[i..n]) {
        total = total.wrapping_add(x.wrapping_mul(w as i8 as i32 as u32));
    }
    total
}

/// Four rows against one weight row: each weight vector is loaded and widened once.
///
/// # Safety
/// AVX2 must be available; every `x[r].len() == w.len()`.
#[target_feature(enable = "avx2")]
unsafe fn dot4_u32_i8(x: [&[u32]; 4], w: &[u8]) -> [u32; 4] {
    let n = x.iter().fold(w.len(), |n, x| n.min(x.len()));
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n, within `w`.
        let wv = unsafe { load_i8x8_as_i32(w, i) };
        for (acc, x) in acc.iter_mut().zip(x) {
            // SAFETY: i + 8 <= n, within `x`.
            let xv = unsafe { load_u32x8(x, i) };
            *acc = _mm256_add_epi32(*acc, _mm256_mullo_epi32(xv, wv));
        }
        i += 8;
    }
    let mut out = [0u32; 4];
    for ((out, acc), x) in out.iter_mut().zip(acc).zip(x) {
        let mut total = hsum(acc) as u32;
        for (&x, &w) in x[i..n].iter().zip(&w[i..n]) {
            total = total.wrapping_add(x.wrapping_mul(w as i8 as i32 as u32));
        }
        *out = total;
    }
    out
}

/// # Safety
/// AVX2 must be available; `x.len() == w.len()`.
#[target_feature(enable = "avx2")]
unsafe fn dot_i8_i8(x: &[i8], w: &[u8]) -> i32 {
    let n = x.len().min(w.len());
    let mut acc = [_mm256_setzero_si256(); 2];
    let mut i = 0;
    while i + 32 <= n {
        for (k, acc) in acc.iter_mut().enumerate() {
            let at = i + 16 * k;
            // SAFETY: at + 16 <= i + 32 <= n, within both slices.
            let (xv, wv) = unsafe { (load_i8x16_as_i16(x, at), load_i8x16_as_i16(w, at)) };
            // Pairs of i8·i8 products are at most 2 · 2^14 in magnitude: exact in i32.
            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(xv, wv));
        }
        i += 32;
    }
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within both slices.
        let (xv, wv) = unsafe { (load_i8x16_as_i16(x, i), load_i8x16_as_i16(w, i)) };
        acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(xv, wv));
        i += 16;
    }
    let mut total = hsum(_mm256_add_epi32(acc[0], acc[1]));
    for (&x, &w) in x[i..n].iter().zip(&w[i..n]) {
        total = total.wrapping_add(x as i32 * w as i8 as i32);
    }
    total
}

/// Four int8 rows against one weight row.
///
/// # Safety
/// AVX2 must be available; every `x[r].len() == w.len()`.
#[target_feature(enable = "avx2")]
unsafe fn dot4_i8_i8(x: [&[i8]; 4], w: &[u8]) -> [i32; 4] {
    let n = x.iter().fold(w.len(), |n, x| n.min(x.len()));
    let mut acc = [_mm256_setzero_si256(); 4];
    let mut i = 0;
    while i + 16 <= n {
        // SAFETY: i + 16 <= n, within `w`.
        let wv = unsafe { load_i8x16_as_i16(w, i) };
        for (acc, x) in acc.iter_mut().zip(x) {
            // SAFETY: i + 16 <= n, within `x`.
            let xv = unsafe { load_i8x16_as_i16(x, i) };
            *acc = _mm256_add_epi32(*acc, _mm256_madd_epi16(xv, wv));
        }
        i += 16;
    }
    let mut out = [0i32; 4];
    for ((out, acc), x) in out.iter_mut().zip(acc).zip(x) {
        let mut total = hsum(acc);
        for (&x, &w) in x[i..n].iter().zip(&w[i..n]) {
            total = total.wrapping_add(x as i32 * w as i8 as i32);
        }
        *out = total;
    }
    out
}
