//! The OpenCode wire model: OpenCode's ids, JSON shapes and event sequence, derived from
//! hotplex's own sessions, turns and events so that the OpenCode-compatible API
//! (`api::opencode`) is a view of the same data, not a side channel.

pub mod ids;
pub mod translate;
pub mod view;

/// The OpenCode release whose wire format this reproduces (docs/opencode-compat.md).
pub const VERSION: &str = "1.18.33";
