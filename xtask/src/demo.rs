//! `cargo xtask demo`: the whole system on one machine.
//!
//! Filled in as the pieces land; today it builds the workspace so the command
//! exists and exits 0.

use crate::sh::{self, Step};
use std::path::Path;

pub fn run(root: &Path, _args: &[String]) -> Result<(), String> {
    sh::run(Step::new("cargo").args(["build", "--workspace", "--locked"]).cwd(root))
}
