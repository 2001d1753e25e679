//! Shardline on a real THREE-node clustered broker (the `kit::cluster`
//! test kit): each broker's cluster starts on free ports, a node killed
//! with SIGKILL restarts and serves MQTT again, and the topic facts the
//! fleet-splitting design depends on are checked on the real servers:
//! a retained message published through one node reaches a subscriber on
//! another (NATS) or stays on its node (RabbitMQ 3.10), and topics holding '.' (group ids are `tenant.region.capability`,
//! device ids may hold '.') are carried or refused.
//!
//! A broker that is not installed skips its test, saying so.

use rumqttc::{Client, Event, MqttOptions, Packet, QoS};
use shardline_tests::kit::cluster::{BrokerCluster, BrokerKind};
use std::time::{Duration, Instant};

/// A client under `id` plus a number of its own: a node may still hold
/// the session of the last client that used an id (its connection was
/// dropped, not closed), and a second connection under it is a takeover.
fn client(port: u16, id: &str) -> (Client, rumqttc::Connection) {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let id = format!("{id}-{}", NEXT.fetch_add(1, Ordering::Relaxed));
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(10));
    Client::new(o, 100)
}

/// Publishes `payload` (QoS 1, retained) on `topic` via `port`; `Ok` once
/// the broker acknowledged it, `Err` when it refused (closed the connection).
fn publish_retained(port: u16, topic: &str) -> Result<(), String> {
    let (c, mut conn) = client(port, "sl-test-pub");
    c.publish(topic, QoS::AtLeastOnce, true, b"x".to_vec())
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                let _ = c.disconnect();
                return Ok(());
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
    Err("no PUBACK within 10 s".into())
}

/// Whether a fresh subscriber on `port` receives a retained message on `topic`.
fn sees_retained(port: u16, topic: &str) -> bool {
    retained_topic(port, topic).as_deref() == Some(topic)
}

/// The topic a retained message matching `filter` arrives on at a fresh
/// subscriber on `port` (a broker may rewrite it), if one arrives.
fn retained_topic(port: u16, filter: &str) -> Option<String> {
    let (c, mut conn) = client(port, "sl-test-sub");
    c.subscribe(filter, QoS::AtLeastOnce).ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Some(p.topic),
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => return None,
        }
    }
    None
}

