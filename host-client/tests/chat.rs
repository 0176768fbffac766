//! The chat template renders the golden conversations exactly as transformers did, and the
//! tokenizer gives exactly their ids (golden tiny-llama: a Llama-3-style template and tokenizer).

mod common;

use common::shared;
use veil_client::chat::{stop_tokens, ChatError, ChatTemplate, Message};

#[test]
fn the_template_renders_the_golden_conversations_and_tokenizes_to_their_ids() {
    let dir = shared().join("golden/tiny-llama");
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let template = ChatTemplate::from_model_dir(&dir).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let cases = golden["chat_cases"].as_array().unwrap();
    assert!(!cases.is_empty());
    for case in cases {
        let messages: Vec<Message> = serde_json::from_value(case["messages"].clone()).unwrap();
        let rendered = template.render(&messages, true).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        let ids = tokenizer
            .encode(rendered, false)
            .unwrap()
            .get_ids()
            .to_vec();
        let want: Vec<u32> = serde_json::from_value(case["input_ids"].clone()).unwrap();
        assert_eq!(ids, want);
    }
    // The end of a turn: <|eot_id|> (4), the template's eos and generation_config's.
    assert_eq!(stop_tokens(&dir, &template, &tokenizer), vec![4]);
}

#[test]
fn a_model_without_a_template_and_a_template_that_refuses_say_so() {
    // GPT-2 has no chat template.
    let err = ChatTemplate::from_model_dir(&shared().join("golden/tiny")).unwrap_err();
    assert!(matches!(err, ChatError::NoTemplate(_)), "{err}");
    assert!(err.to_string().contains("not a chat model"), "{err}");
    // A template that raises, as many do for unsupported roles.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}{{ m['content'].strip() }}{% endfor %}", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(tmp.path()).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "  hi  ")], true).unwrap(),
        "hi"
    );
    let err = t.render(&[Message::new("tool", "x")], true).unwrap_err();
    assert!(err.to_string().contains("no tools here"), "{err}");
}

/// Runs `veil-client chat ARGS` with `input` on standard input; one JSON object per turn.
fn chat_turns(args: &[&str], input: &str) -> Vec<serde_json::Value> {
    use std::io::Write;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_veil-client"))
        .arg("chat")
        .args(args)
        .arg("--json")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A two-turn conversation through `veil-client chat` with a real server: each reply equals the
/// local reference's for the same rendered conversation, the second turn feeds only what is new
/// (the cache is kept), and sampling with a seed agrees too. The model is golden tiny (GPT-2)
/// with a chat template of our own, since GPT-2 ships none.
#[test]
fn chat_keeps_the_cache_across_turns_and_equals_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = common::golden_model(tmp.path());
    common::add_test_chat_template(&dir);
    let server = common::start_server(&dir, veil_server::ServerConfig::default());
    let addr = server.addr.to_string();
    let w = dir.to_str().unwrap();
    let input = "The history of the city\nWhat happened after the war ?\n";
    for sampling in [
        &["--temperature", "0"][..],
        &["--temperature", "0.9", "--seed", "5"],
    ] {
        let common_args = [
            &[
                "--weights",
                w,
                "--max-new-tokens",
                "12",
                "--system",
                "Be brief .",
            ][..],
            sampling,
        ]
        .concat();
        let private = chat_turns(&[&common_args[..], &["--server", &addr]].concat(), input);
        let local = chat_turns(&[&common_args[..], &["--reference"]].concat(), input);
        assert_eq!(private.len(), 2);
        for (p, l) in private.iter().zip(&local) {
            assert_eq!(p["tokens"], l["tokens"], "{sampling:?}");
            assert_eq!(p["text"], l["text"]);
        }
        assert_eq!(private[0]["cached_tokens"], 0);
        assert!(
            private[1]["cached_tokens"].as_u64().unwrap() > 10,
            "the second turn fed the whole conversation again: {}",
            private[1]
        );
    }
}

#[test]
fn templates_get_todays_date_as_transformers_gives_it() {
    // Llama 3.x's template writes "Today Date: {{ strftime_now('%d %b %Y') }}" into its system
    // header (falling back to a fixed 2024 date where the function is missing); transformers
    // defines it as Python's `datetime.now().strftime`. The reference here is date(1).
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{% if strftime_now is defined %}{{ strftime_now('%d %b %Y') }}{% else %}26 Jul 2024{% endif %}|{{ messages[0]['content'] }}", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let date = || {
        let out = std::process::Command::new("date")
            .arg("+%d %b %Y")
            .env("LC_ALL", "C")
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let t = ChatTemplate::from_model_dir(tmp.path()).unwrap();
    let before = date();
    let got = t.render(&[Message::new("user", "hi")], true).unwrap();
    let after = date();
    assert!(
        got == format!("{before}|hi") || got == format!("{after}|hi"),
        "{got:?}, date(1) says {before:?}"
    );
    // A format chrono cannot render is an error naming it, not a panic.
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{{ strftime_now('%Q') }}", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(tmp.path()).unwrap();
    let err = t.render(&[Message::new("user", "hi")], true).unwrap_err();
    assert!(err.to_string().contains("%Q"), "{err}");
}

#[test]
fn templates_see_the_variables_transformers_passes() {
    // transformers renders with `tools=None, documents=None, continue_final_message=False`:
    // defined, and none; templates branch on either.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(
        tmp.path().join("tokenizer_config.json"),
        r#"{"chat_template": "{{ tools is defined }} {{ tools is none }} {{ documents is none }} {{ continue_final_message }}", "eos_token": "</s>"}"#,
    )
    .unwrap();
    let t = ChatTemplate::from_model_dir(tmp.path()).unwrap();
    assert_eq!(
        t.render(&[Message::new("user", "hi")], true).unwrap(),
        "True True True False" // printed as Python prints them
    );
}
