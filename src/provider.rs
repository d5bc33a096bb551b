//! Agent providers: how a worker starts, drives and stops one agent CLI per session. A
//! provider turns the CLI's own protocol into [`AgentEvent`]s, the same for every agent.

pub mod claude_code;
pub mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;
use uuid::Uuid;

use crate::events::Usage;

/// What an agent process reports, normalized across providers.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// Answer text, token by token.
    TextDelta(String),
    /// Thinking text.
    ThinkingDelta(String),
    /// A tool call with its complete input.
    ToolStarted {
        id: String,
        name: String,
        input: Value,
    },
    /// A tool's result.
    ToolCompleted {
        id: String,
        output: String,
        is_error: bool,
    },
    /// One assistant message is complete.
    MessageCompleted { id: String, text: String },
    /// The turn ended (exactly once per prompt).
    TurnEnded(TurnEnd),
    /// A frame kept verbatim (unknown, or informative such as an API retry).
    Raw(Value),
}

/// How a turn ended, as the agent reported it.
#[derive(Debug, Clone, PartialEq)]
pub struct TurnEnd {
    pub outcome: TurnOutcome,
    pub usage: Usage,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TurnOutcome {
    Completed { result: String },
    Failed { error: String },
    Interrupted,
}

/// Everything needed to start an agent process for a session.
#[derive(Debug, Clone)]
pub struct SpawnSpec {
    pub binary: PathBuf,
    /// Extra arguments from the config, appended last.
    pub extra_args: Vec<String>,
    /// The complete environment of the child (an allow-list: nothing else is inherited).
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    /// The id the CLI knows the conversation by.
    pub cli_session_id: Uuid,
    /// Continue an existing conversation (`--resume`) rather than start one.
    pub resume: bool,
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    pub permission_mode: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {binary}: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("the agent did not become ready: {0}")]
    NotReady(String),
    #[error("the agent process is gone")]
    Gone,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}
