//! The stack a scenario measures: a fresh database on the local PostgreSQL (or a private
//! embedded cluster), and `hotplex up` or `hotplex serve` as a child process, so the
//! server's memory is its own and the client's work does not share its runtime.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, bail};
use futures::StreamExt;
use hotplex::embedded_pg::{self, EmbeddedPg};
use serde_json::{Value, json};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgConnection};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The key every bench stack installs as its admin key.
pub const KEY: &str = "hpx_bench-key-0000000000000000000000";

/// Where bench databases are created.
pub struct Server {
    admin: PgConnectOptions,
    url_template: String,
    /// "127.0.0.1:5432" or "embedded", for the report.
    pub label: String,
    _embedded: Option<(EmbeddedPg, tempfile::TempDir)>,
}

impl Server {
    /// `DATABASE_URL`, else the local server on 127.0.0.1:5432, else an embedded cluster.
    pub async fn find() -> anyhow::Result<Self> {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let admin = PgConnectOptions::from_str(&url)?;
        if PgConnection::connect_with(&admin).await.is_ok() {
            let base = url.split('?').next().unwrap_or(&url);
            let cut = base.rfind('/').filter(|i| *i > "postgres://".len());
            let template = match cut {
                Some(i) => format!("{}/{{db}}", &base[..i]),
                None => format!("{base}/{{db}}"),
            };
            return Ok(Self {
                label: format!("{}:{}", admin.get_host(), admin.get_port()),
                admin,
                url_template: template,
                _embedded: None,
            });
        }
        let dir = tempfile::tempdir()?;
        let pg = EmbeddedPg::start(embedded_pg::Options {
            data_dir: dir.path().to_path_buf(),
            bin_dir: None,
            run_as: None,
            ephemeral: true,
        })
        .await
        .context("no PostgreSQL at DATABASE_URL or 127.0.0.1:5432, and no embedded one")?;
        Ok(Self {
            admin: pg.connect_options_for("postgres"),
            url_template: pg.url("{db}"),
            label: "embedded".into(),
            _embedded: Some((pg, dir)),
        })
    }

    /// A new empty database; its URL and a small pool on it.
    pub async fn fresh(&self) -> anyhow::Result<(String, String, PgPool)> {
        let name = format!("hotplex_bench_{}", uuid::Uuid::new_v4().simple());
        let mut conn = PgConnection::connect_with(&self.admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("create database {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .connect_with(
                self.admin
                    .clone()
                    .database(&name)
                    .log_statements(tracing::log::LevelFilter::Off),
            )
            .await?;
        Ok((name.clone(), self.url_template.replace("{db}", &name), pool))
    }

    pub async fn drop_db(&self, name: &str) {
        if let Ok(mut conn) = PgConnection::connect_with(&self.admin).await {
            let sql = format!("drop database if exists {name} with (force)");
            let _ = sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await;
            let _ = conn.close().await;
        }
    }
}

/// What a stack runs.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `serve` (API only) instead of `up` (API and worker).
    pub api_only: bool,
    /// The agent binary; the fake agent by default.
    pub agent: Option<PathBuf>,
    /// Arguments for the fake agent (`--fake-deltas`, …).
    pub fake_args: Vec<String>,
    /// Extra `HOTPLEX_*` environment.
    pub env: Vec<(String, String)>,
}

/// A running hotplex with its own database.
pub struct Stack {
    pub base: String,
    pub pool: PgPool,
    pub client: reqwest::Client,
    child: Child,
    db: String,
    _dir: tempfile::TempDir,
}

impl Stack {
    pub async fn start(server: &Server, options: Options) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let (db, url, pool) = server.fresh().await?;
        let agent = match &options.agent {
            Some(a) => a.clone(),
            None => fake_agent_script(dir.path(), &options.fake_args)?,
        };
        let mut cmd = Command::new(hotplex_bin());
        let verb = if options.api_only { "serve" } else { "up" };
        cmd.args([verb, "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.path().join("data"))
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", dir.path())
            .env("DATABASE_URL", &url)
            .env("HOTPLEX_BOOTSTRAP_KEY", KEY)
            .env("HOTPLEX_LOG_LEVEL", "warn")
            .env("HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY", &agent)
            .envs(options.env.iter().map(|(k, v)| (k, v)))
            // Allocator knobs of the bench run reach the server (to compare allocators).
            .envs(std::env::vars().filter(|(k, _)| k.starts_with("MALLOC_") || k == "LD_PRELOAD"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.path().join("server.log"))?)
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("starting hotplex")?;
        let stdout = child.stdout.take().context("stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let base = tokio::time::timeout(Duration::from_secs(60), async {
            while let Some(line) = lines.next_line().await? {
                if let Some(url) = line.strip_prefix("hotplex listening on ") {
                    return Ok(url.to_owned());
                }
            }
            bail!("hotplex exited before listening")
        })
        .await
        .context("hotplex did not start within 60 s")??;
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(usize::MAX)
            .build()?;
        Ok(Self {
            base,
            pool,
            client,
            child,
            db,
            _dir: dir,
        })
    }

