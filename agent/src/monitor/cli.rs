//! `shardline-agent monitor`: the I/O edge over the sans-IO pipeline. Reads a
//! live interface or a capture file, prints a per-window table (or one JSON
//! object per window with `--json`) and the run's totals as the last line.

use super::kernel_count::{KernelCountOptions, KernelCountStats};
use super::pcap::CaptureReader;
use super::source::{CaptureMode, LiveCapture, LiveOptions};
use super::{FlowSummary, MonitorConfig, Pipeline, Rules, Timestamp, Totals, WindowSummary};
use anyhow::Context;
use serde_json::{json, Value};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("source").required(true).args(["iface", "pcap"])))]
pub struct MonitorArgs {
    /// Capture live on this interface (needs CAP_NET_RAW).
    #[arg(long)]
    pub iface: Option<String>,
    /// Read a pcap or pcapng file.
    #[arg(long)]
    pub pcap: Option<PathBuf>,
    /// One JSON object per window, then a last line with the run's totals.
    #[arg(long)]
    pub json: bool,
    /// How many flows to list (windows and totals).
    #[arg(long)]
    pub top: Option<usize>,
    /// Stop after this many seconds (capture time for a file).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Stop after this many frames.
    #[arg(long)]
    pub count: Option<u64>,
    /// Extra classification rules (TOML), checked before the shipped defaults.
    #[arg(long)]
    pub rules: Option<PathBuf>,
    /// Monitor configuration file (TOML: window_ms, max_flows, idle timeouts, rules, …).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// QoS window length in milliseconds (overrides the configuration).
    #[arg(long)]
    pub window_ms: Option<u64>,
    /// Put the interface into promiscuous mode.
    #[arg(long)]
    pub promiscuous: bool,
    /// How a live capture takes packets: `auto` counts flows in the kernel
    /// (a BPF socket filter; needs CAP_BPF) and falls back to the ring with
    /// the reason when it cannot, `kernel` fails instead, `ring` takes
    /// every frame.
    #[arg(long, default_value = "auto")]
    pub capture: CaptureMode,
    /// In-kernel counting: packets of each flow still delivered to user space.
    #[arg(long)]
    pub kernel_first_packets: Option<u32>,
    /// In-kernel counting: also deliver one packet in this many (0 = none).
    #[arg(long)]
    pub kernel_sample: Option<u32>,
}

fn ms(us: Option<u32>) -> Value {
    us.map_or(Value::Null, |u| {
        json!((f64::from(u) / 1000.0 * 1000.0).round() / 1000.0)
    })
}

fn flow_json(f: &FlowSummary) -> Value {
    json!({
        "src": f.src.to_string(),
        "dst": f.dst.to_string(),
        "proto": f.proto.name(),
        "class": f.class.as_str(),
        "packets": f.packets,
        "bytes": f.bytes,
        "bytes_up": f.bytes_up,
        "bytes_down": f.bytes_down,
        "rtt_ms": ms(f.rtt_min_us),
        "srtt_ms": ms(f.srtt_us),
        "retransmits": f.retransmits,
        "out_of_order": f.out_of_order,
        "jitter_ms": ms(f.jitter_us),
        "dscp": f.dscp,
        "sni": f.sni,
        "dns_name": f.dns_name,
    })
}

fn window_json(w: &WindowSummary, kernel: Option<(u64, u64)>) -> Value {
    let classes: Vec<Value> = w
        .classes
        .iter()
        .map(|c| {
            json!({
                "class": c.class.as_str(),
                "bytes": c.bytes,
                "packets": c.packets,
                "rate_bps": c.rate_bps,
                "rtt_p50_ms": ms(c.rtt_p50_us),
                "rtt_p95_ms": ms(c.rtt_p95_us),
                "jitter_ms": ms(c.jitter_us),
                "loss_permille": c.loss_permille,
                "active_flows": c.active_flows,
                "need": {
                    "latency_sensitive": c.need.latency_sensitive,
                    "bandwidth_heavy": c.need.bandwidth_heavy,
                    "needs_encryption": c.need.needs_encryption,
                },
            })
        })
        .collect();
    let mut v = json!({"window": {
        "start_ms": w.start.as_nanos() / 1_000_000,
        "duration_ms": w.duration.as_millis() as u64,
        "packets": w.packets,
        "bytes": w.bytes,
        "malformed": w.malformed,
        "flows_in_table": w.flows_in_table,
        "classes": classes,
        "top_flows": w.top_flows.iter().map(flow_json).collect::<Vec<_>>(),
    }});
    if let Some((p, d)) = kernel {
        v["window"]["kernel"] = json!({"packets": p, "drops": d});
    }
    v
}

