//! What each subcommand does. `main` parses the command line and calls [`run`].

use std::io::Write;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::api;
use crate::app::{AppState, AuthMode, Shutdown};
use crate::auth::{display_prefix, generate_key, hash_key};
use crate::cli::{
    Cli, Command, ConfigCommand, DataArgs, KeysCommand, ServeArgs, WafCommand, WorkerAction,
};
use crate::config::{self, ConfigFile, Loaded, Overrides, Settings};
use crate::db::{Database, EmbeddedMode};
use crate::domain::{ApiKeyId, Role, TenantName};
use crate::store::{self, keys, tenants};
use crate::telemetry;

/// Runs one command to completion.
pub async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let file = ConfigFile::from_arg(cli.config.clone());
    let mut overrides = Overrides {
        log_format: cli.log_format,
        ..Overrides::default()
    };
    match cli.command {
        Command::Config(ConfigCommand::Validate { file: path }) => {
            let file = path.map(ConfigFile::Explicit).unwrap_or(file);
            Ok(config_validate(&file, &overrides))
        }
        Command::Openapi { output } => {
            let spec = api::openapi_json();
            match output {
                Some(path) => std::fs::write(&path, spec)
                    .with_context(|| format!("writing {}", path.display()))?,
                None => print!("{spec}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Up(args) => {
            apply_serve_args(&mut overrides, &args);
            let loaded = load(&file, &overrides)?;
            up(loaded.settings).await
        }
        Command::Serve {
            args,
            insecure_no_auth,
        } => {
            apply_serve_args(&mut overrides, &args);
            let loaded = load(&file, &overrides)?;
            serve(loaded.settings, insecure_no_auth).await
        }
        Command::Worker(args) => {
            apply_data_args(&mut overrides, &args.data);
            let settings = load(&file, &overrides)?.settings;
            match args.action {
                None => worker(settings).await,
                Some(WorkerAction::Drain { id }) => drain_worker(settings, id).await,
                Some(WorkerAction::List { all }) => list_workers(settings, all).await,
            }
        }
        Command::Migrate(data) => {
            apply_data_args(&mut overrides, &data);
            let settings = load(&file, &overrides)?.settings;
            let db = Database::open(&settings, EmbeddedMode::OwnOrAttach).await?;
            db.close().await;
            println!("migrations applied");
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(cmd) => keys_command(cmd, &file, overrides).await,
        Command::Waf(WafCommand::Test { text, tool }) => {
            Ok(waf_test(&file, &overrides, &text, tool.as_deref()))
        }
        Command::FakeAgent { args } => Ok(crate::fake_agent::run(args).await),
        Command::MockAnthropic { port, delay_ms } => {
            let options = crate::mock_llm::anthropic::MockOptions {
                delay: Duration::from_millis(delay_ms),
                ..Default::default()
            };
            crate::mock_llm::anthropic::run_cli(port, options).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::MockOpenai { port, delay_ms } => {
            let options = crate::mock_llm::openai::MockOptions {
                delay: Duration::from_millis(delay_ms),
                ..Default::default()
            };
            crate::mock_llm::openai::run_cli(port, options).await?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn apply_data_args(overrides: &mut Overrides, data: &DataArgs) {
    overrides.data_dir = data.data_dir.clone();
}

fn apply_serve_args(overrides: &mut Overrides, args: &ServeArgs) {
    overrides.listen = args.listen;
    apply_data_args(overrides, &args.data);
}

/// Loads settings, starts logging, and reports what loading noticed.
fn load(file: &ConfigFile, overrides: &Overrides) -> anyhow::Result<Loaded> {
    let loaded = config::load(file, overrides)
        .map_err(|e| anyhow::anyhow!("invalid configuration:\n{e}"))?;
    telemetry::init(loaded.settings.log_format, &loaded.settings.log_level);
    if let Some(path) = &loaded.file {
        tracing::info!(file = %path.display(), "configuration loaded");
    }
    for warning in &loaded.warnings {
        tracing::warn!("{warning}");
    }
    Ok(loaded)
}

/// `hotplex waf test`: the verdict of the configured rules on one text. No database.
fn waf_test(file: &ConfigFile, overrides: &Overrides, text: &str, tool: Option<&str>) -> ExitCode {
    // Exit 1 means "blocked", so failures to get that far are 2.
    let failed = |message: String| {
        eprintln!("{message}");
        ExitCode::from(2)
    };
    let settings = match config::load(file, overrides) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("warning: {warning}");
            }
            loaded.settings
        }
        Err(e) => return failed(format!("invalid configuration:\n{e}")),
    };
    // A one-shot command with nothing else running: reading stdin may block this thread.
    let text = if text == "-" {
        let mut buf = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf) {
            return failed(format!("error: reading stdin: {e}"));
        }
        buf
    } else {
        text.to_owned()
    };
    let waf = match crate::waf::Waf::new(&settings.waf) {
        Ok(waf) => waf,
        Err(e) => return failed(format!("invalid configuration:\n{e}")),
    };
    if !waf.enabled() {
        println!("allowed: the WAF is off (waf.enabled: false)");
        return ExitCode::SUCCESS;
    }
    let ctx = match tool {
        Some(tool) => crate::waf::Context::ToolCall { tool },
        None => crate::waf::Context::Prompt,
    };
    match waf.check(&text, ctx) {
        crate::waf::Verdict::Blocked(f) => {
            println!("blocked by {f}");
            ExitCode::FAILURE
        }
        crate::waf::Verdict::Allowed { notes } => {
            println!("allowed");
            for f in notes {
                match &f.allowed_by {
                    Some(by) => println!("  lifted by allow rule {by}: {f}"),
                    None => println!(
                        "  below waf.block_level ({}): {f}",
                        settings.waf.block_level.as_str()
                    ),
                }
            }
            ExitCode::SUCCESS
        }
    }
}

fn config_validate(file: &ConfigFile, overrides: &Overrides) -> ExitCode {
    match config::load(file, overrides) {
        Ok(loaded) => {
            for warning in &loaded.warnings {
                eprintln!("warning: {warning}");
            }
            print!("{}", config::render(&loaded.settings));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("invalid configuration:\n{e}");
            ExitCode::FAILURE
        }
    }
}

/// `up`: migrations, keys, the API; everything stops together on SIGINT/SIGTERM.
async fn up(settings: Settings) -> anyhow::Result<ExitCode> {
    let db = Database::open(&settings, EmbeddedMode::Own).await?;
    let result = async {
        ensure_bootstrap_key(&db, &settings).await?;
        if keys::count_active(&db.pool).await? == 0 {
            let tenant = tenants::DEFAULT_TENANT_ID;
            let secret = create_key(&db, tenant, "bootstrap", Role::Admin).await?;
            println!("created an admin API key (shown only this once): {secret}");
        }
        run_http(&db, &settings, AuthMode::Keys, true).await
    }
    .await;
    db.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// `serve`: the API alone. Refuses to run open unless told so, and then only on loopback.
async fn serve(settings: Settings, insecure_no_auth: bool) -> anyhow::Result<ExitCode> {
    if insecure_no_auth && !settings.listen.ip().is_loopback() {
        bail!(
            "--insecure-no-auth only binds a loopback address; {} is not one",
            settings.listen
        );
    }
    let db = Database::open(&settings, EmbeddedMode::OwnOrAttach).await?;
    let result = async {
        ensure_bootstrap_key(&db, &settings).await?;
        let auth = if insecure_no_auth {
            tracing::warn!("authentication is OFF (--insecure-no-auth): every local caller is an admin");
            AuthMode::InsecureNoAuth
        } else {
            if keys::count_active(&db.pool).await? == 0 {
                bail!(
                    "no API keys exist: create one with `hotplex keys create --name NAME --role admin`, \
                     set HOTPLEX_BOOTSTRAP_KEY, or pass --insecure-no-auth for local use"
                );
            }
            AuthMode::Keys
        };
        run_http(&db, &settings, auth, false).await
    }
    .await;
    db.close().await;
    result.map(|()| ExitCode::SUCCESS)
}

/// `worker`: a worker alone, until SIGINT/SIGTERM; then it stops as `Worker::start` says.
async fn worker(settings: Settings) -> anyhow::Result<ExitCode> {
    let db = Database::open(&settings, EmbeddedMode::OwnOrAttach).await?;
    let result = async {
        let shutdown = Shutdown::new();
        // The first signal asks for a drain; the second skips waiting.
        let requested = tokio_util::sync::CancellationToken::new();
        let forced = tokio_util::sync::CancellationToken::new();
        shutdown
            .tracker
            .spawn(watch_signals(requested.clone(), forced.clone()));
        let worker =
            crate::worker::Worker::start(db.pool.clone(), std::sync::Arc::new(settings.clone()), &shutdown)
                .await?;
        {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "hotplex worker {} started", worker.id);
            let _ = out.flush();
        }
        let signalled = tokio::select! {
            () = requested.cancelled() => true,
            // It stopped by itself: drained on request, or declared lost after a silence.
            () = worker.stopped() => false,
        };
        if signalled {
            // Running turns may finish (bounded); then whatever still runs is interrupted.
            worker.drain();
            tokio::select! {
                () = worker.stopped() => {}
                () = forced.cancelled() => tracing::warn!("second signal: interrupting running turns"),
                () = tokio::time::sleep(settings.worker.drain_timeout) => {
                    tracing::warn!("worker.drain_timeout passed: interrupting running turns")
                }
            }
        }
        shutdown.token.cancel();
        tokio::select! {
            () = worker.stopped() => {}
            () = forced.cancelled() => tracing::warn!("second signal: not waiting for running turns"),
            () = tokio::time::sleep(stop_bound(&settings)) => tracing::warn!("the worker did not stop in time"),
        }
        // Ends the signal watcher, whatever state it is in.
        requested.cancel();
        forced.cancel();
        shutdown.tracker.close();
        if tokio::time::timeout(stop_bound(&settings), shutdown.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("exiting with tasks still running");
        }
        anyhow::Ok(worker.is_draining())
    }
    .await;
    db.close().await;
    // A worker that stopped without draining was declared lost by the fleet.
    result.map(|drained| {
        if drained {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    })
}

/// `hotplex worker drain ID`: asks a worker (anywhere) to drain.
async fn drain_worker(settings: Settings, id: crate::domain::WorkerId) -> anyhow::Result<ExitCode> {
    let db = Database::open(&settings, EmbeddedMode::OwnOrAttach).await?;
    let found = crate::store::workers::drain(&db.pool, id).await;
    db.close().await;
    if found? {
        println!(
            "worker {id} is draining: it finishes its running turns, hands its sessions over and exits"
        );
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("error: no live worker {id}");
        Ok(ExitCode::FAILURE)
    }
}

/// `hotplex worker list`: the fleet's workers.
async fn list_workers(settings: Settings, all: bool) -> anyhow::Result<ExitCode> {
    let db = Database::open(&settings, EmbeddedMode::OwnOrAttach).await?;
    let rows = crate::store::workers::list(&db.pool, all).await;
    db.close().await;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<36}  {:<20}  {:>7}  {:>8}  {:<8}  HEARTBEAT",
        "ID", "HOST", "PID", "SESSIONS", "STATE"
    )?;
    for w in rows? {
        let state = match (w.stopped_at.is_some(), w.draining) {
            (true, _) => "stopped",
            (false, true) => "draining",
            (false, false) => "live",
        };
        writeln!(
            out,
            "{:<36}  {:<20}  {:>7}  {:>8}  {:<8}  {}",
            w.worker_id,
            w.host,
            w.pid.map(|p| p.to_string()).unwrap_or_default(),
            w.sessions,
            state,
            w.heartbeat_at
                .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// How long a stopping worker may take: interrupting a turn, then stopping its agent, each
/// bounded by `worker.stop_grace`, plus time for the database writes.
fn stop_bound(settings: &Settings) -> Duration {
    2 * settings.worker.stop_grace + Duration::from_secs(5)
}

async fn ensure_bootstrap_key(db: &Database, settings: &Settings) -> anyhow::Result<()> {
    let Some(key) = &settings.bootstrap_key else {
        return Ok(());
    };
    let hash = hash_key(key.expose());
    let prefix = display_prefix(key.expose());
    let new = keys::NewKey {
        tenant_id: tenants::DEFAULT_TENANT_ID,
        name: "bootstrap",
        role: Role::Admin,
        prefix: &prefix,
        hash: &hash,
    };
    if keys::ensure_admin(&db.pool, new).await? {
        tracing::info!(key.prefix = %prefix, "bootstrap admin key installed from HOTPLEX_BOOTSTRAP_KEY");
    }
    Ok(())
}

async fn create_key(
    db: &Database,
    tenant: crate::domain::TenantId,
    name: &str,
    role: Role,
) -> anyhow::Result<String> {
    let secret = generate_key();
    let (prefix, hash) = (display_prefix(&secret), hash_key(&secret));
    keys::insert(
        &db.pool,
        keys::NewKey {
            tenant_id: tenant,
            name,
            role,
            prefix: &prefix,
            hash: &hash,
        },
    )
    .await?;
    Ok(secret)
}

/// `up`'s worker, for as long as the process runs: a worker declared lost by the fleet (the
/// process was paused, cut off from the database) stops itself, and a single-process
/// deployment would be left without one; a new worker (a new id) takes its place. A worker
/// drained on request stays stopped (the API goes on alone).
async fn keep_worker(
    mut worker: std::sync::Arc<crate::worker::Worker>,
    pool: sqlx::PgPool,
    settings: std::sync::Arc<Settings>,
    shutdown: Shutdown,
) {
    loop {
        tokio::select! {
            () = shutdown.token.cancelled() => return,
            () = worker.stopped() => {}
        }
        if shutdown.token.is_cancelled() || worker.is_draining() {
            return;
        }
        tracing::warn!(worker.id = %worker.id, "the worker was declared lost; starting a new one");
        let mut backoff = Duration::from_secs(1);
        worker = loop {
            match crate::worker::Worker::start(pool.clone(), settings.clone(), &shutdown).await {
                Ok(w) => break w,
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_s = backoff.as_secs(), "starting a new worker failed");
                    tokio::select! {
                        () = shutdown.token.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
        };
        tracing::info!(worker.id = %worker.id, "a new worker took the place of the lost one");
    }
}

/// Binds, announces the address on stdout, serves until a signal, drains, returns.
async fn run_http(
    db: &Database,
    settings: &Settings,
    auth: AuthMode,
    with_worker: bool,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("binding {}", settings.listen))?;
    let addr = listener.local_addr()?;
    let shutdown = Shutdown::new();
    let forced = tokio_util::sync::CancellationToken::new();
    shutdown
        .tracker
        .spawn(watch_signals(shutdown.token.clone(), forced.clone()));

    let settings_arc = std::sync::Arc::new(settings.clone());
    if with_worker {
        let first =
            crate::worker::Worker::start(db.pool.clone(), settings_arc.clone(), &shutdown).await?;
        shutdown.tracker.spawn(keep_worker(
            first,
            db.pool.clone(),
            settings_arc.clone(),
            shutdown.clone(),
        ));
    }
    let state = AppState::start(db.pool.clone(), settings_arc, auth, &shutdown);
    let router = api::router(state);
    announce(addr);
    tracing::info!(%addr, "hotplex API listening");
    serve_until_shutdown(
        listener,
        router,
        &shutdown,
        &forced,
        settings.http.shutdown_timeout,
    )
    .await?;

    shutdown.token.cancel();
    // Also releases the signal watcher from waiting for a second signal.
    forced.cancel();
    shutdown.tracker.close();
    let bound = if with_worker {
        stop_bound(settings)
    } else {
        Duration::from_secs(5)
    };
    if tokio::time::timeout(bound, shutdown.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("some tasks did not stop in time");
    }
    tracing::info!("hotplex stopped");
    Ok(())
}

fn announce(addr: SocketAddr) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "hotplex listening on http://{addr}");
    let _ = out.flush();
}

/// Serves until the token is cancelled, then lets in-flight requests finish within `drain`.
pub async fn serve_until_shutdown(
    listener: TcpListener,
    router: axum::Router,
    shutdown: &Shutdown,
    forced: &tokio_util::sync::CancellationToken,
    drain: Duration,
) -> anyhow::Result<()> {
    let token = shutdown.token.clone();
    // `into_make_service` hands each connection a clone of the router (an `Arc`); serving the
    // `Router` itself rebuilds its route table per connection, about 23 KiB held for the
    // connection's life, which idle SSE subscribers multiply (see docs/benchmarks.md).
    let server = axum::serve(listener, router.into_make_service())
        .with_graceful_shutdown(async move { token.cancelled().await });
    let deadline = async {
        shutdown.token.cancelled().await;
        tokio::select! {
            () = tokio::time::sleep(drain) => tracing::warn!("in-flight requests did not finish within {drain:?}"),
            () = forced.cancelled() => tracing::warn!("second signal: stopping without waiting"),
        }
    };
    tokio::select! {
        result = server => result.context("HTTP server failed")?,
        () = deadline => {}
    }
    Ok(())
}

/// First SIGINT/SIGTERM: graceful shutdown. Second: stop waiting for requests.
async fn watch_signals(
    token: tokio_util::sync::CancellationToken,
    forced: tokio_util::sync::CancellationToken,
) {
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        return;
    };
    let Ok(mut int) = signal(SignalKind::interrupt()) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        () = token.cancelled() => return,
    }
    tracing::info!("shutting down (signal again to skip draining)");
    token.cancel();
    tokio::select! {
        _ = term.recv() => forced.cancel(),
        _ = int.recv() => forced.cancel(),
        () = forced.cancelled() => {}
    }
}

