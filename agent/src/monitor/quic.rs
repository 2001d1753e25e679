//! The server name in a QUIC client Initial packet (QUIC v1, RFC 9000/9001,
//! and v2, RFC 9369).
//!
//! Initial packets are encrypted, but with keys derived from the packet's
//! own destination connection id and a salt published in the RFC (§5.2 of
//! RFC 9001): they protect against tampering, not against reading. So the
//! monitor can do what every middlebox does: remove header protection,
//! decrypt the payload with AES-128-GCM, gather the CRYPTO frames at the
//! start of the TLS stream and read the ClientHello's SNI — the same name a
//! TLS-over-TCP flow gives away in clear, which is why YouTube over QUIC can
//! be streaming rather than web.
//!
//! Bounded: one packet, at most [`MAX_CRYPTO`] bytes of handshake gathered,
//! every length checked against the captured bytes. A ClientHello whose SNI
//! lies beyond the first Initial packet (large post-quantum key shares can
//! push it into a second) is not recognised; the flow keeps its port class.

use ring::aead::quic::{HeaderProtectionKey, AES_128};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use ring::hkdf::{KeyType, Prk, Salt, HKDF_SHA256};

/// Most handshake bytes gathered from one packet's CRYPTO frames (a
/// ClientHello's SNI sits well within its first kilobytes).
pub const MAX_CRYPTO: usize = 4096;

const VERSION_1: u32 = 0x0000_0001;
const VERSION_2: u32 = 0x6b33_43cf;
const SALT_V1: [u8; 20] = [
    0x38, 0x76, 0x2c, 0xf7, 0xf5, 0x59, 0x34, 0xb3, 0x4d, 0x17, 0x9a, 0xe6, 0xa4, 0xc8, 0x0c, 0xad,
    0xcc, 0xbb, 0x7f, 0x0a,
];
const SALT_V2: [u8; 20] = [
    0x0d, 0xed, 0xe3, 0xde, 0xf7, 0x00, 0xa6, 0xdb, 0x81, 0x93, 0x81, 0xbe, 0x6e, 0x26, 0x9d, 0xcb,
    0xf9, 0xbd, 0x2e, 0xd9,
];

/// Whether `payload` starts like a QUIC long-header packet of a version we
/// read (cheap: decides whether [`initial_sni`] is worth calling).
pub fn looks_like_initial(payload: &[u8]) -> bool {
    let Some(&first) = payload.first() else {
        return false;
    };
    if first & 0xc0 != 0xc0 || payload.len() < 1200 {
        // Clients pad every Initial to at least 1200 bytes (RFC 9000 §14.1).
        return false;
    }
    let version = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    let packet_type = (first >> 4) & 0x3;
    matches!((version, packet_type), (VERSION_1, 0) | (VERSION_2, 1))
}

/// The SNI of the ClientHello in the client Initial packet at the start of
/// the UDP `payload`, if it can be read from this one packet.
pub fn initial_sni(payload: &[u8]) -> Option<String> {
    if !looks_like_initial(payload) {
        return None;
    }
    let version = u32::from_be_bytes([payload[1], payload[2], payload[3], payload[4]]);
    let mut at = 5;
    let dcid_len = usize::from(*payload.get(at)?);
    if dcid_len > 20 {
        return None;
    }
    let dcid = payload.get(at + 1..at + 1 + dcid_len)?;
    at += 1 + dcid_len;
    let scid_len = usize::from(*payload.get(at)?);
    if scid_len > 20 {
        return None;
    }
    at += 1 + scid_len;
    let (token_len, n) = varint(payload.get(at..)?)?;
    at = at
        .checked_add(n)?
        .checked_add(usize::try_from(token_len).ok()?)?;
    let (length, n) = varint(payload.get(at..)?)?;
    at += n;
    let pn_offset = at;
    let end = pn_offset.checked_add(usize::try_from(length).ok()?)?;
    if end > payload.len() || length < 20 {
        return None;
    }

    let keys = InitialKeys::client(version, dcid)?;
    // Header protection: a 16-byte sample 4 bytes past the packet number's start.
    let sample = payload.get(pn_offset + 4..pn_offset + 20)?;
    let mask = keys.hp.new_mask(sample).ok()?;
    let first = payload[0] ^ (mask[0] & 0x0f);
    let pn_len = usize::from(first & 0x03) + 1;
    let mut header = payload.get(..pn_offset + pn_len)?.to_vec();
    header[0] = first;
    let mut pn = 0u64;
    for i in 0..pn_len {
        header[pn_offset + i] ^= mask[1 + i];
        pn = (pn << 8) | u64::from(header[pn_offset + i]);
    }
    let mut nonce = keys.iv;
    for (i, b) in pn.to_be_bytes().iter().enumerate() {
        nonce[4 + i] ^= b;
    }
    let mut body = payload.get(pn_offset + pn_len..end)?.to_vec();
    let plain = keys
        .key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(&header[..]),
            &mut body,
        )
        .ok()?;
    let crypto = gather_crypto(plain)?;
    super::tls::handshake_sni(&crypto).map(str::to_owned)
}

