//! The MQTT link to the broker (rumqttc): connection options, TLS, the task
//! that drives the event loop with jittered reconnect backoff, and
//! [`LinkCore`], the sans-IO bookkeeping that maps PUBACKs back to outbox
//! messages.
//!
//! Why the bookkeeping: rumqttc assigns packet ids inside its event loop and
//! reports them as `Outgoing::Publish(pkid)` in the order it took requests
//! from its channel. [`LinkCore`] keeps the same order (a FIFO of what was
//! handed to the client) and so learns which pkid carries which outbox
//! message; the PUBACK for that pkid then removes exactly that message.
//! rumqttc's own replay of unacknowledged publishes after a reconnect is
//! switched off (the driver clears `EventLoop::pending`): the outbox is the
//! single source of retransmission, so nothing is sent twice by two layers
//! and nothing is forgotten by either.
//!
//! Size and reconnect discipline (issue 14, hostile publishers): both
//! shipped broker setups cap an MQTT packet at [`BROKER_MAX_PACKET`], and
//! the client accepts anything up to [`MAX_INCOMING_PACKET`] (above that
//! cap), so an oversize instruction reaches the acceptance code, which counts
//! and drops it. rumqttc can only answer a packet above its own limit by
//! dropping the connection, and a persistent session would hand the same
//! packet over again: against a broker without the cap that is a loop, so
//! the reconnect backoff is reset only after a connection stayed up for
//! [`STABLE_AFTER`], never by a bare CONNACK.

use super::config::BrokerConfig;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, LastWill, MqttOptions, Outgoing, QoS, Request,
    TlsConfiguration, Transport,
};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;

/// Largest MQTT packet sent (reports are capped at the codec's 256 KiB).
pub const MAX_PACKET: usize = 300 * 1024;

/// The packet cap both shipped broker setups enforce (`max_packet_size` in
/// `packaging/mosquitto/shardline.conf`, `max_payload_size` of the embedded
/// rumqttd in `allocator/src/service/broker.rs`): 1 MiB.
pub const BROKER_MAX_PACKET: usize = 1 << 20;

/// Largest MQTT packet accepted: above the broker cap (plus room for the
/// topic and header), so whatever a capped broker forwards is received and
/// judged by acceptance (instructions are capped at 64 KiB there) instead of
/// costing the connection.
pub const MAX_INCOMING_PACKET: usize = BROKER_MAX_PACKET + 4096;

// Checked at compile time: the client reads whatever the broker cap lets
// through (with room for a long topic), and our own reports pass the cap.
const _: () = assert!(MAX_INCOMING_PACKET >= BROKER_MAX_PACKET + 256);
const _: () = assert!(MAX_PACKET <= BROKER_MAX_PACKET);

/// A connection that lasted this long resets the reconnect backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// Trust store used for mqtts when `broker.ca_file` is not set.
pub const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Most outbox messages handed to the client and not yet acknowledged.
pub const SEND_WINDOW: usize = 64;

/// Why the link could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum LinkSetupError {
    #[error("TLS file {path}: {reason}")]
    TlsFile { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(String),
    #[error(transparent)]
    PasswordFile(#[from] PasswordFileError),
}

/// Why the MQTT password file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("broker.password_file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "broker.password_file {path}: mode {mode:o} lets others read the password; \
         expected 0600 or stricter"
    )]
    TooOpen { path: String, mode: u32 },
    #[error("broker.password_file {path}: expected one line holding the password")]
    Malformed { path: String },
}

/// Checks that the password file is private (mode 0600 or stricter): the
/// password is the device's broker identity.
pub fn check_password_file_mode(path: &std::path::Path) -> Result<(), PasswordFileError> {
    read_password(path).map(|_| ())
}

/// A password file is one short line; anything larger is not one.
const MAX_PASSWORD_FILE: usize = 4096;

/// Reads the MQTT password: a regular file of mode 0600 or stricter, one
/// non-empty line.
pub fn read_password(path: &std::path::Path) -> Result<String, PasswordFileError> {
    use shardline_support::secret_file::{self, SecretFileError};
    let shown = || path.display().to_string();
    let bytes = secret_file::read(path, MAX_PASSWORD_FILE).map_err(|e| match e {
        SecretFileError::Io { source, .. } => PasswordFileError::Io {
            path: shown(),
            source,
        },
        SecretFileError::TooOpen { mode, .. } => PasswordFileError::TooOpen {
            path: shown(),
            mode,
        },
        SecretFileError::NotRegular { .. } | SecretFileError::TooLarge { .. } => {
            PasswordFileError::Malformed { path: shown() }
        }
    })?;
    let text =
        String::from_utf8(bytes).map_err(|_| PasswordFileError::Malformed { path: shown() })?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    match (lines.next(), lines.next()) {
        (Some(pw), None) => Ok(pw.trim().to_owned()),
        _ => Err(PasswordFileError::Malformed { path: shown() }),
    }
}

