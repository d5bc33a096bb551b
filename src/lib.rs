//! hotplex turns terminal coding agents (Claude Code, OpenCode) into a production service:
//! prompts arrive over HTTP (and chat), run as durable jobs in PostgreSQL on warm agent
//! processes, and stream back with replay.
//!
//! # Layout
//!
//! - [`cli`], [`commands`] — the command line and what each subcommand does.
//! - [`config`] — typed settings (defaults → YAML → `HOTPLEX_*` env → flags).
//! - [`telemetry`] — logging to stderr.
//! - [`app`] — shared state and the shutdown handle.
//! - [`domain`] — typed ids, validated values, the session-id derivation.
//! - [`auth`] — API keys, JWTs and the principal.
//! - [`api`] — the HTTP API (native `/v1`, health, OpenAPI, Swagger UI).
//! - [`db`], [`embedded_pg`] — the database a process runs on, embedded or external.
//! - [`store`] — every SQL statement.
//! - [`worker`], [`provider`] — the worker and the agent processes it keeps warm.
//! - [`events`] — the event model; [`sse`] — parsing event streams as a client.
//! - [`opencode`] — OpenCode's ids, shapes and events, derived from ours (the compatible API).
//! - [`waf`] — the regex tripwire for dangerous commands in prompts (and tool calls).
#![deny(unsafe_code)]

pub mod api;
pub mod app;
pub mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod db;
pub mod domain;
pub mod embedded_pg;
pub mod events;
pub mod fake_agent;
pub mod mock_llm;
pub mod opencode;
pub mod provider;
pub mod sse;
pub mod store;
pub mod telemetry;
pub mod waf;
pub mod worker;
