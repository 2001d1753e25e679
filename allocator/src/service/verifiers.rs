//! The verifier threads: signature verification is the heaviest per-message
//! work, so it runs beside the core. A device always maps to the same thread,
//! so its reports and acks reach the core in the order the broker delivered
//! them. Under load a thread takes what has queued up and hands it to
//! [`verify_batch`](super::core::verify_batch) (one Ed25519 batch); what to
//! do with each message is decided there, not here.
//!
//! Each thread's inbox is a [`ConflatingQueue`]: when reports arrive faster
//! than the service handles them (the core and the store push back through
//! the core's bounded channel), a device's older waiting report is dropped
//! for its newer one (`shardline_reports_conflated_total`), so the MQTT link
//! never stops reading (the broker's queue for this session stays short) and
//! every device's newest report is handled within one pass over the inbox.
//! Acks are never conflated or shed: when too many wait, the link waits.

use super::core::{self, KeyDirectory, ToVerify, VerifierOutput};
use super::inbound::{now_ms, Inbound};
use shardline_allocator_core::service::conflate::{ConflatingQueue, Pushed};
use shardline_allocator_core::service::counters::Metrics;
use shardline_shared::topics::TopicKind;
use shardline_shared::DeviceId;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Most messages a verifier thread checks in one signature batch.
const VERIFY_BATCH: usize = 64;
/// A verifier thread that found fewer messages than this waits
/// [`VERIFY_GATHER`] once for more before checking them.
const VERIFY_GATHER_BELOW: usize = 16;
const VERIFY_GATHER: Duration = Duration::from_millis(1);
/// Reports (of distinct devices: one each) an inbox holds before it sheds
/// new devices' reports: a memory bound (about 150 MB at most per thread
/// with reports of ~600 bytes) far above a fleet's size, so only a flood of
/// messages from more devices than that is shed.
const REPORT_CAP: usize = 262_144;
/// Acks (never conflated) an inbox holds before the link waits for room.
const ACK_CAP: usize = 16_384;

/// One verifier thread's inbox.
struct Inbox {
    queue: Mutex<ConflatingQueue<ToVerify>>,
    ready: Condvar,
    /// The link is gone (or the thread stopped): nothing more comes.
    closed: AtomicBool,
    /// This thread's slot in the oldest-queued gauges.
    index: usize,
}

/// The link's handle on a verifier thread's inbox.
pub struct VerifierTx(Arc<Inbox>);

impl std::fmt::Debug for VerifierTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifierTx")
            .field("index", &self.0.index)
            .finish_non_exhaustive()
    }
}

/// The verifier thread stopped (the core is gone).
#[derive(Debug)]
pub struct Closed;

impl VerifierTx {
    /// Queues a device's report or ack: a report replaces the device's
    /// waiting one (counted); an ack waits for room.
    pub async fn send(&self, msg: ToVerify, metrics: &Metrics) -> Result<(), Closed> {
        loop {
            if self.0.closed.load(Ordering::Relaxed) {
                return Err(Closed);
            }
            {
                let mut q = self.0.queue.lock().map_err(|_| Closed)?;
                let now = now_ms();
                if msg.kind == TopicKind::Report {
                    let device = msg.device.clone();
                    match q.push_report(now, device, msg) {
                        Pushed::Queued => Metrics::add(&metrics.verify_queued, 1),
                        Pushed::Conflated => Metrics::inc(&metrics.reports_conflated),
                        Pushed::Shed => Metrics::inc(&metrics.reports_shed),
                    }
                    note_oldest(&q, &self.0, metrics, now);
                    self.0.ready.notify_one();
                    return Ok(());
                }
                if q.kept() < ACK_CAP {
                    q.push(now, msg);
                    Metrics::add(&metrics.verify_queued, 1);
                    note_oldest(&q, &self.0, metrics, now);
                    self.0.ready.notify_one();
                    return Ok(());
                }
            }
            // Never drop an ack: wait (the broker holds the rest).
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
}

impl Drop for VerifierTx {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Relaxed);
        self.0.ready.notify_all();
    }
}

