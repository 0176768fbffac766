//! The generation loop, shared by the private path (a server computes every linear layer on masked
//! rows) and the local reference (the same integer pipeline with local kernels).

use std::io::{Read, Write};
use std::time::Instant;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_core::mask::MaskKey;
use veil_core::model::{
    sample, ClientWeights, Forward, ForwardError, KvCache, KvSizes, LinearId, LinearKind,
    LinearWeights, LogitRows, SampleError, SamplingParams, StepState, Workspace, WorkspaceSizes,
};
use veil_core::session::{PrivateForward, SessionError, SessionSizes, UnmaskSource, Verifier};

use crate::speculate::{DraftLength, Speculation};
use crate::transport::{Connection, TransportError, WireStats};

/// Most prompt rows per prefill step (bounded by the server's limit too).
pub const DEFAULT_PREFILL_ROWS: usize = 64;

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenOptions {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Greedy or sampling.
    pub sampling: SamplingParams,
    /// Seed of the sampling RNG (ChaCha20; one `u32` per generated token).
    pub seed: u64,
    /// Stop at any of these tokens (end of text, end of a chat turn).
    pub eos: Vec<u32>,
    /// Rows per prefill step.
    pub prefill_rows: usize,
    /// Speculative decoding (off: one token per step).
    pub speculation: Option<Speculation>,
}

/// Figures of one generation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenStats {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub generated_tokens: usize,
    /// Wall time of the prompt (prefill, up to the first token's logits).
    pub prefill_ms: f64,
    /// Wall time per generated token after the first.
    pub decode_ms_per_token: f64,
    /// Client CPU time (user + system) per generated token after the first.
    pub client_cpu_ms_per_token: f64,
    /// Traffic.
    pub wire: WireStats,
    /// Round trips per decoded token (after the prompt).
    pub round_trips_per_token: f64,
    /// Bytes up per decoded token.
    pub bytes_up_per_token: f64,
    /// Bytes down per decoded token.
    pub bytes_down_per_token: f64,
    /// Times the connection was re-established after breaking.
    pub reconnects: usize,
    /// Steps after the prompt (one per decoded token without speculation).
    pub decode_steps: usize,
    /// Tokens decoded per step after the prompt (1 without speculation).
    pub tokens_per_step: f64,
    /// Drafted tokens kept, of those the model examined (speculation only).
    pub draft_acceptance: f64,
    /// With the LM head placed by measurement: steps that ran it here, of all steps.
    pub lm_head_local_steps: Option<(usize, usize)>,
    /// Prompt tokens already in the cache from the previous generation (not fed again).
    pub cached_tokens: usize,
}

/// Why generation stopped early.
#[derive(Debug, thiserror::Error)]
pub enum GenError<E: std::fmt::Debug + std::fmt::Display> {
    /// The forward pass refused (context full, bad token...).
    #[error("{0}")]
    Forward(ForwardError),
    /// The mask source failed (its message says what to do, e.g. extend an exhausted pool).
    #[error("{0}")]
    Source(E),
    /// A reply failed its integrity check: the server altered a result.
    #[error("integrity check failed: the server's reply for {linear} was altered (after {generated} generated tokens); no token computed from it was used")]
    Integrity {
        /// The layer.
        linear: LinearId,
        /// Tokens generated before it.
        generated: usize,
    },
    /// No token could be picked (no logits, or a sampling buffer too small).
    #[error("picking the next token: {0}")]
    Sample(SampleError),
    /// The server connection failed after `generated` tokens.
    #[error("{source} (after {generated} generated tokens)")]
    Transport {
        /// What happened.
        source: TransportError,
        /// Tokens generated before it.
        generated: usize,
    },
    /// The host offered a reply for a layer whose rows it never masked (a bug here, not a fault
    /// of the server or the files).
    #[error("internal error: a reply for {0} before its rows were masked")]
    MasksNotDrawn(LinearId),
}

