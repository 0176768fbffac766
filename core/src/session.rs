//! The private forward pass: [`Forward`] with every linear layer offloaded under a one-time pad.
//!
//! For each pending linear layer the session masks the int8 rows with fresh ChaCha20 words
//! (`m = x_q + r`), hands them to the host to send ([`PrivateForward::outgoing`], typed
//! [`MaskedRows`]: the pad itself has another type and cannot be sent), takes the server's
//! wrapping products `y = m · W` back ([`PrivateForward::reply_mut`]), and recovers the exact
//! products `acc = y − r · W` with the unmasking terms from an [`UnmaskSource`]
//! ([`PrivateForward::prepare_unmask`], which a host calls while the server computes, so the
//! online source's `r · W` overlaps the round trip). The forward pass then continues exactly as in
//! the plaintext reference: same integers, same tokens. The LM head can run on the client instead
//! ([`PrivateForward::set_local_lm_head`]): then it is never offered to the host at all.
//!
//! Slots: each row of a step takes a fresh slot from the source ([`UnmaskSource::reserve`]) before
//! any of its masked words exist; the mask of (slot, layer) is used for exactly one message. The
//! masks of a slot come from that slot's key, which the source hands out
//! ([`UnmaskSource::mask_key`]): one key per session for the online source, and for a pool a key
//! per slot that the pool erases once the slot is taken, so that nothing left on the device after
//! a generation regenerates its masks (forward secrecy).

use crate::kernels::matmul_u32_i8;
use crate::mask::{
    fill_mask, mask_row, unmask_row, MaskAddress, MaskDomain, MaskKey, MaskWords, MaskedRows,
    UnmaskTerms,
};
use crate::model::{
    Forward, ForwardError, LinearId, LinearKind, LinearWeights, ModelConfig, StepState,
};

/// Where the unmasking terms `u = r · W` come from.
pub trait UnmaskSource {
    /// The source's failure (file IO for a pool), readable by a person.
    type Error: core::fmt::Debug + core::fmt::Display;

    /// Reserves `rows` never-used slots and returns the first (slots are consecutive). A source
    /// that persists slots (a pool) must have recorded them as used before returning.
    fn reserve(&mut self, rows: u64) -> Result<u64, Self::Error>;

    /// The key of the masks of `slot`, one of the slots the last [`UnmaskSource::reserve`]
    /// returned. The same slot always gets the same key; a source that keeps one key per session
    /// returns it for every slot, a pool returns the slot's own (see the module comment).
    fn mask_key(&mut self, slot: u64) -> Result<MaskKey, Self::Error>;

    /// Writes `u = r · W_linear` for `rows` consecutive slots from `first_slot` into `out`
    /// (`rows · out_dim` words). `r` holds those rows' masks (`rows · in_dim`), for sources that
    /// compute.
    fn unmask_terms(
        &mut self,
        linear: LinearId,
        first_slot: u64,
        rows: usize,
        r: MaskWords<'_>,
        out: UnmaskTerms<'_>,
    ) -> Result<(), Self::Error>;
}

/// The `online` source: computes `r · W` on the client when needed (as costly as running the layer
/// locally). Slots start at 0 and are kept in memory, so it must be used with a fresh key per
/// session (the key lives only in memory and goes with the source).
#[derive(Debug)]
pub struct OnlineUnmask<'w> {
    weights: LinearWeights<'w>,
    key: MaskKey,
    next_slot: u64,
}

impl<'w> OnlineUnmask<'w> {
    /// A source over the client's copy of the int8 weights, masking every slot with `key` (drawn
    /// fresh for this session by the host).
    pub fn new(weights: LinearWeights<'w>, key: MaskKey) -> Self {
        OnlineUnmask {
            weights,
            key,
            next_slot: 0,
        }
    }
}

