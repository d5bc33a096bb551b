//! Test harness: a fresh PostgreSQL database per test (on `DATABASE_URL`'s server, else on
//! a private embedded cluster shared by this test process), and the app served on
//! `127.0.0.1:0`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;

use hotplex::api;
use hotplex::app::{AppState, AuthMode, Shutdown};
use hotplex::auth::{display_prefix, generate_key, hash_key};
use hotplex::config::Settings;
use hotplex::domain::{Role, TenantName};
use hotplex::embedded_pg::{self, EmbeddedPg};
use hotplex::store;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::sync::OnceCell;

/// Where test databases are created.
struct Server {
    /// Options for the maintenance database; test databases swap the name.
    admin: PgConnectOptions,
    /// A URL template: `{db}` is replaced by a database name.
    url_template: String,
}

static SERVER: OnceCell<Server> = OnceCell::const_new();

async fn server() -> &'static Server {
    SERVER
        .get_or_init(|| async {
            match std::env::var("DATABASE_URL") {
                Ok(url) if !url.is_empty() => external(&url),
                _ => embedded().await,
            }
        })
        .await
}

fn external(url: &str) -> Server {
    let admin =
        PgConnectOptions::from_str(url).expect("DATABASE_URL is not a valid PostgreSQL URL");
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut template = format!("{}/{{db}}", &base[..path_start]);
    if let Some(q) = query {
        template.push('?');
        template.push_str(q);
    }
    Server {
        admin,
        url_template: template,
    }
}

/// A private cluster for this test process. The `EmbeddedPg` handle is leaked on purpose
/// (statics are never dropped); a watchdog process stops the cluster and removes its
/// directory once this process is gone, however it ends.
async fn embedded() -> Server {
    let dir = std::env::temp_dir().join(format!("hotplex-test-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the test cluster dir");
    let pg = EmbeddedPg::start(embedded_pg::Options {
        data_dir: dir.clone(),
        bin_dir: None,
        run_as: None,
        ephemeral: true,
    })
    .await
    .expect("starting an embedded PostgreSQL for the tests (or set DATABASE_URL)");
    let pid = pg.pid().expect("we own the test cluster");
    spawn_watchdog(pid, &dir);
    let server = Server {
        admin: pg.connect_options_for("postgres"),
        url_template: pg.url("{db}"),
    };
    std::mem::forget(pg);
    server
}

#[expect(
    clippy::zombie_processes,
    reason = "the watchdog outlives this process on purpose; init reaps it"
)]
fn spawn_watchdog(pg_pid: u32, dir: &std::path::Path) {
    let script = r#"while kill -0 "$0" 2>/dev/null; do sleep 0.5; done
kill -INT "$1" 2>/dev/null
for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$1" 2>/dev/null || break; sleep 0.5; done
kill -KILL "$1" 2>/dev/null
rm -rf "$2""#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(std::process::id().to_string())
        .arg(pg_pid.to_string())
        .arg(dir);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn().expect("spawning the test cluster watchdog");
}

/// A fresh, migrated database, dropped when the test ends.
pub struct TestDb {
    pub pool: PgPool,
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn new() -> Self {
        let server = server().await;
        let name = format!("hotplex_test_{}", uuid::Uuid::new_v4().simple());
        let mut admin = server
            .admin
            .clone()
            .connect()
            .await
            .expect("connecting to the test server");
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut admin)
            .await
            .expect("creating a test database");
        admin.close().await.ok();
        let options = server
            .admin
            .clone()
            .database(&name)
            .log_statements(tracing_log_off());
        let pool = PgPoolOptions::new()
            .max_connections(10)
            .connect_with(options)
            .await
            .expect("connecting");
        store::migrate(&pool)
            .await
            .expect("migrating the test database");
        let url = server.url_template.replace("{db}", &name);
        Self { pool, name, url }
    }
}

fn tracing_log_off() -> tracing::log::LevelFilter {
    tracing::log::LevelFilter::Off
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let Some(server) = SERVER.get() else { return };
        let admin = server.admin.clone();
        // Drop runs inside the test's runtime; do the async cleanup on a thread of its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) = PgConnection::connect_with(&admin).await {
                    let sql = format!("drop database if exists {name} with (force)");
                    let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .execute(&mut conn)
                        .await;
                    let _ = conn.close().await;
                }
            });
        })
        .join();
    }
}

