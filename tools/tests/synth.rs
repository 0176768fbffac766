//! `synth` writes checkpoints the loader accepts, deterministically, with outliers on request.

mod common;

use std::path::Path;

use veil_tools::float_ref::FloatModel;
use veil_tools::hf::{expected_shapes, Checkpoint, GptConfig};
use veil_tools::synth::{write_checkpoint, Preset, SynthOptions};
use veil_tools::tokenizer::Tokenizer;

fn synth(out: &Path, seed: u64, outliers: bool, tokenizer: bool) -> Vec<usize> {
    let opts = SynthOptions {
        preset: Preset::Tiny,
        seed,
        outliers,
        tokenizer_from: tokenizer.then(common::golden_dir),
        progress: false,
    };
    write_checkpoint(out, &opts)
        .expect("synth tiny")
        .outlier_channels
}

#[test]
fn synth_tiny_round_trips_through_the_loader() {
    let dir = tempfile::tempdir().expect("tempdir");
    synth(dir.path(), 7, false, true);
    let ckpt = Checkpoint::load(dir.path()).expect("load synthesised checkpoint");
    let c = &ckpt.config;
    assert_eq!(*c, Preset::Tiny.config());
    assert_eq!(
        (
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_positions,
            c.vocab_size,
            c.n_inner
        ),
        (2, 128, 4, 256, 50257, 512)
    );
    // Every tensor has the shape the config implies, in the documented order.
    let named = ckpt.named_tensors();
    let expected = expected_shapes(c);
    assert_eq!(named.len(), expected.len());
    for ((name, t), (ename, eshape)) in named.iter().zip(&expected) {
        assert_eq!(name, ename);
        assert_eq!(&t.shape, eshape, "{name}");
        assert_eq!(t.data.len(), eshape.iter().product::<usize>(), "{name}");
    }
    // GPT-2-like statistics: wte std ≈ 0.02, LayerNorm gains ≈ 1.
    let std =
        (ckpt.wte.data.iter().map(|v| v * v).sum::<f32>() / ckpt.wte.data.len() as f32).sqrt();
    assert!((std - 0.02).abs() < 0.001, "wte std {std}");
    let g = &ckpt.blocks[0].ln_1.weight.data;
    assert!(g.iter().all(|v| (v - 1.0).abs() < 0.5));

    // config.json is what transformers would accept: the fields it writes for GPT2LMHeadModel.
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "GPT2LMHeadModel");
    assert_eq!(config["activation_function"], "gelu_new");
    assert_eq!(config["n_ctx"], 256);
    assert!(config["n_inner"].is_null());

    // Tokenizer copied; the synthetic model runs end to end.
    let tok = Tokenizer::from_dir(dir.path()).expect("copied tokenizer");
    let ids = tok.encode("Hello world").unwrap();
    let model = FloatModel::from_checkpoint(&ckpt);
    let logits = model.forward_last(&ids);
    assert_eq!(logits.len(), 50257);
    assert!(logits.iter().all(|v| v.is_finite()));
}

#[test]
fn same_seed_same_bytes_other_seed_other_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let c = tempfile::tempdir().unwrap();
    synth(a.path(), 42, true, false);
    synth(b.path(), 42, true, false);
    synth(c.path(), 43, true, false);
    for f in ["config.json", "model.safetensors"] {
        let fa = std::fs::read(a.path().join(f)).unwrap();
        let fb = std::fs::read(b.path().join(f)).unwrap();
        assert!(fa == fb, "{f} differs between two runs with the same seed");
    }
    let ma = std::fs::read(a.path().join("model.safetensors")).unwrap();
    let mc = std::fs::read(c.path().join("model.safetensors")).unwrap();
    assert_eq!(ma.len(), mc.len());
    assert!(ma != mc, "different seeds gave identical weights");
}

