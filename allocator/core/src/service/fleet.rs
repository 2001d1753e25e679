//! The fleet as the dashboard sees it: a summary computed from the core's
//! records and the engine's state (`GET /v1/fleet`), and one page of the
//! device list, filtered and sorted (`GET /v1/devices?offset=&limit=&q=
//! &tier=&tenant=`). Both are plain reads of in-memory state, one pass over
//! the fleet each, so they stay cheap at 10,000 devices; the page builds
//! full rows only for the devices it returns.

use super::*;
use crate::service::commands::DeviceRow;

/// Rows a page holds when the caller names no limit.
pub const DEFAULT_PAGE: usize = 50;
/// The largest page served (a bigger `limit` is cut to it).
pub const MAX_PAGE: usize = 1_000;
/// A device whose last signed report is older than its presence timeout is
/// "stale" for this many timeouts, then "offline".
pub const STALE_TIMEOUTS: u64 = 10;
/// Buckets of the reputation histogram (0–10, 10–20, …, 90–100).
pub const REPUTATION_BUCKETS: usize = 10;

/// What a device list page asks for (every field optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceQuery {
    pub offset: usize,
    /// `None`: [`DEFAULT_PAGE`]; above [`MAX_PAGE`]: cut to it.
    pub limit: Option<usize>,
    /// A substring of the device id (case-insensitive).
    pub q: Option<String>,
    pub tier: Option<String>,
    pub tenant: Option<String>,
}

/// One page of the device list, ordered by device id.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevicePage {
    /// Devices matching the filters (all pages).
    pub total: usize,
    pub offset: usize,
    pub limit: usize,
    pub devices: Vec<DeviceRow>,
}

/// Devices by how long ago their last signed report came.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceCounts {
    /// Within the presence timeout (three report windows, at least 30 s):
    /// what a device row calls "online".
    pub online: usize,
    /// Past the timeout, for up to [`STALE_TIMEOUTS`] timeouts.
    pub stale: usize,
    /// Longer than that.
    pub offline: usize,
    /// No signed report seen by this allocator instance yet.
    pub unknown: usize,
}

/// Units in use against capacity, for one tier or one tenant.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageRow {
    pub name: String,
    pub devices: u64,
    pub compute_units_used: u64,
    /// Sum of the tier budgets of its devices (before the reputation quota).
    pub compute_units_capacity: u64,
    pub data_units_used: u64,
    pub data_units_capacity: u64,
}

/// A catalog entry failing on an architecture, or with recent start failures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailingCatalogRow {
    pub shard: String,
    pub capability: String,
    pub arch: String,
    /// Marked failing (avoided fleet-wide on that architecture), or only
    /// seen failing on some devices.
    pub marked: bool,
    pub reason: String,
    pub devices: usize,
}

/// `GET /v1/fleet`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetSummary {
    pub at_ms: u64,
    pub devices: usize,
    pub presence: PresenceCounts,
    pub drained: usize,
    pub pending_instructions: usize,
    pub active_shards: usize,
    /// Per tier (every configured tier, also those without devices).
    pub tiers: Vec<UsageRow>,
    /// Per tenant (devices without a tenant under `""`).
    pub tenants: Vec<UsageRow>,
    /// Devices per reputation bucket (`[0,10)`, …, `[90,100]`).
    pub reputation_histogram: Vec<u64>,
    pub failing_catalog: Vec<FailingCatalogRow>,
}

/// Which bucket of the histogram a reputation falls in.
pub fn reputation_bucket(score: f64) -> usize {
    if !score.is_finite() || score <= 0.0 {
        return 0;
    }
    ((score / 10.0) as usize).min(REPUTATION_BUCKETS - 1)
}

impl Core {
    /// How long ago `device` last sent a signed report, against its
    /// presence timeout (see [`Core::presence_of`]).
    fn presence_bucket(&self, device: &DeviceId) -> Presence3 {
        match self.signed_seen.get(device) {
            Some(&(at, window)) => {
                let timeout = window.saturating_mul(3).max(30_000);
                let age = self.last_tick_ms.max(at).saturating_sub(at);
                if age <= timeout {
                    Presence3::Online
                } else if age <= timeout.saturating_mul(STALE_TIMEOUTS) {
                    Presence3::Stale
                } else {
                    Presence3::Offline
                }
            }
            None => Presence3::Unknown,
        }
    }

