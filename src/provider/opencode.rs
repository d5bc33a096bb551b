//! The OpenCode provider: one supervised `opencode serve` per worker holds every OpenCode
//! session of that worker warm (docs/opencode-provider.md says why this beats a process per
//! session: ~650 MB for 100 sessions instead of ~600 MB each). The server listens on
//! 127.0.0.1 with a random password; one `/global/event` stream is routed to the sessions
//! by `sessionID`. A dead or unhealthy server is stopped, its running turns fail, and the
//! next turn starts a new one (after a backoff that grows with repeated failures); the
//! conversations survive in the server's data directory under the provider's `HOME`.

pub mod mapper;
pub mod mirror;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::process::GroupChild;
use super::{AgentEvent, Error, TurnOutcome};
use mapper::TurnMapper;

/// How long a new server may take to print its address.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
const HEALTH_EVERY: Duration = Duration::from_secs(10);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// Consecutive failed health checks before the server is restarted.
const HEALTH_FAILURES: u32 = 2;
/// Longest wait between restarts after repeated failures.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// A server that ran this long did not die young: its replacement starts at once.
const HEALTHY_AFTER: Duration = Duration::from_secs(60);
/// After an abort OpenCode reports idle twice; the second one must not reach the next turn.
const SETTLE_AFTER_ABORT: Duration = Duration::from_millis(300);
const STDERR_TAIL: usize = 20;

/// How to start the server.
#[derive(Debug, Clone)]
pub struct HostSpec {
    pub binary: PathBuf,
    pub extra_args: Vec<String>,
    /// The complete environment (an allow-list); `HOME` is the server's data store.
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub stop_grace: Duration,
    /// Resource limits of the server and the tools it runs.
    pub limits: crate::provider::process::Limits,
}

/// The worker's OpenCode server, started on first use.
#[derive(Debug)]
pub struct OpenCodeHost {
    tracker: TaskTracker,
    token: CancellationToken,
    state: tokio::sync::Mutex<HostState>,
}

#[derive(Debug, Default)]
struct HostState {
    server: Option<Arc<Server>>,
    /// Servers that died young (or failed to start) in a row.
    failures: u32,
    started_at: Option<tokio::time::Instant>,
}

/// A running `opencode serve`.
#[derive(Debug)]
pub struct Server {
    base: String,
    password: String,
    http: reqwest::Client,
    pid: u32,
    routes: Mutex<HashMap<String, mpsc::UnboundedSender<Routed>>>,
    /// Cancelled when the server is gone (or going).
    dead: CancellationToken,
    why_dead: Mutex<Option<String>>,
}

#[derive(Debug)]
enum Routed {
    Event(Value),
}

impl OpenCodeHost {
    /// A host whose server stops with `token` (tasks tracked by `tracker`).
    pub fn new(tracker: TaskTracker, token: CancellationToken) -> Self {
        Self {
            tracker,
            token,
            state: tokio::sync::Mutex::default(),
        }
    }

    /// The live server, started (or restarted) when there is none. Restarts back off:
    /// a server that dies young (or fails to start) makes the next start wait 2, 4, 8, …
    /// up to 30 s after the previous one; one that lived a while is replaced at once.
    pub async fn server(&self, spec: &HostSpec) -> Result<Arc<Server>, Error> {
        let mut st = self.state.lock().await;
        if let Some(s) = &st.server
            && !s.dead.is_cancelled()
        {
            return Ok(s.clone());
        }
        if let Some(dead) = st.server.take() {
            let young = st.started_at.is_some_and(|t| t.elapsed() < HEALTHY_AFTER);
            st.failures = if young { st.failures + 1 } else { 0 };
            tracing::warn!(reason = %dead.why_dead(), failures = st.failures, "the OpenCode server is gone; restarting it");
        }
        if st.failures > 0
            && let Some(last) = st.started_at
        {
            let at = last + backoff(st.failures);
            tokio::select! {
                () = tokio::time::sleep_until(at) => {}
                () = self.token.cancelled() => return Err(Error::NotReady("the worker is stopping".into())),
            }
        }
        st.started_at = Some(tokio::time::Instant::now());
        match Server::start(spec, &self.tracker, &self.token).await {
            Ok(server) => {
                st.server = Some(server.clone());
                Ok(server)
            }
            Err(e) => {
                st.failures += 1;
                Err(e)
            }
        }
    }
}

