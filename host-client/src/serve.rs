//! `veil-client serve`: an OpenAI-compatible HTTP endpoint on the device, so applications written
//! for the OpenAI API use the private model unchanged: `POST /v1/chat/completions` and
//! `POST /v1/completions` (streamed as server-sent events with `"stream": true`), `GET
//! /v1/models`.
//!
//! One model, one generation at a time: requests wait in a bounded queue (a full queue answers
//! 429) for the one worker thread that owns the private session (its server connection, mask
//! source and KV cache, kept across requests so a conversation resent whole feeds only its new
//! part). Errors are OpenAI-shaped JSON (`{"error": {"message", "type", ...}}`) with the HTTP
//! status that fits. It listens on localhost by default: the prompts it receives are the private
//! ones.

use std::net::SocketAddr;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};

use crate::chat::{ChatTemplate, Message};
use crate::generate::{GenOptions, GenStats};
use veil_core::model::SamplingParams;

/// One generation for the worker: the prompt's tokens, the options, and where its tokens go.
#[derive(Debug)]
pub struct Job {
    /// The whole prompt (a rendered conversation, or a completion prompt).
    pub ids: Vec<u32>,
    /// Sampling, limits, stop tokens.
    pub opts: GenOptions,
    /// Every token as it is generated, then the outcome.
    pub events: tokio::sync::mpsc::UnboundedSender<JobEvent>,
}

/// What the worker reports about a job.
#[derive(Debug)]
pub enum JobEvent {
    /// A generated token.
    Token(u32),
    /// The generation finished.
    Done(Vec<u32>, GenStats),
    /// It failed (the message says why).
    Failed(String),
}

/// The endpoint's settings.
#[derive(Debug)]
pub struct ServeConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The model's name in `/v1/models` and in responses.
    pub model: String,
    /// The chat template (`None`: not a chat model; `/v1/chat/completions` answers 400).
    pub template: Option<ChatTemplate>,
    /// The model's tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// Tokens that end a reply.
    pub stops: Vec<u32>,
    /// Defaults for what a request leaves out (the command line's options).
    pub defaults: GenOptions,
    /// The model's context, in tokens.
    pub context: usize,
    /// Requests that may wait for the worker.
    pub queue: usize,
}

struct Shared {
    config: ServeConfig,
    jobs: SyncSender<Job>,
    next_id: std::sync::atomic::AtomicU64,
}

/// An OpenAI-shaped error response.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    fn bad(message: impl Into<String>, param: Option<&'static str>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": Value::Null,
        }});
        (self.status, Json(body)).into_response()
    }
}

/// Serves until the process ends; `worker` runs on its own thread and takes the jobs.
pub fn run(
    config: ServeConfig,
    worker: impl FnOnce(Receiver<Job>) + Send + 'static,
) -> anyhow::Result<()> {
    let (jobs, rx) = std::sync::mpsc::sync_channel(config.queue.max(1));
    std::thread::Builder::new()
        .name("veil-generate".into())
        .spawn(move || worker(rx))?;
    let listen = config.listen;
    let shared = Arc::new(Shared {
        config,
        jobs,
        next_id: Default::default(),
    });
    let app = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .fallback(|| async {
            ApiError {
                status: StatusCode::NOT_FOUND,
                message: "no such endpoint: this server offers /v1/models, /v1/chat/completions and /v1/completions".into(),
                kind: "invalid_request_error",
                param: None,
            }
        })
        .with_state(shared);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| anyhow::anyhow!("listening on {listen}: {e}"))?;
        eprintln!(
            "veil-client: OpenAI-compatible endpoint on http://{}/v1",
            listener.local_addr()?
        );
        axum::serve(listener, app).await?;
        Ok(())
    })
}

async fn models(State(s): State<Arc<Shared>>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{"id": s.config.model, "object": "model", "created": 0, "owned_by": "veil"}],
    }))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The parts of a request both endpoints share.
struct Common {
    stream: bool,
    opts: GenOptions,
}

fn number(body: &Value, key: &'static str) -> Result<Option<f64>, ApiError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| ApiError::bad(format!("`{key}` must be a number"), Some(key))),
    }
}

