//! The credit market in the tick: lending earns credits, each tenant pool
//! runs one auction per kind (bids of devices short of units, asks of
//! devices with spare units; the rule is [`market::clear`]), fills become
//! [`TransferOrigin::Market`] transfers so the budget arithmetic of loans
//! (effective budget, return on expiry, recall by a seller that needs its
//! units) applies unchanged, and market units still used are renewed at
//! their price instead of returned and bought back (which would flap).

use super::super::market::{self, Ask, Bid, Credits};
use super::*;

/// Notes for accounts, applied after the decisions that produced them.
type Notes = Vec<(DeviceId, String)>;

impl Engine {
    /// Start of a tick with the market on: market units whose lease ends now
    /// are renewed when still used and paid for, before the tick returns them.
    pub(super) fn renew_market(&mut self, now: u64) {
        let cfg = &self.config;
        let mcfg = &cfg.market;
        // (transfer, its seller from now on, price per unit)
        let mut renew: Vec<(Transfer, DeviceId, u64)> = Vec::new();
        let mut notes: Notes = Vec::new();
        for (id, st) in &self.devices {
            for t in &st.borrowed {
                let TransferOrigin::Market { price_milli } = t.origin else {
                    continue;
                };
                if t.expires_at_ms > now {
                    continue;
                }
                let k = kind_index(t.kind);
                let (Some(tier_to), Some(seller)) = (
                    self.agreements.tiers.get(&st.tier),
                    self.devices.get(&t.from),
                ) else {
                    continue;
                };
                let Some(tier_from) = self.agreements.tiers.get(&seller.tier) else {
                    continue;
                };
                let others = sum_units(&st.borrowed)[k].saturating_sub(t.units);
                let short_without =
                    st.need_units[k] > quota_budget(cfg, tier_to, st)[k].saturating_add(others);
                let q = quota_budget(cfg, tier_from, seller)[k];
                let seller_ok =
                    q >= sum_units(&seller.lent)[k].saturating_add(seller.need_units[k]);
                let from = if seller_ok {
                    Some(t.from.clone())
                } else {
                    self.other_seller(id, &t.from, t.kind, t.units)
                };
                // Renewed at its price, or lower when the balance no longer
                // covers it: the same share of the balance a new bid may
                // commit (else the units would return, and be bought back
                // by that new bid at once: a flap).
                let affordable = st
                    .credits
                    .balance_milli
                    .saturating_mul(mcfg.max_spend_permille.min(1000))
                    / 1000
                    / u64::from(t.units.max(1));
                let price = price_milli.min(affordable);
                let why_not = if !short_without {
                    Some("no longer needed".to_owned())
                } else if from.is_none() {
                    Some(format!(
                        "{} needs them and no other seller has them",
                        t.from
                    ))
                } else if st.reputation.score < cfg.borrow_min_reputation {
                    Some(format!(
                        "reputation {:.1} below the borrowing threshold {:.1}",
                        st.reputation.score, cfg.borrow_min_reputation
                    ))
                } else if price < mcfg.reserve_milli {
                    Some(format!(
                        "balance {} does not cover the reserve of {} credits/unit",
                        Credits(st.credits.balance_milli),
                        Credits(mcfg.reserve_milli)
                    ))
                } else {
                    None
                };
                match (why_not, from) {
                    (None, Some(from)) => renew.push((t.clone(), from, price)),
                    (why, _) => notes.push((
                        id.clone(),
                        format!(
                            "{} {} unit(s) bought from {} returned at the end of their lease: {}",
                            t.units,
                            market::kind_word(t.kind),
                            t.from,
                            why.unwrap_or_default()
                        ),
                    )),
                }
            }
        }
        for (t, from, price) in renew {
            let cost = price.saturating_mul(u64::from(t.units));
            if !self.pay(&t.to, &from, cost) {
                continue;
            }
            let kind = market::kind_word(t.kind);
            notes.push((
                t.to.clone(),
                format!(
                    "renewed {} {kind} unit(s) from {from} at {} credits/unit (their price when bought, or what the balance allows) at tick {now}",
                    t.units,
                    Credits(price)
                ),
            ));
            notes.push((
                from.clone(),
                format!(
                    "{} renewed {} {kind} unit(s) at {} credits/unit at tick {now}",
                    t.to,
                    t.units,
                    Credits(price)
                ),
            ));
            self.remove_loan(&t);
            self.add_loan(Transfer {
                from,
                since_ms: now,
                expires_at_ms: now.saturating_add(self.config.market.lease_ms),
                origin: TransferOrigin::Market { price_milli: price },
                ..t
            });
        }
        self.apply_notes(now, notes);
    }

