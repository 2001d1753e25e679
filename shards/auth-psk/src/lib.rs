//! The `auth-psk` shard of the `vpn` capability: a pre-shared-key handshake
//! that authenticates both tunnel ends and derives fresh session keys.
//!
//! ```text
//! msg1 (initiator → responder) = 0x01 ‖ Ni(32) ‖ t(8, ms LE) ‖ HMAC(Km, "msg1" ‖ Ni ‖ t)
//! msg2 (responder → initiator) = 0x02 ‖ Nr(32) ‖ HMAC(Km, "msg2" ‖ Ni ‖ Nr)
//! Km            = HKDF-SHA256(ikm = PSK, salt = "shardline-auth-psk-v1", info = "mac")
//! Ki→r ‖ Kr→i   = HKDF-SHA256(ikm = PSK, salt = Ni ‖ Nr, info = "shardline vpn session v1")
//! ```
//!
//! Replays: the responder refuses a msg1 whose timestamp is outside
//! `max_skew_ms` of its clock or whose `Ni` it has already answered (it
//! remembers nonces for twice the skew); the initiator accepts one msg2 per
//! msg1 it sent. Both nonces feed the keys, so a replayed exchange can never
//! reproduce keys an attacker saw used. Config: `psk` (hex, ≥ 16 bytes),
//! `max_skew_ms` (default 30000).
#![deny(unsafe_code)]

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use shardline_shard_sdk::config::{decode_hex, KeyValues};
use shardline_shard_sdk::services::auth as svc;
use shardline_shard_sdk::{
    export_shard, kind, status, Host, ResourceCostV1, Shard, ShardError, ShardStatsV1,
};
use std::collections::HashMap;

type HmacSha256 = Hmac<Sha256>;

/// Why a handshake message was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Malformed,
    BadMac,
    Stale,
    Replayed,
    NoPendingHandshake,
}

/// The handshake logic, free of the ABI (tests drive it directly). Time is
/// passed in (wall-clock ms), never read here.
pub struct PskAuth {
    psk: Vec<u8>,
    mac_key: [u8; 32],
    max_skew_ms: u64,
    seen: HashMap<[u8; 32], u64>,
    pending: Option<[u8; 32]>,
    pub stats: ShardStatsV1,
}

impl std::fmt::Debug for PskAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PskAuth")
            .field("seen", &self.seen.len())
            .finish_non_exhaustive()
    }
}

fn random32() -> Result<[u8; 32], ShardError> {
    let mut n = [0u8; 32];
    getrandom::getrandom(&mut n).map_err(|_| ShardError::new(status::ERROR, "no randomness"))?;
    Ok(n)
}

impl PskAuth {
    pub fn new(psk: &[u8], max_skew_ms: u64) -> Result<Self, ShardError> {
        if psk.len() < 16 {
            return Err(ShardError::invalid("psk must be at least 16 bytes"));
        }
        let mut mac_key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(b"shardline-auth-psk-v1"), psk)
            .expand(b"mac", &mut mac_key)
            .map_err(|_| ShardError::invalid("hkdf"))?;
        Ok(Self {
            psk: psk.to_vec(),
            mac_key,
            max_skew_ms,
            seen: HashMap::new(),
            pending: None,
            stats: ShardStatsV1::default(),
        })
    }

    fn mac(&self, label: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut m = <HmacSha256 as Mac>::new_from_slice(&self.mac_key).expect("any key length");
        m.update(label);
        for p in parts {
            m.update(p);
        }
        m
    }

    fn keys(&self, ni: &[u8], nr: &[u8]) -> [u8; 64] {
        let salt = [ni, nr].concat();
        let mut okm = [0u8; 64];
        Hkdf::<Sha256>::new(Some(&salt), &self.psk)
            .expand(b"shardline vpn session v1", &mut okm)
            .expect("64 bytes is a valid HKDF-SHA256 length");
        okm
    }

    /// Initiator: builds msg1 (replaces any pending handshake).
    pub fn initiate(&mut self, now_ms: u64) -> Result<Vec<u8>, ShardError> {
        let ni = random32()?;
        let t = now_ms.to_le_bytes();
        let tag = self.mac(b"msg1", &[&ni, &t]).finalize().into_bytes();
        self.pending = Some(ni);
        Ok([&[1u8][..], &ni, &t, &tag].concat())
    }

    /// Responder: checks msg1, returns msg2 and (send, receive) keys.
    pub fn respond(&mut self, msg1: &[u8], now_ms: u64) -> Result<(Vec<u8>, [u8; 64]), Refusal> {
        if msg1.len() != svc::MSG1_LEN || msg1[0] != 1 {
            return Err(Refusal::Malformed);
        }
        let ni: [u8; 32] = msg1[1..33].try_into().expect("32 bytes");
        let t_bytes = &msg1[33..41];
        let t = u64::from_le_bytes(t_bytes.try_into().expect("8 bytes"));
        self.mac(b"msg1", &[&ni, t_bytes])
            .verify_slice(&msg1[41..])
            .map_err(|_| Refusal::BadMac)?;
        if t.abs_diff(now_ms) > self.max_skew_ms {
            return Err(Refusal::Stale);
        }
        let keep = self.max_skew_ms.saturating_mul(2);
        self.seen
            .retain(|_, &mut seen_at| now_ms.saturating_sub(seen_at) <= keep);
        if self.seen.contains_key(&ni) {
            return Err(Refusal::Replayed);
        }
        self.seen.insert(ni, now_ms);
        let nr = random32().map_err(|_| Refusal::Malformed)?;
        let tag = self.mac(b"msg2", &[&ni, &nr]).finalize().into_bytes();
        let okm = self.keys(&ni, &nr);
        // Responder sends with Kr→i and receives with Ki→r.
        let mut keys = [0u8; 64];
        keys[..32].copy_from_slice(&okm[32..]);
        keys[32..].copy_from_slice(&okm[..32]);
        Ok(([&[2u8][..], &nr, &tag].concat(), keys))
    }

    /// Initiator: checks msg2 against the pending msg1, returns (send, receive) keys.
    pub fn finish(&mut self, msg2: &[u8]) -> Result<[u8; 64], Refusal> {
        if msg2.len() != svc::MSG2_LEN || msg2[0] != 2 {
            return Err(Refusal::Malformed);
        }
        let ni = self.pending.ok_or(Refusal::NoPendingHandshake)?;
        let nr = &msg2[1..33];
        self.mac(b"msg2", &[&ni, nr])
            .verify_slice(&msg2[33..])
            .map_err(|_| Refusal::BadMac)?;
        self.pending = None;
        Ok(self.keys(&ni, nr))
    }
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The shard: the `auth` service over [`PskAuth`].
#[derive(Debug)]
pub struct AuthShard {
    auth: PskAuth,
    host: Host,
}

