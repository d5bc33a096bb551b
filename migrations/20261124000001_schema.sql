-- The whole hotplex schema. Later features add columns and tables; they should never need
-- to rewrite these. Every id that reaches the API is a uuid; timestamps are timestamptz.

-- Tenants are the unit of isolation: every key, session and job belongs to one.
create table tenants (
    tenant_id  uuid primary key,
    name       text not null unique check (name ~ '^[a-z0-9][a-z0-9._-]{0,62}$'),
    created_at timestamptz not null default now()
);

-- The tenant that keys land in unless told otherwise; its id is fixed so that code and
-- fixtures can name it.
insert into tenants (tenant_id, name) values ('00000000-0000-0000-0000-000000000001', 'default');

-- API keys are stored as SHA-256 of the secret (they are long random strings, so a slow
-- hash buys nothing); `key_prefix` is the non-secret head shown in listings.
create table api_keys (
    api_key_id   uuid primary key,
    tenant_id    uuid not null references tenants on delete cascade,
    name         text not null,
    role         text not null check (role in ('admin', 'user')),
    key_prefix   text not null,
    key_hash     bytea not null,
    created_at   timestamptz not null default now(),
    last_used_at timestamptz,
    revoked_at   timestamptz,
    constraint api_keys_key_hash_key unique (key_hash)
);
create index api_keys_tenant_idx on api_keys (tenant_id, created_at);

-- Sessions. `session_id` is random (v4) or derived from (namespace, external_id) (v5).
-- A deleted session keeps its row (history, usage) with status 'deleted'.
create table sessions (
    session_id     uuid primary key,
    tenant_id      uuid not null references tenants on delete cascade,
    external_id    text,
    namespace      text,
    provider       text not null check (provider in ('claude-code', 'opencode')),
    work_dir       text,
    model          text,
    -- system_prompt, allowed_tools, disallowed_tools, permission_mode, …
    options        jsonb not null default '{}',
    status         text not null default 'idle' check (status in ('idle', 'busy', 'deleted')),
    -- The id the agent CLI knows the conversation by (differs from session_id after a reset).
    cli_session_id uuid,
    -- Per-session counters, advanced under the row lock by whoever appends.
    last_event_seq bigint not null default 0,
    last_turn_seq  bigint not null default 0,
    created_at     timestamptz not null default now(),
    updated_at     timestamptz not null default now(),
    last_active_at timestamptz not null default now(),
    deleted_at     timestamptz
);
-- The list endpoint: a tenant's live sessions, newest first, keyset-paginated.
create index sessions_tenant_list_idx on sessions (tenant_id, created_at desc, session_id desc)
    where status <> 'deleted';
create index sessions_tenant_external_idx on sessions (tenant_id, namespace, external_id)
    where external_id is not null;
-- Idle reaping and the ops views look at recently active sessions.
create index sessions_last_active_idx on sessions (last_active_at) where status <> 'deleted';

-- Worker processes of the fleet; a row per process start.
create table workers (
    worker_id    uuid primary key,
    host         text not null,
    pid          integer,
    version      text,
    capacity     integer not null default 0,
    started_at   timestamptz not null default now(),
    heartbeat_at timestamptz not null default now(),
    draining     boolean not null default false,
    stopped_at   timestamptz
);
create index workers_live_idx on workers (heartbeat_at) where stopped_at is null;

-- Which worker owns a session. Claims bump `generation`; writes carry it (fencing).
create table session_leases (
    session_id  uuid primary key references sessions on delete cascade,
    worker_id   uuid not null references workers on delete cascade,
    generation  bigint not null,
    acquired_at timestamptz not null default now(),
    expires_at  timestamptz not null,
    -- The warm agent process, while one runs (shown by GET /v1/sessions/{id}).
    pid                integer,
    process_started_at timestamptz
);
create index session_leases_worker_idx on session_leases (worker_id);
create index session_leases_expiry_idx on session_leases (expires_at);

-- One prompt and its outcome. `seq` orders a session's turns; they run one at a time.
create table turns (
    turn_id         uuid primary key,
    session_id      uuid not null references sessions on delete cascade,
    tenant_id       uuid not null references tenants on delete cascade,
    seq             bigint not null,
    prompt          text not null,
    status          text not null default 'queued'
                    check (status in ('queued', 'running', 'completed', 'failed', 'interrupted')),
    idempotency_key text,
    request_hash    bytea,
    result          text,
    error           text,
    worker_id       uuid references workers on delete set null,
    lease_generation bigint,
    -- Set by POST /v1/sessions/{id}/interrupt; the owner worker acts on it.
    interrupt_requested_at timestamptz,
    created_at      timestamptz not null default now(),
    started_at      timestamptz,
    completed_at    timestamptz,
    constraint turns_session_seq_key unique (session_id, seq)
);
create unique index turns_idempotency_idx on turns (session_id, idempotency_key)
    where idempotency_key is not null;
