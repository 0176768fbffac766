//! Hugging Face GPT-2 checkpoints: `config.json` + `model.safetensors`.
//!
//! [`Checkpoint::load`] reads a directory in the layout `transformers` writes (both `GPT2LMHeadModel`,
//! whose tensors are prefixed `transformer.`, and plain `GPT2Model`), converts every tensor to `f32`
//! and checks every shape against the config before anything else sees it, so code downstream can
//! index tensors without re-validating. Weights keep GPT-2's Conv1D layout: `[in, out]`, row-major.

use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde::Deserialize;

/// File name of the model configuration inside a checkpoint directory.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the weights inside a checkpoint directory.
pub const MODEL_FILE: &str = "model.safetensors";

/// Why a checkpoint could not be loaded. Every variant names the file involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HfError {
    /// A required file does not exist.
    #[error("{}: file not found", path.display())]
    MissingFile {
        /// The missing file.
        path: PathBuf,
    },
    /// The file exists but could not be read.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file being read.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// `config.json` is not valid JSON, lacks a field, or describes a model this crate does not run.
    #[error("{}: bad config: {reason}", path.display())]
    BadConfig {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The safetensors file is shorter than its own header says (an interrupted download or copy).
    #[error("{}: truncated safetensors file: {actual} bytes, header requires {expected}", path.display())]
    Truncated {
        /// The weights file.
        path: PathBuf,
        /// Bytes the header implies (header length prefix + header + all tensor data).
        expected: u64,
        /// Bytes actually present.
        actual: u64,
    },
    /// The safetensors header is malformed in a way other than truncation.
    #[error("{}: invalid safetensors file: {source:?}", path.display())]
    Safetensors {
        /// The weights file.
        path: PathBuf,
        /// The parser's error.
        source: SafeTensorError,
    },
    /// An expected tensor is absent (under both the `transformer.`-prefixed and the bare name).
    #[error("{}: missing tensor `{tensor}`", path.display())]
    MissingTensor {
        /// The weights file.
        path: PathBuf,
        /// Canonical (unprefixed) tensor name.
        tensor: String,
    },
    /// A tensor's shape disagrees with what the config implies.
    #[error("{}: tensor `{tensor}` has shape {found:?}, config implies {expected:?}", path.display())]
    WrongShape {
        /// The weights file.
        path: PathBuf,
        /// Tensor name as stored in the file.
        tensor: String,
        /// Shape implied by the config (GPT-2 Conv1D layout).
        expected: Vec<usize>,
        /// Shape stored in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype other than F32, F16 or BF16.
    #[error("{}: tensor `{tensor}` has dtype {dtype}; only F32, F16 and BF16 are supported", path.display())]
    WrongDtype {
        /// The weights file.
        path: PathBuf,
        /// Tensor name as stored in the file.
        tensor: String,
        /// The dtype found, as safetensors spells it.
        dtype: String,
    },
}

/// The activation function of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `gelu_new`: the tanh approximation GPT-2 was trained with,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`.
    GeluNew,
    /// `gelu`: the exact erf form, `0.5·x·(1 + erf(x/√2))`.
    Gelu,
}

impl Activation {
    /// The name `transformers` uses in `config.json`.
    pub fn hf_name(self) -> &'static str {
        match self {
            Activation::GeluNew => "gelu_new",
            Activation::Gelu => "gelu",
        }
    }
}

/// The GPT-2 hyper-parameters this crate needs, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct GptConfig {
    /// Number of transformer blocks.
    pub n_layer: usize,
    /// Width of the residual stream, `d`.
    pub n_embd: usize,
    /// Number of attention heads; divides `n_embd`.
    pub n_head: usize,
    /// Maximum sequence length (rows of `wpe`).
    pub n_positions: usize,
    /// Vocabulary size (rows of `wte`).
    pub vocab_size: usize,
    /// Width of the MLP hidden layer (`n_inner`, or `4·n_embd` when the config says null).
    pub n_inner: usize,
    /// LayerNorm epsilon (kept as f64, as JSON gives it).
    pub layer_norm_epsilon: f64,
    /// MLP activation.
    pub activation: Activation,
}

