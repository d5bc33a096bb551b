-- OpenCode's conversation, mirrored after every turn so that a worker on another host
-- (another HOME, so another opencode.db) can replay it into its own server and resume the
-- same OpenCode session with full context (issue 6: session migration). OpenCode rewrites
-- messages after the fact (summaries and titles land after the turn reports idle), so the
-- mirror is kept per message and upserted, not appended like Claude Code's transcript.

-- The OpenCode session a hotplex session's mirror belongs to.
create table opencode_sessions (
    session_id      uuid primary key references sessions on delete cascade,
    -- OpenCode's session id (`ses_…`, the same as `sessions.agent_ref` when current).
    agent_ref       text not null,
    -- The Session object as `GET /session/{id}` returned it.
    info            jsonb not null,
    -- The user message of the last turn mirrored: the next mirror reads again from there,
    -- since OpenCode still updates a turn's messages after it has ended.
    turn_message_id text collate "C",
    updated_at      timestamptz not null default now()
);

-- One row per message, `{info, parts}` as `GET /session/{id}/message` returns it. OpenCode
-- message ids ascend with time; "C" collation makes the database order them as OpenCode
-- does (byte order), which the mirror's "from this message on" replacement relies on.
create table opencode_messages (
    session_id uuid not null references opencode_sessions on delete cascade,
    message_id text collate "C" not null,
    body       jsonb not null,
    primary key (session_id, message_id)
);
