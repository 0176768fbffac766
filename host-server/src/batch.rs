//! Continuous batching: the rows that concurrent clients send for the same layer are multiplied
//! in one matrix product, so a layer's weights are read once per batch instead of once per client.
//!
//! Connection handlers [`Batcher::submit`] one job per `Compute` request (its already validated,
//! still masked rows) and await the products. A few compute threads share one queue; whenever a
//! thread is free it takes the oldest job and every other queued job for the same layer (up to
//! [`BatchConfig::max_rows`] rows and [`BatchConfig::max_input_words`] words), concatenates their
//! rows into one input matrix, runs one [`matmul_u32_i8`] (weight row outer, input row inner: each
//! weight row is read once for all rows of the batch), and hands every job exactly the products of
//! its own rows. There is no artificial delay by default: a batch is whatever was waiting when a
//! thread became free, so a lone client is served as fast as before, and under load the batches
//! grow by themselves.
//!
//! The queue is bounded ([`BatchConfig::max_queued`]): a handler whose job does not fit waits (it
//! reads nothing more from its client meanwhile), which is the backpressure.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use std::{fmt, io, thread};

use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::LinearId;

use crate::ServerWeights;

/// Output channels multiplied per kernel call inside a batch of several jobs: bounds the batch's
/// scratch output to `rows · OUT_TILE` words while each weight row is still read once.
const OUT_TILE: usize = 256;

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
pub struct Registration(Arc<Shared>);

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Registration")
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One request waiting for its products.
struct Job {
    linear: LinearId,
    in_dim: usize,
    out_dim: usize,
    rows: usize,
    /// `rows · in_dim` masked words.
    input: Vec<u32>,
    /// `rows · out_dim` words, overwritten with the products.
    output: Vec<u32>,
    reply: oneshot::Sender<(Vec<u32>, Vec<u32>)>,
    /// The job's place in the bounded queue, given back once it is answered.
    _slot: OwnedSemaphorePermit,
}

struct Queue {
    jobs: VecDeque<Job>,
    closed: bool,
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
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
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
        self.0.shared.connections.fetch_add(1, Ordering::Relaxed);
        Registration(self.0.shared.clone())
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

    /// Multiplies `input` (`[rows][in]`, masked) by layer `linear`'s matrix, possibly in one
    /// batch with other connections' rows for the same layer. Returns `input` and `output`
    /// (resized to `rows · out`, holding exactly this job's products) for reuse.
    ///
    /// `linear` must name a layer of the model and `input` must hold whole rows: the handler
    /// validates both before submitting.
    pub async fn submit(
        &self,
        linear: LinearId,
        input: Vec<u32>,
        mut output: Vec<u32>,
    ) -> Result<(Vec<u32>, Vec<u32>), JobFailed> {
        let shared = &self.0.shared;
        let (in_dim, out_dim) = linear.dims(shared.weights.config());
        if !linear.is_valid(shared.weights.config())
            || in_dim == 0
            || !input.len().is_multiple_of(in_dim)
        {
            return Err(JobFailed);
        }
        let rows = input.len() / in_dim;
        output.clear();
        output.resize(rows * out_dim, 0);
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
            q.jobs.push_back(Job {
                linear,
                in_dim,
                out_dim,
                rows,
                input,
                output,
                reply,
                _slot: slot,
            });
        }
        shared.ready.notify_one();
        answer.await.map_err(|_| JobFailed)
    }
}

/// One compute thread: take a batch, multiply, answer; until the queue is closed and empty.
fn worker(shared: &Shared) {
    let mut scratch = Scratch::default();
    while let Some(batch) = next_batch(shared) {
        let rows: usize = batch.iter().map(|j| j.rows).sum();
        // A panicking kernel drops the batch's reply senders: those handlers see `JobFailed`,
        // the thread lives on.
        let done = catch_unwind(AssertUnwindSafe(|| {
            let mut batch = batch;
            run_batch(&shared.weights, &mut batch, &mut scratch);
            batch
        }));
        let Ok(batch) = done else {
            scratch = Scratch::default();
            continue;
        };
        let c = &shared.counters;
        c.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
        c.batches.fetch_add(1, Ordering::Relaxed);
        c.rows.fetch_add(rows as u64, Ordering::Relaxed);
        c.max_batch_rows.fetch_max(rows as u64, Ordering::Relaxed);
        c.max_batch_jobs
            .fetch_max(batch.len() as u64, Ordering::Relaxed);
        for job in batch {
            // The handler may have gone (its client vanished): nothing to do.
            let _ = job.reply.send((job.input, job.output));
        }
    }
}

/// Waits for work and takes the oldest job plus every queued job for the same layer that fits.
/// `None` once the queue is closed and empty.
fn next_batch(shared: &Shared) -> Option<Vec<Job>> {
    let cfg = &shared.config;
    let mut q = shared.lock();
    let first = loop {
        if let Some(job) = q.jobs.pop_front() {
            break job;
        }
        if q.closed {
            return None;
        }
        q = shared.ready.wait(q).unwrap_or_else(|p| p.into_inner());
    };
    let linear = first.linear;
    let mut rows = first.rows;
    let mut words = first.input.len();
    let mut batch = vec![first];
    let deadline = Instant::now() + cfg.window;
    loop {
        let mut k = 0;
        while k < q.jobs.len() && rows < cfg.max_rows {
            let j = &q.jobs[k];
            if j.linear == linear
                && rows + j.rows <= cfg.max_rows
                && words + j.input.len() <= cfg.max_input_words
            {
                let j = q.jobs.remove(k).unwrap_or_else(|| unreachable!());
                rows += j.rows;
                words += j.input.len();
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
    Some(batch)
}

/// A compute thread's reusable buffers for batches of several jobs: at most
/// `max_input_words` and `max_rows · OUT_TILE` words (single jobs use their own buffers).
#[derive(Default)]
struct Scratch {
    input: Vec<u32>,
    output: Vec<u32>,
}

/// Multiplies every job of one batch (all for the same layer) with one pass over the weights.
fn run_batch(weights: &ServerWeights, batch: &mut [Job], scratch: &mut Scratch) {
    let Some(first) = batch.first() else { return };
    let (linear, in_dim, out_dim) = (first.linear, first.in_dim, first.out_dim);
    let Some(w) = weights.matrix(linear) else {
        return;
    };
    if let [job] = batch {
        matmul_u32_i8(&job.input, w, in_dim, out_dim, &mut job.output);
        return;
    }
    // Several jobs: their rows side by side in one input matrix, then the output channels in
    // tiles (each tile's weights read once for all rows), scattered back to each job's rows.
    let rows: usize = batch.iter().map(|j| j.rows).sum();
    scratch.input.clear();
    for job in batch.iter() {
        scratch.input.extend_from_slice(&job.input);
    }
    for j0 in (0..out_dim).step_by(OUT_TILE) {
        let tile = OUT_TILE.min(out_dim - j0);
        scratch.output.clear();
        scratch.output.resize(rows * tile, 0);
        matmul_u32_i8(
            &scratch.input,
            &w[j0 * in_dim..(j0 + tile) * in_dim],
            in_dim,
            tile,
            &mut scratch.output,
        );
        let mut products = scratch.output.chunks_exact(tile);
        for job in batch.iter_mut() {
            for r in 0..job.rows {
                let dst = &mut job.output[r * out_dim + j0..r * out_dim + j0 + tile];
                dst.copy_from_slice(products.next().unwrap_or_else(|| unreachable!()));
            }
        }
    }
}
