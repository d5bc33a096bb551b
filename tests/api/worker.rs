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
    store::workers::register(&app.db.pool, worker, "test-host", 1, 4)
        .await
        .unwrap();
    (session, worker, turn)
}

#[tokio::test]
async fn leases_fence_out_a_worker_that_lost_its_session() {
    let app = TestApp::spawn().await;
    let (session, a, turn) = session_and_worker(&app).await;
    let b = WorkerId::new_random();
    store::workers::register(&app.db.pool, b, "other-host", 2, 4)
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
        "select type from session_events where session_id = $1 and seq > 2 order by seq",
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
        "select seq, type, payload from session_events where session_id = $1 and seq > 2 order by seq",
    )
    .bind(session)
    .fetch_all(&app.db.pool)
    .await
    .unwrap();
    let kinds: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
    assert_eq!(kinds, ["text.delta", "text.delta", "tool.started"]);
    assert_eq!(rows[1].2["text"], "bcd");
    // After the two events of the enqueue (session.status, turn.queued), without gaps.
    assert_eq!(rows.iter().map(|r| r.0).collect::<Vec<_>>(), [3, 4, 5]);
}
