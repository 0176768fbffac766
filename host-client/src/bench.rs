//! `veil-client bench`: an end-to-end benchmark over real, separate processes.
//!
//! Starts a `veil-server` child on a free loopback port, then runs this very binary as a child once
//! per mode (`reference`, `online`, `pool`, the last after a timed `precompute` into a fresh pool
//! file, and `pool_server`, after a timed `precompute --server` that has this server fill another
//! fresh pool blind, the server's own CPU read from `/proc` around it) on a prompt of exactly
//! `--prompt-tokens` tokens with greedy decoding and a fixed seed. Each client child is reaped
//! with `wait4`, so its peak RSS (`ru_maxrss`) is the client's alone, not the server's nor this
//! driver's. Prints one JSON object: the model configuration, every mode's
//! generation statistics plus its peak RSS, whether all modes generated the same tokens (they must:
//! the private path reproduces the local integer pipeline bit for bit) and CPU ratios.
//!
//! With `--link-rtt-ms` / `--link-mbit`, the decode modes reach the server through a link
//! emulator ([`crate::link`]) in this process, and each mode also reports what crossed the link;
//! `decode_per_token` gathers every mode's decode time, round trips and bytes per decoded token.

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Map, Value};

use crate::link::{Link, LinkParams};

/// Arguments of `veil-client bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Model directory written by `veil-tools quantize` (client.veil, linear.veil,
    /// tokenizer.json, manifest.json).
    #[arg(long, value_name = "DIR")]
    pub weights: PathBuf,
    /// The server binary (default: `veil-server` next to this executable).
    #[arg(long, value_name = "PATH")]
    pub server_bin: Option<PathBuf>,
    /// The client executable the measured runs use (default: this executable). With
    /// `--client-runner`, e.g. an aarch64 build run under qemu to approximate the Pi.
    #[arg(long, value_name = "PATH")]
    pub client_bin: Option<PathBuf>,
    /// A command prefix for the measured client runs, split on whitespace, e.g.
    /// "qemu-aarch64 -cpu cortex-a72" (times and peak RSS are then the emulator's: a proxy for
    /// relative costs on that CPU, not a measurement of one).
    #[arg(long, value_name = "CMD")]
    pub client_runner: Option<String>,
    /// Prompt length in tokens (exactly; BOS included where the model adds one).
    #[arg(long, default_value_t = 32)]
    pub prompt_tokens: usize,
    /// Tokens to generate (fewer if the model emits end of text; the same in every mode).
    #[arg(long, default_value_t = 64)]
    pub new_tokens: usize,
    /// Directory for the mask pool `bench.pool` (recreated fresh; default: a temporary directory,
    /// removed afterwards).
    #[arg(long, value_name = "DIR")]
    pub pool_dir: Option<PathBuf>,
    /// Also write the JSON object to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Seconds to wait for the server to accept connections.
    #[arg(long, default_value_t = 60)]
    pub server_timeout_secs: u64,
    /// Let client and server share all CPUs. By default (Linux, two or more CPUs) the measured
    /// client runs on the first CPU and the server on the others: they stand for two machines,
    /// and on shared cores each one's work slows the other's (the client's CPU time per token
    /// then measures the neighbour, not the client).
    #[arg(long)]
    pub no_pin: bool,
    /// Skip the `pool_server` mode (a pool filled by `precompute --server`, then a generation
    /// from it): its offline phase costs a whole batch of 4096 slots however few are used, on
    /// the server mostly, which dominates the run for a wide vocabulary.
    #[arg(long)]
    pub no_server_precompute: bool,
    /// Route the decode modes' connections through a link emulator (a loopback proxy in this
    /// process, see `link.rs`) with this round-trip time, ms. The offline phase of
    /// `pool_server` still goes direct.
    #[arg(long, value_name = "MS")]
    pub link_rtt_ms: Option<f64>,
    /// The emulated link's rate each way, Mbit/s (unlimited without it); alone, it implies
    /// `--link-rtt-ms 0`.
    #[arg(long, value_name = "MBIT")]
    pub link_mbit: Option<f64>,
    /// Cut the prompt from this text file (e.g. WikiText-2's test set) instead of the built-in
    /// English paragraph.
    #[arg(long, value_name = "FILE")]
    pub prompt_file: Option<PathBuf>,
    /// Also run the online and pool modes with speculative decoding (`--speculate
    /// prompt-lookup --draft-tokens K`): modes `online_speculative` and `pool_speculative` (LM
    /// head placed by measurement), and their decode time per token against `online` and
    /// `pool_head_auto` on the same link.
    #[arg(long, value_name = "K")]
    pub speculate: Option<usize>,
}

