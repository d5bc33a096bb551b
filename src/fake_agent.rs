//! A fake `claude` CLI for fast tests and benchmarks. It speaks the same stream-json
//! protocol as Claude Code 2.1.331 (`docs/claude-code.md`), frame for frame and in the same
//! order, so that a worker cannot tell it from the real thing; the model is replaced by a
//! deterministic echo and a few prompt markers.
//!
//! Prompt markers:
//! - `[[slow]]`: 40 text deltas, 100 ms apart (for interrupt tests).
//! - `[[bash:CMD]]`: a `Bash` tool call that really runs `sh -c CMD` in the cwd, then a final
//!   text `FAKE-TOOL-RESULT: <output>`.
//! - `[[fail]]`: an API-error assistant frame and an error result; the process stays.
//! - `[[exit]]`: exit with code 3 in the middle of the turn, without a result.
//! - `[[grow:MB]]`: the process keeps MB more MiB resident (a leaking agent), then replies.
//!
//! Knobs (on top of the real CLI's flags): `--fake-reply-chars N` (40), `--fake-deltas N`
//! (3), `--fake-delay-ms N` (0, before each delta), `--fake-input-tokens N`,
//! `--fake-output-tokens N` and `--fake-cost-usd F` (all per turn).
//!
//! The file is longer than most modules because it is one self-contained test double: the
//! argv, the session/transcript bookkeeping and the turn script only make sense together.

use std::collections::{HashSet, VecDeque};
use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use serde_json::{Map, Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Mutex, mpsc};
use tokio::task::{JoinError, JoinHandle};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::provider::claude_code::protocol::INTERRUPT_MARKER_PREFIX;
use crate::provider::claude_code::transcript::{
    find_transcript, project_slug, projects_dir, transcript_path,
};

/// The model when `--model` is absent (the 2.1.331 default).
const DEFAULT_MODEL: &str = "claude-opus-5-5";
const TOOLS: &[&str] = &[
    "Task",
    "Bash",
    "Glob",
    "Grep",
    "Read",
    "Edit",
    "Write",
    "NotebookEdit",
    "WebFetch",
    "TodoWrite",
    "WebSearch",
];
const INTERRUPTED: &str = "[Request interrupted by user]";
const INTERRUPTED_FOR_TOOL: &str = "[Request interrupted by user for tool use]";
const TOOL_REJECTED: &str = "The user doesn't want to proceed with this tool use. The tool use \
    was rejected (eg. if it was a file edit, the new_string was NOT written to the file). STOP \
    what you are doing and wait for the user to tell you how to proceed.";
const FAIL_TEXT: &str = r#"API Error: 400 {"type":"error","error":{"type":"invalid_request_error","message":"fake failure requested"}}"#;
/// The exit code of `[[exit]]`.
const CRASH_EXIT: i32 = 3;

/// The parsed command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// `--session-id`: the id of a new session.
    pub session_id: Option<Uuid>,
    /// `--resume` (as given: an id that is not a UUID is simply not found).
    pub resume: Option<String>,
    pub fork_session: bool,
    /// `-c`/`--continue`: the newest session of the cwd, or a new one.
    pub continue_session: bool,
    /// `--no-session-persistence`: no transcript.
    pub persist: bool,
    pub model: String,
    pub permission_mode: String,
    pub include_partial_messages: bool,
    pub replay_user_messages: bool,
    /// `--disallowedTools` rules; a bare tool name removes the tool.
    pub disallowed_tools: Vec<String>,
    pub max_turns: Option<u64>,
    /// The workspace: where tools run and which project directory the transcript goes to.
    pub cwd: PathBuf,
    /// `$HOME`, the root of `.claude/projects`.
    pub home: PathBuf,
    pub reply_chars: usize,
    pub deltas: usize,
    pub delay: Duration,
    pub input_tokens: Option<u64>,
    pub output_tokens: Option<u64>,
    pub cost_usd: Option<f64>,
}

impl Options {
    /// Parses the arguments (without the program name) like the real CLI, taking the cwd and
    /// `$HOME` from the environment. The error is the message for stderr.
    pub fn parse(args: &[String]) -> Result<Self, String> {
        let home = dirs::home_dir().ok_or("cannot determine the home directory")?;
        let cwd = std::env::current_dir()
            .map_err(|e| format!("cannot read the current directory: {e}"))?;
        Self::parse_in(args, home, cwd)
    }

    fn parse_in(args: &[String], home: PathBuf, cwd: PathBuf) -> Result<Self, String> {
        let mut o = Options {
            session_id: None,
            resume: None,
            fork_session: false,
            continue_session: false,
            persist: true,
            model: DEFAULT_MODEL.to_owned(),
            permission_mode: "default".to_owned(),
            include_partial_messages: false,
            replay_user_messages: false,
            disallowed_tools: Vec::new(),
            max_turns: None,
            cwd,
            home,
            reply_chars: 40,
            deltas: 3,
            delay: Duration::ZERO,
            input_tokens: None,
            output_tokens: None,
            cost_usd: None,
        };
        let mut verbose = false;
        let mut input_format = None;
        let mut output_format = None;
        let mut session_id = None;
        let mut i = 0;
        while i < args.len() {
            let arg = args[i].as_str();
            i += 1;
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v)),
                _ => (arg, None),
            };
            let mut value = || -> Result<String, String> {
                if let Some(v) = inline {
                    return Ok(v.to_owned());
                }
                let v = args
                    .get(i)
                    .ok_or_else(|| format!("option '{flag} <value>' argument missing"))?;
                i += 1;
                Ok(v.clone())
            };
            match flag {
                "-p" | "--print" | "--strict-mcp-config" | "--ide" | "--bare" => {}
                "--verbose" => verbose = true,
                "--include-partial-messages" => o.include_partial_messages = true,
                "--replay-user-messages" => o.replay_user_messages = true,
                "--fork-session" => o.fork_session = true,
                "-c" | "--continue" => o.continue_session = true,
                "--no-session-persistence" => o.persist = false,
                "--dangerously-skip-permissions" => o.permission_mode = "bypassPermissions".into(),
                "--input-format" => input_format = Some(value()?),
                "--output-format" => output_format = Some(value()?),
                "--session-id" => session_id = Some(value()?),
                "-r" | "--resume" => o.resume = Some(value()?),
                "--permission-mode" => o.permission_mode = value()?,
                "--model" => o.model = value()?,
                "--disallowedTools" | "--disallowed-tools" => o.disallowed_tools.extend(
                    value()?
                        .split([',', ' '])
                        .filter(|r| !r.is_empty())
                        .map(str::to_owned),
                ),
                "--max-turns" => o.max_turns = Some(number(flag, &value()?)?),
                // Accepted and irrelevant to a model that only echoes.
                "--permission-prompt-tool"
                | "--append-system-prompt"
                | "--system-prompt"
                | "--allowedTools"
                | "--allowed-tools"
                | "--mcp-config"
                | "--fallback-model"
                | "--settings"
                | "--setting-sources"
                | "--add-dir"
                | "--agents" => {
                    value()?;
                }
                "--fake-reply-chars" => o.reply_chars = number(flag, &value()?)?,
                "--fake-deltas" => o.deltas = number(flag, &value()?)?,
                "--fake-delay-ms" => o.delay = Duration::from_millis(number(flag, &value()?)?),
                "--fake-input-tokens" => o.input_tokens = Some(number(flag, &value()?)?),
                "--fake-output-tokens" => o.output_tokens = Some(number(flag, &value()?)?),
                "--fake-cost-usd" => o.cost_usd = Some(number(flag, &value()?)?),
                unknown if unknown.starts_with('-') => {
                    // Unknown flags are skipped with their value, if the next word looks like
                    // one, so a newer worker's argv still starts the fake.
                    if inline.is_none() && args.get(i).is_some_and(|next| !next.starts_with('-')) {
                        i += 1;
                    }
                    eprintln!("fake claude: ignoring unknown option {unknown}");
                }
                positional => eprintln!("fake claude: ignoring argument {positional:?}"),
            }
        }
        // The same refusals as the real CLI, so misconfigured argv fails in fast tests too.
        if output_format.as_deref() == Some("stream-json") && !verbose {
            return Err(
                "When using --print, --output-format=stream-json requires --verbose".to_owned(),
            );
        }
        if output_format.as_deref() != Some("stream-json")
            || input_format.as_deref() != Some("stream-json")
        {
            return Err(
                "the fake agent only speaks --input-format stream-json --output-format stream-json"
                    .to_owned(),
            );
        }
        if let Some(id) = session_id {
            o.session_id = Some(
                Uuid::parse_str(&id).map_err(|_| "Invalid session ID. Must be a valid UUID.")?,
            );
        }
        if o.session_id.is_some() && (o.resume.is_some() || o.continue_session) && !o.fork_session {
            return Err(
                "--session-id cannot be used with --continue or --resume unless \
                 --fork-session is also specified."
                    .to_owned(),
            );
        }
        Ok(o)
    }

    fn tool_allowed(&self, tool: &str) -> bool {
        !self.disallowed_tools.iter().any(|rule| rule == tool)
    }
}

fn number<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .parse()
        .map_err(|_| format!("option '{flag}': invalid number {value:?}"))
}

/// Runs the fake on the process's stdin and stdout; `args` exclude the program name.
pub async fn run(args: Vec<String>) -> ExitCode {
    let opts = match Options::parse(&args) {
        Ok(opts) => opts,
        Err(e) => {
            eprintln!("Error: {e}");
            return ExitCode::from(1);
        }
    };
    let (tx, rx) = mpsc::channel(64);
    // A plain thread, not tokio's stdin: tokio reads stdin on its blocking pool, and a read
    // that never returns (the host keeps stdin open) would stall runtime shutdown, so an
    // `[[exit]]` would hang instead of exiting. A detached OS thread dies with the process.
    let spawned = std::thread::Builder::new()
        .name("fake-claude-stdin".into())
        .spawn(move || {
            let mut stdin = io::stdin().lock();
            loop {
                let mut line = Vec::new();
                match stdin.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if tx.blocking_send(line).is_err() => break,
                    Ok(_) => {}
                }
            }
        });
    if let Err(e) = spawned {
        eprintln!("Error: cannot start the stdin reader: {e}");
        return ExitCode::from(1);
    }
    let code = serve_lines(opts, rx, tokio::io::stdout()).await;
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// Serves one session over any reader/writer pair (tests use in-memory pipes) and returns
/// the exit code the process would have.
pub async fn serve<R, W>(opts: Options, stdin: R, stdout: W) -> i32
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel(64);
    // A task, so that reading stdin never waits for a turn (interrupts must get through).
    let _reader = AbortOnDrop(tokio::spawn(async move {
        let mut stdin = BufReader::new(stdin);
        loop {
            let mut line = Vec::new();
            match stdin.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) if tx.send(line).await.is_err() => break,
                Ok(_) => {}
            }
        }
    }));
    serve_lines(opts, rx, stdout).await
}

