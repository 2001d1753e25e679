//! Explicit shard requests from local applications (issue 18), against real
//! parts: a real mosquitto with the shipped fleet settings (logins and the
//! ACL that lets a device publish `request` and read `answer`), the real
//! agent (`shardline-agent run`) logging in as its device, applications
//! talking to its socket through `shardline-client` and the real
//! `shardline-agent request` binary, and the allocator played by a plain
//! MQTT client logged in as `shardline-allocator` with the test allocator
//! key: it receives each signed request from the broker, opens it with the
//! device's key, and publishes signed answers.
//!
//! What each test shows:
//! - a grant reaches the application, and what the allocator received is
//!   the application's request signed by the device key;
//! - a queued acquire that waits gets `queued` and then its grant on the
//!   same connection;
//! - a refusal reaches the CLI in words, with exit code 3;
//! - an answer signed by a key the device does not trust is dropped and
//!   counted: the application gets the timeout error;
//! - peer credentials: a uid may act only as an application that declares
//!   it (the CLI run under other uids with `setpriv`);
//! - broker down: an immediate, clear error and nothing sent later;
//! - a flooding instance is refused locally (`rate_limited`), another
//!   instance is not;
//! - the request sequence keeps increasing across an agent restart;
//! - renew and release from the CLI reach the allocator as asked, and an
//!   out-of-range acquire is refused by the agent without being sent;
//! - the socket answers garbage and invalid names with errors, closes a
//!   connection after a line above 4 KiB, and bounds open connections;
//! - a reload (SIGHUP) applies new `[[apps]]` to the next request.

mod daemon_support;

use daemon_support::{allocator_key, now_ms, status_counter, wait_for, Agent, Broker, Peer};
use rumqttc::QoS;
use shardline_client::{Answer as LocalAnswer, Client, ClientError, Kind, Request};
use shardline_shared::msg::ShardKind;
use shardline_shared::request::{
    self, Answer, AppRequest, Grant, InstanceStanding, RequestAnswer, RequestOp, RequestRefusal,
};
use shardline_shared::sign::KeyPair;
use shardline_shared::{topics, DeviceId};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

const PW_A: &str = "gw-a-password-0123456789";
const PW_ALLOC: &str = "allocator-password-abcdef";
/// The uid declared for `cam`, and one declared for `nas` only.
const CAM_UID: u32 = 4242;
const NAS_UID: u32 = 4243;
const ANSWER_TIMEOUT_MS: u64 = 1500;
const MAX_CONNECTIONS: usize = 3;

/// The `[requests]` and `[[apps]]` of every test agent.
fn requests_toml(dir: &Path, max_per_second: u32, burst: u32) -> String {
    format!(
        "\n[requests]\nsocket = \"{}\"\nanswer_timeout_ms = {ANSWER_TIMEOUT_MS}\n\
         max_per_second = {max_per_second}\nburst = {burst}\nmax_connections = {MAX_CONNECTIONS}\n\n\
         [[apps]]\nname = \"cam\"\nuids = [{CAM_UID}]\n\n\
         [[apps]]\nname = \"nas\"\nuids = [{NAS_UID}]\n",
        dir.join("agent.sock").display()
    )
}

/// What the test allocator answers a request with: sealed answers, each
/// published after its delay.
type Policy = Box<dyn FnMut(&AppRequest) -> Vec<(Duration, Vec<u8>)> + Send>;