/// `config.json` as written by `transformers`; only the fields we read. Unknown fields are ignored.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    n_layer: Option<usize>,
    n_embd: Option<usize>,
    n_head: Option<usize>,
    n_positions: Option<usize>,
    vocab_size: Option<usize>,
    n_inner: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    // These change the attention maths; we refuse values our forward passes do not implement
    // rather than silently computing something else.
    scale_attn_weights: Option<bool>,
    scale_attn_by_inverse_layer_idx: Option<bool>,
}

impl GptConfig {
    /// Head width, `n_embd / n_head`.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self, HfError> {
        let text = std::fs::read_to_string(path).map_err(|e| io_error(path, e))?;
        Self::from_json(&text, path)
    }

    /// Parses and validates the text of a `config.json`; `path` is only used in errors.
    pub fn from_json(text: &str, path: &Path) -> Result<Self, HfError> {
        let bad = |reason: String| HfError::BadConfig {
            path: path.to_path_buf(),
            reason,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| bad(format!("not a GPT-2 config: {e}")))?;
        match raw.model_type.as_deref() {
            Some("gpt2") => {}
            Some(other) => return Err(bad(format!("model_type is {other:?}, expected \"gpt2\""))),
            None => return Err(bad("model_type is missing, expected \"gpt2\"".into())),
        }
        let need = |v: Option<usize>, name: &str| -> Result<usize, HfError> {
            match v {
                Some(0) => Err(bad(format!("{name} is 0"))),
                Some(n) => Ok(n),
                None => Err(bad(format!("{name} is missing"))),
            }
        };
        let n_layer = need(raw.n_layer, "n_layer")?;
        let n_embd = need(raw.n_embd, "n_embd")?;
        let n_head = need(raw.n_head, "n_head")?;
        let n_positions = need(raw.n_positions, "n_positions")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        if n_embd % n_head != 0 {
            return Err(bad(format!(
                "n_embd {n_embd} is not a multiple of n_head {n_head}"
            )));
        }
        let n_inner = match raw.n_inner {
            None => n_embd
                .checked_mul(4)
                .ok_or_else(|| bad("n_embd too large".into()))?,
            Some(0) => return Err(bad("n_inner is 0".into())),
            Some(n) => n,
        };
        // transformers' default when the field is absent.
        let eps = raw.layer_norm_epsilon.unwrap_or(1e-5);
        if !(eps.is_finite() && eps > 0.0) {
            return Err(bad(format!("layer_norm_epsilon {eps} is not positive")));
        }
        let activation = match raw.activation_function.as_deref() {
            Some("gelu_new") => Activation::GeluNew,
            Some("gelu") => Activation::Gelu,
            Some(other) => {
                return Err(bad(format!(
                    "activation_function {other:?} is not supported (expected \"gelu_new\" or \"gelu\")"
                )))
            }
            // transformers' GPT2Config default.
            None => Activation::GeluNew,
        };
        if raw.scale_attn_weights == Some(false) {
            return Err(bad("scale_attn_weights = false is not supported".into()));
        }
        if raw.scale_attn_by_inverse_layer_idx == Some(true) {
            return Err(bad(
                "scale_attn_by_inverse_layer_idx = true is not supported".into(),
            ));
        }
        Ok(GptConfig {
            n_layer,
            n_embd,
            n_head,
            n_positions,
            vocab_size,
            n_inner,
            layer_norm_epsilon: eps,
            activation,
        })
    }
}

/// A dense f32 tensor, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values.
    pub data: Vec<f32>,
}

/// LayerNorm parameters, each `[d]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm {
    /// Gain (gamma), `[d]`.
    pub weight: Tensor,
    /// Shift (beta), `[d]`.
    pub bias: Tensor,
}

