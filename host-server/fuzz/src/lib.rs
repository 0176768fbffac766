//! What the fuzz targets check, kept apart from libFuzzer so that `host-server/tests/hardening.rs`
//! can include this file (`#[path]`) and run the same checks in the normal test suite, and
//! regenerate the seed corpus when the wire format changes.
//!
//! The targets drive core's sans-IO machines directly (no tokio, no sockets); the protocol itself
//! is tested exhaustively by core's pair test, so these check invariants, not a second model:
//!
//! - [`check_frames`]: a [`FrameDecoder`] fed the input in arbitrary pieces yields exactly the
//!   messages (or the error) that one-shot decoding of the whole input yields, never stalls, and
//!   whatever decodes re-encodes to the same message.
//! - [`check_session`]: the input (after one control byte) is everything a client sends on one
//!   connection, fed to a [`ServerConnection`]. It must end; everything it sends is whole valid
//!   frames; at most one `Error`, last, and exactly when the outcome is a refusal with that code;
//!   each job's rows are the words the client sent for that request, and each `Result` is followed
//!   by exactly that job's products (`matmul_u32_i8`).
//! - [`check_client`]: the input (after one control byte) is everything a server sends, fed to a
//!   [`ClientConnection`] after its hello, optionally with a request pending. It must end; it
//!   sends only whole valid frames, at most one `Error`, last; a failure sticks; a `Result` event
//!   names the pending request.
//! - [`seeds`]: the seed corpus.
//!
//! The control byte of the session targets: bit 0, a pre-shared key on the machine's side;
//! bit 1, the server fails its jobs (client: a request is pending once connected); bit 2, the
//! input ends with the host's timer firing instead of end of stream; bits 3..8, the read size
//! (0: as much as fits, else 37 bytes per step).

use std::sync::OnceLock;

use sha2::{Digest as _, Sha256};
use veil_core::kernels::matmul_u32_i8;
use veil_core::mask::MaskedRows;
use veil_core::model::format::{encode_linear_header, LinearLayout, HEADER_LEN};
use veil_core::model::{LinearId, LinearKind, LinearWeights, ModelConfig};
use veil_core::wire::auth::PskKey;
use veil_core::wire::{
    decode_body, encode_frame, ClientConnection, ClientEvent, ClientSettings, ErrorCode,
    FrameDecoder, FrameError, Message, ServerConnection, ServerSettings, WordBytes, LEN_PREFIX,
    MAX_CHUNK_BYTES, MAX_FRAME, PROTOCOL_VERSION,
};

/// The fuzzed model: two blocks, d=16, inner 64, vocabulary 100.
pub const CFG: ModelConfig = ModelConfig {
    n_layer: 2,
    n_embd: 16,
    n_head: 2,
    n_positions: 16,
    vocab_size: 100,
    n_inner: 64,
    family: veil_core::model::Family::Gpt2,
};

/// Most rows per request of the fuzzed server: few, so one input costs microseconds.
pub const MAX_ROWS: u32 = 4;

/// Offline input ciphertexts per connection of the fuzzed server: none. This model predicts the
/// online conversation only; an `OfflineLayer` or `FetchWeights` is refused (`OfflineRefused`).
/// The offline phase and the weights download are covered by the pair tests in
/// `core/src/wire/tests.rs`.
pub const OFFLINE_INPUTS: u64 = 0;

/// The key of the runs with a pre-shared key (the fuzzer cannot forge MACs: these runs explore
/// the challenge and its refusals).
pub const PSK: &[u8; 16] = b"veil-fuzz-psk-16";

/// `linear.veil` bytes of [`CFG`] with deterministic weights covering the whole int8 range.
pub fn model_bytes() -> &'static [u8] {
    static B: OnceLock<Vec<u8>> = OnceLock::new();
    B.get_or_init(|| {
        let layout = LinearLayout::new(&CFG);
        let mut bytes = vec![0u8; layout.total_len];
        let mut h = [0u8; HEADER_LEN];
        encode_linear_header(&CFG, &mut h);
        bytes[..HEADER_LEN].copy_from_slice(&h);
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for b in &mut bytes[HEADER_LEN..] {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = (x >> 24) as u8;
        }
        LinearWeights::parse(&bytes).expect("fuzz model parses");
        bytes
    })
}

