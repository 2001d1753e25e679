//! Live notes: what the core accepted or sent in a step (a report, an
//! instruction, an ack), with the device it concerns. The runner hands
//! them to the dashboard's event stream only after the step's batch is
//! committed, so a browser never sees something the store could lose.
//! Notes are small and never read back by the core.

use serde::{Deserialize, Serialize};
use shardline_shared::ids::DeviceId;

/// One thing that happened in a step, for the live event stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LiveNote {
    /// A signed report was accepted (in sequence).
    Report {
        device: DeviceId,
        seq: u64,
        at_ms: u64,
    },
    /// A new signed instruction was sent.
    Instruction {
        device: DeviceId,
        seq: u64,
        at_ms: u64,
    },
    /// The device acknowledged an instruction (`outcome` in words:
    /// applied, duplicate, rejected, failed).
    Ack {
        device: DeviceId,
        seq: u64,
        outcome: String,
        at_ms: u64,
    },
    /// A staged rollout moved (staged, promoted, rolled back), with why.
    Rollout {
        shard: String,
        phase: String,
        reason: String,
        at_ms: u64,
    },
    /// A device's signed diagnostics answer was accepted and stored.
    Diagnostics { device: DeviceId, at_ms: u64 },
}

impl LiveNote {
    /// The device the note is about (none for a fleet-wide rollout).
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            LiveNote::Report { device, .. }
            | LiveNote::Instruction { device, .. }
            | LiveNote::Ack { device, .. }
            | LiveNote::Diagnostics { device, .. } => Some(device),
            LiveNote::Rollout { .. } => None,
        }
    }

    /// The SSE event name of the note.
    pub fn event(&self) -> &'static str {
        match self {
            LiveNote::Report { .. } => "report",
            LiveNote::Instruction { .. } | LiveNote::Ack { .. } => "instruction",
            LiveNote::Rollout { .. } => "rollout",
            LiveNote::Diagnostics { .. } => "diagnostics",
        }
    }
}
