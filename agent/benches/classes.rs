//! Classification accuracy benchmark (not a test):
//! `cargo bench -p shardline-agent --bench classes`.
//!
//! Generates the labelled corpus of `agent/tests/monitor_corpus.rs` (the
//! same generator, `tests/monitor_support/corpus.rs`, seeds 1–3), and
//! classifies every capture with
//! 1. the agent: `shardline-agent monitor --pcap F --json --window-ms 1000`
//!    (release build), the class with the most bytes in the totals;
//! 2. nDPI, the open-source DPI library, as its reader tool ships in Debian
//!    (`ndpiReader -v 2 -i F`, package `libndpi-bin`): each flow's protocol
//!    and category mapped to our classes by the table below, the class with
//!    the most bytes.
//!
//! Both read the same file per capture, with every packet stored at its
//! full length (ndpiReader skips packets cut short by a snap length).
//! Accuracy = the expected class dominant, per expected class and overall;
//! time = wall clock over the whole corpus for each tool.
//!
//! Writes the "Classes on the labelled corpus" section of BENCHMARKS.md
//! (replacing an older one).

#[path = "common/mod.rs"]
mod common;
#[path = "../tests/monitor_support/corpus.rs"]
mod corpus;
#[path = "../tests/monitor_support/mod.rs"]
mod monitor_support;

use corpus::{agent_classes, dominant, expand_to_wire, ClassBytes, Labelled};
use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const SECTION: &str = "## Classes on the labelled corpus";

/// nDPI protocol names (the application part, else the master protocol)
/// that decide the class before nDPI's category does: the DNS family, and
/// the media and call protocols nDPI files under other categories (STUN
/// and RTP under "Network"/"Media", Zoom under "Video").
const NDPI_PROTOCOLS: &[(&str, &str)] = &[
    ("DNS", "dns"),
    ("DoH_DoT", "dns"),
    ("MDNS", "dns"),
    ("STUN", "calls"),
    ("RTP", "calls"),
    ("RTCP", "calls"),
    ("SIP", "calls"),
    ("IAX", "calls"),
    ("H323", "calls"),
    ("MGCP", "calls"),
    ("SkypeCall", "calls"),
    ("WhatsAppCall", "calls"),
    ("FacebookVoip", "calls"),
    ("SignalVoip", "calls"),
    ("SnapchatCall", "calls"),
    ("GoogleHangoutDuo", "calls"),
    ("KakaoTalk_Voice", "calls"),
    ("Zoom", "calls"),
    ("Webex", "calls"),
];

/// nDPI categories → our classes. nDPI has no class for banking, so no
/// nDPI verdict is ever "sensitive"; unmapped categories are "other".
const NDPI_CATEGORIES: &[(&str, &str)] = &[
    ("VoIP", "calls"),
    ("Game", "gaming"),
    ("Media", "streaming"),
    ("Video", "streaming"),
    ("Streaming", "streaming"),
    ("Music", "streaming"),
    ("RemoteAccess", "interactive"),
    ("Download", "bulk"),
    ("FileSharing", "bulk"),
    ("DataTransfer", "bulk"),
    ("SoftwareUpdate", "bulk"),
    ("Web", "web"),
    ("SocialNetwork", "web"),
    ("Shopping", "web"),
    ("Cloud", "web"),
    ("Collaborative", "web"),
    ("Productivity", "web"),
    ("Advertisement", "web"),
    ("ConnCheck", "web"),
    ("Chat", "web"),
    ("Email", "web"),
];

/// Our class of one nDPI verdict (`proto` as "QUIC.YouTube" or "TLS").
fn ndpi_class(proto: &str, category: &str) -> &'static str {
    let mut parts = proto.rsplit('.');
    let app = parts.next().unwrap_or("");
    let master = proto.split('.').next().unwrap_or("");
    for name in [app, master] {
        if let Some((_, c)) = NDPI_PROTOCOLS.iter().find(|(p, _)| *p == name) {
            return c;
        }
    }
    NDPI_CATEGORIES
        .iter()
        .find(|(k, _)| *k == category)
        .map_or("other", |(_, c)| c)
}

/// `ndpiReader -v 2 -i file`: bytes per class over its flow list.
fn ndpi_classes(file: &Path) -> Result<ClassBytes, String> {
    let out = Command::new("ndpiReader")
        .args(["-v", "2", "-i"])
        .arg(file)
        .output()
        .map_err(|e| format!("ndpiReader: {e}"))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut seen = HashSet::new();
    let mut classes = ClassBytes::new();
    for line in text.lines() {
        // Detected flows carry a category; undetected ones (listed apart,
        // under "Undetected flows") carry none and count as "other".
        let Some(p) = line.find("[proto: ") else {
            continue;
        };
        // The flow (addresses) once: undetected flows are listed twice.
        let key = line[..p]
            .split_whitespace()
            .skip(1)
            .collect::<Vec<_>>()
            .join(" ");
        if !seen.insert(key) {
            continue;
        }
        let proto = line[p + 8..].split(']').next().unwrap_or("");
        let proto = proto.split('/').nth(1).unwrap_or("Unknown");
        let cat = line
            .find("[cat: ")
            .and_then(|c| line[c + 6..].split('/').next())
            .unwrap_or("");
        let bytes: u64 = line
            .split(" bytes")
            .filter_map(|s| s.rsplit('/').next()?.parse::<u64>().ok())
            .take(2)
            .sum();
        *classes
            .entry(ndpi_class(proto, cat).to_string())
            .or_default() += bytes;
    }
    Ok(classes)
}

