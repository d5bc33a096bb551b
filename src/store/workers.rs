//! The worker registry: one row per worker process, with heartbeats.

use sqlx::PgExecutor;

use super::Result;
use crate::domain::WorkerId;

/// Registers a starting worker.
pub async fn register(
    db: impl PgExecutor<'_>,
    id: WorkerId,
    host: &str,
    pid: u32,
    capacity: u32,
    pid_ns: Option<&str>,
) -> Result<()> {
    sqlx::query(
        "insert into workers (worker_id, host, pid, version, capacity, pid_ns)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(host)
    .bind(pid as i32)
    .bind(env!("CARGO_PKG_VERSION"))
    .bind(capacity as i32)
    .bind(pid_ns)
    .execute(db)
    .await?;
    Ok(())
}

/// Live workers (other than `me`) whose processes this one can see: same host, same PID
/// namespace `pid_ns`. With their OS pids.
pub async fn visible(
    db: impl PgExecutor<'_>,
    me: WorkerId,
    host: &str,
    pid_ns: &str,
) -> Result<Vec<(WorkerId, i32)>> {
    let rows = sqlx::query_as(
        "select worker_id, pid from workers
          where stopped_at is null and worker_id <> $1 and host = $2 and pid_ns = $3
            and pid is not null",
    )
    .bind(me)
    .bind(host)
    .bind(pid_ns)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// Marks stopped the given workers that are not already, known dead (their process is
/// gone); returns those it marked, with their hosts (see [`reap_dead`]).
pub async fn declare_dead(
    db: impl PgExecutor<'_>,
    ids: &[WorkerId],
) -> Result<Vec<(WorkerId, String)>> {
    let rows = sqlx::query_as(
        "update workers set stopped_at = now()
          where worker_id = any($1) and stopped_at is null
          returning worker_id, host",
    )
    .bind(ids)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// What a heartbeat learned about the worker itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Standing {
    Live,
    /// Asked to drain (by `hotplex worker drain` or the admin API).
    Draining,
    /// Declared lost while it was silent: another worker took its work over; it must stop.
    Lost,
}

/// Records that the worker is alive, and tells it where it stands.
pub async fn heartbeat(db: impl PgExecutor<'_>, id: WorkerId) -> Result<Standing> {
    let draining: Option<bool> = sqlx::query_scalar(
        "update workers set heartbeat_at = now() where worker_id = $1 and stopped_at is null
         returning draining",
    )
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(match draining {
        None => Standing::Lost,
        Some(true) => Standing::Draining,
        Some(false) => Standing::Live,
    })
}

/// Asks a live worker to drain (and wakes it through `session_control`); `false` when no
/// live worker has that id.
pub async fn drain(db: impl PgExecutor<'_>, id: WorkerId) -> Result<bool> {
    let found: Option<i32> = sqlx::query_scalar(
        "with w as (
             update workers set draining = true where worker_id = $1 and stopped_at is null
          returning worker_id
         )
         select 1 from w, pg_notify($2, 'worker:' || $1::text || ':drain')",
    )
    .bind(id)
    .bind(crate::events::CONTROL_CHANNEL)
    .fetch_optional(db)
    .await?;
    Ok(found.is_some())
}

/// A worker as the admin API and `hotplex worker list` show it.
#[derive(Debug, Clone, sqlx::FromRow, serde::Serialize, utoipa::ToSchema)]
pub struct WorkerRow {
    pub worker_id: WorkerId,
    pub host: String,
    pub pid: Option<i32>,
    pub version: Option<String>,
    pub capacity: i32,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub heartbeat_at: chrono::DateTime<chrono::Utc>,
    pub draining: bool,
    pub stopped_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Sessions it holds a live lease on.
    pub sessions: i64,
}

/// Live workers (and, with `all`, stopped ones too), newest first.
pub async fn list(db: impl PgExecutor<'_>, all: bool) -> Result<Vec<WorkerRow>> {
    let rows = sqlx::query_as::<_, WorkerRow>(
        "select w.worker_id, w.host, w.pid, w.version, w.capacity, w.started_at, w.heartbeat_at,
                w.draining, w.stopped_at,
                (select count(*) from session_leases l
                  where l.worker_id = w.worker_id and l.expires_at > now()) as sessions
           from workers w
          where $1 or w.stopped_at is null
          order by w.started_at desc
          limit 1000",
    )
    .bind(all)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// Marks the worker gone; its leases become free at once.
pub async fn stopped(db: impl PgExecutor<'_>, id: WorkerId) -> Result<()> {
    sqlx::query("update workers set stopped_at = now() where worker_id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// Marks stopped every worker whose heartbeat is older than `silent_for` (it died without
/// stopping: `kill -9`, a crashed host) and returns them. One statement: when several live
/// workers sweep at once, each dead worker is returned to exactly one of them. Nobody is
/// reaped until the database has been up for `silent_for`: a database restart silences
/// every worker, and the live ones need a heartbeat's time to speak again.
pub async fn reap_dead(
    db: impl PgExecutor<'_>,
    silent_for: std::time::Duration,
) -> Result<Vec<(WorkerId, String)>> {
    let rows = sqlx::query_as(
        "update workers set stopped_at = now()
          where stopped_at is null and heartbeat_at < now() - make_interval(secs => $1)
            and pg_postmaster_start_time() < now() - make_interval(secs => $1)
          returning worker_id, host",
    )
    .bind(silent_for.as_secs_f64())
    .fetch_all(db)
    .await?;
    Ok(rows)
}
