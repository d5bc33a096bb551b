//! Turns: post a prompt (202, durable, idempotent with `Idempotency-Key`, optionally wait
//! for the outcome), read turns, interrupt the running one.

use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};

use super::docs::{AuthErrors, InputErrors, NotFoundError, ParamErrors};
use super::error::ApiError;
use super::extract::{AppJson, AppPath, AppQuery};
use super::sessions::SessionPath;
use super::tags::TURNS;
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::{SessionId, TurnId, WorkerId};
use crate::events::Usage;
use crate::store::turns::{self, Enqueued, NewTurn, TurnRow};
use crate::store::{self, sessions};

/// Largest prompt accepted, in characters.
const MAX_PROMPT_CHARS: usize = 200_000;
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A prompt for the session's agent.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTurnRequest {
    /// The text sent to the agent as the user's message.
    pub prompt: String,
}

/// A turn's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TurnStatus {
    Queued,
    Running,
    Completed,
    Failed,
    Interrupted,
}

/// A turn as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TurnResponse {
    pub id: TurnId,
    pub session_id: SessionId,
    /// Position in the session: turns run one at a time in this order.
    pub seq: i64,
    pub status: TurnStatus,
    pub prompt: String,
    /// The agent's final text, once completed.
    pub result: Option<String>,
    /// Why it failed, if it did.
    pub error: Option<String>,
    /// Tokens, cost and duration, once finished.
    pub usage: Option<Usage>,
    /// The worker that runs (or last ran) the turn.
    pub worker_id: Option<WorkerId>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
}

fn status_of(row: &TurnRow) -> Result<TurnStatus, ApiError> {
    Ok(match row.status.as_str() {
        "queued" => TurnStatus::Queued,
        "running" => TurnStatus::Running,
        "completed" => TurnStatus::Completed,
        "failed" => TurnStatus::Failed,
        "interrupted" => TurnStatus::Interrupted,
        other => return Err(ApiError::internal(format!("turn status {other:?}"))),
    })
}

async fn respond(state: &AppState, row: TurnRow) -> Result<TurnResponse, ApiError> {
    let usage = if row.is_terminal() {
        turns::usage(&state.pool, &[row.turn_id])
            .await?
            .remove(&row.turn_id)
    } else {
        None
    };
    to_response(row, usage)
}

fn to_response(row: TurnRow, usage: Option<Usage>) -> Result<TurnResponse, ApiError> {
    Ok(TurnResponse {
        status: status_of(&row)?,
        id: row.turn_id,
        session_id: row.session_id,
        seq: row.seq,
        prompt: row.prompt,
        result: row.result,
        error: row.error,
        usage,
        worker_id: row.worker_id,
        created_at: row.created_at,
        started_at: row.started_at,
        completed_at: row.completed_at,
    })
}

/// Options of a prompt post.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct CreateTurnQuery {
    /// Wait until the turn ends and return it with its result (200); on timeout the
    /// turn as it stands (202).
    #[serde(default)]
    pub wait: bool,
    /// Seconds to wait with `wait=true` (default 60, at most 600, and always less than the
    /// server's `http.request_timeout`).
    pub timeout: Option<u64>,
}

