//! Float checkpoint → Veil's two weight files (`linear.veil`, `client.veil`) plus a manifest.
//!
//! Weights: symmetric int8 per output channel, transposed to `[out][in]`. Activations are
//! quantized per row at run time by the client, so nothing about them is fixed here, except
//! optionally SmoothQuant (Xiao et al., 2023): per-input-channel factors `s`, calibrated on text,
//! that divide the activations and multiply the weights (`x·W = (x/s)·(s·W)`). The division is
//! folded into what produces the activation, so it costs nothing at run time:
//! - `c_attn`, `c_fc`, LM head: into the preceding LayerNorm's gamma and beta;
//! - `attn.c_proj`: into the value columns (and bias) of `c_attn`, since attention output is a
//!   convex combination of values;
//! - `mlp.c_proj` follows GELU, which does not commute with scaling, so it is left alone.
//!
//! The LLaMA family folds the same factors (one formula, `smooth_factors_from_max`) into its
//! float checkpoint before quantizing: see [`crate::llama::LlamaCheckpoint::smoothed`].

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use veil_core::fixed::from_f64;
use veil_core::model::format::{
    encode_client_header, encode_linear_header, ClientHeader, ClientLayout, LinearLayout,
    CLIENT_FILE, HEADER_LEN, LINEAR_FILE,
};
use veil_core::model::{LinearId, LinearKind, ModelConfig};
use veil_core::quant::{quantize_weight_channel, BlockI16, ChannelScale};

use crate::float_ref::ActStats;
use crate::hf::{Activation, Checkpoint, GptConfig};

/// The manifest's file name.
pub const MANIFEST_FILE: &str = "manifest.json";

/// Why a checkpoint cannot be quantized.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The integer pipeline implements GPT-2's tanh GELU only.
    #[error(
        "activation {0:?} is not supported: Veil's integer GELU is GPT-2's tanh form (gelu_new)"
    )]
    UnsupportedActivation(Activation),
    /// The shape cannot run in the integer pipeline.
    #[error("model shape not supported: {0}")]
    Config(veil_core::model::ConfigError),
    /// SmoothQuant statistics do not match the model.
    #[error("calibration statistics do not match the model shape")]
    StatsMismatch,
    /// Writing the output failed.
    #[error("writing {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
}

/// The quantized model, in memory.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    /// Shape.
    pub config: ModelConfig,
    /// Bytes of `linear.veil`.
    pub linear: Vec<u8>,
    /// Bytes of `client.veil`.
    pub client: Vec<u8>,
    /// SHA-256 of `linear.veil`.
    pub fingerprint: [u8; 32],
}

/// Options of [`quantize`].
#[derive(Debug, Clone, Copy)]
pub struct QuantizeOptions {
    /// SmoothQuant migration strength (0 = none, 0.5 = the paper's default); used with stats.
    pub smooth_alpha: f32,
    /// End-of-text token id.
    pub eos_token_id: u32,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            smooth_alpha: 0.5,
            eos_token_id: 50256,
        }
    }
}

/// Converts a validated checkpoint config to the core's.
pub fn model_config(c: &GptConfig) -> Result<ModelConfig, QuantizeError> {
    let cfg = ModelConfig {
        n_layer: c.n_layer as u32,
        n_embd: c.n_embd as u32,
        n_head: c.n_head as u32,
        n_positions: c.n_positions as u32,
        vocab_size: c.vocab_size as u32,
        n_inner: c.n_inner as u32,
        family: veil_core::model::Family::Gpt2,
    };
    cfg.validate().map_err(QuantizeError::Config)?;
    Ok(cfg)
}

/// SmoothQuant factors for one linear layer: `s_i = max|x_i|^α / max_j|W_ij|^(1-α)`, clamped
/// to a sane range so dead channels do not blow up.
fn smooth_factors(act_max: &[f32], w: &[f32], out: usize, alpha: f32) -> Vec<f32> {
    let w_max: Vec<f32> = w
        .chunks_exact(out)
        .map(|row| row.iter().fold(0f32, |m, v| m.max(v.abs())))
        .collect();
    smooth_factors_from_max(act_max, &w_max, alpha)
}

/// SmoothQuant's factors from each input channel's max |activation| and max |weight|:
/// `s = a^α / w^(1-α)`, clamped to `[1e-2, 1e3]`; 1 where either is zero.
pub(crate) fn smooth_factors_from_max(act_max: &[f32], w_max: &[f32], alpha: f32) -> Vec<f32> {
    act_max
        .iter()
        .zip(w_max)
        .map(|(&a, &wmax)| {
            if a <= 0.0 || wmax <= 0.0 {
                return 1.0;
            }
            (a.powf(alpha) / wmax.powf(1.0 - alpha)).clamp(1e-2, 1e3)
        })
        .collect()
}

