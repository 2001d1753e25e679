//! [`ShardRuntime`] over the real shard host supervisor
//! (`shardhost::Supervisor`): one sandboxed host process per capability,
//! re-executing this binary in host mode, with restart/backoff/quarantine.
//!
//! Loading is asynchronous (the host verifies the library's hash, owner and
//! mode before loading it), so `activate` only fails when no host could be
//! set up at all; a library refused later shows in the shard's reported
//! status (`LoadRefused`) with the next QoS window.

use super::runtime::{RuntimeError, ShardRuntime};
use crate::shardhost::{HostEvent, ShardSpec, Supervisor, SupervisorConfig};
use shardline_shared::msg::{Activation, ShardStatus};
use std::path::Path;
use std::time::Instant;

/// See the module docs.
#[derive(Debug)]
pub struct SupervisedRuntime {
    sup: Supervisor,
}

impl SupervisedRuntime {
    /// A supervisor for shards in `shard_dir`, run by this executable.
    pub fn new(shard_dir: &Path) -> Result<Self, RuntimeError> {
        let cfg = SupervisorConfig::new(shard_dir).map_err(|e| RuntimeError(e.to_string()))?;
        Ok(Self {
            sup: Supervisor::new(cfg),
        })
    }

    /// Pid of a capability's host process (tests, diagnostics).
    pub fn host_pid(&self, capability: &str) -> Option<u32> {
        self.sup.host_pid(capability)
    }
}

fn describe(e: &HostEvent) -> String {
    format!("{e:?}")
}

impl ShardRuntime for SupervisedRuntime {
    fn activate(
        &mut self,
        capability: &str,
        shards: &[Activation],
        _now_ms: u64,
    ) -> Result<(), RuntimeError> {
        let specs = shards.iter().cloned().map(ShardSpec::new).collect();
        let events = self
            .sup
            .activate(capability, specs, Instant::now())
            .map_err(|e| RuntimeError(e.to_string()))?;
        for e in &events {
            tracing::info!(event = %describe(e), "shard host");
        }
        Ok(())
    }

    fn deactivate(&mut self, capability: &str, _now_ms: u64) {
        for e in self.sup.deactivate(capability) {
            tracing::info!(event = %describe(&e), "shard host");
        }
    }

    fn poll(&mut self, _now_ms: u64) -> Vec<String> {
        self.sup.poll(Instant::now()).iter().map(describe).collect()
    }

    fn statuses(&mut self, _now_ms: u64) -> Vec<ShardStatus> {
        self.sup.statuses()
    }

    fn shutdown(&mut self) {
        for e in self.sup.shutdown() {
            tracing::info!(event = %describe(&e), "shard host");
        }
    }
}
