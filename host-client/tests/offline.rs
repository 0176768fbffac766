//! The server-assisted offline phase (`precompute --server`): the server computes the unmasking
//! terms blind under RLWE, and the pool it fills holds exactly the terms the client would have
//! computed itself; `precompute --json` reports the run's work.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use veil_client::offline::{download_projections, precompute_through, switch_for, OfflineError};
use veil_client::pool::{PoolSource, ProjectionStream};
use veil_client::transport::{ConnectOptions, Connection};
use veil_core::model::format::{
    encode_client_header, encode_linear_header, ClientHeader, ClientLayout, LinearLayout,
    HEADER_LEN,
};
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
    family: veil_core::model::Family::Gpt2,
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
/// the record computed locally with the slot's key.
fn assert_pool_holds_local_terms(pool: &PoolSource, lin: &LinearWeights<'_>, slots: u64) {
    let mut r = vec![0u32; CFG.n_inner as usize];
    let mut want = vec![0u32; pool_record_words(&CFG)];
    for slot in 0..slots {
        let key = pool.unused_slot_key(slot).unwrap();
        compute_pool_record(&key, lin, slot, &mut r, &mut want);
        for linear in CFG.linears() {
            let o = linear.dims(&CFG).1;
            let mut got = vec![0u32; o];
            pool.read_terms(slot, linear, &mut got).unwrap();
            let off = pool_record_offset(&CFG, linear);
            assert_eq!(got[..], want[off..off + o], "slot {slot}, {linear}");
        }
    }
}

/// A temporary directory with [`random_linear`]`(seed)` as its `linear.veil`, a server for it,
/// and how to connect.
fn serve_random(tag: &str, seed: u64) -> (PathBuf, Vec<u8>, common::Server, ConnectOptions) {
    let dir = temp_dir(tag);
    let bytes = random_linear(seed);
    std::fs::write(dir.join("linear.veil"), &bytes).unwrap();
    let server = common::start_server(&dir, ServerConfig::default());
    let options = ConnectOptions {
        settings: ClientSettings {
            fingerprint: server.weights.fingerprint(),
            psk: None,
        },
        timeout: Duration::from_secs(120),
    };
    (dir, bytes, server, options)
}

#[test]
fn a_server_filled_pool_holds_the_terms_the_client_would_compute() {
    let (dir, bytes, server, options) = serve_random("fill", 5);
    let lin = LinearWeights::parse(&bytes).unwrap();
    let fingerprint = server.weights.fingerprint();
    let path = dir.join("server.pool");
    let mut pool = PoolSource::create_or_open(&path, &CFG, &fingerprint, |key, sink| {
        ProjectionStream::from_weights(key, &lin, sink)
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

/// A man in the middle (standing for a lying server): forwards both ways, but inverts 64 bytes
/// in the `target`-th full `Data` chunk from the server: the first frame of a result ciphertext,
/// which starts with its `a` half, on which every slot's term depends. (Altering only the `b`
/// half's tail would change only the batch's unused coefficients, which nothing reads.)
fn tampering_proxy(server: std::net::SocketAddr, target: usize) -> std::net::SocketAddr {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (client, _) = listener.accept().unwrap();
        let upstream = TcpStream::connect(server).unwrap();
        let (mut c_in, mut u_out) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut c_in, &mut u_out);
            let _ = u_out.shutdown(std::net::Shutdown::Write);
        });
        let (mut u_in, mut c_out) = (upstream, client);
        let mut big = 0;
        loop {
            let mut len = [0u8; 4];
            if u_in.read_exact(&mut len).is_err() {
                break;
            }
            let n = u32::from_le_bytes(len) as usize;
            let mut body = vec![0u8; n];
            if u_in.read_exact(&mut body).is_err() {
                break;
            }
            if n == 4 + veil_core::wire::MAX_CHUNK_BYTES {
                big += 1;
                if big == target {
                    for b in &mut body[16..80] {
                        *b ^= 0xff;
                    }
                }
            }
            if c_out
                .write_all(&len)
                .and_then(|_| c_out.write_all(&body))
                .is_err()
            {
                break;
            }
        }
        let _ = c_out.shutdown(std::net::Shutdown::Write);
    });
    addr
}

