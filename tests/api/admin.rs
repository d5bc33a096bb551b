//! Admin API: tenants and keys, with audit records; revoked keys stop working at once.

use serde_json::{Value, json};

use crate::support::{TestApp, assert_envelope};

#[tokio::test]
async fn admins_create_tenants_and_keys_and_revoke_them() {
    let app = TestApp::spawn().await;
    let response = app
        .post("/v1/admin/tenants", &app.admin_key)
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let response = app
        .post("/v1/admin/tenants", &app.admin_key)
        .json(&json!({"name": "acme"}))
        .send()
        .await
        .unwrap();
    assert_envelope(response, 409).await;
    let response = app
        .post("/v1/admin/tenants", &app.admin_key)
        .json(&json!({"name": "Bad Name"}))
        .send()
        .await
        .unwrap();
    assert_envelope(response, 422).await;
    let tenants: Value = app.get_json("/v1/admin/tenants").await;
    let names: Vec<&str> = tenants["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["acme", "default"]);

    let created: Value = app
        .post("/v1/admin/keys", &app.admin_key)
        .json(&json!({"name": "ci", "tenant": "acme"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let secret = created["key"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("hpx_"));
    assert_eq!(created["role"], "user");
    assert_eq!(created["tenant"], "acme");
    assert!(secret.starts_with(created["prefix"].as_str().unwrap()));

    let me: Value = app
        .get("/v1/whoami", &secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["tenant"], "acme");

    let listed: Value = app.get_json("/v1/admin/keys?tenant=acme").await;
    let keys = listed["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].get("key").is_none(), "secrets are never listed");
    let stored: Vec<u8> =
        sqlx::query_scalar("select key_hash from api_keys where api_key_id = $1::uuid")
            .bind(keys[0]["id"].as_str().unwrap())
            .fetch_one(&app.db.pool)
            .await
            .unwrap();
    assert_ne!(stored, secret.as_bytes(), "the secret is stored hashed");

    let path = format!("/v1/admin/keys/{}", created["id"].as_str().unwrap());
    let revoked: Value = app
        .delete(&path, &app.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(revoked["revoked_at"].is_string());
    assert_envelope(app.get("/v1/whoami", &secret).send().await.unwrap(), 401).await;
    let missing = format!("/v1/admin/keys/{}", uuid::Uuid::new_v4());
    assert_envelope(
        app.delete(&missing, &app.admin_key).send().await.unwrap(),
        404,
    )
    .await;
    assert_envelope(
        app.get("/v1/admin/keys?tenant=nobody", &app.admin_key)
            .send()
            .await
            .unwrap(),
        404,
    )
    .await;

    let actions: Vec<String> =
        sqlx::query_scalar("select action from audit_events order by audit_event_id")
            .fetch_all(&app.db.pool)
            .await
            .unwrap();
    assert_eq!(actions, ["tenant.create", "key.create", "key.revoke"]);
}