impl UnmaskSource for OnlineUnmask<'_> {
    type Error = core::convert::Infallible;

    fn reserve(&mut self, rows: u64) -> Result<u64, Self::Error> {
        let first = self.next_slot;
        self.next_slot += rows;
        Ok(first)
    }

    fn mask_key(&mut self, _slot: u64) -> Result<MaskKey, Self::Error> {
        Ok(self.key.clone())
    }

    fn unmask_terms(
        &mut self,
        linear: LinearId,
        _first_slot: u64,
        rows: usize,
        r: MaskWords<'_>,
        mut out: UnmaskTerms<'_>,
    ) -> Result<(), Self::Error> {
        let (i, o) = linear.dims(self.weights.config());
        matmul_u32_i8(
            &r.expose_secret()[..rows * i],
            self.weights.matrix(linear),
            i,
            o,
            &mut out.words_mut()[..rows * o],
        );
        Ok(())
    }
}

/// The mask words of one slot for one layer.
pub fn input_mask(key: &MaskKey, cfg: &ModelConfig, slot: u64, linear: LinearId, out: &mut [u32]) {
    fill_mask(
        key,
        MaskAddress {
            slot,
            linear: linear.flat_index(cfg),
            domain: MaskDomain::Input,
        },
        out,
    );
}

/// Words of one slot's record in a mask pool: `u` for every linear layer, in
/// [`ModelConfig::linears`] order.
pub fn pool_record_words(cfg: &ModelConfig) -> usize {
    cfg.linears().map(|id| id.dims(cfg).1).sum()
}

/// Offset (in words) of `linear`'s terms inside a slot's pool record.
pub fn pool_record_offset(cfg: &ModelConfig, linear: LinearId) -> usize {
    cfg.linears()
        .take_while(|&id| id != linear)
        .map(|id| id.dims(cfg).1)
        .sum()
}

/// Computes one slot's pool record (`pool_record_words` words). `r` is scratch of at least the
/// widest layer input.
pub fn compute_pool_record(
    key: &MaskKey,
    weights: &LinearWeights<'_>,
    slot: u64,
    r: &mut [u32],
    out: &mut [u32],
) {
    let cfg = *weights.config();
    let mut at = 0;
    for id in cfg.linears() {
        let (i, o) = id.dims(&cfg);
        input_mask(key, &cfg, slot, id, &mut r[..i]);
        matmul_u32_i8(&r[..i], weights.matrix(id), i, o, &mut out[at..at + o]);
        at += o;
    }
}

/// Why a private step failed.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionError<E> {
    /// The forward pass refused.
    Forward(ForwardError),
    /// The unmask source failed.
    Source(E),
    /// A caller buffer is too small.
    BufferTooSmall,
    /// The server's product for this layer failed its Freivalds check: the server (or the
    /// network) altered it. The step is aborted; nothing computed from the reply is kept.
    IntegrityFailure(LinearId),
    /// A reply was offered for a layer whose masked rows were never drawn
    /// ([`PrivateForward::outgoing`] was not called for it): nothing was sent, so there is
    /// nothing to unmask.
    MasksNotDrawn(LinearId),
}

impl<E> From<ForwardError> for SessionError<E> {
    fn from(e: ForwardError) -> Self {
        SessionError::Forward(e)
    }
}

impl<E: core::fmt::Display> core::fmt::Display for SessionError<E> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SessionError::Forward(e) => write!(f, "{e}"),
            SessionError::Source(e) => write!(f, "{e}"),
            SessionError::BufferTooSmall => f.write_str("a caller buffer is too small"),
            SessionError::IntegrityFailure(id) => write!(
                f,
                "the server's reply for {id} failed its integrity check (the result was altered)"
            ),
            SessionError::MasksNotDrawn(id) => write!(
                f,
                "a reply for {id} was offered before its masked rows were drawn"
            ),
        }
    }
}

impl<E: core::fmt::Debug + core::fmt::Display> core::error::Error for SessionError<E> {}

/// Lengths of the buffers of a [`PrivateForward`], in `u32` words each.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionSizes {
    /// Masked input rows (also the masks themselves): `rows · max(d, inner)`.
    pub input_words: usize,
    /// Server products (also the unmasking terms): `max(rows · widest block output, vocab)`
    /// (the widest block output is `max(3d, inner)` for GPT-2, `max(q|k|v, 2·inner)` for the
    /// LLaMA family).
    pub output_words: usize,
}

impl SessionSizes {
    /// Sizes for steps of up to `max_rows` rows with logits for the last row.
    pub fn new(cfg: &ModelConfig, max_rows: usize) -> Self {
        Self::scoring(cfg, max_rows, 1)
    }

