//! The client's side of one connection as a sans-IO state machine.
//!
//! The host writes out what [`ClientConnection::poll_transmit`] encodes (the hello, the proof
//! of the pre-shared key, a request's `Compute` header and masked rows), reads the server's
//! bytes into [`ClientConnection::recv_buffer`] and reports them with
//! [`ClientConnection::handle_received`], which yields [`ClientEvent`]s: connected, a result
//! complete. End of stream and the host's timer are events too ([`ClientConnection::handle_eof`],
//! [`ClientConnection::handle_timeout`]): the machine reads no clock.
//!
//! The words of a request are copied once each way in user space: the masked rows into the
//! transmit buffer, the products from the frame buffer into the caller's reply buffer.

use super::auth::{PskKey, CLIENT_LABEL, SERVER_LABEL};
use super::chunks::{DataLengthError, WordCursor};
use super::frame::{encode_frame, FrameDecoder, FrameError, MAX_FRAME};
use super::message::{ErrorCode, Message, PROTOCOL_VERSION};
use super::OfflineLayer as Offline;
use crate::mask::MaskedRows;
use crate::model::LinearId;
use crate::rlwe::{ModSwitch, Seed, INPUT_WORDS};

/// What the client brings to a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientSettings {
    /// SHA-256 of the `linear.veil` the client's weights were quantized with: the server must
    /// hold the same (unmasking with other weights gives garbage).
    pub fingerprint: [u8; 32],
    /// With a key, the server must challenge us and prove it holds the same key; without one, a
    /// server that asks for a key is refused.
    pub psk: Option<PskKey>,
}

/// Something the host should know.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientEvent {
    /// The server accepted the session.
    Connected {
        /// Most rows the server takes in one request.
        max_rows: u32,
    },
    /// The products of `request` are all in the reply buffer.
    Result {
        /// The request id.
        request: u32,
    },
    /// The server's `linear.veil` follows (`bytes` long), after [`ClientConnection::fetch_weights`].
    Weights {
        /// The file's length.
        bytes: u64,
    },
    /// The next `words` words of the weights are at the start of the reply buffer (the
    /// download is complete when [`ClientConnection::is_ready`] again).
    WeightsData {
        /// How many.
        words: usize,
    },
    /// Result ciphertext `output` of offline request `request` is in the reply buffer (its
    /// [`ModSwitch::result_words`] words, packed).
    OfflineOutput {
        /// The request id.
        request: u32,
        /// The output index.
        output: usize,
    },
}

/// What the client was waiting for when something went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Waiting {
    /// The handshake (hello, key check, welcome).
    Handshake,
    /// The reply to one request.
    Reply {
        /// The request id.
        request: u32,
        /// Its layer.
        linear: LinearId,
    },
    /// The results of an offline layer.
    Offline {
        /// The request id.
        request: u32,
        /// Its layer.
        linear: LinearId,
    },
    /// The server's weights.
    Weights,
    /// Nothing (between requests).
    Idle,
}

impl core::fmt::Display for Waiting {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Waiting::Handshake => f.write_str("during the handshake"),
            Waiting::Reply { request, linear } => {
                write!(f, "waiting for the reply to request {request} ({linear})")
            }
            Waiting::Offline { request, linear } => {
                write!(
                    f,
                    "waiting for the offline results of request {request} ({linear})"
                )
            }
            Waiting::Weights => f.write_str("downloading the server's weights"),
            Waiting::Idle => f.write_str("between requests"),
        }
    }
}

