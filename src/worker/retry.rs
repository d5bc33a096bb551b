//! Riding out a database outage: a worker keeps its agents and its turns through a
//! PostgreSQL restart or a network blip, retrying its writes until the database answers
//! again, instead of failing turns that did nothing wrong. Writes that may have landed
//! before the connection broke are checked before they are repeated (see the callers).

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// Runs `op` until it succeeds or fails for a reason other than an unavailable database
/// (see [`store::Error::is_unavailable`]), waiting with backoff between tries. `op` learns
/// whether an earlier try failed (`true`), so a write can first check whether it landed.
/// Gives up with the last error once `token` is cancelled (the worker stops).
pub async fn until_available<T, F, Fut>(
    token: &CancellationToken,
    what: &str,
    mut op: F,
) -> store::Result<T>
where
    F: FnMut(bool) -> Fut,
    Fut: Future<Output = store::Result<T>>,
{
    let mut backoff = FIRST_BACKOFF;
    let mut since: Option<Instant> = None;
    loop {
        match op(since.is_some()).await {
            Err(e) if e.is_unavailable() && !token.is_cancelled() => {
                if since.is_none() {
                    tracing::warn!(error = %e, "{what}: the database is unavailable; retrying until it is back");
                    since = Some(Instant::now());
                }
                tokio::select! {
                    () = token.cancelled() => return Err(e),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
            result => {
                if let Some(since) = since {
                    tracing::info!(
                        outage_ms = since.elapsed().as_millis() as u64,
                        "{what}: the database is back"
                    );
                }
                return result;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unavailable() -> store::Error {
        store::Error::Database(sqlx::Error::PoolTimedOut)
    }

    #[tokio::test(start_paused = true)]
    async fn retries_while_unavailable_and_tells_the_op_it_is_a_retry() {
        let token = CancellationToken::new();
        let mut calls = Vec::new();
        let r = until_available(&token, "test", |retry| {
            calls.push(retry);
            let n = calls.len();
            async move { if n < 4 { Err(unavailable()) } else { Ok(n) } }
        })
        .await;
        assert_eq!(r.unwrap(), 4);
        assert_eq!(calls, [false, true, true, true]);
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_are_returned_at_once() {
        let token = CancellationToken::new();
        let mut calls = 0;
        let r: store::Result<()> = until_available(&token, "test", |_| {
            calls += 1;
            async { Err(store::Error::Fenced) }
        })
        .await;
        assert!(matches!(r, Err(store::Error::Fenced)));
        assert_eq!(calls, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_worker_gives_up() {
        let token = CancellationToken::new();
        let stopper = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            stopper.cancel();
        });
        let r: store::Result<()> =
            until_available(&token, "test", |_| async { Err(unavailable()) }).await;
        assert!(r.unwrap_err().is_unavailable());
    }
}
