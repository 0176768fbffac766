//! The deterministic in-memory pair, in the shape of quinn's `Pair`: a [`ClientConnection`] and a
//! [`ServerConnection`] stepped by hand, bytes moved between them in fragments of a chosen size,
//! jobs computed with the plaintext kernel. No sockets, no threads, no clock. It runs a whole
//! private generation and every refusal; the proptests feed both machines arbitrary bytes.

use std::vec;
use std::vec::Vec;

use super::*;
use crate::kernels::matmul_u32_i8;
use crate::mask::{MaskKey, MaskedRows};
use crate::model::testutil::{bufs, forward, greedy_local, RandomModel};
use crate::model::{argmax, LinearId, LinearKind, LinearWeights, ModelConfig, StepState};
use crate::session::{OnlineUnmask, PrivateForward, SessionError, Verifier};
use auth::PskKey;
use proptest::prelude::*;

const FP: [u8; 32] = [0xf1; 32];

fn server_settings(cfg: ModelConfig, psk: Option<PskKey>) -> ServerSettings {
    ServerSettings {
        model: cfg,
        fingerprint: FP,
        max_rows: 4,
        psk,
        offline_inputs: 1 << 20,
        weights_bytes: 0,
    }
}

type Server = ServerConnection<Vec<u8>, Vec<u32>>;
type Client = ClientConnection<Vec<u8>>;

fn new_server(settings: ServerSettings) -> Server {
    let (i, o) = (settings.input_words(), settings.output_words());
    ServerConnection::new(
        settings,
        [0x5e; 32],
        vec![0; MAX_FRAME],
        vec![0; i],
        vec![0; o],
    )
    .unwrap()
}

fn new_client(fingerprint: [u8; 32], psk: Option<PskKey>) -> Client {
    ClientConnection::new(
        ClientSettings { fingerprint, psk },
        [0xc1; 32],
        vec![0; MAX_FRAME],
    )
    .unwrap()
}

/// What the server did with a job.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kernel {
    Exact,
    /// Flip one bit of the first product (a lying server).
    Tamper,
    /// The host cannot compute it.
    Fail,
}

struct Pair<'m> {
    server: Server,
    client: Client,
    weights: LinearWeights<'m>,
    /// The `linear.veil` bytes behind `weights` (what a weights download sends).
    linear: &'m [u8],
    to_server: Vec<u8>,
    to_client: Vec<u8>,
    /// Bytes per delivery: exercises partial reads and many frames per read.
    fragment: usize,
    kernel: Kernel,
    /// Every masked word the server received (for the uniformity check).
    seen: Vec<u32>,
    jobs: usize,
    /// The offline layer's input ciphertexts (the host's store).
    store: Vec<u64>,
}

impl<'m> Pair<'m> {
    fn new(m: &'m RandomModel, server: Server, client: Client, fragment: usize) -> Self {
        Pair {
            server,
            client,
            weights: LinearWeights::parse(&m.linear).unwrap(),
            linear: &m.linear,
            to_server: vec![],
            to_client: vec![],
            fragment,
            kernel: Kernel::Exact,
            seen: vec![],
            jobs: 0,
            store: vec![],
        }
    }

    fn client_tx(&mut self, masked: Option<MaskedRows<'_>>) {
        let mut out = vec![0u8; 3 * MAX_FRAME];
        loop {
            let mut n = self.client.poll_transmit(&mut out);
            if n == 0 {
                if let Some(m) = masked {
                    n = self.client.poll_transmit_rows(m, &mut out);
                }
            }
            if n == 0 {
                break;
            }
            self.to_server.extend_from_slice(&out[..n]);
        }
    }

    /// Moves the client's bytes into the server (in fragments), runs its jobs and collects its
    /// frames, until the server can do no more.
    fn run_server(&mut self) {
        let mut out = vec![0u8; 2 * MAX_FRAME];
        loop {
            let mut progressed = false;
            while self.server.wants_input() && !self.to_server.is_empty() {
                let take = self.fragment.min(self.to_server.len());
                let n = self.server.feed(&self.to_server[..take]);
                if n == 0 {
                    break;
                }
                self.to_server.drain(..n);
                progressed = true;
            }
            if let Some(mut job) = self.server.poll_job() {
                self.jobs += 1;
                if job.kind != JobKind::Products {
                    self.offline_job(&mut job);
                    self.server.finish_job(job);
                    continue; // progress made: loop again
                }
                let (in_dim, out_dim) = (job.in_dim, job.out_dim);
                let w = self.weights.matrix(job.linear);
                self.seen.extend_from_slice(job.masked_rows());
                let (input, output) = job.split();
                matmul_u32_i8(input, w, in_dim, out_dim, output);
                match self.kernel {
                    Kernel::Exact => self.server.finish_job(job),
                    Kernel::Tamper => {
                        job.products_mut()[0] ^= 1 << 7;
                        self.server.finish_job(job)
                    }
                    Kernel::Fail => self.server.fail_job(job),
                }
                progressed = true;
            }
            let n = self.server.poll_transmit(&mut out);
            if n > 0 {
                self.to_client.extend_from_slice(&out[..n]);
                progressed = true;
            }
            if !progressed {
                break;
            }
        }
    }

