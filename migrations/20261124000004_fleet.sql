-- The agent's own conversation state, mirrored after every turn so that a worker on another
-- host (another HOME) can restore it and resume the conversation (issue 6: session
-- migration). For Claude Code: the transcript JSONL of `cli_session_id`.
create table agent_state (
    session_id     uuid primary key references sessions on delete cascade,
    provider       text not null,
    cli_session_id uuid,
    content        bytea not null,
    updated_at     timestamptz not null default now()
);