/// Builds the rumqttc options: persistent session under a stable client id,
/// manual acks (an instruction is acked only once its effect is on disk),
/// the offline status as last will, TLS with the ring provider for mqtts.
pub fn mqtt_options(
    cfg: &BrokerConfig,
    will_topic: String,
    will_payload: Vec<u8>,
) -> Result<MqttOptions, LinkSetupError> {
    let mut o = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
    o.set_clean_session(false)
        .set_keep_alive(Duration::from_secs(u64::from(cfg.keep_alive_s)))
        .set_manual_acks(true)
        .set_inflight(256)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_PACKET)
        .set_request_channel_capacity(4 * SEND_WINDOW)
        .set_last_will(LastWill::new(
            will_topic,
            will_payload,
            QoS::AtLeastOnce,
            true,
        ));
    if let Some(path) = &cfg.password_file {
        let user = cfg.username.clone().unwrap_or_default();
        o.set_credentials(user, read_password(path)?);
    } else if let Some(user) = &cfg.username {
        o.set_credentials(user.clone(), String::new());
    }
    if cfg.tls {
        o.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
            Arc::new(tls_config(cfg)?),
        )));
    }
    Ok(o)
}

fn tls_config(cfg: &BrokerConfig) -> Result<rustls::ClientConfig, LinkSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let file_err = |path: &std::path::Path, reason: String| LinkSetupError::TlsFile {
        path: path.display().to_string(),
        reason,
    };
    let mut roots = rustls::RootCertStore::empty();
    // Without a configured CA, the system bundle (Debian's path) is trusted.
    let system = std::path::Path::new(SYSTEM_CA_BUNDLE);
    let ca = cfg.ca_file.as_deref().unwrap_or(system);
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| file_err(ca, e.to_string()))? {
        let cert = cert.map_err(|e| file_err(ca, e.to_string()))?;
        roots.add(cert).map_err(|e| file_err(ca, e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| LinkSetupError::Tls(e.to_string()))?
        .with_root_certificates(roots);
    match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| file_err(cert, e.to_string()))?
                .collect::<Result<_, _>>()
                .map_err(|e| file_err(cert, e.to_string()))?;
            let key_der =
                PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e.to_string()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| LinkSetupError::Tls(e.to_string()))
        }
        _ => Ok(builder.with_no_client_auth()),
    }
}

/// What the driver task tells the daemon.
#[derive(Debug)]
pub enum LinkEvent {
    Mqtt(Event),
    /// The connection failed or dropped. `dropped_unsent` requests that the
    /// daemon had handed to the client never reached the wire and were
    /// discarded; everything in flight is lost too (the outbox resends).
    Down {
        error: String,
        dropped_unsent: usize,
    },
}

/// Jittered exponential backoff: `min * 2^attempt`, capped, then a random
/// factor in [0.5, 1.0) so a fleet that lost its broker does not reconnect
/// in lockstep.
pub fn backoff(attempt: u32, min_ms: u64, max_ms: u64, random: u32) -> Duration {
    let exp = min_ms.saturating_mul(1u64 << attempt.min(20)).min(max_ms);
    let jitter = 500 + u64::from(random % 500);
    Duration::from_millis((exp * jitter / 1000).max(1))
}

