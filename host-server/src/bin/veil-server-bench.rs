//! `veil-server-bench`: server decode throughput with concurrent clients, batching on and off.
//!
//! Starts the server in this process on loopback and runs simulated decode clients, each on its
//! own thread and connection: per token the 25 (for distilgpt2) requests of one decode step, every
//! block's Qkv, AttnOut, MlpUp and MlpDown then the LM head, one row of random words each (the
//! server cannot tell them from masked rows). Prints one JSON line per run:
//! `{"batching", "hold_us", "clients", "tokens_per_s_total", "tokens_per_s_per_client", "speedup_vs_1",
//! "batches", "jobs", ...}`; `speedup_vs_1` compares with the first run (of the same batching
//! mode) in the `--clients` list.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use veil_core::mask::MaskedRows;
use veil_core::model::{LinearId, LinearKind, ModelConfig};
use veil_core::wire::{ClientConnection, ClientEvent, ClientSettings, MAX_FRAME};
use veil_server::{serve_with, BatchConfig, Batcher, ServerConfig, ServerWeights};

/// Decode throughput of an in-process veil-server with N concurrent simulated clients.
#[derive(Debug, Parser)]
#[command(name = "veil-server-bench")]
struct Args {
    /// Directory holding linear.veil (e.g. weights/synth-distilgpt2).
    #[arg(long, value_name = "DIR", default_value = "weights/synth-distilgpt2")]
    weights: PathBuf,

    /// Client counts to run, in order; the first is the baseline of `speedup_vs_1`.
    #[arg(
        long,
        value_name = "N,..",
        value_delimiter = ',',
        default_value = "1,8"
    )]
    clients: Vec<usize>,

    /// Seconds per run (after one warm-up token per client).
    #[arg(long, value_name = "SECS", default_value_t = 10.0)]
    secs: f64,

    /// Which server: with batching, without, or both (each run list once).
    #[arg(long, value_enum, default_value_t = Mode::Both)]
    mode: Mode,

    /// Batching compute threads (default: one per CPU).
    #[arg(long, value_name = "N")]
    compute_threads: Option<usize>,

    /// Batching window in microseconds (0: take whatever is waiting).
    #[arg(long, value_name = "MICROS", default_value_t = 0)]
    window_us: u64,

    /// Convoy hold in microseconds (see `veil-server --batch-hold-us`; 0: off).
    #[arg(long, value_name = "MICROS", default_value_t = 0)]
    hold_us: u64,

    /// Async runtime worker threads of the server (default: one per CPU).
    #[arg(long, value_name = "N")]
    runtime_threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Batched,
    Unbatched,
    Both,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.clients.is_empty() || args.clients.contains(&0) {
        bail!("--clients needs at least one positive count");
    }
    let weights = Arc::new(ServerWeights::open_dir(&args.weights)?);
    eprintln!("veil-server-bench: model: {}", weights.describe());
    let modes: &[bool] = match args.mode {
        Mode::Batched => &[true],
        Mode::Unbatched => &[false],
        Mode::Both => &[false, true],
    };
    for &batching in modes {
        let mut runtime = tokio::runtime::Builder::new_multi_thread();
        if let Some(n) = args.runtime_threads {
            runtime.worker_threads(n.max(1));
        }
        let runtime = runtime
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let batcher = if batching {
            let defaults = BatchConfig::default();
            let config = BatchConfig {
                threads: args.compute_threads.unwrap_or(defaults.threads),
                window: Duration::from_micros(args.window_us),
                hold: Duration::from_micros(args.hold_us),
                ..defaults
            };
            Some(Batcher::new(weights.clone(), config)?)
        } else {
            None
        };
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
        let addr = listener.local_addr()?;
        let max_clients = args.clients.iter().copied().max().unwrap_or(1);
        let config = ServerConfig {
            max_connections: max_clients + 1,
            ..ServerConfig::default()
        };
        runtime.spawn(serve_with(
            listener,
            weights.clone(),
            config,
            batcher.clone(),
            std::future::pending::<()>(),
        ));

        let mut baseline = None;
        for &clients in &args.clients {
            // Counters as the timed part starts (after the warm-up tokens) and after it.
            let snapshot = || {
                let stats = batcher.as_ref().map(Batcher::stats).unwrap_or_default();
                (stats, weights.computed_requests())
            };
            let secs = Duration::from_secs_f64(args.secs);
            let (run, (before, computed_before)) =
                run_clients(addr, &weights, clients, secs, &snapshot)?;
            let (after, computed_after) = snapshot();
            let total = run.tokens as f64 / run.elapsed.as_secs_f64();
            let base = *baseline.get_or_insert(total / clients as f64);
            let jobs = computed_after - computed_before;
            let batches = if batching {
                after.batches - before.batches
            } else {
                jobs
            };
            let hold_us = if batching { args.hold_us } else { 0 };
            println!(
                "{{\"batching\":{batching},\"hold_us\":{hold_us},\"clients\":{clients},\"secs\":{:.2},\"tokens\":{},\
                 \"tokens_per_s_total\":{total:.3},\"tokens_per_s_per_client\":{:.3},\
                 \"speedup_vs_1\":{:.3},\"batches\":{batches},\"jobs\":{jobs},\
                 \"max_batch_rows\":{},\"ms_per_token_p50\":{:.2}}}",
                run.elapsed.as_secs_f64(),
                run.tokens,
                total / clients as f64,
                total / base,
                after.max_batch_rows,
                run.p50_ms,
            );
        }
        drop(batcher);
        runtime.shutdown_timeout(Duration::from_secs(2));
    }
    Ok(())
}

