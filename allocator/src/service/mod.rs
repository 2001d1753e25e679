//! The allocator service: the I/O and wiring around the core crate
//! (`shardline-allocator-core`). Nothing here decides; everything here talks
//! to something: sockets, files, threads, clocks.
//!
//! - [`run`]: start-up and wiring; [`core_loop`]: the core thread and the
//!   store thread (commit, then publish); [`verifiers`]: signature-check
//!   threads; [`mqtt`]: the MQTT link; [`inbound`]: what flows into the core.
//! - [`store`] / [`store_pg`]: the `Store` trait with its redb and
//!   PostgreSQL implementations.
//! - [`api`] / [`http`]: the admin HTTP API and the small client `shardctl`
//!   uses; [`api_token`]: its bearer token file; [`metrics`]: the Prometheus
//!   text of the core's counters; [`api_fleet`]: the fleet summary, device
//!   pages and live events for [`dashboard`], the operator page in the binary.
//! - [`broker`] / [`broker_acl`] / [`tls`]: embedded rumqttd, the topic
//!   authorization in front of it, and TLS termination (ring).
//! - [`access`] / [`audit`] / [`api_access`]: roles and operator tokens,
//!   the audit log, and the API middleware enforcing both; [`api_tls`]: TLS
//!   on the API listener; [`shardctl_access`]: their `shardctl` commands.
//! - [`assign_config`] / [`assign_driver`]: seed 001's regional assignment
//!   wired (issue 19): heartbeats, the lead driving the engine, publishing;
//!   [`assign_upkeep`]: withdrawals of unconfigured groups and the stored
//!   capacity shortfalls.
//! - [`config`], [`catalog_files`], [`keys`]: files the operator writes;
//!   [`client_id`]: the MQTT client id, fixed when the session persists.
//! - [`cli`], [`shardctl`]: the command lines; systemd notifications come from `shardline_support::notify`.
//! - [`core`]: the core crate's service core, re-exported under its old path.
pub mod access;
pub mod api;
pub mod api_access;
pub mod api_assign;
pub mod api_deploy;
pub mod api_fleet;
pub mod api_history;
pub mod api_tls;
pub mod api_token;
pub mod assign_config;
pub mod assign_driver;
pub mod assign_records;
pub mod assign_upkeep;
pub mod audit;
pub mod broker;
pub mod broker_acl;
pub mod catalog_files;
pub mod cli;
pub mod client_id;
pub mod config;
pub mod core_loop;
pub mod dashboard;
pub mod http;
pub mod inbound;
pub mod ingest_gate;
pub mod keys;
pub mod link_subs;
pub mod metrics;
pub mod mqtt;
pub mod run;
pub mod shardctl;
pub mod shardctl_access;
pub(crate) mod shardctl_assign;
pub(crate) mod shardctl_history;
pub mod store;
mod store_history;
pub mod store_pg;
pub mod tls;
pub mod verified;
pub mod verifiers;

pub use shardline_allocator_core::service as core;
