//! Probes and docs answer without a key; readiness follows the database.

use crate::support::{TestApp, assert_envelope};

#[tokio::test]
async fn probes_answer_without_a_key() {
    let app = TestApp::spawn().await;
    let live = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);
    let body: serde_json::Value = live.json().await.unwrap();
    assert_eq!(body["status"], "ok");
    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    assert!(ready.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn readiness_fails_with_an_envelope_when_the_database_is_gone() {
    let app = TestApp::spawn().await;
    app.db.pool.close().await;
    let response = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    let (code, _) = assert_envelope(response, 503).await;
    assert_eq!(code, "not_ready");
    // Liveness does not depend on the database.
    assert_eq!(
        app.client
            .get(app.url("/health/live"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn openapi_and_swagger_ui_are_served_offline_without_a_key() {
    let app = TestApp::spawn().await;
    let spec: serde_json::Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(spec["openapi"], "3.1.0");

    let page = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    let html = page.text().await.unwrap();
    assert!(html.contains("swagger-ui"), "{html}");
    // Every script and stylesheet the page loads is served by us (vendored), none from a CDN.
    let assets: Vec<&str> = html
        .split(['"', '\''])
        .filter(|s| s.ends_with(".js") || s.ends_with(".css"))
        .collect();
    assert!(!assets.is_empty());
    for asset in assets {
        assert!(!asset.starts_with("http"), "external asset {asset}");
        let url = app.url(&format!("/docs/{}", asset.trim_start_matches("./")));
        let response = app.client.get(&url).send().await.unwrap();
        assert_eq!(response.status(), 200, "{url}");
        assert!(
            response.bytes().await.unwrap().len() > 100,
            "{url} is empty"
        );
    }
    let init = app
        .client
        .get(app.url("/docs/swagger-initializer.js"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(init.contains("/openapi.json"), "{init}");
}
