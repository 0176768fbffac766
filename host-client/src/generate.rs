//! The generation loop, shared by the private path (a server computes every linear layer on masked
//! rows) and the local reference (the same integer pipeline with local kernels).

use std::io::{Read, Write};
use std::time::Instant;

use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use veil_core::mask::MaskKey;
use veil_core::model::{
    sample, ClientWeights, Forward, ForwardError, KvCache, KvSizes, LinearWeights, LogitRows,
    SampleError, SamplingParams, StepState, Workspace, WorkspaceSizes,
};
use veil_core::model::{LinearId, LinearKind};
use veil_core::session::{PrivateForward, SessionError, SessionSizes, UnmaskSource, Verifier};

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
    /// Stop at this token (end of text).
    pub eos: Option<u32>,
    /// Rows per prefill step.
    pub prefill_rows: usize,
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
}

fn add_stats(a: WireStats, b: WireStats) -> WireStats {
    WireStats {
        bytes_up: a.bytes_up + b.bytes_up,
        bytes_down: a.bytes_down + b.bytes_down,
        round_trips: a.round_trips + b.round_trips,
    }
}

/// Why generation stopped early.
#[derive(Debug, thiserror::Error)]
pub enum GenError<E: std::fmt::Debug> {
    /// The forward pass refused (context full, bad token...).
    #[error("{0}")]
    Forward(ForwardError),
    /// The mask source failed.
    #[error("mask source: {0:?}")]
    Source(E),
    /// A reply failed its integrity check: the server altered a result.
    #[error("integrity check failed: the server's reply for block {} {:?} was altered (after {generated} generated tokens); no token computed from it was used", .linear.layer, .linear.kind)]
    Integrity {
        /// The layer.
        linear: veil_core::model::LinearId,
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
}

impl<E: std::fmt::Debug> From<SessionError<E>> for GenError<E> {
    fn from(e: SessionError<E>) -> Self {
        match e {
            SessionError::Forward(f) => GenError::Forward(f),
            SessionError::Source(s) => GenError::Source(s),
            SessionError::IntegrityFailure(linear) => GenError::Integrity {
                linear,
                generated: 0,
            },
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
}

impl Buffers {
    /// Buffers for prefill steps of `rows` rows and a context of `capacity` positions.
    pub fn new(cfg: &veil_core::model::ModelConfig, rows: usize, capacity: usize) -> Self {
        let sizes = WorkspaceSizes::new(cfg, rows, LogitRows::Last, capacity);
        let kv = KvSizes::new(cfg, capacity);
        let s = SessionSizes::new(cfg, rows);
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
        }
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

/// Runs one step (a prefill chunk or one decoded token).
type StepFn<'s, E> = dyn FnMut(&[u32]) -> Result<(), GenError<E>> + 's;

/// KV positions a generation needs: the prompt and the new tokens, at most the model's context.
/// Sizing the cache by need rather than by `n_positions` keeps a short generation's memory small
/// (distilgpt2's full 1024-position cache is 19 MB).
fn kv_capacity(cfg: &veil_core::model::ModelConfig, prompt: &[u32], opts: &GenOptions) -> usize {
    (prompt.len() + opts.max_new_tokens).min(cfg.n_positions as usize)
}

/// Drives token selection and timing around a "run one step" closure.
fn drive<E: std::fmt::Debug>(
    prompt: &[u32],
    opts: &GenOptions,
    capacity: usize,
    step: &mut StepFn<'_, E>,
    pick: &mut dyn FnMut(u32) -> Result<u32, SampleError>,
    on_token: &mut dyn FnMut(u32),
) -> Result<(Vec<u32>, GenStats), GenError<E>> {
    let mut stats = GenStats {
        prompt_tokens: prompt.len(),
        ..Default::default()
    };
    let mut rng = ChaCha20Rng::seed_from_u64(opts.seed);
    let t0 = Instant::now();
    for chunk in prompt.chunks(opts.prefill_rows.max(1)) {
        step(chunk)?;
    }
    stats.prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut out = Vec::new();
    let (t1, c1) = (Instant::now(), cpu_ms());
    let mut decode_steps = 0usize;
    loop {
        let t = pick(rng.next_u32()).map_err(GenError::Sample)?;
        out.push(t);
        on_token(t);
        if out.len() >= opts.max_new_tokens
            || Some(t) == opts.eos
            || prompt.len() + out.len() >= capacity
        {
            break;
        }
        step(&[t])?;
        decode_steps += 1;
    }
    stats.generated_tokens = out.len();
    if decode_steps > 0 {
        stats.decode_ms_per_token = t1.elapsed().as_secs_f64() * 1e3 / decode_steps as f64;
        stats.client_cpu_ms_per_token = (cpu_ms() - c1) / decode_steps as f64;
    }
    Ok((out, stats))
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
    let mut bufs = Buffers::new(&cfg, opts.prefill_rows.min(prompt.len()).max(1), capacity);
    let (fwd, _, scratch) = bufs.forward(client).map_err(GenError::Forward)?;
    let fwd = std::cell::RefCell::new(fwd);
    let mut step = |tokens: &[u32]| {
        fwd.borrow_mut()
            .step_locally(linear, tokens)
            .map_err(GenError::Forward)
    };
    let sampling = opts.sampling;
    let mut pick = |u: u32| sample(fwd.borrow().logits().unwrap_or(&[]), &sampling, u, scratch);
    drive(prompt, opts, capacity, &mut step, &mut pick, on_token)
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

/// Generates privately without checking replies; see [`generate_private_checked`].
pub fn generate_private<S: UnmaskSource, R: Read, W: Write>(
    client: ClientWeights<'_>,
    conn: &mut Connection<R, W>,
    source: &mut S,
    key: MaskKey,
    prompt: &[u32],
    opts: &GenOptions,
    on_token: &mut dyn FnMut(u32),
) -> Result<(Vec<u32>, GenStats), GenError<S::Error>> {
    generate_private_checked(client, conn, source, key, None, prompt, opts, on_token)
}

/// Generates privately: every linear layer goes to the server over `conn`, masked with `key`,
/// unmasked with terms from `source`, and (with `verification`) every reply checked before use.
/// Per decoded token: one round trip per linear layer.
#[allow(clippy::too_many_arguments)]
pub fn generate_private_checked<S: UnmaskSource, R: Read, W: Write>(
    client: ClientWeights<'_>,
    conn: &mut Connection<R, W>,
    source: &mut S,
    key: MaskKey,
    verification: Option<&Verification>,
    prompt: &[u32],
    opts: &GenOptions,
    on_token: &mut dyn FnMut(u32),
) -> Result<(Vec<u32>, GenStats), GenError<S::Error>> {
    generate_private_resumable(
        client,
        conn,
        source,
        key,
        verification,
        prompt,
        opts,
        on_token,
        None,
        None,
    )
}

/// How to carry on when the server connection breaks mid-generation.
pub struct Resume<'r, R: Read, W: Write> {
    /// Opens (and handshakes) a new connection.
    pub reconnect: &'r mut dyn FnMut() -> Result<Connection<R, W>, TransportError>,
    /// Reconnections allowed over the whole generation.
    pub retries: usize,
}

impl<R: Read, W: Write> std::fmt::Debug for Resume<'_, R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resume")
            .field("retries", &self.retries)
            .finish_non_exhaustive()
    }
}

/// As [`generate_private_checked`], and when the connection breaks, reconnects (up to
/// `resume.retries` times) and redoes the interrupted step from its start with fresh slots, so
/// fresh masks: the KV cache holds only completed steps, and no mask is ever sent twice.
#[allow(clippy::too_many_arguments)]
pub fn generate_private_resumable<S: UnmaskSource, R: Read, W: Write>(
    client: ClientWeights<'_>,
    conn: &mut Connection<R, W>,
    source: &mut S,
    key: MaskKey,
    verification: Option<&Verification>,
    prompt: &[u32],
    opts: &GenOptions,
    on_token: &mut dyn FnMut(u32),
    mut resume: Option<Resume<'_, R, W>>,
    local_lm_head: Option<&LinearWeights<'_>>,
) -> Result<(Vec<u32>, GenStats), GenError<S::Error>> {
    let cfg = *client.config();
    let capacity = kv_capacity(&cfg, prompt, opts);
    let rows = opts
        .prefill_rows
        .min(conn.max_rows())
        .min(prompt.len())
        .max(1);
    let mut bufs = Buffers::new(&cfg, rows, capacity);
    let (fwd, [m, r, y, u], scratch) = bufs.forward(client).map_err(GenError::Forward)?;
    let mut pf = PrivateForward::new::<S::Error>(fwd, key, m, r, y, u)?;
    if let Some(v) = verification {
        pf.set_verifier::<S::Error>(Verifier { s: &v.s, w: &v.w })?;
    }
    let pf = std::cell::RefCell::new(pf);
    let generated = std::cell::Cell::new(0usize);
    // Traffic of connections given up on, and how many times we reconnected.
    let carried = std::cell::Cell::new(WireStats::default());
    let reconnects = std::cell::Cell::new(0usize);
    let wire_at_decode = std::cell::Cell::new(None::<WireStats>);
    let mut step = |tokens: &[u32]| -> Result<(), GenError<S::Error>> {
        if tokens.len() == 1 && wire_at_decode.get().is_none() && generated.get() > 0 {
            wire_at_decode.set(Some(add_stats(carried.get(), conn.stats)));
        }
        let mut pf = pf.borrow_mut();
        pf.begin(tokens, source)?;
        loop {
            if let (
                Some(w),
                Some(LinearId {
                    kind: LinearKind::LmHead,
                    ..
                }),
            ) = (local_lm_head, pf.pending())
            {
                if pf.complete_locally::<S::Error>(w)? == StepState::Done {
                    return Ok(());
                }
                continue;
            }
            let exchanged = pf
                .exchange(|out, reply| conn.compute(out.linear, out.rows, out.masked, reply))
                .ok_or(GenError::Forward(ForwardError::NoPendingRequest))?;
            if let Err(err) = exchanged {
                pf.abort_step();
                let fail = |source| GenError::Transport {
                    source,
                    generated: generated.get(),
                };
                match resume.as_mut() {
                    Some(r) if r.retries > 0 && !matches!(err, TransportError::Refused(_)) => {
                        r.retries -= 1;
                        let old = conn.stats;
                        *conn = (r.reconnect)().map_err(fail)?;
                        carried.set(add_stats(carried.get(), old));
                        reconnects.set(reconnects.get() + 1);
                        // Redo the whole step on the new connection, with new slots.
                        pf.begin(tokens, source)?;
                        continue;
                    }
                    _ => return Err(fail(err)),
                }
            }
            let done = pf.complete(source).map_err(|e| match GenError::from(e) {
                GenError::Integrity { linear, .. } => GenError::Integrity {
                    linear,
                    generated: generated.get(),
                },
                other => other,
            })?;
            if done == StepState::Done {
                return Ok(());
            }
        }
    };
    let sampling = opts.sampling;
    let mut pick = |u: u32| {
        generated.set(generated.get() + 1);
        sample(
            pf.borrow().forward().logits().unwrap_or(&[]),
            &sampling,
            u,
            scratch,
        )
    };
    let (tokens, mut stats) = drive(prompt, opts, capacity, &mut step, &mut pick, on_token)?;
    stats.wire = add_stats(carried.get(), conn.stats);
    stats.reconnects = reconnects.get();
    let decode_steps = stats.generated_tokens.saturating_sub(1);
    if let (Some(w0), true) = (wire_at_decode.get(), decode_steps > 0) {
        let n = decode_steps as f64;
        let w = stats.wire;
        stats.round_trips_per_token = (w.round_trips - w0.round_trips) as f64 / n;
        stats.bytes_up_per_token = (w.bytes_up - w0.bytes_up) as f64 / n;
        stats.bytes_down_per_token = (w.bytes_down - w0.bytes_down) as f64 / n;
    }
    Ok((tokens, stats))
}
