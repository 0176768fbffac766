//! Speculative decoding: a cheap drafter guesses the next tokens, and the private model checks
//! them all in one multi-row step (the same round trips as one token), keeping the longest prefix
//! it agrees with plus its own next token.
//!
//! The private model's choice at every position is made exactly as plain decoding makes it (the
//! same logits, bit for bit, and the same random number for the same generated position), and a
//! drafted token is kept only when it equals that choice; so greedy and seeded sampling both give
//! token-for-token what plain decoding gives. For a drafter whose proposal is a single token this
//! is the speculative sampling rule (accept with probability `min(1, p/q)` with `q` a point mass,
//! i.e. `p(draft)`, else sample from the rest), realised with the plain path's own random numbers.
//!
//! Every verification step sends the same number of rows (drafts are padded), so the server
//! learns the number of steps and the current draft length, not which guesses were right; the
//! draft length adapts (see [`DraftLength`]) and so follows the measured acceptance.

/// Proposes continuations of a context.
pub trait Drafter {
    /// Appends up to `max` guessed next tokens of `context` to `out` (possibly none).
    fn draft(&mut self, context: &[u32], max: usize, out: &mut Vec<u32>);
}

/// Prompt lookup: the tokens that followed the latest earlier occurrence of the context's last
/// n-gram (the longest of `max_ngram` down to 1 that occurs). Costs no weights and little time;
/// good on text that repeats its context (summaries, code, quoted passages, and the repetitive
/// continuations of small models).
#[derive(Debug, Clone, Copy)]
pub struct PromptLookup {
    /// Longest n-gram matched.
    pub max_ngram: usize,
}

impl Default for PromptLookup {
    fn default() -> Self {
        PromptLookup { max_ngram: 3 }
    }
}

impl Drafter for PromptLookup {
    fn draft(&mut self, context: &[u32], max: usize, out: &mut Vec<u32>) {
        let len = context.len();
        if max == 0 {
            return;
        }
        for n in (1..=self.max_ngram.min(len.saturating_sub(1))).rev() {
            let pattern = &context[len - n..];
            // Latest occurrence that has at least one token after it (not the suffix itself).
            if let Some(j) = (0..len - n).rev().find(|&j| &context[j..j + n] == pattern) {
                let from = j + n;
                out.extend_from_slice(&context[from..(from + max).min(len)]);
                return;
            }
        }
    }
}

/// Which drafter, from the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrafterKind {
    /// [`PromptLookup`].
    PromptLookup,
}

/// Speculative decoding settings of a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Speculation {
    /// The drafter.
    pub drafter: DrafterKind,
    /// Most drafted tokens per verification step (the step then has this many rows plus one).
    pub max_draft: usize,
    /// Adapt the draft length to the measured acceptance and step times (else always
    /// `max_draft`).
    pub adaptive: bool,
}

impl Speculation {
    /// The drafter these settings name.
    pub fn drafter(&self) -> Box<dyn Drafter> {
        match self.drafter {
            DrafterKind::PromptLookup => Box::new(PromptLookup::default()),
        }
    }
}

/// Chooses the draft length per step from what the generation measured so far: the acceptance
/// rate `α` of drafted tokens and the step time as a linear function `a + b · rows` of the step's
/// rows (a least-squares fit with exponential forgetting). With `k` drafts a step yields
/// `1 + α + … + α^k` tokens on average, so the length picked maximises that over `a + b (k+1)`:
/// long drafts where round trips dominate and guesses land, none where rows cost as much as steps
/// or guesses fail, and none unless that promises at least [`MIN_GAIN`]. The first
/// [`WARM_UP`] steps alternate plain and longest drafts, so both ends of the fit are measured (the
/// very first, on cold caches, is left out); every 16th step is plain again, to keep `a` current.
#[derive(Debug, Clone)]
pub struct DraftLength {
    max: usize,
    adaptive: bool,
    steps: u64,
    /// Exponentially forgotten sums for the fit: weight, rows, time, rows², rows·time.
    s: [f64; 5],
    /// Exponentially forgotten counts of kept and examined drafted tokens.
    kept: f64,
    examined: f64,
}

/// Steps that alternate plain and longest drafts before the fit chooses.
const WARM_UP: u64 = 6;

/// The predicted speed-up below which a step is plain.
const MIN_GAIN: f64 = 1.15;

/// Forgetting factor per step of the fits (an effective memory of about 20 steps).
const FORGET: f64 = 0.95;

