//! OpenCode's session routes: create, get, list, status, update, delete; prompts (blocking
//! `message` and `prompt_async`), messages, abort. Sessions are hotplex sessions (their
//! `oc_id` is the `ses_…` id), prompts are turns, messages are folded from the events.

use std::time::Duration;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::{Caller, OcError, Scope, query_param};
use crate::api::turns::{validate_prompt, wait_for_end};
use crate::app::AppState;
use crate::domain::{self, Provider, SessionStatus, TurnId, WorkDir};
use crate::opencode::ids;
use crate::opencode::translate::{Ctx, Transcript};
use crate::opencode::view;
use crate::store::sessions::{
    self, Created, DirectoryFilter, NewSession, SessionOptions, SessionRow,
};
use crate::store::turns::{self, Enqueued, NewTurn};

/// How long a blocking prompt waits for its turn before answering with what there is.
const MAX_PROMPT_WAIT: Duration = Duration::from_secs(3600);
/// Events read per query while folding a session.
const PAGE: i64 = 1000;

fn default_dir(state: &AppState) -> String {
    view::default_directory(&state.settings)
}

fn not_found(id: &str) -> OcError {
    OcError::not_found(format!("Session not found: {id}"))
}

async fn find(state: &AppState, caller: &Caller, id: &str) -> Result<SessionRow, OcError> {
    if !ids::has_prefix(id, "ses") {
        return Err(OcError::bad_request(format!(
            "invalid session id {id:?}: must start with \"ses\""
        )));
    }
    sessions::get_by_oc_id(&state.pool, caller.0.tenant_id, id)
        .await?
        .ok_or_else(|| not_found(id))
}

/// A JSON object body; an empty body is `{}`.
fn object_body(body: &Bytes) -> Result<serde_json::Map<String, Value>, OcError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(OcError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(OcError::bad_request(format!(
            "malformed JSON in request body: {e}"
        ))),
    }
}

fn opt_str<'a>(
    m: &'a serde_json::Map<String, Value>,
    key: &str,
) -> Result<Option<&'a str>, OcError> {
    match m.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(OcError::bad_request(format!("`{key}` must be a string"))),
    }
}

/// The provider and model of a `{providerID, id|modelID}` object (or the defaults).
fn pick_model(model: Option<&Value>) -> Result<(Provider, Option<String>), OcError> {
    let Some(model) = model.filter(|m| !m.is_null()) else {
        return Ok((Provider::default(), None));
    };
    let provider_id = model.get("providerID").and_then(Value::as_str);
    let model_id = model
        .get("id")
        .or_else(|| model.get("modelID"))
        .and_then(Value::as_str);
    let provider = match provider_id {
        None => Provider::default(),
        Some(p) => p.parse::<Provider>().map_err(|_| {
            OcError::bad_request(format!(
                "unknown providerID {p:?}: hotplex offers \"claude-code\" and \"opencode\""
            ))
        })?,
    };
    let model = match model_id {
        None | Some("default") => None,
        Some(m) => Some(domain::parse_model(m).map_err(|e| OcError::bad_request(e.to_string()))?),
    };
    Ok((provider, model))
}

/// `POST /session`.
pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    scope: Scope,
    body: Bytes,
) -> Result<Json<Value>, OcError> {
    let req = object_body(&body)?;
    let (provider, model) = pick_model(req.get("model"))?;
    let title = opt_str(&req, "title")?
        .map(crate::api::sessions::parse_title)
        .transpose()
        .map_err(|e| OcError::bad_request(e.to_string()))?;
    // The client's directory is the agent's working directory when the server allows it
    // there; otherwise it only scopes the session (the agent runs under the work root).
    let mut roots = vec![state.settings.work_root()];
    roots.extend(state.settings.allowed_work_dirs.iter().cloned());
    let work_dir = scope
        .directory
        .as_deref()
        .and_then(|d| WorkDir::parse(d, &roots).ok())
        .map(|w| w.as_str().to_owned());
    // OpenCode's persona (`build` by default) means something to the OpenCode provider
    // only; other providers run their agent as configured.
    let agent = match opt_str(&req, "agent")? {
        Some(a) if provider == Provider::OpenCode => {
            Some(domain::parse_agent(a).map_err(|e| OcError::bad_request(e.to_string()))?)
        }
        _ => None,
    };
    let new = NewSession {
        session_id: domain::SessionId::new_random(),
        tenant_id: caller.0.tenant_id,
        external_id: None,
        namespace: None,
        provider,
        work_dir,
        model,
        options: SessionOptions {
            agent,
            ..SessionOptions::default()
        },
        title,
        directory: scope.directory,
    };
    match sessions::create(&state.pool, &new).await? {
        Created::New(row) | Created::Existing(row) => {
            tracing::info!(session.id = %row.session_id, oc_id = %row.oc_id, "session created (opencode)");
            Ok(Json(view::session(&row, &default_dir(&state))))
        }
        Created::Conflict => Err(OcError(crate::api::error::ApiError::internal(
            "a random session id collided",
        ))),
    }
}

