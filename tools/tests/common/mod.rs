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
