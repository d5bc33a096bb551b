//! Sessions: creation (idempotent for derived ids), lookup, keyset listing, soft delete.
//! Every query is scoped by tenant: a session of another tenant does not exist here.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::types::Json;
use sqlx::{AssertSqlSafe, PgExecutor, PgPool};

use super::Result;
use crate::domain::{PermissionMode, Provider, SessionId, SessionStatus, TenantId};
use crate::events::{EventBody, NewEvent};

/// Agent settings kept as one jsonb column, so new knobs need no migration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SessionOptions {
    pub system_prompt: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub permission_mode: PermissionMode,
    /// The agent persona of OpenCode sessions (`build`, `plan`, or one of its config).
    pub agent: Option<String>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct SessionRow {
    pub session_id: SessionId,
    pub tenant_id: TenantId,
    pub external_id: Option<String>,
    pub namespace: Option<String>,
    pub provider: String,
    pub work_dir: Option<String>,
    pub model: Option<String>,
    pub options: Json<SessionOptions>,
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_active_at: DateTime<Utc>,
    /// The id OpenCode clients know the session by (`ses_…`).
    pub oc_id: String,
    pub title: Option<String>,
    /// The client directory of the OpenCode API; `None` is the server's default.
    pub directory: Option<String>,
    pub last_event_seq: i64,
}

impl SessionRow {
    pub fn provider(&self) -> Result<Provider> {
        self.provider
            .parse()
            .map_err(|_| super::Error::Corrupt(format!("session provider {:?}", self.provider)))
    }

    pub fn status(&self) -> Result<SessionStatus> {
        self.status
            .parse()
            .map_err(|_| super::Error::Corrupt(format!("session status {:?}", self.status)))
    }
}

const COLUMNS: &str = "session_id, tenant_id, external_id, namespace, provider, work_dir, model,
    options, status, created_at, updated_at, last_active_at, oc_id, title, directory, last_event_seq";

/// What a new session is made of.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub session_id: SessionId,
    pub tenant_id: TenantId,
    pub external_id: Option<String>,
    pub namespace: Option<String>,
    pub provider: Provider,
    pub work_dir: Option<String>,
    pub model: Option<String>,
    pub options: SessionOptions,
    pub title: Option<String>,
    pub directory: Option<String>,
}

/// How a create request ended.
#[derive(Debug)]
pub enum Created {
    /// A new session (or a deleted one brought back under the same derived id).
    New(SessionRow),
    /// The live session with that id already existed: returned unchanged.
    Existing(SessionRow),
    /// The id belongs to another tenant.
    Conflict,
}

/// Creates the session (and its `session.created` event), or finds it.
pub async fn create(pool: &PgPool, new: &NewSession) -> Result<Created> {
    let mut tx = super::begin(pool).await?;
    let inserted = sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
        "insert into sessions (session_id, tenant_id, external_id, namespace, provider, work_dir, model,
                               options, title, directory)
         values ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
         on conflict (session_id) do nothing
         returning {COLUMNS}"
    )))
    .bind(new.session_id)
    .bind(new.tenant_id)
    .bind(&new.external_id)
    .bind(&new.namespace)
    .bind(new.provider.as_str())
    .bind(&new.work_dir)
    .bind(&new.model)
    .bind(Json(&new.options))
    .bind(&new.title)
    .bind(&new.directory)
    .fetch_optional(&mut *tx)
    .await?;

    // The id exists. A deleted session of the same tenant comes back as a new incarnation
    // (fresh settings, fresh agent context); its event seq continues, so replay stays sane.
    let row = match inserted {
        Some(row) => Some(row),
        None => {
            sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
                "update sessions
                    set provider = $3, work_dir = $4, model = $5, options = $6, status = 'idle',
                        title = $7, directory = $8, cli_session_id = null, agent_ref = null, deleted_at = null,
                        updated_at = now(), last_active_at = now()
                  where session_id = $1 and tenant_id = $2 and status = 'deleted'
                  returning {COLUMNS}"
            )))
            .bind(new.session_id)
            .bind(new.tenant_id)
            .bind(new.provider.as_str())
            .bind(&new.work_dir)
            .bind(&new.model)
            .bind(Json(&new.options))
            .bind(&new.title)
            .bind(&new.directory)
            .fetch_optional(&mut *tx)
            .await?
        }
    };
    if let Some(mut row) = row {
        let created = NewEvent::session(EventBody::SessionCreated {});
        row.last_event_seq =
            super::events::append(&mut tx, row.session_id, None, &[created]).await?;
        tx.commit().await?;
        return Ok(Created::New(row));
    }
    drop(tx);
    match get(pool, new.tenant_id, new.session_id).await? {
        Some(row) => Ok(Created::Existing(row)),
        None => Ok(Created::Conflict),
    }
}

