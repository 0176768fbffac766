//! Veil's weight files: two flat, little-endian, memory-mappable files per model.
//!
//! - `linear.veil`: the int8 weights of every offloaded linear layer. This is all a server gets.
//! - `client.veil`: everything else the client needs: embeddings, LayerNorm parameters, biases and
//!   the per-output-channel requantization factors.
//!
//! Both start with a 128-byte header; every section then starts at a multiple of 64 bytes, at an
//! offset that is a pure function of the configuration (see [`LinearLayout`] and
//! [`ClientLayout`]), so a reader needs no directory and a truncated or padded file is caught by
//! its exact length. Readers never cast bytes: values are read with `from_le_bytes`, so the files
//! work on any host without `unsafe`.
//!
//! Header (all `u32` little-endian):
//!
//! | bytes  | field |
//! |--------|-------|
//! | 0..8   | magic: `VEILLIN1` or `VEILCLI1` |
//! | 8..12  | format version: 1 (GPT-2 only) or 2 (any architecture) |
//! | 12..36 | n_layer, n_embd, n_head, n_positions, vocab_size, n_inner |
//! | 36..40 | client: LayerNorm (or RMSNorm) epsilon in Q32 (units of a variance of Q16.16 values) |
//! | 40..44 | client: end-of-text token id |
//! | 44..48 | client: fraction bits of the fixed-point domain (16) |
//! | 48..52 | version 2: architecture (0 GPT-2, 1 LLaMA family) |
//! | 52..56 | version 2: KV heads |
//! | 56..60 | version 2: flags (bit 0: the fused q\|k\|v projection has a bias) |
//! | 60..64 | version 2, client: RoPE scaling (0 none, 1 `llama3`) |
//! | 64..96 | client: SHA-256 fingerprint of the matching `linear.veil` |
//! | 96..104 | version 2, client: `rope_theta` (f64) |
//! | 104..112 | version 2, client: `llama3` scaling `factor` (f64) |
//! | 112..120 | version 2, client: `low_freq_factor`, `high_freq_factor` (f32 each) |
//! | 120..124 | version 2, client: `original_max_position_embeddings` |
//! | 124..128 | version 2, client: beginning-of-text token id (`u32::MAX`: none) |
//!
//! GPT-2 files are written as version 1, byte for byte as before version 2 existed (so their
//! fingerprints do not change); version 1 always means GPT-2, and its bytes 48..64 and 96..128
//! are zero.
//!
//! `linear.veil` sections, per block: `c_attn` `[3d][d]`, `attn.c_proj` `[d][d]`, `mlp.c_fc`
//! `[inner][d]`, `mlp.c_proj` `[d][inner]`; then the LM head `[vocab][d]`. All int8, stored
//! transposed to `[out][in]` (one row per output channel).
//!
//! `client.veil` sections: `wte` as `i16 [vocab][d]` plus a `u8 [vocab]` block shift per row,
//! `wpe` likewise `[n_positions][d]`; per block: `ln_1` gamma and beta (`i32 [d]` each, Q16.16),
//! then for `c_attn` and `attn.c_proj`: bias `i32 [out]` (Q16.16), multiplier `i32 [out]`, shift
//! `u8 [out]`; `ln_2` gamma and beta; the same three for `mlp.c_fc` and `mlp.c_proj`; finally `ln_f`
//! gamma and beta and the LM head multiplier and shift (it has no bias).
//!
//! The LLaMA family uses the same layout with the sections it has no use for empty (length 0):
//! `wpe` and its shifts (positions are rotary), every beta (RMSNorm), and every bias except
//! q|k|v's when the flag says so. Its layers are `q_proj|k_proj|v_proj` fused
//! (`[(n_head + 2·n_kv_head)·head_dim][d]`), `o_proj`, `gate_proj|up_proj` fused (`[2·inner][d]`),
//! `down_proj`, and its own LM head.

use super::config::{ConfigError, Family, LinearId, LinearKind, ModelConfig};
use crate::nonlinear::LnParams;
use crate::quant::ChannelScale;
use crate::rope::{Llama3Scaling, RopeConfig, RopeScaling};
use core::ops::Range;

