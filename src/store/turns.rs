//! Turns: enqueue (with per-session seq, idempotency and the `turn.queued` event in one
//! transaction), lookups, and the worker's state transitions.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor, PgPool};

use super::events::{self, Fence};
use super::queue;
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
    /// The client's id for the user message, if it chose one (OpenCode's `messageID`).
    pub message_id: Option<&'a str>,
    /// The agent persona the client asked for (OpenCode's `agent`).
    pub agent: Option<&'a str>,
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

/// Enqueues a turn: the turn row, its events and its queue job, atomically. Without an
/// idempotency key this is one statement (one round trip): it locks the session, takes the
/// next turn and event seqs, inserts the turn, its events and its apalis job (on the queue
/// of the session's live owner, else the shared one), and wakes the owner directly with a
/// `session_control` NOTIFY `<session>:work`: the job is the durable record, the NOTIFY the
/// fast path.
pub async fn enqueue(pool: &PgPool, new: &NewTurn<'_>) -> Result<Enqueued> {
    let Some(key) = new.idempotency_key else {
        let mut conn = pool.acquire().await?;
        return insert_turn(&mut conn, new).await;
    };
    let mut tx = super::begin(pool).await?;
    // The row lock serializes retries of one key, so only the first one inserts.
    let live: Option<bool> = sqlx::query_scalar(
        "select true from sessions where session_id = $1 and tenant_id = $2 and status <> 'deleted' for update",
    )
    .bind(new.session_id)
    .bind(new.tenant_id)
    .fetch_optional(&mut *tx)
    .await?;
    if live.is_none() {
        return Ok(Enqueued::NoSession);
    }
    let existing: Option<(TurnId, Option<Vec<u8>>)> = sqlx::query_as(
        "select turn_id, request_hash from turns where session_id = $1 and idempotency_key = $2",
    )
    .bind(new.session_id)
    .bind(key)
    .fetch_optional(&mut *tx)
    .await?;
    let outcome = match existing {
        Some((_, hash)) if hash.as_deref() != Some(new.request_hash) => Enqueued::KeyReused,
        Some((turn_id, _)) => Enqueued::Replayed(
            get_any(&mut *tx, turn_id)
                .await?
                .ok_or_else(|| Error::Corrupt("turn vanished".into()))?,
        ),
        None => insert_turn(&mut tx, new).await?,
    };
    tx.commit().await?;
    Ok(outcome)
}

async fn insert_turn(conn: &mut PgConnection, new: &NewTurn<'_>) -> Result<Enqueued> {
    let turn_id = TurnId::new_random();
    let busy = serde_json::to_value(EventBody::SessionStatus {
        status: SessionStatus::Busy,
    })
    .map_err(|e| Error::Corrupt(e.to_string()))?;
    // `turn_seq` is filled in by the statement, which is the one to know it.
    let queued = serde_json::to_value(EventBody::TurnQueued {
        turn_seq: 0,
        prompt: new.prompt.to_owned(),
        message_id: new.message_id.map(str::to_owned),
        agent: new.agent.map(str::to_owned),
    })
    .map_err(|e| Error::Corrupt(e.to_string()))?;
    let job = queue::job_args(&queue::TurnJob {
        session_id: new.session_id,
        turn_id,
    })?;
    // The job row is what apalis's own push writes (see `queue::push_turn`): one attempt, the
    // turn id as idempotency key, a ULID from apalis's own generator; `run_at` defaults to
    // this transaction's start, so it is due at once by the database's own clock.
    let row = sqlx::query_as::<_, EnqueuedRow>(sqlx::AssertSqlSafe(format!(
        "with s as (
             select session_id, status from sessions
              where session_id = $1 and tenant_id = $2 and status <> 'deleted'
              for update
         ), u as (
             update sessions x
                set last_turn_seq = x.last_turn_seq + 1,
                    last_event_seq = x.last_event_seq + case when s.status = 'busy' then 1 else 2 end,
                    status = 'busy', updated_at = now(), last_active_at = now()
               from s
              where x.session_id = s.session_id
          returning x.last_turn_seq as turn_seq, x.last_event_seq as event_seq, s.status as old_status
         ), t as (
             insert into turns (turn_id, session_id, tenant_id, seq, prompt, idempotency_key, request_hash)
             select $3, $1, $2, u.turn_seq, $4, $5, $6 from u
             returning {COLUMNS}
         ), e as (
             insert into session_events (session_id, seq, turn_id, type, payload)
             select $1, u.event_seq - 1, null, 'session.status', $7::jsonb from u where u.old_status <> 'busy'
             union all
             select $1, u.event_seq, $3, 'turn.queued', jsonb_set($8::jsonb, '{{turn_seq}}', to_jsonb(u.turn_seq))
               from u
         ), o as (
             select (select l.worker_id from session_leases l join workers w using (worker_id)
                      where l.session_id = $1 and l.expires_at > now() and w.stopped_at is null
                        and not w.draining) as owner
         ), j as (
             insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, priority,
                                      idempotency_key)
             select apalis.generate_ulid(),
                    coalesce($10 || o.owner::text, $11), $9, 'Pending', 0, 1, 0, $3::text
               from t, o
         )
         select t.*, o.owner,
                -- A warm session's owner hears of the turn at once (NOTIFY at commit), not
                -- only when its queue consumer fetches the job.
                case when o.owner is not null
                     then (select 1 from pg_notify($12, $1::text || ':work')) end as woken
           from t, o"
    )))
    .bind(new.session_id)
    .bind(new.tenant_id)
    .bind(turn_id)
    .bind(new.prompt)
    .bind(new.idempotency_key)
    .bind(new.request_hash)
    .bind(busy)
    .bind(queued)
    .bind(job)
    .bind(queue::WORKER_QUEUE_PREFIX)
    .bind(queue::SHARED_QUEUE)
    .bind(crate::events::CONTROL_CHANNEL)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some(EnqueuedRow { turn, owner }) => Enqueued::New { turn, owner },
        None => Enqueued::NoSession,
    })
}

