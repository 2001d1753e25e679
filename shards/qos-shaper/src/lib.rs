//! The `qos-shaper` shard of the `qos` capability: a UDP forwarder between
//! two configured addresses that holds the forwarded traffic to a rate with a
//! token bucket, and sets the DSCP of each forwarded packet from the `mark`
//! service (the `qos-dscp` shard) when the host has one.
//!
//! Config: `listen = ADDR` (where clients send), `forward = ADDR` (where the
//! shaped traffic goes), `rate_bps` (UDP payload bits per second), optional
//! `burst_bytes` (default 100 ms of rate, at least 3000: a host descheduled
//! for less than that loses no tokens), `queue_packets`
//! (default 1024; arrivals beyond it are dropped and counted — tail drop).
//!
//! The bucket runs on `Instant` (nanoseconds), not the host's millisecond
//! `now`, so the rate is exact however coarsely the host polls.
#![deny(unsafe_code)]

use shardline_shard_sdk::config::KeyValues;
use shardline_shard_sdk::services::mark;
use shardline_shard_sdk::{
    export_shard, kind, status, Host, ResourceCostV1, Shard, ShardError, ShardStatsV1,
};
use std::collections::VecDeque;
use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::Instant;

/// A token bucket in bytes, refilled continuously.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    rate_bytes_per_s: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

impl TokenBucket {
    pub fn new(rate_bps: u64, burst_bytes: u64) -> Self {
        Self {
            rate_bytes_per_s: rate_bps as f64 / 8.0,
            burst: burst_bytes as f64,
            tokens: burst_bytes as f64,
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate_bytes_per_s).min(self.burst);
        }
        self.last = Some(now);
    }

    /// Takes `n` bytes if available now.
    pub fn try_take(&mut self, n: usize, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= n as f64 {
            self.tokens -= n as f64;
            true
        } else {
            false
        }
    }

    /// Seconds until `n` bytes are available.
    pub fn wait_for(&self, n: usize) -> f64 {
        ((n as f64 - self.tokens) / self.rate_bytes_per_s).max(0.0)
    }
}

#[derive(Debug)]
pub struct Shaper {
    host: Host,
    listen: UdpSocket,
    out: UdpSocket,
    forward: SocketAddr,
    bucket: TokenBucket,
    queue: VecDeque<Vec<u8>>,
    queue_cap: usize,
    marking: bool,
    tos: Option<u32>,
    mark_out: Vec<u8>,
    buf: Vec<u8>,
    stats: ShardStatsV1,
}

fn addr(kv: &KeyValues, key: &str) -> Result<SocketAddr, ShardError> {
    kv.require::<SocketAddr>(key)
}

impl Shaper {
    fn dscp_for(&mut self, pkt: &[u8]) -> Option<u8> {
        if !self.marking {
            return None;
        }
        match self
            .host
            .call_service(mark::SERVICE, mark::CLASSIFY, pkt, &mut self.mark_out)
        {
            Ok(()) => self.mark_out.first().map(|d| d & 0x3F),
            Err(rc) => {
                if rc == status::NO_SUCH_SERVICE {
                    self.marking = false; // no marker in this host: forward unmarked
                }
                None
            }
        }
    }
}

impl Shard for Shaper {
    fn init(host: Host, config: &[u8]) -> Result<Self, ShardError> {
        let kv = KeyValues::parse(config)?;
        let listen_addr = addr(&kv, "listen")?;
        let forward = addr(&kv, "forward")?;
        let rate_bps: u64 = kv.require("rate_bps")?;
        if rate_bps == 0 {
            return Err(ShardError::invalid("config: rate_bps must be > 0"));
        }
        let burst = kv.get_or("burst_bytes", (rate_bps / 8 / 10).max(3_000))?;
        let io =
            |what: &str, e: std::io::Error| ShardError::new(status::ERROR, format!("{what}: {e}"));
        let listen = UdpSocket::bind(listen_addr).map_err(|e| io("bind listen", e))?;
        listen
            .set_nonblocking(true)
            .map_err(|e| io("nonblocking", e))?;
        let out_bind: SocketAddr = if forward.is_ipv4() {
            "0.0.0.0:0".parse().expect("literal")
        } else {
            "[::]:0".parse().expect("literal")
        };
        let out = UdpSocket::bind(out_bind).map_err(|e| io("bind forward socket", e))?;
        out.set_nonblocking(true)
            .map_err(|e| io("nonblocking", e))?;
        Ok(Self {
            host,
            listen,
            out,
            forward,
            bucket: TokenBucket::new(rate_bps, burst),
            queue: VecDeque::new(),
            queue_cap: kv.get_or("queue_packets", 1024usize)?.max(1),
            marking: true,
            tos: None,
            mark_out: Vec::new(),
            buf: vec![0u8; 65_536],
            stats: ShardStatsV1::default(),
        })
    }

    fn poll(&mut self, now_ms: u64) -> Result<u64, ShardError> {
        loop {
            match self.listen.recv_from(&mut self.buf) {
                Ok((n, _)) => {
                    self.stats.packets_in += 1;
                    self.stats.bytes_in += n as u64;
                    if self.queue.len() >= self.queue_cap {
                        self.stats.dropped += 1;
                    } else {
                        self.queue.push_back(self.buf[..n].to_vec());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(_) => {
                    self.stats.errors += 1;
                    break;
                }
            }
        }
        let now = Instant::now();
        while let Some(len) = self.queue.front().map(Vec::len) {
            if !self.bucket.try_take(len, now) {
                break;
            }
            let pkt = self.queue.pop_front().expect("front exists");
            if let Some(dscp) = self.dscp_for(&pkt) {
                let tos = u32::from(dscp) << 2;
                if self.tos != Some(tos) && socket2::SockRef::from(&self.out).set_tos(tos).is_ok() {
                    self.tos = Some(tos);
                }
            }
            match self.out.send_to(&pkt, self.forward) {
                Ok(n) => {
                    self.stats.packets_out += 1;
                    self.stats.bytes_out += n as u64;
                }
                Err(_) => self.stats.errors += 1,
            }
        }
        Ok(match self.queue.front() {
            Some(p) => now_ms + (self.bucket.wait_for(p.len()) * 1000.0).ceil().max(1.0) as u64,
            None => now_ms + 1_000,
        })
    }

    fn fds(&self) -> Vec<i32> {
        vec![self.listen.as_raw_fd()]
    }

    fn stats(&self) -> ShardStatsV1 {
        self.stats
    }
}

export_shard! {
    shard: Shaper,
    id: "qos-shaper",
    version: "0.1.0",
    capability: "qos",
    service: "shaper",
    kind: kind::DATA,
    cost: ResourceCostV1 { cpu_permille: 100, memory_bytes: 4 << 20 },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn bucket_allows_burst_then_rate() {
        let mut b = TokenBucket::new(8_000, 2_000); // 1000 bytes/s
        let t0 = Instant::now();
        assert!(b.try_take(2_000, t0));
        assert!(!b.try_take(1, t0));
        assert!((b.wait_for(500) - 0.5).abs() < 1e-9);
        assert!(b.try_take(500, t0 + Duration::from_millis(500)));
        assert!(!b.try_take(100, t0 + Duration::from_millis(550)));
        assert!(
            b.try_take(2_000, t0 + Duration::from_secs(100)),
            "refills up to the burst"
        );
        assert!(
            !b.try_take(1_000, t0 + Duration::from_secs(100)),
            "never above the burst"
        );
    }
}
