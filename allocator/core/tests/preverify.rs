//! The unverified stage in front of the verifier threads (issue 19, the
//! embedded broker's overload loss): every report pushed is handed out,
//! shed or conflated (counted) or still waits, never lost; acks are never
//! dropped and keep their order; the bounds hold; a device's newest report
//! always reaches a verifier.

use proptest::prelude::*;
use shardline_allocator_core::service::preverify::{Taken, UnverifiedQueue};
use shardline_shared::DeviceId;
use std::collections::HashMap;

fn dev(i: usize) -> DeviceId {
    DeviceId::new(format!("dev-{i:03}")).unwrap()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Msg {
    Report(usize, u64),
    Ack(usize, u64),
}

const PER_DEVICE: usize = 3;

/// What the test saw come out of the queue.
#[derive(Default)]
struct Seen {
    taken_reports: u64,
    acks_taken: HashMap<usize, Vec<u64>>,
    last_taken: HashMap<usize, u64>,
    /// Candidates out for verification (device, verifies?).
    out: Vec<(DeviceId, bool)>,
}

impl Seen {
    fn take(
        &mut self,
        q: &mut UnverifiedQueue<Msg>,
        max: usize,
        verify: bool,
    ) -> Result<(), TestCaseError> {
        let mut got: Vec<Taken<Msg>> = Vec::new();
        q.take(max, &mut got);
        prop_assert!(got.len() <= max);
        for t in &got {
            if t.candidate {
                prop_assert_eq!(
                    got.iter().filter(|o| o.device == t.device).count(),
                    1,
                    "a candidate is its device's only message in a take"
                );
                prop_assert!(
                    !self.out.iter().any(|(d, _)| d == &t.device),
                    "one candidate per device at a time"
                );
                self.out.push((t.device.clone(), verify));
            }
            match t.item {
                Msg::Report(d, s) => {
                    self.taken_reports += 1;
                    let l = self.last_taken.entry(d).or_default();
                    *l = (*l).max(s);
                }
                Msg::Ack(d, s) => self.acks_taken.entry(d).or_default().push(s),
            }
        }
        Ok(())
    }
}

proptest! {
    #[test]
    fn nothing_is_lost_acks_keep_order_and_the_newest_report_gets_through(
        ops in proptest::collection::vec((0u8..6, 0usize..5, 1usize..40, any::<bool>()), 0..400),
        small in any::<bool>(),
        cap in 20usize..200,
        conflate_above in 0usize..12,
    ) {
        // `small`: a byte bound that is hit; else one that never is.
        let byte_cap = if small { cap } else { 1 << 30 };
        let mut q = UnverifiedQueue::new(PER_DEVICE, conflate_above, byte_cap, 8, 1 << 30);
        let (mut seq, mut pushed, mut shed, mut conflated) = (0u64, 0u64, 0u64, 0u64);
        let mut acks_pushed: HashMap<usize, Vec<u64>> = HashMap::new();
        let mut last_pushed: HashMap<usize, u64> = HashMap::new();
        let mut seen = Seen::default();
        for (op, d, bytes, verify) in ops {
            seq += 1;
            match op {
                0..=2 => {
                    pushed += 1;
                    shed += q.push_report(dev(d), Msg::Report(d, seq), bytes);
                    last_pushed.insert(d, seq);
                }
                3 => {
                    if !q.must_wait() {
                        q.push_other(dev(d), Msg::Ack(d, seq), bytes);
                        acks_pushed.entry(d).or_default().push(seq);
                    }
                }
                4 => seen.take(&mut q, 1 + bytes % 8, verify)?,
                _ => {
                    if !seen.out.is_empty() {
                        let (device, ok) = seen.out.remove(bytes % seen.out.len());
                        conflated += q.finish(&device, ok);
                    }
                }
            }
            let (reports, _) = q.depth();
            prop_assert!(q.bytes().0 <= byte_cap, "the byte bound holds");
            prop_assert_eq!(
                pushed,
                seen.taken_reports + shed + conflated + reports as u64,
                "every report accounted for"
            );
        }
        // Drain: every candidate verifies from now on.
        for _ in 0..10_000 {
            for (device, _) in std::mem::take(&mut seen.out) {
                conflated += q.finish(&device, true);
            }
            if !q.has_ready() {
                break;
            }
            seen.take(&mut q, 8, true)?;
        }
        prop_assert!(seen.out.is_empty() && !q.has_ready());
        prop_assert_eq!(q.depth(), (0, 0));
        prop_assert_eq!(q.bytes(), (0, 0));
        prop_assert_eq!(pushed, seen.taken_reports + shed + conflated);
        prop_assert_eq!(&acks_pushed, &seen.acks_taken, "acks: all of them, in order");
        if !small {
            prop_assert_eq!(&last_pushed, &seen.last_taken, "each device's newest report reached a verifier");
        }
    }
}

#[test]
fn a_device_flooding_holds_its_bound() {
    let mut q = UnverifiedQueue::new(4, 0, 1 << 30, 8, 1 << 30);
    let mut shed = 0;
    for s in 0..100_000 {
        shed += q.push_report(dev(1), Msg::Report(1, s), 400);
    }
    assert_eq!(q.depth(), (4, 0));
    assert_eq!(q.bytes(), (1_600, 0));
    assert_eq!(shed, 100_000 - 4);
    let mut got = Vec::new();
    q.take(64, &mut got);
    assert_eq!(got.len(), 1);
    assert!(got[0].candidate);
    assert_eq!(got[0].item, Msg::Report(1, 99_999));
    assert_eq!(q.finish(&dev(1), true), 3);
    assert_eq!(q.depth(), (0, 0));
}