/// The allocator's part: receives requests from the broker, checks they
/// open with the device key, answers by `policy`, and passes every request
/// on to the test.
struct Allocator {
    requests: mpsc::Receiver<AppRequest>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Allocator {
    fn start(port: u16, device: &DeviceId, device_key: [u8; 32], mut policy: Policy) -> Self {
        let mut peer = Peer::connect(
            port,
            "shardline-allocator",
            Some(("shardline-allocator", PW_ALLOC)),
        )
        .expect("the allocator logs in");
        let codes = peer.subscribe(&topics::request(device));
        assert!(
            matches!(codes[..], [rumqttc::SubscribeReasonCode::Success(_)]),
            "the ACL lets the allocator read requests: {codes:?}"
        );
        let (tx, requests) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let device = device.clone();
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                for (topic, payload) in peer.drain(Duration::from_millis(20)) {
                    assert_eq!(topic, topics::request(&device));
                    let req = request::open_request(&payload, &device, &device_key)
                        .expect("the request is signed by the device key");
                    for (delay, answer) in policy(&req) {
                        std::thread::sleep(delay);
                        peer.publish(&topics::answer(&device), answer, QoS::AtLeastOnce, false);
                    }
                    if tx.send(req).is_err() {
                        return;
                    }
                }
            }
        });
        Allocator {
            requests,
            stop,
            thread: Some(thread),
        }
    }

    fn next(&self, timeout: Duration) -> Option<AppRequest> {
        self.requests.recv_timeout(timeout).ok()
    }

    fn all_within(&self, window: Duration) -> Vec<AppRequest> {
        let deadline = Instant::now() + window;
        let mut out = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.requests.recv_timeout(left) {
                Ok(r) => out.push(r),
                Err(_) => break,
            }
        }
        out
    }
}

impl Drop for Allocator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An answer to `req`, sealed by `key`.
fn answer(req: &AppRequest, a: Answer, key: &KeyPair) -> Vec<u8> {
    request::seal_answer(
        &RequestAnswer {
            device: req.device.clone(),
            app: req.app.clone(),
            instance: req.instance.clone(),
            request_seq: req.seq,
            issued_at_ms: now_ms(),
            answer: a,
        },
        &[key],
    )
}

fn grant_for(req: &AppRequest, id: u64) -> Answer {
    let (kind, units, ms) = match req.op {
        RequestOp::Acquire {
            kind,
            units,
            duration_ms,
            ..
        } => (kind, units, duration_ms),
        _ => (ShardKind::Compute, 0, 0),
    };
    Answer::Granted(Grant {
        grant: id,
        kind,
        units,
        expires_at_ms: now_ms() + u64::from(ms),
    })
}

fn standing() -> Answer {
    Answer::Standing(InstanceStanding {
        reputation_tenths: 525,
        device_reputation_tenths: 610,
        compute_quota_units: 4,
        data_quota_units: 2,
        compute_in_use: 0,
        data_in_use: 0,
        queued: 0,
    })
}

/// Broker, agent `gw-a` logged in with its password, and its socket path.
struct Rig {
    tmp: tempfile::TempDir,
    broker: Broker,
    agent: Agent,
    socket: PathBuf,
}

fn rig(max_per_second: u32, burst: u32) -> Option<Rig> {
    let tmp = tempfile::tempdir().unwrap();
    let broker = Broker::start_shipped(
        tmp.path(),
        &[("gw-a", PW_A), ("shardline-allocator", PW_ALLOC)],
        "",
    )?;
    let pw = tmp.path().join("mqtt-password");
    std::fs::write(&pw, format!("{PW_A}\n")).unwrap();
    std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
    let mut agent = Agent::new_with_broker(
        tmp.path(),
        "gw-a",
        &broker.url(),
        1000,
        &format!("password_file = \"{}\"\n", pw.display()),
        &requests_toml(tmp.path(), max_per_second, burst),
    );
    agent.start(&[]);
    let socket = tmp.path().join("agent.sock");
    wait_connected(&agent, true);
    assert!(socket.exists(), "the agent opened its request socket");
    Some(Rig {
        tmp,
        broker,
        agent,
        socket,
    })
}

impl Rig {
    /// The test's allocator for this rig's device, answering with `policy`.
    fn allocator(&self, policy: Policy) -> Allocator {
        Allocator::start(
            self.broker.port,
            &self.agent.device,
            self.agent.public_key,
            policy,
        )
    }
}

