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