/// An English paragraph the prompt is cut from (repeated as needed).
const PARAGRAPH: &str = "Global climate change is primarily caused by the burning of fossil \
fuels such as coal, oil and natural gas, which releases carbon dioxide and other greenhouse gases \
into the atmosphere. These gases trap heat from the sun and slowly warm the surface of the planet. \
Scientists have measured rising temperatures on land and in the oceans for more than a century, \
and they expect the warming to continue unless emissions fall sharply in the coming decades. ";

/// Runs the benchmark, prints the JSON object to stdout (and `--out`), and fails if any child
/// fails or the modes disagree on the generated tokens.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if args.prompt_tokens == 0 {
        bail!("--prompt-tokens must be at least 1");
    }
    let new_tokens = args.new_tokens.max(1);
    let this_exe = std::env::current_exe().context("locating the veil-client executable")?;
    let client_bin = args.client_bin.clone().unwrap_or_else(|| this_exe.clone());
    if !client_bin.is_file() {
        bail!("client binary {} not found", client_bin.display());
    }
    let runner: Vec<String> = args
        .client_runner
        .as_deref()
        .unwrap_or("")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    // The measured client: `runner... client_bin` or `client_bin`.
    let client_cmd = || -> Command {
        match runner.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(&client_bin);
                c
            }
            None => Command::new(&client_bin),
        }
    };
    let server_bin = match &args.server_bin {
        Some(p) => p.clone(),
        None => this_exe
            .parent()
            .context("the veil-client executable has no parent directory")?
            .join(format!("veil-server{}", std::env::consts::EXE_SUFFIX)),
    };
    if !server_bin.is_file() {
        bail!(
            "server binary {} not found (build it with `cargo build --release -p veil-server` or \
             pass --server-bin PATH)",
            server_bin.display()
        );
    }
    let dir = args.weights.as_path();
    let manifest_path = dir.join("manifest.json");
    let manifest: Value = serde_json::from_str(
        &std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?,
    )
    .with_context(|| format!("parsing {}", manifest_path.display()))?;
    let model = manifest.get("config").cloned().unwrap_or(Value::Null);
    if let Some(n_pos) = model.get("n_positions").and_then(Value::as_u64) {
        if (args.prompt_tokens + new_tokens) as u64 > n_pos {
            bail!(
                "--prompt-tokens + --new-tokens = {} exceeds the model's context ({n_pos})",
                args.prompt_tokens + new_tokens
            );
        }
    }

    let source_text = match &args.prompt_file {
        Some(p) => std::fs::read_to_string(p)
            .with_context(|| format!("reading the prompt file {}", p.display()))?,
        None => PARAGRAPH.to_owned(),
    };
    let prompt = build_prompt(
        &dir.join("tokenizer.json"),
        &source_text,
        args.prompt_tokens,
    )?;
    let terms = model_terms(dir)?;

    // The pool directory: the user's (kept) or a temporary one (removed by its guard).
    let (pool_dir, _tmp_guard) = match &args.pool_dir {
        Some(d) => (d.clone(), None),
        None => {
            let d = std::env::temp_dir().join(format!("veil-bench-{}", std::process::id()));
            (d.clone(), Some(RemoveDir(d)))
        }
    };
    std::fs::create_dir_all(&pool_dir)
        .with_context(|| format!("creating {}", pool_dir.display()))?;
    let pool_path = pool_dir.join("bench.pool");
    let server_pool_path = pool_dir.join("bench-server.pool");
    for p in [&pool_path, &server_pool_path] {
        match std::fs::remove_file(p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }

    let cpus = if args.no_pin {
        None
    } else {
        CpuSplit::of_this_thread()
    };
    let server = pinned(cpus.as_ref().map(|c| &c.server), || {
        ServerGuard::start(
            &server_bin,
            dir,
            Duration::from_secs(args.server_timeout_secs),
        )
    })?;
    let client_cpus = cpus.as_ref().map(|c| &c.client);
    let addr = server.addr.to_string();
    // The decode modes reach the server through the emulated link when one is asked for. Its
    // threads are this driver's, not pinned: they only sleep and copy.
    let link = match (args.link_rtt_ms, args.link_mbit) {
        (None, None) => None,
        (rtt, mbit) => {
            let params = LinkParams::new(rtt.unwrap_or(0.0), mbit)?;
            Some(Link::start(server.addr, params)?)
        }
    };
    let decode_addr = link.as_ref().map_or(server.addr, Link::addr).to_string();

    let base = |extra: &[&str]| -> Command {
        let mut c = client_cmd();
        c.arg("--weights")
            .arg(dir)
            .arg("--prompt")
            .arg(&prompt)
            .args(["--json", "--seed", "0", "--temperature", "0"])
            .arg("--max-new-tokens")
            .arg(new_tokens.to_string())
            .args(extra);
        c
    };

    let mut modes = Map::new();
    let mut tokens: Vec<(&str, Vec<u64>)> = Vec::new();
    let (v, t, text) = pinned(client_cpus, || {
        run_mode("reference", base(&["--reference"]), &server)
    })?;
    modes.insert("reference".into(), v);
    tokens.push(("reference", t));

    // One measured mode: its stats go into `modes`, its tokens into `tokens`; with a link, what
    // crossed it during the mode (handshake and prefill included) too.
    let mut record = |name: &'static str, extra: &[&str]| -> anyhow::Result<()> {
        let before = link.as_ref().map(Link::stats);
        let (mut v, t, _) = pinned(client_cpus, || run_mode(name, base(extra), &server))?;
        if let (Some(l), Some(b), Value::Object(m)) = (&link, before, &mut v) {
            let a = l.stats();
            m.insert("link_bytes_up".into(), json!(a.bytes_up - b.bytes_up));
            m.insert("link_bytes_down".into(), json!(a.bytes_down - b.bytes_down));
            m.insert(
                "link_connections".into(),
                json!(a.connections - b.connections),
            );
        }
        modes.insert(name.into(), v);
        tokens.push((name, t));
        Ok(())
    };
    let online = ["--server", &decode_addr, "--mask-source", "online"];
    record("online", &online)?;
    record(
        "online_no_verify",
        &[&online[..], &["--no-verify"]].concat(),
    )?;

    let k = args.speculate.map(|k| k.to_string());
    let speculate: Vec<&str> = match &k {
        Some(k) => vec!["--speculate", "prompt-lookup", "--draft-tokens", k],
        None => vec![],
    };
    if args.speculate.is_some() {
        record("online_speculative", &[&online[..], &speculate].concat())?;
    }

    // Three pool runs (with and without verification, LM head placed by measurement), each prompt
    // + new tokens slots, and the speculative run's: every row of a step takes a slot, rejected drafts' too.
    let speculative_slots = args
        .speculate
        .map_or(0, |k| args.prompt_tokens + new_tokens * (k + 1));
    let slots = (3 * (args.prompt_tokens + new_tokens) + speculative_slots + 8) as u64;
    let mut pre = client_cmd();
    pre.arg("precompute")
        .arg("--weights")
        .arg(dir)
        .arg("--pool")
        .arg(&pool_path)
        .arg("--tokens")
        .arg(slots.to_string());
    let pre = pinned(client_cpus, || run_child(pre)).context("veil-client precompute")?;
    let pool_str = pool_path.to_string_lossy().into_owned();
    // The pool modes offload the LM head (the figures memory.md compares); `pool_head_auto` lets
    // the client measure both placements on the link and use the cheaper (the default).
    let pool = [
        "--server",
        &decode_addr,
        "--mask-source",
        "pool",
        "--pool",
        &pool_str,
        "--lm-head",
        "offload",
    ];
    record("pool", &pool)?;
    record("pool_no_verify", &[&pool[..], &["--no-verify"]].concat())?;
    let pool_auto = [&pool[..pool.len() - 1], &["auto"]].concat();
    record("pool_head_auto", &pool_auto)?;
    // Speculation multiplies the LM head's rows, and so its vocabulary-wide replies: measured
    // with the LM head placed by measurement, against `pool_head_auto`.
    if args.speculate.is_some() {
        record("pool_speculative", &[&pool_auto[..], &speculate].concat())?;
    }

    // The pool filled by the server's blind offline phase instead, then one generation from it.
    let server_slots = (args.prompt_tokens + new_tokens + 8) as u64;
    let server_pre = if args.no_server_precompute {
        None
    } else {
        let mut pre = client_cmd();
        pre.arg("precompute")
            .arg("--weights")
            .arg(dir)
            .arg("--pool")
            .arg(&server_pool_path)
            .arg("--tokens")
            .arg(server_slots.to_string())
            .args(["--server", &addr, "--json"]);
        let server_cpu0 = server.cpu_ms();
        let run = pinned(client_cpus, || run_child(pre)).with_context(|| {
            format!(
                "veil-client precompute --server failed (server log:\n{})",
                server.log()
            )
        })?;
        let server_cpu = server.cpu_ms().zip(server_cpu0).map(|(b, a)| b - a);
        let report: Value = serde_json::from_str(run.stdout.trim()).with_context(|| {
            format!(
                "precompute --server --json: the output is not one JSON object:\n{}\nstderr:\n{}",
                run.stdout, run.stderr
            )
        })?;
        let server_pool_str = server_pool_path.to_string_lossy().into_owned();
        record(
            "pool_server",
            &[
                "--server",
                &decode_addr,
                "--mask-source",
                "pool",
                "--pool",
                &server_pool_str,
            ],
        )?;
        Some((run, server_cpu, report))
    };
    if let Some(Value::Object(m)) = modes.get_mut("pool") {
        m.insert("precompute_slots".into(), json!(slots));
        m.insert(
            "precompute_ms_per_token".into(),
            json!(pre.wall_ms / slots as f64),
        );
        m.insert(
            "precompute_cpu_ms_per_token".into(),
            json!(pre.cpu_ms / slots as f64),
        );
        m.insert("precompute_peak_rss_kib".into(), json!(pre.peak_rss_kib));
    }
    if let (Some((run, server_cpu, report)), Some(Value::Object(m))) =
        (&server_pre, modes.get_mut("pool_server"))
    {
        insert_server_precompute(m, run, *server_cpu, report)?;
    }
    drop(link);
    drop(server);

    let identical = tokens.iter().all(|(_, t)| *t == tokens[0].1);
    let f = |mode: &str, key: &str| modes[mode][key].as_f64().unwrap_or(f64::NAN);
    let ref_cpu = f("reference", "client_cpu_ms_per_token");
    let ratio = |x: f64| {
        let r = x / ref_cpu;
        if r.is_finite() {
            json!(r)
        } else {
            Value::Null
        }
    };
    let out = json!({
        "client": {
            "bin": client_bin.display().to_string(),
            "runner": args.client_runner.clone(),
            "cpus": client_cpus,
        },
        "server_cpus": cpus.as_ref().map(|c| &c.server),
        // Linux's exec records the old address space's peak into the new program's `ru_maxrss`,
        // and std spawns with vfork (the old space is this driver's): a child's `peak_rss_kib`
        // equal to this is a floor, its own peak is at most this (golden tiny's pool runs).
        "driver_peak_rss_kib": driver_peak_rss_kib(),
        "model": model,
        // What the offline phase encrypts and decrypts per slot: one mask word per input and one
        // term per output of every linear layer (its cost grows with these, not with in × out).
        "input_terms_per_slot": terms.0,
        "output_terms_per_slot": terms.1,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": new_tokens,
        "prompt": prompt,
        "link": match (args.link_rtt_ms, args.link_mbit) {
            (None, None) => Value::Null,
            (rtt, mbit) => json!({
                "rtt_ms": rtt.unwrap_or(0.0),
                "mbit": mbit,
                "decode_modes_through_link": true,
                "offline_phase_through_link": false,
            }),
        },
        // The figures to compare across links, per mode, per decoded token (each generated
        // token after the first); the same numbers as in `modes`, gathered.
        "decode_per_token": decode_summary(&modes),
        "modes": modes,
        "tokens_identical": identical,
        "generated_text": text,
        "ratios": {
            "pool_cpu_vs_reference": ratio(f("pool", "client_cpu_ms_per_token")),
            "online_cpu_vs_reference": ratio(f("online", "client_cpu_ms_per_token")),
            "precompute_cpu_vs_reference_cpu": ratio(f("pool", "precompute_cpu_ms_per_token")),
            "precompute_wall_vs_reference_cpu": ratio(f("pool", "precompute_ms_per_token")),
            "server_precompute_cpu_vs_reference_cpu": ratio(
                modes.get("pool_server").map_or(f64::NAN, |m| {
                    m["precompute_full_batch"]["cpu_ms_per_slot"]
                        .as_f64()
                        .unwrap_or(f64::NAN)
                }),
            ),
        },
        // Speculative decoding against plain decoding on the same link: decode wall time per
        // token (what a user waits), with prompt lookup.
        "speculative_decode_vs_plain": if args.speculate.is_some() {
            json!({
                "online": f("online_speculative", "decode_ms_per_token") / f("online", "decode_ms_per_token"),
                "pool": f("pool_speculative", "decode_ms_per_token") / f("pool_head_auto", "decode_ms_per_token"),
            })
        } else {
            Value::Null
        },
        "verification_cost_cpu_ms_per_token": {
            "online": f("online", "client_cpu_ms_per_token") - f("online_no_verify", "client_cpu_ms_per_token"),
            "pool": f("pool", "client_cpu_ms_per_token") - f("pool_no_verify", "client_cpu_ms_per_token"),
        },
    });
    let rendered = serde_json::to_string_pretty(&out).context("rendering the JSON")?;
    println!("{rendered}");
    if let Some(path) = &args.out {
        std::fs::write(path, format!("{rendered}\n"))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !identical {
        let (_, r) = &tokens[0];
        let mut msg = String::from("the modes generated different tokens (a correctness bug):");
        for (name, t) in &tokens[1..] {
            if let Some(i) = (0..r.len().max(t.len())).find(|&i| r.get(i) != t.get(i)) {
                msg += &format!(
                    " {name} differs from reference at generated token {i} ({:?} vs {:?});",
                    t.get(i),
                    r.get(i)
                );
            }
        }
        bail!(msg);
    }
    Ok(())
}

