//! The benchmark suite: `cargo bench --bench suite [-- SCENARIO… --smoke --out DIR]`.
//!
//! Each scenario starts its own stack (a fresh database, `hotplex` as a child process),
//! measures hotplex and a reference in the same run, and reports figures against the
//! targets of `docs/benchmarks.md`. A full run of every scenario rewrites `docs/benchmarks.md`,
//! `docs/benchmarks.json` and `docs/benchmarks-latency.svg`; a partial or smoke run writes to
//! a temporary directory unless `--out` says otherwise. Benchmarks never fail on a number;
//! they fail only when a scenario cannot run.

mod report;
mod scenarios;
mod stack;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use report::{Machine, Report, Scenario};
use stack::Server;

/// What every scenario gets.
pub struct Env {
    pub server: Server,
    /// Small sizes: proves the suite runs (CI), measures nothing worth reporting.
    pub smoke: bool,
}

impl Env {
    /// `full` normally, `smoke` in a smoke run.
    pub fn size(&self, full: usize, smoke: usize) -> usize {
        if self.smoke { smoke } else { full }
    }
}

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run()) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<ExitCode> {
    if std::env::args().any(|a| a == scenarios::subscribers::REFERENCE_FLAG) {
        scenarios::subscribers::reference_server().await?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut smoke = false;
    let mut out: Option<PathBuf> = None;
    let mut names: Vec<String> = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            // cargo bench passes --bench; cargo test passes nothing we need.
            "--bench" | "--nocapture" | "--quiet" => {}
            "--smoke" => smoke = true,
            "--out" => out = args.next().map(PathBuf::from),
            "-h" | "--help" => {
                println!(
                    "usage: cargo bench --bench suite -- [SCENARIO…] [--smoke] [--out DIR]\nscenarios: {}",
                    scenarios::NAMES.join(" ")
                );
                return Ok(ExitCode::SUCCESS);
            }
            name if scenarios::NAMES.contains(&name) => names.push(name.to_owned()),
            other if other.starts_with('-') => {}
            other => anyhow::bail!(
                "unknown scenario {other:?}; one of: {}",
                scenarios::NAMES.join(" ")
            ),
        }
    }
    let all = names.is_empty();
    if all {
        names = scenarios::NAMES.iter().map(|s| (*s).to_owned()).collect();
    }
    let out = out.unwrap_or_else(|| {
        if all && !smoke {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs")
        } else {
            std::env::temp_dir().join("hotplex-bench")
        }
    });
    raise_fd_limit();

    let env = Env {
        server: Server::find().await?,
        smoke,
    };
    let mut report = Report {
        generated_at: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        machine: Machine::read(),
        database: env.server.label.clone(),
        profile: if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
        smoke,
        commit: git_commit(),
        scenarios: Vec::new(),
    };
    let mut failed = false;
    for name in &names {
        let started = Instant::now();
        let mut scenario = match scenarios::run(name, &env).await {
            Ok(s) => s,
            Err(e) => {
                failed = true;
                Scenario {
                    name: scenarios::static_name(name),
                    title: scenarios::static_name(name),
                    skipped: Some(format!("failed: {e:#}")),
                    ..Scenario::default()
                }
            }
        };
        scenario.seconds = started.elapsed().as_secs_f64();
        report::print(&scenario);
        report.scenarios.push(scenario);
    }
    report::write(&report, &out)?;
    println!("results: {}", out.join("benchmarks.md").display());
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Thousands of SSE subscribers need as many descriptors (the server inherits the limit).
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

fn git_commit() -> Option<String> {
    let out = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
