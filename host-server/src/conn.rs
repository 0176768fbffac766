//! One connection: a thin driver of core's [`ServerConnection`].
//!
//! The machine owns the conversation (hello, key check, limits, refusals, pairing, chunking);
//! this module only moves bytes and runs kernels. Its loop: write out what
//! [`ServerConnection::poll_transmit`] encodes, compute a job the machine hands out (in a batch,
//! or alone on the blocking pool), otherwise read into [`ServerConnection::recv_buffer`] within
//! the idle timeout (on expiry, [`ServerConnection::handle_timeout`]; 0 bytes,
//! [`ServerConnection::handle_eof`]). After a refusal whose `Error` frame went out, it lingers and
//! drains briefly so that a reset does not destroy that frame.
//!
//! Copies: the socket reads straight into the machine's frame buffer, the machine decodes each
//! `Data` word into the job's input (one copy up), the kernel reads the job's input and writes
//! the job's output in place (batching may gather and scatter, see [`crate::batch`]), the machine
//! encodes the products straight into the transmit buffer (one copy down), and that buffer is
//! written to the socket as it is.

use std::fmt;
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use rand_core::{OsRng, RngCore as _};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::LinearId;
use veil_core::rlwe::layer::{absorb_inputs, results, store_words};
use veil_core::rlwe::N as RLWE_N;
use veil_core::wire::{
    ComputeJob, Ending, ErrorCode, JobHeader, JobKind, ServerConnection, ServerError,
    ServerSettings, MAX_FRAME,
};

use crate::batch::{Batcher, Registration};
use crate::{OfflineLimit, ServerConfig, ServerWeights};

/// Bytes of a connection's receive buffer (the machine's frame buffer, read into directly): two
/// frames, so a frame straddling its end (moved to the front once) is the exception.
const RX_BYTES: usize = 2 * MAX_FRAME;
/// Bytes of its transmit buffer: room for a `Result` and a full `Data` frame in one write.
const TX_BYTES: usize = 2 * MAX_FRAME;
/// How long a refused connection may stay silent while it is drained after its `Error` frame,
/// and how much of it is drained at most: enough for the rest of any request (the widest offline
/// layer's upload, [`linger_bytes`], is megabytes) so that the client, which sends a whole request
/// before it reads, then reads the `Error` frame instead of a reset.
const LINGER: Duration = Duration::from_secs(2);
pub(crate) const LINGER_BYTES: usize = 1 << 20;

/// The most a refused connection is drained: one frame's worth, or a whole offline layer's input
/// ciphertexts (plus framing) when the server takes offline work.
fn linger_bytes(settings: &ServerSettings) -> usize {
    if settings.offline_inputs == 0 {
        return LINGER_BYTES;
    }
    let widest_in = settings.model.widest_linear().0;
    let upload = widest_in * veil_core::rlwe::INPUT_WORDS * 4;
    LINGER_BYTES.max(upload + upload / 8)
}

/// Why a conversation was cut short.
#[derive(Debug)]
pub enum ConnError {
    /// We refused the client: [`ServerError::code`] was sent as `Error` before closing (if the
    /// transport still allowed).
    Refused(ServerError),
    /// The transport failed, stalled, or the peer vanished in the middle of a frame or request
    /// (then the inner error is the machine's [`ServerError::Truncated`]).
    Io(io::Error),
}

impl ConnError {
    /// The code sent to the client, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ConnError::Refused(e) => e.code(),
            ConnError::Io(_) => None,
        }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Refused(e) => write!(f, "{e}"),
            ConnError::Io(e) => write!(f, "transport: {e}"),
        }
    }
}

impl std::error::Error for ConnError {}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io(e)
    }
}

/// Runs one conversation over `stream` (see [`veil_core::wire`]) and closes it, multiplying each
/// request on its own (no batching; see [`handle_connection_with`]).
///
/// On a refusal the `Error` frame is sent (best effort) before returning; on any other failure the
/// stream is just dropped. Never panics on peer input.
pub async fn handle_connection<S>(
    stream: S,
    weights: Arc<ServerWeights>,
    config: ServerConfig,
) -> Result<Ending, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    handle_connection_with(stream, weights, config, None).await
}

