//! The client side of the wire protocol over any blocking byte stream (TCP in practice).
//!
//! One [`Connection::compute`] is one round trip: a `Compute` header and the masked rows in
//! `Data` chunks go out in one buffered write, then the `Result` and its `Data` chunks come back.

use std::io::{BufWriter, Read, Write};

use embedded_io_adapters::std::FromStd;
use veil_core::model::LinearId;
use veil_core::wire::{
    read_frame, write_frame, ErrorCode, FrameError, Message, WordBytes, LEN_PREFIX,
    MAX_CHUNK_BYTES, MAX_FRAME_BODY, PROTOCOL_VERSION,
};

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

/// A session with a server.
pub struct Connection<R: Read, W: Write> {
    reader: FromStd<Counting<R>>,
    writer: BufWriter<W>,
    frame: Vec<u8>,
    scratch: Vec<u8>,
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
    pub fn handshake(reader: R, writer: W, fingerprint: [u8; 32]) -> Result<Self, TransportError> {
        let mut c = Connection {
            reader: FromStd::new(Counting {
                inner: reader,
                count: 0,
            }),
            writer: BufWriter::with_capacity(64 * 1024, writer),
            frame: vec![0; MAX_FRAME_BODY],
            scratch: vec![0; MAX_FRAME_BODY + LEN_PREFIX],
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
        let msg = c.recv()?;
        match msg {
            Message::Welcome {
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
                c.max_rows = max_rows;
                Ok(c)
            }
            Message::Error {
                code: ErrorCode::WeightsMismatch,
            } => Err(TransportError::WeightsMismatch {
                theirs: "(not disclosed)".into(),
                ours: hex(&fingerprint),
            }),
            Message::Error { code } => Err(TransportError::Refused(code)),
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
        self.stats.bytes_down = self.reader.inner().count;
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
        let mut bytes = vec![0u8; MAX_CHUNK_BYTES];
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