    /// An offline step, as a host does it with core's layer functions.
    fn offline_job(&mut self, job: &mut ComputeJob<Vec<u32>>) {
        use crate::rlwe::layer::{absorb_inputs, results, store_words};
        let in_dim = job.in_dim;
        match job.kind {
            JobKind::OfflineInputs { seed, first, count } => {
                self.store.resize(store_words(in_dim), 0);
                self.seen.extend_from_slice(job.offline_inputs());
                absorb_inputs(&seed, first, count, job.offline_inputs(), &mut self.store);
            }
            JobKind::OfflineResults {
                first,
                count,
                switch,
            } => {
                let w = self.weights.matrix(job.linear);
                let mut tmp = vec![0u64; count * 2 * crate::rlwe::N];
                results(
                    &self.store,
                    w,
                    in_dim,
                    first..first + count,
                    switch,
                    &mut tmp,
                    job.offline_results_mut(),
                );
                if self.kernel == Kernel::Tamper {
                    job.offline_results_mut()[7] ^= 1 << 31;
                }
            }
            JobKind::Weights { first, count } => {
                let out = job.weights_mut();
                out.fill(0);
                for (w, c) in out.iter_mut().zip(self.linear[4 * first..].chunks(4)) {
                    let mut le = [0u8; 4];
                    le[..c.len()].copy_from_slice(c);
                    *w = u32::from_le_bytes(le);
                }
                assert_eq!(out.len(), count);
            }
            JobKind::Products => unreachable!("offline jobs only"),
        }
    }

    /// Delivers the server's bytes to the client until an event, an error or no more bytes.
    fn client_rx(&mut self, reply: &mut [u32]) -> Result<Option<ClientEvent>, ClientError> {
        loop {
            if let Some(ev) = self.client.handle_received(0, reply)? {
                return Ok(Some(ev));
            }
            if self.to_client.is_empty() {
                return Ok(None);
            }
            let spare = self.client.recv_buffer();
            let n = self.fragment.min(self.to_client.len()).min(spare.len());
            spare[..n].copy_from_slice(&self.to_client[..n]);
            self.to_client.drain(..n);
            if let Some(ev) = self.client.handle_received(n, reply)? {
                return Ok(Some(ev));
            }
        }
    }

    /// Runs the handshake to its end.
    fn handshake(&mut self) -> Result<u32, ClientError> {
        for _ in 0..4 {
            self.client_tx(None);
            self.run_server();
            if let Some(ClientEvent::Connected { max_rows }) = self.client_rx(&mut [])? {
                return Ok(max_rows);
            }
        }
        Err(self.client.failure().unwrap_or(ClientError::NotReady))
    }

    /// One request: send the rows, let the server compute, collect the products.
    fn compute(
        &mut self,
        linear: LinearId,
        rows: usize,
        masked: MaskedRows<'_>,
        reply: &mut [u32],
    ) -> Result<(), ClientError> {
        let (i, o) = linear.dims(self.weights.config());
        let request = self.client.begin_request(linear, rows, i, o)?;
        self.client_tx(Some(masked));
        self.run_server();
        match self.client_rx(reply)? {
            Some(ClientEvent::Result { request: r }) if r == request => Ok(()),
            _ => Err(self.client.handle_eof()),
        }
    }
}

/// One offline layer through the pair: the client encrypts the masks of `slots` slots under a
/// fresh key, the server multiplies blind, the client decrypts. Returns the decrypted terms
/// `[slot][out]` and the number of output ciphertexts seen.
fn offline_layer(
    pair: &mut Pair<'_>,
    keys: &[MaskKey],
    linear: LinearId,
    switch: crate::rlwe::ModSwitch,
) -> Result<Vec<u32>, ClientError> {
    use crate::rlwe::layer::{mask_columns, COLUMNS};
    use crate::rlwe::{
        decrypt, encrypt, input_words, unpack_result, SecretKey, Seed, Workspace, INPUT_WORDS, N,
    };
    use rand_chacha::rand_core::SeedableRng;
    let cfg = *pair.weights.config();
    let (in_dim, out_dim) = linear.dims(&cfg);
    let slots = keys.len();
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(77);
    let mut sk_words = vec![0u32; SecretKey::WORDS];
    let sk = SecretKey::generate(&mut rng, &mut sk_words);
    let mut ws_words = vec![0u32; Workspace::WORDS];
    let mut ws = Workspace::new(&mut ws_words);
    let seed = Seed::random(&mut rng);
    pair.client
        .begin_offline(linear, in_dim, out_dim, seed, switch)?;
    let mut cols = vec![0u32; COLUMNS * N];
    let (mut b, mut words) = (vec![0u64; N], vec![0u32; INPUT_WORDS]);
    let mut out = vec![0u8; 3 * MAX_FRAME];
    for i0 in (0..in_dim).step_by(COLUMNS) {
        let n = COLUMNS.min(in_dim - i0);
        mask_columns(
            keys,
            &cfg,
            linear,
            0..slots as u64,
            i0..i0 + n,
            &mut cols[..n * N],
        );
        for c in 0..n {
            encrypt(
                &sk,
                &seed,
                (i0 + c) as u64,
                &cols[c * N..(c + 1) * N],
                &mut rng,
                &mut ws,
                &mut b,
            );
            input_words(&b, &mut words);
            let k = pair.client.poll_transmit_ciphertext(&words, &mut out);
            pair.to_server.extend_from_slice(&out[..k]);
            pair.run_server();
        }
    }
    let mut terms = vec![0u32; slots * out_dim];
    let mut reply = vec![0u32; switch.result_words()];
    let (mut a, mut col) = (vec![0u64; N], vec![0u32; N]);
    for j in 0..out_dim {
        pair.run_server();
        match pair.client_rx(&mut reply)? {
            Some(ClientEvent::OfflineOutput { output, .. }) => assert_eq!(output, j),
            other => panic!("expected result {j}, got {other:?}"),
        }
        unpack_result(&reply, switch, &mut a, &mut b);
        decrypt(&sk, &a, &b, switch, &mut ws, &mut col);
        for k in 0..slots {
            terms[k * out_dim + j] = col[k];
        }
    }
    assert!(pair.client.is_ready());
    Ok(terms)
}

