//! Continuous batching: the rows that concurrent clients send for the same layer are multiplied
//! in one matrix product, so a layer's weights are read once per batch instead of once per client.
//!
//! Connections register ([`Batcher::register`]) and [`Batcher::submit_as`] one job per `Compute`
//! request (its already validated, still masked rows, in the connection's own buffer) and await
//! the products (in the connection's own output buffer). A few compute threads share one queue. A free thread
//! first helps with a running batch (below); otherwise it forms a batch: the oldest job and every
//! queued job for the same layer (with convoys: see below), up to
//! [`BatchConfig::max_rows`] rows and [`BatchConfig::max_input_words`] words. There is no
//! artificial delay by default: a batch is whatever was waiting, so a lone client is served at
//! once, and under load the batches grow by themselves.
//!
//! - Shares: a batch of at least [`BatchConfig::share_min_macs`] multiply-adds is cut into one
//!   range of output channels per thread; idle threads take the shares, and whoever finishes the
//!   last one answers the jobs. A lone client's LM head and a convoy's batches use every core.
//! - Convoys ([`BatchConfig::hold`], off by default): clients walk the same cycle of layers, but
//!   at random phases they rarely meet (measured: 1.3 to 1.5 jobs per batch for 8 clients of
//!   distilgpt2). With a hold, a client just answered is expected at its next layer for a
//!   moment, and queued jobs at that layer or up to half a cycle ahead of it wait for it; of the
//!   rest, the jobs nearest behind other clients go first. Stragglers catch up and clients fall
//!   into step (measured: 7.9 jobs per batch).
//!
//! The queue is bounded ([`BatchConfig::max_queued`]): a handler whose job does not fit waits (it
//! reads nothing more from its client meanwhile), which is the backpressure.
//!
//! Copies: a batch of one job (a lone client, or no other job of its layer waiting) is computed
//! in place, from the job's input buffer into its output buffer; when it is cut into shares, each
//! share's products go to scratch and are copied into the job's output (one copy down). A batch
//! of several jobs gathers their rows side by side (one copy up) and scatters the products back
//! (one copy down): the price of reading the weights once for all of them.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};
use std::{fmt, io, thread};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::{LinearId, LinearKind};

use crate::ServerWeights;

/// How the batcher forms batches.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Compute threads (each runs one batch at a time); at least 1.
    pub threads: usize,
    /// Most rows in one batch (a single larger job still runs, alone).
    pub max_rows: usize,
    /// Most input words in one batch, so the batch's rows stay in the core's cache while the
    /// weights stream past them (a single larger job still runs, alone).
    pub max_input_words: usize,
    /// Most jobs queued or running at once; further submitters wait for room.
    pub max_queued: usize,
    /// After taking a batch smaller than the limits, wait up to this long for more jobs of the
    /// same layer, but only while fewer jobs are in the batch than connections are registered
    /// ([`Batcher::register`]): a lone client never waits. Zero (the default) means take whatever
    /// is waiting, never wait.
    pub window: Duration,
    /// Convoys: after answering a job, expect its client back at its next layer for up to this
    /// long, and hold queued jobs of that layer (or of layers up to half a decode step ahead)
    /// until it arrives, so that clients drift into step and their rows share passes over the
    /// weights. A lone client never waits (its own arrival is the one expected), but a client
    /// ahead of others may wait up to this long per step: throughput under load for latency. Zero
    /// (the default) turns it off.
    pub hold: Duration,
    /// Batches of at least this many multiply-adds (rows · in · out) are cut into one share of
    /// output channels per compute thread, so that every core works on them (a lone client's LM
    /// head, or a convoy's batches); smaller ones run on one thread, where handing out shares
    /// would cost more than it saves.
    pub share_min_macs: usize,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            threads: thread::available_parallelism().map_or(1, |n| n.get()),
            max_rows: 256,
            // 256 KiB of masked rows: 85 rows of 768 words, 21 of 3072.
            max_input_words: 1 << 16,
            max_queued: 1024,
            window: Duration::ZERO,
            hold: Duration::ZERO,
            // distilgpt2: the LM head (38.6 M) and 8-row batches of every layer; not one row of
            // a 768 x 2304 layer (1.8 M), measured slower when shared.
            share_min_macs: 1 << 21,
        }
    }
}

