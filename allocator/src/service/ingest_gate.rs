//! Flow control between the embedded broker's front door and the
//! allocator's MQTT link: devices are never allowed to get further ahead of
//! the link than the broker can hold.
//!
//! Why: rumqttd acknowledges a publish once it is in its in-memory log (one
//! per subscription filter, `max_segment_size` × `max_segment_count`), and
//! when a subscriber lags by more than that log it drops the oldest segment
//! and moves the subscriber past it: acknowledged reports vanish, silently.
//! rumqttd has no back-pressure of its own. So the front
//! (`broker_acl::front`, in front of every embedded broker) asks this gate
//! before it passes a device's publish on: while the publishes on topics
//! the link reads that went in but have not come out of the link exceed
//! [`WINDOW_BYTES`] (an eighth of one filter's log), the front stops reading
//! that connection, TCP pushes back, and the device's PUBACKs wait. Nothing
//! acknowledged is dropped; devices slow down to what the allocator takes
//! off the broker, which under overload is far more than it verifies (the
//! link hands reports to the conflating stage in `verifiers.rs` and goes
//! straight back).
//!
//! Counted on both sides: the topic and payload bytes of publishes on the
//! plain device uplinks the link subscribes to, and of group-routed
//! uplinks (`g/{tenant}/{region}/{capability}/dev/…`, issue 19) of a group
//! whose filter the link holds *now*: the broker confirmed it (SUBACK) on
//! the current connection and it was not dropped since
//! ([`hold_group`](IngestGate::hold_group), told by `link_subs.rs`). An
//! instance holds only some groups' filters, and they move: a routed
//! publish of a group the link does not hold never comes out, so counting
//! it would shut the gate for nothing. Each held group's bytes in flight
//! are kept apart, so a group dropped (unsubscribed, or the link's
//! connection lost) while bytes are in flight gives them back at once
//! ([`release_group`](IngestGate::release_group)) instead of holding the
//! gate shut until the stall below; a routed publish that comes out after
//! its group was dropped is not taken off again.
//!
//! A publish the link never gets (sent before the link subscribed, or
//! while it was away on a clean session) would hold the gate shut for
//! good; so when the gate has been shut for [`STALL`] with nothing coming
//! out of the link, it is opened again (logged, counted): better a
//! possible loss inside the broker than a fleet that cannot publish.

use shardline_allocator_core::service::counters::GateState;
use shardline_shared::assign::GroupId;
use shardline_shared::topics;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tokio::sync::Notify;

/// Bytes the link may be behind the front: an eighth of one filter's log
/// in the embedded broker (16 MiB × 4), so even a publish of the largest
/// size allowed cannot push a subscriber out of it.
pub const WINDOW_BYTES: i64 = 8 << 20;
/// How long the gate stays shut with nothing coming out of the link before
/// it assumes the rest will never arrive and opens.
pub const STALL: Duration = Duration::from_secs(2);

/// See the module doc. One per allocator process.
#[derive(Debug, Default)]
pub struct IngestGate {
    /// Bytes passed in by the front and not yet taken by the link (plain
    /// and routed together: the window is one).
    behind: AtomicI64,
    /// Front connections waiting for room (the link wakes them only then).
    waiting: AtomicUsize,
    taken: Notify,
    /// The groups whose routed filter the link holds, with the bytes of
    /// their publishes counted in and not yet taken (part of `behind`).
    /// Changed only under this lock, with `behind`, so a group's release
    /// gives back exactly what it still holds.
    groups: Mutex<HashMap<GroupId, i64>>,
    /// Microseconds front connections spent waiting, summed.
    held_micros: AtomicU64,
    /// Times the gate was opened after [`STALL`].
    stall_reopens: AtomicU64,
}