/// Owns a task and aborts it when the owner goes away.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn serve_lines<W>(opts: Options, input: mpsc::Receiver<Vec<u8>>, stdout: W) -> i32
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    // Buffered: a burst of deltas goes out in a few writes rather than one per line.
    let stdout = tokio::io::BufWriter::with_capacity(64 * 1024, stdout);
    let out = Out(Arc::new(Mutex::new(Box::pin(stdout))));
    let (session, seen) = match open_session(&opts).await {
        Ok(found) => found,
        Err(Startup::NotFound(id)) => {
            let frame = json!({
                "type": "result", "subtype": "error_during_execution", "duration_ms": 0,
                "duration_api_ms": 0, "is_error": true, "num_turns": 0, "stop_reason": null,
                "session_id": Uuid::new_v4().to_string(), "total_cost_usd": 0,
                "usage": usage_json(0, 0), "modelUsage": {}, "permission_denials": [],
                "errors": [format!("No conversation found with session ID: {id}")],
                "uuid": Uuid::new_v4().to_string(),
            });
            // The exit code is 1 either way; a closed stdout changes nothing.
            let _ = out.send(&frame).await;
            return 1;
        }
        Err(Startup::Refused(message)) => {
            eprintln!("Error: {message}");
            return 1;
        }
    };
    let agent = Agent {
        out,
        sid: session.sid.clone(),
        model: opts.model.clone(),
        permission_mode: opts.permission_mode.clone(),
        opts: Arc::new(opts),
        session: Some(session),
        seen,
        queue: VecDeque::new(),
        running: None,
        last_error: false,
    };
    agent.main_loop(input).await
}

/// Serialised access to stdout: one whole line per lock, flushed before the lock is
/// released, so frames from the reader loop and the turn never interleave.
#[derive(Clone)]
struct Out(Arc<Mutex<Pin<Box<dyn AsyncWrite + Send>>>>);

impl Out {
    async fn send(&self, frame: &Value) -> io::Result<()> {
        self.write(frame, true).await
    }

    /// Writes a line, flushed now or left for the next flush (a burst of deltas).
    async fn write(&self, frame: &Value, flush: bool) -> io::Result<()> {
        let mut line = frame.to_string();
        line.push('\n');
        let mut w = self.0.lock().await;
        w.write_all(line.as_bytes()).await?;
        if flush { w.flush().await } else { Ok(()) }
    }

    async fn flush(&self) -> io::Result<()> {
        self.0.lock().await.flush().await
    }
}

/// One user message waiting for its turn.
struct Pending {
    /// The uuid the host sent, if any (only those get `command_lifecycle` frames).
    uuid: Option<String>,
    /// The `message.content` as sent, for the replay and the transcript.
    content: Value,
    prompt: String,
}

struct Running {
    handle: AbortOnDrop<(Session, TurnEnd)>,
    cancel: CancellationToken,
}

enum TurnEnd {
    Finished { is_error: bool },
    Exit(i32),
    OutputClosed,
}

enum Event {
    Line(Option<Vec<u8>>),
    TurnEnded(Result<(Session, TurnEnd), JoinError>),
}

/// The reader side: accepts stdin lines, answers control requests, runs one turn at a time.
struct Agent {
    out: Out,
    sid: String,
    opts: Arc<Options>,
    /// Changed by `set_model` / `set_permission_mode`; each turn takes a copy.
    model: String,
    permission_mode: String,
    /// `None` while a turn owns it.
    session: Option<Session>,
    /// Every user uuid of the session, transcript included: repeats are dropped.
    seen: HashSet<String>,
    queue: VecDeque<Pending>,
    running: Option<Running>,
    last_error: bool,
}

impl Agent {
    async fn main_loop(mut self, mut input: mpsc::Receiver<Vec<u8>>) -> i32 {
        let mut eof = false;
        loop {
            if self.running.is_none() {
                if let Some(next) = self.queue.pop_front() {
                    self.start(next);
                } else if eof {
                    return i32::from(self.last_error);
                }
            }
            let event = tokio::select! {
                line = input.recv(), if !eof => Event::Line(line),
                ended = join_turn(&mut self.running) => Event::TurnEnded(ended),
            };
            match event {
                Event::Line(None) => eof = true,
                Event::Line(Some(bytes)) => {
                    if self.handle_line(&bytes).await.is_err() {
                        return 1;
                    }
                }
                Event::TurnEnded(ended) => {
                    self.running = None;
                    match ended {
                        Ok((session, end)) => {
                            self.session = Some(session);
                            match end {
                                TurnEnd::Finished { is_error } => self.last_error = is_error,
                                TurnEnd::Exit(code) => return code,
                                TurnEnd::OutputClosed => return 1,
                            }
                        }
                        Err(e) => {
                            eprintln!("fake claude: turn failed: {e}");
                            return 1;
                        }
                    }
                }
            }
        }
    }

    fn start(&mut self, msg: Pending) {
        let Some(mut session) = self.session.take() else {
            // Unreachable: a session is taken only while `running` is set.
            self.queue.push_front(msg);
            return;
        };
        session.turns += 1;
        let cancel = CancellationToken::new();
        let turn = Turn {
            out: self.out.clone(),
            opts: Arc::clone(&self.opts),
            model: self.model.clone(),
            permission_mode: self.permission_mode.clone(),
            k: session.turns,
            session,
            cancel: cancel.clone(),
            entry_uuid: msg
                .uuid
                .clone()
                .unwrap_or_else(|| Uuid::new_v4().to_string()),
            msg,
            started: Instant::now(),
            calls: 0,
            usage_in: 0,
            usage_out: 0,
            call_deltas: 0,
            partial: String::new(),
            message_id: String::new(),
            tool_running: None,
        };
        self.running = Some(Running {
            handle: AbortOnDrop(tokio::spawn(turn.run())),
            cancel,
        });
    }

    async fn handle_line(&mut self, bytes: &[u8]) -> io::Result<()> {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim();
        if text.is_empty() {
            return Ok(());
        }
        let mut frame: Value = match serde_json::from_str(text) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("fake claude: ignoring a stdin line that is not JSON: {e}");
                return Ok(());
            }
        };
        match frame.get("type").and_then(Value::as_str) {
            Some("user") => self.accept_user(&mut frame).await,
            Some("control_request") => self.control(&frame).await,
            // Answers to requests of ours (we make none) and anything else: ignored, as the
            // real CLI ignores e.g. a bare `{"subtype":"interrupt"}`.
            _ => Ok(()),
        }
    }

    async fn accept_user(&mut self, frame: &mut Value) -> io::Result<()> {
        let uuid = frame.get("uuid").and_then(Value::as_str).map(str::to_owned);
        let sid = self.sid.clone();
        if let Some(u) = &uuid {
            if self.seen.contains(u) {
                // The real CLI drops a known uuid silently: completed, no turn, no result.
                return self.out.send(&lifecycle(u, "completed", &sid)).await;
            }
            self.seen.insert(u.clone());
            self.out.send(&lifecycle(u, "queued", &sid)).await?;
        }
        let content = frame
            .pointer_mut("/message/content")
            .map(Value::take)
            .unwrap_or(Value::Null);
        let prompt = prompt_text(&content);
        self.queue.push_back(Pending {
            uuid,
            content,
            prompt,
        });
        Ok(())
    }

    async fn control(&mut self, frame: &Value) -> io::Result<()> {
        let Some(id) = frame.get("request_id").and_then(Value::as_str) else {
            return Ok(());
        };
        let request = frame.get("request").unwrap_or(&Value::Null);
        let subtype = request.get("subtype").and_then(Value::as_str).unwrap_or("");
        match subtype {
            "initialize" => {
                let response = json!({
                    "commands": [], "agents": [], "output_style": "default",
                    "available_output_styles": ["default"],
                    "models": [{"value": "default", "displayName": "Default", "description": "fake"}],
                    "account": {},
                });
                self.out.send(&success(id, response)).await
            }
            "interrupt" => {
                let sid = self.sid.clone();
                if request.get("cancel_queued").and_then(Value::as_bool) == Some(true) {
                    for dropped in std::mem::take(&mut self.queue) {
                        if let Some(u) = dropped.uuid {
                            self.out.send(&lifecycle(&u, "cancelled", &sid)).await?;
                        }
                    }
                }
                let still_queued: Vec<&str> = self
                    .queue
                    .iter()
                    .filter_map(|p| p.uuid.as_deref())
                    .collect();
                self.out
                    .send(&success(id, json!({"still_queued": still_queued})))
                    .await?;
                // After the answer, as in the real CLI: the abort frames follow it.
                if let Some(running) = &self.running {
                    running.cancel.cancel();
                }
                Ok(())
            }
            "set_permission_mode" => {
                if let Some(mode) = request.get("mode").and_then(Value::as_str) {
                    self.permission_mode = mode.to_owned();
                }
                let mode = self.permission_mode.clone();
                self.out.send(&success(id, json!({"mode": mode}))).await?;
                let status = json!({
                    "type": "system", "subtype": "status", "status": null,
                    "permissionMode": mode, "session_id": self.sid.clone(),
                    "uuid": Uuid::new_v4().to_string(),
                });
                self.out.send(&status).await
            }
            "set_model" => {
                self.model = request
                    .get("model")
                    .and_then(Value::as_str)
                    .unwrap_or(DEFAULT_MODEL)
                    .to_owned();
                let model = self.model.clone();
                self.out.send(&success(id, json!({"model": model}))).await
            }
            other => {
                let error = json!({
                    "type": "control_response",
                    "response": {
                        "subtype": "error", "request_id": id,
                        "error": format!("Unsupported control request subtype: {other}"),
                        "error_code": "unsupported_request",
                    },
                });
                self.out.send(&error).await
            }
        }
    }
}

