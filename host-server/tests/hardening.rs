//! Hardening: a live server under a flood of bad frames, property tests of one conversation
//! through `handle_connection`, and the fuzz seed corpus kept current.
//!
//! The protocol itself is tested exhaustively by core's pair test; here the question is whether
//! the tokio host adds or loses anything. So every conversation is also run through core's
//! `ServerConnection` directly (`fuzz_model::run_server`, shared with the cargo-fuzz targets,
//! which checks its invariants: whole valid frames, at most one `Error` and last, each job's rows
//! the client's words, products equal to `matmul_u32_i8`), and the host must send exactly the
//! same frames and end the same way.

mod common;
#[path = "../fuzz/src/lib.rs"]
mod fuzz_model;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use common::{expected, spawn_server, Rng};
use fuzz_model::{frame, model_bytes, run_server, seeds, Control, ServerRun, CFG};
use proptest::prelude::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veil_core::model::{LinearId, LinearKind};
use veil_core::wire::{
    decode_body, ErrorCode, Message, WordBytes, LEN_PREFIX, MAX_CHUNK_BYTES, MAX_FRAME_BODY,
    PROTOCOL_VERSION,
};
use veil_server::{
    handle_connection, ConnError, Ending, PskKey, ServerConfig, ServerError, ServerWeights,
};

/// The fuzz model served as `veil-server` loads it, once per process.
fn weights() -> Arc<ServerWeights> {
    static W: std::sync::OnceLock<Arc<ServerWeights>> = std::sync::OnceLock::new();
    W.get_or_init(|| {
        let w = ServerWeights::from_bytes(model_bytes().to_vec()).expect("model parses");
        assert_eq!(w.fingerprint(), fuzz_model::fingerprint());
        Arc::new(w)
    })
    .clone()
}

/// The limits `run_server` uses: few rows; a short idle timeout, though every conversation ends
/// with the client closing, so no timeout is ever waited for.
fn server_config(psk: bool) -> ServerConfig {
    ServerConfig {
        max_rows: fuzz_model::MAX_ROWS,
        max_connections: 1,
        idle_timeout: Duration::from_secs(1),
        psk: psk.then(|| PskKey::new(fuzz_model::PSK).unwrap()),
        offline_inputs: fuzz_model::OFFLINE_INPUTS,
        serve_weights: false,
        offline_layers: veil_server::OfflineLimit::new(1),
    }
}

/// The machine's run of a client's bytes, all of them then end of stream (checked inside).
fn machine(psk: bool, input: &[u8]) -> ServerRun {
    run_server(Control::of(Control::byte(psk, false, false, 0)), input)
}

/// The bodies of whole frames.
fn bodies(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    frames.iter().map(|f| f[LEN_PREFIX..].to_vec()).collect()
}

/// Frame bodies with the nonce of a `Challenge` zeroed.
fn without_nonce(frames: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    frames
        .into_iter()
        .map(|f| match decode_body(&f) {
            Ok(Message::Challenge { .. }) => {
                frame(&Message::Challenge { nonce: [0; 32] })[LEN_PREFIX..].to_vec()
            }
            _ => f,
        })
        .collect()
}

/// How a run ended, comparable between the host and the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Ok(Ending),
    Refused(ServerError),
    /// The client vanished inside a frame or request (the machine's `Truncated`; the host's
    /// `ConnError::Io`).
    Transport,
}

impl End {
    fn of_machine(run: &ServerRun) -> End {
        match run.outcome {
            Ok(e) => End::Ok(e),
            Err(e) if e.code().is_some() => End::Refused(e),
            Err(_) => End::Transport,
        }
    }

    fn of_host(result: &Result<Ending, ConnError>) -> End {
        match result {
            Ok(e) => End::Ok(*e),
            Err(ConnError::Refused(e)) => End::Refused(*e),
            Err(ConnError::Io(_)) => End::Transport,
        }
    }

    fn code(&self) -> Option<ErrorCode> {
        match self {
            End::Refused(e) => e.code(),
            _ => None,
        }
    }
}

/// What intended refusal a flood plan provokes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Intended {
    Refused(ErrorCode),
    Transport,
}

/// The flood measures the process RSS: no other test of this file may run beside it.
static SERIAL: Mutex<()> = Mutex::new(());

/// Panics anywhere in the process (tokio swallows a panicking connection task's panic into its
/// dropped `JoinHandle`, so a hook is the only way to see one).
static PANICS: AtomicUsize = AtomicUsize::new(0);

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A `/proc/self/status` field in KiB (the server runs in this process).
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

const KINDS: [LinearKind; 5] = [
    LinearKind::Qkv,
    LinearKind::AttnOut,
    LinearKind::MlpUp,
    LinearKind::MlpDown,
    LinearKind::LmHead,
];

