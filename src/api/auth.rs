//! Authentication: the `Principal` extractor. A key arrives as `Authorization: Bearer <key>`,
//! `X-API-Key: <key>`, or as the password of HTTP Basic (what OpenCode clients send; the
//! user name is ignored); it is hashed and looked up, and the request acts for its tenant.

use std::borrow::Cow;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::app::{AppState, AuthMode};
use crate::auth::{Principal, hash_key};
use crate::domain::Role;
use crate::store;

/// The key from the headers, if any. A malformed header is an error, not "no key".
fn presented_key(headers: &HeaderMap) -> Result<Option<Cow<'_, str>>, ApiError> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION) {
        let text = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed Authorization header"))?;
        let (scheme, key) = text.split_once(' ').unwrap_or((text, ""));
        let key = key.trim();
        if scheme.eq_ignore_ascii_case("basic") && !key.is_empty() {
            return basic_password(key).map(|k| Some(Cow::Owned(k)));
        }
        if !scheme.eq_ignore_ascii_case("bearer") || key.is_empty() {
            return Err(ApiError::unauthorized(
                "expected `Authorization: Bearer <api key>` (or Basic with the key as password)",
            ));
        }
        return Ok(Some(Cow::Borrowed(key)));
    }
    if let Some(value) = headers.get("x-api-key") {
        let key = value
            .to_str()
            .map_err(|_| ApiError::unauthorized("malformed X-API-Key header"))?;
        return Ok(Some(Cow::Borrowed(key.trim())));
    }
    Ok(None)
}

/// The password of HTTP Basic credentials (`base64(user:password)`).
fn basic_password(encoded: &str) -> Result<String, ApiError> {
    use base64::Engine as _;
    let bad = || ApiError::unauthorized("malformed Basic credentials");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (_, password) = text.split_once(':').ok_or_else(bad)?;
    if password.trim().is_empty() {
        return Err(ApiError::unauthorized(
            "Basic credentials need the API key as password",
        ));
    }
    Ok(password.trim().to_owned())
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
    let hash = hash_key(&key);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_bearer_x_api_key_or_the_basic_password() {
        let mut h = HeaderMap::new();
        assert!(presented_key(&h).unwrap().is_none());
        h.insert("authorization", "Bearer abc".parse().unwrap());
        assert_eq!(presented_key(&h).unwrap().as_deref(), Some("abc"));
        // `opencode:hpx_key` as OpenCode clients send it.
        h.insert(
            "authorization",
            "Basic b3BlbmNvZGU6aHB4X2tleQ==".parse().unwrap(),
        );
        assert_eq!(presented_key(&h).unwrap().as_deref(), Some("hpx_key"));
        for bad in [
            "Basic !!!",
            "Basic b3BlbmNvZGU=",
            "Basic b3BlbmNvZGU6",
            "Token x",
        ] {
            h.insert("authorization", bad.parse().unwrap());
            assert_eq!(presented_key(&h).unwrap_err().status, 401, "{bad}");
        }
        let mut h = HeaderMap::new();
        h.insert("x-api-key", " k ".parse().unwrap());
        assert_eq!(presented_key(&h).unwrap().as_deref(), Some("k"));
    }
}
