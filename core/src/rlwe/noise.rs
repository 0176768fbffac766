//! A rigorous bound on the probability that one decrypted term is wrong.
//!
//! # Derivation
//!
//! Fix an output `j` with weights `w_i = W[j][i]` and a slot `t`. After the server's product and
//! modulus switching by `(k_a, k_b)`, `b' · 2^k_b + (a' · 2^k_a) · s = Δ·u + ν (mod 2^64)` with
//!
//! `ν = E + R_a + R_b`, where
//! - `E = Σ_i w_i · e_i[t]`, the encryption errors: independent centred binomials `ψ_η`. Each is
//!   `Σ_{k < 2η} ε_k / 2` with independent Rademacher `ε_k` (`x - 1/2` for a fair bit `x`), so
//!   `E = Σ_{i,k} (w_i / 2) ε_{i,k}` and, by Hoeffding's lemma (`E[e^{λε}] = cosh λ ≤ e^{λ²/2}`),
//!   `E[e^{λE}] ≤ e^{λ² V_e / 2}` with `V_e = (η/2) · ‖w‖²` (its exact variance).
//! - `R_a = (ε_a · s)[t]`, the rounding error of the `a` half times the key. Coefficient `t` of the
//!   negacyclic product is `Σ_l ±ε_a[l] · s[π(l)]`: each key coefficient appears once, with a sign.
//!   `ε_a` depends only on the public `a` and `W`, never on `s`, and `|ε_a[l]| ≤ 2^(k_a - 1)`. A
//!   uniform ternary `s` has `E[e^{λs}] = (1 + 2 cosh λ)/3 ≤ e^{λ²/3}` (Taylor coefficients:
//!   `2/(3·(2m)!) ≤ 1/(3^m·m!)` since `(2m)!/m! ≥ 3^m` for `m ≥ 2`, equality at `m = 1`), so
//!   `E[e^{λR_a}] ≤ e^{λ² V_a / 2}` with `V_a = (2/3) Σ_l ε_a[l]² ≤ (2/3) · N · 4^(k_a - 1)`.
//! - `R_b = ε_b[t] ∈ [-2^(k_b - 1), 2^(k_b - 1))`, the rounding error of the `b` half, taken at its
//!   worst.
//!
//! `e` and `s` are independent, so `E + R_a` is sub-Gaussian with variance proxy `V = V_e + V_a`
//! and Chernoff's bound gives `P(|E + R_a| ≥ T) ≤ 2·exp(-T² / (2V))`. Decryption rounds to the
//! nearest multiple of `Δ = 2^32`, so it is correct whenever `ν ∈ [-2^31, 2^31)`, which holds
//! whenever `|E + R_a| < T = 2^31 - 2^(k_b - 1)`. Hence, per term,
//!
//! `P(failure) ≤ 2·exp(-T² / (2V))`, i.e. `log2 P ≤ 1 - T² / (2V) · log2(e)`.
//!
//! The bound is marginal over `e` and `s`; the terms of one batch share `s`, so for a whole batch
//! use the union bound (terms × per-term bound), which needs no independence.
//!
//! # Figures (`N = 4096`, `η = 21`)
//!
//! The worst int8 column of GPT-2's widest layer, mlp.c_proj with `in = 3072` and every weight
//! ±127: `‖w‖² = 3072 · 127² = 49 548 288 ≈ 2^25.56`, so `E` has standard deviation `2^14.48`,
//! more than 16 bits below `2^31`: the encryption noise alone fails with probability about
//! `2^-6.4e9`, and (with `|w| ≤ 128`) no layer of any GPT-2 size needs splitting. The budget goes
//! to modulus switching, where `V_a` dominates:
//!
//! | `(k_a, k_b)` | bits down per coefficient | `log2` bound per term |
//! |---|---|---|
//! | (0, 0) | 128 | -6.4e9 |
//! | (22, 22) | 84 | -275.5 |
//! | (23, 23) | 82 | -68.0 |
//! | **(23, 28)** ([`ModSwitch::RECOMMENDED`]) | **77** | **-59.9** |
//! | (23, 29) | 76 | -52.0 |
//! | (23, 30) | 75 | -38.0 |
//! | (24, 24) | 80 | -16.2 |
//!
//! A distilgpt2 batch decrypts `N · Σ out = 4096 · 91 729 ≈ 2^28.5` terms (LM head included), so
//! the recommended switch bounds the probability of any wrong term in a batch by `2^-31.4`, and
//! every term is checked before use anyway. A wrong term is then an availability event, not a
//! leak, as long as the server cannot see *which* terms failed: a malicious server controls `ε_a`
//! and could learn bits of `s` from the client's reactions, so a failed check must void the
//! whole batch (and its key), never only the failing slots.

use super::{ModSwitch, ETA, N};

