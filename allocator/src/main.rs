//! `shardline-allocator`: the cloud service. A thin edge over the library.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "shardline-allocator",
    version,
    about = "Shardline cloud allocator"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of `run`'s many flags does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
enum Command {
    /// Run the allocator service (embedded broker and store by default).
    Run(shardline_allocator::service::cli::RunArgs),
    /// Check the configuration (file and flags, catalog, tiers, signing key,
    /// TLS files) without starting anything; exit 78 when it is invalid.
    CheckConfig(shardline_allocator::service::cli::RunArgs),
    /// Generate an instruction-signing key.
    Keygen(shardline_allocator::service::cli::KeygenArgs),
    /// Rotate the instruction-signing key and send the rotation to every device.
    Rotate(shardline_allocator::service::cli::RotateArgs),
    /// Simulate a fleet under each policy variant and print what each achieves.
    Simulate(shardline_allocator::simulate::SimulateArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => shardline_allocator::service::cli::run(args),
        Command::CheckConfig(args) => shardline_allocator::service::cli::check_config(args),
        Command::Keygen(args) => shardline_allocator::service::cli::keygen(args),
        Command::Rotate(args) => shardline_allocator::service::cli::rotate(args),
        Command::Simulate(args) => shardline_allocator::simulate::run_cli(args),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shardline-allocator: error: {err:#}");
            ExitCode::from(shardline_allocator::service::cli::exit_code(&err))
        }
    }
}
