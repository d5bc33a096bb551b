//! Authentication: the `Principal` extractor. A key arrives as `Authorization: Bearer <key>`
//! or `X-API-Key: <key>`; it is hashed and looked up, and the request acts for its tenant.

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::app::{AppState, AuthMode};
use crate::auth::{Principal, hash_key};
use crate::domain::Role;
use crate::store;

/// The key from the headers, if any. A malformed header is an error, not "no key".
fn presented_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
        let (scheme, key) = text.split_once(' ').unwrap_or((text, ""));
        if !scheme.eq_ignore_ascii_case("bearer") || key.trim().is_empty() {
            return Err(ApiError::unauthorized(
                "expected `Authorization: Bearer <api key>`",
            ));
        }
        return Ok(Some(key.trim()));
    }
    if let Some(value) = headers.get("x-api-key") {
        let key = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed X-API-Key header"))?;
        return Ok(Some(key.trim()));
    }
    Ok(None)
}

/// Resolves the caller of a request; 401 when no valid key is presented.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let key = presented_key(headers)?;
    let Some(key) = key else {
        if state.auth == AuthMode::InsecureNoAuth {
            return Ok(Principal {
                tenant_id: store::tenants::DEFAULT_TENANT_ID,
                tenant_name: store::tenants::DEFAULT_TENANT.into(),
                key_id: None,
                role: Role::Admin,
            });
        }
        return Err(ApiError::unauthorized(
            "an API key is required (`Authorization: Bearer <key>` or `X-API-Key`)",
        ));
    };
    let hash = hash_key(key);
    if let Some(principal) = state.keys.get(&hash) {
        return Ok(principal);
    }
    let row = store::keys::authenticate(&state.pool, &hash)
        .await?
        .ok_or_else(|| ApiError::unauthorized("invalid or revoked API key"))?;
    let principal = Principal {
        tenant_id: row.tenant_id,
        tenant_name: row.tenant_name.clone(),
        key_id: Some(row.api_key_id),
        role: row.role()?,
    };
    state.keys.insert(hash, principal.clone());
    Ok(principal)
}

impl FromRequestParts<AppState> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        if let Some(p) = parts.extensions.get::<Principal>() {
            return Ok(p.clone());
        }
        let principal = authenticate(state, &parts.headers).await?;
        parts.extensions.insert(principal.clone());
        Ok(principal)
    }
}

/// A principal holding an admin key; user keys get 403.
#[derive(Debug, Clone)]
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if !principal.is_admin() {
            return Err(ApiError::forbidden("this operation needs an admin key"));
        }
        Ok(Self(principal))
    }
}
