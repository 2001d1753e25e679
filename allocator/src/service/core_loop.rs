//! The core thread and the store thread behind it. The core owns all
//! state and takes inbound messages in batches; each batch's writes are
//! committed (one transaction, fsync; group commit on the store thread) and
//! only then are its instructions published and its commands answered:
//! nothing leaves the process that is not on disk.
//!
//! With a shared store the core keeps its copies coherent through
//! [`SharedStore`], the port its coherence protocol reads the store by.

use super::core::{CommandError, Core, Reply, SharedState, Step};
use super::inbound::{now_ms, Inbound};
use super::keys::{self, KeyError};
use super::store::{DeviceRecord, Meta, Store, StoreError, TokenRecord};
use rumqttc::{AsyncClient, QoS};
use shardline_allocator_core::service::counters::Metrics;
use shardline_shared::sign::KeyPair;
use shardline_shared::topics;
use shardline_shared::DeviceId;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Why the coherence protocol could not read the shared store.
#[derive(Debug, thiserror::Error)]
pub enum SharedReadError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// The store as the core's coherence protocol reads it.
pub(crate) struct SharedStore<'a>(pub &'a dyn Store);

impl SharedState for SharedStore<'_> {
    type Error = SharedReadError;
    fn try_lead(&self) -> Result<bool, SharedReadError> {
        Ok(self.0.try_lead()?)
    }
    fn load_meta(&self) -> Result<Meta, SharedReadError> {
        Ok(self.0.load_meta()?)
    }
    fn load_tokens(&self) -> Result<Vec<(String, TokenRecord)>, SharedReadError> {
        Ok(self.0.load_tokens()?)
    }
    fn device_versions(
        &self,
        devices: Option<&[DeviceId]>,
    ) -> Result<Vec<(DeviceId, u64)>, SharedReadError> {
        Ok(self.0.device_versions(devices)?)
    }
    fn load_device_records(
        &self,
        devices: &[DeviceId],
    ) -> Result<Vec<DeviceRecord>, SharedReadError> {
        Ok(self.0.load_device_records(devices)?)
    }
    fn read_signing_key(&self, key_file: &str) -> Result<KeyPair, SharedReadError> {
        Ok(keys::read_secret(Path::new(key_file))?)
    }
}

/// One batch's writes with what may only happen after they are on disk.
struct Flush {
    step: Step,
    /// Command answers, with the device each command changed (a refused
    /// write turns its answer into an error).
    replies: Vec<(oneshot::Sender<Reply>, Reply, Option<DeviceId>)>,
}

#[allow(clippy::too_many_arguments)]
pub fn run(
    mut core: Core,
    store: Arc<dyn Store>,
    mut rx: mpsc::Receiver<Inbound>,
    reload_tx: mpsc::Sender<Inbound>,
    client: AsyncClient,
    rt: tokio::runtime::Handle,
    metrics: Arc<Metrics>,
    heartbeat: Arc<AtomicU64>,
    max_batch: usize,
    live: super::api_fleet::LiveHub,
    verified: Arc<super::verified::VerifiedInbox>,
) {
    // Commits run on their own thread so the core handles the next batch
    // while the previous one is fsynced. Batches are committed, published
    // and answered strictly in order, each only after its commit. The
    // bounded channel holds the core back when the disk falls behind.
    let (flush_tx, flush_rx) = std::sync::mpsc::sync_channel::<Flush>(64);
    let store_thread = {
        let metrics = metrics.clone();
        let store = store.clone();
        std::thread::Builder::new()
            .name("allocator-store".into())
            .spawn(move || {
                while let Ok(first) = flush_rx.recv() {
                    // Group commit: everything queued meanwhile goes into
                    // the same transaction (one fsync).
                    let mut group = vec![first];
                    while let Ok(more) = flush_rx.try_recv() {
                        group.push(more);
                    }
                    flush(group, &*store, &client, &rt, &metrics, &reload_tx, &live);
                }
            })
    };
    let store_thread = match store_thread {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the store thread");
            return;
        }
    };
    let shared = store.is_shared();
    if shared {
        core.refresh_from_shared_state(&SharedStore(&*store), now_ms());
    }
    let mut replies = Vec::new();
    let mut stop = false;
    // The initial step writes every record once (resumed sequence numbers).
    let _ = flush_tx.send(Flush {
        step: core.take_step(),
        replies: Vec::new(),
    });
    let mut inbox: Vec<Inbound> = Vec::with_capacity(max_batch);
    while !stop {
        // Verified messages waiting: take what else is there, never block.
        if verified.is_empty() {
            let Some(first) = rx.blocking_recv() else {
                break;
            };
            inbox.push(first);
        }
        while inbox.len() < max_batch {
            match rx.try_recv() {
                Ok(m) => inbox.push(m),
                Err(_) => break,
            }
        }
        inbox.retain(|m| !matches!(m, Inbound::VerifiedReady));
        verified.take(max_batch, &mut inbox, &metrics);
        let t = std::time::Instant::now();
        if shared {
            let devices = inbox.iter().filter_map(Inbound::device).collect();
            core.check_copies(&SharedStore(&*store), devices, now_ms());
        }
        for msg in inbox.drain(..) {
            let now = now_ms();
            match msg {
                Inbound::Mqtt { topic, payload } => core.on_message(now, &topic, &payload),
                Inbound::Verified(v) => core.on_verified(now, v),
                Inbound::Connected => core.on_connected(now),
                Inbound::Tick => {
                    if shared {
                        core.refresh_from_shared_state(&SharedStore(&*store), now);
                    }
                    core.on_tick(now)
                }
                Inbound::Command(cmd, reply) => {
                    let device = cmd.device().cloned();
                    let r = core.on_command(now, *cmd);
                    replies.push((reply, r, device));
                }
                Inbound::Reload(devices) => core.reload(&SharedStore(&*store), &devices, now),
                // Taken out above.
                Inbound::VerifiedReady => {}
                Inbound::Shutdown => {
                    core.flush_lazy();
                    stop = true;
                    break;
                }
            }
        }
        inbox.clear();
        metrics
            .core_handle_micros
            .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
        Metrics::inc(&metrics.core_batches);
        core.pace_lazy_writes(now_ms());
        let f = Flush {
            step: core.take_step(),
            replies: std::mem::take(&mut replies),
        };
        if flush_tx.send(f).is_err() {
            break;
        }
        heartbeat.store(now_ms(), Ordering::Relaxed);
    }
    drop(flush_tx);
    let _ = store_thread.join();
    tracing::info!("core stopped");
}

