//! The PostgreSQL store against a real, throwaway PostgreSQL server
//! (`xtask::kit::postgres`): the store contract, two instances racing on
//! the same devices, the fleet-wide lead moving when its holder goes,
//! reconnection after the server drops every session, and the group-commit
//! throughput the service's report path needs. Skips, saying why, when
//! PostgreSQL is not installed.

mod store_contract;

use shardline_allocator::service::store::{Batch, DeviceRecord, ReportSeq, Store, StoreError};
use shardline_allocator::service::store_pg::PgStore;
use shardline_shared::ids::DeviceId;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use xtask::kit::postgres::{self, TestPostgres};

/// A fresh server, or `None` (with the reason printed) when PostgreSQL is
/// not installed. Installed but failing to start is a test failure.
fn server(test: &str) -> Option<TestPostgres> {
    if !postgres::installed() {
        println!(
            "SKIP {test}: PostgreSQL is not installed (initdb/postgres not on PATH nor under \
             /usr/lib/postgresql/*/bin); `cargo xtask setup` as root installs it"
        );
        return None;
    }
    match TestPostgres::start_temp() {
        Ok(pg) => Some(pg),
        Err(e) => panic!("{test}: PostgreSQL is installed but did not start: {e}"),
    }
}

fn connect(pg: &TestPostgres) -> PgStore {
    PgStore::connect(&pg.url()).unwrap_or_else(|e| panic!("connect: {e}\n{}", pg.log_tail(20)))
}

fn id(s: &str) -> DeviceId {
    DeviceId::new(s).expect("valid id")
}

fn rec(name: &str, version: u64) -> DeviceRecord {
    let mut r = DeviceRecord::new(id(name), [7; 32], "basic".into(), None, 1);
    r.version = version;
    r
}

#[test]
fn the_postgres_store_keeps_the_store_contract() {
    let Some(pg) = server("the_postgres_store_keeps_the_store_contract") else {
        return;
    };
    store_contract::check(&connect(&pg));
    // A second connection (another instance, or this one restarted) sees
    // exactly what was committed, and connecting again leaves the schema be.
    let again = connect(&pg);
    assert_eq!(again.device_versions(None).unwrap().len(), 2);
    assert_eq!(again.load_meta().unwrap().key_epoch, 3);
    assert!(again.is_shared());
}

#[test]
fn two_instances_cannot_both_commit_from_the_same_read() {
    let Some(pg) = server("two_instances_cannot_both_commit_from_the_same_read") else {
        return;
    };
    let (a, b) = (connect(&pg), connect(&pg));
    a.commit(&Batch {
        put_devices: vec![rec("x", 1), rec("y", 1)],
        ..Batch::default()
    })
    .unwrap();

    // Both instances read x at version 1.
    let mut xa = a.load_device_records(&[id("x")]).unwrap().remove(0);
    let mut xb = b.load_device_records(&[id("x")]).unwrap().remove(0);
    assert_eq!((xa.version, xb.version), (1, 1));

    xa.tier = "from-a".into();
    xa.version = 2;
    a.commit(&Batch {
        put_devices: vec![xa.clone()],
        ..Batch::default()
    })
    .unwrap();

    // B's commit carries its stale x and an in-order floor write of y:
    // refused whole, naming x.
    xb.tier = "from-b".into();
    xb.version = 2;
    match b.commit(&Batch {
        put_devices: vec![xb],
        report_seqs: vec![ReportSeq {
            device: id("y"),
            seq: 9,
            version: 2,
        }],
        ..Batch::default()
    }) {
        Err(StoreError::Conflict { devices }) => assert_eq!(devices, vec![id("x")]),
        other => panic!("the stale commit must conflict, got {other:?}"),
    }
    let now = b.load_device_records(&[id("x"), id("y")]).unwrap();
    assert_eq!((now[0].tier.as_str(), now[0].version), ("from-a", 2));
    assert_eq!(
        (now[1].last_report_seq, now[1].version),
        (0, 1),
        "y untouched"
    );

    // After reloading, B's write applies.
    let mut x = now[0].clone();
    x.version = 3;
    x.tier = "from-b".into();
    b.commit(&Batch {
        put_devices: vec![x],
        ..Batch::default()
    })
    .unwrap();
    assert_eq!(
        a.device_versions(Some(&[id("x")])).unwrap(),
        vec![(id("x"), 3)]
    );
}

