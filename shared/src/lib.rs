//! The Shardline wire protocol: everything that crosses the network between a
//! device (`shardline-agent`) and the cloud (`shardline-allocator`).
//!
//! This crate is pure: no sockets, no tokio, no files, no clock. Callers pass
//! `now` in. That keeps the contract testable byte for byte (golden tests) and
//! lets both daemons, the fuzz targets and the simulations share it.
//!
//! - [`codec`]: the framing every payload uses (format-version byte, size cap,
//!   postcard, no trailing bytes).
//! - [`ids`]: validated identifiers (device ids, key ids, shard references).
//! - [`msg`]: the message types (QoS report, ack, status, instruction, rotation,
//!   enrolment request).
//! - [`request`]: explicit shard requests from applications on a device and
//!   the allocator's signed answers (grant, queue position, refusal).
//! - [`seal`]: secret shard configuration sealed to one device's key.
//! - [`sign`]: Ed25519 keys, key sets and the signed envelope with domain tags.
//! - [`accept`]: the sans-IO state machine that decides whether a device applies
//!   an instruction or a key rotation.
//! - [`assign`]: seed 001's signed assignment objects (a group's server,
//!   broker endpoints and expiry) and the device-side rules for taking one.
//! - [`topics`]: MQTT topic names.
#![forbid(unsafe_code)]

pub mod accept;
pub mod assign;
pub mod codec;
pub mod diag;
pub mod ids;
pub mod msg;
pub mod request;
pub mod seal;
pub mod sign;
pub mod topics;

pub use codec::{decode, encode, DecodeError, FORMAT_VERSION};
pub use ids::{AppName, DeviceId, IdError, InstanceRef, KeyId, ShardRef};
