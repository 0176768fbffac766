//! One offline layer, both sides: the client's mask columns (the messages it encrypts) and the
//! server's steps (keep the input ciphertexts, compute the switched, packed results).

use core::ops::Range;

use super::server::{gemm_i8_u64, mod_switch};
use super::{expand_a, input_from_words, pack_result, ModSwitch, Seed, INPUT_WORDS, N};
use crate::mask::{fill_mask_from, MaskAddress, MaskDomain, MaskKey};
use crate::model::{LinearId, ModelConfig};

/// Input columns drawn per slot at a time by [`mask_columns`]: one ChaCha20 refill of
/// rand_chacha (4 blocks of 16 words), so no keystream is generated twice.
pub const COLUMNS: usize = 64;

/// The messages of input ciphertexts `inputs` (at most [`COLUMNS`]) of `linear` for the batch
/// of slots `slots` (at most `N`), whose mask keys are `keys` (one per slot, in order):
/// `out[c][k] = r[slots.start + k][inputs.start + c]`, the online mask of that slot and input,
/// and 0 for the unused coefficients. `out` holds `inputs.len() · N` words (secret: the caller
/// zeroizes it).
pub fn mask_columns(
    keys: &[MaskKey],
    cfg: &ModelConfig,
    linear: LinearId,
    slots: Range<u64>,
    inputs: Range<usize>,
    out: &mut [u32],
) {
    let (slot0, slots) = (slots.start, (slots.end - slots.start) as usize);
    let (first, cols) = (inputs.start, inputs.len());
    assert!(slots <= N && cols <= COLUMNS && out.len() == cols * N && keys.len() == slots);
    out.fill(0);
    let flat = linear.flat_index(cfg);
    // The words' position in each slot's stream (see `fill_mask_from`).
    let word0 = ((MaskDomain::Input as u128) << 56) | ((flat as u128) << 32) | first as u128;
    let mut k = 0;
    if word0.is_multiple_of(16) {
        // Eight slots at a time, one ChaCha20 block per slot per call, words already side by side.
        let block0 = (word0 / 16) as u64;
        let mut lanes = [[0u32; 8]; 16];
        let mut lane_keys = [[0u8; 32]; 8];
        let mut streams = [0u64; 8];
        while k + 8 <= slots {
            for l in 0..8 {
                lane_keys[l] = *keys[k + l].as_bytes();
                streams[l] = slot0 + (k + l) as u64;
            }
            for b in 0..cols.div_ceil(16) {
                super::chacha20_lanes(&lane_keys, &streams, block0 + b as u64, &mut lanes);
                for (w, words) in lanes.iter().enumerate().take(cols - 16 * b) {
                    let c = 16 * b + w;
                    out[c * N + k..c * N + k + 8].copy_from_slice(words);
                }
            }
            k += 8;
        }
        zeroize::Zeroize::zeroize(&mut lanes);
        zeroize::Zeroize::zeroize(&mut lane_keys);
    }
    // The rest (and any start inside a block) a slot at a time.
    let mut row = [0u32; COLUMNS];
    for (k, key) in keys.iter().enumerate().skip(k) {
        let addr = MaskAddress {
            slot: slot0 + k as u64,
            linear: flat,
            domain: MaskDomain::Input,
        };
        fill_mask_from(key, addr, first, &mut row[..cols]);
        for (c, &r) in row[..cols].iter().enumerate() {
            out[c * N + k] = r;
        }
    }
    zeroize::Zeroize::zeroize(&mut row);
}

/// Words of the server's store for a layer with `in_dim` inputs: `a_i ‖ b_i` per input.
pub const fn store_words(in_dim: usize) -> usize {
    in_dim * 2 * N
}

/// Server: keeps input ciphertexts `first..first + count` (their `b` halves as received, `count`
/// · [`INPUT_WORDS`] words) in `store` ([`store_words`]), with the `a` halves expanded from
/// `seed`.
pub fn absorb_inputs(seed: &Seed, first: usize, count: usize, words: &[u32], store: &mut [u64]) {
    assert_eq!(words.len(), count * INPUT_WORDS, "count input ciphertexts");
    for (k, w) in words.chunks_exact(INPUT_WORDS).enumerate() {
        let i = first + k;
        let (a, b) = store[i * 2 * N..(i + 1) * 2 * N].split_at_mut(N);
        expand_a(seed, i as u64, 0, a);
        input_from_words(w, b);
    }
}

/// Server: result ciphertexts `outputs` of a layer whose `[out][in]` int8 weights are `w`, from
/// the complete `store`: `C_j = Σ_i W[j][i] · C_i`, switched by `switch` and packed into `out`
/// (`outputs.len() ·` [`ModSwitch::result_words`] words). `tmp` holds `outputs.len() · 2N`
/// words.
pub fn results(
    store: &[u64],
    w: &[u8],
    in_dim: usize,
    outputs: Range<usize>,
    switch: ModSwitch,
    tmp: &mut [u64],
    out: &mut [u32],
) {
    let (first, count) = (outputs.start, outputs.len());
    let rw = switch.result_words();
    assert!(tmp.len() == count * 2 * N && out.len() == count * rw);
    let rows = &w[first * in_dim..(first + count) * in_dim];
    gemm_i8_u64(&store[..in_dim * 2 * N], rows, in_dim, count, 2 * N, tmp);
    for (ct, o) in tmp.chunks_exact_mut(2 * N).zip(out.chunks_exact_mut(rw)) {
        let (a, b) = ct.split_at_mut(N);
        mod_switch(a, switch.drop_a);
        mod_switch(b, switch.drop_b);
        pack_result(a, b, switch, o);
    }
}

#[cfg(test)]
mod mask_tests {
    use super::*;
    use crate::model::testutil::RandomModel;
    use crate::model::LinearKind;
    use std::vec;
    use std::vec::Vec;

    /// Every column word is the slot's own online mask (`input_mask` with its key), whether it
    /// came from the eight-lane path or the one-slot path: 21 slots (two groups of eight and five
    /// alone), whole and partial column ranges, a start inside a block.
    #[test]
    fn mask_columns_are_each_slots_online_masks() {
        let m = RandomModel::new(3);
        let linear = LinearId {
            layer: 1,
            kind: LinearKind::MlpDown,
        };
        let in_dim = linear.dims(&m.cfg).0;
        let keys: Vec<MaskKey> = (0..21u8)
            .map(|k| MaskKey::from_bytes([k ^ 0x5a; 32]))
            .collect();
        let slot0 = 1000;
        let mut r = vec![0u32; in_dim];
        for inputs in [
            0..COLUMNS.min(in_dim),
            16..16 + 40.min(in_dim - 16),
            3..3 + 20,
        ] {
            let cols = inputs.len();
            let mut out = vec![0u32; cols * N];
            mask_columns(
                &keys,
                &m.cfg,
                linear,
                slot0..slot0 + 21,
                inputs.clone(),
                &mut out,
            );
            for (k, key) in keys.iter().enumerate() {
                crate::session::input_mask(key, &m.cfg, slot0 + k as u64, linear, &mut r);
                for c in 0..cols {
                    assert_eq!(
                        out[c * N + k],
                        r[inputs.start + c],
                        "slot {k} column {c} {inputs:?}"
                    );
                }
            }
            assert!(out[cols * N - 1] == 0, "unused coefficients stay 0");
        }
    }
}
