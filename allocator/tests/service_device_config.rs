//! Issue 15 end to end through the real allocator binary (embedded broker)
//! and the real `shardctl`: per-device configuration is set, shown without
//! its secrets, and `vpn pair` gives two devices their tunnel ends and one
//! pre-shared key, sealed to each of them; the key is never in clear on the
//! broker, in an API answer, in `shardctl` output, in /metrics or the log.

mod service_common;

use service_common::*;
use shardline_shared::msg::{Instruction, Operation, Presence, ShardActivation};
use shardline_shared::seal::open_config;
use std::time::Duration;

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn enrol(alloc: &Allocator, id: &str, n: u8) {
    let out = alloc.shardctl(&[
        "enroll",
        id,
        &hex::encode(device_key(n).public_key()),
        "--tier",
        "standard",
        "--tenant",
        "acme",
    ]);
    assert!(out.status.success(), "enroll {id}: {out:?}");
}

fn activations(instr: &Instruction) -> Vec<ShardActivation> {
    instr
        .ops
        .iter()
        .filter_map(|op| match op {
            Operation::ActivateShard(a) => Some(a.clone()),
            _ => None,
        })
        .collect()
}

/// Instructions until one activates `shard`; with every raw payload seen.
async fn until_activated(
    dev: &mut Device,
    alloc: &Allocator,
    shard: &str,
    raw: &mut Vec<Vec<u8>>,
) -> ShardActivation {
    for _ in 0..10 {
        let (instr, payload) = dev
            .next_instruction(&alloc.public_key, Duration::from_secs(15))
            .await
            .unwrap_or_else(|| panic!("{}: no instruction activating {shard}", dev.id));
        raw.push(payload);
        if let Some(a) = activations(&instr)
            .into_iter()
            .find(|a| a.primary.shard.id() == shard)
        {
            return a;
        }
    }
    panic!("{}: {shard} never activated", dev.id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vpn_pair_seals_one_key_to_each_device_and_never_shows_it() {
    let dir = TempDir::new("device-config");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    enrol(&alloc, "gw-a", 11);
    enrol(&alloc, "gw-b", 12);

    // Before: vpn's keys are missing, and `config show` says which.
    let out = alloc.shardctl(&["--json", "config", "show", "gw-a"]);
    assert!(out.status.success(), "{out:?}");
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        shown["shards"]["auth-psk"]["missing"],
        serde_json::json!(["psk"])
    );

    let mut a = Device::connect("gw-a", device_key(11), alloc.mqtt_port).await;
    let mut b = Device::connect("gw-b", device_key(12), alloc.mqtt_port).await;
    for d in [&mut a, &mut b] {
        d.publish_status(Presence::Online).await;
        d.send_report().await;
    }
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        2.0,
        Duration::from_secs(10),
    );
    // The refusal is visible with the missing key.
    let (status, detail) = alloc.api("GET", "/v1/devices/gw-a", None);
    assert_eq!(status, 200);
    assert_eq!(
        detail["policy"]["refusals"]["vpn"]["missing_device_config"]["key"], "psk",
        "{detail}"
    );

    // A secret given in clear is refused; an unknown shard too.
    let out = alloc.shardctl(&["config", "set", "gw-a", "auth-psk", "psk=00112233"]);
    assert!(!out.status.success());
    assert!(!contains(&out.stderr, b"00112233"), "{out:?}");
    let out = alloc.shardctl(&["config", "set", "gw-a", "no-such", "x=1"]);
    assert!(!out.status.success());

    let out = alloc.shardctl(&[
        "vpn",
        "pair",
        "gw-a",
        "gw-b",
        "--a-endpoint",
        "127.0.0.1:41001",
        "--b-endpoint",
        "127.0.0.1:41002",
    ]);
    assert!(out.status.success(), "vpn pair: {out:?}");

    let mut raw = Vec::new();
    let ta = until_activated(&mut a, &alloc, "vpn-tunnel", &mut raw).await;
    let auth_a = until_activated(&mut a, &alloc, "auth-psk", &mut raw).await;
    let tb = until_activated(&mut b, &alloc, "vpn-tunnel", &mut raw).await;
    let auth_b = until_activated(&mut b, &alloc, "auth-psk", &mut raw).await;
    let ca = String::from_utf8(ta.primary.config.clone()).unwrap();
    let cb = String::from_utf8(tb.primary.config.clone()).unwrap();
    assert!(
        ca.contains("role = initiator")
            && ca.contains("bind = 127.0.0.1:41001")
            && ca.contains("peer = 127.0.0.1:41002"),
        "{ca}"
    );
    assert!(
        cb.contains("role = responder")
            && cb.contains("bind = 127.0.0.1:41002")
            && cb.contains("peer = 127.0.0.1:41001"),
        "{cb}"
    );
    let sa = open_config(
        &device_key(11),
        &a.id,
        &auth_a.primary.shard,
        &auth_a.primary.sealed_config,
    )
    .expect("gw-a opens its box");
    let sb = open_config(
        &device_key(12),
        &b.id,
        &auth_b.primary.shard,
        &auth_b.primary.sealed_config,
    )
    .expect("gw-b opens its box");
    assert_eq!(sa, sb, "one key for the pair");
    assert_ne!(auth_a.primary.sealed_config, auth_b.primary.sealed_config);
    assert!(open_config(
        &device_key(11),
        &b.id,
        &auth_b.primary.shard,
        &auth_b.primary.sealed_config
    )
    .is_err());
    let line = String::from_utf8(sa).unwrap();
    let psk = line.strip_prefix("psk = ").unwrap().trim().to_owned();
    assert_eq!(psk.len(), 64, "a fresh 32-byte key");

    // Nowhere in clear.
    for p in &raw {
        assert!(
            !contains(p, psk.as_bytes()),
            "the key is on the broker in clear"
        );
    }
    let out = alloc.shardctl(&["config", "show", "gw-b"]);
    assert!(out.status.success());
    assert!(!contains(&out.stdout, psk.as_bytes()));
    assert!(
        contains(&out.stdout, b"\"psk\""),
        "the secret's name is shown"
    );
    let (status, body) = alloc.api("GET", "/v1/devices/gw-a/config", None);
    assert_eq!(status, 200);
    assert!(!body.to_string().contains(&psk));
    let (_, detail) = alloc.api("GET", "/v1/devices/gw-a", None);
    assert!(!detail.to_string().contains(&psk));
    let metrics = http_get_metrics(&alloc);
    assert!(!metrics.contains(&psk));
    assert!(!alloc.log().contains(&psk), "the key is in the log");

    // The API: set a secret, GET shows only its name.
    let (status, _) = alloc.api(
        "PUT",
        "/v1/devices/gw-a/config/auth-psk",
        Some(serde_json::json!({ "secret": { "psk": "ab".repeat(32) } })),
    );
    assert_eq!(status, 200);
    let (_, body) = alloc.api("GET", "/v1/devices/gw-a/config", None);
    assert_eq!(
        body["shards"]["auth-psk"]["secret_keys"],
        serde_json::json!(["psk"])
    );
    assert!(!body.to_string().contains(&"ab".repeat(32)));
    // A malformed body with a secret is refused without echoing it.
    let (status, body) = alloc.api(
        "PUT",
        "/v1/devices/gw-a/config/auth-psk",
        Some(serde_json::json!({ "secret": "psk=cdcdcdcdcdcd" })),
    );
    assert_eq!(status, 422, "{body}");
    assert!(!body.to_string().contains("cdcdcdcdcdcd"), "{body}");
    // Without the token: refused before anything.
    let r = shardline_allocator::service::http::request(
        &alloc.api_url(),
        "GET",
        "/v1/devices/gw-a/config",
        None,
        None,
    )
    .unwrap();
    assert_eq!(r.status, 401);
}

