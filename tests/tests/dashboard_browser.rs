//! The operator dashboard in a real browser: Debian's `chromium`, headless,
//! driven through `chromedriver` (W3C WebDriver, xtask's std-only client),
//! against a real allocator with three real agents replaying captures (one
//! with bank then game traffic, so it gets `vpn` then `qos` with decisions
//! and explanations; two quiet ones in another tier and tenant).
//!
//! Each page must render real data (the device ids, a chart's SVG, a
//! decision's explanation as the API gives it), an operator action made by
//! clicking on the device page must take effect (checked through the JSON
//! API), and a screenshot of each page is kept under
//! `target/<profile>/screenshots/dashboard/`.
//!
//! Without chromium the test fails when root (`cargo xtask test` installs
//! it as root) and says loudly that it skipped otherwise.

use shardline_tests::kit::json::Json;
use shardline_tests::kit::pcap::{self, Phase};
use shardline_tests::kit::proc::{Proc, TempDir};
use shardline_tests::kit::stack::{Capture, LoopConfig, Stack};
use shardline_tests::kit::webdriver::{self, Browser};
use shardline_tests::{bins, is_root, profile_dir, wait_until, workspace_root};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const MAIN: &str = "dash-a";
const QUIET: [&str; 2] = ["dash-b", "dash-c"];

fn logs(st: &Stack, extra: &[Proc]) -> String {
    let mut out = format!(
        "---- allocator log ----\n{}\n---- agent {MAIN} log ----\n{}",
        st.allocator.log_tail(30),
        st.agent
            .as_ref()
            .map(|a| a.log_tail(30))
            .unwrap_or_default()
    );
    for p in extra {
        out.push_str(&format!("\n---- quiet agent log ----\n{}", p.log_tail(10)));
    }
    out
}

fn device_json(st: &Stack, device: &str) -> Option<Json> {
    let text = st.shardctl(&["--json", "device", device]).ok()?;
    Json::parse(&text).ok()
}

fn write_pcap(path: &Path, phases: &[Phase]) {
    std::fs::write(
        path,
        pcap::write_pcap(&pcap::scenario(phases, 1_700_000_000_000_000_000)),
    )
    .expect("write pcap");
}

/// A second agent on the same allocator: its own id, key, state, socket
/// and capture; enrolled by the operator in `tier` for `tenant`.
fn start_quiet_agent(st: &Stack, device: &str, tier: &str, tenant: &str, pcap: &Path) -> Proc {
    let dir = st.dir.join(device);
    std::fs::create_dir_all(&dir).expect("agent dir");
    let main = std::fs::read_to_string(st.agent_config()).expect("main agent config");
    let d = st.dir.display().to_string();
    let mut conf = String::new();
    for line in main.lines() {
        let l = line.trim_start();
        let new = if l.starts_with("id = ") {
            format!("id = \"{device}\"")
        } else if l.starts_with("key_file = ") {
            format!("key_file = \"{}/device.key\"", dir.display())
        } else if l.starts_with("pcap = ") {
            format!("pcap = \"{}\"", pcap.display())
        } else if l.starts_with("socket = ") {
            format!("socket = \"{}/agent.sock\"", dir.display())
        } else if l == format!("dir = \"{d}/agent-state\"") {
            format!("dir = \"{}/agent-state\"", dir.display())
        } else {
            line.to_owned()
        };
        conf.push_str(&new);
        conf.push('\n');
    }
    let path = dir.join("agent.toml");
    std::fs::write(&path, conf).expect("write agent config");
    let out = Command::new(&st.bins.agent)
        .args(["check-config", "--print-pubkey", "--config"])
        .arg(&path)
        .output()
        .expect("agent check-config");
    assert!(out.status.success(), "check-config: {out:?}");
    let key = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    st.shardctl(&["enroll", device, &key, "--tier", tier, "--tenant", tenant])
        .unwrap_or_else(|e| panic!("enrol {device}: {e}"));
    let mut cmd = Command::new(&st.bins.agent);
    cmd.arg("run")
        .arg("--config")
        .arg(&path)
        .env("SHARDLINE_LOG", "info")
        .env_remove("NOTIFY_SOCKET");
    Proc::spawn(device, cmd, &dir.join("agent.log")).expect("start agent")
}

fn screenshots_dir() -> PathBuf {
    profile_dir().join("screenshots").join("dashboard")
}

