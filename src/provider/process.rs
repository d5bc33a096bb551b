//! A child process in its own process group: started with a clean environment, stopped with
//! SIGTERM to the whole group, a grace period, then SIGKILL, and always reaped.
//!
//! A group is not enough on its own: agents start tools in sessions of their own (Claude
//! Code's Bash tool calls `setsid`), so a tool's background process (`nohup server &`) leaves
//! the group. Every child therefore carries a random tag in its environment, which its
//! descendants inherit, and stopping also signals every process that carries the tag.

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// The environment variable that tags a child and its descendants.
pub const TAG_VAR: &str = "HOTPLEX_PROCESS_TAG";

/// The environment variable naming the worker that started an agent (and, inherited, every
/// process under it): when a worker dies without stopping its agents (`kill -9`), a live
/// worker on the same host finds them by it and ends them.
pub const OWNER_VAR: &str = "HOTPLEX_WORKER_ID";

/// Resource limits of an agent process and everything it starts (inherited), set between
/// fork and exec. Core dumps are always off: an agent's memory holds prompts and keys.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// `RLIMIT_NOFILE`: open files per process.
    pub max_open_files: Option<u64>,
    /// `RLIMIT_FSIZE`, in MiB: the largest file a process may write (a runaway tool output
    /// cannot fill the disk in one file).
    pub max_file_size_mb: Option<u64>,
}

impl Limits {
    /// Makes `cmd`'s process start under these limits. The crate's one other `unsafe` is
    /// the allocator setting in `main`: a child's limits can only be set between fork and
    /// exec (afterwards it could already have opened or written more).
    #[allow(unsafe_code)]
    pub fn apply(&self, cmd: &mut Command) {
        let limits = *self;
        // SAFETY: the closure runs in the forked child before exec; it only calls
        // setrlimit(2), which is async-signal-safe, and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                use nix::sys::resource::{Resource, setrlimit};
                setrlimit(Resource::RLIMIT_CORE, 0, 0)?;
                if let Some(n) = limits.max_open_files {
                    setrlimit(Resource::RLIMIT_NOFILE, n, n)?;
                }
                if let Some(mb) = limits.max_file_size_mb {
                    let bytes = mb.saturating_mul(1024 * 1024);
                    setrlimit(Resource::RLIMIT_FSIZE, bytes, bytes)?;
                }
                Ok(())
            });
        }
    }
}

/// This process's PID namespace (`pid:[4026531836]`), if readable: with the host name, it
/// says which workers' processes this one can see.
pub fn pid_namespace() -> Option<String> {
    std::fs::read_link("/proc/self/ns/pid")
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Whether a process runs with this pid (a zombie does not count). A reused pid reads as
/// alive.
pub fn process_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        // The state follows the parenthesised command name, which may contain spaces.
        stat.rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z') && !rest.starts_with('X'))
    })
}

/// Resident memory of a process, in bytes (`VmRSS`); `None` when it is gone.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// SIGKILLs every process on this host whose environment says `OWNER_VAR=owner`, with the
/// process groups they lead; returns how many there were.
pub fn kill_owned_by(owner: &str) -> usize {
    let mut killed = 0;
    for (pid, value) in carrying(OWNER_VAR) {
        if value == owner {
            let _ = killpg(pid, Signal::SIGKILL);
            let _ = nix::sys::signal::kill(pid, Signal::SIGKILL);
            killed += 1;
        }
    }
    killed
}

/// Every process (but this one) whose environment sets `var`, with the value. Processes
/// we may not read (other users') cannot carry a variable of ours and are skipped.
fn carrying(var: &str) -> Vec<(Pid, String)> {
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let prefix = format!("{var}=");
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != me)
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let value = env
                .split(|b| *b == 0)
                .find_map(|kv| kv.strip_prefix(prefix.as_bytes()))?;
            Some((
                Pid::from_raw(pid as i32),
                String::from_utf8_lossy(value).into_owned(),
            ))
        })
        .collect()
}

/// A running child that owns its process group.
#[derive(Debug)]
pub struct GroupChild {
    child: Child,
    pgid: Pid,
    /// The random value of `TAG_VAR` this child and its descendants carry.
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
            tag: value,
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
        let terminated = std::time::Instant::now();
        let recent = terminated.checked_sub(SCAN_TTL).unwrap_or(terminated);
        self.signal_all(Signal::SIGTERM, recent);
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
        // The last word: a scan made after SIGTERM went out (another stop's will do).
        self.signal_all(Signal::SIGKILL, terminated);
        let _ = self.child.wait().await;
        code
    }

    /// Signals the group and every process carrying the tag, as found by a scan of `/proc`
    /// made at `scanned_after` or later.
    fn signal_all(&self, signal: Signal, scanned_after: std::time::Instant) {
        let _ = killpg(self.pgid, signal);
        for pid in tagged(&self.tag, scanned_after) {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    }
}

