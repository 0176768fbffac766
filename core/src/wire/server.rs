//! The server's side of one connection as a sans-IO state machine.
//!
//! The host feeds it bytes ([`ServerConnection::recv_buffer`] and
//! [`ServerConnection::handle_received`], or end of stream, or its idle timer firing), takes
//! [`ComputeJob`]s from it, runs the kernel, hands them back, and writes out what
//! [`ServerConnection::poll_transmit`] encodes. The machine owns everything else: the hello, the
//! pre-shared-key challenge, every limit and refusal, request/result pairing and chunking.
//!
//! A request's words are copied once each way in user space: from the frame buffer into the
//! job's input (little-endian decode), and from the job's output into the transmit buffer.

use super::auth::{PskKey, CLIENT_LABEL, SERVER_LABEL};
use super::chunks::{DataLengthError, WordCursor};
use super::frame::{encode_frame, FrameDecoder, FrameError, MAX_FRAME};
use super::message::{ErrorCode, Message, PROTOCOL_VERSION};
use super::OfflineLayer as Offline;
use crate::model::{LinearId, ModelConfig};
use crate::rlwe::{ModSwitch, Seed, INPUT_WORDS};

/// What the server accepts, fixed for a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSettings {
    /// The shape of the model behind the weights.
    pub model: ModelConfig,
    /// SHA-256 of the server's `linear.veil` (sent in `Welcome`; a client with another is refused).
    pub fingerprint: [u8; 32],
    /// Most rows in one `Compute` (announced in `Welcome`); at least 1.
    pub max_rows: u32,
    /// With a key, a client must prove it holds the same key before anything else.
    pub psk: Option<PskKey>,
    /// Input ciphertexts of the offline phase this connection may send in its lifetime (each
    /// costs the server `out_dim · 2N` multiply-adds); 0 turns the offline phase off.
    pub offline_inputs: u64,
    /// Length of the `linear.veil` the server sends on `FetchWeights` (once per connection);
    /// 0 refuses to send it.
    pub weights_bytes: u64,
}

impl ServerSettings {
    /// Words of the job input buffer a connection needs: `max_rows` rows of the widest input.
    pub fn input_words(&self) -> usize {
        let rows = self.max_rows.max(1) as usize * self.model.widest_linear().0;
        if self.offline_inputs > 0 {
            rows.max(INPUT_WORDS)
        } else {
            rows
        }
    }

    /// Words of the job output buffer: `max_rows` rows of the widest output (the vocabulary).
    pub fn output_words(&self) -> usize {
        let rows = self.max_rows.max(1) as usize * self.model.widest_linear().1;
        if self.offline_inputs > 0 {
            rows.max(ModSwitch::NONE.result_words())
        } else {
            rows
        }
    }
}

/// What a [`ComputeJob`] asks of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobKind {
    /// `products_mut() = masked_rows() · W_linear (mod 2^32)`.
    Products,
    /// Offline phase: input ciphertexts `first..first + count` of the layer have arrived, their
    /// `b` halves in [`ComputeJob::offline_inputs`]; the host keeps them (with the `a` halves it
    /// expands from `seed`) until all `in_dim` are in. Nothing is written to the output.
    OfflineInputs {
        /// The seed of the `a` halves.
        seed: Seed,
        /// The first ciphertext's index.
        first: usize,
        /// How many.
        count: usize,
    },
    /// Offline phase: the host writes result ciphertexts `first..first + count` (output `j` is
    /// `Σ_i W[j][i] · C_i`, switched by `switch` and packed by [`crate::rlwe::pack_result`]) into
    /// [`ComputeJob::offline_results_mut`]; the machine sends them.
    OfflineResults {
        /// The first output's index.
        first: usize,
        /// How many.
        count: usize,
        /// The modulus switch the client asked for.
        switch: ModSwitch,
    },
    /// Weights download: the host writes words `first..first + count` of its `linear.veil`
    /// (bytes as little-endian words, zero past the end) into [`ComputeJob::weights_mut`].
    Weights {
        /// The first word.
        first: usize,
        /// How many.
        count: usize,
    },
}

/// Work for the host: a request whose masked rows have all arrived ([`JobKind::Products`]), or
/// a step of an offline layer. The host does it and hands the job back with
/// [`ServerConnection::finish_job`] (or [`ServerConnection::fail_job`]).
#[derive(Debug)]
pub struct ComputeJob<B> {
    /// What to do.
    pub kind: JobKind,
    /// The client's request id.
    pub request: u32,
    /// The layer (validated: it exists in the model).
    pub linear: LinearId,
    /// Rows (validated: `1..=max_rows`; 0 for offline steps).
    pub rows: usize,
    /// Input width of the layer.
    pub in_dim: usize,
    /// Output width of the layer.
    pub out_dim: usize,
    input: B,
    output: B,
}

impl<B: AsRef<[u32]> + AsMut<[u32]>> ComputeJob<B> {
    /// The `rows · in_dim` masked words.
    pub fn masked_rows(&self) -> &[u32] {
        &self.input.as_ref()[..self.rows * self.in_dim]
    }