/// SHA-256 of [`model_bytes`], as `veil-server` computes it.
pub fn fingerprint() -> [u8; 32] {
    Sha256::digest(model_bytes()).into()
}

/// The products of `x` through layer `id` of the fuzz model.
pub fn product(id: LinearId, x: &[u32]) -> Vec<u32> {
    let w = LinearWeights::parse(model_bytes()).expect("fuzz model parses");
    let (i, o) = id.dims(&CFG);
    let mut y = vec![0u32; x.len() / i * o];
    matmul_u32_i8(x, w.matrix(id), i, o, &mut y);
    y
}

/// Encodes one frame (prefix and body).
pub fn frame(msg: &Message<'_>) -> Vec<u8> {
    let mut buf = vec![0u8; MAX_FRAME];
    let n = encode_frame(msg, &mut buf).expect("message fits a frame");
    buf.truncate(n);
    buf
}

/// A message re-encoded as a frame; asserts that it decodes back to itself.
fn reencode(msg: &Message<'_>) -> Vec<u8> {
    let f = frame(msg);
    let back = decode_body(&f[LEN_PREFIX..]).expect("a re-encoded message decodes");
    assert_eq!(
        &back, msg,
        "decode ∘ encode is the identity on decoded messages"
    );
    f
}

/// What a decoder made of a stream: each message re-encoded, then how it stopped.
#[derive(Debug, PartialEq, Eq)]
struct Decoded {
    frames: Vec<Vec<u8>>,
    error: Option<FrameError>,
    /// Bytes of an incomplete frame left at the end.
    pending: usize,
}

