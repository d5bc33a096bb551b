//! The Claude Code stream-json protocol: typed parsing of every stdout line and builders for
//! every stdin line (see `docs/claude-code.md` §5–§8).
//!
//! Parsing is deliberately lenient. The CLI adds fields release by release, so a missing or
//! oddly typed optional field falls back to its default, and a frame whose `type`/`subtype`
//! we do not know becomes [`Frame::Unknown`] instead of an error: a worker must keep reading
//! past frames it does not understand. Only a line that is not JSON at all is an error.
//!
//! Lines can be tens of megabytes (a tool result holding a whole file), so the parser takes
//! fields out of the parsed value by move instead of cloning them, and sets no size caps: the
//! caller decides how long a line it is willing to buffer.

use serde_json::{Map, Value, json};
use uuid::Uuid;

/// A stdout line that could not be parsed at all.
#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    /// The line is not valid JSON.
    #[error("stream-json line is not JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One stdout line of the CLI, dispatched on `type` and then `subtype`.
#[derive(Clone, Debug, PartialEq)]
pub enum Frame {
    /// `command_lifecycle` (2.1.331+): the progress of one stdin user message.
    CommandLifecycle {
        /// The `uuid` the host sent with the user message.
        command_uuid: String,
        /// `queued` → `started` → `completed` | `cancelled`.
        state: CommandState,
    },
    /// `system`/`init`, printed at the start of every turn.
    SystemInit {
        session_id: String,
        model: String,
        cwd: String,
        /// `permissionMode` on the wire.
        permission_mode: String,
        /// The whole frame (tools, MCP servers, version …).
        raw: Value,
    },
    /// `system`/`status`: `requesting` before each API call, `null` after a mode change.
    SystemStatus { status: Option<String>, raw: Value },
    /// Any other `system` subtype: `api_retry`, `permission_denied`, `task_started`,
    /// `task_notification`, `thinking_tokens`, `compact_boundary` …
    System { subtype: String, raw: Value },
    /// `stream_event`: one raw Messages API SSE event (with `--include-partial-messages`).
    StreamEvent(StreamEvent),
    /// `assistant`: one complete content block of a model message.
    Assistant(AssistantFrame),
    /// `user`: a replayed stdin message, tool results, or the interrupt marker.
    User(UserFrame),
    /// `control_request`: the CLI asks the host (tool approval, hook callbacks, MCP …).
    ControlRequest {
        request_id: String,
        request: ControlRequest,
    },
    /// `control_response`: the CLI answers a request of the host.
    ControlResponse {
        request_id: String,
        /// `subtype == "success"`.
        ok: bool,
        /// The `response` payload; `Null` when absent (always for errors).
        response: Value,
        error: Option<String>,
    },
    /// `control_cancel_request`: the CLI withdraws a pending request of its own.
    ControlCancelRequest { request_id: String },
    /// `result`: exactly one per turn.
    Result(ResultFrame),
    /// Valid JSON we do not recognise; keep reading.
    Unknown(Value),
}

/// The `state` of a `command_lifecycle` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandState {
    Queued,
    Started,
    Completed,
    Cancelled,
    /// A state this code does not know yet, verbatim.
    Other(String),
}

impl CommandState {
    fn parse(s: &str) -> Self {
        match s {
            "queued" => Self::Queued,
            "started" => Self::Started,
            "completed" => Self::Completed,
            "cancelled" => Self::Cancelled,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The wire spelling.
    pub fn as_str(&self) -> &str {
        match self {
            Self::Queued => "queued",
            Self::Started => "started",
            Self::Completed => "completed",
            Self::Cancelled => "cancelled",
            Self::Other(s) => s,
        }
    }

    /// `completed` or `cancelled`: the message will produce nothing more.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Completed | Self::Cancelled)
    }
}

// Comparing with the wire spelling keeps call sites short (`state == "completed"`).
impl PartialEq<str> for CommandState {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for CommandState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// One content block of a model message.
#[derive(Clone, Debug, PartialEq)]
pub enum ContentBlock {
    Text {
        text: String,
    },
    Thinking {
        thinking: String,
        signature: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    /// `redacted_thinking`, `server_tool_use`, images … verbatim.
    Other(Value),
}

impl ContentBlock {
    /// Takes a block apart without copying its (possibly large) strings.
    fn from_value(mut value: Value) -> Self {
        let Some(map) = value.as_object_mut() else {
            return Self::Other(value);
        };
        match map.get("type").and_then(Value::as_str) {
            Some("text") => Self::Text {
                text: take_str(map, "text").unwrap_or_default(),
            },
            Some("thinking") => Self::Thinking {
                thinking: take_str(map, "thinking").unwrap_or_default(),
                signature: take_str(map, "signature").unwrap_or_default(),
            },
            Some("tool_use") => Self::ToolUse {
                id: take_str(map, "id").unwrap_or_default(),
                name: take_str(map, "name").unwrap_or_default(),
                input: map.remove("input").unwrap_or_else(|| json!({})),
            },
            _ => Self::Other(value),
        }
    }
}

/// Token counts, as in the API's `usage` object. Absent counts are 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_creation_input_tokens: u64,
    pub cache_read_input_tokens: u64,
}

impl Usage {
    fn from_value(value: Option<&Value>) -> Self {
        let Some(map) = value.and_then(Value::as_object) else {
            return Self::default();
        };
        let n = |k| get_u64(map, k).unwrap_or(0);
        Self {
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cache_creation_input_tokens: n("cache_creation_input_tokens"),
            cache_read_input_tokens: n("cache_read_input_tokens"),
        }
    }
}

/// The `event` of a `stream_event` frame. `parent_tool_use_id` is set for events of a
/// sub-agent (inside a `Task` tool call); the main conversation has `None`.
#[derive(Clone, Debug, PartialEq)]
pub enum StreamEvent {
    MessageStart {
        message_id: String,
        model: String,
        usage: Usage,
        parent_tool_use_id: Option<String>,
    },
    ContentBlockStart {
        index: usize,
        block: ContentBlock,
        parent_tool_use_id: Option<String>,
    },
    TextDelta {
        index: usize,
        text: String,
        parent_tool_use_id: Option<String>,
    },
    ThinkingDelta {
        index: usize,
        thinking: String,
        parent_tool_use_id: Option<String>,
    },
    InputJsonDelta {
        index: usize,
        partial_json: String,
        parent_tool_use_id: Option<String>,
    },
    /// The signature itself is only useful in the complete `assistant` frame.
    SignatureDelta {
        index: usize,
        parent_tool_use_id: Option<String>,
    },
    ContentBlockStop {
        index: usize,
        parent_tool_use_id: Option<String>,
    },
    /// The final `stop_reason` of one API call and its output token count.
    MessageDelta {
        stop_reason: Option<String>,
        output_tokens: u64,
        parent_tool_use_id: Option<String>,
    },
    MessageStop,
    /// `ping`, `error`, unknown delta types …: the whole frame, verbatim.
    Other(Value),
}

impl StreamEvent {
    /// The sub-agent tool call this event belongs to, if any (`None` for `MessageStop` and
    /// `Other`; look into the raw value of the latter).
    pub fn parent_tool_use_id(&self) -> Option<&str> {
        match self {
            Self::MessageStart {
                parent_tool_use_id, ..
            }
            | Self::ContentBlockStart {
                parent_tool_use_id, ..
            }
            | Self::TextDelta {
                parent_tool_use_id, ..
            }
            | Self::ThinkingDelta {
                parent_tool_use_id, ..
            }
            | Self::InputJsonDelta {
                parent_tool_use_id, ..
            }
            | Self::SignatureDelta {
                parent_tool_use_id, ..
            }
            | Self::ContentBlockStop {
                parent_tool_use_id, ..
            }
            | Self::MessageDelta {
                parent_tool_use_id, ..
            } => parent_tool_use_id.as_deref(),
            Self::MessageStop | Self::Other(_) => None,
        }
    }

