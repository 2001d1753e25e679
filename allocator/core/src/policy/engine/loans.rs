//! Borrowing within a tenant pool: lending unused units for a bounded time and returning them.

use super::*;

impl Engine {
    /// Ends every loan the device is part of; counterparts are re-planned.
    pub(super) fn end_all_loans(&mut self, device: &DeviceId, out: &mut Vec<Action>) {
        let Some(st) = self.devices.get(device) else {
            return;
        };
        let loans: Vec<Transfer> = st.borrowed.iter().chain(st.lent.iter()).cloned().collect();
        let now = self
            .devices
            .get(device)
            .map(|s| s.reputation.updated_ms)
            .unwrap_or(0);
        let mut others = BTreeSet::new();
        for t in &loans {
            if &t.from == device {
                // Units it sold move to another seller (see `recall_loan`).
                self.recall_loan(now, t);
            } else {
                self.remove_loan(t);
            }
            others.insert(if &t.from == device {
                t.to.clone()
            } else {
                t.from.clone()
            });
        }
        for o in others {
            self.reconcile(now, &o, out);
        }
    }

    pub(super) fn remove_loan(&mut self, t: &Transfer) {
        if let Some(b) = self.devices.get_mut(&t.to) {
            b.borrowed.retain(|x| !same_loan(x, t));
            self.dirty.mark(&t.to);
        }
        if let Some(l) = self.devices.get_mut(&t.from) {
            l.lent.retain(|x| !same_loan(x, t));
            self.dirty.mark(&t.from);
        }
    }

    /// Borrows `missing` units of `kind` from peers of the device's tenant.
    pub(super) fn try_borrow(
        &mut self,
        now: u64,
        device: &DeviceId,
        kind: ShardKind,
        missing: u32,
    ) -> Result<(), BorrowRefusal> {
        let cfg = &self.config;
        let st = &self.devices[device];
        if !cfg.features.borrowing {
            return Err(BorrowRefusal::Disabled);
        }
        let Some(tier) = self.agreements.tiers.get(&st.tier) else {
            return Err(BorrowRefusal::TierForbids);
        };
        if !tier.borrowing {
            return Err(BorrowRefusal::TierForbids);
        }
        let Some(tenant) = st.tenant.as_ref() else {
            return Err(BorrowRefusal::NoTenant);
        };
        if st.reputation.score < cfg.borrow_min_reputation {
            return Err(BorrowRefusal::LowReputation);
        }
        let already: u32 = st
            .borrowed
            .iter()
            .filter(|t| t.origin == TransferOrigin::Borrow)
            .map(|t| t.units)
            .sum();
        if already.saturating_add(missing) > cfg.max_borrow_units {
            return Err(BorrowRefusal::AtLimit);
        }
        let k = kind_index(kind);
        let mut lenders: Vec<(u32, &DeviceId)> = Vec::new();
        if let Some(pool) = self.pools.get(tenant) {
            for peer in pool {
                if peer == device {
                    continue;
                }
                let Some(pst) = self.devices.get(peer) else {
                    continue;
                };
                let Some(ptier) = self.agreements.tiers.get(&pst.tier) else {
                    continue;
                };
                // A device that borrows itself has nothing to lend, and a
                // suspect one's units are not a pool anyone can rely on: its
                // quota may be cut, recalling the loan, at any report.
                if !pst.borrowed.is_empty()
                    || quota_factor(&cfg.reputation, pst.reputation.score) < 1.0
                {
                    continue;
                }
                let s = spare(cfg, ptier, pst)[k];
                if s > 0 {
                    lenders.push((s, peer));
                }
            }
        }
        lenders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        let total: u32 = lenders.iter().map(|l| l.0).sum();
        if total < missing {
            return Err(BorrowRefusal::NoLender);
        }
        let mut left = missing;
        let mut loans = Vec::new();
        for (s, peer) in lenders {
            if left == 0 {
                break;
            }
            let units = s.min(left);
            left -= units;
            loans.push(Transfer {
                from: peer.clone(),
                to: device.clone(),
                kind,
                units,
                since_ms: now,
                expires_at_ms: now.saturating_add(cfg.borrow_ms),
                origin: TransferOrigin::Borrow,
            });
        }
        for t in loans {
            self.add_loan(t);
        }
        Ok(())
    }

    pub(super) fn add_loan(&mut self, t: Transfer) {
        // Shifts are explained where the rebalancer chooses them.
        let loan = matches!(t.origin, TransferOrigin::Borrow);
        let mins = t.expires_at_ms.saturating_sub(t.since_ms) / 60_000;
        if let Some(l) = self.devices.get_mut(&t.from) {
            if loan {
                l.feedback.decide(
                    t.since_ms,
                    feedback::DecisionKind::Loan,
                    &format!("to {}", t.to),
                    format!(
                        "lent {} {:?} unit(s) to {} for {mins} min: unused here (its quota minus its own need and grants)",
                        t.units, t.kind, t.to
                    ),
                );
            }
            l.lent.push(t.clone());
            self.dirty.mark(&t.from);
        }
        if let Some(b) = self.devices.get_mut(&t.to) {
            if loan {
                b.feedback.decide(
                    t.since_ms,
                    feedback::DecisionKind::Loan,
                    &format!("from {}", t.from),
                    format!(
                        "borrowed {} {:?} unit(s) from {} (same tenant) for {mins} min: over its own budget, reputation at least the borrowing threshold",
                        t.units, t.kind, t.from
                    ),
                );
            }
            self.dirty.mark(&t.to);
            b.borrowed.push(t);
        }
    }
}
