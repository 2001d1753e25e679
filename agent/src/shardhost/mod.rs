//! Capability shards on the device: safe loading, sandboxed host processes,
//! limits, supervision.
//!
//! - [`supervisor`]: the I/O edge the daemon drives ([`Supervisor`]:
//!   `activate`, `deactivate`, `poll`, `statuses`, `shutdown`).
//! - [`policy`]: the sans-IO restart/backoff/quarantine/failover machine.
//! - [`host`]: the host process (`shardline-agent host`): limits first, then
//!   verify, load, init, event loop with heartbeats.
//! - [`loader`]: the FFI boundary (open once with `O_NOFOLLOW`, owner/mode
//!   checks, SHA-256 from the descriptor, `dlopen` of `/proc/self/fd/N`).
//! - [`sandbox`]: what a host does to itself before it maps a library:
//!   `no_new_privs` and no capabilities, its own uid (or user namespace),
//!   Landlock, seccomp.
//! - [`limits`]: rlimits, niceness and cgroup v2/v1 creation (memory, cpu,
//!   pids), killing everything in a host's cgroup, cleanup.
//! - [`bandwidth`]: declared bandwidth as an nftables rate cap on the
//!   host's dedicated uid (kernel-enforced).
//! - [`ipc`]: the agent ⇄ host seqpacket protocol (postcard).
//! - [`config`]: the TOML file of `shardline-agent shards run`.
//! - [`install`]: copying built shard libraries into a shard directory.
//! - [`cpu`]: AES instructions present ⇒ which crypto shard is primary.
//! - [`cli`]: `shardline-agent shards list|run|install` and `host`.
//!
//! Invariants: the agent never loads a shard library itself (only host
//! processes do, and `shards list` probes in a child); a library is loaded
//! only through the descriptor that was checked and hashed; a host gets its
//! limits and its sandbox before it loads anything (so no shard code, not
//! even a constructor, runs with the agent's identity); everything a host
//! started dies with it; every cgroup created is removed.

pub mod bandwidth;
pub mod cli;
pub mod config;
pub mod cpu;
pub mod host;
pub mod install;
pub mod ipc;
pub mod limits;
pub mod loader;
pub mod policy;
pub mod sandbox;
pub mod supervisor;
mod sys;

pub use policy::{CapabilityPolicy, PolicyConfig};
pub use supervisor::{
    HostEvent, SealKey, ShardSpec, Supervisor, SupervisorConfig, SupervisorError,
};
