//! Random GPT-2 and LLaMA-family checkpoints in the Hugging Face layout, for tests and benchmarks
//! where a real model cannot be downloaded ([`write_checkpoint`] for GPT-2,
//! [`write_llama_checkpoint`] for the family's presets).
//!
//! The output directory looks like what `GPT2LMHeadModel.save_pretrained` writes: `config.json`,
//! `generation_config.json` and an F32 `model.safetensors` with `transformer.`-prefixed names and no
//! `lm_head.weight` (tied to `wte`), plus a `veil_synth.json` sidecar recording preset, seed and
//! outlier channels. Every tensor is drawn from its own ChaCha8 stream keyed by
//! `(seed, tensor index)`, so the bytes depend only on the seed and preset, and tensors are
//! generated one at a time while the file is written: peak memory is one tensor, not the model.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use safetensors::tensor::View;
use safetensors::{Dtype, SafeTensorError};

use crate::hf::{expected_shapes, Activation, GptConfig, CONFIG_FILE, MODEL_FILE};

/// Tokenizer files copied by `--tokenizer-from`; `tokenizer.json` is required, the rest optional.
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// Sidecar recording how a synthetic checkpoint was made (preset, seed, outlier channels).
pub const PROVENANCE_FILE: &str = "veil_synth.json";

/// Model sizes to synthesise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 2 layers, 128 wide, 4 heads, 256 positions (the shape of `shared/golden/tiny`).
    Tiny,
    /// 6 layers, 768 wide, 12 heads, 1024 positions (distilgpt2's shape).
    Distilgpt2,
    /// 12 layers, 768 wide, 12 heads, 1024 positions (GPT-2 small's shape).
    Gpt2,
    /// 24 layers, 1024 wide, 16 heads, 1024 positions (gpt2-medium's shape, 355M parameters).
    Gpt2Medium,
    /// 48 layers, 1600 wide, 25 heads, 1024 positions (gpt2-xl's shape, 1.56B parameters: about
    /// 6.2 GB of f32 safetensors and 1.6 GB once quantized).
    Gpt2Xl,
}

impl Preset {
    /// The config this preset describes (vocabulary 50257, `gelu_new`, `n_inner = 4·d`).
    pub fn config(self) -> GptConfig {
        let (n_layer, n_embd, n_head, n_positions) = match self {
            Preset::Tiny => (2, 128, 4, 256),
            Preset::Distilgpt2 => (6, 768, 12, 1024),
            Preset::Gpt2 => (12, 768, 12, 1024),
            Preset::Gpt2Medium => (24, 1024, 16, 1024),
            Preset::Gpt2Xl => (48, 1600, 25, 1024),
        };
        GptConfig {
            n_layer,
            n_embd,
            n_head,
            n_positions,
            vocab_size: 50257,
            n_inner: 4 * n_embd,
            layer_norm_epsilon: 1e-5,
            activation: Activation::GeluNew,
        }
    }
}

/// What to synthesise.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Model size.
    pub preset: Preset,
    /// RNG seed; equal seeds give byte-identical files.
    pub seed: u64,
    /// Plant GPT-2-like activation outliers (see [`write_checkpoint`]).
    pub outliers: bool,
    /// Directory to copy tokenizer files from.
    pub tokenizer_from: Option<PathBuf>,
    /// Draw a progress bar on stderr (hidden anyway when stderr is not a terminal).
    pub progress: bool,
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthReport {
    /// The model's config.
    pub config: GptConfig,
    /// Residual channels made large by `outliers` (empty without it), ascending.
    pub outlier_channels: Vec<usize>,
    /// Size of `model.safetensors` in bytes.
    pub model_bytes: u64,
}

