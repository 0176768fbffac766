//! Integer LayerNorm, RMSNorm, GELU, SiLU (and SwiGLU's gate·up product) and softmax over Q16.16
//! values.
//!
//! Each function states its error bound against the exact real function; the proptests below check
//! those bounds against an f64 reference over the input range GPT-2 produces.

use crate::fixed::{isqrt_u128, round_shift_i128, round_shift_i64, saturate_i32, FRAC_BITS};
use crate::tables::{EXP2_NEG_TABLE, GELU_TABLE};

/// LayerNorm parameters of one row: `gamma`/`beta` element accessors in Q16.16.
pub trait LnParams {
    /// `gamma[i]` in Q16.16.
    fn gamma(&self, i: usize) -> i32;
    /// `beta[i]` in Q16.16.
    fn beta(&self, i: usize) -> i32;
}

/// Integer LayerNorm: `y = (x − mean) / sqrt(var + eps) · gamma + beta`, all Q16.16.
///
/// `eps_q32` is epsilon in Q32 (the unit of a variance of Q16.16 values). The mean is rounded to
/// the nearest Q16.16 unit, the standard deviation is computed to 2^-24 by an exact integer square
/// root, and the normalised value is rounded once more before `gamma`. Error bound (tested):
/// `|y − y_exact| ≤ 2^-14 · (1 + |gamma|) + 2^-16`, with `y` in real units, for rows whose standard
/// deviation is at least 2^-8.
pub fn layer_norm(x: &[i32], params: &impl LnParams, eps_q32: u64, out: &mut [i32]) {
    debug_assert_eq!(x.len(), out.len());
    let d = x.len() as i64;
    if d == 0 {
        return;
    }
    let sum: i64 = x.iter().map(|&v| v as i64).sum();
    let mean = crate::fixed::div_round_i64(sum, d);
    let mut sq: u128 = 0;
    for &v in x {
        let c = (v as i64 - mean) as i128;
        sq += (c * c) as u128;
    }
    // Variance in Q32; the square root of (var << 16) is the standard deviation in Q24.
    let var_q32 = sq / d as u128 + eps_q32 as u128;
    let std_q24 = isqrt_u128(var_q32 << 16).max(1);
    // 1/std in Q(56 - 24) = Q32 relative to Q16 inputs: c · inv >> 32 is the normalised value in Q16.
    let inv = (1u128 << 56) / std_q24;
    let max_c = x
        .iter()
        .map(|&v| (v as i64 - mean).unsigned_abs())
        .max()
        .unwrap_or(0) as u128;
    if max_c * inv < 1 << 62 {
        // Every c · inv fits i64 (the usual case: std ≥ 2^-8 and values below 2^15): the same
        // exact products without 128-bit arithmetic.
        let inv = inv as i64;
        for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let norm = round_shift_i64((v as i64 - mean) * inv, 32); // Q16
            let scaled = round_shift_i64(norm * params.gamma(i) as i64, FRAC_BITS);
            *o = saturate_i32(scaled + params.beta(i) as i64);
        }
        return;
    }
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let c = (v as i64 - mean) as i128;
        let norm = round_shift_i128(c * inv as i128, 32) as i64; // Q16
        let scaled = round_shift_i64(norm * params.gamma(i) as i64, FRAC_BITS);
        *o = saturate_i32(scaled + params.beta(i) as i64);
    }
}

/// Integer RMSNorm (the LLaMA family): `y = x / sqrt(mean(x²) + eps) · gamma`, all Q16.16
/// (`params.beta` is not used).
///
/// The same arithmetic as [`layer_norm`] without the mean: the mean square in Q32 plus `eps_q32`,
/// its root to 2^-24 by an exact integer square root, one rounding of the normalised value and one
/// after `gamma`. Error bound (tested): `|y − y_exact| ≤ 2^-14 · (1 + |gamma|) + 2^-16` in real
/// units, for rows whose root mean square is at least 2^-8.
pub fn rms_norm(x: &[i32], params: &impl LnParams, eps_q32: u64, out: &mut [i32]) {
    debug_assert_eq!(x.len(), out.len());
    let d = x.len() as u128;
    if d == 0 {
        return;
    }
    let sq: u128 = x.iter().map(|&v| (v as i64 * v as i64) as u128).sum();
    let ms_q32 = sq / d + eps_q32 as u128;
    let rms_q24 = isqrt_u128(ms_q32 << 16).max(1);
    let inv = (1u128 << 56) / rms_q24;
    let max_x = x.iter().map(|&v| v.unsigned_abs()).max().unwrap_or(0) as u128;
    if max_x * inv < 1 << 62 {
        // Every x · inv fits i64 (the usual case): the same exact products in 64 bits.
        let inv = inv as i64;
        for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
            let norm = round_shift_i64(v as i64 * inv, 32); // Q16
            *o = saturate_i32(round_shift_i64(norm * params.gamma(i) as i64, FRAC_BITS));
        }
        return;
    }
    for (i, (o, &v)) in out.iter_mut().zip(x).enumerate() {
        let norm = round_shift_i128(v as i128 * inv as i128, 32) as i64; // Q16
        *o = saturate_i32(round_shift_i64(norm * params.gamma(i) as i64, FRAC_BITS));
    }
}

