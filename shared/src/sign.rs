//! Ed25519 signing with key ids and per-type domain separation.
//!
//! Every signed object travels in a [`SignedEnvelope`]: the framed payload
//! bytes, the [`Domain`] it claims to be, and one or more signatures. Each
//! signature covers `domain tag || payload`, so a signature made for a report
//! or a key rotation never verifies as an instruction, whatever the envelope
//! claims. The verifier always states the domain it expects; the envelope's
//! own `domain` field only serves better error messages and dispatch.
//!
//! No randomness lives here: key generation takes seed bytes from the caller
//! (the binaries read them from the OS), which keeps the crate pure.

use crate::codec::{self, DecodeError};
use crate::ids::KeyId;
use crate::msg::{EnrollRequest, KeySet, PublicKeyEntry, MAX_ENROLL_BYTES, MAX_ENROLL_TOKEN_LEN};
use ed25519_dalek::{Signer as _, SigningKey, VerifyingKey};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// What kind of object a signature is for. The tag is mixed into every
/// signature, so objects of one kind cannot be replayed as another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Domain {
    Instruction,
    Report,
    Rotation,
    Ack,
    /// A device's self-enrolment request, signed by the key it enrols.
    /// Added at the end: the variants before it keep their wire bytes.
    Enroll,
    /// An explicit request from an application on the device, signed by
    /// the device key ([`crate::request`]). Added at the end.
    AppRequest,
    /// The allocator's answer to such a request (a grant, a queue position
    /// or a refusal), signed by an instruction key. Added at the end.
    RequestAnswer,
    /// A group's assignment object (seed 001: server, endpoints, expiry;
    /// [`crate::assign`]), signed by an instruction key. Added at the end.
    Assignment,
    /// A device's diagnostics answer ([`crate::diag`]), signed by the
    /// device key. Added at the end.
    Diagnostics,
}

impl Domain {
    pub fn tag(self) -> &'static [u8] {
        match self {
            Domain::Instruction => b"shardline/v1/sig/instruction\0",
            Domain::Report => b"shardline/v1/sig/report\0",
            Domain::Rotation => b"shardline/v1/sig/rotation\0",
            Domain::Ack => b"shardline/v1/sig/ack\0",
            Domain::Enroll => b"shardline/v1/sig/enroll\0",
            Domain::AppRequest => b"shardline/v1/sig/app-request\0",
            Domain::RequestAnswer => b"shardline/v1/sig/request-answer\0",
            Domain::Assignment => b"shardline/v1/sig/assignment\0",
            Domain::Diagnostics => b"shardline/v1/sig/diagnostics\0",
        }
    }
}

/// One signature and the id of the key that made it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    pub key_id: KeyId,
    /// 64-byte Ed25519 signature (a `Vec` because serde has no `[u8; 64]`;
    /// the length is checked before verification).
    pub signature: Vec<u8>,
}

/// Most signatures an envelope may carry. A device signs with one key, an
/// instruction with one allocator key, a key rotation with one key of the
/// current set and one of the new set; 4 leaves room for a rotation that
/// overlaps two keys of each set. More is refused on decoding: every
/// signature costs the receiver an Ed25519 verification, so an unbounded
/// list would let a broker neighbour buy CPU on the device for the price of
/// bytes.
pub const MAX_SIGNATURES: usize = 4;

/// The signed container every signed object travels in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedEnvelope {
    pub domain: Domain,
    /// `codec::encode` of the signed object.
    pub payload: Vec<u8>,
    /// At most [`MAX_SIGNATURES`]: any decoder of this type refuses more
    /// (and [`parse_envelope`] says how many there were).
    #[serde(deserialize_with = "signatures_at_most_max")]
    pub signatures: Vec<SignatureEntry>,
}

/// The signature list as read off the wire: the first [`MAX_SIGNATURES`]
/// entries and how many there were in all. Reading goes on past the cap
/// (bounded by the byte cap checked before decoding) so that the caller can
/// name the count; nothing past the cap is kept.
struct CountedSignatures {
    kept: Vec<SignatureEntry>,
    total: usize,
}