struct Writer<'a> {
    bytes: &'a mut [u8],
}

impl Writer<'_> {
    fn i32s(&mut self, r: std::ops::Range<usize>, vals: impl Iterator<Item = i32>) {
        for (c, v) in self.bytes[r].chunks_exact_mut(4).zip(vals) {
            c.copy_from_slice(&v.to_le_bytes());
        }
    }
}

/// Quantizes one linear layer of either family: `channels` gives its `out_dim` weight channels
/// (each `in_dim` values, one per input, in order), each quantized into its row of `matrix` (the
/// layer's int8 `[out][in]` matrix in `linear.veil`); then writes its bias (if both the
/// checkpoint and the layout have one) and its per-channel requantization factors into `client`
/// at `params`.
pub(crate) fn put_linear_channels<C: Iterator<Item = f64> + Clone>(
    matrix: &mut [u8],
    client: &mut [u8],
    params: &veil_core::model::format::LinearParamsLayout,
    in_dim: usize,
    channels: impl Iterator<Item = C>,
    bias: Option<&[f32]>,
) {
    let mut q = vec![0i8; in_dim];
    let (mut mults, mut shifts) = (Vec::new(), Vec::new());
    for (j, channel) in channels.enumerate() {
        let sw = quantize_weight_channel(channel, &mut q);
        for (dst, &v) in matrix[j * in_dim..(j + 1) * in_dim].iter_mut().zip(&q) {
            *dst = v as u8;
        }
        let c = ChannelScale::from_weight_scale(sw);
        mults.push(c.mult);
        shifts.push(c.shift);
    }
    let mut wr = Writer { bytes: client };
    if let (Some(b), Some(r)) = (bias, params.bias.clone()) {
        wr.i32s(r, b.iter().map(|&v| from_f64(v as f64)));
    }
    wr.i32s(params.mult.clone(), mults.into_iter());
    wr.bytes[params.shift.clone()].copy_from_slice(&shifts);
}

