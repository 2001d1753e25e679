//! Explicit requests end to end over real MQTT (issue 18).
//!
//! 200 simulated devices (own Ed25519 keys, enrolled in the store) with 4
//! application instances each ask the real `shardline-allocator` binary
//! (embedded broker) for one unit at a time: 1,000 signed acquisitions per
//! second, each released (signed, outcome `Completed`) 200 ms after its
//! grant arrived, for `SECONDS` seconds — about 2,000 requests/s in all.
//! Latency is from publishing a signed acquisition to receiving its signed
//! grant (a queued request's grant included). One answer in 20 is fully
//! verified with the allocator's key; all are decoded.
//!
//! `cargo bench -p shardline-allocator --bench request_e2e`
//! (`SL_REQ_DEVICES`, `SL_REQ_RATE`, `SL_REQ_SECONDS`, `SL_REQ_RUNS`
//! override the defaults; `SL_REQ_NO_WRITE=1` only prints). Writes the
//! medians into the "Explicit requests" section of BENCHMARKS.md.

mod common;
use common::{
    device_key, env_or, free_port, machine, median, metric, now_ms, put_section, start_allocator,
};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use shardline_allocator::service::store::{Batch, DeviceRecord, RedbStore, Store};
use shardline_shared::ids::AppName;
use shardline_shared::msg::ShardKind;
use shardline_shared::request::{self, Answer, AppRequest, GrantOutcome, RequestAnswer, RequestOp};
use shardline_shared::sign::{self, KeyPair};
use shardline_shared::{topics, DeviceId, KeyId};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const INSTANCES: usize = 4;
const HOLD_MS: u64 = 200;

#[derive(Debug, Default)]
struct Outcome {
    acquisitions: u64,
    releases: u64,
    seconds: f64,
    granted: u64,
    queued: u64,
    refused: u64,
    missing: u64,
    p50_ms: f64,
    p99_ms: f64,
}

/// What the answer side tells the driver: release this grant after the hold.
struct ToRelease {
    device: usize,
    instance: usize,
    grant: u64,
    due: tokio::time::Instant,
}

#[derive(Default)]
struct Shared {
    /// (device, request seq) ⇒ µs since t0 when the acquisition was published.
    sent: HashMap<(usize, u64), u64>,
    latencies_us: Vec<u64>,
    queued: u64,
    refused: u64,
    answers: u64,
}

