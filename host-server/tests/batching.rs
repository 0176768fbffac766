//! Continuous batching: concurrent clients' rows for the same layer share one product, and every
//! job still gets exactly the products of its own rows.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use common::{expected, random_weights, spawn_server, FrameReader, Rng};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use veil_core::model::{LinearId, LinearKind, ModelConfig};
use veil_core::wire::{
    decode_body, encode_frame, ErrorCode, Message, WordBytes, LEN_PREFIX, MAX_CHUNK_BYTES,
    MAX_FRAME_BODY, PROTOCOL_VERSION,
};
use veil_server::{BatchConfig, Batcher, Registration, ServerConfig, ServerWeights};

/// Small: many layers of different shapes, cheap products.
const SMALL: ModelConfig = ModelConfig {
    n_layer: 3,
    n_embd: 16,
    n_head: 2,
    n_positions: 16,
    vocab_size: 100,
    n_inner: 64,
    family: veil_core::model::Family::Gpt2,
};

/// Wide enough that one LM-head row takes a while, so requests queue behind a busy thread.
const WIDE: ModelConfig = ModelConfig {
    n_layer: 1,
    n_embd: 256,
    n_head: 4,
    n_positions: 16,
    vocab_size: 8192,
    n_inner: 256,
    family: veil_core::model::Family::Gpt2,
};

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
    frames: FrameReader,
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
            frames: FrameReader::new(),
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
        let n = encode_frame(msg, &mut self.buf).unwrap();
        self.s.write_all(&self.buf[..n]).await.unwrap();
    }

    async fn recv_raw(&mut self) -> Option<Vec<u8>> {
        tokio::time::timeout(Duration::from_secs(20), self.frames.next(&mut self.s))
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

/// Submits rows `x` for `linear` as connection `me` does: in buffers longer than the job (a
/// connection's buffers are sized for its largest request), with stale contents; returns the
/// job's products, after checking that the rest of both buffers came back untouched.
async fn submit(
    batcher: &Batcher,
    me: &Registration,
    w: &ServerWeights,
    linear: LinearId,
    x: &[u32],
) -> Vec<u32> {
    let (i, o) = linear.dims(w.config());
    let rows = x.len() / i;
    let mut input = x.to_vec();
    input.extend([0xDEAD_BEEF; 11]);
    let output = vec![7u32; rows * o + 5];
    let (input, output) = batcher
        .submit_as(me, linear, rows, input, output)
        .await
        .unwrap();
    assert_eq!(&input[..x.len()], x, "input handed back unchanged");
    assert_eq!(input[x.len()..], [0xDEAD_BEEF; 11]);
    assert_eq!(
        output[rows * o..],
        [7; 5],
        "nothing written beyond the job's products"
    );
    output[..rows * o].to_vec()
}

/// Serves `w` on loopback with `batcher` until the test's runtime ends.
async fn start(w: &Arc<ServerWeights>, config: ServerConfig, batcher: &Batcher) -> SocketAddr {
    let forever = std::future::pending::<()>();
    let (addr, _task) = spawn_server(w.clone(), config, Some(batcher.clone()), forever).await;
    addr
}

/// Jobs of every layer and 1–6 rows submitted at once to one thread with a window: they are
/// batched across jobs, and each gets exactly its own rows' products.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_concurrent_jobs_of_mixed_layers_each_get_their_own_products() {
    let w = random_weights(&SMALL, 1);
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
    let connections: Vec<_> = (0..64).map(|_| batcher.register()).collect();
    let tasks: Vec<_> = (0..64u64)
        .zip(connections)
        .map(|(k, me)| {
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
                // Stale contents and longer buffers than the job must not matter.
                let y = submit(&batcher, &me, &w, linear, &x).await;
                assert_eq!(
                    y,
                    expected(w.bytes(), linear, &x),
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
    let w = random_weights(&SMALL, 2);
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
                    assert_eq!(
                        y,
                        expected(w.bytes(), linear, &x),
                        "client {k} request {request}"
                    );
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
    let w = random_weights(&WIDE, 3);
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
                    assert_eq!(y, expected(w.bytes(), LinearId::LM_HEAD, &x), "client {k}");
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
    let w = random_weights(&SMALL, 4);
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
    assert_eq!(y, expected(w.bytes(), LinearId::LM_HEAD, &x));
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
    let w = random_weights(&WIDE, 5);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            threads: 1,
            ..BatchConfig::default()
        },
    )
    .unwrap();
    // Submissions dropped before their answer (the handler's connection went away).
    let out = WIDE.vocab_size as usize;
    for k in 0..16u64 {
        let gone = batcher.register();
        let x = Rng(k + 1).words(WIDE.n_embd as usize);
        let job = batcher.submit_as(&gone, LinearId::LM_HEAD, 1, x, vec![0; out]);
        let _ = tokio::time::timeout(Duration::from_micros(50), job).await;
    }
    let me = batcher.register();
    let x = Rng(99).words(2 * WIDE.n_embd as usize);
    let y = tokio::time::timeout(
        Duration::from_secs(20),
        submit(&batcher, &me, &w, LinearId::LM_HEAD, &x),
    )
    .await
    .expect("answered");
    assert_eq!(y, expected(w.bytes(), LinearId::LM_HEAD, &x));
}

/// One decode step's requests in order: every block's four layers, then the LM head.
fn decode_step(cfg: &ModelConfig) -> Vec<LinearId> {
    let mut v: Vec<LinearId> = (0..cfg.n_layer as u16)
        .flat_map(|layer| LinearKind::BLOCK.map(|kind| LinearId { layer, kind }))
        .collect();
    v.push(LinearId::LM_HEAD);
    v
}

/// Batches above the sharing size are cut into one share of output channels per thread; every
/// job still gets exactly its own products (shares of different batches interleave freely).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_batches_shared_among_threads_give_exact_products() {
    let w = random_weights(&SMALL, 7);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            threads: 3,
            max_rows: 8,
            share_min_macs: 0, // share every batch, even one row of the smallest layer
            window: Duration::from_millis(5),
            ..BatchConfig::default()
        },
    )
    .unwrap();
    let connections: Vec<_> = (0..48).map(|_| batcher.register()).collect();
    let tasks: Vec<_> = (0..48u64)
        .zip(connections)
        .map(|(k, me)| {
            let (w, batcher) = (w.clone(), batcher.clone());
            tokio::spawn(async move {
                let mut rng = Rng(0x5A4E + k);
                for _ in 0..4 {
                    let linear = random_layer(&mut rng, &SMALL);
                    let rows = 1 + (rng.next() % 5) as usize;
                    let x = rng.words(rows * linear.dims(&SMALL).0);
                    let y = submit(&batcher, &me, &w, linear, &x).await;
                    assert_eq!(y, expected(w.bytes(), linear, &x), "job {k}: {linear:?}");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(batcher.stats().jobs, 48 * 4);
}

/// With a convoy hold, a lone client is never held for its own expected arrival: a hold of
/// seconds per request would show at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_lone_client_is_never_held() {
    let w = random_weights(&SMALL, 8);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            hold: Duration::from_secs(5),
            ..BatchConfig::default()
        },
    )
    .unwrap();
    let me = batcher.register();
    let steps = decode_step(&SMALL);
    let mut rng = Rng(0x10E);
    let run = async {
        for _ in 0..3 {
            for &linear in &steps {
                let x = rng.words(linear.dims(&SMALL).0);
                let y = submit(&batcher, &me, &w, linear, &x).await;
                assert_eq!(y, expected(w.bytes(), linear, &x));
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(4), run)
        .await
        .expect("a lone client waited on its own hold");
}

/// Clients that start at different points of the decode step fall into step under a hold: most
/// of their requests end up in batches with others (without it, the chance meetings of random
/// phases leave them mostly alone), and every product is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_clients_fall_into_a_convoy_under_a_hold() {
    let w = random_weights(&SMALL, 9);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            threads: 1,
            // Generous for a loaded machine; a client that has finished is only timed out.
            hold: Duration::from_millis(100),
            ..BatchConfig::default()
        },
    )
    .unwrap();
    const CLIENTS: u64 = 4;
    let steps = decode_step(&SMALL);
    let tasks: Vec<_> = (0..CLIENTS)
        .map(|k| {
            let (w, batcher, steps) = (w.clone(), batcher.clone(), steps.clone());
            tokio::spawn(async move {
                let me = batcher.register();
                let mut rng = Rng(0xC0 + k);
                // Start k/4 of the way through a step: the clients begin out of phase.
                let start = k as usize * steps.len() / CLIENTS as usize;
                for i in 0..6 * steps.len() {
                    let linear = steps[(start + i) % steps.len()];
                    let x = rng.words(linear.dims(&SMALL).0);
                    let y = submit(&batcher, &me, &w, linear, &x).await;
                    assert_eq!(y, expected(w.bytes(), linear, &x), "client {k}: {linear:?}");
                }
            })
        })
        .collect();
    tokio::time::timeout(Duration::from_secs(120), async {
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await
    .expect("the convoy stalled");
    let s = batcher.stats();
    assert_eq!(s.jobs, CLIENTS * 6 * steps.len() as u64);
    let mean = s.jobs as f64 / s.batches as f64;
    assert!(
        mean >= 2.0,
        "mean batch of {mean:.2} jobs: no convoy formed ({s:?})"
    );
}

/// A client that leaves is not waited for: once its registration drops, the jobs its expected
/// return held run at once (with a 5 s hold, a wait would show).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_a_departed_client_is_not_waited_for() {
    let w = random_weights(&SMALL, 10);
    let batcher = Batcher::new(
        w.clone(),
        BatchConfig {
            hold: Duration::from_secs(5),
            ..BatchConfig::default()
        },
    )
    .unwrap();
    let steps = decode_step(&SMALL);
    let mut rng = Rng(0xDE9);
    // A is answered at step 0, so it is expected at step 1 ...
    let a = batcher.register();
    let x = rng.words(steps[0].dims(&SMALL).0);
    submit(&batcher, &a, &w, steps[0], &x).await;
    // ... and B, at step 2 (just ahead of A), would wait for it; but A leaves.
    drop(a);
    let b = batcher.register();
    let linear = steps[2];
    let x = rng.words(linear.dims(&SMALL).0);
    let y = tokio::time::timeout(Duration::from_secs(3), submit(&batcher, &b, &w, linear, &x))
        .await
        .expect("held for a client that had left");
    assert_eq!(y, expected(w.bytes(), linear, &x));
}