/// Quantizes a GPT-2 checkpoint; with `stats`, applies SmoothQuant with `opts.smooth_alpha`.
/// `progress` is called with (linear layers done, total).
pub fn quantize(
    ckpt: &Checkpoint,
    stats: Option<&ActStats>,
    opts: &QuantizeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizedModel, QuantizeError> {
    let gc = &ckpt.config;
    if gc.activation != Activation::GeluNew {
        return Err(QuantizeError::UnsupportedActivation(gc.activation));
    }
    let cfg = model_config(gc)?;
    if let Some(s) = stats {
        if s.blocks.len() != gc.n_layer || s.lm_head.len() != gc.n_embd {
            return Err(QuantizeError::StatsMismatch);
        }
    }
    let d = gc.n_embd;
    let ll = LinearLayout::new(&cfg);
    let cl = ClientLayout::new(&cfg);
    let mut linear = vec![0u8; ll.total_len];
    let mut client = vec![0u8; cl.total_len];
    let total = cfg.linear_count();
    let mut done = 0;

    // One linear layer: smoothing `s` (per input row of the Conv1D weight), quantize per output
    // column into the transposed int8 matrix, write bias and requantization factors.
    let put_linear = |linear: &mut [u8],
                      client: &mut [u8],
                      id: LinearId,
                      w: &[f32],
                      bias: Option<&[f32]>,
                      s: &[f32]| {
        let (in_dim, out_dim) = cfg.linear_dims(id.kind);
        // Conv1D weight is [in][out]; the LM head (wte) is already [out][in].
        let channels = (0..out_dim).map(|j| {
            (0..in_dim).map(move |i| {
                let v = if id.kind == LinearKind::LmHead {
                    w[j * in_dim + i]
                } else {
                    w[i * out_dim + j]
                };
                v as f64 * s[i] as f64
            })
        });
        put_linear_channels(
            &mut linear[ll.matrix(id)],
            client,
            &cl.linear(id),
            in_dim,
            channels,
            bias,
        );
    };
    let put_ln =
        |client: &mut [u8], r: &[std::ops::Range<usize>; 2], g: &[f32], b: &[f32], s: &[f32]| {
            let mut wr = Writer { bytes: client };
            wr.i32s(
                r[0].clone(),
                g.iter()
                    .zip(s)
                    .map(|(&g, &s)| from_f64(g as f64 / s as f64)),
            );
            wr.i32s(
                r[1].clone(),
                b.iter()
                    .zip(s)
                    .map(|(&b, &s)| from_f64(b as f64 / s as f64)),
            );
        };
    let ones_d = vec![1f32; d];
    let ones_inner = vec![1f32; gc.n_inner];
    // Factors for a layer with `d` inputs: identity unless calibrated.
    let smooth = |act: Option<&Vec<f32>>, w: &[f32], out: usize| match act {
        Some(a) if opts.smooth_alpha > 0.0 => smooth_factors(a, w, out, opts.smooth_alpha),
        _ => vec![1f32; d],
    };

    for (l, blk) in ckpt.blocks.iter().enumerate() {
        let st = stats.map(|s| &s.blocks[l]);
        let layout = cl.block(l);
        // attn.c_proj smoothing folds into the value columns of c_attn: compute it first.
        let s_proj = smooth(st.map(|s| &s.attn_proj), &blk.attn_proj.weight.data, d);
        let mut c_attn_w = blk.c_attn.weight.data.clone();
        let mut c_attn_b = blk.c_attn.bias.data.clone();
        for i in 0..d {
            for (k, &s) in s_proj.iter().enumerate() {
                c_attn_w[i * 3 * d + 2 * d + k] /= s;
            }
        }
        for (k, &s) in s_proj.iter().enumerate() {
            c_attn_b[2 * d + k] /= s;
        }
        let s_attn = smooth(st.map(|s| &s.c_attn), &c_attn_w, 3 * d);
        put_ln(
            &mut client,
            &layout.ln1,
            &blk.ln_1.weight.data,
            &blk.ln_1.bias.data,
            &s_attn,
        );
        let id = |kind| LinearId {
            layer: l as u16,
            kind,
        };
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::Qkv),
            &c_attn_w,
            Some(&c_attn_b),
            &s_attn,
        );
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::AttnOut),
            &blk.attn_proj.weight.data,
            Some(&blk.attn_proj.bias.data),
            &s_proj,
        );
        let s_fc = smooth(st.map(|s| &s.c_fc), &blk.c_fc.weight.data, gc.n_inner);
        put_ln(
            &mut client,
            &layout.ln2,
            &blk.ln_2.weight.data,
            &blk.ln_2.bias.data,
            &s_fc,
        );
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::MlpUp),
            &blk.c_fc.weight.data,
            Some(&blk.c_fc.bias.data),
            &s_fc,
        );
        put_linear(
            &mut linear,
            &mut client,
            id(LinearKind::MlpDown),
            &blk.mlp_proj.weight.data,
            Some(&blk.mlp_proj.bias.data),
            &ones_inner,
        );
        done += 4;
        progress(done, total);
    }
    // LM head: tied to wte, but its int8 copy is separate from the embedding table, so it can be
    // smoothed without touching the embeddings. wte is [vocab][d] = [out][in]; smoothing needs the
    // per-input-channel weight maximum, i.e. over each column.
    let s_lm = match stats {
        Some(s) if opts.smooth_alpha > 0.0 => {
            let mut wcol = vec![0f32; d];
            for row in ckpt.wte.data.chunks_exact(d) {
                for (m, &v) in wcol.iter_mut().zip(row) {
                    *m = m.max(v.abs());
                }
            }
            // smooth_factors wants [in][out]; a single column of maxima stands in for the matrix.
            smooth_factors(&s.lm_head, &wcol, 1, opts.smooth_alpha)
        }
        _ => ones_d.clone(),
    };
    put_ln(
        &mut client,
        &cl.ln_f,
        &ckpt.ln_f.weight.data,
        &ckpt.ln_f.bias.data,
        &s_lm,
    );
    put_linear(
        &mut linear,
        &mut client,
        LinearId::LM_HEAD,
        &ckpt.wte.data,
        None,
        &s_lm,
    );
    done += 1;
    progress(done, total);

    // Embeddings: Q16.16 in 16-bit block floating point, one shift per row.
    for (table, shifts, data) in [
        (&cl.wte, &cl.wte_shift, &ckpt.wte.data),
        (&cl.wpe, &cl.wpe_shift, &ckpt.wpe.data),
    ] {
        let mut fixed = vec![0i32; d];
        let mut q = vec![0i16; d];
        for (r, row) in data.chunks_exact(d).enumerate() {
            for (f, &v) in fixed.iter_mut().zip(row) {
                *f = from_f64(v as f64);
            }
            client[shifts.start + r] = BlockI16::encode(&fixed, &mut q);
            let at = table.start + r * d * 2;
            for (c, v) in client[at..at + d * 2].chunks_exact_mut(2).zip(&q) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    let mut h = [0u8; HEADER_LEN];
    encode_linear_header(&cfg, &mut h);
    linear[..HEADER_LEN].copy_from_slice(&h);
    let fingerprint: [u8; 32] = Sha256::digest(&linear).into();
    let header = ClientHeader {
        config: cfg,
        ln_eps_q32: (gc.layer_norm_epsilon * 4294967296.0).round() as u32,
        eos_token_id: opts.eos_token_id,
        linear_fingerprint: fingerprint,
        rope: veil_core::rope::RopeConfig::NONE,
        bos_token_id: None,
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

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the manifest records about where a model came from.
#[derive(Debug, Clone)]
pub struct Provenance {
    /// `--model` as given.
    pub source: String,
    /// SmoothQuant alpha, when calibrated.
    pub smooth_alpha: Option<f32>,
    /// Calibration text file and tokens, when calibrated.
    pub calibration: Option<(String, usize)>,
}

/// Writes `linear.veil`, `client.veil`, `manifest.json` and copies `tokenizer.json` into `out`.
/// Files are written under temporary names and renamed, so an interrupted run never leaves a
/// half-written model that looks complete.
pub fn write_model_dir(
    out: &Path,
    q: &QuantizedModel,
    tokenizer: &Path,
    prov: &Provenance,
) -> Result<(), QuantizeError> {
    write_model_dir_with(out, q, tokenizer, &[], prov)
}

/// [`write_model_dir`], also copying `extra` files that exist (a LLaMA-family model's
/// `tokenizer_config.json` with its chat template, and `generation_config.json`) under their own
/// names.
pub fn write_model_dir_with(
    out: &Path,
    q: &QuantizedModel,
    tokenizer: &Path,
    extra: &[PathBuf],
    prov: &Provenance,
) -> Result<(), QuantizeError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| QuantizeError::Io { path, source }
    };
    fs::create_dir_all(out).map_err(io(out))?;
    let write = |name: &str, bytes: &[u8]| -> Result<(), QuantizeError> {
        let tmp = out.join(format!(".{name}.tmp"));
        let dst = out.join(name);
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, &dst).map_err(io(&dst))
    };
    write(LINEAR_FILE, &q.linear)?;
    write(CLIENT_FILE, &q.client)?;
    let tok = fs::read(tokenizer).map_err(io(tokenizer))?;
    write("tokenizer.json", &tok)?;
    for p in extra.iter().filter(|p| p.is_file()) {
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        write(name, &fs::read(p).map_err(io(p))?)?;
    }
    let c = &q.config;
    let mut manifest = serde_json::json!({
        "format": "veil-weights",
        "format_version": veil_core::model::format::format_version(c),
        "config": {
            "n_layer": c.n_layer, "n_embd": c.n_embd, "n_head": c.n_head,
            "n_positions": c.n_positions, "vocab_size": c.vocab_size, "n_inner": c.n_inner,
        },
        "fingerprint_sha256": hex(&q.fingerprint),
        "files": {
            LINEAR_FILE: { "bytes": q.linear.len(), "holder": "server and client (online masks, reference)" },
            CLIENT_FILE: { "bytes": q.client.len(), "holder": "client only" },
            "tokenizer.json": { "bytes": tok.len(), "holder": "client only" },
        },
        "quantization": {
            "weights": "int8 symmetric per output channel",
            "activations": "int8 per row, dynamic",
            "smoothquant_alpha": prov.smooth_alpha,
            "calibration": prov.calibration.as_ref().map(|(f, n)| serde_json::json!({"text": f, "tokens": n})),
        },
        "source": prov.source,
        "created_by": concat!("veil-tools ", env!("CARGO_PKG_VERSION")),
    });
    // GPT-2 manifests keep their old fields only; the family's shape has more to say.
    if let veil_core::model::Family::Llama {
        n_kv_head,
        qkv_bias,
    } = c.family
    {
        manifest["config"]["family"] = "llama".into();
        manifest["config"]["n_kv_head"] = n_kv_head.into();
        manifest["config"]["qkv_bias"] = qkv_bias.into();
    }
    let text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    write(MANIFEST_FILE, text.as_bytes())
}