    /// Sizes for steps of up to `max_rows` rows with logits for up to `logit_rows` last rows
    /// (speculative decoding's verification steps).
    pub fn scoring(cfg: &ModelConfig, max_rows: usize, logit_rows: usize) -> Self {
        let d = cfg.d();
        let inner = cfg.n_inner as usize;
        let block_out = LinearKind::BLOCK
            .iter()
            .map(|&k| cfg.linear_dims(k).1)
            .max()
            .unwrap_or(0);
        SessionSizes {
            input_words: max_rows * d.max(inner),
            output_words: (max_rows * block_out).max(logit_rows.max(1) * cfg.vocab_size as usize),
        }
    }
}

/// The masked rows of the pending layer, ready to send.
#[derive(Clone, Copy, Debug)]
pub struct Outgoing<'b> {
    /// The layer.
    pub linear: LinearId,
    /// Rows.
    pub rows: usize,
    /// Input width.
    pub in_dim: usize,
    /// Output width (words per row the reply must carry).
    pub out_dim: usize,
    /// `rows · in_dim` masked words: uniform in Z_2^32.
    pub masked: MaskedRows<'b>,
}

/// Freivalds check data of every layer: secret check vectors and weight projections mod p, laid
/// out as [`crate::integrity::offsets`] says.
#[derive(Clone, Copy, Debug)]
pub struct Verifier<'a> {
    /// `check_words(cfg)` elements of F_p.
    pub s: &'a [u64],
    /// `projection_words(cfg)` elements of F_p.
    pub w: &'a [u64],
}

/// A forward pass whose linear layers are computed by someone who sees only masked rows.
#[derive(Debug)]
pub struct PrivateForward<'w, 'a> {
    verifier: Option<Verifier<'a>>,
    fwd: Forward<'w, 'a>,
    masked: &'a mut [u32],
    r: &'a mut [u32],
    y: &'a mut [u32],
    u: &'a mut [u32],
    first_slot: u64,
    /// The pending layer's masks are drawn and its rows masked.
    masked_ready: bool,
    /// The pending layer's unmasking terms are in `u`.
    terms_ready: bool,
    /// Computes the LM head here instead of offloading it.
    local_lm_head: Option<LinearWeights<'w>>,
}

impl<'w, 'a> PrivateForward<'w, 'a> {
    /// Wraps a forward pass (workspace with `LogitRows::Last`) with buffers sized by
    /// [`SessionSizes`]: two of `input_words` (`masked`, `r`), two of `output_words` (`y`, `u`).
    /// The masks' keys come from the source of each step.
    pub fn new<E>(
        fwd: Forward<'w, 'a>,
        masked: &'a mut [u32],
        r: &'a mut [u32],
        y: &'a mut [u32],
        u: &'a mut [u32],
    ) -> Result<Self, SessionError<E>> {
        let s = SessionSizes::scoring(fwd.config(), fwd.max_rows(), fwd.max_logit_rows());
        if masked.len() < s.input_words
            || r.len() < s.input_words
            || y.len() < s.output_words
            || u.len() < s.output_words
        {
            return Err(SessionError::BufferTooSmall);
        }
        Ok(PrivateForward {
            verifier: None,
            fwd,
            masked,
            r,
            y,
            u,
            first_slot: 0,
            masked_ready: false,
            terms_ready: false,
            local_lm_head: None,
        })
    }

    /// Computes the LM head on the client with `weights` (when that is cheaper than unmasking a
    /// vocabulary-wide reply): it is then never offered to the host, and nothing is masked or sent
    /// for it.
    pub fn set_local_lm_head(&mut self, weights: LinearWeights<'w>) {
        self.local_lm_head = Some(weights);
    }

    /// Offloads the LM head again (between steps; see [`PrivateForward::set_local_lm_head`]).
    /// Both placements give the same logits, bit for bit, so a host may switch at any step.
    pub fn offload_lm_head(&mut self) {
        self.local_lm_head = None;
    }

    /// Whether the LM head runs here.
    pub fn lm_head_is_local(&self) -> bool {
        self.local_lm_head.is_some()
    }

