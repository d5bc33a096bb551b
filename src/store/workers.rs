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

pub async fn heartbeat(db: impl PgExecutor<'_>, id: WorkerId) -> Result<()> {
    sqlx::query("update workers set heartbeat_at = now() where worker_id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}

/// Marks the worker gone; its leases become free at once.
pub async fn stopped(db: impl PgExecutor<'_>, id: WorkerId) -> Result<()> {
    sqlx::query("update workers set stopped_at = now() where worker_id = $1")
        .bind(id)
        .execute(db)
        .await?;
    Ok(())
}
