//! An f32 reference GPT-2 forward pass with `GPT2LMHeadModel` semantics.
//!
//! This is the yardstick every integer pipeline is measured against, so it follows `transformers`
//! operation by operation (f32 storage, f32 matrix products, LayerNorm statistics in f64, which is
//! at least as accurate as PyTorch's) rather than being clever. Matrix products go through
//! `matrixmultiply`'s SIMD sgemm, split over threads with rayon.

use rayon::prelude::*;

use crate::hf::{Activation, Checkpoint, GptConfig, LayerNorm, Linear};

/// Per-input-channel maximum |activation| seen at the input of every linear layer (SmoothQuant
/// calibration). Accumulates over any number of [`FloatModel::forward_with_stats`] (or, for the
/// LLaMA family, [`crate::llama::LlamaFloat::forward_with_stats`]) calls.
#[derive(Debug, Clone, PartialEq)]
pub struct ActStats {
    /// One entry per block, in order.
    pub blocks: Vec<BlockActStats>,
    /// Input of the LM head (output of `ln_f`), `[d]`.
    pub lm_head: Vec<f32>,
    /// Number of token positions accumulated.
    pub rows: usize,
}

/// Per-channel max |input| of the four linear layers of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct BlockActStats {
    /// Input of `attn.c_attn` (output of `ln_1`), `[d]`.
    pub c_attn: Vec<f32>,
    /// Input of `attn.c_proj` (merged attention heads), `[d]`.
    pub attn_proj: Vec<f32>,
    /// Input of `mlp.c_fc` (output of `ln_2`), `[d]`.
    pub c_fc: Vec<f32>,
    /// Input of `mlp.c_proj` (GELU output), `[n_inner]`.
    pub mlp_proj: Vec<f32>,
}

impl ActStats {
    /// Empty statistics (all zeros) shaped for `config`.
    pub fn new(config: &GptConfig) -> Self {
        Self::with_shape(config.n_layer, config.n_embd, config.n_inner)
    }

    /// Empty statistics for `n_layer` blocks of width `d` and MLP width `inner`, either family
    /// (the LLaMA family's `c_attn` is the input of q|k|v, `attn_proj` of `o_proj`, `c_fc` of
    /// gate|up, `mlp_proj` of `down_proj`).
    pub fn with_shape(n_layer: usize, d: usize, inner: usize) -> Self {
        ActStats {
            blocks: (0..n_layer)
                .map(|_| BlockActStats {
                    c_attn: vec![0.0; d],
                    attn_proj: vec![0.0; d],
                    c_fc: vec![0.0; d],
                    mlp_proj: vec![0.0; inner],
                })
                .collect(),
            lm_head: vec![0.0; d],
            rows: 0,
        }
    }

    /// Whether these statistics were shaped by [`with_shape`](Self::with_shape) with these sizes.
    pub fn has_shape(&self, n_layer: usize, d: usize, inner: usize) -> bool {
        self.blocks.len() == n_layer
            && self.lm_head.len() == d
            && self.blocks.iter().all(|b| {
                b.c_attn.len() == d
                    && b.attn_proj.len() == d
                    && b.c_fc.len() == d
                    && b.mlp_proj.len() == inner
            })
    }
}

/// Folds `x` (rows of `acc.len()` values) into the running per-channel max |x|.
pub(crate) fn update_max_abs(acc: &mut [f32], x: &[f32]) {
    for row in x.chunks_exact(acc.len()) {
        for (a, &v) in acc.iter_mut().zip(row) {
            *a = a.max(v.abs());
        }
    }
}

/// The f32 reference model. Owns a copy of the checkpoint's weights.
#[derive(Debug, Clone)]
pub struct FloatModel {
    ckpt: Checkpoint,
}

/// Keys and values of the positions processed so far, per layer, `[len, d]` row-major.
struct KvCache {
    k: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
    len: usize,
}

impl KvCache {
    fn new(n_layer: usize) -> Self {
        KvCache {
            k: vec![Vec::new(); n_layer],
            v: vec![Vec::new(); n_layer],
            len: 0,
        }
    }
}

