//! Private generation over real TCP against a real `veil-server` equals the local reference, bit
//! for bit: golden model, the golden tiny-llama (the LLaMA family) and a distilgpt2-size
//! synthetic model, greedy and seeded sampling, online and pool mask sources; several clients at once; slots never reused across client restarts.

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::Path;

use common::{
    connect, generate_online, golden_llama_model, golden_model, handshake, quantize_dir, reference,
    shared, splice_client, start_server,
};
use common::{generate_with, Recording};
use veil_client::files::ModelFiles;
use veil_client::generate::{GenError, GenOptions, PrivateGenerator, Verification};
use veil_client::pool::PoolSource;
use veil_client::transport::Connection;
use veil_core::mask::MaskKey;
use veil_core::model::SamplingParams;
use veil_core::session::OnlineUnmask;
use veil_server::ServerConfig;

fn opts(sampling: SamplingParams, n: usize) -> GenOptions {
    GenOptions {
        max_new_tokens: n,
        sampling,
        seed: 42,
        eos: vec![],
        prefill_rows: 64,
        speculation: None,
    }
}

fn online(
    files: &ModelFiles,
    addr: SocketAddr,
    prompt: &[u32],
    o: &GenOptions,
    key: u8,
) -> Vec<u32> {
    let conn = connect(addr, files);
    let linear = files.linear().unwrap().unwrap();
    let key = MaskKey::from_bytes([key; 32]);
    let verification = Verification::compute(&key, &linear);
    let mut src = OnlineUnmask::new(linear, key);
    let mut g = PrivateGenerator::new(files.client().unwrap(), conn).verify_with(verification);
    let (t, stats) = g.generate(&mut src, prompt, o, &mut |_| {}).unwrap();
    let conn = g.into_connection();
    let n_layer = files.client().unwrap().config().n_layer as f64;
    if o.max_new_tokens > 1 {
        assert_eq!(
            stats.round_trips_per_token,
            4.0 * n_layer + 1.0,
            "round trips per decoded token"
        );
    }
    conn.bye();
    t
}

fn pooled(
    files: &ModelFiles,
    addr: SocketAddr,
    pool: &Path,
    prompt: &[u32],
    o: &GenOptions,
) -> (Vec<u32>, Vec<(u64, u64)>) {
    let cfg = *files.client().unwrap().config();
    let pool = PoolSource::open(pool, &cfg, &files.fingerprint().unwrap()).unwrap();
    let conn = connect(addr, files);
    let verification = pool.verification().unwrap();
    let mut src = Recording::new(pool);
    let mut g = PrivateGenerator::new(files.client().unwrap(), conn).verify_with(verification);
    let (t, _) = g.generate(&mut src, prompt, o, &mut |_| {}).unwrap();
    g.into_connection().bye();
    src.inner.close().unwrap();
    (t, src.reserved)
}

fn check_model(dir: &Path, prompt: &[u32], n: usize) {
    let files = ModelFiles::open(dir, true).unwrap();
    let server = start_server(dir, ServerConfig::default());
    let sampled = SamplingParams {
        temperature_q16: 58982,
        top_k: 40,
        top_p_q16: 62259,
    };
    let pool = dir.join("masks.pool");
    let linear = files.linear().unwrap().unwrap();
    // Two full generations per sampling mode, plus one slot of slack.
    let need = 2 * (prompt.len() + n) as u64 + 1;
    PoolSource::precompute(
        &pool,
        &linear,
        &files.fingerprint().unwrap(),
        need,
        &mut |_, _| {},
    )
    .unwrap();
    let mut all_slots = vec![];
    for sampling in [SamplingParams::GREEDY, sampled] {
        let o = opts(sampling, n);
        let want = reference(&files, prompt, &o);
        assert_eq!(want.len(), n);
        assert_eq!(
            online(&files, server.addr, prompt, &o, 1),
            want,
            "online, {sampling:?}"
        );
        // A fresh PoolSource per run is a client restart on the same pool file.
        let (got, slots) = pooled(&files, server.addr, &pool, prompt, &o);
        assert_eq!(got, want, "pool, {sampling:?}");
        all_slots.extend(slots.into_iter().flat_map(|(first, n)| first..first + n));
    }
    let mut sorted = all_slots.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(
        sorted.len(),
        all_slots.len(),
        "a pool slot was used twice across client restarts"
    );
}

