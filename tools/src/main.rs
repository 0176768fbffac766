//! `veil-tools`: command-line front end of the Veil weight tools.
//!
//! Each subcommand is an args struct with a `run` method; adding one means a variant in
//! [`Command`] and an arm in `main`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use veil_tools::synth::{self, LlamaPreset, Preset, SynthOptions};

/// Veil weight tools: prepare and check GPT-2 models for private inference.
#[derive(Debug, Parser)]
#[command(name = "veil-tools", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a random GPT-2 checkpoint in the Hugging Face layout (config.json, model.safetensors).
    ///
    /// For tests and benchmarks on machines that cannot download real weights. The same preset and
    /// seed always give byte-identical files.
    Synth(SynthArgs),
    /// Quantize a Hugging Face GPT-2 or LLaMA-family (Llama, Qwen2, SmolLM) checkpoint into
    /// Veil's format (linear.veil for the server,
    /// client.veil and tokenizer.json for the client, manifest.json).
    ///
    /// `--model` is a local directory (config.json, model.safetensors, tokenizer.json) or a hub id
    /// such as `distilgpt2`, downloaded into the Hugging Face cache when online.
    Quantize(QuantizeArgs),
    /// Perplexity of the integer pipeline and of the float reference over a text file, and how
    /// often their top-1 predictions agree.
    Eval(EvalArgs),
}

#[derive(Debug, Args)]
struct QuantizeArgs {
    /// Hugging Face model directory or hub id (e.g. distilgpt2, openai-community/gpt2).
    #[arg(long)]
    model: String,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
    /// Calibrate SmoothQuant on this text (e.g. WikiText-2 valid): migrates activation outliers
    /// into the weights. Without it, weights are quantized as they are.
    #[arg(long, value_name = "FILE")]
    calibrate: Option<PathBuf>,
    /// Tokens of calibration text to run.
    #[arg(long, default_value_t = 4096)]
    calibration_tokens: usize,
    /// SmoothQuant migration strength (0..1).
    #[arg(long, default_value_t = 0.5)]
    smooth_alpha: f32,
}

impl QuantizeArgs {
    fn run(self) -> anyhow::Result<()> {
        use veil_tools::float_ref::{ActStats, FloatModel};
        use veil_tools::hf::Checkpoint;
        use veil_tools::quantize::{hex, quantize, write_model_dir, Provenance, QuantizeOptions};
        let files = veil_tools::hub::resolve_model(
            &self.model,
            &veil_tools::hub::HubOptions {
                progress: true,
                ..Default::default()
            },
        )?;
        let model_type = veil_tools::llama::model_type(&files.config)?;
        if veil_tools::llama::is_llama_family(&model_type) {
            return self.run_llama(&files);
        }
        eprintln!("loading {}", files.model.display());
        let ckpt = Checkpoint::load_files(&files.config, &files.model)?;
        let stats = match self.calibration_ids(&files.tokenizer)? {
            Some((ids, prefix)) => {
                let float = FloatModel::from_checkpoint(&ckpt);
                let mut stats = ActStats::new(&ckpt.config);
                calibrate(&ids, ckpt.config.n_positions, &prefix, |w| {
                    float.forward_with_stats(w, &mut stats);
                });
                Some((stats, ids.len()))
            }
            None => None,
        };
        let opts = QuantizeOptions {
            smooth_alpha: self.smooth_alpha,
            ..Default::default()
        };
        let pb = bar(ckpt.config.n_layer as u64 * 4 + 1, "quantizing");
        let q = quantize(
            &ckpt,
            stats.as_ref().map(|s| &s.0),
            &opts,
            &mut |done, _| pb.set_position(done as u64),
        )?;
        pb.finish_and_clear();
        let prov = Provenance {
            source: self.model.clone(),
            smooth_alpha: stats.as_ref().map(|_| self.smooth_alpha),
            calibration: stats
                .as_ref()
                .zip(self.calibrate.as_ref())
                .map(|(s, p)| (p.display().to_string(), s.1)),
        };
        write_model_dir(&self.out, &q, &files.tokenizer, &prov)?;
        println!(
            "wrote {} (linear.veil {} bytes, client.veil {} bytes, fingerprint {})",
            self.out.display(),
            q.linear.len(),
            q.client.len(),
            hex(&q.fingerprint)
        );
        Ok(())
    }
}

