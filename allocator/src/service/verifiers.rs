//! The verifier threads: signature verification is the heaviest per-message
//! work, so it runs beside the core. A device always maps to the same thread,
//! so its reports and acks reach the core in the order the broker delivered
//! them. Under load a thread takes what has queued up and hands it to
//! [`verify_batch`](super::core::verify_batch) (one Ed25519 batch); what to
//! do with each message is decided there, not here. What comes out goes
//! into the core's [`VerifiedInbox`], which conflates a device's verified
//! reports under overload.
//!
//! When the core falls behind (more than [`VERIFIED_AHEAD`] verified
//! reports wait for it), the threads hold back: a report checked then is
//! mostly replaced by a newer one before the core gets to it, conflated
//! after its check, and that CPU is what the core lacks. Left in the queue
//! in front, such reports are conflated before their check instead.
//!
//! In front of each thread is its [`UnverifiedQueue`] (the core crate's
//! `service::preverify`): the MQTT link puts a report there and goes back to
//! the broker at once, so it never falls behind the broker, whose
//! acknowledged messages would otherwise be lost (the embedded rumqttd
//! skips a slow subscriber ahead, see ARCHITECTURE.md). The queue keeps a
//! few of each device's newest reports and hands out the newest first; acks
//! are never dropped (the link waits for room for them).

use super::core::{self, KeyDirectory, ToVerify, VerifiedMsg, VerifierOutput};
use super::inbound::Inbound;
use super::verified::VerifiedInbox;
use shardline_allocator_core::service::counters::Metrics;
use shardline_allocator_core::service::preverify::{Taken, UnverifiedQueue};
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
/// Verified reports waiting for the core beyond which the verifier threads
/// hold back (about a tenth of a second of the core's work): see
/// [`verifier_thread`].
const VERIFIED_AHEAD: usize = 2_048;
/// Unverified reports a device may have waiting: the newest and a few
/// behind it, in case the newest is a forgery or garbled.
pub const REPORTS_PER_DEVICE: usize = 4;
/// Reports waiting for all verifier threads together beyond which the
/// stage conflates (overload); below it every report is checked in order.
pub const CONFLATE_ABOVE: usize = 4_096;
/// Report payload waiting for all verifier threads together: the memory
/// bound of this stage (30,000 devices × 4 reports of ~400 bytes fit).
pub const REPORT_BYTES: usize = 64 << 20;
/// Acks waiting for all verifier threads together (count and payload)
/// before the MQTT link waits for room.
const OTHER_COUNT: usize = 16_384;
const OTHER_BYTES: usize = 16 << 20;

/// One verifier thread's waiting messages.
#[derive(Debug)]
struct Shard {
    queue: Mutex<UnverifiedQueue<ToVerify>>,
    wake: Condvar,
    closed: AtomicBool,
}

/// The verifier threads as the MQTT link sees them: where it hands device
/// reports and acks. Dropping it stops the threads.
#[derive(Debug)]
pub struct Verifiers {
    shards: Vec<Arc<Shard>>,
}

/// The verifier threads are gone (the core stopped).
#[derive(Debug, thiserror::Error)]
#[error("the verifier threads stopped")]
pub struct VerifiersStopped;

