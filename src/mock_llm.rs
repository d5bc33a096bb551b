//! Deterministic stand-ins for LLM provider APIs, so the real agent CLIs can run offline in
//! tests and benchmarks, pointed at 127.0.0.1 instead of a paid endpoint.

pub mod anthropic;
mod common;
pub mod openai;