impl<E: std::fmt::Debug + std::fmt::Display> GenError<E> {
    fn from_session(e: SessionError<E>, generated: usize) -> Self {
        match e {
            SessionError::Forward(f) => GenError::Forward(f),
            SessionError::Source(s) => GenError::Source(s),
            SessionError::IntegrityFailure(linear) => GenError::Integrity { linear, generated },
            SessionError::MasksNotDrawn(linear) => GenError::MasksNotDrawn(linear),
            _ => GenError::Forward(ForwardError::BufferTooSmall),
        }
    }
}

/// CPU time of this process (user + system), in milliseconds.
pub fn cpu_ms() -> f64 {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a full `rusage` into the pointer on success (return 0); we read it
    // only then.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0;
    if !ok {
        return 0.0;
    }
    // SAFETY: initialised by the successful call above.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Buffers of one generation, owned by the host and lent to the core.
#[derive(Debug)]
pub struct Buffers {
    i32s: Vec<i32>,
    i8s: Vec<i8>,
    k: Vec<i16>,
    v: Vec<i16>,
    ks: Vec<u8>,
    vs: Vec<u8>,
    words: [Vec<u32>; 4],
    scratch: Vec<u32>,
    sizes: WorkspaceSizes,
    capacity: usize,
    logit_rows: usize,
}

impl Buffers {
    /// Buffers for steps of `rows` rows with logits for up to `logit_rows` of them and a
    /// context of `capacity` positions.
    pub fn new(
        cfg: &veil_core::model::ModelConfig,
        rows: usize,
        logit_rows: usize,
        capacity: usize,
    ) -> Self {
        let sizes = WorkspaceSizes::new(cfg, rows, LogitRows::UpTo(logit_rows), capacity);
        let kv = KvSizes::new(cfg, capacity);
        let s = SessionSizes::scoring(cfg, rows, logit_rows);
        Buffers {
            i32s: vec![0; sizes.i32_len],
            i8s: vec![0; sizes.i8_len],
            k: vec![0; kv.values],
            v: vec![0; kv.values],
            ks: vec![0; kv.shifts],
            vs: vec![0; kv.shifts],
            words: [
                vec![0; s.input_words],
                vec![0; s.input_words],
                vec![0; s.output_words],
                vec![0; s.output_words],
            ],
            scratch: vec![0; cfg.vocab_size as usize],
            sizes,
            capacity,
            logit_rows,
        }
    }

    /// Whether these buffers serve steps of `rows` rows, `logit_rows` logit rows and `capacity`
    /// positions (so a cached sequence in them can be continued).
    fn fits(&self, rows: usize, logit_rows: usize, capacity: usize) -> bool {
        self.sizes.max_rows >= rows && self.logit_rows >= logit_rows && self.capacity >= capacity
    }

    fn forward<'w, 'a>(&'a mut self, cw: ClientWeights<'w>) -> Result<Lent<'w, 'a>, ForwardError> {
        let cfg = *cw.config();
        let ws = Workspace::new(&cfg, self.sizes, &mut self.i32s, &mut self.i8s)?;
        let kv = KvCache::new(
            &cfg,
            self.capacity,
            &mut self.k,
            &mut self.v,
            &mut self.ks,
            &mut self.vs,
        )?;
        let [a, b, c, d] = &mut self.words;
        Ok((Forward::new(cw, ws, kv)?, [a, b, c, d], &mut self.scratch))
    }
}

/// A forward pass over these buffers, the four session word buffers and the sampling scratch.
type Lent<'w, 'a> = (Forward<'w, 'a>, [&'a mut [u32]; 4], &'a mut [u32]);

/// KV positions a generation needs: the prompt and the new tokens, at most the model's context.
/// Sizing the cache by need rather than by `n_positions` keeps a short generation's memory small
/// (distilgpt2's full 1024-position cache is 19 MB).
fn kv_capacity(cfg: &veil_core::model::ModelConfig, prompt: &[u32], opts: &GenOptions) -> usize {
    (prompt.len() + opts.max_new_tokens).min(cfg.n_positions as usize)
}

/// One way of running the model a step at a time (locally, or privately with a server), under
/// the token loop that is written once in [`token_loop`].
trait Stepper {
    /// The mask source's error (none for the local reference).
    type Error: std::fmt::Debug + std::fmt::Display;
    /// Feeds `tokens` (a prefill chunk, one decoded token, or one and its drafts) with logits for
    /// the last `logit_rows` of them; `generated` tokens so far.
    fn step(
        &mut self,
        tokens: &[u32],
        logit_rows: usize,
        generated: usize,
    ) -> Result<(), GenError<Self::Error>>;
    /// The last step's logits (`logit_rows · vocab`).
    fn logits(&self) -> &[i32];
    /// Positions in the cache.
    fn position(&self) -> usize;
    /// Forgets the positions from `len` on (rejected drafts).
    fn truncate(&mut self, len: usize) -> Result<(), GenError<Self::Error>>;
    /// Traffic so far (zero for the local reference).
    fn wire(&self) -> WireStats;
    /// What the last step, which took `secs`, would have cost with the placements the next steps
    /// will use (the LM head's may change between steps): what the draft length is chosen by.
    fn step_cost(&self, secs: f64) -> f64 {
        secs
    }
}

/// Prefill in chunks, then pick a token and decode it until the limit, end of text or a full
/// context; times the prefill and the decode steps and counts traffic per decoded token. With
/// speculation each decode step feeds the last token and its drafts and keeps the drafts the
/// model agrees with (see [`crate::speculate`]): the tokens are the same as without.
fn token_loop<S: Stepper>(
    stepper: &mut S,
    cached: &[u32],
    prompt: &[u32],
    opts: &GenOptions,
    capacity: usize,
    scratch: &mut [u32],
    on_token: &mut dyn FnMut(u32),
) -> Result<(Vec<u32>, GenStats), GenError<S::Error>> {
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
    let t0 = Instant::now();
    for chunk in prompt.chunks(opts.prefill_rows.max(1)) {
        stepper.step(chunk, 1, 0)?;
    }
    stats.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut out = Vec::new();
    let (t1, c1, w1) = (Instant::now(), cpu_ms(), stepper.wire());
    let mut drafter = opts.speculation.map(|s| s.drafter());
    let mut length = opts
        .speculation
        .map(|s| DraftLength::new(s.max_draft, s.adaptive));
    let (mut context, mut fed) = ([cached, prompt].concat(), Vec::new());
    let vocab = scratch.len();
    // The next token's distribution is row `row` of the last step's logits; that step fed
    // `fed` (a token and its drafts), took `step_secs` and drafted `step_drafts`.
    let (mut row, mut step_secs, mut step_drafts) = (0, 0.0, 0);
    loop {
        let logits = stepper.logits();
        let t = sample(
            logits.get(row * vocab..(row + 1) * vocab).unwrap_or(&[]),
            &opts.sampling,
            rng.next_u32(),
            scratch,
        )
        .map_err(GenError::Sample)?;
        out.push(t);
        context.push(t);
        on_token(t);
        if out.len() >= opts.max_new_tokens
            || opts.eos.contains(&t)
            || cached.len() + prompt.len() + out.len() >= capacity
        {
            break;
        }
        if row + 1 < fed.len() && fed[row + 1] == t {
            // The model picked the drafted token, which the cache already holds: its logits
            // are the next row.
            row += 1;
            continue;
        }
        // `t` is the model's own pick: the drafts after `row` leave the cache.
        if let Some(l) = length.as_mut().filter(|_| !fed.is_empty()) {
            l.record(fed.len(), step_secs, step_drafts, row);
        }
        if fed.len() > row + 1 {
            let keep = stepper.position() - (fed.len() - 1 - row);
            stepper.truncate(keep)?;
        }
        fed.clear();
        fed.push(t);
        step_drafts = 0;
        if let (Some(d), Some(l)) = (drafter.as_mut(), length.as_ref()) {
            // Bounded by the tokens still wanted and the cache.
            let room = (opts.max_new_tokens - out.len())
                .min(capacity - stepper.position())
                .saturating_sub(1);
            let k = l.next().min(room);
            if k > 0 {
                d.draft(&context, k, &mut fed);
                // Padded to `k`, so the row count does not say whether the drafter found anything.
                let pad = fed.last().copied().unwrap_or(t);
                fed.resize(k + 1, pad);
                step_drafts = k;
            }
        }
        let ts = Instant::now();
        stepper.step(&fed, fed.len(), out.len())?;
        step_secs = stepper.step_cost(ts.elapsed().as_secs_f64());
        stats.decode_steps += 1;
        row = 0;
    }
    stats.generated_tokens = out.len();
    stats.wire = stepper.wire();
    if let Some(l) = &length {
        stats.draft_acceptance = l.acceptance();
    }
    let decoded = out.len().saturating_sub(1);
    if decoded > 0 && stats.decode_steps > 0 {
        let n = decoded as f64;
        stats.decode_ms_per_token = t1.elapsed().as_secs_f64() * 1e3 / n;
        stats.client_cpu_ms_per_token = (cpu_ms() - c1) / n;
        stats.tokens_per_step = n / stats.decode_steps as f64;
        let w = stats.wire;
        stats.round_trips_per_token = w.round_trips.saturating_sub(w1.round_trips) as f64 / n;
        stats.bytes_up_per_token = w.bytes_up.saturating_sub(w1.bytes_up) as f64 / n;
        stats.bytes_down_per_token = w.bytes_down.saturating_sub(w1.bytes_down) as f64 / n;
    }
    Ok((out, stats))
}

/// The plaintext integer pipeline, a step at a time.
struct LocalStepper<'w, 'a, 'l> {
    fwd: Forward<'w, 'a>,
    linear: &'l LinearWeights<'l>,
}

impl Stepper for LocalStepper<'_, '_, '_> {
    type Error = std::convert::Infallible;
    fn step(
        &mut self,
        tokens: &[u32],
        logit_rows: usize,
        _: usize,
    ) -> Result<(), GenError<Self::Error>> {
        self.fwd
            .begin_scoring(tokens, logit_rows)
            .map_err(GenError::Forward)?;
        while self
            .fwd
            .complete_locally(self.linear)
            .map_err(GenError::Forward)?
            == StepState::Pending
        {}
        Ok(())
    }
    fn logits(&self) -> &[i32] {
        self.fwd.logits().unwrap_or(&[])
    }
    fn position(&self) -> usize {
        self.fwd.position()
    }
    fn truncate(&mut self, len: usize) -> Result<(), GenError<Self::Error>> {
        self.fwd.truncate(len).map_err(GenError::Forward)
    }
    fn wire(&self) -> WireStats {
        WireStats::default()
    }
}