#[test]
fn an_altered_result_ciphertext_is_caught_and_its_batch_never_used() {
    let (dir, bytes, server, options) = serve_random("tamper", 9);
    let lin = LinearWeights::parse(&bytes).unwrap();
    let fingerprint = server.weights.fingerprint();
    // Early (the first layer's results) and late (the LM head's: ciphertexts 577..=876).
    for target in [3, 700] {
        let path = dir.join(format!("tampered-{target}.pool"));
        let mut pool = PoolSource::create_or_open(&path, &CFG, &fingerprint, |key, sink| {
            ProjectionStream::from_weights(key, &lin, sink)
        })
        .unwrap();
        let proxy = tampering_proxy(server.addr, target);
        let mut conn = Connection::connect(&proxy.to_string(), &options).unwrap();
        let err = precompute_through(&mut conn, &mut pool, &CFG, 4, &mut |_, _| {})
            .expect_err("an altered result must not pass");
        let text = err.to_string();
        assert!(
            matches!(err, veil_client::offline::OfflineError::CheckFailed { .. }),
            "{text}"
        );
        assert!(
            text.contains("integrity check") && text.contains("discarded"),
            "{text}"
        );
        assert_eq!(pool.filled(), 0, "no slot of the batch is usable");
        assert_eq!(pool.remaining(), 0);
        drop(pool);
        // Reopened, the pool still has no usable slot.
        let pool = PoolSource::open(&path, &CFG, &fingerprint).unwrap();
        assert_eq!(pool.filled(), 0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The acceptance path on the golden model: a device directory without `linear.veil` (only
/// client.veil, tokenizer, manifest) precomputes through the server (`precompute --server`,
/// which streams the server's weights once for the check data) and then generates privately,
/// greedy and sampled: the tokens equal `--reference` run with the full weights.
#[test]
fn a_device_without_linear_weights_precomputes_through_the_server_and_generates() {
    let dir = temp_dir("device");
    let full = common::golden_model(&dir);
    device_precomputes_through_the_server_and_generates(&dir, &full);
}

/// The same for the LLaMA family (golden tiny-llama): the server-assisted offline phase fills
/// the pool by the family's layer widths alone, and the private tokens equal the reference's.
#[test]
fn a_llama_device_without_linear_weights_precomputes_through_the_server_and_generates() {
    let dir = temp_dir("device-llama");
    let full = common::golden_llama_model(&dir);
    device_precomputes_through_the_server_and_generates(&dir, &full);
}

fn device_precomputes_through_the_server_and_generates(
    dir: &std::path::Path,
    full: &std::path::Path,
) {
    let full = full.to_path_buf();
    let device = dir.join("device");
    std::fs::create_dir_all(&device).unwrap();
    for f in ["client.veil", "tokenizer.json", "manifest.json"] {
        std::fs::copy(full.join(f), device.join(f)).unwrap();
    }
    let server = common::start_server(&full, ServerConfig::default());
    let bin = env!("CARGO_BIN_EXE_veil-client");
    let pool = device.join("masks.pool");
    let out = std::process::Command::new(bin)
        .args(["precompute", "--weights"])
        .arg(&device)
        .arg("--pool")
        .arg(&pool)
        .args(["--tokens", "48", "--server", &server.addr.to_string()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("48 unused slots"), "{stderr}");
    assert!(!device.join("linear.veil").exists());
    let run = |dir: &std::path::Path, extra: &[&str]| -> Vec<u64> {
        let out = std::process::Command::new(bin)
            .arg("--weights")
            .arg(dir)
            .args([
                "--prompt",
                "The history of the",
                "--max-new-tokens",
                "16",
                "--json",
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        serde_json::from_value(v["tokens"].clone()).unwrap()
    };
    let addr = server.addr.to_string();
    let private = ["--server", &addr, "--mask-source", "pool", "--pool"];
    let pool_s = pool.to_string_lossy().into_owned();
    for sampling in [
        &[][..],
        &["--temperature", "0.8", "--top-k", "40", "--seed", "3"][..],
    ] {
        let want = run(&full, &[&["--reference"][..], sampling].concat());
        let got = run(
            &device,
            &[&private[..], &[pool_s.as_str()], sampling].concat(),
        );
        assert_eq!(got.len(), 16);
        assert_eq!(got, want, "sampling {sampling:?}");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// `client.veil` for `CFG` paired with `linear.veil` of `fingerprint`: a valid header, zero
/// weights (precomputing reads only the shape and the pairing).
fn zero_client_file(fingerprint: [u8; 32]) -> Vec<u8> {
    let mut bytes = vec![0u8; ClientLayout::new(&CFG).total_len];
    let mut h = [0u8; HEADER_LEN];
    let header = ClientHeader {
        config: CFG,
        ln_eps_q32: 42950,
        eos_token_id: 0,
        linear_fingerprint: fingerprint,
        rope: veil_core::rope::RopeConfig::NONE,
        bos_token_id: None,
    };
    encode_client_header(&header, &mut h);
    bytes[..HEADER_LEN].copy_from_slice(&h);
    bytes
}

/// `veil-client precompute --json`, through the server and locally: one JSON object on stdout
/// with the run's work (what `veil-client bench` reads for its `pool_server` mode).
#[test]
fn precompute_json_reports_the_work_of_the_run() {
    let dir = temp_dir("json");
    let bytes = random_linear(9);
    std::fs::write(dir.join("linear.veil"), &bytes).unwrap();
    let server = common::start_server(&dir, ServerConfig::default());
    std::fs::write(
        dir.join("client.veil"),
        zero_client_file(server.weights.fingerprint()),
    )
    .unwrap();
    let run = |pool: &str, extra: &[&str]| -> serde_json::Value {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_veil-client"))
            .arg("precompute")
            .arg("--weights")
            .arg(&dir)
            .arg("--pool")
            .arg(dir.join(pool))
            .args(["--tokens", "3", "--json"])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "precompute failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let inputs: u64 = CFG.linears().map(|l| l.dims(&CFG).0 as u64).sum();
    let outputs: u64 = CFG.linears().map(|l| l.dims(&CFG).1 as u64).sum();

    let v = run("server.pool", &["--server", &server.addr.to_string()]);
    assert_eq!(v["source"], "server", "{v:#}");
    assert_eq!(v["slots"], 3, "{v:#}");
    assert_eq!(v["batches"], 1, "{v:#}");
    assert_eq!(v["input_ciphertexts"], inputs, "{v:#}");
    assert_eq!(v["output_ciphertexts"], outputs, "{v:#}");
    // 32 KiB up per input ciphertext (and a little framing); results down.
    assert!(v["bytes_up"].as_u64().unwrap() >= inputs * 32768, "{v:#}");
    assert!(v["bytes_down"].as_u64().unwrap() > 0, "{v:#}");
    for k in ["wall_ms", "cpu_ms"] {
        assert!(v[k].as_f64().unwrap() > 0.0, "{k}: {v:#}");
    }

    let v = run("local.pool", &[]);
    assert_eq!(v["source"], "local", "{v:#}");
    assert_eq!(v["slots"], 3, "{v:#}");
    for k in [
        "batches",
        "input_ciphertexts",
        "output_ciphertexts",
        "bytes_up",
        "bytes_down",
    ] {
        assert_eq!(v[k], 0, "{k}: {v:#}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A device without `linear.veil` takes the server's copy only if it is the file its
/// `client.veil` names: an altered download is refused and no pool is created.
#[test]
fn altered_weights_from_the_server_are_refused_and_no_pool_is_made() {
    let (dir, bytes, server, options) = serve_random("weights", 3);
    let fingerprint = server.weights.fingerprint();
    // Honest: the projections equal those made from the weights in memory.
    let honest = dir.join("honest.pool");
    let mut conn = Connection::connect(&server.addr.to_string(), &options).unwrap();
    PoolSource::create_or_open(&honest, &CFG, &fingerprint, |key, sink| {
        download_projections(&mut conn, key, &CFG, &fingerprint, sink, &mut |_, _| {})
    })
    .unwrap();
    let pool = PoolSource::open(&honest, &CFG, &fingerprint).unwrap();
    let lin = LinearWeights::parse(&bytes).unwrap();
    let local = dir.join("local.pool");
    let key = pool.check_key();
    // The same key's projections from memory, written through a sink of another pool file.
    let mut want = Vec::new();
    let mut got = Vec::new();
    PoolSource::create_or_open(&local, &CFG, &fingerprint, |_, sink| {
        ProjectionStream::from_weights(&key, &lin, sink)
    })
    .unwrap();
    let other = PoolSource::open(&local, &CFG, &fingerprint).unwrap();
    for linear in CFG.linears() {
        let n = linear.dims(&CFG).0 * veil_core::rlwe::check::OFFLINE_CHECKS;
        let (mut a, mut b) = (vec![0u32; n], vec![0u32; n]);
        pool.read_offline_projection(linear, &mut a).unwrap();
        other.read_offline_projection(linear, &mut b).unwrap();
        got.extend(a);
        want.extend(b);
    }
    assert_eq!(
        got, want,
        "downloaded and local weights give the same check data"
    );
    assert_eq!(
        pool.verification().unwrap().w,
        other.verification().unwrap().w
    );
    // Altered on the way (the first full chunk of the download).
    let path = dir.join("altered.pool");
    let proxy = tampering_proxy(server.addr, 1);
    let mut conn = Connection::connect(&proxy.to_string(), &options).unwrap();
    let err = PoolSource::create_or_open(&path, &CFG, &fingerprint, |key, sink| {
        download_projections(&mut conn, key, &CFG, &fingerprint, sink, &mut |_, _| {})
    })
    .expect_err("altered weights must be refused");
    assert!(matches!(err, OfflineError::WeightsMismatch { .. }), "{err}");
    assert!(
        err.to_string().contains("does not match the fingerprint"),
        "{err}"
    );
    assert!(!path.exists() && !path.with_extension("tmp").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// A server over its offline budget refuses the layer, and the client says so (not "connection
/// reset"), however much of the layer's upload the server had not read yet.
#[test]
fn a_refused_offline_layer_is_reported_as_the_servers_refusal() {
    let dir = temp_dir("refused");
    let bytes = random_linear(8);
    std::fs::write(dir.join("linear.veil"), &bytes).unwrap();
    let lin = LinearWeights::parse(&bytes).unwrap();
    // Budget for the layers before the first MLP down-projection: that one is refused at its
    // header, and the client has its 128 input ciphertexts (4 MiB) to send when the refusal comes.
    let before: u64 = CFG
        .linears()
        .take_while(|l| l.kind != veil_core::model::LinearKind::MlpDown)
        .map(|l| l.dims(&CFG).0 as u64)
        .sum();
    let config = ServerConfig {
        offline_inputs: before,
        ..ServerConfig::default()
    };
    let server = common::start_server(&dir, config);
    let options = ConnectOptions {
        settings: ClientSettings {
            fingerprint: server.weights.fingerprint(),
            psk: None,
        },
        timeout: Duration::from_secs(30),
    };
    let path = dir.join("refused.pool");
    let fingerprint = server.weights.fingerprint();
    let mut pool = PoolSource::create_or_open(&path, &CFG, &fingerprint, |key, sink| {
        ProjectionStream::from_weights(key, &lin, sink)
    })
    .unwrap();
    for _ in 0..5 {
        let mut conn = Connection::connect(&server.addr.to_string(), &options).unwrap();
        let err = precompute_through(&mut conn, &mut pool, &CFG, 2, &mut |_, _| {}).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("refused"), "{text}");
        assert_eq!(pool.filled(), 0, "nothing of a refused batch is usable");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
