//! A mock of the OpenAI-compatible chat-completions API, so the real OpenCode CLI runs
//! offline with an `@ai-sdk/openai-compatible` provider pointed at it (see "A mock
//! chat-completions server" in `docs/opencode.md`, which this module follows rule by rule).
//!
//! The reply depends only on the request: a tool result after the last user message is
//! acknowledged with `TOOL_DONE: …`, `[[bash:CMD]]` in the prompt becomes one call of the
//! client's `bash` tool, and anything else is echoed as `MOCK_REPLY: …`. Every request except
//! `/_mock/*` and `/health` is logged for assertions, in memory and optionally to a JSONL file.

use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use super::common::MockServer;
use super::common::{
    RequestLog, ServerTask, announce_and_serve, bash_marker, delayed_event_stream, random_hex,
};

/// The default model id, reported by `GET /v1/models` and used when a request names none.
pub const MOCK_MODEL: &str = "mock-model";

/// Echoed prompts and tool outputs are cut to this many characters.
const MAX_ECHO_CHARS: usize = 200;

/// Tool-call arguments stream in pieces of this many characters, so clients must reassemble.
const ARGUMENT_PIECE_CHARS: usize = 16;

/// Headers copied into the request log; everything else is left out.
const LOGGED_HEADERS: [&str; 5] = [
    "authorization",
    "user-agent",
    "content-type",
    "accept",
    "x-session-affinity",
];

/// Knobs of the mock. The defaults match the documented behaviour.
#[derive(Debug, Clone)]
pub struct MockOptions {
    /// Pause between two streamed words.
    pub delay: Duration,
    /// The model id listed by `/v1/models` and reported when a request names none.
    pub model: String,
    /// Answer every plain prompt with this text instead of `MOCK_REPLY: <prompt>`.
    pub reply: Option<String>,
    /// Also append every logged request to this JSONL file.
    pub log_file: Option<PathBuf>,
}

impl Default for MockOptions {
    fn default() -> Self {
        Self {
            delay: Duration::from_millis(20),
            model: MOCK_MODEL.to_owned(),
            reply: None,
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
        // OpenCode re-sends the whole conversation, system prompt and tool schemas on every
        // step; axum's 2 MB default is too small for long sessions.
        .layer(DefaultBodyLimit::disable())
        .with_state(shared.clone());
    let server = ServerTask::spawn(listener, router, shared.token.clone())?;
    Ok(MockServer::new(shared.log.clone(), server))
}

/// The `mock-openai` subcommand: binds 127.0.0.1:`port` (0 picks one), prints
/// `MOCK-OPENAI LISTENING <port>` on stdout and serves until Ctrl-C.
pub async fn run_cli(port: u16, options: MockOptions) -> io::Result<()> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).await?;
    let server = start(listener, options).await?.into_server();
    announce_and_serve("MOCK-OPENAI", server).await
}

/// State shared by the handler and the [`MockServer`] handle.
struct Shared {
    options: MockOptions,
    log: Arc<RequestLog>,
    token: CancellationToken,
}

/// The one handler: dispatching by hand gives every unknown method and path the same JSON
/// 404, where a router would answer 405 or an empty 404 for some of them.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    // Probes and the mock's own routes are not something the client under test said.
    let internal = path == "/health" || path == "/_mock" || path.starts_with("/_mock/");
    if !internal {
        shared
            .log
            .record(&LOGGED_HEADERS, &method, &uri, &headers, &body);
    }
    tracing::debug!(http.method = %method, http.path = %uri, "mock request");
    match (method.as_str(), path) {
        ("GET", "/v1/models" | "/models") => list_models(&shared.options.model),
        ("POST", "/v1/chat/completions" | "/chat/completions") => {
            create_chat_completion(&shared, &body)
        }
        ("GET", "/health") => Json(json!({"ok": true})).into_response(),
        ("GET", "/_mock/requests") => Json(shared.log.entries()).into_response(),
        ("POST", "/_mock/reset") => {
            shared.log.clear();
            Json(json!({"ok": true})).into_response()
        }
        _ => error_response(
            StatusCode::NOT_FOUND,
            &format!("not found: {method} {path}"),
        ),
    }
}

