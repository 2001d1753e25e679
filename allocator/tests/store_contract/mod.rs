//! The `Store` contract as a check every implementation's tests run on a
//! fresh, empty store: the embedded redb store (`store_redb.rs`) and
//! PostgreSQL (`store_pg.rs`). It is test code and is compiled only into
//! those tests.

mod access;
mod assign;

use shardline_allocator::service::store::{
    Batch, DeviceRecord, Meta, ReportSeq, Store, StoreError, TokenRecord, Tombstone,
};
use shardline_allocator_core::history::{
    HistoryEntry, HistoryEvent, HistoryKind, HistoryQuery, InstructionStatus,
};
use shardline_allocator_core::records::DeviceShardConfig;
use shardline_shared::ids::DeviceId;
use std::collections::BTreeMap;

fn rec(id: &str, version: u64) -> DeviceRecord {
    let mut r = DeviceRecord::new(
        DeviceId::new(id).expect("valid id"),
        [9; 32],
        "basic".into(),
        None,
        5,
    );
    r.version = version;
    r
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("valid id")
}

/// Panics (it is for tests) with what broke the contract.
pub fn check(store: &dyn Store) {
    check_history(store);
    // Create two devices, a token and metadata in one commit.
    let mut a = rec("contract-a", 1);
    a.take_seq();
    // Per-device shard configuration, clear and secret, is part of the record.
    a.shard_config.insert(
        "vpn-tunnel".into(),
        DeviceShardConfig {
            clear: [("peer".to_owned(), "192.0.2.1:51820".to_owned())].into(),
            secret: BTreeMap::new(),
        },
    );
    a.shard_config.insert(
        "auth-psk".into(),
        DeviceShardConfig {
            clear: BTreeMap::new(),
            secret: [("psk".to_owned(), "5d".repeat(32))].into(),
        },
    );
    let token = TokenRecord {
        tier: "basic".into(),
        tenant: Some("t".into()),
        created_ms: 1,
        expires_at_ms: 2,
        uses_left: 1,
    };
    store
        .commit(&Batch {
            put_devices: vec![a.clone(), rec("contract-b", 1)],
            tokens: vec![("h".into(), Some(token.clone()))],
            meta: Some(Meta {
                key_epoch: 3,
                ..Meta::default()
            }),
            ..Batch::default()
        })
        .expect("first commit");
    let mut loaded = store.load_devices().expect("load");
    loaded.sort_by(|x, y| x.device.cmp(&y.device));
    assert_eq!(loaded.len(), 2);
    assert_eq!(loaded[0], a, "a record reloads exactly, version included");
    assert_eq!(
        loaded[0].shard_config["auth-psk"].secret["psk"],
        "5d".repeat(32),
        "the device's configuration reloads"
    );
    assert!(loaded[1].shard_config.is_empty());
    assert_eq!(
        store.load_tokens().expect("tokens"),
        vec![("h".into(), token)]
    );
    assert_eq!(store.load_meta().expect("meta").key_epoch, 3);

    // A floor write moves the version and the loaded floor.
    store
        .commit(&Batch {
            report_seqs: vec![ReportSeq {
                device: id("contract-a"),
                seq: 77,
                version: 2,
            }],
            ..Batch::default()
        })
        .expect("floor write");
    let got = store
        .load_device_records(&[id("contract-a"), id("contract-missing")])
        .expect("load by id");
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].last_report_seq, got[0].version), (77, 2));

    // A writer that read version 1 of `a` is refused, and nothing of its
    // commit lands, not even its write of `b` that was in order.
    let stale_a = rec("contract-a", 2);
    let mut b = rec("contract-b", 2);
    b.tier = "changed".into();
    match store.commit_all(&[
        Batch {
            put_devices: vec![b.clone()],
            ..Batch::default()
        },
        Batch {
            put_devices: vec![stale_a],
            tokens: vec![("h".into(), None)],
            ..Batch::default()
        },
    ]) {
        Err(StoreError::Conflict { devices }) => {
            assert_eq!(devices, vec![id("contract-a")])
        }
        other => panic!("a stale write must conflict, got {other:?}"),
    }
    let versions: BTreeMap<DeviceId, u64> = store
        .device_versions(None)
        .expect("versions")
        .into_iter()
        .collect();
    assert_eq!(versions.get(&id("contract-a")), Some(&2));
    assert_eq!(versions.get(&id("contract-b")), Some(&1));
    assert_eq!(store.load_tokens().expect("tokens").len(), 1);

    // Creating a device that exists is a conflict too (another instance
    // enrolled it first).
    assert!(matches!(
        store.commit(&Batch {
            put_devices: vec![rec("contract-b", 1)],
            ..Batch::default()
        }),
        Err(StoreError::Conflict { .. })
    ));

    // Chained writes of one device in one group commit.
    let mut b3 = b.clone();
    b3.version = 3;
    store
        .commit_all(&[
            Batch {
                put_devices: vec![b.clone()],
                ..Batch::default()
            },
            Batch {
                report_seqs: vec![ReportSeq {
                    device: id("contract-b"),
                    seq: 5,
                    version: 3,
                }],
                ..Batch::default()
            },
            Batch {
                put_devices: vec![{
                    b3.version = 4;
                    b3.clone()
                }],
                ..Batch::default()
            },
        ])
        .expect("chained writes");
    assert_eq!(
        store
            .device_versions(Some(&[id("contract-b"), id("contract-none")]))
            .expect("versions"),
        vec![(id("contract-b"), 4)]
    );

    // Delete is unconditional; a later re-creation starts at version 1.
    store
        .commit(&Batch {
            delete_devices: vec![id("contract-b")],
            ..Batch::default()
        })
        .expect("delete");
    assert_eq!(store.load_devices().expect("load").len(), 1);
    store
        .commit(&Batch {
            put_devices: vec![rec("contract-b", 1)],
            ..Batch::default()
        })
        .expect("re-create");
    assert_eq!(store.load_devices().expect("load").len(), 2);
    check_tombstones_and_health(store);
}

