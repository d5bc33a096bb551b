//! The worker: registers itself, claims sessions through leases, keeps their agent processes
//! warm (one actor per session, see [`session`]), and consumes turn jobs from its own queue
//! and the shared one (apalis-postgres; see `docs/apalis.md` for the settings and why).

pub mod retry;
pub mod session;
pub mod spares;
pub mod writer;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use apalis::prelude::*;
use apalis_postgres::{Config, PostgresStorage, Pubsub};
use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Shutdown;
use crate::config::Settings;
use crate::domain::{SessionId, WorkerId};
use crate::events::CONTROL_CHANNEL;
use crate::store::queue::{self, SHARED_QUEUE, TurnJob};
use crate::store::{self, leases, turns};
use session::{Activity, Actor, Command};

/// Rows an apalis worker claims per fetch; in-flight jobs stay below 4× this (see docs).
const BATCH: usize = 64;
/// The fallback poll of each queue, for wake-ups that were still lost.
const POLL: Duration = Duration::from_secs(1);
/// How often a worker prunes finished jobs, and how much at most per round.
const PRUNE_EVERY: Duration = Duration::from_secs(600);
const PRUNE_BATCH: i64 = 1000;
const PRUNE_BATCHES: usize = 20;
/// Connections of each queue consumer's own pool (fetching and settling jobs; the turns
/// themselves use the worker's pool).
const CONSUMER_CONNECTIONS: u32 = 4;

/// A running worker.
pub struct Worker {
    pub id: WorkerId,
    pool: PgPool,
    settings: Arc<Settings>,
    actors: Mutex<HashMap<SessionId, ActorHandle>>,
    /// The worker's own tasks (consumers, actors, agent I/O), so stopping can wait for them
    /// before handing the unfinished jobs back.
    tasks: TaskTracker,
    token: CancellationToken,
    stopped: CancellationToken,
    /// The worker's `opencode serve`, shared by its OpenCode sessions (started on use).
    opencode: Arc<crate::provider::opencode::OpenCodeHost>,
    /// Claude Code processes started ahead of need (`worker.warm_spares`).
    spares: Option<Arc<spares::Spares>>,
    draining: std::sync::atomic::AtomicBool,
}

/// This host's name, as workers record it (to find a lost worker's processes on its host).
pub fn hostname() -> String {
    std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

/// The worker's side of a session actor.
struct ActorHandle {
    tx: mpsc::Sender<Command>,
    activity: Arc<Activity>,
    /// Asked to stop to make room; its session is not handed to it again.
    evicting: bool,
}

/// What [`Worker::actor_for`] found.
enum Claim {
    Actor(mpsc::Sender<Command>),
    /// Another live worker holds the session (or this one is stopping).
    Elsewhere,
    /// Every warm slot runs a turn.
    Full,
    /// This worker is draining: it takes no new session.
    Draining,
}

/// How long a job waits before another try when every worker slot was busy.
const FULL_RETRY: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker").field("id", &self.id).finish()
    }
}

