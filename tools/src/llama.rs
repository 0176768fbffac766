//! The LLaMA family (Llama 2/3, Qwen2, SmolLM): checkpoints, the f32 reference forward pass and
//! quantization into Veil's format.
//!
//! [`LlamaCheckpoint::load`] reads what `transformers` writes for `LlamaForCausalLM` and
//! `Qwen2ForCausalLM`: `config.json`, the weights in `model.safetensors` or sharded with
//! `model.safetensors.index.json`, and (when present) `generation_config.json`, whose BOS/EOS
//! take precedence over the config's, as in `transformers`' `generate`. Weights keep the
//! `nn.Linear` layout, `[out, in]` row-major; every shape is checked against the config before
//! anything else sees it.
//!
//! [`LlamaFloat`] is the f32 reference (norms and RoPE angles in f64) the integer pipeline is
//! measured against, and [`quantize_llama`] writes the two weight files: fused q|k|v, o_proj, fused
//! gate|up, down_proj and the LM head as int8 per output channel, everything else for the client.
//! SmoothQuant happens before, on the float weights: [`LlamaFloat::forward_with_stats`] collects
//! the activation maxima and [`LlamaCheckpoint::smoothed`] folds the factors in.

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use veil_core::fixed::from_f64;
use veil_core::model::format::{
    encode_client_header, encode_linear_header, ClientHeader, ClientLayout, LinearLayout,
    HEADER_LEN,
};
use veil_core::model::{Family, LinearId, LinearKind, ModelConfig, MAX_HEAD_DIM};
use veil_core::quant::BlockI16;
use veil_core::rope::{Llama3Scaling, RopeConfig, RopeScaling};

use crate::float_ref::{linear_t, update_max_abs, ActStats, BlockActStats};
use crate::hf::{check_shape, convert, io_error, parse_safetensors, HfError, CONFIG_FILE};
use crate::quantize::{
    put_linear_channels, smooth_factors_from_max, QuantizeError, QuantizedModel,
};

/// The index of a sharded checkpoint.
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// `generation_config.json`: BOS/EOS for generation.
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
/// `tokenizer_config.json` (its chat template is for the chat front end).
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";

/// `model_type` of `config.json`, to choose between GPT-2 and this family.
pub fn model_type(config_path: &Path) -> Result<String, HfError> {
    #[derive(Deserialize)]
    struct T {
        model_type: Option<String>,
    }
    let text = std::fs::read_to_string(config_path).map_err(|e| io_error(config_path, e))?;
    let t: T = serde_json::from_str(&text).map_err(|e| HfError::BadConfig {
        path: config_path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })?;
    Ok(t.model_type.unwrap_or_default())
}

/// Whether a `model_type` is one this module reads.
pub fn is_llama_family(model_type: &str) -> bool {
    matches!(model_type, "llama" | "qwen2")
}

/// The hyper-parameters of a LLaMA-family model, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// `model_type` (`llama` or `qwen2`).
    pub model_type: String,
    /// Blocks.
    pub n_layer: usize,
    /// Residual width.
    pub d: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// `intermediate_size`.
    pub inner: usize,
    /// `max_position_embeddings`.
    pub max_positions: usize,
    /// Vocabulary.
    pub vocab_size: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// `rope_theta` and `rope_scaling`.
    pub rope: RopeConfig,
    /// `tie_word_embeddings`.
    pub tied: bool,
    /// q/k/v biases (Qwen2 always; Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Beginning-of-text token.
    pub bos_token_id: Option<u32>,
    /// End-of-text tokens (the first is the one the client stops at by default).
    pub eos_token_ids: Vec<u32>,
}

#[derive(Deserialize)]
struct RawRopeScaling {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f32>,
    high_freq_factor: Option<f32>,
    original_max_position_embeddings: Option<u32>,
}

/// One id or a list of them, as `bos_token_id` / `eos_token_id` may be.
#[derive(Deserialize)]
#[serde(untagged)]
enum Ids {
    One(u32),
    Many(Vec<u32>),
}