impl QuantizeArgs {
    /// The first `--calibration-tokens` ids of the `--calibrate` text (no special tokens), and
    /// what the tokenizer puts before every prompt (the LLaMA family's BOS; nothing for GPT-2
    /// or Qwen2), if calibrating.
    fn calibration_ids(
        &self,
        tokenizer: &std::path::Path,
    ) -> anyhow::Result<Option<(Vec<u32>, Vec<u32>)>> {
        let Some(path) = &self.calibrate else {
            return Ok(None);
        };
        let tok = veil_tools::tokenizer::Tokenizer::from_file(tokenizer)?;
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading {}", path.display()))?
            .replace("\r\n", "\n");
        let mut ids = tok.encode(&text)?;
        ids.truncate(self.calibration_tokens);
        if ids.is_empty() {
            anyhow::bail!("the calibration text {} has no tokens", path.display());
        }
        Ok(Some((ids, tok.encode_with_special_tokens("")?)))
    }

    /// The LLaMA family: BOS/EOS from the checkpoint's files; SmoothQuant folded into the float
    /// weights before quantizing ([`veil_tools::llama::LlamaCheckpoint::smoothed`]).
    fn run_llama(&self, files: &veil_tools::hub::ModelFiles) -> anyhow::Result<()> {
        use veil_tools::llama::{quantize_llama, LlamaCheckpoint, LlamaFloat};
        use veil_tools::quantize::{hex, write_model_dir_with, Provenance};
        eprintln!("loading {}", files.config.display());
        let mut ckpt = LlamaCheckpoint::load_files(&files.config, Some(&files.model))?;
        let calibration = self.calibration_ids(&files.tokenizer)?;
        if let Some((ids, prefix)) = &calibration {
            let mut stats = ckpt.act_stats();
            // Long contexts are cut to 1024 positions: the statistics are per channel, not per
            // position.
            let window = ckpt.config.max_positions.min(1024);
            let float = LlamaFloat::new(ckpt);
            calibrate(ids, window, prefix, |w| {
                float.forward_with_stats(w, &mut stats);
            });
            ckpt = float
                .into_checkpoint()
                .smoothed(&stats, self.smooth_alpha)?;
        }
        let pb = bar(ckpt.config.n_layer as u64 * 4 + 1, "quantizing");
        let q = quantize_llama(&ckpt, &Default::default(), &mut |done, _| {
            pb.set_position(done as u64)
        })?;
        pb.finish_and_clear();
        let dir = files.config.parent().unwrap_or(std::path::Path::new("."));
        let extra = [
            veil_tools::llama::TOKENIZER_CONFIG_FILE,
            veil_tools::llama::GENERATION_CONFIG_FILE,
        ]
        .map(|f| dir.join(f));
        let prov = Provenance {
            source: self.model.clone(),
            smooth_alpha: calibration.as_ref().map(|_| self.smooth_alpha),
            calibration: calibration
                .as_ref()
                .zip(self.calibrate.as_ref())
                .map(|((ids, _), p)| (p.display().to_string(), ids.len())),
        };
        write_model_dir_with(&self.out, &q, &files.tokenizer, &extra, &prov)?;
        let c = &ckpt.config;
        println!(
            "wrote {} ({} {} layers, d={}, {}/{} heads, context {}; linear.veil {} bytes, \
             client.veil {} bytes, fingerprint {})",
            self.out.display(),
            c.model_type,
            c.n_layer,
            c.d,
            c.n_head,
            c.n_kv_head,
            q.config.n_positions,
            q.linear.len(),
            q.client.len(),
            hex(&q.fingerprint)
        );
        Ok(())
    }
}

