//! The lead's upkeep of what the assignment engine does not keep (issue 19),
//! as plain state the driver (`assign_driver`) feeds and acts on:
//! - [`unconfigured`] / [`withdrawal_row`]: a group with a stored object that
//!   is no longer in `[assignment] groups` is withdrawn by the lead: the
//!   withdrawal is committed to the store (the object removed, a `Withdrawn`
//!   row in the group's history), then the retained copy is cleared (an
//!   empty retained message), and nothing renews it (the engine, built from
//!   the configuration, never had the group). Devices keep a valid object
//!   until its expiry (`agent::daemon::assignment`), so
//! - [`Lingering`] keeps this instance reading the routed uplinks of a group
//!   it owned until that object's expiry when the group vanishes from the
//!   store (a move to another owner keeps the ordinary grace instead).
//! - [`ShortfallBook`]: the current capacity shortfall per region and since
//!   when, persisted by the lead so every instance's API shows it.

use super::assign_records::{AssignmentHistoryRow, ShortfallRecord, StoredAssignment};
use shardline_allocator_core::assign::{AssignmentChange, CapacityShortfall, RerunReason};
use shardline_shared::assign::{GroupId, ServerId};
use shardline_shared::topics;
use std::collections::{BTreeMap, BTreeSet};

/// The stored objects of groups not in `configured`.
pub fn unconfigured<'a>(
    configured: &BTreeSet<GroupId>,
    stored: &'a [StoredAssignment],
) -> Vec<&'a StoredAssignment> {
    stored
        .iter()
        .filter(|s| !configured.contains(&s.assignment.group))
        .collect()
}

/// The history row recording `s`'s withdrawal at `now`.
pub fn withdrawal_row(s: &StoredAssignment, now: u64) -> AssignmentHistoryRow {
    AssignmentHistoryRow {
        assignment: s.assignment.clone(),
        change: AssignmentChange::Withdrawn,
        reasons: vec![RerunReason::GroupRemoved(s.assignment.group.clone())],
        at_ms: now,
    }
}

/// Groups this instance owned whose object is gone from the store (a
/// withdrawal), with that object's expiry: devices may route to it until
/// then.
#[derive(Debug, Default)]
pub struct Lingering {
    owned: BTreeMap<GroupId, u64>,
}

impl Lingering {
    /// Updates from the stored objects at `now`; returns the routed uplink
    /// filters to keep beyond the owned groups'.
    pub fn update(
        &mut self,
        me: &ServerId,
        stored: &[StoredAssignment],
        now: u64,
    ) -> BTreeSet<String> {
        let present: BTreeMap<&GroupId, &StoredAssignment> =
            stored.iter().map(|s| (&s.assignment.group, s)).collect();
        // Moved away: the ordinary grace applies; expired: nothing routes.
        self.owned.retain(|g, expires| {
            now < *expires && present.get(g).is_none_or(|s| &s.assignment.server == me)
        });
        for s in stored.iter().filter(|s| &s.assignment.server == me) {
            self.owned
                .insert(s.assignment.group.clone(), s.assignment.expires_at_ms);
        }
        self.owned
            .keys()
            .filter(|g| !present.contains_key(g))
            .map(topics::group_uplink_filter)
            .collect()
    }
}

/// The lead's view of the capacity shortfalls: the current one per region
/// and since when, and whether the store's copy is behind.
#[derive(Debug, Default)]
pub struct ShortfallBook {
    current: BTreeMap<String, ShortfallRecord>,
    dirty: bool,
}

impl ShortfallBook {
    /// Starts from the stored records (a new lead keeps the "since").
    pub fn restore(records: Vec<ShortfallRecord>) -> Self {
        Self {
            current: records.into_iter().map(|r| (r.region.clone(), r)).collect(),
            dirty: false,
        }
    }

    /// The engine reported `s` at `now`.
    pub fn need(&mut self, s: &CapacityShortfall, now: u64) {
        let region = s.region.to_string();
        let since = self
            .current
            .get(&region)
            .map_or(now, |r| r.since_ms.min(now));
        self.current.insert(
            region.clone(),
            ShortfallRecord {
                region,
                shortfall: s.shortfall,
                groups: s.groups.clone(),
                since_ms: since,
                at_ms: now,
            },
        );
        self.dirty = true;
    }

