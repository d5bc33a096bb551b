//! Store building blocks against real PostgreSQL: transactions that survive their caller.

use std::time::Duration;

use sqlx::postgres::PgPoolOptions;

use crate::support::TestDb;

/// Begins a transaction with `begin`, cancelled after `after`; then writes a row through the
/// same one-connection pool and reports whether another connection sees it (a connection
/// left inside a transaction would swallow the write).
async fn write_visible_after_cancelled_begin<F, Fut>(db: &TestDb, begin: F) -> bool
where
    F: Fn(sqlx::PgPool) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect(&db.url)
        .await
        .unwrap();
    sqlx::query("create table if not exists probe (n int)")
        .execute(&pool)
        .await
        .unwrap();
    let mut all_visible = true;
    for micros in (0..400).step_by(10) {
        let _ = tokio::time::timeout(Duration::from_micros(micros), begin(pool.clone())).await;
        // Let a rollback the cancellation queued reach the server.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let n = micros as i32;
        sqlx::query("insert into probe values ($1)")
            .bind(n)
            .execute(&pool)
            .await
            .unwrap();
        let seen: bool = sqlx::query_scalar("select exists (select 1 from probe where n = $1)")
            .bind(n)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        all_visible &= seen;
    }
    pool.close().await;
    all_visible
}

#[tokio::test]
async fn a_transaction_begun_by_a_caller_that_is_cancelled_never_swallows_later_writes() {
    let db = TestDb::new().await;
    let visible = write_visible_after_cancelled_begin(&db, |pool| async move {
        let tx = hotplex::store::begin(&pool).await;
        // Held a moment, as a caller doing work inside it would.
        tokio::time::sleep(Duration::from_millis(1)).await;
        drop(tx);
    })
    .await;
    assert!(
        visible,
        "a write ran inside a transaction left open by a cancelled begin"
    );
}