/// Sends a prompt. The turn is durable once this returns; turns of a session run one at a
/// time in the order they were accepted. A retry with the same `Idempotency-Key` returns the
/// same turn.
#[utoipa::path(post, path = "/sessions/{session_id}/turns", tag = TURNS, params(SessionPath, CreateTurnQuery,
        ("Idempotency-Key" = Option<String>, Header, description = "Makes retries safe: the same key returns the same turn")),
    request_body = CreateTurnRequest,
    responses(
        (status = 202, description = "Accepted (queued), or still running after `timeout`", body = TurnResponse),
        (status = 200, description = "Finished (`wait=true`)", body = TurnResponse),
        (status = 409, description = "The Idempotency-Key was used for a different request", body = super::error::ErrorBody),
        NotFoundError, InputErrors,
        (status = 422, description = "A wrong field, type or value; or the prompt was refused by the WAF \
            (`blocked_by_policy`: the message names the rule, its level and category; a `security.blocked` event is emitted)",
            body = super::error::ErrorBody),
        AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn create_turn(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(path): AppPath<SessionPath>,
    AppQuery(query): AppQuery<CreateTurnQuery>,
    headers: HeaderMap,
    AppJson(req): AppJson<CreateTurnRequest>,
) -> Result<Response, ApiError> {
    validate_prompt(&req.prompt)?;
    let key = match headers.get("idempotency-key") {
        Some(v) => {
            let k = v.to_str().map_err(|_| {
                ApiError::bad_request("invalid_header", "Idempotency-Key must be text")
            })?;
            if k.is_empty() || k.len() > 255 {
                return Err(ApiError::bad_request(
                    "invalid_header",
                    "Idempotency-Key must be 1-255 characters",
                ));
            }
            Some(k.to_owned())
        }
        None => None,
    };
    // The wait ends before `http.request_timeout` would cut the request (a 503): a turn
    // still running then is answered 202, as documented.
    let wait = query
        .timeout
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(60))
        .min(MAX_WAIT)
        .min(
            state
                .settings
                .http
                .request_timeout
                .saturating_sub(Duration::from_millis(500)),
        );
    // Before the enqueue: a refused prompt leaves no turn behind.
    super::policy::screen_prompt(&state, &principal, path.session_id, &req.prompt).await?;
    let hash: [u8; 32] = Sha256::digest(req.prompt.as_bytes()).into();

    let new = NewTurn {
        tenant_id: principal.tenant_id,
        session_id: path.session_id,
        prompt: &req.prompt,
        idempotency_key: key.as_deref(),
        request_hash: &hash,
        message_id: None,
        agent: None,
    };
    // The turn, its events and its queue job are written together, or not at all.
    let row = match turns::enqueue(&state.pool, &new).await? {
        Enqueued::NoSession => return Err(ApiError::not_found("session not found")),
        Enqueued::KeyReused => {
            return Err(ApiError::conflict(
                "idempotency_key_reused",
                "this Idempotency-Key was already used for a different prompt",
            ));
        }
        Enqueued::Replayed(row) | Enqueued::New { turn: row, .. } => row,
    };
    tracing::info!(session.id = %path.session_id, turn.id = %row.turn_id, turn.seq = row.seq, "turn accepted");

    if !query.wait {
        let response = respond(&state, row).await?;
        return Ok((StatusCode::ACCEPTED, AppJson(response)).into_response());
    }
    let row = wait_for_end(&state, row, wait).await?;
    let status = if row.is_terminal() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, AppJson(respond(&state, row).await?)).into_response())
}

/// Checks a prompt's text: not empty, not too long, no NUL.
pub(crate) fn validate_prompt(prompt: &str) -> Result<(), ApiError> {
    if prompt.trim().is_empty() {
        return Err(ApiError::unprocessable("prompt: must not be empty"));
    }
    if prompt.chars().count() > MAX_PROMPT_CHARS {
        return Err(ApiError::unprocessable(format!(
            "prompt: must be at most {MAX_PROMPT_CHARS} characters"
        )));
    }
    if prompt.contains('\0') {
        return Err(ApiError::unprocessable(
            "prompt: must not contain NUL characters",
        ));
    }
    Ok(())
}

/// Waits for a turn to end, woken by the session's events; gives up at `limit`.
pub(crate) async fn wait_for_end(
    state: &AppState,
    mut row: TurnRow,
    limit: Duration,
) -> Result<TurnRow, ApiError> {
    let mut sub = state.hub.subscribe(row.session_id);
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(fresh) = turns::get(&state.pool, row.tenant_id, row.turn_id).await? {
            row = fresh;
        }
        if row.is_terminal() {
            return Ok(row);
        }
        tokio::select! {
            () = tokio::time::sleep_until(deadline) => return Ok(row),
            () = state.shutdown.cancelled() => return Ok(row),
            // A slow poll as well, in case a notification is lost.
            _ = tokio::time::timeout(Duration::from_secs(2), sub.changed()) => {}
        }
    }
}

