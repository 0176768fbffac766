//! AVX2 kernels for x86_64 (the server), chosen at run time.
//!
//! AVX2 is detected with CPUID and XGETBV, the way `std::is_x86_feature_detected!` does it (which
//! the no_std core cannot call), and the answer is cached. The kernels are `unsafe` only because
//! they are compiled for AVX2; [`Avx2`] is the proof that this CPU runs them, and its methods are
//! the safe entry points.

use core::arch::x86_64::{
    __cpuid, __cpuid_count, __m128i, __m256i, _mm256_add_epi32, _mm256_add_epi64,
    _mm256_castsi256_si128, _mm256_cvtepi32_epi64, _mm256_cvtepi8_epi16, _mm256_cvtepi8_epi32,
    _mm256_extracti128_si256, _mm256_loadu_si256, _mm256_madd_epi16, _mm256_mullo_epi32,
    _mm256_permute2x128_si256, _mm256_set1_epi32, _mm256_set1_epi64x, _mm256_set_epi64x,
    _mm256_setzero_si256, _mm256_sllv_epi64, _mm256_storeu_si256, _mm256_unpackhi_epi16,
    _mm256_unpackhi_epi64, _mm256_unpacklo_epi16, _mm256_unpacklo_epi64, _mm256_xor_si256,
    _mm_add_epi32, _mm_cvtsi128_si32, _mm_loadl_epi64, _mm_loadu_si128, _mm_prefetch,
    _mm_shuffle_epi32, _xgetbv, _MM_HINT_T0,
};
use core::sync::atomic::{AtomicU8, Ordering};

/// A token that only exists when the running CPU and OS support AVX2.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Avx2(());

const UNKNOWN: u8 = 0;
const ABSENT: u8 = 1;
const PRESENT: u8 = 2;
static DETECTED: AtomicU8 = AtomicU8::new(UNKNOWN);