    /// Where the `rows · out_dim` products go.
    pub fn products_mut(&mut self) -> &mut [u32] {
        let n = self.rows * self.out_dim;
        &mut self.output.as_mut()[..n]
    }

    /// The `b` halves of an [`JobKind::OfflineInputs`] step: `count` ciphertexts of
    /// [`INPUT_WORDS`] words (empty for other kinds).
    pub fn offline_inputs(&self) -> &[u32] {
        match self.kind {
            JobKind::OfflineInputs { count, .. } => &self.input.as_ref()[..count * INPUT_WORDS],
            _ => &[],
        }
    }

    /// Where an [`JobKind::OfflineResults`] step's `count` packed results go (empty for other
    /// kinds).
    pub fn offline_results_mut(&mut self) -> &mut [u32] {
        match self.kind {
            JobKind::OfflineResults { count, switch, .. } => {
                &mut self.output.as_mut()[..count * switch.result_words()]
            }
            _ => &mut [],
        }
    }

    /// Where a [`JobKind::Weights`] step's words go (empty for other kinds).
    pub fn weights_mut(&mut self) -> &mut [u32] {
        match self.kind {
            JobKind::Weights { count, .. } => &mut self.output.as_mut()[..count],
            _ => &mut [],
        }
    }

    /// Both at once (a kernel reads one while writing the other).
    pub fn split(&mut self) -> (&[u32], &mut [u32]) {
        let (i, o) = (self.rows * self.in_dim, self.rows * self.out_dim);
        (&self.input.as_ref()[..i], &mut self.output.as_mut()[..o])
    }

    /// The two buffers, for hosts that move them to a compute thread and back (see
    /// [`ComputeJob::from_parts`]).
    pub fn into_parts(self) -> (JobHeader, B, B) {
        (self.header(), self.input, self.output)
    }

    /// The job's description without its buffers.
    pub fn header(&self) -> JobHeader {
        JobHeader {
            kind: self.kind,
            request: self.request,
            linear: self.linear,
            rows: self.rows,
            in_dim: self.in_dim,
            out_dim: self.out_dim,
        }
    }

    /// Reassembles a job taken apart with [`ComputeJob::into_parts`].
    pub fn from_parts(header: JobHeader, input: B, output: B) -> Self {
        ComputeJob {
            kind: header.kind,
            request: header.request,
            linear: header.linear,
            rows: header.rows,
            in_dim: header.in_dim,
            out_dim: header.out_dim,
            input,
            output,
        }
    }
}

/// A job's description without its buffers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobHeader {
    /// What to do.
    pub kind: JobKind,
    /// The client's request id.
    pub request: u32,
    /// The layer.
    pub linear: LinearId,
    /// Rows.
    pub rows: usize,
    /// Input width.
    pub in_dim: usize,
    /// Output width.
    pub out_dim: usize,
}

/// How a conversation ended normally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// The client said `Bye`.
    Bye,
    /// The client closed the connection between frames.
    PeerClosed,
    /// The client sent `Error` (it closes after that).
    PeerError(ErrorCode),
}

impl core::fmt::Display for Ending {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Ending::Bye => f.write_str("said bye"),
            Ending::PeerClosed => f.write_str("closed the connection"),
            Ending::PeerError(c) => write!(f, "sent error: {c}"),
        }
    }
}

/// Why the server cut a conversation short. [`ServerError::code`] is what the client was told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ServerError {
    /// A frame could not be decoded (empty, oversized or not a message).
    Frame(FrameError),
    /// A message that is not allowed at this point.
    Unexpected {
        /// What was allowed.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The client speaks another protocol version.
    Version {
        /// The client's version.
        theirs: u32,
    },
    /// The client's weights differ from ours.
    Weights {
        /// The client's fingerprint.
        theirs: [u8; 32],
    },
    /// We require the pre-shared key and the client answered the challenge with something else.
    PskMissing {
        /// What came instead of `Proof`.
        got: &'static str,
    },
    /// The client's proof of the pre-shared key is wrong.
    PskWrong,
    /// A request for a layer that does not exist.
    UnknownLayer {
        /// The request id.
        request: u32,
        /// The layer asked for.
        linear: LinearId,
    },
    /// A request with zero rows or more than we accept.
    TooManyRows {
        /// The request id.
        request: u32,
        /// Rows asked for.
        rows: u32,
        /// Our limit.
        max: u32,
    },
    /// A `Data` chunk that does not fit the request.
    DataLength {
        /// The request id.
        request: u32,
        /// The details.
        detail: DataLengthError,
    },
    /// The host's idle timer fired: no complete frame in time.
    Idle,
    /// The host could not compute an accepted request.
    ComputeFailed {
        /// The request id.
        request: u32,
    },
    /// An offline layer we do not take.
    OfflineRefused {
        /// The request id.
        request: u32,
        /// Why.
        reason: OfflineRefusal,
    },
    /// The client closed the connection inside a frame or a request (nothing is sent).
    Truncated {
        /// The request whose rows were coming, if any.
        request: Option<u32>,
    },
}

