// Each test binary compiles this module on its own and uses only a subset of these helpers.
#![allow(dead_code)]
//! Helpers shared by the veil-client integration tests: the golden model beside the repository,
//! quantizing it with veil-tools, an in-process `veil-server` on loopback, connecting to it, and
//! the reference and online-masked generations the tests compare.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use veil_client::files::ModelFiles;
use veil_client::generate::{generate_reference, GenError, GenOptions, GenStats, PrivateGenerator};
use veil_client::transport::{Connection, TransportError};
use veil_core::mask::MaskKey;
use veil_core::session::{OnlineUnmask, UnmaskSource};
use veil_core::wire::auth::PskKey;
use veil_core::wire::ClientSettings;
use veil_server::{ServerConfig, ServerWeights};

/// `../shared` beside the repository, where the golden checkpoints live. Asserts that
/// `golden/tiny` is there, so a missing checkout fails with a message that says so rather than
/// with an obscure load error later.
pub fn shared() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared");
    assert!(
        p.join("golden/tiny/model.safetensors").is_file(),
        "../shared/golden/tiny is missing beside the repository"
    );
    p
}

/// Quantizes a Hugging Face checkpoint directory (GPT-2 or the LLaMA family, by its
/// `model_type`) into `out` (no calibration), as `veil-tools quantize` writes it: `linear.veil`,
/// `client.veil`, manifest and tokenizer.
pub fn quantize_dir(model: &Path, out: &Path) {
    let model_type = veil_tools::llama::model_type(&model.join("config.json")).unwrap();
    if veil_tools::llama::is_llama_family(&model_type) {
        let ckpt = veil_tools::llama::LlamaCheckpoint::load(model).unwrap();
        let q =
            veil_tools::llama::quantize_llama(&ckpt, &Default::default(), &mut |_, _| {}).unwrap();
        let prov = veil_tools::quantize::Provenance {
            source: model.display().to_string(),
            smooth_alpha: None,
            calibration: None,
        };
        let extra = ["tokenizer_config.json", "generation_config.json"].map(|f| model.join(f));
        veil_tools::quantize::write_model_dir_with(
            out,
            &q,
            &model.join("tokenizer.json"),
            &extra,
            &prov,
        )
        .unwrap();
        return;
    }
    let ckpt = veil_tools::hf::Checkpoint::load(model).unwrap();
    let q =
        veil_tools::quantize::quantize(&ckpt, None, &Default::default(), &mut |_, _| {}).unwrap();
    let prov = veil_tools::quantize::Provenance {
        source: model.display().to_string(),
        smooth_alpha: None,
        calibration: None,
    };
    veil_tools::quantize::write_model_dir(out, &q, &model.join("tokenizer.json"), &prov).unwrap();
}

/// The golden tiny checkpoint quantized into `parent/tiny`; returns that directory. Most tests
/// run on this model: small enough to quantize per test, real enough to generate text.
pub fn golden_model(parent: &Path) -> PathBuf {
    let out = parent.join("tiny");
    quantize_dir(&shared().join("golden/tiny"), &out);
    out
}

/// A distilgpt2-size synthetic checkpoint (random weights, golden tiny's tokenizer) quantized
/// into `parent/q`; returns that directory.
#[allow(dead_code)]
pub fn synth_distilgpt2(parent: &Path) -> PathBuf {
    let hf = parent.join("hf");
    let opts = veil_tools::synth::SynthOptions {
        preset: veil_tools::synth::Preset::Distilgpt2,
        seed: 7,
        outliers: false,
        tokenizer_from: Some(shared().join("golden/tiny")),
        progress: false,
    };
    veil_tools::synth::write_checkpoint(&hf, &opts).unwrap();
    let dir = parent.join("q");
    quantize_dir(&hf, &dir);
    dir
}

/// Gives golden tiny (GPT-2, which ships no chat template) a small one of our own, for the chat
/// and endpoint tests.
#[allow(dead_code)]
pub fn add_test_chat_template(dir: &Path) {
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}", "eos_token": "<|endoftext|>", "bos_token": ""}"#,
    )
    .unwrap();
}

/// The golden tiny-llama checkpoint (the LLaMA family) quantized into `parent/tiny-llama`.
#[allow(dead_code)]
pub fn golden_llama_model(parent: &Path) -> PathBuf {
    let out = parent.join("tiny-llama");
    quantize_dir(&shared().join("golden/tiny-llama"), &out);
    out
}

/// A `veil-server` serving in this process on 127.0.0.1 (an OS-chosen port), on a runtime of its
/// own; it serves until this is dropped.
pub struct Server {
    pub addr: SocketAddr,
    /// The served weights, for the server's counters (`computed_requests`).
    pub weights: Arc<ServerWeights>,
    _rt: tokio::runtime::Runtime,
}

/// Serves the model in `dir` with `config` (e.g. `ServerConfig::default()`, or one with a
/// pre-shared key). Two worker threads of its own, so the test's threads are free to be clients.
pub fn start_server(dir: &Path, config: ServerConfig) -> Server {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let weights = Arc::new(ServerWeights::open_dir(dir).unwrap());
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(veil_server::serve(
        listener,
        weights.clone(),
        config,
        std::future::pending::<()>(),
    ));
    Server {
        addr,
        weights,
        _rt: rt,
    }
}

