//! `subscribers`: what an idle SSE subscriber costs one API process.

use std::time::Duration;

use futures::future::try_join_all;

use crate::Env;
use crate::report::{Row, Scenario};
use crate::stack::{Options, Stack};

pub async fn run(env: &Env) -> anyhow::Result<Scenario> {
    let subscribers = env.size(5_000, 100);
    let sessions = 50;
    let stack = Stack::start(
        &env.server,
        Options {
            api_only: true,
            ..Options::default()
        },
    )
    .await?;
    let mut sids = Vec::new();
    for _ in 0..sessions {
        sids.push(stack.new_session().await?);
    }
    // Warm the path once so the baseline holds the code and buffers any stream needs.
    drop(stack.events(&sids[0], 0).await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = stack.rss_kib();

    let mut open = Vec::with_capacity(subscribers);
    let indexes: Vec<usize> = (0..subscribers).collect();
    for chunk in indexes.chunks(250) {
        let batch = chunk.iter().map(|i| stack.events(&sids[i % sessions], 0));
        open.extend(try_join_all(batch).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = stack.rss_kib();
    let per = after.saturating_sub(before) as f64 / subscribers as f64;
    drop(open);
    stack.stop(&env.server).await;
    Ok(Scenario {
        name: "subscribers",
        title: "Idle SSE subscribers",
        method: format!(
            "`hotplex serve` with {sessions} sessions; {subscribers} SSE subscribers (spread \
             over the sessions, each its own HTTP/1.1 connection) are opened and held idle; the \
             server's RSS before and after, divided by the subscribers."
        ),
        rows: vec![Row::new("RSS per idle subscriber", per, "KiB").at_most(20.0)],
        notes: vec![
            format!("Server RSS: {before} KiB before, {after} KiB with {subscribers} subscribers."),
            "Where it goes (heaptrack, 1,000 subscribers, release build): hyper's HTTP/1 \
             connection holds an 8 KiB read buffer and an 8 KiB header write buffer for as long \
             as the stream is open (8 KiB is hyper's minimum, `max_buf_size` ≥ 8192), about \
             16 KiB of each subscriber; the connection task, the SSE body and the response \
             headers make up most of the rest. Serving the router per connection used to add \
             23 KiB more (axum rebuilt the route table for every connection); hotplex now hands \
             each connection a clone of one router."
                .into(),
        ],
        ..Scenario::default()
    })
}
