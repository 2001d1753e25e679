//! The MQTT link's subscriptions in flight: which filters each SUBSCRIBE
//! carries, so that a SUBACK can be read back as filters.
//!
//! Why: rumqttc numbers a SUBSCRIBE only when its event loop sends it, and
//! reports that number alone (`Outgoing::Subscribe(pkid)`, then the
//! SUBACK's `pkid`). Two things need the filters behind it: the log of a
//! refused subscription says which filter the broker refused, and with the
//! embedded broker a group's routed uplinks are counted by the ingest gate
//! (`ingest_gate.rs`) only once the broker confirmed the group's filter —
//! counted earlier, a publish sent before the broker held the subscription
//! never comes out and would shut the gate for nothing.
//!
//! How: every SUBSCRIBE of the link goes through [`LinkSubs::subscribe`],
//! which records its filters and puts the request into rumqttc's channel
//! under one lock, so the records are in the channel's order; each
//! `Outgoing::Subscribe(pkid)` takes the oldest record. A connection lost
//! on a clean session drops the requests rumqttc held at that moment (its
//! `clean` moves them aside, and a CONNACK without a session clears them):
//! so are their records. An UNSUBSCRIBE ([`LinkSubs::unsubscribe`]) stops
//! the group being counted *before* it is sent, and gives back its bytes in
//! flight; a SUBACK arriving after it does not count the group again.

use super::ingest_gate::IngestGate;
use rumqttc::{AsyncClient, ClientError, QoS, SubscribeReasonCode};
use shardline_shared::topics;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

/// How often, and how long apart, a SUBSCRIBE is tried while rumqttc's
/// request channel is full (5 s in all).
const TRIES: u32 = 500;
const TRY_AGAIN: Duration = Duration::from_millis(10);

/// The bookkeeping, sans I/O: what [`LinkSubs`] keeps under its lock.
#[derive(Debug, Default)]
pub struct SubBook {
    /// Filters of each SUBSCRIBE put into the request channel and not sent
    /// yet, oldest first.
    queued: VecDeque<Vec<String>>,
    /// Filters of each SUBSCRIBE sent, by packet id, until its SUBACK.
    sent: HashMap<u16, Vec<String>>,
    /// How many of `queued` rumqttc held when the connection was lost
    /// (dropped if the next connection has no session).
    at_risk: usize,
    /// Whether the connection is up (the first loss after it moves the
    /// requests aside; a failed reconnect does not).
    up: bool,
    /// Filters subscribed and not unsubscribed since.
    wanted: BTreeSet<String>,
}

impl SubBook {
    /// A SUBSCRIBE of `filters` entered the request channel.
    pub fn queued(&mut self, filters: Vec<String>) {
        self.wanted.extend(filters.iter().cloned());
        self.queued.push_back(filters);
    }

    /// The newest one did not (the channel was full).
    fn unqueue_newest(&mut self) {
        self.queued.pop_back();
    }

    /// `Outgoing::Subscribe(pkid)`: the oldest queued SUBSCRIBE went out.
    pub fn sent(&mut self, pkid: u16) {
        match self.queued.pop_front() {
            Some(filters) => {
                self.at_risk = self.at_risk.saturating_sub(1);
                self.sent.insert(pkid, filters);
            }
            None => tracing::debug!(pkid, "a SUBSCRIBE went out that was not recorded"),
        }
    }

    /// A SUBACK: the filters of its SUBSCRIBE with whether each was
    /// granted (`None` if its SUBSCRIBE is unknown, or the counts differ).
    pub fn acked(
        &mut self,
        pkid: u16,
        codes: &[SubscribeReasonCode],
    ) -> Option<Vec<(String, bool)>> {
        let filters = self.sent.remove(&pkid)?;
        if filters.len() != codes.len() {
            return None;
        }
        Some(
            filters
                .into_iter()
                .zip(codes)
                .map(|(f, c)| (f, !matches!(c, SubscribeReasonCode::Failure)))
                .collect(),
        )
    }

    /// Whether `filter` was subscribed and not unsubscribed since.
    pub fn is_wanted(&self, filter: &str) -> bool {
        self.wanted.contains(filter)
    }

    /// An UNSUBSCRIBE of `filter` is about to be sent.
    pub fn unsubscribed(&mut self, filter: &str) {
        self.wanted.remove(filter);
    }