/// [`handle_connection`], with requests multiplied by `batcher` (in batches with other
/// connections' rows for the same layer) when there is one. Validation, limits and error codes are
/// the same either way: they are the machine's.
pub async fn handle_connection_with<S>(
    mut stream: S,
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    batcher: Option<Batcher>,
) -> Result<Ending, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let settings = ServerSettings {
        model: *weights.config(),
        fingerprint: weights.fingerprint(),
        max_rows: config.max_rows,
        psk: config.psk,
        offline_inputs: config.offline_inputs,
        weights_bytes: if config.serve_weights {
            weights.bytes().len() as u64
        } else {
            0
        },
    };
    // Registered for as long as the connection lives.
    let compute = match batcher {
        Some(b) => {
            let me = b.register();
            Compute::Batched(b, me)
        }
        None => Compute::Alone(weights.clone()),
    };
    converse(
        &mut stream,
        settings,
        &compute,
        &Offline {
            weights: weights.clone(),
            limit: config.offline_layers.clone(),
        },
        config.idle_timeout,
        &|| weights.count_computed(),
    )
    .await
}

/// The matrices products are computed with: [`ServerWeights`] (the driver's tests substitute a
/// lookup that fails).
trait Matrices: Send + Sync + 'static {
    /// Layer `id`'s `[out][in]` int8 matrix, if there is one.
    fn matrix(&self, id: LinearId) -> Option<&[u8]>;
    /// The whole `linear.veil`, for a client that downloads it.
    fn file(&self) -> &[u8];
}

impl Matrices for ServerWeights {
    fn matrix(&self, id: LinearId) -> Option<&[u8]> {
        ServerWeights::matrix(self, id)
    }

    fn file(&self) -> &[u8] {
        self.bytes()
    }
}

/// Where a connection's products are computed.
enum Compute<M> {
    /// In shared batches, as this registered connection.
    Batched(Batcher, Registration),
    /// Alone, on the blocking pool.
    Alone(Arc<M>),
}

type Job = ComputeJob<Vec<u32>>;

/// A job whose buffers were lost with a failed computation: enough to refuse it (the machine
/// closes the conversation and never reads them).
fn lost(header: JobHeader) -> Job {
    ComputeJob::from_parts(header, Vec::new(), Vec::new())
}

impl<M: Matrices> Compute<M> {
    /// Computes the products of `job` into its output; true when they are there, false when
    /// they could not be computed.
    async fn run(&self, job: Job) -> (Job, bool) {
        let h = job.header();
        match self {
            Compute::Batched(batcher, me) => {
                // The buffers move to the batcher and back: no copy.
                let (h, input, output) = job.into_parts();
                match batcher.submit_as(me, h.linear, h.rows, input, output).await {
                    Ok((input, output)) => (ComputeJob::from_parts(h, input, output), true),
                    Err(_) => (lost(h), false),
                }
            }
            Compute::Alone(m) => {
                let m = m.clone();
                let task = tokio::task::spawn_blocking(move || {
                    let mut job = job;
                    let done = catch_unwind(AssertUnwindSafe(|| multiply(&*m, &mut job)));
                    let ok = matches!(done, Ok(true));
                    (job, ok)
                });
                task.await.unwrap_or_else(|_| (lost(h), false))
            }
        }
    }
}

/// The product of a job alone, in place (its input read, its output written); false when the
/// layer has no matrix of the job's shape.
fn multiply(m: &impl Matrices, job: &mut Job) -> bool {
    let (in_dim, out_dim) = (job.in_dim, job.out_dim);
    let Some(w) = m.matrix(job.linear).filter(|w| w.len() == in_dim * out_dim) else {
        return false;
    };
    let (x, y) = job.split();
    matmul_u32_i8(x, w, in_dim, out_dim, y);
    true
}

/// What offline steps need: the weights, and the server-wide limit on layers in progress.
struct Offline<M> {
    weights: Arc<M>,
    limit: OfflineLimit,
}

