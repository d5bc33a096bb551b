//! JWT bearer tokens beside API keys: a token with the wrong algorithm, audience, issuer or
//! signature, or outside its lifetime, is a 401 with `WWW-Authenticate: Bearer
//! error="invalid_token"`; a good one acts for the tenant and role of its claims, and keys
//! keep working next to it.

use std::path::PathBuf;
use std::time::Duration;

use base64::Engine as _;
use hotplex::app::AuthMode;
use hotplex::auth::{display_prefix, hash_key};
use hotplex::config::{JwtAlgorithm, JwtSettings, Secret};
use hotplex::domain::{Role, TenantName};
use hotplex::store;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};

use crate::support::{TestApp, assert_envelope};

const ISSUER: &str = "https://idp.test/";
const AUDIENCE: &str = "hotplex-api";
const SECRET: &str = "a-test-secret-of-at-least-32-bytes!";
const INVALID_TOKEN: &str = r#"Bearer error="invalid_token""#;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/jwt")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).expect("fixture")
}

fn settings(algorithm: JwtAlgorithm) -> JwtSettings {
    JwtSettings {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        algorithm,
        hs256_secret: (algorithm == JwtAlgorithm::HS256).then(|| Secret::new(SECRET)),
        public_key_pem: None,
        jwks_file: None,
        leeway: Duration::from_secs(30),
        tenant_claim: "tenant".into(),
        role_claim: "role".into(),
        required_typ: None,
        auto_create_tenants: false,
    }
}

async fn app_with(jwt: JwtSettings) -> TestApp {
    TestApp::spawn_with(move |s| s.auth.jwt = Some(jwt), AuthMode::Keys).await
}

async fn create_tenant(app: &TestApp, name: &str) {
    store::tenants::get_or_create(&app.db.pool, &TenantName::parse(name).unwrap())
        .await
        .unwrap();
}

