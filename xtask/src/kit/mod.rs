//! Building blocks of the whole Shardline loop on one machine, in plain
//! `std`: shared by `cargo xtask demo`, `cargo xtask bench e2e` and the
//! workspace integration tests (`shardline-tests`).

pub mod cluster;
pub mod interrupt;
pub mod json;
pub mod netns;
pub mod pcap;
pub mod postgres;
pub mod proc;
pub mod sha256;
pub mod stack;
pub mod traffic;
pub mod webdriver;