/// Why synthesis failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SynthError {
    /// Creating, writing or copying a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The safetensors writer failed.
    #[error("{}: writing safetensors: {source:?}", path.display())]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// The writer's error.
        source: SafeTensorError,
    },
    /// `--tokenizer-from` has no `tokenizer.json`.
    #[error("{}: no tokenizer.json to copy", path.display())]
    MissingTokenizer {
        /// The directory given.
        path: PathBuf,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// How a tensor's values are drawn.
#[derive(Debug, Clone, Copy)]
enum Init {
    /// N(0, std²).
    Normal(f32),
    /// 1 + N(0, 0.05²): LayerNorm gains near one, not exactly one, so tests see their effect.
    NearOne,
}

/// A tensor generated on demand when the safetensors writer asks for its bytes.
struct LazyTensor {
    shape: Vec<usize>,
    init: Init,
    seed: u64,
    stream: u64,
    /// Multiplier per index of the last dimension (outlier channels), if any.
    col_scale: Option<Arc<Vec<f32>>>,
    progress: ProgressBar,
}

impl LazyTensor {
    fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl View for LazyTensor {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        let n = self.numel();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(self.stream);
        let mut normals = NormalPairs::default();
        let last = self.shape.last().copied().unwrap_or(1).max(1);
        let mut out = Vec::with_capacity(n * 4);
        for i in 0..n {
            let z = normals.next(&mut rng);
            let mut v = match self.init {
                Init::Normal(std) => std * z,
                Init::NearOne => 1.0 + 0.05 * z,
            };
            if let Some(s) = &self.col_scale {
                v *= s[i % last];
            }
            out.extend_from_slice(&v.to_le_bytes());
        }
        self.progress.inc(out.len() as u64);
        Cow::Owned(out)
    }
    fn data_len(&self) -> usize {
        self.numel() * 4
    }
}

/// Standard normals by Box–Muller, two per pair of uniforms.
#[derive(Default)]
struct NormalPairs {
    spare: Option<f32>,
}

impl NormalPairs {
    fn next(&mut self, rng: &mut ChaCha8Rng) -> f32 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // u1 in (0, 1] so ln(u1) is finite; 53-bit uniforms.
        let u1 = 1.0 - unit_f64(rng);
        let u2 = unit_f64(rng);
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some((r * s) as f32);
        (r * c) as f32
    }
}

