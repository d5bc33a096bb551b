//! The command line: `hotplex <command>`, parsed with clap.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::LogFormat;
use crate::domain::Role;

/// hotplex: Claude Code and OpenCode as a durable, streaming, multi-tenant service.
#[derive(Debug, Parser)]
#[command(name = "hotplex", version, about, propagate_version = true)]
pub struct Cli {
    /// YAML config file (default: configs/hotplex.yaml when it exists).
    #[arg(long, global = true, env = "HOTPLEX_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format; overrides `log_format` of the config.
    #[arg(long, global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    #[command(subcommand)]
    pub command: Command,
}

/// `hotplex worker [drain ID | list]`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = false)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub data: DataArgs,
    #[command(subcommand)]
    pub action: Option<WorkerAction>,
}

#[derive(Debug, Subcommand)]
pub enum WorkerAction {
    /// Ask a worker to drain: it stops taking work, finishes its running turns, hands its
    /// sessions over and exits.
    Drain {
        /// The worker's id (`hotplex worker list`).
        id: crate::domain::WorkerId,
    },
    /// The fleet's workers: host, pid, sessions, state, last heartbeat.
    List {
        /// Include stopped workers.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Everything in one process: migrations, the API and a worker, on an embedded
    /// PostgreSQL when no DATABASE_URL is set.
    Up(ServeArgs),
    /// The stateless API only.
    Serve {
        #[command(flatten)]
        args: ServeArgs,
        /// Run without API keys (every caller is the default tenant's admin). Only on a
        /// loopback address.
        #[arg(long)]
        insecure_no_auth: bool,
    },
    /// A worker alone: claims sessions, keeps their agents warm and runs their turns.
    /// Run any number of them against one database; SIGINT/SIGTERM drains one (running
    /// turns finish, within `worker.drain_timeout`). `worker drain ID` / `worker list` manage
    /// the fleet.
    Worker(WorkerArgs),
    /// Apply database migrations and exit.
    Migrate(DataArgs),
    /// Print the OpenAPI document.
    Openapi {
        /// Write it to this file instead of stdout.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Manage API keys directly in the database.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// The WAF's rules, as configured.
    #[command(subcommand)]
    Waf(WafCommand),
    /// A fake Claude Code speaking stream-json, for tests and benchmarks.
    #[command(hide = true)]
    FakeAgent {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// A mock Anthropic Messages API on 127.0.0.1, for running the real CLI offline.
    #[command(hide = true)]
    MockAnthropic {
        /// Port to bind (0 picks one; the port is printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Delay before each streamed delta in `[[slow]]` mode, in milliseconds.
        #[arg(long, default_value_t = 250)]
        delay_ms: u64,
    },
    /// A mock OpenAI-compatible chat-completions API on 127.0.0.1, for running the real
    /// OpenCode CLI offline.
    #[command(hide = true)]
    MockOpenai {
        /// Port to bind (0 picks one; the port is printed).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Delay between streamed words, in milliseconds.
        #[arg(long, default_value_t = 20)]
        delay_ms: u64,
    },
}

#[derive(Debug, Clone, Args)]
pub struct DataArgs {
    /// Data directory (embedded database, work dirs); overrides `data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on; overrides `listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    #[command(flatten)]
    pub data: DataArgs,
}

#[derive(Debug, Subcommand)]
pub enum WafCommand {
    /// Print the verdict on a text (the matching rule, its level and category, what it
    /// matched): exit 0 when allowed, 1 when blocked, 2 on a configuration error.
    Test {
        /// The prompt or command to check; `-` reads it from stdin.
        #[arg(allow_hyphen_values = true)]
        text: String,
        /// Check it as the input of this tool (e.g. `Bash`) rather than as a prompt.
        #[arg(long, value_name = "TOOL")]
        tool: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Print the merged configuration (secrets redacted), or the first error and exit 1.
    Validate {
        /// Config file to check (default: --config, then configs/hotplex.yaml).
        file: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key and print its secret (shown only once).
    Create {
        /// A label for the key.
        #[arg(long)]
        name: String,
        /// Tenant name; created when missing.
        #[arg(long, default_value = "default")]
        tenant: String,
        /// `user` or `admin`.
        #[arg(long, value_enum, default_value = "user")]
        role: Role,
        #[command(flatten)]
        data: DataArgs,
    },
    /// List keys (never their secrets).
    List {
        /// Only keys of this tenant.
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        data: DataArgs,
    },
    /// Revoke a key by id; it stops working at once.
    Revoke {
        /// The key's id (from `keys list`).
        id: String,
        #[command(flatten)]
        data: DataArgs,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn parses_the_documented_commands() {
        let cli = Cli::try_parse_from([
            "hotplex",
            "up",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/tmp/x",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Up(ServeArgs {
                listen: Some(_),
                ..
            })
        ));
        let cli = Cli::try_parse_from([
            "hotplex", "keys", "create", "--name", "ci", "--role", "admin",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Keys(KeysCommand::Create {
                role: Role::Admin,
                ..
            })
        ));
        let cli = Cli::try_parse_from(["hotplex", "config", "validate", "x.yaml"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Config(ConfigCommand::Validate { file: Some(_) })
        ));
        assert!(Cli::try_parse_from(["hotplex", "serve", "--insecure-no-auth"]).is_ok());
        assert!(matches!(
            Cli::try_parse_from(["hotplex", "waf", "test", "-"]).unwrap().command,
            Command::Waf(WafCommand::Test { text, tool: None }) if text == "-"
        ));
        assert!(matches!(
            Cli::try_parse_from(["hotplex", "worker", "--data-dir", "/tmp/x"])
                .unwrap()
                .command,
            Command::Worker(WorkerArgs {
                data: DataArgs { data_dir: Some(_) },
                action: None
            })
        ));
    }
}
