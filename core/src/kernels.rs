//! int8 × Z_2^32 matrix products (and the int8 × Z_2^64 product of the server's RLWE phase).
//!
//! Weights are stored transposed, `[out][in]`, as int8 bit patterns in `u8` (one contiguous row of
//! `in` weights per output channel: a dot product per output, and per-output-channel scales line up
//! with rows). The wrapping product is what the server computes on masked rows and what the client
//! computes for `r · W`; because `Σ |x_q · W_q| < 2^31` for every GPT-2 size (in ≤ 133 000), the
//! exact int8 product and the wrapping one agree bit for bit, which is why unmasking is exact.
//!
//! The public functions dispatch to the best kernel for the running CPU ([`isa`]): AVX2 on x86_64
//! when CPUID says the CPU and OS support it (detected once, without `std`), NEON on aarch64 (part
//! of its baseline), and the portable [`scalar`] kernels otherwise. Every kernel computes exact
//! integer sums modulo 2^32, so the order of additions does not matter and all of them agree bit for
//! bit with [`scalar`] (the tests check this on random shapes and extreme values).
//!
//! The server's RLWE product, int8 weights × `u64` ciphertext words modulo 2^64
//! ([`crate::rlwe::gemm_i8_u64`]), dispatches the same way: AVX2 splits each word into 16-bit
//! limbs for `vpmaddwd` (AVX2 has no 64-bit multiply), other CPUs run [`scalar::gemm_i8_u64`].
//!
//! The matrix products are batched: input rows go four at a time against each weight row (each
//! weight vector is loaded and sign-extended once for four rows), over tiles of weight rows small
//! enough to stay in L1 while every group of rows passes over them (prefill and pool precompute).

pub mod scalar;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics: each `unsafe` block carries its SAFETY argument.
mod x86;
#[cfg(target_arch = "x86_64")]
pub(crate) use x86::Avx2;

#[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
#[allow(unsafe_code)] // SIMD intrinsics: each `unsafe` block carries its SAFETY argument.
mod neon;

/// Largest input width for which `in · 127 · 127 < 2^31`, so int8 products never wrap as `i32`.
pub const MAX_IN_DIM: usize = (i32::MAX as usize) / (127 * 127);

/// An instruction set the kernels can run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Isa {
    /// The portable [`scalar`] kernels (auto-vectorised for the baseline target).
    Scalar,
    /// x86_64 AVX2, detected at run time.
    Avx2,
    /// aarch64 NEON (Armv8.0: no `dotprod`).
    Neon,
}

impl Isa {
    /// A short lower-case name (`scalar`, `avx2`, `neon`) for logs and benchmark labels.
    pub const fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Neon => "neon",
        }
    }
}

/// The instruction set the public kernels use on this CPU.
pub fn isa() -> Isa {
    Kernel::best().isa()
}

/// `Σ_i x[i] · w[i] (mod 2^32)` with `w` holding int8 bit patterns. Panics if the lengths differ.
#[inline]
pub fn dot_u32_i8(x: &[u32], w: &[u8]) -> u32 {
    Kernel::best().dot_u32_i8(x, w)
}

/// `Σ_i x[i] · w[i]` for int8 `x` and int8-bit-pattern `w`, exact in `i32` for `len ≤ MAX_IN_DIM`.
/// Panics if the lengths differ.
#[inline]
pub fn dot_i8_i8(x: &[i8], w: &[u8]) -> i32 {
    Kernel::best().dot_i8_i8(x, w)
}

/// `y[r][j] = Σ_i x[r][i] · W[j][i] (mod 2^32)` for `rows` rows of `x` (`[rows][in]`), weights
/// `[out][in]`, output `[rows][out]`. Rows are processed four at a time against each weight row
/// while it is in cache (the batched path for prefill and mask precomputation).
pub fn matmul_u32_i8(x: &[u32], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [u32]) {
    Kernel::best().matmul_u32_i8(x, w, in_dim, out_dim, y);
}