/// Uniform in [0, 1).
fn unit_f64(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Stream reserved for choosing outlier channels (tensor streams are their indices).
const OUTLIER_STREAM: u64 = u64::MAX;

/// Picks 3–6 distinct residual channels and their scales in [50, 100) from the seed.
fn choose_outliers(seed: u64, d: usize) -> (Vec<usize>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(OUTLIER_STREAM);
    let k = (3 + rng.next_u64() % 4) as usize;
    let k = k.min(d);
    let mut chans: Vec<usize> = Vec::with_capacity(k);
    while chans.len() < k {
        let c = (rng.next_u64() % d as u64) as usize;
        if !chans.contains(&c) {
            chans.push(c);
        }
    }
    chans.sort_unstable();
    let mut resid = vec![1f32; d];
    for &c in &chans {
        resid[c] = (50.0 + 50.0 * unit_f64(&mut rng)) as f32;
    }
    (chans, resid)
}

/// Writes a random checkpoint into `out` (created if missing; files of the same names are
/// replaced).
///
/// Initialisation follows GPT-2: weights N(0, 0.02²), the two `c_proj` weights
/// N(0, (0.02/√(2·n_layer))²), LayerNorm gains 1 + N(0, 0.05²), biases N(0, 0.01²).
///
/// With `outliers`, a few residual channels are made 50–100× larger, the way real GPT-2 has them:
/// those columns of `wpe` (the residual stream's input) and of both `c_proj` outputs (weights and
/// bias, so every block keeps writing them). LayerNorm then hands them on: its outputs have a few
/// channels ~100× the rest, which is what breaks per-row int8. `wte` is left alone because it is
/// also the LM head: scaling it would plant outliers in weights, not activations.
pub fn write_checkpoint(out: &Path, opts: &SynthOptions) -> Result<SynthReport, SynthError> {
    let config = opts.preset.config();
    let d = config.n_embd;
    std::fs::create_dir_all(out).map_err(io_err(out))?;

    let (outlier_channels, resid_scale) = if opts.outliers {
        let (c, r) = choose_outliers(opts.seed, d);
        (c, Some(Arc::new(r)))
    } else {
        (Vec::new(), None)
    };

    let specs = expected_shapes(&config);
    let progress = write_progress(&specs, opts.progress);

    let proj_std = 0.02 / (2.0 * config.n_layer as f32).sqrt();
    let tensors: Vec<(String, LazyTensor)> = specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let is = |suffix: &str| name.ends_with(suffix);
            let init = if is("ln_1.weight") || is("ln_2.weight") || is("ln_f.weight") {
                Init::NearOne
            } else if is(".bias") {
                Init::Normal(0.01)
            } else if is("c_proj.weight") {
                Init::Normal(proj_std)
            } else {
                Init::Normal(0.02)
            };
            let col_scale = if name == "wpe.weight"
                || is("attn.c_proj.weight")
                || is("attn.c_proj.bias")
                || is("mlp.c_proj.weight")
                || is("mlp.c_proj.bias")
            {
                resid_scale.clone()
            } else {
                None
            };
            let tensor = LazyTensor {
                shape,
                init,
                seed: opts.seed,
                stream: i as u64,
                col_scale,
                progress: progress.clone(),
            };
            (format!("transformer.{name}"), tensor)
        })
        .collect();

    // Tokenizer first: a missing source is a usage error best reported before minutes of writing.
    if let Some(src) = &opts.tokenizer_from {
        if !src.join(TOKENIZER_FILES[0]).is_file() {
            return Err(SynthError::MissingTokenizer { path: src.clone() });
        }
        for name in TOKENIZER_FILES {
            let from = src.join(name);
            if from.is_file() {
                let to = out.join(name);
                std::fs::copy(&from, &to).map_err(io_err(&to))?;
            }
        }
    }

    let config_path = out.join(CONFIG_FILE);
    write_text(&config_path, &config_json(&config))?;
    let gen_path = out.join("generation_config.json");
    write_text(
        &gen_path,
        "{\n  \"_from_model_config\": true,\n  \"bos_token_id\": 50256,\n  \"eos_token_id\": 50256,\n  \"transformers_version\": \"4.31.0\"\n}\n",
    )?;

    // Provenance goes in a sidecar, not in the safetensors metadata: that is a HashMap, whose key
    // order (and so the file's bytes) would vary from run to run with more than one entry.
    let provenance = serde_json::json!({
        "preset": clap::ValueEnum::to_possible_value(&opts.preset)
            .map(|v| v.get_name().to_owned()),
        "seed": opts.seed,
        "outlier_channels": outlier_channels,
    });
    let model_bytes = write_model(out, &provenance, tensors, &progress)?;

    Ok(SynthReport {
        config,
        outlier_channels,
        model_bytes,
    })
}

fn write_text(path: &Path, text: &str) -> Result<(), SynthError> {
    std::fs::write(path, text).map_err(io_err(path))
}

/// `config.json` with the fields `transformers` 4.31 writes for `GPT2LMHeadModel` (keys sorted,
/// two-space indent, as `save_pretrained` does).
fn config_json(c: &GptConfig) -> String {
    let v = serde_json::json!({
        "activation_function": c.activation.hf_name(),
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1,
        "bos_token_id": 50256,
        "embd_pdrop": 0.1,
        "eos_token_id": 50256,
        "initializer_range": 0.02,
        "layer_norm_epsilon": c.layer_norm_epsilon,
        "model_type": "gpt2",
        "n_ctx": c.n_positions,
        "n_embd": c.n_embd,
        "n_head": c.n_head,
        "n_inner": null,
        "n_layer": c.n_layer,
        "n_positions": c.n_positions,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": 0.1,
        "scale_attn_by_inverse_layer_idx": false,
        "scale_attn_weights": true,
        "summary_activation": null,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": true,
        "summary_type": "cls_index",
        "summary_use_proj": true,
        "torch_dtype": "float32",
        "transformers_version": "4.31.0",
        "use_cache": true,
        "vocab_size": c.vocab_size,
    });
    // serde_json's default map is a BTreeMap, so keys come out sorted like transformers' output.
    let mut s = serde_json::to_string_pretty(&v).unwrap_or_default();
    s.push('\n');
    s
}

