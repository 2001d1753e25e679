//! The conflating queue in front of the core (the service's inbox of
//! verified device messages): how the service degrades instead of
//! collapsing when reports arrive faster than it can handle them. Only
//! verified reports are conflated, so a forgery never displaces a genuine
//! report.
//!
//! A device's report says everything the allocator needs about the device
//! now (its state, not a delta), so when a newer report of a device arrives
//! while an older one still waits, the older one is worthless: it is dropped
//! (conflated, counted) and the newer one queued. The queue therefore holds
//! at most one report per device, and under any overload every device's
//! NEWEST report is handled within one pass over the queue (at most
//! `devices / throughput` seconds). Everything else (acks, and whatever the
//! caller pushes with [`ConflatingQueue::push`]) is never conflated or shed:
//! the caller applies backpressure for those instead ([`ConflatingQueue::kept`]).
//!
//! Order: the newer report goes to the tail (the older one's slot becomes a
//! hole), so a device's messages stay in arrival order (an ack that arrived
//! between two reports is still handled before the newer report).
//!
//! Sans-IO: the caller passes `now_ms`; no clock, no locking, no threads.

use shardline_shared::DeviceId;
use std::collections::{HashMap, VecDeque};

/// What became of a pushed report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; no older report of the device was waiting.
    Queued,
    /// Queued, and the device's older waiting report was dropped.
    Conflated,
    /// Not queued: the queue already holds `report_cap` reports of other
    /// devices (a memory bound; sized above the fleet it never triggers).
    Shed,
}

/// One queued message, with when it was queued.
#[derive(Debug)]
struct Slot<T> {
    at_ms: u64,
    item: T,
    /// The device whose report this is (`None`: not conflatable).
    report_of: Option<DeviceId>,
}

/// A FIFO that keeps at most one report per device (see the module doc).
#[derive(Debug)]
pub struct ConflatingQueue<T> {
    /// Queued messages; `None` is the hole a conflated report left.
    slots: VecDeque<Option<Slot<T>>>,
    /// Absolute position of `slots[0]` (positions never go back).
    head: u64,
    /// Device ⇒ absolute position of its waiting report.
    reports: HashMap<DeviceId, u64>,
    /// Messages that are never conflated (acks …) currently queued.
    kept: usize,
    report_cap: usize,
}

impl<T> ConflatingQueue<T> {
    /// A queue holding at most `report_cap` reports (one per device).
    pub fn new(report_cap: usize) -> Self {
        Self {
            slots: VecDeque::new(),
            head: 0,
            reports: HashMap::new(),
            kept: 0,
            report_cap: report_cap.max(1),
        }
    }

    /// Queues `device`'s report, dropping its older waiting one if any.
    pub fn push_report(&mut self, now_ms: u64, device: DeviceId, item: T) -> Pushed {
        let pushed = match self.reports.get(&device) {
            Some(&pos) => {
                let i = (pos - self.head) as usize;
                self.slots[i] = None;
                // Under overload the oldest reports are the ones conflated:
                // keep the front live, so `oldest_age_ms` is O(1).
                while let Some(None) = self.slots.front() {
                    self.slots.pop_front();
                    self.head += 1;
                }
                Pushed::Conflated
            }
            None if self.reports.len() >= self.report_cap => return Pushed::Shed,
            None => Pushed::Queued,
        };
        let pos = self.head + self.slots.len() as u64;
        self.reports.insert(device.clone(), pos);
        self.slots.push_back(Some(Slot {
            at_ms: now_ms,
            item,
            report_of: Some(device),
        }));
        self.compact();
        pushed
    }

    /// Queues a message that is never conflated or shed.
    pub fn push(&mut self, now_ms: u64, item: T) {
        self.kept += 1;
        self.slots.push_back(Some(Slot {
            at_ms: now_ms,
            item,
            report_of: None,
        }));
    }

    /// The oldest queued message.
    pub fn pop(&mut self) -> Option<T> {
        while let Some(front) = self.slots.pop_front() {
            self.head += 1;
            let Some(slot) = front else { continue };
            match slot.report_of {
                Some(device) => {
                    self.reports.remove(&device);
                }
                None => self.kept -= 1,
            }
            while let Some(None) = self.slots.front() {
                self.slots.pop_front();
                self.head += 1;
            }
            return Some(slot.item);
        }
        None
    }

    /// Messages queued (holes not counted).
    pub fn len(&self) -> usize {
        self.reports.len() + self.kept
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Queued messages that are never conflated (for backpressure).
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// How long the oldest queued message has waited (O(1): the front slot
    /// is never a hole after a push or a pop).
    pub fn oldest_age_ms(&self, now_ms: u64) -> u64 {
        self.slots
            .iter()
            .flatten()
            .next()
            .map_or(0, |s| now_ms.saturating_sub(s.at_ms))
    }

    /// Drops the holes once they outnumber the messages, so one device
    /// reporting in a loop cannot grow the queue (amortised O(1)).
    fn compact(&mut self) {
        let live = self.len();
        if self.slots.len() <= 2 * live + 64 {
            return;
        }
        self.slots.retain(Option::is_some);
        for (i, slot) in self.slots.iter().enumerate() {
            if let Some(Slot {
                report_of: Some(d), ..
            }) = slot
            {
                self.reports.insert(d.clone(), self.head + i as u64);
            }
        }
    }
}
