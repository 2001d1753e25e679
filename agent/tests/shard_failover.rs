//! Issue 15 on real shard hosts: local failover to an alternative (a wrong
//! digest, a configuration `init` refuses, a sealed box that does not open),
//! reported through the daemon's runtime (`SupervisedRuntime`, the
//! `ShardRuntime` the daemon reports from); a sealed pre-shared key opened
//! on the device carries a vpn tunnel between two hosts; a crashing qos
//! shard is isolated while its sibling keeps forwarding.

mod shard_common;

use crypto_box::aead::OsRng;
use shard_common::*;
use shardline_agent::daemon::hosting::SupervisedRuntime;
use shardline_agent::daemon::runtime::ShardRuntime;
use shardline_agent::shardhost::{HostEvent, Supervisor};
use shardline_shared::msg::{
    ShardActivation, ShardFailure, ShardKind, ShardState, ShardStatus, ShardVariant,
};
use shardline_shared::seal::seal_config;
use shardline_shared::sign::KeyPair;
use shardline_shared::{DeviceId, ShardRef};
use std::net::UdpSocket;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn device() -> DeviceId {
    DeviceId::new("gw-failover-1").unwrap()
}

fn device_key() -> KeyPair {
    KeyPair::from_seed(&[42; 32])
}

fn shard_ref(id: &str) -> ShardRef {
    format!("{id}@0.1.0").parse().unwrap()
}

fn variant(dir: &Path, id: &str, config: &str) -> ShardVariant {
    ShardVariant {
        shard: shard_ref(id),
        sha256: sha256_file(&lib_path(dir, id)),
        config: config.as_bytes().to_vec(),
        sealed_config: Vec::new(),
        limits: LIMITS,
        bandwidth_kbps: 0,
    }
}

fn activation(capability: &str, primary: ShardVariant, alts: Vec<ShardVariant>) -> ShardActivation {
    ShardActivation {
        primary,
        alternatives: alts,
        capability: capability.into(),
        kind: ShardKind::Compute,
        priority: 5,
        lease_expires_at_ms: u64::MAX,
    }
}

fn sealed(to: &KeyPair, shard: &str, secret: &str) -> Vec<u8> {
    seal_config(
        &mut OsRng,
        &to.public_key(),
        &device(),
        &shard_ref(shard),
        secret.as_bytes(),
    )
    .expect("seal")
}

fn runtime(dir: &Path) -> SupervisedRuntime {
    let mut rt = SupervisedRuntime::with_config(supervisor_config(dir));
    rt.set_device_key(&device(), &device_key());
    rt
}

/// Polls until `pred` holds for the statuses (or 10 s): the statuses then.
fn wait_statuses(
    rt: &mut SupervisedRuntime,
    pred: impl Fn(&[ShardStatus]) -> bool,
) -> Vec<ShardStatus> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        rt.poll(0);
        let st = rt.statuses(0);
        if pred(&st) || Instant::now() >= deadline {
            return st;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn find<'a>(st: &'a [ShardStatus], id: &str) -> Option<&'a ShardStatus> {
    st.iter().find(|s| s.shard.id() == id)
}

fn running(st: &[ShardStatus], id: &str) -> bool {
    find(st, id).is_some_and(|s| s.state == ShardState::Running)
}

