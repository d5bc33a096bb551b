//! The read-only routes OpenCode clients call at start-up: health, config, the provider
//! and model catalogue, agents, paths, project and VCS, and the lists hotplex keeps empty.

use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};

use super::{Caller, OcError, Scope};
use crate::app::AppState;
use crate::opencode::{self, view};

/// `GET /global/health` (open, like `/health`).
pub async fn health() -> Json<Value> {
    Json(json!({"healthy": true, "version": opencode::VERSION}))
}

pub async fn config(State(state): State<AppState>, _: Caller) -> Json<Value> {
    Json(view::config(&state.settings))
}

pub async fn config_providers(State(state): State<AppState>, _: Caller) -> Json<Value> {
    Json(json!({
        "providers": view::providers(&state.settings),
        "default": view::default_models(&state.settings),
    }))
}

pub async fn provider(State(state): State<AppState>, _: Caller) -> Json<Value> {
    Json(json!({
        "all": view::providers(&state.settings),
        "default": view::default_models(&state.settings),
        "connected": ["claude-code", "opencode"],
    }))
}

pub async fn agents(_: Caller) -> Json<Value> {
    Json(view::agents())
}

pub async fn path(
    State(state): State<AppState>,
    _: Caller,
    scope: Scope,
) -> Result<Json<Value>, OcError> {
    let dir = scope
        .directory
        .unwrap_or_else(|| view::default_directory(&state.settings));
    Ok(Json(view::paths(&state.settings, &dir)))
}

fn project() -> Value {
    json!({"id": "global", "worktree": "/", "time": {"created": 0, "updated": 0}, "sandboxes": []})
}

pub async fn current_project(_: Caller) -> Json<Value> {
    Json(project())
}

pub async fn projects(_: Caller) -> Json<Value> {
    Json(json!([project()]))
}

pub async fn vcs(_: Caller) -> Json<Value> {
    Json(json!({"branch": null, "default_branch": null}))
}

pub async fn empty_list(_: Caller) -> Json<Value> {
    Json(json!([]))
}

pub async fn empty_object(_: Caller) -> Json<Value> {
    Json(json!({}))
}