fn valid_id(rng: &mut Rng) -> LinearId {
    let kind = rng.pick(&KINDS);
    let layer = if kind == LinearKind::LmHead {
        0
    } else {
        rng.below(u64::from(CFG.n_layer)) as u16
    };
    LinearId { layer, kind }
}

fn hello(fingerprint: [u8; 32]) -> Vec<u8> {
    frame(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint,
    })
}

/// Words as Data frames of random sizes.
fn data_frames(rng: &mut Rng, words: usize) -> Vec<u8> {
    let bytes = rng.bytes(words * 4);
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let take = (4 * (1 + rng.below(64) as usize)).min(rest.len());
        out.extend(frame(&Message::Data {
            words: WordBytes(&rest[..take]),
        }));
        rest = &rest[take..];
    }
    out
}

/// One bad connection of the flood.
struct Plan {
    kind: &'static str,
    bytes: Vec<u8>,
    /// Frames before the bad part (all valid, answered with checked products).
    good_frames: usize,
    /// Bad frames: malformed, truncated, oversized or out of order.
    bad_frames: usize,
    /// Junk frames after the fatal one (the server drains them unparsed).
    trailing: usize,
    /// Reset the connection (SO_LINGER 0) right after writing, reading nothing.
    reset: bool,
    /// The refusal this plan is built to provoke, if it is deterministic.
    intended: Option<Intended>,
}

