//! Perplexity and top-1 agreement of the integer pipeline against the float reference.
//!
//! Protocol: the first `tokens` tokens of a text, cut into non-overlapping windows of
//! `n_positions` input tokens; every input token is scored on the token that follows it (so
//! `tokens - 1` predictions), the model starting fresh in each window.

use rayon::prelude::*;
use veil_core::model::{
    ClientWeights, Forward, KvCache, KvSizes, LinearWeights, LogitRows, Workspace, WorkspaceSizes,
};

/// A float reference the integer pipeline is measured against: GPT-2's
/// [`crate::float_ref::FloatModel`] or the LLaMA family's [`crate::llama::LlamaFloat`].
pub trait FloatLogits: Sync {
    /// Logits of every position of `tokens` (a fresh sequence), `tokens.len() · vocab`.
    fn forward(&self, tokens: &[u32]) -> Vec<f32>;
}

/// Rows per integer forward step (bounds the logits buffer: rows × vocab).
const INT_CHUNK_ROWS: usize = 64;

/// The result of [`evaluate`].
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalReport {
    /// Tokens read (predictions = tokens - 1).
    pub tokens: usize,
    /// Predictions scored.
    pub predictions: usize,
    /// Perplexity of the float reference.
    pub float_ppl: f64,
    /// Perplexity of the integer pipeline.
    pub int_ppl: f64,
    /// Fraction of predictions whose arg-max agrees between the two (0..1).
    pub top1_agreement: f64,
    /// `int_ppl / float_ppl - 1`.
    pub relative_ppl_change: f64,
    /// Mean negative log-likelihood of the float reference (nats; finite where perplexity
    /// overflows, as on synthetic models with extreme logits).
    pub float_nll: f64,
    /// Mean negative log-likelihood of the integer pipeline (nats).
    pub int_nll: f64,
}

/// Negative log-likelihood of `target` under `logits` (computed in f64).
pub fn nll(logits: impl Iterator<Item = f64> + Clone, target: usize) -> f64 {
    let max = logits.clone().fold(f64::MIN, f64::max);
    let lse = logits.clone().map(|v| (v - max).exp()).sum::<f64>().ln() + max;
    let t = logits.clone().nth(target).unwrap_or(f64::NAN);
    lse - t
}

fn argmax(it: impl Iterator<Item = f64>) -> usize {
    let mut best = (0, f64::MIN);
    for (i, v) in it.enumerate() {
        if v > best.1 {
            best = (i, v);
        }
    }
    best.0
}

/// Integer logits of every position of `window`, as f64 real values (`vocab` per position).
pub fn int_logits(
    client: &ClientWeights<'_>,
    linear: &LinearWeights<'_>,
    window: &[u32],
) -> Result<Vec<f64>, veil_core::model::ForwardError> {
    let cfg = *client.config();
    let vocab = cfg.vocab_size as usize;
    let cap = window.len();
    let sizes = WorkspaceSizes::new(&cfg, INT_CHUNK_ROWS, LogitRows::All, cap);
    let kvs = KvSizes::new(&cfg, cap);
    let (mut a, mut b) = (vec![0i32; sizes.i32_len], vec![0i8; sizes.i8_len]);
    let (mut k, mut v, mut ks, mut vs) = (
        vec![0i16; kvs.values],
        vec![0i16; kvs.values],
        vec![0u8; kvs.shifts],
        vec![0u8; kvs.shifts],
    );
    let ws = Workspace::new(&cfg, sizes, &mut a, &mut b)?;
    let kv = KvCache::new(&cfg, cap, &mut k, &mut v, &mut ks, &mut vs)?;
    let mut fwd = Forward::new(client.clone(), ws, kv)?;
    let mut out = Vec::with_capacity(window.len() * vocab);
    for chunk in window.chunks(INT_CHUNK_ROWS) {
        fwd.step_locally(linear, chunk)?;
        let logits = fwd.logits().unwrap_or(&[]);
        out.extend(logits.iter().map(|&x| veil_core::fixed::to_f64(x)));
    }
    Ok(out)
}

/// Runs both pipelines over `tokens` in windows of `n_positions` inputs. `progress` gets
/// (windows done, windows).
pub fn evaluate(
    float: &dyn FloatLogits,
    client: &ClientWeights<'_>,
    linear: &LinearWeights<'_>,
    tokens: &[u32],
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<EvalReport, veil_core::model::ForwardError> {
    let n = client.config().n_positions as usize;
    evaluate_windows(float, client, linear, tokens, n, progress)
}

/// [`evaluate`] with windows of `window` inputs (at most `n_positions`; the LLaMA golden
/// protocol uses `n_positions - 1`, so that inputs and their last target fit the context).
pub fn evaluate_windows(
    float: &dyn FloatLogits,
    client: &ClientWeights<'_>,
    linear: &LinearWeights<'_>,
    tokens: &[u32],
    window: usize,
    progress: &(dyn Fn(usize, usize) + Sync),
) -> Result<EvalReport, veil_core::model::ForwardError> {
    let cfg = *client.config();
    let n = window.clamp(1, cfg.n_positions as usize);
    let vocab = cfg.vocab_size as usize;
    let inputs = tokens.len().saturating_sub(1);
    let windows: Vec<(usize, usize)> = (0..inputs)
        .step_by(n)
        .map(|s| (s, (s + n).min(inputs)))
        .collect();
    let done = std::sync::atomic::AtomicUsize::new(0);
    // Per window: (float nll sum, int nll sum, agreements).
    let parts: Result<Vec<(f64, f64, usize)>, _> = windows
        .par_iter()
        .map(|&(s, e)| {
            let window = &tokens[s..e];
            let fl = float.forward(window);
            let il = int_logits(client, linear, window)?;
            let mut acc = (0.0, 0.0, 0usize);
            for p in 0..window.len() {
                let target = tokens[s + p + 1] as usize;
                let f = &fl[p * vocab..(p + 1) * vocab];
                let i = &il[p * vocab..(p + 1) * vocab];
                acc.0 += nll(f.iter().map(|&v| v as f64), target);
                acc.1 += nll(i.iter().copied(), target);
                acc.2 +=
                    (argmax(f.iter().map(|&v| v as f64)) == argmax(i.iter().copied())) as usize;
            }
            progress(
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
                windows.len(),
            );
            Ok(acc)
        })
        .collect();
    let parts = parts?;
    let (fs, is, agree) = parts
        .iter()
        .fold((0.0, 0.0, 0), |a, p| (a.0 + p.0, a.1 + p.1, a.2 + p.2));
    let preds = inputs.max(1) as f64;
    let float_ppl = (fs / preds).exp();
    let int_ppl = (is / preds).exp();
    Ok(EvalReport {
        tokens: tokens.len(),
        predictions: inputs,
        float_ppl,
        int_ppl,
        top1_agreement: agree as f64 / preds,
        relative_ppl_change: int_ppl / float_ppl - 1.0,
        float_nll: fs / preds,
        int_nll: is / preds,
    })
}