fn http_get_metrics(alloc: &Allocator) -> String {
    let (_, v) = alloc.api("GET", "/metrics", None);
    v.to_string()
}

#[test]
fn an_api_listener_on_port_zero_says_which_port_it_got() {
    use std::io::{BufRead, BufReader};
    let dir = TempDir::new("api-port-0");
    let key = dir.0.join("signing.key");
    keygen(&key);
    let cat = manifest_dir().join("catalog");
    let cfg = dir.0.join("allocator.toml");
    std::fs::write(
        &cfg,
        format!(
            "[broker]\nlisten = \"127.0.0.1:{mqtt}\"\n[store]\npath = \"{d}/a.redb\"\n[signer]\nkey_file = \"{k}\"\n\
             [api]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"{d}/api-token\"\n\
             [policy]\ncatalog = \"{c}/catalog.toml\"\nagreements = \"{c}/tiers.toml\"\n",
            mqtt = free_port(),
            d = dir.0.display(),
            k = key.display(),
            c = cat.display(),
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_shardline-allocator"))
        .arg("run")
        .arg("--config")
        .arg(&cfg)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut got = None;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) {
        if let Some(addr) = line.strip_prefix("admin API listening on ") {
            got = Some(addr.parse::<std::net::SocketAddr>().unwrap());
            break;
        }
    }
    let addr = got.expect("the bound API address is printed");
    assert_ne!(addr.port(), 0);
    let r = shardline_allocator::service::http::request(
        &format!("http://{addr}"),
        "GET",
        "/v1/health",
        None,
        None,
    )
    .unwrap();
    assert_eq!(r.status, 200, "the printed port answers");
    child.kill().unwrap();
    child.wait().unwrap();
}