async fn one_run(bin: &Path, devices: usize, rate: usize, seconds: usize) -> Outcome {
    let dir = std::env::temp_dir().join(format!("sl-req-{}-{}", std::process::id(), now_ms()));
    std::fs::create_dir_all(&dir).unwrap();
    let key = shardline_allocator::service::keys::generate().unwrap();
    shardline_allocator::service::keys::write_secret(&dir.join("signing.key"), &key).unwrap();
    let allocator_public = key.public_key();
    let keys: Vec<KeyPair> = (0..devices).map(|i| device_key(11, i)).collect();
    let ids: Vec<DeviceId> = (0..devices)
        .map(|i| DeviceId::new(format!("req-{i:05}")).unwrap())
        .collect();
    {
        let store = RedbStore::open(&dir.join("allocator.redb")).unwrap();
        let batch = Batch {
            put_devices: ids
                .iter()
                .zip(&keys)
                .map(|(id, k)| {
                    let mut r = DeviceRecord::new(
                        id.clone(),
                        k.public_key(),
                        "standard".into(),
                        None,
                        now_ms(),
                    );
                    r.version = 1;
                    r
                })
                .collect(),
            ..Batch::default()
        };
        store.commit(&batch).unwrap();
    }
    let mqtt_port = free_port();
    let api_port = free_port();
    let (_alloc, api) = start_allocator(bin, &dir, "", mqtt_port, api_port).await;

    let t0 = Instant::now();
    let shared: Arc<Mutex<Shared>> = Arc::default();
    let (rel_tx, mut rel_rx) = tokio::sync::mpsc::unbounded_channel::<ToRelease>();

    // The answer side: one connection subscribed to every device's answers.
    let mut opts = MqttOptions::new("bench-answers-in", "127.0.0.1", mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_inflight(1000);
    let (sub, mut sub_ev) = AsyncClient::new(opts, 20_000);
    sub.subscribe("shardline/v1/dev/+/answer", QoS::AtLeastOnce)
        .await
        .unwrap();
    {
        let shared = shared.clone();
        let kid = KeyId::of_public_key(&allocator_public);
        tokio::spawn(async move {
            let mut n = 0u64;
            loop {
                match sub_ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let at = t0.elapsed().as_micros() as u64;
                        n += 1;
                        let a: RequestAnswer = if n % 20 == 0 {
                            match request::open_answer(&p.payload, |k| {
                                (k == kid).then_some(allocator_public)
                            }) {
                                Ok(a) => a,
                                Err(e) => panic!("an answer did not verify: {e}"),
                            }
                        } else {
                            let Ok(env) = sign::parse_envelope(&p.payload, 1 << 16) else {
                                continue;
                            };
                            let Ok(a) = shardline_shared::codec::decode(&env.payload) else {
                                continue;
                            };
                            a
                        };
                        let Some(device) = a
                            .device
                            .as_str()
                            .strip_prefix("req-")
                            .and_then(|n| n.parse::<usize>().ok())
                        else {
                            continue;
                        };
                        let instance = a.instance.as_str()[1..].parse::<usize>().unwrap_or(0);
                        let mut s = shared.lock().unwrap();
                        s.answers += 1;
                        match a.answer {
                            Answer::Granted(g) => {
                                if let Some(sent) = s.sent.remove(&(device, a.request_seq)) {
                                    s.latencies_us.push(at.saturating_sub(sent));
                                }
                                let _ = rel_tx.send(ToRelease {
                                    device,
                                    instance,
                                    grant: g.grant,
                                    due: tokio::time::Instant::now()
                                        + Duration::from_millis(HOLD_MS),
                                });
                            }
                            Answer::Queued { .. } => s.queued += 1,
                            Answer::Refused(_) => {
                                s.refused += 1;
                                s.sent.remove(&(device, a.request_seq));
                            }
                            _ => {}
                        }
                    }
                    Ok(_) => {}
                    Err(_) => return,
                }
            }
        });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Publishers: a device always on the same connection, so its requests
    // reach the broker in sequence order.
    const PUBLISHERS: usize = 2;
    let mut pubs = Vec::new();
    for p in 0..PUBLISHERS {
        let mut opts = MqttOptions::new(format!("bench-requests-out-{p}"), "127.0.0.1", mqtt_port);
        opts.set_keep_alive(Duration::from_secs(30));
        opts.set_inflight(1000);
        let (client, mut ev) = AsyncClient::new(opts, 20_000);
        tokio::spawn(async move {
            loop {
                if ev.poll().await.is_err() {
                    return;
                }
            }
        });
        pubs.push(client);
    }
    let apps: Vec<AppName> = (0..INSTANCES)
        .map(|i| AppName::new(format!("w{i}")).unwrap())
        .collect();
    let app = AppName::new("worker").unwrap();
    let mut seqs = vec![0u64; devices];
    let publish = |seqs: &mut Vec<u64>, i: usize, instance: usize, op: RequestOp| {
        seqs[i] += 1;
        let req = AppRequest {
            device: ids[i].clone(),
            seq: seqs[i],
            app: app.clone(),
            instance: apps[instance].clone(),
            at_ms: now_ms(),
            op,
        };
        (seqs[i], request::seal_request(&req, &keys[i]))
    };
    let granted0 = metric(&api, "shardline_requests_granted_total");
    let slot_ms = 10u64;
    let per_slot = (rate as u64 * slot_ms / 1000).max(1) as usize;
    let slots = seconds as u64 * 1000 / slot_ms;
    let start = tokio::time::Instant::now();
    let mut pending: Vec<ToRelease> = Vec::new();
    let (mut acquisitions, mut releases) = (0u64, 0u64);
    let mut k = 0usize;
    for s in 0..slots {
        tokio::time::sleep_until(start + Duration::from_millis(s * slot_ms)).await;
        while let Ok(r) = rel_rx.try_recv() {
            pending.push(r);
        }
        let now = tokio::time::Instant::now();
        let (due, later): (Vec<_>, Vec<_>) = pending.drain(..).partition(|r| r.due <= now);
        pending = later;
        for r in due {
            let (_, bytes) = publish(
                &mut seqs,
                r.device,
                r.instance,
                RequestOp::Release {
                    grant: r.grant,
                    outcome: GrantOutcome::Completed,
                },
            );
            pubs[r.device % PUBLISHERS]
                .publish(
                    topics::request(&ids[r.device]),
                    QoS::AtLeastOnce,
                    false,
                    bytes,
                )
                .await
                .unwrap();
            releases += 1;
        }
        for _ in 0..per_slot {
            // Round robin over devices, then instances: each instance asks
            // about once per devices × instances / rate seconds.
            let i = k % devices;
            let instance = (k / devices) % INSTANCES;
            k += 1;
            let kind = if (k / (devices * INSTANCES)) % 2 == 0 {
                ShardKind::Compute
            } else {
                ShardKind::Data
            };
            let (seq, bytes) = publish(
                &mut seqs,
                i,
                instance,
                RequestOp::Acquire {
                    kind,
                    units: 1,
                    duration_ms: 30_000,
                    priority: 0,
                },
            );
            shared
                .lock()
                .unwrap()
                .sent
                .insert((i, seq), t0.elapsed().as_micros() as u64);
            pubs[i % PUBLISHERS]
                .publish(topics::request(&ids[i]), QoS::AtLeastOnce, false, bytes)
                .await
                .unwrap();
            acquisitions += 1;
        }
    }
    let send_secs = start.elapsed().as_secs_f64();
    // Wait for the last grants (and queue timeouts) to come back.
    let drain = Instant::now() + Duration::from_secs(15);
    while Instant::now() < drain {
        if shared.lock().unwrap().sent.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let granted = (metric(&api, "shardline_requests_granted_total") - granted0) as u64;
    let mut s = shared.lock().unwrap();
    let mut lat = std::mem::take(&mut s.latencies_us);
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
    };
    let out = Outcome {
        acquisitions,
        releases,
        seconds: send_secs,
        granted,
        queued: s.queued,
        refused: s.refused,
        missing: s.sent.len() as u64,
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
    };
    drop(s);
    drop(pubs);
    let _ = std::fs::remove_dir_all(&dir);
    out
}

