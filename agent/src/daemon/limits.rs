//! Resource limits the agent puts on itself at start (`[limits]`). Only soft
//! limits are lowered, so the shard hosts it starts can still be given their
//! own limits by the shard host code.

use super::config::AgentLimits;
use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Applies the limits; failures are logged, not fatal (a container may forbid them).
pub fn apply(limits: &AgentLimits) {
    if let Some(mib) = limits.memory_max_mib {
        set_soft(
            Resource::RLIMIT_AS,
            mib.saturating_mul(1 << 20),
            "memory_max_mib",
        );
    }
    if let Some(n) = limits.nofile {
        set_soft(Resource::RLIMIT_NOFILE, n, "nofile");
    }
}

fn set_soft(resource: Resource, value: u64, field: &str) {
    // rlim_t is 32 bits on armv7: a larger wish saturates to "as much as allowed".
    let value = nix::libc::rlim_t::try_from(value).unwrap_or(nix::libc::rlim_t::MAX);
    let result =
        getrlimit(resource).and_then(|(_, hard)| setrlimit(resource, value.min(hard), hard));
    if let Err(e) = result {
        tracing::warn!(field, error = %e, "could not apply the agent's own limit");
    }
}
