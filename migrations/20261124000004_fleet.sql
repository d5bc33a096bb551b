-- The agent's own conversation state, mirrored after every turn so that a worker on another
-- host (another HOME) can restore it and resume the conversation (issue 6: session
-- migration). For Claude Code: the transcript JSONL of `cli_session_id`, which the CLI only
-- appends to, so each turn adds one chunk (its new bytes) rather than rewriting the file.
create table agent_state_chunks (
    session_id     uuid not null references sessions on delete cascade,
    cli_session_id uuid not null,
    byte_offset    bigint not null,
    content        bytea not null,
    created_at     timestamptz not null default now(),
    primary key (session_id, cli_session_id, byte_offset)
);