/// How old a scan of `/proc` may be for a SIGTERM: a worker stopping hundreds of sessions at
/// once then reads each process's environment a few times, not once per session.
const SCAN_TTL: std::time::Duration = std::time::Duration::from_millis(100);

/// The pids carrying each tag value.
type Tags = HashMap<String, Vec<Pid>>;

/// The last scan: when, and what it found.
static LAST_SCAN: std::sync::Mutex<Option<(std::time::Instant, Tags)>> =
    std::sync::Mutex::new(None);

/// Processes whose environment holds `TAG_VAR=tag`, from a scan made at
/// `scanned_after` or later (one is made if the last is older). Processes we may not read
/// (other users') cannot carry a tag of ours and are skipped.
fn tagged(tag: &str, scanned_after: std::time::Instant) -> Vec<Pid> {
    // Held during a scan, so callers that arrive meanwhile use its result.
    let mut last = LAST_SCAN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if last.as_ref().is_none_or(|(at, _)| *at < scanned_after) {
        *last = Some((std::time::Instant::now(), scan_tags()));
    }
    last.as_ref()
        .and_then(|(_, tags)| tags.get(tag).cloned())
        .unwrap_or_default()
}

/// Every process (but this one) that carries a tag, by tag value.
fn scan_tags() -> Tags {
    let mut tags = Tags::new();
    for (pid, value) in carrying(TAG_VAR) {
        tags.entry(value).or_default().push(pid);
    }
    tags
}

impl Drop for GroupChild {
    fn drop(&mut self) {
        // Backstop for paths that skip `stop`: nothing of the group survives its owner.
        if matches!(self.child.try_wait(), Ok(None)) {
            self.signal_all(Signal::SIGKILL, std::time::Instant::now());
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

    #[test]
    fn rss_of_this_process_is_read_and_of_a_missing_one_is_none() {
        let rss = rss_bytes(std::process::id()).expect("our own status");
        assert!(rss > 1024 * 1024, "{rss}");
        assert_eq!(rss_bytes(u32::MAX), None);
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

    /// A child whose own child escapes into a session of its own (`setsid`), as a tool's
    /// `nohup server &` does; returns the child and the escaped process's pid.
    async fn with_escaped_descendant(dir: &std::path::Path) -> (GroupChild, i32) {
        let pidfile = dir.join(format!("escaped-{}.pid", uuid::Uuid::new_v4()));
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!(
            "setsid sh -c 'echo $$ > {}; exec sleep 60' </dev/null >/dev/null 2>&1 & sleep 60",
            pidfile.display()
        ));
        let child = GroupChild::spawn(cmd).unwrap();
        for _ in 0..100 {
            if let Some(pid) = std::fs::read_to_string(&pidfile)
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                let pgid = nix::unistd::getpgid(Some(Pid::from_raw(pid))).unwrap();
                assert_ne!(pgid.as_raw() as u32, child.pid(), "it left the group");
                return (child, pid);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the escaping process did not start");
    }

    async fn gone(pid: i32) -> bool {
        for _ in 0..50 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn processes_of_a_lost_owner_are_found_and_killed() {
        let owner = uuid::Uuid::new_v4().to_string();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg("sleep 60 & sleep 60")
            .env(OWNER_VAR, &owner);
        let mut child = GroupChild::spawn(cmd).unwrap();
        let pid = child.pid() as i32;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(kill_owned_by(&owner) >= 1, "the child carries the owner");
        assert!(gone(pid).await, "the owner's process survived");
        let _ = child.wait().await;
        // The background `sleep` got the same SIGKILL; it may take a moment to be gone.
        let mut left = usize::MAX;
        for _ in 0..100 {
            left = kill_owned_by(&owner);
            if left == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(left, 0, "processes of the lost owner remain");
    }

    #[tokio::test]
    async fn stop_ends_descendants_that_left_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let (mut child, escaped) = with_escaped_descendant(dir.path()).await;
        child.stop(Duration::from_millis(300)).await;
        assert!(gone(escaped).await, "a tagged descendant survived");
    }

    #[tokio::test]
    async fn stops_at_the_same_time_share_a_scan_and_each_finds_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let (mut a, escaped_a) = with_escaped_descendant(dir.path()).await;
        let (mut b, escaped_b) = with_escaped_descendant(dir.path()).await;
        // Stopping `a` leaves `b` and its descendant alone.
        a.stop(Duration::from_millis(200)).await;
        assert!(gone(escaped_a).await, "a's descendant survived");
        assert!(alive(escaped_b), "b's descendant was killed by a's stop");
        // Within the scan's lifetime or not, `b` finds its own.
        b.stop(Duration::from_millis(200)).await;
        assert!(gone(escaped_b).await, "b's descendant survived");
    }
}
