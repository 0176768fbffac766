//! Additive shares in Z_2^32 and the ChaCha20 mask streams.
//!
//! A row `x_q` (int8) leaves the client only as `m = x_q + r (mod 2^32)` with `r` uniform over
//! Z_2^32: a one-time pad, so `m` is uniform whatever `x_q` is. Every mask is addressed by
//! `(slot, linear layer, domain)`; a slot is one row's worth of masks for every layer, used once.
//! The host decides slots (a counter that only moves forward, persisted for mask pools): the core
//! never reuses an address by itself, and the address → mask map is a pure function of the key.

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use zeroize::{Zeroize, ZeroizeOnDrop};

/// The client's 256-bit mask secret. Zeroized on drop; never leaves the client.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MaskKey([u8; 32]);

impl MaskKey {
    /// Wraps key bytes drawn by the host from a cryptographic RNG (or read from a pool file).
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        MaskKey(bytes)
    }

    /// The key bytes, for persisting into a pool file.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl core::fmt::Debug for MaskKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("MaskKey(<secret>)")
    }
}

/// Masked input rows `m = x_q + r (mod 2^32)`: uniform in Z_2^32 whatever the rows are, the only
/// form in which a row leaves the client. Only [`crate::session::PrivateForward`] makes them from
/// real rows; the wire takes nothing else, so the pad [`MaskWords`] cannot be sent by mistake.
#[derive(Clone, Copy, Debug)]
pub struct MaskedRows<'a>(&'a [u32]);

impl<'a> MaskedRows<'a> {
    /// Rows masked by [`mask_row`].
    pub(crate) fn masked(words: &'a [u32]) -> Self {
        MaskedRows(words)
    }

    /// Words that are uniformly random already and hide nothing (benchmarks and protocol tests
    /// that send random rows). Never wrap a mask or a plaintext row with this.
    pub fn from_random_words(words: &'a [u32]) -> Self {
        MaskedRows(words)
    }

    /// The masked words.
    pub fn words(&self) -> &'a [u32] {
        self.0
    }
}

/// The pad `r` of some rows: secret, never sent (there is no conversion to [`MaskedRows`]). Used
/// by unmasking sources that compute `r · W`.
#[derive(Clone, Copy)]
pub struct MaskWords<'a>(&'a [u32]);

impl<'a> MaskWords<'a> {
    pub(crate) fn new(words: &'a [u32]) -> Self {
        MaskWords(words)
    }

    /// The secret words, to compute with (never to send).
    pub fn expose_secret(&self) -> &'a [u32] {
        self.0
    }
}

impl core::fmt::Debug for MaskWords<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "MaskWords(<{} secret words>)", self.0.len())
    }
}

/// Where an unmasking source writes the terms `u = r · W` of some rows (secret like the masks:
/// with `y`, they reveal the product).
pub struct UnmaskTerms<'a>(&'a mut [u32]);

impl<'a> UnmaskTerms<'a> {
    pub(crate) fn new(words: &'a mut [u32]) -> Self {
        UnmaskTerms(words)
    }

    /// The words to fill.
    pub fn words_mut(&mut self) -> &mut [u32] {
        self.0
    }
}

impl core::fmt::Debug for UnmaskTerms<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "UnmaskTerms(<{} secret words>)", self.0.len())
    }
}

/// What a stream of mask words is for; distinct domains never share a word.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum MaskDomain {
    /// The one-time pad `r` added to an offloaded input row.
    Input = 0,
    /// Secret vectors for integrity checks of replies.
    Check = 1,
    /// Secret vectors for the offline phase's check of decrypted terms (mod 2^32).
    OfflineCheck = 2,
}

/// Where a mask lives in the key's stream space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaskAddress {
    /// The row's slot: one per offloaded row, never reused under one key.
    pub slot: u64,
    /// Flat index of the linear layer ([`crate::model::LinearId::flat_index`]).
    pub linear: u32,
    /// The domain of use.
    pub domain: MaskDomain,
}

/// Fills `out` with the mask words at `addr`: uniform u32 from ChaCha20 keyed by `key`, stream
/// `slot`, starting at a word position unique to `(domain, linear)`.
pub fn fill_mask(key: &MaskKey, addr: MaskAddress, out: &mut [u32]) {
    fill_mask_from(key, addr, 0, out);
}

