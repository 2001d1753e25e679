//! `[instance]` and `[assignment]` of `allocator.toml` (issue 19): who this
//! allocator instance is (a `ServerId`, its region, its rated capacity and
//! the broker URLs its devices use) and the groups the assignment engine
//! places onto instances. Checked at load: every error names file, line and
//! field (`config.rs` calls [`check`]).

use serde::Deserialize;
use shardline_allocator_core::assign::{AssignConfig, GroupSpec, RegionTable, ServerReport};
use shardline_shared::assign::{check_endpoint, GroupId, Region, ServerId, MAX_ENDPOINTS};

/// `[instance]`: this allocator instance as the assignment sees it.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InstanceConfig {
    /// A `ServerId` (letters, digits, `-`, `_`), unique among the instances
    /// sharing a store.
    pub id: String,
    pub region: String,
    /// Reports/s this instance can take.
    pub capacity_reports_per_s: f64,
    /// Broker URLs the devices assigned to this instance use, nearest first.
    pub endpoints: Vec<String>,
}

impl Default for InstanceConfig {
    fn default() -> Self {
        Self {
            id: "alloc-1".into(),
            region: "default".into(),
            capacity_reports_per_s: 10_000.0,
            endpoints: vec!["mqtt://127.0.0.1:1883".into()],
        }
    }
}

/// One `[[assignment.groups]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupDecl {
    pub tenant: String,
    pub region: String,
    pub capability: String,
    /// The rate placed before any is observed (reports/s).
    #[serde(default)]
    pub expected_reports_per_s: f64,
}

/// `[assignment]`: seed 001's regional assignment, driven by the instance
/// holding the store's lead (`assign_driver`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AssignmentSection {
    pub enabled: bool,
    /// Lifetime of a published object (renewed at half of it).
    pub ttl_s: u64,
    /// Periodic re-run of the allocation.
    pub period_s: u64,
    /// The region-distance table (`unlisted`, `[[assignment.regions.pairs]]`).
    pub regions: RegionTable,
    pub groups: Vec<GroupDecl>,
    /// A lost group's uplink filter stays subscribed this long after its new
    /// owner was published (overlap is harmless: the store's writes are
    /// conditional).
    pub unsubscribe_grace_s: u64,
    /// The engine's other tunables (`AssignConfig`: heartbeat timeout, cost
    /// weights, …); `ttl_s`, `period_s` and `regions` above take precedence
    /// over the same fields here.
    pub engine: AssignConfig,
}

impl Default for AssignmentSection {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_s: 300,
            period_s: 60,
            regions: RegionTable::default(),
            groups: Vec::new(),
            unsubscribe_grace_s: 10,
            engine: AssignConfig::default(),
        }
    }
}

impl AssignmentSection {
    /// The engine's configuration (the section's fields over `engine`).
    pub fn engine_config(&self) -> AssignConfig {
        AssignConfig {
            ttl_ms: self.ttl_s.saturating_mul(1000),
            period_ms: self.period_s.saturating_mul(1000),
            regions: self.regions.clone(),
            ..self.engine.clone()
        }
    }

    /// A digest of the group definitions: the same groups with the same
    /// expected rates give the same digest, in any order (hex, 128 bits of
    /// SHA-256). Instances sharing a store must agree on it (the lead
    /// compares the digests in the heartbeats, `assign_driver`).
    pub fn groups_digest(&self) -> String {
        use sha2::Digest as _;
        let mut specs = self.group_specs();
        specs.sort_by(|a, b| a.id.cmp(&b.id));
        let mut h = sha2::Sha256::new();
        for s in &specs {
            h.update(s.id.as_str().as_bytes());
            h.update([0]);
            h.update(s.expected_rate.to_bits().to_be_bytes());
        }
        hex::encode(&h.finalize()[..16])
    }

    /// The declared groups (valid after [`check`]).
    pub fn group_specs(&self) -> Vec<GroupSpec> {
        self.groups
            .iter()
            .filter_map(|g| {
                Some(GroupSpec {
                    id: GroupId::of(&g.tenant, &g.region, &g.capability).ok()?,
                    expected_rate: g.expected_reports_per_s,
                })
            })
            .collect()
    }
}

/// The identity of this instance, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub id: ServerId,
    pub region: Region,
    pub capacity: f64,
    pub endpoints: Vec<String>,
}

impl Instance {
    /// A heartbeat with this instance's own load figures.
    pub fn report(&self, load: f64, p99_latency_ms: f64, error_rate: f64) -> ServerReport {
        ServerReport {
            id: self.id.clone(),
            region: self.region.clone(),
            capacity: self.capacity,
            endpoints: self.endpoints.clone(),
            p99_latency_ms,
            error_rate,
            load,
        }
    }
}

