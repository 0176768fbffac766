//! The sans-IO forward pass.
//!
//! [`Forward`] runs GPT-2 or a LLaMA-family model in integers over caller-provided buffers and stops at every linear layer:
//! it exposes the int8 input rows ([`Forward::request`]) and waits for the exact int32 products
//! `acc = x_q · W_q` ([`Forward::reply_mut`], then [`Forward::complete`]). Who computes them is
//! the host's business: a local kernel (the plaintext reference), or a blind server plus unmasking
//! (the secure path). Both feed the same integers, so both produce the same tokens bit for bit.
//!
//! One step feeds `rows` new tokens (a prefill chunk or one decode token) through every block:
//! `ln_1 → c_attn → attention over the KV cache → attn.c_proj → residual → ln_2 → c_fc → GELU →
//! mlp.c_proj → residual`, then `ln_f → LM head` for the last row (or every row, for evaluation).
//!
//! The LLaMA family runs the same schedule, the same five offloaded layers per pass, with its own
//! non-linear parts chosen by [`super::config::Family`]: RMSNorm for both norms, rotary position
//! embeddings applied to the queries and keys of the fused q|k|v reply (no position table),
//! grouped-query attention (query head `h` reads KV head `h / (n_head / n_kv_head)`), and
//! `SiLU(gate) · up` over the fused gate|up reply before `down_proj`.

use super::config::{LinearId, LinearKind, ModelConfig};
use super::format::{ClientWeights, LinearWeights};
use super::kv::KvCache;
use crate::fixed::{isqrt_u128, round_shift_i128, round_shift_i64, saturate_i32};
use crate::kernels::{self, matmul_i8_i8};
use crate::nonlinear::{gelu, layer_norm, rms_norm, softmax, swiglu};
use crate::quant::{quantize_row, rescale, ActScale, BlockI16};
use crate::rope::{rotate_head, trig_row};

/// Largest attention head width supported (stack buffers of this many `i16` and `i32` per head).
pub const MAX_HEAD_DIM: usize = 256;

/// Why a forward step cannot proceed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardError {
    /// A caller buffer is smaller than the sizes functions ask for.
    BufferTooSmall,
    /// More rows in one step than the workspace was sized for.
    TooManyRows,
    /// A step with no tokens.
    NoTokens,
    /// The sequence would exceed the KV cache capacity.
    ContextFull,
    /// A token id outside the vocabulary.
    TokenOutOfRange(u32),
    /// `complete` or `reply_mut` was called with no linear layer pending.
    NoPendingRequest,
    /// A step was begun while another was still in progress.
    StepInProgress,
    /// The head width exceeds [`MAX_HEAD_DIM`].
    HeadTooWide,
}

impl core::fmt::Display for ForwardError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ForwardError::BufferTooSmall => f.write_str("a caller buffer is too small"),
            ForwardError::TooManyRows => f.write_str("more rows than the workspace holds"),
            ForwardError::NoTokens => f.write_str("a step needs at least one token"),
            ForwardError::ContextFull => f.write_str("the context window is full"),
            ForwardError::TokenOutOfRange(t) => write!(f, "token id {t} is outside the vocabulary"),
            ForwardError::NoPendingRequest => f.write_str("no linear layer is pending"),
            ForwardError::StepInProgress => f.write_str("a step is already in progress"),
            ForwardError::HeadTooWide => f.write_str("attention heads wider than supported"),
        }
    }
}

impl core::error::Error for ForwardError {}

/// Which rows get logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogitRows {
    /// Only the last row of each step (generation).
    Last,
    /// Every row (evaluation, perplexity).
    All,
    /// The last row by default; a step begun with [`Forward::begin_scoring`] gets them for up to
    /// this many last rows (speculative decoding checks every drafted token in one step).
    UpTo(usize),
}

impl LogitRows {
    /// Most logit rows a step of `rows` rows can have.
    fn capacity(self, rows: usize) -> usize {
        match self {
            LogitRows::Last => 1,
            LogitRows::All => rows,
            LogitRows::UpTo(n) => n.clamp(1, rows.max(1)),
        }
    }
}

/// Buffer lengths a [`Workspace`] needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WorkspaceSizes {
    /// Rows per step.
    pub max_rows: usize,
    /// Which rows get logits.
    pub logit_rows: LogitRows,
    /// Length of the `i32` arena.
    pub i32_len: usize,
    /// Length of the `i8` arena.
    pub i8_len: usize,
    /// KV capacity the score buffers are sized for.
    pub capacity: usize,
}

impl WorkspaceSizes {
    /// Sizes for steps of up to `max_rows` rows over `capacity` positions.
    pub fn new(cfg: &ModelConfig, max_rows: usize, logit_rows: LogitRows, capacity: usize) -> Self {
        let p = Parts::new(cfg, max_rows, logit_rows, capacity);
        WorkspaceSizes {
            max_rows,
            logit_rows,
            i32_len: p.total_i32(),
            i8_len: p.act_q,
            capacity,
        }
    }

