//! The server's side of the offline phase: a plain scalar int8 × u64 product over ciphertext words
//! and modulus switching. It needs no secret and no polynomial arithmetic.

/// Bytes of one tile of input words (`in` rows × a column block) that should stay in L2 while every
/// output passes over it.
const X_TILE_BYTES: usize = 512 * 1024;

/// `y[j][c] = Σ_i W[j][i] · x[i][c] (mod 2^64)`: the homomorphic product of a layer's weights with
/// ciphertext words. `x` is `[in][width]` (one row of ciphertext words per input index, e.g.
/// `a_i ‖ b_i` with `width = 2N`, or one half with `width = N`, or one column tile of them), `w` is
/// Veil's `[out][in]` int8 layout (as in [`crate::kernels::matmul_u32_i8`]), `y` is
/// `[out][width]`. Columns are independent, so a caller may split `width` into tiles (and threads).
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
    assert!(in_dim > 0, "empty input");
    assert_eq!(x.len(), in_dim * width, "input shape");
    assert_eq!(w.len(), in_dim * out_dim, "weight shape");
    assert_eq!(y.len(), out_dim * width, "output shape");
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

/// Rounds every word to its top `64 - drop` bits: `x ← round(x / 2^drop) mod 2^(64 - drop)`
/// (ties up), what the server does to each half of a result before sending it. `drop = 0` is the
/// identity.
pub fn mod_switch(words: &mut [u64], drop: u32) {
    assert!(drop < 64, "drop fewer than 64 bits");
    if drop == 0 {
        return;
    }
    let half = 1u64 << (drop - 1);
    for x in words.iter_mut() {
        *x = x.wrapping_add(half) >> drop;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn gemm_matches_a_naive_product_on_odd_shapes_and_extreme_values() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        for (in_dim, out_dim, width) in [(1, 1, 1), (3, 5, 9), (17, 4, 600), (70, 9, 1030)] {
            let mut x: Vec<u64> = (0..in_dim * width).map(|_| rng.next_u64()).collect();
            let mut w: Vec<u8> = (0..in_dim * out_dim)
                .map(|_| rng.next_u32() as u8)
                .collect();
            x[0] = u64::MAX;
            w[0] = 0x80; // -128
            let mut y = vec![1u64; out_dim * width];
            gemm_i8_u64(&x, &w, in_dim, out_dim, width, &mut y);
            for j in 0..out_dim {
                for c in 0..width {
                    let want = (0..in_dim).fold(0u64, |acc, i| {
                        let wv = w[j * in_dim + i] as i8 as i128;
                        let p = (x[i * width + c] as i128 * wv) as u64;
                        acc.wrapping_add(p)
                    });
                    assert_eq!(
                        y[j * width + c],
                        want,
                        "{in_dim}x{out_dim}x{width} at {j},{c}"
                    );
                }
            }
        }
    }

    #[test]
    fn mod_switch_rounds_to_nearest_modulo_the_smaller_ring() {
        let mut v = [
            0u64,
            1 << 22,
            (1 << 22) - 1,
            5 << 23,
            u64::MAX,
            u64::MAX - (1 << 22),
        ];
        mod_switch(&mut v, 23);
        assert_eq!(v, [0, 1, 0, 5, 0, (1 << 41) - 1]);
        let mut same = [3u64, u64::MAX];
        mod_switch(&mut same, 0);
        assert_eq!(same, [3, u64::MAX]);
    }
}
