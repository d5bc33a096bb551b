//! A mock of the Anthropic Messages API, so the real Claude Code CLI runs offline with
//! `ANTHROPIC_BASE_URL` pointed at it (see "A mock Messages API for tests" in
//! `docs/claude-code.md`, which this module follows rule by rule).
//!
//! Replies are chosen from markers in the last user prompt (`[[error:529]]`, `[[tool:…]]`,
//! `[[bash:…]]`, `RUN_TOOL`, `[[think]]`, `[[slow:N]]`), so a test drives the agent by what it
//! types. Every request except `/_mock/*` is logged for assertions, in memory and optionally
//! to a JSONL file.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use super::common::MockServer;
use super::common::{
    RequestLog, ServerTask, after_each, announce_and_serve, bash_marker, delayed_event_stream,
    random_hex,
};

/// The model id reported by `GET /v1/models` and used when a request names none.
pub const MOCK_MODEL: &str = "mock-model";

/// Headers copied into the request log; everything else is left out.
const LOGGED_HEADERS: [&str; 9] = [
    "x-api-key",
    "authorization",
    "anthropic-version",
    "anthropic-beta",
    "user-agent",
    "x-app",
    "x-claude-code-session-id",
    "x-stainless-retry-count",
    "content-type",
];

/// `[[slow]]` without a count streams this many deltas.
const DEFAULT_SLOW_DELTAS: usize = 40;

/// Upper bound for `[[slow:N]]`, so a typo cannot make a response of millions of events.
const MAX_SLOW_DELTAS: usize = 10_000;

/// Knobs of the mock. The defaults match the documented behaviour.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Pause before each `text_delta` in `[[slow:N]]` mode.
    pub delay: Duration,
    /// Reported as `usage.cache_creation_input_tokens` on every reply.
    pub cache_creation_input_tokens: u64,
    /// Reported as `usage.cache_read_input_tokens` on every reply.
    pub cache_read_input_tokens: u64,
    /// Also append every logged request to this JSONL file.
    pub log_file: Option<PathBuf>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(250),
            cache_creation_input_tokens: 0,
            cache_read_input_tokens: 0,
            log_file: None,
        }
    }
}

/// Serves the mock on `listener` in a task owned by the returned handle.
///
/// Fails only when the listener has no local address or the log file cannot be opened.
pub async fn start(listener: TcpListener, options: MockOptions) -> io::Result<MockServer> {
    let shared = Arc::new(Shared {
        log: Arc::new(RequestLog::open(options.log_file.as_deref())?),
        options,
        token: CancellationToken::new(),
    });
    let router = Router::new()
        .fallback(handle)
        // The CLI re-sends the whole conversation and tool list; axum's 2 MB default is
        // too small for long sessions.
        .layer(DefaultBodyLimit::disable())
        .with_state(shared.clone());
    let server = ServerTask::spawn(listener, router, shared.token.clone())?;
    Ok(MockServer::new(shared.log.clone(), server))
}

/// The `mock-anthropic` subcommand: binds 127.0.0.1:`port` (0 picks one), prints
/// `MOCK-ANTHROPIC LISTENING <port>` on stdout and serves until Ctrl-C.
pub async fn run_cli(port: u16, options: MockOptions) -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let server = start(listener, options).await?.into_server();
    announce_and_serve("MOCK-ANTHROPIC", server).await
}

/// State shared by the handler and the [`MockServer`] handle.
struct Shared {
    options: MockOptions,
    log: Arc<RequestLog>,
    token: CancellationToken,
}

/// The one handler: dispatching by hand keeps "anything else, any method → 200 {}" simple,
/// where a router would answer 404 and 405.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let internal = path == "/_mock" || path.starts_with("/_mock/");
    if !internal {
        shared
            .log
            .record(&LOGGED_HEADERS, &method, &uri, &headers, &body);
    }
    tracing::debug!(http.method = %method, http.path = %uri, "mock request");
    let mut response = match (method.as_str(), path) {
        ("HEAD", _) => StatusCode::OK.into_response(),
        ("POST", "/v1/messages") => create_message(&shared, &body),
        ("POST", "/v1/messages/count_tokens") => count_tokens(&body),
        ("GET", "/v1/models") => list_models(),
        ("GET", "/_mock/requests") => Json(shared.log.entries()).into_response(),
        ("POST", "/_mock/reset") => {
            shared.log.clear();
            Json(json!({"ok": true})).into_response()
        }
        ("GET", "/_mock/health") => Json(json!({"ok": true})).into_response(),
        _ => Json(json!({})).into_response(),
    };
    if let Ok(id) = HeaderValue::from_str(&format!("req_mock_{}", random_hex())) {
        response.headers_mut().insert("request-id", id);
    }
    response
}