fn list_models(model: &str) -> Response {
    Json(json!({
        "object": "list",
        "data": [{"id": model, "object": "model", "created": 1_735_689_600, "owned_by": "hotplex"}],
    }))
    .into_response()
}

/// `{"error":{"message":…}}`, the part of OpenAI's error envelope clients read.
fn error_response(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": {"message": message}}))).into_response()
}

fn create_chat_completion(shared: &Shared, body: &Bytes) -> Response {
    let request: Value = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                &format!("request body is not valid JSON: {err}"),
            );
        }
    };
    let reply = choose_reply(&request, shared.options.reply.as_deref());
    let completion = Completion {
        id: format!("chatcmpl-{}", random_hex()),
        created: chrono::Utc::now().timestamp(),
        model: request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or(&shared.options.model)
            .to_owned(),
        usage: usage(&request, &reply),
    };
    if request.get("stream").and_then(Value::as_bool) == Some(true) {
        let include_usage = request
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            == Some(true);
        let frames = completion.stream_frames(&reply, include_usage, shared.options.delay);
        delayed_event_stream(frames, &shared.token)
    } else {
        Json(completion.full(&reply)).into_response()
    }
}

// ---------------------------------------------------------------------------------------
// Choosing the reply
// ---------------------------------------------------------------------------------------

#[derive(Debug, PartialEq)]
enum Reply {
    Text(String),
    ToolCall {
        id: String,
        name: &'static str,
        /// The arguments as the JSON text the API carries.
        arguments: String,
    },
}

impl Reply {
    /// The characters the completion-token count is based on.
    fn chars(&self) -> usize {
        match self {
            Self::Text(text) => text.chars().count(),
            Self::ToolCall { arguments, .. } => arguments.chars().count(),
        }
    }
}

/// Applies the rules of the spec in order; the first match wins.
fn choose_reply(request: &Value, fixed: Option<&str>) -> Reply {
    let messages = request
        .get("messages")
        .and_then(Value::as_array)
        .map_or(&[][..], Vec::as_slice);
    let role = |m: &Value| m.get("role").and_then(Value::as_str).map(str::to_owned);
    let last_user = messages
        .iter()
        .rposition(|m| role(m).as_deref() == Some("user"));
    let after_user = last_user.map_or(messages, |at| messages.get(at + 1..).unwrap_or(&[]));
    if let Some(result) = after_user
        .iter()
        .rev()
        .find(|m| role(m).as_deref() == Some("tool"))
    {
        return Reply::Text(format!("TOOL_DONE: {}", clip(&message_text(result))));
    }

    let prompt = last_user
        .and_then(|at| messages.get(at))
        .map(message_text)
        .unwrap_or_default();
    if let Some(command) = bash_marker(&prompt).filter(|_| offers_tool(request, "bash")) {
        return Reply::ToolCall {
            id: format!("call_{}", random_hex()),
            name: "bash",
            arguments: json!({"command": command, "description": "mock"}).to_string(),
        };
    }
    match fixed {
        Some(text) => Reply::Text(text.to_owned()),
        None => Reply::Text(format!("MOCK_REPLY: {}", clip(&prompt))),
    }
}