    /// Total bytes.
    pub fn bytes(&self) -> usize {
        4 * self.i32_len + self.i8_len
    }
}

#[derive(Clone, Copy)]
struct Parts {
    resid: usize,
    norm: usize,
    hidden: usize,
    reply: usize,
    scale: usize,
    scores: usize,
    probs: usize,
    trig: usize,
    act_q: usize,
}

impl Parts {
    fn new(cfg: &ModelConfig, rows: usize, logit_rows: LogitRows, capacity: usize) -> Self {
        let d = cfg.d();
        let inner = cfg.n_inner as usize;
        // The widest reply of a block: fused q|k|v or the MLP's up (GPT-2: 3d or inner).
        let widest = cfg
            .linear_dims(LinearKind::Qkv)
            .1
            .max(cfg.linear_dims(LinearKind::MlpUp).1);
        let lm_rows = logit_rows.capacity(rows);
        Parts {
            resid: rows * d,
            norm: rows * d.max(inner),
            hidden: rows * widest,
            reply: (rows * widest).max(lm_rows * cfg.vocab_size as usize),
            scale: rows,
            scores: capacity,
            probs: capacity,
            // RoPE's cosines and sines of each row's position (none for GPT-2).
            trig: if cfg.is_llama() {
                rows * cfg.head_dim()
            } else {
                0
            },
            act_q: rows * d.max(inner),
        }
    }
    fn total_i32(&self) -> usize {
        self.resid
            + self.norm
            + self.hidden
            + self.reply
            + self.scale
            + self.scores
            + self.probs
            + self.trig
    }
}

/// Scratch buffers of a forward pass, carved from two caller-provided arenas.
#[derive(Debug)]
pub struct Workspace<'a> {
    resid: &'a mut [i32],
    norm: &'a mut [i32],
    hidden: &'a mut [i32],
    reply: &'a mut [i32],
    scale: &'a mut [i32],
    scores: &'a mut [i32],
    probs: &'a mut [i32],
    trig: &'a mut [i32],
    act_q: &'a mut [i8],
    sizes: WorkspaceSizes,
}

impl<'a> Workspace<'a> {
    /// Splits the arenas (at least `sizes.i32_len` and `sizes.i8_len` long).
    pub fn new(
        cfg: &ModelConfig,
        sizes: WorkspaceSizes,
        i32s: &'a mut [i32],
        i8s: &'a mut [i8],
    ) -> Result<Self, ForwardError> {
        if i32s.len() < sizes.i32_len || i8s.len() < sizes.i8_len {
            return Err(ForwardError::BufferTooSmall);
        }
        let p = Parts::new(cfg, sizes.max_rows, sizes.logit_rows, sizes.capacity);
        let (resid, rest) = i32s.split_at_mut(p.resid);
        let (norm, rest) = rest.split_at_mut(p.norm);
        let (hidden, rest) = rest.split_at_mut(p.hidden);
        let (reply, rest) = rest.split_at_mut(p.reply);
        let (scale, rest) = rest.split_at_mut(p.scale);
        let (scores, rest) = rest.split_at_mut(p.scores);
        let (probs, rest) = rest.split_at_mut(p.probs);
        let (trig, _) = rest.split_at_mut(p.trig);
        let (act_q, _) = i8s.split_at_mut(p.act_q);
        Ok(Workspace {
            resid,
            norm,
            hidden,
            reply,
            scale,
            scores,
            probs,
            trig,
            act_q,
            sizes,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Idle,
    Linear(LinearId),
    Done,
}

/// Where a step stands after [`Forward::complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepState {
    /// Another linear layer is pending: see [`Forward::request`].
    Pending,
    /// The step is finished: logits are in [`Forward::logits`].
    Done,
}

/// A linear layer the forward pass needs computed: `acc[r][j] = Σ_i input[r][i] · W[j][i]`.
#[derive(Clone, Copy, Debug)]
pub struct LinearRequest<'b> {
    /// Which layer.
    pub id: LinearId,
    /// Input rows.
    pub rows: usize,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
    /// `rows · in_dim` int8 inputs, row-major.
    pub input: &'b [i8],
}

/// The integer GPT-2 forward pass as a state machine (see the module docs).
#[derive(Debug)]
pub struct Forward<'w, 'a> {
    weights: ClientWeights<'w>,
    ws: Workspace<'a>,
    kv: KvCache<'a>,
    cfg: ModelConfig,
    stage: Stage,
    rows: usize,
    /// Rows of the step in progress that get logits (its last ones).
    lm_rows: usize,
    pos0: usize,
    inv_sqrt_dh_q31: i64,
    /// RoPE's frequencies (the first `head_dim / 2`; unused by GPT-2), computed once from the
    /// client file's header.
    inv_freq: [f64; MAX_HEAD_DIM / 2],
}

impl<'w, 'a> Forward<'w, 'a> {
    /// A forward pass over `weights` with scratch `ws` and cache `kv` (both sized for its config).
    pub fn new(
        weights: ClientWeights<'w>,
        ws: Workspace<'a>,
        kv: KvCache<'a>,
    ) -> Result<Self, ForwardError> {
        let cfg = *weights.config();
        let dh = cfg.head_dim();
        if dh > MAX_HEAD_DIM {
            return Err(ForwardError::HeadTooWide);
        }
        if ws.sizes.capacity < kv.capacity() {
            return Err(ForwardError::BufferTooSmall);
        }
        // 1/sqrt(dh) in Q31, exact to one unit.
        let inv_sqrt_dh_q31 = isqrt_u128((1u128 << 62) / dh as u128) as i64;
        let mut inv_freq = [0f64; MAX_HEAD_DIM / 2];
        if cfg.is_llama() {
            weights.header().rope.inv_freq(dh, &mut inv_freq);
        }
        Ok(Forward {
            weights,
            ws,
            kv,
            cfg,
            stage: Stage::Idle,
            rows: 0,
            lm_rows: 1,
            pos0: 0,
            inv_sqrt_dh_q31,
            inv_freq,
        })
    }

