//! The stage BEFORE signature verification: where device reports wait for a
//! verifier thread, so the service's MQTT link never waits for one.
//!
//! Why it exists: a broker acknowledges a report to the device as soon as it
//! has it, and the embedded broker (rumqttd) keeps what its subscribers have
//! not read yet in a fixed in-memory log; a subscriber that falls further
//! behind than the log silently skips ahead, and acknowledged reports are
//! gone. Signature checks are the slowest step of ingest, so under overload
//! the link must keep reading and the backlog must live here, bounded, and
//! degrade by the same rule as the verified inbox (a device's newest report
//! is what matters; older ones are counted, never silently lost).
//!
//! Rules (per device, a "lane" in arrival order):
//! - While fewer than `conflate_above` reports wait (the verifiers keep
//!   up), every message is handed out in arrival order and nothing is
//!   conflated or shed by the rules below but the byte bound: each forgery
//!   or garbled report is checked and counted under its reason. Beyond it
//!   (overload) the stage degrades:
//! - Reports are conflatable, everything else (acks) is not and keeps its
//!   place: a device's messages reach the verifier, and so the core, in the
//!   order they arrived.
//! - Of a run of consecutive waiting reports only the NEWEST is handed out
//!   ([`Taken::candidate`]); the older ones stay parked until its result is
//!   known ([`UnverifiedQueue::finish`]): if its signature verified, the
//!   older ones of the run are dropped (conflated); if not (a forgery, a
//!   garbled report), the next newest is tried. So a bad signature never
//!   displaces a report here.
//! - A lane holds at most `per_device` reports, and all lanes together at
//!   most `report_bytes` of report payload: past either bound the device's
//!   OLDEST waiting report is dropped unverified (shed). A device with none
//!   waiting makes room at the byte bound by shedding the oldest report of
//!   another device that has a newer one waiting (devices in turn), so a
//!   device's newest report is shed only when every waiting report is its
//!   device's newest (the bound holds one report per device then).
//! - Non-report messages are never dropped; the caller must wait while
//!   [`UnverifiedQueue::must_wait`] says so (the MQTT link then backs up for
//!   them alone).
//! - Devices are served round-robin: a busy device cannot starve the others.
//!
//! Sans-IO: no clock, no locking, no threads; the caller counts what the
//! returned numbers say into its metrics.

use shardline_shared::DeviceId;
use std::collections::{HashMap, HashSet, VecDeque};

/// One waiting message.
#[derive(Debug)]
struct Entry<T> {
    item: T,
    bytes: usize,
    report: bool,
    /// Arrival number within the lane (the conflation order).
    n: u64,
}

/// One device's waiting messages.
#[derive(Debug)]
struct Lane<T> {
    items: VecDeque<Entry<T>>,
    reports: usize,
    next_n: u64,
    /// The arrival number of the candidate report being verified; while set
    /// the lane is not handed out again.
    candidate: Option<u64>,
    /// In the ready ring.
    ready: bool,
    /// In the crowded ring (it had two or more reports waiting when put there).
    crowded: bool,
}

impl<T> Lane<T> {
    /// Removes the lane's oldest waiting report; its size, or `None` if
    /// none waits.
    fn remove_oldest_report(&mut self) -> Option<usize> {
        let i = self.items.iter().position(|e| e.report)?;
        let e = self.items.remove(i)?;
        self.reports -= 1;
        Some(e.bytes)
    }
}

impl<T> Default for Lane<T> {
    fn default() -> Self {
        Self {
            items: VecDeque::new(),
            reports: 0,
            next_n: 0,
            candidate: None,
            ready: false,
            crowded: false,
        }
    }
}

/// A message handed to a verifier.
#[derive(Debug)]
pub struct Taken<T> {
    pub device: DeviceId,
    pub item: T,
    /// The newest of several waiting reports: call
    /// [`UnverifiedQueue::finish`] for its device once its result is known.
    /// The only message of its device in that take.
    pub candidate: bool,
}

