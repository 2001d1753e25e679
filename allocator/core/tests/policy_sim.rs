//! The fleet simulation as a test: 1,000 devices over one simulated day
//! (diurnal demand, spikes, 5 % misbehaving devices). Misbehaving devices
//! must lose quota within a bounded number of ticks, well-behaved demand must
//! be served, and the full policy must serve more demand per resource unit
//! than a static tier-only allocation. The figures are printed
//! (`--nocapture`); `shardline-allocator simulate` prints the same at 5-minute ticks.

use shardline_allocator_core::policy::simulate::{run_all, SimParams};

#[test]
fn one_day_of_a_thousand_devices() {
    let params = SimParams {
        devices: 1000,
        hours: 24,
        seed: 1,
        // Coarser than the CLI's 5 minutes to keep the debug test fast.
        tick_ms: 10 * 60_000,
        misbehaving_permille: 50,
    };
    let started = std::time::Instant::now();
    let report = run_all(&params).expect("simulation runs");
    print!("{}", report.table());
    println!("(simulated in {:.1} s)", started.elapsed().as_secs_f64());
    let full = report.variant("full").unwrap();
    let reactive = report.variant("reactive").unwrap();
    let stat = report.variant("static").unwrap();

    // Misbehaving devices: every one is caught, within 3 ticks of its first
    // misbehaving report, and ends with (almost) nothing.
    assert!(full.misbehaving_devices >= 30, "{full:?}");
    assert_eq!(
        full.misbehaving_active, full.misbehaving_devices,
        "all got to misbehave"
    );
    assert_eq!(full.misbehaving_lost_quota, full.misbehaving_active);
    assert!(full.reaction_ticks_max <= 3, "{full:?}");
    assert!(full.misbehaving_mean_units_end < 1.0, "{full:?}");

    // Well-behaved demand is served.
    assert!(full.well_behaved_served_fraction >= 0.90, "{full:?}");
    assert!(full.served_fraction > reactive.served_fraction);

    // Demand served per resource unit beats the static tier-only allocation,
    // and the full policy serves more in total too.
    assert!(
        full.served_mbit_per_unit_hour > 1.5 * stat.served_mbit_per_unit_hour,
        "{full:?} vs {stat:?}"
    );
    assert!(full.served_mbit > stat.served_mbit);

    // Hysteresis keeps flapping rare: well under one flap per device per day.
    assert!(
        full.flaps_well_behaved < u64::from(params.devices) / 2,
        "{full:?}"
    );

    // Same seed, same figures.
    let again = run_all(&SimParams {
        devices: 50,
        hours: 6,
        ..params.clone()
    })
    .unwrap();
    let again2 = run_all(&SimParams {
        devices: 50,
        hours: 6,
        ..params
    })
    .unwrap();
    assert_eq!(again.variants, again2.variants);
}
