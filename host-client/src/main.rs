//! `veil-client`: private GPT-2 generation on a small device with a blind server.

use std::io::Write;
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use veil_client::files::ModelFiles;
use veil_client::generate::{
    generate_reference, GenOptions, GenStats, PrivateGenerator, Verification, DEFAULT_PREFILL_ROWS,
};
use veil_client::pool::PoolSource;
use veil_client::speculate::{DrafterKind, Speculation};
use veil_client::transport::{read_psk_file, ConnectOptions, Connection};
use veil_core::mask::MaskKey;
use veil_core::model::SamplingParams;
use veil_core::session::{OnlineUnmask, UnmaskSource};
use veil_core::wire::ClientSettings;

/// Private text generation: the prompt never leaves this device unmasked.
///
/// Every linear layer of the model runs on a `veil-server` over rows padded with fresh one-time
/// masks; LayerNorm, GELU, attention over the KV cache and sampling run here.
#[derive(Debug, Parser)]
#[command(name = "veil-client", version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Fill or extend a mask pool: precompute the unmasking terms r·W for future tokens, so the
    /// online phase only reads them (run it while the device is idle).
    Precompute(PrecomputeArgs),
    /// End-to-end benchmark: starts a veil-server child, runs this client as separate processes
    /// in the reference, online and pool modes, prints one JSON object (stats, peak RSS, ratios).
    Bench(veil_client::bench::BenchArgs),
    /// Chat privately with an instruct model, one user message per input line.
    ///
    /// The conversation is rendered with the model's own chat template and the reply streams
    /// back; the KV cache is kept across turns (only the new part of the conversation is fed).
    /// Takes the same options as a generation (server, mask source, sampling, speculation);
    /// `--max-new-tokens` bounds each reply.
    Chat(ChatArgs),
    /// An OpenAI-compatible HTTP endpoint on this device, for existing applications.
    ///
    /// `/v1/chat/completions`, `/v1/completions` (streamed with server-sent events) and
    /// `/v1/models`: point an OpenAI client at http://LISTEN/v1 and its prompts go through the
    /// private path. One generation at a time; takes the same options as a generation (server,
    /// mask source, speculation...), whose sampling settings are only defaults for what a request
    /// leaves out.
    Serve(ServeArgs),
}

#[derive(Debug, Args)]
struct ServeArgs {
    #[command(flatten)]
    run: RunArgs,
    /// Where to listen (localhost by default: the prompts this receives are the private ones).
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: std::net::SocketAddr,
    /// Requests that may wait while one is generated; more get HTTP 429.
    #[arg(long, default_value_t = 8)]
    queue: usize,
    /// The model's name in the API (default: the weights directory's name).
    #[arg(long)]
    model_name: Option<String>,
}