impl ServerError {
    /// The code sent to the client before closing, or `None` when the client is gone.
    pub fn code(&self) -> Option<ErrorCode> {
        Some(match self {
            ServerError::Frame(_) => ErrorCode::MalformedFrame,
            ServerError::Unexpected { .. } => ErrorCode::UnexpectedMessage,
            ServerError::Version { .. } => ErrorCode::VersionMismatch,
            ServerError::Weights { .. } => ErrorCode::WeightsMismatch,
            ServerError::PskMissing { .. } | ServerError::PskWrong => ErrorCode::Unauthorized,
            ServerError::UnknownLayer { .. } => ErrorCode::UnknownLayer,
            ServerError::TooManyRows { .. } => ErrorCode::TooManyRows,
            ServerError::DataLength { .. } => ErrorCode::WrongDataLength,
            ServerError::Idle => ErrorCode::Timeout,
            ServerError::ComputeFailed { .. } => ErrorCode::ComputeFailed,
            ServerError::OfflineRefused { .. } => ErrorCode::OfflineRefused,
            ServerError::Truncated { .. } => return None,
        })
    }
}

impl core::fmt::Display for ServerError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if let Some(code) = self.code() {
            write!(f, "refused ({code}): ")?;
        }
        match self {
            ServerError::Frame(e) => write!(f, "{e}"),
            ServerError::Unexpected { expected, got } => {
                write!(f, "expected {expected}, got {got}")
            }
            ServerError::Version { theirs } => {
                write!(
                    f,
                    "the client speaks protocol {theirs}, we speak {PROTOCOL_VERSION}"
                )
            }
            ServerError::Weights { theirs } => {
                f.write_str("the client has other weights (fingerprint ")?;
                for b in theirs {
                    write!(f, "{b:02x}")?;
                }
                f.write_str(")")
            }
            ServerError::PskMissing { got } => {
                write!(f, "expected a Proof of the pre-shared key, got {got}")
            }
            ServerError::PskWrong => f.write_str("wrong proof of the pre-shared key"),
            ServerError::UnknownLayer { request, linear } => {
                write!(f, "request {request}: no layer {linear:?} in this model")
            }
            ServerError::TooManyRows { request, rows, max } => {
                write!(f, "request {request}: {rows} rows (accepted: 1..={max})")
            }
            ServerError::DataLength { request, detail } => write!(f, "request {request}: {detail}"),
            ServerError::Idle => f.write_str("no complete frame within the idle timeout"),
            ServerError::ComputeFailed { request } => {
                write!(f, "request {request}: the product could not be computed")
            }
            ServerError::OfflineRefused { request, reason } => {
                write!(f, "offline request {request}: {reason}")
            }
            ServerError::Truncated { request: Some(r) } => {
                write!(
                    f,
                    "the client closed the connection in the middle of request {r}"
                )
            }
            ServerError::Truncated { request: None } => {
                f.write_str("the client closed the connection in the middle of a frame")
            }
        }
    }
}

impl core::error::Error for ServerError {}

/// Why an offline layer was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OfflineRefusal {
    /// This server takes no offline work.
    Disabled,
    /// The server does not send its weights, or already sent them on this connection.
    Weights,
    /// The layer needs more input ciphertexts than the connection may still send.
    Budget {
        /// Ciphertexts the connection may still send.
        left: u64,
        /// Ciphertexts the layer needs (its input width).
        wanted: usize,
    },
    /// A modulus switch that drops 64 or more bits.
    Switch {
        /// Bits dropped from `a`.
        drop_a: u8,
        /// Bits dropped from `b`.
        drop_b: u8,
    },
}

impl core::fmt::Display for OfflineRefusal {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            OfflineRefusal::Disabled => f.write_str("this server takes no offline work"),
            OfflineRefusal::Weights => {
                f.write_str("this server does not send its weights (or sent them already)")
            }
            OfflineRefusal::Budget { left, wanted } => write!(
                f,
                "the layer needs {wanted} input ciphertexts, this connection may send {left} more"
            ),
            OfflineRefusal::Switch { drop_a, drop_b } => {
                write!(f, "cannot drop {drop_a}/{drop_b} of 64 bits")
            }
        }
    }
}

/// Why a connection could not be set up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SetupError {
    /// The receive buffer is smaller than [`MAX_FRAME`].
    ReceiveBuffer,
    /// The job buffers are smaller than [`ServerSettings::input_words`] /
    /// [`ServerSettings::output_words`].
    JobBuffers,
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SetupError::ReceiveBuffer => {
                write!(f, "the receive buffer holds less than {MAX_FRAME} bytes")
            }
            SetupError::JobBuffers => {
                f.write_str("the job buffers are smaller than the connection's limits need")
            }
        }
    }
}

impl core::error::Error for SetupError {}

