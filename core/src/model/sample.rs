//! Choosing the next token from integer logits: greedy, or temperature / top-k / top-p sampling
//! driven by one uniform `u32` that the host draws from its seeded RNG.
//!
//! Everything is integer arithmetic, so a seed gives the same tokens on every machine and on both
//! the secure and the plaintext path.

use crate::fixed::{saturate_i32, FRAC_BITS};
use crate::nonlinear::exp_neg_q31;

/// Sampling settings. `temperature_q16 == 0` means greedy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SamplingParams {
    /// Temperature in Q16.16 (`65536` = 1.0); 0 selects greedy decoding.
    pub temperature_q16: u32,
    /// Keep only the `top_k` most likely tokens (0 = all).
    pub top_k: u32,
    /// Keep the smallest set of tokens whose probability reaches `top_p` (Q16.16; 0 or ≥ 1.0 = all).
    pub top_p_q16: u32,
}

impl SamplingParams {
    /// Greedy decoding.
    pub const GREEDY: SamplingParams = SamplingParams {
        temperature_q16: 0,
        top_k: 0,
        top_p_q16: 0,
    };

    /// Whether this picks the arg-max.
    pub fn is_greedy(&self) -> bool {
        self.temperature_q16 == 0
    }
}

/// Why no token could be picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SampleError {
    /// There are no logits (no finished step to pick from).
    NoLogits,
    /// Sampling needs one scratch entry per logit.
    ScratchTooShort {
        /// Entries needed (the vocabulary size).
        needed: usize,
        /// Entries given.
        got: usize,
    },
}

impl core::fmt::Display for SampleError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SampleError::NoLogits => f.write_str("no logits to sample from"),
            SampleError::ScratchTooShort { needed, got } => write!(
                f,
                "sampling scratch holds {got} entries, the vocabulary needs {needed}"
            ),
        }
    }
}

impl core::error::Error for SampleError {}

/// Index of the largest logit (the lowest index among ties). `logits` must not be empty.
pub fn argmax(logits: &[i32]) -> u32 {
    let mut best = 0usize;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Picks a token. Unless greedy, `scratch` must hold at least `logits.len()` entries (candidate
/// ids); `uniform` is a fresh uniform `u32` (ignored when greedy).
pub fn sample(
    logits: &[i32],
    params: &SamplingParams,
    uniform: u32,
    scratch: &mut [u32],
) -> Result<u32, SampleError> {
    if logits.is_empty() {
        return Err(SampleError::NoLogits);
    }
    if params.is_greedy() {
        return Ok(argmax(logits));
    }
    if scratch.len() < logits.len() {
        return Err(SampleError::ScratchTooShort {
            needed: logits.len(),
            got: scratch.len(),
        });
    }
    let n = logits.len();
    let ids = &mut scratch[..n];
    for (i, id) in ids.iter_mut().enumerate() {
        *id = i as u32;
    }
    // Descending by logit, ties by lower id, so the order is total and deterministic.
    let by_logit = |a: &u32, b: &u32| logits[*b as usize].cmp(&logits[*a as usize]).then(a.cmp(b));
    let mut keep = n;
    if params.top_k > 0 && (params.top_k as usize) < n {
        keep = params.top_k as usize;
        ids.select_nth_unstable_by(keep - 1, by_logit);
    }
    let ids = &mut ids[..keep];
    ids.sort_unstable_by(by_logit);
    let max = logits[ids[0] as usize] as i64;
    let t = params.temperature_q16 as i64;
    // Weight of a candidate: exp((logit − max) / T) in Q31.
    let weight = |id: u32| {
        let z = ((logits[id as usize] as i64 - max) << FRAC_BITS) / t;
        exp_neg_q31(saturate_i32(z)) as u64
    };
    let total: u64 = ids.iter().map(|&id| weight(id)).sum();
    let mut kept_total = total;
    if params.top_p_q16 > 0 && params.top_p_q16 < 1 << FRAC_BITS {
        let threshold = ((total as u128 * params.top_p_q16 as u128) >> FRAC_BITS) as u64;
        let mut cum = 0u64;
        for (k, &id) in ids.iter().enumerate() {
            cum += weight(id);
            if cum >= threshold {
                keep = k + 1;
                kept_total = cum;
                break;
            }
        }
    }
    let target = (uniform as u64 * kept_total) >> 32;
    let mut cum = 0u64;
    for &id in &ids[..keep.min(ids.len())] {
        cum += weight(id);
        if cum > target {
            return Ok(id);
        }
    }
    Ok(ids[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_greedy_is_argmax_lowest_tie() {
        assert_eq!(
            sample(&[1, 5, 5, 2], &SamplingParams::GREEDY, 0, &mut []),
            Ok(1)
        );
    }

    #[test]
    fn test_missing_logits_and_short_scratch_are_errors() {
        let p = SamplingParams {
            temperature_q16: 65536,
            top_k: 0,
            top_p_q16: 0,
        };
        assert_eq!(sample(&[], &p, 0, &mut [0; 4]), Err(SampleError::NoLogits));
        assert_eq!(
            sample(&[], &SamplingParams::GREEDY, 0, &mut []),
            Err(SampleError::NoLogits)
        );
        assert_eq!(
            sample(&[1, 2, 3], &p, 0, &mut [0; 2]),
            Err(SampleError::ScratchTooShort { needed: 3, got: 2 })
        );
    }

    #[test]
    fn test_top_k_one_is_greedy() {
        let p = SamplingParams {
            temperature_q16: 65536,
            top_k: 1,
            top_p_q16: 0,
        };
        for u in [0u32, 1 << 31, u32::MAX] {
            assert_eq!(sample(&[3, 9 << 16, 1, 7], &p, u, &mut [0; 4]), Ok(1));
        }
    }

    #[test]
    fn test_sampling_follows_probabilities() {
        // Two tokens with logits differing by ln 3: probabilities 3/4 and 1/4.
        let logits = [crate::fixed::from_f64(libm::log(3.0)), 0];
        let p = SamplingParams {
            temperature_q16: 65536,
            top_k: 0,
            top_p_q16: 0,
        };
        let mut count0 = 0;
        let steps = 4096u64;
        for i in 0..steps {
            let u = ((i << 32) / steps) as u32;
            if sample(&logits, &p, u, &mut [0; 2]) == Ok(0) {
                count0 += 1;
            }
        }
        assert!(
            (count0 as f64 / steps as f64 - 0.75).abs() < 0.01,
            "{count0}"
        );
    }

    #[test]
    fn test_top_p_cuts_the_tail() {
        // p ≈ [0.6, 0.3, 0.1]: top_p 0.5 keeps only the first.
        let l = |p: f64| crate::fixed::from_f64(libm::log(p));
        let logits = [l(0.6), l(0.3), l(0.1)];
        let p = SamplingParams {
            temperature_q16: 65536,
            top_k: 0,
            top_p_q16: 32768,
        };
        for u in [0u32, 1 << 30, u32::MAX] {
            assert_eq!(sample(&logits, &p, u, &mut [0; 3]), Ok(0));
        }
    }
}
