//! A mask pool survives a client crash at any point without reusing a slot: clients are killed
//! (SIGKILL) at random moments mid-generation, restarted on the same pool, and every masked row the
//! server ever received is checked against every other row of the same layer for a shared mask.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{golden_model, start_server};
use veil_core::wire::{decode_body, Message};
use veil_server::ServerConfig;

/// Masked rows seen by the server, per layer (flat index, row words).
type Seen = Arc<Mutex<Vec<(u32, Vec<u32>)>>>;

/// A proxy in front of `server` that records every masked row clients send.
fn recording_proxy(
    server: SocketAddr,
    cfg: veil_core::model::ModelConfig,
    seen: Seen,
) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(upstream) = TcpStream::connect(server) else {
                continue;
            };
            let seen = seen.clone();
            let (mut u_read, mut c_write) =
                (upstream.try_clone().unwrap(), client.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u_read, &mut c_write);
            });
            std::thread::spawn(move || {
                let (mut c_read, mut u_write) = (client, upstream);
                let mut current: Option<(u32, usize)> = None;
                let mut pending: Vec<u32> = Vec::new();
                loop {
                    let mut prefix = [0u8; 4];
                    if c_read.read_exact(&mut prefix).is_err() {
                        break;
                    }
                    let mut body = vec![0u8; u32::from_le_bytes(prefix) as usize];
                    if c_read.read_exact(&mut body).is_err() {
                        break;
                    }
                    match decode_body(&body) {
                        Ok(Message::Compute { linear, .. }) => {
                            current = Some((linear.flat_index(&cfg), linear.dims(&cfg).0));
                            pending.clear();
                        }
                        Ok(Message::Data { words }) => {
                            pending.extend(words.iter());
                            if let Some((id, in_dim)) = current {
                                while pending.len() >= in_dim {
                                    let row: Vec<u32> = pending.drain(..in_dim).collect();
                                    seen.lock().unwrap().push((id, row));
                                }
                            }
                        }
                        _ => {}
                    }
                    if u_write
                        .write_all(&prefix)
                        .and_then(|_| u_write.write_all(&body))
                        .is_err()
                    {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn next_slot(pool: &Path) -> u64 {
    let bytes = std::fs::read(pool).unwrap();
    u64::from_le_bytes(bytes[88..96].try_into().unwrap())
}

#[test]
fn killed_clients_never_reuse_a_pool_slot() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let files = veil_client::files::ModelFiles::open(&dir, false).unwrap();
    let cfg = *files.client().unwrap().config();
    let server = start_server(&dir, ServerConfig::default());
    let seen: Seen = Arc::default();
    let proxy = recording_proxy(server.addr, cfg, seen.clone());

    let bin = env!("CARGO_BIN_EXE_veil-client");
    let pool = tmp.path().join("crash.pool");
    let status = Command::new(bin)
        .args(["precompute", "--weights"])
        .arg(&dir)
        .arg("--pool")
        .arg(&pool)
        .args(["--tokens", "400"])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    // Kill once the server has received `kill_after_rows` more masked rows from this run: a crash
    // mid-generation, at a different point each time.
    let run = |kill_after_rows: Option<usize>| {
        let before = seen.lock().unwrap().len();
        let mut child = Command::new(bin)
            .arg("--weights")
            .arg(&dir)
            .args([
                "--server",
                &proxy.to_string(),
                "--mask-source",
                "pool",
                "--pool",
            ])
            .arg(&pool)
            .args([
                "--prompt",
                "The history of the Roman Empire",
                "--max-new-tokens",
                "40",
                "--json",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        match kill_after_rows {
            Some(k) => {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while seen.lock().unwrap().len() < before + k
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                let _ = child.kill(); // SIGKILL: no destructor, no flush, mid-whatever
                let _ = child.wait();
            }
            None => assert!(child.wait().unwrap().success()),
        }
    };
    let mut last = next_slot(&pool);
    let mut rng = 0x2545F4914F6CDD1Du64;
    for _ in 0..8 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        // A full run sends 9 rows per token and 6 prompt rows per layer: about 400 rows.
        run(Some(1 + (rng % 350) as usize));
        let now = next_slot(&pool);
        assert!(now >= last, "the pool's next-slot counter went backwards");
        last = now;
    }
    run(None);
    std::thread::sleep(Duration::from_millis(200));

    // Two rows masked with the same (slot, layer) would differ by an int8 row: every word of the
    // difference within [-254, 254]. Fresh masks make that astronomically unlikely.
    let seen = seen.lock().unwrap();
    assert!(seen.len() > 100, "only {} masked rows recorded", seen.len());
    for (i, (la, a)) in seen.iter().enumerate() {
        for (lb, b) in &seen[i + 1..] {
            if la != lb {
                continue;
            }
            let near = |(x, y): &(&u32, &u32)| (x.wrapping_sub(**y) as i32).unsigned_abs() <= 254;
            // Fast filter on the first 16 words (a shared mask makes all of them near), then all.
            if a.iter().zip(b).take(16).filter(near).count() < 8 {
                continue;
            }
            let close = a.iter().zip(b).filter(near).count();
            assert!(
                close < a.len() / 2,
                "two masked rows of layer {la} share a mask ({close} of {} words)",
                a.len()
            );
        }
    }
    println!(
        "{} masked rows from 9 runs (8 killed), no mask shared; pool next slot {last}",
        seen.len()
    );
}
