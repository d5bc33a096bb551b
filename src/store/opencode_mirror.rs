//! The OpenCode conversation mirror (session migration): the session info and messages of a
//! session's OpenCode conversation, written by the session's owner after each turn (fenced
//! by its lease) and read by the next owner to replay into its own OpenCode server.

use serde_json::Value;
use sqlx::{PgExecutor, PgPool};

use super::Result;
use super::events::Fence;
use crate::domain::SessionId;

/// What a worker needs to decide whether its server's copy of the conversation is current.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Head {
    /// OpenCode's session id the mirror belongs to.
    pub agent_ref: String,
    /// The user message of the last turn mirrored.
    pub turn_message_id: Option<String>,
    /// The newest mirrored message.
    pub last_message_id: Option<String>,
}

/// The whole mirrored conversation.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub info: Value,
    /// `{info, parts}` per message, oldest first.
    pub messages: Vec<Value>,
}

/// What one turn changed, as the owner writes it.
#[derive(Debug, Clone, Copy)]
pub struct TurnMirror<'a> {
    pub agent_ref: &'a str,
    pub info: &'a Value,
    /// The mirrored messages from this id on are replaced by `messages`; `None`: all are.
    pub from: Option<&'a str>,
    /// `(message id, {info, parts})`.
    pub messages: &'a [(String, Value)],
    /// The user message of the turn mirrored.
    pub turn_message_id: &'a str,
}

/// The mirror's head, if the session has one.
pub async fn head(db: impl PgExecutor<'_>, session: SessionId) -> Result<Option<Head>> {
    let head = sqlx::query_as::<_, Head>(
        "select s.agent_ref, s.turn_message_id,
                (select max(m.message_id) from opencode_messages m
                  where m.session_id = s.session_id) as last_message_id
           from opencode_sessions s where s.session_id = $1",
    )
    .bind(session)
    .fetch_optional(db)
    .await?;
    Ok(head)
}

/// The mirrored conversation `agent_ref` of a session, if that is the one mirrored.
pub async fn snapshot(
    pool: &PgPool,
    session: SessionId,
    agent_ref: &str,
) -> Result<Option<Snapshot>> {
    // One snapshot: a mirror written between the two reads must not mix in.
    let mut tx = super::begin(pool).await?;
    sqlx::query("set transaction isolation level repeatable read, read only")
        .execute(&mut *tx)
        .await?;
    let info: Option<Value> = sqlx::query_scalar(
        "select info from opencode_sessions where session_id = $1 and agent_ref = $2",
    )
    .bind(session)
    .bind(agent_ref)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(info) = info else {
        return Ok(None);
    };
    let messages: Vec<Value> = sqlx::query_scalar(
        "select body from opencode_messages where session_id = $1 order by message_id",
    )
    .bind(session)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Some(Snapshot { info, messages }))
}

/// Writes what a turn changed, under the owner's lease; `false` (and nothing written) when
/// the lease was lost. A mirror of another OpenCode session is replaced whole.
pub async fn write_turn(
    pool: &PgPool,
    session: SessionId,
    fence: Fence,
    turn: TurnMirror<'_>,
) -> Result<bool> {
    let mut tx = super::begin(pool).await?;
    // Holding the lease row for the transaction: a takeover (which updates it) waits until
    // this commits, so the next owner never reads a mirror its predecessor is still writing.
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
        tx.rollback().await?;
        return Ok(false);
    }
    let ids: Vec<&str> = turn.messages.iter().map(|(id, _)| id.as_str()).collect();
    let bodies: Vec<&Value> = turn.messages.iter().map(|(_, body)| body).collect();
    // Messages gone from the server (or of another conversation) go from the mirror too.
    sqlx::query(
        "delete from opencode_messages m
          where m.session_id = $1
            and ($2::text is null or m.message_id >= $2
                 or not exists (select 1 from opencode_sessions s
                                 where s.session_id = $1 and s.agent_ref = $3))
            and m.message_id <> all($4::text[])",
    )
    .bind(session)
    .bind(turn.from)
    .bind(turn.agent_ref)
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into opencode_sessions (session_id, agent_ref, info, turn_message_id)
         values ($1, $2, $3, $4)
         on conflict (session_id) do update
            set agent_ref = excluded.agent_ref, info = excluded.info,
                turn_message_id = excluded.turn_message_id, updated_at = now()",
    )
    .bind(session)
    .bind(turn.agent_ref)
    .bind(turn.info)
    .bind(turn.turn_message_id)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into opencode_messages (session_id, message_id, body)
         select $1, m.id, m.body from unnest($2::text[], $3::jsonb[]) as m(id, body)
         on conflict (session_id, message_id) do update set body = excluded.body
          where opencode_messages.body is distinct from excluded.body",
    )
    .bind(session)
    .bind(&ids)
    .bind(&bodies)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}
