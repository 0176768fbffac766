//! The client side of the wire protocol over any blocking byte stream (TCP in practice).
//!
//! One [`Connection::compute`] is one round trip: a `Compute` header and the masked rows in
//! `Data` chunks go out in one buffered write, then the `Result` and its `Data` chunks come back.
//!
//! With a pre-shared key ([`read_psk_file`], `--psk-file`), the hello becomes a mutual HMAC-SHA256
//! challenge-response: `Hello` → `Challenge{server nonce}` ← `Proof{mac, client nonce}` →
//! `ServerProof{mac}` ← `Welcome` ←. Each side's MAC covers a per-direction label, the protocol
//! version, the fingerprint and both nonces, so neither proof can be replayed or reflected.

use std::io::{BufReader, BufWriter, Read, Write};
use std::path::Path;

use anyhow::Context as _;
use embedded_io_adapters::std::FromStd;
use hmac::Mac as _;
use rand_core::RngCore as _;
use sha2::Sha256;
use veil_core::model::LinearId;
use veil_core::wire::{
    read_frame, write_frame, ErrorCode, FrameError, Message, WordBytes, LEN_PREFIX,
    MAX_CHUNK_BYTES, MAX_FRAME_BODY, PROTOCOL_VERSION,
};
use zeroize::Zeroizing;

/// Why talking to the server failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The connection broke.
    #[error("connection to the server failed: {0}")]
    Io(#[from] std::io::Error),
    /// The server closed the connection.
    #[error("the server closed the connection")]
    Closed,
    /// The server refused with a typed error.
    #[error("the server refused: {0}")]
    Refused(ErrorCode),
    /// The server's weights differ from ours: unmasking would give garbage.
    #[error("the server holds different weights (fingerprint {theirs}, ours {ours}); quantize both from the same checkpoint")]
    WeightsMismatch {
        /// The server's fingerprint.
        theirs: String,
        /// Ours.
        ours: String,
    },
    /// The server speaks another protocol version.
    #[error("the server speaks protocol {0}, this client {PROTOCOL_VERSION}")]
    VersionMismatch(u32),
    /// The server broke the protocol.
    #[error("protocol violation by the server: {0}")]
    Protocol(&'static str),
    /// The server asks for a pre-shared key and we have none.
    #[error("the server requires a pre-shared key (--psk-file)")]
    PskRequired,
    /// We have a pre-shared key but the server did not ask for it: it cannot prove it is the
    /// server that holds our key, so we refuse it.
    #[error("the server does not require the pre-shared key; refusing a server that cannot prove it holds it")]
    PskNotRequired,
    /// The server's proof of the pre-shared key is wrong: it holds another key.
    #[error("the server's proof of the pre-shared key is wrong (it holds a different key)")]
    ServerProofInvalid,
    /// The OS random number generator failed.
    #[error("no OS random numbers for the handshake nonce: {0}")]
    Random(rand_core::Error),
}

pub use veil_core::wire::auth::PSK_MIN_BYTES;
use veil_core::wire::auth::{transcript, CLIENT_LABEL, PSK_FILE_MAX_BYTES, SERVER_LABEL};

type HmacSha256 = hmac::Hmac<Sha256>;

/// Reads a pre-shared key file exactly as `veil-server --psk-file` does (both use
/// `veil_core::wire::auth::decode_psk`: hex text or raw bytes, at least [`PSK_MIN_BYTES`]). The
/// key is wiped from memory on drop.
pub fn read_psk_file(path: &Path) -> anyhow::Result<Zeroizing<Vec<u8>>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot open the key file {}", path.display()))?;
    let mut contents = Zeroizing::new(Vec::new());
    file.take(PSK_FILE_MAX_BYTES as u64 + 1)
        .read_to_end(&mut contents)
        .with_context(|| format!("cannot read the key file {}", path.display()))?;
    let mut key = Zeroizing::new(vec![0u8; contents.len()]);
    let n = veil_core::wire::auth::decode_psk(&contents, &mut key)
        .with_context(|| format!("key file {}", path.display()))?;
    key.truncate(n);
    Ok(key)
}

/// The MAC of one side's transcript (`veil_core::wire::auth::transcript`).
fn auth_mac(
    psk: &[u8],
    label: &[u8; 16],
    fingerprint: &[u8; 32],
    server_nonce: &[u8; 32],
    client_nonce: &[u8; 32],
) -> HmacSha256 {
    // HMAC takes keys of any length: this never fails.
    let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(psk)
        .unwrap_or_else(|_| unreachable!("HMAC accepts any key length"));
    mac.update(&transcript(label, fingerprint, server_nonce, client_nonce));
    mac
}