/// The request being served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Request {
    request: u32,
    linear: LinearId,
    rows: usize,
    in_dim: usize,
    out_dim: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for `Hello`.
    Hello,
    /// `Challenge` sent; waiting for `Proof`.
    Proof { fingerprint: [u8; 32] },
    /// Waiting for `Compute` or `Bye`.
    Ready,
    /// Taking a request's rows.
    Receiving { req: Request, rows: WordCursor },
    /// The job is with the host.
    Computing { req: Request },
    /// Sending the products (after the `Result` header, when `header_sent`).
    Answering {
        req: Request,
        header_sent: bool,
        products: WordCursor,
    },
    /// Offline: taking input ciphertexts `first..first + count` (one step's worth).
    OfflineReceiving {
        off: Offline,
        first: usize,
        count: usize,
        words: WordCursor,
    },
    /// Offline: those inputs are with the host.
    OfflineInputs {
        off: Offline,
        first: usize,
        count: usize,
    },
    /// Offline: results `first..first + count` are being computed by the host.
    OfflineResults {
        off: Offline,
        first: usize,
        count: usize,
    },
    /// Offline: sending those results (after the `OfflineResult` header, sent before the first
    /// step's), ciphertext `sent` with `words`.
    OfflineAnswering {
        off: Offline,
        header_sent: bool,
        first: usize,
        count: usize,
        sent: usize,
        words: WordCursor,
    },
    /// Weights download: the host fills words `first..first + count`.
    WeightsFilling {
        total: usize,
        first: usize,
        count: usize,
    },
    /// Weights download: sending those words (after the `Weights` header before the first).
    WeightsSending {
        total: usize,
        header_sent: bool,
        first: usize,
        count: usize,
        words: WordCursor,
    },
    /// Ended: queued frames (an `Error`) still go out, nothing more comes in.
    Closing,
}

/// Control frames waiting to go out, in order (at most two are ever queued: `ServerProof` and
/// `Welcome`, or one `Error`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Challenge,
    ServerProof([u8; 32]),
    Welcome,
    Error(ErrorCode),
}

/// The server's side of one conversation. `R` is the receive buffer (bytes), `B` a job buffer
/// (words): the host chooses the storage (`Box<[u8]>`, `Vec<u32>`), the machine never allocates.
#[derive(Debug)]
pub struct ServerConnection<R, B> {
    rx: FrameDecoder<R>,
    st: State<B>,
}

#[derive(Debug)]
struct State<B> {
    settings: ServerSettings,
    nonce: [u8; 32],
    phase: Phase,
    queue: [Option<Control>; 2],
    input: Option<B>,
    output: Option<B>,
    outcome: Option<Result<Ending, ServerError>>,
    /// Offline input ciphertexts the connection may still send.
    offline_left: u64,
    /// Whether the weights were sent already.
    weights_sent: bool,
}

