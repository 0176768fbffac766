//! Broken checkpoints give typed errors naming the file and tensor, never a panic; the accepted
//! variations (F16/BF16, no `transformer.` prefix, a stored tied LM head) load.

mod common;

use std::path::Path;

use common::Entry;
use safetensors::Dtype;
use veil_tools::hf::{Checkpoint, HfError};

/// The golden model's tensors, as stored.
fn golden_entries() -> Vec<Entry> {
    common::safetensors_entries(&common::golden_dir().join("model.safetensors"))
}

/// A checkpoint directory with the golden config and the given tensors.
fn write_dir(dir: &Path, entries: &[Entry]) {
    std::fs::copy(
        common::golden_dir().join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    common::write_safetensors(&dir.join("model.safetensors"), entries);
}

fn load_err(dir: &Path) -> HfError {
    match Checkpoint::load(dir) {
        Ok(_) => panic!("checkpoint in {} loaded but should not", dir.display()),
        Err(e) => e,
    }
}

fn golden_copy_with_model_bytes(len: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::golden_dir();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &bytes[..len]).unwrap();
    dir
}

#[test]
fn truncated_file_is_a_typed_error() {
    let full = std::fs::metadata(common::golden_dir().join("model.safetensors"))
        .unwrap()
        .len() as usize;
    // Cut in the data, in the header, and in the 8-byte length prefix.
    for len in [full / 2, full - 1, 100, 3, 0] {
        let dir = golden_copy_with_model_bytes(len);
        match load_err(dir.path()) {
            HfError::Truncated {
                path,
                expected,
                actual,
            } => {
                assert_eq!(actual, len as u64);
                assert!(expected > actual);
                if len > 4096 {
                    assert_eq!(expected, full as u64, "header implies the full length");
                }
                assert!(path.ends_with("model.safetensors"));
            }
            other => panic!("cut to {len} bytes: expected Truncated, got {other:?}"),
        }
    }
    let msg = load_err(golden_copy_with_model_bytes(full / 2).path()).to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("truncated"),
        "{msg}"
    );
}

#[test]
fn corrupt_header_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        common::golden_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let mut bytes = 16u64.to_le_bytes().to_vec();
    bytes.extend_from_slice(b"not json at all!");
    std::fs::write(dir.path().join("model.safetensors"), bytes).unwrap();
    assert!(matches!(load_err(dir.path()), HfError::Safetensors { .. }));
}

#[test]
fn missing_tensor_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let entries: Vec<Entry> = golden_entries()
        .into_iter()
        .filter(|e| e.name != "transformer.h.1.mlp.c_fc.bias")
        .collect();
    write_dir(dir.path(), &entries);
    let err = load_err(dir.path());
    assert!(
        matches!(&err, HfError::MissingTensor { tensor, .. } if tensor == "h.1.mlp.c_fc.bias"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("h.1.mlp.c_fc.bias") && msg.contains("model.safetensors"),
        "{msg}"
    );
}

#[test]
fn wrong_shape_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries = golden_entries();
    let e = entries
        .iter_mut()
        .find(|e| e.name == "transformer.h.0.attn.c_proj.weight")
        .unwrap();
    // Same element count, transposed-looking shape: only the shape check can catch it.
    e.shape = vec![64, 256];
    write_dir(dir.path(), &entries);
    match load_err(dir.path()) {
        HfError::WrongShape {
            tensor,
            expected,
            found,
            ..
        } => {
            assert_eq!(tensor, "transformer.h.0.attn.c_proj.weight");
            assert_eq!(expected, vec![128, 128]);
            assert_eq!(found, vec![64, 256]);
        }
        other => panic!("expected WrongShape, got {other:?}"),
    }
}

#[test]
fn wrong_dtype_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries = golden_entries();
    let e = entries
        .iter_mut()
        .find(|e| e.name == "transformer.ln_f.bias")
        .unwrap();
    e.dtype = Dtype::I32; // same byte width, so the file is otherwise valid
    write_dir(dir.path(), &entries);
    assert!(matches!(
        load_err(dir.path()),
        HfError::WrongDtype { tensor, .. } if tensor == "transformer.ln_f.bias"
    ));
}

