//! The integer pipeline against the float reference on the golden model (issue acceptance):
//! top-1 equal to float on every golden prompt, WikiText-2 test perplexity within 1% of float.

mod common;

use veil_core::model::{ClientWeights, LinearWeights};
use veil_tools::eval::{evaluate, int_logits};
use veil_tools::float_ref::{ActStats, FloatModel};
use veil_tools::hf::Checkpoint;
use veil_tools::quantize::{quantize, QuantizeOptions};
use veil_tools::tokenizer::Tokenizer;

fn wikitext(name: &str) -> String {
    let p = common::golden_dir()
        .join("../../data/wikitext-2")
        .join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .replace("\r\n", "\n")
}

fn calibrate(float: &FloatModel, ckpt: &Checkpoint, tok: &Tokenizer) -> ActStats {
    let text = wikitext("valid.txt");
    let ids = tok.encode(&text[..200_000]).unwrap();
    let mut stats = ActStats::new(&ckpt.config);
    let n = ckpt.config.n_positions;
    for w in ids.chunks(n).take(16) {
        float.forward_with_stats(w, &mut stats);
    }
    stats
}

#[test]
fn int_pipeline_matches_float_on_golden() {
    let dir = common::golden_dir();
    let ckpt = Checkpoint::load(&dir).unwrap();
    let float = FloatModel::from_checkpoint(&ckpt);
    let tok = Tokenizer::from_dir(&dir).unwrap();
    let golden: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("golden.json")).unwrap()).unwrap();
    let text = wikitext("test.txt");
    let ids = tok.encode(&text).unwrap();
    let ids = &ids[..16384];

    // The default quantization gets the full protocol; SmoothQuant the prompts and a shorter text.
    for (smooth, n_tokens) in [(false, 16384), (true, 4096)] {
        let stats = smooth.then(|| calibrate(&float, &ckpt, &tok));
        let q = quantize(
            &ckpt,
            stats.as_ref(),
            &QuantizeOptions::default(),
            &mut |_, _| {},
        )
        .unwrap();
        let client = ClientWeights::parse(&q.client).unwrap();
        let linear = LinearWeights::parse(&q.linear).unwrap();
        let vocab = ckpt.config.vocab_size;
        for case in golden["cases"].as_array().unwrap() {
            let input: Vec<u32> = case["input_ids"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let il = int_logits(&client, &linear, &input).unwrap();
            let last = &il[(input.len() - 1) * vocab..];
            let fl = float.forward_last(&input);
            let am = |v: &mut dyn Iterator<Item = f64>| {
                v.enumerate()
                    .fold((0, f64::MIN), |b, (i, x)| if x > b.1 { (i, x) } else { b })
                    .0
            };
            let (i_top, f_top) = (
                am(&mut last.iter().copied()),
                am(&mut fl.iter().map(|&x| x as f64)),
            );
            println!(
                "smooth={smooth} prompt {:?}: int top1 {i_top} float top1 {f_top}",
                case["prompt"].as_str().unwrap_or("")
            );
            assert_eq!(i_top, f_top, "top-1 differs on {:?}", case["prompt"]);
        }
        let r = evaluate(&float, &client, &linear, &ids[..n_tokens], &|_, _| {}).unwrap();
        println!("smooth={smooth}: {r:?}");
        if n_tokens == 16384 {
            assert!(
                (r.float_ppl - 292.13).abs() < 0.5,
                "float perplexity {} is not the golden protocol's 292.13",
                r.float_ppl
            );
        }
        assert!(
            r.relative_ppl_change.abs() < 0.01,
            "integer perplexity {} vs float {}",
            r.int_ppl,
            r.float_ppl
        );
    }
}

/// Residual outliers (a few channels 50-100x the rest, as in real GPT-2) break plain per-row int8:
/// LayerNorm outputs carry them and the small channels round to zero. SmoothQuant calibrated on
/// WikiText-2 valid must win most of the lost agreement back.
#[test]
fn smoothquant_repairs_outlier_activations() {
    let dir = tempfile::tempdir().unwrap();
    let opts = veil_tools::synth::SynthOptions {
        preset: veil_tools::synth::Preset::Tiny,
        seed: 3,
        outliers: true,
        tokenizer_from: Some(common::golden_dir()),
        progress: false,
    };
    veil_tools::synth::write_checkpoint(dir.path(), &opts).unwrap();
    let ckpt = Checkpoint::load(dir.path()).unwrap();
    let float = FloatModel::from_checkpoint(&ckpt);
    let tok = Tokenizer::from_dir(&common::golden_dir()).unwrap();
    let ids = tok.encode(&wikitext("test.txt")).unwrap();
    let ids = &ids[..2048];
    let agreement = |stats: Option<&ActStats>| {
        let q = quantize(&ckpt, stats, &QuantizeOptions::default(), &mut |_, _| {}).unwrap();
        let client = ClientWeights::parse(&q.client).unwrap();
        let linear = LinearWeights::parse(&q.linear).unwrap();
        evaluate(&float, &client, &linear, ids, &|_, _| {}).unwrap()
    };
    let plain = agreement(None);
    let smooth = agreement(Some(&calibrate(&float, &ckpt, &tok)));
    println!("outliers, plain int8: {plain:?}\noutliers, SmoothQuant: {smooth:?}");
    // Measured: plain 0.915, SmoothQuant 0.959 (random models have near-tied logits, so agreement
    // is lower than on a trained model even without outliers).
    assert!(
        smooth.top1_agreement > plain.top1_agreement + 0.03,
        "SmoothQuant did not help: {} vs {}",
        smooth.top1_agreement,
        plain.top1_agreement
    );
    assert!(
        smooth.top1_agreement > 0.95,
        "agreement with SmoothQuant only {}",
        smooth.top1_agreement
    );
}
