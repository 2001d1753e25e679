//! The narrow interfaces the daemon needs from the rest of the agent, so its
//! loop is written (and tested) against behaviour rather than against the
//! shard host or the capture code directly:
//!
//! - [`ShardRuntime`]: starts/stops one host per capability and reports
//!   shard status (implemented over `shardhost::Supervisor`);
//! - [`QosSource`]: closes QoS windows (implemented over `monitor::Pipeline`).
//!
//! [`Unhosted`] and [`NoCapture`] are the honest fallbacks when a build or a
//! configuration has no shard hosting or no capture: they run nothing and say
//! so in the reported status, they never pretend.

use shardline_shared::msg::{
    ClassStats, Enforcement, ShardActivation, ShardFailure, ShardState, ShardStatus,
};
use shardline_shared::sign::KeyPair;
use shardline_shared::DeviceId;
use std::collections::BTreeMap;

/// Why a capability could not be started.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct RuntimeError(pub String);

/// One host process per capability, started with exactly the given shards.
pub trait ShardRuntime {
    /// (Re)starts `capability` with `shards` (replacing what it ran before).
    /// Each activation brings its alternatives: the runtime fails over to
    /// them on its own and says so in [`ShardRuntime::statuses`].
    fn activate(
        &mut self,
        capability: &str,
        shards: &[ShardActivation],
        now_ms: u64,
    ) -> Result<(), RuntimeError>;
    /// The device identity that opens sealed shard configuration; given
    /// once, before the first `activate`. A runtime that runs nothing
    /// ignores it.
    fn set_device_key(&mut self, _device: &DeviceId, _key: &KeyPair) {}
    /// Stops `capability`'s host; stopping an unknown capability is a no-op.
    fn deactivate(&mut self, capability: &str, now_ms: u64);
    /// Drives restarts, backoff and health checks; returns notable events
    /// as log lines.
    fn poll(&mut self, now_ms: u64) -> Vec<String>;
    /// Status of every shard the runtime knows.
    fn statuses(&mut self, now_ms: u64) -> Vec<ShardStatus>;
    /// Stops every host (SIGTERM path).
    fn shutdown(&mut self);
}

/// One closed QoS window.
#[derive(Debug, Clone, PartialEq)]
pub struct QosWindow {
    pub start_ms: u64,
    pub window_ms: u32,
    pub classes: Vec<ClassStats>,
}

/// Something that measures traffic and closes windows.
pub trait QosSource {
    /// The window that closed at or before `now`, if one did.
    fn poll_window(&mut self, now_ms: u64) -> Option<QosWindow>;
    /// Changes the window length (configuration reload).
    fn set_window(&mut self, window_ms: u32);
}

/// No capture configured (or possible): windows close on time, with no
/// traffic classes in them.
#[derive(Debug)]
pub struct NoCapture {
    window_ms: u32,
    start_ms: Option<u64>,
}

impl NoCapture {
    pub fn new(window_ms: u32) -> Self {
        Self {
            window_ms,
            start_ms: None,
        }
    }
}

impl QosSource for NoCapture {
    fn poll_window(&mut self, now_ms: u64) -> Option<QosWindow> {
        let start = *self.start_ms.get_or_insert(now_ms);
        if now_ms < start + u64::from(self.window_ms) {
            return None;
        }
        self.start_ms = Some(now_ms);
        Some(QosWindow {
            start_ms: start,
            window_ms: u32::try_from(now_ms - start).unwrap_or(u32::MAX),
            classes: Vec::new(),
        })
    }

    fn set_window(&mut self, window_ms: u32) {
        self.window_ms = window_ms;
    }
}

/// No shard hosting available: every activation is refused and reported as
/// such, so the allocator sees failures instead of a fake "running".
#[derive(Debug, Default)]
pub struct Unhosted {
    refused: BTreeMap<String, Vec<ShardActivation>>,
}

impl ShardRuntime for Unhosted {
    fn activate(
        &mut self,
        capability: &str,
        shards: &[ShardActivation],
        _now_ms: u64,
    ) -> Result<(), RuntimeError> {
        self.refused.insert(capability.to_owned(), shards.to_vec());
        Err(RuntimeError(
            "this agent has no shard host available".to_owned(),
        ))
    }

    fn deactivate(&mut self, capability: &str, _now_ms: u64) {
        self.refused.remove(capability);
    }

    fn poll(&mut self, _now_ms: u64) -> Vec<String> {
        Vec::new()
    }

    fn statuses(&mut self, _now_ms: u64) -> Vec<ShardStatus> {
        self.refused
            .values()
            .flatten()
            .map(|a| ShardStatus {
                shard: a.primary.shard.clone(),
                capability: a.capability.clone(),
                state: ShardState::Stopped,
                cpu_permille: 0,
                rss_kib: 0,
                restarts: 0,
                errors: 1,
                last_failure: Some(ShardFailure::LoadRefused {
                    reason: "no shard host available".into(),
                }),
                lease_expires_at_ms: a.lease_expires_at_ms,
                enforcement: Enforcement::RlimitsOnly,
            })
            .collect()
    }

    fn shutdown(&mut self) {
        self.refused.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_capture_closes_windows_on_time() {
        let mut s = NoCapture::new(100);
        assert_eq!(s.poll_window(1_000), None);
        assert_eq!(s.poll_window(1_099), None);
        let w = s.poll_window(1_100).unwrap();
        assert_eq!((w.start_ms, w.window_ms), (1_000, 100));
        assert!(w.classes.is_empty());
        assert_eq!(s.poll_window(1_150), None);
    }
}
