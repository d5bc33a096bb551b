//! Session migration for OpenCode sessions, the actor's side. After each turn the
//! conversation is read off the worker's OpenCode server and mirrored to PostgreSQL beside
//! the actor (fenced by the lease, like Claude Code's transcript); before a session attaches
//! to a server that lacks it, or holds a stale copy (the session ran elsewhere since), the
//! conversation is replayed into that server from the mirror, under the same OpenCode
//! session id.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::task::JoinHandle;

use super::Actor;
use crate::provider::Agent;
use crate::provider::opencode::Server;
use crate::provider::opencode::mirror::{self, LocalCopy};
use crate::store::opencode_mirror::{self as store_mirror, TurnMirror};
use crate::worker::retry;

/// The mirror of the session's current OpenCode conversation.
#[derive(Debug)]
pub(super) struct OpenCodeMirror {
    agent_ref: String,
    /// The user message of the last turn mirrored: the next mirror reads back to it.
    /// `None`: the next mirror reads the whole conversation.
    mark: Arc<Mutex<Option<String>>>,
    /// The mirror in flight: the next one, and giving the session up, wait for it.
    pending: Option<JoinHandle<()>>,
}

impl OpenCodeMirror {
    pub(super) fn new(agent_ref: &str, mark: Option<String>) -> Self {
        Self {
            agent_ref: agent_ref.to_owned(),
            mark: Arc::new(Mutex::new(mark)),
            pending: None,
        }
    }
}

/// How a conversation stands on the server after [`Actor::restore_opencode`].
#[derive(Debug)]
pub(super) enum Restore {
    /// The server has the conversation as mirrored (or the mirror has nothing of it);
    /// mirrors go on from `mark`.
    Ready { mark: Option<String> },
    /// The conversation could not be brought back and the server does not have it: why.
    Failed(String),
}

impl Actor {
    /// Before the session attaches to `server`: brings OpenCode conversation `known` back
    /// from its mirror when the server lacks it or holds a stale copy. An error (the turn
    /// fails; the next one tries again) when a stale copy is left: resuming it would fork
    /// the conversation.
    pub(super) async fn restore_opencode(
        &self,
        server: &Server,
        known: &str,
        cwd: &Path,
    ) -> Result<Restore, String> {
        let head = self
            .db("reading the OpenCode mirror", || {
                store_mirror::head(&self.pool, self.session)
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(head) = head.filter(|h| h.agent_ref == known) else {
            return Ok(Restore::Ready { mark: None });
        };
        let local = mirror::local_copy(server, known, cwd, head.last_message_id.as_deref())
            .await
            .map_err(|e| format!("checking the OpenCode session against its mirror: {e}"))?;
        if local == LocalCopy::Current {
            return Ok(Restore::Ready {
                mark: head.turn_message_id,
            });
        }
        let snapshot = self
            .db("reading the OpenCode mirror", || {
                store_mirror::snapshot(&self.pool, self.session, known)
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(snapshot) = snapshot else {
            return Ok(Restore::Ready { mark: None });
        };
        let started = std::time::Instant::now();
        let stale = local == LocalCopy::Stale;
        match mirror::restore(server, known, cwd, snapshot.info, &snapshot.messages, stale).await {
            Ok(events) => {
                tracing::info!(session.id = %self.session, opencode.session = known, messages = snapshot.messages.len(), events, stale, duration_ms = started.elapsed().as_millis() as u64, "restored the OpenCode conversation from its mirror");
                Ok(Restore::Ready {
                    mark: head.turn_message_id,
                })
            }
            Err(e) => {
                tracing::warn!(session.id = %self.session, opencode.session = known, error = %e, "restoring the OpenCode conversation from its mirror failed");
                let left = mirror::local_copy(server, known, cwd, None).await;
                if matches!(left, Ok(LocalCopy::Missing)) {
                    Ok(Restore::Failed(e.to_string()))
                } else {
                    Err(format!(
                        "restoring the OpenCode conversation from its mirror failed: {e}"
                    ))
                }
            }
        }
    }

    /// After a turn: mirrors what it changed in the OpenCode conversation, beside the actor
    /// (after the previous mirror). A failure costs only that: the next mirror reads back to
    /// the last turn mirrored, and meanwhile a next owner elsewhere would resume the older
    /// state.
    pub(super) fn mirror_opencode(&mut self) {
        let Some(Agent::OpenCode(session)) = &self.process else {
            return;
        };
        let (Some(state), Some(turn_message)) =
            (self.opencode_mirror.as_mut(), session.last_prompt())
        else {
            return;
        };
        let reader = session.reader();
        let turn_message = turn_message.to_owned();
        let agent_ref = state.agent_ref.clone();
        let mark = state.mark.clone();
        let previous = state.pending.take();
        let (pool, session_id, fence, token) = (
            self.pool.clone(),
            self.session,
            self.fence,
            self.token.clone(),
        );
        state.pending = Some(self.tracker.spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let since = mark.lock().unwrap_or_else(PoisonError::into_inner).clone();
            let changes = match reader.changes_since(since.as_deref()).await {
                Ok(changes) => changes,
                Err(e) => {
                    tracing::warn!(session.id = %session_id, error = %e, "reading the OpenCode conversation to mirror failed");
                    return;
                }
            };
            let turn = TurnMirror {
                agent_ref: &agent_ref,
                info: &changes.info,
                from: changes.from.as_deref(),
                messages: &changes.messages,
                turn_message_id: &turn_message,
            };
            // Upserts: repeating a try whose connection broke is harmless.
            let written = retry::until_available(&token, "mirroring the OpenCode conversation", |_| {
                store_mirror::write_turn(&pool, session_id, fence, turn)
            })
            .await;
            match written {
                Ok(true) => {
                    *mark.lock().unwrap_or_else(PoisonError::into_inner) = Some(turn_message);
                }
                Ok(false) => {
                    tracing::info!(session.id = %session_id, "not mirroring the OpenCode conversation: the lease was lost");
                }
                Err(e) => {
                    tracing::warn!(session.id = %session_id, error = %e, "mirroring the OpenCode conversation failed");
                }
            }
        }));
    }

    /// Waits for the mirror in flight and forgets the conversation's mirror state: the
    /// session leaves the server (or gives its lease up) only once its last turn is mirrored.
    pub(super) async fn end_opencode_mirror(&mut self) {
        if let Some(pending) = self.opencode_mirror.take().and_then(|m| m.pending) {
            let _ = pending.await;
        }
    }
}
