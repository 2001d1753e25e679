//! Restart, backoff, quarantine and failover decisions for one capability:
//! a sans-IO state machine. It takes `now` (ms on any monotonic clock) and
//! events, and returns actions; the [`super::supervisor::Supervisor`] does
//! the I/O. Tests drive it on simulated time.
//!
//! A capability has *slots* (one per required shard), each with a list of
//! *choices* (the shard and its alternatives). Rules:
//! - A failure increases the capability's consecutive-failure count and, when
//!   the failure is attributed to a slot, that choice's count.
//! - A load refusal is deterministic: the choice is quarantined at once.
//! - A choice with `max_failures` attributed failures is quarantined; the
//!   slot fails over to its next non-quarantined alternative, started at once.
//! - With no alternative left, or `max_failures` consecutive unattributed
//!   failures, the whole capability is quarantined (given up) until it is
//!   activated again.
//! - Otherwise the host restarts after `base · 2^(n−1)` ms, capped at `max`.
//! - After `stable_after_ms` of running, the failure counts reset.
#![forbid(unsafe_code)]

use shardline_shared::msg::ShardFailure;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicyConfig {
    pub max_failures: u32,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    pub stable_after_ms: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            max_failures: 3,
            backoff_base_ms: 250,
            backoff_max_ms: 30_000,
            stable_after_ms: 30_000,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// A host was spawned and has not reported `Running` yet.
    Starting,
    Running {
        since_ms: u64,
    },
    Backoff {
        until_ms: u64,
    },
    /// Given up: nothing left to run.
    Quarantined,
    Stopped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a host with choice `selection[slot]` for every slot.
    Spawn {
        selection: Vec<usize>,
        restart: bool,
    },
    Quarantine {
        slot: usize,
        choice: usize,
    },
    FailOver {
        slot: usize,
        from: usize,
        to: usize,
    },
    /// The capability as a whole is quarantined.
    GiveUp,
}

#[derive(Debug, Clone)]
struct Slot {
    current: usize,
    failures: Vec<u32>,
    quarantined: Vec<bool>,
}

#[derive(Debug, Clone)]
pub struct CapabilityPolicy {
    cfg: PolicyConfig,
    slots: Vec<Slot>,
    phase: Phase,
    consecutive: u32,
    restarts: u32,
}