/// The wait before the next start after `failures` quick failures in a row.
fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1 << failures.min(5)).min(MAX_BACKOFF)
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Server {
    async fn start(
        spec: &HostSpec,
        tracker: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<Arc<Self>, Error> {
        std::fs::create_dir_all(&spec.cwd)?;
        // `--port 0` binds 4096 rather than a free port, so we choose one.
        let port = free_port()?;
        let password = uuid::Uuid::new_v4().simple().to_string();
        let mut cmd = Command::new(&spec.binary);
        cmd.arg("serve")
            .args(["--port", &port.to_string(), "--hostname", "127.0.0.1"])
            .args(&spec.extra_args)
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(&spec.env)
            .env("OPENCODE_SERVER_PASSWORD", &password);
        spec.limits.apply(&mut cmd);
        let mut child = GroupChild::spawn(cmd).map_err(|source| Error::Spawn {
            binary: spec.binary.display().to_string(),
            source,
        })?;
        let pid = child.pid();
        let stdout = child.child_mut().stdout.take().ok_or(Error::Gone)?;
        let stderr = child.child_mut().stderr.take().ok_or(Error::Gone)?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        {
            let tail = tail.clone();
            tracker.spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut t = tail.lock().unwrap_or_else(PoisonError::into_inner);
                    if t.len() == STDERR_TAIL {
                        t.pop_front();
                    }
                    t.push_back(line);
                }
            });
        }
        let mut lines = BufReader::new(stdout).lines();
        let ready = tokio::time::timeout(READY_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("server listening on") {
                    return true;
                }
            }
            false
        })
        .await;
        if ready != Ok(true) {
            child.stop(spec.stop_grace).await;
            let t = tail.lock().unwrap_or_else(PoisonError::into_inner);
            let why = t.iter().cloned().collect::<Vec<_>>().join("\n");
            return Err(Error::NotReady(format!(
                "opencode serve did not start: {why}"
            )));
        }
        // Keep draining stdout so the server never blocks on a full pipe.
        tracker.spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });

        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .map_err(|e| Error::NotReady(e.to_string()))?;
        let server = Arc::new(Self {
            base: format!("http://127.0.0.1:{port}"),
            password,
            http,
            pid,
            routes: Mutex::default(),
            dead: CancellationToken::new(),
            why_dead: Mutex::default(),
        });
        let events = server
            .request(reqwest::Method::GET, "/global/event", None)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        let events = match events {
            Ok(r) => r,
            Err(e) => {
                child.stop(spec.stop_grace).await;
                return Err(Error::NotReady(format!("opencode event stream: {e}")));
            }
        };
        tracker.spawn(server.clone().read_events(events));
        tracker.spawn(
            server
                .clone()
                .supervise(child, stop.clone(), spec.stop_grace, tail),
        );
        tracing::info!(process.pid = pid, port, "OpenCode server ready");
        Ok(server)
    }

    fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        directory: Option<&Path>,
    ) -> reqwest::RequestBuilder {
        let mut r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth("opencode", Some(&self.password));
        if let Some(d) = directory {
            let enc = percent_encoding::utf8_percent_encode(
                &d.to_string_lossy(),
                percent_encoding::NON_ALPHANUMERIC,
            )
            .to_string();
            r = r.header("x-opencode-directory", enc);
        }
        r
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    fn why_dead(&self) -> String {
        self.why_dead
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_else(|| "stopped".into())
    }

    /// Marks the server gone: every session's stream ends (its turn fails with `why`).
    fn die(&self, why: String) {
        let mut w = self.why_dead.lock().unwrap_or_else(PoisonError::into_inner);
        if w.is_none() {
            *w = Some(why);
        }
        drop(w);
        self.dead.cancel();
        self.routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Routes `/global/event` to the sessions by `sessionID`.
    async fn read_events(self: Arc<Self>, mut response: reqwest::Response) {
        let mut parser = crate::sse::Parser::new();
        loop {
            let chunk = tokio::select! {
                () = self.dead.cancelled() => return,
                c = response.chunk() => c,
            };
            let chunk = match chunk {
                Ok(Some(c)) => c,
                Ok(None) => return self.die("the OpenCode event stream ended".into()),
                Err(e) => return self.die(format!("the OpenCode event stream broke: {e}")),
            };
            for frame in parser.push(&chunk) {
                let Ok(v) = serde_json::from_str::<Value>(&frame.data) else {
                    continue;
                };
                let ev = &v["payload"];
                let p = &ev["properties"];
                let session = p["sessionID"]
                    .as_str()
                    .or_else(|| p["info"]["sessionID"].as_str())
                    .or_else(|| p["part"]["sessionID"].as_str());
                let Some(session) = session else { continue };
                let routes = self.routes.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(tx) = routes.get(session) {
                    let _ = tx.send(Routed::Event(ev.clone()));
                }
            }
        }
    }

    /// Owns the child: stops it with the worker (once its sessions are done), and kills a
    /// server that stops answering its health check.
    async fn supervise(
        self: Arc<Self>,
        mut child: GroupChild,
        stop: CancellationToken,
        grace: Duration,
        tail: Arc<Mutex<VecDeque<String>>>,
    ) {
        let mut failures = 0;
        let mut health = tokio::time::interval(HEALTH_EVERY);
        health.tick().await;
        loop {
            tokio::select! {
                code = child.wait() => {
                    let stderr = tail
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join("\n");
                    self.die(format!("the OpenCode server exited (code {code:?}): {stderr}"));
                    // Whatever the server left behind in its group (tools) goes too.
                    child.stop(grace).await;
                    return;
                }
                () = stop.cancelled() => {
                    // The sessions interrupt their turns first; give them the grace to end.
                    let until = tokio::time::Instant::now() + grace;
                    while tokio::time::Instant::now() < until
                        && !self.routes.lock().unwrap_or_else(PoisonError::into_inner).is_empty()
                    {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    self.die("the worker stopped".into());
                    child.stop(grace).await;
                    return;
                }
                () = self.dead.cancelled() => {
                    child.stop(grace).await;
                    return;
                }
                _ = health.tick() => {
                    let ok = self
                        .request(reqwest::Method::GET, "/global/health", None)
                        .timeout(HEALTH_TIMEOUT)
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    failures = if ok { 0 } else { failures + 1 };
                    if failures >= HEALTH_FAILURES {
                        tracing::warn!(process.pid = self.pid, "the OpenCode server fails its health check; restarting it");
                        self.die("the OpenCode server stopped answering its health check".into());
                        child.stop(grace).await;
                        return;
                    }
                }
            }
        }
    }
}

/// What a session asks of OpenCode at start.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// The OpenCode session id kept from before, if any.
    pub known: Option<String>,
    pub cwd: PathBuf,
    /// `provider/model`, e.g. `anthropic/claude-sonnet-4-5`; `None` for the server's default.
    pub model: Option<String>,
    /// The agent persona (`build`, `plan`, …).
    pub agent: Option<String>,
    /// Extra system prompt, sent with every prompt (OpenCode keeps none per session).
    pub system: Option<String>,
    /// Tools switched off (`{"webfetch": false}` on every prompt).
    pub disabled_tools: Vec<String>,
}

/// How a session attached to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attached {
    /// A new OpenCode session.
    New,
    /// The known session, with its history.
    Resumed,
    /// The known session was gone; a new one was made.
    Lost,
}

