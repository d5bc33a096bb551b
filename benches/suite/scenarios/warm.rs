//! `warm-vs-cold`: turns 2..N with the real Claude Code CLI and the mock Anthropic API,
//! through hotplex (one warm process per session) against process-per-turn with `--resume`
//! (what most peers do), same CLI, same mock, same prompts.

use std::path::PathBuf;
use std::time::Instant;

use hotplex::mock_llm::anthropic::{self, MockOptions};

use crate::Env;
use crate::report::{Row, Scenario, Series};
use crate::stack::{Options, Stack};

/// The environment both paths give the CLI: the mock, and nothing that calls home.
pub(super) fn cli_env(mock: &str) -> Vec<(String, String)> {
    [
        ("ANTHROPIC_BASE_URL", mock),
        ("ANTHROPIC_API_KEY", "bench"),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1"),
        ("DISABLE_TELEMETRY", "1"),
        ("DISABLE_AUTOUPDATER", "1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The Claude Code CLI: `HOTPLEX_BENCH_CLAUDE`, `HOTPLEX_TEST_CLAUDE`, the copy `.ci/run`
/// installs, or `claude` on PATH.
pub(super) fn find_claude() -> Option<PathBuf> {
    let home = std::env::var_os("HOME").map(PathBuf::from);
    let candidates = [
        std::env::var_os("HOTPLEX_BENCH_CLAUDE").map(PathBuf::from),
        std::env::var_os("HOTPLEX_TEST_CLAUDE").map(PathBuf::from),
        home.map(|h| h.join(".cache/hotplex/npm/node_modules/.bin/claude")),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p| p.exists())
        .or_else(|| {
            std::env::var_os("PATH").and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|p| p.join("claude"))
                    .find(|p| p.exists())
            })
        })
}

pub async fn run(env: &Env) -> anyhow::Result<Scenario> {
    let mut scenario = Scenario {
        name: "warm-vs-cold",
        title: "Warm process vs process per turn (real Claude Code)",
        ..Scenario::default()
    };
    let Some(claude) = find_claude() else {
        scenario.skipped = Some(
            "no Claude Code CLI (set HOTPLEX_BENCH_CLAUDE, or run .ci/run once to install it)"
                .into(),
        );
        return Ok(scenario);
    };
    let turns = env.size(12, 3);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock = anthropic::start(listener, MockOptions::default()).await?;
    let base = mock.base_url();

    let stack = Stack::start(
        &env.server,
        Options {
            agent: Some(claude.clone()),
            env: cli_env(&base)
                .into_iter()
                .map(|(k, v)| (format!("HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__{k}"), v))
                .collect(),
            ..Options::default()
        },
    )
    .await?;
    let sid = stack.new_session().await?;
    let mut warm = Vec::new();
    for k in 1..=turns {
        let t0 = Instant::now();
        stack
            .turn(&sid, &format!("turn {k}: note the number {k}"), true)
            .await?;
        if k > 1 {
            warm.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    stack.stop(&env.server).await;

    let home = tempfile::tempdir()?;
    let conversation = uuid::Uuid::new_v4().to_string();
    let mut cold = Vec::new();
    for k in 1..=turns {
        let mut cmd = tokio::process::Command::new(&claude);
        cmd.arg("-p")
            .arg(format!("turn {k}: note the number {k}"))
            .args(["--output-format", "json"])
            .args(if k == 1 {
                ["--session-id", conversation.as_str()]
            } else {
                ["--resume", conversation.as_str()]
            })
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", home.path())
            .envs(cli_env(&base))
            .current_dir(home.path())
            .stdin(std::process::Stdio::null());
        let t0 = Instant::now();
        let out = cmd.output().await?;
        let elapsed = t0.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            anyhow::bail!(
                "claude -p failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if k > 1 {
            cold.push(elapsed);
        }
    }
    let _ = mock.shutdown().await;

    let warm = Series::new("hotplex warm turn (real CLI)", warm);
    let cold = Series::new("process per turn with --resume", cold);
    let speedup = cold.summary.p50 / warm.summary.p50.max(0.001);
    scenario.method = format!(
        "Turns 2..{turns} of one conversation with the real Claude Code CLI ({}) against \
         hotplex's mock Anthropic API on 127.0.0.1. Through hotplex: `POST …/turns?wait=true` \
         on one session, timed by the client. Reference: `claude -p PROMPT --output-format \
         json --resume ID`, a new process per turn, timed from spawn to exit. Speed-up = \
         reference p50 / hotplex p50.",
        claude.display()
    );
    scenario.rows = vec![
        Row::new("warm turn p50 (turns 2..N)", warm.summary.p50, "ms")
            .reference("process per turn p50", cold.summary.p50),
        Row::new("speed-up over process per turn (p50)", speedup, "×").at_least(8.0),
    ];
    scenario.series = vec![warm, cold];
    Ok(scenario)
}
