//! The client's connection to a server: a thin blocking driver of core's sans-IO
//! [`ClientConnection`] over any byte stream (TCP in practice, in-memory pipes in tests).
//!
//! The machine owns the conversation (hello, the pre-shared-key proof, request/result pairing,
//! chunking, every check of what the server sends); this module only writes the bytes it encodes,
//! reads the server's bytes straight into its receive buffer, and turns the stream's timeouts and
//! end of stream into the machine's events. [`Connection::connect`] opens TCP with a connect
//! timeout and read/write timeouts on the socket, so a server that accepts and then says nothing
//! fails the call within the timeout instead of hanging (and counts as a lost connection).

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use embedded_io_adapters::std::FromStd;
use rand_core::RngCore as _;
use veil_core::mask::MaskedRows;
use veil_core::model::LinearId;
use veil_core::rlwe::{ModSwitch, Seed};
use veil_core::wire::auth::PskKey;
use veil_core::wire::{ClientConnection, ClientError, ClientEvent, ClientSettings, MAX_FRAME};

/// Why talking to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// No connection could be opened.
    #[error("cannot connect to the server at {addr}: {source} (is veil-server running there and reachable? check --server)")]
    Connect {
        /// The address as given.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The connection broke.
    #[error("the connection to the server failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server did not answer within the timeout.
    #[error("{error}: no answer within {} s (--timeout-secs)", .after.as_secs_f64())]
    TimedOut {
        /// What the machine says was pending.
        error: ClientError,
        /// The timeout.
        after: Duration,
    },
    /// The conversation failed: a refusal, a protocol fault of the server, end of stream.
    #[error("{0}")]
    Server(#[from] ClientError),
    /// The OS random number generator failed.
    #[error("no OS random numbers for the handshake nonce: {0}")]
    Random(rand_core::Error),
}

impl TransportError {
    /// Whether a new connection may succeed: the server vanished, stalled or failed
    /// internally. Refusals that would repeat (weights, keys, versions, protocol faults) are not.
    pub fn is_transient(&self) -> bool {
        match self {
            TransportError::Connect { .. }
            | TransportError::Io(_)
            | TransportError::TimedOut { .. } => true,
            TransportError::Server(e) => e.is_transient(),
            TransportError::Random(_) => false,
        }
    }
}

/// Reads a pre-shared key file exactly as `veil-server --psk-file` does (both use core's
/// [`PskKey::read_from`]: hex text or raw bytes, at least 16 bytes); wiped from memory on drop.
pub fn read_psk_file(path: &Path) -> anyhow::Result<PskKey> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the key file {}", path.display()))?;
    PskKey::read_from(&mut FromStd::new(file))
        .map_err(|e| anyhow::anyhow!("key file {}: {e}", path.display()))
}

/// Traffic counters of a connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WireStats {
    /// Bytes sent, frame prefixes included.
    pub bytes_up: u64,
    /// Bytes received, frame prefixes included.
    pub bytes_down: u64,
    /// Request/reply exchanges (handshake included).
    pub round_trips: u64,
}

impl std::ops::Add for WireStats {
    type Output = WireStats;
    fn add(self, b: WireStats) -> WireStats {
        WireStats {
            bytes_up: self.bytes_up + b.bytes_up,
            bytes_down: self.bytes_down + b.bytes_down,
            round_trips: self.round_trips + b.round_trips,
        }
    }
}

/// How to open a TCP connection.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The weights fingerprint and the optional pre-shared key.
    pub settings: ClientSettings,
    /// Longest wait to connect, and for any one read or write once connected.
    pub timeout: Duration,
}

/// Receive buffer: two frames, so one `read` usually brings a reply's header and its first chunk.
const RECV_BYTES: usize = 2 * MAX_FRAME;
/// Transmit buffer: a 768-word row fits one write, a prefill goes out in writes of ~128 KiB.
const SEND_BYTES: usize = 4 * MAX_FRAME;

/// A session with a server.
pub struct Connection<R: Read, W: Write> {
    reader: R,
    writer: W,
    machine: ClientConnection<Box<[u8]>>,
    tx: Box<[u8]>,
    timeout: Option<Duration>,
    stats: WireStats,
}

