-- The OpenCode-compatible API (docs/opencode-compat.md) names sessions, messages and parts
-- with OpenCode's ids, and scopes sessions by a client directory.

-- `<prefix>_` + 12 hex + 14 base62, the hex being the low 48 bits of ms × 4096 + a counter.
-- Session ids invert the 48 bits so that newer sessions sort first, as OpenCode's do.
-- (Message, part and event ids are derived from stored rows in Rust: src/opencode/ids.rs.)
create function opencode_id(prefix text, descending boolean) returns text
language plpgsql volatile as $$
declare
    chars constant text := '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz';
    v bigint := ((floor(extract(epoch from clock_timestamp()) * 1000))::bigint * 4096
                 + floor(random() * 4096)::bigint) & x'ffffffffffff'::bigint;
    r text := '';
begin
    if descending then
        v := (~v) & x'ffffffffffff'::bigint;
    end if;
    for i in 1..14 loop
        r := r || substr(chars, 1 + floor(random() * 62)::int, 1);
    end loop;
    return prefix || '_' || lpad(to_hex(v), 12, '0') || r;
end $$;

alter table sessions
    -- The id OpenCode clients know the session by (every session has one).
    add column oc_id text not null default opencode_id('ses', true),
    -- A human title (OpenCode shows it; the native API accepts it too).
    add column title text,
    -- The client directory the session belongs to (`?directory=` / `x-opencode-directory`);
    -- null means the server's default directory.
    add column directory text,
    -- The id the agent's own store knows the conversation by, for agents that name it
    -- themselves (OpenCode's `ses_…` in its server); `cli_session_id` is Claude Code's.
    add column agent_ref text;
create unique index sessions_oc_id_idx on sessions (oc_id);
create index sessions_tenant_directory_idx on sessions (tenant_id, directory, created_at desc)
    where status <> 'deleted';
