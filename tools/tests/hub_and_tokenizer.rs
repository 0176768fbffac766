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
        token: None,
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

/// A loopback stand-in for the hub's file endpoint (`/{repo}/resolve/main/{file}`, ranges as
/// hf-hub asks for them) serving golden tiny's files, gated like meta-llama's repositories: 401
/// unless the request carries `Authorization: Bearer hf_test`. Returns its address.
fn gated_hub() -> std::net::SocketAddr {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
            let (mut auth, mut range) = (false, None);
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                    break;
                }
                let (name, value) = h.split_once(':').unwrap_or((&h, ""));
                let value = value.trim();
                match name.to_ascii_lowercase().as_str() {
                    "authorization" => auth = value == "Bearer hf_test",
                    "range" => range = value.strip_prefix("bytes=").map(str::to_owned),
                    _ => {}
                }
            }
            let file = path.rsplit('/').next().unwrap_or("");
            let body = std::fs::read(common::golden_dir().join(file)).ok();
            let reply = match (auth, body) {
                (false, _) => {
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                }
                (true, None) => {
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        .to_vec()
                }
                (true, Some(body)) => {
                    let (from, to) = match range.as_deref().and_then(|r| r.split_once('-')) {
                        Some((a, b)) => {
                            (a.parse().unwrap_or(0), b.parse().unwrap_or(body.len() - 1))
                        }
                        None => (0, body.len() - 1),
                    };
                    let part = &body[from..=to];
                    let mut r = format!(
                        "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {from}-{to}/{}\r\n\
                         x-repo-commit: 0123456789abcdef0123456789abcdef01234567\r\netag: \"{file}\"\r\n\
                         Connection: close\r\n\r\n",
                        part.len(),
                        body.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(part);
                    r
                }
            };
            let _ = stream.write_all(&reply);
        }
    });
    addr
}

#[test]
fn a_gated_repository_downloads_with_a_token_and_says_how_to_get_one_without() {
    let addr = gated_hub();
    let options = |cache: &std::path::Path, token: Option<&str>| HubOptions {
        cache_dir: Some(cache.to_path_buf()),
        endpoint: Some(format!("http://{addr}")),
        progress: false,
        token: token.map(str::to_owned),
    };
    let cache = tempfile::tempdir().unwrap();
    let files = resolve_model("meta-llama/gated", &options(cache.path(), Some("hf_test"))).unwrap();
    for (got, f) in [
        (&files.config, "config.json"),
        (&files.model, "model.safetensors"),
    ] {
        assert_eq!(
            std::fs::read(got).unwrap(),
            std::fs::read(common::golden_dir().join(f)).unwrap(),
            "{f}"
        );
    }
    let cache = tempfile::tempdir().unwrap();
    let err =
        resolve_model("meta-llama/gated", &options(cache.path(), Some("hf_wrong"))).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("HF_TOKEN") && msg.contains("licence"), "{msg}");
}
