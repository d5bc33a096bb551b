//! End to end with the real Claude Code CLI (`HOTPLEX_TEST_CLAUDE`) against the mock
//! Anthropic API: warm processes, context, tools, interrupt, SSE replay, worker restarts with
//! `--resume`, and process-group clean-up.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Sse, TestApp};

async fn mock() -> hotplex::mock_llm::anthropic::MockServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    hotplex::mock_llm::anthropic::start(listener, Default::default())
        .await
        .unwrap()
}

#[tokio::test]
async fn the_real_claude_cli_stays_warm_keeps_context_and_runs_tools() {
    let mock = mock().await;
    let Some(app) = TestApp::spawn_with_real_claude(&mock.base_url()).await else {
        return;
    };
    let sid = app.new_session(&app.admin_key).await;
    let turns = format!("/v1/sessions/{sid}/turns?wait=true&timeout=120");
    let run = |prompt: &'static str| {
        app.post(&turns, &app.admin_key)
            .json(&json!({"prompt": prompt}))
            .send()
    };

    let t0 = std::time::Instant::now();
    let first: Value = run("remember the word zebra")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cold = t0.elapsed();
    assert_eq!(
        first["result"], "MOCK-ECHO: remember the word zebra",
        "{first}"
    );
    assert_eq!(
        first["usage"]["input_tokens"],
        10 + "remember the word zebra".len()
    );
    let t1 = std::time::Instant::now();
    let second: Value = run("what was the word?")
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let warm = t1.elapsed();
    assert_eq!(second["status"], "completed", "{second}");
    assert!(warm < cold, "warm {warm:?} vs cold {cold:?}");
    // The second request to the model carries the first turn: one conversation.
    let requests = mock.requests();
    let last = requests
        .iter()
        .rev()
        .find(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/v1/messages"))
        })
        .unwrap();
    assert!(
        last["body"]["messages"].to_string().contains("zebra"),
        "context lost"
    );

    let tool: Value = run("RUN_TOOL").await.unwrap().json().await.unwrap();
    assert_eq!(tool["result"], "MOCK-TOOL-RESULT: hi", "{tool}");
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "select type, payload from session_events where session_id = $1::uuid order by seq",
    )
    .bind(&sid)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let started: Vec<&Value> = rows
        .iter()
        .filter(|r| r.0 == "turn.started")
        .map(|r| &r.1)
        .collect();
    assert_eq!(started.len(), 3);
    assert!(
        started.iter().all(|s| s["pid"] == started[0]["pid"]),
        "one warm process: {started:?}"
    );
    let tool_started = rows
        .iter()
        .find(|r| r.0 == "tool.started")
        .expect("tool.started");
    assert_eq!(tool_started.1["name"], "Bash");
    let tool_done = rows
        .iter()
        .find(|r| r.0 == "tool.completed")
        .expect("tool.completed");
    assert!(tool_done.1["output"].as_str().unwrap().contains("hi"));
    assert!(rows.iter().any(|r| r.0 == "text.delta"));
}