/// Rows per step and logit rows a generation's buffers need: the prefill chunk, or a token
/// and its drafts, whichever is more (at most `limit` rows, the server's), and that many logit
/// rows for the drafts. The drafts are cut to fit.
fn step_shape(prompt: &[u32], opts: &GenOptions, limit: usize) -> (usize, usize, GenOptions) {
    let mut opts = opts.clone();
    let limit = limit.max(1);
    if let Some(s) = opts.speculation.as_mut() {
        s.max_draft = s.max_draft.min(limit - 1);
    }
    let logit_rows = opts.speculation.map_or(1, |s| s.max_draft + 1);
    let rows = opts
        .prefill_rows
        .min(prompt.len())
        .max(logit_rows)
        .min(limit)
        .max(1);
    (rows, logit_rows, opts)
}

/// Generates locally with the plaintext integer pipeline (`--reference`): the same numbers the
/// private path must reproduce.
pub fn generate_reference(
    client: ClientWeights<'_>,
    linear: &LinearWeights<'_>,
    prompt: &[u32],
    opts: &GenOptions,
    on_token: &mut dyn FnMut(u32),
) -> Result<(Vec<u32>, GenStats), GenError<std::convert::Infallible>> {
    let cfg = *client.config();
    let capacity = kv_capacity(&cfg, prompt, opts);
    let (rows, logit_rows, opts) = step_shape(prompt, opts, usize::MAX);
    let mut bufs = Buffers::new(&cfg, rows, logit_rows, capacity);
    let (fwd, _, scratch) = bufs.forward(client).map_err(GenError::Forward)?;
    let mut stepper = LocalStepper { fwd, linear };
    token_loop(
        &mut stepper,
        &[],
        prompt,
        &opts,
        capacity,
        scratch,
        on_token,
    )
}