/// A live session of the tenant.
pub async fn get(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
    id: SessionId,
) -> Result<Option<SessionRow>> {
    let row = sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
        "select {COLUMNS} from sessions
          where session_id = $1 and tenant_id = $2 and status <> 'deleted'"
    )))
    .bind(id)
    .bind(tenant)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// Position after which a page starts: the last row of the previous page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cursor {
    pub created_at: DateTime<Utc>,
    pub session_id: SessionId,
}

#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub status: Option<SessionStatus>,
    pub provider: Option<Provider>,
    pub after: Option<Cursor>,
}

/// A page of the tenant's live sessions, newest first; the cursor is set when more follow.
pub async fn list(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
    filter: &ListFilter,
    limit: u32,
) -> Result<(Vec<SessionRow>, Option<Cursor>)> {
    let mut rows = sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
        "select {COLUMNS} from sessions
          where tenant_id = $1 and status <> 'deleted'
            and ($2::text is null or status = $2)
            and ($3::text is null or provider = $3)
            and ($4::timestamptz is null or (created_at, session_id) < ($4, $5))
          order by created_at desc, session_id desc
          limit $6"
    )))
    .bind(tenant)
    .bind(filter.status.map(SessionStatus::as_str))
    .bind(filter.provider.map(Provider::as_str))
    .bind(filter.after.map(|c| c.created_at))
    .bind(filter.after.map(|c| c.session_id))
    .bind(i64::from(limit) + 1)
    .fetch_all(db)
    .await?;
    let next = if rows.len() > limit as usize {
        rows.truncate(limit as usize);
        rows.last().map(|r| Cursor {
            created_at: r.created_at,
            session_id: r.session_id,
        })
    } else {
        None
    };
    Ok((rows, next))
}

/// Marks the session deleted; `false` when the tenant has no such live session.
pub async fn delete(db: impl PgExecutor<'_>, tenant: TenantId, id: SessionId) -> Result<bool> {
    let n = sqlx::query(
        "update sessions set status = 'deleted', deleted_at = now(), updated_at = now()
          where session_id = $1 and tenant_id = $2 and status <> 'deleted'",
    )
    .bind(id)
    .bind(tenant)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// The id the agent CLI knows the session's conversation by, if one was started.
pub async fn cli_session_id(db: impl PgExecutor<'_>, id: SessionId) -> Result<Option<uuid::Uuid>> {
    let v: Option<Option<uuid::Uuid>> =
        sqlx::query_scalar("select cli_session_id from sessions where session_id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(v.flatten())
}

pub async fn set_cli_session_id(
    db: impl PgExecutor<'_>,
    id: SessionId,
    cli: uuid::Uuid,
) -> Result<()> {
    sqlx::query("update sessions set cli_session_id = $2 where session_id = $1")
        .bind(id)
        .bind(cli)
        .execute(db)
        .await?;
    Ok(())
}

/// A session that never ran takes over a warm spare's work dir (a name under the work root)
/// and conversation, for good: every later process resumes there. `false` when the session
/// has a work dir or a conversation already (a spare cannot serve it).
pub async fn adopt_spare(
    db: impl PgExecutor<'_>,
    id: SessionId,
    work_dir: &str,
    cli: uuid::Uuid,
) -> Result<bool> {
    let n = sqlx::query(
        "update sessions set work_dir = $2, cli_session_id = $3
          where session_id = $1 and work_dir is null and cli_session_id is null",
    )
    .bind(id)
    .bind(work_dir)
    .bind(cli)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n == 1)
}

/// The agent's own id for the conversation (OpenCode's session id), if one was made.
pub async fn agent_ref(db: impl PgExecutor<'_>, id: SessionId) -> Result<Option<String>> {
    let v: Option<Option<String>> =
        sqlx::query_scalar("select agent_ref from sessions where session_id = $1")
            .bind(id)
            .fetch_optional(db)
            .await?;
    Ok(v.flatten())
}

pub async fn set_agent_ref(db: impl PgExecutor<'_>, id: SessionId, agent_ref: &str) -> Result<()> {
    sqlx::query("update sessions set agent_ref = $2 where session_id = $1")
        .bind(id)
        .bind(agent_ref)
        .execute(db)
        .await?;
    Ok(())
}

/// A session by id, whatever its tenant (for workers, which act for every tenant).
pub async fn get_any(db: impl PgExecutor<'_>, id: SessionId) -> Result<Option<SessionRow>> {
    let row = sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
        "select {COLUMNS} from sessions where session_id = $1"
    )))
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// A live session of the tenant by its OpenCode id.
pub async fn get_by_oc_id(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
    oc_id: &str,
) -> Result<Option<SessionRow>> {
    let row = sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
        "select {COLUMNS} from sessions
          where oc_id = $1 and tenant_id = $2 and status <> 'deleted'"
    )))
    .bind(oc_id)
    .bind(tenant)
    .fetch_optional(db)
    .await?;
    Ok(row)
}

