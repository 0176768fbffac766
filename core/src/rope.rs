//! Rotary position embeddings (RoPE) in integers, for the LLaMA family.
//!
//! Each query and key head of width `dh` is rotated pairwise, in the `rotate_half` convention of
//! Hugging Face's LLaMA: element `i` and element `i + dh/2` form a pair turned by the angle
//! `pos · inv_freq[i]`. The frequencies come from the configuration (`rope_theta`, and Llama 3's
//! `rope_scaling` of type `llama3`); the cosines and sines of one position are computed in `f64`
//! with the pure-Rust `libm` (never the platform's C library: every host, x86_64 server or aarch64
//! client, must get the same bits, or the private and the local pipelines would differ) and
//! rounded once to Q30. The rotation itself is integer arithmetic on Q16.16 values.

use crate::fixed::{round_shift_i64, saturate_i32};

/// Fraction bits of the cosines and sines.
pub const TRIG_FRAC_BITS: u32 = 30;

/// Llama 3's frequency scaling (`rope_scaling` with `rope_type: "llama3"` in `config.json`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Llama3Scaling {
    /// `factor`: long wavelengths are stretched by it.
    pub factor: f64,
    /// `low_freq_factor`.
    pub low_freq_factor: f32,
    /// `high_freq_factor`.
    pub high_freq_factor: f32,
    /// `original_max_position_embeddings`.
    pub original_max_positions: u32,
}

/// How the rotation frequencies are derived from `theta`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/dh)`.
    None,
    /// Llama 3's piecewise scaling of the plain frequencies.
    Llama3(Llama3Scaling),
}

/// The RoPE parameters of a model (unused by GPT-2, whose positions are learned).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RopeConfig {
    /// `rope_theta`, the base of the frequencies.
    pub theta: f64,
    /// `rope_scaling`.
    pub scaling: RopeScaling,
}

impl RopeConfig {
    /// No rotation parameters (GPT-2).
    pub const NONE: RopeConfig = RopeConfig {
        theta: 0.0,
        scaling: RopeScaling::None,
    };

    /// `inv_freq[i]` for `i` in `0..dh/2` into `out` (at least `dh/2` long), as transformers'
    /// `_compute_default_rope_parameters` and `_compute_llama3_parameters` define them (there in
    /// f32, here in f64: the difference moves an angle at position 255 by about 1e-5 rad).
    pub fn inv_freq(&self, dh: usize, out: &mut [f64]) {
        let half = dh / 2;
        for (i, f) in out.iter_mut().enumerate().take(half) {
            let plain = 1.0 / libm::pow(self.theta, (2 * i) as f64 / dh as f64);
            *f = match self.scaling {
                RopeScaling::None => plain,
                RopeScaling::Llama3(s) => llama3(plain, &s),
            };
        }
    }
}

fn llama3(inv_freq: f64, s: &Llama3Scaling) -> f64 {
    let old = s.original_max_positions as f64;
    let low_wavelen = old / s.low_freq_factor as f64;
    let high_wavelen = old / s.high_freq_factor as f64;
    let wavelen = 2.0 * core::f64::consts::PI / inv_freq;
    if wavelen < high_wavelen {
        inv_freq
    } else if wavelen > low_wavelen {
        inv_freq / s.factor
    } else {
        // Between the two: interpolate between the stretched and the plain frequency.
        let smooth = (old / wavelen - s.low_freq_factor as f64)
            / (s.high_freq_factor as f64 - s.low_freq_factor as f64);
        (1.0 - smooth) * inv_freq / s.factor + smooth * inv_freq
    }
}

/// The cosines and sines (Q30) of position `pos` for every frequency: `out[i] = cos`,
/// `out[half + i] = sin`, with `half = inv_freq.len()` (so `out` is `2 · half` long).
pub fn trig_row(pos: usize, inv_freq: &[f64], out: &mut [i32]) {
    let half = inv_freq.len();
    let one = (1u64 << TRIG_FRAC_BITS) as f64;
    for (i, &f) in inv_freq.iter().enumerate() {
        let a = pos as f64 * f;
        // |cos|, |sin| ≤ 1, so the rounded values stay within ±2^30 and fit i32.
        out[i] = libm::round(libm::cos(a) * one) as i32;
        out[half + i] = libm::round(libm::sin(a) * one) as i32;
    }
}