/// LLaMA-family shapes to synthesise (`veil-tools synth --preset smollm2-135m` and the others).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LlamaPreset {
    /// The shape of `shared/golden/tiny-llama`: 2 layers, 128 wide, 4 query and 2 KV heads,
    /// intermediate 352, vocabulary 8192, 256 positions, RoPE with llama3 scaling, untied head.
    #[value(name = "tiny-llama")]
    TinyLlama,
    /// A Qwen2-style tiny model: as `tiny-llama` with q/k/v biases, plain RoPE, a tied head.
    #[value(name = "tiny-qwen2")]
    TinyQwen2,
    /// SmolLM2-135M: 30 layers, 576 wide, 9/3 heads, intermediate 1536, vocabulary 49152,
    /// `rope_theta` 100000, tied head.
    #[value(name = "smollm2-135m")]
    Smollm2_135m,
    /// Qwen2.5-0.5B: 24 layers, 896 wide, 14/2 heads, intermediate 4864, vocabulary 151936,
    /// `rope_theta` 1e6, q/k/v biases, tied head.
    #[value(name = "qwen2.5-0.5b")]
    Qwen25_05b,
    /// Llama-3.2-1B: 16 layers, 2048 wide, 32/8 heads, intermediate 8192, vocabulary 128256,
    /// `rope_theta` 500000 with llama3 scaling (factor 32), tied head (about 5 GB of f32).
    #[value(name = "llama-3.2-1b")]
    Llama32_1b,
}

impl LlamaPreset {
    /// The `config.json` this preset writes (the hub models' values, from their `config.json`).
    pub fn config_json(self) -> serde_json::Value {
        use serde_json::json;
        let llama3 = |factor: f64, orig: u32| {
            json!({"factor": factor, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                   "original_max_position_embeddings": orig, "rope_type": "llama3"})
        };
        // (model_type, layers, hidden, heads, kv heads, inner, vocab, positions, theta, eps,
        //  rope_scaling, tied, bos, eos)
        let (mt, l, d, h, kv, inner, vocab, pos, theta, eps, scaling, tied, bos, eos) = match self {
            LlamaPreset::TinyLlama => (
                "llama",
                2,
                128,
                4,
                2,
                352,
                8192,
                256,
                500000.0,
                1e-5,
                llama3(8.0, 64),
                false,
                0,
                4,
            ),
            LlamaPreset::TinyQwen2 => (
                "qwen2",
                2,
                128,
                4,
                2,
                352,
                8192,
                256,
                1e6,
                1e-6,
                serde_json::Value::Null,
                true,
                0,
                4,
            ),
            LlamaPreset::Smollm2_135m => (
                "llama",
                30,
                576,
                9,
                3,
                1536,
                49152,
                8192,
                100000.0,
                1e-5,
                serde_json::Value::Null,
                true,
                1,
                2,
            ),
            LlamaPreset::Qwen25_05b => (
                "qwen2",
                24,
                896,
                14,
                2,
                4864,
                151936,
                32768,
                1e6,
                1e-6,
                serde_json::Value::Null,
                true,
                151643,
                151645,
            ),
            LlamaPreset::Llama32_1b => (
                "llama",
                16,
                2048,
                32,
                8,
                8192,
                128256,
                131072,
                500000.0,
                1e-5,
                llama3(32.0, 8192),
                true,
                128000,
                128001,
            ),
        };
        let arch = if mt == "qwen2" {
            "Qwen2ForCausalLM"
        } else {
            "LlamaForCausalLM"
        };
        json!({
            "architectures": [arch],
            "attention_bias": false,
            "bos_token_id": bos,
            "eos_token_id": eos,
            "head_dim": d / h,
            "hidden_act": "silu",
            "hidden_size": d,
            "intermediate_size": inner,
            "max_position_embeddings": pos,
            "mlp_bias": false,
            "model_type": mt,
            "num_attention_heads": h,
            "num_hidden_layers": l,
            "num_key_value_heads": kv,
            "rms_norm_eps": eps,
            "rope_scaling": scaling,
            "rope_theta": theta,
            "tie_word_embeddings": tied,
            "torch_dtype": "float32",
            "transformers_version": "4.46.3",
            "vocab_size": vocab,
        })
    }