struct Run {
    tokens: u64,
    elapsed: Duration,
    p50_ms: f64,
}

/// `clients` threads each decode tokens for `secs` after a common start; also returns what
/// `at_start` saw at that start.
fn run_clients<T>(
    addr: SocketAddr,
    weights: &ServerWeights,
    clients: usize,
    secs: Duration,
    at_start: &dyn Fn() -> T,
) -> anyhow::Result<(Run, T)> {
    let cfg = *weights.config();
    let fingerprint = weights.fingerprint();
    let start = Arc::new(Barrier::new(clients + 1));
    let handles: Vec<_> = (0..clients)
        .map(|k| {
            let start = start.clone();
            std::thread::spawn(move || -> anyhow::Result<(u64, Duration, Vec<Duration>)> {
                // Connect and decode one warm-up token; meet the others at the start either way.
                let ready = Client::connect(addr, fingerprint, 0x5EED + k as u64)
                    .and_then(|mut c| c.token(&cfg).map(|()| c));
                start.wait();
                let mut c = ready.context("connect and warm up")?;
                let t0 = Instant::now();
                let mut times = Vec::new();
                while t0.elapsed() < secs {
                    let t = Instant::now();
                    c.token(&cfg)?;
                    times.push(t.elapsed());
                }
                c.bye()?;
                Ok((times.len() as u64, t0.elapsed(), times))
            })
        })
        .collect();
    start.wait();
    let started = at_start();
    let mut tokens = 0;
    let mut elapsed = Duration::ZERO;
    let mut times = Vec::new();
    for h in handles {
        let (n, e, t) = h
            .join()
            .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
        tokens += n;
        elapsed = elapsed.max(e);
        times.extend(t);
    }
    times.sort();
    let p50_ms = times
        .get(times.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3);
    Ok((
        Run {
            tokens,
            elapsed,
            p50_ms,
        },
        started,
    ))
}

/// A blocking client sending random rows: core's `ClientConnection` (the conversation, written
/// once) driven over a `TcpStream`.
struct Client {
    s: TcpStream,
    conn: ClientConnection<Box<[u8]>>,
    tx: Vec<u8>,
    /// Random words (the server cannot tell them from masked rows), enough for inputs up to
    /// 4096 words (distilgpt2: 3072).
    row: Vec<u32>,
    /// Products of the request in flight (up to the widest output, the vocabulary).
    reply: Vec<u32>,
}

impl Client {
    fn connect(addr: SocketAddr, fingerprint: [u8; 32], seed: u64) -> anyhow::Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        let mut x = seed | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let row = (0..4096).map(|_| next() as u32).collect();
        let mut nonce = [0u8; 32];
        for b in &mut nonce {
            *b = next() as u8;
        }
        let settings = ClientSettings {
            fingerprint,
            psk: None,
        };
        let mut c = Client {
            s,
            conn: ClientConnection::new(settings, nonce, vec![0u8; MAX_FRAME].into_boxed_slice())
                .map_err(|e| anyhow::anyhow!("{e}"))?,
            tx: vec![0u8; 2 * MAX_FRAME],
            row,
            reply: Vec::new(),
        };
        c.flush()?;
        match c.event(0)? {
            ClientEvent::Connected { .. } => Ok(c),
            other => bail!("expected to connect, got {other:?}"),
        }
    }

    /// Writes the control frames due (hello, bye).
    fn flush(&mut self) -> anyhow::Result<()> {
        loop {
            let n = self.conn.poll_transmit(&mut self.tx);
            if n == 0 {
                return Ok(());
            }
            self.s.write_all(&self.tx[..n])?;
        }
    }

    /// Reads until the next event; products land in `reply[..reply_words]`.
    fn event(&mut self, reply_words: usize) -> anyhow::Result<ClientEvent> {
        if self.reply.len() < reply_words {
            self.reply.resize(reply_words, 0);
        }
        let mut n = 0;
        loop {
            match self.conn.handle_received(n, &mut self.reply[..reply_words]) {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {}
                Err(e) => bail!("{e}"),
            }
            n = self.s.read(self.conn.recv_buffer())?;
            if n == 0 {
                bail!("{}", self.conn.handle_eof());
            }
        }
    }

    /// One decode step: every linear layer once, one row each.
    fn token(&mut self, cfg: &ModelConfig) -> anyhow::Result<()> {
        for layer in 0..cfg.n_layer as u16 {
            for kind in LinearKind::BLOCK {
                self.compute(cfg, LinearId { layer, kind })?;
            }
        }
        self.compute(cfg, LinearId::LM_HEAD)
    }

    fn compute(&mut self, cfg: &ModelConfig, linear: LinearId) -> anyhow::Result<()> {
        let (in_dim, out_dim) = linear.dims(cfg);
        let request = self
            .conn
            .begin_request(linear, 1, in_dim, out_dim)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        loop {
            let rows = MaskedRows::from_random_words(&self.row[..in_dim]);
            let n = self.conn.poll_transmit_rows(rows, &mut self.tx);
            if n == 0 {
                break;
            }
            self.s.write_all(&self.tx[..n])?;
        }
        match self.event(out_dim)? {
            ClientEvent::Result { request: r } if r == request => Ok(()),
            other => bail!("expected the result of request {request}, got {other:?}"),
        }
    }

    fn bye(mut self) -> anyhow::Result<()> {
        self.conn.close();
        self.flush()
    }
}
