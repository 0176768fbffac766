//! End-to-end tests of veil-server over real sockets (and one over `tokio::io::duplex`).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{expected, random_linear, random_weights, spawn_server, FrameReader, Rng};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::{LinearId, LinearKind, LinearWeights, ModelConfig};
use veil_core::wire::{
    decode_body, encode_frame, ErrorCode, Message, WordBytes, LEN_PREFIX, MAX_CHUNK_BYTES,
    MAX_FRAME_BODY, PROTOCOL_VERSION,
};
use veil_server::{handle_connection, ConnError, Ending, ServerConfig, ServerError, ServerWeights};

const CFG: ModelConfig = ModelConfig {
    n_layer: 2,
    n_embd: 16,
    n_head: 2,
    n_positions: 16,
    vocab_size: 100,
    n_inner: 64,
    family: veil_core::model::Family::Gpt2,
};

fn id(layer: u16, kind: LinearKind) -> LinearId {
    LinearId { layer, kind }
}

/// A fresh directory per call (tests run in parallel; a file one test maps must never be rewritten).
fn temp_dir(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir =
        std::env::temp_dir().join(format!("veil-server-test-{}-{tag}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

struct Server {
    addr: SocketAddr,
    bytes: Vec<u8>,
    fingerprint: [u8; 32],
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("serve returns after shutdown")
            .unwrap();
    }
}

/// Writes a random model to disk, loads it the way `main` does, and serves it on 127.0.0.1:0.
async fn start(config: ServerConfig) -> Server {
    let bytes = random_linear(&CFG, 0x5eed);
    let dir = temp_dir("model");
    std::fs::write(dir.join("linear.veil"), &bytes).unwrap();
    let weights = ServerWeights::open_dir(&dir).unwrap();
    // The map stays valid after the unlink (where the OS allows it; elsewhere the dir just stays).
    let _ = std::fs::remove_dir_all(&dir);
    let fingerprint = weights.fingerprint();
    let (tx, rx) = oneshot::channel::<()>();
    let (addr, task) = spawn_server(Arc::new(weights), config, None, async {
        let _ = rx.await;
    })
    .await;
    Server {
        addr,
        bytes,
        fingerprint,
        stop: Some(tx),
        task,
    }
}

/// A hand-rolled client: frames encoded with veil-core, moved with tokio.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    frames: FrameReader,
}

/// An owned copy of the messages a server sends.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Welcome {
        fingerprint: [u8; 32],
        max_rows: u32,
    },
    Result {
        request: u32,
        rows: u32,
    },
    Data(Vec<u32>),
    Error(ErrorCode),
    Other,
}

impl Client {
    async fn connect(addr: SocketAddr) -> Client {
        Client {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: vec![0u8; MAX_FRAME_BODY + LEN_PREFIX],
            frames: FrameReader::new(),
        }
    }

    async fn hello(addr: SocketAddr, fingerprint: [u8; 32]) -> Client {
        let mut c = Client::connect(addr).await;
        c.send(&Message::Hello {
            protocol: PROTOCOL_VERSION,
            fingerprint,
        })
        .await;
        match c.recv().await {
            Some(Reply::Welcome {
                fingerprint: f,
                max_rows,
            }) => {
                assert_eq!(f, fingerprint);
                assert!(max_rows >= 1);
            }
            other => panic!("expected Welcome, got {other:?}"),
        }
        c
    }

    async fn send(&mut self, msg: &Message<'_>) {
        let n = encode_frame(msg, &mut self.buf).unwrap();
        self.s.write_all(&self.buf[..n]).await.unwrap();
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        // The server may already have closed: a failed write is part of what we test.
        let _ = self.s.write_all(bytes).await;
    }

    /// The next message, or `None` when the server closed (or reset) the connection.
    async fn recv(&mut self) -> Option<Reply> {
        let body = tokio::time::timeout(Duration::from_secs(10), self.frames.next(&mut self.s))
            .await
            .expect("server answers within 10 s")?;
        Some(match decode_body(&body).expect("server frames decode") {
            Message::Welcome {
                protocol,
                fingerprint,
                max_rows,
            } => {
                assert_eq!(protocol, PROTOCOL_VERSION);
                Reply::Welcome {
                    fingerprint,
                    max_rows,
                }
            }
            Message::Result { request, rows } => Reply::Result { request, rows },
            Message::Data { words } => Reply::Data(words.iter().collect()),
            Message::Error { code } => Reply::Error(code),
            _ => Reply::Other,
        })
    }

