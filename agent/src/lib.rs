//! The Shardline device agent as a library; `main.rs` is a thin binary over it.
//!
//! - [`monitor`]: packet capture, flow table, classification, QoS windows
//!   (`shardline-agent monitor`).
//! - [`shardhost`]: shard loading, sandboxed host processes, the capability
//!   host mode (`shardline-agent shards …`, `shardline-agent host`).
//! - [`daemon`]: configuration, MQTT link, outbox, capability manager, systemd
//!   integration (`shardline-agent run`, `check-config`).
//!
//! `unsafe` is denied crate-wide and allowed only in the modules at the FFI
//! and kernel boundary (shard loading, raw capture), each block with a
//! `// SAFETY:` comment.
#![deny(unsafe_code)]

pub mod daemon;
pub mod logging;
pub mod monitor;
pub mod shardhost;