/// Which positions need logits.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Logits {
    All,
    Last,
}

impl crate::eval::FloatLogits for FloatModel {
    fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        FloatModel::forward(self, tokens)
    }
}

impl FloatModel {
    /// Builds the model from a loaded checkpoint (copies the weights).
    pub fn from_checkpoint(ckpt: &Checkpoint) -> Self {
        FloatModel { ckpt: ckpt.clone() }
    }

    /// The model's config.
    pub fn config(&self) -> &GptConfig {
        &self.ckpt.config
    }

    /// Logits for every position: `tokens.len() * vocab_size` values, row `t` predicting token
    /// `t + 1`.
    ///
    /// # Panics
    /// If a token is `>= vocab_size` or `tokens.len() > n_positions`.
    pub fn forward(&self, tokens: &[u32]) -> Vec<f32> {
        self.run(
            tokens,
            &mut KvCache::new(self.ckpt.blocks.len()),
            None,
            Logits::All,
        )
    }

    /// Logits of the last position only (`vocab_size` values); the LM head, the largest layer, runs
    /// on one row.
    ///
    /// # Panics
    /// If `tokens` is empty, a token is `>= vocab_size` or `tokens.len() > n_positions`.
    pub fn forward_last(&self, tokens: &[u32]) -> Vec<f32> {
        assert!(!tokens.is_empty(), "forward_last needs at least one token");
        self.run(
            tokens,
            &mut KvCache::new(self.ckpt.blocks.len()),
            None,
            Logits::Last,
        )
    }

    /// Like [`forward`](Self::forward), also folding every linear layer's input into `stats`.
    ///
    /// # Panics
    /// As [`forward`](Self::forward); also if `stats` was made for another config.
    pub fn forward_with_stats(&self, tokens: &[u32], stats: &mut ActStats) -> Vec<f32> {
        let c = &self.ckpt.config;
        assert!(
            stats.has_shape(c.n_layer, c.n_embd, c.n_inner),
            "ActStats shaped for another config"
        );
        self.run(
            tokens,
            &mut KvCache::new(self.ckpt.blocks.len()),
            Some(stats),
            Logits::All,
        )
    }

    /// Greedy decoding: the `n` tokens that follow `prompt` (the prompt is not repeated), taking
    /// the first maximal logit at each step, like `argmax` in PyTorch. Uses a KV cache.
    ///
    /// # Panics
    /// If `prompt` is empty, a token is out of range, or `prompt.len() + n - 1 > n_positions`.
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Vec<u32> {
        assert!(!prompt.is_empty(), "greedy needs a non-empty prompt");
        let mut cache = KvCache::new(self.ckpt.blocks.len());
        let mut out = Vec::with_capacity(n);
        if n == 0 {
            return out;
        }
        let mut logits = self.run(prompt, &mut cache, None, Logits::Last);
        loop {
            let next = argmax(&logits);
            out.push(next);
            if out.len() == n {
                return out;
            }
            logits = self.run(&[next], &mut cache, None, Logits::Last);
        }
    }