#[test]
fn a_primary_that_cannot_run_fails_over_locally_and_the_report_says_why() {
    let dir = shard_dir();
    let mut rt = runtime(dir.path());

    // 1. Wrong digest for the primary: LoadRefused, quarantined, chacha runs.
    let mut aes = variant(dir.path(), "crypto-aes256gcm", "");
    aes.sha256 = [0; 32];
    let chacha = variant(dir.path(), "crypto-chacha20poly1305", "");
    rt.activate("vpn", &[activation("vpn", aes, vec![chacha.clone()])], 0)
        .expect("activate");
    let st = wait_statuses(&mut rt, |st| running(st, "crypto-chacha20poly1305"));
    println!("wrong digest: {st:#?}");
    assert!(running(&st, "crypto-chacha20poly1305"), "{st:#?}");
    let aes = find(&st, "crypto-aes256gcm").expect("primary still reported");
    assert_eq!(aes.state, ShardState::Quarantined);
    assert!(
        matches!(&aes.last_failure, Some(ShardFailure::LoadRefused { reason }) if reason.contains("SHA-256") || reason.contains("sha256") || reason.contains("hash")),
        "{:?}",
        aes.last_failure
    );
    assert_eq!(
        find(&st, "crypto-chacha20poly1305").unwrap().last_failure,
        None,
        "the alternative carries no failure of its own"
    );

    // 2. A sealed box made for another device key: InitFailed with a reason
    //    that says so (and nothing of the secret), then the alternative.
    let secret = "marker_secret = TOPSECRET-0123456789\n";
    let mut aes = variant(dir.path(), "crypto-aes256gcm", "");
    aes.sealed_config = sealed(&KeyPair::from_seed(&[9; 32]), "crypto-aes256gcm", secret);
    rt.activate("vpn", &[activation("vpn", aes, vec![chacha.clone()])], 0)
        .expect("activate");
    let st = wait_statuses(&mut rt, |st| {
        running(st, "crypto-chacha20poly1305")
            && find(st, "crypto-aes256gcm").is_some_and(|s| s.state == ShardState::Quarantined)
    });
    println!("unopenable seal: {st:#?}");
    assert!(running(&st, "crypto-chacha20poly1305"), "{st:#?}");
    let aes = find(&st, "crypto-aes256gcm").unwrap();
    match &aes.last_failure {
        Some(ShardFailure::InitFailed { reason }) => {
            assert!(reason.contains("does not open"), "{reason}");
            assert!(!reason.contains("TOPSECRET"), "{reason}");
        }
        other => panic!("expected InitFailed, got {other:?}"),
    }

    // 3. A configuration `init` refuses (the shaper without its rate):
    //    InitFailed with the shard's own words, no restart loop, and the
    //    alternative runs.
    let shaper = variant(
        dir.path(),
        "qos-shaper",
        "listen = 127.0.0.1:0\nforward = 127.0.0.1:9\n",
    );
    let dscp = variant(dir.path(), "qos-dscp", "");
    rt.activate("qos", &[activation("qos", shaper, vec![dscp])], 0)
        .expect("activate");
    let st = wait_statuses(&mut rt, |st| running(st, "qos-dscp"));
    println!("init refused: {st:#?}");
    assert!(running(&st, "qos-dscp"), "{st:#?}");
    let shaper = find(&st, "qos-shaper").unwrap();
    assert_eq!(shaper.state, ShardState::Quarantined);
    match &shaper.last_failure {
        Some(ShardFailure::InitFailed { reason }) => {
            assert!(reason.contains("rate_bps"), "{reason}")
        }
        other => panic!("expected InitFailed, got {other:?}"),
    }
    // Deterministic: one attempt, then the alternative; no restart loop.
    std::thread::sleep(Duration::from_millis(500));
    let st = wait_statuses(&mut rt, |_| true);
    assert_eq!(
        find(&st, "qos-dscp").unwrap().restarts,
        1,
        "exactly one restart (the failover): {st:#?}"
    );
    rt.shutdown();
}

/// A vpn host (tunnel + chacha + auth-psk, psk sealed to the device).
fn vpn(
    dir: &Path,
    role: &str,
    bind: u16,
    peer: Option<u16>,
    inner_listen: u16,
    inner_forward: u16,
    psk_box: Vec<u8>,
) -> Vec<ShardActivation> {
    let peer = peer
        .map(|p| format!("peer = 127.0.0.1:{p}\n"))
        .unwrap_or_default();
    let tunnel = variant(
        dir,
        "vpn-tunnel",
        &format!(
            "role = {role}\nbind = 127.0.0.1:{bind}\n{peer}inner_listen = 127.0.0.1:{inner_listen}\ninner_forward = 127.0.0.1:{inner_forward}\nretry_ms = 200\n"
        ),
    );
    let mut auth = variant(dir, "auth-psk", "");
    auth.sealed_config = psk_box;
    vec![
        activation("vpn", tunnel, vec![]),
        activation("vpn", variant(dir, "crypto-chacha20poly1305", ""), vec![]),
        activation("vpn", auth, vec![]),
    ]
}