/// SiLU, `x · sigmoid(x)`, in Q16.16.
///
/// The sigmoid comes from [`exp_neg_q31`] of `-|x|` and one division in Q31 (`1/(1+e)` for
/// `x ≥ 0`, `e/(1+e)` below), so no table is needed and the tail below zero, which decays only
/// like `x·e^x`, is followed exactly rather than clamped. Error bound (tested): within 1e-5 in
/// real units of the exact SiLU over all inputs (the final rounding is 2^-17 = 7.6e-6; the exp's
/// relative 2e-6 is multiplied by `|x|·e^-|x| ≤ 1/e`).
#[inline]
pub fn silu(x: i32) -> i32 {
    let e = exp_neg_q31(x.saturating_abs().saturating_neg()) as u64; // e^-|x| in Q31
    let one = 1u64 << 31;
    // sigmoid(|x|) = 1 / (1 + e), in Q31 and rounded: at most 2^31.
    let den = one + e;
    let sig_pos = ((1u64 << 62) + den / 2) / den;
    let sig = if x >= 0 { sig_pos } else { one - sig_pos };
    // |x| < 2^31 and sig ≤ 2^31: the product fits i64.
    round_shift_i64(x as i64 * sig as i64, 31) as i32
}

/// SwiGLU's elementwise product `SiLU(gate) · up`, Q16.16 in and out (saturated).
///
/// Error bound (tested): `|up| · 1e-5 + 2^-16` in real units (SiLU's bound carried through `up`,
/// plus the rounding of the product).
#[inline]
pub fn swiglu(gate: i32, up: i32) -> i32 {
    saturate_i32(round_shift_i64(silu(gate) as i64 * up as i64, FRAC_BITS))
}

const GELU_RANGE_Q16: i32 = 8 << FRAC_BITS;
/// log2 of the table step in Q16 units: the table has 64 entries per unit, so 2^10 Q16 units apart.
const GELU_STEP_SHIFT: u32 = FRAC_BITS - 6;

/// GPT-2's GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, in Q16.16.
///
/// A table of 1025 exact values over [-8, 8] (step 1/64) with linear interpolation; outside it
/// GELU(x) is x for x > 8 and 0 for x < -8 (both exact to 1e-14). Error bound (tested): 4e-5 in
/// real units over all inputs (interpolation ≤ h²/8·max|GELU''| = 2.0e-5, plus two roundings).
#[inline]
pub fn gelu(x: i32) -> i32 {
    if x >= GELU_RANGE_Q16 {
        return x;
    }
    if x <= -GELU_RANGE_Q16 {
        return 0;
    }
    let offset = (x + GELU_RANGE_Q16) as u32;
    let idx = (offset >> GELU_STEP_SHIFT) as usize;
    let frac = (offset & ((1 << GELU_STEP_SHIFT) - 1)) as i64;
    let lo = GELU_TABLE[idx] as i64;
    let hi = GELU_TABLE[idx + 1] as i64;
    (lo + round_shift_i64((hi - lo) * frac, GELU_STEP_SHIFT)) as i32
}

/// Applies [`gelu`] to a row in place.
pub fn gelu_row(x: &mut [i32]) {
    for v in x {
        *v = gelu(*v);
    }
}

/// `log2(e)` in Q30.
const LOG2E_Q30: i64 = 1_549_082_005;