/// A GPT-2 Conv1D layer, `y = x·W + b`.
#[derive(Debug, Clone, PartialEq)]
pub struct Linear {
    /// `[in, out]`, row-major (Conv1D layout, the transpose of `nn.Linear`).
    pub weight: Tensor,
    /// `[out]`.
    pub bias: Tensor,
}

impl Linear {
    /// Input width.
    pub fn in_features(&self) -> usize {
        self.weight.shape[0]
    }
    /// Output width.
    pub fn out_features(&self) -> usize {
        self.weight.shape[1]
    }
}

/// One transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    /// `h.N.ln_1`.
    pub ln_1: LayerNorm,
    /// `h.N.attn.c_attn`: `[d, 3d]`, fused Q|K|V.
    pub c_attn: Linear,
    /// `h.N.attn.c_proj`: `[d, d]`.
    pub attn_proj: Linear,
    /// `h.N.ln_2`.
    pub ln_2: LayerNorm,
    /// `h.N.mlp.c_fc`: `[d, n_inner]`.
    pub c_fc: Linear,
    /// `h.N.mlp.c_proj`: `[n_inner, d]`.
    pub mlp_proj: Linear,
}

/// A whole GPT-2 checkpoint in f32, shapes checked against its config.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// The validated config.
    pub config: GptConfig,
    /// Token embeddings `[vocab, d]`; also the LM head (tied).
    pub wte: Tensor,
    /// Position embeddings `[n_positions, d]`.
    pub wpe: Tensor,
    /// The `n_layer` blocks in order.
    pub blocks: Vec<Block>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
}

/// The prefix `GPT2LMHeadModel` puts before the body's tensor names.
const LM_PREFIX: &str = "transformer.";

impl Checkpoint {
    /// Loads `config.json` and `model.safetensors` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, HfError> {
        Self::load_files(&dir.join(CONFIG_FILE), &dir.join(MODEL_FILE))
    }

    /// Loads a checkpoint from explicit file paths (the hub cache may keep files apart).
    pub fn load_files(config_path: &Path, model_path: &Path) -> Result<Self, HfError> {
        for p in [config_path, model_path] {
            if !p.is_file() {
                return Err(HfError::MissingFile {
                    path: p.to_path_buf(),
                });
            }
        }
        let config = GptConfig::from_file(config_path)?;
        let file = File::open(model_path).map_err(|e| io_error(model_path, e))?;
        // SAFETY: the map is read-only and lives only inside this function. Another process
        // truncating the file while we read it could fault; the same holds for every mmap-based
        // loader (transformers included) and is accepted for local model files.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| io_error(model_path, e))?;
        let st = parse_safetensors(&mmap, model_path)?;
        let reader = TensorReader {
            st: &st,
            path: model_path,
        };

        let c = &config;
        let d = c.n_embd;
        let wte = reader.get("wte.weight", &[c.vocab_size, d])?;
        let wpe = reader.get("wpe.weight", &[c.n_positions, d])?;
        let mut blocks = Vec::with_capacity(c.n_layer);
        for i in 0..c.n_layer {
            let ln = |name: &str| -> Result<LayerNorm, HfError> {
                Ok(LayerNorm {
                    weight: reader.get(&format!("h.{i}.{name}.weight"), &[d])?,
                    bias: reader.get(&format!("h.{i}.{name}.bias"), &[d])?,
                })
            };
            let lin = |name: &str, n_in: usize, n_out: usize| -> Result<Linear, HfError> {
                Ok(Linear {
                    weight: reader.get(&format!("h.{i}.{name}.weight"), &[n_in, n_out])?,
                    bias: reader.get(&format!("h.{i}.{name}.bias"), &[n_out])?,
                })
            };
            blocks.push(Block {
                ln_1: ln("ln_1")?,
                c_attn: lin("attn.c_attn", d, 3 * d)?,
                attn_proj: lin("attn.c_proj", d, d)?,
                ln_2: ln("ln_2")?,
                c_fc: lin("mlp.c_fc", d, c.n_inner)?,
                mlp_proj: lin("mlp.c_proj", c.n_inner, d)?,
            });
        }
        let ln_f = LayerNorm {
            weight: reader.get("ln_f.weight", &[d])?,
            bias: reader.get("ln_f.bias", &[d])?,
        };
        // The LM head is tied to wte; a stored copy is ignored, but a mismatched one means the file
        // is not the model its config describes.
        if let Ok(view) = st.tensor("lm_head.weight") {
            check_shape(
                model_path,
                "lm_head.weight",
                view.shape(),
                &[c.vocab_size, d],
            )?;
        }
        Ok(Checkpoint {
            config,
            wte,
            wpe,
            blocks,
            ln_f,
        })
    }

    /// Every tensor with its canonical Hugging Face name (no `transformer.` prefix), in a fixed
    /// order: `wte`, `wpe`, blocks in order (ln_1, c_attn, attn.c_proj, ln_2, c_fc, mlp.c_proj;
    /// weight before bias), `ln_f`.
    pub fn named_tensors(&self) -> Vec<(String, &Tensor)> {
        let mut out = vec![
            ("wte.weight".to_string(), &self.wte),
            ("wpe.weight".to_string(), &self.wpe),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            let parts: [(&str, &Tensor); 12] = [
                ("ln_1.weight", &b.ln_1.weight),
                ("ln_1.bias", &b.ln_1.bias),
                ("attn.c_attn.weight", &b.c_attn.weight),
                ("attn.c_attn.bias", &b.c_attn.bias),
                ("attn.c_proj.weight", &b.attn_proj.weight),
                ("attn.c_proj.bias", &b.attn_proj.bias),
                ("ln_2.weight", &b.ln_2.weight),
                ("ln_2.bias", &b.ln_2.bias),
                ("mlp.c_fc.weight", &b.c_fc.weight),
                ("mlp.c_fc.bias", &b.c_fc.bias),
                ("mlp.c_proj.weight", &b.mlp_proj.weight),
                ("mlp.c_proj.bias", &b.mlp_proj.bias),
            ];
            out.extend(parts.map(|(name, t)| (format!("h.{i}.{name}"), t)));
        }
        out.push(("ln_f.weight".to_string(), &self.ln_f.weight));
        out.push(("ln_f.bias".to_string(), &self.ln_f.bias));
        out
    }
}