    fn run(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        mut stats: Option<&mut ActStats>,
        which: Logits,
    ) -> Vec<f32> {
        let c = &self.ckpt.config;
        let d = c.n_embd;
        let t_new = tokens.len();
        let past = cache.len;
        assert!(
            past + t_new <= c.n_positions,
            "sequence of {} tokens exceeds n_positions = {}",
            past + t_new,
            c.n_positions
        );
        if t_new == 0 {
            return Vec::new();
        }

        // Embeddings: h[t] = wte[token] + wpe[position].
        let mut h = vec![0f32; t_new * d];
        for (t, (&tok, row)) in tokens.iter().zip(h.chunks_exact_mut(d)).enumerate() {
            let tok = tok as usize;
            assert!(
                tok < c.vocab_size,
                "token {tok} out of range (vocab {})",
                c.vocab_size
            );
            let e = &self.ckpt.wte.data[tok * d..(tok + 1) * d];
            let p = &self.ckpt.wpe.data[(past + t) * d..(past + t + 1) * d];
            for ((o, &a), &b) in row.iter_mut().zip(e).zip(p) {
                *o = a + b;
            }
        }

        for (l, block) in self.ckpt.blocks.iter().enumerate() {
            let bs = stats.as_deref_mut().map(|s| &mut s.blocks[l]);
            let (s_attn, s_proj, s_fc, s_mproj) = match bs {
                Some(b) => (
                    Some(&mut b.c_attn),
                    Some(&mut b.attn_proj),
                    Some(&mut b.c_fc),
                    Some(&mut b.mlp_proj),
                ),
                None => (None, None, None, None),
            };

            // Attention sub-block.
            let x = layer_norm(&h, &block.ln_1, c.layer_norm_epsilon);
            if let Some(s) = s_attn {
                update_max_abs(s, &x);
            }
            let qkv = linear(&x, &block.c_attn);
            let kc = &mut cache.k[l];
            let vc = &mut cache.v[l];
            for row in qkv.chunks_exact(3 * d) {
                kc.extend_from_slice(&row[d..2 * d]);
                vc.extend_from_slice(&row[2 * d..]);
            }
            let a = attention(&qkv, kc, vc, past, c.n_head, d);
            if let Some(s) = s_proj {
                update_max_abs(s, &a);
            }
            let a = linear(&a, &block.attn_proj);
            add_assign(&mut h, &a);

            // MLP sub-block.
            let x = layer_norm(&h, &block.ln_2, c.layer_norm_epsilon);
            if let Some(s) = s_fc {
                update_max_abs(s, &x);
            }
            let mut f = linear(&x, &block.c_fc);
            match c.activation {
                Activation::GeluNew => f.par_iter_mut().for_each(|v| *v = gelu_new(*v)),
                Activation::Gelu => f.par_iter_mut().for_each(|v| *v = gelu_erf(*v)),
            }
            if let Some(s) = s_mproj {
                update_max_abs(s, &f);
            }
            let m = linear(&f, &block.mlp_proj);
            add_assign(&mut h, &m);
        }
        cache.len += t_new;

        let rows = match which {
            Logits::All => &h[..],
            Logits::Last => &h[(t_new - 1) * d..],
        };
        let x = layer_norm(rows, &self.ckpt.ln_f, c.layer_norm_epsilon);
        if let Some(s) = stats {
            update_max_abs(&mut s.lm_head, &x);
            s.rows += t_new;
        }
        // logits = x · wteᵀ: wte is [vocab, d], so its transpose is a strided view, no copy.
        let m = x.len() / d;
        let a = MatView::row_major(&x, m, d);
        let b = MatView {
            data: &self.ckpt.wte.data,
            offset: 0,
            rows: d,
            cols: c.vocab_size,
            rs: 1,
            cs: d,
        };
        matmul(a, b, None)
    }
}

/// Index of the first maximal value (NaN never wins).
fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}

fn add_assign(h: &mut [f32], x: &[f32]) {
    for (a, &b) in h.iter_mut().zip(x) {
        *a += b;
    }
}

/// `gelu_new` exactly as `transformers`' `NewGELUActivation` computes it in f32.
pub fn gelu_new(x: f32) -> f32 {
    const K: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (K * (x + 0.044715 * x * x * x)).tanh())
}

/// Exact GELU, `0.5·x·(1 + erf(x/√2))`.
pub fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + libm::erff(x * core::f32::consts::FRAC_1_SQRT_2))
}

/// LayerNorm over rows of `ln.weight.data.len()` values; mean and variance (biased, as PyTorch) in
/// f64.
fn layer_norm(x: &[f32], ln: &LayerNorm, eps: f64) -> Vec<f32> {
    let d = ln.weight.data.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(o, row)| {
            let n = d as f64;
            let mean = row.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = row
                .iter()
                .map(|&v| {
                    let c = v as f64 - mean;
                    c * c
                })
                .sum::<f64>()
                / n;
            let inv = 1.0 / (var + eps).sqrt();
            for (((o, &v), &g), &b) in o
                .iter_mut()
                .zip(row)
                .zip(&ln.weight.data)
                .zip(&ln.bias.data)
            {
                *o = ((v as f64 - mean) * inv) as f32 * g + b;
            }
        });
    out
}

