//! `veil-client bench` end to end, over real processes: a quantized golden-tiny model, a
//! `veil-server` child, the client as a child in every mode; all modes generate the same tokens,
//! the private modes make 4 round trips per block + 1 per decoded token, and peak RSS is measured;
//! through the link emulator (`--link-rtt-ms`, `--link-mbit`) every decoded token waits its round
//! trips and the traffic the link carried matches the client's.
//! The `pool_server` mode (a pool the server fills blind, about a minute here) is skipped by the
//! default test and checked by an ignored one; `tests/offline.rs` runs `precompute --server
//! --json` itself on a small random model.
//!
//! The server binary is not visible to this crate's tests through `CARGO_BIN_EXE_*` (it belongs to
//! another package), so it is taken from the same target directory as the client binary:
//! `cargo test --workspace` builds it (veil-server has integration tests of its own, so its binary
//! is built); with `cargo test -p veil-client`, build it first with `cargo build -p veil-server`
//! (same profile).

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{quantize_dir, shared};

/// Runs `veil-client bench` on golden tiny (8 prompt + 8 new tokens) with `extra` arguments and
/// returns its JSON object, checked against the `--out` copy and for what every run must show.
fn bench_golden_tiny(extra: &[&str]) -> serde_json::Value {
    bench_two_block_model(&shared().join("golden/tiny"), extra)
}