/// A message's text: its string content, or its `text` parts joined by newlines.
fn message_text(message: &Value) -> String {
    match message.get("content") {
        Some(Value::String(text)) => text.clone(),
        Some(Value::Array(parts)) => parts
            .iter()
            .filter(|p| p.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Trimmed and cut to [`MAX_ECHO_CHARS`] characters.
fn clip(text: &str) -> String {
    text.trim().chars().take(MAX_ECHO_CHARS).collect()
}

/// Whether the request's `tools` include a function called `name`.
fn offers_tool(request: &Value, name: &str) -> bool {
    request
        .get("tools")
        .and_then(Value::as_array)
        .is_some_and(|tools| {
            tools
                .iter()
                .any(|t| t.pointer("/function/name").and_then(Value::as_str) == Some(name))
        })
}

/// Deterministic counts: a quarter of the characters, at least one token each way.
fn usage(request: &Value, reply: &Reply) -> Value {
    let prompt_chars: usize =
        request
            .get("messages")
            .and_then(Value::as_array)
            .map_or(0, |messages| {
                messages
                    .iter()
                    .map(|m| message_text(m).chars().count())
                    .sum()
            });
    let prompt_tokens = (prompt_chars / 4).max(1);
    let completion_tokens = (reply.chars() / 4).max(1);
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

// ---------------------------------------------------------------------------------------
// Rendering the reply
// ---------------------------------------------------------------------------------------

/// What every form of one response shares.
struct Completion {
    id: String,
    created: i64,
    model: String,
    usage: Value,
}

impl Completion {
    /// The non-streaming `chat.completion` object.
    fn full(&self, reply: &Reply) -> Value {
        let (message, finish_reason) = match reply {
            Reply::Text(text) => (json!({"role": "assistant", "content": text}), "stop"),
            Reply::ToolCall {
                id,
                name,
                arguments,
            } => (
                json!({
                    "role": "assistant",
                    "content": null,
                    "tool_calls": [{"id": id, "type": "function",
                                    "function": {"name": name, "arguments": arguments}}],
                }),
                "tool_calls",
            ),
        };
        json!({
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": self.usage,
        })
    }

    fn chunk(&self, choices: Value) -> Value {
        json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        })
    }

    fn delta(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        self.chunk(json!([{"index": 0, "delta": delta, "finish_reason": finish_reason}]))
    }

    /// The SSE frames of the streaming form, each with the pause to take before sending it.
    fn stream_frames(
        &self,
        reply: &Reply,
        include_usage: bool,
        delay: Duration,
    ) -> Vec<(Duration, Bytes)> {
        let mut chunks = vec![(
            Duration::ZERO,
            self.delta(json!({"role": "assistant", "content": ""}), None),
        )];
        let finish_reason = match reply {
            Reply::Text(text) => {
                for (i, word) in words(text).into_iter().enumerate() {
                    let pause = if i == 0 { Duration::ZERO } else { delay };
                    chunks.push((pause, self.delta(json!({"content": word}), None)));
                }
                "stop"
            }
            Reply::ToolCall {
                id,
                name,
                arguments,
            } => {
                chunks.push((
                    Duration::ZERO,
                    self.delta(
                        json!({"tool_calls": [{"index": 0, "id": id, "type": "function",
                                               "function": {"name": name, "arguments": ""}}]}),
                        None,
                    ),
                ));
                for piece in pieces(arguments, ARGUMENT_PIECE_CHARS) {
                    chunks.push((
                        Duration::ZERO,
                        self.delta(
                            json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}),
                            None,
                        ),
                    ));
                }
                "tool_calls"
            }
        };
        chunks.push((Duration::ZERO, self.delta(json!({}), Some(finish_reason))));
        if include_usage {
            let mut last = self.chunk(json!([]));
            last["usage"] = self.usage.clone();
            chunks.push((Duration::ZERO, last));
        }
        let mut frames: Vec<(Duration, Bytes)> = chunks
            .into_iter()
            .map(|(pause, chunk)| (pause, Bytes::from(format!("data: {chunk}\n\n"))))
            .collect();
        frames.push((Duration::ZERO, Bytes::from_static(b"data: [DONE]\n\n")));
        frames
    }
}

/// Each word with the whitespace after it; whitespace before the first word stays with it.
fn words(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut start = 0;
    let mut after_space = false;
    let mut seen_word = false;
    for (i, c) in text.char_indices() {
        if c.is_whitespace() {
            after_space = seen_word;
        } else if !seen_word {
            seen_word = true;
        } else if after_space {
            words.extend(text.get(start..i));
            start = i;
            after_space = false;
        }
    }
    if start < text.len() {
        words.extend(text.get(start..));
    }
    words
}

