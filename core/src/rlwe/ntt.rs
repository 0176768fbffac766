//! A negacyclic number-theoretic transform modulo the prime [`P`] (61 bits), for exact products
//! in `Z[X]/(X^n + 1)` of polynomials whose product coefficients stay below `P / 2` in magnitude.
//!
//! `P = 2^61 - 0x21fff = 0x1fff_ffff_fffd_e001` is the largest prime below 2^61 with
//! `P ≡ 1 (mod 8192)`, so `Z_P` holds a primitive 8192-th root of unity `ψ = 3^((P-1)/8192)` (3
//! generates `Z_P^*`) and the transform of every power-of-two size `n ≤ 4096` folds the negacyclic
//! twist into its butterflies (Longa and Naehrig, "Speeding up the Number Theoretic Transform for
//! Faster Ideal Lattice-Based Cryptography", CANS 2016, Algorithms 1 and 2): forward Cooley–Tukey
//! from natural to bit-reversed order, inverse Gentleman–Sande back, so a product is two forward
//! transforms, a pointwise product and one inverse, with no reordering.
//!
//! Arithmetic: twiddle factors are public, so the butterflies use Shoup's precomputed quotients and
//! Harvey's lazy reduction ("Faster arithmetic for number-theoretic transforms", J. Symb. Comput.
//! 2014): values stay in `[0, 4P)` inside the forward transform and `[0, 2P)` inside the inverse,
//! which fits in 63 bits because `P < 2^61`. Conditional subtractions are written with the sign
//! bit, never a branch, and the pointwise product with a secret operand uses Montgomery reduction,
//! so nothing here branches or divides on data: the transform of the secret key and every product
//! with it run in time independent of their values.
//!
//! The twiddle tables (4 × 4096 words, 128 KiB) are computed at compile time by `const fn`s into a
//! `static`; the first `n` entries of each serve the transform of size `n`, because
//! `bitrev_12(k) = bitrev_log2(n)(k) · 4096 / n` for `k < n` and `ψ^(4096/n)` is the `2n`-th root.

/// The NTT prime: `2^61 - 139263`, `P ≡ 1 (mod 8192)`.
pub const P: u64 = 0x1fff_ffff_fffd_e001;
/// Largest supported transform size (log2).
pub const MAX_LOG_N: u32 = 12;
/// Largest supported transform size.
pub const MAX_N: usize = 1 << MAX_LOG_N;

/// A generator of `Z_P^*` (checked in the tests against the factorisation of `P - 1`).
const GENERATOR: u64 = 3;
const TWO_P: u64 = 2 * P;

const fn mul_mod(a: u64, b: u64) -> u64 {
    ((a as u128 * b as u128) % P as u128) as u64
}

const fn pow_mod(mut base: u64, mut exp: u64) -> u64 {
    let mut acc = 1;
    while exp > 0 {
        if exp & 1 == 1 {
            acc = mul_mod(acc, base);
        }
        base = mul_mod(base, base);
        exp >>= 1;
    }
    acc
}

/// Shoup's quotient `floor(w · 2^64 / P)` of a public constant `w < P`.
const fn shoup(w: u64) -> u64 {
    (((w as u128) << 64) / P as u128) as u64
}

/// `-P^-1 mod 2^64` (Newton's iteration doubles the correct low bits each step: 6 steps reach 64).
const P_NEG_INV: u64 = {
    let mut inv: u64 = 1;
    let mut i = 0;
    while i < 6 {
        inv = inv.wrapping_mul(2u64.wrapping_sub(P.wrapping_mul(inv)));
        i += 1;
    }
    assert!(P.wrapping_mul(inv) == 1);
    inv.wrapping_neg()
};

/// `2^128 mod P`: multiplying by it in Montgomery form converts a residue into Montgomery form.
const R2_MOD_P: u64 = {
    let r = ((1u128 << 64) % P as u128) as u64;
    mul_mod(r, r)
};

