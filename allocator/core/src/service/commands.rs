use super::*;

/// Why an operator command failed (mapped to HTTP statuses by the API).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize)]
pub enum CommandError {
    #[error("device {0} is not enrolled")]
    UnknownDevice(String),
    #[error("unknown tier {0:?}")]
    UnknownTier(String),
    #[error("device {0} is already enrolled with another key")]
    KeyConflict(String),
    /// The public key is already enrolled for another device: one key, one
    /// device (else one device could sign as two).
    #[error("this public key is already enrolled for device {0}")]
    KeyInUse(String),
    #[error("{0}")]
    Invalid(String),
    /// Another allocator instance changed the device at the same moment;
    /// nothing was written and the command can be repeated.
    #[error("device {0} was changed by another allocator instance at the same time; nothing was written, repeat the command")]
    Concurrent(String),
}

/// An operator action on one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OperatorOp {
    Pin,
    Unpin,
    Revoke,
    Unrevoke,
    Drain,
    Resume,
}

/// A row of `GET /v1/devices`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceRow {
    pub device: String,
    pub tier: String,
    pub tenant: Option<String>,
    pub reputation: f64,
    pub compute_units: u32,
    pub data_units: u32,
    pub active_shards: usize,
    pub last_report_ms: Option<u64>,
    pub presence: String,
    pub drained: bool,
    pub pending_instructions: usize,
}

/// `GET /v1/devices/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceDetail {
    pub device: String,
    pub public_key: String,
    pub key_id: String,
    pub tier: String,
    pub enrolled_at_ms: u64,
    pub presence: String,
    pub last_report_seq: u64,
    pub last_report_ms: Option<u64>,
    pub next_instruction_seq: u64,
    pub applied_instruction_seq: u64,
    pub pending_instructions: Vec<u64>,
    pub instructions_sent: u64,
    pub instructions_applied: u64,
    pub instructions_rejected: u64,
    /// The engine's view: profile (leases), reputation and its history, last QoS.
    pub policy: Option<DeviceView>,
}

/// A tier with its usage, for `GET /v1/tiers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TierRow {
    pub tier: policy::Tier,
    pub usage: policy::TierUsage,
}

/// A created bootstrap token (shown once).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenCreated {
    pub token: String,
    pub tier: String,
    pub expires_at_ms: u64,
    pub uses: u32,
}

/// Operator commands handled by the core.
#[derive(Debug)]
pub enum Command {
    Enroll {
        device: DeviceId,
        public_key: [u8; 32],
        tier: String,
        tenant: Option<String>,
    },
    Unenroll {
        device: DeviceId,
    },
    CreateToken {
        tier: String,
        tenant: Option<String>,
        ttl_ms: u64,
        uses: u32,
        /// 32 random bytes from the runner (the core has no RNG).
        secret: [u8; 32],
    },
    ListDevices,
    Device {
        device: DeviceId,
    },
    /// Credit accounts of a tenant's pool (every tenant when `None`).
    Credits {
        tenant: Option<String>,
    },
    Tiers,
    Operator {
        device: DeviceId,
        op: OperatorOp,
        shard: Option<String>,
        /// Who asked (named in the engine's explanations).
        actor: String,
    },
    Rotate {
        new_key: KeyPair,
        key_file: String,
    },
    /// The catalog's health: failing entries per architecture and recent
    /// start failures.
    Catalog,
    /// Forget a shard's failing marks and start failures; try it again.
    RetryCatalogEntry {
        shard: String,
    },
    /// Sets (or unsets) keys of the device's own configuration of a shard.
    SetDeviceConfig {
        device: DeviceId,
        shard: String,
        change: super::ConfigChange,
    },
    /// Shows the device's configuration (secret key names only).
    DeviceConfig {
        device: DeviceId,
    },
    /// Configures both ends of a tunnel with one fresh pre-shared key.
    VpnPair(super::VpnPair),
    /// An explicit request made for an instance (`POST /v1/shard/request`).
    ShardRequest {
        instance: shardline_shared::ids::InstanceRef,
        op: shardline_shared::request::RequestOp,
    },
    /// An instance's standing and history.
    InstanceReputation {
        instance: shardline_shared::ids::InstanceRef,
    },
    /// An audited operator change of an instance's reputation.
    AdjustInstanceReputation {
        instance: shardline_shared::ids::InstanceRef,
        change: policy::ScoreChange,
        reason: String,
        actor: String,
    },
    /// The fleet summary for the dashboard (`GET /v1/fleet`).
    Fleet,
    /// One page of the device list, filtered (`GET /v1/devices?…`).
    DevicePage(super::fleet::DeviceQuery),
    /// Replace the catalog and the tiers (already parsed and checked by
    /// the service; the core checks them against the fleet).
    ReloadCatalog {
        catalog: Box<policy::Catalog>,
        agreements: Box<policy::Agreements>,
        catalog_source: String,
        tiers_source: String,
    },
    /// The staged rollouts.
    Rollouts,
    /// An operator promotes or rolls back a rollout.
    RolloutDecision {
        shard: String,
        promote: bool,
        actor: String,
    },
    /// Ask the device for its recent log lines and status.
    AskDiagnostics {
        device: DeviceId,
    },
    /// The device's latest diagnostics answer.
    Diagnostics {
        device: DeviceId,
    },
}