/// Settings for tests: a temp data dir, everything else default.
/// The real agent CLI named by the environment variable `var` (`.ci/run` installs and sets
/// them). `None` (the test skips) outside CI when it is missing; in CI (`CI` set) a missing
/// CLI fails the test.
pub fn real_cli(var: &str) -> Option<PathBuf> {
    match std::env::var(var) {
        Ok(b) if std::path::Path::new(&b).exists() => Some(PathBuf::from(b)),
        _ if std::env::var_os("CI").is_some() => panic!("{var} must name the agent CLI in CI"),
        _ => {
            eprintln!("skipping: set {var} to the agent CLI to run this test");
            None
        }
    }
}

pub fn test_settings(data_dir: &std::path::Path) -> Settings {
    Settings {
        data_dir: data_dir.to_path_buf(),
        ..Settings::default()
    }
}

/// The app on `127.0.0.1:<random>`, with an admin key of the default tenant.
pub struct TestApp {
    pub addr: SocketAddr,
    pub client: reqwest::Client,
    pub db: TestDb,
    pub admin_key: String,
    pub settings: Arc<Settings>,
    pub shutdown: Shutdown,
    /// The worker started with the app, if any.
    pub worker: Option<TestWorker>,
    _dir: tempfile::TempDir,
}

/// A worker started by a test; stopped (and its agents with it) when dropped.
pub struct TestWorker {
    pub worker: Arc<hotplex::worker::Worker>,
    shutdown: Shutdown,
}

impl TestWorker {
    /// Stops the worker as SIGTERM would and waits until it has stopped.
    pub async fn stop(self) {
        self.shutdown.token.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(30), self.worker.stopped())
            .await
            .expect("the worker did not stop within 30 s");
    }
}

impl Drop for TestWorker {
    fn drop(&mut self) {
        self.shutdown.token.cancel();
    }
}

impl TestApp {
    pub async fn spawn() -> Self {
        Self::spawn_with(|_| {}, AuthMode::Keys).await
    }

    /// The app plus a worker whose agent is the real Claude Code CLI (`HOTPLEX_TEST_CLAUDE`,
    /// installed by `.ci/run`) talking to `mock_url`. `None` when no CLI is available outside
    /// CI; in CI (`CI` set) a missing CLI fails the test.
    pub async fn spawn_with_real_claude(mock_url: &str) -> Option<Self> {
        let bin = real_cli("HOTPLEX_TEST_CLAUDE")?;
        let mock = mock_url.to_owned();
        let mut app = Self::spawn_with(
            move |s| {
                let c = &mut s.providers.claude_code;
                c.binary = bin;
                for (k, v) in [
                    ("ANTHROPIC_BASE_URL", mock.as_str()),
                    ("ANTHROPIC_API_KEY", "test"),
                    ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
                    ("DISABLE_TELEMETRY", "1"),
                    ("DISABLE_AUTOUPDATER", "1"),
                ] {
                    c.env.insert(k.into(), v.into());
                }
            },
            AuthMode::Keys,
        )
        .await;
        app.worker = Some(app.start_worker().await);
        Some(app)
    }

    /// The app plus a worker whose OpenCode provider is the real OpenCode CLI
    /// (`HOTPLEX_TEST_OPENCODE`) configured for the mock chat-completions API at `mock_url`,
    /// fully offline. `None` when no CLI is available outside CI; in CI it fails the test.
    pub async fn spawn_with_real_opencode(mock_url: &str) -> Option<Self> {
        let bin = real_cli("HOTPLEX_TEST_OPENCODE")?;
        let config = serde_json::json!({
            "provider": {"mock": {"npm": "@ai-sdk/openai-compatible", "name": "Mock",
                "options": {"baseURL": format!("{mock_url}/v1"), "apiKey": "x"},
                "models": {"mock-model": {"name": "Mock Model", "limit": {"context": 128000, "output": 4096}}}}},
            "model": "mock/mock-model", "small_model": "mock/mock-model",
            "autoupdate": false, "share": "disabled",
        });
        let mut app = Self::spawn_with(
            move |s| {
                let o = &mut s.providers.opencode;
                o.binary = bin;
                o.env
                    .insert("OPENCODE_CONFIG_CONTENT".into(), config.to_string());
                // Offline: no model catalogue, plugins or LSP downloads, no registry.
                for k in [
                    "OPENCODE_DISABLE_MODELS_FETCH",
                    "OPENCODE_DISABLE_DEFAULT_PLUGINS",
                    "OPENCODE_DISABLE_LSP_DOWNLOAD",
                    "OPENCODE_DISABLE_SHARE",
                    "OPENCODE_DISABLE_CLAUDE_CODE",
                ] {
                    o.env.insert(k.into(), "1".into());
                }
                o.env
                    .insert("npm_config_registry".into(), "http://127.0.0.1:9/".into());
            },
            AuthMode::Keys,
        )
        .await;
        app.worker = Some(app.start_worker().await);
        Some(app)
    }