impl Avx2 {
    /// `Some` when AVX2 can be used here. The first call runs CPUID; later calls read the cache.
    #[inline]
    pub(crate) fn detect() -> Option<Self> {
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

    /// [`crate::rlwe::check::accumulate`] on AVX2.
    #[inline]
    pub(crate) fn accumulate_checks(self, acc: &mut [u32], columns: &[u32], coeffs: &[u32]) {
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { accumulate_checks(acc, columns, coeffs) }
    }
}

/// The portable [`crate::rlwe::check::accumulate_portable`] compiled for AVX2 (`vpmulld`, which
/// the SSE2 baseline lacks).
///
/// # Safety
/// The CPU must support AVX2.
#[target_feature(enable = "avx2")]
unsafe fn accumulate_checks(acc: &mut [u32], columns: &[u32], coeffs: &[u32]) {
    crate::rlwe::check::accumulate_portable(acc, columns, coeffs)
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

/// Pairs of input rows per panel of [`gemm_i8_u64`]: at most 255, so that the `i32` limb sums
/// cannot overflow before they are folded into `u64` (each `madd` lane adds at most
/// `2 · 2^15 · 2^7 = 2^23` in magnitude, and `255 · 2^23 < 2^31`).
const GEMM_PAIRS: usize = 128;
const _: () = assert!(GEMM_PAIRS <= 255, "the i32 limb sums could overflow");
/// Groups of four columns (one `__m256i` of words) per panel of [`gemm_i8_u64`].
const GEMM_GROUPS: usize = 8;
/// Outputs per register block of [`gemm_i8_u64`]: each panel vector is loaded once for four.
const GEMM_OUTPUTS: usize = 4;

impl Avx2 {
    /// [`crate::rlwe::gemm_i8_u64`] on AVX2.
    pub(super) fn gemm_i8_u64(
        self,
        x: &[u64],
        w: &[u8],
        in_dim: usize,
        out_dim: usize,
        width: usize,
        y: &mut [u64],
    ) {
        super::check_gemm_shape(x.len(), w.len(), in_dim, out_dim, width, y.len());
        // SAFETY: `self` exists only if `detect` found AVX2 (CPU and OS).
        unsafe { gemm_i8_u64(x, w, in_dim, out_dim, width, y) }
    }
}

/// `y[j][c] = Σ_i W[j][i] · x[i][c] (mod 2^64)` with 16-bit limbs and `vpmaddwd`.
///
/// AVX2 has no 64-bit multiply, but `x · w (mod 2^64)` only needs each 16-bit limb of `x` times
/// the int8 `w`: with signed limbs `s_k ∈ [-2^15, 2^15)` and `x ≡ Σ_k s_k · 2^(16k)`,
/// `Σ_i w_i · x_i ≡ Σ_k 2^(16k) · Σ_i w_i · s_k(x_i) (mod 2^64)`. One `vpmaddwd` multiplies
/// sixteen limbs by int8 weights and adds them in pairs of rows (`i`, `i + 1`), so it does four
/// word-by-weight products where `vpmuldq` (32×32 → 64 bits, two per product) does two. The limb
/// sums stay exact in `i32` for [`GEMM_PAIRS`] pairs and are then folded into `u64`.
///
/// Input words are recoded and interleaved once per block ([`pack_x`]: `GEMM_PAIRS` row pairs ×
/// `4 · GEMM_GROUPS` columns, 64 KiB on the stack) and the panel is read by every output. Blocks
/// go along the rows of a chunk of rows, and [`pack_x`] fetches the next block into cache while
/// this one is computed: `x`'s rows are `8 · width` bytes apart, too many streams for the hardware
/// prefetchers, so without this each block waits on memory.
///
/// # Safety
/// AVX2 must be available. (The shapes are checked by the caller, [`Avx2::gemm_i8_u64`]; a wrong
/// one would panic in a slice index, never read or write out of bounds.)
#[target_feature(enable = "avx2")]
unsafe fn gemm_i8_u64(
    x: &[u64],
    w: &[u8],
    in_dim: usize,
    out_dim: usize,
    width: usize,
    y: &mut [u64],
) {
    let mut panel = [[_mm256_setzero_si256(); 2]; GEMM_PAIRS * GEMM_GROUPS];
    let block_cols = 4 * GEMM_GROUPS;
    let block = |(i0, c0): (usize, usize)| Block {
        rows: (i0, (2 * GEMM_PAIRS).min(in_dim - i0)),
        cols: (c0, block_cols.min(width - c0)),
    };
    let blocks = (0..in_dim)
        .step_by(2 * GEMM_PAIRS)
        .flat_map(|i0| (0..width).step_by(block_cols).map(move |c0| (i0, c0)))
        .map(block);
    let mut next_blocks = blocks.clone().skip(1);
    for at in blocks {
        let pairs = at.rows.1.div_ceil(2);
        let panel = &mut panel[..at.cols.1.div_ceil(4) * pairs];
        pack_x(x, width, at, next_blocks.next(), panel);
        let tile = Tile { panel, pairs, at };
        let mut j = 0;
        while j + GEMM_OUTPUTS <= out_dim {
            gemm_tile::<GEMM_OUTPUTS>(&tile, w, in_dim, j, width, y);
            j += GEMM_OUTPUTS;
        }
        for j in j..out_dim {
            gemm_tile::<1>(&tile, w, in_dim, j, width, y);
        }
    }
}

/// Where a block of [`gemm_i8_u64`] lies in `x`.
#[derive(Clone, Copy)]
struct Block {
    /// First row and number of rows.
    rows: (usize, usize),
    /// First column and number of columns.
    cols: (usize, usize),
}

/// One packed block of [`gemm_i8_u64`].
struct Tile<'a> {
    /// `[group][pair]`: the recoded, interleaved words of [`pack_x`].
    panel: &'a [[__m256i; 2]],
    /// Row pairs per group.
    pairs: usize,
    at: Block,
}

/// Recodes and interleaves a block of `x` for `vpmaddwd`: `panel[g · pairs + p]` holds columns
/// `4g ..+ 4` of the block's rows `2p` and `2p + 1` (zero past the last row or column) as two
/// vectors. Vector 0 holds columns 0 and 2 of the group, vector 1 columns 1 and 3; each 32-bit lane
/// is one signed limb of one column from both rows, first row low.
///
/// Signed limbs: with `B = 0x8000_8000_8000_8000`, `u = x + B (mod 2^64)` has limbs `u_k`, and
/// `x ≡ u - B = Σ_k (u_k - 2^15) · 2^(16k)`; `u_k - 2^15 ∈ [-2^15, 2^15)` is the `i16` whose bits
/// are `u_k ^ 0x8000`. So the limbs of `(x + B) ^ B`, read as `i16`, are the `s_k` of
/// [`gemm_i8_u64`] (zero stays zero).
///
/// With each pair of rows it prefetches the same rows of the `next` block, so that block's words
/// are on their way while this one is computed.
#[target_feature(enable = "avx2")]
fn pack_x(x: &[u64], width: usize, at: Block, next: Option<Block>, panel: &mut [[__m256i; 2]]) {
    let ((i0, rows), (c0, cols)) = (at.rows, at.cols);
    let pairs = rows.div_ceil(2);
    let bias = _mm256_set1_epi64x(0x8000_8000_8000_8000_u64 as i64);
    for p in 0..pairs {
        if let Some(Block {
            rows: (ni0, nrows),
            cols: (nc0, ncols),
        }) = next
        {
            for r in (2 * p..nrows).take(2) {
                let words = &x[(ni0 + r) * width + nc0..][..ncols];
                // One word per 64-byte line, and the last one in case the run is not aligned.
                for word in words.iter().step_by(8).chain(words.last()) {
                    _mm_prefetch::<_MM_HINT_T0>((word as *const u64).cast());
                }
            }
        }
        let i = i0 + 2 * p;
        let first = &x[i * width + c0..][..cols];
        let second = if 2 * p + 1 < rows {
            &x[(i + 1) * width + c0..][..cols]
        } else {
            &[]
        };
        for g in 0..cols.div_ceil(4) {
            let at = 4 * g..(4 * g + 4).min(cols);
            let a = _mm256_xor_si256(_mm256_add_epi64(load_words(&first[at.clone()]), bias), bias);
            // A missing second row is zero (its weights are zero too).
            let b = match second.get(at) {
                Some(words) => _mm256_xor_si256(_mm256_add_epi64(load_words(words), bias), bias),
                None => _mm256_setzero_si256(),
            };
            panel[g * pairs + p] = [_mm256_unpacklo_epi16(a, b), _mm256_unpackhi_epi16(a, b)];
        }
    }
}

/// Up to four words, zero-padded to a vector.
#[inline]
#[target_feature(enable = "avx2")]
fn load_words(words: &[u64]) -> __m256i {
    let mut padded = [0u64; 4];
    let words = match <&[u64; 4]>::try_from(words) {
        Ok(all) => all,
        Err(_) => {
            padded[..words.len()].copy_from_slice(words);
            &padded
        }
    };
    // SAFETY: `words` is 4 readable u64 (32 bytes); loadu needs no alignment.
    unsafe { _mm256_loadu_si256(words.as_ptr().cast()) }
}

/// `y[..] = v` (`first`) or `y[..] += v` for up to four words of `y`.
#[inline]
#[target_feature(enable = "avx2")]
fn store_words(y: &mut [u64], v: __m256i, first: bool) {
    let v = if first {
        v
    } else {
        _mm256_add_epi64(v, load_words(y))
    };
    if let Ok(all) = <&mut [u64; 4]>::try_from(&mut *y) {
        // SAFETY: `all` is 4 writable u64 (32 bytes); storeu needs no alignment.
        unsafe { _mm256_storeu_si256(all.as_mut_ptr().cast(), v) };
    } else {
        let mut out = [0u64; 4];
        // SAFETY: `out` is 4 writable u64 (32 bytes); storeu needs no alignment.
        unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
        let n = y.len();
        y.copy_from_slice(&out[..n]);
    }
}

/// Outputs `j0 .. j0 + J` over one block: packs their weights, runs every column group of the
/// panel and folds the limb sums into `y` (stored on the first row chunk, added after).
#[inline]
#[target_feature(enable = "avx2")]
fn gemm_tile<const J: usize>(
    tile: &Tile<'_>,
    w: &[u8],
    in_dim: usize,
    j0: usize,
    width: usize,
    y: &mut [u64],
) {
    let ((i0, rows), (c0, cols), pairs) = (tile.at.rows, tile.at.cols, tile.pairs);
    // wpairs[jj][p]: weights of rows 2p and 2p + 1 as two i16 in one i32 (first row low).
    let mut wpairs = [[0i32; GEMM_PAIRS]; J];
    for (jj, dst) in wpairs.iter_mut().enumerate() {
        let row = &w[(j0 + jj) * in_dim + i0..][..rows];
        let dst = &mut dst[..pairs];
        // Sixteen bytes at a time are eight pairs; the rest one pair at a time.
        let whole = rows / 16;
        for (src, out) in row.chunks_exact(16).zip(dst.chunks_exact_mut(8)) {
            // SAFETY: `src` is 16 readable bytes; the load needs no alignment.
            let v = unsafe { _mm_loadu_si128(src.as_ptr().cast()) };
            // Sixteen i16 lanes are eight (first, second) pairs of i32 lanes, little-endian.
            let v = _mm256_cvtepi8_epi16(v);
            // SAFETY: `out` is 8 writable i32 (32 bytes); storeu needs no alignment.
            unsafe { _mm256_storeu_si256(out.as_mut_ptr().cast(), v) };
        }
        let rest = &row[16 * whole..];
        for (p, out) in dst[8 * whole..].iter_mut().enumerate() {
            let lo = rest[2 * p] as i8 as i16 as u16 as u32;
            let hi = rest
                .get(2 * p + 1)
                .map_or(0, |&b| b as i8 as i16 as u16 as u32);
            *out = (lo | hi << 16) as i32;
        }
    }
    for (g, group) in tile.panel.chunks_exact(pairs).enumerate() {
        let sums = accumulate(group, &wpairs);
        let at = c0 + 4 * g..c0 + (4 * g + 4).min(cols);
        for (jj, sums) in sums.into_iter().enumerate() {
            let row = (j0 + jj) * width;
            store_words(&mut y[row + at.start..row + at.end], fold(sums), i0 == 0);
        }
    }
}

/// The `i32` limb sums of one group of four columns for `J` outputs over a panel's row pairs
/// (`wpairs[jj][p]` for pair `p` of `group`).
#[inline]
#[target_feature(enable = "avx2")]
fn accumulate<const J: usize>(
    group: &[[__m256i; 2]],
    wpairs: &[[i32; GEMM_PAIRS]; J],
) -> [[__m256i; 2]; J] {
    // At most GEMM_PAIRS pairs, stated here so that `wp[p]` below needs no bounds check.
    let group = &group[..group.len().min(GEMM_PAIRS)];
    let mut acc = [[_mm256_setzero_si256(); 2]; J];
    for (p, xv) in group.iter().enumerate() {
        for (acc, wp) in acc.iter_mut().zip(wpairs) {
            let wv = _mm256_set1_epi32(wp[p]);
            acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(xv[0], wv));
            acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(xv[1], wv));
        }
    }
    acc
}