async fn join_turn(running: &mut Option<Running>) -> Result<(Session, TurnEnd), JoinError> {
    match running {
        Some(r) => (&mut r.handle.0).await,
        None => std::future::pending().await,
    }
}

/// What the session carries from turn to turn (and, through the transcript, across
/// `--resume`).
struct Session {
    sid: String,
    cwd: String,
    /// `None` with `--no-session-persistence`.
    transcript: Option<PathBuf>,
    /// The last transcript entry, for the `parentUuid` chain.
    parent: Option<String>,
    /// User prompts so far, this one included once a turn starts.
    turns: u64,
    /// Results printed by this process (`result_index`).
    results: u64,
    total_cost: f64,
    /// `modelUsage`: running totals per model.
    model_usage: Map<String, Value>,
}

enum Startup {
    /// `--resume` of an id without a transcript: a result frame, then exit 1.
    NotFound(String),
    /// A refusal printed to stderr, then exit 1.
    Refused(String),
}

/// Finds or creates the session the flags ask for, with the uuids it has already seen.
async fn open_session(opts: &Options) -> Result<(Session, HashSet<String>), Startup> {
    let cwd = opts.cwd.to_string_lossy().into_owned();
    let fresh = |id: Uuid| Session {
        sid: id.to_string(),
        cwd: cwd.clone(),
        transcript: opts
            .persist
            .then(|| transcript_path(&opts.home, &opts.cwd, id)),
        parent: None,
        turns: 0,
        results: 0,
        total_cost: 0.0,
        model_usage: Map::new(),
    };
    let existing = if let Some(id) = &opts.resume {
        let found = Uuid::parse_str(id)
            .ok()
            .and_then(|u| find_transcript(&opts.home, u).map(|path| (u, path)));
        Some(found.ok_or_else(|| Startup::NotFound(id.clone()))?)
    } else if opts.continue_session {
        newest_in_project(&opts.home, &opts.cwd).await
    } else {
        None
    };
    let Some((old_id, old_path)) = existing else {
        let id = opts.session_id.unwrap_or_else(Uuid::new_v4);
        if find_transcript(&opts.home, id).is_some() {
            return Err(Startup::Refused(format!(
                "Session ID {id} is already in use."
            )));
        }
        return Ok((fresh(id), HashSet::new()));
    };
    let text = tokio::fs::read_to_string(&old_path)
        .await
        .map_err(|e| Startup::Refused(format!("cannot read {}: {e}", old_path.display())))?;
    let mut session = if opts.fork_session {
        let session = fresh(opts.session_id.unwrap_or_else(Uuid::new_v4));
        if let Some(path) = &session.transcript {
            copy_transcript(&text, path)
                .await
                .map_err(|e| Startup::Refused(format!("cannot fork the session: {e}")))?;
        }
        session
    } else {
        let mut session = fresh(old_id);
        // Resuming appends to the file it was found in, whatever the cwd.
        session.transcript = opts.persist.then_some(old_path);
        session
    };
    let seen = replay_transcript(&text, &mut session);
    Ok((session, seen))
}

/// The newest non-empty transcript of the cwd's project (`--continue`).
async fn newest_in_project(home: &Path, cwd: &Path) -> Option<(Uuid, PathBuf)> {
    let dir = projects_dir(home).join(project_slug(cwd));
    let mut entries = tokio::fs::read_dir(dir).await.ok()?;
    let mut best: Option<(std::time::SystemTime, Uuid, PathBuf)> = None;
    while let Ok(Some(entry)) = entries.next_entry().await {
        let path = entry.path();
        let Some(id) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".jsonl"))
            .and_then(|n| Uuid::parse_str(n).ok())
        else {
            continue;
        };
        let Ok(meta) = entry.metadata().await else {
            continue;
        };
        let modified = meta.modified().unwrap_or(std::time::UNIX_EPOCH);
        if meta.len() > 0 && best.as_ref().is_none_or(|b| modified > b.0) {
            best = Some((modified, id, path));
        }
    }
    best.map(|(_, id, path)| (id, path))
}

async fn copy_transcript(text: &str, to: &Path) -> io::Result<()> {
    if let Some(dir) = to.parent() {
        tokio::fs::create_dir_all(dir).await?;
    }
    append_file(to, text).await
}

/// Restores the turn count, the seen uuids, the cost totals and the `parentUuid` chain
/// from a transcript. Unreadable lines are skipped, as a half-written last line must not
/// make a session unresumable.
fn replay_transcript(text: &str, session: &mut Session) -> HashSet<String> {
    let mut seen = HashSet::new();
    for entry in text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
    {
        let uuid = entry.get("uuid").and_then(Value::as_str);
        match entry.get("type").and_then(Value::as_str) {
            Some("user") => {
                if let Some(u) = uuid {
                    seen.insert(u.to_owned());
                }
                if is_prompt(entry.pointer("/message/content")) {
                    session.turns += 1;
                }
            }
            Some("cost-state") => {
                if let Some(total) = entry.get("totalCostUSD").and_then(Value::as_f64) {
                    session.total_cost = total;
                }
                if let Some(Value::Object(usage)) = entry.get("modelUsage") {
                    session.model_usage = usage.clone();
                }
            }
            _ => {}
        }
        if let Some(u) = uuid {
            session.parent = Some(u.to_owned());
        }
    }
    seen
}

/// A user entry that is a prompt, not a tool result or an interrupt marker.
fn is_prompt(content: Option<&Value>) -> bool {
    let marker = |t: &str| t.starts_with(INTERRUPT_MARKER_PREFIX);
    match content {
        Some(Value::String(s)) => !marker(s),
        Some(Value::Array(blocks)) => !blocks.iter().any(|b| {
            b.get("type").and_then(Value::as_str) == Some("tool_result")
                || b.get("text").and_then(Value::as_str).is_some_and(marker)
        }),
        _ => false,
    }
}

impl Session {
    /// Appends one entry with the fields every transcript line has. A failed write is
    /// reported and otherwise ignored: the turn itself must not fail because of it.
    async fn append(&mut self, mut entry: Value) {
        let Some(path) = self.transcript.clone() else {
            return;
        };
        if let Some(map) = entry.as_object_mut() {
            if map.contains_key("uuid") {
                map.insert("parentUuid".into(), json!(self.parent));
                map.insert("isSidechain".into(), json!(false));
                map.insert("userType".into(), json!("external"));
                map.insert("cwd".into(), json!(self.cwd));
                map.insert("version".into(), json!("fake"));
                map.insert("gitBranch".into(), json!(""));
                if let Some(u) = map.get("uuid").and_then(Value::as_str) {
                    self.parent = Some(u.to_owned());
                }
            }
            map.insert("sessionId".into(), json!(self.sid));
            map.insert("timestamp".into(), json!(now()));
        }
        let mut line = entry.to_string();
        line.push('\n');
        let written = async {
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await?;
            }
            append_file(&path, &line).await
        };
        if let Err(e) = written.await {
            eprintln!("fake claude: cannot write {}: {e}", path.display());
        }
    }

    /// Adds one turn's usage to the running totals; returns the turn's own
    /// `model_usage_since_last_result`.
    fn account(&mut self, model: &str, input: u64, output: u64, cost: f64) -> Value {
        self.total_cost += cost;
        let prev = self.model_usage.get(model);
        let n = |k: &str| {
            prev.and_then(|p| p.get(k))
                .and_then(Value::as_u64)
                .unwrap_or(0)
        };
        let c = prev
            .and_then(|p| p.get("costUSD"))
            .and_then(Value::as_f64)
            .unwrap_or(0.0);
        let total = model_usage_entry(
            n("inputTokens") + input,
            n("outputTokens") + output,
            c + cost,
        );
        self.model_usage.insert(model.to_owned(), total);
        let mut since = Map::new();
        since.insert(model.to_owned(), model_usage_entry(input, output, cost));
        Value::Object(since)
    }
}

async fn append_file(path: &Path, text: &str) -> io::Result<()> {
    let mut file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .await?;
    file.write_all(text.as_bytes()).await?;
    file.flush().await
}

/// Why a turn stopped early.
enum Stop {
    Aborted,
    Exit(i32),
    Output,
}

impl From<io::Error> for Stop {
    fn from(_: io::Error) -> Self {
        Self::Output
    }
}

enum Block {
    Text(String),
    ToolUse { id: String, input: Value },
}

/// One turn: the script of frames for one user message.
struct Turn {
    out: Out,
    opts: Arc<Options>,
    model: String,
    permission_mode: String,
    session: Session,
    cancel: CancellationToken,
    msg: Pending,
    /// The uuid of the prompt's transcript entry and replay (sent or made up).
    entry_uuid: String,
    /// This session's turn number, counting resumed history.
    k: u64,
    started: Instant,
    /// API calls so far (`num_turns`).
    calls: u64,
    usage_in: u64,
    usage_out: u64,
    /// Text deltas of the current call.
    call_deltas: u64,
    /// Streamed text whose complete `assistant` frame has not been printed yet.
    partial: String,
    message_id: String,
    /// The tool_use id while a tool runs.
    tool_running: Option<String>,
}

impl Turn {
    async fn run(mut self) -> (Session, TurnEnd) {
        let end = match self.play().await {
            Ok(is_error) => match self.lifecycle("completed").await {
                Ok(()) => TurnEnd::Finished { is_error },
                Err(_) => TurnEnd::OutputClosed,
            },
            Err(Stop::Aborted) => match self.abort().await {
                Ok(()) => TurnEnd::Finished { is_error: true },
                Err(_) => TurnEnd::OutputClosed,
            },
            Err(Stop::Exit(code)) => TurnEnd::Exit(code),
            Err(Stop::Output) => TurnEnd::OutputClosed,
        };
        (self.session, end)
    }