#[test]
fn test_pair_offline_layer_decrypts_to_the_online_terms() {
    use crate::rlwe::ModSwitch;
    let m = RandomModel::new(5);
    let lin = LinearWeights::parse(&m.linear).unwrap();
    // One key per slot, as a pool keeps them.
    let keys: Vec<MaskKey> = (0..5).map(|k| MaskKey::from_bytes([4 + k; 32])).collect();
    for (linear, fragment, switch) in [
        (
            LinearId {
                layer: 1,
                kind: LinearKind::MlpDown,
            },
            4096,
            ModSwitch::RECOMMENDED,
        ),
        (
            LinearId {
                layer: 0,
                kind: LinearKind::LmHead,
            },
            1000,
            ModSwitch::NONE,
        ),
    ] {
        let mut pair = Pair::new(
            &m,
            new_server(server_settings(m.cfg, None)),
            new_client(FP, None),
            fragment,
        );
        pair.handshake().unwrap();
        let slots = keys.len();
        let terms = offline_layer(&mut pair, &keys, linear, switch).unwrap();
        let (i, o) = linear.dims(&m.cfg);
        let mut r = vec![0u32; i];
        let mut want = vec![0u32; o];
        for k in 0..slots {
            crate::session::input_mask(&keys[k], &m.cfg, k as u64, linear, &mut r);
            matmul_u32_i8(&r, lin.matrix(linear), i, o, &mut want);
            assert_eq!(terms[k * o..(k + 1) * o], want[..], "{linear} slot {k}");
        }
        // What the server received is the b halves, whose bytes are uniform: Pearson's
        // chi-square over the 256 byte values (255 degrees of freedom; 330.5 is the 0.999
        // quantile, so an honest run fails one time in a thousand, and the seeds are fixed).
        assert_eq!(pair.seen.len(), i * crate::rlwe::INPUT_WORDS);
        let mut hist = [0f64; 256];
        for w in &pair.seen {
            for byte in w.to_le_bytes() {
                hist[byte as usize] += 1.0;
            }
        }
        let expect = pair.seen.len() as f64 * 4.0 / 256.0;
        let chi2: f64 = hist
            .iter()
            .map(|&h| (h - expect) * (h - expect) / expect)
            .sum();
        assert!(
            chi2 < 330.5,
            "{linear}: chi-square {chi2} of the offline bytes"
        );
        // Offline and online requests share the connection.
        let masked = vec![1u32; i];
        let mut reply = vec![0u32; o];
        pair.compute(
            linear,
            1,
            MaskedRows::from_random_words(&masked),
            &mut reply,
        )
        .unwrap();
    }
}

#[test]
fn test_pair_weights_download_is_the_file_once() {
    let m = RandomModel::new(8);
    let mut settings = server_settings(m.cfg, None);
    settings.weights_bytes = m.linear.len() as u64 - 3; // a length that is not whole words
    let mut pair = Pair::new(&m, new_server(settings), new_client(FP, None), 777);
    pair.linear = &m.linear[..m.linear.len() - 3];
    pair.handshake().unwrap();
    pair.client.fetch_weights().unwrap();
    pair.client_tx(None);
    let mut got = Vec::new();
    let mut reply = vec![0u32; CHUNK_WORDS];
    let mut announced = None;
    while !pair.client.is_ready() {
        pair.run_server();
        match pair.client_rx(&mut reply).unwrap() {
            Some(ClientEvent::Weights { bytes }) => announced = Some(bytes),
            Some(ClientEvent::WeightsData { words }) => {
                got.extend(reply[..words].iter().flat_map(|w| w.to_le_bytes()))
            }
            other => panic!("{other:?}"),
        }
    }
    let n = m.linear.len() - 3;
    assert_eq!(announced, Some(n as u64));
    assert_eq!(got.len(), n.div_ceil(4) * 4);
    assert_eq!(got[..n], m.linear[..n]);
    assert!(got[n..].iter().all(|&b| b == 0), "zero padding");
    // Once per connection.
    pair.client.fetch_weights().unwrap();
    pair.client_tx(None);
    pair.run_server();
    assert_eq!(
        pair.server
            .outcome()
            .map(|o| o.err().and_then(|e| e.code())),
        Some(Some(ErrorCode::OfflineRefused))
    );
    // A server that does not send its weights says so.
    let mut pair = Pair::new(
        &m,
        new_server(server_settings(m.cfg, None)),
        new_client(FP, None),
        777,
    );
    pair.handshake().unwrap();
    pair.client.fetch_weights().unwrap();
    pair.client_tx(None);
    pair.run_server();
    assert_eq!(
        pair.client_rx(&mut reply),
        Err(ClientError::Refused(ErrorCode::OfflineRefused))
    );
}

#[test]
fn test_pair_offline_refusals() {
    let m = RandomModel::new(5);
    let linear = LinearId {
        layer: 0,
        kind: LinearKind::Qkv,
    };
    let (i, _) = linear.dims(&m.cfg);
    let cases: [(u64, u8, ErrorCode); 3] = [
        (0, 23, ErrorCode::OfflineRefused),
        (i as u64 - 1, 23, ErrorCode::OfflineRefused),
        (1 << 20, 64, ErrorCode::OfflineRefused),
    ];
    for (budget, drop_a, code) in cases {
        let mut settings = server_settings(m.cfg, None);
        settings.offline_inputs = budget;
        let mut pair = Pair::new(&m, new_server(settings), new_client(FP, None), 4096);
        pair.handshake().unwrap();
        let mut words = frame(&Message::OfflineLayer {
            request: 0,
            linear,
            seed: [1; 32],
            drop_a,
            drop_b: 0,
        });
        pair.to_server.append(&mut words);
        pair.run_server();
        assert_eq!(
            pair.server
                .outcome()
                .map(|o| o.err().and_then(|e| e.code())),
            Some(Some(code)),
            "budget {budget}, drop {drop_a}"
        );
    }
}

