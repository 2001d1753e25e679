//! Flow control between the embedded broker's front door and the
//! allocator's MQTT link: devices are never allowed to get further ahead of
//! the link than the broker can hold.
//!
//! Why: rumqttd acknowledges a publish once it is in its in-memory log (one
//! per subscription filter, `max_segment_size` × `max_segment_count`), and
//! when a subscriber lags by more than that log it drops the oldest segment
//! and moves the subscriber past it: acknowledged reports vanish, silently.
//! rumqttd has no back-pressure of its own. So the front
//! (`broker_acl::front`, in front of every embedded broker) asks this gate
//! before it passes a device's publish on: while the publishes on topics
//! the link reads that went in but have not come out of the link exceed
//! [`WINDOW_BYTES`] (an eighth of one filter's log), the front stops reading
//! that connection, TCP pushes back, and the device's PUBACKs wait. Nothing
//! acknowledged is dropped; devices slow down to what the allocator takes
//! off the broker, which under overload is far more than it verifies (the
//! link hands reports to the conflating stage in `verifiers.rs` and goes
//! straight back).
//!
//! Counted on both sides: the topic and payload bytes of publishes on the
//! plain device topics the link subscribes to ([`counts`]). A publish the
//! link never gets (sent before the link subscribed, or while it was away
//! on a clean session) would hold the gate shut for good; so when the gate
//! has been shut for [`STALL`] with nothing coming out of the link, it is
//! opened again (logged): better a possible loss inside the broker than a
//! fleet that cannot publish.

use shardline_shared::topics;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// Bytes the link may be behind the front: an eighth of one filter's log
/// in the embedded broker (16 MiB × 4), so even a publish of the largest
/// size allowed cannot push a subscriber out of it.
pub const WINDOW_BYTES: i64 = 8 << 20;
/// How long the gate stays shut with nothing coming out of the link before
/// it assumes the rest will never arrive and opens.
pub const STALL: Duration = Duration::from_secs(2);

/// See the module doc. One per allocator process.
#[derive(Debug, Default)]
pub struct IngestGate {
    /// Bytes passed in by the front and not yet taken by the link.
    behind: AtomicI64,
    /// Front connections waiting for room (the link wakes them only then).
    waiting: AtomicUsize,
    taken: Notify,
}

/// Whether a publish on `topic` reaches the MQTT link (and so is counted):
/// the plain device uplinks it subscribes to. Group-routed uplinks are not
/// gated (an instance holds only some groups' filters).
pub fn counts(topic: &str) -> bool {
    matches!(topics::parse_routed(topic), Some((None, _, kind)) if kind.is_uplink())
}

impl IngestGate {
    /// The front: waits until the link is less than [`WINDOW_BYTES`]
    /// behind, then counts `bytes` in.
    pub async fn admit(&self, bytes: usize) {
        let bytes = bytes as i64;
        if self.behind.load(Ordering::Acquire) < WINDOW_BYTES {
            self.behind.fetch_add(bytes, Ordering::AcqRel);
            return;
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let mut stalled = 0;
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            // Registered before the check: a take after it wakes us.
            taken.as_mut().enable();
            let behind = self.behind.load(Ordering::Acquire);
            if behind < WINDOW_BYTES {
                break;
            }
            if tokio::time::timeout(STALL, taken).await.is_err() {
                stalled += 1;
                // Nothing came out of the link for a while: what is
                // counted will not come (see the module doc).
                tracing::warn!(
                    behind_bytes = behind,
                    stalled_s = stalled * STALL.as_secs(),
                    "embedded broker: the MQTT link took nothing while devices waited; letting them publish again"
                );
                self.behind.store(0, Ordering::Release);
            }
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.behind.fetch_add(bytes, Ordering::AcqRel);
    }

    /// The link: a publish of `bytes` on a counted topic came out.
    pub fn taken(&self, bytes: usize) {
        let bytes = bytes as i64;
        // Never below zero: retained messages the link gets on subscribing
        // were not counted in.
        let _ = self
            .behind
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some((b - bytes).max(0))
            });
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.taken.notify_waiters();
        }
    }

    /// Whether [`admit`](Self::admit) would wait now.
    pub fn is_shut(&self) -> bool {
        self.behind.load(Ordering::Acquire) >= WINDOW_BYTES
    }

    /// Bytes the link is behind the front now.
    pub fn behind(&self) -> i64 {
        self.behind.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn only_the_plain_uplinks_the_link_reads_are_counted() {
        assert!(counts("shardline/v1/dev/d1/report"));
        assert!(counts("shardline/v1/dev/d1/ack"));
        assert!(counts("shardline/v1/dev/d1/status"));
        assert!(!counts("shardline/v1/dev/d1/instr"));
        assert!(!counts("shardline/v1/dev/d1/answer"));
        assert!(!counts("something/else"));
    }

    #[tokio::test]
    async fn the_front_waits_while_the_link_is_a_window_behind() {
        let gate = Arc::new(IngestGate::default());
        gate.admit(WINDOW_BYTES as usize).await;
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.admit(100).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "a window behind: the front waits");
        gate.taken(1_000);
        waiter.await.unwrap();
        assert_eq!(gate.behind(), WINDOW_BYTES - 1_000 + 100);
    }

    #[tokio::test]
    async fn a_gate_nothing_comes_out_of_opens_after_the_stall() {
        let gate = IngestGate::default();
        gate.admit(WINDOW_BYTES as usize).await;
        let t = tokio::time::Instant::now();
        gate.admit(10).await;
        assert!(t.elapsed() >= STALL);
        assert_eq!(gate.behind(), 10);
    }

    #[test]
    fn retained_messages_never_make_it_negative() {
        let gate = IngestGate::default();
        gate.taken(500);
        assert_eq!(gate.behind(), 0);
    }
}