fn kernel_count_json(k: &KernelCountStats) -> Value {
    json!({
        "frames_delivered": k.frames_delivered(),
        "delivered": k.delivered,
        "skipped": k.skipped,
        "uncounted": k.uncounted,
        "no_entry": k.no_entry,
        "evicted": k.evicted,
        "deleted": k.deleted,
        "created_from_counts": k.created_from_counts,
    })
}

fn totals_json(t: &Totals, kernel: Option<(u64, u64)>, read_error: Option<String>) -> Value {
    let mut classes = serde_json::Map::new();
    for (c, ct) in &t.classes {
        classes.insert(
            c.as_str().to_string(),
            json!({"packets": ct.packets, "bytes": ct.bytes, "flows": ct.flows}),
        );
    }
    let mut v = json!({"totals": {
        "packets": t.packets,
        "bytes": t.bytes,
        "flows": t.flows,
        "malformed": t.malformed,
        "non_ip": t.non_ip,
        "unsupported_link": t.unsupported_link,
        "evicted": t.evicted,
        "expired": t.expired,
        "classes": classes,
        "top_flows": t.top_flows.iter().map(flow_json).collect::<Vec<_>>(),
        "flow_state_bytes": t.flow_state_bytes,
        "read_error": read_error,
    }});
    if let Some((p, d)) = kernel {
        v["totals"]["kernel"] = json!({"packets": p, "drops": d});
    }
    v
}

fn human_rate(bps: u64) -> String {
    match bps {
        b if b >= 1_000_000_000 => format!("{:.2} Gb/s", b as f64 / 1e9),
        b if b >= 1_000_000 => format!("{:.2} Mb/s", b as f64 / 1e6),
        b if b >= 1_000 => format!("{:.1} kb/s", b as f64 / 1e3),
        b => format!("{b} b/s"),
    }
}

fn opt_ms(us: Option<u32>) -> String {
    us.map_or("-".into(), |u| format!("{:.1}", f64::from(u) / 1000.0))
}

fn print_flows(out: &mut impl Write, flows: &[FlowSummary]) -> std::io::Result<()> {
    writeln!(
        out,
        "  {:<45} {:<45} {:<5} {:<11} {:>9} {:>12} {:>8} {:>5}  name",
        "src", "dst", "proto", "class", "packets", "bytes", "rtt ms", "retx"
    )?;
    for f in flows {
        let name = f.sni.as_deref().or(f.dns_name.as_deref()).unwrap_or("");
        writeln!(
            out,
            "  {:<45} {:<45} {:<5} {:<11} {:>9} {:>12} {:>8} {:>5}  {}",
            f.src.to_string(),
            f.dst.to_string(),
            f.proto.name(),
            f.class.as_str(),
            f.packets,
            f.bytes,
            opt_ms(f.rtt_min_us),
            f.retransmits,
            name
        )?;
    }
    Ok(())
}

fn print_window(
    out: &mut impl Write,
    w: &WindowSummary,
    clear: bool,
    kernel: Option<(u64, u64)>,
) -> std::io::Result<()> {
    if clear {
        write!(out, "\x1b[2J\x1b[H")?;
    }
    writeln!(
        out,
        "window @{:.3}s  {} ms  {} packets  {} bytes  {} malformed  {} flows in table{}",
        w.start.as_nanos() as f64 / 1e9,
        w.duration.as_millis(),
        w.packets,
        w.bytes,
        w.malformed,
        w.flows_in_table,
        kernel.map_or(String::new(), |(_, d)| format!("  kernel drops {d}"))
    )?;
    writeln!(
        out,
        "  {:<11} {:>12} {:>8} {:>12} {:>8} {:>8} {:>8} {:>6} {:>6}  need",
        "class", "bytes", "packets", "rate", "rtt p50", "rtt p95", "jitter", "loss‰", "flows"
    )?;
    for c in &w.classes {
        let mut need = Vec::new();
        if c.need.latency_sensitive {
            need.push("latency");
        }
        if c.need.bandwidth_heavy {
            need.push("bandwidth");
        }
        if c.need.needs_encryption {
            need.push("encryption");
        }
        writeln!(
            out,
            "  {:<11} {:>12} {:>8} {:>12} {:>8} {:>8} {:>8} {:>6} {:>6}  {}",
            c.class.as_str(),
            c.bytes,
            c.packets,
            human_rate(c.rate_bps),
            opt_ms(c.rtt_p50_us),
            opt_ms(c.rtt_p95_us),
            opt_ms(c.jitter_us),
            c.loss_permille,
            c.active_flows,
            need.join(",")
        )?;
    }
    print_flows(out, &w.top_flows)?;
    writeln!(out)
}