/// The newest format version, written for every architecture but GPT-2.
pub const FORMAT_VERSION: u32 = 2;
/// The version GPT-2 files are written in (and the oldest accepted).
pub const FORMAT_VERSION_GPT2: u32 = 1;

/// The version a model of `cfg` is written in: GPT-2 keeps version 1, so its files and their
/// fingerprints are the same as before the LLaMA family was added.
pub fn format_version(cfg: &ModelConfig) -> u32 {
    match cfg.family {
        Family::Gpt2 => FORMAT_VERSION_GPT2,
        Family::Llama { .. } => FORMAT_VERSION,
    }
}
/// Header length of both files.
pub const HEADER_LEN: usize = 128;
/// Alignment of every section.
pub const SECTION_ALIGN: usize = 64;
/// Magic of `linear.veil`.
pub const LINEAR_MAGIC: [u8; 8] = *b"VEILLIN1";
/// Magic of `client.veil`.
pub const CLIENT_MAGIC: [u8; 8] = *b"VEILCLI1";
/// File name of the server's part.
pub const LINEAR_FILE: &str = "linear.veil";
/// File name of the client's part.
pub const CLIENT_FILE: &str = "client.veil";

/// Why a weight file was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum FormatError {
    /// Shorter than a header.
    TooShort,
    /// The magic is not the expected one (wrong file, or the two files swapped).
    BadMagic,
    /// A format version this build does not read.
    UnsupportedVersion(u32),
    /// The configuration in the header is unusable.
    Config(ConfigError),
    /// The file length differs from what the header's configuration implies (truncated or padded).
    WrongLength {
        /// Bytes the configuration implies.
        expected: u64,
        /// Bytes present.
        actual: u64,
    },
    /// The fixed-point fraction bits differ from this build's.
    UnsupportedFracBits(u32),
    /// The client and linear files describe different models.
    ConfigMismatch,
    /// An architecture code (header bytes 48..52) this build does not know.
    UnknownArchitecture(u32),
    /// A RoPE scaling code (header bytes 60..64) this build does not know.
    UnknownRopeScaling(u32),
}

impl core::fmt::Display for FormatError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            FormatError::TooShort => write!(f, "file is shorter than the {HEADER_LEN}-byte header"),
            FormatError::BadMagic => {
                write!(f, "not a Veil weight file of the expected kind (bad magic)")
            }
            FormatError::UnsupportedVersion(v) => write!(
                f,
                "format version {v} is not supported (this build reads {FORMAT_VERSION_GPT2} and \
                 {FORMAT_VERSION}); quantize the model again with this build's veil-tools"
            ),
            FormatError::Config(e) => write!(f, "bad model configuration: {e}"),
            FormatError::WrongLength { expected, actual } => {
                write!(f, "file is {actual} bytes but its configuration implies {expected} (truncated or corrupt)")
            }
            FormatError::UnsupportedFracBits(b) => {
                write!(f, "fixed-point fraction bits {b} are not supported")
            }
            FormatError::ConfigMismatch => {
                write!(f, "client.veil and linear.veil describe different models")
            }
            FormatError::UnknownArchitecture(a) => write!(
                f,
                "architecture code {a} is not known to this build (a newer veil-tools wrote it?)"
            ),
            FormatError::UnknownRopeScaling(r) => {
                write!(f, "RoPE scaling code {r} is not known to this build")
            }
        }
    }
}

impl core::error::Error for FormatError {}

fn align_up(x: usize) -> usize {
    x.div_ceil(SECTION_ALIGN) * SECTION_ALIGN
}

/// Hands out aligned, consecutive sections.
struct Cursor(usize);

impl Cursor {
    fn take(&mut self, len: usize) -> Range<usize> {
        let start = align_up(self.0);
        self.0 = start + len;
        start..start + len
    }
}

/// Byte ranges of the linear file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearLayout {
    cfg: ModelConfig,
    layers_start: usize,
    layer_stride: usize,
    block: [Range<usize>; 4],
    lm_head: Range<usize>,
    /// Total file length.
    pub total_len: usize,
}

