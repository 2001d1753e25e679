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
