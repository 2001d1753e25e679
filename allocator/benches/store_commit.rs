//! The embedded store's group commit, alone: what the allocator's store
//! thread spends per accepted report, on this machine's disk.
//!
//! A fleet of 30,000 device records (engine state of 1,400 bytes, about
//! what `service_core` writes) is enrolled, then commits are made of what
//! a step of `service_core` carries in its sustained phase: 450 report
//! floors, 285 whole records and 300 history entries of devices spread
//! over the fleet, each commit fsynced. Reported per report floor: CPU of
//! the committing thread (/proc/thread-self/schedstat) and bytes handed to
//! `write` (/proc/thread-self/io `wchar`), median of 5 runs.
//!
//! The floors alone are measured twice in the same run: through
//! [`RedbStore`] (kept in memory, one log row per commit) and, as the peer,
//! written the plain redb way, each device's row looked up and replaced in
//! one per-device table (what the store did before the log).
//!
//! `STORE_BENCH_DEVICES`, `STORE_BENCH_COMMITS` and `STORE_BENCH_RUNS`
//! override the sizes; `STORE_BENCH_NO_WRITE` leaves BENCHMARKS.md alone.

mod common;
use common::{cpu_ns, env_or, machine, median};

use redb::ReadableTable;
use shardline_allocator::service::store::{
    Batch, DeviceRecord, HistoryEntry, RedbStore, ReportSeq, Store,
};
use shardline_allocator_core::history::HistoryEvent;
use shardline_shared::ids::DeviceId;
use std::collections::HashSet;

const FLOORS_PER_COMMIT: usize = 450;
const RECORDS_PER_COMMIT: usize = 285;
const HISTORY_PER_COMMIT: usize = 300;

/// Whole records and history entries per commit (`STORE_BENCH_RECORDS`,
/// `STORE_BENCH_HISTORY` override them, to see what each costs).
fn mix() -> (usize, usize) {
    (
        env_or("STORE_BENCH_RECORDS", RECORDS_PER_COMMIT),
        env_or("STORE_BENCH_HISTORY", HISTORY_PER_COMMIT),
    )
}
const ENGINE_STATE_BYTES: usize = 1_400;

