//! Portable scalar kernels: the fallback on CPUs without a SIMD path, and the reference every SIMD
//! kernel is tested against. Written so LLVM auto-vectorises the inner loops for the baseline
//! target (SSE2 on x86_64).

/// `Σ_i x[i] · w[i] (mod 2^32)` with `w` holding int8 bit patterns.
#[inline]
pub fn dot_u32_i8(x: &[u32], w: &[u8]) -> u32 {
    assert_eq!(x.len(), w.len(), "dot of unequal lengths");
    let mut acc = [0u32; 8];
    let mut xs = x.chunks_exact(8);
    let mut ws = w.chunks_exact(8);
    for (xs, ws) in (&mut xs).zip(&mut ws) {
        for k in 0..8 {
            acc[k] = acc[k].wrapping_add(xs[k].wrapping_mul(ws[k] as i8 as i32 as u32));
        }
    }
    let mut total = acc.iter().fold(0u32, |a, &b| a.wrapping_add(b));
    for (&x, &w) in xs.remainder().iter().zip(ws.remainder()) {
        total = total.wrapping_add(x.wrapping_mul(w as i8 as i32 as u32));
    }
    total
}

/// `Σ_i x[i] · w[i]` for int8 `x` and int8-bit-pattern `w`, exact in `i32` for
/// `len ≤ MAX_IN_DIM` (wrapping beyond).
#[inline]
pub fn dot_i8_i8(x: &[i8], w: &[u8]) -> i32 {
    assert_eq!(x.len(), w.len(), "dot of unequal lengths");
    let mut acc = [0i32; 16];
    let mut xs = x.chunks_exact(16);
    let mut ws = w.chunks_exact(16);
    for (xs, ws) in (&mut xs).zip(&mut ws) {
        for k in 0..16 {
            acc[k] = acc[k].wrapping_add(xs[k] as i32 * ws[k] as i8 as i32);
        }
    }
    let mut total = acc.iter().fold(0i32, |a, &b| a.wrapping_add(b));
    for (&x, &w) in xs.remainder().iter().zip(ws.remainder()) {
        total = total.wrapping_add(x as i32 * w as i8 as i32);
    }
    total
}

/// [`super::matmul_u32_i8`] with the scalar kernel: one dot product per (row, output).
pub fn matmul_u32_i8(x: &[u32], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [u32]) {
    let rows = super::check_shape(x.len(), w.len(), in_dim, out_dim, y.len());
    for (j, wrow) in w.chunks_exact(in_dim).enumerate() {
        for (r, xrow) in x.chunks_exact(in_dim).take(rows).enumerate() {
            y[r * out_dim + j] = dot_u32_i8(xrow, wrow);
        }
    }
}

/// [`super::matmul_i8_i8`] with the scalar kernel: one dot product per (row, output).
pub fn matmul_i8_i8(x: &[i8], w: &[u8], in_dim: usize, out_dim: usize, y: &mut [i32]) {
    let rows = super::check_shape(x.len(), w.len(), in_dim, out_dim, y.len());
    for (j, wrow) in w.chunks_exact(in_dim).enumerate() {
        for (r, xrow) in x.chunks_exact(in_dim).take(rows).enumerate() {
            y[r * out_dim + j] = dot_i8_i8(xrow, wrow);
        }
    }
}