/// `exp(x)` for `x ≤ 0` in Q16.16, returned in Q31 (so `exp(0) = 2^31`).
///
/// `exp(x) = 2^(x·log2 e)`: the integer part of the exponent is a shift, the fraction is a
/// 257-entry table of `2^(-i/256)` with linear interpolation. Error bound (tested): relative
/// 2e-6 plus 1 Q31 unit (2^-31) absolute; inputs below -22 give 0 or a few units.
#[inline]
pub fn exp_neg_q31(x: i32) -> u32 {
    debug_assert!(x <= 0);
    let x = x.min(0) as i64;
    // y = -x · log2(e) in Q24 (non-negative): 8 bits finer than the input so that rounding the
    // exponent costs under 1e-7 relative.
    let y = round_shift_i64(-x * LOG2E_Q30, 22);
    let int = (y >> 24) as u32;
    if int >= 32 {
        return 0;
    }
    let frac = (y & 0xFF_FFFF) as u64; // Q24 fraction of the exponent
    let idx = (frac >> 16) as usize;
    let t = frac & 0xFFFF;
    let lo = EXP2_NEG_TABLE[idx] as u64;
    let hi = EXP2_NEG_TABLE[idx + 1] as u64;
    // Interpolate downward (hi <= lo).
    let v = lo - (((lo - hi) * t + (1 << 15)) >> 16);
    ((v + ((1u64 << int) >> 1)) >> int) as u32
}

