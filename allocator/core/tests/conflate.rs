//! The conflating queue in front of verification (issue 19, overload): a
//! device's newest report is kept and its older waiting ones are dropped and
//! counted; acks are never conflated or shed; order per device is kept.

use proptest::prelude::*;
use shardline_allocator_core::service::conflate::{ConflatingQueue, Pushed};
use shardline_shared::DeviceId;

fn dev(i: usize) -> DeviceId {
    DeviceId::new(format!("dev-{i:03}")).unwrap()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Msg {
    Report(usize, u64),
    Ack(usize, u64),
}

fn drain(q: &mut ConflatingQueue<Msg>) -> Vec<Msg> {
    std::iter::from_fn(|| q.pop()).collect()
}

#[test]
fn newest_report_kept_older_conflated_and_counted() {
    let mut q = ConflatingQueue::new(100);
    assert_eq!(q.push_report(0, dev(1), Msg::Report(1, 1)), Pushed::Queued);
    assert_eq!(q.push_report(1, dev(2), Msg::Report(2, 1)), Pushed::Queued);
    assert_eq!(
        q.push_report(2, dev(1), Msg::Report(1, 2)),
        Pushed::Conflated
    );
    assert_eq!(
        q.push_report(3, dev(1), Msg::Report(1, 3)),
        Pushed::Conflated
    );
    assert_eq!(q.len(), 2);
    assert_eq!(
        drain(&mut q),
        vec![Msg::Report(2, 1), Msg::Report(1, 3)],
        "one report per device, the newest, in arrival order of the newest"
    );
    assert!(q.is_empty());
    // Once handled, the device's next report is queued afresh.
    assert_eq!(q.push_report(4, dev(1), Msg::Report(1, 4)), Pushed::Queued);
}

#[test]
fn acks_are_never_conflated_and_keep_their_place() {
    let mut q = ConflatingQueue::new(100);
    q.push_report(0, dev(1), Msg::Report(1, 1));
    q.push(1, Msg::Ack(1, 7));
    q.push(2, Msg::Ack(1, 7));
    assert_eq!(
        q.push_report(3, dev(1), Msg::Report(1, 2)),
        Pushed::Conflated
    );
    assert_eq!(q.kept(), 2);
    assert_eq!(
        drain(&mut q),
        vec![Msg::Ack(1, 7), Msg::Ack(1, 7), Msg::Report(1, 2)],
        "the ack that arrived before the newer report is handled before it"
    );
    assert_eq!(q.kept(), 0);
}

#[test]
fn reports_beyond_the_cap_are_shed_acks_never() {
    let mut q = ConflatingQueue::new(2);
    assert_eq!(q.push_report(0, dev(1), Msg::Report(1, 1)), Pushed::Queued);
    assert_eq!(q.push_report(0, dev(2), Msg::Report(2, 1)), Pushed::Queued);
    assert_eq!(q.push_report(0, dev(3), Msg::Report(3, 1)), Pushed::Shed);
    // A device already queued still replaces its report at the cap.
    assert_eq!(
        q.push_report(0, dev(2), Msg::Report(2, 2)),
        Pushed::Conflated
    );
    for s in 0..10 {
        q.push(0, Msg::Ack(3, s));
    }
    assert_eq!(q.len(), 12);
    assert_eq!(q.pop(), Some(Msg::Report(1, 1)));
    assert_eq!(q.push_report(0, dev(3), Msg::Report(3, 2)), Pushed::Queued);
}

#[test]
fn a_device_reporting_in_a_loop_does_not_grow_the_queue() {
    let mut q = ConflatingQueue::new(10);
    q.push(0, Msg::Ack(9, 1));
    for s in 0..100_000 {
        q.push_report(s, dev(1), Msg::Report(1, s));
    }
    assert_eq!(q.len(), 2);
    assert_eq!(drain(&mut q), vec![Msg::Ack(9, 1), Msg::Report(1, 99_999)]);
}

#[test]
fn oldest_age_is_the_oldest_live_message() {
    let mut q = ConflatingQueue::new(10);
    assert_eq!(q.oldest_age_ms(1_000), 0);
    q.push_report(100, dev(1), Msg::Report(1, 1));
    q.push_report(200, dev(2), Msg::Report(2, 1));
    assert_eq!(q.oldest_age_ms(1_000), 900);
    // Conflated: the device's newer report waits since it arrived.
    q.push_report(300, dev(1), Msg::Report(1, 2));
    assert_eq!(q.oldest_age_ms(1_000), 800);
}

proptest! {
    /// Against a model (a plain list where a device's newer report removes
    /// its older one): same messages out, same order, and every conflation
    /// counted.
    #[test]
    fn matches_the_model(ops in proptest::collection::vec((0u8..4, 0usize..6), 0..400)) {
        let mut q = ConflatingQueue::new(1_000);
        let mut model: std::collections::VecDeque<Msg> = Default::default();
        let (mut seq, mut conflated, mut model_conflated) = (0u64, 0u64, 0u64);
        for (op, d) in ops {
            seq += 1;
            match op {
                0 | 1 => {
                    if q.push_report(seq, dev(d), Msg::Report(d, seq)) == Pushed::Conflated {
                        conflated += 1;
                    }
                    let before = model.len();
                    model.retain(|m| !matches!(m, Msg::Report(x, _) if *x == d));
                    model_conflated += (before - model.len()) as u64;
                    model.push_back(Msg::Report(d, seq));
                }
                2 => {
                    q.push(seq, Msg::Ack(d, seq));
                    model.push_back(Msg::Ack(d, seq));
                }
                _ => prop_assert_eq!(q.pop(), model.pop_front()),
            }
            prop_assert_eq!(q.len(), model.len());
        }
        prop_assert_eq!(conflated, model_conflated);
        prop_assert_eq!(drain(&mut q), Vec::from(model));
    }
}
