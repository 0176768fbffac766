//! The optional pre-shared key over real TCP against a real `veil-server`: with the same key on
//! both sides private generation equals the local reference; a client without the key, with a
//! wrong key, or skipping the proof is refused in the hello and the server computes nothing; a
//! client with a key refuses a server that has none or proves a different one.

mod common;

use std::io::Write as _;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::{generate_online, handshake, quantize_dir, reference, shared, start_server, Server};
use std::io::Read as _;
use veil_client::files::ModelFiles;
use veil_client::generate::GenOptions;
use veil_client::transport::{read_psk_file, TransportError};
use veil_core::model::{LinearId, LinearKind, SamplingParams};
use veil_core::wire::auth::PskKey as Psk;
use veil_core::wire::{
    encode_frame, ClientError, ErrorCode, FrameDecoder, Message, WordBytes, MAX_FRAME,
    PROTOCOL_VERSION,
};
use veil_server::ServerConfig;

const KEY: [u8; 32] = [0x5a; 32];

/// The golden tiny model, quantized once per test binary.
fn model_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("psk-golden-tiny");
        quantize_dir(&shared().join("golden/tiny"), &out);
        out
    })
}

/// A server for the golden tiny model that requires `psk` (or no key).
fn start_psk_server(psk: Option<Psk>) -> Server {
    start_server(
        model_dir(),
        ServerConfig {
            psk,
            ..ServerConfig::default()
        },
    )
}

fn write_key_file(dir: &Path, name: &str, contents: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, contents).unwrap();
    path
}

#[test]
fn same_key_on_both_sides_generates_like_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    // The same hex key file (with a trailing newline, as `openssl rand -hex` writes) for both.
    let hex: String = KEY.iter().map(|b| format!("{b:02x}")).collect();
    let file = write_key_file(tmp.path(), "veil.psk", format!("{hex}\n").as_bytes());
    let key = read_psk_file(&file).unwrap();
    assert_eq!(key, Psk::new(&KEY).unwrap());
    let server = start_psk_server(Some(key));

    let files = ModelFiles::open(model_dir(), true).unwrap();
    let prompt = [464, 3290, 318];
    let o = GenOptions {
        max_new_tokens: 4,
        sampling: SamplingParams::GREEDY,
        seed: 7,
        eos: vec![],
        prefill_rows: 64,
        speculation: None,
    };
    let expected = reference(&files, &prompt, &o);

    let conn = handshake(server.addr, &files, Some(&KEY)).unwrap();
    // Hello/Challenge and Proof/ServerProof+Welcome.
    assert_eq!(conn.stats().round_trips, 2);
    let (tokens, _, conn) = generate_online(&files, conn, 3, &prompt, &o);
    conn.bye();
    assert_eq!(tokens, expected);
    assert!(server.weights.computed_requests() > 0);
}

#[test]
fn client_without_the_key_is_refused_before_any_compute() {
    let server = start_psk_server(Some(Psk::new(&KEY).unwrap()));
    let files = ModelFiles::open(model_dir(), true).unwrap();
    let err = handshake(server.addr, &files, None).unwrap_err();
    assert!(
        matches!(err, TransportError::Server(ClientError::PskRequired)),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "the server requires a pre-shared key: pass the server's key file with --psk-file"
    );
    assert_eq!(server.weights.computed_requests(), 0);
}

#[test]
fn wrong_key_is_refused_unauthorized() {
    let server = start_psk_server(Some(Psk::new(&KEY).unwrap()));
    let files = ModelFiles::open(model_dir(), true).unwrap();
    let mut wrong = KEY;
    wrong[31] ^= 1;
    let err = handshake(server.addr, &files, Some(&wrong)).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Server(ClientError::Refused(ErrorCode::Unauthorized))
        ),
        "{err}"
    );
    // A shorter key that is a prefix of the right one is just as wrong.
    let err = handshake(server.addr, &files, Some(&KEY[..16])).unwrap_err();
    assert!(
        matches!(
            err,
            TransportError::Server(ClientError::Refused(ErrorCode::Unauthorized))
        ),
        "{err}"
    );
    assert_eq!(server.weights.computed_requests(), 0);
    // The server still serves the right key afterwards.
    handshake(server.addr, &files, Some(&KEY)).unwrap().bye();
}

#[test]
fn client_with_a_key_refuses_a_server_without_one() {
    let server = start_psk_server(None);
    let files = ModelFiles::open(model_dir(), true).unwrap();
    let err = handshake(server.addr, &files, Some(&KEY)).unwrap_err();
    assert!(
        matches!(err, TransportError::Server(ClientError::PskNotRequired)),
        "{err}"
    );
    assert!(
        err.to_string()
            .starts_with("the server does not ask for the pre-shared key"),
        "{err}"
    );
    // Without keys on either side, nothing changed.
    handshake(server.addr, &files, None).unwrap().bye();
}

/// Frames over a std socket, as a hand-rolled (hostile) client or fake server would send them.
struct Raw {
    s: TcpStream,
    rx: FrameDecoder<Vec<u8>>,
    wbuf: Vec<u8>,
}

