//! The admin API and the command line against hostile or careless input
//! (issue 14, "also found"), on a real allocator process: the token is
//! checked before anything else about a request; enrolment refuses unusable
//! keys and keys another device holds; an unknown name is not echoed back
//! in full; `POST /v1/rotate` never says anything about files outside the
//! signing key's directory; a broken configuration exits 78 (EX_CONFIG, which
//! the unit does not restart into) and `check-config` finds it first.

mod service_common;

use service_common::*;
use shardline_allocator::service::http;
use std::process::Command;

fn status(alloc: &Allocator, method: &str, path: &str, body: Option<&serde_json::Value>) -> u16 {
    http::request(&alloc.api_url(), method, path, None, body)
        .unwrap()
        .status
}

#[test]
fn the_token_is_checked_before_anything_else() {
    let dir = TempDir::new("token-first");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let junk = serde_json::json!({"nonsense": true});
    // Without the token: 401 whatever the route, body or id.
    assert_eq!(status(&alloc, "POST", "/v1/devices", Some(&junk)), 401);
    assert_eq!(status(&alloc, "GET", "/v1/no-such-route", None), 401);
    assert_eq!(status(&alloc, "POST", "/v1/devices/x/bogus-op", None), 401);
    assert_eq!(status(&alloc, "GET", "/v1/devices/bad%20id", None), 401);
    assert_eq!(status(&alloc, "POST", "/v1/rotate", Some(&junk)), 401);
    // The health probe stays open.
    assert_eq!(status(&alloc, "GET", "/v1/health", None), 200);
    // With it, the same requests get their real answers.
    assert_eq!(alloc.api("POST", "/v1/devices", Some(junk)).0, 400);
    assert_eq!(alloc.api("GET", "/v1/no-such-route", None).0, 404);
}

#[test]
fn enrolment_refuses_unusable_and_borrowed_keys() {
    let dir = TempDir::new("enrol-keys");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    // The identity point: small order, can never verify anything.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let (st, body) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "weak", "public_key": hex::encode(identity), "tier": "basic"})),
    );
    assert_eq!(st, 400, "{body}");
    assert!(body.to_string().contains("usable"), "{body}");
    let k = device_key(5);
    let enrol = |id: &str| {
        alloc.api(
            "POST",
            "/v1/devices",
            Some(serde_json::json!({"device": id, "public_key": hex::encode(k.public_key()), "tier": "basic"})),
        )
    };
    assert_eq!(enrol("first").0, 200);
    let (st, body) = enrol("second");
    assert_eq!(st, 409, "{body}");
    assert!(body.to_string().contains("first"), "{body}");
    // The same device again with its own key is a tier change, still fine.
    assert_eq!(enrol("first").0, 200);
}

#[test]
fn an_unknown_shard_name_is_not_echoed_in_full() {
    let dir = TempDir::new("echo");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let k = device_key(6);
    let (st, _) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "d", "public_key": hex::encode(k.public_key()), "tier": "basic"})),
    );
    assert_eq!(st, 200);
    let huge = "x".repeat(1 << 20);
    let r = http::request(
        &alloc.api_url(),
        "POST",
        "/v1/devices/d/pin",
        Some(&alloc.token),
        Some(&serde_json::json!({ "shard": huge })),
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.body.len() < 1024, "{} bytes", r.body.len());
    assert!(r.body.contains("unknown shard"), "{}", r.body);
}

#[test]
fn rotate_says_nothing_about_files_outside_the_key_directory() {
    let dir = TempDir::new("rotate-probe");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let outside = TempDir::new("rotate-probe-outside");
    let secret = outside.0.join("secret");
    std::fs::write(&secret, "hello").unwrap();
    let answer = |file: &std::path::Path| {
        alloc.api(
            "POST",
            "/v1/rotate",
            Some(serde_json::json!({ "key_file": file.display().to_string() })),
        )
    };
    let existing = answer(&secret);
    let missing = answer(&outside.0.join("missing"));
    let etc = answer(std::path::Path::new("/etc/shadow"));
    assert_eq!(existing.0, 400);
    assert_eq!(
        existing, missing,
        "existing and missing files look the same"
    );
    assert_eq!(existing, etc);
    // Inside the key directory, an unusable file is refused the same way
    // (the command line checks it locally and says why).
    let inside = dir.0.join("not-a-key");
    std::fs::write(&inside, "nope").unwrap();
    let canonical = std::fs::canonicalize(&inside).unwrap();
    assert_eq!(answer(&canonical).0, 400);
}

fn allocator_bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_shardline-allocator"))
}

