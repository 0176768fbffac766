//! A negacyclic number-theoretic transform of size [`N`] = 4096 modulo the 30-bit prime [`P`],
//! for exact products in `Z[X]/(X^N + 1)` of polynomials whose product coefficients stay below
//! `P / 2` in magnitude (the client's products of 16-bit limbs with its ternary key: at most
//! `4096 · (2^16 - 1) < 2^28`).
//!
//! `P = 0x3fff_4001 = 2^30 - 49151` is the largest prime below 2^30 with `P ≡ 1 (mod 8192)`, so
//! `Z_P` holds a primitive 8192-th root of unity `ψ = 3^((P-1)/8192)` (3 generates `Z_P^*`) and the
//! negacyclic twist folds into the butterflies (Longa and Naehrig, "Speeding up the Number
//! Theoretic Transform for Faster Ideal Lattice-Based Cryptography", CANS 2016, Algorithms 1 and
//! 2): forward Cooley–Tukey from natural order to bit-reversed order, inverse Gentleman–Sande back.
//! A product is two forward transforms, a pointwise product and one inverse.
//!
//! Why 30 bits: every value fits a 32-bit lane, so AVX2 transforms eight coefficients per
//! instruction (it has no 64-bit multiply), and the lazy bounds below still fit: `4P < 2^32`.
//! The previous 61-bit prime took two limbs per 64-bit word but ran one butterfly at a time
//! (1.5 ns each here); with 16-bit limbs this one needs twice the transforms at a fraction of the
//! cost each (see `cargo bench -p veil-core --bench rlwe -- ntt`).
//!
//! Arithmetic: twiddle factors are public, so the butterflies use Shoup's precomputed quotients and
//! Harvey's lazy reduction ("Faster arithmetic for number-theoretic transforms", J. Symb. Comput.
//! 2014): values stay in `[0, 4P)` inside the forward transform and `[0, 2P)` inside the inverse.
//! Conditional subtractions are branch-free (`min(x, x - m)` on wrapping words), and the pointwise
//! product with the secret key uses Montgomery reduction, so nothing here branches, divides or
//! indexes on data: the transform of the key and every product with it run in time independent of
//! their values.
//!
//! Evaluation order: the transform's output is the textbook bit-reversed order with each block of
//! 64 values transposed as an 8 × 8 matrix (value `8·l + j` of a block stored at `8·j + l`). The
//! order of evaluations is irrelevant to products (pointwise, and [`inverse`] undoes it), and this
//! one lets the vector transform run its last three stages, whose butterflies pair values fewer
//! than eight apart, across registers instead of inside them. The portable transform computes the
//! textbook order and transposes; the tests check that both give the same words.
//!
//! The twiddle tables are computed at compile time by `const fn`s into a `static`.

use super::N;

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // SIMD intrinsics: each `unsafe` block carries its SAFETY argument.
mod avx2;

/// The NTT prime: `2^30 - 49151`, `P ≡ 1 (mod 8192)`.
pub const P: u32 = 0x3fff_4001;
const LOG_N: u32 = super::LOG_N;
/// A generator of `Z_P^*` (checked in the tests against the factorisation of `P - 1`).
const GENERATOR: u64 = 3;
const TWO_P: u32 = 2 * P;
/// Values per transposed block, and the stride of its rows.
const BLOCK: usize = 64;
/// Tail twiddles per block: 8 for the stage pairing values 4 apart, 2 × 8 for 2 apart, 4 × 8 for
/// neighbours (one vector of per-lane twiddles per group of butterflies).
const TAIL: usize = 56;

