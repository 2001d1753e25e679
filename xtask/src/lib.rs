//! The library half of xtask: the loop's building blocks ([`kit`]), plain
//! `std`, so the integration tests can drive the same real processes the
//! demo does without duplicating them.
#![forbid(unsafe_code)]

pub mod bpf;
pub mod kit;
