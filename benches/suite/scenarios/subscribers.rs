//! `subscribers`: what an idle SSE subscriber costs one API process. Reference: the same
//! number of idle subscribers on a bare axum server whose only route is a silent SSE stream
//! (this bench binary, re-run as `--reference-sse-server`): the floor of the HTTP stack.

use std::time::Duration;

use futures::future::try_join_all;
use tokio::io::AsyncBufReadExt;

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
    for chunk in indexes.chunks(25) {
        let batch = chunk.iter().map(|i| stack.events(&sids[i % sessions], 0));
        open.extend(try_join_all(batch).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = stack.rss_kib();
    let per = after.saturating_sub(before) as f64 / subscribers as f64;
    drop(open);
    stack.stop(&env.server).await;
    let floor = bare_axum(subscribers).await?;
    Ok(Scenario {
        name: "subscribers",
        title: "Idle SSE subscribers",
        method: format!(
            "`hotplex serve` with {sessions} sessions; {subscribers} SSE subscribers (spread \
             over the sessions, each its own HTTP/1.1 connection) are opened and held idle; the \
             server's RSS before and after, divided by the subscribers. Reference: as many idle \
             subscribers of a bare axum server (one silent SSE route, no middleware, no \
             database) measured the same way."
        ),
        rows: vec![
            Row::new("RSS per idle subscriber", per, "KiB")
                .reference("bare axum SSE server", floor)
                .at_most(20.0),
        ],
        notes: vec![
            format!("Server RSS: {before} KiB before, {after} KiB with {subscribers} subscribers."),
            "Where it goes (heaptrack, 1,000 subscribers, release build, allocations live \
             while the streams are open): hyper allocates the same for hotplex and for the bare \
             server, a 16 KiB read buffer, an 8 KiB header buffer and ~1.4 KiB of task per \
             connection, of which it touches only the first pages; hotplex adds ~1.9 KiB (the \
             SSE body and the response headers). With glibc's defaults those buffers come from \
             heap memory that hotplex's short-lived allocations (auth, queries, JSON) have \
             already dirtied, so all their pages are resident (~24 KiB per subscriber); the \
             bare server allocates nothing else, so its buffers land on fresh pages. hotplex \
             therefore sets glibc's mmap threshold to 8 KiB at start-up (src/main.rs): the \
             buffers get mappings of their own and their untouched pages stay non-resident. \
             The reference runs with glibc's defaults. (jemalloc and mimalloc did not help: \
             27.6 and 23.7 KiB against 24.2 with default glibc, 3,000 subscribers.)"
                .into(),
        ],
        ..Scenario::default()
    })
}

/// Idle subscribers of a bare axum SSE server: KiB of its RSS per subscriber.
async fn bare_axum(subscribers: usize) -> anyhow::Result<f64> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg(REFERENCE_FLAG)
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let addr = lines
        .next_line()
        .await?
        .ok_or_else(|| anyhow::anyhow!("the reference server printed no address"))?;
    let pid = child
        .id()
        .ok_or_else(|| anyhow::anyhow!("the reference server exited"))?;
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/");
    drop(client.get(&url).send().await?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = crate::stack::rss_kib(pid);
    let mut open = Vec::with_capacity(subscribers);
    let indexes: Vec<usize> = (0..subscribers).collect();
    for chunk in indexes.chunks(250) {
        let batch = chunk.iter().map(|_| client.get(&url).send());
        open.extend(try_join_all(batch).await?);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = crate::stack::rss_kib(pid);
    drop(open);
    let _ = child.kill().await;
    Ok(after.saturating_sub(before) as f64 / subscribers as f64)
}

/// The flag that turns this binary into the reference server.
pub const REFERENCE_FLAG: &str = "--reference-sse-server";

/// The reference server: prints its address, then serves `GET /` as an SSE stream that
/// never sends an event (keep-alive comments only), until killed.
pub async fn reference_server() -> anyhow::Result<()> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(|| async {
            Sse::new(futures::stream::pending::<
                Result<Event, std::convert::Infallible>,
            >())
            .keep_alive(KeepAlive::default())
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    axum::serve(listener, app.into_make_service()).await?;
    Ok(())
}
