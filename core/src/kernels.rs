//! int8 × Z_2^32 matrix products.
//!
//! Weights are stored transposed, `[out][in]`, as int8 bit patterns in `u8` (one contiguous row of
//! `in` weights per output channel: a dot product per output, and per-output-channel scales line up
//! with rows). The wrapping product is what the server computes on masked rows and what the client
//! computes for `r · W`; because `Σ |x_q · W_q| < 2^31` for every GPT-2 size (in ≤ 133 000), the
//! exact int8 product and the wrapping one agree bit for bit, which is why unmasking is exact.
//!
//! Scalar code written so LLVM auto-vectorises the inner loops; explicit SIMD comes later.

/// Largest input width for which `in · 127 · 127 < 2^31`, so int8 products never wrap as `i32`.
pub const MAX_IN_DIM: usize = (i32::MAX as usize) / (127 * 127);

/// `Σ_i x[i] · w[i] (mod 2^32)` with `w` holding int8 bit patterns.
#[inline]
pub fn dot_u32_i8(x: &[u32], w: &[u8]) -> u32 {
    debug_assert_eq!(x.len(), w.len());
    let mut acc = [0u32; 8];
    let chunks = x.len() / 8;
    for c in 0..chunks {
        let xs = &x[c * 8..c * 8 + 8];
        let ws = &w[c * 8..c * 8 + 8];
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(xs[k].wrapping_mul(ws[k] as i8 as i32 as u32));
        }
    }
    let mut total = acc.iter().fold(0u32, |a, &b| a.wrapping_add(b));
    for i in chunks * 8..x.len() {
        total = total.wrapping_add(x[i].wrapping_mul(w[i] as i8 as i32 as u32));
    }
    total
}

/// `Σ_i x[i] · w[i]` for int8 `x` and int8-bit-pattern `w`, exact in `i32` for `len ≤ MAX_IN_DIM`.
#[inline]
pub fn dot_i8_i8(x: &[i8], w: &[u8]) -> i32 {
    debug_assert_eq!(x.len(), w.len());
    let mut acc = [0i32; 16];
    let chunks = x.len() / 16;
    for c in 0..chunks {
        let xs = &x[c * 16..c * 16 + 16];
        let ws = &w[c * 16..c * 16 + 16];
        for k in 0..16 {
            acc[k] = acc[k].wrapping_add(xs[k] as i32 * ws[k] as i8 as i32);
        }
    }
    let mut total = acc.iter().fold(0i32, |a, &b| a.wrapping_add(b));
    for i in chunks * 16..x.len() {
        total = total.wrapping_add(x[i] as i32 * w[i] as i8 as i32);
    }
    total
}

/// `y[r][j] = Σ_i x[r][i] · W[j][i] (mod 2^32)` for `rows` rows of `x` (`[rows][in]`), weights
/// `[out][in]`, output `[rows][out]`. Each weight row is read once per call and reused across the
/// input rows while it is in cache (the batched path for prefill and mask precomputation).
pub fn matmul_u32_i8(x: &[u32], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [u32]) {
    assert!(
        in_dim > 0 && x.len() % in_dim == 0,
        "input is not whole rows"
    );
    let rows = x.len() / in_dim;
    assert_eq!(w.len(), in_dim * out_dim, "weight shape");
    assert_eq!(y.len(), rows * out_dim, "output shape");
    for (j, wrow) in w.chunks_exact(in_dim).enumerate() {
        for (r, xrow) in x.chunks_exact(in_dim).enumerate() {
            y[r * out_dim + j] = dot_u32_i8(xrow, wrow);
        }
    }
}

/// Exact int8 × int8 product `y[r][j] = Σ_i x[r][i] · W[j][i]` (the plaintext reference path).
/// Bit-identical to [`matmul_u32_i8`] on sign-extended inputs.
pub fn matmul_i8_i8(x: &[i8], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [i32]) {
    assert!(
        in_dim > 0 && x.len() % in_dim == 0,
        "input is not whole rows"
    );
    let rows = x.len() / in_dim;
    assert_eq!(w.len(), in_dim * out_dim, "weight shape");
    assert_eq!(y.len(), rows * out_dim, "output shape");
    for (j, wrow) in w.chunks_exact(in_dim).enumerate() {
        for (r, xrow) in x.chunks_exact(in_dim).enumerate() {
            y[r * out_dim + j] = dot_i8_i8(xrow, wrow);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::vec;
    use std::vec::Vec;

    fn naive(x: &[u32], w: &[u8], in_dim: usize, out_dim: usize) -> Vec<u32> {
        let rows = x.len() / in_dim;
        let mut y = vec![0u32; rows * out_dim];
        for r in 0..rows {
            for j in 0..out_dim {
                let mut s = 0u64;
                for i in 0..in_dim {
                    s = s.wrapping_add(
                        (x[r * in_dim + i] as u64)
                            .wrapping_mul(w[j * in_dim + i] as i8 as i64 as u64),
                    );
                }
                y[r * out_dim + j] = s as u32;
            }
        }
        y
    }

    proptest! {
        #[test]
        fn prop_wrapping_matmul_matches_naive(
            rows in 1usize..5, in_dim in 1usize..70, out_dim in 1usize..20, seed in any::<u64>()
        ) {
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 32) as u32 };
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
            let mut s = seed;
            let mut next = || { s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (s >> 32) as u32 };
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
