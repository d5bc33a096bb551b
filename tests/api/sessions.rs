//! The session lifecycle over HTTP: create, idempotent derived ids, get, list, delete.

use std::collections::HashSet;

use serde_json::{Value, json};

use crate::support::{TestApp, assert_envelope, without_live_fields};

async fn create(app: &TestApp, key: &str, body: Value) -> (u16, Value) {
    let response = app
        .post("/v1/sessions", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

#[tokio::test]
async fn create_with_defaults_and_with_every_field() {
    let app = TestApp::spawn().await;
    // No body at all: a default Claude Code session with a random v4 id.
    let response = app
        .post("/v1/sessions", &app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let s: Value = response.json().await.unwrap();
    assert_eq!(s["provider"], "claude-code");
    assert_eq!(s["status"], "idle");
    assert_eq!(s["permission_mode"], "default");
    let id: uuid::Uuid = s["id"].as_str().unwrap().parse().unwrap();
    assert_eq!(id.get_version_num(), 4);

    let (status, s) = create(
        &app,
        &app.admin_key,
        json!({
            "provider": "opencode",
            "work_dir": "projects/demo",
            "model": "mock-model",
            "system_prompt": "Be brief.\nAlways.",
            "allowed_tools": ["Bash(git diff:*)", "Read"],
            "disallowed_tools": ["WebFetch"],
            "permission_mode": "acceptEdits",
            "agent": "plan",
            "title": "Demo"
        }),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(s["provider"], "opencode");
    assert_eq!(s["work_dir"], "projects/demo");
    assert_eq!(s["model"], "mock-model");
    assert_eq!(s["system_prompt"], "Be brief.\nAlways.");
    assert_eq!(s["allowed_tools"], json!(["Bash(git diff:*)", "Read"]));
    assert_eq!(s["disallowed_tools"], json!(["WebFetch"]));
    assert_eq!(s["permission_mode"], "acceptEdits");
    assert_eq!(s["agent"], "plan");
    assert_eq!(s["title"], "Demo");
    assert!(s["opencode_id"].as_str().unwrap().starts_with("ses_"));

    let got: Value = app
        .get_json(&format!("/v1/sessions/{}", s["id"].as_str().unwrap()))
        .await;
    assert_eq!(without_live_fields(got), without_live_fields(s.clone()));
}

#[tokio::test]
async fn work_dirs_inside_the_work_root_are_accepted() {
    let app = TestApp::spawn().await;
    let inside = app.settings.work_root().join("team/repo");
    let (status, s) = create(&app, &app.admin_key, json!({ "work_dir": inside })).await;
    assert_eq!(status, 201, "{s}");
}

#[tokio::test]
async fn external_ids_derive_the_original_ids_and_are_idempotent() {
    let app = TestApp::spawn().await;
    let (status, first) =
        create(&app, &app.admin_key, json!({ "external_id": "my-session" })).await;
    assert_eq!(status, 201);
    assert_eq!(first["id"], "75157c5a-2610-532a-9712-3998d349fb7d");
    assert_eq!(first["namespace"], "default");

    // Again, even with other settings: the same session, unchanged, with 200.
    let (status, again) = create(
        &app,
        &app.admin_key,
        json!({ "external_id": "my-session", "model": "x" }),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(again, first);

    let (status, other) = create(
        &app,
        &app.admin_key,
        json!({ "external_id": "my-session", "namespace": "slack" }),
    )
    .await;
    assert_eq!(status, 201);
    assert_ne!(other["id"], first["id"]);
    let expected = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, b"slack:session:my-session");
    assert_eq!(other["id"], expected.to_string());
}

#[tokio::test]
async fn concurrent_creates_of_one_external_id_make_one_session() {
    let app = TestApp::spawn().await;
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (client, url, key) = (
            app.client.clone(),
            app.url("/v1/sessions"),
            app.admin_key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = client
                .post(url)
                .bearer_auth(key)
                .json(&json!({"external_id": "race"}))
                .send()
                .await
                .unwrap();
            r.status().as_u16()
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 201).count(),
        1,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        7,
        "{statuses:?}"
    );
}

#[tokio::test]
async fn delete_hides_the_session_and_the_external_id_starts_afresh() {
    let app = TestApp::spawn().await;
    let (_, s) = create(
        &app,
        &app.admin_key,
        json!({ "external_id": "thread-9", "model": "a" }),
    )
    .await;
    let path = format!("/v1/sessions/{}", s["id"].as_str().unwrap());

    let response = app.delete(&path, &app.admin_key).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert_envelope(app.get(&path, &app.admin_key).send().await.unwrap(), 404).await;
    assert_envelope(app.delete(&path, &app.admin_key).send().await.unwrap(), 404).await;
    let list: Value = app.get_json("/v1/sessions").await;
    assert_eq!(list["sessions"], json!([]));

    // The deletion is audited.
    let audited: i64 = sqlx::query_scalar(
        "select count(*) from audit_events where action = 'session.delete' and target_id = $1",
    )
    .bind(s["id"].as_str().unwrap())
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(audited, 1);

    // Creating the same external id again brings a fresh incarnation under the same id.
    let (status, again) = create(
        &app,
        &app.admin_key,
        json!({ "external_id": "thread-9", "model": "b" }),
    )
    .await;
    assert_eq!(status, 201);
    assert_eq!(again["id"], s["id"]);
    assert_eq!(again["model"], "b");
}

#[tokio::test]
async fn list_pages_with_a_cursor_and_filters() {
    let app = TestApp::spawn().await;
    let mut created = Vec::new();
    for i in 0..5 {
        let provider = if i % 2 == 0 {
            "claude-code"
        } else {
            "opencode"
        };
        let (_, s) = create(&app, &app.admin_key, json!({ "provider": provider })).await;
        created.push(s["id"].as_str().unwrap().to_owned());
    }

    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let mut path = "/v1/sessions?limit=2".to_owned();
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page: Value = app
            .get(&path, &app.admin_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        pages += 1;
        for s in page["sessions"].as_array().unwrap() {
            seen.push(s["id"].as_str().unwrap().to_owned());
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    created.reverse();
    assert_eq!(seen, created, "newest first, each once");

    let page: Value = app.get_json("/v1/sessions?provider=opencode").await;
    let ids: HashSet<&str> = page["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        page["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["provider"] == "opencode")
    );

    let page: Value = app.get_json("/v1/sessions?status=busy").await;
    assert_eq!(page["sessions"], json!([]));
    let page: Value = app.get_json("/v1/sessions?status=idle").await;
    assert_eq!(page["sessions"].as_array().unwrap().len(), 5);
}