impl Ids {
    fn into_vec(self) -> Vec<u32> {
        match self {
            Ids::One(i) => vec![i],
            Ids::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    max_position_embeddings: Option<usize>,
    vocab_size: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<RawRopeScaling>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    hidden_act: Option<String>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<Ids>,
    eos_token_id: Option<Ids>,
}

#[derive(Deserialize)]
struct RawGenerationConfig {
    bos_token_id: Option<Ids>,
    eos_token_id: Option<Ids>,
}

impl LlamaConfig {
    /// Reads `config.json` and, when given and present, `generation_config.json`.
    pub fn from_files(config: &Path, generation: Option<&Path>) -> Result<Self, HfError> {
        let text = std::fs::read_to_string(config).map_err(|e| io_error(config, e))?;
        let mut c = Self::from_json(&text, config)?;
        if let Some(g) = generation.filter(|g| g.is_file()) {
            let text = std::fs::read_to_string(g).map_err(|e| io_error(g, e))?;
            let raw: RawGenerationConfig =
                serde_json::from_str(&text).map_err(|e| HfError::BadConfig {
                    path: g.to_path_buf(),
                    reason: format!("not a generation config: {e}"),
                })?;
            if let Some(b) = raw.bos_token_id {
                c.bos_token_id = b.into_vec().first().copied();
            }
            if let Some(e) = raw.eos_token_id {
                c.eos_token_ids = e.into_vec();
            }
        }
        Ok(c)
    }

    /// Parses and validates the text of a `config.json`; `path` is only used in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, HfError> {
        let bad = |reason: String| HfError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawConfig = serde_json::from_str(text)
            .map_err(|e| bad(format!("not a LLaMA-family config: {e}")))?;
        let model_type = raw.model_type.unwrap_or_default();
        if !is_llama_family(&model_type) {
            return Err(bad(format!(
                "model_type is {model_type:?}, expected \"llama\" or \"qwen2\""
            )));
        }
        let need = |v: Option<usize>, name: &str| match v {
            Some(0) => Err(bad(format!("{name} is 0"))),
            Some(n) => Ok(n),
            None => Err(bad(format!("{name} is missing"))),
        };
        let d = need(raw.hidden_size, "hidden_size")?;
        let n_head = need(raw.num_attention_heads, "num_attention_heads")?;
        let n_kv_head = raw.num_key_value_heads.unwrap_or(n_head);
        if n_kv_head == 0 || n_head % n_kv_head != 0 {
            return Err(bad(format!(
                "num_key_value_heads {n_kv_head} does not divide num_attention_heads {n_head}"
            )));
        }
        if d % n_head != 0 {
            return Err(bad(format!(
                "hidden_size {d} is not a multiple of num_attention_heads {n_head}"
            )));
        }
        // The integer pipeline takes head_dim = hidden_size / heads (true of every model of the
        // family we know); a config that says otherwise is refused, not computed wrongly.
        if let Some(h) = raw.head_dim {
            if h != d / n_head {
                return Err(bad(format!(
                    "head_dim {h} differs from hidden_size / num_attention_heads = {}",
                    d / n_head
                )));
            }
        }
        if (d / n_head) % 2 != 0 || d / n_head > MAX_HEAD_DIM {
            return Err(bad(format!("head width {} is not supported", d / n_head)));
        }
        match raw.hidden_act.as_deref() {
            None | Some("silu") => {}
            Some(other) => return Err(bad(format!("hidden_act {other:?} is not \"silu\""))),
        }
        if raw.mlp_bias == Some(true) {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        if raw.use_sliding_window == Some(true) {
            return Err(bad("use_sliding_window = true is not supported".into()));
        }
        let scaling = match raw.rope_scaling {
            None => RopeScaling::None,
            Some(s) => match s.rope_type.as_deref().or(s.kind.as_deref()) {
                Some("default") => RopeScaling::None,
                Some("llama3") => {
                    let (Some(factor), Some(low), Some(high), Some(orig)) = (
                        s.factor,
                        s.low_freq_factor,
                        s.high_freq_factor,
                        s.original_max_position_embeddings,
                    ) else {
                        return Err(bad("rope_scaling llama3 lacks a field".into()));
                    };
                    if !(factor > 0.0 && high > low && orig > 0) {
                        return Err(bad("rope_scaling llama3 has unusable values".into()));
                    }
                    RopeScaling::Llama3(Llama3Scaling {
                        factor,
                        low_freq_factor: low,
                        high_freq_factor: high,
                        original_max_positions: orig,
                    })
                }
                other => {
                    return Err(bad(format!(
                        "rope_scaling type {other:?} is not supported (only llama3)"
                    )))
                }
            },
        };
        let theta = raw.rope_theta.unwrap_or(10000.0);
        let eps = raw.rms_norm_eps.unwrap_or(1e-6);
        if !(theta.is_finite() && theta > 1.0 && eps.is_finite() && eps > 0.0) {
            return Err(bad("rope_theta or rms_norm_eps is unusable".into()));
        }
        let qwen = model_type == "qwen2";
        Ok(LlamaConfig {
            n_layer: need(raw.num_hidden_layers, "num_hidden_layers")?,
            d,
            n_head,
            n_kv_head,
            inner: need(raw.intermediate_size, "intermediate_size")?,
            max_positions: need(raw.max_position_embeddings, "max_position_embeddings")?,
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            rms_norm_eps: eps,
            rope: RopeConfig { theta, scaling },
            tied: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: qwen || raw.attention_bias == Some(true),
            bos_token_id: raw.bos_token_id.and_then(|b| b.into_vec().first().copied()),
            eos_token_ids: raw.eos_token_id.map(Ids::into_vec).unwrap_or_default(),
            model_type,
        })
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.d / self.n_head
    }

    /// The core's configuration. The context is the checkpoint's, capped at what the integer
    /// attention sums exactly (the family has no position table in `client.veil`,
    /// so the cap costs nothing but context).
    pub fn model_config(&self) -> Result<ModelConfig, veil_core::model::ConfigError> {
        let cfg = ModelConfig {
            n_layer: self.n_layer as u32,
            n_embd: self.d as u32,
            n_head: self.n_head as u32,
            n_positions: self
                .max_positions
                .min(veil_core::model::MAX_POSITIONS as usize) as u32,
            vocab_size: self.vocab_size as u32,
            n_inner: self.inner as u32,
            family: Family::Llama {
                n_kv_head: self.n_kv_head as u32,
                qkv_bias: self.qkv_bias,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// One block's weights (`nn.Linear` layout, `[out, in]`).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaBlock {
    /// `input_layernorm.weight`, `[d]`.
    pub input_norm: Vec<f32>,
    /// `q_proj.weight`, `[n_head·dh, d]`.
    pub q: Vec<f32>,
    /// `k_proj.weight`, `[n_kv_head·dh, d]`.
    pub k: Vec<f32>,
    /// `v_proj.weight`, `[n_kv_head·dh, d]`.
    pub v: Vec<f32>,
    /// q, k and v biases concatenated (`[d + 2·n_kv_head·dh]`), when the model has them.
    pub qkv_bias: Option<Vec<f32>>,
    /// `o_proj.weight`, `[d, d]`.
    pub o: Vec<f32>,
    /// `post_attention_layernorm.weight`, `[d]`.
    pub post_norm: Vec<f32>,
    /// `gate_proj.weight`, `[inner, d]`.
    pub gate: Vec<f32>,
    /// `up_proj.weight`, `[inner, d]`.
    pub up: Vec<f32>,
    /// `down_proj.weight`, `[d, inner]`.
    pub down: Vec<f32>,
}

/// A LLaMA-family checkpoint in f32, shapes checked against its config.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaCheckpoint {
    /// The validated config.
    pub config: LlamaConfig,
    /// `embed_tokens.weight`, `[vocab, d]`.
    pub embed: Vec<f32>,
    /// The blocks in order.
    pub blocks: Vec<LlamaBlock>,
    /// `norm.weight`, `[d]`.
    pub norm: Vec<f32>,
    /// `lm_head.weight`, `[vocab, d]` (a copy of `embed` when tied).
    pub lm_head: Vec<f32>,
}

/// The safetensors files of a checkpoint, mapped.
struct Shards {
    maps: Vec<(PathBuf, memmap2::Mmap)>,
    /// Tensor name → shard index (from the index file; every shard is searched without one).
    index: Option<HashMap<String, usize>>,
}

impl Shards {
    fn open(dir: &Path, model: Option<&Path>) -> Result<Self, HfError> {
        let single = model
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.join(crate::hf::MODEL_FILE));
        let index_path = dir.join(INDEX_FILE);
        let map = |p: &Path| -> Result<memmap2::Mmap, HfError> {
            let f = File::open(p).map_err(|e| io_error(p, e))?;
            // SAFETY: the map is read-only and lives as long as this loader. Another process
            // truncating the file while we read it could fault; the same holds for every
            // mmap-based loader (transformers included) and is accepted for local model files.
            unsafe { memmap2::Mmap::map(&f) }.map_err(|e| io_error(p, e))
        };
        if single.is_file() {
            let m = map(&single)?;
            return Ok(Shards {
                maps: vec![(single, m)],
                index: None,
            });
        }
        if !index_path.is_file() {
            return Err(HfError::MissingFile { path: single });
        }
        #[derive(Deserialize)]
        struct Index {
            weight_map: HashMap<String, String>,
        }
        let text = std::fs::read_to_string(&index_path).map_err(|e| io_error(&index_path, e))?;
        let idx: Index = serde_json::from_str(&text).map_err(|e| HfError::BadConfig {
            path: index_path.clone(),
            reason: format!("not a safetensors index: {e}"),
        })?;
        let files: BTreeSet<&String> = idx.weight_map.values().collect();
        let mut maps = vec![];
        let mut which = HashMap::new();
        for f in files {
            // Shard names come from a file; refuse anything that would leave the directory.
            if f.contains('/') || f.contains('\\') || f.starts_with('.') {
                return Err(HfError::BadConfig {
                    path: index_path.clone(),
                    reason: format!("shard name {f:?} is not a plain file name"),
                });
            }
            let p = dir.join(f);
            which.insert(f.clone(), maps.len());
            let m = map(&p)?;
            maps.push((p, m));
        }
        let index = idx
            .weight_map
            .iter()
            .map(|(t, f)| (t.clone(), which[f]))
            .collect();
        Ok(Shards {
            maps,
            index: Some(index),
        })
    }
}

struct Reader<'a> {
    parsed: Vec<(&'a Path, SafeTensors<'a>)>,
    index: Option<&'a HashMap<String, usize>>,
}

impl<'a> Reader<'a> {
    fn new(shards: &'a Shards) -> Result<Self, HfError> {
        let parsed = shards
            .maps
            .iter()
            .map(|(p, m)| parse_safetensors(m, p).map(|st| (p.as_path(), st)))
            .collect::<Result<_, _>>()?;
        Ok(Reader {
            parsed,
            index: shards.index.as_ref(),
        })
    }

    fn find(&self, name: &str) -> Option<(&'a Path, safetensors::tensor::TensorView<'_>)> {
        let candidates: Vec<usize> = match self.index.and_then(|i| i.get(name)) {
            Some(&i) => vec![i],
            None => (0..self.parsed.len()).collect(),
        };
        candidates.into_iter().find_map(|i| {
            let (p, st) = &self.parsed[i];
            st.tensor(name).ok().map(|v| (*p, v))
        })
    }

    fn has(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    /// `name` with its shape checked, converted to f32.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>, HfError> {
        let Some((path, view)) = self.find(name) else {
            return Err(HfError::MissingTensor {
                path: self
                    .parsed
                    .first()
                    .map(|p| p.0.to_path_buf())
                    .unwrap_or_default(),
                tensor: name.to_string(),
            });
        };
        check_shape(path, name, view.shape(), shape)?;
        Ok(match view.dtype() {
            Dtype::F32 => convert::<4>(view.data(), f32::from_le_bytes),
            Dtype::F16 => convert::<2>(view.data(), |b| half::f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => convert::<2>(view.data(), |b| half::bf16::from_le_bytes(b).to_f32()),
            other => {
                return Err(HfError::WrongDtype {
                    path: path.to_path_buf(),
                    tensor: name.to_string(),
                    dtype: format!("{other:?}"),
                })
            }
        })
    }
}

impl LlamaCheckpoint {
    /// Loads a checkpoint directory (single or sharded safetensors).
    pub fn load(dir: &Path) -> Result<Self, HfError> {
        Self::load_files(&dir.join(CONFIG_FILE), None)
    }

    /// Loads from `config` and the weights beside it (`model`, or the sharded index beside the
    /// config when `model` is `None` or absent).
    pub fn load_files(config: &Path, model: Option<&Path>) -> Result<Self, HfError> {
        if !config.is_file() {
            return Err(HfError::MissingFile {
                path: config.to_path_buf(),
            });
        }
        let dir = config.parent().unwrap_or(Path::new("."));
        let c = LlamaConfig::from_files(config, Some(&dir.join(GENERATION_CONFIG_FILE)))?;
        let shards = Shards::open(dir, model.filter(|m| m.is_file()))?;
        let r = Reader::new(&shards)?;
        let (d, dh) = (c.d, c.head_dim());
        let kvd = c.n_kv_head * dh;
        let embed = r.get("model.embed_tokens.weight", &[c.vocab_size, d])?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let p = format!("model.layers.{i}");
            let qkv_bias = if c.qkv_bias {
                let mut b = r.get(&format!("{p}.self_attn.q_proj.bias"), &[d])?;
                b.extend(r.get(&format!("{p}.self_attn.k_proj.bias"), &[kvd])?);
                b.extend(r.get(&format!("{p}.self_attn.v_proj.bias"), &[kvd])?);
                Some(b)
            } else {
                None
            };
            blocks.push(LlamaBlock {
                input_norm: r.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                q: r.get(&format!("{p}.self_attn.q_proj.weight"), &[d, d])?,
                k: r.get(&format!("{p}.self_attn.k_proj.weight"), &[kvd, d])?,
                v: r.get(&format!("{p}.self_attn.v_proj.weight"), &[kvd, d])?,
                qkv_bias,
                o: r.get(&format!("{p}.self_attn.o_proj.weight"), &[d, d])?,
                post_norm: r.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                gate: r.get(&format!("{p}.mlp.gate_proj.weight"), &[c.inner, d])?,
                up: r.get(&format!("{p}.mlp.up_proj.weight"), &[c.inner, d])?,
                down: r.get(&format!("{p}.mlp.down_proj.weight"), &[d, c.inner])?,
            });
        }
        let norm = r.get("model.norm.weight", &[d])?;
        // A tied head may still be stored (some exports do); an untied one must be.
        let lm_head = if c.tied && !r.has("lm_head.weight") {
            embed.clone()
        } else {
            r.get("lm_head.weight", &[c.vocab_size, d])?
        };
        Ok(LlamaCheckpoint {
            config: c,
            embed,
            blocks,
            norm,
            lm_head,
        })
    }
}

/// The f32 reference forward pass of the family (as `transformers` computes it in float32; the
/// norms' sums and the RoPE angles in f64).
#[derive(Debug, Clone)]
pub struct LlamaFloat {
    ckpt: LlamaCheckpoint,
    inv_freq: Vec<f64>,
}

impl LlamaFloat {
    /// Wraps a loaded checkpoint.
    pub fn new(ckpt: LlamaCheckpoint) -> Self {
        let dh = ckpt.config.head_dim();
        let mut inv_freq = vec![0f64; dh / 2];
        ckpt.config.rope.inv_freq(dh, &mut inv_freq);
        LlamaFloat { ckpt, inv_freq }
    }

    /// The config.
    pub fn config(&self) -> &LlamaConfig {
        &self.ckpt.config
    }

    /// The checkpoint back.
    pub fn into_checkpoint(self) -> LlamaCheckpoint {
        self.ckpt
    }

    /// Logits of every position, `tokens.len() · vocab`, row-major.
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        self.run(tokens, false, None)
    }

    /// Logits of the last position.
    pub fn forward_last(&self, tokens: &[u32]) -> Vec<f32> {
        self.run(tokens, true, None)
    }

    /// Like [`forward`](Self::forward), also folding every linear layer's input into `stats`
    /// (SmoothQuant calibration; shaped by [`LlamaCheckpoint::act_stats`]).
    ///
    /// # Panics
    /// If `stats` was shaped for another model.
    pub fn forward_with_stats(&self, tokens: &[u32], stats: &mut ActStats) -> Vec<f32> {
        let c = &self.ckpt.config;
        assert!(
            stats.has_shape(c.n_layer, c.d, c.inner),
            "ActStats shaped for another config"
        );
        self.run(tokens, false, Some(stats))
    }

    /// `n` greedy tokens after `prompt` (ties to the lowest id, as `torch.argmax`).
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Vec<u32> {
        let mut seq = prompt.to_vec();
        let mut out = vec![];
        for _ in 0..n {
            let l = self.forward_last(&seq);
            let t = argmax(&l);
            out.push(t);
            seq.push(t);
        }
        out
    }

    fn run(&self, tokens: &[u32], last_only: bool, mut stats: Option<&mut ActStats>) -> Vec<f32> {
        let c = &self.ckpt.config;
        let (d, dh, nh, nkv) = (c.d, c.head_dim(), c.n_head, c.n_kv_head);
        let kvd = nkv * dh;
        let t = tokens.len();
        let mut h = Vec::with_capacity(t * d);
        for &tok in tokens {
            let tok = (tok as usize).min(c.vocab_size - 1);
            h.extend_from_slice(&self.ckpt.embed[tok * d..(tok + 1) * d]);
        }
        // cos/sin per position and frequency.
        let half = dh / 2;
        let mut cos = vec![0f32; t * half];
        let mut sin = vec![0f32; t * half];
        for p in 0..t {
            for (i, &f) in self.inv_freq.iter().enumerate() {
                let a = p as f64 * f;
                cos[p * half + i] = a.cos() as f32;
                sin[p * half + i] = a.sin() as f32;
            }
        }
        let eps = c.rms_norm_eps;
        let scale = 1.0 / (dh as f32).sqrt();
        for (l, b) in self.ckpt.blocks.iter().enumerate() {
            let mut block_stats = stats.as_deref_mut().map(|s| &mut s.blocks[l]);
            let mut record = |pick: fn(&mut BlockActStats) -> &mut Vec<f32>, x: &[f32]| {
                if let Some(bs) = block_stats.as_deref_mut() {
                    update_max_abs(pick(bs), x);
                }
            };
            let x = rms_norm(&h, &b.input_norm, eps);
            record(|s| &mut s.c_attn, &x);
            let mut q = linear_t(&x, &b.q, d, d, b.qkv_bias.as_deref().map(|v| &v[..d]));
            let mut k = linear_t(
                &x,
                &b.k,
                d,
                kvd,
                b.qkv_bias.as_deref().map(|v| &v[d..d + kvd]),
            );
            let v = linear_t(
                &x,
                &b.v,
                d,
                kvd,
                b.qkv_bias.as_deref().map(|v| &v[d + kvd..]),
            );
            for p in 0..t {
                let (cs, sn) = (
                    &cos[p * half..(p + 1) * half],
                    &sin[p * half..(p + 1) * half],
                );
                for head in q[p * d..(p + 1) * d].chunks_exact_mut(dh) {
                    rotate(head, cs, sn);
                }
                for head in k[p * kvd..(p + 1) * kvd].chunks_exact_mut(dh) {
                    rotate(head, cs, sn);
                }
            }
            let group = nh / nkv;
            let mut att = vec![0f32; t * d];
            let mut w = vec![0f32; t];
            for p in 0..t {
                for hh in 0..nh {
                    let kh = hh / group;
                    let qv = &q[p * d + hh * dh..p * d + (hh + 1) * dh];
                    let mut max = f32::MIN;
                    for (s, wv) in w.iter_mut().enumerate().take(p + 1) {
                        let kv = &k[s * kvd + kh * dh..s * kvd + (kh + 1) * dh];
                        *wv = qv.iter().zip(kv).map(|(a, b)| a * b).sum::<f32>() * scale;
                        max = max.max(*wv);
                    }
                    let mut z = 0f32;
                    for wv in w.iter_mut().take(p + 1) {
                        *wv = (*wv - max).exp();
                        z += *wv;
                    }
                    let o = &mut att[p * d + hh * dh..p * d + (hh + 1) * dh];
                    for (s, &wv) in w.iter().enumerate().take(p + 1) {
                        let vv = &v[s * kvd + kh * dh..s * kvd + (kh + 1) * dh];
                        for (oi, &vi) in o.iter_mut().zip(vv) {
                            *oi += wv / z * vi;
                        }
                    }
                }
            }
            record(|s| &mut s.attn_proj, &att);
            let o = linear_t(&att, &b.o, d, d, None);
            add_assign(&mut h, &o);
            let x = rms_norm(&h, &b.post_norm, eps);
            record(|s| &mut s.c_fc, &x);
            let g = linear_t(&x, &b.gate, d, c.inner, None);
            let u = linear_t(&x, &b.up, d, c.inner, None);
            let m: Vec<f32> = g
                .iter()
                .zip(&u)
                .map(|(&g, &u)| g / (1.0 + (-g).exp()) * u)
                .collect();
            record(|s| &mut s.mlp_proj, &m);
            let down = linear_t(&m, &b.down, c.inner, d, None);
            add_assign(&mut h, &down);
        }
        let rows = if last_only { &h[(t - 1) * d..] } else { &h[..] };
        let x = rms_norm(rows, &self.ckpt.norm, eps);
        if let Some(s) = stats {
            update_max_abs(&mut s.lm_head, &x);
            s.rows += t;
        }
        linear_t(&x, &self.ckpt.lm_head, d, c.vocab_size, None)
    }
}

impl crate::eval::FloatLogits for LlamaFloat {
    fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        LlamaFloat::forward(self, tokens)
    }
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn add_assign(h: &mut [f32], x: &[f32]) {
    for (a, b) in h.iter_mut().zip(x) {
        *a += b;
    }
}

/// `rotate_half` RoPE of one head: pairs `(i, i + dh/2)`.
fn rotate(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = head.len() / 2;
    for i in 0..half {
        let (a, b) = (head[i], head[i + half]);
        head[i] = a * cos[i] - b * sin[i];
        head[i + half] = b * cos[i] + a * sin[i];
    }
}

/// RMSNorm of every `d`-wide row (mean square in f64), times `w`.
fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        out.extend(
            row.iter()
                .zip(w)
                .map(|(&v, &g)| (v as f64 * inv) as f32 * g),
        );
    }
    out
}

