//! The Claude Code provider: one long-lived `claude` process per session, spoken to in
//! stream-json over stdin/stdout (see `shared/docs/claude-code.md`). The process stays warm
//! between turns; readiness is the answer to an `initialize` control request.

pub mod protocol;
pub mod transcript;

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use uuid::Uuid;

use super::process::GroupChild;
use super::{AgentEvent, Error, SpawnSpec};

mod mapper;

/// Longest stdout line accepted. Far above any real frame; a longer one ends the process
/// with a clear error instead of exhausting memory.
pub const MAX_LINE_BYTES: usize = 64 * 1024 * 1024;
/// How long a new process may take to answer `initialize`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Lines of stderr kept to explain a crash.
const STDERR_TAIL: usize = 20;

/// What the reader task hands to the process owner.
#[derive(Debug)]
enum Inbound {
    Event(AgentEvent),
    /// A control response to one of our requests.
    ControlResponse {
        request_id: String,
        ok: bool,
        error: Option<String>,
    },
    /// The stdout stream ended or broke.
    Closed(String),
}

/// A warm Claude Code process.
#[derive(Debug)]
pub struct ClaudeProcess {
    child: GroupChild,
    stdin: mpsc::Sender<String>,
    inbound: mpsc::Receiver<Inbound>,
    stderr_tail: std::sync::Arc<std::sync::Mutex<VecDeque<String>>>,
    closed: Option<String>,
}

