//! Which crypto shard suits this CPU: AES-256-GCM where the CPU has AES (and
//! carry-less multiply) instructions, ChaCha20-Poly1305 where it has not. The
//! daemon reports [`aes_hw`] in `DeviceResources::aes_hw`; the allocator
//! picks the primary and keeps the other as the alternative.
#![forbid(unsafe_code)]

/// The CPU has AES instructions usable by AES-GCM.
pub fn aes_hw() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// (primary, alternative) crypto shard ids for this CPU.
pub fn preferred_crypto() -> (&'static str, &'static str) {
    if aes_hw() {
        ("crypto-aes256gcm", "crypto-chacha20poly1305")
    } else {
        ("crypto-chacha20poly1305", "crypto-aes256gcm")
    }
}
