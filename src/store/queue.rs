//! The durable job queue (apalis-postgres, schema `apalis`): every turn is a job, pushed in
//! the same transaction as the turn row, so a prompt is queued exactly when it is accepted.
//! A session with a live owner gets its jobs on that worker's own queue; any other goes to
//! the shared queue, where any worker with room claims the session.

use apalis::prelude::TaskBuilder;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;

use super::{Error, Result};
use crate::domain::{SessionId, TurnId, WorkerId};

/// Queue of sessions that no live worker owns.
pub const SHARED_QUEUE: &str = "hotplex.turns";

/// A worker's own queue.
pub fn worker_queue(worker: WorkerId) -> String {
    format!("hotplex.worker.{worker}")
}

/// The job's arguments: which turn of which session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnJob {
    pub session_id: SessionId,
    pub turn_id: TurnId,
}

/// Pushes the job for a turn inside the caller's transaction.
pub async fn push_turn(
    conn: &mut PgConnection,
    owner: Option<WorkerId>,
    job: TurnJob,
) -> Result<()> {
    let queue = owner
        .map(worker_queue)
        .unwrap_or_else(|| SHARED_QUEUE.to_owned());
    let args = serde_json::to_vec(&job).map_err(|e| Error::Corrupt(e.to_string()))?;
    // The insert trigger only wakes workers when `run_at <= now()` of this transaction;
    // apalis's default `run_at` is the client clock, so take the database's.
    let now: i64 = sqlx::query_scalar("select floor(extract(epoch from now()))::bigint")
        .fetch_one(&mut *conn)
        .await?;
    // Agent turns are not idempotent: apalis never retries one by itself (the worker also
    // claims the turn row, since apalis re-enqueues orphans whatever `max_attempts` says).
    let task = TaskBuilder::new(args)
        .max_attempts(1)
        .idempotency_key(job.turn_id.to_string())
        .run_at_timestamp(now.max(0) as u64)
        .build();
    apalis_postgres::queries::push_tasks(conn, &queue, vec![task])
        .await
        .map_err(|e| Error::Queue(e.to_string()))
}