impl From<FrameError<std::io::Error>> for TransportError {
    fn from(e: FrameError<std::io::Error>) -> Self {
        match e {
            FrameError::Io(e) => TransportError::Io(e),
            FrameError::Closed => TransportError::Closed,
            FrameError::TooLarge(_) => TransportError::Protocol("oversized frame"),
            _ => TransportError::Protocol("malformed frame"),
        }
    }
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

/// A reader that counts the bytes it hands out.
#[derive(Debug)]
struct Counting<R> {
    inner: R,
    count: u64,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count += n as u64;
        Ok(n)
    }
}

/// A server message of the handshake, copied out of the frame buffer.
#[derive(Clone, Copy, Debug)]
enum Reply {
    Challenge([u8; 32]),
    ServerProof([u8; 32]),
    Welcome {
        protocol: u32,
        fingerprint: [u8; 32],
        max_rows: u32,
    },
    Error(ErrorCode),
    /// Anything else (a protocol violation at this point).
    Other,
}

/// A session with a server.
pub struct Connection<R: Read, W: Write> {
    /// Buffered so a frame's length prefix and body (and the next frames of a reply) come in one
    /// `recv`, not two each; counted below the buffer, so the count is bytes off the wire.
    reader: FromStd<BufReader<Counting<R>>>,
    writer: BufWriter<W>,
    frame: Vec<u8>,
    scratch: Vec<u8>,
    /// Little-endian staging of one `Data` chunk (kept: no allocation per request).
    chunk: Vec<u8>,
    max_rows: u32,
    next_request: u32,
    /// Traffic so far.
    pub stats: WireStats,
}

impl<R: Read, W: Write> std::fmt::Debug for Connection<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("max_rows", &self.max_rows)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