fn tomb(device: &str, last_instruction_seq: u64) -> Tombstone {
    Tombstone {
        device: id(device),
        public_key: [7; 32],
        unenrolled_at_ms: 11,
        last_report_seq: 42,
        last_instruction_seq,
        reputation: None,
    }
}

/// Issue 15: tombstones of unenrolled devices survive the deletion of
/// their record (written with it, in one commit), the last write of an id
/// in a commit wins, `None` deletes; the catalog health blob is the last
/// one committed.
fn check_tombstones_and_health(store: &dyn Store) {
    assert_eq!(store.load_catalog_health().expect("health"), None);
    store
        .commit(&Batch {
            delete_devices: vec![id("contract-b")],
            tombstones: vec![
                (id("contract-b"), Some(tomb("contract-b", 1))),
                (id("contract-b"), Some(tomb("contract-b", 64))),
                (id("contract-t"), Some(tomb("contract-t", 3))),
            ],
            catalog_health: Some(vec![1, 2, 3]),
            ..Batch::default()
        })
        .expect("unenrol with tombstones");
    assert_eq!(store.load_devices().expect("load").len(), 1);
    assert_eq!(
        store.load_tombstones().expect("tombstones"),
        vec![tomb("contract-b", 64), tomb("contract-t", 3)]
    );
    store
        .commit(&Batch {
            put_devices: vec![rec("contract-b", 1)],
            tombstones: vec![(id("contract-b"), None)],
            catalog_health: Some(vec![4]),
            ..Batch::default()
        })
        .expect("re-enrol");
    assert_eq!(
        store.load_tombstones().expect("tombstones"),
        vec![tomb("contract-t", 3)]
    );
    assert_eq!(store.load_catalog_health().expect("health"), Some(vec![4]));
    // Issue 20: the staged rollouts blob, the last one committed, apart
    // from the health blob.
    assert_eq!(store.load_rollouts().expect("rollouts"), None);
    store
        .commit(&Batch {
            rollouts: Some(vec![7, 8]),
            ..Batch::default()
        })
        .expect("rollouts");
    store
        .commit(&Batch {
            rollouts: Some(vec![9]),
            ..Batch::default()
        })
        .expect("rollouts again");
    assert_eq!(store.load_rollouts().expect("rollouts"), Some(vec![9]));
    // The latest diagnostics answer per device: the last write wins.
    assert!(store.load_diagnostics().expect("diagnostics").is_empty());
    store
        .commit(&Batch {
            diagnostics: vec![(id("contract-t"), vec![1]), (id("contract-b"), vec![2])],
            ..Batch::default()
        })
        .expect("diagnostics");
    store
        .commit(&Batch {
            diagnostics: vec![(id("contract-t"), vec![3, 4])],
            ..Batch::default()
        })
        .expect("diagnostics again");
    assert_eq!(
        store.load_diagnostics().expect("diagnostics"),
        vec![(id("contract-b"), vec![2]), (id("contract-t"), vec![3, 4])]
    );
    // An empty blob deletes (unenrolment).
    store
        .commit(&Batch {
            diagnostics: vec![(id("contract-b"), vec![])],
            ..Batch::default()
        })
        .expect("diagnostics deleted");
    assert_eq!(
        store.load_diagnostics().expect("diagnostics"),
        vec![(id("contract-t"), vec![3, 4])]
    );
    assert_eq!(store.load_catalog_health().expect("health"), Some(vec![4]));
    // A conflicting commit writes no tombstone either.
    let err = store
        .commit(&Batch {
            put_devices: vec![rec("contract-b", 7)],
            tombstones: vec![(id("contract-u"), Some(tomb("contract-u", 1)))],
            ..Batch::default()
        })
        .expect_err("stale version");
    assert!(matches!(err, StoreError::Conflict { .. }), "{err}");
    assert_eq!(store.load_tombstones().expect("tombstones").len(), 1);
    assert_eq!(store.load_meta().expect("meta").key_epoch, 3);
    access::check(store);
    assign::check(store);
}

