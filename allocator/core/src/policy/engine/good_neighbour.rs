//! Seed 002 in the engine: a device's report feeds its lending record
//! (consent, QoS while lending, harm observations, pending returns,
//! offers) and a loan's end schedules the borrower's return check. The
//! rules themselves are the pure functions of [`super::lending`].

use super::*;
use shardline_shared::msg::{LendingReport, MAX_HARM_OBSERVATIONS};

impl Engine {
    /// A borrow loan ended (expiry, recall, unenrolment): the borrower must
    /// stop what the units paid for within `return_grace_ms`, the loan's
    /// impact on the lender goes on the borrower's record, and a lender
    /// that lends nothing any more forgets its QoS baseline.
    pub(super) fn loan_ended(&mut self, t: &Transfer) {
        let Engine {
            config: cfg,
            devices,
            dirty,
            ..
        } = self;
        let lcfg = &cfg.lending;
        // The engine's time as far as these two devices have seen it (the
        // event that ended the loan brought one of them up to `now`).
        let now = [&t.to, &t.from]
            .iter()
            .filter_map(|d| devices.get(*d).map(|s| s.reputation.updated_ms))
            .fold(t.since_ms, u64::max);
        let (drop, lender_done) = match devices.get_mut(&t.from) {
            Some(l) => {
                let drop = lending::lender_qos_drop(&l.lending);
                let done = !l.lent.iter().any(|x| x.origin == TransferOrigin::Borrow);
                if done {
                    lending::lend_stopped(&mut l.lending);
                }
                l.lending.note(
                    lcfg,
                    now,
                    format!("loan of {} unit(s) to {} ended", t.units, t.to),
                );
                dirty.mark(&t.from);
                (drop, done)
            }
            None => (0.0, true),
        };
        let Some(b) = devices.get_mut(&t.to) else {
            return;
        };
        dirty.mark(&t.to);
        let due = now.saturating_add(lcfg.return_grace_ms);
        match &mut b.lending.pending_return {
            Some(p) => p.units = p.units.saturating_add(t.units),
            None => {
                b.lending.pending_return = Some(lending::PendingReturn {
                    due_ms: due,
                    lender: t.from.clone(),
                    units: t.units,
                })
            }
        }
        let mut text = format!(
            "loan of {} {} unit(s) from {} ended: its shards must stop by {} ms",
            t.units,
            t.kind.as_str(),
            t.from,
            due
        );
        if drop >= lcfg.min_qos_drop && lender_done {
            b.lending.loans_harmful = b.lending.loans_harmful.saturating_add(1);
            text.push_str(&format!(
                "; the lender's QoS score fell by {drop:.0} while it lent (recorded as harmful)"
            ));
        }
        b.lending.note(lcfg, now, text);
    }