impl Worker {
    /// Registers the worker and starts its tasks under `shutdown`. When `shutdown` is
    /// cancelled the worker stops claiming jobs, ends running turns (interrupted, then
    /// `failed` with the reason), stops its agents, hands its queued jobs back to the shared
    /// queue and marks itself stopped; [`Worker::stopped`] resolves then.
    pub async fn start(
        pool: PgPool,
        settings: Arc<Settings>,
        shutdown: &Shutdown,
    ) -> store::Result<Arc<Self>> {
        let id = WorkerId::new_random();
        let host = hostname();
        store::workers::register(
            &pool,
            id,
            &host,
            std::process::id(),
            settings.worker.capacity,
            crate::provider::process::pid_namespace().as_deref(),
        )
        .await?;
        let tasks = TaskTracker::new();
        let token = shutdown.token.child_token();
        let spare_count = settings.worker.warm_spares as usize;
        let opencode = Arc::new(crate::provider::opencode::OpenCodeHost::new(
            tasks.clone(),
            token.clone(),
        ));
        let worker = Arc::new(Self {
            id,
            pool: pool.clone(),
            settings,
            actors: Mutex::new(HashMap::new()),
            tasks,
            token: token.clone(),
            stopped: CancellationToken::new(),
            opencode,
            spares: (spare_count > 0).then(|| spares::Spares::new(spare_count)),
            draining: std::sync::atomic::AtomicBool::new(false),
        });
        if let Some(pool_of_spares) = worker.spares.clone() {
            let settings = worker.settings.clone();
            let spec = move |cwd, conversation| {
                session::claude_spec(
                    &settings,
                    id,
                    (None, &store::sessions::SessionOptions::default()),
                    cwd,
                    conversation,
                    false,
                )
            };
            worker.tasks.spawn(pool_of_spares.keep(
                worker.settings.work_root(),
                spec,
                worker.tasks.clone(),
                worker.token.clone(),
                worker.settings.worker.stop_grace,
            ));
        }
        shutdown.tracker.spawn(worker.clone().supervise());
        // Orphans of a previous incarnation (same host, process gone) go before any work.
        if let Err(e) = worker.reap_lost_workers().await {
            tracing::warn!(error = %e, "sweeping lost workers failed");
        }
        worker.tasks.spawn(worker.clone().heartbeat());
        worker.tasks.spawn(crate::events::listener::run(
            pool.clone(),
            vec![CONTROL_CHANNEL],
            Control(worker.clone()),
            worker.token.clone(),
        ));
        let [own, shared] = queue::consumer_names(id);
        for (queue, name) in [
            (queue::worker_queue(id), own),
            (SHARED_QUEUE.to_owned(), shared),
        ] {
            worker.tasks.spawn(worker.clone().consume(queue, name));
        }
        tracing::info!(worker.id = %id, "worker started");
        Ok(worker)
    }

