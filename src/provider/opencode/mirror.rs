//! Session migration, OpenCode's side: reading what a turn changed in a conversation off the
//! worker's `opencode serve`, and writing a whole conversation into another server (another
//! HOME, another host) so that the same OpenCode session id resumes there with full context.
//! Keeping the mirror is the worker's business (`store::opencode_mirror`); this is HTTP only.
//!
//! Reading: `GET /session/{id}` and `GET /session/{id}/message?limit=k` (the last k messages,
//! oldest first), widened until it reaches back to the previous turn's user message, since
//! OpenCode still updates a turn's messages after it reports idle (the user message's
//! summary).
//!
//! Writing: `POST /sync/replay` with synthesized events (`session.created.1`, then
//! `message.updated.1` and `message.part.updated.1` per message and part, then
//! `session.updated.1`), which the running server applies at once. Its rules, observed with
//! opencode 1.18.33: the seqs of a session the server does not know run contiguously from 0
//! (continued in later requests if need be); events at or below the server's own seq for the
//! session are skipped silently, so a stale copy is deleted first (which drops its event log
//! too); the session's `projectID` must exist on the server (else a 500), so it and
//! `directory`/`path` are rewritten for this server's project of the session's directory.
//! `/sync/*` is experimental upstream: a version bump must check it again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::{OpenCodeSession, Server};
use crate::opencode::ids::{self, Kind};

