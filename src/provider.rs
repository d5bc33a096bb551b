//! Agent providers: how a worker starts, drives and stops one agent CLI per session. A
//! provider turns the CLI's own protocol into [`AgentEvent`]s, the same for every agent.

pub mod claude_code;
pub mod opencode;
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
    /// Resource limits of the process and its children.
    pub limits: process::Limits,
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

/// A session's warm agent, whichever the provider.
#[derive(Debug)]
pub enum Agent {
    /// A Claude Code process of its own.
    Claude(Box<claude_code::ClaudeProcess>),
    /// A conversation on the worker's shared OpenCode server.
    OpenCode(Box<opencode::OpenCodeSession>),
}

impl Agent {
    /// The process that runs the agent (for OpenCode, the shared server).
    pub fn pid(&self) -> u32 {
        match self {
            Self::Claude(p) => p.pid(),
            Self::OpenCode(s) => s.pid(),
        }
    }

    pub async fn send_prompt(&mut self, text: &str) -> Result<(), Error> {
        match self {
            Self::Claude(p) => p.send_prompt(text).await,
            Self::OpenCode(s) => s.send_prompt(text).await,
        }
    }

    /// Asks the agent to stop the running turn; it then ends `Interrupted`.
    pub async fn interrupt(&mut self) -> Result<(), Error> {
        match self {
            Self::Claude(p) => p.interrupt().await,
            Self::OpenCode(s) => s.interrupt().await,
        }
    }

    /// The next event; `None` when the agent is gone.
    pub async fn next_event(&mut self) -> Option<AgentEvent> {
        match self {
            Self::Claude(p) => p.next_event().await,
            Self::OpenCode(s) => s.next_event().await,
        }
    }

    /// Why the agent went away.
    pub async fn exit_summary(&mut self) -> String {
        match self {
            Self::Claude(p) => p.exit_summary().await,
            Self::OpenCode(s) => s.exit_summary(),
        }
    }

    /// Stops the agent: the Claude Code process and its tools; for OpenCode, the session's
    /// running turn (the shared server stays, and so does the conversation in its store).
    pub async fn stop(&mut self, grace: std::time::Duration) {
        match self {
            Self::Claude(p) => p.stop(grace).await,
            Self::OpenCode(s) => s.stop().await,
        }
    }
}