/// Drives the event loop until the daemon drops its receiver.
pub async fn drive(
    mut eventloop: EventLoop,
    tx: UnboundedSender<LinkEvent>,
    reconnect_min_ms: u64,
    reconnect_max_ms: u64,
) {
    let mut attempt: u32 = 0;
    let mut connected_at: Option<tokio::time::Instant> = None;
    loop {
        let event = eventloop.poll().await;
        let sent = match event {
            Ok(ev) => {
                if matches!(ev, Event::Incoming(rumqttc::Packet::ConnAck(_))) {
                    connected_at = Some(tokio::time::Instant::now());
                }
                tx.send(LinkEvent::Mqtt(ev))
            }
            Err(err) => {
                // Only a connection that stayed up resets the backoff: one
                // that a poisoned session drops right after its CONNACK
                // must not reconnect at full speed (see the module docs).
                if connected_at
                    .take()
                    .is_some_and(|at| at.elapsed() >= STABLE_AFTER)
                {
                    attempt = 0;
                }
                if let ConnectionError::ConnectionRefused(code) = &err {
                    // At most once per backoff period, and worth a warning:
                    // the device stays offline until an operator acts.
                    tracing::warn!(
                        ?code,
                        "the broker refused the connection (check broker.username and \
                         broker.password_file against the broker's password file)"
                    );
                }
                if is_oversize(&err) {
                    tracing::error!(
                        limit = MAX_INCOMING_PACKET,
                        "the broker forwarded a packet above the agent's limit; the broker \
                         must cap packets at {BROKER_MAX_PACKET} bytes (see SECURITY.md)"
                    );
                }
                // rumqttc moved in-flight publishes (pkid set) and the
                // requests still in its channel (pkid 0) to `pending` to
                // replay them; the outbox replays instead.
                let dropped_unsent = eventloop
                    .pending
                    .iter()
                    .filter(|r| matches!(r, Request::Publish(p) if p.pkid == 0))
                    .count();
                eventloop.pending.clear();
                let error = describe(&err);
                let r = tx.send(LinkEvent::Down {
                    error,
                    dropped_unsent,
                });
                let mut random = [0u8; 4];
                let _ = getrandom::getrandom(&mut random);
                let wait = backoff(
                    attempt,
                    reconnect_min_ms,
                    reconnect_max_ms,
                    u32::from_le_bytes(random),
                );
                attempt = attempt.saturating_add(1);
                if r.is_ok() {
                    tokio::time::sleep(wait).await;
                }
                r
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

fn describe(err: &ConnectionError) -> String {
    err.to_string()
}

/// Whether the connection dropped because an incoming packet was above
/// [`MAX_INCOMING_PACKET`].
fn is_oversize(err: &ConnectionError) -> bool {
    matches!(
        err,
        ConnectionError::MqttState(rumqttc::StateError::Deserialization(
            rumqttc::mqttbytes::Error::PayloadSizeLimitExceeded(_)
        ))
    )
}

/// What a publish handed to the client was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sent {
    /// An outbox message, by id.
    Outbox(u64),
    /// Something not kept in the outbox (the retained online status).
    Other,
}

/// PUBACK bookkeeping; see the module docs. Sans-IO.
#[derive(Debug, Default)]
pub struct LinkCore {
    connected: bool,
    /// Handed to the client, not yet seen as `Outgoing::Publish`.
    fifo: VecDeque<Sent>,
    /// On the wire, waiting for their PUBACK.
    inflight: HashMap<u16, Sent>,
    /// Held back by rumqttc because its pkid was still in use.
    collided: Option<(u16, Sent)>,
    /// Outbox ids handed out and not yet acknowledged or lost.
    busy: BTreeSet<u64>,
}

impl LinkCore {
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    pub fn on_connected(&mut self) {
        self.connected = true;
    }

    /// The link went down: in-flight messages and the `dropped_unsent`
    /// oldest handed-out requests are lost and become sendable again.
    pub fn on_down(&mut self, dropped_unsent: usize) {
        self.connected = false;
        for (_, s) in self.inflight.drain() {
            release(&mut self.busy, s);
        }
        if let Some((_, s)) = self.collided.take() {
            release(&mut self.busy, s);
        }
        for _ in 0..dropped_unsent {
            match self.fifo.pop_front() {
                Some(s) => release(&mut self.busy, s),
                None => break,
            }
        }
    }

    /// Records a publish handed to the client.
    pub fn handed_out(&mut self, s: Sent) {
        if let Sent::Outbox(id) = s {
            self.busy.insert(id);
        }
        self.fifo.push_back(s);
    }

    /// Feeds an outgoing event of the client's event loop.
    pub fn on_outgoing(&mut self, out: &Outgoing) {
        match *out {
            Outgoing::Publish(pkid) => {
                let s = match self.collided.take() {
                    Some((_, s)) => Some(s),
                    None => self.fifo.pop_front(),
                };
                match s {
                    Some(s) => {
                        if let Some(old) = self.inflight.insert(pkid, s) {
                            release(&mut self.busy, old);
                        }
                    }
                    None => {
                        tracing::warn!(pkid, "outgoing publish that the daemon did not hand out")
                    }
                }
            }
            Outgoing::AwaitAck(pkid) => {
                if let Some(s) = self.fifo.pop_front() {
                    self.collided = Some((pkid, s));
                }
            }
            _ => {}
        }
    }

    /// A PUBACK arrived; returns the outbox id it acknowledges, if any.
    pub fn on_puback(&mut self, pkid: u16) -> Option<u64> {
        match self.inflight.remove(&pkid)? {
            Sent::Outbox(id) => {
                self.busy.remove(&id);
                Some(id)
            }
            Sent::Other => None,
        }
    }

    /// Which of `candidates` (outbox ids, oldest first) to send now.
    pub fn to_send(&self, candidates: impl Iterator<Item = u64>) -> Vec<u64> {
        if !self.connected {
            return Vec::new();
        }
        let room = SEND_WINDOW.saturating_sub(self.busy.len());
        candidates
            .filter(|id| !self.busy.contains(id))
            .take(room)
            .collect()
    }

    /// Handed-out messages not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.busy.len()
    }
}

fn release(busy: &mut BTreeSet<u64>, s: Sent) {
    if let Sent::Outbox(id) = s {
        busy.remove(&id);
    }
}

/// Publishes a QoS 1 message without waiting (the request channel is sized
/// above the send window); false when the client's channel is full or closed.
pub fn try_publish(client: &AsyncClient, topic: &str, payload: Vec<u8>, retain: bool) -> bool {
    client
        .try_publish(topic, QoS::AtLeastOnce, retain, payload)
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pubacks_map_to_the_messages_in_hand_out_order() {
        let mut c = LinkCore::default();
        c.on_connected();
        assert_eq!(c.to_send([1, 2, 3].into_iter()), vec![1, 2, 3]);
        c.handed_out(Sent::Other);
        for id in [1, 2, 3] {
            c.handed_out(Sent::Outbox(id));
        }
        for pkid in [7, 8, 9, 10] {
            c.on_outgoing(&Outgoing::Publish(pkid));
        }
        assert!(c.to_send([1, 2, 3].into_iter()).is_empty(), "all busy");
        assert_eq!(c.on_puback(7), None);
        assert_eq!(c.on_puback(9), Some(2));
        assert_eq!(c.on_puback(9), None, "an ack counts once");
        assert_eq!(c.unacked(), 2);
    }

    #[test]
    fn a_drop_releases_in_flight_and_discarded_requests_only() {
        let mut c = LinkCore::default();
        c.on_connected();
        for id in 1..=4 {
            c.handed_out(Sent::Outbox(id));
        }
        c.on_outgoing(&Outgoing::Publish(1)); // id 1 on the wire
                                              // ids 2, 3 were still in the channel when the link broke; id 4 was
                                              // handed out after the break and stays queued in the channel.
        c.on_down(2);
        assert!(!c.is_connected());
        assert!(c.to_send([1, 2, 3, 4].into_iter()).is_empty(), "offline");
        c.on_connected();
        assert_eq!(c.to_send([1, 2, 3, 4].into_iter()), vec![1, 2, 3]);
        // The queued request goes out after the reconnect and keeps its identity.
        c.on_outgoing(&Outgoing::Publish(5));
        assert_eq!(c.on_puback(5), Some(4));
    }

    #[test]
    fn a_collision_keeps_its_identity() {
        let mut c = LinkCore::default();
        c.on_connected();
        c.handed_out(Sent::Outbox(1));
        c.handed_out(Sent::Outbox(2));
        c.on_outgoing(&Outgoing::Publish(3));
        c.on_outgoing(&Outgoing::AwaitAck(3));
        assert_eq!(c.on_puback(3), Some(1));
        c.on_outgoing(&Outgoing::Publish(3));
        assert_eq!(c.on_puback(3), Some(2));
    }

    #[test]
    fn the_send_window_is_bounded() {
        let mut c = LinkCore::default();
        c.on_connected();
        let ids = c.to_send(1..=1000);
        assert_eq!(ids.len(), SEND_WINDOW);
        for id in ids {
            c.handed_out(Sent::Outbox(id));
        }
        assert!(c.to_send(1..=1000).is_empty());
    }

    #[test]
    fn a_password_file_must_be_private_and_hold_one_line() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pw");
        std::fs::write(&p, "\n  one-secret-line  \n\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(read_password(&p).unwrap(), "one-secret-line");
        std::fs::write(&p, "a\nb\n").unwrap();
        assert!(matches!(
            read_password(&p),
            Err(PasswordFileError::Malformed { .. })
        ));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o604)).unwrap();
        assert!(matches!(
            read_password(&p),
            Err(PasswordFileError::TooOpen { mode: 0o604, .. })
        ));
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        assert_eq!(backoff(0, 100, 10_000, 0), Duration::from_millis(50));
        assert_eq!(backoff(3, 100, 10_000, 499), Duration::from_millis(799));
        assert_eq!(backoff(30, 100, 10_000, 0), Duration::from_millis(5_000));
        assert!(backoff(30, 100, 10_000, 499) < Duration::from_millis(10_000));
    }
}
