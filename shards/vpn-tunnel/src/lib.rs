//! The `vpn-tunnel` shard: a userspace tunnel carrying packets between two
//! agents inside UDP, encrypted by whichever `aead` shard the host loaded and
//! keyed by the `auth` shard's handshake.
//!
//! Outer datagrams (first byte): `1` auth msg1 and `2` auth msg2, each
//! followed by `len ‖ cipher name` of the local `aead` shard (ends with
//! different crypto shards refuse each other with a clear error), `3` data
//! (`3 ‖ aead SEAL output`), `4` "no session, please handshake" (sent by a
//! responder that has no keys; it only makes the initiator handshake again,
//! rate-limited, so a forged one costs a handshake at most).
//!
//! Inner side, one of:
//! - `tun = NAME`: a TUN device (`IFF_TUN | IFF_NO_PI`); the operator creates
//!   it with its address (`ip tuntap add NAME mode tun; ip addr add …`) and
//!   the shard attaches, so the shard needs no address-configuration rights;
//! - `inner_listen = ADDR` + `inner_forward = ADDR`: plaintext UDP received on
//!   `inner_listen` goes through the tunnel; what comes out is sent to the
//!   peer's `inner_forward`.
//!
//! Config: `role = initiator | responder`, `bind = ADDR`, `peer = ADDR`
//! (required for the initiator; a responder learns it from a valid
//! handshake), `retry_ms` (handshake retry, 1000), `rekey_ms` (120000).
#![deny(unsafe_code)]

mod tun;

use shardline_shard_sdk::config::KeyValues;
use shardline_shard_sdk::services::{aead, auth};
use shardline_shard_sdk::{
    export_shard, kind, level, status, Host, ResourceCostV1, Shard, ShardError, ShardStatsV1,
};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

const T_MSG1: u8 = 1;
const T_MSG2: u8 = 2;
const T_DATA: u8 = 3;
const T_NEED_HANDSHAKE: u8 = 4;
/// Packets handled per direction per poll, so one busy direction cannot starve the other.
const BUDGET: usize = 256;