/// Fills `out` with the mask words at `addr` from word `first` on: `fill_mask`'s words
/// `first..first + out.len()` (the offline phase draws a few inputs of many slots at a time).
pub fn fill_mask_from(key: &MaskKey, addr: MaskAddress, first: usize, out: &mut [u32]) {
    let mut rng = ChaCha20Rng::from_seed(key.0);
    rng.set_stream(addr.slot);
    // 2^32 words per (domain, linear): far more than any layer's width.
    let word = ((addr.domain as u128) << 56) | ((addr.linear as u128) << 32);
    rng.set_word_pos(word + first as u128);
    for o in out {
        *o = rng.next_u32();
    }
}

/// `m = x_q + r (mod 2^32)`, the masked row sent to the server.
pub fn mask_row(x_q: &[i8], r: &[u32], out: &mut [u32]) {
    debug_assert!(x_q.len() == r.len() && r.len() == out.len());
    for ((o, &x), &r) in out.iter_mut().zip(x_q).zip(r) {
        *o = (x as i32 as u32).wrapping_add(r);
    }
}

/// `acc = y − u (mod 2^32)` read as `i32`: the exact int8 product from a masked reply `y` and the
/// unmasking term `u = r · W`.
pub fn unmask_row(y: &[u32], u: &[u32], acc: &mut [i32]) {
    debug_assert!(y.len() == u.len() && u.len() == acc.len());
    for ((a, &y), &u) in acc.iter_mut().zip(y).zip(u) {
        *a = y.wrapping_sub(u) as i32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> MaskKey {
        MaskKey::from_bytes([b; 32])
    }

    #[test]
    fn test_a_mask_drawn_from_an_offset_is_the_same_words() {
        let addr = MaskAddress {
            slot: 9,
            linear: 4,
            domain: MaskDomain::Input,
        };
        let mut whole = [0u32; 200];
        fill_mask(&key(3), addr, &mut whole);
        for first in [0, 1, 15, 16, 64, 150] {
            let mut part = [0u32; 50];
            fill_mask_from(&key(3), addr, first, &mut part);
            assert_eq!(part[..], whole[first..first + 50], "from {first}");
        }
    }

    #[test]
    fn test_mask_is_deterministic_per_address() {
        let a = MaskAddress {
            slot: 3,
            linear: 7,
            domain: MaskDomain::Input,
        };
        let (mut x, mut y) = ([0u32; 64], [0u32; 64]);
        fill_mask(&key(1), a, &mut x);
        fill_mask(&key(1), a, &mut y);
        assert_eq!(x, y);
    }

    #[test]
    fn test_distinct_addresses_give_unrelated_masks() {
        let base = MaskAddress {
            slot: 3,
            linear: 7,
            domain: MaskDomain::Input,
        };
        let others = [
            MaskAddress { slot: 4, ..base },
            MaskAddress { linear: 8, ..base },
            MaskAddress {
                domain: MaskDomain::Check,
                ..base
            },
        ];
        let mut x = [0u32; 256];
        fill_mask(&key(1), base, &mut x);
        for o in others {
            let mut y = [0u32; 256];
            fill_mask(&key(1), o, &mut y);
            let same = x.iter().zip(&y).filter(|(a, b)| a == b).count();
            assert!(same <= 1, "{o:?} shares {same} words with {base:?}");
        }
        let mut z = [0u32; 256];
        fill_mask(&key(2), base, &mut z);
        assert!(x.iter().zip(&z).filter(|(a, b)| a == b).count() <= 1);
    }

    #[test]
    fn test_mask_unmask_roundtrip() {
        let x = [-127i8, -1, 0, 1, 127];
        let mut r = [0u32; 5];
        fill_mask(
            &key(9),
            MaskAddress {
                slot: 0,
                linear: 0,
                domain: MaskDomain::Input,
            },
            &mut r,
        );
        let mut m = [0u32; 5];
        mask_row(&x, &r, &mut m);
        let mut back = [0i32; 5];
        unmask_row(&m, &r, &mut back);
        assert_eq!(back, [-127, -1, 0, 1, 127]);
    }
}