    /// Runs the pending layer here when it is the LM head and that is the placement.
    fn settle(&mut self) -> Result<StepState, ForwardError> {
        match (&self.local_lm_head, self.fwd.request()) {
            (Some(w), Some(req)) if req.id.kind == LinearKind::LmHead => {
                self.fwd.complete_locally(w)
            }
            (_, Some(_)) => Ok(StepState::Pending),
            (_, None) => Ok(StepState::Done),
        }
    }

    /// Checks every reply with Freivalds' test before using it (see [`crate::integrity`]).
    pub fn set_verifier<E>(&mut self, v: Verifier<'a>) -> Result<(), SessionError<E>> {
        let cfg = self.fwd.config();
        if v.s.len() < crate::integrity::check_words(cfg)
            || v.w.len() < crate::integrity::projection_words(cfg)
        {
            return Err(SessionError::BufferTooSmall);
        }
        self.verifier = Some(v);
        Ok(())
    }

    /// The wrapped forward pass (position, logits, config).
    pub fn forward(&self) -> &Forward<'w, 'a> {
        &self.fwd
    }

    /// Starts a step feeding `tokens`; reserves one fresh slot per token first.
    pub fn begin<S: UnmaskSource>(
        &mut self,
        tokens: &[u32],
        source: &mut S,
    ) -> Result<(), SessionError<S::Error>> {
        self.begin_scoring(tokens, 1, source)
    }

    /// As [`PrivateForward::begin`], with logits for the last `logit_rows` rows (see
    /// [`Forward::begin_scoring`]). Every row takes a slot, whether its token is kept or not.
    pub fn begin_scoring<S: UnmaskSource>(
        &mut self,
        tokens: &[u32],
        logit_rows: usize,
        source: &mut S,
    ) -> Result<(), SessionError<S::Error>> {
        self.fwd.begin_scoring(tokens, logit_rows)?;
        match source.reserve(tokens.len() as u64) {
            Ok(first) => self.first_slot = first,
            Err(e) => {
                self.fwd.abort_step();
                return Err(SessionError::Source(e));
            }
        }
        self.masked_ready = false;
        self.terms_ready = false;
        Ok(())
    }

    /// Forgets the cache's positions from `len` on (a rejected speculation's tokens); their
    /// slots stay used.
    pub fn truncate(&mut self, len: usize) -> Result<(), ForwardError> {
        self.fwd.truncate(len)
    }

    /// Abandons the step in progress (the slots it reserved stay used).
    pub fn abort_step(&mut self) {
        self.fwd.abort_step();
        self.masked_ready = false;
        self.terms_ready = false;
    }

    /// First slot of the rows of the pending request (the LM head runs on the last rows only).
    fn request_slot(&self, linear: LinearId, rows: usize) -> u64 {
        if linear.kind == LinearKind::LmHead {
            let step_rows = self.fwd.step_rows();
            self.first_slot + (step_rows - rows) as u64
        } else {
            self.first_slot
        }
    }