    fn parse(mut frame: Map<String, Value>) -> Self {
        let parent_tool_use_id = take_str(&mut frame, "parent_tool_use_id");
        let Some(Value::Object(mut event)) = frame.remove("event") else {
            return Self::Other(Value::Object(frame));
        };
        let index = get_u64(&event, "index").map_or(0, saturating_usize);
        match event.get("type").and_then(Value::as_str) {
            Some("message_start") => {
                let message = event.get("message").and_then(Value::as_object);
                let s = |k| message.and_then(|m| get_str(m, k)).unwrap_or_default();
                Self::MessageStart {
                    message_id: s("id"),
                    model: s("model"),
                    usage: Usage::from_value(message.and_then(|m| m.get("usage"))),
                    parent_tool_use_id,
                }
            }
            Some("content_block_start") => Self::ContentBlockStart {
                index,
                block: ContentBlock::from_value(
                    event.remove("content_block").unwrap_or(Value::Null),
                ),
                parent_tool_use_id,
            },
            Some("content_block_delta") => {
                let mut delta = match event.remove("delta") {
                    Some(Value::Object(delta)) => delta,
                    other => {
                        event.extend(other.map(|d| ("delta".to_owned(), d)));
                        return Self::other(frame, event, parent_tool_use_id);
                    }
                };
                match delta.get("type").and_then(Value::as_str) {
                    Some("text_delta") => Self::TextDelta {
                        index,
                        text: take_str(&mut delta, "text").unwrap_or_default(),
                        parent_tool_use_id,
                    },
                    Some("thinking_delta") => Self::ThinkingDelta {
                        index,
                        thinking: take_str(&mut delta, "thinking").unwrap_or_default(),
                        parent_tool_use_id,
                    },
                    Some("input_json_delta") => Self::InputJsonDelta {
                        index,
                        partial_json: take_str(&mut delta, "partial_json").unwrap_or_default(),
                        parent_tool_use_id,
                    },
                    Some("signature_delta") => Self::SignatureDelta {
                        index,
                        parent_tool_use_id,
                    },
                    _ => {
                        event.insert("delta".into(), Value::Object(delta));
                        Self::other(frame, event, parent_tool_use_id)
                    }
                }
            }
            Some("content_block_stop") => Self::ContentBlockStop {
                index,
                parent_tool_use_id,
            },
            Some("message_delta") => Self::MessageDelta {
                stop_reason: event
                    .get("delta")
                    .and_then(Value::as_object)
                    .and_then(|d| get_str(d, "stop_reason")),
                output_tokens: Usage::from_value(event.get("usage")).output_tokens,
                parent_tool_use_id,
            },
            Some("message_stop") => Self::MessageStop,
            _ => Self::other(frame, event, parent_tool_use_id),
        }
    }

    /// Puts the frame back together for [`StreamEvent::Other`].
    fn other(
        mut frame: Map<String, Value>,
        event: Map<String, Value>,
        parent_tool_use_id: Option<String>,
    ) -> Self {
        frame.insert("event".into(), Value::Object(event));
        frame.insert(
            "parent_tool_use_id".into(),
            parent_tool_use_id.map_or(Value::Null, Value::String),
        );
        Self::Other(Value::Object(frame))
    }
}

/// An `assistant` frame: one content block of a model message. All blocks of one API
/// call share `message_id`.
#[derive(Clone, Debug, PartialEq)]
pub struct AssistantFrame {
    pub message_id: String,
    /// `<synthetic>` for API errors.
    pub model: String,
    /// The block. 2.1.331 sends exactly one per frame; an empty `content` gives
    /// `ContentBlock::Other(Value::Null)`.
    pub block: ContentBlock,
    /// Further blocks, should a CLI version ever send several in one frame.
    pub extra_blocks: Vec<ContentBlock>,
    pub parent_tool_use_id: Option<String>,
    /// The CLI turned an API failure into this synthetic message.
    pub is_api_error: bool,
    /// For API errors: the message text (`API Error: 529 …`), else the `error` field.
    pub error: Option<String>,
    /// For API errors: the HTTP status, when known.
    pub api_error_status: Option<u16>,
    /// Usually `null` here: the final stop reason arrives in `message_delta`.
    pub stop_reason: Option<String>,
    pub usage: Usage,
    pub session_id: Option<String>,
    pub uuid: Option<String>,
}

impl AssistantFrame {
    fn parse(mut frame: Map<String, Value>) -> Self {
        let mut message = match frame.remove("message") {
            Some(Value::Object(m)) => m,
            _ => Map::new(),
        };
        let mut blocks = match message.remove("content") {
            Some(Value::Array(items)) => items.into_iter().map(ContentBlock::from_value).collect(),
            Some(Value::String(text)) => vec![ContentBlock::Text { text }],
            _ => Vec::new(),
        }
        .into_iter();
        let block = blocks.next().unwrap_or(ContentBlock::Other(Value::Null));
        let model = get_str(&message, "model").unwrap_or_default();
        let error_field = get_str(&frame, "error");
        // The flag is snake_case on stdout and camelCase in the transcript; a synthetic
        // model with an `error` field means the same on versions that send neither.
        let is_api_error = get_bool(&frame, "is_api_error_message")
            .or_else(|| get_bool(&frame, "isApiErrorMessage"))
            .unwrap_or(model == "<synthetic>" && error_field.is_some());
        let error = if is_api_error {
            match &block {
                ContentBlock::Text { text } if !text.is_empty() => Some(text.clone()),
                _ => error_field.or_else(|| Some("API error".to_owned())),
            }
        } else {
            error_field
        };
        Self {
            message_id: get_str(&message, "id").unwrap_or_default(),
            model,
            block,
            extra_blocks: blocks.collect(),
            parent_tool_use_id: take_str(&mut frame, "parent_tool_use_id"),
            is_api_error,
            error,
            api_error_status: get_u64(&frame, "api_error_status")
                .and_then(|s| u16::try_from(s).ok()),
            stop_reason: get_str(&message, "stop_reason"),
            usage: Usage::from_value(message.get("usage")),
            session_id: take_str(&mut frame, "session_id"),
            uuid: take_str(&mut frame, "uuid"),
        }
    }