impl<'de> Deserialize<'de> for CountedSignatures {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = CountedSignatures;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a list of signature entries")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                // Never trust the length prefix for an allocation.
                let mut kept = Vec::with_capacity(MAX_SIGNATURES);
                let mut total = 0usize;
                while let Some(entry) = seq.next_element::<SignatureEntry>()? {
                    total += 1;
                    if kept.len() < MAX_SIGNATURES {
                        kept.push(entry);
                    }
                }
                Ok(CountedSignatures { kept, total })
            }
        }
        d.deserialize_seq(Visit)
    }
}

fn signatures_at_most_max<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Vec<SignatureEntry>, D::Error> {
    let counted = CountedSignatures::deserialize(d)?;
    if counted.total > MAX_SIGNATURES {
        return Err(serde::de::Error::custom(too_many(counted.total)));
    }
    Ok(counted.kept)
}

fn too_many(count: usize) -> DecodeError {
    DecodeError::TooManySignatures {
        count,
        max: MAX_SIGNATURES,
    }
}

/// [`SignedEnvelope`]'s wire layout with the signature list counted instead
/// of refused, so [`parse_envelope`] can report the count.
#[derive(Deserialize)]
struct EnvelopeWire {
    domain: Domain,
    payload: Vec<u8>,
    signatures: CountedSignatures,
}

/// Why a signed envelope was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OpenError {
    #[error("envelope: {0}")]
    Envelope(DecodeError),
    #[error("expected a signed {expected:?}, got a {found:?}")]
    WrongDomain { expected: Domain, found: Domain },
    #[error("the envelope carries no signature")]
    NoSignature,
    #[error("signed by unknown key {0}")]
    UnknownKey(KeyId),
    #[error("signature by key {0} does not verify")]
    BadSignature(KeyId),
    #[error("signed payload: {0}")]
    Payload(DecodeError),
}

/// A private signing key with its id.
#[derive(Clone)]
pub struct KeyPair {
    key: SigningKey,
    id: KeyId,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("KeyPair").field("id", &self.id).finish()
    }
}

impl KeyPair {
    /// Builds a key from its 32-byte secret seed (from the OS RNG or a key file).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        let key = SigningKey::from_bytes(seed);
        let id = KeyId::of_public_key(key.verifying_key().as_bytes());
        Self { key, id }
    }

    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The X25519 form of this key, for opening configuration sealed to it
    /// ([`crate::seal`]): the clamped scalar libsodium's
    /// `crypto_sign_ed25519_sk_to_curve25519` derives.
    pub(crate) fn box_secret_key(&self) -> crypto_box::SecretKey {
        crypto_box::SecretKey::from_bytes(self.key.to_scalar_bytes())
    }

    pub fn public_entry(&self) -> PublicKeyEntry {
        PublicKeyEntry {
            key_id: self.id,
            public_key: self.public_key(),
        }
    }

    pub fn sign_entry(&self, domain: Domain, payload: &[u8]) -> SignatureEntry {
        let signature = self.key.sign(&signed_bytes(domain, payload));
        SignatureEntry {
            key_id: self.id,
            signature: signature.to_bytes().to_vec(),
        }
    }
}

fn signed_bytes(domain: Domain, payload: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(domain.tag().len() + payload.len());
    msg.extend_from_slice(domain.tag());
    msg.extend_from_slice(payload);
    msg
}

/// Encodes `object` and signs it with every key in `signers`; returns the
/// framed envelope ready to publish. Receivers refuse an envelope with more
/// than [`MAX_SIGNATURES`] signers.
pub fn seal<T: Serialize>(domain: Domain, object: &T, signers: &[&KeyPair]) -> Vec<u8> {
    let payload = codec::encode(object);
    let signatures = signers
        .iter()
        .map(|k| k.sign_entry(domain, &payload))
        .collect();
    codec::encode(&SignedEnvelope {
        domain,
        payload,
        signatures,
    })
}

/// Decodes the envelope only (no verification): for dispatch by domain.
/// More than [`MAX_SIGNATURES`] signatures is
/// `OpenError::Envelope(DecodeError::TooManySignatures { .. })`.
pub fn parse_envelope(bytes: &[u8], cap: usize) -> Result<SignedEnvelope, OpenError> {
    let wire: EnvelopeWire = codec::decode_capped(bytes, cap).map_err(OpenError::Envelope)?;
    if wire.signatures.total > MAX_SIGNATURES {
        return Err(OpenError::Envelope(too_many(wire.signatures.total)));
    }
    Ok(SignedEnvelope {
        domain: wire.domain,
        payload: wire.payload,
        signatures: wire.signatures.kept,
    })
}