/// Builds the `n`-th bad connection: an optional valid prefix (Hello and up to two checked
/// requests), then one of the ways of getting the protocol wrong.
fn plan(rng: &mut Rng, fp: [u8; 32], max_rows: u32) -> Plan {
    let refused = |c| Some(Intended::Refused(c));
    let mut p = Plan {
        kind: "",
        bytes: Vec::new(),
        good_frames: 0,
        bad_frames: 1,
        trailing: 0,
        reset: false,
        intended: None,
    };
    let kind = rng.below(20);
    // Kinds that only make sense after a Hello get one, plus up to two valid requests.
    let needs_hello =
        matches!(kind, 5..=12 | 16 | 17) || (matches!(kind, 0..=4 | 13) && rng.below(2) == 0);
    if needs_hello {
        p.bytes.extend(hello(fp));
        p.good_frames += 1;
        for r in 0..rng.below(3) {
            let id = valid_id(rng);
            let rows = 1 + rng.below(u64::from(max_rows)) as u32;
            p.bytes.extend(frame(&Message::Compute {
                request: r as u32,
                linear: id,
                rows,
            }));
            let data = data_frames(rng, rows as usize * id.dims(&CFG).0);
            p.good_frames += 1 + count_frames(&data);
            p.bytes.extend(data);
        }
    }
    let id = valid_id(rng);
    let in_words = id.dims(&CFG).0;
    match kind {
        0 => {
            p.kind = "random bytes";
            let n = 1 + rng.below(300) as usize;
            p.bytes.extend(rng.bytes(n));
        }
        1 => {
            p.kind = "valid prefix, garbage body";
            let n = 1 + rng.below(256) as usize;
            p.bytes.extend((n as u32).to_le_bytes());
            p.bytes.extend(rng.bytes(n));
        }
        2 => {
            p.kind = "oversized length prefix";
            let n =
                MAX_FRAME_BODY as u64 + 1 + rng.below(u64::from(u32::MAX) - MAX_FRAME_BODY as u64);
            p.bytes.extend((n as u32).to_le_bytes());
            let n = rng.below(64) as usize;
            p.bytes.extend(rng.bytes(n));
            p.intended = refused(ErrorCode::MalformedFrame);
        }
        3 => {
            p.kind = "zero length prefix";
            p.bytes.extend(0u32.to_le_bytes());
            p.intended = refused(ErrorCode::MalformedFrame);
        }
        4 => {
            p.kind = "message cut inside its own length";
            let f = frame(&Message::Compute {
                request: rng.next() as u32,
                linear: id,
                rows: 1,
            });
            let cut = 1 + rng.below((f.len() - LEN_PREFIX - 1) as u64) as usize;
            p.bytes.extend((cut as u32).to_le_bytes());
            p.bytes.extend(&f[LEN_PREFIX..LEN_PREFIX + cut]);
            p.intended = refused(ErrorCode::MalformedFrame);
        }
        5 => {
            p.kind = "Data before Compute";
            let n = 1 + rng.below(8) as usize;
            p.bytes.extend(data_frames(rng, n));
            p.bad_frames = 1;
            p.intended = refused(ErrorCode::UnexpectedMessage);
        }
        6 => {
            p.kind = "Compute with 0 or too many rows";
            let rows = match rng.below(3) {
                0 => 0,
                1 => max_rows + 1 + rng.below(1000) as u32,
                _ => u32::MAX - rng.below(4) as u32,
            };
            p.bytes.extend(frame(&Message::Compute {
                request: 9,
                linear: id,
                rows,
            }));
            p.intended = refused(ErrorCode::TooManyRows);
        }
        7 => {
            p.kind = "Compute for an unknown layer";
            let kind = rng.pick(&KINDS);
            let layer = if kind == LinearKind::LmHead {
                1 + rng.below(u64::from(u16::MAX)) as u16
            } else {
                CFG.n_layer as u16 + rng.below(1000) as u16
            };
            p.bytes.extend(frame(&Message::Compute {
                request: 9,
                linear: LinearId { layer, kind },
                rows: 1,
            }));
            p.intended = refused(ErrorCode::UnknownLayer);
        }
        8 => {
            p.kind = "Compute with too much Data";
            let rows = 1 + rng.below(u64::from(max_rows)) as u32;
            let want = rows as usize * in_words;
            p.bytes.extend(frame(&Message::Compute {
                request: 9,
                linear: id,
                rows,
            }));
            let bytes = match rng.below(3) {
                0 => {
                    let n = 4 * (want + 1 + rng.below(16) as usize);
                    rng.bytes(n)
                }
                1 => {
                    let n = 4 * (1 + rng.below(8) as usize) + 1 + rng.below(3) as usize;
                    rng.bytes(n)
                }
                _ => Vec::new(),
            };
            p.bytes.extend(frame(&Message::Data {
                words: WordBytes(&bytes),
            }));
            p.good_frames += 1;
            p.intended = refused(ErrorCode::WrongDataLength);
        }
        9 => {
            p.kind = "Bye in the middle of a request";
            let rows = 2 + rng.below(u64::from(max_rows - 1)) as u32;
            p.bytes.extend(frame(&Message::Compute {
                request: 9,
                linear: id,
                rows,
            }));
            p.bytes.extend(data_frames(rng, in_words));
            p.good_frames += 1;
            p.bytes.extend(frame(&Message::Bye));
            p.intended = refused(ErrorCode::UnexpectedMessage);
        }
        10 => {
            p.kind = "too little Data, then close";
            let short = rng.below(in_words as u64) as usize;
            p.bytes.extend(frame(&Message::Compute {
                request: 9,
                linear: id,
                rows: max_rows,
            }));
            p.bytes.extend(data_frames(rng, short));
            p.intended = Some(Intended::Transport);
        }
        11 => {
            p.kind = "a second Hello";
            p.bytes.extend(hello(fp));
            p.intended = refused(ErrorCode::UnexpectedMessage);
        }
        12 => {
            p.kind = "another Compute inside a request";
            p.bytes.extend(frame(&Message::Compute {
                request: 9,
                linear: id,
                rows: max_rows,
            }));
            p.bytes.extend(frame(&Message::Compute {
                request: 10,
                linear: id,
                rows: 1,
            }));
            p.good_frames += 1;
            p.intended = refused(ErrorCode::UnexpectedMessage);
        }
        13 => {
            p.kind = "server messages from the client";
            let msg = if rng.below(2) == 0 {
                Message::Welcome {
                    protocol: PROTOCOL_VERSION,
                    fingerprint: fp,
                    max_rows,
                }
            } else {
                Message::Result {
                    request: 1,
                    rows: 1,
                }
            };
            p.bytes.extend(frame(&msg));
            p.intended = refused(ErrorCode::UnexpectedMessage);
        }
        14 => {
            p.kind = "wrong protocol or weights in Hello";
            let (mut protocol, mut fingerprint) = (PROTOCOL_VERSION, fp);
            let code = if rng.below(2) == 0 {
                fingerprint[rng.below(32) as usize] ^= 1 << rng.below(8);
                ErrorCode::WeightsMismatch
            } else {
                protocol = protocol.wrapping_add(1 + rng.below(u64::from(u32::MAX) - 1) as u32);
                ErrorCode::VersionMismatch
            };
            p.bytes.extend(frame(&Message::Hello {
                protocol,
                fingerprint,
            }));
            p.intended = refused(code);
        }
        15 => {
            p.kind = "Compute before Hello";
            p.bytes.extend(frame(&Message::Compute {
                request: 0,
                linear: id,
                rows: 1,
            }));
            p.intended = refused(ErrorCode::UnexpectedMessage);
        }
        16 => {
            p.kind = "truncated frame, then close";
            let f = frame(&Message::Compute {
                request: 9,
                linear: id,
                rows: 1,
            });
            p.bytes
                .extend(&f[..1 + rng.below(f.len() as u64 - 1) as usize]);
            p.intended = Some(Intended::Transport);
        }
        17 => {
            p.kind = "abrupt reset mid-frame";
            let n = 1 + rng.below(64) as usize;
            let mut rows = data_frames(rng, n);
            rows.truncate(1 + rng.below(rows.len() as u64 - 1) as usize);
            p.bytes.extend(rows);
            p.reset = true;
        }
        _ => {
            p.kind = "valid conversation with one byte flipped";
            let mut conv = hello(fp);
            for r in 0..1 + rng.below(2) {
                let id = valid_id(rng);
                let rows = 1 + rng.below(u64::from(max_rows)) as u32;
                conv.extend(frame(&Message::Compute {
                    request: r as u32,
                    linear: id,
                    rows,
                }));
                conv.extend(data_frames(rng, rows as usize * id.dims(&CFG).0));
            }
            conv.extend(frame(&Message::Bye));
            let at = rng.below(conv.len() as u64) as usize;
            conv[at] ^= 1 + rng.below(255) as u8;
            p.bytes.extend(conv);
        }
    }
    // After a deterministic refusal, more junk frames: the server must drain, not parse them.
    if matches!(p.intended, Some(Intended::Refused(_))) {
        p.trailing = rng.below(4) as usize;
        for _ in 0..p.trailing {
            let n = 1 + rng.below(64) as usize;
            p.bytes.extend((n as u32).to_le_bytes());
            p.bytes.extend(rng.bytes(n));
        }
    }
    p
}

