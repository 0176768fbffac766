//! Continuous batching: concurrent clients' rows for the same layer share one product, and every
//! job still gets exactly the products of its own rows.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::format::{encode_linear_header, LinearLayout, HEADER_LEN};
use veil_core::model::{LinearId, LinearKind, LinearWeights, ModelConfig};
use veil_core::wire::{
    decode_body, encode_frame, ErrorCode, Message, WordBytes, LEN_PREFIX, MAX_CHUNK_BYTES,
    MAX_FRAME_BODY, PROTOCOL_VERSION,
};
use veil_server::{serve_with, BatchConfig, Batcher, ServerConfig, ServerWeights};

/// Small: many layers of different shapes, cheap products.
const SMALL: ModelConfig = ModelConfig {
    n_layer: 3,
    n_embd: 16,
    n_head: 2,
    n_positions: 16,
    vocab_size: 100,
    n_inner: 64,
};

/// Wide enough that one LM-head row takes a while, so requests queue behind a busy thread.
const WIDE: ModelConfig = ModelConfig {
    n_layer: 1,
    n_embd: 256,
    n_head: 4,
    n_positions: 16,
    vocab_size: 8192,
    n_inner: 256,
};

/// xorshift64*: deterministic test randomness without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn words(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() >> 32) as u32).collect()
    }
}

/// In-memory weights of `cfg` with random int8 values (full range).
fn weights(cfg: &ModelConfig, seed: u64) -> Arc<ServerWeights> {
    let layout = LinearLayout::new(cfg);
    let mut bytes = vec![0u8; layout.total_len];
    let mut h = [0u8; HEADER_LEN];
    encode_linear_header(cfg, &mut h);
    bytes[..HEADER_LEN].copy_from_slice(&h);
    let mut rng = Rng(seed | 1);
    for id in cfg.linears() {
        for b in &mut bytes[layout.matrix(id)] {
            *b = rng.next() as u8;
        }
    }
    Arc::new(ServerWeights::from_bytes(bytes).unwrap())
}

/// The product computed alone, the reference for every batched job.
fn expected(w: &ServerWeights, id: LinearId, x: &[u32]) -> Vec<u32> {
    let lin = LinearWeights::parse(w.bytes()).unwrap();
    let (i, o) = id.dims(w.config());
    let mut y = vec![0u32; x.len() / i * o];
    matmul_u32_i8(x, lin.matrix(id), i, o, &mut y);
    y
}

fn random_layer(rng: &mut Rng, cfg: &ModelConfig) -> LinearId {
    let kinds = [
        LinearKind::Qkv,
        LinearKind::AttnOut,
        LinearKind::MlpUp,
        LinearKind::MlpDown,
        LinearKind::LmHead,
    ];
    match kinds[(rng.next() % 5) as usize] {
        LinearKind::LmHead => LinearId::LM_HEAD,
        kind => LinearId {
            layer: (rng.next() % cfg.n_layer as u64) as u16,
            kind,
        },
    }
}

/// A minimal protocol client over tokio.
struct Client {
    s: TcpStream,
    buf: Vec<u8>,
    cfg: ModelConfig,
}

#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Result { request: u32, rows: u32 },
    Data(Vec<u32>),
    Error(ErrorCode),
    Other,
}

impl Client {
    async fn hello(addr: SocketAddr, w: &ServerWeights) -> Client {
        let mut c = Client {
            s: TcpStream::connect(addr).await.unwrap(),
            buf: vec![0u8; MAX_FRAME_BODY + LEN_PREFIX],
            cfg: *w.config(),
        };
        c.send(&Message::Hello {
            protocol: PROTOCOL_VERSION,
            fingerprint: w.fingerprint(),
        })
        .await;
        let reply = c.recv_raw().await.unwrap();
        assert!(matches!(decode_body(&reply), Ok(Message::Welcome { .. })));
        c
    }

    async fn send(&mut self, msg: &Message<'_>) {
        let frame = encode_frame(msg, &mut self.buf).unwrap();
        self.s.write_all(frame).await.unwrap();
    }

    async fn recv_raw(&mut self) -> Option<Vec<u8>> {
        let read = async {
            let mut prefix = [0u8; 4];
            self.s.read_exact(&mut prefix).await.ok()?;
            let n = u32::from_le_bytes(prefix) as usize;
            assert!(n <= MAX_FRAME_BODY, "server sent an oversized frame");
            let mut body = vec![0u8; n];
            self.s.read_exact(&mut body).await.ok()?;
            Some(body)
        };
        tokio::time::timeout(Duration::from_secs(20), read)
            .await
            .expect("server answers within 20 s")
    }

    async fn recv(&mut self) -> Option<Reply> {
        let body = self.recv_raw().await?;
        Some(match decode_body(&body).expect("server frames decode") {
            Message::Result { request, rows } => Reply::Result { request, rows },
            Message::Data { words } => Reply::Data(words.iter().collect()),
            Message::Error { code } => Reply::Error(code),
            _ => Reply::Other,
        })
    }

