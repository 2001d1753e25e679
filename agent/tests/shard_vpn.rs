//! The vpn capability between two network namespaces: two `shardline-agent
//! shards run vpn` processes (as the daemon would run them), each with a TUN
//! device, talk over a veth pair. Traffic sent into the TUN of one side
//! arrives intact at the other; a raw AF_PACKET capture on the veth shows the
//! tunnel's UDP packets and never the plaintext; swapping ChaCha20-Poly1305
//! for AES-256-GCM keeps the tunnel working. Needs root, `ip` and
//! /dev/net/tun; skips with the reason otherwise.

mod shard_common;

use shard_common::*;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const MARKER: &[u8] = b"SHARDLINE-PLAINTEXT-MARKER";

fn sh(args: &[&str]) {
    let st = Command::new(args[0])
        .args(&args[1..])
        .status()
        .expect("run command");
    assert!(st.success(), "{args:?} failed");
}

/// Two namespaces joined by a veth pair, each with a TUN device; removed on drop.
struct Netns {
    a: String,
    b: String,
    runs: Vec<Child>,
}

impl Netns {
    fn new(tag: &str) -> Self {
        let pid = std::process::id();
        let n = Self {
            a: format!("sl-{tag}-a-{pid}"),
            b: format!("sl-{tag}-b-{pid}"),
            runs: Vec::new(),
        };
        sh(&["ip", "netns", "add", &n.a]);
        sh(&["ip", "netns", "add", &n.b]);
        sh(&[
            "ip", "link", "add", "slva", "netns", &n.a, "type", "veth", "peer", "name", "slvb",
            "netns", &n.b,
        ]);
        for (ns, dev, outer, inner) in [
            (&n.a, "slva", "10.231.0.1/24", "10.232.0.1/24"),
            (&n.b, "slvb", "10.231.0.2/24", "10.232.0.2/24"),
        ] {
            sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
            sh(&["ip", "-n", ns, "addr", "add", outer, "dev", dev]);
            sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
            sh(&[
                "ip", "-n", ns, "tuntap", "add", "dev", "sltun", "mode", "tun",
            ]);
            sh(&["ip", "-n", ns, "addr", "add", inner, "dev", "sltun"]);
            sh(&["ip", "-n", ns, "link", "set", "sltun", "up"]);
        }
        n
    }

