//! The scenarios, one module each, and the table that names them.

mod overhead;
mod queue;
mod sessions;
mod spares;
mod stream;
pub mod subscribers;
mod warm;

use crate::Env;
use crate::report::Scenario;

/// Every scenario, in the order a full run takes them.
pub const NAMES: [&str; 7] = [
    "queue",
    "overhead",
    "warm-vs-cold",
    "first-turn",
    "stream",
    "sessions",
    "subscribers",
];

pub fn static_name(name: &str) -> &'static str {
    NAMES
        .iter()
        .find(|n| **n == name)
        .copied()
        .unwrap_or("unknown")
}

pub async fn run(name: &str, env: &Env) -> anyhow::Result<Scenario> {
    match name {
        "queue" => queue::run(env).await,
        "overhead" => overhead::run(env).await,
        "warm-vs-cold" => warm::run(env).await,
        "first-turn" => spares::run(env).await,
        "stream" => stream::run(env).await,
        "sessions" => sessions::run(env).await,
        "subscribers" => subscribers::run(env).await,
        other => anyhow::bail!("no scenario {other}"),
    }
}

/// Milliseconds between two database timestamps.
pub fn ms_between(a: &serde_json::Value, b: &serde_json::Value) -> Option<f64> {
    let a = chrono::DateTime::parse_from_rfc3339(a.as_str()?).ok()?;
    let b = chrono::DateTime::parse_from_rfc3339(b.as_str()?).ok()?;
    Some((b - a).num_microseconds()? as f64 / 1000.0)
}
