//! Chat: a model's own chat template (the Jinja in its `tokenizer_config.json`), rendered with
//! minijinja as transformers renders it, and the stop tokens from the model's files.
//!
//! Templates are Python-flavoured Jinja: they call `raise_exception`, use Python string methods
//! (`.strip()`, `.startswith(...)`, through minijinja-contrib's `pycompat`) and `tojson`, and read
//! `messages`, `add_generation_prompt`, `bos_token` and `eos_token`. The rendered text carries the
//! special tokens as text (`<|begin_of_text|>`...), which the tokenizer turns into their ids, so it
//! is encoded without adding special tokens again.

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Message {
    /// `system`, `user` or `assistant` (templates may accept others).
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A message of `role` with `content`.
    pub fn new(role: &str, content: &str) -> Self {
        Message {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// Why a conversation cannot be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model directory has no usable `tokenizer_config.json`.
    #[error("{path}: {reason}")]
    Config {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The model has no chat template.
    #[error("the model in {0} has no chat template (tokenizer_config.json has no `chat_template`): it is not a chat model; use plain prompts (`veil-client --prompt`, `/v1/completions`)")]
    NoTemplate(PathBuf),
    /// The template failed (a syntax error, or the template itself refused the conversation).
    #[error("rendering the chat template: {0}")]
    Render(String),
}

/// A model's chat template and its special tokens.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
}

/// A special token in `tokenizer_config.json`: a string, or an object with `content`.
fn token_text(v: Option<&Value>) -> String {
    match v {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Object(o)) => o
            .get("content")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned(),
        _ => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the model in `dir` (from its `tokenizer_config.json`).
    pub fn from_model_dir(dir: &Path) -> Result<Self, ChatError> {
        let path = dir.join("tokenizer_config.json");
        let config = |reason: String| ChatError::Config {
            path: path.clone(),
            reason,
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(ChatError::NoTemplate(dir.into()))
            }
            Err(e) => return Err(config(e.to_string())),
        };
        let v: Value = serde_json::from_str(&text).map_err(|e| config(format!("not JSON: {e}")))?;
        // A string, or a list of named templates (the default one is the chat template).
        let source = match v.get("chat_template") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .ok_or_else(|| config("`chat_template` lists no `default` template".into()))?
                .to_owned(),
            _ => return Err(ChatError::NoTemplate(dir.into())),
        };
        let template = ChatTemplate {
            source,
            bos_token: token_text(v.get("bos_token")),
            eos_token: token_text(v.get("eos_token")),
        };
        // Parse now, so a broken template is refused at start, not at the first message.
        template.environment()?;
        Ok(template)
    }

    /// The end-of-turn token's text (e.g. `<|eot_id|>`), the template's `eos_token`.
    pub fn eos_token(&self) -> &str {
        &self.eos_token
    }

    fn environment(&self) -> Result<minijinja::Environment<'_>, ChatError> {
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        // Jinja as transformers configures it: blocks eat the newline after them.
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // transformers gives templates the local time as Python's `datetime.now().strftime`:
        // Llama 3.x writes today's date into its system header with it (and a fixed 2024 date
        // without it).
        env.add_function(
            "strftime_now",
            |format: String| -> Result<String, minijinja::Error> {
                use std::fmt::Write;
                let mut out = String::new();
                // chrono reports a directive it does not know as a formatting error (`to_string`
                // would panic on it).
                write!(out, "{}", chrono::Local::now().format(&format)).map_err(|_| {
                    minijinja::Error::new(
                        minijinja::ErrorKind::InvalidOperation,
                        format!("strftime_now: cannot format the date as {format:?}"),
                    )
                })?;
                Ok(out)
            },
        );
        env.add_template("chat", &self.source)
            .map_err(|e| ChatError::Render(e.to_string()))?;
        Ok(env)
    }

    /// The conversation as the model was trained to see it, ending with the assistant's header
    /// when `add_generation_prompt` (what to generate after).
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let env = self.environment()?;
        let t = env
            .get_template("chat")
            .map_err(|e| ChatError::Render(e.to_string()))?;
        // The variables transformers' `apply_chat_template` passes (no tools, no documents):
        // templates test `tools is none` as well as `tools is defined`.
        t.render(minijinja::context! {
            messages => messages,
            tools => (),
            documents => (),
            continue_final_message => false,
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token,
            eos_token => self.eos_token,
        })
        .map_err(|e| ChatError::Render(e.to_string()))
    }
}

/// The token ids that end a turn: the template's `eos_token` and every `eos_token_id` of
/// `generation_config.json` (a number or a list), as the tokenizer knows them.
pub fn stop_tokens(
    dir: &Path,
    template: &ChatTemplate,
    tokenizer: &tokenizers::Tokenizer,
) -> Vec<u32> {
    let mut ids: Vec<u32> = tokenizer
        .token_to_id(template.eos_token())
        .into_iter()
        .collect();
    if let Some(v) = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
    {
        match v.get("eos_token_id") {
            Some(Value::Number(n)) => ids.extend(n.as_u64().map(|x| x as u32)),
            Some(Value::Array(a)) => {
                ids.extend(a.iter().filter_map(Value::as_u64).map(|x| x as u32))
            }
            _ => {}
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}
