//! `shardline-allocator simulate`: the command line around the fleet
//! simulation in `shardline_allocator_core::policy::simulate` (arguments,
//! wall time, stdout).

use shardline_allocator_core::policy::simulate::{run_all, SimParams};
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Number of simulated devices.
    #[arg(long, default_value_t = 1000)]
    pub devices: u32,
    /// Simulated duration in hours.
    #[arg(long, default_value_t = 24)]
    pub hours: u32,
    /// PRNG seed (same seed ⇒ same figures).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Report / tick interval in seconds.
    #[arg(long, default_value_t = 300)]
    pub tick_s: u32,
    /// Misbehaving devices, per mille of the fleet.
    #[arg(long, default_value_t = 50)]
    pub misbehaving_permille: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    pub json: bool,
}

pub fn run_cli(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    if args.devices == 0 || args.hours == 0 || args.tick_s == 0 {
        anyhow::bail!("--devices, --hours and --tick-s must be at least 1");
    }
    let params = SimParams {
        devices: args.devices,
        hours: args.hours,
        seed: args.seed,
        tick_ms: u64::from(args.tick_s) * 1000,
        misbehaving_permille: args.misbehaving_permille.min(1000),
    };
    let started = std::time::Instant::now();
    let report = run_all(&params)?;
    let text = if args.json {
        format!("{}\n", serde_json::to_string_pretty(&report)?)
    } else {
        format!(
            "{}(wall time {:.1} s)\n",
            report.table(),
            started.elapsed().as_secs_f64()
        )
    };
    // A closed pipe (`| head`) is not an error worth a panic.
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(ExitCode::SUCCESS)
}
