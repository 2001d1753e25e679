//! The embedded redb store against the `Store` contract, and across a reopen.

mod store_contract;

use shardline_allocator::service::store::{RedbStore, Store};

#[test]
fn the_embedded_store_keeps_the_store_contract_across_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    store_contract::check(&RedbStore::open(&path).unwrap());
    // What was committed is what a reopened file holds.
    let store = RedbStore::open(&path).unwrap();
    let versions = store.device_versions(None).unwrap();
    assert_eq!(versions.len(), 2);
    assert_eq!(store.load_meta().unwrap().key_epoch, 3);
}

/// A store written before report floors and write versions shared one
/// record (tables `report_seq` and `device_version`) opens with both
/// carried over: the floor is not lowered (a replayed report would
/// otherwise be accepted) and conditional writes continue from the stored
/// version; the old tables are gone afterwards.
#[test]
fn a_store_with_separate_floor_and_version_tables_is_carried_over() {
    use redb::TableDefinition;
    use shardline_allocator::service::store::{Batch, DeviceRecord, ReportSeq, StoreError};
    use shardline_shared::ids::DeviceId;
    const FLOOR: TableDefinition<'_, &str, (u64, u64)> = TableDefinition::new("device_floor");
    const SEQ: TableDefinition<'_, &str, u64> = TableDefinition::new("report_seq");
    const VERSION: TableDefinition<'_, &str, u64> = TableDefinition::new("device_version");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.redb");
    let a = DeviceId::new("old-a").unwrap();
    let mut rec = DeviceRecord::new(a.clone(), [7; 32], "basic".into(), None, 5);
    rec.version = 1;
    rec.last_report_seq = 3;
    {
        let store = RedbStore::open(&path).unwrap();
        store
            .commit(&Batch {
                put_devices: vec![rec.clone()],
                ..Batch::default()
            })
            .unwrap();
    }
    // Rewrite the file into the former layout: floor 41 (above the body's
    // 3, as after reports since the last full write), version 6.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        assert!(txn.delete_table(FLOOR).unwrap());
        // Nor had it the log of floor changes since.
        let log: TableDefinition<'_, u64, &[u8]> = TableDefinition::new("device_floor_log");
        assert!(txn.delete_table(log).unwrap());
        txn.open_table(SEQ).unwrap().insert("old-a", 41).unwrap();
        txn.open_table(VERSION).unwrap().insert("old-a", 6).unwrap();
        txn.commit().unwrap();
    }
    let store = RedbStore::open(&path).unwrap();
    let got = store.load_device_records(std::slice::from_ref(&a)).unwrap();
    assert_eq!((got[0].last_report_seq, got[0].version), (41, 6));
    assert_eq!(store.device_versions(None).unwrap(), vec![(a.clone(), 6)]);
    // A writer still on version 5 is refused; the next version is taken.
    let stale = Batch {
        report_seqs: vec![ReportSeq {
            device: a.clone(),
            seq: 42,
            version: 6,
        }],
        ..Batch::default()
    };
    assert!(matches!(
        store.commit(&stale),
        Err(StoreError::Conflict { .. })
    ));
    store
        .commit(&Batch {
            report_seqs: vec![ReportSeq {
                device: a.clone(),
                seq: 42,
                version: 7,
            }],
            ..Batch::default()
        })
        .unwrap();
    drop(store);
    // Carried over for good: the old tables are gone, and the reopened
    // store has the floor and version moved out of them and moved on since.
    let store = RedbStore::open(&path).unwrap();
    let got = store.load_device_records(std::slice::from_ref(&a)).unwrap();
    assert_eq!((got[0].last_report_seq, got[0].version), (42, 7));
    drop(store);
    let db = redb::Database::create(&path).unwrap();
    let txn = db.begin_read().unwrap();
    assert!(matches!(
        txn.open_table(SEQ),
        Err(redb::TableError::TableDoesNotExist(_))
    ));
    assert!(matches!(
        txn.open_table(VERSION),
        Err(redb::TableError::TableDoesNotExist(_))
    ));
}
