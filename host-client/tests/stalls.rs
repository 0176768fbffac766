//! What a new user hits when a server misbehaves or a pool runs out, through the real binary:
//! a server that accepts and then says nothing makes `veil-client` fail within its timeout with a
//! message that says so (never hang), `--retries` moves on to a new connection that works, and an
//! exhausted pool prints its advice, not a Debug dump.

mod common;

use std::io::Read as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{golden_model, reference, splice_client, start_server};
use veil_client::files::ModelFiles;
use veil_client::generate::GenOptions;
use veil_core::model::SamplingParams;
use veil_server::ServerConfig;

const PROMPT: &str = "The history of the Roman Empire";

/// A listener whose first `silent` connections are accepted and then ignored (held open, never
/// read or answered: a stalled server), and whose later ones are forwarded to `server` (if any).
/// Counts the connections it accepted.
fn stalling_server(silent: usize, server: Option<SocketAddr>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        let mut held: Vec<TcpStream> = vec![];
        loop {
            let n = count.load(Ordering::SeqCst);
            match server {
                Some(upstream) if n >= silent => {
                    let (mut u_read, mut c_write) =
                        splice_client(listener.try_clone().unwrap(), upstream);
                    count.fetch_add(1, Ordering::SeqCst);
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut u_read, &mut c_write);
                    });
                }
                _ => {
                    let Ok((s, _)) = listener.accept() else {
                        return;
                    };
                    count.fetch_add(1, Ordering::SeqCst);
                    held.push(s);
                }
            }
        }
    });
    (addr, accepted)
}

fn client(dir: &std::path::Path, server: SocketAddr, extra: &[&str]) -> (Output, Duration) {
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_veil-client"))
        .arg("--weights")
        .arg(dir)
        .args(["--server", &server.to_string(), "--prompt", PROMPT])
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out, t0.elapsed())
}

#[test]
fn a_silent_server_times_out_with_a_message_and_retries_move_on() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());

    // Accepts, never answers, no retries: fails within the timeout (plus start-up), saying so.
    let (addr, accepted) = stalling_server(usize::MAX, None);
    let (out, took) = client(&dir, addr, &["--timeout-secs", "1", "--retries", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(took < Duration::from_secs(20), "took {took:?}");
    assert!(err.contains("did not answer in time"), "{err}");
    assert!(err.contains("during the handshake"), "{err}");
    assert!(err.contains("--timeout-secs"), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 1);

    // With retries, each attempt times out and a new connection is tried.
    let (addr, accepted) = stalling_server(usize::MAX, None);
    let (out, _) = client(&dir, addr, &["--timeout-secs", "1", "--retries", "2"]);
    assert!(!out.status.success());
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        3,
        "one connection and two retries"
    );

    // The first connection stalls, the next reaches a real server: the generation completes on
    // it and equals the local reference.
    let server = start_server(&dir, ServerConfig::default());
    let (addr, accepted) = stalling_server(1, Some(server.addr));
    let (out, _) = client(
        &dir,
        addr,
        &[
            "--timeout-secs",
            "1",
            "--retries",
            "1",
            "--max-new-tokens",
            "8",
            "--json",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    assert_eq!(tokens_of(&out), reference_of(&dir, 8));
}

/// The tokens of a `--json` run.
fn tokens_of(out: &Output) -> Vec<u32> {
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

/// The local reference's greedy tokens for [`PROMPT`], as the binary generates them.
fn reference_of(dir: &std::path::Path, n: usize) -> Vec<u32> {
    let files = ModelFiles::open(dir, true).unwrap();
    let ids = files
        .tokenizer()
        .unwrap()
        .encode(PROMPT, false)
        .unwrap()
        .get_ids()
        .to_vec();
    let o = GenOptions {
        max_new_tokens: n,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        eos: vec![files.client().unwrap().header().eos_token_id],
        prefill_rows: 64,
        speculation: None,
    };
    reference(&files, &ids, &o)
}

/// A server that answers the handshake and then stalls in the middle of the generation: the
/// client's read times out during a request, reconnects and finishes.
#[test]
fn a_server_stalling_mid_generation_is_left_for_a_new_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let upstream = server.addr;
    // A proxy that forwards the first connection's first 8 KiB from the server and then goes
    // silent (holding both sockets open); later connections are forwarded whole.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut first = true;
        let mut held = vec![];
        loop {
            let (mut u_read, mut c_write) = splice_client(listener.try_clone().unwrap(), upstream);
            let stall = std::mem::replace(&mut first, false);
            let (u, c) = (u_read.try_clone().unwrap(), c_write.try_clone().unwrap());
            held.push((u, c));
            std::thread::spawn(move || {
                use std::io::Write as _;
                let mut sent = 0usize;
                let mut buf = [0u8; 4096];
                loop {
                    let Ok(n) = u_read.read(&mut buf) else { return };
                    if n == 0 {
                        return;
                    }
                    if stall && sent + n > 8192 {
                        // Silent from here on; the sockets stay open (held above).
                        std::thread::sleep(Duration::from_secs(60));
                        return;
                    }
                    if c_write.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    sent += n;
                }
            });
        }
    });
    let (out, took) = client(
        &dir,
        addr,
        &[
            "--timeout-secs",
            "1",
            "--retries",
            "1",
            "--max-new-tokens",
            "6",
            "--json",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("did not answer in time (waiting for the reply to request"),
        "{err}"
    );
    assert!(took < Duration::from_secs(30), "took {took:?}");
    assert_eq!(tokens_of(&out), reference_of(&dir, 6));
}

#[test]
fn an_exhausted_pool_prints_the_advice_not_a_debug_dump() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let pool = tmp.path().join("small.pool");
    let bin = env!("CARGO_BIN_EXE_veil-client");
    let status = Command::new(bin)
        .args(["precompute", "--weights"])
        .arg(&dir)
        .arg("--pool")
        .arg(&pool)
        .args(["--tokens", "3"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let pool_arg = pool.to_str().unwrap();
    let (out, _) = client(
        &dir,
        server.addr,
        &[
            "--mask-source",
            "pool",
            "--pool",
            pool_arg,
            "--max-new-tokens",
            "4",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is exhausted"), "{err}");
    assert!(err.contains("run `veil-client precompute`"), "{err}");
    assert!(
        !err.contains("Exhausted {"),
        "a Debug dump reached the user: {err}"
    );
}
