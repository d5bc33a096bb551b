//! The only place with SQL: connecting, migrating, and one module per table family.

pub mod audit;
pub mod events;
pub mod keys;
pub mod leases;
pub mod opencode_mirror;
pub mod queue;
pub mod sessions;
pub mod tenants;
pub mod turns;
pub mod workers;

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, PgPool};

use crate::config::DatabaseSettings;

/// hotplex's own migrations, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("job queue migrations: {0}")]
    Queue(String),
    /// The writer no longer holds the session's lease: another worker owns it now.
    #[error("the session's lease is held by another worker")]
    Fenced,
    /// A row holds a value the code does not know (e.g. written by a newer version).
    #[error("unexpected value in the database: {0}")]
    Corrupt(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The database could not be reached or went away (restarting, shutting down, cut
    /// off, out of connections): the same call may succeed shortly. Callers answer 503 or
    /// retry; anything else is a real failure.
    pub fn is_unavailable(&self) -> bool {
        let Error::Database(e) = self else {
            return false;
        };
        match e {
            sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::Tls(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                // 08: connection exceptions; 57P01-03: shutting down, crashed, starting
                // up; 53300: too many connections.
                code.starts_with("08") || matches!(&*code, "57P01" | "57P02" | "57P03" | "53300")
            }),
            _ => false,
        }
    }
}

/// Opens a pool. Statement logging stays off: statements may carry prompts.
pub async fn connect(options: PgConnectOptions, settings: &DatabaseSettings) -> Result<PgPool> {
    let options = options
        .log_statements(tracing::log::LevelFilter::Off)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1));
    let pool = PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .acquire_timeout(settings.acquire_timeout)
        .connect_with(options)
        .await?;
    Ok(pool)
}

/// Applies hotplex's migrations, then the job queue's (schema `apalis`).
pub async fn migrate(pool: &PgPool) -> Result<()> {
    MIGRATOR.run(pool).await?;
    apalis_postgres::PostgresStorage::setup(pool)
        .await
        .map_err(|e| Error::Queue(e.to_string()))?;
    Ok(())
}

/// A transaction on a pooled connection, begun so that cancelling the caller cannot leak
/// it. sqlx 0.9.0's `Pool::begin` is not cancel-safe on PostgreSQL: dropped while its
/// `BEGIN` is in flight (a client that disconnects, a timeout), it returns the connection to
/// the pool inside an open transaction that nothing ends, and the next borrower's writes
/// run in it and are never committed (transact-rs/sqlx#4393, fixed upstream after 0.9.0).
/// Here the `BEGIN` runs in a task of its own: if the caller goes away, the task still
/// finishes it, and dropping the finished transaction rolls it back properly.
pub async fn begin(pool: &PgPool) -> Result<sqlx::Transaction<'static, sqlx::Postgres>> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin().await }).await {
        Ok(tx) => Ok(tx?),
        Err(e) => Err(Error::Database(sqlx::Error::Io(std::io::Error::other(e)))),
    }
}

/// `select 1`, for readiness probes.
pub async fn ping(pool: &PgPool) -> Result<()> {
    sqlx::query("select 1").execute(pool).await?;
    Ok(())
}