/// Counters of the batches formed so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Jobs (requests) computed.
    pub jobs: u64,
    /// Batches (kernel passes over a layer's weights) run; `jobs / batches` is the mean batch.
    pub batches: u64,
    /// Rows computed, all jobs together.
    pub rows: u64,
    /// Most rows in one batch.
    pub max_batch_rows: u64,
    /// Most jobs in one batch.
    pub max_batch_jobs: u64,
}

/// The products of one job, or why there are none.
#[derive(Debug)]
pub struct JobFailed;

impl fmt::Display for JobFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the batch computing this request failed")
    }
}

impl std::error::Error for JobFailed {}

impl From<JobFailed> for io::Error {
    fn from(e: JobFailed) -> Self {
        io::Error::other(e)
    }
}

/// A connection counted by [`Batcher::register`]; uncounted on drop.
pub struct Registration {
    shared: Arc<Shared>,
    /// Tells this connection's jobs and convoy expectations apart from others'.
    id: u64,
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Registration({})", self.id)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        // A client that has gone is not waited for.
        let mut q = self.shared.lock();
        q.expected.retain(|e| e.conn != self.id);
        drop(q);
        self.shared.ready.notify_all();
    }
}

/// One request waiting for its products.
struct Job {
    linear: LinearId,
    in_dim: usize,
    out_dim: usize,
    rows: usize,
    /// The connection's input buffer: `rows · in_dim` masked words, then unused space.
    input: Vec<u32>,
    /// The connection's output buffer: the first `rows · out_dim` words get the products.
    output: Vec<u32>,
    reply: oneshot::Sender<(Vec<u32>, Vec<u32>)>,
    /// When it was queued (a convoy never keeps a job waiting much longer than its hold).
    queued_at: Instant,
    /// The submitting connection.
    conn: u64,
    /// The job's place in the bounded queue, given back once it is answered.
    _slot: OwnedSemaphorePermit,
}

struct Queue {
    jobs: VecDeque<Job>,
    /// Shares of running batches waiting for a thread.
    parts: VecDeque<(Arc<BatchWork>, usize)>,
    /// Clients answered a moment ago and the step position they are expected at next.
    expected: Vec<Expected>,
    closed: bool,
}

/// A client expected back at `position` (see [`BatchConfig::hold`]) until `until`.
struct Expected {
    /// The connection.
    conn: u64,
    position: usize,
    until: Instant,
}

#[derive(Default)]
struct Counters {
    jobs: AtomicU64,
    batches: AtomicU64,
    rows: AtomicU64,
    max_batch_rows: AtomicU64,
    max_batch_jobs: AtomicU64,
}

struct Shared {
    weights: Arc<ServerWeights>,
    /// Connections registered as able to submit (the window waits only for them).
    connections: AtomicUsize,
    /// The next [`Registration`] id.
    next_conn: AtomicU64,
    config: BatchConfig,
    queue: Mutex<Queue>,
    ready: Condvar,
    counters: Counters,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // Jobs are plain data and no code panics while holding the lock: a poisoned lock still
        // holds a consistent queue.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Closes the queue when the last [`Batcher`] clone drops; the threads finish what is queued and
/// exit.
struct Handle {
    shared: Arc<Shared>,
    slots: Arc<Semaphore>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.lock().closed = true;
        self.shared.ready.notify_all();
    }
}

/// The batching compute service shared by all connections of a server. Cheap to clone; the
/// threads stop once every clone is dropped and the queue is empty.
#[derive(Clone)]
pub struct Batcher(Arc<Handle>);