    /// The validated config of this preset.
    pub fn config(self) -> crate::llama::LlamaConfig {
        let text = self.config_json().to_string();
        // The presets are written above and parse by construction (a test checks every one).
        crate::llama::LlamaConfig::from_json(&text, Path::new("preset"))
            .unwrap_or_else(|e| panic!("preset {self:?}: {e}"))
    }
}

/// What [`write_llama_checkpoint`] writes.
#[derive(Debug, Clone)]
pub struct LlamaSynthOptions {
    /// Model shape.
    pub preset: LlamaPreset,
    /// RNG seed; equal seeds give byte-identical files.
    pub seed: u64,
    /// Directory to copy tokenizer files from.
    pub tokenizer_from: Option<PathBuf>,
    /// Draw a progress bar on stderr.
    pub progress: bool,
}

/// Writes a random LLaMA-family checkpoint into `out`, as `save_pretrained` lays it out:
/// `config.json`, `generation_config.json` and an F32 `model.safetensors` with `model.`-prefixed
/// names (and `lm_head.weight` only when the head is untied). Weights N(0, 0.02²), `o_proj` and
/// `down_proj` N(0, (0.02/√(2·n_layer))²), norm gains 1 + N(0, 0.05²), biases N(0, 0.01²).
/// Returns the size of `model.safetensors`.
pub fn write_llama_checkpoint(out: &Path, opts: &LlamaSynthOptions) -> Result<u64, SynthError> {
    let c = opts.preset.config();
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let (d, kvd) = (c.d, c.n_kv_head * c.head_dim());
    let mut specs: Vec<(String, Vec<usize>)> =
        vec![("model.embed_tokens.weight".into(), vec![c.vocab_size, d])];
    for i in 0..c.n_layer {
        let p = format!("model.layers.{i}");
        let mut s = vec![
            (format!("{p}.input_layernorm.weight"), vec![d]),
            (format!("{p}.self_attn.q_proj.weight"), vec![d, d]),
            (format!("{p}.self_attn.k_proj.weight"), vec![kvd, d]),
            (format!("{p}.self_attn.v_proj.weight"), vec![kvd, d]),
        ];
        if c.qkv_bias {
            s.push((format!("{p}.self_attn.q_proj.bias"), vec![d]));
            s.push((format!("{p}.self_attn.k_proj.bias"), vec![kvd]));
            s.push((format!("{p}.self_attn.v_proj.bias"), vec![kvd]));
        }
        s.extend([
            (format!("{p}.self_attn.o_proj.weight"), vec![d, d]),
            (format!("{p}.post_attention_layernorm.weight"), vec![d]),
            (format!("{p}.mlp.gate_proj.weight"), vec![c.inner, d]),
            (format!("{p}.mlp.up_proj.weight"), vec![c.inner, d]),
            (format!("{p}.mlp.down_proj.weight"), vec![d, c.inner]),
        ]);
        specs.extend(s);
    }
    specs.push(("model.norm.weight".into(), vec![d]));
    if !c.tied {
        specs.push(("lm_head.weight".into(), vec![c.vocab_size, d]));
    }
    let progress = write_progress(&specs, opts.progress);
    let proj_std = 0.02 / (2.0 * c.n_layer as f32).sqrt();
    let tensors: Vec<(String, LazyTensor)> = specs
        .into_iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let init = if name.ends_with("norm.weight") {
                Init::NearOne
            } else if name.ends_with(".bias") {
                Init::Normal(0.01)
            } else if name.ends_with("o_proj.weight") || name.ends_with("down_proj.weight") {
                Init::Normal(proj_std)
            } else {
                Init::Normal(0.02)
            };
            let t = LazyTensor {
                shape,
                init,
                seed: opts.seed,
                stream: i as u64,
                col_scale: None,
                progress: progress.clone(),
            };
            (name, t)
        })
        .collect();
    if let Some(src) = &opts.tokenizer_from {
        if !src.join(TOKENIZER_FILES[0]).is_file() {
            return Err(SynthError::MissingTokenizer { path: src.clone() });
        }
        for name in TOKENIZER_FILES {
            let from = src.join(name);
            if from.is_file() {
                let to = out.join(name);
                std::fs::copy(&from, &to).map_err(io_err(&to))?;
            }
        }
    }
    let cj = opts.preset.config_json();
    write_text(
        &out.join(CONFIG_FILE),
        &format!(
            "{}\n",
            serde_json::to_string_pretty(&cj).unwrap_or_default()
        ),
    )?;
    let gen = serde_json::json!({
        "_from_model_config": true,
        "bos_token_id": cj["bos_token_id"],
        "eos_token_id": cj["eos_token_id"],
        "transformers_version": "4.46.3",
    });
    write_text(
        &out.join(crate::llama::GENERATION_CONFIG_FILE),
        &format!(
            "{}\n",
            serde_json::to_string_pretty(&gen).unwrap_or_default()
        ),
    )?;
    let provenance = serde_json::json!({
        "preset": clap::ValueEnum::to_possible_value(&opts.preset)
            .map(|v| v.get_name().to_owned()),
        "seed": opts.seed,
    });
    write_model(out, &provenance, tensors, &progress)
}