/// Feeds `data` to a decoder over a buffer of `cap` bytes, `step` bytes at a time (through
/// `spare`/`filled`, as hosts do).
fn decode_stream(data: &[u8], cap: usize, step: usize) -> Decoded {
    let mut dec = FrameDecoder::new(vec![0u8; cap.max(MAX_FRAME)]).expect("buffer is large enough");
    let mut out = Decoded {
        frames: Vec::new(),
        error: None,
        pending: 0,
    };
    let mut rest = data;
    loop {
        let mut progressed = false;
        while let Some(m) = dec.next_message() {
            progressed = true;
            match m {
                Ok(m) => out.frames.push(reencode(&m)),
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        if rest.is_empty() {
            break;
        }
        let spare = dec.spare();
        let n = spare.len().min(rest.len()).min(step.max(1));
        spare[..n].copy_from_slice(&rest[..n]);
        dec.filled(n);
        rest = &rest[n..];
        assert!(
            n > 0 || progressed,
            "the decoder stalled with {} bytes to go",
            rest.len()
        );
    }
    out.pending = dec.buffered();
    out
}

/// The `frame_decoder` target. The input as one body (whatever decodes re-encodes to itself, and
/// a `Data` body equals [`veil_core::wire::encode_data_frame`]'s); then the input as a stream:
/// decoded in one piece, and in pieces whose sizes come from the input's first bytes, the same
/// messages and the same ending.
pub fn check_frames(data: &[u8]) {
    if let Ok(msg) = decode_body(data) {
        let f = reencode(&msg);
        if let Message::Data { words } = msg {
            if words.0.len() % 4 == 0 {
                let w: Vec<u32> = words.iter().collect();
                let mut buf = vec![0u8; MAX_FRAME];
                let n = veil_core::wire::encode_data_frame(&w, &mut buf).expect("a chunk fits");
                assert_eq!(buf[..n], f[..], "encode_data_frame equals encode_frame");
            }
        }
    }
    let one_shot = decode_stream(data, data.len() + MAX_FRAME, usize::MAX);
    let (a, b) = (
        data.first().copied().unwrap_or(0),
        data.get(1).copied().unwrap_or(0),
    );
    let step = 1 + a as usize * 131 + b as usize;
    let cap = MAX_FRAME + b as usize * 97;
    let pieces = decode_stream(data, cap, step);
    assert_eq!(
        pieces, one_shot,
        "fragmentation changed what was decoded (step {step}, cap {cap})"
    );
}

/// How a session target reads its control byte.
#[derive(Clone, Copy, Debug)]
pub struct Control {
    /// The machine holds [`PSK`].
    pub psk: bool,
    /// Server: fail every job. Client: begin a request once connected.
    pub flag: bool,
    /// End with the timer instead of end of stream.
    pub timeout: bool,
    /// Bytes per read.
    pub step: usize,
}

impl Control {
    /// Parses the control byte.
    pub fn of(b: u8) -> Control {
        Control {
            psk: b & 1 != 0,
            flag: b & 2 != 0,
            timeout: b & 4 != 0,
            step: match b >> 3 {
                0 => usize::MAX,
                k => k as usize * 37,
            },
        }
    }

    /// The byte for these settings (`step` in multiples of 37, 0 for as much as fits).
    pub fn byte(psk: bool, flag: bool, timeout: bool, step37: u8) -> u8 {
        u8::from(psk) | u8::from(flag) << 1 | u8::from(timeout) << 2 | (step37.min(31) << 3)
    }
}

/// Splits what a machine sent into messages: whole, valid frames only.
fn sent_frames(bytes: &[u8]) -> Vec<Vec<u8>> {
    let d = decode_stream(bytes, bytes.len() + MAX_FRAME, usize::MAX);
    assert_eq!(d.error, None, "a machine sent an invalid frame");
    assert_eq!(d.pending, 0, "a machine sent a partial frame");
    d.frames
}

fn msg(frame: &[u8]) -> Message<'_> {
    decode_body(&frame[LEN_PREFIX..]).expect("checked by sent_frames")
}

/// A request as the client sent it: the `Compute` and the words of the `Data` after it.
struct Sent {
    request: u32,
    linear: LinearId,
    rows: u32,
    words: Vec<u32>,
}

/// The client's `Compute` requests in order, each with the words of the `Data` frames that follow
/// it (an independent reading of the input, used only to check what reached the jobs).
fn requests_in(client: &[u8]) -> Vec<Sent> {
    let d = decode_stream(client, client.len() + MAX_FRAME, usize::MAX);
    let mut out: Vec<Sent> = Vec::new();
    for f in &d.frames {
        match msg(f) {
            Message::Compute {
                request,
                linear,
                rows,
            } => out.push(Sent {
                request,
                linear,
                rows,
                words: Vec::new(),
            }),
            Message::Data { words } => {
                if let Some(last) = out.last_mut() {
                    last.words.extend(words.iter());
                }
            }
            _ => {}
        }
    }
    out
}

/// What one server session produced (for the tests that drive the same input through tokio).
#[derive(Debug)]
pub struct ServerRun {
    /// How the machine ended.
    pub outcome: Result<veil_core::wire::Ending, veil_core::wire::ServerError>,
    /// Whole frames it sent.
    pub frames: Vec<Vec<u8>>,
    /// Jobs computed: request id, layer, rows in, products.
    pub jobs: Vec<(u32, LinearId, Vec<u32>, Vec<u32>)>,
}

/// Checks that `frames` (what a server sent) hold, after the hello replies, a `Result` and exactly
/// the products of each job in `jobs` in order, then nothing but an optional final `Error`, which
/// is there exactly when `refusal` is `Some` and carries it. Shared with the tokio proptests.
pub fn check_server_frames(
    frames: &[Vec<u8>],
    jobs: &[(u32, LinearId, Vec<u32>, Vec<u32>)],
    refusal: Option<ErrorCode>,
) {
    let errors = frames
        .iter()
        .filter(|f| matches!(msg(f), Message::Error { .. }))
        .count();
    assert!(errors <= 1, "more than one Error frame");
    let mut it = frames.iter().map(|f| msg(f)).peekable();
    while let Some(m) = it.peek() {
        match m {
            Message::Challenge { .. } | Message::ServerProof { .. } | Message::Welcome { .. } => {
                it.next();
            }
            _ => break,
        }
    }
    for (request, linear, x, y) in jobs {
        let rows = (x.len() / linear.dims(&CFG).0) as u32;
        match it.next() {
            Some(Message::Result {
                request: r,
                rows: n,
            }) if r == *request && n == rows => {}
            // A failed job: its refusal comes instead, and nothing after it.
            Some(Message::Error { code }) if y.is_empty() => {
                assert_eq!(Some(code), refusal);
                assert!(it.next().is_none(), "frames after the Error");
                return;
            }
            other => panic!("expected the Result of request {request}, got {other:?}"),
        }
        let mut got = Vec::new();
        while got.len() < y.len() {
            match it.next() {
                Some(Message::Data { words }) => {
                    assert!(words.0.len() <= MAX_CHUNK_BYTES && !words.0.is_empty());
                    got.extend(words.iter());
                }
                other => panic!("request {request}: expected Data, got {other:?}"),
            }
        }
        assert_eq!(
            &got, y,
            "request {request}: products differ from matmul_u32_i8"
        );
    }
    match (it.next(), refusal) {
        (None, None) => {}
        (Some(Message::Error { code }), Some(want)) => assert_eq!(code, want),
        (got, want) => panic!("after the results: {got:?}, expected an Error of {want:?}"),
    }
    assert!(it.next().is_none(), "frames after the Error");
}

/// The server's settings for a run.
pub fn server_settings(psk: bool) -> ServerSettings {
    ServerSettings {
        model: CFG,
        fingerprint: fingerprint(),
        max_rows: MAX_ROWS,
        psk: psk.then(|| PskKey::new(PSK).expect("key is long enough")),
        offline_inputs: OFFLINE_INPUTS,
        weights_bytes: 0,
    }
}

/// Drives a [`ServerConnection`] through `client` (control byte stripped) and checks it.
pub fn run_server(ctl: Control, client: &[u8]) -> ServerRun {
    let settings = server_settings(ctl.psk);
    let (iw, ow) = (settings.input_words(), settings.output_words());
    let mut conn = ServerConnection::new(
        settings,
        [0x5a; 32],
        vec![0u8; MAX_FRAME].into_boxed_slice(),
        vec![0u32; iw],
        vec![0u32; ow],
    )
    .expect("buffers are large enough");
    let requests = requests_in(client);
    let mut out = vec![0u8; 2 * MAX_FRAME];
    let mut sent = Vec::new();
    let mut jobs = Vec::new();
    let mut rest = client;
    // Every step consumes input, a job, or output: bounded by the input.
    let mut budget = 64 + 4 * client.len();
    loop {
        budget = budget
            .checked_sub(1)
            .expect("the server machine does not terminate");
        loop {
            let n = conn.poll_transmit(&mut out);
            assert!(n <= out.len());
            if n == 0 {
                break;
            }
            sent.extend_from_slice(&out[..n]);
        }
        if conn.is_closed() {
            break;
        }
        if let Some(mut job) = conn.poll_job() {
            let k = jobs.len();
            let want = requests.get(k).expect("a job without a Compute");
            assert_eq!(
                (job.request, job.linear, job.rows as u32),
                (want.request, want.linear, want.rows),
                "job {k} is not the client's request"
            );
            assert_eq!(
                job.masked_rows(),
                &want.words[..job.masked_rows().len()],
                "job {k}: rows differ from the words the client sent"
            );
            let x = job.masked_rows().to_vec();
            if ctl.flag {
                jobs.push((job.request, job.linear, x, Vec::new()));
                conn.fail_job(job);
                continue;
            }
            let y = product(job.linear, &x);
            job.products_mut().copy_from_slice(&y);
            jobs.push((job.request, job.linear, x, y));
            conn.finish_job(job);
            continue;
        }
        assert!(
            conn.wants_input(),
            "the server machine stalled: not closed, no job, nothing to send, no input wanted"
        );
        if rest.is_empty() {
            if ctl.timeout {
                conn.handle_timeout();
            } else {
                conn.handle_eof();
            }
            continue;
        }
        let buf = conn.recv_buffer();
        assert!(
            !buf.is_empty(),
            "the server machine wants input but has no room"
        );
        let n = buf.len().min(rest.len()).min(ctl.step);
        buf[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        conn.handle_received(n);
    }
    let outcome = conn.outcome().expect("closed means ended");
    let frames = sent_frames(&sent);
    let refusal = outcome.err().and_then(|e| e.code());
    check_server_frames(&frames, &jobs, refusal);
    if ctl.flag && !jobs.is_empty() {
        assert_eq!(refusal, Some(ErrorCode::ComputeFailed));
    }
    ServerRun {
        outcome,
        frames,
        jobs,
    }
}

/// The `server_session` target: checked as it comes, and the same conversation, frames and
/// outcome when the input arrives in one piece (how the client's bytes are cut into reads must
/// not matter).
pub fn check_session(data: &[u8]) {
    let Some((&ctl, client)) = data.split_first() else {
        return;
    };
    let ctl = Control::of(ctl);
    let cut = run_server(ctl, client);
    if ctl.step != usize::MAX {
        let whole = run_server(
            Control {
                step: usize::MAX,
                ..ctl
            },
            client,
        );
        assert_eq!(
            (cut.outcome, &cut.frames),
            (whole.outcome, &whole.frames),
            "reads of {} bytes changed the conversation",
            ctl.step
        );
    }
}

/// The `client_session` target.
pub fn check_client(data: &[u8]) {
    let Some((&b, server)) = data.split_first() else {
        return;
    };
    let ctl = Control::of(b);
    let settings = ClientSettings {
        fingerprint: fingerprint(),
        psk: ctl
            .psk
            .then(|| PskKey::new(PSK).expect("key is long enough")),
    };
    let mut c = ClientConnection::new(
        settings,
        [0xc1; 32],
        vec![0u8; MAX_FRAME].into_boxed_slice(),
    )
    .expect("buffer is large enough");
    let mut out = vec![0u8; 2 * MAX_FRAME];
    let mut sent = Vec::new();
    let masked: Vec<u32> = (0..MAX_ROWS as usize * 64)
        .map(|i| (i as u32).wrapping_mul(0x9e37_79b9))
        .collect();
    let mut reply = vec![0u32; MAX_ROWS as usize * CFG.vocab_size as usize];
    // The request in flight: id, layer, rows.
    let mut pending: Option<(u32, LinearId, usize)> = None;
    let mut requests = 0usize;
    let mut rest = server;
    let mut budget = 64 + 4 * server.len();
    let mut failed = None;
    let mut closed = false;
    'conv: loop {
        budget = budget
            .checked_sub(1)
            .expect("the client machine does not terminate");
        loop {
            let n = c.poll_transmit(&mut out);
            sent.extend_from_slice(&out[..n]);
            let m = match pending {
                Some((_, linear, rows)) => {
                    let words = &masked[..rows * linear.dims(&CFG).0];
                    c.poll_transmit_rows(MaskedRows::from_random_words(words), &mut out)
                }
                None => 0,
            };
            sent.extend_from_slice(&out[..m]);
            if n == 0 && m == 0 {
                break;
            }
        }
        if let Some(e) = failed {
            assert_eq!(c.failure(), Some(e), "a failure sticks");
            break;
        }
        if closed {
            break;
        }
        if rest.is_empty() {
            failed = Some(if ctl.timeout {
                c.handle_timeout()
            } else {
                c.handle_eof()
            });
            continue;
        }
        let buf = c.recv_buffer();
        assert!(!buf.is_empty(), "the client machine has no room for input");
        let mut n = buf.len().min(rest.len()).min(ctl.step);
        buf[..n].copy_from_slice(&rest[..n]);
        rest = &rest[n..];
        // Process everything buffered: each call stops at an event.
        loop {
            let ev = c.handle_received(n, &mut reply);
            n = 0;
            match ev {
                Ok(None) => break,
                Ok(Some(ClientEvent::Connected { max_rows })) => {
                    assert!(max_rows >= 1 && c.is_ready());
                    assert!(requests == 0, "connected twice");
                    if ctl.flag {
                        pending = Some(begin(&mut c, max_rows));
                        requests += 1;
                    }
                }
                Ok(Some(ClientEvent::Result { request })) => {
                    let (ours, _, _) = pending.take().expect("a result without a request");
                    assert_eq!(request, ours, "the result of another request");
                    assert!(c.is_ready());
                    // Say goodbye after one answered request.
                    c.close();
                    closed = true;
                }
                Ok(Some(
                    ClientEvent::OfflineOutput { .. }
                    | ClientEvent::Weights { .. }
                    | ClientEvent::WeightsData { .. },
                )) => {
                    panic!("offline results or weights without asking for them")
                }
                Err(e) => {
                    failed = Some(e);
                    continue 'conv;
                }
            }
        }
    }
    // What the client sent: Hello first, then Proof, Compute and Data, Bye; at most one Error, last.
    let frames = sent_frames(&sent);
    assert!(
        matches!(frames.first().map(|f| msg(f)), Some(Message::Hello { protocol, .. }) if protocol == PROTOCOL_VERSION)
    );
    let errors: Vec<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, f)| matches!(msg(f), Message::Error { .. }))
        .map(|(i, _)| i)
        .collect();
    assert!(errors.len() <= 1, "more than one Error from the client");
    if let Some(&i) = errors.first() {
        assert_eq!(i, frames.len() - 1, "frames after the client's Error");
    }
}

