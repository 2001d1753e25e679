//! The Shardline allocator's decisions, with no I/O: what `quinn-proto` is to
//! `quinn`. The service crate (`shardline-allocator`) owns sockets, threads,
//! stores and clocks, and drives this crate with `now` and events.
//!
//! - [`policy`]: the deterministic policy engine (catalog, agreements,
//!   allocation, reputation, leases, prediction, borrowing, shifting) and the
//!   simulation's fleet model.
//! - [`service`]: the service core around the engine, split by duty:
//!   signature checks, ingest, dispatch and re-sends, enrolment tokens, lazy
//!   writes, operator commands and views, shared-store coherence.
//! - [`records`]: the plain records the service persists.
//! - [`assign`]: seed 001's assignment of device groups to allocator
//!   servers by predicted load, capacity, proximity, health and history; its
//!   output is the versioned, expiring assignment objects (not wired to the
//!   service yet).
//! - [`history`]: what happened to each device (QoS windows, instructions,
//!   reputation changes, decisions), as the service writes it for the operator.
//!
//! The boundary is in Cargo: this crate's normal dependencies contain no
//! tokio, axum, MQTT, store, clap or anyhow crate (`.ci/check-core-deps`
//! checks it). Time (`now_ms`) and randomness (seeds, token secrets, keys)
//! come in as arguments.
#![forbid(unsafe_code)]

pub mod assign;
pub mod history;
pub mod policy;
pub mod records;
pub mod service;
