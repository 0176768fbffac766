//! Forward secrecy of the mask pool: after a generation, nothing left on the device regenerates a
//! used slot's masks, so a stolen device plus the server's recording of the masked rows reveals no
//! past prompt. Each slot's key and terms are on disk before the slot is used and gone after (the
//! key from the moment the slot is claimed), whether the pool is closed, dropped, or its process
//! dies and a later run opens it.

mod common;

use std::path::Path;

use common::{connect, golden_model, reference, start_server, Recording};
use veil_client::files::ModelFiles;
use veil_client::generate::{GenOptions, PrivateGenerator};
use veil_client::pool::PoolSource;
use veil_core::mask::MaskKey;
use veil_core::model::{LinearId, ModelConfig, SamplingParams};
use veil_core::session::input_mask;
use veil_server::ServerConfig;

fn opts(n: usize) -> GenOptions {
    GenOptions {
        max_new_tokens: n,
        sampling: SamplingParams::GREEDY,
        seed: 7,
        eos: vec![],
        prefill_rows: 64,
        speculation: None,
    }
}

/// What the device holds that could regenerate slot `slot`'s masks: its key, and its terms
/// `u = r · W` (which give `r` back to anyone holding `W`), as bytes to look for.
struct SlotSecrets {
    slot: u64,
    key: MaskKey,
    /// A stretch of each layer's terms (enough bytes that they cannot appear by chance).
    terms: Vec<Vec<u8>>,
}

fn secrets_of(
    pool: &PoolSource,
    cfg: &ModelConfig,
    slots: std::ops::Range<u64>,
) -> Vec<SlotSecrets> {
    slots
        .map(|slot| {
            let key = pool.unused_slot_key(slot).unwrap();
            let terms = cfg
                .linears()
                .map(|linear| {
                    let mut u = vec![0u32; linear.dims(cfg).1];
                    pool.read_terms(slot, linear, &mut u).unwrap();
                    u[..8].iter().flat_map(|w| w.to_le_bytes()).collect()
                })
                .collect();
            SlotSecrets { slot, key, terms }
        })
        .collect()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file of the device's directory, read whole.
fn device_bytes(dir: &Path) -> Vec<(String, Vec<u8>)> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.display().to_string(), std::fs::read(&p).unwrap()))
        .collect()
}

/// No file of `dir` holds a used slot's key or terms, the pool gives neither back, and the one
/// secret left (the check key) draws other masks.
fn assert_nothing_regenerates(
    dir: &Path,
    pool: &PoolSource,
    cfg: &ModelConfig,
    used: &[SlotSecrets],
) {
    let files = device_bytes(dir);
    let check_key = pool.check_key();
    let layer0 = LinearId {
        layer: 0,
        kind: veil_core::model::LinearKind::Qkv,
    };
    let d = cfg.d();
    for s in used {
        for (name, bytes) in &files {
            assert!(
                !contains(bytes, s.key.as_bytes()),
                "{name} still holds the key of used slot {}",
                s.slot
            );
            for (t, linear) in s.terms.iter().zip(cfg.linears()) {
                assert!(
                    !contains(bytes, t),
                    "{name} still holds used slot {}'s terms of {linear}",
                    s.slot
                );
            }
        }
        assert!(pool.unused_slot_key(s.slot).is_err(), "slot {}", s.slot);
        for linear in cfg.linears() {
            let mut u = vec![1u32; linear.dims(cfg).1];
            pool.read_terms(s.slot, linear, &mut u).unwrap();
            assert!(
                u.iter().all(|&w| w == 0),
                "slot {} {linear} not erased",
                s.slot
            );
        }
        let (mut r, mut from_check) = (vec![0u32; d], vec![0u32; d]);
        input_mask(&s.key, cfg, s.slot, layer0, &mut r);
        input_mask(&check_key, cfg, s.slot, layer0, &mut from_check);
        assert_ne!(r, from_check, "the check key draws slot {}'s masks", s.slot);
    }
}

