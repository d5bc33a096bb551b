//! Every bad input gets the JSON envelope and the right 4xx; 5xx never leak internals.

use serde_json::Value;

use crate::support::{TestApp, assert_envelope};
use hotplex::app::AuthMode;

#[tokio::test]
async fn malformed_json_is_400() {
    let app = TestApp::spawn().await;
    let response = app
        .post("/v1/sessions", &app.admin_key)
        .header("content-type", "application/json")
        .body("{\"provider\":")
        .send()
        .await
        .unwrap();
    let (code, _) = assert_envelope(response, 400).await;
    assert_eq!(code, "malformed_json");
}

#[tokio::test]
async fn wrong_types_unknown_fields_and_bad_values_are_422() {
    let app = TestApp::spawn().await;
    for (body, needle) in [
        (r#"{"provider": 5}"#, "provider"),
        (r#"{"provider": "gpt"}"#, "provider"),
        (r#"{"allowed_tools": "Bash"}"#, "allowed_tools"),
        (r#"{"nonsense": true}"#, "nonsense"),
        (r#"{"permission_mode": "yolo"}"#, "permission_mode"),
        (r#"{"work_dir": "../etc"}"#, "work_dir"),
        (r#"{"work_dir": "/etc"}"#, "work_dir"),
        (r#"{"namespace": "x"}"#, "namespace"),
        (r#"{"external_id": "a", "namespace": "a:b"}"#, "namespace"),
        (r#"{"external_id": ""}"#, "external_id"),
        (r#"{"model": "a\u0007b"}"#, "model"),
        (r#"{"agent": "plan"}"#, "agent"),
        (r#"{"provider": "opencode", "agent": "a b"}"#, "agent"),
        (r#"{"title": "two\nlines"}"#, "title"),
        ("[]", "object"),
        (r#"["opencode"]"#, "object"),
    ] {
        let response = app
            .post("/v1/sessions", &app.admin_key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        let (code, message) = assert_envelope(response, 422).await;
        assert_eq!(code, "invalid_request", "{body}");
        assert!(message.contains(needle), "{body}: {message}");
    }
}

#[tokio::test]
async fn oversized_bodies_are_413() {
    let app = TestApp::spawn_with(|s| s.http.body_limit = 1024, AuthMode::Keys).await;
    let big = format!("{{\"system_prompt\": \"{}\"}}", "x".repeat(4096));
    let response = app
        .post("/v1/sessions", &app.admin_key)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let (code, _) = assert_envelope(response, 413).await;
    assert_eq!(code, "payload_too_large");
}

#[tokio::test]
async fn wrong_content_type_is_415() {
    let app = TestApp::spawn().await;
    let response = app
        .post("/v1/sessions", &app.admin_key)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (code, _) = assert_envelope(response, 415).await;
    assert_eq!(code, "unsupported_media_type");
}

#[tokio::test]
async fn unknown_routes_are_json_404_and_wrong_methods_405() {
    let app = TestApp::spawn().await;
    let response = app
        .client
        .get(app.url("/no/such/route"))
        .send()
        .await
        .unwrap();
    // Outside /v1 the body also carries OpenCode's `{name, data}` (its clients live there).
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "not_found");
    assert_eq!(body["name"], "NotFoundError");
    assert_eq!(body["data"]["message"], body["error"]["message"]);

    let response = app
        .get("/v1/no-such-thing", &app.admin_key)
        .send()
        .await
        .unwrap();
    assert_envelope(response, 404).await;

    let response = app
        .client
        .put(app.url("/v1/sessions"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    let (code, _) = assert_envelope(response, 405).await;
    assert_eq!(code, "method_not_allowed");

    let response = app
        .client
        .post(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_envelope(response, 405).await;
}

#[tokio::test]
async fn bad_path_and_query_parameters_are_400() {
    let app = TestApp::spawn().await;
    let response = app
        .get("/v1/sessions/not-a-uuid", &app.admin_key)
        .send()
        .await
        .unwrap();
    let (code, message) = assert_envelope(response, 400).await;
    assert_eq!(code, "invalid_path");
    assert!(message.contains("session_id"), "{message}");

    for query in [
        "limit=0",
        "limit=1000",
        "limit=x",
        "status=weird",
        "status=deleted",
        "cursor=%21%21",
        "bogus=1",
    ] {
        let response = app
            .get(&format!("/v1/sessions?{query}"), &app.admin_key)
            .send()
            .await
            .unwrap();
        let (code, _) = assert_envelope(response, 400).await;
        assert!(code.starts_with("invalid_"), "{query}: {code}");
    }
}

#[tokio::test]
async fn server_errors_are_opaque() {
    let app = TestApp::spawn().await;
    // Break the schema under the running app: the failure must not reach the client.
    sqlx::query("alter table sessions rename to sessions_gone")
        .execute(&app.db.pool)
        .await
        .unwrap();
    let response = app
        .get("/v1/sessions", &app.admin_key)
        .send()
        .await
        .unwrap();
    let (code, message) = assert_envelope(response, 500).await;
    assert_eq!(code, "internal");
    assert_eq!(message, "internal server error");
}