/// Per-channel max |x| over the rows of a `[rows, d]` tensor.
fn column_max_abs(data: &[f32], d: usize) -> Vec<f32> {
    let mut m = vec![0f32; d];
    for row in data.chunks_exact(d) {
        for (a, v) in m.iter_mut().zip(row) {
            *a = a.max(v.abs());
        }
    }
    m
}

fn median(v: &[f32]) -> f32 {
    let mut s = v.to_vec();
    s.sort_by(f32::total_cmp);
    s[s.len() / 2]
}

#[test]
fn outliers_make_a_few_large_residual_channels() {
    let dir = tempfile::tempdir().unwrap();
    let chans = synth(dir.path(), 3, true, false);
    assert!((3..=6).contains(&chans.len()), "{chans:?}");
    let ckpt = Checkpoint::load(dir.path()).unwrap();
    let GptConfig { n_embd: d, .. } = ckpt.config;

    // wpe: the chosen columns are >= 50x the typical column (by RMS), and they are exactly the
    // largest ones.
    let rms: Vec<f32> = (0..d)
        .map(|j| {
            let s: f32 = ckpt.wpe.data.chunks_exact(d).map(|r| r[j] * r[j]).sum();
            (s / ckpt.config.n_positions as f32).sqrt()
        })
        .collect();
    let typical = median(&rms);
    for (j, r) in rms.iter().enumerate() {
        let ratio = r / typical;
        if chans.contains(&j) {
            assert!((40.0..120.0).contains(&ratio), "channel {j}: ratio {ratio}");
        } else {
            assert!(
                ratio < 1.5,
                "channel {j} is large ({ratio}) but not an outlier"
            );
        }
    }
    // The residual writers carry the same channels; wte (the tied LM head) and the LayerNorm
    // gains do not, so the outliers are in activations, not weights.
    let cmax = column_max_abs(&ckpt.blocks[1].mlp_proj.weight.data, d);
    let typical = median(&cmax);
    for &j in &chans {
        assert!(cmax[j] > 20.0 * typical, "mlp.c_proj column {j}");
        assert!(ckpt.ln_f.weight.data[j] < 2.0, "ln_f gain {j}");
        let wte_col = ckpt
            .wte
            .data
            .chunks_exact(d)
            .map(|r| r[j].abs())
            .fold(0f32, f32::max);
        assert!(wte_col < 0.2, "wte column {j}: {wte_col}");
    }

    // And the forward pass shows them: ln_1's output (c_attn's input) has a few huge channels.
    let model = FloatModel::from_checkpoint(&ckpt);
    let mut stats = veil_tools::float_ref::ActStats::new(&ckpt.config);
    let tokens: Vec<u32> = (0..64).map(|i| (i * 797) % 50257).collect();
    model.forward_with_stats(&tokens, &mut stats);
    let s = &stats.blocks[0].c_attn;
    let typical = median(s);
    for &j in &chans {
        assert!(
            s[j] > 10.0 * typical,
            "c_attn input channel {j}: {} vs {typical}",
            s[j]
        );
    }
}

#[test]
fn presets_have_the_shapes_of_the_hub_models() {
    // (preset, layers, width, heads): config.json of distilgpt2, gpt2, gpt2-medium and gpt2-xl.
    for (p, l, d, h) in [
        (Preset::Distilgpt2, 6, 768, 12),
        (Preset::Gpt2, 12, 768, 12),
        (Preset::Gpt2Medium, 24, 1024, 16),
        (Preset::Gpt2Xl, 48, 1600, 25),
    ] {
        let c = p.config();
        assert_eq!((c.n_layer, c.n_embd, c.n_head), (l, d, h), "{p:?}");
        assert_eq!(
            (c.n_inner, c.vocab_size, c.n_positions),
            (4 * d, 50257, 1024),
            "{p:?}"
        );
        assert_eq!(c.n_embd / c.n_head, 64, "{p:?}: GPT-2 heads are 64 wide");
    }
}
