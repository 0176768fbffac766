//! SmoothQuant for the LLaMA family: the folds leave the float model's function unchanged (golden
//! tiny-llama, GQA 4/2; a Qwen2-shaped synth with q/k/v biases; with calibrated statistics and
//! with random ones), and a model calibrated on
//! WikiText-2 valid still meets issue 12's integer acceptance (top-1 equal to float on every
//! golden case, test perplexity within 1 % of float), through `veil-tools quantize --calibrate`.

mod common;

use std::path::Path;
use std::process::Command;

use veil_core::model::{ClientWeights, LinearWeights};
use veil_tools::eval::{evaluate_windows, int_logits};
use veil_tools::float_ref::ActStats;
use veil_tools::llama::{LlamaCheckpoint, LlamaFloat};
use veil_tools::synth::{write_llama_checkpoint, LlamaPreset, LlamaSynthOptions};
use veil_tools::tokenizer::Tokenizer;

fn wikitext(split: &str) -> String {
    let p = common::golden_llama_dir().join(format!("../../data/wikitext-2/{split}.txt"));
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .replace("\r\n", "\n")
}

/// Statistics of `float` over `ids`, in windows of the model's context after BOS.
fn calibrate(float: &LlamaFloat, ids: &[u32]) -> ActStats {
    let c = float.config();
    let mut stats = ActStats::with_shape(c.n_layer, c.d, c.inner);
    for chunk in ids.chunks(c.max_positions - 1) {
        let w: Vec<u32> = c
            .bos_token_id
            .into_iter()
            .chain(chunk.iter().copied())
            .collect();
        float.forward_with_stats(&w, &mut stats);
    }
    stats
}

fn max_rel_change(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs() / x.abs().max(1e-6))
        .fold(0.0, f32::max)
}

/// Statistics calibrated on the first 1024 tokens of WikiText-2 valid.
fn calibrated_stats(ckpt: LlamaCheckpoint) -> (LlamaCheckpoint, ActStats) {
    let tok = Tokenizer::from_dir(&common::golden_llama_dir()).unwrap();
    let ids = tok.encode(&wikitext("valid")).unwrap();
    let float = LlamaFloat::new(ckpt);
    let stats = calibrate(&float, &ids[..1024]);
    (float.into_checkpoint(), stats)
}

/// Statistics no text would give: every channel's max |activation| drawn log-uniformly from
/// `[1e-2, 1e2]` (a fixed splitmix64 stream), so the factors scatter over orders of magnitude
/// and differ between the query heads of a GQA group.
fn random_stats(ckpt: &LlamaCheckpoint, seed: u64) -> ActStats {
    let mut state = seed;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let u = (z >> 11) as f64 / (1u64 << 53) as f64;
        10f64.powf(4.0 * u - 2.0) as f32
    };
    let mut stats = ckpt.act_stats();
    for b in &mut stats.blocks {
        for v in [
            &mut b.c_attn,
            &mut b.attn_proj,
            &mut b.c_fc,
            &mut b.mlp_proj,
        ] {
            v.iter_mut().for_each(|x| *x = next());
        }
    }
    stats.lm_head.iter_mut().for_each(|x| *x = next());
    stats
}

/// The model smoothed with `stats` computes the same logits as the original (up to f32
/// rounding), while its weights did change (so the check is not vacuous).
fn assert_smoothing_preserves_the_function(ckpt: LlamaCheckpoint, stats: &ActStats, what: &str) {
    let tok = Tokenizer::from_dir(&common::golden_llama_dir()).unwrap();
    let smooth = ckpt.smoothed(stats, 0.5).unwrap();
    // Every place a factor folds into moved, by more than rounding.
    let (b, s) = (&ckpt.blocks[0], &smooth.blocks[0]);
    for (name, x, y) in [
        ("input norm", &b.input_norm, &s.input_norm),
        ("post-attention norm", &b.post_norm, &s.post_norm),
        ("v_proj", &b.v, &s.v),
        ("o_proj", &b.o, &s.o),
        ("up_proj", &b.up, &s.up),
        ("down_proj", &b.down, &s.down),
        ("final norm", &ckpt.norm, &smooth.norm),
        ("LM head", &ckpt.lm_head, &smooth.lm_head),
    ] {
        assert!(max_rel_change(x, y) > 0.05, "{what}: {name} did not change");
    }
    assert_eq!(
        smooth.embed, ckpt.embed,
        "{what}: the embedding must not change"
    );
    let (a, z) = (LlamaFloat::new(ckpt), LlamaFloat::new(smooth));
    let test = tok.encode(&wikitext("test")).unwrap();
    let window = &test[..a.config().max_positions];
    let (la, lz) = (a.forward(window), z.forward(window));
    let scale = la.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = la
        .iter()
        .zip(&lz)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    println!("{what}: max |logit change| {err:.2e} (largest logit {scale:.2})");
    assert!(
        err <= 1e-4 * scale.max(1.0),
        "{what}: smoothing changed the float model's logits by {err} (largest {scale})"
    );
}

