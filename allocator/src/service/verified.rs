//! The core's inbox for what the verifier threads checked: how the service
//! degrades instead of collapsing when reports arrive faster than the core
//! and the store handle them.
//!
//! A [`ConflatingQueue`]: when a device's newer verified report arrives while
//! its older one still waits, the older one is dropped (counted in
//! `shardline_reports_conflated_total`), so it holds at most one report per
//! device and every device's NEWEST report reaches the core within one pass
//! over it. Conflation happens only AFTER the signature check: a forged
//! report (bad signature) can never displace a device's genuine one. Acks,
//! bad-signature events and messages the core verifies itself are never
//! conflated or shed; when too many of them wait, the verifier thread waits
//! (and the MQTT link behind it). Enrolments, explicit requests and
//! statuses do not pass here at all (the link sends them to the core).
//!
//! Wake-up: the core blocks on its channel; a verifier that queues something
//! sends it one [`Inbound::VerifiedReady`] unless one is already on its way
//! (`pending`). The core clears `pending` BEFORE it takes messages, so a
//! message queued after the core's last take always sends a new token.

use super::core::VerifiedMsg;
use super::inbound::{now_ms, Inbound};
use shardline_allocator_core::service::conflate::{ConflatingQueue, Pushed};
use shardline_allocator_core::service::counters::Metrics;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::mpsc;

/// Reports (one per device) the inbox holds before it sheds new devices'
/// reports: a memory bound (~300 MB of decoded reports at most) far above
/// a fleet's size.
const REPORT_CAP: usize = 262_144;
/// Other messages (acks …) it holds before the verifier threads wait.
const KEPT_CAP: usize = 16_384;

/// See the module doc.
#[derive(Debug)]
pub struct VerifiedInbox {
    queue: Mutex<ConflatingQueue<Inbound>>,
    pending: AtomicBool,
}

/// The core is gone.
#[derive(Debug)]
pub struct Closed;

impl Default for VerifiedInbox {
    fn default() -> Self {
        Self {
            queue: Mutex::new(ConflatingQueue::new(REPORT_CAP)),
            pending: AtomicBool::new(false),
        }
    }
}

impl VerifiedInbox {
    /// Queues a verifier thread's output (blocking while too many
    /// unconflatable messages wait) and wakes the core.
    pub fn push(
        &self,
        msg: Inbound,
        metrics: &Metrics,
        core_tx: &mpsc::Sender<Inbound>,
    ) -> Result<(), Closed> {
        let mut msg = Some(msg);
        while let Some(m) = msg.take() {
            let mut q = self.queue.lock().map_err(|_| Closed)?;
            let now = now_ms();
            match m {
                Inbound::Verified(VerifiedMsg::Report(device, report)) => {
                    let m = Inbound::Verified(VerifiedMsg::Report(device.clone(), report));
                    match q.push_report(now, device, m) {
                        Pushed::Queued => {}
                        Pushed::Conflated => Metrics::inc(&metrics.reports_conflated),
                        Pushed::Shed => Metrics::inc(&metrics.reports_shed),
                    }
                }
                m if q.kept() < KEPT_CAP => q.push(now, m),
                m => {
                    // Never drop an ack: wait for the core to take some.
                    drop(q);
                    if core_tx.is_closed() {
                        return Err(Closed);
                    }
                    std::thread::sleep(Duration::from_millis(1));
                    msg = Some(m);
                    continue;
                }
            }
            self.note(&q, metrics, now);
        }
        if !self.pending.swap(true, Ordering::AcqRel) {
            core_tx
                .blocking_send(Inbound::VerifiedReady)
                .map_err(|_| Closed)?;
        }
        Ok(())
    }

    /// The core takes up to `max` messages (after clearing `pending`).
    pub fn take(&self, max: usize, out: &mut Vec<Inbound>, metrics: &Metrics) {
        self.pending.store(false, Ordering::Release);
        let Ok(mut q) = self.queue.lock() else {
            return;
        };
        for _ in 0..max {
            match q.pop() {
                Some(m) => out.push(m),
                None => break,
            }
        }
        self.note(&q, metrics, now_ms());
    }

    /// Verified reports the core has not taken yet.
    pub fn reports_waiting(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len() - q.kept())
    }

    /// Whether messages wait (the core then must not block on its channel).
    pub fn is_empty(&self) -> bool {
        self.queue.lock().map_or(true, |q| q.is_empty())
    }

    /// The overload gauges: depth, and when the oldest waiting message was
    /// queued (0: none).
    fn note(&self, q: &ConflatingQueue<Inbound>, metrics: &Metrics, now: u64) {
        metrics.inbox_depth.store(q.len() as u64, Ordering::Relaxed);
        let at = if q.is_empty() {
            0
        } else {
            now - q.oldest_age_ms(now)
        };
        metrics.inbox_oldest_at_ms.store(at, Ordering::Relaxed);
    }
}