/// Why the conversation with the server failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused with a typed error.
    Refused(ErrorCode),
    /// The server speaks another protocol version.
    Version {
        /// The server's version.
        theirs: u32,
    },
    /// The server holds other weights.
    WeightsMismatch {
        /// The server's fingerprint, when it told us (a refusing server does not).
        theirs: Option<[u8; 32]>,
        /// Ours.
        ours: [u8; 32],
    },
    /// The server asks for a pre-shared key and we have none.
    PskRequired,
    /// We hold a pre-shared key but the server did not ask for it, so it cannot prove it holds it.
    PskNotRequired,
    /// The server's proof of the pre-shared key is wrong: it holds another key.
    ServerProofInvalid,
    /// The server sent a message that is not allowed at this point.
    Unexpected {
        /// What we were waiting for.
        expected: &'static str,
        /// What came.
        got: &'static str,
    },
    /// The server's `Result` names another request or row count than ours.
    WrongResult {
        /// Our request.
        request: u32,
        /// Its id in the server's `Result`.
        got_request: u32,
        /// Rows in the server's `Result`.
        got_rows: u32,
    },
    /// The server's `Data` does not fit the result.
    DataLength(DataLengthError),
    /// The server said it takes zero rows.
    ZeroRows,
    /// A frame from the server could not be decoded.
    Frame(FrameError),
    /// The server closed the connection.
    Closed(Waiting),
    /// The host's timer fired before the server answered.
    TimedOut(Waiting),
    /// The caller asked for something the connection cannot do now (a request before the
    /// handshake finished, or while another is in flight).
    NotReady,
    /// A request with more rows than the server takes, or zero.
    TooManyRows {
        /// Rows asked for.
        rows: usize,
        /// The server's limit.
        max: u32,
    },
}

impl ClientError {
    /// Whether a new connection may help (the server vanished, stalled or failed internally);
    /// false for refusals that would repeat (wrong weights, keys, versions, protocol faults).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            ClientError::Closed(_)
                | ClientError::TimedOut(_)
                | ClientError::Refused(
                    ErrorCode::ComputeFailed | ErrorCode::Busy | ErrorCode::Timeout
                )
        )
    }
}

fn hex(f: &mut core::fmt::Formatter<'_>, b: &[u8; 32]) -> core::fmt::Result {
    for x in b {
        write!(f, "{x:02x}")?;
    }
    Ok(())
}

impl core::fmt::Display for ClientError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientError::Refused(code) => {
                write!(f, "the server refused: {code}")?;
                f.write_str(match code {
                    ErrorCode::Busy => " (it is at its connection limit; try again later)",
                    ErrorCode::Unauthorized => " (check that both sides use the same --psk-file)",
                    ErrorCode::VersionMismatch => " (update the client or the server so both speak the same protocol)",
                    ErrorCode::Timeout => " (the server's idle timeout passed)",
                    ErrorCode::ComputeFailed => " (an internal fault of the server; retrying on a new connection may help)",
                    _ => "",
                })
            }
            ClientError::Version { theirs } => write!(
                f,
                "the server speaks protocol {theirs}, this client {PROTOCOL_VERSION}: update one of them"
            ),
            ClientError::WeightsMismatch { theirs, ours } => {
                f.write_str("the server holds different weights (")?;
                match theirs {
                    Some(t) => {
                        f.write_str("its fingerprint ")?;
                        hex(f, t)?;
                    }
                    None => f.write_str("it did not say which")?,
                }
                f.write_str(", ours ")?;
                hex(f, ours)?;
                f.write_str("): give both sides files from the same `veil-tools quantize` run")
            }
            ClientError::PskRequired => {
                f.write_str("the server requires a pre-shared key: pass the server's key file with --psk-file")
            }
            ClientError::PskNotRequired => f.write_str(
                "the server does not ask for the pre-shared key, so it cannot prove it holds it: refusing it (is this the right server? is its --psk-file set?)",
            ),
            ClientError::ServerProofInvalid => f.write_str(
                "the server's proof of the pre-shared key is wrong: it holds a different key",
            ),
            ClientError::Unexpected { expected, got } => write!(
                f,
                "protocol violation by the server: expected {expected}, got {got}"
            ),
            ClientError::WrongResult {
                request,
                got_request,
                got_rows,
            } => write!(
                f,
                "protocol violation by the server: the result of request {got_request} ({got_rows} rows) came while request {request} was pending"
            ),
            ClientError::DataLength(e) => write!(f, "protocol violation by the server: {e}"),
            ClientError::ZeroRows => f.write_str("protocol violation by the server: it accepts zero rows per request"),
            ClientError::Frame(e) => write!(f, "protocol violation by the server: {e}"),
            ClientError::Closed(w) => write!(f, "the server closed the connection {w}"),
            ClientError::TimedOut(w) => write!(f, "the server did not answer in time ({w})"),
            ClientError::NotReady => f.write_str("the connection is not ready for a request"),
            ClientError::TooManyRows { rows, max } => write!(
                f,
                "a request of {rows} rows, the server takes 1 to {max}"
            ),
        }
    }
}