/// The pool claims slots ahead of use (one fsync per several tokens): a process that dies skips
/// the claimed rest, never reuses a slot below the durable counter; a clean close gives it back.
#[test]
fn pool_slots_claimed_ahead_are_skipped_after_a_crash_and_given_back_on_close() {
    use veil_core::session::UnmaskSource;
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let files = ModelFiles::open(&dir, true).unwrap();
    let cfg = *files.client().unwrap().config();
    let fp = files.fingerprint().unwrap();
    let pool = dir.join("masks.pool");
    let linear = files.linear().unwrap().unwrap();
    PoolSource::precompute(&pool, &linear, &fp, 40, &mut |_, _| {}).unwrap();
    let open = || PoolSource::open(&pool, &cfg, &fp).unwrap();

    let mut a = open();
    assert_eq!(a.reserve(3).unwrap(), 0);
    assert_eq!(a.reserve(2).unwrap(), 3);
    drop(a); // no close: as if killed
    let mut b = open();
    assert!(
        b.next_slot() >= 5,
        "a slot already handed out would be reused"
    );
    assert_eq!(b.next_slot(), 3 + 16, "the slots claimed ahead are skipped");
    assert_eq!(b.reserve(4).unwrap(), 19);
    b.close().unwrap();
    let mut c = open();
    assert_eq!(
        c.next_slot(),
        23,
        "close gives the unused claimed slots back"
    );
    // The claim never runs past the filled slots, and exhaustion is still an error.
    assert_eq!(c.reserve(17).unwrap(), 23);
    assert!(c.reserve(1).is_err());
    drop(c);
    assert_eq!(open().next_slot(), 40);
}

#[test]
fn private_equals_reference_on_golden_tiny() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let prompt = tok
        .encode("Global climate change is primarily caused by", false)
        .unwrap()
        .get_ids()
        .to_vec();
    check_model(&dir, &prompt, 16);
}

/// The LLaMA family (RMSNorm, RoPE with llama3 scaling, GQA 4/2, SwiGLU, untied head) through
/// the same private path: five offloaded layers per pass as for GPT-2, bit-identical tokens.
#[test]
fn private_equals_reference_on_golden_tiny_llama() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_llama_model(tmp.path());
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    // As transformers encodes a prompt: the tokenizer's post-processor adds BOS.
    let prompt = tok
        .encode("Global climate change is primarily caused by", true)
        .unwrap()
        .get_ids()
        .to_vec();
    let files = ModelFiles::open(&dir, true).unwrap();
    assert_eq!(
        prompt[0],
        files.client().unwrap().header().bos_token_id.unwrap()
    );
    check_model(&dir, &prompt, 16);
    // A prefill long enough that the fused gate|up reply (rows · 2·inner) outgrows both the
    // q|k|v reply and the logits: the session's buffers must be sized by the family's widths.
    let long = tok
        .encode(
            "The history of the Roman Empire is long . In 1998 , the band released their \
             first album , and the species is found in the north . He was born in the city",
            true,
        )
        .unwrap()
        .get_ids()
        .to_vec();
    assert!(long.len() * 2 * 352 > 8192, "{} tokens", long.len());
    check_model(&dir, &long, 4);
}

/// The family's other variant: q/k/v biases and a tied head (Qwen2-style), plain RoPE.
#[test]
fn private_equals_reference_on_synthetic_qwen2() {
    let tmp = tempfile::tempdir().unwrap();
    let hf = tmp.path().join("hf");
    let opts = veil_tools::synth::LlamaSynthOptions {
        preset: veil_tools::synth::LlamaPreset::TinyQwen2,
        seed: 9,
        tokenizer_from: Some(shared().join("golden/tiny-llama")),
        progress: false,
    };
    veil_tools::synth::write_llama_checkpoint(&hf, &opts).unwrap();
    let dir = tmp.path().join("q");
    quantize_dir(&hf, &dir);
    check_model(&dir, &[0, 464, 3290, 286, 262, 7993, 813, 373, 9], 6);
}

#[test]
fn private_equals_reference_on_synthetic_distilgpt2() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::synth_distilgpt2(tmp.path());
    check_model(&dir, &[464, 3290, 286, 262, 7993, 8065, 373, 9], 6);
}

