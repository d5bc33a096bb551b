//! The binary as an operator runs it: `up` on the embedded database across restarts,
//! `serve` beside separate `worker` processes, `serve`'s refusals, `keys` and `config
//! validate`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{TestDb, create_key, hotplex_bin, without_live_fields};

/// The binary with a clean environment: nothing of the developer's `DATABASE_URL` or
/// `HOTPLEX_*` leaks in.
pub(crate) fn hotplex(dir: &Path) -> Command {
    let mut cmd = Command::new(hotplex_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

/// A running `hotplex` process; on drop (a failed test) it is interrupted and awaited.
pub(crate) struct Running {
    child: Child,
    /// The rest of the line that announced readiness (the URL, the worker id).
    pub(crate) ready: String,
    stdout: Vec<String>,
}

/// `hotplex up`, which announces its URL.
type Up = Running;

impl Running {
    async fn start(dir: &Path, env: &[(&str, &str)]) -> Self {
        let data = dir.join("data");
        let data = data.to_str().unwrap();
        Self::spawn(
            dir,
            &["up", "--listen", "127.0.0.1:0", "--data-dir", data],
            env,
            "hotplex listening on ",
        )
        .await
    }

    /// Runs `hotplex ARGS` until it prints a line starting with `ready`; stderr goes to
    /// `<dir>/<first arg>.log`.
    pub(crate) async fn spawn(
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        ready: &str,
    ) -> Self {
        let log_path = dir.join(format!("{}.log", args[0]));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut cmd = hotplex(dir);
        cmd.args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let rest = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                stdout.push(line.clone());
                if let Some(rest) = line.strip_prefix(ready) {
                    return rest.to_owned();
                }
            }
            panic!(
                "{} exited before it was ready; see {}",
                args[0],
                log_path.display()
            );
        })
        .await
        .unwrap_or_else(|_| panic!("{} was not ready within 90 s", args[0]));
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            ready: rest,
            stdout,
        }
    }

    pub(crate) fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("running") as i32)
    }

    /// Waits for the process to exit by itself; on timeout the panic shows the logs in `dir`.
    pub(crate) async fn exited(mut self, within: Duration, dir: &Path) -> std::process::ExitStatus {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(status) => status.unwrap(),
            Err(_) => panic!(
                "the process did not exit within {within:?}{}",
                logs_tail(dir)
            ),
        }
    }

    pub(crate) async fn stop(mut self, signal: Signal) -> std::process::ExitStatus {
        kill(self.pid(), signal).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("the process did not stop");
        status.unwrap()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), Signal::SIGINT);
            for _ in 0..100 {
                if matches!(self.child.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// `hotplex serve` on a random port of 127.0.0.1; its URL is in `ready`.
pub(crate) async fn serve(dir: &Path, data: &str, env: &[(&str, &str)]) -> Running {
    Running::spawn(
        dir,
        &["serve", "--listen", "127.0.0.1:0", "--data-dir", data],
        env,
        "hotplex listening on ",
    )
    .await
}

/// `hotplex worker`, and its id.
pub(crate) async fn worker(dir: &Path, data: &str, env: &[(&str, &str)]) -> (Running, String) {
    let w = Running::spawn(dir, &["worker", "--data-dir", data], env, "hotplex worker ").await;
    let id = w.ready.trim_end_matches(" started").to_owned();
    (w, id)
}

/// A default session created through the API at `base`; its id.
pub(crate) async fn new_session(client: &reqwest::Client, base: &str, key: &str) -> String {
    let session: Value = client
        .post(format!("{base}/v1/sessions"))
        .bearer_auth(key)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    session["id"].as_str().unwrap().to_owned()
}

/// Posts a prompt to a session (202, queued); the turn.
pub(crate) async fn post_turn(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    sid: &str,
    prompt: &str,
) -> Value {
    client
        .post(format!("{base}/v1/sessions/{sid}/turns"))
        .bearer_auth(key)
        .json(&json!({ "prompt": prompt }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A `claude` that is the fake agent (`hotplex fake-agent`), in `dir`.
pub(crate) fn fake_agent_script(dir: &Path) -> std::path::PathBuf {
    let fake = dir.join("fake-claude");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nexec '{}' fake-agent \"$@\"\n",
            hotplex_bin().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    fake
}

/// PIDs of live processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        if !name.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(needle) && !cmdline.contains("sleep") {
            found.push(format!("{name}: {cmdline}"));
        }
    }
    found
}

#[tokio::test]
async fn up_runs_on_embedded_postgres_stops_cleanly_and_keeps_sessions() {
    let dir = tempfile::tempdir().unwrap();
    let client = reqwest::Client::new();

    let up = Up::start(dir.path(), &[]).await;
    let ready = client
        .get(format!("{}/health/ready", up.ready))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let key = up
        .stdout
        .iter()
        .find_map(|l| {
            l.split_once("(shown only this once): ")
                .map(|(_, k)| k.to_owned())
        })
        .expect("up prints the admin key it created");
    let created: Value = client
        .post(format!("{}/v1/sessions", up.ready))
        .bearer_auth(&key)
        .json(&json!({"external_id": "persist-me", "model": "m1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    let pid_file = std::fs::read_to_string(dir.path().join("data/pg/data/postmaster.pid")).unwrap();
    let pg_pid = Pid::from_raw(pid_file.lines().next().unwrap().trim().parse().unwrap());
    let status = up.stop(Signal::SIGINT).await;
    assert!(status.success(), "{status}");
    assert!(kill(pg_pid, None).is_err(), "postgres survived");
    let data = dir.path().join("data").display().to_string();
    assert_eq!(processes_mentioning(&data), Vec::<String>::new());

    // Second start: same data, no new key printed, the old key and sessions still there;
    // a bootstrap key from the environment is installed too.
    let bootstrap = "hpx_bootstrap-key-for-automation-0001";
    let up = Up::start(dir.path(), &[("HOTPLEX_BOOTSTRAP_KEY", bootstrap)]).await;
    assert!(
        up.stdout
            .iter()
            .all(|l| !l.contains("shown only this once")),
        "{:?}",
        up.stdout
    );
    let url = format!(
        "{}/v1/sessions/{}",
        up.ready,
        created["id"].as_str().unwrap()
    );
    let got: Value = client
        .get(&url)
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        without_live_fields(got),
        without_live_fields(created.clone())
    );
    let me = client
        .get(format!("{}/v1/whoami", up.ready))
        .bearer_auth(bootstrap)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), 200);
    let status = up.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{status}");
    assert_eq!(processes_mentioning(&data), Vec::<String>::new());
}

#[tokio::test]
async fn serve_refuses_to_run_open_by_accident() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let out = hotplex(dir.path())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no API keys exist"), "{stderr}");

    let out = hotplex(dir.path())
        .args(["serve", "--insecure-no-auth", "--listen", "0.0.0.0:0"])
        .env("DATABASE_URL", &db.url)
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("loopback"), "{stderr}");
}