/// Claims of a good token for `tenant`, valid for ten minutes.
fn claims(tenant: &str, role: Option<&str>) -> Value {
    let now = get_current_timestamp();
    let mut c = json!({"iss": ISSUER, "aud": AUDIENCE, "sub": "user-1", "tenant": tenant,
                       "iat": now, "nbf": now, "exp": now + 600});
    if let Some(role) = role {
        c["role"] = json!(role);
    }
    c
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs256_with(private_pem: &str, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(Into::into);
    let key = EncodingKey::from_rsa_pem(&read(private_pem)).unwrap();
    encode(&header, claims, &key).unwrap()
}

fn rs256(claims: &Value) -> String {
    rs256_with("rsa_private.pem", None, claims)
}

fn es256(claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(&read("ec_private.pem")).unwrap();
    encode(&Header::new(Algorithm::ES256), claims, &key).unwrap()
}

/// A token with any header and no signature at all.
fn unsigned(header: &Value, claims: &Value) -> String {
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    format!("{}.{}.", b64(header), b64(claims))
}

/// Asserts a 401 with the envelope and the `invalid_token` challenge; the message.
async fn refused(app: &TestApp, token: &str, case: &str) -> String {
    let response = app.get("/v1/whoami", token).send().await.unwrap();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let (code, message) = assert_envelope(response, 401).await;
    assert_eq!(code, "unauthorized", "{case}");
    assert_eq!(challenge, INVALID_TOKEN, "{case}");
    message
}

async fn whoami(app: &TestApp, token: &str) -> Value {
    let response = app.get("/v1/whoami", token).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

#[tokio::test]
async fn a_token_acts_for_the_tenant_and_role_of_its_claims() {
    let app = app_with(settings(JwtAlgorithm::HS256)).await;
    create_tenant(&app, "acme").await;
    create_tenant(&app, "other").await;
    let token = hs256(&claims("acme", None));

    let me = whoami(&app, &token).await;
    assert_eq!(me["tenant"], "acme");
    assert_eq!(me["role"], "user");
    assert_eq!(me["subject"], "user-1");
    assert_eq!(me["key_id"], Value::Null);

    let created = app
        .post("/v1/sessions", &token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), 201);
    let session: Value = created.json().await.unwrap();
    let path = format!("/v1/sessions/{}", session["id"].as_str().unwrap());

    // The session is acme's: acme's keys and tokens see it, nobody else does.
    assert_eq!(app.get(&path, &token).send().await.unwrap().status(), 200);
    let acme_key = app.user_key("acme").await;
    assert_eq!(
        app.get(&path, &acme_key).send().await.unwrap().status(),
        200
    );
    let other_token = hs256(&claims("other", Some("admin")));
    assert_envelope(app.get(&path, &other_token).send().await.unwrap(), 404).await;
    assert_envelope(app.delete(&path, &other_token).send().await.unwrap(), 404).await;
    assert_envelope(app.get(&path, &app.admin_key).send().await.unwrap(), 404).await;
    let listed: Value = app
        .get("/v1/sessions", &other_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["sessions"], json!([]));
}

#[tokio::test]
async fn wrong_algorithm_audience_issuer_signature_or_lifetime_is_401() {
    let mut jwt = settings(JwtAlgorithm::RS256);
    jwt.public_key_pem = Some(fixture("rsa_public.pem"));
    let app = app_with(jwt).await;
    create_tenant(&app, "acme").await;
    let now = get_current_timestamp();
    let good = claims("acme", None);
    assert_eq!(whoami(&app, &rs256(&good)).await["tenant"], "acme");

    // The classic confusion: HS256 keyed with the RSA public key the server holds.
    let confused = encode(
        &Header::new(Algorithm::HS256),
        &good,
        &EncodingKey::from_secret(&read("rsa_public.pem")),
    )
    .unwrap();
    let mut cases: Vec<(&str, String)> = vec![
        ("HS256 keyed with the public key", confused),
        ("HS256", hs256(&good)),
        ("ES256", es256(&good)),
        (
            "alg none",
            unsigned(&json!({"alg": "none", "typ": "JWT"}), &good),
        ),
        (
            "alg none, RS256 signature",
            format!(
                "{}{}",
                unsigned(&json!({"alg": "none"}), &good),
                rs256(&good).rsplit('.').next().unwrap()
            ),
        ),
        (
            "another signer",
            rs256_with("rsa_other_private.pem", None, &good),
        ),
        ("no signature", {
            let t = rs256(&good);
            format!("{}.", t.rsplit_once('.').unwrap().0)
        }),
    ];
    // A genuine signature over other claims: the payload swapped for another tenant's.
    let genuine = rs256(&good);
    let forged_payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(claims("other", Some("admin")).to_string());
    let parts: Vec<&str> = genuine.split('.').collect();
    cases.push((
        "tampered payload",
        format!("{}.{forged_payload}.{}", parts[0], parts[2]),
    ));
    for (claim, value, case) in [
        ("aud", json!("another-api"), "wrong audience"),
        ("aud", json!(["another-api", "a-third"]), "wrong audiences"),
        ("iss", json!("https://evil.test/"), "wrong issuer"),
        ("iss", json!("https://idp.test"), "issuer without its slash"),
        ("exp", json!(now - 120), "expired beyond the leeway"),
        ("nbf", json!(now + 120), "not valid for two minutes"),
    ] {
        let mut c = good.clone();
        c[claim] = value;
        cases.push((case, rs256(&c)));
    }
    for claim in ["exp", "aud", "iss", "sub", "tenant"] {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(claim);
        cases.push((claim, rs256(&c)));
    }
    let mut messages = Vec::new();
    for (case, token) in &cases {
        messages.push((*case, refused(&app, token, case).await));
    }
    let said = |case: &str| {
        messages
            .iter()
            .find(|(c, _)| *c == case)
            .map(|(_, m)| m.clone())
            .unwrap()
    };
    assert_eq!(said("expired beyond the leeway"), "token expired");
    assert_eq!(said("not valid for two minutes"), "token not yet valid");
    assert_eq!(said("alg none"), "token algorithm not accepted");
    assert_eq!(said("wrong audience"), "token audience not accepted");
    assert_eq!(said("another signer"), "invalid token signature");

    // Clock skew within the leeway is forgiven.
    let mut c = good.clone();
    c["exp"] = json!(now - 10);
    c["nbf"] = json!(now + 10);
    assert_eq!(whoami(&app, &rs256(&c)).await["tenant"], "acme");

    // No credential at all: a challenge without an error.
    let response = app.client.get(app.url("/v1/whoami")).send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_envelope(response, 401).await;
}

#[tokio::test]
async fn es256_tokens_verify_with_a_pem_key() {
    let mut jwt = settings(JwtAlgorithm::ES256);
    jwt.public_key_pem = Some(fixture("ec_public.pem"));
    let app = app_with(jwt).await;
    create_tenant(&app, "acme").await;
    let good = claims("acme", Some("admin"));
    let me = whoami(&app, &es256(&good)).await;
    assert_eq!(
        (me["tenant"].as_str(), me["role"].as_str()),
        (Some("acme"), Some("admin"))
    );
    refused(&app, &rs256(&good), "RS256 where ES256 is pinned").await;
    refused(&app, &hs256(&good), "HS256 where ES256 is pinned").await;
}

#[tokio::test]
async fn admin_routes_need_the_admin_role() {
    let app = app_with(settings(JwtAlgorithm::HS256)).await;
    create_tenant(&app, "acme").await;
    let user = hs256(&claims("acme", Some("user")));
    let nobody = hs256(&claims("acme", None));
    let admin = hs256(&claims("acme", Some("admin")));

    for token in [&user, &nobody] {
        let (code, _) = assert_envelope(
            app.get("/v1/admin/tenants", token).send().await.unwrap(),
            403,
        )
        .await;
        assert_eq!(code, "forbidden");
        let response = app
            .post("/v1/admin/keys", token)
            .json(&json!({"name": "x"}))
            .send()
            .await
            .unwrap();
        assert_envelope(response, 403).await;
    }
    assert_eq!(
        app.get("/v1/admin/tenants", &admin)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let response = app
        .post("/v1/admin/tenants", &admin)
        .json(&json!({"name": "made-by-a-token"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    // The audit trail names the token's subject.
    let actor: String = sqlx::query_scalar(
        "select actor from audit_events where action = 'tenant.create' order by created_at desc limit 1",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!(actor, "jwt:user-1");

    // The worker fleet stays with the default tenant's admins, as for keys.
    assert_envelope(
        app.get("/v1/admin/workers", &admin).send().await.unwrap(),
        403,
    )
    .await;
    let default_admin = hs256(&claims("default", Some("admin")));
    assert_eq!(
        app.get("/v1/admin/workers", &default_admin)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test]
async fn api_keys_still_work_beside_jwt() {
    let app = app_with(settings(JwtAlgorithm::HS256)).await;
    let me = whoami(&app, &app.admin_key).await;
    assert_eq!(me["tenant"], "default");
    assert!(me["key_id"].is_string());
    assert_eq!(me["subject"], Value::Null);
    for request in [
        app.client
            .get(app.url("/v1/whoami"))
            .header("x-api-key", &app.admin_key),
        app.client
            .get(app.url("/v1/whoami"))
            .basic_auth("opencode", Some(&app.admin_key)),
    ] {
        assert_eq!(request.send().await.unwrap().status(), 200);
    }
    // A bootstrap key may be any string: without dots it is still looked up as a key.
    let plain = "a-bootstrap-key-without-the-prefix";
    store::keys::insert(
        &app.db.pool,
        store::keys::NewKey {
            tenant_id: store::tenants::DEFAULT_TENANT_ID,
            name: "bootstrap",
            role: Role::Admin,
            prefix: &display_prefix(plain),
            hash: &hash_key(plain),
        },
    )
    .await
    .unwrap();
    assert_eq!(whoami(&app, plain).await["role"], "admin");
    // A token is only a bearer credential: as X-API-Key it is looked up as a key.
    create_tenant(&app, "acme").await;
    let token = hs256(&claims("acme", None));
    let response = app
        .client
        .get(app.url("/v1/whoami"))
        .header("x-api-key", &token)
        .send()
        .await
        .unwrap();
    assert_envelope(response, 401).await;
    let message = refused(&app, "hpx_not-a-key", "wrong key").await;
    assert_eq!(message, "invalid or revoked API key");
}

#[tokio::test]
async fn unknown_tenants_are_refused_unless_created_on_first_use() {
    let app = app_with(settings(JwtAlgorithm::HS256)).await;
    let token = hs256(&claims("newco", None));
    let message = refused(&app, &token, "unknown tenant").await;
    assert!(message.contains("newco"), "{message}");

    let mut jwt = settings(JwtAlgorithm::HS256);
    jwt.auto_create_tenants = true;
    let app = app_with(jwt).await;
    assert_eq!(whoami(&app, &token).await["tenant"], "newco");
    assert_eq!(whoami(&app, &token).await["tenant"], "newco");
    let (actor, count): (String, i64) = sqlx::query_as(
        "select min(actor), count(*) from audit_events where action = 'tenant.create'",
    )
    .fetch_one(&app.db.pool)
    .await
    .unwrap();
    assert_eq!((actor.as_str(), count), ("jwt:user-1", 1));
}

#[tokio::test]
async fn jwks_keys_are_chosen_by_kid_and_a_new_kid_rereads_the_file() {
    let jwk = |private_pem: &str, kid: &str| {
        let key = EncodingKey::from_rsa_pem(&read(private_pem)).unwrap();
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
        jwk.common.key_id = Some(kid.into());
        serde_json::to_value(jwk).unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(
        &path,
        json!({"keys": [jwk("rsa_private.pem", "first")]}).to_string(),
    )
    .unwrap();
    let mut jwt = settings(JwtAlgorithm::RS256);
    jwt.jwks_file = Some(path.clone());
    let app = app_with(jwt).await;
    create_tenant(&app, "acme").await;
    let good = claims("acme", None);

    let first = rs256_with("rsa_private.pem", Some("first"), &good);
    assert_eq!(whoami(&app, &first).await["tenant"], "acme");

    // The issuer rotates: a second key appears in the file, and its first token finds it.
    std::fs::write(
        &path,
        json!({"keys": [jwk("rsa_private.pem", "first"), jwk("rsa_other_private.pem", "second")]})
            .to_string(),
    )
    .unwrap();
    let second = rs256_with("rsa_other_private.pem", Some("second"), &good);
    assert_eq!(whoami(&app, &second).await["tenant"], "acme");
    assert_eq!(whoami(&app, &first).await["tenant"], "acme");

    let message = refused(
        &app,
        &rs256_with("rsa_other_private.pem", Some("third"), &good),
        "unknown kid",
    )
    .await;
    assert_eq!(message, "token key not known");
    // A known kid with another key's signature.
    let message = refused(
        &app,
        &rs256_with("rsa_other_private.pem", Some("first"), &good),
        "kid of another key",
    )
    .await;
    assert_eq!(message, "invalid token signature");
}
