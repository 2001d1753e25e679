use super::*;

/// A forced re-send of one instruction happens at most this often: forged
/// "online" statuses make at most ten publishes a second per pending
/// instruction.
pub(super) const FORCED_RESEND_MIN_MS: u64 = 100;
/// Re-send intervals double per attempt up to this many doublings.
const RESEND_MAX_DOUBLINGS: u32 = 5;

/// How long after its last send an instruction sent `attempts` times is
/// re-sent: `base`, then doubling per attempt, at most 32 × `base`.
pub(super) fn resend_backoff(base: u64, attempts: u32) -> u64 {
    base.saturating_mul(1 << attempts.saturating_sub(1).min(RESEND_MAX_DOUBLINGS))
}

impl Core {
    /// Feeds the engine and carries out its actions (instructions get their
    /// sequence number here; `Sent` goes back to the engine).
    pub(super) fn feed(&mut self, now_ms: u64, event: Event) {
        let queue: Vec<Action> = self.engine.handle(now_ms, event);
        self.run_actions(now_ms, queue);
    }

    /// Carries out engine actions (and those they lead to) in order.
    pub(super) fn run_actions(&mut self, now_ms: u64, mut queue: Vec<Action>) {
        queue.reverse();
        while let Some(action) = queue.pop() {
            match action {
                Action::Instruct {
                    device,
                    ops,
                    expires_at_ms,
                } => {
                    let Some(seq) = self.instruct(now_ms, &device, ops, expires_at_ms) else {
                        continue;
                    };
                    let mut more = self.engine.handle(now_ms, Event::Sent { device, seq });
                    more.reverse();
                    queue.extend(more);
                }
                Action::ReputationChanged {
                    device,
                    old,
                    new,
                    reason,
                } => {
                    Metrics::inc(&self.metrics.reputation_changes);
                    self.dirty.insert(device.clone());
                    tracing::info!(%device, old, new, %reason, "reputation changed");
                    let event = HistoryEvent::Reputation {
                        from: old,
                        to: new,
                        reason,
                    };
                    self.history(&device, now_ms, event);
                }
                Action::Alert { device, message } => {
                    Metrics::inc(&self.metrics.alerts);
                    tracing::warn!(%device, %message, "policy alert");
                }
                Action::CatalogEntryFailing {
                    shard,
                    arch,
                    reason,
                    devices,
                } => {
                    Metrics::inc(&self.metrics.catalog_entries_failed);
                    tracing::warn!(%shard, %arch, %reason, devices, "catalog entry failing on this architecture: no longer planned there (an operator fault: fix the entry or `shardctl catalog retry`)");
                }
                Action::Answer(answer) => self.send_answer(answer),
                Action::InstanceReputationAdjusted {
                    instance,
                    old,
                    new,
                    reason,
                    actor,
                } => {
                    Metrics::inc(&self.metrics.instance_adjustments);
                    self.dirty.insert(instance.device.clone());
                    tracing::info!(target: "audit", %actor, %instance, old, new, %reason, "instance reputation adjusted by an operator");
                }
                Action::Rollout {
                    shard,
                    phase,
                    reason,
                } => {
                    Metrics::inc(&self.metrics.rollout_changes);
                    if phase == "rolled_back" {
                        tracing::warn!(%shard, %phase, %reason, "rollout rolled back");
                    } else {
                        tracing::info!(%shard, %phase, %reason, "rollout");
                    }
                    self.step.live.push(super::live::LiveNote::Rollout {
                        shard,
                        phase: phase.to_string(),
                        reason,
                        at_ms: now_ms,
                    });
                }
                Action::DuplicateSuspected { device, reason } => {
                    Metrics::inc(&self.metrics.duplicate_flags);
                    self.dirty.insert(device.clone());
                    tracing::warn!(%device, %reason, "probable duplicate device");
                }
            }
        }
    }

