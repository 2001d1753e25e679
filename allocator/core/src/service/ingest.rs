use super::*;

impl Core {
    /// One MQTT message from the broker.
    pub fn on_message(&mut self, now_ms: u64, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = topics::parse(topic) else {
            self.metrics.dropped(Kind::Report, Drop::UnknownTopic);
            return;
        };
        match kind {
            TopicKind::Report => self.on_report(now_ms, device, payload),
            TopicKind::Ack => self.on_ack(now_ms, device, payload),
            TopicKind::Status => self.on_status(now_ms, device, payload),
            // Our own instructions echoed back (not subscribed; harmless).
            TopicKind::Instr => {}
            TopicKind::Enroll => self.on_enroll_message(now_ms, topic, payload),
            TopicKind::Request => self.on_app_request(now_ms, device, payload),
            // Our own answers echoed back (not subscribed; harmless).
            TopicKind::Answer => {}
            TopicKind::Diagnostics => self.on_diagnostics(now_ms, device, payload),
        }
    }

    /// Opens a device-signed envelope with the device's enrolled key.
    pub(super) fn verify<T: serde::de::DeserializeOwned>(
        &mut self,
        kind: Kind,
        domain: Domain,
        device: &DeviceId,
        payload: &[u8],
    ) -> Option<T> {
        let public = self.records.get(device).map(|r| r.public_key);
        match verify_signed(
            &self.metrics,
            self.cfg.max_payload,
            kind,
            domain,
            device,
            public,
            payload,
        ) {
            Verified::Ok(obj) => Some(obj),
            // Anyone who can publish can send bytes that do not verify:
            // counted (by `verify_signed`) against an unknown source, never
            // charged to the device whose topic they used.
            Verified::BadSignature => None,
            Verified::Dropped => None,
        }
    }

    /// A message a verifier thread already checked (see [`verify_signed`]).
    pub fn on_verified(&mut self, now_ms: u64, msg: VerifiedMsg) {
        match msg {
            VerifiedMsg::Report(device, report) => self.apply_report(now_ms, device, *report),
            VerifiedMsg::Ack(device, ack) => self.apply_ack(now_ms, device, ack),
            // Counted by the verifier; not the device's doing (see `verify`).
            VerifiedMsg::BadSignature(_) => {}
        }
    }

    pub(super) fn compliance(&mut self, now_ms: u64, device: &DeviceId, kind: ComplianceKind) {
        Metrics::inc(&self.metrics.compliance_events);
        self.feed(
            now_ms,
            Event::ComplianceEvent {
                device: device.clone(),
                kind,
            },
        );
    }

    pub(super) fn on_report(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        Metrics::inc(&self.metrics.reports_received);
        let Some(report) = self.verify::<QosReport>(Kind::Report, Domain::Report, &device, payload)
        else {
            return;
        };
        self.apply_report(now_ms, device, report);
    }

    pub(super) fn apply_report(&mut self, now_ms: u64, device: DeviceId, report: QosReport) {
        if report.device != device {
            self.metrics.dropped(Kind::Report, Drop::WrongDevice);
            self.compliance(now_ms, &device, ComplianceKind::BadReportSignature);
            return;
        }
        let Some(rec) = self.records.get_mut(&device) else {
            return;
        };
        if report.seq <= rec.last_report_seq {
            // An MQTT redelivery (equal) or a replay (below): anyone who saw
            // the report on the broker can send it again, so it is counted
            // and dropped, never charged to the device. The engine still
            // looks at it: a stale report only the key holder could have
            // made is evidence of two agents sharing the identity.
            let why = if report.seq == rec.last_report_seq {
                Drop::Duplicate
            } else {
                Drop::Stale
            };
            self.metrics.dropped(Kind::Report, why);
            self.feed(now_ms, Event::StaleReport(report));
            return;
        }
        rec.last_report_seq = report.seq;
        rec.last_report_ms = Some(now_ms);
        self.mark_applied(now_ms, &device, report.applied_instruction_seq);
        // Per report: the id is cloned only where the device is not yet
        // in the set or map (the common case is an update in place).
        if !self.seq_dirty.contains(&device) {
            self.seq_dirty.insert(device.clone());
        }
        // A new report the device signed is proof it is online, whatever
        // an (unsigned) status says.
        let seen = (now_ms, u64::from(report.window_ms));
        match self.signed_seen.get_mut(&device) {
            Some(s) => *s = seen,
            None => {
                self.signed_seen.insert(device.clone(), seen);
            }
        }
        Metrics::inc(&self.metrics.reports_accepted);
        self.qos_history(now_ms, &report);
        self.step.live.push(super::live::LiveNote::Report {
            device: device.clone(),
            seq: report.seq,
            at_ms: now_ms,
        });
        self.feed(now_ms, Event::Report(report));
    }