/// Per mode: decode wall time, round trips and bytes each way per decoded token (the client's
/// figures), and the whole run's round trips and bytes (hello and prefill included) per
/// generated token.
fn decode_summary(modes: &Map<String, Value>) -> Value {
    let keys = [
        ("decode_ms", "decode_ms_per_token"),
        ("round_trips", "round_trips_per_token"),
        ("bytes_up", "bytes_up_per_token"),
        ("bytes_down", "bytes_down_per_token"),
        ("tokens_per_step", "tokens_per_step"),
    ];
    Value::Object(
        modes
            .iter()
            .map(|(name, m)| {
                let mut row: Map<String, Value> = keys
                    .iter()
                    .map(|(short, long)| ((*short).into(), m[*long].clone()))
                    .collect();
                let generated = m["generated_tokens"].as_f64().filter(|&n| n > 0.0);
                for k in ["round_trips", "bytes_up", "bytes_down"] {
                    let per = m[k].as_f64().zip(generated).map(|(x, n)| x / n);
                    row.insert(format!("{k}_per_generated_token"), json!(per));
                }
                (name.clone(), Value::Object(row))
            })
            .collect(),
    )
}

/// Finds a prompt text that the tokenizer encodes to exactly `n` tokens (BOS included where the
/// model's tokenizer adds one, as the client encodes prompts): the paragraph (repeated)
/// cut after `n` tokens, decoded; if that text re-encodes differently (a cut inside a word can
/// merge differently), nearby cuts are tried until one re-encodes to exactly `n` tokens, stably.
fn build_prompt(tokenizer: &Path, text: &str, n: usize) -> anyhow::Result<String> {
    let tok = tokenizers::Tokenizer::from_file(tokenizer)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", tokenizer.display()))?;
    // Counted as the client encodes a prompt: with the tokenizer's special tokens (the LLaMA
    // family's BOS), which decoding then leaves out of the text.
    let encode = |s: &str| -> anyhow::Result<Vec<u32>> {
        Ok(tok
            .encode(s, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?
            .get_ids()
            .to_vec())
    };
    let decode = |ids: &[u32]| -> anyhow::Result<String> {
        tok.decode(ids, true)
            .map_err(|e| anyhow::anyhow!("decoding: {e}"))
    };
    let slack = 16;
    // Enough of the text (whole, repeated as needed) for n tokens and the slack, at about four
    // bytes per token at most.
    let want_chars = (n + slack) * 8;
    let mut para: String = text.chars().take(want_chars).collect();
    let mut ids = encode(&para)?;
    if ids.is_empty() {
        bail!("the tokenizer encodes the benchmark prompt text to no tokens");
    }
    while ids.len() < n + slack {
        para.push_str(text);
        ids = encode(&para)?;
    }
    // Cuts n, n-1, n+1, n-2, n+2, ...
    let cuts = std::iter::once(n).chain(
        (1..=slack)
            .flat_map(|d| [n.checked_sub(d), Some(n + d)])
            .flatten(),
    );
    for k in cuts.filter(|&k| k > 0 && k <= ids.len()) {
        let text = decode(&ids[..k])?;
        let re = encode(&text)?;
        if re.len() == n && encode(&decode(&re)?)? == re {
            return Ok(text);
        }
    }
    bail!("could not build a prompt that encodes to exactly {n} tokens with this tokenizer")
}

/// Σ in and Σ out over the model's linear layers: the mask words encrypted and the terms
/// decrypted per slot by the server-assisted offline phase.
fn model_terms(dir: &Path) -> anyhow::Result<(u64, u64)> {
    let files = crate::files::ModelFiles::open(dir, false)?;
    let cfg = *files.client()?.config();
    Ok(cfg.linears().fold((0, 0), |(i, o), l| {
        let (a, b) = l.dims(&cfg);
        (i + a as u64, o + b as u64)
    }))
}

/// Adds the server-assisted precompute's figures to the `pool_server` mode: per precomputed slot,
/// and per slot of a full batch (the cost of a batch does not depend on how many of its slots
/// are used, so a full batch is what a long-running device pays per slot).
fn insert_server_precompute(
    m: &mut Map<String, Value>,
    run: &ChildRun,
    server_cpu_ms: Option<f64>,
    report: &Value,
) -> anyhow::Result<()> {
    let field = |k: &str| {
        report[k]
            .as_u64()
            .with_context(|| format!("precompute --json: no integer `{k}` in {report}"))
    };
    let slots = field("slots")?;
    let batches = field("batches")?;
    let (up, down) = (field("bytes_up")?, field("bytes_down")?);
    if slots == 0 || batches == 0 {
        bail!("precompute --server filled no slots: {report}");
    }
    m.insert("precompute_slots".into(), json!(slots));
    let full = (batches * RLWE_BATCH_SLOTS) as f64;
    let slots = slots as f64;
    let per = |x: f64, n: f64| json!(x / n);
    let server_per = |n: f64| server_cpu_ms.map_or(Value::Null, |c| json!(c / n));
    m.insert("precompute_batches".into(), json!(batches));
    m.insert("batch_slots".into(), json!(RLWE_BATCH_SLOTS));
    m.insert("precompute_ms_per_slot".into(), per(run.wall_ms, slots));
    m.insert("precompute_cpu_ms_per_slot".into(), per(run.cpu_ms, slots));
    m.insert("precompute_peak_rss_kib".into(), json!(run.peak_rss_kib));
    m.insert("precompute_bytes_up_per_slot".into(), per(up as f64, slots));
    m.insert(
        "precompute_bytes_down_per_slot".into(),
        per(down as f64, slots),
    );
    m.insert(
        "precompute_server_cpu_ms_per_slot".into(),
        server_per(slots),
    );
    m.insert(
        "precompute_full_batch".into(),
        json!({
            "ms_per_slot": run.wall_ms / full,
            "cpu_ms_per_slot": run.cpu_ms / full,
            "server_cpu_ms_per_slot": server_per(full),
            "bytes_up_per_slot": up as f64 / full,
            "bytes_down_per_slot": down as f64 / full,
            "ns_per_input_term": report["ns_per_input_term"],
            "ns_per_output_term": report["ns_per_output_term"],
        }),
    );
    m.insert("precompute_report".into(), report.clone());
    Ok(())
}

/// Slots per batch of the server-assisted offline phase (one RLWE key, one ciphertext per input).
const RLWE_BATCH_SLOTS: u64 = veil_core::rlwe::N as u64;

/// One client run: its stats plus its peak RSS, its generated tokens and text.
fn run_mode(
    name: &str,
    cmd: Command,
    server: &ServerGuard,
) -> anyhow::Result<(Value, Vec<u64>, Option<String>)> {
    let run = run_child(cmd).with_context(|| {
        format!(
            "veil-client in mode {name} failed (server log:\n{})",
            server.log()
        )
    })?;
    let v: Value = serde_json::from_str(run.stdout.trim()).with_context(|| {
        format!(
            "mode {name}: the client's output is not one JSON object:\n{}\nstderr:\n{}",
            run.stdout, run.stderr
        )
    })?;
    let tokens: Vec<u64> = v["tokens"]
        .as_array()
        .with_context(|| format!("mode {name}: no `tokens` array in the client's output"))?
        .iter()
        .map(|t| t.as_u64().context("a token id is not an integer"))
        .collect::<anyhow::Result<_>>()?;
    let mut stats = match v.get("stats") {
        Some(Value::Object(m)) => m.clone(),
        _ => bail!("mode {name}: no `stats` object in the client's output"),
    };
    stats.insert("peak_rss_kib".into(), json!(run.peak_rss_kib));
    stats.insert("process_wall_ms".into(), json!(run.wall_ms));
    stats.insert("process_cpu_ms".into(), json!(run.cpu_ms));
    let text = v["text"].as_str().map(str::to_owned);
    Ok((Value::Object(stats), tokens, text))
}

/// This process's peak resident set size, KiB (`ru_maxrss`); `None` if getrusage fails.
fn driver_peak_rss_kib() -> Option<i64> {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `ru` is valid, writable and aligned for a `rusage`, which getrusage fills on
    // success; it is read only then.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: zero-initialised (a valid `rusage`) and filled by the successful call above.
    Some(unsafe { ru.assume_init() }.ru_maxrss)
}

/// What a finished child left behind.
#[derive(Debug)]
struct ChildRun {
    stdout: String,
    stderr: String,
    /// Peak resident set size of the child alone, KiB (Linux `ru_maxrss`).
    peak_rss_kib: i64,
    /// User + system CPU of the child, ms.
    cpu_ms: f64,
    wall_ms: f64,
}

/// Runs `cmd` to completion, reading its output, and reaps it with `wait4` to get its own resource
/// usage. Fails (with its stderr) unless it exits with status 0.
fn run_child(mut cmd: Command) -> anyhow::Result<ChildRun> {
    let t0 = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {:?}", cmd.get_program()))?;
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let pid = child.id() as libc::pid_t;
    let mut status: libc::c_int = 0;
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    let reaped = loop {
        // SAFETY: `pid` is our own child, not yet reaped (std's `Child` is never waited on: we
        // drop it without calling `wait`), `status` and `ru` are valid, writable and properly
        // aligned for the duration of the call; wait4 writes a full `rusage` on success.
        let r = unsafe { libc::wait4(pid, &mut status, 0, ru.as_mut_ptr()) };
        if r == pid {
            break Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            break Err(e);
        }
    };
    if let Err(e) = reaped {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e).context("waiting for the child (wait4)");
    }
    drop(child);
    let wall_ms = t0.elapsed().as_secs_f64() * 1e3;
    // SAFETY: zero-initialised (a valid `rusage`) and filled by the successful wait4 above.
    let ru = unsafe { ru.assume_init() };
    let stdout = String::from_utf8_lossy(&join(out)).into_owned();
    let stderr = String::from_utf8_lossy(&join(err)).into_owned();
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        let how = if libc::WIFEXITED(status) {
            format!("exit status {}", libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            format!("signal {}", libc::WTERMSIG(status))
        } else {
            format!("wait status {status:#x}")
        };
        bail!(
            "{:?} failed ({how}); its stderr:\n{}",
            cmd.get_program(),
            stderr.trim_end()
        );
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
    Ok(ChildRun {
        stdout,
        stderr,
        peak_rss_kib: ru.ru_maxrss,
        cpu_ms: tv(ru.ru_utime) + tv(ru.ru_stime),
        wall_ms,
    })
}

type Drain = Option<std::thread::JoinHandle<Vec<u8>>>;

/// Reads a pipe to its end on a thread (so a chatty child never blocks on a full pipe).
fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Drain {
    pipe.map(|mut p| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            buf
        })
    })
}

