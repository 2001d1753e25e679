//! [`ShardRuntime`] over the real shard host supervisor
//! (`shardhost::Supervisor`): one sandboxed host process per capability,
//! re-executing this binary in host mode, with restart/backoff/quarantine.
//!
//! Loading is asynchronous (the host verifies the library's hash, owner and
//! mode before loading it), so `activate` only fails when no host could be
//! set up at all; a library refused later shows in the shard's reported
//! status (`LoadRefused`) with the next QoS window.
//!
//! Each `ShardActivation` becomes a `ShardSpec` with its alternatives; the
//! supervisor fails over locally (and isolates a failing shard from its
//! siblings where the capability allows), and this runtime logs what it did
//! with structured fields (device, capability, from, to, reason) — the
//! report's statuses carry the same facts to the cloud.

use super::runtime::{RuntimeError, ShardRuntime};
use crate::shardhost::{HostEvent, SealKey, ShardSpec, Supervisor, SupervisorConfig};
use shardline_shared::msg::{ShardActivation, ShardStatus};
use shardline_shared::sign::KeyPair;
use shardline_shared::DeviceId;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

/// See the module docs.
#[derive(Debug)]
pub struct SupervisedRuntime {
    sup: Supervisor,
    device: Option<DeviceId>,
}

impl SupervisedRuntime {
    /// A supervisor for shards in `shard_dir`, run by this executable.
    pub fn new(shard_dir: &Path) -> Result<Self, RuntimeError> {
        let cfg = SupervisorConfig::new(shard_dir).map_err(|e| RuntimeError(e.to_string()))?;
        Ok(Self::with_config(cfg))
    }

    /// A runtime over a supervisor configured by the caller (tests).
    pub fn with_config(cfg: SupervisorConfig) -> Self {
        Self {
            device: cfg.seal_key.as_ref().map(|k| k.device.clone()),
            sup: Supervisor::new(cfg),
        }
    }

    fn log(&self, e: &HostEvent) {
        let device = self.device.as_ref().map_or("-", |d| d.as_str());
        match e {
            HostEvent::FailedOver {
                capability,
                from,
                to,
                reason,
            } => tracing::warn!(
                device,
                capability = %capability,
                from = %from,
                to = %to,
                reason = %reason,
                "failed over locally to an alternative shard"
            ),
            HostEvent::Isolated {
                capability,
                shard,
                for_good,
            } => tracing::warn!(
                device,
                capability = %capability,
                shard = %shard,
                for_good,
                "failing shard isolated from its siblings"
            ),
            other => tracing::info!(device, event = %describe(other), "shard host"),
        }
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
        shards: &[ShardActivation],
        _now_ms: u64,
    ) -> Result<(), RuntimeError> {
        let specs = shards
            .iter()
            .map(ShardSpec::from_shard_activation)
            .collect();
        let events = self
            .sup
            .activate(capability, specs, Instant::now())
            .map_err(|e| RuntimeError(e.to_string()))?;
        for e in &events {
            self.log(e);
        }
        Ok(())
    }

    fn set_device_key(&mut self, device: &DeviceId, key: &KeyPair) {
        self.device = Some(device.clone());
        self.sup.set_seal_key(SealKey {
            device: device.clone(),
            key: Arc::new(key.clone()),
        });
    }

    fn deactivate(&mut self, capability: &str, _now_ms: u64) {
        for e in self.sup.deactivate(capability) {
            self.log(&e);
        }
    }

    fn poll(&mut self, _now_ms: u64) -> Vec<String> {
        let events = self.sup.poll(Instant::now());
        for e in &events {
            if matches!(e, HostEvent::FailedOver { .. } | HostEvent::Isolated { .. }) {
                self.log(e);
            }
        }
        events.iter().map(describe).collect()
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
