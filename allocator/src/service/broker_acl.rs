//! Topic authorization in front of the embedded broker. rumqttd 0.20 checks
//! a login at CONNECT and nothing after it, so with a credentials file the
//! broker listens on a private loopback port and this front takes the
//! operator's `listen` address: it reads every packet a client sends, lets
//! a device login publish only its own report/ack/status/enrol topics,
//! subscribe only to its own instruction topic and set only its own status
//! as its last will (`shared::topics::device_may_*`), and cuts a client off
//! at its first packet outside that. Allocator logins are not restricted.
//! What the broker sends back is copied unchanged.
//!
//! [`Scanner`] is the sans-IO part: bytes in, whole packets (with what they
//! ask for) out, so it is unit-tested on byte strings.

use shardline_shared::topics;
use shardline_shared::DeviceId;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What a client packet asks for, as far as authorization goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// CONNECT: the login name and the last will's topic, if any.
    Connect {
        username: Option<String>,
        will_topic: Option<String>,
    },
    Publish {
        topic: String,
    },
    Subscribe {
        filters: Vec<String>,
    },
    /// Anything else (acks, pings, unsubscribe, disconnect).
    Other,
}

/// Why a client's byte stream was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("malformed MQTT packet: {0}")]
    Malformed(&'static str),
    #[error("packet of {0} bytes is over the broker's cap")]
    TooLarge(usize),
}

/// Splits a client's byte stream into MQTT 3.1.1 packets.
#[derive(Debug, Default)]
pub struct Scanner {
    buf: Vec<u8>,
}

impl Scanner {
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole packet (its bytes and what it asks for), `Ok(None)`
    /// when more bytes are needed.
    pub fn next_packet(&mut self, max: usize) -> Result<Option<(Vec<u8>, Request)>, ScanError> {
        let Some(&first) = self.buf.first() else {
            return Ok(None);
        };
        let mut len: usize = 0;
        let mut shift = 0;
        let mut header = 1;
        loop {
            let Some(&b) = self.buf.get(header) else {
                return Ok(None);
            };
            len |= usize::from(b & 0x7f) << shift;
            header += 1;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 21 {
                return Err(ScanError::Malformed("remaining length over 4 bytes"));
            }
        }
        let total = header + len;
        if total > max {
            return Err(ScanError::TooLarge(total));
        }
        if self.buf.len() < total {
            return Ok(None);
        }
        let packet: Vec<u8> = self.buf.drain(..total).collect();
        let request = classify(first, &packet[header..])?;
        Ok(Some((packet, request)))
    }
}

/// The payload length of a whole PUBLISH packet on `topic` (its fixed
/// header, topic, packet id if QoS > 0, then the payload).
pub fn publish_payload_len(packet: &[u8], topic: &str) -> usize {
    let Some(&first) = packet.first() else {
        return 0;
    };
    // Fixed header: the type byte and 1–4 bytes of remaining length.
    let len_bytes = packet
        .iter()
        .skip(1)
        .take(4)
        .position(|b| b & 0x80 == 0)
        .map_or(4, |i| i + 1);
    let packet_id = if (first >> 1) & 3 > 0 { 2 } else { 0 };
    packet
        .len()
        .saturating_sub(1 + len_bytes + 2 + topic.len() + packet_id)
}

/// A length-prefixed MQTT string at `at`, and the offset after it.
fn string(body: &[u8], at: usize) -> Result<(String, usize), ScanError> {
    let len = body
        .get(at..at + 2)
        .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
        .ok_or(ScanError::Malformed("truncated string length"))?;
    let bytes = body
        .get(at + 2..at + 2 + len)
        .ok_or(ScanError::Malformed("truncated string"))?;
    let s = std::str::from_utf8(bytes).map_err(|_| ScanError::Malformed("string is not UTF-8"))?;
    Ok((s.to_owned(), at + 2 + len))
}

