//! One session's actor on a worker: owns the warm agent process, runs the session's turns
//! strictly one at a time in seq order, and answers interrupt and delete requests.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

mod opencode_mirror;

use opencode_mirror::{OpenCodeMirror, Restore};

use super::retry;
use super::spares::Spares;
use super::writer::{DEFAULT_WINDOW, EventWriter};
use crate::config::Settings;
use crate::domain::{Provider, SessionId, WorkerId};
use crate::events::{EventBody, NewEvent};
use crate::provider::claude_code::{ClaudeProcess, transcript};
use crate::provider::opencode::{Attached, HostSpec, OpenCodeHost, OpenCodeSession, SessionSpec};
use crate::provider::{Agent, AgentEvent, SpawnSpec, TurnOutcome};
use crate::store::events::Fence;
use crate::store::turns::{Outcome, TurnRow};
use crate::store::{self, leases, sessions, turns};

/// Chunks of a transcript mirror beyond which they are folded into one.
const MAX_CHUNKS: i64 = 64;

/// How many finished turn ids an actor remembers (see [`Waiters`]).
const FINISHED_KEPT: usize = 64;

/// Job handlers waiting for their turn to end, and the turns that ended lately: a job that
/// arrives after its turn already ran (woken by NOTIFY first) is answered at once.
#[derive(Default)]
struct Waiters {
    pending: Vec<(crate::domain::TurnId, oneshot::Sender<()>)>,
    finished: std::collections::VecDeque<crate::domain::TurnId>,
}

impl Waiters {
    /// Answers `done` once `turn` has ended (at once if it already has).
    fn wait_for(&mut self, turn: crate::domain::TurnId, done: oneshot::Sender<()>) {
        if self.finished.contains(&turn) {
            let _ = done.send(());
        } else {
            self.pending.push((turn, done));
        }
    }

    /// `turn` ended: its waiters are answered.
    fn ended(&mut self, turn: crate::domain::TurnId) {
        if self.finished.len() == FINISHED_KEPT {
            self.finished.pop_front();
        }
        self.finished.push_back(turn);
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
            .into_iter()
            .partition(|(t, _)| *t == turn);
        self.pending = keep;
        for (_, tx) in done {
            let _ = tx.send(());
        }
    }

    /// Answers every waiter (nothing is pending any more, or the actor stops).
    fn release_all(&mut self) {
        for (_, done) in self.pending.drain(..) {
            let _ = done.send(());
        }
    }
}

/// Why a turn fails when its worker stops in the middle of it.
const WORKER_STOPPED: &str = "the worker stopped during the turn";
/// Why a turn fails (or runs again) when its worker died in the middle of it.
const WORKER_LOST: &str = "the worker running the turn was lost";

/// A request to the actor.
#[derive(Debug)]
pub enum Command {
    /// Run the session's pending turns; answer once `turn_id` has ended.
    Work {
        turn_id: crate::domain::TurnId,
        done: oneshot::Sender<()>,
    },
    /// A turn was enqueued for the session (its owner is told before the job arrives).
    Wake,
    Interrupt,
    Delete,
    /// Stop the process and give the session up (the worker needs the slot); after the
    /// running turn, if any.
    Evict,
}

/// What the worker may read of an actor without asking it: whether a turn runs, and when
/// the session was last active (for choosing whom to evict).
#[derive(Debug)]
pub struct Activity {
    busy: AtomicBool,
    last_active: std::sync::Mutex<std::time::Instant>,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            busy: AtomicBool::new(false),
            last_active: std::sync::Mutex::new(std::time::Instant::now()),
        }
    }
}

impl Activity {
    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub fn last_active(&self) -> std::time::Instant {
        *self
            .last_active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
        *self
            .last_active
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = std::time::Instant::now();
    }
}

/// What every actor of a worker shares.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    /// Tracks the actors' own tasks (agent I/O), so the worker can wait for them.
    pub tracker: TaskTracker,
    /// The worker's stop.
    pub token: CancellationToken,
    /// The worker's OpenCode server (shared by its OpenCode sessions).
    pub opencode: Arc<OpenCodeHost>,
    /// The worker's warm spares, if it keeps any.
    pub spares: Option<Arc<Spares>>,
}

