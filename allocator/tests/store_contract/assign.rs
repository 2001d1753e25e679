//! The store contract for the regional assignment (issue 19): heartbeats
//! overwrite per instance; a group's assignment never goes back to a lower
//! version (a lower write changes nothing and says so); renewals (same
//! version) overwrite the current object but add no history; each new
//! version is in the history, newest first, bounded per group. A withdrawal
//! removes the current object only at the stored version and is recorded in
//! the history; the capacity shortfalls are replaced as a set.

use shardline_allocator::service::store::{
    AssignmentHistoryRow, ServerBeat, ShortfallRecord, Store, StoredAssignment,
};
use shardline_allocator_core::assign::{AssignmentChange, RerunReason, ServerReport};
use shardline_shared::assign::{Assignment, GroupId, Region, ServerId};

fn beat(id: &str, at_ms: u64, load: f64) -> ServerBeat {
    ServerBeat {
        report: ServerReport {
            id: ServerId::new(id).unwrap(),
            region: Region::new("eu-west").unwrap(),
            capacity: 100.0,
            endpoints: vec!["mqtt://10.0.0.1:1883".into()],
            p99_latency_ms: 5.0,
            error_rate: 0.0,
            load,
        },
        at_ms,
        group_rates: vec![(GroupId::new("acme.eu-west.vpn").unwrap(), 1.5)],
        lead: id == "alloc-a",
        // One instance with a digest, one without (an older version).
        groups_digest: (id == "alloc-a").then(|| "0123456789abcdef".repeat(2)),
    }
}

fn stored(
    group: &str,
    version: u64,
    at_ms: u64,
    server: &str,
    change: AssignmentChange,
) -> StoredAssignment {
    StoredAssignment {
        assignment: Assignment {
            group: GroupId::new(group).unwrap(),
            version,
            issued_at_ms: at_ms,
            expires_at_ms: at_ms + 60_000,
            region: Region::new("eu-west").unwrap(),
            server: ServerId::new(server).unwrap(),
            endpoints: vec!["mqtt://10.0.0.1:1883".into()],
        },
        sealed: vec![version as u8, 1, 2, 3],
        change,
        reasons: vec![RerunReason::Initial],
        at_ms,
    }
}

pub fn check(store: &dyn Store) {
    assert!(store.load_server_beats().unwrap().is_empty());
    assert!(store.load_assignments().unwrap().is_empty());
    store.put_server_beat(&beat("alloc-b", 10, 1.0)).unwrap();
    store.put_server_beat(&beat("alloc-a", 10, 1.0)).unwrap();
    store.put_server_beat(&beat("alloc-a", 20, 2.0)).unwrap();
    let beats = store.load_server_beats().unwrap();
    assert_eq!(
        beats,
        vec![beat("alloc-a", 20, 2.0), beat("alloc-b", 10, 1.0)]
    );

    let g = GroupId::new("acme.eu-west.vpn").unwrap();
    let v1 = stored(g.as_str(), 1, 100, "alloc-a", AssignmentChange::New);
    assert!(store.put_assignment(&v1, 3).unwrap());
    let renewed = stored(g.as_str(), 1, 200, "alloc-a", AssignmentChange::Renewed);
    assert!(store.put_assignment(&renewed, 3).unwrap());
    assert_eq!(store.load_assignments().unwrap(), vec![renewed.clone()]);
    // A renewal adds no history row.
    let h = store.load_assignment_history(&g, 10).unwrap();
    assert_eq!(h, vec![v1.history_row()]);
    let moved = |v: u64, at: u64, to: &str| {
        stored(
            g.as_str(),
            v,
            at,
            to,
            AssignmentChange::Moved {
                from: ServerId::new("alloc-a").unwrap(),
            },
        )
    };
    for v in 2..=5 {
        assert!(store
            .put_assignment(&moved(v, 100 * v + 1000, "alloc-b"), 3)
            .unwrap());
    }
    // Versions never go back: a lower one is refused and changes nothing.
    assert!(!store
        .put_assignment(&moved(4, 9_999, "alloc-a"), 3)
        .unwrap());
    assert_eq!(
        store.load_assignments().unwrap(),
        vec![moved(5, 1500, "alloc-b")]
    );
    // The history is bounded (3) and newest first.
    let h = store.load_assignment_history(&g, 10).unwrap();
    let versions: Vec<u64> = h.iter().map(|r| r.assignment.version).collect();
    assert_eq!(versions, vec![5, 4, 3]);
    assert_eq!(store.load_assignment_history(&g, 1).unwrap().len(), 1);
    // Another group is its own.
    let other = GroupId::new("acme.us-east.vpn").unwrap();
    assert!(store
        .load_assignment_history(&other, 10)
        .unwrap()
        .is_empty());
    let o1 = stored(other.as_str(), 1, 50, "alloc-b", AssignmentChange::New);
    assert!(store.put_assignment(&o1, 3).unwrap());
    assert_eq!(store.load_assignments().unwrap().len(), 2);
    assert_eq!(store.load_assignment_history(&g, 10).unwrap().len(), 3);

    // Withdrawal: not at another version (nothing changes), then at the
    // stored one: the object goes, the history says so, newest first.
    let withdrawn = |v: u64, at: u64| AssignmentHistoryRow {
        change: AssignmentChange::Withdrawn,
        reasons: vec![RerunReason::GroupRemoved(g.clone())],
        at_ms: at,
        ..moved(v, 1500, "alloc-b").history_row()
    };
    assert!(!store.withdraw_assignment(&withdrawn(4, 2_000), 3).unwrap());
    assert_eq!(store.load_assignments().unwrap().len(), 2);
    assert!(store.withdraw_assignment(&withdrawn(5, 2_000), 3).unwrap());
    assert_eq!(store.load_assignments().unwrap(), vec![o1.clone()]);
    let h = store.load_assignment_history(&g, 10).unwrap();
    assert_eq!(h.len(), 3, "bounded as before");
    assert_eq!(h[0], withdrawn(5, 2_000));
    assert_eq!(h[1].assignment.version, 5);
    // Twice: nothing stored any more.
    assert!(!store.withdraw_assignment(&withdrawn(5, 2_100), 3).unwrap());
    assert_eq!(
        store.load_assignment_history(&g, 10).unwrap()[0].at_ms,
        2_000
    );
    // The group may come back later, at a higher version.
    assert!(store
        .put_assignment(&moved(6, 3_000, "alloc-a"), 3)
        .unwrap());
    assert_eq!(store.load_assignments().unwrap().len(), 2);

    // Capacity shortfalls: a set replaced whole, by region order.
    assert!(store.load_shortfalls().unwrap().is_empty());
    let short = |region: &str, amount: f64, since: u64, at: u64| ShortfallRecord {
        region: region.into(),
        shortfall: amount,
        groups: vec![g.clone()],
        since_ms: since,
        at_ms: at,
    };
    store
        .put_shortfalls(&[short("us-east", 5.0, 10, 20), short("eu-west", 2.5, 1, 20)])
        .unwrap();
    assert_eq!(
        store.load_shortfalls().unwrap(),
        vec![short("eu-west", 2.5, 1, 20), short("us-east", 5.0, 10, 20)]
    );
    store
        .put_shortfalls(&[short("eu-west", 3.0, 1, 30)])
        .unwrap();
    assert_eq!(
        store.load_shortfalls().unwrap(),
        vec![short("eu-west", 3.0, 1, 30)]
    );
    store.put_shortfalls(&[]).unwrap();
    assert!(store.load_shortfalls().unwrap().is_empty());
}