    /// The model configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Positions in the KV cache (tokens consumed so far).
    pub fn position(&self) -> usize {
        self.kv.len()
    }

    /// Maximum positions.
    pub fn capacity(&self) -> usize {
        self.kv.capacity()
    }

    /// Rows of the step in progress.
    pub fn step_rows(&self) -> usize {
        self.rows
    }

    /// Rows per step this workspace holds.
    pub fn max_rows(&self) -> usize {
        self.ws.sizes.max_rows
    }

    /// Most rows a step's logits can cover (see [`LogitRows`]).
    pub fn max_logit_rows(&self) -> usize {
        self.ws.sizes.logit_rows.capacity(self.ws.sizes.max_rows)
    }

    /// Forgets the sequence and any step in progress.
    pub fn reset(&mut self) {
        self.kv.clear();
        self.stage = Stage::Idle;
    }

    /// Abandons a step in progress; the cache keeps the positions of completed steps only.
    pub fn abort_step(&mut self) {
        self.stage = Stage::Idle;
    }

    /// Continues a sequence whose first `len` positions this cache's buffers hold from an earlier
    /// forward pass over the same buffers and weights (a conversation's earlier turns): the next
    /// step feeds position `len`. What the buffers hold is the host's to vouch for; a `len` that
    /// does not fit is refused.
    pub fn resume(&mut self, len: usize) -> Result<(), ForwardError> {
        if matches!(self.stage, Stage::Linear(_)) {
            return Err(ForwardError::StepInProgress);
        }
        if len > self.kv.capacity() {
            return Err(ForwardError::ContextFull);
        }
        self.kv.set_len(len);
        self.stage = Stage::Idle;
        Ok(())
    }

    /// Forgets the positions from `len` on (tokens a rejected speculation fed), so the next step
    /// continues from there. Between steps only; a `len` beyond the position changes nothing.
    pub fn truncate(&mut self, len: usize) -> Result<(), ForwardError> {
        if matches!(self.stage, Stage::Linear(_)) {
            return Err(ForwardError::StepInProgress);
        }
        self.kv.set_len(len.min(self.kv.len()));
        self.stage = Stage::Idle;
        Ok(())
    }

    /// Starts a step that feeds `tokens` at the next positions, and prepares the first request.
    /// Logits: every row with [`LogitRows::All`], else the last row.
    pub fn begin(&mut self, tokens: &[u32]) -> Result<(), ForwardError> {
        let lm_rows = match self.ws.sizes.logit_rows {
            LogitRows::All => tokens.len().max(1),
            LogitRows::Last | LogitRows::UpTo(_) => 1,
        };
        self.begin_scoring(tokens, lm_rows)
    }

    /// As [`Forward::begin`], with logits for the last `logit_rows` rows (at most what the
    /// workspace's [`LogitRows`] holds): row `i` of [`Forward::logits`] is then what a step
    /// ending at that token would give.
    pub fn begin_scoring(&mut self, tokens: &[u32], logit_rows: usize) -> Result<(), ForwardError> {
        if logit_rows == 0
            || logit_rows > tokens.len().max(1)
            || logit_rows > self.ws.sizes.logit_rows.capacity(self.ws.sizes.max_rows)
        {
            return Err(ForwardError::TooManyRows);
        }
        if matches!(self.stage, Stage::Linear(_)) {
            return Err(ForwardError::StepInProgress);
        }
        if tokens.is_empty() {
            return Err(ForwardError::NoTokens);
        }
        if tokens.len() > self.ws.sizes.max_rows {
            return Err(ForwardError::TooManyRows);
        }
        if self.kv.len() + tokens.len() > self.kv.capacity() {
            return Err(ForwardError::ContextFull);
        }
        if let Some(&t) = tokens.iter().find(|&&t| t >= self.cfg.vocab_size) {
            return Err(ForwardError::TokenOutOfRange(t));
        }
        let d = self.cfg.d();
        self.rows = tokens.len();
        self.lm_rows = logit_rows;
        self.pos0 = self.kv.len();
        for (r, &t) in tokens.iter().enumerate() {
            self.weights.embed(
                t as usize,
                self.pos0 + r,
                &mut self.ws.resid[r * d..(r + 1) * d],
            );
        }
        if self.cfg.is_llama() {
            let dh = self.cfg.head_dim();
            for r in 0..self.rows {
                trig_row(
                    self.pos0 + r,
                    &self.inv_freq[..dh / 2],
                    &mut self.ws.trig[r * dh..(r + 1) * dh],
                );
            }
        }
        self.prepare_ln_input(0, 1);
        self.stage = Stage::Linear(LinearId {
            layer: 0,
            kind: LinearKind::Qkv,
        });
        Ok(())
    }