/// Causal multi-head attention of the new rows of `qkv` (`[t_new, 3d]`, fused Q|K|V) over all
/// cached keys/values (`[past + t_new, d]`). Returns merged heads `[t_new, d]`.
fn attention(qkv: &[f32], k: &[f32], v: &[f32], past: usize, n_head: usize, d: usize) -> Vec<f32> {
    let hd = d / n_head;
    // transformers divides by sqrt(head_dim) held as a tensor of the activations' dtype.
    let scale = (hd as f32).sqrt();
    let t_new = qkv.len() / (3 * d);
    let mut out = vec![0f32; t_new * d];
    out.par_chunks_mut(d).enumerate().for_each(|(t, orow)| {
        let len = past + t + 1; // causal: this row sees positions 0..=past+t
        let q = &qkv[t * 3 * d..t * 3 * d + d];
        let mut p = vec![0f32; len];
        for head in 0..n_head {
            let hs = head * hd..(head + 1) * hd;
            let qh = &q[hs.clone()];
            for (s, ps) in p.iter_mut().enumerate() {
                *ps = dot(qh, &k[s * d + hs.start..s * d + hs.end]) / scale;
            }
            let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for ps in p.iter_mut() {
                *ps = (*ps - max).exp();
                sum += *ps;
            }
            let oh = &mut orow[hs.clone()];
            for (s, &ps) in p.iter().enumerate() {
                let w = ps / sum;
                for (o, &vv) in oh.iter_mut().zip(&v[s * d + hs.start..s * d + hs.end]) {
                    *o += w * vv;
                }
            }
        }
    });
    out
}

/// Dot product with eight independent accumulators so the compiler can vectorise it.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `x · W + b` for a Conv1D layer; `x` is `[m, in]` row-major.
fn linear(x: &[f32], lin: &Linear) -> Vec<f32> {
    let (n_in, n_out) = (lin.in_features(), lin.out_features());
    let a = MatView::row_major(x, x.len() / n_in, n_in);
    let b = MatView::row_major(&lin.weight.data, n_in, n_out);
    matmul(a, b, Some(&lin.bias.data))
}

/// `x · Wᵀ + b` for an `nn.Linear` weight `W` of `[out, in]` (the LLaMA family's layout); `x`
/// is `[m, in]` row-major.
pub(crate) fn linear_t(
    x: &[f32],
    w: &[f32],
    n_in: usize,
    n_out: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let a = MatView::row_major(x, x.len() / n_in, n_in);
    // Wᵀ[i][j] = W[j][i]: row stride 1, column stride `in`.
    let b = MatView {
        data: w,
        offset: 0,
        rows: n_in,
        cols: n_out,
        rs: 1,
        cs: n_in,
    };
    matmul(a, b, bias)
}

/// A read-only matrix view with arbitrary (non-negative) strides into a slice.
#[derive(Clone, Copy)]
struct MatView<'a> {
    data: &'a [f32],
    offset: usize,
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> MatView<'a> {
    fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatView {
            data,
            offset: 0,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    fn sub_rows(self, r0: usize, n: usize) -> Self {
        MatView {
            offset: self.offset + r0 * self.rs,
            rows: n,
            ..self
        }
    }

    fn sub_cols(self, c0: usize, n: usize) -> Self {
        MatView {
            offset: self.offset + c0 * self.cs,
            cols: n,
            ..self
        }
    }

    /// True when every element the view addresses is inside `data`.
    fn in_bounds(&self) -> bool {
        if self.rows == 0 || self.cols == 0 {
            return true;
        }
        let last = (self.rows - 1)
            .checked_mul(self.rs)
            .and_then(|r| (self.cols - 1).checked_mul(self.cs).map(|c| (r, c)))
            .and_then(|(r, c)| r.checked_add(c))
            .and_then(|rc| rc.checked_add(self.offset));
        matches!(last, Some(i) if i < self.data.len())
            && self.rs <= isize::MAX as usize
            && self.cs <= isize::MAX as usize
    }
}

