//! Writes a turn's events under the worker's lease, coalescing deltas: the first delta after a
//! quiet spell is written at once (time to first token matters most), later ones are batched
//! for at most `window`, so a token stream costs tens of commits a second, not one per token.

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::domain::{SessionId, TurnId};
use crate::events::{EventBody, NewEvent};
use crate::store::{self, events::Fence};

/// Deltas held back longer than this are written.
pub const DEFAULT_WINDOW: Duration = Duration::from_millis(20);
/// Held-back delta text larger than this is written at once.
const MAX_HELD_BYTES: usize = 16 * 1024;

/// Buffered, fenced event writer for one turn.
#[derive(Debug)]
pub struct EventWriter {
    pool: PgPool,
    session: SessionId,
    fence: Fence,
    turn: TurnId,
    window: Duration,
    ready: Vec<NewEvent>,
    held: Option<EventBody>,
    held_since: Option<Instant>,
    last_flush: Option<Instant>,
    /// The seq of the last event written, once the turn has started: a write retried after
    /// the connection broke checks what landed after it.
    last_seq: Option<i64>,
    /// Stops retrying writes through a database outage (the worker stops).
    stop: CancellationToken,
    /// Answer text of the turn so far (for `turn.interrupted`).
    pub text: String,
}

impl EventWriter {
    pub fn new(
        pool: PgPool,
        session: SessionId,
        fence: Fence,
        turn: TurnId,
        window: Duration,
    ) -> Self {
        Self {
            pool,
            session,
            fence,
            turn,
            window,
            ready: Vec::new(),
            held: None,
            held_since: None,
            last_flush: None,
            last_seq: None,
            stop: CancellationToken::new(),
            text: String::new(),
        }
    }

    /// Gives up retrying writes through a database outage once `token` is cancelled
    /// (by default it retries for as long as the outage lasts).
    pub fn stop_on(mut self, token: CancellationToken) -> Self {
        self.stop = token;
        self
    }

    /// The turn started: its `turn.started` event has `seq`.
    pub fn started(&mut self, seq: i64) {
        self.last_seq = Some(seq);
    }

    /// Adds an event; returns `true` when it should be written now.
    pub fn push(&mut self, body: EventBody) -> bool {
        let now = Instant::now();
        match body {
            EventBody::TextDelta { text } => {
                self.text.push_str(&text);
                self.hold(now, text, true)
            }
            EventBody::ThinkingDelta { text } => self.hold(now, text, false),
            other => {
                self.release_held();
                self.ready.push(NewEvent::turn(self.turn, other));
                true
            }
        }
    }

    fn hold(&mut self, now: Instant, text: String, answer: bool) -> bool {
        let same_kind = matches!(
            (&self.held, answer),
            (Some(EventBody::TextDelta { .. }), true)
                | (Some(EventBody::ThinkingDelta { .. }), false)
        );
        if !same_kind {
            self.release_held();
        }
        match &mut self.held {
            Some(EventBody::TextDelta { text: t }) | Some(EventBody::ThinkingDelta { text: t }) => {
                t.push_str(&text)
            }
            _ => {
                self.held = Some(if answer {
                    EventBody::TextDelta { text }
                } else {
                    EventBody::ThinkingDelta { text }
                });
                self.held_since = Some(now);
            }
        }
        let quiet = self
            .last_flush
            .is_none_or(|t| now.duration_since(t) >= self.window);
        let big = match &self.held {
            Some(EventBody::TextDelta { text }) | Some(EventBody::ThinkingDelta { text }) => {
                text.len() >= MAX_HELD_BYTES
            }
            _ => false,
        };
        quiet || big
    }

    fn release_held(&mut self) {
        if let Some(body) = self.held.take() {
            self.ready.push(NewEvent::turn(self.turn, body));
        }
        self.held_since = None;
    }

    /// When held-back deltas are due, if any.
    pub fn due_at(&self) -> Option<Instant> {
        self.held_since.map(|t| t + self.window)
    }

    /// Writes everything buffered in one statement; through a database outage it waits and
    /// retries (the agent's output waits in its pipe meanwhile). Fails with `Fenced` when
    /// the lease was lost.
    pub async fn flush(&mut self) -> store::Result<()> {
        self.release_held();
        let Some(first) = self.ready.first() else {
            return Ok(());
        };
        let (pool, session, fence, after, batch) = (
            &self.pool,
            self.session,
            self.fence,
            self.last_seq,
            &self.ready,
        );
        let last =
            super::retry::until_available(&self.stop, "writing turn events", |retry| async move {
                // A try whose connection broke may have committed: never write a batch twice.
                if retry
                    && let Some(after) = after
                    && let Some(seq) = store::events::landed(pool, session, after, first).await?
                {
                    return Ok(seq);
                }
                let mut conn = pool.acquire().await?;
                store::events::append(&mut conn, session, Some(fence), batch).await
            })
            .await?;
        self.last_seq = Some(last);
        self.ready.clear();
        self.last_flush = Some(Instant::now());
        Ok(())
    }

    /// Takes the buffered events, for a caller that writes them with more (a turn's start
    /// or end) in one statement.
    pub fn take(&mut self) -> Vec<NewEvent> {
        self.release_held();
        self.last_flush = Some(Instant::now());
        std::mem::take(&mut self.ready)
    }
}
