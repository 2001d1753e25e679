//! Explicit requests (issue 18): one table test per rule of
//! `policy::requests`, and property tests of the invariants (pushed and
//! granted units within the budget at every step; determinism).

mod policy_common;
use policy_common::*;
use proptest::prelude::*;
use shardline_allocator_core::policy::{
    decode_device_state, Action, Agreements, AppRequests, Engine, Event, Features, PolicyConfig,
    ScoreChange,
};
use shardline_shared::ids::{AppName, DeviceId, InstanceRef};
use shardline_shared::msg::ShardKind;
use shardline_shared::request::{
    Answer, AppRequest, GrantOutcome, RequestAnswer, RequestOp, RequestRefusal,
};

/// `apps`: 4 compute units and no data units at all; `roomy` from the
/// shared test tiers has 4 compute / 6 data.
const APP_TIERS: &str = r#"
[[tier]]
name = "apps"
capabilities = ["qos"]
compute_units = 4
data_units = 0
max_priority = 60
lease_cap_s = 1800
borrowing = false
"#;

fn engine_apps(cfg: PolicyConfig) -> Engine {
    let c = catalog();
    let mut tiers = TEST_TIERS.to_owned();
    tiers.push_str(APP_TIERS);
    let a = Agreements::from_toml_str(&tiers, "tiers.toml", &c).expect("tiers load");
    Engine::new(c, a, cfg)
}

struct Fx {
    engine: Engine,
    device: DeviceId,
    seq: u64,
}

impl Fx {
    fn new(tier: &str) -> Self {
        Self::with(tier, PolicyConfig::default())
    }

    fn with(tier: &str, cfg: PolicyConfig) -> Self {
        let mut engine = engine_apps(cfg);
        let device = dev("gw");
        enroll(&mut engine, 0, &device, tier, None);
        Self {
            engine,
            device,
            seq: 0,
        }
    }

    /// Sends a request from `app:instance` and returns every answer.
    fn ask(&mut self, now: u64, who: &str, op: RequestOp) -> Vec<RequestAnswer> {
        self.seq += 1;
        let seq = self.seq;
        self.ask_seq(now, who, seq, op)
    }

    fn ask_seq(&mut self, now: u64, who: &str, seq: u64, op: RequestOp) -> Vec<RequestAnswer> {
        let (app, instance) = who.split_once(':').expect("app:instance");
        let request = AppRequest {
            device: self.device.clone(),
            seq,
            app: AppName::new(app).unwrap(),
            instance: AppName::new(instance).unwrap(),
            at_ms: now,
            op,
        };
        answers(&self.engine.handle(now, Event::AppRequest { request }))
    }

    fn tick(&mut self, now: u64) -> Vec<RequestAnswer> {
        answers(&self.engine.handle(now, Event::Tick))
    }

    fn instance(&self, who: &str) -> InstanceRef {
        format!("{}:{who}", self.device).parse().unwrap()
    }

    fn score(&self, who: &str, now: u64) -> f64 {
        self.engine
            .instance_view_at(&self.instance(who), Some(now))
            .expect("instance known")
            .reputation
    }
}

