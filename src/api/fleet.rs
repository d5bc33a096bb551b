//! `/v1/admin/workers`: the worker fleet, for the operators (admin keys of the `default`
//! tenant; the workers serve every tenant, so other tenants' admins may not steer them).

use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::docs::{AdminErrors, AuthErrors, NotFoundError, ParamErrors};
use super::error::ApiError;
use super::extract::{AppJson, AppPath, AppQuery};
use super::tags::ADMIN;
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::WorkerId;
use crate::store::audit::{self, AuditEntry};
use crate::store::workers::{self, WorkerRow};

fn operator(principal: &Principal) -> Result<(), ApiError> {
    if principal.tenant_id != crate::store::tenants::DEFAULT_TENANT_ID {
        return Err(ApiError::forbidden(
            "the worker fleet is managed with admin keys of the default tenant",
        ));
    }
    Ok(())
}

/// Which workers to list.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WorkersQuery {
    /// Include stopped workers (default: live ones only).
    #[serde(default)]
    pub all: bool,
}

/// The fleet's workers.
#[derive(Debug, Serialize, ToSchema)]
pub struct WorkerList {
    pub workers: Vec<WorkerRow>,
}

/// Lists the workers: host, pid, capacity, held sessions, draining, last heartbeat.
#[utoipa::path(get, path = "/workers", tag = ADMIN, params(WorkersQuery),
    responses((status = 200, description = "Workers, newest first", body = WorkerList), ParamErrors, AdminErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn list_workers(
    State(state): State<AppState>,
    Admin(principal): Admin,
    AppQuery(query): AppQuery<WorkersQuery>,
) -> Result<AppJson<WorkerList>, ApiError> {
    operator(&principal)?;
    let workers = workers::list(&state.pool, query.all).await?;
    Ok(AppJson(WorkerList { workers }))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct WorkerPath {
    /// The worker's id.
    pub worker_id: WorkerId,
}

/// Drains a worker: it takes no new work, lets its running turns finish (at most
/// `worker.drain_timeout`), hands its sessions over to the rest of the fleet and exits.
#[utoipa::path(post, path = "/workers/{worker_id}/drain", tag = ADMIN, params(WorkerPath),
    responses((status = 202, description = "Draining"), NotFoundError, ParamErrors, AdminErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn drain_worker(
    State(state): State<AppState>,
    Admin(principal): Admin,
    AppPath(path): AppPath<WorkerPath>,
) -> Result<StatusCode, ApiError> {
    operator(&principal)?;
    if !workers::drain(&state.pool, path.worker_id).await? {
        return Err(ApiError::not_found("no live worker with this id"));
    }
    let (actor, id) = (principal.actor(), path.worker_id.to_string());
    let entry = AuditEntry {
        tenant_id: Some(principal.tenant_id),
        actor: &actor,
        action: "worker.drain",
        target_type: "worker",
        target_id: &id,
        details: serde_json::json!({}),
    };
    audit::record(&state.pool, entry).await?;
    Ok(StatusCode::ACCEPTED)
}