/// The whole private generation through the pair, checked replies, optionally the LM head on the
/// client: the tokens equal the plaintext integer pipeline's.
fn private_generation(
    fragment: usize,
    local_lm_head: bool,
    kernel: Kernel,
) -> (
    Result<Vec<u32>, SessionError<core::convert::Infallible>>,
    Vec<u32>,
    usize,
) {
    let m = RandomModel::new(21);
    let lin = LinearWeights::parse(&m.linear).unwrap();
    let prompt = [3u32, 1, 4, 1];
    let mut pair = Pair::new(
        &m,
        new_server(server_settings(m.cfg, None)),
        new_client(FP, None),
        fragment,
    );
    pair.kernel = kernel;
    assert_eq!(pair.handshake(), Ok(4));
    let mut b = bufs(&m.cfg, prompt.len());
    let (fwd, [masked, r, y, u]) = forward(&m, &mut b, prompt.len());
    let key = MaskKey::from_bytes([9; 32]);
    let mut s = vec![0u64; crate::integrity::check_words(&m.cfg)];
    let mut w = vec![0u64; crate::integrity::projection_words(&m.cfg)];
    crate::integrity::fill_check_vectors(&key, &m.cfg, &mut s);
    crate::integrity::fill_projections(&lin, &s, &mut w, &mut vec![0i128; 64]);
    let mut pf = PrivateForward::new::<core::convert::Infallible>(fwd, masked, r, y, u).unwrap();
    pf.set_verifier::<core::convert::Infallible>(Verifier { s: &s, w: &w })
        .unwrap();
    if local_lm_head {
        pf.set_local_lm_head(lin.clone());
    }
    let mut source = OnlineUnmask::new(lin.clone(), key);
    let mut out = vec![];
    let mut next = prompt.to_vec();
    let run = (|| {
        for _ in 0..5 {
            pf.begin(&next, &mut source)?;
            loop {
                let o = pf.outgoing(&mut source)?;
                let (linear, rows) = (o.linear, o.rows);
                assert!(
                    !(local_lm_head && linear.kind == LinearKind::LmHead),
                    "a local LM head is never offered"
                );
                let masked = o.masked.words().to_vec();
                // The client computes r·W while the server computes (here: before it answers).
                pf.prepare_unmask(&mut source)?;
                let reply = pf.reply_mut().unwrap();
                pair.compute(linear, rows, MaskedRows::from_random_words(&masked), reply)
                    .expect("the pair computes");
                if pf.complete(&mut source)? == StepState::Done {
                    break;
                }
            }
            let t = argmax(pf.forward().logits().unwrap());
            out.push(t);
            next = vec![t];
        }
        Ok(out.clone())
    })();
    (run, pair.seen, pair.jobs)
}

#[test]
fn test_pair_private_generation_equals_local_for_any_fragmentation() {
    let m = RandomModel::new(21);
    let want = greedy_local(&m, &[3, 1, 4, 1], 5);
    for fragment in [1usize, 7, 4096, usize::MAX] {
        for local in [false, true] {
            let (got, seen, jobs) = private_generation(fragment, local, Kernel::Exact);
            assert_eq!(
                got.unwrap(),
                want,
                "fragment {fragment}, local LM head {local}"
            );
            let per_token = 4 * m.cfg.n_layer as usize + usize::from(!local);
            assert_eq!(
                jobs,
                5 * per_token,
                "one request per offloaded layer and step"
            );
            // Masked rows look uniform: at most a few words of thousands fall in int8 range.
            let small = seen
                .iter()
                .filter(|&&x| (x as i32).unsigned_abs() <= 127)
                .count();
            assert!(
                small * 1000 < seen.len() * 2,
                "{small} of {} words look like int8",
                seen.len()
            );
        }
    }
}

#[test]
fn test_pair_detects_a_lying_server() {
    let (got, _, _) = private_generation(4096, false, Kernel::Tamper);
    assert!(
        matches!(got, Err(SessionError::IntegrityFailure(_))),
        "{got:?}"
    );
}

#[test]
fn test_pair_compute_failure_is_a_typed_error_not_zeros() {
    let m = RandomModel::new(1);
    let mut pair = Pair::new(
        &m,
        new_server(server_settings(m.cfg, None)),
        new_client(FP, None),
        4096,
    );
    pair.handshake().unwrap();
    pair.kernel = Kernel::Fail;
    let d = m.cfg.d();
    let rows = vec![7u32; d];
    let mut reply = vec![0u32; 3 * d];
    let id = LinearId {
        layer: 0,
        kind: LinearKind::Qkv,
    };
    let err = pair
        .compute(id, 1, MaskedRows::from_random_words(&rows), &mut reply)
        .unwrap_err();
    assert_eq!(err, ClientError::Refused(ErrorCode::ComputeFailed));
    assert!(err.is_transient(), "a new connection may succeed");
    assert_eq!(
        pair.server.outcome(),
        Some(Err(ServerError::ComputeFailed { request: 0 }))
    );
    assert!(pair.server.is_closed());
}

// ---- Refusals in the handshake ------------------------------------------------------------

