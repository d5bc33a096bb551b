//! Turns are accepted durably (row + queued job + events in one transaction), idempotently,
//! in per-session order; events replay and follow over SSE.

use std::time::Duration;

use serde_json::{Value, json};

use crate::support::{Sse, TestApp, assert_envelope};

#[tokio::test]
async fn turns_are_queued_in_order_with_a_durable_job() {
    let app = TestApp::spawn().await;
    let sid = app.new_session(&app.admin_key).await;
    let path = format!("/v1/sessions/{sid}/turns");
    let first = app
        .post(&path, &app.admin_key)
        .json(&json!({"prompt": "one"}))
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    assert_eq!(first["status"], "queued");
    assert_eq!(first["seq"], 1);
    let second: Value = app
        .post(&path, &app.admin_key)
        .json(&json!({"prompt": "two"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(second["seq"], 2);

    let session: Value = app.get_json(&format!("/v1/sessions/{sid}")).await;
    assert_eq!(session["status"], "busy");
    let got: Value = app
        .get_json(&format!("/v1/turns/{}", first["id"].as_str().unwrap()))
        .await;
    assert_eq!(got["prompt"], "one");
    let page: Value = app.get_json(&format!("{path}?limit=1")).await;
    assert_eq!(page["turns"][0]["seq"], 1);
    assert_eq!(page["next_after"], 1);

    let jobs: Vec<(String, Vec<u8>)> =
        sqlx::query_as("select job_type, job from apalis.jobs order by run_at, id")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(jobs.len(), 2);
    assert!(
        jobs.iter().all(|(queue, _)| queue == "hotplex.turns"),
        "{jobs:?}"
    );
    let args: Value = serde_json::from_slice(&jobs[0].1).unwrap();
    assert_eq!(args["session_id"], sid);
}

#[tokio::test]
async fn idempotency_keys_make_retries_safe() {
    let app = TestApp::spawn().await;
    let sid = app.new_session(&app.admin_key).await;
    let path = format!("/v1/sessions/{sid}/turns");
    let send = |prompt: &'static str| {
        app.post(&path, &app.admin_key)
            .header("idempotency-key", "k-1")
            .json(&json!({"prompt": prompt}))
            .send()
    };
    let a: Value = send("same").await.unwrap().json().await.unwrap();
    let b: Value = send("same").await.unwrap().json().await.unwrap();
    assert_eq!(a["id"], b["id"]);
    let (code, _) = assert_envelope(send("different").await.unwrap(), 409).await;
    assert_eq!(code, "idempotency_key_reused");
    let n: i64 = sqlx::query_scalar("select count(*) from turns")
        .fetch_one(&app.db.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn bad_prompts_and_foreign_sessions_are_refused() {
    let app = TestApp::spawn().await;
    let sid = app.new_session(&app.admin_key).await;
    let path = format!("/v1/sessions/{sid}/turns");
    for body in [
        json!({"prompt": ""}),
        json!({"prompt": 3}),
        json!({}),
        json!({"prompt": "x", "extra": 1}),
    ] {
        assert_envelope(
            app.post(&path, &app.admin_key)
                .json(&body)
                .send()
                .await
                .unwrap(),
            422,
        )
        .await;
    }
    let other = app.user_key("tenant-b").await;
    assert_envelope(
        app.post(&path, &other)
            .json(&json!({"prompt": "hi"}))
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    assert_envelope(
        app.get(&format!("/v1/sessions/{sid}/events"), &other)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;
    let idle: Value = app
        .post(&format!("/v1/sessions/{sid}/interrupt"), &app.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(idle["turn_id"], Value::Null);
}

/// Reads `n` events; returns (id, event, data) of each.
async fn read_events(response: reqwest::Response, n: usize) -> Vec<(i64, String, Value)> {
    Sse::new(response)
        .take(n, Duration::from_secs(10))
        .await
        .into_iter()
        .map(|e| (e.id, e.event, e.data))
        .collect()
}

#[tokio::test]
async fn events_replay_follow_live_and_resume_after_last_event_id() {
    let app = TestApp::spawn().await;
    let sid = app.new_session(&app.admin_key).await;
    let events_path = format!("/v1/sessions/{sid}/events");
    // Opened before any turn exists: the first turn's events arrive live.
    let live = app.get(&events_path, &app.admin_key).send().await.unwrap();
    let turns = format!("/v1/sessions/{sid}/turns");
    app.post(&turns, &app.admin_key)
        .json(&json!({"prompt": "first"}))
        .send()
        .await
        .unwrap();
    let got = read_events(live, 3).await;
    assert_eq!(got[0].1, "session.created");
    let got = &got[1..];
    assert_eq!(got[0].1, "session.status");
    assert_eq!(got[0].2["status"], "busy");
    assert_eq!(got[1].1, "turn.queued");
    assert_eq!(got[1].2["prompt"], "first");
    assert_eq!(got[1].2["seq"], got[1].0);
    assert!(got[1].2["turn_id"].is_string());

    app.post(&turns, &app.admin_key)
        .json(&json!({"prompt": "second"}))
        .send()
        .await
        .unwrap();
    // Reconnect after the first event: exactly the missed ones, in order.
    let resumed = app
        .get(&events_path, &app.admin_key)
        .header("last-event-id", "2")
        .send()
        .await
        .unwrap();
    let got = read_events(resumed, 2).await;
    assert_eq!(got.iter().map(|e| e.0).collect::<Vec<_>>(), [3, 4]);
    assert_eq!(got[1].2["prompt"], "second");
    let after = app
        .get(&format!("{events_path}?after=3"), &app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(read_events(after, 1).await[0].0, 4);
    let bad = app
        .get(&events_path, &app.admin_key)
        .header("last-event-id", "x")
        .send()
        .await
        .unwrap();
    assert_envelope(bad, 400).await;
}

#[tokio::test]
async fn deleting_a_session_fails_its_pending_turns_visibly() {
    let app = TestApp::spawn().await;
    let sid = app.new_session(&app.admin_key).await;
    let turn: Value = app
        .post(&format!("/v1/sessions/{sid}/turns"), &app.admin_key)
        .json(&json!({"prompt": "pending"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        app.delete(&format!("/v1/sessions/{sid}"), &app.admin_key)
            .send()
            .await
            .unwrap()
            .status(),
        204
    );
    let got: Value = app
        .get_json(&format!("/v1/turns/{}", turn["id"].as_str().unwrap()))
        .await;
    assert_eq!(got["status"], "failed");
    assert_eq!(got["error"], "the session was deleted");
}