    pub(super) fn instruct(
        &mut self,
        now_ms: u64,
        device: &DeviceId,
        mut ops: Vec<shardline_shared::msg::Operation>,
        expires_at_ms: u64,
    ) -> Option<u64> {
        // Secrets are sealed to the device here, the last step before the
        // signature: the engine's actions never hold them.
        self.seal_secrets(device, &mut ops);
        if ops.is_empty() {
            return None;
        }
        let Some(rec) = self.records.get_mut(device) else {
            tracing::warn!(%device, "engine instructed a device the service does not know");
            return None;
        };
        let seq = rec.take_seq();
        let described = ops
            .iter()
            .map(|op| crate::history::describe_operation(now_ms, op))
            .collect();
        let instr = Instruction {
            device: device.clone(),
            seq,
            issued_at_ms: now_ms,
            expires_at_ms,
            ops,
        };
        let sealed = sign::seal(Domain::Instruction, &instr, &[&self.key]);
        rec.pending.push(PendingInstruction {
            seq,
            sealed: sealed.clone(),
            issued_at_ms: now_ms,
            expires_at_ms,
            last_sent_ms: now_ms,
            attempts: 1,
        });
        rec.instructions_sent += 1;
        self.dirty.insert(device.clone());
        Metrics::inc(&self.metrics.decisions);
        Metrics::inc(&self.metrics.instructions_sent);
        tracing::debug!(%device, seq, ops = instr.ops.len(), "instruction");
        let event = HistoryEvent::Instruction {
            seq,
            ops: described,
            status: InstructionStatus::Sent,
            reason: None,
        };
        self.history(device, now_ms, event);
        self.step.live.push(super::live::LiveNote::Instruction {
            device: device.clone(),
            seq,
            at_ms: now_ms,
        });
        self.step.publish.push(Publish {
            topic: topics::instr(device),
            payload: sealed,
        });
        Some(seq)
    }

    // ----------------------------------------------------------- commands

    /// Re-publishes pending instructions above `above` (all of them when
    /// `force`, else only those not sent for `resend_after_ms`). Expired ones
    /// are dropped instead.
    /// Devices with instructions not yet known to be applied.
    pub(super) fn devices_with_pending(&self) -> Vec<DeviceId> {
        self.records
            .iter()
            .filter(|(_, r)| !r.pending.is_empty())
            .map(|(d, _)| d.clone())
            .collect()
    }

    pub(super) fn resend_pending(
        &mut self,
        now_ms: u64,
        device: &DeviceId,
        above: u64,
        force: bool,
    ) {
        let resend_after = self.cfg.resend_after_ms;
        let Some(rec) = self.records.get_mut(device) else {
            return;
        };
        let expired_seqs: Vec<u64> = rec
            .pending
            .iter()
            .filter(|p| p.expires_at_ms <= now_ms)
            .map(|p| p.seq)
            .collect();
        rec.pending.retain(|p| p.expires_at_ms > now_ms);
        let expired = expired_seqs.len() as u64;
        let mut changed = expired > 0;
        self.metrics
            .instructions_expired
            .fetch_add(expired, Ordering::Relaxed);
        let topic = topics::instr(device);
        for p in rec.pending.iter_mut() {
            if p.seq <= above {
                continue;
            }
            // Forced (the device just came online or asked) at most once
            // per `FORCED_RESEND_MIN_MS`, so forged "online" statuses cannot
            // make this service flood a device; otherwise with exponential
            // backoff, so a device that never answers costs little.
            let due = if force {
                p.last_sent_ms + FORCED_RESEND_MIN_MS <= now_ms
            } else {
                p.last_sent_ms + resend_backoff(resend_after, p.attempts) <= now_ms
            };
            if due {
                p.last_sent_ms = now_ms;
                p.attempts += 1;
                changed = true;
                Metrics::inc(&self.metrics.instructions_resent);
                self.step.publish.push(Publish {
                    topic: topic.clone(),
                    payload: p.sealed.clone(),
                });
            }
        }
        if changed {
            self.dirty.insert(device.clone());
        }
        for seq in expired_seqs {
            let why = Some("expired before the device said it applied it".to_owned());
            self.instruction_history(device, now_ms, seq, InstructionStatus::Expired, why);
        }
    }

    pub(super) fn send_rotation(&mut self, device: &DeviceId) {
        if self.meta.rotation.is_empty() {
            return;
        }
        if let Some(rec) = self.records.get_mut(device) {
            rec.rotation_epoch_sent = self.meta.key_epoch;
            self.dirty.insert(device.clone());
        }
        Metrics::inc(&self.metrics.rotations_sent);
        self.step.publish.push(Publish {
            topic: topics::instr(device),
            payload: self.meta.rotation.clone(),
        });
    }
}
