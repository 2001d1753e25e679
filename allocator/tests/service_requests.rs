//! Issue 18, end to end through the real allocator (embedded broker): a
//! device's applications ask for units with device-signed requests and get
//! signed answers — grants, a queue position then a grant after a release,
//! refusals with their reason, units back when a short lease runs out — and
//! their reputation moves with how grants end. The operator endpoints and
//! `shardctl` verbs answer too.

mod service_common;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use service_common::*;
use shardline_shared::ids::AppName;
use shardline_shared::msg::ShardKind;
use shardline_shared::request::{
    self, Answer, AppRequest, GrantOutcome, RequestAnswer, RequestOp, RequestRefusal,
};
use shardline_shared::sign::KeyPair;
use shardline_shared::{topics, DeviceId, KeyId};
use std::time::Duration;
use tokio::sync::mpsc;

/// A device's agent as far as explicit requests go: seals requests with
/// the device key, verifies answers with the allocator's key.
struct Requester {
    id: DeviceId,
    key: KeyPair,
    client: AsyncClient,
    answers: mpsc::UnboundedReceiver<Vec<u8>>,
    seq: u64,
    allocator: [u8; 32],
}

impl Requester {
    async fn connect(id: &str, key: KeyPair, port: u16, allocator: [u8; 32]) -> Self {
        let id = DeviceId::new(id).unwrap();
        let mut opts = MqttOptions::new(format!("req-{id}"), "127.0.0.1", port);
        opts.set_keep_alive(Duration::from_secs(5));
        let (client, mut ev) = AsyncClient::new(opts, 1000);
        let (tx, rx) = mpsc::unbounded_channel();
        let (up_tx, mut up_rx) = mpsc::unbounded_channel::<()>();
        let topic = topics::answer(&id);
        let c2 = client.clone();
        tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                        if tx.send(p.payload.to_vec()).is_err() {
                            return;
                        }
                    }
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = c2.subscribe(topic.clone(), QoS::AtLeastOnce).await;
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = up_tx.send(());
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(10), up_rx.recv())
            .await
            .expect("subscribed")
            .unwrap();
        Self {
            id,
            key,
            client,
            answers: rx,
            seq: 0,
            allocator,
        }
    }

    /// Publishes a signed request from `app:instance`; returns its seq.
    async fn ask(&mut self, who: &str, op: RequestOp) -> u64 {
        self.seq += 1;
        let (app, instance) = who.split_once(':').unwrap();
        let req = AppRequest {
            device: self.id.clone(),
            seq: self.seq,
            app: AppName::new(app).unwrap(),
            instance: AppName::new(instance).unwrap(),
            at_ms: now_ms(),
            op,
        };
        self.client
            .publish(
                topics::request(&self.id),
                QoS::AtLeastOnce,
                false,
                request::seal_request(&req, &self.key),
            )
            .await
            .unwrap();
        self.seq
    }

    async fn next(&mut self, within: Duration) -> Option<RequestAnswer> {
        let bytes = tokio::time::timeout(within, self.answers.recv())
            .await
            .ok()??;
        let kid = KeyId::of_public_key(&self.allocator);
        let a = request::open_answer(&bytes, |k| (k == kid).then_some(self.allocator))
            .expect("answer verifies under the allocator key");
        assert_eq!(a.device, self.id);
        Some(a)
    }

    async fn answer(&mut self) -> RequestAnswer {
        self.next(Duration::from_secs(10)).await.expect("an answer")
    }
}

fn acquire(kind: ShardKind, units: u32, duration_ms: u32) -> RequestOp {
    RequestOp::Acquire {
        kind,
        units,
        duration_ms,
        priority: 0,
    }
}

