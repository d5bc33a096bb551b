//! Authentication and tenant isolation: no key, no access; a key never sees another
//! tenant's sessions (404, not 403).

use serde_json::{Value, json};

use crate::support::{TestApp, assert_envelope};
use hotplex::app::AuthMode;

#[tokio::test]
async fn every_v1_route_needs_a_valid_key() {
    let app = TestApp::spawn().await;
    let id = uuid::Uuid::new_v4();
    let routes = [
        ("GET", "/v1/sessions".to_owned()),
        ("POST", "/v1/sessions".to_owned()),
        ("GET", format!("/v1/sessions/{id}")),
        ("DELETE", format!("/v1/sessions/{id}")),
        ("GET", "/v1/whoami".to_owned()),
        ("GET", "/v1/admin/keys".to_owned()),
        ("POST", "/v1/admin/keys".to_owned()),
        ("DELETE", format!("/v1/admin/keys/{id}")),
        ("GET", "/v1/admin/tenants".to_owned()),
        ("POST", "/v1/admin/tenants".to_owned()),
        ("GET", "/v1/unknown".to_owned()),
        ("PUT", "/v1/sessions".to_owned()),
    ];
    for (method, path) in &routes {
        let method: reqwest::Method = method.parse().unwrap();
        for auth in [
            None,
            Some(("authorization", "Bearer hpx_wrong")),
            Some(("x-api-key", "nope")),
            Some(("authorization", "Basic abc")),
        ] {
            let mut request = app.client.request(method.clone(), app.url(path));
            if let Some((name, value)) = auth {
                request = request.header(name, value);
            }
            let response = request.send().await.unwrap();
            let (code, _) = assert_envelope(response, 401).await;
            assert_eq!(code, "unauthorized", "{method} {path} {auth:?}");
        }
    }
}

#[tokio::test]
async fn bearer_and_x_api_key_both_work() {
    let app = TestApp::spawn().await;
    let me: Value = app.get_json("/v1/whoami").await;
    assert_eq!(me["tenant"], "default");
    assert_eq!(me["role"], "admin");
    let response = app
        .client
        .get(app.url("/v1/whoami"))
        .header("x-api-key", &app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
}

#[tokio::test]
async fn tenants_cannot_see_each_others_sessions() {
    let app = TestApp::spawn().await;
    let key_a = app.user_key("tenant-a").await;
    let key_b = app.user_key("tenant-b").await;

    let a: Value = app
        .post("/v1/sessions", &key_a)
        .json(&json!({}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let path = format!("/v1/sessions/{}", a["id"].as_str().unwrap());

    assert_envelope(app.get(&path, &key_b).send().await.unwrap(), 404).await;
    assert_envelope(app.delete(&path, &key_b).send().await.unwrap(), 404).await;
    let listed: Value = app
        .get("/v1/sessions", &key_b)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["sessions"], json!([]));
    // The admin key of another tenant is no different: sessions are tenant-scoped for all.
    assert_envelope(app.get(&path, &app.admin_key).send().await.unwrap(), 404).await;

    // Untouched for its owner.
    assert_eq!(app.get(&path, &key_a).send().await.unwrap().status(), 200);
    let listed: Value = app
        .get("/v1/sessions", &key_a)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["sessions"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_derived_id_taken_by_another_tenant_is_a_conflict_not_a_leak() {
    let app = TestApp::spawn().await;
    let key_a = app.user_key("tenant-a").await;
    let key_b = app.user_key("tenant-b").await;
    let body = json!({ "external_id": "shared-name" });
    assert_eq!(
        app.post("/v1/sessions", &key_a)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
    let (code, _) = assert_envelope(
        app.post("/v1/sessions", &key_b)
            .json(&body)
            .send()
            .await
            .unwrap(),
        409,
    )
    .await;
    assert_eq!(code, "session_id_taken");
    // B gets its own under another namespace.
    let body = json!({ "external_id": "shared-name", "namespace": "tenant-b" });
    assert_eq!(
        app.post("/v1/sessions", &key_b)
            .json(&body)
            .send()
            .await
            .unwrap()
            .status(),
        201
    );
}

#[tokio::test]
async fn user_keys_are_refused_admin_routes() {
    let app = TestApp::spawn().await;
    let user = app.user_key("default").await;
    let (code, _) =
        assert_envelope(app.get("/v1/admin/keys", &user).send().await.unwrap(), 403).await;
    assert_eq!(code, "forbidden");
    let response = app
        .post("/v1/admin/tenants", &user)
        .json(&json!({"name": "x"}))
        .send()
        .await
        .unwrap();
    assert_envelope(response, 403).await;
}

#[tokio::test]
async fn insecure_mode_acts_as_the_default_admin_but_still_checks_presented_keys() {
    let app = TestApp::spawn_with(|_| {}, AuthMode::InsecureNoAuth).await;
    let me: Value = app
        .client
        .get(app.url("/v1/whoami"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["tenant"], "default");
    assert_eq!(me["key_id"], Value::Null);
    let response = app
        .client
        .get(app.url("/v1/whoami"))
        .bearer_auth("hpx_wrong")
        .send()
        .await
        .unwrap();
    assert_envelope(response, 401).await;
}

#[tokio::test]
async fn a_key_revoked_elsewhere_stops_working_at_once_despite_the_key_cache() {
    let app = TestApp::spawn().await;
    let key = app.user_key("acme").await;
    // Authenticated once: the key is now in this API process's cache.
    let ok = app.get("/v1/whoami", &key).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    // Revoked by another process (the CLI does exactly this, straight in the database).
    sqlx::query("update api_keys set revoked_at = now() where key_hash = $1")
        .bind(&hotplex::auth::hash_key(&key)[..])
        .execute(&app.db.pool)
        .await
        .unwrap();
    let mut status = 200;
    for _ in 0..50 {
        status = app
            .get("/v1/whoami", &key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 401 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The NOTIFY of the keys trigger empties the cache well before its TTL.
    assert_eq!(status, 401, "a revoked key still worked after a second");
}
