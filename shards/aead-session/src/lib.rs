//! The `aead` service both crypto shards provide (see
//! `shardline_shard_sdk::services::aead`), generic over the cipher, so the
//! ChaCha20-Poly1305 and AES-256-GCM shards are true alternatives: same wire
//! format, same nonce discipline, same replay protection.
//!
//! - One key per direction (set by the tunnel after the auth handshake), so a
//!   nonce is never reused across directions.
//! - The nonce is `0u32 ‖ counter_le_u64`; the shard owns the send counter,
//!   so callers cannot reuse a nonce; the counter is sent in clear and is
//!   authenticated as associated data.
//! - Received counters pass a 64-packet sliding window (RFC 6479 style):
//!   replays and packets older than the window are refused.
#![forbid(unsafe_code)]

use aead::{AeadInPlace, KeyInit};
use shardline_shard_sdk::{services::aead as svc, status, Host, Shard, ShardError, ShardStatsV1};

const TAG_LEN: usize = 16;
const WINDOW: u64 = 64;

/// Sliding replay window over received counters.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    /// Highest counter accepted plus one (0 = none yet).
    top: u64,
    /// Bit i set = counter `top - 1 - i` seen.
    bits: u64,
}

impl ReplayWindow {
    pub fn check(&self, ctr: u64) -> bool {
        let n = ctr.wrapping_add(1);
        if n > self.top {
            return true;
        }
        let age = self.top - n;
        age < WINDOW && self.bits & (1 << age) == 0
    }

    pub fn mark(&mut self, ctr: u64) {
        let n = ctr.wrapping_add(1);
        if n > self.top {
            let shift = n - self.top;
            self.bits = if shift >= WINDOW {
                0
            } else {
                self.bits << shift
            };
            self.bits |= 1;
            self.top = n;
        } else {
            self.bits |= 1 << (self.top - n);
        }
    }
}

/// One crypto session (send and receive keys).
pub struct Session<C> {
    tx: Option<C>,
    rx: Option<C>,
    tx_ctr: u64,
    window: ReplayWindow,
    pub stats: ShardStatsV1,
}

impl<C> std::fmt::Debug for Session<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("keyed", &self.tx.is_some())
            .field("tx_ctr", &self.tx_ctr)
            .finish()
    }
}

impl<C> Default for Session<C> {
    fn default() -> Self {
        Self {
            tx: None,
            rx: None,
            tx_ctr: 0,
            window: ReplayWindow::default(),
            stats: ShardStatsV1::default(),
        }
    }
}

fn nonce(ctr: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&ctr.to_le_bytes());
    n
}

impl<C: AeadInPlace<NonceSize = aead::consts::U12> + KeyInit> Session<C> {
    /// Dispatches one `aead` service call.
    pub fn call(&mut self, method: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        match method {
            svc::SET_KEYS => self.set_keys(input),
            svc::SEAL => self.seal(input, out),
            svc::OPEN => self.open(input, out),
            _ => Err(ShardError::new(
                status::NO_SUCH_SERVICE,
                format!("aead has no method {method}"),
            )),
        }
    }

    pub fn set_keys(&mut self, input: &[u8]) -> Result<(), ShardError> {
        if input.len() != 64 {
            return Err(ShardError::invalid("SET_KEYS needs 64 bytes"));
        }
        let tx =
            C::new_from_slice(&input[..32]).map_err(|_| ShardError::invalid("bad key length"))?;
        let rx =
            C::new_from_slice(&input[32..]).map_err(|_| ShardError::invalid("bad key length"))?;
        *self = Self {
            tx: Some(tx),
            rx: Some(rx),
            stats: self.stats,
            ..Self::default()
        };
        Ok(())
    }

    pub fn seal(&mut self, plaintext: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        let Some(tx) = &self.tx else {
            return Err(ShardError::new(status::NOT_READY, "no session keys"));
        };
        if self.tx_ctr == u64::MAX {
            return Err(ShardError::new(
                status::NOT_READY,
                "send counter exhausted; rekey",
            ));
        }
        let ctr = self.tx_ctr;
        self.tx_ctr += 1;
        out.clear();
        out.reserve(plaintext.len() + svc::OVERHEAD);
        out.extend_from_slice(&ctr.to_le_bytes());
        out.extend_from_slice(plaintext);
        let (head, body) = out.split_at_mut(8);
        let tag = tx
            .encrypt_in_place_detached(aead::Nonce::<C>::from_slice(&nonce(ctr)), head, body)
            .map_err(|_| ShardError::new(status::ERROR, "encryption failed"))?;
        out.extend_from_slice(&tag);
        self.stats.packets_in += 1;
        self.stats.bytes_in += plaintext.len() as u64;
        Ok(())
    }

