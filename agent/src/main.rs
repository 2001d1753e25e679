//! `shardline-agent`: the device daemon. A thin edge over the library: parse
//! the command line, run the chosen command, map errors to exit codes.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "shardline-agent", version, about = "Shardline device agent")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon (systemd service).
    Run(shardline_agent::daemon::cli::RunArgs),
    /// Validate the configuration file and exit.
    CheckConfig(shardline_agent::daemon::cli::CheckConfigArgs),
    /// Ask the running agent for shard units (acquire, renew, release, query)
    /// as a local application. Exit codes: 0 answered, 1 no answer or error,
    /// 2 usage, 3 refused, 4 left queued.
    Request(shardline_agent::daemon::request_cli::RequestArgs),
    /// Watch traffic and print QoS per class (live interface or capture file).
    Monitor(shardline_agent::monitor::cli::MonitorArgs),
    /// Inspect and run capability shards locally.
    Shards(shardline_agent::shardhost::cli::ShardsArgs),
    /// Internal: run as a shard host process (started by the agent itself).
    #[command(hide = true)]
    Host(shardline_agent::shardhost::cli::HostArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => shardline_agent::daemon::cli::run(args),
        Command::CheckConfig(args) => shardline_agent::daemon::cli::check_config(args),
        Command::Request(args) => shardline_agent::daemon::request_cli::request(args),
        Command::Monitor(args) => shardline_agent::monitor::cli::run(args),
        Command::Shards(args) => shardline_agent::shardhost::cli::shards(args),
        Command::Host(args) => shardline_agent::shardhost::cli::host(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shardline-agent: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
