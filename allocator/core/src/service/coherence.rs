//! Shared-store coherence: one module for both the decisions and the state
//! changes that keep this instance's copies true to a store other allocator
//! instances also write (PostgreSQL). The store is read through the
//! [`SharedState`] port the service implements, so the protocol lives here and
//! the queries at the edge.
//!
//! The protocol:
//! - Before a batch, the versions of the devices it names are read in one
//!   query; a copy older than the store's is reloaded, one the store no
//!   longer holds is forgotten ([`Core::check_copies`]).
//! - A commit the store refuses as a conflict drops what was decided from the
//!   stale copies; the runner then asks for [`Core::reload`].
//! - Every tick ([`Core::refresh_from_shared_state`]): take, keep or lose the
//!   lead for fleet-wide work; follow key rotations, tokens, enrolments and
//!   unenrolments made elsewhere; as leader, refresh every stale copy before
//!   the fleet-wide tick.

use super::*;
use std::collections::HashSet;

/// What the coherence protocol reads from the shared store (and the key file
/// a rotation elsewhere named). Implemented by the service over its `Store`.
pub trait SharedState {
    type Error: std::fmt::Display;
    /// Takes or keeps the lead for fleet-wide periodic work.
    fn try_lead(&self) -> Result<bool, Self::Error>;
    fn load_meta(&self) -> Result<Meta, Self::Error>;
    fn load_tokens(&self) -> Result<Vec<(String, TokenRecord)>, Self::Error>;
    /// Stored write versions: of `devices`, or of every device when `None`.
    fn device_versions(
        &self,
        devices: Option<&[DeviceId]>,
    ) -> Result<Vec<(DeviceId, u64)>, Self::Error>;
    /// These devices' records (absent ones are left out).
    fn load_device_records(&self, devices: &[DeviceId]) -> Result<Vec<DeviceRecord>, Self::Error>;
    /// The secret signing key in `key_file` (after another instance rotated).
    fn read_signing_key(&self, key_file: &str) -> Result<KeyPair, Self::Error>;
}

/// Reloads are asked for this many devices at a time.
const RELOAD_CHUNK: usize = 1000;

impl Core {
    /// The write version of the copy held here (see [`DeviceRecord::version`]).
    pub fn version_of(&self, device: &DeviceId) -> Option<u64> {
        self.records.get(device).map(|r| r.version)
    }

    /// Every device held here with its version.
    pub fn versions(&self) -> Vec<(DeviceId, u64)> {
        self.records
            .iter()
            .map(|(d, r)| (d.clone(), r.version))
            .collect()
    }

    pub fn set_leader(&mut self, leader: bool) {
        if leader != self.leader {
            tracing::info!(
                leader,
                "fleet-wide periodic work {}",
                if leader {
                    "taken over"
                } else {
                    "left to another instance"
                }
            );
        }
        self.leader = leader;
    }

    pub fn is_leader(&self) -> bool {
        self.leader
    }

    /// Replaces the copies of these devices with what another instance
    /// committed. Whatever this instance changed in them and has not
    /// committed is dropped: its commit would conflict anyway, and nothing
    /// decided from a stale copy may leave the process.
    pub fn install_records(&mut self, now_ms: u64, records: Vec<DeviceRecord>) {
        for rec in records {
            let device = rec.device.clone();
            self.dirty.remove(&device);
            self.lazy.remove(&device);
            self.seq_dirty.remove(&device);
            self.publish_key(&device, Some(rec.public_key));
            let state = (!rec.engine_state.is_empty())
                .then(|| policy::decode_device_state(&rec.engine_state).ok())
                .flatten();
            let (tier, tenant) = (rec.tier.clone(), rec.tenant.clone());
            Metrics::inc(&self.metrics.store_reloads);
            self.engine
                .restore_device_config(device.clone(), rec.config_view());
            self.records.insert(device.clone(), rec);
            match state {
                Some(state) => self.engine.restore_device(device, state),
                None => self.feed(
                    now_ms,
                    Event::Enrolled {
                        device,
                        tier,
                        tenant,
                    },
                ),
            }
        }
    }

    /// Drops devices another instance unenrolled.
    pub fn forget_devices(&mut self, devices: &[DeviceId]) {
        for device in devices {
            if self.records.remove(device).is_some() {
                self.dirty.remove(device);
                self.lazy.remove(device);
                self.seq_dirty.remove(device);
                self.signed_seen.remove(device);
                self.engine.evict_device(device);
                self.publish_key(device, None);
            }
        }
    }