    /// Sends words as Data frames of `chunk_bytes` payload.
    async fn send_words(&mut self, words: &[u32], chunk_bytes: usize) {
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        for chunk in bytes.chunks(chunk_bytes) {
            self.send(&Message::Data {
                words: WordBytes(chunk),
            })
            .await;
        }
    }

    /// One request; returns the products.
    async fn compute(
        &mut self,
        request: u32,
        linear: LinearId,
        x: &[u32],
        chunk: usize,
    ) -> Vec<u32> {
        let (i, o) = linear.dims(&CFG);
        let rows = (x.len() / i) as u32;
        self.send(&Message::Compute {
            request,
            linear,
            rows,
        })
        .await;
        self.send_words(x, chunk).await;
        assert_eq!(
            self.recv().await,
            Some(Reply::Result { request, rows }),
            "request {request}"
        );
        let mut y = Vec::new();
        while y.len() < rows as usize * o {
            match self.recv().await {
                Some(Reply::Data(w)) => {
                    assert!(!w.is_empty() && w.len() * 4 <= MAX_CHUNK_BYTES);
                    y.extend(w);
                }
                other => panic!("expected Data, got {other:?}"),
            }
        }
        assert_eq!(
            y.len(),
            rows as usize * o,
            "no words beyond the announced rows"
        );
        y
    }

    /// Expects `Error{code}` then a close.
    async fn expect_error(&mut self, code: ErrorCode) {
        assert_eq!(self.recv().await, Some(Reply::Error(code)));
        assert_eq!(self.recv().await, None, "closed after the error");
    }
}

