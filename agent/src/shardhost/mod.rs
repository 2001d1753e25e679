//! Capability shards on the device: safe loading, host processes, limits.
pub mod cli;
