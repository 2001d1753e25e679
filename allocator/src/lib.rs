//! The Shardline allocator service as a library; the binaries are thin
//! wrappers. Decisions live in `shardline-allocator-core` (re-exported here as
//! [`policy`] and [`records`] for callers that only know this crate); this
//! crate holds the I/O around them.
//!
//! - [`service`]: broker, store, signer threads, MQTT, admin API, metrics
//!   export, systemd (`shardline-allocator run`, `shardctl`).
//! - [`simulate`]: the `simulate` command line around the core's fleet model.
#![forbid(unsafe_code)]

pub use shardline_allocator_core::{policy, records};

pub mod service;
pub mod simulate;