pub struct Actor {
    pub session: SessionId,
    pub fence: Fence,
    pub pool: PgPool,
    pub settings: Arc<Settings>,
    pub tracker: TaskTracker,
    pub token: CancellationToken,
    pub rx: mpsc::Receiver<Command>,
    opencode: Arc<OpenCodeHost>,
    spares: Option<Arc<Spares>>,
    process: Option<Agent>,
    waiters: Waiters,
    /// Where the Claude Code transcript of the warm process lives (`HOME`, conversation
    /// id), mirrored to the database after every turn.
    transcript: Option<(PathBuf, Uuid)>,
    /// How many bytes of the transcript are mirrored. Mirroring runs beside the actor (the
    /// next turn need not wait for it); the lock keeps the mirrors of one session in order.
    mirrored: Arc<tokio::sync::Mutex<u64>>,
    /// The mirror of the OpenCode conversation of the warm session, if it runs on OpenCode.
    opencode_mirror: Option<OpenCodeMirror>,
    deleted: bool,
    evicted: bool,
    activity: Arc<Activity>,
}

impl Actor {
    pub fn new(
        session: SessionId,
        fence: Fence,
        runtime: Runtime,
        rx: mpsc::Receiver<Command>,
        activity: Arc<Activity>,
    ) -> Self {
        let Runtime {
            pool,
            settings,
            tracker,
            token,
            opencode,
            spares,
        } = runtime;
        Self {
            session,
            fence,
            pool,
            settings,
            tracker,
            token,
            rx,
            opencode,
            spares,
            process: None,
            waiters: Waiters::default(),
            transcript: None,
            mirrored: Arc::default(),
            opencode_mirror: None,
            deleted: false,
            evicted: false,
            activity,
        }
    }

    fn worker(&self) -> WorkerId {
        self.fence.worker_id
    }

    /// A database call that waits out an outage (see [`retry`]); only a stopping worker
    /// gives up on it.
    async fn db<T, F, Fut>(&self, what: &str, mut op: F) -> store::Result<T>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = store::Result<T>>,
    {
        retry::until_available(&self.token, what, |_| op()).await
    }

