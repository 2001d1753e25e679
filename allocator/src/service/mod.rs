//! The allocator service: broker, store, signer, ingest/dispatch, admin API.
pub mod cli;
pub mod shardctl;
