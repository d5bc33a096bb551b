//! Session leases: which worker owns a session, under which generation, until when. A
//! claim bumps the generation; writes carry it (see [`super::events::Fence`]).

use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use super::Result;
use super::events::Fence;
use crate::domain::{SessionId, WorkerId};

fn interval(ttl: Duration) -> f64 {
    ttl.as_secs_f64()
}

/// Claims the session for `worker` when it is free (released, expired, or held by a
/// stopped worker) or already ours. Returns the fence to write under, or `None` when another
/// live worker holds it.
///
/// Generations only grow: a claim of a released or expired lease bumps it, even by the same
/// worker, so a fence never names two tenures. An expired lease is only free once the
/// database has been up for a whole TTL: after a database restart every live worker was
/// silent through no fault of its own and gets a TTL to renew before its sessions are taken.
pub async fn claim(
    db: impl PgExecutor<'_>,
    session: SessionId,
    worker: WorkerId,
    ttl: Duration,
) -> Result<Option<Fence>> {
    let generation: Option<i64> = sqlx::query_scalar(
        "insert into session_leases (session_id, worker_id, generation, expires_at)
         values ($1, $2, 1, now() + make_interval(secs => $3))
         on conflict (session_id) do update
            set generation = case when session_leases.worker_id = excluded.worker_id
                                       and session_leases.expires_at > now()
                                  then session_leases.generation else session_leases.generation + 1 end,
                worker_id = excluded.worker_id,
                acquired_at = case when session_leases.worker_id = excluded.worker_id
                                        and session_leases.expires_at > now()
                                   then session_leases.acquired_at else now() end,
                expires_at = excluded.expires_at,
                pid = case when session_leases.worker_id = excluded.worker_id
                                and session_leases.expires_at > now() then session_leases.pid end,
                process_started_at = case when session_leases.worker_id = excluded.worker_id
                                               and session_leases.expires_at > now()
                                          then session_leases.process_started_at end
          where session_leases.worker_id = excluded.worker_id
             or session_leases.expires_at = '-infinity'
             or (session_leases.expires_at <= now()
                 and pg_postmaster_start_time() <= now() - make_interval(secs => $3))
             or exists (select 1 from workers w
                         where w.worker_id = session_leases.worker_id and w.stopped_at is not null)
         returning generation",
    )
    .bind(session)
    .bind(worker)
    .bind(interval(ttl))
    .fetch_optional(db)
    .await?;
    Ok(generation.map(|generation| Fence {
        worker_id: worker,
        generation,
    }))
}

/// Extends the lease; `false` when it was lost.
pub async fn renew(
    db: impl PgExecutor<'_>,
    session: SessionId,
    fence: Fence,
    ttl: Duration,
) -> Result<bool> {
    let n = sqlx::query(
        "update session_leases set expires_at = now() + make_interval(secs => $4)
          where session_id = $1 and worker_id = $2 and generation = $3",
    )
    .bind(session)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .bind(interval(ttl))
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// Extends every lease a worker holds at once (the heartbeat); returns how many.
pub async fn renew_all(db: impl PgExecutor<'_>, worker: WorkerId, ttl: Duration) -> Result<u64> {
    let n = sqlx::query(
        "update session_leases set expires_at = now() + make_interval(secs => $2)
          where worker_id = $1 and expires_at <> '-infinity'",
    )
    .bind(worker)
    .bind(interval(ttl))
    .execute(db)
    .await?
    .rows_affected();
    Ok(n)
}

/// Gives the session up (clean stop, idle reaping, delete): free to claim at once. The row
/// stays, so the next claim continues its generations.
pub async fn release(db: impl PgExecutor<'_>, session: SessionId, fence: Fence) -> Result<()> {
    sqlx::query(
        "update session_leases set expires_at = '-infinity', pid = null, process_started_at = null
          where session_id = $1 and worker_id = $2 and generation = $3",
    )
    .bind(session)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .execute(db)
    .await?;
    Ok(())
}

/// Records (or clears, with `None`) the warm process of a session.
pub async fn set_process(
    db: impl PgExecutor<'_>,
    session: SessionId,
    fence: Fence,
    pid: Option<u32>,
) -> Result<()> {
    sqlx::query(
        "update session_leases
            set pid = $4, process_started_at = case when $4::integer is null then null else now() end
          where session_id = $1 and worker_id = $2 and generation = $3",
    )
    .bind(session)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .bind(pid.map(|p| p as i32))
    .execute(db)
    .await?;
    Ok(())
}

/// The warm process of a session, if a live lease records one.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ProcessRow {
    pub worker_id: WorkerId,
    pub pid: i32,
    pub process_started_at: DateTime<Utc>,
}

pub async fn process(db: impl PgExecutor<'_>, session: SessionId) -> Result<Option<ProcessRow>> {
    let row = sqlx::query_as::<_, ProcessRow>(
        "select worker_id, pid, process_started_at from session_leases
          where session_id = $1 and expires_at > now() and pid is not null and process_started_at is not null",
    )
    .bind(session)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// The live owner of a session, if any.
pub async fn owner(db: impl PgExecutor<'_>, session: SessionId) -> Result<Option<WorkerId>> {
    let w = sqlx::query_scalar(
        "select l.worker_id from session_leases l join workers w using (worker_id)
          where l.session_id = $1 and l.expires_at > now() and w.stopped_at is null",
    )
    .bind(session)
    .fetch_optional(db)
    .await?;
    Ok(w)
}