/// Envelopes built in memory never went through the decoder's cap.
fn check_signature_count(envelope: &SignedEnvelope) -> Result<(), OpenError> {
    if envelope.signatures.len() > MAX_SIGNATURES {
        return Err(OpenError::Envelope(too_many(envelope.signatures.len())));
    }
    Ok(())
}

/// Verifies one signature entry against a public key.
pub fn verify_entry(
    domain: Domain,
    payload: &[u8],
    entry: &SignatureEntry,
    public_key: &[u8; 32],
) -> Result<(), OpenError> {
    let bad = || OpenError::BadSignature(entry.key_id);
    let sig_bytes: [u8; 64] = entry.signature.as_slice().try_into().map_err(|_| bad())?;
    let key = VerifyingKey::from_bytes(public_key).map_err(|_| bad())?;
    let sig = ed25519_dalek::Signature::from_bytes(&sig_bytes);
    key.verify_strict(&signed_bytes(domain, payload), &sig)
        .map_err(|_| bad())
}

/// One signature ready to be checked, alone or in a batch with others
/// ([`verify_checks`]): the domain-tagged message, the signature and the
/// (decompressed, not small-order) public key.
#[derive(Debug, Clone)]
pub struct SignatureCheck {
    message: Vec<u8>,
    signature: ed25519_dalek::Signature,
    key: VerifyingKey,
    key_id: KeyId,
}

/// Checks everything about an envelope signed by exactly one known key
/// except the signature itself: domain, that it is signed, that every
/// signature is by `key_id`, and that the key is a usable Ed25519 key.
pub fn signature_check(
    envelope: &SignedEnvelope,
    expected: Domain,
    key_id: KeyId,
    public_key: &[u8; 32],
) -> Result<SignatureCheck, OpenError> {
    if envelope.domain != expected {
        return Err(OpenError::WrongDomain {
            expected,
            found: envelope.domain,
        });
    }
    let [entry] = envelope.signatures.as_slice() else {
        return Err(
            match envelope.signatures.iter().find(|e| e.key_id != key_id) {
                Some(other) => OpenError::UnknownKey(other.key_id),
                None if envelope.signatures.is_empty() => OpenError::NoSignature,
                // The same key twice: one signature is all a device makes.
                None => OpenError::BadSignature(key_id),
            },
        );
    };
    if entry.key_id != key_id {
        return Err(OpenError::UnknownKey(entry.key_id));
    }
    let bad = || OpenError::BadSignature(key_id);
    let sig_bytes: [u8; 64] = entry.signature.as_slice().try_into().map_err(|_| bad())?;
    let key = usable_key(public_key).ok_or_else(bad)?;
    Ok(SignatureCheck {
        message: signed_bytes(expected, &envelope.payload),
        signature: ed25519_dalek::Signature::from_bytes(&sig_bytes),
        key,
        key_id,
    })
}

/// The decompressed key, if it can verify anything: `verify_strict`
/// refuses small-order keys, so must a batch.
fn usable_key(public_key: &[u8; 32]) -> Option<VerifyingKey> {
    VerifyingKey::from_bytes(public_key)
        .ok()
        .filter(|k| !k.is_weak())
}

/// A public key made ready for signature checks once (its id hashed, its
/// point decompressed and checked), so a device's every message does not
/// pay for that again: with the batch check, decompression was a sizeable
/// part of a report's verification.
#[derive(Debug, Clone, Copy)]
pub struct CheckKey {
    public: [u8; 32],
    key_id: KeyId,
    /// `None`: not a usable Ed25519 key (every check fails).
    key: Option<VerifyingKey>,
}

impl CheckKey {
    pub fn new(public: [u8; 32]) -> Self {
        Self {
            public,
            key_id: KeyId::of_public_key(&public),
            key: usable_key(&public),
        }
    }

