//! Packet-level QoS monitoring: sources, flow table, classification, QoS windows.
pub mod cli;