/// Cuts `text` into pieces of `size` characters (the last may be shorter).
fn pieces(text: &str, size: usize) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    chars
        .chunks(size.max(1))
        .map(|c| c.iter().collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use axum::http::header::CONTENT_TYPE;

    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    async fn spawn(options: MockOptions) -> io::Result<MockServer> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        start(listener, options).await
    }

    fn user(content: Value) -> Value {
        json!({"role": "user", "content": content})
    }

    fn bash_tool() -> Value {
        json!({"type": "function", "function": {"name": "bash", "description": "run",
               "parameters": {"type": "object", "properties": {"command": {"type": "string"}}}}})
    }

    fn request(messages: Value, stream: bool) -> Value {
        json!({"model": "test-model", "stream": stream, "messages": messages})
    }

    async fn post(
        server: &MockServer,
        path: &str,
        body: &Value,
    ) -> reqwest::Result<reqwest::Response> {
        reqwest::Client::new()
            .post(format!("{}{path}", server.base_url()))
            .bearer_auth("x")
            .json(body)
            .send()
            .await
    }

    /// The `data:` payloads of a streamed response; `[DONE]` must come last, alone.
    async fn stream(
        server: &MockServer,
        body: &Value,
    ) -> Result<Vec<Value>, Box<dyn std::error::Error>> {
        let response = post(server, "/v1/chat/completions", body).await?;
        assert_eq!(response.status(), 200);
        assert_eq!(
            response.headers()[CONTENT_TYPE],
            "text/event-stream; charset=utf-8"
        );
        let text = response.text().await?;
        let frames: Vec<&str> = text
            .split_terminator("\n\n")
            .map(|f| f.strip_prefix("data: ").expect("a data frame"))
            .collect();
        assert!(text.ends_with("\n\n"), "{text}");
        assert_eq!(frames.last(), Some(&"[DONE]"), "{text}");
        let chunks = frames[..frames.len() - 1]
            .iter()
            .map(|f| serde_json::from_str(f))
            .collect::<Result<Vec<Value>, _>>()?;
        Ok(chunks)
    }

    /// The concatenated `content` deltas.
    fn streamed_text(chunks: &[Value]) -> String {
        chunks
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/content")
                    .and_then(Value::as_str)
            })
            .collect()
    }

    async fn full_text(
        server: &MockServer,
        messages: Value,
    ) -> Result<String, Box<dyn std::error::Error>> {
        let body: Value = post(server, "/chat/completions", &request(messages, false))
            .await?
            .json()
            .await?;
        Ok(body["choices"][0]["message"]["content"]
            .as_str()
            .ok_or("no content")?
            .to_owned())
    }

    #[tokio::test]
    async fn models_are_listed_on_both_paths() -> TestResult {
        let server = spawn(MockOptions {
            model: "other-model".to_owned(),
            ..MockOptions::default()
        })
        .await?;
        for path in ["/v1/models", "/models"] {
            let body: Value = reqwest::get(format!("{}{path}", server.base_url()))
                .await?
                .json()
                .await?;
            assert_eq!(body["object"], "list");
            assert_eq!(body["data"].as_array().map(Vec::len), Some(1));
            assert_eq!(body["data"][0]["id"], "other-model");
            assert_eq!(body["data"][0]["object"], "model");
        }
        let health: Value = reqwest::get(format!("{}/health", server.base_url()))
            .await?
            .json()
            .await?;
        assert_eq!(health, json!({"ok": true}));
        Ok(())
    }

    #[tokio::test]
    async fn plain_prompts_are_echoed_trimmed_and_clipped() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let messages = json!([
            {"role": "system", "content": "be brief"},
            user(json!("old question")),
            {"role": "assistant", "content": "old answer"},
            user(json!([{"type": "text", "text": "  hello"}, {"type": "image_url"},
                        {"type": "text", "text": "world  "}])),
        ]);
        assert_eq!(
            full_text(&server, messages).await?,
            "MOCK_REPLY: hello\nworld"
        );

        let long = "x".repeat(500);
        let reply = full_text(&server, json!([user(json!(format!("  {long}")))])).await?;
        assert_eq!(reply, format!("MOCK_REPLY: {}", "x".repeat(200)));

        // No user message at all still answers.
        assert_eq!(full_text(&server, json!([])).await?, "MOCK_REPLY: ");
        Ok(())
    }

    #[tokio::test]
    async fn a_configured_reply_replaces_the_echo_only() -> TestResult {
        let server = spawn(MockOptions {
            reply: Some("fixed words".to_owned()),
            ..MockOptions::default()
        })
        .await?;
        assert_eq!(
            full_text(&server, json!([user(json!("hi"))])).await?,
            "fixed words"
        );
        let after_tool = json!([user(json!("hi")), {"role": "tool", "content": "out"}]);
        assert_eq!(full_text(&server, after_tool).await?, "TOOL_DONE: out");
        Ok(())
    }

    #[tokio::test]
    async fn a_tool_result_after_the_last_user_message_is_acknowledged() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let messages = json!([
            user(json!("[[bash:echo hi]]")),
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
              "function": {"name": "bash", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "  hi\n"}]},
        ]);
        let mut body = request(messages.clone(), true);
        body["tools"] = json!([bash_tool()]);
        assert_eq!(
            streamed_text(&stream(&server, &body).await?),
            "TOOL_DONE: hi"
        );

        // A tool result before the last user message is history, not an answer to give.
        let mut later = messages.as_array().cloned().unwrap_or_default();
        later.push(user(json!("next")));
        assert_eq!(full_text(&server, json!(later)).await?, "MOCK_REPLY: next");
        Ok(())
    }

    #[tokio::test]
    async fn bash_marker_calls_the_bash_tool_only_when_offered() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let prompt = r#"[[bash:[[ -f x ]] && echo "ok, done"]] please"#;
        let mut body = request(json!([user(json!(prompt))]), true);
        body["tools"] = json!([{"type": "function", "function": {"name": "read"}}, bash_tool()]);
        body["stream_options"] = json!({"include_usage": true});
        let chunks = stream(&server, &body).await?;
        assert_eq!(
            chunks[0]["choices"][0]["delta"],
            json!({"role": "assistant", "content": ""})
        );
        let start = &chunks[1]["choices"][0]["delta"]["tool_calls"][0];
        assert_eq!(start["index"], 0);
        assert_eq!(start["type"], "function");
        assert_eq!(start["function"], json!({"name": "bash", "arguments": ""}));
        assert!(
            start["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("call_"))
        );

        let pieces: Vec<&str> = chunks[2..]
            .iter()
            .filter_map(|c| {
                c.pointer("/choices/0/delta/tool_calls/0/function/arguments")
                    .and_then(Value::as_str)
            })
            .collect();
        assert!(pieces.len() > 2, "{pieces:?}");
        assert!(pieces.iter().all(|p| p.chars().count() <= 16));
        assert!(
            pieces[..pieces.len() - 1]
                .iter()
                .all(|p| p.chars().count() == 16)
        );
        let arguments = pieces.concat();
        assert_eq!(
            serde_json::from_str::<Value>(&arguments)?,
            json!({"command": r#"[[ -f x ]] && echo "ok, done""#, "description": "mock"})
        );
        let finish = &chunks[chunks.len() - 2]["choices"][0];
        assert_eq!(finish["finish_reason"], "tool_calls");
        assert_eq!(finish["delta"], json!({}));
        let usage = &chunks[chunks.len() - 1]["usage"];
        assert_eq!(usage["completion_tokens"], arguments.chars().count() / 4);

        // Without a `bash` tool in the request the marker is just text.
        let plain = request(json!([user(json!("[[bash:ls]]"))]), true);
        assert_eq!(
            streamed_text(&stream(&server, &plain).await?),
            "MOCK_REPLY: [[bash:ls]]"
        );
        Ok(())
    }

    #[tokio::test]
    async fn text_streams_role_then_words_then_finish_then_done() -> TestResult {
        let delay = Duration::from_millis(15);
        let server = spawn(MockOptions {
            delay,
            ..MockOptions::default()
        })
        .await?;
        let started = Instant::now();
        let chunks = stream(
            &server,
            &request(json!([user(json!(" hello   big world "))]), true),
        )
        .await?;
        // Three pauses between the four words.
        assert!(started.elapsed() >= delay * 3, "{:?}", started.elapsed());
        let id = chunks[0]["id"].as_str().ok_or("id")?;
        assert!(id.starts_with("chatcmpl-"), "{id}");
        for chunk in &chunks {
            assert_eq!(chunk["id"], id);
            assert_eq!(chunk["object"], "chat.completion.chunk");
            assert_eq!(chunk["model"], "test-model");
            assert!(chunk["created"].is_i64());
        }
        let deltas: Vec<&Value> = chunks.iter().map(|c| &c["choices"][0]["delta"]).collect();
        assert_eq!(
            deltas,
            [
                &json!({"role": "assistant", "content": ""}),
                &json!({"content": "MOCK_REPLY: "}),
                &json!({"content": "hello   "}),
                &json!({"content": "big "}),
                &json!({"content": "world"}),
                &json!({}),
            ]
        );
        let finishes: Vec<&Value> = chunks
            .iter()
            .map(|c| &c["choices"][0]["finish_reason"])
            .collect();
        assert_eq!(finishes[..5], [&Value::Null; 5]);
        assert_eq!(finishes[5], "stop");
        // No usage chunk unless asked for.
        assert!(chunks.iter().all(|c| c.get("usage").is_none()));
        Ok(())
    }

    #[tokio::test]
    async fn usage_chunk_comes_last_when_requested() -> TestResult {
        let server = spawn(MockOptions {
            delay: Duration::ZERO,
            ..MockOptions::default()
        })
        .await?;
        let mut body = request(
            json!([{"role": "system", "content": "abcdefgh"}, user(json!("12345678"))]),
            true,
        );
        body["stream_options"] = json!({"include_usage": true});
        let chunks = stream(&server, &body).await?;
        let last = chunks.last().ok_or("no chunks")?;
        assert_eq!(last["choices"], json!([]));
        // 16 prompt characters; the reply "MOCK_REPLY: 12345678" has 20.
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 4, "completion_tokens": 5, "total_tokens": 9})
        );
        assert_eq!(
            chunks[chunks.len() - 2]["choices"][0]["finish_reason"],
            "stop"
        );
        Ok(())
    }

    #[tokio::test]
    async fn non_streaming_text_and_tool_call_forms() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let body: Value = post(
            &server,
            "/v1/chat/completions",
            &request(json!([user(json!("hi"))]), false),
        )
        .await?
        .json()
        .await?;
        assert!(
            body["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("chatcmpl-"))
        );
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(body["model"], "test-model");
        assert_eq!(
            body["choices"],
            json!([{"index": 0, "message": {"role": "assistant", "content": "MOCK_REPLY: hi"},
                    "finish_reason": "stop"}])
        );
        assert_eq!(
            body["usage"],
            json!({"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4})
        );

        let mut call = json!({"messages": [user(json!("run [[bash:echo hi]]"))]});
        call["tools"] = json!([bash_tool()]);
        let body: Value = post(&server, "/chat/completions", &call)
            .await?
            .json()
            .await?;
        assert_eq!(body["model"], MOCK_MODEL, "the default when none is named");
        let choice = &body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], Value::Null);
        let tool_call = &choice["message"]["tool_calls"][0];
        assert_eq!(tool_call["type"], "function");
        assert_eq!(tool_call["function"]["name"], "bash");
        let arguments = tool_call["function"]["arguments"]
            .as_str()
            .ok_or("arguments")?;
        assert_eq!(
            serde_json::from_str::<Value>(arguments)?,
            json!({"command": "echo hi", "description": "mock"})
        );
        Ok(())
    }

    #[tokio::test]
    async fn bad_json_is_a_400_and_odd_json_still_answers() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        for path in ["/v1/chat/completions", "/chat/completions"] {
            let response = reqwest::Client::new()
                .post(format!("{}{path}", server.base_url()))
                .body("{not json")
                .send()
                .await?;
            assert_eq!(response.status(), 400);
            let body: Value = response.json().await?;
            let message = body["error"]["message"].as_str().ok_or("message")?;
            assert!(
                message.starts_with("request body is not valid JSON"),
                "{message}"
            );
        }
        for odd in [
            json!(null),
            json!([1]),
            json!({"messages": 3, "tools": "x"}),
            json!({"messages": [{"role": "user", "content": 7}, {"role": 5}]}),
        ] {
            let response = post(&server, "/v1/chat/completions", &odd).await?;
            assert_eq!(response.status(), 200);
            let body: Value = response.json().await?;
            assert_eq!(body["choices"][0]["message"]["content"], "MOCK_REPLY: ");
        }
        Ok(())
    }

    #[tokio::test]
    async fn unknown_routes_are_a_json_404() -> TestResult {
        let server = spawn(MockOptions::default()).await?;
        let client = reqwest::Client::new();
        let base = server.base_url();
        for (method, path) in [
            (reqwest::Method::GET, "/nowhere"),
            (reqwest::Method::GET, "/v1/chat/completions"),
            (reqwest::Method::POST, "/v1/models"),
            (reqwest::Method::DELETE, "/_mock/requests"),
        ] {
            let response = client
                .request(method.clone(), format!("{base}{path}"))
                .send()
                .await?;
            assert_eq!(response.status(), 404);
            let body: Value = response.json().await?;
            assert_eq!(
                body,
                json!({"error": {"message": format!("not found: {method} {path}")}})
            );
        }
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
        post(
            &server,
            "/v1/chat/completions",
            &request(json!([user(json!("hi"))]), false),
        )
        .await?;
        client.get(format!("{base}/models")).send().await?;
        client.get(format!("{base}/health")).send().await?;

        let log: Vec<Value> = client
            .get(format!("{base}/_mock/requests"))
            .send()
            .await?
            .json()
            .await?;
        assert_eq!(log, server.requests());
        assert_eq!(log.len(), 2, "health and /_mock are not logged: {log:?}");
        assert_eq!(log[0]["method"], "POST");
        assert_eq!(log[0]["path"], "/v1/chat/completions");
        assert!(
            log[0]["t"]
                .as_str()
                .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
        );
        assert_eq!(log[0]["headers"]["authorization"], "Bearer x");
        assert_eq!(log[0]["body"]["messages"][0]["content"], "hi");
        assert_eq!(log[1]["path"], "/models");
        assert_eq!(log[1]["body"], Value::Null);

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
        assert_eq!(
            std::fs::read_to_string(&log_file)?,
            mirrored,
            "the file is kept"
        );
        server.shutdown().await?;
        Ok(())
    }

    #[tokio::test]
    async fn a_client_hanging_up_mid_stream_does_not_stop_the_server() -> TestResult {
        let server = spawn(MockOptions {
            delay: Duration::from_millis(200),
            ..MockOptions::default()
        })
        .await?;
        let many_words = "w ".repeat(50);
        let mut response = post(
            &server,
            "/v1/chat/completions",
            &request(json!([user(json!(many_words))]), true),
        )
        .await?;
        response.chunk().await?.ok_or("no first chunk")?;
        drop(response);
        assert_eq!(
            full_text(&server, json!([user(json!("still there?"))])).await?,
            "MOCK_REPLY: still there?"
        );
        let started = Instant::now();
        server.shutdown().await?;
        assert!(started.elapsed() < Duration::from_secs(5));
        Ok(())
    }

    #[test]
    fn words_keep_every_character() {
        for text in [
            "",
            " ",
            "a",
            "a b",
            " lead",
            "trail  ",
            "héllo\twörld\n日本",
        ] {
            assert_eq!(words(text).concat(), text);
        }
        assert_eq!(words("MOCK_REPLY: a  b"), ["MOCK_REPLY: ", "a  ", "b"]);
        assert_eq!(words("  x y"), ["  x ", "y"]);
        assert_eq!(pieces("abcdé", 2), ["ab", "cd", "é"]);
        assert!(pieces("", 16).is_empty());
    }
}
