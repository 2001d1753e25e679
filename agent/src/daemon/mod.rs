//! The device daemon (`shardline-agent run`): configuration, device key,
//! crash-safe state, the MQTT link with its on-disk outbox, the sans-IO
//! capability manager (instruction acceptance, leases, last-known-good
//! profile), and systemd integration.
//!
//! - [`config`]: `agent.toml`, errors with file, line and field.
//! - [`enroll`]: self-enrolment with a bootstrap token (sans-IO retry logic).
//! - [`keys`]: the device signing key (generated once, mode 0600).
//! - [`persist`]: atomic, durable file writes.
//! - [`manager`]: the decision core (events → actions), unit-tested on
//!   simulated time.
//! - [`outbox`]: bounded on-disk queue of reports and acks.
//! - [`link`]: rumqttc options, TLS, reconnect driver, PUBACK bookkeeping.
//! - [`runtime`]: the traits the daemon needs from shard hosting and capture;
//!   [`hosting`] and [`capture`] implement them over `shardhost::Supervisor`
//!   and `monitor::Pipeline`.
//! - [`resources`], [`limits`]: device resources, the agent's own rlimits
//!   (systemd notifications come from `shardline_support::notify`).
//! - [`agent`]: the event loop that executes all of it.
//! - [`cli`]: `run` and `check-config` (and their exit codes);
//!   [`preflight`]: what the configuration names must exist on the device.
//! - [`assignment`]: seed 001's signed assignment on the device (which
//!   endpoint, which topics; sans-IO); [`assignment_io`]: its file.
//! - [`clock`]: when the local clock may raise the persisted time floor.
//! - [`requests`]: explicit shard requests of local applications, the
//!   sans-IO core (credentials → application, rate limits, sequence
//!   reservation, pending requests and answer matching);
//!   [`local_api`]: its Unix socket (the I/O edge); [`request_cli`]:
//!   `shardline-agent request`, a client of that socket.
#![forbid(unsafe_code)]

pub mod agent;
pub mod assignment;
pub mod assignment_io;
pub mod capture;
pub mod cli;
pub mod clock;
pub mod config;
pub mod enroll;
pub mod hosting;
pub mod keys;
pub mod limits;
pub mod link;
pub mod local_api;
pub mod manager;
pub mod neighbour;
pub mod outbox;
pub mod persist;
pub mod preflight;
pub mod request_cli;
pub mod requests;
pub mod resources;
pub mod runtime;