/// A generation with a closed pool, then one whose process "dies" (the pool is leaked: no close,
/// no drop) and a later open: both leave nothing of their slots, and every unused slot still
/// works (the second and third generations equal the reference).
#[test]
fn after_a_generation_nothing_on_the_device_regenerates_a_used_slots_masks() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let files = ModelFiles::open(&dir, true).unwrap();
    let cfg = *files.client().unwrap().config();
    let fp = files.fingerprint().unwrap();
    let prompt = [464u32, 3290, 286];
    let o = opts(6);
    let want = reference(&files, &prompt, &o);
    let path = dir.join("masks.pool");
    let linear = files.linear().unwrap().unwrap();
    let slots = 64;
    PoolSource::precompute(&path, &linear, &fp, slots, &mut |_, _| {}).unwrap();

    let pool = PoolSource::open(&path, &cfg, &fp).unwrap();
    let all = secrets_of(&pool, &cfg, 0..slots);
    // A fresh key per slot: none repeats (a repeat would be a reused pad).
    for (i, a) in all.iter().enumerate() {
        for b in &all[i + 1..] {
            assert_ne!(
                a.key.as_bytes(),
                b.key.as_bytes(),
                "slots {} {}",
                a.slot,
                b.slot
            );
        }
    }
    let generate = |pool: PoolSource| {
        let verification = pool.verification().unwrap();
        let mut src = Recording::new(pool);
        let mut g = PrivateGenerator::new(files.client().unwrap(), connect(server.addr, &files))
            .verify_with(verification);
        let (t, _) = g.generate(&mut src, &prompt, &o, &mut |_| {}).unwrap();
        g.into_connection().bye();
        let used: Vec<u64> = src.reserved.iter().flat_map(|&(f, n)| f..f + n).collect();
        (t, used, src.inner)
    };

    // Closed cleanly.
    let (tokens, used, pool) = generate(pool);
    assert_eq!(tokens, want);
    let end = *used.last().unwrap() + 1;
    assert_eq!(used, (0..end).collect::<Vec<_>>());
    pool.close().unwrap();
    let pool = PoolSource::open(&path, &cfg, &fp).unwrap();
    assert_eq!(
        pool.next_slot(),
        end,
        "the claimed-ahead slots were given back"
    );
    assert_nothing_regenerates(&dir, &pool, &cfg, &all[..end as usize]);
    // The given-back slots still hold their keys and terms.
    let again = secrets_of(&pool, &cfg, end..slots);
    for (a, b) in again.iter().zip(&all[end as usize..]) {
        assert_eq!(a.key.as_bytes(), b.key.as_bytes());
        assert_eq!(a.terms, b.terms);
    }

    // The process dies mid-life: neither close nor drop runs.
    let (tokens, used2, pool) = generate(pool);
    assert_eq!(tokens, want);
    assert!(used2.iter().all(|&s| s >= end), "a used slot came back");
    let end2 = *used2.last().unwrap() + 1;
    std::mem::forget(pool);
    // Already now the keys of every slot it used are gone from the file (erased at the claim).
    for (name, bytes) in device_bytes(&dir) {
        for s in &all[end as usize..end2 as usize] {
            assert!(
                !contains(&bytes, s.key.as_bytes()),
                "{name}: slot {}",
                s.slot
            );
        }
    }
    // The next run erases the terms the dead one left, and skips the slots it had claimed.
    let pool = PoolSource::open(&path, &cfg, &fp).unwrap();
    assert!(pool.next_slot() >= end2);
    assert_nothing_regenerates(&dir, &pool, &cfg, &all[..end2 as usize]);
    let (tokens, used3, pool) = generate(pool);
    assert_eq!(tokens, want);
    assert!(used3.iter().all(|&s| s >= end2), "a used slot came back");
    drop(pool);
    let pool = PoolSource::open(&path, &cfg, &fp).unwrap();
    let end3 = *used3.last().unwrap() + 1;
    assert_nothing_regenerates(&dir, &pool, &cfg, &all[..end3 as usize]);
}