impl core::error::Error for ClientError {}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Request {
    request: u32,
    linear: LinearId,
    rows: usize,
    out_dim: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// `Hello` queued or sent; waiting for `Challenge` (with a key) or `Welcome`.
    Hello,
    /// `Proof` sent; waiting for `ServerProof`.
    Proof { server_nonce: [u8; 32] },
    /// Proven; waiting for `Welcome`.
    Welcome,
    /// Between requests.
    Ready,
    /// Encoding a request: its header (unless `header_sent`) and rows.
    Sending {
        req: Request,
        header_sent: bool,
        rows: WordCursor,
    },
    /// Waiting for the request's `Result` header.
    Awaiting { req: Request },
    /// Taking the request's products.
    Receiving { req: Request, products: WordCursor },
    /// Offline: sending the layer's header (unless `header_sent`) and input ciphertexts.
    OfflineSending {
        off: Offline,
        header_sent: bool,
        sent: usize,
    },
    /// Offline: waiting for the `OfflineResult` header.
    OfflineAwaiting { off: Offline },
    /// Offline: taking result ciphertext `index`.
    OfflineReceiving {
        off: Offline,
        index: usize,
        words: WordCursor,
    },
    /// Weights download: `FetchWeights` queued or sent, waiting for the `Weights` header.
    WeightsAwaiting,
    /// Weights download: taking the file's words.
    WeightsReceiving { total: usize, done: usize },
    /// Failed or said goodbye: a queued `Error` or `Bye` may still go out.
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Control {
    Hello,
    Proof { mac: [u8; 32] },
    FetchWeights,
    Error(ErrorCode),
    Bye,
}

/// The client's side of one conversation over a receive buffer `R` (at least [`MAX_FRAME`]
/// bytes; more lets one read take in several frames).
#[derive(Debug)]
pub struct ClientConnection<R> {
    rx: FrameDecoder<R>,
    st: State,
}

#[derive(Debug)]
struct State {
    settings: ClientSettings,
    nonce: [u8; 32],
    phase: Phase,
    queued: Option<Control>,
    max_rows: u32,
    next_request: u32,
    failure: Option<ClientError>,
}

impl<R: AsRef<[u8]> + AsMut<[u8]>> ClientConnection<R> {
    /// Starts a conversation (the `Hello` is the first frame [`ClientConnection::poll_transmit`]
    /// gives). `nonce` is fresh randomness from the host, used if the server challenges us.
    pub fn new(settings: ClientSettings, nonce: [u8; 32], rx: R) -> Result<Self, FrameError> {
        Ok(ClientConnection {
            rx: FrameDecoder::new(rx)?,
            st: State {
                settings,
                nonce,
                phase: Phase::Hello,
                queued: Some(Control::Hello),
                max_rows: 0,
                next_request: 0,
                failure: None,
            },
        })
    }

    /// Most rows per request, once connected (0 before).
    pub fn max_rows(&self) -> u32 {
        self.st.max_rows
    }

    /// True between requests once the handshake is done.
    pub fn is_ready(&self) -> bool {
        self.st.phase == Phase::Ready
    }

    /// Why the conversation failed, if it has.
    pub fn failure(&self) -> Option<ClientError> {
        self.st.failure
    }

    /// What the client is waiting for (for messages).
    pub fn waiting(&self) -> Waiting {
        match self.st.phase {
            Phase::Hello | Phase::Proof { .. } | Phase::Welcome => Waiting::Handshake,
            Phase::Sending { req, .. } | Phase::Awaiting { req } | Phase::Receiving { req, .. } => {
                Waiting::Reply {
                    request: req.request,
                    linear: req.linear,
                }
            }
            Phase::OfflineSending { off, .. }
            | Phase::OfflineAwaiting { off }
            | Phase::OfflineReceiving { off, .. } => Waiting::Offline {
                request: off.request,
                linear: off.linear,
            },
            Phase::WeightsAwaiting | Phase::WeightsReceiving { .. } => Waiting::Weights,
            Phase::Ready | Phase::Closed => Waiting::Idle,
        }
    }