impl LlamaCheckpoint {
    /// Empty calibration statistics shaped for this model.
    pub fn act_stats(&self) -> ActStats {
        let c = &self.config;
        ActStats::with_shape(c.n_layer, c.d, c.inner)
    }

    /// The same model with SmoothQuant (Xiao et al., 2023) applied: per input channel of every
    /// linear layer a factor `s` (from `stats`, as for GPT-2, see [`crate::quantize`]) multiplies
    /// the layer's weights and divides what produces its input, so the float model computes the
    /// same function (up to f32 rounding) while the activations the client quantizes per row
    /// have their outlier channels tamed. Where each division goes, at no run-time cost:
    /// - q|k|v and gate|up: into the preceding RMSNorm's weight (a scale folds into it exactly;
    ///   RMSNorm has no shift to adjust);
    /// - o_proj: into the rows of `v_proj` (and the v bias), since attention's output is a
    ///   convex combination of values. With grouped-query attention the query heads of a group
    ///   share one KV head, so an o_proj input channel (head `h`, dim `i`) takes the factor of v
    ///   row (KV head `h / (n_head / n_kv_head)`, dim `i`), computed from the maxima over the
    ///   group;
    /// - down_proj: into the rows of `up_proj`, since `SiLU(g) · (u / s) = (SiLU(g) · u) / s`;
    /// - the LM head: into the final norm's weight (the head is its own copy even when tied, so
    ///   the token embedding does not change).
    ///
    /// Each layer's factors are computed after the folds into its weights, as for GPT-2.
    /// `alpha = 0` leaves the model unchanged.
    pub fn smoothed(&self, stats: &ActStats, alpha: f32) -> Result<LlamaCheckpoint, QuantizeError> {
        let c = &self.config;
        if !stats.has_shape(c.n_layer, c.d, c.inner) {
            return Err(QuantizeError::StatsMismatch);
        }
        let mut out = self.clone();
        if alpha <= 0.0 {
            return Ok(out);
        }
        let (d, dh) = (c.d, c.head_dim());
        let group = c.n_head / c.n_kv_head;
        for (b, st) in out.blocks.iter_mut().zip(&stats.blocks) {
            // o_proj, folded into v's rows: one factor per (KV head, dim).
            let o_max = column_max(&[&b.o], d);
            let kvd = c.n_kv_head * dh;
            // The v row that o_proj's input channel `ch` (head `ch / dh`) reads.
            let v_row = |ch: usize| (ch / dh / group) * dh + ch % dh;
            let (mut a_kv, mut w_kv) = (vec![0f32; kvd], vec![0f32; kvd]);
            for (ch, (&a, &w)) in st.attn_proj.iter().zip(&o_max).enumerate() {
                a_kv[v_row(ch)] = a_kv[v_row(ch)].max(a);
                w_kv[v_row(ch)] = w_kv[v_row(ch)].max(w);
            }
            let s_v = smooth_factors_from_max(&a_kv, &w_kv, alpha);
            let s_o: Vec<f32> = (0..d).map(|ch| s_v[v_row(ch)]).collect();
            scale_columns(&mut b.o, &s_o);
            divide_rows(&mut b.v, &s_v);
            if let Some(bias) = b.qkv_bias.as_mut() {
                for (x, s) in bias[d + kvd..].iter_mut().zip(&s_v) {
                    *x /= s;
                }
            }
            // q|k|v, folded into the input norm.
            let s_qkv =
                smooth_factors_from_max(&st.c_attn, &column_max(&[&b.q, &b.k, &b.v], d), alpha);
            for w in [&mut b.q, &mut b.k, &mut b.v] {
                scale_columns(w, &s_qkv);
            }
            divide(&mut b.input_norm, &s_qkv);
            // down_proj, folded into up's rows.
            let s_down =
                smooth_factors_from_max(&st.mlp_proj, &column_max(&[&b.down], c.inner), alpha);
            scale_columns(&mut b.down, &s_down);
            divide_rows(&mut b.up, &s_down);
            // gate|up, folded into the post-attention norm.
            let s_up = smooth_factors_from_max(&st.c_fc, &column_max(&[&b.gate, &b.up], d), alpha);
            scale_columns(&mut b.gate, &s_up);
            scale_columns(&mut b.up, &s_up);
            divide(&mut b.post_norm, &s_up);
        }
        let s_head =
            smooth_factors_from_max(&stats.lm_head, &column_max(&[&out.lm_head], d), alpha);
        scale_columns(&mut out.lm_head, &s_head);
        divide(&mut out.norm, &s_head);
        Ok(out)
    }
}