/// The first window read after a turn; widened ×4 until it reaches the previous turn.
const FIRST_WINDOW: usize = 16;
/// Events per replay request: a long conversation goes in several contiguous ones.
const REPLAY_CHUNK: usize = 500;
/// Per request: a hung server must not hold up the session (giving it up waits for the
/// mirror in flight). A replay of 500 events takes about 1.5 s.
const HTTP_TIMEOUT: Duration = Duration::from_secs(30);
/// How much of an error body goes into the error.
const BODY_IN_ERROR: usize = 300;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("OpenCode server: {0}")]
    Http(#[from] reqwest::Error),
    #[error("OpenCode {what}: {status} {body}")]
    Status {
        what: String,
        status: reqwest::StatusCode,
        body: String,
    },
    #[error("OpenCode {0}")]
    Unexpected(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a turn changed in the conversation.
#[derive(Debug, Clone)]
pub struct Changes {
    /// The Session object.
    pub info: Value,
    /// The mirror's messages from this id on are replaced by `messages`; `None`: all are.
    pub from: Option<String>,
    /// `(id, {info, parts})`, oldest first.
    pub messages: Vec<(String, Value)>,
}

/// Reads one session's conversation off its server, beside the session's actor.
#[derive(Debug, Clone)]
pub struct Reader {
    server: Arc<Server>,
    id: String,
    cwd: PathBuf,
}

impl OpenCodeSession {
    /// A reader of this conversation that outlives a borrow of the session.
    pub fn reader(&self) -> Reader {
        Reader {
            server: self.server.clone(),
            id: self.id.clone(),
            cwd: self.cwd.clone(),
        }
    }
}

impl Reader {
    /// The conversation's messages from `since` (an earlier turn's user message) on; all of
    /// them when `since` is `None`, when there are fewer than a window, or after a revert
    /// (which may have removed older messages than any window holds).
    pub async fn changes_since(&self, since: Option<&str>) -> Result<Changes> {
        let info = get_json(&self.server, &format!("/session/{}", self.id), &self.cwd)
            .await?
            .ok_or_else(|| Error::Unexpected(format!("session {} is gone", self.id)))?;
        let since = since.filter(|_| info.get("revert").is_none_or(Value::is_null));
        let mut window = FIRST_WINDOW;
        loop {
            let path = match since {
                Some(_) => format!("/session/{}/message?limit={window}", self.id),
                None => format!("/session/{}/message", self.id),
            };
            let list = get_json(&self.server, &path, &self.cwd)
                .await?
                .ok_or_else(|| Error::Unexpected(format!("session {} is gone", self.id)))?;
            let messages = with_ids(list)?;
            match reach(&messages, since, window) {
                Reach::All => {
                    return Ok(Changes {
                        info,
                        from: None,
                        messages,
                    });
                }
                Reach::From(from) => {
                    return Ok(Changes {
                        info,
                        from: Some(from),
                        messages,
                    });
                }
                Reach::Short => window *= 4,
            }
        }
    }
}

/// What a window of the last `window` messages covers.
#[derive(Debug, PartialEq, Eq)]
enum Reach {
    /// The whole conversation.
    All,
    /// Everything from this message on, back to `since` at least.
    From(String),
    /// Not back to `since`: widen it.
    Short,
}

fn reach(messages: &[(String, Value)], since: Option<&str>, window: usize) -> Reach {
    let Some(since) = since.filter(|_| messages.len() >= window) else {
        return Reach::All;
    };
    // Ids ascend with time (byte order), as the server lists them.
    match messages.first() {
        Some((first, _)) if first.as_str() <= since => Reach::From(first.clone()),
        _ => Reach::Short,
    }
}

/// `[{info, parts}]` → `(id, message)` pairs.
fn with_ids(list: Value) -> Result<Vec<(String, Value)>> {
    let Value::Array(list) = list else {
        return Err(Error::Unexpected("message list is not a list".into()));
    };
    list.into_iter()
        .map(|m| match m["info"]["id"].as_str() {
            Some(id) => Ok((id.to_owned(), m)),
            None => Err(Error::Unexpected("message without an id".into())),
        })
        .collect()
}

/// How this server's copy of a conversation compares with its mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalCopy {
    /// The server does not have the session.
    Missing,
    /// It has an older state: turns ran elsewhere since.
    Stale,
    /// It has what the mirror has, or more (a turn here whose mirror failed; the next mirror
    /// reads it again).
    Current,
}

/// Compares the server's copy of session `id` with the newest mirrored message.
pub async fn local_copy(
    server: &Server,
    id: &str,
    cwd: &Path,
    mirrored_last: Option<&str>,
) -> Result<LocalCopy> {
    let Some(list) = get_json(server, &format!("/session/{id}/message?limit=1"), cwd).await? else {
        return Ok(LocalCopy::Missing);
    };
    let last = with_ids(list)?.pop().map(|(id, _)| id);
    Ok(compare(last.as_deref(), mirrored_last))
}

/// Message ids ascend with time: a last message older than the mirror's means the copy
/// missed turns that ran elsewhere. (Hosts whose clocks differ by more than the time between
/// two turns could misjudge this; the session then resumes the local copy.)
fn compare(local_last: Option<&str>, mirrored_last: Option<&str>) -> LocalCopy {
    match (local_last, mirrored_last) {
        (_, None) => LocalCopy::Current,
        (None, Some(_)) => LocalCopy::Stale,
        (Some(local), Some(mirrored)) if local < mirrored => LocalCopy::Stale,
        _ => LocalCopy::Current,
    }
}

/// Writes conversation `id` (its Session object and `{info, parts}` messages, from the
/// mirror) into `server` as a session of `cwd`, deleting a stale copy first. Returns how
/// many events were replayed.
pub async fn restore(
    server: &Server,
    id: &str,
    cwd: &Path,
    mut info: Value,
    messages: &[Value],
    stale: bool,
) -> Result<usize> {
    if info["id"].as_str() != Some(id) {
        return Err(Error::Unexpected(format!(
            "mirror of session {} is not of {id}",
            info["id"]
        )));
    }
    if stale {
        let r = server
            .request(
                reqwest::Method::DELETE,
                &format!("/session/{id}"),
                Some(cwd),
            )
            .timeout(HTTP_TIMEOUT)
            .send()
            .await?;
        if !r.status().is_success() && r.status() != reqwest::StatusCode::NOT_FOUND {
            return Err(status_error("DELETE /session", r).await);
        }
    }
    let project = get_json(server, "/project/current", cwd)
        .await?
        .ok_or_else(|| Error::Unexpected("GET /project/current: 404".into()))?;
    let Some(project_id) = project["id"].as_str() else {
        return Err(Error::Unexpected(format!(
            "GET /project/current without an id: {project}"
        )));
    };
    // `path` is the directory relative to the project's worktree ("/" for a directory
    // outside any repository), as OpenCode sets it on creation.
    let path = project["worktree"]
        .as_str()
        .and_then(|w| cwd.strip_prefix(w).ok())
        .unwrap_or(cwd);
    info["projectID"] = json!(project_id);
    info["directory"] = json!(cwd.display().to_string());
    info["path"] = json!(path.display().to_string());
    let events = replay_events(id, &info, messages, chrono::Utc::now().timestamp_millis());
    for chunk in events.chunks(REPLAY_CHUNK) {
        let r = server
            .request(reqwest::Method::POST, "/sync/replay", Some(cwd))
            .json(&json!({"directory": cwd.display().to_string(), "events": chunk}))
            .timeout(HTTP_TIMEOUT)
            .send()
            .await?;
        if !r.status().is_success() {
            return Err(status_error("POST /sync/replay", r).await);
        }
    }
    Ok(events.len())
}

/// The events that recreate a conversation on a server that does not know it: seqs from 0.
fn replay_events(id: &str, info: &Value, messages: &[Value], now_ms: i64) -> Vec<Value> {
    let mut events = Vec::new();
    let mut push = |kind: &str, data: Value| {
        events.push(json!({
            "id": ids::fresh(Kind::Event),
            "aggregateID": id,
            "seq": events.len(),
            "type": kind,
            "data": data,
        }));
    };
    push("session.created.1", json!({"sessionID": id, "info": info}));
    for m in messages {
        push(
            "message.updated.1",
            json!({"sessionID": id, "info": m["info"]}),
        );
        for part in m["parts"].as_array().into_iter().flatten() {
            push(
                "message.part.updated.1",
                json!({"sessionID": id, "part": part, "time": now_ms}),
            );
        }
    }
    push("session.updated.1", json!({"sessionID": id, "info": info}));
    events
}

/// `GET path` as JSON; `None` on 404.
pub(super) async fn get_json(server: &Server, path: &str, cwd: &Path) -> Result<Option<Value>> {
    let r = server
        .request(reqwest::Method::GET, path, Some(cwd))
        .timeout(HTTP_TIMEOUT)
        .send()
        .await?;
    if r.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !r.status().is_success() {
        let what = format!("GET {}", path.split('?').next().unwrap_or(path));
        return Err(status_error(&what, r).await);
    }
    Ok(Some(r.json().await?))
}

async fn status_error(what: &str, r: reqwest::Response) -> Error {
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    Error::Status {
        what: what.to_owned(),
        status,
        body: body.chars().take(BODY_IN_ERROR).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_events_recreate_the_session_then_each_message_and_part_in_order() {
        let info = json!({"id": "ses_x", "title": "t"});
        let messages = [
            json!({"info": {"id": "msg_1"}, "parts": [{"id": "prt_1"}]}),
            json!({"info": {"id": "msg_2"}, "parts": [{"id": "prt_2"}, {"id": "prt_3"}]}),
        ];
        let events = replay_events("ses_x", &info, &messages, 7);
        let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "session.created.1",
                "message.updated.1",
                "message.part.updated.1",
                "message.updated.1",
                "message.part.updated.1",
                "message.part.updated.1",
                "session.updated.1",
            ]
        );
        for (i, e) in events.iter().enumerate() {
            assert_eq!(e["seq"], i, "{e}");
            assert_eq!(e["aggregateID"], "ses_x");
            assert!(
                ids::has_prefix(e["id"].as_str().unwrap_or(""), "evt"),
                "{e}"
            );
            assert_eq!(e["data"]["sessionID"], "ses_x");
        }
        assert_eq!(events[0]["data"]["info"], info);
        assert_eq!(events[3]["data"]["info"]["id"], "msg_2");
        assert_eq!(events[5]["data"]["part"]["id"], "prt_3");
        assert_eq!(events[5]["data"]["time"], 7);
    }

    #[test]
    fn a_window_reaches_back_to_the_previous_turn_or_is_widened() {
        let window: Vec<(String, Value)> = ["msg_3", "msg_4", "msg_5"]
            .iter()
            .map(|id| ((*id).to_owned(), json!({})))
            .collect();
        assert_eq!(
            reach(&window, Some("msg_4"), 3),
            Reach::From("msg_3".into())
        );
        assert_eq!(
            reach(&window, Some("msg_3"), 3),
            Reach::From("msg_3".into())
        );
        assert_eq!(reach(&window, Some("msg_2"), 3), Reach::Short);
        // Fewer messages than asked for: that is the whole conversation.
        assert_eq!(reach(&window, Some("msg_2"), 4), Reach::All);
        assert_eq!(reach(&window, None, 3), Reach::All);
    }

    #[test]
    fn a_copy_is_stale_when_its_last_message_is_older_than_the_mirrors() {
        let (old, new) = ("msg_21047120d001a", "msg_210471cb8001b");
        assert_eq!(compare(Some(old), Some(new)), LocalCopy::Stale);
        assert_eq!(compare(None, Some(new)), LocalCopy::Stale);
        assert_eq!(compare(Some(new), Some(new)), LocalCopy::Current);
        // A turn here whose mirror failed: keep it (the next mirror catches up).
        assert_eq!(compare(Some(new), Some(old)), LocalCopy::Current);
        assert_eq!(compare(Some(old), None), LocalCopy::Current);
    }
}