fn classify(first: u8, body: &[u8]) -> Result<Request, ScanError> {
    match first >> 4 {
        1 => {
            // CONNECT: protocol name, level, flags, keep alive, client id,
            // [will topic, will message], [username], [password].
            let (_, at) = string(body, 0)?;
            let flags = *body
                .get(at + 1)
                .ok_or(ScanError::Malformed("truncated CONNECT"))?;
            let (_, mut at) = string(body, at + 4)?;
            let mut will_topic = None;
            if flags & 0x04 != 0 {
                let (t, next) = string(body, at)?;
                will_topic = Some(t);
                let len = body
                    .get(next..next + 2)
                    .map(|b| usize::from(u16::from_be_bytes([b[0], b[1]])))
                    .ok_or(ScanError::Malformed("truncated will message"))?;
                at = next + 2 + len;
            }
            let username = if flags & 0x80 != 0 {
                Some(string(body, at)?.0)
            } else {
                None
            };
            Ok(Request::Connect {
                username,
                will_topic,
            })
        }
        3 => Ok(Request::Publish {
            topic: string(body, 0)?.0,
        }),
        8 => {
            // SUBSCRIBE: packet id, then (filter, options) pairs.
            let mut at = 2;
            let mut filters = Vec::new();
            while at < body.len() {
                let (f, next) = string(body, at)?;
                filters.push(f);
                at = next + 1;
            }
            if filters.is_empty() {
                return Err(ScanError::Malformed("SUBSCRIBE without a filter"));
            }
            Ok(Request::Subscribe { filters })
        }
        _ => Ok(Request::Other),
    }
}

/// Whether a client logged in as `login` (a device id among `devices`, or
/// an allocator) may make `request`. `None`: the reason it may not.
pub fn refusal(
    devices: &HashSet<String>,
    login: Option<&str>,
    request: &Request,
) -> Option<String> {
    let device = login
        .filter(|l| devices.contains(*l))
        .and_then(|l| DeviceId::new(l).ok());
    let Some(device) = device else {
        return None; // an allocator login (the broker refused anyone else)
    };
    match request {
        Request::Connect {
            will_topic: Some(t),
            ..
        } if t != &topics::status(&device) => Some(format!("last will on {t:?}")),
        Request::Publish { topic } if !topics::device_may_publish(&device, topic) => {
            Some(format!("publish on {topic:?}"))
        }
        Request::Subscribe { filters } => filters
            .iter()
            .find(|f| !topics::device_may_subscribe(&device, f))
            .map(|f| format!("subscribe to {f:?}")),
        _ => None,
    }
}

/// Accepts clients on `listen` and relays them to the broker on `inner`,
/// enforcing [`refusal`] on what they send. Returns once listening.
pub async fn front(
    listen: SocketAddr,
    inner: SocketAddr,
    devices: Arc<HashSet<String>>,
    max_packet: usize,
    gate: Arc<super::ingest_gate::IngestGate>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tracing::info!(%listen, "embedded broker: topic authorization in front");
    tokio::spawn(async move {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "broker front: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let (devices, gate) = (devices.clone(), gate.clone());
            tokio::spawn(async move {
                if let Err(e) = relay(client, inner, &devices, max_packet, &gate).await {
                    tracing::debug!(%peer, error = %e, "broker front: connection ended");
                }
            });
        }
    });
    Ok(())
}