    pub fn public(&self) -> &[u8; 32] {
        &self.public
    }

    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    /// [`signature_check`] with this key's id, without decompressing again.
    pub fn check(
        &self,
        envelope: &SignedEnvelope,
        expected: Domain,
    ) -> Result<SignatureCheck, OpenError> {
        match self.key {
            // Same checks, same errors, as signature_check.
            None => signature_check(envelope, expected, self.key_id, &self.public),
            Some(key) => {
                if envelope.domain != expected {
                    return signature_check(envelope, expected, self.key_id, &self.public);
                }
                let [entry] = envelope.signatures.as_slice() else {
                    return signature_check(envelope, expected, self.key_id, &self.public);
                };
                if entry.key_id != self.key_id {
                    return Err(OpenError::UnknownKey(entry.key_id));
                }
                let sig_bytes: [u8; 64] = entry
                    .signature
                    .as_slice()
                    .try_into()
                    .map_err(|_| OpenError::BadSignature(self.key_id))?;
                Ok(SignatureCheck {
                    message: signed_bytes(expected, &envelope.payload),
                    signature: ed25519_dalek::Signature::from_bytes(&sig_bytes),
                    key,
                    key_id: self.key_id,
                })
            }
        }
    }
}

/// Whether `public_key` can ever verify a signature: a point on the curve
/// that is not of small order (`verify_strict` refuses those, so a device
/// enrolled with one could never be heard). Checked at enrolment.
pub fn usable_public_key(public_key: &[u8; 32]) -> bool {
    VerifyingKey::from_bytes(public_key).is_ok_and(|k| !k.is_weak())
}

/// Verifies many signatures at once, one result per check in order.
///
/// Two or more are tried as one Ed25519 batch (about half the CPU per
/// signature); only if the batch fails is each checked alone with
/// `verify_strict`, to find the bad ones. A batch uses the cofactored
/// equation, so it can accept the few non-canonical signatures that only
/// the key's holder can make and `verify_strict` refuses; that allows no
/// forgery, and nothing here relies on signatures being unique (replays
/// are refused by the sequence numbers inside the signed payloads).
pub fn verify_checks(checks: &[SignatureCheck]) -> Vec<Result<(), OpenError>> {
    if checks.len() >= 2 {
        let messages: Vec<&[u8]> = checks.iter().map(|c| c.message.as_slice()).collect();
        let signatures: Vec<ed25519_dalek::Signature> =
            checks.iter().map(|c| c.signature).collect();
        let keys: Vec<VerifyingKey> = checks.iter().map(|c| c.key).collect();
        if ed25519_dalek::verify_batch(&messages, &signatures, &keys).is_ok() {
            return checks.iter().map(|_| Ok(())).collect();
        }
    }
    checks
        .iter()
        .map(|c| {
            c.key
                .verify_strict(&c.message, &c.signature)
                .map_err(|_| OpenError::BadSignature(c.key_id))
        })
        .collect()
}

/// Verifies that *every* signature on the envelope is by a key `lookup`
/// knows and verifies under `expected`, then decodes the payload.
/// Returns the object and the ids of the keys that signed it.
pub fn open_envelope<T: DeserializeOwned>(
    envelope: &SignedEnvelope,
    expected: Domain,
    lookup: impl Fn(KeyId) -> Option<[u8; 32]>,
) -> Result<(T, Vec<KeyId>), OpenError> {
    if envelope.domain != expected {
        return Err(OpenError::WrongDomain {
            expected,
            found: envelope.domain,
        });
    }
    check_signature_count(envelope)?;
    if envelope.signatures.is_empty() {
        return Err(OpenError::NoSignature);
    }
    let mut signers = Vec::with_capacity(envelope.signatures.len());
    for entry in &envelope.signatures {
        let public = lookup(entry.key_id).ok_or(OpenError::UnknownKey(entry.key_id))?;
        verify_entry(expected, &envelope.payload, entry, &public)?;
        signers.push(entry.key_id);
    }
    let object = codec::decode(&envelope.payload).map_err(OpenError::Payload)?;
    Ok((object, signers))
}

