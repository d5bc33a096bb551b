//! Turns: enqueue (with per-session seq, idempotency and the `turn.queued` event in one
//! transaction), lookups, and the worker's state transitions.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use super::events::{self, Fence};
use super::{Error, Result};
use crate::domain::{SessionId, SessionStatus, TenantId, TurnId, WorkerId};
use crate::events::{EventBody, NewEvent, Usage};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TurnRow {
    pub turn_id: TurnId,
    pub session_id: SessionId,
    pub tenant_id: TenantId,
    pub seq: i64,
    pub prompt: String,
    pub status: String,
    pub result: Option<String>,
    pub error: Option<String>,
    pub worker_id: Option<WorkerId>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub interrupt_requested_at: Option<DateTime<Utc>>,
}

impl TurnRow {
    pub fn is_terminal(&self) -> bool {
        matches!(self.status.as_str(), "completed" | "failed" | "interrupted")
    }
}

const COLUMNS: &str =
    "turn_id, session_id, tenant_id, seq, prompt, status, result, error, worker_id,
    created_at, started_at, completed_at, interrupt_requested_at";

/// A prompt to enqueue.
#[derive(Debug, Clone)]
pub struct NewTurn<'a> {
    pub tenant_id: TenantId,
    pub session_id: SessionId,
    pub prompt: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: &'a [u8],
}

/// How an enqueue ended.
#[derive(Debug)]
pub enum Enqueued {
    /// A new turn; `owner` is the worker holding the session's live lease, if any.
    New {
        turn: TurnRow,
        owner: Option<WorkerId>,
    },
    /// The idempotency key was used before for the same request: that turn.
    Replayed(TurnRow),
    /// The idempotency key was used before for a different request.
    KeyReused,
    /// No such live session in the tenant.
    NoSession,
}

/// Enqueues a turn inside the caller's transaction (which also pushes the job).
pub async fn enqueue(conn: &mut PgConnection, new: &NewTurn<'_>) -> Result<Enqueued> {
    // The row lock serializes enqueues of one session, so seqs follow arrival order.
    let status: Option<String> = sqlx::query_scalar(
        "select status from sessions where session_id = $1 and tenant_id = $2 and status <> 'deleted' for update",
    )
    .bind(new.session_id)
    .bind(new.tenant_id)
    .fetch_optional(&mut *conn)
    .await?;
    let Some(status) = status else {
        return Ok(Enqueued::NoSession);
    };

    if let Some(key) = new.idempotency_key {
        let existing: Option<(TurnId, Option<Vec<u8>>)> = sqlx::query_as(
            "select turn_id, request_hash from turns where session_id = $1 and idempotency_key = $2",
        )
        .bind(new.session_id)
        .bind(key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some((turn_id, hash)) = existing {
            if hash.as_deref() != Some(new.request_hash) {
                return Ok(Enqueued::KeyReused);
            }
            let turn = get_any(&mut *conn, turn_id)
                .await?
                .ok_or_else(|| Error::Corrupt("turn vanished".into()))?;
            return Ok(Enqueued::Replayed(turn));
        }
    }

    let seq: i64 = sqlx::query_scalar(
        "update sessions set last_turn_seq = last_turn_seq + 1, status = 'busy', updated_at = now(),
                last_active_at = now()
          where session_id = $1 returning last_turn_seq",
    )
    .bind(new.session_id)
    .fetch_one(&mut *conn)
    .await?;
    let turn_id = TurnId::new_random();
    let turn = sqlx::query_as::<_, TurnRow>(sqlx::AssertSqlSafe(format!(
        "insert into turns (turn_id, session_id, tenant_id, seq, prompt, idempotency_key, request_hash)
         values ($1, $2, $3, $4, $5, $6, $7)
         returning {COLUMNS}"
    )))
    .bind(turn_id)
    .bind(new.session_id)
    .bind(new.tenant_id)
    .bind(seq)
    .bind(new.prompt)
    .bind(new.idempotency_key)
    .bind(new.request_hash)
    .fetch_one(&mut *conn)
    .await?;

    let mut evs = Vec::with_capacity(2);
    if status != "busy" {
        evs.push(NewEvent::session(EventBody::SessionStatus {
            status: SessionStatus::Busy,
        }));
    }
    evs.push(NewEvent::turn(
        turn_id,
        EventBody::TurnQueued {
            turn_seq: seq,
            prompt: new.prompt.to_owned(),
        },
    ));
    events::append(&mut *conn, new.session_id, None, &evs).await?;

    let owner: Option<WorkerId> = sqlx::query_scalar(
        "select l.worker_id from session_leases l join workers w using (worker_id)
          where l.session_id = $1 and l.expires_at > now() and w.stopped_at is null and not w.draining",
    )
    .bind(new.session_id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(Enqueued::New { turn, owner })
}

async fn get_any(db: impl PgExecutor<'_>, id: TurnId) -> Result<Option<TurnRow>> {
    let row = sqlx::query_as::<_, TurnRow>(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from turns where turn_id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// A turn of the tenant.
pub async fn get(db: impl PgExecutor<'_>, tenant: TenantId, id: TurnId) -> Result<Option<TurnRow>> {
    let row = sqlx::query_as::<_, TurnRow>(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from turns where turn_id = $1 and tenant_id = $2"
    )))
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// A session's turns in order, after seq `after`.
pub async fn list(
    db: impl PgExecutor<'_>,
    session: SessionId,
    after: i64,
    limit: i64,
) -> Result<Vec<TurnRow>> {
    let rows = sqlx::query_as::<_, TurnRow>(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from turns where session_id = $1 and seq > $2 order by seq limit $3"
    )))
    .bind(session)
    .bind(after)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// Usage of one turn.
/// A `turn_usage` row as selected by [`usage`].
type UsageRow = (TurnId, i64, i64, i64, i64, f64, Option<i64>, Option<String>);

/// Usage of the given turns (those that have any), in one query.
pub async fn usage(db: impl PgExecutor<'_>, turns: &[TurnId]) -> Result<HashMap<TurnId, Usage>> {
    let ids: Vec<uuid::Uuid> = turns.iter().map(|t| t.0).collect();
    let rows: Vec<UsageRow> = sqlx::query_as(
        "select turn_id, input_tokens, output_tokens, cache_read_tokens, cache_write_tokens, cost_usd,
                duration_ms, model
           from turn_usage where turn_id = any($1)",
    )
    .bind(&ids)
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, i, o, cr, cw, cost, d, model)| {
            let usage = Usage {
                input_tokens: i,
                output_tokens: o,
                cache_read_tokens: cr,
                cache_write_tokens: cw,
                cost_usd: cost,
                duration_ms: d.unwrap_or(0),
                model,
            };
            (id, usage)
        })
        .collect())
}