/// Which sessions of an OpenCode listing.
#[derive(Debug, Clone, Default)]
pub struct DirectoryFilter<'a> {
    /// Only sessions of this directory; `None` for every directory.
    pub directory: Option<&'a str>,
    /// The directory of sessions that have none (the server's default).
    pub default_directory: &'a str,
    /// Only titles containing this (case-insensitive).
    pub search: Option<&'a str>,
    /// Only sessions updated at or after this.
    pub since: Option<DateTime<Utc>>,
    /// Only busy sessions.
    pub busy_only: bool,
}

/// The tenant's live sessions of a directory in OpenCode id order (newest first).
pub async fn list_in_directory(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
    filter: &DirectoryFilter<'_>,
    limit: i64,
) -> Result<Vec<SessionRow>> {
    let rows = sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
        "select {COLUMNS} from sessions
          where tenant_id = $1 and status <> 'deleted'
            and ($2::text is null or coalesce(directory, $3) = $2)
            and ($4::text is null or title ilike '%' || $4 || '%')
            and ($5::timestamptz is null or updated_at >= $5)
            and (not $6 or status = 'busy')
          order by oc_id
          limit $7"
    )))
    .bind(tenant)
    .bind(filter.directory)
    .bind(filter.default_directory)
    .bind(filter.search)
    .bind(filter.since)
    .bind(filter.busy_only)
    .bind(limit)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// Every live session of the tenant with its last event seq: where a stream that follows
/// them all starts.
pub async fn event_positions(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
) -> Result<Vec<(SessionId, i64)>> {
    let rows = sqlx::query_as(
        "select session_id, last_event_seq from sessions
          where tenant_id = $1 and status <> 'deleted'",
    )
    .bind(tenant)
    .fetch_all(db)
    .await?;
    Ok(rows)
}