/// See the module doc.
#[derive(Debug)]
pub struct UnverifiedQueue<T> {
    lanes: HashMap<DeviceId, Lane<T>>,
    ready: VecDeque<DeviceId>,
    /// Devices with two or more reports waiting, whose oldest the byte
    /// bound may shed for another device's only report. Checked when
    /// taken (a lane may have drained since); compacted when it outgrows
    /// the lanes.
    crowded: VecDeque<DeviceId>,
    per_device: usize,
    conflate_above: usize,
    report_bytes_cap: usize,
    other_bytes_cap: usize,
    other_count_cap: usize,
    report_bytes: usize,
    other_bytes: usize,
    others: usize,
    reports: usize,
}

impl<T> UnverifiedQueue<T> {
    /// Beyond `conflate_above` waiting reports: `per_device` reports per
    /// device (at least 1), the newest first. Always: `report_bytes` of
    /// report payload in all; non-report messages: the caller waits past
    /// `other_count` of them or `other_bytes` of their payload.
    pub fn new(
        per_device: usize,
        conflate_above: usize,
        report_bytes: usize,
        other_count: usize,
        other_bytes: usize,
    ) -> Self {
        Self {
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            crowded: VecDeque::new(),
            per_device: per_device.max(1),
            conflate_above,
            report_bytes_cap: report_bytes,
            other_bytes_cap: other_bytes,
            other_count_cap: other_count.max(1),
            report_bytes: 0,
            other_bytes: 0,
            others: 0,
            reports: 0,
        }
    }

    /// Queues `device`'s report of `bytes` bytes. Returns how many reports
    /// were shed for it (its own oldest waiting ones, older ones of other
    /// devices, or this one).
    pub fn push_report(&mut self, device: DeviceId, item: T, bytes: usize) -> u64 {
        let mut shed = 0;
        let overloaded = self.reports >= self.conflate_above;
        let lane = self.lanes.entry(device.clone()).or_default();
        while lane.reports > 0
            && ((overloaded && lane.reports >= self.per_device)
                || self.report_bytes + bytes > self.report_bytes_cap)
        {
            if let Some(b) = lane.remove_oldest_report() {
                self.reports -= 1;
                self.report_bytes -= b;
                shed += 1;
            }
        }
        // Nothing of its own left to drop (its lane holds no report now):
        // another device's report that a newer one of that device
        // supersedes goes before this, its newest.
        while self.report_bytes + bytes > self.report_bytes_cap && self.shed_superseded() {
            shed += 1;
        }
        let lane = self.lanes.entry(device.clone()).or_default();
        if self.report_bytes + bytes > self.report_bytes_cap {
            // Nothing of this device waits and the stage is full.
            if lane.items.is_empty() && lane.candidate.is_none() {
                self.lanes.remove(&device);
            }
            return shed + 1;
        }
        let n = lane.next_n;
        lane.next_n += 1;
        lane.items.push_back(Entry {
            item,
            bytes,
            report: true,
            n,
        });
        lane.reports += 1;
        self.reports += 1;
        self.report_bytes += bytes;
        let newly_crowded = lane.reports >= 2 && !lane.crowded;
        lane.crowded |= newly_crowded;
        Self::make_ready(&mut self.ready, device.clone(), lane);
        if newly_crowded {
            self.crowded.push_back(device);
            if self.crowded.len() > 2 * self.lanes.len() + 64 {
                self.compact_crowded();
            }
        }
        shed
    }

    /// Sheds the oldest waiting report of a device that has a newer
    /// report waiting, devices in turn. False if none has.
    fn shed_superseded(&mut self) -> bool {
        while let Some(device) = self.crowded.pop_front() {
            let Some(lane) = self.lanes.get_mut(&device) else {
                continue;
            };
            if lane.reports < 2 {
                lane.crowded = false;
                continue;
            }
            let Some(b) = lane.remove_oldest_report() else {
                continue;
            };
            self.reports -= 1;
            self.report_bytes -= b;
            if lane.reports >= 2 {
                self.crowded.push_back(device);
            } else {
                lane.crowded = false;
            }
            return true;
        }
        false
    }

    /// Rebuilds the crowded ring from the lanes: each device with two or
    /// more reports waiting once, in the ring's order (stale and repeated
    /// entries are otherwise only dropped when the byte bound takes them).
    fn compact_crowded(&mut self) {
        let mut kept = HashSet::new();
        let lanes = &self.lanes;
        self.crowded.retain(|device| {
            lanes.get(device).is_some_and(|l| l.reports >= 2) && kept.insert(device.clone())
        });
        for (device, lane) in self.lanes.iter_mut() {
            lane.crowded = lane.reports >= 2;
            if lane.crowded && !kept.contains(device) {
                self.crowded.push_back(device.clone());
            }
        }
    }