/// [`parse_envelope`] then [`open_envelope`].
pub fn open<T: DeserializeOwned>(
    bytes: &[u8],
    expected: Domain,
    cap: usize,
    lookup: impl Fn(KeyId) -> Option<[u8; 32]>,
) -> Result<(T, Vec<KeyId>), OpenError> {
    open_envelope(&parse_envelope(bytes, cap)?, expected, lookup)
}

/// Seals an enrolment request under [`Domain::Enroll`], signed by `key`,
/// which must be the key the request enrols (`req.public_key`).
pub fn seal_enroll(req: &EnrollRequest, key: &KeyPair) -> Vec<u8> {
    seal(Domain::Enroll, req, &[key])
}

/// Opens a sealed enrolment request: at most [`MAX_ENROLL_BYTES`], domain
/// [`Domain::Enroll`], and every signature made by the key the request
/// itself names (proof that the sender holds it). The payload is decoded
/// once to learn that key, then verified and decoded again by
/// [`open_envelope`]; both decodes are capped.
pub fn open_enroll(bytes: &[u8]) -> Result<EnrollRequest, OpenError> {
    let env = parse_envelope(bytes, MAX_ENROLL_BYTES)?;
    if env.domain != Domain::Enroll {
        return Err(OpenError::WrongDomain {
            expected: Domain::Enroll,
            found: env.domain,
        });
    }
    let claimed: EnrollRequest =
        codec::decode_capped(&env.payload, MAX_ENROLL_BYTES).map_err(OpenError::Payload)?;
    let id = KeyId::of_public_key(&claimed.public_key);
    let (req, _): (EnrollRequest, _) = open_envelope(&env, Domain::Enroll, |k| {
        (k == id).then_some(claimed.public_key)
    })?;
    if req.token.is_empty() || req.token.len() > MAX_ENROLL_TOKEN_LEN {
        return Err(OpenError::Payload(DecodeError::Malformed(format!(
            "enrolment token of {} bytes (1 to {MAX_ENROLL_TOKEN_LEN})",
            req.token.len()
        ))));
    }
    Ok(req)
}

impl KeySet {
    /// A key set of the given public keys.
    pub fn of(epoch: u64, keys: &[&KeyPair]) -> Self {
        Self {
            epoch,
            keys: keys.iter().map(|k| k.public_entry()).collect(),
        }
    }

    pub fn public_key(&self, id: KeyId) -> Option<[u8; 32]> {
        self.keys
            .iter()
            .find(|k| k.key_id == id)
            .map(|k| k.public_key)
    }

