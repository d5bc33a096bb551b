//! A private PostgreSQL cluster run from the machine's own PostgreSQL binaries: the database
//! of `hotplex up` when no `DATABASE_URL` is given, and of the test suite where no server
//! is configured.
//!
//! Layout under the cluster directory (normally `<data_dir>/pg`):
//! `data/` (PGDATA), `run/` (the Unix socket; no TCP port is opened), `postgres.log`, and
//! `hotplex.lock`, an exclusive `flock` held by the hotplex process that owns the cluster.
//!
//! `initdb` and `postgres` refuse to run as root, so as root they run as an unprivileged
//! user (`postgres` when it exists, else `nobody`) through `Command::uid`/`gid`. That user
//! must be able to traverse to the cluster; root's home usually is not traversable, so
//! then the cluster moves to `/var/lib/hotplex/pg-<hash of data_dir>` and we say so.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use nix::sys::signal::{Signal, kill};
use nix::unistd::{Pid, User, geteuid};
use sha2::{Digest, Sha256};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection};

/// Superuser and database created in the cluster.
const DB_USER: &str = "hotplex";
const DB_NAME: &str = "hotplex";
/// Port number in the socket's file name; nothing listens on TCP.
const SOCKET_PORT: u16 = 5432;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_SOCKET_PATH: usize = 107;
const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "PostgreSQL server binaries (initdb, postgres) were not found on PATH, through \
         `pg_config --bindir`, or in /usr/lib/postgresql/*/bin. Install PostgreSQL \
         (e.g. `apt-get install postgresql`), set `embedded.bin_dir`, or set DATABASE_URL \
         to use an existing server"
    )]
    BinariesNotFound,
    #[error(
        "running as root, but no unprivileged user `{0}` exists to run PostgreSQL; create \
         it, set `embedded.run_as`, or set DATABASE_URL"
    )]
    NoUser(String),
    #[error("the cluster at {0} is in use by another hotplex process")]
    InUse(PathBuf),
    #[error("{what} failed: {detail}")]
    Command { what: String, detail: String },
    #[error("PostgreSQL did not become ready within {secs} s; see {log}")]
    StartTimeout { secs: u64, log: PathBuf },
    #[error("PostgreSQL exited during start-up ({status}); last log lines:\n{tail}")]
    Exited { status: String, tail: String },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

type Result<T, E = Error> = std::result::Result<T, E>;

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
    let context = context.into();
    move |source| Error::Io { context, source }
}

/// How to run the cluster.
#[derive(Debug, Clone)]
pub struct Options {
    /// hotplex's data dir; the cluster goes to `<data_dir>/pg` when reachable.
    pub data_dir: PathBuf,
    /// Directory of `initdb`/`postgres`, if configured.
    pub bin_dir: Option<PathBuf>,
    /// The unprivileged user to run as when we are root.
    pub run_as: Option<String>,
    /// Trade durability for speed (test clusters): no fsync.
    pub ephemeral: bool,
}

/// The PostgreSQL executables used.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub initdb: PathBuf,
    pub postgres: PathBuf,
}