/// Splits what a server sent into frame bodies, checking every prefix.
fn parse_frames(mut rest: &[u8]) -> Vec<Vec<u8>> {
    let mut frames = Vec::new();
    while !rest.is_empty() {
        assert!(
            rest.len() >= LEN_PREFIX,
            "partial length prefix from the server"
        );
        let n = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        assert!(
            (1..=MAX_FRAME_BODY).contains(&n) && rest.len() >= LEN_PREFIX + n,
            "bad or partial frame from the server"
        );
        frames.push(rest[LEN_PREFIX..LEN_PREFIX + n].to_vec());
        rest = &rest[LEN_PREFIX + n..];
    }
    frames
}

fn count_frames(mut bytes: &[u8]) -> usize {
    let mut n = 0;
    while bytes.len() >= LEN_PREFIX {
        let len = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as usize;
        bytes = &bytes[(LEN_PREFIX + len).min(bytes.len())..];
        n += 1;
    }
    n
}

/// SO_LINGER 0: closing sends a reset instead of a FIN (an abrupt disconnect, and no TIME_WAIT).
#[allow(deprecated)] // Tokio deprecates `set_linger` because a *non-zero* linger blocks on drop.
fn reset_on_drop(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// Sends a plan's bytes, closes the sending side, and returns the frame bodies the server sent.
async fn run_plan(addr: SocketAddr, p: &Plan) -> Option<Vec<Vec<u8>>> {
    let s = TcpStream::connect(addr).await.unwrap();
    let _ = s.set_nodelay(true);
    if p.reset {
        let mut s = s;
        let _ = s.write_all(&p.bytes).await;
        reset_on_drop(&s);
        return None;
    }
    let (mut rx, mut tx) = s.into_split();
    let write = async {
        let _ = tx.write_all(&p.bytes).await;
        let _ = tx.shutdown().await;
        tx
    };
    let read = async {
        let mut out = Vec::new();
        let _ = rx.read_to_end(&mut out).await;
        out
    };
    let (tx, out) =
        tokio::time::timeout(Duration::from_secs(20), async { tokio::join!(write, read) })
            .await
            .expect("the server answers and closes within 20 s");
    let s = rx.reunite(tx).unwrap();
    reset_on_drop(&s);
    Some(parse_frames(&out))
}

#[derive(Default)]
struct Tally {
    connections: usize,
    good_frames: usize,
    bad_frames: usize,
    trailing: usize,
    resets: usize,
    by_kind: std::collections::BTreeMap<&'static str, usize>,
    by_end: std::collections::BTreeMap<String, usize>,
}

/// A well-behaved session over TCP: every layer kind, products equal to `matmul_u32_i8`.
async fn good_session(addr: SocketAddr, fp: [u8; 32], bytes: &[u8]) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut rng = Rng(77);
    let mut script = hello(fp);
    let mut want = Vec::new();
    for (n, &kind) in KINDS.iter().enumerate() {
        let linear = LinearId {
            layer: if kind == LinearKind::LmHead {
                0
            } else {
                n as u16 % 2
            },
            kind,
        };
        let i = linear.dims(&CFG).0;
        let rows = 1 + rng.below(4) as usize;
        let x: Vec<u32> = (0..rows * i).map(|_| rng.next() as u32).collect();
        let y = expected(bytes, linear, &x);
        script.extend(frame(&Message::Compute {
            request: n as u32,
            linear,
            rows: rows as u32,
        }));
        let xb: Vec<u8> = x.iter().flat_map(|w| w.to_le_bytes()).collect();
        for c in xb.chunks(MAX_CHUNK_BYTES) {
            script.extend(frame(&Message::Data {
                words: WordBytes(c),
            }));
        }
        want.push((n as u32, rows as u32, y));
    }
    script.extend(frame(&Message::Bye));
    s.write_all(&script).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("good session answered within 10 s")
        .unwrap();
    let msgs = parse_frames(&out);
    let mut it = msgs.iter().map(|b| decode_body(b).unwrap());
    assert!(matches!(it.next(), Some(Message::Welcome { .. })));
    for (request, rows, y) in want {
        assert_eq!(it.next(), Some(Message::Result { request, rows }));
        let mut got = Vec::new();
        while got.len() < y.len() {
            let Some(Message::Data { words }) = it.next() else {
                panic!("request {request}: expected Data");
            };
            got.extend(words.iter());
        }
        assert_eq!(got, y, "request {request}: products");
    }
    assert_eq!(it.next(), None, "nothing after the last products");
}

