//! The binary as an operator runs it: `up` on the embedded database across restarts,
//! `serve`'s refusals, `keys` and `config validate`.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::support::{TestDb, hotplex_bin, without_live_fields};

/// The binary with a clean environment: nothing of the developer's `DATABASE_URL` or
/// `HOTPLEX_*` leaks in.
fn hotplex(dir: &Path) -> Command {
    let mut cmd = Command::new(hotplex_bin());
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", dir)
        .env("RUST_LOG", "info")
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

/// A running `hotplex up`; on drop (a failed test) it is interrupted and awaited.
struct Up {
    child: Child,
    base: String,
    stdout: Vec<String>,
}

impl Up {
    async fn start(dir: &Path, env: &[(&str, &str)]) -> Self {
        let data = dir.join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("up.log"))
            .unwrap();
        let mut cmd = hotplex(dir);
        cmd.args(["up", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log);
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut stdout = Vec::new();
        let base = tokio::time::timeout(Duration::from_secs(90), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                stdout.push(line.clone());
                if let Some(url) = line.strip_prefix("hotplex listening on ") {
                    return url.to_owned();
                }
            }
            panic!(
                "up exited before listening; see {}",
                dir.join("up.log").display()
            );
        })
        .await
        .expect("up did not start within 90 s");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Self {
            child,
            base,
            stdout,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id().expect("running") as i32)
    }

    async fn stop(mut self, signal: Signal) -> std::process::ExitStatus {
        kill(self.pid(), signal).unwrap();
        let status = tokio::time::timeout(Duration::from_secs(60), self.child.wait())
            .await
            .expect("up did not stop");
        status.unwrap()
    }
}

impl Drop for Up {
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
        .get(format!("{}/health/ready", up.base))
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
        .post(format!("{}/v1/sessions", up.base))
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
        up.base,
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
        .get(format!("{}/v1/whoami", up.base))
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