fn handshake_with(
    server_psk: Option<PskKey>,
    client_fp: [u8; 32],
    client_psk: Option<PskKey>,
) -> (
    Result<u32, ClientError>,
    Option<Result<Ending, ServerError>>,
) {
    let m = RandomModel::new(2);
    let mut pair = Pair::new(
        &m,
        new_server(server_settings(m.cfg, server_psk)),
        new_client(client_fp, client_psk),
        5,
    );
    let r = pair.handshake();
    // The client's parting Error (if any) reaches the server.
    pair.client_tx(None);
    pair.run_server();
    if pair.server.outcome().is_none() && pair.to_server.is_empty() {
        pair.server.handle_eof();
    }
    (r, pair.server.outcome())
}

fn key(b: u8) -> PskKey {
    PskKey::new(&[b; 32]).unwrap()
}

#[test]
fn test_handshake_with_and_without_keys() {
    assert_eq!(
        handshake_with(None, FP, None),
        (Ok(4), Some(Ok(Ending::PeerClosed)))
    );
    assert_eq!(
        handshake_with(Some(key(1)), FP, Some(key(1))),
        (Ok(4), Some(Ok(Ending::PeerClosed)))
    );
}

#[test]
fn test_refused_weights_fingerprint() {
    let (c, s) = handshake_with(None, [0x22; 32], None);
    assert_eq!(
        c,
        Err(ClientError::WeightsMismatch {
            theirs: None,
            ours: [0x22; 32]
        })
    );
    assert_eq!(s, Some(Err(ServerError::Weights { theirs: [0x22; 32] })));
}

#[test]
fn test_refused_psk_missing_wrong_and_unasked() {
    // The server wants a key, the client has none: the client says so and leaves.
    let (c, s) = handshake_with(Some(key(1)), FP, None);
    assert_eq!(c, Err(ClientError::PskRequired));
    assert_eq!(s, Some(Ok(Ending::PeerError(ErrorCode::Unauthorized))));
    // Different keys: the server refuses the proof.
    let (c, s) = handshake_with(Some(key(1)), FP, Some(key(2)));
    assert_eq!(c, Err(ClientError::Refused(ErrorCode::Unauthorized)));
    assert_eq!(s, Some(Err(ServerError::PskWrong)));
    // The client has a key, the server does not ask: refused, the server cannot prove it.
    let (c, s) = handshake_with(None, FP, Some(key(1)));
    assert_eq!(c, Err(ClientError::PskNotRequired));
    assert_eq!(s, Some(Ok(Ending::PeerError(ErrorCode::Unauthorized))));
    // The key check comes before the fingerprint: a stranger learns nothing about the weights.
    let (c, s) = handshake_with(Some(key(1)), [0x33; 32], Some(key(2)));
    assert_eq!(c, Err(ClientError::Refused(ErrorCode::Unauthorized)));
    assert_eq!(s, Some(Err(ServerError::PskWrong)));
}

// ---- Raw frames into each machine -------------------------------------------------------

fn frame(msg: &Message<'_>) -> Vec<u8> {
    let mut b = vec![0u8; MAX_FRAME];
    let n = encode_frame(msg, &mut b).unwrap();
    b.truncate(n);
    b
}

fn hello() -> Vec<u8> {
    frame(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint: FP,
    })
}

/// Feeds `bytes` to a fresh server (no key, max 4 rows), computing jobs exactly; returns the
/// messages it sent and its outcome (after end of stream if it was still open).
fn server_run(
    bytes: &[u8],
    fragment: usize,
) -> (Vec<Vec<u8>>, Option<Result<Ending, ServerError>>) {
    let m = RandomModel::new(3);
    let mut pair = Pair::new(
        &m,
        new_server(server_settings(m.cfg, None)),
        new_client(FP, None),
        fragment,
    );
    pair.to_server = bytes.to_vec();
    pair.run_server();
    if pair.server.outcome().is_none() {
        pair.server.handle_eof();
        pair.run_server();
    }
    let mut frames = vec![];
    let mut dec = FrameDecoder::new(vec![0u8; 2 * MAX_FRAME]).unwrap();
    let mut rest = &pair.to_client[..];
    loop {
        let n = dec.feed(rest);
        rest = &rest[n..];
        let mut any = false;
        while let Some(m) = dec.next_message() {
            let m = m.expect("the server sends only valid frames");
            let mut b = vec![0u8; MAX_FRAME];
            let k = encode_frame(&m, &mut b).unwrap();
            frames.push(b[LEN_PREFIX..k].to_vec());
            any = true;
        }
        if !any && n == 0 {
            break;
        }
    }
    (frames, pair.server.outcome())
}

fn last_error(frames: &[Vec<u8>]) -> Option<ErrorCode> {
    match decode_body(frames.last()?) {
        Ok(Message::Error { code }) => Some(code),
        _ => None,
    }
}