/// Rotates one head (`x`, Q16.16, even length `dh`) by the angles whose [`trig_row`] is `trig`
/// (`dh` values): `x[i], x[i+h] ← x[i]·cos − x[i+h]·sin, x[i+h]·cos + x[i]·sin`, `h = dh/2`.
///
/// Error bound (tested): with `X = |x[i]| + |x[i+h]|` in real units, each output is within
/// `X · 2^-30 + 2^-17` of the exact rotation by the same angle (the Q30 rounding of cos and sin,
/// then one rounding to Q16.16); `libm`'s cos and sin are within one ulp, far below that.
#[inline]
pub fn rotate_head(x: &mut [i32], trig: &[i32]) {
    let h = x.len() / 2;
    let (cos, sin) = trig.split_at(h);
    let (lo, hi) = x.split_at_mut(h);
    for i in 0..h {
        let (a, b) = (lo[i] as i64, hi[i] as i64);
        let (c, s) = (cos[i] as i64, sin[i] as i64);
        // |a|, |b| < 2^31 and |c|, |s| ≤ 2^30: each sum of two products stays below 2^62.
        lo[i] = saturate_i32(round_shift_i64(a * c - b * s, TRIG_FRAC_BITS));
        hi[i] = saturate_i32(round_shift_i64(b * c + a * s, TRIG_FRAC_BITS));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixed::{from_f64, to_f64};
    use proptest::prelude::*;
    use std::vec::Vec;

    const TINY_LLAMA: RopeConfig = RopeConfig {
        theta: 500000.0,
        scaling: RopeScaling::Llama3(Llama3Scaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 64,
        }),
    };

    /// The Llama 3 scaling keeps short wavelengths, divides long ones by `factor`, and
    /// interpolates in between (values worked out by hand from transformers' formula).
    #[test]
    fn test_llama3_scaling_by_band() {
        let mut f = [0f64; 16];
        TINY_LLAMA.inv_freq(32, &mut f);
        let plain = |i: usize| 1.0 / libm::pow(500000.0, (2 * i) as f64 / 32.0);
        // i = 0: wavelength 2π < 16 (= 64 / 4): unchanged.
        assert_eq!(f[0], 1.0);
        // i = 15: wavelength ≈ 2π · 500000^(30/32) > 64: divided by 8.
        assert!((f[15] - plain(15) / 8.0).abs() <= plain(15) * 1e-15);
        for (i, &v) in f.iter().enumerate() {
            let w = 2.0 * core::f64::consts::PI / plain(i);
            if (16.0..=64.0).contains(&w) {
                let smooth = (64.0 / w - 1.0) / 3.0;
                let want = (1.0 - smooth) * plain(i) / 8.0 + smooth * plain(i);
                assert!((v - want).abs() <= want * 1e-15, "i={i}");
                assert!(
                    v < plain(i) && v > plain(i) / 8.0,
                    "i={i}: between the bands"
                );
            }
        }
        // Plain RoPE: the textbook frequencies.
        let mut g = [0f64; 16];
        RopeConfig {
            theta: 10000.0,
            scaling: RopeScaling::None,
        }
        .inv_freq(32, &mut g);
        assert!((g[1] - libm::pow(10000.0, -1.0 / 16.0)).abs() < 1e-15);
    }

    proptest! {
        /// The integer rotation is within `X · 2^-30 + 2^-17` of the exact f64 rotation by the
        /// same angle, for positions up to the longest context and values up to ±3000.
        #[test]
        fn prop_rotation_bound(
            pos in 0usize..16384,
            x in proptest::collection::vec(-3000.0f64..3000.0, 32),
        ) {
            let mut f = [0f64; 16];
            TINY_LLAMA.inv_freq(32, &mut f);
            let mut trig = [0i32; 32];
            trig_row(pos, &f, &mut trig);
            let mut q: Vec<i32> = x.iter().map(|&v| from_f64(v)).collect();
            let xr: Vec<f64> = q.iter().map(|&v| to_f64(v)).collect();
            rotate_head(&mut q, &trig);
            for i in 0..16 {
                let a = pos as f64 * f[i];
                let (c, s) = (libm::cos(a), libm::sin(a));
                let want_lo = xr[i] * c - xr[i + 16] * s;
                let want_hi = xr[i + 16] * c + xr[i] * s;
                let bound = (xr[i].abs() + xr[i + 16].abs()) / (1u64 << 30) as f64
                    + 1.0 / 131072.0 + 1e-12;
                prop_assert!((to_f64(q[i]) - want_lo).abs() <= bound, "i={i}");
                prop_assert!((to_f64(q[i + 16]) - want_hi).abs() <= bound, "i={i}");
            }
        }
    }

    /// The cosines and sines are the same bits on every host: a checksum of the golden
    /// tiny-llama's table over its whole context, fixed here, is checked on x86_64 and (in CI)
    /// on aarch64 under qemu. A platform `cos`/`sin`, or a compiler fusing `pos · f` into
    /// something else, would change it.
    #[test]
    fn test_trig_bits_are_the_same_on_every_host() {
        let mut f = [0f64; 16];
        TINY_LLAMA.inv_freq(32, &mut f);
        let mut trig = [0i32; 32];
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for pos in 0..16384 {
            trig_row(pos, &f, &mut trig);
            for &t in &trig {
                // FNV-1a over the words.
                h = (h ^ t as u32 as u64).wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        let bits: u64 = f.iter().fold(0, |a, x| a.rotate_left(5) ^ x.to_bits());
        // The same two values come out of CPython's math.cos/sin/pow on x86_64 for this table
        // (an independent implementation agreeing on every rounded Q30 value).
        assert_eq!(
            (h, bits),
            (0xeb91_04a7_f98b_bc80, 0x2f5f_cd5f_d4fd_b794),
            "trig checksum {h:#x}, inv_freq bits {bits:#x}"
        );
    }

    /// Position 0 is the identity, exactly.
    #[test]
    fn test_position_zero_is_identity() {
        let mut f = [0f64; 4];
        TINY_LLAMA.inv_freq(8, &mut f);
        let mut trig = [0i32; 8];
        trig_row(0, &f, &mut trig);
        let x0 = [1, -2, 3 << 16, -(4 << 16), 5, 6, 7, -8];
        let mut x = x0;
        rotate_head(&mut x, &trig);
        assert_eq!(x, x0);
    }
}
