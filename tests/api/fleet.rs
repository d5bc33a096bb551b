//! The worker fleet under faults, as separate OS processes (`hotplex serve` and two
//! `hotplex worker`s with different agent HOMEs) running the real Claude Code CLI against
//! the mock Anthropic API: a worker killed with SIGKILL mid-turn.

use std::collections::HashMap;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::{Value, json};

use crate::processes::{Running, ended_turn, new_session, post_turn, serve, worker};

fn as_refs(v: &[(String, String)]) -> Vec<(&str, &str)> {
    v.iter().map(|(k, s)| (k.as_str(), s.as_str())).collect()
}
use crate::support::{TestDb, create_key};

#[tokio::test]
async fn a_worker_killed_mid_turn_loses_that_turn_and_the_session_goes_on_elsewhere_with_context() {
    let Some(claude) = crate::support::real_cli("HOTPLEX_TEST_CLAUDE") else {
        return;
    };
    let claude = claude.to_string_lossy().into_owned();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let options = hotplex::mock_llm::anthropic::MockOptions {
        delay: Duration::from_millis(200),
        ..Default::default()
    };
    let mock = hotplex::mock_llm::anthropic::start(listener, options)
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let key = create_key(&db.pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let mock_url = mock.base_url();
    let env = |home: &str| -> Vec<(String, String)> {
        [
            ("DATABASE_URL", db.url.as_str()),
            ("HOTPLEX_WORKER__LEASE_TTL", "3s"),
            ("HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY", claude.as_str()),
            (
                "HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__ANTHROPIC_BASE_URL",
                mock_url.as_str(),
            ),
            (
                "HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__ANTHROPIC_API_KEY",
                "test",
            ),
            (
                "HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC",
                "1",
            ),
            (
                "HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__DISABLE_TELEMETRY",
                "1",
            ),
            (
                "HOTPLEX_PROVIDERS__CLAUDE_CODE__ENV__DISABLE_AUTOUPDATER",
                "1",
            ),
            ("HOTPLEX_PROVIDERS__CLAUDE_CODE__HOME", home),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
    };
    let home = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let (env_serve, env_a, env_b) = (
        env(&home("home-s")),
        env(&home("home-a")),
        env(&home("home-b")),
    );
    let serve = serve(dir.path(), data, &as_refs(&env_serve)).await;
    let mut workers: HashMap<String, Running> = HashMap::new();
    for env in [&env_a, &env_b] {
        let (w, id) = worker(dir.path(), data, &as_refs(env)).await;
        workers.insert(id, w);
    }
    let base = serve.ready.clone();
    let client = reqwest::Client::new();
    let post = |path: String, body: Value| {
        client
            .post(format!("{base}{path}"))
            .bearer_auth(&key)
            .json(&body)
            .send()
    };
    let sid = new_session(&client, &base, &key).await;
    let turns = format!("/v1/sessions/{sid}/turns");
    let first: Value = post(
        format!("{turns}?wait=true&timeout=120"),
        json!({"prompt": "remember the word zebra"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(first["status"], "completed", "{first}");

    // A long turn, and one queued behind it.
    let slow: Value = post(
        turns.clone(),
        json!({"prompt": "[[slow:60]] tell a long story"}),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let queued: Value = post(turns.clone(), json!({"prompt": "what was the word?"}))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let slow_id = slow["id"].as_str().unwrap().to_owned();
    let mut started = None;
    for _ in 0..600 {
        started = sqlx::query_as::<_, (String, i64)>(
            "select t.worker_id::text, (e.payload->>'pid')::bigint
               from turns t join session_events e on e.turn_id = t.turn_id and e.type = 'turn.started'
              where t.turn_id = $1::uuid
                and exists (select 1 from session_events d where d.turn_id = t.turn_id and d.type = 'text.delta')",
        )
        .bind(&slow_id)
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if started.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (owner, agent_pid) = started.expect("the long turn streams");
    let survivor = workers.keys().find(|k| **k != owner).cloned().unwrap();

    // kill -9 the owner: no clean stop, no hand-back.
    let victim = workers.remove(&owner).unwrap();
    kill(victim.pid(), Signal::SIGKILL).unwrap();
    let killed_at = std::time::Instant::now();

    let slow = ended_turn(&client, &base, &key, &slow_id, dir.path()).await;
    assert_eq!(slow["status"], "failed", "{slow}");
    assert!(
        slow["error"]
            .as_str()
            .unwrap()
            .contains("lost after it had produced output"),
        "{slow}"
    );
    let done = ended_turn(
        &client,
        &base,
        &key,
        queued["id"].as_str().unwrap(),
        dir.path(),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["worker_id"], survivor.as_str(), "{done}");
    eprintln!("failover took {:?}", killed_at.elapsed());
    // The survivor has another HOME: the conversation came from its mirror in PostgreSQL.
    let mirrored: i64 = sqlx::query_scalar(
        "select count(*) from agent_state_chunks where session_id = $1::uuid and length(content) > 0",
    )
    .bind(&sid)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // One chunk per turn: the first turn's, then the survivor's (appended after it).
    assert!(mirrored >= 2, "{mirrored} chunks");
    let last = mock
        .requests()
        .into_iter()
        .rev()
        .find(|r| r["body"].to_string().contains("what was the word?"))
        .expect("the queued turn reached the model");
    assert!(
        last["body"].to_string().contains("remember the word zebra"),
        "{last}"
    );
    let evs: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "select seq, type, turn_id::text from session_events where session_id = $1::uuid order by seq",
    )
    .bind(&sid)
    .fetch_all(&db.pool)
    .await
    .unwrap();
    // Seqs without gaps or duplicates; the queued turn started once, resumed, on the survivor.
    let seqs: Vec<i64> = evs.iter().map(|e| e.0).collect();
    assert_eq!(seqs, (1..=seqs.len() as i64).collect::<Vec<_>>());
    let queued_id = queued["id"].as_str().unwrap();
    let starts = evs
        .iter()
        .filter(|e| e.1 == "turn.started" && e.2.as_deref() == Some(queued_id))
        .count();
    assert_eq!(starts, 1, "{evs:?}");
    assert!(
        !evs.iter().any(|e| e.1 == "session.context_lost"),
        "{evs:?}"
    );
    // The dead worker's agent was found and killed by the survivor's sweep.
    let mut gone = false;
    for _ in 0..100 {
        if kill(Pid::from_raw(agent_pid as i32), None).is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(gone, "the lost worker's agent {agent_pid} still runs");
    for (_, w) in workers {
        assert!(w.stop(Signal::SIGTERM).await.success());
    }
    assert!(serve.stop(Signal::SIGINT).await.success());
}

#[tokio::test]
async fn a_drained_worker_finishes_its_turn_hands_its_sessions_over_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let key = create_key(&db.pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let fake = crate::processes::fake_agent_script(dir.path());
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        (
            "HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY",
            fake.to_str().unwrap(),
        ),
    ];
    let serve = serve(dir.path(), data, &env).await;
    let (first, first_id) = worker(dir.path(), data, &env).await;
    let base = serve.ready.clone();
    let client = reqwest::Client::new();
    let sid = new_session(&client, &base, &key).await;
    // A client follows the session's events from the start.
    let mut sse = crate::support::Sse::new(
        client
            .get(format!("{base}/v1/sessions/{sid}/events"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap(),
    );
    let slow: Value = post_turn(&client, &base, &key, &sid, "[[slow]] a long story").await;
    let queued: Value = post_turn(&client, &base, &key, &sid, "after the drain").await;
    let mut seen = sse
        .until(Duration::from_secs(30), |e| e.event == "text.delta")
        .await;
    // The second worker joins; then the first is drained through the admin API.
    let (second, second_id) = worker(dir.path(), data, &env).await;
    let listed: Value = client
        .get(format!("{base}/v1/admin/workers"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["workers"].as_array().unwrap().len(), 2, "{listed}");
    // The same from the command line.
    let out = crate::processes::hotplex(dir.path())
        .args(["worker", "--data-dir", data, "list"])
        .envs(env.iter().copied())
        .output()
        .await
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    assert!(
        table.contains(&first_id) && table.contains(&second_id),
        "{table}"
    );
    let r = client
        .post(format!("{base}/v1/admin/workers/{first_id}/drain"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status = first.exited(Duration::from_secs(60), dir.path()).await;
    assert!(status.success(), "{status}");

    // The running turn finished where it was; the queued one ran on the other worker.
    let slow = ended_turn(
        &client,
        &base,
        &key,
        slow["id"].as_str().unwrap(),
        dir.path(),
    )
    .await;
    assert_eq!(slow["status"], "completed", "{slow}");
    assert_eq!(slow["worker_id"], first_id.as_str());
    let done = ended_turn(
        &client,
        &base,
        &key,
        queued["id"].as_str().unwrap(),
        dir.path(),
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["worker_id"], second_id.as_str(), "{done}");
    // The client saw every event once, in order, across the move.
    seen.extend(
        sse.until(Duration::from_secs(30), |e| {
            e.event == "turn.completed" && e.data["turn_id"] == queued["id"]
        })
        .await,
    );
    let ids: Vec<i64> = seen.iter().map(|e| e.id).collect();
    assert_eq!(ids[0], 1);
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    assert!(second.stop(Signal::SIGTERM).await.success());
    assert!(serve.stop(Signal::SIGINT).await.success());
}

/// Every process on this host whose environment names `worker` as its owner, with its
/// state (`Z` for a zombie).
fn processes_of(worker: &str) -> Vec<(u32, String)> {
    let needle = format!("{}={worker}", hotplex::provider::process::OWNER_VAR);
    let mut found = Vec::new();
    for pid in std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|kv| kv == needle.as_bytes()) {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let state = stat
                .rsplit_once(") ")
                .map(|(_, rest)| rest.chars().take(1).collect())
                .unwrap_or_default();
            found.push((pid, state));
        }
    }
    found
}

/// Zombies among this (test) process's children.
fn zombie_children() -> Vec<u32> {
    let me = std::process::id().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let Some((_, rest)) = stat.rsplit_once(") ") else {
                return false;
            };
            let fields: Vec<&str> = rest.split_whitespace().collect();
            fields.first() == Some(&"Z") && fields.get(1) == Some(&me.as_str())
        })
        .collect()
}

#[tokio::test]
async fn a_thousand_create_and_delete_cycles_leave_no_process_and_no_zombie() {
    let app = crate::support::TestApp::spawn_with_worker(|_| {}).await;
    let worker = app.worker.as_ref().unwrap().worker.id.to_string();
    let cycles = 1_000;
    let parallel = 10;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let cycle = || async {
        while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < cycles {
            let sid = app.new_session(&app.admin_key).await;
            // A turn, so that an agent process starts for the session.
            let turn: Value = app
                .post(
                    &format!("/v1/sessions/{sid}/turns?wait=true&timeout=60"),
                    &app.admin_key,
                )
                .json(&json!({"prompt": "hi"}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(turn["status"], "completed", "{turn}");
            let r = app
                .delete(&format!("/v1/sessions/{sid}"), &app.admin_key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 204);
        }
    };
    futures::future::join_all((0..parallel).map(|_| cycle())).await;
    // Deletes stop agents asynchronously (a NOTIFY to the owner): give them a moment.
    let mut left = processes_of(&worker);
    for _ in 0..100 {
        if left.is_empty() && zombie_children().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = processes_of(&worker);
    }
    assert!(left.is_empty(), "agent processes left: {left:?}");
    assert_eq!(zombie_children(), Vec::<u32>::new(), "zombies left");
    let started: i64 =
        sqlx::query_scalar("select count(*) from session_events where type = 'turn.started'")
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(started, cycles as i64);
}

#[tokio::test]
async fn a_worker_restarted_after_a_crash_settles_its_previous_incarnation_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let key = create_key(&db.pool, "default", hotplex::domain::Role::Admin).await;
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let fake = crate::processes::fake_agent_script(dir.path());
    // A lease TTL of a minute: the silence sweep would take that long; the crashed worker
    // must be settled long before.
    let env = [
        ("DATABASE_URL", db.url.as_str()),
        ("HOTPLEX_WORKER__LEASE_TTL", "60s"),
        (
            "HOTPLEX_PROVIDERS__CLAUDE_CODE__BINARY",
            fake.to_str().unwrap(),
        ),
    ];
    let serve = serve(dir.path(), data, &env).await;
    let (first, first_id) = worker(dir.path(), data, &env).await;
    let base = serve.ready.clone();
    let client = reqwest::Client::new();
    let sid = new_session(&client, &base, &key).await;
    let slow = post_turn(&client, &base, &key, &sid, "[[slow]] a long story").await;
    let queued = post_turn(&client, &base, &key, &sid, "after the crash").await;
    let sid_uuid: uuid::Uuid = sid.parse().unwrap();
    let count = |kind: &'static str| {
        sqlx::query_scalar::<_, i64>(
            "select count(*) from session_events where session_id = $1 and type = $2",
        )
        .bind(sid_uuid)
        .bind(kind)
        .fetch_one(&db.pool)
    };
    for _ in 0..400 {
        if count("text.delta").await.unwrap() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let agent: Option<Value> = sqlx::query_scalar(
        "select payload from session_events where session_id = $1 and type = 'turn.started'",
    )
    .bind(sid_uuid)
    .fetch_optional(&db.pool)
    .await
    .unwrap();
    let agent = agent.expect("the slow turn started")["pid"]
        .as_i64()
        .unwrap() as i32;

    // The worker crashes; its supervisor starts it again (a new worker on the same host).
    let crashed = tokio::time::Instant::now();
    first.stop(Signal::SIGKILL).await;
    let (second, second_id) = worker(dir.path(), data, &env).await;
    let settled_in = crashed.elapsed();
    // Its previous incarnation's agent is gone, its running turn settled (it had streamed:
    // failed), and the queued turn ran on the new worker, all well within the TTL.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
            s.rsplit_once(") ")
                .is_some_and(|(_, r)| !r.starts_with('Z'))
        })
    };
    assert!(!alive(agent), "the crashed worker's agent still runs");
    let slow = ended_turn(
        &client,
        &base,
        &key,
        slow["id"].as_str().unwrap(),
        dir.path(),
    )
    .await;
    assert_eq!(slow["status"], "failed", "{slow}");
    let queued = ended_turn(
        &client,
        &base,
        &key,
        queued["id"].as_str().unwrap(),
        dir.path(),
    )
    .await;
    assert_eq!(queued["status"], "completed", "{queued}");
    assert_eq!(queued["worker_id"], second_id.as_str());
    assert!(
        crashed.elapsed() < Duration::from_secs(30),
        "took {:?} (worker up after {settled_in:?})",
        crashed.elapsed()
    );
    let listed: Value = client
        .get(format!("{base}/v1/admin/workers"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let live: Vec<&str> = listed["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap())
        .collect();
    assert_eq!(live, [second_id.as_str()], "{first_id} is still listed");
    assert!(second.stop(Signal::SIGTERM).await.success());
    assert!(serve.stop(Signal::SIGINT).await.success());
}
