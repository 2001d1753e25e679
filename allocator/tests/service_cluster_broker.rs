//! The real allocator on a real three-node NATS 2.9 cluster (the broker
//! chosen by `benches/broker_cluster.rs`; `xtask::kit::cluster`), ONE
//! instance reading the plain uplink topics (`[broker] uplink = "plain"`)
//! with the node list (`[broker] urls`) and a persistent session
//! (`[broker] persistent_session = true`: with a clean session NATS must
//! delete and remake the subscriptions' JetStream consumers on every
//! reconnect, which fails for tens of seconds after a node loss). Signed devices spread over the
//! three nodes stream reports and ack instructions. Under that load one
//! broker node (the allocator's) is killed with SIGKILL — the allocator
//! and the devices on that node move to another node — then the allocator
//! itself is killed with SIGKILL and restarted on its store.
//!
//! Asserted: each device's newest PUBACKed report is accepted (every older
//! one is accepted or superseded by it: sequence numbers only grow), checked
//! at the end on a fresh connection whose PUBACKs say which report the
//! broker acknowledged; no instruction sequence number is reused for other
//! content or goes back per device; service (a new instruction for every
//! device) resumes within [`RESUME`] after each kill. A device that connects
//! again hangs up its old connection first, as the agent does: two live
//! connections under one client id throw each other out on NATS. Skipped,
//! saying why, when nats-server is not installed.

mod service_common;

use rumqttc::{AsyncClient, QoS};
use service_common::*;
use shardline_shared::msg::{AckOutcome, Presence};
use shardline_shared::sign::{self, Domain};
use shardline_shared::topics;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use xtask::kit::cluster::{BrokerCluster, BrokerKind};

const DEVICES: usize = 6;
/// The bound on service resuming after a broker node or the allocator is
/// killed (NATS elects new JetStream leaders within ~10-20 s here).
const RESUME: Duration = Duration::from_secs(45);
/// How long a device waits for an instruction before connecting again.
const SILENT: Duration = Duration::from_secs(8);

/// Per device: every instruction seen (seq ⇒ payload) in arrival order checks.
#[derive(Default)]
struct Seen(Vec<BTreeMap<u64, Vec<u8>>>);

impl Seen {
    fn record(&mut self, d: usize, seq: u64, payload: Vec<u8>) {
        match self.0[d].get(&seq) {
            Some(prev) => assert_eq!(prev, &payload, "device {d}: seq {seq} reused"),
            None => {
                let max = self.0[d].keys().next_back().copied().unwrap_or(0);
                assert!(
                    seq > max,
                    "device {d}: new instruction {seq} after {max}: went back"
                );
                self.0[d].insert(seq, payload);
            }
        }
    }
}

/// Waits until every device got a NEW instruction (acking all it gets).
/// A device that hears nothing for [`SILENT`] connects again to its node
/// (`ports[d]`), like an agent whose subscription the broker refused: a
/// NATS node refuses or times out QoS 1 subscriptions while JetStream
/// elects new leaders after a node was lost.
async fn every_device_instructed(
    devs: &mut [Device],
    ports: &[u16],
    clients: &[Arc<Mutex<AsyncClient>>],
    key: &[u8; 32],
    seen: &mut Seen,
    within: Duration,
    alloc: &Allocator,
) -> Duration {
    let t = Instant::now();
    let before: Vec<u64> = (0..devs.len())
        .map(|d| seen.0[d].keys().next_back().copied().unwrap_or(0))
        .collect();
    for d in 0..devs.len() {
        let mut heard = Instant::now();
        loop {
            if heard.elapsed() > SILENT {
                println!("device {d} heard nothing for {SILENT:?}: connects again");
                devs[d].hang_up();
                let k = devs[d].key.clone();
                let mut again = Device::connect(&format!("cl-{d}"), k, ports[d]).await;
                again.applied = devs[d].applied;
                *clients[d].lock().unwrap() = again.client.clone();
                devs[d] = again;
                heard = Instant::now();
            }
            let dev = &mut devs[d];
            let max = seen.0[d].keys().next_back().copied().unwrap_or(0);
            if max > before[d] {
                break;
            }
            assert!(
                t.elapsed() < within,
                "device {d}: no new instruction within {within:?}; allocator log:\n{}",
                tail(&alloc.log(), 40)
            );
            match dev.next_instruction(key, Duration::from_millis(500)).await {
                Some((instr, payload)) => {
                    heard = Instant::now();
                    seen.record(d, instr.seq, payload);
                    dev.ack(instr.seq, AckOutcome::Applied).await;
                }
                // Statuses tell the allocator what is applied; it re-sends pending.
                None => dev.publish_status(Presence::Online).await,
            }
        }
    }
    t.elapsed()
}