#[tokio::test]
async fn interrupting_the_real_cli_keeps_it_warm_and_queued_turns_go_on() {
    let mock = mock().await;
    let Some(app) = TestApp::spawn_with_real_claude(&mock.base_url()).await else {
        return;
    };
    let sid = app.new_session(&app.admin_key).await;
    let turns = format!("/v1/sessions/{sid}/turns");
    // Two prompts at once: the slow one runs first, the second waits its turn.
    let slow: Value = app
        .post(&turns, &app.admin_key)
        .json(&json!({"prompt": "[[slow:40]] tell a story"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let next: Value = app
        .post(&turns, &app.admin_key)
        .json(&json!({"prompt": "after"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // Wait until the story streams, then interrupt it.
    let mut streaming = false;
    for _ in 0..200 {
        let n: i64 = sqlx::query_scalar("select count(*) from session_events where session_id = $1::uuid and type = 'text.delta'")
            .bind(&sid)
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
        if n > 0 {
            streaming = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(streaming, "the slow turn never streamed");
    let r: Value = app
        .post(&format!("/v1/sessions/{sid}/interrupt"), &app.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(r["turn_id"], slow["id"]);

    let mut done = Value::Null;
    for _ in 0..300 {
        done = app
            .get_json(&format!("/v1/turns/{}", next["id"].as_str().unwrap()))
            .await;
        if done["status"] == "completed" || done["status"] == "failed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(done["result"], "MOCK-ECHO: after", "{done}");
    let interrupted: Value = app
        .get_json(&format!("/v1/turns/{}", slow["id"].as_str().unwrap()))
        .await;
    assert_eq!(interrupted["status"], "interrupted", "{interrupted}");
    let pids: Vec<Value> = sqlx::query_scalar("select payload->'pid' from session_events where session_id = $1::uuid and type = 'turn.started'")
        .bind(&sid)
        .fetch_all(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(pids.len(), 2);
    assert_eq!(
        pids[0], pids[1],
        "the process stayed warm across the interrupt"
    );
}

/// Posts a prompt and waits for the turn to end; returns the turn.
async fn run_turn(app: &TestApp, sid: &str, prompt: &str) -> Value {
    let response = app
        .post(
            &format!("/v1/sessions/{sid}/turns?wait=true&timeout=120"),
            &app.admin_key,
        )
        .json(&json!({"prompt": prompt}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "the turn did not end in time");
    response.json().await.unwrap()
}

/// `(type, payload)` of every stored event of a session, in seq order.
async fn stored_events(app: &TestApp, sid: &str) -> Vec<(String, Value)> {
    sqlx::query_as(
        "select type, payload from session_events where session_id = $1::uuid order by seq",
    )
    .bind(sid)
    .fetch_all(&app.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn prompts_posted_at_once_run_in_order_and_a_reconnect_gets_exactly_the_missed_events() {
    let mock = mock().await;
    let Some(app) = TestApp::spawn_with_real_claude(&mock.base_url()).await else {
        return;
    };
    let sid = app.new_session(&app.admin_key).await;
    let events = format!("/v1/sessions/{sid}/events");
    // The stream is opened before any turn exists.
    let mut live = Sse::new(app.get(&events, &app.admin_key).send().await.unwrap());
    let turns = format!("/v1/sessions/{sid}/turns");
    let post = |prompt: &'static str| {
        app.post(&turns, &app.admin_key)
            .json(&json!({"prompt": prompt}))
            .send()
    };
    let (a, b) = tokio::join!(post("[[slow:8]] alpha story"), post("beta"));
    let (a, b): (Value, Value) = (
        a.unwrap().json().await.unwrap(),
        b.unwrap().json().await.unwrap(),
    );
    // Arrival order decides which runs first; both were accepted as queued turns.
    let (first, second) = if a["seq"].as_i64() < b["seq"].as_i64() {
        (a, b)
    } else {
        (b, a)
    };
    assert_eq!(first["status"], "queued");
    assert_eq!(second["status"], "queued");

    let mut completed = 0;
    let got = live
        .until(Duration::from_secs(120), |e| {
            if e.event == "turn.completed" || e.event == "turn.failed" {
                completed += 1;
            }
            completed == 2
        })
        .await;
    // Ids are the session's seq: strictly increasing, no gap, no duplicate.
    for pair in got.windows(2) {
        assert_eq!(
            pair[1].id,
            pair[0].id + 1,
            "{:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
    for e in &got {
        assert_eq!(e.data["seq"], e.id);
        assert_eq!(e.data["type"], e.event.as_str());
    }
    // One turn after the other: everything of the first turn comes before the second starts.
    let of = |turn: &Value| -> Vec<&crate::support::SseEvent> {
        got.iter()
            .filter(|e| e.data["turn_id"] == turn["id"])
            .collect()
    };
    let (one, two) = (of(&first), of(&second));
    let first_end = one
        .iter()
        .find(|e| e.event == "turn.completed")
        .expect("first completed")
        .id;
    let second_start = two
        .iter()
        .find(|e| e.event == "turn.started")
        .expect("second started")
        .id;
    assert!(first_end < second_start, "turns interleaved: {got:?}");
    for (turn, evs) in [(&first, &one), (&second, &two)] {
        let done = evs.last().unwrap();
        assert_eq!(done.event, "turn.completed", "{evs:?}");
        let text: String = evs
            .iter()
            .filter(|e| e.event == "text.delta")
            .map(|e| e.data["text"].as_str().unwrap())
            .collect();
        let prompt = turn["prompt"].as_str().unwrap();
        assert!(text.starts_with(&format!("MOCK-ECHO: {prompt}")), "{text}");
        assert_eq!(done.data["result"], text.as_str(), "deltas in order");
        let usage = &done.data["usage"];
        assert_eq!(
            usage["input_tokens"].as_i64(),
            Some(10 + prompt.len() as i64),
            "{usage}"
        );
        assert!(usage["output_tokens"].as_i64().unwrap() > 0, "{usage}");
        assert!(usage["duration_ms"].as_i64().is_some(), "{usage}");
    }
    let slow = if first["prompt"].as_str().unwrap().contains("[[slow") {
        &one
    } else {
        &two
    };
    assert!(
        slow.iter().filter(|e| e.event == "text.delta").count() >= 8,
        "the slow turn streams delta by delta: {slow:?}"
    );

    // A client that saw only up to the middle of the first turn reconnects.
    let cut = got[got.len() / 3].id;
    let mut resumed = Sse::new(
        app.get(&events, &app.admin_key)
            .header("last-event-id", cut.to_string())
            .send()
            .await
            .unwrap(),
    );
    let last = got.last().unwrap().id;
    let replay = resumed
        .until(Duration::from_secs(10), |e| e.id >= last)
        .await;
    let expected: Vec<(i64, &str)> = got
        .iter()
        .filter(|e| e.id > cut)
        .map(|e| (e.id, e.event.as_str()))
        .collect();
    let actual: Vec<(i64, &str)> = replay.iter().map(|e| (e.id, e.event.as_str())).collect();
    assert_eq!(actual, expected, "exactly the missed events");
    assert_eq!(replay.last().unwrap().data, got.last().unwrap().data);
}

#[tokio::test]
async fn a_restarted_worker_resumes_the_conversation_with_its_context() {
    let mock = mock().await;
    let Some(mut app) = TestApp::spawn_with_real_claude(&mock.base_url()).await else {
        return;
    };
    let sid = app.new_session(&app.admin_key).await;
    let first = run_turn(&app, &sid, "remember the word zebra").await;
    assert_eq!(first["status"], "completed", "{first}");
    let session: Value = app.get_json(&format!("/v1/sessions/{sid}")).await;
    let pid = session["process"]["pid"].as_i64().expect("a warm process") as i32;

    // The worker stops (as on SIGTERM): its agent goes with it.
    app.worker.take().unwrap().stop().await;
    assert!(!alive(pid), "the agent outlived its worker");
    let session: Value = app.get_json(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(session["process"], Value::Null, "{session}");

    // A new worker takes the next turn and resumes the same conversation.
    app.worker = Some(app.start_worker().await);
    let second = run_turn(&app, &sid, "what was the word?").await;
    assert_eq!(second["status"], "completed", "{second}");
    let events = stored_events(&app, &sid).await;
    let started: Vec<&Value> = events
        .iter()
        .filter(|(t, _)| t == "turn.started")
        .map(|(_, p)| p)
        .collect();
    assert_eq!(started.len(), 2);
    assert_eq!(started[1]["resumed"], true, "{started:?}");
    assert_ne!(started[0]["pid"], started[1]["pid"]);
    assert_ne!(started[0]["worker_id"], started[1]["worker_id"]);
    assert!(
        !events.iter().any(|(t, _)| t == "session.context_lost"),
        "{events:?}"
    );
    let requests = mock.requests();
    let last = requests
        .iter()
        .rev()
        .find(|r| {
            r["path"]
                .as_str()
                .is_some_and(|p| p.starts_with("/v1/messages"))
        })
        .unwrap();
    let messages = last["body"]["messages"].to_string();
    assert!(
        messages.contains("zebra"),
        "context lost across the restart: {messages}"
    );
}

#[tokio::test]
async fn deleting_a_session_ends_its_process_group_and_escaped_descendants() {
    let mock = mock().await;
    let Some(app) = TestApp::spawn_with_real_claude(&mock.base_url()).await else {
        return;
    };
    let created: Value = app
        .post("/v1/sessions", &app.admin_key)
        .json(&json!({"allowed_tools": ["Bash"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let sid = created["id"].as_str().unwrap().to_owned();
    // The agent leaves a background process behind in its group.
    let turn = run_turn(
        &app,
        &sid,
        "[[bash:nohup sleep 300 >/dev/null 2>&1 & echo started]]",
    )
    .await;
    assert_eq!(turn["status"], "completed", "{turn}");
    let session: Value = app.get_json(&format!("/v1/sessions/{sid}")).await;
    let pid = session["process"]["pid"].as_i64().expect("a warm process") as i32;
    let tag = tag_of(pid);
    let before = family(pid, &tag);
    eprintln!("group {pid}: {before:?}");
    eprintln!("{:#?}", stored_events(&app, &sid).await);
    assert!(
        before.len() >= 2,
        "the group holds the agent and its child: {before:?}"
    );

    let deleted = app
        .delete(&format!("/v1/sessions/{sid}"), &app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), 204);
    let mut left = before;
    for _ in 0..200 {
        left = family(pid, &tag);
        if left.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(left.is_empty(), "still alive from group {pid}: {left:?}");
}

/// Whether a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| stat_fields(&s).map(|(state, _)| state != 'Z'))
        .unwrap_or(false)
}

/// The agent's tag (`HOTPLEX_PROCESS_TAG=…`), which its descendants inherit.
fn tag_of(pid: i32) -> String {
    let env = std::fs::read(format!("/proc/{pid}/environ")).expect("the agent's environment");
    env.split(|b| *b == 0)
        .map(String::from_utf8_lossy)
        .find(|kv| kv.starts_with("HOTPLEX_PROCESS_TAG="))
        .expect("the agent is tagged")
        .into_owned()
}

/// Live (non-zombie) processes in process group `pgid` or carrying `tag`: `(pid, command)`.
fn family(pgid: i32, tag: &str) -> Vec<(i32, String)> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let tagged = std::fs::read(format!("/proc/{pid}/environ"))
            .is_ok_and(|env| env.split(|b| *b == 0).any(|kv| kv == tag.as_bytes()));
        if let Some((state, group)) = stat_fields(&stat)
            && (group == pgid || tagged)
            && state != 'Z'
        {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .replace('\0', " ");
            out.push((pid, comm));
        }
    }
    out
}

/// `(state, pgrp)` from a `/proc/<pid>/stat` line (the command may contain spaces).
fn stat_fields(stat: &str) -> Option<(char, i32)> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut fields = rest.split(' ');
    let state = fields.next()?.chars().next()?;
    let _ppid = fields.next()?;
    let pgrp = fields.next()?.parse().ok()?;
    Some((state, pgrp))
}
