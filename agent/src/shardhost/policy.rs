//! Restart, backoff, quarantine, failover and sibling-isolation decisions
//! for one capability: a sans-IO state machine. It takes `now` (ms on any
//! monotonic clock) and events, and returns actions; the
//! [`super::supervisor::Supervisor`] does the I/O. Tests drive it on
//! simulated time.
//!
//! A capability has *slots* (one per required shard), each with a list of
//! *choices* (the shard and its alternatives, in the order the signed
//! instruction gave them). Rules:
//! - A failure increases the capability's consecutive-failure count and, when
//!   the failure is attributed to a slot, that choice's count (and is kept as
//!   that choice's last failure, for the report).
//! - A load refusal or an init refusal (`LoadRefused`, `InitFailed`, which
//!   includes a sealed configuration that does not open) is deterministic:
//!   running it again gives the same answer, so the choice is quarantined at
//!   once — no restart loop.
//! - A choice with `max_failures` attributed failures is quarantined; the
//!   slot fails over to its next non-quarantined alternative, started at once
//!   (local failover: no cloud involved, same lease).
//! - **Sibling isolation** (only when the capability is *isolatable*, i.e. no
//!   shard of it needs a sibling's service to work; see
//!   [`isolatable_capability`]): a failure attributed to a slot restarts the
//!   host at once *without* that slot, so the siblings keep running; the
//!   failing slot sits out its backoff (`Isolate` with a time) and is then
//!   started again with them. A slot with every choice quarantined is
//!   dropped for good (`Isolate` without a time) and the siblings continue.
//!   In a capability that is not isolatable, a failure takes the whole host
//!   into backoff and a slot with nothing left quarantines the capability.
//! - Unattributed failures (the host died and nobody can say in which
//!   shard) concern the whole host: backoff, and after `max_failures`
//!   consecutive ones the capability is quarantined (given up) until it is
//!   activated again.
//! - Backoff is `base · 2^(n−1)` ms, capped at `max`.
//! - After `stable_after_ms` of running, the failure counts of the running
//!   slots reset.
#![forbid(unsafe_code)]

use shardline_shared::msg::ShardFailure;

/// Whether the shards of `capability` may run without each other, so one
/// failing shard can be isolated from its siblings. The agent knows this for
/// its catalog; an unknown capability is treated as not isolatable (the old,
/// safe behaviour: its shards restart together).
///
/// - `qos`: yes. `qos-shaper` uses the `mark` service of `qos-dscp` only when
///   it is there (it forwards unmarked otherwise), and `qos-dscp` uses nothing.
/// - `vpn`: no. `vpn-tunnel` encrypts through the `aead` service and
///   handshakes through the `auth` service of its siblings in the same host;
///   without them it cannot carry a packet.
pub fn isolatable_capability(capability: &str) -> bool {
    matches!(capability, "qos")
}

/// Whether a failure gives the same answer every time it is retried.
pub fn is_deterministic(failure: &ShardFailure) -> bool {
    matches!(
        failure,
        ShardFailure::LoadRefused { .. } | ShardFailure::InitFailed { .. }
    )
}

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