impl<R, B> ServerConnection<R, B>
where
    R: AsRef<[u8]> + AsMut<[u8]>,
    B: AsRef<[u32]> + AsMut<[u32]>,
{
    /// A connection that has just been accepted. `nonce` is fresh randomness from the host (the
    /// pre-shared-key challenge); `rx` holds at least [`MAX_FRAME`] bytes; `input` and `output`
    /// at least [`ServerSettings::input_words`] and [`ServerSettings::output_words`] words.
    pub fn new(
        settings: ServerSettings,
        nonce: [u8; 32],
        rx: R,
        input: B,
        output: B,
    ) -> Result<Self, SetupError> {
        let settings = ServerSettings {
            max_rows: settings.max_rows.max(1),
            ..settings
        };
        let offline_left = settings.offline_inputs;
        if input.as_ref().len() < settings.input_words()
            || output.as_ref().len() < settings.output_words()
        {
            return Err(SetupError::JobBuffers);
        }
        Ok(ServerConnection {
            rx: FrameDecoder::new(rx).map_err(|_| SetupError::ReceiveBuffer)?,
            st: State {
                settings,
                nonce,
                phase: Phase::Hello,
                queue: [None; 2],
                input: Some(input),
                output: Some(output),
                outcome: None,
                offline_left,
                weights_sent: false,
            },
        })
    }

    /// The settings in force (`max_rows` at least 1).
    pub fn settings(&self) -> &ServerSettings {
        &self.st.settings
    }

    /// Whether the machine wants more bytes from the client now. False while a job is out,
    /// while products are being sent, and once the conversation is over.
    pub fn wants_input(&self) -> bool {
        self.st.outcome.is_none() && self.st.phase.takes_input() && self.st.queue[0].is_none()
    }

    /// Where to read the client's next bytes into (then [`ServerConnection::handle_received`]).
    pub fn recv_buffer(&mut self) -> &mut [u8] {
        self.rx.spare()
    }

    /// Takes `n` bytes the host read into [`ServerConnection::recv_buffer`] and processes every
    /// complete frame the machine can act on now.
    pub fn handle_received(&mut self, n: usize) {
        self.rx.filled(n);
        self.process();
    }

    /// Copies received bytes in (for hosts and tests that already hold them); returns how many
    /// were taken (call again with the rest once [`ServerConnection::wants_input`]).
    pub fn feed(&mut self, bytes: &[u8]) -> usize {
        let n = self.rx.feed(bytes);
        self.process();
        n
    }

    /// The client closed its side.
    pub fn handle_eof(&mut self) {
        if self.st.outcome.is_some() {
            return;
        }
        let mid_frame = !self.rx.at_boundary();
        let end = match self.st.phase.request() {
            Some(request) => Err(ServerError::Truncated {
                request: Some(request),
            }),
            None if mid_frame => Err(ServerError::Truncated { request: None }),
            None => Ok(Ending::PeerClosed),
        };
        self.st.end(end);
    }

    /// The host's idle timer fired (no complete frame, or the client not reading, for too long).
    pub fn handle_timeout(&mut self) {
        if self.st.outcome.is_none() {
            self.st.refuse(ServerError::Idle);
        }
    }

    /// The request whose rows are all in, if any: the host computes it and hands it back.
    pub fn poll_job(&mut self) -> Option<ComputeJob<B>> {
        let header = self.st.phase.job()?;
        let input = self.st.input.take()?;
        let Some(output) = self.st.output.take() else {
            self.st.input = Some(input);
            return None;
        };
        Some(ComputeJob::from_parts(header, input, output))
    }

    /// The job is done: products (or offline results) go out with the next transmits; offline
    /// inputs let the next ones in.
    pub fn finish_job(&mut self, job: ComputeJob<B>) {
        if !self.st.take_back(job) {
            return;
        }
        let (in_step, out_step) = self.st.offline_steps();
        self.st.phase = match self.st.phase {
            Phase::Computing { req } => Phase::Answering {
                req,
                header_sent: false,
                products: WordCursor::new(req.rows * req.out_dim),
            },
            Phase::OfflineInputs { off, first, count } if first + count == off.in_dim => {
                Phase::OfflineResults {
                    off,
                    first: 0,
                    count: out_step.min(off.out_dim),
                }
            }
            Phase::OfflineInputs { off, first, count } => {
                let first = first + count;
                let count = in_step.min(off.in_dim - first);
                Phase::OfflineReceiving {
                    off,
                    first,
                    count,
                    words: WordCursor::new(count * INPUT_WORDS),
                }
            }
            Phase::WeightsFilling {
                total,
                first,
                count,
            } => Phase::WeightsSending {
                total,
                header_sent: first > 0,
                first,
                count,
                words: WordCursor::new(count),
            },
            Phase::OfflineResults { off, first, count } => Phase::OfflineAnswering {
                off,
                header_sent: first > 0,
                first,
                count,
                sent: 0,
                words: WordCursor::new(off.switch.result_words()),
            },
            other => other,
        };
    }

    /// The job could not be computed: the client is told [`ErrorCode::ComputeFailed`].
    pub fn fail_job(&mut self, job: ComputeJob<B>) {
        let request = job.request;
        self.st.take_back(job);
        if self.st.outcome.is_none() {
            self.st.refuse(ServerError::ComputeFailed { request });
        }
    }

    /// Encodes the frames due now into `out` (at least [`MAX_FRAME`] bytes), as many whole frames
    /// as fit; returns the bytes written, 0 when there is nothing to send now.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> usize {
        let mut at = 0;
        loop {
            let room = &mut out[at..];
            if room.len() < MAX_FRAME {
                break;
            }
            let n = self.st.next_frame(room);
            if n == 0 {
                break;
            }
            at += n;
        }
        // Sent what was due (a Challenge, a Welcome, the last products): act on frames the client
        // sent meanwhile (`process` does nothing unless the machine takes input now).
        self.process();
        at
    }

    /// True once the conversation is over and nothing is left to send: the host closes the
    /// connection (after lingering briefly when [`ServerError::code`] was sent).
    pub fn is_closed(&self) -> bool {
        self.st.outcome.is_some() && self.st.queue[0].is_none()
    }

    /// How the conversation ended, once it has.
    pub fn outcome(&self) -> Option<Result<Ending, ServerError>> {
        self.st.outcome
    }

    fn process(&mut self) {
        while self.st.outcome.is_none() && self.st.phase.takes_input() && self.st.queue[0].is_none()
        {
            match self.rx.next_message() {
                None => break,
                Some(Err(e)) => self.st.refuse(ServerError::Frame(e)),
                Some(Ok(msg)) => self.st.handle(msg),
            }
        }
    }
}

impl<B: AsRef<[u32]> + AsMut<[u32]>> State<B> {
    fn push(&mut self, c: Control) {
        if let Some(slot) = self.queue.iter_mut().find(|s| s.is_none()) {
            *slot = Some(c);
        }
    }

    fn end(&mut self, end: Result<Ending, ServerError>) {
        self.outcome = Some(end);
        self.phase = Phase::Closing;
    }

    fn refuse(&mut self, e: ServerError) {
        // An error replaces anything not yet sent: after it, nothing else goes out.
        self.queue = [None; 2];
        if let Some(code) = e.code() {
            self.push(Control::Error(code));
        }
        self.end(Err(e));
    }

    /// Takes the job's buffers back; true if it is the job the machine handed out.
    fn take_back(&mut self, job: ComputeJob<B>) -> bool {
        let (header, input, output) = job.into_parts();
        self.input = Some(input);
        self.output = Some(output);
        self.phase.job() == Some(header)
    }