    /// Starts a worker on this app's database and settings, stopped on its own.
    pub async fn start_worker(&self) -> TestWorker {
        let shutdown = Shutdown::new();
        let worker =
            hotplex::worker::Worker::start(self.db.pool.clone(), self.settings.clone(), &shutdown)
                .await
                .expect("worker");
        TestWorker { worker, shutdown }
    }

    /// Starts a worker on this app's database with settings of its own: `configure` changes
    /// a copy of the app's (another agent `HOME` and work root stand for another host).
    pub async fn start_worker_with(&self, configure: impl FnOnce(&mut Settings)) -> TestWorker {
        let mut settings = (*self.settings).clone();
        configure(&mut settings);
        let shutdown = Shutdown::new();
        let worker =
            hotplex::worker::Worker::start(self.db.pool.clone(), Arc::new(settings), &shutdown)
                .await
                .expect("worker");
        TestWorker { worker, shutdown }
    }

    /// The app plus a worker in the same process, running the fake agent.
    pub async fn spawn_with_worker(configure: impl FnOnce(&mut Settings)) -> Self {
        let mut app = Self::spawn_with_fake_agent(configure).await;
        app.worker = Some(app.start_worker().await);
        app
    }

    /// The app configured for the fake agent, with no worker yet (see [`Self::start_worker`]).
    pub async fn spawn_with_fake_agent(configure: impl FnOnce(&mut Settings)) -> Self {
        Self::spawn_with(
            |s| {
                let script = s.data_dir.join("fake-claude");
                let text = format!(
                    "#!/bin/sh\nexec '{}' fake-agent \"$@\"\n",
                    hotplex_bin().display()
                );
                std::fs::create_dir_all(&s.data_dir).expect("data dir");
                std::fs::write(&script, text).expect("script");
                std::fs::set_permissions(
                    &script,
                    std::os::unix::fs::PermissionsExt::from_mode(0o755),
                )
                .expect("chmod");
                s.providers.claude_code.binary = script;
                configure(s);
            },
            AuthMode::Keys,
        )
        .await
    }

    pub async fn spawn_with(configure: impl FnOnce(&mut Settings), auth: AuthMode) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut settings = test_settings(dir.path());
        configure(&mut settings);
        let settings = Arc::new(settings);
        let db = TestDb::new().await;
        let admin_key = create_key(&db.pool, "default", Role::Admin).await;
        let shutdown = Shutdown::new();
        let state = AppState::start(db.pool.clone(), settings.clone(), auth, &shutdown);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding");
        let addr = listener.local_addr().expect("local addr");
        let token = shutdown.token.clone();
        let router = api::router(state);
        shutdown.tracker.spawn(async move {
            let _ = axum::serve(listener, router.into_make_service())
                .with_graceful_shutdown(token.cancelled_owned())
                .await;
        });
        Self {
            addr,
            client: reqwest::Client::new(),
            db,
            admin_key,
            settings,
            shutdown,
            worker: None,
            _dir: dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn get(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.get(self.url(path)).bearer_auth(key)
    }

    pub fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(key)
    }

    pub fn delete(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.delete(self.url(path)).bearer_auth(key)
    }

