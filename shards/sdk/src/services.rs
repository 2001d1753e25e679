//! Service names and method numbers the first-catalog shards agree on, so a
//! tunnel can use whichever crypto shard the host loaded (they are
//! alternatives providing the same service).

/// Authenticated encryption of tunnel packets (`crypto-*` shards).
///
/// Keys are per direction; the shard owns the nonce counter and the replay
/// window, so a caller cannot reuse a nonce.
pub mod aead {
    pub const SERVICE: &str = "aead";
    /// Input: 32-byte send key then 32-byte receive key. Resets counters.
    pub const SET_KEYS: u32 = 1;
    /// Input: plaintext. Output: 8-byte little-endian counter, ciphertext, 16-byte tag.
    pub const SEAL: u32 = 2;
    /// Input: what SEAL produced on the peer. Output: plaintext. Replays fail
    /// with `status::AUTH_FAILED`.
    pub const OPEN: u32 = 3;
    /// Input: empty. Output: the cipher's name (e.g. `aes256gcm`); the tunnel
    /// exchanges it in the handshake so two ends with different crypto shards
    /// refuse each other with a clear error instead of failing every packet.
    pub const CIPHER: u32 = 4;
    /// Bytes SEAL adds (counter + tag).
    pub const OVERHEAD: usize = 8 + 16;
}

/// Pre-shared-key handshake (`auth-psk`).
pub mod auth {
    pub const SERVICE: &str = "auth";
    /// Initiator. Input: empty. Output: handshake message 1.
    pub const INITIATE: u32 = 1;
    /// Responder. Input: message 1. Output: message 2 (`MSG2_LEN` bytes) then
    /// 64 bytes of session keys (responder send key, responder receive key).
    pub const RESPOND: u32 = 2;
    /// Initiator. Input: message 2. Output: 64 bytes of session keys
    /// (initiator send key, initiator receive key).
    pub const FINISH: u32 = 3;
    /// Length of message 1.
    pub const MSG1_LEN: usize = 1 + 32 + 8 + 32;
    /// Length of message 2.
    pub const MSG2_LEN: usize = 1 + 32 + 32;
    pub const KEYS_LEN: usize = 64;
}

/// DSCP marking (`qos-dscp`).
pub mod mark {
    pub const SERVICE: &str = "mark";
    /// Input: the packet payload. Output: one byte, the DSCP code point (0–63).
    pub const CLASSIFY: u32 = 1;
}