    pub fn open(&mut self, sealed: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        let Some(rx) = &self.rx else {
            return Err(ShardError::new(status::NOT_READY, "no session keys"));
        };
        if sealed.len() < svc::OVERHEAD {
            self.stats.errors += 1;
            return Err(ShardError::new(status::AUTH_FAILED, "packet too short"));
        }
        let ctr = u64::from_le_bytes(sealed[..8].try_into().expect("8 bytes"));
        if !self.window.check(ctr) {
            self.stats.dropped += 1;
            return Err(ShardError::new(status::AUTH_FAILED, "replayed or too old"));
        }
        let body_end = sealed.len() - TAG_LEN;
        out.clear();
        out.extend_from_slice(&sealed[8..body_end]);
        let tag = aead::Tag::<C>::from_slice(&sealed[body_end..]);
        if rx
            .decrypt_in_place_detached(
                aead::Nonce::<C>::from_slice(&nonce(ctr)),
                &sealed[..8],
                out,
                tag,
            )
            .is_err()
        {
            out.clear();
            self.stats.errors += 1;
            return Err(ShardError::new(
                status::AUTH_FAILED,
                "authentication failed",
            ));
        }
        self.window.mark(ctr);
        self.stats.packets_out += 1;
        self.stats.bytes_out += out.len() as u64;
        Ok(())
    }
}

/// A cipher a crypto shard can be built around: the crypto shard crates
/// differ only in this (their type, their name in `CIPHER` answers and logs).
pub trait Cipher: 'static {
    type Aead: AeadInPlace<NonceSize = aead::consts::U12> + KeyInit;
    /// What the shard answers to `aead::CIPHER`, e.g. `aes256gcm`.
    const NAME: &'static str;
}

/// The whole body of a crypto shard: one AEAD session with `C`'s cipher.
/// Each crypto shard crate is this type plus its `export_shard!`.
pub struct CryptoShard<C: Cipher> {
    session: Session<C::Aead>,
}

impl<C: Cipher> std::fmt::Debug for CryptoShard<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CryptoShard")
            .field("cipher", &C::NAME)
            .field("session", &self.session)
            .finish()
    }
}

impl<C: Cipher> Shard for CryptoShard<C> {
    fn init(host: Host, _config: &[u8]) -> Result<Self, ShardError> {
        host.log(
            shardline_shard_sdk::level::INFO,
            &format!("{} ready; waiting for session keys", C::NAME),
        );
        Ok(Self {
            session: Session::default(),
        })
    }

    fn call(&mut self, method: u32, input: &[u8], out: &mut Vec<u8>) -> Result<(), ShardError> {
        if method == svc::CIPHER {
            out.extend_from_slice(C::NAME.as_bytes());
            return Ok(());
        }
        self.session.call(method, input, out)
    }

    fn stats(&self) -> ShardStatsV1 {
        self.session.stats
    }
}

/// Tests any cipher: round trip, tamper, replay, reorder within the window.
pub fn self_test<C: AeadInPlace<NonceSize = aead::consts::U12> + KeyInit>() {
    let mut a = Session::<C>::default();
    let mut b = Session::<C>::default();
    let k1 = [1u8; 32];
    let k2 = [2u8; 32];
    a.set_keys(&[k1, k2].concat()).unwrap();
    b.set_keys(&[k2, k1].concat()).unwrap();
    let mut s1 = Vec::new();
    let mut s2 = Vec::new();
    let mut p = Vec::new();
    a.seal(b"hello world", &mut s1).unwrap();
    a.seal(b"second", &mut s2).unwrap();
    assert_eq!(s1.len(), 11 + svc::OVERHEAD);
    assert!(
        !s1.windows(5).any(|w| w == b"hello"),
        "plaintext visible in sealed packet"
    );
    b.open(&s2, &mut p).unwrap();
    assert_eq!(p, b"second");
    b.open(&s1, &mut p).unwrap();
    assert_eq!(
        p, b"hello world",
        "reordered packet within the window is accepted"
    );
    assert!(b.open(&s1, &mut p).is_err(), "replay accepted");
    let mut t = s2.clone();
    t[10] ^= 1;
    assert!(b.open(&t, &mut p).is_err(), "tampered packet accepted");
    let mut own = Vec::new();
    assert!(
        a.open(&s1, &mut own).is_err(),
        "a packet opened under the sender's own send key"
    );
    for _ in 0..100 {
        a.seal(b"x", &mut s1).unwrap();
    }
    b.open(&s1, &mut p).unwrap();
    a.seal(b"y", &mut s2).unwrap();
    let mut old = Session::<C>::default();
    old.set_keys(&[k2, k1].concat()).unwrap();
    assert!(old.open(&s2, &mut p).is_ok());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_window_refuses_repeats_and_too_old() {
        let mut w = ReplayWindow::default();
        for c in [0, 2, 1, 100] {
            assert!(w.check(c));
            w.mark(c);
        }
        assert!(!w.check(2));
        assert!(!w.check(100));
        assert!(!w.check(30), "older than the window");
        assert!(w.check(99));
    }
}