fn main() {
    let devices = env_or("SL_REQ_DEVICES", 200);
    let rate = env_or("SL_REQ_RATE", 1_000);
    let seconds = env_or("SL_REQ_SECONDS", 12);
    let runs = env_or("SL_REQ_RUNS", 3);
    let load_at_start = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into());
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_shardline-allocator"));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut outs = Vec::new();
    for run in 0..runs {
        let o = rt.block_on(one_run(&bin, devices, rate, seconds));
        println!(
            "run {run}: {} acquisitions + {} releases in {:.2} s = {:.0} requests/s; granted {} queued {} refused {} missing {}; acquire → grant p50 {:.1} ms p99 {:.1} ms",
            o.acquisitions,
            o.releases,
            o.seconds,
            (o.acquisitions + o.releases) as f64 / o.seconds,
            o.granted,
            o.queued,
            o.refused,
            o.missing,
            o.p50_ms,
            o.p99_ms
        );
        outs.push(o);
    }
    let rate_done = median(
        outs.iter()
            .map(|o| (o.acquisitions + o.releases) as f64 / o.seconds)
            .collect(),
    );
    let acq_rate = median(
        outs.iter()
            .map(|o| o.acquisitions as f64 / o.seconds)
            .collect(),
    );
    let p50 = median(outs.iter().map(|o| o.p50_ms).collect());
    let p99 = median(outs.iter().map(|o| o.p99_ms).collect());
    let missing = outs.iter().map(|o| o.missing).max().unwrap_or(0);
    let refused = outs.iter().map(|o| o.refused).max().unwrap_or(0);
    let queued = outs.iter().map(|o| o.queued).max().unwrap_or(0);
    let met = acq_rate >= 0.98 * rate as f64 && p99 <= 50.0 && missing == 0;
    let row = format!(
        "| embedded | {devices} × {INSTANCES} | {seconds} s | {acq_rate:.0} | {rate_done:.0} | {p50:.1} | {p99:.1} | {queued} | {refused} | {missing} | {} |",
        if met { "met" } else { "**missed**" }
    );
    let section = section(&row, &load_at_start, runs);
    println!("{section}");
    if std::env::var_os("SL_REQ_NO_WRITE").is_none() {
        write_section(&section);
    }
}

/// How to read the row.
const NOTE: &str = "Reading: per request, the signature is checked on the core thread (requests are far fewer than reports, so they skip the verifier threads), then the engine decides and the device's record is group-committed (redb, fsync) before the signed answer is published: as for reports, the p50 is mostly that commit. Nothing queued or was refused here: each instance holds at most one unit at a time, within its quota (half of the `standard` tier's 3 + 3 units at the starting score) and the device's pool. The load average at start is above: on this 2-core machine, load from other work shows in the tail first.";

fn section(row: &str, load: &str, runs: usize) -> String {
    format!(
        "## Explicit requests\n\n\
         End to end over MQTT (issue 18): simulated devices (own Ed25519 keys, enrolled in the store, tier \
         `standard`) with 4 application instances each send signed acquisitions of one unit (compute and data in \
         turn) into the real `shardline-allocator` (embedded broker: verify, sequence floor, rate limit, quota, pool, \
         grant or queue, store commit, sign, publish), and release each grant (signed, `Completed`) {HOLD_MS} ms \
         after it arrived. Latency is from publishing a signed acquisition to receiving its signed grant (a queued \
         one's later grant included). Refused = answers refusing an acquisition; missing = acquisitions with \
         neither a grant nor a refusal 15 s after the last was sent. Target: 1,000 acquisitions/s sustained for \
         at least 10 s, p99 <= 50 ms. Median of {runs} runs.\n\n\
         Machine: {}\n\n\
         Command: `cargo bench -p shardline-allocator --bench request_e2e`\n\n\
         | broker | devices × instances | duration | acquisitions/s | requests/s (with releases) | p50 ms | p99 ms | queued (max) | refused (max) | missing | target |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n\
         {row}\n\n{NOTE}\n",
        machine(load)
    )
}

fn write_section(section: &str) {
    put_section("## Explicit requests", section, Some("## Policy engine"));
}