    fn lm_rows(&self) -> usize {
        self.lm_rows
    }

    /// The linear layer waiting to be computed, if any.
    pub fn request(&self) -> Option<LinearRequest<'_>> {
        let Stage::Linear(id) = self.stage else {
            return None;
        };
        let rows = if id.kind == LinearKind::LmHead {
            self.lm_rows()
        } else {
            self.rows
        };
        let (in_dim, out_dim) = id.dims(&self.cfg);
        Some(LinearRequest {
            id,
            rows,
            in_dim,
            out_dim,
            input: &self.ws.act_q[..rows * in_dim],
        })
    }

    /// Where the exact products of the pending request go (`rows · out_dim`, row-major).
    pub fn reply_mut(&mut self) -> Result<&mut [i32], ForwardError> {
        let Stage::Linear(id) = self.stage else {
            return Err(ForwardError::NoPendingRequest);
        };
        let rows = if id.kind == LinearKind::LmHead {
            self.lm_rows()
        } else {
            self.rows
        };
        let out = id.dims(&self.cfg).1;
        Ok(&mut self.ws.reply[..rows * out])
    }

    /// The products written into [`Forward::reply_mut`] for the pending request, read back.
    pub fn reply(&self) -> Option<&[i32]> {
        let req = self.request()?;
        Some(&self.ws.reply[..req.rows * req.out_dim])
    }

    /// Logits (Q16.16) of the finished step: `vocab` values per logit row.
    pub fn logits(&self) -> Option<&[i32]> {
        match self.stage {
            Stage::Done => Some(&self.ws.reply[..self.lm_rows() * self.cfg.vocab_size as usize]),
            _ => None,
        }
    }

    /// Computes the pending linear layer here with the int8 kernel (the plaintext reference path,
    /// and the local LM head) and completes it.
    pub fn complete_locally(
        &mut self,
        linear: &LinearWeights<'_>,
    ) -> Result<StepState, ForwardError> {
        let req = self.request().ok_or(ForwardError::NoPendingRequest)?;
        let (id, rows, in_dim, out_dim) = (req.id, req.rows, req.in_dim, req.out_dim);
        matmul_i8_i8(
            &self.ws.act_q[..rows * in_dim],
            linear.matrix(id),
            in_dim,
            out_dim,
            &mut self.ws.reply[..rows * out_dim],
        );
        self.complete()
    }

    /// Runs a whole step locally: [`Forward::begin`], then every layer with [`Forward::complete_locally`].
    pub fn step_locally(
        &mut self,
        linear: &LinearWeights<'_>,
        tokens: &[u32],
    ) -> Result<(), ForwardError> {
        self.begin(tokens)?;
        while self.complete_locally(linear)? == StepState::Pending {}
        Ok(())
    }

    /// Consumes the reply in [`Forward::reply_mut`] and runs the client's work up to the next
    /// linear layer.
    pub fn complete(&mut self) -> Result<StepState, ForwardError> {
        let Stage::Linear(id) = self.stage else {
            return Err(ForwardError::NoPendingRequest);
        };
        let l = id.layer as usize;
        let next = match id.kind {
            LinearKind::Qkv => {
                self.finish_qkv(id);
                self.attention(l);
                LinearId {
                    layer: id.layer,
                    kind: LinearKind::AttnOut,
                }
            }
            LinearKind::AttnOut => {
                self.add_to_residual(id);
                self.prepare_ln_input(l, 2);
                LinearId {
                    layer: id.layer,
                    kind: LinearKind::MlpUp,
                }
            }
            LinearKind::MlpUp => {
                self.finish_mlp_up(id);
                LinearId {
                    layer: id.layer,
                    kind: LinearKind::MlpDown,
                }
            }
            LinearKind::MlpDown => {
                self.add_to_residual(id);
                if l + 1 < self.cfg.n_layer as usize {
                    self.prepare_ln_input(l + 1, 1);
                    LinearId {
                        layer: id.layer + 1,
                        kind: LinearKind::Qkv,
                    }
                } else {
                    self.kv.set_len(self.pos0 + self.rows);
                    self.prepare_lm_input();
                    LinearId::LM_HEAD
                }
            }
            LinearKind::LmHead => {
                self.finish_logits();
                self.stage = Stage::Done;
                return Ok(StepState::Done);
            }
        };
        self.stage = Stage::Linear(next);
        Ok(StepState::Pending)
    }

