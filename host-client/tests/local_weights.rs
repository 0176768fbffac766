//! The client's own `linear.veil` must be the file its `client.veil` was quantized with (the
//! fingerprint the server is asked to match): a corrupt local copy is reported as a local file
//! problem, before any connection and before any pool is written; a verified file is remembered so
//! that start-up does not hash it again, and a changed one is not trusted.

mod common;

use std::io::Read;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::golden_model;
use veil_client::files::{FilesError, FingerprintCache, LinearCheck, ModelFiles};

/// Flips one byte in the middle of `path`, in place (same inode, same size: only its times and
/// its contents change).
fn flip_byte(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .open(path)
        .unwrap();
    let at = f.metadata().unwrap().len() / 2;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], at).unwrap();
}

/// Runs the real `veil-client` with `args`, a private cache dir, and a deadline (a client that
/// wrongly went on to wait for a server would otherwise hang the test).
fn run_client(args: &[&std::ffi::OsStr], cache: &Path) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_veil-client"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_flipped_byte_in_linear_veil_is_a_local_file_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let linear = dir.join("linear.veil");
    ModelFiles::open_with_cache(&dir, true, &FingerprintCache::disabled())
        .expect("the freshly quantized model opens");

    flip_byte(&linear);
    let err = ModelFiles::open(&dir, true).unwrap_err();
    let msg = err.to_string();
    let FilesError::LinearFingerprintMismatch {
        path,
        expected,
        actual,
    } = &err
    else {
        panic!("not a fingerprint mismatch: {msg}")
    };
    assert_eq!(path, &linear);
    assert_ne!(expected, actual);
    assert!(msg.contains(&linear.display().to_string()), "{msg}");
    let hex = |b: &[u8; 32]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    assert!(
        msg.contains(&hex(expected)) && msg.contains(&hex(actual)),
        "{msg}"
    );
    assert!(msg.contains("copy linear.veil again"), "{msg}");
    // The pool source never reads linear.veil, so it is not opened nor checked then.
    ModelFiles::open(&dir, false).expect("client.veil alone still opens");
}

#[test]
fn the_client_refuses_a_corrupt_linear_veil_before_connecting() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    flip_byte(&dir.join("linear.veil"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();

    let out = run_client(
        &[
            "--weights".as_ref(),
            dir.as_os_str(),
            "--server".as_ref(),
            addr.as_ref(),
            "--prompt".as_ref(),
            "x".as_ref(),
        ],
        &tmp.path().join("cache"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("linear.veil"), "{stderr}");

    // Not one byte reached the listener: no hello, and no masked row.
    listener.set_nonblocking(true).unwrap();
    match listener.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        Err(e) => panic!("accept: {e}"),
        Ok((mut s, _)) => {
            s.set_nonblocking(false).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut got = vec![];
            let _ = s.read_to_end(&mut got);
            panic!("the client connected and sent {} bytes", got.len());
        }
    }
}

#[test]
fn precompute_refuses_a_corrupt_linear_veil_and_writes_no_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    flip_byte(&dir.join("linear.veil"));
    let pool = tmp.path().join("masks.pool");

    let out = run_client(
        &[
            "precompute".as_ref(),
            "--weights".as_ref(),
            dir.as_os_str(),
            "--pool".as_ref(),
            pool.as_os_str(),
            "--tokens".as_ref(),
            "2".as_ref(),
        ],
        &tmp.path().join("cache"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("linear.veil"), "{stderr}");
    assert!(!pool.exists(), "a pool was written");
    assert!(
        !pool.with_extension("tmp").exists(),
        "a partial pool was left"
    );
}

#[test]
fn a_verified_linear_veil_is_not_hashed_again_until_it_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let cache_dir = tmp.path().join("cache");
    let cache = FingerprintCache::in_dir(&cache_dir);
    let check = || {
        ModelFiles::open_with_cache(&dir, true, &cache)
            .unwrap()
            .linear_check()
    };

    // Just written (flipped twice: the same bytes, new times): a write in the same timestamp tick
    // could leave its times unchanged, so it is not cached yet.
    flip_byte(&dir.join("linear.veil"));
    flip_byte(&dir.join("linear.veil"));
    assert_eq!(check(), Some(LinearCheck::Hashed));
    assert_eq!(
        check(),
        Some(LinearCheck::Hashed),
        "a fresh file was cached"
    );

    // Settled: hashed once more, then vouched for by the cache.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(check(), Some(LinearCheck::Hashed));
    assert_eq!(check(), Some(LinearCheck::Cached));

    // A damaged cache file only means hashing again.
    for e in std::fs::read_dir(&cache_dir).unwrap() {
        std::fs::write(e.unwrap().path(), b"\xff garbage\nnot an entry\n").unwrap();
    }
    assert_eq!(check(), Some(LinearCheck::Hashed));
    assert_eq!(check(), Some(LinearCheck::Cached));

    // A flipped byte: the cache entry no longer matches, the file is hashed and refused.
    flip_byte(&dir.join("linear.veil"));
    match ModelFiles::open_with_cache(&dir, true, &cache) {
        Err(FilesError::LinearFingerprintMismatch { .. }) => {}
        other => panic!("a changed linear.veil was trusted: {other:?}"),
    }
}
