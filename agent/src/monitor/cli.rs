//! `shardline-agent monitor`.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct MonitorArgs {}

pub fn run(_args: MonitorArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("monitor is not built yet")
}
