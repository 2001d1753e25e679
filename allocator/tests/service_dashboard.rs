//! The dashboard's routes on a real allocator process: the static page is
//! served without a token (it carries no data) while the fleet summary, the
//! paged device list and the live event stream need it; the paged list
//! filters on the server and the unpaged one answers as before; an accepted
//! report reaches a live client as a `report` event naming its device,
//! after its commit.

mod service_common;

use service_common::*;
use shardline_allocator::service::http;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn enrol(alloc: &Allocator, id: &str, n: u8, tier: &str) {
    let (st, body) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": id, "public_key": hex::encode(device_key(n).public_key()), "tier": tier, "tenant": "acme"})),
    );
    assert_eq!(st, 200, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_open_its_data_needs_the_token_and_events_follow_commits() {
    let dir = TempDir::new("dashboard");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let open = |path: &str| http::request(&alloc.api_url(), "GET", path, None, None).unwrap();
    let page = open("/ui/");
    assert_eq!(page.status, 200);
    assert!(
        page.body.contains("<script src=\"app.js\">"),
        "{}",
        page.body
    );
    assert_eq!(open("/ui/app.js").status, 200);
    assert_eq!(open("/").status, 303, "/ redirects to /ui/");
    assert_eq!(open("/ui/nothing-here").status, 404);
    for data in ["/v1/fleet", "/v1/events", "/v1/devices?limit=5"] {
        assert_eq!(open(data).status, 401, "{data} needs the token");
    }

    for (i, id) in ["gw-a1", "gw-a2", "gw-b1"].iter().enumerate() {
        enrol(
            &alloc,
            id,
            i as u8,
            if i < 2 { "standard" } else { "basic" },
        );
    }
    // Unpaged: the array shardctl reads, as before.
    let (st, all) = alloc.api("GET", "/v1/devices", None);
    assert_eq!(st, 200);
    assert_eq!(all.as_array().map(Vec::len), Some(3), "{all}");
    let (st, p) = alloc.api("GET", "/v1/devices?limit=2&q=gw-a", None);
    assert_eq!(st, 200, "{p}");
    assert_eq!(p["total"], 2);
    assert_eq!(p["devices"][0]["device"], "gw-a1");
    let (_, p) = alloc.api(
        "GET",
        "/v1/devices?offset=1&limit=1&tier=standard&tenant=acme",
        None,
    );
    assert_eq!(
        (p["total"].as_u64(), p["devices"][0]["device"].as_str()),
        (Some(2), Some("gw-a2"))
    );
    assert_eq!(alloc.api("GET", "/v1/devices?limit=0", None).0, 400);
    assert_eq!(alloc.api("GET", "/v1/devices?bogus=1", None).0, 400);
    let (st, f) = alloc.api("GET", "/v1/fleet", None);
    assert_eq!(st, 200, "{f}");
    assert_eq!(f["devices"], 3);
    assert_eq!(f["presence"]["unknown"], 3);
    assert_eq!(f["reputation_histogram"].as_array().map(Vec::len), Some(10));

    // A live client, then a report: the client sees it, named.
    let mut sse = TcpStream::connect(("127.0.0.1", alloc.api_port)).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    write!(
        sse,
        "GET /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        alloc.token
    )
    .unwrap();
    let mut seen = String::new();
    let mut read_until = |needle: &str, seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(15);
        let mut buf = [0u8; 4096];
        while !seen.contains(needle) && Instant::now() < deadline {
            if let Ok(n) = sse.read(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
        seen.contains(needle)
    };
    assert!(read_until("event: hello", &mut seen), "{seen}");
    assert!(seen.contains("text/event-stream"), "{seen}");
    let mut dev = Device::connect("gw-a1", device_key(0), alloc.mqtt_port).await;
    dev.send_report().await;
    assert!(
        read_until("event: report", &mut seen),
        "no report event: {seen}\n{}",
        alloc.log()
    );
    assert!(seen.contains(r#""device":"gw-a1""#), "{seen}");
    let (_, f) = alloc.api("GET", "/v1/fleet", None);
    assert_eq!(f["presence"]["online"], 1, "{f}");
    assert!(alloc.metric("shardline_live_clients") >= 1.0);
}
