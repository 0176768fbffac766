//! The f32 reference and the tokenizer reproduce `shared/golden/tiny/golden.json`, which
//! `transformers` computed in float32.

mod common;

use serde::Deserialize;
use veil_tools::float_ref::{ActStats, FloatModel};
use veil_tools::hf::Checkpoint;
use veil_tools::tokenizer::Tokenizer;

#[derive(Deserialize)]
struct Golden {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    prompt: String,
    input_ids: Vec<u32>,
    last_logits: Vec<f32>,
    top10_ids: Vec<Vec<u32>>,
    top10_logits: Vec<Vec<f32>>,
    greedy_32: Vec<u32>,
    greedy_margins: Vec<f32>,
}

const LOGIT_TOL: f32 = 1e-3;
/// A greedy step whose top-1/top-2 margin is below this may legitimately flip under f32 rounding.
const MARGIN_EXCUSE: f32 = 2e-3;

fn golden() -> Golden {
    let path = common::golden_dir().join("golden.json");
    let text = std::fs::read_to_string(&path).expect("read golden.json");
    serde_json::from_str(&text).expect("parse golden.json")
}

fn model() -> FloatModel {
    let ckpt = Checkpoint::load(&common::golden_dir()).expect("load golden checkpoint");
    FloatModel::from_checkpoint(&ckpt)
}

#[test]
fn tokenizer_matches_golden_ids() {
    let g = golden();
    let tok = Tokenizer::from_dir(&common::golden_dir()).expect("load tokenizer");
    for case in &g.cases {
        let ids = tok.encode(&case.prompt).expect("encode");
        assert_eq!(ids, case.input_ids, "prompt {:?}", case.prompt);
        assert_eq!(tok.decode(&ids).expect("decode"), case.prompt);
    }
}

#[test]
fn float_reference_matches_golden_logits() {
    let g = golden();
    let m = model();
    let vocab = m.config().vocab_size;
    let mut worst_last = 0f32;
    let mut worst_top10 = 0f32;
    for case in &g.cases {
        let last = m.forward_last(&case.input_ids);
        assert_eq!(last.len(), case.last_logits.len());
        let err = max_abs_diff(&last, &case.last_logits);
        assert!(
            err < LOGIT_TOL,
            "prompt {:?}: last-position max abs error {err}",
            case.prompt
        );
        worst_last = worst_last.max(err);

        // Every position through the all-positions path (and its last row equals forward_last).
        let all = m.forward(&case.input_ids);
        assert_eq!(all.len(), case.input_ids.len() * vocab);
        let t = case.input_ids.len();
        assert!(max_abs_diff(&all[(t - 1) * vocab..], &last) < 1e-4);
        for (pos, (ids, logits)) in case.top10_ids.iter().zip(&case.top10_logits).enumerate() {
            let row = &all[pos * vocab..(pos + 1) * vocab];
            for (&id, &want) in ids.iter().zip(logits) {
                let err = (row[id as usize] - want).abs();
                assert!(
                    err < LOGIT_TOL,
                    "prompt {:?} position {pos} token {id}: error {err}",
                    case.prompt
                );
                worst_top10 = worst_top10.max(err);
            }
        }
    }
    println!(
        "max abs logit error vs transformers: last position {worst_last:.3e}, top-10 of every \
         position {worst_top10:.3e}"
    );
}

#[test]
fn float_reference_matches_golden_greedy() {
    let g = golden();
    let m = model();
    for case in &g.cases {
        let got = m.greedy(&case.input_ids, case.greedy_32.len());
        assert_eq!(got.len(), case.greedy_32.len());
        let mut excused = false;
        for (step, (&ours, &theirs)) in got.iter().zip(&case.greedy_32).enumerate() {
            excused |= case.greedy_margins[step] < MARGIN_EXCUSE;
            if ours != theirs {
                assert!(
                    excused,
                    "prompt {:?}: greedy step {step} gives {ours}, transformers {theirs} \
                     (margin {}); ours {got:?}, theirs {:?}",
                    case.prompt, case.greedy_margins[step], case.greedy_32
                );
                println!(
                    "prompt {:?}: excused divergence at step {step}",
                    case.prompt
                );
                break; // after a divergence the continuations are unrelated
            }
        }
    }
}

#[test]
fn activation_stats_cover_every_linear_input() {
    let g = golden();
    let m = model();
    let mut stats = ActStats::new(m.config());
    let mut rows = 0;
    for case in &g.cases {
        let with = m.forward_with_stats(&case.input_ids, &mut stats);
        assert_eq!(
            with,
            m.forward(&case.input_ids),
            "stats must not change the logits"
        );
        rows += case.input_ids.len();
    }
    assert_eq!(stats.rows, rows);
    let c = m.config();
    assert_eq!(stats.blocks.len(), c.n_layer);
    for b in &stats.blocks {
        for (v, len) in [
            (&b.c_attn, c.n_embd),
            (&b.attn_proj, c.n_embd),
            (&b.c_fc, c.n_embd),
            (&b.mlp_proj, c.n_inner),
        ] {
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|x| x.is_finite() && *x >= 0.0));
            assert!(v.iter().any(|x| *x > 0.0));
        }
    }
    assert_eq!(stats.lm_head.len(), c.n_embd);
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}