#[test]
fn racing_instances_commit_each_version_exactly_once() {
    let Some(pg) = server("racing_instances_commit_each_version_exactly_once") else {
        return;
    };
    let setup = connect(&pg);
    let devices: Vec<DeviceId> = (0..4).map(|i| id(&format!("race-{i}"))).collect();
    setup
        .commit(&Batch {
            put_devices: devices.iter().map(|d| rec(d.as_str(), 1)).collect(),
            ..Batch::default()
        })
        .unwrap();
    const ROUNDS: usize = 150;
    let wins: Vec<(usize, usize)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..2)
            .map(|_| {
                let store = connect(&pg);
                let devices = &devices;
                s.spawn(move || {
                    let (mut won, mut lost) = (0, 0);
                    for round in 0..ROUNDS {
                        let d = &devices[round % devices.len()];
                        let v = store
                            .device_versions(Some(std::slice::from_ref(d)))
                            .unwrap()[0]
                            .1;
                        match store.commit(&Batch {
                            report_seqs: vec![ReportSeq {
                                device: d.clone(),
                                seq: v + 1,
                                version: v + 1,
                            }],
                            ..Batch::default()
                        }) {
                            Ok(()) => won += 1,
                            Err(StoreError::Conflict { .. }) => lost += 1,
                            Err(e) => panic!("commit: {e}"),
                        }
                    }
                    (won, lost)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let won: usize = wins.iter().map(|w| w.0).sum();
    let versions: u64 = setup
        .device_versions(Some(&devices))
        .unwrap()
        .iter()
        .map(|(_, v)| v - 1)
        .sum();
    println!("racing instances: (won, lost) per instance {wins:?}");
    assert_eq!(
        won as u64, versions,
        "every accepted write moved a version exactly once"
    );
    // The floor each write carried is its version: no write was lost or doubled.
    for r in setup.load_device_records(&devices).unwrap() {
        assert_eq!(r.last_report_seq, r.version, "{}", r.device);
    }
}

#[test]
fn exactly_one_instance_leads_and_the_lead_moves_when_it_goes() {
    let Some(pg) = server("exactly_one_instance_leads_and_the_lead_moves_when_it_goes") else {
        return;
    };
    let a = connect(&pg);
    let b = connect(&pg);
    let (la, lb) = (a.try_lead().unwrap(), b.try_lead().unwrap());
    assert!(la ^ lb, "exactly one leads: a {la}, b {lb}");
    for _ in 0..3 {
        assert_eq!(
            (a.try_lead().unwrap(), b.try_lead().unwrap()),
            (la, lb),
            "stable"
        );
    }
    let (leader, other) = if la { (a, b) } else { (b, a) };
    drop(leader);
    let start = Instant::now();
    while !other.try_lead().unwrap() {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "the remaining instance did not take the lead"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!("lead moved {:?} after the leader closed", start.elapsed());
    // A third instance does not lead while `other` does.
    let c = connect(&pg);
    assert!(!c.try_lead().unwrap());
    drop(c);

    // An instance that cannot reach the store does not lead.
    drop(pg);
    assert!(!other.try_lead().unwrap(), "no store, no lead");
}

#[test]
fn sessions_the_server_drops_are_reopened() {
    let Some(pg) = server("sessions_the_server_drops_are_reopened") else {
        return;
    };
    let store = connect(&pg);
    store
        .commit(&Batch {
            put_devices: vec![rec("r", 1)],
            ..Batch::default()
        })
        .unwrap();
    assert!(store.try_lead().unwrap());
    let mut admin = ::postgres::Client::connect(&pg.url(), ::postgres::NoTls).unwrap();
    let killed = admin
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE application_name = 'shardline-allocator' AND pid <> pg_backend_pid()",
            &[],
        )
        .unwrap()
        .len();
    assert_eq!(killed, 3, "the store's commit, read and lead sessions");
    std::thread::sleep(Duration::from_millis(100));
    // Each call reopens its session once and goes on.
    assert_eq!(store.load_devices().unwrap().len(), 1);
    store
        .commit(&Batch {
            report_seqs: vec![ReportSeq {
                device: id("r"),
                seq: 4,
                version: 2,
            }],
            ..Batch::default()
        })
        .unwrap();
    assert!(
        store.try_lead().unwrap(),
        "the lead is retaken on a new session"
    );
    assert_eq!(store.device_versions(None).unwrap(), vec![(id("r"), 2)]);
}

/// Informative: the service's report path commits groups of a few batches,
/// each mostly report-floor writes.
#[test]
fn group_commit_throughput_of_report_floor_writes() {
    let Some(pg) = server("group_commit_throughput_of_report_floor_writes") else {
        return;
    };
    const DEVICES: usize = 10_000;
    const GROUPS: usize = 100;
    const BATCHES: usize = 3;
    const FLOORS: usize = 35;
    const PUTS: usize = 3;
    let store = connect(&pg);
    let names: Vec<String> = (0..DEVICES).map(|i| format!("dev-{i:05}")).collect();
    let mut current: Vec<DeviceRecord> = names
        .iter()
        .map(|n| {
            let mut r = rec(n, 1);
            r.engine_state = vec![0x5a; 200];
            r
        })
        .collect();
    for chunk in current.chunks(2000) {
        store
            .commit(&Batch {
                put_devices: chunk.to_vec(),
                ..Batch::default()
            })
            .unwrap();
    }

    // A fixed pseudo-random walk (xorshift) over the fleet.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % DEVICES as u64) as usize
    };
    let mut groups = Vec::with_capacity(GROUPS);
    for _ in 0..GROUPS {
        let mut batches = Vec::with_capacity(BATCHES);
        for _ in 0..BATCHES {
            let mut picked = std::collections::HashSet::new();
            let mut batch = Batch::default();
            while picked.len() < FLOORS + PUTS {
                let i = next();
                if !picked.insert(i) {
                    continue;
                }
                let r = &mut current[i];
                r.version += 1;
                r.last_report_seq += 1;
                if picked.len() <= PUTS {
                    r.next_instruction_seq += 1;
                    batch.put_devices.push(r.clone());
                } else {
                    batch.report_seqs.push(ReportSeq {
                        device: r.device.clone(),
                        seq: r.last_report_seq,
                        version: r.version,
                    });
                }
            }
            batches.push(batch);
        }
        groups.push(batches);
    }

    let mut latencies = Vec::with_capacity(GROUPS);
    let start = Instant::now();
    for g in &groups {
        let t = Instant::now();
        store.commit_all(g).unwrap();
        latencies.push(t.elapsed());
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let writes = GROUPS * BATCHES * (FLOORS + PUTS);
    println!(
        "PostgreSQL group commit: {writes} device writes in {GROUPS} groups of {BATCHES} batches \
         ({FLOORS} floor + {PUTS} whole-record writes each) over {DEVICES} devices: {:.0} ms, \
         {:.0} writes/s, group latency p50 {:.2} ms p99 {:.2} ms",
        elapsed.as_secs_f64() * 1e3,
        writes as f64 / elapsed.as_secs_f64(),
        latencies[GROUPS / 2].as_secs_f64() * 1e3,
        latencies[GROUPS * 99 / 100].as_secs_f64() * 1e3,
    );

    // Everything landed as planned.
    let expected: BTreeMap<DeviceId, u64> = current
        .iter()
        .map(|r| (r.device.clone(), r.version))
        .collect();
    let stored: BTreeMap<DeviceId, u64> =
        store.device_versions(None).unwrap().into_iter().collect();
    assert_eq!(stored, expected);
    let loaded = store.load_devices().unwrap();
    assert_eq!(loaded.len(), DEVICES);
    for r in &loaded {
        let want = &current[names.binary_search(&r.device.as_str().to_owned()).unwrap()];
        assert_eq!(r.last_report_seq, want.last_report_seq, "{}", r.device);
    }
}