impl Shard for AuthShard {
    fn init(host: Host, config: &[u8]) -> Result<Self, ShardError> {
        let kv = KeyValues::parse(config)?;
        let psk = decode_hex(&kv.require::<String>("psk")?)?;
        Ok(Self {
            auth: PskAuth::new(&psk, kv.get_or("max_skew_ms", 30_000u64)?)?,
            host,
        })
    }

    fn call(&mut self, method: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        let refused =
            |r: Refusal| ShardError::new(status::AUTH_FAILED, format!("handshake refused: {r:?}"));
        let result = match method {
            svc::INITIATE => self
                .auth
                .initiate(wall_ms())
                .map(|m| out.extend_from_slice(&m)),
            svc::RESPOND => self
                .auth
                .respond(input, wall_ms())
                .map_err(refused)
                .map(|(m, k)| {
                    out.extend_from_slice(&m);
                    out.extend_from_slice(&k);
                }),
            svc::FINISH => self
                .auth
                .finish(input)
                .map_err(refused)
                .map(|k| out.extend_from_slice(&k)),
            _ => Err(ShardError::new(
                status::NO_SUCH_SERVICE,
                "auth has no such method",
            )),
        };
        match &result {
            Ok(()) if method != svc::INITIATE => self.auth.stats.packets_out += 1,
            Ok(()) => self.auth.stats.packets_in += 1,
            Err(e) => {
                self.auth.stats.errors += 1;
                self.host.log(shardline_shard_sdk::level::WARN, &e.reason);
            }
        }
        result
    }

    fn stats(&self) -> ShardStatsV1 {
        self.auth.stats
    }
}

export_shard! {
    shard: AuthShard,
    id: "auth-psk",
    version: "0.1.0",
    capability: "vpn",
    service: svc::SERVICE,
    kind: kind::COMPUTE,
    cost: ResourceCostV1 { cpu_permille: 5, memory_bytes: 1 << 20 },
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSK: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn handshake_derives_matching_crossed_keys() {
        let (mut i, mut r) = (
            PskAuth::new(PSK, 30_000).unwrap(),
            PskAuth::new(PSK, 30_000).unwrap(),
        );
        let m1 = i.initiate(1_000).unwrap();
        let (m2, rk) = r.respond(&m1, 1_500).unwrap();
        let ik = i.finish(&m2).unwrap();
        assert_eq!(
            ik[..32],
            rk[32..],
            "initiator send key = responder receive key"
        );
        assert_eq!(ik[32..], rk[..32]);
        assert_ne!(ik[..32], ik[32..], "directions use different keys");
        let m1b = i.initiate(2_000).unwrap();
        let (m2b, _) = r.respond(&m1b, 2_000).unwrap();
        assert_ne!(
            i.finish(&m2b).unwrap(),
            ik,
            "a new handshake gives new keys"
        );
    }

    #[test]
    fn replays_stale_tampered_and_wrong_psk_are_refused() {
        let (mut i, mut r) = (
            PskAuth::new(PSK, 30_000).unwrap(),
            PskAuth::new(PSK, 30_000).unwrap(),
        );
        let m1 = i.initiate(1_000).unwrap();
        let (m2, _) = r.respond(&m1, 1_000).unwrap();
        assert_eq!(r.respond(&m1, 2_000).unwrap_err(), Refusal::Replayed);
        i.finish(&m2).unwrap();
        assert_eq!(
            i.finish(&m2).unwrap_err(),
            Refusal::NoPendingHandshake,
            "replayed msg2 accepted"
        );
        let old = i.initiate(1_000).unwrap();
        assert_eq!(r.respond(&old, 100_000).unwrap_err(), Refusal::Stale);
        let mut bad = i.initiate(5_000).unwrap();
        bad[5] ^= 1;
        assert_eq!(r.respond(&bad, 5_000).unwrap_err(), Refusal::BadMac);
        let mut other = PskAuth::new(b"another psk of sixteen+", 30_000).unwrap();
        let m1 = i.initiate(6_000).unwrap();
        assert_eq!(other.respond(&m1, 6_000).unwrap_err(), Refusal::BadMac);
        assert!(PskAuth::new(b"short", 1).is_err());
    }
}