    /// The connection was lost: no SUBACK comes for what was sent, and
    /// what rumqttc held is dropped unless the session survives.
    pub fn connection_lost(&mut self) {
        self.sent.clear();
        if std::mem::take(&mut self.up) {
            self.at_risk = self.queued.len();
        }
    }

    /// A CONNACK.
    pub fn connected(&mut self, session_present: bool) {
        if !session_present {
            let n = self.at_risk.min(self.queued.len());
            self.queued.drain(..n);
        }
        self.at_risk = 0;
        self.up = true;
    }
}

/// See the module doc. One per MQTT link, shared with the assignment
/// driver (`AssignShared::link`).
#[derive(Debug, Default)]
pub struct LinkSubs {
    book: Mutex<SubBook>,
    /// The embedded broker's gate, told which groups the link holds.
    gate: OnceLock<Arc<IngestGate>>,
}

impl LinkSubs {
    fn book(&self) -> std::sync::MutexGuard<'_, SubBook> {
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// With the embedded broker: the gate to tell (set once, at start).
    pub fn attach_gate(&self, gate: Arc<IngestGate>) {
        let _ = self.gate.set(gate);
    }

    /// Subscribes `client` (QoS 1) to `filter`, recorded (see the module
    /// doc). Waits up to 5 s for room in the request channel.
    pub async fn subscribe(&self, client: &AsyncClient, filter: String) -> Result<(), ClientError> {
        if !rumqttc::valid_filter(&filter) {
            // Refused by rumqttc at once, as a full channel is: no retry.
            return client.try_subscribe(filter, QoS::AtLeastOnce);
        }
        let mut tries = 0;
        loop {
            {
                let mut book = self.book();
                // Recorded first, under the lock: the event loop may send
                // it before this returns, and `sent` waits for the lock.
                book.queued(vec![filter.clone()]);
                match client.try_subscribe(filter.clone(), QoS::AtLeastOnce) {
                    Ok(()) => return Ok(()),
                    Err(e) => {
                        book.unqueue_newest();
                        tries += 1;
                        if tries >= TRIES {
                            return Err(e);
                        }
                    }
                }
            }
            tokio::time::sleep(TRY_AGAIN).await;
        }
    }

    /// Unsubscribes `client` from `filter`; a group's routed uplinks stop
    /// being counted first (what it had in flight is given back).
    pub async fn unsubscribe(
        &self,
        client: &AsyncClient,
        filter: String,
    ) -> Result<(), ClientError> {
        {
            let mut book = self.book();
            book.unsubscribed(&filter);
            if let (Some(gate), Some(group)) =
                (self.gate.get(), topics::uplink_filter_group(&filter))
            {
                gate.release_group(&group);
            }
        }
        client.unsubscribe(filter).await
    }

    /// `Outgoing::Subscribe(pkid)`.
    pub fn sent(&self, pkid: u16) {
        self.book().sent(pkid);
    }

    /// A SUBACK: see [`SubBook::acked`]; a granted group filter still
    /// wanted is counted by the gate from now on.
    pub fn acked(&self, pkid: u16, codes: &[SubscribeReasonCode]) -> Option<Vec<(String, bool)>> {
        let mut book = self.book();
        let filters = book.acked(pkid, codes)?;
        if let Some(gate) = self.gate.get() {
            for (f, granted) in &filters {
                if let (true, Some(group)) = (*granted, topics::uplink_filter_group(f)) {
                    if book.is_wanted(f) {
                        tracing::info!(%group, "ingest gate: counting a group's routed uplinks");
                        gate.hold_group(group);
                    }
                }
            }
        }
        Some(filters)
    }

    /// The connection was lost: the gate counts no group until the new
    /// connection's SUBACKs.
    pub fn connection_lost(&self) {
        self.book().connection_lost();
        if let Some(gate) = self.gate.get() {
            gate.release_all_groups();
        }
    }