    /// Input ciphertexts per offline inputs step and results per results step: as many as the
    /// job buffers hold.
    fn offline_steps(&self) -> (usize, usize) {
        let input = self.settings.input_words() / INPUT_WORDS;
        let output = match self.phase {
            Phase::OfflineInputs { off, .. }
            | Phase::OfflineResults { off, .. }
            | Phase::OfflineAnswering { off, .. } => {
                self.settings.output_words() / off.switch.result_words()
            }
            _ => 0,
        };
        (input.max(1), output.max(1))
    }

    fn handle(&mut self, msg: Message<'_>) {
        match (self.phase, msg) {
            (Phase::Hello | Phase::Proof { .. } | Phase::Ready, Message::Error { code }) => {
                self.end(Ok(Ending::PeerError(code)));
            }
            (
                Phase::Hello,
                Message::Hello {
                    protocol,
                    fingerprint,
                },
            ) => {
                if protocol != PROTOCOL_VERSION {
                    return self.refuse(ServerError::Version { theirs: protocol });
                }
                // With a key, nothing else happens (no fingerprint check, no Welcome) until the
                // client has proven it holds the key.
                if self.settings.psk.is_some() {
                    self.push(Control::Challenge);
                    self.phase = Phase::Proof { fingerprint };
                } else {
                    self.welcome(fingerprint, None);
                }
            }
            (Phase::Hello, other) => self.refuse(ServerError::Unexpected {
                expected: "Hello",
                got: other.name(),
            }),
            (Phase::Proof { fingerprint }, Message::Proof { mac, nonce }) => {
                let Some(psk) = &self.settings.psk else {
                    return self.refuse(ServerError::PskWrong);
                };
                if !psk.verify(CLIENT_LABEL, &fingerprint, &self.nonce, &nonce, &mac) {
                    return self.refuse(ServerError::PskWrong);
                }
                let ours = psk.sign(SERVER_LABEL, &fingerprint, &self.nonce, &nonce);
                self.welcome(fingerprint, Some(ours));
            }
            (Phase::Proof { .. }, other) => {
                self.refuse(ServerError::PskMissing { got: other.name() })
            }
            (
                Phase::Ready,
                Message::Compute {
                    request,
                    linear,
                    rows,
                },
            ) => {
                let cfg = self.settings.model;
                if !linear.is_valid(&cfg) {
                    return self.refuse(ServerError::UnknownLayer { request, linear });
                }
                let max = self.settings.max_rows;
                if rows == 0 || rows > max {
                    return self.refuse(ServerError::TooManyRows { request, rows, max });
                }
                let (in_dim, out_dim) = linear.dims(&cfg);
                let req = Request {
                    request,
                    linear,
                    rows: rows as usize,
                    in_dim,
                    out_dim,
                };
                self.phase = Phase::Receiving {
                    req,
                    rows: WordCursor::new(req.rows * in_dim),
                };
            }
            (
                Phase::Ready,
                Message::OfflineLayer {
                    request,
                    linear,
                    seed,
                    drop_a,
                    drop_b,
                },
            ) => {
                let cfg = self.settings.model;
                let refuse = |reason| ServerError::OfflineRefused { request, reason };
                if self.settings.offline_inputs == 0 {
                    return self.refuse(refuse(OfflineRefusal::Disabled));
                }
                if !linear.is_valid(&cfg) {
                    return self.refuse(ServerError::UnknownLayer { request, linear });
                }
                if drop_a >= 64 || drop_b >= 64 {
                    return self.refuse(refuse(OfflineRefusal::Switch { drop_a, drop_b }));
                }
                let (in_dim, out_dim) = linear.dims(&cfg);
                if (in_dim as u64) > self.offline_left {
                    let left = self.offline_left;
                    return self.refuse(refuse(OfflineRefusal::Budget {
                        left,
                        wanted: in_dim,
                    }));
                }
                self.offline_left -= in_dim as u64;
                let off = Offline {
                    request,
                    linear,
                    in_dim,
                    out_dim,
                    seed: Seed(seed),
                    switch: ModSwitch {
                        drop_a: drop_a as u32,
                        drop_b: drop_b as u32,
                    },
                };
                let count = self.offline_steps().0.min(in_dim);
                self.phase = Phase::OfflineReceiving {
                    off,
                    first: 0,
                    count,
                    words: WordCursor::new(count * INPUT_WORDS),
                };
            }
            (Phase::Ready, Message::FetchWeights) => {
                let bytes = self.settings.weights_bytes;
                if bytes == 0 || self.weights_sent {
                    return self.refuse(ServerError::OfflineRefused {
                        request: 0,
                        reason: OfflineRefusal::Weights,
                    });
                }
                self.weights_sent = true;
                let total = bytes.div_ceil(4) as usize;
                self.phase = Phase::WeightsFilling {
                    total,
                    first: 0,
                    count: self.settings.output_words().min(total),
                };
            }
            (Phase::Ready, Message::Bye) => self.end(Ok(Ending::Bye)),
            (Phase::Ready, other) => self.refuse(ServerError::Unexpected {
                expected: "Compute, OfflineLayer or Bye",
                got: other.name(),
            }),
            (
                Phase::OfflineReceiving {
                    off,
                    first,
                    count,
                    mut words,
                },
                Message::Data { words: chunk },
            ) => {
                let Some(input) = self.input.as_mut() else {
                    return self.refuse(ServerError::ComputeFailed {
                        request: off.request,
                    });
                };
                if let Err(detail) = words.accept(chunk, input.as_mut()) {
                    return self.refuse(ServerError::DataLength {
                        request: off.request,
                        detail,
                    });
                }
                self.phase = if words.is_complete() {
                    Phase::OfflineInputs { off, first, count }
                } else {
                    Phase::OfflineReceiving {
                        off,
                        first,
                        count,
                        words,
                    }
                };
            }
            (Phase::OfflineReceiving { .. }, other) => self.refuse(ServerError::Unexpected {
                expected: "Data (an input ciphertext)",
                got: other.name(),
            }),
            (Phase::Receiving { req, mut rows }, Message::Data { words }) => {
                let Some(input) = self.input.as_mut() else {
                    return self.refuse(ServerError::ComputeFailed {
                        request: req.request,
                    });
                };
                if let Err(detail) = rows.accept(words, input.as_mut()) {
                    return self.refuse(ServerError::DataLength {
                        request: req.request,
                        detail,
                    });
                }
                self.phase = if rows.is_complete() {
                    Phase::Computing { req }
                } else {
                    Phase::Receiving { req, rows }
                };
            }
            (Phase::Receiving { .. }, other) => self.refuse(ServerError::Unexpected {
                expected: "Data",
                got: other.name(),
            }),
            // `process` feeds messages only in the phases above.
            (
                Phase::Computing { .. }
                | Phase::Answering { .. }
                | Phase::WeightsFilling { .. }
                | Phase::WeightsSending { .. }
                | Phase::OfflineInputs { .. }
                | Phase::OfflineResults { .. }
                | Phase::OfflineAnswering { .. }
                | Phase::Closing,
                _,
            ) => {}
        }
    }