/// Finds `initdb` and `postgres`: configured dir, `PATH`, `pg_config --bindir`, then the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn find_binaries(bin_dir: Option<&Path>) -> Result<Binaries> {
    let in_dir = |dir: &Path| {
        let (initdb, postgres) = (dir.join("initdb"), dir.join("postgres"));
        (is_executable(&initdb) && is_executable(&postgres))
            .then_some(Binaries { initdb, postgres })
    };
    if let Some(dir) = bin_dir {
        return in_dir(dir).ok_or(Error::BinariesNotFound);
    }
    // PATH is read here rather than in config: it is the OS's search path, not a setting.
    if let Some(path) = std::env::var_os("PATH") {
        let found = std::env::split_paths(&path).find_map(|dir| in_dir(&dir));
        if let Some(b) = found {
            return Ok(b);
        }
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if let Some(b) = in_dir(&dir) {
            return Ok(b);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions
        .iter()
        .rev()
        .find_map(|(_, dir)| in_dir(dir))
        .ok_or(Error::BinariesNotFound)
}

fn is_executable(p: &Path) -> bool {
    fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The user PostgreSQL runs as, when that differs from ours.
#[derive(Debug, Clone)]
struct RunAs {
    name: String,
    uid: u32,
    gid: u32,
}

fn resolve_run_as(configured: Option<&str>) -> Result<Option<RunAs>> {
    if !geteuid().is_root() {
        return Ok(None);
    }
    let candidates: Vec<&str> = match configured {
        Some(name) => vec![name],
        None => vec!["postgres", "nobody"],
    };
    for name in &candidates {
        if let Ok(Some(user)) = User::from_name(name) {
            if user.uid.is_root() {
                continue;
            }
            return Ok(Some(RunAs {
                name: user.name,
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }));
        }
    }
    Err(Error::NoUser(candidates.join("` or `")))
}

/// Paths of one cluster.
#[derive(Debug, Clone)]
pub struct Layout {
    pub base: PathBuf,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub log_file: PathBuf,
    lock_file: PathBuf,
}

fn short_hash(p: &Path) -> String {
    let digest = Sha256::digest(p.as_os_str().as_encoded_bytes());
    hex::encode(&digest[..8])
}

/// Whether `uid`/`gid` may traverse every ancestor of `path` (mode bits; ACLs ignored).
fn traversable(path: &Path, run_as: &RunAs) -> bool {
    let mut cur = Some(path);
    while let Some(p) = cur {
        if let Ok(m) = fs::metadata(p) {
            let mode = m.permissions().mode();
            let bit = if m.uid() == run_as.uid {
                0o100
            } else if m.gid() == run_as.gid {
                0o010
            } else {
                0o001
            };
            if mode & bit == 0 {
                return false;
            }
        }
        cur = p.parent();
    }
    true
}

fn layout_for(data_dir: &Path, run_as: Option<&RunAs>) -> Result<Layout> {
    let data_dir = if data_dir.is_absolute() {
        data_dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(io("current directory"))?
            .join(data_dir)
    };
    let mut base = data_dir.join("pg");
    if let Some(user) = run_as {
        let probe = base
            .ancestors()
            .find(|p| p.exists())
            .unwrap_or(Path::new("/"));
        if !traversable(probe, user) {
            let moved =
                PathBuf::from("/var/lib/hotplex").join(format!("pg-{}", short_hash(&data_dir)));
            tracing::warn!(
                data_dir = %data_dir.display(),
                cluster = %moved.display(),
                user = %user.name,
                "the data dir is not reachable by the PostgreSQL user; keeping the cluster elsewhere"
            );
            base = moved;
        }
    }
    let mut socket_dir = base.join("run");
    if socket_dir
        .join(format!(".s.PGSQL.{SOCKET_PORT}"))
        .as_os_str()
        .len()
        > MAX_SOCKET_PATH
    {
        socket_dir = std::env::temp_dir().join(format!("hotplex-pg-{}", short_hash(&base)));
    }
    Ok(Layout {
        data: base.join("data"),
        log_file: base.join("postgres.log"),
        lock_file: base.join("hotplex.lock"),
        socket_dir,
        base,
    })
}

/// Creates `dir` (mode 0700) owned by the PostgreSQL user.
fn private_dir(dir: &Path, run_as: Option<&RunAs>) -> Result<()> {
    fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
    if let Some(user) = run_as {
        let meta = fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
        if meta.uid() != user.uid {
            std::os::unix::fs::chown(dir, Some(user.uid), Some(user.gid)).map_err(io(format!(
                "handing {} to {}",
                dir.display(),
                user.name
            )))?;
        }
    } else {
        let meta = fs::metadata(dir).map_err(io(format!("reading {}", dir.display())))?;
        if meta.uid() != geteuid().as_raw() {
            return Err(Error::Command {
                what: format!("using {}", dir.display()),
                detail: "it belongs to another user".into(),
            });
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(io(format!("restricting {}", dir.display())))
}

fn command(program: &Path, run_as: Option<&RunAs>, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd).stdin(Stdio::null()).env("LC_ALL", "C");
    for var in [
        "PGDATA",
        "PGHOST",
        "PGPORT",
        "PGUSER",
        "PGDATABASE",
        "PGPASSWORD",
    ] {
        cmd.env_remove(var);
    }
    if let Some(user) = run_as {
        cmd.uid(user.uid).gid(user.gid);
    }
    cmd
}

/// A running cluster, owned (we started it and stop it) or attached (another hotplex
/// process owns it; we only connect).
pub struct EmbeddedPg {
    layout: Layout,
    child: Option<Child>,
    // Held for as long as we own the cluster; released on drop.
    _lock: Option<Flock<File>>,
}

impl std::fmt::Debug for EmbeddedPg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedPg")
            .field("layout", &self.layout)
            .field("pid", &self.child.as_ref().map(Child::id))
            .finish()
    }
}

impl EmbeddedPg {
    /// Starts the cluster (creating it on first use) and owns it until [`stop`].
    /// Fails when another hotplex process owns it.
    ///
    /// [`stop`]: EmbeddedPg::stop
    pub async fn start(opts: Options) -> Result<Self> {
        Self::start_inner(opts, false).await
    }

    /// Like [`start`](EmbeddedPg::start), but when another hotplex process already runs
    /// the cluster, connects to it instead (for management commands).
    pub async fn start_or_attach(opts: Options) -> Result<Self> {
        Self::start_inner(opts, true).await
    }

    async fn start_inner(opts: Options, attach: bool) -> Result<Self> {
        let bins = find_binaries(opts.bin_dir.as_deref())?;
        let run_as = resolve_run_as(opts.run_as.as_deref())?;
        let layout = layout_for(&opts.data_dir, run_as.as_ref())?;
        if let Some(parent) = layout.base.parent() {
            fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
        }
        private_dir(&layout.base, run_as.as_ref())?;

        let lock_file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&layout.lock_file)
            .map_err(io(format!("opening {}", layout.lock_file.display())))?;
        let lock = match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => lock,
            Err((_, Errno::EWOULDBLOCK)) if attach => {
                tracing::info!(cluster = %layout.base.display(), "attaching to the running embedded PostgreSQL");
                return Ok(Self {
                    layout,
                    child: None,
                    _lock: None,
                });
            }
            Err((_, Errno::EWOULDBLOCK)) => return Err(Error::InUse(layout.base)),
            Err((_, e)) => {
                return Err(Error::Io {
                    context: format!("locking {}", layout.lock_file.display()),
                    source: e.into(),
                });
            }
        };

        stop_orphan(&layout.data).await;
        private_dir(&layout.socket_dir, run_as.as_ref())?;
        if !layout.data.join("PG_VERSION").is_file() {
            initdb(&bins, &layout, run_as.as_ref(), opts.ephemeral).await?;
        }

        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&layout.log_file)
            .map_err(io(format!("opening {}", layout.log_file.display())))?;
        let log_err = log.try_clone().map_err(io("duplicating the log handle"))?;
        let mut cmd = command(&bins.postgres, run_as.as_ref(), &layout.base);
        cmd.arg("-D")
            .arg(&layout.data)
            .arg("-k")
            .arg(&layout.socket_dir)
            .args([
                "-p",
                &SOCKET_PORT.to_string(),
                "-c",
                "listen_addresses=",
                "-c",
                "max_connections=300",
            ])
            .stdout(log)
            .stderr(log_err)
            // Its own process group: a terminal's Ctrl-C reaches hotplex only, which then
            // drains requests before it stops the database.
            .process_group(0);
        if opts.ephemeral {
            cmd.args([
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ]);
        }
        let child = cmd
            .spawn()
            .map_err(io(format!("starting {}", bins.postgres.display())))?;
        let mut pg = Self {
            layout,
            child: Some(child),
            _lock: Some(lock),
        };
        tracing::info!(
            cluster = %pg.layout.base.display(),
            pid = pg.pid(),
            user = run_as.as_ref().map(|u| u.name.as_str()).unwrap_or("(current)"),
            "embedded PostgreSQL starting"
        );
        if let Err(e) = pg.wait_ready().await {
            pg.stop().await;
            return Err(e);
        }
        pg.ensure_database().await?;
        Ok(pg)
    }

    /// PID of the postmaster we started (`None` when attached).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Where the cluster lives.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Options to connect to the hotplex database.
    pub fn connect_options(&self) -> PgConnectOptions {
        self.connect_options_for(DB_NAME)
    }

    /// Options to connect to another database of the cluster.
    pub fn connect_options_for(&self, database: &str) -> PgConnectOptions {
        PgConnectOptions::new()
            .host(&self.layout.socket_dir.to_string_lossy())
            .port(SOCKET_PORT)
            .username(DB_USER)
            .database(database)
            .log_statements(tracing::log::LevelFilter::Off)
    }

    /// A URL for the cluster (socket host in the query string).
    pub fn url(&self, database: &str) -> String {
        let host: String = self
            .layout
            .socket_dir
            .to_string_lossy()
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        format!("postgres://{DB_USER}@localhost:{SOCKET_PORT}/{database}?host={host}")
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(Error::Exited {
                    status: status.to_string(),
                    tail: tail(&self.layout.log_file),
                });
            }
            let opts = self.connect_options_for("postgres");
            if let Ok(conn) = opts.connect().await {
                let _ = conn.close().await;
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(Error::StartTimeout {
                    secs: START_TIMEOUT.as_secs(),
                    log: self.layout.log_file.clone(),
                });
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn ensure_database(&self) -> Result<()> {
        let mut conn = self.connect_options_for("postgres").connect().await?;
        let exists: bool =
            sqlx::query_scalar("select exists (select 1 from pg_database where datname = $1)")
                .bind(DB_NAME)
                .fetch_one(&mut conn)
                .await?;
        if !exists {
            sqlx::query(sqlx::AssertSqlSafe(format!("create database {DB_NAME}")))
                .execute(&mut conn)
                .await?;
        }
        conn.close().await?;
        Ok(())
    }

    /// Stops the cluster if we own it: fast shutdown (SIGINT), then SIGQUIT, then SIGKILL.
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut escalated = false;
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) => {}
            }
            if Instant::now() > deadline {
                if escalated {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tracing::warn!("embedded PostgreSQL did not stop in time; forcing it");
                let _ = kill(pid, Signal::SIGQUIT);
                escalated = true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        tracing::info!(cluster = %self.layout.base.display(), "embedded PostgreSQL stopped");
    }
}