/// Freivalds check data for every layer (see `veil_core::integrity`): the secret check vectors,
/// derived from the mask key, and the weights' projections onto them.
#[derive(Debug, Clone)]
pub struct Verification {
    /// Check vectors, `check_words(cfg)` elements of F_p.
    pub s: Vec<u64>,
    /// Weight projections, `projection_words(cfg)` elements of F_p.
    pub w: Vec<u64>,
}

impl Verification {
    /// Derives the check vectors from `key` and projects the weights onto them (one pass over the
    /// weights: the online source's start-up cost, or part of pool precomputation).
    pub fn compute(key: &MaskKey, linear: &LinearWeights<'_>) -> Self {
        let cfg = *linear.config();
        let (s, w) = Self::check_vectors(key, &cfg);
        let mut w = w;
        let mut scratch = vec![0i128; cfg.d().max(cfg.n_inner as usize)];
        veil_core::integrity::fill_projections(linear, &s, &mut w, &mut scratch);
        Verification { s, w }
    }

    /// Check vectors from `key` and a zeroed projection buffer.
    pub fn check_vectors(
        key: &MaskKey,
        cfg: &veil_core::model::ModelConfig,
    ) -> (Vec<u64>, Vec<u64>) {
        let mut s = vec![0u64; veil_core::integrity::check_words(cfg)];
        veil_core::integrity::fill_check_vectors(key, cfg, &mut s);
        (s, vec![0u64; veil_core::integrity::projection_words(cfg)])
    }
}