    /// `GET path` with the admin key; the body as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.get(path, &self.admin_key)
            .send()
            .await
            .expect("request")
            .json()
            .await
            .expect("JSON body")
    }

    /// Polls a turn until it has ended (at most `within`); the turn.
    pub async fn ended_turn(
        &self,
        turn_id: &str,
        within: std::time::Duration,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let t = self.get_json(&format!("/v1/turns/{turn_id}")).await;
            if !matches!(t["status"].as_str(), Some("queued" | "running")) {
                return t;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the turn did not end within {within:?}: {t}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Creates a default session with `key`; returns its id.
    pub async fn new_session(&self, key: &str) -> String {
        let response = self
            .post("/v1/sessions", key)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("request");
        let body: serde_json::Value = response.json().await.expect("JSON body");
        body["id"].as_str().expect("session id").to_owned()
    }

    /// A user key of `tenant` (created if missing).
    pub async fn user_key(&self, tenant: &str) -> String {
        create_key(&self.db.pool, tenant, Role::User).await
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.token.cancel();
    }
}

pub async fn create_key(pool: &PgPool, tenant: &str, role: Role) -> String {
    let tenant =
        store::tenants::get_or_create(pool, &TenantName::parse(tenant).expect("tenant name"))
            .await
            .expect("tenant");
    let secret = generate_key();
    let (prefix, hash) = (display_prefix(&secret), hash_key(&secret));
    store::keys::insert(
        pool,
        store::keys::NewKey {
            tenant_id: tenant.tenant_id,
            name: "test",
            role,
            prefix: &prefix,
            hash: &hash,
        },
    )
    .await
    .expect("key");
    secret
}

/// Asserts the error envelope and returns its code.
pub async fn assert_envelope(response: reqwest::Response, status: u16) -> (String, String) {
    let actual = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.expect("body");
    assert_eq!(actual, status, "unexpected status; body: {text}");
    assert!(
        content_type.starts_with("application/json"),
        "content-type {content_type:?}"
    );
    let body: serde_json::Value = serde_json::from_str(&text).expect("JSON body");
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.code in {body}"))
        .to_owned();
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("no error.message in {body}"))
        .to_owned();
    assert_eq!(
        body.as_object().map(|o| o.len()),
        Some(1),
        "envelope has extra keys: {body}"
    );
    (code, message)
}

/// The hotplex binary built for these tests.
pub fn hotplex_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hotplex"))
}

/// A session body without the fields only `GET /v1/sessions/{id}` fills (`process`, `usage`).
pub fn without_live_fields(mut v: serde_json::Value) -> serde_json::Value {
    if let Some(o) = v.as_object_mut() {
        o.remove("process");
        o.remove("usage");
    }
    v
}

/// One server-sent event: its `id:`, `event:` and parsed `data:`.
#[derive(Debug, Clone)]
pub struct SseEvent {
    pub id: i64,
    pub event: String,
    pub data: serde_json::Value,
}

impl SseEvent {
    /// An event frame with an id, a name and JSON data; `None` for anything else.
    pub fn from_frame(frame: hotplex::sse::Frame) -> Option<Self> {
        Some(Self {
            id: frame.id.as_deref()?.parse().ok()?,
            data: serde_json::from_str(&frame.data).ok()?,
            event: frame.event?,
        })
    }
}

/// Reads an SSE response event by event.
pub struct Sse {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    parser: hotplex::sse::Parser,
    ready: std::collections::VecDeque<SseEvent>,
}

impl Sse {
    /// Checks the status and content type, then reads.
    pub fn new(response: reqwest::Response) -> Self {
        assert_eq!(response.status(), 200);
        let content_type = response.headers()["content-type"].to_str().unwrap_or("");
        assert!(
            content_type.starts_with("text/event-stream"),
            "{content_type}"
        );
        use futures::StreamExt;
        Self {
            stream: Box::pin(response.bytes_stream().map(|r| r.map(|b| b.to_vec()))),
            parser: hotplex::sse::Parser::new(),
            ready: std::collections::VecDeque::new(),
        }
    }

    /// The next event (comments and keep-alives skipped); panics after `within`.
    pub async fn next(&mut self, within: std::time::Duration) -> SseEvent {
        use futures::StreamExt;
        tokio::time::timeout(within, async {
            loop {
                if let Some(ev) = self.ready.pop_front() {
                    return ev;
                }
                let chunk = self
                    .stream
                    .next()
                    .await
                    .expect("the event stream ended")
                    .expect("reading the event stream");
                self.ready.extend(
                    self.parser
                        .push(&chunk)
                        .into_iter()
                        .filter_map(SseEvent::from_frame),
                );
            }
        })
        .await
        .expect("no event arrived in time")
    }
    /// The next `n` events.
    pub async fn take(&mut self, n: usize, within: std::time::Duration) -> Vec<SseEvent> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(self.next(within).await);
        }
        out
    }

    /// Events up to and including the first one `stop` accepts.
    pub async fn until(
        &mut self,
        within: std::time::Duration,
        mut stop: impl FnMut(&SseEvent) -> bool,
    ) -> Vec<SseEvent> {
        let mut out = Vec::new();
        loop {
            let ev = self.next(within).await;
            let done = stop(&ev);
            out.push(ev);
            if done {
                return out;
            }
        }
    }
}