/// Totals over all finished turns of a session.
pub async fn session_usage(db: impl PgExecutor<'_>, session: SessionId) -> Result<Usage> {
    let (i, o, cr, cw, cost, d): (i64, i64, i64, i64, f64, i64) = sqlx::query_as(
        "select coalesce(sum(input_tokens), 0)::bigint, coalesce(sum(output_tokens), 0)::bigint,
                coalesce(sum(cache_read_tokens), 0)::bigint, coalesce(sum(cache_write_tokens), 0)::bigint,
                coalesce(sum(cost_usd), 0)::float8, coalesce(sum(duration_ms), 0)::bigint
           from turn_usage where session_id = $1",
    )
    .bind(session)
    .fetch_one(db)
    .await?;
    Ok(Usage {
        input_tokens: i,
        output_tokens: o,
        cache_read_tokens: cr,
        cache_write_tokens: cw,
        cost_usd: cost,
        duration_ms: d,
        model: None,
    })
}

/// Asks the session's owner to interrupt its running turn; returns that turn, if any.
pub async fn request_interrupt(
    conn: &mut PgConnection,
    tenant: TenantId,
    session: SessionId,
) -> Result<Option<TurnId>> {
    let turn: Option<TurnId> = sqlx::query_scalar(
        "update turns set interrupt_requested_at = coalesce(interrupt_requested_at, now())
          where turn_id = (select turn_id from turns
                            where session_id = $1 and tenant_id = $2 and status = 'running'
                            order by seq limit 1)
          returning turn_id",
    )
    .bind(session)
    .bind(tenant)
    .fetch_optional(&mut *conn)
    .await?;
    if turn.is_some() {
        notify_control(&mut *conn, session, "interrupt").await?;
    }
    Ok(turn)
}