#[derive(sqlx::FromRow)]
struct EnqueuedRow {
    #[sqlx(flatten)]
    turn: TurnRow,
    owner: Option<WorkerId>,
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

/// What a turn left behind when its worker was lost: whether it produced output (text,
/// thinking, a tool call, a message), and how many times it was started.
pub async fn attempt_info(db: impl PgExecutor<'_>, turn: TurnId) -> Result<(bool, i64)> {
    let row: (bool, i64) = sqlx::query_as(
        "select coalesce(bool_or(type in ('text.delta', 'thinking.delta', 'tool.started',
                                          'message.completed')), false),
                count(*) filter (where type = 'turn.started')
           from session_events where turn_id = $1",
    )
    .bind(turn)
    .fetch_one(db)
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

/// Marks a turn running under the worker's lease and appends `events` (its `turn.started`),
/// in one statement. Fails with [`Error::Fenced`] when the lease was lost or the turn is no
/// longer pending (the session was deleted).
pub async fn start(
    conn: &mut PgConnection,
    turn: &TurnRow,
    fence: Fence,
    events: &[NewEvent],
) -> Result<i64> {
    let (turns, kinds, payloads) = events::columns(events);
    let last: Option<i64> = sqlx::query_scalar(
        "with t as (
             update turns set status = 'running', started_at = coalesce(started_at, now()),
                    worker_id = $3, lease_generation = $4
              where turn_id = $2 and status in ('queued', 'running')
                and exists (select 1 from session_leases l
                             where l.session_id = $1 and l.worker_id = $3 and l.generation = $4)
          returning turn_id
         ), u as (
             update sessions set last_event_seq = last_event_seq + $5, last_active_at = now()
              where session_id = $1 and exists (select 1 from t)
          returning last_event_seq
         ), i as (
             insert into session_events (session_id, seq, turn_id, type, payload)
             select $1, u.last_event_seq - $5 + x.ord, x.turn_id, x.type, x.payload
               from u, unnest($6::uuid[], $7::text[], $8::jsonb[])
                       with ordinality as x(turn_id, type, payload, ord)
         )
         select last_event_seq from u",
    )
    .bind(turn.session_id)
    .bind(turn.turn_id)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .bind(events.len() as i64)
    .bind(&turns)
    .bind(&kinds)
    .bind(&payloads)
    .fetch_optional(&mut *conn)
    .await?;
    last.ok_or(Error::Fenced)
}

/// Whether a [`start`] (`finished: false`) or [`finish`] (`true`) under `fence` already
/// took effect: a retry after the connection broke may find its earlier try committed.
/// Generations only grow, so a turn carrying this fence was written by this tenure. Returns
/// the seq of the turn's last event when it did.
pub async fn landed(
    db: impl PgExecutor<'_>,
    turn: TurnId,
    fence: Fence,
    finished: bool,
) -> Result<Option<i64>> {
    let seq: Option<Option<i64>> = sqlx::query_scalar(
        "select (select max(e.seq) from session_events e
                  where e.session_id = t.session_id and e.turn_id = t.turn_id)
           from turns t
          where t.turn_id = $1 and t.worker_id = $2 and t.lease_generation = $3
            and t.status <> 'queued' and (t.status = 'running') = not $4",
    )
    .bind(turn)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .bind(finished)
    .fetch_optional(db)
    .await?;
    Ok(seq.flatten())
}