/// Opens a new connection (and handshakes) when the current one is lost.
pub type Reconnect<'r, R, W> = Box<dyn FnMut() -> Result<Connection<R, W>, TransportError> + 'r>;

/// The server link of a private generation: the connection, the policy for losing it, and the
/// traffic of connections given up on.
struct Link<'r, R: Read, W: Write> {
    conn: Connection<R, W>,
    reconnect: Option<Reconnect<'r, R, W>>,
    /// Reconnections still allowed over the whole generation.
    retries: usize,
    reconnects: usize,
    carried: WireStats,
}

impl<R: Read, W: Write> Link<'_, R, W> {
    /// After `err` broke the connection: opens a new one if the error is one a new connection
    /// may cure and retries are left. Each new connection's own failures count as retries too.
    fn resume(&mut self, err: TransportError) -> Result<(), TransportError> {
        let mut err = err;
        loop {
            match self.reconnect.as_mut() {
                Some(open) if self.retries > 0 && err.is_transient() => {
                    self.retries -= 1;
                    eprintln!(
                        "\nveil-client: {err}; reconnecting and redoing the step with fresh masks"
                    );
                    match open() {
                        Ok(conn) => {
                            let old = std::mem::replace(&mut self.conn, conn);
                            self.carried = self.carried + old.stats();
                            self.reconnects += 1;
                            return Ok(());
                        }
                        Err(e) => err = e,
                    }
                }
                _ => return Err(err),
            }
        }
    }
}

/// The private path, a step at a time: every offloaded layer goes to the server masked.
struct PrivateStepper<'w, 'a, 'l, 'r, 's, R: Read, W: Write, S> {
    pf: PrivateForward<'w, 'a>,
    link: &'l mut Link<'r, R, W>,
    source: &'s mut S,
    head: HeadPlacement<'w>,
    /// The last step's LM head: seconds, and its logit rows.
    last_head: (f64, usize),
}

/// Where the LM head runs, step by step.
#[derive(Debug, Clone)]
enum HeadPlacement<'w> {
    /// Always the same (offloaded, or local from the start).
    Fixed,
    /// Measured on this link: the LM head's cost offloaded (its round trip, the server's product,
    /// the vocabulary-wide reply, the unmasking) against its cost here (the multiply-adds), per
    /// logit row, each an average over its recent steps; the cheaper one runs, and the other is
    /// tried again every [`HEAD_PROBE`] steps since the link may change. Both give the same logits.
    Measured {
        weights: LinearWeights<'w>,
        /// Seconds per logit row: offloaded, local.
        offload: Option<f64>,
        local: Option<f64>,
        steps: usize,
        local_steps: usize,
    },
}