    /// The device (signed) says it applied everything up to `seq`.
    pub(super) fn mark_applied(&mut self, now_ms: u64, device: &DeviceId, seq: u64) {
        let Some(rec) = self.records.get_mut(device) else {
            return;
        };
        if seq <= rec.applied_seq && rec.pending.iter().all(|p| p.seq > seq) {
            return;
        }
        rec.applied_seq = rec.applied_seq.max(seq);
        let applied: Vec<u64> = rec
            .pending
            .iter()
            .filter(|p| p.seq <= seq)
            .map(|p| p.seq)
            .collect();
        rec.pending.retain(|p| p.seq > seq);
        let done = applied.len() as u64;
        rec.instructions_applied += done;
        self.metrics
            .instructions_applied
            .fetch_add(done, Ordering::Relaxed);
        self.dirty.insert(device.clone());
        for s in applied {
            self.instruction_history(device, now_ms, s, InstructionStatus::Applied, None);
        }
    }

    pub(super) fn on_ack(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        let Some(ack) = self.verify::<InstructionAck>(Kind::Ack, Domain::Ack, &device, payload)
        else {
            return;
        };
        self.apply_ack(now_ms, device, ack);
    }

    pub(super) fn apply_ack(&mut self, now_ms: u64, device: DeviceId, ack: InstructionAck) {
        if ack.device != device {
            self.metrics.dropped(Kind::Ack, Drop::WrongDevice);
            return;
        }
        Metrics::inc(&self.metrics.acks_accepted);
        let refusal = matches!(
            ack.outcome,
            AckOutcome::Rejected(_) | AckOutcome::Failed { .. }
        );
        let sent_by_us = || {
            self.records.get(&device).is_some_and(|r| {
                r.pending.iter().any(|p| p.seq == ack.instruction_seq)
                    || ack.instruction_seq <= r.applied_seq
            })
        };
        if refusal && !sent_by_us() {
            // The device refused an instruction this service never sent (or
            // one already settled): a forgery someone published on its
            // instruction topic, or a redelivery. Its honest refusal is
            // counted, and neither moves its reputation nor re-plans it.
            self.metrics.dropped(Kind::Ack, Drop::NotOurs);
            tracing::debug!(%device, seq = ack.instruction_seq, outcome = ?ack.outcome, "refusal of an instruction this service did not send");
            return;
        }
        match &ack.outcome {
            AckOutcome::Applied | AckOutcome::Duplicate => {
                self.mark_applied(now_ms, &device, ack.instruction_seq)
            }
            AckOutcome::Rejected(RejectReason::UnknownKey)
                if self.meta.key_epoch > 0
                    && self
                        .records
                        .get(&device)
                        .is_some_and(|r| r.rotation_epoch_sent < self.meta.key_epoch) =>
            {
                // The device missed the key rotation: send it, then the
                // instruction again (it stays pending). Once per epoch: a
                // device that refuses the rotation itself (say it was
                // enrolled after it, pinning the new key) must not be sent
                // it again and again.
                self.send_rotation(&device);
                self.resend_pending(now_ms, &device, 0, true);
            }
            AckOutcome::Rejected(_) | AckOutcome::Failed { .. } => {
                if let Some(rec) = self.records.get_mut(&device) {
                    let before = rec.pending.len();
                    rec.pending.retain(|p| p.seq != ack.instruction_seq);
                    if rec.pending.len() != before {
                        rec.instructions_rejected += 1;
                        let (status, reason) = crate::history::ack_status(&ack.outcome);
                        self.step.batch.history.push(HistoryEntry {
                            device: device.clone(),
                            at_ms: now_ms,
                            event: HistoryEvent::Instruction {
                                seq: ack.instruction_seq,
                                ops: Vec::new(),
                                status,
                                reason,
                            },
                        });
                        let c = if matches!(ack.outcome, AckOutcome::Failed { .. }) {
                            &self.metrics.instructions_failed
                        } else {
                            &self.metrics.instructions_rejected
                        };
                        Metrics::inc(c);
                        self.dirty.insert(device.clone());
                    }
                }
                tracing::info!(%device, seq = ack.instruction_seq, outcome = ?ack.outcome, "instruction not applied");
            }
        }
        self.step.live.push(super::live::LiveNote::Ack {
            device: device.clone(),
            seq: ack.instruction_seq,
            outcome: match &ack.outcome {
                AckOutcome::Applied => "applied".into(),
                AckOutcome::Duplicate => "duplicate".into(),
                AckOutcome::Rejected(r) => format!("rejected: {r:?}"),
                AckOutcome::Failed { reason } => format!("failed: {reason}"),
            },
            at_ms: now_ms,
        });
        self.feed(
            now_ms,
            Event::Ack {
                device,
                seq: ack.instruction_seq,
                outcome: ack.outcome,
            },
        );
    }

