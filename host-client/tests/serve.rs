//! `veil-client serve` driven by the real `openai` Python client (installed from PyPI if
//! missing), on the golden tiny-llama (its own chat template): a streamed chat completion returns
//! exactly the text `veil-client chat` gives for the same messages and seed; the plain response
//! equals it too; `/v1/completions` equals a plain generation; a bad request gets a 400 the client
//! understands.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn python_with_openai() -> String {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let has = |p: &str| {
        Command::new(p)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has(&python) {
        let status = Command::new(&python)
            .args(["-m", "pip", "install", "--quiet", "openai"])
            .status()
            .expect("running pip");
        assert!(
            status.success() && has(&python),
            "this test needs the `openai` Python package: `{python} -m pip install openai` failed"
        );
    }
    python
}

#[test]
fn a_streamed_chat_completion_through_serve_equals_veil_client_chat() {
    let python = python_with_openai();
    let tmp = tempfile::tempdir().unwrap();
    // An instruct-style model with its own chat template and tokenizer (Llama 3 style).
    let dir = common::golden_llama_model(tmp.path());
    let server = common::start_server(&dir, veil_server::ServerConfig::default());
    let addr = server.addr.to_string();
    let w = dir.to_str().unwrap();
    let bin = env!("CARGO_BIN_EXE_veil-client");
    let mut serve = Kill(
        Command::new(bin)
            .args([
                "serve",
                "--weights",
                w,
                "--server",
                &addr,
                "--listen",
                "127.0.0.1:0",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The endpoint says where it listens.
    let mut lines = BufReader::new(serve.0.stderr.take().unwrap()).lines();
    let base = loop {
        let line = lines.next().expect("serve exited").unwrap();
        if let Some(rest) = line.split("endpoint on ").nth(1) {
            break rest.trim().to_owned();
        }
    };
    std::thread::spawn(move || for _ in lines {});

    let (system, user, seed, temperature, max) = (
        "Be brief .",
        "What happened after the war ?",
        "5",
        "0.9",
        "12",
    );
    let messages = serde_json::json!([
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]);
    let out = Command::new(&python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/py/openai_client.py"
        ))
        .args([&base, &messages.to_string(), seed, temperature, max])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();

    // The same conversation through `veil-client chat`.
    let mut chat = Command::new(bin)
        .args([
            "chat",
            "--weights",
            w,
            "--server",
            &addr,
            "--system",
            system,
            "--seed",
            seed,
        ])
        .args([
            "--temperature",
            temperature,
            "--max-new-tokens",
            max,
            "--json",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    writeln!(chat.stdin.take().unwrap(), "{user}").unwrap();
    let chat = chat.wait_with_output().unwrap();
    assert!(chat.status.success());
    let turn: serde_json::Value = serde_json::from_str(
        String::from_utf8(chat.stdout)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let want = turn["text"].as_str().unwrap();
    assert!(!want.is_empty());
    assert_eq!(got["streamed"], want, "{got}");
    assert_eq!(got["whole"], want, "{got}");
    assert!(
        got["pieces"].as_u64().unwrap() > 1,
        "streamed in pieces: {got}"
    );
    assert!(["stop", "length"].contains(&got["finish"].as_str().unwrap()));
    assert_eq!(got["usage"], turn["stats"]["generated_tokens"]);
    assert_eq!(got["model"], dir.file_name().unwrap().to_str().unwrap());
    assert_eq!(got["refused"], 400);

    // `/v1/completions` (greedy, 5 tokens) equals a plain private generation of the prompt.
    let plain = Command::new(bin)
        .args([
            "--weights",
            w,
            "--server",
            &addr,
            "--prompt",
            "The history of",
        ])
        .args(["--max-new-tokens", "5", "--json"])
        .output()
        .unwrap();
    let plain: serde_json::Value = serde_json::from_slice(&plain.stdout).unwrap();
    assert_eq!(got["completion"], plain["text"]);
}
