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
    let session: Value = app
        .get(&format!("/v1/sessions/{sid}"), &app.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(session["process"]["pid"], started[0]["pid"], "{session}");
    assert_eq!(session["status"], "idle");
    let total = first["usage"]["output_tokens"].as_i64().unwrap()
        + second["usage"]["output_tokens"].as_i64().unwrap();
    assert_eq!(session["usage"]["output_tokens"].as_i64().unwrap(), total);
}

#[tokio::test]
async fn the_real_claude_cli_stays_warm_keeps_context_and_runs_tools() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = hotplex::mock_llm::anthropic::start(listener, Default::default())
        .await
        .unwrap();
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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mock = hotplex::mock_llm::anthropic::start(listener, Default::default())
        .await
        .unwrap();
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
            .get(
                &format!("/v1/turns/{}", next["id"].as_str().unwrap()),
                &app.admin_key,
            )
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done["status"] == "completed" || done["status"] == "failed" {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(done["result"], "MOCK-ECHO: after", "{done}");
    let interrupted: Value = app
        .get(
            &format!("/v1/turns/{}", slow["id"].as_str().unwrap()),
            &app.admin_key,
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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