    pub(super) fn on_status(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        Metrics::inc(&self.metrics.statuses);
        if payload.is_empty() {
            // A cleared retained message.
            return;
        }
        let status = match codec::decode_capped::<DeviceStatus>(payload, self.cfg.max_payload) {
            Ok(s) if s.device == device => s,
            Ok(_) => {
                self.metrics.dropped(Kind::Status, Drop::WrongDevice);
                return;
            }
            Err(codec::DecodeError::Oversize { .. }) => {
                self.metrics.dropped(Kind::Status, Drop::Oversize);
                return;
            }
            Err(_) => {
                self.metrics.dropped(Kind::Status, Drop::Garbage);
                return;
            }
        };
        if !self.records.contains_key(&device) {
            self.metrics.dropped(Kind::Status, Drop::UnknownDevice);
            return;
        }
        // A status is unsigned (the broker publishes the last will, and
        // anyone may publish one): it never sets presence nor suppresses a
        // re-send; "online" only makes the leader re-send sooner.
        // Every instance sees statuses; only the leader answers them, so a
        // reconnecting device gets its pending instructions once. Anyone
        // can publish "online", so the forced re-send it triggers is rate
        // limited per device (`resend_pending`).
        if status.presence == Presence::Online && self.leader {
            // Unsigned, so it only ever triggers sending, never forgets anything.
            let rotation_due = self
                .records
                .get(&device)
                .is_some_and(|r| r.rotation_epoch_sent < self.meta.key_epoch);
            if rotation_due {
                self.send_rotation(&device);
            }
            self.resend_pending(now_ms, &device, status.applied_instruction_seq, true);
        }
    }

    /// Re-sends everything pending (after the MQTT link (re)connected).
    pub fn on_connected(&mut self, now_ms: u64) {
        if !self.leader {
            return;
        }
        for device in self.devices_with_pending() {
            self.resend_pending(now_ms, &device, 0, true);
        }
    }

    // ------------------------------------------------------------ engine
}
