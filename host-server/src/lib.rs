//! Veil's blind calculator: the server half of private GPT-2 inference.
//!
//! The server holds only `linear.veil` (the int8 weights of the offloaded linear layers) and answers
//! one kind of question: "multiply these rows by layer `L`'s matrix, modulo 2^32". Every row it sees
//! is one-time padded by the client, so it learns shapes, counts and timing, never values.
//!
//! - [`ServerWeights`]: the memory-mapped `linear.veil`, its validated layout and its SHA-256
//!   fingerprint (what the client compares in the hello).
//! - [`serve`]: the accept loop (one task per connection, a connection limit, graceful stop).
//! - [`handle_connection`]: one conversation (see [`veil_core::wire`]) over any
//!   `AsyncRead + AsyncWrite`, so tests can drive it through `tokio::io::duplex` without sockets.
//!
//! - [`Batcher`] (module [`batch`]): continuous batching; concurrent clients' rows for the same
//!   layer are multiplied in one pass over that layer's weights. [`serve`] starts one.
//! - [`Psk`]: an optional pre-shared key; with one, a client must answer an HMAC-SHA256 challenge
//!   in the hello before the server computes anything for it.
//!
//! Every message is validated before use (with or without batching, the same checks and codes);
//! a bad frame gets a typed [`ErrorCode`] and closes that connection only. Per-connection memory is
//! bounded by `max_rows · (max_in + max_out) · 4` bytes plus two frame buffers; each batching
//! thread adds at most `max_input_words + max_rows · 256` words of scratch.

pub mod batch;

use std::fmt;
use std::fs::File;
use std::future::Future;
use std::io;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use hmac::Mac as _;
use memmap2::Mmap;
use rand_core::{OsRng, RngCore as _};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::format::{LinearLayout, LINEAR_FILE};
use veil_core::model::{FormatError, LinearId, LinearKind, LinearWeights, ModelConfig};
use veil_core::wire::{
    decode_body, encode_frame, ErrorCode, FrameHeader, Message, WordBytes, LEN_PREFIX,
    MAX_CHUNK_BYTES, MAX_FRAME_BODY, PROTOCOL_VERSION,
};
use zeroize::Zeroizing;

pub use batch::{BatchConfig, BatchStats, Batcher, Registration};

/// Where the weight bytes live.
enum Backing {
    /// A read-only map of `linear.veil`.
    Mapped(Mmap),
    /// Bytes in memory (tests, or hosts without mmap).
    Owned(Box<[u8]>),
}

/// The server's weights: `linear.veil` only (never biases, embeddings or scales).
///
/// Owns the bytes and keeps the layout validated at load time, so [`ServerWeights::matrix`] is a
/// plain slice of the bytes; [`ServerWeights::linear`] re-parses (header checks only) for callers
/// that want veil-core's view.
pub struct ServerWeights {
    backing: Backing,
    layout: LinearLayout,
    fingerprint: [u8; 32],
    source: Option<PathBuf>,
    /// Requests computed with these weights, all connections together.
    computed: AtomicU64,
}

impl fmt::Debug for ServerWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerWeights")
            .field("source", &self.source)
            .field("config", self.config())
            .field("bytes", &self.bytes().len())
            .field("fingerprint", &hex(&self.fingerprint))
            .finish()
    }
}

impl ServerWeights {
    /// Loads `dir/linear.veil`.
    pub fn open_dir(dir: &Path) -> anyhow::Result<Self> {
        Self::open_file(&dir.join(LINEAR_FILE))
    }

    /// Memory-maps and validates one `linear.veil` file and computes its fingerprint.
    pub fn open_file(path: &Path) -> anyhow::Result<Self> {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        // SAFETY: the map is read-only and private to this process; we never create a mutable
        // reference into it. The remaining hazard of any file map is another process truncating
        // or rewriting `linear.veil` while we serve (SIGBUS or changed bytes); weight files are
        // written once by `tools/` and treated as immutable, as documented in the README.
        let map = unsafe { Mmap::map(&file) }
            .with_context(|| format!("cannot memory-map {}", path.display()))?;
        let mut weights = Self::from_backing(Backing::Mapped(map))
            .with_context(|| format!("{} is not a valid linear.veil", path.display()))?;
        weights.source = Some(path.to_path_buf());
        Ok(weights)
    }