    /// The architecture's norm (LayerNorm or RMSNorm) of one row.
    fn norm(&self) -> fn(&[i32], &super::format::LnView<'w>, u64, &mut [i32]) {
        if self.cfg.is_llama() {
            rms_norm
        } else {
            layer_norm
        }
    }

    /// The norm (`which` = 1 or 2 of block `layer`) of every row, quantized into the request buffer.
    fn prepare_ln_input(&mut self, layer: usize, which: u8) {
        let d = self.cfg.d();
        let ln = self.weights.block_ln(layer, which);
        let eps = self.weights.header().ln_eps_q32 as u64;
        let norm = self.norm();
        for r in 0..self.rows {
            let row = r * d..(r + 1) * d;
            norm(
                &self.ws.resid[row.clone()],
                &ln,
                eps,
                &mut self.ws.norm[row.clone()],
            );
            self.ws.scale[r] = quantize_row(&self.ws.norm[row.clone()], &mut self.ws.act_q[row]).0;
        }
    }

    fn prepare_lm_input(&mut self) {
        let d = self.cfg.d();
        let ln = self.weights.ln_f();
        let eps = self.weights.header().ln_eps_q32 as u64;
        let first = self.rows - self.lm_rows();
        let norm = self.norm();
        for (k, r) in (first..self.rows).enumerate() {
            let out = k * d..(k + 1) * d;
            norm(
                &self.ws.resid[r * d..(r + 1) * d],
                &ln,
                eps,
                &mut self.ws.norm[out.clone()],
            );
            self.ws.scale[k] = quantize_row(&self.ws.norm[out.clone()], &mut self.ws.act_q[out]).0;
        }
    }

    /// Rescales the reply of `id` into `hidden` (Q16.16 with bias) for every row.
    fn rescale_into_hidden(&mut self, id: LinearId) {
        let out = id.dims(&self.cfg).1;
        let p = self.weights.linear(id);
        for r in 0..self.rows {
            let act = ActScale(self.ws.scale[r]);
            let reply = &self.ws.reply[r * out..(r + 1) * out];
            let hidden = &mut self.ws.hidden[r * out..(r + 1) * out];
            for (j, (h, &acc)) in hidden.iter_mut().zip(reply).enumerate() {
                *h = saturate_i32(rescale(acc, act, p.scale(j)) as i64 + p.bias(j) as i64);
            }
        }
    }

    fn finish_qkv(&mut self, id: LinearId) {
        self.rescale_into_hidden(id);
        let d = self.cfg.d();
        let kvd = self.cfg.kv_dim();
        let w = d + 2 * kvd;
        let dh = self.cfg.head_dim();
        for r in 0..self.rows {
            let row = &mut self.ws.hidden[r * w..(r + 1) * w];
            if self.cfg.is_llama() {
                // Queries and keys (not values) turn by their position's angles, after the bias.
                let trig = &self.ws.trig[r * dh..(r + 1) * dh];
                for head in row[..d + kvd].chunks_exact_mut(dh) {
                    rotate_head(head, trig);
                }
            }
            self.kv.store(
                id.layer as usize,
                self.pos0 + r,
                &row[d..d + kvd],
                &row[d + kvd..w],
            );
        }
    }