impl LinearLayout {
    /// The layout implied by `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        let mut c = Cursor(HEADER_LEN);
        let layers_start = align_up(c.0);
        let block = LinearKind::BLOCK.map(|k| {
            let (i, o) = cfg.linear_dims(k);
            let r = c.take(i * o);
            r.start - layers_start..r.end - layers_start
        });
        let layer_stride = align_up(c.0) - layers_start;
        c.0 = layers_start + layer_stride * cfg.n_layer as usize;
        let (i, o) = cfg.linear_dims(LinearKind::LmHead);
        let lm_head = c.take(i * o);
        LinearLayout {
            cfg: *cfg,
            layers_start,
            layer_stride,
            block,
            lm_head,
            total_len: c.0,
        }
    }

    /// Byte range of one layer's `[out][in]` int8 matrix.
    pub fn matrix(&self, id: LinearId) -> Range<usize> {
        let k = match id.kind {
            LinearKind::Qkv => 0,
            LinearKind::AttnOut => 1,
            LinearKind::MlpUp => 2,
            LinearKind::MlpDown => 3,
            LinearKind::LmHead => return self.lm_head.clone(),
        };
        let base = self.layers_start + self.layer_stride * id.layer as usize;
        base + self.block[k].start..base + self.block[k].end
    }

    /// The configuration this layout is for.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }
}

/// Byte ranges of one linear layer's client-side parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinearParamsLayout {
    /// `i32 [out]` bias in Q16.16 (absent for the LM head).
    pub bias: Option<Range<usize>>,
    /// `i32 [out]` requantization multipliers.
    pub mult: Range<usize>,
    /// `u8 [out]` requantization shifts.
    pub shift: Range<usize>,
}

/// Byte ranges of one block's client-side parameters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockLayout {
    /// `ln_1` gamma, beta.
    pub ln1: [Range<usize>; 2],
    /// `ln_2` gamma, beta.
    pub ln2: [Range<usize>; 2],
    /// Parameters of the four linear layers, in [`LinearKind::BLOCK`] order.
    pub linears: [LinearParamsLayout; 4],
}

/// Byte ranges of the client file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientLayout {
    /// `i16 [vocab][d]` token embedding.
    pub wte: Range<usize>,
    /// `u8 [vocab]` token embedding shifts.
    pub wte_shift: Range<usize>,
    /// `i16 [n_positions][d]` position embedding.
    pub wpe: Range<usize>,
    /// `u8 [n_positions]` position embedding shifts.
    pub wpe_shift: Range<usize>,
    layer_stride: usize,
    block0: BlockLayout,
    /// `ln_f` gamma, beta.
    pub ln_f: [Range<usize>; 2],
    /// LM head requantization (no bias).
    pub lm_head: LinearParamsLayout,
    /// Total file length.
    pub total_len: usize,
}