fn create_message(shared: &Shared, body: &Bytes) -> Response {
    let request: Value = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => return invalid_json(&err),
    };
    let reply = match choose_reply(&request, shared.options.delay) {
        Ok(reply) => reply,
        Err(status) => {
            return error_response(status, &format!("mock error {} requested", status.as_u16()));
        }
    };
    let model = request
        .get("model")
        .and_then(Value::as_str)
        .unwrap_or(MOCK_MODEL);
    let id = format!("msg_mock_{}", random_hex());
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        stream_reply(shared, &reply, &id, model)
    } else {
        Json(json_reply(&shared.options, &reply, &id, model)).into_response()
    }
}

fn count_tokens(body: &Bytes) -> Response {
    match serde_json::from_slice::<Value>(body) {
        Ok(request) => {
            Json(json!({"input_tokens": input_tokens(&last_user_turn(&request).prompt)}))
                .into_response()
        }
        Err(err) => invalid_json(&err),
    }
}

fn list_models() -> Response {
    Json(json!({
        "data": [{
            "type": "model",
            "id": MOCK_MODEL,
            "display_name": "Mock Model",
            "created_at": "2025-01-01T00:00:00Z",
        }],
        "has_more": false,
        "first_id": MOCK_MODEL,
        "last_id": MOCK_MODEL,
    }))
    .into_response()
}

fn invalid_json(err: &serde_json::Error) -> Response {
    error_response(
        StatusCode::BAD_REQUEST,
        &format!("request body is not valid JSON: {err}"),
    )
}

/// An Anthropic-style error: `{"type":"error","error":{"type":…,"message":…}}`.
fn error_response(status: StatusCode, message: &str) -> Response {
    let kind = match status.as_u16() {
        400 => "invalid_request_error",
        401 => "authentication_error",
        403 => "permission_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        529 => "overloaded_error",
        _ => "api_error",
    };
    let body = json!({"type": "error", "error": {"type": kind, "message": message}});
    (status, Json(body)).into_response()
}

// ---------------------------------------------------------------------------------------
// Choosing the reply
// ---------------------------------------------------------------------------------------

/// The part of a request the reply depends on.
#[derive(Debug, Default, PartialEq)]
struct UserTurn {
    /// The last real text of the last user message, trimmed; empty when there is none.
    prompt: String,
    /// The texts of the message's `tool_result` blocks, in order.
    tool_results: Vec<String>,
}

/// One content block of the reply, ready for both the JSON and the SSE form.
#[derive(Debug)]
struct Block {
    /// The `content_block` of `content_block_start`.
    start: Value,
    /// The finished block, for the non-streaming message.
    full: Value,
    /// The `delta` objects of the `content_block_delta` events, in order.
    deltas: Vec<Value>,
    /// Pause before each delta (zero except for a `[[slow]]` text block).
    delay: Duration,
}

#[derive(Debug)]
struct Reply {
    blocks: Vec<Block>,
    stop_reason: &'static str,
    input_tokens: u64,
}

impl Reply {
    fn output_tokens(&self) -> u64 {
        1 + self
            .blocks
            .iter()
            .map(|b| b.deltas.len() as u64)
            .sum::<u64>()
    }
}

fn input_tokens(prompt: &str) -> u64 {
    10 + prompt.chars().count() as u64
}

/// Applies the rules of the spec in order; `Err` is an `[[error:CODE]]` request.
fn choose_reply(request: &Value, slow_delay: Duration) -> Result<Reply, StatusCode> {
    let turn = last_user_turn(request);
    let prompt = turn.prompt.as_str();
    let input_tokens = input_tokens(prompt);
    if let Some(status) = error_marker(prompt) {
        return Err(status);
    }
    if prompt.is_empty() && !turn.tool_results.is_empty() {
        let text = format!("MOCK-TOOL-RESULT: {}", turn.tool_results.join(" | "));
        return Ok(Reply {
            blocks: vec![text_block(&text, None)],
            stop_reason: "end_turn",
            input_tokens,
        });
    }

    let tool = tool_marker(prompt)
        .or_else(|| {
            bash_marker(prompt).map(|command| {
                (
                    "Bash".to_owned(),
                    json!({"command": command, "description": "mock tool call"}),
                )
            })
        })
        .or_else(|| {
            prompt.contains("RUN_TOOL").then(|| {
                (
                    "Bash".to_owned(),
                    json!({"command": "echo hi", "description": "Print hi"}),
                )
            })
        });
    let slow = slow_marker(prompt).map(|n| (n, slow_delay));
    let mut blocks = Vec::new();
    if prompt.contains("[[think]]") {
        blocks.push(thinking_block(&format!("MOCK-THINKING about: {prompt}")));
    }
    let stop_reason = match tool {
        Some((name, input)) => {
            blocks.push(text_block(&format!("MOCK: calling {name}"), slow));
            blocks.push(tool_use_block(&name, input));
            "tool_use"
        }
        None => {
            blocks.push(text_block(&format!("MOCK-ECHO: {prompt}"), slow));
            "end_turn"
        }
    };
    Ok(Reply {
        blocks,
        stop_reason,
        input_tokens,
    })
}

