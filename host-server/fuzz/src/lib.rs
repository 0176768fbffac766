//! What the fuzz targets check, kept apart from libFuzzer so that `host-server/tests/hardening.rs`
//! can include this file (`#[path]`) and run the same checks in the normal test suite, and
//! regenerate the seed corpus when the wire format changes.
//!
//! - [`check_frames`]: `decode_body` and `read_frame` never panic, and what they accept
//!   re-encodes to the same message.
//! - [`check_session`]: one connection's client bytes driven into `handle_connection` over
//!   `tokio::io::duplex` (no sockets) against a small in-memory model; it must return, and its
//!   replies and ending must be exactly what [`predict`] (an independent model of the protocol,
//!   products from `matmul_u32_i8`) says.
//! - [`seeds`]: the seed corpus, valid conversations with this model's fingerprint.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::format::{encode_linear_header, LinearLayout, HEADER_LEN};
use veil_core::model::{LinearId, LinearKind, ModelConfig};
use veil_core::wire::{
    decode_body, encode_frame, read_frame, ErrorCode, Message, WordBytes, LEN_PREFIX,
    MAX_CHUNK_BYTES, MAX_FRAME_BODY, PROTOCOL_VERSION,
};
use veil_server::{handle_connection, ConnError, Ending, ServerConfig, ServerWeights};

/// The fuzzed server's model: two blocks, d=16, inner 64, vocabulary 100.
pub const CFG: ModelConfig = ModelConfig {
    n_layer: 2,
    n_embd: 16,
    n_head: 2,
    n_positions: 16,
    vocab_size: 100,
    n_inner: 64,
};

/// Limits of the fuzzed server: few rows, so one input costs microseconds; a short idle timeout,
/// though every input ends with the client closing, so no timeout should ever be waited for.
pub fn server_config() -> ServerConfig {
    ServerConfig {
        max_rows: 4,
        max_connections: 1,
        idle_timeout: Duration::from_secs(1),
        ..ServerConfig::default()
    }
}

/// `linear.veil` bytes of [`CFG`] with deterministic weights covering the whole int8 range.
pub fn model_bytes() -> Vec<u8> {
    let layout = LinearLayout::new(&CFG);
    let mut bytes = vec![0u8; layout.total_len];
    let mut h = [0u8; HEADER_LEN];
    encode_linear_header(&CFG, &mut h);
    bytes[..HEADER_LEN].copy_from_slice(&h);
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for b in &mut bytes[HEADER_LEN..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = (x >> 24) as u8;
    }
    bytes
}

/// The model, parsed once per process.
pub fn weights() -> Arc<ServerWeights> {
    static W: OnceLock<Arc<ServerWeights>> = OnceLock::new();
    W.get_or_init(|| Arc::new(ServerWeights::from_bytes(model_bytes()).expect("model parses")))
        .clone()
}

/// Encodes one frame (prefix and body).
pub fn frame(msg: &Message<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME_BODY + LEN_PREFIX];
    encode_frame(msg, &mut buf)
        .expect("message fits a frame")
        .to_vec()
}

fn reencodes(msg: &Message<'_>) {
    let mut buf = vec![0u8; MAX_FRAME_BODY + LEN_PREFIX];
    let frame = encode_frame(msg, &mut buf).expect("a decoded message re-encodes");
    let back = decode_body(&frame[LEN_PREFIX..]).expect("a re-encoded message decodes");
    assert_eq!(
        &back, msg,
        "decode ∘ encode is the identity on decoded messages"
    );
}

/// The frame decoder on arbitrary bytes: as one body, and as a stream of frames.
pub fn check_frames(data: &[u8]) {
    if let Ok(msg) = decode_body(data) {
        reencodes(&msg);
    }
    let mut stream = data;
    let mut buf = vec![0u8; MAX_FRAME_BODY];
    while let Ok(msg) = read_frame(&mut stream, &mut buf) {
        reencodes(&msg);
    }
}

