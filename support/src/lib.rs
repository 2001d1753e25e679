//! Small helpers both Shardline daemons (agent and allocator) need, written
//! once:
//!
//! - [`toml_diag`]: turning TOML spans and parser errors into
//!   `file:line: field` diagnostics (pure).
//! - [`broker_url`]: `mqtt://` / `mqtts://` broker URLs (pure).
//! - [`secret_file`] (feature `io`): reading a secret only from a regular
//!   file that group and others cannot read, with a size cap.
//! - [`notify`] (feature `io`): systemd `Type=notify` datagrams.
//!
//! Not part of the wire protocol (that is `shardline-shared`) and free of
//! any async runtime.
#![forbid(unsafe_code)]

pub mod broker_url;
#[cfg(feature = "io")]
pub mod notify;
#[cfg(feature = "io")]
pub mod secret_file;
pub mod toml_diag;
