//! The offline phase's check of decrypted terms, before a slot becomes usable: Freivalds' test
//! of `u = r · W (mod 2^32)` with [`OFFLINE_CHECKS`] secret vectors per layer.
//!
//! The terms are known only modulo `2^32` (the carries of `r · W` are lost), so the online test
//! modulo the prime `2^61 - 1` does not apply. Modulo `2^32` a single secret vector `s` misses
//! an error `e ≠ 0` with probability `2^-(32 - v)`, `v` the smallest 2-adic valuation among
//! `e`'s components: a server that adds `2^31` to one result coefficient escapes one vector half
//! the time. With `T = 40` independent vectors it escapes with probability at most `2^-40`, for
//! any error it chooses (the vectors are derived from the client's mask key in their own domain
//! and never leave the device). A slot that passes is checked again when it is used (the online
//! test of the exact products).
//!
//! Layouts: a layer's vectors `s[j][t]` (`out · T` words), its projections
//! `p[i][t] = Σ_j W[j][i] · s[j][t] (mod 2^32)` (`in · T` words), and the accumulators of a batch
//! `acc[t][slot]` (`T · N` words): for every slot, `Σ_j u[slot][j] · s[j][t]` must equal
//! `Σ_i r[slot][i] · p[i][t]`.

use super::N;
use crate::mask::{fill_mask, MaskAddress, MaskDomain, MaskKey};
use crate::model::{LinearId, ModelConfig};

/// Secret vectors per layer (the escape probability is at most `2^-OFFLINE_CHECKS`).
pub const OFFLINE_CHECKS: usize = 40;

/// Words of the projections of every layer: `Σ in · T`.
pub fn projection_words(cfg: &ModelConfig) -> usize {
    cfg.linears().map(|l| l.dims(cfg).0).sum::<usize>() * OFFLINE_CHECKS
}

/// Offset of `linear`'s projections in the whole-model buffer (in `linears()` order).
pub fn projection_offset(cfg: &ModelConfig, linear: LinearId) -> usize {
    cfg.linears()
        .take_while(|&l| l != linear)
        .map(|l| l.dims(cfg).0)
        .sum::<usize>()
        * OFFLINE_CHECKS
}

/// The layer's secret vectors `s[j][t]` (`out_dim · T` words) from the mask key.
pub fn check_vectors(key: &MaskKey, cfg: &ModelConfig, linear: LinearId, s: &mut [u32]) {
    let out_dim = linear.dims(cfg).1;
    assert_eq!(s.len(), out_dim * OFFLINE_CHECKS, "out · T words");
    for (j, row) in s.chunks_exact_mut(OFFLINE_CHECKS).enumerate() {
        let addr = MaskAddress {
            slot: j as u64,
            linear: linear.flat_index(cfg),
            domain: MaskDomain::OfflineCheck,
        };
        fill_mask(key, addr, row);
    }
}

/// `p[i][t] = Σ_j W[j][i] · s[j][t] (mod 2^32)` for one layer with `[out][in]` int8 weights `w`.
pub fn project(w: &[u8], in_dim: usize, s: &[u32], p: &mut [u32]) {
    assert_eq!(p.len(), in_dim * OFFLINE_CHECKS, "in · T words");
    assert_eq!(w.len() / in_dim * OFFLINE_CHECKS, s.len(), "out · T words");
    p.fill(0);
    for (row, sj) in w.chunks_exact(in_dim).zip(s.chunks_exact(OFFLINE_CHECKS)) {
        project_row(row, sj, p);
    }
}

/// `p[i][t] += W[j][i] · s[j][t]` for one weight row `j` (`sj` its `T` vector entries).
pub fn project_row(row: &[u8], sj: &[u32], p: &mut [u32]) {
    for (&wij, pi) in row.iter().zip(p.chunks_exact_mut(OFFLINE_CHECKS)) {
        let wv = wij as i8 as i32 as u32;
        for (a, &x) in pi.iter_mut().zip(sj) {
            *a = a.wrapping_add(wv.wrapping_mul(x));
        }
    }
}

/// `acc[t][k] += Σ_c columns[c][k] · coeffs[c][t] (mod 2^32)` for `g` columns of `N` slot
/// values (mask columns with the projections `p[i][·]` of their inputs, or decrypted term
/// columns with `s[j][·]` of their outputs): `columns` is `g · N` words, `coeffs` `g · T`.
/// Runs on the best kernel for this CPU ([`accumulate_portable`] compiled for AVX2 on x86_64).
pub fn accumulate(acc: &mut [u32], columns: &[u32], coeffs: &[u32]) {
    let g = columns.len() / N;
    assert!(acc.len() == OFFLINE_CHECKS * N && columns.len() == g * N);
    assert_eq!(
        coeffs.len(),
        g * OFFLINE_CHECKS,
        "T coefficients per column"
    );
    #[cfg(target_arch = "x86_64")]
    if let Some(t) = crate::kernels::Avx2::detect() {
        return t.accumulate_checks(acc, columns, coeffs);
    }
    accumulate_portable(acc, columns, coeffs)
}

/// Slots per block of [`accumulate_portable`]: one cache line of each column.
const SLOT_BLOCK: usize = 16;

