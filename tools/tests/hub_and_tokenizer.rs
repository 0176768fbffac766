//! `--model` resolution (local directory, hub cache, failed download) and tokenizer errors.

mod common;

use veil_tools::hub::{resolve_model, HubError, HubOptions, ModelFiles};
use veil_tools::tokenizer::{Tokenizer, TokenizerError};

/// Options that can never reach the network: an empty private cache and a closed local port.
fn offline(cache: &std::path::Path) -> HubOptions {
    HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some("http://127.0.0.1:9".into()),
        progress: false,
    }
}

#[test]
fn local_directory_is_used_as_is() {
    let dir = common::golden_dir();
    let cache = tempfile::tempdir().unwrap();
    let files = resolve_model(dir.to_str().unwrap(), &offline(cache.path())).unwrap();
    assert_eq!(files, ModelFiles::in_dir(&dir));
    assert!(files.config.is_file() && files.model.is_file() && files.tokenizer.is_file());
}

#[test]
fn missing_local_path_is_not_treated_as_hub_id() {
    let cache = tempfile::tempdir().unwrap();
    for spec in ["./no/such/model", "/no/such/model"] {
        let err = resolve_model(spec, &offline(cache.path())).unwrap_err();
        assert!(
            matches!(err, HubError::NotADirectory { .. }),
            "{spec}: {err:?}"
        );
    }
}

#[test]
fn failed_download_names_the_local_route() {
    let cache = tempfile::tempdir().unwrap();
    let err = resolve_model("distilgpt2", &offline(cache.path())).unwrap_err();
    assert!(
        matches!(&err, HubError::Download { repo, .. } if repo == "distilgpt2"),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("could not download"), "{msg}");
    assert!(msg.contains("--model <local dir>"), "{msg}");
}

#[test]
fn cached_snapshot_resolves_offline() {
    // The layout huggingface_hub and hf-hub share: refs/main names a snapshot folder.
    let cache = tempfile::tempdir().unwrap();
    let repo = cache.path().join("models--openai-community--gpt2");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let snap = repo.join("snapshots").join(commit);
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), commit).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::os::unix::fs::symlink(common::golden_dir().join(f), snap.join(f)).unwrap();
    }
    let files = resolve_model("openai-community/gpt2", &offline(cache.path())).unwrap();
    assert_eq!(files, ModelFiles::in_dir(&snap));
    veil_tools::hf::Checkpoint::load_files(&files.config, &files.model).unwrap();
}

#[test]
fn missing_tokenizer_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = Tokenizer::from_dir(dir.path()).unwrap_err();
    assert!(matches!(err, TokenizerError::Missing { .. }));
    assert!(err.to_string().contains("tokenizer.json"));
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    assert!(matches!(
        Tokenizer::from_dir(dir.path()).unwrap_err(),
        TokenizerError::Load { .. }
    ));
}