/// New bytes of the agent's transcript, mirrored by [`finish`] in the same statement (see
/// `sessions::append_agent_state` for the table).
#[derive(Debug, Clone, Copy)]
pub struct Chunk<'a> {
    pub cli_session_id: uuid::Uuid,
    pub offset: i64,
    pub content: &'a [u8],
}

/// How a turn ended, for [`finish`].
#[derive(Debug, Clone)]
pub enum Outcome {
    Completed { result: String, usage: Usage },
    Failed { error: String, usage: Option<Usage> },
    Interrupted { usage: Option<Usage> },
}

/// Records the end of a turn under the worker's lease, in one statement: its status,
/// result and usage, the session's status, and `events` (the last deltas and the terminal
/// event) followed by `session.status: idle` when no other turn is pending. Returns whether
/// the session went idle; [`Error::Fenced`] when the lease was lost.
pub async fn finish(
    conn: &mut PgConnection,
    turn: &TurnRow,
    fence: Fence,
    outcome: &Outcome,
    events: &[NewEvent],
    mirror: Option<Chunk<'_>>,
) -> Result<bool> {
    let (status, result, error, usage) = match outcome {
        Outcome::Completed { result, usage } => {
            ("completed", Some(result.as_str()), None, Some(usage))
        }
        Outcome::Failed { error, usage } => ("failed", None, Some(error.as_str()), usage.as_ref()),
        Outcome::Interrupted { usage } => ("interrupted", None, None, usage.as_ref()),
    };
    let (turns, kinds, payloads) = events::columns(events);
    let idle_event = serde_json::to_value(EventBody::SessionStatus {
        status: SessionStatus::Idle,
    })
    .map_err(|e| Error::Corrupt(e.to_string()))?;
    let u = usage.cloned().unwrap_or_default();
    let idle: Option<bool> = sqlx::query_scalar(
        "with lease as (
             select 1 from session_leases l
              where l.session_id = $1 and l.worker_id = $3 and l.generation = $4
         ), t as (
             update turns set status = $5, result = $6, error = $7, completed_at = now()
              where turn_id = $2 and status in ('queued', 'running') and exists (select 1 from lease)
          returning turn_id, tenant_id
         ), usage as (
             insert into turn_usage (turn_id, session_id, tenant_id, model, input_tokens, output_tokens,
                                     cache_read_tokens, cache_write_tokens, cost_usd, duration_ms)
             select t.turn_id, $1, t.tenant_id, $9, $10, $11, $12, $13, $14, $15 from t where $8
             on conflict (turn_id) do nothing
         ), pending as (
             select exists (select 1 from turns where session_id = $1 and turn_id <> $2
                              and status in ('queued', 'running')) as busy
         ), s as (
             update sessions x
                set status = case when x.status = 'deleted' then 'deleted'
                                  when pending.busy then 'busy' else 'idle' end,
                    last_event_seq = x.last_event_seq + $16
                                     + case when x.status <> 'deleted' and not pending.busy then 1 else 0 end,
                    updated_at = now(), last_active_at = now()
               from pending
              where x.session_id = $1 and exists (select 1 from t)
          returning x.last_event_seq, x.status = 'idle' as idle
         ), evs as (
             select e.turn_id, e.type, e.payload, e.ord
               from unnest($17::uuid[], $18::text[], $19::jsonb[])
                    with ordinality as e(turn_id, type, payload, ord)
             union all
             select null, 'session.status', $20::jsonb, $16 + 1 from s where s.idle
         ), i as (
             insert into session_events (session_id, seq, turn_id, type, payload)
             select $1, s.last_event_seq - ($16 + case when s.idle then 1 else 0 end) + evs.ord,
                    evs.turn_id, evs.type, evs.payload
               from s, evs
         ), m as (
             insert into agent_state_chunks (session_id, cli_session_id, byte_offset, content)
             select $1, $21, $22, $23 from t where $23::bytea is not null
             on conflict do nothing
         )
         select idle from s",
    )
    .bind(turn.session_id)
    .bind(turn.turn_id)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .bind(status)
    .bind(result)
    .bind(error)
    .bind(usage.is_some())
    .bind(&u.model)
    .bind(u.input_tokens)
    .bind(u.output_tokens)
    .bind(u.cache_read_tokens)
    .bind(u.cache_write_tokens)
    .bind(u.cost_usd)
    .bind(u.duration_ms)
    .bind(events.len() as i64)
    .bind(&turns)
    .bind(&kinds)
    .bind(&payloads)
    .bind(idle_event)
    .bind(mirror.map(|c| c.cli_session_id))
    .bind(mirror.map(|c| c.offset))
    .bind(mirror.map(|c| c.content))
    .fetch_optional(&mut *conn)
    .await?;
    idle.ok_or(Error::Fenced)
}