impl<R: Read, W: Write> std::fmt::Debug for Connection<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("max_rows", &self.machine.max_rows())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Hex of a fingerprint.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl Connection<TcpStream, TcpStream> {
    /// Connects to `addr` (host:port; every address it resolves to is tried), with
    /// `options.timeout` for the connect and for each read and write after it (Nagle off: 25
    /// small round trips per token), and runs the handshake.
    pub fn connect(addr: &str, options: &ConnectOptions) -> Result<Self, TransportError> {
        let connect_err = |source| TransportError::Connect {
            addr: addr.to_string(),
            source,
        };
        let mut last = None;
        let mut stream = None;
        for a in addr.to_socket_addrs().map_err(connect_err)? {
            match TcpStream::connect_timeout(&a, options.timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let stream = stream.ok_or_else(|| {
            connect_err(last.unwrap_or_else(|| {
                std::io::Error::new(ErrorKind::NotFound, "the address resolves to nothing")
            }))
        })?;
        stream.set_nodelay(true).ok();
        stream.set_read_timeout(Some(options.timeout))?;
        stream.set_write_timeout(Some(options.timeout))?;
        let reader = stream.try_clone()?;
        Connection::handshake(
            reader,
            stream,
            options.settings.clone(),
            Some(options.timeout),
        )
    }
}

impl<R: Read, W: Write> Connection<R, W> {
    /// Says hello over the two directions of one stream (e.g. a `TcpStream` and its
    /// `try_clone`, or the halves of an in-memory pipe) and waits for the server to accept.
    /// `timeout` is the stream's own read timeout, if it has one (for messages).
    pub fn handshake(
        reader: R,
        writer: W,
        settings: ClientSettings,
        timeout: Option<Duration>,
    ) -> Result<Self, TransportError> {
        let mut nonce = [0u8; 32];
        rand_core::OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(TransportError::Random)?;
        let machine =
            ClientConnection::new(settings, nonce, vec![0u8; RECV_BYTES].into_boxed_slice())
                .map_err(|e| TransportError::Io(std::io::Error::other(e)))?;
        let mut c = Connection {
            reader,
            writer,
            machine,
            tx: vec![0u8; SEND_BYTES].into_boxed_slice(),
            timeout,
            stats: WireStats::default(),
        };
        // The hello; `receive` sends what the machine answers after it (the proof).
        match c.receive(&mut []) {
            Ok(ClientEvent::Connected { .. }) => Ok(c),
            Ok(_) => Err(TransportError::Server(ClientError::NotReady)),
            Err(e) => {
                // The machine may have queued an Error telling the server why we leave.
                let _ = c.flush_control();
                Err(e)
            }
        }
    }

    /// Most rows the server takes in one request.
    pub fn max_rows(&self) -> usize {
        self.machine.max_rows() as usize
    }

    /// Traffic so far.
    pub fn stats(&self) -> WireStats {
        self.stats
    }

    /// Writes the control frames the machine has queued; returns the bytes written.
    fn flush_control(&mut self) -> Result<usize, TransportError> {
        let mut total = 0;
        loop {
            let n = self.machine.poll_transmit(&mut self.tx);
            if n == 0 {
                break;
            }
            self.write(n)?;
            total += n;
        }
        if total > 0 {
            self.writer.flush().map_err(|e| self.io_error(e))?;
        }
        Ok(total)
    }

    fn write(&mut self, n: usize) -> Result<(), TransportError> {
        let result = self.writer.write_all(&self.tx[..n]);
        if let Err(e) = result {
            return Err(self.server_reason().unwrap_or_else(|| self.io_error(e)));
        }
        self.stats.bytes_up += n as u64;
        Ok(())
    }

    /// After a failed write: the server's reason, if it sent one before closing. A server refuses
    /// a request at its header and hangs up while the client is still sending the rest (an
    /// offline layer's upload is megabytes), so the write fails with "broken pipe" or "reset"
    /// while the `Error` frame that says why waits, unread, in the receive queue.
    fn server_reason(&mut self) -> Option<TransportError> {
        let mut n = 0;
        loop {
            match self.machine.handle_received(n, &mut []) {
                Err(e) => return Some(e.into()),
                Ok(Some(_)) => return None,
                Ok(None) => {}
            }
            n = match self.reader.read(self.machine.recv_buffer()) {
                Ok(0) | Err(_) => return None,
                Ok(n) => n,
            };
            self.stats.bytes_down += n as u64;
        }
    }

    /// A transport error, with a timeout reported as the machine's timeout event.
    fn io_error(&mut self, e: std::io::Error) -> TransportError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => TransportError::TimedOut {
                error: self.machine.handle_timeout(),
                after: self.timeout.unwrap_or_default(),
            },
            _ => TransportError::Io(e),
        }
    }

    /// Reads until the machine reports an event.
    fn receive(&mut self, reply: &mut [u32]) -> Result<ClientEvent, TransportError> {
        let mut n = 0;
        loop {
            if let Some(ev) = self.machine.handle_received(n, reply)? {
                return Ok(ev);
            }
            // What the machine answered (the proof of the pre-shared key) goes out before we
            // wait for more: each such answer is one more exchange.
            if self.flush_control()? > 0 {
                self.stats.round_trips += 1;
            }
            let read = self.reader.read(self.machine.recv_buffer());
            n = match read {
                Ok(0) => return Err(self.machine.handle_eof().into()),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => 0,
                Err(e) => return Err(self.io_error(e)),
            };
            self.stats.bytes_down += n as u64;
        }
    }

