use super::*;

pub(super) fn token_hash(token: &str) -> String {
    hex::encode(sha2::Sha256::digest(token.as_bytes()))
}

impl Core {
    /// A bootstrap-token enrolment request (`shared::sign::open_enroll`):
    /// it must be signed by the key it enrols, name the device of its topic
    /// and carry a live token.
    pub fn on_enroll_message(&mut self, now_ms: u64, topic: &str, payload: &[u8]) {
        let Some(device) = topics::enroll_device(topic) else {
            self.metrics.dropped(Kind::Enroll, Drop::UnknownTopic);
            return;
        };
        if payload.len() > MAX_ENROLL_BYTES.min(self.cfg.max_payload) {
            self.metrics.dropped(Kind::Enroll, Drop::Oversize);
            return;
        }
        let req = match sign::open_enroll(payload) {
            Ok(req) => req,
            Err(e @ (sign::OpenError::Envelope(_) | sign::OpenError::Payload(_))) => {
                tracing::debug!(%device, error = %e, "undecodable enrolment request");
                self.metrics.dropped(Kind::Enroll, Drop::Garbage);
                return;
            }
            Err(e) => {
                // Not signed by the key it names: no proof of possession.
                tracing::warn!(%device, error = %e, "enrolment request without a valid signature refused");
                self.metrics.dropped(Kind::Enroll, Drop::BadSignature);
                return;
            }
        };
        if req.device != device {
            self.metrics.dropped(Kind::Enroll, Drop::WrongDevice);
            return;
        }
        if let Some(rec) = self.records.get(&device) {
            if rec.public_key != req.public_key {
                tracing::warn!(%device, "enrolment request for an enrolled device with another key refused");
                self.metrics.dropped(Kind::Enroll, Drop::BadSignature);
            }
            // Same key: a device repeating its request after a restart.
            return;
        }
        let hash = token_hash(&req.token);
        let Some(tok) = self.tokens.get(&hash).cloned() else {
            self.metrics.dropped(Kind::Enroll, Drop::BadSignature);
            tracing::warn!(%device, "enrolment with an unknown token refused");
            return;
        };
        if tok.expires_at_ms <= now_ms || tok.uses_left == 0 {
            self.tokens.remove(&hash);
            self.step.batch.tokens.push((hash, None));
            self.metrics.dropped(Kind::Enroll, Drop::Stale);
            tracing::warn!(%device, "enrolment with an expired token refused");
            return;
        }
        let mut left = tok.clone();
        left.uses_left -= 1;
        if left.uses_left == 0 {
            self.tokens.remove(&hash);
            self.step.batch.tokens.push((hash, None));
        } else {
            self.tokens.insert(hash.clone(), left.clone());
            self.step.batch.tokens.push((hash, Some(left)));
        }
        match self.enroll(now_ms, device.clone(), req.public_key, tok.tier, tok.tenant) {
            Ok(_) => tracing::info!(%device, "device enrolled itself with a bootstrap token"),
            Err(e) => tracing::warn!(%device, error = %e, "token enrolment failed"),
        }
    }

    pub(super) fn enroll(
        &mut self,
        now_ms: u64,
        device: DeviceId,
        public_key: [u8; 32],
        tier: String,
        tenant: Option<String>,
    ) -> Result<DeviceRow, CommandError> {
        if !self.engine.agreements().tiers.contains_key(&tier) {
            return Err(CommandError::UnknownTier(tier));
        }
        if !sign::usable_public_key(&public_key) {
            return Err(CommandError::Invalid(
                "the public key is not a usable Ed25519 key (not a curve point, or of small order)"
                    .into(),
            ));
        }
        if let Some(other) = self.key_owner(&public_key).filter(|d| **d != device) {
            return Err(CommandError::KeyInUse(other.to_string()));
        }
        let mut readmit = None;
        if let Some(rec) = self.records.get_mut(&device) {
            if rec.public_key != public_key {
                return Err(CommandError::KeyConflict(device.to_string()));
            }
            // Same key: a tier change.
            rec.tier = tier.clone();
            rec.tenant = tenant.clone();
        } else {
            let mut rec = DeviceRecord::new(
                device.clone(),
                public_key,
                tier.clone(),
                tenant.clone(),
                now_ms,
            );
            let tomb = self.tombstones.remove(&device);
            if let Some(t) = &tomb {
                // Numbering continues above anything the old enrolment may
                // have used: a device that kept its state is not refused
                // with Rollback. The report floor only with the same key:
                // its old signed reports would verify again.
                rec.seq_reserved_until = t.last_instruction_seq;
                rec.next_instruction_seq = t.last_instruction_seq.saturating_add(1);
                if t.public_key == public_key {
                    rec.last_report_seq = t.last_report_seq;
                }
                self.step.batch.tombstones.push((device.clone(), None));
                tracing::info!(%device, last_instruction_seq = t.last_instruction_seq, "re-enrolment: restored from the tombstone");
            }
            self.records.insert(device.clone(), rec);
            readmit = tomb.and_then(|t| t.reputation);
            Metrics::inc(&self.metrics.enrolments);
        }
        self.dirty.insert(device.clone());
        self.publish_key(&device, Some(public_key));
        self.feed(
            now_ms,
            Event::Enrolled {
                device: device.clone(),
                tier,
                tenant,
            },
        );
        if let Some(prior) = readmit {
            // Never better than before: a bad score is not laundered.
            self.feed(
                now_ms,
                Event::Readmitted {
                    device: device.clone(),
                    prior,
                },
            );
        }
        tracing::info!(%device, key_id = %hex_key_id(&public_key), "device enrolled");
        self.row(&device)
            .ok_or(CommandError::UnknownDevice(device.to_string()))
    }
}