impl Verifiers {
    /// Queues a device's report or ack for its verifier thread. A report
    /// never waits (an older one of its device may be shed, counted in
    /// `shardline_reports_shed_total`); an ack waits while too many wait.
    pub async fn push(&self, msg: ToVerify, metrics: &Metrics) -> Result<(), VerifiersStopped> {
        let shard = &self.shards[shard_of(&msg.device, self.shards.len())];
        let bytes = msg.payload.len();
        let mut msg = Some(msg);
        while let Some(m) = msg.take() {
            if shard.closed.load(Ordering::Acquire) {
                return Err(VerifiersStopped);
            }
            {
                let mut q = shard.queue.lock().map_err(|_| VerifiersStopped)?;
                if m.kind == TopicKind::Report {
                    let shed = q.push_report(m.device.clone(), m, bytes);
                    if shed > 0 {
                        metrics.reports_shed.fetch_add(shed, Ordering::Relaxed);
                    }
                } else if !q.must_wait() {
                    q.push_other(m.device.clone(), m, bytes);
                } else {
                    msg = Some(m);
                }
            }
            if msg.is_some() {
                // Never drop an ack: wait for the verifier to take some
                // (the link backs up for acks alone).
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        shard.wake.notify_one();
        Ok(())
    }

    /// A reader of the stages' depth (it shares the queues; dropping the
    /// `Verifiers` still stops the threads).
    pub fn probe(&self) -> StageProbe {
        StageProbe {
            shards: self.shards.clone(),
        }
    }
}

/// Reads the depth of every verifier thread's unverified stage (for
/// `/metrics`; see [`Verifiers::probe`]).
#[derive(Debug, Clone)]
pub struct StageProbe {
    shards: Vec<Arc<Shard>>,
}

impl StageProbe {
    /// (reports, acks, report bytes, ack bytes) waiting, all threads.
    pub fn read(&self) -> (u64, u64, u64, u64) {
        let mut out = (0, 0, 0, 0);
        for s in &self.shards {
            if let Ok(q) = s.queue.lock() {
                let ((r, a), (rb, ab)) = (q.depth(), q.bytes());
                out.0 += r as u64;
                out.1 += a as u64;
                out.2 += rb as u64;
                out.3 += ab as u64;
            }
        }
        out
    }
}

impl Drop for Verifiers {
    fn drop(&mut self) {
        for s in &self.shards {
            s.closed.store(true, Ordering::Release);
            s.wake.notify_all();
        }
    }
}

/// Starts one verifier thread per core (2–8) and returns their inboxes.
pub fn start(
    keys: KeyDirectory,
    core_tx: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    shared_store: bool,
    inbox: Arc<VerifiedInbox>,
) -> std::io::Result<Verifiers> {
    let n = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let mut shards = Vec::with_capacity(n);
    for i in 0..n {
        let shard = Arc::new(Shard {
            queue: Mutex::new(UnverifiedQueue::new(
                REPORTS_PER_DEVICE,
                CONFLATE_ABOVE / n,
                REPORT_BYTES / n,
                OTHER_COUNT / n,
                OTHER_BYTES / n,
            )),
            wake: Condvar::new(),
            closed: AtomicBool::new(false),
        });
        let (keys, core_tx, metrics) = (keys.clone(), core_tx.clone(), metrics.clone());
        let (inbox, s) = (inbox.clone(), shard.clone());
        std::thread::Builder::new()
            .name(format!("verify-{i}"))
            .spawn(move || {
                verifier_thread(
                    &s,
                    &keys,
                    &core_tx,
                    &metrics,
                    max_payload,
                    shared_store,
                    &inbox,
                )
            })?;
        shards.push(shard);
    }
    Ok(Verifiers { shards })
}

/// One verifier thread: take a batch, check it, settle its candidates,
/// hand the results to the core's inbox.
fn verifier_thread(
    shard: &Shard,
    keys: &KeyDirectory,
    core_tx: &mpsc::Sender<Inbound>,
    metrics: &Metrics,
    max_payload: usize,
    shared_store: bool,
    inbox: &VerifiedInbox,
) {
    let mut taken: Vec<Taken<ToVerify>> = Vec::with_capacity(VERIFY_BATCH);
    let mut out = Vec::with_capacity(VERIFY_BATCH);
    let mut candidates: Vec<DeviceId> = Vec::new();
    loop {
        {
            let Ok(mut q) = shard.queue.lock() else {
                return;
            };
            // The core is behind: reports checked now would mostly be
            // replaced by newer ones before it gets to them (conflated
            // AFTER their check, CPU the core needs). Left here instead,
            // they are conflated BEFORE it once enough wait. Acks must not
            // make the link wait for this (the core may itself be waiting
            // on the link to publish), so past half their bound the thread
            // checks on.
            while inbox.reports_waiting() >= VERIFIED_AHEAD && !q.others_half_full() {
                if shard.closed.load(Ordering::Acquire) || core_tx.is_closed() {
                    return;
                }
                drop(q);
                std::thread::sleep(Duration::from_millis(1));
                q = match shard.queue.lock() {
                    Ok(q) => q,
                    Err(_) => return,
                };
            }
            while !q.has_ready() {
                if shard.closed.load(Ordering::Acquire) {
                    return;
                }
                q = match shard.wake.wait_timeout(q, Duration::from_millis(100)) {
                    Ok((q, _)) => q,
                    Err(_) => return,
                };
            }
            q.take(VERIFY_BATCH, &mut taken);
        }
        if taken.len() < VERIFY_GATHER_BELOW {
            // A small batch costs nearly twice the CPU per signature; a
            // moment's wait lets one form when messages are flowing, at
            // 1 ms of latency.
            std::thread::sleep(VERIFY_GATHER);
            if let Ok(mut q) = shard.queue.lock() {
                q.take(VERIFY_BATCH, &mut taken);
            }
        }
        candidates.extend(
            taken
                .iter()
                .filter(|t| t.candidate)
                .map(|t| t.device.clone()),
        );
        core::verify_batch(
            keys,
            metrics,
            max_payload,
            shared_store,
            taken.drain(..).map(|t| t.item),
            &mut out,
        );
        if !candidates.is_empty() {
            // A candidate is its device's only message in the batch, so a
            // verified report of that device is the candidate itself.
            let verified = |d: &DeviceId| {
                out.iter().any(
                    |o| matches!(o, VerifierOutput::Verified(VerifiedMsg::Report(v, _)) if v == d),
                )
            };
            let settled: Vec<(DeviceId, bool)> = candidates
                .drain(..)
                .map(|d| {
                    let ok = verified(&d);
                    (d, ok)
                })
                .collect();
            if let Ok(mut q) = shard.queue.lock() {
                let mut conflated = 0;
                for (d, ok) in &settled {
                    conflated += q.finish(d, *ok);
                }
                if conflated > 0 {
                    metrics
                        .reports_conflated
                        .fetch_add(conflated, Ordering::Relaxed);
                }
            }
        }
        for o in out.drain(..) {
            let msg = match o {
                VerifierOutput::Verified(m) => Inbound::Verified(m),
                VerifierOutput::Unverified { topic, payload } => Inbound::Mqtt { topic, payload },
            };
            if inbox.push(msg, metrics, core_tx).is_err() {
                return;
            }
        }
    }
}

/// The verifier thread a device's messages go to.
pub fn shard_of(device: &DeviceId, n: usize) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    device.hash(&mut h);
    (h.finish() % n as u64) as usize
}