    /// The text of the block, when it is a text block.
    pub fn text(&self) -> Option<&str> {
        match &self.block {
            ContentBlock::Text { text } => Some(text),
            _ => None,
        }
    }
}

/// One `tool_result` block of a `user` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ToolResult {
    pub tool_use_id: String,
    /// String content as is; array content as its text blocks joined with `\n` (images and
    /// other blocks are dropped).
    pub content: String,
    pub is_error: bool,
}

/// A `user` frame.
#[derive(Clone, Debug, PartialEq)]
pub struct UserFrame {
    /// An echo of a stdin message (`--replay-user-messages`).
    pub is_replay: bool,
    pub uuid: Option<String>,
    /// The text blocks (or string content) joined with `\n`; empty for pure tool results.
    pub text: String,
    pub tool_results: Vec<ToolResult>,
    /// The CLI's `[Request interrupted by user…]` marker after an interrupt. Never set on
    /// replays, so a prompt that merely quotes the marker does not count.
    pub interrupt_marker: bool,
    pub parent_tool_use_id: Option<String>,
    pub session_id: Option<String>,
    /// The structured `tool_use_result` (for Bash `{stdout, stderr, interrupted, …}`), or
    /// `Null`.
    pub tool_use_result: Value,
}

/// The prefix of the text the CLI inserts after an interrupt (`… by user]` or
/// `… by user for tool use]`).
pub const INTERRUPT_MARKER_PREFIX: &str = "[Request interrupted by user";

impl UserFrame {
    fn parse(mut frame: Map<String, Value>) -> Self {
        let is_replay = get_bool(&frame, "isReplay")
            .or_else(|| get_bool(&frame, "is_replay"))
            .unwrap_or(false);
        let content = match frame.remove("message") {
            Some(Value::Object(mut m)) => m.remove("content").unwrap_or(Value::Null),
            _ => Value::Null,
        };
        let mut texts: Vec<String> = Vec::new();
        let mut tool_results = Vec::new();
        match content {
            Value::String(s) => texts.push(s),
            Value::Array(items) => {
                for mut item in items {
                    let Some(block) = item.as_object_mut() else {
                        continue;
                    };
                    match block.get("type").and_then(Value::as_str) {
                        Some("text") => texts.extend(take_str(block, "text")),
                        Some("tool_result") => tool_results.push(ToolResult {
                            tool_use_id: take_str(block, "tool_use_id").unwrap_or_default(),
                            content: flatten_text(block.remove("content")),
                            is_error: get_bool(block, "is_error").unwrap_or(false),
                        }),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
        let interrupt_marker =
            !is_replay && texts.iter().any(|t| t.starts_with(INTERRUPT_MARKER_PREFIX));
        Self {
            is_replay,
            uuid: take_str(&mut frame, "uuid"),
            text: texts.join("\n"),
            tool_results,
            interrupt_marker,
            parent_tool_use_id: take_str(&mut frame, "parent_tool_use_id"),
            session_id: take_str(&mut frame, "session_id"),
            tool_use_result: frame.remove("tool_use_result").unwrap_or(Value::Null),
        }
    }
}

/// The `request` of a `control_request` from the CLI.
#[derive(Clone, Debug, PartialEq)]
pub enum ControlRequest {
    /// Tool approval (needs `--permission-prompt-tool stdio`). Answer with [`allow_tool`] or
    /// [`deny_tool`].
    CanUseTool {
        tool_name: String,
        input: Value,
        tool_use_id: Option<String>,
        description: Option<String>,
        blocked_path: Option<String>,
        /// Rule suggestions as sent (`Null` when absent), to echo back as
        /// `updatedPermissions` if the user chooses "always allow".
        permission_suggestions: Value,
    },
    /// `hook_callback`, `mcp_message`, … verbatim; answer with [`control_error`] if unsure.
    Other { subtype: String, raw: Value },
}

impl ControlRequest {
    fn parse(mut request: Map<String, Value>) -> Self {
        match request.get("subtype").and_then(Value::as_str) {
            Some("can_use_tool") => Self::CanUseTool {
                tool_name: take_str(&mut request, "tool_name").unwrap_or_default(),
                input: request.remove("input").unwrap_or_else(|| json!({})),
                tool_use_id: take_str(&mut request, "tool_use_id"),
                description: take_str(&mut request, "description"),
                blocked_path: take_str(&mut request, "blocked_path"),
                permission_suggestions: request
                    .remove("permission_suggestions")
                    .unwrap_or(Value::Null),
            },
            _ => Self::Other {
                subtype: get_str(&request, "subtype").unwrap_or_default(),
                raw: Value::Object(request),
            },
        }
    }
}

/// A `result` frame: the end of one turn.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ResultFrame {
    /// `success`, `error_during_execution`, `error_max_turns`, or a newer `error_*`.
    pub subtype: String,
    pub is_error: bool,
    /// The final text; absent for `error_*` subtypes.
    pub result: Option<String>,
    pub errors: Vec<String>,
    pub stop_reason: Option<String>,
    /// `completed`, `aborted_streaming`, `aborted_tools`, `api_error`, `max_turns`.
    pub terminal_reason: Option<String>,
    pub api_error_status: Option<u16>,
    /// Model calls in this turn (a tool round trip counts 2).
    pub num_turns: u64,
    pub duration_ms: u64,
    pub duration_api_ms: u64,
    /// Per turn, summed over the turn's API calls.
    pub usage: Usage,
    /// Running total of the process (and of the session after `--resume`).
    pub total_cost_usd: Option<f64>,
    /// `modelUsage`: running totals per model.
    pub model_usage: Value,
    /// The per-turn delta of `modelUsage`.
    pub model_usage_since_last_result: Value,
    pub session_id: String,
    /// The stdin uuids this turn answered (`user_message_uuid` and/or `user_message_uuids`).
    pub user_message_uuids: Vec<String>,
    pub uuid: Option<String>,
}

/// How a turn ended, from its `result` frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ResultOutcome {
    Success,
    Error {
        message: String,
    },
    /// Ended by an `interrupt` control request.
    Interrupted,
    /// `--max-turns` was reached.
    MaxTurns,
}

impl ResultFrame {
    fn parse(mut frame: Map<String, Value>) -> Self {
        let errors = match frame.remove("errors") {
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|e| match e {
                    Value::String(s) => s,
                    other => other.to_string(),
                })
                .collect(),
            _ => Vec::new(),
        };
        let mut user_message_uuids: Vec<String> = Vec::new();
        if let Some(u) = get_str(&frame, "user_message_uuid") {
            user_message_uuids.push(u);
        }
        if let Some(Value::Array(items)) = frame.get("user_message_uuids") {
            for u in items.iter().filter_map(Value::as_str) {
                if !user_message_uuids.iter().any(|x| x == u) {
                    user_message_uuids.push(u.to_owned());
                }
            }
        }
        let n = |k| get_u64(&frame, k).unwrap_or(0);
        Self {
            subtype: get_str(&frame, "subtype").unwrap_or_default(),
            is_error: get_bool(&frame, "is_error").unwrap_or(false),
            errors,
            stop_reason: get_str(&frame, "stop_reason"),
            terminal_reason: get_str(&frame, "terminal_reason"),
            api_error_status: get_u64(&frame, "api_error_status")
                .and_then(|s| u16::try_from(s).ok()),
            num_turns: n("num_turns"),
            duration_ms: n("duration_ms"),
            duration_api_ms: n("duration_api_ms"),
            usage: Usage::from_value(frame.get("usage")),
            total_cost_usd: frame.get("total_cost_usd").and_then(Value::as_f64),
            session_id: get_str(&frame, "session_id").unwrap_or_default(),
            user_message_uuids,
            uuid: get_str(&frame, "uuid"),
            result: take_str(&mut frame, "result"),
            model_usage: frame.remove("modelUsage").unwrap_or(Value::Null),
            model_usage_since_last_result: frame
                .remove("model_usage_since_last_result")
                .unwrap_or(Value::Null),
        }
    }

    /// The cost of this turn alone: the sum of `costUSD` in `model_usage_since_last_result`
    /// when the CLI sends it, else the growth of `total_cost_usd` since `previous_total` (the
    /// previous result of the same process, or of the transcript after `--resume`). Never
    /// negative, so a process restart that resets the running total cannot yield a refund.
    pub fn turn_cost_usd(&self, previous_total: Option<f64>) -> f64 {
        if let Some(per_model) = self.model_usage_since_last_result.as_object() {
            let costs: Vec<f64> = per_model
                .values()
                .filter_map(|u| u.get("costUSD").and_then(Value::as_f64))
                .collect();
            if !costs.is_empty() {
                return costs.iter().sum::<f64>().max(0.0);
            }
        }
        match self.total_cost_usd {
            Some(total) => (total - previous_total.unwrap_or(0.0)).max(0.0),
            None => 0.0,
        }
    }

    /// The model that did the turn's work: the key of `model_usage_since_last_result` (or,
    /// failing that, of `modelUsage`) with the highest `costUSD`. Several keys appear when a
    /// sub-agent or a background call used a cheaper model.
    pub fn model(&self) -> Option<String> {
        [&self.model_usage_since_last_result, &self.model_usage]
            .into_iter()
            .filter_map(Value::as_object)
            .find(|m| !m.is_empty())
            .and_then(|m| {
                let cost = |v: &Value| v.get("costUSD").and_then(Value::as_f64).unwrap_or(0.0);
                // `max_by` keeps the last of equals; fold keeps the first, which is
                // deterministic (serde_json maps are sorted by key).
                m.iter()
                    .fold(None::<(&String, f64)>, |best, (k, v)| match best {
                        Some((_, c)) if c >= cost(v) => best,
                        _ => Some((k, cost(v))),
                    })
                    .map(|(k, _)| k.clone())
            })
    }

    /// Classifies the turn's end.
    pub fn outcome(&self) -> ResultOutcome {
        let aborted = matches!(
            self.terminal_reason.as_deref(),
            Some("aborted_streaming" | "aborted_tools")
        );
        if self.subtype == "error_during_execution" && aborted {
            return ResultOutcome::Interrupted;
        }
        if self.subtype == "error_max_turns" || self.terminal_reason.as_deref() == Some("max_turns")
        {
            return ResultOutcome::MaxTurns;
        }
        if self.is_error || self.subtype != "success" {
            let message = if !self.errors.is_empty() {
                self.errors.join("\n")
            } else if let Some(text) = self.result.as_deref().filter(|t| !t.is_empty()) {
                text.to_owned()
            } else if self.subtype.is_empty() || self.subtype == "success" {
                "the agent reported an error".to_owned()
            } else {
                self.subtype.clone()
            };
            return ResultOutcome::Error { message };
        }
        ResultOutcome::Success
    }
}

/// Parses one stdout line (without its newline).
pub fn parse_line(line: &str) -> Result<Frame, ParseError> {
    let value: Value = serde_json::from_str(line)?;
    Ok(parse_value(value))
}

/// Dispatches an already parsed line on `type`, then `subtype`.
pub fn parse_value(value: Value) -> Frame {
    let Value::Object(mut map) = value else {
        return Frame::Unknown(value);
    };
    let kind = map.get("type").and_then(Value::as_str).unwrap_or_default();
    let subtype = map.get("subtype").and_then(Value::as_str);
    match (kind, subtype) {
        ("command_lifecycle", _) => match (get_str(&map, "command_uuid"), get_str(&map, "state")) {
            (Some(command_uuid), Some(state)) => Frame::CommandLifecycle {
                command_uuid,
                state: CommandState::parse(&state),
            },
            _ => Frame::Unknown(Value::Object(map)),
        },
        ("system", Some("init")) => Frame::SystemInit {
            session_id: get_str(&map, "session_id").unwrap_or_default(),
            model: get_str(&map, "model").unwrap_or_default(),
            cwd: get_str(&map, "cwd").unwrap_or_default(),
            permission_mode: get_str(&map, "permissionMode").unwrap_or_default(),
            raw: Value::Object(map),
        },
        ("system", Some("status")) => Frame::SystemStatus {
            status: get_str(&map, "status"),
            raw: Value::Object(map),
        },
        ("system", Some(subtype)) => Frame::System {
            subtype: subtype.to_owned(),
            raw: Value::Object(map),
        },
        ("stream_event", _) => Frame::StreamEvent(StreamEvent::parse(map)),
        ("assistant", _) => Frame::Assistant(AssistantFrame::parse(map)),
        ("user", _) => Frame::User(UserFrame::parse(map)),
        ("control_request", _) => {
            let request_id = get_str(&map, "request_id");
            match (request_id, map.remove("request")) {
                (Some(request_id), Some(Value::Object(request))) => Frame::ControlRequest {
                    request_id,
                    request: ControlRequest::parse(request),
                },
                (_, request) => {
                    map.extend(request.map(|r| ("request".to_owned(), r)));
                    Frame::Unknown(Value::Object(map))
                }
            }
        }
        ("control_response", _) => {
            let Some(Value::Object(mut response)) = map.remove("response") else {
                return Frame::Unknown(Value::Object(map));
            };
            let request_id = get_str(&response, "request_id")
                .or_else(|| get_str(&map, "request_id"))
                .unwrap_or_default();
            match response.get("subtype").and_then(Value::as_str) {
                Some("success") => Frame::ControlResponse {
                    request_id,
                    ok: true,
                    response: response.remove("response").unwrap_or(Value::Null),
                    error: None,
                },
                Some("error") => Frame::ControlResponse {
                    request_id,
                    ok: false,
                    response: response.remove("response").unwrap_or(Value::Null),
                    error: Some(take_str(&mut response, "error").unwrap_or_default()),
                },
                _ => {
                    map.insert("response".into(), Value::Object(response));
                    Frame::Unknown(Value::Object(map))
                }
            }
        }
        ("control_cancel_request", _) => match get_str(&map, "request_id") {
            Some(request_id) => Frame::ControlCancelRequest { request_id },
            None => Frame::Unknown(Value::Object(map)),
        },
        // Every result ends a turn, whatever its subtype: a newer `error_*` subtype must not
        // leave a worker waiting, so it is a `Result` whose outcome is an error.
        ("result", _) => Frame::Result(ResultFrame::parse(map)),
        _ => Frame::Unknown(Value::Object(map)),
    }
}

/// A user message with one text block and a host-chosen `uuid` (always a fresh one: a uuid
/// the session has seen is silently dropped by the CLI).
pub fn user_message(text: &str, uuid: Uuid) -> String {
    json!({
        "type": "user",
        "message": {"role": "user", "content": [{"type": "text", "text": text}]},
        "parent_tool_use_id": null,
        "session_id": "",
        "uuid": uuid.to_string(),
    })
    .to_string()
}

/// A host → CLI control request; `request` holds `subtype` and its fields.
pub fn control_request(request_id: &str, request: Value) -> String {
    json!({"type": "control_request", "request_id": request_id, "request": request}).to_string()
}

/// `initialize`: optional, answered before any user message, so it doubles as a readiness
/// probe.
pub fn initialize_request(request_id: &str) -> String {
    control_request(request_id, json!({"subtype": "initialize"}))
}

/// `interrupt`: aborts the running turn and keeps the process.
pub fn interrupt_request(request_id: &str) -> String {
    control_request(request_id, json!({"subtype": "interrupt"}))
}

/// A successful answer to a CLI control request.
pub fn control_success(request_id: &str, response: Value) -> String {
    json!({
        "type": "control_response",
        "response": {"subtype": "success", "request_id": request_id, "response": response},
    })
    .to_string()
}

/// A failed answer to a CLI control request.
pub fn control_error(request_id: &str, error: &str) -> String {
    json!({
        "type": "control_response",
        "response": {"subtype": "error", "request_id": request_id, "error": error},
    })
    .to_string()
}

/// Approves a `can_use_tool` request; `updated_input` is the (possibly rewritten) input.
pub fn allow_tool(request_id: &str, updated_input: Value) -> String {
    control_success(
        request_id,
        json!({"behavior": "allow", "updatedInput": updated_input}),
    )
}

/// Refuses a `can_use_tool` request; the model sees `message` as an error tool result and
/// the turn goes on.
pub fn deny_tool(request_id: &str, message: &str) -> String {
    control_success(request_id, json!({"behavior": "deny", "message": message}))
}

fn take_str(map: &mut Map<String, Value>, key: &str) -> Option<String> {
    match map.remove(key) {
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            // Put back what we cannot use, so a caller keeping the raw map loses nothing.
            map.insert(key.to_owned(), other);
            None
        }
        None => None,
    }
}

fn get_str(map: &Map<String, Value>, key: &str) -> Option<String> {
    map.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn get_bool(map: &Map<String, Value>, key: &str) -> Option<bool> {
    map.get(key).and_then(Value::as_bool)
}

/// Accepts integers and non-negative floats: counts have been seen as `12.0`.
fn get_u64(map: &Map<String, Value>, key: &str) -> Option<u64> {
    let v = map.get(key)?;
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            // Truncation is intended; `as` saturates at u64::MAX.
            .map(|f| f as u64)
    })
}