#[derive(Debug, Args)]
struct ChatArgs {
    #[command(flatten)]
    run: RunArgs,
    /// A system message that opens the conversation.
    #[arg(long, value_name = "TEXT")]
    system: Option<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum MaskSourceKind {
    /// Compute r·W when needed (needs linear.veil here; as costly as running the layer locally).
    Online,
    /// Read precomputed r·W from a pool file (see `veil-client precompute`).
    Pool,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum LmHeadPlacement {
    /// Local with the online mask source; with a pool, measured on the link step by step and
    /// the cheaper used when linear.veil is at hand, else offloaded.
    Auto,
    /// Compute the LM head on the client (needs linear.veil; its 38 MB int8 matrix is mapped).
    Local,
    /// Offload the LM head to the server like the other layers (196 KiB down per token).
    Offload,
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
enum SpeculateKind {
    /// One token per step (every decoded token waits for 4 round trips per block + 1).
    None,
    /// Draft from the context itself: the tokens that followed the last earlier occurrence of
    /// the latest 1-3 tokens. Costs nothing and needs no weights.
    PromptLookup,
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Model directory written by `veil-tools quantize` (client.veil, linear.veil, tokenizer.json).
    #[arg(long, value_name = "DIR")]
    weights: Option<PathBuf>,
    /// Server address, host:port.
    #[arg(long, value_name = "ADDR", required_unless_present = "reference")]
    server: Option<String>,
    /// The prompt.
    #[arg(long)]
    prompt: Option<String>,
    /// Tokens to generate at most (stops earlier at end of text).
    #[arg(long, default_value_t = 32)]
    max_new_tokens: usize,
    /// Sampling temperature; 0 (the default) means greedy decoding.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample only among the k most likely tokens (0 = all).
    #[arg(long, default_value_t = 0)]
    top_k: u32,
    /// Sample from the smallest set of tokens whose probability reaches p (1.0 = all).
    #[arg(long, default_value_t = 1.0)]
    top_p: f64,
    /// Seed of the sampling random numbers (same seed, same text).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the unmasking terms come from.
    #[arg(long, value_enum, default_value_t = MaskSourceKind::Online)]
    mask_source: MaskSourceKind,
    /// Mask pool file (with --mask-source pool).
    #[arg(long, value_name = "FILE")]
    pool: Option<PathBuf>,
    /// Run the same integer pipeline locally, with no server (the reference the private path
    /// reproduces bit for bit).
    #[arg(long)]
    reference: bool,
    /// Print one JSON object (tokens, text, stats) instead of streaming text.
    #[arg(long)]
    json: bool,
    /// Prompt rows per prefill request.
    #[arg(long, default_value_t = DEFAULT_PREFILL_ROWS)]
    prefill_rows: usize,
    /// Pre-shared key file (the same file as the server's --psk-file): prove we hold the key, and
    /// refuse a server that cannot prove it holds it too.
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Skip the integrity check of the server's replies (Freivalds' test modulo 2^61 - 1, on by
    /// default; it costs O(in + out) per layer, see `veil-client bench`). Without it a lying
    /// server silently corrupts the output.
    #[arg(long)]
    no_verify: bool,
    /// Reconnections allowed when the server connection breaks, or the server does not answer
    /// within --timeout-secs (also while connecting); an interrupted step is redone on the new
    /// connection with fresh masks.
    #[arg(long, default_value_t = 2)]
    retries: usize,
    /// Longest wait, in seconds, to connect to the server and for any one read or write after
    /// that; a server that stays silent longer counts as a lost connection (see --retries).
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    timeout_secs: f64,
    /// Where the LM head (vocabulary-wide, tied to the embeddings) runs.
    #[arg(long, value_enum, default_value_t = LmHeadPlacement::Auto)]
    lm_head: LmHeadPlacement,
    /// Speculative decoding: a drafter guesses the next tokens and the private model checks them
    /// all in one step (the round trips of one token), keeping those it agrees with. The output
    /// is token for token the same as without (greedy and seeded sampling). The server then
    /// sees how many steps a generation takes (how predictable the text was); see README.
    #[arg(long, value_enum, default_value_t = SpeculateKind::None)]
    speculate: SpeculateKind,
    /// Most drafted tokens per step with --speculate (each step then sends this many rows plus
    /// one; the length adapts to the acceptance and step times measured, unless --fixed-draft).
    #[arg(long, default_value_t = 4, value_name = "K")]
    draft_tokens: usize,
    /// Always draft --draft-tokens tokens (no adaptation).
    #[arg(long)]
    fixed_draft: bool,
}

#[derive(Debug, Args)]
struct PrecomputeArgs {
    /// Model directory (needs linear.veil without --server).
    #[arg(long, value_name = "DIR")]
    weights: PathBuf,
    /// Pool file to create or extend.
    #[arg(long, value_name = "FILE")]
    pool: PathBuf,
    /// Token slots to add (each generated or prompt token uses one).
    #[arg(long)]
    tokens: u64,
    /// Let this server compute the terms blind (RLWE-encrypted masks; see README) instead of
    /// computing them here: the client's work per slot grows with the layers' widths, not with
    /// their sizes. Slots go in batches of 4096 (a smaller last batch costs as much).
    #[arg(long, value_name = "ADDR")]
    server: Option<String>,
    /// Pre-shared key file for --server (as for generation).
    #[arg(long, value_name = "FILE")]
    psk_file: Option<PathBuf>,
    /// Longest wait, in seconds, to connect to --server and for any one read or write after that.
    #[arg(long, default_value_t = 300.0, value_name = "SECONDS")]
    timeout_secs: f64,
    /// Also print one JSON object on stdout at the end (slots, batches, ciphertexts, bytes up and
    /// down, wall and this process's CPU time), for `veil-client bench`.
    #[arg(long)]
    json: bool,
}

fn q16(x: f64) -> u32 {
    (x * 65536.0).round().clamp(0.0, u32::MAX as f64) as u32
}

fn stats_json(s: &GenStats) -> serde_json::Value {
    serde_json::json!({
        "prompt_tokens": s.prompt_tokens,
        "generated_tokens": s.generated_tokens,
        "prefill_ms": s.prefill_ms,
        "decode_ms_per_token": s.decode_ms_per_token,
        "client_cpu_ms_per_token": s.client_cpu_ms_per_token,
        "bytes_up": s.wire.bytes_up,
        "bytes_down": s.wire.bytes_down,
        "round_trips": s.wire.round_trips,
        "round_trips_per_token": s.round_trips_per_token,
        "bytes_up_per_token": s.bytes_up_per_token,
        "bytes_down_per_token": s.bytes_down_per_token,
        "decode_steps": s.decode_steps,
        "tokens_per_step": s.tokens_per_step,
        "draft_acceptance": s.draft_acceptance,
        "lm_head_local_steps": s.lm_head_local_steps.map(|(l, _)| l),
        "lm_head_measured_steps": s.lm_head_local_steps.map(|(_, n)| n),
    })
}

/// Sampling, limits and speculation from the command line; `eos`: the tokens that end the text.
fn gen_options(args: &RunArgs, eos: Vec<u32>) -> GenOptions {
    let sampling = if args.temperature <= 0.0 {
        SamplingParams::GREEDY
    } else {
        SamplingParams {
            temperature_q16: q16(args.temperature).max(1),
            top_k: args.top_k,
            top_p_q16: if args.top_p >= 1.0 {
                0
            } else {
                q16(args.top_p)
            },
        }
    };
    GenOptions {
        max_new_tokens: args.max_new_tokens.max(1),
        sampling,
        seed: args.seed,
        eos,
        prefill_rows: args.prefill_rows.max(1),
        speculation: match args.speculate {
            SpeculateKind::None => None,
            SpeculateKind::PromptLookup => Some(Speculation {
                drafter: DrafterKind::PromptLookup,
                max_draft: args.draft_tokens,
                adaptive: !args.fixed_draft,
            }),
        },
    }
}

/// The mask source chosen on the command line.
enum Source<'w> {
    Online(OnlineUnmask<'w>),
    Pool(PoolSource),
}

impl UnmaskSource for Source<'_> {
    type Error = veil_client::pool::PoolError;

    fn reserve(&mut self, rows: u64) -> Result<u64, Self::Error> {
        match self {
            Source::Online(s) => s.reserve(rows).map_err(|e| match e {}),
            Source::Pool(p) => p.reserve(rows),
        }
    }

    fn mask_key(&mut self, slot: u64) -> Result<MaskKey, Self::Error> {
        match self {
            Source::Online(s) => s.mask_key(slot).map_err(|e| match e {}),
            Source::Pool(p) => p.mask_key(slot),
        }
    }

    fn unmask_terms(
        &mut self,
        linear: veil_core::model::LinearId,
        first_slot: u64,
        rows: usize,
        r: veil_core::mask::MaskWords<'_>,
        out: veil_core::mask::UnmaskTerms<'_>,
    ) -> Result<(), Self::Error> {
        match self {
            Source::Online(s) => s
                .unmask_terms(linear, first_slot, rows, r, out)
                .map_err(|e| match e {}),
            Source::Pool(p) => p.unmask_terms(linear, first_slot, rows, r, out),
        }
    }
}

/// A private generation set up from the command line: the server connection (with its resume
/// policy), the check data, the LM head's placement and the mask source.
struct Private<'w> {
    generator: PrivateGenerator<'w, 'static, TcpStream, TcpStream>,
    source: Source<'w>,
    addr: String,
}

impl<'w> Private<'w> {
    /// Connects (retrying as `--retries` says) and prepares the source. `keep_cache`: keep the
    /// KV cache between generations (a conversation).
    fn open(
        args: &RunArgs,
        files: &'w ModelFiles,
        client: veil_core::model::ClientWeights<'w>,
        keep_cache: bool,
    ) -> anyhow::Result<Self> {
        let cfg = *client.config();
        let (local_lm_head, measure_lm_head) = lm_head_placement(args);
        let addr = args
            .server
            .clone()
            .context("--server ADDR is required (or --reference)")?;
        let options = connect_options(
            files.fingerprint()?,
            args.psk_file.as_deref(),
            args.timeout_secs,
        )?;
        let target = addr.clone();
        let open = move || Connection::connect(&target, &options);
        // The first connection is retried like a lost one (a server that is restarting, or that
        // accepted and stalled); what a new connection cannot cure (wrong weights, key,
        // version) fails at once.
        let mut retries = args.retries;
        let conn = loop {
            match open() {
                Ok(c) => break c,
                Err(e) if e.is_transient() && retries > 0 => {
                    retries -= 1;
                    eprintln!("\nveil-client: {e}; trying again");
                }
                Err(e) => return Err(e).context(format!("connecting to the server at {addr}")),
            }
        };
        let reconnect: veil_client::generate::Reconnect<'static, _, _> = Box::new(open);
        let need_linear = args.mask_source == MaskSourceKind::Online || local_lm_head;
        let linear = if need_linear { files.linear()? } else { None };
        let mut generator = PrivateGenerator::new(client, conn).resume_with(retries, reconnect);
        if keep_cache {
            generator = generator.keep_cache();
        }
        if local_lm_head {
            let w = linear.clone().context(
                "linear.veil is needed to compute the LM head locally (--lm-head local)",
            )?;
            generator = if measure_lm_head {
                generator.measured_lm_head(w)
            } else {
                generator.local_lm_head(w)
            };
        }
        let source = match args.mask_source {
            MaskSourceKind::Online => {
                let linear = linear.context("linear.veil is needed for --mask-source online")?;
                // The online source's key: fresh for this session, in memory only.
                let mut bytes = [0u8; 32];
                rand_core::RngCore::try_fill_bytes(&mut rand_core::OsRng, &mut bytes)
                    .map_err(|e| anyhow::anyhow!("OS random numbers: {e}"))?;
                let key = MaskKey::from_bytes(bytes);
                zeroize::Zeroize::zeroize(&mut bytes);
                if !args.no_verify {
                    generator = generator.verify_with(Verification::compute(&key, &linear));
                }
                Source::Online(OnlineUnmask::new(linear, key))
            }
            MaskSourceKind::Pool => {
                let path = args
                    .pool
                    .as_deref()
                    .context("--pool FILE is needed with --mask-source pool")?;
                let pool = PoolSource::open(path, &cfg, &files.fingerprint()?)?;
                if !args.no_verify {
                    generator = generator.verify_with(pool.verification()?);
                }
                Source::Pool(pool)
            }
        };
        Ok(Private {
            generator,
            source,
            addr,
        })
    }