    fn welcome(&mut self, fingerprint: [u8; 32], proof: Option<[u8; 32]>) {
        // The fingerprint is public (a hash of weights the server holds): no constant time needed.
        if fingerprint != self.settings.fingerprint {
            return self.refuse(ServerError::Weights {
                theirs: fingerprint,
            });
        }
        if let Some(mac) = proof {
            self.push(Control::ServerProof(mac));
        }
        self.push(Control::Welcome);
        self.phase = Phase::Ready;
    }

    /// Encodes the next frame due into `out` (at least [`MAX_FRAME`] bytes); 0 if none.
    fn next_frame(&mut self, out: &mut [u8]) -> usize {
        if let Some(c) = self.queue[0] {
            self.queue = [self.queue[1], None];
            let msg = match c {
                Control::Challenge => Message::Challenge { nonce: self.nonce },
                Control::ServerProof(mac) => Message::ServerProof { mac },
                Control::Welcome => Message::Welcome {
                    protocol: PROTOCOL_VERSION,
                    fingerprint: self.settings.fingerprint,
                    max_rows: self.settings.max_rows,
                },
                Control::Error(code) => Message::Error { code },
            };
            // Control messages are far below MAX_FRAME.
            return encode_frame(&msg, out).unwrap_or(0);
        }
        if let Phase::OfflineAnswering { .. } = self.phase {
            return self.next_offline_frame(out);
        }
        if let Phase::WeightsSending { .. } = self.phase {
            return self.next_weights_frame(out);
        }
        let Phase::Answering {
            req,
            header_sent,
            mut products,
        } = self.phase
        else {
            return 0;
        };
        if !header_sent {
            self.phase = Phase::Answering {
                req,
                header_sent: true,
                products,
            };
            let msg = Message::Result {
                request: req.request,
                rows: req.rows as u32,
            };
            return encode_frame(&msg, out).unwrap_or(0);
        }
        let Some(output) = self.output.as_ref() else {
            return 0;
        };
        match products.emit(output.as_ref(), out) {
            Ok(n) => {
                self.phase = if products.is_complete() {
                    Phase::Ready
                } else {
                    Phase::Answering {
                        req,
                        header_sent,
                        products,
                    }
                };
                n
            }
            Err(_) => {
                let request = req.request;
                self.refuse(ServerError::ComputeFailed { request });
                self.next_frame(out)
            }
        }
    }
}