#[derive(Debug, Args)]
struct EvalArgs {
    /// Model directory written by `quantize`.
    #[arg(long)]
    weights: PathBuf,
    /// The float checkpoint it came from (default: the `source` in its manifest.json).
    #[arg(long)]
    model: Option<String>,
    /// Text file (CRLF is read as LF).
    #[arg(long)]
    text: PathBuf,
    /// Use the first N tokens of the text (tokenized without special tokens).
    #[arg(long, default_value_t = 16384)]
    tokens: usize,
    /// Inputs per window (default: the model's context; the LLaMA golden protocol uses
    /// context - 1).
    #[arg(long)]
    window: Option<usize>,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

impl EvalArgs {
    fn run(self) -> anyhow::Result<()> {
        use veil_core::model::{ClientWeights, LinearWeights};
        use veil_tools::float_ref::FloatModel;
        use veil_tools::hf::Checkpoint;
        let manifest: serde_json::Value = serde_json::from_slice(
            &std::fs::read(self.weights.join("manifest.json"))
                .with_context(|| format!("reading {}/manifest.json", self.weights.display()))?,
        )?;
        let source = match &self.model {
            Some(m) => m.clone(),
            None => manifest["source"]
                .as_str()
                .context("manifest.json has no source; pass --model")?
                .to_string(),
        };
        let files =
            veil_tools::hub::resolve_model(&source, &veil_tools::hub::HubOptions::default())?;
        let model_type = veil_tools::llama::model_type(&files.config)?;
        let float: Box<dyn veil_tools::eval::FloatLogits> =
            if veil_tools::llama::is_llama_family(&model_type) {
                let ckpt = veil_tools::llama::LlamaCheckpoint::load_files(
                    &files.config,
                    Some(&files.model),
                )?;
                Box::new(veil_tools::llama::LlamaFloat::new(ckpt))
            } else {
                let ckpt = Checkpoint::load_files(&files.config, &files.model)?;
                Box::new(FloatModel::from_checkpoint(&ckpt))
            };
        let tok =
            veil_tools::tokenizer::Tokenizer::from_file(&self.weights.join("tokenizer.json"))?;
        let text = std::fs::read_to_string(&self.text)
            .with_context(|| format!("reading {}", self.text.display()))?
            .replace("\r\n", "\n");
        let ids = tok.encode(&text)?;
        let ids = &ids[..ids.len().min(self.tokens)];
        let client_bytes = std::fs::read(self.weights.join("client.veil"))?;
        let linear_bytes = std::fs::read(self.weights.join("linear.veil"))?;
        let client =
            ClientWeights::parse(&client_bytes).map_err(|e| anyhow::anyhow!("client.veil: {e}"))?;
        let linear =
            LinearWeights::parse(&linear_bytes).map_err(|e| anyhow::anyhow!("linear.veil: {e}"))?;
        let window = self
            .window
            .unwrap_or(client.config().n_positions as usize)
            .clamp(1, client.config().n_positions as usize);
        let windows = ids.len().saturating_sub(1).div_ceil(window) as u64;
        let pb = bar(windows, "evaluating");
        let report = veil_tools::eval::evaluate_windows(
            float.as_ref(),
            &client,
            &linear,
            ids,
            window,
            &|done, _| pb.set_position(done as u64),
        )
        .map_err(|e| anyhow::anyhow!("integer pipeline: {e}"))?;
        pb.finish_and_clear();
        if self.json {
            println!("{}", serde_json::to_string(&report)?);
        } else {
            println!("tokens          {}", report.tokens);
            println!("float ppl       {:.4}", report.float_ppl);
            println!("integer ppl     {:.4}", report.int_ppl);
            println!(
                "ppl change      {:+.4}%",
                report.relative_ppl_change * 100.0
            );
            println!("top-1 agreement {:.4}", report.top1_agreement);
        }
        Ok(())
    }
}

/// Runs `forward` over `ids` in windows of at most `window` positions, each starting with
/// `prefix` as the model's prompts do, with a progress bar: SmoothQuant's calibration pass.
fn calibrate(ids: &[u32], window: usize, prefix: &[u32], mut forward: impl FnMut(&[u32])) {
    let per = window.saturating_sub(prefix.len()).max(1);
    let bar = bar(ids.len().div_ceil(per) as u64, "calibrating");
    let mut w = Vec::with_capacity(window);
    for chunk in ids.chunks(per) {
        w.clear();
        w.extend_from_slice(prefix);
        w.extend_from_slice(chunk);
        forward(&w);
        bar.inc(1);
    }
    bar.finish_and_clear();
}

fn bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(&format!(
        "{what} {{bar:40}} {{pos}}/{{len}} ({{eta}} left)"
    ))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    pb.set_style(style);
    pb
}