/// One hotplex session's conversation on the worker's OpenCode server.
#[derive(Debug)]
pub struct OpenCodeSession {
    server: Arc<Server>,
    id: String,
    cwd: PathBuf,
    model: Option<(String, String)>,
    agent: Option<String>,
    system: Option<String>,
    disabled_tools: Vec<String>,
    rx: mpsc::UnboundedReceiver<Routed>,
    turn: Option<TurnMapper>,
    /// Mapped events not handed out yet (one OpenCode event can make several).
    pending: VecDeque<AgentEvent>,
    settle: bool,
    /// The user message of the last prompt (the turn a mirror reads back to).
    last_prompt: Option<String>,
}

impl OpenCodeSession {
    /// Attaches to the known OpenCode session, or creates one.
    pub async fn open(server: Arc<Server>, spec: &SessionSpec) -> Result<(Self, Attached), Error> {
        let model = spec.model.as_deref().and_then(|m| {
            let (p, m) = m.split_once('/')?;
            Some((p.to_owned(), m.to_owned()))
        });
        let mut attached = Attached::New;
        let mut id = None;
        if let Some(known) = &spec.known {
            let r = server
                .request(
                    reqwest::Method::GET,
                    &format!("/session/{known}"),
                    Some(&spec.cwd),
                )
                .send()
                .await
                .map_err(http_err)?;
            if r.status().is_success() {
                id = Some(known.clone());
                attached = Attached::Resumed;
            } else if r.status() == reqwest::StatusCode::NOT_FOUND {
                attached = Attached::Lost;
            } else {
                return Err(Error::NotReady(format!(
                    "OpenCode GET /session: {}",
                    r.status()
                )));
            }
        }
        let id = match id {
            Some(id) => id,
            None => {
                let mut body = json!({});
                if let Some((p, m)) = &model {
                    body["model"] = json!({"providerID": p, "id": m});
                }
                if let Some(a) = &spec.agent {
                    body["agent"] = json!(a);
                }
                let r = server
                    .request(reqwest::Method::POST, "/session", Some(&spec.cwd))
                    .json(&body)
                    .send()
                    .await
                    .map_err(http_err)?;
                let status = r.status();
                let v: Value = r.json().await.map_err(http_err)?;
                match v["id"].as_str() {
                    Some(id) if status.is_success() => id.to_owned(),
                    _ => {
                        return Err(Error::NotReady(format!(
                            "OpenCode POST /session: {status} {v}"
                        )));
                    }
                }
            }
        };
        // Unbounded on purpose (docs/backpressure.md). One `/global/event` stream feeds every
        // session of the server: a bounded queue whose sender waits would let one session
        // that is not reading stall all the others, for as long as it sits idle (only a
        // running turn reads its queue). What waits here is what OpenCode sent for this
        // session while its actor was writing to the database or between turns: about one
        // turn's output, which the server holds in memory as well.
        let (tx, rx) = mpsc::unbounded_channel();
        server
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone(), tx);
        let session = Self {
            server,
            id,
            cwd: spec.cwd.clone(),
            model,
            agent: spec.agent.clone(),
            system: spec.system.clone(),
            disabled_tools: spec.disabled_tools.clone(),
            rx,
            turn: None,
            pending: VecDeque::new(),
            settle: false,
            last_prompt: None,
        };
        Ok((session, attached))
    }

    /// OpenCode's id for the conversation (kept to resume it).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The user message id of the last prompt sent, if any.
    pub fn last_prompt(&self) -> Option<&str> {
        self.last_prompt.as_deref()
    }

    /// The server process (shared by every OpenCode session of the worker).
    pub fn pid(&self) -> u32 {
        self.server.pid()
    }

    /// Sends a prompt; the turn's events follow from [`Self::next_event`].
    pub async fn send_prompt(&mut self, text: &str) -> Result<(), Error> {
        if std::mem::take(&mut self.settle) {
            let until = tokio::time::Instant::now() + SETTLE_AFTER_ABORT;
            while let Ok(Some(_)) = tokio::time::timeout_at(until, self.rx.recv()).await {}
        }
        let message_id = crate::opencode::ids::fresh(crate::opencode::ids::Kind::Message);
        let mut body = json!({
            "parts": [{"type": "text", "text": text}],
            "messageID": message_id,
        });
        if let Some((p, m)) = &self.model {
            body["model"] = json!({"providerID": p, "modelID": m});
        }
        if let Some(a) = &self.agent {
            body["agent"] = json!(a);
        }
        if let Some(system) = &self.system {
            body["system"] = json!(system);
        }
        if !self.disabled_tools.is_empty() {
            let off: serde_json::Map<String, Value> = self
                .disabled_tools
                .iter()
                .map(|t| (t.to_lowercase(), Value::Bool(false)))
                .collect();
            body["tools"] = Value::Object(off);
        }
        self.last_prompt = Some(message_id.clone());
        self.turn = Some(TurnMapper::new(message_id));
        let r = self
            .server
            .request(
                reqwest::Method::POST,
                &format!("/session/{}/prompt_async", self.id),
                Some(&self.cwd),
            )
            .json(&body)
            .send()
            .await
            .map_err(http_err)?;
        if !r.status().is_success() {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            return Err(Error::NotReady(format!("OpenCode prompt: {status} {text}")));
        }
        Ok(())
    }

    /// Asks OpenCode to abort the running turn (it then ends interrupted).
    pub async fn interrupt(&mut self) -> Result<(), Error> {
        if let Some(t) = self.turn.as_mut() {
            t.aborting();
        }
        self.settle = true;
        self.server
            .request(
                reqwest::Method::POST,
                &format!("/session/{}/abort", self.id),
                Some(&self.cwd),
            )
            .send()
            .await
            .map_err(http_err)?;
        Ok(())
    }

    /// The next event of the running turn; `None` when the server is gone.
    pub async fn next_event(&mut self) -> Option<AgentEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                return Some(ev);
            }
            let Routed::Event(ev) = self.rx.recv().await?;
            if ev["type"] == "permission.asked" {
                // Tool approvals over the API come with the permissions work; until then a
                // request for one is refused rather than left hanging (as with Claude Code).
                self.reject_permission(&ev).await;
                return Some(AgentEvent::Raw(ev));
            }
            let Some(turn) = self.turn.as_mut() else {
                continue;
            };
            let mut mapped = turn.map(&ev);
            if turn.is_ended() {
                let user_message = turn.user_message().to_owned();
                self.turn = None;
                self.complete_text(&user_message, &mut mapped).await;
            }
            self.pending.extend(mapped);
        }
    }

    /// A turn that completed without any text seen: under load OpenCode can report the
    /// session idle before it has published the answer's parts. The server's own record
    /// of the turn's messages settles it: their final text becomes the result (streamed as
    /// one delta, so clients see it too).
    async fn complete_text(&self, user_message: &str, mapped: &mut Vec<AgentEvent>) {
        let Some(AgentEvent::TurnEnded(end)) = mapped.last_mut() else {
            return;
        };
        let TurnOutcome::Completed { result } = &mut end.outcome else {
            return;
        };
        if !result.is_empty() {
            return;
        }
        let path = format!("/session/{}/message?limit=16", self.id);
        let Ok(Some(Value::Array(messages))) =
            mirror::get_json(&self.server, &path, &self.cwd).await
        else {
            return;
        };
        let text = messages
            .iter()
            .rev()
            .filter(|m| m["info"]["role"] == "assistant" && m["info"]["parentID"] == user_message)
            .filter_map(|m| {
                let text: String = m["parts"]
                    .as_array()?
                    .iter()
                    .filter(|p| p["type"] == "text" && p["synthetic"] != true)
                    .filter_map(|p| p["text"].as_str())
                    .collect();
                (!text.is_empty()).then_some(text)
            })
            .next();
        if let Some(text) = text {
            tracing::debug!(opencode.session = %self.id, "the answer's text came after idle; read it from the server");
            *result = text.clone();
            let at = mapped.len() - 1;
            mapped.insert(at, AgentEvent::TextDelta(text));
        }
    }

    async fn reject_permission(&self, ev: &Value) {
        let Some(id) = ev["properties"]["id"].as_str() else {
            return;
        };
        tracing::info!(opencode.session = %self.id, permission = %ev["properties"]["permission"], "rejecting an OpenCode permission request");
        let _ = self
            .server
            .request(reqwest::Method::POST, &format!("/permission/{id}/reply"), Some(&self.cwd))
            .json(&json!({"reply": "reject", "message": "hotplex does not approve tool permissions yet"}))
            .send()
            .await;
    }

    /// Why the stream ended.
    pub fn exit_summary(&self) -> String {
        self.server.why_dead()
    }

    /// Aborts a running turn and leaves the server (the conversation stays in its store).
    pub async fn stop(&mut self) {
        if self.turn.is_some() {
            let _ = self.interrupt().await;
        }
        self.close();
    }

    /// Leaves the server (the conversation stays in its store).
    pub fn close(&mut self) {
        self.server
            .routes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
    }
}

impl Drop for OpenCodeSession {
    fn drop(&mut self) {
        self.close();
    }
}

fn http_err(e: reqwest::Error) -> Error {
    Error::NotReady(format!("OpenCode server: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_back_off_exponentially_up_to_a_cap() {
        let waits: Vec<u64> = (1..=7).map(|f| backoff(f).as_secs()).collect();
        assert_eq!(waits, [2, 4, 8, 16, 30, 30, 30]);
    }
}