impl ClientLayout {
    /// The layout implied by `cfg`.
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.d();
        let vocab = cfg.vocab_size as usize;
        // The LLaMA family has rotary positions (no table), RMSNorm (no beta) and biases only on
        // q|k|v, and only when the checkpoint has them: those sections are empty.
        let (llama, qkv_bias) = match cfg.family {
            Family::Gpt2 => (false, true),
            Family::Llama { qkv_bias, .. } => (true, qkv_bias),
        };
        let npos = if llama { 0 } else { cfg.n_positions as usize };
        let beta = if llama { 0 } else { 4 * d };
        let mut c = Cursor(HEADER_LEN);
        let wte = c.take(vocab * d * 2);
        let wte_shift = c.take(vocab);
        let wpe = c.take(npos * d * 2);
        let wpe_shift = c.take(npos);
        let layers_start = align_up(c.0);
        let params = |c: &mut Cursor, kind: LinearKind| {
            let out = cfg.linear_dims(kind).1;
            let has_bias = !llama || (kind == LinearKind::Qkv && qkv_bias);
            LinearParamsLayout {
                bias: has_bias.then(|| c.take(4 * out)),
                mult: c.take(4 * out),
                shift: c.take(out),
            }
        };
        let ln1 = [c.take(4 * d), c.take(beta)];
        let qkv = params(&mut c, LinearKind::Qkv);
        let attn_out = params(&mut c, LinearKind::AttnOut);
        let ln2 = [c.take(4 * d), c.take(beta)];
        let up = params(&mut c, LinearKind::MlpUp);
        let down = params(&mut c, LinearKind::MlpDown);
        let block0 = BlockLayout {
            ln1,
            ln2,
            linears: [qkv, attn_out, up, down],
        };
        let layer_stride = align_up(c.0) - layers_start;
        c.0 = layers_start + layer_stride * cfg.n_layer as usize;
        let ln_f = [c.take(4 * d), c.take(beta)];
        let lm_head = LinearParamsLayout {
            bias: None,
            mult: c.take(4 * vocab),
            shift: c.take(vocab),
        };
        ClientLayout {
            wte,
            wte_shift,
            wpe,
            wpe_shift,
            layer_stride,
            block0,
            ln_f,
            lm_head,
            total_len: c.0,
        }
    }

    /// Byte ranges of block `layer`.
    pub fn block(&self, layer: usize) -> BlockLayout {
        // `block0` holds absolute ranges of block 0; later blocks follow at a fixed stride.
        let off = self.layer_stride * layer;
        let mv = |r: &Range<usize>| r.start + off..r.end + off;
        let b = &self.block0;
        BlockLayout {
            ln1: [mv(&b.ln1[0]), mv(&b.ln1[1])],
            ln2: [mv(&b.ln2[0]), mv(&b.ln2[1])],
            linears: core::array::from_fn(|k| LinearParamsLayout {
                bias: b.linears[k].bias.as_ref().map(mv),
                mult: mv(&b.linears[k].mult),
                shift: mv(&b.linears[k].shift),
            }),
        }
    }

    /// Byte ranges of one linear layer's parameters.
    pub fn linear(&self, id: LinearId) -> LinearParamsLayout {
        match id.kind {
            LinearKind::LmHead => self.lm_head.clone(),
            k => {
                let idx = LinearKind::BLOCK.iter().position(|&b| b == k).unwrap_or(0);
                self.block(id.layer as usize).linears[idx].clone()
            }
        }
    }
}

/// Client-file header fields beyond the configuration.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClientHeader {
    /// Model shape.
    pub config: ModelConfig,
    /// LayerNorm (or RMSNorm) epsilon in Q32.
    pub ln_eps_q32: u32,
    /// End-of-text token.
    pub eos_token_id: u32,
    /// SHA-256 of the matching `linear.veil`.
    pub linear_fingerprint: [u8; 32],
    /// Rotary position parameters ([`RopeConfig::NONE`] for GPT-2).
    pub rope: RopeConfig,
    /// Beginning-of-text token, when the model has one (the tokenizer's post-processor adds it to
    /// prompts; kept here so a host without the tokenizer's files knows it too).
    pub bos_token_id: Option<u32>,
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&buf[at..at + 4]);
    u32::from_le_bytes(b)
}

fn put_f64(buf: &mut [u8], at: usize, v: f64) {
    buf[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

fn get_f64(buf: &[u8], at: usize) -> f64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[at..at + 8]);
    f64::from_le_bytes(b)
}

fn get_f32(buf: &[u8], at: usize) -> f32 {
    f32::from_bits(get_u32(buf, at))
}

const ARCH_GPT2: u32 = 0;
const ARCH_LLAMA: u32 = 1;
const FLAG_QKV_BIAS: u32 = 1;
const ROPE_NONE: u32 = 0;
const ROPE_LLAMA3: u32 = 1;

fn put_config(buf: &mut [u8], cfg: &ModelConfig) {
    let vals = [
        cfg.n_layer,
        cfg.n_embd,
        cfg.n_head,
        cfg.n_positions,
        cfg.vocab_size,
        cfg.n_inner,
    ];
    for (i, v) in vals.into_iter().enumerate() {
        put_u32(buf, 12 + 4 * i, v);
    }
    put_u32(buf, 8, format_version(cfg));
    // Version 1 (GPT-2) leaves bytes 48..64 zero, as it always did.
    if let Family::Llama {
        n_kv_head,
        qkv_bias,
    } = cfg.family
    {
        put_u32(buf, 48, ARCH_LLAMA);
        put_u32(buf, 52, n_kv_head);
        put_u32(buf, 56, if qkv_bias { FLAG_QKV_BIAS } else { 0 });
    }
}

