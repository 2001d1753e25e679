//! QUIC's server name, read from real QUIC: a `quinn` client (the QUIC
//! stack of much of the Rust ecosystem) opens a connection to a plain UDP
//! socket, which receives the client's first datagram as sent on the wire.
//! The monitor must read the ClientHello's SNI from that encrypted Initial
//! packet: directly, and in a capture through `shardline-agent monitor`,
//! where the flow must then take the name's class (YouTube's video CDN is
//! streaming, not web).

mod monitor_support;

use monitor_support::*;
use serde_json::Value;
use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

/// The first datagram a real QUIC client sends to `server_name`.
fn first_client_datagram(server_name: &str) -> (SocketAddr, Vec<u8>) {
    let server = UdpSocket::bind("127.0.0.1:0").unwrap();
    server
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let server_addr = server.local_addr().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let name = server_name.to_owned();
    let _guard = rt.enter();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let connecting = endpoint.connect(server_addr, &name).unwrap();
    // Drive the client until its first datagram is out; the handshake
    // itself never completes (nobody answers).
    let handle = rt.spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), connecting).await;
    });
    let mut buf = vec![0u8; 65_535];
    let (n, from) = std::thread::scope(|s| {
        let recv = s.spawn(|| server.recv_from(&mut buf));
        rt.block_on(async {
            while !recv.is_finished() {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        recv.join().unwrap().expect("the QUIC client sent nothing")
    });
    handle.abort();
    buf.truncate(n);
    (from, buf)
}

#[test]
fn the_sni_of_a_real_quic_initial_is_read() {
    for name in ["r3---sn.googlevideo.com", "online.bank.example"] {
        let (_, datagram) = first_client_datagram(name);
        assert!(datagram.len() >= 1200, "an Initial is padded to 1200 bytes");
        assert_eq!(
            shardline_agent::monitor::quic::initial_sni(&datagram).as_deref(),
            Some(name)
        );
        // One bit changed anywhere in the protected part: the AEAD refuses
        // it, and no name is made up.
        let mut bad = datagram.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x01;
        assert_eq!(shardline_agent::monitor::quic::initial_sni(&bad), None);
    }
}

#[test]
fn a_quic_flow_to_a_video_cdn_is_streaming_in_the_monitor() {
    let (client, datagram) = first_client_datagram("r3---sn.googlevideo.com");
    let client_port = client.port();
    let mut c = Capture::default();
    c.flow(
        "quic",
        &format!("10.0.0.2:{client_port}"),
        "192.0.2.44:443",
        "udp",
        "streaming",
    );
    let t0 = 1_700_000_000_000_000_000u64;
    c.packet(t0, Link::Eth, "quic", true, 0, |s, d| udp(s, d, &datagram));
    for i in 1..20u64 {
        // The rest of the connection: short-header packets both ways.
        c.packet(
            t0 + i * 5_000_000,
            Link::Eth,
            "quic",
            i % 3 == 0,
            0,
            |s, d| udp(s, d, &[0x40; 1200]),
        );
    }
    let dir = std::env::temp_dir().join(format!("sl-monitor-quic-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("quic.pcap");
    std::fs::write(&file, write_pcap(&c.frames, 65535)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardline-agent"))
        .args(["monitor", "--json", "--pcap"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let totals: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let flow = &totals["totals"]["top_flows"][0];
    assert_eq!(flow["sni"], "r3---sn.googlevideo.com", "{totals}");
    assert_eq!(flow["class"], "streaming", "{totals}");
    assert_eq!(flow["packets"], 20);
    let _ = std::fs::remove_dir_all(&dir);
}
