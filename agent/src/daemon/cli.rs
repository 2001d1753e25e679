//! `shardline-agent run` and `check-config`.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RunArgs {}

#[derive(Debug, clap::Args)]
pub struct CheckConfigArgs {}

pub fn run(_args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("the daemon is not built yet")
}

pub fn check_config(_args: CheckConfigArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("check-config is not built yet")
}