/// Folds the limb sums of one group (vector 0: columns 0 and 2, vector 1: columns 1 and 3, four
/// `i32` limb sums `S_0..S_3` per column) into the four words `Σ_k S_k · 2^(16k) (mod 2^64)`.
/// `S_0` and `S_1` are exact and sign-extended; `S_2` and `S_3` only matter modulo `2^32` and
/// `2^16` there, so their wrap-around is harmless.
#[inline]
#[target_feature(enable = "avx2")]
fn fold(sums: [__m256i; 2]) -> __m256i {
    let shifts = _mm256_set_epi64x(48, 32, 16, 0);
    let column = |v: __m128i| _mm256_sllv_epi64(_mm256_cvtepi32_epi64(v), shifts);
    let c0 = column(_mm256_castsi256_si128(sums[0]));
    let c2 = column(_mm256_extracti128_si256::<1>(sums[0]));
    let c1 = column(_mm256_castsi256_si128(sums[1]));
    let c3 = column(_mm256_extracti128_si256::<1>(sums[1]));
    // [c0: S0+S1, c1: S0+S1 | c0: S2+S3, c1: S2+S3], and the same for columns 2 and 3.
    let h01 = _mm256_add_epi64(_mm256_unpacklo_epi64(c0, c1), _mm256_unpackhi_epi64(c0, c1));
    let h23 = _mm256_add_epi64(_mm256_unpacklo_epi64(c2, c3), _mm256_unpackhi_epi64(c2, c3));
    _mm256_add_epi64(
        _mm256_permute2x128_si256::<0x20>(h01, h23),
        _mm256_permute2x128_si256::<0x31>(h01, h23),
    )
}