/// What one conversation produced.
#[derive(Debug)]
pub struct Outcome {
    /// What `handle_connection` returned.
    pub result: Result<Ending, ConnError>,
    /// Frame bodies the server sent, in order.
    pub frames: Vec<Vec<u8>>,
}

/// Sends `input` (in writes of at most `fragment` bytes) as the client side of a duplex pipe
/// into `handle_connection`, closes the client's side, and collects the server's frames.
pub async fn converse(
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    input: &[u8],
    fragment: usize,
) -> Outcome {
    let (client, server_end) = tokio::io::duplex(1 << 16);
    let (mut rx, mut tx) = tokio::io::split(client);
    let write = async move {
        for piece in input.chunks(fragment.max(1)) {
            // The server may already have closed: a failed write is part of what is tested.
            if tx.write_all(piece).await.is_err() {
                break;
            }
        }
        let _ = tx.shutdown().await;
    };
    let read = async move {
        let mut out = Vec::new();
        let _ = rx.read_to_end(&mut out).await;
        out
    };
    let (result, (), out) =
        tokio::join!(handle_connection(server_end, weights, config), write, read);
    let mut frames = Vec::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        assert!(
            rest.len() >= LEN_PREFIX,
            "server sent a partial length prefix"
        );
        let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        assert!(
            (1..=MAX_FRAME_BODY).contains(&n) && rest.len() >= LEN_PREFIX + n,
            "server sent a bad or partial frame"
        );
        frames.push(rest[LEN_PREFIX..LEN_PREFIX + n].to_vec());
        rest = &rest[LEN_PREFIX + n..];
    }
    Outcome { result, frames }
}

/// How a conversation ended, as far as the client can tell it apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// `handle_connection` returned `Ok`.
    Ok(Ending),
    /// It refused the client with this code (and sent it).
    Refused(ErrorCode),
    /// The client vanished inside a frame or a request.
    Transport,
}

impl End {
    /// The end of a real conversation.
    pub fn of(result: &Result<Ending, ConnError>) -> End {
        match result {
            Ok(e) => End::Ok(*e),
            Err(ConnError::Refused { code, .. }) => End::Refused(*code),
            Err(ConnError::Io(_)) => End::Transport,
        }
    }
}

/// What the server must answer to `input` (all of it sent, then the client's side closed).
#[derive(Debug, PartialEq, Eq)]
pub struct Prediction {
    /// Frame bodies, in order (a refusal's `Error` frame last).
    pub frames: Vec<Vec<u8>>,
    /// How the conversation ends.
    pub end: End,
}

