//! The agent ⇄ shard-host protocol over a `SOCK_SEQPACKET` socketpair.
//!
//! One datagram is one message, so there is no framing to get out of sync.
//! A message is [`FRAME_TAG`] followed by a postcard body, except the fixed
//! fatal-signal datagram written from a signal handler (see `sys`). Decoding
//! never panics: a malformed datagram is an error the agent counts against
//! the host, never trusts.
#![forbid(unsafe_code)]

use super::loader::ShardInfo;
use serde::{Deserialize, Serialize};
use shardline_shard_sdk::ShardStatsV1;
use shardline_shared::msg::ResourceLimits;
use shardline_shared::ShardRef;
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;

/// First byte of a postcard message datagram.
pub const FRAME_TAG: u8 = 0x01;
/// Largest datagram either side sends.
pub const MAX_DATAGRAM: usize = 64 * 1024;

/// What the host needs to start: sent once, after the agent has placed the
/// host in its cgroup, so limits are in force before anything is loaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostSetup {
    pub capability: String,
    pub limits: ResourceLimits,
    pub heartbeat_ms: u32,
    pub shard_dir: PathBuf,
    /// uid besides root allowed to own shard libraries (the agent's).
    pub agent_uid: u32,
    /// Which per-host sandbox identity to take (see `sandbox::SandboxPlan`).
    pub sandbox_slot: u32,
    pub shards: Vec<HostShard>,
}

/// One shard to verify, load and initialise. `config` may hold secret lines
/// (opened from the sealed configuration): `Debug` leaves it out, and it is
/// zeroed when dropped.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct HostShard {
    pub shard: ShardRef,
    pub path: PathBuf,
    pub sha256: [u8; 32],
    pub config: Vec<u8>,
    /// Keys of the secret lines in `config`: the host redacts their values
    /// from whatever a shard logs or reports.
    pub secret_keys: Vec<String>,
}

impl std::fmt::Debug for HostShard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostShard")
            .field("shard", &self.shard)
            .field("path", &self.path)
            .field("config", &format_args!("[{} bytes]", self.config.len()))
            .field("secret_keys", &self.secret_keys)
            .finish_non_exhaustive()
    }
}

impl Drop for HostShard {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.config);
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToHost {
    Setup(HostSetup),
    /// Destroy the shards and exit 0.
    Stop,
}

/// Per-shard counters (mirror of [`ShardStatsV1`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsWire {
    pub packets_in: u64,
    pub packets_out: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub dropped: u64,
    pub errors: u64,
}

