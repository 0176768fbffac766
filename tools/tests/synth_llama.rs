//! `synth`'s LLaMA-family presets: the hub models' shapes, checkpoints the loader accepts
//! (tied and untied heads, q/k/v biases), deterministic bytes, and an integer pipeline that
//! follows the float reference on them.

mod common;

use veil_core::model::{ClientWeights, LinearWeights};
use veil_tools::eval::evaluate_windows;
use veil_tools::llama::{quantize_llama, LlamaCheckpoint, LlamaFloat};
use veil_tools::synth::{write_llama_checkpoint, LlamaPreset, LlamaSynthOptions};
use veil_tools::tokenizer::Tokenizer;

#[test]
fn llama_presets_have_the_shapes_of_the_hub_models() {
    // (preset, layers, hidden, heads, kv heads, inner, vocab, qkv bias, tied): from the hub
    // models' config.json.
    for (p, l, d, h, kv, inner, vocab, bias, tied) in [
        (
            LlamaPreset::Smollm2_135m,
            30,
            576,
            9,
            3,
            1536,
            49152,
            false,
            true,
        ),
        (
            LlamaPreset::Qwen25_05b,
            24,
            896,
            14,
            2,
            4864,
            151936,
            true,
            true,
        ),
        (
            LlamaPreset::Llama32_1b,
            16,
            2048,
            32,
            8,
            8192,
            128256,
            false,
            true,
        ),
        (
            LlamaPreset::TinyLlama,
            2,
            128,
            4,
            2,
            352,
            8192,
            false,
            false,
        ),
    ] {
        let c = p.config();
        assert_eq!(
            (c.n_layer, c.d, c.n_head, c.n_kv_head, c.inner, c.vocab_size),
            (l, d, h, kv, inner, vocab),
            "{p:?}"
        );
        assert_eq!((c.qkv_bias, c.tied), (bias, tied), "{p:?}");
        assert_eq!(c.head_dim(), if l == 2 { 32 } else { 64 }, "{p:?}");
        // The context is capped where the integer attention stays exact.
        let mc = c.model_config().unwrap();
        assert_eq!(
            mc.n_positions as usize,
            c.max_positions
                .min(veil_core::model::MAX_POSITIONS as usize)
        );
    }
    // The tiny preset is the golden tiny-llama's shape, down to its RoPE.
    let golden = LlamaCheckpoint::load(&common::golden_llama_dir())
        .unwrap()
        .config;
    let tiny = LlamaPreset::TinyLlama.config();
    assert_eq!(
        (tiny.rope, tiny.rms_norm_eps),
        (golden.rope, golden.rms_norm_eps)
    );
}

fn synth(preset: LlamaPreset, seed: u64, out: &std::path::Path) {
    let opts = LlamaSynthOptions {
        preset,
        seed,
        tokenizer_from: Some(common::golden_llama_dir()),
        progress: false,
    };
    write_llama_checkpoint(out, &opts).unwrap();
}

#[test]
fn synth_llama_round_trips_and_the_integer_pipeline_follows_float() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = Tokenizer::from_dir(&common::golden_llama_dir()).unwrap();
    let p = common::golden_llama_dir().join("../../data/wikitext-2/test.txt");
    let text = std::fs::read_to_string(&p).unwrap().replace("\r\n", "\n");
    let ids = tok.encode(&text).unwrap();
    for preset in [LlamaPreset::TinyLlama, LlamaPreset::TinyQwen2] {
        let dir = tmp.path().join(format!("{preset:?}"));
        synth(preset, 5, &dir);
        let ckpt = LlamaCheckpoint::load(&dir).unwrap();
        assert_eq!(ckpt.config, preset.config());
        assert_eq!(
            ckpt.blocks[0].qkv_bias.is_some(),
            preset == LlamaPreset::TinyQwen2
        );
        assert_eq!(ckpt.lm_head == ckpt.embed, ckpt.config.tied, "{preset:?}");
        // Same seed, same bytes.
        let again = tmp.path().join("again");
        synth(preset, 5, &again);
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            std::fs::read(again.join("model.safetensors")).unwrap()
        );
        let q = quantize_llama(&ckpt, &Default::default(), &mut |_, _| {}).unwrap();
        let client = ClientWeights::parse(&q.client).unwrap();
        let linear = LinearWeights::parse(&q.linear).unwrap();
        let float = LlamaFloat::new(ckpt);
        let r = evaluate_windows(&float, &client, &linear, &ids[..2048], 255, &|_, _| {}).unwrap();
        println!("{preset:?}: {r:?}");
        // Random weights give near-tied logits, so agreement is below a trained model's (the
        // golden tiny-llama: 0.981); the NLL must still follow float closely.
        assert!(
            r.top1_agreement > 0.9,
            "{preset:?}: agreement {}",
            r.top1_agreement
        );
        assert!(
            (r.int_nll - r.float_nll).abs() < 0.01 * r.float_nll,
            "{preset:?}: nll {} vs {}",
            r.int_nll,
            r.float_nll
        );
    }
}