#[derive(Debug, Args)]
struct SynthArgs {
    /// Model shape. GPT-2: tiny (2 layers, d=128), distilgpt2 (6, 768), gpt2 (12, 768),
    /// gpt2-medium (24, 1024) or gpt2-xl (48, 1600: 6.2 GB of f32 to write), all with GPT-2's
    /// 50257-token vocabulary. LLaMA family: tiny-llama and tiny-qwen2 (the golden tiny-llama's
    /// shape), smollm2-135m, qwen2.5-0.5b, llama-3.2-1b (about 5 GB of f32).
    #[arg(long, value_parser = parse_preset)]
    preset: AnyPreset,
    /// Output directory (created if missing; existing files of the same names are replaced).
    #[arg(long)]
    out: PathBuf,
    /// Seed of the ChaCha8 generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Make 3-6 residual channels 50-100x larger than the rest (through wpe and both c_proj
    /// outputs), like the activation outliers of real GPT-2.
    #[arg(long)]
    outliers: bool,
    /// Copy tokenizer.json (required) and vocab.json, merges.txt, tokenizer_config.json,
    /// special_tokens_map.json (if present) from this directory.
    #[arg(long, value_name = "DIR")]
    tokenizer_from: Option<PathBuf>,
}

/// A preset of either family.
#[derive(Debug, Clone, Copy)]
enum AnyPreset {
    Gpt2(Preset),
    Llama(LlamaPreset),
}

fn parse_preset(s: &str) -> Result<AnyPreset, String> {
    use clap::ValueEnum;
    if let Ok(p) = Preset::from_str(s, false) {
        return Ok(AnyPreset::Gpt2(p));
    }
    LlamaPreset::from_str(s, false)
        .map(AnyPreset::Llama)
        .map_err(|_| {
            let names: Vec<String> = Preset::value_variants()
                .iter()
                .filter_map(|p| p.to_possible_value())
                .chain(
                    LlamaPreset::value_variants()
                        .iter()
                        .filter_map(|p| p.to_possible_value()),
                )
                .map(|v| v.get_name().to_string())
                .collect();
            format!("unknown preset {s:?} (one of: {})", names.join(", "))
        })
}

impl SynthArgs {
    fn run(self) -> anyhow::Result<()> {
        let preset = match self.preset {
            AnyPreset::Gpt2(p) => p,
            AnyPreset::Llama(p) => {
                if self.outliers {
                    anyhow::bail!("--outliers is for the GPT-2 presets only");
                }
                let opts = synth::LlamaSynthOptions {
                    preset: p,
                    seed: self.seed,
                    tokenizer_from: self.tokenizer_from,
                    progress: true,
                };
                let bytes = synth::write_llama_checkpoint(&self.out, &opts)
                    .with_context(|| format!("synthesising into {}", self.out.display()))?;
                let c = p.config();
                println!(
                    "wrote {} ({} {} layers, d={}, {}/{} heads, {} positions, vocab {}; {bytes} \
                     bytes of weights)",
                    self.out.display(),
                    c.model_type,
                    c.n_layer,
                    c.d,
                    c.n_head,
                    c.n_kv_head,
                    c.max_positions,
                    c.vocab_size,
                );
                return Ok(());
            }
        };
        let opts = SynthOptions {
            preset,
            seed: self.seed,
            outliers: self.outliers,
            tokenizer_from: self.tokenizer_from,
            progress: true,
        };
        let report = synth::write_checkpoint(&self.out, &opts)
            .with_context(|| format!("synthesising into {}", self.out.display()))?;
        let c = &report.config;
        println!(
            "wrote {} ({} layers, d={}, {} heads, {} positions, vocab {}; {} bytes of weights)",
            self.out.display(),
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_positions,
            c.vocab_size,
            report.model_bytes
        );
        if !report.outlier_channels.is_empty() {
            println!("outlier channels: {:?}", report.outlier_channels);
        }
        Ok(())
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Synth(args) => args.run(),
        Command::Quantize(args) => args.run(),
        Command::Eval(args) => args.run(),
    }
}