    fn generate(
        &mut self,
        ids: &[u32],
        opts: &GenOptions,
        on_token: &mut dyn FnMut(u32),
    ) -> anyhow::Result<(Vec<u32>, GenStats)> {
        let addr = &self.addr;
        self.generator
            .generate(&mut self.source, ids, opts, on_token)
            .with_context(|| format!("private generation with the server at {addr}"))
    }

    /// Gives the pool's claimed-ahead slots back (and erases the used ones) and says goodbye.
    fn finish(self) {
        if let Source::Pool(pool) = self.source {
            // If that fails they are only skipped.
            if let Err(e) = pool.close() {
                eprintln!("warning: {e} (a few unused pool slots will be skipped)");
            }
        }
        self.generator.into_connection().bye();
    }
}

/// Where the LM head runs (local, measured): offloading it saves nothing with the online source
/// (the client computes r·W for it anyway, as costly as the product itself, then also downloads
/// 196 KiB), while with a pool the client only reads and subtracts precomputed terms (see
/// memory.md) but the vocabulary-wide reply crosses the link: with the weights at hand the client
/// measures both on this link and uses the cheaper; without them it offloads.
fn lm_head_placement(args: &RunArgs) -> (bool, bool) {
    let has_linear = args
        .weights
        .as_deref()
        .is_some_and(|d| d.join("linear.veil").is_file());
    match args.lm_head {
        LmHeadPlacement::Auto if args.mask_source == MaskSourceKind::Online => (true, false),
        LmHeadPlacement::Auto => (has_linear && !args.reference, has_linear && !args.reference),
        LmHeadPlacement::Local => (true, false),
        LmHeadPlacement::Offload => (false, false),
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    let Some(dir) = args.weights.as_deref() else {
        bail!("--weights DIR is required")
    };
    let Some(prompt) = args.prompt.as_deref() else {
        bail!("--prompt TEXT is required")
    };
    let (local_lm_head, _) = lm_head_placement(&args);
    let need_linear = args.reference || args.mask_source == MaskSourceKind::Online || local_lm_head;
    let files = ModelFiles::open(dir, need_linear)?;
    let client = files.client()?;
    let cfg = *client.config();
    let tok = files.tokenizer()?;
    // With the tokenizer's own special tokens, as transformers encodes a prompt: the LLaMA
    // family's post-processor adds BOS; GPT-2's adds nothing.
    let ids = tok
        .encode(prompt, true)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        bail!("the prompt is empty after tokenization");
    }
    if ids.len() >= cfg.n_positions as usize {
        bail!(
            "the prompt has {} tokens; this model's context is {}",
            ids.len(),
            cfg.n_positions
        );
    }
    let opts = gen_options(&args, vec![client.header().eos_token_id]);
    // Streams text as tokens arrive.
    let json = args.json;
    let mut text_stream = veil_client::text::TextStream::new(&tok, false);
    let mut on_token = |t: u32| {
        if json {
            return;
        }
        if let Some(new) = text_stream.push(t) {
            print!("{new}");
            let _ = std::io::stdout().flush();
        }
    };
    if !json {
        print!("{prompt}");
        let _ = std::io::stdout().flush();
    }
    let (tokens, stats) = if args.reference {
        let linear = files
            .linear()?
            .context("linear.veil is needed for --reference")?;
        generate_reference(client, &linear, &ids, &opts, &mut on_token)?
    } else {
        let mut private = Private::open(&args, &files, client, false)?;
        let out = private.generate(&ids, &opts, &mut on_token);
        private.finish();
        out?
    };
    let text = tok
        .decode(&tokens, false)
        .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
    if json {
        let v = serde_json::json!({ "tokens": tokens, "text": text, "stats": stats_json(&stats) });
        println!("{v}");
    } else {
        println!();
        eprintln!(
            "{}",
            serde_json::to_string_pretty(&stats_json(&stats)).unwrap_or_default()
        );
    }
    Ok(())
}

/// What `precompute --json` prints: the work of one run (ciphertexts and bytes are 0 locally).
fn precompute_json(
    source: &str,
    stats: &veil_client::offline::OfflineStats,
    wire: veil_client::transport::WireStats,
    t0: std::time::Instant,
) -> serde_json::Value {
    serde_json::json!({
        "source": source,
        "slots": stats.slots,
        "batches": stats.batches,
        "input_ciphertexts": stats.inputs,
        "output_ciphertexts": stats.outputs,
        // Per term (one input or output of one slot), the client CPU of each side of the
        // exchange: shape-independent, so they price any model's offline phase.
        "ns_per_input_term": (stats.inputs > 0).then(|| stats.ns_per_input_term()),
        "ns_per_output_term": (stats.outputs > 0).then(|| stats.ns_per_output_term()),
        "bytes_up": wire.bytes_up,
        "bytes_down": wire.bytes_down,
        "wall_ms": t0.elapsed().as_secs_f64() * 1e3,
        // The whole process's CPU (getrusage), start-up and file opening included: what the
        // device pays for this run.
        "cpu_ms": veil_client::generate::cpu_ms(),
    })
}

fn precompute(args: PrecomputeArgs) -> anyhow::Result<()> {
    let t0 = std::time::Instant::now();
    if let Some(addr) = args.server.as_deref() {
        return precompute_through_server(&args, addr, t0);
    }
    let files = ModelFiles::open(&args.weights, true)?;
    let linear = files
        .linear()?
        .context("linear.veil is needed to precompute")?;
    let bar = indicatif::ProgressBar::new(args.tokens);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "precomputing {bar:40} {pos}/{len} slots ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let pool = PoolSource::precompute(
        &args.pool,
        &linear,
        &files.fingerprint()?,
        args.tokens,
        &mut |done, _| bar.set_position(done),
    )?;
    bar.finish_and_clear();
    eprintln!(
        "{}: {} unused slots (next slot {})",
        args.pool.display(),
        pool.remaining(),
        pool.next_slot()
    );
    if args.json {
        let stats = veil_client::offline::OfflineStats {
            slots: args.tokens,
            ..Default::default()
        };
        println!(
            "{}",
            precompute_json("local", &stats, Default::default(), t0)
        );
    }
    Ok(())
}