    /// Whether the caller must wait before pushing a non-report message.
    pub fn must_wait(&self) -> bool {
        self.others >= self.other_count_cap || self.other_bytes >= self.other_bytes_cap
    }

    /// Whether the non-report messages waiting are past half their bound:
    /// a verifier that holds back for the core's sake must take them on
    /// again before [`must_wait`](Self::must_wait) makes the link wait.
    pub fn others_half_full(&self) -> bool {
        2 * self.others >= self.other_count_cap || 2 * self.other_bytes >= self.other_bytes_cap
    }

    /// Queues a message that is never conflated or shed (an ack). The caller
    /// checks [`must_wait`](Self::must_wait) first.
    pub fn push_other(&mut self, device: DeviceId, item: T, bytes: usize) {
        let lane = self.lanes.entry(device.clone()).or_default();
        let n = lane.next_n;
        lane.next_n += 1;
        lane.items.push_back(Entry {
            item,
            bytes,
            report: false,
            n,
        });
        self.others += 1;
        self.other_bytes += bytes;
        Self::make_ready(&mut self.ready, device, lane);
    }

    fn make_ready(ready: &mut VecDeque<DeviceId>, device: DeviceId, lane: &mut Lane<T>) {
        if !lane.ready && lane.candidate.is_none() && !lane.items.is_empty() {
            lane.ready = true;
            ready.push_back(device);
        }
    }

    /// Hands out up to `max` messages, devices in turn, each device's in
    /// order (see the module doc for candidates).
    pub fn take(&mut self, max: usize, out: &mut Vec<Taken<T>>) {
        let mut requeue = Vec::new();
        while out.len() < max {
            let Some(device) = self.ready.pop_front() else {
                break;
            };
            // A device can be in the ring twice when its lane emptied (all
            // shed) and came back: only a lane marked ready is served.
            let Some(lane) = self.lanes.get_mut(&device).filter(|l| l.ready) else {
                continue;
            };
            lane.ready = false;
            let mut took = false;
            loop {
                if out.len() >= max {
                    break;
                }
                let Some(front) = lane.items.front() else {
                    break;
                };
                let run = lane.items.iter().take_while(|e| e.report).count();
                if front.report && run > 1 && self.reports >= self.conflate_above {
                    if took || out.iter().any(|t| t.device == device) {
                        // The candidate must be its device's only message
                        // in the caller's batch (its result is matched by
                        // device).
                        break;
                    }
                    if let Some(e) = lane.items.remove(run - 1) {
                        lane.reports -= 1;
                        self.reports -= 1;
                        self.report_bytes -= e.bytes;
                        lane.candidate = Some(e.n);
                        out.push(Taken {
                            device: device.clone(),
                            item: e.item,
                            candidate: true,
                        });
                    }
                    break;
                }
                if let Some(e) = lane.items.pop_front() {
                    if e.report {
                        lane.reports -= 1;
                        self.reports -= 1;
                        self.report_bytes -= e.bytes;
                    } else {
                        self.others -= 1;
                        self.other_bytes -= e.bytes;
                    }
                    took = true;
                    out.push(Taken {
                        device: device.clone(),
                        item: e.item,
                        candidate: false,
                    });
                }
            }
            if lane.candidate.is_none() {
                if lane.items.is_empty() {
                    self.lanes.remove(&device);
                } else {
                    // More of it waits: after the others' turn.
                    requeue.push(device);
                }
            }
        }
        for device in requeue {
            if let Some(lane) = self.lanes.get_mut(&device) {
                Self::make_ready(&mut self.ready, device, lane);
            }
        }
    }

    /// The result of `device`'s candidate report: `verified` if its
    /// signature checked out. Returns how many older reports it made
    /// worthless (conflated).
    pub fn finish(&mut self, device: &DeviceId, verified: bool) -> u64 {
        let Some(lane) = self.lanes.get_mut(device) else {
            return 0;
        };
        let Some(n) = lane.candidate.take() else {
            return 0;
        };
        let mut conflated = 0;
        if verified {
            while lane.items.front().is_some_and(|e| e.report && e.n < n) {
                if let Some(e) = lane.items.pop_front() {
                    lane.reports -= 1;
                    self.reports -= 1;
                    self.report_bytes -= e.bytes;
                    conflated += 1;
                }
            }
        }
        if lane.items.is_empty() {
            self.lanes.remove(device);
        } else {
            Self::make_ready(&mut self.ready, device.clone(), lane);
        }
        conflated
    }