    /// Asks for the server's `linear.veil`: the `FetchWeights` is the next frame of
    /// [`ClientConnection::poll_transmit`]; then [`ClientEvent::Weights`] and
    /// [`ClientEvent::WeightsData`] until the machine is ready again.
    pub fn fetch_weights(&mut self) -> Result<(), ClientError> {
        if self.st.phase != Phase::Ready {
            return Err(self.st.failure.unwrap_or(ClientError::NotReady));
        }
        self.st.queued = Some(Control::FetchWeights);
        self.st.phase = Phase::WeightsAwaiting;
        Ok(())
    }

    /// Starts the offline phase of `linear` (widths `in_dim` → `out_dim`) for one RLWE key: the
    /// `in_dim` input ciphertexts go out, in order, with
    /// [`ClientConnection::poll_transmit_ciphertext`]; the results then arrive one by one
    /// through [`ClientConnection::handle_received`] ([`ClientEvent::OfflineOutput`]). `seed`
    /// must be fresh for the key. Returns the request id.
    pub fn begin_offline(
        &mut self,
        linear: LinearId,
        in_dim: usize,
        out_dim: usize,
        seed: Seed,
        switch: ModSwitch,
    ) -> Result<u32, ClientError> {
        if self.st.phase != Phase::Ready {
            return Err(self.st.failure.unwrap_or(ClientError::NotReady));
        }
        let request = self.st.next_request;
        self.st.next_request = self.st.next_request.wrapping_add(1);
        self.st.phase = Phase::OfflineSending {
            off: Offline {
                request,
                linear,
                in_dim,
                out_dim,
                seed,
                switch,
            },
            header_sent: false,
            sent: 0,
        };
        Ok(request)
    }

    /// Encodes the next input ciphertext of the offline layer (its [`INPUT_WORDS`] words, from
    /// [`crate::rlwe::input_words`]), preceded by the layer's header before the first, into
    /// `out` (at least `2 ·` [`MAX_FRAME`] bytes); returns the bytes written, 0 if no ciphertext
    /// is due.
    pub fn poll_transmit_ciphertext(&mut self, words: &[u32], out: &mut [u8]) -> usize {
        let Phase::OfflineSending {
            off,
            header_sent,
            sent,
        } = self.st.phase
        else {
            return 0;
        };
        if words.len() != INPUT_WORDS || out.len() < 2 * MAX_FRAME {
            // A caller bug, not the server's.
            self.st.fail(ClientError::NotReady);
            return 0;
        }
        let mut at = 0;
        if !header_sent {
            let msg = Message::OfflineLayer {
                request: off.request,
                linear: off.linear,
                seed: off.seed.0,
                drop_a: off.switch.drop_a as u8,
                drop_b: off.switch.drop_b as u8,
            };
            at += encode_frame(&msg, out).unwrap_or(0);
        }
        let mut one = WordCursor::new(INPUT_WORDS);
        at += one.emit(words, &mut out[at..]).unwrap_or(0);
        self.st.phase = if sent + 1 == off.in_dim {
            Phase::OfflineAwaiting { off }
        } else {
            Phase::OfflineSending {
                off,
                header_sent: true,
                sent: sent + 1,
            }
        };
        at
    }

    /// Starts a request: `rows` masked rows for `linear` (of widths `in_dim` → `out_dim`). The
    /// rows go out with [`ClientConnection::poll_transmit_rows`]; the products then arrive
    /// through [`ClientConnection::handle_received`]. Returns the request id.
    pub fn begin_request(
        &mut self,
        linear: LinearId,
        rows: usize,
        in_dim: usize,
        out_dim: usize,
    ) -> Result<u32, ClientError> {
        if self.st.phase != Phase::Ready {
            return Err(self.st.failure.unwrap_or(ClientError::NotReady));
        }
        if rows == 0 || rows > self.st.max_rows as usize {
            return Err(ClientError::TooManyRows {
                rows,
                max: self.st.max_rows,
            });
        }
        let request = self.st.next_request;
        self.st.next_request = self.st.next_request.wrapping_add(1);
        self.st.phase = Phase::Sending {
            req: Request {
                request,
                linear,
                rows,
                out_dim,
            },
            header_sent: false,
            rows: WordCursor::new(rows * in_dim),
        };
        Ok(request)
    }

