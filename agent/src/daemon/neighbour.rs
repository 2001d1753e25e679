//! Good-neighbour observations (seed 002, issue 17): which of the device's
//! own traffic classes are worse in this window than their baseline, for
//! the `lending.harm` field of its signed report.
//!
//! The agent cannot know whether, or to whom, its units are lent (that is
//! the allocator's bookkeeping), so it does not accuse anyone: it reports
//! only what it measures about itself. The allocator ignores the
//! observation unless the device was lending during the whole window, and
//! then attributes it to the borrowers of its units.
//!
//! The rule, per class, from the class statistics the report carries:
//! - a window counts only with at least [`MIN_PACKETS`] packets (a few
//!   packets make a loss rate of noise);
//! - the baseline is an exponential average (weight [`ALPHA`]) of loss and
//!   RTT p95 over the class's *unharmed* windows, and reports start after
//!   [`WARMUP`] of them — so while harm lasts the baseline stays what it was
//!   before (before the loan, when a loan is the cause);
//! - harmed: loss ≥ baseline + [`LOSS_MARGIN`] ‰ and ≥ twice the baseline,
//!   or RTT p95 ≥ 1.5 × baseline + [`RTT_MARGIN_US`];
//! - after [`RELEARN`] harmed windows in a row the worse level is the new
//!   normal (a new ISP line is nobody's borrowing): the baseline starts over.
//!
//! Sans-IO and bounded: one entry per traffic class, no clock.

use shardline_shared::msg::{ClassStats, HarmObservation, TrafficClass, MAX_HARM_OBSERVATIONS};
use std::collections::BTreeMap;

pub const MIN_PACKETS: u64 = 100;
pub const ALPHA: f64 = 0.1;
pub const WARMUP: u32 = 6;
pub const LOSS_MARGIN: f64 = 20.0;
pub const RTT_MARGIN_US: f64 = 10_000.0;
pub const RELEARN: u32 = 360;

#[derive(Debug, Clone, Default, PartialEq)]
struct Baseline {
    loss: f64,
    rtt: Option<f64>,
    windows: u32,
    harmed_in_a_row: u32,
}

/// Per-class baselines of the device's own QoS.
#[derive(Debug, Clone, Default)]
pub struct HarmWatch {
    classes: BTreeMap<TrafficClass, Baseline>,
}