    /// Causal multi-head attention of every row over the cache; the output rows are quantized into
    /// the request buffer for `attn.c_proj`.
    ///
    /// All in 16-bit vectors so the inner loops run as SIMD, one kernel call per head
    /// ([`kernels::dot_i16_rows`], [`kernels::axpy_i16_rows`]): the query head is block-encoded
    /// like the cached keys, the scores are exact `i64` dot products, and the weighted sum of
    /// values accumulates in `i32` with Q15 probabilities and every value brought to the head's
    /// largest shift `S` over the context. `Σ p ≤ 2^15 + n` and `|v| ≤ 2^15` keep that sum below
    /// 2^31 for every `n ≤ 2^14` (the configuration's limit, [`super::config::MAX_POSITIONS`]);
    /// bringing a value to shift `S` costs at most half a step of `2^S`, the same bound as the
    /// cache's own encoding at that shift.
    ///
    /// Grouped-query attention (the LLaMA family) reads KV head `h / group` for query head `h`;
    /// GPT-2 is the case `group = 1`.
    fn attention(&mut self, layer: usize) {
        let d = self.cfg.d();
        let n_head = self.cfg.n_head as usize;
        let dh = self.cfg.head_dim();
        let group = n_head / self.cfg.n_kv_head();
        let w = d + 2 * self.cfg.kv_dim();
        let stride = self.kv.row_stride();
        for r in 0..self.rows {
            let pos = self.pos0 + r;
            let n = pos + 1; // causal: positions 0..=pos
            for h in 0..n_head {
                let kh = h / group;
                let q = &self.ws.hidden[r * w + h * dh..r * w + (h + 1) * dh];
                let mut q16 = [0i16; MAX_HEAD_DIM];
                let qs = BlockI16::encode(q, &mut q16[..dh]) as u32;
                let keys = self.kv.head_keys(layer, kh, n);
                let mut dots = [0i64; 64];
                for t0 in (0..n).step_by(dots.len()) {
                    let m = (n - t0).min(dots.len());
                    kernels::dot_i16_rows(&q16[..dh], &keys[t0 * stride..], stride, &mut dots[..m]);
                    for (t, &s) in (t0..t0 + m).zip(&dots[..m]) {
                        // s · 2^(qs+ks) is q·k in Q32; the score is that / sqrt(dh) in Q16:
                        // s · inv · 2^(qs+ks) / 2^47 (qs, ks ≤ 17, so the shift stays positive).
                        let ks = self.kv.key_shift(layer, t, kh).min(17) as u32;
                        let wide = s as i128 * self.inv_sqrt_dh_q31 as i128;
                        self.ws.scores[t] =
                            crate::fixed::saturate_i32_wide(round_shift_i128(wide, 47 - qs - ks));
                    }
                }
                softmax(&self.ws.scores[..n], &mut self.ws.probs[..n]);
                let top = (0..n)
                    .map(|t| self.kv.value_shift(layer, t, kh).min(17))
                    .max()
                    .unwrap_or(0) as i32;
                // The scores are spent: their buffer now holds each position's shift down to
                // `top`, and the probabilities go Q16 → Q15, rounded (p ≤ 2^16, so p15 ≤ 2^15).
                for t in 0..n {
                    self.ws.scores[t] = top - self.kv.value_shift(layer, t, kh).min(17) as i32;
                    self.ws.probs[t] = (self.ws.probs[t] + 1) >> 1;
                }
                let mut acc = [0i32; MAX_HEAD_DIM];
                kernels::axpy_i16_rows(
                    &mut acc[..dh],
                    &self.ws.probs[..n],
                    &self.ws.scores[..n],
                    self.kv.head_values(layer, kh, n),
                    stride,
                );
                let top = top as u32;
                let o = &mut self.ws.norm[r * d + h * dh..r * d + (h + 1) * dh];
                for (o, &a) in o.iter_mut().zip(&acc[..dh]) {
                    // a · 2^top is Q31 (Q15 · Q16): back to Q16.16.
                    *o = saturate_i32(round_shift_i64((a as i64) << top, 15));
                }
            }
            let row = r * d..(r + 1) * d;
            self.ws.scale[r] = quantize_row(&self.ws.norm[row.clone()], &mut self.ws.act_q[row]).0;
        }
    }

    fn add_to_residual(&mut self, id: LinearId) {
        let d = self.cfg.d();
        let p = self.weights.linear(id);
        for r in 0..self.rows {
            let act = ActScale(self.ws.scale[r]);
            let reply = &self.ws.reply[r * d..(r + 1) * d];
            let resid = &mut self.ws.resid[r * d..(r + 1) * d];
            for (j, (x, &acc)) in resid.iter_mut().zip(reply).enumerate() {
                let y = rescale(acc, act, p.scale(j)) as i64 + p.bias(j) as i64;
                *x = saturate_i32(*x as i64 + y);
            }
        }
    }

    fn finish_mlp_up(&mut self, id: LinearId) {
        self.rescale_into_hidden(id);
        let inner = self.cfg.n_inner as usize;
        let llama = self.cfg.is_llama();
        for r in 0..self.rows {
            let row = r * inner..(r + 1) * inner;
            if llama {
                // The reply row is gate (first `inner`) then up.
                let h = &self.ws.hidden[2 * r * inner..2 * (r + 1) * inner];
                let (gate, up) = h.split_at(inner);
                for ((n, &g), &u) in self.ws.norm[row.clone()].iter_mut().zip(gate).zip(up) {
                    *n = swiglu(g, u);
                }
            } else {
                for (n, &h) in self.ws.norm[row.clone()]
                    .iter_mut()
                    .zip(&self.ws.hidden[row.clone()])
                {
                    *n = gelu(h);
                }
            }
            self.ws.scale[r] = quantize_row(&self.ws.norm[row.clone()], &mut self.ws.act_q[row]).0;
        }
    }