impl Raw {
    fn new(s: TcpStream) -> Self {
        Raw {
            s,
            rx: FrameDecoder::new(vec![0; MAX_FRAME]).unwrap(),
            wbuf: vec![0; MAX_FRAME],
        }
    }

    fn send(&mut self, msg: &Message<'_>) {
        let n = encode_frame(msg, &mut self.wbuf).unwrap();
        self.s.write_all(&self.wbuf[..n]).unwrap();
    }

    fn recv(&mut self) -> Message<'_> {
        while !self.rx.frame_ready() {
            let n = self.s.read(self.rx.spare()).unwrap();
            assert!(n > 0, "the peer closed the connection");
            self.rx.filled(n);
        }
        self.rx.next_message().unwrap().unwrap()
    }
}

#[test]
fn compute_without_a_proof_is_refused_and_not_computed() {
    let server = start_psk_server(Some(Psk::new(&KEY).unwrap()));
    let files = ModelFiles::open(model_dir(), true).unwrap();
    let cfg = *files.client().unwrap().config();
    let linear = LinearId {
        layer: 0,
        kind: LinearKind::Qkv,
    };
    let (in_dim, _) = linear.dims(&cfg);

    // Skip the Proof: Compute (and its rows) right after the Challenge.
    let mut c = Raw::new(TcpStream::connect(server.addr).unwrap());
    c.send(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint: files.fingerprint().unwrap(),
    });
    assert!(matches!(c.recv(), Message::Challenge { .. }));
    c.send(&Message::Compute {
        request: 0,
        linear,
        rows: 1,
    });
    c.send(&Message::Data {
        words: WordBytes(&vec![0u8; in_dim * 4]),
    });
    assert_eq!(
        c.recv(),
        Message::Error {
            code: ErrorCode::Unauthorized
        }
    );

    // A proof of garbage.
    let mut c = Raw::new(TcpStream::connect(server.addr).unwrap());
    c.send(&Message::Hello {
        protocol: PROTOCOL_VERSION,
        fingerprint: files.fingerprint().unwrap(),
    });
    assert!(matches!(c.recv(), Message::Challenge { .. }));
    c.send(&Message::Proof {
        mac: [0; 32],
        nonce: [0; 32],
    });
    assert_eq!(
        c.recv(),
        Message::Error {
            code: ErrorCode::Unauthorized
        }
    );
    assert_eq!(server.weights.computed_requests(), 0);
}

#[test]
fn client_refuses_a_server_that_proves_another_key() {
    let files = ModelFiles::open(model_dir(), true).unwrap();
    let fingerprint = files.fingerprint().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    // A fake server: challenges, accepts any proof, answers with a made-up one.
    let fake = std::thread::spawn(move || {
        let mut c = Raw::new(listener.accept().unwrap().0);
        assert!(matches!(c.recv(), Message::Hello { .. }));
        c.send(&Message::Challenge { nonce: [1; 32] });
        assert!(matches!(c.recv(), Message::Proof { .. }));
        c.send(&Message::ServerProof { mac: [2; 32] });
        c.send(&Message::Welcome {
            protocol: PROTOCOL_VERSION,
            fingerprint,
            max_rows: 64,
        });
        // The client tells us it refuses.
        c.recv()
            == (Message::Error {
                code: ErrorCode::Unauthorized,
            })
    });
    let err = handshake(addr, &files, Some(&KEY)).unwrap_err();
    assert!(
        matches!(err, TransportError::Server(ClientError::ServerProofInvalid)),
        "{err}"
    );
    assert!(fake.join().unwrap());
}

#[test]
fn key_files_read_the_same_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8]); 3] = [
        ("hex", b"  00112233445566778899aabbccddeeff\r\n"),
        ("raw", b"\x00\x01binary key bytes\xff\n"),
        ("text", b"a passphrase of some length\n"),
    ];
    for (name, contents) in cases {
        let file = write_key_file(tmp.path(), name, contents);
        let client = read_psk_file(&file).unwrap();
        let contents = std::fs::read(&file).unwrap();
        assert_eq!(
            client,
            Psk::from_file_contents(&contents).unwrap(),
            "{name}"
        );
    }
    assert_eq!(
        read_psk_file(&tmp.path().join("hex")).unwrap(),
        Psk::new(&[
            0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
            0xee, 0xff
        ])
        .unwrap()
    );
    // Raw keys are used exactly as stored, trailing newline included.
    assert_eq!(
        read_psk_file(&tmp.path().join("text")).unwrap(),
        Psk::new(b"a passphrase of some length\n").unwrap()
    );

    // Too short after decoding: both refuse, saying why.
    for (name, contents) in [
        ("short-hex", &b"00112233445566778899aabbccddee"[..]),
        ("short-raw", b"fifteen bytes!!"),
    ] {
        let file = write_key_file(tmp.path(), name, contents);
        let e = format!("{:#}", read_psk_file(&file).unwrap_err());
        assert!(e.contains("at least 16"), "{e}");
    }
    // The key never shows in logs.
    let psk = Psk::new(b"a very secret key, do not print").unwrap();
    assert!(!format!("{psk:?}").contains("secret"));
    assert!(!format!(
        "{:?}",
        ServerConfig {
            psk: Some(psk),
            ..Default::default()
        }
    )
    .contains("secret"));
}
