//! int8 quantization of activations and weights, and the integer requantization between them.
//!
//! - Activations: each row `x` (Q16.16) becomes `x_q = round(127 · x / m)` with `m = max|x|`
//!   ([`ActScale`]), so a row's real value is `x_q · m / (127 · 2^16)`.
//! - Weights: symmetric int8 per output channel, `W ≈ W_q · s_w[j]` (done once, in `tools/`).
//! - The exact integer product `acc_j = Σ_i x_q[i] · W_q[i][j]` comes back from the server (or a
//!   local kernel) and is turned into Q16.16 by `acc_j · m · s_w[j] / 127`, where `s_w[j] / 127` is
//!   stored as an integer multiplier and shift ([`ChannelScale`]): no floats on the client.
//! - Embeddings and the KV cache use 16-bit block floating point ([`BlockI16`]): `i16` values that
//!   share one power-of-two shift per row (or per head), lossless for rows whose magnitude stays
//!   below 0.5 and within 2^-15 of the row maximum otherwise.

use crate::fixed::{round_f64, round_shift_i128, saturate_i32_wide};

/// Largest magnitude of an int8 activation or weight (symmetric: -128 is never produced).
pub const INT8_MAX: i32 = 127;

/// Per-row activation scale: the row's largest magnitude in Q16.16 (at least 1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ActScale(pub i32);

/// Quantizes one Q16.16 row to int8 with a per-row scale. `out.len()` must equal `x.len()`.
///
/// Divides by one reciprocal per row (`r = ⌊127 · 2^55 / m⌋`) instead of once per element: since
/// `|v| ≤ m`, `|v · r| ≤ 127 · 2^55 < 2^62` fits `i64`, and the truncated reciprocal moves a result
/// by less than `m / 2^55 ≤ 2^-24` of a step, so only values that close to a rounding tie can land
/// on its other side. Error bound: `|x_q · m / 127 − x| ≤ (m / 254) · (1 + 2^-23)` (half a
/// quantization step, plus that sliver), in Q16.16 units.
pub fn quantize_row(x: &[i32], out: &mut [i8]) -> ActScale {
    debug_assert_eq!(x.len(), out.len());
    let m = x.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0).max(1) as i64;
    let r = ((INT8_MAX as i64) << 55) / m;
    for (o, &v) in out.iter_mut().zip(x) {
        // |v · r| ≤ 127 · 2^55, so the rounded quotient is within [-127, 127].
        *o = ((v as i64 * r + (1 << 54)) >> 55) as i8;
    }
    ActScale(m as i32)
}

/// A per-output-channel requantization factor `f = mult · 2^-shift` standing for `s_w[j] / 127`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChannelScale {
    /// Multiplier, normalised into `[2^30, 2^31)` unless the channel is all zero (then 0).
    pub mult: i32,
    /// Right shift applied to the product.
    pub shift: u8,
}

impl ChannelScale {
    /// Encodes a per-channel weight scale `s_w` (the real value of one int8 step) as the integer
    /// factor `s_w / 127` (tools only). Relative error at most 2^-30.
    pub fn from_weight_scale(s_w: f64) -> Self {
        let f = s_w / INT8_MAX as f64;
        if f.is_nan() || f <= 0.0 || !f.is_finite() {
            return ChannelScale { mult: 0, shift: 0 };
        }
        let mut shift: i32 = 0;
        let mut scaled = f;
        // Normalise f · 2^shift into [2^30, 2^31).
        while scaled < (1u64 << 30) as f64 && shift < 126 {
            scaled *= 2.0;
            shift += 1;
        }
        while scaled >= (1u64 << 31) as f64 && shift > 0 {
            scaled /= 2.0;
            shift -= 1;
        }
        let mult = round_f64(scaled).min(i32::MAX as f64) as i32;
        ChannelScale {
            mult,
            shift: shift as u8,
        }
    }

    /// The factor as a real number (tools and tests).
    pub fn to_f64(self) -> f64 {
        // shift < 127 by construction, so the power of two is exact in both u128 and f64.
        self.mult as f64 / (1u128 << self.shift.min(127)) as f64
    }
}

/// Turns an exact int8 product sum into Q16.16: `round(acc · m · mult / 2^shift)`, saturated.
///
/// The product fits easily in `i128`: |acc| < 2^31, m < 2^31, mult < 2^31.
#[inline]
pub fn rescale(acc: i32, act: ActScale, ch: ChannelScale) -> i32 {
    // acc · mult < 2^62 fits i64, so only one widening (64 × 64 → 128) multiply is needed.
    let wide = (acc as i64 * ch.mult as i64) as i128 * act.0 as i128;
    saturate_i32_wide(round_shift_i128(wide, ch.shift as u32))
}