const fn mul_mod(a: u64, b: u64) -> u64 {
    (a * b) % P as u64
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

/// Shoup's quotient `floor(w · 2^32 / P)` of a public constant `w < P`.
const fn shoup(w: u64) -> u32 {
    ((w << 32) / P as u64) as u32
}

/// `-P^-1 mod 2^32` (Newton's iteration doubles the correct low bits each step: 5 steps reach 32).
const P_NEG_INV: u32 = {
    let mut inv: u32 = 1;
    let mut i = 0;
    while i < 5 {
        inv = inv.wrapping_mul(2u32.wrapping_sub(P.wrapping_mul(inv)));
        i += 1;
    }
    assert!(P.wrapping_mul(inv) == 1);
    inv.wrapping_neg()
};

/// `2^64 mod P`: a Montgomery product with it converts a residue into Montgomery form.
const R2_MOD_P: u32 = {
    let r = (1u64 << 32) % P as u64;
    mul_mod(r, r) as u32
};

/// `N^-1 mod P` and its Shoup quotient.
const N_INV: u32 = pow_mod(N as u64, P as u64 - 2) as u32;
const N_INV_SHOUP: u32 = shoup(N_INV as u64);

/// The inverse transform's last twiddle `ψ^-bitrev(1) = ψ^-(N/2)` times `N^-1`, and its Shoup
/// quotient: the vector inverse folds the final scaling by `N^-1` into its last stage.
const LAST_INV_N: u32 = {
    let psi = pow_mod(GENERATOR, (P as u64 - 1) / (2 * N as u64));
    let psi_inv = pow_mod(psi, 2 * N as u64 - 1);
    mul_mod(pow_mod(psi_inv, N as u64 / 2), N_INV as u64) as u32
};
const LAST_INV_N_SHOUP: u32 = shoup(LAST_INV_N as u64);

struct Tables {
    /// `ψ^bitrev(k)` and Shoup quotients: the forward transform's twiddles.
    fwd: [u32; N],
    fwd_shoup: [u32; N],
    /// `ψ^-bitrev(k)` and Shoup quotients: the inverse transform's twiddles.
    inv: [u32; N],
    inv_shoup: [u32; N],
    /// The twiddles of the three stages inside each block of 64, arranged per lane of the
    /// transposed block ([`tail_index`]), for both directions.
    fwd_tail: [u32; N / BLOCK * TAIL],
    fwd_tail_shoup: [u32; N / BLOCK * TAIL],
    inv_tail: [u32; N / BLOCK * TAIL],
    inv_tail_shoup: [u32; N / BLOCK * TAIL],
}

/// Which textbook twiddle entry serves tail slot `k` of block `b`, lane `l`: in a transposed
/// block, register `j` lane `l` holds value `64b + 8l + j`. The stage pairing values 4 apart
/// (registers `j`, `j + 4`) has 512 sub-blocks of 8, value `v` in sub-block `v / 8`; the one 2
/// apart has 1024 of 4 (registers `0, 1` in sub-block `16b + 2l`, registers `4, 5` in the next);
/// the last has 2048 of 2 (register pair `2k, 2k + 1` in `32b + 4l + k`).
const fn tail_index(b: usize, k: usize) -> usize {
    let (slot, l) = (k / 8, k % 8);
    match slot {
        0 => N / 8 + 8 * b + l,
        1 | 2 => N / 4 + 16 * b + 2 * l + (slot - 1),
        _ => N / 2 + 32 * b + 4 * l + (slot - 3),
    }
}

impl Tables {
    const fn new() -> Tables {
        let psi = pow_mod(GENERATOR, (P as u64 - 1) / (2 * N as u64));
        // ψ is a primitive 2N-th root: ψ^N = -1.
        assert!(pow_mod(psi, N as u64) == P as u64 - 1);
        let psi_inv = pow_mod(psi, 2 * N as u64 - 1);
        let mut t = Tables {
            fwd: [0; N],
            fwd_shoup: [0; N],
            inv: [0; N],
            inv_shoup: [0; N],
            fwd_tail: [0; N / BLOCK * TAIL],
            fwd_tail_shoup: [0; N / BLOCK * TAIL],
            inv_tail: [0; N / BLOCK * TAIL],
            inv_tail_shoup: [0; N / BLOCK * TAIL],
        };
        let (mut pw, mut pw_inv) = (1, 1);
        let mut j = 0;
        while j < N {
            let r = j.reverse_bits() >> (usize::BITS - LOG_N);
            t.fwd[r] = pw as u32;
            t.fwd_shoup[r] = shoup(pw);
            t.inv[r] = pw_inv as u32;
            t.inv_shoup[r] = shoup(pw_inv);
            pw = mul_mod(pw, psi);
            pw_inv = mul_mod(pw_inv, psi_inv);
            j += 1;
        }
        let mut b = 0;
        while b < N / BLOCK {
            let mut k = 0;
            while k < TAIL {
                let src = tail_index(b, k);
                t.fwd_tail[b * TAIL + k] = t.fwd[src];
                t.fwd_tail_shoup[b * TAIL + k] = t.fwd_shoup[src];
                t.inv_tail[b * TAIL + k] = t.inv[src];
                t.inv_tail_shoup[b * TAIL + k] = t.inv_shoup[src];
                k += 1;
            }
            b += 1;
        }
        t
    }
}

static TABLES: Tables = Tables::new();

/// `x - m` if `x ≥ m`, else `x`, without a branch (`x - m` wraps above `x` otherwise).
#[inline(always)]
fn sub_if_ge(x: u32, m: u32) -> u32 {
    x.min(x.wrapping_sub(m))
}

/// `x · w mod P` up to one extra `P` (result in `[0, 2P)`), for any `x < 2^32` and a public
/// `w < P` with Shoup quotient `ws`.
#[inline(always)]
fn mul_shoup_lazy(x: u32, w: u32, ws: u32) -> u32 {
    let q = ((x as u64 * ws as u64) >> 32) as u32;
    x.wrapping_mul(w).wrapping_sub(q.wrapping_mul(P))
}

/// Montgomery reduction: `z · 2^-32 mod P` in `[0, 2P)`, for `z < P · 2^32`.
#[inline(always)]
fn redc(z: u64) -> u32 {
    let m = (z as u32).wrapping_mul(P_NEG_INV);
    ((z + m as u64 * P as u64) >> 32) as u32
}

/// Cooley–Tukey butterfly `(x + w·y, x - w·y)` on lazy values: inputs `< 4P`, outputs `< 4P`.
#[inline(always)]
fn ct_butterfly(x: u32, y: u32, w: u32, ws: u32) -> (u32, u32) {
    let u = sub_if_ge(x, TWO_P);
    let v = mul_shoup_lazy(y, w, ws);
    (u + v, u + TWO_P - v)
}

/// Gentleman–Sande butterfly `(x + y, w·(x - y))` on lazy values: inputs `< 2P`, outputs `< 2P`.
#[inline(always)]
fn gs_butterfly(x: u32, y: u32, w: u32, ws: u32) -> (u32, u32) {
    (
        sub_if_ge(x + y, TWO_P),
        mul_shoup_lazy(x + TWO_P - y, w, ws),
    )
}

/// In place: coefficients (each `< 4P`) → evaluations at the odd powers of `ψ`, in the order
/// described in the module documentation, reduced to `[0, P)`.
pub fn forward(a: &mut [u32; N]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return avx2::forward(t, a);
    }
    forward_portable(a)
}

