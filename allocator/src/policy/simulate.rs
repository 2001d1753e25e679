//! `shardline-allocator simulate`: a fleet simulation over the policy engine.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct SimulateArgs {}

pub fn run_cli(_args: SimulateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("simulate is not built yet")
}