    /// Takes the bootstrap tokens another instance may have created or used.
    pub fn install_tokens(&mut self, tokens: Vec<(String, TokenRecord)>) {
        self.tokens = tokens.into_iter().collect();
    }

    /// The key epoch this instance signs in.
    pub fn key_epoch(&self) -> u64 {
        self.meta.key_epoch
    }

    /// Follows a key rotation another instance made: sign with the new key.
    pub fn install_rotation(&mut self, meta: Meta, key: KeyPair) {
        tracing::info!(epoch = meta.key_epoch, key_id = %key.id(), "following a key rotation made by another instance");
        self.meta = meta;
        self.key = key;
    }

    /// Makes sure the copies of `devices` (those the next batch is about)
    /// are not older than what other instances committed: one query.
    pub fn check_copies<S: SharedState + ?Sized>(
        &mut self,
        store: &S,
        mut devices: Vec<DeviceId>,
        now_ms: u64,
    ) {
        if devices.is_empty() {
            return;
        }
        devices.sort();
        devices.dedup();
        let stored = match store.device_versions(Some(&devices)) {
            Ok(v) => v,
            Err(e) => {
                // Handling on a possibly stale copy is still safe: its commit
                // would be refused.
                tracing::warn!(error = %e, "cannot check device versions in the shared store");
                return;
            }
        };
        let stored: HashMap<DeviceId, u64> = stored.into_iter().collect();
        let mut stale = Vec::new();
        let mut gone = Vec::new();
        for id in devices {
            match (stored.get(&id), self.version_of(&id)) {
                (Some(&s), Some(mine)) if s > mine => stale.push(id),
                (Some(_), None) => stale.push(id),
                (None, Some(_)) => gone.push(id),
                _ => {}
            }
        }
        self.forget_devices(&gone);
        if !stale.is_empty() {
            self.reload(store, &stale, now_ms);
        }
    }

    /// Reloads devices from the store, dropping the copies held here (those
    /// the store no longer holds are forgotten).
    pub fn reload<S: SharedState + ?Sized>(
        &mut self,
        store: &S,
        devices: &[DeviceId],
        now_ms: u64,
    ) {
        match store.load_device_records(devices) {
            Ok(records) => {
                let found: HashSet<&DeviceId> = records.iter().map(|r| &r.device).collect();
                let gone: Vec<DeviceId> = devices
                    .iter()
                    .filter(|d| !found.contains(d))
                    .cloned()
                    .collect();
                self.install_records(now_ms, records);
                self.forget_devices(&gone);
            }
            Err(e) => {
                tracing::warn!(error = %e, devices = devices.len(), "cannot reload device records from the shared store")
            }
        }
    }

    /// Every tick with a shared store: take or keep (or lose) the lead,
    /// follow enrolments, unenrolments, tokens and key rotations made
    /// elsewhere, and (as leader, before the fleet-wide tick) refresh every
    /// stale copy.
    pub fn refresh_from_shared_state<S: SharedState + ?Sized>(&mut self, store: &S, now_ms: u64) {
        let lead = store.try_lead().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot take the lead in the shared store");
            false
        });
        self.set_leader(lead);
        match store.load_meta() {
            Ok(meta) if meta.key_epoch > self.key_epoch() => match meta.key_file.clone() {
                Some(file) => match store.read_signing_key(&file) {
                    Ok(key) => self.install_rotation(meta, key),
                    Err(e) => {
                        tracing::error!(error = %e, epoch = meta.key_epoch, "another instance rotated the signing key but its key file cannot be read here")
                    }
                },
                None => tracing::error!(
                    epoch = meta.key_epoch,
                    "another instance rotated the signing key without naming its key file"
                ),
            },
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the shared store's metadata"),
        }
        match store.load_tokens() {
            Ok(tokens) => self.install_tokens(tokens),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read bootstrap tokens from the shared store")
            }
        }
        let stored = match store.device_versions(None) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cannot list devices in the shared store");
                return;
            }
        };
        let mine: HashMap<DeviceId, u64> = self.versions().into_iter().collect();
        let mut load = Vec::new();
        for (id, v) in &stored {
            match mine.get(id) {
                None => load.push(id.clone()),
                Some(&m) if lead && *v > m => load.push(id.clone()),
                _ => {}
            }
        }
        let present: HashSet<&DeviceId> = stored.iter().map(|(d, _)| d).collect();
        let gone: Vec<DeviceId> = mine
            .keys()
            .filter(|d| !present.contains(d))
            .cloned()
            .collect();
        self.forget_devices(&gone);
        for chunk in load.chunks(RELOAD_CHUNK) {
            self.reload(store, chunk, now_ms);
        }
    }
}