fn print_totals(
    out: &mut impl Write,
    t: &Totals,
    kernel: Option<(u64, u64)>,
    read_error: Option<&str>,
) -> std::io::Result<()> {
    writeln!(
        out,
        "totals: {} packets, {} bytes, {} flows, {} malformed, {} non-IP, {} unsupported link, {} evicted{}",
        t.packets,
        t.bytes,
        t.flows,
        t.malformed,
        t.non_ip,
        t.unsupported_link,
        t.evicted,
        kernel.map_or(String::new(), |(p, d)| format!(
            ", kernel {p} packets / {d} drops"
        ))
    )?;
    for (c, ct) in &t.classes {
        writeln!(
            out,
            "  {:<11} {:>10} packets {:>14} bytes {:>8} flows",
            c.as_str(),
            ct.packets,
            ct.bytes,
            ct.flows
        )?;
    }
    print_flows(out, &t.top_flows)?;
    if let Some(e) = read_error {
        writeln!(out, "stopped early: {e}")?;
    }
    Ok(())
}

struct Output {
    json: bool,
    clear: bool,
    out: std::io::StdoutLock<'static>,
}

impl Output {
    fn window(&mut self, w: &WindowSummary, kernel: Option<(u64, u64)>) -> anyhow::Result<()> {
        if self.json {
            writeln!(self.out, "{}", window_json(w, kernel))?;
        } else {
            print_window(&mut self.out, w, self.clear, kernel)?;
        }
        self.out.flush()?;
        Ok(())
    }

    fn totals(
        &mut self,
        t: &Totals,
        kernel: Option<(u64, u64)>,
        read_error: Option<String>,
    ) -> anyhow::Result<()> {
        if self.json {
            writeln!(self.out, "{}", totals_json(t, kernel, read_error))?;
        } else {
            print_totals(&mut self.out, t, kernel, read_error.as_deref())?;
        }
        self.out.flush()?;
        Ok(())
    }
}

/// Set `flag` on SIGINT or SIGTERM (a helper thread with a small tokio
/// runtime owns the signal handlers; the capture loop polls the flag).
fn stop_on_signal(flag: Arc<AtomicBool>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("signal runtime")?;
    std::thread::Builder::new()
        .name("monitor-signals".into())
        .spawn(move || {
            rt.block_on(async {
                let mut term =
                    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                    {
                        Ok(s) => s,
                        Err(_) => {
                            let _ = tokio::signal::ctrl_c().await;
                            flag.store(true, Ordering::SeqCst);
                            return;
                        }
                    };
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
                flag.store(true, Ordering::SeqCst);
            });
        })?;
    Ok(())
}

fn load_config(args: &MonitorArgs) -> anyhow::Result<MonitorConfig> {
    let mut cfg = match &args.config {
        Some(p) => MonitorConfig::from_file(p)?,
        None => MonitorConfig::default(),
    };
    if let Some(r) = &args.rules {
        cfg.rules = Rules::with_extra(r)?;
        cfg.rules_file = Some(r.clone());
    }
    if let Some(w) = args.window_ms {
        anyhow::ensure!(
            (10..=3_600_000).contains(&w),
            "--window-ms must be between 10 and 3600000"
        );
        cfg.window = Duration::from_millis(w);
    }
    if let Some(t) = args.top {
        cfg.top_flows = t;
    }
    Ok(cfg)
}