/// Sets the title (and records `session.updated`); `None` when there is no such session.
pub async fn set_title(
    pool: &PgPool,
    tenant: TenantId,
    id: SessionId,
    title: Option<&str>,
) -> Result<Option<SessionRow>> {
    let mut tx = super::begin(pool).await?;
    let row = sqlx::query_as::<_, SessionRow>(AssertSqlSafe(format!(
        "update sessions set title = $3, updated_at = now()
          where session_id = $1 and tenant_id = $2 and status <> 'deleted'
          returning {COLUMNS}"
    )))
    .bind(id)
    .bind(tenant)
    .bind(title)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(mut row) = row else {
        return Ok(None);
    };
    let updated = NewEvent::session(EventBody::SessionUpdated {});
    row.last_event_seq = super::events::append(&mut tx, id, None, &[updated]).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// Sets the provider and model of a session that has not run a turn yet (an OpenCode
/// client picks its model with the first prompt); `false` when it already has turns.
pub async fn set_model_before_first_turn(
    db: impl PgExecutor<'_>,
    tenant: TenantId,
    id: SessionId,
    provider: Provider,
    model: Option<&str>,
) -> Result<bool> {
    let n = sqlx::query(
        "update sessions set provider = $3, model = $4, updated_at = now()
          where session_id = $1 and tenant_id = $2 and status <> 'deleted' and last_turn_seq = 0",
    )
    .bind(id)
    .bind(tenant)
    .bind(provider.as_str())
    .bind(model)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// How many bytes of the conversation `cli_session_id` are mirrored.
pub async fn mirrored_len(
    db: impl PgExecutor<'_>,
    session: SessionId,
    cli_session_id: uuid::Uuid,
) -> Result<i64> {
    let n: Option<i64> = sqlx::query_scalar(
        "select max(byte_offset + length(content)) from agent_state_chunks
          where session_id = $1 and cli_session_id = $2",
    )
    .bind(session)
    .bind(cli_session_id)
    .fetch_one(db)
    .await?;
    Ok(n.unwrap_or(0))
}

/// Mirrors `content`, the bytes of the conversation from `offset` on (fenced: only the
/// session's owner writes). At offset 0 it replaces whatever was mirrored before (a new
/// conversation, or a file that was rewritten). `false` when the lease was lost.
pub async fn append_agent_state(
    conn: &mut sqlx::PgConnection,
    session: SessionId,
    fence: super::events::Fence,
    cli_session_id: uuid::Uuid,
    offset: i64,
    content: &[u8],
) -> Result<bool> {
    if offset > 0 {
        // The common case, one statement: the turn's new bytes.
        return insert_chunk(&mut *conn, session, fence, cli_session_id, offset, content).await;
    }
    use sqlx::Connection as _;
    let mut tx = conn.begin().await?;
    // A separate statement: an insert in the same statement would still see the rows the
    // delete removes, and its ON CONFLICT would skip.
    sqlx::query("delete from agent_state_chunks where session_id = $1")
        .bind(session)
        .execute(&mut *tx)
        .await?;
    if !insert_chunk(&mut *tx, session, fence, cli_session_id, offset, content).await? {
        // Fenced out: keep what was mirrored.
        tx.rollback().await?;
        return Ok(false);
    }
    tx.commit().await?;
    Ok(true)
}

/// Folds the mirror of conversation `cli_session_id` into one chunk once it has more than
/// `max_chunks` (fenced like every mirror write); `true` when it did. Restoring then reads
/// one row, and the table does not grow a row per turn forever.
pub async fn compact_agent_state(
    pool: &PgPool,
    session: SessionId,
    fence: super::events::Fence,
    cli_session_id: uuid::Uuid,
    max_chunks: i64,
) -> Result<bool> {
    let chunks: i64 = sqlx::query_scalar(
        "select count(*) from agent_state_chunks where session_id = $1 and cli_session_id = $2",
    )
    .bind(session)
    .bind(cli_session_id)
    .fetch_one(pool)
    .await?;
    if chunks <= max_chunks {
        return Ok(false);
    }
    let mut tx = super::begin(pool).await?;
    // The lease row held for the transaction: a takeover waits until the fold is done.
    let owner: Option<i32> = sqlx::query_scalar(
        "select 1 from session_leases
          where session_id = $1 and worker_id = $2 and generation = $3 for share",
    )
    .bind(session)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .fetch_optional(&mut *tx)
    .await?;
    if owner.is_none() {
        return Ok(false);
    }
    let Some(whole) = agent_state(&mut *tx, session, cli_session_id).await? else {
        // Not contiguous: leave it as it is (a restore would not use it either).
        return Ok(false);
    };
    sqlx::query(
        "delete from agent_state_chunks
          where session_id = $1 and cli_session_id = $2 and byte_offset > 0",
    )
    .bind(session)
    .bind(cli_session_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "update agent_state_chunks set content = $3
          where session_id = $1 and cli_session_id = $2 and byte_offset = 0",
    )
    .bind(session)
    .bind(cli_session_id)
    .bind(&whole)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Inserts one chunk under the owner's lease; `false` when the lease was lost.
async fn insert_chunk(
    db: impl PgExecutor<'_>,
    session: SessionId,
    fence: super::events::Fence,
    cli_session_id: uuid::Uuid,
    offset: i64,
    content: &[u8],
) -> Result<bool> {
    let n = sqlx::query(
        "insert into agent_state_chunks (session_id, cli_session_id, byte_offset, content)
         select $1, $4, $5, $6
          where exists (select 1 from session_leases l
                         where l.session_id = $1 and l.worker_id = $2 and l.generation = $3)
         on conflict do nothing",
    )
    .bind(session)
    .bind(fence.worker_id)
    .bind(fence.generation)
    .bind(cli_session_id)
    .bind(offset)
    .bind(content)
    .execute(db)
    .await?
    .rows_affected();
    Ok(n > 0)
}

/// The mirrored conversation `cli_session_id` of a session, if one is mirrored whole (its
/// chunks follow each other without a gap).
pub async fn agent_state(
    db: impl PgExecutor<'_>,
    session: SessionId,
    cli_session_id: uuid::Uuid,
) -> Result<Option<Vec<u8>>> {
    let chunks: Vec<(i64, Vec<u8>)> = sqlx::query_as(
        "select byte_offset, content from agent_state_chunks
          where session_id = $1 and cli_session_id = $2 order by byte_offset",
    )
    .bind(session)
    .bind(cli_session_id)
    .fetch_all(db)
    .await?;
    if chunks.is_empty() {
        return Ok(None);
    }
    let mut whole = Vec::new();
    for (offset, bytes) in chunks {
        if offset != whole.len() as i64 {
            return Ok(None);
        }
        whole.extend_from_slice(&bytes);
    }
    Ok(Some(whole))
}
