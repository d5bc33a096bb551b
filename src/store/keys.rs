//! API keys: stored as hashes, looked up by hash, revoked in place.

use chrono::{DateTime, Utc};
use sqlx::{AssertSqlSafe, PgExecutor, PgPool};

use super::Result;
use crate::domain::{ApiKeyId, Role, TenantId};

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct KeyRow {
    pub api_key_id: ApiKeyId,
    pub tenant_id: TenantId,
    pub tenant_name: String,
    pub name: String,
    pub role: String,
    pub key_prefix: String,
    pub created_at: DateTime<Utc>,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyRow {
    pub fn role(&self) -> Result<Role> {
        self.role
            .parse()
            .map_err(|_| super::Error::Corrupt(format!("api key role {:?}", self.role)))
    }
}

const SELECT: &str = "select k.api_key_id, k.tenant_id, t.name as tenant_name, k.name, k.role,
        k.key_prefix, k.created_at, k.last_used_at, k.revoked_at
   from api_keys k join tenants t using (tenant_id)";

/// A new key to store (the secret itself is never stored).
#[derive(Debug, Clone)]
pub struct NewKey<'a> {
    pub tenant_id: TenantId,
    pub name: &'a str,
    pub role: Role,
    pub prefix: &'a str,
    pub hash: &'a [u8],
}

pub async fn insert(pool: &PgPool, key: NewKey<'_>) -> Result<KeyRow> {
    let id = ApiKeyId::new_random();
    sqlx::query(
        "insert into api_keys (api_key_id, tenant_id, name, role, key_prefix, key_hash)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(id)
    .bind(key.tenant_id)
    .bind(key.name)
    .bind(key.role.as_str())
    .bind(key.prefix)
    .bind(key.hash)
    .execute(pool)
    .await?;
    let row =
        sqlx::query_as::<_, KeyRow>(AssertSqlSafe(format!("{SELECT} where k.api_key_id = $1")))
            .bind(id)
            .fetch_one(pool)
            .await?;
    Ok(row)
}

/// Makes sure a key with this hash exists as an active admin key (bootstrap).
/// Returns whether anything changed.
pub async fn ensure_admin(pool: &PgPool, key: NewKey<'_>) -> Result<bool> {
    let changed = sqlx::query(
        "insert into api_keys (api_key_id, tenant_id, name, role, key_prefix, key_hash)
         values ($1, $2, $3, 'admin', $4, $5)
         on conflict (key_hash) do update
            set role = 'admin', revoked_at = null
          where api_keys.role <> 'admin' or api_keys.revoked_at is not null",
    )
    .bind(ApiKeyId::new_random())
    .bind(key.tenant_id)
    .bind(key.name)
    .bind(key.prefix)
    .bind(key.hash)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(changed > 0)
}

/// The active key with this hash. Touches `last_used_at` at most once a minute, so that
/// authentication does not cost a write per request.
pub async fn authenticate(pool: &PgPool, hash: &[u8]) -> Result<Option<KeyRow>> {
    let row = sqlx::query_as::<_, KeyRow>(AssertSqlSafe(format!(
        "{SELECT} where k.key_hash = $1 and k.revoked_at is null"
    )))
    .bind(hash)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = &row {
        let stale = row
            .last_used_at
            .is_none_or(|t| Utc::now() - t > chrono::Duration::seconds(60));
        if stale {
            sqlx::query("update api_keys set last_used_at = now() where api_key_id = $1")
                .bind(row.api_key_id)
                .execute(pool)
                .await?;
        }
    }
    Ok(row)
}

/// Keys of one tenant, or of all tenants; revoked ones included.
pub async fn list(db: impl PgExecutor<'_>, tenant: Option<TenantId>) -> Result<Vec<KeyRow>> {
    let rows = sqlx::query_as::<_, KeyRow>(AssertSqlSafe(format!(
        "{SELECT} where $1::uuid is null or k.tenant_id = $1 order by t.name, k.created_at"
    )))
    .bind(tenant)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

pub async fn find(db: impl PgExecutor<'_>, id: ApiKeyId) -> Result<Option<KeyRow>> {
    let row =
        sqlx::query_as::<_, KeyRow>(AssertSqlSafe(format!("{SELECT} where k.api_key_id = $1")))
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(row)
}

/// Revokes a key; `None` when no such key exists. Revoking twice keeps the first time.
pub async fn revoke(pool: &PgPool, id: ApiKeyId) -> Result<Option<KeyRow>> {
    sqlx::query(
        "update api_keys set revoked_at = coalesce(revoked_at, now()) where api_key_id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    find(pool, id).await
}

/// Number of keys that can still authenticate.
pub async fn count_active(db: impl PgExecutor<'_>) -> Result<i64> {
    let n = sqlx::query_scalar("select count(*) from api_keys where revoked_at is null")
        .fetch_one(db)
        .await?;
    Ok(n)
}