impl fmt::Debug for Batcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Batcher")
            .field("config", &self.0.shared.config)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Batcher {
    /// Starts `config.threads` compute threads over `weights`.
    pub fn new(weights: Arc<ServerWeights>, config: BatchConfig) -> io::Result<Batcher> {
        let config = BatchConfig {
            threads: config.threads.max(1),
            max_rows: config.max_rows.max(1),
            max_input_words: config.max_input_words.max(1),
            max_queued: config.max_queued.clamp(1, Semaphore::MAX_PERMITS),
            ..config
        };
        let shared = Arc::new(Shared {
            weights,
            connections: AtomicUsize::new(0),
            next_conn: AtomicU64::new(0),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                parts: VecDeque::new(),
                expected: Vec::new(),
                closed: false,
            }),
            ready: Condvar::new(),
            counters: Counters::default(),
            config,
        });
        let slots = Arc::new(Semaphore::new(shared.config.max_queued));
        let handle = Handle { shared, slots };
        for k in 0..handle.shared.config.threads {
            let shared = handle.shared.clone();
            // On failure `handle` drops, closing the queue for the threads already started.
            thread::Builder::new()
                .name(format!("veil-batch-{k}"))
                .spawn(move || worker(&shared))?;
        }
        Ok(Batcher(Arc::new(handle)))
    }

    /// The limits in force (after clamping).
    pub fn config(&self) -> &BatchConfig {
        &self.0.shared.config
    }

    /// Counts a connection as a possible member of batches until the guard drops (the window,
    /// if any, waits for at most this many jobs).
    pub fn register(&self) -> Registration {
        let shared = &self.0.shared;
        shared.connections.fetch_add(1, Ordering::Relaxed);
        Registration {
            shared: shared.clone(),
            id: shared.next_conn.fetch_add(1, Ordering::Relaxed),
        }
    }

    /// Counters of the batches formed so far.
    pub fn stats(&self) -> BatchStats {
        let c = &self.0.shared.counters;
        BatchStats {
            jobs: c.jobs.load(Ordering::Relaxed),
            batches: c.batches.load(Ordering::Relaxed),
            rows: c.rows.load(Ordering::Relaxed),
            max_batch_rows: c.max_batch_rows.load(Ordering::Relaxed),
            max_batch_jobs: c.max_batch_jobs.load(Ordering::Relaxed),
        }
    }

    /// Multiplies the first `rows` rows of `input` (`[rows][in]`, masked) by layer `linear`'s
    /// matrix into the first `rows · out` words of `output`, possibly in one batch with other
    /// connections' rows for the same layer; returns both buffers (the rest of `output` as it
    /// was). Convoys expect exactly this connection back, whatever layer it comes with next, and
    /// stop waiting for it as soon as its registration drops.
    ///
    /// `linear` must name a layer of the model, `rows` be at least 1 and the buffers hold the
    /// rows and their products (the connection's machine validates all of it); otherwise
    /// [`JobFailed`].
    pub async fn submit_as(
        &self,
        who: &Registration,
        linear: LinearId,
        rows: usize,
        input: Vec<u32>,
        output: Vec<u32>,
    ) -> Result<(Vec<u32>, Vec<u32>), JobFailed> {
        let shared = &self.0.shared;
        let (in_dim, out_dim) = linear.dims(shared.weights.config());
        if !linear.is_valid(shared.weights.config())
            || rows == 0
            || in_dim == 0
            || input.len() < rows * in_dim
            || output.len() < rows * out_dim
        {
            return Err(JobFailed);
        }
        let slot = self
            .0
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| JobFailed)?;
        let (reply, answer) = oneshot::channel();
        {
            let mut q = shared.lock();
            if q.closed {
                return Err(JobFailed);
            }
            // This arrival is the one expected of its connection.
            if let Some(i) = q.expected.iter().position(|e| e.conn == who.id) {
                q.expected.swap_remove(i);
            }
            q.jobs.push_back(Job {
                linear,
                in_dim,
                out_dim,
                rows,
                input,
                output,
                reply,
                queued_at: Instant::now(),
                conn: who.id,
                _slot: slot,
            });
        }
        // A thread may be waiting for this very arrival (a hold), not just for any job.
        shared.ready.notify_all();
        answer.await.map_err(|_| JobFailed)
    }
}

/// What a compute thread does next.
enum Task {
    /// A new batch to split and start.
    Batch(Vec<Job>),
    /// A share of a batch that another thread started.
    Part(Arc<BatchWork>, usize),
}

/// One compute thread: take a share of a running batch, or form a new batch (and share it out);
/// until the queue is closed and empty.
fn worker(shared: &Shared) {
    while let Some(task) = next_task(shared) {
        match task {
            Task::Part(work, k) => run_part(shared, &work, k),
            Task::Batch(jobs) => {
                let cfg = &shared.config;
                let Some(work) =
                    BatchWork::new(&shared.weights, jobs, cfg.threads, cfg.share_min_macs)
                else {
                    continue; // no such matrix: the jobs drop, their handlers see JobFailed
                };
                let work = Arc::new(work);
                if work.parts.len() > 1 {
                    let mut q = shared.lock();
                    for k in 1..work.parts.len() {
                        q.parts.push_back((work.clone(), k));
                    }
                    drop(q);
                    shared.ready.notify_all();
                }
                run_part(shared, &work, 0);
            }
        }
    }
}

