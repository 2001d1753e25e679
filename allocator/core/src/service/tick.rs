use super::*;

impl Core {
    /// Periodic work: the engine's tick, re-sends, gauges, checkpoints.
    pub fn on_tick(&mut self, now_ms: u64) {
        if !self.leader {
            self.refresh_gauges(now_ms);
            return;
        }
        // The engine marks every device it ticked as changed (reputation
        // decays continuously); writing the whole fleet every tick would
        // dominate the store. Devices the tick acted on are written now (their
        // records are marked by `feed`); the rest at the next checkpoint.
        self.feed(now_ms, Event::Tick);
        // Whatever its (unsigned) status says: a forged "offline" must not
        // stop re-sends. The backoff in `resend_pending` keeps devices that
        // really are offline cheap.
        for device in self.devices_with_pending() {
            self.resend_pending(now_ms, &device, 0, false);
        }
        if now_ms.saturating_sub(self.last_checkpoint_ms) >= self.cfg.checkpoint_ms {
            self.last_checkpoint_ms = now_ms;
            // Paced like any lazy write: a whole-fleet commit would stall
            // every report behind it.
            // Queued as if spread over the last period, so they fall due
            // one by one rather than all at the same moment.
            let all: Vec<DeviceId> = self.records.keys().cloned().collect();
            let (n, period) = (all.len().max(1) as u64, self.cfg.engine_flush_ms);
            for (i, device) in all.into_iter().enumerate() {
                if !self.dirty.contains(&device) {
                    let at = now_ms.saturating_sub(period) + period * i as u64 / n;
                    self.lazy.insert(device, at);
                }
            }
        }
        self.refresh_gauges(now_ms);
    }

    pub(super) fn refresh_gauges(&mut self, now_ms: u64) {
        let accepted = self.metrics.reports_accepted.load(Ordering::Relaxed);
        let dt = now_ms.saturating_sub(self.last_tick_ms);
        let rate = if dt > 0 {
            (accepted - self.accepted_at_last_tick.min(accepted)) as f64 * 1000.0 / dt as f64
        } else {
            0.0
        };
        self.last_tick_ms = now_ms;
        self.accepted_at_last_tick = accepted;
        let fleet = self.fleet_gauges(now_ms);
        let health = self.engine.catalog_health();
        self.metrics.set_gauges(counters::Gauges {
            devices: self.records.len() as u64,
            pending_instructions: fleet.pending_instructions,
            reputation_buckets: fleet.reputation_buckets,
            tiers: fleet.tiers,
            reports_per_second: rate,
            key_epoch: self.meta.key_epoch,
            catalog_failing: health
                .marks()
                .map(|m| (m.shard.clone(), m.arch.clone()))
                .collect(),
            start_failures: health
                .start_failures_total
                .iter()
                .flat_map(|(s, m)| m.iter().map(move |(a, n)| (s.clone(), a.clone(), *n)))
                .collect(),
            duplicate_devices: fleet.duplicate_devices,
        });
    }

    /// The gauges that take a pass over every device, counted again only
    /// when [`FLEET_GAUGES_MS`] has passed: at 30,000 devices that pass
    /// was most of a tick's cost, once a second, for gauges scraped far
    /// less often.
    fn fleet_gauges(&mut self, now_ms: u64) -> FleetGauges {
        if let Some((at, g)) = &self.fleet_gauges {
            if now_ms.saturating_sub(*at) < FLEET_GAUGES_MS {
                return g.clone();
            }
        }
        {
            let tiers = self
                .engine
                .units_by_tier()
                .into_iter()
                .map(|(t, u)| {
                    (
                        t,
                        u.devices,
                        u.compute_units_used,
                        u.data_units_used,
                        u.compute_units_budget,
                        u.data_units_budget,
                    )
                })
                .collect();
            let g = FleetGauges {
                pending_instructions: self.records.values().map(|r| r.pending.len() as u64).sum(),
                reputation_buckets: self.engine.reputation_buckets(),
                tiers,
                duplicate_devices: self.engine.duplicate_devices(now_ms) as u64,
            };
            self.fleet_gauges = Some((now_ms, g.clone()));
            g
        }
    }
}

/// How old the fleet-wide gauges ([`FleetGauges`]) may be.
pub(super) const FLEET_GAUGES_MS: u64 = 10_000;

/// Gauges counted over every device, kept between their refreshes.
#[derive(Debug, Clone, Default)]
pub(super) struct FleetGauges {
    pending_instructions: u64,
    reputation_buckets: [u64; 10],
    tiers: Vec<(String, u64, u64, u64, u64, u64)>,
    duplicate_devices: u64,
}
