//! Seed 002 through the service (issue 17): a lender's signed report with
//! a harm observation moves its borrower's reputation; a report from a
//! device that lends nothing moves nobody's and is counted under its
//! reason; a report of an agent that predates the field still verifies.

use super::*;
use crate::policy::{Agreements, Catalog, PolicyConfig};
use shardline_shared::msg::*;
use shardline_shared::sign::SignedEnvelope;

/// The shipped catalog with the shaper's per-device keys filled in, and
/// two tiers with qos only: `lend` has room to spare, `small` cannot hold
/// qos without borrowing.
fn core() -> Core {
    use crate::policy::simulate::EXAMPLE_CATALOG;
    let per_device = "config = \"rate_bps = 20000000\"\ndevice_config = [\"listen\", \"forward\"]";
    let text = EXAMPLE_CATALOG.replace(
        per_device,
        r#"config = "rate_bps = 20000000\nlisten = 127.0.0.1:9\nforward = 127.0.0.1:9""#,
    );
    let catalog = Catalog::from_toml_str(&text, "catalog.toml").unwrap();
    let tiers = r#"
[[tier]]
name = "lend"
capabilities = ["qos"]
compute_units = 2
data_units = 4
max_priority = 80
lease_cap_s = 3600
borrowing = true

[[tier]]
name = "small"
capabilities = ["qos"]
compute_units = 2
data_units = 1
max_priority = 80
lease_cap_s = 3600
borrowing = true
"#;
    let agreements = Agreements::from_toml_str(tiers, "tiers.toml", &catalog).unwrap();
    let engine = Engine::new(catalog, agreements, PolicyConfig::default());
    Core::new(
        engine,
        KeyPair::from_seed(&[1; 32]),
        Loaded::default(),
        super::tests::test_config(),
        Arc::new(Metrics::default()),
        T0,
    )
}

const T0: u64 = 1_000_000;

fn key(d: &DeviceId) -> KeyPair {
    KeyPair::from_seed(&[d.as_str().len() as u8 + 10; 32])
}

fn enroll(core: &mut Core, d: &DeviceId, tier: &str) {
    let r = core.on_command(
        T0,
        Command::Enroll {
            device: d.clone(),
            public_key: key(d).public_key(),
            tier: tier.into(),
            tenant: Some("t".into()),
        },
    );
    assert!(matches!(r, Reply::Enrolled(_)), "{r:?}");
    core.take_step();
}

/// A latency-sensitive class (⇒ qos) with this loss.
fn report(d: &DeviceId, seq: u64, loss_permille: u16, lending: LendingReport) -> QosReport {
    QosReport {
        device: d.clone(),
        seq,
        window_start_ms: 0,
        window_ms: 10_000,
        classes: vec![ClassStats {
            class: TrafficClass::Calls,
            bytes: 1_000_000,
            packets: 1000,
            rate_bps: 800_000,
            rtt_p50_us: None,
            rtt_p95_us: None,
            jitter_us: None,
            loss_permille,
            active_flows: 2,
            need: QosNeed {
                latency_sensitive: true,
                bandwidth_heavy: false,
                needs_encryption: false,
            },
        }],
        resources: DeviceResources {
            cpu_cores: 4,
            cpu_load_permille: 50,
            mem_total_kib: 4 << 20,
            mem_available_kib: 3 << 20,
            aes_hw: true,
            arch: "x86_64".into(),
        },
        shards: vec![],
        applied_instruction_seq: 0,
        rejections: RejectionCounters::default(),
        lending,
    }
}

fn harm() -> LendingReport {
    LendingReport {
        harm: vec![HarmObservation {
            class: TrafficClass::Calls,
            baseline_loss_permille: 0,
            loss_permille: 100,
            baseline_rtt_p95_us: None,
            rtt_p95_us: None,
        }],
        consent: None,
    }
}

/// Delivers the device's signed report and returns the step it made.
fn publish(core: &mut Core, now: u64, r: &QosReport) -> Step {
    let bytes = sign::seal(Domain::Report, r, &[&key(&r.device)]);
    core.on_message(now, &topics::report(&r.device), &bytes);
    core.take_step()
}

