//! The `crypto-aes256gcm` shard of the `vpn` capability: AES-256-GCM (fast with AES instructions).
//! Provides the `aead` service (see `shard_aead_session` for the nonce and
//! replay rules, and for the body every crypto shard shares); its
//! alternative provides the same service with another cipher, so the tunnel
//! keeps working when the allocator swaps them.
#![deny(unsafe_code)]

use shard_aead_session::{Cipher, CryptoShard};
use shardline_shard_sdk::{export_shard, kind, ResourceCostV1};

/// This shard's cipher.
#[derive(Debug)]
pub struct Aes256GcmCipher;

impl Cipher for Aes256GcmCipher {
    type Aead = aes_gcm::Aes256Gcm;
    const NAME: &'static str = "aes256gcm";
}

/// The shard: one AEAD session.
pub type Crypto = CryptoShard<Aes256GcmCipher>;

export_shard! {
    shard: Crypto,
    id: "crypto-aes256gcm",
    version: "0.1.0",
    capability: "vpn",
    service: shardline_shard_sdk::services::aead::SERVICE,
    kind: kind::COMPUTE,
    cost: ResourceCostV1 { cpu_permille: 100, memory_bytes: 2 << 20 },
}

#[cfg(test)]
mod tests {
    #[test]
    fn seals_opens_and_refuses_tamper_and_replay() {
        shard_aead_session::self_test::<aes_gcm::Aes256Gcm>();
    }
}
