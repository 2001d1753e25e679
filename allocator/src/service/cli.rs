//! `shardline-allocator run|keygen|rotate`.
use std::process::ExitCode;

#[derive(Debug, clap::Args)]
pub struct RunArgs {}
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {}
#[derive(Debug, clap::Args)]
pub struct RotateArgs {}

pub fn run(_args: RunArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("run is not built yet")
}
pub fn keygen(_args: KeygenArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("keygen is not built yet")
}
pub fn rotate(_args: RotateArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("rotate is not built yet")
}
