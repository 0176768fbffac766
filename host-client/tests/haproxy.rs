//! Scale-out: two `veil-server` processes behind HAProxy in TCP mode, configured from the
//! repository's `deploy/haproxy.cfg` (its addresses replaced by free loopback ports, its stats
//! socket moved to a temporary directory). 16 clients generate 32 tokens each at once through
//! the balancer; every output equals the local reference, and both servers served clients (by
//! HAProxy's session counters and by the servers' own logs, which agree).
//!
//! Needs `haproxy` on PATH (`apt-get install -y haproxy`; `.ci/run` installs it): without it the
//! test says so loudly and passes without checking anything. It installs nothing itself. The
//! server binary comes from the same target directory as the client's, as in `tests/bench.rs`:
//! with `cargo test -p veil-client`, build it first with `cargo build -p veil-server` (same
//! profile).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{connect, generate_online, golden_model, reference, shared, PROMPTS};
use veil_client::files::ModelFiles;
use veil_client::generate::GenOptions;
use veil_core::model::SamplingParams;

const CLIENTS: usize = PROMPTS.len();
const TOKENS: usize = 32;

/// The repository's configuration.
fn repo_config() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/haproxy.cfg")
}

/// `haproxy` on PATH, if any.
fn haproxy_bin() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("haproxy"))
        .find(|p| p.is_file())
}

/// Says on the terminal that a test passed without checking anything. Straight to stderr: the
/// test harness captures `eprintln!` and shows it only for failures, which a skip is not.
fn skip_loudly(what: &str) {
    let _ = writeln!(
        std::io::stderr(),
        "\n!!!!!!!!!! SKIPPED (haproxy.rs): `haproxy` is not on PATH, so {what}. Install it \
         (apt-get install -y haproxy) and run again. !!!!!!!!!!\n"
    );
}

/// A free loopback port (free when asked; nothing else here binds ports meanwhile).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// A child process killed and reaped on drop, its stderr collected.
struct Proc {
    name: &'static str,
    child: Child,
    log: Arc<Mutex<Vec<u8>>>,
}

impl Proc {
    fn spawn(name: &'static str, mut cmd: Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut err = child.stderr.take().unwrap();
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Proc { name, child, log }
    }

    fn log(&self) -> String {
        String::from_utf8_lossy(&self.log.lock().unwrap()).into_owned()
    }

