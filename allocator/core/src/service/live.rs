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
}

impl LiveNote {
    /// The device the note is about.
    pub fn device(&self) -> &DeviceId {
        match self {
            LiveNote::Report { device, .. }
            | LiveNote::Instruction { device, .. }
            | LiveNote::Ack { device, .. } => device,
        }
    }

    /// The SSE event name of the note.
    pub fn event(&self) -> &'static str {
        match self {
            LiveNote::Report { .. } => "report",
            LiveNote::Instruction { .. } | LiveNote::Ack { .. } => "instruction",
        }
    }
}
