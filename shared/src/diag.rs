//! Remote diagnostics (issue 20): a device's signed answer to an
//! operator's request (`Operation::RequestDiagnostics` in a signed
//! instruction), published on `dev/{device}/diag`.
//!
//! Signed by the device key under its own domain
//! ([`crate::sign::Domain::Diagnostics`]), so it can never pass as a report,
//! ack or request. Size-bounded twice: the sealed bytes are capped
//! ([`MAX_DIAGNOSTICS_BYTES`]) before anything is decoded, and the content
//! is checked against the line and byte caps after ([`Diagnostics::check`]);
//! the sender cuts its oldest lines to fit and says so (`truncated`).

use crate::ids::{DeviceId, KeyId, ShardRef};
use crate::msg::ShardState;
use crate::sign::{self, Domain, KeyPair, OpenError};
use serde::{Deserialize, Serialize};

/// At most this many log lines in one answer.
pub const MAX_LOG_LINES: usize = 200;
/// At most this many bytes of log lines in one answer (all lines together).
pub const MAX_LOG_BYTES: usize = 64 * 1024;
/// A longer line is cut to this many bytes (at a character boundary).
pub const MAX_LINE_BYTES: usize = 1024;
/// At most this many shards and recent errors in the status.
pub const MAX_STATUS_ITEMS: usize = 32;
/// Cap of a sealed answer: the log bytes, the status and the envelope.
pub const MAX_DIAGNOSTICS_BYTES: usize = MAX_LOG_BYTES + 16 * 1024;

/// One shard the agent runs, as the diagnostics show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagShard {
    pub shard: ShardRef,
    pub capability: String,
    pub state: ShardState,
    pub restarts: u32,
    /// The latest failure in words, if any.
    pub last_failure: Option<String>,
}

/// The agent's status at the time of the answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagStatus {
    pub agent_version: String,
    pub uptime_s: u64,
    /// `std::env::consts::ARCH` of the agent.
    pub arch: String,
    pub shards: Vec<DiagShard>,
    /// Where traffic is read from (`ring`, `kernel`, `pcap …`, `off`).
    pub capture_source: String,
    pub broker_connected: bool,
    /// The newest warnings and errors the agent logged.
    pub last_errors: Vec<String>,
}

/// A device's diagnostics answer (signed under [`Domain::Diagnostics`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Diagnostics {
    pub device: DeviceId,
    /// The sequence number of the instruction that asked.
    pub request_seq: u64,
    pub at_ms: u64,
    pub status: DiagStatus,
    /// The agent's most recent log lines, oldest first.
    pub log_lines: Vec<String>,
    /// Older lines were left out to stay within the caps.
    pub truncated: bool,
}

/// Why a diagnostics answer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiagError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error("diagnostics too large: {0}")]
    TooLarge(&'static str),
}

/// Cuts `line` to [`MAX_LINE_BYTES`] at a character boundary.
pub fn clip_line(line: &str) -> String {
    if line.len() <= MAX_LINE_BYTES {
        return line.to_owned();
    }
    let mut cut = MAX_LINE_BYTES;
    while !line.is_char_boundary(cut) {
        cut -= 1;
    }
    line[..cut].to_owned()
}

/// The newest lines of `lines` (oldest first) that fit the caps, and
/// whether any were left out.
pub fn newest_within_caps(lines: &[String]) -> (Vec<String>, bool) {
    let mut out: Vec<String> = Vec::new();
    let mut bytes = 0usize;
    for l in lines.iter().rev() {
        let l = clip_line(l);
        if out.len() == MAX_LOG_LINES || bytes + l.len() > MAX_LOG_BYTES {
            break;
        }
        bytes += l.len();
        out.push(l);
    }
    let truncated = out.len() < lines.len();
    out.reverse();
    (out, truncated)
}

impl Diagnostics {
    /// Checks the content caps (lines, bytes, status items).
    pub fn check(&self) -> Result<(), DiagError> {
        if self.log_lines.len() > MAX_LOG_LINES {
            return Err(DiagError::TooLarge("more than 200 log lines"));
        }
        if self.log_lines.iter().any(|l| l.len() > MAX_LINE_BYTES) {
            return Err(DiagError::TooLarge("a log line over 1024 bytes"));
        }
        if self.log_lines.iter().map(String::len).sum::<usize>() > MAX_LOG_BYTES {
            return Err(DiagError::TooLarge("more than 64 KiB of log lines"));
        }
        if self.status.shards.len() > MAX_STATUS_ITEMS
            || self.status.last_errors.len() > MAX_STATUS_ITEMS
        {
            return Err(DiagError::TooLarge("more than 32 shards or errors"));
        }
        Ok(())
    }

    /// Seals it with the device key.
    pub fn seal(&self, key: &KeyPair) -> Vec<u8> {
        sign::seal(Domain::Diagnostics, self, &[key])
    }
}

/// Opens a sealed answer: at most [`MAX_DIAGNOSTICS_BYTES`] (checked before
/// decoding), domain [`Domain::Diagnostics`], signed by `public_key`, the
/// content within its caps. The caller checks the device against the topic.
pub fn open(bytes: &[u8], public_key: &[u8; 32]) -> Result<Diagnostics, DiagError> {
    if bytes.len() > MAX_DIAGNOSTICS_BYTES {
        return Err(DiagError::TooLarge("sealed answer over the size cap"));
    }
    let kid = KeyId::of_public_key(public_key);
    let (d, _): (Diagnostics, _) =
        sign::open(bytes, Domain::Diagnostics, MAX_DIAGNOSTICS_BYTES, |k| {
            (k == kid).then_some(*public_key)
        })?;
    d.check()?;
    Ok(d)
}
