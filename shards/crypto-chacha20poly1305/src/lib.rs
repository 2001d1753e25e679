//! The `crypto-chacha20poly1305` shard of the `vpn` capability: ChaCha20-Poly1305 (fast without AES instructions).
//! Provides the `aead` service (see `shard_aead_session` for the nonce and
//! replay rules); its alternative provides the same service with another
//! cipher, so the tunnel keeps working when the allocator swaps them.
#![deny(unsafe_code)]

use chacha20poly1305::ChaCha20Poly1305;
use shard_aead_session::Session;
use shardline_shard_sdk::{
    export_shard, kind, Host, ResourceCostV1, Shard, ShardError, ShardStatsV1,
};

/// The shard: one AEAD session.
#[derive(Debug)]
pub struct Crypto {
    session: Session<ChaCha20Poly1305>,
}

impl Shard for Crypto {
    fn init(host: Host, _config: &[u8]) -> Result<Self, ShardError> {
        host.log(
            shardline_shard_sdk::level::INFO,
            "chacha20poly1305 ready; waiting for session keys",
        );
        Ok(Self {
            session: Session::default(),
        })
    }

    fn call(&mut self, method: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        if method == shardline_shard_sdk::services::aead::CIPHER {
            out.extend_from_slice(b"chacha20poly1305");
            return Ok(());
        }
        self.session.call(method, input, out)
    }

    fn stats(&self) -> ShardStatsV1 {
        self.session.stats
    }
}

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
        shard_aead_session::self_test::<super::ChaCha20Poly1305>();
    }
}