impl<B: AsRef<[u32]> + AsMut<[u32]>> State<B> {
    /// The next frame of an offline answer: the header before the first step, then each result
    /// ciphertext in whole frames.
    fn next_offline_frame(&mut self, out: &mut [u8]) -> usize {
        let Phase::OfflineAnswering {
            off,
            header_sent,
            first,
            count,
            sent,
            mut words,
        } = self.phase
        else {
            return 0;
        };
        if !header_sent {
            self.phase = Phase::OfflineAnswering {
                off,
                header_sent: true,
                first,
                count,
                sent,
                words,
            };
            let msg = Message::OfflineResult {
                request: off.request,
            };
            return encode_frame(&msg, out).unwrap_or(0);
        }
        let rw = off.switch.result_words();
        let Some(output) = self.output.as_ref() else {
            return 0;
        };
        let Some(src) = output.as_ref().get(sent * rw..(sent + 1) * rw) else {
            self.refuse(ServerError::ComputeFailed {
                request: off.request,
            });
            return self.next_frame(out);
        };
        let n = match words.emit(src, out) {
            Ok(n) => n,
            Err(_) => {
                self.refuse(ServerError::ComputeFailed {
                    request: off.request,
                });
                return self.next_frame(out);
            }
        };
        let out_step = self.offline_steps().1;
        self.phase = if !words.is_complete() {
            Phase::OfflineAnswering {
                off,
                header_sent,
                first,
                count,
                sent,
                words,
            }
        } else if sent + 1 < count {
            Phase::OfflineAnswering {
                off,
                header_sent,
                first,
                count,
                sent: sent + 1,
                words: WordCursor::new(rw),
            }
        } else if first + count < off.out_dim {
            let first = first + count;
            Phase::OfflineResults {
                off,
                first,
                count: out_step.min(off.out_dim - first),
            }
        } else {
            Phase::Ready
        };
        n
    }
}

impl<B: AsRef<[u32]> + AsMut<[u32]>> State<B> {
    /// The next frame of the weights download.
    fn next_weights_frame(&mut self, out: &mut [u8]) -> usize {
        let Phase::WeightsSending {
            total,
            header_sent,
            first,
            count,
            mut words,
        } = self.phase
        else {
            return 0;
        };
        if !header_sent {
            self.phase = Phase::WeightsSending {
                total,
                header_sent: true,
                first,
                count,
                words,
            };
            let msg = Message::Weights {
                bytes: self.settings.weights_bytes,
            };
            return encode_frame(&msg, out).unwrap_or(0);
        }
        let Some(output) = self.output.as_ref() else {
            return 0;
        };
        let n = match words.emit(output.as_ref(), out) {
            Ok(n) => n,
            Err(_) => {
                self.refuse(ServerError::ComputeFailed { request: 0 });
                return self.next_frame(out);
            }
        };
        self.phase = if !words.is_complete() {
            Phase::WeightsSending {
                total,
                header_sent,
                first,
                count,
                words,
            }
        } else if first + count < total {
            let first = first + count;
            Phase::WeightsFilling {
                total,
                first,
                count: self.settings.output_words().min(total - first),
            }
        } else {
            Phase::Ready
        };
        n
    }
}

impl Phase {
    /// Whether the machine reads the client's frames in this phase.
    fn takes_input(&self) -> bool {
        matches!(
            self,
            Phase::Hello
                | Phase::Proof { .. }
                | Phase::Ready
                | Phase::Receiving { .. }
                | Phase::OfflineReceiving { .. }
        )
    }

    /// The request in progress, if any.
    fn request(&self) -> Option<u32> {
        match *self {
            Phase::Receiving { req, .. }
            | Phase::Computing { req }
            | Phase::Answering { req, .. } => Some(req.request),
            Phase::OfflineReceiving { off, .. }
            | Phase::OfflineInputs { off, .. }
            | Phase::OfflineResults { off, .. }
            | Phase::OfflineAnswering { off, .. } => Some(off.request),
            _ => None,
        }
    }

    /// The job the host should do now, if any.
    fn job(&self) -> Option<JobHeader> {
        let (kind, off) = match *self {
            Phase::Computing { req } => {
                return Some(JobHeader {
                    kind: JobKind::Products,
                    request: req.request,
                    linear: req.linear,
                    rows: req.rows,
                    in_dim: req.in_dim,
                    out_dim: req.out_dim,
                })
            }
            Phase::OfflineInputs { off, first, count } => (
                JobKind::OfflineInputs {
                    seed: off.seed,
                    first,
                    count,
                },
                off,
            ),
            Phase::OfflineResults { off, first, count } => (
                JobKind::OfflineResults {
                    first,
                    count,
                    switch: off.switch,
                },
                off,
            ),
            Phase::WeightsFilling { first, count, .. } => {
                return Some(JobHeader {
                    kind: JobKind::Weights { first, count },
                    request: 0,
                    linear: LinearId {
                        layer: 0,
                        kind: crate::model::LinearKind::LmHead,
                    },
                    rows: 0,
                    in_dim: 0,
                    out_dim: 0,
                })
            }
            _ => return None,
        };
        Some(JobHeader {
            kind,
            request: off.request,
            linear: off.linear,
            rows: 0,
            in_dim: off.in_dim,
            out_dim: off.out_dim,
        })
    }
}

/// Encodes the `Error{Busy}` a host sends, instead of a conversation, to a connection over its
/// limit; returns the frame's length.
pub fn busy_frame(out: &mut [u8]) -> Result<usize, FrameError> {
    encode_frame(
        &Message::Error {
            code: ErrorCode::Busy,
        },
        out,
    )
}