#[test]
fn a_sealed_psk_opens_on_the_device_and_the_tunnel_carries_traffic() {
    let dir = shard_dir();
    let psk = "5a".repeat(32);
    let secret = format!("psk = {psk}\n");
    let psk_box = sealed(&device_key(), "auth-psk", &secret);
    assert!(
        !psk_box.windows(16).any(|w| w == &psk.as_bytes()[..16]),
        "the psk is not in clear in the activation"
    );
    let (a_outer, b_outer) = (free_port(), free_port());
    let (a_in, b_in, a_out, b_out) = (free_port(), free_port(), free_port(), free_port());
    let mut ra = runtime(dir.path());
    let mut rb = runtime(dir.path());
    // B answers, A initiates; plaintext into A's inner_listen leaves at B's
    // inner_forward.
    let rx = UdpSocket::bind(("127.0.0.1", b_out)).expect("bind receiver");
    rx.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    rb.activate(
        "vpn",
        &vpn(
            dir.path(),
            "responder",
            b_outer,
            None,
            b_in,
            b_out,
            psk_box.clone(),
        ),
        0,
    )
    .expect("activate B");
    ra.activate(
        "vpn",
        &vpn(
            dir.path(),
            "initiator",
            a_outer,
            Some(b_outer),
            a_in,
            a_out,
            psk_box,
        ),
        0,
    )
    .expect("activate A");
    for rt in [&mut ra, &mut rb] {
        let st = wait_statuses(rt, |st| {
            st.len() == 3 && st.iter().all(|s| s.state == ShardState::Running)
        });
        assert!(st.iter().all(|s| s.state == ShardState::Running), "{st:#?}");
    }
    let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut buf = [0u8; 2048];
    let mut i = 0u32;
    while Instant::now() < deadline && got < 50 {
        tx.send_to(
            format!("through-the-tunnel-{i}").as_bytes(),
            ("127.0.0.1", a_in),
        )
        .unwrap();
        i += 1;
        ra.poll(0);
        rb.poll(0);
        if let Ok(n) = rx.recv(&mut buf) {
            assert!(buf[..n].starts_with(b"through-the-tunnel-"));
            got += 1;
        }
    }
    println!("sealed psk: {got} datagrams through the tunnel ({i} sent)");
    assert!(got >= 50, "only {got} of {i} datagrams crossed the tunnel");

    // The same tunnel without the box: auth-psk refuses its init, the
    // reason names the missing key.
    let mut rc = runtime(dir.path());
    let mut no_psk = vpn(
        dir.path(),
        "responder",
        free_port(),
        None,
        free_port(),
        free_port(),
        Vec::new(),
    );
    no_psk[2].primary.sealed_config.clear();
    rc.activate("vpn", &no_psk, 0).expect("activate C");
    let st = wait_statuses(&mut rc, |st| {
        find(st, "auth-psk").is_some_and(|s| s.state == ShardState::Quarantined)
    });
    assert!(
        matches!(&find(&st, "auth-psk").unwrap().last_failure,
            Some(ShardFailure::InitFailed { reason }) if reason.contains("psk")),
        "{st:#?}"
    );
    for rt in [&mut ra, &mut rb, &mut rc] {
        rt.shutdown();
    }
}

/// Sends UDP to `port` every 2 ms until `stop`.
fn sender(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let tx = UdpSocket::bind("127.0.0.1:0").unwrap();
        while !stop.load(Ordering::SeqCst) {
            let _ = tx.send_to(&[7u8; 200], ("127.0.0.1", port));
            std::thread::sleep(Duration::from_millis(2));
        }
    })
}

