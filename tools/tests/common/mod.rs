//! Shared helpers for the integration tests.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;

/// `shared/golden/tiny`, a sibling of the repository root. Panics with instructions if absent:
/// these tests must never pass by silently skipping.
pub fn golden_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden/tiny");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("golden.json").is_file(),
        "golden model not found at {}: the `shared` folder (with golden/tiny) must sit next to the \
         repository root",
        dir.display()
    );
    dir
}

/// `shared/golden/tiny-llama`: the small Llama-3-style model (GQA 4/2, RoPE with llama3
/// scaling, untied head). Panics with instructions if absent.
pub fn golden_llama_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/golden/tiny-llama");
    assert!(
        dir.join("model.safetensors").is_file() && dir.join("golden.json").is_file(),
        "golden model not found at {}: the `shared` folder (with golden/tiny-llama) must sit next \
         to the repository root",
        dir.display()
    );
    dir
}

/// One tensor of a checkpoint being rewritten by a test.
pub struct Entry {
    pub name: String,
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// The tensors of a safetensors file, as stored, sorted by name.
pub fn safetensors_entries(path: &std::path::Path) -> Vec<Entry> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<Entry> = st
        .tensors()
        .into_iter()
        .map(|(name, v)| Entry {
            name,
            dtype: v.dtype(),
            shape: v.shape().to_vec(),
            data: v.data().to_vec(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Writes `entries` as a safetensors file.
pub fn write_safetensors<E: std::borrow::Borrow<Entry>>(path: &std::path::Path, entries: &[E]) {
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = entries
        .iter()
        .map(|e| {
            let e = e.borrow();
            (
                e.name.clone(),
                safetensors::tensor::TensorView::new(e.dtype, e.shape.clone(), &e.data).unwrap(),
            )
        })
        .collect();
    safetensors::serialize_to_file(views, &None, path).unwrap();
}