/// Writes the provenance sidecar and `model.safetensors` (the tensors generated as they are
/// written, counted by `progress`); returns the model file's size.
fn write_model(
    out: &Path,
    provenance: &serde_json::Value,
    tensors: Vec<(String, LazyTensor)>,
    progress: &ProgressBar,
) -> Result<u64, SynthError> {
    write_text(&out.join(PROVENANCE_FILE), &format!("{provenance:#}\n"))?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    // Write under a temporary name and rename, so an interrupted run never leaves a file that
    // looks complete.
    let model_path = out.join(MODEL_FILE);
    let tmp_path = out.join(format!("{MODEL_FILE}.partial"));
    safetensors::serialize_to_file(tensors, &Some(metadata), &tmp_path).map_err(|source| {
        SynthError::Safetensors {
            path: tmp_path.clone(),
            source,
        }
    })?;
    std::fs::rename(&tmp_path, &model_path).map_err(io_err(&model_path))?;
    progress.finish_and_clear();
    Ok(std::fs::metadata(&model_path)
        .map_err(io_err(&model_path))?
        .len())
}

/// The progress bar of writing `specs`' F32 tensors (hidden unless `shown`), counting bytes.
fn write_progress(specs: &[(String, Vec<usize>)], shown: bool) -> ProgressBar {
    if !shown {
        return ProgressBar::hidden();
    }
    let total: u64 = specs
        .iter()
        .map(|(_, s)| 4 * s.iter().product::<usize>() as u64)
        .sum();
    let pb = ProgressBar::new(total);
    if let Ok(style) =
        ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({eta})")
    {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_message(format!("writing {MODEL_FILE}"));
    pb
}