/// `c = a · b`, `c` row-major `[a.rows, b.cols]`, single-threaded.
fn gemm(a: MatView<'_>, b: MatView<'_>, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ");
    assert_eq!(c.len(), m * n, "output buffer has the wrong size");
    assert!(a.in_bounds() && b.in_bounds(), "matrix view out of bounds");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        c.fill(0.0);
        return;
    }
    // SAFETY: the asserts above guarantee that every element sgemm reads through `a`/`b` (offsets
    // `offset + i·rs + j·cs` for i < rows, j < cols) lies inside the borrowed slices, and that `c`
    // holds exactly m·n elements written with row stride n, column stride 1. The strides fit in
    // isize. beta = 0, so `c`'s prior contents are never read as input; `c` is a unique borrow, so
    // it does not alias `a` or `b`.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.data.as_ptr().add(a.offset),
            a.rs as isize,
            a.cs as isize,
            b.data.as_ptr().add(b.offset),
            b.rs as isize,
            b.cs as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// `a · b (+ bias per column)`, split over the rayon pool: by rows when there are many (output
/// chunks are contiguous), otherwise by columns into private buffers that are then scattered.
fn matmul(a: MatView<'_>, b: MatView<'_>, bias: Option<&[f32]>) -> Vec<f32> {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    let mut c = vec![0f32; m * n];
    let threads = rayon::current_num_threads().max(1);
    // Below ~1 MFLOP thread hand-off costs more than it saves.
    if m <= GEMV_MAX_ROWS && (b.cs == 1 || b.rs == 1) && m * k * n >= (1 << 16) {
        gemv(a, b, &mut c);
    } else if threads == 1 || m * k * n < (1 << 19) {
        gemm(a, b, &mut c);
    } else if m >= 8 * threads {
        let rows_per = m.div_ceil(threads * 2);
        c.par_chunks_mut(rows_per * n)
            .enumerate()
            .for_each(|(i, chunk)| {
                let r0 = i * rows_per;
                gemm(a.sub_rows(r0, chunk.len() / n), b, chunk);
            });
    } else {
        // Column chunks of a multiple of 16 keep sgemm's microkernel tiles full.
        let cols_per = n.div_ceil(threads * 4).next_multiple_of(16);
        let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(cols_per))
            .into_par_iter()
            .map(|i| {
                let c0 = i * cols_per;
                let nc = cols_per.min(n - c0);
                let mut buf = vec![0f32; m * nc];
                gemm(a, b.sub_cols(c0, nc), &mut buf);
                (c0, buf)
            })
            .collect();
        for (c0, buf) in parts {
            let nc = buf.len() / m.max(1);
            for (r, src) in buf.chunks_exact(nc).enumerate() {
                c[r * n + c0..r * n + c0 + nc].copy_from_slice(src);
            }
        }
    }
    if let Some(bias) = bias {
        for row in c.chunks_exact_mut(n) {
            add_assign(row, bias);
        }
    }
    c
}

/// Up to this many rows, [`gemv`] beats sgemm, whose packing copy of `b` costs as much as the
/// product itself when `b` is used for so few rows (the decode step).
const GEMV_MAX_ROWS: usize = 4;