/// Like [`retained_topic`], asking again with fresh subscribers until one
/// arrives or `within` has passed (see [`sees_retained_within`] for why).
fn retained_topic_within(port: u16, filter: &str, within: Duration) -> Option<String> {
    let t = Instant::now();
    loop {
        if let Some(topic) = retained_topic(port, filter) {
            return Some(topic);
        }
        if t.elapsed() > within {
            return None;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether a subscriber on `port` gets the retained message on `topic`
/// within `within` (fresh subscribers, again and again: a NATS node loads
/// retained messages from a replicated stream asynchronously, and needs a
/// JetStream leader after a node was lost).
fn sees_retained_within(port: u16, topic: &str, within: Duration) -> bool {
    let t = Instant::now();
    loop {
        if sees_retained(port, topic) {
            return true;
        }
        if t.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn cluster_survives_kill9(kind: BrokerKind) {
    if !kind.installed() {
        println!(
            "SKIP: {} is not installed (cargo xtask test installs it as root)",
            kind.name()
        );
        return;
    }
    let t = Instant::now();
    let mut c = BrokerCluster::start(kind).unwrap_or_else(|e| panic!("{e}"));
    println!("{}: 3 nodes up in {:?}", kind.name(), t.elapsed());
    assert_eq!(c.len(), 3);
    for i in 0..3 {
        assert!(
            c.rss_kib(i) > 0,
            "node {i} has no resident memory: not running?"
        );
    }
    let settle = Duration::from_secs(20);

    // Retained via node 0: seen on node 0, and on node 2 only if the
    // broker replicates its retained store.
    let topic = "shardline/v1/status/dev-1";
    publish_retained(c.mqtt_port(0), topic).unwrap_or_else(|e| panic!("publish: {e}"));
    assert!(
        sees_retained_within(c.mqtt_port(0), topic, settle),
        "retained message lost on its own node"
    );
    let elsewhere = sees_retained_within(c.mqtt_port(2), topic, settle);
    println!(
        "{}: retained via node 0 seen on node 2: {elsewhere}",
        kind.name()
    );
    match kind {
        // JetStream holds retained messages in a stream replicated on the 3 nodes.
        BrokerKind::Nats => assert!(elsewhere, "NATS: retained message not seen on node 2"),
        // RabbitMQ 3.10 keeps retained messages in a node-local store.
        BrokerKind::Rabbit => assert!(!elsewhere, "RabbitMQ now shares retained messages"),
    }

    // The '.' fact (group ids hold dots, which is why topics carry a group
    // as three levels: `shardline_shared::topics::assignment`), on one node.
    let dotted = "shardline/v1/assign/acme.eu-west.vpn";
    let dots = publish_retained(c.mqtt_port(0), dotted)
        .map(|()| retained_topic_within(c.mqtt_port(0), dotted, settle));
    println!("{}: topic with '.': {dots:?}", kind.name());
    match kind {
        // NATS 2.9 maps '/' to its subject separator '.', and refuses
        // MQTT topics holding '.' (the server closes the connection).
        BrokerKind::Nats => assert!(dots.is_err(), "NATS now carries '.' topics: {dots:?}"),
        // RabbitMQ 3.10 swaps '/' and '.' into AMQP routing keys and back,
        // but a '.' comes back as '/': the topic arrives rewritten.
        BrokerKind::Rabbit => assert_eq!(
            dots,
            Ok(Some("shardline/v1/assign/acme/eu-west/vpn".to_owned())),
            "RabbitMQ no longer rewrites '.' in topics"
        ),
    }
    // The topic the allocator really publishes an assignment on is carried
    // as it is by both.
    let group = shardline_shared::assign::GroupId::new("acme.eu-west.vpn").unwrap();
    let real = shardline_shared::topics::assignment(&group);
    let carried = publish_retained(c.mqtt_port(0), &real)
        .map(|()| retained_topic_within(c.mqtt_port(0), &real, settle));
    assert_eq!(
        carried,
        Ok(Some(real.clone())),
        "{}: the assignment topic was not carried as it is",
        kind.name()
    );

    // Shared subscriptions: two `$share/allocators/…` subscribers on
    // nodes 0 and 2; a broker that supports them delivers each message to
    // one of the two, one that does not to both (a plain topic filter
    // beginning with `$share`) or to none.
    let shared = shared_deliveries(&c, 10);
    println!(
        "{}: 10 messages to 2 shared subscribers delivered {shared} times",
        kind.name()
    );
    assert_ne!(
        shared,
        10,
        "{} splits $share/ subscriptions now",
        kind.name()
    );

    c.kill9(1);
    assert_eq!(c.rss_kib(1), 0);
    assert!(
        !shardline_tests::kit::cluster::mqtt_probe(c.mqtt_port(1)),
        "node 1 still answers after kill -9"
    );
    // The survivors still serve (and NATS's still hold the retained message).
    let t = Instant::now();
    let survivor = c.mqtt_port(if elsewhere { 2 } else { 0 });
    assert!(
        sees_retained_within(survivor, topic, Duration::from_secs(60)),
        "retained message lost with node 1"
    );
    println!(
        "{}: retained message served by a survivor {:?} after kill -9",
        kind.name(),
        t.elapsed()
    );
    let t = Instant::now();
    c.restart(1).unwrap_or_else(|e| panic!("{e}"));
    println!("{}: node 1 restarted in {:?}", kind.name(), t.elapsed());
    assert_eq!(
        sees_retained_within(
            c.mqtt_port(1),
            topic,
            if elsewhere { settle } else { Duration::ZERO }
        ),
        elsewhere,
        "restarted node 1 and the cluster disagree on the retained message"
    );
}

/// How many deliveries `n` messages published via node 1 make to two
/// subscribers of `$share/allocators/shardline/v1/dev/+/report` (on nodes 0 and 2).
fn shared_deliveries(c: &BrokerCluster, n: usize) -> usize {
    let count = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut threads = Vec::new();
    let ready = std::sync::Arc::new(std::sync::Barrier::new(3));
    for (node, id) in [(0, "sl-share-a"), (2, "sl-share-b")] {
        let (cl, mut conn) = client(c.mqtt_port(node), id);
        let (count, ready) = (count.clone(), ready.clone());
        threads.push(std::thread::spawn(move || {
            let _ = cl.subscribe(
                "$share/allocators/shardline/v1/dev/+/report",
                QoS::AtLeastOnce,
            );
            let mut waiting = true;
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                match conn.recv_timeout(Duration::from_millis(500)) {
                    Ok(Ok(Event::Incoming(Packet::SubAck(_)))) if waiting => {
                        waiting = false;
                        ready.wait();
                    }
                    Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                        count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(Err(_)) => break,
                    _ => {}
                }
            }
            if waiting {
                // Refused (connection closed): let the publisher go on.
                ready.wait();
            }
        }));
    }
    ready.wait();
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..n {
        let _ = publish_qos1(c.mqtt_port(1), &format!("shardline/v1/dev/d{i}/report"));
    }
    for t in threads {
        let _ = t.join();
    }
    count.load(std::sync::atomic::Ordering::SeqCst)
}

fn publish_qos1(port: u16, topic: &str) -> Result<(), String> {
    let (c, mut conn) = client(port, "sl-test-pub1");
    c.publish(topic, QoS::AtLeastOnce, false, b"x".to_vec())
        .map_err(|e| e.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match conn.recv_timeout(Duration::from_secs(1)) {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => {
                let _ = c.disconnect();
                return Ok(());
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => return Err(e.to_string()),
        }
    }
    Err("no PUBACK within 10 s".into())
}

#[test]
fn nats_cluster_starts_survives_kill9_and_restarts() {
    cluster_survives_kill9(BrokerKind::Nats);
}

#[test]
fn rabbitmq_cluster_starts_survives_kill9_and_restarts() {
    cluster_survives_kill9(BrokerKind::Rabbit);
}