/// Where one slot stands (for reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotPhase {
    /// In the host (or about to be): the capability's [`Phase`] applies.
    Hosted,
    /// Isolated after a failure, waiting out its backoff; siblings run.
    Isolated { until_ms: u64 },
    /// Every choice quarantined; siblings run without it.
    Dropped,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start a host with these `(slot, choice)` pairs, in slot order (the
    /// host's shard index `i` is `shards[i]`).
    Spawn {
        shards: Vec<(usize, usize)>,
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
    /// The slot leaves the host so its siblings keep running: until
    /// `until_ms` (its backoff), or for good (`None`: nothing left to run).
    Isolate {
        slot: usize,
        until_ms: Option<u64>,
    },
    /// The capability as a whole is quarantined.
    GiveUp,
}

#[derive(Debug, Clone)]
struct Slot {
    current: usize,
    failures: Vec<u32>,
    quarantined: Vec<bool>,
    last: Vec<Option<ShardFailure>>,
    isolated_until: Option<u64>,
    dropped: bool,
}

impl Slot {
    fn hosted(&self) -> bool {
        !self.dropped && self.isolated_until.is_none()
    }
}

#[derive(Debug, Clone)]
pub struct CapabilityPolicy {
    cfg: PolicyConfig,
    isolatable: bool,
    slots: Vec<Slot>,
    phase: Phase,
    consecutive: u32,
    restarts: u32,
}

impl CapabilityPolicy {
    /// `choices[slot]` = number of choices (1 + alternatives) of each slot;
    /// `isolatable`: see [`isolatable_capability`].
    pub fn new(cfg: PolicyConfig, choices: &[usize], isolatable: bool) -> Self {
        Self {
            cfg,
            isolatable,
            slots: choices
                .iter()
                .map(|&n| Slot {
                    current: 0,
                    failures: vec![0; n.max(1)],
                    quarantined: vec![false; n.max(1)],
                    last: vec![None; n.max(1)],
                    isolated_until: None,
                    dropped: false,
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

    /// The current choice of every slot (hosted or not).
    pub fn selection(&self) -> Vec<usize> {
        self.slots.iter().map(|s| s.current).collect()
    }

    /// The `(slot, choice)` pairs a host started now would run.
    pub fn hosted(&self) -> Vec<(usize, usize)> {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.hosted())
            .map(|(i, s)| (i, s.current))
            .collect()
    }

    pub fn slot_phase(&self, slot: usize) -> SlotPhase {
        match self.slots.get(slot) {
            Some(s) if s.dropped => SlotPhase::Dropped,
            Some(Slot {
                isolated_until: Some(until_ms),
                ..
            }) => SlotPhase::Isolated {
                until_ms: *until_ms,
            },
            _ => SlotPhase::Hosted,
        }
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

    /// The last failure attributed to this choice.
    pub fn last_failure(&self, slot: usize, choice: usize) -> Option<&ShardFailure> {
        self.slots.get(slot)?.last.get(choice)?.as_ref()
    }

    /// Starts the capability now.
    pub fn start(&mut self, _now_ms: u64) -> Vec<Action> {
        self.phase = Phase::Starting;
        vec![Action::Spawn {
            shards: self.hosted(),
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

    fn backoff_ms(&self, n: u32) -> u64 {
        let shift = n.saturating_sub(1).min(20);
        self.cfg
            .backoff_base_ms
            .saturating_mul(1 << shift)
            .min(self.cfg.backoff_max_ms)
    }

    /// Another slot than `s` would still be in the host.
    fn siblings_hosted(&self, s: usize) -> bool {
        self.slots
            .iter()
            .enumerate()
            .any(|(i, slot)| i != s && slot.hosted())
    }

    /// Starts a host with the hosted slots; with none, waits for the first
    /// isolated one, or gives up when every slot is dropped.
    fn respawn(&mut self, actions: &mut Vec<Action>) {
        let shards = self.hosted();
        if !shards.is_empty() {
            self.restarts += 1;
            self.phase = Phase::Starting;
            actions.push(Action::Spawn {
                shards,
                restart: true,
            });
        } else if let Some(until_ms) = self.slots.iter().filter_map(|s| s.isolated_until).min() {
            self.phase = Phase::Backoff { until_ms };
        } else {
            self.phase = Phase::Quarantined;
            actions.push(Action::GiveUp);
        }
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
        let deterministic = is_deterministic(failure);
        let max = self.cfg.max_failures.max(1);
        let mut actions = Vec::new();
        if let Some(s) = slot.filter(|&s| s < self.slots.len() && self.slots[s].hosted()) {
            let isolate = self.isolatable && self.siblings_hosted(s);
            let slot_state = &mut self.slots[s];
            let cur = slot_state.current;
            slot_state.failures[cur] += 1;
            slot_state.last[cur] = Some(failure.clone());
            let count = slot_state.failures[cur];
            if deterministic || count >= max {
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
                        self.respawn(&mut actions);
                    }
                    None if isolate => {
                        slot_state.dropped = true;
                        actions.push(Action::Isolate {
                            slot: s,
                            until_ms: None,
                        });
                        self.consecutive = 0;
                        self.respawn(&mut actions);
                    }
                    None => {
                        self.phase = Phase::Quarantined;
                        actions.push(Action::GiveUp);
                    }
                }
                return actions;
            }
            if isolate {
                // The siblings did nothing wrong: they restart now, the
                // failing shard waits out its own backoff.
                let until_ms = now_ms.saturating_add(self.backoff_ms(count));
                self.slots[s].isolated_until = Some(until_ms);
                actions.push(Action::Isolate {
                    slot: s,
                    until_ms: Some(until_ms),
                });
                self.consecutive = 0;
                self.respawn(&mut actions);
                return actions;
            }
        } else if deterministic || self.consecutive >= max {
            for (s, slot_state) in self.slots.iter_mut().enumerate() {
                if !slot_state.hosted() {
                    continue;
                }
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
        let delay = self.backoff_ms(self.consecutive);
        self.phase = Phase::Backoff {
            until_ms: now_ms.saturating_add(delay),
        };
        actions
    }

    /// Time passes: ends a backoff or an isolation (restart) and resets
    /// counts after a stable run.
    pub fn tick(&mut self, now_ms: u64) -> Vec<Action> {
        let rejoin = |slots: &mut Vec<Slot>| {
            let mut any = false;
            for s in slots.iter_mut() {
                if s.isolated_until.is_some_and(|t| now_ms >= t) {
                    s.isolated_until = None;
                    any = true;
                }
            }
            any
        };
        match self.phase {
            Phase::Backoff { until_ms } if now_ms >= until_ms => {
                rejoin(&mut self.slots);
                let mut actions = Vec::new();
                self.respawn(&mut actions);
                actions
            }
            Phase::Running { since_ms } => {
                if rejoin(&mut self.slots) {
                    // Starting the isolated shard again means a new host for
                    // all (one process per capability): a short interruption.
                    let mut actions = Vec::new();
                    self.respawn(&mut actions);
                    return actions;
                }
                if now_ms.saturating_sub(since_ms) >= self.cfg.stable_after_ms {
                    self.consecutive = 0;
                    for s in self.slots.iter_mut().filter(|s| s.hosted()) {
                        s.failures.iter_mut().for_each(|f| *f = 0);
                    }
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
        let mut p = CapabilityPolicy::new(cfg(), &[1], false);
        assert_eq!(
            p.start(0),
            vec![Action::Spawn {
                shards: vec![(0, 0)],
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
        let mut p = CapabilityPolicy::new(cfg(), &[1, 2], false);
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
                    shards: vec![(0, 0), (1, 1)],
                    restart: true
                },
            ]
        );
        assert!(p.is_quarantined(1, 0) && !p.is_quarantined(1, 1));
    }

    #[test]
    fn a_load_refusal_quarantines_at_once() {
        let mut p = CapabilityPolicy::new(cfg(), &[2], false);
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
        let mut p = CapabilityPolicy::new(cfg(), &[1], false);
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
        let mut q = CapabilityPolicy::new(cfg(), &[1, 1], false);
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
            false,
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

    fn init_failed() -> ShardFailure {
        ShardFailure::InitFailed {
            reason: "missing key psk".into(),
        }
    }

    #[test]
    fn an_init_refusal_is_deterministic_and_fails_over_at_once() {
        // crypto-aes256gcm (choice 0) refuses its config; chacha (1) runs.
        let mut p = CapabilityPolicy::new(cfg(), &[2], false);
        p.start(0);
        let acts = p.on_failure(3, Some(0), &init_failed());
        assert_eq!(
            acts,
            vec![
                Action::Quarantine { slot: 0, choice: 0 },
                Action::FailOver {
                    slot: 0,
                    from: 0,
                    to: 1
                },
                Action::Spawn {
                    shards: vec![(0, 1)],
                    restart: true
                },
            ]
        );
        assert_eq!(p.last_failure(0, 0), Some(&init_failed()));
        assert_eq!(p.last_failure(0, 1), None);
        // Without an alternative: no restart loop, the capability gives up.
        let mut q = CapabilityPolicy::new(cfg(), &[1], false);
        q.start(0);
        assert_eq!(
            q.on_failure(3, Some(0), &init_failed()),
            vec![Action::Quarantine { slot: 0, choice: 0 }, Action::GiveUp]
        );
        assert!(q.tick(1_000_000).is_empty());
    }

    #[test]
    fn a_failing_shard_of_an_isolatable_capability_leaves_its_siblings_running() {
        // qos: slot 0 = shaper, slot 1 = a shard that crashes.
        let mut p = CapabilityPolicy::new(cfg(), &[1, 1], true);
        p.start(0);
        p.on_running(10);
        // First crash: the sibling restarts at once, alone; the culprit
        // waits out its backoff (100 ms).
        let acts = p.on_failure(1_000, Some(1), &CRASH);
        assert_eq!(
            acts,
            vec![
                Action::Isolate {
                    slot: 1,
                    until_ms: Some(1_100)
                },
                Action::Spawn {
                    shards: vec![(0, 0)],
                    restart: true
                },
            ]
        );
        assert_eq!(p.slot_phase(1), SlotPhase::Isolated { until_ms: 1_100 });
        assert_eq!(p.slot_phase(0), SlotPhase::Hosted);
        p.on_running(1_020);
        assert!(p.tick(1_099).is_empty(), "rejoined before its backoff");
        // Backoff over: a host with both again.
        assert_eq!(
            p.tick(1_100),
            vec![Action::Spawn {
                shards: vec![(0, 0), (1, 0)],
                restart: true
            }]
        );
        p.on_running(1_120);
        p.on_failure(1_200, Some(1), &CRASH);
        p.on_running(1_220);
        assert_eq!(p.tick(1_400).len(), 1, "second backoff 200 ms");
        p.on_running(1_420);
        // Third crash: quarantined alone and dropped; the sibling goes on.
        let acts = p.on_failure(1_500, Some(1), &CRASH);
        assert_eq!(
            acts,
            vec![
                Action::Quarantine { slot: 1, choice: 0 },
                Action::Isolate {
                    slot: 1,
                    until_ms: None
                },
                Action::Spawn {
                    shards: vec![(0, 0)],
                    restart: true
                },
            ]
        );
        p.on_running(1_520);
        assert_eq!(p.slot_phase(1), SlotPhase::Dropped);
        assert!(!p.is_quarantined(0, 0));
        assert!(p.tick(1_000_000).is_empty(), "a dropped slot never rejoins");
        assert!(matches!(p.phase(), Phase::Running { .. }));
        // The sibling failing on its own now: nothing left to isolate it
        // from, so the old rules apply (backoff, then give up).
        assert!(p.on_failure(2_000_000, Some(0), &CRASH).is_empty());
        assert!(matches!(p.phase(), Phase::Backoff { .. }));
    }

    #[test]
    fn a_non_isolatable_capability_still_restarts_together() {
        // vpn: the tunnel needs its siblings' services.
        let mut p = CapabilityPolicy::new(cfg(), &[1, 1, 1], false);
        p.start(0);
        p.on_running(1);
        assert!(p.on_failure(10, Some(2), &CRASH).is_empty());
        assert_eq!(p.phase(), Phase::Backoff { until_ms: 110 });
        assert_eq!(
            p.tick(110),
            vec![Action::Spawn {
                shards: vec![(0, 0), (1, 0), (2, 0)],
                restart: true
            }]
        );
        assert!(isolatable_capability("qos") && !isolatable_capability("vpn"));
        assert!(!isolatable_capability("something-new"));
    }

    #[test]
    fn isolation_then_failover_runs_the_alternative_beside_the_siblings() {
        let mut p = CapabilityPolicy::new(cfg(), &[1, 2], true);
        p.start(0);
        let acts = p.on_failure(5, Some(1), &init_failed());
        assert_eq!(
            acts.last(),
            Some(&Action::Spawn {
                shards: vec![(0, 0), (1, 1)],
                restart: true
            })
        );
        // An unattributed failure concerns the whole host.
        p.on_running(10);
        assert!(p.on_failure(20, None, &ShardFailure::Hung).is_empty());
        assert_eq!(p.phase(), Phase::Backoff { until_ms: 120 });
    }
}