/// The request the client target sends once connected (with bit 1 of the control byte).
pub const CLIENT_REQUEST: (LinearId, usize) = (LinearId::LM_HEAD, 2);

/// Begins [`CLIENT_REQUEST`] (fewer rows if the server takes fewer).
fn begin(c: &mut ClientConnection<Box<[u8]>>, max_rows: u32) -> (u32, LinearId, usize) {
    let (linear, rows) = CLIENT_REQUEST;
    let rows = rows.min(max_rows as usize);
    let (i, o) = linear.dims(&CFG);
    let id = c
        .begin_request(linear, rows, i, o)
        .expect("ready for a request");
    (id, linear, rows)
}

fn hello(fingerprint: [u8; 32]) -> Message<'static> {
    Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint,
    }
}

/// The words of a seed request.
pub fn seed_words(request: u32, n: usize) -> Vec<u32> {
    (0..n as u32)
        .map(|i| i.wrapping_mul(0x0101_00a7).wrapping_add(request))
        .collect()
}

/// `rows` rows for `linear` as Compute plus Data frames of at most `chunk` bytes.
pub fn request(request: u32, linear: LinearId, rows: u32, chunk: usize) -> Vec<u8> {
    let (in_dim, _) = linear.dims(&CFG);
    let bytes: Vec<u8> = seed_words(request, rows as usize * in_dim)
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let mut out = frame(&Message::Compute {
        request,
        linear,
        rows,
    });
    for c in bytes.chunks(chunk) {
        out.extend(frame(&Message::Data {
            words: WordBytes(c),
        }));
    }
    out
}