    /// One request, its words in Data frames of `chunk` bytes; returns the products.
    async fn compute(
        &mut self,
        request: u32,
        linear: LinearId,
        x: &[u32],
        chunk: usize,
    ) -> Vec<u32> {
        let (i, o) = linear.dims(&self.cfg);
        let rows = (x.len() / i) as u32;
        self.send(&Message::Compute {
            request,
            linear,
            rows,
        })
        .await;
        let bytes: Vec<u8> = x.iter().flat_map(|w| w.to_le_bytes()).collect();
        for c in bytes.chunks(chunk) {
            self.send(&Message::Data {
                words: WordBytes(c),
            })
            .await;
        }
        assert_eq!(self.recv().await, Some(Reply::Result { request, rows }));
        let mut y = Vec::new();
        while y.len() < rows as usize * o {
            match self.recv().await {
                Some(Reply::Data(w)) => y.extend(w),
                other => panic!("request {request}: expected Data, got {other:?}"),
            }
        }
        assert_eq!(
            y.len(),
            rows as usize * o,
            "no words beyond the announced rows"
        );
        y
    }

    async fn bye(mut self) {
        self.send(&Message::Bye).await;
        assert_eq!(self.recv().await, None, "server closes after Bye");
    }
}

/// Serves `w` on loopback with `batcher` until the test's runtime ends.
async fn start(w: &Arc<ServerWeights>, config: ServerConfig, batcher: &Batcher) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve_with(
        listener,
        w.clone(),
        config,
        Some(batcher.clone()),
        std::future::pending::<()>(),
    ));
    addr
}

/// Jobs of every layer and 1–6 rows submitted at once to one thread with a window: they are
/// batched across jobs, and each gets exactly its own rows' products.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_concurrent_jobs_of_mixed_layers_each_get_their_own_products() {
    let w = weights(&SMALL, 1);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            threads: 1,
            max_rows: 8,
            window: Duration::from_millis(20),
            ..BatchConfig::default()
        },
    )
    .unwrap();
    // As many connections as jobs: the window waits for them (it never waits for absent ones).
    let _connections: Vec<_> = (0..64).map(|_| batcher.register()).collect();
    let tasks: Vec<_> = (0..64u64)
        .map(|k| {
            let (w, batcher) = (w.clone(), batcher.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0xB00 + k);
                // Few layers, so that jobs of the same layer meet in the queue.
                let linear = match k % 3 {
                    0 => LinearId::LM_HEAD,
                    1 => LinearId {
                        layer: 2,
                        kind: LinearKind::MlpDown,
                    },
                    _ => random_layer(&mut rng, &SMALL),
                };
                let rows = 1 + (rng.next() % 6) as usize;
                let x = rng.words(rows * linear.dims(&SMALL).0);
                // Stale contents and a wrong size in the reused output buffer must not matter.
                let (input, y) = batcher.submit(linear, x.clone(), vec![7; 3]).await.unwrap();
                assert_eq!(input, x, "job {k}: input handed back unchanged");
                assert_eq!(
                    y,
                    expected(&w, linear, &x),
                    "job {k}: {linear:?} x {rows} rows"
                );
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let s = batcher.stats();
    assert_eq!(s.jobs, 64);
    assert!(s.batches < s.jobs, "no batch formed: {s:?}");
    assert!(s.max_batch_jobs > 1, "{s:?}");
    assert!(s.max_batch_rows <= 8, "batch above max_rows: {s:?}");
}

/// Twelve clients over TCP, each a series of requests of random layers, rows and chunking, all at
/// once: every reply equals that client's own product.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_many_clients_get_exact_products_through_the_batched_server() {
    let w = weights(&SMALL, 2);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            window: Duration::from_millis(1),
            ..BatchConfig::default()
        },
    )
    .unwrap();
    let addr = start(&w, ServerConfig::default(), &batcher).await;
    const CLIENTS: u64 = 12;
    const REQUESTS: u32 = 16;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let w = w.clone();
            tokio::spawn(async move {
                let mut c = Client::hello(addr, &w).await;
                let mut rng = Rng(0xC0FFEE + k);
                for request in 0..REQUESTS {
                    let linear = random_layer(&mut rng, &SMALL);
                    let rows = 1 + (rng.next() % 8) as usize;
                    let x = rng.words(rows * linear.dims(&SMALL).0);
                    let chunk = [MAX_CHUNK_BYTES, 64, 4][(rng.next() % 3) as usize];
                    let y = c.compute(request, linear, &x, chunk).await;
                    assert_eq!(y, expected(&w, linear, &x), "client {k} request {request}");
                }
                c.bye().await;
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let s = batcher.stats();
    assert_eq!(s.jobs, CLIENTS * REQUESTS as u64, "{s:?}");
    assert_eq!(w.computed_requests(), CLIENTS * REQUESTS as u64);
}

/// Eight clients hammering the same layer with no window: while the one compute thread is busy,
/// requests queue up and the next batch takes them all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_batches_form_when_eight_clients_hammer_one_layer() {
    let w = weights(&WIDE, 3);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            threads: 1,
            ..BatchConfig::default()
        },
    )
    .unwrap();
    assert_eq!(
        batcher.config().window,
        Duration::ZERO,
        "no delay by default"
    );
    let addr = start(&w, ServerConfig::default(), &batcher).await;
    const CLIENTS: u64 = 8;
    const REQUESTS: u32 = 24;
    let clients: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let w = w.clone();
            tokio::spawn(async move {
                let mut c = Client::hello(addr, &w).await;
                let mut rng = Rng(0xF00D + k);
                for request in 0..REQUESTS {
                    let x = rng.words(WIDE.n_embd as usize);
                    let y = c
                        .compute(request, LinearId::LM_HEAD, &x, MAX_CHUNK_BYTES)
                        .await;
                    assert_eq!(y, expected(&w, LinearId::LM_HEAD, &x), "client {k}");
                }
                c.bye().await;
            })
        })
        .collect();
    for c in clients {
        c.await.unwrap();
    }
    let s = batcher.stats();
    assert_eq!(s.jobs, CLIENTS * REQUESTS as u64, "{s:?}");
    assert_eq!(s.rows, s.jobs, "one row per job");
    assert!(
        s.batches < s.jobs,
        "8 clients on one layer should share batches: {s:?}"
    );
    assert!(s.max_batch_rows > 1 && s.max_batch_rows <= CLIENTS, "{s:?}");
}

