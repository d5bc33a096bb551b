//! Worker building blocks against real Postgres: leases with fencing, coalesced writes.

use std::time::Duration;

use hotplex::domain::{SessionId, TurnId, WorkerId};
use hotplex::events::EventBody;
use hotplex::store::{self, leases};
use hotplex::worker::writer::EventWriter;
use serde_json::{Value, json};

use crate::support::TestApp;

/// A session with one queued turn, and a registered worker.
async fn session_and_worker(app: &TestApp) -> (SessionId, WorkerId, TurnId) {
    let session: SessionId = app.new_session(&app.admin_key).await.parse().unwrap();
    let t: Value = app
        .post(&format!("/v1/sessions/{session}/turns"), &app.admin_key)
        .json(&json!({"prompt": "hi"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let turn: TurnId = t["id"].as_str().unwrap().parse().unwrap();
    let worker = WorkerId::new_random();
    store::workers::register(&app.db.pool, worker, "test-host", 1, 4, None)
        .await
        .unwrap();
    (session, worker, turn)
}

#[tokio::test]
async fn leases_fence_out_a_worker_that_lost_its_session() {
    let app = TestApp::spawn().await;
    let (session, a, turn) = session_and_worker(&app).await;
    let b = WorkerId::new_random();
    store::workers::register(&app.db.pool, b, "other-host", 2, 4, None)
        .await
        .unwrap();
    let ttl = Duration::from_secs(30);
    let fence_a = leases::claim(&app.db.pool, session, a, ttl)
        .await
        .unwrap()
        .expect("free session");
    assert!(
        leases::claim(&app.db.pool, session, b, ttl)
            .await
            .unwrap()
            .is_none(),
        "held by a live worker"
    );
    assert_eq!(
        leases::claim(&app.db.pool, session, a, ttl).await.unwrap(),
        Some(fence_a),
        "re-claim keeps the generation"
    );

    // A stops (or its lease expires): B takes over with a higher generation.
    store::workers::stopped(&app.db.pool, a).await.unwrap();
    let fence_b = leases::claim(&app.db.pool, session, b, ttl)
        .await
        .unwrap()
        .expect("takeover");
    assert!(fence_b.generation > fence_a.generation);
    assert!(
        !leases::renew(&app.db.pool, session, fence_a, ttl)
            .await
            .unwrap()
    );

    let mut stale = EventWriter::new(
        app.db.pool.clone(),
        session,
        fence_a,
        turn,
        Duration::from_millis(20),
    );
    stale.push(EventBody::TextDelta {
        text: "late".into(),
    });
    assert!(matches!(stale.flush().await, Err(store::Error::Fenced)));
    let mut owner = EventWriter::new(
        app.db.pool.clone(),
        session,
        fence_b,
        turn,
        Duration::from_millis(20),
    );
    owner.push(EventBody::TextDelta {
        text: "mine".into(),
    });
    owner.flush().await.unwrap();
    let types: Vec<String> = sqlx::query_scalar(
        "select type from session_events where session_id = $1 and seq > 3 order by seq",
    )
    .bind(session)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(types, ["text.delta"]);
}

#[tokio::test]
async fn deltas_are_coalesced_and_other_events_keep_their_order() {
    let app = TestApp::spawn().await;
    let (session, worker, turn) = session_and_worker(&app).await;
    let fence = leases::claim(&app.db.pool, session, worker, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    let mut w = EventWriter::new(
        app.db.pool.clone(),
        session,
        fence,
        turn,
        Duration::from_secs(60),
    );
    // The first delta after a quiet spell goes out at once; the next ones are held.
    assert!(w.push(EventBody::TextDelta { text: "a".into() }));
    w.flush().await.unwrap();
    for t in ["b", "c", "d"] {
        assert!(!w.push(EventBody::TextDelta { text: t.into() }));
    }
    assert!(w.due_at().is_some());
    assert!(w.push(EventBody::ToolStarted {
        tool_use_id: "t1".into(),
        name: "Bash".into(),
        input: json!({})
    }));
    w.flush().await.unwrap();
    assert_eq!(w.text, "abcd");
    let rows: Vec<(i64, String, Value)> = sqlx::query_as(
        "select seq, type, payload from session_events where session_id = $1 and seq > 3 order by seq",
    )
    .bind(session)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(kinds, ["text.delta", "text.delta", "tool.started"]);
    assert_eq!(rows[1].2["text"], "bcd");
    // After session.created and the two events of the enqueue (session.status,
    // turn.queued), without gaps.
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [4, 5, 6]);
}

#[tokio::test]
async fn two_workers_share_sessions_and_each_session_stays_on_one_worker_in_order() {
    let app = TestApp::spawn_with_worker(|_| {}).await;
    let second = app.start_worker().await;
    let sessions = futures::future::join_all((0..4).map(|_| app.new_session(&app.admin_key))).await;
    // Bursts of prompts to every session at once: some jobs land on the shared queue while
    // another worker already holds the session, and must be forwarded to it.
    let app_ref = &app;
    let posts = sessions.iter().flat_map(|sid| {
        (0..6).map(move |i| {
            let app = app_ref;
            app.post(&format!("/v1/sessions/{sid}/turns"), &app.admin_key)
                .json(&json!({"prompt": format!("prompt {i}")}))
                .send()
        })
    });
    for r in futures::future::join_all(posts).await {
        assert_eq!(r.unwrap().status(), 202);
    }
    let mut pending = i64::MAX;
    for _ in 0..600 {
        pending =
            sqlx::query_scalar("select count(*) from turns where status in ('queued', 'running')")
                .fetch_one(&app.db.pool)
                .await
                .unwrap();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(pending, 0, "turns were left behind");
    let mut used = std::collections::HashSet::new();
    for sid in &sessions {
        let rows: Vec<(i64, String, Option<WorkerId>)> = sqlx::query_as(
            "select seq, status, worker_id from turns where session_id = $1::uuid order by seq",
        )
        .bind(sid)
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
        assert_eq!(rows.len(), 6);
        assert!(rows.iter().all(|r| r.1 == "completed"), "{rows:?}");
        let owner = rows[0].2;
        assert!(
            rows.iter().all(|r| r.2 == owner),
            "a session moved: {rows:?}"
        );
        used.insert(owner);
        // The warm process numbers its turns: they ran in seq order on one process.
        let results: Vec<(String, String)> = sqlx::query_as(
            "select prompt, result from turns where session_id = $1::uuid order by seq",
        )
        .bind(sid)
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
        for (i, (prompt, result)) in results.iter().enumerate() {
            let expected = format!("FAKE-ECHO(turn {}): {prompt}", i + 1);
            assert!(result.contains(&expected), "{result} is not {expected}");
        }
    }
    let ids: Vec<Option<WorkerId>> = vec![
        app.worker.as_ref().map(|w| w.worker.id),
        Some(second.worker.id),
    ];
    assert!(used.iter().all(|u| ids.contains(u)), "{used:?}");
}

#[tokio::test]
async fn a_warm_sessions_owner_runs_a_turn_on_the_notify_alone() {
    let app = TestApp::spawn_with_worker(|_| {}).await;
    let sid = app.new_session(&app.admin_key).await;
    let turns = format!("/v1/sessions/{sid}/turns?wait=true&timeout=20");
    let first: Value = app
        .post(&turns, &app.admin_key)
        .json(&json!({"prompt": "warm"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(first["status"], "completed", "{first}");
    // From here on no job reaches the queue: a trigger drops every insert into it.
    sqlx::raw_sql(
        "create function drop_jobs() returns trigger language plpgsql as $$ begin return null; end $$;
         create trigger drop_jobs before insert on apalis.jobs for each row execute function drop_jobs();",
    )
    .execute(&app.db.pool)
    .await
    .unwrap();
    let second: Value = app
        .post(&turns, &app.admin_key)
        .json(&json!({"prompt": "no job"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["status"], "completed", "{second}");
    let jobs: i64 =
        sqlx::query_scalar("select count(*) from apalis.jobs where idempotency_key = $1")
            .bind(second["id"].as_str().unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(jobs, 0, "the turn ran without a job");
}

/// A "ghost" worker that started `prompt`'s turn (with output or not) and then died
/// without a trace: its heartbeat and its lease are long expired. Returns the session and
/// the turn.
async fn turn_of_a_lost_worker(app: &TestApp, prompt: &str, output: bool) -> (SessionId, TurnId) {
    let session: SessionId = app.new_session(&app.admin_key).await.parse().unwrap();
    let ghost = WorkerId::new_random();
    store::workers::register(&app.db.pool, ghost, "ghost-host", 1, 4, None)
        .await
        .unwrap();
    let fence = leases::claim(&app.db.pool, session, ghost, Duration::from_secs(30))
        .await
        .unwrap()
        .unwrap();
    // Enqueued while the ghost owned the session: the job went to the ghost's own queue.
    let t: Value = app
        .post(&format!("/v1/sessions/{session}/turns"), &app.admin_key)
        .json(&json!({ "prompt": prompt }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let turn_id: TurnId = t["id"].as_str().unwrap().parse().unwrap();
    let row = store::turns::get(&app.db.pool, store::tenants::DEFAULT_TENANT_ID, turn_id)
        .await
        .unwrap()
        .unwrap();
    let mut events = vec![hotplex::events::NewEvent::turn(
        turn_id,
        EventBody::TurnStarted {
            worker_id: ghost,
            pid: None,
            resumed: false,
        },
    )];
    if output {
        events.push(hotplex::events::NewEvent::turn(
            turn_id,
            EventBody::TextDelta {
                text: "half an ans".into(),
            },
        ));
    }
    let mut conn = app.db.pool.acquire().await.unwrap();
    store::turns::start(&mut conn, &row, fence, &events)
        .await
        .unwrap();
    sqlx::query("update workers set heartbeat_at = now() - interval '1 hour' where worker_id = $1")
        .bind(ghost)
        .execute(&app.db.pool)
        .await
        .unwrap();
    sqlx::query(
        "update session_leases set expires_at = now() - interval '1 second' where session_id = $1",
    )
    .bind(session)
    .execute(&app.db.pool)
    .await
    .unwrap();
    (session, turn_id)
}

#[tokio::test]
async fn a_lost_workers_turns_are_retried_once_without_output_and_failed_with_it() {
    let app = TestApp::spawn_with_fake_agent(|s| s.worker.lease_ttl = Duration::from_secs(3)).await;
    let (quiet_session, quiet) = turn_of_a_lost_worker(&app, "no output yet", false).await;
    let (loud_session, loud) = turn_of_a_lost_worker(&app, "spoke already", true).await;
    // A turn queued behind the lost one runs after it, on the new owner.
    let next: Value = app
        .post(
            &format!("/v1/sessions/{loud_session}/turns"),
            &app.admin_key,
        )
        .json(&json!({"prompt": "next"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();

    // A live worker notices the silence, marks the ghost stopped and moves its work.
    let worker = app.start_worker().await;
    let wait_end = |turn: String| {
        let app = &app;
        async move { app.ended_turn(&turn, Duration::from_secs(15)).await }
    };
    let quiet_turn = wait_end(quiet.to_string()).await;
    assert_eq!(quiet_turn["status"], "completed", "{quiet_turn}");
    assert_eq!(quiet_turn["worker_id"], worker.worker.id.to_string());
    let loud_turn = wait_end(loud.to_string()).await;
    assert_eq!(loud_turn["status"], "failed", "{loud_turn}");
    assert_eq!(
        loud_turn["error"],
        "the worker running the turn was lost after it had produced output"
    );
    let next_turn = wait_end(next["id"].as_str().unwrap().to_owned()).await;
    assert_eq!(next_turn["status"], "completed", "{next_turn}");

    let types = |session: SessionId| {
        let pool = app.db.pool.clone();
        async move {
            sqlx::query_scalar::<_, String>(
                "select type from session_events where session_id = $1 and turn_id is not null order by seq",
            )
            .bind(session)
            .fetch_all(&pool)
            .await
            .unwrap()
        }
    };
    let quiet_types = types(quiet_session).await;
    assert_eq!(
        &quiet_types[..3],
        ["turn.queued", "turn.started", "turn.retried"],
        "{quiet_types:?}"
    );
    assert_eq!(quiet_types[3], "turn.started");
    assert_eq!(quiet_types.last().unwrap(), "turn.completed");
    let stopped: bool = sqlx::query_scalar(
        "select bool_and(stopped_at is not null) from workers where host = 'ghost-host'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert!(stopped, "the lost workers are marked stopped");
    worker.stop().await;
}

#[tokio::test]
async fn a_released_lease_is_free_at_once_and_its_generations_keep_growing() {
    let app = TestApp::spawn().await;
    let (session, a, _) = session_and_worker(&app).await;
    let b = WorkerId::new_random();
    store::workers::register(&app.db.pool, b, "other-host", 2, 4, None)
        .await
        .unwrap();
    let ttl = Duration::from_secs(30);
    let first = leases::claim(&app.db.pool, session, a, ttl)
        .await
        .unwrap()
        .unwrap();
    leases::release(&app.db.pool, session, first).await.unwrap();
    assert_eq!(leases::owner(&app.db.pool, session).await.unwrap(), None);
    // The heartbeat does not bring a released lease back.
    leases::renew_all(&app.db.pool, a, ttl).await.unwrap();
    assert_eq!(leases::owner(&app.db.pool, session).await.unwrap(), None);
    // The same worker claiming again starts a new tenure: the old fence is dead.
    let second = leases::claim(&app.db.pool, session, a, ttl)
        .await
        .unwrap()
        .unwrap();
    assert!(second.generation > first.generation);
    assert!(
        !leases::renew(&app.db.pool, session, first, ttl)
            .await
            .unwrap()
    );
    leases::release(&app.db.pool, session, second)
        .await
        .unwrap();
    let third = leases::claim(&app.db.pool, session, b, ttl)
        .await
        .expect("another worker claims a released lease at once")
        .unwrap();
    assert!(third.generation > second.generation);
}

#[tokio::test]
async fn finished_jobs_are_pruned_after_their_retention_and_nothing_else() {
    let app = TestApp::spawn().await;
    for (id, status, done_ago) in [
        ("old-done", "Done", Some(7200)),
        ("old-killed", "Killed", Some(7200)),
        ("new-done", "Done", Some(10)),
        ("pending", "Pending", None),
        ("running", "Running", None),
    ] {
        sqlx::query(
            "insert into apalis.jobs (id, job_type, job, status, attempts, max_attempts, priority, done_at)
             values ($1, 'test', '\\x7b7d'::bytea, $2, 0, 1, 0, now() - make_interval(secs => $3))",
        )
        .bind(id)
        .bind(status)
        .bind(done_ago.map(f64::from))
        .execute(&app.db.pool)
        .await
        .unwrap();
    }
    let pruned = store::queue::prune_finished(&app.db.pool, Duration::from_secs(3600), 1000)
        .await
        .unwrap();
    assert_eq!(pruned, 2);
    let mut left: Vec<String> =
        sqlx::query_scalar("select id from apalis.jobs where job_type = 'test'")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    left.sort();
    assert_eq!(left, ["new-done", "pending", "running"]);
}

#[tokio::test]
async fn a_long_transcript_mirror_is_folded_into_one_chunk_by_its_owner_only() {
    let app = TestApp::spawn().await;
    let (session, worker, _) = session_and_worker(&app).await;
    let ttl = Duration::from_secs(30);
    let fence = leases::claim(&app.db.pool, session, worker, ttl)
        .await
        .unwrap()
        .unwrap();
    let cli = uuid::Uuid::new_v4();
    let mut whole = Vec::new();
    for i in 0..70 {
        let line = format!("{{\"turn\":{i}}}\n").into_bytes();
        let mut conn = app.db.pool.acquire().await.unwrap();
        assert!(
            store::sessions::append_agent_state(
                &mut conn,
                session,
                fence,
                cli,
                whole.len() as i64,
                &line
            )
            .await
            .unwrap()
        );
        whole.extend_from_slice(&line);
    }
    let count = || async {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from agent_state_chunks where session_id = $1",
        )
        .bind(session)
        .fetch_one(&app.db.pool)
        .await
        .unwrap()
    };
    // A worker that lost the lease folds nothing.
    let stale = store::events::Fence {
        worker_id: WorkerId::new_random(),
        generation: fence.generation,
    };
    assert!(
        !store::sessions::compact_agent_state(&app.db.pool, session, stale, cli, 64)
            .await
            .unwrap()
    );
    assert_eq!(count().await, 70);
    assert!(
        store::sessions::compact_agent_state(&app.db.pool, session, fence, cli, 64)
            .await
            .unwrap()
    );
    assert_eq!(count().await, 1);
    assert_eq!(
        store::sessions::agent_state(&app.db.pool, session, cli)
            .await
            .unwrap(),
        Some(whole.clone())
    );
    assert_eq!(
        store::sessions::mirrored_len(&app.db.pool, session, cli)
            .await
            .unwrap(),
        whole.len() as i64
    );
    // Appends go on after the fold.
    let mut conn = app.db.pool.acquire().await.unwrap();
    assert!(
        store::sessions::append_agent_state(
            &mut conn,
            session,
            fence,
            cli,
            whole.len() as i64,
            b"more\n"
        )
        .await
        .unwrap()
    );
    whole.extend_from_slice(b"more\n");
    assert_eq!(
        store::sessions::agent_state(&app.db.pool, session, cli)
            .await
            .unwrap(),
        Some(whole)
    );
}