impl CapabilityPolicy {
    /// `choices[slot]` = number of choices (1 + alternatives) of each slot.
    pub fn new(cfg: PolicyConfig, choices: &[usize]) -> Self {
        Self {
            cfg,
            slots: choices
                .iter()
                .map(|&n| Slot {
                    current: 0,
                    failures: vec![0; n.max(1)],
                    quarantined: vec![false; n.max(1)],
                })
                .collect(),
            phase: Phase::Stopped,
            consecutive: 0,
            restarts: 0,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    pub fn selection(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.current).collect()
    }

    pub fn is_quarantined(&self, slot: usize, choice: usize) -> bool {
        self.slots
            .get(slot)
            .and_then(|s| s.quarantined.get(choice).copied())
            .unwrap_or(false)
    }

    pub fn failures(&self, slot: usize, choice: usize) -> u32 {
        self.slots
            .get(slot)
            .and_then(|s| s.failures.get(choice).copied())
            .unwrap_or(0)
    }

    /// Starts the capability now.
    pub fn start(&mut self, _now_ms: u64) -> Vec<Action> {
        self.phase = Phase::Starting;
        vec![Action::Spawn {
            selection: self.selection(),
            restart: false,
        }]
    }

    /// The host reported that every shard is initialised.
    pub fn on_running(&mut self, now_ms: u64) {
        if self.phase == Phase::Starting {
            self.phase = Phase::Running { since_ms: now_ms };
        }
    }

    /// The capability was deactivated.
    pub fn stop(&mut self) {
        self.phase = Phase::Stopped;
    }

    /// The host failed; `slot` is the shard it is attributed to, if known.
    pub fn on_failure(
        &mut self,
        now_ms: u64,
        slot: Option<usize>,
        failure: &ShardFailure,
    ) -> Vec<Action> {
        if !matches!(self.phase, Phase::Starting | Phase::Running { .. }) {
            return Vec::new();
        }
        self.consecutive += 1;
        let deterministic = matches!(failure, ShardFailure::LoadRefused { .. });
        let max = self.cfg.max_failures.max(1);
        let mut actions = Vec::new();
        if let Some(s) = slot.filter(|&s| s < self.slots.len()) {
            let slot_state = &mut self.slots[s];
            let cur = slot_state.current;
            slot_state.failures[cur] += 1;
            if deterministic || slot_state.failures[cur] >= max {
                slot_state.quarantined[cur] = true;
                actions.push(Action::Quarantine {
                    slot: s,
                    choice: cur,
                });
                let n = slot_state.quarantined.len();
                let next = (1..n)
                    .map(|k| (cur + k) % n)
                    .find(|&c| !slot_state.quarantined[c]);
                match next {
                    Some(to) => {
                        slot_state.current = to;
                        actions.push(Action::FailOver {
                            slot: s,
                            from: cur,
                            to,
                        });
                        self.consecutive = 0;
                        self.restarts += 1;
                        self.phase = Phase::Starting;
                        actions.push(Action::Spawn {
                            selection: self.selection(),
                            restart: true,
                        });
                    }
                    None => {
                        self.phase = Phase::Quarantined;
                        actions.push(Action::GiveUp);
                    }
                }
                return actions;
            }
        } else if deterministic || self.consecutive >= max {
            for (s, slot_state) in self.slots.iter_mut().enumerate() {
                slot_state.quarantined[slot_state.current] = true;
                actions.push(Action::Quarantine {
                    slot: s,
                    choice: slot_state.current,
                });
            }
            self.phase = Phase::Quarantined;
            actions.push(Action::GiveUp);
            return actions;
        }
        let shift = (self.consecutive - 1).min(20);
        let delay = self
            .cfg
            .backoff_base_ms
            .saturating_mul(1 << shift)
            .min(self.cfg.backoff_max_ms);
        self.phase = Phase::Backoff {
            until_ms: now_ms.saturating_add(delay),
        };
        actions
    }

    /// Time passes: ends a backoff (restart) and resets counts after a stable run.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        match self.phase {
            Phase::Backoff { until_ms } if now_ms >= until_ms => {
                self.phase = Phase::Starting;
                self.restarts += 1;
                vec![Action::Spawn {
                    selection: self.selection(),
                    restart: true,
                }]
            }
            Phase::Running { since_ms }
                if now_ms.saturating_sub(since_ms) >= self.cfg.stable_after_ms =>
            {
                self.consecutive = 0;
                for s in &mut self.slots {
                    s.failures.iter_mut().for_each(|f| *f = 0);
                }
                Vec::new()
            }
            _ => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PolicyConfig {
        PolicyConfig {
            max_failures: 3,
            backoff_base_ms: 100,
            backoff_max_ms: 1_000,
            stable_after_ms: 10_000,
        }
    }

    const CRASH: ShardFailure = ShardFailure::Crashed { signal: 11 };

    #[test]
    fn restarts_with_exponential_backoff_then_quarantines_without_alternative() {
        let mut p = CapabilityPolicy::new(cfg(), &[1]);
        assert_eq!(
            p.start(0),
            vec![Action::Spawn {
                selection: vec![0],
                restart: false
            }]
        );
        p.on_running(10);
        assert!(p.on_failure(20, Some(0), &CRASH).is_empty());
        assert_eq!(p.phase(), Phase::Backoff { until_ms: 120 });
        assert!(
            p.tick(119).is_empty(),
            "restarted before its backoff ran out"
        );
        assert_eq!(p.tick(120).len(), 1);
        assert!(p.on_failure(200, Some(0), &CRASH).is_empty());
        assert_eq!(
            p.phase(),
            Phase::Backoff { until_ms: 400 },
            "second backoff doubles"
        );
        p.tick(400);
        let acts = p.on_failure(500, Some(0), &CRASH);
        assert_eq!(
            acts,
            vec![Action::Quarantine { slot: 0, choice: 0 }, Action::GiveUp]
        );
        assert_eq!(p.phase(), Phase::Quarantined);
        assert!(
            p.tick(1_000_000).is_empty(),
            "a quarantined capability never restarts"
        );
        assert_eq!(p.restarts(), 2);
    }

    #[test]
    fn fails_over_to_the_alternative_after_max_failures() {
        let mut p = CapabilityPolicy::new(cfg(), &[1, 2]);
        p.start(0);
        for t in [100, 1_000] {
            assert!(p.on_failure(t, Some(1), &CRASH).is_empty());
            assert_eq!(p.tick(t + 10_000).len(), 1);
        }
        let acts = p.on_failure(20_000, Some(1), &CRASH);
        assert_eq!(
            acts,
            vec![
                Action::Quarantine { slot: 1, choice: 0 },
                Action::FailOver {
                    slot: 1,
                    from: 0,
                    to: 1
                },
                Action::Spawn {
                    selection: vec![0, 1],
                    restart: true
                },
            ]
        );
        assert!(p.is_quarantined(1, 0) && !p.is_quarantined(1, 1));
    }

    #[test]
    fn a_load_refusal_quarantines_at_once() {
        let mut p = CapabilityPolicy::new(cfg(), &[2]);
        p.start(0);
        let acts = p.on_failure(
            5,
            Some(0),
            &ShardFailure::LoadRefused {
                reason: "hash".into(),
            },
        );
        assert!(matches!(acts[1], Action::FailOver { from: 0, to: 1, .. }));
        let acts = p.on_failure(
            6,
            Some(0),
            &ShardFailure::LoadRefused {
                reason: "hash".into(),
            },
        );
        assert_eq!(acts.last(), Some(&Action::GiveUp));
    }

    #[test]
    fn a_stable_run_resets_the_counts_and_unattributed_failures_give_up() {
        let mut p = CapabilityPolicy::new(cfg(), &[1]);
        p.start(0);
        p.on_running(0);
        p.on_failure(10, Some(0), &CRASH);
        p.tick(110);
        p.on_running(120);
        p.on_failure(130, Some(0), &CRASH);
        p.tick(330);
        p.on_running(340);
        p.tick(340 + 10_000);
        assert_eq!(p.failures(0, 0), 0, "stable run resets the count");
        assert!(p.on_failure(20_000, Some(0), &CRASH).is_empty());
        assert_eq!(p.phase(), Phase::Backoff { until_ms: 20_100 });
        let mut q = CapabilityPolicy::new(cfg(), &[1, 1]);
        q.start(0);
        q.on_failure(1, None, &ShardFailure::Hung);
        q.tick(101);
        q.on_failure(102, None, &ShardFailure::Hung);
        q.tick(302);
        assert_eq!(
            q.on_failure(303, None, &ShardFailure::Hung).last(),
            Some(&Action::GiveUp)
        );
        assert!(q.is_quarantined(0, 0) && q.is_quarantined(1, 0));
    }

    #[test]
    fn backoff_is_capped() {
        let mut p = CapabilityPolicy::new(
            PolicyConfig {
                max_failures: 100,
                ..cfg()
            },
            &[1],
        );
        p.start(0);
        let mut now = 0;
        for _ in 0..10 {
            p.on_failure(now, None, &ShardFailure::Hung);
            if let Phase::Backoff { until_ms } = p.phase() {
                assert!(until_ms - now <= 1_000);
                now = until_ms;
            }
            p.tick(now);
        }
        assert_eq!(p.phase(), Phase::Starting);
    }
}