/// Steps between two tries of the LM head's other placement.
const HEAD_PROBE: usize = 32;

impl HeadPlacement<'_> {
    /// Whether the next step computes the LM head here (`None`: fixed, leave it).
    fn choose(&self) -> Option<bool> {
        let HeadPlacement::Measured {
            offload,
            local,
            steps,
            ..
        } = self
        else {
            return None;
        };
        Some(match (offload, local) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(o), Some(l)) => {
                let best_local = l < o;
                if steps % HEAD_PROBE == HEAD_PROBE - 1 {
                    !best_local
                } else {
                    best_local
                }
            }
        })
    }

    /// Records that a step's LM head took `secs` for `rows` logit rows, here or offloaded.
    fn record(&mut self, local_head: bool, secs: f64, rows: usize) {
        if let HeadPlacement::Measured {
            offload,
            local,
            steps,
            local_steps,
            ..
        } = self
        {
            let per_row = secs / rows.max(1) as f64;
            let est = if local_head { local } else { offload };
            *est = Some(est.map_or(per_row, |e| 0.7 * e + 0.3 * per_row));
            *steps += 1;
            *local_steps += local_head as usize;
        }
    }
}

impl<R: Read, W: Write, S: UnmaskSource> Stepper for PrivateStepper<'_, '_, '_, '_, '_, R, W, S> {
    type Error = S::Error;

    fn step(
        &mut self,
        tokens: &[u32],
        logit_rows: usize,
        generated: usize,
    ) -> Result<(), GenError<S::Error>> {
        let session = |e: SessionError<S::Error>| GenError::from_session(e, generated);
        match (self.head.choose(), &self.head) {
            (Some(true), HeadPlacement::Measured { weights, .. }) => {
                self.pf.set_local_lm_head(weights.clone())
            }
            (Some(false), _) => self.pf.offload_lm_head(),
            _ => {}
        }
        let local_head = self.pf.lm_head_is_local();
        self.pf
            .begin_scoring(tokens, logit_rows, self.source)
            .map_err(session)?;
        // The LM head's time: its exchange when offloaded; when local, the completion of the last
        // block's MLP, which runs it (the rest of that completion is a residual add and a norm).
        let mut head_secs = 0.0;
        loop {
            let timed = match self.pf.pending() {
                Some(l) if l.kind == LinearKind::LmHead => true,
                Some(l) => {
                    local_head
                        && l.kind == LinearKind::MlpDown
                        && u32::from(l.layer) + 1 == self.pf.forward().config().n_layer
                }
                None => false,
            };
            let t0 = Instant::now();
            let exchanged = {
                let out = self.pf.outgoing(self.source).map_err(session)?;
                let (linear, rows, in_dim, out_dim) =
                    (out.linear, out.rows, out.in_dim, out.out_dim);
                self.link
                    .conn
                    .send_request(linear, rows, in_dim, out_dim, out.masked)
            };
            if exchanged.is_ok() {
                // While the server computes: fetch or compute the unmasking terms.
                self.pf.prepare_unmask(self.source).map_err(session)?;
            }
            let exchanged = exchanged.and_then(|()| {
                let reply = self.pf.reply_mut().unwrap_or(&mut []);
                self.link.conn.receive_result(reply)
            });
            if let Err(err) = exchanged {
                self.pf.abort_step();
                self.link
                    .resume(err)
                    .map_err(|source| GenError::Transport { source, generated })?;
                // Redo the whole step on the new connection, with new slots (so new masks).
                self.pf
                    .begin_scoring(tokens, logit_rows, self.source)
                    .map_err(session)?;
                continue;
            }
            let t1 = Instant::now();
            let state = self.pf.complete(self.source).map_err(session)?;
            if timed {
                head_secs += if local_head {
                    t1.elapsed()
                } else {
                    t0.elapsed()
                }
                .as_secs_f64();
            }
            if state == StepState::Done {
                self.head.record(local_head, head_secs, logit_rows);
                self.last_head = (head_secs, logit_rows);
                return Ok(());
            }
        }
    }

    fn logits(&self) -> &[i32] {
        self.pf.forward().logits().unwrap_or(&[])
    }

    fn position(&self) -> usize {
        self.pf.forward().position()
    }

    fn truncate(&mut self, len: usize) -> Result<(), GenError<S::Error>> {
        self.pf.truncate(len).map_err(GenError::Forward)
    }

    fn wire(&self) -> WireStats {
        self.link.carried + self.link.conn.stats()
    }

    fn step_cost(&self, secs: f64) -> f64 {
        match &self.head {
            HeadPlacement::Measured {
                offload: Some(o),
                local: Some(l),
                ..
            } => {
                let (head, rows) = self.last_head;
                (secs - head).max(0.0) + o.min(*l) * rows as f64
            }
            _ => secs,
        }
    }
}

