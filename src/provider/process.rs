//! A child process in its own process group: started with a clean environment, stopped with
//! SIGTERM to the whole group, a grace period, then SIGKILL, and always reaped.
//!
//! A group is not enough on its own: agents start tools in sessions of their own (Claude
//! Code's Bash tool calls `setsid`), so a tool's background process (`nohup server &`) leaves
//! the group. Every child therefore carries a random tag in its environment, which its
//! descendants inherit, and stopping also signals every process that carries the tag.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The environment variable that tags a child and its descendants.
pub const TAG_VAR: &str = "HOTPLEX_PROCESS_TAG";

/// A running child that owns its process group.
#[derive(Debug)]
pub struct GroupChild {
    child: Child,
    pgid: Pid,
    /// `TAG_VAR=<random>`, as it appears in `/proc/<pid>/environ`.
    tag: String,
}

impl GroupChild {
    /// Spawns `cmd` as the leader of a new process group with piped stdio.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Self> {
        let value = uuid::Uuid::new_v4().simple().to_string();
        cmd.env(TAG_VAR, &value)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn()?;
        let pid = child
            .id()
            .ok_or_else(|| std::io::Error::other("child exited at once"))?;
        Ok(Self {
            pgid: Pid::from_raw(pid as i32),
            child,
            tag: format!("{TAG_VAR}={value}"),
        })
    }

    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// Whether the leader has exited (and its exit code, if so).
    pub fn try_exit(&mut self) -> Option<Option<i32>> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.code()),
            Ok(None) => None,
            Err(_) => Some(None),
        }
    }

    /// Waits for the leader to exit.
    pub async fn wait(&mut self) -> Option<i32> {
        self.child.wait().await.ok().and_then(|s| s.code())
    }

    /// SIGTERM to the group, up to `grace` for the leader to exit, then SIGKILL to the group.
    /// The group is killed even when the leader is already gone, so grandchildren (a tool's
    /// shell, a dev server) never outlive their session.
    pub async fn stop(&mut self, grace: Duration) -> Option<i32> {
        self.signal_all(Signal::SIGTERM);
        let code = match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(status) => status.ok().and_then(|s| s.code()),
            Err(_) => {
                tracing::warn!(
                    process.pid = self.pid(),
                    "agent ignored SIGTERM; killing its group"
                );
                None
            }
        };
        self.signal_all(Signal::SIGKILL);
        let _ = self.child.wait().await;
        code
    }

    /// Signals the group and every process carrying the tag.
    fn signal_all(&self, signal: Signal) {
        let _ = killpg(self.pgid, signal);
        for pid in tagged(&self.tag) {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }
}

/// Processes whose environment holds `tag` (`NAME=value`). Processes we may not read (other
/// users') cannot carry a tag of ours and are skipped.
fn tagged(tag: &str) -> Vec<Pid> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let needle = tag.as_bytes();
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ"))
                .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == needle))
        })
        .map(|pid| Pid::from_raw(pid as i32))
        .collect()
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        // Backstop for paths that skip `stop`: nothing of the group survives its owner.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_all(Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        nix::sys::signal::kill(Pid::from_raw(pid), None).is_ok()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    }

    #[tokio::test]
    async fn stop_ends_the_whole_group_including_grandchildren() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild.pid");
        let mut cmd = Command::new("sh");
        // The grandchild ignores SIGTERM; only the group SIGKILL ends it.
        cmd.arg("-c").arg(format!(
            "sh -c 'trap \"\" TERM; echo $$ > {}; sleep 60' & wait",
            pidfile.display()
        ));
        let mut child = GroupChild::spawn(cmd).unwrap();
        let mut grandchild = None;
        for _ in 0..100 {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                grandchild = Some(pid);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let grandchild = grandchild.expect("grandchild started");
        assert!(alive(grandchild));
        child.stop(Duration::from_millis(300)).await;
        for _ in 0..50 {
            if !alive(grandchild) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(grandchild), "grandchild survived");
    }

    #[tokio::test]
    async fn stop_ends_descendants_that_left_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("escaped.pid");
        let mut cmd = Command::new("sh");
        // What a tool's `nohup server &` under `setsid` looks like: a new session and group.
        cmd.arg("-c").arg(format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 60' </dev/null >/dev/null 2>&1 & sleep 60",
            pidfile.display()
        ));
        let mut child = GroupChild::spawn(cmd).unwrap();
        let mut escaped = None;
        for _ in 0..100 {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                escaped = Some(pid);
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let escaped = escaped.expect("the escaping process started");
        let pgid = nix::unistd::getpgid(Some(Pid::from_raw(escaped))).unwrap();
        assert_ne!(pgid.as_raw() as u32, child.pid(), "it left the group");
        child.stop(Duration::from_millis(300)).await;
        for _ in 0..50 {
            if !alive(escaped) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!alive(escaped), "a tagged descendant survived");
    }
}
