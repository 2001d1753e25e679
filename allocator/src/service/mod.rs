//! The allocator service around the policy engine: embedded MQTT broker (or an
//! external one), embedded store, signer, ingest and dispatch, the operator
//! HTTP API with Prometheus metrics, and the `run`/`keygen`/`rotate` and
//! `shardctl` command lines.
//!
//! - [`core`]: sans-IO ingest/verify/dedupe/dispatch/resend around the engine.
//! - [`store`]: the [`store::Store`] trait and its redb implementation.
//! - [`store_pg`]: the PostgreSQL store several instances share.
//! - [`keys`]: key files and hex public keys.
//! - [`config`]: the `allocator.toml` file.
//! - [`metrics`]: counters and the Prometheus text format.
//! - [`run`]: the I/O runner (core thread, MQTT link, ticker, API, systemd).
//! - [`broker`] / [`tls`]: embedded rumqttd and TLS termination (ring).
//! - [`api`] / [`http`]: the admin HTTP API and the small client shardctl uses.
pub mod api;
pub mod broker;
pub mod cli;
pub mod config;
pub mod core;
pub mod http;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod run;
pub mod shardctl;
pub mod store;
pub mod store_pg;
pub mod tls;
