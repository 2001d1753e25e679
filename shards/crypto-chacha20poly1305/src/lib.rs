//! The `crypto-chacha20poly1305` shard of the `vpn` capability: ChaCha20-Poly1305 (fast without AES instructions).
//! Provides the `aead` service (see `shard_aead_session` for the nonce and
//! replay rules, and for the body every crypto shard shares); its
//! alternative provides the same service with another cipher, so the tunnel
//! keeps working when the allocator swaps them.
#![deny(unsafe_code)]

use shard_aead_session::{Cipher, CryptoShard};
use shardline_shard_sdk::{export_shard, kind, ResourceCostV1};

/// This shard's cipher.
#[derive(Debug)]
pub struct ChaCha20Poly1305Cipher;

impl Cipher for ChaCha20Poly1305Cipher {
    type Aead = chacha20poly1305::ChaCha20Poly1305;
    const NAME: &'static str = "chacha20poly1305";
}

/// The shard: one AEAD session.
pub type Crypto = CryptoShard<ChaCha20Poly1305Cipher>;

export_shard! {
    shard: Crypto,
    id: "crypto-chacha20poly1305",
    version: "0.1.0",
    capability: "vpn",
    service: shardline_shard_sdk::services::aead::SERVICE,
    kind: kind::COMPUTE,
    cost: ResourceCostV1 { cpu_permille: 150, memory_bytes: 2 << 20 },
}

#[cfg(test)]
mod tests {
    #[test]
    fn seals_opens_and_refuses_tamper_and_replay() {
        shard_aead_session::self_test::<chacha20poly1305::ChaCha20Poly1305>();
    }
}