/// A connection's offline layer in progress: its input ciphertexts and its share of the limit.
struct OfflineStore {
    words: Vec<u64>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// One step of an offline layer on the blocking pool: keep input ciphertexts in `store`
/// (allocated at the layer's first step), or compute results from it (dropped after the last),
/// the outputs shared among the CPUs. Returns the job, the store to keep, and whether it
/// succeeded.
async fn offline_step<M: Matrices>(
    job: Job,
    store: Option<OfflineStore>,
    weights: Arc<M>,
) -> (Job, Option<OfflineStore>, bool) {
    let h = job.header();
    let task = tokio::task::spawn_blocking(move || {
        let mut job = job;
        let mut store = store;
        let done = catch_unwind(AssertUnwindSafe(|| {
            offline_compute(&*weights, &mut job, &mut store)
        }));
        let ok = matches!(done, Ok(true));
        (job, if ok { store } else { None }, ok)
    });
    task.await.unwrap_or_else(|_| (lost(h), None, false))
}

fn offline_compute<M: Matrices>(m: &M, job: &mut Job, store: &mut Option<OfflineStore>) -> bool {
    let in_dim = job.in_dim;
    match job.kind {
        JobKind::OfflineInputs { seed, first, count } => {
            let Some(s) = store.as_mut() else {
                return false;
            };
            if first == 0 {
                s.words = vec![0u64; store_words(in_dim)];
            }
            if s.words.len() != store_words(in_dim) {
                return false;
            }
            absorb_inputs(&seed, first, count, job.offline_inputs(), &mut s.words);
            true
        }
        JobKind::OfflineResults {
            first,
            count,
            switch,
        } => {
            let (Some(s), Some(w)) = (
                store.as_ref().map(|s| &s.words),
                m.matrix(job.linear)
                    .filter(|w| w.len() == in_dim * job.out_dim),
            ) else {
                return false;
            };
            let rw = switch.result_words();
            let out = job.offline_results_mut();
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(count);
            let per = count.div_ceil(threads.max(1));
            std::thread::scope(|scope| {
                for (t, part) in out.chunks_mut(per * rw).enumerate() {
                    let j0 = first + t * per;
                    let n = part.len() / rw;
                    scope.spawn(move || {
                        lower_priority();
                        let mut tmp = vec![0u64; n * 2 * RLWE_N];
                        results(s, w, in_dim, j0..j0 + n, switch, &mut tmp, part);
                    });
                }
            });
            if first + count == job.out_dim {
                *store = None;
            }
            true
        }
        JobKind::Weights { first, count } => {
            // Little-endian words of the file, zero past its end.
            let bytes = m.file().get(first * 4..).unwrap_or(&[]);
            let out = job.weights_mut();
            out.fill(0);
            for (w, c) in out.iter_mut().zip(bytes.chunks(4)) {
                let mut le = [0u8; 4];
                le[..c.len()].copy_from_slice(c);
                *w = u32::from_le_bytes(le);
            }
            out.len() == count
        }
        JobKind::Products => false,
    }
}

/// Makes the calling thread yield to the online work (which users wait for token by token): the
/// offline phase fills pools in the background. Best effort: a refusal changes nothing else.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: setpriority only reads its arguments; with `who = 0` it applies to the calling
    // thread on Linux (its threads are scheduled entities of their own).
    unsafe {
        libc::setpriority(libc::PRIO_PROCESS, 0, 10);
    }
}