/// The command line for a spec (flags as in claude-code.md §3).
pub fn argv(spec: &SpawnSpec) -> Vec<String> {
    let mut args: Vec<String> = [
        "-p",
        "--input-format",
        "stream-json",
        "--output-format",
        "stream-json",
        "--verbose",
        "--include-partial-messages",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Never both: `--session-id` names a new conversation, `--resume` continues one.
    if spec.resume {
        args.extend(["--resume".into(), spec.cli_session_id.to_string()]);
    } else {
        args.extend(["--session-id".into(), spec.cli_session_id.to_string()]);
    }
    if let Some(mode) = &spec.permission_mode {
        args.extend(["--permission-mode".into(), mode.clone()]);
    }
    if !spec.allowed_tools.is_empty() {
        args.extend(["--allowedTools".into(), spec.allowed_tools.join(",")]);
    }
    if !spec.disallowed_tools.is_empty() {
        args.extend(["--disallowedTools".into(), spec.disallowed_tools.join(",")]);
    }
    if let Some(model) = &spec.model {
        args.extend(["--model".into(), model.clone()]);
    }
    // A resumed conversation already carries its system prompt; appending it again would
    // duplicate it (a defect of the original).
    if let Some(prompt) = spec.system_prompt.as_ref().filter(|_| !spec.resume) {
        args.extend(["--append-system-prompt".into(), prompt.clone()]);
    }
    args.extend(spec.extra_args.iter().cloned());
    args
}

impl ClaudeProcess {
    /// Starts the CLI and waits until it answers `initialize`.
    pub async fn spawn(spec: &SpawnSpec, tracker: &TaskTracker) -> Result<Self, Error> {
        let mut cmd = Command::new(&spec.binary);
        cmd.args(argv(spec))
            .current_dir(&spec.cwd)
            .env_clear()
            .envs(&spec.env);
        spec.limits.apply(&mut cmd);
        let mut child = GroupChild::spawn(cmd).map_err(|source| Error::Spawn {
            binary: spec.binary.display().to_string(),
            source,
        })?;
        let pid = child.pid();
        let stdout = child.child_mut().stdout.take().ok_or(Error::Gone)?;
        let stderr = child.child_mut().stderr.take().ok_or(Error::Gone)?;
        let mut stdin = child.child_mut().stdin.take().ok_or(Error::Gone)?;

        let (stdin_tx, mut stdin_rx) = mpsc::channel::<String>(64);
        tracker.spawn(async move {
            while let Some(line) = stdin_rx.recv().await {
                let write = async {
                    stdin.write_all(line.as_bytes()).await?;
                    stdin.write_all(b"\n").await?;
                    stdin.flush().await
                };
                if write.await.is_err() {
                    break;
                }
            }
            // Dropping stdin closes the pipe: the CLI exits after its current turn.
        });

        let (in_tx, in_rx) = mpsc::channel::<Inbound>(1024);
        let replies = stdin_tx.clone();
        tracker.spawn(read_stdout(stdout, in_tx, replies, pid));

        let tail = std::sync::Arc::new(std::sync::Mutex::new(VecDeque::new()));
        let tail_w = tail.clone();
        tracker.spawn(async move {
            let mut lines = BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                tracing::debug!(process.pid = pid, "agent stderr: {line}");
                let mut t = tail_w
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if t.len() == STDERR_TAIL {
                    t.pop_front();
                }
                t.push_back(line);
            }
        });

        let mut process = Self {
            child,
            stdin: stdin_tx,
            inbound: in_rx,
            stderr_tail: tail,
            closed: None,
        };
        let request_id = format!("init-{}", Uuid::new_v4());
        process
            .write(protocol::initialize_request(&request_id))
            .await?;
        match tokio::time::timeout(READY_TIMEOUT, process.await_control(&request_id)).await {
            Ok(Ok(())) => Ok(process),
            Ok(Err(e)) => {
                process.stop(Duration::from_secs(1)).await;
                Err(e)
            }
            Err(_) => {
                process.stop(Duration::from_secs(1)).await;
                Err(Error::NotReady(format!(
                    "no answer to `initialize` within {}s",
                    READY_TIMEOUT.as_secs()
                )))
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    /// Whether the CLI has exited (a spare that died while it waited).
    pub fn has_exited(&mut self) -> bool {
        self.child.try_exit().is_some()
    }

    async fn write(&self, line: String) -> Result<(), Error> {
        self.stdin.send(line).await.map_err(|_| Error::Gone)
    }

    async fn await_control(&mut self, request_id: &str) -> Result<(), Error> {
        loop {
            match self.inbound.recv().await {
                Some(Inbound::ControlResponse {
                    request_id: id,
                    ok,
                    error,
                }) if id == request_id => {
                    return if ok {
                        Ok(())
                    } else {
                        Err(Error::NotReady(error.unwrap_or_default()))
                    };
                }
                Some(Inbound::Closed(why)) => {
                    self.closed = Some(why.clone());
                    return Err(Error::NotReady(format!("{why}; {}", self.stderr_summary())));
                }
                Some(_) => {}
                None => {
                    return Err(Error::NotReady(format!(
                        "the process exited; {}",
                        self.stderr_summary()
                    )));
                }
            }
        }
    }

    /// Sends the user's prompt as a new user message (always with a fresh uuid: the CLI
    /// silently drops a message whose uuid it has seen).
    pub async fn send_prompt(&self, text: &str) -> Result<(), Error> {
        self.write(protocol::user_message(text, Uuid::new_v4()))
            .await
    }

    /// Asks the CLI to abort the running turn; it answers with the turn's `result`.
    pub async fn interrupt(&self) -> Result<(), Error> {
        self.write(protocol::interrupt_request(&format!(
            "int-{}",
            Uuid::new_v4()
        )))
        .await
    }

    /// The next event; `None` once the process's output has ended.
    pub async fn next_event(&mut self) -> Option<AgentEvent> {
        loop {
            match self.inbound.recv().await {
                Some(Inbound::Event(ev)) => return Some(ev),
                Some(Inbound::ControlResponse {
                    ok: false, error, ..
                }) => {
                    tracing::warn!(
                        process.pid = self.pid(),
                        error = error.as_deref().unwrap_or(""),
                        "control request refused"
                    );
                }
                Some(Inbound::ControlResponse { .. }) => {}
                Some(Inbound::Closed(why)) => {
                    self.closed = Some(why);
                    return None;
                }
                None => return None,
            }
        }
    }

    /// Why the process ended: exit code and the last stderr lines.
    pub async fn exit_summary(&mut self) -> String {
        let code = match tokio::time::timeout(Duration::from_secs(2), self.child.wait()).await {
            Ok(code) => code
                .map(|c| format!("exit code {c}"))
                .unwrap_or_else(|| "killed by a signal".into()),
            Err(_) => "still running".into(),
        };
        let why = self.closed.clone().unwrap_or_else(|| "output ended".into());
        format!(
            "agent process ended ({code}; {why}){}",
            self.stderr_summary()
        )
    }

    fn stderr_summary(&self) -> String {
        let t = self
            .stderr_tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.is_empty() {
            String::new()
        } else {
            format!(
                "; stderr: {}",
                t.iter().cloned().collect::<Vec<_>>().join(" | ")
            )
        }
    }

    /// Stops the process group (SIGTERM, grace, SIGKILL) and reaps it.
    pub async fn stop(&mut self, grace: Duration) {
        self.child.stop(grace).await;
    }
}

/// Reads stdout line by line (no fixed cap below [`MAX_LINE_BYTES`]), answers what must be
/// answered at once, and forwards the rest as events.
async fn read_stdout(
    stdout: impl AsyncRead + Unpin,
    out: mpsc::Sender<Inbound>,
    replies: mpsc::Sender<String>,
    pid: u32,
) {
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut mapper = mapper::Mapper::default();
    let mut line = Vec::new();
    let why = loop {
        line.clear();
        match read_line_capped(&mut reader, &mut line, MAX_LINE_BYTES).await {
            Ok(0) => break "stdout closed".to_string(),
            Ok(_) => {}
            Err(e) => break e.to_string(),
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end();
        if text.is_empty() {
            continue;
        }
        let frame = match protocol::parse_line(text) {
            Ok(frame) => frame,
            Err(e) => {
                tracing::warn!(process.pid = pid, error = %e, "agent printed a non-JSON line");
                continue;
            }
        };
        for item in mapper.map(frame) {
            let msg = match item {
                mapper::Mapped::Event(ev) => Inbound::Event(ev),
                mapper::Mapped::Control {
                    request_id,
                    ok,
                    error,
                } => Inbound::ControlResponse {
                    request_id,
                    ok,
                    error,
                },
                mapper::Mapped::Reply(line) => {
                    let _ = replies.send(line).await;
                    continue;
                }
            };
            if out.send(msg).await.is_err() {
                return;
            }
        }
    };
    let _ = out.send(Inbound::Closed(why)).await;
}

/// `read_until(b'\n')` with a bound: fails once a line exceeds `max` bytes.
async fn read_line_capped<R: tokio::io::AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<usize> {
    let mut total = 0;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            return Ok(total);
        }
        let (used, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        if buf.len() + used > max {
            return Err(std::io::Error::other(format!(
                "a stdout line exceeded {} MiB",
                max / (1024 * 1024)
            )));
        }
        buf.extend_from_slice(&available[..used]);
        reader.consume(used);
        total += used;
        if done {
            return Ok(total);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(resume: bool) -> SpawnSpec {
        SpawnSpec {
            binary: "claude".into(),
            extra_args: vec!["--max-turns".into(), "5".into()],
            env: Default::default(),
            cwd: "/tmp".into(),
            cli_session_id: Uuid::nil(),
            resume,
            model: Some("m".into()),
            system_prompt: Some("be brief".into()),
            permission_mode: Some("acceptEdits".into()),
            allowed_tools: vec!["Bash(git diff:*)".into(), "Read".into()],
            disallowed_tools: vec!["WebFetch".into()],
            limits: Default::default(),
        }
    }

    #[test]
    fn argv_starts_or_resumes_never_both() {
        let new = argv(&spec(false));
        assert!(
            new.contains(&"--session-id".to_string()) && !new.contains(&"--resume".to_string())
        );
        assert!(new.contains(&"--append-system-prompt".to_string()));
        assert!(
            new.windows(2)
                .any(|w| w[0] == "--allowedTools" && w[1] == "Bash(git diff:*),Read")
        );
        assert!(
            new.windows(2)
                .any(|w| w[0] == "--permission-mode" && w[1] == "acceptEdits")
        );
        assert_eq!(&new[new.len() - 2..], ["--max-turns", "5"]);
        let resumed = argv(&spec(true));
        assert!(
            resumed.contains(&"--resume".to_string())
                && !resumed.contains(&"--session-id".to_string())
        );
        assert!(!resumed.contains(&"--append-system-prompt".to_string()));
    }

    #[tokio::test]
    async fn long_lines_are_read_whole_and_overlong_ones_refused() {
        let data = format!("{}\n{}\n", "a".repeat(200_000), "b".repeat(10));
        let mut reader = BufReader::with_capacity(1024, data.as_bytes());
        let mut buf = Vec::new();
        read_line_capped(&mut reader, &mut buf, 1 << 20)
            .await
            .unwrap();
        assert_eq!(buf.len(), 200_001);
        buf.clear();
        read_line_capped(&mut reader, &mut buf, 1 << 20)
            .await
            .unwrap();
        assert_eq!(buf, b"bbbbbbbbbb\n");
        let mut reader = BufReader::with_capacity(1024, data.as_bytes());
        buf.clear();
        assert!(read_line_capped(&mut reader, &mut buf, 1000).await.is_err());
    }
}