    /// Validates weight bytes held in memory.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Self, FormatError> {
        Self::from_backing(Backing::Owned(bytes.into_boxed_slice()))
    }

    fn from_backing(backing: Backing) -> Result<Self, FormatError> {
        let bytes: &[u8] = match &backing {
            Backing::Mapped(m) => m,
            Backing::Owned(b) => b,
        };
        let layout = LinearLayout::new(LinearWeights::parse(bytes)?.config());
        let fingerprint: [u8; 32] = Sha256::digest(bytes).into();
        Ok(ServerWeights {
            backing,
            layout,
            fingerprint,
            source: None,
            computed: AtomicU64::new(0),
        })
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mapped(m) => m,
            Backing::Owned(b) => b,
        }
    }

    /// The model shape from the header.
    pub fn config(&self) -> &ModelConfig {
        self.layout.config()
    }

    /// SHA-256 of the whole file (what clients compare in the hello).
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// The fingerprint as lowercase hex.
    pub fn fingerprint_hex(&self) -> String {
        hex(&self.fingerprint)
    }

    /// veil-core's view of the weights (re-validates the header; cheap).
    pub fn linear(&self) -> Result<LinearWeights<'_>, FormatError> {
        LinearWeights::parse(self.bytes())
    }

    /// A layer's `[out][in]` int8 matrix, or `None` if `id` names no layer of this model.
    pub fn matrix(&self, id: LinearId) -> Option<&[u8]> {
        if !id.is_valid(self.config()) {
            return None;
        }
        self.bytes().get(self.layout.matrix(id))
    }

    /// Widest layer input (words per row).
    pub fn max_in_dim(&self) -> usize {
        all_kinds()
            .map(|k| self.config().linear_dims(k).0)
            .max()
            .unwrap_or(0)
    }

    /// Widest layer output (words per row; the vocabulary for the LM head).
    pub fn max_out_dim(&self) -> usize {
        all_kinds()
            .map(|k| self.config().linear_dims(k).1)
            .max()
            .unwrap_or(0)
    }

    /// How many `Compute` requests were multiplied with these weights so far, over all
    /// connections (a request counts once its product is computed).
    pub fn computed_requests(&self) -> u64 {
        self.computed.load(Ordering::Relaxed)
    }

    /// A one-line description of the model shape for logs.
    pub fn describe(&self) -> String {
        let c = self.config();
        format!(
            "{} blocks, d={}, {} heads, inner={}, vocab={}, {} positions; {} linear layers, {} bytes",
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_inner,
            c.vocab_size,
            c.n_positions,
            c.linear_count(),
            self.bytes().len()
        )
    }
}

fn all_kinds() -> impl Iterator<Item = LinearKind> {
    LinearKind::BLOCK
        .into_iter()
        .chain(std::iter::once(LinearKind::LmHead))
}

/// Lowercase hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

use veil_core::wire::auth::PSK_FILE_MAX_BYTES;
pub use veil_core::wire::auth::PSK_MIN_BYTES;

type HmacSha256 = hmac::Hmac<Sha256>;

use veil_core::wire::auth::{transcript, CLIENT_LABEL, SERVER_LABEL};

/// A pre-shared key: with one, a client must prove it holds the same key (HMAC-SHA256
/// challenge-response in the hello) before the server computes anything for it, and the server
/// proves it holds the key too.
///
/// Cheap to clone (shared); wiped from memory when the last clone drops; never printed; compared
/// in constant time.
#[derive(Clone)]
pub struct Psk(Arc<Zeroizing<Vec<u8>>>);

impl Psk {
    /// A key of raw bytes; at least [`PSK_MIN_BYTES`] long.
    pub fn new(key: Vec<u8>) -> anyhow::Result<Psk> {
        let key = Zeroizing::new(key);
        if key.len() < PSK_MIN_BYTES {
            bail!("{}", veil_core::wire::auth::PskError::TooShort(key.len()));
        }
        Ok(Psk(Arc::new(key)))
    }