#[test]
fn four_clients_at_once_get_their_own_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let prompts: [&[u32]; 4] = [
        &[464, 3290],
        &[1544, 373, 4642, 287],
        &[15496],
        &[464, 983, 373],
    ];
    std::thread::scope(|s| {
        let handles: Vec<_> = prompts
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let dir = dir.clone();
                s.spawn(move || {
                    let files = ModelFiles::open(&dir, true).unwrap();
                    let o = opts(SamplingParams::GREEDY, 12);
                    (
                        online(&files, server.addr, p, &o, i as u8 + 10),
                        reference(&files, p, &o),
                    )
                })
            })
            .collect();
        for h in handles {
            let (got, want) = h.join().unwrap();
            assert_eq!(got, want);
        }
    });
}

#[test]
fn server_with_other_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    quantize_dir(&shared().join("golden/tiny"), &a);
    // Same shape, one weight changed: a different fingerprint.
    let b = tmp.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    let mut lin = std::fs::read(a.join("linear.veil")).unwrap();
    let last = lin.len() - 1;
    lin[last] ^= 1;
    std::fs::write(b.join("linear.veil"), lin).unwrap();
    let server = start_server(&b, ServerConfig::default());
    let files = ModelFiles::open(&a, true).unwrap();
    let err = handshake(server.addr, &files, None).unwrap_err();
    assert!(
        matches!(
            err,
            veil_client::transport::TransportError::Server(
                veil_core::wire::ClientError::WeightsMismatch { .. }
            )
        ),
        "{err}"
    );
}

#[test]
fn traffic_per_token_is_constant_in_sequence_length() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let files = ModelFiles::open(&dir, true).unwrap();
    let cfg = *files.client().unwrap().config();
    let per_token = |n: usize| {
        let conn = connect(server.addr, &files);
        let o = opts(SamplingParams::GREEDY, n);
        let (_, s, _) = generate_online(&files, conn, 9, &[464, 3290], &o);
        (
            s.bytes_up_per_token,
            s.bytes_down_per_token,
            s.round_trips_per_token,
        )
    };
    let short = per_token(4);
    let long = per_token(120);
    assert_eq!(short, long, "per-token traffic grew with the sequence");
    // And it is what the shapes imply: 4 bytes per masked input word and per product word, plus
    // framing (a Compute or Result header and Data chunk headers, a few bytes each).
    let up_words: usize = cfg.linears().map(|id| id.dims(&cfg).0).sum();
    let down_words: usize = cfg.linears().map(|id| id.dims(&cfg).1).sum();
    assert!(
        short.0 >= 4.0 * up_words as f64 && short.0 < 4.0 * up_words as f64 * 1.01 + 200.0,
        "up {}",
        short.0
    );
    assert!(
        short.1 >= 4.0 * down_words as f64 && short.1 < 4.0 * down_words as f64 * 1.01 + 200.0,
        "down {}",
        short.1
    );
}

/// A TCP proxy between client and server that flips one bit of the server's `Data` payload bytes
/// at payload byte index `target` (counted over the whole connection), and counts payload bytes.
fn tamper_proxy(
    server: SocketAddr,
    target: Option<(u64, u8)>,
) -> (SocketAddr, std::thread::JoinHandle<u64>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (mut u_read, mut c_write) = splice_client(listener, server);
        let mut seen = 0u64;
        loop {
            let mut prefix = [0u8; 4];
            if u_read.read_exact(&mut prefix).is_err() {
                break;
            }
            let mut body = vec![0u8; u32::from_le_bytes(prefix) as usize];
            if u_read.read_exact(&mut body).is_err() {
                break;
            }
            let payload = match veil_core::wire::decode_body(&body) {
                Ok(veil_core::wire::Message::Data { words }) => words.0.len(),
                _ => 0,
            };
            if let Some((t, bit)) = target {
                if payload > 0 && t >= seen && t < seen + payload as u64 {
                    // The payload is the tail of a Data body.
                    let at = body.len() - payload + (t - seen) as usize;
                    body[at] ^= 1 << bit;
                }
            }
            seen += payload as u64;
            if c_write
                .write_all(&prefix)
                .and_then(|_| c_write.write_all(&body))
                .is_err()
            {
                break;
            }
        }
        seen
    });
    (addr, handle)
}

