//! LLaMA-family checkpoints in the layouts the hub has them: sharded safetensors with an index
//! (the larger models), BF16 weights; and configs the integer pipeline cannot run, refused with
//! the reason rather than computed wrongly.

mod common;

use std::path::Path;

use common::Entry;
use safetensors::Dtype;
use veil_tools::hf::HfError;
use veil_tools::llama::{LlamaCheckpoint, LlamaConfig, INDEX_FILE};

fn golden_entries() -> Vec<Entry> {
    common::safetensors_entries(&common::golden_llama_dir().join("model.safetensors"))
}

fn write(path: &Path, entries: &[&Entry]) {
    common::write_safetensors(path, entries)
}

fn copy_configs(dir: &Path) {
    for f in ["config.json", "generation_config.json"] {
        std::fs::copy(common::golden_llama_dir().join(f), dir.join(f)).unwrap();
    }
}

#[test]
fn sharded_checkpoint_loads_as_the_single_file() {
    let single = LlamaCheckpoint::load(&common::golden_llama_dir()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_configs(dir);
    let entries = golden_entries();
    let (a, b): (Vec<&Entry>, Vec<&Entry>) = entries
        .iter()
        .partition(|e| e.name.as_str() < "model.layers.1");
    let names = [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ];
    write(&dir.join(names[0]), &a);
    write(&dir.join(names[1]), &b);
    let mut map = serde_json::Map::new();
    for (shard, part) in [(names[0], &a), (names[1], &b)] {
        for e in part.iter() {
            map.insert(e.name.clone(), shard.into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    assert!(!dir.join("model.safetensors").exists());
    let sharded = LlamaCheckpoint::load(dir).unwrap();
    assert_eq!(sharded, single);

    // A shard name that would leave the directory is refused.
    let mut bad = index.clone();
    bad["weight_map"]["model.norm.weight"] = "../elsewhere.safetensors".into();
    std::fs::write(dir.join(INDEX_FILE), bad.to_string()).unwrap();
    let err = LlamaCheckpoint::load(dir).unwrap_err();
    assert!(matches!(err, HfError::BadConfig { .. }), "{err}");
    // A missing shard names the file.
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
    std::fs::remove_file(dir.join(names[1])).unwrap();
    let err = LlamaCheckpoint::load(dir).unwrap_err();
    assert!(err.to_string().contains(names[1]), "{err}");
}

#[test]
fn bf16_weights_load_and_missing_untied_head_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    copy_configs(dir);
    let entries: Vec<Entry> = golden_entries()
        .into_iter()
        .map(|e| Entry {
            dtype: Dtype::BF16,
            data: e
                .data
                .chunks_exact(4)
                .flat_map(|c| {
                    let f = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                    half::bf16::from_f32(f).to_le_bytes()
                })
                .collect(),
            ..e
        })
        .collect();
    write(
        &dir.join("model.safetensors"),
        &entries.iter().collect::<Vec<_>>(),
    );
    let ck = LlamaCheckpoint::load(dir).unwrap();
    let single = LlamaCheckpoint::load(&common::golden_llama_dir()).unwrap();
    assert_eq!(ck.norm.len(), single.norm.len());
    assert!(ck
        .norm
        .iter()
        .zip(&single.norm)
        .all(|(a, b)| (a - b).abs() <= b.abs() / 128.0));
    // The head is untied: without lm_head.weight the checkpoint is not the model its config says.
    let no_head: Vec<&Entry> = entries
        .iter()
        .filter(|e| e.name != "lm_head.weight")
        .collect();
    write(&dir.join("model.safetensors"), &no_head);
    let err = LlamaCheckpoint::load(dir).unwrap_err();
    assert!(
        matches!(&err, HfError::MissingTensor { tensor, .. } if tensor == "lm_head.weight"),
        "{err}"
    );
}

#[test]
fn configs_the_pipeline_cannot_run_are_refused_with_the_reason() {
    let base: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::golden_llama_dir().join("config.json")).unwrap(),
    )
    .unwrap();
    let parse = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut v = base.clone();
        edit(&mut v);
        LlamaConfig::from_json(&v.to_string(), Path::new("config.json"))
    };
    assert!(parse(&|_| {}).is_ok());
    for (what, edit, needle) in [
        (
            "yarn scaling",
            (&|v: &mut serde_json::Value| v["rope_scaling"]["rope_type"] = "yarn".into())
                as &dyn Fn(&mut serde_json::Value),
            "yarn",
        ),
        ("gelu", &|v| v["hidden_act"] = "gelu".into(), "hidden_act"),
        ("mlp bias", &|v| v["mlp_bias"] = true.into(), "mlp_bias"),
        ("head_dim", &|v| v["head_dim"] = 64.into(), "head_dim"),
        (
            "kv heads",
            &|v| v["num_key_value_heads"] = 3.into(),
            "num_key_value_heads",
        ),
        (
            "mistral",
            &|v| v["model_type"] = "mistral".into(),
            "model_type",
        ),
        (
            "no layers",
            &|v| v["num_hidden_layers"] = 0.into(),
            "num_hidden_layers",
        ),
    ] {
        let err = parse(edit).expect_err(what);
        assert!(err.to_string().contains(needle), "{what}: {err}");
    }
    // Qwen2 has q/k/v biases without saying so; eos may be a list (Llama 3 Instruct).
    let q = parse(&|v| {
        v["model_type"] = "qwen2".into();
        v["eos_token_id"] = serde_json::json!([4, 2]);
    })
    .unwrap();
    assert!(q.qkv_bias);
    assert_eq!(q.eos_token_ids, vec![4, 2]);
}
