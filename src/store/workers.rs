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
) -> Result<()> {
    sqlx::query(
        "insert into workers (worker_id, host, pid, version, capacity) values ($1, $2, $3, $4, $5)",
    )
    .bind(id)
    .bind(host)
    .bind(pid as i32)
    .bind(env!("CARGO_PKG_VERSION"))
    .bind(capacity as i32)
    .execute(db)
    .await?;
    Ok(())
}

/// Records that the worker is alive; `false` when it was already declared lost (another
/// worker took its work over while it was silent), in which case it must stop.
pub async fn heartbeat(db: impl PgExecutor<'_>, id: WorkerId) -> Result<bool> {
    let n = sqlx::query(
        "update workers set heartbeat_at = now() where worker_id = $1 and stopped_at is null",
    )
    .bind(id)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
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
/// workers sweep at once, each dead worker is returned to exactly one of them.
pub async fn reap_dead(
    db: impl PgExecutor<'_>,
    silent_for: std::time::Duration,
) -> Result<Vec<(WorkerId, String)>> {
    let rows = sqlx::query_as(
        "update workers set stopped_at = now()
          where stopped_at is null and heartbeat_at < now() - make_interval(secs => $1)
          returning worker_id, host",
    )
    .bind(silent_for.as_secs_f64())
    .fetch_all(db)
    .await?;
    Ok(rows)
}
