//! Secret shard configuration sealed to one device.
//!
//! A shard's secrets (a tunnel's pre-shared key, …) travel inside signed
//! instructions, which sit on the broker and in the allocator's logs. So the
//! allocator seals them to the device: a libsodium *sealed box* (X25519 with
//! an ephemeral key, XSalsa20-Poly1305) from the `crypto_box` crate, to the
//! X25519 form of the device's enrolled Ed25519 key — the same conversion
//! libsodium (`crypto_sign_ed25519_pk_to_curve25519`) and age's `ssh-ed25519`
//! recipients use, so the key agreed at enrolment is the only key there is:
//! nothing new to distribute, nothing to enrol twice.
//!
//! The sealed plaintext names the device and the shard it is for, so a box
//! copied into another activation (or another device's instruction, which
//! that device could not open anyway) is refused instead of configuring the
//! wrong shard. The instruction's signature already covers the box; the seal
//! adds only confidentiality.
//!
//! No randomness lives here: the caller passes the RNG (the service its
//! OS generator, tests a seeded one), as with key generation in [`crate::sign`].

use crate::codec::{self, DecodeError};
use crate::ids::{DeviceId, ShardRef};
use crate::sign::KeyPair;
use crypto_box::aead::rand_core::CryptoRngCore;
use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

/// Largest sealed configuration accepted, envelope overhead included.
pub const MAX_SEALED_CONFIG: usize = 4096;

/// What a sealed box holds. A wire type (golden-bytes test in `tests/golden.rs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedConfigBody {
    pub device: DeviceId,
    pub shard: ShardRef,
    /// `key = value` lines, appended to the shard's clear configuration.
    pub secret_config: Vec<u8>,
}

/// Why a secret configuration could not be sealed or opened. The messages
/// never contain the secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the device's public key is not a usable Ed25519 key")]
    BadDeviceKey,
    #[error("sealed configuration of {len} bytes exceeds the cap of {cap} bytes")]
    Oversize { len: usize, cap: usize },
    #[error("the sealed configuration does not open with this device's key (sealed to another key, or altered)")]
    DoesNotOpen,
    #[error("sealed configuration: {0}")]
    Body(DecodeError),
    #[error("the sealed configuration is for {device} / {shard}, not this activation")]
    WrongRecipient { device: String, shard: String },
}

fn box_public_key(device_public_key: &[u8; 32]) -> Result<crypto_box::PublicKey, SealError> {
    if !crate::sign::usable_public_key(device_public_key) {
        return Err(SealError::BadDeviceKey);
    }
    let key = VerifyingKey::from_bytes(device_public_key).map_err(|_| SealError::BadDeviceKey)?;
    Ok(crypto_box::PublicKey::from(key.to_montgomery()))
}

/// Seals `secret_config` for `shard` on `device`, whose enrolled Ed25519
/// public key is `device_public_key`.
pub fn seal_config(
    rng: &mut impl CryptoRngCore,
    device_public_key: &[u8; 32],
    device: &DeviceId,
    shard: &ShardRef,
    secret_config: &[u8],
) -> Result<Vec<u8>, SealError> {
    let public = box_public_key(device_public_key)?;
    let body = codec::encode(&SealedConfigBody {
        device: device.clone(),
        shard: shard.clone(),
        secret_config: secret_config.to_vec(),
    });
    // Sealing fails only for plaintexts beyond the cipher's limits (GiBs).
    let sealed = public.seal(rng, &body).map_err(|_| SealError::Oversize {
        len: body.len(),
        cap: MAX_SEALED_CONFIG,
    })?;
    if sealed.len() > MAX_SEALED_CONFIG {
        return Err(SealError::Oversize {
            len: sealed.len(),
            cap: MAX_SEALED_CONFIG,
        });
    }
    Ok(sealed)
}

/// Opens a sealed configuration with the device's own key and checks that
/// it was sealed for this device and shard. Returns the secret lines.
pub fn open_config(
    device_key: &KeyPair,
    device: &DeviceId,
    shard: &ShardRef,
    sealed: &[u8],
) -> Result<Vec<u8>, SealError> {
    if sealed.len() > MAX_SEALED_CONFIG {
        return Err(SealError::Oversize {
            len: sealed.len(),
            cap: MAX_SEALED_CONFIG,
        });
    }
    let secret = device_key.box_secret_key();
    let body = secret.unseal(sealed).map_err(|_| SealError::DoesNotOpen)?;
    let body: SealedConfigBody =
        codec::decode_capped(&body, MAX_SEALED_CONFIG).map_err(SealError::Body)?;
    if &body.device != device || &body.shard != shard {
        return Err(SealError::WrongRecipient {
            device: body.device.to_string(),
            shard: body.shard.to_string(),
        });
    }
    Ok(body.secret_config)
}
