//! Seed 002's credit market end to end through the real allocator
//! (embedded broker, embedded file store): a device short of a data unit
//! buys one from a peer of its tenant's pool in the tick, the accounts show
//! in `GET /v1/credits`, `GET /v1/devices/{id}` and `shardctl credits` /
//! `shardctl device`, and they survive a crash and restart of the service.

mod service_common;

use service_common::*;
use shardline_shared::msg::Presence;
use std::time::{Duration, Instant};

/// Free borrowing and shifting off, so the unit has to be bought; the
/// market runs at every tick of the test allocator.
const MARKET_ONLY: &str = "[policy.engine.features]
borrowing = false
shifting = false
market = true
[policy.engine.market]
interval_ms = 100
";

fn credits_of(alloc: &Allocator, tenant: &str) -> Vec<serde_json::Value> {
    let (status, v) = alloc.api("GET", &format!("/v1/credits?tenant={tenant}"), None);
    assert_eq!(status, 200, "{v}");
    v.as_array().cloned().unwrap_or_default()
}

fn row<'a>(rows: &'a [serde_json::Value], device: &str) -> &'a serde_json::Value {
    rows.iter()
        .find(|r| r["device"] == device)
        .unwrap_or_else(|| panic!("no account of {device}: {rows:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_unit_bought_in_the_market_shows_in_shardctl_and_survives_a_restart() {
    let dir = TempDir::new("market");
    let mut alloc = Allocator::start(&dir.0, BrokerMode::Embedded, MARKET_ONLY);
    let key = device_key(5);
    // The seller: a premium device (6 data units) of tenant t with no demand.
    let seller_key = device_key(6);
    for (id, k, tier) in [
        ("buyer-1", &key, "standard"),
        ("seller-1", &seller_key, "premium"),
    ] {
        let out = alloc.shardctl(&[
            "enroll",
            id,
            &hex::encode(k.public_key()),
            "--tier",
            tier,
            "--tenant",
            "t",
        ]);
        assert!(out.status.success(), "shardctl enroll {id}: {out:?}");
    }
    // The buyer's vpn is configured, so vpn + qos (4 data units) is what
    // it wants against its 3.
    for args in [
        &["config", "set", "buyer-1", "vpn-tunnel", "role=initiator"][..],
        &[
            "config",
            "set",
            "buyer-1",
            "vpn-tunnel",
            "bind=127.0.0.1:41011",
        ],
        &[
            "config",
            "set",
            "buyer-1",
            "vpn-tunnel",
            "peer=127.0.0.1:41012",
        ],
        &[
            "config",
            "set",
            "buyer-1",
            "auth-psk",
            "--secret",
            "psk=5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d5d",
        ],
    ] {
        let out = alloc.shardctl(args);
        assert!(out.status.success(), "shardctl {args:?}: {out:?}");
    }
    let mut dev = Device::connect("buyer-1", key, alloc.mqtt_port).await;
    dev.publish_status(Presence::Online).await;
    dev.send_report().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let rows = loop {
        let rows = credits_of(&alloc, "t");
        if rows.len() == 2 && row(&rows, "buyer-1")["bought_milli"].as_u64() > Some(0) {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "no trade: {rows:?}\n{}",
            alloc.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (buyer, seller) = (
        row(&rows, "buyer-1").clone(),
        row(&rows, "seller-1").clone(),
    );
    // One bid, spare units left over: the sellers' reserve, 1 credit.
    assert_eq!(buyer["balance_milli"], 19_000, "{buyer}");
    assert_eq!(seller["balance_milli"], 21_000, "{seller}");
    assert_eq!(buyer["market_units"], serde_json::json!([0, 1]));
    assert_eq!(seller["sold_units"], serde_json::json!([0, 1]));
    // A payment is written with the next commit, not lazily like the rest
    // of the engine state (`engine_flush_ms`, 5 s): killed just after the
    // trade, the allocator comes back with both sides of it, not with the
    // buyer's debit (its instruction made it durable) and without the
    // seller's credit.
    tokio::time::sleep(Duration::from_millis(300)).await;
    alloc.kill9();
    alloc.spawn();
    let rows = credits_of(&alloc, "t");
    assert_eq!(row(&rows, "buyer-1")["balance_milli"], 19_000, "{rows:?}");
    assert_eq!(row(&rows, "seller-1")["balance_milli"], 21_000, "{rows:?}");
    let text = buyer["last"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        text.starts_with("bought 1 data unit(s) from seller-1 at 1 credits/unit: clearing price of tenant t's pool at tick "),
        "{text}"
    );
    // Every tenant without the filter; another tenant has none.
    let (status, all) = alloc.api("GET", "/v1/credits", None);
    assert_eq!(status, 200);
    assert!(all.as_array().is_some_and(|a| a.len() >= 2), "{all}");
    assert!(credits_of(&alloc, "nobody").is_empty());
    let (status, _) = alloc.api("GET", "/v1/credits?bogus=1", None);
    assert_eq!(status, 400);
    // The device view carries the account.
    let (status, d) = alloc.api("GET", "/v1/devices/buyer-1", None);
    assert_eq!(status, 200);
    assert_eq!(d["policy"]["credits"]["balance_milli"], 19_000, "{d}");
    // shardctl, in words.
    let out = alloc.shardctl(&["credits", "--tenant", "t"]);
    assert!(out.status.success(), "{out:?}");
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        shown.contains("buyer-1") && shown.contains("19") && shown.contains(&text),
        "{shown}"
    );
    let out = alloc.shardctl(&["device", "buyer-1"]);
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        shown.contains("credits 19  (earned 0 sold 0 bought 1)"),
        "{shown}"
    );
    // Engine state is written lazily (at most `engine_flush_ms`, 5 s, after
    // a change): past that, a crash loses nothing.
    tokio::time::sleep(Duration::from_secs(6)).await;
    alloc.kill9();
    alloc.spawn();
    let rows = credits_of(&alloc, "t");
    assert_eq!(row(&rows, "buyer-1")["balance_milli"], 19_000, "{rows:?}");
    assert_eq!(row(&rows, "seller-1")["balance_milli"], 21_000, "{rows:?}");
    assert_eq!(
        row(&rows, "buyer-1")["market_units"],
        serde_json::json!([0, 1])
    );
    assert_eq!(row(&rows, "buyer-1")["last"]["text"], text.as_str());
    let out = alloc.shardctl(&["credits"]);
    let shown = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        shown.contains("seller-1") && shown.contains("21"),
        "{shown}"
    );
}