    /// Whether anything can be handed out now.
    pub fn has_ready(&self) -> bool {
        !self.ready.is_empty()
    }

    /// Messages waiting (reports, others).
    pub fn depth(&self) -> (usize, usize) {
        (self.reports, self.others)
    }

    /// Payload bytes waiting (reports, others).
    pub fn bytes(&self) -> (usize, usize) {
        (self.report_bytes, self.other_bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn take(
        q: &mut UnverifiedQueue<&'static str>,
        max: usize,
    ) -> Vec<(String, &'static str, bool)> {
        let mut out = Vec::new();
        q.take(max, &mut out);
        out.into_iter()
            .map(|t| (t.device.to_string(), t.item, t.candidate))
            .collect()
    }

    #[test]
    fn the_newest_report_goes_first_and_a_verified_one_drops_the_older() {
        let mut q = UnverifiedQueue::new(4, 0, 1 << 20, 100, 1 << 20);
        for r in ["r1", "r2", "r3"] {
            assert_eq!(q.push_report(d("a"), r, 10), 0);
        }
        assert_eq!(take(&mut q, 64), vec![("a".into(), "r3", true)]);
        // Parked while its candidate is out.
        assert!(take(&mut q, 64).is_empty());
        assert_eq!(q.finish(&d("a"), true), 2);
        assert!(take(&mut q, 64).is_empty());
        assert_eq!(q.depth(), (0, 0));
        assert_eq!(q.bytes(), (0, 0));
    }

    #[test]
    fn a_forgery_never_displaces_an_older_report() {
        let mut q = UnverifiedQueue::new(4, 0, 1 << 20, 100, 1 << 20);
        q.push_report(d("a"), "genuine", 10);
        q.push_report(d("a"), "forged", 10);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "forged", true)]);
        assert_eq!(q.finish(&d("a"), false), 0);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "genuine", false)]);
    }

    #[test]
    fn a_report_arriving_while_its_predecessor_is_checked_is_kept() {
        let mut q = UnverifiedQueue::new(4, 0, 1 << 20, 100, 1 << 20);
        q.push_report(d("a"), "r1", 10);
        q.push_report(d("a"), "r2", 10);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "r2", true)]);
        q.push_report(d("a"), "r3", 10);
        assert_eq!(q.finish(&d("a"), true), 1);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "r3", false)]);
    }

    #[test]
    fn acks_keep_their_place_and_are_never_dropped() {
        let mut q = UnverifiedQueue::new(2, 0, 1 << 20, 100, 1 << 20);
        q.push_report(d("a"), "r1", 10);
        q.push_other(d("a"), "ack1", 10);
        q.push_report(d("a"), "r2", 10);
        q.push_report(d("a"), "r3", 10);
        // Two reports per device: r1 (the oldest) was shed for r3.
        assert_eq!(q.depth(), (2, 1));
        assert_eq!(take(&mut q, 64), vec![("a".into(), "ack1", false)]);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "r3", true)]);
        assert_eq!(q.finish(&d("a"), true), 1);
        assert_eq!(q.depth(), (0, 0));
    }

    #[test]
    fn the_per_device_bound_sheds_the_oldest() {
        let mut q = UnverifiedQueue::new(2, 0, 1 << 20, 100, 1 << 20);
        assert_eq!(q.push_report(d("a"), "r1", 10), 0);
        assert_eq!(q.push_report(d("a"), "r2", 10), 0);
        assert_eq!(q.push_report(d("a"), "r3", 10), 1);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "r3", true)]);
        assert_eq!(q.finish(&d("a"), false), 0);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "r2", false)]);
    }

    #[test]
    fn the_byte_bound_holds_and_keeps_each_devices_newest() {
        let mut q = UnverifiedQueue::new(4, 0, 30, 100, 1 << 20);
        assert_eq!(q.push_report(d("a"), "a1", 10), 0);
        assert_eq!(q.push_report(d("b"), "b1", 10), 0);
        assert_eq!(q.push_report(d("c"), "c1", 10), 0);
        // Full: a new device's report is shed, a waiting device's newer one
        // takes its older one's place.
        assert_eq!(q.push_report(d("e"), "e1", 10), 1);
        assert_eq!(q.push_report(d("a"), "a2", 10), 1);
        assert_eq!(q.bytes().0, 30);
        let got = take(&mut q, 64);
        assert_eq!(got.len(), 3);
        assert!(got.contains(&("a".into(), "a2", false)), "{got:?}");
    }

    #[test]
    fn at_the_byte_bound_a_superseded_report_goes_before_another_devices_newest() {
        let mut q = UnverifiedQueue::new(4, 0, 40, 100, 1 << 20);
        q.push_report(d("a"), "a1", 10);
        q.push_report(d("a"), "a2", 10);
        q.push_report(d("a"), "a3", 10);
        q.push_report(d("b"), "b1", 10);
        // Full. e and f have nothing waiting: a's oldest make room, in
        // age order, down to a's newest.
        assert_eq!(q.push_report(d("e"), "e1", 10), 1);
        assert_eq!(q.push_report(d("f"), "f1", 10), 1);
        assert_eq!(q.bytes().0, 40);
        // Now every waiting report is its device's newest: g's is shed.
        assert_eq!(q.push_report(d("g"), "g1", 10), 1);
        let mut got = take(&mut q, 64);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("a".into(), "a3", false),
                ("b".into(), "b1", false),
                ("e".into(), "e1", false),
                ("f".into(), "f1", false),
            ]
        );
        assert_eq!(q.depth(), (0, 0));
        assert_eq!(q.bytes(), (0, 0));
    }

    #[test]
    fn the_crowded_ring_stays_within_the_lanes_it_names() {
        let mut q = UnverifiedQueue::new(4, 0, 1 << 30, 100, 1 << 20);
        for round in 0..1000 {
            let dev = d(&format!("dev-{}", round % 7));
            q.push_report(dev.clone(), "older", 10);
            q.push_report(dev, "newer", 10);
            // Drained before the next device crowds: every entry goes stale.
            let mut out = Vec::new();
            q.take(64, &mut out);
            for t in out.iter().filter(|t| t.candidate) {
                q.finish(&t.device, true);
            }
            assert_eq!(q.depth(), (0, 0));
        }
        assert!(q.crowded.len() <= 64 + 2, "{}", q.crowded.len());
    }

    /// One step of [`the_stage_keeps_its_bounds_and_every_devices_newest`].
    #[derive(Debug, Clone)]
    enum Op {
        Report { device: u8, bytes: usize },
        Ack { device: u8 },
        Take { max: usize },
        Finish { verified: bool },
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u8..6, 1usize..=10).prop_map(|(device, bytes)| Op::Report { device, bytes }),
            1 => (0u8..6).prop_map(|device| Op::Ack { device }),
            1 => (1usize..8).prop_map(|max| Op::Take { max }),
            1 => any::<bool>().prop_map(|verified| Op::Finish { verified }),
        ]
    }

    proptest::proptest! {
        /// Whatever arrives and however the verifiers keep up: the counters
        /// match what waits, the byte bound holds, and a device's newest
        /// report is shed only when every waiting report is its device's
        /// newest.
        #[test]
        fn the_stage_keeps_its_bounds_and_every_devices_newest(
            ops in proptest::collection::vec(op(), 1..200),
            conflate_above in 0usize..6,
        ) {
            const CAP: usize = 40;
            let mut q: UnverifiedQueue<u32> = UnverifiedQueue::new(3, conflate_above, CAP, 1000, 1 << 20);
            let mut out_candidates: Vec<DeviceId> = Vec::new();
            for (n, op) in ops.into_iter().enumerate() {
                let n = n as u32;
                match op {
                    Op::Report { device, bytes } => {
                        let device = d(&format!("dev-{device}"));
                        q.push_report(device.clone(), n, bytes);
                        let kept = q
                            .lanes
                            .get(&device)
                            .is_some_and(|l| l.items.iter().any(|e| e.item == n));
                        if !kept {
                            let crowded: Vec<&DeviceId> = q
                                .lanes
                                .iter()
                                .filter(|(id, l)| **id != device && l.reports >= 2)
                                .map(|(id, _)| id)
                                .collect();
                            proptest::prop_assert!(
                                crowded.is_empty(),
                                "newest report of {device} shed while {crowded:?} had older ones waiting"
                            );
                        }
                    }
                    Op::Ack { device } => q.push_other(d(&format!("dev-{device}")), n, 1),
                    Op::Take { max } => {
                        let mut out = Vec::new();
                        q.take(max, &mut out);
                        out_candidates.extend(out.into_iter().filter(|t| t.candidate).map(|t| t.device));
                    }
                    Op::Finish { verified } => {
                        for device in out_candidates.drain(..) {
                            q.finish(&device, verified);
                        }
                    }
                }
                let (mut reports, mut bytes, mut others) = (0, 0, 0);
                for lane in q.lanes.values() {
                    let in_lane = lane.items.iter().filter(|e| e.report).count();
                    proptest::prop_assert_eq!(lane.reports, in_lane);
                    reports += in_lane;
                    bytes += lane.items.iter().filter(|e| e.report).map(|e| e.bytes).sum::<usize>();
                    others += lane.items.iter().filter(|e| !e.report).count();
                }
                proptest::prop_assert_eq!((q.reports, q.report_bytes, q.others), (reports, bytes, others));
                proptest::prop_assert!(q.report_bytes <= CAP);
            }
        }
    }

    #[test]
    fn devices_take_turns_and_others_backpressure() {
        let mut q = UnverifiedQueue::new(4, 0, 1 << 20, 2, 1 << 20);
        q.push_other(d("a"), "a1", 1);
        assert!(!q.must_wait());
        q.push_other(d("a"), "a2", 1);
        assert!(q.must_wait());
        q.push_report(d("b"), "b1", 1);
        assert_eq!(take(&mut q, 1), vec![("a".into(), "a1", false)]);
        assert!(!q.must_wait());
        // b's turn before a's second.
        assert_eq!(take(&mut q, 1), vec![("b".into(), "b1", false)]);
        assert_eq!(take(&mut q, 1), vec![("a".into(), "a2", false)]);
        assert!(!q.has_ready());
    }

    #[test]
    fn below_the_threshold_everything_goes_out_in_order() {
        let mut q = UnverifiedQueue::new(2, 3, 1 << 20, 100, 1 << 20);
        for r in ["r1", "r2", "r3"] {
            assert_eq!(q.push_report(d("a"), r, 10), 0);
        }
        // Three waiting: at the threshold the bound applies again.
        assert_eq!(q.push_report(d("a"), "r4", 10), 2);
        let mut q = UnverifiedQueue::new(2, 3, 1 << 20, 100, 1 << 20);
        q.push_report(d("a"), "r1", 10);
        q.push_report(d("a"), "r2", 10);
        assert_eq!(
            take(&mut q, 64),
            vec![("a".into(), "r1", false), ("a".into(), "r2", false)]
        );
    }

    #[test]
    fn a_candidate_is_its_devices_only_message_in_a_take() {
        let mut q = UnverifiedQueue::new(4, 0, 1 << 20, 100, 1 << 20);
        q.push_other(d("a"), "ack", 1);
        q.push_report(d("a"), "r1", 1);
        q.push_report(d("a"), "r2", 1);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "ack", false)]);
        assert_eq!(take(&mut q, 64), vec![("a".into(), "r2", true)]);
    }

    #[test]
    fn acks_are_half_full_at_half_their_count_or_bytes_before_the_link_must_wait() {
        let mut q: UnverifiedQueue<&'static str> = UnverifiedQueue::new(4, 100, 1 << 20, 4, 100);
        q.push_other(d("a"), "ack1", 10);
        assert!(!q.others_half_full());
        q.push_other(d("b"), "ack2", 10);
        assert!(q.others_half_full(), "2 of 4 acks");
        assert!(!q.must_wait());
        let mut by_bytes: UnverifiedQueue<&'static str> =
            UnverifiedQueue::new(4, 100, 1 << 20, 4, 100);
        by_bytes.push_other(d("a"), "big", 50);
        assert!(by_bytes.others_half_full(), "50 of 100 bytes");
        assert!(!by_bytes.must_wait());
    }
}
