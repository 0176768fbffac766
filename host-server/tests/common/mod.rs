// Each test binary compiles this module on its own and uses only a subset of these helpers.
#![allow(dead_code)]
//! Helpers shared by the veil-server integration tests: deterministic randomness, random models,
//! the reference product every reply is checked against, and a server on loopback.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use veil_core::kernels::matmul_u32_i8;
use veil_core::model::format::{encode_linear_header, LinearLayout, HEADER_LEN};
use veil_core::model::{LinearId, LinearWeights, ModelConfig};
use veil_core::wire::{encode_frame, FrameDecoder, LEN_PREFIX, MAX_FRAME};
use veil_server::{serve, serve_with, Batcher, ServerConfig, ServerWeights};

/// xorshift64*: deterministic test randomness without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// `n` random words (the high halves of [`Rng::next`]).
    pub fn words(&mut self, n: usize) -> Vec<u32> {
        (0..n).map(|_| (self.next() >> 32) as u32).collect()
    }
    /// A number below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    /// `n` random bytes.
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    /// One of `xs`.
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.below(xs.len() as u64) as usize]
    }
}

/// The bytes of a `linear.veil` of shape `cfg` with random int8 weights (full range, including
/// -128, so that products exercise every weight the format allows). Checked to parse.
pub fn random_linear(cfg: &ModelConfig, seed: u64) -> Vec<u8> {
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
    LinearWeights::parse(&bytes).expect("test model parses");
    bytes
}

/// [`random_linear`] loaded in memory as the server loads it.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> Arc<ServerWeights> {
    Arc::new(ServerWeights::from_bytes(random_linear(cfg, seed)).unwrap())
}

/// The product of rows `x` with layer `id` of the `linear.veil` in `bytes`, computed alone with
/// `matmul_u32_i8`: the reference every reply of the server (batched or not) must equal.
pub fn expected(bytes: &[u8], id: LinearId, x: &[u32]) -> Vec<u32> {
    let w = LinearWeights::parse(bytes).unwrap();
    let (i, o) = id.dims(w.config());
    let mut y = vec![0u32; x.len() / i * o];
    matmul_u32_i8(x, w.matrix(id), i, o, &mut y);
    y
}

/// Serves `weights` on 127.0.0.1 (an OS-chosen port) in a task of the current runtime until
/// `shutdown` completes; returns the address and the task. With `batcher`, through
/// [`serve_with`] (the test chooses its limits or reads its stats); without, through [`serve`],
/// which starts its own default batcher, as `main` does.
pub async fn spawn_server(
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    batcher: Option<Batcher>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = match batcher {
        Some(b) => tokio::spawn(serve_with(listener, weights, config, Some(b), shutdown)),
        None => tokio::spawn(serve(listener, weights, config, shutdown)),
    };
    (addr, task)
}

/// Frames from the server, rebuilt from socket reads by core's [`FrameDecoder`] (the one frame
/// reader). No timeout here: each client puts its own around [`FrameReader::next`].
pub struct FrameReader(FrameDecoder<Vec<u8>>);

impl FrameReader {
    pub fn new() -> Self {
        FrameReader(FrameDecoder::new(vec![0u8; MAX_FRAME]).unwrap())
    }

    /// The next frame's body, or `None` once the server has closed (or reset) the connection. A
    /// frame that does not decode (oversized, empty, not a message) fails the test: a server never
    /// sends one.
    pub async fn next(&mut self, s: &mut TcpStream) -> Option<Vec<u8>> {
        loop {
            if let Some(m) = self.0.next_message() {
                let m = m.expect("the server sends only valid frames");
                let mut buf = vec![0u8; MAX_FRAME];
                let n = encode_frame(&m, &mut buf).unwrap();
                return Some(buf[LEN_PREFIX..n].to_vec());
            }
            let n = s.read(self.0.spare()).await.ok()?;
            if n == 0 {
                return None;
            }
            self.0.filled(n);
        }
    }
}