/// Wakes the owner of a session (interrupt, delete).
pub async fn notify_control(
    conn: &mut PgConnection,
    session: SessionId,
    action: &str,
) -> Result<()> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(crate::events::CONTROL_CHANNEL)
        .bind(format!("{session}:{action}"))
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Fails every turn of a session that has not finished (the session was deleted).
pub async fn fail_unfinished(
    conn: &mut PgConnection,
    session: SessionId,
    error: &str,
) -> Result<Vec<TurnId>> {
    let ids: Vec<TurnId> = sqlx::query_scalar(
        "update turns set status = 'failed', error = $2, completed_at = now()
          where session_id = $1 and status in ('queued', 'running')
          returning turn_id",
    )
    .bind(session)
    .bind(error)
    .fetch_all(&mut *conn)
    .await?;
    Ok(ids)
}

/// The next turn a worker should run for a session: the oldest unfinished one.
pub async fn next_unfinished(
    db: impl PgExecutor<'_>,
    session: SessionId,
) -> Result<Option<TurnRow>> {
    let row = sqlx::query_as::<_, TurnRow>(sqlx::AssertSqlSafe(format!(
        "select {COLUMNS} from turns where session_id = $1 and status in ('queued', 'running')
          order by seq limit 1"
    )))
    .bind(session)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// Whether a turn has yet to end (queued or running); `false` for an unknown turn.
pub async fn is_unfinished(db: impl PgExecutor<'_>, turn: TurnId) -> Result<bool> {
    let pending: Option<bool> =
        sqlx::query_scalar("select status in ('queued', 'running') from turns where turn_id = $1")
            .bind(turn)
            .fetch_optional(db)
            .await?;
    Ok(pending.unwrap_or(false))
}

/// Marks a turn running under the worker's lease.
pub async fn mark_running(conn: &mut PgConnection, turn: TurnId, fence: Fence) -> Result<()> {
    let n = sqlx::query(
        "update turns set status = 'running', started_at = coalesce(started_at, now()), worker_id = $2,
                lease_generation = $3
          where turn_id = $1 and status in ('queued', 'running')",
    )
    .bind(turn)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if n == 0 {
        return Err(Error::Corrupt(format!("turn {turn} is not pending")));
    }
    Ok(())
}

/// How a turn ended, for [`finish`].
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed { result: String, usage: Usage },
    Failed { error: String, usage: Option<Usage> },
    Interrupted { usage: Option<Usage> },
}

/// Records the end of a turn (status, result, usage) and whether the session is now idle.
/// Returns `true` when no other turn of the session is pending.
pub async fn finish(conn: &mut PgConnection, turn: &TurnRow, outcome: &Outcome) -> Result<bool> {
    let (status, result, error, usage) = match outcome {
        Outcome::Completed { result, usage } => {
            ("completed", Some(result.as_str()), None, Some(usage))
        }
        Outcome::Failed { error, usage } => ("failed", None, Some(error.as_str()), usage.as_ref()),
        Outcome::Interrupted { usage } => ("interrupted", None, None, usage.as_ref()),
    };
    sqlx::query(
        "update turns set status = $2, result = $3, error = $4, completed_at = now()
          where turn_id = $1 and status in ('queued', 'running')",
    )
    .bind(turn.turn_id)
    .bind(status)
    .bind(result)
    .bind(error)
    .execute(&mut *conn)
    .await?;
    if let Some(u) = usage {
        sqlx::query(
            "insert into turn_usage (turn_id, session_id, tenant_id, model, input_tokens, output_tokens,
                                     cache_read_tokens, cache_write_tokens, cost_usd, duration_ms)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
             on conflict (turn_id) do nothing",
        )
        .bind(turn.turn_id)
        .bind(turn.session_id)
        .bind(turn.tenant_id)
        .bind(&u.model)
        .bind(u.input_tokens)
        .bind(u.output_tokens)
        .bind(u.cache_read_tokens)
        .bind(u.cache_write_tokens)
        .bind(u.cost_usd)
        .bind(u.duration_ms)
        .execute(&mut *conn)
        .await?;
    }
    let idle: bool = sqlx::query_scalar(
        "update sessions set status = case when exists (
                    select 1 from turns where session_id = $1 and status in ('queued', 'running'))
                 then 'busy' else 'idle' end,
                updated_at = now(), last_active_at = now()
          where session_id = $1 and status <> 'deleted'
          returning status = 'idle'",
    )
    .bind(turn.session_id)
    .fetch_optional(&mut *conn)
    .await?
    .unwrap_or(false);
    Ok(idle)
}
