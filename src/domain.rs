//! Domain vocabulary: typed ids, validated newtypes, and the deterministic session-id
//! derivation shared with the original HotPlex.

use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

/// Namespace used when a session is created with an `external_id` but no `namespace`.
pub const DEFAULT_NAMESPACE: &str = "default";

macro_rules! uuid_id {
    ($(#[$meta:meta])* $name:ident) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, sqlx::Type, ToSchema)]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A fresh random id.
            pub fn new_random() -> Self {
                Self(Uuid::new_v4())
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A session: random v4, or v5 derived from `(namespace, external_id)`.
    SessionId
);
uuid_id!(
    /// A tenant: the unit of isolation; every API key belongs to one.
    TenantId
);
uuid_id!(
    /// An API key's id (not the secret).
    ApiKeyId
);
uuid_id!(
    /// One prompt of a session and its outcome.
    TurnId
);
uuid_id!(
    /// A worker process of the fleet.
    WorkerId
);

/// The id of a session created with an external id, compatible with the original
/// HotPlex: `UUIDv5(NAMESPACE_URL, "{namespace}:session:{external_id}")`.
pub fn derive_session_id(namespace: &str, external_id: &str) -> SessionId {
    let name = format!("{namespace}:session:{external_id}");
    SessionId(Uuid::new_v5(&Uuid::NAMESPACE_URL, name.as_bytes()))
}

/// A rejected input value: which field and why. Becomes a 422 at the API.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: &'static str,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: &'static str, reason: impl Into<String>) -> Self {
        Self {
            field,
            reason: reason.into(),
        }
    }
}

fn check_text(
    field: &'static str,
    value: &str,
    max: usize,
    allow_newlines: bool,
) -> Result<(), Invalid> {
    if value.chars().count() > max {
        return Err(Invalid::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    let bad = value
        .chars()
        .any(|c| c.is_control() && !(allow_newlines && matches!(c, '\n' | '\r' | '\t')));
    if bad {
        return Err(Invalid::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// Which agent CLI runs a session.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
pub enum Provider {
    #[default]
    #[serde(rename = "claude-code")]
    ClaudeCode,
    #[serde(rename = "opencode")]
    OpenCode,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClaudeCode => "claude-code",
            Self::OpenCode => "opencode",
        }
    }
}

impl FromStr for Provider {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "claude-code" => Ok(Self::ClaudeCode),
            "opencode" => Ok(Self::OpenCode),
            _ => Err(Invalid::new(
                "provider",
                "must be `claude-code` or `opencode`",
            )),
        }
    }
}

/// The agent's tool-permission mode (Claude Code's `--permission-mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub enum PermissionMode {
    #[default]
    Default,
    AcceptEdits,
    Plan,
    DontAsk,
    Auto,
    BypassPermissions,
}

/// Where a session stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// No turn is running.
    Idle,
    /// A turn is queued or running.
    Busy,
    /// Deleted; kept for history and accounting, invisible to the API.
    Deleted,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Busy => "busy",
            Self::Deleted => "deleted",
        }
    }
}

impl FromStr for SessionStatus {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "idle" => Ok(Self::Idle),
            "busy" => Ok(Self::Busy),
            "deleted" => Ok(Self::Deleted),
            _ => Err(Invalid::new("status", "must be `idle` or `busy`")),
        }
    }
}

/// An API key's power: admins manage tenants and keys; users only use sessions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ToSchema, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Admin,
    User,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Admin => "admin",
            Self::User => "user",
        }
    }
}

impl FromStr for Role {
    type Err = Invalid;
    fn from_str(s: &str) -> Result<Self, Invalid> {
        match s {
            "admin" => Ok(Self::Admin),
            "user" => Ok(Self::User),
            _ => Err(Invalid::new("role", "must be `admin` or `user`")),
        }
    }
}

/// A namespace for deterministic session ids: `[A-Za-z0-9._-]{1,64}`, so that the `:`
/// separators of the derivation stay unambiguous.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace(String);

