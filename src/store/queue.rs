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

/// Prefix of a worker's own queue; the rest is the worker id.
pub const WORKER_QUEUE_PREFIX: &str = "hotplex.worker.";

/// A worker's own queue.
pub fn worker_queue(worker: WorkerId) -> String {
    format!("{WORKER_QUEUE_PREFIX}{worker}")
}

/// The job's bytes as apalis's JSON codec reads them.
pub fn job_args(job: &TurnJob) -> Result<Vec<u8>> {
    serde_json::to_vec(job).map_err(|e| Error::Corrupt(e.to_string()))
}

/// The job's arguments: which turn of which session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TurnJob {
    pub session_id: SessionId,
    pub turn_id: TurnId,
}

/// When a pushed job is due. A turn's first job is written by `turns::enqueue`'s own
/// statement, with the turn id as idempotency key (unique per queue); the jobs pushed here
/// (forwarded to the owner, handed back by a stopping worker, retried by a full one) carry
/// none, since a duplicate job only wakes the session's actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// At once.
    Again,
    /// Again, but not before this long (the worker was full).
    Later(std::time::Duration),
}

/// Pushes a job for a turn inside the caller's transaction.
pub async fn push_turn(
    conn: &mut PgConnection,
    owner: Option<WorkerId>,
    job: TurnJob,
    push: Push,
) -> Result<()> {
    let queue = owner
        .map(worker_queue)
        .unwrap_or_else(|| SHARED_QUEUE.to_owned());
    let args = job_args(&job)?;
    // Workers only fetch jobs with `run_at < now()` and the insert trigger only wakes them
    // when `run_at <= now()`, by the database's clock. A job pushed again belongs to a turn
    // accepted earlier, so the epoch (due at once, first in `run_at` order) is right whatever
    // the clocks say; a delay uses this host's clock, which skew at worst shifts a little.
    let run_at = match push {
        Push::Later(d) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |now| {
                (now + d.max(std::time::Duration::from_secs(1))).as_secs()
            }),
        Push::Again => 0,
    };
    // Agent turns are not idempotent: apalis never retries one by itself (the worker also
    // claims the turn row, since apalis re-enqueues orphans whatever `max_attempts` says).
    let task = TaskBuilder::new(args)
        .max_attempts(1)
        .run_at_timestamp(run_at)
        .build();
    apalis_postgres::queries::push_tasks(conn, &queue, vec![task])
        .await
        .map_err(|e| Error::Queue(e.to_string()))
}

/// Pushes a fresh job (shared queue) for every turn a lost worker was running, so that a
/// live worker claims the session and settles the turn (see the session actor's recovery).
/// The lost worker's own job for it may be spent (apalis counts the attempt).
pub async fn requeue_running(conn: &mut PgConnection, worker: WorkerId) -> Result<u64> {
    let jobs: Vec<(SessionId, TurnId)> = sqlx::query_as(
        "select session_id, turn_id from turns where worker_id = $1 and status = 'running'",
    )
    .bind(worker)
    .fetch_all(&mut *conn)
    .await?;
    for (session_id, turn_id) in &jobs {
        let job = TurnJob {
            session_id: *session_id,
            turn_id: *turn_id,
        };
        push_turn(conn, None, job, Push::Again).await?;
    }
    Ok(jobs.len() as u64)
}

/// The apalis worker names of a hotplex worker, one per queue it consumes.
pub fn consumer_names(worker: WorkerId) -> [String; 2] {
    [format!("{worker}-own"), format!("{worker}-shared")]
}

/// Hands a stopped worker's jobs back to the shared queue: everything still waiting on its
/// own queue, and whatever its consumers had fetched but not finished. apalis only rescues
/// a dead consumer's jobs for live consumers of the same queue, which a worker's own queue
/// never has. Returns how many jobs moved.
pub async fn hand_back(db: impl sqlx::PgExecutor<'_>, worker: WorkerId) -> Result<u64> {
    let names = consumer_names(worker);
    let moved = sqlx::query(
        "update apalis.jobs
            set job_type = $2, status = 'Pending', lock_by = null, lock_at = null, done_at = null
          where (job_type = $1 and status in ('Pending', 'Queued', 'Running'))
             or (lock_by = any($3) and status in ('Queued', 'Running'))",
    )
    .bind(worker_queue(worker))
    .bind(SHARED_QUEUE)
    .bind(&names[..])
    .execute(db)
    .await?
    .rows_affected();
    Ok(moved)
}

/// Puts back on their queue the jobs an apalis consumer had fetched but not finished when
/// it ended without its worker stopping (its connection broke); the consumer starting
/// again under the same name fetches them anew. Returns how many.
pub async fn release_consumer(db: impl sqlx::PgExecutor<'_>, name: &str) -> Result<u64> {
    let n = sqlx::query(
        "update apalis.jobs set status = 'Pending', lock_by = null, lock_at = null
          where lock_by = $1 and status in ('Queued', 'Running')",
    )
    .bind(name)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n)
}

/// Deletes up to `batch` finished jobs (done, failed, killed) that finished more than
/// `retention` ago; returns how many. apalis never deletes a job, and every turn leaves at
/// least one: the queue table would grow forever. The turns and their events are the
/// record; a finished job is only a spent wake-up.
pub async fn prune_finished(
    db: impl sqlx::PgExecutor<'_>,
    retention: std::time::Duration,
    batch: i64,
) -> Result<u64> {
    let n = sqlx::query(
        "delete from apalis.jobs where id in (
             select id from apalis.jobs
              where status in ('Done', 'Failed', 'Killed')
                and done_at < now() - make_interval(secs => $1)
              limit $2
              for update skip locked)",
    )
    .bind(retention.as_secs_f64())
    .bind(batch)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n)
}
