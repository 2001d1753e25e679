//! Fuzz target: the agent's packet path on arbitrary frames. Captured frames
//! are the most hostile input the device sees (anyone on the LAN or WAN can
//! put bytes on the wire), so `parse::parse` and `Pipeline::handle_frame`
//! must never panic, whatever the link type and however short or lying the
//! headers are.
//!
//! Input layout: a sequence of records, each
//! `[link selector (top bit: cut by the capture): 1 byte][time step ms: 1 byte][length: 2 bytes LE][frame]`
//! (a short last record takes what is left). Several frames per input let
//! the flow table, the DNS/SNI caches and the window logic see related
//! packets (a TCP handshake, a DNS answer then a flow to that address).
#![no_main]

use libfuzzer_sys::fuzz_target;
use shardline_agent::monitor::parse::{self, LinkType};
use shardline_agent::monitor::{MonitorConfig, Pipeline, Timestamp};
use std::sync::OnceLock;

const LINKS: [LinkType; 11] = LinkType::ALL;

/// 2026-05-28 in nanoseconds, the capture clock at the first frame.
const START_NS: u64 = 1_780_000_000_000_000_000;

fn config() -> &'static MonitorConfig {
    // Compiling the embedded rules once: the pipeline itself is rebuilt per
    // input so no state leaks from one input to the next.
    static CFG: OnceLock<MonitorConfig> = OnceLock::new();
    CFG.get_or_init(|| {
        let mut c = MonitorConfig::default();
        // A small table so eviction paths run within one input.
        c.max_flows = 8;
        c.dns_cache = 8;
        c.window = std::time::Duration::from_millis(50);
        c
    })
}

fuzz_target!(|data: &[u8]| {
    let mut pipeline = Pipeline::new(config().clone());
    let mut now = START_NS;
    let mut rest = data;
    while rest.len() >= 4 {
        let selector = rest[0];
        let link = LINKS[usize::from(selector & 0x7f) % LINKS.len()];
        now = now.saturating_add(u64::from(rest[1]) * 1_000_000);
        let len = usize::from(u16::from_le_bytes([rest[2], rest[3]]));
        let body = &rest[4..];
        let frame = &body[..len.min(body.len())];
        rest = &body[frame.len()..];

        // The parser alone, then the whole per-frame path (flow table,
        // DNS/SNI/name caches, classification, RTT samples).
        // The selector's top bit says the capture cut the frame (snaplen).
        let cut = selector & 0x80 != 0;
        let _ = parse::parse(link, frame);
        let _ = parse::parse_cut(link, frame);
        let ts = Timestamp::from_nanos(now);
        if cut {
            pipeline.handle_frame_of_len(ts, link, frame, frame.len() as u32 + 1);
        } else {
            pipeline.handle_frame(ts, link, frame);
        }
        let _ = pipeline.poll_window(ts);
    }
    let _ = pipeline.flush_window(Timestamp::from_nanos(now.saturating_add(1)));
    let _ = pipeline.totals();
    assert!(pipeline.flows_in_table() <= config().max_flows as usize);
    assert!(pipeline.dns_cache_len() <= config().dns_cache as usize);
});