/// Shares of started batches come first (they finish batches whose clients are waiting); then a
/// new batch; otherwise wait. `None` once the queue is closed and empty.
fn next_task(shared: &Shared) -> Option<Task> {
    let mut q = shared.lock();
    loop {
        if let Some((work, k)) = q.parts.pop_front() {
            return Some(Task::Part(work, k));
        }
        match next_batch(shared, q) {
            Ok(batch) => return Some(Task::Batch(batch)),
            Err(None) => return None,
            Err(Some(guard)) => q = guard,
        }
    }
}

/// The cycle of requests a decoding client walks: every block's four layers, then the LM head.
/// That every client walks the same cycle is what lets a convoy form.
#[derive(Clone, Copy)]
struct StepCycle {
    n_layer: usize,
}

impl StepCycle {
    fn of(weights: &ServerWeights) -> Self {
        StepCycle {
            n_layer: weights.config().n_layer as usize,
        }
    }

    /// Positions in the cycle.
    fn len(self) -> usize {
        4 * self.n_layer + 1
    }

    /// The LM head's position, the last.
    fn lm_head(self) -> usize {
        4 * self.n_layer
    }

    /// A layer's position: `4 · layer + kind`, the LM head last.
    fn position(self, linear: LinearId) -> usize {
        match linear.kind {
            LinearKind::LmHead => self.lm_head(),
            kind => 4 * linear.layer as usize + kind as usize,
        }
    }

    /// The position after `linear`'s.
    fn next(self, linear: LinearId) -> usize {
        (self.position(linear) + 1) % self.len()
    }

    /// How far position `from` is behind position `to`, walking forward (0: the same place).
    fn behind(self, from: usize, to: usize) -> usize {
        (to + self.len() - from) % self.len()
    }
}

/// Takes the next batch: the oldest job's layer (without convoys, or once it has waited four
/// holds), else among the layers with queued jobs not held for a convoy the one nearest behind
/// another client (then the most rows, then the oldest), plus every queued job for it that fits
/// the limits, plus (with a window) what arrives within it. `Err(Some(guard))`: a share of a batch arrived
/// while waiting, or held jobs' hold ran out, look again; `Err(None)`: closed and empty.
fn next_batch<'a>(
    shared: &'a Shared,
    mut q: MutexGuard<'a, Queue>,
) -> Result<Vec<Job>, Option<MutexGuard<'a, Queue>>> {
    let cfg = &shared.config;
    let cycle = StepCycle::of(&shared.weights);
    let now = Instant::now();
    q.expected.retain(|e| e.until > now);
    if q.jobs.is_empty() {
        if q.closed {
            return Err(None);
        }
        let q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
        return Err(Some(q));
    }
    // Rows queued per layer, in order of first arrival.
    let mut layers: Vec<(LinearId, usize)> = Vec::new();
    for j in &q.jobs {
        match layers.iter_mut().find(|(l, _)| *l == j.linear) {
            Some((_, rows)) => *rows += j.rows,
            None => layers.push((j.linear, j.rows)),
        }
    }
    // A layer is held while a client answered a moment ago is expected to arrive at it or at a
    // layer up to half a cycle behind it: waiting lets that client catch up and join the batch
    // (one pass over the weights for both) instead of both streaming the weights separately.
    let held = |l: LinearId| {
        let p = cycle.position(l);
        q.expected
            .iter()
            .any(|e| cycle.behind(e.position, p) <= cycle.len() / 2)
    };
    let oldest = q
        .jobs
        .front()
        .map(|j| (j.linear, now.duration_since(j.queued_at)));
    let pick = match oldest {
        // No convoys: first come, first served.
        Some((l, _)) if cfg.hold.is_zero() => Some(l),
        // A job that has waited four holds goes next, held or not: holds cannot starve it.
        Some((l, age)) if age >= 4 * cfg.hold => Some(l),
        _ => {
            // The layer nearest behind another queued or expected client goes first: it closes
            // the gap, and the one ahead waits for it (serving the one ahead, even with more
            // rows, would keep the distance forever). Then more rows, then the oldest.
            let gap = |l: LinearId| {
                let p = cycle.position(l);
                let queued = layers.iter().map(|(o, _)| cycle.position(*o));
                let expected = q.expected.iter().map(|e| e.position);
                queued
                    .chain(expected)
                    .map(|o| cycle.behind(p, o))
                    .filter(|&d| d > 0)
                    .min()
                    .unwrap_or(cycle.len())
            };
            let mut pick: Option<(LinearId, usize, usize)> = None;
            for &(l, rows) in &layers {
                if held(l) {
                    continue;
                }
                let g = gap(l);
                // Strictly better to replace: among full ties the oldest stays.
                if pick.is_none_or(|(_, best, bg)| g < bg || (g == bg && rows > best)) {
                    pick = Some((l, rows, g));
                }
            }
            pick.map(|(l, _, _)| l)
        }
    };
    let Some(linear) = pick else {
        // Everything queued is held: wait for an arrival or the first hold to run out.
        let until = q.expected.iter().map(|e| e.until).min().unwrap_or(now);
        let q = shared
            .ready
            .wait_timeout(q, until.saturating_duration_since(now))
            .unwrap_or_else(|p| p.into_inner())
            .0;
        return Err(Some(q));
    };
    let mut rows = 0;
    let mut words = 0;
    let mut batch = Vec::new();
    let deadline = now + cfg.window;
    loop {
        let mut k = 0;
        while k < q.jobs.len() && rows < cfg.max_rows {
            let j = &q.jobs[k];
            // The first job always fits (a single larger job runs alone).
            if j.linear == linear
                && (batch.is_empty()
                    || (rows + j.rows <= cfg.max_rows
                        && words + j.rows * j.in_dim <= cfg.max_input_words))
            {
                let j = q.jobs.remove(k).unwrap_or_else(|| unreachable!());
                rows += j.rows;
                words += j.rows * j.in_dim;
                batch.push(j);
            } else {
                k += 1;
            }
        }
        let now = Instant::now();
        let others = shared.connections.load(Ordering::Relaxed);
        if now >= deadline || rows >= cfg.max_rows || batch.len() >= others || q.closed {
            break;
        }
        // The optional window: wait briefly for more rows of this layer.
        q = shared
            .ready
            .wait_timeout(q, deadline - now)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
    let rest = !q.jobs.is_empty();
    drop(q);
    if rest {
        // Jobs of other layers (or beyond the limits) are left: another thread may take them.
        shared.ready.notify_one();
    }
    Ok(batch)
}