    fn stop_runs(&mut self) {
        for c in &mut self.runs {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for c in &mut self.runs {
            let deadline = Instant::now() + Duration::from_secs(3);
            while Instant::now() < deadline && c.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        self.runs.clear();
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.stop_runs();
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has entered network namespace `ns`.
fn in_netns<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

fn write_config(
    dir: &Path,
    shard_dir: &Path,
    file: &str,
    crypto: &str,
    role: &str,
    bind: &str,
    peer: Option<&str>,
) -> std::path::PathBuf {
    let psk = "5a".repeat(32);
    let sha = |id: &str| hex::encode(sha256_file(&lib_path(shard_dir, id)));
    let peer = peer
        .map(|p| format!("peer = \"{p}\"\n"))
        .unwrap_or_default();
    let text = format!(
        "shard_dir = \"{sd}\"\n\
         [[shard]]\nref = \"vpn-tunnel@0.1.0\"\nsha256 = \"{t}\"\n\
         [shard.config]\nrole = \"{role}\"\nbind = \"{bind}\"\n{peer}tun = \"sltun\"\nretry_ms = 200\n\
         [[shard]]\nref = \"{crypto}@0.1.0\"\nsha256 = \"{c}\"\n\
         [[shard]]\nref = \"auth-psk@0.1.0\"\nsha256 = \"{a}\"\n[shard.config]\npsk = \"{psk}\"\n",
        sd = shard_dir.display(),
        t = sha("vpn-tunnel"),
        c = sha(crypto),
        a = sha("auth-psk"),
    );
    let path = dir.join(file);
    std::fs::write(&path, text).expect("write config");
    path
}

/// Captures every frame of the current netns until `stop`: Ethernet frames
/// from the veth and raw IP packets from the TUN device.
fn capture(stop: Arc<AtomicBool>) -> Vec<Vec<u8>> {
    use nix::sys::socket::{
        recv, setsockopt, socket, sockopt, AddressFamily, MsgFlags, SockFlag, SockProtocol,
        SockType,
    };
    let fd = socket(
        AddressFamily::Packet,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::EthAll,
    )
    .expect("AF_PACKET socket");
    setsockopt(
        &fd,
        sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(0, 100_000),
    )
    .expect("timeout");
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65_536];
    while !stop.load(Ordering::SeqCst) {
        if let Ok(n) = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            frames.push(buf[..n].to_vec());
        }
    }
    frames
}

/// An Ethernet frame carrying IPv4 (what the veth shows; TUN packets have no link header).
fn is_ethernet_ipv4(f: &[u8]) -> bool {
    f.len() > 34 && f[12..14] == [0x08, 0x00] && f[14] >> 4 == 4
}

/// Sends marked datagrams A→B through the tunnel; returns (sent, received intact, capture frames).
fn exchange(net: &Netns) -> (usize, usize, Vec<Vec<u8>>) {
    let stop = Arc::new(AtomicBool::new(false));
    let cap = {
        let stop = stop.clone();
        in_netns(&net.b, move || capture(stop))
    };
    let receiver = {
        let stop = stop.clone();
        in_netns(&net.b, move || {
            let sock =
                UdpSocket::bind("10.232.0.2:7777").expect("bind receiver on B's tun address");
            sock.set_read_timeout(Some(Duration::from_millis(100)))
                .expect("timeout");
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while !stop.load(Ordering::SeqCst) {
                if let Ok(n) = sock.recv(&mut buf) {
                    got.push(buf[..n].to_vec());
                }
            }
            got
        })
    };
    let sender = in_netns(&net.a, move || {
        let sock = UdpSocket::bind("10.232.0.1:0").expect("bind sender on A's tun address");
        // Wait for the handshake: probe until B answers through the tunnel is not possible
        // one-way, so send probes for up to 5 s and then the measured batch.
        let mut sent = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut i = 0u32;
        while Instant::now() < deadline {
            let msg = [MARKER, format!("-probe-{i}").as_bytes()].concat();
            let _ = sock.send_to(&msg, "10.232.0.2:7777");
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        for i in 0..200u32 {
            let mut msg = [MARKER, format!("-data-{i:04}-").as_bytes()].concat();
            msg.extend(std::iter::repeat_n(b'x', 400));
            sock.send_to(&msg, "10.232.0.2:7777").expect("send");
            sent.push(msg);
            std::thread::sleep(Duration::from_millis(2));
        }
        sent
    });
    let sent = sender.join().expect("sender");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let got = receiver.join().expect("receiver");
    let frames = cap.join().expect("capture");
    let intact = sent.iter().filter(|m| got.contains(m)).count();
    (sent.len(), intact, frames)
}

fn start(net: &mut Netns, dir: &Path, shard_dir: &Path, crypto: &str) {
    start_with(net, dir, shard_dir, crypto, crypto, None);
}

/// Starts A (initiator, `crypto_a`) and B (responder, `crypto_b`); B's log goes to `b_log`.
fn start_with(
    net: &mut Netns,
    dir: &Path,
    shard_dir: &Path,
    crypto_a: &str,
    crypto_b: &str,
    b_log: Option<&Path>,
) {
    let a = write_config(
        dir,
        shard_dir,
        &format!("a-{crypto_a}.toml"),
        crypto_a,
        "initiator",
        "10.231.0.1:51820",
        Some("10.231.0.2:51820"),
    );
    let b = write_config(
        dir,
        shard_dir,
        &format!("b-{crypto_b}.toml"),
        crypto_b,
        "responder",
        "10.231.0.2:51820",
        None,
    );
    for (ns, cfg, log) in [(net.b.clone(), b, b_log), (net.a.clone(), a, None)] {
        let stderr = match log {
            Some(p) => Stdio::from(std::fs::File::create(p).expect("log file")),
            None => Stdio::inherit(),
        };
        let child = Command::new("ip")
            .args([
                "netns", "exec", &ns, AGENT, "shards", "run", "vpn", "--config",
            ])
            .arg(&cfg)
            .args(["--duration", "30"])
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("start shards run");
        net.runs.push(child);
    }
}

#[test]
fn vpn_tunnel_carries_traffic_between_namespaces_encrypted_with_either_crypto_shard() {
    if !is_root() {
        println!("SKIP: needs root for network namespaces and TUN devices");
        return;
    }
    if !Path::new("/dev/net/tun").exists() || Command::new("ip").arg("-V").output().is_err() {
        println!("SKIP: needs /dev/net/tun and iproute2");
        return;
    }
    let shards = shard_dir();
    let work = tempfile::tempdir().expect("tempdir");
    let mut net = Netns::new("vpn");
    for crypto in ["crypto-chacha20poly1305", "crypto-aes256gcm"] {
        start(&mut net, work.path(), shards.path(), crypto);
        let (sent, intact, frames) = exchange(&net);
        net.stop_runs();
        println!(
            "{crypto}: sent {sent}, arrived intact {intact}, captured {} frames on the veth",
            frames.len()
        );
        assert!(
            intact * 100 >= sent * 95,
            "{crypto}: only {intact} of {sent} datagrams arrived intact"
        );
        let has_marker = |f: &Vec<u8>| f.windows(MARKER.len()).any(|w| w == MARKER);
        let (wire, tun): (Vec<_>, Vec<_>) = frames.iter().partition(|f| is_ethernet_ipv4(f));
        // UDP (17) to or from port 51820: the tunnel's outer packets on the veth.
        let tunnel_frames = wire
            .iter()
            .filter(|f| {
                f[23] == 17
                    && (f[34..36] == 51820u16.to_be_bytes() || f[36..38] == 51820u16.to_be_bytes())
            })
            .count();
        assert!(
            tunnel_frames >= sent,
            "{crypto}: the capture saw {tunnel_frames} tunnel frames on the veth, fewer than sent"
        );
        let leaks = wire.iter().filter(|f| has_marker(f)).count();
        assert_eq!(
            leaks, 0,
            "{crypto}: plaintext visible on the wire in {leaks} frames"
        );
        // The same capture does see the plaintext where it should be: on B's TUN device.
        assert!(
            tun.iter().any(|f| has_marker(f)),
            "{crypto}: capture sanity check failed (no plaintext on the TUN side)"
        );
    }

    // Ends with different crypto shards refuse each other's handshake, and say why.
    let log = work.path().join("b-mismatch.log");
    start_with(
        &mut net,
        work.path(),
        shards.path(),
        "crypto-chacha20poly1305",
        "crypto-aes256gcm",
        Some(&log),
    );
    let (sent, intact, _) = exchange(&net);
    net.stop_runs();
    assert_eq!(
        intact, 0,
        "{intact} of {sent} arrived across mismatched ciphers"
    );
    let text = std::fs::read_to_string(&log).expect("read B's log");
    assert!(
        text.contains("both ends need the same crypto shard"),
        "B did not explain the refusal:\n{text}"
    );
}
