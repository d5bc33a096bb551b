//! The prompt policy: every prompt passes the WAF before it can become a turn, on the
//! native API and the OpenCode one alike. A refusal is answered 422 `blocked_by_policy`
//! naming the rule, and recorded twice in one transaction: a `security.blocked` event on
//! the session (for its clients) and an audit row (for operators). The check runs before
//! anything is enqueued, so no accepted prompt is ever dropped.

use axum::http::StatusCode;

use super::error::ApiError;
use crate::app::AppState;
use crate::auth::Principal;
use crate::domain::SessionId;
use crate::events::{EventBody, NewEvent};
use crate::store::audit::{self, AuditEntry};
use crate::store::{self, events, sessions};
use crate::waf::{Context, Finding, Verdict};

/// Checks a prompt for a session of the caller; `Err` (422, or 404 for a session that is
/// not the caller's) when it may not run.
pub(crate) async fn screen_prompt(
    state: &AppState,
    principal: &Principal,
    session_id: SessionId,
    prompt: &str,
) -> Result<(), ApiError> {
    // Fail closed: rules that did not compile refuse every prompt.
    let waf = state
        .waf
        .clone()
        .ok_or_else(|| ApiError::internal("the WAF rules did not compile"))?;
    if !waf.enabled() {
        return Ok(());
    }
    // A long prompt is milliseconds of regex work: off the async workers.
    let text = prompt.to_owned();
    let verdict = tokio::task::spawn_blocking(move || waf.check(&text, Context::Prompt))
        .await
        .map_err(ApiError::internal)?;
    let finding = match verdict {
        Verdict::Allowed { notes } => {
            // Rule ids only: the fragments are the user's text.
            for note in notes {
                tracing::info!(session.id = %session_id, waf.rule = %note.rule_id,
                    waf.level = note.level.as_str(), waf.allowed_by = note.allowed_by.as_deref(),
                    "prompt matched a WAF rule that does not block");
            }
            return Ok(());
        }
        Verdict::Blocked(finding) => finding,
    };
    record(state, principal, session_id, &finding).await?;
    tracing::warn!(session.id = %session_id, waf.rule = %finding.rule_id,
        waf.level = finding.level.as_str(), waf.category = finding.category.as_str(),
        "prompt blocked by the WAF");
    Err(ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "blocked_by_policy",
        format!("prompt blocked by policy: {finding}"),
    ))
}

/// The block's event and audit row, together.
async fn record(
    state: &AppState,
    principal: &Principal,
    session_id: SessionId,
    finding: &Finding,
) -> Result<(), ApiError> {
    let mut tx = store::begin(&state.pool).await?;
    // Only the caller's own sessions get the event (and learn the verdict).
    sessions::get(&mut *tx, principal.tenant_id, session_id)
        .await?
        .ok_or_else(|| ApiError::not_found("session not found"))?;
    let event = NewEvent::session(EventBody::SecurityBlocked {
        context: "prompt".into(),
        rule_id: finding.rule_id.clone(),
        level: finding.level,
        category: finding.category,
        reason: finding.reason.clone(),
        fragment: finding.fragment.clone(),
    });
    events::append(&mut tx, session_id, None, &[event]).await?;
    let actor = principal.actor();
    let target = session_id.to_string();
    let entry = AuditEntry {
        tenant_id: Some(principal.tenant_id),
        actor: &actor,
        action: "prompt.blocked",
        target_type: "session",
        target_id: &target,
        details: serde_json::json!({
            "rule_id": finding.rule_id,
            "level": finding.level,
            "category": finding.category,
            "fragment": finding.fragment,
            "decoded": finding.decoded,
        }),
    };
    audit::record(&mut *tx, entry).await?;
    tx.commit().await.map_err(store::Error::from)?;
    Ok(())
}