    /// End of a tick with the market on (at most every `market.interval_ms`):
    /// each pool clears one auction per kind, buyers are re-planned with
    /// their new units.
    pub(super) fn run_market(&mut self, now: u64, out: &mut Vec<Action>) {
        if self
            .last_market_ms
            .is_some_and(|t| now.saturating_sub(t) < self.config.market.interval_ms)
        {
            return;
        }
        self.last_market_ms = Some(now);
        let pools: Vec<(String, Vec<DeviceId>)> = self
            .pools
            .iter()
            .map(|(t, m)| (t.clone(), m.iter().cloned().collect()))
            .collect();
        let mut buyers = BTreeSet::new();
        for (tenant, members) in &pools {
            for kind in KINDS {
                self.clear_pool(now, tenant, members, kind, &mut buyers);
            }
        }
        for id in buyers {
            self.reconcile(now, &id, out);
        }
    }

    /// Start of a tick with the market on, before expired loans go: opens
    /// accounts and turns unit-time lent (borrowing and shifting; market
    /// sales are paid by their buyer) into credits. A loan recalled between
    /// two ticks is paid up to the tick before its recall.
    pub(super) fn accrue_credits(&mut self, now: u64) {
        let Engine {
            config,
            devices,
            dirty,
            ..
        } = self;
        let mcfg = &config.market;
        for (id, st) in devices.iter_mut() {
            if st.tenant.is_none() {
                continue;
            }
            let mut changed = st.credits.open(mcfg, now);
            let since = st.credits.accrued_to_ms;
            let mut unit_ms = 0u64;
            for t in &st.lent {
                if matches!(t.origin, TransferOrigin::Market { .. }) {
                    continue;
                }
                let span = now
                    .min(t.expires_at_ms)
                    .saturating_sub(since.max(t.since_ms));
                unit_ms = unit_ms.saturating_add(u64::from(t.units).saturating_mul(span));
            }
            st.credits.accrued_to_ms = st.credits.accrued_to_ms.max(now);
            if unit_ms > 0 {
                st.credits.accrue(mcfg, unit_ms);
                changed = true;
            }
            if changed {
                dirty.mark(id);
            }
        }
    }

