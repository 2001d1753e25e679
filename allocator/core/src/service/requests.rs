//! Explicit requests at the service's edge: a device-signed
//! [`AppRequest`](shardline_shared::request::AppRequest) is opened with the
//! device's enrolled key and fed to the engine; every answer the engine
//! decides is signed with the instruction key and published on the
//! device's answer topic in the same step as the device's state, which the
//! runner commits before publishing. Operator commands for instances live
//! here too.

use super::commands::shown;
use super::*;
use crate::policy::{InstanceView, ScoreChange};
use shardline_shared::ids::InstanceRef;
use shardline_shared::request::{self, Answer, RequestAnswer, RequestOp};
use shardline_shared::sign::OpenError;

impl Core {
    /// A message on `dev/{device}/request`.
    pub(super) fn on_app_request(&mut self, now_ms: u64, device: DeviceId, payload: &[u8]) {
        Metrics::inc(&self.metrics.requests_received);
        if payload.len() > request::MAX_REQUEST_BYTES {
            self.metrics.dropped(Kind::Request, Drop::Oversize);
            return;
        }
        let Some(public) = self.records.get(&device).map(|r| r.public_key) else {
            self.metrics.dropped(Kind::Request, Drop::UnknownDevice);
            return;
        };
        let req = match request::open_request(payload, &device, &public) {
            Ok(r) => r,
            // Anyone on the broker can publish on the device's topic: a bad
            // signature is counted, never charged to the device.
            Err(OpenError::BadSignature(_) | OpenError::UnknownKey(_) | OpenError::NoSignature) => {
                self.metrics.dropped(Kind::Request, Drop::BadSignature);
                return;
            }
            Err(OpenError::Payload(codec::DecodeError::Malformed(_))) => {
                self.metrics.dropped(Kind::Request, Drop::WrongDevice);
                return;
            }
            Err(_) => {
                self.metrics.dropped(Kind::Request, Drop::Garbage);
                return;
            }
        };
        let last = self
            .engine
            .device_state(&device)
            .map_or(0, |s| s.apps.last_seq);
        if req.seq <= last {
            // Redelivered or replayed: it was answered once.
            let why = if req.seq == last {
                Drop::Duplicate
            } else {
                Drop::Stale
            };
            self.metrics.dropped(Kind::Request, why);
            return;
        }
        self.feed(now_ms, Event::AppRequest { request: req });
    }

    /// Signs an answer and publishes it with the device's state.
    pub(super) fn send_answer(&mut self, answer: RequestAnswer) {
        let m = &self.metrics;
        match &answer.answer {
            Answer::Granted(_) => Metrics::inc(&m.requests_granted),
            Answer::Queued { .. } => Metrics::inc(&m.requests_queued),
            Answer::Refused(r) => m.refused(r),
            Answer::Released { .. } => Metrics::inc(&m.requests_released),
            Answer::Standing(_) => Metrics::inc(&m.requests_standing),
            Answer::Renewed(_) => Metrics::inc(&m.requests_renewed),
        }
        let sealed = request::seal_answer(&answer, &[&self.key]);
        // The device's record (request floor, grants, queue) is committed in
        // the same step, before this publish leaves.
        self.dirty.insert(answer.device.clone());
        self.step.publish.push(Publish {
            topic: topics::answer(&answer.device),
            payload: sealed,
        });
        if let Some(seen) = self.answers_seen.as_mut() {
            seen.push(answer);
        }
    }

    /// `POST /v1/shard/request`: decided like the instance's own request
    /// (no sequence, no rate limit); the answers go to the device as well.
    pub(super) fn service_request(
        &mut self,
        now_ms: u64,
        instance: InstanceRef,
        op: RequestOp,
    ) -> Result<RequestAnswer, CommandError> {
        if !self.records.contains_key(&instance.device) {
            return Err(CommandError::UnknownDevice(instance.device.to_string()));
        }
        self.answers_seen = Some(Vec::new());
        self.feed(
            now_ms,
            Event::ServiceRequest {
                instance: instance.clone(),
                op,
            },
        );
        let seen = self.answers_seen.take().unwrap_or_default();
        seen.into_iter()
            .find(|a| {
                a.app == instance.app && a.instance == instance.instance && a.request_seq == 0
            })
            .ok_or_else(|| CommandError::Invalid("the engine gave no answer".into()))
    }

    pub(super) fn instance_view(
        &self,
        now_ms: u64,
        instance: &InstanceRef,
    ) -> Result<InstanceView, CommandError> {
        if !self.records.contains_key(&instance.device) {
            return Err(CommandError::UnknownDevice(instance.device.to_string()));
        }
        self.engine
            .instance_view_at(instance, Some(now_ms))
            .ok_or_else(|| {
                CommandError::Invalid(format!("no instance {}", shown(&instance.to_string())))
            })
    }

    pub(super) fn adjust_instance(
        &mut self,
        now_ms: u64,
        instance: InstanceRef,
        change: ScoreChange,
        reason: String,
        actor: String,
    ) -> Result<InstanceView, CommandError> {
        if !self.records.contains_key(&instance.device) {
            return Err(CommandError::UnknownDevice(instance.device.to_string()));
        }
        let value = match change {
            ScoreChange::Delta(v) | ScoreChange::Set(v) => v,
        };
        if !value.is_finite()
            || value.abs() > 100.0
            || (matches!(change, ScoreChange::Set(_)) && value < 0.0)
        {
            return Err(CommandError::Invalid(
                "set is 0-100 and delta -100 to 100".into(),
            ));
        }
        if reason.trim().is_empty() {
            return Err(CommandError::Invalid("a reason is required".into()));
        }
        self.feed(
            now_ms,
            Event::AdjustInstanceReputation {
                instance: instance.clone(),
                change,
                reason,
                actor,
            },
        );
        self.instance_view(now_ms, &instance)
    }
}