struct Tables {
    /// `ψ^bitrev(k)` and Shoup quotients: the forward transform's twiddles.
    fwd: [u64; MAX_N],
    fwd_shoup: [u64; MAX_N],
    /// `ψ^-bitrev(k)` and Shoup quotients: the inverse transform's twiddles.
    inv: [u64; MAX_N],
    inv_shoup: [u64; MAX_N],
    /// `n^-1 mod P` for `n = 2^l`, and Shoup quotients.
    n_inv: [u64; MAX_LOG_N as usize + 1],
    n_inv_shoup: [u64; MAX_LOG_N as usize + 1],
}

impl Tables {
    const fn new() -> Tables {
        let psi = pow_mod(GENERATOR, (P - 1) / (2 * MAX_N as u64));
        // ψ is a primitive 2·MAX_N-th root: ψ^MAX_N = -1.
        assert!(pow_mod(psi, MAX_N as u64) == P - 1);
        let psi_inv = pow_mod(psi, 2 * MAX_N as u64 - 1);
        let mut t = Tables {
            fwd: [0; MAX_N],
            fwd_shoup: [0; MAX_N],
            inv: [0; MAX_N],
            inv_shoup: [0; MAX_N],
            n_inv: [0; MAX_LOG_N as usize + 1],
            n_inv_shoup: [0; MAX_LOG_N as usize + 1],
        };
        let (mut pw, mut pw_inv) = (1, 1);
        let mut j = 0;
        while j < MAX_N {
            let r = j.reverse_bits() >> (usize::BITS - MAX_LOG_N);
            t.fwd[r] = pw;
            t.fwd_shoup[r] = shoup(pw);
            t.inv[r] = pw_inv;
            t.inv_shoup[r] = shoup(pw_inv);
            pw = mul_mod(pw, psi);
            pw_inv = mul_mod(pw_inv, psi_inv);
            j += 1;
        }
        let mut l = 0;
        while l <= MAX_LOG_N as usize {
            let inv = pow_mod(1 << l, P - 2);
            t.n_inv[l] = inv;
            t.n_inv_shoup[l] = shoup(inv);
            l += 1;
        }
        t
    }
}

static TABLES: Tables = Tables::new();

/// `x - m` if `x ≥ m`, else `x`, without a branch. Needs `x < m + 2^63`.
#[inline(always)]
pub(crate) fn sub_if_ge(x: u64, m: u64) -> u64 {
    let d = x.wrapping_sub(m);
    d.wrapping_add(m & (((d as i64) >> 63) as u64))
}

/// `x · w mod P` up to one extra `P` (result in `[0, 2P)`), for any `x < 2^64` and a public
/// `w < P` with Shoup quotient `ws`.
#[inline(always)]
fn mul_shoup_lazy(x: u64, w: u64, ws: u64) -> u64 {
    let q = ((x as u128 * ws as u128) >> 64) as u64;
    x.wrapping_mul(w).wrapping_sub(q.wrapping_mul(P))
}

/// Montgomery reduction: `z · 2^-64 mod P` in `[0, 2P)`, for `z < P · 2^64`.
#[inline(always)]
fn redc(z: u128) -> u64 {
    let m = (z as u64).wrapping_mul(P_NEG_INV);
    ((z + m as u128 * P as u128) >> 64) as u64
}

fn check_len(n: usize) -> u32 {
    assert!(
        n.is_power_of_two() && (2..=MAX_N).contains(&n),
        "NTT size must be a power of two in 2..=4096"
    );
    n.trailing_zeros()
}