    /// A CONNACK.
    pub fn connected(&self, session_present: bool) {
        self.book().connected(session_present);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::SubscribeReasonCode::{Failure, Success};

    fn f(s: &str) -> Vec<String> {
        vec![s.to_owned()]
    }

    #[test]
    fn a_subacks_packet_id_names_its_filters() {
        let mut b = SubBook::default();
        b.connected(false);
        b.queued(f("a"));
        b.queued(f("b"));
        b.sent(7);
        b.sent(8);
        assert_eq!(b.acked(8, &[Failure]), Some(vec![("b".to_owned(), false)]));
        assert_eq!(
            b.acked(7, &[Success(QoS::AtLeastOnce)]),
            Some(vec![("a".to_owned(), true)])
        );
        assert_eq!(b.acked(7, &[Success(QoS::AtLeastOnce)]), None, "once");
        // A SUBACK whose codes do not match its filters names none.
        b.queued(vec!["c".into(), "d".into()]);
        b.sent(9);
        assert_eq!(b.acked(9, &[Failure]), None);
    }

    #[test]
    fn a_lost_clean_session_drops_what_rumqttc_held() {
        let mut b = SubBook::default();
        b.connected(false);
        b.queued(f("sent"));
        b.sent(1);
        b.queued(f("held"));
        b.connection_lost();
        // Queued while reconnecting: still in the channel.
        b.queued(f("later"));
        // A failed reconnect moves nothing more aside.
        b.connection_lost();
        b.connected(false);
        b.sent(1);
        assert_eq!(
            b.acked(1, &[Success(QoS::AtLeastOnce)]),
            Some(vec![("later".to_owned(), true)])
        );
        // With the session kept, rumqttc sends what it held.
        let mut b = SubBook::default();
        b.connected(false);
        b.queued(f("held"));
        b.connection_lost();
        b.connected(true);
        b.sent(2);
        assert_eq!(
            b.acked(2, &[Success(QoS::AtLeastOnce)]),
            Some(vec![("held".to_owned(), true)])
        );
    }

    #[tokio::test]
    async fn an_invalid_filter_is_refused_at_once_and_leaves_no_record() {
        let link = LinkSubs::default();
        let opts = rumqttc::MqttOptions::new("t", "127.0.0.1", 1);
        let (client, _eventloop) = AsyncClient::new(opts, 10);
        let t = std::time::Instant::now();
        assert!(link.subscribe(&client, "a/#/b".into()).await.is_err());
        assert!(t.elapsed() < Duration::from_secs(1), "no retries");
        link.subscribe(&client, "a/+".into()).await.unwrap();
        link.connected(false);
        link.sent(1);
        assert_eq!(
            link.acked(1, &[Success(QoS::AtLeastOnce)]),
            Some(vec![("a/+".to_owned(), true)]),
            "the valid one is the only record"
        );
    }

    #[tokio::test]
    async fn the_gate_counts_a_group_from_its_suback_until_it_is_dropped() {
        use shardline_shared::assign::GroupId;
        let g = GroupId::new("acme.eu.vpn").unwrap();
        let filter = topics::group_uplink_filter(&g);
        let routed = "shardline/v1/g/acme/eu/vpn/dev/d1/report";
        let gate = Arc::new(IngestGate::default());
        let link = LinkSubs::default();
        link.attach_gate(gate.clone());
        link.connected(false);
        link.book()
            .queued(vec![filter.clone(), topics::ALL_STATUS.into()]);
        link.sent(3);
        assert!(gate.lane(routed).is_none(), "not before the SUBACK");
        let granted = Success(QoS::AtLeastOnce);
        link.acked(3, &[granted, granted]).unwrap();
        assert!(gate.lane(routed).is_some());
        // Refused: not counted.
        let other = LinkSubs::default();
        other.attach_gate(Arc::new(IngestGate::default()));
        other.connected(false);
        other.book().queued(f(&filter));
        other.sent(1);
        other.acked(1, &[Failure]).unwrap();
        assert!(other.gate.get().unwrap().lane(routed).is_none());
        // Lost connection: released; confirmed again: counted.
        link.connection_lost();
        assert!(gate.lane(routed).is_none());
        link.connected(false);
        link.book().queued(f(&filter));
        link.sent(4);
        link.acked(4, &[granted]);
        assert!(gate.lane(routed).is_some());
        // Unsubscribed while a re-subscription's SUBACK was on its way:
        // the late SUBACK does not count the group again.
        link.book().queued(f(&filter));
        link.sent(5);
        // (A client whose event loop is never polled: the request waits
        // in its channel.)
        let opts = rumqttc::MqttOptions::new("t", "127.0.0.1", 1);
        let (client, _eventloop) = AsyncClient::new(opts, 10);
        link.unsubscribe(&client, filter.clone()).await.unwrap();
        assert!(gate.lane(routed).is_none(), "dropped: not counted");
        link.acked(5, &[granted]);
        assert!(gate.lane(routed).is_none(), "a late SUBACK");
    }
}