/// One turn of the caller's tenant.
#[utoipa::path(get, path = "/turns/{turn_id}", tag = TURNS, params(("turn_id" = TurnId, Path, description = "The turn id")),
    responses((status = 200, description = "The turn", body = TurnResponse), NotFoundError, ParamErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn get_turn(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(turn_id): AppPath<TurnId>,
) -> Result<AppJson<TurnResponse>, ApiError> {
    let row = turns::get(&state.pool, principal.tenant_id, turn_id)
        .await?
        .ok_or_else(|| ApiError::not_found("turn not found"))?;
    Ok(AppJson(respond(&state, row).await?))
}

/// Paging of a session's turns.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListTurnsQuery {
    /// Only turns with a higher `seq` (default 0).
    pub after: Option<i64>,
    /// Page size, 1-200 (default 50).
    pub limit: Option<i64>,
}

/// A page of turns, oldest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct TurnPage {
    pub turns: Vec<TurnResponse>,
    /// Pass as `after` for the next page; `null` on the last page.
    pub next_after: Option<i64>,
}

/// The session's turns, in order.
#[utoipa::path(get, path = "/sessions/{session_id}/turns", tag = TURNS, params(SessionPath, ListTurnsQuery),
    responses((status = 200, description = "Turns", body = TurnPage), NotFoundError, ParamErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn list_turns(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(path): AppPath<SessionPath>,
    AppQuery(query): AppQuery<ListTurnsQuery>,
) -> Result<AppJson<TurnPage>, ApiError> {
    let limit = query.limit.unwrap_or(50);
    if !(1..=200).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`limit` must be between 1 and 200",
        ));
    }
    sessions::get(&state.pool, principal.tenant_id, path.session_id)
        .await?
        .ok_or_else(|| ApiError::not_found("session not found"))?;
    let mut rows = turns::list(
        &state.pool,
        path.session_id,
        query.after.unwrap_or(0),
        limit + 1,
    )
    .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_after = if more {
        rows.last().map(|r| r.seq)
    } else {
        None
    };
    let ids: Vec<TurnId> = rows.iter().map(|r| r.turn_id).collect();
    let mut usage = turns::usage(&state.pool, &ids).await?;
    let out = rows
        .into_iter()
        .map(|row| {
            let u = usage.remove(&row.turn_id);
            to_response(row, u)
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AppJson(TurnPage {
        turns: out,
        next_after,
    }))
}

/// What an interrupt request did.
#[derive(Debug, Serialize, ToSchema)]
pub struct InterruptResponse {
    /// The running turn that will end `interrupted`; `null` when none was running.
    pub turn_id: Option<TurnId>,
}

/// Interrupts the running turn. The agent process stays warm; queued turns go on.
#[utoipa::path(post, path = "/sessions/{session_id}/interrupt", tag = TURNS, params(SessionPath),
    responses((status = 202, description = "Requested", body = InterruptResponse), NotFoundError, ParamErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn interrupt_session(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(path): AppPath<SessionPath>,
) -> Result<(StatusCode, AppJson<InterruptResponse>), ApiError> {
    let mut tx = store::begin(&state.pool).await?;
    sessions::get(&mut *tx, principal.tenant_id, path.session_id)
        .await?
        .ok_or_else(|| ApiError::not_found("session not found"))?;
    let turn_id = turns::request_interrupt(&mut tx, principal.tenant_id, path.session_id).await?;
    tx.commit().await.map_err(store::Error::from)?;
    Ok((StatusCode::ACCEPTED, AppJson(InterruptResponse { turn_id })))
}