    /// A key from a key file's contents: hex text if they are an even number of hex digits
    /// (surrounding whitespace ignored), the raw bytes as stored otherwise. `veil-client` reads
    /// its `--psk-file` the same way.
    pub fn from_file_contents(contents: &[u8]) -> anyhow::Result<Psk> {
        let mut key = Zeroizing::new(vec![0u8; contents.len()]);
        let n = veil_core::wire::auth::decode_psk(contents, &mut key)?;
        Psk::new(key[..n].to_vec())
    }

    /// Reads a key file (see [`Psk::from_file_contents`]).
    pub fn from_file(path: &Path) -> anyhow::Result<Psk> {
        let file = File::open(path)
            .with_context(|| format!("cannot open the key file {}", path.display()))?;
        let mut contents = Zeroizing::new(Vec::new());
        file.take(PSK_FILE_MAX_BYTES as u64 + 1)
            .read_to_end(&mut contents)
            .with_context(|| format!("cannot read the key file {}", path.display()))?;
        Psk::from_file_contents(&contents).with_context(|| format!("key file {}", path.display()))
    }

    /// The MAC of one side's transcript (`veil_core::wire::auth::transcript`, shared with the
    /// client).
    fn mac(
        &self,
        label: &[u8; 16],
        fingerprint: &[u8; 32],
        server_nonce: &[u8; 32],
        client_nonce: &[u8; 32],
    ) -> HmacSha256 {
        // HMAC takes keys of any length: this never fails.
        let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
        mac.update(&transcript(label, fingerprint, server_nonce, client_nonce));
        mac
    }
}

impl fmt::Debug for Psk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Psk(<{} bytes, redacted>)", self.0.len())
    }
}

impl PartialEq for Psk {
    fn eq(&self, other: &Self) -> bool {
        use subtle::ConstantTimeEq as _;
        bool::from(self.0.as_slice().ct_eq(other.0.as_slice()))
    }
}

impl Eq for Psk {}

/// Limits of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most rows accepted in one `Compute` (announced in `Welcome`); at least 1.
    pub max_rows: u32,
    /// Most connections served at once; more are answered `Error{Busy}` and closed.
    pub max_connections: usize,
    /// Longest wait for one frame (and for one reply to drain) before the connection is dropped.
    pub idle_timeout: Duration,
    /// With a key, clients must prove they hold it in the hello; without, anyone may connect.
    pub psk: Option<Psk>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_rows: 64,
            max_connections: 64,
            idle_timeout: Duration::from_secs(300),
            psk: None,
        }
    }
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

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Bye => f.write_str("said bye"),
            Ending::PeerClosed => f.write_str("closed the connection"),
            Ending::PeerError(c) => write!(f, "sent error: {c}"),
        }
    }
}

/// Why a conversation was cut short.
#[derive(Debug)]
pub enum ConnError {
    /// We refused the client with `code` (sent as `Error` before closing, if the transport allowed).
    Refused {
        /// The code sent.
        code: ErrorCode,
        /// Details for the server log (never sent).
        reason: String,
    },
    /// The transport failed or the peer vanished in the middle of a frame or request.
    Io(io::Error),
}

impl ConnError {
    fn refuse(code: ErrorCode, reason: impl Into<String>) -> Self {
        ConnError::Refused {
            code,
            reason: reason.into(),
        }
    }

    /// The code sent to the client, if any.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ConnError::Refused { code, .. } => Some(*code),
            ConnError::Io(_) => None,
        }
    }
}

impl fmt::Display for ConnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnError::Refused { code, reason } => write!(f, "refused ({code}): {reason}"),
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

/// Accepts connections on `listener` until `shutdown` completes, serving each on its own task,
/// with a [`Batcher`] of the default [`BatchConfig`] (see [`serve_with`]).
///
/// At most `config.max_connections` are served at once; others get `Error{Busy}` and are closed.
/// Returns as soon as `shutdown` fires (no new connections); connections in flight keep running
/// on the runtime until it is shut down.
pub async fn serve(
    listener: TcpListener,
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    shutdown: impl Future,
) {
    let batcher = match Batcher::new(weights.clone(), BatchConfig::default()) {
        Ok(b) => Some(b),
        Err(e) => {
            log(
                "listener",
                format_args!("no batching (cannot start its threads: {e})"),
            );
            None
        }
    };
    serve_with(listener, weights, config, batcher, shutdown).await;
}