fn get_config(buf: &[u8], version: u32) -> Result<ModelConfig, FormatError> {
    let family = match (version, get_u32(buf, 48)) {
        (FORMAT_VERSION_GPT2, _) | (_, ARCH_GPT2) => Family::Gpt2,
        (_, ARCH_LLAMA) => Family::Llama {
            n_kv_head: get_u32(buf, 52),
            qkv_bias: get_u32(buf, 56) & FLAG_QKV_BIAS != 0,
        },
        (_, other) => return Err(FormatError::UnknownArchitecture(other)),
    };
    Ok(ModelConfig {
        n_layer: get_u32(buf, 12),
        n_embd: get_u32(buf, 16),
        n_head: get_u32(buf, 20),
        n_positions: get_u32(buf, 24),
        vocab_size: get_u32(buf, 28),
        n_inner: get_u32(buf, 32),
        family,
    })
}

/// Writes the header of `linear.veil` (tools).
pub fn encode_linear_header(cfg: &ModelConfig, out: &mut [u8; HEADER_LEN]) {
    out.fill(0);
    out[0..8].copy_from_slice(&LINEAR_MAGIC);
    put_config(out, cfg);
}

/// Writes the header of `client.veil` (tools).
pub fn encode_client_header(h: &ClientHeader, out: &mut [u8; HEADER_LEN]) {
    out.fill(0);
    out[0..8].copy_from_slice(&CLIENT_MAGIC);
    put_config(out, &h.config);
    put_u32(out, 36, h.ln_eps_q32);
    put_u32(out, 40, h.eos_token_id);
    put_u32(out, 44, crate::fixed::FRAC_BITS);
    out[64..96].copy_from_slice(&h.linear_fingerprint);
    if format_version(&h.config) == FORMAT_VERSION_GPT2 {
        return;
    }
    put_f64(out, 96, h.rope.theta);
    if let RopeScaling::Llama3(s) = h.rope.scaling {
        put_u32(out, 60, ROPE_LLAMA3);
        put_f64(out, 104, s.factor);
        put_u32(out, 112, s.low_freq_factor.to_bits());
        put_u32(out, 116, s.high_freq_factor.to_bits());
        put_u32(out, 120, s.original_max_positions);
    }
    put_u32(out, 124, h.bos_token_id.unwrap_or(u32::MAX));
}

fn get_rope(bytes: &[u8], version: u32) -> Result<RopeConfig, FormatError> {
    if version == FORMAT_VERSION_GPT2 {
        return Ok(RopeConfig::NONE);
    }
    let scaling = match get_u32(bytes, 60) {
        ROPE_NONE => RopeScaling::None,
        ROPE_LLAMA3 => RopeScaling::Llama3(Llama3Scaling {
            factor: get_f64(bytes, 104),
            low_freq_factor: get_f32(bytes, 112),
            high_freq_factor: get_f32(bytes, 116),
            original_max_positions: get_u32(bytes, 120),
        }),
        other => return Err(FormatError::UnknownRopeScaling(other)),
    };
    Ok(RopeConfig {
        theta: get_f64(bytes, 96),
        scaling,
    })
}

fn check_common(bytes: &[u8], magic: &[u8; 8]) -> Result<ModelConfig, FormatError> {
    if bytes.len() < HEADER_LEN {
        return Err(FormatError::TooShort);
    }
    if &bytes[0..8] != magic {
        return Err(FormatError::BadMagic);
    }
    let version = get_u32(bytes, 8);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_GPT2 {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let cfg = get_config(bytes, version)?;
    cfg.validate().map_err(FormatError::Config)?;
    Ok(cfg)
}

/// A little-endian `i32` array inside a weight file.
#[derive(Clone, Copy, Debug)]
pub struct I32s<'a>(&'a [u8]);