/// Entry point of `shardline-agent monitor`.
pub fn run(args: MonitorArgs) -> anyhow::Result<ExitCode> {
    let cfg = load_config(&args)?;
    let stdout = std::io::stdout();
    let mut out = Output {
        json: args.json,
        clear: false,
        out: stdout.lock(),
    };
    let mut pipeline = Pipeline::new(cfg);
    if let Some(path) = &args.pcap {
        let mut reader = CaptureReader::open(path)?;
        let mut n = 0u64;
        let mut first: Option<Timestamp> = None;
        let mut last = Timestamp::default();
        let mut read_error = None;
        loop {
            if args.count.is_some_and(|c| n >= c) {
                break;
            }
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // `monitor` is a command-line tool without a log
                    // subscriber: warnings go to stderr directly.
                    eprintln!("monitor: warning: capture file damaged; stopping there: {e}");
                    read_error = Some(e.to_string());
                    break;
                }
            };
            let first_ts = *first.get_or_insert(frame.ts);
            if args.duration.is_some_and(|d| {
                frame.ts.as_nanos().saturating_sub(first_ts.as_nanos()) as f64 / 1e9 >= d
            }) {
                break;
            }
            n += 1;
            last = last.max(frame.ts);
            while let Some(w) = pipeline.poll_window(frame.ts) {
                out.window(&w, None)?;
            }
            pipeline.handle_frame_of_len(frame.ts, frame.link, frame.data, frame.orig_len);
        }
        if let Some(w) = pipeline.flush_window(last) {
            out.window(&w, None)?;
        }
        let mut totals = pipeline.totals();
        totals.unsupported_link = reader.unsupported_link;
        out.totals(&totals, None, read_error)?;
        if reader.unsupported_link > 0 {
            eprintln!(
                "monitor: warning: {} frames of unsupported link types skipped (supported: \
                 Ethernet, Linux cooked v1/v2, raw IP, BSD loopback, PPP, PPPoE, Cisco HDLC, \
                 802.11, radiotap, PPI)",
                reader.unsupported_link
            );
            if totals.packets + totals.malformed + totals.non_ip == 0 {
                anyhow::bail!(
                    "{}: none of its {} frames has a link type the monitor reads",
                    path.display(),
                    reader.unsupported_link
                );
            }
        }
        return Ok(ExitCode::SUCCESS);
    }
    let iface = args
        .iface
        .as_deref()
        .context("--iface or --pcap is required")?;
    let mut kernel_opts = KernelCountOptions::default();
    if let Some(n) = args.kernel_first_packets {
        kernel_opts.first_packets = n;
    }
    if let Some(k) = args.kernel_sample {
        kernel_opts.sample_every = k;
    }
    let opts = LiveOptions {
        promiscuous: args.promiscuous,
        capture: args.capture,
        kernel: kernel_opts,
        ..LiveOptions::default()
    };
    let mut cap = LiveCapture::open(iface, &opts)?;
    if let Some(reason) = cap.kernel_fallback() {
        eprintln!("monitor: in-kernel flow counting unavailable, every frame goes through the ring: {reason}");
    }
    // Tells a supervising script (and the tests) that frames are being taken from now on.
    eprintln!("monitor: capturing on {iface} ({})", cap.describe());
    out.clear = !args.json && std::io::stdout().is_terminal();
    let stop = Arc::new(AtomicBool::new(false));
    stop_on_signal(stop.clone())?;
    let started = Instant::now();
    let deadline = match args.duration {
        Some(d) => Some(
            started
                + Duration::try_from_secs_f64(d)
                    .context("--duration must be a non-negative number of seconds")?,
        ),
        None => None,
    };
    let link = cap.link_type();
    let mut n = 0u64;
    let mut kernel = (0u64, 0u64);
    let mut closed = Vec::new();
    loop {
        if stop.load(Ordering::SeqCst)
            || deadline.is_some_and(|d| Instant::now() >= d)
            || args.count.is_some_and(|c| n >= c)
        {
            break;
        }
        match cap.next_frame()? {
            Some(f) => {
                while let Some(w) = pipeline.poll_window(f.ts) {
                    closed.push(w);
                }
                n += 1;
                pipeline.handle_frame_of_len(f.ts, link, f.data, f.wire_len);
            }
            None => {
                while let Some(w) = pipeline.poll_window(Timestamp::now()) {
                    closed.push(w);
                }
            }
        }
        if cap.kernel_counts_due() {
            let now = Timestamp::now();
            while let Some(w) = pipeline.poll_window(now) {
                closed.push(w);
            }
            cap.apply_kernel_counts(&mut pipeline, now, false)?;
        }
        for w in closed.drain(..) {
            if let Ok(k) = cap.kernel_stats() {
                kernel = (k.packets, k.drops);
            }
            out.window(&w, Some(kernel))?;
        }
    }
    if let Ok(k) = cap.kernel_stats() {
        kernel = (k.packets, k.drops);
    }
    // What the kernel counted up to now, also of flows whose frames never came.
    let now = Timestamp::now();
    while let Some(w) = pipeline.poll_window(now) {
        out.window(&w, Some(kernel))?;
    }
    cap.apply_kernel_counts(&mut pipeline, now, true)?;
    if let Some(w) = pipeline.flush_window(Timestamp::now()) {
        out.window(&w, Some(kernel))?;
    }
    let kernel_count = cap.kernel_count_stats();
    if args.json {
        let mut v = totals_json(&pipeline.totals(), Some(kernel), None);
        v["totals"]["capture"] = json!(cap.describe());
        if let Some(k) = &kernel_count {
            v["totals"]["kernel_count"] = kernel_count_json(k);
        }
        writeln!(out.out, "{v}")?;
        out.out.flush()?;
    } else {
        out.totals(&pipeline.totals(), Some(kernel), None)?;
        if let Some(k) = &kernel_count {
            writeln!(
                out.out,
                "kernel flow counter: {} frames delivered ({} counted, {} uncounted), {} packets counted in the kernel only, {} map entries dropped by the LRU",
                k.frames_delivered(),
                k.delivered,
                k.uncounted + k.no_entry,
                k.skipped,
                k.evicted
            )?;
        }
    }
    Ok(ExitCode::SUCCESS)
}
