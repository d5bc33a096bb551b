//! Session events: appended in batches with per-session seqs (optionally fenced by the
//! writer's lease), read back in seq order for replay.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, PgExecutor};

use super::{Error, Result};
use crate::domain::{SessionId, TurnId, WorkerId};
use crate::events::{NewEvent, SessionEvent};

/// The lease a worker writes under. A write whose fence no longer matches the session's
/// lease is refused: the worker lost the session to another one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence {
    pub worker_id: WorkerId,
    pub generation: i64,
}

/// Appends `events` in order; returns the seq of the last one. With a fence, fails with
/// [`Error::Fenced`] unless the writer still holds the session's lease.
pub async fn append(
    conn: &mut PgConnection,
    session: SessionId,
    fence: Option<Fence>,
    events: &[NewEvent],
) -> Result<i64> {
    if events.is_empty() {
        return max_seq(&mut *conn, session).await;
    }
    let n = events.len() as i64;
    let (turns, kinds, payloads) = columns(events);
    // One statement (one round trip, atomic without a transaction): take the seqs under
    // the fence, insert the rows; a lost lease matches nothing and inserts nothing.
    let last: Option<i64> = sqlx::query_scalar(
        "with u as (
             update sessions set last_event_seq = last_event_seq + $2, last_active_at = now()
              where session_id = $1
                and ($3::uuid is null or exists (
                      select 1 from session_leases l
                       where l.session_id = $1 and l.worker_id = $3 and l.generation = $4))
          returning last_event_seq
         ), i as (
             insert into session_events (session_id, seq, turn_id, type, payload)
             select $1, u.last_event_seq - $2 + x.ord, x.turn_id, x.type, x.payload
               from u, unnest($5::uuid[], $6::text[], $7::jsonb[])
                       with ordinality as x(turn_id, type, payload, ord)
         )
         select last_event_seq from u",
    )
    .bind(session)
    .bind(n)
    .bind(fence.map(|f| f.worker_id))
    .bind(fence.map(|f| f.generation))
    .bind(&turns)
    .bind(&kinds)
    .bind(&payloads)
    .fetch_optional(&mut *conn)
    .await?;
    match last {
        Some(last) => Ok(last),
        None if fence.is_some() => Err(Error::Fenced),
        None => Err(Error::Corrupt(format!("no session {session}"))),
    }
}

/// Events as the column arrays the insert statements unnest.
pub(super) fn columns(
    events: &[NewEvent],
) -> (Vec<Option<uuid::Uuid>>, Vec<&'static str>, Vec<Value>) {
    let turns = events.iter().map(|e| e.turn_id.map(|t| t.0)).collect();
    let kinds = events.iter().map(|e| e.body.kind()).collect();
    let payloads = events
        .iter()
        .map(|e| serde_json::to_value(&e.body).unwrap_or(Value::Null))
        .collect();
    (turns, kinds, payloads)
}

/// Whether a batch whose first event is `first` was already appended after seq `after` (a
/// retry after the connection broke may find its earlier try committed); its last seq if
/// so. Only the turn's writer appends its events after the turn started, so the turn's
/// highest seq is the batch's last.
pub async fn landed(
    db: impl PgExecutor<'_>,
    session: SessionId,
    after: i64,
    first: &NewEvent,
) -> Result<Option<i64>> {
    let payload = serde_json::to_value(&first.body).unwrap_or(Value::Null);
    let seq: Option<i64> = sqlx::query_scalar(
        "select (select max(seq) from session_events
                  where session_id = $1 and seq > $2 and turn_id is not distinct from $3)
          where exists (select 1 from session_events
                         where session_id = $1 and seq > $2 and turn_id is not distinct from $3
                           and type = $4 and payload = $5)",
    )
    .bind(session)
    .bind(after)
    .bind(first.turn_id)
    .bind(first.body.kind())
    .bind(payload)
    .fetch_optional(db)
    .await?
    .flatten();
    Ok(seq)
}

/// The highest seq of a session (0 when it has none).
pub async fn max_seq(db: impl PgExecutor<'_>, session: SessionId) -> Result<i64> {
    let seq: Option<i64> =
        sqlx::query_scalar("select last_event_seq from sessions where session_id = $1")
            .bind(session)
            .fetch_optional(db)
            .await?;
    Ok(seq.unwrap_or(0))
}

#[derive(Debug, Clone, sqlx::FromRow)]
struct EventRow {
    seq: i64,
    turn_id: Option<TurnId>,
    payload: Value,
    created_at: DateTime<Utc>,
}

/// Events after `after`, in seq order, at most `limit`, optionally of one turn only.
pub async fn list(
    db: impl PgExecutor<'_>,
    session: SessionId,
    after: i64,
    turn: Option<TurnId>,
    limit: i64,
) -> Result<Vec<SessionEvent>> {
    let rows = sqlx::query_as::<_, EventRow>(
        "select seq, turn_id, payload, created_at from session_events
          where session_id = $1 and seq > $2 and ($3::uuid is null or turn_id = $3)
          order by seq
          limit $4",
    )
    .bind(session)
    .bind(after)
    .bind(turn)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| SessionEvent {
            seq: r.seq,
            turn_id: r.turn_id,
            created_at: r.created_at,
            body: r.payload,
        })
        .collect())
}