fn write_section(rows: &[String], notes: &str, load_at_start: &str) {
    let mut section = format!("{SECTION}\n\n");
    section.push_str(
        "Written by `cargo bench -p shardline-agent --bench classes` (agent/benches/classes.rs).\n",
    );
    section.push_str(&format!(
        "Load average when the bench started: {load_at_start} (2 cores); commit {}.\n\n",
        common::commit()
    ));
    section.push_str(notes);
    section.push_str(
        "\n\n| what | agent | nDPI | machine | command | notes |\n|---|---|---|---|---|---|\n",
    );
    for r in rows {
        section.push_str(r);
        section.push('\n');
    }
    common::replace_section(SECTION, &section);
}

fn main() {
    let load_at_start = common::load_average();
    let machine = common::machine();
    let cmd = "`cargo bench -p shardline-agent --bench classes`";
    let agent = Path::new(env!("CARGO_BIN_EXE_shardline-agent"));
    let have_ndpi = Command::new("ndpiReader").arg("-h").output().is_ok();
    if !have_ndpi {
        println!("ndpiReader not found (Debian package libndpi-bin): nDPI column skipped");
    }
    let started = Instant::now();
    let captures: Vec<Labelled> = [1u64, 2, 3].into_iter().flat_map(corpus::corpus).collect();
    println!(
        "{} captures generated in {:.1} s",
        captures.len(),
        started.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut t_agent, mut t_ndpi) = (Duration::ZERO, Duration::ZERO);
    // Per expected class: (captures, agent hits, nDPI hits).
    let mut per: BTreeMap<&str, (usize, usize, usize)> = BTreeMap::new();
    let mut misses = Vec::new();
    let (mut packets, mut bytes) = (0u64, 0u64);
    for c in &captures {
        let file = dir.path().join(format!("{}.pcap", c.name));
        let full = expand_to_wire(&c.pcap);
        bytes += full.len() as u64;
        packets += c.packets;
        std::fs::write(&file, full).expect("write capture");
        let t = Instant::now();
        let a = dominant(&agent_classes(agent, &file, 1000));
        t_agent += t.elapsed();
        let n = if have_ndpi {
            let t = Instant::now();
            let n = ndpi_classes(&file).map_or_else(|e| format!("error: {e}"), |m| dominant(&m));
            t_ndpi += t.elapsed();
            n
        } else {
            "-".to_string()
        };
        let _ = std::fs::remove_file(&file);
        let e = per.entry(c.expected).or_default();
        e.0 += 1;
        e.1 += usize::from(a == c.expected);
        e.2 += usize::from(n == c.expected);
        println!(
            "{:<28} expected {:<11} agent {:<11} nDPI {n}",
            c.name, c.expected, a
        );
        if a != c.expected || n != c.expected {
            misses.push(format!("{} (agent {a}, nDPI {n})", c.name));
        }
    }
    let pct = |h: usize, n: usize| format!("{h}/{n} ({:.0} %)", 100.0 * h as f64 / n.max(1) as f64);
    let ndpi_cell = |h: usize, n: usize| {
        if have_ndpi {
            pct(h, n)
        } else {
            "not installed".into()
        }
    };
    let mut rows = Vec::new();
    for (class, (n, a, d)) in &per {
        rows.push(format!(
            "| expected {class} dominant | {} | {} | {machine} | {cmd} | |",
            pct(*a, *n),
            ndpi_cell(*d, *n)
        ));
    }
    let total = captures.len();
    let (ah, dh) = per.values().fold((0, 0), |s, v| (s.0 + v.1, s.1 + v.2));
    rows.push(format!(
        "| **overall** | **{}** | **{}** | {machine} | {cmd} | target ≥ 90 % (issue 16 §3) |",
        pct(ah, total),
        ndpi_cell(dh, total)
    ));
    rows.push(format!(
        "| time for the corpus | {:.1} s | {} | {machine} | {cmd} | {total} captures, {packets} packets, {:.0} MB of pcap; one process per capture, one after the other; wall clock |",
        t_agent.as_secs_f64(),
        if have_ndpi { format!("{:.1} s", t_ndpi.as_secs_f64()) } else { "-".into() },
        bytes as f64 / 1e6
    ));
    let notes =
        format!(
        "The corpus: {} scenarios × seeds 1–3 generated by agent/tests/monitor_support/corpus.rs \
         (realistic calls, games, streaming, remote shells and desktops, bulk transfers, browsing, \
         DNS, banking, each with background), the same the test `monitor_corpus` scores. A capture \
         counts when the class with the most bytes is its expected class. The agent runs with 1 s \
         windows. nDPI 4.2 (`ndpiReader -v 2`) per flow: its protocol when it is DNS/DoH or a call \
         protocol (STUN, RTP/RTCP, SIP, IAX, H.323, MGCP, *Call/*Voip, Zoom, Webex) decides; \
         otherwise its category: VoIP → calls, Game → gaming, Media/Video/Streaming/Music → \
         streaming, RemoteAccess → interactive, Download/FileSharing/DataTransfer/SoftwareUpdate → \
         bulk, Web/SocialNetwork/Shopping/Cloud/Collaborative/Productivity/Advertisement/ConnCheck/\
         Chat/Email → web, anything else → other (nDPI has no banking class: it never says \
         sensitive).\n\nMisses: {}.",
        corpus::SCENARIOS.len(),
        if misses.is_empty() { "none".to_string() } else { misses.join("; ") }
    );
    write_section(&rows, &notes, &load_at_start);
}