/// Connects to `addr` over TCP (Nagle off: one small frame per round trip, which Nagle and
/// delayed ACKs would slow by 40 ms each) and says hello with the fingerprint of `files`, with
/// `psk` when given. Returns the handshake's outcome, so tests can check refusals.
pub fn handshake(
    addr: SocketAddr,
    files: &ModelFiles,
    psk: Option<&[u8]>,
) -> Result<Connection<TcpStream, TcpStream>, TransportError> {
    let s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let settings = ClientSettings {
        fingerprint: files.fingerprint().unwrap(),
        psk: psk.map(|k| PskKey::new(k).unwrap()),
    };
    Connection::handshake(s.try_clone().unwrap(), s, settings, None)
}

/// The outcome of one generation.
pub type Generated<E> = Result<(Vec<u32>, GenStats), GenError<E>>;

/// Generates privately over `conn` with `source`'s keys and terms (replies unchecked), and
/// hands the connection back with the outcome.
pub fn generate_with<R: Read, W: Write, S: UnmaskSource>(
    files: &ModelFiles,
    conn: Connection<R, W>,
    source: &mut S,
    prompt: &[u32],
    o: &GenOptions,
) -> (Generated<S::Error>, Connection<R, W>) {
    let mut g = PrivateGenerator::new(files.client().unwrap(), conn);
    let out = g.generate(source, prompt, o, &mut |_| {});
    (out, g.into_connection())
}

/// [`handshake`] without a pre-shared key, which must succeed.
pub fn connect(addr: SocketAddr, files: &ModelFiles) -> Connection<TcpStream, TcpStream> {
    handshake(addr, files, None).unwrap()
}

/// The local reference generation (no server, plaintext): what every private generation of the
/// same prompt and options must equal, bit for bit.
pub fn reference(files: &ModelFiles, prompt: &[u32], o: &GenOptions) -> Vec<u32> {
    let linear = files.linear().unwrap().unwrap();
    generate_reference(files.client().unwrap(), &linear, prompt, o, &mut |_| {})
        .unwrap()
        .0
}

/// Generates privately over `conn` with online masks (mask key `[key; 32]`, replies not
/// verified); returns the tokens and the generation's figures. The connection stays open.
pub fn generate_online<R: Read, W: Write>(
    files: &ModelFiles,
    conn: Connection<R, W>,
    key: u8,
    prompt: &[u32],
    o: &GenOptions,
) -> (Vec<u32>, GenStats, Connection<R, W>) {
    let mut src = OnlineUnmask::new(
        files.linear().unwrap().unwrap(),
        MaskKey::from_bytes([key; 32]),
    );
    let (out, conn) = generate_with(files, conn, &mut src, prompt, o);
    let (tokens, stats) = out.unwrap();
    (tokens, stats, conn)
}

/// The common half of a test proxy: accepts one client on `listener`, connects it to `server`
/// (without Nagle on either side: one small frame per round trip would otherwise wait 40 ms for
/// delayed ACKs), forwards everything the client sends in a thread, and returns the server's
/// read side and the client's write side for the caller to relay (and tamper with, or cut).
pub fn splice_client(
    listener: std::net::TcpListener,
    server: SocketAddr,
) -> (TcpStream, TcpStream) {
    let (client, _) = listener.accept().unwrap();
    let upstream = TcpStream::connect(server).unwrap();
    client.set_nodelay(true).unwrap();
    upstream.set_nodelay(true).unwrap();
    let (mut c_read, mut u_write) = (client.try_clone().unwrap(), upstream.try_clone().unwrap());
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut c_read, &mut u_write);
        let _ = u_write.shutdown(std::net::Shutdown::Write);
    });
    (upstream, client)
}

/// An unmasking source that records every slot range it hands out (what `reserve` returned),
/// so tests can check that no slot is ever used twice.
pub struct Recording<S> {
    pub inner: S,
    pub reserved: Vec<(u64, u64)>,
}

impl<S> Recording<S> {
    pub fn new(inner: S) -> Self {
        Recording {
            inner,
            reserved: vec![],
        }
    }
}

impl<S: UnmaskSource> UnmaskSource for Recording<S> {
    type Error = S::Error;

    fn reserve(&mut self, rows: u64) -> Result<u64, Self::Error> {
        let first = self.inner.reserve(rows)?;
        self.reserved.push((first, rows));
        Ok(first)
    }

    fn mask_key(&mut self, slot: u64) -> Result<MaskKey, Self::Error> {
        self.inner.mask_key(slot)
    }

    fn unmask_terms(
        &mut self,
        linear: veil_core::model::LinearId,
        first_slot: u64,
        rows: usize,
        r: veil_core::mask::MaskWords<'_>,
        out: veil_core::mask::UnmaskTerms<'_>,
    ) -> Result<(), Self::Error> {
        self.inner.unmask_terms(linear, first_slot, rows, r, out)
    }
}

/// Sixteen different English prompts, one per client of the many-client tests (load, HAProxy).
pub const PROMPTS: [&str; 16] = [
    "Global climate change is primarily caused by",
    "The quick brown fox",
    "In the beginning",
    "Once upon a time, there was a",
    "The capital of France is",
    "Machine learning models are",
    "She opened the door and saw",
    "The history of the Roman Empire",
    "My favourite food is",
    "Scientists have discovered a new",
    "The stock market today",
    "How to make a cup of tea:",
    "The river flows",
    "A small robot walked into",
    "It was a dark and stormy night",
    "Privacy matters because",
];