#[tokio::test]
async fn keys_commands_manage_keys_in_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let run = |args: &[&str]| {
        let mut cmd = hotplex(dir.path());
        cmd.args(args).env("DATABASE_URL", &db.url);
        cmd
    };
    let out = run(&[
        "keys", "create", "--name", "ci", "--tenant", "acme", "--role", "admin",
    ])
    .output()
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(secret.starts_with("hpx_"), "{secret}");
    let row = hotplex::store::keys::authenticate(&db.pool, &hotplex::auth::hash_key(&secret))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(row.tenant_name, "acme");
    assert_eq!(row.role, "admin");

    let out = run(&["keys", "list", "--tenant", "acme"])
        .output()
        .await
        .unwrap();
    let listing = String::from_utf8(out.stdout).unwrap();
    assert!(
        listing.contains(&secret[..12]) && listing.contains("active"),
        "{listing}"
    );
    assert!(!listing.contains(&secret), "the secret is never listed");

    let id = row.api_key_id.to_string();
    let out = run(&["keys", "revoke", &id]).output().await.unwrap();
    assert!(out.status.success());
    assert!(
        hotplex::store::keys::authenticate(&db.pool, &hotplex::auth::hash_key(&secret))
            .await
            .unwrap()
            .is_none()
    );

    let out = run(&["keys", "revoke", "not-an-id"])
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a key id"));
}