/// Exact int8 × int8 product `y[r][j] = Σ_i x[r][i] · W[j][i]` (the plaintext reference path).
/// Bit-identical to [`matmul_u32_i8`] on sign-extended inputs.
pub fn matmul_i8_i8(x: &[i8], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [i32]) {
    Kernel::best().matmul_i8_i8(x, w, in_dim, out_dim, y);
}

/// `out[t] = Σ_i q[i] · keys[t · stride + i]` (exact `i64`): one attention query against
/// `out.len()` cached keys `stride` apart. Panics if `keys` is too short.
#[inline]
pub fn dot_i16_rows(q: &[i16], keys: &[i16], stride: usize, out: &mut [i64]) {
    Kernel::best().dot_i16_rows(q, keys, stride, out)
}

/// `acc += Σ_t p[t] · round(values[t · stride..][..acc.len()] / 2^shift[t])` in wrapping `i32`
/// (shifts clamped to `0..=31`; zero weights skipped): one head's weighted sum of cached values.
/// Panics if `values` is too short or `p` and `shift` differ in length.
#[inline]
pub fn axpy_i16_rows(acc: &mut [i32], p: &[i32], shift: &[i32], values: &[i16], stride: usize) {
    Kernel::best().axpy_i16_rows(acc, p, shift, values, stride)
}

/// [`crate::rlwe::gemm_i8_u64`] (documented there) on the best kernel for this CPU.
pub(crate) fn gemm_i8_u64(
    x: &[u64],
    w: &[u8],
    in_dim: usize,
    out_dim: usize,
    width: usize,
    y: &mut [u64],
) {
    Kernel::best().gemm_i8_u64(x, w, in_dim, out_dim, width, y);
}

/// Checks the shapes of an int8 × u64 product (`x` `[in][width]`, `w` `[out][in]`, `y`
/// `[out][width]`).
fn check_gemm_shape(
    x_len: usize,
    w_len: usize,
    in_dim: usize,
    out_dim: usize,
    width: usize,
    y_len: usize,
) {
    assert!(in_dim > 0, "empty input");
    assert_eq!(Some(x_len), in_dim.checked_mul(width), "input shape");
    assert_eq!(Some(w_len), in_dim.checked_mul(out_dim), "weight shape");
    assert_eq!(Some(y_len), out_dim.checked_mul(width), "output shape");
}

/// Checks a product's shapes and returns the number of input rows.
fn check_shape(x_len: usize, w_len: usize, in_dim: usize, out_dim: usize, y_len: usize) -> usize {
    assert!(
        in_dim > 0 && x_len.is_multiple_of(in_dim),
        "input is not whole rows"
    );
    let rows = x_len / in_dim;
    assert_eq!(w_len, in_dim * out_dim, "weight shape");
    assert_eq!(y_len, rows * out_dim, "output shape");
    rows
}

/// Bytes of weights per tile: a tile stays in L1 while every group of four rows passes over it.
const W_TILE_BYTES: usize = 16 * 1024;

/// The blocked matrix product over a one-row and a four-row dot kernel.
fn matmul_blocked<X, Y>(
    x: &[X],
    w: &[u8],
    in_dim: usize,
    out_dim: usize,
    y: &mut [Y],
    dot1: impl Fn(&[X], &[u8]) -> Y,
    dot4: impl Fn([&[X]; 4], &[u8]) -> [Y; 4],
) {
    let rows = check_shape(x.len(), w.len(), in_dim, out_dim, y.len());
    let tile = (W_TILE_BYTES / in_dim).max(1);
    let row = |r: usize| &x[r * in_dim..(r + 1) * in_dim];
    for j0 in (0..out_dim).step_by(tile) {
        let j1 = (j0 + tile).min(out_dim);
        let wtile = w[j0 * in_dim..j1 * in_dim].chunks_exact(in_dim);
        let mut r = 0;
        while r + 4 <= rows {
            let xs = [row(r), row(r + 1), row(r + 2), row(r + 3)];
            for (j, wrow) in (j0..j1).zip(wtile.clone()) {
                for (k, v) in dot4(xs, wrow).into_iter().enumerate() {
                    y[(r + k) * out_dim + j] = v;
                }
            }
            r += 4;
        }
        for r in r..rows {
            for (j, wrow) in (j0..j1).zip(wtile.clone()) {
                y[r * out_dim + j] = dot1(row(r), wrow);
            }
        }
    }
}