/// Whether a fresh client on `port` gets a successful SUBACK for a QoS 1 subscription.
async fn qos1_subscription_accepted(port: u16) -> bool {
    let mut o = rumqttc::MqttOptions::new("sl-probe-sub", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(5));
    let (c, mut el) = AsyncClient::new(o, 10);
    let _ = c.subscribe("shardline/v1/probe", QoS::AtLeastOnce).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, el.poll()).await {
        if let rumqttc::Event::Incoming(rumqttc::Packet::SubAck(a)) = ev {
            let ok = a
                .return_codes
                .iter()
                .all(|r| !matches!(r, rumqttc::SubscribeReasonCode::Failure));
            let _ = c.disconnect().await;
            return ok;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    false
}

fn tail(s: &str, n: usize) -> String {
    let l: Vec<&str> = s.lines().collect();
    l[l.len().saturating_sub(n)..].join("\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_allocator_on_a_nats_cluster_survives_a_node_kill9_and_its_own() {
    if !BrokerKind::Nats.installed() {
        println!("SKIP: nats-server is not installed (cargo xtask test installs it as root)");
        return;
    }
    let started = Instant::now();
    let mut cluster = BrokerCluster::start(BrokerKind::Nats).unwrap_or_else(|e| panic!("{e}"));
    let urls = cluster.urls();
    let dir = TempDir::new("cluster-broker");
    let extra = format!(
        "urls = [{}]\nuplink = \"plain\"\npersistent_session = true\n",
        urls.iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Node 0 first: the node killed below is the allocator's.
    let mut alloc = Allocator::start(&dir.0, BrokerMode::External(urls[0].clone()), &extra);
    alloc.wait_metric(
        "shardline_mqtt_reconnects_total",
        1.0,
        Duration::from_secs(30),
    );
    let key = alloc.public_key;

    let mut devs = Vec::new();
    let mut clients: Vec<Arc<Mutex<AsyncClient>>> = Vec::new();
    let seqs: Vec<Arc<AtomicU64>> = (0..DEVICES).map(|_| Arc::new(AtomicU64::new(0))).collect();
    for d in 0..DEVICES {
        let k = device_key(d as u8);
        let (st, body) = alloc.api(
            "POST",
            "/v1/devices",
            Some(serde_json::json!({
                "device": format!("cl-{d}"), "public_key": hex::encode(k.public_key()), "tier": "standard"
            })),
        );
        assert_eq!(st, 200, "{body}");
        let dev = Device::connect(&format!("cl-{d}"), k, cluster.mqtt_port(d % 3)).await;
        dev.publish_status(Presence::Online).await;
        clients.push(Arc::new(Mutex::new(dev.client.clone())));
        devs.push(dev);
    }
    // A continuous signed report stream per device (20/s), its sequence
    // numbers shared with the final report below. rumqttc queues while a
    // connection is down and resends unacknowledged publishes.
    let stop = Arc::new(AtomicBool::new(false));
    for (d, dev) in devs.iter().enumerate() {
        let (id, k) = (dev.id.clone(), dev.key.clone());
        let (client, seq, stop) = (clients[d].clone(), seqs[d].clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let s = seq.fetch_add(1, Ordering::SeqCst) + 1;
                let bytes = sign::seal(Domain::Report, &report_for(&id, s, 0), &[&k]);
                let c = client.lock().unwrap().clone();
                let _ = c.try_publish(topics::report(&id), QoS::AtLeastOnce, false, bytes);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }

    let mut seen = Seen(vec![BTreeMap::new(); DEVICES]);
    // Each device's node: node 0's devices move to node 1 when it is killed.
    let mut ports: Vec<u16> = (0..DEVICES).map(|d| cluster.mqtt_port(d % 3)).collect();
    let first =
        every_device_instructed(&mut devs, &ports, &clients, &key, &mut seen, RESUME, &alloc).await;
    println!("first instructions to all {DEVICES} devices in {first:?}");

    // Kill -9 node 0: the allocator's node, and devices 0 and 3's.
    let reconnects = alloc.metric("shardline_mqtt_reconnects_total");
    cluster.kill9(0);
    let killed = Instant::now();
    // A NATS node refuses QoS 1 subscriptions (SUBACK failure) until its
    // JetStream cluster has new leaders; the test's device helper does not
    // retry refused subscriptions (the allocator does), so wait for that.
    let t = Instant::now();
    while !qos1_subscription_accepted(cluster.mqtt_port(1)).await {
        assert!(
            t.elapsed() < RESUME,
            "node 1 refuses QoS 1 subscriptions for {RESUME:?}"
        );
    }
    println!(
        "node 1 accepts QoS 1 subscriptions {:?} after node 0 was killed",
        killed.elapsed()
    );
    // Devices 0 and 3 reconnect to the next node of their list (a new
    // connection, same client id and key; the report stream goes on).
    for d in [0, 3] {
        devs[d].hang_up();
        let k = device_key(d as u8);
        let mut dev = Device::connect(&format!("cl-{d}"), k, cluster.mqtt_port(1)).await;
        dev.applied = devs[d].applied;
        dev.publish_status(Presence::Online).await;
        *clients[d].lock().unwrap() = dev.client.clone();
        devs[d] = dev;
        ports[d] = cluster.mqtt_port(1);
    }
    alloc.wait_metric("shardline_mqtt_reconnects_total", reconnects + 1.0, RESUME);
    println!(
        "allocator reconnected {:?} after node 0 was killed",
        killed.elapsed()
    );
    for d in 0..DEVICES {
        let (st, body) = alloc.api("POST", &format!("/v1/devices/cl-{d}/drain"), None);
        assert_eq!(st, 200, "{body}");
    }
    let resumed =
        every_device_instructed(&mut devs, &ports, &clients, &key, &mut seen, RESUME, &alloc).await;
    println!(
        "service resumed {:?} after the broker node kill (instructions after drain: {resumed:?})",
        killed.elapsed()
    );
    assert!(killed.elapsed() < RESUME + RESUME);

    // Kill -9 the allocator, restart it on its store and node list.
    alloc.kill9();
    let killed = Instant::now();
    alloc.spawn();
    for d in 0..DEVICES {
        let (st, body) = alloc.api("POST", &format!("/v1/devices/cl-{d}/resume"), None);
        assert_eq!(st, 200, "{body}");
    }
    let resumed =
        every_device_instructed(&mut devs, &ports, &clients, &key, &mut seen, RESUME, &alloc).await;
    println!(
        "service resumed {:?} after the allocator's kill -9 ({resumed:?} for the instructions)",
        killed.elapsed()
    );

    // Stop the stream. Each device then sends its final reports on a fresh
    // connection (whose publishes are only these) until one is PUBACKed: a
    // device whose publish is not acknowledged sends a newer report, as the
    // agent does. The allocator must hold the newest acknowledged report or
    // a newer one the device also sent.
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for (d, old) in devs.iter_mut().enumerate() {
        old.hang_up();
        let mut dev = Device::connect(&format!("cl-{d}"), old.key.clone(), ports[d]).await;
        dev.applied = old.applied;
        let t = Instant::now();
        let mut sent = Vec::new();
        let acked = loop {
            let s = seqs[d].fetch_add(1, Ordering::SeqCst) + 1;
            let bytes = sign::seal(
                Domain::Report,
                &report_for(&dev.id, s, dev.applied),
                &[&dev.key],
            );
            dev.client
                .publish(topics::report(&dev.id), QoS::AtLeastOnce, false, bytes)
                .await
                .unwrap();
            sent.push(s);
            let wait = Instant::now();
            let newest_acked = loop {
                let newest = dev.publishes.lock().unwrap().newest_acked();
                if newest.is_some() || wait.elapsed() > Duration::from_secs(5) {
                    break newest;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            if let Some(i) = newest_acked {
                break sent[i];
            }
            assert!(
                t.elapsed() < RESUME,
                "device {d}: no report PUBACKed within {RESUME:?}"
            );
        };
        let newest_sent = *sent.last().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (st, view) = alloc.api("GET", &format!("/v1/devices/cl-{d}"), None);
            assert_eq!(st, 200);
            let last = view["last_report_seq"].as_u64().unwrap_or(0);
            assert!(
                last <= newest_sent,
                "device {d}: accepted {last} beyond the newest report {newest_sent}"
            );
            if last >= acked {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "device {d}: acknowledged report {acked} not accepted (holds {last}); log:\n{}",
                tail(&alloc.log(), 40)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        *old = dev;
    }
    println!("whole test {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(170),
        "keep it well under 3 minutes"
    );
}