#[tokio::test]
async fn config_validate_prints_redacted_settings_or_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = hotplex(dir.path())
        .args(["config", "validate"])
        .env("HOTPLEX_BOOTSTRAP_KEY", "hpx_do-not-print-this-secret")
        .env("DATABASE_URL", "postgres://u:hunter2@db/hotplex")
        .env("HOTPLEX_LISTEN", "127.0.0.1:9999")
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("listen: 127.0.0.1:9999"), "{text}");
    assert!(
        !text.contains("do-not-print") && !text.contains("hunter2"),
        "{text}"
    );

    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "http:\n  request_timeout: soon\n").unwrap();
    let out = hotplex(dir.path())
        .args(["config", "validate"])
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("http.request_timeout") && stderr.contains("bad.yaml"),
        "{stderr}"
    );
}

/// Polls a turn until it has ended (60 s); on timeout the panic shows the turn and the tail
/// of every process log in `dir`.
pub(crate) async fn ended_turn(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    id: &str,
    dir: &Path,
) -> Value {
    let mut turn = Value::Null;
    for _ in 0..1200 {
        turn = client
            .get(format!("{base}/v1/turns/{id}"))
            .bearer_auth(key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !matches!(turn["status"].as_str(), Some("queued" | "running")) {
            return turn;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "turn {id} did not end within 60 s: {turn}{}",
        logs_tail(dir)
    );
}

/// The last lines of every process log in `dir`, for a failure message.
pub(crate) fn logs_tail(dir: &Path) -> String {
    let mut logs = String::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            logs.push_str(&format!("\n--- {}\n", path.display()));
            for line in tail.into_iter().rev() {
                logs.push_str(line);
                logs.push('\n');
            }
        }
    }
    logs
}

#[tokio::test]
async fn serve_and_worker_processes_share_the_work_and_a_stopped_worker_hands_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let key = create_key(&db.pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let fake = fake_agent_script(dir.path());
    // A short drain: the slow turn is interrupted rather than waited for.
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        (
            "HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY",
            fake.to_str().unwrap(),
        ),
        ("HOTPLEX_WORKER__DRAIN_TIMEOUT", "1s"),
    ];
    let serve = serve(dir.path(), data, &env).await;
    let (first, first_id) = worker(dir.path(), data, &env).await;
    let base = serve.ready.clone();
    let client = reqwest::Client::new();

    let sid = new_session(&client, &base, &key).await;
    let slow: Value = post_turn(&client, &base, &key, &sid, "[[slow]] a long story").await;
    let queued: Value = post_turn(&client, &base, &key, &sid, "after the restart").await;

    // Stop the worker in the middle of the slow turn.
    let mut pid = None;
    for _ in 0..200 {
        pid = sqlx::query_scalar::<_, Value>(
            "select payload->'pid' from session_events e
              where session_id = $1::uuid and type = 'turn.started'
                and exists (select 1 from session_events d where d.session_id = e.session_id
                            and d.type = 'text.delta')",
        )
        .bind(&sid)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if pid.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent = Pid::from_raw(pid.expect("the slow turn streams").as_i64().unwrap() as i32);
    let status = first.stop(Signal::SIGTERM).await;
    assert!(status.success(), "{status}");
    assert!(kill(agent, None).is_err(), "the agent outlived its worker");

    let slow = ended_turn(
        &client,
        &base,
        &key,
        slow["id"].as_str().unwrap(),
        dir.path(),
    )
    .await;
    // SIGTERM drains for `worker.drain_timeout` (1 s here), then interrupts: the 4 s turn
    // fails, unless a slow machine let it finish within the drain, which is fine too.
    match slow["status"].as_str() {
        Some("failed") => assert_eq!(slow["error"], "the worker stopped during the turn"),
        Some("completed") => {}
        _ => panic!("{slow}"),
    }
    let waiting: Value = client
        .get(format!(
            "{base}/v1/turns/{}",
            queued["id"].as_str().unwrap()
        ))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(waiting["status"], "queued", "{waiting}");

    // The queued turn was handed back and runs on the next worker.
    let (second, second_id) = worker(dir.path(), data, &env).await;
    assert_ne!(first_id, second_id);
    let done = ended_turn(
        &client,
        &base,
        &key,
        queued["id"].as_str().unwrap(),
        dir.path(),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["worker_id"], second_id.as_str(), "{done}");
    let stopped: Option<chrono::DateTime<chrono::Utc>> =
        sqlx::query_scalar("select stopped_at from workers where worker_id = $1::uuid")
            .bind(&first_id)
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert!(stopped.is_some(), "the first worker marked itself stopped");
    assert!(second.stop(Signal::SIGINT).await.success());
    assert!(serve.stop(Signal::SIGINT).await.success());
}
