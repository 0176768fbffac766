//! The client and the server connected by an in-memory pipe (no sockets): exact tokens, and what
//! the server receives is uniform noise that does not depend on the prompt.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::{generate_online, golden_model, reference};
use tokio_util::io::SyncIoBridge;
use veil_client::files::ModelFiles;
use veil_client::generate::GenOptions;
use veil_client::transport::Connection;
use veil_core::model::SamplingParams;
use veil_core::wire::{decode_body, Message, LEN_PREFIX};

/// A writer that keeps a copy of every byte: exactly what the server receives.
struct Recorder<W> {
    inner: W,
    log: Arc<Mutex<Vec<u8>>>,
}

impl<W: Write> Write for Recorder<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.log.lock().unwrap().extend_from_slice(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Generates privately over an in-memory duplex pipe; returns the tokens and every byte sent.
fn generate_over_pipe(dir: &Path, prompt: &[u32], key: u8, n: usize) -> (Vec<u32>, Vec<u8>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let weights = Arc::new(veil_server::ServerWeights::open_dir(dir).unwrap());
    let (client_end, server_end) = tokio::io::duplex(1 << 16);
    let server = rt.spawn(veil_server::handle_connection(
        server_end,
        weights,
        Default::default(),
    ));
    let (r, w) = tokio::io::split(client_end);
    let log = Arc::new(Mutex::new(Vec::new()));
    let files = ModelFiles::open(dir, true).unwrap();
    let reader = SyncIoBridge::new_with_handle(r, rt.handle().clone());
    let writer = Recorder {
        inner: SyncIoBridge::new_with_handle(w, rt.handle().clone()),
        log: log.clone(),
    };
    let settings = veil_core::wire::ClientSettings {
        fingerprint: files.fingerprint().unwrap(),
        psk: None,
    };
    let conn = Connection::handshake(reader, writer, settings, None).unwrap();
    let opts = GenOptions {
        max_new_tokens: n,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        eos: vec![],
        prefill_rows: 64,
        speculation: None,
    };
    let (tokens, _, conn) = generate_online(&files, conn, key, prompt, &opts);
    conn.bye();
    rt.block_on(server).unwrap().unwrap();
    let want = reference(&files, prompt, &opts);
    assert_eq!(
        tokens, want,
        "private generation over the pipe differs from the reference"
    );
    let bytes = log.lock().unwrap().clone();
    (tokens, bytes)
}

/// The payload bytes of every `Data` frame in a recorded client→server stream.
fn data_payloads(stream: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let len = u32::from_le_bytes(stream[at..at + LEN_PREFIX].try_into().unwrap()) as usize;
        let body = &stream[at + LEN_PREFIX..at + LEN_PREFIX + len];
        if let Message::Data { words } = decode_body(body).unwrap() {
            out.extend_from_slice(words.0);
        }
        at += LEN_PREFIX + len;
    }
    out
}

fn histogram(bytes: &[u8]) -> [f64; 256] {
    let mut h = [0f64; 256];
    for &b in bytes {
        h[b as usize] += 1.0;
    }
    h
}

/// Chi-square statistic of a byte histogram against the uniform distribution (255 degrees of
/// freedom: mean 255, and above 330 with probability 0.001).
fn chi_square_uniform(h: &[f64; 256]) -> f64 {
    let n: f64 = h.iter().sum();
    let e = n / 256.0;
    h.iter().map(|o| (o - e) * (o - e) / e).sum()
}

/// Two-sample chi-square: do two byte streams come from the same distribution?
fn chi_square_two_sample(a: &[f64; 256], b: &[f64; 256]) -> f64 {
    let (na, nb): (f64, f64) = (a.iter().sum(), b.iter().sum());
    let (ka, kb) = ((nb / na).sqrt(), (na / nb).sqrt());
    a.iter()
        .zip(b)
        .filter(|(x, y)| **x + **y > 0.0)
        .map(|(x, y)| (ka * x - kb * y).powi(2) / (x + y))
        .sum()
}

#[test]
fn in_memory_pair_generates_exact_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let (tokens, _) = generate_over_pipe(&dir, &[464, 2106, 286, 262, 7993, 8065], 1, 10);
    assert_eq!(tokens.len(), 10);
}

#[test]
fn server_bytes_are_uniform_and_independent_of_the_prompt() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    // Two very different prompts: repetitive text vs. mixed text. Each session has its own key,
    // as every real client session does.
    let a_prompt = [262u32; 12];
    let b_prompt = [
        15496u32, 11, 616, 1438, 318, 5395, 290, 314, 1842, 262, 5417, 13,
    ];
    let (_, a) = generate_over_pipe(&dir, &a_prompt, 1, 24);
    let (_, b) = generate_over_pipe(&dir, &b_prompt, 2, 24);
    let (pa, pb) = (data_payloads(&a), data_payloads(&b));
    assert!(
        pa.len() > 100_000,
        "only {} payload bytes recorded",
        pa.len()
    );
    let (ha, hb) = (histogram(&pa), histogram(&pb));
    let (ca, cb, cab) = (
        chi_square_uniform(&ha),
        chi_square_uniform(&hb),
        chi_square_two_sample(&ha, &hb),
    );
    println!("chi-square vs uniform: prompt A {ca:.1}, prompt B {cb:.1}; A vs B {cab:.1} (255 dof, p=0.001 at 330)");
    assert!(
        ca < 330.0 && cb < 330.0,
        "masked bytes are not uniform: {ca}, {cb}"
    );
    assert!(cab < 330.0, "masked bytes depend on the prompt: {cab}");
    for (payload, prompt) in [(&pa, &a_prompt[..]), (&pb, &b_prompt[..])] {
        let words: Vec<u32> = payload
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        // Plaintext int8 activations would all lie in [-127, 127]; uniform words almost never do.
        let int8_like = words
            .iter()
            .filter(|&&w| (w as i32).unsigned_abs() <= 127)
            .count();
        assert!(
            int8_like <= 1,
            "{int8_like} of {} words look like plaintext int8 activations",
            words.len()
        );
        let ids = words.iter().filter(|w| prompt.contains(w)).count();
        assert_eq!(
            ids, 0,
            "a token id appears in the bytes the server received"
        );
    }
}
