//! `first-turn`: the first turn of a new session with the real Claude Code CLI and the mock
//! Anthropic API, with warm spares (`worker.warm_spares = 2`) against the same stack
//! without (the CLI's cold start on the turn's path).

use std::time::{Duration, Instant};

use hotplex::mock_llm::anthropic::{self, MockOptions};

use super::warm::{cli_env, find_claude};
use crate::Env;
use crate::report::{Row, Scenario, Series};
use crate::stack::{Options, Stack};

/// First turns of `sessions` new sessions, one after the other, in milliseconds. Between
/// two, the worker gets time to start a spare again (as between real users' sessions).
async fn first_turns(stack: &Stack, sessions: usize) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::with_capacity(sessions);
    for k in 0..sessions {
        tokio::time::sleep(Duration::from_secs(4)).await;
        let sid = stack.new_session().await?;
        let t0 = Instant::now();
        stack
            .turn(&sid, &format!("session {k}: hello"), true)
            .await?;
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

pub async fn run(env: &Env) -> anyhow::Result<Scenario> {
    let mut scenario = Scenario {
        name: "first-turn",
        title: "First turn of a new session: warm spare vs cold start (real Claude Code)",
        ..Scenario::default()
    };
    let Some(claude) = find_claude() else {
        scenario.skipped = Some(
            "no Claude Code CLI (set HOTPLEX_BENCH_CLAUDE, or run .ci/run once to install it)"
                .into(),
        );
        return Ok(scenario);
    };
    let sessions = env.size(8, 2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let mock = anthropic::start(listener, MockOptions::default()).await?;
    let base = mock.base_url();
    let cli: Vec<(String, String)> = cli_env(&base)
        .into_iter()
        .map(|(k, v)| (format!("HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__{k}"), v))
        .collect();

    let mut results = Vec::new();
    for spares in [0, 2] {
        let mut env_vars = cli.clone();
        env_vars.push(("HOTPLEX_WORKER__WARM_SPARES".into(), spares.to_string()));
        let stack = Stack::start(
            &env.server,
            Options {
                agent: Some(claude.clone()),
                env: env_vars,
                ..Options::default()
            },
        )
        .await?;
        let samples = first_turns(&stack, sessions).await;
        stack.stop(&env.server).await;
        results.push(samples?);
    }
    let _ = mock.shutdown().await;
    let cold = Series::new("cold start (no spares)", results.remove(0));
    let warm = Series::new("warm spare (worker.warm_spares = 2)", results.remove(0));
    let saved = cold.summary.p50 - warm.summary.p50;
    scenario.method = format!(
        "{sessions} new sessions, one after the other (4 s apart, time for the worker to start \
         a spare again), each sent one prompt with `POST …/turns?wait=true`, timed by the \
         client; the real Claude Code CLI ({}) against hotplex's mock Anthropic API. Same \
         stack twice: `worker.warm_spares = 2`, and the reference without spares (the CLI \
         starts on the turn's path).",
        claude.display()
    );
    scenario.rows = vec![
        Row::new("first turn p50, warm spare", warm.summary.p50, "ms")
            .reference("first turn p50, cold start", cold.summary.p50),
        Row::new("first turn p99, warm spare", warm.summary.p99, "ms")
            .reference("first turn p99, cold start", cold.summary.p99),
        Row::new("cold start saved (p50)", saved, "ms"),
    ];
    scenario.series = vec![warm, cold];
    Ok(scenario)
}
