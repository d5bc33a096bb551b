//! `sessions`: many warm sessions on one worker under a steady turn rate: turn latency, and
//! what each warm session costs hotplex's own memory (the agents are processes of their own
//! and not counted).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::try_join_all;

use crate::Env;
use crate::report::{Row, Scenario, Series};
use crate::stack::{Options, Stack};

pub async fn run(env: &Env) -> anyhow::Result<Scenario> {
    let sessions = env.size(500, 20);
    let rate = env.size(50, 10);
    let seconds = env.size(20, 2);
    let stack = Stack::start(
        &env.server,
        Options {
            env: vec![(
                "HOTPLEX_WORKER__CAPACITY".into(),
                (sessions + 20).to_string(),
            )],
            ..Options::default()
        },
    )
    .await?;
    // One session first, so the baseline includes what any first turn loads.
    let first = stack.new_session().await?;
    stack.turn(&first, "warm up", true).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = stack.rss_kib();

    let stack = Arc::new(stack);
    let mut sids = vec![first];
    for chunk in (1..sessions).collect::<Vec<_>>().chunks(16) {
        let batch = chunk.iter().map(|_| {
            let stack = stack.clone();
            async move {
                let sid = stack.new_session().await?;
                stack.turn(&sid, "warm up", true).await?;
                anyhow::Ok(sid)
            }
        });
        sids.extend(try_join_all(batch).await?);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = stack.rss_kib();
    let warm_agents: i64 =
        sqlx::query_scalar("select count(*) from session_leases where pid is not null")
            .fetch_one(&stack.pool)
            .await?;

    // Open loop: a turn every 1/rate s on the next session, whatever the previous ones do.
    let total = rate * seconds;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    let mut ticker = tokio::time::interval(period);
    let mut tasks = Vec::with_capacity(total);
    let started = Instant::now();
    for i in 0..total {
        ticker.tick().await;
        let (stack, sid) = (stack.clone(), sids[(i * 7) % sids.len()].clone());
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            stack.turn(&sid, "steady", true).await?;
            anyhow::Ok(t0.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let mut latency = Vec::with_capacity(total);
    for t in tasks {
        latency.push(t.await??);
    }
    let achieved = total as f64 / started.elapsed().as_secs_f64();
    let stack = Arc::into_inner(stack).ok_or_else(|| anyhow::anyhow!("stack still shared"))?;
    stack.stop(&env.server).await;

    let per_session = rss_after.saturating_sub(rss_before) as f64 / (sessions - 1).max(1) as f64;
    let turns = Series::new(
        format!("turn under {rate}/s on {sessions} warm sessions"),
        latency,
    );
    Ok(Scenario {
        name: "sessions",
        title: "Many warm sessions on one worker",
        method: format!(
            "`hotplex up` (one worker, capacity {}) warms {sessions} sessions of the fake agent \
             ({warm_agents} agent processes were warm at the end), then receives {rate} turns/s \
             for {seconds} s, open loop, spread over the sessions; each turn is timed by the \
             client from `POST …/turns?wait=true` to the answer. Memory: the server's RSS \
             after the first session and after all of them, divided by the sessions added \
             (agents are separate processes and not included).",
            sessions + 20
        ),
        rows: vec![
            Row::new("turn p99", turns.summary.p99, "ms").at_most(50.0),
            Row::new("turn p50", turns.summary.p50, "ms"),
            Row::new("turns/s achieved", achieved, "/s"),
            Row::new("hotplex RSS per warm session", per_session, "KiB").at_most(256.0),
        ],
        notes: vec![format!(
            "Server RSS: {rss_before} KiB with 1 session, {rss_after} KiB with {sessions}."
        )],
        series: vec![turns],
        ..Scenario::default()
    })
}
