//! `/v1/sessions`: create (idempotent with `external_id`), get, list, delete. Every lookup
//! is scoped to the caller's tenant; another tenant's session is a 404.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::docs::{AuthErrors, InputErrors, NotFoundError, ParamErrors};
use super::error::ApiError;
use super::extract::{AppJson, AppJsonOrDefault, AppPath, AppQuery};
use super::tags::SESSIONS;
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::{
    self, DEFAULT_NAMESPACE, ExternalId, Namespace, PermissionMode, Provider, SessionId,
    SessionStatus, WorkDir,
};
use crate::store::audit::{self, AuditEntry};
use crate::store::sessions::{
    self, Created, Cursor, ListFilter, NewSession, SessionOptions, SessionRow,
};

/// A new session. Every field is optional; an empty body makes a Claude Code session.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSessionRequest {
    /// Which agent runs the session.
    #[serde(default)]
    pub provider: Provider,
    /// Working directory: relative (under the server's work root) or absolute inside an
    /// allowed root.
    pub work_dir: Option<String>,
    /// Model id passed to the agent.
    pub model: Option<String>,
    /// Text appended to the agent's system prompt.
    pub system_prompt: Option<String>,
    /// Tool rules the agent may use without asking, e.g. `Bash(git diff:*)`.
    #[serde(default)]
    pub allowed_tools: Vec<String>,
    /// Tool rules the agent may never use.
    #[serde(default)]
    pub disallowed_tools: Vec<String>,
    /// The agent's permission mode.
    #[serde(default)]
    pub permission_mode: PermissionMode,
    /// The agent persona of an `opencode` session (`build`, `plan`, or one defined in its
    /// config); not available for `claude-code`.
    pub agent: Option<String>,
    /// Your own id for the session (a chat thread, a ticket). With it the session id is
    /// `UUIDv5(NAMESPACE_URL, "{namespace}:session:{external_id}")` and creating it again
    /// returns the same session.
    pub external_id: Option<String>,
    /// Namespace of `external_id` (default `default`).
    pub namespace: Option<String>,
    /// A human title (OpenCode clients show it).
    pub title: Option<String>,
}

/// A session as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionResponse {
    pub id: SessionId,
    /// The id the OpenCode-compatible API uses for this session (`ses_…`).
    pub opencode_id: String,
    pub title: Option<String>,
    pub provider: Provider,
    pub status: SessionStatus,
    pub external_id: Option<String>,
    pub namespace: Option<String>,
    pub work_dir: Option<String>,
    pub model: Option<String>,
    pub system_prompt: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub permission_mode: PermissionMode,
    pub agent: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_active_at: DateTime<Utc>,
    /// The warm agent process, while one runs (filled by `GET /v1/sessions/{id}`; `null` in
    /// lists and create answers).
    pub process: Option<ProcessInfo>,
    /// Tokens, cost and time of all finished turns (filled by `GET /v1/sessions/{id}`;
    /// `null` in lists and create answers).
    pub usage: Option<crate::events::Usage>,
}

/// Where a session's agent runs.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProcessInfo {
    pub worker_id: crate::domain::WorkerId,
    pub pid: i32,
    pub started_at: DateTime<Utc>,
}

impl TryFrom<SessionRow> for SessionResponse {
    type Error = ApiError;
    fn try_from(row: SessionRow) -> Result<Self, ApiError> {
        let provider = row.provider()?;
        let status = row.status()?;
        Ok(Self {
            id: row.session_id,
            opencode_id: row.oc_id,
            title: row.title,
            provider,
            status,
            external_id: row.external_id,
            namespace: row.namespace,
            work_dir: row.work_dir,
            model: row.model,
            system_prompt: row.options.0.system_prompt,
            allowed_tools: row.options.0.allowed_tools,
            disallowed_tools: row.options.0.disallowed_tools,
            permission_mode: row.options.0.permission_mode,
            agent: row.options.0.agent.clone(),
            created_at: row.created_at,
            updated_at: row.updated_at,
            last_active_at: row.last_active_at,
            process: None,
            usage: None,
        })
    }
}