/// The failure probability per term that every offloaded layer must stay below: `2^-40`.
pub const MAX_LOG2_FAILURE: f64 = -40.0;

/// `2^k` as `f64`, exactly, for `k < 64`.
fn pow2(k: u32) -> f64 {
    (1u64 << k) as f64
}

/// Upper bound on `log2` of the probability that one decrypted term of an output whose weight
/// column has squared L2 norm `column_norm2` is wrong, after modulus switching by `switch`
/// (the derivation is in the module documentation). `-inf` when no error is possible, `0` when the
/// bound says nothing. `f64` rounding is of relative order `2^-52`, far below every margin here.
pub fn log2_failure_bound(column_norm2: u64, switch: ModSwitch) -> f64 {
    assert!(
        switch.drop_a < 64 && switch.drop_b < 64,
        "drop fewer than 64 bits"
    );
    let half = pow2(31);
    let r_b = if switch.drop_b == 0 {
        0.0
    } else {
        pow2(switch.drop_b - 1)
    };
    let t = half - r_b;
    if t <= 0.0 {
        return 0.0;
    }
    let v_e = ETA as f64 / 2.0 * column_norm2 as f64;
    let v_a = if switch.drop_a == 0 {
        0.0
    } else {
        let r = pow2(switch.drop_a - 1);
        2.0 / 3.0 * N as f64 * r * r
    };
    let v = v_e + v_a;
    if v == 0.0 {
        return f64::NEG_INFINITY;
    }
    let bound = 1.0 - t * t / (2.0 * v) * core::f64::consts::LOG2_E;
    if bound > 0.0 {
        0.0
    } else {
        bound
    }
}

/// The largest squared L2 norm of a weight column: of a row of `w` in Veil's `[out][in]` int8
/// layout (`in_dim` weights per output).
pub fn max_column_norm2(w: &[u8], in_dim: usize) -> u64 {
    assert!(
        in_dim > 0 && w.len().is_multiple_of(in_dim),
        "weights are whole rows"
    );
    w.chunks_exact(in_dim)
        .map(|row| {
            row.iter()
                .map(|&x| {
                    let v = x as i8 as i64;
                    (v * v) as u64
                })
                .sum::<u64>()
        })
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    const WORST_3072: u64 = 3072 * 127 * 127;

    #[test]
    fn worst_case_c_proj_meets_the_target_with_the_recommended_switch() {
        let w = vec![127u8.wrapping_neg(); 3072 * 2]; // -127 everywhere: the same norm as ±127
        assert_eq!(max_column_norm2(&w, 3072), WORST_3072);
        let b = log2_failure_bound(WORST_3072, ModSwitch::RECOMMENDED);
        assert!(b <= MAX_LOG2_FAILURE, "{b}");
        assert!((-60.0..=-59.5).contains(&b), "the documented figure: {b}");
        // ... and for every narrower layer (c_attn, attn.c_proj, c_fc, LM head: in = 768).
        assert!(log2_failure_bound(768 * 128 * 128, ModSwitch::RECOMMENDED) <= b);
    }

    #[test]
    fn the_recommended_switch_is_the_cheapest_of_its_kind_that_passes() {
        // One more bit from a breaks the target; one more from b still passes at 76 bits but with
        // 8 fewer bits of margin, two more do not pass.
        let drop = |drop_a, drop_b| log2_failure_bound(WORST_3072, ModSwitch { drop_a, drop_b });
        assert!(drop(24, 24) > MAX_LOG2_FAILURE);
        assert!(drop(24, 1) > MAX_LOG2_FAILURE);
        assert!(drop(23, 30) > MAX_LOG2_FAILURE);
        assert!((drop(23, 23) + 68.0).abs() < 0.1);
        assert!((drop(23, 29) + 52.0).abs() < 0.1);
    }

    #[test]
    fn without_switching_only_the_encryption_noise_counts() {
        let b = log2_failure_bound(WORST_3072, ModSwitch::NONE);
        assert!(b < -6.0e9, "{b}");
        assert_eq!(log2_failure_bound(0, ModSwitch::NONE), f64::NEG_INFINITY);
        // Dropping 32 bits of b leaves no margin at all.
        let none = ModSwitch {
            drop_a: 0,
            drop_b: 32,
        };
        assert_eq!(log2_failure_bound(1, none), 0.0);
    }

    #[test]
    fn the_bound_grows_with_the_norm_and_the_dropped_bits() {
        let mut last = f64::NEG_INFINITY;
        for drop_a in 18..26 {
            let b = log2_failure_bound(WORST_3072, ModSwitch { drop_a, drop_b: 20 });
            assert!(b >= last);
            last = b;
        }
        let s = ModSwitch::RECOMMENDED;
        assert!(log2_failure_bound(1 << 40, s) > log2_failure_bound(1 << 20, s));
    }
}
