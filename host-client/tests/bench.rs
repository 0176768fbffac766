//! `veil-client bench` end to end, over real processes: a quantized golden-tiny model, a
//! `veil-server` child, the client as a child in every mode; all modes generate the same tokens,
//! the private modes make 4 round trips per block + 1 per decoded token, and peak RSS is measured.
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

#[test]
fn bench_golden_tiny_all_modes_agree() {
    let tiny = shared().join("golden/tiny");
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
    quantize_dir(&tiny, &model);
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
}