/// The portable [`accumulate`] (shapes checked there). For each block of 16 slots, the `T`
/// accumulators of those slots (2.5 KiB) stay in L1 while every column's 16 values (one cache
/// line, read once) are multiplied into them: fixed-width array arithmetic that LLVM vectorises
/// to whole registers.
#[inline(always)] // so that the AVX2 build in `kernels::x86` compiles its own copy
pub(crate) fn accumulate_portable(acc: &mut [u32], columns: &[u32], coeffs: &[u32]) {
    let mut block = [[0u32; SLOT_BLOCK]; OFFLINE_CHECKS];
    for k0 in (0..N).step_by(SLOT_BLOCK) {
        for (t, b) in block.iter_mut().enumerate() {
            b.copy_from_slice(&acc[t * N + k0..t * N + k0 + SLOT_BLOCK]);
        }
        for (col, cs) in columns
            .chunks_exact(N)
            .zip(coeffs.chunks_exact(OFFLINE_CHECKS))
        {
            let x: &[u32; SLOT_BLOCK] = col[k0..k0 + SLOT_BLOCK]
                .try_into()
                .expect("a block of slots");
            for (b, &c) in block.iter_mut().zip(cs) {
                for (a, &v) in b.iter_mut().zip(x) {
                    *a = a.wrapping_add(v.wrapping_mul(c));
                }
            }
        }
        for (t, b) in block.iter().enumerate() {
            acc[t * N + k0..t * N + k0 + SLOT_BLOCK].copy_from_slice(b);
        }
    }
}

/// The first of the slots `0..slots` whose two accumulators disagree, if any (in time
/// independent of where).
pub fn first_mismatch(from_masks: &[u32], from_terms: &[u32], slots: usize) -> Option<usize> {
    let mut first = usize::MAX;
    for k in (0..slots).rev() {
        let mut diff = 0u32;
        for t in 0..OFFLINE_CHECKS {
            diff |= from_masks[t * N + k] ^ from_terms[t * N + k];
        }
        // Branch-free select: the accumulators are derived from secrets.
        let bad = ((diff as u64).wrapping_neg() >> 63) as usize;
        first = bad.wrapping_neg() & k | (bad.wrapping_sub(1) & first);
    }
    (first != usize::MAX).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul_u32_i8;
    use std::vec;

    #[test]
    fn the_dispatched_and_portable_accumulations_equal_the_definition() {
        use rand_chacha::rand_core::{RngCore, SeedableRng};
        let mut g = rand_chacha::ChaCha20Rng::seed_from_u64(9);
        let mut words = |n: usize| (0..n).map(|_| g.next_u32()).collect::<vec::Vec<u32>>();
        let cols = 3;
        let (acc, columns, coeffs) = (
            words(OFFLINE_CHECKS * N),
            words(cols * N),
            words(cols * OFFLINE_CHECKS),
        );
        let mut want = acc.clone();
        for t in 0..OFFLINE_CHECKS {
            for k in 0..N {
                for c in 0..cols {
                    let x = columns[c * N + k].wrapping_mul(coeffs[c * OFFLINE_CHECKS + t]);
                    want[t * N + k] = want[t * N + k].wrapping_add(x);
                }
            }
        }
        let (mut a, mut b) = (acc.clone(), acc);
        accumulate(&mut a, &columns, &coeffs);
        accumulate_portable(&mut b, &columns, &coeffs);
        assert!(a == want && b == want);
    }

    #[test]
    fn honest_terms_pass_and_any_single_error_is_caught() {
        let cfg = ModelConfig {
            n_layer: 1,
            n_embd: 8,
            n_head: 2,
            n_positions: 4,
            vocab_size: 10,
            n_inner: 12,
            family: crate::model::Family::Gpt2,
        };
        let linear = LinearId {
            layer: 0,
            kind: crate::model::LinearKind::MlpUp,
        };
        let (i, o) = linear.dims(&cfg);
        let key = MaskKey::from_bytes([6; 32]);
        let w: vec::Vec<u8> = (0..i * o).map(|k| (k * 37 % 255) as u8).collect();
        let mut s = vec![0u32; o * OFFLINE_CHECKS];
        check_vectors(&key, &cfg, linear, &mut s);
        let mut p = vec![0u32; i * OFFLINE_CHECKS];
        project(&w, i, &s, &mut p);
        let slots = 3;
        let r: vec::Vec<u32> = (0..slots * i)
            .map(|k| (k as u32).wrapping_mul(0x9e37_79b9))
            .collect();
        let mut u = vec![0u32; slots * o];
        matmul_u32_i8(&r, &w, i, o, &mut u);
        let run = |u: &[u32]| {
            let (mut am, mut at) = (
                vec![0u32; OFFLINE_CHECKS * N],
                vec![0u32; OFFLINE_CHECKS * N],
            );
            // Mask columns one at a time, term columns all at once: the grouping is free.
            let mut col = vec![0u32; N];
            for ii in 0..i {
                for k in 0..slots {
                    col[k] = r[k * i + ii];
                }
                accumulate(
                    &mut am,
                    &col,
                    &p[ii * OFFLINE_CHECKS..(ii + 1) * OFFLINE_CHECKS],
                );
            }
            let mut cols = vec![0u32; o * N];
            for j in 0..o {
                for k in 0..slots {
                    cols[j * N + k] = u[k * o + j];
                }
            }
            accumulate(&mut at, &cols, &s);
            first_mismatch(&am, &at, slots)
        };
        assert_eq!(run(&u), None);
        // The hardest error for one vector (2^31), and a low one, in each slot and output.
        for (k, j, e) in [
            (0, 0, 1u32 << 31),
            (2, o - 1, 1 << 31),
            (1, 3, 1),
            (2, 5, 12345),
        ] {
            let mut bad = u.clone();
            bad[k * o + j] = bad[k * o + j].wrapping_add(e);
            assert_eq!(run(&bad), Some(k), "slot {k}, output {j}, error {e:#x}");
        }
    }
}