#[test]
fn smoothing_the_golden_model_keeps_its_function() {
    let ckpt = LlamaCheckpoint::load(&common::golden_llama_dir()).unwrap();
    // GQA 4/2: o_proj's factors are shared by the two query heads of each KV head.
    assert_eq!((ckpt.config.n_head, ckpt.config.n_kv_head), (4, 2));
    let random = random_stats(&ckpt, 12);
    let (ckpt, calibrated) = calibrated_stats(ckpt);
    assert_smoothing_preserves_the_function(ckpt.clone(), &calibrated, "tiny-llama");
    assert_smoothing_preserves_the_function(ckpt, &random, "tiny-llama, random statistics");
}

#[test]
fn smoothing_a_qwen2_shape_keeps_its_function_and_folds_into_the_v_bias() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = LlamaSynthOptions {
        preset: LlamaPreset::TinyQwen2,
        seed: 3,
        tokenizer_from: Some(common::golden_llama_dir()),
        progress: false,
    };
    write_llama_checkpoint(tmp.path(), &opts).unwrap();
    let ckpt = LlamaCheckpoint::load(tmp.path()).unwrap();
    assert!(ckpt.config.qkv_bias);
    let random = random_stats(&ckpt, 13);
    let (ckpt, calibrated) = calibrated_stats(ckpt);
    assert_smoothing_preserves_the_function(ckpt.clone(), &calibrated, "tiny-qwen2");
    assert_smoothing_preserves_the_function(ckpt, &random, "tiny-qwen2, random statistics");
}

#[test]
fn statistics_of_another_shape_are_refused() {
    let ckpt = LlamaCheckpoint::load(&common::golden_llama_dir()).unwrap();
    let c = &ckpt.config;
    let wrong = ActStats::with_shape(c.n_layer, c.d, c.inner + 1);
    assert!(matches!(
        ckpt.smoothed(&wrong, 0.5),
        Err(veil_tools::quantize::QuantizeError::StatsMismatch)
    ));
}

fn quantize(out: &Path, calibrate: bool) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_veil-tools"));
    cmd.arg("quantize")
        .arg("--model")
        .arg(common::golden_llama_dir())
        .arg("--out")
        .arg(out);
    if calibrate {
        cmd.arg("--calibrate")
            .arg(common::golden_llama_dir().join("../../data/wikitext-2/valid.txt"))
            .args(["--calibration-tokens", "2048"]);
    }
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "veil-tools quantize: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn a_calibrated_golden_model_meets_the_integer_acceptance() {
    let tmp = tempfile::tempdir().unwrap();
    let (plain, smooth) = (tmp.path().join("plain"), tmp.path().join("smooth"));
    quantize(&plain, false);
    quantize(&smooth, true);
    let read = |d: &Path, f: &str| std::fs::read(d.join(f)).unwrap();
    // Calibration changes the files and says so in the manifest.
    assert_ne!(read(&plain, "linear.veil"), read(&smooth, "linear.veil"));
    let manifest: serde_json::Value =
        serde_json::from_slice(&read(&smooth, "manifest.json")).unwrap();
    let q = &manifest["quantization"];
    assert_eq!(q["smoothquant_alpha"], 0.5, "{manifest}");
    assert_eq!(q["calibration"]["tokens"], 2048, "{manifest}");

    let (cb, lb) = (read(&smooth, "client.veil"), read(&smooth, "linear.veil"));
    let client = ClientWeights::parse(&cb).unwrap();
    let linear = LinearWeights::parse(&lb).unwrap();
    let float = LlamaFloat::new(LlamaCheckpoint::load(&common::golden_llama_dir()).unwrap());
    let golden: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden_llama_dir().join("golden.json")).unwrap(),
    )
    .unwrap();
    let vocab = float.config().vocab_size;
    let argmax = |v: &mut dyn Iterator<Item = f64>| {
        v.enumerate()
            .fold((0, f64::MIN), |b, (i, x)| if x > b.1 { (i, x) } else { b })
            .0
    };
    for case in golden["cases"].as_array().unwrap() {
        let ids: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        let il = int_logits(&client, &linear, &ids).unwrap();
        let last = &il[(ids.len() - 1) * vocab..];
        let fl = float.forward_last(&ids);
        assert_eq!(
            argmax(&mut last.iter().copied()),
            argmax(&mut fl.iter().map(|&x| x as f64)),
            "top-1 differs on {}",
            case["prompt"]
        );
    }
    let tok = Tokenizer::from_dir(&common::golden_llama_dir()).unwrap();
    let ids = tok.encode(&wikitext("test")).unwrap();
    let window = golden["eval"]["window"].as_u64().unwrap() as usize;
    let r = evaluate_windows(&float, &client, &linear, &ids[..16384], window, &|_, _| {}).unwrap();
    println!("calibrated tiny-llama, WikiText-2 test, first 16384 tokens: {r:?}");
    assert!(
        r.relative_ppl_change.abs() < 0.01,
        "integer perplexity {} vs float {}",
        r.int_ppl,
        r.float_ppl
    );
}
