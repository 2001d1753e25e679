//! `shardctl`: the operator's command line over the allocator's admin API.
#![forbid(unsafe_code)]

use std::process::ExitCode;

fn main() -> ExitCode {
    match shardline_allocator::service::shardctl::main_from_args(std::env::args_os()) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("shardctl: error: {err:#}");
            ExitCode::from(1)
        }
    }
}