/// A kernel set that can run here: SIMD variants carry their proof of availability.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Kernel {
    Scalar,
    #[cfg(target_arch = "x86_64")]
    Avx2(x86::Avx2),
    #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
    Neon,
}

impl Kernel {
    /// The fastest kernel set for this CPU.
    #[inline]
    fn best() -> Self {
        #[cfg(target_arch = "x86_64")]
        if let Some(t) = x86::Avx2::detect() {
            return Kernel::Avx2(t);
        }
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        return Kernel::Neon;
        #[allow(unreachable_code)]
        Kernel::Scalar
    }

    /// Every kernel set this CPU can run (the tests compare them all with the reference).
    #[cfg(test)]
    pub(crate) fn all() -> impl Iterator<Item = Kernel> {
        #[cfg(target_arch = "x86_64")]
        let simd = x86::Avx2::detect().map(Kernel::Avx2);
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        let simd = Some(Kernel::Neon);
        #[cfg(not(any(
            target_arch = "x86_64",
            all(target_arch = "aarch64", target_feature = "neon")
        )))]
        let simd = None;
        core::iter::once(Kernel::Scalar).chain(simd)
    }

    pub(crate) fn isa(self) -> Isa {
        match self {
            Kernel::Scalar => Isa::Scalar,
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(_) => Isa::Avx2,
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Kernel::Neon => Isa::Neon,
        }
    }

    #[inline]
    fn dot_u32_i8(self, x: &[u32], w: &[u8]) -> u32 {
        match self {
            Kernel::Scalar => scalar::dot_u32_i8(x, w),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(t) => t.dot_u32_i8(x, w),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Kernel::Neon => neon::dot_u32_i8(x, w),
        }
    }

    #[inline]
    fn dot_i8_i8(self, x: &[i8], w: &[u8]) -> i32 {
        match self {
            Kernel::Scalar => scalar::dot_i8_i8(x, w),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(t) => t.dot_i8_i8(x, w),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Kernel::Neon => neon::dot_i8_i8(x, w),
        }
    }

    #[inline]
    fn dot_i16_rows(self, q: &[i16], keys: &[i16], stride: usize, out: &mut [i64]) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(t) => t.dot_i16_rows(q, keys, stride, out),
            // NEON is aarch64's baseline: the portable body already vectorises with it.
            _ => scalar::dot_i16_rows(q, keys, stride, out),
        }
    }

    #[inline]
    fn axpy_i16_rows(self, acc: &mut [i32], p: &[i32], shift: &[i32], v: &[i16], stride: usize) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(t) => t.axpy_i16_rows(acc, p, shift, v, stride),
            _ => scalar::axpy_i16_rows(acc, p, shift, v, stride),
        }
    }

    fn matmul_u32_i8(self, x: &[u32], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [u32]) {
        match self {
            Kernel::Scalar => scalar::matmul_u32_i8(x, w, in_dim, out_dim, y),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(t) => matmul_blocked(
                x,
                w,
                in_dim,
                out_dim,
                y,
                |x, w| t.dot_u32_i8(x, w),
                |x, w| t.dot4_u32_i8(x, w),
            ),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Kernel::Neon => matmul_blocked(
                x,
                w,
                in_dim,
                out_dim,
                y,
                neon::dot_u32_i8,
                neon::dot4_u32_i8,
            ),
        }
    }

    pub(crate) fn gemm_i8_u64(
        self,
        x: &[u64],
        w: &[u8],
        in_dim: usize,
        out_dim: usize,
        width: usize,
        y: &mut [u64],
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(t) => t.gemm_i8_u64(x, w, in_dim, out_dim, width, y),
            // NEON has no 64-bit multiply either; the portable body is what aarch64 gets.
            _ => scalar::gemm_i8_u64(x, w, in_dim, out_dim, width, y),
        }
    }

    fn matmul_i8_i8(self, x: &[i8], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [i32]) {
        match self {
            Kernel::Scalar => scalar::matmul_i8_i8(x, w, in_dim, out_dim, y),
            #[cfg(target_arch = "x86_64")]
            Kernel::Avx2(t) => matmul_blocked(
                x,
                w,
                in_dim,
                out_dim,
                y,
                |x, w| t.dot_i8_i8(x, w),
                |x, w| t.dot4_i8_i8(x, w),
            ),
            #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
            Kernel::Neon => {
                matmul_blocked(x, w, in_dim, out_dim, y, neon::dot_i8_i8, neon::dot4_i8_i8)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn naive_dot_u32(x: &[u32], w: &[u8]) -> u32 {
        let s = x.iter().zip(w).fold(0u64, |s, (&x, &w)| {
            s.wrapping_add((x as u64).wrapping_mul(w as i8 as i64 as u64))
        });
        s as u32
    }

    fn naive_dot_i8(x: &[i8], w: &[u8]) -> i32 {
        let s: i64 = x
            .iter()
            .zip(w)
            .map(|(&x, &w)| x as i64 * w as i8 as i64)
            .sum();
        s as i32
    }

    fn naive(x: &[u32], w: &[u8], in_dim: usize, out_dim: usize) -> Vec<u32> {
        let rows = x.len() / in_dim;
        let mut y = vec![0u32; rows * out_dim];
        for r in 0..rows {
            for j in 0..out_dim {
                y[r * out_dim + j] = naive_dot_u32(
                    &x[r * in_dim..(r + 1) * in_dim],
                    &w[j * in_dim..(j + 1) * in_dim],
                );
            }
        }
        y
    }

    fn naive_i8(x: &[i8], w: &[u8], in_dim: usize, out_dim: usize) -> Vec<i32> {
        let rows = x.len() / in_dim;
        let mut y = vec![0i32; rows * out_dim];
        for r in 0..rows {
            for j in 0..out_dim {
                y[r * out_dim + j] = naive_dot_i8(
                    &x[r * in_dim..(r + 1) * in_dim],
                    &w[j * in_dim..(j + 1) * in_dim],
                );
            }
        }
        y
    }

    /// A small LCG: proptest picks the seed, the data follow from it.
    fn lcg(seed: u64) -> impl FnMut() -> u32 {
        let mut s = seed;
        move || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 32) as u32
        }
    }

    /// Random data, or (by `mode`) the extremes: x = u32::MAX / i8::MIN, w = -128 or 127.
    fn data(len: usize, mode: u8, seed: u64) -> (Vec<u32>, Vec<i8>, Vec<u8>) {
        let mut next = lcg(seed);
        let mut x: Vec<u32> = (0..len).map(|_| next()).collect();
        let mut xq: Vec<i8> = (0..len).map(|_| next() as i8).collect();
        let mut w: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        match mode {
            0 => {}
            1 => {
                x.fill(u32::MAX);
                xq.fill(i8::MIN);
                w.fill(i8::MIN as u8);
            }
            2 => {
                x.fill(u32::MAX);
                xq.fill(i8::MAX);
                w.fill(i8::MIN as u8);
            }
            _ => {
                for (i, ((x, xq), w)) in x.iter_mut().zip(&mut xq).zip(&mut w).enumerate() {
                    *x = if i % 3 == 0 { u32::MAX } else { 1 << 31 };
                    *xq = if i % 2 == 0 { i8::MIN } else { i8::MAX };
                    *w = (i as u8).wrapping_mul(37);
                }
            }
        }
        (x, xq, w)
    }

    #[test]
    fn test_isa_matches_std_detection() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            isa() == Isa::Avx2,
            std::arch::is_x86_feature_detected!("avx2")
        );
        #[cfg(all(target_arch = "aarch64", target_feature = "neon"))]
        assert_eq!(isa(), Isa::Neon);
        std::eprintln!("kernels: {}", isa().name());
    }

    #[test]
    fn test_every_kernel_matches_naive_on_short_extreme_rows() {
        for kernel in Kernel::all() {
            for len in 0..=80 {
                for mode in 0..4 {
                    let (x, xq, w) = data(len, mode, len as u64);
                    let e = naive_dot_u32(&x, &w);
                    assert_eq!(
                        kernel.dot_u32_i8(&x, &w),
                        e,
                        "{kernel:?} len {len} mode {mode}"
                    );
                    let e = naive_dot_i8(&xq, &w);
                    assert_eq!(
                        kernel.dot_i8_i8(&xq, &w),
                        e,
                        "{kernel:?} len {len} mode {mode}"
                    );
                }
            }
        }
    }

    #[test]
    fn test_long_extreme_dots_wrap_like_naive() {
        // 128 · 128 · MAX_IN_DIM > 2^31: the i32 (and u32) accumulators wrap, identically.
        for mode in 1..4 {
            let (x, xq, w) = data(MAX_IN_DIM + 7, mode, 0);
            let (e, eq) = (naive_dot_u32(&x, &w), naive_dot_i8(&xq, &w));
            for kernel in Kernel::all() {
                assert_eq!(kernel.dot_u32_i8(&x, &w), e, "{kernel:?} mode {mode}");
                assert_eq!(kernel.dot_i8_i8(&xq, &w), eq, "{kernel:?} mode {mode}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "unequal lengths")]
    fn test_dot_of_unequal_lengths_panics() {
        dot_u32_i8(&[1; 17], &[1; 16]);
    }

    /// One key through the per-head kernels.
    fn dot1(kernel: Kernel, a: &[i16], b: &[i16]) -> i64 {
        let mut out = [0i64];
        kernel.dot_i16_rows(a, b, b.len(), &mut out);
        out[0]
    }

    /// One value through the per-head kernels.
    fn axpy1(kernel: Kernel, acc: &mut [i32], p: i32, v: &[i16], shift: u32) {
        kernel.axpy_i16_rows(acc, &[p], &[shift as i32], v, v.len());
    }

    #[test]
    fn test_i16_kernels_exact_at_the_extremes() {
        // Every product at ±2^15·2^15 (the i32 pair sum of two would overflow): the i64 dot stays
        // exact, and the shifted axpy rounds half up like `round_shift`.
        for len in [0usize, 1, 7, 8, 9, 64, 65, 1000] {
            let a = vec![i16::MIN; len];
            let b = vec![i16::MIN; len];
            let c = vec![i16::MAX; len];
            for kernel in Kernel::all() {
                assert_eq!(
                    dot1(kernel, &a, &b),
                    len as i64 * (1i64 << 30),
                    "{kernel:?}"
                );
                assert_eq!(
                    dot1(kernel, &a, &c),
                    -(len as i64) * 32768 * 32767,
                    "{kernel:?}"
                );
            }
        }
        for kernel in Kernel::all() {
            for shift in 0..=31u32 {
                let v: Vec<i16> = (-40..40)
                    .map(|k| (k * 821) as i16)
                    .chain([i16::MIN, i16::MAX])
                    .collect();
                let mut acc = vec![5i32; v.len()];
                axpy1(kernel, &mut acc, -32768, &v, shift);
                for (a, &x) in acc.iter().zip(&v) {
                    let r = crate::fixed::round_shift_i64(x as i64, shift);
                    assert_eq!(*a as i64, 5 - 32768 * r, "{kernel:?} shift {shift} x {x}");
                }
            }
        }
    }

    proptest! {
        #[test]
        fn prop_i16_row_kernels_match_one_by_one(
            dh in 1usize..=80, n in 0usize..=40, extra in 0usize..8, seed in any::<u64>()
        ) {
            use rand_chacha::rand_core::{RngCore, SeedableRng};
            let stride = dh + extra;
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let q: Vec<i16> = (0..dh).map(|_| rng.next_u32() as i16).collect();
            let kv: Vec<i16> = (0..n * stride).map(|_| rng.next_u32() as i16).collect();
            let p: Vec<i32> = (0..n).map(|_| (rng.next_u32() % 3) as i32 * (rng.next_u32() % 1024) as i32).collect();
            let sh: Vec<i32> = (0..n).map(|_| (rng.next_u32() % 40) as i32 - 4).collect();
            let mut want_acc = vec![0i32; dh];
            for t in 0..n {
                let k = &kv[t * stride..t * stride + dh];
                let want: i64 = q.iter().zip(k).map(|(&a, &b)| a as i64 * b as i64).sum();
                for kernel in Kernel::all() {
                    let mut out = vec![0i64; n];
                    kernel.dot_i16_rows(&q, &kv, stride, &mut out);
                    prop_assert_eq!(out[t], want, "{:?}", kernel);
                }
                if p[t] != 0 {
                    scalar::axpy_i16(&mut want_acc, p[t], k, sh[t].clamp(0, 31) as u32);
                }
            }
            for kernel in Kernel::all() {
                let mut acc = vec![0i32; dh];
                kernel.axpy_i16_rows(&mut acc, &p, &sh, &kv, stride);
                prop_assert_eq!(&acc, &want_acc, "{:?}", kernel);
            }
        }

        #[test]
        fn prop_i16_kernels_match_naive(
            v in proptest::collection::vec((any::<i16>(), any::<i16>()), 0..300),
            p in -(1i32 << 15)..=(1i32 << 15), shift in 0u32..=31, start in any::<i32>()
        ) {
            let (a, b): (Vec<i16>, Vec<i16>) = v.into_iter().unzip();
            let dot: i64 = a.iter().zip(&b).map(|(&x, &y)| x as i64 * y as i64).sum();
            for kernel in Kernel::all() {
                prop_assert_eq!(dot1(kernel, &a, &b), dot, "{:?}", kernel);
                let mut acc = vec![start; a.len()];
                axpy1(kernel, &mut acc, p, &b, shift);
                for (&got, &x) in acc.iter().zip(&b) {
                    let r = crate::fixed::round_shift_i64(x as i64, shift);
                    let want = (start as i64 + p as i64 * r) as i32; // wrapping, like the kernel
                    prop_assert_eq!(got, want, "{:?}", kernel);
                }
            }
        }

        #[test]
        fn prop_every_dot_kernel_matches_naive(
            len in 1usize..=1000, mode in 0u8..4, seed in any::<u64>()
        ) {
            let (x, xq, w) = data(len, mode, seed);
            let (e, eq) = (naive_dot_u32(&x, &w), naive_dot_i8(&xq, &w));
            for kernel in Kernel::all() {
                prop_assert_eq!(kernel.dot_u32_i8(&x, &w), e, "{:?}", kernel);
                prop_assert_eq!(kernel.dot_i8_i8(&xq, &w), eq, "{:?}", kernel);
            }
            prop_assert_eq!(dot_u32_i8(&x, &w), e);
            prop_assert_eq!(dot_i8_i8(&xq, &w), eq);
        }

        #[test]
        fn prop_every_matmul_kernel_matches_naive(
            rows in 1usize..=9, in_dim in 1usize..=100, out_dim in 1usize..=24,
            mode in 0u8..4, seed in any::<u64>()
        ) {
            let (x, xq, _) = data(rows * in_dim, mode, seed);
            let (_, _, w) = data(in_dim * out_dim, mode, !seed);
            let (e, eq) = (naive(&x, &w, in_dim, out_dim), naive_i8(&xq, &w, in_dim, out_dim));
            for kernel in Kernel::all() {
                let mut y = vec![0u32; rows * out_dim];
                kernel.matmul_u32_i8(&x, &w, in_dim, out_dim, &mut y);
                prop_assert_eq!(&y, &e, "{:?}", kernel);
                let mut yq = vec![0i32; rows * out_dim];
                kernel.matmul_i8_i8(&xq, &w, in_dim, out_dim, &mut yq);
                prop_assert_eq!(&yq, &eq, "{:?}", kernel);
            }
        }

        /// Shapes that span several weight tiles and leave row remainders.
        #[test]
        fn prop_matmul_over_several_tiles_matches_scalar(
            rows in 1usize..=9, in_dim in 700usize..=1000, out_dim in 20usize..=60, seed in any::<u64>()
        ) {
            let (x, xq, _) = data(rows * in_dim, 0, seed);
            let (_, _, w) = data(in_dim * out_dim, 0, !seed);
            let mut e = vec![0u32; rows * out_dim];
            scalar::matmul_u32_i8(&x, &w, in_dim, out_dim, &mut e);
            let mut eq = vec![0i32; rows * out_dim];
            scalar::matmul_i8_i8(&xq, &w, in_dim, out_dim, &mut eq);
            let mut y = vec![0u32; rows * out_dim];
            matmul_u32_i8(&x, &w, in_dim, out_dim, &mut y);
            prop_assert_eq!(y, e);
            let mut yq = vec![0i32; rows * out_dim];
            matmul_i8_i8(&xq, &w, in_dim, out_dim, &mut yq);
            prop_assert_eq!(yq, eq);
        }

        #[test]
        fn prop_wrapping_matmul_matches_naive(
            rows in 1usize..5, in_dim in 1usize..70, out_dim in 1usize..20, seed in any::<u64>()
        ) {
            let mut next = lcg(seed);
            let x: Vec<u32> = (0..rows * in_dim).map(|_| next()).collect();
            let w: Vec<u8> = (0..in_dim * out_dim).map(|_| next() as u8).collect();
            let mut y = vec![0u32; rows * out_dim];
            matmul_u32_i8(&x, &w, in_dim, out_dim, &mut y);
            prop_assert_eq!(y, naive(&x, &w, in_dim, out_dim));
        }

        /// Masking is exact: (x + r)·W − r·W = x·W for uniform r, bit for bit.
        #[test]
        fn prop_masked_product_unmasks_exactly(
            rows in 1usize..4, in_dim in 1usize..100, out_dim in 1usize..16, seed in any::<u64>()
        ) {
            let mut next = lcg(seed);
            let xq: Vec<i8> = (0..rows * in_dim).map(|_| ((next() % 255) as i32 - 127) as i8).collect();
            let w: Vec<u8> = (0..in_dim * out_dim).map(|_| ((next() % 255) as i32 - 127) as i8 as u8).collect();
            let r: Vec<u32> = (0..rows * in_dim).map(|_| next()).collect();
            let m: Vec<u32> = xq.iter().zip(&r).map(|(&x, &r)| (x as i32 as u32).wrapping_add(r)).collect();
            let mut y = vec![0u32; rows * out_dim];
            let mut u = vec![0u32; rows * out_dim];
            let mut exact = vec![0i32; rows * out_dim];
            matmul_u32_i8(&m, &w, in_dim, out_dim, &mut y);
            matmul_u32_i8(&r, &w, in_dim, out_dim, &mut u);
            matmul_i8_i8(&xq, &w, in_dim, out_dim, &mut exact);
            let unmasked: Vec<i32> = y.iter().zip(&u).map(|(&y, &u)| y.wrapping_sub(u) as i32).collect();
            prop_assert_eq!(unmasked, exact);
        }
    }
}
