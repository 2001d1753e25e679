//! `shardctl`: the operator CLI over the admin API.
use std::ffi::OsString;
use std::process::ExitCode;

pub fn main_from_args(_args: impl IntoIterator<Item = OsString>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("shardctl is not built yet")
}