/// With batching, requests are validated exactly as without: the same refusals, and a bad client
/// never disturbs the others' batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_batched_server_refuses_bad_requests_with_the_same_codes() {
    let w = weights(&SMALL, 4);
    let batcher = Batcher::new(w.clone(), BatchConfig::default()).unwrap();
    let config = ServerConfig {
        max_rows: 4,
        ..ServerConfig::default()
    };
    let addr = start(&w, config, &batcher).await;

    let cases: [(Message<'_>, ErrorCode); 3] = [
        (
            Message::Compute {
                request: 1,
                linear: LinearId {
                    layer: 3,
                    kind: LinearKind::Qkv,
                },
                rows: 1,
            },
            ErrorCode::UnknownLayer,
        ),
        (
            Message::Compute {
                request: 2,
                linear: LinearId::LM_HEAD,
                rows: 5,
            },
            ErrorCode::TooManyRows,
        ),
        (
            Message::Compute {
                request: 3,
                linear: LinearId::LM_HEAD,
                rows: 0,
            },
            ErrorCode::TooManyRows,
        ),
    ];
    for (msg, code) in cases {
        let mut c = Client::hello(addr, &w).await;
        c.send(&msg).await;
        assert_eq!(c.recv().await, Some(Reply::Error(code)), "{msg:?}");
        assert_eq!(c.recv().await, None, "closed after the error");
    }

    // Too many words for the announced rows.
    let mut c = Client::hello(addr, &w).await;
    c.send(&Message::Compute {
        request: 4,
        linear: LinearId::LM_HEAD,
        rows: 1,
    })
    .await;
    let too_long = vec![0u8; (SMALL.n_embd as usize + 1) * 4];
    c.send(&Message::Data {
        words: WordBytes(&too_long),
    })
    .await;
    assert_eq!(
        c.recv().await,
        Some(Reply::Error(ErrorCode::WrongDataLength))
    );

    // The server still computes for good clients.
    let mut c = Client::hello(addr, &w).await;
    let x = Rng(9).words(3 * SMALL.n_embd as usize);
    let y = c.compute(5, LinearId::LM_HEAD, &x, MAX_CHUNK_BYTES).await;
    assert_eq!(y, expected(&w, LinearId::LM_HEAD, &x));
    c.bye().await;
    assert_eq!(
        batcher.stats().jobs,
        1,
        "refused requests never reach the batcher"
    );
}

/// A client that vanishes while its job is queued does not stall the batch or the thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_abandoned_jobs_do_not_stall_the_batcher() {
    let w = weights(&WIDE, 5);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            threads: 1,
            ..BatchConfig::default()
        },
    )
    .unwrap();
    // Submissions dropped before their answer (the handler's connection went away).
    for k in 0..16u64 {
        let x = Rng(k + 1).words(WIDE.n_embd as usize);
        let job = batcher.submit(LinearId::LM_HEAD, x, Vec::new());
        let _ = tokio::time::timeout(Duration::from_micros(50), job).await;
    }
    let x = Rng(99).words(2 * WIDE.n_embd as usize);
    let (_, y) = tokio::time::timeout(
        Duration::from_secs(20),
        batcher.submit(LinearId::LM_HEAD, x.clone(), Vec::new()),
    )
    .await
    .expect("answered")
    .unwrap();
    assert_eq!(y, expected(&w, LinearId::LM_HEAD, &x));
}