    /// Waits until `ready` holds, failing with the log if the process exits or time runs out.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ready() {
            if let Some(status) = self.child.try_wait().unwrap() {
                std::thread::sleep(Duration::from_millis(100)); // let the log thread catch up
                panic!(
                    "{} exited ({status}) before {what}:\n{}",
                    self.name,
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "{}: not {what} within 60 s:\n{}",
                self.name,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `veil-server` child on `addr`, accepting connections.
fn veil_server(bin: &Path, weights: &Path, addr: SocketAddr) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.arg("--weights")
        .arg(weights)
        .arg("--listen")
        .arg(addr.to_string());
    let mut p = Proc::spawn("veil-server", cmd);
    p.wait_until("accepting connections", || TcpStream::connect(addr).is_ok());
    p
}

/// The repository's configuration with `from` replaced by `to` for each pair; each `from` must
/// be there exactly once, so an edit of the file that this test no longer understands fails
/// here rather than silently testing something else.
fn derive_config(text: &str, swaps: &[(&str, String)]) -> String {
    let mut out = text.to_owned();
    for (from, to) in swaps {
        assert_eq!(
            out.matches(from).count(),
            1,
            "deploy/haproxy.cfg should hold `{from}` exactly once"
        );
        out = out.replace(from, to);
    }
    out
}

/// HAProxy's `show stat` over its stats socket: one map of column to value per proxy/server row.
fn show_stat(socket: &Path) -> Option<Vec<std::collections::HashMap<String, String>>> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.write_all(b"show stat\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()?
        .strip_prefix("# ")?
        .split(',')
        .map(str::to_owned)
        .collect();
    Some(
        lines
            .filter(|l| !l.is_empty())
            .map(|l| {
                header
                    .iter()
                    .cloned()
                    .zip(l.split(',').map(str::to_owned))
                    .collect()
            })
            .collect(),
    )
}

/// A column of the `veil` backend's row for `server`.
fn server_stat(socket: &Path, server: &str, column: &str) -> Option<String> {
    show_stat(socket)?
        .into_iter()
        .find(|r| {
            r.get("pxname").map(String::as_str) == Some("veil")
                && r.get("svname").map(String::as_str) == Some(server)
        })?
        .get(column)
        .cloned()
}

#[test]
fn sixteen_clients_through_haproxy_use_both_servers_and_equal_the_reference() {
    let Some(haproxy) = haproxy_bin() else {
        return skip_loudly("the scale-out test checked nothing");
    };
    let client_bin = PathBuf::from(env!("CARGO_BIN_EXE_veil-client"));
    let server_bin = client_bin
        .parent()
        .unwrap()
        .join(format!("veil-server{}", std::env::consts::EXE_SUFFIX));
    assert!(
        server_bin.is_file(),
        "{} is missing: run `cargo build -p veil-server` in the same profile first",
        server_bin.display()
    );
    let _ = shared();
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());

    let addrs = [free_addr(), free_addr()];
    let servers: Vec<Proc> = addrs
        .iter()
        .map(|a| veil_server(&server_bin, &dir, *a))
        .collect();

    let front = free_addr();
    let socket = tmp.path().join("haproxy.sock");
    let text = std::fs::read_to_string(repo_config()).unwrap();
    let config = derive_config(
        &text,
        &[
            ("bind 127.0.0.1:7700", format!("bind {front}")),
            ("127.0.0.1:7701", addrs[0].to_string()),
            ("127.0.0.1:7702", addrs[1].to_string()),
            (
                "stats socket /run/haproxy/veil.sock",
                format!("stats socket {}", socket.display()),
            ),
        ],
    );
    let cfg_path = tmp.path().join("haproxy.cfg");
    std::fs::write(&cfg_path, config).unwrap();
    let mut cmd = Command::new(&haproxy);
    cmd.arg("-db").arg("-f").arg(&cfg_path);
    let mut balancer = Proc::spawn("haproxy", cmd);
    // Ready when both servers show UP: waiting on the stats socket rather than probing the
    // frontend keeps every counted session a client's.
    balancer.wait_until("reporting both servers up", || {
        ["veil1", "veil2"]
            .iter()
            .all(|s| server_stat(&socket, s, "status").is_some_and(|st| st.starts_with("UP")))
    });

    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let opts = GenOptions {
        max_new_tokens: TOKENS,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        eos: vec![],
        prefill_rows: 64,
        speculation: None,
    };
    let started = Instant::now();
    let results: Vec<(Vec<u32>, Vec<u32>)> = std::thread::scope(|s| {
        let handles: Vec<_> = PROMPTS
            .iter()
            .enumerate()
            .map(|(i, text)| {
                let (dir, tok, opts) = (&dir, &tok, &opts);
                s.spawn(move || {
                    let prompt = tok.encode(*text, false).unwrap().get_ids().to_vec();
                    let files = ModelFiles::open(dir, true).unwrap();
                    let conn = connect(front, &files);
                    let (got, _, conn) =
                        generate_online(&files, conn, 0x60 + i as u8, &prompt, opts);
                    conn.bye();
                    (got, reference(&files, &prompt, opts))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    for (i, (got, want)) in results.iter().enumerate() {
        assert_eq!(want.len(), TOKENS, "client {i}: reference length");
        assert_eq!(got, want, "client {i} ({:?}) through HAProxy", PROMPTS[i]);
    }

    // Sessions HAProxy sent to each server (health checks are not sessions).
    let sessions: Vec<u64> = ["veil1", "veil2"]
        .iter()
        .map(|s| {
            server_stat(&socket, s, "stot")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no session count for {s}:\n{}", balancer.log()))
        })
        .collect();
    // What each server says it served to the end: clients that finished and said bye. The
    // server logs the line after the bye; give the last ones a moment.
    let byes = |p: &Proc| p.log().matches(": disconnected: said bye").count() as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while servers.iter().map(byes).sum::<u64>() < CLIENTS as u64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let served: Vec<u64> = servers.iter().map(byes).collect();
    println!(
        "haproxy: {CLIENTS} clients x {TOKENS} tokens in {elapsed:.1?}, all equal to the \
         reference; sessions per server (HAProxy) {sessions:?}, clients served per server \
         (server logs) {served:?}"
    );
    assert_eq!(sessions.iter().sum::<u64>(), CLIENTS as u64, "{sessions:?}");
    assert_eq!(
        served, sessions,
        "the servers' logs and HAProxy's counters disagree"
    );
    assert!(
        sessions.iter().all(|&n| n > 0),
        "one server took every client: {sessions:?}"
    );
}

#[test]
fn the_repository_config_is_valid() {
    let Some(haproxy) = haproxy_bin() else {
        return skip_loudly("deploy/haproxy.cfg was not checked");
    };
    let out = Command::new(haproxy)
        .arg("-c")
        .arg("-f")
        .arg(repo_config())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "haproxy -c refuses deploy/haproxy.cfg:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