/// Which count a publish goes into (see [`IngestGate::lane`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lane {
    /// A plain device uplink (`dev/{device}/{kind}`).
    Plain,
    /// A routed uplink of a group the link holds.
    Group(GroupId),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl IngestGate {
    /// Whether a publish on `topic` is counted now, and where: a plain
    /// device uplink always, a routed one while the link holds its group.
    pub fn lane(&self, topic: &str) -> Option<Lane> {
        match topics::parse_routed(topic)? {
            (None, _, kind) if kind.is_uplink() => Some(Lane::Plain),
            // `parse_routed` accepts only routable kinds, all uplinks.
            (Some(group), _, _) if lock(&self.groups).contains_key(&group) => {
                Some(Lane::Group(group))
            }
            _ => None,
        }
    }

    /// The front: waits until the link is less than [`WINDOW_BYTES`]
    /// behind, then counts `bytes` in on `lane` (a group dropped meanwhile
    /// is not counted: its publish will not come out).
    pub async fn admit(&self, lane: &Lane, bytes: usize) {
        if self.behind.load(Ordering::Acquire) >= WINDOW_BYTES {
            self.wait().await;
        }
        self.count_in(lane, bytes as i64);
    }

    fn count_in(&self, lane: &Lane, bytes: i64) {
        match lane {
            Lane::Plain => {
                self.behind.fetch_add(bytes, Ordering::AcqRel);
            }
            Lane::Group(g) => {
                let mut groups = lock(&self.groups);
                if let Some(held) = groups.get_mut(g) {
                    *held += bytes;
                    self.behind.fetch_add(bytes, Ordering::AcqRel);
                }
            }
        }
    }

    async fn wait(&self) {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        let since = tokio::time::Instant::now();
        let mut stalled = 0;
        loop {
            let taken = self.taken.notified();
            tokio::pin!(taken);
            // Registered before the check: a take after it wakes us.
            taken.as_mut().enable();
            let behind = self.behind.load(Ordering::Acquire);
            if behind < WINDOW_BYTES {
                break;
            }
            if tokio::time::timeout(STALL, taken).await.is_err() {
                stalled += 1;
                self.stall_reopens.fetch_add(1, Ordering::Relaxed);
                // Nothing came out of the link for a while: what is
                // counted will not come (see the module doc).
                tracing::warn!(
                    behind_bytes = behind,
                    stalled_s = stalled * STALL.as_secs(),
                    "embedded broker: the MQTT link took nothing while devices waited; letting them publish again"
                );
                let mut groups = lock(&self.groups);
                groups.values_mut().for_each(|b| *b = 0);
                self.behind.store(0, Ordering::Release);
            }
        }
        self.waiting.fetch_sub(1, Ordering::AcqRel);
        self.held_micros
            .fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
    }

    /// The link: a publish of `bytes` on `topic` came out.
    pub fn taken(&self, topic: &str, bytes: usize) {
        let bytes = bytes as i64;
        match topics::parse_routed(topic) {
            Some((None, _, kind)) if kind.is_uplink() => self.take(bytes),
            Some((Some(group), _, _)) => {
                let mut groups = lock(&self.groups);
                // A group not held (dropped, or not yet confirmed when this
                // was published) counted nothing in.
                if let Some(held) = groups.get_mut(&group) {
                    let n = bytes.min(*held);
                    *held -= n;
                    self.take(n);
                }
            }
            _ => {}
        }
    }

    fn take(&self, bytes: i64) {
        // Never below zero: retained messages the link gets on subscribing
        // were not counted in.
        let _ = self
            .behind
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some((b - bytes).max(0))
            });
        if self.waiting.load(Ordering::Acquire) > 0 {
            self.taken.notify_waiters();
        }
    }

    /// The link holds `group`'s routed filter now (the broker confirmed
    /// it): its routed uplinks are counted from here on.
    pub fn hold_group(&self, group: GroupId) {
        lock(&self.groups).entry(group).or_insert(0);
    }

    /// The link dropped `group`'s filter: its bytes in flight are given
    /// back (they may never come out) and it is no longer counted.
    pub fn release_group(&self, group: &GroupId) {
        let mut groups = lock(&self.groups);
        if let Some(held) = groups.remove(group) {
            self.take(held);
        }
    }

    /// The link's connection was lost: every group is released (they are
    /// held again as the new connection's SUBACKs arrive).
    pub fn release_all_groups(&self) {
        let mut groups = lock(&self.groups);
        let held: i64 = groups.drain().map(|(_, b)| b).sum();
        self.take(held);
    }

    /// Whether [`admit`](Self::admit) would wait now.
    pub fn is_shut(&self) -> bool {
        self.behind.load(Ordering::Acquire) >= WINDOW_BYTES
    }

    /// Bytes the link is behind the front now.
    pub fn behind(&self) -> i64 {
        self.behind.load(Ordering::Acquire)
    }

    /// What `/metrics` shows of the gate.
    pub fn stats(&self) -> GateState {
        GateState {
            behind_bytes: self.behind().max(0) as u64,
            waiting: self.waiting.load(Ordering::Acquire) as u64,
            held_seconds: self.held_micros.load(Ordering::Relaxed) as f64 / 1e6,
            stall_reopens: self.stall_reopens.load(Ordering::Relaxed),
            groups: lock(&self.groups).len() as u64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const PLAIN: &str = "shardline/v1/dev/d1/report";
    const ROUTED: &str = "shardline/v1/g/acme/eu/vpn/dev/d1/report";

    fn group() -> GroupId {
        GroupId::new("acme.eu.vpn").unwrap()
    }

    #[test]
    fn only_the_plain_uplinks_the_link_reads_are_counted() {
        let gate = IngestGate::default();
        for kind in ["report", "ack", "status"] {
            let topic = format!("shardline/v1/dev/d1/{kind}");
            assert_eq!(gate.lane(&topic), Some(Lane::Plain), "{topic}");
        }
        assert_eq!(gate.lane("shardline/v1/dev/d1/instr"), None);
        assert_eq!(gate.lane("shardline/v1/dev/d1/answer"), None);
        assert_eq!(gate.lane("something/else"), None);
    }

    #[test]
    fn a_routed_uplink_is_counted_only_while_the_link_holds_its_group() {
        let gate = IngestGate::default();
        assert_eq!(gate.lane(ROUTED), None, "not held: not counted");
        gate.hold_group(group());
        assert_eq!(gate.lane(ROUTED), Some(Lane::Group(group())));
        assert_eq!(
            gate.lane("shardline/v1/g/acme/us/vpn/dev/d1/report"),
            None,
            "another group"
        );
        gate.count_in(&Lane::Group(group()), 300);
        gate.count_in(&Lane::Plain, 50);
        assert_eq!(gate.behind(), 350);
        gate.taken(ROUTED, 100);
        assert_eq!(gate.behind(), 250);
        // More taken than the group counted in (published before the
        // SUBACK): only its own bytes come off.
        gate.taken(ROUTED, 1_000);
        assert_eq!(gate.behind(), 50);
        gate.taken(PLAIN, 50);
        assert_eq!(gate.behind(), 0);
    }

    #[test]
    fn a_dropped_group_gives_its_bytes_in_flight_back() {
        let gate = IngestGate::default();
        gate.hold_group(group());
        gate.count_in(&Lane::Group(group()), WINDOW_BYTES);
        gate.count_in(&Lane::Plain, 10);
        assert!(gate.is_shut());
        gate.release_group(&group());
        assert!(!gate.is_shut());
        assert_eq!(gate.behind(), 10, "the plain bytes stay");
        assert_eq!(gate.lane(ROUTED), None);
        // Its publishes still coming out take nothing off.
        gate.taken(ROUTED, 5);
        assert_eq!(gate.behind(), 10);
        // Counted in after the drop (admitted while it happened): nothing.
        gate.count_in(&Lane::Group(group()), 500);
        assert_eq!(gate.behind(), 10);
        // The connection lost: every group released.
        gate.hold_group(group());
        gate.count_in(&Lane::Group(group()), 700);
        gate.release_all_groups();
        assert_eq!(gate.behind(), 10);
        assert_eq!(gate.stats().groups, 0);
    }

    #[tokio::test]
    async fn a_front_waiting_on_a_group_is_let_go_when_the_group_is_dropped() {
        let gate = Arc::new(IngestGate::default());
        gate.hold_group(group());
        gate.admit(&Lane::Group(group()), WINDOW_BYTES as usize)
            .await;
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.admit(&Lane::Plain, 100).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "a window behind: the front waits");
        assert_eq!(gate.stats().waiting, 1);
        gate.release_group(&group());
        tokio::time::timeout(Duration::from_secs(1), waiter)
            .await
            .expect("let go well before the stall")
            .unwrap();
        assert_eq!(gate.behind(), 100);
        let stats = gate.stats();
        assert_eq!((stats.waiting, stats.stall_reopens), (0, 0));
        assert!(stats.held_seconds >= 0.3, "{stats:?}");
    }

    #[tokio::test]
    async fn the_front_waits_while_the_link_is_a_window_behind() {
        let gate = Arc::new(IngestGate::default());
        gate.admit(&Lane::Plain, WINDOW_BYTES as usize).await;
        let g = gate.clone();
        let waiter = tokio::spawn(async move { g.admit(&Lane::Plain, 100).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!waiter.is_finished(), "a window behind: the front waits");
        gate.taken(PLAIN, 1_000);
        waiter.await.unwrap();
        assert_eq!(gate.behind(), WINDOW_BYTES - 1_000 + 100);
    }

    #[tokio::test]
    async fn a_gate_nothing_comes_out_of_opens_after_the_stall() {
        let gate = IngestGate::default();
        gate.hold_group(group());
        gate.admit(&Lane::Group(group()), WINDOW_BYTES as usize)
            .await;
        let t = tokio::time::Instant::now();
        gate.admit(&Lane::Plain, 10).await;
        assert!(t.elapsed() >= STALL);
        assert_eq!(gate.behind(), 10);
        assert_eq!(gate.stats().stall_reopens, 1);
        // The group's count was reset with it: releasing it now gives
        // back nothing more.
        gate.release_group(&group());
        assert_eq!(gate.behind(), 10);
    }

    #[test]
    fn retained_messages_never_make_it_negative() {
        let gate = IngestGate::default();
        gate.taken(PLAIN, 500);
        assert_eq!(gate.behind(), 0);
    }
}