    /// Stops the server (SIGTERM, then waits) and drops its database.
    pub async fn stop(mut self, server: &Server) {
        if let Some(pid) = self.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await;
        let _ = self.child.kill().await;
        self.pool.close().await;
        server.drop_db(&self.db).await;
    }

    /// The server's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        self.child.id().map(rss_kib).unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn new_session(&self) -> anyhow::Result<String> {
        let body: Value = self
            .client
            .post(self.url("/v1/sessions"))
            .bearer_auth(KEY)
            .json(&json!({}))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        body["id"]
            .as_str()
            .map(str::to_owned)
            .context("no session id")
    }

    /// Posts a prompt; with `wait`, returns the ended turn.
    pub async fn turn(&self, sid: &str, prompt: &str, wait: bool) -> anyhow::Result<Value> {
        let q = if wait { "?wait=true&timeout=120" } else { "" };
        let response = self
            .client
            .post(self.url(&format!("/v1/sessions/{sid}/turns{q}")))
            .bearer_auth(KEY)
            .json(&json!({ "prompt": prompt }))
            .send()
            .await?
            .error_for_status()?;
        let turn: Value = response.json().await?;
        if wait && turn["status"] != "completed" {
            bail!("turn did not complete: {turn}");
        }
        Ok(turn)
    }

    /// Opens the event stream of a session after `after`.
    pub async fn events(&self, sid: &str, after: i64) -> anyhow::Result<Events> {
        let response = self
            .client
            .get(self.url(&format!("/v1/sessions/{sid}/events?after={after}")))
            .bearer_auth(KEY)
            .send()
            .await?
            .error_for_status()?;
        Ok(Events::new(response))
    }

    /// The last event seq of a session.
    pub async fn last_seq(&self, sid: &str) -> anyhow::Result<i64> {
        let seq: Option<i64> =
            sqlx::query_scalar("select max(seq) from session_events where session_id = $1::uuid")
                .bind(sid)
                .fetch_one(&self.pool)
                .await?;
        Ok(seq.unwrap_or(0))
    }
}

/// One event of a stream.
#[derive(Debug)]
pub struct Event {
    pub kind: String,
    pub data: Value,
}

/// An open SSE stream.
pub struct Events {
    stream: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<Vec<u8>>> + Send>>,
    parser: hotplex::sse::Parser,
    ready: std::collections::VecDeque<Event>,
}

impl Events {
    fn new(response: reqwest::Response) -> Self {
        Self {
            stream: Box::pin(response.bytes_stream().map(|r| r.map(|b| b.to_vec()))),
            parser: hotplex::sse::Parser::new(),
            ready: std::collections::VecDeque::new(),
        }
    }

    pub async fn next(&mut self) -> anyhow::Result<Event> {
        loop {
            if let Some(ev) = self.ready.pop_front() {
                return Ok(ev);
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.stream.next())
                .await
                .context("no event within 60 s")?
                .context("the event stream ended")??;
            for frame in self.parser.push(&chunk) {
                self.ready.push_back(Event {
                    kind: frame.event.unwrap_or_default(),
                    data: serde_json::from_str(&frame.data).unwrap_or(Value::Null),
                });
            }
        }
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

pub fn hotplex_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hotplex"))
}

/// A script that runs `hotplex fake-agent` with `args` (the worker appends the CLI's flags).
pub fn fake_agent_script(dir: &Path, args: &[String]) -> anyhow::Result<PathBuf> {
    let path = dir.join("fake-claude");
    let extra: String = args.iter().map(|a| format!(" '{a}'")).collect();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\nexec '{}' fake-agent{extra} \"$@\"\n",
            hotplex_bin().display()
        ),
    )?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    Ok(path)
}
