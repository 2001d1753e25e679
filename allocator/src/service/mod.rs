//! The allocator service around the policy engine: embedded MQTT broker (or an
//! external one), embedded store, signer, ingest and dispatch, the operator
//! HTTP API with Prometheus metrics, and the `run`/`keygen`/`rotate` and
//! `shardctl` command lines.
//!
//! - [`core`]: sans-IO ingest/verify/dedupe/dispatch/resend around the engine.
//! - [`store`]: the [`store::Store`] trait and its redb implementation.
//! - [`keys`]: key files and hex public keys.
//! - [`config`]: `allocator.toml`.
//! - [`metrics`]: counters and the Prometheus text format.
pub mod cli;
pub mod config;
pub mod core;
pub mod keys;
pub mod metrics;
pub mod shardctl;
pub mod store;