async fn keys_command(
    cmd: KeysCommand,
    file: &ConfigFile,
    mut overrides: Overrides,
) -> anyhow::Result<ExitCode> {
    let data = match &cmd {
        KeysCommand::Create { data, .. }
        | KeysCommand::List { data, .. }
        | KeysCommand::Revoke { data, .. } => data,
    };
    apply_data_args(&mut overrides, data);
    let settings = load(file, &overrides)?.settings;
    let db = Database::open(&settings, EmbeddedMode::OwnOrAttach).await?;
    let result = keys_on(&db, cmd).await;
    db.close().await;
    result
}

async fn keys_on(db: &Database, cmd: KeysCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCommand::Create {
            name, tenant, role, ..
        } => {
            let name = crate::domain::parse_label("name", &name)?;
            let tenant = tenants::get_or_create(&db.pool, &TenantName::parse(&tenant)?).await?;
            let secret = create_key(db, tenant.tenant_id, &name, role).await?;
            audit_cli(db, tenant.tenant_id, "key.create", &display_prefix(&secret)).await?;
            println!("{secret}");
            eprintln!(
                "created {} key {name:?} for tenant {}; the secret above is shown only once",
                role.as_str(),
                tenant.name
            );
        }
        KeysCommand::List { tenant, .. } => {
            let tenant_id = match tenant {
                Some(name) => {
                    let row = tenants::find_by_name(&db.pool, &TenantName::parse(&name)?).await?;
                    Some(
                        row.with_context(|| format!("no tenant named {name}"))?
                            .tenant_id,
                    )
                }
                None => None,
            };
            let rows = keys::list(&db.pool, tenant_id).await?;
            println!(
                "{:<36}  {:<12}  {:<16}  {:<5}  {:<7}  NAME",
                "ID", "PREFIX", "TENANT", "ROLE", "STATE"
            );
            for r in rows {
                let state = if r.revoked_at.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                println!(
                    "{:<36}  {:<12}  {:<16}  {:<5}  {:<7}  {}",
                    r.api_key_id, r.key_prefix, r.tenant_name, r.role, state, r.name
                );
            }
        }
        KeysCommand::Revoke { id, .. } => {
            let id: ApiKeyId = id
                .parse()
                .map_err(|_| anyhow::anyhow!("{id:?} is not a key id (see `hotplex keys list`)"))?;
            let row = keys::revoke(&db.pool, id)
                .await?
                .with_context(|| format!("no key with id {id}"))?;
            audit_cli(db, row.tenant_id, "key.revoke", &id.to_string()).await?;
            println!("revoked {} ({})", row.api_key_id, row.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn audit_cli(
    db: &Database,
    tenant: crate::domain::TenantId,
    action: &str,
    target: &str,
) -> anyhow::Result<()> {
    store::audit::record(
        &db.pool,
        store::audit::AuditEntry {
            tenant_id: Some(tenant),
            actor: "cli",
            action,
            target_type: "api_key",
            target_id: target,
            details: serde_json::json!({}),
        },
    )
    .await?;
    Ok(())
}