/// An independent model of the protocol (written from the `veil_core::wire` docs, not from the
/// server's code): the replies and the ending for a client that sends `input` and closes.
pub fn predict(weights: &ServerWeights, max_rows: u32, input: &[u8]) -> Prediction {
    enum Next<'a> {
        Msg(Message<'a>),
        Eof,
        Stop(End),
    }
    fn next<'a>(rest: &mut &'a [u8]) -> Next<'a> {
        if rest.is_empty() {
            return Next::Eof;
        }
        if rest.len() < LEN_PREFIX {
            return Next::Stop(End::Transport);
        }
        let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if n == 0 || n > MAX_FRAME_BODY {
            return Next::Stop(End::Refused(ErrorCode::MalformedFrame));
        }
        if rest.len() < LEN_PREFIX + n {
            return Next::Stop(End::Transport);
        }
        let body = &rest[LEN_PREFIX..LEN_PREFIX + n];
        *rest = &rest[LEN_PREFIX + n..];
        match decode_body(body) {
            Ok(m) => Next::Msg(m),
            Err(_) => Next::Stop(End::Refused(ErrorCode::MalformedFrame)),
        }
    }

    let cfg = *weights.config();
    let mut frames = Vec::new();
    let mut rest = input;
    let unexpected = End::Refused(ErrorCode::UnexpectedMessage);
    let end = 'conv: {
        match next(&mut rest) {
            Next::Eof => break 'conv End::Ok(Ending::PeerClosed),
            Next::Stop(e) => break 'conv e,
            Next::Msg(Message::Hello {
                protocol,
                fingerprint,
            }) => {
                if protocol != PROTOCOL_VERSION {
                    break 'conv End::Refused(ErrorCode::VersionMismatch);
                }
                if fingerprint != weights.fingerprint() {
                    break 'conv End::Refused(ErrorCode::WeightsMismatch);
                }
            }
            Next::Msg(Message::Error { code }) => break 'conv End::Ok(Ending::PeerError(code)),
            Next::Msg(_) => break 'conv unexpected,
        }
        frames.push(body(&Message::Welcome {
            protocol: PROTOCOL_VERSION,
            fingerprint: weights.fingerprint(),
            max_rows,
        }));
        loop {
            let (request, linear, rows) = match next(&mut rest) {
                Next::Eof => break 'conv End::Ok(Ending::PeerClosed),
                Next::Stop(e) => break 'conv e,
                Next::Msg(Message::Compute {
                    request,
                    linear,
                    rows,
                }) => (request, linear, rows),
                Next::Msg(Message::Bye) => break 'conv End::Ok(Ending::Bye),
                Next::Msg(Message::Error { code }) => break 'conv End::Ok(Ending::PeerError(code)),
                Next::Msg(_) => break 'conv unexpected,
            };
            let Some(w) = weights.matrix(linear) else {
                break 'conv End::Refused(ErrorCode::UnknownLayer);
            };
            if rows == 0 || rows > max_rows {
                break 'conv End::Refused(ErrorCode::TooManyRows);
            }
            let (in_dim, out_dim) = linear.dims(&cfg);
            let want = rows as usize * in_dim;
            let mut x: Vec<u32> = Vec::new();
            while x.len() < want {
                match next(&mut rest) {
                    Next::Eof => break 'conv End::Transport,
                    Next::Stop(e) => break 'conv e,
                    Next::Msg(Message::Data { words }) => {
                        let len = words.0.len();
                        if len == 0 || len % 4 != 0 || x.len() + len / 4 > want {
                            break 'conv End::Refused(ErrorCode::WrongDataLength);
                        }
                        x.extend(words.iter());
                    }
                    Next::Msg(_) => break 'conv unexpected,
                }
            }
            let mut y = vec![0u32; rows as usize * out_dim];
            matmul_u32_i8(&x, w, in_dim, out_dim, &mut y);
            frames.push(body(&Message::Result { request, rows }));
            for words in y.chunks(MAX_CHUNK_BYTES / 4) {
                let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                frames.push(body(&Message::Data {
                    words: WordBytes(&bytes),
                }));
            }
        }
    };
    if let End::Refused(code) = end {
        frames.push(body(&Message::Error { code }));
    }
    Prediction { frames, end }
}

fn body(msg: &Message<'_>) -> Vec<u8> {
    frame(msg)[LEN_PREFIX..].to_vec()
}

/// Asserts that a conversation over `input` went exactly as [`predict`] says.
pub fn check_outcome(weights: &ServerWeights, max_rows: u32, input: &[u8], o: &Outcome) {
    let want = predict(weights, max_rows, input);
    let got = Prediction {
        frames: o.frames.clone(),
        end: End::of(&o.result),
    };
    if got != want {
        let show = |p: &Prediction| {
            let msgs: Vec<_> = p
                .frames
                .iter()
                .map(|f| format!("{:?}", decode_body(f)))
                .collect();
            format!("{:?} after {}", p.end, msgs.join(", "))
        };
        panic!(
            "server answered {} ({:?}), expected {}",
            show(&got),
            o.result,
            show(&want)
        );
    }
}

