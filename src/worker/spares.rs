//! Warm spares: Claude Code processes a worker starts ahead of need (`worker.warm_spares`),
//! initialized and waiting, so that a new session's first turn skips the cold start of the
//! CLI. A spare is a new conversation started with the provider's default settings in a
//! work dir of its own (`<work_root>/<conversation id>`); a session that takes one adopts
//! that work dir and conversation for good (see `sessions::adopt_spare`). Sessions with
//! their own work dir, model, system prompt, permission mode or tool lists start cold, as do
//! resumed conversations: a spare cannot change any of those once started.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use crate::provider::SpawnSpec;
use crate::provider::claude_code::ClaudeProcess;

/// A started, initialized agent process waiting for its first prompt.
#[derive(Debug)]
pub struct Spare {
    pub process: ClaudeProcess,
    /// What it was started with (its cwd is the work dir it brings along).
    pub spec: SpawnSpec,
}

impl Spare {
    /// The work dir's name under the work root (the conversation id).
    pub fn work_dir_name(&self) -> String {
        self.spec.cli_session_id.to_string()
    }
}

/// The worker's spares. Spares are extra to `worker.capacity`: they hold no session.
#[derive(Debug)]
pub struct Spares {
    target: usize,
    ready: Mutex<Vec<Spare>>,
    taken: Notify,
}

/// Between failed starts (a missing or broken CLI must not spin).
const FIRST_BACKOFF: Duration = Duration::from_secs(2);
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Spares {
    pub fn new(target: usize) -> Arc<Self> {
        Arc::new(Self {
            target,
            ready: Mutex::new(Vec::new()),
            taken: Notify::new(),
        })
    }

    /// How many spares wait now.
    pub fn ready(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Spare>> {
        self.ready.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A live spare started exactly as `wanted` would be (all but cwd and conversation),
    /// if one waits; a new one is started in its place.
    pub fn take(&self, wanted: &SpawnSpec) -> Option<Spare> {
        let mut ready = self.lock();
        // A spare that died while waiting is dropped (its group is killed on drop).
        ready.retain_mut(|s| !s.process.has_exited());
        let i = ready.iter().position(|s| same_agent(&s.spec, wanted))?;
        let spare = ready.swap_remove(i);
        drop(ready);
        self.taken.notify_one();
        Some(spare)
    }

    /// Keeps `target` spares ready until `token` is cancelled, then stops those left.
    /// `spec` gives the settings of a spare for a work dir and conversation id.
    pub async fn keep(
        self: Arc<Self>,
        work_root: PathBuf,
        spec: impl Fn(PathBuf, Uuid) -> SpawnSpec,
        tracker: TaskTracker,
        token: CancellationToken,
        grace: Duration,
    ) {
        let mut backoff = FIRST_BACKOFF;
        loop {
            if token.is_cancelled() {
                break;
            }
            if self.ready() >= self.target {
                tokio::select! {
                    () = token.cancelled() => break,
                    () = self.taken.notified() => continue,
                    // Spares that died while waiting are noticed by `take`; this refills.
                    () = tokio::time::sleep(Duration::from_secs(30)) => {
                        self.lock().retain_mut(|s| !s.process.has_exited());
                        continue;
                    }
                }
            }
            let conversation = Uuid::new_v4();
            let cwd = work_root.join(conversation.to_string());
            let started = async {
                std::fs::create_dir_all(&cwd).map_err(|e| e.to_string())?;
                let spec = spec(cwd.clone(), conversation);
                let process = ClaudeProcess::spawn(&spec, &tracker)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>(Spare { process, spec })
            };
            let started = tokio::select! {
                () = token.cancelled() => break,
                s = started => s,
            };
            match started {
                Ok(spare) => {
                    tracing::debug!(process.pid = spare.process.pid(), "a warm spare is ready");
                    self.lock().push(spare);
                    backoff = FIRST_BACKOFF;
                }
                Err(e) => {
                    let _ = std::fs::remove_dir(&cwd);
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "starting a warm spare failed");
                    tokio::select! {
                        () = token.cancelled() => break,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        let left: Vec<Spare> = std::mem::take(&mut *self.lock());
        for mut spare in left {
            spare.process.stop(grace).await;
            // Its work dir only ever held what the CLI's start left there.
            let _ = std::fs::remove_dir_all(&spare.spec.cwd);
        }
    }
}

/// Whether a process started with `a` is the one `b` asks for, but for its work dir and
/// conversation (which the session adopts).
pub fn same_agent(a: &SpawnSpec, b: &SpawnSpec) -> bool {
    a.binary == b.binary
        && a.extra_args == b.extra_args
        && a.env == b.env
        && !a.resume
        && !b.resume
        && a.model == b.model
        && a.system_prompt == b.system_prompt
        && a.permission_mode == b.permission_mode
        && a.allowed_tools == b.allowed_tools
        && a.disallowed_tools == b.disallowed_tools
        && a.limits == b.limits
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SpawnSpec {
        SpawnSpec {
            binary: "claude".into(),
            extra_args: vec![],
            env: [("HOME".to_owned(), "/h".to_owned())].into(),
            cwd: "/w/a".into(),
            cli_session_id: Uuid::new_v4(),
            resume: false,
            model: None,
            system_prompt: None,
            permission_mode: None,
            allowed_tools: vec![],
            disallowed_tools: vec![],
            limits: Default::default(),
        }
    }

    #[test]
    fn a_spare_serves_only_a_new_conversation_with_the_same_settings() {
        let a = spec();
        let mut b = spec();
        b.cwd = "/w/b".into();
        assert!(same_agent(&a, &b), "cwd and conversation do not matter");
        for change in [
            (|s: &mut SpawnSpec| s.model = Some("m".into())) as fn(&mut SpawnSpec),
            |s| s.system_prompt = Some("be brief".into()),
            |s| s.permission_mode = Some("plan".into()),
            |s| s.allowed_tools = vec!["Bash".into()],
            |s| s.disallowed_tools = vec!["Bash".into()],
            |s| s.resume = true,
            |s| {
                s.env.insert("X".into(), "1".into());
            },
        ] {
            let mut c = spec();
            change(&mut c);
            assert!(!same_agent(&a, &c), "{c:?}");
        }
    }
}
