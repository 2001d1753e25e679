//! The operator dashboard with 10,000 enrolled devices: page weight (the
//! HTML, JavaScript and CSS a browser loads, and the first data answers:
//! the fleet summary and the first page of the device table) and the time
//! to render the fleet page in a real browser (Debian's chromium, headless,
//! through chromedriver): from navigation start to the summary and the
//! table on screen (the page's own `fleet:rendered` performance mark),
//! median of `SL_BENCH_RUNS` fresh page loads. Target: under 1 s.
//!
//! Devices are enrolled straight into the store the allocator then opens
//! (as `service_e2e` does), spread over the three tiers and ten tenants.
//! They have not reported, so every one is "not seen yet"; the page's work
//! is the same.
//!
//! `cargo bench -p shardline-allocator --bench dashboard`
//! (`SL_BENCH_DEVICES`, `SL_BENCH_RUNS` override the sizes;
//! `SL_BENCH_NO_WRITE=1` prints the rows without writing BENCHMARKS.md).

mod common;
use common::{
    device_key, env_or, free_port, machine, median, now_ms, put_section, start_allocator,
};

use shardline_allocator::service::http;
use shardline_allocator::service::store::{Batch, DeviceRecord, RedbStore, Store};
use shardline_shared::DeviceId;
use std::path::PathBuf;
use std::time::Duration;
use xtask::kit::webdriver::{self, Browser};

const TIERS: [&str; 3] = ["basic", "standard", "premium"];

fn main() {
    let devices = env_or("SL_BENCH_DEVICES", 10_000);
    let runs = env_or("SL_BENCH_RUNS", 7);
    if let Some(why) = webdriver::missing() {
        // Loud: a bench that cannot measure says so and fails.
        eprintln!("dashboard bench: cannot run: {why}");
        std::process::exit(2);
    }
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    let dir =
        std::env::temp_dir().join(format!("sl-bench-dash-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = shardline_allocator::service::keys::generate().unwrap();
    shardline_allocator::service::keys::write_secret(&dir.join("signing.key"), &key).unwrap();
    {
        let store = RedbStore::open(&dir.join("allocator.redb")).unwrap();
        let batch = Batch {
            put_devices: (0..devices)
                .map(|i| {
                    let mut r = DeviceRecord::new(
                        DeviceId::new(format!("gw-{i:05}")).unwrap(),
                        device_key(9, i).public_key(),
                        TIERS[i % TIERS.len()].into(),
                        Some(format!("tenant-{}", i % 10)),
                        now_ms(),
                    );
                    r.version = 1;
                    r
                })
                .collect(),
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
    }
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_shardline-allocator"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (alloc, api) = rt.block_on(start_allocator(&bin, &dir, "", free_port(), free_port()));
    let token = std::fs::read_to_string(dir.join("api-token"))
        .unwrap()
        .trim()
        .to_owned();

    // Page weight: what the browser loads, as served.
    let get = |path: &str, auth: bool| -> usize {
        let r = http::request(&api, "GET", path, auth.then_some(token.as_str()), None)
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        r.body.len()
    };
    let assets: Vec<(&str, usize)> = ["/ui/", "/ui/app.js", "/ui/app.css"]
        .iter()
        .map(|p| (*p, get(p, false)))
        .collect();
    let assets_total: usize = assets.iter().map(|(_, n)| n).sum();
    let fleet_bytes = get("/v1/fleet", true);
    let page_bytes = get("/v1/devices?offset=0&limit=50", true);

    let browser = Browser::start(&dir.join("chromedriver.log"), 1400, 1000)
        .unwrap_or_else(|e| panic!("starting chromium: {e}"));
    let mut samples = Vec::new();
    // One warm-up load (the browser's own start-up), then the runs.
    for run in 0..=runs {
        browser.goto("about:blank").unwrap();
        browser
            .goto(&format!("{api}/ui/#token={token}"))
            .unwrap_or_else(|e| panic!("open the dashboard: {e}"));
        let v = browser
            .wait_for(
                "the fleet page rendered",
                "const m = performance.getEntriesByName('fleet:rendered')[0]; return m ? m.startTime : null;",
                Duration::from_secs(30),
            )
            .unwrap_or_else(|e| panic!("{e}"));
        let ms = v.as_f64().expect("a time");
        let shown = browser
            .eval(&format!(
                "return document.querySelectorAll('#devices-table tbody tr').length === 50 \
                 && document.querySelector('#card-devices .v').innerText === '{devices}';"
            ))
            .unwrap();
        assert!(
            matches!(shown, xtask::kit::json::Json::Bool(true)),
            "the page shows 50 rows of {devices} devices"
        );
        if run > 0 {
            samples.push(ms);
        }
        println!("dashboard: run {run}: fleet page rendered {ms:.0} ms after navigation start");
    }
    drop(browser);
    drop(alloc);
    let _ = std::fs::remove_dir_all(&dir);
    let mut sorted = samples.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let med = median(samples);
    let verdict = if med < 1000.0 { "meets" } else { "MISSES" };
    let profile = if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    };
    let m = machine(&load);
    let cmd = "`cargo bench -p shardline-allocator --bench dashboard`";
    let rows = [
        format!(
            "| page weight: HTML + JavaScript + CSS, uncompressed | {assets_total} bytes ({}) | {m} | {cmd} | every asset is in the binary (no CDN); served without a token, they carry no data |",
            assets
                .iter()
                .map(|(p, n)| format!("{p} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        format!(
            "| first data answers, {devices} devices | `GET /v1/fleet` {fleet_bytes} bytes, `GET /v1/devices?offset=0&limit=50` {page_bytes} bytes | {m} | {cmd} | JSON, uncompressed; the table is paged on the server |"
        ),
        format!(
            "| fleet page rendered, {devices} enrolled devices | {med:.0} ms (median of {runs}: {}) | {m} | {cmd} | {verdict} < 1 s; headless chromium via chromedriver, fresh page load each run (after `about:blank`), from navigation start to the summary and the first table page on screen (the page's `fleet:rendered` performance mark); {profile} build of the allocator |",
            sorted
                .iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ];
    for r in &rows {
        println!("{r}");
    }
    if std::env::var_os("SL_BENCH_NO_WRITE").is_none() {
        write_section(&rows);
    }
}

fn write_section(rows: &[String]) {
    let mut section = String::from(
        "## Dashboard\n\n\
         Written by `cargo bench -p shardline-allocator --bench dashboard` (allocator/benches/dashboard.rs): the \
         operator page served by the allocator, measured in a real browser.\n\n\
         | what | result | machine | command | notes |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        section.push_str(r);
        section.push('\n');
    }
    put_section("## Dashboard", &section, None);
    println!("dashboard: wrote the \"Dashboard\" section of BENCHMARKS.md");
}