    /// One auction: gathers bids and asks of `kind` in the pool, clears
    /// them, and carries out the fills.
    fn clear_pool(
        &mut self,
        now: u64,
        tenant: &str,
        members: &[DeviceId],
        kind: ShardKind,
        buyers: &mut BTreeSet<DeviceId>,
    ) {
        let cfg = &self.config;
        let mcfg = &cfg.market;
        let k = kind_index(kind);
        let kw = market::kind_word(kind);
        let mut bids: Vec<Bid> = Vec::new();
        let mut asks: Vec<Ask> = Vec::new();
        let mut notes: Notes = Vec::new();
        for id in members {
            let Some(st) = self.devices.get(id) else {
                continue;
            };
            let Some(tier) = self.agreements.tiers.get(&st.tier) else {
                continue;
            };
            if let Some((cap, priority, missing)) = unmet(&self.catalog, tier, st, kind) {
                // A device short of units buys; it never sells.
                let held: u32 = st
                    .borrowed
                    .iter()
                    .filter(|t| t.kind == kind && matches!(t.origin, TransferOrigin::Market { .. }))
                    .map(|t| t.units)
                    .sum();
                let refused = if st.drained {
                    Some("the device is drained".to_owned())
                } else if !tier.borrowing {
                    Some(format!("tier {} does not share a pool", st.tier))
                } else if st.reputation.score < cfg.borrow_min_reputation {
                    Some(format!(
                        "reputation {:.1} below the borrowing threshold {:.1}",
                        st.reputation.score, cfg.borrow_min_reputation
                    ))
                } else if held.saturating_add(missing) > mcfg.max_units_per_device {
                    Some(format!(
                        "holds {held} market unit(s); {missing} more would pass the limit of {}",
                        mcfg.max_units_per_device
                    ))
                } else {
                    None
                };
                if let Some(why) = refused {
                    notes.push((
                        id.clone(),
                        format!("cannot buy {missing} {kw} unit(s) for {cap}: {why}"),
                    ));
                    continue;
                }
                match market::bid_limit(mcfg, priority, st.credits.balance_milli, missing) {
                    Some(limit_milli) => bids.push(Bid {
                        device: id.clone(),
                        units: missing,
                        limit_milli,
                        priority,
                    }),
                    None => notes.push((
                        id.clone(),
                        format!(
                            "cannot bid for {missing} {kw} unit(s) for {cap}: balance {} does not cover the reserve of {} credits/unit",
                            Credits(st.credits.balance_milli),
                            Credits(mcfg.reserve_milli)
                        ),
                    )),
                }
                continue;
            }
            asks.extend(self.ask_of(id, kind));
        }
        if bids.is_empty() {
            self.apply_notes(now, notes);
            return;
        }
        let clearing = market::clear(&bids, &asks, mcfg.max_units_per_tick);
        for (device, why) in &clearing.unfilled {
            let units = bids
                .iter()
                .find(|b| &b.device == device)
                .map_or(0, |b| b.units);
            notes.push((device.clone(), why.explain(units, kind, tenant)));
        }
        if let Some(price) = clearing.price_milli {
            self.market_prices.insert((tenant.to_owned(), k), price);
            let sold: u32 = clearing.fills.iter().map(|f| f.units).sum();
            tracing::debug!(
                tenant,
                kind = kw,
                price_milli = price,
                units = sold,
                bids = bids.len(),
                asks = asks.len(),
                "market cleared"
            );
            for f in &clearing.fills {
                let cost = price.saturating_mul(u64::from(f.units));
                // The bid rule keeps every bid within its balance; a refused
                // payment would be a bug, and then nothing moves.
                if !self.pay(&f.buyer, &f.seller, cost) {
                    tracing::warn!(buyer = %f.buyer, seller = %f.seller, cost, "market payment refused");
                    continue;
                }
                self.add_loan(Transfer {
                    from: f.seller.clone(),
                    to: f.buyer.clone(),
                    kind,
                    units: f.units,
                    since_ms: now,
                    expires_at_ms: now.saturating_add(self.config.market.lease_ms),
                    origin: TransferOrigin::Market { price_milli: price },
                });
                notes.push((
                    f.buyer.clone(),
                    format!(
                        "bought {} {kw} unit(s) from {} at {} credits/unit: clearing price of tenant {tenant}'s pool at tick {now}",
                        f.units,
                        f.seller,
                        Credits(price)
                    ),
                ));
                notes.push((
                    f.seller.clone(),
                    format!(
                        "sold {} {kw} unit(s) to {} at {} credits/unit: clearing price of tenant {tenant}'s pool at tick {now}",
                        f.units,
                        f.buyer,
                        Credits(price)
                    ),
                ));
                buyers.insert(f.buyer.clone());
            }
        }
        self.apply_notes(now, notes);
    }

