//! `stream`: agent text deltas delivered to SSE clients per second, with 1 session and with
//! many at once. Reference: the raw ceiling of one `INSERT` + `NOTIFY` commit per delta
//! (what storing every token as its own event would cost), from 16 connections.

use std::time::Instant;

use futures::future::try_join_all;

use crate::Env;
use crate::report::{Row, Scenario};
use crate::stack::{Options, Stack};

/// One burst: `sessions` sessions each streaming one turn of `deltas` deltas at once.
/// Returns (deltas per second, SSE events received, seconds).
async fn burst(env: &Env, sessions: usize, deltas: usize) -> anyhow::Result<(f64, usize, f64)> {
    let stack = Stack::start(
        &env.server,
        Options {
            fake_args: vec![
                "--fake-deltas".into(),
                deltas.to_string(),
                "--fake-reply-chars".into(),
                (deltas * 8).to_string(),
            ],
            env: vec![(
                "HOTPLEX_WORKER__CAPACITY".into(),
                (sessions + 8).to_string(),
            )],
            ..Options::default()
        },
    )
    .await?;
    let mut sids = Vec::new();
    for _ in 0..sessions {
        let sid = stack.new_session().await?;
        stack.turn(&sid, "warm up", true).await?;
        sids.push(sid);
    }
    let mut streams = Vec::new();
    for sid in &sids {
        streams.push(stack.events(sid, stack.last_seq(sid).await?).await?);
    }
    let started = Instant::now();
    let readers = streams
        .into_iter()
        .zip(sids.iter())
        .map(|(mut events, sid)| {
            let stack = &stack;
            async move {
                let turn = stack.turn(sid, "stream", false).await?;
                let (mut text, mut received) = (String::new(), 0usize);
                loop {
                    let ev = events.next().await?;
                    if ev.data["turn_id"] != turn["id"] {
                        continue;
                    }
                    received += 1;
                    match ev.kind.as_str() {
                        "text.delta" => text.push_str(ev.data["text"].as_str().unwrap_or("")),
                        "turn.completed" => {
                            if ev.data["result"].as_str() != Some(text.as_str()) {
                                anyhow::bail!("the deltas did not add up to the result");
                            }
                            return anyhow::Ok(received);
                        }
                        "turn.failed" | "turn.interrupted" => anyhow::bail!("{:?}", ev.data),
                        _ => {}
                    }
                }
            }
        });
    let received: usize = try_join_all(readers).await?.into_iter().sum();
    let seconds = started.elapsed().as_secs_f64();
    stack.stop(&env.server).await;
    Ok(((sessions * deltas) as f64 / seconds, received, seconds))
}

pub async fn run(env: &Env) -> anyhow::Result<Scenario> {
    let (one_deltas, many, many_deltas) = (
        env.size(20_000, 300),
        env.size(100, 5),
        env.size(2_000, 100),
    );
    let (one_rate, one_events, one_secs) = burst(env, 1, one_deltas).await?;
    let (many_rate, many_events, many_secs) = burst(env, many, many_deltas).await?;

    // The ceiling of one commit per delta, on a database of its own.
    let (name, _, pool) = env.server.fresh().await?;
    let (ceiling, _) =
        super::queue::statements_per_second(&pool, 16, env.size(30_000, 500)).await?;
    pool.close().await;
    env.server.drop_db(&name).await;

    Ok(Scenario {
        name: "stream",
        title: "Streaming: deltas delivered over SSE",
        method: format!(
            "The fake agent streams one turn of N text deltas (8 characters each) per session; \
             every session has an SSE client opened beforehand, and the clock runs from the \
             first POST to the last `turn.completed`. Each client checks that the deltas it \
             received add up to the turn's result. 1 session × {one_deltas} deltas, then \
             {many} sessions × {many_deltas} deltas at once. The worker coalesces deltas over \
             20 ms windows into one row and one NOTIFY; the reference is the ceiling of one \
             `INSERT` + `NOTIFY` commit per delta from 16 connections."
        ),
        rows: vec![
            Row::new("deltas/s, 1 session", one_rate, "/s")
                .reference("INSERT+NOTIFY commits/s", ceiling),
            Row::new(
                format!("deltas/s, {many} sessions (aggregate)"),
                many_rate,
                "/s",
            )
            .reference("INSERT+NOTIFY commits/s", ceiling)
            .at_least(50_000.0),
            Row::new(
                format!("ratio to the one-commit-per-delta ceiling ({many} sessions)"),
                many_rate / ceiling.max(1.0),
                "×",
            ),
        ],
        notes: vec![
            format!(
                "1 session: {one_events} SSE events carried {one_deltas} deltas in {one_secs:.2} s."
            ),
            format!(
                "{many} sessions: {many_events} SSE events carried {} deltas in {many_secs:.2} s.",
                many * many_deltas
            ),
        ],
        ..Scenario::default()
    })
}