-- The next turn to run for a session, and the ops view of stuck turns.
create index turns_pending_idx on turns (session_id, seq) where status in ('queued', 'running');
create index turns_tenant_time_idx on turns (tenant_id, created_at desc);

-- Everything a session emits, in order. NOTIFY carries only `<session_id>:<seq>`; readers
-- fetch the rows, so a lost notification costs latency, never data.
create table session_events (
    session_id uuid not null references sessions on delete cascade,
    seq        bigint not null,
    turn_id    uuid references turns on delete cascade,
    type       text not null,
    payload    jsonb not null default '{}',
    created_at timestamptz not null default now(),
    primary key (session_id, seq)
);
create index session_events_turn_idx on session_events (turn_id, seq) where turn_id is not null;

-- One notification per session and statement, carrying the highest new seq: a batch of
-- coalesced events costs one NOTIFY, and readers fetch everything up to it.
create function notify_session_events() returns trigger language plpgsql as $$
begin
    perform pg_notify('session_events', session_id::text || ':' || max(seq)::text)
       from new_rows group by session_id;
    return null;
end;
$$;
create trigger session_events_notify after insert on session_events
    referencing new table as new_rows
    for each statement execute function notify_session_events();

-- Tokens and cost of one finished turn. `cost_usd` is this turn's own cost (the CLI
-- reports running totals; the worker stores the difference).
create table turn_usage (
    turn_id            uuid primary key references turns on delete cascade,
    session_id         uuid not null references sessions on delete cascade,
    tenant_id          uuid not null references tenants on delete cascade,
    model              text,
    input_tokens       bigint not null default 0,
    output_tokens      bigint not null default 0,
    cache_read_tokens  bigint not null default 0,
    cache_write_tokens bigint not null default 0,
    cost_usd           double precision not null default 0,
    duration_ms        bigint,
    created_at         timestamptz not null default now()
);
create index turn_usage_session_idx on turn_usage (session_id);
create index turn_usage_tenant_time_idx on turn_usage (tenant_id, created_at);

-- Who did what: key management, deletions, approvals, admin actions.
create table audit_events (
    audit_event_id bigint generated always as identity primary key,
    tenant_id      uuid references tenants on delete set null,
    actor          text not null,
    action         text not null,
    target_type    text,
    target_id      text,
    details        jsonb not null default '{}',
    created_at     timestamptz not null default now()
);
create index audit_events_tenant_time_idx on audit_events (tenant_id, created_at desc);
create index audit_events_target_idx on audit_events (target_type, target_id);

-- Scheduled prompts. `schedule` is a 5- or 6-field cron expression.
create table cron_jobs (
    cron_job_id     uuid primary key,
    tenant_id       uuid not null references tenants on delete cascade,
    name            text not null,
    schedule        text not null,
    timezone        text not null default 'UTC',
    prompt          text not null,
    session_id      uuid references sessions on delete set null,
    session_options jsonb not null default '{}',
    enabled         boolean not null default true,
    timeout_secs    integer,
    max_retries     integer not null default 0,
    next_run_at     timestamptz,
    last_run_at     timestamptz,
    created_at      timestamptz not null default now(),
    updated_at      timestamptz not null default now(),
    constraint cron_jobs_tenant_name_key unique (tenant_id, name)
);
create index cron_jobs_due_idx on cron_jobs (next_run_at) where enabled;

-- One row per firing; the unique key makes a tick fire once across the whole fleet.
create table cron_runs (
    cron_run_id   uuid primary key,
    cron_job_id   uuid not null references cron_jobs on delete cascade,
    scheduled_for timestamptz not null,
    turn_id       uuid references turns on delete set null,
    status        text not null default 'pending'
                  check (status in ('pending', 'running', 'succeeded', 'failed', 'skipped')),
    attempt       integer not null default 1,
    error         text,
    output        text,
    created_at    timestamptz not null default now(),
    started_at    timestamptz,
    finished_at   timestamptz,
    constraint cron_runs_job_tick_key unique (cron_job_id, scheduled_for)
);
create index cron_runs_job_time_idx on cron_runs (cron_job_id, created_at desc);

-- Inbound webhook deliveries (Slack, Feishu), deduplicated by the platform's event id.
create table inbox (
    source      text not null,
    event_id    text not null,
    tenant_id   uuid references tenants on delete cascade,
    payload     jsonb not null default '{}',
    received_at timestamptz not null default now(),
    primary key (source, event_id)
);
create index inbox_received_idx on inbox (received_at);