/// `GET /session/{id}` (from any directory).
pub async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OcError> {
    let row = find(&state, &caller, &id).await?;
    Ok(Json(view::session(&row, &default_dir(&state))))
}

/// `GET /session`: the directory's sessions, newest first.
pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    scope: Scope,
    uri: Uri,
) -> Result<Json<Value>, OcError> {
    let default = default_dir(&state);
    let limit = match query_param(&uri, "limit") {
        None => 100,
        Some(l) => l
            .parse::<i64>()
            .ok()
            .filter(|l| (1..=1000).contains(l))
            .ok_or_else(|| OcError::bad_request("`limit` must be between 1 and 1000"))?,
    };
    let since = match query_param(&uri, "start") {
        None => None,
        Some(s) => Some(
            s.parse::<i64>()
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .ok_or_else(|| OcError::bad_request("`start` must be a time in ms"))?,
        ),
    };
    let search = query_param(&uri, "search").filter(|s| !s.is_empty());
    let dir = scope.directory.clone().unwrap_or_else(|| default.clone());
    let filter = DirectoryFilter {
        directory: Some(&dir),
        default_directory: &default,
        search: search.as_deref(),
        since,
        busy_only: false,
    };
    let rows = sessions::list_in_directory(&state.pool, caller.0.tenant_id, &filter, limit).await?;
    Ok(Json(Value::Array(
        rows.iter().map(|r| view::session(r, &default)).collect(),
    )))
}

/// `GET /session/status`: the directory's busy sessions (idle ones are left out).
pub async fn status(
    State(state): State<AppState>,
    caller: Caller,
    scope: Scope,
) -> Result<Json<Value>, OcError> {
    let default = default_dir(&state);
    let dir = scope.directory.clone().unwrap_or_else(|| default.clone());
    let filter = DirectoryFilter {
        directory: Some(&dir),
        default_directory: &default,
        busy_only: true,
        ..DirectoryFilter::default()
    };
    let rows =
        sessions::list_in_directory(&state.pool, caller.0.tenant_id, &filter, 10_000).await?;
    let map: serde_json::Map<String, Value> = rows
        .into_iter()
        .filter(|r| r.status().ok() == Some(SessionStatus::Busy))
        .map(|r| (r.oc_id, json!({"type": "busy"})))
        .collect();
    Ok(Json(Value::Object(map)))
}

/// `PATCH /session/{id}`: the title (other fields are accepted and ignored).
pub async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, OcError> {
    let row = find(&state, &caller, &id).await?;
    let req = object_body(&body)?;
    let row = if req.contains_key("title") {
        let title = opt_str(&req, "title")?
            .map(crate::api::sessions::parse_title)
            .transpose()
            .map_err(|e| OcError::bad_request(e.to_string()))?;
        sessions::set_title(
            &state.pool,
            caller.0.tenant_id,
            row.session_id,
            title.as_deref(),
        )
        .await?
        .ok_or_else(|| not_found(&id))?
    } else {
        row
    };
    Ok(Json(view::session(&row, &default_dir(&state))))
}

/// `DELETE /session/{id}` → `true`.
pub async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OcError> {
    let row = find(&state, &caller, &id).await?;
    if !crate::api::sessions::remove(&state, &caller.0, row.session_id).await? {
        return Err(not_found(&id));
    }
    Ok(Json(json!(true)))
}

/// `GET /session/{id}/children`, `…/todo`, `…/diff`: `[]` for a session that exists.
/// hotplex sessions have no children, and hotplex does not track the agent's todo list or
/// snapshot the work tree.
pub async fn empty_list(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OcError> {
    find(&state, &caller, &id).await?;
    Ok(Json(json!([])))
}

/// Folds the session's events (all of them, or one turn's) into a transcript.
async fn fold(
    state: &AppState,
    row: &SessionRow,
    turn: Option<TurnId>,
) -> Result<Transcript, OcError> {
    let mut tr = Transcript::new(Ctx::of(row, &default_dir(state)), true);
    let mut after = 0;
    loop {
        let page =
            crate::store::events::list(&state.pool, row.session_id, after, turn, PAGE).await?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        for ev in &page {
            tr.apply(ev);
        }
        if (page.len() as i64) < PAGE {
            break;
        }
    }
    Ok(tr)
}

/// `GET /session/{id}/message?limit=`: `{info, parts}[]`, oldest first.
pub async fn messages(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    uri: Uri,
) -> Result<Json<Value>, OcError> {
    let row = find(&state, &caller, &id).await?;
    let limit = match query_param(&uri, "limit") {
        None => usize::MAX,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| *l >= 1)
            .ok_or_else(|| OcError::bad_request("`limit` must be a positive number"))?,
    };
    let tr = fold(&state, &row, None).await?;
    let all = tr.messages();
    let skip = all.len().saturating_sub(limit);
    Ok(Json(Value::Array(
        all.into_iter().skip(skip).map(|m| m.to_json()).collect(),
    )))
}