/// A private generator: owns the server connection, the resume policy, the check data and the
/// LM-head placement, and runs generations over buffers it owns. Per decoded token: one round
/// trip per offloaded linear layer.
pub struct PrivateGenerator<'w, 'r, R: Read, W: Write> {
    client: ClientWeights<'w>,
    link: Link<'r, R, W>,
    verification: Option<Verification>,
    local_lm_head: Option<LinearWeights<'w>>,
    /// Measure both LM head placements on this link and use the cheaper.
    measure_lm_head: bool,
    bufs: Option<Buffers>,
    /// The tokens whose positions `bufs`' cache holds from the last generation (kept with
    /// [`PrivateGenerator::keep_cache`]).
    cached: Vec<u32>,
    keep_cache: bool,
}

impl<R: Read, W: Write> std::fmt::Debug for PrivateGenerator<'_, '_, R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivateGenerator")
            .field("conn", &self.link.conn)
            .field("retries", &self.link.retries)
            .field("verify", &self.verification.is_some())
            .field("local_lm_head", &self.local_lm_head.is_some())
            .finish_non_exhaustive()
    }
}

impl<'w, 'r, R: Read, W: Write> PrivateGenerator<'w, 'r, R, W> {
    /// A generator over a connected server; replies unchecked, LM head offloaded, no resume.
    pub fn new(client: ClientWeights<'w>, conn: Connection<R, W>) -> Self {
        PrivateGenerator {
            client,
            link: Link {
                conn,
                reconnect: None,
                retries: 0,
                reconnects: 0,
                carried: WireStats::default(),
            },
            verification: None,
            local_lm_head: None,
            measure_lm_head: false,
            bufs: None,
            cached: Vec::new(),
            keep_cache: false,
        }
    }

    /// Checks every reply with Freivalds' test before using it.
    pub fn verify_with(mut self, v: Verification) -> Self {
        self.verification = Some(v);
        self
    }

    /// Computes the LM head on the client with `weights` instead of offloading it.
    pub fn local_lm_head(mut self, weights: LinearWeights<'w>) -> Self {
        self.local_lm_head = Some(weights);
        self.measure_lm_head = false;
        self
    }

    /// Keeps the KV cache between generations: a prompt that begins with the last generation's
    /// prompt and output (a conversation's next turn, re-rendered whole) feeds only what is new.
    /// The tokens are the same as without (each position's numbers do not depend on the step
    /// that fed it). The cache is then sized for the model's whole context.
    pub fn keep_cache(mut self) -> Self {
        self.keep_cache = true;
        self
    }

    /// Runs the LM head where it costs less on this link, measured step by step: offloaded (a
    /// round trip and a vocabulary-wide reply) or here with `weights` (its multiply-adds).
    pub fn measured_lm_head(mut self, weights: LinearWeights<'w>) -> Self {
        self.local_lm_head = Some(weights);
        self.measure_lm_head = true;
        self
    }

    /// When the connection breaks (or the server stalls past the timeout), opens a new one with
    /// `reconnect`, up to `retries` times over the generator's life, and redoes the interrupted
    /// step from its start with fresh slots, so fresh masks: the KV cache holds only completed
    /// steps, and no mask is ever sent twice.
    pub fn resume_with(mut self, retries: usize, reconnect: Reconnect<'r, R, W>) -> Self {
        self.link.retries = retries;
        self.link.reconnect = Some(reconnect);
        self
    }