/// In place: the inverse of [`forward`] (evaluations each `< 2P`, e.g. a [`mul_montgomery`]
/// product), giving coefficients reduced to `[0, P)`.
pub fn inverse(a: &mut [u32; N]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return avx2::inverse(t, a);
    }
    inverse_portable(a)
}

/// [`forward`] then [`mul_montgomery`] by `b` (the same words), in one pass fewer on AVX2.
pub fn forward_mul_montgomery(a: &mut [u32; N], b: &[u32; N]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return avx2::forward_mul_montgomery(t, a, b);
    }
    forward_portable(a);
    mul_montgomery_portable(a, b)
}

/// The portable [`forward`]: the textbook transform, then each block transposed.
pub(crate) fn forward_portable(a: &mut [u32; N]) {
    let tw = &TABLES;
    let (mut t, mut m) = (N, 1);
    while m < N {
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
    for x in a.iter_mut() {
        *x = sub_if_ge(sub_if_ge(*x, TWO_P), P);
    }
    transpose_blocks(a);
}

/// The portable [`inverse`]: each block transposed back, then the textbook inverse.
pub(crate) fn inverse_portable(a: &mut [u32; N]) {
    transpose_blocks(a);
    let tw = &TABLES;
    let (mut t, mut m) = (1, N);
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
    for x in a.iter_mut() {
        *x = sub_if_ge(mul_shoup_lazy(*x, N_INV, N_INV_SHOUP), P);
    }
}

/// Transposes every block of 64 values as an 8 × 8 matrix (an involution).
fn transpose_blocks(a: &mut [u32; N]) {
    for block in a.chunks_exact_mut(BLOCK) {
        for r in 0..8 {
            for c in r + 1..8 {
                block.swap(8 * r + c, 8 * c + r);
            }
        }
    }
}

/// Converts residues `< P` into Montgomery form (`x · 2^32 mod P`, reduced), in constant time:
/// the form [`mul_montgomery`] takes its secret operand in.
pub fn to_montgomery(a: &mut [u32; N]) {
    for x in a.iter_mut() {
        *x = sub_if_ge(redc(*x as u64 * R2_MOD_P as u64), P);
    }
}

/// `a[k] ← a[k] · b[k] mod P` in `[0, 2P)` (ready for [`inverse`]), with `a[k] < 4P` and `b` in
/// Montgomery form, `b[k] < P`. Constant time: for a secret `b`.
pub fn mul_montgomery(a: &mut [u32; N], b: &[u32; N]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return avx2::mul_montgomery(t, a, b);
    }
    mul_montgomery_portable(a, b)
}

