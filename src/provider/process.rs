//! A child process in its own process group: started with a clean environment, stopped with
//! SIGTERM to the whole group, a grace period, then SIGKILL, and always reaped.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// A running child that owns its process group.
#[derive(Debug)]
pub struct GroupChild {
    child: Child,
    pgid: Pid,
}

impl GroupChild {
    /// Spawns `cmd` as the leader of a new process group with piped stdio.
    pub fn spawn(mut cmd: Command) -> std::io::Result<Self> {
        cmd.process_group(0)
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
        let _ = killpg(self.pgid, Signal::SIGTERM);
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
        let _ = killpg(self.pgid, Signal::SIGKILL);
        let _ = self.child.wait().await;
        code
    }
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        // Backstop for paths that skip `stop`: nothing of the group survives its owner.
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = killpg(self.pgid, Signal::SIGKILL);
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
}