fn validate(
    state: &AppState,
    principal: &Principal,
    req: CreateSessionRequest,
) -> Result<NewSession, ApiError> {
    let mut roots = vec![state.settings.work_root()];
    roots.extend(state.settings.allowed_work_dirs.iter().cloned());
    let work_dir = req
        .work_dir
        .as_deref()
        .map(|w| WorkDir::parse(w, &roots))
        .transpose()?;
    let model = req.model.as_deref().map(domain::parse_model).transpose()?;
    let agent = req.agent.as_deref().map(domain::parse_agent).transpose()?;
    if agent.is_some() && req.provider != Provider::OpenCode {
        return Err(
            domain::Invalid::new("agent", "is only available for `opencode` sessions").into(),
        );
    }
    let system_prompt = req
        .system_prompt
        .as_deref()
        .map(domain::parse_system_prompt)
        .transpose()?;
    let allowed_tools = domain::parse_tool_rules("allowed_tools", &req.allowed_tools)?;
    let disallowed_tools = domain::parse_tool_rules("disallowed_tools", &req.disallowed_tools)?;

    let (session_id, external_id, namespace) = match (&req.external_id, &req.namespace) {
        (Some(ext), ns) => {
            let ext = ExternalId::parse(ext)?;
            let ns = Namespace::parse(ns.as_deref().unwrap_or(DEFAULT_NAMESPACE))?;
            let id = domain::derive_session_id(ns.as_str(), ext.as_str());
            (
                id,
                Some(ext.as_str().to_owned()),
                Some(ns.as_str().to_owned()),
            )
        }
        (None, Some(_)) => {
            return Err(domain::Invalid::new(
                "namespace",
                "is only meaningful together with `external_id`",
            )
            .into());
        }
        (None, None) => (SessionId::new_random(), None, None),
    };
    Ok(NewSession {
        session_id,
        tenant_id: principal.tenant_id,
        external_id,
        namespace,
        provider: req.provider,
        work_dir: work_dir.map(|w| w.as_str().to_owned()),
        model,
        options: SessionOptions {
            system_prompt,
            allowed_tools,
            disallowed_tools,
            permission_mode: req.permission_mode,
            agent,
        },
        title: req.title.map(|t| parse_title(&t)).transpose()?,
        directory: None,
    })
}

/// A session title: one line of at most 200 characters.
pub fn parse_title(s: &str) -> Result<String, crate::domain::Invalid> {
    let t = s.trim();
    if t.chars().count() > 200 || t.chars().any(char::is_control) {
        return Err(crate::domain::Invalid::new(
            "title",
            "must be one line of at most 200 characters",
        ));
    }
    Ok(t.to_owned())
}

/// Creates a session. With `external_id`, creating it again returns the existing session
/// with 200 (the settings of the first creation stay).
#[utoipa::path(post, path = "/sessions", tag = SESSIONS,
    request_body(content = Option<CreateSessionRequest>, description = "Session settings (optional)"),
    responses(
        (status = 201, description = "Created", body = SessionResponse),
        (status = 200, description = "A session with this `external_id` already existed", body = SessionResponse),
        (status = 409, description = "The derived id is taken by another tenant", body = super::error::ErrorBody),
        InputErrors, AuthErrors,
    ),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn create_session(
    State(state): State<AppState>,
    principal: Principal,
    AppJsonOrDefault(req): AppJsonOrDefault<CreateSessionRequest>,
) -> Result<Response, ApiError> {
    let new = validate(&state, &principal, req)?;
    match sessions::create(&state.pool, &new).await? {
        Created::New(row) => {
            tracing::info!(session.id = %row.session_id, tenant = %principal.tenant_name, "session created");
            Ok((
                StatusCode::CREATED,
                AppJson(SessionResponse::try_from(row)?),
            )
                .into_response())
        }
        Created::Existing(row) => {
            Ok((StatusCode::OK, AppJson(SessionResponse::try_from(row)?)).into_response())
        }
        Created::Conflict => Err(ApiError::conflict(
            "session_id_taken",
            "this external_id is already used in this namespace by another tenant; choose another namespace",
        )),
    }
}

/// Path of a single session.
#[derive(Debug, Deserialize, IntoParams)]
pub struct SessionPath {
    /// The session id.
    pub session_id: SessionId,
}