    /// The masked rows of the pending layer (masks drawn on the first call for that layer, with
    /// the keys `source` gives for the step's slots).
    pub fn outgoing<S: UnmaskSource>(
        &mut self,
        source: &mut S,
    ) -> Result<Outgoing<'_>, SessionError<S::Error>> {
        let req = self
            .fwd
            .request()
            .ok_or(SessionError::Forward(ForwardError::NoPendingRequest))?;
        let (linear, rows, in_dim, out_dim) = (req.id, req.rows, req.in_dim, req.out_dim);
        if !self.masked_ready {
            let cfg = *self.fwd.config();
            let slot0 = self.request_slot(linear, rows);
            for row in 0..rows {
                let slot = slot0 + row as u64;
                let key = source.mask_key(slot).map_err(SessionError::Source)?;
                let span = row * in_dim..(row + 1) * in_dim;
                input_mask(&key, &cfg, slot, linear, &mut self.r[span.clone()]);
                mask_row(
                    &req.input[span.clone()],
                    &self.r[span.clone()],
                    &mut self.masked[span],
                );
            }
            self.masked_ready = true;
        }
        Ok(Outgoing {
            linear,
            rows,
            in_dim,
            out_dim,
            masked: MaskedRows::masked(&self.masked[..rows * in_dim]),
        })
    }

    /// Where the server's products for the pending layer go (`rows · out_dim` words).
    pub fn reply_mut(&mut self) -> Option<&mut [u32]> {
        let req = self.fwd.request()?;
        let n = req.rows * req.out_dim;
        Some(&mut self.y[..n])
    }

    /// The layer waiting to be computed, if any (without drawing its masks).
    pub fn pending(&self) -> Option<LinearId> {
        self.fwd.request().map(|r| r.id)
    }

    /// Fetches or computes the pending layer's unmasking terms `u = r · W` (at most once per
    /// layer). Call it after sending the masked rows and before the reply arrives, so the source's
    /// work (the online source's product, a pool read) overlaps the round trip;
    /// [`PrivateForward::complete`] calls it itself otherwise.
    pub fn prepare_unmask<S: UnmaskSource>(
        &mut self,
        source: &mut S,
    ) -> Result<(), SessionError<S::Error>> {
        let req = self
            .fwd
            .request()
            .ok_or(SessionError::Forward(ForwardError::NoPendingRequest))?;
        let (linear, rows, in_dim, out_dim) = (req.id, req.rows, req.in_dim, req.out_dim);
        if !self.masked_ready {
            return Err(SessionError::MasksNotDrawn(linear));
        }
        if self.terms_ready {
            return Ok(());
        }
        let slot0 = self.request_slot(linear, rows);
        source
            .unmask_terms(
                linear,
                slot0,
                rows,
                MaskWords::new(&self.r[..rows * in_dim]),
                UnmaskTerms::new(&mut self.u[..rows * out_dim]),
            )
            .map_err(SessionError::Source)?;
        self.terms_ready = true;
        Ok(())
    }

    /// Unmasks the reply, checks it (with a verifier), and runs the client's work up to the next
    /// offloaded layer (the LM head runs here first when it is local).
    pub fn complete<S: UnmaskSource>(
        &mut self,
        source: &mut S,
    ) -> Result<StepState, SessionError<S::Error>> {
        self.prepare_unmask(source)?;
        let req = self
            .fwd
            .request()
            .ok_or(SessionError::Forward(ForwardError::NoPendingRequest))?;
        let (linear, in_dim, out_dim) = (req.id, req.in_dim, req.out_dim);
        let n = req.rows * out_dim;
        unmask_row(&self.y[..n], &self.u[..n], self.fwd.reply_mut()?);
        self.masked_ready = false;
        self.terms_ready = false;
        if let Some(v) = self.verifier {
            let cfg = *self.fwd.config();
            let (so, wo) = crate::integrity::offsets(&cfg, linear);
            let ok = match (self.fwd.request(), self.fwd.reply()) {
                (Some(req), Some(acc)) => crate::integrity::verify_rows(
                    req.input,
                    acc,
                    in_dim,
                    out_dim,
                    &v.s[so..so + out_dim],
                    &v.w[wo..wo + in_dim],
                ),
                _ => false,
            };
            if !ok {
                self.fwd.abort_step();
                return Err(SessionError::IntegrityFailure(linear));
            }
        }
        match self.fwd.complete()? {
            StepState::Done => Ok(StepState::Done),
            StepState::Pending => Ok(self.settle()?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testutil::{bufs, forward, greedy_local as generate_local, RandomModel};
    use crate::model::*;
    use std::vec;
    use std::vec::Vec;

    /// A pool held in memory: precomputed records, slots handed out once.
    struct MemPool {
        records: Vec<u32>,
        words: usize,
        next: u64,
        cfg: ModelConfig,
        reserved: Vec<u64>,
        /// One key per slot, as a file pool keeps them.
        keys: Vec<MaskKey>,
    }

    impl UnmaskSource for MemPool {
        type Error = &'static str;
        fn reserve(&mut self, rows: u64) -> Result<u64, Self::Error> {
            let first = self.next;
            if (first + rows) as usize * self.words > self.records.len() {
                return Err("pool exhausted");
            }
            self.next += rows;
            self.reserved.extend(first..first + rows);
            Ok(first)
        }
        fn mask_key(&mut self, slot: u64) -> Result<MaskKey, Self::Error> {
            if !self.reserved.contains(&slot) {
                return Err("key of a slot not reserved");
            }
            self.keys.get(slot as usize).cloned().ok_or("no such slot")
        }
        fn unmask_terms(
            &mut self,
            linear: LinearId,
            first_slot: u64,
            rows: usize,
            _r: MaskWords<'_>,
            mut out: UnmaskTerms<'_>,
        ) -> Result<(), Self::Error> {
            let out = out.words_mut();
            let o = linear.dims(&self.cfg).1;
            let off = pool_record_offset(&self.cfg, linear);
            for row in 0..rows {
                let rec = (first_slot as usize + row) * self.words;
                out[row * o..(row + 1) * o]
                    .copy_from_slice(&self.records[rec + off..rec + off + o]);
            }
            Ok(())
        }
    }

    /// Greedy generation through a "server" that only sees masked rows equals local generation,
    /// with both mask sources; every word the server saw differs from the plaintext int8 row.
    fn generate_private<S: UnmaskSource>(
        m: &RandomModel,
        source: &mut S,
        key: u8,
        prompt: &[u32],
        n: usize,
        seen: &mut Vec<u32>,
    ) -> Vec<u32> {
        generate_tampered(m, source, key, prompt, n, seen, None).unwrap()
    }

    /// As `generate_private`, with Freivalds checks on, and optionally a "server" that flips
    /// `bit` of reply word `word` in its `nth` reply.
    fn generate_tampered<S: UnmaskSource>(
        m: &RandomModel,
        source: &mut S,
        key: u8,
        prompt: &[u32],
        n: usize,
        seen: &mut Vec<u32>,
        tamper: Option<(usize, usize, u32)>,
    ) -> Result<Vec<u32>, SessionError<S::Error>> {
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let mut b = bufs(&m.cfg, prompt.len());
        let (fwd, [masked, r, y, u]) = forward(m, &mut b, prompt.len());
        let key = MaskKey::from_bytes([key; 32]);
        let mut s = vec![0u64; crate::integrity::check_words(&m.cfg)];
        let mut w = vec![0u64; crate::integrity::projection_words(&m.cfg)];
        crate::integrity::fill_check_vectors(&key, &m.cfg, &mut s);
        crate::integrity::fill_projections(&lin, &s, &mut w, &mut vec![0i128; 64]);
        let mut pf = PrivateForward::new::<S::Error>(fwd, masked, r, y, u).unwrap();
        pf.set_verifier::<S::Error>(Verifier { s: &s, w: &w })
            .unwrap();
        let mut out = vec![];
        let mut next: Vec<u32> = prompt.to_vec();
        let mut replies = 0;
        for _ in 0..n {
            pf.begin(&next, source)?;
            loop {
                let o = pf.outgoing(source).unwrap();
                let (linear, rows, i, od) = (o.linear, o.rows, o.in_dim, o.out_dim);
                let sent = o.masked.words().to_vec();
                seen.extend_from_slice(&sent);
                let mut prod = vec![0u32; rows * od];
                matmul_u32_i8(&sent, lin.matrix(linear), i, od, &mut prod);
                if let Some((nth, word, bit)) = tamper {
                    if nth == replies {
                        let k = word % prod.len();
                        prod[k] ^= 1 << bit;
                    }
                }
                replies += 1;
                pf.reply_mut().unwrap().copy_from_slice(&prod);
                if pf.complete(source)? == StepState::Done {
                    break;
                }
            }
            let t = argmax(pf.forward().logits().unwrap());
            out.push(t);
            next = vec![t];
        }
        Ok(out)
    }

    /// Any single flipped bit in any reply is detected and stops the step.
    #[test]
    fn test_tampered_reply_is_detected() {
        let m = RandomModel::new(13);
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let per_token = m.cfg.linear_count();
        for trial in 0..60usize {
            let nth = (trial * 7) % (3 * per_token);
            let tamper = Some((nth, trial * 31, (trial % 32) as u32));
            let mut src = OnlineUnmask::new(lin.clone(), MaskKey::from_bytes([1; 32]));
            let got = generate_tampered(&m, &mut src, 1, &[1, 2], 3, &mut vec![], tamper);
            assert!(
                matches!(got, Err(SessionError::IntegrityFailure(_))),
                "trial {trial}: {got:?}"
            );
        }
    }

    /// A reply offered before the layer's rows were masked is a typed error naming the layer,
    /// not "no pending request" (a layer is pending).
    #[test]
    fn test_complete_before_masking_is_masks_not_drawn() {
        let m = RandomModel::new(5);
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let mut b = bufs(&m.cfg, 1);
        let (fwd, [a, bb, c, d]) = forward(&m, &mut b, 1);
        let mut pf = PrivateForward::new::<core::convert::Infallible>(fwd, a, bb, c, d).unwrap();
        let mut src = OnlineUnmask::new(lin, MaskKey::from_bytes([1; 32]));
        pf.begin(&[3], &mut src).unwrap();
        let qkv = LinearId {
            layer: 0,
            kind: LinearKind::Qkv,
        };
        assert_eq!(pf.complete(&mut src), Err(SessionError::MasksNotDrawn(qkv)));
        assert_eq!(
            pf.prepare_unmask(&mut src),
            Err(SessionError::MasksNotDrawn(qkv))
        );
        assert!(pf.outgoing(&mut src).is_ok());
        assert_eq!(pf.prepare_unmask(&mut src), Ok(()));
    }

    #[test]
    fn test_private_generation_is_bit_identical_to_local() {
        let m = RandomModel::new(11);
        let prompt = [5u32, 9, 14];
        let want = generate_local(&m, &prompt, 6);
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let mut seen = vec![];
        assert_eq!(
            generate_private(
                &m,
                &mut OnlineUnmask::new(lin.clone(), MaskKey::from_bytes([3; 32])),
                3,
                &prompt,
                6,
                &mut seen
            ),
            want
        );
        // Pool: precompute records for 8 slots, each with its own key, then generate from it.
        let words = pool_record_words(&m.cfg);
        let mut records = vec![0u32; 8 * words];
        let mut r = vec![0u32; 64];
        let keys: Vec<MaskKey> = (0..8).map(|s| MaskKey::from_bytes([40 + s; 32])).collect();
        for s in 0..8 {
            compute_pool_record(
                &keys[s as usize],
                &lin,
                s,
                &mut r,
                &mut records[s as usize * words..(s as usize + 1) * words],
            );
        }
        let mut pool = MemPool {
            records,
            words,
            next: 0,
            cfg: m.cfg,
            reserved: vec![],
            keys,
        };
        assert_eq!(
            generate_private(&m, &mut pool, 4, &prompt, 6, &mut seen),
            want
        );
        // Slots were handed out once each: 3 for the prompt, then 1 per decoded token.
        assert_eq!(pool.reserved, (0..8).collect::<Vec<_>>());
        // A ninth token finds the pool exhausted: an error, never a reused slot.
        let mut b = bufs(&m.cfg, 1);
        let (fwd, [a, bb, c, d]) = forward(&m, &mut b, 1);
        let mut pf = PrivateForward::new::<&str>(fwd, a, bb, c, d).unwrap();
        assert_eq!(
            pf.begin(&[1], &mut pool),
            Err(SessionError::Source("pool exhausted"))
        );
    }

    /// With a fresh slot for every row, the differences of two masked rows sent for the same layer
    /// look uniform; reusing a mask would make them the difference of two int8 rows (|·| ≤ 254).
    #[test]
    fn test_no_two_masked_rows_share_a_mask() {
        let m = RandomModel::new(12);
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let mut seen = vec![];
        generate_private(
            &m,
            &mut OnlineUnmask::new(lin, MaskKey::from_bytes([5; 32])),
            5,
            &[1, 2, 3, 4],
            5,
            &mut seen,
        );
        let d = m.cfg.d();
        let rows: Vec<&[u32]> = seen.chunks(d).collect();
        for (i, a) in rows.iter().enumerate() {
            for b in &rows[i + 1..] {
                if a.len() != b.len() {
                    continue;
                }
                let small = a
                    .iter()
                    .zip(b.iter())
                    .filter(|(x, y)| (x.wrapping_sub(**y) as i32).unsigned_abs() <= 254)
                    .count();
                assert!(
                    small < a.len() / 2,
                    "two masked rows differ by an int8 row: a mask was reused"
                );
            }
        }
    }
}