fn answers(actions: &[Action]) -> Vec<RequestAnswer> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Answer(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

fn acquire(kind: ShardKind, units: u32, duration_ms: u32) -> RequestOp {
    RequestOp::Acquire {
        kind,
        units,
        duration_ms,
        priority: 0,
    }
}

fn compute(units: u32) -> RequestOp {
    acquire(ShardKind::Compute, units, 30_000)
}

fn release(grant: u64, outcome: GrantOutcome) -> RequestOp {
    RequestOp::Release { grant, outcome }
}

fn only(a: Vec<RequestAnswer>) -> Answer {
    assert_eq!(a.len(), 1, "one answer expected: {a:?}");
    a.into_iter().next().unwrap().answer
}

fn granted(a: &Answer) -> u64 {
    match a {
        Answer::Granted(g) => g.grant,
        other => panic!("not granted: {other:?}"),
    }
}

#[test]
fn a_request_within_quota_and_pool_is_granted_for_at_most_the_scaled_cap() {
    let mut fx = Fx::new("roomy");
    let a = only(fx.ask(1_000, "cam:1", acquire(ShardKind::Compute, 1, 20_000)));
    let Answer::Granted(g) = a else {
        panic!("{a:?}")
    };
    assert_eq!(
        (g.units, g.kind, g.expires_at_ms),
        (1, ShardKind::Compute, 21_000)
    );
    // At the starting score (50) the cap is half of max_grant_ms (60 s).
    let Answer::Granted(g) = only(fx.ask(1_000, "cam:1", acquire(ShardKind::Data, 1, 600_000)))
    else {
        panic!()
    };
    assert_eq!(g.expires_at_ms, 31_000);
    assert_ne!(g.grant, 1, "grant ids are unique per device");
}

#[test]
fn refusals_name_their_rule() {
    let mut fx = Fx::new("apps");
    // Instance quota at 50 = half of 4 compute units.
    assert_eq!(
        only(fx.ask(0, "cam:1", compute(3))),
        Answer::Refused(RequestRefusal::InsufficientQuota {
            kind: ShardKind::Compute,
            asked: 3,
            quota: 2,
            in_use: 0
        })
    );
    assert_eq!(
        only(fx.ask(0, "cam:1", acquire(ShardKind::Data, 1, 1_000))),
        Answer::Refused(RequestRefusal::KindNotAllowed {
            kind: ShardKind::Data
        })
    );
    assert!(matches!(
        only(fx.ask(0, "cam:1", compute(0))),
        Answer::Refused(RequestRefusal::OutOfRange { .. })
    ));
    assert_eq!(
        only(fx.ask(0, "cam:1", release(99, GrantOutcome::Completed))),
        Answer::Refused(RequestRefusal::UnknownGrant { grant: 99 })
    );
    fx.engine.handle(
        0,
        Event::Drain {
            device: fx.device.clone(),
        },
    );
    assert_eq!(
        only(fx.ask(0, "cam:1", compute(1))),
        Answer::Refused(RequestRefusal::Drained)
    );
}

#[test]
fn a_queued_request_is_granted_when_units_are_released() {
    let mut fx = Fx::new("apps");
    let a = granted(&only(fx.ask(0, "cam:a", compute(2))));
    granted(&only(fx.ask(0, "cam:b", compute(2))));
    let waiting = fx.ask(0, "cam:c", compute(1));
    let Answer::Queued {
        ticket,
        position,
        expected_wait_ms,
    } = waiting[0].answer
    else {
        panic!("{waiting:?}")
    };
    let queued_seq = waiting[0].request_seq;
    assert_eq!(position, 1);
    assert_eq!(expected_wait_ms, 10_000, "capped by the wait deadline");
    let out = fx.ask(500, "cam:a", release(a, GrantOutcome::Completed));
    assert_eq!(out.len(), 2, "{out:?}");
    assert!(matches!(out[0].answer, Answer::Released { units: 2, .. }));
    assert_eq!(out[1].instance.as_str(), "c");
    assert_eq!(
        out[1].request_seq, queued_seq,
        "the grant answers the queued request"
    );
    assert_eq!(
        granted(&out[1].answer),
        ticket,
        "the ticket becomes the grant id"
    );
}

#[test]
fn the_queue_is_served_fairly_across_instances() {
    let mut fx = Fx::new("apps");
    let x = granted(&only(fx.ask(0, "cam:x", compute(2))));
    granted(&only(fx.ask(0, "cam:y", compute(2))));
    // `a` queues twice before `b` queues once.
    fx.ask(1, "cam:a", compute(1));
    fx.ask(2, "cam:a", compute(1));
    fx.ask(3, "cam:b", compute(1));
    let out = fx.ask(10, "cam:x", release(x, GrantOutcome::Completed));
    let who: Vec<&str> = out[1..].iter().map(|a| a.instance.as_str()).collect();
    assert_eq!(
        who,
        ["a", "b"],
        "b is served before a's second request: {out:?}"
    );
}

#[test]
fn the_queue_is_bounded_per_instance_and_per_device() {
    let mut cfg = PolicyConfig::default();
    cfg.requests.queue_per_instance = 2;
    cfg.requests.queue_per_device = 3;
    let mut fx = Fx::with("apps", cfg);
    granted(&only(fx.ask(0, "cam:x", compute(2))));
    granted(&only(fx.ask(0, "cam:y", compute(2))));
    assert!(matches!(
        only(fx.ask(0, "cam:a", compute(1))),
        Answer::Queued { .. }
    ));
    assert!(matches!(
        only(fx.ask(0, "cam:a", compute(1))),
        Answer::Queued { .. }
    ));
    assert_eq!(
        only(fx.ask(0, "cam:a", compute(1))),
        Answer::Refused(RequestRefusal::QueueFull { limit: 2 })
    );
    assert!(matches!(
        only(fx.ask(0, "cam:b", compute(1))),
        Answer::Queued { position: 3, .. }
    ));
    assert_eq!(
        only(fx.ask(0, "cam:c", compute(1))),
        Answer::Refused(RequestRefusal::QueueFull { limit: 3 })
    );
}

#[test]
fn a_queued_request_times_out_and_a_ticket_withdraws_one() {
    let mut fx = Fx::new("apps");
    granted(&only(fx.ask(0, "cam:x", compute(2))));
    granted(&only(fx.ask(0, "cam:y", compute(2))));
    let q = fx.ask(0, "cam:a", compute(1));
    let Answer::Queued { .. } = q[0].answer else {
        panic!()
    };
    let w = fx.ask(0, "cam:b", compute(1));
    let Answer::Queued { ticket, .. } = w[0].answer else {
        panic!()
    };
    assert!(matches!(
        only(fx.ask(5, "cam:b", release(ticket, GrantOutcome::Unused))),
        Answer::Released { units: 1, .. }
    ));
    let out = fx.tick(10_000);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].request_seq, q[0].request_seq);
    assert_eq!(out[0].answer, Answer::Refused(RequestRefusal::QueueTimeout));
}

