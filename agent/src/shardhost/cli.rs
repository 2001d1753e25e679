//! `shardline-agent shards …` and the hidden `host` mode.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct ShardsArgs {}

#[derive(Debug, clap::Args)]
pub struct HostArgs {}

pub fn shards(_args: ShardsArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("shards is not built yet")
}

pub fn host(_args: HostArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("host mode is not built yet")
}
