//! What the stores keep of the regional assignment (issue 19): each
//! instance's heartbeat, each group's last published object (sealed bytes
//! and the decoded fields), the versions published before (and withdrawals),
//! and the current capacity shortfall per region.

use serde::{Deserialize, Serialize};
use shardline_allocator_core::assign::{AssignmentChange, RerunReason, ServerReport};
use shardline_shared::assign::{Assignment, GroupId};

/// An allocator instance's latest heartbeat: its own metrics, and the
/// group-routed uplinks it counted since its previous one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServerBeat {
    pub report: ServerReport,
    /// The writer's clock, ms since the epoch.
    pub at_ms: u64,
    /// Messages/s seen on each group's routed topics over the last window.
    pub group_rates: Vec<(GroupId, f64)>,
    /// Whether the writer held the store's lead.
    pub lead: bool,
    /// A digest of the writer's `[[assignment.groups]]`
    /// (`AssignmentSection::groups_digest`), which the lead compares with
    /// its own. `None` in a heartbeat written before it existed: it is the
    /// last field, so `dec` pads such a record and it still decodes.
    pub groups_digest: Option<String>,
}

/// A group's last published assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredAssignment {
    pub assignment: Assignment,
    /// The sealed (signed) object as published.
    pub sealed: Vec<u8>,
    pub change: AssignmentChange,
    /// Why the run that placed it happened (empty for a renewal).
    pub reasons: Vec<RerunReason>,
    /// When it was persisted (the lead's clock).
    pub at_ms: u64,
}

impl StoredAssignment {
    /// A new version (not a renewal): it goes into the history.
    pub fn is_new_version(&self) -> bool {
        !matches!(self.change, AssignmentChange::Renewed)
    }

    pub fn history_row(&self) -> AssignmentHistoryRow {
        AssignmentHistoryRow {
            assignment: self.assignment.clone(),
            change: self.change.clone(),
            reasons: self.reasons.clone(),
            at_ms: self.at_ms,
        }
    }
}

/// One published version of a group's assignment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AssignmentHistoryRow {
    pub assignment: Assignment,
    pub change: AssignmentChange,
    pub reasons: Vec<RerunReason>,
    pub at_ms: u64,
}

/// A region whose groups do not fit on its instances, as the lead last saw
/// it: written by the lead, read by every instance's API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShortfallRecord {
    pub region: String,
    /// Reports/s beyond the region's usable capacity.
    pub shortfall: f64,
    /// The groups that did not fit.
    pub groups: Vec<GroupId>,
    /// Since when the region has been short without a break (the lead's
    /// clock; kept across a change of lead).
    pub since_ms: u64,
    /// When the lead last saw it.
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_allocator_core::assign::ServerReport;
    use shardline_shared::assign::{Region, ServerId};

    /// A heartbeat as written before `groups_digest` existed.
    #[derive(Serialize)]
    struct BeatBeforeDigest {
        report: ServerReport,
        at_ms: u64,
        group_rates: Vec<(GroupId, f64)>,
        lead: bool,
    }

    #[test]
    fn a_heartbeat_written_before_the_groups_digest_still_decodes() {
        let report = ServerReport {
            id: ServerId::new("alloc-old").unwrap(),
            region: Region::new("eu-west").unwrap(),
            capacity: 10.0,
            endpoints: vec!["mqtt://h:1".into()],
            p99_latency_ms: 1.0,
            error_rate: 0.0,
            load: 2.0,
        };
        let rates = vec![(GroupId::new("acme.eu-west.vpn").unwrap(), 1.5)];
        let old = super::super::store::enc(&BeatBeforeDigest {
            report: report.clone(),
            at_ms: 7,
            group_rates: rates.clone(),
            lead: true,
        });
        let beat: ServerBeat = super::super::store::dec("alloc-old", &old).unwrap();
        assert_eq!(
            beat,
            ServerBeat {
                report,
                at_ms: 7,
                group_rates: rates,
                lead: true,
                groups_digest: None,
            }
        );
        // And a new one round-trips with its digest.
        let new = ServerBeat {
            groups_digest: Some("ab".repeat(16)),
            ..beat
        };
        let back: ServerBeat =
            super::super::store::dec("alloc-old", &super::super::store::enc(&new)).unwrap();
        assert_eq!(back, new);
    }
}
