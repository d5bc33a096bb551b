//! Tenants: lookup by name, creation, listing.

use chrono::{DateTime, Utc};
use sqlx::{PgExecutor, PgPool};

use super::Result;
use crate::domain::{TenantId, TenantName};

/// The tenant created by the first migration.
pub const DEFAULT_TENANT_ID: TenantId = TenantId(uuid::Uuid::from_u128(1));
pub const DEFAULT_TENANT: &str = "default";

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct TenantRow {
    pub tenant_id: TenantId,
    pub name: String,
    pub created_at: DateTime<Utc>,
}

pub async fn find_by_name(db: impl PgExecutor<'_>, name: &TenantName) -> Result<Option<TenantRow>> {
    let row = sqlx::query_as::<_, TenantRow>(
        "select tenant_id, name, created_at from tenants where name = $1",
    )
    .bind(name.as_str())
    .fetch_optional(db)
    .await?;
    Ok(row)
}

pub async fn find(db: impl PgExecutor<'_>, id: TenantId) -> Result<Option<TenantRow>> {
    let row = sqlx::query_as::<_, TenantRow>(
        "select tenant_id, name, created_at from tenants where tenant_id = $1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// Creates the tenant; `None` when the name is taken.
pub async fn create(db: impl PgExecutor<'_>, name: &TenantName) -> Result<Option<TenantRow>> {
    let row = sqlx::query_as::<_, TenantRow>(
        "insert into tenants (tenant_id, name) values ($1, $2)
         on conflict (name) do nothing
         returning tenant_id, name, created_at",
    )
    .bind(TenantId::new_random())
    .bind(name.as_str())
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// The tenant of that name, created if missing.
pub async fn get_or_create(pool: &PgPool, name: &TenantName) -> Result<TenantRow> {
    if let Some(row) = create(pool, name).await? {
        return Ok(row);
    }
    find_by_name(pool, name)
        .await?
        .ok_or_else(|| super::Error::Corrupt(format!("tenant {} vanished", name.as_str())))
}

pub async fn list(db: impl PgExecutor<'_>) -> Result<Vec<TenantRow>> {
    let rows = sqlx::query_as::<_, TenantRow>(
        "select tenant_id, name, created_at from tenants order by name",
    )
    .fetch_all(db)
    .await?;
    Ok(rows)
}