/// Max |w| of every input channel (column) over the rows of `[out, in]` matrices of `n_in`
/// columns.
fn column_max(ws: &[&[f32]], n_in: usize) -> Vec<f32> {
    let mut m = vec![0f32; n_in];
    for w in ws {
        update_max_abs(&mut m, w);
    }
    m
}

/// `W[o][i] *= s[i]` for an `[out, in]` matrix with `s.len()` columns.
fn scale_columns(w: &mut [f32], s: &[f32]) {
    for row in w.chunks_exact_mut(s.len()) {
        for (x, f) in row.iter_mut().zip(s) {
            *x *= f;
        }
    }
}

/// `W[o][..] /= s[o]` for an `[out, in]` matrix of `s.len()` rows.
fn divide_rows(w: &mut [f32], s: &[f32]) {
    let n_in = w.len() / s.len();
    for (row, f) in w.chunks_exact_mut(n_in).zip(s) {
        for x in row {
            *x /= f;
        }
    }
}

fn divide(v: &mut [f32], s: &[f32]) {
    for (x, f) in v.iter_mut().zip(s) {
        *x /= f;
    }
}

/// What [`quantize_llama`] takes besides the checkpoint.
#[derive(Debug, Clone, Copy, Default)]
pub struct LlamaQuantizeOptions {
    /// End-of-text id to store (default: the first of the checkpoint's).
    pub eos_token_id: Option<u32>,
}