    /// The fleet summary: one pass over the devices.
    pub fn fleet_summary(&self, now_ms: u64) -> FleetSummary {
        let tiers_cfg = &self.engine.agreements().tiers;
        let mut tiers: BTreeMap<String, UsageRow> = tiers_cfg
            .keys()
            .map(|n| {
                (
                    n.clone(),
                    UsageRow {
                        name: n.clone(),
                        ..UsageRow::default()
                    },
                )
            })
            .collect();
        let mut tenants: BTreeMap<String, UsageRow> = BTreeMap::new();
        let mut presence = PresenceCounts::default();
        let mut histogram = vec![0u64; REPUTATION_BUCKETS];
        let (mut drained, mut pending, mut active) = (0, 0, 0);
        for rec in self.records.values() {
            match self.presence_bucket(&rec.device) {
                Presence3::Online => presence.online += 1,
                Presence3::Stale => presence.stale += 1,
                Presence3::Offline => presence.offline += 1,
                Presence3::Unknown => presence.unknown += 1,
            }
            pending += rec.pending.len();
            let s = self.engine.summary(&rec.device);
            let (cu, du) = s
                .as_ref()
                .map_or((0, 0), |s| (s.compute_units, s.data_units));
            if let Some(s) = &s {
                histogram[reputation_bucket(s.reputation)] += 1;
                drained += usize::from(s.drained);
                active += s.active_shards;
            }
            let cap = tiers_cfg
                .get(&rec.tier)
                .map_or((0, 0), |t| (t.compute_units, t.data_units));
            let tenant = rec.tenant.clone().unwrap_or_default();
            for row in [
                tiers.entry(rec.tier.clone()).or_insert_with(|| UsageRow {
                    name: rec.tier.clone(),
                    ..UsageRow::default()
                }),
                tenants.entry(tenant.clone()).or_insert_with(|| UsageRow {
                    name: tenant,
                    ..UsageRow::default()
                }),
            ] {
                row.devices += 1;
                row.compute_units_used += u64::from(cu);
                row.data_units_used += u64::from(du);
                row.compute_units_capacity += u64::from(cap.0);
                row.data_units_capacity += u64::from(cap.1);
            }
        }
        FleetSummary {
            at_ms: now_ms,
            devices: self.records.len(),
            presence,
            drained,
            pending_instructions: pending,
            active_shards: active,
            tiers: tiers.into_values().collect(),
            tenants: tenants.into_values().collect(),
            reputation_histogram: histogram,
            failing_catalog: self.failing_catalog(),
        }
    }

    fn failing_catalog(&self) -> Vec<FailingCatalogRow> {
        let health = self.engine.catalog_health();
        let mut out = Vec::new();
        for spec in self.engine.catalog().shards.values() {
            let id = spec.shard.id();
            let marks = health.failing.get(id);
            if let Some(marks) = marks {
                for (arch, f) in marks {
                    out.push(FailingCatalogRow {
                        shard: id.to_owned(),
                        capability: spec.capability.clone(),
                        arch: arch.clone(),
                        marked: true,
                        reason: f.reason.clone(),
                        devices: f.devices.len(),
                    });
                }
            }
            for (arch, devices) in health.recent.get(id).into_iter().flatten() {
                if devices.is_empty() || marks.is_some_and(|m| m.contains_key(arch)) {
                    continue;
                }
                let reason = devices
                    .values()
                    .max_by_key(|(at, _)| *at)
                    .map(|(_, reason)| reason.clone())
                    .unwrap_or_default();
                out.push(FailingCatalogRow {
                    shard: id.to_owned(),
                    capability: spec.capability.clone(),
                    arch: arch.clone(),
                    marked: false,
                    reason,
                    devices: devices.len(),
                });
            }
        }
        out
    }

    /// One page of the device list: filters on the records (no engine
    /// work), sorts the matching ids, builds rows for the page only.
    pub fn device_page(&self, query: &DeviceQuery) -> DevicePage {
        let q = query.q.as_deref().map(str::to_lowercase);
        let mut ids: Vec<&DeviceId> = self
            .records
            .values()
            .filter(|r| {
                query.tier.as_deref().is_none_or(|t| r.tier == t)
                    && query
                        .tenant
                        .as_deref()
                        .is_none_or(|t| r.tenant.as_deref() == Some(t))
                    && q.as_deref()
                        .is_none_or(|q| r.device.as_str().to_lowercase().contains(q))
            })
            .map(|r| &r.device)
            .collect();
        ids.sort_unstable();
        let limit = query.limit.unwrap_or(DEFAULT_PAGE).min(MAX_PAGE);
        let devices = ids
            .iter()
            .skip(query.offset)
            .take(limit)
            .filter_map(|d| {
                let rec = self.records.get(*d)?;
                Some(self.row_from(rec, self.engine.summary(d).as_ref()))
            })
            .collect();
        DevicePage {
            total: ids.len(),
            offset: query.offset,
            limit,
            devices,
        }
    }
}

enum Presence3 {
    Online,
    Stale,
    Offline,
    Unknown,
}