#[derive(Debug)]
enum Inner {
    Tun(std::fs::File),
    Udp {
        sock: UdpSocket,
        forward: SocketAddr,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Initiator,
    Responder,
}

#[derive(Debug)]
pub struct Tunnel {
    host: Host,
    role: Role,
    outer: UdpSocket,
    peer: Option<SocketAddr>,
    inner: Inner,
    keyed: bool,
    keyed_at: u64,
    last_initiate: Option<u64>,
    retry_ms: u64,
    rekey_ms: u64,
    buf: Vec<u8>,
    out: Vec<u8>,
    scratch: Vec<u8>,
    stats: ShardStatsV1,
    /// Name of the local `aead` cipher, asked once (after every shard is initialised).
    cipher: Option<Vec<u8>>,
}

fn parse_addr(kv: &KeyValues, key: &str) -> Result<Option<SocketAddr>, ShardError> {
    kv.get(key)
        .map(|v| {
            v.parse()
                .map_err(|_| ShardError::invalid(format!("config: {key} = {v:?} is not ip:port")))
        })
        .transpose()
}

fn io_err(what: &str, e: std::io::Error) -> ShardError {
    ShardError::new(status::ERROR, format!("{what}: {e}"))
}

impl Tunnel {
    fn send_outer(&mut self, pkt_type: u8, body: &[u8], to: SocketAddr) {
        self.scratch.clear();
        self.scratch.push(pkt_type);
        self.scratch.extend_from_slice(body);
        match self.outer.send_to(&self.scratch, to) {
            Ok(n) => {
                self.stats.packets_out += 1;
                self.stats.bytes_out += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => self.stats.dropped += 1,
            Err(_) => self.stats.errors += 1,
        }
    }

    /// The local cipher's name, appended to handshake messages.
    fn cipher(&mut self) -> Vec<u8> {
        if self.cipher.is_none() {
            let mut name = Vec::new();
            if self
                .host
                .call_service(aead::SERVICE, aead::CIPHER, &[], &mut name)
                .is_ok()
            {
                name.truncate(255);
                self.cipher = Some(name);
            }
        }
        self.cipher.clone().unwrap_or_default()
    }

    /// Splits `len`-byte handshake message from its trailing cipher name and
    /// checks the peer uses the same cipher.
    fn check_cipher(&mut self, packet: &[u8], len: usize) -> bool {
        let theirs = packet
            .get(len + 1..)
            .filter(|t| packet.get(len).map(|&l| usize::from(l)) == Some(t.len()));
        let ours = self.cipher();
        match theirs {
            Some(t) if t == ours.as_slice() => true,
            _ => {
                self.stats.errors += 1;
                self.host.log(
                    level::ERROR,
                    &format!(
                        "handshake refused: peer uses cipher {:?}, this end {:?}; both ends need the same crypto shard",
                        theirs.map(String::from_utf8_lossy),
                        String::from_utf8_lossy(&ours)
                    ),
                );
                false
            }
        }
    }

    fn with_cipher(&mut self, msg: &[u8]) -> Vec<u8> {
        let c = self.cipher();
        let mut v = Vec::with_capacity(msg.len() + 1 + c.len());
        v.extend_from_slice(msg);
        v.push(c.len() as u8);
        v.extend_from_slice(&c);
        v
    }

    fn initiate(&mut self, now_ms: u64) {
        let Some(peer) = self.peer else {
            return;
        };
        self.last_initiate = Some(now_ms);
        let mut msg1 = Vec::new();
        if self
            .host
            .call_service(auth::SERVICE, auth::INITIATE, &[], &mut msg1)
            .is_ok()
            && !msg1.is_empty()
        {
            // msg1 starts with its own type byte (1), so it is sent as is.
            let pkt = self.with_cipher(&msg1);
            let _ = self.outer.send_to(&pkt, peer);
        } else {
            self.stats.errors += 1;
        }
    }

    fn set_keys(&mut self, keys: &[u8], now_ms: u64) -> bool {
        let ok = keys.len() == auth::KEYS_LEN
            && self
                .host
                .call_service(aead::SERVICE, aead::SET_KEYS, keys, &mut Vec::new())
                .is_ok();
        if ok {
            self.keyed = true;
            self.keyed_at = now_ms;
            self.host.log(level::INFO, "tunnel session keys installed");
        }
        ok
    }

    fn on_outer(&mut self, n: usize, from: SocketAddr, now_ms: u64) {
        let Some(&t) = self.buf.first() else {
            return;
        };
        match (t, self.role) {
            (T_MSG1, Role::Responder) => {
                let packet = self.buf[..n].to_vec();
                if !self.check_cipher(&packet, auth::MSG1_LEN) {
                    return;
                }
                let msg1 = packet[..auth::MSG1_LEN].to_vec();
                let mut out = Vec::new();
                if self
                    .host
                    .call_service(auth::SERVICE, auth::RESPOND, &msg1, &mut out)
                    .is_ok()
                    && out.len() == auth::MSG2_LEN + auth::KEYS_LEN
                {
                    let pkt = self.with_cipher(&out[..auth::MSG2_LEN]);
                    let _ = self.outer.send_to(&pkt, from);
                    if self.set_keys(&out[auth::MSG2_LEN..], now_ms) {
                        self.peer = Some(from);
                    }
                } else {
                    self.stats.errors += 1;
                }
            }
            (T_MSG2, Role::Initiator) => {
                let packet = self.buf[..n].to_vec();
                if !self.check_cipher(&packet, auth::MSG2_LEN) {
                    return;
                }
                let msg2 = packet[..auth::MSG2_LEN].to_vec();
                let mut keys = Vec::new();
                if self
                    .host
                    .call_service(auth::SERVICE, auth::FINISH, &msg2, &mut keys)
                    .is_ok()
                {
                    self.set_keys(&keys, now_ms);
                } else {
                    self.stats.errors += 1;
                }
            }
            (T_DATA, _) => {
                if !self.keyed {
                    if self.role == Role::Responder {
                        self.send_outer(T_NEED_HANDSHAKE, &[], from);
                    }
                    self.stats.dropped += 1;
                    return;
                }
                let mut out = std::mem::take(&mut self.out);
                let rc =
                    self.host
                        .call_service(aead::SERVICE, aead::OPEN, &self.buf[1..n], &mut out);
                if rc.is_ok() {
                    self.stats.packets_in += 1;
                    self.stats.bytes_in += out.len() as u64;
                    let res = match &mut self.inner {
                        Inner::Tun(f) => f.write(&out).map(|_| ()),
                        Inner::Udp { sock, forward } => sock.send_to(&out, *forward).map(|_| ()),
                    };
                    if res.is_err() {
                        self.stats.dropped += 1;
                    }
                } else {
                    self.stats.errors += 1;
                }
                self.out = out;
            }
            (T_NEED_HANDSHAKE, Role::Initiator) => {
                if self
                    .last_initiate
                    .is_none_or(|t| now_ms.saturating_sub(t) >= self.retry_ms)
                {
                    self.keyed = false;
                    self.initiate(now_ms);
                }
            }
            _ => self.stats.dropped += 1,
        }
    }
}

impl Shard for Tunnel {
    fn init(host: Host, config: &[u8]) -> Result<Self, ShardError> {
        let kv = KeyValues::parse(config)?;
        let role = match kv.get("role").unwrap_or("initiator") {
            "initiator" => Role::Initiator,
            "responder" => Role::Responder,
            other => return Err(ShardError::invalid(format!("config: role {other:?}"))),
        };
        let bind =
            parse_addr(&kv, "bind")?.ok_or_else(|| ShardError::invalid("config: missing bind"))?;
        let peer = parse_addr(&kv, "peer")?;
        if role == Role::Initiator && peer.is_none() {
            return Err(ShardError::invalid("config: an initiator needs peer"));
        }
        let outer = UdpSocket::bind(bind).map_err(|e| io_err("bind outer socket", e))?;
        outer
            .set_nonblocking(true)
            .map_err(|e| io_err("nonblocking", e))?;
        // Sandboxed hosts open the TUN device themselves and pass it in: a
        // shard has no capability and no access to /dev/net/tun.
        let inner = if let Some(fd) = kv.take_fd(shardline_shard_sdk::config::PASSED_TUN_FD)? {
            Inner::Tun(std::fs::File::from(fd))
        } else if let Some(name) = kv.get("tun") {
            Inner::Tun(tun::open(name).map_err(|e| io_err("open tun", e))?)
        } else {
            let listen = parse_addr(&kv, "inner_listen")?.ok_or_else(|| {
                ShardError::invalid("config: need tun or inner_listen + inner_forward")
            })?;
            let forward = parse_addr(&kv, "inner_forward")?
                .ok_or_else(|| ShardError::invalid("config: inner_listen needs inner_forward"))?;
            let sock = UdpSocket::bind(listen).map_err(|e| io_err("bind inner socket", e))?;
            sock.set_nonblocking(true)
                .map_err(|e| io_err("nonblocking", e))?;
            Inner::Udp { sock, forward }
        };
        host.log(
            level::INFO,
            &format!("tunnel {role:?} on {bind}, peer {peer:?}"),
        );
        Ok(Self {
            host,
            role,
            outer,
            peer,
            inner,
            keyed: false,
            keyed_at: 0,
            last_initiate: None,
            retry_ms: kv.get_or("retry_ms", 1_000u64)?,
            rekey_ms: kv.get_or("rekey_ms", 120_000u64)?,
            buf: vec![0u8; 65_536],
            out: Vec::with_capacity(65_536),
            scratch: Vec::with_capacity(65_536),
            stats: ShardStatsV1::default(),
            cipher: None,
        })
    }