fn thread_wchar() -> u64 {
    std::fs::read_to_string("/proc/thread-self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// A fixed pseudo-random sequence (xorshift), so every run and both
/// writers touch the same devices.
struct Picks(u64);

impl Picks {
    fn next(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// CPU µs and bytes written per report floor.
#[derive(Debug, Clone, Copy)]
struct Cost {
    cpu_us: f64,
    bytes: f64,
}

fn measure(reports: usize, f: impl FnOnce()) -> Cost {
    let (c0, w0) = (cpu_ns().unwrap_or(0), thread_wchar());
    f();
    let (c1, w1) = (cpu_ns().unwrap_or(0), thread_wchar());
    Cost {
        cpu_us: c1.saturating_sub(c0) as f64 / 1000.0 / reports as f64,
        bytes: w1.saturating_sub(w0) as f64 / reports as f64,
    }
}

struct Fleet {
    ids: Vec<DeviceId>,
    records: Vec<DeviceRecord>,
    /// Next (report floor, write version) per device.
    floors: Vec<(u64, u64)>,
}

fn fleet_ids(devices: usize) -> Vec<DeviceId> {
    (0..devices)
        .map(|i| DeviceId::new(format!("bench-{i:06}")).expect("id"))
        .collect()
}

fn enrolled(store: &RedbStore, devices: usize) -> Fleet {
    let ids = fleet_ids(devices);
    let mut records = Vec::with_capacity(devices);
    for (i, id) in ids.iter().enumerate() {
        let mut key = [0u8; 32];
        key[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let mut rec = DeviceRecord::new(id.clone(), key, "standard".into(), None, 5);
        rec.engine_state = (0..ENGINE_STATE_BYTES)
            .map(|b| (b * 31 + i) as u8)
            .collect();
        rec.version = 1;
        records.push(rec);
    }
    for chunk in records.chunks(2_000) {
        store
            .commit(&Batch {
                put_devices: chunk.to_vec(),
                ..Batch::default()
            })
            .expect("enrol");
    }
    Fleet {
        floors: vec![(0, 1); devices],
        ids,
        records,
    }
}

/// A step's commit as `service_core` makes them in its sustained phase.
fn step_batch(fleet: &mut Fleet, picks: &mut Picks, now_ms: u64) -> Batch {
    let n = fleet.ids.len();
    let mut batch = Batch::default();
    let mut touched = HashSet::new();
    let (records, history) = mix();
    for _ in 0..records {
        let i = picks.next(n);
        if !touched.insert(i) {
            continue;
        }
        let f = &mut fleet.floors[i];
        f.1 += 1;
        let rec = &mut fleet.records[i];
        rec.version = f.1;
        rec.last_report_seq = f.0;
        batch.put_devices.push(rec.clone());
    }
    for _ in 0..FLOORS_PER_COMMIT {
        let i = picks.next(n);
        if !touched.insert(i) {
            continue;
        }
        let f = &mut fleet.floors[i];
        f.0 += 1;
        f.1 += 1;
        batch.report_seqs.push(ReportSeq {
            device: fleet.ids[i].clone(),
            seq: f.0,
            version: f.1,
        });
    }
    for k in 0..history {
        let i = picks.next(n);
        batch.history.push(HistoryEntry {
            device: fleet.ids[i].clone(),
            at_ms: now_ms + k as u64,
            event: HistoryEvent::Reputation {
                from: 50.0,
                to: 50.1,
                reason: "clean_lease".into(),
            },
        });
    }
    batch
}

/// Whole commits through the store: (cost per report floor).
fn full_commits(dir: &std::path::Path, devices: usize, commits: usize) -> Cost {
    let store = RedbStore::open(&dir.join("full.redb")).expect("open");
    let mut fleet = enrolled(&store, devices);
    let mut picks = Picks(0x9e37_79b9_7f4a_7c15);
    // Warm: the first commits after enrolment rewrite fresh pages.
    for c in 0..commits / 4 {
        let b = step_batch(&mut fleet, &mut picks, c as u64 * 20);
        store.commit(&b).expect("commit");
    }
    let batches: Vec<Batch> = (0..commits)
        .map(|c| step_batch(&mut fleet, &mut picks, 1_000_000 + c as u64 * 20))
        .collect();
    let reports: usize = batches.iter().map(|b| b.report_seqs.len()).sum();
    measure(reports, || {
        for b in &batches {
            store.commit(b).expect("commit");
        }
    })
}

/// Floors only: through the store, and the plain per-device table.
fn floor_commits(dir: &std::path::Path, devices: usize, commits: usize) -> (Cost, Cost) {
    let ids = fleet_ids(devices);
    let plan = |seed: u64| {
        let mut picks = Picks(seed);
        // After `first` below: floor 0, version 1.
        let mut floors = vec![(0u64, 1u64); devices];
        (0..commits)
            .map(|_| {
                let mut seen = HashSet::new();
                let mut batch = Vec::new();
                for _ in 0..FLOORS_PER_COMMIT {
                    let i = picks.next(devices);
                    if seen.insert(i) {
                        floors[i].0 += 1;
                        floors[i].1 += 1;
                        batch.push(ReportSeq {
                            device: ids[i].clone(),
                            seq: floors[i].0,
                            version: floors[i].1,
                        });
                    }
                }
                batch
            })
            .collect::<Vec<_>>()
    };
    // Every device once first (as enrolment does), not measured.
    let first: Vec<ReportSeq> = ids
        .iter()
        .map(|d| ReportSeq {
            device: d.clone(),
            seq: 0,
            version: 1,
        })
        .collect();
    let later = plan(0x2545_f491_4f6c_dd1d);
    let reports: usize = later.iter().map(Vec::len).sum();

    let store = RedbStore::open(&dir.join("floors.redb")).expect("open");
    store
        .commit(&Batch {
            report_seqs: first.clone(),
            ..Batch::default()
        })
        .expect("first");
    let ours = measure(reports, || {
        for b in &later {
            store
                .commit(&Batch {
                    report_seqs: b.clone(),
                    ..Batch::default()
                })
                .expect("commit");
        }
    });
    drop(store);

    const TABLE: redb::TableDefinition<'_, &str, (u64, u64)> =
        redb::TableDefinition::new("device_floor");
    let db = redb::Database::create(dir.join("plain.redb")).expect("open");
    let write = |batch: &[ReportSeq]| {
        let txn = db.begin_write().expect("begin");
        {
            let mut t = txn.open_table(TABLE).expect("table");
            for w in batch {
                let stored = t
                    .get(w.device.as_str())
                    .expect("get")
                    .map_or(0, |v| v.value().1);
                assert_eq!(stored + 1, w.version, "versions move one by one");
                t.insert(w.device.as_str(), (w.seq, w.version))
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    };
    write(&first);
    let plain = measure(reports, || {
        for b in &later {
            write(b);
        }
    });
    (ours, plain)
}

fn main() {
    let devices = env_or("STORE_BENCH_DEVICES", 30_000);
    let commits = env_or("STORE_BENCH_COMMITS", 200);
    let runs = env_or("STORE_BENCH_RUNS", 5).max(1);
    // On the disk the allocator's store would use, not a tmpfs.
    let base = std::env::var_os("STORE_BENCH_DIR").unwrap_or_else(|| "/var/tmp".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let (mut full, mut ours, mut plain) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..runs {
        let dir = tempfile::tempdir_in(&base).expect("temp dir");
        let f = full_commits(dir.path(), devices, commits);
        let (o, p) = floor_commits(dir.path(), devices, commits);
        println!(
            "run {run}: whole commits {:.1} us {:.0} B per report; floors only: store {:.2} us {:.0} B, plain per-device table {:.2} us {:.0} B",
            f.cpu_us, f.bytes, o.cpu_us, o.bytes, p.cpu_us, p.bytes
        );
        full.push(f);
        ours.push(o);
        plain.push(p);
    }
    let cpu = |v: &[Cost]| median(v.iter().map(|c| c.cpu_us).collect());
    let bytes = |v: &[Cost]| median(v.iter().map(|c| c.bytes).collect());
    let (records, history) = mix();
    let machine = machine(&load);
    let rows = format!(
        "| store commits as the service core makes them ({FLOORS_PER_COMMIT} report floors, {records} whole records, {history} history entries each, fsync), {devices} devices | {:.1} us of CPU, {:.0} bytes written per report | {} | `cargo bench -p shardline-allocator --bench store_commit` | {commits} commits per run, median of {runs}; the committing thread's CPU and `write` bytes |\n\
         | report floors only, through the store (in memory, one log row per commit) | {:.2} us of CPU, {:.0} bytes written per report | {} | same | {FLOORS_PER_COMMIT} floors per commit, same devices and commits as the next row |\n\
         | peer: the same floors in a plain per-device redb table (look up, replace) | {:.2} us of CPU, {:.0} bytes written per report | {} | same | how the store wrote them before the log |\n",
        cpu(&full),
        bytes(&full),
        machine,
        cpu(&ours),
        bytes(&ours),
        machine,
        cpu(&plain),
        bytes(&plain),
        machine,
    );
    print!("{rows}");
    if std::env::var_os("STORE_BENCH_NO_WRITE").is_none() {
        common::write_marked_table(
            "store-commit",
            "## Allocator store\n\nWritten by `cargo bench -p shardline-allocator --bench store_commit` (allocator/benches/store_commit.rs): the `store` column of the service table, measured alone.",
            &rows,
        );
    }
}