#[test]
fn a_signed_harm_report_moves_the_borrowers_reputation_and_a_non_lenders_is_counted() {
    let mut core = core();
    let (l, b, o) = (
        DeviceId::new("lender").unwrap(),
        DeviceId::new("borrower").unwrap(),
        DeviceId::new("bystander").unwrap(),
    );
    enroll(&mut core, &l, "lend");
    enroll(&mut core, &b, "small");
    enroll(&mut core, &o, "lend");
    publish(
        &mut core,
        T0 + 1_000,
        &report(&l, 1, 0, LendingReport::default()),
    );
    publish(
        &mut core,
        T0 + 1_000,
        &report(&o, 1, 0, LendingReport::default()),
    );
    publish(
        &mut core,
        T0 + 2_000,
        &report(&b, 1, 0, LendingReport::default()),
    );
    let v = core.engine().device(&b).unwrap();
    assert_eq!(v.borrowed.len(), 1, "{:?}", v.refusal_reasons);
    let lender = v.borrowed[0].from.clone();
    // Whoever lent reports harm over a window the loan covered; the other
    // lends nothing and reports the same.
    let bystander = if lender == l { o.clone() } else { l.clone() };
    publish(&mut core, T0 + 60_000, &report(&lender, 2, 100, harm()));
    publish(&mut core, T0 + 60_000, &report(&bystander, 2, 100, harm()));
    let v = core.engine().device(&b).unwrap();
    assert!(v.lending.harm_received > 0.0, "{:?}", v.lending);
    assert!(
        v.reputation_history
            .iter()
            .any(|h| h.reason == "neighbour_harm"),
        "{:?}",
        v.reputation_history
    );
    assert!(v
        .lending
        .decisions
        .iter()
        .any(|d| d.text.contains("reported its QoS worse than its baseline")));
    let lv = core.engine().device(&lender).unwrap();
    assert_eq!(lv.lending.harm_accepted, 1);
    let bv = core.engine().device(&bystander).unwrap();
    assert_eq!(bv.lending.harm_ignored.get("not_lending"), Some(&1));
    assert_eq!(bv.lending.harm_accepted, 0);
    // The stored record carries the lending state (it survives a restart).
    let stored = core.record(&b).unwrap();
    let st = crate::policy::decode_device_state(&stored.engine_state).unwrap();
    assert!(st.lending.harm_received > 0.0);
}

#[test]
fn a_report_of_an_agent_without_the_lending_field_still_verifies() {
    let mut core = core();
    let d = DeviceId::new("old-agent").unwrap();
    enroll(&mut core, &d, "lend");
    // What an older agent signs: the report without its last two bytes.
    let mut payload = codec::encode(&report(&d, 1, 0, LendingReport::default()));
    assert!(payload.ends_with(REPORT_LEGACY_TAIL));
    payload.truncate(payload.len() - REPORT_LEGACY_TAIL.len());
    let signatures = vec![key(&d).sign_entry(Domain::Report, &payload)];
    let bytes = codec::encode(&SignedEnvelope {
        domain: Domain::Report,
        payload,
        signatures,
    });
    core.on_message(T0 + 1_000, &topics::report(&d), &bytes);
    let v = core.engine().device(&d).unwrap();
    assert_eq!(v.last_qos.as_ref().map(|q| q.seq), Some(1), "accepted");
    assert_eq!(v.lending.consent, None);
}

/// A loan is written on both sides in the step that made it: the lender's
/// record (it sends the lender nothing, so it would otherwise wait for the
/// lazy flush) carries the loan beside the borrower's, so a crash cannot
/// keep the borrower's units and lose the lender's side of them.
#[test]
fn the_step_that_makes_a_loan_writes_the_lender_and_the_borrower() {
    let mut core = core();
    let (l, b) = (
        DeviceId::new("lender").unwrap(),
        DeviceId::new("borrower").unwrap(),
    );
    enroll(&mut core, &l, "lend");
    enroll(&mut core, &b, "small");
    publish(
        &mut core,
        T0 + 1_000,
        &report(&l, 1, 0, LendingReport::default()),
    );
    let step = publish(
        &mut core,
        T0 + 2_000,
        &report(&b, 1, 0, LendingReport::default()),
    );
    let v = core.engine().device(&b).unwrap();
    assert_eq!(v.borrowed.len(), 1, "{:?}", v.refusal_reasons);
    assert_eq!(v.borrowed[0].from, l);
    let written = |d: &DeviceId| {
        step.batch
            .put_devices
            .iter()
            .find(|r| &r.device == d)
            .map(|r| crate::policy::decode_device_state(&r.engine_state).unwrap())
    };
    let lender = written(&l).expect("the lender's record is in the loan's step");
    assert_eq!(lender.lent.len(), 1, "{:?}", lender.lent);
    let borrower = written(&b).expect("the borrower's record is in the loan's step");
    assert_eq!(borrower.borrowed.len(), 1);
}