/// `GET /session/{id}/message/{message_id}`.
pub async fn message(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, message_id)): Path<(String, String)>,
) -> Result<Json<Value>, OcError> {
    let row = find(&state, &caller, &id).await?;
    let tr = fold(&state, &row, None).await?;
    tr.messages()
        .into_iter()
        .find(|m| m.id() == message_id)
        .map(|m| Json(m.to_json()))
        .ok_or_else(|| OcError::not_found(format!("Message not found: {message_id}")))
}

/// A prompt body, checked.
struct Prompt {
    text: String,
    message_id: Option<String>,
    agent: Option<String>,
    /// `{providerID, modelID}` when the client named one.
    model: Option<(Provider, Option<String>)>,
}

fn parse_prompt(body: &Bytes) -> Result<Prompt, OcError> {
    let req = object_body(body)?;
    let parts = match req.get("parts") {
        None | Some(Value::Null) => {
            return Err(OcError::bad_request("Missing key\n  at [\"parts\"]"));
        }
        Some(Value::Array(p)) => p,
        Some(_) => return Err(OcError::bad_request("`parts` must be an array")),
    };
    if req.get("noReply").and_then(Value::as_bool) == Some(true) {
        return Err(OcError::bad_request(
            "`noReply` is not supported by hotplex: every prompt runs a turn",
        ));
    }
    let mut texts = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = part.get("text").and_then(Value::as_str).ok_or_else(|| {
                    OcError::bad_request(format!("parts[{i}].text must be a string"))
                })?;
                if part.get("ignored").and_then(Value::as_bool) != Some(true) {
                    texts.push(text);
                }
            }
            // An agent mention only picks the persona, which `agent` carries.
            Some("agent") => {}
            Some(kind @ ("file" | "subtask")) => {
                return Err(OcError::bad_request(format!(
                    "parts[{i}]: `{kind}` parts are not supported by hotplex yet; send text"
                )));
            }
            Some(other) => {
                return Err(OcError::bad_request(format!(
                    "parts[{i}]: unknown part type {other:?}"
                )));
            }
            None => return Err(OcError::bad_request(format!("parts[{i}].type is required"))),
        }
    }
    let text = texts.join("\n");
    validate_prompt(&text).map_err(|e| OcError::bad_request(e.message))?;
    let message_id = opt_str(&req, "messageID")?.map(str::to_owned);
    if let Some(m) = &message_id
        && !ids::has_prefix(m, "msg")
    {
        return Err(OcError::bad_request("`messageID` must start with \"msg\""));
    }
    let agent = opt_str(&req, "agent")?.map(str::to_owned);
    if let Some(a) = &agent
        && (a.is_empty()
            || a.len() > 64
            || !a
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_".contains(c)))
    {
        return Err(OcError::bad_request(format!("unknown agent {a:?}")));
    }
    let model = match req.get("model") {
        None | Some(Value::Null) => None,
        Some(m) => Some(pick_model(Some(m))?),
    };
    Ok(Prompt {
        text,
        message_id,
        agent,
        model,
    })
}