fn grant_of(a: &RequestAnswer) -> u64 {
    match a.answer {
        Answer::Granted(g) => g.grant,
        ref other => panic!("not granted: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_signed_queued_refused_and_expire() {
    let dir = TempDir::new("requests");
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let key = device_key(7);
    let out = alloc.shardctl(&[
        "enroll",
        "gw-r1",
        &hex::encode(key.public_key()),
        "--tier",
        "standard",
    ]);
    assert!(out.status.success(), "shardctl enroll: {out:?}");
    let mut dev = Requester::connect("gw-r1", key, alloc.mqtt_port, alloc.public_key).await;

    // `standard` has 3 compute units; an instance at the starting score
    // gets half of them (1).
    let s_a = dev
        .ask("cam:a", acquire(ShardKind::Compute, 1, 30_000))
        .await;
    let a = dev.answer().await;
    assert_eq!(
        (a.request_seq, a.app.as_str(), a.instance.as_str()),
        (s_a, "cam", "a")
    );
    let g_a = grant_of(&a);
    dev.ask("cam:b", acquire(ShardKind::Compute, 1, 1_500))
        .await;
    grant_of(&dev.answer().await);
    dev.ask("cam:c", acquire(ShardKind::Compute, 1, 30_000))
        .await;
    grant_of(&dev.answer().await);

    // The pool is empty: queued, then granted when `a` releases.
    let s_d = dev
        .ask("cam:d", acquire(ShardKind::Compute, 1, 30_000))
        .await;
    let q = dev.answer().await;
    assert!(
        matches!(q.answer, Answer::Queued { position: 1, .. }),
        "{q:?}"
    );
    dev.ask(
        "cam:a",
        RequestOp::Release {
            grant: g_a,
            outcome: GrantOutcome::Completed,
        },
    )
    .await;
    let r = dev.answer().await;
    assert!(
        matches!(r.answer, Answer::Released { units: 1, .. }),
        "{r:?}"
    );
    let d = dev.answer().await;
    assert_eq!((d.instance.as_str(), d.request_seq), ("d", s_d));
    grant_of(&d);

    // Refused, with its reason.
    dev.ask("cam:a", acquire(ShardKind::Compute, 2, 30_000))
        .await;
    assert_eq!(
        dev.answer().await.answer,
        Answer::Refused(RequestRefusal::InsufficientQuota {
            kind: ShardKind::Compute,
            asked: 2,
            quota: 1,
            in_use: 0
        })
    );

    // `b`'s short lease runs out: `e`, queued, gets its units.
    let s_e = dev
        .ask("cam:e", acquire(ShardKind::Compute, 1, 30_000))
        .await;
    assert!(matches!(dev.answer().await.answer, Answer::Queued { .. }));
    let e = dev.answer().await;
    assert_eq!((e.instance.as_str(), e.request_seq), ("e", s_e));
    grant_of(&e);

    // A replayed request gets no second answer; a forged one is counted.
    let replay = AppRequest {
        device: dev.id.clone(),
        seq: 1,
        app: AppName::new("cam").unwrap(),
        instance: AppName::new("a").unwrap(),
        at_ms: now_ms(),
        op: RequestOp::Query,
    };
    dev.client
        .publish(
            topics::request(&dev.id),
            QoS::AtLeastOnce,
            false,
            request::seal_request(&replay, &dev.key),
        )
        .await
        .unwrap();
    let forged = AppRequest {
        seq: 1_000,
        ..replay
    };
    dev.client
        .publish(
            topics::request(&dev.id),
            QoS::AtLeastOnce,
            false,
            request::seal_request(&forged, &KeyPair::from_seed(&[9; 32])),
        )
        .await
        .unwrap();
    alloc.wait_metric(
        "shardline_messages_dropped_total{kind=\"request\",reason=\"bad_signature\"}",
        1.0,
        Duration::from_secs(10),
    );
    assert!(
        dev.next(Duration::from_millis(500)).await.is_none(),
        "no answer to either"
    );

    // Reputation moved with the outcomes: `a` completed, `b` let its
    // grant run out unreleased.
    let (status, va) = alloc.api("GET", "/v1/reputation/gw-r1:cam:a", None);
    assert_eq!(status, 200, "{va}");
    assert!(va["reputation"].as_f64().unwrap() > 50.0, "{va}");
    assert_eq!(va["history"][0]["reason"], "completed");
    let (_, vb) = alloc.api("GET", "/v1/reputation/gw-r1:cam:b", None);
    assert!(vb["reputation"].as_f64().unwrap() < 50.0, "{vb}");
    assert_eq!(vb["history"][0]["reason"], "expired_unreleased");

    // Operator endpoints.
    let (status, v) = alloc.api(
        "POST",
        "/v1/reputation/gw-r1:cam:b",
        Some(serde_json::json!({ "set": 70, "reason": "reviewed", "actor": "ops" })),
    );
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["reputation"].as_f64(), Some(70.0));
    let (status, _) = alloc.api(
        "POST",
        "/v1/reputation/gw-r1:cam:b",
        Some(serde_json::json!({ "delta": -5 })),
    );
    assert_eq!(status, 400, "a reason is required");
    assert!(
        alloc.log().contains("instance reputation adjusted"),
        "audited"
    );

    let (status, v) = alloc.api(
        "POST",
        "/v1/shard/request",
        Some(serde_json::json!({
            "instance": "gw-r1:svc:1", "op": "acquire", "kind": "data",
            "units": 1, "duration_ms": 20000
        })),
    );
    assert_eq!(status, 200, "{v}");
    assert!(v["answer"]["Granted"]["grant"].is_u64(), "{v}");
    let sent = dev.answer().await;
    assert_eq!((sent.app.as_str(), sent.request_seq), ("svc", 0));
    grant_of(&sent);

    // shardctl verbs.
    let out = alloc.shardctl(&[
        "request",
        "gw-r1:cli:1",
        "--type",
        "data",
        "--units",
        "1",
        "--for",
        "30s",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("granted grant"),
        "{out:?}"
    );
    grant_of(&dev.answer().await);
    let out = alloc.shardctl(&[
        "reputation",
        "gw-r1:cam:b",
        "--delta",
        "-10",
        "--reason",
        "noisy neighbour",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = alloc.shardctl(&["reputation", "gw-r1:cam:b"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("reputation 60.0") && text.contains("noisy neighbour"),
        "{text}"
    );
    let out = alloc.shardctl(&["device", "gw-r1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("application instances") && text.contains("gw-r1:cam:b"),
        "{text}"
    );

    assert!(alloc.metric("shardline_requests_granted_total") >= 6.0);
    assert!(alloc.metric("shardline_requests_queued_total") >= 2.0);
    assert!(alloc.metric("shardline_requests_refused_total{reason=\"insufficient_quota\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_and_reputations_survive_a_restart() {
    let dir = TempDir::new("requests-restart");
    let mut alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let key = device_key(8);
    let out = alloc.shardctl(&[
        "enroll",
        "gw-r2",
        &hex::encode(key.public_key()),
        "--tier",
        "standard",
    ]);
    assert!(out.status.success(), "{out:?}");
    let (status, _) = alloc.api(
        "POST",
        "/v1/reputation/gw-r2:cam:x",
        Some(serde_json::json!({ "set": 20, "reason": "test" })),
    );
    assert_eq!(status, 200);
    {
        let mut dev =
            Requester::connect("gw-r2", key.clone(), alloc.mqtt_port, alloc.public_key).await;
        dev.ask("bat:y", acquire(ShardKind::Data, 1, 60_000)).await;
        grant_of(&dev.answer().await);
    }
    alloc.kill9();
    alloc.spawn();
    let (status, v) = alloc.api("GET", "/v1/reputation/gw-r2:cam:x", None);
    assert_eq!(status, 200, "{v}");
    assert!(
        (v["reputation"].as_f64().unwrap() - 20.0).abs() < 0.1,
        "{v}"
    );
    let (_, v) = alloc.api("GET", "/v1/reputation/gw-r2:bat:y", None);
    assert_eq!(v["standing"]["data_in_use"], 1, "{v}");
    // The request floor survived too: seq 1 again is a replay.
    let mut dev = Requester::connect("gw-r2", key, alloc.mqtt_port, alloc.public_key).await;
    dev.ask("bat:y", RequestOp::Query).await;
    assert!(dev.next(Duration::from_millis(800)).await.is_none());
    dev.ask("bat:y", RequestOp::Query).await;
    assert!(matches!(dev.answer().await.answer, Answer::Standing(_)));
}
