//! The link emulator (`veil_client::link`): it really delays every round trip by its RTT, paces
//! bytes at its rate, and delivers them intact and in order, ends of stream included. A private
//! generation through it equals the local reference.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use common::{generate_online, golden_model, handshake, reference, start_server};
use veil_client::files::ModelFiles;
use veil_client::generate::GenOptions;
use veil_client::link::{Link, LinkParams};
use veil_core::model::SamplingParams;
use veil_server::ServerConfig;

const RTT_MS: u64 = 40;

#[test]
fn every_round_trip_through_the_link_takes_its_rtt_and_tokens_equal_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let files = ModelFiles::open(&dir, true).unwrap();
    let server = start_server(&dir, ServerConfig::default());
    let link = Link::start(server.addr, LinkParams::new(RTT_MS as f64, None).unwrap()).unwrap();
    let o = GenOptions {
        max_new_tokens: 4,
        sampling: SamplingParams::GREEDY,
        seed: 0,
        eos: vec![],
        prefill_rows: 64,
        speculation: None,
    };
    let prompt = [464, 3298, 4258, 1487, 318];

    let t0 = Instant::now();
    let conn = handshake(link.addr(), &files, None).unwrap();
    let (tokens, stats, conn) = generate_online(&files, conn, 7, &prompt, &o);
    let elapsed = t0.elapsed();
    let through = link.stats();
    conn.bye();

    assert_eq!(
        tokens,
        reference(&files, &prompt, &o),
        "tokens through the link"
    );
    // Hello, then 4 layers × 2 blocks + the LM head for the prompt and for each of 3 decoded
    // tokens: every exchange waits for the one before, so none can beat the link's RTT.
    let trips = stats.wire.round_trips;
    assert_eq!(trips, 1 + 4 * 9, "{stats:?}");
    let floor = Duration::from_millis(RTT_MS * trips);
    assert!(
        elapsed >= floor,
        "{trips} round trips in {elapsed:?}, under {floor:?}: the link did not delay them"
    );
    // Everything the client sent reached the server and everything the server sent reached the
    // client, byte for byte (the client counts frame prefixes too).
    assert_eq!(
        through.bytes_up, stats.wire.bytes_up,
        "{through:?} {stats:?}"
    );
    assert_eq!(
        through.bytes_down, stats.wire.bytes_down,
        "{through:?} {stats:?}"
    );
    assert_eq!(through.connections, 1);
    println!(
        "link: {trips} round trips at {RTT_MS} ms RTT in {elapsed:.2?} (floor {floor:?}), \
         decode {:.1} ms per token",
        stats.decode_ms_per_token
    );
}

/// An upstream that echoes each connection until its end of stream, then closes.
fn echo_server() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                let _ = std::io::copy(&mut s, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn the_link_paces_bytes_at_its_rate_and_keeps_them_in_order() {
    const BYTES: usize = 250_000;
    const MBIT: f64 = 8.0; // 1 MB/s: 250 ms for the payload each way
    const RTT: Duration = Duration::from_millis(20);
    let link = Link::start(
        echo_server(),
        LinkParams::new(RTT.as_secs_f64() * 1e3, Some(MBIT)).unwrap(),
    )
    .unwrap();
    // Bytes no reordering or duplication could leave unchanged.
    let sent: Vec<u8> = (0..BYTES as u64)
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
        .collect();

    let t0 = Instant::now();
    let mut s = TcpStream::connect(link.addr()).unwrap();
    let mut r = s.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        r.read_to_end(&mut got).unwrap();
        got
    });
    // Small writes, as a chatty sender would make: pacing must not depend on how they come.
    for piece in sent.chunks(997) {
        s.write_all(piece).unwrap();
    }
    s.shutdown(Shutdown::Write).unwrap();
    let got = reader.join().unwrap();
    let elapsed = t0.elapsed();

    assert!(
        got == sent,
        "{} bytes back, not the {BYTES} sent",
        got.len()
    );
    // Up and down overlap (the echo sends back as it receives), so the whole exchange takes one
    // payload's time at the rate plus one RTT, at least.
    let floor = Duration::from_secs_f64(BYTES as f64 * 8.0 / (MBIT * 1e6)) + RTT;
    assert!(elapsed >= floor, "{elapsed:?} under {floor:?}: not paced");
    // And not grossly slower: the pacing keeps to its schedule rather than adding up wake-ups.
    assert!(elapsed < 4 * floor, "{elapsed:?}, over 4 × {floor:?}");
    let st = link.stats();
    assert_eq!((st.bytes_up, st.bytes_down), (BYTES as u64, BYTES as u64));
    println!("link: {BYTES} bytes echoed at {MBIT} Mbit/s, {RTT:?} RTT in {elapsed:.2?} (floor {floor:?})");
}