/// Acceptance: ≥ 10,000 malformed, truncated, oversized and out-of-order frames to a live server;
/// no panic, the server keeps running, memory stays bounded, and a good client is served after.
#[test]
fn test_flood_of_bad_frames_leaves_the_server_serving() {
    let _serial = serial();
    count_panics();
    let panics_before = PANICS.load(Ordering::SeqCst);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
        .block_on(flood());
    assert_eq!(
        PANICS.load(Ordering::SeqCst),
        panics_before,
        "a panic happened in the process during the flood"
    );
}

async fn flood() {
    const SEED: u64 = 0x0BAD_F00D_5EED;
    const TASKS: u64 = 32;
    const PER_TASK: usize = 352;
    const IDLE: usize = 16;

    let bytes = model_bytes();
    let config = ServerConfig {
        max_rows: fuzz_model::MAX_ROWS,
        psk: None,
        // Above the flood's concurrency (TASKS + IDLE, and a closing connection per task): the
        // Busy path is tested in server.rs, here every connection is served.
        max_connections: 128,
        idle_timeout: Duration::from_secs(2),
        offline_inputs: fuzz_model::OFFLINE_INPUTS,
        serve_weights: false,
        offline_layers: veil_server::OfflineLimit::new(1),
    };
    let w = weights();
    let fp = w.fingerprint();
    let max_rows = config.max_rows;
    let (addr, server) = spawn_server(w.clone(), config, None, std::future::pending::<()>()).await;

    // Warm up (runtime, blocking pool, allocator arenas) before the baseline.
    good_session(addr, fp, bytes).await;
    let rss_before = status_kib("VmRSS");
    let started = Instant::now();

    // Idle connections stopping mid-frame or mid-request: refused with Timeout after 2 s.
    let idle: Vec<_> = (0..IDLE)
        .map(|k| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                let partial = match k % 3 {
                    0 => vec![7, 0],
                    1 => [hello(fp), 40u32.to_le_bytes().to_vec(), vec![0; 10]].concat(),
                    _ => [
                        hello(fp),
                        frame(&Message::Compute {
                            request: 1,
                            linear: LinearId::LM_HEAD,
                            rows: 2,
                        }),
                        frame(&Message::Data {
                            words: WordBytes(&[1; 16]),
                        }),
                    ]
                    .concat(),
                };
                s.write_all(&partial).await.unwrap();
                let mut out = Vec::new();
                tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
                    .await
                    .expect("idle connection refused within 10 s")
                    .unwrap();
                let frames = parse_frames(&out);
                assert_eq!(
                    frames.last().map(|f| decode_body(f)),
                    Some(Ok(Message::Error {
                        code: ErrorCode::Timeout
                    }))
                );
            })
        })
        .collect();

    // Peak RSS while the flood runs, sampled.
    let sampling = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while sampling.load(Ordering::Relaxed) {
                peak = peak.max(status_kib("VmRSS"));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        })
    };

    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            tokio::spawn(async move {
                let mut rng = Rng((SEED ^ (t << 40)) | 1);
                let mut tally = Tally::default();
                for _ in 0..PER_TASK {
                    let mut p = plan(&mut rng, fp, max_rows);
                    // What core's machine answers to these bytes (its invariants checked).
                    let run = machine(false, &p.bytes);
                    let want_end = End::of_machine(&run);
                    let want_frames = bodies(&run.frames);
                    match p.intended {
                        Some(Intended::Refused(c)) => assert_eq!(
                            want_end.code(),
                            Some(c),
                            "plan {:?} misses its intended end ({want_end:?})",
                            p.kind
                        ),
                        Some(Intended::Transport) => assert_eq!(
                            want_end,
                            End::Transport,
                            "plan {:?} misses its intended end",
                            p.kind
                        ),
                        None => {}
                    }
                    // A flip inside a Data payload leaves a valid conversation: not a bad frame.
                    if want_end == End::Ok(Ending::Bye) {
                        p.bad_frames = 0;
                    }
                    let got = run_plan(addr, &p).await;
                    if let Some(frames) = got {
                        if frames != want_frames {
                            let show = |fs: &[Vec<u8>]| {
                                fs.iter()
                                    .map(|f| format!("{:?}", decode_body(f)))
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            };
                            panic!(
                                "{}: server answered [{}], the machine [{}] ({want_end:?})",
                                p.kind,
                                show(&frames),
                                show(&want_frames),
                            );
                        }
                    } else {
                        tally.resets += 1;
                    }
                    tally.connections += 1;
                    tally.good_frames += p.good_frames;
                    tally.bad_frames += p.bad_frames;
                    tally.trailing += p.trailing;
                    *tally.by_kind.entry(p.kind).or_default() += 1;
                    let end = match want_end {
                        End::Ok(e) => format!("{e:?}"),
                        End::Refused(e) => format!("{:?}", e.code()),
                        End::Transport => "Transport".into(),
                    };
                    *tally
                        .by_end
                        .entry(if p.reset { "Reset".into() } else { end })
                        .or_default() += 1;
                }
                tally
            })
        })
        .collect();
    let mut total = Tally::default();
    for t in tasks {
        let t = t.await.expect("flood task");
        total.connections += t.connections;
        total.good_frames += t.good_frames;
        total.bad_frames += t.bad_frames;
        total.trailing += t.trailing;
        total.resets += t.resets;
        for (k, n) in t.by_kind {
            *total.by_kind.entry(k).or_default() += n;
        }
        for (k, n) in t.by_end {
            *total.by_end.entry(k).or_default() += n;
        }
    }
    for h in idle {
        h.await.expect("idle connection task");
    }
    let elapsed = started.elapsed();
    // Let the last connections' tasks (resets, drains) finish before measuring.
    tokio::time::sleep(Duration::from_millis(500)).await;
    sampling.store(false, Ordering::Relaxed);
    let rss_peak = sampler.await.unwrap();
    let rss_after = status_kib("VmRSS");

    assert!(!server.is_finished(), "the accept loop is still running");
    good_session(addr, fp, bytes).await;

    println!(
        "flood: {} connections in {elapsed:.1?} (+{IDLE} idle): {} bad frames, {} valid frames \
         before them (products checked), {} junk frames after a refusal, {} resets",
        total.connections, total.bad_frames, total.good_frames, total.trailing, total.resets
    );
    println!("flood: by kind {:?}", total.by_kind);
    println!("flood: by ending {:?}", total.by_end);
    println!(
        "flood: RSS before {rss_before} KiB, peak sampled {rss_peak} KiB, after {rss_after} KiB, \
         VmHWM {} KiB",
        status_kib("VmHWM")
    );
    assert!(
        total.bad_frames >= 10_000,
        "{} bad frames",
        total.bad_frames
    );
    // Bound: at most ~50 connections are open at once, each holding two frame buffers (~66 KiB)
    // and request buffers of max_rows · (in + out) words (≤ 4 · 200 · 4 B): a few MiB in all. The
    // runtime's blocking threads and malloc arenas add a few more. 64 MiB is an order of magnitude
    // above that, and a leak of 6.5 KiB per connection (less than one frame buffer) would exceed it.
    let growth = rss_after.saturating_sub(rss_before);
    assert!(
        growth < 64 * 1024,
        "RSS grew by {growth} KiB over the flood"
    );
}