/// Softmax of a row of Q16.16 scores, written as Q16.16 probabilities (`1.0 = 65536`).
///
/// Subtracts the row maximum, exponentiates with [`exp_neg_q31`], and normalises by one
/// reciprocal of the sum (one division per row, not per element). Error bound (tested): each
/// probability within 2^-15 of the exact softmax. An empty row is left untouched.
pub fn softmax(scores: &[i32], out: &mut [i32]) {
    debug_assert_eq!(scores.len(), out.len());
    let Some(&max) = scores.iter().max() else {
        return;
    };
    let mut sum: u64 = 0;
    for (o, &s) in out.iter_mut().zip(scores) {
        let e = exp_neg_q31(saturate_i32(s as i64 - max as i64));
        // Q31 values up to 2^31 do not fit i32: keep them halved (Q30) until normalised.
        *o = (e >> 1) as i32;
        sum += (e >> 1) as u64;
    }
    // 2^30 ≤ sum (the maximum contributes exp(0)) and sum ≤ len · 2^30, so recip = 2^62 / sum
    // is at most 2^32 and e · recip ≤ 2^62: o = e · 2^16 / sum = e · recip / 2^46, within one
    // unit of the exactly rounded quotient.
    let recip = (1u64 << 62) / sum.max(1);
    for o in out.iter_mut() {
        *o = ((*o as u64 * recip + (1 << 45)) >> 46) as i32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixed::{from_f64, to_f64};
    use proptest::prelude::*;
    use std::vec::Vec;

    fn gelu_ref(x: f64) -> f64 {
        let c = libm::sqrt(2.0 / core::f64::consts::PI);
        0.5 * x * (1.0 + libm::tanh(c * (x + 0.044715 * x * x * x)))
    }

    #[test]
    fn test_gelu_dense_sweep_within_bound() {
        // Every 1/4096 across [-12, 12]: covers every table interval several times.
        let mut worst = 0.0f64;
        let mut q = -12 * 65536;
        while q <= 12 * 65536 {
            let err = (to_f64(gelu(q)) - gelu_ref(to_f64(q))).abs();
            worst = worst.max(err);
            q += 16;
        }
        assert!(worst <= 4e-5, "worst GELU error {worst}");
    }

    proptest! {
        /// GELU within 4e-5 of the f64 tanh form over the whole i32 input range GPT-2 reaches.
        #[test]
        fn prop_gelu_bound(x in -(1000i32 << 16)..(1000i32 << 16)) {
            let err = (to_f64(gelu(x)) - gelu_ref(to_f64(x))).abs();
            prop_assert!(err <= 4e-5, "x={} err={err}", to_f64(x));
        }

        /// exp within 2e-6 relative + 2^-31 absolute for x in [-40, 0].
        #[test]
        fn prop_exp_bound(x in -(40i32 << 16)..=0) {
            let got = exp_neg_q31(x) as f64 / 2147483648.0;
            let exact = libm::exp(to_f64(x));
            prop_assert!((got - exact).abs() <= exact * 2e-6 + 1.0 / 2147483648.0, "x={} got {got} exact {exact}", to_f64(x));
        }

        /// Softmax probabilities within 2^-15 of the f64 softmax.
        #[test]
        fn prop_softmax_bound(s in proptest::collection::vec(-(30i32 << 16)..(30i32 << 16), 1..200)) {
            let mut p = std::vec![0i32; s.len()];
            softmax(&s, &mut p);
            let max = s.iter().map(|&v| to_f64(v)).fold(f64::MIN, f64::max);
            let e: Vec<f64> = s.iter().map(|&v| libm::exp(to_f64(v) - max)).collect();
            let z: f64 = e.iter().sum();
            for (pi, ei) in p.iter().zip(&e) {
                let got = *pi as f64 / 65536.0;
                prop_assert!((got - ei / z).abs() <= 1.0 / 32768.0);
            }
        }

        /// LayerNorm within 2^-14·(1+|gamma|) + 2^-16 of the f64 LayerNorm.
        #[test]
        fn prop_layer_norm_bound(
            x in proptest::collection::vec(-100.0f64..100.0, 2..200),
            outlier in proptest::option::of((0usize..200, -3000.0f64..3000.0)),
            g in proptest::collection::vec(-4.0f64..4.0, 200),
            b in proptest::collection::vec(-2.0f64..2.0, 200),
        ) {
            let mut x = x;
            if let Some((i, v)) = outlier { let n = x.len(); x[i % n] = v; }
            let xq: Vec<i32> = x.iter().map(|&v| from_f64(v)).collect();
            let xr: Vec<f64> = xq.iter().map(|&v| to_f64(v)).collect();
            let params = TestLn {
                g: g.iter().map(|&v| from_f64(v)).collect(),
                b: b.iter().map(|&v| from_f64(v)).collect(),
            };
            let mean = xr.iter().sum::<f64>() / xr.len() as f64;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / xr.len() as f64;
            prop_assume!(var.sqrt() >= 1.0 / 256.0);
            let eps = 1e-5;
            let mut out = std::vec![0i32; xq.len()];
            layer_norm(&xq, &params, (eps * 4294967296.0) as u64, &mut out);
            for i in 0..xq.len() {
                let gi = to_f64(params.g[i]);
                let exact = (xr[i] - mean) / (var + eps).sqrt() * gi + to_f64(params.b[i]);
                let err = (to_f64(out[i]) - exact).abs();
                let bound = (1.0 + gi.abs()) / 16384.0 + 1.0 / 65536.0;
                prop_assert!(err <= bound, "i={i} err={err} bound={bound}");
            }
        }
    }

    proptest! {
        /// The i64 fast path and the i128 path compute the same integers: compare with the
        /// all-i128 formula over rows from tiny (i128 path) to ordinary spreads (fast path).
        #[test]
        fn prop_layer_norm_paths_are_exact(
            x in proptest::collection::vec(any::<i32>(), 1..100),
            spread in 0u32..32,
            g in proptest::collection::vec(any::<i32>(), 100),
            eps in 0u64..100_000,
        ) {
            let x: Vec<i32> = x.iter().map(|&v| v >> spread).collect();
            let params = TestLn { g: g.clone(), b: g.iter().map(|v| v.rotate_left(7)).collect() };
            let mut out = std::vec![0i32; x.len()];
            layer_norm(&x, &params, eps, &mut out);
            let d = x.len() as i64;
            let mean = crate::fixed::div_round_i64(x.iter().map(|&v| v as i64).sum(), d);
            let sq: u128 = x.iter().map(|&v| { let c = (v as i64 - mean) as i128; (c * c) as u128 }).sum();
            let std_q24 = isqrt_u128((sq / d as u128 + eps as u128) << 16).max(1);
            let inv = (1u128 << 56) / std_q24;
            for (i, &v) in x.iter().enumerate() {
                let norm = round_shift_i128((v as i64 - mean) as i128 * inv as i128, 32) as i64;
                let scaled = round_shift_i64(norm * params.g[i] as i64, FRAC_BITS);
                prop_assert_eq!(out[i], saturate_i32(scaled + params.b[i] as i64), "i={}", i);
            }
        }
    }

    fn silu_ref(x: f64) -> f64 {
        x / (1.0 + libm::exp(-x))
    }

    #[test]
    fn test_silu_dense_sweep_within_bound() {
        // Every 1/4096 across [-40, 40], where SiLU bends and where its negative tail lives.
        let mut worst = 0.0f64;
        let mut q = -40 * 65536;
        while q <= 40 * 65536 {
            let err = (to_f64(silu(q)) - silu_ref(to_f64(q))).abs();
            worst = worst.max(err);
            q += 16;
        }
        assert!(worst <= 1e-5, "worst SiLU error {worst}");
        assert_eq!(silu(0), 0);
        assert_eq!(silu(i32::MAX), i32::MAX);
        assert_eq!(silu(i32::MIN), 0);
    }

    proptest! {
        /// SiLU within 1e-5 of the f64 SiLU over the whole Q16.16 range.
        #[test]
        fn prop_silu_bound(x in any::<i32>()) {
            let err = (to_f64(silu(x)) - silu_ref(to_f64(x))).abs();
            prop_assert!(err <= 1e-5, "x={} err={err}", to_f64(x));
        }

        /// SiLU(gate)·up within |up|·1e-5 + 2^-16 of the f64 product.
        #[test]
        fn prop_swiglu_bound(g in -(60i32 << 16)..(60i32 << 16), u in -(60i32 << 16)..(60i32 << 16)) {
            let (gr, ur) = (to_f64(g), to_f64(u));
            let err = (to_f64(swiglu(g, u)) - silu_ref(gr) * ur).abs();
            prop_assert!(err <= ur.abs() * 1e-5 + 1.0 / 65536.0, "g={gr} u={ur} err={err}");
        }

        /// RMSNorm within 2^-14·(1+|gamma|) + 2^-16 of the f64 RMSNorm.
        #[test]
        fn prop_rms_norm_bound(
            x in proptest::collection::vec(-100.0f64..100.0, 2..200),
            outlier in proptest::option::of((0usize..200, -3000.0f64..3000.0)),
            g in proptest::collection::vec(-4.0f64..4.0, 200),
        ) {
            let mut x = x;
            if let Some((i, v)) = outlier { let n = x.len(); x[i % n] = v; }
            let xq: Vec<i32> = x.iter().map(|&v| from_f64(v)).collect();
            let xr: Vec<f64> = xq.iter().map(|&v| to_f64(v)).collect();
            let params = TestLn { g: g.iter().map(|&v| from_f64(v)).collect(), b: std::vec![0; 200] };
            let ms = xr.iter().map(|v| v * v).sum::<f64>() / xr.len() as f64;
            prop_assume!(ms.sqrt() >= 1.0 / 256.0);
            let eps = 1e-6;
            let mut out = std::vec![0i32; xq.len()];
            rms_norm(&xq, &params, (eps * 4294967296.0f64).round() as u64, &mut out);
            for i in 0..xq.len() {
                let gi = to_f64(params.g[i]);
                let exact = xr[i] / (ms + eps).sqrt() * gi;
                let err = (to_f64(out[i]) - exact).abs();
                let bound = (1.0 + gi.abs()) / 16384.0 + 1.0 / 65536.0;
                prop_assert!(err <= bound, "i={i} err={err} bound={bound}");
            }
        }

        /// RMSNorm's i64 fast path and its i128 path compute the same integers.
        #[test]
        fn prop_rms_norm_paths_are_exact(
            x in proptest::collection::vec(any::<i32>(), 1..100),
            spread in 0u32..32,
            g in proptest::collection::vec(any::<i32>(), 100),
            eps in 0u64..100_000,
        ) {
            let x: Vec<i32> = x.iter().map(|&v| v >> spread).collect();
            let params = TestLn { g: g.clone(), b: g.clone() };
            let mut out = std::vec![0i32; x.len()];
            rms_norm(&x, &params, eps, &mut out);
            let sq: u128 = x.iter().map(|&v| (v as i128 * v as i128) as u128).sum();
            let rms_q24 = isqrt_u128((sq / x.len() as u128 + eps as u128) << 16).max(1);
            let inv = (1u128 << 56) / rms_q24;
            for (i, &v) in x.iter().enumerate() {
                let norm = round_shift_i128(v as i128 * inv as i128, 32) as i64;
                let want = saturate_i32(round_shift_i64(norm * params.g[i] as i64, FRAC_BITS));
                prop_assert_eq!(out[i], want, "i={}", i);
            }
        }
    }

    struct TestLn {
        g: Vec<i32>,
        b: Vec<i32>,
    }
    impl LnParams for TestLn {
        fn gamma(&self, i: usize) -> i32 {
            self.g[i]
        }
        fn beta(&self, i: usize) -> i32 {
            self.b[i]
        }
    }

    #[test]
    fn test_softmax_of_equal_scores_is_uniform() {
        let mut p = [0i32; 4];
        softmax(&[7 << 16; 4], &mut p);
        assert_eq!(p, [16384; 4]);
    }
}
