//! Writes a turn's events under the worker's lease, coalescing deltas: the first delta after a
//! quiet spell is written at once (time to first token matters most), later ones are batched
//! for at most `window`, so a token stream costs tens of commits a second, not one per token.

use std::time::Duration;

use sqlx::PgPool;
use tokio::time::Instant;

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
            text: String::new(),
        }
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

    /// Writes everything buffered in one statement. Fails with `Fenced` when the lease
    /// was lost.
    pub async fn flush(&mut self) -> store::Result<()> {
        self.release_held();
        if self.ready.is_empty() {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await?;
        store::events::append(&mut conn, self.session, Some(self.fence), &self.ready).await?;
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