pub(crate) fn mul_montgomery_portable(a: &mut [u32; N], b: &[u32; N]) {
    for (x, &y) in a.iter_mut().zip(b) {
        *x = redc(*x as u64 * y as u64);
    }
}

/// The centred representative of a residue `x < P` as a two's-complement 64-bit word: `x` if
/// `x ≤ P/2`, else `x - P`. Branch-free.
#[inline(always)]
pub fn centred(x: u32) -> u64 {
    let neg = (((P / 2).wrapping_sub(x) as i32) >> 31) as u32;
    (x as i64 - (P & neg) as i64) as u64
}

/// A ternary value `t - 1` for `t ∈ {0, 1, 2}` as a residue: `P - 1`, `0` or `1`, branch-free.
#[inline(always)]
pub fn ternary_residue(t: u32) -> u32 {
    sub_if_ge(P - 1 + t, P)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::{RngCore, SeedableRng};
    use rand_chacha::ChaCha20Rng;
    use std::boxed::Box;
    use std::vec;
    use std::vec::Vec;

    fn random_poly(rng: &mut ChaCha20Rng, below: u32) -> Box<[u32; N]> {
        let v: Vec<u32> = (0..N).map(|_| rng.next_u32() % below).collect();
        v.into_boxed_slice().try_into().unwrap()
    }

    /// The negacyclic product modulo `P` by the definition, `O(N^2)`.
    fn schoolbook_mod_p(a: &[u32], b: &[u32]) -> Vec<u32> {
        let n = a.len();
        let mut c = vec![0u64; n];
        let p = P as u64;
        for (i, &ai) in a.iter().enumerate() {
            for (j, &bj) in b.iter().enumerate() {
                let prod = ai as u64 * bj as u64 % p;
                let k = i + j;
                if k < n {
                    c[k] = (c[k] + prod) % p;
                } else {
                    c[k - n] = (c[k - n] + p - prod) % p;
                }
            }
        }
        c.into_iter().map(|x| x as u32).collect()
    }

    #[test]
    fn generator_and_root_have_full_order() {
        // P - 1 = 2^14 · 13 · 71^2 (checked here, not assumed).
        let factors = [2u64, 13, 71];
        let mut rest = P as u64 - 1;
        for f in factors {
            while rest.is_multiple_of(f) {
                rest /= f;
            }
        }
        assert_eq!(rest, 1, "P - 1 has another prime factor");
        for f in factors {
            assert_ne!(
                pow_mod(GENERATOR, (P as u64 - 1) / f),
                1,
                "3 is not a generator"
            );
        }
        let psi = TABLES.fwd[N / 2] as u64; // ψ^bitrev(2048) = ψ^1
        assert_eq!(pow_mod(psi, N as u64), P as u64 - 1);
        assert_eq!(pow_mod(psi, 2 * N as u64), 1);
        assert!(P < 1 << 30 && P > 1 << 29 && P as u64 % (2 * N as u64) == 1);
        assert_eq!(mul_mod(N as u64, N_INV as u64), 1);
        assert_eq!(
            LAST_INV_N as u64,
            mul_mod(TABLES.inv[1] as u64, N_INV as u64),
            "the folded last twiddle"
        );
    }

    #[test]
    fn transforms_round_trip_and_multiply_like_schoolbook_mod_p() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        // Inputs up to the documented bound (4P for forward), and the extremes.
        for case in 0..3 {
            let mut a = random_poly(&mut rng, if case == 0 { P } else { 4 * P });
            if case == 2 {
                a.fill(4 * P - 1);
            }
            let reduced: Vec<u32> = a.iter().map(|x| x % P).collect();
            let mut fa = a.clone();
            forward(&mut fa);
            assert!(fa.iter().all(|&x| x < P), "forward output reduced");
            let mut back = fa.clone();
            inverse(&mut back);
            assert_eq!(&back[..], &reduced[..], "round trip");
            let b = random_poly(&mut rng, P);
            let mut fb = b.clone();
            forward(&mut fb);
            to_montgomery(&mut fb);
            mul_montgomery(&mut fa, &fb);
            assert!(fa.iter().all(|&x| x < TWO_P), "product is lazy in [0, 2P)");
            inverse(&mut fa);
            assert_eq!(&fa[..], &schoolbook_mod_p(&reduced, &b[..])[..], "product");
        }
    }

    #[test]
    fn the_vector_transforms_equal_the_portable_ones_word_for_word() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        for _ in 0..20 {
            let a = random_poly(&mut rng, 4 * P);
            let b = random_poly(&mut rng, P);
            let (mut x, mut y) = (a.clone(), a.clone());
            forward(&mut x);
            forward_portable(&mut y);
            assert_eq!(x, y, "forward");
            let (mut x2, mut y2) = (x.clone(), x.clone());
            mul_montgomery(&mut x2, &b);
            mul_montgomery_portable(&mut y2, &b);
            assert_eq!(x2, y2, "pointwise");
            let mut z = a.clone();
            forward_mul_montgomery(&mut z, &b);
            assert_eq!(z, y2, "forward and pointwise in one");
            let lazy: Box<[u32; N]> = a.map(|v| v % TWO_P).into();
            let (mut x3, mut y3) = (lazy.clone(), lazy);
            inverse(&mut x3);
            inverse_portable(&mut y3);
            assert_eq!(x3, y3, "inverse");
        }
    }

    #[test]
    fn montgomery_centring_and_ternary_residues_are_exact_at_the_edges() {
        let mut v = Box::new([0u32; N]);
        let edges = [0, 1, 2, P / 2, P / 2 + 1, P - 2, P - 1];
        v[..edges.len()].copy_from_slice(&edges);
        let orig = v.clone();
        to_montgomery(&mut v);
        let mut one = Box::new([1u32; N]);
        mul_montgomery_portable(&mut one, &v);
        for (k, &x) in orig.iter().enumerate() {
            assert_eq!(sub_if_ge(one[k], P), x);
        }
        assert_eq!(centred(0), 0);
        assert_eq!(centred(P / 2), (P / 2) as u64);
        assert_eq!(centred(P / 2 + 1) as i64, (P / 2 + 1) as i64 - P as i64);
        assert_eq!(centred(P - 1) as i64, -1);
        assert_eq!([0, 1, 2].map(ternary_residue), [P - 1, 0, 1]);
    }
}
