//! The one LISTEN connection of a process. It reconnects with backoff and, after any gap,
//! tells its owner to re-read state from the tables: NOTIFY is a wake-up, never the data.

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio_util::sync::CancellationToken;

/// What to do with notifications.
pub trait Handler: Send + Sync + 'static {
    fn notify(&self, channel: &str, payload: &str);
    /// Called after (re)connecting: notifications sent meanwhile are lost.
    fn resync(&self);
}

/// Listens on `channels` until cancelled.
pub async fn run(
    pool: PgPool,
    channels: Vec<&'static str>,
    handler: impl Handler,
    token: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let connected = tokio::select! {
            () = token.cancelled() => return,
            r = connect(&pool, &channels) => r,
        };
        let mut listener = match connected {
            Ok(l) => {
                backoff = Duration::from_millis(100);
                handler.resync();
                l
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "LISTEN connection failed");
                tokio::select! {
                    () = token.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        loop {
            let next = tokio::select! {
                () = token.cancelled() => return,
                n = listener.try_recv() => n,
            };
            match next {
                Ok(Some(n)) => handler.notify(n.channel(), n.payload()),
                // The connection dropped and sqlx reconnected: we may have missed some.
                Ok(None) => handler.resync(),
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection lost");
                    break;
                }
            }
        }
    }
}

async fn connect(pool: &PgPool, channels: &[&'static str]) -> sqlx::Result<PgListener> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(channels.iter().copied()).await?;
    Ok(listener)
}