/// A policy that answers every request with the instance's standing.
fn answers_standing() -> Policy {
    Box::new(|req| vec![(Duration::ZERO, answer(req, standing(), &allocator_key()))])
}

fn wait_connected(agent: &Agent, want: bool) {
    wait_for(Duration::from_secs(15), || {
        (agent.status()?["connected"].as_bool()? == want).then_some(())
    })
    .unwrap_or_else(|| panic!("agent connected = {want}\n{}", agent.log()));
}

fn acquire(instance: &str, units: u32, wait_ms: u32) -> Request {
    Request::Acquire {
        app: "cam".into(),
        instance: instance.into(),
        kind: Kind::Compute,
        units,
        for_ms: 30_000,
        priority: 0,
        wait_ms,
    }
}

/// Runs the CLI binary (optionally as another uid through `setpriv`).
fn cli(bin: &Path, socket: &Path, uid: Option<u32>, args: &[&str]) -> std::process::Output {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={uid}"))
                .arg(format!("--regid={uid}"))
                .arg("--clear-groups")
                .arg(bin);
            c
        }
        None => Command::new(bin),
    };
    cmd.arg("request").arg("--socket").arg(socket).args(args);
    cmd.output().expect("run shardline-agent request")
}

fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shardline-agent"))
}

#[test]
fn a_grant_reaches_the_application_and_the_request_is_signed_by_the_device() {
    let Some(r) = rig(50, 100) else { return };
    let alloc = r.allocator(Box::new(|req| {
        let a = match req.op {
            RequestOp::Query => standing(),
            _ => grant_for(req, 5),
        };
        vec![(Duration::ZERO, answer(req, a, &allocator_key()))]
    }));
    let mut c = Client::connect(&r.socket).unwrap();
    let a = c
        .acquire(
            "cam",
            "w1",
            Kind::Compute,
            2,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .unwrap();
    match a {
        LocalAnswer::Granted {
            grant,
            kind,
            units,
            expires_at_ms,
        } => {
            assert_eq!((grant, kind, units), (5, Kind::Compute, 2));
            assert!(expires_at_ms > now_ms());
        }
        other => panic!("{other:?}"),
    }
    let req = alloc
        .next(Duration::from_secs(5))
        .expect("the allocator got it");
    assert_eq!(req.device, r.agent.device);
    assert_eq!((req.app.as_str(), req.instance.as_str()), ("cam", "w1"));
    assert_eq!(
        req.op,
        RequestOp::Acquire {
            kind: ShardKind::Compute,
            units: 2,
            duration_ms: 30_000,
            priority: 0
        }
    );
    // The same connection serves the next request.
    let a = c.query("cam", "w1").unwrap();
    assert!(
        matches!(a, LocalAnswer::Standing { reputation, .. } if (reputation - 52.5).abs() < 1e-9),
        "{a:?}"
    );
    assert_eq!(
        alloc.next(Duration::from_secs(5)).unwrap().op,
        RequestOp::Query
    );
    assert!(status_counter_nested(&r.agent, "answered") >= 1);
    drop(r.tmp);
}

/// A counter of `status.json`'s `requests.counters`.
fn status_counter_nested(agent: &Agent, field: &str) -> u64 {
    wait_for(Duration::from_secs(3), || {
        let v = agent.status()?["requests"]["counters"][field].as_u64()?;
        (v > 0).then_some(v)
    })
    .unwrap_or(0)
}

#[test]
fn a_queued_acquire_that_waits_gets_its_grant_on_the_same_connection() {
    let Some(r) = rig(50, 100) else { return };
    let _alloc = r.allocator(Box::new(|req| {
        let key = allocator_key();
        vec![
            (
                Duration::ZERO,
                answer(
                    req,
                    Answer::Queued {
                        ticket: 9,
                        position: 1,
                        expected_wait_ms: 400,
                    },
                    &key,
                ),
            ),
            // Later than the answer timeout: waiting is the caller's
            // wait_ms, not the first answer's deadline.
            (
                Duration::from_millis(ANSWER_TIMEOUT_MS + 500),
                answer(req, grant_for(req, 9), &key),
            ),
        ]
    }));
    let mut c = Client::connect(&r.socket).unwrap();
    let mut progress = Vec::new();
    let a = c
        .call(&acquire("w1", 3, 10_000), |a| progress.push(a.clone()))
        .unwrap();
    assert_eq!(
        progress,
        vec![LocalAnswer::Queued {
            ticket: 9,
            position: 1,
            expected_wait_ms: 400
        }]
    );
    assert!(
        matches!(
            a,
            LocalAnswer::Granted {
                grant: 9,
                units: 3,
                ..
            }
        ),
        "{a:?}"
    );
}

#[test]
fn a_refusal_reaches_the_cli_in_words_with_exit_code_3() {
    let Some(r) = rig(50, 100) else { return };
    let _alloc = r.allocator(Box::new(|req| {
        let refusal = RequestRefusal::InsufficientQuota {
            kind: ShardKind::Data,
            asked: 8,
            quota: 4,
            in_use: 2,
        };
        vec![(
            Duration::ZERO,
            answer(req, Answer::Refused(refusal), &allocator_key()),
        )]
    }));
    let out = cli(
        &agent_bin(),
        &r.socket,
        None,
        &[
            "--app",
            "cam",
            "--instance",
            "w1",
            "--type",
            "data",
            "--units",
            "8",
            "--for",
            "30s",
        ],
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains(
            "refused (insufficient_quota): insufficient quota: asked 8 data units, quota 4, in use 2"
        ),
        "{stdout}"
    );
    // And through the client: the reason word and the same words.
    let mut c = Client::connect(&r.socket).unwrap();
    let a = c
        .acquire(
            "cam",
            "w1",
            Kind::Data,
            8,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .unwrap();
    assert!(
        matches!(&a, LocalAnswer::Refused { reason, detail } if reason == "insufficient_quota" && detail.contains("quota 4")),
        "{a:?}"
    );
}

#[test]
fn an_answer_signed_by_an_unknown_key_is_ignored_and_the_caller_times_out() {
    let Some(r) = rig(50, 100) else { return };
    let stranger = KeyPair::from_seed(&[7; 32]);
    let _alloc = r.allocator(Box::new(move |req| {
        vec![(Duration::ZERO, answer(req, grant_for(req, 1), &stranger))]
    }));
    let mut c = Client::connect(&r.socket).unwrap();
    let started = Instant::now();
    let e = c
        .acquire(
            "cam",
            "w1",
            Kind::Compute,
            1,
            Duration::from_secs(30),
            Duration::ZERO,
        )
        .unwrap_err();
    match e {
        ClientError::Agent(text) => assert_eq!(
            text,
            format!("no answer from the allocator within {ANSWER_TIMEOUT_MS} ms")
        ),
        other => panic!("{other:?}"),
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(ANSWER_TIMEOUT_MS - 100) && took < Duration::from_secs(5),
        "{took:?}"
    );
    assert!(status_counter_nested(&r.agent, "answers_unverified") >= 1);
    assert!(status_counter_nested(&r.agent, "timed_out") >= 1);
    assert!(r.agent.log().contains("answer from the broker dropped"));
}

#[test]
fn peer_credentials_decide_which_application_a_caller_may_act_as() {
    let Some(r) = rig(50, 100) else { return };
    let _alloc = r.allocator(answers_standing());
    // Other uids must reach the socket and run the binary: a copy in a
    // directory everyone may enter (the target directory may be private).
    std::fs::set_permissions(r.tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin_dir = r.tmp.path().join("bin");
    std::fs::create_dir(&bin_dir).unwrap();
    let bin = bin_dir.join("shardline-agent");
    std::fs::copy(agent_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mode = std::fs::metadata(&r.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode, 0o666,
        "any local user may connect; credentials decide"
    );

    let query = ["--app", "cam", "--instance", "w1", "--query"];
    let as_cam = cli(&bin, &r.socket, Some(CAM_UID), &query);
    let shown = String::from_utf8_lossy(&as_cam.stdout).into_owned();
    assert_eq!(
        as_cam.status.code(),
        Some(0),
        "{shown}{}",
        String::from_utf8_lossy(&as_cam.stderr)
    );
    assert!(
        shown.contains("standing: reputation 52.5 (device 61.0)"),
        "{shown}"
    );

    let as_nas = cli(&bin, &r.socket, Some(NAS_UID), &query);
    let shown = String::from_utf8_lossy(&as_nas.stdout).into_owned();
    assert_eq!(as_nas.status.code(), Some(3), "{shown}");
    assert!(
        shown.contains(
            "refused (not_authorized): uid 4243 (gid 4243) may not act as application \"cam\""
        ),
        "{shown}"
    );
    let stranger = cli(&bin, &r.socket, Some(5555), &query);
    assert_eq!(stranger.status.code(), Some(3));
    // Root (the operator's tool) may act as any declared application, but
    // not as an undeclared one.
    let root = cli(&bin, &r.socket, None, &["--app", "nas", "--query"]);
    assert_eq!(
        root.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&root.stdout)
    );
    let ghost = cli(&bin, &r.socket, None, &["--app", "ghost", "--query"]);
    assert_eq!(ghost.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&ghost.stdout).contains("not declared"));
    assert!(status_counter_nested(&r.agent, "refused_not_authorized") >= 3);
}

#[test]
fn with_the_broker_down_a_request_gets_an_immediate_clear_error() {
    let Some(mut r) = rig(50, 100) else { return };
    let device = r.agent.device.clone();
    r.broker.kill9();
    wait_connected(&r.agent, false);
    let started = Instant::now();
    let out = cli(
        &agent_bin(),
        &r.socket,
        None,
        &[
            "--app", "cam", "--type", "compute", "--units", "1", "--for", "10s",
        ],
    );
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("error: not connected to the allocator broker; request not sent"),
        "{stderr}"
    );
    assert!(took < Duration::from_secs(2), "immediate: {took:?}");
    assert_eq!(
        r.agent.status().unwrap()["requests"]["pending"].as_u64(),
        Some(0),
        "nothing is kept for later"
    );
    // Nothing was queued to go out when the broker is back.
    r.broker.restart();
    wait_connected(&r.agent, true);
    let alloc = Allocator::start(
        r.broker.port,
        &device,
        r.agent.public_key,
        Box::new(|_| Vec::new()),
    );
    assert!(alloc.all_within(Duration::from_millis(1500)).is_empty());
}

#[test]
fn a_flooding_instance_is_rate_limited_alone() {
    // One request per second after a burst of 4.
    let Some(r) = rig(1, 4) else { return };
    let alloc = r.allocator(answers_standing());
    let mut c = Client::connect(&r.socket).unwrap();
    let (mut answered, mut limited) = (0, 0);
    let started = Instant::now();
    for _ in 0..12 {
        match c.query("cam", "flood").unwrap() {
            LocalAnswer::Standing { .. } => answered += 1,
            LocalAnswer::Refused { reason, detail } => {
                assert_eq!(reason, "rate_limited");
                assert!(detail.contains("retry after"), "{detail}");
                limited += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let secs = started.elapsed().as_secs();
    assert!(
        answered >= 4 && answered <= 4 + secs as usize + 1,
        "{answered} answered in {secs} s"
    );
    assert_eq!(answered + limited, 12);
    assert!(limited >= 6, "{limited}");
    // Another instance (and another connection) is unaffected.
    let mut other = Client::connect(&r.socket).unwrap();
    assert!(matches!(
        other.query("cam", "calm").unwrap(),
        LocalAnswer::Standing { .. }
    ));
    // Refused requests never reached the allocator.
    let seen = alloc.all_within(Duration::from_millis(500));
    let flood = seen
        .iter()
        .filter(|q| q.instance.as_str() == "flood")
        .count();
    assert_eq!(flood, answered);
    assert!(status_counter_nested(&r.agent, "refused_rate_limited") >= 6);
    assert_eq!(status_counter(&r.agent, "link_drops"), 0);
}

#[test]
fn the_request_sequence_keeps_increasing_across_a_restart() {
    let Some(mut r) = rig(50, 100) else { return };
    let mut seqs = Vec::new();
    for round in 0..2 {
        let alloc = r.allocator(answers_standing());
        let mut c = Client::connect(&r.socket).unwrap();
        for _ in 0..3 {
            assert!(matches!(
                c.query("cam", "w1").unwrap(),
                LocalAnswer::Standing { .. }
            ));
            seqs.push(alloc.next(Duration::from_secs(5)).expect("request").seq);
        }
        drop(c);
        drop(alloc);
        if round == 0 {
            assert!(r.agent.sigterm().success());
            assert!(!r.socket.exists(), "the socket file goes with the agent");
            // The stopped agent's last status said "connected": wait for
            // the new one's own word.
            std::fs::remove_file(r.agent.dir.join("state/status.json")).unwrap();
            r.agent.start(&[]);
            wait_connected(&r.agent, true);
            wait_for(Duration::from_secs(5), || r.socket.exists().then_some(()))
                .expect("socket back");
        }
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let file: serde_json::Value =
        serde_json::from_slice(&std::fs::read(r.agent.dir.join("state/request_seq.json")).unwrap())
            .unwrap();
    let ceiling = file["reserved_through"].as_u64().unwrap();
    assert!(seqs.iter().all(|s| *s <= ceiling), "{seqs:?} ≤ {ceiling}");
    // The restart resumed above the first run's whole reservation.
    assert!(seqs[3] > 1024, "{seqs:?}");
}

#[test]
fn the_socket_bounds_lines_and_connections_and_survives_garbage() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixStream;
    let Some(r) = rig(50, 100) else { return };
    let read_line = |s: &UnixStream| {
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    };
    // Garbage gets an error line; the connection stays usable.
    let mut s = UnixStream::connect(&r.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for junk in [
        "not json\n",
        "{\"op\":\"acquire\"}\n",
        "\u{0}\u{1}\u{ff}\n",
        "[]\n",
    ] {
        s.write_all(junk.as_bytes()).unwrap();
        let a: LocalAnswer = serde_json::from_str(&read_line(&s)).unwrap();
        assert!(
            matches!(&a, LocalAnswer::Error { error } if error.starts_with("not a request")),
            "{junk:?}: {a:?}"
        );
    }
    s.write_all(b"{\"op\":\"query\",\"app\":\"../etc\"}\n")
        .unwrap();
    let a: LocalAnswer = serde_json::from_str(&read_line(&s)).unwrap();
    assert!(matches!(a, LocalAnswer::Error { .. }), "{a:?}");
    // A line above 4 KiB: an error line, then the agent closes.
    let long = format!("{{\"op\":\"query\",\"app\":\"{}\"}}\n", "x".repeat(5000));
    let _ = s.write_all(long.as_bytes());
    let a: LocalAnswer = serde_json::from_str(&read_line(&s)).unwrap();
    assert_eq!(
        a,
        LocalAnswer::Error {
            error: "request line longer than 4096 bytes".into()
        }
    );
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let after: String = String::from_utf8_lossy(&rest).into_owned();
    assert!(after.is_empty(), "closed after the error: {after:?}");
    drop(s);

    // At most MAX_CONNECTIONS at once: one more gets an error and is closed.
    std::thread::sleep(Duration::from_millis(200)); // the closed one is released
    let held: Vec<UnixStream> = (0..MAX_CONNECTIONS)
        .map(|_| UnixStream::connect(&r.socket).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let extra = UnixStream::connect(&r.socket).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let a: LocalAnswer = serde_json::from_str(&read_line(&extra)).unwrap();
    assert!(
        matches!(&a, LocalAnswer::Error { error } if error.contains("3 request connections open")),
        "{a:?}"
    );
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    // Slots come back when connections close, and the agent still answers.
    let _alloc = r.allocator(answers_standing());
    let mut c = Client::connect(&r.socket).unwrap();
    assert!(matches!(
        c.query("cam", "w1").unwrap(),
        LocalAnswer::Standing { .. }
    ));
}

#[test]
fn renew_and_release_through_the_cli_reach_the_allocator_as_asked() {
    let Some(r) = rig(50, 100) else { return };
    let alloc = r.allocator(Box::new(|req| {
        let a = match req.op {
            RequestOp::Renew { grant, duration_ms } => Answer::Renewed(Grant {
                grant,
                kind: ShardKind::Data,
                units: 2,
                expires_at_ms: now_ms() + u64::from(duration_ms),
            }),
            RequestOp::Release { grant, .. } => Answer::Released { grant, units: 2 },
            _ => Answer::Refused(RequestRefusal::UnknownGrant { grant: 0 }),
        };
        vec![(Duration::ZERO, answer(req, a, &allocator_key()))]
    }));
    let base = ["--app", "cam", "--instance", "w7"];
    let renew = cli(
        &agent_bin(),
        &r.socket,
        None,
        &[&base[..], &["--renew", "5", "--for", "2m"]].concat(),
    );
    let shown = String::from_utf8_lossy(&renew.stdout).into_owned();
    assert_eq!(renew.status.code(), Some(0), "{shown}");
    assert!(
        shown.starts_with("renewed: grant 5, 2 data units until "),
        "{shown}"
    );
    let req = alloc.next(Duration::from_secs(5)).unwrap();
    assert_eq!(
        req.op,
        RequestOp::Renew {
            grant: 5,
            duration_ms: 120_000
        }
    );
    assert_eq!(req.instance.as_str(), "w7");

    let release = cli(
        &agent_bin(),
        &r.socket,
        None,
        &[&base[..], &["--release", "5", "--outcome", "over_limit"]].concat(),
    );
    let shown = String::from_utf8_lossy(&release.stdout).into_owned();
    assert_eq!(release.status.code(), Some(0), "{shown}");
    assert_eq!(shown.trim(), "released: grant 5 (2 units returned)");
    assert_eq!(
        alloc.next(Duration::from_secs(5)).unwrap().op,
        RequestOp::Release {
            grant: 5,
            outcome: request::GrantOutcome::OverLimit
        }
    );
    // Out of range is refused by the agent, before anything is sent.
    let big = cli(
        &agent_bin(),
        &r.socket,
        None,
        &[
            &base[..],
            &["--type", "compute", "--units", "65", "--for", "1s"],
        ]
        .concat(),
    );
    assert_eq!(big.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&big.stdout).contains("refused (out_of_range)"));
    assert!(alloc.all_within(Duration::from_millis(300)).is_empty());
}

#[test]
fn a_reload_applies_new_apps_to_the_next_request() {
    let Some(r) = rig(50, 100) else { return };
    let _alloc = r.allocator(answers_standing());
    let mut c = Client::connect(&r.socket).unwrap();
    let a = c.query("late", "w1").unwrap();
    assert!(
        matches!(&a, LocalAnswer::Refused { reason, .. } if reason == "not_authorized"),
        "{a:?}"
    );
    let mut text = std::fs::read_to_string(&r.agent.config).unwrap();
    text.push_str("\n[[apps]]\nname = \"late\"\nuids = [4300]\n");
    std::fs::write(&r.agent.config, text).unwrap();
    r.agent.sighup();
    let ok = wait_for(Duration::from_secs(5), || {
        matches!(c.query("late", "w1").ok()?, LocalAnswer::Standing { .. }).then_some(())
    });
    assert!(
        ok.is_some(),
        "the reloaded [[apps]] apply\n{}",
        r.agent.log()
    );
}