/// How to reach the server: the weights fingerprint, the key of `--psk-file`, `--timeout-secs`.
fn connect_options(
    fingerprint: [u8; 32],
    psk_file: Option<&std::path::Path>,
    timeout_secs: f64,
) -> anyhow::Result<ConnectOptions> {
    let psk = psk_file.map(read_psk_file).transpose()?;
    let timeout = std::time::Duration::try_from_secs_f64(timeout_secs)
        .ok()
        .filter(|t| !t.is_zero())
        .context("--timeout-secs must be a positive number of seconds")?;
    Ok(ConnectOptions {
        settings: ClientSettings { fingerprint, psk },
        timeout,
    })
}

fn precompute_through_server(
    args: &PrecomputeArgs,
    addr: &str,
    t0: std::time::Instant,
) -> anyhow::Result<()> {
    // The device needs no linear.veil: if it is there it is used (and checked) for the check
    // data of a new pool, otherwise the server's copy is streamed once for it.
    let linear_path = args.weights.join("linear.veil");
    let has_linear = linear_path.exists();
    // Not mapped: read once, sequentially, for the check data (below).
    let files = ModelFiles::open(&args.weights, false)?;
    let cfg = *files.client()?.config();
    let fingerprint = files.fingerprint()?;
    let options = connect_options(fingerprint, args.psk_file.as_deref(), args.timeout_secs)?;
    let mut conn = Connection::connect(addr, &options)?;
    let mut pool = PoolSource::create_or_open(&args.pool, &cfg, &fingerprint, |key, sink| {
        if has_linear {
            veil_client::offline::file_projections(&linear_path, key, &cfg, &fingerprint, sink)?;
            return Ok::<_, anyhow::Error>(());
        }
        let bar = indicatif::ProgressBar::new(1);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "streaming the server's linear.veil once for the check data (not stored) \
                 {bar:30} {bytes}/{total_bytes}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        veil_client::offline::download_projections(
            &mut conn,
            key,
            &cfg,
            &fingerprint,
            sink,
            &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            },
        )?;
        bar.finish_and_clear();
        Ok(())
    })?;

    let bar = indicatif::ProgressBar::new(1);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "server-assisted precompute {bar:40} {percent}% of the ciphertexts ({eta} left)",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let stats = veil_client::offline::precompute_through(
        &mut conn,
        &mut pool,
        &cfg,
        args.tokens,
        &mut |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        },
    )?;
    bar.finish_and_clear();
    let wire = conn.stats();
    conn.bye();
    eprintln!(
        "{}: {} unused slots (next slot {}); {} batch(es), {} ciphertexts up ({:.1} MiB), {} down ({:.1} MiB)",
        args.pool.display(),
        pool.remaining(),
        pool.next_slot(),
        stats.batches,
        stats.inputs,
        wire.bytes_up as f64 / (1 << 20) as f64,
        stats.outputs,
        wire.bytes_down as f64 / (1 << 20) as f64,
    );
    if args.json {
        println!("{}", precompute_json("server", &stats, wire, t0));
    }
    Ok(())
}