/// Commits a batch (retrying until the store takes it: publishing
/// uncommitted sequence numbers could reuse them after a crash), then
/// publishes its instructions and answers its commands. Writes the store
/// refuses as stale (another instance wrote those devices first) are
/// dropped with their publishes, and the core is told to reload them.
fn flush(
    group: Vec<Flush>,
    store: &dyn Store,
    client: &AsyncClient,
    rt: &tokio::runtime::Handle,
    metrics: &Metrics,
    reload_tx: &mpsc::Sender<Inbound>,
    live: &super::api_fleet::LiveHub,
) {
    let mut batches = Vec::with_capacity(group.len());
    let mut publish = Vec::new();
    let mut replies = Vec::new();
    let mut notes = Vec::new();
    for f in group {
        batches.push(f.step.batch);
        publish.extend(f.step.publish);
        replies.extend(f.replies);
        notes.extend(f.step.live);
    }
    let mut refused: std::collections::HashSet<DeviceId> = Default::default();
    if !batches.iter().all(|b| b.is_empty()) {
        let mut backoff = Duration::from_millis(100);
        loop {
            let t = std::time::Instant::now();
            match store.commit_all(&batches) {
                Ok(()) => {
                    Metrics::inc(&metrics.store_commits);
                    metrics
                        .store_commit_micros
                        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    break;
                }
                Err(StoreError::Conflict { devices }) => {
                    Metrics::inc(&metrics.store_conflicts);
                    tracing::info!(
                        devices = devices.len(),
                        first = %devices[0],
                        "another instance wrote these devices first; dropping what was decided from the stale copies"
                    );
                    for b in &mut batches {
                        b.put_devices.retain(|r| !devices.contains(&r.device));
                        b.report_seqs.retain(|w| !devices.contains(&w.device));
                        b.history.retain(|h| !devices.contains(&h.device));
                    }
                    // Never block here: the core may itself be waiting for
                    // room in the flush queue this thread drains.
                    if let Err(mpsc::error::TrySendError::Full(msg)) =
                        reload_tx.try_send(Inbound::Reload(devices.clone()))
                    {
                        let reload_tx = reload_tx.clone();
                        rt.spawn(async move {
                            let _ = reload_tx.send(msg).await;
                        });
                    }
                    refused.extend(devices);
                }
                Err(e) => {
                    Metrics::inc(&metrics.store_errors);
                    tracing::error!(error = %e, "store commit failed; holding every publish until it succeeds");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    if !refused.is_empty() {
        publish.retain(|p| topics::parse(&p.topic).is_none_or(|(d, _)| !refused.contains(&d)));
        notes.retain(|n| n.device().is_none_or(|d| !refused.contains(d)));
    }
    // Committed: the dashboard may see it now (never waits on a client).
    live.publish_notes(&notes);
    let t = std::time::Instant::now();
    for p in publish {
        let sent = rt.block_on(client.publish(p.topic, QoS::AtLeastOnce, false, p.payload));
        if let Err(e) = sent {
            Metrics::inc(&metrics.publish_errors);
            tracing::warn!(error = %e, "publish could not be queued; it will be re-sent");
        }
    }
    metrics
        .core_publish_micros
        .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
    for (tx, r, device) in replies {
        let r = match device {
            Some(d) if refused.contains(&d) => {
                Reply::Error(CommandError::Concurrent(d.to_string()))
            }
            _ => r,
        };
        let _ = tx.send(r);
    }
}
