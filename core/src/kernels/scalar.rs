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

/// Bytes of one tile of input words (`in` rows × a column block) that should stay in L2 while every
/// output passes over it.
const X_TILE_BYTES: usize = 512 * 1024;

/// [`crate::rlwe::gemm_i8_u64`] with the scalar kernel: `y[j][c] = Σ_i W[j][i] · x[i][c]
/// (mod 2^64)`, `x` `[in][width]`, `w` `[out][in]` int8 bit patterns, `y` `[out][width]`.
///
/// Blocking: column blocks sized so that `in` rows of a block stay in L2, four outputs at a time
/// over each block (each input word is loaded once per four outputs).
pub fn gemm_i8_u64(
    x: &[u64],
    w: &[u8],
    in_dim: usize,
    out_dim: usize,
    width: usize,
    y: &mut [u64],
) {
    super::check_gemm_shape(x.len(), w.len(), in_dim, out_dim, width, y.len());
    let block = (X_TILE_BYTES / (8 * in_dim)).clamp(8, 512) & !7;
    let wv = |j: usize, i: usize| w[j * in_dim + i] as i8 as i64 as u64;
    for c0 in (0..width).step_by(block) {
        let c1 = (c0 + block).min(width);
        let mut j = 0;
        while j + 4 <= out_dim {
            let (mut y0, mut y1, mut y2, mut y3) =
                ([0u64; 512], [0u64; 512], [0u64; 512], [0u64; 512]);
            let len = c1 - c0;
            for i in 0..in_dim {
                let xr = &x[i * width + c0..i * width + c1];
                let (w0, w1, w2, w3) = (wv(j, i), wv(j + 1, i), wv(j + 2, i), wv(j + 3, i));
                for (k, &xv) in xr.iter().enumerate() {
                    y0[k] = y0[k].wrapping_add(xv.wrapping_mul(w0));
                    y1[k] = y1[k].wrapping_add(xv.wrapping_mul(w1));
                    y2[k] = y2[k].wrapping_add(xv.wrapping_mul(w2));
                    y3[k] = y3[k].wrapping_add(xv.wrapping_mul(w3));
                }
            }
            for (jj, acc) in [y0, y1, y2, y3].iter().enumerate() {
                y[(j + jj) * width + c0..(j + jj) * width + c1].copy_from_slice(&acc[..len]);
            }
            j += 4;
        }
        for j in j..out_dim {
            let yr = &mut y[j * width + c0..j * width + c1];
            yr.fill(0);
            for i in 0..in_dim {
                let wj = wv(j, i);
                for (acc, &xv) in yr.iter_mut().zip(&x[i * width + c0..i * width + c1]) {
                    *acc = acc.wrapping_add(xv.wrapping_mul(wj));
                }
            }
        }
    }
}

/// `Σ_i a[i] · b[i]`, exact in `i64` for every `i16` input (|sum| ≤ len · 2^30).
///
/// Products go through `i32` pairs only when they cannot overflow, so the loop is written per
/// element in `i64`; LLVM widens and vectorises it (pmuldq / smlal) for the target it is compiled
/// for, which is why the AVX2 dispatch reuses this very body.
#[inline(always)]
pub fn dot_i16_i16(a: &[i16], b: &[i16]) -> i64 {
    assert_eq!(a.len(), b.len(), "dot of unequal lengths");
    let mut acc = [0i64; 8];
    let mut xs = a.chunks_exact(8);
    let mut ws = b.chunks_exact(8);
    for (xs, ws) in (&mut xs).zip(&mut ws) {
        for k in 0..8 {
            acc[k] += xs[k] as i64 * ws[k] as i64;
        }
    }
    let mut total: i64 = acc.iter().sum();
    for (&x, &w) in xs.remainder().iter().zip(ws.remainder()) {
        total += x as i64 * w as i64;
    }
    total
}

/// `acc[i] += p · round(v[i] / 2^shift)` (wrapping in `i32`), `shift ≤ 31`, ties rounded up.
///
/// The attention's weighted sum of values: exact (no wrap) while `Σ |p| · 2^15 < 2^31` over all
/// the calls that feed one `acc`, which the caller guarantees.
#[inline(always)]
pub fn axpy_i16(acc: &mut [i32], p: i32, v: &[i16], shift: u32) {
    assert_eq!(acc.len(), v.len(), "axpy of unequal lengths");
    let shift = shift.min(31);
    // x + half ≤ 2^15 + 2^30: no overflow for any i16 and shift.
    let half = ((1u32 << shift) >> 1) as i32;
    for (a, &x) in acc.iter_mut().zip(v) {
        *a = a.wrapping_add(p.wrapping_mul((x as i32 + half) >> shift));
    }
}

/// `out[t] = Σ_i q[i] · keys[t · stride + i]`: one query against `out.len()` keys laid out
/// `stride` apart (one attention head over the cache).
#[inline(always)]
pub fn dot_i16_rows(q: &[i16], keys: &[i16], stride: usize, out: &mut [i64]) {
    for (t, o) in out.iter_mut().enumerate() {
        let b = t * stride;
        *o = dot_i16_i16(q, &keys[b..b + q.len()]);
    }
}

/// `acc += Σ_t p[t] · round(values[t · stride ..][..acc.len()] / 2^shift[t])`, wrapping `i32`:
/// the attention's weighted sum of one head's values; positions with `p[t] == 0` are skipped.
#[inline(always)]
pub fn axpy_i16_rows(acc: &mut [i32], p: &[i32], shift: &[i32], values: &[i16], stride: usize) {
    assert_eq!(p.len(), shift.len(), "one shift per weight");
    let w = acc.len();
    for (t, (&p, &s)) in p.iter().zip(shift).enumerate() {
        if p != 0 {
            let b = t * stride;
            axpy_i16(acc, p, &values[b..b + w], s.clamp(0, 31) as u32);
        }
    }
}