/// Records when this inbox's oldest message was queued (0: empty), for the
/// `shardline_verify_oldest_queued_seconds` gauge.
fn note_oldest(q: &ConflatingQueue<ToVerify>, inbox: &Inbox, metrics: &Metrics, now: u64) {
    let at = if q.is_empty() {
        0
    } else {
        now - q.oldest_age_ms(now)
    };
    if let Some(slot) = metrics.verify_oldest_at_ms.get(inbox.index) {
        slot.store(at, Ordering::Relaxed);
    }
}

/// Takes up to `VERIFY_BATCH - batch.len()` messages.
fn take(inbox: &Inbox, metrics: &Metrics, batch: &mut Vec<ToVerify>) {
    let Ok(mut q) = inbox.queue.lock() else {
        return;
    };
    let before = batch.len();
    while batch.len() < VERIFY_BATCH {
        match q.pop() {
            Some(m) => batch.push(m),
            None => break,
        }
    }
    metrics
        .verify_queued
        .fetch_sub((batch.len() - before) as u64, Ordering::Relaxed);
    note_oldest(&q, inbox, metrics, now_ms());
}

/// Starts one verifier thread per core (2–8) and returns their inboxes.
pub fn start(
    keys: KeyDirectory,
    core_tx: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    shared_store: bool,
) -> std::io::Result<Vec<VerifierTx>> {
    let n = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let mut senders = Vec::with_capacity(n);
    for i in 0..n {
        let inbox = Arc::new(Inbox {
            queue: Mutex::new(ConflatingQueue::new(REPORT_CAP)),
            ready: Condvar::new(),
            closed: AtomicBool::new(false),
            index: i,
        });
        let (keys, core_tx, metrics) = (keys.clone(), core_tx.clone(), metrics.clone());
        let mine = inbox.clone();
        std::thread::Builder::new()
            .name(format!("verify-{i}"))
            .spawn(move || {
                let inbox = mine;
                let mut batch = Vec::with_capacity(VERIFY_BATCH);
                let mut out = Vec::with_capacity(VERIFY_BATCH);
                loop {
                    {
                        let Ok(mut q) = inbox.queue.lock() else {
                            return;
                        };
                        while q.is_empty() {
                            if inbox.closed.load(Ordering::Relaxed) {
                                return;
                            }
                            q = match inbox.ready.wait_timeout(q, Duration::from_millis(200)) {
                                Ok((q, _)) => q,
                                Err(_) => return,
                            };
                        }
                    }
                    take(&inbox, &metrics, &mut batch);
                    if batch.len() < VERIFY_GATHER_BELOW {
                        // A small batch costs nearly twice the CPU per
                        // signature; a moment's wait lets one form when
                        // messages are flowing, at 1 ms of latency.
                        std::thread::sleep(VERIFY_GATHER);
                        take(&inbox, &metrics, &mut batch);
                    }
                    core::verify_batch(
                        &keys,
                        &metrics,
                        max_payload,
                        shared_store,
                        batch.drain(..),
                        &mut out,
                    );
                    for o in out.drain(..) {
                        let msg = match o {
                            VerifierOutput::Verified(m) => Inbound::Verified(m),
                            VerifierOutput::Unverified { topic, payload } => {
                                Inbound::Mqtt { topic, payload }
                            }
                        };
                        if core_tx.blocking_send(msg).is_err() {
                            inbox.closed.store(true, Ordering::Relaxed);
                            return;
                        }
                    }
                }
            })?;
        senders.push(VerifierTx(inbox));
    }
    Ok(senders)
}

/// The verifier thread a device's messages go to.
pub fn shard_of(device: &DeviceId, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut h);
    (h.finish() % n as u64) as usize
}