/// Finds the last `role:"user"` message and splits it into prompt and tool results.
fn last_user_turn(request: &Value) -> UserTurn {
    let message = request
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|messages| {
            messages
                .iter()
                .rev()
                .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        });
    let mut turn = UserTurn::default();
    match message.and_then(|m| m.get("content")) {
        Some(Value::String(text)) => turn.prompt = text.trim().to_owned(),
        Some(Value::Array(blocks)) => {
            for block in blocks {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => {
                        let text = block
                            .get("text")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .trim();
                        // The CLI wraps context in reminder blocks and marks interrupts;
                        // neither is something the user typed.
                        if !text.is_empty()
                            && !text.starts_with("<system-reminder>")
                            && !text.starts_with("[Request interrupted")
                        {
                            turn.prompt = text.to_owned();
                        }
                    }
                    Some("tool_result") => turn.tool_results.push(tool_result_text(block)),
                    _ => {}
                }
            }
        }
        _ => {}
    }
    turn
}

/// A `tool_result`'s content: a string, or text blocks joined by newlines.
fn tool_result_text(block: &Value) -> String {
    match block.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// `[[error:CODE]]` with CODE in 200..=599 (anything else is not treated as a marker).
fn error_marker(prompt: &str) -> Option<StatusCode> {
    after_each(prompt, "[[error:").find_map(|rest| {
        let (code, _) = rest.split_once("]]")?;
        let code: u16 = code.trim().parse().ok()?;
        if (200..=599).contains(&code) {
            StatusCode::from_u16(code).ok()
        } else {
            None
        }
    })
}

/// `[[tool:NAME:{json}]]`, or `[[tool:NAME]]` for an empty input. NAME follows the API's
/// tool-name rule; the input must be a JSON object.
fn tool_marker(prompt: &str) -> Option<(String, Value)> {
    after_each(prompt, "[[tool:").find_map(|rest| {
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '-'))?;
        let (name, rest) = rest.split_at(end);
        if name.is_empty() {
            return None;
        }
        if rest.starts_with("]]") {
            return Some((name.to_owned(), json!({})));
        }
        let json_text = rest.strip_prefix(':')?;
        // Parse exactly one value so that `]]` inside the JSON does not end the marker.
        let mut values = serde_json::Deserializer::from_str(json_text).into_iter::<Value>();
        let input = values.next()?.ok()?;
        let tail = json_text.get(values.byte_offset()..)?;
        (input.is_object() && tail.trim_start().starts_with("]]")).then(|| (name.to_owned(), input))
    })
}

/// `[[slow]]` (40 deltas) or `[[slow:N]]`, N clamped to 1..=10000.
fn slow_marker(prompt: &str) -> Option<usize> {
    if prompt.contains("[[slow]]") {
        return Some(DEFAULT_SLOW_DELTAS);
    }
    after_each(prompt, "[[slow:").find_map(|rest| {
        let (n, _) = rest.split_once("]]")?;
        let n: usize = n.trim().parse().ok()?;
        Some(n.clamp(1, MAX_SLOW_DELTAS))
    })
}

/// A text block in 3 deltas, or with `slow = (N, delay)` the text plus ` w0` … ` w<N-1>`
/// in N delayed deltas.
fn text_block(text: &str, slow: Option<(usize, Duration)>) -> Block {
    let (pieces, delay) = match slow {
        Some((n, delay)) => {
            let pieces = (0..n)
                .map(|i| {
                    if i == 0 {
                        format!("{text} w0")
                    } else {
                        format!(" w{i}")
                    }
                })
                .collect();
            (pieces, delay)
        }
        None => (split_even(text, 3), Duration::ZERO),
    };
    let full = pieces.concat();
    Block {
        start: json!({"type": "text", "text": ""}),
        full: json!({"type": "text", "text": full}),
        deltas: pieces
            .into_iter()
            .map(|t| json!({"type": "text_delta", "text": t}))
            .collect(),
        delay,
    }
}

fn thinking_block(thinking: &str) -> Block {
    let signature = "mock-signature";
    let mut deltas: Vec<Value> = split_even(thinking, 2)
        .into_iter()
        .map(|t| json!({"type": "thinking_delta", "thinking": t}))
        .collect();
    deltas.push(json!({"type": "signature_delta", "signature": signature}));
    Block {
        start: json!({"type": "thinking", "thinking": "", "signature": ""}),
        full: json!({"type": "thinking", "thinking": thinking, "signature": signature}),
        deltas,
        delay: Duration::ZERO,
    }
}

fn tool_use_block(name: &str, input: Value) -> Block {
    let id = format!("toolu_mock_{}", random_hex());
    let deltas = split_even(&input.to_string(), 3)
        .into_iter()
        .map(|part| json!({"type": "input_json_delta", "partial_json": part}))
        .collect();
    Block {
        start: json!({"type": "tool_use", "id": id, "name": name, "input": {}}),
        full: json!({"type": "tool_use", "id": id, "name": name, "input": input}),
        deltas,
        delay: Duration::ZERO,
    }
}