/// [`serve`] with the caller's batcher (to choose its limits or read its [`Batcher::stats`]), or
/// none: each request is then multiplied on its own on the blocking pool.
pub async fn serve_with(
    listener: TcpListener,
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    batcher: Option<Batcher>,
    shutdown: impl Future,
) {
    let config = ServerConfig {
        max_rows: config.max_rows.max(1),
        max_connections: config.max_connections.max(1),
        ..config
    };
    let permits = Arc::new(Semaphore::new(config.max_connections));
    // Busy replies linger a few seconds each; bound them too, so a flood costs no more than this.
    let busy_permits = Arc::new(Semaphore::new(config.max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                log("listener", "shutting down: no longer accepting connections");
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // 25 small round trips per token: never wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let weights = weights.clone();
                            let config = config.clone();
                            let batcher = batcher.clone();
                            tokio::spawn(async move {
                                log(peer, "connected");
                                match handle_connection_with(stream, weights, config, batcher)
                                    .await
                                {
                                    Ok(end) => log(peer, format_args!("disconnected: {end}")),
                                    Err(e) => log(peer, format_args!("disconnected: {e}")),
                                }
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            log(peer, format_args!(
                                "refused: at the limit of {} connections", config.max_connections
                            ));
                            let Ok(busy) = busy_permits.clone().try_acquire_owned() else {
                                continue; // Flooded: drop without a reply.
                            };
                            tokio::spawn(async move {
                                let _busy = busy;
                                let mut stream = stream;
                                let mut buf = [0u8; 64];
                                if send_error(&mut stream, &mut buf, ErrorCode::Busy,
                                    Duration::from_secs(5)).await.is_ok() {
                                    drain(&mut stream, &mut buf).await;
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    log("listener", format_args!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn log(peer: impl fmt::Display, what: impl fmt::Display) {
    eprintln!("veil-server: {peer}: {what}");
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
/// the same either way.
pub async fn handle_connection_with<S>(
    mut stream: S,
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    batcher: Option<Batcher>,
) -> Result<Ending, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let limit = config.idle_timeout;
    let mut conn = Conn::new(weights, config, batcher);
    let result = conn.run(&mut stream).await;
    match &result {
        Ok(_) => {
            let _ = tokio::time::timeout(limit, stream.shutdown()).await;
        }
        Err(ConnError::Refused { code, .. }) => {
            if send_error(&mut stream, &mut conn.wbuf, *code, limit)
                .await
                .is_ok()
            {
                drain(&mut stream, &mut conn.rbuf).await;
            }
        }
        Err(ConnError::Io(_)) => {}
    }
    result
}

async fn send_error<S: AsyncWrite + Unpin>(
    stream: &mut S,
    wbuf: &mut [u8],
    code: ErrorCode,
    limit: Duration,
) -> io::Result<()> {
    let frame = encode_frame(&Message::Error { code }, wbuf)
        .map_err(|e| io::Error::other(format!("encode: {e}")))?;
    let send = async {
        stream.write_all(frame).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    tokio::time::timeout(limit, send)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer too slow"))?
}

/// Reads and discards what the peer still sends, briefly, after we have sent our last frame and
/// shut our side down. Closing a socket with unread input makes the kernel send a reset, which can
/// destroy our `Error` frame before the peer reads it; lingering a moment lets the peer see it.
async fn drain<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut [u8]) {
    const LINGER: Duration = Duration::from_secs(2);
    const LIMIT: usize = 1 << 20;
    let _ = tokio::time::timeout(LINGER, async {
        let mut total = 0;
        while total < LIMIT {
            match stream.read(buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Per-connection state: frame buffers and the request/reply word buffers.
struct Conn {
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    /// Where products are computed: shared batches (this connection registered with them for as
    /// long as it lives), or alone on the blocking pool.
    batcher: Option<(Batcher, Registration)>,
    rbuf: Box<[u8]>,
    wbuf: Box<[u8]>,
    /// Masked rows of the current request (≤ max_rows · max_in words).
    input: Vec<u32>,
    /// Products of the current request (≤ max_rows · max_out words).
    output: Vec<u32>,
}

/// Outcome of the key check in the hello.
enum Auth {
    /// The client proved it holds the key; our own proof for it.
    Proven {
        /// MAC of the server's transcript, sent as `ServerProof`.
        server_mac: [u8; 32],
    },
    /// The client left (closed, or sent `Error`) instead of answering.
    Ended(Ending),
}

/// Result of reading one frame.
enum Frame {
    /// A body of this length is in `rbuf`.
    Body(usize),
    /// The peer closed between frames.
    Eof,
}

impl Conn {
    fn new(weights: Arc<ServerWeights>, config: ServerConfig, batcher: Option<Batcher>) -> Self {
        Conn {
            weights,
            config,
            batcher: batcher.map(|b| {
                let r = b.register();
                (b, r)
            }),
            rbuf: vec![0u8; MAX_FRAME_BODY].into_boxed_slice(),
            wbuf: vec![0u8; MAX_FRAME_BODY + LEN_PREFIX].into_boxed_slice(),
            input: Vec::new(),
            output: Vec::new(),
        }
    }

    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
    ) -> Result<Ending, ConnError> {
        // Hello.
        let (protocol, fingerprint) = match self.read_frame(s).await? {
            Frame::Eof => return Ok(Ending::PeerClosed),
            Frame::Body(n) => match decode(&self.rbuf[..n])? {
                Message::Hello {
                    protocol,
                    fingerprint,
                } => (protocol, fingerprint),
                Message::Error { code } => return Ok(Ending::PeerError(code)),
                other => {
                    return Err(ConnError::refuse(
                        ErrorCode::UnexpectedMessage,
                        format!("expected Hello, got {}", name(&other)),
                    ))
                }
            },
        };
        if protocol != PROTOCOL_VERSION {
            return Err(ConnError::refuse(
                ErrorCode::VersionMismatch,
                format!("client speaks protocol {protocol}, we speak {PROTOCOL_VERSION}"),
            ));
        }
        // With a key, nothing else happens (no fingerprint check, no Welcome, no Compute) until the
        // client has proven it holds the key.
        let server_proof = match self.config.psk.clone() {
            None => None,
            Some(psk) => match self.authenticate(s, &psk, &fingerprint).await? {
                Auth::Proven { server_mac } => Some(server_mac),
                Auth::Ended(end) => return Ok(end),
            },
        };
        // The fingerprint is public (a hash of public-to-the-server weights): no constant time needed.
        if fingerprint != self.weights.fingerprint() {
            return Err(ConnError::refuse(
                ErrorCode::WeightsMismatch,
                format!("client weights {}", hex(&fingerprint)),
            ));
        }
        if let Some(mac) = server_proof {
            self.send(s, &Message::ServerProof { mac }).await?;
        }
        self.send(
            s,
            &Message::Welcome {
                protocol: PROTOCOL_VERSION,
                fingerprint: self.weights.fingerprint(),
                max_rows: self.config.max_rows,
            },
        )
        .await?;

        // Requests.
        loop {
            let n = match self.read_frame(s).await? {
                Frame::Eof => return Ok(Ending::PeerClosed),
                Frame::Body(n) => n,
            };
            let (request, linear, rows) = match decode(&self.rbuf[..n])? {
                Message::Compute {
                    request,
                    linear,
                    rows,
                } => (request, linear, rows),
                Message::Bye => return Ok(Ending::Bye),
                Message::Error { code } => return Ok(Ending::PeerError(code)),
                other => {
                    return Err(ConnError::refuse(
                        ErrorCode::UnexpectedMessage,
                        format!("expected Compute or Bye, got {}", name(&other)),
                    ))
                }
            };
            self.compute(s, request, linear, rows).await?;
        }
    }

    /// The key check: `Challenge` with a fresh nonce, then the client's `Proof` must verify (in
    /// constant time). Anything else is refused `Unauthorized`.
    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        psk: &Psk,
        fingerprint: &[u8; 32],
    ) -> Result<Auth, ConnError> {
        let mut server_nonce = [0u8; 32];
        OsRng
            .try_fill_bytes(&mut server_nonce)
            .map_err(|e| io::Error::other(format!("OS random numbers: {e}")))?;
        self.send(
            s,
            &Message::Challenge {
                nonce: server_nonce,
            },
        )
        .await?;
        let (mac, client_nonce) = match self.read_frame(s).await? {
            Frame::Eof => return Ok(Auth::Ended(Ending::PeerClosed)),
            Frame::Body(n) => match decode(&self.rbuf[..n])? {
                Message::Proof { mac, nonce } => (mac, nonce),
                Message::Error { code } => return Ok(Auth::Ended(Ending::PeerError(code))),
                other => {
                    return Err(ConnError::refuse(
                        ErrorCode::Unauthorized,
                        format!("expected Proof of the pre-shared key, got {}", name(&other)),
                    ))
                }
            },
        };
        if psk
            .mac(CLIENT_LABEL, fingerprint, &server_nonce, &client_nonce)
            .verify_slice(&mac)
            .is_err()
        {
            return Err(ConnError::refuse(
                ErrorCode::Unauthorized,
                "wrong proof of the pre-shared key",
            ));
        }
        let server_mac = psk
            .mac(SERVER_LABEL, fingerprint, &server_nonce, &client_nonce)
            .finalize()
            .into_bytes()
            .into();
        Ok(Auth::Proven { server_mac })
    }

    /// One request: validate, receive the masked rows, multiply, send the products.
    async fn compute<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        request: u32,
        linear: LinearId,
        rows: u32,
    ) -> Result<(), ConnError> {
        let cfg = *self.weights.config();
        if !linear.is_valid(&cfg) {
            return Err(ConnError::refuse(
                ErrorCode::UnknownLayer,
                format!("request {request}: no layer {linear:?}"),
            ));
        }
        if rows == 0 || rows > self.config.max_rows {
            return Err(ConnError::refuse(
                ErrorCode::TooManyRows,
                format!(
                    "request {request}: {rows} rows (accepted: 1..={})",
                    self.config.max_rows
                ),
            ));
        }
        let (in_dim, out_dim) = linear.dims(&cfg);
        let in_words = rows as usize * in_dim;
        let out_words = rows as usize * out_dim;

        // Receive exactly `in_words` words.
        self.input.clear();
        self.input.reserve_exact(in_words);
        while self.input.len() < in_words {
            let n = match self.read_frame(s).await? {
                Frame::Eof => {
                    return Err(ConnError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!(
                            "closed in request {request} after {} of {in_words} words",
                            self.input.len()
                        ),
                    )))
                }
                Frame::Body(n) => n,
            };
            let words = match decode(&self.rbuf[..n])? {
                Message::Data { words } => words,
                other => {
                    return Err(ConnError::refuse(
                        ErrorCode::UnexpectedMessage,
                        format!("request {request}: expected Data, got {}", name(&other)),
                    ))
                }
            };
            let len = words.0.len();
            if len == 0 || len % 4 != 0 || self.input.len() + len / 4 > in_words {
                return Err(ConnError::refuse(
                    ErrorCode::WrongDataLength,
                    format!(
                        "request {request}: Data of {len} bytes after {} of {in_words} words",
                        self.input.len()
                    ),
                ));
            }
            self.input.extend(words.iter());
        }

        // Multiply off the reactor so it keeps serving other clients: in a batch with other
        // connections' rows for this layer, or alone on a blocking thread.
        let input = std::mem::take(&mut self.input);
        let output = std::mem::take(&mut self.output);
        let (input, output) = match &self.batcher {
            Some((batcher, me)) => batcher
                .submit_as(me, linear, input, output)
                .await
                .map_err(|e| io::Error::other(format!("request {request}: {e}")))?,
            None => {
                let weights = self.weights.clone();
                let mut output = output;
                output.clear();
                output.resize(out_words, 0);
                let job = tokio::task::spawn_blocking(move || {
                    if let Some(w) = weights.matrix(linear) {
                        matmul_u32_i8(&input, w, in_dim, out_dim, &mut output);
                    }
                    (input, output)
                });
                job.await.map_err(|e| {
                    io::Error::other(format!("request {request}: kernel failed: {e}"))
                })?
            }
        };
        self.input = input;
        self.output = output;
        self.weights.computed.fetch_add(1, Ordering::Relaxed);

        // Reply: Result, then the words in chunks.
        let limit = self.config.idle_timeout;
        let reply = async {
            let frame = encode_frame(&Message::Result { request, rows }, &mut self.wbuf)
                .map_err(|e| io::Error::other(format!("encode: {e}")))?;
            s.write_all(frame).await?;
            let mut chunk = vec![0u8; MAX_CHUNK_BYTES];
            for words in self.output.chunks(MAX_CHUNK_BYTES / 4) {
                let bytes = &mut chunk[..words.len() * 4];
                for (dst, w) in bytes.chunks_exact_mut(4).zip(words) {
                    dst.copy_from_slice(&w.to_le_bytes());
                }
                let frame = encode_frame(
                    &Message::Data {
                        words: WordBytes(bytes),
                    },
                    &mut self.wbuf,
                )
                .map_err(|e| io::Error::other(format!("encode: {e}")))?;
                s.write_all(frame).await?;
            }
            s.flush().await
        };
        tokio::time::timeout(limit, reply).await.map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("request {request}: client did not read the reply within {limit:?}"),
            )
        })??;
        Ok(())
    }

    /// Reads one frame into `rbuf` within the idle timeout; the length prefix is checked before
    /// any of the body is read.
    async fn read_frame<S: AsyncRead + Unpin>(&mut self, s: &mut S) -> Result<Frame, ConnError> {
        let limit = self.config.idle_timeout;
        let rbuf = &mut self.rbuf;
        let read = async {
            let mut prefix = [0u8; LEN_PREFIX];
            let mut got = 0;
            while got < LEN_PREFIX {
                match s.read(&mut prefix[got..]).await? {
                    0 if got == 0 => return Ok(Frame::Eof),
                    0 => {
                        return Err(ConnError::Io(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "closed inside a length prefix",
                        )))
                    }
                    n => got += n,
                }
            }
            let header = FrameHeader::parse(prefix).map_err(|_| {
                ConnError::refuse(
                    ErrorCode::MalformedFrame,
                    format!(
                        "frame length {} outside 1..={MAX_FRAME_BODY}",
                        u32::from_le_bytes(prefix)
                    ),
                )
            })?;
            let body = &mut rbuf[..header.body_len];
            s.read_exact(body).await?;
            Ok(Frame::Body(header.body_len))
        };
        match tokio::time::timeout(limit, read).await {
            Ok(r) => r,
            Err(_) => Err(ConnError::refuse(
                ErrorCode::Timeout,
                format!("no complete frame within {limit:?}"),
            )),
        }
    }

    async fn send<S: AsyncWrite + Unpin>(
        &mut self,
        s: &mut S,
        msg: &Message<'_>,
    ) -> Result<(), ConnError> {
        let frame = encode_frame(msg, &mut self.wbuf)
            .map_err(|e| io::Error::other(format!("encode: {e}")))?;
        let limit = self.config.idle_timeout;
        let send = async {
            s.write_all(frame).await?;
            s.flush().await
        };
        tokio::time::timeout(limit, send)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "peer too slow to read"))??;
        Ok(())
    }
}

fn decode(body: &[u8]) -> Result<Message<'_>, ConnError> {
    decode_body(body).map_err(|_| {
        ConnError::refuse(
            ErrorCode::MalformedFrame,
            format!("undecodable {}-byte frame", body.len()),
        )
    })
}

fn name(msg: &Message<'_>) -> &'static str {
    match msg {
        Message::Hello { .. } => "Hello",
        Message::Welcome { .. } => "Welcome",
        Message::Compute { .. } => "Compute",
        Message::Result { .. } => "Result",
        Message::Data { .. } => "Data",
        Message::Error { .. } => "Error",
        Message::Bye => "Bye",
        Message::Challenge { .. } => "Challenge",
        Message::Proof { .. } => "Proof",
        Message::ServerProof { .. } => "ServerProof",
    }
}