/// The TLS stream from offset 0 as far as this packet's CRYPTO frames carry
/// it contiguously (clients may send the frames out of order).
fn gather_crypto(frames: &[u8]) -> Option<Vec<u8>> {
    let mut pieces: Vec<(usize, &[u8])> = Vec::new();
    let mut at = 0;
    while at < frames.len() {
        let (frame_type, n) = varint(&frames[at..])?;
        at += n;
        match frame_type {
            0x00 | 0x01 => {} // PADDING, PING
            0x02 | 0x03 => {
                // ACK: largest, delay, range count, first range; then two
                // varints per further range (and three ECN counts for 0x03).
                let mut ranges = 0;
                for field in 0..4 {
                    let (v, n) = varint(frames.get(at..)?)?;
                    at += n;
                    if field == 2 {
                        ranges = v;
                    }
                }
                // A client's first packet acknowledges nothing: a long list
                // is not an Initial we can read.
                let mut rest = usize::try_from(ranges).ok().filter(|&r| r <= 64)? * 2;
                if frame_type == 0x03 {
                    rest += 3;
                }
                for _ in 0..rest {
                    let (_, n) = varint(frames.get(at..)?)?;
                    at += n;
                }
            }
            0x06 => {
                let (offset, n) = varint(frames.get(at..)?)?;
                at += n;
                let (len, n) = varint(frames.get(at..)?)?;
                at += n;
                let len = usize::try_from(len).ok()?;
                let data = frames.get(at..at.checked_add(len)?)?;
                at += len;
                let offset = usize::try_from(offset).ok()?;
                if offset < MAX_CRYPTO {
                    pieces.push((offset, data));
                }
            }
            0x1c => {
                // CONNECTION_CLOSE: nothing to read here.
                return None;
            }
            _ => return None,
        }
    }
    pieces.sort_by_key(|p| p.0);
    let mut stream = Vec::new();
    for (offset, data) in pieces {
        if offset > stream.len() {
            break;
        }
        let skip = stream.len() - offset;
        if let Some(rest) = data.get(skip..) {
            let room = MAX_CRYPTO - stream.len();
            stream.extend_from_slice(&rest[..rest.len().min(room)]);
        }
    }
    (!stream.is_empty()).then_some(stream)
}

/// A QUIC variable-length integer and its length in bytes.
fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let first = *b.first()?;
    let len = 1usize << (first >> 6);
    let bytes = b.get(..len)?;
    let mut v = u64::from(first & 0x3f);
    for &x in &bytes[1..] {
        v = (v << 8) | u64::from(x);
    }
    Some((v, len))
}

struct InitialKeys {
    key: LessSafeKey,
    iv: [u8; 12],
    hp: HeaderProtectionKey,
}

/// An HKDF output length for ring's `expand`.
struct Len(usize);

