//! The service core on simulated time when the world is slow: every device
//! that starts to need encryption gets the instruction that moves it to
//! `vpn`, even when acks come back seconds late (past the re-send interval)
//! and reports are handled seconds after they were sent — the conditions of
//! an overloaded allocator. A change seen while an earlier instruction
//! still waits for its ack must not be set aside and forgotten.

use shardline_allocator_core::policy::bench_load::bench_report;
use shardline_allocator_core::service::VerifiedMsg;
use shardline_shared::ids::DeviceId;
use shardline_shared::msg::Operation;
use std::collections::{BTreeSet, VecDeque};

#[path = "../benches/common/service_fleet.rs"]
mod service_fleet;
use service_fleet::{applied_ack, enrolled_core, instruction_in};

const DEVICES: usize = 200;
const ROUNDS: u64 = 13;
/// Rounds before a tenth of the fleet per round starts to need encryption.
const WARMUP: u64 = 3;
const START_MS: u64 = 1_000_000;

/// Devices sent an activation of `vpn`, after reports handled
/// `report_delay_ms` late and acks arriving `ack_delay_ms` after each
/// instruction; the fleet's reports stop after the last round.
fn devices_moved_to_vpn(
    ack_delay_ms: u64,
    report_delay_ms: u64,
) -> (BTreeSet<DeviceId>, Vec<DeviceId>) {
    let (mut core, ids) = enrolled_core("slow", DEVICES, START_MS);
    // Each round every device reports once (spread over the second); a
    // tenth more of the fleet per round needs encryption after the warm-up.
    let mut reports: Vec<(u64, VerifiedMsg)> = Vec::new();
    for round in 0..ROUNDS {
        let sent = START_MS + 1000 * (round + 1);
        let encrypting = DEVICES * round.saturating_sub(WARMUP) as usize / 10;
        for (i, id) in ids.iter().enumerate() {
            let report = bench_report(id, round + 1, sent, i < encrypting);
            let handled = sent + report_delay_ms + (i * 1000 / DEVICES) as u64;
            reports.push((handled, VerifiedMsg::Report(id.clone(), Box::new(report))));
        }
    }
    reports.sort_by_key(|(at, _)| *at);
    let mut reports: VecDeque<_> = reports.into();
    let mut acks: VecDeque<(u64, VerifiedMsg)> = VecDeque::new();
    let mut moved = BTreeSet::new();
    let mut last_tick = START_MS;
    // 40 s past the last round: several re-send intervals and ack delays.
    let end = START_MS + 1000 * (ROUNDS + 40);
    let mut now = START_MS;
    while now < end {
        now += 100;
        if now - last_tick >= 1000 {
            core.on_tick(now);
            last_tick = now;
        }
        while reports.front().is_some_and(|(at, _)| *at <= now) {
            let (_, m) = reports.pop_front().expect("front");
            core.on_verified(now, m);
        }
        while acks.front().is_some_and(|(at, _)| *at <= now) {
            let (_, m) = acks.pop_front().expect("front");
            core.on_verified(now, m);
        }
        core.pace_lazy_writes(now);
        for instruction in core.take_step().publish.iter().filter_map(instruction_in) {
            let activates_vpn = instruction.ops.iter().any(
                |op| matches!(op, Operation::ActivateShard(a) if a.capability.as_str() == "vpn"),
            );
            if activates_vpn {
                moved.insert(instruction.device.clone());
            }
            acks.push_back((now + ack_delay_ms, applied_ack(&instruction, now)));
        }
    }
    let changed = ids[..DEVICES * (ROUNDS - 1 - WARMUP) as usize / 10].to_vec();
    (moved, changed)
}

fn assert_every_change_handled(ack_delay_ms: u64, report_delay_ms: u64) {
    let (moved, changed) = devices_moved_to_vpn(ack_delay_ms, report_delay_ms);
    let missing: Vec<&DeviceId> = changed.iter().filter(|d| !moved.contains(*d)).collect();
    assert!(
        missing.is_empty(),
        "acks {ack_delay_ms} ms late, reports {report_delay_ms} ms late: {} of {} changes without a vpn instruction, first {:?}",
        missing.len(),
        changed.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(
        moved.iter().all(|d| changed.contains(d)),
        "a device that never needed encryption was moved to vpn"
    );
}

#[test]
fn every_change_is_instructed_when_nothing_is_late() {
    assert_every_change_handled(0, 0);
}

#[test]
fn every_change_is_instructed_when_acks_and_reports_are_seconds_late() {
    assert_every_change_handled(3_000, 4_000);
}

#[test]
fn every_change_is_instructed_when_acks_come_after_the_resend_interval() {
    assert_every_change_handled(12_000, 0);
}