/// Issue acceptance: a proxy flipping one bit of one reply at a random point is detected every
/// time over 200 trials, and no token computed from an altered reply is ever emitted.
#[test]
fn tampered_replies_are_always_detected() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let files = ModelFiles::open(&dir, true).unwrap();
    let prompt = [464u32, 3290, 286];
    let o = opts(SamplingParams::GREEDY, 4);
    let want = reference(&files, &prompt, &o);
    let run = |target: Option<(u64, u8)>| {
        let (addr, proxy) = tamper_proxy(server.addr, target);
        let conn = connect(addr, &files);
        let linear = files.linear().unwrap().unwrap();
        let key = MaskKey::from_bytes([target.map_or(0, |t| t.0 as u8); 32]);
        let verification = Verification::compute(&key, &linear);
        let mut src = OnlineUnmask::new(linear, key);
        let mut emitted = vec![];
        let mut g = PrivateGenerator::new(files.client().unwrap(), conn).verify_with(verification);
        let result = g.generate(&mut src, &prompt, &o, &mut |t| emitted.push(t));
        drop(g);
        (result.map(|r| r.0), emitted, proxy.join().unwrap())
    };
    let (clean, _, payload_bytes) = run(None);
    assert_eq!(clean.unwrap(), want);
    let mut rng = 0x9E3779B97F4A7C15u64;
    for trial in 0..200 {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let target = (rng >> 11) % payload_bytes;
        let bit = (rng >> 3) as u8 % 8;
        let (result, emitted, _) = run(Some((target, bit)));
        match result {
            Err(GenError::Integrity { .. }) => {}
            other => panic!("trial {trial}: flipping bit {bit} of payload byte {target} was not detected: {other:?}"),
        }
        assert_eq!(
            emitted[..],
            want[..emitted.len()],
            "trial {trial}: an altered token was emitted"
        );
    }
}

/// A proxy that forwards `frames` server frames and then cuts the connection (a server that
/// vanishes mid-generation).
fn cutting_proxy(server: SocketAddr, frames: usize) -> SocketAddr {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut u_read, mut c_write) = splice_client(listener, server);
        for _ in 0..frames {
            let mut prefix = [0u8; 4];
            if u_read.read_exact(&mut prefix).is_err() {
                return;
            }
            let mut frame = prefix.to_vec();
            frame.resize(4 + u32::from_le_bytes(prefix) as usize, 0);
            if u_read.read_exact(&mut frame[4..]).is_err() || c_write.write_all(&frame).is_err() {
                return;
            }
        }
        let _ = c_write.shutdown(std::net::Shutdown::Both);
        let _ = u_read.shutdown(std::net::Shutdown::Both);
    });
    addr
}

/// The server vanishes mid-generation: without retries the error says what happened and how far
/// generation got; with a reconnect, the interrupted step is redone with fresh slots and the
/// tokens are still exactly the reference's.
#[test]
fn vanished_server_is_reported_and_generation_resumes_on_a_new_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let files = ModelFiles::open(&dir, true).unwrap();
    let cfg = *files.client().unwrap().config();
    let prompt = [464u32, 3290, 286];
    let o = opts(SamplingParams::GREEDY, 10);
    let want = reference(&files, &prompt, &o);
    // Welcome, then some 120 reply frames: a few tokens into the generation.
    let cut_after = 120;
    let pool = dir.join("resume.pool");
    let linear = files.linear().unwrap().unwrap();
    PoolSource::precompute(
        &pool,
        &linear,
        &files.fingerprint().unwrap(),
        40,
        &mut |_, _| {},
    )
    .unwrap();

    // No retries: a clear error with the progress.
    let conn = connect(cutting_proxy(server.addr, cut_after), &files);
    let mut src = PoolSource::open(&pool, &cfg, &files.fingerprint().unwrap()).unwrap();
    let (err, _) = generate_with(&files, conn, &mut src, &prompt, &o);
    let err = err.unwrap_err();
    let msg = err.to_string();
    let GenError::Transport { generated, .. } = err else {
        panic!("{msg}")
    };
    assert!(generated > 0 && generated < o.max_new_tokens, "{msg}");
    assert!(
        msg.contains(&format!("after {generated} generated tokens")),
        "{msg}"
    );

    // With a reconnect: the same tokens as the reference, one reconnection, fresh slots only.
    let pool = PoolSource::open(&pool, &cfg, &files.fingerprint().unwrap()).unwrap();
    let first_free = pool.next_slot();
    let verification = pool.verification().unwrap();
    let mut src = Recording::new(pool);
    let conn = connect(cutting_proxy(server.addr, cut_after), &files);
    let settings = veil_core::wire::ClientSettings {
        fingerprint: files.fingerprint().unwrap(),
        psk: None,
    };
    let reconnect = Box::new(move || {
        let s = TcpStream::connect(server.addr)?;
        Connection::handshake(s.try_clone()?, s, settings.clone(), None)
    });
    let mut g = PrivateGenerator::new(files.client().unwrap(), conn)
        .verify_with(verification)
        .resume_with(1, reconnect);
    let (tokens, stats) = g.generate(&mut src, &prompt, &o, &mut |_| {}).unwrap();
    assert_eq!(tokens, want);
    assert_eq!(stats.reconnects, 1);
    let slots: Vec<u64> = src.reserved.iter().flat_map(|&(f, n)| f..f + n).collect();
    assert!(
        slots.iter().all(|&s| s >= first_free),
        "a slot from before the restart was reused"
    );
    let mut uniq = slots.clone();
    uniq.sort_unstable();
    uniq.dedup();
    assert_eq!(uniq.len(), slots.len(), "the redone step reused a slot");
    // The interrupted step's slots were burnt, not reused: more slots than tokens fed.
    assert!(
        slots.len() > prompt.len() + (o.max_new_tokens - 1),
        "{} slots",
        slots.len()
    );
}