/// In place: coefficients (each `< 4P`) → evaluations at the odd powers of the `2n`-th root, in
/// bit-reversed order, reduced to `[0, P)`. `a.len()` is a power of two in `2..=4096`.
pub fn forward(a: &mut [u64]) {
    let n = a.len();
    check_len(n);
    let tw = &TABLES;
    // Generic stages while blocks are at least 8 long; the last two stages (t = 2, 1) run fused
    // over blocks of 4 with the final reduction, avoiding per-block overhead on tiny blocks.
    let last_generic = if n >= 4 { n / 4 } else { n };
    let (mut t, mut m) = (n, 1);
    while m < last_generic {
        t >>= 1;
        let twiddles = tw.fwd[m..2 * m].iter().zip(&tw.fwd_shoup[m..2 * m]);
        for (block, (&w, &ws)) in a.chunks_exact_mut(2 * t).zip(twiddles) {
            let (lo, hi) = block.split_at_mut(t);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                (*x, *y) = ct_butterfly(*x, *y, w, ws);
            }
        }
        m <<= 1;
    }
    if n < 4 {
        for x in a.iter_mut() {
            *x = sub_if_ge(sub_if_ge(*x, TWO_P), P);
        }
        return;
    }
    let q = n / 4;
    let t2 = tw.fwd[q..2 * q].iter().zip(&tw.fwd_shoup[q..2 * q]);
    let t1 = tw.fwd[2 * q..]
        .chunks_exact(2)
        .zip(tw.fwd_shoup[2 * q..].chunks_exact(2));
    for (x, ((&w, &ws), (w1, ws1))) in a.chunks_exact_mut(4).zip(t2.zip(t1)) {
        let (x0, x2) = ct_butterfly(x[0], x[2], w, ws);
        let (x1, x3) = ct_butterfly(x[1], x[3], w, ws);
        let (x0, x1) = ct_butterfly(x0, x1, w1[0], ws1[0]);
        let (x2, x3) = ct_butterfly(x2, x3, w1[1], ws1[1]);
        for (o, v) in x.iter_mut().zip([x0, x1, x2, x3]) {
            *o = sub_if_ge(sub_if_ge(v, TWO_P), P);
        }
    }
}

/// Cooley–Tukey butterfly `(x + w·y, x - w·y)` on lazy values: inputs `< 4P`, outputs `< 4P`.
#[inline(always)]
fn ct_butterfly(x: u64, y: u64, w: u64, ws: u64) -> (u64, u64) {
    let u = sub_if_ge(x, TWO_P);
    let v = mul_shoup_lazy(y, w, ws);
    (u + v, u + TWO_P - v)
}

/// Gentleman–Sande butterfly `(x + y, w·(x - y))` on lazy values: inputs `< 2P`, outputs `< 2P`.
#[inline(always)]
fn gs_butterfly(x: u64, y: u64, w: u64, ws: u64) -> (u64, u64) {
    (
        sub_if_ge(x + y, TWO_P),
        mul_shoup_lazy(x + TWO_P - y, w, ws),
    )
}

/// In place: the inverse of [`forward`] (input in bit-reversed order, each value `< 2P`), giving
/// coefficients reduced to `[0, P)`.
pub fn inverse(a: &mut [u64]) {
    let n = a.len();
    let log_n = check_len(n) as usize;
    let tw = &TABLES;
    let (mut t, mut m) = (1, n);
    if n >= 4 {
        // The first two stages (t = 1, 2) fused over blocks of 4.
        let q = n / 4;
        let t1 = tw.inv[2 * q..]
            .chunks_exact(2)
            .zip(tw.inv_shoup[2 * q..].chunks_exact(2));
        let t2 = tw.inv[q..2 * q].iter().zip(&tw.inv_shoup[q..2 * q]);
        for (x, ((w1, ws1), (&w, &ws))) in a.chunks_exact_mut(4).zip(t1.zip(t2)) {
            let (x0, x1) = gs_butterfly(x[0], x[1], w1[0], ws1[0]);
            let (x2, x3) = gs_butterfly(x[2], x[3], w1[1], ws1[1]);
            let (x0, x2) = gs_butterfly(x0, x2, w, ws);
            let (x1, x3) = gs_butterfly(x1, x3, w, ws);
            x.copy_from_slice(&[x0, x1, x2, x3]);
        }
        (t, m) = (4, n / 4);
    }
    while m > 1 {
        let h = m >> 1;
        let twiddles = tw.inv[h..m].iter().zip(&tw.inv_shoup[h..m]);
        for (block, (&w, &ws)) in a.chunks_exact_mut(2 * t).zip(twiddles) {
            let (lo, hi) = block.split_at_mut(t);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                (*x, *y) = gs_butterfly(*x, *y, w, ws);
            }
        }
        t <<= 1;
        m = h;
    }
    let (ni, nis) = (tw.n_inv[log_n], tw.n_inv_shoup[log_n]);
    for x in a.iter_mut() {
        *x = sub_if_ge(mul_shoup_lazy(*x, ni, nis), P);
    }
}

