//! Freivalds checks of the server's products, modulo the prime p = 2^61 − 1 (Slalom, ICLR 2019).
//!
//! For each linear layer the client holds a secret vector `s` (one element of F_p per output,
//! derived from its key) and the projection `w = W · s` (one element per input). A reply is
//! accepted only if, for every row, `Σ_j acc_j · s_j ≡ Σ_i x_i · w_i (mod p)`, where `x` is the
//! client's int8 row and `acc` the unmasked product: O(in + out) work per row instead of
//! O(in · out). The identity holds over the integers for the honest product, so it holds mod p; a
//! product altered by any nonzero error vector passes with probability at most 1/p, since `s` is
//! uniform and unknown to the server. Working mod a 61-bit prime rather than mod 2^32 matters: mod
//! 2^32 an error of 2^31 in one output survives whenever `s_j` is even (probability 1/2).

use crate::mask::{fill_mask, MaskAddress, MaskDomain, MaskKey};
use crate::model::{LinearId, ModelConfig};

/// The Mersenne prime 2^61 − 1.
pub const P: u64 = (1 << 61) - 1;

fn reduce(x: i128) -> u64 {
    x.rem_euclid(P as i128) as u64
}

/// Words of check vectors for the whole model: `Σ out` over every linear layer.
pub fn check_words(cfg: &ModelConfig) -> usize {
    cfg.linears().map(|id| id.dims(cfg).1).sum()
}

/// Words of weight projections for the whole model: `Σ in` over every linear layer.
pub fn projection_words(cfg: &ModelConfig) -> usize {
    cfg.linears().map(|id| id.dims(cfg).0).sum()
}

/// Offsets of `linear`'s check vector and projection inside the whole-model buffers.
pub fn offsets(cfg: &ModelConfig, linear: LinearId) -> (usize, usize) {
    let before = cfg.linears().take_while(|&id| id != linear);
    before.fold((0, 0), |(o, i), id| {
        let (a, b) = id.dims(cfg);
        (o + b, i + a)
    })
}

/// Fills the secret check vectors of every layer (`check_words` elements, each uniform in F_p
/// up to a bias of 2^-61) from the client's key, in their own mask domain.
pub fn fill_check_vectors(key: &MaskKey, cfg: &ModelConfig, s: &mut [u64]) {
    for id in cfg.linears() {
        let (o_off, _) = offsets(cfg, id);
        let out = id.dims(cfg).1;
        fill_layer_check_vector(key, cfg, id, &mut s[o_off..o_off + out]);
    }
}

/// One layer's check vector (`out_dim` elements), as [`fill_check_vectors`] fills it.
pub fn fill_layer_check_vector(key: &MaskKey, cfg: &ModelConfig, id: LinearId, s: &mut [u64]) {
    let mut words = [0u32; 512];
    let out = s.len();
    let mut done = 0;
    let mut block = 0u64;
    while done < out {
        let n = (out - done).min(words.len() / 2);
        // Slot = block index within the layer: the Check domain has its own stream space.
        fill_mask(
            key,
            MaskAddress {
                slot: block,
                linear: id.flat_index(cfg),
                domain: MaskDomain::Check,
            },
            &mut words[..2 * n],
        );
        for k in 0..n {
            let v = ((words[2 * k] as u64) << 32 | words[2 * k + 1] as u64) & P;
            s[done + k] = if v == P { 0 } else { v };
        }
        done += n;
        block += 1;
    }
}

/// `w = W · s (mod p)` for one layer: `w_i = Σ_j W[j][i] · s_j`, weights `[out][in]` int8.
pub fn project_weights(weights: &[u8], in_dim: usize, s: &[u64], w: &mut [i128]) {
    for a in w.iter_mut() {
        *a = 0;
    }
    for (row, &sj) in weights.chunks_exact(in_dim).zip(s) {
        project_row(row, sj, w);
    }
}

/// `w_i += W[j][i] · s_j` for one weight row `j` (for callers that see the weights row by row).
pub fn project_row(row: &[u8], sj: u64, w: &mut [i128]) {
    for (a, &wij) in w.iter_mut().zip(row) {
        *a += (wij as i8 as i128) * sj as i128;
    }
}

/// Reduces projection accumulators into F_p.
pub fn finish_projection(acc: &[i128], out: &mut [u64]) {
    for (o, &a) in out.iter_mut().zip(acc) {
        *o = reduce(a);
    }
}

