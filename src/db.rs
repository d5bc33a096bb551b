//! The database a process runs on: the configured server (`DATABASE_URL`), or the embedded
//! cluster under `data_dir`. Opening it applies the migrations.

use anyhow::Context;
use sqlx::PgPool;
use sqlx::postgres::PgConnectOptions;

use crate::config::Settings;
use crate::embedded_pg::{self, EmbeddedPg};
use crate::store;

/// Whether a process may share an embedded cluster that another hotplex process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddedMode {
    /// Start and own it; fail if another process owns it (`up`).
    Own,
    /// Start it, or connect to the one another process runs (management commands).
    OwnOrAttach,
}

/// An open, migrated database.
#[derive(Debug)]
pub struct Database {
    pub pool: PgPool,
    embedded: Option<EmbeddedPg>,
}

impl Database {
    pub async fn open(settings: &Settings, mode: EmbeddedMode) -> anyhow::Result<Self> {
        let (options, mut embedded) = match &settings.database_url {
            Some(url) => {
                // The URL holds a password: never echo it, not even in an error.
                let options: PgConnectOptions = url
                    .expose()
                    .parse()
                    .map_err(|_| anyhow::anyhow!("database_url is not a valid PostgreSQL URL"))?;
                (options, None)
            }
            None => {
                let opts = embedded_pg::Options {
                    data_dir: settings.data_dir.clone(),
                    bin_dir: settings.embedded.bin_dir.clone(),
                    run_as: settings.embedded.run_as.clone(),
                    ephemeral: false,
                };
                let pg = match mode {
                    EmbeddedMode::Own => EmbeddedPg::start(opts).await,
                    EmbeddedMode::OwnOrAttach => EmbeddedPg::start_or_attach(opts).await,
                }
                .context(
                    "starting the embedded PostgreSQL (set DATABASE_URL to use an existing server)",
                )?;
                (pg.connect_options(), Some(pg))
            }
        };
        let opened = async {
            let pool = store::connect(options, &settings.database)
                .await
                .context("connecting to PostgreSQL")?;
            store::migrate(&pool)
                .await
                .context("applying database migrations")?;
            anyhow::Ok(pool)
        }
        .await;
        match opened {
            Ok(pool) => Ok(Self { pool, embedded }),
            Err(e) => {
                if let Some(pg) = embedded.as_mut() {
                    pg.stop().await;
                }
                Err(e)
            }
        }
    }

    /// Closes the pool, then stops the embedded cluster if this process owns it.
    pub async fn close(mut self) {
        // `close` waits for every connection to come back; a task that still holds one (a
        // queue consumer that never returned from its stop) must not keep the process alive.
        if tokio::time::timeout(std::time::Duration::from_secs(5), self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("database connections still in use after 5 s; closing anyway");
        }
        if let Some(pg) = self.embedded.as_mut() {
            pg.stop().await;
        }
    }
}