#[test]
fn an_expired_grant_returns_its_units_and_serves_the_queue() {
    let mut fx = Fx::new("apps");
    granted(&only(fx.ask(
        0,
        "cam:x",
        acquire(ShardKind::Compute, 2, 1_500),
    )));
    granted(&only(fx.ask(0, "cam:y", compute(2))));
    assert!(matches!(
        only(fx.ask(0, "cam:a", compute(2))),
        Answer::Queued {
            expected_wait_ms: 1_500,
            ..
        }
    ));
    let out = fx.tick(1_500);
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].instance.as_str(), "a");
    assert!(matches!(out[0].answer, Answer::Granted(_)));
    // Expired unreleased and never renewed: a small cost.
    assert!(fx.score("cam:x", 1_500) < 50.0);
}

#[test]
fn renew_extends_a_grant_and_a_renewed_expiry_is_not_charged() {
    let mut fx = Fx::new("apps");
    let g = granted(&only(fx.ask(
        0,
        "cam:x",
        acquire(ShardKind::Compute, 1, 1_000),
    )));
    let Answer::Renewed(r) = only(fx.ask(
        900,
        "cam:x",
        RequestOp::Renew {
            grant: g,
            duration_ms: 2_000,
        },
    )) else {
        panic!()
    };
    assert_eq!((r.grant, r.expires_at_ms), (g, 2_900));
    assert!(fx.tick(1_000).is_empty());
    let held = fx.engine.units_held(&fx.device).unwrap();
    assert_eq!(held.1, [1, 0], "still held after the first expiry time");
    fx.tick(2_900);
    assert_eq!(fx.engine.units_held(&fx.device).unwrap().1, [0, 0]);
    assert!((fx.score("cam:x", 2_900) - 50.0).abs() < 1e-6);
}