/// Projects every layer's weights onto its check vector: fills `w` (`projection_words`) from `s`
/// (`check_words`). `scratch` holds at least the widest layer input. Costs one pass over the
/// weights (as much as one token computed locally): done once per key, at start-up or while
/// precomputing a pool.
pub fn fill_projections(
    weights: &crate::model::LinearWeights<'_>,
    s: &[u64],
    w: &mut [u64],
    scratch: &mut [i128],
) {
    let cfg = *weights.config();
    for id in cfg.linears() {
        let (i, o) = id.dims(&cfg);
        let (so, wo) = offsets(&cfg, id);
        project_weights(weights.matrix(id), i, &s[so..so + o], &mut scratch[..i]);
        finish_projection(&scratch[..i], &mut w[wo..wo + i]);
    }
}

/// Checks `rows` rows of one layer's product: `x` int8 inputs (`rows · in`), `acc` unmasked
/// products (`rows · out`), the layer's check vector `s` (`out`) and projection `w` (`in`).
pub fn verify_rows(
    x: &[i8],
    acc: &[i32],
    in_dim: usize,
    out_dim: usize,
    s: &[u64],
    w: &[u64],
) -> bool {
    x.chunks_exact(in_dim)
        .zip(acc.chunks_exact(out_dim))
        .all(|(xr, ar)| {
            // |acc| < 2^31, s < 2^61, out < 2^17: the sums stay far inside i128.
            let lhs: i128 = ar
                .iter()
                .zip(s)
                .map(|(&a, &sj)| a as i128 * sj as i128)
                .sum();
            let rhs: i128 = xr
                .iter()
                .zip(w)
                .map(|(&xi, &wi)| xi as i128 * wi as i128)
                .sum();
            reduce(lhs) == reduce(rhs)
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::matmul_i8_i8;
    use std::vec;
    use std::vec::Vec;

    fn setup(in_dim: usize, out_dim: usize, seed: u64) -> (Vec<u8>, Vec<i8>, Vec<u64>, Vec<u64>) {
        let mut st = seed;
        let mut next = || {
            st = st
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (st >> 33) as u32
        };
        let w: Vec<u8> = (0..in_dim * out_dim)
            .map(|_| ((next() % 255) as i32 - 127) as i8 as u8)
            .collect();
        let x: Vec<i8> = (0..2 * in_dim)
            .map(|_| ((next() % 255) as i32 - 127) as i8)
            .collect();
        let s: Vec<u64> = (0..out_dim)
            .map(|_| ((next() as u64) << 29 ^ next() as u64) % P)
            .collect();
        let mut acc = vec![0i128; in_dim];
        project_weights(&w, in_dim, &s, &mut acc);
        let mut proj = vec![0u64; in_dim];
        finish_projection(&acc, &mut proj);
        (w, x, s, proj)
    }

    #[test]
    fn test_honest_product_passes_every_altered_one_fails() {
        let (i, o) = (96, 40);
        let (w, x, s, proj) = setup(i, o, 5);
        let mut acc = vec![0i32; 2 * o];
        matmul_i8_i8(&x, &w, i, o, &mut acc);
        assert!(verify_rows(&x, &acc, i, o, &s, &proj));
        // Every single-bit flip of every output word is caught (mod 2^32 a flip of bit 31 would
        // survive half the time; mod p it never does here).
        for j in 0..acc.len() {
            for bit in 0..32 {
                let mut bad = acc.clone();
                bad[j] ^= 1 << bit;
                assert!(
                    !verify_rows(&x, &bad, i, o, &s, &proj),
                    "flip of bit {bit} in word {j} passed"
                );
            }
        }
    }

    #[test]
    fn test_check_vectors_are_in_field_and_differ_per_layer() {
        let cfg = ModelConfig {
            n_layer: 2,
            n_embd: 16,
            n_head: 2,
            n_positions: 8,
            vocab_size: 50,
            n_inner: 64,
            family: crate::model::Family::Gpt2,
        };
        let mut s = vec![0u64; check_words(&cfg)];
        fill_check_vectors(&MaskKey::from_bytes([3; 32]), &cfg, &mut s);
        assert!(s.iter().all(|&v| v < P));
        let (a, _) = offsets(
            &cfg,
            LinearId {
                layer: 0,
                kind: crate::model::LinearKind::Qkv,
            },
        );
        let (b, _) = offsets(
            &cfg,
            LinearId {
                layer: 1,
                kind: crate::model::LinearKind::Qkv,
            },
        );
        assert_ne!(&s[a..a + 16], &s[b..b + 16]);
    }
}
