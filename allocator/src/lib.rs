//! The Shardline allocator as a library; the binaries are thin wrappers.
//!
//! - [`policy`]: the sans-IO, deterministic policy engine (catalog, agreements,
//!   allocation, reputation, leases, prediction, borrowing, shifting) and the
//!   fleet simulation (`shardline-allocator simulate`).
//! - [`service`]: the running service around it: broker, store, signer,
//!   ingest/dispatch, HTTP admin API, metrics (`shardline-allocator run`, `shardctl`).
#![forbid(unsafe_code)]

pub mod policy;
pub mod service;