impl<'a> I32s<'a> {
    /// Element `i`.
    #[inline]
    pub fn get(&self, i: usize) -> i32 {
        let mut b = [0u8; 4];
        b.copy_from_slice(&self.0[4 * i..4 * i + 4]);
        i32::from_le_bytes(b)
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.0.len() / 4
    }
    /// Whether empty.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A little-endian `i16` array inside a weight file.
#[derive(Clone, Copy, Debug)]
pub struct I16s<'a>(&'a [u8]);

impl<'a> I16s<'a> {
    /// Element `i`.
    #[inline]
    pub fn get(&self, i: usize) -> i16 {
        i16::from_le_bytes([self.0[2 * i], self.0[2 * i + 1]])
    }
}

/// LayerNorm parameters inside `client.veil`.
#[derive(Clone, Copy, Debug)]
pub struct LnView<'a> {
    gamma: I32s<'a>,
    /// Empty for RMSNorm.
    beta: I32s<'a>,
}

impl LnParams for LnView<'_> {
    #[inline]
    fn gamma(&self, i: usize) -> i32 {
        self.gamma.get(i)
    }
    #[inline]
    fn beta(&self, i: usize) -> i32 {
        if self.beta.is_empty() {
            0
        } else {
            self.beta.get(i)
        }
    }
}

/// One linear layer's client-side parameters.
#[derive(Clone, Copy, Debug)]
pub struct LinearParams<'a> {
    bias: Option<I32s<'a>>,
    mult: I32s<'a>,
    shift: &'a [u8],
}

impl LinearParams<'_> {
    /// Bias of output `j` in Q16.16 (0 where the layer has none).
    #[inline]
    pub fn bias(&self, j: usize) -> i32 {
        self.bias.map_or(0, |b| b.get(j))
    }
    /// Requantization factor of output `j`.
    #[inline]
    pub fn scale(&self, j: usize) -> ChannelScale {
        ChannelScale {
            mult: self.mult.get(j),
            shift: self.shift[j],
        }
    }
}

/// A validated view of `linear.veil`.
#[derive(Clone, Debug)]
pub struct LinearWeights<'a> {
    bytes: &'a [u8],
    layout: LinearLayout,
}

impl<'a> LinearWeights<'a> {
    /// Validates header and length.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let cfg = check_common(bytes, &LINEAR_MAGIC)?;
        let layout = LinearLayout::new(&cfg);
        if bytes.len() != layout.total_len {
            return Err(FormatError::WrongLength {
                expected: layout.total_len as u64,
                actual: bytes.len() as u64,
            });
        }
        Ok(LinearWeights { bytes, layout })
    }

    /// The model shape.
    pub fn config(&self) -> &ModelConfig {
        self.layout.config()
    }

    /// A layer's `[out][in]` int8 matrix (bit patterns in `u8`).
    pub fn matrix(&self, id: LinearId) -> &'a [u8] {
        &self.bytes[self.layout.matrix(id)]
    }
}

/// A validated view of `client.veil`.
#[derive(Clone, Debug)]
pub struct ClientWeights<'a> {
    bytes: &'a [u8],
    header: ClientHeader,
    layout: ClientLayout,
}

impl<'a> ClientWeights<'a> {
    /// Validates header and length.
    pub fn parse(bytes: &'a [u8]) -> Result<Self, FormatError> {
        let config = check_common(bytes, &CLIENT_MAGIC)?;
        let frac = get_u32(bytes, 44);
        if frac != crate::fixed::FRAC_BITS {
            return Err(FormatError::UnsupportedFracBits(frac));
        }
        let mut linear_fingerprint = [0u8; 32];
        linear_fingerprint.copy_from_slice(&bytes[64..96]);
        let version = get_u32(bytes, 8);
        let bos = get_u32(bytes, 124);
        let header = ClientHeader {
            config,
            ln_eps_q32: get_u32(bytes, 36),
            eos_token_id: get_u32(bytes, 40),
            linear_fingerprint,
            rope: get_rope(bytes, version)?,
            bos_token_id: (version != FORMAT_VERSION_GPT2 && bos != u32::MAX).then_some(bos),
        };
        let layout = ClientLayout::new(&config);
        if bytes.len() != layout.total_len {
            return Err(FormatError::WrongLength {
                expected: layout.total_len as u64,
                actual: bytes.len() as u64,
            });
        }
        Ok(ClientWeights {
            bytes,
            header,
            layout,
        })
    }