/// Cuts `text` into `n` pieces of (nearly) equal character counts; pieces may be empty.
fn split_even(text: &str, n: usize) -> Vec<String> {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    let chars = bounds.len() - 1;
    (0..n)
        .map(|k| {
            let from = bounds.get(k * chars / n).copied().unwrap_or(text.len());
            let to = bounds
                .get((k + 1) * chars / n)
                .copied()
                .unwrap_or(text.len());
            text.get(from..to).unwrap_or("").to_owned()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------
// Rendering the reply
// ---------------------------------------------------------------------------------------

fn usage(options: &MockOptions, input_tokens: u64, output_tokens: u64) -> Value {
    json!({
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": options.cache_creation_input_tokens,
        "cache_read_input_tokens": options.cache_read_input_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": options.cache_creation_input_tokens,
            "ephemeral_1h_input_tokens": 0,
        },
        "output_tokens": output_tokens,
        "service_tier": "standard",
    })
}

fn json_reply(options: &MockOptions, reply: &Reply, id: &str, model: &str) -> Value {
    json!({
        "id": id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": reply.blocks.iter().map(|b| b.full.clone()).collect::<Vec<_>>(),
        "stop_reason": reply.stop_reason,
        "stop_sequence": null,
        "usage": usage(options, reply.input_tokens, reply.output_tokens()),
    })
}

/// One SSE event, `data` already carrying its `"type"`.
fn sse_event(data: &Value) -> Bytes {
    let kind = data.get("type").and_then(Value::as_str).unwrap_or("");
    Bytes::from(format!("event: {kind}\ndata: {data}\n\n"))
}

/// The whole event sequence, each event with the pause to take before sending it.
fn sse_events(
    options: &MockOptions,
    reply: &Reply,
    id: &str,
    model: &str,
) -> Vec<(Duration, Bytes)> {
    let mut events = Vec::new();
    let mut now = |data: Value| events.push((Duration::ZERO, sse_event(&data)));
    now(json!({
        "type": "message_start",
        "message": {
            "id": id,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": null,
            "stop_sequence": null,
            "usage": usage(options, reply.input_tokens, 1),
        },
    }));
    now(json!({"type": "ping"}));
    for (index, block) in reply.blocks.iter().enumerate() {
        events.push((
            Duration::ZERO,
            sse_event(&json!({"type": "content_block_start", "index": index, "content_block": block.start})),
        ));
        for delta in &block.deltas {
            events.push((
                block.delay,
                sse_event(&json!({"type": "content_block_delta", "index": index, "delta": delta})),
            ));
        }
        events.push((
            Duration::ZERO,
            sse_event(&json!({"type": "content_block_stop", "index": index})),
        ));
    }
    events.push((
        Duration::ZERO,
        sse_event(&json!({
            "type": "message_delta",
            "delta": {"stop_reason": reply.stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": reply.output_tokens()},
        })),
    ));
    events.push((Duration::ZERO, sse_event(&json!({"type": "message_stop"}))));
    events
}

/// Streams the events, one body chunk each.
fn stream_reply(shared: &Shared, reply: &Reply, id: &str, model: &str) -> Response {
    delayed_event_stream(sse_events(&shared.options, reply, id, model), &shared.token)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE};

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn spawn(options: MockOptions) -> io::Result<MockServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        start(listener, options).await
    }

    fn user(content: Value) -> Value {
        json!({"role": "user", "content": content})
    }

    fn request(messages: Value, stream: bool) -> Value {
        json!({"model": "claude-test", "max_tokens": 1024, "stream": stream, "messages": messages})
    }

    async fn post(server: &MockServer, body: &Value) -> reqwest::Result<reqwest::Response> {
        reqwest::Client::new()
            .post(format!("{}/v1/messages?beta=true", server.base_url()))
            .json(body)
            .send()
            .await
    }

    /// `(event name, data)` per SSE event; checks that each data carries its own type.
    fn parse_sse(text: &str) -> Vec<(String, Value)> {
        text.split("\n\n")
            .filter(|chunk| !chunk.is_empty())
            .map(|chunk| {
                let mut lines = chunk.lines();
                let event = lines
                    .next()
                    .and_then(|l| l.strip_prefix("event: "))
                    .expect("event line");
                let data = lines
                    .next()
                    .and_then(|l| l.strip_prefix("data: "))
                    .expect("data line");
                assert_eq!(lines.next(), None, "one data line per event");
                let data: Value = serde_json::from_str(data).expect("data is JSON");
                assert_eq!(data["type"], event, "data carries its type");
                (event.to_owned(), data)
            })
            .collect()
    }

    async fn stream(
        server: &MockServer,
        prompt: &str,
    ) -> Result<Vec<(String, Value)>, Box<dyn std::error::Error>> {
        let response = post(server, &request(json!([user(json!(prompt))]), true)).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        assert_eq!(response.headers()[CACHE_CONTROL], "no-cache");
        Ok(parse_sse(&response.text().await?))
    }

    fn names(events: &[(String, Value)]) -> Vec<&str> {
        events.iter().map(|(name, _)| name.as_str()).collect()
    }

    /// The concatenated deltas of block `index`, by delta field.
    fn block_text(events: &[(String, Value)], index: u64, field: &str) -> String {
        events
            .iter()
            .filter(|(name, data)| name == "content_block_delta" && data["index"] == index)
            .filter_map(|(_, data)| data["delta"][field].as_str())
            .collect()
    }

    fn message_delta(events: &[(String, Value)]) -> &Value {
        &events
            .iter()
            .find(|(name, _)| name == "message_delta")
            .expect("message_delta")
            .1
    }

    #[tokio::test]
    async fn echo_streams_the_documented_event_sequence() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let response = post(&server, &request(json!([user(json!("  hello  "))]), true)).await?;
        let request_id = response.headers()["request-id"].to_str()?.to_owned();
        assert!(request_id.starts_with("req_mock_"), "{request_id}");
        let events = parse_sse(&response.text().await?);
        assert_eq!(
            names(&events),
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        let start = &events[0].1["message"];
        assert!(
            start["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("msg_mock_"))
        );
        assert_eq!(start["model"], "claude-test");
        assert_eq!(start["content"], json!([]));
        assert_eq!(start["usage"]["input_tokens"], 15);
        assert_eq!(start["usage"]["output_tokens"], 1);
        assert_eq!(start["usage"]["service_tier"], "standard");
        assert_eq!(
            events[2].1["content_block"],
            json!({"type": "text", "text": ""})
        );
        assert_eq!(block_text(&events, 0, "text"), "MOCK-ECHO: hello");
        assert_eq!(events[6].1["index"], 0);
        let delta = message_delta(&events);
        assert_eq!(
            delta["delta"],
            json!({"stop_reason": "end_turn", "stop_sequence": null})
        );
        assert_eq!(delta["usage"]["output_tokens"], 4);
        Ok(())
    }

    #[tokio::test]
    async fn prompt_skips_reminders_and_interrupt_markers() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let content = json!([
            {"type": "text", "text": "<system-reminder>ignore me</system-reminder>"},
            {"type": "text", "text": " the question "},
            {"type": "text", "text": "[Request interrupted by user]"},
        ]);
        let messages =
            json!([user(json!("old")), {"role": "assistant", "content": "x"}, user(content)]);
        let events = parse_sse(
            &post(&server, &request(messages, true))
                .await?
                .text()
                .await?,
        );
        assert_eq!(block_text(&events, 0, "text"), "MOCK-ECHO: the question");
        Ok(())
    }

    #[tokio::test]
    async fn think_puts_a_signed_thinking_block_first() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let events = stream(&server, "why [[think]]").await?;
        assert_eq!(
            events[2].1["content_block"],
            json!({"type": "thinking", "thinking": "", "signature": ""})
        );
        let kinds: Vec<&str> = events
            .iter()
            .filter(|(_, d)| d["index"] == 0 && d["type"] == "content_block_delta")
            .filter_map(|(_, d)| d["delta"]["type"].as_str())
            .collect();
        assert_eq!(
            kinds,
            ["thinking_delta", "thinking_delta", "signature_delta"]
        );
        assert_eq!(
            block_text(&events, 0, "thinking"),
            "MOCK-THINKING about: why [[think]]"
        );
        assert_eq!(block_text(&events, 0, "signature"), "mock-signature");
        assert_eq!(block_text(&events, 1, "text"), "MOCK-ECHO: why [[think]]");
        assert_eq!(message_delta(&events)["usage"]["output_tokens"], 7);
        Ok(())
    }

    #[tokio::test]
    async fn tool_marker_calls_the_named_tool() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let events = stream(
            &server,
            r#"go [[tool:Read:{"file_path":"/x","n":[[1]]}]] now"#,
        )
        .await?;
        assert_eq!(block_text(&events, 0, "text"), "MOCK: calling Read");
        let start = &events
            .iter()
            .find(|(n, d)| n == "content_block_start" && d["index"] == 1)
            .ok_or("no tool block")?
            .1["content_block"];
        assert_eq!(start["type"], "tool_use");
        assert_eq!(start["name"], "Read");
        assert_eq!(start["input"], json!({}));
        assert!(
            start["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("toolu_mock_"))
        );
        let partial: Vec<_> = events
            .iter()
            .filter(|(_, d)| d["index"] == 1 && d["delta"]["type"] == "input_json_delta")
            .collect();
        assert_eq!(partial.len(), 3);
        let input: Value = serde_json::from_str(&block_text(&events, 1, "partial_json"))?;
        assert_eq!(input, json!({"file_path": "/x", "n": [[1]]}));
        let delta = message_delta(&events);
        assert_eq!(delta["delta"]["stop_reason"], "tool_use");
        assert_eq!(delta["usage"]["output_tokens"], 7);
        Ok(())
    }

    #[tokio::test]
    async fn bash_marker_and_run_tool_call_bash() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let events = stream(&server, "[[bash:[[ -f x ]] && echo created > f]] please").await?;
        assert_eq!(block_text(&events, 0, "text"), "MOCK: calling Bash");
        let input: Value = serde_json::from_str(&block_text(&events, 1, "partial_json"))?;
        assert_eq!(
            input,
            json!({"command": "[[ -f x ]] && echo created > f", "description": "mock tool call"})
        );

        let events = stream(&server, "please RUN_TOOL").await?;
        let input: Value = serde_json::from_str(&block_text(&events, 1, "partial_json"))?;
        assert_eq!(
            input,
            json!({"command": "echo hi", "description": "Print hi"})
        );
        assert_eq!(message_delta(&events)["delta"]["stop_reason"], "tool_use");
        Ok(())
    }

    #[tokio::test]
    async fn tool_results_without_a_prompt_are_reported() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let results = json!([
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "hi"},
            {"type": "tool_result", "tool_use_id": "toolu_2", "is_error": true,
             "content": [{"type": "text", "text": "denied"}]},
            {"type": "text", "text": "<system-reminder>x</system-reminder>"},
        ]);
        let messages = json!([
            user(json!("RUN_TOOL")),
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Bash", "input": {}}]},
            user(results.clone()),
        ]);
        let events = parse_sse(
            &post(&server, &request(messages, true))
                .await?
                .text()
                .await?,
        );
        assert_eq!(
            block_text(&events, 0, "text"),
            "MOCK-TOOL-RESULT: hi | denied"
        );
        assert_eq!(message_delta(&events)["delta"]["stop_reason"], "end_turn");
        assert_eq!(events[0].1["message"]["usage"]["input_tokens"], 10);

        // A prompt typed after an interrupted tool call wins over the results.
        let mut with_prompt = results.as_array().cloned().unwrap_or_default();
        with_prompt.push(json!({"type": "text", "text": "next"}));
        let events = parse_sse(
            &post(&server, &request(json!([user(json!(with_prompt))]), true))
                .await?
                .text()
                .await?,
        );
        assert_eq!(block_text(&events, 0, "text"), "MOCK-ECHO: next");
        Ok(())
    }

    #[tokio::test]
    async fn error_marker_answers_with_the_code() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let cases = [
            (400, "invalid_request_error"),
            (401, "authentication_error"),
            (403, "permission_error"),
            (404, "not_found_error"),
            (429, "rate_limit_error"),
            (529, "overloaded_error"),
            (500, "api_error"),
            (503, "api_error"),
        ];
        for (code, kind) in cases {
            for stream in [true, false] {
                let prompt = format!("fail [[error:{code}]]");
                let response =
                    post(&server, &request(json!([user(json!(prompt))]), stream)).await?;
                assert_eq!(response.status().as_u16(), code);
                assert!(response.headers().contains_key("request-id"));
                let body: Value = response.json().await?;
                assert_eq!(
                    body,
                    json!({"type": "error", "error": {"type": kind, "message": format!("mock error {code} requested")}})
                );
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn bad_json_is_an_invalid_request_error() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        for path in ["/v1/messages", "/v1/messages/count_tokens"] {
            let response = reqwest::Client::new()
                .post(format!("{}{path}", server.base_url()))
                .body("{not json")
                .send()
                .await?;
            assert_eq!(response.status(), 400);
            let body: Value = response.json().await?;
            assert_eq!(body["type"], "error");
            assert_eq!(body["error"]["type"], "invalid_request_error");
        }
        // Valid JSON of the wrong shape still gets an answer.
        for odd in [
            json!(null),
            json!([1]),
            json!({"messages": 3}),
            json!({"messages": [{"role": "user", "content": 7}]}),
        ] {
            let response = post(&server, &odd).await?;
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await?;
            assert_eq!(body["content"][0]["text"], "MOCK-ECHO: ");
            assert_eq!(body["model"], MOCK_MODEL);
        }
        Ok(())
    }

    #[tokio::test]
    async fn slow_mode_streams_n_delayed_deltas() -> TestResult {
        let delay = Duration::from_millis(5);
        let server = spawn(MockOptions {
            delay,
            ..MockOptions::default()
        })
        .await?;
        let started = Instant::now();
        let events = stream(&server, "[[slow:5]] tell").await?;
        assert!(started.elapsed() >= delay * 5, "{:?}", started.elapsed());
        let deltas: Vec<&str> = events
            .iter()
            .filter(|(n, _)| n == "content_block_delta")
            .filter_map(|(_, d)| d["delta"]["text"].as_str())
            .collect();
        assert_eq!(
            deltas,
            ["MOCK-ECHO: [[slow:5]] tell w0", " w1", " w2", " w3", " w4"]
        );
        assert_eq!(
            names(&events),
            [
                "message_start",
                "ping",
                "content_block_start",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop",
            ]
        );
        assert_eq!(message_delta(&events)["usage"]["output_tokens"], 6);

        let events = stream(&server, "[[slow]] [[think]]").await?;
        let count = events
            .iter()
            .filter(|(_, d)| d["index"] == 1 && d["delta"]["type"] == "text_delta")
            .count();
        assert_eq!(count, DEFAULT_SLOW_DELTAS);
        Ok(())
    }

    #[tokio::test]
    async fn a_client_hanging_up_mid_stream_does_not_stop_the_server() -> TestResult {
        let server = spawn(MockOptions {
            delay: Duration::from_millis(50),
            ..MockOptions::default()
        })
        .await?;
        let mut response = post(
            &server,
            &request(json!([user(json!("[[slow:100]]"))]), true),
        )
        .await?;
        let first = response.chunk().await?.ok_or("no first chunk")?;
        assert!(first.starts_with(b"event: message_start"));
        drop(response);
        let events = stream(&server, "still there?").await?;
        assert_eq!(block_text(&events, 0, "text"), "MOCK-ECHO: still there?");
        server.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn non_streaming_returns_the_whole_message() -> TestResult {
        let options = MockOptions {
            cache_creation_input_tokens: 7,
            cache_read_input_tokens: 3,
            ..MockOptions::default()
        };
        let server = spawn(options).await?;
        let prompt = "[[think]] [[tool:Grep:{\"pattern\":\"x\"}]]";
        let response = post(&server, &request(json!([user(json!(prompt))]), false)).await?;
        assert_eq!(response.status(), 200);
        assert!(
            response.headers()[CONTENT_TYPE]
                .to_str()?
                .starts_with("application/json")
        );
        let body: Value = response.json().await?;
        assert!(
            body["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("msg_mock_"))
        );
        assert_eq!(body["type"], "message");
        assert_eq!(body["role"], "assistant");
        assert_eq!(body["model"], "claude-test");
        assert_eq!(body["stop_reason"], "tool_use");
        assert_eq!(body["stop_sequence"], Value::Null);
        let content = body["content"].as_array().ok_or("content")?;
        assert_eq!(content.len(), 3);
        assert_eq!(
            content[0],
            json!({"type": "thinking", "thinking": format!("MOCK-THINKING about: {prompt}"), "signature": "mock-signature"})
        );
        assert_eq!(
            content[1],
            json!({"type": "text", "text": "MOCK: calling Grep"})
        );
        assert_eq!(content[2]["name"], "Grep");
        assert_eq!(content[2]["input"], json!({"pattern": "x"}));
        let usage = &body["usage"];
        assert_eq!(usage["input_tokens"], 10 + prompt.chars().count() as u64);
        assert_eq!(usage["cache_creation_input_tokens"], 7);
        assert_eq!(usage["cache_read_input_tokens"], 3);
        assert_eq!(usage["output_tokens"], 10);
        assert_eq!(usage["service_tier"], "standard");
        Ok(())
    }

    #[tokio::test]
    async fn count_tokens_and_models() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let client = reqwest::Client::new();
        let body: Value = client
            .post(format!(
                "{}/v1/messages/count_tokens?beta=true",
                server.base_url()
            ))
            .json(&request(json!([user(json!("abcd"))]), false))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(body, json!({"input_tokens": 14}));

        let body: Value = client
            .get(format!("{}/v1/models", server.base_url()))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(body["data"][0]["id"], "mock-model");
        assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
        assert_eq!(body["has_more"], false);
        assert_eq!(body["first_id"], "mock-model");
        assert_eq!(body["last_id"], "mock-model");
        Ok(())
    }

    #[tokio::test]
    async fn requests_are_logged_and_reset() -> TestResult {
        let dir = tempfile::tempdir()?;
        let log_file = dir.path().join("requests.jsonl");
        let server = spawn(MockOptions {
            log_file: Some(log_file.clone()),
            ..MockOptions::default()
        })
        .await?;
        let client = reqwest::Client::new();
        let base = server.base_url();
        client
            .post(format!("{base}/v1/messages?beta=true"))
            .header("x-api-key", "sk-test")
            .header("anthropic-version", "2023-06-01")
            .header("x-app", "cli")
            .header("x-not-logged", "secret")
            .json(&request(json!([user(json!("hi"))]), false))
            .send()
            .await?;
        client
            .post(format!("{base}/elsewhere"))
            .body("plain text")
            .send()
            .await?;
        let health: Value = client
            .get(format!("{base}/_mock/health"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(health, json!({"ok": true}));

        let log: Vec<Value> = client
            .get(format!("{base}/_mock/requests"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(log, server.requests());
        assert_eq!(log.len(), 2, "{log:?}");
        assert_eq!(log[0]["method"], "POST");
        assert_eq!(log[0]["path"], "/v1/messages?beta=true");
        assert!(
            log[0]["t"]
                .as_str()
                .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
        );
        assert_eq!(
            log[0]["headers"],
            json!({"x-api-key": "sk-test", "anthropic-version": "2023-06-01", "x-app": "cli",
                   "content-type": "application/json"})
        );
        assert_eq!(log[0]["body"]["messages"][0]["content"], "hi");
        assert_eq!(log[1]["path"], "/elsewhere");
        assert_eq!(log[1]["body"], "plain text");

        let mirrored = std::fs::read_to_string(&log_file)?;
        let lines: Vec<Value> = mirrored
            .lines()
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()?;
        assert_eq!(lines, log);

        let reset: Value = client
            .post(format!("{base}/_mock/reset"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(reset, json!({"ok": true}));
        assert!(server.requests().is_empty());
        server.reset();
        Ok(())
    }

    #[tokio::test]
    async fn anything_else_is_an_empty_ok() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let client = reqwest::Client::new();
        let base = server.base_url();
        for (method, path) in [
            (reqwest::Method::GET, "/nowhere"),
            (reqwest::Method::PUT, "/v1/messages"),
            (reqwest::Method::DELETE, "/v1/models"),
            (reqwest::Method::POST, "/api/event_logging/batch"),
        ] {
            let response = client
                .request(method, format!("{base}{path}"))
                .send()
                .await?;
            assert_eq!(response.status(), 200);
            assert!(response.headers().contains_key("request-id"));
            assert_eq!(response.json::<Value>().await?, json!({}));
        }
        let response = client.head(format!("{base}/v1/messages")).send().await?;
        assert_eq!(response.status(), 200);
        assert!(response.bytes().await?.is_empty());
        assert_eq!(server.requests().len(), 5);
        Ok(())
    }

    #[tokio::test]
    async fn chunked_request_bodies_are_read() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let body = request(json!([user(json!("chunked"))]), false).to_string();
        let (head, tail) = body.split_at(body.len() / 2);
        let chunks: Vec<Result<String, io::Error>> = vec![Ok(head.to_owned()), Ok(tail.to_owned())];
        let response = reqwest::Client::new()
            .post(format!("{}/v1/messages", server.base_url()))
            .header(CONTENT_TYPE, "application/json")
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await?;
        let reply: Value = response.json().await?;
        assert_eq!(reply["content"][0]["text"], "MOCK-ECHO: chunked");
        Ok(())
    }

    #[tokio::test]
    async fn shutdown_ends_open_streams() -> TestResult {
        let server = spawn(MockOptions {
            delay: Duration::from_secs(30),
            ..MockOptions::default()
        })
        .await?;
        let mut response =
            post(&server, &request(json!([user(json!("[[slow:3]]"))]), true)).await?;
        response.chunk().await?.ok_or("no first chunk")?;
        let started = Instant::now();
        server.shutdown().await?;
        assert!(started.elapsed() < Duration::from_secs(5));
        // The stream ends early but cleanly.
        while response.chunk().await?.is_some() {}
        Ok(())
    }

    #[tokio::test]
    async fn shutdown_stops_listening() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let url = format!("{}/_mock/health", server.base_url());
        assert!(reqwest::get(&url).await?.status().is_success());
        server.shutdown().await?;
        assert!(reqwest::get(&url).await.is_err());
        Ok(())
    }

    #[test]
    fn markers_parse_or_fall_through() {
        assert_eq!(
            error_marker("x [[error:529]]"),
            Some(StatusCode::from_u16(529).unwrap())
        );
        assert_eq!(
            error_marker("[[error:abc]] [[error:99]] [[error:1000]]"),
            None
        );
        assert_eq!(
            tool_marker("[[tool:Read]]"),
            Some(("Read".to_owned(), json!({})))
        );
        assert_eq!(
            tool_marker("[[tool:Read:[1]]]"),
            None,
            "input must be an object"
        );
        assert_eq!(tool_marker("[[tool::{}]]"), None);
        assert_eq!(tool_marker("[[tool:a b:{}]]"), None);
        assert_eq!(tool_marker("[[tool:X:{\"a\":1}"), None);
        assert_eq!(
            bash_marker("[[bash:ls -la]] [[think]]").as_deref(),
            Some("ls -la")
        );
        assert_eq!(bash_marker("[[bash:ls"), None);
        assert_eq!(bash_marker("[[bash:é]]").as_deref(), Some("é"));
        assert_eq!(slow_marker("[[slow]]"), Some(40));
        assert_eq!(slow_marker("[[slow:0]]"), Some(1));
        assert_eq!(slow_marker("[[slow:x]]"), None);
    }

    #[test]
    fn split_even_keeps_every_character() {
        for text in ["", "a", "ab", "héllo wörld", "MOCK-ECHO: 日本語"] {
            let parts = split_even(text, 3);
            assert_eq!(parts.len(), 3);
            assert_eq!(parts.concat(), text);
        }
    }

    #[test]
    fn odd_messages_never_panic() {
        let odd = [
            json!({"messages": [{"role": "user", "content": [1, null, {"type": "text"}, {"type": "tool_result"}]}]}),
            json!({"messages": [{"role": 5}, {"content": "x"}]}),
            json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "content": [{"type": "image"}]}]}]}),
            json!("string"),
        ];
        for request in odd {
            let reply = choose_reply(&request, Duration::ZERO).expect("a reply");
            assert!(!reply.blocks.is_empty());
        }
    }
}
