//! The one integration-test binary: API, process and contract tests against real PostgreSQL.

mod admin;
mod auth;
mod backpressure;
mod claude;
mod errors;
mod fleet;
mod health;
mod jwt;
mod openapi;
mod opencode;
mod opencode_mock;
mod opencode_provider;
mod processes;
mod restarts;
mod runtime;
mod sessions;
mod store;
mod support;
mod turns;
mod waf;
mod worker;