    /// Runs until the session is deleted, idle for `idle_timeout`, the lease is lost, or the
    /// worker stops. Always stops its process and gives up the lease.
    pub async fn run(mut self) {
        loop {
            if self.deleted || self.evicted || self.token.is_cancelled() {
                break;
            }
            match turns::next_unfinished(&self.pool, self.session).await {
                Ok(Some(turn)) => {
                    self.activity.set_busy(true);
                    let ran = self.run_turn(turn).await;
                    self.activity.set_busy(false);
                    if let Err(e) = ran {
                        tracing::warn!(session.id = %self.session, error = %e, "stopping the session actor");
                        break;
                    }
                    self.recycle_if_bloated().await;
                    continue;
                }
                Ok(None) => {
                    self.waiters.release_all();
                }
                Err(e) => {
                    tracing::warn!(session.id = %self.session, error = %e, "reading pending turns failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            }
            tokio::select! {
                () = self.token.cancelled() => break,
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Work { turn_id, done }) => self.waiters.wait_for(turn_id, done),
                    Some(Command::Delete) | None => self.deleted = true,
                    Some(Command::Evict) => self.evicted = true,
                    Some(Command::Interrupt | Command::Wake) => {}
                },
                () = tokio::time::sleep(self.settings.worker.idle_timeout) => {
                    tracing::info!(session.id = %self.session, "idle: stopping the agent process");
                    break;
                }
            }
        }
        self.stop_process().await;
        let _ = leases::release(&self.pool, self.session, self.fence).await;
        self.waiters.release_all();
    }

    /// Between turns: a Claude Code process above `worker.max_agent_rss_mb` is stopped; the
    /// next turn starts a new one that resumes the conversation (a long-lived Node process
    /// only grows). OpenCode's server is shared by the worker's sessions and is left alone.
    async fn recycle_if_bloated(&mut self) {
        let limit_mb = self.settings.worker.max_agent_rss_mb;
        let Some(Agent::Claude(process)) = &self.process else {
            return;
        };
        if limit_mb == 0 {
            return;
        }
        let pid = process.pid();
        let Some(rss) = crate::provider::process::rss_bytes(pid) else {
            return;
        };
        if rss > limit_mb * 1024 * 1024 {
            tracing::info!(session.id = %self.session, process.pid = pid, rss_mb = rss / (1024 * 1024), limit_mb, "the agent outgrew worker.max_agent_rss_mb: recycling it; the next turn resumes the conversation");
            self.stop_process().await;
        }
    }

    async fn stop_process(&mut self) {
        self.transcript = None;
        self.end_opencode_mirror().await;
        if let Some(mut p) = self.process.take() {
            p.stop(self.settings.worker.stop_grace).await;
            let _ = leases::set_process(&self.pool, self.session, self.fence, None).await;
        }
    }

    /// Starts the agent (resuming its conversation when the transcript exists).
    async fn ensure_process(&mut self, writer: &mut EventWriter) -> Result<bool, String> {
        if self.process.is_some() {
            return Ok(false);
        }
        let row = self
            .db("reading the session", || {
                sessions::get_any(&self.pool, self.session)
            })
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the session is gone")?;
        let provider_kind = row.provider().map_err(|e| e.to_string())?;
        let settings = self.settings.clone();
        let provider = match provider_kind {
            Provider::ClaudeCode => &settings.providers.claude_code,
            Provider::OpenCode => &settings.providers.opencode,
        };
        let home = self.settings.agent_home(provider);
        std::fs::create_dir_all(&home).map_err(|e| format!("creating {}: {e}", home.display()))?;
        let known = match provider_kind {
            Provider::ClaudeCode => self
                .db("reading the conversation id", || {
                    sessions::cli_session_id(&self.pool, self.session)
                })
                .await
                .map_err(|e| e.to_string())?,
            Provider::OpenCode => None,
        };
        // A session that never ran, with default settings: a warm spare saves the cold start.
        if provider_kind == Provider::ClaudeCode
            && known.is_none()
            && row.work_dir.is_none()
            && self.take_spare(&row).await?
        {
            return Ok(false);
        }
        let cwd = match &row.work_dir {
            Some(dir) if PathBuf::from(dir).is_absolute() => PathBuf::from(dir),
            Some(dir) => self.settings.work_root().join(dir),
            None => self.settings.work_root().join(self.session.to_string()),
        };
        std::fs::create_dir_all(&cwd).map_err(|e| format!("creating {}: {e}", cwd.display()))?;
        confined(&settings, &cwd)?;
        if provider_kind == Provider::OpenCode {
            let env = agent_env(&self.settings, provider, self.worker());
            return self.open_opencode(writer, &row, home, cwd, env).await;
        }

        // A conversation last run on another host (another HOME) comes back from its mirror.
        if let Some(id) = known
            && transcript::find_transcript(&home, id).is_none()
            && let Some(content) = self
                .db("reading the conversation's mirror", || {
                    sessions::agent_state(&self.pool, self.session, id)
                })
                .await
                .map_err(|e| e.to_string())?
        {
            let path = transcript::transcript_path(&home, &cwd, id);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            }
            std::fs::write(&path, content)
                .map_err(|e| format!("restoring {}: {e}", path.display()))?;
            tracing::info!(session.id = %self.session, path = %path.display(), "restored the conversation from its mirror");
        }
        let (cli_id, resume) = match known {
            Some(id) if transcript::find_transcript(&home, id).is_some() => (id, true),
            Some(_) => {
                writer.push(EventBody::ContextLost {
                    reason: "the agent's transcript was not found on this worker; starting a new conversation".into(),
                });
                (Uuid::new_v4(), false)
            }
            None => (Uuid::new_v4(), false),
        };
        if !resume {
            self.db("recording the conversation id", || {
                sessions::set_cli_session_id(&self.pool, self.session, cli_id)
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        let spec = claude_spec(
            &self.settings,
            self.worker(),
            (row.model.as_deref(), &row.options.0),
            cwd,
            cli_id,
            resume,
        );
        let process = ClaudeProcess::spawn(&spec, &self.tracker)
            .await
            .map_err(|e| e.to_string())?;
        self.adopt(process, home, cli_id, resume).await?;
        Ok(resume)
    }

    /// Takes a warm spare for a session that never ran, if one started with the session's
    /// settings waits; `true` when the session now runs on it.
    async fn take_spare(&mut self, row: &sessions::SessionRow) -> Result<bool, String> {
        let Some(spares) = &self.spares else {
            return Ok(false);
        };
        let wanted = claude_spec(
            &self.settings,
            self.worker(),
            (row.model.as_deref(), &row.options.0),
            PathBuf::new(),
            Uuid::nil(),
            false,
        );
        let Some(mut spare) = spares.take(&wanted) else {
            return Ok(false);
        };
        let conversation = spare.spec.cli_session_id;
        let dir_name = spare.work_dir_name();
        let adopted = self
            .db("adopting a warm spare", || {
                sessions::adopt_spare(&self.pool, self.session, &dir_name, conversation)
            })
            .await;
        if !matches!(adopted, Ok(true)) {
            // The session changed meanwhile (or the database failed): start cold.
            spare.process.stop(self.settings.worker.stop_grace).await;
            let _ = std::fs::remove_dir_all(&spare.spec.cwd);
            return Ok(false);
        }
        tracing::info!(session.id = %self.session, process.pid = spare.process.pid(), "took a warm spare");
        let home = self
            .settings
            .agent_home(&self.settings.providers.claude_code);
        self.adopt(spare.process, home, conversation, false).await?;
        Ok(true)
    }

    /// Makes `process` the session's warm agent, mirroring its transcript from now on.
    async fn adopt(
        &mut self,
        process: ClaudeProcess,
        home: PathBuf,
        cli_id: Uuid,
        resume: bool,
    ) -> Result<(), String> {
        let _ =
            leases::set_process(&self.pool, self.session, self.fence, Some(process.pid())).await;
        tracing::info!(session.id = %self.session, process.pid = process.pid(), resume, "agent process ready");
        let mirrored = self
            .db("reading the mirror's length", || {
                sessions::mirrored_len(&self.pool, self.session, cli_id)
            })
            .await
            .map_err(|e| e.to_string())?;
        *self.mirrored.lock().await = mirrored.max(0) as u64;
        self.transcript = Some((home, cli_id));
        self.process = Some(Agent::Claude(Box::new(process)));
        Ok(())
    }

    /// Attaches the session to the worker's OpenCode server (starting it if needed),
    /// resuming the OpenCode session it had, if that still exists.
    async fn open_opencode(
        &mut self,
        writer: &mut EventWriter,
        row: &sessions::SessionRow,
        home: PathBuf,
        cwd: PathBuf,
        mut env: BTreeMap<String, String>,
    ) -> Result<bool, String> {
        let provider = &self.settings.providers.opencode;
        // The server's whole state lives under its HOME: keep it stable across restarts.
        for (k, sub) in [
            ("XDG_CONFIG_HOME", ".config"),
            ("XDG_DATA_HOME", ".local/share"),
            ("XDG_CACHE_HOME", ".cache"),
            ("XDG_STATE_HOME", ".local/state"),
        ] {
            env.insert(k.to_owned(), home.join(sub).display().to_string());
        }
        // hotplex pins the CLI version; the server must not replace itself.
        env.insert("OPENCODE_DISABLE_AUTOUPDATE".to_owned(), "1".to_owned());
        env.extend(provider.env.clone());
        let spec = HostSpec {
            binary: provider.binary.clone(),
            extra_args: provider.args.clone(),
            env,
            cwd: self.settings.work_root(),
            stop_grace: self.settings.worker.stop_grace,
            limits: self.settings.worker.agent_limits,
        };
        let server = self
            .opencode
            .server(&spec)
            .await
            .map_err(|e| e.to_string())?;
        let known = self
            .db("reading the OpenCode session id", || {
                sessions::agent_ref(&self.pool, self.session)
            })
            .await
            .map_err(|e| e.to_string())?;
        // A conversation that ran elsewhere since (another HOME, another host) comes back
        // from its mirror under the same OpenCode session id.
        let restore = match &known {
            Some(id) => self.restore_opencode(&server, id, &cwd).await?,
            None => Restore::Ready { mark: None },
        };
        let session_spec = SessionSpec {
            known,
            cwd,
            model: row.model.clone().filter(|m| m != "default"),
            agent: row.options.0.agent.clone(),
            system: row.options.0.system_prompt.clone(),
            disabled_tools: row.options.0.disallowed_tools.clone(),
        };
        let (session, attached) = OpenCodeSession::open(server, &session_spec)
            .await
            .map_err(|e| e.to_string())?;
        if attached == Attached::Lost {
            let reason = match &restore {
                Restore::Failed(why) => format!("the OpenCode session could not be restored from its mirror ({why}); starting a new conversation"),
                Restore::Ready { .. } => "the OpenCode session was not found on this worker's server; starting a new conversation".into(),
            };
            writer.push(EventBody::ContextLost { reason });
        }
        if attached != Attached::Resumed {
            self.db("recording the OpenCode session id", || {
                sessions::set_agent_ref(&self.pool, self.session, session.id())
            })
            .await
            .map_err(|e| e.to_string())?;
        }
        // Mirrors go on from the last turn mirrored when this is the mirrored conversation.
        let mark = match restore {
            Restore::Ready { mark } if attached == Attached::Resumed => mark,
            _ => None,
        };
        self.opencode_mirror = Some(OpenCodeMirror::new(session.id(), mark));
        let pid = session.pid();
        let _ = leases::set_process(&self.pool, self.session, self.fence, Some(pid)).await;
        tracing::info!(session.id = %self.session, opencode.session = %session.id(), process.pid = pid, ?attached, "OpenCode session ready");
        self.process = Some(Agent::OpenCode(Box::new(session)));
        Ok(attached == Attached::Resumed)
    }

    /// Runs one turn to its end. An error means the actor must stop (lease lost).
    async fn run_turn(&mut self, turn: TurnRow) -> Result<(), store::Error> {
        let mut writer = EventWriter::new(
            self.pool.clone(),
            self.session,
            self.fence,
            turn.turn_id,
            DEFAULT_WINDOW,
        )
        .stop_on(self.token.clone());
        // A turn already running when this actor starts was left by a worker that was lost
        // (it died; its lease expired). The rule: a turn that produced no output yet runs
        // again, once; one that did (text, a tool call) fails, since running it again could
        // repeat what its tools already did.
        if turn.status == "running" {
            let (had_output, starts) = self
                .db("reading a lost turn", || {
                    turns::attempt_info(&self.pool, turn.turn_id)
                })
                .await?;
            if had_output || starts >= 2 {
                let error = if had_output {
                    format!("{WORKER_LOST} after it had produced output")
                } else {
                    format!("{WORKER_LOST} twice")
                };
                tracing::warn!(session.id = %self.session, turn.id = %turn.turn_id, "{error}");
                return self
                    .finish(&mut writer, &turn, Outcome::Failed { error, usage: None })
                    .await;
            }
            tracing::warn!(session.id = %self.session, turn.id = %turn.turn_id, "retrying a turn whose worker was lost before any output");
            writer.push(EventBody::TurnRetried {
                reason: format!("{WORKER_LOST} before any output"),
            });
        }
        // The process first (a cold start takes a moment); the turn is marked running with
        // its `turn.started` event in one statement once the agent can take the prompt.
        let resumed = match self.ensure_process(&mut writer).await {
            Ok(resumed) => resumed,
            Err(error) => {
                return self
                    .finish(&mut writer, &turn, Outcome::Failed { error, usage: None })
                    .await;
            }
        };
        let pid = self.process.as_ref().map(|p| p.pid());
        writer.push(EventBody::TurnStarted {
            worker_id: self.worker(),
            pid,
            resumed,
        });
        let started = writer.take();
        let (pool, fence) = (&self.pool, self.fence);
        let seq = retry::until_available(&self.token, "starting a turn", |retry| {
            let (turn, started) = (&turn, &started);
            async move {
                // A try whose connection broke may have committed: never start twice.
                if retry && let Some(seq) = turns::landed(pool, turn.turn_id, fence, false).await? {
                    return Ok(seq);
                }
                let mut conn = pool.acquire().await?;
                turns::start(&mut conn, turn, fence, started).await
            }
        })
        .await?;
        writer.started(seq);
        let sent = match self.process.as_mut() {
            Some(p) => p.send_prompt(&turn.prompt).await,
            None => Err(crate::provider::Error::Gone),
        };
        if let Err(e) = sent {
            self.stop_process().await;
            return self
                .finish(
                    &mut writer,
                    &turn,
                    Outcome::Failed {
                        error: e.to_string(),
                        usage: None,
                    },
                )
                .await;
        }

        let w = &self.settings.worker;
        // The turn engine renews its own lease while it works: a lost lease (another
        // worker took the session over) stops the agent at once, not at its next write.
        let renew_every = w.lease_ttl / 3;
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        let turn_deadline = tokio::time::Instant::now() + w.turn_timeout;
        let mut stall_deadline = tokio::time::Instant::now() + w.stall_timeout;
        let mut interrupting: Option<(&'static str, tokio::time::Instant)> = None;
        loop {
            let due = writer.due_at();
            let kill_at = interrupting.map(|(_, t)| t);
            let Some(process) = self.process.as_mut() else {
                break Ok(());
            };
            tokio::select! {
                ev = process.next_event() => {
                    stall_deadline = tokio::time::Instant::now() + w.stall_timeout;
                    match ev {
                        Some(AgentEvent::TurnEnded(end)) => {
                            let usage = Some(end.usage.clone());
                            let outcome = match (end.outcome, interrupting) {
                                (_, Some((why, _))) if why != "interrupt" => Outcome::Failed { error: why.into(), usage },
                                (TurnOutcome::Completed { result }, _) => Outcome::Completed { result, usage: end.usage },
                                (TurnOutcome::Failed { error }, _) => Outcome::Failed { error, usage },
                                (TurnOutcome::Interrupted, _) => Outcome::Interrupted { usage },
                            };
                            return self.finish(&mut writer, &turn, outcome).await;
                        }
                        Some(other) => {
                            if let Some(body) = to_body(other) && writer.push(body) {
                                writer.flush().await?;
                                // Time spent waiting on the database is not the agent's stall.
                                stall_deadline = tokio::time::Instant::now() + w.stall_timeout;
                            }
                        }
                        None => {
                            let error = match self.process.as_mut() { Some(p) => p.exit_summary().await, None => "agent gone".into() };
                            self.stop_process().await;
                            let error = interrupting.map(|(why, _)| why.to_owned()).filter(|w| w != "interrupt").unwrap_or(error);
                            return self.finish(&mut writer, &turn, Outcome::Failed { error, usage: None }).await;
                        }
                    }
                }
                () = tokio::time::sleep_until(renew_at) => {
                    renew_at = tokio::time::Instant::now() + renew_every;
                    // An unavailable database is no news: the writes wait it out.
                    if let Ok(false) = leases::renew(&self.pool, self.session, self.fence, w.lease_ttl).await {
                        tracing::warn!(session.id = %self.session, "the session's lease was lost during the turn: stopping the agent");
                        self.stop_process().await;
                        return Err(store::Error::Fenced);
                    }
                }
                () = sleep_until_opt(due) => {
                    writer.flush().await?;
                    stall_deadline = tokio::time::Instant::now() + w.stall_timeout;
                }
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Work { turn_id, done }) => self.waiters.wait_for(turn_id, done),
                    Some(Command::Wake) => {}
                    Some(Command::Interrupt) => {
                        if interrupting.is_none() {
                            let _ = process.interrupt().await;
                            interrupting = Some(("interrupt", tokio::time::Instant::now() + Duration::from_secs(10)));
                        }
                    }
                    Some(Command::Delete) | None => {
                        self.deleted = true;
                        self.stop_process().await;
                        return Ok(());
                    }
                    Some(Command::Evict) => self.evicted = true,
                },
                () = self.token.cancelled(), if interrupting.is_none() => {
                    tracing::info!(session.id = %self.session, "worker stopping: interrupting the running turn");
                    let _ = process.interrupt().await;
                    interrupting = Some((WORKER_STOPPED, tokio::time::Instant::now() + w.stop_grace));
                }
                () = tokio::time::sleep_until(stall_deadline.min(turn_deadline)), if interrupting.is_none() => {
                    let why = if tokio::time::Instant::now() >= turn_deadline {
                        "the turn exceeded worker.turn_timeout"
                    } else {
                        "the agent produced no output for worker.stall_timeout"
                    };
                    tracing::warn!(session.id = %self.session, "{why}; interrupting");
                    let _ = process.interrupt().await;
                    interrupting = Some((why, tokio::time::Instant::now() + Duration::from_secs(10)));
                }
                () = sleep_until_opt(kill_at) => {
                    let why = interrupting.map(|(w, _)| w).unwrap_or("interrupt");
                    self.stop_process().await;
                    let error = if why == "interrupt" { "the agent did not stop when interrupted; it was killed".to_owned() } else { format!("{why}; the agent was killed") };
                    return self.finish(&mut writer, &turn, Outcome::Failed { error, usage: None }).await;
                }
            }
        }
    }

    async fn finish(
        &mut self,
        writer: &mut EventWriter,
        turn: &TurnRow,
        outcome: Outcome,
    ) -> Result<(), store::Error> {
        let terminal = match &outcome {
            Outcome::Completed { result, usage } => EventBody::TurnCompleted {
                result: result.clone(),
                usage: usage.clone(),
            },
            Outcome::Failed { error, .. } => EventBody::TurnFailed {
                error: error.clone(),
            },
            Outcome::Interrupted { .. } => EventBody::TurnInterrupted {
                partial_text: writer.text.clone(),
            },
        };
        let mut evs = writer.take();
        evs.push(NewEvent::turn(turn.turn_id, terminal));
        // The turn's new transcript bytes go in the same statement (no extra commit per
        // turn); the lock keeps this session's mirrors in order.
        let mirrored = self.mirrored.clone();
        let mut mirrored = mirrored.lock().await;
        let path = self
            .transcript
            .as_ref()
            .and_then(|(home, cli_id)| transcript::find_transcript(home, *cli_id));
        let chunk = match (&self.transcript, &path) {
            (Some((_, cli_id)), Some(path)) => match transcript_tail(path, *mirrored).await {
                // Appended bytes only: a rewritten file (the tail starts over at 0) is
                // mirrored whole beside the actor.
                Ok((from, bytes)) if from == *mirrored && !bytes.is_empty() => {
                    Some((*cli_id, from, bytes))
                }
                _ => None,
            },
            _ => None,
        };
        let mirror = chunk.as_ref().map(|(cli, offset, bytes)| turns::Chunk {
            cli_session_id: *cli,
            offset: *offset as i64,
            content: bytes,
        });
        let (pool, fence) = (&self.pool, self.fence);
        retry::until_available(&self.token, "finishing a turn", |retry| {
            let (outcome, evs) = (&outcome, &evs);
            async move {
                // A try whose connection broke may have committed: never finish twice.
                if retry
                    && turns::landed(pool, turn.turn_id, fence, true)
                        .await?
                        .is_some()
                {
                    return Ok(());
                }
                let mut conn = pool.acquire().await?;
                turns::finish(&mut conn, turn, fence, outcome, evs, mirror).await?;
                Ok(())
            }
        })
        .await?;
        if let Some((_, offset, bytes)) = &chunk {
            *mirrored = offset + bytes.len() as u64;
        }
        drop(mirrored);
        self.waiters.ended(turn.turn_id);
        // Bytes the CLI writes after its result (and a rewritten file) follow separately.
        self.mirror_transcript(path);
        self.mirror_opencode();
        Ok(())
    }

    /// Copies what the conversation's transcript gained since the last mirror to the
    /// database, beside the actor, so that another worker (with another HOME, on another
    /// host) can resume it. The CLI appends to its transcript; a file that shrank was
    /// rewritten and is mirrored whole again. A failure costs only that: the next owner
    /// elsewhere would start afresh (`session.context_lost`).
    fn mirror_transcript(&self, path: Option<PathBuf>) {
        let Some((home, cli_id)) = self.transcript.clone() else {
            return;
        };
        let (pool, session, fence) = (self.pool.clone(), self.session, self.fence);
        let mirrored = self.mirrored.clone();
        self.tracker.spawn(async move {
            let mut mirrored = mirrored.lock().await;
            let Some(path) = path.or_else(|| transcript::find_transcript(&home, cli_id)) else {
                return;
            };
            let (from, bytes) = match transcript_tail(&path, *mirrored).await {
                Ok(tail) => tail,
                Err(e) => {
                    tracing::warn!(session.id = %session, error = %e, "reading the transcript to mirror failed");
                    return;
                }
            };
            if !bytes.is_empty() {
                let written = async {
                    let mut conn = pool.acquire().await?;
                    sessions::append_agent_state(&mut conn, session, fence, cli_id, from as i64, &bytes)
                        .await
                };
                match written.await {
                    Ok(_) => *mirrored = from + bytes.len() as u64,
                    Err(e) => {
                        tracing::warn!(session.id = %session, error = %e, "mirroring the transcript failed");
                        return;
                    }
                }
            }
            // Every turn adds a chunk or two: a long conversation is folded back into one.
            if let Err(e) =
                sessions::compact_agent_state(&pool, session, fence, cli_id, MAX_CHUNKS).await
            {
                tracing::warn!(session.id = %session, error = %e, "compacting the transcript mirror failed");
            }
        });
    }
}

/// The work dir, with every symlink resolved, must still lie under the work root or an
/// `allowed_work_dirs` entry: the API checks the path as written, but a symlink placed
/// there later (by another session's agent, say) could point anywhere.
fn confined(settings: &Settings, cwd: &std::path::Path) -> Result<(), String> {
    let real =
        std::fs::canonicalize(cwd).map_err(|e| format!("resolving {}: {e}", cwd.display()))?;
    let inside = std::iter::once(settings.work_root())
        .chain(settings.allowed_work_dirs.iter().cloned())
        .filter_map(|root| std::fs::canonicalize(root).ok())
        .any(|root| real.starts_with(root));
    if inside {
        Ok(())
    } else {
        Err(format!(
            "the session's work_dir resolves to {}, outside the work root and allowed_work_dirs; the agent was not started",
            real.display()
        ))
    }
}

/// The environment every agent process of this worker gets: an allow-list, never our own
/// environment (database URL, keys), plus the provider's own variables.
fn agent_env(
    settings: &Settings,
    provider: &crate::config::ProviderSettings,
    worker: WorkerId,
) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    if let Some(path) = std::env::var_os("PATH") {
        env.insert("PATH".to_owned(), path.to_string_lossy().into_owned());
    }
    env.insert(
        "HOME".to_owned(),
        settings.agent_home(provider).display().to_string(),
    );
    env.insert("LANG".to_owned(), "C.UTF-8".to_owned());
    env.insert("TERM".to_owned(), "dumb".to_owned());
    env.insert(
        crate::provider::process::OWNER_VAR.to_owned(),
        worker.to_string(),
    );
    env
}

/// How a Claude Code process is started for a session's model and options (a warm spare:
/// no model, default options).
pub(super) fn claude_spec(
    settings: &Settings,
    worker: WorkerId,
    (model, options): (Option<&str>, &sessions::SessionOptions),
    cwd: PathBuf,
    cli_session_id: Uuid,
    resume: bool,
) -> SpawnSpec {
    let provider = &settings.providers.claude_code;
    let mut env = agent_env(settings, provider, worker);
    env.extend(provider.env.clone());
    SpawnSpec {
        binary: provider.binary.clone(),
        extra_args: provider.args.clone(),
        env,
        cwd,
        cli_session_id,
        resume,
        model: model.map(str::to_owned),
        system_prompt: options.system_prompt.clone(),
        permission_mode: serde_json::to_value(options.permission_mode)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned)),
        allowed_tools: options.allowed_tools.clone(),
        disallowed_tools: options.disallowed_tools.clone(),
        limits: settings.worker.agent_limits,
    }
}

