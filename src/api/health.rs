//! Liveness and readiness probes; they answer without a key.

use std::time::Duration;

use axum::extract::State;
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiError;
use super::extract::AppJson;
use super::tags::HEALTH;
use crate::app::AppState;
use crate::store;

#[derive(Debug, Serialize, ToSchema)]
pub struct HealthResponse {
    /// `ok` when live, `ready` when ready.
    pub status: &'static str,
    pub version: &'static str,
}

/// The process is up and serving HTTP.
#[utoipa::path(get, path = "/health/live", tag = HEALTH,
    responses((status = 200, description = "Alive", body = HealthResponse)))]
pub async fn get_liveness() -> AppJson<HealthResponse> {
    AppJson(HealthResponse {
        status: "ok",
        version: env!("CARGO_PKG_VERSION"),
    })
}

/// The process can serve requests: the database answers.
#[utoipa::path(get, path = "/health/ready", tag = HEALTH,
    responses(
        (status = 200, description = "Ready", body = HealthResponse),
        (status = 503, description = "The database does not answer", body = super::error::ErrorBody),
    ))]
pub async fn get_readiness(
    State(state): State<AppState>,
) -> Result<AppJson<HealthResponse>, ApiError> {
    match tokio::time::timeout(Duration::from_secs(3), store::ping(&state.pool)).await {
        Ok(Ok(())) => Ok(AppJson(HealthResponse {
            status: "ready",
            version: env!("CARGO_PKG_VERSION"),
        })),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "readiness: database check failed");
            Err(ApiError::unavailable(
                "not_ready",
                "the database is unreachable",
            ))
        }
        Err(_) => Err(ApiError::unavailable(
            "not_ready",
            "the database did not answer in time",
        )),
    }
}