    /// Consumes one queue until the worker stops. apalis ends a consumer whose database
    /// connection broke (a PostgreSQL restart): it is started again, with backoff, and the
    /// jobs the dead one had fetched go back to the queue (a job fetched twice only wakes
    /// the session's actor, which runs each turn once).
    async fn consume(self: Arc<Self>, queue: String, name: String) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let config = Config::default()
                .queue(queue.as_str())
                .batch_size(BATCH)
                .lock_tasks(false);
            // apalis gets a pool of its own, new for each incarnation of the consumer: its
            // futures are dropped mid-statement when a consumer stops, and a `BEGIN` dropped
            // in flight leaves its connection inside a transaction (sqlx 0.9.0; see
            // `store::begin`). That connection must never reach the API or the actors.
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(CONSUMER_CONNECTIONS)
                .acquire_timeout(self.settings.database.acquire_timeout)
                .connect_lazy_with((*self.pool.connect_options()).clone());
            // LISTEN wake-ups plus a 1 s poll for the rare one apalis loses. Shorter polls and
            // repeated wake-ups were measured and lose more (docs/apalis.md).
            let backend = PostgresStorage::<TurnJob>::new(&pool)
                .with_config(config)
                .poll_with_strategy(
                    Strategy::new()
                        .stream(Pubsub::new(pool.clone(), queue.clone()))
                        .interval(POLL),
                );
            let apalis_worker = WorkerBuilder::new(name.as_str())
                .backend(backend)
                .concurrency(4 * BATCH)
                .data(self.clone())
                .build(handle_job);
            let token = self.token.clone();
            let stop = async move {
                token.cancelled().await;
                Ok::<(), WorkerError>(())
            };
            let started = tokio::time::Instant::now();
            let result = apalis_worker.run_until(stop).await;
            if self.token.is_cancelled() {
                if let Err(e) = result {
                    tracing::error!(error = %e, "job consumer stopped");
                }
                return;
            }
            if started.elapsed() > Duration::from_secs(60) {
                backoff = Duration::from_millis(500);
            }
            match result {
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, retry_in_ms = backoff.as_millis() as u64, "job consumer stopped; starting it again")
                }
                Ok(()) => {
                    tracing::warn!(queue = %queue, retry_in_ms = backoff.as_millis() as u64, "job consumer ended; starting it again")
                }
            }
            tokio::select! {
                () = self.token.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
            match retry::until_available(&self.token, "releasing a stopped consumer's jobs", |_| {
                queue::release_consumer(&self.pool, &name)
            })
            .await
            {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(queue = %queue, jobs = n, "the stopped consumer's jobs are queued again")
                }
                Err(e) => {
                    tracing::warn!(queue = %queue, error = %e, "releasing the stopped consumer's jobs failed")
                }
            }
        }
    }

    async fn heartbeat(self: Arc<Self>) {
        let period = self.settings.worker.lease_ttl / 3;
        // Pruning the queue is every worker's chore, now and then (at start, then about
        // every ten minutes): any one of them doing it is enough.
        let mut prune_at = tokio::time::Instant::now();
        loop {
            tokio::select! {
                () = self.token.cancelled() => break,
                () = tokio::time::sleep(period) => {}
            }
            match store::workers::heartbeat(&self.pool, self.id).await {
                Ok(store::workers::Standing::Lost) => {
                    // Silent for too long (paused, cut off): the fleet already moved this
                    // worker's work elsewhere, and its fenced writes fail. Stop, do not linger.
                    tracing::error!(worker.id = %self.id, "this worker was declared lost while silent; stopping");
                    self.token.cancel();
                    break;
                }
                // Asked to drain, and the NOTIFY was missed.
                Ok(store::workers::Standing::Draining) => self.drain(),
                _ => {}
            }
            let _ = leases::renew_all(&self.pool, self.id, self.settings.worker.lease_ttl).await;
            if let Err(e) = self.reap_lost_workers().await {
                tracing::warn!(error = %e, "sweeping lost workers failed");
            }
            if tokio::time::Instant::now() >= prune_at {
                prune_at = tokio::time::Instant::now() + PRUNE_EVERY;
                self.prune_queue().await;
            }
        }
    }

    /// Deletes finished jobs older than `worker.job_retention`, a bounded amount per round.
    async fn prune_queue(&self) {
        let retention = self.settings.worker.job_retention;
        let mut pruned = 0;
        for _ in 0..PRUNE_BATCHES {
            match queue::prune_finished(&self.pool, retention, PRUNE_BATCH).await {
                Ok(n) => {
                    pruned += n;
                    if n < PRUNE_BATCH as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "pruning finished jobs failed");
                    break;
                }
            }
        }
        if pruned > 0 {
            tracing::info!(jobs = pruned, "pruned finished jobs");
        }
    }

    /// Settles workers that died without stopping: those whose process is gone from this
    /// host (at once: a worker restarted by its supervisor cleans up after its previous
    /// incarnation as it starts), and any silent for a lease TTL. Their queued jobs go to
    /// the shared queue, each turn they were running gets a fresh job (the session's next
    /// owner fails it or runs it again, see `session::Actor`), and their agent processes
    /// on this host are killed.
    async fn reap_lost_workers(&self) -> Result<(), store::Error> {
        let host = hostname();
        // A reused pid reads as alive: that worker is left to the TTL sweep below.
        let visible = match crate::provider::process::pid_namespace() {
            Some(ns) => store::workers::visible(&self.pool, self.id, &host, &ns).await?,
            None => Vec::new(),
        };
        let gone: Vec<WorkerId> = visible
            .into_iter()
            .filter(|(_, pid)| !crate::provider::process::process_alive(*pid))
            .map(|(id, _)| id)
            .collect();
        let mut dead = if gone.is_empty() {
            Vec::new()
        } else {
            store::workers::declare_dead(&self.pool, &gone).await?
        };
        // Silent for a whole lease TTL: its leases have expired too.
        let silent = self.settings.worker.lease_ttl;
        dead.extend(store::workers::reap_dead(&self.pool, silent).await?);
        for (worker, worker_host) in dead {
            let mut tx = store::begin(&self.pool).await?;
            let moved = queue::hand_back(&mut *tx, worker).await?;
            let running = queue::requeue_running(&mut tx, worker).await?;
            tx.commit().await?;
            let killed = if worker_host == host {
                crate::provider::process::kill_owned_by(&worker.to_string())
            } else {
                0
            };
            tracing::warn!(lost.worker = %worker, jobs = moved, running, killed, "a worker was lost; its work moves on");
        }
        Ok(())
    }

    /// Waits for the stop, then for every task of the worker; hands back what is left.
    async fn supervise(self: Arc<Self>) {
        self.token.cancelled().await;
        self.tasks.close();
        // Actors end within two `stop_grace`s (interrupt, then kill); a queue consumer of
        // apalis has been seen to hang in its own stop (docs/apalis.md): the hand-back must
        // not wait for it forever, or the jobs would wait for another worker's sweep.
        let bound = 2 * self.settings.worker.stop_grace + Duration::from_secs(5);
        if tokio::time::timeout(bound, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(worker.id = %self.id, "some worker tasks did not finish in time; handing the jobs back anyway");
        }
        match queue::hand_back(&self.pool, self.id).await {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(worker.id = %self.id, jobs = n, "handed jobs back to the shared queue")
            }
            Err(e) => tracing::warn!(worker.id = %self.id, error = %e, "handing jobs back failed"),
        }
        // Marked stopped, the worker's remaining leases are free to claim at once.
        let _ = store::workers::stopped(&self.pool, self.id).await;
        tracing::info!(worker.id = %self.id, "worker stopped");
        self.stopped.cancel();
    }

    /// Drains the worker: it takes no new session (jobs for one go back to the queue for
    /// the others; new prompts of its sessions go to the shared queue), lets every running
    /// turn finish, gives each session
    /// up after its running turn (the transcript is mirrored after every turn), then stops:
    /// the jobs still queued for it go back to the shared queue. Idempotent.
    pub fn drain(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.draining.swap(true, Ordering::AcqRel) || self.token.is_cancelled() {
            return;
        }
        // The queue consumers keep running until the end: apalis cannot settle jobs in
        // flight once its consumer has stopped (they would hang the worker's stop).
        tracing::info!(worker.id = %self.id, "draining");
        let me = self.clone();
        self.tasks.spawn(async move {
            let evict_all = async {
                loop {
                    let open: Vec<(SessionId, mpsc::Sender<Command>)> = {
                        let mut actors = me.actors.lock().unwrap_or_else(PoisonError::into_inner);
                        actors.retain(|_, h| !h.tx.is_closed());
                        actors
                            .iter_mut()
                            .map(|(id, h)| {
                                h.evicting = true;
                                (*id, h.tx.clone())
                            })
                            .collect()
                    };
                    if open.is_empty() {
                        break;
                    }
                    for (session, tx) in open {
                        // An actor stops after its running turn; a closed channel: gone.
                        tracing::info!(session.id = %session, "draining: giving the session up after its running turn");
                        let _ = tx.send(Command::Evict).await;
                        tx.closed().await;
                    }
                }
            };
            tokio::select! {
                () = evict_all => tracing::info!(worker.id = %me.id, "drained: every session was given up"),
                () = tokio::time::sleep(me.settings.worker.drain_timeout) => {
                    tracing::warn!(worker.id = %me.id, "worker.drain_timeout passed: interrupting the turns still running");
                }
                () = me.token.cancelled() => {}
            }
            me.token.cancel();
        });
    }

    /// Whether the worker is draining.
    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Resolves once the worker has stopped (after its shutdown token was cancelled).
    pub async fn stopped(&self) {
        self.stopped.cancelled().await;
    }

    /// Runs a job: claims the session (or forwards the job to its owner) and waits until the
    /// turn has ended, so the job stays "running" in the queue for as long as the turn does.
    async fn dispatch(self: &Arc<Self>, job: TurnJob) -> Result<(), String> {
        // A warm session's owner is woken by NOTIFY and often ran the turn before its job
        // arrives. Without an actor here, a finished turn needs no claim, no lease and no
        // agent: the job is simply done.
        if !self.has_actor(job.session_id) && !self.is_unfinished(job.turn_id).await? {
            return Ok(());
        }
        let sender = match self.actor_for(job.session_id).await? {
            Claim::Actor(tx) => tx,
            // Another live worker owns the session: hand it the job.
            Claim::Elsewhere => return self.push_to_owner(job).await,
            // No room here now: any worker (this one included) tries again shortly.
            Claim::Full => return self.push_again(job, queue::Push::Later(FULL_RETRY)).await,
            // Draining: another worker takes it; the delay keeps this worker's own consumers
            // (which keep running until the drain ends) from fetching it straight back.
            Claim::Draining => return self.push_again(job, queue::Push::Later(FULL_RETRY)).await,
        };
        let (done, wait) = oneshot::channel();
        if sender
            .send(Command::Work {
                turn_id: job.turn_id,
                done,
            })
            .await
            .is_err()
        {
            return Err("the session actor stopped".into());
        }
        let _ = wait.await;
        // The actor stopped before this turn ran (the worker is stopping, or the lease was
        // lost): the job goes back to the queue rather than the turn being stranded.
        if self.is_unfinished(job.turn_id).await? {
            return self.push_again(job, queue::Push::Again).await;
        }
        Ok(())
    }

    /// Whether the turn has yet to end, waiting out a database outage.
    async fn is_unfinished(&self, turn: crate::domain::TurnId) -> Result<bool, String> {
        retry::until_available(&self.token, "reading a turn", |_| {
            turns::is_unfinished(&self.pool, turn)
        })
        .await
        .map_err(|e| e.to_string())
    }

    /// Pushes the job to the session's owner (or the shared queue when it has none).
    /// A job pushed twice (a commit whose answer was lost) only wakes the actor once more.
    async fn push_again(&self, job: TurnJob, push: queue::Push) -> Result<(), String> {
        self.push(job, push, push).await
    }

    /// Hands a job to the session's owner, after a claim found the session held. When no
    /// live owner shows (a lease kept through its grace after a database restart, or one
    /// given up a moment ago) the job waits a little on the shared queue rather than
    /// bouncing between workers.
    async fn push_to_owner(&self, job: TurnJob) -> Result<(), String> {
        self.push(job, queue::Push::Again, queue::Push::Later(FULL_RETRY))
            .await
    }

    async fn push(
        &self,
        job: TurnJob,
        to_owner: queue::Push,
        to_shared: queue::Push,
    ) -> Result<(), String> {
        retry::until_available(&self.token, "pushing a job", |_| async move {
            let mut tx = store::begin(&self.pool).await?;
            let owner = leases::owner(&mut *tx, job.session_id)
                .await?
                .filter(|o| *o != self.id || !self.token.is_cancelled());
            let push = if owner.is_some() { to_owner } else { to_shared };
            queue::push_turn(&mut tx, owner, job, push).await?;
            tx.commit().await?;
            Ok(())
        })
        .await
        .map_err(|e| e.to_string())
    }

    fn has_actor(&self, session: SessionId) -> bool {
        self.actors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&session)
            .is_some_and(|h| !h.tx.is_closed() && !h.evicting)
    }

    /// The actor of a session, started (with a fresh lease) if needed. A worker keeps at
    /// most `worker.capacity` sessions warm: when full, the least recently active idle
    /// session is evicted (its process stops; its next turn resumes it wherever it lands).
    async fn actor_for(self: &Arc<Self>, session: SessionId) -> Result<Claim, String> {
        loop {
            if self.token.is_cancelled() {
                return Ok(Claim::Elsewhere);
            }
            let stopping = {
                let actors = self.actors.lock().unwrap_or_else(PoisonError::into_inner);
                match actors.get(&session).filter(|h| !h.tx.is_closed()) {
                    Some(h) if !h.evicting && !self.is_draining() => {
                        return Ok(Claim::Actor(h.tx.clone()));
                    }
                    Some(h) => Some(h.tx.clone()),
                    None => None,
                }
            };
            match stopping {
                // Being evicted: let it finish (stop its process, release the lease) first,
                // so two actors never share the session.
                Some(tx) => tx.closed().await,
                None => break,
            }
        }
        // Draining: no new sessions here (the job goes to whoever owns the session next).
        if self.is_draining() {
            return Ok(Claim::Draining);
        }
        let evicted = {
            let mut actors = self.actors.lock().unwrap_or_else(PoisonError::into_inner);
            // Entries of actors that have ended (idle, deleted, evicted) go here.
            actors.retain(|_, h| !h.tx.is_closed());
            let warm = actors.values().filter(|h| !h.evicting).count();
            if warm >= self.settings.worker.capacity as usize {
                let victim = actors
                    .iter_mut()
                    .filter(|(_, h)| !h.evicting && !h.activity.is_busy())
                    .min_by_key(|(_, h)| h.activity.last_active());
                let Some((id, victim)) = victim else {
                    return Ok(Claim::Full);
                };
                tracing::info!(session.id = %id, "at capacity: evicting the least recently active session");
                victim.evicting = true;
                Some(victim.tx.clone())
            } else {
                None
            }
        };
        // The slot is free once the evicted session has stopped its agent and given up its
        // lease: never more warm agents than `worker.capacity`, not even for a moment.
        if let Some(tx) = evicted {
            let _ = tx.send(Command::Evict).await;
            tx.closed().await;
        }
        let claimed = retry::until_available(&self.token, "claiming a session", |_| {
            leases::claim(&self.pool, session, self.id, self.settings.worker.lease_ttl)
        })
        .await
        .map_err(|e| e.to_string())?;
        let Some(fence) = claimed else {
            return Ok(Claim::Elsewhere);
        };
        let mut actors = self.actors.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(h) = actors
            .get(&session)
            .filter(|h| !h.tx.is_closed() && !h.evicting)
        {
            return Ok(Claim::Actor(h.tx.clone()));
        }
        let (tx, rx) = mpsc::channel(64);
        let activity = Arc::new(Activity::default());
        let runtime = session::Runtime {
            pool: self.pool.clone(),
            settings: self.settings.clone(),
            tracker: self.tasks.clone(),
            token: self.token.clone(),
            opencode: self.opencode.clone(),
            spares: self.spares.clone(),
        };
        let actor = Actor::new(session, fence, runtime, rx, activity.clone());
        self.tasks.spawn(actor.run());
        actors.insert(
            session,
            ActorHandle {
                tx: tx.clone(),
                activity,
                evicting: false,
            },
        );
        Ok(Claim::Actor(tx))
    }

    fn control(&self, session: SessionId, action: &str) {
        let tx = self
            .actors
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&session)
            .map(|h| h.tx.clone());
        let Some(tx) = tx else { return };
        let cmd = match action {
            "work" => Command::Wake,
            "interrupt" => Command::Interrupt,
            "delete" => Command::Delete,
            _ => return,
        };
        match tx.try_send(cmd) {
            Ok(()) => {}
            // A busy actor's mailbox can be full (jobs queue there too): an interrupt or a
            // delete must not be dropped, so it waits for room beside the listener.
            Err(mpsc::error::TrySendError::Full(Command::Wake)) => {}
            Err(mpsc::error::TrySendError::Full(cmd)) => {
                self.tasks.spawn(async move {
                    let _ = tx.send(cmd).await;
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }
}

async fn handle_job(job: TurnJob, worker: Data<Arc<Worker>>) -> Result<(), BoxDynError> {
    // Never retried by apalis: a failure here is recorded on the turn by the actor.
    worker
        .dispatch(job)
        .await
        .map_err(|e| AbortError::new(e).into())
}

struct Control(Arc<Worker>);

impl crate::events::listener::Handler for Control {
    fn notify(&self, channel: &str, payload: &str) {
        if channel != CONTROL_CHANNEL {
            return;
        }
        // `worker:<id>:drain` is for a worker; everything else is `<session>:<action>`.
        if let Some(rest) = payload.strip_prefix("worker:") {
            if rest.strip_suffix(":drain") == Some(self.0.id.to_string().as_str()) {
                self.0.drain();
            }
            return;
        }
        if let Some((session, action)) = payload.split_once(':')
            && let Ok(session) = session.parse()
        {
            self.0.control(session, action);
        }
    }

    fn resync(&self) {}
}