fn shot(b: &Browser, name: &str) {
    let path = screenshots_dir().join(format!("{name}.png"));
    let bytes = b
        .screenshot(&path)
        .unwrap_or_else(|e| panic!("screenshot {name}: {e}"));
    assert!(bytes > 5_000, "{name}: a {bytes}-byte screenshot is blank");
    println!("screenshot: {} ({bytes} bytes)", path.display());
}

/// A JavaScript expression: the text of the element `css` selects ("" when absent).
fn text_expr(css: &str) -> String {
    format!(
        "((document.querySelector({}) || {{}}).innerText || '')",
        webdriver::json_str(css)
    )
}

/// A script returning that text.
fn text_of(css: &str) -> String {
    format!("return {};", text_expr(css))
}

/// A script returning that text once it no longer says "Loading".
fn loaded_text_of(css: &str) -> String {
    format!(
        "const t = {}; return t.includes('Loading') ? '' : t;",
        text_expr(css)
    )
}

#[test]
fn the_dashboard_shows_the_fleet_a_device_the_catalog_and_the_audit_log_and_acts() {
    if let Some(why) = webdriver::missing() {
        if is_root() {
            panic!("the dashboard browser test needs chromium: {why}");
        }
        eprintln!("SKIP the dashboard browser test: {why}; not root, so not installed here");
        println!("SKIP the dashboard browser test: {why}");
        return;
    }
    let bins = bins();
    let tmp = TempDir::new("sl-dashboard").expect("temp dir");
    let traffic = tmp.path.join("traffic.pcap");
    write_pcap(
        &traffic,
        &[
            Phase::Quiet(Duration::from_secs(1)),
            Phase::Banking(Duration::from_secs(6)),
            Phase::Gaming(Duration::from_secs(240)),
            Phase::Quiet(Duration::from_secs(600)),
        ],
    );
    let quiet = tmp.path.join("quiet.pcap");
    write_pcap(&quiet, &[Phase::Quiet(Duration::from_secs(600))]);
    let mut cfg = LoopConfig::demo(Capture::Pcap(traffic));
    cfg.device = MAIN.into();
    cfg.hysteresis_ms = 2_000;
    let mut st = Stack::prepare(&workspace_root(), &bins, &tmp.path, cfg)
        .unwrap_or_else(|e| panic!("setting up the loop: {e}"));
    st.start_agent().expect("start the agent");
    let mut quiet_agents: Vec<Proc> = QUIET
        .iter()
        .map(|d| start_quiet_agent(&st, d, "standard", "acme", &quiet))
        .collect();

    // Real data first: the bank session's decision (vpn), QoS classes in
    // the main device's reports, and every agent reporting.
    let ready = wait_until(Duration::from_secs(60), Duration::from_millis(250), || {
        st.check_alive().ok()?;
        for a in quiet_agents.iter_mut() {
            if a.exited().is_some() {
                return None;
            }
        }
        let main = device_json(&st, MAIN)?;
        let p = main.get("policy");
        let decisions = p.get("decisions").items().len();
        let classes = p.get("last_qos").get("classes").items().len();
        let quiet_ok = QUIET.iter().all(|d| {
            device_json(&st, d).is_some_and(|j| j.get("last_report_ms").as_u64().is_some())
        });
        (decisions >= 1 && classes >= 1 && quiet_ok).then_some(())
    });
    assert!(
        ready.is_some(),
        "the loop did not reach a decision, QoS classes reported and every agent reporting\n{}",
        logs(&st, &quiet_agents)
    );
    // The page is driven by an operator of her own (role operator), so
    // her name must reach the decisions and the audit log.
    let created = st
        .shardctl(&[
            "--json",
            "operators",
            "create",
            "--name",
            "alice",
            "--role",
            "operator",
        ])
        .unwrap_or_else(|e| panic!("shardctl operators create: {e}"));
    let token = Json::parse(&created)
        .unwrap_or_else(|e| panic!("operators create output {created:?}: {e}"))
        .get("token")
        .as_str()
        .expect("the new token is printed once")
        .to_owned();

    let browser = Browser::start(&tmp.path.join("chromedriver.log"), 1400, 1800)
        .unwrap_or_else(|e| panic!("starting chromium: {e}"));
    let fail = |what: &str, e: String| -> ! {
        let page = browser
            .eval("return document.getElementById('main').innerText;")
            .ok()
            .and_then(|t| t.as_str().map(str::to_owned))
            .unwrap_or_default();
        let _ = browser.screenshot(&screenshots_dir().join("failure.png"));
        panic!(
            "{what}: {e}\n---- page ----\n{page}\n---- chromedriver ----\n{}\n{}",
            browser.log_tail(10),
            logs(&st, &quiet_agents)
        )
    };
    let wait = |what: &str, script: &str| -> Json {
        browser
            .wait_for(what, script, Duration::from_secs(20))
            .unwrap_or_else(|e| fail(what, e))
    };

    // 1. Fleet: the summary, the histogram and every device in the table.
    browser
        .goto(&format!("{}/ui/#token={token}", st.api))
        .unwrap_or_else(|e| fail("open the dashboard", e));
    wait(
        "the fleet summary counts three devices",
        &format!("return {}.trim() === '3';", text_expr("#card-devices .v")),
    );
    let table = wait(
        "the device table lists the three devices",
        &format!(
            "const t = {}; return [{}].every(d => t.includes(d)) ? t : '';",
            text_expr("#devices-table"),
            [MAIN, QUIET[0], QUIET[1]]
                .iter()
                .map(|d| format!("'{d}'"))
                .collect::<Vec<_>>()
                .join(",")
        ),
    );
    assert!(
        table
            .as_str()
            .is_some_and(|t| t.contains("standard") && t.contains("acme")),
        "tiers and tenants shown: {table:?}"
    );
    let bars = wait(
        "the reputation histogram is drawn",
        "return document.querySelectorAll('#reputation-histogram rect.bar').length;",
    );
    assert_eq!(bars.as_u64(), Some(10), "ten reputation buckets");
    let tenants = wait("units per tenant", &text_of("#fleet-tenants"));
    assert!(
        tenants.as_str().is_some_and(|t| t.contains("acme")),
        "{tenants:?}"
    );
    wait(
        "live updates connected (SSE through fetch with the token)",
        "return document.getElementById('live').className.includes('on');",
    );
    wait(
        "the fleet page marked itself rendered",
        "return performance.getEntriesByName('fleet:rendered').length;",
    );
    shot(&browser, "fleet");

    // Server-side search: one device matches.
    browser
        .eval(&format!(
            "const q = document.getElementById('fleet-q'); q.value = '{}'; q.dispatchEvent(new Event('input')); return true;",
            QUIET[0]
        ))
        .unwrap_or_else(|e| fail("type a search", e));
    wait(
        "the search leaves one row",
        &format!(
            "const rows = document.querySelectorAll('#devices-table tbody tr'); \
             return rows.length === 1 && rows[0].dataset.device === '{}';",
            QUIET[0]
        ),
    );
    let range = wait("the page range", &text_of("#fleet-range"));
    assert_eq!(range.as_str(), Some("1–1 of 1"));

    // 2. The device page: QoS charts, leases, decisions with their words.
    browser
        .goto(&format!("{}/ui/#/device/{MAIN}", st.api))
        .unwrap_or_else(|e| fail("open the device page", e));
    wait(
        "a QoS chart with a drawn series",
        "return document.querySelectorAll('#dev-qos svg.qos-chart polyline, #dev-qos svg.qos-chart circle').length;",
    );
    let reputation = wait("reputation changes", &text_of("#dev-rep"));
    assert!(reputation.as_str().is_some(), "{reputation:?}");
    let instr = wait("instructions", &text_of("#dev-instr"));
    assert!(
        instr.as_str().is_some_and(|t| t.contains("sent ")),
        "{instr:?}"
    );
    let diag = wait("the diagnostics panel", &loaded_text_of("#dev-diag"));
    assert!(diag.as_str().is_some(), "{diag:?}");

    // 3. Operator actions through the page: pin a shard, drain; the JSON
    // API shows both.
    wait(
        "the shard list of the actions",
        "return document.querySelectorAll('#act-shard option').length > 1;",
    );
    browser
        .eval("document.getElementById('act-shard').value = 'qos-dscp'; return true;")
        .unwrap_or_else(|e| fail("choose a shard", e));
    browser
        .click("#act-pin")
        .unwrap_or_else(|e| fail("click pin", e));
    wait("pin answered", &text_of("#msg-ok"));
    // The pin takes effect: qos is leased (and said why), in the API...
    let leased = wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        let j = device_json(&st, MAIN)?;
        let p = j.get("policy");
        let qos = p
            .get("leases")
            .items()
            .iter()
            .any(|l| l.get("capability").as_str() == Some("qos"));
        let why = p
            .get("decisions")
            .items()
            .iter()
            .filter_map(|d| d.get("explanation").as_str())
            .find(|e| e.contains("qos-dscp pinned by alice"))
            .map(str::to_owned);
        why.filter(|_| qos)
    });
    let explanation = leased.unwrap_or_else(|| {
        fail(
            "after clicking pin the API shows qos leased and the pin's decision",
            format!(
                "{:?}",
                device_json(&st, MAIN).map(|j| j.get("policy").clone())
            ),
        )
    });
    // ... and on the page: the lease on the timeline, the decision in words.
    wait(
        "the lease timeline shows the qos lease",
        "return document.querySelectorAll('#lease-timeline rect.lease').length > 0 \
         && document.getElementById('leases-table').innerText.includes('qos');",
    );
    wait(
        "the decision's explanation, as the API gives it",
        &format!(
            "return {}.includes({});",
            text_expr("#decisions-table"),
            webdriver::json_str(&explanation)
        ),
    );
    let instructions = wait(
        "the instruction history shows an applied instruction",
        &format!(
            "const t = {}; return t.includes('applied') ? t : '';",
            text_expr("#instructions-table")
        ),
    );
    assert!(
        instructions
            .as_str()
            .is_some_and(|t| t.contains("activate ")),
        "the sent entries list their operations: {instructions:?}"
    );
    // Remote diagnostics through the page: the agent's real log lines.
    browser
        .click("#diag-ask")
        .unwrap_or_else(|e| fail("click ask for diagnostics", e));
    let diag_log = browser
        .wait_for(
            "the device's own log lines on its page",
            &format!(
                "const t = {}; return t.includes('connected to the broker') ? t : '';",
                text_expr("#diag-log")
            ),
            Duration::from_secs(40),
        )
        .unwrap_or_else(|e| fail("diagnostics answered", e));
    assert!(diag_log.as_str().is_some(), "{diag_log:?}");
    shot(&browser, "device");
    browser
        .click("#act-drain")
        .unwrap_or_else(|e| fail("click drain", e));
    wait(
        "drain answered",
        "const m = document.getElementById('msg-ok'); return m && m.innerText.startsWith('drain');",
    );
    let after = wait_until(Duration::from_secs(10), Duration::from_millis(200), || {
        let j = device_json(&st, MAIN)?;
        let p = j.get("policy");
        let pinned = p
            .get("pinned")
            .items()
            .iter()
            .any(|s| s.as_str() == Some("qos-dscp"));
        (pinned && matches!(p.get("drained"), Json::Bool(true))).then_some(())
    });
    assert!(
        after.is_some(),
        "after clicking pin and drain the API shows the device drained with qos-dscp pinned: {:?}",
        device_json(&st, MAIN).map(|j| j.get("policy").clone())
    );
    wait(
        "the page shows the device drained",
        "return document.getElementById('dev-head').innerText.includes('drained');",
    );

    // 4. Catalog: every shard with its digest.
    browser
        .goto(&format!("{}/ui/#/catalog", st.api))
        .unwrap_or_else(|e| fail("open the catalog page", e));
    let catalog = wait("the catalog table", &text_of("#catalog-table"));
    for shard in ["vpn-tunnel", "auth-psk", "qos-shaper", "qos-dscp"] {
        assert!(
            catalog.as_str().is_some_and(|t| t.contains(shard)),
            "{shard} in {catalog:?}"
        );
    }
    assert!(
        catalog.as_str().is_some_and(|t| t.contains("any: ")),
        "digests shown: {catalog:?}"
    );
    let rollouts = wait(
        "the rollout panel answered",
        &loaded_text_of("#cat-rollouts"),
    );
    assert!(
        rollouts.as_str().is_some_and(|t| t.contains("No rollout")),
        "no catalog change, no rollout: {rollouts:?}"
    );
    shot(&browser, "catalog");

    // 5. Audit log: the page's own actions, by the operator who made them.
    browser
        .goto(&format!("{}/ui/#/audit", st.api))
        .unwrap_or_else(|e| fail("open the audit page", e));
    let audit = wait(
        "the audit list shows alice's drain",
        &format!(
            "const t = {}; return t.includes('drain') && t.includes('alice') ? t : '';",
            text_expr("#audit-list")
        ),
    );
    assert!(
        audit.as_str().is_some_and(|t| t.contains("pin")),
        "{audit:?}"
    );
    shot(&browser, "audit");
    println!("screenshots in {}", screenshots_dir().display());

    drop(browser);
    for mut a in quiet_agents {
        a.stop(Duration::from_secs(5));
    }
    st.stop();
}