/// Expected shapes for every tensor of a checkpoint with `config`, canonical names, same order as
/// [`Checkpoint::named_tensors`]. Used by the synthesiser and by tests.
pub fn expected_shapes(config: &GptConfig) -> Vec<(String, Vec<usize>)> {
    let d = config.n_embd;
    let mut out = vec![
        ("wte.weight".to_string(), vec![config.vocab_size, d]),
        ("wpe.weight".to_string(), vec![config.n_positions, d]),
    ];
    for i in 0..config.n_layer {
        let shapes: [(&str, Vec<usize>); 12] = [
            ("ln_1.weight", vec![d]),
            ("ln_1.bias", vec![d]),
            ("attn.c_attn.weight", vec![d, 3 * d]),
            ("attn.c_attn.bias", vec![3 * d]),
            ("attn.c_proj.weight", vec![d, d]),
            ("attn.c_proj.bias", vec![d]),
            ("ln_2.weight", vec![d]),
            ("ln_2.bias", vec![d]),
            ("mlp.c_fc.weight", vec![d, config.n_inner]),
            ("mlp.c_fc.bias", vec![config.n_inner]),
            ("mlp.c_proj.weight", vec![config.n_inner, d]),
            ("mlp.c_proj.bias", vec![d]),
        ];
        for (name, shape) in shapes {
            out.push((format!("h.{i}.{name}"), shape));
        }
    }
    out.push(("ln_f.weight".to_string(), vec![d]));
    out.push(("ln_f.bias".to_string(), vec![d]));
    out
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> HfError {
    if source.kind() == std::io::ErrorKind::NotFound {
        HfError::MissingFile {
            path: path.to_path_buf(),
        }
    } else {
        HfError::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Parses the safetensors header, telling truncation (the common failure: an interrupted copy)
/// apart from other corruption so the message says what to do.
pub(crate) fn parse_safetensors<'a>(
    bytes: &'a [u8],
    path: &Path,
) -> Result<SafeTensors<'a>, HfError> {
    match SafeTensors::deserialize(bytes) {
        Ok(st) => Ok(st),
        Err(e) => {
            if let Some(expected) = required_len(bytes) {
                if (bytes.len() as u64) < expected {
                    return Err(HfError::Truncated {
                        path: path.to_path_buf(),
                        expected,
                        actual: bytes.len() as u64,
                    });
                }
            }
            Err(HfError::Safetensors {
                path: path.to_path_buf(),
                source: e,
            })
        }
    }
}

/// The file length a safetensors header implies, as far as it can be read: `Some(8)` when even the
/// length prefix is cut, `Some(8 + n)` when the header itself is cut, else `8 + n + max data end`.
/// `None` when the header is present but unparseable (not a truncation).
fn required_len(bytes: &[u8]) -> Option<u64> {
    let Some(prefix) = bytes.get(..8) else {
        return Some(8);
    };
    let mut len_bytes = [0u8; 8];
    len_bytes.copy_from_slice(prefix);
    let n = u64::from_le_bytes(len_bytes);
    let header_end = n.checked_add(8)?;
    let header = match usize::try_from(header_end)
        .ok()
        .and_then(|e| bytes.get(8..e))
    {
        Some(h) => h,
        None => return Some(header_end),
    };
    let json: serde_json::Value = serde_json::from_slice(header).ok()?;
    let mut data_end = 0u64;
    for (name, info) in json.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        let end = info.get("data_offsets")?.get(1)?.as_u64()?;
        data_end = data_end.max(end);
    }
    header_end.checked_add(data_end)
}