impl HarmWatch {
    /// Looks at one window's class statistics; returns the classes worse
    /// than their baseline (at most [`MAX_HARM_OBSERVATIONS`]).
    pub fn observe(&mut self, classes: &[ClassStats]) -> Vec<HarmObservation> {
        let mut out = Vec::new();
        for c in classes {
            if c.packets < MIN_PACKETS {
                continue;
            }
            let b = self.classes.entry(c.class).or_default();
            let loss = f64::from(c.loss_permille.min(1000));
            let rtt = c.rtt_p95_us.map(f64::from);
            let harmed = b.windows >= WARMUP
                && {
                    let by_loss = loss >= b.loss + LOSS_MARGIN && loss >= 2.0 * b.loss;
                    let by_rtt = matches!((b.rtt, rtt), (Some(base), Some(r)) if r >= 1.5 * base + RTT_MARGIN_US);
                    by_loss || by_rtt
                };
            if harmed {
                b.harmed_in_a_row += 1;
                if out.len() < MAX_HARM_OBSERVATIONS {
                    out.push(HarmObservation {
                        class: c.class,
                        baseline_loss_permille: b.loss.round() as u16,
                        loss_permille: c.loss_permille,
                        baseline_rtt_p95_us: b.rtt.map(|r| r.round() as u32),
                        rtt_p95_us: c.rtt_p95_us,
                    });
                }
                if b.harmed_in_a_row >= RELEARN {
                    *b = Baseline::default();
                }
                continue;
            }
            b.harmed_in_a_row = 0;
            if b.windows == 0 {
                b.loss = loss;
                b.rtt = rtt;
            } else {
                b.loss += ALPHA * (loss - b.loss);
                b.rtt = match (b.rtt, rtt) {
                    (Some(base), Some(r)) => Some(base + ALPHA * (r - base)),
                    (base, r) => base.or(r),
                };
            }
            b.windows = b.windows.saturating_add(1);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::msg::QosNeed;

    fn stats(packets: u64, loss: u16, rtt: Option<u32>) -> ClassStats {
        ClassStats {
            class: TrafficClass::Calls,
            bytes: packets * 800,
            packets,
            rate_bps: 100_000,
            rtt_p50_us: rtt,
            rtt_p95_us: rtt,
            jitter_us: None,
            loss_permille: loss,
            active_flows: 1,
            need: QosNeed::default(),
        }
    }

    /// A watch whose calls baseline is 5 ‰ loss and 20 ms RTT.
    fn warmed() -> HarmWatch {
        let mut w = HarmWatch::default();
        for _ in 0..WARMUP {
            assert!(w.observe(&[stats(1000, 5, Some(20_000))]).is_empty());
        }
        w
    }

    /// One row per case of the rule: (case, window, harmed).
    #[test]
    fn harm_rule_table() {
        let rows = [
            ("same as the baseline", stats(1000, 5, Some(20_000)), false),
            (
                "loss up but under the margin",
                stats(1000, 20, Some(20_000)),
                false,
            ),
            (
                "loss up past the margin",
                stats(1000, 30, Some(20_000)),
                true,
            ),
            ("RTT 1.5x + 10 ms", stats(1000, 5, Some(40_000)), true),
            ("RTT up but under", stats(1000, 5, Some(39_000)), false),
            (
                "too few packets to judge",
                stats(50, 500, Some(90_000)),
                false,
            ),
            ("no RTT measured, loss fine", stats(1000, 5, None), false),
        ];
        for (case, window, harmed) in rows {
            let mut w = warmed();
            let got = w.observe(std::slice::from_ref(&window));
            assert_eq!(!got.is_empty(), harmed, "{case}: {got:?}");
            if harmed {
                assert_eq!(got[0].baseline_loss_permille, 5, "{case}");
                assert_eq!(got[0].baseline_rtt_p95_us, Some(20_000), "{case}");
                assert_eq!(got[0].loss_permille, window.loss_permille, "{case}");
            }
        }
    }

    #[test]
    fn nothing_is_reported_before_the_baseline_is_learnt() {
        let mut w = HarmWatch::default();
        for _ in 0..WARMUP {
            assert!(w.observe(&[stats(1000, 500, Some(90_000))]).is_empty());
        }
    }

    #[test]
    fn harm_keeps_the_baseline_until_it_is_the_new_normal() {
        let mut w = warmed();
        for i in 0..RELEARN {
            let got = w.observe(&[stats(1000, 100, Some(20_000))]);
            assert_eq!(got.len(), 1, "window {i}");
            assert_eq!(
                got[0].baseline_loss_permille, 5,
                "the baseline does not drift"
            );
        }
        // Relearnt: the worse level is the baseline now.
        for _ in 0..WARMUP {
            assert!(w.observe(&[stats(1000, 100, Some(20_000))]).is_empty());
        }
        assert!(w.observe(&[stats(1000, 100, Some(20_000))]).is_empty());
    }

    #[test]
    fn one_observation_per_class_at_most() {
        let mut w = HarmWatch::default();
        let all: Vec<ClassStats> = TrafficClass::ALL
            .iter()
            .map(|&class| ClassStats {
                class,
                ..stats(1000, 0, Some(10_000))
            })
            .collect();
        for _ in 0..WARMUP {
            w.observe(&all);
        }
        let bad: Vec<ClassStats> = all
            .iter()
            .map(|c| ClassStats {
                loss_permille: 900,
                ..c.clone()
            })
            .collect();
        assert_eq!(w.observe(&bad).len(), MAX_HARM_OBSERVATIONS);
    }
}
