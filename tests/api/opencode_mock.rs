//! End to end with the real OpenCode CLI (`HOTPLEX_TEST_OPENCODE`) against the mock
//! chat-completions API: proves the mock speaks the OpenAI-compatible protocol well enough
//! for `opencode run` to print its replies and to run a tool through it, fully offline.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use hotplex::mock_llm::openai::{self, MockServer};
use serde_json::{Value, json};

/// Cold `opencode run` takes 2–5 s; this only catches a hang.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

/// The OpenCode CLI under test; `None` (skip) outside CI when it is not installed.
fn opencode_bin() -> Option<PathBuf> {
    crate::support::real_cli("HOTPLEX_TEST_OPENCODE")
}

async fn mock() -> MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    openai::start(listener, openai::MockOptions::default())
        .await
        .unwrap()
}

/// What one `opencode run` printed.
struct RunOutput {
    /// The `--format json` lines, one per finished part.
    lines: Vec<Value>,
    stderr: String,
}

impl RunOutput {
    fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.lines.iter().filter(|l| l["type"] == kind).collect()
    }

    fn texts(&self) -> Vec<&str> {
        self.of_type("text")
            .into_iter()
            .filter_map(|l| l["part"]["text"].as_str())
            .collect()
    }
}

/// Runs `opencode run --format json <prompt>` in a fresh project directory with a fresh
/// HOME, configured for the mock provider (plus `extra` config keys), and expects exit 0.
async fn run_opencode(bin: &Path, mock: &MockServer, extra: Value, prompt: &str) -> RunOutput {
    let root = tempfile::tempdir().unwrap();
    let home = root.path().join("home");
    let project = root.path().join("project");
    std::fs::create_dir_all(&project).unwrap();
    let mut config = json!({
        "provider": {"mock": {
            "npm": "@ai-sdk/openai-compatible",
            "name": "Mock",
            "options": {"baseURL": format!("{}/v1", mock.base_url()), "apiKey": "x"},
            "models": {"mock-model": {"name": "Mock Model",
                                      "limit": {"context": 128000, "output": 4096}}},
        }},
        // Both, or the defaults point at hosted models.
        "model": "mock/mock-model",
        "small_model": "mock/mock-model",
        "autoupdate": false,
        "share": "disabled",
    });
    if let (Some(config), Some(extra)) = (config.as_object_mut(), extra.as_object()) {
        config.extend(extra.clone());
    }

    let mut command = tokio::process::Command::new(bin);
    command
        .args(["run", "--format", "json", prompt])
        .current_dir(&project)
        // Nothing from the developer's environment: no config, credentials or proxies.
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .env("XDG_DATA_HOME", home.join(".local/share"))
        .env("XDG_CACHE_HOME", home.join(".cache"))
        .env("XDG_STATE_HOME", home.join(".local/state"))
        .env("OPENCODE_CONFIG_CONTENT", config.to_string())
        // OpenCode may try to install its plugin package in the background; a closed
        // loopback port makes that fail at once instead of reaching out.
        .env("npm_config_registry", "http://127.0.0.1:9/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for flag in [
        "OPENCODE_DISABLE_AUTOUPDATE",
        "OPENCODE_DISABLE_MODELS_FETCH",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS",
        "OPENCODE_DISABLE_LSP_DOWNLOAD",
        "OPENCODE_DISABLE_SHARE",
        "OPENCODE_DISABLE_CLAUDE_CODE",
    ] {
        command.env(flag, "1");
    }
    let child = command.spawn().expect("start opencode");
    // On timeout the future, and with it the child (kill_on_drop), is dropped.
    let output = tokio::time::timeout(RUN_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("opencode run did not finish within {RUN_TIMEOUT:?}"))
        .expect("wait for opencode");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "opencode run failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        output.status
    );
    let lines = stdout
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    RunOutput { lines, stderr }
}

/// The logged chat-completion requests that carried the agent's tools (OpenCode's title
/// request, on the small model, carries none).
fn agent_requests(mock: &MockServer) -> Vec<Value> {
    mock.requests()
        .into_iter()
        .filter(|r| r["path"] == "/v1/chat/completions")
        .filter(|r| r["body"]["tools"].as_array().is_some_and(|t| !t.is_empty()))
        .collect()
}

#[tokio::test]
async fn the_real_opencode_prints_the_mock_reply() {
    let Some(bin) = opencode_bin() else {
        return;
    };
    let mock = mock().await;
    let out = run_opencode(&bin, &mock, json!({}), "hello world").await;

    // `opencode run` wraps a single multi-word argument in literal quotes before it reaches
    // the model (docs/opencode.md), so the echo carries them.
    assert_eq!(
        out.texts(),
        [r#"MOCK_REPLY: "hello world""#],
        "{:?}\n{}",
        out.lines,
        out.stderr
    );
    let finish = out.of_type("step_finish");
    assert_eq!(finish.len(), 1, "{:?}", out.lines);
    assert_eq!(finish[0]["part"]["reason"], "stop");
    // The usage chunk's completion tokens: "MOCK_REPLY: \"hello world\"" has 25 characters.
    assert_eq!(finish[0]["part"]["tokens"]["output"], 6);

    let requests = agent_requests(&mock);
    assert_eq!(requests.len(), 1, "{requests:?}");
    let body = &requests[0]["body"];
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"]["include_usage"], true);
    assert_eq!(body["model"], "mock-model");
    assert_eq!(requests[0]["headers"]["authorization"], "Bearer x");
    // The title request goes to the same endpoint, streaming too.
    let all: Vec<Value> = mock.requests();
    assert!(
        all.iter()
            .all(|r| r["path"] == "/v1/chat/completions" && r["body"]["stream"] == true),
        "{all:?}"
    );
}

#[tokio::test]
async fn the_real_opencode_runs_the_mock_bash_call() {
    let Some(bin) = opencode_bin() else {
        return;
    };
    let mock = mock().await;
    let out = run_opencode(
        &bin,
        &mock,
        json!({"permission": {"bash": "allow"}}),
        "[[bash:echo hi]]",
    )
    .await;

    let tools = out.of_type("tool_use");
    assert_eq!(tools.len(), 1, "{:?}\n{}", out.lines, out.stderr);
    let part = &tools[0]["part"];
    assert_eq!(part["tool"], "bash");
    assert_eq!(part["state"]["status"], "completed");
    assert_eq!(
        part["state"]["input"],
        json!({"command": "echo hi", "description": "mock"})
    );
    assert_eq!(part["state"]["output"], "hi\n");
    assert_eq!(out.texts(), ["TOOL_DONE: hi"], "{:?}", out.lines);
    let kinds: Vec<&str> = out
        .lines
        .iter()
        .filter_map(|l| l["type"].as_str())
        .collect();
    let tool_at = kinds.iter().position(|k| *k == "tool_use");
    let text_at = kinds.iter().position(|k| *k == "text");
    assert!(tool_at < text_at, "{kinds:?}");

    // Step one asked for the call; step two carried the tool result back.
    let requests = agent_requests(&mock);
    assert_eq!(requests.len(), 2, "{requests:?}");
    let messages = requests[1]["body"]["messages"].as_array().unwrap();
    let result = messages.last().unwrap();
    assert_eq!(result["role"], "tool");
    assert_eq!(result["content"], "hi\n");
    let call = &messages[messages.len() - 2]["tool_calls"][0];
    assert_eq!(result["tool_call_id"], call["id"]);
}