/// One catalog shard for `GET /v1/catalog`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogRow {
    pub shard: String,
    pub capability: String,
    pub alternatives: Vec<String>,
    /// Architectures it is marked failing on, with why.
    pub failing: Vec<policy::FailingEntry>,
    /// Architecture ⇒ start failures seen (operator faults, never charged).
    pub start_failures: BTreeMap<String, u64>,
    /// Architecture ⇒ devices with a recent start failure.
    pub failing_devices: BTreeMap<String, Vec<String>>,
    /// Architecture (`"any"` for a universal build) ⇒ the library's SHA-256 (hex).
    #[serde(default)]
    pub digests: BTreeMap<String, String>,
}

/// The answer to a [`Command`].
#[derive(Debug)]
pub enum Reply {
    Ok,
    Enrolled(DeviceRow),
    Token(TokenCreated),
    Devices(Vec<DeviceRow>),
    Device(Box<DeviceDetail>),
    Credits(Vec<policy::market::CreditRow>),
    Tiers(Vec<TierRow>),
    Rotated {
        epoch: u64,
        key_id: String,
    },
    Catalog(Vec<CatalogRow>),
    DeviceConfig(super::DeviceConfigShown),
    Answer(Box<shardline_shared::request::RequestAnswer>),
    Instance(Box<policy::InstanceView>),
    Error(CommandError),
    Fleet(Box<super::fleet::FleetSummary>),
    DevicePage(super::fleet::DevicePage),
    Reloaded(Box<super::ReloadAnswer>),
    Rollouts(Box<super::RolloutsView>),
    /// The instruction number of a diagnostics ask.
    DiagnosticsAsked {
        seq: u64,
    },
    Diagnostics(Box<super::DiagnosticsView>),
}

impl Command {
    /// The device a command reads or changes, if it names one.
    pub fn device(&self) -> Option<&DeviceId> {
        match self {
            Self::Enroll { device, .. }
            | Self::Unenroll { device }
            | Self::Device { device }
            | Self::Operator { device, .. }
            | Self::SetDeviceConfig { device, .. }
            | Self::DeviceConfig { device }
            | Self::AskDiagnostics { device }
            | Self::Diagnostics { device } => Some(device),
            Self::VpnPair(p) => Some(&p.a),
            Self::ShardRequest { instance, .. }
            | Self::InstanceReputation { instance }
            | Self::AdjustInstanceReputation { instance, .. } => Some(&instance.device),
            _ => None,
        }
    }
}

/// `text` as it may appear in an answer: at most 64 characters (an
/// unknown name is echoed so the operator sees the typo, but a caller
/// cannot make an error reply as large as its request).
pub(super) fn shown(text: &str) -> String {
    const MAX: usize = 64;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text.to_owned(),
    }
}

impl Core {
    /// "online" while the device's signed reports keep coming (one within
    /// three of its report windows, at least 30 s), "offline" once they
    /// stopped, "unknown" before this instance saw one. Statuses are
    /// unsigned (anyone can publish one), so they never decide it.
    pub(super) fn presence_of(&self, device: &DeviceId) -> String {
        match self.signed_seen.get(device) {
            Some(&(at, window)) => {
                let timeout = window.saturating_mul(3).max(30_000);
                if self.last_tick_ms.max(at).saturating_sub(at) <= timeout {
                    "online"
                } else {
                    "offline"
                }
            }
            None => "unknown",
        }
        .into()
    }