    fn finish_logits(&mut self) {
        let vocab = self.cfg.vocab_size as usize;
        let p = self.weights.linear(LinearId::LM_HEAD);
        for k in 0..self.lm_rows() {
            let act = ActScale(self.ws.scale[k]);
            for (j, v) in self.ws.reply[k * vocab..(k + 1) * vocab]
                .iter_mut()
                .enumerate()
            {
                *v = rescale(*v, act, p.scale(j));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::RandomModel;
    use super::*;
    use crate::model::{KvSizes, LinearWeights};
    use std::vec;
    use std::vec::Vec;

    struct Bufs {
        i32s: Vec<i32>,
        i8s: Vec<i8>,
        k: Vec<i16>,
        v: Vec<i16>,
        ks: Vec<u8>,
        vs: Vec<u8>,
    }

    fn bufs(cfg: &ModelConfig, rows: usize, lr: LogitRows) -> (Bufs, WorkspaceSizes) {
        let cap = cfg.n_positions as usize;
        let ws = WorkspaceSizes::new(cfg, rows, lr, cap);
        let kv = KvSizes::new(cfg, cap);
        (
            Bufs {
                i32s: vec![0; ws.i32_len],
                i8s: vec![0; ws.i8_len],
                k: vec![0; kv.values],
                v: vec![0; kv.values],
                ks: vec![0; kv.shifts],
                vs: vec![0; kv.shifts],
            },
            ws,
        )
    }

    fn forward<'w, 'a>(m: &'w RandomModel, b: &'a mut Bufs, ws: WorkspaceSizes) -> Forward<'w, 'a> {
        let cw = ClientWeights::parse(&m.client).unwrap();
        let cfg = *cw.config();
        let w = Workspace::new(&cfg, ws, &mut b.i32s, &mut b.i8s).unwrap();
        let kv = KvCache::new(
            &cfg,
            cfg.n_positions as usize,
            &mut b.k,
            &mut b.v,
            &mut b.ks,
            &mut b.vs,
        )
        .unwrap();
        Forward::new(cw, w, kv).unwrap()
    }

    /// Feeding a prompt all at once and one token at a time gives bit-identical logits: the KV
    /// cache and the batched path agree.
    #[test]
    fn test_prefill_equals_incremental_decode() {
        check_prefill_equals_incremental_decode(&RandomModel::new(7));
    }

    /// The same for the LLaMA family (RoPE per position, grouped KV heads, SwiGLU): the rotation
    /// of a row depends only on its position, not on the step that carried it.
    #[test]
    fn test_llama_prefill_equals_incremental_decode() {
        check_prefill_equals_incremental_decode(&RandomModel::llama(7));
    }

    /// RoPE makes the LLaMA family's logits depend on order even where bag-of-token features
    /// agree, and its request sequence is GPT-2's with the fused widths of the family.
    #[test]
    fn test_llama_requests_have_the_family_widths() {
        let m = RandomModel::llama(3);
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let (mut b, ws) = bufs(&m.cfg, 4, LogitRows::Last);
        let mut f = forward(&m, &mut b, ws);
        f.begin(&[1, 2, 3]).unwrap();
        let mut dims = vec![];
        while let Some(req) = f.request() {
            dims.push((req.id.kind, req.in_dim, req.out_dim));
            if f.complete_locally(&lin).unwrap() == StepState::Done {
                break;
            }
        }
        // d = 32, 4 query heads and 2 KV heads of 8: q|k|v = 32 + 2·16; gate|up = 2·48.
        assert_eq!(
            &dims[..4],
            &[
                (LinearKind::Qkv, 32, 64),
                (LinearKind::AttnOut, 32, 32),
                (LinearKind::MlpUp, 32, 96),
                (LinearKind::MlpDown, 48, 32),
            ]
        );
        assert_eq!(dims.len(), 9);
        let ab = f.logits().unwrap().to_vec();
        f.reset();
        f.step_locally(&lin, &[2, 1, 3]).unwrap();
        assert_ne!(f.logits().unwrap(), &ab[..], "positions must matter");
        // The cache holds the 2 KV heads only.
        assert_eq!(KvSizes::new(&m.cfg, 12).values, 2 * 12 * 16);
    }

    fn check_prefill_equals_incremental_decode(m: &RandomModel) {
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let tokens = [3u32, 17, 5, 60, 2, 9, 33];
        let (mut b1, ws1) = bufs(&m.cfg, tokens.len(), LogitRows::All);
        let mut all = forward(m, &mut b1, ws1);
        all.step_locally(&lin, &tokens).unwrap();
        let vocab = m.cfg.vocab_size as usize;
        let all_logits = all.logits().unwrap().to_vec();
        let (mut b2, ws2) = bufs(&m.cfg, 1, LogitRows::Last);
        let mut one = forward(m, &mut b2, ws2);
        for (i, &t) in tokens.iter().enumerate() {
            one.step_locally(&lin, &[t]).unwrap();
            assert_eq!(
                one.logits().unwrap(),
                &all_logits[i * vocab..(i + 1) * vocab],
                "position {i}"
            );
        }
        assert_eq!(one.position(), tokens.len());
        // Logits are not degenerate.
        assert!(all_logits.iter().any(|&x| x != all_logits[0]));
    }

    /// A scoring step over a drafted continuation gives, row by row, the logits of feeding the
    /// tokens one at a time; truncating the cache after it and feeding other tokens gives what a
    /// cache that never saw the rejected ones gives (the speculation's rollback).
    #[test]
    fn test_scoring_step_and_rollback_equal_incremental_decode() {
        check_scoring_and_rollback(&RandomModel::new(8));
    }

    /// The same for the LLaMA family: a rolled-back position is rotated afresh when refilled.
    #[test]
    fn test_llama_scoring_step_and_rollback_equal_incremental_decode() {
        check_scoring_and_rollback(&RandomModel::llama(8));
    }

    fn check_scoring_and_rollback(m: &RandomModel) {
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let vocab = m.cfg.vocab_size as usize;
        let (prefix, draft, other) = ([3u32, 17, 5], [60u32, 2, 9, 33], [41u32, 7]);
        // Reference: one token at a time, prefix then draft[..2] then `other`.
        let (mut b1, ws1) = bufs(&m.cfg, 1, LogitRows::Last);
        let mut one = forward(m, &mut b1, ws1);
        let mut want = vec![];
        for &t in prefix.iter().chain(&draft) {
            one.step_locally(&lin, &[t]).unwrap();
            want.push(one.logits().unwrap().to_vec());
        }
        one.reset();
        let mut want_other = vec![];
        for &t in prefix.iter().chain(&draft[..2]).chain(&other) {
            one.step_locally(&lin, &[t]).unwrap();
            want_other.push(one.logits().unwrap().to_vec());
        }
        // Speculative: the prefix, then the whole draft scored in one step.
        let (mut b2, ws2) = bufs(&m.cfg, 4, LogitRows::UpTo(4));
        let mut f = forward(m, &mut b2, ws2);
        f.step_locally(&lin, &prefix).unwrap();
        assert_eq!(
            f.logits().unwrap(),
            &want[2][..],
            "a plain step: last row only"
        );
        f.begin_scoring(&draft, 4).unwrap();
        while f.complete_locally(&lin).unwrap() == StepState::Pending {}
        let got = f.logits().unwrap();
        for i in 0..4 {
            assert_eq!(
                &got[i * vocab..(i + 1) * vocab],
                &want[3 + i][..],
                "draft row {i}"
            );
        }
        // Keep two drafted tokens, reject the rest, continue with others.
        f.truncate(prefix.len() + 2).unwrap();
        assert_eq!(f.position(), 5);
        f.begin_scoring(&other, 2).unwrap();
        while f.complete_locally(&lin).unwrap() == StepState::Pending {}
        let got = f.logits().unwrap();
        for i in 0..2 {
            assert_eq!(
                &got[i * vocab..(i + 1) * vocab],
                &want_other[5 + i][..],
                "row {i}"
            );
        }
        assert_eq!(f.begin_scoring(&other, 3), Err(ForwardError::TooManyRows));
        assert_eq!(f.begin_scoring(&draft, 5), Err(ForwardError::TooManyRows));
    }

    #[test]
    fn test_rejects_bad_steps() {
        let m = RandomModel::new(1);
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let (mut b, ws) = bufs(&m.cfg, 2, LogitRows::Last);
        let mut f = forward(&m, &mut b, ws);
        assert_eq!(f.begin(&[]), Err(ForwardError::NoTokens));
        assert_eq!(f.begin(&[1, 2, 3]), Err(ForwardError::TooManyRows));
        assert_eq!(
            f.begin(&[m.cfg.vocab_size]),
            Err(ForwardError::TokenOutOfRange(m.cfg.vocab_size))
        );
        assert_eq!(f.complete(), Err(ForwardError::NoPendingRequest));
        f.begin(&[1]).unwrap();
        assert_eq!(f.begin(&[1]), Err(ForwardError::StepInProgress));
        f.abort_step();
        for _ in 0..m.cfg.n_positions {
            f.step_locally(&lin, &[1]).unwrap();
        }
        assert_eq!(f.begin(&[1]), Err(ForwardError::ContextFull));
    }

    #[test]
    fn test_request_sequence_is_four_per_block_plus_lm_head() {
        let m = RandomModel::new(2);
        let lin = LinearWeights::parse(&m.linear).unwrap();
        let (mut b, ws) = bufs(&m.cfg, 4, LogitRows::Last);
        let mut f = forward(&m, &mut b, ws);
        f.begin(&[1, 2, 3]).unwrap();
        let mut ids = vec![];
        while let Some(req) = f.request() {
            ids.push((req.id, req.rows));
            if f.complete_locally(&lin).unwrap() == StepState::Done {
                break;
            }
        }
        let expected: Vec<_> = m
            .cfg
            .linears()
            .map(|id| (id, if id.kind == LinearKind::LmHead { 1 } else { 3 }))
            .collect();
        assert_eq!(ids, expected);
    }
}