/// A good client: every layer kind once, products checked bit for bit.
async fn good_session(server: &Server, seed: u64) {
    let mut c = Client::hello(server.addr, server.fingerprint).await;
    let mut rng = Rng(seed | 1);
    let layers = [
        id(0, LinearKind::Qkv),
        id(1, LinearKind::AttnOut),
        id(0, LinearKind::MlpUp),
        id(1, LinearKind::MlpDown),
        LinearId::LM_HEAD,
    ];
    for (n, &linear) in layers.iter().enumerate() {
        let rows = 1 + (rng.next() % 5) as usize;
        let x = rng.words(rows * linear.dims(&CFG).0);
        let y = c.compute(n as u32, linear, &x, MAX_CHUNK_BYTES).await;
        assert_eq!(y, expected(&server.bytes, linear, &x), "{linear:?}");
    }
    c.send(&Message::Bye).await;
    assert_eq!(c.recv().await, None, "server closes after Bye");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_every_layer_kind_returns_the_exact_wrapping_product() {
    let server = start(ServerConfig::default()).await;
    assert_eq!(
        server.fingerprint,
        <[u8; 32]>::from(Sha256::digest(&server.bytes))
    );
    good_session(&server, 1).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_large_requests_span_several_chunks_both_ways() {
    let server = start(ServerConfig {
        max_rows: 128,
        ..ServerConfig::default()
    })
    .await;
    let mut c = Client::hello(server.addr, server.fingerprint).await;
    let mut rng = Rng(7);
    // 128 rows × 64 words in (odd 1000-byte chunks up), 128 × 100 words out (two chunks down).
    let down = id(1, LinearKind::MlpDown);
    let x = rng.words(128 * 64);
    assert_eq!(
        c.compute(1, down, &x, 1000).await,
        expected(&server.bytes, down, &x)
    );
    let x = rng.words(128 * 16);
    let y = c.compute(2, LinearId::LM_HEAD, &x, 4).await;
    assert_eq!(y, expected(&server.bytes, LinearId::LM_HEAD, &x));
    // The connection stays usable after big requests.
    let x = rng.words(16);
    let qkv = id(0, LinearKind::Qkv);
    assert_eq!(
        c.compute(3, qkv, &x, 64).await,
        expected(&server.bytes, qkv, &x)
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_handshake_refusals() {
    let server = start(ServerConfig::default()).await;
    // Wrong fingerprint.
    let mut c = Client::connect(server.addr).await;
    let mut other = server.fingerprint;
    other[0] ^= 1;
    c.send(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint: other,
    })
    .await;
    c.expect_error(ErrorCode::WeightsMismatch).await;
    // Wrong protocol.
    let mut c = Client::connect(server.addr).await;
    c.send(&Message::Hello {
        protocol: PROTOCOL_VERSION + 1,
        fingerprint: server.fingerprint,
    })
    .await;
    c.expect_error(ErrorCode::VersionMismatch).await;
    // Compute before Hello.
    let mut c = Client::connect(server.addr).await;
    c.send(&Message::Compute {
        request: 0,
        linear: LinearId::LM_HEAD,
        rows: 1,
    })
    .await;
    c.expect_error(ErrorCode::UnexpectedMessage).await;
    good_session(&server, 2).await;
    server.stop().await;
}

/// Each bad conversation gets its error (or a close), and a good client is served afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_malformed_and_out_of_order_frames_close_only_that_connection() {
    let server = start(ServerConfig::default()).await;
    let fp = server.fingerprint;
    let bad_layer = |layer, kind| Message::Compute {
        request: 5,
        linear: id(layer, kind),
        rows: 1,
    };

    // Undecodable body before the hello.
    let mut c = Client::connect(server.addr).await;
    let mut frame = 20u32.to_le_bytes().to_vec();
    frame.extend([0xFF; 20]);
    c.send_raw(&frame).await;
    c.expect_error(ErrorCode::MalformedFrame).await;

    // Random bytes after the hello: an error or a close, never a hang or a crash.
    let mut rng = Rng(99);
    for _ in 0..8 {
        let mut c = Client::hello(server.addr, fp).await;
        let junk: Vec<u8> = (0..200).map(|_| rng.next() as u8).collect();
        c.send_raw(&junk).await;
        match c.recv().await {
            None | Some(Reply::Error(_)) => {}
            other => panic!("junk answered with {other:?}"),
        }
    }

    // A 10 MB length prefix is refused before any body is read.
    let mut c = Client::hello(server.addr, fp).await;
    c.send_raw(&(10u32 << 20).to_le_bytes()).await;
    c.expect_error(ErrorCode::MalformedFrame).await;

    // A zero length prefix.
    let mut c = Client::hello(server.addr, fp).await;
    c.send_raw(&0u32.to_le_bytes()).await;
    c.expect_error(ErrorCode::MalformedFrame).await;

    // Data before Compute.
    let mut c = Client::hello(server.addr, fp).await;
    c.send_words(&[1, 2, 3], 64).await;
    c.expect_error(ErrorCode::UnexpectedMessage).await;

    // A second Hello.
    let mut c = Client::hello(server.addr, fp).await;
    c.send(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint: fp,
    })
    .await;
    c.expect_error(ErrorCode::UnexpectedMessage).await;

    // Row counts: 0 and above the maximum.
    for rows in [0, 65, u32::MAX] {
        let mut c = Client::hello(server.addr, fp).await;
        c.send(&Message::Compute {
            request: 1,
            linear: LinearId::LM_HEAD,
            rows,
        })
        .await;
        c.expect_error(ErrorCode::TooManyRows).await;
    }

    // Layers that do not exist.
    for msg in [
        bad_layer(99, LinearKind::Qkv),
        bad_layer(2, LinearKind::MlpDown),
        bad_layer(1, LinearKind::LmHead),
    ] {
        let mut c = Client::hello(server.addr, fp).await;
        c.send(&msg).await;
        c.expect_error(ErrorCode::UnknownLayer).await;
    }

    // Data lengths: not whole words, and more words than announced.
    let qkv = id(0, LinearKind::Qkv);
    for payload in [vec![0u8; 7], vec![0u8; 16 * 4 + 4]] {
        let mut c = Client::hello(server.addr, fp).await;
        c.send(&Message::Compute {
            request: 1,
            linear: qkv,
            rows: 1,
        })
        .await;
        c.send(&Message::Data {
            words: WordBytes(&payload),
        })
        .await;
        c.expect_error(ErrorCode::WrongDataLength).await;
    }

    // Another message in the middle of a request's data.
    let mut c = Client::hello(server.addr, fp).await;
    c.send(&Message::Compute {
        request: 1,
        linear: qkv,
        rows: 2,
    })
    .await;
    c.send_words(&[0; 16], 64).await;
    c.send(&Message::Compute {
        request: 2,
        linear: qkv,
        rows: 1,
    })
    .await;
    c.expect_error(ErrorCode::UnexpectedMessage).await;

    good_session(&server, 3).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_four_concurrent_clients_get_correct_products() {
    let server = Arc::new(start(ServerConfig::default()).await);
    let mut tasks = Vec::new();
    for k in 0..4u64 {
        let server = server.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = Client::hello(server.addr, server.fingerprint).await;
            let mut rng = Rng(1000 + k);
            for r in 0..20u32 {
                let linear = CFG.linears().nth((rng.next() % 9) as usize).unwrap();
                let rows = 1 + (rng.next() % 64) as usize;
                let x = rng.words(rows * linear.dims(&CFG).0);
                let y = c
                    .compute(r, linear, &x, (1 + (rng.next() % 4096) as usize) * 4)
                    .await;
                assert_eq!(y, expected(&server.bytes, linear, &x), "client {k} req {r}");
            }
            c.send(&Message::Bye).await;
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    Arc::into_inner(server).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_client_vanishing_mid_data_leaves_others_served() {
    let server = start(ServerConfig::default()).await;
    // A client that is in the middle of a session keeps working throughout.
    let mut steady = Client::hello(server.addr, server.fingerprint).await;
    for k in 0..3 {
        let mut c = Client::hello(server.addr, server.fingerprint).await;
        c.send(&Message::Compute {
            request: 1,
            linear: id(0, LinearKind::MlpDown),
            rows: 10,
        })
        .await;
        c.send_words(&vec![7; 64 * 4 + k], 100).await;
        drop(c);
        let x = Rng(50 + k as u64).words(3 * 16);
        let up = id(1, LinearKind::MlpUp);
        assert_eq!(
            steady.compute(k as u32, up, &x, 256).await,
            expected(&server.bytes, up, &x)
        );
    }
    good_session(&server, 4).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_connection_limit_answers_busy() {
    let server = start(ServerConfig {
        max_connections: 1,
        ..ServerConfig::default()
    })
    .await;
    let first = Client::hello(server.addr, server.fingerprint).await;
    let mut second = Client::connect(server.addr).await;
    second.expect_error(ErrorCode::Busy).await;
    drop(first);
    // The slot frees once the server notices the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = Client::connect(server.addr).await;
        c.send(&Message::Hello {
            protocol: PROTOCOL_VERSION,
            fingerprint: server.fingerprint,
        })
        .await;
        match c.recv().await {
            Some(Reply::Welcome { .. }) => break,
            // Still busy; or closed without a reply, because the earlier Busy reply is still
            // lingering and busy replies are bounded too (max_connections of them at once).
            Some(Reply::Error(ErrorCode::Busy)) | None
                if tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("expected Welcome after the slot freed, got {other:?}"),
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_idle_client_times_out() {
    let server = start(ServerConfig {
        idle_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    })
    .await;
    let mut c = Client::hello(server.addr, server.fingerprint).await;
    // Half a frame, then silence.
    c.send_raw(&[9, 0]).await;
    c.expect_error(ErrorCode::Timeout).await;
    good_session(&server, 5).await;
    server.stop().await;
}

/// The handler alone, over an in-memory pipe: its outcome is typed.
#[tokio::test]
async fn test_handler_over_duplex_reports_outcomes() {
    let weights = random_weights(&CFG, 3);
    let fp = weights.fingerprint();
    let mut buf = vec![0u8; MAX_FRAME_BODY + LEN_PREFIX];

    // Hello, one product, Bye.
    let (mut client, server_end) = tokio::io::duplex(1 << 16);
    let h = tokio::spawn(handle_connection(
        server_end,
        weights.clone(),
        ServerConfig::default(),
    ));
    let x: Vec<u32> = Rng(11).words(16);
    let mut script = Vec::new();
    for msg in [
        Message::Hello {
            protocol: PROTOCOL_VERSION,
            fingerprint: fp,
        },
        Message::Compute {
            request: 42,
            linear: id(0, LinearKind::AttnOut),
            rows: 1,
        },
    ] {
        let n = encode_frame(&msg, &mut buf).unwrap();
        script.extend_from_slice(&buf[..n]);
    }
    let xb: Vec<u8> = x.iter().flat_map(|w| w.to_le_bytes()).collect();
    for msg in [
        Message::Data {
            words: WordBytes(&xb),
        },
        Message::Bye,
    ] {
        let n = encode_frame(&msg, &mut buf).unwrap();
        script.extend_from_slice(&buf[..n]);
    }
    client.write_all(&script).await.unwrap();
    let mut out = Vec::new();
    client.read_to_end(&mut out).await.unwrap();
    assert_eq!(h.await.unwrap().unwrap(), Ending::Bye);
    // Welcome, Result, one Data.
    let mut frames = Vec::new();
    let mut rest = &out[..];
    while !rest.is_empty() {
        let n = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        frames.push(rest[4..4 + n].to_vec());
        rest = &rest[4 + n..];
    }
    assert_eq!(frames.len(), 3);
    assert!(matches!(
        decode_body(&frames[0]),
        Ok(Message::Welcome { .. })
    ));
    assert_eq!(
        decode_body(&frames[1]),
        Ok(Message::Result {
            request: 42,
            rows: 1
        })
    );
    let Ok(Message::Data { words }) = decode_body(&frames[2]) else {
        panic!("expected Data");
    };
    let lin = LinearWeights::parse(weights.bytes()).unwrap();
    let mut y = vec![0u32; 16];
    matmul_u32_i8(&x, lin.matrix(id(0, LinearKind::AttnOut)), 16, 16, &mut y);
    assert_eq!(words.iter().collect::<Vec<_>>(), y);

    // A refusal is a typed error.
    let (mut client, server_end) = tokio::io::duplex(1 << 16);
    let h = tokio::spawn(handle_connection(
        server_end,
        weights.clone(),
        ServerConfig::default(),
    ));
    let n = encode_frame(&Message::Bye, &mut buf).unwrap();
    client.write_all(&buf[..n]).await.unwrap();
    let err = h.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::UnexpectedMessage));
    assert!(matches!(
        err,
        ConnError::Refused(ServerError::Unexpected { got: "Bye", .. })
    ));

    // A peer that closes mid-request is a transport error, not a refusal.
    let (client, server_end) = tokio::io::duplex(1 << 16);
    let h = tokio::spawn(handle_connection(
        server_end,
        weights.clone(),
        ServerConfig::default(),
    ));
    let mut script = Vec::new();
    for msg in [
        Message::Hello {
            protocol: PROTOCOL_VERSION,
            fingerprint: fp,
        },
        Message::Compute {
            request: 1,
            linear: LinearId::LM_HEAD,
            rows: 2,
        },
    ] {
        let n = encode_frame(&msg, &mut buf).unwrap();
        script.extend_from_slice(&buf[..n]);
    }
    // Half-close (keep reading, so that the Welcome is delivered and the server sees the end).
    let (mut rx, mut tx) = tokio::io::split(client);
    tx.write_all(&script).await.unwrap();
    tx.shutdown().await.unwrap();
    let mut out = Vec::new();
    rx.read_to_end(&mut out).await.unwrap();
    let err = h.await.unwrap().unwrap_err();
    assert_eq!(err.code(), None);
    let ConnError::Io(e) = err else {
        panic!("expected a transport error, got {err:?}");
    };
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    assert_eq!(
        e.get_ref().and_then(|e| e.downcast_ref::<ServerError>()),
        Some(&ServerError::Truncated { request: Some(1) })
    );
}

#[test]
fn test_load_errors_name_the_file() {
    let dir = temp_dir("bad");
    let _ = std::fs::remove_file(dir.join("linear.veil"));
    let err = format!("{:#}", ServerWeights::open_dir(&dir).unwrap_err());
    assert!(err.contains("linear.veil"), "{err}");

    let mut bytes = random_linear(&CFG, 1);
    bytes.pop();
    std::fs::write(dir.join("linear.veil"), &bytes).unwrap();
    let err = format!("{:#}", ServerWeights::open_dir(&dir).unwrap_err());
    assert!(
        err.contains("linear.veil") && err.contains("truncated"),
        "{err}"
    );

    // A client.veil-shaped file is refused (wrong magic).
    bytes.push(0);
    bytes[..8].copy_from_slice(b"VEILCLI1");
    std::fs::write(dir.join("linear.veil"), &bytes).unwrap();
    let err = format!("{:#}", ServerWeights::open_dir(&dir).unwrap_err());
    assert!(err.contains("magic"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn test_weights_expose_shape_and_matrices() {
    let bytes = random_linear(&CFG, 9);
    let w = ServerWeights::from_bytes(bytes.clone()).unwrap();
    assert_eq!(*w.config(), CFG);
    assert_eq!(w.config().widest_linear(), (64, 100));
    let lin = LinearWeights::parse(&bytes).unwrap();
    for linear in CFG.linears() {
        assert_eq!(w.matrix(linear), Some(lin.matrix(linear)));
    }
    assert_eq!(w.matrix(id(2, LinearKind::Qkv)), None);
    assert_eq!(w.linear().unwrap().config(), &CFG);
    assert_eq!(w.fingerprint_hex().len(), 64);
}