#[test]
fn test_server_refusals_each_with_its_code() {
    let m = RandomModel::new(3);
    let d = m.cfg.d();
    let qkv = LinearId {
        layer: 0,
        kind: LinearKind::Qkv,
    };
    let compute = |linear, rows| {
        frame(&Message::Compute {
            request: 5,
            linear,
            rows,
        })
    };
    let data = |words: usize| {
        let bytes = vec![1u8; words * 4];
        frame(&Message::Data {
            words: WordBytes(&bytes),
        })
    };
    let cases: Vec<(&str, Vec<u8>, ServerError)> = vec![
        (
            "version",
            frame(&Message::Hello {
                protocol: 99,
                fingerprint: FP,
            }),
            ServerError::Version { theirs: 99 },
        ),
        (
            "not a hello",
            frame(&Message::Bye),
            ServerError::Unexpected {
                expected: "Hello",
                got: "Bye",
            },
        ),
        (
            "unknown layer",
            [
                hello(),
                compute(
                    LinearId {
                        layer: 9,
                        kind: LinearKind::Qkv,
                    },
                    1,
                ),
            ]
            .concat(),
            ServerError::UnknownLayer {
                request: 5,
                linear: LinearId {
                    layer: 9,
                    kind: LinearKind::Qkv,
                },
            },
        ),
        (
            "LM head of block 1",
            [
                hello(),
                compute(
                    LinearId {
                        layer: 1,
                        kind: LinearKind::LmHead,
                    },
                    1,
                ),
            ]
            .concat(),
            ServerError::UnknownLayer {
                request: 5,
                linear: LinearId {
                    layer: 1,
                    kind: LinearKind::LmHead,
                },
            },
        ),
        (
            "too many rows",
            [hello(), compute(qkv, 5)].concat(),
            ServerError::TooManyRows {
                request: 5,
                rows: 5,
                max: 4,
            },
        ),
        (
            "zero rows",
            [hello(), compute(qkv, 0)].concat(),
            ServerError::TooManyRows {
                request: 5,
                rows: 0,
                max: 4,
            },
        ),
        (
            "data too long",
            [hello(), compute(qkv, 1), data(d + 1)].concat(),
            ServerError::DataLength {
                request: 5,
                detail: DataLengthError {
                    bytes: 4 * (d + 1),
                    received: 0,
                    expected: d,
                },
            },
        ),
        (
            "empty data",
            [hello(), compute(qkv, 1), data(0)].concat(),
            ServerError::DataLength {
                request: 5,
                detail: DataLengthError {
                    bytes: 0,
                    received: 0,
                    expected: d,
                },
            },
        ),
        (
            "partial word",
            [
                hello(),
                compute(qkv, 1),
                frame(&Message::Data {
                    words: WordBytes(&[1, 2, 3]),
                }),
            ]
            .concat(),
            ServerError::DataLength {
                request: 5,
                detail: DataLengthError {
                    bytes: 3,
                    received: 0,
                    expected: d,
                },
            },
        ),
        (
            "compute inside a request",
            [hello(), compute(qkv, 1), data(2), compute(qkv, 1)].concat(),
            ServerError::Unexpected {
                expected: "Data",
                got: "Compute",
            },
        ),
        (
            "a server message",
            [
                hello(),
                frame(&Message::Result {
                    request: 1,
                    rows: 1,
                }),
            ]
            .concat(),
            ServerError::Unexpected {
                expected: "Compute, OfflineLayer or Bye",
                got: "Result",
            },
        ),
        (
            "proof unasked",
            [
                hello(),
                frame(&Message::Proof {
                    mac: [0; 32],
                    nonce: [0; 32],
                }),
            ]
            .concat(),
            ServerError::Unexpected {
                expected: "Compute, OfflineLayer or Bye",
                got: "Proof",
            },
        ),
        (
            "empty frame",
            [hello(), 0u32.to_le_bytes().to_vec()].concat(),
            ServerError::Frame(FrameError::Empty),
        ),
        (
            "oversized frame",
            [
                hello(),
                ((MAX_FRAME_BODY + 1) as u32).to_le_bytes().to_vec(),
            ]
            .concat(),
            ServerError::Frame(FrameError::TooLarge(MAX_FRAME_BODY as u32 + 1)),
        ),
        (
            "undecodable frame",
            [hello(), vec![2, 0, 0, 0, 0xff, 0xff]].concat(),
            ServerError::Frame(FrameError::Malformed { len: 2 }),
        ),
    ];
    for (what, bytes, want) in cases {
        for fragment in [1usize, 3, 1 << 20] {
            let (frames, outcome) = server_run(&bytes, fragment);
            assert_eq!(outcome, Some(Err(want)), "{what}");
            assert_eq!(
                last_error(&frames),
                want.code(),
                "{what}: the client is told why"
            );
        }
    }
}

#[test]
fn test_server_endings_and_truncation() {
    let qkv = LinearId {
        layer: 0,
        kind: LinearKind::Qkv,
    };
    let (_, o) = server_run(&[hello(), frame(&Message::Bye)].concat(), 2);
    assert_eq!(o, Some(Ok(Ending::Bye)));
    let (_, o) = server_run(&hello(), 2);
    assert_eq!(o, Some(Ok(Ending::PeerClosed)));
    let (_, o) = server_run(
        &[
            hello(),
            frame(&Message::Error {
                code: ErrorCode::Timeout,
            }),
        ]
        .concat(),
        2,
    );
    assert_eq!(o, Some(Ok(Ending::PeerError(ErrorCode::Timeout))));
    // Closed inside a request, and inside a frame: nothing is sent, the ending says where.
    let (f, o) = server_run(
        &[
            hello(),
            frame(&Message::Compute {
                request: 8,
                linear: qkv,
                rows: 1,
            }),
        ]
        .concat(),
        2,
    );
    assert_eq!(o, Some(Err(ServerError::Truncated { request: Some(8) })));
    assert_eq!(last_error(&f), None);
    let bye = frame(&Message::Bye);
    let (_, o) = server_run(&[hello(), bye[..bye.len() - 1].to_vec()].concat(), 2);
    assert_eq!(o, Some(Err(ServerError::Truncated { request: None })));
}