/// `veil-client chat`: a conversation, one user message per input line.
fn chat(args: ChatArgs) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal};
    use veil_client::chat::{stop_tokens, ChatTemplate, Message};
    let run = &args.run;
    let Some(dir) = run.weights.as_deref() else {
        bail!("--weights DIR is required")
    };
    if run.prompt.is_some() {
        bail!("chat reads its messages from standard input; --prompt is for one-off generations");
    }
    let template = ChatTemplate::from_model_dir(dir)?;
    let (local_lm_head, _) = lm_head_placement(run);
    let need_linear = run.reference || run.mask_source == MaskSourceKind::Online || local_lm_head;
    let files = ModelFiles::open(dir, need_linear)?;
    let client = files.client()?;
    let cfg = *client.config();
    let tok = files.tokenizer()?;
    let mut stops = stop_tokens(dir, &template, &tok);
    if stops.is_empty() {
        stops.push(client.header().eos_token_id);
    }
    let opts = gen_options(run, stops.clone());
    let linear = if run.reference { files.linear()? } else { None };
    let mut private = if run.reference {
        None
    } else {
        Some(Private::open(run, &files, client.clone(), true)?)
    };
    let mut messages = Vec::new();
    if let Some(system) = &args.system {
        messages.push(Message::new("system", system));
    }
    let interactive = std::io::stdin().is_terminal() && !run.json;
    let mut lines = std::io::stdin().lock().lines();
    let outcome = (|| -> anyhow::Result<()> {
        loop {
            if interactive {
                eprint!("> ");
            }
            let Some(line) = lines.next() else {
                return Ok(());
            };
            let line = line.context("reading standard input")?;
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            messages.push(Message::new("user", line));
            let rendered = template.render(&messages, true)?;
            let ids = tok
                .encode(rendered, false)
                .map_err(|e| anyhow::anyhow!("tokenizing the conversation: {e}"))?
                .get_ids()
                .to_vec();
            if ids.len() >= cfg.n_positions as usize {
                bail!(
                    "the conversation has {} tokens; this model's context is {}: start a new one",
                    ids.len(),
                    cfg.n_positions
                );
            }
            // Streams the reply as tokens arrive (special tokens, the stop token among them,
            // are not shown).
            let json = run.json;
            let mut text_stream = veil_client::text::TextStream::new(&tok, true);
            let mut on_token = |t: u32| {
                if json {
                    return;
                }
                if let Some(new) = text_stream.push(t) {
                    print!("{new}");
                    let _ = std::io::stdout().flush();
                }
            };
            let (tokens, stats) = match (&mut private, &linear) {
                (Some(p), _) => p.generate(&ids, &opts, &mut on_token)?,
                (None, Some(linear)) => {
                    generate_reference(client.clone(), linear, &ids, &opts, &mut on_token)?
                }
                (None, None) => bail!("linear.veil is needed for --reference"),
            };
            let kept = tokens
                .iter()
                .position(|t| stops.contains(t))
                .map_or(&tokens[..], |i| &tokens[..i]);
            let text = tok
                .decode(kept, true)
                .map_err(|e| anyhow::anyhow!("decoding: {e}"))?;
            if json {
                let v = serde_json::json!({
                    "tokens": tokens,
                    "text": text,
                    "stats": stats_json(&stats),
                    "cached_tokens": stats.cached_tokens,
                });
                println!("{v}");
            } else {
                println!();
            }
            messages.push(Message::new("assistant", &text));
        }
    })();
    if let Some(p) = private {
        p.finish();
    }
    outcome
}

