//! The session event model: what a session emits, in order, stored in `session_events`
//! and streamed to clients. Each event has a per-session monotonic `seq`.

pub mod hub;
pub mod listener;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use crate::domain::{SessionStatus, TurnId, WorkerId};
use crate::waf::{Category, Level};

/// Tokens, cost and time of one turn.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    /// This turn's own cost in USD (not a running total).
    pub cost_usd: f64,
    pub duration_ms: i64,
    pub model: Option<String>,
}

/// What happened. Serialized with a `type` tag, e.g. `{"type":"text.delta","text":"Hi"}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type")]
pub enum EventBody {
    /// A prompt was accepted and waits for its turn.
    #[serde(rename = "turn.queued")]
    TurnQueued {
        turn_seq: i64,
        prompt: String,
        /// The client's id for the user message (OpenCode clients may choose it).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message_id: Option<String>,
        /// The agent persona the client asked for (OpenCode's `agent`, e.g. `build`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        agent: Option<String>,
    },
    /// The session was created (or brought back after a delete).
    #[serde(rename = "session.created")]
    SessionCreated {},
    /// The session's settings changed (e.g. its title).
    #[serde(rename = "session.updated")]
    SessionUpdated {},
    /// The session was deleted.
    #[serde(rename = "session.deleted")]
    SessionDeleted {},
    /// The agent started working on the turn.
    #[serde(rename = "turn.started")]
    TurnStarted {
        worker_id: WorkerId,
        pid: Option<u32>,
        resumed: bool,
    },
    /// The worker running the turn was lost before the turn produced any output: it runs
    /// again (once) on the session's new owner.
    #[serde(rename = "turn.retried")]
    TurnRetried { reason: String },
    /// Streamed answer text (coalesced: one event may hold several tokens).
    #[serde(rename = "text.delta")]
    TextDelta { text: String },
    /// Streamed thinking text.
    #[serde(rename = "thinking.delta")]
    ThinkingDelta { text: String },
    /// The agent called a tool.
    #[serde(rename = "tool.started")]
    ToolStarted {
        tool_use_id: String,
        name: String,
        input: Value,
    },
    /// A tool returned.
    #[serde(rename = "tool.completed")]
    ToolCompleted {
        tool_use_id: String,
        output: String,
        is_error: bool,
    },
    /// One assistant message (one model call) is complete.
    #[serde(rename = "message.completed")]
    MessageCompleted { message_id: String, text: String },
    /// The turn finished; `result` is the final text.
    #[serde(rename = "turn.completed")]
    TurnCompleted { result: String, usage: Usage },
    /// The turn failed; `error` says why.
    #[serde(rename = "turn.failed")]
    TurnFailed { error: String },
    /// The turn was interrupted on request.
    #[serde(rename = "turn.interrupted")]
    TurnInterrupted { partial_text: String },
    /// The session became busy or idle.
    #[serde(rename = "session.status")]
    SessionStatus { status: SessionStatus },
    /// The agent's previous conversation could not be restored; this turn starts fresh.
    #[serde(rename = "session.context_lost")]
    ContextLost { reason: String },
    /// A frame of the agent that hotplex does not interpret, kept verbatim.
    #[serde(rename = "agent.raw")]
    AgentRaw { frame: Value },
    /// The WAF refused a prompt: no turn was created.
    #[serde(rename = "security.blocked")]
    SecurityBlocked {
        /// What was checked: `prompt`.
        context: String,
        /// The rule that matched (`waf.disabled_rules` names it).
        rule_id: String,
        level: Level,
        category: Category,
        reason: String,
        /// What the rule matched, normalized and shortened.
        fragment: String,
    },
}

impl EventBody {
    /// The `type` tag.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::TurnQueued { .. } => "turn.queued",
            Self::SessionCreated {} => "session.created",
            Self::SessionUpdated {} => "session.updated",
            Self::SessionDeleted {} => "session.deleted",
            Self::TurnStarted { .. } => "turn.started",
            Self::TurnRetried { .. } => "turn.retried",
            Self::TextDelta { .. } => "text.delta",
            Self::ThinkingDelta { .. } => "thinking.delta",
            Self::ToolStarted { .. } => "tool.started",
            Self::ToolCompleted { .. } => "tool.completed",
            Self::MessageCompleted { .. } => "message.completed",
            Self::TurnCompleted { .. } => "turn.completed",
            Self::TurnFailed { .. } => "turn.failed",
            Self::TurnInterrupted { .. } => "turn.interrupted",
            Self::SessionStatus { .. } => "session.status",
            Self::ContextLost { .. } => "session.context_lost",
            Self::AgentRaw { .. } => "agent.raw",
            Self::SecurityBlocked { .. } => "security.blocked",
        }
    }

    /// Whether the event ends a turn.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            Self::TurnCompleted { .. } | Self::TurnFailed { .. } | Self::TurnInterrupted { .. }
        )
    }
}

/// An event to append.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub turn_id: Option<TurnId>,
    pub body: EventBody,
}

impl NewEvent {
    pub fn turn(turn_id: TurnId, body: EventBody) -> Self {
        Self {
            turn_id: Some(turn_id),
            body,
        }
    }

    pub fn session(body: EventBody) -> Self {
        Self {
            turn_id: None,
            body,
        }
    }
}

/// An event as clients see it: `seq`, `turn_id`, `created_at` and the body's fields.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionEvent {
    pub seq: i64,
    pub turn_id: Option<TurnId>,
    pub created_at: DateTime<Utc>,
    #[serde(flatten)]
    pub body: Value,
}

/// NOTIFY channel of new events; payload `<session_id>:<highest new seq>`.
pub const EVENTS_CHANNEL: &str = "session_events";
/// NOTIFY channel of control requests for workers; payload `<session_id>:<action>`.
pub const CONTROL_CHANNEL: &str = "session_control";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_serialize_with_their_type_tag() {
        let body = EventBody::TextDelta { text: "hi".into() };
        let v = serde_json::to_value(&body).unwrap();
        assert_eq!(v, serde_json::json!({"type": "text.delta", "text": "hi"}));
        assert_eq!(body.kind(), "text.delta");
        let back: EventBody = serde_json::from_value(v).unwrap();
        assert_eq!(back, body);
        let done = EventBody::TurnCompleted {
            result: "ok".into(),
            usage: Usage::default(),
        };
        assert_eq!(serde_json::to_value(&done).unwrap()["type"], done.kind());
        assert!(done.is_terminal());
    }
}
