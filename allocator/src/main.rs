//! `shardline-allocator`: the cloud service. A thin edge over the library.
//!
//! The one `unsafe` of the allocator is here, at its FFI edge: a call into
//! glibc's `mallopt` before any thread starts (`keep_freed_heap`).
#![deny(unsafe_code)]

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

/// Keeps freed heap memory in the process instead of giving it back to the
/// kernel at once. glibc trims a thread's heap as soon as 128 KiB at its top
/// are free, and serves blocks above its (adaptive) mmap threshold with
/// fresh mappings: the verifier threads' Ed25519 batches allocate and free
/// a table of about 160 KiB per batch, so each batch faulted its pages in
/// again and the kernel zeroed them (about a sixth of a verifier thread's
/// CPU under load; measured with perf, see BENCHMARKS.md). The price is up
/// to `TRIM` bytes of free heap kept per arena. An operator's own
/// `GLIBC_TUNABLES` malloc settings win: nothing is changed then.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn keep_freed_heap() {
    const TRIM: libc::c_int = 64 << 20;
    const MMAP: libc::c_int = 4 << 20;
    if std::env::var("GLIBC_TUNABLES").is_ok_and(|t| t.contains("glibc.malloc.")) {
        return;
    }
    for (param, value) in [
        (libc::M_TRIM_THRESHOLD, TRIM),
        (libc::M_MMAP_THRESHOLD, MMAP),
    ] {
        // SAFETY: `mallopt` takes two integers and only changes the
        // allocator's thresholds; it is called before any other thread of
        // this process exists, and glibc serializes it with malloc anyway.
        // A refused value (returns 0) leaves glibc's default in place.
        let _accepted = unsafe { libc::mallopt(param, value) };
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_heap() {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => {
            keep_freed_heap();
            shardline_allocator::service::cli::run(args)
        }
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