    /// A lender takes back units it lent (its own need rose or its quota
    /// shrank). Units it sold in the market move to another seller of the
    /// pool with enough spare units, at the same price and until the same
    /// expiry, and the old seller passes on the unexpired part of the
    /// payment: the buyer keeps its shards (returned and bought back at the
    /// next run, they would flap). With no other seller the old one refunds
    /// that part to the buyer.
    pub(super) fn recall_loan(&mut self, now: u64, t: &Transfer) {
        self.remove_loan(t);
        let TransferOrigin::Market { price_milli } = t.origin else {
            return;
        };
        let left = u128::from(t.expires_at_ms.saturating_sub(now));
        let span = u128::from(t.expires_at_ms.saturating_sub(t.since_ms).max(1));
        let paid = u128::from(price_milli.saturating_mul(u64::from(t.units)));
        let owed = u64::try_from(paid * left.min(span) / span).unwrap_or(u64::MAX);
        let owed = owed.min(
            self.devices
                .get(&t.from)
                .map_or(0, |s| s.credits.balance_milli),
        );
        let kw = market::kind_word(t.kind);
        let mut notes: Notes = Vec::new();
        match self.other_seller(&t.to, &t.from, t.kind, t.units) {
            Some(seller) => {
                if owed > 0 {
                    self.pay(&t.from, &seller, owed);
                }
                self.add_loan(Transfer {
                    from: seller.clone(),
                    ..t.clone()
                });
                notes.push((
                    t.to.clone(),
                    format!(
                        "{} {kw} unit(s) bought from {} now come from {}: {} took them back for its own need (same price, same expiry)",
                        t.units, t.from, seller, t.from
                    ),
                ));
                notes.push((
                    t.from.clone(),
                    format!(
                        "took back {} {kw} unit(s) sold to {}; passed {} credits of the sale to {seller}, who took over",
                        t.units,
                        t.to,
                        Credits(owed)
                    ),
                ));
                notes.push((
                    seller.clone(),
                    format!(
                        "took over {} {kw} unit(s) {} sold to {}: {} credits for the rest of the lease",
                        t.units,
                        t.from,
                        t.to,
                        Credits(owed)
                    ),
                ));
            }
            None => {
                if owed > 0 {
                    self.pay(&t.from, &t.to, owed);
                }
                notes.push((
                    t.to.clone(),
                    format!(
                        "{} {kw} unit(s) bought from {} returned early: it needs them and no other seller has them; {} credits refunded",
                        t.units,
                        t.from,
                        Credits(owed)
                    ),
                ));
                notes.push((
                    t.from.clone(),
                    format!(
                        "took back {} {kw} unit(s) sold to {}; refunded {} credits",
                        t.units,
                        t.to,
                        Credits(owed)
                    ),
                ));
            }
        }
        self.apply_notes(now, notes);
    }

    /// A seller of the buyer's pool that can take over `units` of `kind`
    /// (the same rule as asks: borrows nothing, full quota, enough spare;
    /// the most spare first, then device id).
    fn other_seller(
        &self,
        buyer: &DeviceId,
        not: &DeviceId,
        kind: ShardKind,
        units: u32,
    ) -> Option<DeviceId> {
        let cfg = &self.config;
        let tenant = self.devices.get(buyer)?.tenant.as_ref()?;
        let k = kind_index(kind);
        let mut best: Option<(u32, &DeviceId)> = None;
        for peer in self.pools.get(tenant)? {
            if peer == buyer || peer == not {
                continue;
            }
            let Some(st) = self.devices.get(peer) else {
                continue;
            };
            let Some(tier) = self.agreements.tiers.get(&st.tier) else {
                continue;
            };
            if !st.borrowed.is_empty()
                || quota_factor(&cfg.reputation, st.reputation.score) < 1.0
                || !st.refusals.is_empty()
            {
                continue;
            }
            let s = spare(cfg, tier, st)[k];
            if s >= units && best.is_none_or(|b| s > b.0) {
                best = Some((s, peer));
            }
        }
        best.map(|b| b.1.clone())
    }