    /// The lending part of a device's accepted report (after its QoS
    /// summary is stored). Borrowers whose reputation moved are re-planned.
    pub(super) fn on_lending_report(
        &mut self,
        now: u64,
        device: &DeviceId,
        report: LendingReport,
        window_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let Engine {
            catalog,
            agreements,
            config: cfg,
            devices,
            dirty,
            ..
        } = self;
        let lcfg = &cfg.lending;
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        dirty.mark(device);
        if st.lending.consent != report.consent {
            let text = match &report.consent {
                Some(c) => format!(
                    "consent: lends at most {} compute and {} data unit(s), {:02}:00-{:02}:00 UTC",
                    c.max_compute_units,
                    c.max_data_units,
                    c.from_hour_utc % 24,
                    c.to_hour_utc % 24
                ),
                None => "consent: lends any spare unit".to_owned(),
            };
            st.lending.consent = report.consent;
            st.lending.note(lcfg, now, text);
        }
        let qos_now = st.last_report.as_ref().map(|r| r.qos_score);
        if let Some(q) = qos_now {
            lending::observe_lender_qos(&mut st.lending, q);
        }
        // ---- returns: judged on the borrower's first report once due.
        if let Some(p) = st.lending.pending_return.clone() {
            let tier = agreements.tiers.get(&st.tier);
            let budget = tier.map_or([0, 0], |t| effective_budget(cfg, t, st));
            let mut running = [0u32; 2];
            for s in st.last_report.iter().flat_map(|r| r.running_shards.iter()) {
                if let Some(spec) = catalog.shards.get(s.id()) {
                    let k = kind_index(spec.kind);
                    running[k] = running[k].saturating_add(spec.units);
                }
            }
            match lending::judge_return(lcfg, &p, running, budget, now) {
                lending::Return::Pending => {}
                lending::Return::Timely { delta, text } => {
                    st.lending.pending_return = None;
                    st.lending.returns_timely = st.lending.returns_timely.saturating_add(1);
                    st.reputation
                        .apply(&cfg.reputation, now, delta, "timely_return");
                    st.lending.note(lcfg, now, text);
                }
                lending::Return::Late { delta, text } => {
                    st.lending.pending_return = None;
                    st.lending.returns_late = st.lending.returns_late.saturating_add(1);
                    st.reputation
                        .apply(&cfg.reputation, now, delta, "late_return");
                    tracing::info!(%device, reason = %text, "late return of a loan");
                    st.lending.note(lcfg, now, text);
                }
            }
        }
        // ---- proactive offers of what the device under-uses.
        if let Some(tier) = agreements.tiers.get(&st.tier) {
            let (spare, _) = lending::consented_spare(
                st.lending.consent.as_ref(),
                spare(cfg, tier, st),
                sum_units(&st.lent),
                now,
            );
            // A suspect device lends nothing (see `plan_borrow`).
            let spare = if quota_factor(&cfg.reputation, st.reputation.score) < 1.0 {
                [0, 0]
            } else {
                spare
            };
            if lending::update_offer(lcfg, &mut st.lending, spare, now) {
                let offer = st.lending.offer;
                st.lending.note(
                    lcfg,
                    now,
                    format!(
                        "offers {} compute and {} data unit(s) it has not used for {} ms to its pool",
                        offer[0], offer[1], lcfg.underuse_ms
                    ),
                );
                // Peers short of budget need no nudge: a device with a
                // refusal is re-planned within `renew_margin_ms` anyway
                // (`next_wake`), and borrowing picks offering lenders
                // first. Waking them here cost a scan of the whole pool on
                // every change of an offer (a quarter of the engine's time
                // per report with 1,000-device pools).
            }
        }
        // ---- good-neighbour report.
        if report.harm.is_empty() {
            return;
        }
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        if report.harm.len() > MAX_HARM_OBSERVATIONS {
            lending::ignore(lcfg, &mut st.lending, lending::Ignored::TooMany, now);
        }
        // Borrowers whose loans covered the whole report window.
        let window_start = now.saturating_sub(window_ms);
        let mut borrowers: BTreeMap<DeviceId, u32> = BTreeMap::new();
        for t in st
            .lent
            .iter()
            .filter(|t| t.origin == TransferOrigin::Borrow && t.since_ms <= window_start)
        {
            *borrowers.entry(t.to.clone()).or_default() += t.units;
        }
        let reporter = lending::Reporter {
            device,
            score: st.reputation.score,
            qos_now,
            qos_at_lend_start: st.lending.qos_at_lend_start,
            borrowers: borrowers.into_iter().collect(),
        };
        let severity = lending::severity(&report.harm);
        let charges = match lending::screen(lcfg, &reporter, &report.harm) {
            Ok(c) => c,
            Err(why) => {
                tracing::debug!(%device, reason = why.as_str(), "harm report ignored");
                lending::ignore(lcfg, &mut st.lending, why, now);
                return;
            }
        };
        let weight = lending::reporter_weight(lcfg, reporter.score);
        let drop = reporter.qos_at_lend_start.unwrap_or(0.0) - qos_now.unwrap_or(0.0);
        let mut charged_any = false;
        let mut moved: Vec<DeviceId> = Vec::new();
        for (b, points) in charges {
            let Some(bst) = devices.get_mut(&b) else {
                continue;
            };
            let applied = lending::charge(lcfg, &mut bst.lending, device, points, now);
            if applied <= 0.0 {
                continue;
            }
            charged_any = true;
            bst.reputation
                .apply(&cfg.reputation, now, -applied, "neighbour_harm");
            let text = format!(
                "reputation -{applied:.2}: lender {device} reported its QoS worse than its \
                 baseline while lending to it (severity {severity:.2}, reporter weight \
                 {weight:.2}, its QoS score {drop:.0} below the loan's start; {:.2} of its \
                 {:.2} cap and {:.2} of the {:.2} window cap used)",
                bst.lending
                    .harm_by_reporter
                    .get(device)
                    .copied()
                    .unwrap_or(0.0),
                lcfg.per_reporter_cap,
                bst.lending.harm_received,
                lcfg.per_borrower_cap
            );
            tracing::info!(borrower = %b, reporter = %device, points = applied, "neighbour harm charged");
            bst.lending.note(lcfg, now, text);
            dirty.mark(&b);
            moved.push(b);
        }
        let Some(st) = devices.get_mut(device) else {
            return;
        };
        if charged_any {
            st.lending.harm_accepted = st.lending.harm_accepted.saturating_add(1);
            st.lending.note(
                lcfg,
                now,
                format!(
                    "harm report accepted (severity {severity:.2}): charged to {}",
                    moved
                        .iter()
                        .map(DeviceId::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
        } else {
            lending::ignore(lcfg, &mut st.lending, lending::Ignored::Capped, now);
        }
        for b in moved {
            self.reconcile(now, &b, out);
        }
    }
}