fn common(s: &Shared, body: &Value) -> Result<Common, ApiError> {
    if let Some(m) = body.get("model").and_then(Value::as_str) {
        if m != s.config.model {
            return Err(ApiError {
                status: StatusCode::NOT_FOUND,
                message: format!(
                    "the model `{m}` does not exist here; this server has `{}`",
                    s.config.model
                ),
                kind: "invalid_request_error",
                param: Some("model"),
            });
        }
    }
    if number(body, "n")?.is_some_and(|n| n != 1.0) {
        return Err(ApiError::bad("only `n = 1` is supported", Some("n")));
    }
    match body.get("stop") {
        None | Some(Value::Null) => {}
        Some(Value::Array(a)) if a.is_empty() => {}
        Some(_) => {
            return Err(ApiError::bad(
                "`stop` sequences are not supported: a reply ends at the model's own end-of-turn tokens or at `max_tokens`",
                Some("stop"),
            ))
        }
    }
    let mut opts = s.config.defaults.clone();
    opts.eos = s.config.stops.clone();
    let max = number(body, "max_completion_tokens")?.or(number(body, "max_tokens")?);
    if let Some(m) = max {
        if !(m >= 1.0 && m.fract() == 0.0) {
            return Err(ApiError::bad(
                "`max_tokens` must be a positive integer",
                Some("max_tokens"),
            ));
        }
        opts.max_new_tokens = m as usize;
    }
    // OpenAI's defaults: temperature 1, top_p 1.
    let temperature = number(body, "temperature")?.unwrap_or(1.0);
    let top_p = number(body, "top_p")?.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(ApiError::bad(
            "`temperature` must be between 0 and 2",
            Some("temperature"),
        ));
    }
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad("`top_p` must be in (0, 1]", Some("top_p")));
    }
    let q16 = |x: f64| (x * 65536.0).round().clamp(0.0, u32::MAX as f64) as u32;
    opts.sampling = if temperature == 0.0 {
        SamplingParams::GREEDY
    } else {
        SamplingParams {
            temperature_q16: q16(temperature).max(1),
            top_k: 0,
            top_p_q16: if top_p >= 1.0 { 0 } else { q16(top_p) },
        }
    };
    opts.seed = match number(body, "seed")? {
        Some(seed) if seed >= 0.0 && seed.fract() == 0.0 => seed as u64,
        Some(_) => {
            return Err(ApiError::bad(
                "`seed` must be a non-negative integer",
                Some("seed"),
            ))
        }
        None => {
            let mut b = [0u8; 8];
            rand_core::RngCore::fill_bytes(&mut rand_core::OsRng, &mut b);
            u64::from_le_bytes(b)
        }
    };
    let stream = body.get("stream").and_then(Value::as_bool).unwrap_or(false);
    Ok(Common { stream, opts })
}

fn parse(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad(format!("the request body is not JSON: {e}"), None))?;
    if !v.is_object() {
        return Err(ApiError::bad(
            "the request body must be a JSON object",
            None,
        ));
    }
    Ok(v)
}

/// The tokens of `text`; `add_special`: with the tokenizer's own special tokens (a plain prompt's
/// BOS, as `veil-client --prompt` encodes it; a rendered chat carries its own).
fn tokenize(s: &Shared, text: &str, add_special: bool) -> Result<Vec<u32>, ApiError> {
    let ids = s
        .config
        .tokenizer
        .encode(text, add_special)
        .map_err(|e| ApiError::bad(format!("tokenizing: {e}"), None))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        return Err(ApiError::bad("the prompt is empty", None));
    }
    if ids.len() >= s.config.context {
        return Err(ApiError::bad(
            format!(
                "the prompt has {} tokens; this model's context is {}",
                ids.len(),
                s.config.context
            ),
            None,
        ));
    }
    Ok(ids)
}

async fn chat_completions(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse(&body)?;
    let Some(template) = &s.config.template else {
        return Err(ApiError::bad(
            format!(
                "`{}` has no chat template (not a chat model): use /v1/completions",
                s.config.model
            ),
            Some("messages"),
        ));
    };
    let messages: Vec<Message> = match body.get("messages") {
        Some(Value::Array(list)) if !list.is_empty() => list
            .iter()
            .map(|m| {
                let role = m.get("role").and_then(Value::as_str);
                // Content: a string, or a list of text parts.
                let content = match m.get("content") {
                    Some(Value::String(t)) => Some(t.clone()),
                    Some(Value::Array(parts)) => parts
                        .iter()
                        .map(|p| p.get("text").and_then(Value::as_str))
                        .collect::<Option<Vec<_>>>()
                        .map(|t| t.concat()),
                    _ => None,
                };
                match (role, content) {
                    (Some(r), Some(c)) => Ok(Message::new(r, &c)),
                    _ => Err(ApiError::bad(
                        "each message needs a `role` and a text `content`",
                        Some("messages"),
                    )),
                }
            })
            .collect::<Result<_, _>>()?,
        _ => {
            return Err(ApiError::bad(
                "`messages` must be a non-empty list",
                Some("messages"),
            ))
        }
    };
    let c = common(&s, &body)?;
    let rendered = template
        .render(&messages, true)
        .map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let ids = tokenize(&s, &rendered, false)?;
    respond(s, ids, c, Kind::Chat).await
}

async fn completions(State(s): State<Arc<Shared>>, body: Bytes) -> Result<Response, ApiError> {
    let body = parse(&body)?;
    let prompt = match body.get("prompt") {
        Some(Value::String(p)) => p.clone(),
        Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
            a[0].as_str().unwrap_or_default().to_owned()
        }
        _ => return Err(ApiError::bad("`prompt` must be a string", Some("prompt"))),
    };
    let mut c = common(&s, &body)?;
    if body.get("max_tokens").is_none() {
        // The legacy endpoint's default.
        c.opts.max_new_tokens = 16;
    }
    let ids = tokenize(&s, &prompt, true)?;
    respond(s, ids, c, Kind::Completion).await
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