/// The LM head computed on the client (the online source's default) gives the same tokens with
/// one round trip less per token.
#[test]
fn local_lm_head_gives_identical_tokens_with_one_round_trip_less() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let files = ModelFiles::open(&dir, true).unwrap();
    let prompt = [464u32, 3290, 286];
    let sampled = SamplingParams {
        temperature_q16: 65536,
        top_k: 0,
        top_p_q16: 0,
    };
    for sampling in [SamplingParams::GREEDY, sampled] {
        let o = opts(sampling, 12);
        let want = reference(&files, &prompt, &o);
        let linear = files.linear().unwrap().unwrap();
        let key = MaskKey::from_bytes([21; 32]);
        let verification = Verification::compute(&key, &linear);
        let mut src = OnlineUnmask::new(linear.clone(), key);
        let conn = connect(server.addr, &files);
        let mut g = PrivateGenerator::new(files.client().unwrap(), conn)
            .verify_with(verification)
            .local_lm_head(linear);
        let (tokens, stats) = g.generate(&mut src, &prompt, &o, &mut |_| {}).unwrap();
        assert_eq!(tokens, want);
        assert_eq!(stats.round_trips_per_token, 8.0);
    }
}

/// A conversation's next turn with the cache kept feeds only the new tokens and gives the tokens
/// a fresh generation of the whole prompt gives; a prompt that departs from the cached tokens
/// midway keeps only the common start.
#[test]
fn a_kept_cache_continues_a_conversation_with_the_same_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = golden_model(tmp.path());
    let server = start_server(&dir, ServerConfig::default());
    let files = ModelFiles::open(&dir, true).unwrap();
    let linear = files.linear().unwrap().unwrap();
    let o = opts(SamplingParams::GREEDY, 6);
    let mut g =
        PrivateGenerator::new(files.client().unwrap(), connect(server.addr, &files)).keep_cache();
    let mut src = OnlineUnmask::new(linear.clone(), MaskKey::from_bytes([8; 32]));
    let turn1 = [464u32, 3290, 286];
    let (out1, s1) = g.generate(&mut src, &turn1, &o, &mut |_| {}).unwrap();
    assert_eq!(s1.cached_tokens, 0);
    assert_eq!(out1, reference(&files, &turn1, &o));
    // The next turn: the whole conversation so far, then new text.
    let mut turn2 = turn1.to_vec();
    turn2.extend_from_slice(&out1);
    turn2.extend_from_slice(&[13, 318, 257]);
    let (out2, s2) = g.generate(&mut src, &turn2, &o, &mut |_| {}).unwrap();
    assert_eq!(s2.cached_tokens, turn1.len() + out1.len() - 1);
    assert_eq!(out2, reference(&files, &turn2, &o));
    // A prompt that shares only its first two tokens with the cache.
    let turn3 = [464u32, 3290, 1110, 318];
    let (out3, s3) = g.generate(&mut src, &turn3, &o, &mut |_| {}).unwrap();
    assert_eq!(s3.cached_tokens, 2);
    assert_eq!(out3, reference(&files, &turn3, &o));
    g.into_connection().bye();
}
