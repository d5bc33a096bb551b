//! The audit trail: who did what to which object.

use serde_json::Value;
use sqlx::PgExecutor;

use super::Result;
use crate::domain::TenantId;

/// One audit record.
#[derive(Debug, Clone)]
pub struct AuditEntry<'a> {
    pub tenant_id: Option<TenantId>,
    /// `key:<api_key_id>`, `jwt:<sub>`, `cli`, or `system`.
    pub actor: &'a str,
    /// Dotted verb, e.g. `session.delete`, `key.revoke`.
    pub action: &'a str,
    pub target_type: &'a str,
    pub target_id: &'a str,
    pub details: Value,
}

pub async fn record(db: impl PgExecutor<'_>, entry: AuditEntry<'_>) -> Result<()> {
    sqlx::query(
        "insert into audit_events (tenant_id, actor, action, target_type, target_id, details)
         values ($1, $2, $3, $4, $5, $6)",
    )
    .bind(entry.tenant_id)
    .bind(entry.actor)
    .bind(entry.action)
    .bind(entry.target_type)
    .bind(entry.target_id)
    .bind(entry.details)
    .execute(db)
    .await?;
    Ok(())
}