#[test]
fn a_broken_configuration_exits_78_and_check_config_finds_it() {
    let dir = TempDir::new("exit-78");
    let key = dir.0.join("signing.key");
    keygen(&key);
    let catalog = manifest_dir().join("catalog");
    let good = format!(
        "[signer]\nkey_file = \"{}\"\n[policy]\ncatalog = \"{}\"\nagreements = \"{}\"\n",
        key.display(),
        catalog.join("catalog.toml").display(),
        catalog.join("tiers.toml").display(),
    );
    let cfg = dir.0.join("allocator.toml");
    std::fs::write(&cfg, &good).unwrap();
    let out = allocator_bin()
        .arg("check-config")
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok:"),
        "{out:?}"
    );

    // instruction_ttl_ms = 0 would make every instruction expire on arrival.
    std::fs::write(
        &cfg,
        format!("{good}[policy.engine]\ninstruction_ttl_ms = 0\n"),
    )
    .unwrap();
    for cmd in ["check-config", "run"] {
        let out = allocator_bin()
            .arg(cmd)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(78), "{cmd}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(":7: field `instruction_ttl_ms`"),
            "{cmd}: {err}"
        );
    }
    // The embedded broker on port 0 would bind nothing anyone is told of.
    std::fs::write(&cfg, &good).unwrap();
    let out = allocator_bin()
        .args(["check-config", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--listen: port 0"),
        "{out:?}"
    );
    // A missing catalog and a world-readable key are configuration errors too.
    std::fs::write(&cfg, good.replace("catalog.toml", "nope.toml")).unwrap();
    let out = allocator_bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    std::fs::write(&cfg, &good).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = allocator_bin()
        .args(["check-config", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("chmod 600"),
        "{out:?}"
    );
}

/// `[broker] credentials_file`: the embedded broker refuses anonymous and
/// wrong logins, the service logs in to it by itself, and a device with its
/// password is served (reports accepted, instructions delivered).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_broker_logins_from_the_credentials_file() {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let dir = TempDir::new("broker-logins");
    let creds = dir.0.join("broker-credentials");
    std::fs::write(
        &creds,
        "device login-dev s3cret-device-password\ndevice nosy-dev n0sy-device-password\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600)).unwrap();
    let alloc = Allocator::start(
        &dir.0,
        BrokerMode::Embedded,
        &format!("credentials_file = \"{}\"\n", creds.display()),
    );
    // Anonymous, and the right user with a wrong password: refused.
    for (user, pass) in [(None, ""), (Some("login-dev"), "wrong")] {
        let mut o = MqttOptions::new("shardline-agent-login-dev", "127.0.0.1", alloc.mqtt_port);
        if let Some(u) = user {
            o.set_credentials(u, pass);
        }
        let (_c, mut ev) = AsyncClient::new(o, 10);
        let refused = tokio::time::timeout(std::time::Duration::from_secs(5), async {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        return a.code != rumqttc::ConnectReturnCode::Success
                    }
                    Ok(_) => {}
                    Err(_) => return true,
                }
            }
        })
        .await
        .expect("an answer to CONNECT");
        assert!(refused, "login {user:?}/{pass:?} was let in");
    }
    // The service itself got in: with the device's login, it is served.
    let k = device_key(8);
    let (st, _) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "login-dev", "public_key": hex::encode(k.public_key()), "tier": "standard"})),
    );
    assert_eq!(st, 200);
    let mut dev =
        Device::connect_with_login("login-dev", k, alloc.mqtt_port, "s3cret-device-password").await;
    dev.send_report().await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        1.0,
        std::time::Duration::from_secs(10),
    );
    assert!(
        dev.next_instruction(&alloc.public_key, std::time::Duration::from_secs(10))
            .await
            .is_some(),
        "an instruction reaches the logged-in device"
    );

    // Another device, logged in as itself, touching login-dev's topics: cut
    // off at its first such packet (rumqttd alone would let it through).
    // (what, topic, publish rather than subscribe)
    let attempts = [
        (
            "publish on another's report",
            "shardline/v1/dev/login-dev/report",
            true,
        ),
        (
            "subscribe to another's instructions",
            "shardline/v1/dev/login-dev/instr",
            false,
        ),
        ("subscribe to everything", "shardline/v1/#", false),
    ];
    for (what, topic, publish) in attempts {
        let mut o = MqttOptions::new("shardline-agent-nosy-dev", "127.0.0.1", alloc.mqtt_port);
        o.set_credentials("nosy-dev", "n0sy-device-password");
        let (c, mut ev) = AsyncClient::new(o, 10);
        let mut connected = false;
        let cut = tokio::time::timeout(std::time::Duration::from_secs(10), async {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(a))) => {
                        assert_eq!(a.code, rumqttc::ConnectReturnCode::Success, "{what}");
                        connected = true;
                        let c = c.clone();
                        tokio::spawn(async move {
                            let q = rumqttc::QoS::AtLeastOnce;
                            let _ = if publish {
                                c.publish(topic, q, false, vec![1, 2, 3]).await
                            } else {
                                c.subscribe(topic, q).await
                            };
                        });
                    }
                    Ok(_) => {}
                    Err(_) => return true,
                }
            }
        })
        .await
        .unwrap_or(false);
        assert!(connected && cut, "{what}: not cut off");
    }
    // login-dev is still served.
    dev.send_report().await;
    alloc.wait_metric(
        "shardline_reports_accepted_total",
        2.0,
        std::time::Duration::from_secs(10),
    );
}