#[test]
fn the_rate_limit_costs_only_the_instance_that_exceeds_it() {
    let mut cfg = PolicyConfig::default();
    cfg.requests.rate_per_s = 1.0;
    cfg.requests.burst = 2.0;
    let mut fx = Fx::with("apps", cfg);
    fx.ask(0, "cam:a", compute(1));
    fx.ask(0, "cam:b", compute(1));
    fx.ask(0, "cam:a", RequestOp::Query);
    let a = only(fx.ask(0, "cam:a", RequestOp::Query));
    assert_eq!(
        a,
        Answer::Refused(RequestRefusal::RateLimited {
            retry_after_ms: 1_000
        })
    );
    assert!(fx.score("cam:a", 0) < 50.0);
    assert_eq!(fx.score("cam:b", 0), 50.0);
    let device = fx.engine.device(&fx.device).unwrap();
    assert_eq!(device.reputation, 50.0, "never the device");
    // Tokens come back with time.
    assert!(matches!(
        only(fx.ask(1_000, "cam:a", RequestOp::Query)),
        Answer::Standing(_)
    ));
}

#[test]
fn outcomes_move_the_instance_reputation_with_history() {
    let mut fx = Fx::new("roomy");
    let cases = [
        (GrantOutcome::Completed, 1.0),
        (GrantOutcome::Unused, -0.5),
        (GrantOutcome::Errored, -3.0),
        (GrantOutcome::OverLimit, -8.0),
    ];
    let mut expected = 50.0;
    for (outcome, delta) in cases {
        let g = granted(&only(fx.ask(0, "cam:1", compute(1))));
        fx.ask(0, "cam:1", release(g, outcome));
        expected += delta;
        assert!(
            (fx.score("cam:1", 0) - expected).abs() < 1e-9,
            "{outcome:?}"
        );
    }
    let view = fx.engine.instance_view(&fx.instance("cam:1")).unwrap();
    let reasons: Vec<&str> = view.history.iter().map(|h| h.reason.as_str()).collect();
    assert_eq!(reasons, ["completed", "unused", "errored", "over_limit"]);
    // Decays back toward the initial score.
    assert!(fx.score("cam:1", 6 * HOUR) > expected);
}

#[test]
fn a_new_instance_never_starts_above_its_apps_lowest() {
    let mut cfg = PolicyConfig::default();
    cfg.requests.max_instances = 2;
    let mut fx = Fx::with("roomy", cfg);
    for _ in 0..3 {
        let g = granted(&only(fx.ask(0, "cam:bad", compute(1))));
        fx.ask(0, "cam:bad", release(g, GrantOutcome::OverLimit));
    }
    let low = fx.score("cam:bad", 0);
    assert!(low < 30.0);
    fx.ask(0, "cam:renamed", RequestOp::Query);
    fx.ask(0, "cam:renamed", compute(1));
    assert!(fx.score("cam:renamed", 0) <= low);
    // Another app starts fresh.
    fx.ask(1, "other:1", compute(1));
    assert_eq!(fx.score("other:1", 1), 50.0);
    // `bad` (idle, oldest) was evicted to make room; its app keeps the floor.
    assert!(fx.engine.instance_view(&fx.instance("cam:bad")).is_none());
    let g = fx
        .engine
        .instance_view(&fx.instance("cam:renamed"))
        .unwrap()
        .grants[0]
        .grant;
    fx.ask(2, "cam:renamed", release(g, GrantOutcome::Completed));
    fx.ask(3, "cam:third", compute(1));
    assert!(fx.score("cam:third", 3) <= low + 1e-3);
}

#[test]
fn replayed_requests_are_dropped_without_an_answer_but_service_requests_are_not() {
    let mut fx = Fx::new("roomy");
    assert_eq!(fx.ask_seq(0, "cam:1", 5, RequestOp::Query).len(), 1);
    assert!(fx.ask_seq(0, "cam:1", 5, RequestOp::Query).is_empty());
    assert!(fx.ask_seq(0, "cam:1", 4, compute(1)).is_empty());
    let out = answers(&fx.engine.handle(
        0,
        Event::ServiceRequest {
            instance: fx.instance("cam:1"),
            op: compute(1),
        },
    ));
    assert_eq!(out[0].request_seq, 0);
    assert!(matches!(out[0].answer, Answer::Granted(_)));
}

