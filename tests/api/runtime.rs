//! Turns end to end on a worker with the fake agent: warm process, ordered turns, events.

use serde_json::{Value, json};

use crate::support::TestApp;

#[tokio::test]
async fn turns_run_on_a_warm_fake_agent_one_after_the_other() {
    let app = TestApp::spawn_with_worker(|_| {}).await;
    let sid = app.new_session(&app.admin_key).await;
    let turns = format!("/v1/sessions/{sid}/turns?wait=true&timeout=30");
    let first = app
        .post(&turns, &app.admin_key)
        .json(&json!({"prompt": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "completed", "{first}");
    assert!(
        first["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 1)"),
        "{first}"
    );
    assert!(first["usage"]["output_tokens"].as_i64().unwrap() >= 0);

    let second: Value = app
        .post(&turns, &app.admin_key)
        .json(&json!({"prompt": "again"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["status"], "completed", "{second}");
    // The same warm process answered: it counts the conversation's turns.
    assert!(
        second["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 2)"),
        "{second}"
    );

    let kinds: Vec<String> = sqlx::query_scalar(
        "select type from session_events where session_id = $1::uuid order by seq",
    )
    .bind(&sid)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let started: Vec<Value> = sqlx::query_scalar(
        "select payload from session_events where session_id = $1::uuid and type = 'turn.started' order by seq",
    )
    .bind(&sid)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(started.len(), 2);
    assert_eq!(started[0]["pid"], started[1]["pid"], "one warm process");
    assert!(
        kinds.contains(&"text.delta".to_owned()) && kinds.contains(&"turn.completed".to_owned()),
        "{kinds:?}"
    );
    assert_eq!(kinds.last().map(String::as_str), Some("session.status"));
    let session: Value = app.get_json(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(session["process"]["pid"], started[0]["pid"], "{session}");
    assert_eq!(session["status"], "idle");
    let total = first["usage"]["output_tokens"].as_i64().unwrap()
        + second["usage"]["output_tokens"].as_i64().unwrap();
    assert_eq!(session["usage"]["output_tokens"].as_i64().unwrap(), total);
}

/// Posts a prompt and waits (up to 60 s) for the turn to end.
async fn run_turn(app: &TestApp, sid: &str, prompt: &str) -> Value {
    let response = app
        .post(
            &format!("/v1/sessions/{sid}/turns?wait=true&timeout=60"),
            &app.admin_key,
        )
        .json(&json!({"prompt": prompt}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the turn did not end in time");
    response.json().await.unwrap()
}

async fn started_events(app: &TestApp, sid: &str) -> Vec<Value> {
    sqlx::query_scalar(
        "select payload from session_events where session_id = $1::uuid and type = 'turn.started' order by seq",
    )
    .bind(sid)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_full_worker_evicts_its_least_recently_active_idle_session() {
    let app = TestApp::spawn_with_worker(|s| s.worker.capacity = 1).await;
    let a = app.new_session(&app.admin_key).await;
    let b = app.new_session(&app.admin_key).await;
    assert_eq!(run_turn(&app, &a, "one").await["status"], "completed");
    let pid_a = started_events(&app, &a).await[0]["pid"].as_i64().unwrap() as i32;

    // The only slot goes to b: a's process stops.
    assert_eq!(run_turn(&app, &b, "two").await["status"], "completed");
    let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid_a), None).is_err();
    assert!(gone, "the evicted session's agent still runs");
    let session: Value = app.get_json(&format!("/v1/sessions/{a}")).await;
    assert_eq!(session["process"], Value::Null, "{session}");

    // a comes back: b is evicted in turn, and a's conversation resumes.
    let again = run_turn(&app, &a, "three").await;
    assert_eq!(again["status"], "completed", "{again}");
    assert!(
        again["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 2)"),
        "the conversation went on: {again}"
    );
    let started = started_events(&app, &a).await;
    assert_eq!(started[1]["resumed"], true, "{started:?}");
}

#[tokio::test]
async fn a_full_worker_makes_new_sessions_wait_while_every_slot_runs_a_turn() {
    let app = TestApp::spawn_with_worker(|s| s.worker.capacity = 1).await;
    let a = app.new_session(&app.admin_key).await;
    let b = app.new_session(&app.admin_key).await;
    let slow: Value = app
        .post(&format!("/v1/sessions/{a}/turns"), &app.admin_key)
        .json(&json!({"prompt": "[[slow]] story"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Wait until the slow turn runs, then ask for a second session.
    for _ in 0..100 {
        if !started_events(&app, &a).await.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let waiting = run_turn(&app, &b, "my turn").await;
    assert_eq!(waiting["status"], "completed", "{waiting}");
    let slow: Value = app
        .get_json(&format!("/v1/turns/{}", slow["id"].as_str().unwrap()))
        .await;
    assert_eq!(slow["status"], "completed", "{slow}");
    let slow_end =
        chrono::DateTime::parse_from_rfc3339(slow["completed_at"].as_str().unwrap()).unwrap();
    let b_start =
        chrono::DateTime::parse_from_rfc3339(waiting["started_at"].as_str().unwrap()).unwrap();
    assert!(b_start >= slow_end, "b ran while the only slot was busy");
}

async fn stored_types(app: &TestApp, sid: &str) -> Vec<String> {
    sqlx::query_scalar("select type from session_events where session_id = $1::uuid order by seq")
        .bind(sid)
        .fetch_all(&app.db.pool)
        .await
        .unwrap()
}

fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

#[tokio::test]
async fn an_idle_process_is_reaped_and_the_next_turn_resumes_the_conversation() {
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.idle_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    assert_eq!(run_turn(&app, &sid, "one").await["status"], "completed");
    let pid = started_events(&app, &sid).await[0]["pid"].as_i64().unwrap();
    let mut reaped = false;
    for _ in 0..100 {
        if !alive(pid) {
            reaped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(reaped, "the idle process was not stopped");
    // The lease forgets the process just after it is gone.
    let mut session = Value::Null;
    for _ in 0..100 {
        session = app.get_json(&format!("/v1/sessions/{sid}")).await;
        if session["process"].is_null() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(session["process"], Value::Null, "{session}");
    let next = run_turn(&app, &sid, "two").await;
    assert!(
        next["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 2)"),
        "{next}"
    );
    assert_eq!(started_events(&app, &sid).await[1]["resumed"], true);
}

#[tokio::test]
async fn a_lost_transcript_comes_back_from_its_mirror_or_starts_afresh_with_context_lost() {
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.idle_timeout = std::time::Duration::from_millis(200);
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    assert_eq!(run_turn(&app, &sid, "one").await["status"], "completed");
    let pid = started_events(&app, &sid).await[0]["pid"].as_i64().unwrap();
    for _ in 0..100 {
        if !alive(pid) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The agent's HOME loses its transcripts (a new host, a wiped disk): the mirror in the
    // database brings the conversation back.
    let home = app.settings.agent_home(&app.settings.providers.claude_code);
    std::fs::remove_dir_all(home.join(".claude/projects")).expect("transcripts existed");
    let restored = run_turn(&app, &sid, "two").await;
    assert!(
        restored["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 2)"),
        "the conversation goes on: {restored}"
    );
    assert_eq!(started_events(&app, &sid).await[1]["resumed"], true);
    // Without the mirror too, the conversation starts afresh, and says so.
    let pid = started_events(&app, &sid).await[1]["pid"].as_i64().unwrap();
    for _ in 0..100 {
        if !alive(pid) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    std::fs::remove_dir_all(home.join(".claude/projects")).expect("transcripts existed");
    sqlx::query("delete from agent_state_chunks")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let next = run_turn(&app, &sid, "three").await;
    assert_eq!(next["status"], "completed", "{next}");
    assert!(
        next["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 1)"),
        "a fresh conversation: {next}"
    );
    let types = stored_types(&app, &sid).await;
    let lost = types.iter().position(|t| t == "session.context_lost");
    let second_start = types.iter().rposition(|t| t == "turn.started");
    assert!(lost.is_some() && lost < second_start, "{types:?}");
}

#[tokio::test]
async fn watchdogs_end_runaway_and_silent_turns_and_the_session_goes_on() {
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.turn_timeout = std::time::Duration::from_millis(800);
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    let runaway = run_turn(&app, &sid, "[[slow]] forever").await;
    assert_eq!(runaway["status"], "failed", "{runaway}");
    assert!(
        runaway["error"]
            .as_str()
            .unwrap()
            .contains("worker.turn_timeout"),
        "{runaway}"
    );
    assert_eq!(run_turn(&app, &sid, "next").await["status"], "completed");

    // Silence: the agent waits 3 s before each delta; the stall limit is 500 ms.
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.stall_timeout = std::time::Duration::from_millis(500);
        s.providers.claude_code.args = vec!["--fake-delay-ms".into(), "3000".into()];
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    let silent = run_turn(&app, &sid, "hello").await;
    assert_eq!(silent["status"], "failed", "{silent}");
    assert!(
        silent["error"]
            .as_str()
            .unwrap()
            .contains("worker.stall_timeout"),
        "{silent}"
    );
}

#[tokio::test]
async fn an_agent_that_dies_mid_turn_fails_the_turn_and_the_next_one_gets_a_new_process() {
    let app = TestApp::spawn_with_worker(|_| {}).await;
    let sid = app.new_session(&app.admin_key).await;
    assert_eq!(run_turn(&app, &sid, "one").await["status"], "completed");
    let crashed = run_turn(&app, &sid, "[[exit]]").await;
    assert_eq!(crashed["status"], "failed", "{crashed}");
    assert!(
        crashed["error"].as_str().unwrap().contains("exit code 3"),
        "the exit code is reported: {crashed}"
    );
    let agent_error = run_turn(&app, &sid, "[[fail]]").await;
    assert_eq!(agent_error["status"], "failed", "{agent_error}");
    let next = run_turn(&app, &sid, "after").await;
    assert_eq!(next["status"], "completed", "{next}");
    let started = started_events(&app, &sid).await;
    assert_eq!(started.len(), 4);
    assert_ne!(started[0]["pid"], started[2]["pid"], "a new process");
    assert_eq!(started[2]["resumed"], true, "{started:?}");
    assert_eq!(
        started[2]["pid"], started[3]["pid"],
        "[[fail]] keeps the process"
    );
}

#[tokio::test]
async fn a_wait_longer_than_the_request_timeout_answers_202_not_503() {
    let app = TestApp::spawn_with_worker(|s| {
        s.http.request_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    let started = std::time::Instant::now();
    let response = app
        .post(
            &format!("/v1/sessions/{sid}/turns?wait=true&timeout=600"),
            &app.admin_key,
        )
        .json(&json!({"prompt": "[[slow]] longer than the request may take"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 202);
    let turn: Value = response.json().await.unwrap();
    assert_eq!(turn["status"], "running", "{turn}");
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
}

#[tokio::test]
async fn an_agent_that_outgrows_its_memory_limit_is_recycled_after_its_turn_and_resumed() {
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.max_agent_rss_mb = 96;
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    // Under the limit: the process stays warm.
    assert_eq!(run_turn(&app, &sid, "one").await["status"], "completed");
    assert_eq!(run_turn(&app, &sid, "two").await["status"], "completed");
    let started = started_events(&app, &sid).await;
    let pid = started[0]["pid"].as_i64().unwrap();
    assert_eq!(started[1]["pid"].as_i64(), Some(pid), "{started:?}");
    // A turn that leaves the agent above it: the process is stopped after the turn...
    let grown = run_turn(&app, &sid, "[[grow:160]] three").await;
    assert_eq!(grown["status"], "completed", "{grown}");
    let mut stopped = false;
    for _ in 0..100 {
        if !alive(pid) {
            stopped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(stopped, "the bloated process was not recycled");
    // ...and the next turn resumes the conversation in a new one.
    let next = run_turn(&app, &sid, "four").await;
    assert!(
        next["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 4)"),
        "{next}"
    );
    let started = started_events(&app, &sid).await;
    assert_eq!(started[3]["resumed"], true, "{started:?}");
    assert_ne!(started[3]["pid"].as_i64(), Some(pid));
}

#[tokio::test]
async fn a_turn_whose_lease_is_taken_over_stops_its_agent_at_once_and_writes_nothing_more() {
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.lease_ttl = std::time::Duration::from_secs(3);
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    let turn: Value = app
        .post(&format!("/v1/sessions/{sid}/turns"), &app.admin_key)
        // A tool that runs for 5 s in silence: no write would notice the takeover before.
        .json(&json!({"prompt": "[[bash:sleep 5]]"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut tool_running = false;
    for _ in 0..400 {
        let n: i64 = sqlx::query_scalar(
            "select count(*) from session_events where session_id = $1::uuid and type = 'tool.started'",
        )
        .bind(&sid)
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
        if n > 0 {
            tool_running = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert!(tool_running, "the tool call did not start");
    let pid = started_events(&app, &sid).await[0]["pid"].as_i64().unwrap();
    // Another worker takes the session over (as after a partition): a new generation.
    let other = hotplex::domain::WorkerId::new_random();
    hotplex::store::workers::register(&app.db.pool, other, "elsewhere", 1, 4, None)
        .await
        .unwrap();
    sqlx::query(
        "update session_leases set worker_id = $2, generation = generation + 1,
                expires_at = now() + interval '1 hour'
          where session_id = $1::uuid",
    )
    .bind(&sid)
    .bind(other)
    .execute(&app.db.pool)
    .await
    .unwrap();
    let taken_at: i64 =
        sqlx::query_scalar("select last_event_seq from sessions where session_id = $1::uuid")
            .bind(&sid)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    // The turn engine renews every lease_ttl / 3 = 1 s: well before the tool's end.
    let mut stopped = false;
    for _ in 0..50 {
        if !alive(pid) {
            stopped = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(stopped, "the agent of a lost session kept running");
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let after: i64 =
        sqlx::query_scalar("select last_event_seq from sessions where session_id = $1::uuid")
            .bind(&sid)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(
        after, taken_at,
        "the fenced-out worker wrote after the takeover"
    );
    // The turn is left to the new owner (who fails or retries it, see the fleet tests).
    let t: Value = app
        .get_json(&format!("/v1/turns/{}", turn["id"].as_str().unwrap()))
        .await;
    assert_eq!(t["status"], "running", "{t}");
}

/// Pids of the agents of this app's worker running now (their `HOME` is the app's agent
/// home: other tests run their own agents at the same time).
fn agent_pids(app: &TestApp) -> std::collections::HashSet<i64> {
    let home = app.settings.agent_home(&app.settings.providers.claude_code);
    let needle = format!("HOME={}", home.display());
    let mut pids = std::collections::HashSet::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i64>() else {
            continue;
        };
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if environ.split(|b| *b == 0).any(|v| v == needle.as_bytes()) && alive(pid) {
            pids.insert(pid);
        }
    }
    pids
}

#[tokio::test]
async fn a_new_session_takes_a_warm_spare_and_the_worker_starts_another() {
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.warm_spares = 1;
    })
    .await;
    // The spare starts with the worker.
    let mut before = std::collections::HashSet::new();
    for _ in 0..200 {
        before = agent_pids(&app);
        if !before.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!before.is_empty(), "no spare was started");
    let sid = app.new_session(&app.admin_key).await;
    assert_eq!(run_turn(&app, &sid, "one").await["status"], "completed");
    let started = started_events(&app, &sid).await;
    let pid = started[0]["pid"].as_i64().unwrap();
    assert!(
        before.contains(&pid),
        "the first turn started a cold process"
    );
    // The session adopted the spare's work dir and conversation for good.
    let session: Value = app.get_json(&format!("/v1/sessions/{sid}")).await;
    let work_dir = session["work_dir"].as_str().expect("adopted work dir");
    let conversation: String =
        sqlx::query_scalar("select cli_session_id::text from sessions where session_id = $1::uuid")
            .bind(&sid)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(work_dir, conversation);
    assert!(app.settings.work_root().join(work_dir).is_dir());
    let two = run_turn(&app, &sid, "two").await;
    assert!(
        two["result"]
            .as_str()
            .unwrap()
            .contains("FAKE-ECHO(turn 2)"),
        "{two}"
    );
    // Another spare takes its place.
    let mut refilled = false;
    for _ in 0..200 {
        if agent_pids(&app).len() >= 2 {
            refilled = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refilled, "no new spare was started");
    // A session with settings of its own cannot use a spare: it starts cold, and the spare
    // stays for the next default session.
    let spares = agent_pids(&app);
    let custom: Value = app
        .post("/v1/sessions", &app.admin_key)
        .json(&json!({"system_prompt": "be brief"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let custom = custom["id"].as_str().unwrap().to_owned();
    assert_eq!(run_turn(&app, &custom, "hi").await["status"], "completed");
    let custom_pid = started_events(&app, &custom).await[0]["pid"]
        .as_i64()
        .unwrap();
    assert!(!spares.contains(&custom_pid));
    let next = app.new_session(&app.admin_key).await;
    assert_eq!(run_turn(&app, &next, "hi").await["status"], "completed");
    let next_pid = started_events(&app, &next).await[0]["pid"]
        .as_i64()
        .unwrap();
    assert!(spares.contains(&next_pid), "the spare was not used");
}

#[tokio::test]
async fn agents_run_under_the_configured_resource_limits_without_core_dumps() {
    let app = TestApp::spawn_with_worker(|s| {
        s.worker.agent_limits.max_open_files = Some(64);
        s.worker.agent_limits.max_file_size_mb = Some(1);
    })
    .await;
    let sid = app.new_session(&app.admin_key).await;
    let done = run_turn(
        &app,
        &sid,
        "[[bash:echo nofile=$(ulimit -n) core=$(ulimit -c)]]",
    )
    .await;
    let result = done["result"].as_str().unwrap();
    assert!(result.contains("nofile=64 core=0"), "{done}");
    // A tool writing past the file size limit is stopped by the kernel.
    let big = run_turn(
        &app,
        &sid,
        "[[bash:head -c 3000000 /dev/zero > big.bin; echo size=$(wc -c < big.bin)]]",
    )
    .await;
    assert!(
        big["result"].as_str().unwrap().contains("size=1048576"),
        "{big}"
    );
}

#[tokio::test]
async fn a_work_dir_that_a_symlink_leads_out_of_the_roots_does_not_start_an_agent() {
    let app = TestApp::spawn_with_worker(|_| {}).await;
    let outside = tempfile::tempdir().unwrap();
    let root = app.settings.work_root();
    std::fs::create_dir_all(&root).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("escape")).unwrap();
    let created: Value = app
        .post("/v1/sessions", &app.admin_key)
        .json(&json!({"work_dir": "escape"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = created["id"]
        .as_str()
        .expect("the path as written is inside")
        .to_owned();
    let failed = run_turn(&app, &sid, "[[bash:touch pwned]]").await;
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("outside the work root"),
        "{failed}"
    );
    assert!(!outside.path().join("pwned").exists());
    assert!(started_events(&app, &sid).await.is_empty());
}