#[test]
fn test_server_idle_timeout_is_refused_with_timeout() {
    let m = RandomModel::new(3);
    let mut s = new_server(server_settings(m.cfg, None));
    s.feed(&hello());
    s.handle_timeout();
    let mut out = vec![0u8; 2 * MAX_FRAME];
    let n = s.poll_transmit(&mut out);
    // Welcome, then the Error.
    let mut dec = FrameDecoder::new(vec![0u8; MAX_FRAME]).unwrap();
    dec.feed(&out[..n]);
    assert!(
        matches!(
            dec.next_message(),
            Some(Ok(Message::Error {
                code: ErrorCode::Timeout
            }))
        ),
        "an error replaces what was not yet sent"
    );
    assert!(s.is_closed());
    assert_eq!(s.outcome(), Some(Err(ServerError::Idle)));
}

#[test]
fn test_busy_frame_reaches_the_client_as_a_refusal() {
    let mut c = new_client(FP, None);
    let mut out = vec![0u8; MAX_FRAME];
    let n = busy_frame(&mut out).unwrap();
    c.recv_buffer()[..n].copy_from_slice(&out[..n]);
    let err = c.handle_received(n, &mut []).unwrap_err();
    assert_eq!(err, ClientError::Refused(ErrorCode::Busy));
    assert!(err.is_transient());
    assert!(std::format!("{err}").contains("try again later"));
}

/// Feeds server frames to a client that has said hello (and, with `request`, has sent one
/// request of one row for the QKV layer of a d = 16 model).
fn client_run(
    server_bytes: &[u8],
    request: bool,
    psk: Option<PskKey>,
) -> Result<Option<ClientEvent>, ClientError> {
    let mut c = new_client(FP, psk);
    let mut out = vec![0u8; 2 * MAX_FRAME];
    c.poll_transmit(&mut out);
    let mut reply = vec![0u32; 48];
    let welcome = frame(&Message::Welcome {
        protocol: PROTOCOL_VERSION,
        fingerprint: FP,
        max_rows: 4,
    });
    let mut bytes = server_bytes.to_vec();
    if request {
        let n = welcome.len();
        c.recv_buffer()[..n].copy_from_slice(&welcome);
        assert_eq!(
            c.handle_received(n, &mut reply),
            Ok(Some(ClientEvent::Connected { max_rows: 4 }))
        );
        let qkv = LinearId {
            layer: 0,
            kind: LinearKind::Qkv,
        };
        c.begin_request(qkv, 1, 16, 48).unwrap();
        let rows = [0u32; 16];
        while c.poll_transmit_rows(MaskedRows::from_random_words(&rows), &mut out) > 0 {}
    }
    let mut last = Ok(None);
    while !bytes.is_empty() {
        let spare = c.recv_buffer();
        let n = spare.len().min(bytes.len()).min(5);
        spare[..n].copy_from_slice(&bytes[..n]);
        bytes.drain(..n);
        last = c.handle_received(n, &mut reply);
        if matches!(last, Err(_) | Ok(Some(_))) {
            return last;
        }
    }
    last
}