#[test]
fn tied_lm_head_is_checked_then_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let mut entries = golden_entries();
    let wte = entries
        .iter()
        .find(|e| e.name == "transformer.wte.weight")
        .unwrap();
    let head = Entry {
        name: "lm_head.weight".into(),
        dtype: wte.dtype,
        shape: wte.shape.clone(),
        data: wte.data.clone(),
    };
    entries.push(head);
    write_dir(dir.path(), &entries);
    let with_head = Checkpoint::load(dir.path()).expect("stored tied head is accepted");
    assert_eq!(with_head, Checkpoint::load(&common::golden_dir()).unwrap());

    let head = entries.last_mut().unwrap();
    head.shape = vec![50257, 64];
    head.data.truncate(50257 * 64 * 4);
    write_dir(dir.path(), &entries);
    assert!(matches!(
        load_err(dir.path()),
        HfError::WrongShape { tensor, .. } if tensor == "lm_head.weight"
    ));
}

#[test]
fn half_precision_and_unprefixed_names_load() {
    let reference = Checkpoint::load(&common::golden_dir()).unwrap();
    for dtype in [Dtype::F16, Dtype::BF16] {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<Entry> = golden_entries()
            .into_iter()
            .map(|e| {
                let data = e
                    .data
                    .chunks_exact(4)
                    .flat_map(|c| {
                        let v = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                        match dtype {
                            Dtype::F16 => half::f16::from_f32(v).to_le_bytes(),
                            _ => half::bf16::from_f32(v).to_le_bytes(),
                        }
                    })
                    .collect();
                Entry {
                    // GPT2Model (no LM head) stores the body without the `transformer.` prefix.
                    name: e.name.trim_start_matches("transformer.").to_string(),
                    dtype,
                    shape: e.shape,
                    data,
                }
            })
            .collect();
        write_dir(dir.path(), &entries);
        let ckpt = Checkpoint::load(dir.path()).expect("half-precision checkpoint");
        let rel = if dtype == Dtype::F16 { 1e-3 } else { 8e-3 };
        for ((name, a), (_, b)) in ckpt.named_tensors().iter().zip(reference.named_tensors()) {
            assert_eq!(a.shape, b.shape, "{name}");
            for (x, y) in a.data.iter().zip(&b.data) {
                // f16 flushes tiny values to subnormals/zero: allow an absolute floor too.
                assert!((x - y).abs() <= rel * y.abs() + 1e-4, "{name}: {x} vs {y}");
            }
        }
    }
}

fn dir_with_config(edit: impl Fn(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let src = common::golden_dir();
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    // Symlink rather than copy: the weights are never reached when the config is rejected.
    std::os::unix::fs::symlink(
        src.join("model.safetensors").canonicalize().unwrap(),
        dir.path().join("model.safetensors"),
    )
    .unwrap();
    dir
}

#[test]
fn bad_configs_are_rejected() {
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit); 5] = [
        ("relu", |c| c["activation_function"] = "relu".into()),
        ("model_type", |c| c["model_type"] = "llama".into()),
        ("n_head", |c| c["n_head"] = 3.into()),
        ("n_layer", |c| c["n_layer"] = serde_json::Value::Null),
        ("scale_attn_by_inverse_layer_idx", |c| {
            c["scale_attn_by_inverse_layer_idx"] = true.into()
        }),
    ];
    for (needle, edit) in cases {
        let dir = dir_with_config(edit);
        let err = load_err(dir.path());
        let msg = err.to_string();
        assert!(
            matches!(err, HfError::BadConfig { .. }),
            "{needle}: {err:?}"
        );
        assert!(msg.contains(needle) && msg.contains("config.json"), "{msg}");
    }
    // Not JSON at all.
    let dir = dir_with_config(|_| {});
    std::fs::write(dir.path().join("config.json"), "{ nope").unwrap();
    assert!(matches!(load_err(dir.path()), HfError::BadConfig { .. }));
}

#[test]
fn config_values_are_read() {
    let dir = dir_with_config(|c| c["activation_function"] = "gelu".into());
    let ckpt = Checkpoint::load(dir.path()).expect("exact gelu is accepted");
    assert_eq!(ckpt.config.activation, veil_tools::hf::Activation::Gelu);
    assert_eq!(ckpt.config.n_inner, 4 * 128, "n_inner null means 4·n_embd");
    assert_eq!(ckpt.config.layer_norm_epsilon, 1e-5);
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    match load_err(dir.path()) {
        HfError::MissingFile { path } => assert!(path.ends_with("config.json")),
        other => panic!("{other:?}"),
    }
    std::fs::copy(
        common::golden_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    match load_err(dir.path()) {
        HfError::MissingFile { path } => assert!(path.ends_with("model.safetensors")),
        other => panic!("{other:?}"),
    }
}
