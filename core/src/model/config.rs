//! Model shapes and the names of the offloaded linear layers.

use serde::{Deserialize, Serialize};

/// Longest context supported: the attention's `i32` sum of Q15 probabilities times 16-bit values
/// stays exact while `(2^15 + n) · 2^15 < 2^31` (GPT-2 models have 1024).
pub const MAX_POSITIONS: u32 = 1 << 14;

/// Which architecture a model is: the same forward pass, with the parts that differ chosen here.
///
/// Only what changes the shapes of the offloaded layers or of the client's files lives here; the
/// client-only constants of an architecture (RoPE) are in the client file's header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Family {
    /// GPT-2: LayerNorm, GELU MLP, learned position embeddings, biases on every linear layer,
    /// LM head tied to the token embedding.
    Gpt2,
    /// The LLaMA family (Llama 2/3, Qwen2, SmolLM): RMSNorm, SwiGLU MLP (`SiLU(gate)·up`, with
    /// gate and up fused into one offloaded layer), rotary position embeddings, grouped-query
    /// attention, no biases except optional q/k/v ones (Qwen2), an LM head of its own.
    Llama {
        /// Key/value heads; divides `n_head` (query heads `h` use KV head `h / (n_head / n_kv_head)`).
        n_kv_head: u32,
        /// Whether the fused q|k|v projection has a bias (Qwen2).
        qkv_bias: bool,
    },
}

/// The shape of a model (the fields of Hugging Face's `config.json` that matter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Transformer blocks.
    pub n_layer: u32,
    /// Residual width `d`.
    pub n_embd: u32,
    /// Attention heads; `n_embd` is a multiple of it.
    pub n_head: u32,
    /// Maximum sequence length (rows of the position embedding).
    pub n_positions: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
    /// MLP hidden width (`4 · n_embd` for GPT-2; `intermediate_size` for LLaMA).
    pub n_inner: u32,
    /// The architecture.
    pub family: Family,
}

/// Why a configuration cannot be used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A dimension is zero.
    ZeroDimension,
    /// `n_embd` is not a multiple of `n_head`.
    HeadsDoNotDivideWidth,
    /// A layer input is wider than int8 products can sum exactly in 32 bits.
    TooWide,
    /// A dimension is beyond what this implementation supports (sizes would overflow).
    TooLarge,
    /// The KV heads do not divide the query heads, or the head width is odd (RoPE rotates pairs).
    BadKvHeads,
}

impl core::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ConfigError::ZeroDimension => "a model dimension is zero",
            ConfigError::HeadsDoNotDivideWidth => "n_embd is not a multiple of n_head",
            ConfigError::TooWide => "a layer is too wide for exact 32-bit int8 sums",
            ConfigError::TooLarge => "a model dimension is too large",
            ConfigError::BadKvHeads => {
                "n_kv_head must divide n_head, and RoPE needs an even head width"
            }
        })
    }
}

impl core::error::Error for ConfigError {}

impl ModelConfig {
    /// Checks the shape is one the integer pipeline handles exactly.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let dims = [
            self.n_layer,
            self.n_embd,
            self.n_head,
            self.n_positions,
            self.vocab_size,
            self.n_inner,
        ];
        if dims.contains(&0) {
            return Err(ConfigError::ZeroDimension);
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(ConfigError::HeadsDoNotDivideWidth);
        }
        if let Family::Llama { n_kv_head, .. } = self.family {
            if n_kv_head == 0
                || !self.n_head.is_multiple_of(n_kv_head)
                || !self.head_dim().is_multiple_of(2)
            {
                return Err(ConfigError::BadKvHeads);
            }
        }
        if self.n_embd as usize > crate::kernels::MAX_IN_DIM
            || self.n_inner as usize > crate::kernels::MAX_IN_DIM
        {
            return Err(ConfigError::TooWide);
        }
        if self.n_layer > 1024
            || self.n_positions > MAX_POSITIONS
            || self.vocab_size > 1 << 24
            || self.n_head > self.n_embd
        {
            return Err(ConfigError::TooLarge);
        }
        Ok(())
    }

    /// `n_embd` as `usize`.
    pub fn d(&self) -> usize {
        self.n_embd as usize
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        (self.n_embd / self.n_head) as usize
    }

    /// Whether this is a LLaMA-family model.
    pub fn is_llama(&self) -> bool {
        matches!(self.family, Family::Llama { .. })
    }

    /// Key/value heads (`n_head` for GPT-2).
    pub fn n_kv_head(&self) -> usize {
        match self.family {
            Family::Gpt2 => self.n_head as usize,
            Family::Llama { n_kv_head, .. } => n_kv_head as usize,
        }
    }

    /// Width of one position's keys (or values): `n_kv_head · head_dim` (`d` for GPT-2).
    pub fn kv_dim(&self) -> usize {
        self.n_kv_head() * self.head_dim()
    }

    /// Every offloaded linear layer, in the order of one forward pass.
    pub fn linears(&self) -> impl Iterator<Item = LinearId> + '_ {
        (0..self.n_layer as u16)
            .flat_map(|layer| {
                LinearKind::BLOCK
                    .into_iter()
                    .map(move |kind| LinearId { layer, kind })
            })
            .chain(core::iter::once(LinearId {
                layer: 0,
                kind: LinearKind::LmHead,
            }))
    }

    /// Number of distinct linear layers (`4 · n_layer + 1`).
    pub fn linear_count(&self) -> usize {
        4 * self.n_layer as usize + 1
    }

    /// `(in, out)` of a linear layer. LLaMA's fused q|k|v has `(n_head + 2·n_kv_head)·head_dim`
    /// outputs (queries, then keys, then values) and its fused gate|up `2·inner` (gate first).
    pub fn linear_dims(&self, kind: LinearKind) -> (usize, usize) {
        let d = self.n_embd as usize;
        let inner = self.n_inner as usize;
        match kind {
            LinearKind::Qkv => (d, d + 2 * self.kv_dim()),
            LinearKind::AttnOut => (d, d),
            LinearKind::MlpUp if self.is_llama() => (d, 2 * inner),
            LinearKind::MlpUp => (d, inner),
            LinearKind::MlpDown => (inner, d),
            LinearKind::LmHead => (d, self.vocab_size as usize),
        }
    }

    /// `(widest input, widest output)` over every linear layer: the row widths that buffers for
    /// any layer's rows must hold (the output is the vocabulary for GPT-2's shapes).
    pub fn widest_linear(&self) -> (usize, usize) {
        LinearKind::BLOCK
            .into_iter()
            .chain([LinearKind::LmHead])
            .map(|k| self.linear_dims(k))
            .fold((0, 0), |(wi, wo), (i, o)| (wi.max(i), wo.max(o)))
    }

    /// Sum of the output widths of one block's linear layers (the `u` words one slot needs).
    pub fn block_out_words(&self) -> usize {
        LinearKind::BLOCK
            .iter()
            .map(|&k| self.linear_dims(k).1)
            .sum()
    }

    /// Sum of the input widths of one block's linear layers (the words uploaded per row per block).
    pub fn block_in_words(&self) -> usize {
        LinearKind::BLOCK
            .iter()
            .map(|&k| self.linear_dims(k).0)
            .sum()
    }
}