/// One conversation over `stream` with a fresh machine; closes (or lingers after a refusal).
async fn converse<S, M>(
    stream: &mut S,
    settings: ServerSettings,
    compute: &Compute<M>,
    offline: &Offline<M>,
    idle: Duration,
    computed: &(dyn Fn() + Sync),
) -> Result<Ending, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
    M: Matrices,
{
    let mut nonce = [0u8; 32];
    OsRng
        .try_fill_bytes(&mut nonce)
        .map_err(|e| io::Error::other(format!("OS random numbers: {e}")))?;
    let (input, output) = (settings.input_words(), settings.output_words());
    let drain = linger_bytes(&settings);
    let mut conn = ServerConnection::new(
        settings,
        nonce,
        vec![0u8; RX_BYTES].into_boxed_slice(),
        vec![0u32; input],
        vec![0u32; output],
    )
    .map_err(io::Error::other)?;
    let mut tx = vec![0u8; TX_BYTES].into_boxed_slice();
    let transport = drive(stream, &mut conn, &mut tx, compute, offline, idle, computed).await;
    match (conn.outcome(), transport) {
        (Some(Err(e)), transport) if e.code().is_some() => {
            // The Error frame is out, unless the transport failed on the way.
            if transport.is_ok() {
                linger(stream, &mut tx, idle, drain).await;
            }
            Err(ConnError::Refused(e))
        }
        (_, Err(e)) => Err(ConnError::Io(e)),
        (Some(Ok(end)), Ok(())) => {
            let _ = tokio::time::timeout(idle, stream.shutdown()).await;
            Ok(end)
        }
        // Truncated: the client vanished inside a frame or a request; nothing was sent.
        (Some(Err(e)), Ok(())) => Err(ConnError::Io(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            e,
        ))),
        (None, Ok(())) => Err(ConnError::Io(io::Error::other(
            "the conversation stopped without an outcome",
        ))),
    }
}

/// Moves bytes and jobs until the machine is closed. `Err` only for transport failures (and a
/// client that does not read our frames within `idle`).
async fn drive<S, M>(
    s: &mut S,
    conn: &mut ServerConnection<Box<[u8]>, Vec<u32>>,
    tx: &mut [u8],
    compute: &Compute<M>,
    offline: &Offline<M>,
    idle: Duration,
    computed: &(dyn Fn() + Sync),
) -> io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    M: Matrices,
{
    // The offline layer's input ciphertexts, while one is in progress.
    let mut store: Option<OfflineStore> = None;
    loop {
        // Frames due, encoded by the machine straight into `tx`, written as they are.
        loop {
            let n = conn.poll_transmit(tx);
            if n == 0 {
                break;
            }
            let frames = &tx[..n];
            let write = async {
                s.write_all(frames).await?;
                s.flush().await
            };
            within(idle, write).await?;
        }
        if conn.is_closed() {
            return Ok(());
        }
        if let Some(job) = conn.poll_job() {
            if job.kind != JobKind::Products {
                let starts = matches!(job.kind, JobKind::OfflineInputs { first: 0, .. });
                if starts && store.is_none() {
                    // Waits while other connections' layers hold the limit.
                    let Ok(permit) = offline.limit.0.clone().acquire_owned().await else {
                        conn.fail_job(job);
                        continue;
                    };
                    store = Some(OfflineStore {
                        words: Vec::new(),
                        _permit: permit,
                    });
                }
                let (job, kept, ok) =
                    offline_step(job, store.take(), offline.weights.clone()).await;
                store = kept;
                if ok {
                    conn.finish_job(job);
                } else {
                    conn.fail_job(job);
                }
                continue;
            }
            match compute.run(job).await {
                (job, true) => {
                    computed();
                    conn.finish_job(job);
                }
                (job, false) => conn.fail_job(job),
            }
            continue;
        }
        // Nothing to send, no job: the machine waits for the client (anything else would be a
        // fault of the machine; better a closed connection than a spin).
        if !conn.wants_input() {
            return Err(io::Error::other("the connection machine stalled"));
        }
        let buf = conn.recv_buffer();
        if buf.is_empty() {
            return Err(io::Error::other(
                "the connection machine has no room for input",
            ));
        }
        // Straight into the machine's frame buffer.
        match tokio::time::timeout(idle, s.read(buf)).await {
            Err(_) => conn.handle_timeout(),
            Ok(Ok(0)) => conn.handle_eof(),
            Ok(Ok(n)) => conn.handle_received(n),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// `fut` within `limit`, or a `TimedOut` error: the client does not read what we send.
async fn within<T>(
    limit: Duration,
    fut: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, fut).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client did not read our frames within {limit:?}"),
        )
    })?
}