/// Returns one session of the caller's tenant.
#[utoipa::path(get, path = "/sessions/{session_id}", tag = SESSIONS, params(SessionPath),
    responses((status = 200, description = "The session", body = SessionResponse), NotFoundError, ParamErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn get_session(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(path): AppPath<SessionPath>,
) -> Result<AppJson<SessionResponse>, ApiError> {
    let row = sessions::get(&state.pool, principal.tenant_id, path.session_id)
        .await?
        .ok_or_else(|| ApiError::not_found("session not found"))?;
    let mut response = SessionResponse::try_from(row)?;
    response.process = crate::store::leases::process(&state.pool, path.session_id)
        .await?
        .map(|p| ProcessInfo {
            worker_id: p.worker_id,
            pid: p.pid,
            started_at: p.process_started_at,
        });
    response.usage = Some(crate::store::turns::session_usage(&state.pool, path.session_id).await?);
    Ok(AppJson(response))
}

/// Deletes a session. Its history and usage stay for accounting; the id answers 404 from
/// now on, and creating the same `external_id` again starts a fresh conversation.
#[utoipa::path(delete, path = "/sessions/{session_id}", tag = SESSIONS, params(SessionPath),
    responses((status = 204, description = "Deleted"), NotFoundError, ParamErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn delete_session(
    State(state): State<AppState>,
    principal: Principal,
    AppPath(path): AppPath<SessionPath>,
) -> Result<StatusCode, ApiError> {
    if !remove(&state, &principal, path.session_id).await? {
        return Err(ApiError::not_found("session not found"));
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Deletes a session with everything that goes with it; `false` when there was none.
/// Nothing accepted is dropped silently: pending turns end visibly, the owner worker (if
/// any) is told to stop the session's agent, and the deletion is audited.
pub(crate) async fn remove(
    state: &AppState,
    principal: &Principal,
    session_id: SessionId,
) -> Result<bool, ApiError> {
    let mut tx = crate::store::begin(&state.pool).await?;
    if !sessions::delete(&mut *tx, principal.tenant_id, session_id).await? {
        return Ok(false);
    }
    crate::store::turns::fail_unfinished(&mut tx, session_id, "the session was deleted").await?;
    crate::store::turns::notify_control(&mut tx, session_id, "delete").await?;
    let deleted = crate::events::NewEvent::session(crate::events::EventBody::SessionDeleted {});
    crate::store::events::append(&mut tx, session_id, None, &[deleted]).await?;
    let target = session_id.to_string();
    let actor = principal.actor();
    let entry = AuditEntry {
        tenant_id: Some(principal.tenant_id),
        actor: &actor,
        action: "session.delete",
        target_type: "session",
        target_id: &target,
        details: serde_json::json!({}),
    };
    audit::record(&mut *tx, entry).await?;
    tx.commit().await.map_err(crate::store::Error::from)?;
    tracing::info!(session.id = %session_id, "session deleted");
    Ok(true)
}

const DEFAULT_PAGE: u32 = 50;
const MAX_PAGE: u32 = 200;

/// Filters and paging of the session list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListSessionsQuery {
    /// Only sessions in this status (`idle` or `busy`).
    pub status: Option<SessionStatus>,
    /// Only sessions of this provider.
    pub provider: Option<Provider>,
    /// Page size, 1-200 (default 50).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// One page of sessions, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionPage {
    pub sessions: Vec<SessionResponse>,
    /// Pass as `cursor` to get the next page; `null` on the last page.
    pub next_cursor: Option<String>,
}

fn encode_cursor(c: &Cursor) -> String {
    URL_SAFE_NO_PAD.encode(format!(
        "{}:{}",
        c.created_at.timestamp_micros(),
        c.session_id
    ))
}

fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_cursor",
            "`cursor` is not a cursor returned by this API",
        )
    };
    let bytes = URL_SAFE_NO_PAD.decode(s).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (micros, id) = text.split_once(':').ok_or_else(bad)?;
    let created_at =
        DateTime::from_timestamp_micros(micros.parse().map_err(|_| bad())?).ok_or_else(bad)?;
    Ok(Cursor {
        created_at,
        session_id: id.parse().map_err(|_| bad())?,
    })
}

/// Lists the caller's sessions, newest first, with cursor pagination.
#[utoipa::path(get, path = "/sessions", tag = SESSIONS, params(ListSessionsQuery),
    responses((status = 200, description = "A page of sessions", body = SessionPage), ParamErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn list_sessions(
    State(state): State<AppState>,
    principal: Principal,
    AppQuery(query): AppQuery<ListSessionsQuery>,
) -> Result<AppJson<SessionPage>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_PAGE);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::bad_request(
            "invalid_query",
            format!("`limit` must be between 1 and {MAX_PAGE}"),
        ));
    }
    if query.status == Some(SessionStatus::Deleted) {
        return Err(ApiError::bad_request(
            "invalid_query",
            "`status` must be `idle` or `busy`",
        ));
    }
    let filter = ListFilter {
        status: query.status,
        provider: query.provider,
        after: query.cursor.as_deref().map(decode_cursor).transpose()?,
    };
    let (rows, next) = sessions::list(&state.pool, principal.tenant_id, &filter, limit).await?;
    let sessions = rows
        .into_iter()
        .map(SessionResponse::try_from)
        .collect::<Result<_, _>>()?;
    Ok(AppJson(SessionPage {
        sessions,
        next_cursor: next.as_ref().map(encode_cursor),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            created_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
            session_id: SessionId::new_random(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        assert!(decode_cursor("!!").is_err());
        assert!(decode_cursor(&URL_SAFE_NO_PAD.encode("x:y")).is_err());
    }
}
