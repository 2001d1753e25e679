//! The `crypto-aes256gcm` shard of the `vpn` capability: AES-256-GCM (fast with AES instructions).
//! Provides the `aead` service (see `shard_aead_session` for the nonce and
//! replay rules); its alternative provides the same service with another
//! cipher, so the tunnel keeps working when the allocator swaps them.
#![deny(unsafe_code)]

use aes_gcm::Aes256Gcm;
use shard_aead_session::Session;
use shardline_shard_sdk::{
    export_shard, kind, Host, ResourceCostV1, Shard, ShardError, ShardStatsV1,
};

/// The shard: one AEAD session.
#[derive(Debug)]
pub struct Crypto {
    session: Session<Aes256Gcm>,
}

impl Shard for Crypto {
    fn init(host: Host, _config: &[u8]) -> Result<Self, ShardError> {
        host.log(
            shardline_shard_sdk::level::INFO,
            "aes256gcm ready; waiting for session keys",
        );
        Ok(Self {
            session: Session::default(),
        })
    }

    fn call(&mut self, method: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        if method == shardline_shard_sdk::services::aead::CIPHER {
            out.extend_from_slice(b"aes256gcm");
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
        shard_aead_session::self_test::<super::Aes256Gcm>();
    }
}
