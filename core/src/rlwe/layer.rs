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
    let mut row = [0u32; COLUMNS];
    out.fill(0);
    for (k, key) in keys.iter().enumerate() {
        let addr = MaskAddress {
            slot: slot0 + k as u64,
            linear: linear.flat_index(cfg),
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