/// Which field of which section is wrong, and why (`config.rs` turns it
/// into an error naming the file and line). An array of tables is named
/// with its inner brackets (`[assignment.groups]`) so that the line search
/// finds its `[[…]]` header (the first entry with that field).
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub section: &'static str,
    pub field: &'static str,
    pub message: String,
}

fn bad(section: &'static str, field: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        section,
        field,
        message: message.into(),
    }
}

impl InstanceConfig {
    pub fn check(&self) -> Result<Instance, Invalid> {
        let id =
            ServerId::new(self.id.clone()).map_err(|e| bad("instance", "id", e.to_string()))?;
        let region = Region::new(self.region.clone())
            .map_err(|e| bad("instance", "region", e.to_string()))?;
        let c = self.capacity_reports_per_s;
        if !c.is_finite() || c <= 0.0 {
            return Err(bad(
                "instance",
                "capacity_reports_per_s",
                format!("must be a positive number of reports/s, not {c}"),
            ));
        }
        if self.endpoints.is_empty() || self.endpoints.len() > MAX_ENDPOINTS {
            return Err(bad(
                "instance",
                "endpoints",
                format!("must list 1 to {MAX_ENDPOINTS} broker URLs"),
            ));
        }
        for e in &self.endpoints {
            check_endpoint(e).map_err(|err| bad("instance", "endpoints", err.to_string()))?;
        }
        Ok(Instance {
            id,
            region,
            capacity: c,
            endpoints: self.endpoints.clone(),
        })
    }
}

/// Checks `[instance]` and `[assignment]` together.
pub fn check(instance: &InstanceConfig, a: &AssignmentSection) -> Result<(), Invalid> {
    instance.check()?;
    if a.enabled && a.ttl_s < 2 {
        return Err(bad("assignment", "ttl_s", "must be at least 2 s"));
    }
    if a.enabled && a.period_s == 0 {
        return Err(bad("assignment", "period_s", "must be at least 1 s"));
    }
    for p in &a.regions.pairs {
        if !p.distance.is_finite() || p.distance < 0.0 {
            return Err(bad(
                "[assignment.regions.pairs]",
                "distance",
                format!("must be a non-negative number, not {}", p.distance),
            ));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    for g in &a.groups {
        let id = GroupId::of(&g.tenant, &g.region, &g.capability)
            .map_err(|e| bad("[assignment.groups]", "tenant", e.to_string()))?;
        let r = g.expected_reports_per_s;
        if !r.is_finite() || r < 0.0 {
            return Err(bad(
                "[assignment.groups]",
                "expected_reports_per_s",
                format!("must be a non-negative number, not {r}"),
            ));
        }
        if !seen.insert(id.clone()) {
            return Err(bad(
                "[assignment.groups]",
                "capability",
                format!("group {id} is declared twice"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_check_and_a_bad_instance_says_which_field() {
        assert!(check(&InstanceConfig::default(), &AssignmentSection::default()).is_ok());
        let i = InstanceConfig {
            endpoints: vec!["http://x:1".into()],
            ..InstanceConfig::default()
        };
        assert_eq!(i.check().unwrap_err().field, "endpoints");
        let i = InstanceConfig {
            capacity_reports_per_s: 0.0,
            ..InstanceConfig::default()
        };
        assert_eq!(i.check().unwrap_err().field, "capacity_reports_per_s");
        let i = InstanceConfig {
            id: "a b".into(),
            ..InstanceConfig::default()
        };
        assert_eq!(i.check().unwrap_err().field, "id");
    }

    #[test]
    fn the_groups_digest_depends_on_the_groups_not_their_order() {
        let g = |t: &str, rate: f64| GroupDecl {
            tenant: t.into(),
            region: "eu-west".into(),
            capability: "vpn".into(),
            expected_reports_per_s: rate,
        };
        let with = |groups: Vec<GroupDecl>| AssignmentSection {
            groups,
            ..AssignmentSection::default()
        };
        let ab = with(vec![g("a", 1.0), g("b", 2.0)]).groups_digest();
        assert_eq!(ab.len(), 32);
        assert_eq!(ab, with(vec![g("b", 2.0), g("a", 1.0)]).groups_digest());
        assert_ne!(ab, with(vec![g("a", 1.0)]).groups_digest());
        assert_ne!(ab, with(vec![g("a", 1.0), g("b", 3.0)]).groups_digest());
        assert_ne!(ab, with(vec![g("a", 1.0), g("c", 2.0)]).groups_digest());
    }

    #[test]
    fn the_engine_config_takes_the_sections_fields() {
        let a = AssignmentSection {
            ttl_s: 7,
            period_s: 3,
            ..AssignmentSection::default()
        };
        let c = a.engine_config();
        assert_eq!((c.ttl_ms, c.period_ms), (7_000, 3_000));
        assert_eq!(
            c.heartbeat_timeout_ms,
            AssignConfig::default().heartbeat_timeout_ms
        );
    }
}