#[test]
fn test_client_refusals() {
    let ok_result = frame(&Message::Result {
        request: 0,
        rows: 1,
    });
    let data = |words: usize| {
        let b = vec![0u8; 4 * words];
        frame(&Message::Data {
            words: WordBytes(&b),
        })
    };
    assert_eq!(
        client_run(&[ok_result.clone(), data(48)].concat(), true, None),
        Ok(Some(ClientEvent::Result { request: 0 }))
    );
    assert_eq!(
        client_run(
            &[ok_result.clone(), data(20), data(28)].concat(),
            true,
            None
        ),
        Ok(Some(ClientEvent::Result { request: 0 }))
    );
    type Case = (&'static str, Vec<u8>, bool, Option<PskKey>, ClientError);
    let cases: Vec<Case> = vec![
        (
            "version",
            frame(&Message::Welcome {
                protocol: 7,
                fingerprint: FP,
                max_rows: 4,
            }),
            false,
            None,
            ClientError::Version { theirs: 7 },
        ),
        (
            "weights",
            frame(&Message::Welcome {
                protocol: PROTOCOL_VERSION,
                fingerprint: [1; 32],
                max_rows: 4,
            }),
            false,
            None,
            ClientError::WeightsMismatch {
                theirs: Some([1; 32]),
                ours: FP,
            },
        ),
        (
            "zero rows",
            frame(&Message::Welcome {
                protocol: PROTOCOL_VERSION,
                fingerprint: FP,
                max_rows: 0,
            }),
            false,
            None,
            ClientError::ZeroRows,
        ),
        (
            "challenge without key",
            frame(&Message::Challenge { nonce: [0; 32] }),
            false,
            None,
            ClientError::PskRequired,
        ),
        (
            "bad server proof",
            [
                frame(&Message::Challenge { nonce: [0; 32] }),
                frame(&Message::ServerProof { mac: [0; 32] }),
            ]
            .concat(),
            false,
            Some(key(4)),
            ClientError::ServerProofInvalid,
        ),
        (
            "welcome to a key holder",
            frame(&Message::Welcome {
                protocol: PROTOCOL_VERSION,
                fingerprint: FP,
                max_rows: 4,
            }),
            false,
            Some(key(4)),
            ClientError::PskNotRequired,
        ),
        (
            "refused",
            frame(&Message::Error {
                code: ErrorCode::UnknownLayer,
            }),
            true,
            None,
            ClientError::Refused(ErrorCode::UnknownLayer),
        ),
        (
            "wrong request id",
            frame(&Message::Result {
                request: 3,
                rows: 1,
            }),
            true,
            None,
            ClientError::WrongResult {
                request: 0,
                got_request: 3,
                got_rows: 1,
            },
        ),
        (
            "wrong rows",
            frame(&Message::Result {
                request: 0,
                rows: 2,
            }),
            true,
            None,
            ClientError::WrongResult {
                request: 0,
                got_request: 0,
                got_rows: 2,
            },
        ),
        (
            "data without result",
            data(48),
            true,
            None,
            ClientError::Unexpected {
                expected: "the Result of our request",
                got: "Data",
            },
        ),
        (
            "too much data",
            [ok_result.clone(), data(49)].concat(),
            true,
            None,
            ClientError::DataLength(DataLengthError {
                bytes: 196,
                received: 0,
                expected: 48,
            }),
        ),
        (
            "empty data",
            [ok_result.clone(), data(0)].concat(),
            true,
            None,
            ClientError::DataLength(DataLengthError {
                bytes: 0,
                received: 0,
                expected: 48,
            }),
        ),
        (
            "empty frame",
            0u32.to_le_bytes().to_vec(),
            false,
            None,
            ClientError::Frame(FrameError::Empty),
        ),
        (
            "oversized frame",
            ((MAX_FRAME_BODY + 1) as u32).to_le_bytes().to_vec(),
            true,
            None,
            ClientError::Frame(FrameError::TooLarge(MAX_FRAME_BODY as u32 + 1)),
        ),
        (
            "hello to a client",
            frame(&Message::Hello {
                protocol: 1,
                fingerprint: FP,
            }),
            false,
            None,
            ClientError::Unexpected {
                expected: "Welcome or Challenge",
                got: "Hello",
            },
        ),
    ];
    for (what, bytes, request, psk, want) in cases {
        assert_eq!(client_run(&bytes, request, psk), Err(want), "{what}");
    }
}

#[test]
fn test_client_timeouts_and_eof_say_what_was_pending() {
    let mut c = new_client(FP, None);
    assert_eq!(
        c.handle_timeout(),
        ClientError::TimedOut(Waiting::Handshake)
    );
    let e = client_run(&[], true, None);
    assert_eq!(e, Ok(None));
    let mut c = new_client(FP, None);
    let welcome = frame(&Message::Welcome {
        protocol: PROTOCOL_VERSION,
        fingerprint: FP,
        max_rows: 4,
    });
    c.recv_buffer()[..welcome.len()].copy_from_slice(&welcome);
    c.handle_received(welcome.len(), &mut []).unwrap();
    let up = LinearId {
        layer: 1,
        kind: LinearKind::MlpUp,
    };
    c.begin_request(up, 1, 16, 64).unwrap();
    assert_eq!(
        c.begin_request(up, 1, 16, 64),
        Err(ClientError::NotReady),
        "one request at a time"
    );
    let e = c.handle_timeout();
    assert_eq!(
        e,
        ClientError::TimedOut(Waiting::Reply {
            request: 0,
            linear: up
        })
    );
    assert!(e.is_transient());
    assert!(
        std::format!("{e}").contains("block 1 MLP up projection"),
        "{e}"
    );
    let mut c = new_client(FP, None);
    assert_eq!(c.handle_eof(), ClientError::Closed(Waiting::Handshake));
}

#[test]
fn test_client_refuses_rows_beyond_the_servers_limit() {
    let mut c = new_client(FP, None);
    let welcome = frame(&Message::Welcome {
        protocol: PROTOCOL_VERSION,
        fingerprint: FP,
        max_rows: 2,
    });
    c.recv_buffer()[..welcome.len()].copy_from_slice(&welcome);
    c.handle_received(welcome.len(), &mut []).unwrap();
    let qkv = LinearId {
        layer: 0,
        kind: LinearKind::Qkv,
    };
    assert_eq!(
        c.begin_request(qkv, 3, 16, 48),
        Err(ClientError::TooManyRows { rows: 3, max: 2 })
    );
    assert_eq!(
        c.begin_request(qkv, 0, 16, 48),
        Err(ClientError::TooManyRows { rows: 0, max: 2 })
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Whatever a client sends (valid frames, garbage, in any pieces), the server never panics,
    /// sends only valid frames, sends at most one Error and nothing after it, and ends.
    #[test]
    fn prop_server_survives_any_client_bytes(
        pieces in proptest::collection::vec(
            prop_oneof![
                Just(hello()),
                Just(frame(&Message::Compute { request: 1, linear: LinearId { layer: 0, kind: LinearKind::MlpDown }, rows: 1 })),
                Just(frame(&Message::Compute { request: 2, linear: LinearId::LM_HEAD, rows: 2 })),
                (0usize..70).prop_map(|n| { let b = vec![9u8; 4 * n]; frame(&Message::Data { words: WordBytes(&b) }) }),
                Just(frame(&Message::Bye)),
                proptest::collection::vec(any::<u8>(), 0..40),
            ],
            0..12,
        ),
        fragment in 1usize..300,
    ) {
        let bytes = pieces.concat();
        let (frames, outcome) = server_run(&bytes, fragment);
        prop_assert!(outcome.is_some());
        let errors = frames.iter().filter(|f| matches!(decode_body(f), Ok(Message::Error { .. }))).count();
        prop_assert!(errors <= 1);
        if errors == 1 {
            prop_assert!(last_error(&frames).is_some(), "the Error is the last frame");
        }
        match outcome {
            Some(Err(e)) => prop_assert_eq!(last_error(&frames), e.code()),
            _ => prop_assert_eq!(errors, 0),
        }
    }

    /// Whatever a server sends, the client never panics and never reports a result it did not
    /// fully receive.
    #[test]
    fn prop_client_survives_any_server_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        request in any::<bool>(),
    ) {
        let _ = client_run(&bytes, request, None);
    }
}