#[test]
fn an_operator_adjustment_is_recorded_with_its_reason() {
    let mut fx = Fx::new("roomy");
    let out = fx.engine.handle(
        0,
        Event::AdjustInstanceReputation {
            instance: fx.instance("cam:1"),
            change: ScoreChange::Set(70.0),
            reason: "trusted batch job".into(),
            actor: "alice".into(),
        },
    );
    assert!(matches!(
        out.as_slice(),
        [Action::InstanceReputationAdjusted { old, new, .. }] if *old == 50.0 && *new == 70.0
    ));
    fx.engine.handle(
        0,
        Event::AdjustInstanceReputation {
            instance: fx.instance("cam:1"),
            change: ScoreChange::Delta(-10.0),
            reason: "noisy".into(),
            actor: "bob".into(),
        },
    );
    let v = fx.engine.instance_view(&fx.instance("cam:1")).unwrap();
    assert_eq!(v.reputation, 60.0);
    assert_eq!(v.history[1].reason, "operator bob: noisy");
    let instances = fx.engine.device(&fx.device).unwrap().app_instances;
    assert_eq!(instances.len(), 1);
}

#[test]
fn grants_hold_units_the_pushed_plan_cannot_use() {
    // Static mode: every allowed capability is pushed as soon as it fits.
    let cfg = PolicyConfig {
        features: Features::STATIC,
        ..PolicyConfig::default()
    };
    let mut engine = engine_apps(cfg);
    let d = dev("gw");
    enroll(&mut engine, 0, &d, "basic", None);
    let who: InstanceRef = "gw:cam:1".parse().unwrap();
    engine.handle(
        0,
        Event::AdjustInstanceReputation {
            instance: who.clone(),
            change: ScoreChange::Set(100.0),
            reason: "whole budget".into(),
            actor: "test".into(),
        },
    );
    let check = |engine: &Engine| {
        let (p, g, b) = engine.units_held(&d).unwrap();
        for k in 0..2 {
            assert!(
                p[k] + g[k] <= b[k],
                "kind {k}: pushed {p:?} granted {g:?} budget {b:?}"
            );
        }
        (p, g, b)
    };
    let (_, _, budget) = check(&engine);
    let mut grants = Vec::new();
    for (kind, units) in [
        (ShardKind::Compute, budget[0]),
        (ShardKind::Data, budget[1]),
    ] {
        let out = answers(&engine.handle(
            0,
            Event::ServiceRequest {
                instance: who.clone(),
                op: acquire(kind, units, 60_000),
            },
        ));
        grants.push(granted(&out[0].answer));
    }
    // The report makes qos wanted; its units are all granted to the app.
    send(&mut engine, 1_000, &d, 1, vec![]);
    let (p, g, _) = check(&engine);
    assert_eq!((p, g), ([0, 0], budget));
    assert!(
        !engine.device(&d).unwrap().refusals.is_empty(),
        "refused for budget"
    );
    // Released: the next tick pushes what fits.
    for grant in grants {
        engine.handle(
            2_000,
            Event::ServiceRequest {
                instance: who.clone(),
                op: release(grant, GrantOutcome::Completed),
            },
        );
    }
    engine.handle(200_000, Event::Tick);
    let (p, g, _) = check(&engine);
    assert_eq!(g, [0, 0]);
    assert!(p[0] + p[1] > 0, "pushed once the units were back");
    // And now the app's pool is what the plan left.
    let out = answers(&engine.handle(
        200_000,
        Event::ServiceRequest {
            instance: who.clone(),
            op: acquire(ShardKind::Data, budget[1], 60_000),
        },
    ));
    assert!(!matches!(out[0].answer, Answer::Granted(_)), "{out:?}");
    check(&engine);
}