/// `c = a · b` for a few rows of `a`, streaming `b` once in its own layout (row-major: axpy per
/// row of `b`; column-major, i.e. the transposed `wte`: a dot product per column), split over
/// column chunks in parallel.
fn gemv(a: MatView<'_>, b: MatView<'_>, c: &mut [f32]) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(k, b.rows, "inner dimensions differ");
    assert_eq!(c.len(), m * n, "output buffer has the wrong size");
    assert!(a.in_bounds() && b.in_bounds(), "matrix view out of bounds");
    assert!(
        b.cs == 1 || b.rs == 1,
        "gemv needs a row- or column-major b"
    );
    if m == 0 || n == 0 {
        return;
    }
    // Contiguous copies of the few rows of `a`.
    let a_rows: Vec<f32> = (0..m)
        .flat_map(|r| (0..k).map(move |p| a.data[a.offset + r * a.rs + p * a.cs]))
        .collect();
    let cols_per = n
        .div_ceil(rayon::current_num_threads().max(1) * 8)
        .next_multiple_of(64);
    let parts: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(cols_per))
        .into_par_iter()
        .map(|i| {
            let c0 = i * cols_per;
            let nc = cols_per.min(n - c0);
            let mut buf = vec![0f32; m * nc];
            if b.cs == 1 {
                for p in 0..k {
                    let start = b.offset + p * b.rs + c0;
                    let brow = &b.data[start..start + nc];
                    for (out, arow) in buf.chunks_exact_mut(nc).zip(a_rows.chunks_exact(k)) {
                        let x = arow[p];
                        for (o, &w) in out.iter_mut().zip(brow) {
                            *o += x * w;
                        }
                    }
                }
            } else {
                for j in 0..nc {
                    let start = b.offset + (c0 + j) * b.cs;
                    let bcol = &b.data[start..start + k];
                    for (r, arow) in a_rows.chunks_exact(k).enumerate() {
                        buf[r * nc + j] = dot(arow, bcol);
                    }
                }
            }
            (c0, buf)
        })
        .collect();
    for (c0, buf) in parts {
        let nc = buf.len() / m;
        for (r, src) in buf.chunks_exact(nc).enumerate() {
            c[r * n + c0..r * n + c0 + nc].copy_from_slice(src);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_matches_naive_for_every_split() {
        // Shapes that take the single-threaded, row-split and column-split paths.
        for &(m, k, n) in &[
            (3, 5, 7),
            (1, 128, 5000),
            (3, 128, 5000),
            (64, 128, 300),
            (5, 64, 4097),
        ] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 - 6.0).collect();
            let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 - 5.0).collect();
            let want = naive(&a, &b, m, k, n);
            let got = matmul(
                MatView::row_major(&a, m, k),
                MatView::row_major(&b, k, n),
                None,
            );
            assert_eq!(got, want, "{m}x{k}x{n}");
        }
    }

    #[test]
    fn transposed_view_matches() {
        // Small integers keep every sum exact, so any summation order must agree bit for bit.
        for &(m, k, n) in &[(2, 3, 4), (1, 64, 3000), (3, 64, 3000), (40, 64, 3000)] {
            let a: Vec<f32> = (0..m * k).map(|i| ((i * 3) % 7) as f32 - 3.0).collect();
            let bt: Vec<f32> = (0..n * k).map(|i| ((i * 5) % 9) as f32 - 4.0).collect(); // [n, k]
            let mut b = vec![0f32; k * n];
            for j in 0..n {
                for p in 0..k {
                    b[p * n + j] = bt[j * k + p];
                }
            }
            let view = MatView {
                data: &bt,
                offset: 0,
                rows: k,
                cols: n,
                rs: 1,
                cs: k,
            };
            assert_eq!(
                matmul(MatView::row_major(&a, m, k), view, None),
                naive(&a, &b, m, k, n),
                "{m}x{k}x{n}"
            );
        }
    }

    #[test]
    fn gelu_new_known_values() {
        assert_eq!(gelu_new(0.0), 0.0);
        assert!((gelu_new(1.0) - 0.841_192).abs() < 1e-5);
        assert!((gelu_new(-3.0) - -0.003_637_4).abs() < 1e-5);
        assert!((gelu_erf(1.0) - 0.841_344_7).abs() < 1e-5);
    }

    #[test]
    fn argmax_takes_first_maximum() {
        assert_eq!(argmax(&[1.0, 3.0, 3.0, f32::NAN]), 1);
    }
}
