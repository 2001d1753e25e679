use super::*;

/// Devices whose records are owed a lazy write, oldest first, each with
/// the time it was queued. A device is queued once; removing it (its record
/// was written or reloaded) leaves a stale entry that `pop_front` skips.
#[derive(Debug, Default)]
pub(super) struct LazyQueue {
    members: std::collections::HashSet<DeviceId>,
    order: std::collections::VecDeque<(DeviceId, u64)>,
}

impl LazyQueue {
    pub(super) fn insert(&mut self, device: DeviceId, at_ms: u64) {
        // Most devices are already queued (one report after another):
        // their id is only looked up, not cloned.
        if self.members.contains(&device) {
            return;
        }
        self.members.insert(device.clone());
        self.order.push_back((device, at_ms));
        // Stale entries are bounded by the writes since the queue last
        // drained; compact if churn ever lets them pile up.
        if self.order.len() > 4 * self.members.len() + 1024 {
            let mut seen = std::collections::HashSet::new();
            let members = &self.members;
            self.order
                .retain(|(d, _)| members.contains(d) && seen.insert(d.clone()));
        }
    }

    pub(super) fn remove(&mut self, device: &DeviceId) {
        self.members.remove(device);
    }

    pub(super) fn pop_front(&mut self) -> Option<DeviceId> {
        while let Some((device, _)) = self.order.pop_front() {
            if self.members.remove(&device) {
                return Some(device);
            }
        }
        None
    }

    /// When the oldest live entry was queued.
    pub(super) fn oldest_ms(&mut self) -> Option<u64> {
        while let Some((device, at)) = self.order.front() {
            if self.members.contains(device) {
                return Some(*at);
            }
            self.order.pop_front();
        }
        None
    }

    pub(super) fn len(&self) -> usize {
        self.members.len()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

impl Core {
    /// Schedules every lazily kept engine state for the next commit (on
    /// shutdown).
    pub fn flush_lazy(&mut self) {
        for device in self.engine.take_dirty() {
            self.lazy.insert(device, self.last_lazy_ms);
        }
        while let Some(device) = self.lazy.pop_front() {
            self.dirty.insert(device);
        }
    }

    /// Moves lazily kept records into the next commit, oldest first, at the
    /// even rate that writes the queue by the time its oldest entry has
    /// waited `engine_flush_ms` (and anything overdue at once). No single commit carries the fleet, so no
    /// report waits behind one. Call before each [`Core::take_step`].
    pub fn pace_lazy_writes(&mut self, now_ms: u64) {
        // Devices the engine marked since are queued by `take_step` (at this
        // time, `last_lazy_ms`).
        let elapsed = now_ms.saturating_sub(self.last_lazy_ms);
        self.last_lazy_ms = now_ms;
        if self.lazy.is_empty() {
            self.lazy_credit = 0.0;
            return;
        }
        let period = self.cfg.engine_flush_ms.max(1);
        // Drain evenly so that the oldest entry (and with it, the whole
        // queue) is written by its deadline.
        let until_due = self
            .lazy
            .oldest_ms()
            .map_or(period, |at| {
                at.saturating_add(period).saturating_sub(now_ms)
            })
            .max(1);
        self.lazy_credit += self.lazy.len() as f64 * (elapsed as f64 / until_due as f64).min(1.0);
        loop {
            let overdue = self
                .lazy
                .oldest_ms()
                .is_some_and(|at| at.saturating_add(period) <= now_ms);
            if !overdue && self.lazy_credit < 1.0 {
                break;
            }
            let Some(device) = self.lazy.pop_front() else {
                break;
            };
            self.dirty.insert(device);
            self.lazy_credit = (self.lazy_credit - 1.0).max(0.0);
        }
    }
}
