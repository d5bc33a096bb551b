//! Authentication: the `Principal` extractor. A key arrives as `Authorization: Bearer <key>`,
//! `X-API-Key: <key>`, or as the password of HTTP Basic (what OpenCode clients send; the
//! user name is ignored); it is hashed and looked up, and the request acts for its tenant.
//! When `auth.jwt` is configured, a bearer credential shaped like a JWT (three dot-separated
//! parts, not starting with the key prefix) is verified as one instead.

use std::borrow::Cow;

use axum::extract::FromRequestParts;
use axum::http::HeaderMap;
use axum::http::request::Parts;

use super::error::ApiError;
use crate::app::{AppState, AuthMode};
use crate::auth::jwt::Verifier;
use crate::auth::{KEY_PREFIX, KeyCache, Principal, hash_key};
use crate::domain::Role;
use crate::store::{self, audit, tenants};

/// The credential from the headers and whether it came as a bearer token (the only way a
/// JWT is accepted). A malformed header is an error, not "no key".
fn presented_credential(headers: &HeaderMap) -> Result<Option<(Cow<'_, str>, bool)>, ApiError> {
    if let Some(value) = headers.get(axum::http::header::AUTHORIZATION)
        && value
            .to_str()
            .is_ok_and(|v| v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer "))
    {
        return Ok(presented_key(headers)?.map(|key| (key, true)));
    }
    Ok(presented_key(headers)?.map(|key| (key, false)))
}

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

/// Whether a bearer credential is to be verified as a JWT rather than looked up as a key.
/// Keys made by hotplex carry the prefix; a bootstrap key may be any string, but never has
/// the three dot-separated parts of a compact JWS.
fn looks_like_jwt(credential: &str) -> bool {
    !credential.starts_with(KEY_PREFIX) && credential.split('.').count() == 3
}

/// Resolves the caller of a request; 401 when no valid key or token is presented.
pub async fn authenticate(state: &AppState, headers: &HeaderMap) -> Result<Principal, ApiError> {
    let Some((key, bearer)) = presented_credential(headers)? else {
        if state.auth == AuthMode::InsecureNoAuth {
            return Ok(Principal {
                tenant_id: store::tenants::DEFAULT_TENANT_ID,
                tenant_name: store::tenants::DEFAULT_TENANT.into(),
                key_id: None,
                subject: None,
                role: Role::Admin,
            });
        }
        return Err(ApiError::unauthorized(if state.jwt.is_some() {
            "an API key or token is required (`Authorization: Bearer <key or JWT>` or `X-API-Key`)"
        } else {
            "an API key is required (`Authorization: Bearer <key>` or `X-API-Key`)"
        }));
    };
    if bearer
        && let Some(verifier) = &state.jwt
        && looks_like_jwt(&key)
    {
        return authenticate_jwt(state, verifier, &key).await;
    }
    let hash = hash_key(&key);
    if let Some(principal) = state.keys.get(&hash) {
        return Ok(principal);
    }
    let row = store::keys::authenticate(&state.pool, &hash)
        .await?
        .ok_or_else(|| ApiError::invalid_token("invalid or revoked API key"))?;
    let principal = Principal {
        tenant_id: row.tenant_id,
        tenant_name: row.tenant_name.clone(),
        key_id: Some(row.api_key_id),
        subject: None,
        role: row.role()?,
    };
    state.keys.insert(hash, principal.clone());
    Ok(principal)
}

/// The caller of a JWT: its tenant by name (created on first use only when configured),
/// its role from the role claim. Cached like keys, by the token's hash, but only while the
/// token stays valid for the cache's whole lifetime.
async fn authenticate_jwt(
    state: &AppState,
    verifier: &Verifier,
    token: &str,
) -> Result<Principal, ApiError> {
    let hash = hash_key(token);
    if let Some(principal) = state.keys.get(&hash) {
        return Ok(principal);
    }
    let verified = verifier
        .verify(token)
        .await
        .map_err(|why| ApiError::invalid_token(why.to_string()))?;
    let tenant = match tenants::find_by_name(&state.pool, &verified.tenant).await? {
        Some(row) => row,
        None if verifier.auto_create_tenants => {
            match tenants::create(&state.pool, &verified.tenant).await? {
                Some(row) => {
                    let actor = format!("jwt:{}", verified.subject);
                    let id = row.tenant_id.to_string();
                    audit::record(
                        &state.pool,
                        audit::AuditEntry {
                            tenant_id: Some(row.tenant_id),
                            actor: &actor,
                            action: "tenant.create",
                            target_type: "tenant",
                            target_id: &id,
                            details: serde_json::json!({"via": "jwt"}),
                        },
                    )
                    .await?;
                    row
                }
                // Created meanwhile by a concurrent request.
                None => tenants::find_by_name(&state.pool, &verified.tenant)
                    .await?
                    .ok_or_else(|| ApiError::internal("a tenant created concurrently vanished"))?,
            }
        }
        // Genuine, but not for this server (RFC 6750: "invalid for other reasons"): a
        // tenant is set up by an admin, or on first use with `auto_create_tenants`.
        None => {
            return Err(ApiError::invalid_token(format!(
                "token tenant `{}` does not exist on this server",
                verified.tenant.as_str()
            )));
        }
    };
    let principal = Principal {
        tenant_id: tenant.tenant_id,
        tenant_name: tenant.name,
        key_id: None,
        subject: Some(verified.subject),
        role: verified.role,
    };
    let now = jsonwebtoken::get_current_timestamp();
    if verified.expires_at > now.saturating_add(KeyCache::TTL.as_secs()) {
        state.keys.insert(hash, principal.clone());
    }
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

/// A principal with the admin role (an admin key, or a token whose role claim says so);
/// everyone else gets 403.
#[derive(Debug, Clone)]
pub struct Admin(pub Principal);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let principal = Principal::from_request_parts(parts, state).await?;
        if !principal.is_admin() {
            return Err(ApiError::forbidden(
                "this operation needs an admin key or token",
            ));
        }
        Ok(Self(principal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_bearer_credentials_shaped_like_a_jws_are_tokens() {
        assert!(looks_like_jwt("eyJh.eyJz.c2ln"));
        assert!(!looks_like_jwt("hpx_a.b.c"));
        assert!(!looks_like_jwt("a-bootstrap-key-of-any-shape"));
        assert!(!looks_like_jwt("a.b"));
        let mut h = HeaderMap::new();
        h.insert("authorization", "bearer a.b.c".parse().unwrap());
        assert!(presented_credential(&h).unwrap().unwrap().1);
        let mut h = HeaderMap::new();
        h.insert("x-api-key", "a.b.c".parse().unwrap());
        assert!(!presented_credential(&h).unwrap().unwrap().1);
        // `opencode:a.b.c`
        h.insert(
            "authorization",
            "Basic b3BlbmNvZGU6YS5iLmM=".parse().unwrap(),
        );
        assert!(!presented_credential(&h).unwrap().unwrap().1);
    }

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