#[test]
fn device_state_written_before_explicit_requests_still_decodes() {
    let mut fx = Fx::new("roomy");
    fx.engine.handle(
        0,
        Event::ComplianceEvent {
            device: fx.device.clone(),
            kind: shardline_allocator_core::policy::ComplianceKind::ReplayedReport,
        },
    );
    let st = fx.engine.device_state(&fx.device).unwrap().clone();
    assert_eq!(st.apps, AppRequests::default());
    let bytes = postcard::to_stdvec(&st).unwrap();
    // Issue 18's layout: `apps` was the last field (issue 17 added three).
    let tail = postcard::to_stdvec(&AppRequests::default()).unwrap().len()
        + postcard::to_stdvec(&st.lending).unwrap().len()
        + postcard::to_stdvec(&st.credits).unwrap().len()
        + postcard::to_stdvec(&st.feedback).unwrap().len();
    let old = &bytes[..bytes.len() - tail];
    let back = decode_device_state(old).expect("state before issue 18 decodes");
    assert_eq!(back, st);
    let issue18 = &bytes
        [..bytes.len() - (tail - postcard::to_stdvec(&AppRequests::default()).unwrap().len())];
    let back = decode_device_state(issue18).expect("state of issue 18 decodes");
    assert_eq!(back, st);
    let back = decode_device_state(old).expect("old state decodes");
    assert_eq!(back, st);
    assert!(back.reputation.score < 50.0, "reputation kept");
    // New state with requests round-trips as is.
    fx.ask(0, "cam:1", compute(1));
    let st = fx.engine.device_state(&fx.device).unwrap().clone();
    let back = decode_device_state(&postcard::to_stdvec(&st).unwrap()).unwrap();
    assert_eq!(back, st);
}

// ------------------------------------------------------------ properties

#[derive(Debug, Clone)]
enum Step {
    Acquire {
        inst: u8,
        data: bool,
        units: u32,
        ms: u32,
    },
    Release {
        inst: u8,
        nth: usize,
        outcome: u8,
    },
    Renew {
        inst: u8,
        nth: usize,
    },
    Report {
        enc: bool,
        lat: bool,
    },
    Tick {
        advance_ms: u64,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u8..4, any::<bool>(), 1u32..4, 500u32..40_000)
            .prop_map(|(inst, data, units, ms)| Step::Acquire { inst, data, units, ms }),
        2 => (0u8..4, 0usize..4, 0u8..4).prop_map(|(inst, nth, outcome)| Step::Release { inst, nth, outcome }),
        1 => (0u8..4, 0usize..4).prop_map(|(inst, nth)| Step::Renew { inst, nth }),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(enc, lat)| Step::Report { enc, lat }),
        2 => (0u64..20_000).prop_map(|advance_ms| Step::Tick { advance_ms }),
    ]
}