impl DraftLength {
    /// At most `max` drafts per step; fixed at `max` unless `adaptive`.
    pub fn new(max: usize, adaptive: bool) -> Self {
        DraftLength {
            max,
            adaptive,
            steps: 0,
            s: [0.0; 5],
            kept: 0.0,
            examined: 0.0,
        }
    }

    /// The measured acceptance rate of drafted tokens (0 before any).
    pub fn acceptance(&self) -> f64 {
        if self.examined > 0.0 {
            self.kept / self.examined
        } else {
            0.0
        }
    }

    /// Drafts for the next step.
    pub fn next(&self) -> usize {
        if !self.adaptive || self.max == 0 {
            return self.max;
        }
        match self.steps {
            // Plain and longest in turn at first, so both ends of the fit are measured.
            n if n < WARM_UP => return if n % 2 == 0 { 0 } else { self.max },
            n if n % 16 == 0 => return 0,
            _ => {}
        }
        let [w, sr, st, srr, srt] = self.s;
        let var = w * srr - sr * sr;
        if var <= 1e-9 * w * w {
            return self.max;
        }
        let b = ((w * srt - sr * st) / var).max(0.0);
        let a = ((st - b * sr) / w).max(1e-6);
        let alpha = self.acceptance().clamp(0.0, 0.99);
        let mut best = (0, 0.0);
        let mut expected = 0.0;
        let mut term = 1.0;
        for k in 0..=self.max {
            expected += term;
            term *= alpha;
            let rate = expected / (a + b * (k + 1) as f64);
            if rate > best.1 {
                best = (k, rate);
            }
        }
        // Drafting only when the fit promises a clear gain: where it promises little (rows as
        // dear as round trips, on loopback) the fit's noise could make speculation slower.
        let plain = 1.0 / (a + b);
        if best.1 < plain * MIN_GAIN {
            return 0;
        }
        best.0
    }

    /// Records a step of `rows` rows that took `secs`, with `drafted` drafts of which the first
    /// `kept` were kept.
    pub fn record(&mut self, rows: usize, secs: f64, drafted: usize, kept: usize) {
        self.steps += 1;
        let r = rows as f64;
        // The first step runs on cold caches (and a first LM head placement): not in the fit.
        if self.steps > 1 {
            for (s, v) in self.s.iter_mut().zip([1.0, r, secs, r * r, r * secs]) {
                *s = *s * FORGET + v;
            }
        }
        // Drafts after the first rejected one were never examined.
        let examined = (kept + 1).min(drafted);
        self.kept = self.kept * FORGET + kept as f64;
        self.examined = self.examined * FORGET + examined as f64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_lookup_continues_the_latest_longest_match() {
        let mut d = PromptLookup::default();
        let mut out = vec![];
        // "... 1 2 3 [9 8 7] ... 1 2 3 [5 6] ... 1 2 3" -> the latest match: 5 6 then 4 1 2.
        d.draft(&[1, 2, 3, 9, 8, 7, 1, 2, 3, 5, 6, 4, 1, 2, 3], 4, &mut out);
        assert_eq!(out, [5, 6, 4, 1]);
        out.clear();
        // No earlier occurrence of any suffix n-gram: no draft.
        d.draft(&[1, 2, 3, 4], 4, &mut out);
        assert!(out.is_empty());
        // A 1-gram match, bounded by the context's end.
        d.draft(&[7, 8, 9, 7], 4, &mut out);
        assert_eq!(out, [8, 9, 7]);
        out.clear();
        d.draft(&[5], 4, &mut out);
        assert!(out.is_empty());
        d.draft(&[5, 5], 0, &mut out);
        assert!(out.is_empty());
    }

    /// Round trips dominate and guesses land: long drafts; rows cost as much as a step or guesses
    /// fail: none.
    #[test]
    fn draft_length_follows_acceptance_and_costs() {
        let run = |a: f64, b: f64, accept: f64| {
            let mut l = DraftLength::new(6, true);
            let mut x = 0x2545F4914F6CDD1Du64;
            let mut coin = || {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 11) as f64 / (1u64 << 53) as f64) < accept
            };
            for _ in 0..200 {
                let k = l.next();
                let rows = k + 1;
                let kept = (0..k).take_while(|_| coin()).count();
                l.record(rows, a + b * rows as f64, k, kept);
            }
            l.next()
        };
        assert_eq!(run(0.030, 0.001, 0.9), 6, "WAN, good guesses");
        assert_eq!(
            run(0.010, 0.010, 0.3),
            0,
            "rows as dear as steps, poor guesses"
        );
        assert_eq!(DraftLength::new(4, false).next(), 4);
    }
}