    /// Plays the turn up to and including its result; returns whether it was an error.
    async fn play(&mut self) -> Result<bool, Stop> {
        self.lifecycle("started").await?;
        let tools: Vec<&str> = TOOLS
            .iter()
            .copied()
            .filter(|t| self.opts.tool_allowed(t))
            .collect();
        let init = json!({
            "type": "system", "subtype": "init", "cwd": self.session.cwd,
            "session_id": self.session.sid, "tools": tools, "mcp_servers": [],
            "model": self.model, "permissionMode": self.permission_mode,
            "slash_commands": ["compact", "context", "cost"], "apiKeySource": "ANTHROPIC_API_KEY",
            "claude_code_version": "fake", "output_style": "default",
            "agents": ["general-purpose"], "skills": [], "plugins": [], "capabilities": [],
            "uuid": Uuid::new_v4().to_string(),
        });
        self.emit(&init).await?;
        self.status_requesting().await?;
        if self.opts.replay_user_messages {
            let replay = json!({
                "type": "user", "message": {"role": "user", "content": self.msg.content},
                "parent_tool_use_id": null, "session_id": self.session.sid,
                "uuid": self.entry_uuid, "timestamp": now(), "isReplay": true,
            });
            self.emit(&replay).await?;
        }
        let entry = json!({
            "type": "user", "message": {"role": "user", "content": self.msg.content},
            "uuid": self.entry_uuid, "permissionMode": self.permission_mode,
            "promptSource": "sdk", "entrypoint": "sdk-cli",
        });
        self.session.append(entry).await;

        let prompt = self.msg.prompt.clone();
        if prompt.contains("[[exit]]") {
            return self.crash().await;
        }
        if prompt.contains("[[fail]]") {
            return self.api_error().await;
        }
        if let Some(cmd) = bash_marker(&prompt) {
            return self.bash(cmd).await;
        }
        if let Some(mb) = grow_marker(&prompt) {
            grow(mb);
        }
        let slow = prompt.contains("[[slow]]");
        let chars = if slow {
            self.opts.reply_chars.max(40)
        } else {
            self.opts.reply_chars
        };
        let text = reply_text(self.k, prompt.trim(), chars);
        self.api_call(vec![Block::Text(text.clone())], "end_turn", slow)
            .await?;
        self.finish_success(text).await
    }

    /// One model call: stream events interleaved with one `assistant` frame per block.
    async fn api_call(
        &mut self,
        blocks: Vec<Block>,
        stop_reason: &str,
        slow: bool,
    ) -> Result<(), Stop> {
        self.check()?;
        if self.calls > 0 {
            self.status_requesting().await?;
        }
        self.calls += 1;
        self.call_deltas = 0;
        self.message_id = format!("msg_fake_{}", hex24());
        let input = self
            .opts
            .input_tokens
            .unwrap_or(10 + count(&self.msg.prompt));
        self.usage_in += input;
        let start = json!({
            "type": "message_start",
            "message": {
                "id": self.message_id, "type": "message", "role": "assistant",
                "model": self.model, "content": [], "stop_reason": null,
                "stop_sequence": null, "usage": usage_json(input, 1),
            },
        });
        self.stream(start, Some(self.started.elapsed())).await?;
        let mut content = Vec::new();
        for (index, block) in blocks.into_iter().enumerate() {
            let full = match block {
                Block::Text(text) => {
                    let start = json!({"type": "content_block_start", "index": index,
                        "content_block": {"type": "text", "text": ""}});
                    self.stream(start, None).await?;
                    let (n, delay) = if slow {
                        (40, Duration::from_millis(100))
                    } else {
                        (self.opts.deltas, self.opts.delay)
                    };
                    // Without a delay the deltas are a burst: written back to back and
                    // flushed once, as a fast model's output arrives in a pipe.
                    let burst = delay.is_zero();
                    for chunk in split_chunks(&text, n) {
                        self.pause(delay).await?;
                        self.partial.push_str(chunk);
                        self.call_deltas += 1;
                        let delta = json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "text_delta", "text": chunk}});
                        self.stream_frame(delta, None, !burst).await?;
                    }
                    if burst {
                        self.out.flush().await?;
                    }
                    json!({"type": "text", "text": text})
                }
                Block::ToolUse { id, input } => {
                    let start = json!({"type": "content_block_start", "index": index,
                        "content_block": {"type": "tool_use", "id": id, "name": "Bash", "input": {}}});
                    self.stream(start, None).await?;
                    let json_text = input.to_string();
                    for chunk in split_chunks(&json_text, 3) {
                        self.pause(self.opts.delay).await?;
                        let delta = json!({"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": chunk}});
                        self.stream(delta, None).await?;
                    }
                    json!({"type": "tool_use", "id": id, "name": "Bash", "input": input})
                }
            };
            self.check()?;
            // The complete block comes before its content_block_stop, as in the real CLI.
            self.assistant(full.clone(), input).await?;
            self.partial.clear();
            self.stream(json!({"type": "content_block_stop", "index": index}), None)
                .await?;
            content.push(full);
        }
        let output = self.opts.output_tokens.unwrap_or(1 + self.call_deltas);
        self.usage_out += output;
        self.call_deltas = 0;
        let delta = json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": output}});
        self.stream(delta, None).await?;
        self.stream(json!({"type": "message_stop"}), None).await?;
        let entry = json!({
            "type": "assistant",
            "message": {
                "id": self.message_id, "type": "message", "role": "assistant",
                "model": self.model, "content": content, "stop_reason": stop_reason,
                "stop_sequence": null, "usage": usage_json(input, output),
            },
            "requestId": format!("req_fake_{}", hex24()), "requestedModel": self.model,
            "uuid": Uuid::new_v4().to_string(),
        });
        self.session.append(entry).await;
        Ok(())
    }

    /// `[[bash:CMD]]`: tool_use, the command really run, its tool_result, a final text.
    async fn bash(&mut self, cmd: &str) -> Result<bool, Stop> {
        let id = format!("toolu_fake_{}", hex24());
        let input = json!({"command": cmd, "description": "fake tool call"});
        self.api_call(
            vec![Block::ToolUse {
                id: id.clone(),
                input,
            }],
            "tool_use",
            false,
        )
        .await?;
        self.tool_running = Some(id.clone());
        let (content, is_error, structured) = if self.opts.tool_allowed("Bash") {
            self.run_command(cmd).await?
        } else {
            let msg = "<tool_use_error>Error: No such tool available: Bash</tool_use_error>";
            (msg.to_owned(), true, Value::String(msg.to_owned()))
        };
        self.tool_running = None;
        let message = json!({"role": "user", "content": [{"tool_use_id": id,
            "type": "tool_result", "content": content, "is_error": is_error}]});
        let uuid = Uuid::new_v4().to_string();
        let frame = json!({
            "type": "user", "message": message, "parent_tool_use_id": null,
            "session_id": self.session.sid, "uuid": uuid, "timestamp": now(),
            "tool_use_result": structured,
        });
        self.emit(&frame).await?;
        let entry = json!({"type": "user", "message": message, "uuid": uuid,
            "toolUseResult": structured});
        self.session.append(entry).await;
        if self.opts.max_turns.is_some_and(|max| self.calls >= max) {
            return self.finish_max_turns().await;
        }
        let text = format!("FAKE-TOOL-RESULT: {content}");
        self.api_call(vec![Block::Text(text.clone())], "end_turn", false)
            .await?;
        self.finish_success(text).await
    }

    /// Runs `sh -c cmd` in the cwd; returns the tool result text, whether it failed, and the
    /// structured `tool_use_result`. An interrupt kills the child (`kill_on_drop`).
    async fn run_command(&self, cmd: &str) -> Result<(String, bool, Value), Stop> {
        let child = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .current_dir(&self.opts.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn();
        let child = match child {
            Ok(child) => child,
            Err(e) => {
                let msg = format!("cannot run sh: {e}");
                return Ok((msg.clone(), true, Value::String(msg)));
            }
        };
        let output = tokio::select! {
            output = child.wait_with_output() => output,
            () = self.cancel.cancelled() => return Err(Stop::Aborted),
        };
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                let msg = format!("cannot run sh: {e}");
                return Ok((msg.clone(), true, Value::String(msg)));
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout)
            .trim_end()
            .to_owned();
        let stderr = String::from_utf8_lossy(&output.stderr)
            .trim_end()
            .to_owned();
        let mut text = [stdout.as_str(), stderr.as_str()]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let failed = !output.status.success();
        if failed {
            let code = output
                .status
                .code()
                .map_or_else(|| "signal".to_owned(), |c| c.to_string());
            text = format!("Exit code {code}\n{text}").trim_end().to_owned();
        }
        let structured = json!({"stdout": stdout, "stderr": stderr, "interrupted": false,
            "isImage": false});
        Ok((text, failed, structured))
    }

    /// `[[fail]]`: what a non-retried API error (400) looks like.
    async fn api_error(&mut self) -> Result<bool, Stop> {
        self.check()?;
        self.calls += 1;
        let message = json!({
            "id": Uuid::new_v4().to_string(), "container": null, "model": "<synthetic>",
            "role": "assistant", "stop_reason": "stop_sequence", "stop_sequence": "",
            "type": "message", "usage": usage_json(0, 0),
            "content": [{"type": "text", "text": FAIL_TEXT}],
        });
        let uuid = Uuid::new_v4().to_string();
        let frame = json!({
            "type": "assistant", "message": message, "parent_tool_use_id": null,
            "session_id": self.session.sid, "uuid": uuid, "error": "invalid_request",
            "is_api_error_message": true, "api_error_status": 400,
        });
        self.emit(&frame).await?;
        let entry = json!({"type": "assistant", "message": message, "uuid": uuid,
            "isApiErrorMessage": true, "error": "invalid_request"});
        self.session.append(entry).await;
        let result = self.result_frame(
            "success",
            true,
            json!({"api_error_status": 400, "result": FAIL_TEXT, "stop_reason": "stop_sequence",
                "terminal_reason": "api_error"}),
            Some((0, 0, 0.0)),
        );
        self.emit(&result).await?;
        self.save_cost().await;
        Ok(true)
    }

    /// `[[exit]]`: dies in the middle of streaming, without a result.
    async fn crash(&mut self) -> Result<bool, Stop> {
        self.calls += 1;
        self.message_id = format!("msg_fake_{}", hex24());
        let start = json!({"type": "message_start", "message": {"id": self.message_id,
            "type": "message", "role": "assistant", "model": self.model, "content": [],
            "stop_reason": null, "stop_sequence": null, "usage": usage_json(1, 1)}});
        self.stream(start, Some(self.started.elapsed())).await?;
        let block = json!({"type": "content_block_start", "index": 0,
            "content_block": {"type": "text", "text": ""}});
        self.stream(block, None).await?;
        Err(Stop::Exit(CRASH_EXIT))
    }

    async fn finish_success(&mut self, text: String) -> Result<bool, Stop> {
        let result = self.result_frame(
            "success",
            false,
            json!({"result": text, "stop_reason": "end_turn", "terminal_reason": "completed"}),
            None,
        );
        self.emit(&result).await?;
        self.save_cost().await;
        Ok(false)
    }

    async fn finish_max_turns(&mut self) -> Result<bool, Stop> {
        let result = self.result_frame(
            "error_max_turns",
            true,
            json!({"stop_reason": "tool_use", "terminal_reason": "max_turns", "errors": []}),
            None,
        );
        self.emit(&result).await?;
        self.save_cost().await;
        Ok(true)
    }

    /// The interrupt frames: the partial text, the marker, the result, `cancelled`.
    async fn abort(&mut self) -> Result<(), Stop> {
        let in_tool = self.tool_running.is_some();
        if !self.partial.is_empty() {
            let partial = std::mem::take(&mut self.partial);
            let input = self
                .opts
                .input_tokens
                .unwrap_or(10 + count(&self.msg.prompt));
            self.assistant(json!({"type": "text", "text": partial}), input)
                .await?;
        }
        // Output already streamed is billed, as a cut stream is by the API.
        self.usage_out += self.call_deltas;
        if let Some(id) = self.tool_running.take() {
            let frame = json!({
                "type": "user",
                "message": {"role": "user", "content": [{"type": "tool_result",
                    "tool_use_id": id, "content": TOOL_REJECTED, "is_error": true}]},
                "parent_tool_use_id": null, "session_id": self.session.sid,
                "uuid": Uuid::new_v4().to_string(), "timestamp": now(),
                "tool_use_result": format!("Error: {TOOL_REJECTED}"),
            });
            self.emit(&frame).await?;
        }
        let marker = if in_tool {
            INTERRUPTED_FOR_TOOL
        } else {
            INTERRUPTED
        };
        let message = json!({"role": "user", "content": [{"type": "text", "text": marker}]});
        let uuid = Uuid::new_v4().to_string();
        let frame = json!({"type": "user", "message": message, "parent_tool_use_id": null,
            "session_id": self.session.sid, "uuid": uuid, "timestamp": now()});
        self.emit(&frame).await?;
        self.session
            .append(json!({"type": "user", "message": message, "uuid": uuid}))
            .await;
        let reason = if in_tool {
            "aborted_tools"
        } else {
            "aborted_streaming"
        };
        let result = self.result_frame(
            "error_during_execution",
            true,
            json!({"stop_reason": null, "terminal_reason": reason, "errors": []}),
            None,
        );
        self.emit(&result).await?;
        self.save_cost().await;
        self.lifecycle("cancelled").await?;
        Ok(())
    }

    /// A result frame; `usage` overrides the turn's (input, output, cost), which also goes
    /// into the running totals.
    fn result_frame(
        &mut self,
        subtype: &str,
        is_error: bool,
        extra: Value,
        usage: Option<(u64, u64, f64)>,
    ) -> Value {
        let (input, output, cost) = usage.unwrap_or_else(|| {
            let input = self.opts.input_tokens.unwrap_or(self.usage_in);
            let output = self.opts.output_tokens.unwrap_or(self.usage_out);
            let cost = self
                .opts
                .cost_usd
                .unwrap_or(input as f64 * 3e-6 + output as f64 * 15e-6);
            (input, output, cost)
        });
        let since = if input == 0 && output == 0 && cost == 0.0 {
            json!({})
        } else {
            self.session.account(&self.model, input, output, cost)
        };
        let duration = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        let mut frame = json!({
            "type": "result", "subtype": subtype, "is_error": is_error,
            "duration_ms": duration, "duration_api_ms": duration, "num_turns": self.calls,
            "session_id": self.session.sid, "total_cost_usd": self.session.total_cost,
            "usage": usage_json(input, output), "modelUsage": self.session.model_usage,
            "model_usage_since_last_result": since, "permission_denials": [],
            "result_index": self.session.results, "uuid": Uuid::new_v4().to_string(),
        });
        self.session.results += 1;
        if let (Some(map), Value::Object(extra)) = (frame.as_object_mut(), extra) {
            map.extend(extra);
            if let Some(u) = &self.msg.uuid {
                map.insert("user_message_uuid".into(), json!(u));
            }
        }
        frame
    }

    /// The running totals, as the real CLI saves them for `--resume`.
    async fn save_cost(&mut self) {
        let entry = json!({"type": "cost-state", "totalCostUSD": self.session.total_cost,
            "modelUsage": self.session.model_usage});
        self.session.append(entry).await;
    }

    async fn assistant(&self, block: Value, input: u64) -> Result<(), Stop> {
        let frame = json!({
            "type": "assistant",
            "message": {
                "id": self.message_id, "type": "message", "role": "assistant",
                "model": self.model, "content": [block], "stop_reason": null,
                "stop_sequence": null, "usage": usage_json(input, 1),
            },
            "parent_tool_use_id": null, "session_id": self.session.sid,
            "uuid": Uuid::new_v4().to_string(),
            "request_id": format!("req_fake_{}", hex24()), "timestamp": now(),
        });
        self.emit(&frame).await
    }

    async fn status_requesting(&self) -> Result<(), Stop> {
        let uuids: Vec<&str> = self.msg.uuid.iter().map(String::as_str).collect();
        let status = json!({
            "type": "system", "subtype": "status", "status": "requesting",
            "permissionMode": self.permission_mode, "user_message_uuids": uuids,
            "session_id": self.session.sid, "uuid": Uuid::new_v4().to_string(),
        });
        self.emit(&status).await
    }

    /// A `stream_event`, only with `--include-partial-messages`.
    async fn stream(&self, event: Value, ttft: Option<Duration>) -> Result<(), Stop> {
        self.stream_frame(event, ttft, true).await
    }

    async fn stream_frame(
        &self,
        event: Value,
        ttft: Option<Duration>,
        flush: bool,
    ) -> Result<(), Stop> {
        if !self.opts.include_partial_messages {
            return Ok(());
        }
        let mut frame = json!({
            "type": "stream_event", "event": event, "session_id": self.session.sid,
            "parent_tool_use_id": null, "uuid": Uuid::new_v4().to_string(),
        });
        if let (Some(ttft), Some(map)) = (ttft, frame.as_object_mut()) {
            let ms = u64::try_from(ttft.as_millis()).unwrap_or(u64::MAX);
            map.insert("ttft_ms".into(), json!(ms));
        }
        Ok(self.out.write(&frame, flush).await?)
    }

    async fn lifecycle(&self, state: &str) -> Result<(), Stop> {
        match &self.msg.uuid {
            Some(u) => self.emit(&lifecycle(u, state, &self.session.sid)).await,
            None => Ok(()),
        }
    }

    async fn emit(&self, frame: &Value) -> Result<(), Stop> {
        Ok(self.out.send(frame).await?)
    }

    fn check(&self) -> Result<(), Stop> {
        if self.cancel.is_cancelled() {
            Err(Stop::Aborted)
        } else {
            Ok(())
        }
    }

    /// Waits before a delta; an interrupt cuts the wait short.
    async fn pause(&self, delay: Duration) -> Result<(), Stop> {
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.cancel.cancelled() => {}
            }
        }
        self.check()
    }
}

