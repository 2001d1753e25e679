//! The verifier threads: signature verification is the heaviest per-message
//! work, so it runs beside the core. A device always maps to the same thread,
//! so its reports and acks reach the core in the order the broker delivered
//! them. Under load a thread takes what has queued up and hands it to
//! [`verify_batch`](super::core::verify_batch) (one Ed25519 batch); what to
//! do with each message is decided there, not here. What comes out goes
//! into the core's [`VerifiedInbox`], which conflates a device's verified
//! reports under overload.

use super::core::{self, KeyDirectory, ToVerify, VerifierOutput};
use super::inbound::Inbound;
use super::verified::VerifiedInbox;
use shardline_allocator_core::service::counters::Metrics;
use shardline_shared::DeviceId;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

pub type VerifierTx = mpsc::Sender<ToVerify>;

/// Most messages a verifier thread checks in one signature batch.
const VERIFY_BATCH: usize = 64;
/// A verifier thread that found fewer messages than this waits
/// [`VERIFY_GATHER`] once for more before checking them.
const VERIFY_GATHER_BELOW: usize = 16;
const VERIFY_GATHER: Duration = Duration::from_millis(1);

/// Starts one verifier thread per core (2–8) and returns their inboxes.
pub fn start(
    keys: KeyDirectory,
    core_tx: mpsc::Sender<Inbound>,
    metrics: Arc<Metrics>,
    max_payload: usize,
    shared_store: bool,
    inbox: Arc<VerifiedInbox>,
) -> std::io::Result<Vec<VerifierTx>> {
    let n = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 8);
    let mut senders = Vec::with_capacity(n);
    for i in 0..n {
        let (vtx, mut vrx) = mpsc::channel::<ToVerify>(16_384);
        let (keys, core_tx, metrics) = (keys.clone(), core_tx.clone(), metrics.clone());
        let inbox = inbox.clone();
        std::thread::Builder::new()
            .name(format!("verify-{i}"))
            .spawn(move || {
                let mut batch = Vec::with_capacity(VERIFY_BATCH);
                let mut out = Vec::with_capacity(VERIFY_BATCH);
                while let Some(first) = vrx.blocking_recv() {
                    batch.push(first);
                    for wait in [false, true] {
                        if wait {
                            if batch.len() >= VERIFY_GATHER_BELOW {
                                break;
                            }
                            // A small batch costs nearly twice the CPU per
                            // signature; a moment's wait lets one form when
                            // messages are flowing, at 1 ms of latency.
                            std::thread::sleep(VERIFY_GATHER);
                        }
                        while batch.len() < VERIFY_BATCH {
                            match vrx.try_recv() {
                                Ok(m) => batch.push(m),
                                Err(_) => break,
                            }
                        }
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
                        if inbox.push(msg, &metrics, &core_tx).is_err() {
                            return;
                        }
                    }
                }
            })?;
        senders.push(vtx);
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