    /// A seller's offer of `kind`: same rule as lenders (a device that
    /// borrows has nothing to spare, a suspect one's quota, and so its
    /// units, may shrink at any report), and a device short of units of
    /// that kind buys, it does not sell.
    fn ask_of(&self, id: &DeviceId, kind: ShardKind) -> Option<Ask> {
        let cfg = &self.config;
        let st = self.devices.get(id)?;
        let tier = self.agreements.tiers.get(&st.tier)?;
        if !st.borrowed.is_empty()
            || quota_factor(&cfg.reputation, st.reputation.score) < 1.0
            || unmet(&self.catalog, tier, st, kind).is_some()
        {
            return None;
        }
        let units = spare(cfg, tier, st)[kind_index(kind)];
        (units > 0).then(|| Ask {
            device: id.clone(),
            units,
            reserve_milli: cfg.market.reserve_milli,
        })
    }

    /// Between two runs: a device about to lose a running capability for
    /// want of `missing` units buys them at once at its pool's last
    /// clearing price (the reserve before the first), if it could bid that
    /// much. Without it the shards would stop now and start again when the
    /// next run fills the bid: a flap. New demand waits for the auction.
    pub(super) fn buy_to_keep(
        &mut self,
        now: u64,
        device: &DeviceId,
        cap: &str,
        kind: ShardKind,
        missing: u32,
    ) -> bool {
        let cfg = &self.config;
        let mcfg = &cfg.market;
        let Some(st) = self.devices.get(device) else {
            return false;
        };
        let (Some(tier), Some(tenant)) = (self.agreements.tiers.get(&st.tier), st.tenant.clone())
        else {
            return false;
        };
        if !st.leases.values().any(|l| l.capability == cap)
            || st.drained
            || !tier.borrowing
            || st.reputation.score < cfg.borrow_min_reputation
        {
            return false;
        }
        let k = kind_index(kind);
        let held: u32 = st
            .borrowed
            .iter()
            .filter(|t| t.kind == kind && matches!(t.origin, TransferOrigin::Market { .. }))
            .map(|t| t.units)
            .sum();
        if held.saturating_add(missing) > mcfg.max_units_per_device {
            return false;
        }
        let priority = self
            .catalog
            .capabilities
            .get(cap)
            .map_or(0, |c| c.priority)
            .min(tier.max_priority);
        let price = self
            .market_prices
            .get(&(tenant.clone(), k))
            .copied()
            .unwrap_or(mcfg.reserve_milli)
            .max(mcfg.reserve_milli);
        let Some(limit) = market::bid_limit(mcfg, priority, st.credits.balance_milli, missing)
        else {
            return false;
        };
        if limit < price {
            return false;
        }
        let asks: Vec<Ask> = self
            .pools
            .get(&tenant)
            .into_iter()
            .flatten()
            .filter(|p| *p != device)
            .filter_map(|p| self.ask_of(p, kind))
            .collect();
        let bid = Bid {
            device: device.clone(),
            units: missing,
            limit_milli: price,
            priority,
        };
        let clearing = market::clear(&[bid], &asks, u32::MAX);
        if clearing.fills.is_empty() {
            return false;
        }
        let kw = market::kind_word(kind);
        let mut notes: Notes = Vec::new();
        for f in &clearing.fills {
            if !self.pay(device, &f.seller, price.saturating_mul(u64::from(f.units))) {
                continue;
            }
            self.add_loan(Transfer {
                from: f.seller.clone(),
                to: device.clone(),
                kind,
                units: f.units,
                since_ms: now,
                expires_at_ms: now.saturating_add(self.config.market.lease_ms),
                origin: TransferOrigin::Market { price_milli: price },
            });
            notes.push((
                device.clone(),
                format!(
                    "bought {} {kw} unit(s) from {} at {} credits/unit to keep {cap} running: last clearing price of tenant {tenant}'s pool, at tick {now}",
                    f.units,
                    f.seller,
                    Credits(price)
                ),
            ));
            notes.push((
                f.seller.clone(),
                format!(
                    "sold {} {kw} unit(s) to {device} at {} credits/unit (to keep its {cap} running): last clearing price of tenant {tenant}'s pool, at tick {now}",
                    f.units,
                    Credits(price)
                ),
            ));
        }
        self.apply_notes(now, notes);
        true
    }

