//! The device daemon: configuration, MQTT link, capability manager, systemd.
pub mod cli;
