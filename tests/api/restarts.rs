//! Restarts of the rest of the fleet, as separate OS processes (`hotplex serve` and two
//! `hotplex worker`s, the fake agent): PostgreSQL restarted under running turns, the API
//! process replaced, and a rolling restart of every worker. Clients follow the sessions the
//! way a real one does (reconnecting with `Last-Event-ID`), and must see every event once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::processes::{ended_turn, logs_tail, serve, worker};
use crate::support::{SseEvent, TestDb, create_key};

/// A client that follows one session's events for as long as the test runs: whenever the
/// stream breaks (the API or the database went away) it reconnects, to whatever `base`
/// says now, with `Last-Event-ID`.
struct Follower {
    seen: Arc<Mutex<Vec<SseEvent>>>,
    reconnects: Arc<Mutex<u32>>,
    stop: CancellationToken,
}

impl Follower {
    fn start(base: Arc<Mutex<String>>, key: &str, sid: &str) -> Self {
        let seen: Arc<Mutex<Vec<SseEvent>>> = Arc::default();
        let reconnects: Arc<Mutex<u32>> = Arc::default();
        let stop = CancellationToken::new();
        let (key, sid) = (key.to_owned(), sid.to_owned());
        let (seen2, reconnects2, stop2) = (seen.clone(), reconnects.clone(), stop.clone());
        tokio::spawn(async move {
            use futures::StreamExt;
            let client = reqwest::Client::new();
            let mut first = true;
            loop {
                if !first {
                    *reconnects2.lock().unwrap() += 1;
                    tokio::select! {
                        () = stop2.cancelled() => return,
                        () = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                }
                first = false;
                let last = seen2.lock().unwrap().last().map_or(0, |e| e.id);
                let url = format!("{}/v1/sessions/{sid}/events", base.lock().unwrap());
                let response = tokio::select! {
                    () = stop2.cancelled() => return,
                    r = client.get(url).bearer_auth(&key).header("last-event-id", last.to_string()).send() => r,
                };
                let Ok(response) = response else { continue };
                if response.status() != 200 {
                    continue;
                }
                let mut body = response.bytes_stream();
                let mut parser = hotplex::sse::Parser::new();
                loop {
                    let chunk = tokio::select! {
                        () = stop2.cancelled() => return,
                        c = body.next() => c,
                    };
                    let Some(Ok(chunk)) = chunk else { break };
                    seen2.lock().unwrap().extend(
                        parser
                            .push(&chunk)
                            .into_iter()
                            .filter_map(SseEvent::from_frame),
                    );
                }
            }
        });
        Self {
            seen,
            reconnects,
            stop,
        }
    }

    fn events(&self) -> Vec<SseEvent> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until an event `f` accepts has been seen.
    async fn wait_for(&self, what: &str, dir: &std::path::Path, f: impl Fn(&SseEvent) -> bool) {
        for _ in 0..1200 {
            if self.seen.lock().unwrap().iter().any(&f) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no {what} within 60 s{}", logs_tail(dir));
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Every event of the session in the table, as (seq, type).
async fn stored_events(pool: &sqlx::PgPool, sid: &str) -> Vec<(i64, String)> {
    let sid: uuid::Uuid = sid.parse().unwrap();
    sqlx::query_as("select seq, type from session_events where session_id = $1 order by seq")
        .bind(sid)
        .fetch_all(pool)
        .await
        .unwrap()
}

/// The client saw exactly the stored events: each once, in order, none missing.
async fn assert_saw_everything(pool: &sqlx::PgPool, follower: &Follower, sid: &str) {
    let stored = stored_events(pool, sid).await;
    let seqs: Vec<i64> = stored.iter().map(|(s, _)| *s).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as i64).collect::<Vec<_>>(),
        "stored seqs have gaps"
    );
    // The stream may still be catching up on the last ones.
    let mut seen = follower.events();
    for _ in 0..200 {
        if seen.len() >= stored.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        seen = follower.events();
    }
    let seen: Vec<(i64, String)> = seen.into_iter().map(|e| (e.id, e.event)).collect();
    assert_eq!(seen, stored, "the client's events differ from the table");
}

/// Posts a prompt; the turn (202), or the response's status and body.
async fn try_post(
    client: &reqwest::Client,
    base: &str,
    key: &str,
    sid: &str,
    prompt: &str,
) -> Result<Value, (u16, String)> {
    let r = client
        .post(format!("{base}/v1/sessions/{sid}/turns"))
        .bearer_auth(key)
        .json(&json!({ "prompt": prompt }))
        .timeout(Duration::from_secs(30))
        .send()
        .await
        .map_err(|e| (0, e.to_string()))?;
    let status = r.status().as_u16();
    let body = r.text().await.unwrap_or_default();
    if status == 202 {
        Ok(serde_json::from_str(&body).unwrap())
    } else {
        Err((status, body))
    }
}

/// Each turn ended `completed`, and ran once (one `turn.started` in the table).
async fn assert_completed_once(
    client: &reqwest::Client,
    pool: &sqlx::PgPool,
    base: &str,
    key: &str,
    turns: &[Value],
    dir: &std::path::Path,
) {
    for t in turns {
        let id = t["id"].as_str().unwrap();
        let done = ended_turn(client, base, key, id, dir).await;
        assert_eq!(done["status"], "completed", "{done}{}", logs_tail(dir));
        let starts: i64 = sqlx::query_scalar(
            "select count(*) from session_events where turn_id = $1 and type = 'turn.started'",
        )
        .bind(id.parse::<uuid::Uuid>().unwrap())
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(starts, 1, "turn {id} started {starts} times");
    }
}

async fn new_session(client: &reqwest::Client, base: &str, key: &str) -> String {
    crate::processes::new_session(client, base, key).await
}

/// The live workers the admin API lists.
async fn live_workers(client: &reqwest::Client, base: &str, key: &str) -> Vec<String> {
    let listed: Value = client
        .get(format!("{base}/v1/admin/workers"))
        .bearer_auth(key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    listed["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_postgres_restart_under_running_turns_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    // A private cluster, so the test may stop and start it.
    let pg_options = hotplex::embedded_pg::Options {
        data_dir: dir.path().join("pg"),
        bin_dir: None,
        run_as: None,
        ephemeral: true,
    };
    let mut pg = hotplex::embedded_pg::EmbeddedPg::start(pg_options.clone())
        .await
        .unwrap();
    let url = pg.url("hotplex");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(pg.connect_options())
        .await
        .unwrap();
    hotplex::store::migrate(&pool).await.unwrap();
    let key = create_key(&pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let fake = crate::processes::fake_agent_script(dir.path());
    // Leases of 3 s, and the database stays down for longer than that: no worker may be
    // declared lost for the silence the outage forced on all of them.
    let env = [
        ("DATABASE_URL", url.as_str()),
        ("HOTPLEX_WORKER__LEASE_TTL", "3s"),
        ("HOTPLEX_DATABASE__ACQUIRE_TIMEOUT", "2s"),
        (
            "HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY",
            fake.to_str().unwrap(),
        ),
    ];
    let serve = serve(dir.path(), data, &env).await;
    let (w1, w1_id) = worker(dir.path(), data, &env).await;
    let (w2, w2_id) = worker(dir.path(), data, &env).await;
    let base = Arc::new(Mutex::new(serve.ready.clone()));
    let b = serve.ready.clone();
    let client = reqwest::Client::new();

    let mut sessions = Vec::new();
    let mut turns = Vec::new();
    for _ in 0..2 {
        let sid = new_session(&client, &b, &key).await;
        let follower = Follower::start(base.clone(), &key, &sid);
        turns.push(
            try_post(&client, &b, &key, &sid, "[[slow]] a long story")
                .await
                .unwrap(),
        );
        turns.push(
            try_post(&client, &b, &key, &sid, "queued behind it")
                .await
                .unwrap(),
        );
        sessions.push((sid, follower));
    }
    for (_, f) in &sessions {
        f.wait_for("text.delta", dir.path(), |e| e.event == "text.delta")
            .await;
    }

    // Down for 5 s (beyond the lease TTL), mid-turn.
    pg.stop().await;
    drop(pg);
    let down = tokio::time::Instant::now();
    // Meanwhile a prompt is refused with a clear 503, not accepted and lost.
    let refused = try_post(&client, &b, &key, &sessions[0].0, "while down").await;
    match refused {
        Err((503, body)) => {
            let body: Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["error"]["code"], "database_unavailable", "{body}");
        }
        other => panic!("a prompt while the database is down: {other:?}"),
    }
    tokio::time::sleep_until(down + Duration::from_secs(5)).await;
    let mut pg = hotplex::embedded_pg::EmbeddedPg::start(pg_options)
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(pg.connect_options())
        .await
        .unwrap();

    // The service takes prompts again at once.
    for (sid, _) in &sessions {
        turns.push(
            try_post(&client, &b, &key, sid, "after the restart")
                .await
                .unwrap(),
        );
    }
    assert_completed_once(&client, &pool, &b, &key, &turns, dir.path()).await;
    for (sid, follower) in &sessions {
        assert_saw_everything(&pool, follower, sid).await;
    }
    // The slow turns' text arrived whole: nothing of the stream was dropped in the outage.
    for t in turns.iter().step_by(2).take(2) {
        let id = t["id"].as_str().unwrap();
        let sid = t["session_id"].as_str().unwrap();
        let (_, follower) = sessions.iter().find(|(s, _)| s == sid).unwrap();
        let text: String = follower
            .events()
            .iter()
            .filter(|e| e.event == "text.delta" && e.data["turn_id"] == id)
            .map(|e| e.data["text"].as_str().unwrap().to_owned())
            .collect();
        let done = ended_turn(&client, &b, &key, id, dir.path()).await;
        assert_eq!(text, done["result"].as_str().unwrap());
    }
    // Both workers stayed in the fleet (none was declared lost for the outage).
    let mut live = live_workers(&client, &b, &key).await;
    live.sort();
    let mut expected = vec![w1_id, w2_id];
    expected.sort();
    assert_eq!(live, expected, "{}", logs_tail(dir.path()));
    drop(sessions);
    assert!(w1.stop(Signal::SIGTERM).await.success());
    assert!(w2.stop(Signal::SIGTERM).await.success());
    assert!(serve.stop(Signal::SIGINT).await.success());
    pool.close().await;
    pg.stop().await;
}

/// The usual settings of these tests: a database, the fake agent.
fn fleet_env(db: &TestDb, dir: &std::path::Path) -> Vec<(String, String)> {
    let fake = crate::processes::fake_agent_script(dir);
    vec![
        ("DATABASE_URL".into(), db.url.clone()),
        ("HOTPLEX_WORKER__LEASE_TTL".into(), "3s".into()),
        (
            "HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY".into(),
            fake.to_str().unwrap().into(),
        ),
    ]
}

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, s)| (k.as_str(), s.as_str())).collect()
}

#[tokio::test]
async fn an_api_process_killed_mid_stream_is_replaced_and_clients_resume_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let key = create_key(&db.pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let env = fleet_env(&db, dir.path());
    let env = as_refs(&env);
    let first = serve(dir.path(), data, &env).await;
    let (w1, _) = worker(dir.path(), data, &env).await;
    let (w2, _) = worker(dir.path(), data, &env).await;
    let base = Arc::new(Mutex::new(first.ready.clone()));
    let client = reqwest::Client::new();
    let b = first.ready.clone();
    let sid = new_session(&client, &b, &key).await;
    let follower = Follower::start(base.clone(), &key, &sid);
    let slow = try_post(&client, &b, &key, &sid, "[[slow]] a long story")
        .await
        .unwrap();
    follower
        .wait_for("text.delta", dir.path(), |e| e.event == "text.delta")
        .await;

    // The API process dies mid-stream; a new one (another port) takes its place. Any API
    // node can serve any session: it holds nothing in memory that the tables do not.
    let status = first.stop(Signal::SIGKILL).await;
    assert!(!status.success());
    let second = serve(dir.path(), data, &env).await;
    let b = second.ready.clone();
    *base.lock().unwrap() = b.clone();
    let next = try_post(&client, &b, &key, &sid, "through the new API")
        .await
        .unwrap();
    assert_completed_once(
        &client,
        &db.pool,
        &b,
        &key,
        &[slow.clone(), next],
        dir.path(),
    )
    .await;
    assert_saw_everything(&db.pool, &follower, &sid).await;
    assert!(*follower.reconnects.lock().unwrap() >= 1);
    // The stream of the slow turn is whole across the switch.
    let text: String = follower
        .events()
        .iter()
        .filter(|e| e.event == "text.delta" && e.data["turn_id"] == slow["id"])
        .map(|e| e.data["text"].as_str().unwrap().to_owned())
        .collect();
    let done = ended_turn(&client, &b, &key, slow["id"].as_str().unwrap(), dir.path()).await;
    assert_eq!(text, done["result"].as_str().unwrap());
    drop(follower);
    assert!(w1.stop(Signal::SIGTERM).await.success());
    assert!(w2.stop(Signal::SIGTERM).await.success());
    assert!(second.stop(Signal::SIGINT).await.success());
}

#[tokio::test]
async fn a_rolling_restart_of_every_worker_under_load_loses_nothing_and_runs_nothing_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let key = create_key(&db.pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let env = fleet_env(&db, dir.path());
    let env = as_refs(&env);
    let api = serve(dir.path(), data, &env).await;
    let (w1, w1_id) = worker(dir.path(), data, &env).await;
    let (w2, w2_id) = worker(dir.path(), data, &env).await;
    let b = api.ready.clone();
    let base = Arc::new(Mutex::new(b.clone()));
    let client = reqwest::Client::new();

    // Four sessions, each sent a prompt every 150 ms while the workers are replaced.
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let sid = new_session(&client, &b, &key).await;
        let follower = Follower::start(base.clone(), &key, &sid);
        sessions.push((sid, follower));
    }
    let load = CancellationToken::new();
    let posted: Arc<Mutex<Vec<Value>>> = Arc::default();
    let mut senders = Vec::new();
    for (i, (sid, _)) in sessions.iter().enumerate() {
        let (client, b, key, sid) = (client.clone(), b.clone(), key.clone(), sid.clone());
        let (load, posted) = (load.clone(), posted.clone());
        senders.push(tokio::spawn(async move {
            let mut n = 0;
            while !load.is_cancelled() {
                let prompt = if n % 5 == 0 {
                    format!("[[bash:echo s{i} t{n}]]")
                } else {
                    format!("session {i} prompt {n}")
                };
                let turn = try_post(&client, &b, &key, &sid, &prompt).await.unwrap();
                posted.lock().unwrap().push(turn);
                n += 1;
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // One by one: drain (the admin API for the first, SIGTERM for the second), and a new
    // worker in its place.
    let r = client
        .post(format!("{b}/v1/admin/workers/{w1_id}/drain"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    assert!(
        w1.exited(Duration::from_secs(60), dir.path())
            .await
            .success()
    );
    let (w3, w3_id) = worker(dir.path(), data, &env).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        w2.stop(Signal::SIGTERM).await.success(),
        "{}",
        logs_tail(dir.path())
    );
    let (w4, w4_id) = worker(dir.path(), data, &env).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.cancel();
    for s in senders {
        s.await.unwrap();
    }

    let turns = posted.lock().unwrap().clone();
    assert!(turns.len() > 40, "only {} turns were posted", turns.len());
    assert_completed_once(&client, &db.pool, &b, &key, &turns, dir.path()).await;
    // The new workers took the sessions over (affinity keeps a session on the worker that
    // claimed it, so which of the two got them is not fixed).
    let mut ran_on: HashMap<String, usize> = HashMap::new();
    for t in &turns {
        let done = ended_turn(&client, &b, &key, t["id"].as_str().unwrap(), dir.path()).await;
        *ran_on
            .entry(done["worker_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert!(
        ran_on.contains_key(&w3_id) || ran_on.contains_key(&w4_id),
        "the new workers ran nothing: {ran_on:?}"
    );
    assert!(
        ran_on
            .keys()
            .all(|w| [&w1_id, &w2_id, &w3_id, &w4_id].contains(&w))
    );
    for (sid, follower) in &sessions {
        assert_saw_everything(&db.pool, follower, sid).await;
    }
    drop(sessions);
    assert!(w3.stop(Signal::SIGTERM).await.success());
    assert!(w4.stop(Signal::SIGTERM).await.success());
    assert!(api.stop(Signal::SIGINT).await.success());
}

#[tokio::test]
async fn up_replaces_its_worker_when_the_fleet_declares_it_lost() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let key = create_key(&db.pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let env = fleet_env(&db, dir.path());
    let env = as_refs(&env);
    let up = crate::processes::Running::spawn(
        dir.path(),
        &["up", "--listen", "127.0.0.1:0", "--data-dir", data],
        &env,
        "hotplex listening on ",
    )
    .await;
    let b = up.ready.clone();
    let client = reqwest::Client::new();
    let sid = new_session(&client, &b, &key).await;
    let one = try_post(&client, &b, &key, &sid, "one").await.unwrap();
    assert_completed_once(&client, &db.pool, &b, &key, &[one], dir.path()).await;
    let first = live_workers(&client, &b, &key).await;
    assert_eq!(first.len(), 1);
    // The fleet declares the worker lost (as another worker's sweep would after a pause).
    sqlx::query("update workers set stopped_at = now() where worker_id = $1::uuid")
        .bind(&first[0])
        .execute(&db.pool)
        .await
        .unwrap();
    let mut replaced = Vec::new();
    for _ in 0..200 {
        replaced = live_workers(&client, &b, &key).await;
        if replaced.len() == 1 && replaced != first {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        replaced.len() == 1 && replaced != first,
        "no new worker: {replaced:?}{}",
        logs_tail(dir.path())
    );
    // The single process keeps serving turns, on the new worker, with the conversation.
    let two = try_post(&client, &b, &key, &sid, "two").await.unwrap();
    assert_completed_once(
        &client,
        &db.pool,
        &b,
        &key,
        std::slice::from_ref(&two),
        dir.path(),
    )
    .await;
    let done = ended_turn(&client, &b, &key, two["id"].as_str().unwrap(), dir.path()).await;
    assert_eq!(done["worker_id"], replaced[0].as_str());
    assert!(
        done["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 2)"),
        "{done}"
    );
    assert!(up.stop(Signal::SIGINT).await.success());
}