#[test]
fn a_crashing_qos_shard_is_isolated_and_its_sibling_keeps_forwarding() {
    let dir = shard_dir();
    let mut sup = Supervisor::new(supervisor_config(dir.path()));
    let (listen, forward) = (free_port(), free_port());
    let rx = UdpSocket::bind(("127.0.0.1", forward)).expect("bind receiver");
    rx.set_read_timeout(Some(Duration::from_millis(50)))
        .unwrap();
    let received = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = {
        let (received, stop) = (received.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if rx.recv(&mut buf).is_ok() {
                    received.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    let shaper = spec(
        dir.path(),
        "qos",
        "qos-shaper",
        &format!(
            "listen = 127.0.0.1:{listen}\nforward = 127.0.0.1:{forward}\nrate_bps = 50000000\n"
        ),
        LIMITS,
    );
    // Segfaults on its 15th poll (~300 ms after each start).
    let crasher = spec(
        dir.path(),
        "qos",
        "fixture-qos-misbehave",
        "mode = segv\nafter_polls = 15\n",
        LIMITS,
    );
    sup.activate("qos", vec![shaper, crasher], Instant::now())
        .expect("activate");
    let traffic = sender(listen, stop.clone());
    let (events, at) = wait_for(&mut sup, Duration::from_secs(10), |e| {
        matches!(e, HostEvent::Isolated { for_good: true, .. })
    });
    println!("{events:#?}");
    assert!(at.is_some(), "the crasher was never dropped: {events:#?}");
    // Every failure was attributed to the crasher, never to the shaper.
    for e in &events {
        if let HostEvent::Failed { shard, failure, .. } = e {
            assert_eq!(
                shard.as_ref().map(|s| s.id()),
                Some("fixture-qos-misbehave"),
                "{failure:?}"
            );
            assert_eq!(failure, &ShardFailure::Crashed { signal: 11 });
        }
    }
    assert!(
        !events.iter().any(|e| matches!(e, HostEvent::GaveUp { .. })),
        "the capability was given up: {events:#?}"
    );
    // The shaper keeps forwarding, alone, from now on.
    let _ = wait_for(&mut sup, Duration::from_secs(2), |e| {
        matches!(e, HostEvent::Started { .. })
    });
    let before = received.load(Ordering::SeqCst);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(2) {
        let ev = sup.poll(Instant::now());
        assert!(
            !ev.iter().any(|e| matches!(e, HostEvent::Failed { .. })),
            "{ev:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let forwarded = received.load(Ordering::SeqCst) - before;
    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    counter.join().unwrap();
    let st = sup.statuses();
    println!("after isolation: forwarded {forwarded} datagrams in 2 s; {st:#?}");
    assert!(
        forwarded > 300,
        "the shaper forwarded only {forwarded} in 2 s"
    );
    assert!(running(&st, "qos-shaper"), "{st:#?}");
    let c = find(&st, "fixture-qos-misbehave").unwrap();
    assert_eq!(c.state, ShardState::Quarantined);
    assert_eq!(c.last_failure, Some(ShardFailure::Crashed { signal: 11 }));
    assert_eq!(
        find(&st, "qos-shaper").unwrap().last_failure,
        None,
        "the shaper carries no failure"
    );
}

/// Throughput through a shaper capped at `bandwidth_kbps` (see
/// [`shard_common::flood_through_shaper_in`]), in a fresh shard directory.
fn flood_through_shaper(bandwidth_kbps: u64, offered_bps: u64, secs: u64) -> (u64, u64) {
    let dir = shard_dir();
    flood_through_shaper_in(
        supervisor_config(dir.path()),
        dir.path(),
        bandwidth_kbps,
        offered_bps,
        secs,
        |_| {},
    )
}

#[test]
fn declared_bandwidth_caps_a_udp_flood_through_the_shaper() {
    if !is_root() {
        println!("SKIP: the cap applies to the host's dedicated uid, which needs root");
        return;
    }
    if std::process::Command::new("nft")
        .arg("--version")
        .output()
        .is_err()
    {
        println!("SKIP: nft (nftables) is not installed");
        return;
    }
    let cap_kbps = 4_000;
    let offered = 20_000_000;
    let (free, free_offered) = flood_through_shaper(0, offered, 3);
    let (capped, capped_offered) = flood_through_shaper(cap_kbps, offered, 4);
    println!(
        "uncapped: offered {free_offered} bit/s, forwarded {free} bit/s; \
         capped at {cap_kbps} kbit/s: offered {capped_offered} bit/s, forwarded {capped} bit/s \
         ({:.1} % of the cap, UDP payload; the kernel counts IP bytes, +2.8 %)",
        capped as f64 * 100.0 / (cap_kbps * 1000) as f64
    );
    assert!(
        free > 3 * cap_kbps * 1000,
        "without a cap the flood should pass far above the cap: {free} bit/s"
    );
    let cap = cap_kbps * 1000;
    assert!(
        capped <= cap * 110 / 100 && capped >= cap * 80 / 100,
        "capped throughput {capped} bit/s is not near {cap} bit/s"
    );
}