fn saturating_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// Text of a tool result's `content`: a string as is, an array as its text blocks joined
/// with `\n`.
fn flatten_text(content: Option<Value>) -> String {
    match content {
        Some(Value::String(s)) => s,
        Some(Value::Array(items)) => items
            .into_iter()
            .filter_map(|mut item| {
                let block = item.as_object_mut()?;
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => take_str(block, "text"),
                    _ => None,
                }
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Frame {
        parse_line(line).expect("line parses")
    }

    const SID: &str = "5c0f9b53-9a59-4c1e-9d59-3a7f3ab0c001";

    #[test]
    fn command_lifecycle_states() {
        for (state, want) in [
            ("queued", CommandState::Queued),
            ("started", CommandState::Started),
            ("completed", CommandState::Completed),
            ("cancelled", CommandState::Cancelled),
            ("paused", CommandState::Other("paused".into())),
        ] {
            let line = format!(
                r#"{{"type":"command_lifecycle","command_uuid":"u-1","state":"{state}","session_id":"{SID}","uuid":"x"}}"#
            );
            let Frame::CommandLifecycle {
                command_uuid,
                state: got,
            } = parse(&line)
            else {
                panic!("not a lifecycle frame: {line}");
            };
            assert_eq!(command_uuid, "u-1");
            assert_eq!(got, want);
            assert!(got == state);
        }
        assert!(CommandState::Cancelled.is_final());
        assert!(!CommandState::Started.is_final());
    }

    #[test]
    fn system_init() {
        let line = format!(
            r#"{{"type":"system","subtype":"init","cwd":"/work/ws","session_id":"{SID}","tools":["Task","Bash","Read"],"mcp_servers":[],"model":"claude-opus-5-5","permissionMode":"default","slash_commands":["compact"],"apiKeySource":"ANTHROPIC_API_KEY","claude_code_version":"2.1.331","output_style":"default","agents":["general-purpose"],"skills":[],"plugins":[],"capabilities":[],"memory_paths":{{}},"uuid":"9d1c"}}"#
        );
        match parse(&line) {
            Frame::SystemInit {
                session_id,
                model,
                cwd,
                permission_mode,
                raw,
            } => {
                assert_eq!(session_id, SID);
                assert_eq!(model, "claude-opus-5-5");
                assert_eq!(cwd, "/work/ws");
                assert_eq!(permission_mode, "default");
                assert_eq!(raw["claude_code_version"], "2.1.331");
                assert_eq!(raw["tools"][1], "Bash");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn system_status_and_others() {
        let requesting = r#"{"type":"system","subtype":"status","status":"requesting","permissionMode":"default","user_message_uuids":["u-1"],"session_id":"s","uuid":"a"}"#;
        assert!(matches!(
            parse(requesting),
            Frame::SystemStatus { status: Some(s), .. } if s == "requesting"
        ));
        let after_mode = r#"{"type":"system","subtype":"status","status":null,"permissionMode":"acceptEdits","session_id":"s","uuid":"b"}"#;
        match parse(after_mode) {
            Frame::SystemStatus { status, raw } => {
                assert_eq!(status, None);
                assert_eq!(raw["permissionMode"], "acceptEdits");
            }
            other => panic!("{other:?}"),
        }
        for (line, want) in [
            (
                r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":1,"retry_delay_ms":612,"error_status":529,"error":"overloaded_error","session_id":"s","uuid":"c"}"#,
                "api_retry",
            ),
            (
                r#"{"type":"system","subtype":"permission_denied","tool_name":"Bash","tool_use_id":"toolu_01","message":"Permission to use Bash has been denied.","session_id":"s","uuid":"d"}"#,
                "permission_denied",
            ),
            (
                r#"{"type":"system","subtype":"task_started","task_id":"b1","tool_use_id":"toolu_02","task_type":"local_bash","description":"sleep 5","session_id":"s","uuid":"e"}"#,
                "task_started",
            ),
            (
                r#"{"type":"system","subtype":"thinking_tokens","estimated_tokens":120,"estimated_tokens_delta":12,"session_id":"s","uuid":"f"}"#,
                "thinking_tokens",
            ),
        ] {
            match parse(line) {
                Frame::System { subtype, raw } => {
                    assert_eq!(subtype, want);
                    assert_eq!(raw["subtype"], want);
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn replayed_user_message() {
        let line = format!(
            r#"{{"type":"user","message":{{"role":"user","content":[{{"type":"text","text":"hi"}}]}},"parent_tool_use_id":null,"session_id":"{SID}","uuid":"u-1","timestamp":"2026-05-01T10:00:00.000Z","isReplay":true}}"#
        );
        let Frame::User(user) = parse(&line) else {
            panic!()
        };
        assert!(user.is_replay);
        assert_eq!(user.uuid.as_deref(), Some("u-1"));
        assert_eq!(user.text, "hi");
        assert!(user.tool_results.is_empty());
        assert!(!user.interrupt_marker);

        // A replay that quotes the marker is still only a replay.
        let quoting = r#"{"type":"user","message":{"role":"user","content":"[Request interrupted by user]"},"uuid":"u-2","isReplay":true}"#;
        let Frame::User(user) = parse(quoting) else {
            panic!()
        };
        assert_eq!(user.text, "[Request interrupted by user]");
        assert!(!user.interrupt_marker);
    }

    #[test]
    fn stream_events() {
        let wrap = |event: &str| {
            format!(
                r#"{{"type":"stream_event","event":{event},"session_id":"{SID}","parent_tool_use_id":null,"uuid":"e1","api_message_id":"msg_01"}}"#
            )
        };
        let start = format!(
            r#"{{"type":"stream_event","event":{{"type":"message_start","message":{{"id":"msg_01","type":"message","role":"assistant","model":"claude-opus-5-5","content":[],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":12,"cache_creation_input_tokens":5,"cache_read_input_tokens":7,"output_tokens":1,"service_tier":"standard"}}}}}},"session_id":"{SID}","parent_tool_use_id":null,"uuid":"e0","ttft_ms":211}}"#
        );
        assert_eq!(
            parse(&start),
            Frame::StreamEvent(StreamEvent::MessageStart {
                message_id: "msg_01".into(),
                model: "claude-opus-5-5".into(),
                usage: Usage {
                    input_tokens: 12,
                    output_tokens: 1,
                    cache_creation_input_tokens: 5,
                    cache_read_input_tokens: 7,
                },
                parent_tool_use_id: None,
            })
        );
        let cases = [
            (
                r#"{"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}"#,
                StreamEvent::ContentBlockStart {
                    index: 0,
                    block: ContentBlock::Text { text: "".into() },
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"content_block_start","index":1,"content_block":{"type":"thinking","thinking":"","signature":""}}"#,
                StreamEvent::ContentBlockStart {
                    index: 1,
                    block: ContentBlock::Thinking {
                        thinking: "".into(),
                        signature: "".into(),
                    },
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"content_block_start","index":2,"content_block":{"type":"tool_use","id":"toolu_01","name":"Bash","input":{}}}"#,
                StreamEvent::ContentBlockStart {
                    index: 2,
                    block: ContentBlock::ToolUse {
                        id: "toolu_01".into(),
                        name: "Bash".into(),
                        input: json!({}),
                    },
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hel"}}"#,
                StreamEvent::TextDelta {
                    index: 0,
                    text: "Hel".into(),
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"thinking_delta","thinking":"hmm"}}"#,
                StreamEvent::ThinkingDelta {
                    index: 1,
                    thinking: "hmm".into(),
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"content_block_delta","index":1,"delta":{"type":"signature_delta","signature":"c2ln"}}"#,
                StreamEvent::SignatureDelta {
                    index: 1,
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"content_block_delta","index":2,"delta":{"type":"input_json_delta","partial_json":"{\"command\":"}}"#,
                StreamEvent::InputJsonDelta {
                    index: 2,
                    partial_json: r#"{"command":"#.into(),
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"content_block_stop","index":2}"#,
                StreamEvent::ContentBlockStop {
                    index: 2,
                    parent_tool_use_id: None,
                },
            ),
            (
                r#"{"type":"message_delta","delta":{"stop_reason":"tool_use","stop_sequence":null},"usage":{"output_tokens":42}}"#,
                StreamEvent::MessageDelta {
                    stop_reason: Some("tool_use".into()),
                    output_tokens: 42,
                    parent_tool_use_id: None,
                },
            ),
            (r#"{"type":"message_stop"}"#, StreamEvent::MessageStop),
        ];
        for (event, want) in cases {
            assert_eq!(parse(&wrap(event)), Frame::StreamEvent(want), "{event}");
        }
        // Events the parser does not model stay whole, envelope included.
        match parse(&wrap(r#"{"type":"ping"}"#)) {
            Frame::StreamEvent(StreamEvent::Other(raw)) => {
                assert_eq!(raw["event"]["type"], "ping");
                assert_eq!(raw["session_id"], SID);
            }
            other => panic!("{other:?}"),
        }
        match parse(&wrap(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"citations_delta","citation":{}}}"#,
        )) {
            Frame::StreamEvent(StreamEvent::Other(raw)) => {
                assert_eq!(raw["event"]["delta"]["type"], "citations_delta");
            }
            other => panic!("{other:?}"),
        }
        // Sub-agent events carry their parent.
        let sub = r#"{"type":"stream_event","event":{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"x"}},"parent_tool_use_id":"toolu_task","session_id":"s"}"#;
        let Frame::StreamEvent(ev) = parse(sub) else {
            panic!()
        };
        assert_eq!(ev.parent_tool_use_id(), Some("toolu_task"));
    }

    #[test]
    fn assistant_blocks() {
        let text = format!(
            r#"{{"type":"assistant","message":{{"id":"msg_01","type":"message","role":"assistant","model":"claude-opus-5-5","content":[{{"type":"text","text":"Hello there"}}],"stop_reason":null,"stop_sequence":null,"usage":{{"input_tokens":12,"output_tokens":3,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}}}},"parent_tool_use_id":null,"session_id":"{SID}","uuid":"a1","request_id":"req_01","timestamp":"2026-05-01T10:00:00.200Z"}}"#
        );
        let Frame::Assistant(a) = parse(&text) else {
            panic!()
        };
        assert_eq!(a.message_id, "msg_01");
        assert_eq!(a.model, "claude-opus-5-5");
        assert_eq!(a.text(), Some("Hello there"));
        assert!(!a.is_api_error);
        assert_eq!(a.error, None);
        assert_eq!(a.usage.output_tokens, 3);
        assert_eq!(a.session_id.as_deref(), Some(SID));
        assert_eq!(a.uuid.as_deref(), Some("a1"));
        assert!(a.extra_blocks.is_empty());

        let thinking = r#"{"type":"assistant","message":{"id":"msg_02","model":"m","content":[{"type":"thinking","thinking":"Let me see","signature":"c2lnbmF0dXJl"}],"stop_reason":null},"parent_tool_use_id":null,"session_id":"s","uuid":"a2"}"#;
        let Frame::Assistant(a) = parse(thinking) else {
            panic!()
        };
        assert_eq!(
            a.block,
            ContentBlock::Thinking {
                thinking: "Let me see".into(),
                signature: "c2lnbmF0dXJl".into()
            }
        );

        let sub_tool = r#"{"type":"assistant","message":{"id":"msg_03","model":"m","content":[{"type":"tool_use","id":"toolu_01","name":"Bash","input":{"command":"echo hi","description":"Print hi"}}]},"parent_tool_use_id":"toolu_task","session_id":"s","uuid":"a3"}"#;
        let Frame::Assistant(a) = parse(sub_tool) else {
            panic!()
        };
        assert_eq!(a.parent_tool_use_id.as_deref(), Some("toolu_task"));
        assert_eq!(
            a.block,
            ContentBlock::ToolUse {
                id: "toolu_01".into(),
                name: "Bash".into(),
                input: json!({"command": "echo hi", "description": "Print hi"}),
            }
        );

        let other = r#"{"type":"assistant","message":{"id":"m","content":[{"type":"redacted_thinking","data":"xyz"}]}}"#;
        let Frame::Assistant(a) = parse(other) else {
            panic!()
        };
        assert!(matches!(a.block, ContentBlock::Other(v) if v["data"] == "xyz"));
    }

    #[test]
    fn assistant_api_error() {
        let line = format!(
            r#"{{"type":"assistant","message":{{"id":"7b3e2a41-0d6c-4a51-b0c1-8f0e5d1d2c3b","container":null,"model":"<synthetic>","role":"assistant","stop_reason":"stop_sequence","stop_sequence":"","type":"message","usage":{{"input_tokens":0,"output_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0}},"content":[{{"type":"text","text":"API Error: 529 {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"mock error 529 requested\"}}}}"}}]}},"parent_tool_use_id":null,"session_id":"{SID}","uuid":"e1","error":"unknown","is_api_error_message":true,"api_error_status":529}}"#
        );
        let Frame::Assistant(a) = parse(&line) else {
            panic!()
        };
        assert!(a.is_api_error);
        assert_eq!(a.model, "<synthetic>");
        assert_eq!(a.api_error_status, Some(529));
        let error = a.error.expect("error text");
        assert!(error.starts_with("API Error: 529"), "{error}");
        assert!(error.contains("overloaded_error"));

        // Without the flag, a synthetic message with an `error` field still counts.
        let bare = r#"{"type":"assistant","message":{"id":"x","model":"<synthetic>","content":[{"type":"text","text":"API Error: Connection refused"}]},"error":"unknown"}"#;
        let Frame::Assistant(a) = parse(bare) else {
            panic!()
        };
        assert!(a.is_api_error);
        assert_eq!(a.error.as_deref(), Some("API Error: Connection refused"));
    }

    #[test]
    fn tool_round_trip() {
        let lines = [
            r#"{"type":"assistant","message":{"id":"msg_a","model":"m","content":[{"type":"text","text":"MOCK: calling Bash"}]},"parent_tool_use_id":null,"session_id":"s","uuid":"1"}"#,
            r#"{"type":"assistant","message":{"id":"msg_a","model":"m","content":[{"type":"tool_use","id":"toolu_mock_1","name":"Bash","input":{"command":"echo hi","description":"mock tool call"}}]},"parent_tool_use_id":null,"session_id":"s","uuid":"2"}"#,
            r#"{"type":"control_request","request_id":"c1b2","request":{"subtype":"can_use_tool","tool_name":"Bash","display_name":"Bash","input":{"command":"echo hi","description":"mock tool call"},"description":"mock tool call","tool_use_id":"toolu_mock_1","permission_suggestions":[{"type":"addRules","rules":[{"toolName":"Bash","ruleContent":"echo hi"}],"behavior":"allow","destination":"localSettings"}]}}"#,
            r#"{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_mock_1","type":"tool_result","content":"hi","is_error":false}]},"parent_tool_use_id":null,"session_id":"s","uuid":"3","timestamp":"2026-05-01T10:00:01Z","tool_use_result":{"stdout":"hi","stderr":"","interrupted":false,"isImage":false},"tool_result_meta":[{"tool_use_id":"toolu_mock_1","permission_decision":{"decision":"accept","source":"user_temporary"}}]}"#,
            r#"{"type":"assistant","message":{"id":"msg_b","model":"m","content":[{"type":"text","text":"MOCK-TOOL-RESULT: hi"}]},"parent_tool_use_id":null,"session_id":"s","uuid":"4"}"#,
            r#"{"usage":{"input_tokens":39,"output_tokens":9,"cache_creation_input_tokens":0,"cache_read_input_tokens":0},"type":"result","subtype":"success","is_error":false,"duration_ms":201,"duration_api_ms":150,"num_turns":2,"result":"MOCK-TOOL-RESULT: hi","stop_reason":"end_turn","terminal_reason":"completed","session_id":"s","total_cost_usd":0.0123,"user_message_uuid":"u-1","uuid":"5"}"#,
        ];
        let frames: Vec<Frame> = lines.iter().map(|l| parse(l)).collect();
        let Frame::ControlRequest {
            request_id,
            request:
                ControlRequest::CanUseTool {
                    tool_name,
                    input,
                    tool_use_id,
                    description,
                    blocked_path,
                    permission_suggestions,
                },
        } = &frames[2]
        else {
            panic!("{:?}", frames[2]);
        };
        assert_eq!(request_id, "c1b2");
        assert_eq!(tool_name, "Bash");
        assert_eq!(input["command"], "echo hi");
        assert_eq!(tool_use_id.as_deref(), Some("toolu_mock_1"));
        assert_eq!(description.as_deref(), Some("mock tool call"));
        assert_eq!(*blocked_path, None);
        assert_eq!(permission_suggestions[0]["type"], "addRules");

        let Frame::User(user) = &frames[3] else {
            panic!()
        };
        assert!(!user.is_replay && !user.interrupt_marker);
        assert_eq!(
            user.tool_results,
            vec![ToolResult {
                tool_use_id: "toolu_mock_1".into(),
                content: "hi".into(),
                is_error: false
            }]
        );
        assert_eq!(user.tool_use_result["stdout"], "hi");

        let Frame::Result(result) = &frames[5] else {
            panic!()
        };
        assert_eq!(result.num_turns, 2);
        assert_eq!(result.usage.input_tokens, 39);
        assert_eq!(result.result.as_deref(), Some("MOCK-TOOL-RESULT: hi"));
        assert_eq!(result.user_message_uuids, vec!["u-1".to_owned()]);
        assert_eq!(result.outcome(), ResultOutcome::Success);
    }

    #[test]
    fn tool_result_array_content_and_errors() {
        let line = r#"{"type":"user","message":{"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"line one"},{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}},{"type":"text","text":"line two"}],"is_error":false},{"type":"tool_result","tool_use_id":"toolu_2","content":"<tool_use_error>Error: No such tool available: Bash</tool_use_error>","is_error":true},{"type":"tool_result","tool_use_id":"toolu_3"}]},"session_id":"s","uuid":"x"}"#;
        let Frame::User(user) = parse(line) else {
            panic!()
        };
        assert_eq!(user.tool_results.len(), 3);
        assert_eq!(user.tool_results[0].content, "line one\nline two");
        assert!(!user.tool_results[0].is_error);
        assert!(user.tool_results[1].is_error);
        assert!(user.tool_results[1].content.contains("No such tool"));
        assert_eq!(user.tool_results[2].content, "");
        assert_eq!(user.text, "");
    }

    #[test]
    fn interrupt_sequence() {
        let lines = [
            r#"{"type":"control_response","response":{"subtype":"success","request_id":"int-1","response":{"still_queued":[]}}}"#,
            r#"{"type":"assistant","message":{"id":"msg_s","model":"m","content":[{"type":"text","text":"MOCK-ECHO: [[slow]] go w0 w1"}]},"parent_tool_use_id":null,"session_id":"s","uuid":"a"}"#,
            r#"{"type":"user","message":{"role":"user","content":[{"type":"text","text":"[Request interrupted by user]"}]},"parent_tool_use_id":null,"session_id":"s","uuid":"b","timestamp":"2026-05-01T10:00:02Z"}"#,
            r#"{"type":"result","subtype":"error_during_execution","duration_ms":812,"duration_api_ms":790,"is_error":true,"num_turns":1,"stop_reason":null,"terminal_reason":"aborted_streaming","session_id":"s","total_cost_usd":0.02,"usage":{"input_tokens":30,"output_tokens":0},"modelUsage":{},"permission_denials":[],"errors":[],"user_message_uuids":["u-1"],"uuid":"c"}"#,
            r#"{"type":"command_lifecycle","command_uuid":"u-1","state":"cancelled","session_id":"s"}"#,
        ];
        let frames: Vec<Frame> = lines.iter().map(|l| parse(l)).collect();
        assert_eq!(
            frames[0],
            Frame::ControlResponse {
                request_id: "int-1".into(),
                ok: true,
                response: json!({"still_queued": []}),
                error: None
            }
        );
        assert!(matches!(&frames[2], Frame::User(u) if u.interrupt_marker));
        let Frame::Result(result) = &frames[3] else {
            panic!()
        };
        assert_eq!(result.result, None);
        assert_eq!(result.outcome(), ResultOutcome::Interrupted);
        assert!(matches!(
            &frames[4],
            Frame::CommandLifecycle {
                state: CommandState::Cancelled,
                ..
            }
        ));

        let for_tool = r#"{"type":"user","message":{"role":"user","content":[{"type":"text","text":"[Request interrupted by user for tool use]"}]},"session_id":"s"}"#;
        assert!(matches!(parse(for_tool), Frame::User(u) if u.interrupt_marker));
        let tools = r#"{"type":"result","subtype":"error_during_execution","is_error":true,"terminal_reason":"aborted_tools","session_id":"s"}"#;
        let Frame::Result(r) = parse(tools) else {
            panic!()
        };
        assert_eq!(r.outcome(), ResultOutcome::Interrupted);
    }

    #[test]
    fn control_frames() {
        let error = r#"{"type":"control_response","response":{"subtype":"error","request_id":"r9","error":"Unsupported control request subtype: frobnicate","error_code":"unsupported_request"}}"#;
        assert_eq!(
            parse(error),
            Frame::ControlResponse {
                request_id: "r9".into(),
                ok: false,
                response: Value::Null,
                error: Some("Unsupported control request subtype: frobnicate".into()),
            }
        );
        let hook = r#"{"type":"control_request","request_id":"h1","request":{"subtype":"hook_callback","callback_id":"cb","input":{}}}"#;
        match parse(hook) {
            Frame::ControlRequest {
                request_id,
                request: ControlRequest::Other { subtype, raw },
            } => {
                assert_eq!(request_id, "h1");
                assert_eq!(subtype, "hook_callback");
                assert_eq!(raw["callback_id"], "cb");
            }
            other => panic!("{other:?}"),
        }
        let blocked = r#"{"type":"control_request","request_id":"w1","request":{"subtype":"can_use_tool","tool_name":"Write","input":{"file_path":"/etc/x","content":"y"},"tool_use_id":"toolu_9","blocked_path":"/etc/x"}}"#;
        match parse(blocked) {
            Frame::ControlRequest {
                request:
                    ControlRequest::CanUseTool {
                        blocked_path,
                        permission_suggestions,
                        description,
                        ..
                    },
                ..
            } => {
                assert_eq!(blocked_path.as_deref(), Some("/etc/x"));
                assert_eq!(permission_suggestions, Value::Null);
                assert_eq!(description, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse(r#"{"type":"control_cancel_request","request_id":"c1b2"}"#),
            Frame::ControlCancelRequest {
                request_id: "c1b2".into()
            }
        );
        // Malformed envelopes are not guessed at.
        assert!(matches!(
            parse(r#"{"type":"control_request","request":{"subtype":"interrupt"}}"#),
            Frame::Unknown(v) if v["request"]["subtype"] == "interrupt"
        ));
        assert!(matches!(
            parse(r#"{"type":"control_response","response":{"subtype":"maybe","request_id":"x"}}"#),
            Frame::Unknown(_)
        ));
    }

    #[test]
    fn result_variants() {
        // `type` is deliberately not the first key.
        let api_error = r#"{"subtype":"success","type":"result","is_error":true,"api_error_status":400,"duration_ms":120,"duration_api_ms":0,"num_turns":1,"result":"API Error: 400 {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"mock error 400 requested\"}}","stop_reason":"stop_sequence","terminal_reason":"api_error","session_id":"s","total_cost_usd":0,"usage":{"input_tokens":0,"output_tokens":0},"modelUsage":{},"permission_denials":[],"uuid":"r"}"#;
        let Frame::Result(r) = parse(api_error) else {
            panic!()
        };
        assert_eq!(r.api_error_status, Some(400));
        match r.outcome() {
            ResultOutcome::Error { message } => assert!(message.starts_with("API Error: 400")),
            other => panic!("{other:?}"),
        }

        let max_turns = r#"{"type":"result","subtype":"error_max_turns","is_error":true,"num_turns":2,"terminal_reason":"max_turns","session_id":"s","errors":[]}"#;
        let Frame::Result(r) = parse(max_turns) else {
            panic!()
        };
        assert_eq!(r.outcome(), ResultOutcome::MaxTurns);

        let unknown_resume = r#"{"type":"result","subtype":"error_during_execution","duration_ms":0,"duration_api_ms":0,"is_error":true,"num_turns":0,"stop_reason":null,"session_id":"e8c0","total_cost_usd":0,"usage":{"input_tokens":0,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":0},"modelUsage":{},"permission_denials":[],"errors":["No conversation found with session ID: 11111111-2222-3333-4444-555555555555"],"uuid":"z"}"#;
        let Frame::Result(r) = parse(unknown_resume) else {
            panic!()
        };
        assert_eq!(
            r.outcome(),
            ResultOutcome::Error {
                message:
                    "No conversation found with session ID: 11111111-2222-3333-4444-555555555555"
                        .into()
            }
        );

        // A future error subtype is still a result, and an error.
        let Frame::Result(r) =
            parse(r#"{"type":"result","subtype":"error_max_budget_usd","is_error":true}"#)
        else {
            panic!()
        };
        assert_eq!(
            r.outcome(),
            ResultOutcome::Error {
                message: "error_max_budget_usd".into()
            }
        );

        // Lenient numbers: absent, float-typed, wrong type.
        let Frame::Result(r) = parse(
            r#"{"type":"result","subtype":"success","num_turns":2.0,"duration_ms":"soon","user_message_uuid":"a","user_message_uuids":["a","b"]}"#,
        ) else {
            panic!()
        };
        assert_eq!(r.num_turns, 2);
        assert_eq!(r.duration_ms, 0);
        assert_eq!(r.usage, Usage::default());
        assert_eq!(r.total_cost_usd, None);
        assert_eq!(r.user_message_uuids, vec!["a".to_owned(), "b".to_owned()]);
        assert_eq!(r.outcome(), ResultOutcome::Success);
    }

    #[test]
    fn cost_and_model() {
        let line = r#"{"type":"result","subtype":"success","is_error":false,"result":"ok","session_id":"s","total_cost_usd":0.75,"usage":{"input_tokens":39,"cache_creation_input_tokens":100,"cache_read_input_tokens":200,"output_tokens":9},"modelUsage":{"claude-opus-5-5":{"inputTokens":90,"outputTokens":20,"costUSD":0.7},"claude-haiku-4-5":{"inputTokens":5,"outputTokens":1,"costUSD":0.05}},"model_usage_since_last_result":{"claude-opus-5-5":{"inputTokens":39,"outputTokens":9,"cacheReadInputTokens":200,"cacheCreationInputTokens":100,"costUSD":0.25,"contextWindow":200000,"maxOutputTokens":32000},"claude-haiku-4-5":{"inputTokens":5,"outputTokens":1,"costUSD":0.01}}}"#;
        let Frame::Result(r) = parse(line) else {
            panic!()
        };
        assert_eq!(
            r.usage,
            Usage {
                input_tokens: 39,
                output_tokens: 9,
                cache_creation_input_tokens: 100,
                cache_read_input_tokens: 200
            }
        );
        // The per-turn delta wins over the running total.
        assert!((r.turn_cost_usd(Some(0.1)) - 0.26).abs() < 1e-9);
        assert_eq!(r.model().as_deref(), Some("claude-opus-5-5"));

        // Without the delta: running total minus the previous one, never negative.
        let running = ResultFrame {
            total_cost_usd: Some(0.75),
            model_usage: json!({"claude-sonnet-4-6": {"costUSD": 0.75}}),
            ..ResultFrame::default()
        };
        assert!((running.turn_cost_usd(Some(0.5)) - 0.25).abs() < 1e-9);
        assert!((running.turn_cost_usd(None) - 0.75).abs() < 1e-9);
        assert_eq!(running.turn_cost_usd(Some(2.0)), 0.0);
        assert_eq!(running.model().as_deref(), Some("claude-sonnet-4-6"));
        // An empty delta falls back too.
        let empty_delta = ResultFrame {
            total_cost_usd: Some(1.0),
            model_usage_since_last_result: json!({}),
            ..ResultFrame::default()
        };
        assert!((empty_delta.turn_cost_usd(Some(0.4)) - 0.6).abs() < 1e-9);
        assert_eq!(empty_delta.model(), None);
        assert_eq!(ResultFrame::default().turn_cost_usd(None), 0.0);
    }

    #[test]
    fn unknown_and_invalid() {
        for line in [
            r#"{"type":"keep_alive"}"#,
            r#"{"type":"rate_limit_event","rate_limit_info":{}}"#,
            r#"{"type":"system","status":"no subtype"}"#,
            r#"{"no_type":true}"#,
            r#"[1,2,3]"#,
            r#""just a string""#,
            r#"{"type":"command_lifecycle","state":"queued"}"#,
        ] {
            assert!(matches!(parse(line), Frame::Unknown(_)), "{line}");
        }
        assert!(parse_line("not json").is_err());
        assert!(parse_line("").is_err());
        assert!(parse_line(r#"{"type":"result""#).is_err());
    }

    #[test]
    fn long_lines_are_fine() {
        let big = "x".repeat(8 << 20);
        let line = json!({
            "type": "user",
            "message": {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": big}]},
        })
        .to_string();
        let Frame::User(user) = parse(&line) else {
            panic!()
        };
        assert_eq!(user.tool_results[0].content.len(), 8 << 20);
    }

    #[test]
    fn stdin_builders() {
        let uuid = Uuid::parse_str("0b7c7a4e-6f51-4c8e-9a39-1b1d7c6f0e11").expect("uuid");
        let line = user_message("multi\nline \"quoted\"", uuid);
        assert!(!line.contains('\n'));
        let v: Value = serde_json::from_str(&line).expect("json");
        assert_eq!(v["type"], "user");
        assert_eq!(v["message"]["role"], "user");
        assert_eq!(v["message"]["content"][0]["text"], "multi\nline \"quoted\"");
        assert_eq!(v["uuid"], "0b7c7a4e-6f51-4c8e-9a39-1b1d7c6f0e11");
        assert_eq!(v["parent_tool_use_id"], Value::Null);

        let v: Value = serde_json::from_str(&initialize_request("i1")).expect("json");
        assert_eq!(
            v,
            json!({"type":"control_request","request_id":"i1","request":{"subtype":"initialize"}})
        );
        let v: Value = serde_json::from_str(&interrupt_request("i2")).expect("json");
        assert_eq!(v["request"]["subtype"], "interrupt");
        let v: Value = serde_json::from_str(&control_request(
            "i3",
            json!({"subtype": "set_model", "model": "m"}),
        ))
        .expect("json");
        assert_eq!(v["request"]["model"], "m");

        // Responses round-trip through our own parser.
        assert_eq!(
            parse(&allow_tool("c1", json!({"command": "ls"}))),
            Frame::ControlResponse {
                request_id: "c1".into(),
                ok: true,
                response: json!({"behavior": "allow", "updatedInput": {"command": "ls"}}),
                error: None,
            }
        );
        assert_eq!(
            parse(&deny_tool("c2", "not today")),
            Frame::ControlResponse {
                request_id: "c2".into(),
                ok: true,
                response: json!({"behavior": "deny", "message": "not today"}),
                error: None,
            }
        );
        assert_eq!(
            parse(&control_success("c3", json!({}))),
            Frame::ControlResponse {
                request_id: "c3".into(),
                ok: true,
                response: json!({}),
                error: None,
            }
        );
        assert_eq!(
            parse(&control_error("c4", "nope")),
            Frame::ControlResponse {
                request_id: "c4".into(),
                ok: false,
                response: Value::Null,
                error: Some("nope".into()),
            }
        );
    }
}