/// [`bench_golden_tiny`] for any two-block checkpoint directory `tiny` (quantized first).
fn bench_two_block_model(tiny: &std::path::Path, extra: &[&str]) -> serde_json::Value {
    let client = PathBuf::from(env!("CARGO_BIN_EXE_veil-client"));
    let server = client
        .parent()
        .unwrap()
        .join(format!("veil-server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        server.is_file(),
        "{} is missing: run `cargo test --workspace` (which builds it) or `cargo build -p \
         veil-server` in the same profile first",
        server.display()
    );
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    quantize_dir(tiny, &model);
    let out_file = tmp.path().join("bench.json");
    let out = Command::new(&client)
        .arg("bench")
        .arg("--weights")
        .arg(&model)
        .arg("--server-bin")
        .arg(&server)
        .args(["--prompt-tokens", "8", "--new-tokens", "8"])
        .arg("--pool-dir")
        .arg(tmp.path().join("pool"))
        .arg("--out")
        .arg(&out_file)
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "bench failed: {}\nstdout:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out_file).unwrap()).unwrap();
    assert_eq!(v, written, "--out holds the printed object");

    assert_eq!(v["tokens_identical"], true, "{v:#}");
    assert_eq!(v["prompt_tokens"], 8);
    assert_eq!(v["model"]["n_layer"], 2);
    for mode in ["reference", "online", "pool"] {
        let m = &v["modes"][mode];
        assert_eq!(m["prompt_tokens"], 8, "{mode}: {m:#}");
        assert!(m["peak_rss_kib"].as_i64().unwrap() > 0, "{mode}: {m:#}");
        assert!(
            m["generated_tokens"].as_u64().unwrap() >= 2,
            "{mode}: {m:#}"
        );
    }
    // Two blocks: 4 linear layers each, plus the LM head where it is offloaded (the default: the
    // pool source offloads it, the online source computes it locally).
    for (mode, trips) in [
        ("online", 8.0),
        ("online_no_verify", 8.0),
        ("pool", 9.0),
        ("pool_no_verify", 9.0),
    ] {
        let m = &v["modes"][mode];
        assert_eq!(
            m["round_trips_per_token"].as_f64(),
            Some(trips),
            "{mode}: {m:#}"
        );
    }
    assert_eq!(v["modes"]["reference"]["round_trips"], 0);
    // The floor under every child's peak RSS (see bench.rs).
    assert!(v["driver_peak_rss_kib"].as_i64().unwrap() > 0, "{v:#}");
    assert!(
        v["modes"]["pool"]["precompute_ms_per_token"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    for r in [
        "pool_cpu_vs_reference",
        "online_cpu_vs_reference",
        "precompute_cpu_vs_reference_cpu",
        "precompute_wall_vs_reference_cpu",
    ] {
        assert!(v["ratios"].get(r).is_some(), "ratio {r} missing: {v:#}");
    }
    for mode in ["online", "pool"] {
        assert!(
            v["verification_cost_cpu_ms_per_token"][mode].is_number(),
            "verification cost of {mode} missing: {v:#}"
        );
    }
    // Client and server stand for two machines: on two or more CPUs they never share one.
    let online_cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if online_cpus >= 2 && cfg!(target_os = "linux") {
        let client: Vec<u64> = serde_json::from_value(v["client"]["cpus"].clone()).unwrap();
        let server: Vec<u64> = serde_json::from_value(v["server_cpus"].clone()).unwrap();
        assert_eq!(client.len(), 1, "{v:#}");
        assert!(!server.is_empty() && !server.contains(&client[0]), "{v:#}");
    }
    v
}

#[test]
fn bench_golden_tiny_all_modes_agree() {
    // The server-filled pool costs a whole RLWE batch, about a minute here (the LM head's 50257
    // result ciphertexts): it has a test of its own below, ignored by default.
    let v = bench_golden_tiny(&["--no-server-precompute"]);
    assert!(v["modes"].get("pool_server").is_none(), "{v:#}");
    assert!(v["ratios"]["server_precompute_cpu_vs_reference_cpu"].is_null());
    assert_eq!(v["input_terms_per_slot"], 2 * (128 + 128 + 128 + 512) + 128);
    assert_eq!(
        v["output_terms_per_slot"],
        2 * (384 + 128 + 512 + 128) + 50257
    );
}

#[test]
fn bench_works_for_the_llama_family() {
    // Golden tiny-llama: 2 blocks, d = 128, 4 query and 2 KV heads of 32, inner 352, its own
    // 8192-token vocabulary and LM head.
    let v = bench_two_block_model(
        &shared().join("golden/tiny-llama"),
        &["--no-server-precompute"],
    );
    assert_eq!(v["model"]["family"], "llama", "{v:#}");
    assert_eq!(v["model"]["n_kv_head"], 2, "{v:#}");
    assert_eq!(v["input_terms_per_slot"], 2 * (128 + 128 + 128 + 352) + 128);
    // q|k|v is 128 + 2 · 64 wide, gate|up 2 · 352.
    assert_eq!(
        v["output_terms_per_slot"],
        2 * (256 + 128 + 704 + 128) + 8192
    );
}

#[test]
fn bench_through_an_emulated_link_is_delayed_and_agrees() {
    const RTT_MS: f64 = 5.0;
    let v = bench_golden_tiny(&[
        "--no-server-precompute",
        "--link-rtt-ms",
        "5",
        "--link-mbit",
        "200",
    ]);
    assert_eq!(v["link"]["rtt_ms"], RTT_MS, "{v:#}");
    assert_eq!(v["link"]["mbit"], 200.0, "{v:#}");
    for mode in ["online", "online_no_verify", "pool", "pool_no_verify"] {
        let m = &v["modes"][mode];
        let d = &v["decode_per_token"][mode];
        // Each decoded token's round trips wait one RTT each through the link.
        let trips = d["round_trips"].as_f64().unwrap();
        assert!(
            d["decode_ms"].as_f64().unwrap() >= trips * RTT_MS,
            "{mode}: {d:#}"
        );
        assert_eq!(d["bytes_up"], m["bytes_up_per_token"], "{mode}");
        assert!(
            d["round_trips_per_generated_token"].as_f64().unwrap() > trips,
            "{mode}: {d:#}"
        );
        // One connection, all of it through the link: the client's figures stop before its
        // bye, which the link may or may not have delivered when the process exits.
        assert_eq!(m["link_connections"], 1, "{mode}: {m:#}");
        let client_up = m["bytes_up"].as_u64().unwrap();
        let link_up = m["link_bytes_up"].as_u64().unwrap();
        assert!(
            (client_up..=client_up + 64).contains(&link_up),
            "{mode}: {m:#}"
        );
        assert_eq!(m["link_bytes_down"], m["bytes_down"], "{mode}: {m:#}");
    }
    assert!(
        v["modes"]["reference"].get("link_bytes_up").is_none(),
        "{v:#}"
    );
}

/// The `pool_server` mode: about a minute of mostly server CPU on two cores (one batch of the
/// blind offline phase; see DEVELOPERS.md). Run it with `cargo test --release -p veil-client
/// --test bench -- --ignored`.
#[test]
#[ignore = "about a minute: one RLWE batch of golden tiny's offline phase, LM head included"]
fn bench_golden_tiny_server_filled_pool() {
    // `bench_golden_tiny` checked that its tokens equal the reference's (`tokens_identical`).
    let v = bench_golden_tiny(&[]);
    let ps = &v["modes"]["pool_server"];
    assert_eq!(ps["prompt_tokens"], 8, "{ps:#}");
    assert!(ps["generated_tokens"].as_u64().unwrap() >= 2, "{ps:#}");
    assert!(ps["peak_rss_kib"].as_i64().unwrap() > 0, "{ps:#}");
    // Generation from it offloads the LM head as from the local pool.
    assert_eq!(ps["round_trips_per_token"].as_f64(), Some(9.0), "{ps:#}");
    // One batch for 8 + 8 + 8 slots, every cost positive; each slot's ciphertexts are one per
    // input and one per output of every layer (2 blocks of 128 wide, MLP 512, LM head 128 →
    // 50257).
    assert_eq!(ps["precompute_slots"], 24, "{ps:#}");
    assert_eq!(ps["precompute_batches"], 1, "{ps:#}");
    assert_eq!(ps["batch_slots"], 4096, "{ps:#}");
    assert_eq!(v["input_terms_per_slot"], 2 * (128 + 128 + 128 + 512) + 128);
    assert_eq!(
        v["output_terms_per_slot"],
        2 * (384 + 128 + 512 + 128) + 50257
    );
    let report = &ps["precompute_report"];
    assert_eq!(report["input_ciphertexts"], v["input_terms_per_slot"]);
    assert_eq!(report["output_ciphertexts"], v["output_terms_per_slot"]);
    let mut positive = vec![
        "precompute_ms_per_slot",
        "precompute_cpu_ms_per_slot",
        "precompute_peak_rss_kib",
        "precompute_bytes_up_per_slot",
        "precompute_bytes_down_per_slot",
    ];
    let mut positive_full = vec![
        "ms_per_slot",
        "cpu_ms_per_slot",
        "bytes_up_per_slot",
        "bytes_down_per_slot",
    ];
    // The server's CPU comes from /proc.
    if cfg!(target_os = "linux") {
        positive.push("precompute_server_cpu_ms_per_slot");
        positive_full.push("server_cpu_ms_per_slot");
    }
    for k in positive {
        assert!(ps[k].as_f64().is_some_and(|x| x > 0.0), "{k}: {ps:#}");
    }
    for k in positive_full {
        let x = ps["precompute_full_batch"][k].as_f64();
        assert!(x.is_some_and(|x| x > 0.0), "full batch {k}: {ps:#}");
    }
    assert!(
        v["ratios"]["server_precompute_cpu_vs_reference_cpu"]
            .as_f64()
            .is_some_and(|x| x > 0.0),
        "{v:#}"
    );
}