/// After the `Error` frame: shut our side down, then read and discard what the peer still sends,
/// briefly. Closing a socket with unread input makes the kernel send a reset, which can destroy
/// our `Error` frame before the peer reads it; lingering a moment lets the peer see it.
pub(crate) async fn linger<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut [u8],
    idle: Duration,
    max_bytes: usize,
) {
    if !matches!(
        tokio::time::timeout(idle, stream.shutdown()).await,
        Ok(Ok(()))
    ) {
        return;
    }
    // Each read may wait `LINGER`: a client still sending keeps being drained, up to `max_bytes`.
    let mut total = 0;
    while total < max_bytes {
        match tokio::time::timeout(LINGER, stream.read(buf)).await {
            Ok(Ok(n)) if n > 0 => total += n,
            _ => break,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_core::model::{LinearKind, ModelConfig};
    use veil_core::wire::{
        decode_body, encode_frame, Message, WordBytes, LEN_PREFIX, PROTOCOL_VERSION,
    };

    const CFG: ModelConfig = ModelConfig {
        n_layer: 2,
        n_embd: 16,
        n_head: 2,
        n_positions: 16,
        vocab_size: 100,
        n_inner: 64,
        family: veil_core::model::Family::Gpt2,
    };

    /// Weights whose every lookup fails.
    struct NoMatrices;

    impl Matrices for NoMatrices {
        fn matrix(&self, _: LinearId) -> Option<&[u8]> {
            None
        }

        fn file(&self) -> &[u8] {
            &[]
        }
    }

    fn frames(msgs: &[Message<'_>]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; MAX_FRAME];
        for m in msgs {
            let n = encode_frame(m, &mut buf).unwrap();
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    /// Without batching, a failed matrix lookup is refused `ComputeFailed`, never answered with
    /// zeros (which the client would take for products).
    #[tokio::test]
    async fn test_failed_lookup_without_batching_is_compute_failed() {
        let fingerprint = [7; 32];
        let settings = ServerSettings {
            model: CFG,
            fingerprint,
            max_rows: 4,
            psk: None,
            offline_inputs: 0,
            weights_bytes: 0,
        };
        let words = [0x5Au8; 64];
        let script = frames(&[
            Message::Hello {
                protocol: PROTOCOL_VERSION,
                fingerprint,
            },
            Message::Compute {
                request: 3,
                linear: LinearId {
                    layer: 0,
                    kind: LinearKind::Qkv,
                },
                rows: 1,
            },
            Message::Data {
                words: WordBytes(&words),
            },
        ]);
        let (mut client, mut server) = tokio::io::duplex(1 << 16);
        let none = Arc::new(NoMatrices);
        let compute = Compute::Alone(none.clone());
        let offline = Offline {
            weights: none,
            limit: OfflineLimit::new(1),
        };
        let counted = std::sync::atomic::AtomicUsize::new(0);
        let count = || {
            counted.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let talk = async {
            client.write_all(&script).await.unwrap();
            client.shutdown().await.unwrap();
            let mut out = Vec::new();
            client.read_to_end(&mut out).await.unwrap();
            out
        };
        let (result, out) = tokio::join!(
            converse(
                &mut server,
                settings,
                &compute,
                &offline,
                Duration::from_secs(5),
                &count
            ),
            talk
        );
        let mut msgs = Vec::new();
        let mut rest = &out[..];
        while !rest.is_empty() {
            let n = u32::from_le_bytes(rest[..LEN_PREFIX].try_into().unwrap()) as usize;
            msgs.push(decode_body(&rest[LEN_PREFIX..LEN_PREFIX + n]).unwrap());
            rest = &rest[LEN_PREFIX + n..];
        }
        assert!(matches!(msgs[0], Message::Welcome { .. }), "{msgs:?}");
        assert_eq!(
            msgs[1..],
            [Message::Error {
                code: ErrorCode::ComputeFailed
            }],
            "no Result, no zeros"
        );
        assert!(matches!(
            result,
            Err(ConnError::Refused(ServerError::ComputeFailed {
                request: 3
            }))
        ));
        assert_eq!(counted.load(std::sync::atomic::Ordering::Relaxed), 0);
    }
}