/// Queues the job and answers: the whole reply, or its tokens as server-sent events.
async fn respond(
    s: Arc<Shared>,
    ids: Vec<u32>,
    c: Common,
    kind: Kind,
) -> Result<Response, ApiError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let prompt_tokens = ids.len();
    match s.jobs.try_send(Job {
        ids,
        opts: c.opts,
        events: tx,
    }) {
        Ok(()) => {}
        Err(TrySendError::Full(_)) => {
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!(
                    "busy: {} requests are already waiting for this model; try again shortly",
                    s.config.queue
                ),
                kind: "rate_limit_error",
                param: None,
            })
        }
        Err(TrySendError::Disconnected(_)) => {
            return Err(ApiError {
                status: StatusCode::SERVICE_UNAVAILABLE,
                message: "the generation worker has stopped (see the log)".into(),
                kind: "server_error",
                param: None,
            })
        }
    }
    let n = s.next_id.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let id = match kind {
        Kind::Chat => format!("chatcmpl-veil-{n}"),
        Kind::Completion => format!("cmpl-veil-{n}"),
    };
    let created = now();
    let model = s.config.model.clone();
    let finish = |tokens: &[u32], stops: &[u32]| {
        if tokens.last().is_some_and(|t| stops.contains(t)) {
            "stop"
        } else {
            "length"
        }
    };
    if !c.stream {
        let (tokens, stats) = loop {
            match rx.recv().await {
                Some(JobEvent::Token(_)) => {}
                Some(JobEvent::Done(t, st)) => break (t, st),
                Some(JobEvent::Failed(e)) => return Err(server_error(e)),
                None => return Err(server_error("the generation worker stopped".into())),
            }
        };
        let text = reply_text(&s, &tokens);
        let usage = json!({
            "prompt_tokens": prompt_tokens,
            "completion_tokens": stats.generated_tokens,
            "total_tokens": prompt_tokens + stats.generated_tokens,
        });
        let reason = finish(&tokens, &s.config.stops);
        let body = match kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reason, "logprobs": Value::Null}],
                "usage": usage,
            }),
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": Value::Null}],
                "usage": usage,
            }),
        };
        return Ok(Json(body).into_response());
    }
    // Streamed: one event per piece of new text (decoded so far, special tokens not shown, an
    // incomplete UTF-8 sequence held back), then the finish reason, then `[DONE]`.
    let chunk = move |delta: Value, reason: Value| -> Event {
        let body = match kind {
            Kind::Chat => json!({
                "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": Value::Null}],
            }),
            Kind::Completion => json!({
                "id": id, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")),
                             "finish_reason": reason, "logprobs": Value::Null}],
            }),
        };
        Event::default().data(body.to_string())
    };
    let stream = async_stream(move |emit| async move {
        let mut tokens: Vec<u32> = Vec::new();
        let mut shown = 0usize;
        if kind == Kind::Chat {
            emit(chunk(
                json!({"role": "assistant", "content": ""}),
                Value::Null,
            ));
        }
        loop {
            match rx.recv().await {
                Some(JobEvent::Token(t)) => {
                    tokens.push(t);
                    let text = reply_text(&s, &tokens);
                    if !text.ends_with('\u{FFFD}') && text.len() > shown {
                        emit(chunk(json!({"content": &text[shown..]}), Value::Null));
                        shown = text.len();
                    }
                }
                Some(JobEvent::Done(t, _)) => {
                    let text = reply_text(&s, &t);
                    if text.len() > shown {
                        emit(chunk(json!({"content": &text[shown..]}), Value::Null));
                    }
                    emit(chunk(json!({}), json!(finish(&t, &s.config.stops))));
                    break;
                }
                Some(JobEvent::Failed(e)) => {
                    // The status line is gone: the error travels as an event, as OpenAI's does.
                    emit(Event::default().data(
                        json!({"error": {"message": e, "type": "server_error"}}).to_string(),
                    ));
                    break;
                }
                None => break,
            }
        }
        emit(Event::default().data("[DONE]"));
    });
    Ok(Sse::new(stream).into_response())
}

/// The reply's text: its tokens up to the first stop token, decoded without special tokens.
fn reply_text(s: &Shared, tokens: &[u32]) -> String {
    let kept = tokens
        .iter()
        .position(|t| s.config.stops.contains(t))
        .map_or(tokens, |i| &tokens[..i]);
    s.config.tokenizer.decode(kept, true).unwrap_or_default()
}

fn server_error(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
        kind: "server_error",
        param: None,
    }
}

/// A stream of SSE events that `body` produces by calling `emit` (events go through a channel:
/// the HTTP side reads them as they come).
fn async_stream<F, Fut>(
    body: F,
) -> impl futures_util::Stream<Item = Result<Event, std::convert::Infallible>>
where
    F: FnOnce(Box<dyn Fn(Event) + Send + Sync>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<Event>();
    let emit: Box<dyn Fn(Event) + Send + Sync> = Box::new(move |e| {
        let _ = tx.send(e);
    });
    tokio::spawn(body(emit));
    futures_util::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|e| (Ok(e), rx)) },
    )
}
