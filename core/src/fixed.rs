//! The Q16.16 fixed-point domain.
//!
//! Every real value the client keeps between linear layers (the residual stream, LayerNorm outputs,
//! linear outputs, attention probabilities) is an `i32` holding `round(x · 2^16)`. GPT-2's residual
//! stream stays well below the ±32768 this allows (its largest outlier channels reach a few
//! thousand); operations that could exceed it saturate instead of wrapping.

/// Fraction bits of the fixed-point domain.
pub const FRAC_BITS: u32 = 16;
/// `1.0` in Q16.16.
pub const ONE: i32 = 1 << FRAC_BITS;

/// Converts a real number to Q16.16 (tools and tests only; the client never touches floats).
pub fn from_f64(x: f64) -> i32 {
    let scaled = x * ONE as f64;
    // `as` saturates for out-of-range floats, which is the behaviour we want for weights.
    round_f64(scaled) as i32
}

/// Converts Q16.16 to a real number (tools and tests only).
pub fn to_f64(x: i32) -> f64 {
    x as f64 / ONE as f64
}

/// Rounds half away from zero without `std`.
pub(crate) fn round_f64(x: f64) -> f64 {
    let t = x as i64 as f64; // truncation toward zero, exact for |x| < 2^53
    let frac = x - t;
    if frac >= 0.5 {
        t + 1.0
    } else if frac <= -0.5 {
        t - 1.0
    } else {
        t
    }
}

/// Saturates an `i64` into the `i32` range.
#[inline]
pub fn saturate_i32(x: i64) -> i32 {
    x.clamp(i32::MIN as i64, i32::MAX as i64) as i32
}

/// Saturates an `i128` into the `i32` range.
#[inline]
pub fn saturate_i32_wide(x: i128) -> i32 {
    x.clamp(i32::MIN as i128, i32::MAX as i128) as i32
}

/// `round(x / 2^shift)` with ties rounded up (toward +∞), for `shift` in `0..64`.
#[inline]
pub fn round_shift_i64(x: i64, shift: u32) -> i64 {
    if shift == 0 {
        x
    } else {
        (x + (1i64 << (shift - 1))) >> shift
    }
}

/// `round(x / 2^shift)` with ties rounded up, for `shift` in `0..128`.
#[inline]
pub fn round_shift_i128(x: i128, shift: u32) -> i128 {
    if shift == 0 {
        x
    } else {
        (x + (1i128 << (shift - 1))) >> shift
    }
}

/// `round(num / den)` with ties away from zero, for `den > 0`.
#[inline]
pub fn div_round_i64(num: i64, den: i64) -> i64 {
    debug_assert!(den > 0);
    if num >= 0 {
        (num + den / 2) / den
    } else {
        -((-num + den / 2) / den)
    }
}

/// Integer square root: the largest `r` with `r·r <= n`.
pub fn isqrt_u128(n: u128) -> u128 {
    if n < 2 {
        return n;
    }
    // Newton's method from an initial guess above the root; converges monotonically downward.
    let bits = 128 - n.leading_zeros();
    let mut x: u128 = 1u128 << bits.div_ceil(2);
    loop {
        let y = (x + n / x) >> 1;
        if y >= x {
            return x;
        }
        x = y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn test_isqrt_small_exact() {
        for n in 0u128..10_000 {
            let r = isqrt_u128(n);
            assert!(r * r <= n && (r + 1) * (r + 1) > n, "n={n} r={r}");
        }
    }

    proptest! {
        #[test]
        fn prop_isqrt_is_floor_sqrt(n in any::<u128>()) {
            let r = isqrt_u128(n);
            prop_assert!(r.checked_mul(r).is_some_and(|sq| sq <= n));
            prop_assert!((r + 1).checked_mul(r + 1).is_none_or(|sq| sq > n));
        }

        #[test]
        fn prop_round_shift_matches_float(x in -(1i64 << 50)..(1i64 << 50), s in 1u32..40) {
            let exact = x as f64 / (1u64 << s) as f64;
            let got = round_shift_i64(x, s) as f64;
            prop_assert!((got - exact).abs() <= 0.5);
        }

        #[test]
        fn prop_div_round(num in -(1i64 << 50)..(1i64 << 50), den in 1i64..(1 << 30)) {
            let exact = num as f64 / den as f64;
            prop_assert!((div_round_i64(num, den) as f64 - exact).abs() <= 0.5 + 1e-9);
        }
    }
}
