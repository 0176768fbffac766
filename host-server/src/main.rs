//! `veil-server`: serves Veil's int8 linear layers over masked rows.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use embedded_io_adapters::std::FromStd;
use veil_server::{serve_with, BatchConfig, Batcher, PskKey, ServerConfig, ServerWeights};

/// Veil's blind calculator: computes int8 linear layers over one-time-padded rows.
///
/// Loads only DIR/linear.veil (never client.veil: the server holds no biases, embeddings or
/// scales), prints its SHA-256 fingerprint (clients refuse a server whose fingerprint differs from
/// their own), and answers Compute requests from any number of clients until Ctrl-C.
#[derive(Debug, Parser)]
#[command(name = "veil-server", version)]
struct Args {
    /// Directory holding linear.veil (as written by veil-tools).
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,

    /// Address and port to listen on (use 0.0.0.0:PORT to accept remote clients).
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:7700")]
    listen: String,

    /// Most rows accepted in one request (announced to clients; bounds per-connection memory).
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    max_rows: u32,

    /// Most clients served at once; further clients are told the server is busy.
    #[arg(long, value_name = "N", default_value_t = 64,
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections: u32,

    /// Seconds to wait for a client's next frame before dropping the connection.
    #[arg(long, value_name = "SECS", default_value_t = 300,
          value_parser = clap::value_parser!(u64).range(1..))]
    idle_timeout_secs: u64,

    /// Offline-phase input ciphertexts one connection may send (`veil-client precompute
    /// --server`: each is 32 KiB up and costs this server `out · 8192` multiply-adds; a batch of
    /// 4096 distilgpt2 tokens needs 33 024). 0 turns the offline phase off.
    #[arg(long, value_name = "N", default_value_t = 1 << 20)]
    offline_inputs: u64,

    /// Do not send linear.veil to clients that ask for it (a client without the linear weights,
    /// e.g. a small device that precomputes through this server, needs them once to derive its
    /// secret check data; the weights are the model's public weights).
    #[arg(long)]
    no_serve_weights: bool,

    /// Offline layers computed at once, over all connections: each holds its layer's input
    /// ciphertexts in memory (`in · 64 KiB`: 192 MiB for distilgpt2's widest, 400 MiB for
    /// gpt2-xl's); other connections' layers wait their turn.
    #[arg(long, value_name = "N", default_value_t = 2,
          value_parser = clap::value_parser!(u64).range(1..))]
    offline_layers: u64,

    /// Pre-shared key file (hex text, or raw bytes; at least 16 bytes): clients must prove they
    /// hold the same key before anything is computed for them. Without it, anyone may connect.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,

    /// Multiply each request on its own instead of batching concurrent clients' rows for the same
    /// layer into one product.
    #[arg(long)]
    no_batching: bool,

    /// Threads computing batches (default: one per CPU).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    compute_threads: Option<u32>,

    /// Most rows in one batch.
    #[arg(long, value_name = "N", default_value_t = 256,
          value_parser = clap::value_parser!(u32).range(1..=1 << 20))]
    batch_max_rows: u32,

    /// Microseconds a compute thread waits for more rows of the same layer before running a batch
    /// (0: take whatever is waiting, never wait).
    #[arg(long, value_name = "MICROS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    batch_window_us: u64,

    /// Convoys (for many busy clients): microseconds to hold a layer's queued rows for a client
    /// answered a moment ago that is expected at that layer or just behind it, so that clients
    /// fall into step and share passes over the weights. Raises throughput with many clients; a
    /// client ahead of the others may wait up to this long per request. 0 (default): off.
    #[arg(long, value_name = "MICROS", default_value_t = 0,
          value_parser = clap::value_parser!(u64).range(0..=1_000_000))]
    batch_hold_us: u64,
}

/// Reads a `--psk-file` (hex text or raw bytes, at least 16 bytes) with core's reader, the one
/// `veil-client` uses too.
fn read_psk(path: &Path) -> anyhow::Result<PskKey> {
    let file =
        File::open(path).with_context(|| format!("cannot open the key file {}", path.display()))?;
    PskKey::read_from(&mut FromStd::new(file))
        .map_err(|e| anyhow::anyhow!("key file {}: {e}", path.display()))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let psk = args.psk_file.as_deref().map(read_psk).transpose()?;
    let weights = ServerWeights::open_dir(&args.weights)?;
    eprintln!("veil-server: model: {}", weights.describe());
    eprintln!(
        "veil-server: fingerprint (sha-256 of linear.veil): {}",
        weights.fingerprint_hex()
    );
    let config = ServerConfig {
        max_rows: args.max_rows,
        max_connections: args.max_connections as usize,
        idle_timeout: Duration::from_secs(args.idle_timeout_secs),
        psk,
        offline_inputs: args.offline_inputs,
        serve_weights: !args.no_serve_weights,
        offline_layers: veil_server::OfflineLimit::new(args.offline_layers as usize),
    };
    let per_conn = {
        let (widest_in, widest_out) = weights.config().widest_linear();
        config.max_rows as usize * (widest_in + widest_out) * 4
    };
    eprintln!(
        "veil-server: up to {} connections, {} rows per request (≤ {} KiB of row buffers each)",
        config.max_connections,
        config.max_rows,
        per_conn.div_ceil(1024)
    );
    if config.psk.is_some() {
        eprintln!("veil-server: pre-shared key set: only clients that hold it are served");
    } else {
        eprintln!("veil-server: no pre-shared key: any client that reaches this address is served");
    }

    let weights = Arc::new(weights);
    let batcher = if args.no_batching {
        eprintln!("veil-server: batching off: each request is multiplied on its own");
        None
    } else {
        let defaults = BatchConfig::default();
        let batch = BatchConfig {
            threads: args
                .compute_threads
                .map_or(defaults.threads, |n| n as usize),
            max_rows: args.batch_max_rows as usize,
            window: Duration::from_micros(args.batch_window_us),
            hold: Duration::from_micros(args.batch_hold_us),
            ..defaults
        };
        let batcher = Batcher::new(weights.clone(), batch).context("cannot start batching")?;
        let b = batcher.config();
        eprintln!(
            "veil-server: batching concurrent requests per layer on {} threads \
             (≤ {} rows, ≤ {} input words, window {:?})",
            b.threads, b.max_rows, b.max_input_words, b.window
        );
        Some(batcher)
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        let addr = listener.local_addr().context("listener address")?;
        eprintln!("veil-server: listening on {addr} (Ctrl-C to stop)");
        let shutdown = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                eprintln!("veil-server: cannot watch for Ctrl-C ({e}); stop with a signal instead");
                std::future::pending::<()>().await;
            }
        };
        serve_with(listener, weights, config, batcher, shutdown).await;
        anyhow::Ok(())
    })?;
    // Requests in flight get a moment to finish their product; then the process exits.
    runtime.shutdown_timeout(Duration::from_secs(2));
    eprintln!("veil-server: stopped");
    Ok(())
}
