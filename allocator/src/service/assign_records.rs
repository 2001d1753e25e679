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
