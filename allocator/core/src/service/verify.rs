//! Verification of device-signed messages (reports and acks): the checks
//! before the signature math (size, envelope, domain, signer, enrolled key),
//! the math itself (batched), and the decoding after it, every refusal
//! counted. Pure CPU work: the service runs [`verify_batch`] on its verifier
//! threads, one device always on the same thread so its messages stay in
//! order.

use super::*;

/// Device public keys by id, written by the core, read by verifier threads.
/// Each key is decompressed once, when published ([`sign::CheckKey`]).
pub type KeyDirectory = Arc<std::sync::RwLock<HashMap<DeviceId, sign::CheckKey>>>;

/// A device message after signature verification, for [`Core::on_verified`].
#[derive(Debug)]
pub enum VerifiedMsg {
    /// Boxed: a report is several times the size of the other variants
    /// (and of the messages queued beside it).
    Report(DeviceId, Box<QosReport>),
    Ack(DeviceId, InstructionAck),
    /// An enrolled device's message whose signature did not verify.
    BadSignature(DeviceId),
}

impl VerifiedMsg {
    pub fn device(&self) -> &DeviceId {
        match self {
            Self::Report(d, _) | Self::Ack(d, _) | Self::BadSignature(d) => d,
        }
    }
}

/// The result of [`verify_signed`].
#[derive(Debug)]
pub enum Verified<T> {
    Ok(T),
    /// Counted; for an enrolled device this is a compliance event.
    BadSignature,
    /// Counted (oversize, garbage, unknown device) and dropped.
    Dropped,
}

/// Why a device-signed message was refused before its signature math.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Counted; for an enrolled device this is a compliance event.
    BadSignature,
    /// Counted (oversize, garbage, unknown device) and dropped.
    Dropped,
}

/// A device-signed message that passed every check but the signature
/// itself, which is checked separately (in a batch when the runner has
/// several): see [`sign::verify_checks`].
#[derive(Debug)]
pub struct Prepared {
    payload: Vec<u8>,
}

/// Checks size, envelope, domain and signer of a device-signed message
/// against the device's enrolled key (`public`), counting every refusal.
pub fn prepare_signed(
    metrics: &Metrics,
    max_payload: usize,
    kind: Kind,
    domain: Domain,
    device: &DeviceId,
    public: Option<[u8; 32]>,
    payload: &[u8],
) -> Result<(Prepared, sign::SignatureCheck), Refused> {
    let key = public.map(sign::CheckKey::new);
    prepare_signed_with(
        metrics,
        max_payload,
        kind,
        domain,
        device,
        key.as_ref(),
        payload,
    )
}

/// [`prepare_signed`] with the key already prepared (the verifier threads'
/// key directory holds them so).
pub fn prepare_signed_with(
    metrics: &Metrics,
    max_payload: usize,
    kind: Kind,
    domain: Domain,
    device: &DeviceId,
    public: Option<&sign::CheckKey>,
    payload: &[u8],
) -> Result<(Prepared, sign::SignatureCheck), Refused> {
    if payload.len() > max_payload {
        metrics.dropped(kind, Drop::Oversize);
        return Err(Refused::Dropped);
    }
    let Some(public) = public else {
        metrics.dropped(kind, Drop::UnknownDevice);
        return Err(Refused::Dropped);
    };
    let envelope = match sign::parse_envelope(payload, max_payload) {
        Ok(e) => e,
        Err(_) => {
            metrics.dropped(kind, Drop::Garbage);
            return Err(Refused::Dropped);
        }
    };
    match public.check(&envelope, domain) {
        Ok(check) => Ok((
            Prepared {
                payload: envelope.payload,
            },
            check,
        )),
        Err(e) => {
            tracing::debug!(%device, error = %e, "signature refused");
            metrics.dropped(kind, Drop::BadSignature);
            Err(Refused::BadSignature)
        }
    }
}

/// Completes a prepared message once its signature was checked
/// (`signature_ok`): decodes the payload, counting every refusal.
pub fn finish_signed<T: serde::de::DeserializeOwned>(
    metrics: &Metrics,
    kind: Kind,
    device: &DeviceId,
    prepared: Prepared,
    signature_ok: bool,
) -> Verified<T> {
    if !signature_ok {
        tracing::debug!(%device, "signature does not verify");
        metrics.dropped(kind, Drop::BadSignature);
        return Verified::BadSignature;
    }
    // A report of an agent that predates `QosReport::lending` ends two
    // bytes short: it is read with that field empty (the signature covers
    // the bytes as sent, checked above).
    let decoded = if kind == Kind::Report {
        codec::decode_or_padded(
            &prepared.payload,
            codec::MAX_PAYLOAD,
            shardline_shared::msg::REPORT_LEGACY_TAIL,
        )
    } else {
        codec::decode(&prepared.payload)
    };
    match decoded {
        Ok(obj) => Verified::Ok(obj),
        Err(_) => {
            // Signed by the device but not decodable: garbage, not forgery.
            metrics.dropped(kind, Drop::Garbage);
            Verified::Dropped
        }
    }
}