/// Quantizes real weights of one output channel to int8 (tools only): returns the scale `s_w`
/// with `w ≈ q · s_w`, writing `q` into `out`.
pub fn quantize_weight_channel(w: impl Iterator<Item = f64> + Clone, out: &mut [i8]) -> f64 {
    let max = w
        .clone()
        .fold(0.0f64, |a, v| if v.abs() > a { v.abs() } else { a });
    if max == 0.0 {
        out.iter_mut().for_each(|o| *o = 0);
        return 0.0;
    }
    let s = max / INT8_MAX as f64;
    for (o, v) in out.iter_mut().zip(w) {
        *o = round_f64(v / s).clamp(-127.0, 127.0) as i8;
    }
    s
}

/// 16-bit block floating point: `value(i) = q[i] << shift` in Q16.16.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockI16;

impl BlockI16 {
    /// The smallest shift for which every value of `x` fits in `i16` after rounding.
    pub fn shift_for(x: &[i32]) -> u8 {
        let m = x.iter().map(|v| v.unsigned_abs()).max().unwrap_or(0) as u64;
        let mut shift = 0u32;
        // Rounding can add half a step, so keep the rounded maximum below 2^15.
        while shift < 17 && (m + ((1u64 << shift) >> 1)) >> shift > i16::MAX as u64 {
            shift += 1;
        }
        shift as u8
    }

    /// Encodes a Q16.16 block; returns the shared shift. Error: at most `2^(shift-1)` Q16.16 units.
    pub fn encode(x: &[i32], out: &mut [i16]) -> u8 {
        debug_assert_eq!(x.len(), out.len());
        let shift = Self::shift_for(x);
        for (o, &v) in out.iter_mut().zip(x) {
            let r = crate::fixed::round_shift_i64(v as i64, shift as u32);
            *o = r.clamp(i16::MIN as i64, i16::MAX as i64) as i16;
        }
        shift
    }

    /// Decodes one value to Q16.16.
    #[inline]
    pub fn decode(q: i16, shift: u8) -> i32 {
        crate::fixed::saturate_i32((q as i64) << shift.min(17))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Per-row int8: each element within half a step (m/254) of its true value.
        #[test]
        fn prop_quantize_row_half_step(x in proptest::collection::vec(-(1i32 << 30)..(1i32 << 30), 1..300)) {
            let mut q = std::vec![0i8; x.len()];
            let s = quantize_row(&x, &mut q);
            let m = s.0 as f64;
            for (&v, &qi) in x.iter().zip(&q) {
                prop_assert!(qi != -128);
                let back = qi as f64 * m / 127.0;
                prop_assert!((back - v as f64).abs() <= m / 254.0 * (1.0 + 1.0 / (1u64 << 23) as f64) + 1e-9);
            }
        }

        /// ChannelScale: relative error of the encoded factor at most 2^-30.
        #[test]
        fn prop_channel_scale_relative_error(s in 1e-12f64..10.0) {
            let c = ChannelScale::from_weight_scale(s);
            let rel = (c.to_f64() - s / 127.0).abs() / (s / 127.0);
            prop_assert!(rel <= 1.0 / (1u64 << 30) as f64, "rel {rel}");
        }

        /// Rescale equals the real product acc · m · f within 0.5 + 2^-30 relative.
        #[test]
        fn prop_rescale_matches_real(acc in -(1i32 << 22)..(1i32 << 22), m in 1i32..(1 << 20), s in 1e-5f64..1e-2) {
            let c = ChannelScale::from_weight_scale(s);
            let exact = acc as f64 * m as f64 * c.to_f64();
            prop_assume!(exact.abs() < 2e9);
            let got = rescale(acc, ActScale(m), c) as f64;
            prop_assert!((got - exact).abs() <= 0.5 + exact.abs() * 1e-12, "got {got} exact {exact}");
        }

        /// Block floating point: error at most half a step, never overflows i16.
        #[test]
        fn prop_block_i16_roundtrip(x in proptest::collection::vec(-(i32::MAX - (1 << 17))..(i32::MAX - (1 << 17)), 1..100)) {
            let mut q = std::vec![0i16; x.len()];
            let shift = BlockI16::encode(&x, &mut q);
            for (&v, &qi) in x.iter().zip(&q) {
                let back = BlockI16::decode(qi, shift) as i64;
                let tol = if shift == 0 { 0 } else { 1i64 << (shift - 1) };
                prop_assert!((back - v as i64).abs() <= tol, "v {v} back {back} shift {shift}");
            }
        }
    }

    #[test]
    fn test_zero_row_quantizes_to_zero() {
        let mut q = [5i8; 4];
        let s = quantize_row(&[0; 4], &mut q);
        assert_eq!(q, [0; 4]);
        assert_eq!(s, ActScale(1));
    }
}
