//! Load on loopback: 16 clients generate 64 tokens each at once against one in-process
//! `veil-server` (golden tiny model); every client's tokens equal the local reference, and the
//! process RSS is reported.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::{connect, generate_online, golden_model, reference, start_server, PROMPTS};
use veil_client::files::ModelFiles;
use veil_client::generate::GenOptions;
use veil_core::model::SamplingParams;
use veil_server::ServerConfig;

const CLIENTS: usize = PROMPTS.len();
const TOKENS: usize = 64;

/// A `/proc/self/status` field in KiB.
fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn opts() -> GenOptions {
    GenOptions {
        max_new_tokens: TOKENS,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        eos: vec![],
        prefill_rows: 64,
        speculation: None,
    }
}

/// Runs the clients at once; each returns (private tokens, reference tokens).
fn clients(dir: &Path, prompts: &[Vec<u32>], addr: SocketAddr) -> Vec<(Vec<u32>, Vec<u32>)> {
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, prompt)| {
                let dir = &dir;
                s.spawn(move || {
                    let files = ModelFiles::open(dir, true).unwrap();
                    let got = private(&files, addr, prompt, 0x40 + i as u8);
                    let want = reference(&files, prompt, &opts());
                    (got, want)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// One client: its own connection and mask key, 64 greedy tokens privately.
fn private(files: &ModelFiles, addr: SocketAddr, prompt: &[u32], key: u8) -> Vec<u32> {
    let conn = connect(addr, files);
    let (tokens, _, conn) = generate_online(files, conn, key, prompt, &opts());
    conn.bye();
    tokens
}

#[test]
fn sixteen_clients_times_64_tokens_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompts: Vec<Vec<u32>> = PROMPTS
        .iter()
        .map(|p| tok.encode(*p, false).unwrap().get_ids().to_vec())
        .collect();

    // The server runs in this process (its own runtime and threads), beside the 16 clients: the
    // RSS figures below are server and clients together, and the growth over the run bounds the
    // server's share from above.
    let rss_start = status_kib("VmRSS");
    let server = start_server(&dir, ServerConfig::default());
    let rss_server = status_kib("VmRSS");

    // VmHWM covers the quantization above too: sample the peak of the run itself.
    let running = AtomicBool::new(true);
    let started = Instant::now();
    let (results, rss_peak) = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            let mut peak = 0;
            while running.load(Ordering::Relaxed) {
                peak = peak.max(status_kib("VmRSS"));
                std::thread::sleep(Duration::from_millis(10));
            }
            peak
        });
        let results = clients(&dir, &prompts, server.addr);
        running.store(false, Ordering::Relaxed);
        (results, sampler.join().unwrap())
    });
    let elapsed = started.elapsed();
    let rss_end = status_kib("VmRSS");

    for (i, (got, want)) in results.iter().enumerate() {
        assert_eq!(want.len(), TOKENS, "client {i}: reference length");
        assert_eq!(got, want, "client {i} ({:?})", PROMPTS[i]);
    }
    println!(
        "load: {CLIENTS} clients x {TOKENS} tokens, all equal to the reference, in {elapsed:.1?} \
         ({} requests computed by the server)",
        server.weights.computed_requests()
    );
    println!(
        "load: process RSS (server in-process with the clients): {rss_start} KiB at start, \
         {rss_server} KiB with the server listening, {rss_end} KiB after the run, \
         peak {rss_peak} KiB sampled during the run (VmHWM {} KiB includes the quantization)",
        status_kib("VmHWM"),
    );
}
