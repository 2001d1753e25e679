//! Remote diagnostics (issue 20): an operator asks a device for its recent
//! log lines and status; the ask is a signed instruction
//! (`Operation::RequestDiagnostics`, sequence-numbered and replay-protected
//! like any other), the device answers with a [`Diagnostics`] signed by its
//! own key on `dev/{id}/diag`.
//!
//! An answer is kept only when it is within the size caps (checked before
//! decoding), verifies under the device's enrolled key, names the device of
//! its topic, and answers an ask of this instance newer than the answer
//! kept: anything else is refused and counted
//! (`shardline_diagnostics_refused_total`). The latest answer per device
//! is stored (one blob per device in both stores) and shown by
//! `GET /v1/devices/{id}/diagnostics`.

use super::*;
use shardline_shared::diag::{self, Diagnostics};
use shardline_shared::msg::Operation;

/// Asks kept per device (the newest): a device answers within seconds.
const ASKS_KEPT: usize = 4;

/// The latest answer of a device as stored and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredDiagnostics {
    /// When this allocator received it.
    pub received_at_ms: u64,
    pub answer: Diagnostics,
}

/// `GET /v1/devices/{id}/diagnostics`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiagnosticsView {
    pub device: String,
    /// The device's time of the answer.
    pub at_ms: u64,
    pub received_at_ms: u64,
    pub request_seq: u64,
    pub status: diag::DiagStatus,
    pub log_lines: Vec<String>,
    pub truncated: bool,
    /// Instruction numbers of asks not answered yet.
    pub pending_asks: Vec<u64>,
}

impl Core {
    /// Restores the stored answers (at start).
    pub fn restore_diagnostics(&mut self, stored: Vec<(DeviceId, Vec<u8>)>) {
        for (device, bytes) in stored {
            match postcard::from_bytes::<StoredDiagnostics>(&bytes) {
                Ok(d) => {
                    self.diagnostics.insert(device, d);
                }
                Err(e) => {
                    tracing::warn!(%device, error = %e, "stored diagnostics unreadable; dropped")
                }
            }
        }
    }

    /// The operator asks `device` for its diagnostics: a signed instruction.
    pub(super) fn ask_diagnostics(&mut self, now_ms: u64, device: &DeviceId) -> Reply {
        if !self.records.contains_key(device) {
            return Reply::Error(CommandError::UnknownDevice(device.to_string()));
        }
        let ttl = self.engine.config().instruction_ttl_ms;
        let ops = vec![Operation::RequestDiagnostics {
            max_lines: diag::MAX_LOG_LINES as u16,
        }];
        let Some(seq) = self.instruct(now_ms, device, ops, now_ms.saturating_add(ttl)) else {
            return Reply::Error(CommandError::Invalid(
                "the request could not be signed".into(),
            ));
        };
        self.dirty.insert(device.clone());
        let asks = self.diag_asked.entry(device.clone()).or_default();
        asks.push(seq);
        if asks.len() > ASKS_KEPT {
            asks.remove(0);
        }
        tracing::info!(%device, seq, "diagnostics asked");
        Reply::DiagnosticsAsked { seq }
    }

    fn refuse_diagnostics(&self, device: &DeviceId, why: &str) {
        Metrics::inc(&self.metrics.diagnostics_refused);
        tracing::warn!(%device, reason = why, "diagnostics answer refused");
    }

    /// A message on `dev/{device}/diag`.
    pub(super) fn on_diagnostics(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        let Some(public) = self.records.get(&device).map(|r| r.public_key) else {
            return self.refuse_diagnostics(&device, "device not enrolled");
        };
        let answer = match diag::open(payload, &public) {
            Ok(a) => a,
            Err(e) => return self.refuse_diagnostics(&device, &e.to_string()),
        };
        if answer.device != device {
            return self.refuse_diagnostics(&device, "names another device than its topic");
        }
        let asked = self
            .diag_asked
            .get(&device)
            .is_some_and(|a| a.contains(&answer.request_seq));
        if !asked {
            return self.refuse_diagnostics(&device, "answers no ask of this allocator");
        }
        if self
            .diagnostics
            .get(&device)
            .is_some_and(|d| d.answer.request_seq >= answer.request_seq)
        {
            return self.refuse_diagnostics(&device, "not newer than the answer kept");
        }
        if let Some(a) = self.diag_asked.get_mut(&device) {
            a.retain(|&s| s > answer.request_seq);
        }
        Metrics::inc(&self.metrics.diagnostics_received);
        tracing::info!(
            %device,
            seq = answer.request_seq,
            lines = answer.log_lines.len(),
            truncated = answer.truncated,
            "diagnostics received"
        );
        let stored = StoredDiagnostics {
            received_at_ms: now_ms,
            answer,
        };
        self.step.batch.diagnostics.push((
            device.clone(),
            postcard::to_stdvec(&stored).unwrap_or_default(),
        ));
        self.step.live.push(super::live::LiveNote::Diagnostics {
            device: device.clone(),
            at_ms: now_ms,
        });
        self.diagnostics.insert(device, stored);
    }

    /// An unenrolled device's diagnostics go with it (an empty blob
    /// deletes the stored one).
    pub(super) fn forget_diagnostics(&mut self, device: &DeviceId) {
        self.diag_asked.remove(device);
        if self.diagnostics.remove(device).is_some() {
            self.step
                .batch
                .diagnostics
                .push((device.clone(), Vec::new()));
        }
    }

    pub(super) fn diagnostics_view(&self, device: &DeviceId) -> Reply {
        if !self.records.contains_key(device) {
            return Reply::Error(CommandError::UnknownDevice(device.to_string()));
        }
        let pending_asks = self.diag_asked.get(device).cloned().unwrap_or_default();
        match self.diagnostics.get(device) {
            Some(d) => Reply::Diagnostics(Box::new(DiagnosticsView {
                device: device.to_string(),
                at_ms: d.answer.at_ms,
                received_at_ms: d.received_at_ms,
                request_seq: d.answer.request_seq,
                status: d.answer.status.clone(),
                log_lines: d.answer.log_lines.clone(),
                truncated: d.answer.truncated,
                pending_asks,
            })),
            None => Reply::Error(CommandError::Invalid(format!(
                "no diagnostics from {device} yet{}",
                if pending_asks.is_empty() {
                    " (ask: POST /v1/devices/ID/diagnostics)"
                } else {
                    " (asked; waiting for the answer)"
                }
            ))),
        }
    }
}