/// The `server_session` target: one conversation on a current-thread runtime, checked.
pub fn check_session(data: &[u8]) {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    let rt = RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    });
    let config = server_config();
    let outcome = rt.block_on(converse(weights(), config.clone(), data, usize::MAX));
    check_outcome(&weights(), config.max_rows, data, &outcome);
}

fn hello(fingerprint: [u8; 32]) -> Message<'static> {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint,
    }
}

/// `rows` rows for `linear` as Compute plus Data frames of at most `chunk` bytes.
fn request(request: u32, linear: LinearId, rows: u32, chunk: usize) -> Vec<u8> {
    let (in_dim, _) = linear.dims(&CFG);
    let bytes: Vec<u8> = (0..rows as usize * in_dim * 4)
        .map(|i| (i as u8).wrapping_mul(167).wrapping_add(request as u8))
        .collect();
    let mut out = frame(&Message::Compute {
        request,
        linear,
        rows,
    });
    for c in bytes.chunks(chunk) {
        out.extend(frame(&Message::Data {
            words: WordBytes(c),
        }));
    }
    out
}

/// The seed corpus: `(target, file name, bytes)`.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let fp = weights().fingerprint();
    let id = |layer, kind| LinearId { layer, kind };
    let bye = frame(&Message::Bye);
    let mut s = Vec::new();

    let conv = |parts: &[Vec<u8>]| parts.concat();
    let hello_bye = conv(&[frame(&hello(fp)), bye.clone()]);
    let mut every_layer = frame(&hello(fp));
    for (n, kind) in LinearKind::BLOCK
        .into_iter()
        .chain([LinearKind::LmHead])
        .enumerate()
    {
        let layer = if kind == LinearKind::LmHead {
            0
        } else {
            n as u16 % 2
        };
        every_layer.extend(request(
            n as u32,
            id(layer, kind),
            1 + n as u32 % 4,
            MAX_CHUNK_BYTES,
        ));
    }
    every_layer.extend(&bye);
    let chunked = conv(&[
        frame(&hello(fp)),
        request(7, id(1, LinearKind::MlpDown), 2, 100),
        request(8, id(0, LinearKind::Qkv), 4, 4),
        bye.clone(),
    ]);
    let no_bye = conv(&[frame(&hello(fp)), request(1, LinearId::LM_HEAD, 4, 64)]);
    let refused = conv(&[
        frame(&hello(fp)),
        frame(&Message::Compute {
            request: 2,
            linear: id(5, LinearKind::AttnOut),
            rows: 1,
        }),
    ]);
    for (name, bytes) in [
        ("hello_bye", &hello_bye),
        ("every_layer", &every_layer),
        ("chunked", &chunked),
        ("no_bye", &no_bye),
        ("unknown_layer", &refused),
    ] {
        s.push(("server_session", name, bytes.clone()));
        s.push(("frame_decoder", name, bytes.clone()));
    }

    // One frame of each message as a lone body, for the decoder.
    let words = [0xA5u8; 64];
    for (name, msg) in [
        ("body_hello", hello(fp)),
        (
            "body_welcome",
            Message::Welcome {
                protocol: PROTOCOL_VERSION,
                fingerprint: fp,
                max_rows: 64,
            },
        ),
        (
            "body_compute",
            Message::Compute {
                request: 3,
                linear: id(1, LinearKind::MlpUp),
                rows: 2,
            },
        ),
        (
            "body_result",
            Message::Result {
                request: 3,
                rows: 2,
            },
        ),
        (
            "body_data",
            Message::Data {
                words: WordBytes(&words),
            },
        ),
        (
            "body_error",
            Message::Error {
                code: ErrorCode::WrongDataLength,
            },
        ),
        ("body_bye", Message::Bye),
    ] {
        s.push(("frame_decoder", name, frame(&msg)[LEN_PREFIX..].to_vec()));
    }
    s
}