/// The transcript's bytes after `mirrored`, with their offset; from 0 (the whole file)
/// when the file shrank, i.e. was rewritten.
async fn transcript_tail(path: &std::path::Path, mirrored: u64) -> std::io::Result<(u64, Vec<u8>)> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut file = tokio::fs::File::open(path).await?;
    let len = file.metadata().await?.len();
    let from = if len < mirrored { 0 } else { mirrored };
    file.seek(std::io::SeekFrom::Start(from)).await?;
    let mut bytes = Vec::with_capacity((len - from) as usize);
    file.read_to_end(&mut bytes).await?;
    Ok((from, bytes))
}

async fn sleep_until_opt(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

fn to_body(ev: AgentEvent) -> Option<EventBody> {
    Some(match ev {
        AgentEvent::TextDelta(text) => EventBody::TextDelta { text },
        AgentEvent::ThinkingDelta(text) => EventBody::ThinkingDelta { text },
        AgentEvent::ToolStarted { id, name, input } => EventBody::ToolStarted {
            tool_use_id: id,
            name,
            input,
        },
        AgentEvent::ToolCompleted {
            id,
            output,
            is_error,
        } => EventBody::ToolCompleted {
            tool_use_id: id,
            output,
            is_error,
        },
        AgentEvent::MessageCompleted { id, text } => EventBody::MessageCompleted {
            message_id: id,
            text,
        },
        AgentEvent::Raw(frame) => EventBody::AgentRaw { frame },
        AgentEvent::TurnEnded(_) => return None,
    })
}