/// A server's reply to a seed request: Result and the products in full chunks.
fn reply(request: u32, linear: LinearId, rows: u32) -> Vec<u8> {
    let (in_dim, _) = linear.dims(&CFG);
    let y = product(linear, &seed_words(request, rows as usize * in_dim));
    let mut out = frame(&Message::Result { request, rows });
    for c in y.chunks(MAX_CHUNK_BYTES / 4) {
        let b: Vec<u8> = c.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.extend(frame(&Message::Data {
            words: WordBytes(&b),
        }));
    }
    out
}

/// The seed corpus: `(target, file name, bytes)`. Session seeds start with their control byte.
pub fn seeds() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let fp = fingerprint();
    let id = |layer, kind| LinearId { layer, kind };
    let bye = frame(&Message::Bye);
    let mut s = Vec::new();

    let conv = |parts: &[Vec<u8>]| parts.concat();
    let hello_bye = conv(&[frame(&hello(fp)), bye.clone()]);
    let mut every_layer = frame(&hello(fp));
    for (n, kind) in LinearKind::BLOCK
        .into_iter()
        .chain([LinearKind::LmHead])
        .enumerate()
    {
        let layer = if kind == LinearKind::LmHead {
            0
        } else {
            n as u16 % 2
        };
        every_layer.extend(request(
            n as u32,
            id(layer, kind),
            1 + n as u32 % 4,
            MAX_CHUNK_BYTES,
        ));
    }
    every_layer.extend(&bye);
    let chunked = conv(&[
        frame(&hello(fp)),
        request(7, id(1, LinearKind::MlpDown), 2, 100),
        request(8, id(0, LinearKind::Qkv), 4, 4),
        bye.clone(),
    ]);
    let no_bye = conv(&[frame(&hello(fp)), request(1, LinearId::LM_HEAD, 4, 64)]);
    let refused = conv(&[
        frame(&hello(fp)),
        frame(&Message::Compute {
            request: 2,
            linear: id(5, LinearKind::AttnOut),
            rows: 1,
        }),
    ]);
    let proof = conv(&[
        frame(&hello(fp)),
        frame(&Message::Proof {
            mac: [9; 32],
            nonce: [8; 32],
        }),
    ]);
    let whole = Control::byte(false, false, false, 0);
    for (name, ctl, bytes) in [
        ("hello_bye", whole, &hello_bye),
        ("every_layer", whole, &every_layer),
        ("chunked", Control::byte(false, false, false, 3), &chunked),
        ("no_bye", Control::byte(false, false, true, 0), &no_bye),
        (
            "compute_failed",
            Control::byte(false, true, false, 0),
            &no_bye,
        ),
        ("unknown_layer", whole, &refused),
        ("psk_proof", Control::byte(true, false, false, 1), &proof),
    ] {
        s.push(("server_session", name, [&[ctl][..], bytes].concat()));
        if name != "compute_failed" {
            // (the same bytes as `no_bye`)
            s.push(("frame_decoder", name, bytes.clone()));
        }
    }

    // The client's side: what a server sends.
    let welcome = frame(&Message::Welcome {
        protocol: PROTOCOL_VERSION,
        fingerprint: fp,
        max_rows: MAX_ROWS,
    });
    for (name, with_request) in [("welcome", false), ("welcome_result", true)] {
        let b = Control::byte(false, with_request, false, 0);
        let mut bytes = welcome.clone();
        if with_request {
            let (linear, rows) = CLIENT_REQUEST;
            bytes.extend(reply(0, linear, rows as u32));
        }
        s.push(("client_session", name, [&[b][..], &bytes].concat()));
    }
    s.push((
        "client_session",
        "challenge",
        [
            &[Control::byte(true, false, false, 0)][..],
            &frame(&Message::Challenge { nonce: [3; 32] }),
            &frame(&Message::ServerProof { mac: [4; 32] }),
            &welcome,
        ]
        .concat(),
    ));
    s.push((
        "client_session",
        "refused",
        [
            &[Control::byte(false, false, false, 2)][..],
            &frame(&Message::Error {
                code: ErrorCode::Busy,
            }),
        ]
        .concat(),
    ));

    // One frame of each message as a lone body, for the decoder.
    let words = [0xA5u8; 64];
    for (name, msg) in [
        ("body_hello", hello(fp)),
        (
            "body_welcome",
            Message::Welcome {
                protocol: PROTOCOL_VERSION,
                fingerprint: fp,
                max_rows: 64,
            },
        ),
        (
            "body_compute",
            Message::Compute {
                request: 3,
                linear: id(1, LinearKind::MlpUp),
                rows: 2,
            },
        ),
        (
            "body_result",
            Message::Result {
                request: 3,
                rows: 2,
            },
        ),
        (
            "body_data",
            Message::Data {
                words: WordBytes(&words),
            },
        ),
        (
            "body_error",
            Message::Error {
                code: ErrorCode::WrongDataLength,
            },
        ),
        ("body_bye", Message::Bye),
        ("body_challenge", Message::Challenge { nonce: [1; 32] }),
        (
            "body_proof",
            Message::Proof {
                mac: [2; 32],
                nonce: [3; 32],
            },
        ),
        ("body_server_proof", Message::ServerProof { mac: [4; 32] }),
    ] {
        s.push(("frame_decoder", name, frame(&msg)[LEN_PREFIX..].to_vec()));
    }
    s
}
