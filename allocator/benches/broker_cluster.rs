//! Which clustered broker Shardline runs on, by measurement: a three-node
//! NATS 2.9 cluster and a three-node RabbitMQ 3.10 cluster (the
//! `xtask::kit::cluster` kit), with a single mosquitto as the peer, all
//! driven by rumqttc clients set up like Shardline's (MQTT 3.1.1, QoS 1,
//! persistent sessions where a session must outlive a connection):
//!
//! - throughput and latency: two publishers on nodes A and B, one
//!   persistent-session subscriber on node C; latency from publish to
//!   receipt (the timestamp travels in the payload);
//! - retained: published via node A, does a new subscriber on node C get it?
//! - topics with '.' (group ids are `tenant.region.capability`): carried,
//!   refused or rewritten;
//! - a disconnected persistent session's queued QoS 1 messages when the
//!   node it was made on is killed with SIGKILL: how many reach it after it
//!   reconnects to another node, and how long that reconnection took;
//! - resident memory per node after the throughput run.
//!
//! Writes the medians of `SL_BENCH_RUNS` runs (default 3) into the
//! "Clustered brokers" section of BENCHMARKS.md.
//!
//! `cargo bench -p shardline-allocator --bench broker_cluster`
//! (`SL_BENCH_MESSAGES` per publisher, default 5000; `SL_BENCH_QUEUED`,
//! default 1000).

mod common;
use common::{env_or, machine, median, put_section};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::time::{Duration, Instant};
use xtask::kit::cluster::{BrokerCluster, BrokerKind};
use xtask::kit::proc::{free_tcp_port, Proc, TempDir};

fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

fn options(id: &str, port: u16, clean: bool) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(clean);
    o.set_inflight(100);
    o
}

/// Polls `el` until CONNACK (then `Ok(session_present)`), or an error.
async fn connected(el: &mut EventLoop, within: Duration) -> Result<bool, String> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, el.poll()).await {
            Err(_) => return Err("no CONNACK in time".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => return Ok(a.session_present),
            Ok(Ok(_)) => {}
        }
    }
}

/// Waits until the SUBACK arrived.
async fn subscribed(el: &mut EventLoop) -> Result<(), String> {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), el.poll()).await {
            Err(_) => return Err("no SUBACK in 20 s".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => return Ok(()),
            Ok(Ok(_)) => {}
        }
    }
}