/// Which linear layer of a block (or the LM head).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum LinearKind {
    /// `attn.c_attn`: fused Q|K|V projection, `d → 3d` (LLaMA: `q_proj|k_proj|v_proj`).
    Qkv,
    /// `attn.c_proj`: attention output projection, `d → d` (LLaMA: `o_proj`).
    AttnOut,
    /// `mlp.c_fc`: `d → inner` (LLaMA: `gate_proj|up_proj`, `d → 2·inner`).
    MlpUp,
    /// `mlp.c_proj`: `inner → d` (LLaMA: `down_proj`).
    MlpDown,
    /// The LM head, `d → vocab` (GPT-2: tied to the token embedding).
    LmHead,
}

impl LinearKind {
    /// The four linear layers of a block, in execution order.
    pub const BLOCK: [LinearKind; 4] = [
        LinearKind::Qkv,
        LinearKind::AttnOut,
        LinearKind::MlpUp,
        LinearKind::MlpDown,
    ];
}

/// One linear layer of the model: a block's layer, or the LM head (whose `layer` is 0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LinearId {
    /// Block index (0 for the LM head).
    pub layer: u16,
    /// Which layer of the block.
    pub kind: LinearKind,
}

impl LinearId {
    /// The LM head.
    pub const LM_HEAD: LinearId = LinearId {
        layer: 0,
        kind: LinearKind::LmHead,
    };

    /// A dense index in `0..cfg.linear_count()`: block layers `4·layer + kind`, the LM head last.
    pub fn flat_index(&self, cfg: &ModelConfig) -> u32 {
        match self.kind {
            LinearKind::Qkv => 4 * self.layer as u32,
            LinearKind::AttnOut => 4 * self.layer as u32 + 1,
            LinearKind::MlpUp => 4 * self.layer as u32 + 2,
            LinearKind::MlpDown => 4 * self.layer as u32 + 3,
            LinearKind::LmHead => 4 * cfg.n_layer,
        }
    }

    /// Whether this id names a layer that exists in `cfg`.
    pub fn is_valid(&self, cfg: &ModelConfig) -> bool {
        match self.kind {
            LinearKind::LmHead => self.layer == 0,
            _ => (self.layer as u32) < cfg.n_layer,
        }
    }

    /// `(in, out)` of this layer.
    pub fn dims(&self, cfg: &ModelConfig) -> (usize, usize) {
        cfg.linear_dims(self.kind)
    }
}

impl core::fmt::Display for LinearId {
    /// In words that fit both families, since an id does not know its model's: `block 3 MLP
    /// down projection` (GPT-2's `mlp.c_proj`, LLaMA's `mlp.down_proj`), `block 0 q|k|v
    /// projection` (`attn.c_attn`; `self_attn.{q,k,v}_proj`), `attention output projection`
    /// (`attn.c_proj`; `self_attn.o_proj`), `MLP up projection` (`mlp.c_fc`;
    /// `mlp.{gate,up}_proj`), `the LM head`.
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let name = match self.kind {
            LinearKind::Qkv => "q|k|v projection",
            LinearKind::AttnOut => "attention output projection",
            LinearKind::MlpUp => "MLP up projection",
            LinearKind::MlpDown => "MLP down projection",
            LinearKind::LmHead => return f.write_str("the LM head"),
        };
        write!(f, "block {} {name}", self.layer)
    }
}