    /// Header fields.
    pub fn header(&self) -> &ClientHeader {
        &self.header
    }

    /// The model shape.
    pub fn config(&self) -> &ModelConfig {
        &self.header.config
    }

    fn i32s(&self, r: &Range<usize>) -> I32s<'a> {
        I32s(&self.bytes[r.clone()])
    }

    /// `ln_1` (which = 1) or `ln_2` (which = 2) of a block.
    pub fn block_ln(&self, layer: usize, which: u8) -> LnView<'a> {
        let b = self.layout.block(layer);
        let r = if which == 1 { &b.ln1 } else { &b.ln2 };
        LnView {
            gamma: self.i32s(&r[0]),
            beta: self.i32s(&r[1]),
        }
    }

    /// The final LayerNorm.
    pub fn ln_f(&self) -> LnView<'a> {
        LnView {
            gamma: self.i32s(&self.layout.ln_f[0]),
            beta: self.i32s(&self.layout.ln_f[1]),
        }
    }

    /// Client-side parameters of a linear layer.
    pub fn linear(&self, id: LinearId) -> LinearParams<'a> {
        let l = self.layout.linear(id);
        LinearParams {
            bias: l.bias.as_ref().map(|r| self.i32s(r)),
            mult: self.i32s(&l.mult),
            shift: &self.bytes[l.shift],
        }
    }

    /// Writes `wte[token] + wpe[pos]` in Q16.16 into `out` (`d` values; only `wte[token]` for
    /// the LLaMA family, whose positions are rotary). The caller checks ranges.
    pub fn embed(&self, token: usize, pos: usize, out: &mut [i32]) {
        let d = self.config().d();
        let wte = I16s(
            &self.bytes[self.layout.wte.start + token * d * 2
                ..self.layout.wte.start + (token + 1) * d * 2],
        );
        let ts = self.bytes[self.layout.wte_shift.start + token];
        if self.config().is_llama() {
            for (i, o) in out.iter_mut().enumerate().take(d) {
                *o = crate::quant::BlockI16::decode(wte.get(i), ts);
            }
            return;
        }
        let wpe = I16s(
            &self.bytes
                [self.layout.wpe.start + pos * d * 2..self.layout.wpe.start + (pos + 1) * d * 2],
        );
        let ps = self.bytes[self.layout.wpe_shift.start + pos];
        for (i, o) in out.iter_mut().enumerate().take(d) {
            let t = crate::quant::BlockI16::decode(wte.get(i), ts) as i64;
            let p = crate::quant::BlockI16::decode(wpe.get(i), ps) as i64;
            *o = crate::fixed::saturate_i32(t + p);
        }
    }
}

