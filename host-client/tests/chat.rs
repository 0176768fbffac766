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