impl From<ShardStatsV1> for StatsWire {
    fn from(s: ShardStatsV1) -> Self {
        Self {
            packets_in: s.packets_in,
            packets_out: s.packets_out,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            dropped: s.dropped,
            errors: s.errors,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FromHost {
    /// Shard `index` passed every check and its descriptor reads `info`.
    Loaded { index: u32, info: ShardInfo },
    /// Shard `index` was refused; nothing of the capability runs.
    LoadRefused { index: u32, reason: String },
    /// Shard `index`'s `init` returned `status` (refused its
    /// configuration); `reason` is what the shard said (secret values
    /// redacted); the host exits.
    InitFailed {
        index: u32,
        status: i32,
        reason: String,
    },
    /// All shards are initialised; the loop runs.
    Running,
    Heartbeat {
        seq: u64,
        stats: Vec<StatsWire>,
        /// Calls into each shard that returned an error status since start.
        errors: Vec<u32>,
    },
    /// The loop has made no progress for a while, inside shard `index`.
    Stuck { index: u32 },
    /// Shard `index` returned a fatal status (a caught panic); the host exits.
    ShardFailed { index: u32, status: i32 },
    /// Raw datagram from the fatal-signal handler (decoded, never sent as postcard).
    Fatal { index: Option<u32>, signal: i32 },
    /// The sandbox could not be set up; nothing was loaded and the host exits.
    SandboxFailed { reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    #[error("ipc socket: {0}")]
    Sys(#[from] nix::Error),
    #[error("ipc message malformed: {0}")]
    Malformed(String),
    #[error("ipc message of {0} bytes exceeds the cap")]
    TooLarge(usize),
    #[error("ipc peer closed the socket")]
    Closed,
}

/// A connected seqpacket socketpair: (agent end, host end), both close-on-exec.
pub fn socketpair() -> nix::Result<(OwnedFd, OwnedFd)> {
    use nix::sys::socket::{socketpair, AddressFamily, SockFlag, SockType};
    socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, IpcError> {
    let mut out = vec![FRAME_TAG];
    let body = postcard::to_stdvec(msg).map_err(|e| IpcError::Malformed(e.to_string()))?;
    out.extend_from_slice(&body);
    if out.len() > MAX_DATAGRAM {
        return Err(IpcError::TooLarge(out.len()));
    }
    Ok(out)
}

pub fn send<T: Serialize>(fd: BorrowedFd<'_>, msg: &T) -> Result<(), IpcError> {
    let mut bytes = encode(msg)?;
    let sent = nix::sys::socket::send(
        fd.as_raw_fd(),
        &bytes,
        nix::sys::socket::MsgFlags::MSG_NOSIGNAL,
    );
    // The setup carries opened secrets: no copy of it outlives the send.
    zeroize::Zeroize::zeroize(&mut bytes);
    sent?;
    Ok(())
}

/// Decodes a host datagram (postcard frame or fatal-signal datagram).
pub fn decode_from_host(buf: &[u8]) -> Result<FromHost, IpcError> {
    match buf.first() {
        Some(&super::sys::FATAL_TAG) if buf.len() == super::sys::FATAL_LEN => {
            let idx = u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]);
            let signal = i32::from_le_bytes([buf[5], buf[6], buf[7], buf[8]]);
            Ok(FromHost::Fatal {
                index: (idx != super::sys::NO_SHARD).then_some(idx),
                signal,
            })
        }
        Some(&FRAME_TAG) => decode_body(&buf[1..]),
        _ => Err(IpcError::Malformed("unknown frame tag".into())),
    }
}

pub fn decode_to_host(buf: &[u8]) -> Result<ToHost, IpcError> {
    match buf.first() {
        Some(&FRAME_TAG) => decode_body(&buf[1..]),
        _ => Err(IpcError::Malformed("unknown frame tag".into())),
    }
}

fn decode_body<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, IpcError> {
    let (msg, rest) =
        postcard::take_from_bytes(body).map_err(|e| IpcError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(IpcError::Malformed("trailing bytes".into()));
    }
    Ok(msg)
}

/// Receives one datagram; `Ok(None)` when `nonblocking` and nothing is queued.
pub fn recv(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    nonblocking: bool,
) -> Result<Option<usize>, IpcError> {
    use nix::sys::socket::MsgFlags;
    let flags = if nonblocking {
        MsgFlags::MSG_DONTWAIT
    } else {
        MsgFlags::empty()
    };
    loop {
        match nix::sys::socket::recv(fd.as_raw_fd(), buf, flags) {
            Ok(0) => return Err(IpcError::Closed),
            Ok(n) => return Ok(Some(n)),
            Err(nix::Error::EAGAIN) => return Ok(None),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_garbage_is_an_error() {
        let msg = FromHost::Heartbeat {
            seq: 7,
            stats: vec![StatsWire {
                packets_in: 3,
                ..Default::default()
            }],
            errors: vec![1],
        };
        let bytes = encode(&msg).unwrap();
        assert_eq!(decode_from_host(&bytes).unwrap(), msg);
        let mut trailing = bytes.clone();
        trailing.push(0);
        assert!(decode_from_host(&trailing).is_err());
        assert!(decode_from_host(&[]).is_err());
        assert!(decode_from_host(&[0x77, 1, 2]).is_err());
        let mut fatal = [0u8; super::super::sys::FATAL_LEN];
        fatal[0] = super::super::sys::FATAL_TAG;
        fatal[1..5].copy_from_slice(&2u32.to_le_bytes());
        fatal[5..9].copy_from_slice(&11i32.to_le_bytes());
        assert_eq!(
            decode_from_host(&fatal).unwrap(),
            FromHost::Fatal {
                index: Some(2),
                signal: 11
            }
        );
    }
}
