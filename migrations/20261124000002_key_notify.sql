-- Any change to a key (revoked by the API, the CLI or by hand) tells every API process to
-- drop its cache of authenticated keys.
create function hotplex_keys_changed() returns trigger language plpgsql as $$
begin
    perform pg_notify('hotplex_keys', '');
    return null;
end $$;

create trigger api_keys_changed
    after update or delete on api_keys
    for each statement execute function hotplex_keys_changed();