/// Converts residues `< P` into Montgomery form (`x · 2^64 mod P`, reduced), in constant time:
/// the form [`mul_montgomery`] takes its secret operand in.
pub fn to_montgomery(a: &mut [u64]) {
    for x in a.iter_mut() {
        *x = sub_if_ge(redc(*x as u128 * R2_MOD_P as u128), P);
    }
}

/// `a[k] ← a[k] · b[k] mod P` in `[0, 2P)` (ready for [`inverse`]), with `a[k] < 4P` and `b` in
/// Montgomery form, `b[k] < P`. Constant time: for a secret `b`.
pub fn mul_montgomery(a: &mut [u64], b: &[u64]) {
    assert_eq!(a.len(), b.len(), "pointwise product of unequal lengths");
    for (x, &y) in a.iter_mut().zip(b) {
        *x = redc(*x as u128 * y as u128);
    }
}

/// The centred representative of a residue `x < P` as a two's-complement word: `x` if
/// `x ≤ P/2`, else `x - P`. Branch-free.
#[inline(always)]
pub fn centred(x: u64) -> u64 {
    let neg = (((P / 2).wrapping_sub(x) as i64) >> 63) as u64;
    x.wrapping_sub(P & neg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use std::vec;
    use std::vec::Vec;

    fn schoolbook_mod_p(a: &[u64], b: &[u64]) -> Vec<u64> {
        let n = a.len();
        let mut c = vec![0u64; n];
        for (i, &ai) in a.iter().enumerate() {
            for (j, &bj) in b.iter().enumerate() {
                let p = mul_mod(ai, bj);
                let k = i + j;
                if k < n {
                    c[k] = (c[k] + p) % P;
                } else {
                    c[k - n] = (c[k - n] + P - p) % P;
                }
            }
        }
        c
    }

    #[test]
    fn generator_and_root_have_full_order() {
        // P - 1 = 2^13 · 1019 · 4871 · 56708411 (checked here, not assumed).
        let factors = [2u64, 1019, 4871, 56_708_411];
        let mut rest = P - 1;
        for f in factors {
            while rest.is_multiple_of(f) {
                rest /= f;
            }
        }
        assert_eq!(rest, 1, "P - 1 has another prime factor");
        for f in factors {
            assert_ne!(pow_mod(GENERATOR, (P - 1) / f), 1, "3 is not a generator");
        }
        let psi = TABLES.fwd[1 << (MAX_LOG_N - 1)]; // ψ^bitrev(2048) = ψ^1
        assert_eq!(pow_mod(psi, MAX_N as u64), P - 1);
        assert_eq!(pow_mod(psi, 2 * MAX_N as u64), 1);
        assert!(P < 1 << 61 && P % (2 * MAX_N as u64) == 1);
    }

    #[test]
    fn transform_round_trips_and_multiplies_like_schoolbook_mod_p() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        for log_n in 1..=MAX_LOG_N {
            let n = 1 << log_n;
            let a: Vec<u64> = (0..n).map(|_| rng.next_u64() % P).collect();
            let b: Vec<u64> = (0..n).map(|_| rng.next_u64() % P).collect();
            let mut fa = a.clone();
            forward(&mut fa);
            let mut back = fa.clone();
            inverse(&mut back);
            assert_eq!(back, a, "round trip n={n}");
            if n <= 256 {
                let mut fb = b.clone();
                forward(&mut fb);
                to_montgomery(&mut fb);
                mul_montgomery(&mut fa, &fb);
                inverse(&mut fa);
                assert_eq!(fa, schoolbook_mod_p(&a, &b), "product n={n}");
            }
        }
    }

    #[test]
    fn montgomery_and_centring_are_exact_at_the_edges() {
        for x in [0, 1, 2, P / 2, P / 2 + 1, P - 2, P - 1] {
            let mut v = [x, 1];
            to_montgomery(&mut v);
            let mut one = [1u64, x];
            mul_montgomery(&mut one, &v);
            assert_eq!(sub_if_ge(one[0], P), x);
            assert_eq!(sub_if_ge(one[1], P), x);
        }
        assert_eq!(centred(0), 0);
        assert_eq!(centred(P / 2), P / 2);
        assert_eq!(centred(P / 2 + 1) as i64, (P / 2 + 1) as i64 - P as i64);
        assert_eq!(centred(P - 1) as i64, -1);
    }
}