    /// Sends one request: the `Compute` header and `masked` (`rows · in_dim` words) in `Data`
    /// chunks, in as few writes as the transmit buffer allows. The products then come with
    /// [`Connection::receive_result`]; in between the caller may work (the online source's
    /// `r · W` overlaps the server's computation this way).
    pub fn send_request(
        &mut self,
        linear: LinearId,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
        masked: MaskedRows<'_>,
    ) -> Result<(), TransportError> {
        self.machine.begin_request(linear, rows, in_dim, out_dim)?;
        loop {
            let n = self.machine.poll_transmit_rows(masked, &mut self.tx);
            if n == 0 {
                break;
            }
            self.write(n)?;
        }
        if let Some(e) = self.machine.failure() {
            return Err(e.into());
        }
        self.writer.flush().map_err(|e| self.io_error(e))?;
        self.stats.round_trips += 1;
        Ok(())
    }

    /// Receives the products of the request sent last into `reply` (`rows · out_dim` words).
    pub fn receive_result(&mut self, reply: &mut [u32]) -> Result<(), TransportError> {
        match self.receive(reply)? {
            ClientEvent::Result { .. } => Ok(()),
            _ => Err(TransportError::Server(ClientError::NotReady)),
        }
    }

    /// Downloads the server's `linear.veil`, handing its bytes to `on_bytes` in order, in pieces;
    /// returns its announced length. If `expected` is not that length, stops before the first
    /// byte (the connection is then unusable: drop it). Memory: one chunk.
    pub fn download_weights(
        &mut self,
        expected: u64,
        on_bytes: &mut dyn FnMut(&[u8]),
    ) -> Result<u64, TransportError> {
        self.machine.fetch_weights()?;
        self.flush_control()?;
        self.stats.round_trips += 1;
        let mut words = vec![0u32; veil_core::wire::CHUNK_WORDS];
        let mut bytes = vec![0u8; 4 * veil_core::wire::CHUNK_WORDS];
        let (mut total, mut left) = (0u64, 0u64);
        loop {
            match self.receive(&mut words)? {
                ClientEvent::Weights { bytes } if bytes != expected => return Ok(bytes),
                ClientEvent::Weights { bytes } => (total, left) = (bytes, bytes),
                ClientEvent::WeightsData { words: n } => {
                    for (b, w) in bytes.chunks_exact_mut(4).zip(&words[..n]) {
                        b.copy_from_slice(&w.to_le_bytes());
                    }
                    // The last word is zero-padded past the file's end.
                    let take = left.min(4 * n as u64) as usize;
                    on_bytes(&bytes[..take]);
                    left -= take as u64;
                }
                _ => return Err(TransportError::Server(ClientError::NotReady)),
            }
            if self.machine.is_ready() {
                return Ok(total);
            }
        }
    }

    /// Starts the offline phase of one layer for one RLWE key (see
    /// [`ClientConnection::begin_offline`]); then [`Connection::send_ciphertext`] `in_dim` times
    /// and [`Connection::receive_offline_output`] `out_dim` times.
    pub fn begin_offline(
        &mut self,
        linear: LinearId,
        in_dim: usize,
        out_dim: usize,
        seed: Seed,
        switch: ModSwitch,
    ) -> Result<(), TransportError> {
        self.machine
            .begin_offline(linear, in_dim, out_dim, seed, switch)?;
        self.stats.round_trips += 1;
        Ok(())
    }

    /// Sends the next input ciphertext (its [`veil_core::rlwe::INPUT_WORDS`] words).
    pub fn send_ciphertext(&mut self, words: &[u32]) -> Result<(), TransportError> {
        let n = self.machine.poll_transmit_ciphertext(words, &mut self.tx);
        if let Some(e) = self.machine.failure() {
            return Err(e.into());
        }
        self.write(n)
    }

    /// Writes out what is buffered (e.g. the last input ciphertexts of an offline layer).
    pub fn flush(&mut self) -> Result<(), TransportError> {
        self.writer.flush().map_err(|e| self.io_error(e))
    }

    /// Receives the next result ciphertext of the offline layer into `reply` (its
    /// [`ModSwitch::result_words`] words); returns its output index.
    pub fn receive_offline_output(&mut self, reply: &mut [u32]) -> Result<usize, TransportError> {
        self.writer.flush().map_err(|e| self.io_error(e))?;
        match self.receive(reply)? {
            ClientEvent::OfflineOutput { output, .. } => Ok(output),
            _ => Err(TransportError::Server(ClientError::NotReady)),
        }
    }

    /// Ends the session politely (errors ignored: we are leaving anyway).
    pub fn bye(mut self) {
        self.machine.close();
        let _ = self.flush_control();
    }
}