/// Publishes `n` QoS 1 messages through `port` and returns how many the
/// broker acknowledged (PUBACK).
async fn publish_acked(port: u16, id: &str, topic: String, n: usize, retain: bool) -> usize {
    let (c, mut el) = AsyncClient::new(options(id, port, true), 1000);
    if connected(&mut el, Duration::from_secs(20)).await.is_err() {
        return 0;
    }
    tokio::spawn(async move {
        for i in 0..n {
            let mut payload = now_us().to_le_bytes().to_vec();
            payload.resize(200, i as u8);
            if c.publish(topic.clone(), QoS::AtLeastOnce, retain, payload)
                .await
                .is_err()
            {
                return;
            }
        }
    });
    let mut acked = 0;
    while acked < n {
        match tokio::time::timeout(Duration::from_secs(20), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    acked
}

#[derive(Debug, Default, Clone)]
struct Run {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    received: usize,
    sent: usize,
    retained_elsewhere: bool,
    dots: String,
    queued: usize,
    queued_received: Option<usize>,
    reconnect_ms: Option<f64>,
    rss_mib: Vec<f64>,
}

/// One measurement on `ports` (three nodes, or one for mosquitto).
/// `kill` kills node 0 with SIGKILL (None: a single node, no failover).
async fn one_run(
    ports: Vec<u16>,
    messages: usize,
    queued: usize,
    kill: Option<&mut dyn FnMut()>,
    rss: &dyn Fn() -> Vec<f64>,
) -> Run {
    let (a, b, c) = (
        ports[0],
        ports[ports.len().min(2) - 1],
        *ports.last().unwrap(),
    );
    let mut run = Run::default();

    // Throughput and latency: A and B publish, C receives.
    let (sub, mut sel) = AsyncClient::new(options("bench-sub", c, false), 1000);
    connected(&mut sel, Duration::from_secs(30))
        .await
        .expect("subscriber connects");
    sub.subscribe("shardline/v1/dev/+/report", QoS::AtLeastOnce)
        .await
        .unwrap();
    subscribed(&mut sel).await.expect("subscribed");
    let total = 2 * messages;
    let started = Instant::now();
    let pubs: Vec<_> = [(a, "bench-pub-a"), (b, "bench-pub-b")]
        .into_iter()
        .map(|(port, id)| {
            tokio::spawn(publish_acked(
                port,
                id,
                format!("shardline/v1/dev/{id}/report"),
                messages,
                false,
            ))
        })
        .collect();
    let mut lat = Vec::with_capacity(total);
    while lat.len() < total {
        match tokio::time::timeout(Duration::from_secs(20), sel.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let sent = u64::from_le_bytes(p.payload[..8].try_into().unwrap());
                lat.push(now_us().saturating_sub(sent) as f64 / 1000.0);
            }
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    for p in pubs {
        run.sent += p.await.unwrap_or(0);
    }
    run.received = lat.len();
    run.rate = lat.len() as f64 / secs;
    lat.sort_by(f64::total_cmp);
    let q = |f: f64| lat.get(((lat.len() as f64 * f) as usize).min(lat.len().saturating_sub(1)));
    run.p50_ms = q(0.5).copied().unwrap_or(f64::NAN);
    run.p99_ms = q(0.99).copied().unwrap_or(f64::NAN);
    run.rss_mib = rss();
    let _ = sub.disconnect().await;
    drop(sel);

    // Retained via A, seen by a new subscriber on C (retried for 10 s: a
    // node may load retained messages asynchronously).
    let topic = "shardline/v1/status/bench-retained";
    publish_acked(a, "bench-ret", topic.into(), 1, true).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !run.retained_elsewhere && Instant::now() < deadline {
        run.retained_elsewhere =
            first_message(c, "bench-ret-sub", topic).await.as_deref() == Some(topic);
    }

    // Topics with '.'.
    let dotted = "shardline/v1/assign/acme.eu-west.vpn";
    run.dots = if publish_acked(a, "bench-dot", dotted.into(), 1, true).await == 0 {
        "refused".into()
    } else {
        match first_message(a, "bench-dot-sub", dotted).await {
            Some(t) if t == dotted => "carried".into(),
            Some(t) => format!("rewritten to `{t}`"),
            None => "lost".into(),
        }
    };

    // A persistent session on A, disconnected; QoS 1 messages queued for it
    // via B; A killed; the session comes back through C.
    let Some(kill) = kill else {
        return run;
    };
    let (q_sub, mut qel) = AsyncClient::new(options("bench-queue", a, false), 1000);
    connected(&mut qel, Duration::from_secs(30))
        .await
        .expect("queue subscriber connects");
    q_sub
        .subscribe("shardline/v1/dev/+/ack", QoS::AtLeastOnce)
        .await
        .unwrap();
    subscribed(&mut qel).await.expect("queue subscribed");
    let _ = q_sub.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while qel.poll().await.is_ok() {}
    })
    .await;
    drop(qel);
    run.queued = publish_acked(
        b,
        "bench-q-pub",
        "shardline/v1/dev/bench-q/ack".into(),
        queued,
        false,
    )
    .await;
    // Let replication settle before the crash: a PUBACK is the promise.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let killed_at = Instant::now();
    kill();
    // The client's own failover: its list is A, B, C; A is gone, go to C.
    let (_q, mut qel) = AsyncClient::new(options("bench-queue", c, false), 1000);
    let mut got = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if connected(&mut qel, Duration::from_secs(5)).await.is_ok() {
            run.reconnect_ms = Some(killed_at.elapsed().as_secs_f64() * 1000.0);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if run.reconnect_ms.is_some() {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), qel.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                    got += 1;
                    if got >= run.queued {
                        break;
                    }
                }
                Ok(Ok(_)) => {}
                _ => break,
            }
        }
        run.queued_received = Some(got);
    }
    run
}

/// The topic of the first message a new subscriber to `filter` on `port` gets.
async fn first_message(port: u16, id: &str, filter: &str) -> Option<String> {
    let (c, mut el) = AsyncClient::new(options(id, port, true), 100);
    connected(&mut el, Duration::from_secs(10)).await.ok()?;
    c.subscribe(filter, QoS::AtLeastOnce).await.ok()?;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), el.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => return Some(p.topic),
            Ok(Ok(_)) => {}
            _ => return None,
        }
    }
}

fn start_mosquitto(dir: &std::path::Path) -> Option<(Proc, u16)> {
    let bin = ["/usr/sbin/mosquitto", "/usr/bin/mosquitto"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())?;
    let port = free_tcp_port();
    let conf = dir.join("mosquitto.conf");
    let user = if std::env::var("USER").as_deref() == Ok("root") || is_root() {
        "user root\n"
    } else {
        ""
    };
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 100000\n{user}"),
    )
    .ok()?;
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("-c").arg(&conf);
    let p = Proc::spawn("mosquitto", cmd, &dir.join("mosquitto.log")).ok()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Some((p, port))
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