    /// Encodes the control frames due (hello, proof, error, bye) into `out` (at least
    /// [`MAX_FRAME`] bytes); returns the bytes written, 0 when none is due.
    pub fn poll_transmit(&mut self, out: &mut [u8]) -> usize {
        let Some(c) = self.st.queued.take() else {
            return 0;
        };
        let msg = match c {
            Control::Hello => Message::Hello {
                protocol: PROTOCOL_VERSION,
                fingerprint: self.st.settings.fingerprint,
            },
            Control::Proof { mac } => Message::Proof {
                mac,
                nonce: self.st.nonce,
            },
            Control::FetchWeights => Message::FetchWeights,
            Control::Error(code) => Message::Error { code },
            Control::Bye => Message::Bye,
        };
        // Control messages are far below MAX_FRAME.
        encode_frame(&msg, out).unwrap_or(0)
    }

    /// Encodes the pending request's frames (the `Compute` header, then `Data` chunks of
    /// `masked`, the request's `rows · in_dim` masked words) into `out` (at least [`MAX_FRAME`]
    /// bytes), as many as fit; returns the bytes written, 0 once all are out.
    pub fn poll_transmit_rows(&mut self, masked: MaskedRows<'_>, out: &mut [u8]) -> usize {
        let mut at = 0;
        while out.len() - at >= MAX_FRAME {
            let Phase::Sending {
                req,
                header_sent,
                mut rows,
            } = self.st.phase
            else {
                break;
            };
            let room = &mut out[at..];
            let n = if !header_sent {
                let msg = Message::Compute {
                    request: req.request,
                    linear: req.linear,
                    rows: req.rows as u32,
                };
                self.st.phase = Phase::Sending {
                    req,
                    header_sent: true,
                    rows,
                };
                encode_frame(&msg, room).unwrap_or(0)
            } else {
                let n = rows.emit(masked.words(), room).unwrap_or(0);
                self.st.phase = if rows.is_complete() {
                    Phase::Awaiting { req }
                } else if n == 0 {
                    // `masked` is shorter than the request: a caller bug, not the server's.
                    self.st.fail(ClientError::NotReady);
                    break;
                } else {
                    Phase::Sending {
                        req,
                        header_sent,
                        rows,
                    }
                };
                n
            };
            at += n;
        }
        at
    }

    /// Where to read the server's next bytes into (then [`ClientConnection::handle_received`]).
    pub fn recv_buffer(&mut self) -> &mut [u8] {
        self.rx.spare()
    }

    /// Takes `n` bytes the host read into [`ClientConnection::recv_buffer`] and processes the
    /// complete frames up to the next event. `reply` is the pending request's product buffer
    /// (`rows · out_dim` words; anything, e.g. `&mut []`, during the handshake). Call again with
    /// `n = 0` to process frames already buffered.
    pub fn handle_received(
        &mut self,
        n: usize,
        reply: &mut [u32],
    ) -> Result<Option<ClientEvent>, ClientError> {
        self.rx.filled(n);
        loop {
            if let Some(e) = self.st.failure {
                return Err(e);
            }
            if matches!(
                self.st.phase,
                Phase::Ready | Phase::Sending { .. } | Phase::OfflineSending { .. } | Phase::Closed
            ) {
                // Nothing is expected from the server now; later frames wait in the buffer.
                if self.st.phase == Phase::Ready && !self.rx.at_boundary() {
                    // A frame the server sent unasked is a protocol fault, found when it is read.
                    match self.rx.next_message() {
                        None => return Ok(None),
                        Some(Err(e)) => return Err(self.st.fail(ClientError::Frame(e))),
                        Some(Ok(Message::Error { code })) => {
                            return Err(self.st.fail(ClientError::Refused(code)))
                        }
                        Some(Ok(m)) => {
                            let got = m.name();
                            return Err(self.st.fail(ClientError::Unexpected {
                                expected: "nothing between requests",
                                got,
                            }));
                        }
                    }
                }
                return Ok(None);
            }
            let msg = match self.rx.next_message() {
                None => return Ok(None),
                Some(Err(e)) => return Err(self.st.fail(ClientError::Frame(e))),
                Some(Ok(m)) => m,
            };
            match self.st.handle(msg, reply) {
                Err(e) => return Err(self.st.fail(e)),
                Ok(Some(ev)) => return Ok(Some(ev)),
                Ok(None) => {}
            }
        }
    }

