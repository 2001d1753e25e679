//! Live traffic for the demo and the end-to-end benchmark, with `std`
//! sockets only: a server (run inside the namespace as `xtask demo-traffic
//! serve`) and client phases (TLS to a bank name, then game traffic over
//! UDP) that mirror the capture file of [`super::pcap`].

use super::pcap::{app_data, client_hello, BANK_SNI, GAME_PORT};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const TLS_PORT: u16 = 443;

/// Serves the demo's traffic until killed: on TCP 443 it answers every
/// chunk it reads with four times as many pseudo-random bytes in TLS
/// application-data records; on UDP [`GAME_PORT`] it echoes a larger datagram.
pub fn serve() -> Result<(), String> {
    let tcp = TcpListener::bind(("0.0.0.0", TLS_PORT))
        .map_err(|e| format!("bind tcp/{TLS_PORT}: {e}"))?;
    let udp = UdpSocket::bind(("0.0.0.0", GAME_PORT))
        .map_err(|e| format!("bind udp/{GAME_PORT}: {e}"))?;
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = udp.recv_from(&mut buf) {
            let mut reply = buf[..n].to_vec();
            reply.resize(n + 32, 0x24);
            let _ = udp.send_to(&reply, from);
        }
    });
    for conn in tcp.incoming() {
        let Ok(mut conn) = conn else { continue };
        std::thread::spawn(move || {
            let mut seed = 0x1234_5678_9abc_def1u64;
            let mut buf = [0u8; 4096];
            while let Ok(n) = conn.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut out = Vec::new();
                let mut left = n * 4;
                while left > 0 {
                    let len = left.min(1_200);
                    out.extend_from_slice(&app_data(len, &mut seed));
                    left -= len;
                }
                if conn.write_all(&out).is_err() {
                    break;
                }
            }
        });
    }
    Ok(())
}

/// Waits until `server` accepts TCP connections (the server process started).
pub fn wait_for_server(server: Ipv4Addr, within: Duration) -> Result<(), String> {
    let deadline = Instant::now() + within;
    let addr = SocketAddr::from((server, TLS_PORT));
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() > deadline => {
                return Err(format!("traffic server at {addr}: {e}"))
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// A TLS session to [`BANK_SNI`] at `server`: ClientHello, then a 300-byte
/// record every 20 ms (the server answers with 1200 bytes) until `stop` or `dur`.
pub fn banking(server: Ipv4Addr, dur: Duration, stop: &AtomicBool) -> Result<(), String> {
    let addr = SocketAddr::from((server, TLS_PORT));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(&client_hello(BANK_SNI))
        .map_err(|e| e.to_string())?;
    let mut seed = 0xfeed_beef_u64;
    let end = Instant::now() + dur;
    let mut buf = [0u8; 16_384];
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        s.write_all(&app_data(300, &mut seed))
            .map_err(|e| e.to_string())?;
        let until = Instant::now() + Duration::from_millis(20);
        while Instant::now() < until {
            let _ = s.read(&mut buf);
        }
    }
    Ok(())
}

/// Game traffic: a 96-byte datagram to `server`:[`GAME_PORT`] every 20 ms
/// (the server echoes) until `stop` or `dur`. `first_sent` is called once,
/// right after the first datagram left.
pub fn gaming(
    server: Ipv4Addr,
    dur: Duration,
    stop: &AtomicBool,
    mut first_sent: impl FnMut(),
) -> Result<(), String> {
    let s = UdpSocket::bind(("0.0.0.0", 0)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(2)))
        .map_err(|e| e.to_string())?;
    let to = SocketAddr::from((server, GAME_PORT));
    let end = Instant::now() + dur;
    let mut buf = [0u8; 2048];
    let mut tick = 0u32;
    while Instant::now() < end && !stop.load(Ordering::Relaxed) {
        let mut p = tick.to_be_bytes().to_vec();
        p.resize(96, 0x42);
        s.send_to(&p, to)
            .map_err(|e| format!("send to {to}: {e}"))?;
        if tick == 0 {
            first_sent();
        }
        tick += 1;
        let until = Instant::now() + Duration::from_millis(20);
        while Instant::now() < until {
            let _ = s.recv_from(&mut buf);
        }
    }
    Ok(())
}

/// Runs the client side of `phases` in a thread (quiet phases just wait).
pub fn run_phases(
    server: Ipv4Addr,
    phases: Vec<super::pcap::Phase>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Result<(), String>> {
    use super::pcap::Phase;
    std::thread::spawn(move || {
        for p in phases {
            let end = Instant::now() + p.duration();
            match p {
                Phase::Quiet(_) => {}
                Phase::Banking(d) => banking(server, d, &stop)?,
                Phase::Gaming(d) => gaming(server, d, &stop, || {})?,
            }
            while Instant::now() < end {
                if stop.load(Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(())
    })
}
