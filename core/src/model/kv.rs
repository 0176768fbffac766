//! The client's KV cache: keys and values of every past position, 16-bit block floating point with
//! one shift per (layer, position, KV head).
//!
//! With grouped-query attention (the LLaMA family) only the `n_kv_head` key/value heads are
//! stored, so the cache is `n_head / n_kv_head` times smaller than the queries' width would need.
//!
//! i16 with a per-head shift keeps 15 significant bits of every head's vector (the attention
//! scores' error stays far below the int8 activation error), at half the memory of i32.

use super::config::ModelConfig;
use super::forward::ForwardError;
use crate::quant::BlockI16;

/// Buffer lengths a [`KvCache`] needs, for each of K and V.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvSizes {
    /// `i16` values: `n_layer · capacity · kv_dim` (`kv_dim = n_kv_head · head_dim`, `d` for GPT-2).
    pub values: usize,
    /// `u8` shifts: `n_layer · capacity · n_kv_head`.
    pub shifts: usize,
}

impl KvSizes {
    /// Sizes for `capacity` positions (at most `n_positions`).
    pub fn new(cfg: &ModelConfig, capacity: usize) -> Self {
        KvSizes {
            values: cfg.n_layer as usize * capacity * cfg.kv_dim(),
            shifts: cfg.n_layer as usize * capacity * cfg.n_kv_head(),
        }
    }

    /// Total bytes of K and V together.
    pub fn bytes(&self) -> usize {
        2 * (self.values * 2 + self.shifts)
    }
}

/// Keys and values of past positions, in caller-provided buffers.
#[derive(Debug)]
pub struct KvCache<'a> {
    k: &'a mut [i16],
    v: &'a mut [i16],
    k_shift: &'a mut [u8],
    v_shift: &'a mut [u8],
    capacity: usize,
    /// Width of one position's keys: `n_kv_head · head_dim`.
    d: usize,
    /// KV heads.
    n_head: usize,
    len: usize,
}

impl<'a> KvCache<'a> {
    /// A cache of `capacity` positions over the given buffers (sized by [`KvSizes::new`]).
    pub fn new(
        cfg: &ModelConfig,
        capacity: usize,
        k: &'a mut [i16],
        v: &'a mut [i16],
        k_shift: &'a mut [u8],
        v_shift: &'a mut [u8],
    ) -> Result<Self, ForwardError> {
        let sizes = KvSizes::new(cfg, capacity);
        if capacity > cfg.n_positions as usize
            || k.len() < sizes.values
            || v.len() < sizes.values
            || k_shift.len() < sizes.shifts
            || v_shift.len() < sizes.shifts
        {
            return Err(ForwardError::BufferTooSmall);
        }
        Ok(KvCache {
            k,
            v,
            k_shift,
            v_shift,
            capacity,
            d: cfg.kv_dim(),
            n_head: cfg.n_kv_head(),
            len: 0,
        })
    }

    /// Positions stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no position is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Maximum positions.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position (a new sequence).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.capacity);
        self.len = len;
    }

    fn base(&self, layer: usize, pos: usize) -> usize {
        (layer * self.capacity + pos) * self.d
    }

    /// Stores the key and value rows (Q16.16, `kv_dim` each) of `pos` in `layer`.
    pub(crate) fn store(&mut self, layer: usize, pos: usize, k_row: &[i32], v_row: &[i32]) {
        let dh = self.d / self.n_head;
        let base = self.base(layer, pos);
        let sbase = (layer * self.capacity + pos) * self.n_head;
        for h in 0..self.n_head {
            let r = base + h * dh..base + (h + 1) * dh;
            self.k_shift[sbase + h] =
                BlockI16::encode(&k_row[h * dh..(h + 1) * dh], &mut self.k[r.clone()]);
            self.v_shift[sbase + h] =
                BlockI16::encode(&v_row[h * dh..(h + 1) * dh], &mut self.v[r]);
        }
    }

    /// Width of one position's row of keys (or values): the stride of [`KvCache::head_keys`].
    #[inline]
    pub(crate) fn row_stride(&self) -> usize {
        self.d
    }

    /// Keys of KV head `head` in `layer` for positions `0..n`: position `t` at
    /// `[t · kv_dim..][..head_dim]` (the stride is `kv_dim`, the rows of the other heads lie
    /// between).
    #[inline]
    pub(crate) fn head_keys(&self, layer: usize, head: usize, n: usize) -> &[i16] {
        self.head_rows(self.k, layer, head, n)
    }

    /// Values of `head` in `layer` for positions `0..n`, laid out as [`KvCache::head_keys`].
    #[inline]
    pub(crate) fn head_values(&self, layer: usize, head: usize, n: usize) -> &[i16] {
        self.head_rows(self.v, layer, head, n)
    }

    fn head_rows<'s>(&self, all: &'s [i16], layer: usize, head: usize, n: usize) -> &'s [i16] {
        let dh = self.d / self.n_head;
        let b = self.base(layer, 0) + head * dh;
        if n == 0 {
            return &all[b..b];
        }
        &all[b..self.base(layer, n - 1) + head * dh + dh]
    }

    /// The shift of the key of `head` at `pos` in `layer`.
    #[inline]
    pub(crate) fn key_shift(&self, layer: usize, pos: usize, head: usize) -> u8 {
        self.k_shift[(layer * self.capacity + pos) * self.n_head + head]
    }

    /// The shift of the value of `head` at `pos` in `layer`.
    #[inline]
    pub(crate) fn value_shift(&self, layer: usize, pos: usize, head: usize) -> u8 {
        self.v_shift[(layer * self.capacity + pos) * self.n_head + head]
    }
}