    /// The server closed the connection: the conversation has failed unless it was idle.
    pub fn handle_eof(&mut self) -> ClientError {
        let e = ClientError::Closed(self.waiting());
        self.st.fail(e)
    }

    /// The host's timer fired while waiting for the server.
    pub fn handle_timeout(&mut self) -> ClientError {
        let e = ClientError::TimedOut(self.waiting());
        self.st.fail(e)
    }

    /// Ends the session politely: the `Bye` is the next frame of
    /// [`ClientConnection::poll_transmit`] (only between requests).
    pub fn close(&mut self) {
        if self.st.phase == Phase::Ready {
            self.st.queued = Some(Control::Bye);
            self.st.phase = Phase::Closed;
        }
    }
}

impl State {
    fn handle(
        &mut self,
        msg: Message<'_>,
        reply: &mut [u32],
    ) -> Result<Option<ClientEvent>, ClientError> {
        let (settings, nonce, phase) = (&self.settings, &self.nonce, self.phase);
        let next = &mut self.phase;
        let queued = &mut self.queued;
        let max_rows = &mut self.max_rows;
        match (phase, msg) {
            (_, Message::Error { code }) => Err(match code {
                ErrorCode::WeightsMismatch => ClientError::WeightsMismatch {
                    theirs: None,
                    ours: settings.fingerprint,
                },
                code => ClientError::Refused(code),
            }),
            (
                Phase::Hello,
                Message::Challenge {
                    nonce: server_nonce,
                },
            ) => {
                let Some(psk) = &settings.psk else {
                    *queued = Some(Control::Error(ErrorCode::Unauthorized));
                    return Err(ClientError::PskRequired);
                };
                let mac = psk.sign(CLIENT_LABEL, &settings.fingerprint, &server_nonce, nonce);
                *queued = Some(Control::Proof { mac });
                *next = Phase::Proof { server_nonce };
                Ok(None)
            }
            (Phase::Proof { server_nonce }, Message::ServerProof { mac }) => {
                let proven = settings.psk.as_ref().is_some_and(|psk| {
                    psk.verify(
                        SERVER_LABEL,
                        &settings.fingerprint,
                        &server_nonce,
                        nonce,
                        &mac,
                    )
                });
                if !proven {
                    *queued = Some(Control::Error(ErrorCode::Unauthorized));
                    return Err(ClientError::ServerProofInvalid);
                }
                *next = Phase::Welcome;
                Ok(None)
            }
            (
                Phase::Hello | Phase::Welcome,
                Message::Welcome {
                    protocol,
                    fingerprint,
                    max_rows: rows,
                },
            ) => {
                if phase == Phase::Hello && settings.psk.is_some() {
                    *queued = Some(Control::Error(ErrorCode::Unauthorized));
                    return Err(ClientError::PskNotRequired);
                }
                if protocol != PROTOCOL_VERSION {
                    return Err(ClientError::Version { theirs: protocol });
                }
                if fingerprint != settings.fingerprint {
                    return Err(ClientError::WeightsMismatch {
                        theirs: Some(fingerprint),
                        ours: settings.fingerprint,
                    });
                }
                if rows == 0 {
                    return Err(ClientError::ZeroRows);
                }
                *max_rows = rows;
                *next = Phase::Ready;
                Ok(Some(ClientEvent::Connected { max_rows: rows }))
            }
            (Phase::Hello, other) => Err(ClientError::Unexpected {
                expected: "Welcome or Challenge",
                got: other.name(),
            }),
            (Phase::Proof { .. }, other) => Err(ClientError::Unexpected {
                expected: "ServerProof",
                got: other.name(),
            }),
            (Phase::Welcome, other) => Err(ClientError::Unexpected {
                expected: "Welcome",
                got: other.name(),
            }),
            (Phase::Awaiting { req }, Message::Result { request, rows }) => {
                if request != req.request || rows as usize != req.rows {
                    return Err(ClientError::WrongResult {
                        request: req.request,
                        got_request: request,
                        got_rows: rows,
                    });
                }
                *next = Phase::Receiving {
                    req,
                    products: WordCursor::new(req.rows * req.out_dim),
                };
                Ok(None)
            }
            (Phase::Awaiting { .. }, other) => Err(ClientError::Unexpected {
                expected: "the Result of our request",
                got: other.name(),
            }),
            (Phase::Receiving { req, mut products }, Message::Data { words }) => {
                products
                    .accept(words, reply)
                    .map_err(ClientError::DataLength)?;
                if products.is_complete() {
                    *next = Phase::Ready;
                    return Ok(Some(ClientEvent::Result {
                        request: req.request,
                    }));
                }
                *next = Phase::Receiving { req, products };
                Ok(None)
            }
            (Phase::Receiving { .. }, other) => Err(ClientError::Unexpected {
                expected: "Data",
                got: other.name(),
            }),
            (Phase::WeightsAwaiting, Message::Weights { bytes }) => {
                let total = bytes.div_ceil(4) as usize;
                *next = if total == 0 {
                    Phase::Ready
                } else {
                    Phase::WeightsReceiving { total, done: 0 }
                };
                Ok(Some(ClientEvent::Weights { bytes }))
            }
            (Phase::WeightsAwaiting, other) => Err(ClientError::Unexpected {
                expected: "Weights",
                got: other.name(),
            }),
            (Phase::WeightsReceiving { total, done }, Message::Data { words }) => {
                let n = words.words();
                if words.0.is_empty()
                    || !words.0.len().is_multiple_of(4)
                    || n > total - done
                    || n > reply.len()
                {
                    return Err(ClientError::DataLength(DataLengthError {
                        bytes: words.0.len(),
                        received: done,
                        expected: total,
                    }));
                }
                for (d, w) in reply.iter_mut().zip(words.iter()) {
                    *d = w;
                }
                *next = if done + n == total {
                    Phase::Ready
                } else {
                    Phase::WeightsReceiving {
                        total,
                        done: done + n,
                    }
                };
                Ok(Some(ClientEvent::WeightsData { words: n }))
            }
            (Phase::WeightsReceiving { .. }, other) => Err(ClientError::Unexpected {
                expected: "Data (the weights)",
                got: other.name(),
            }),
            (Phase::OfflineAwaiting { off }, Message::OfflineResult { request }) => {
                if request != off.request {
                    return Err(ClientError::WrongResult {
                        request: off.request,
                        got_request: request,
                        got_rows: 0,
                    });
                }
                *next = Phase::OfflineReceiving {
                    off,
                    index: 0,
                    words: WordCursor::new(off.switch.result_words()),
                };
                Ok(None)
            }
            (Phase::OfflineAwaiting { .. }, other) => Err(ClientError::Unexpected {
                expected: "the OfflineResult of our offline layer",
                got: other.name(),
            }),
            (
                Phase::OfflineReceiving {
                    off,
                    index,
                    mut words,
                },
                Message::Data { words: chunk },
            ) => {
                words
                    .accept(chunk, reply)
                    .map_err(ClientError::DataLength)?;
                if !words.is_complete() {
                    *next = Phase::OfflineReceiving { off, index, words };
                    return Ok(None);
                }
                *next = if index + 1 == off.out_dim {
                    Phase::Ready
                } else {
                    Phase::OfflineReceiving {
                        off,
                        index: index + 1,
                        words: WordCursor::new(off.switch.result_words()),
                    }
                };
                Ok(Some(ClientEvent::OfflineOutput {
                    request: off.request,
                    output: index,
                }))
            }
            (Phase::OfflineReceiving { .. }, other) => Err(ClientError::Unexpected {
                expected: "Data (a result ciphertext)",
                got: other.name(),
            }),
            // Not fed in these phases (see `handle_received`).
            (
                Phase::Ready | Phase::Sending { .. } | Phase::OfflineSending { .. } | Phase::Closed,
                _,
            ) => Ok(None),
        }
    }

    fn fail(&mut self, e: ClientError) -> ClientError {
        self.phase = Phase::Closed;
        self.failure.get_or_insert(e);
        e
    }
}