/// Hex of a fingerprint.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl<R: Read, W: Write> Connection<R, W> {
    /// Says hello with our weights fingerprint; `reader` and `writer` are the two directions of
    /// one stream (e.g. a `TcpStream` and its `try_clone`, or the halves of an in-memory pipe).
    ///
    /// With `psk`, the server must challenge us and prove it holds the same key (a server that
    /// does not ask is refused); without, a server that asks for a key is refused.
    pub fn handshake(
        reader: R,
        writer: W,
        fingerprint: [u8; 32],
        psk: Option<&[u8]>,
    ) -> Result<Self, TransportError> {
        let mut c = Connection {
            reader: FromStd::new(BufReader::with_capacity(
                64 * 1024,
                Counting {
                    inner: reader,
                    count: 0,
                },
            )),
            writer: BufWriter::with_capacity(64 * 1024, writer),
            frame: vec![0; MAX_FRAME_BODY],
            scratch: vec![0; MAX_FRAME_BODY + LEN_PREFIX],
            chunk: vec![0; MAX_CHUNK_BYTES],
            max_rows: 0,
            next_request: 0,
            stats: WireStats::default(),
        };
        c.send(&Message::Hello {
            protocol: PROTOCOL_VERSION,
            fingerprint,
        })?;
        c.writer.flush()?;
        c.stats.round_trips += 1;
        let mut reply = c.recv_reply()?;
        match (reply, psk) {
            (Reply::Challenge(server_nonce), Some(psk)) => {
                c.prove(psk, &fingerprint, &server_nonce)?;
                reply = c.recv_reply()?;
            }
            (Reply::Challenge(_), None) => {
                c.refuse();
                return Err(TransportError::PskRequired);
            }
            (Reply::Welcome { .. }, Some(_)) => {
                c.refuse();
                return Err(TransportError::PskNotRequired);
            }
            _ => {}
        }
        c.welcome(reply, fingerprint)
    }

    /// The next handshake message, copied out of the frame buffer.
    fn recv_reply(&mut self) -> Result<Reply, TransportError> {
        Ok(match self.recv()? {
            Message::Challenge { nonce } => Reply::Challenge(nonce),
            Message::ServerProof { mac } => Reply::ServerProof(mac),
            Message::Welcome {
                protocol,
                fingerprint,
                max_rows,
            } => Reply::Welcome {
                protocol,
                fingerprint,
                max_rows,
            },
            Message::Error { code } => Reply::Error(code),
            _ => Reply::Other,
        })
    }

    /// Answers the server's challenge and checks its proof (which arrives before `Welcome`).
    fn prove(
        &mut self,
        psk: &[u8],
        fingerprint: &[u8; 32],
        server_nonce: &[u8; 32],
    ) -> Result<(), TransportError> {
        let mut client_nonce = [0u8; 32];
        rand_core::OsRng
            .try_fill_bytes(&mut client_nonce)
            .map_err(TransportError::Random)?;
        let mac = auth_mac(psk, CLIENT_LABEL, fingerprint, server_nonce, &client_nonce)
            .finalize()
            .into_bytes()
            .into();
        self.send(&Message::Proof {
            mac,
            nonce: client_nonce,
        })?;
        self.writer.flush()?;
        self.stats.round_trips += 1;
        let proof = match self.recv_reply()? {
            Reply::ServerProof(mac) => mac,
            Reply::Error(code) => return Err(TransportError::Refused(code)),
            _ => return Err(TransportError::Protocol("expected ServerProof")),
        };
        if auth_mac(psk, SERVER_LABEL, fingerprint, server_nonce, &client_nonce)
            .verify_slice(&proof)
            .is_err()
        {
            self.refuse();
            return Err(TransportError::ServerProofInvalid);
        }
        Ok(())
    }

    /// Tells the server we refuse it (best effort: we are leaving anyway).
    fn refuse(&mut self) {
        let _ = self.send(&Message::Error {
            code: ErrorCode::Unauthorized,
        });
        let _ = self.writer.flush();
    }

    /// Checks the server's `Welcome` (or its refusal).
    fn welcome(mut self, reply: Reply, fingerprint: [u8; 32]) -> Result<Self, TransportError> {
        match reply {
            Reply::Welcome {
                protocol,
                fingerprint: theirs,
                max_rows,
            } => {
                if protocol != PROTOCOL_VERSION {
                    return Err(TransportError::VersionMismatch(protocol));
                }
                if theirs != fingerprint {
                    return Err(TransportError::WeightsMismatch {
                        theirs: hex(&theirs),
                        ours: hex(&fingerprint),
                    });
                }
                if max_rows == 0 {
                    return Err(TransportError::Protocol("server accepts zero rows"));
                }
                self.max_rows = max_rows;
                Ok(self)
            }
            Reply::Error(ErrorCode::WeightsMismatch) => Err(TransportError::WeightsMismatch {
                theirs: "(not disclosed)".into(),
                ours: hex(&fingerprint),
            }),
            Reply::Error(code) => Err(TransportError::Refused(code)),
            _ => Err(TransportError::Protocol("expected Welcome")),
        }
    }

    /// Most rows the server takes in one request.
    pub fn max_rows(&self) -> usize {
        self.max_rows as usize
    }

    fn send(&mut self, msg: &Message<'_>) -> Result<(), TransportError> {
        let frame = veil_core::wire::encode_frame(msg, &mut self.scratch)
            .map_err(|_| TransportError::Protocol("frame too large to encode"))?;
        self.stats.bytes_up += frame.len() as u64;
        self.writer.write_all(frame)?;
        Ok(())
    }

    fn recv(&mut self) -> Result<Message<'_>, TransportError> {
        let msg = read_frame(&mut self.reader, &mut self.frame)?;
        self.stats.bytes_down = self.reader.inner().get_ref().count;
        Ok(msg)
    }

    /// One round trip: sends `rows` masked rows for `linear`, receives `rows · out_dim` words.
    pub fn compute(
        &mut self,
        linear: LinearId,
        rows: usize,
        masked: &[u32],
        reply: &mut [u32],
    ) -> Result<(), TransportError> {
        let request = self.next_request;
        self.next_request = self.next_request.wrapping_add(1);
        self.send(&Message::Compute {
            request,
            linear,
            rows: rows as u32,
        })?;
        let bytes = &mut self.chunk;
        for chunk in masked.chunks(MAX_CHUNK_BYTES / 4) {
            for (b, w) in bytes.chunks_exact_mut(4).zip(chunk) {
                b.copy_from_slice(&w.to_le_bytes());
            }
            let n = chunk.len() * 4;
            let data = Message::Data {
                words: WordBytes(&bytes[..n]),
            };
            let frame = veil_core::wire::encode_frame(&data, &mut self.scratch)
                .map_err(|_| TransportError::Protocol("frame too large to encode"))?;
            self.stats.bytes_up += frame.len() as u64;
            self.writer.write_all(frame)?;
        }
        self.writer.flush()?;
        self.stats.round_trips += 1;
        match self.recv()? {
            Message::Result {
                request: r,
                rows: n,
            } if r == request && n as usize == rows => {}
            Message::Error { code } => return Err(TransportError::Refused(code)),
            _ => {
                return Err(TransportError::Protocol(
                    "expected the Result of our request",
                ))
            }
        }
        let mut filled = 0;
        while filled < reply.len() {
            let Message::Data { words } = self.recv()? else {
                return Err(TransportError::Protocol("expected Data"));
            };
            if words.0.len() % 4 != 0 || filled + words.words() > reply.len() {
                return Err(TransportError::Protocol("reply longer than requested"));
            }
            for (dst, w) in reply[filled..].iter_mut().zip(words.iter()) {
                *dst = w;
            }
            filled += words.words();
        }
        Ok(())
    }

    /// Ends the session politely (errors ignored: we are leaving anyway).
    pub fn bye(mut self) {
        let mut scratch = vec![0u8; 64];
        let mut w = FromStd::new(&mut self.writer);
        let _ = write_frame(&mut w, &Message::Bye, &mut scratch);
        let _ = self.writer.flush();
    }
}