/// Checks that a client file and a linear file belong to the same model shape.
pub fn check_pair(
    client: &ClientWeights<'_>,
    linear: &LinearWeights<'_>,
) -> Result<(), FormatError> {
    if client.config() != linear.config() {
        return Err(FormatError::ConfigMismatch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec;

    fn cfg() -> ModelConfig {
        ModelConfig {
            n_layer: 2,
            n_embd: 8,
            n_head: 2,
            n_positions: 4,
            vocab_size: 10,
            n_inner: 32,
            family: Family::Gpt2,
        }
    }

    #[test]
    fn test_layouts_do_not_overlap_and_are_aligned() {
        let c = cfg();
        let l = LinearLayout::new(&c);
        let mut ranges = vec![];
        for id in c.linears() {
            ranges.push(l.matrix(id));
        }
        let cl = ClientLayout::new(&c);
        let mut cr = vec![
            cl.wte.clone(),
            cl.wte_shift.clone(),
            cl.wpe.clone(),
            cl.wpe_shift.clone(),
            cl.ln_f[0].clone(),
            cl.ln_f[1].clone(),
        ];
        for layer in 0..2 {
            let b = cl.block(layer);
            cr.extend(b.ln1.iter().cloned());
            cr.extend(b.ln2.iter().cloned());
            for p in b.linears.iter() {
                cr.extend([p.bias.clone().unwrap(), p.mult.clone(), p.shift.clone()]);
            }
        }
        cr.extend([cl.lm_head.mult.clone(), cl.lm_head.shift.clone()]);
        for (set, total) in [(ranges, l.total_len), (cr, cl.total_len)] {
            for (i, a) in set.iter().enumerate() {
                assert_eq!(a.start % SECTION_ALIGN, 0);
                assert!(a.start >= HEADER_LEN && a.end <= total);
                for b in &set[i + 1..] {
                    assert!(a.end <= b.start || b.end <= a.start, "{a:?} overlaps {b:?}");
                }
            }
        }
    }

    /// GPT-2 headers stay version 1 with bytes 48..64 and 96..128 zero (files and fingerprints
    /// as before); a LLaMA-family header is version 2 and gives back every field it was given.
    #[test]
    fn test_headers_of_both_families_round_trip() {
        let gpt2 = cfg();
        let mut h = [0u8; HEADER_LEN];
        let header = ClientHeader {
            config: gpt2,
            ln_eps_q32: 42950,
            eos_token_id: 9,
            linear_fingerprint: [7; 32],
            rope: RopeConfig::NONE,
            bos_token_id: None,
        };
        encode_client_header(&header, &mut h);
        assert_eq!(get_u32(&h, 8), 1);
        assert!(h[48..64].iter().chain(&h[96..128]).all(|&b| b == 0));
        let llama = ModelConfig {
            n_head: 4,
            n_embd: 16,
            family: Family::Llama {
                n_kv_head: 2,
                qkv_bias: true,
            },
            ..gpt2
        };
        let header = ClientHeader {
            config: llama,
            rope: RopeConfig {
                theta: 500000.0,
                scaling: RopeScaling::Llama3(Llama3Scaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_positions: 64,
                }),
            },
            bos_token_id: Some(0),
            ..header
        };
        let cl = ClientLayout::new(&llama);
        assert!(cl.wpe.is_empty() && cl.ln_f[1].is_empty() && cl.lm_head.bias.is_none());
        let b = cl.block(1);
        assert!(b.linears[0].bias.is_some() && b.linears[1..].iter().all(|p| p.bias.is_none()));
        let mut bytes = vec![0u8; cl.total_len];
        encode_client_header(&header, &mut h);
        bytes[..HEADER_LEN].copy_from_slice(&h);
        let parsed = ClientWeights::parse(&bytes).unwrap();
        assert_eq!(parsed.header(), &header);
        assert_eq!(get_u32(&bytes, 8), 2);
        let mut lin = vec![0u8; LinearLayout::new(&llama).total_len];
        encode_linear_header(&llama, &mut h);
        lin[..HEADER_LEN].copy_from_slice(&h);
        let lw = LinearWeights::parse(&lin).unwrap();
        assert_eq!(lw.config(), &llama);
        check_pair(&parsed, &lw).unwrap();
        bytes[48] = 7;
        assert_eq!(
            ClientWeights::parse(&bytes).unwrap_err(),
            FormatError::UnknownArchitecture(7)
        );
    }

    #[test]
    fn test_parse_rejects_truncated_and_wrong_magic() {
        let c = cfg();
        let l = LinearLayout::new(&c);
        let mut bytes = vec![0u8; l.total_len];
        let mut h = [0u8; HEADER_LEN];
        encode_linear_header(&c, &mut h);
        bytes[..HEADER_LEN].copy_from_slice(&h);
        assert!(LinearWeights::parse(&bytes).is_ok());
        assert!(matches!(
            LinearWeights::parse(&bytes[..bytes.len() - 1]),
            Err(FormatError::WrongLength { .. })
        ));
        assert_eq!(
            LinearWeights::parse(&bytes[..10]).unwrap_err(),
            FormatError::TooShort
        );
        assert_eq!(
            ClientWeights::parse(&bytes).unwrap_err(),
            FormatError::BadMagic
        );
        bytes[8] = 9;
        assert_eq!(
            LinearWeights::parse(&bytes).unwrap_err(),
            FormatError::UnsupportedVersion(9)
        );
    }
}