/// Enqueues the prompt as a turn of the session.
async fn enqueue(
    state: &AppState,
    caller: &Caller,
    row: &SessionRow,
    body: &Bytes,
) -> Result<turns::TurnRow, OcError> {
    let prompt = parse_prompt(body)?;
    // Before anything changes: a refused prompt neither switches the model nor makes a turn.
    crate::api::policy::screen_prompt(state, &caller.0, row.session_id, &prompt.text).await?;
    if let Some((provider, model)) = &prompt.model {
        let current = (row.provider().unwrap_or_default(), row.model.clone());
        if current != (*provider, model.clone()) {
            // The first prompt may choose the model (`opencode run --model`); later ones
            // cannot switch a running conversation to another agent.
            let switched = sessions::set_model_before_first_turn(
                &state.pool,
                caller.0.tenant_id,
                row.session_id,
                *provider,
                model.as_deref(),
            )
            .await?;
            if !switched {
                let (p, m) = view::model_of(row);
                return Err(OcError::bad_request(format!(
                    "this session runs {p}/{m}; start a new session to use {}/{}",
                    provider.as_str(),
                    model.as_deref().unwrap_or("default")
                )));
            }
        }
    }
    let hash: [u8; 32] = Sha256::digest(prompt.text.as_bytes()).into();
    let new = NewTurn {
        tenant_id: caller.0.tenant_id,
        session_id: row.session_id,
        prompt: &prompt.text,
        idempotency_key: None,
        request_hash: &hash,
        message_id: prompt.message_id.as_deref(),
        agent: prompt.agent.as_deref(),
    };
    match turns::enqueue(&state.pool, &new).await? {
        Enqueued::New { turn, .. } | Enqueued::Replayed(turn) => {
            tracing::info!(session.id = %row.session_id, turn.id = %turn.turn_id, "turn accepted (opencode)");
            Ok(turn)
        }
        Enqueued::NoSession => Err(not_found(&row.oc_id)),
        Enqueued::KeyReused => Err(OcError::bad_request("duplicate prompt")),
    }
}

/// `POST /session/{id}/prompt_async` → 204 at once; the turn runs in order.
pub async fn prompt_async(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<StatusCode, OcError> {
    let row = find(&state, &caller, &id).await?;
    enqueue(&state, &caller, &row, &body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /session/{id}/message`: runs the prompt and answers with the last assistant
/// message `{info, parts}` once the turn has ended. The headers go out at once and the body
/// when the turn ends, so a long turn is not cut by the request timeout (which bounds the
/// time to headers).
pub async fn prompt(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, OcError> {
    let row = find(&state, &caller, &id).await?;
    let turn = enqueue(&state, &caller, &row, &body).await?;
    let reply = async move {
        let text = match reply(&state, &row, turn).await {
            Ok(v) => v.to_string(),
            Err(e) => {
                tracing::error!(error = %e.0.message, "opencode prompt: cannot build the reply");
                super::error_body(e.0.status, e.0.code, &e.0.message).to_string()
            }
        };
        Ok::<_, std::convert::Infallible>(Bytes::from(text))
    };
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(futures::stream::once(reply)),
    )
        .into_response())
}

async fn reply(state: &AppState, row: &SessionRow, turn: turns::TurnRow) -> Result<Value, OcError> {
    let turn_id = turn.turn_id;
    let ended = wait_for_end(state, turn, MAX_PROMPT_WAIT).await?;
    if !ended.is_terminal() {
        tracing::warn!(turn.id = %turn_id, "opencode prompt: answering before the turn ended");
    }
    let tr = fold(state, row, Some(turn_id)).await?;
    tr.last_assistant(turn_id)
        .or_else(|| tr.user_message(turn_id))
        .map(|m| m.to_json())
        .ok_or_else(|| {
            OcError(crate::api::error::ApiError::internal(
                "the turn left no message",
            ))
        })
}

/// `POST /session/{id}/abort` → `true` (also when nothing runs).
pub async fn abort(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Value>, OcError> {
    let row = find(&state, &caller, &id).await?;
    let mut tx = crate::store::begin(&state.pool).await?;
    turns::request_interrupt(&mut tx, caller.0.tenant_id, row.session_id).await?;
    tx.commit().await.map_err(crate::store::Error::from)?;
    Ok(Json(json!(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(v: Value) -> Result<Prompt, OcError> {
        parse_prompt(&Bytes::from(v.to_string()))
    }

    #[test]
    fn prompts_are_checked_like_opencode_does() {
        let ok = p(
            json!({"parts": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"},
                                    {"type": "text", "text": "x", "ignored": true}],
                          "messageID": "msg_1", "agent": "build"}),
        )
        .ok()
        .unwrap();
        assert_eq!(ok.text, "a\nb");
        assert_eq!(ok.message_id.as_deref(), Some("msg_1"));
        for bad in [
            json!({}),
            json!({"parts": "x"}),
            json!({"parts": []}),
            json!({"parts": [{"type": "nope"}]}),
            json!({"parts": [{"type": "file", "mime": "text/plain", "url": "data:,x"}]}),
            json!({"parts": [{"type": "text", "text": "a"}], "messageID": "m1"}),
            json!({"parts": [{"type": "text", "text": "a"}], "noReply": true}),
            json!({"parts": [{"type": "text", "text": "a"}], "agent": "a b"}),
        ] {
            let e = p(bad.clone()).err().unwrap();
            assert_eq!(e.0.status, StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(parse_prompt(&Bytes::from("{")).err().unwrap().0.status, 400);
    }
}