    /// Moves `amount` from the buyer's account to the seller's.
    fn pay(&mut self, buyer: &DeviceId, seller: &DeviceId, amount: u64) -> bool {
        if buyer == seller {
            return false;
        }
        let Some(mut from) = self
            .devices
            .get_mut(buyer)
            .map(|s| std::mem::take(&mut s.credits))
        else {
            return false;
        };
        let ok = match self.devices.get_mut(seller) {
            Some(s) => from.pay(&mut s.credits, amount).is_ok(),
            None => false,
        };
        if let Some(s) = self.devices.get_mut(buyer) {
            s.credits = from;
        }
        if ok {
            self.dirty.mark(buyer);
            self.dirty.mark(seller);
            self.durable_now.mark(buyer);
            self.durable_now.mark(seller);
        }
        ok
    }

    fn apply_notes(&mut self, now: u64, notes: Notes) {
        for (id, text) in notes {
            let Some(st) = self.devices.get_mut(&id) else {
                continue;
            };
            tracing::debug!(device = %id, %text, "market");
            if st.credits.note(&self.config.market, now, text) {
                self.dirty.mark(&id);
            }
        }
    }

    /// Every account of a tenant's pool (all tenants when `None`), by device id.
    pub fn credits(&self, tenant: Option<&str>) -> Vec<market::CreditRow> {
        self.devices
            .iter()
            .filter(|(_, st)| st.tenant.is_some())
            .filter(|(_, st)| tenant.is_none_or(|t| st.tenant.as_deref() == Some(t)))
            .map(|(id, st)| {
                let units = |ts: &[Transfer]| {
                    let mut u = [0u32; 2];
                    for t in ts {
                        if matches!(t.origin, TransferOrigin::Market { .. }) {
                            u[kind_index(t.kind)] = u[kind_index(t.kind)].saturating_add(t.units);
                        }
                    }
                    u
                };
                market::CreditRow {
                    device: id.clone(),
                    tenant: st.tenant.clone(),
                    balance_milli: st.credits.balance_milli,
                    balance: Credits(st.credits.balance_milli).to_string(),
                    earned_milli: st.credits.earned_milli,
                    sold_milli: st.credits.sold_milli,
                    bought_milli: st.credits.bought_milli,
                    market_units: units(&st.borrowed),
                    sold_units: units(&st.lent),
                    last: st.credits.history.last().cloned(),
                }
            })
            .collect()
    }
}

/// The device's most important capability short of units of `kind`
/// (highest priority, capped by its tier; ties by name): (capability,
/// priority, missing units).
fn unmet<'s>(
    catalog: &Catalog,
    tier: &Tier,
    st: &'s DeviceState,
    kind: ShardKind,
) -> Option<(&'s str, u8, u32)> {
    let mut best: Option<(&str, u8, u32)> = None;
    for (cap, r) in &st.refusals {
        let Some((k, missing)) = r.shortfall() else {
            continue;
        };
        if k != kind || missing == 0 {
            continue;
        }
        let priority = catalog
            .capabilities
            .get(cap)
            .map_or(0, |c| c.priority)
            .min(tier.max_priority);
        if best.is_none_or(|b| priority > b.1) {
            best = Some((cap.as_str(), priority, missing));
        }
    }
    best
}