    /// The current connection (to say goodbye, or read its traffic).
    pub fn into_connection(self) -> Connection<R, W> {
        self.link.conn
    }

    /// Times the connection was re-established so far.
    pub fn reconnects(&self) -> usize {
        self.link.reconnects
    }

    /// Generates privately from `prompt`, masking and unmasking with `source`'s keys and terms.
    pub fn generate<S: UnmaskSource>(
        &mut self,
        source: &mut S,
        prompt: &[u32],
        opts: &GenOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> Result<(Vec<u32>, GenStats), GenError<S::Error>> {
        let cfg = *self.client.config();
        // A conversation's cache is sized for the model's whole context once.
        let capacity = if self.keep_cache {
            cfg.n_positions as usize
        } else {
            kv_capacity(&cfg, prompt, opts)
        };
        let limit = self.link.conn.max_rows();
        let (rows, logit_rows, opts) = step_shape(prompt, opts, limit);
        let opts = &opts;
        // Buffers for a conversation take whole prefill chunks, whatever this turn's length.
        let new_rows = if self.keep_cache {
            opts.prefill_rows.max(logit_rows).min(limit).max(1)
        } else {
            rows
        };
        // What the cache may keep: the common start of the cached tokens and the prompt, less at
        // least one token to feed (its logits pick the first new token).
        let reuse = self.keep_cache
            && self
                .bufs
                .as_ref()
                .is_some_and(|b| b.fits(rows, logit_rows, capacity));
        let kept = if reuse {
            let common = self
                .cached
                .iter()
                .zip(prompt)
                .take_while(|(a, b)| a == b)
                .count();
            common.min(prompt.len().saturating_sub(1))
        } else {
            self.bufs = Some(Buffers::new(&cfg, new_rows, logit_rows, capacity));
            0
        };
        // Until this generation completes, the cache holds nothing to continue.
        self.cached.clear();
        let Some(bufs) = self.bufs.as_mut() else {
            return Err(GenError::Forward(ForwardError::BufferTooSmall));
        };
        let (mut fwd, [m, r, y, u], scratch) = bufs
            .forward(self.client.clone())
            .map_err(GenError::Forward)?;
        fwd.resume(kept).map_err(GenError::Forward)?;
        let session = |e: SessionError<S::Error>| GenError::from_session(e, 0);
        let mut pf = PrivateForward::new::<S::Error>(fwd, m, r, y, u).map_err(session)?;
        if let Some(v) = &self.verification {
            pf.set_verifier::<S::Error>(Verifier { s: &v.s, w: &v.w })
                .map_err(session)?;
        }
        let head = match &self.local_lm_head {
            Some(w) if self.measure_lm_head => HeadPlacement::Measured {
                weights: w.clone(),
                offload: None,
                local: None,
                steps: 0,
                local_steps: 0,
            },
            Some(w) => {
                pf.set_local_lm_head(w.clone());
                HeadPlacement::Fixed
            }
            None => HeadPlacement::Fixed,
        };
        let reconnects = self.link.reconnects;
        let mut stepper = PrivateStepper {
            pf,
            link: &mut self.link,
            source,
            head,
            last_head: (0.0, 0),
        };
        let (cached, fresh) = prompt.split_at(kept);
        let (tokens, mut stats) = token_loop(
            &mut stepper,
            cached,
            fresh,
            opts,
            capacity,
            scratch,
            on_token,
        )?;
        if self.keep_cache {
            // The cache holds the prompt and every generated token but the last (not fed).
            let mut held = prompt.to_vec();
            held.extend_from_slice(&tokens[..tokens.len().saturating_sub(1)]);
            if held.len() == stepper.position() {
                self.cached = held;
            }
        }
        stats.cached_tokens = kept;
        if let HeadPlacement::Measured {
            steps, local_steps, ..
        } = stepper.head
        {
            stats.lm_head_local_steps = Some((local_steps, steps));
        }
        stats.reconnects = self.link.reconnects - reconnects;
        Ok((tokens, stats))
    }
}