fn main() {
    let messages = env_or("SL_BENCH_MESSAGES", 5000);
    let queued = env_or("SL_BENCH_QUEUED", 1000);
    let runs = env_or("SL_BENCH_RUNS", 3);
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for name in ["NATS 2.9", "RabbitMQ 3.10", "mosquitto"] {
        let mut outs: Vec<Run> = Vec::new();
        for r in 0..runs {
            let started = Instant::now();
            let run = match name {
                "mosquitto" => {
                    let Ok(dir) = TempDir::new("shardline-bench-mosq") else {
                        break;
                    };
                    let Some((proc, port)) = start_mosquitto(&dir.path) else {
                        println!("SKIP mosquitto: not installed");
                        break;
                    };
                    let pid = proc.pid();
                    let rss = move || vec![xtask::kit::cluster::group_rss_kib(pid) as f64 / 1024.0];
                    rt.block_on(one_run(vec![port], messages, queued, None, &rss))
                }
                _ => {
                    let kind = if name.starts_with("NATS") {
                        BrokerKind::Nats
                    } else {
                        BrokerKind::Rabbit
                    };
                    if !kind.installed() {
                        println!("SKIP {name}: not installed");
                        break;
                    }
                    let mut cluster = match BrokerCluster::start(kind) {
                        Ok(c) => c,
                        Err(e) => panic!("{name}: {e}"),
                    };
                    println!(
                        "{name}: cluster up in {:.1} s",
                        started.elapsed().as_secs_f64()
                    );
                    let ports: Vec<u16> = (0..3).map(|i| cluster.mqtt_port(i)).collect();
                    let cell = std::cell::RefCell::new(&mut cluster);
                    let rss = || {
                        (0..3)
                            .map(|i| cell.borrow().rss_kib(i) as f64 / 1024.0)
                            .collect()
                    };
                    let mut kill = || cell.borrow_mut().kill9(0);
                    rt.block_on(one_run(ports, messages, queued, Some(&mut kill), &rss))
                }
            };
            println!("{name} run {r}: {run:?}");
            outs.push(run);
        }
        if outs.is_empty() {
            continue;
        }
        let med = |f: &dyn Fn(&Run) -> f64| median(outs.iter().map(f).collect());
        let rss = med(&|r| r.rss_mib.iter().copied().fold(0.0, f64::max));
        let lost = outs
            .iter()
            .map(|r| r.sent.saturating_sub(r.received))
            .max()
            .unwrap_or(0);
        let queued_cell = if outs[0].queued_received.is_some() {
            let worst = outs
                .iter()
                .filter_map(|r| r.queued_received)
                .min()
                .unwrap_or(0);
            format!("{worst} of {}", outs[0].queued)
        } else {
            "n/a (one node)".into()
        };
        let reconnect = if outs[0].reconnect_ms.is_some() {
            format!("{:.0}", med(&|r| r.reconnect_ms.unwrap_or(f64::INFINITY)))
        } else {
            "n/a".into()
        };
        rows.push(format!(
            "| {name} | {:.0} | {:.1} | {:.1} | {lost} | {} | {} | {queued_cell} | {reconnect} | {rss:.0} |",
            med(&|r| r.rate),
            med(&|r| r.p50_ms),
            med(&|r| r.p99_ms),
            match (outs[0].queued_received.is_some(), outs.iter().all(|r| r.retained_elsewhere)) {
                (false, _) => "n/a (one node)",
                (true, true) => "yes",
                (true, false) => "no",
            },
            outs[0].dots,
        ));
    }
    let mut section = String::from("## Clustered brokers\n\n");
    section.push_str(&format!(
        "Three-node clusters on one machine (`xtask::kit::cluster`: NATS 2.9 with JetStream and `stream_replicas: 3`; \
         RabbitMQ 3.10 with `rabbitmq_mqtt`, joined with `join_cluster`) and a single mosquitto, rumqttc clients \
         (MQTT 3.1.1, QoS 1). Throughput and latency: 2 publishers on nodes A and B x {messages} messages of 200 bytes, \
         one persistent-session subscriber on node C; latency from publish to receipt. Retained: published via A, \
         new subscriber on C. '.' topic: `shardline/v1/assign/acme.eu-west.vpn`. Queued: {queued} QoS 1 messages \
         (PUBACKed via B) for a disconnected persistent session made on A, then A killed with SIGKILL; the session \
         reconnects through C (worst run). Reconnect: from the kill to CONNACK on C. Memory: largest node RSS after \
         the throughput run. Median of {runs} runs.\n\n"
    ));
    section.push_str(&format!("Machine: {}\n\n", machine(&load_at_start)));
    section.push_str("Command: `cargo bench -p shardline-allocator --bench broker_cluster`\n\n");
    section.push_str("| broker | msgs/s A,B -> C | p50 ms | p99 ms | lost | retained seen on another node | topic with '.' | queued messages after kill -9 | reconnect ms | RSS MiB per node |\n");
    section.push_str("|---|---|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        section.push_str(r);
        section.push('\n');
    }
    put_section("## Clustered brokers", &section, None);
    println!("{section}");
}