// ---------------------------------------------------------------------------------------------
// Properties of one conversation over `tokio::io::duplex`.

/// Sends `input` (in writes of at most `fragment` bytes) as the client side of a duplex pipe
/// into `handle_connection`, closes the client's side, and returns what it returned and the
/// whole frames the server sent (a partial or invalid frame fails the test).
async fn converse(
    config: ServerConfig,
    input: &[u8],
    fragment: usize,
) -> (Result<Ending, ConnError>, Vec<Vec<u8>>) {
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
    let (result, (), out) = tokio::join!(
        handle_connection(server_end, weights(), config),
        write,
        read
    );
    (result, parse_frames(&out))
}

/// One conversation through `handle_connection` within 10 s: it returns, and sends exactly the
/// frames and ends exactly as core's machine does with the same bytes (whose invariants
/// `run_server` checks: valid frames, at most one `Error` and last, exact products).
fn run(rt: &tokio::runtime::Runtime, psk: bool, input: &[u8], fragment: usize) -> End {
    let (result, frames) = rt.block_on(async {
        tokio::time::timeout(
            Duration::from_secs(10),
            converse(server_config(psk), input, fragment),
        )
        .await
        .expect("handle_connection returns within 10 s")
    });
    let want = machine(psk, input);
    let end = End::of_host(&result);
    assert_eq!(end, End::of_machine(&want), "{result:?}");
    // The challenge nonce is the host's randomness: compare the rest.
    let frames = without_nonce(frames);
    let want_frames = without_nonce(bodies(&want.frames));
    if frames != want_frames {
        let show = |fs: &[Vec<u8>]| {
            fs.iter()
                .map(|f| format!("{:?}", decode_body(f)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        panic!(
            "the host sent [{}], the machine [{}]",
            show(&frames),
            show(&want_frames)
        );
    }
    end
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A message a client could send, valid in form, often wrong in place or content.
#[derive(Clone, Debug)]
enum Op {
    Hello {
        good: bool,
        protocol: u32,
    },
    Compute {
        request: u32,
        layer: u16,
        kind: usize,
        rows: u32,
    },
    Data(Vec<u8>),
    Welcome,
    Result,
    Error,
    Bye,
    /// A length prefix alone (often oversized or zero).
    Prefix(u32),
    /// Raw bytes (a prefix and a body that may or may not decode).
    Junk(Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (any::<bool>(), prop_oneof![Just(PROTOCOL_VERSION), any::<u32>()])
            .prop_map(|(good, protocol)| Op::Hello { good, protocol }),
        6 => (any::<u32>(), prop_oneof![0u16..3, any::<u16>()], 0usize..5,
              prop_oneof![0u32..6, any::<u32>()])
            .prop_map(|(request, layer, kind, rows)| Op::Compute { request, layer, kind, rows }),
        8 => prop_oneof![
            (0usize..100).prop_map(|w| vec![0x5Au8; 4 * w]),
            proptest::collection::vec(any::<u8>(), 0..300),
        ].prop_map(Op::Data),
        1 => Just(Op::Welcome),
        1 => Just(Op::Result),
        1 => Just(Op::Error),
        1 => Just(Op::Bye),
        1 => any::<u32>().prop_map(Op::Prefix),
        1 => proptest::collection::vec(any::<u8>(), 0..64).prop_map(Op::Junk),
    ]
}

fn encode_ops(ops: &[Op]) -> Vec<u8> {
    let fp = weights().fingerprint();
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Hello { good, protocol } => out.extend(frame(&Message::Hello {
                protocol: *protocol,
                fingerprint: if *good { fp } else { [1; 32] },
            })),
            Op::Compute {
                request,
                layer,
                kind,
                rows,
            } => out.extend(frame(&Message::Compute {
                request: *request,
                linear: LinearId {
                    layer: *layer,
                    kind: KINDS[*kind],
                },
                rows: *rows,
            })),
            Op::Data(b) => out.extend(frame(&Message::Data {
                words: WordBytes(b),
            })),
            Op::Welcome => out.extend(frame(&Message::Welcome {
                protocol: PROTOCOL_VERSION,
                fingerprint: fp,
                max_rows: 4,
            })),
            Op::Result => out.extend(frame(&Message::Result {
                request: 0,
                rows: 1,
            })),
            Op::Error => out.extend(frame(&Message::Error {
                code: ErrorCode::Timeout,
            })),
            Op::Bye => out.extend(frame(&Message::Bye)),
            Op::Prefix(n) => out.extend(n.to_le_bytes()),
            Op::Junk(b) => out.extend(b),
        }
    }
    out
}

/// A valid request: layer, rows and the row words, sent in chunks of `chunk` words.
fn valid_request() -> impl Strategy<Value = (usize, u16, u32, u64, usize)> {
    (0usize..5, 0u16..2, 1u32..=4, any::<u64>(), 1usize..200)
}

proptest! {
    // No regression files: this file is shared with cargo-fuzz, which keeps its own artifacts.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Arbitrary bytes, with or without a valid Hello before them, in arbitrary write sizes:
    /// the server returns, and answers exactly as core's machine does.
    #[test]
    fn prop_arbitrary_bytes(
        after_hello in any::<bool>(),
        junk in proptest::collection::vec(any::<u8>(), 0..2048),
        fragment in 1usize..600,
    ) {
        let _serial = serial();
        let rt = runtime();
        let mut input = if after_hello { hello(weights().fingerprint()) } else { Vec::new() };
        input.extend(junk);
        run(&rt, false, &input, fragment);
    }

    /// Structurally valid but wrongly placed or wrongly filled messages.
    #[test]
    fn prop_wrong_message_sequences(
        hello_first in any::<bool>(),
        psk in any::<bool>(),
        ops in proptest::collection::vec(op(), 0..24),
        fragment in 1usize..600,
    ) {
        let _serial = serial();
        let rt = runtime();
        let mut all = Vec::new();
        if hello_first {
            all.push(Op::Hello { good: true, protocol: PROTOCOL_VERSION });
        }
        all.extend(ops);
        run(&rt, psk, &encode_ops(&all), fragment);
    }

    /// Valid requests over every layer kind, in arbitrary chunk and write sizes: the exact
    /// products, then Bye. And with one byte flipped anywhere: no panic, the machine's answer.
    #[test]
    fn prop_valid_requests_get_exact_products(
        reqs in proptest::collection::vec(valid_request(), 1..6),
        fragment in 1usize..2000,
        flip in any::<(usize, u8)>(),
    ) {
        let _serial = serial();
        let rt = runtime();
        let mut input = hello(weights().fingerprint());
        for (n, &(kind, layer, rows, seed, chunk)) in reqs.iter().enumerate() {
            let kind = KINDS[kind];
            let linear = LinearId { layer: if kind == LinearKind::LmHead { 0 } else { layer }, kind };
            input.extend(frame(&Message::Compute { request: n as u32, linear, rows }));
            let mut rng = Rng(seed | 1);
            let x = rng.bytes(rows as usize * linear.dims(&CFG).0 * 4);
            for c in x.chunks(chunk * 4) {
                input.extend(frame(&Message::Data { words: WordBytes(c) }));
            }
        }
        input.extend(frame(&Message::Bye));
        prop_assert_eq!(machine(false, &input).jobs.len(), reqs.len());
        // `run` checks every Result and Data frame against `matmul_u32_i8`.
        prop_assert_eq!(run(&rt, false, &input, fragment), End::Ok(Ending::Bye));
        let (at, x) = flip;
        let at = at % input.len();
        input[at] ^= x.max(1);
        run(&rt, false, &input, fragment);
    }
}

/// The seed corpus in `host-server/fuzz/corpus/` is what `seeds()` generates for the current wire
/// format; `VEIL_WRITE_FUZZ_CORPUS=1 cargo test -p veil-server --test hardening` rewrites it.
#[test]
fn test_fuzz_seed_corpus_is_current() {
    let _serial = serial();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let write = std::env::var_os("VEIL_WRITE_FUZZ_CORPUS").is_some();
    let rt = runtime();
    let mut names = std::collections::BTreeSet::new();
    for (target, name, bytes) in seeds() {
        // Every seed goes through the checks of its target.
        match target {
            "frame_decoder" => fuzz_model::check_frames(&bytes),
            "client_session" => fuzz_model::check_client(&bytes),
            _ => {
                fuzz_model::check_session(&bytes);
                let (ctl, client) = (Control::of(bytes[0]), &bytes[1..]);
                let run = run_server(ctl, client);
                assert!(
                    !matches!(run.outcome, Err(ServerError::Frame(_))),
                    "seed {name} is a conversation, ended {:?}",
                    run.outcome
                );
                // The host answers it alike (jobs it cannot fail and timers it does not fire
                // on demand aside).
                if !ctl.flag && !ctl.timeout {
                    run_host_seed(&rt, ctl.psk, client, name);
                }
            }
        }
        names.insert((target, name));
        let path = root.join(target).join(name);
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &bytes).unwrap();
        } else {
            let on_disk = std::fs::read(&path).unwrap_or_default();
            assert!(
                on_disk == bytes,
                "{} is stale: rerun with VEIL_WRITE_FUZZ_CORPUS=1",
                path.display()
            );
        }
    }
    // Rewriting also removes files of seeds that no longer exist (older formats).
    if write {
        for target in ["frame_decoder", "server_session", "client_session"] {
            for entry in std::fs::read_dir(root.join(target)).unwrap() {
                let file = entry.unwrap().file_name();
                let file = file.to_string_lossy();
                if !names.iter().any(|(t, n)| *t == target && *n == file) {
                    std::fs::remove_file(root.join(target).join(&*file)).unwrap();
                }
            }
        }
    }
}

fn run_host_seed(rt: &tokio::runtime::Runtime, psk: bool, client: &[u8], name: &str) {
    let end = run(rt, psk, client, usize::MAX);
    assert!(
        !matches!(end, End::Refused(ServerError::Frame(_))),
        "seed {name} ended {end:?} through the host"
    );
}
