//! The `qos-dscp` shard of the `qos` capability: the `mark` service. For each
//! packet the forwarder (the `qos-shaper` shard) is about to send, it answers
//! the DSCP code point the packet is sent with: small packets (voice, games,
//! interactive: ≤ `small_bytes`, default 256) get `small_dscp` (default 46,
//! EF), the rest `bulk_dscp` (default 10, AF11). `dscp = N` marks everything N.
#![deny(unsafe_code)]

use shardline_shard_sdk::config::KeyValues;
use shardline_shard_sdk::services::mark;
use shardline_shard_sdk::{
    export_shard, kind, status, Host, ResourceCostV1, Shard, ShardError, ShardStatsV1,
};

/// The classification rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub small_bytes: usize,
    pub small_dscp: u8,
    pub bulk_dscp: u8,
}

impl Rule {
    pub fn from_config(kv: &KeyValues) -> Result<Self, ShardError> {
        let check = |v: u8| {
            if v < 64 {
                Ok(v)
            } else {
                Err(ShardError::invalid("config: a DSCP is 0..=63"))
            }
        };
        if let Some(all) = kv.get("dscp") {
            let v = check(
                all.parse()
                    .map_err(|_| ShardError::invalid("config: dscp"))?,
            )?;
            return Ok(Self {
                small_bytes: 0,
                small_dscp: v,
                bulk_dscp: v,
            });
        }
        Ok(Self {
            small_bytes: kv.get_or("small_bytes", 256usize)?,
            small_dscp: check(kv.get_or("small_dscp", 46u8)?)?,
            bulk_dscp: check(kv.get_or("bulk_dscp", 10u8)?)?,
        })
    }

    pub fn classify(&self, packet: &[u8]) -> u8 {
        if packet.len() <= self.small_bytes {
            self.small_dscp
        } else {
            self.bulk_dscp
        }
    }
}

#[derive(Debug)]
pub struct Dscp {
    rule: Rule,
    stats: ShardStatsV1,
}

impl Shard for Dscp {
    fn init(_host: Host, config: &[u8]) -> Result<Self, ShardError> {
        Ok(Self {
            rule: Rule::from_config(&KeyValues::parse(config)?)?,
            stats: ShardStatsV1::default(),
        })
    }

    fn call(&mut self, method: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        if method != mark::CLASSIFY {
            return Err(ShardError::new(
                status::NO_SUCH_SERVICE,
                "mark has no such method",
            ));
        }
        out.push(self.rule.classify(input));
        self.stats.packets_in += 1;
        self.stats.bytes_in += input.len() as u64;
        Ok(())
    }

    fn stats(&self) -> ShardStatsV1 {
        self.stats
    }
}

export_shard! {
    shard: Dscp,
    id: "qos-dscp",
    version: "0.1.0",
    capability: "qos",
    service: mark::SERVICE,
    kind: kind::COMPUTE,
    cost: ResourceCostV1 { cpu_permille: 10, memory_bytes: 1 << 20 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_packets_get_ef_bulk_gets_af11_and_bad_values_are_refused() {
        let r = Rule::from_config(&KeyValues::parse(b"").unwrap()).unwrap();
        assert_eq!(r.classify(&[0; 100]), 46);
        assert_eq!(r.classify(&[0; 1000]), 10);
        let all = Rule::from_config(&KeyValues::parse(b"dscp = 8").unwrap()).unwrap();
        assert_eq!(all.classify(&[0; 10]), 8);
        assert!(Rule::from_config(&KeyValues::parse(b"small_dscp = 64").unwrap()).is_err());
    }
}