impl Drop for EmbeddedPg {
    fn drop(&mut self) {
        // Backstop for paths that skip `stop` (a panic): ask for a fast shutdown at least.
        if let Some(child) = &self.child {
            let _ = kill(Pid::from_raw(child.id() as i32), Signal::SIGINT);
        }
    }
}

async fn initdb(
    bins: &Binaries,
    layout: &Layout,
    run_as: Option<&RunAs>,
    ephemeral: bool,
) -> Result<()> {
    tracing::info!(data = %layout.data.display(), "creating the embedded PostgreSQL cluster");
    let mut cmd = command(&bins.initdb, run_as, &layout.base);
    cmd.arg("-D").arg(&layout.data).args([
        "-U",
        DB_USER,
        "--auth=trust",
        "--encoding=UTF8",
        "--locale=C",
        "--no-instructions",
    ]);
    if ephemeral {
        cmd.arg("--no-sync");
    }
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .map_err(|e| Error::Command {
            what: "initdb".into(),
            detail: e.to_string(),
        })?
        .map_err(io(format!("running {}", bins.initdb.display())))?;
    if !out.status.success() {
        // A half-made cluster would block the next attempt; remove it.
        let _ = fs::remove_dir_all(&layout.data);
        return Err(Error::Command {
            what: "initdb".into(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A postmaster left running by a hotplex that died without stopping it (we hold the lock,
/// so it is nobody's): shut it down before starting our own.
async fn stop_orphan(data: &Path) {
    let Ok(text) = fs::read_to_string(data.join("postmaster.pid")) else {
        return;
    };
    let Some(pid) = text
        .lines()
        .next()
        .and_then(|l| l.trim().parse::<i32>().ok())
    else {
        return;
    };
    let pid = Pid::from_raw(pid);
    if kill(pid, None).is_err() {
        return;
    }
    tracing::warn!(
        pid = pid.as_raw(),
        "stopping an orphaned embedded PostgreSQL"
    );
    let _ = kill(pid, Signal::SIGINT);
    let deadline = Instant::now() + STOP_TIMEOUT;
    while kill(pid, None).is_ok() {
        if Instant::now() > deadline {
            let _ = kill(pid, Signal::SIGQUIT);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn tail(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_data_dirs_get_a_short_socket_dir() {
        let long = PathBuf::from("/tmp").join("x".repeat(120));
        let layout = layout_for(&long, None).unwrap();
        assert!(layout.socket_dir.join(".s.PGSQL.5432").as_os_str().len() <= MAX_SOCKET_PATH);
        let short = layout_for(Path::new("/tmp/hp"), None).unwrap();
        assert_eq!(short.socket_dir, PathBuf::from("/tmp/hp/pg/run"));
        assert_eq!(short.data, PathBuf::from("/tmp/hp/pg/data"));
    }

    #[test]
    fn unreachable_data_dirs_move_for_the_postgres_user() {
        let dir = tempfile::tempdir().unwrap();
        let closed = dir.path().join("closed");
        fs::create_dir(&closed).unwrap();
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o700)).unwrap();
        // A user that owns nothing here cannot traverse a 0700 directory.
        let other = RunAs {
            name: "other".into(),
            uid: 65_000,
            gid: 65_000,
        };
        assert!(!traversable(&closed, &other));
        let layout = layout_for(&closed.join("hotplex"), Some(&other)).unwrap();
        assert!(layout.base.starts_with("/var/lib/hotplex"), "{layout:?}");
        fs::set_permissions(&closed, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(traversable(&closed, &other));
    }

    #[test]
    fn urls_escape_the_socket_dir() {
        let pg = EmbeddedPg {
            layout: layout_for(Path::new("/tmp/a b"), None).unwrap(),
            child: None,
            _lock: None,
        };
        assert_eq!(
            pg.url("db"),
            "postgres://hotplex@localhost:5432/db?host=/tmp/a%20b/pg/run"
        );
    }
}