impl KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// HKDF-Expand-Label of TLS 1.3 (RFC 8446 §7.1) with an empty context.
fn expand_label(prk: &Prk, label: &[u8], out: &mut [u8]) -> Option<()> {
    let len = u16::try_from(out.len()).ok()?.to_be_bytes();
    let full_len = [u8::try_from(6 + label.len()).ok()?];
    let info: [&[u8]; 5] = [&len, &full_len, b"tls13 ", label, &[0]];
    prk.expand(&info, Len(out.len())).ok()?.fill(out).ok()
}

impl InitialKeys {
    /// The client's Initial keys for a destination connection id.
    fn client(version: u32, dcid: &[u8]) -> Option<Self> {
        let (salt, key_label, iv_label, hp_label): (&[u8], &[u8], &[u8], &[u8]) = match version {
            VERSION_1 => (&SALT_V1, b"quic key", b"quic iv", b"quic hp"),
            VERSION_2 => (&SALT_V2, b"quicv2 key", b"quicv2 iv", b"quicv2 hp"),
            _ => return None,
        };
        let initial = Salt::new(HKDF_SHA256, salt).extract(dcid);
        let mut client_secret = [0u8; 32];
        expand_label(&initial, b"client in", &mut client_secret)?;
        let secret = Prk::new_less_safe(HKDF_SHA256, &client_secret);
        let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
        expand_label(&secret, key_label, &mut key)?;
        expand_label(&secret, iv_label, &mut iv)?;
        expand_label(&secret, hp_label, &mut hp)?;
        Some(Self {
            key: LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).ok()?),
            iv,
            hp: HeaderProtectionKey::new(&AES_128, &hp).ok()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_of_every_length() {
        assert_eq!(varint(&[0x25]), Some((37, 1)));
        assert_eq!(varint(&[0x7b, 0xbd]), Some((15_293, 2)));
        assert_eq!(varint(&[0x9d, 0x7f, 0x3e, 0x7d]), Some((494_878_333, 4)));
        assert_eq!(
            varint(&[0xc2, 0x19, 0x7c, 0x5e, 0xff, 0x14, 0xe8, 0x8c]),
            Some((151_288_809_941_952_652, 8))
        );
        assert_eq!(varint(&[0x7b]), None);
    }

    #[test]
    fn rfc9001_client_initial_secrets() {
        // RFC 9001 Appendix A.1: DCID 0x8394c8f03e515708.
        let dcid = [0x83, 0x94, 0xc8, 0xf0, 0x3e, 0x51, 0x57, 0x08];
        let initial = Salt::new(HKDF_SHA256, &SALT_V1).extract(&dcid);
        let mut client = [0u8; 32];
        expand_label(&initial, b"client in", &mut client).unwrap();
        assert_eq!(
            hex(&client),
            "c00cf151ca5be075ed0ebfb5c80323c42d6b7db67881289af4008f1f6c357aea"
        );
        let secret = Prk::new_less_safe(HKDF_SHA256, &client);
        let (mut key, mut iv, mut hp) = ([0u8; 16], [0u8; 12], [0u8; 16]);
        expand_label(&secret, b"quic key", &mut key).unwrap();
        expand_label(&secret, b"quic iv", &mut iv).unwrap();
        expand_label(&secret, b"quic hp", &mut hp).unwrap();
        assert_eq!(hex(&key), "1f369613dd76d5467730efcbe3b1a22d");
        assert_eq!(hex(&iv), "fa044b2f42a3fd3b46fb255c");
        assert_eq!(hex(&hp), "9f50449e04a0e810283a1e9933adedd2");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn garbage_never_panics_and_never_reads_a_name() {
        let mut x: u32 = 99;
        let mut buf = vec![0u8; 1400];
        for round in 0..2_000 {
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            // A plausible long header so the deeper paths run.
            buf[0] = 0xc3;
            buf[1..5].copy_from_slice(&1u32.to_be_bytes());
            buf[5] = (round % 24) as u8;
            let len = 1200 + (x as usize % 200);
            assert_eq!(initial_sni(&buf[..len]), None);
            let _ = gather_crypto(&buf[..(x as usize % 300)]);
        }
    }
}