/// [`prepare_signed`] for a device's report or ack (by its topic kind).
pub fn prepare_device_message(
    metrics: &Metrics,
    max_payload: usize,
    kind: TopicKind,
    device: &DeviceId,
    public: Option<&sign::CheckKey>,
    payload: &[u8],
) -> Result<(Prepared, sign::SignatureCheck), Refused> {
    let (metric, domain) = if kind == TopicKind::Report {
        Metrics::inc(&metrics.reports_received);
        (Kind::Report, Domain::Report)
    } else {
        (Kind::Ack, Domain::Ack)
    };
    prepare_signed_with(
        metrics,
        max_payload,
        metric,
        domain,
        device,
        public,
        payload,
    )
}

/// [`finish_signed`] for a device's report or ack: what the core gets, if
/// anything.
pub fn finish_device_message(
    metrics: &Metrics,
    kind: TopicKind,
    device: DeviceId,
    prepared: Prepared,
    signature_ok: bool,
) -> Option<VerifiedMsg> {
    Some(if kind == TopicKind::Report {
        match finish_signed(metrics, Kind::Report, &device, prepared, signature_ok) {
            Verified::Ok(r) => VerifiedMsg::Report(device, Box::new(r)),
            Verified::BadSignature => VerifiedMsg::BadSignature(device),
            Verified::Dropped => return None,
        }
    } else {
        match finish_signed(metrics, Kind::Ack, &device, prepared, signature_ok) {
            Verified::Ok(a) => VerifiedMsg::Ack(device, a),
            Verified::BadSignature => VerifiedMsg::BadSignature(device),
            Verified::Dropped => return None,
        }
    })
}

/// [`prepare_signed`], the signature check alone, then [`finish_signed`]:
/// one message. Pure CPU work, so the runner spreads it over threads (per
/// device in order) and batches the signature checks.
pub fn verify_signed<T: serde::de::DeserializeOwned>(
    metrics: &Metrics,
    max_payload: usize,
    kind: Kind,
    domain: Domain,
    device: &DeviceId,
    public: Option<[u8; 32]>,
    payload: &[u8],
) -> Verified<T> {
    match prepare_signed(metrics, max_payload, kind, domain, device, public, payload) {
        Ok((prepared, check)) => {
            let ok = sign::verify_checks(std::slice::from_ref(&check))[0].is_ok();
            finish_signed(metrics, kind, device, prepared, ok)
        }
        Err(Refused::BadSignature) => Verified::BadSignature,
        Err(Refused::Dropped) => Verified::Dropped,
    }
}

/// A device message as a verifier thread received it.
#[derive(Debug)]
pub struct ToVerify {
    pub device: DeviceId,
    pub kind: TopicKind,
    pub payload: Vec<u8>,
}

/// What a verifier thread hands the core for one message.
#[derive(Debug)]
pub enum VerifierOutput {
    /// Verified here (or refused as a bad signature): [`Core::on_verified`].
    Verified(VerifiedMsg),
    /// Not verified here: the device's key is not in the directory, and with
    /// a shared store it may have been enrolled through another instance.
    /// The core loads it from the store and verifies it: [`Core::on_message`].
    Unverified { topic: String, payload: Vec<u8> },
}

/// What one message of a batch became before the signature check.
enum Triage {
    Output(VerifierOutput),
    /// Waiting for the batch's signature check (index into it).
    Check(DeviceId, TopicKind, Prepared, usize),
    Dropped,
}

/// Verifies a batch of device messages, checking the signatures as one
/// Ed25519 batch (about half the CPU of checking them one by one; a failed
/// batch falls back to one check per message, so exactly the bad ones are
/// refused). Results are appended to `out` in arrival order.
pub fn verify_batch(
    keys: &KeyDirectory,
    metrics: &Metrics,
    max_payload: usize,
    shared_store: bool,
    batch: impl IntoIterator<Item = ToVerify>,
    out: &mut Vec<VerifierOutput>,
) {
    let batch = batch.into_iter();
    let mut triaged = Vec::with_capacity(batch.size_hint().0);
    let mut checks = Vec::with_capacity(batch.size_hint().0);
    for ToVerify {
        device,
        kind,
        payload,
    } in batch
    {
        let public = keys.read().ok().and_then(|k| k.get(&device).copied());
        if public.is_none() && shared_store {
            let topic = if kind == TopicKind::Report {
                topics::report(&device)
            } else {
                topics::ack(&device)
            };
            triaged.push(Triage::Output(VerifierOutput::Unverified {
                topic,
                payload,
            }));
            continue;
        }
        triaged.push(
            match prepare_device_message(
                metrics,
                max_payload,
                kind,
                &device,
                public.as_ref(),
                &payload,
            ) {
                Ok((prepared, check)) => {
                    checks.push(check);
                    Triage::Check(device, kind, prepared, checks.len() - 1)
                }
                Err(Refused::BadSignature) => {
                    Triage::Output(VerifierOutput::Verified(VerifiedMsg::BadSignature(device)))
                }
                Err(Refused::Dropped) => Triage::Dropped,
            },
        );
    }
    let results = sign::verify_checks(&checks);
    if !checks.is_empty() {
        Metrics::inc(&metrics.signature_batches);
        metrics
            .signatures_checked
            .fetch_add(checks.len() as u64, Ordering::Relaxed);
    }
    for t in triaged {
        match t {
            Triage::Output(o) => out.push(o),
            Triage::Dropped => {}
            Triage::Check(device, kind, prepared, i) => {
                if let Some(m) =
                    finish_device_message(metrics, kind, device, prepared, results[i].is_ok())
                {
                    out.push(VerifierOutput::Verified(m));
                }
            }
        }
    }
}
