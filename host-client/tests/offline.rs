//! The server-assisted offline phase (`precompute --server`): the server computes the unmasking
//! terms blind under RLWE, and the pool it fills holds exactly the terms the client would have
//! computed itself.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use veil_client::generate::Verification;
use veil_client::offline::{precompute_through, switch_for};
use veil_client::pool::PoolSource;
use veil_client::transport::{ConnectOptions, Connection};
use veil_core::model::format::{encode_linear_header, LinearLayout, HEADER_LEN};
use veil_core::model::{LinearWeights, ModelConfig};
use veil_core::session::{compute_pool_record, pool_record_offset, pool_record_words};
use veil_core::wire::ClientSettings;
use veil_server::ServerConfig;

/// Small, but with every kind of layer and a vocabulary wider than one batch of results.
const CFG: ModelConfig = ModelConfig {
    n_layer: 2,
    n_embd: 32,
    n_head: 2,
    n_positions: 16,
    vocab_size: 300,
    n_inner: 128,
};

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("veil-offline-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Random int8 weights in [-127, 127], with the first output of every layer all at ±127: the
/// worst column the noise bound allows for.
fn random_linear(seed: u64) -> Vec<u8> {
    let layout = LinearLayout::new(&CFG);
    let mut bytes = vec![0u8; layout.total_len];
    let mut h = [0u8; HEADER_LEN];
    encode_linear_header(&CFG, &mut h);
    bytes[..HEADER_LEN].copy_from_slice(&h);
    let mut x = seed | 1;
    for id in CFG.linears() {
        let in_dim = id.dims(&CFG).0;
        for (k, b) in bytes[layout.matrix(id)].iter_mut().enumerate() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = if k < in_dim {
                if x & 1 == 0 {
                    127
                } else {
                    -127
                }
            } else {
                (x % 255) as i32 - 127
            };
            *b = v as i8 as u8;
        }
    }
    bytes
}

/// Every term of slots `slots` read back from the pool (as the online phase reads them) equals
/// the locally computed record.
fn assert_pool_holds_local_terms(pool: &PoolSource, lin: &LinearWeights<'_>, slots: u64) {
    let mut r = vec![0u32; CFG.n_inner as usize];
    let mut want = vec![0u32; pool_record_words(&CFG)];
    for slot in 0..slots {
        compute_pool_record(&pool.key(), lin, slot, &mut r, &mut want);
        for linear in CFG.linears() {
            let o = linear.dims(&CFG).1;
            let mut got = vec![0u32; o];
            pool.read_terms(slot, linear, &mut got).unwrap();
            let off = pool_record_offset(&CFG, linear);
            assert_eq!(got[..], want[off..off + o], "slot {slot}, {linear}");
        }
    }
}

#[test]
fn a_server_filled_pool_holds_the_terms_the_client_would_compute() {
    let dir = temp_dir("fill");
    let bytes = random_linear(5);
    std::fs::write(dir.join("linear.veil"), &bytes).unwrap();
    let lin = LinearWeights::parse(&bytes).unwrap();
    let server = common::start_server(&dir, ServerConfig::default());
    let fingerprint = server.weights.fingerprint();
    let options = ConnectOptions {
        settings: ClientSettings {
            fingerprint,
            psk: None,
        },
        timeout: Duration::from_secs(120),
    };
    let path = dir.join("server.pool");
    let mut pool = PoolSource::create_or_open(&path, &CFG, &fingerprint, |key| {
        Ok(Verification::compute(key, &lin).w)
    })
    .unwrap();
    let mut conn = Connection::connect(&server.addr.to_string(), &options).unwrap();
    // Two runs: a pool is extended by a new batch under a new RLWE key, after the first.
    let mut progress = Vec::new();
    let first = precompute_through(&mut conn, &mut pool, &CFG, 3, &mut |d, t| {
        progress.push((d, t))
    })
    .unwrap();
    assert_eq!((first.slots, first.batches), (3, 1));
    let (done, total) = *progress.last().unwrap();
    assert_eq!(done, total, "progress reaches its end");
    let second = precompute_through(&mut conn, &mut pool, &CFG, 2, &mut |_, _| {}).unwrap();
    assert_eq!((second.slots, second.batches), (2, 1));
    assert_eq!(pool.filled(), 5);
    let wire = conn.stats();
    conn.bye();
    let inputs: usize = CFG.linears().map(|l| l.dims(&CFG).0).sum();
    assert_eq!(first.inputs, inputs as u64);
    // 32 KiB up per input ciphertext (and a little framing).
    assert!(wire.bytes_up >= 2 * inputs as u64 * 32768, "{wire:?}");
    // Down: the switched results, fewer bits than two u64 per coefficient.
    let down: u64 = CFG
        .linears()
        .map(|l| {
            let (i, o) = l.dims(&CFG);
            o as u64 * switch_for(i).result_words() as u64 * 4
        })
        .sum();
    assert!(wire.bytes_down >= 2 * down && wire.bytes_down < 2 * down + (1 << 20));
    assert_pool_holds_local_terms(&pool, &lin, 5);
    let _ = std::fs::remove_dir_all(&dir);
}
