//! `/v1/admin`: tenants and API keys, for admin keys only. The same operations as
//! `hotplex keys …`, for operators who automate over HTTP.

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::auth::Admin;
use super::docs::{AdminErrors, AuthErrors, InputErrors, NotFoundError, ParamErrors};
use super::error::ApiError;
use super::extract::{AppJson, AppPath, AppQuery};
use super::tags::ADMIN;
use crate::app::AppState;
use crate::auth::{Principal, display_prefix, generate_key, hash_key};
use crate::domain::{self, ApiKeyId, Role, TenantId, TenantName};
use crate::store::audit::{self, AuditEntry};
use crate::store::{keys, tenants};

/// A tenant.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantResponse {
    pub id: TenantId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

impl From<tenants::TenantRow> for TenantResponse {
    fn from(r: tenants::TenantRow) -> Self {
        Self {
            id: r.tenant_id,
            name: r.name,
            created_at: r.created_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct TenantList {
    pub tenants: Vec<TenantResponse>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTenantRequest {
    /// Lower-case name: `[a-z0-9][a-z0-9._-]{0,62}`.
    pub name: String,
}

/// An API key (never its secret, except once at creation).
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyResponse {
    pub id: ApiKeyId,
    pub tenant: String,
    pub tenant_id: TenantId,
    pub name: String,
    pub role: Role,
    /// The first characters of the key, to recognise it.
    pub prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<keys::KeyRow> for KeyResponse {
    type Error = ApiError;
    fn try_from(r: keys::KeyRow) -> Result<Self, ApiError> {
        Ok(Self {
            role: r.role()?,
            id: r.api_key_id,
            tenant: r.tenant_name,
            tenant_id: r.tenant_id,
            name: r.name,
            prefix: r.key_prefix,
            created_at: r.created_at,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        })
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct KeyList {
    pub keys: Vec<KeyResponse>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKeyRequest {
    /// A label for the key.
    pub name: String,
    /// Tenant name (default: `default`); created if it does not exist.
    pub tenant: Option<String>,
    /// `user` (default) or `admin`.
    pub role: Option<Role>,
}

/// A new key. `key` is shown only here: store it now.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedKey {
    pub key: String,
    #[serde(flatten)]
    pub info: KeyResponse,
}

fn audit_entry<'a>(
    principal: &Principal,
    actor: &'a str,
    action: &'a str,
    target_type: &'a str,
    target_id: &'a str,
) -> AuditEntry<'a> {
    AuditEntry {
        tenant_id: Some(principal.tenant_id),
        actor,
        action,
        target_type,
        target_id,
        details: serde_json::json!({}),
    }
}

/// Lists all tenants.
#[utoipa::path(get, path = "/tenants", tag = ADMIN,
    responses((status = 200, description = "All tenants", body = TenantList), AdminErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn list_tenants(
    State(state): State<AppState>,
    _admin: Admin,
) -> Result<AppJson<TenantList>, ApiError> {
    let tenants = tenants::list(&state.pool)
        .await?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(AppJson(TenantList { tenants }))
}

/// Creates a tenant.
#[utoipa::path(post, path = "/tenants", tag = ADMIN, request_body = CreateTenantRequest,
    responses(
        (status = 201, description = "Created", body = TenantResponse),
        (status = 409, description = "The name is taken", body = super::error::ErrorBody),
        InputErrors, AdminErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn create_tenant(
    State(state): State<AppState>,
    Admin(principal): Admin,
    AppJson(req): AppJson<CreateTenantRequest>,
) -> Result<(StatusCode, AppJson<TenantResponse>), ApiError> {
    let name = TenantName::parse(&req.name)?;
    let row = tenants::create(&state.pool, &name)
        .await?
        .ok_or_else(|| ApiError::conflict("tenant_exists", "a tenant with this name exists"))?;
    let (actor, id) = (principal.actor(), row.tenant_id.to_string());
    audit::record(
        &state.pool,
        audit_entry(&principal, &actor, "tenant.create", "tenant", &id),
    )
    .await?;
    Ok((StatusCode::CREATED, AppJson(row.into())))
}

/// Key list filter.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListKeysQuery {
    /// Only keys of this tenant (by name).
    pub tenant: Option<String>,
}

/// Lists API keys (without secrets), revoked ones included.
#[utoipa::path(get, path = "/keys", tag = ADMIN, params(ListKeysQuery),
    responses((status = 200, description = "Keys", body = KeyList), ParamErrors, NotFoundError, AdminErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn list_keys(
    State(state): State<AppState>,
    _admin: Admin,
    AppQuery(query): AppQuery<ListKeysQuery>,
) -> Result<AppJson<KeyList>, ApiError> {
    let tenant = match &query.tenant {
        Some(name) => {
            let name = TenantName::parse(name)?;
            let row = tenants::find_by_name(&state.pool, &name)
                .await?
                .ok_or_else(|| ApiError::not_found("tenant not found"))?;
            Some(row.tenant_id)
        }
        None => None,
    };
    let keys = keys::list(&state.pool, tenant)
        .await?
        .into_iter()
        .map(KeyResponse::try_from)
        .collect::<Result<_, _>>()?;
    Ok(AppJson(KeyList { keys }))
}

/// Creates an API key; the response carries the secret, once.
#[utoipa::path(post, path = "/keys", tag = ADMIN, request_body = CreateKeyRequest,
    responses((status = 201, description = "Created", body = CreatedKey), InputErrors, AdminErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn create_key(
    State(state): State<AppState>,
    Admin(principal): Admin,
    AppJson(req): AppJson<CreateKeyRequest>,
) -> Result<(StatusCode, AppJson<CreatedKey>), ApiError> {
    let name = domain::parse_label("name", &req.name)?;
    let tenant = TenantName::parse(req.tenant.as_deref().unwrap_or(tenants::DEFAULT_TENANT))?;
    let tenant = tenants::get_or_create(&state.pool, &tenant).await?;
    let secret = generate_key();
    let prefix = display_prefix(&secret);
    let hash = hash_key(&secret);
    let row = keys::insert(
        &state.pool,
        keys::NewKey {
            tenant_id: tenant.tenant_id,
            name: &name,
            role: req.role.unwrap_or(Role::User),
            prefix: &prefix,
            hash: &hash,
        },
    )
    .await?;
    let (actor, id) = (principal.actor(), row.api_key_id.to_string());
    audit::record(
        &state.pool,
        audit_entry(&principal, &actor, "key.create", "api_key", &id),
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        AppJson(CreatedKey {
            key: secret,
            info: row.try_into()?,
        }),
    ))
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct KeyPath {
    /// The key's id.
    pub key_id: ApiKeyId,
}

/// Revokes an API key; it stops working at once.
#[utoipa::path(delete, path = "/keys/{key_id}", tag = ADMIN, params(KeyPath),
    responses((status = 200, description = "Revoked", body = KeyResponse), NotFoundError, ParamErrors, AdminErrors, AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn revoke_key(
    State(state): State<AppState>,
    Admin(principal): Admin,
    AppPath(path): AppPath<KeyPath>,
) -> Result<AppJson<KeyResponse>, ApiError> {
    let row = keys::revoke(&state.pool, path.key_id)
        .await?
        .ok_or_else(|| ApiError::not_found("key not found"))?;
    // Other API processes hear of it through the keys trigger; this one forgets at once.
    state.keys.clear();
    let (actor, id) = (principal.actor(), row.api_key_id.to_string());
    audit::record(
        &state.pool,
        audit_entry(&principal, &actor, "key.revoke", "api_key", &id),
    )
    .await?;
    Ok(AppJson(row.try_into()?))
}

/// The caller as the server sees it.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    pub tenant: String,
    pub tenant_id: TenantId,
    pub role: Role,
    /// The key presented; `null` for a JWT, and when the server runs without auth.
    pub key_id: Option<ApiKeyId>,
    /// The `sub` of the JWT presented; `null` for a key.
    pub subject: Option<String>,
}

/// Who the presented key or token belongs to.
#[utoipa::path(get, path = "/whoami", tag = super::tags::SESSIONS,
    responses((status = 200, description = "The caller", body = WhoAmI), AuthErrors),
    security(("bearerAuth" = []), ("apiKey" = [])))]
pub async fn get_whoami(principal: Principal) -> AppJson<WhoAmI> {
    AppJson(WhoAmI {
        tenant: principal.tenant_name,
        tenant_id: principal.tenant_id,
        role: principal.role,
        key_id: principal.key_id,
        subject: principal.subject,
    })
}
