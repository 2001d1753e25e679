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
        let was_loan = self
            .devices
            .get(&t.to)
            .is_some_and(|b| b.borrowed.iter().any(|x| same_loan(x, t)));
        if let Some(b) = self.devices.get_mut(&t.to) {
            b.borrowed.retain(|x| !same_loan(x, t));
            self.dirty.mark(&t.to);
            self.durable_now.mark(&t.to);
        }
        if let Some(l) = self.devices.get_mut(&t.from) {
            l.lent.retain(|x| !same_loan(x, t));
            self.dirty.mark(&t.from);
            self.durable_now.mark(&t.from);
        }
        if was_loan && t.origin == TransferOrigin::Borrow {
            self.loan_ended(t);
        }
    }

    /// Borrows `missing` units of `kind` from peers of the device's tenant.
    /// Every outcome is counted in the borrower's lending record with a
    /// sentence for the operator (see [`lending`]).
    pub(super) fn try_borrow(
        &mut self,
        now: u64,
        device: &DeviceId,
        kind: ShardKind,
        missing: u32,
    ) -> Result<(), BorrowRefusal> {
        let planned = self.plan_borrow(now, device, kind, missing);
        let Engine {
            config: cfg,
            devices,
            dirty,
            ..
        } = self;
        let lcfg = &cfg.lending;
        let Some(st) = devices.get_mut(device) else {
            return Err(BorrowRefusal::NoLender);
        };
        // Refusals before a request is the device's (borrowing off, no
        // pool) are the operator's setup: not counted as its requests.
        let counted = !matches!(
            planned,
            Err((
                BorrowRefusal::Disabled | BorrowRefusal::TierForbids | BorrowRefusal::NoTenant,
                _
            ))
        );
        // Frequency is judged once the device could borrow at all.
        let planned = match planned {
            Ok(loans) => match lending::frequency(lcfg, &mut st.lending, now) {
                lending::Frequency::Allowed => Ok(loans),
                lending::Frequency::TooFrequent { charge, text } => {
                    if charge < 0.0 {
                        st.reputation
                            .apply(&cfg.reputation, now, charge, "borrow_churn");
                    }
                    Err((BorrowRefusal::TooFrequent, text))
                }
            },
            Err(e) => Err(e),
        };
        dirty.mark(device);
        let loans = match planned {
            Ok(loans) => loans,
            Err((reason, text)) => {
                if counted {
                    lending::record_request(&mut st.lending, now, false);
                }
                tracing::debug!(%device, ?reason, missing, "borrow refused");
                st.lending.note(lcfg, now, text);
                return Err(reason);
            }
        };
        lending::record_request(&mut st.lending, now, true);
        let from: Vec<String> = loans
            .iter()
            .map(|t| format!("{} from {}", t.units, t.from))
            .collect();
        st.lending.note(
            lcfg,
            now,
            format!(
                "borrowed {missing} {} unit(s) ({}) until {} ms",
                kind.as_str(),
                from.join(", "),
                now.saturating_add(cfg.borrow_ms)
            ),
        );
        tracing::info!(%device, kind = kind.as_str(), missing, lenders = loans.len(), "borrowed");
        for t in &loans {
            if let Some(l) = devices.get_mut(&t.from) {
                let qos = l.last_report.as_ref().map(|r| r.qos_score);
                lending::lend_started(&mut l.lending, qos);
                l.lending.note(
                    lcfg,
                    now,
                    format!("lent {} {} unit(s) to {}", t.units, kind.as_str(), device),
                );
            }
        }
        for t in loans {
            self.add_loan(t);
        }
        Ok(())
    }

    /// Which peers lend what (spare units within their consent, offering
    /// ones first, then the most spare), or why there is no loan, in words.
    fn plan_borrow(
        &self,
        now: u64,
        device: &DeviceId,
        kind: ShardKind,
        missing: u32,
    ) -> Result<Vec<Transfer>, (BorrowRefusal, String)> {
        let cfg = &self.config;
        let st = &self.devices[device];
        let refuse = |r: BorrowRefusal, text: String| Err((r, format!("borrow refused: {text}")));
        if !cfg.features.borrowing {
            return refuse(BorrowRefusal::Disabled, "borrowing is off".into());
        }
        let Some(tier) = self.agreements.tiers.get(&st.tier) else {
            return refuse(BorrowRefusal::TierForbids, "unknown tier".into());
        };
        if !tier.borrowing {
            return refuse(
                BorrowRefusal::TierForbids,
                format!("tier {} forbids borrowing", st.tier),
            );
        }
        let Some(tenant) = st.tenant.as_ref() else {
            return refuse(BorrowRefusal::NoTenant, "no tenant pool".into());
        };
        if st.reputation.score < cfg.borrow_min_reputation {
            return refuse(
                BorrowRefusal::LowReputation,
                format!(
                    "reputation {:.1} < {}",
                    st.reputation.score, cfg.borrow_min_reputation
                ),
            );
        }
        let already: u32 = st
            .borrowed
            .iter()
            .filter(|t| t.origin == TransferOrigin::Borrow)
            .map(|t| t.units)
            .sum();
        if already.saturating_add(missing) > cfg.max_borrow_units {
            return refuse(
                BorrowRefusal::AtLimit,
                format!(
                    "{already} unit(s) borrowed + {missing} > {}",
                    cfg.max_borrow_units
                ),
            );
        }
        let k = kind_index(kind);
        // (offers, spare within consent, peer)
        let mut lenders: Vec<(bool, u32, &DeviceId)> = Vec::new();
        let mut without_consent = 0u32;
        let mut consent_cut: Vec<String> = Vec::new();
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
                let spare = spare(cfg, ptier, pst);
                without_consent = without_consent.saturating_add(spare[k]);
                let (s, why) = lending::consented_spare(
                    pst.lending.consent.as_ref(),
                    spare,
                    sum_units(&pst.lent),
                    now,
                );
                if let Some(why) = why {
                    consent_cut.push(format!("{peer} {why}"));
                }
                if s[k] > 0 {
                    lenders.push((pst.lending.offer[k] > 0, s[k], peer));
                }
            }
        }
        lenders.sort_by(|a, b| b.0.cmp(&a.0).then(b.1.cmp(&a.1)).then(a.2.cmp(b.2)));
        let total: u32 = lenders.iter().map(|l| l.1).sum();
        if total < missing {
            if without_consent >= missing {
                return refuse(
                    BorrowRefusal::NoConsent,
                    format!(
                        "{missing} {} unit(s) short; peers have them spare but {}",
                        kind.as_str(),
                        consent_cut.join("; ")
                    ),
                );
            }
            return refuse(
                BorrowRefusal::NoLender,
                format!(
                    "{missing} {} unit(s) short; the pool has {total} spare",
                    kind.as_str()
                ),
            );
        }
        let mut left = missing;
        let mut loans = Vec::new();
        for (_, s, peer) in lenders {
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
        Ok(loans)
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
            self.durable_now.mark(&t.from);
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
            self.durable_now.mark(&t.to);
            b.borrowed.push(t);
        }
    }
}