/// `veil-client serve`: the OpenAI-compatible endpoint, its worker owning the private session.
fn serve(args: ServeArgs) -> anyhow::Result<()> {
    use veil_client::chat::{stop_tokens, ChatError, ChatTemplate};
    use veil_client::serve::{Job, JobEvent, ServeConfig};
    let run = args.run;
    let Some(dir) = run.weights.clone() else {
        bail!("--weights DIR is required")
    };
    if run.reference {
        bail!("serve answers through the private path; --reference is for one-off generations");
    }
    let template = match ChatTemplate::from_model_dir(&dir) {
        Ok(t) => Some(t),
        Err(ChatError::NoTemplate(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let (local_lm_head, _) = lm_head_placement(&run);
    let need_linear = run.mask_source == MaskSourceKind::Online || local_lm_head;
    // Opened here to fail early and to read the tokenizer and limits; the worker opens its own.
    let files = ModelFiles::open(&dir, need_linear)?;
    let client = files.client()?;
    let tokenizer = files.tokenizer()?;
    let mut stops = match &template {
        Some(t) => stop_tokens(&dir, t, &tokenizer),
        None => Vec::new(),
    };
    stops.push(client.header().eos_token_id);
    stops.sort_unstable();
    stops.dedup();
    let config = ServeConfig {
        listen: args.listen,
        model: args.model_name.clone().unwrap_or_else(|| {
            dir.file_name()
                .map_or("veil".into(), |n| n.to_string_lossy().into_owned())
        }),
        template,
        tokenizer,
        stops: stops.clone(),
        defaults: gen_options(&run, stops),
        context: client.config().n_positions as usize,
        queue: args.queue,
    };
    drop(files);
    let worker = move |jobs: std::sync::mpsc::Receiver<Job>| {
        let files = match ModelFiles::open(&dir, need_linear) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("veil-client: error: {e}");
                return;
            }
        };
        let mut private: Option<Private<'_>> = None;
        for job in jobs {
            let fail = |e: anyhow::Error| {
                let _ = job.events.send(JobEvent::Failed(format!("{e:#}")));
            };
            if private.is_none() {
                match files
                    .client()
                    .map_err(anyhow::Error::from)
                    .and_then(|c| Private::open(&run, &files, c, true))
                {
                    Ok(p) => private = Some(p),
                    Err(e) => {
                        eprintln!("veil-client: {e:#}");
                        fail(e);
                        continue;
                    }
                }
            }
            let Some(p) = private.as_mut() else { continue };
            let events = job.events.clone();
            match p.generate(&job.ids, &job.opts, &mut |t| {
                let _ = events.send(JobEvent::Token(t));
            }) {
                Ok((tokens, stats)) => {
                    let _ = job.events.send(JobEvent::Done(tokens, stats));
                }
                Err(e) => {
                    eprintln!("veil-client: {e:#}");
                    fail(e);
                    // A new session for the next request (a new connection, a fresh cache).
                    if let Some(p) = private.take() {
                        p.finish();
                    }
                }
            }
        }
        if let Some(p) = private {
            p.finish();
        }
    };
    veil_client::serve::run(config, worker)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Some(Command::Precompute(a)) => precompute(a),
        Some(Command::Bench(a)) => veil_client::bench::run(a),
        Some(Command::Chat(a)) => chat(a),
        Some(Command::Serve(a)) => serve(a),
        None => run(cli.run),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nveil-client: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