    fn poll(&mut self, now_ms: u64) -> Result<u64, ShardError> {
        if self.role == Role::Initiator {
            let rekey_due = self.keyed && now_ms.saturating_sub(self.keyed_at) >= self.rekey_ms;
            let retry_due = self
                .last_initiate
                .is_none_or(|t| now_ms.saturating_sub(t) >= self.retry_ms);
            if (!self.keyed || rekey_due) && retry_due {
                self.initiate(now_ms);
            }
        }
        for _ in 0..BUDGET {
            match self.outer.recv_from(&mut self.buf) {
                Ok((n, from)) => self.on_outer(n, from, now_ms),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.stats.errors += 1;
                    break;
                }
            }
        }
        let mut sealed = Vec::new();
        for _ in 0..BUDGET {
            let n = match &mut self.inner {
                Inner::Tun(f) => f.read(&mut self.buf),
                Inner::Udp { sock, .. } => sock.recv_from(&mut self.buf).map(|(n, _)| n),
            };
            let n = match n {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.stats.errors += 1;
                    break;
                }
            };
            let (true, Some(peer)) = (self.keyed, self.peer) else {
                self.stats.dropped += 1;
                continue;
            };
            if self
                .host
                .call_service(aead::SERVICE, aead::SEAL, &self.buf[..n], &mut sealed)
                .is_ok()
            {
                self.send_outer(T_DATA, &sealed, peer);
            } else {
                self.stats.errors += 1;
            }
        }
        let next = if self.keyed {
            now_ms + 1_000
        } else {
            now_ms + self.retry_ms.min(1_000)
        };
        Ok(next)
    }

    fn fds(&self) -> Vec<i32> {
        let inner = match &self.inner {
            Inner::Tun(f) => f.as_raw_fd(),
            Inner::Udp { sock, .. } => sock.as_raw_fd(),
        };
        vec![self.outer.as_raw_fd(), inner]
    }

    fn stats(&self) -> ShardStatsV1 {
        self.stats
    }
}

export_shard! {
    shard: Tunnel,
    id: "vpn-tunnel",
    version: "0.1.0",
    capability: "vpn",
    service: "tunnel",
    kind: kind::DATA,
    cost: ResourceCostV1 { cpu_permille: 300, memory_bytes: 8 << 20 },
}
