//! The server's side of the offline phase: the int8 × u64 product over ciphertext words and
//! modulus switching. It needs no secret and no polynomial arithmetic.

/// `y[j][c] = Σ_i W[j][i] · x[i][c] (mod 2^64)`: the homomorphic product of a layer's weights with
/// ciphertext words. `x` is `[in][width]` (one row of ciphertext words per input index, e.g.
/// `a_i ‖ b_i` with `width = 2N`, or one half with `width = N`, or one column tile of them), `w` is
/// Veil's `[out][in]` int8 layout (as in [`crate::kernels::matmul_u32_i8`]), `y` is
/// `[out][width]`. Columns are independent, so a caller may split `width` into tiles (and threads).
///
/// Runs on the best kernel for this CPU ([`crate::kernels::isa`]): AVX2 on x86_64 (16-bit limbs
/// through `vpmaddwd`), otherwise [`crate::kernels::scalar::gemm_i8_u64`]. All of them compute the
/// same exact sums modulo 2^64. Panics if `in_dim` is zero or a length does not match its shape.
pub fn gemm_i8_u64(
    x: &[u64],
    w: &[u8],
    in_dim: usize,
    out_dim: usize,
    width: usize,
    y: &mut [u64],
) {
    crate::kernels::gemm_i8_u64(x, w, in_dim, out_dim, width, y);
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
    use crate::kernels::Kernel;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use std::vec;
    use std::vec::Vec;

    /// `Σ_i W[j][i] · x[i][c]` in `i128`, reduced modulo 2^64 at the end.
    fn naive(x: &[u64], w: &[u8], in_dim: usize, out_dim: usize, width: usize) -> Vec<u64> {
        let mut y = vec![0u64; out_dim * width];
        for (j, yr) in y.chunks_exact_mut(width).enumerate() {
            let mut acc = vec![0i128; width];
            for i in 0..in_dim {
                let wv = w[j * in_dim + i] as i8 as i128;
                for (a, &xv) in acc.iter_mut().zip(&x[i * width..(i + 1) * width]) {
                    // |x · w| < 2^71 and in · 2^71 < 2^127: exact.
                    *a += xv as i128 * wv;
                }
            }
            for (o, a) in yr.iter_mut().zip(acc) {
                *o = a as u64;
            }
        }
        y
    }

    /// Words whose 16-bit limbs, recoded as signed, are all `-2^15` (`x + 0x8000_8000_8000_8000
    /// ≡ 0`): with `w = -128` they give the largest limb sums the AVX2 kernel has to keep exact.
    const MOST_NEGATIVE_LIMBS: u64 = 0x7FFF_7FFF_7FFF_8000;

    /// Random data (`mode` 0), or the extremes: all `u64::MAX` × `-128` (1), all
    /// [`MOST_NEGATIVE_LIMBS`] × `-128` (2), and mixtures of extreme words and weights (3).
    fn data(
        rng: &mut ChaCha20Rng,
        in_dim: usize,
        out_dim: usize,
        width: usize,
        mode: u8,
    ) -> (Vec<u64>, Vec<u8>) {
        let mut x: Vec<u64> = (0..in_dim * width).map(|_| rng.next_u64()).collect();
        let mut w: Vec<u8> = (0..in_dim * out_dim)
            .map(|_| rng.next_u32() as u8)
            .collect();
        match mode {
            0 => {}
            1 => {
                x.fill(u64::MAX);
                w.fill(i8::MIN as u8);
            }
            2 => {
                x.fill(MOST_NEGATIVE_LIMBS);
                w.fill(i8::MIN as u8);
            }
            _ => {
                let words = [
                    u64::MAX,
                    1 << 63,
                    (1 << 32) - 1,
                    1 << 32,
                    MOST_NEGATIVE_LIMBS,
                    0,
                ];
                let weights = [i8::MIN, i8::MAX, -1, 0, 1];
                for (k, v) in x.iter_mut().enumerate() {
                    // Every seventh word stays random; the periods differ so pairs mix.
                    if k % 7 != 6 {
                        *v = words[k % words.len()];
                    }
                }
                for (k, v) in w.iter_mut().enumerate() {
                    *v = weights[k % weights.len()] as u8;
                }
            }
        }
        (x, w)
    }

    #[test]
    fn gemm_kernels_match_a_naive_product_on_odd_shapes_and_extreme_values() {
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            crate::kernels::isa() == crate::kernels::Isa::Avx2,
            std::arch::is_x86_feature_detected!("avx2"),
            "the public function dispatches to AVX2 where the CPU has it"
        );
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        // 257 and 513 leave one row past a panel of 2 · 128 rows; widths leave 1, 2 and 3 columns
        // past a group of four and partial blocks of 32; out_dim cycles through 1..=9.
        let in_dims = [1, 3, 17, 70, 257, 513, 768];
        let widths = [1, 7, 9, 600, 1030, 4096, 8192];
        let mut shape = 0;
        for in_dim in in_dims {
            for width in widths {
                let out_dim = 1 + shape % 9;
                shape += 1;
                for mode in 0..4 {
                    let (x, w) = data(&mut rng, in_dim, out_dim, width, mode);
                    let want = naive(&x, &w, in_dim, out_dim, width);
                    let mut scalar = vec![1u64; out_dim * width];
                    crate::kernels::scalar::gemm_i8_u64(
                        &x,
                        &w,
                        in_dim,
                        out_dim,
                        width,
                        &mut scalar,
                    );
                    assert!(
                        scalar == want,
                        "scalar {in_dim}x{out_dim}x{width} mode {mode}"
                    );
                    for kernel in Kernel::all() {
                        let mut y = vec![1u64; out_dim * width];
                        kernel.gemm_i8_u64(&x, &w, in_dim, out_dim, width, &mut y);
                        if let Some(k) = (0..y.len()).find(|&k| y[k] != want[k]) {
                            panic!(
                                "{kernel:?} {in_dim}x{out_dim}x{width} mode {mode}: y[{}][{}] = {:#x}, want {:#x}",
                                k / width, k % width, y[k], want[k]
                            );
                        }
                    }
                    let mut y = vec![1u64; out_dim * width];
                    gemm_i8_u64(&x, &w, in_dim, out_dim, width, &mut y);
                    assert!(
                        y == want,
                        "dispatched {in_dim}x{out_dim}x{width} mode {mode}"
                    );
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "weight shape")]
    fn gemm_rejects_a_weight_matrix_of_the_wrong_shape() {
        gemm_i8_u64(&[0; 8], &[0; 3], 2, 2, 4, &mut [0; 8]);
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