async fn relay(
    client: tokio::net::TcpStream,
    inner: SocketAddr,
    devices: &HashSet<String>,
    max_packet: usize,
    gate: &super::ingest_gate::IngestGate,
) -> std::io::Result<()> {
    let peer = client.peer_addr()?;
    let broker = tokio::net::TcpStream::connect(inner).await?;
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_broker, mut to_broker) = broker.into_split();
    let back = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_broker, &mut to_client).await;
        let _ = to_client.shutdown().await;
    });
    let mut scanner = Scanner::default();
    let mut login: Option<String> = None;
    let mut buf = vec![0u8; 16 * 1024];
    // What one read brought, passed on in one write (not a write per
    // packet: a fleet's reports are small and many).
    let mut out: Vec<u8> = Vec::with_capacity(buf.len());
    let result = 'outer: loop {
        let n = match from_client.read(&mut buf).await {
            Ok(0) => break Ok(()),
            Ok(n) => n,
            Err(e) => break Err(e),
        };
        scanner.push(&buf[..n]);
        let mut cut_off = false;
        loop {
            let (packet, request) = match scanner.next_packet(max_packet) {
                Ok(Some(p)) => p,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "broker front: client cut off");
                    cut_off = true;
                    break;
                }
            };
            if let Request::Connect { username, .. } = &request {
                login = username.clone();
            }
            if let Some(why) = refusal(devices, login.as_deref(), &request) {
                tracing::warn!(%peer, login = login.as_deref().unwrap_or("-"), refused = %why, "broker front: a device touched another's topics; cut off");
                cut_off = true;
                break;
            }
            if let Request::Publish { topic } = &request {
                if let Some(lane) = gate.lane(topic) {
                    // Held here while the MQTT link lags (rumqttd would
                    // drop what it cannot hold, acknowledged or not); what
                    // is gathered goes first.
                    if gate.is_shut() && !out.is_empty() {
                        if let Err(e) = to_broker.write_all(&out).await {
                            break 'outer Err(e);
                        }
                        out.clear();
                    }
                    gate.admit(&lane, topic.len() + publish_payload_len(&packet, topic))
                        .await;
                }
            }
            out.extend_from_slice(&packet);
        }
        // The packets before a refused one were passed on, as always.
        if !out.is_empty() {
            if let Err(e) = to_broker.write_all(&out).await {
                break 'outer Err(e);
            }
            out.clear();
        }
        if cut_off {
            break Ok(());
        }
    };
    let _ = to_broker.shutdown().await;
    back.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_length_of_a_publish() {
        // QoS 1, topic "a/b", packet id 7, payload "hello".
        let p = [
            0x32, 12, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'e', b'l', b'l', b'o',
        ];
        assert_eq!(publish_payload_len(&p, "a/b"), 5);
        // QoS 0: no packet id; a two-byte remaining length.
        let mut q = vec![0x30, 0x85, 0x01, 0, 1, b't'];
        q.extend(std::iter::repeat_n(0u8, 130));
        assert_eq!(publish_payload_len(&q, "t"), 130);
    }

    fn s(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut p = vec![first];
        let mut len = body.len();
        loop {
            let mut b = (len & 0x7f) as u8;
            len >>= 7;
            if len > 0 {
                b |= 0x80;
            }
            p.push(b);
            if len == 0 {
                break;
            }
        }
        p.extend_from_slice(body);
        p
    }

    fn connect(user: &str, will: Option<&str>) -> Vec<u8> {
        let mut body = s("MQTT");
        body.push(4);
        let mut flags = 0x80 | 0x40 | 0x02;
        if will.is_some() {
            flags |= 0x04;
        }
        body.push(flags);
        body.extend_from_slice(&[0, 30]);
        body.extend(s("shardline-agent-r1"));
        if let Some(w) = will {
            body.extend(s(w));
            body.extend(s("offline"));
        }
        body.extend(s(user));
        body.extend(s("password"));
        packet(0x10, &body)
    }

    fn publish(topic: &str) -> Vec<u8> {
        let mut body = s(topic);
        body.extend_from_slice(&[0, 1]);
        body.extend_from_slice(b"payload");
        packet(0x32, &body)
    }

    fn subscribe(filters: &[&str]) -> Vec<u8> {
        let mut body = vec![0, 7];
        for f in filters {
            body.extend(s(f));
            body.push(1);
        }
        packet(0x82, &body)
    }

    #[test]
    fn packets_are_split_and_read_across_chunks() {
        let mut stream = connect("r1", Some("shardline/v1/dev/r1/status"));
        stream.extend(publish("shardline/v1/dev/r1/report"));
        stream.extend(subscribe(&["shardline/v1/dev/r1/instr"]));
        stream.extend(packet(0xc0, &[]));
        let mut sc = Scanner::default();
        let mut got = Vec::new();
        for chunk in stream.chunks(3) {
            sc.push(chunk);
            while let Some((_, r)) = sc.next_packet(1 << 20).unwrap() {
                got.push(r);
            }
        }
        assert_eq!(
            got,
            vec![
                Request::Connect {
                    username: Some("r1".into()),
                    will_topic: Some("shardline/v1/dev/r1/status".into())
                },
                Request::Publish {
                    topic: "shardline/v1/dev/r1/report".into()
                },
                Request::Subscribe {
                    filters: vec!["shardline/v1/dev/r1/instr".into()]
                },
                Request::Other,
            ]
        );
    }

    #[test]
    fn oversize_and_malformed_packets_are_refused() {
        let mut sc = Scanner::default();
        sc.push(&publish(&"x".repeat(2000)));
        assert!(matches!(sc.next_packet(1000), Err(ScanError::TooLarge(_))));
        let mut sc = Scanner::default();
        sc.push(&[0x30, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(
            sc.next_packet(1 << 30),
            Err(ScanError::Malformed(_))
        ));
        let mut sc = Scanner::default();
        sc.push(&packet(0x30, &[0, 9, b'a']));
        assert!(matches!(sc.next_packet(1000), Err(ScanError::Malformed(_))));
    }

    #[test]
    fn a_device_login_touches_only_its_own_topics() {
        let devices: HashSet<String> = ["r1".to_owned(), "r2".to_owned()].into();
        let me = Some("r1");
        let ok = |r: Request| refusal(&devices, me, &r).is_none();
        assert!(ok(Request::Publish {
            topic: "shardline/v1/dev/r1/report".into()
        }));
        assert!(!ok(Request::Publish {
            topic: "shardline/v1/dev/r2/report".into()
        }));
        assert!(!ok(Request::Publish {
            topic: "shardline/v1/dev/r2/instr".into()
        }));
        assert!(!ok(Request::Subscribe {
            filters: vec!["shardline/v1/dev/r1/instr".into(), "shardline/v1/#".into()]
        }));
        assert!(!ok(Request::Connect {
            username: Some("r1".into()),
            will_topic: Some("shardline/v1/dev/r2/status".into())
        }));
        // The allocator's own login is not a device's.
        assert!(refusal(
            &devices,
            Some("allocator"),
            &Request::Subscribe {
                filters: vec!["shardline/v1/dev/+/report".into()]
            }
        )
        .is_none());
    }

    #[test]
    fn explicit_requests_go_up_from_the_device_and_answers_down_from_the_allocator() {
        let devices: HashSet<String> = ["r1".to_owned(), "r2".to_owned()].into();
        let may = |login: &str, r: Request| refusal(&devices, Some(login), &r).is_none();
        let publish = |t: &str| Request::Publish { topic: t.into() };
        let subscribe = |t: &str| Request::Subscribe {
            filters: vec![t.into()],
        };
        assert!(may("r1", publish("shardline/v1/dev/r1/request")));
        assert!(may("r1", subscribe("shardline/v1/dev/r1/answer")));
        assert!(!may("r1", publish("shardline/v1/dev/r2/request")));
        assert!(
            !may("r1", publish("shardline/v1/dev/r1/answer")),
            "answers come from the cloud"
        );
        assert!(!may("r1", subscribe("shardline/v1/dev/r2/answer")));
        // The allocator reads every request (shared or not) and writes answers.
        assert!(may(
            "allocator",
            subscribe("$share/allocators/shardline/v1/dev/+/request")
        ));
        assert!(may("allocator", subscribe("shardline/v1/dev/+/request")));
        assert!(may("allocator", publish("shardline/v1/dev/r1/answer")));
    }

    #[test]
    fn devices_publish_their_routed_uplinks_and_read_assignments() {
        // Issue 19: a device's own uplinks under its group, the assignment
        // objects; the allocator reads routed uplinks and publishes objects.
        let devices: HashSet<String> = ["r1".to_owned(), "r2".to_owned()].into();
        let may = |login: &str, r: Request| refusal(&devices, Some(login), &r).is_none();
        let publish = |t: &str| Request::Publish { topic: t.into() };
        let subscribe = |t: &str| Request::Subscribe {
            filters: vec![t.into()],
        };
        for kind in ["report", "ack", "request", "diag"] {
            let own = format!("shardline/v1/g/acme/eu-west/vpn/dev/r1/{kind}");
            assert!(may("r1", publish(&own)), "{own}");
            let other = format!("shardline/v1/g/acme/eu-west/vpn/dev/r2/{kind}");
            assert!(!may("r1", publish(&other)), "{other}");
        }
        assert!(!may(
            "r1",
            publish("shardline/v1/g/acme/eu-west/vpn/dev/r1/instr")
        ));
        assert!(may("r1", subscribe("shardline/v1/assign/acme/eu-west/vpn")));
        assert!(!may("r1", publish("shardline/v1/assign/acme/eu-west/vpn")));
        assert!(!may(
            "r1",
            subscribe("shardline/v1/g/acme/eu-west/vpn/dev/+/+")
        ));
        assert!(may(
            "allocator",
            subscribe("shardline/v1/g/acme/eu-west/vpn/dev/+/+")
        ));
        assert!(may(
            "allocator",
            publish("shardline/v1/assign/acme/eu-west/vpn")
        ));
    }
}