    pub(super) fn row(&self, device: &DeviceId) -> Option<DeviceRow> {
        let rec = self.records.get(device)?;
        // One device's summary, not the fleet's: enrolment answers with
        // this row, and a fleet-wide list per enrolment made enrolling a
        // fleet quadratic (100 s of core CPU for 30,000 devices).
        let summary = self.engine.summary(device);
        Some(self.row_from(rec, summary.as_ref()))
    }

    pub(super) fn row_from(
        &self,
        rec: &DeviceRecord,
        s: Option<&policy::DeviceSummary>,
    ) -> DeviceRow {
        DeviceRow {
            device: rec.device.to_string(),
            tier: rec.tier.clone(),
            tenant: rec.tenant.clone(),
            reputation: s.map_or(0.0, |s| s.reputation),
            compute_units: s.map_or(0, |s| s.compute_units),
            data_units: s.map_or(0, |s| s.data_units),
            active_shards: s.map_or(0, |s| s.active_shards),
            last_report_ms: rec.last_report_ms,
            presence: self.presence_of(&rec.device),
            drained: s.is_some_and(|s| s.drained),
            pending_instructions: rec.pending.len(),
        }
    }

    /// Handles one operator command.
    pub fn on_command(&mut self, now_ms: u64, cmd: Command) -> Reply {
        match cmd {
            Command::ShardRequest { instance, op } => {
                match self.service_request(now_ms, instance, op) {
                    Ok(a) => Reply::Answer(Box::new(a)),
                    Err(e) => Reply::Error(e),
                }
            }
            Command::InstanceReputation { instance } => match self.instance_view(now_ms, &instance)
            {
                Ok(v) => Reply::Instance(Box::new(v)),
                Err(e) => Reply::Error(e),
            },
            Command::AdjustInstanceReputation {
                instance,
                change,
                reason,
                actor,
            } => match self.adjust_instance(now_ms, instance, change, reason, actor) {
                Ok(v) => Reply::Instance(Box::new(v)),
                Err(e) => Reply::Error(e),
            },
            Command::Enroll {
                device,
                public_key,
                tier,
                tenant,
            } => match self.enroll(now_ms, device, public_key, tier, tenant) {
                Ok(row) => Reply::Enrolled(row),
                Err(e) => Reply::Error(e),
            },
            Command::Unenroll { device } => {
                let Some(rec) = self.records.remove(&device) else {
                    return Reply::Error(CommandError::UnknownDevice(device.to_string()));
                };
                self.forget_diagnostics(&device);
                // A tombstone, so that enrolling the id again neither
                // launders its reputation nor rewinds its sequences.
                let tomb = policy::Tombstone {
                    device: device.clone(),
                    public_key: rec.public_key,
                    unenrolled_at_ms: now_ms,
                    last_report_seq: rec.last_report_seq,
                    last_instruction_seq: rec
                        .seq_reserved_until
                        .max(rec.next_instruction_seq.saturating_sub(1)),
                    reputation: self
                        .engine
                        .device_state(&device)
                        .map(|s| s.reputation.clone()),
                };
                self.step
                    .batch
                    .tombstones
                    .push((device.clone(), Some(tomb.clone())));
                self.tombstones.insert(device.clone(), tomb);
                self.signed_seen.remove(&device);
                self.dirty.remove(&device);
                self.publish_key(&device, None);
                self.feed(
                    now_ms,
                    Event::Unenrolled {
                        device: device.clone(),
                    },
                );
                self.engine.evict_device(&device);
                self.step.batch.delete_devices.push(device);
                Reply::Ok
            }
            Command::CreateToken {
                tier,
                tenant,
                ttl_ms,
                uses,
                secret,
            } => {
                if !self.engine.agreements().tiers.contains_key(&tier) {
                    return Reply::Error(CommandError::UnknownTier(tier));
                }
                if uses == 0 {
                    return Reply::Error(CommandError::Invalid("uses must be at least 1".into()));
                }
                let token = hex::encode(secret);
                let rec = TokenRecord {
                    tier: tier.clone(),
                    tenant,
                    created_ms: now_ms,
                    expires_at_ms: now_ms.saturating_add(ttl_ms),
                    uses_left: uses,
                };
                let hash = token_hash(&token);
                self.tokens.insert(hash.clone(), rec.clone());
                self.step.batch.tokens.push((hash, Some(rec.clone())));
                Reply::Token(TokenCreated {
                    token,
                    tier,
                    expires_at_ms: rec.expires_at_ms,
                    uses,
                })
            }
            Command::ListDevices => {
                let summaries: BTreeMap<DeviceId, policy::DeviceSummary> = self
                    .engine
                    .devices()
                    .into_iter()
                    .map(|s| (s.device.clone(), s))
                    .collect();
                let mut rows: Vec<DeviceRow> = self
                    .records
                    .values()
                    .map(|r| self.row_from(r, summaries.get(&r.device)))
                    .collect();
                rows.sort_by(|a, b| a.device.cmp(&b.device));
                Reply::Devices(rows)
            }
            Command::Device { device } => {
                let Some(rec) = self.records.get(&device) else {
                    return Reply::Error(CommandError::UnknownDevice(device.to_string()));
                };
                Reply::Device(Box::new(DeviceDetail {
                    device: device.to_string(),
                    public_key: hex::encode(rec.public_key),
                    key_id: hex_key_id(&rec.public_key),
                    tier: rec.tier.clone(),
                    enrolled_at_ms: rec.enrolled_at_ms,
                    presence: self.presence_of(&device),
                    last_report_seq: rec.last_report_seq,
                    last_report_ms: rec.last_report_ms,
                    next_instruction_seq: rec.next_instruction_seq,
                    applied_instruction_seq: rec.applied_seq,
                    pending_instructions: rec.pending.iter().map(|p| p.seq).collect(),
                    instructions_sent: rec.instructions_sent,
                    instructions_applied: rec.instructions_applied,
                    instructions_rejected: rec.instructions_rejected,
                    policy: self.engine.device_at(&device, now_ms),
                }))
            }
            Command::Credits { tenant } => Reply::Credits(self.engine.credits(tenant.as_deref())),
            Command::Tiers => {
                let usage = self.engine.units_by_tier();
                Reply::Tiers(
                    self.engine
                        .agreements()
                        .tiers
                        .values()
                        .map(|t| TierRow {
                            tier: t.clone(),
                            usage: usage.get(&t.name).cloned().unwrap_or_default(),
                        })
                        .collect(),
                )
            }
            Command::Operator {
                device,
                op,
                shard,
                actor,
            } => {
                if !self.records.contains_key(&device) {
                    return Reply::Error(CommandError::UnknownDevice(device.to_string()));
                }
                let need_shard = || {
                    shard
                        .clone()
                        .ok_or_else(|| CommandError::Invalid("this operation needs a shard".into()))
                };
                let event = match op {
                    OperatorOp::Drain => Event::Drain { device },
                    OperatorOp::Resume => Event::Resume { device },
                    OperatorOp::Pin
                    | OperatorOp::Unpin
                    | OperatorOp::Revoke
                    | OperatorOp::Unrevoke => {
                        let shard = match need_shard() {
                            Ok(s) => s,
                            Err(e) => return Reply::Error(e),
                        };
                        if self.engine.catalog().shard(&shard).is_none() {
                            return Reply::Error(CommandError::Invalid(format!(
                                "unknown shard {:?}",
                                shown(&shard)
                            )));
                        }
                        match op {
                            OperatorOp::Pin => Event::Pin { device, shard },
                            OperatorOp::Unpin => Event::Unpin { device, shard },
                            OperatorOp::Revoke => Event::Revoke { device, shard },
                            _ => Event::Unrevoke { device, shard },
                        }
                    }
                };
                let event = Event::ByOperator {
                    actor,
                    event: Box::new(event),
                };
                self.feed(now_ms, event);
                Reply::Ok
            }
            Command::Rotate { new_key, key_file } => self.rotate(now_ms, new_key, key_file),
            Command::Catalog => Reply::Catalog(self.catalog_rows()),
            Command::RetryCatalogEntry { shard } => {
                if self.engine.catalog().shard(&shard).is_none() {
                    return Reply::Error(CommandError::Invalid(format!(
                        "unknown shard {:?}",
                        shown(&shard)
                    )));
                }
                self.feed(now_ms, Event::RetryCatalogEntry { shard });
                Reply::Ok
            }
            Command::SetDeviceConfig {
                device,
                shard,
                change,
            } => match self.set_device_config(now_ms, &device, &shard, change) {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e),
            },
            Command::DeviceConfig { device } => match self.device_config_shown(&device) {
                Ok(shown) => Reply::DeviceConfig(shown),
                Err(e) => Reply::Error(e),
            },
            Command::VpnPair(pair) => match self.vpn_pair(now_ms, pair) {
                Ok(()) => Reply::Ok,
                Err(e) => Reply::Error(e),
            },
            Command::Fleet => Reply::Fleet(Box::new(self.fleet_summary(now_ms))),
            Command::DevicePage(query) => Reply::DevicePage(self.device_page(&query)),
            Command::ReloadCatalog {
                catalog,
                agreements,
                catalog_source,
                tiers_source,
            } => self.reload_catalog(now_ms, *catalog, *agreements, catalog_source, tiers_source),
            Command::Rollouts => Reply::Rollouts(Box::new(self.rollouts_view())),
            Command::RolloutDecision {
                shard,
                promote,
                actor,
            } => self.rollout_decision(now_ms, &shard, promote, &actor),
            Command::AskDiagnostics { device } => self.ask_diagnostics(now_ms, &device),
            Command::Diagnostics { device } => self.diagnostics_view(&device),
        }
    }

    fn catalog_rows(&self) -> Vec<CatalogRow> {
        let health = self.engine.catalog_health();
        self.engine
            .catalog()
            .shards
            .values()
            .map(|spec| {
                let id = spec.shard.id();
                CatalogRow {
                    shard: id.to_owned(),
                    capability: spec.capability.clone(),
                    alternatives: spec.alternatives.clone(),
                    failing: health
                        .failing
                        .get(id)
                        .map(|m| m.values().cloned().collect())
                        .unwrap_or_default(),
                    start_failures: health
                        .start_failures_total
                        .get(id)
                        .cloned()
                        .unwrap_or_default(),
                    failing_devices: health
                        .recent
                        .get(id)
                        .map(|m| {
                            m.iter()
                                .map(|(a, d)| {
                                    (a.clone(), d.keys().map(|x| x.to_string()).collect())
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                    digests: spec
                        .builds
                        .any
                        .map(|d| ("any".to_owned(), hex::encode(d)))
                        .into_iter()
                        .chain(
                            spec.builds
                                .per_arch
                                .iter()
                                .map(|(a, d)| (a.clone(), hex::encode(d))),
                        )
                        .collect(),
                }
            })
            .collect()
    }

    pub(super) fn rotate(&mut self, now_ms: u64, new_key: KeyPair, key_file: String) -> Reply {
        if new_key.id() == self.key.id() {
            return Reply::Error(CommandError::Invalid(
                "the new key is the key in use".into(),
            ));
        }
        let epoch = self.meta.key_epoch + 1;
        let rotation = KeyRotation {
            new_set: KeySet::of(epoch, &[&new_key]),
            issued_at_ms: now_ms,
        };
        let sealed = sign::seal(Domain::Rotation, &rotation, &[&self.key, &new_key]);
        self.meta = Meta {
            key_epoch: epoch,
            rotation: sealed,
            key_file: Some(key_file),
        };
        self.key = new_key;
        self.step.batch.meta = Some(self.meta.clone());
        let devices: Vec<DeviceId> = self.records.keys().cloned().collect();
        for device in &devices {
            self.send_rotation(device);
            // Pending instructions are re-signed with the new key (same
            // payload, so a device that already applied one sees a duplicate).
            let key = self.key.clone();
            if let Some(rec) = self.records.get_mut(device) {
                for p in rec.pending.iter_mut() {
                    if let Ok(env) = sign::parse_envelope(&p.sealed, usize::MAX) {
                        if let Ok(instr) = codec::decode::<Instruction>(&env.payload) {
                            p.sealed = sign::seal(Domain::Instruction, &instr, &[&key]);
                        }
                    }
                }
            }
            self.resend_pending(now_ms, device, 0, true);
        }
        tracing::info!(epoch, key_id = %self.key.id(), devices = devices.len(), "signing key rotated");
        Reply::Rotated {
            epoch,
            key_id: self.key.id().to_string(),
        }
    }
}
