//! Framing shared by every payload: one format-version byte, then the postcard
//! encoding of the message, nothing after it.
//!
//! The size cap is checked before any decoding work so that a hostile peer
//! cannot make us allocate or parse more than the cap allows. Decoding never
//! panics: every failure is a [`DecodeError`].

use serde::{de::DeserializeOwned, Serialize};

/// The only format version this build speaks. A new incompatible encoding gets
/// a new byte; old peers reject it with [`DecodeError::UnknownVersion`] instead
/// of misreading it.
pub const FORMAT_VERSION: u8 = 1;

/// Upper bound for any single payload on the wire (reports are the largest).
pub const MAX_PAYLOAD: usize = 256 * 1024;

/// Why bytes could not be turned into a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("payload is empty")]
    Empty,
    #[error("payload of {len} bytes exceeds the cap of {cap} bytes")]
    Oversize { len: usize, cap: usize },
    #[error("unknown format version {0} (this build speaks {FORMAT_VERSION})")]
    UnknownVersion(u8),
    #[error("malformed payload: {0}")]
    Malformed(String),
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// A signed envelope with more signatures than any signer makes
    /// (`sign::MAX_SIGNATURES`): refused before any is verified.
    #[error("{count} signatures on one envelope; at most {max} are accepted")]
    TooManySignatures { count: usize, max: usize },
}

/// Encodes `msg` as `[FORMAT_VERSION] ++ postcard(msg)`.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    let mut out = vec![FORMAT_VERSION];
    // postcard only fails on types serde cannot describe (maps with non-string
    // keys are fine, unsized sequences are not); none of our types are such.
    out.extend(postcard::to_stdvec(msg).expect("wire types are always serializable"));
    out
}

/// Decodes a framed payload with the default cap [`MAX_PAYLOAD`].
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    decode_capped(bytes, MAX_PAYLOAD)
}

/// Decodes a framed payload, refusing anything longer than `cap` bytes before
/// looking at it.
pub fn decode_capped<T: DeserializeOwned>(bytes: &[u8], cap: usize) -> Result<T, DecodeError> {
    if bytes.len() > cap {
        return Err(DecodeError::Oversize {
            len: bytes.len(),
            cap,
        });
    }
    let (&version, body) = bytes.split_first().ok_or(DecodeError::Empty)?;
    if version != FORMAT_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let (msg, rest) =
        postcard::take_from_bytes::<T>(body).map_err(|e| DecodeError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(DecodeError::TrailingBytes(rest.len()));
    }
    Ok(msg)
}

/// Decodes a framed payload; if it is malformed, decodes it again with
/// `tail` appended: the encoding of the fields a newer layout added at its
/// end, so a message of an older peer reads with them empty. The cap
/// applies to the bytes received; the first error is the one returned.
pub fn decode_or_padded<T: DeserializeOwned>(
    bytes: &[u8],
    cap: usize,
    tail: &[u8],
) -> Result<T, DecodeError> {
    match decode_capped(bytes, cap) {
        Err(first @ DecodeError::Malformed(_)) => {
            let padded = [bytes, tail].concat();
            decode_capped(&padded, cap.saturating_add(tail.len())).map_err(|_| first)
        }
        other => other,
    }
}
