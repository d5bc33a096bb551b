//! The checked-in OpenAPI document is the one the code generates, and it is complete
//! enough for SDK generators. Regenerate with `cargo run -- openapi --output openapi/openapi.json`
//! (or run this test with `UPDATE_OPENAPI=1`).

use std::path::PathBuf;

use serde_json::Value;

#[test]
fn checked_in_spec_matches_the_code() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi/openapi.json");
    let generated = hotplex::api::openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "openapi/openapi.json is stale: run `cargo run -- openapi --output openapi/openapi.json`"
    );
}

#[test]
fn every_operation_has_an_id_a_tag_and_enveloped_errors() {
    let spec: Value = serde_json::from_str(&hotplex::api::openapi_json()).unwrap();
    let mut ids = std::collections::HashSet::new();
    for (path, item) in spec["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let id = op["operationId"]
                .as_str()
                .unwrap_or_else(|| panic!("{method} {path}: no operationId"));
            assert!(ids.insert(id.to_owned()), "duplicate operationId {id}");
            assert!(
                op["tags"].as_array().is_some_and(|t| !t.is_empty()),
                "{id}: no tag"
            );
            let responses = op["responses"].as_object().unwrap();
            if path.starts_with("/v1/") {
                assert!(responses.contains_key("401"), "{id}: no 401");
                assert!(
                    op["security"].as_array().is_some_and(|s| !s.is_empty()),
                    "{id}: no security"
                );
            }
            for (status, response) in responses {
                if status.as_str() >= "400" {
                    let schema = &response["content"]["application/json"]["schema"]["$ref"];
                    assert_eq!(schema, "#/components/schemas/ErrorBody", "{id} {status}");
                }
            }
        }
    }
    assert!(ids.contains("create_session") && ids.contains("list_sessions"));
}
