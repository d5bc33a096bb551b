//! `overhead`: what hotplex adds to a warm turn. Through hotplex: `POST …/turns` → the first
//! `text.delta` on the session's SSE stream, and → `turn.completed`. Reference: the same fake
//! agent driven directly through its pipes (hotplex's provider code, no queue, database or
//! HTTP), prompt written → first delta, → result.

use std::collections::BTreeMap;
use std::time::Instant;

use hotplex::provider::claude_code::ClaudeProcess;
use hotplex::provider::{AgentEvent, SpawnSpec};
use tokio_util::task::TaskTracker;

use crate::Env;
use crate::report::{Row, Scenario, Series};
use crate::stack::{Options, Stack, fake_agent_script};

pub async fn run(env: &Env) -> anyhow::Result<Scenario> {
    let turns = env.size(300, 20);
    let sessions = 4;
    let stack = Stack::start(&env.server, Options::default()).await?;
    let mut live = Vec::new();
    for _ in 0..sessions {
        let sid = stack.new_session().await?;
        stack.turn(&sid, "warm up", true).await?;
        let events = stack.events(&sid, stack.last_seq(&sid).await?).await?;
        live.push((sid, events));
    }
    let (mut first, mut done) = (Vec::new(), Vec::new());
    for i in 0..turns {
        let (sid, events) = &mut live[i % sessions];
        let t0 = Instant::now();
        let turn = stack.turn(sid, "overhead", false).await?;
        let id = turn["id"].clone();
        let mut got_first = false;
        loop {
            let ev = events.next().await?;
            if ev.data["turn_id"] != id {
                continue;
            }
            match ev.kind.as_str() {
                "text.delta" if !got_first => {
                    got_first = true;
                    first.push(ms(t0));
                }
                "turn.completed" => {
                    done.push(ms(t0));
                    break;
                }
                "turn.failed" | "turn.interrupted" => anyhow::bail!("turn ended: {:?}", ev.data),
                _ => {}
            }
        }
    }
    stack.stop(&env.server).await;

    let (ref_first, ref_done) = direct(turns).await?;
    let hot_first = Series::new("hotplex POST → first delta", first);
    let hot_done = Series::new("hotplex POST → turn.completed", done);
    let direct_first = Series::new("fake agent direct → first delta", ref_first);
    let direct_done = Series::new("fake agent direct → result", ref_done);
    let added = |a: f64, b: f64| (a - b).max(0.0);
    Ok(Scenario {
        name: "overhead",
        title: "Overhead of a warm turn",
        method: format!(
            "{turns} warm turns round-robin over {sessions} sessions of `hotplex up` with the \
             fake agent (3 deltas, 40 characters), one at a time; the client times `POST \
             …/turns` → the turn's first `text.delta` and → its `turn.completed` on an SSE \
             stream opened beforehand. Reference: the same fake agent spawned directly and \
             driven through its stdin/stdout with hotplex's provider code ({turns} turns). \
             \"Added\" is the difference of the percentiles."
        ),
        rows: vec![
            Row::new(
                "added to first delta, p50",
                added(hot_first.summary.p50, direct_first.summary.p50),
                "ms",
            )
            .reference("direct first delta p50", direct_first.summary.p50)
            .at_most(5.0),
            Row::new(
                "added to first delta, p99",
                added(hot_first.summary.p99, direct_first.summary.p99),
                "ms",
            )
            .reference("direct first delta p99", direct_first.summary.p99)
            .at_most(20.0),
            Row::new(
                "added to turn.completed, p50",
                added(hot_done.summary.p50, direct_done.summary.p50),
                "ms",
            )
            .reference("direct result p50", direct_done.summary.p50)
            .at_most(5.0),
            Row::new(
                "added to turn.completed, p99",
                added(hot_done.summary.p99, direct_done.summary.p99),
                "ms",
            )
            .reference("direct result p99", direct_done.summary.p99)
            .at_most(20.0),
        ],
        series: vec![hot_first, hot_done, direct_first, direct_done],
        ..Scenario::default()
    })
}

fn ms(t0: Instant) -> f64 {
    t0.elapsed().as_secs_f64() * 1000.0
}

/// The fake agent through its pipes: (prompt → first delta, prompt → result) per turn.
async fn direct(turns: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let dir = tempfile::tempdir()?;
    let binary = fake_agent_script(dir.path(), &[])?;
    let mut env = BTreeMap::new();
    env.insert("PATH".to_owned(), std::env::var("PATH").unwrap_or_default());
    env.insert("HOME".to_owned(), dir.path().display().to_string());
    let spec = SpawnSpec {
        binary,
        extra_args: Vec::new(),
        env,
        cwd: dir.path().to_path_buf(),
        cli_session_id: uuid::Uuid::new_v4(),
        resume: false,
        model: None,
        system_prompt: None,
        permission_mode: None,
        allowed_tools: Vec::new(),
        disallowed_tools: Vec::new(),
        limits: Default::default(),
    };
    let tracker = TaskTracker::new();
    let mut agent = ClaudeProcess::spawn(&spec, &tracker).await?;
    let (mut first, mut done) = (Vec::new(), Vec::new());
    for i in 0..=turns {
        let t0 = Instant::now();
        agent.send_prompt("overhead").await?;
        let mut got_first = false;
        loop {
            match agent.next_event().await {
                Some(AgentEvent::TextDelta(_)) if !got_first => {
                    got_first = true;
                    if i > 0 {
                        first.push(ms(t0));
                    }
                }
                Some(AgentEvent::TurnEnded(_)) => {
                    if i > 0 {
                        done.push(ms(t0));
                    }
                    break;
                }
                Some(_) => {}
                None => anyhow::bail!("the fake agent exited"),
            }
        }
    }
    agent.stop(std::time::Duration::from_secs(2)).await;
    Ok((first, done))
}
