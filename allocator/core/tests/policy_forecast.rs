//! Forecast quality on generated diurnal series with noise: the one-step
//! error (MAPE) and the coverage of the 95 % prediction interval. The figures
//! are printed (run with `--nocapture`) and go to BENCHMARKS.md.

use shardline_allocator_core::policy::forecast::{ForecastConfig, HoltWinters};
use shardline_allocator_core::policy::prng::SplitMix64;

struct Quality {
    mape: f64,
    coverage: f64,
    n: usize,
}

/// A daily shape (low at night, morning and evening peaks) × level, with
/// multiplicative Gaussian noise of `noise` (relative), sampled per 15-min slot.
fn evaluate(seed: u64, noise: f64, days: u64) -> Quality {
    let cfg = ForecastConfig::default();
    let m = u64::from(cfg.season_slots);
    let mut rng = SplitMix64::new(seed);
    let base = 200.0 + rng.next_f64() * 800.0;
    let mut hw = HoltWinters::new(cfg.season_slots);
    let (mut ape, mut covered, mut n) = (0.0, 0usize, 0usize);
    for t in 0..days * m {
        let h = (t % m) as f64 * 24.0 / m as f64;
        let shape = 0.3
            + 0.7 * (-((h - 9.0) / 2.5).powi(2)).exp()
            + 1.0 * (-((h - 20.0) / 2.0).powi(2)).exp();
        let y = (base * shape * (1.0 + noise * rng.normal())).max(0.0) as f32;
        // Score from day 3 on (two days to learn the season).
        if t >= 2 * m {
            let f = hw.forecast(&cfg, t);
            ape += f64::from(((y - f.mean) / y.max(1.0)).abs());
            if f.lower <= y && y <= f.upper {
                covered += 1;
            }
            n += 1;
        }
        hw.observe(&cfg, t, y);
    }
    Quality {
        mape: ape / n as f64,
        coverage: covered as f64 / n as f64,
        n,
    }
}

#[test]
fn diurnal_forecast_error_and_interval_coverage_are_in_a_sane_band() {
    for noise in [0.05, 0.10, 0.20] {
        let mut mape = 0.0;
        let mut coverage = 0.0;
        let mut n = 0;
        let seeds = 20;
        for seed in 0..seeds {
            let q = evaluate(seed, noise, 14);
            mape += q.mape;
            coverage += q.coverage;
            n += q.n;
        }
        mape /= seeds as f64;
        coverage /= seeds as f64;
        println!(
            "forecast: noise {:>3.0}%  MAPE {:>5.1}%  95%-interval coverage {:>5.1}%  ({} one-step forecasts, 20 series × 12 scored days, 15-min slots)",
            noise * 100.0,
            mape * 100.0,
            coverage * 100.0,
            n
        );
        // The error stays near the noise floor (noise σ ⇒ MAPE ≈ 0.8σ).
        assert!(mape < noise * 1.6 + 0.02, "noise {noise}: MAPE {mape}");
        // A 95 % interval from the running error variance: not too narrow,
        // not uselessly wide.
        assert!(
            (0.85..=0.99).contains(&coverage),
            "noise {noise}: coverage {coverage}"
        );
    }
}

#[test]
fn the_interval_widens_with_the_horizon() {
    let cfg = ForecastConfig::default();
    let mut hw = HoltWinters::new(cfg.season_slots);
    let mut rng = SplitMix64::new(3);
    for t in 0..96 * 4 {
        hw.observe(&cfg, t, 100.0 + 10.0 * rng.normal() as f32);
    }
    let near = hw.forecast(&cfg, 96 * 4);
    let far = hw.forecast(&cfg, 96 * 4 + 8);
    assert!(far.upper - far.mean > near.upper - near.mean);
}