fn reputation(device: &str, at_ms: u64, to: f64) -> HistoryEntry {
    HistoryEntry {
        device: id(device),
        at_ms,
        event: HistoryEvent::Reputation {
            from: 50.0,
            to,
            reason: format!("r{at_ms}"),
        },
    }
}

fn query(
    kind: Option<HistoryKind>,
    since_ms: u64,
    before_ms: Option<u64>,
    limit: usize,
) -> HistoryQuery {
    HistoryQuery {
        kind,
        since_ms,
        before_ms,
        limit,
    }
}

/// History: appended with any batch (even one that writes nothing else),
/// read newest first per device with kind, time and limit filters, entries
/// of equal time all kept, pruned by age and by count per device, and a
/// refused batch appends none.
fn check_history(store: &dyn Store) {
    let instruction = HistoryEntry {
        device: id("hist-a"),
        at_ms: 20,
        event: HistoryEvent::Instruction {
            seq: 7,
            ops: vec!["activate x@1".into()],
            status: InstructionStatus::Sent,
            reason: None,
        },
    };
    store
        .commit(&Batch {
            history: vec![
                reputation("hist-a", 10, 40.0),
                instruction.clone(),
                reputation("hist-a", 20, 30.0),
                reputation("hist-b", 15, 45.0),
            ],
            ..Batch::default()
        })
        .expect("history commit");
    store
        .commit(&Batch {
            history: vec![reputation("hist-a", 30, 20.0)],
            ..Batch::default()
        })
        .expect("second history commit");
    let all = store
        .load_history(&id("hist-a"), &query(None, 0, None, 100))
        .expect("load history");
    let times: Vec<u64> = all.iter().map(|e| e.at_ms).collect();
    assert_eq!(times, [30, 20, 20, 10], "newest first, equal times kept");
    assert!(all.iter().all(|e| e.device == id("hist-a")));
    assert!(all.contains(&instruction), "entries round-trip");
    let reps = store
        .load_history(
            &id("hist-a"),
            &query(Some(HistoryKind::Reputation), 0, None, 100),
        )
        .expect("by kind");
    assert_eq!(reps.len(), 3);
    let page = store
        .load_history(&id("hist-a"), &query(None, 15, Some(30), 1))
        .expect("window and limit");
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].at_ms, 20);
    assert!(store
        .load_history(&id("hist-none"), &query(None, 0, None, 10))
        .expect("unknown device")
        .is_empty());

    // A batch the store refuses (stale version) appends no history.
    let refused = store.commit(&Batch {
        put_devices: vec![rec("hist-stale", 5)],
        history: vec![reputation("hist-a", 40, 10.0)],
        ..Batch::default()
    });
    assert!(
        matches!(refused, Err(StoreError::Conflict { .. })),
        "{refused:?}"
    );
    assert_eq!(
        store
            .load_history(&id("hist-a"), &query(None, 0, None, 100))
            .expect("after refusal")
            .len(),
        4
    );

    // Older than 15 goes (hist-a's 10), then all but hist-a's newest 2.
    let pruned = store.prune_history(15, 2).expect("prune");
    assert_eq!(pruned, 2, "one too old, one beyond the bound");
    let left: Vec<u64> = store
        .load_history(&id("hist-a"), &query(None, 0, None, 100))
        .expect("after prune")
        .iter()
        .map(|e| e.at_ms)
        .collect();
    assert_eq!(left, [30, 20]);
    assert_eq!(
        store
            .load_history(&id("hist-b"), &query(None, 0, None, 100))
            .expect("other device")
            .len(),
        1,
        "another device's entries count on their own"
    );
    assert_eq!(store.prune_history(0, 100).expect("prune again"), 0);
    // Leave nothing behind for the rest of the contract.
    store.prune_history(u64::MAX, 1).expect("prune all");
}