/// A batch being computed: its rows (the lone job's own buffer, or several jobs' rows gathered
/// side by side), its output channels cut into one share per compute thread (each share's
/// weights read once for all rows), the shares' products, and the jobs to answer once the last
/// share is done.
struct BatchWork {
    linear: LinearId,
    in_dim: usize,
    out_dim: usize,
    rows: usize,
    /// `rows · in_dim` words or more: a lone job's input buffer (moved here and back, not
    /// copied), or the gathered rows of several jobs. Shares read it at once.
    input: RwLock<Vec<u32>>,
    /// `input` is the lone job's buffer.
    lone: bool,
    /// Output channel range of each share.
    parts: Vec<std::ops::Range<usize>>,
    /// Products of each share, `[rows][range]` (unused when a lone job is computed in one share:
    /// then the kernel writes the job's output buffer directly).
    products: Vec<Mutex<Vec<u32>>>,
    jobs: Mutex<Vec<Job>>,
    /// Shares not yet done; whoever finishes the last one answers the jobs.
    remaining: AtomicUsize,
    /// A share panicked: the jobs are dropped unanswered (their handlers see `JobFailed`).
    failed: std::sync::atomic::AtomicBool,
}

impl BatchWork {
    /// `None` if the layer has no matrix (the machine validated it, so never in practice); the
    /// jobs then drop unanswered and their handlers see `JobFailed`.
    fn new(
        weights: &ServerWeights,
        mut jobs: Vec<Job>,
        threads: usize,
        share_min_macs: usize,
    ) -> Option<BatchWork> {
        let first = jobs.first()?;
        let (linear, in_dim, out_dim) = (first.linear, first.in_dim, first.out_dim);
        weights.matrix(linear)?;
        let rows: usize = jobs.iter().map(|j| j.rows).sum();
        let lone = jobs.len() == 1;
        let input = if lone {
            std::mem::take(&mut jobs[0].input)
        } else {
            // The one copy of a multi-job batch's rows: gathered side by side for the kernel.
            let mut input = Vec::with_capacity(rows * in_dim);
            for job in &jobs {
                input.extend_from_slice(&job.input[..job.rows * in_dim]);
            }
            input
        };
        let shares = if rows * in_dim * out_dim >= share_min_macs {
            threads.clamp(1, out_dim.max(1))
        } else {
            1
        };
        // Shares of whole groups of 8 channels (the kernels' vector width) where possible.
        let unit = out_dim.div_ceil(shares).next_multiple_of(8);
        let parts: Vec<_> = (0..out_dim)
            .step_by(unit.max(1))
            .map(|j0| j0..(j0 + unit).min(out_dim))
            .collect();
        Some(BatchWork {
            linear,
            in_dim,
            out_dim,
            rows,
            input: RwLock::new(input),
            lone,
            products: parts.iter().map(|_| Mutex::new(Vec::new())).collect(),
            remaining: AtomicUsize::new(parts.len()),
            parts,
            jobs: Mutex::new(jobs),
            failed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Computed in one share straight into the lone job's output buffer.
    fn in_place(&self) -> bool {
        self.lone && self.parts.len() == 1
    }
}

/// Computes share `k` of `work`; the thread finishing the last share answers every job.
fn run_part(shared: &Shared, work: &BatchWork, k: usize) {
    let range = work.parts[k].clone();
    let done = catch_unwind(AssertUnwindSafe(|| {
        let w = shared
            .weights
            .matrix(work.linear)
            .unwrap_or_else(|| unreachable!("checked in BatchWork::new"));
        let w = &w[range.start * work.in_dim..range.end * work.in_dim];
        let input = work.input.read().unwrap_or_else(|p| p.into_inner());
        let x = &input[..work.rows * work.in_dim];
        if work.in_place() {
            let mut jobs = work.jobs.lock().unwrap_or_else(|p| p.into_inner());
            let y = &mut jobs[0].output[..work.rows * work.out_dim];
            matmul_u32_i8(x, w, work.in_dim, range.len(), y);
        } else {
            let mut out = vec![0u32; work.rows * range.len()];
            matmul_u32_i8(x, w, work.in_dim, range.len(), &mut out);
            *work.products[k].lock().unwrap_or_else(|p| p.into_inner()) = out;
        }
    }));
    if done.is_err() {
        work.failed.store(true, Ordering::Relaxed);
    }
    if work.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
        // A panic while answering drops the unanswered replies (their handlers see `JobFailed`);
        // the thread lives on.
        let _ = catch_unwind(AssertUnwindSafe(|| finish(shared, work)));
    }
}

/// Scatters every share's products to the jobs' rows (unless computed in place) and answers
/// them (or, if a share failed, drops them), counts the batch, and expects each client back at
/// its next layer.
fn finish(shared: &Shared, work: &BatchWork) {
    let jobs = std::mem::take(&mut *work.jobs.lock().unwrap_or_else(|p| p.into_inner()));
    if work.failed.load(Ordering::Relaxed) {
        return;
    }
    let mut jobs = jobs;
    if work.lone {
        // The lone job's input buffer goes back to it.
        let mut input = work.input.write().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = jobs.first_mut() {
            job.input = std::mem::take(&mut *input);
        }
    }
    if !work.in_place() {
        for (range, products) in work.parts.iter().zip(&work.products) {
            let products = products.lock().unwrap_or_else(|p| p.into_inner());
            let mut rows = products.chunks_exact(range.len().max(1));
            for job in jobs.iter_mut() {
                for r in 0..job.rows {
                    let at = r * work.out_dim;
                    if let Some(src) = rows.next() {
                        job.output[at + range.start..at + range.end].copy_from_slice(src);
                    }
                }
            }
        }
    }
    let c = &shared.counters;
    c.jobs.fetch_add(jobs.len() as u64, Ordering::Relaxed);
    c.batches.fetch_add(1, Ordering::Relaxed);
    c.rows.fetch_add(work.rows as u64, Ordering::Relaxed);
    c.max_batch_rows
        .fetch_max(work.rows as u64, Ordering::Relaxed);
    c.max_batch_jobs
        .fetch_max(jobs.len() as u64, Ordering::Relaxed);
    if !shared.config.hold.is_zero() {
        let next = StepCycle::of(&shared.weights).next(work.linear);
        let until = Instant::now() + shared.config.hold;
        let mut q = shared.lock();
        for job in &jobs {
            q.expected.push(Expected {
                conn: job.conn,
                position: next,
                until,
            });
        }
    }
    for job in jobs {
        // The handler may have gone (its client vanished): nothing to do.
        let _ = job.reply.send((job.input, job.output));
    }
}