/// Runs the steps; checks pushed + granted ≤ budget after each; returns
/// every action.
fn run(steps: &[Step]) -> Vec<Action> {
    let mut engine = engine_apps(PolicyConfig::default());
    let d = dev("gw");
    enroll(&mut engine, 0, &d, "tight", None);
    let mut now = 0u64;
    let mut seq = 0u64;
    let mut report_seq = 0u64;
    let mut all = Vec::new();
    for s in steps {
        let who = |inst: u8| -> InstanceRef { format!("gw:app:{inst}").parse().unwrap() };
        let mut ask = |engine: &mut Engine, now: u64, inst: u8, op: RequestOp| {
            seq += 1;
            let r = who(inst);
            engine.handle(
                now,
                Event::AppRequest {
                    request: AppRequest {
                        device: r.device,
                        seq,
                        app: r.app,
                        instance: r.instance,
                        at_ms: now,
                        op,
                    },
                },
            )
        };
        let out = match s {
            Step::Acquire {
                inst,
                data,
                units,
                ms,
            } => {
                let kind = if *data {
                    ShardKind::Data
                } else {
                    ShardKind::Compute
                };
                ask(&mut engine, now, *inst, acquire(kind, *units, *ms))
            }
            Step::Release { inst, nth, outcome } => {
                let grants = engine
                    .instance_view(&who(*inst))
                    .map(|v| v.grants)
                    .unwrap_or_default();
                let grant = grants.get(*nth).map_or(1_000 + *nth as u64, |g| g.grant);
                let outcome = [
                    GrantOutcome::Completed,
                    GrantOutcome::Unused,
                    GrantOutcome::Errored,
                    GrantOutcome::OverLimit,
                ][usize::from(*outcome % 4)];
                ask(&mut engine, now, *inst, release(grant, outcome))
            }
            Step::Renew { inst, nth } => {
                let grants = engine
                    .instance_view(&who(*inst))
                    .map(|v| v.grants)
                    .unwrap_or_default();
                let grant = grants.get(*nth).map_or(7, |g| g.grant);
                ask(
                    &mut engine,
                    now,
                    *inst,
                    RequestOp::Renew {
                        grant,
                        duration_ms: 10_000,
                    },
                )
            }
            Step::Report { enc: e, lat: l } => {
                report_seq += 1;
                let mut classes = Vec::new();
                if *e {
                    classes.push(class(
                        shardline_shared::msg::TrafficClass::Bulk,
                        2_000_000,
                        enc(),
                    ));
                }
                if *l {
                    classes.push(class(
                        shardline_shared::msg::TrafficClass::Interactive,
                        500_000,
                        lat(),
                    ));
                }
                send(&mut engine, now, &d, report_seq, classes)
            }
            Step::Tick { advance_ms } => {
                now += advance_ms;
                engine.handle(now, Event::Tick)
            }
        };
        let (p, g, b) = engine.units_held(&d).unwrap();
        for k in 0..2 {
            assert!(
                p[k] + g[k] <= b[k],
                "after {s:?}: kind {k}: pushed {p:?} granted {g:?} budget {b:?}"
            );
        }
        all.extend(out);
    }
    all
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn pushed_and_granted_units_stay_within_the_budget(steps in proptest::collection::vec(step(), 1..60)) {
        run(&steps);
    }

    #[test]
    fn requests_are_deterministic(steps in proptest::collection::vec(step(), 1..40)) {
        prop_assert_eq!(run(&steps), run(&steps));
    }
}

#[test]
fn units_the_pushed_plan_gives_back_serve_the_queue_at_once() {
    let mut cfg = PolicyConfig {
        hysteresis_ms: 1_000,
        ..PolicyConfig::default()
    };
    cfg.requests.max_wait_ms = 600_000;
    let mut engine = engine_apps(cfg);
    let d = dev("gw");
    enroll(&mut engine, 0, &d, "tight", None);
    for who in ["gw:cam:big", "gw:cam:q"] {
        engine.handle(
            0,
            Event::AdjustInstanceReputation {
                instance: who.parse().unwrap(),
                change: ScoreChange::Set(100.0),
                reason: "whole budget".into(),
                actor: "test".into(),
            },
        );
    }
    send(
        &mut engine,
        0,
        &d,
        1,
        vec![class(
            shardline_shared::msg::TrafficClass::Bulk,
            2_000_000,
            enc(),
        )],
    );
    let (pushed, _, budget) = engine.units_held(&d).unwrap();
    let k = if pushed[0] > 0 { 0 } else { 1 };
    assert!(pushed[k] > 0, "the vpn is pushed: {pushed:?}");
    let kind = [ShardKind::Compute, ShardKind::Data][k];
    let service = |engine: &mut Engine, who: &str, units| {
        answers(&engine.handle(
            10,
            Event::ServiceRequest {
                instance: who.parse().unwrap(),
                op: acquire(kind, units, 600_000),
            },
        ))
    };
    if budget[k] > pushed[k] {
        granted(&service(&mut engine, "gw:cam:big", budget[k] - pushed[k])[0].answer);
    }
    let q = service(&mut engine, "gw:cam:q", 1);
    assert!(matches!(q[0].answer, Answer::Queued { .. }), "{q:?}");
    // The need is gone: the next report re-plans without the vpn, and the
    // units it gave back go to the queued request in the same call.
    let out = answers(&send(&mut engine, 5_000, &d, 2, vec![]));
    assert_eq!(out.len(), 1, "{out:?}");
    assert_eq!(out[0].instance.as_str(), "q");
    granted(&out[0].answer);
}