/// Quantizes a LLaMA-family checkpoint: int8 per output channel (for SmoothQuant, pass it
/// through [`LlamaCheckpoint::smoothed`] first).
pub fn quantize_llama(
    ckpt: &LlamaCheckpoint,
    opts: &LlamaQuantizeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizedModel, QuantizeError> {
    let c = &ckpt.config;
    let cfg = c.model_config().map_err(QuantizeError::Config)?;
    let d = c.d;
    let ll = LinearLayout::new(&cfg);
    let cl = ClientLayout::new(&cfg);
    let mut linear = vec![0u8; ll.total_len];
    let mut client = vec![0u8; cl.total_len];
    let total = cfg.linear_count();
    let mut done = 0;

    // One layer from its `[out][in]` rows, given as consecutive pieces (q, k, v or gate, up).
    let put_linear = |linear: &mut [u8],
                      client: &mut [u8],
                      id: LinearId,
                      pieces: &[&[f32]],
                      bias: Option<&[f32]>| {
        let (in_dim, out_dim) = cfg.linear_dims(id.kind);
        debug_assert_eq!(
            pieces.iter().map(|w| w.len()).sum::<usize>(),
            in_dim * out_dim
        );
        let rows = pieces.iter().flat_map(|w| w.chunks_exact(in_dim));
        put_linear_channels(
            &mut linear[ll.matrix(id)],
            client,
            &cl.linear(id),
            in_dim,
            rows.map(|row| row.iter().map(|&v| v as f64)),
            bias,
        );
    };
    let put_gamma = |client: &mut [u8], r: &std::ops::Range<usize>, g: &[f32]| {
        for (ch, &v) in client[r.clone()].chunks_exact_mut(4).zip(g) {
            ch.copy_from_slice(&from_f64(v as f64).to_le_bytes());
        }
    };
    for (l, b) in ckpt.blocks.iter().enumerate() {
        let layout = cl.block(l);
        let id = |kind| LinearId {
            layer: l as u16,
            kind,
        };
        put_gamma(&mut client, &layout.ln1[0], &b.input_norm);
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::Qkv),
            &[&b.q, &b.k, &b.v],
            b.qkv_bias.as_deref(),
        );
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::AttnOut),
            &[&b.o],
            None,
        );
        put_gamma(&mut client, &layout.ln2[0], &b.post_norm);
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::MlpUp),
            &[&b.gate, &b.up],
            None,
        );
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::MlpDown),
            &[&b.down],
            None,
        );
        done += 4;
        progress(done, total);
    }
    put_gamma(&mut client, &cl.ln_f[0], &ckpt.norm);
    put_linear(
        &mut linear,
        &mut client,
        LinearId::LM_HEAD,
        &[&ckpt.lm_head],
        None,
    );
    progress(done + 1, total);
    // The token embedding: Q16.16 in 16-bit block floating point, one shift per row.
    let mut fixed = vec![0i32; d];
    let mut q = vec![0i16; d];
    for (r, row) in ckpt.embed.chunks_exact(d).enumerate() {
        for (f, &v) in fixed.iter_mut().zip(row) {
            *f = from_f64(v as f64);
        }
        client[cl.wte_shift.start + r] = BlockI16::encode(&fixed, &mut q);
        let at = cl.wte.start + r * d * 2;
        for (ch, v) in client[at..at + d * 2].chunks_exact_mut(2).zip(&q) {
            ch.copy_from_slice(&v.to_le_bytes());
        }
    }
    let mut h = [0u8; HEADER_LEN];
    encode_linear_header(&cfg, &mut h);
    linear[..HEADER_LEN].copy_from_slice(&h);
    let fingerprint: [u8; 32] = Sha256::digest(&linear).into();
    let eos = opts
        .eos_token_id
        .or(c.eos_token_ids.first().copied())
        .unwrap_or(u32::MAX);
    let header = ClientHeader {
        config: cfg,
        ln_eps_q32: (c.rms_norm_eps * 4294967296.0).round() as u32,
        eos_token_id: eos,
        linear_fingerprint: fingerprint,
        rope: c.rope,
        bos_token_id: c.bos_token_id,
    };
    encode_client_header(&header, &mut h);
    client[..HEADER_LEN].copy_from_slice(&h);
    Ok(QuantizedModel {
        config: cfg,
        linear,
        client,
        fingerprint,
    })
}