fn join(d: Drain) -> Vec<u8> {
    d.and_then(|h| h.join().ok()).unwrap_or_default()
}

/// The `veil-server` child: killed and reaped when dropped, on every path.
#[derive(Debug)]
struct ServerGuard {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<u8>>>,
}

impl ServerGuard {
    /// Starts the server on a free loopback port and waits until it accepts connections.
    fn start(bin: &Path, weights: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").context("finding a free loopback port")?;
            l.local_addr().context("reading the free port")?
        };
        let mut child = Command::new(bin)
            .arg("--weights")
            .arg(weights)
            .arg("--listen")
            .arg(addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(mut err) = child.stderr.take() {
            let log = Arc::clone(&log);
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = err.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut l) = log.lock() {
                        l.extend_from_slice(&buf[..n]);
                    }
                }
            });
        }
        let guard = ServerGuard { child, addr, log };
        guard.wait_ready(timeout)
    }

    fn wait_ready(mut self, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("polling the server")? {
                std::thread::sleep(Duration::from_millis(100)); // let the log thread catch up
                bail!(
                    "veil-server exited before accepting connections ({status}); its stderr:\n{}",
                    self.log()
                );
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(self);
            }
            if Instant::now() >= deadline {
                bail!(
                    "veil-server did not accept connections on {} within {:?}; its stderr:\n{}",
                    self.addr,
                    timeout,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The server's CPU time so far (user + system, all its threads), ms; `None` where
    /// `/proc/<pid>/stat` cannot be read (off Linux).
    fn cpu_ms(&self) -> Option<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).ok()?;
        // The command name (field 2) is in parentheses and may hold spaces or ')': count the
        // fields after its last ')', where field 3 (the state) comes first.
        let rest = stat.get(stat.rfind(')')? + 1..)?;
        let mut fields = rest.split_whitespace();
        let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
        let stime: u64 = fields.next()?.parse().ok()?;
        // SAFETY: sysconf only reads a configuration value; it takes no pointers.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        if ticks <= 0 {
            return None;
        }
        Some((utime + stime) as f64 * 1e3 / ticks as f64)
    }

    fn log(&self) -> String {
        self.log
            .lock()
            .map(|l| String::from_utf8_lossy(&l).trim_end().to_owned())
            .unwrap_or_default()
    }
}