    pub fn contains(&self, id: KeyId) -> bool {
        self.public_key(id).is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_finds_exactly_the_bad_signatures_and_checks_what_open_checks() {
        let keys: Vec<KeyPair> = (0..8u8).map(|i| KeyPair::from_seed(&[i + 1; 32])).collect();
        let mut envelopes: Vec<SignedEnvelope> = keys
            .iter()
            .enumerate()
            .map(|(i, k)| codec::decode(&seal(Domain::Report, &(i as u32), &[k])).unwrap())
            .collect();
        let check = |e: &SignedEnvelope, k: &KeyPair| {
            signature_check(e, Domain::Report, k.id(), &k.public_key())
        };
        let checks: Vec<SignatureCheck> = envelopes
            .iter()
            .zip(&keys)
            .map(|(e, k)| check(e, k).unwrap())
            .collect();
        assert!(verify_checks(&checks).iter().all(Result::is_ok));
        // Tamper with two payloads: the batch fails and exactly those two are found.
        for i in [2, 5] {
            envelopes[i].payload = codec::encode(&999u32);
        }
        let checks: Vec<SignatureCheck> = envelopes
            .iter()
            .zip(&keys)
            .map(|(e, k)| check(e, k).unwrap())
            .collect();
        let bad: Vec<usize> = verify_checks(&checks)
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_err())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(bad, vec![2, 5]);
        // What open_envelope refuses before any signature math.
        let e = &envelopes[0];
        assert!(matches!(
            signature_check(e, Domain::Ack, keys[0].id(), &keys[0].public_key()),
            Err(OpenError::WrongDomain { .. })
        ));
        assert!(matches!(check(e, &keys[1]), Err(OpenError::UnknownKey(_))));
        let mut unsigned = e.clone();
        unsigned.signatures.clear();
        assert!(matches!(
            check(&unsigned, &keys[0]),
            Err(OpenError::NoSignature)
        ));
        // A small-order public key (the identity point) is refused outright.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(matches!(
            signature_check(e, Domain::Report, keys[0].id(), &identity),
            Err(OpenError::BadSignature(_))
        ));
    }

    #[test]
    fn a_signature_for_one_domain_does_not_verify_under_another() {
        let k = KeyPair::from_seed(&[7; 32]);
        let payload = codec::encode(&42u32);
        let entry = k.sign_entry(Domain::Report, &payload);
        assert!(verify_entry(Domain::Report, &payload, &entry, &k.public_key()).is_ok());
        for other in [
            Domain::Instruction,
            Domain::Rotation,
            Domain::Ack,
            Domain::Enroll,
            Domain::Assignment,
        ] {
            assert_eq!(
                verify_entry(other, &payload, &entry, &k.public_key()),
                Err(OpenError::BadSignature(k.id()))
            );
        }
    }

    #[test]
    fn domain_tags_are_distinct_and_none_is_a_prefix_of_another() {
        let all = [
            Domain::Instruction,
            Domain::Report,
            Domain::Rotation,
            Domain::Ack,
            Domain::Enroll,
            Domain::AppRequest,
            Domain::RequestAnswer,
            Domain::Assignment,
        ];
        for a in all {
            for b in all {
                if a != b {
                    assert!(!a.tag().starts_with(b.tag()), "{a:?} vs {b:?}");
                }
            }
        }
    }

    fn enroll_request(key: &KeyPair) -> EnrollRequest {
        EnrollRequest {
            device: crate::DeviceId::new("r1").unwrap(),
            public_key: key.public_key(),
            token: "ab".repeat(32),
        }
    }

    #[test]
    fn an_enrolment_request_opens_only_when_signed_by_the_key_it_enrols() {
        let k = KeyPair::from_seed(&[3; 32]);
        let req = enroll_request(&k);
        assert_eq!(open_enroll(&seal_enroll(&req, &k)), Ok(req.clone()));
        // Someone else's key on the request: no proof of possession.
        let other = KeyPair::from_seed(&[4; 32]);
        assert_eq!(
            open_enroll(&seal_enroll(&req, &other)),
            Err(OpenError::UnknownKey(other.id()))
        );
        // The right key, the wrong domain.
        let as_report = seal(Domain::Report, &req, &[&k]);
        assert!(matches!(
            open_enroll(&as_report),
            Err(OpenError::WrongDomain { .. })
        ));
        // A report-domain signature relabelled as an enrolment does not verify.
        let mut env: SignedEnvelope = codec::decode(&as_report).unwrap();
        env.domain = Domain::Enroll;
        assert_eq!(
            open_enroll(&codec::encode(&env)),
            Err(OpenError::BadSignature(k.id()))
        );
        // Unsigned, or the bare request without an envelope.
        env.signatures.clear();
        assert_eq!(
            open_enroll(&codec::encode(&env)),
            Err(OpenError::NoSignature)
        );
        assert!(open_enroll(&codec::encode(&req)).is_err());
    }

    #[test]
    fn enrolment_requests_are_capped() {
        let k = KeyPair::from_seed(&[3; 32]);
        let mut req = enroll_request(&k);
        req.token = "x".repeat(MAX_ENROLL_TOKEN_LEN + 1);
        assert!(matches!(
            open_enroll(&seal_enroll(&req, &k)),
            Err(OpenError::Payload(_))
        ));
        req.token.clear();
        assert!(matches!(
            open_enroll(&seal_enroll(&req, &k)),
            Err(OpenError::Payload(_))
        ));
        req.token = "x".repeat(2 * MAX_ENROLL_BYTES);
        assert!(matches!(
            open_enroll(&seal_enroll(&req, &k)),
            Err(OpenError::Envelope(DecodeError::Oversize { .. }))
        ));
    }

    #[test]
    fn debug_never_prints_the_secret() {
        let k = KeyPair::from_seed(&[0xAB; 32]);
        let shown = format!("{k:?}");
        assert!(!shown.to_lowercase().contains("abab"), "{shown}");
    }
}