impl Namespace {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        if ok {
            Ok(Self(s.to_owned()))
        } else {
            Err(Invalid::new(
                "namespace",
                "must be 1-64 characters of A-Z, a-z, 0-9, `.`, `_`, `-`",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A caller's own id for a session (a chat thread, a ticket): 1-512 characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalId(String);

impl ExternalId {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        if s.trim().is_empty() {
            return Err(Invalid::new("external_id", "must not be empty"));
        }
        check_text("external_id", s, 512, false)?;
        Ok(Self(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A tenant name: lower-case, `[a-z0-9][a-z0-9._-]{0,62}`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TenantName(String);

impl TenantName {
    pub fn parse(s: &str) -> Result<Self, Invalid> {
        let mut chars = s.chars();
        let first_ok = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        let rest_ok = chars
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
        if first_ok && rest_ok && s.len() <= 63 {
            Ok(Self(s.to_owned()))
        } else {
            Err(Invalid::new(
                "tenant",
                "must be 1-63 characters of a-z, 0-9, `.`, `_`, `-`, starting with a letter or digit",
            ))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A session's working directory as the client gave it: relative (resolved under the
/// work root) or absolute inside an allowed root; never with `..`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkDir(PathBuf);

impl WorkDir {
    pub fn parse(s: &str, allowed_roots: &[PathBuf]) -> Result<Self, Invalid> {
        if s.is_empty() {
            return Err(Invalid::new("work_dir", "must not be empty"));
        }
        check_text("work_dir", s, 4096, false)?;
        let path = Path::new(s);
        if path.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(Invalid::new("work_dir", "must not contain `..`"));
        }
        if path.is_absolute() && !allowed_roots.iter().any(|root| path.starts_with(root)) {
            return Err(Invalid::new(
                "work_dir",
                "an absolute path must lie inside the work root or an `allowed_work_dirs` entry",
            ));
        }
        Ok(Self(path.to_path_buf()))
    }

    pub fn as_str(&self) -> &str {
        // Parsed from a &str, so it is valid UTF-8.
        self.0.to_str().unwrap_or_default()
    }
}

/// A model id passed verbatim to the agent (`--model`).
pub fn parse_model(s: &str) -> Result<String, Invalid> {
    if s.trim().is_empty() {
        return Err(Invalid::new("model", "must not be empty"));
    }
    check_text("model", s, 200, false)?;
    Ok(s.to_owned())
}

/// The system prompt appended to the agent's own.
pub fn parse_system_prompt(s: &str) -> Result<String, Invalid> {
    check_text("system_prompt", s, 100_000, true)?;
    Ok(s.to_owned())
}

/// Tool rules such as `Bash`, `Bash(git diff:*)`, `Read(./src/**)`.
pub fn parse_tool_rules(field: &'static str, rules: &[String]) -> Result<Vec<String>, Invalid> {
    if rules.len() > 200 {
        return Err(Invalid::new(field, "must have at most 200 entries"));
    }
    for rule in rules {
        if rule.trim().is_empty() {
            return Err(Invalid::new(field, "entries must not be empty"));
        }
        check_text(field, rule, 500, false)?;
    }
    Ok(rules.to_vec())
}

/// A short human label (key names and the like).
/// An agent persona name (OpenCode's `agent`): 1-64 letters, digits, `-` or `_`.
pub fn parse_agent(s: &str) -> Result<String, Invalid> {
    if s.is_empty()
        || s.len() > 64
        || !s
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(Invalid::new(
            "agent",
            "must be 1-64 letters, digits, `-` or `_`",
        ));
    }
    Ok(s.to_owned())
}

pub fn parse_label(field: &'static str, s: &str) -> Result<String, Invalid> {
    if s.trim().is_empty() {
        return Err(Invalid::new(field, "must not be empty"));
    }
    check_text(field, s, 200, false)?;
    Ok(s.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Golden vectors from the original HotPlex (shared/docs/seed.md §1.1).
    #[test]
    fn session_id_derivation_matches_the_original() {
        assert_eq!(
            derive_session_id("default", "my-session").to_string(),
            "75157c5a-2610-532a-9712-3998d349fb7d"
        );
        let chat = derive_session_id("hotplex", "slack:U123:U0BOT:C456:1700000000.000100");
        assert_eq!(chat.to_string(), "734bfb04-21fd-5913-90b6-fd6e4ae7b4dc");
        assert_eq!(
            derive_session_id("slack", &chat.to_string()).to_string(),
            "76a58649-740f-55f6-abe7-021e25100b9c"
        );
        assert_eq!(
            derive_session_id("default", "my-session")
                .0
                .get_version_num(),
            5
        );
    }

    #[test]
    fn namespaces_exclude_the_separator() {
        assert!(Namespace::parse("default").is_ok());
        assert!(Namespace::parse("team-a.prod_1").is_ok());
        assert!(Namespace::parse("a:b").is_err());
        assert!(Namespace::parse("").is_err());
        assert!(Namespace::parse(&"x".repeat(65)).is_err());
    }

    #[test]
    fn work_dirs_stay_inside_allowed_roots() {
        let roots = vec![PathBuf::from("/srv/work")];
        assert!(WorkDir::parse("project/a", &roots).is_ok());
        assert!(WorkDir::parse("/srv/work/x", &roots).is_ok());
        assert!(WorkDir::parse("/etc", &roots).is_err());
        assert!(WorkDir::parse("/srv/workshop", &roots).is_err());
        assert!(WorkDir::parse("a/../../etc", &roots).is_err());
        assert!(WorkDir::parse("a\0b", &roots).is_err());
    }

    #[test]
    fn text_checks_reject_control_characters_and_length() {
        assert!(ExternalId::parse("thread-1").is_ok());
        assert!(ExternalId::parse("a\u{7}b").is_err());
        assert!(ExternalId::parse(" ").is_err());
        assert!(parse_system_prompt("line one\nline two").is_ok());
        assert!(parse_model(&"m".repeat(201)).is_err());
        assert!(parse_tool_rules("allowed_tools", &["Bash(git diff:*)".into()]).is_ok());
        assert!(parse_tool_rules("allowed_tools", &["".into()]).is_err());
        assert!(TenantName::parse("acme").is_ok());
        assert!(TenantName::parse("Acme").is_err());
    }
}