    /// A run ended: regions it did not find short are short no more.
    pub fn run_ended(&mut self, short: &BTreeSet<String>) {
        let before = self.current.len();
        self.current.retain(|region, _| short.contains(region));
        self.dirty |= self.current.len() != before;
    }

    /// The records to write if the store's copy is behind (then marked
    /// written; [`ShortfallBook::write_failed`] marks them behind again).
    pub fn take_dirty(&mut self) -> Option<Vec<ShortfallRecord>> {
        std::mem::take(&mut self.dirty).then(|| self.current.values().cloned().collect())
    }

    pub fn write_failed(&mut self) {
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::assign::{Assignment, Region};

    fn stored(g: &str, server: &str, expires: u64) -> StoredAssignment {
        StoredAssignment {
            assignment: Assignment {
                group: GroupId::new(g).unwrap(),
                version: 3,
                issued_at_ms: 1,
                expires_at_ms: expires,
                region: Region::new("eu").unwrap(),
                server: ServerId::new(server).unwrap(),
                endpoints: vec!["mqtt://h:1".into()],
            },
            sealed: vec![1],
            change: AssignmentChange::New,
            reasons: vec![],
            at_ms: 1,
        }
    }

    #[test]
    fn groups_out_of_the_configuration_are_withdrawn_at_their_version() {
        let s = [stored("t.eu.a", "x", 100), stored("t.eu.b", "x", 100)];
        let configured: BTreeSet<GroupId> = [GroupId::new("t.eu.a").unwrap()].into();
        let out = unconfigured(&configured, &s);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].assignment.group.as_str(), "t.eu.b");
        let row = withdrawal_row(out[0], 50);
        assert_eq!(row.change, AssignmentChange::Withdrawn);
        assert_eq!((row.assignment.version, row.at_ms), (3, 50));
        assert!(unconfigured(&BTreeSet::new(), &[]).is_empty());
    }

    #[test]
    fn a_withdrawn_groups_uplinks_are_read_until_its_object_expires() {
        let me = ServerId::new("x").unwrap();
        let mut l = Lingering::default();
        let both = [stored("t.eu.a", "x", 100), stored("t.eu.b", "y", 100)];
        assert!(l.update(&me, &both, 10).is_empty());
        // a withdrawn (gone from the store): kept until its expiry.
        let kept = l.update(&me, &both[1..], 20);
        assert_eq!(
            kept,
            [topics::group_uplink_filter(
                &GroupId::new("t.eu.a").unwrap()
            )]
            .into()
        );
        assert_eq!(l.update(&me, &both[1..], 99), kept);
        assert!(l.update(&me, &both[1..], 100).is_empty());
        // Moved to another owner: not lingering (the ordinary grace).
        let mut l = Lingering::default();
        l.update(&me, &both, 10);
        let moved = [stored("t.eu.a", "y", 200)];
        assert!(l.update(&me, &moved, 20).is_empty());
        assert!(l.update(&me, &[], 30).is_empty());
    }

    #[test]
    fn a_shortfall_keeps_its_since_until_a_run_clears_it() {
        let region = Region::new("eu").unwrap();
        let short = |amount: f64, at: u64| CapacityShortfall {
            at_ms: at,
            region: region.clone(),
            shortfall: amount,
            groups: vec![GroupId::new("t.eu.a").unwrap()],
        };
        let mut b = ShortfallBook::default();
        assert_eq!(b.take_dirty(), None);
        b.need(&short(5.0, 10), 10);
        b.run_ended(&["eu".to_owned()].into());
        let w = b.take_dirty().unwrap();
        assert_eq!((w[0].shortfall, w[0].since_ms, w[0].at_ms), (5.0, 10, 10));
        assert_eq!(b.take_dirty(), None, "written once");
        b.need(&short(7.0, 20), 20);
        let w = b.take_dirty().unwrap();
        assert_eq!((w[0].shortfall, w[0].since_ms, w[0].at_ms), (7.0, 10, 20));
        // A failed write is retried.
        b.write_failed();
        assert!(b.take_dirty().is_some());
        // A new lead restores it and keeps the since.
        let mut b = ShortfallBook::restore(w);
        b.need(&short(8.0, 30), 30);
        assert_eq!(b.take_dirty().unwrap()[0].since_ms, 10);
        b.run_ended(&BTreeSet::new());
        assert_eq!(b.take_dirty(), Some(vec![]));
        b.need(&short(1.0, 40), 40);
        assert_eq!(b.take_dirty().unwrap()[0].since_ms, 40, "a new streak");
    }
}