fn lifecycle(uuid: &str, state: &str, sid: &str) -> Value {
    json!({"type": "command_lifecycle", "command_uuid": uuid, "state": state,
        "session_id": sid, "uuid": Uuid::new_v4().to_string()})
}

fn success(request_id: &str, response: Value) -> Value {
    json!({"type": "control_response",
        "response": {"subtype": "success", "request_id": request_id, "response": response}})
}

fn usage_json(input: u64, output: u64) -> Value {
    json!({
        "input_tokens": input, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
        "output_tokens": output,
        "server_tool_use": {"web_search_requests": 0, "web_fetch_requests": 0},
        "service_tier": "standard",
        "cache_creation": {"ephemeral_1h_input_tokens": 0, "ephemeral_5m_input_tokens": 0},
    })
}

fn model_usage_entry(input: u64, output: u64, cost: f64) -> Value {
    json!({
        "inputTokens": input, "outputTokens": output, "cacheReadInputTokens": 0,
        "cacheCreationInputTokens": 0, "webSearchRequests": 0, "costUSD": cost,
        "contextWindow": 200_000, "maxOutputTokens": 32_000,
    })
}

/// The prompt of a user message: a string as is, else its text blocks joined with `\n`.
fn prompt_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(blocks) => blocks
            .iter()
            .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
            .filter_map(|b| b.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// `FAKE-ECHO(turn K): <prompt>`, cut or padded with `.` to exactly `chars` characters.
fn reply_text(turn: u64, prompt: &str, chars: usize) -> String {
    let mut text: String = format!("FAKE-ECHO(turn {turn}): {prompt}")
        .chars()
        .take(chars)
        .collect();
    let len = text.chars().count();
    text.extend(std::iter::repeat_n('.', chars.saturating_sub(len)));
    text
}

/// The MiB of a `[[grow:MB]]` marker.
fn grow_marker(prompt: &str) -> Option<usize> {
    let start = prompt.find("[[grow:")? + "[[grow:".len();
    let len = prompt[start..].find("]]")?;
    prompt[start..start + len].parse().ok()
}

/// Keeps `mb` MiB resident for the rest of the process's life (written, so really resident).
fn grow(mb: usize) {
    static BALLAST: std::sync::Mutex<Vec<Vec<u8>>> = std::sync::Mutex::new(Vec::new());
    BALLAST
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(vec![1u8; mb << 20]);
}

/// The command of a `[[bash:CMD]]` marker.
fn bash_marker(prompt: &str) -> Option<&str> {
    let start = prompt.find("[[bash:")? + "[[bash:".len();
    let len = prompt[start..].find("]]")?;
    Some(&prompt[start..start + len])
}

/// Splits text into `n` nearly equal non-empty pieces on character boundaries (fewer when
/// the text is shorter than `n` characters, none when it is empty).
fn split_chunks(text: &str, n: usize) -> Vec<&str> {
    let bounds: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain(std::iter::once(text.len()))
        .collect();
    let chars = bounds.len() - 1;
    if chars == 0 {
        return Vec::new();
    }
    let n = n.clamp(1, chars);
    (0..n)
        .map(|i| &text[bounds[i * chars / n]..bounds[(i + 1) * chars / n]])
        .collect()
}

fn count(text: &str) -> u64 {
    u64::try_from(text.chars().count()).unwrap_or(u64::MAX)
}

fn hex24() -> String {
    let mut id = Uuid::new_v4().simple().to_string();
    id.truncate(24);
    id
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use tokio::io::{DuplexStream, Lines};
    use tokio::time::timeout;

    use super::*;
    use crate::provider::claude_code::protocol::{
        self, CommandState, ContentBlock, Frame, ResultFrame, ResultOutcome, StreamEvent,
    };

    const WAIT: Duration = Duration::from_secs(10);

    /// A fake agent served over in-memory pipes, plus its home and workspace.
    struct Fake {
        stdin: Option<DuplexStream>,
        stdout: Lines<BufReader<DuplexStream>>,
        task: JoinHandle<i32>,
    }

    struct Dirs {
        home: tempfile::TempDir,
        cwd: tempfile::TempDir,
    }

    impl Dirs {
        fn new() -> Self {
            Self {
                home: tempfile::tempdir().expect("home"),
                cwd: tempfile::tempdir().expect("cwd"),
            }
        }

        /// The worker's usual argv plus `extra`.
        fn opts(&self, extra: &[&str]) -> Options {
            let mut args: Vec<String> = [
                "-p",
                "--input-format",
                "stream-json",
                "--output-format",
                "stream-json",
                "--verbose",
                "--include-partial-messages",
                "--replay-user-messages",
                "--permission-prompt-tool",
                "stdio",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            args.extend(extra.iter().map(|s| s.to_string()));
            Options::parse_in(&args, self.home.path().into(), self.cwd.path().into())
                .expect("options")
        }
    }

    impl Fake {
        fn start(opts: Options) -> Self {
            let (stdin, agent_stdin) = tokio::io::duplex(1 << 16);
            let (agent_stdout, stdout) = tokio::io::duplex(1 << 16);
            Self {
                stdin: Some(stdin),
                stdout: BufReader::new(stdout).lines(),
                task: tokio::spawn(serve(opts, agent_stdin, agent_stdout)),
            }
        }

        async fn send(&mut self, line: &str) {
            let stdin = self.stdin.as_mut().expect("stdin open");
            stdin.write_all(line.as_bytes()).await.expect("write");
            stdin.write_all(b"\n").await.expect("write");
        }

        /// Sends a prompt with a fresh uuid and returns the uuid.
        async fn say(&mut self, text: &str) -> String {
            let uuid = Uuid::new_v4();
            self.send(&protocol::user_message(text, uuid)).await;
            uuid.to_string()
        }

        /// The next frame, or `None` at EOF.
        async fn next(&mut self) -> Option<Frame> {
            let line = timeout(WAIT, self.stdout.next_line())
                .await
                .expect("a frame in time")
                .expect("readable");
            line.map(|l| protocol::parse_line(&l).expect("the fake prints JSON"))
        }

        async fn frame(&mut self) -> Frame {
            self.next().await.expect("a frame, not EOF")
        }

        /// Frames up to and including the final `command_lifecycle` of `uuid`.
        async fn turn(&mut self, uuid: &str) -> Vec<Frame> {
            let mut frames = Vec::new();
            loop {
                let frame = self.frame().await;
                let done = matches!(&frame, Frame::CommandLifecycle { command_uuid, state }
                    if command_uuid == uuid && state.is_final());
                frames.push(frame);
                if done {
                    return frames;
                }
            }
        }

        /// Frames until `pred` matches (inclusive).
        async fn until(&mut self, pred: impl Fn(&Frame) -> bool) -> Vec<Frame> {
            let mut frames = Vec::new();
            loop {
                let frame = self.frame().await;
                let done = pred(&frame);
                frames.push(frame);
                if done {
                    return frames;
                }
            }
        }

        /// Everything printed until EOF, and the exit code.
        async fn drain(mut self) -> (Vec<Frame>, i32) {
            let mut frames = Vec::new();
            while let Some(frame) = self.next().await {
                frames.push(frame);
            }
            let code = timeout(WAIT, self.task).await.expect("exit").expect("join");
            (frames, code)
        }

        /// Closes stdin and returns the exit code.
        async fn close(mut self) -> i32 {
            self.stdin = None;
            let (frames, code) = self.drain().await;
            assert!(frames.is_empty(), "unexpected frames at close: {frames:?}");
            code
        }
    }

    fn kind(frame: &Frame) -> String {
        match frame {
            Frame::CommandLifecycle { state, .. } => format!("lifecycle:{}", state.as_str()),
            Frame::SystemInit { .. } => "init".into(),
            Frame::SystemStatus { .. } => "status".into(),
            Frame::System { subtype, .. } => format!("system:{subtype}"),
            Frame::StreamEvent(ev) => match ev {
                StreamEvent::MessageStart { .. } => "message_start",
                StreamEvent::ContentBlockStart { .. } => "block_start",
                StreamEvent::TextDelta { .. } => "text_delta",
                StreamEvent::InputJsonDelta { .. } => "json_delta",
                StreamEvent::ContentBlockStop { .. } => "block_stop",
                StreamEvent::MessageDelta { .. } => "message_delta",
                StreamEvent::MessageStop => "message_stop",
                _ => "other_event",
            }
            .into(),
            Frame::Assistant(a) if a.is_api_error => "assistant:api_error".into(),
            Frame::Assistant(a) => match a.block {
                ContentBlock::Text { .. } => "assistant:text".into(),
                ContentBlock::ToolUse { .. } => "assistant:tool_use".into(),
                _ => "assistant:other".into(),
            },
            Frame::User(u) if u.is_replay => "user:replay".into(),
            Frame::User(u) if u.interrupt_marker => "user:marker".into(),
            Frame::User(u) if !u.tool_results.is_empty() => "user:tool_result".into(),
            Frame::User(_) => "user".into(),
            Frame::ControlResponse { .. } => "control_response".into(),
            Frame::Result(r) => format!("result:{}", r.subtype),
            other => format!("other:{other:?}"),
        }
    }

    fn kinds(frames: &[Frame]) -> Vec<String> {
        frames.iter().map(kind).collect()
    }

    fn result(frames: &[Frame]) -> &ResultFrame {
        frames
            .iter()
            .find_map(|f| match f {
                Frame::Result(r) => Some(r),
                _ => None,
            })
            .expect("a result")
    }

    fn streamed_text(frames: &[Frame]) -> String {
        frames
            .iter()
            .filter_map(|f| match f {
                Frame::StreamEvent(StreamEvent::TextDelta { text, .. }) => Some(text.as_str()),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn handshake_and_silence() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&[]));
        // Nothing is printed before the first stdin line.
        assert!(
            timeout(Duration::from_millis(100), fake.stdout.next_line())
                .await
                .is_err()
        );
        fake.send(&protocol::initialize_request("init-1")).await;
        match fake.frame().await {
            Frame::ControlResponse {
                request_id,
                ok,
                response,
                error,
            } => {
                assert_eq!(request_id, "init-1");
                assert!(ok);
                assert!(response["commands"].is_array());
                assert_eq!(error, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(fake.close().await, 0);
    }

    #[tokio::test]
    async fn two_turns_in_order() {
        let dirs = Dirs::new();
        let sid = Uuid::new_v4();
        let sid_arg = sid.to_string();
        let mut fake = Fake::start(dirs.opts(&[
            "--session-id",
            &sid_arg,
            "--model",
            "claude-sonnet-4-6",
            "--fake-input-tokens",
            "100",
            "--fake-output-tokens",
            "7",
            "--fake-cost-usd",
            "0.01",
        ]));
        let u1 = fake.say("hello").await;
        let frames = fake.turn(&u1).await;
        assert_eq!(
            kinds(&frames),
            [
                "lifecycle:queued",
                "lifecycle:started",
                "init",
                "status",
                "user:replay",
                "message_start",
                "block_start",
                "text_delta",
                "text_delta",
                "text_delta",
                "assistant:text",
                "block_stop",
                "message_delta",
                "message_stop",
                "result:success",
                "lifecycle:completed",
            ]
        );
        let Frame::SystemInit {
            session_id,
            model,
            cwd,
            permission_mode,
            raw,
        } = &frames[2]
        else {
            panic!()
        };
        assert_eq!(session_id, &sid_arg);
        assert_eq!(model, "claude-sonnet-4-6");
        assert_eq!(cwd, &dirs.cwd.path().to_string_lossy());
        assert_eq!(permission_mode, "default");
        assert_eq!(raw["claude_code_version"], "fake");
        assert!(matches!(&frames[4], Frame::User(u) if u.uuid.as_deref() == Some(u1.as_str())));

        let want = reply_text(1, "hello", 40);
        assert!(want.starts_with("FAKE-ECHO(turn 1): hello"));
        assert_eq!(want.chars().count(), 40);
        assert_eq!(streamed_text(&frames), want);
        assert!(matches!(&frames[10], Frame::Assistant(a) if a.text() == Some(want.as_str())));
        let r1 = result(&frames).clone();
        assert_eq!(r1.outcome(), ResultOutcome::Success);
        assert_eq!(r1.result.as_deref(), Some(want.as_str()));
        assert_eq!(r1.usage.input_tokens, 100);
        assert_eq!(r1.usage.output_tokens, 7);
        assert_eq!(r1.num_turns, 1);
        assert_eq!(r1.session_id, sid_arg);
        assert_eq!(r1.user_message_uuids, std::slice::from_ref(&u1));
        assert_eq!(r1.total_cost_usd, Some(0.01));
        assert!((r1.turn_cost_usd(None) - 0.01).abs() < 1e-12);
        assert_eq!(r1.model().as_deref(), Some("claude-sonnet-4-6"));

        let u2 = fake.say("again").await;
        let frames = fake.turn(&u2).await;
        let r2 = result(&frames);
        assert!(
            r2.result
                .as_deref()
                .is_some_and(|t| t.starts_with("FAKE-ECHO(turn 2): again"))
        );
        assert!((r2.total_cost_usd.unwrap_or_default() - 0.02).abs() < 1e-12);
        assert!((r2.turn_cost_usd(r1.total_cost_usd) - 0.01).abs() < 1e-12);
        assert_eq!(fake.close().await, 0);

        let transcript = transcript_path(dirs.home.path(), dirs.cwd.path(), sid);
        let text = std::fs::read_to_string(&transcript).expect("transcript");
        assert!(text.contains(&u1) && text.contains(&u2));
    }

    #[tokio::test]
    async fn queued_message_runs_after() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&["--fake-delay-ms", "30", "--fake-deltas", "4"]));
        let u1 = fake.say("first").await;
        let mut frames = fake
            .until(|f| {
                matches!(
                    f,
                    Frame::CommandLifecycle {
                        state: CommandState::Started,
                        ..
                    }
                )
            })
            .await;
        let u2 = fake.say("second").await;
        frames.extend(fake.turn(&u2).await);
        let position =
            |pred: &dyn Fn(&Frame) -> bool| frames.iter().position(pred).expect("frame present");
        let queued2 = position(&|f| {
            matches!(f, Frame::CommandLifecycle { command_uuid, state: CommandState::Queued }
                if *command_uuid == u2)
        });
        let completed1 = position(&|f| {
            matches!(f, Frame::CommandLifecycle { command_uuid, state: CommandState::Completed }
                if *command_uuid == u1)
        });
        let started2 = position(&|f| {
            matches!(f, Frame::CommandLifecycle { command_uuid, state: CommandState::Started }
                if *command_uuid == u2)
        });
        assert!(
            queued2 < completed1,
            "queued at once, while the first turn runs"
        );
        assert!(completed1 < started2, "one turn at a time");
        let results: Vec<&ResultFrame> = frames
            .iter()
            .filter_map(|f| match f {
                Frame::Result(r) => Some(r),
                _ => None,
            })
            .collect();
        assert_eq!(results.len(), 2);
        assert_eq!(results[0].user_message_uuids, [u1]);
        assert_eq!(results[1].user_message_uuids, [u2]);
        assert!(
            results[1]
                .result
                .as_deref()
                .is_some_and(|t| t.contains("(turn 2)"))
        );
        assert_eq!(fake.close().await, 0);
    }

    #[tokio::test]
    async fn interrupt_aborts_quickly_and_keeps_process() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&[]));
        let u1 = fake.say("[[slow]] go").await;
        fake.until(|f| matches!(f, Frame::StreamEvent(StreamEvent::TextDelta { .. })))
            .await;
        let asked = Instant::now();
        fake.send(&protocol::interrupt_request("int-1")).await;
        let frames = fake.turn(&u1).await;
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        let tail: Vec<String> = kinds(&frames)
            .into_iter()
            .skip_while(|k| k != "control_response")
            .collect();
        assert_eq!(
            tail,
            [
                "control_response",
                "assistant:text",
                "user:marker",
                "result:error_during_execution",
                "lifecycle:cancelled"
            ]
        );
        let partial = frames
            .iter()
            .find_map(|f| match f {
                Frame::Assistant(a) => a.text().map(str::to_owned),
                _ => None,
            })
            .expect("partial text");
        let full = reply_text(1, "[[slow]] go", 40);
        assert!(
            full.starts_with(&partial) && partial.len() < full.len(),
            "{partial}"
        );
        let r = result(&frames);
        assert_eq!(r.outcome(), ResultOutcome::Interrupted);
        assert_eq!(r.terminal_reason.as_deref(), Some("aborted_streaming"));
        assert_eq!(r.result, None);

        // Idle: the interrupt is answered and does nothing else.
        fake.send(&protocol::interrupt_request("int-2")).await;
        assert!(matches!(fake.frame().await,
            Frame::ControlResponse { request_id, ok: true, .. } if request_id == "int-2"));
        let u2 = fake.say("after").await;
        let frames = fake.turn(&u2).await;
        assert_eq!(result(&frames).outcome(), ResultOutcome::Success);
        assert!(streamed_text(&frames).starts_with("FAKE-ECHO(turn 2): after"));
        assert_eq!(fake.close().await, 0);
    }

    #[tokio::test]
    async fn repeated_uuid_is_dropped() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&[]));
        let u1 = fake.say("one").await;
        fake.turn(&u1).await;
        let same = Uuid::parse_str(&u1).expect("uuid");
        fake.send(&protocol::user_message("one again", same)).await;
        assert!(matches!(fake.frame().await,
            Frame::CommandLifecycle { command_uuid, state: CommandState::Completed }
                if command_uuid == u1));
        let u2 = fake.say("two").await;
        let frames = fake.turn(&u2).await;
        assert_eq!(kind(&frames[0]), "lifecycle:queued", "nothing in between");
        assert!(streamed_text(&frames).starts_with("FAKE-ECHO(turn 2): two"));
        assert_eq!(fake.close().await, 0);
    }

    #[tokio::test]
    async fn bash_round_trip() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&[]));
        let u1 = fake.say("run it [[bash:pwd; echo oops >&2]]").await;
        let frames = fake.turn(&u1).await;
        assert_eq!(
            kinds(&frames),
            [
                "lifecycle:queued",
                "lifecycle:started",
                "init",
                "status",
                "user:replay",
                "message_start",
                "block_start",
                "json_delta",
                "json_delta",
                "json_delta",
                "assistant:tool_use",
                "block_stop",
                "message_delta",
                "message_stop",
                "user:tool_result",
                "status",
                "message_start",
                "block_start",
                "text_delta",
                "text_delta",
                "text_delta",
                "assistant:text",
                "block_stop",
                "message_delta",
                "message_stop",
                "result:success",
                "lifecycle:completed",
            ]
        );
        let Frame::Assistant(call) = &frames[10] else {
            panic!()
        };
        let ContentBlock::ToolUse { id, name, input } = &call.block else {
            panic!("{call:?}")
        };
        assert_eq!(name, "Bash");
        assert_eq!(input["command"], "pwd; echo oops >&2");
        assert!(input["description"].is_string());
        let Frame::User(user) = &frames[14] else {
            panic!()
        };
        let cwd = dirs.cwd.path().to_string_lossy();
        assert_eq!(user.tool_results[0].tool_use_id, *id);
        assert_eq!(user.tool_results[0].content, format!("{cwd}\noops"));
        assert!(!user.tool_results[0].is_error);
        assert_eq!(user.tool_use_result["stderr"], "oops");
        let r = result(&frames);
        assert_eq!(r.num_turns, 2);
        assert_eq!(
            r.result.as_deref(),
            Some(format!("FAKE-TOOL-RESULT: {cwd}\noops").as_str())
        );

        let u2 = fake.say("[[bash:echo partial; exit 7]]").await;
        let frames = fake.turn(&u2).await;
        let tool_result = frames
            .iter()
            .find_map(|f| match f {
                Frame::User(u) if !u.tool_results.is_empty() => Some(u.tool_results[0].clone()),
                _ => None,
            })
            .expect("tool result");
        assert!(tool_result.is_error);
        assert_eq!(tool_result.content, "Exit code 7\npartial");
        assert_eq!(result(&frames).outcome(), ResultOutcome::Success);
        assert_eq!(fake.close().await, 0);
    }

    #[tokio::test]
    async fn interrupt_during_tool() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&[]));
        let u1 = fake.say("[[bash:sleep 5]]").await;
        fake.until(|f| matches!(f, Frame::StreamEvent(StreamEvent::MessageStop)))
            .await;
        let asked = Instant::now();
        fake.send(&protocol::interrupt_request("int")).await;
        let frames = fake.turn(&u1).await;
        assert!(
            asked.elapsed() < Duration::from_secs(2),
            "{:?}",
            asked.elapsed()
        );
        assert_eq!(
            kinds(&frames),
            [
                "control_response",
                "user:tool_result",
                "user:marker",
                "result:error_during_execution",
                "lifecycle:cancelled"
            ]
        );
        let r = result(&frames);
        assert_eq!(r.outcome(), ResultOutcome::Interrupted);
        assert_eq!(r.terminal_reason.as_deref(), Some("aborted_tools"));
        // The process is still usable.
        let u2 = fake.say("next").await;
        assert_eq!(
            result(&fake.turn(&u2).await).outcome(),
            ResultOutcome::Success
        );
        // The last result was a success, so a clean exit.
        assert_eq!(fake.close().await, 0);
    }

    #[tokio::test]
    async fn resume_of_unknown_id_fails() {
        let dirs = Dirs::new();
        let id = Uuid::new_v4().to_string();
        let fake = Fake::start(dirs.opts(&["--resume", &id]));
        let (frames, code) = fake.drain().await;
        assert_eq!(code, 1);
        assert_eq!(frames.len(), 1);
        let r = result(&frames);
        assert_eq!(r.subtype, "error_during_execution");
        assert_eq!(
            r.outcome(),
            ResultOutcome::Error {
                message: format!("No conversation found with session ID: {id}")
            }
        );
    }

    #[tokio::test]
    async fn resume_continues_counting_and_cost() {
        let dirs = Dirs::new();
        let sid = Uuid::new_v4().to_string();
        let mut fake = Fake::start(dirs.opts(&["--session-id", &sid, "--fake-cost-usd", "0.01"]));
        let u1 = fake.say("one").await;
        fake.turn(&u1).await;
        let u2 = fake.say("two").await;
        fake.turn(&u2).await;
        assert_eq!(fake.close().await, 0);

        // The id is taken now: a new session under it is refused …
        let fake = Fake::start(dirs.opts(&["--session-id", &sid]));
        assert_eq!(fake.drain().await.1, 1);
        // … and so is the mix of both flags.
        let args: Vec<String> = [
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--session-id",
            &sid,
            "--resume",
            &sid,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(Options::parse_in(&args, dirs.home.path().into(), dirs.cwd.path().into()).is_err());

        // Resuming from another cwd finds the transcript by name.
        let elsewhere = tempfile::tempdir().expect("cwd");
        let mut opts = dirs.opts(&["--resume", &sid, "--fake-cost-usd", "0.01"]);
        opts.cwd = elsewhere.path().into();
        let mut fake = Fake::start(opts);
        // A uuid of the earlier process is still known.
        fake.send(&protocol::user_message(
            "one",
            Uuid::parse_str(&u1).expect("uuid"),
        ))
        .await;
        assert!(matches!(
            fake.frame().await,
            Frame::CommandLifecycle {
                state: CommandState::Completed,
                ..
            }
        ));
        let u3 = fake.say("three").await;
        let frames = fake.turn(&u3).await;
        assert!(matches!(&frames[2], Frame::SystemInit { session_id, .. } if *session_id == sid));
        let r = result(&frames);
        assert!(
            r.result
                .as_deref()
                .is_some_and(|t| t.starts_with("FAKE-ECHO(turn 3): three"))
        );
        assert!((r.total_cost_usd.unwrap_or_default() - 0.03).abs() < 1e-12);
        assert!((r.turn_cost_usd(Some(0.02)) - 0.01).abs() < 1e-12);
        assert_eq!(fake.close().await, 0);

        // A fork continues the history (three turns by now) under a new id.
        let mut fake = Fake::start(dirs.opts(&["--resume", &sid, "--fork-session"]));
        let u4 = fake.say("fork").await;
        let frames = fake.turn(&u4).await;
        assert!(matches!(&frames[2], Frame::SystemInit { session_id, .. } if *session_id != sid));
        assert!(streamed_text(&frames).starts_with("FAKE-ECHO(turn 4): fork"));
        assert_eq!(fake.close().await, 0);
    }

    #[tokio::test]
    async fn api_failure_keeps_process() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&[]));
        let u1 = fake.say("[[fail]]").await;
        let frames = fake.turn(&u1).await;
        assert_eq!(
            kinds(&frames),
            [
                "lifecycle:queued",
                "lifecycle:started",
                "init",
                "status",
                "user:replay",
                "assistant:api_error",
                "result:success",
                "lifecycle:completed"
            ]
        );
        let Frame::Assistant(a) = &frames[5] else {
            panic!()
        };
        assert_eq!(a.api_error_status, Some(400));
        assert!(
            a.error
                .as_deref()
                .is_some_and(|e| e.starts_with("API Error: 400"))
        );
        let r = result(&frames);
        assert!(r.is_error);
        assert_eq!(r.terminal_reason.as_deref(), Some("api_error"));
        assert!(
            matches!(r.outcome(), ResultOutcome::Error { message } if message.starts_with("API Error"))
        );
        assert_eq!(r.turn_cost_usd(None), 0.0);

        let u2 = fake.say("fine").await;
        assert_eq!(
            result(&fake.turn(&u2).await).outcome(),
            ResultOutcome::Success
        );
        let u3 = fake.say("[[fail]] again").await;
        fake.turn(&u3).await;
        // The last result was an error.
        assert_eq!(fake.close().await, 1);
    }

    #[tokio::test]
    async fn exit_marker_crashes_mid_turn() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&[]));
        fake.say("[[exit]]").await;
        let (frames, code) = fake.drain().await;
        assert_eq!(code, 3);
        assert!(frames.iter().any(|f| kind(f) == "message_start"));
        assert!(!frames.iter().any(|f| matches!(f, Frame::Result(_))));
    }

    #[tokio::test]
    async fn eof_during_turn_finishes_it() {
        let dirs = Dirs::new();
        let mut fake = Fake::start(dirs.opts(&["--fake-delay-ms", "20"]));
        fake.say("last words").await;
        fake.stdin = None;
        let (frames, code) = fake.drain().await;
        assert_eq!(code, 0);
        assert_eq!(result(&frames).outcome(), ResultOutcome::Success);
        assert_eq!(kind(frames.last().expect("frames")), "lifecycle:completed");
    }

    #[tokio::test]
    async fn plain_output_and_control_requests() {
        let dirs = Dirs::new();
        let args: Vec<String> = [
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
            "--verbose",
            "--disallowedTools",
            "Bash,WebSearch",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let opts = Options::parse_in(&args, dirs.home.path().into(), dirs.cwd.path().into())
            .expect("options");
        let mut fake = Fake::start(opts);
        fake.send(&protocol::control_request(
            "m",
            json!({"subtype": "set_model", "model": "m2"}),
        ))
        .await;
        assert!(matches!(fake.frame().await,
            Frame::ControlResponse { ok: true, response, .. } if response["model"] == "m2"));
        fake.send(&protocol::control_request(
            "p",
            json!({"subtype": "set_permission_mode", "mode": "acceptEdits"}),
        ))
        .await;
        assert!(matches!(
            fake.frame().await,
            Frame::ControlResponse { ok: true, .. }
        ));
        assert!(
            matches!(fake.frame().await, Frame::SystemStatus { status: None, raw }
            if raw["permissionMode"] == "acceptEdits")
        );
        fake.send(&protocol::control_request(
            "x",
            json!({"subtype": "frobnicate"}),
        ))
        .await;
        assert!(matches!(fake.frame().await,
            Frame::ControlResponse { ok: false, error: Some(e), .. } if e.contains("frobnicate")));

        // Without --include-partial-messages and --replay-user-messages: no stream events,
        // no replay. A disallowed Bash is missing from the tools and fails when called.
        let u1 = fake.say("[[bash:echo never]]").await;
        let frames = fake.turn(&u1).await;
        assert_eq!(
            kinds(&frames),
            [
                "lifecycle:queued",
                "lifecycle:started",
                "init",
                "status",
                "assistant:tool_use",
                "user:tool_result",
                "status",
                "assistant:text",
                "result:success",
                "lifecycle:completed"
            ]
        );
        let Frame::SystemInit {
            model,
            permission_mode,
            raw,
            ..
        } = &frames[2]
        else {
            panic!()
        };
        assert_eq!(model, "m2");
        assert_eq!(permission_mode, "acceptEdits");
        let tools = raw["tools"].as_array().expect("tools");
        assert!(!tools.contains(&json!("Bash")) && tools.contains(&json!("Read")));
        assert!(matches!(&frames[5], Frame::User(u)
            if u.tool_results[0].is_error && u.tool_results[0].content.contains("No such tool")));
        assert_eq!(fake.close().await, 0);
    }

    #[test]
    fn argv() {
        let home = PathBuf::from("/h");
        let cwd = PathBuf::from("/w");
        let parse = |args: &[&str]| {
            let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            Options::parse_in(&args, home.clone(), cwd.clone())
        };
        let sid = "0b7c7a4e-6f51-4c8e-9a39-1b1d7c6f0e11";
        let o = parse(&[
            "-p",
            "--input-format",
            "stream-json",
            "--output-format=stream-json",
            "--verbose",
            "--include-partial-messages",
            "--replay-user-messages",
            "--session-id",
            sid,
            "--permission-prompt-tool",
            "stdio",
            "--permission-mode",
            "acceptEdits",
            "--model",
            "m",
            "--append-system-prompt",
            "be brief",
            "--allowedTools",
            "Bash(ls *)",
            "--disallowedTools",
            "Write Edit",
            "--max-turns",
            "4",
            "--mcp-config",
            r#"{"mcpServers":{}}"#,
            "--strict-mcp-config",
            "--some-future-flag",
            "value",
            "--another-bool",
            "--fake-reply-chars",
            "100",
            "--fake-deltas",
            "5",
            "--fake-delay-ms",
            "7",
            "--fake-input-tokens",
            "11",
            "--fake-output-tokens",
            "12",
            "--fake-cost-usd",
            "0.5",
        ])
        .expect("parses");
        assert_eq!(o.session_id.map(|u| u.to_string()).as_deref(), Some(sid));
        assert_eq!(o.permission_mode, "acceptEdits");
        assert_eq!(o.model, "m");
        assert!(o.include_partial_messages && o.replay_user_messages);
        assert_eq!(o.disallowed_tools, ["Write", "Edit"]);
        assert_eq!(o.max_turns, Some(4));
        assert_eq!((o.reply_chars, o.deltas), (100, 5));
        assert_eq!(o.delay, Duration::from_millis(7));
        assert_eq!((o.input_tokens, o.output_tokens), (Some(11), Some(12)));
        assert_eq!(o.cost_usd, Some(0.5));

        let base = [
            "--input-format",
            "stream-json",
            "--output-format",
            "stream-json",
        ];
        let err = parse(&base).expect_err("needs --verbose");
        assert!(err.contains("requires --verbose"), "{err}");
        let with = |extra: &[&str]| {
            let mut args = base.to_vec();
            args.push("--verbose");
            args.extend_from_slice(extra);
            parse(&args)
        };
        assert!(with(&["--session-id", "not-a-uuid"]).is_err());
        assert!(with(&["--session-id", sid, "--resume", sid]).is_err());
        assert!(with(&["--session-id", sid, "--resume", sid, "--fork-session"]).is_ok());
        assert!(with(&["--fake-deltas", "many"]).is_err());
        assert!(with(&["--model"]).is_err());
    }

    #[test]
    fn text_helpers() {
        assert_eq!(reply_text(3, "hi", 20), "FAKE-ECHO(turn 3): h");
        assert_eq!(reply_text(1, "hi", 24), "FAKE-ECHO(turn 1): hi...");
        assert_eq!(split_chunks("abcdefg", 3), ["ab", "cd", "efg"]);
        assert_eq!(split_chunks("é€", 5), ["é", "€"]);
        assert!(split_chunks("", 3).is_empty());
        assert_eq!(split_chunks("abc", 0), ["abc"]);
        assert_eq!(bash_marker("x [[bash:ls -l]] y"), Some("ls -l"));
        assert_eq!(bash_marker("[[bash:unterminated"), None);
        assert!(is_prompt(Some(&json!("hello"))));
        assert!(!is_prompt(Some(
            &json!([{"type": "tool_result", "content": "x"}])
        )));
        assert!(!is_prompt(Some(
            &json!([{"type": "text", "text": INTERRUPTED_FOR_TOOL}])
        )));
    }
}