impl Drop for ServerGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Which CPUs the measured client and the server run on.
#[derive(Debug)]
struct CpuSplit {
    client: Vec<usize>,
    server: Vec<usize>,
}

impl CpuSplit {
    /// The first CPU this thread may run on for the client, the rest for the server; `None` with
    /// fewer than two CPUs or off Linux.
    fn of_this_thread() -> Option<CpuSplit> {
        let mut all = affinity::get()?;
        if all.len() < 2 {
            return None;
        }
        let server = all.split_off(1);
        Some(CpuSplit {
            client: all,
            server,
        })
    }
}

/// Runs `spawn` with this thread restricted to `cpus`, so that the processes it starts inherit
/// that CPU set, then restores the thread's own set. Without a set (or if it cannot be applied)
/// it just runs `spawn`.
fn pinned<T>(cpus: Option<&Vec<usize>>, spawn: impl FnOnce() -> T) -> T {
    let saved = cpus.and_then(|c| {
        let saved = affinity::get()?;
        affinity::set(c).then_some(saved)
    });
    let out = spawn();
    if let Some(s) = saved {
        affinity::set(&s);
    }
    out
}

#[cfg(target_os = "linux")]
mod affinity {
    /// The CPUs the calling thread may run on.
    pub fn get() -> Option<Vec<usize>> {
        // SAFETY: an all-zero `cpu_set_t` is a valid (empty) set; sched_getaffinity writes at
        // most `size_of::<cpu_set_t>()` bytes into it, and pid 0 means the calling thread.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
                return None;
            }
            Some(
                (0..libc::CPU_SETSIZE as usize)
                    .filter(|&c| libc::CPU_ISSET(c, &set))
                    .collect(),
            )
        }
    }

    /// Restricts the calling thread to `cpus`; false if the kernel refused.
    pub fn set(cpus: &[usize]) -> bool {
        // SAFETY: as in `get`; CPU_SET ignores indices beyond the set's size, which
        // `get` never yields anyway.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            for &c in cpus {
                libc::CPU_SET(c, &mut set);
            }
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) == 0
        }
    }
}

#[cfg(not(target_os = "linux"))]
mod affinity {
    pub fn get() -> Option<Vec<usize>> {
        None
    }

    pub fn set(_cpus: &[usize]) -> bool {
        false
    }
}

/// Removes a temporary directory when dropped.
#[derive(Debug)]
struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