pub(crate) fn check_shape(
    path: &Path,
    name: &str,
    found: &[usize],
    expected: &[usize],
) -> Result<(), HfError> {
    if found == expected {
        Ok(())
    } else {
        Err(HfError::WrongShape {
            path: path.to_path_buf(),
            tensor: name.to_string(),
            expected: expected.to_vec(),
            found: found.to_vec(),
        })
    }
}

struct TensorReader<'a, 'data> {
    st: &'a SafeTensors<'data>,
    path: &'a Path,
}

impl TensorReader<'_, '_> {
    /// Finds `name` with or without the `transformer.` prefix, checks shape and dtype, converts
    /// to f32.
    fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, HfError> {
        let prefixed = format!("{LM_PREFIX}{name}");
        let (stored_name, view) = match self.st.tensor(&prefixed) {
            Ok(v) => (prefixed, v),
            Err(_) => match self.st.tensor(name) {
                Ok(v) => (name.to_string(), v),
                Err(_) => {
                    return Err(HfError::MissingTensor {
                        path: self.path.to_path_buf(),
                        tensor: name.to_string(),
                    })
                }
            },
        };
        check_shape(self.path, &stored_name, view.shape(), shape)?;
        let data = match view.dtype() {
            Dtype::F32 => convert::<4>(view.data(), f32::from_le_bytes),
            Dtype::F16 => convert::<2>(view.data(), |b| half::f16::from_le_bytes(b).to_f32()),
            Dtype::BF16 => convert::<2>(view.data(), |b| half::bf16::from_le_bytes(b).to_f32()),
            other => {
                return Err(HfError::WrongDtype {
                    path: self.path.to_path_buf(),
                    tensor: stored_name,
                    dtype: format!("{other:?}"),
                })
            }
        };
        Ok(Tensor {
            shape: shape.to_vec(),
            data,
        })
    }
}

/// Little-endian bytes to f32, element by element: the mmap gives no alignment guarantee, so the
/// bytes cannot be reinterpreted in place.
pub(crate) fn convert<const N: usize>(bytes: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
    bytes
        .chunks_exact(N)
        .map(|c| {
            let mut b = [0u8; N];
            b.copy_from_slice(c);
            f(b)
        })
        .collect()
}

impl fmt::Display for Activation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.hf_name())
    }
}
