//! [`QosSource`] over the real monitoring pipeline (`monitor::Pipeline`):
//! capture threads (one per live interface, or one replaying a capture file
//! in real time, looping, for demos without root) feed frames into a shared
//! pipeline; the daemon's window timer closes windows with
//! `Pipeline::flush_window`, so windows follow the daemon's clock even when
//! no traffic flows (an empty window still yields a report).
//!
//! The pipeline's own window length is set to twice the daemon's, so it
//! only closes a window by itself when the daemon's timer is more than a
//! whole window late; such windows are queued and reported, not lost.
//!
//! A new need does not wait for the window's end: when the pipeline sees
//! the first packet of a latency-sensitive or encrypted class after a second
//! or more without one (`Pipeline::take_onset`), the window closes at the
//! next poll and a short one ([`ONSET_WINDOW_MS`]) follows, so the report
//! that carries the new class leaves within about a tenth of a second.

use super::runtime::{QosSource, QosWindow};
use crate::monitor::pcap::CaptureReader;
use crate::monitor::source::{CaptureMode, LiveCapture, LiveOptions};
use crate::monitor::{MonitorConfig, Pipeline, Timestamp, WindowSummary};
use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// Queued windows beyond this are dropped (the daemon is far behind).
const MAX_QUEUED: usize = 16;

/// A new need (a latency-sensitive or encrypted class after a pause)
/// closes the window at once, and the next one this long
/// after: long enough to hold a few of the new class's packets, so its
/// rate in the report is its real rate, short enough that the allocator
/// hears of it within a fraction of a window.
pub const ONSET_WINDOW_MS: u64 = 100;

#[derive(Debug)]
struct Shared {
    pipeline: Pipeline,
    queued: VecDeque<WindowSummary>,
}

/// Where frames come from.
#[derive(Debug, Clone)]
pub enum CaptureInput {
    Interfaces(Vec<String>),
    /// Replayed with its original pacing, shifted to now, looping.
    Replay(PathBuf),
}

/// See the module docs.
#[derive(Debug)]
pub struct CaptureSource {
    shared: Arc<Mutex<Shared>>,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    window_ms: u32,
    last_close_ms: Option<u64>,
    /// The short window after an onset closes at this time.
    onset_due_ms: Option<u64>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    // A capture thread that panicked leaves consistent data behind (every
    // pipeline call is self-contained), so a poisoned lock is still usable.
    shared.lock().unwrap_or_else(|p| p.into_inner())
}

/// One frame into the pipeline; `wire_len` above `frame.len()` means the
/// capture cut it (its headers may be cut too).
fn feed(
    shared: &Mutex<Shared>,
    ts: Timestamp,
    link: crate::monitor::LinkType,
    frame: &[u8],
    wire_len: u32,
) {
    let mut s = lock(shared);
    if let Some(w) = s.pipeline.poll_window(ts) {
        if s.queued.len() < MAX_QUEUED {
            s.queued.push_back(w);
        }
    }
    s.pipeline.handle_frame_of_len(ts, link, frame, wire_len);
}

impl CaptureSource {
    /// Starts the capture threads. `tuning` is the monitor's own settings
    /// (flow table size, idle timeouts, rules); its window is overridden.
    pub fn start(input: CaptureInput, tuning: MonitorConfig, window_ms: u32) -> Self {
        Self::start_with(input, tuning, window_ms, CaptureMode::Auto)
    }

    /// [`CaptureSource::start`] with the way live interfaces are captured.
    pub fn start_with(
        input: CaptureInput,
        mut tuning: MonitorConfig,
        window_ms: u32,
        capture: CaptureMode,
    ) -> Self {
        tuning.window = Duration::from_millis(u64::from(window_ms) * 2);
        let shared = Arc::new(Mutex::new(Shared {
            pipeline: Pipeline::new(tuning),
            queued: VecDeque::new(),
        }));
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        match input {
            CaptureInput::Interfaces(ifaces) => {
                for iface in ifaces {
                    let (shared, stop) = (shared.clone(), stop.clone());
                    threads.push(std::thread::spawn(move || {
                        live(&iface, &shared, &stop, capture)
                    }));
                }
            }
            CaptureInput::Replay(path) => {
                let (shared, stop) = (shared.clone(), stop.clone());
                threads.push(std::thread::spawn(move || replay(&path, &shared, &stop)));
            }
        }
        Self {
            shared,
            stop,
            threads,
            window_ms,
            last_close_ms: None,
            onset_due_ms: None,
        }
    }

    /// Flows in the table now (benchmarks, diagnostics).
    pub fn flows_in_table(&self) -> usize {
        lock(&self.shared).pipeline.flows_in_table()
    }
}

fn live(iface: &str, shared: &Mutex<Shared>, stop: &AtomicBool, capture: CaptureMode) {
    let opts = LiveOptions {
        read_timeout: Duration::from_millis(200),
        capture,
        ..LiveOptions::default()
    };
    let mut cap = match LiveCapture::open(iface, &opts) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(iface, error = %e, "cannot capture on this interface; reports will not include its traffic");
            return;
        }
    };
    tracing::info!(iface, capture = cap.describe(), "capturing");
    let link = cap.link_type();
    while !stop.load(Ordering::Relaxed) {
        match cap.next_frame() {
            Ok(Some(f)) => feed(shared, f.ts, link, f.data, f.wire_len),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(iface, error = %e, "capture failed; stopped capturing on this interface");
                return;
            }
        }
        // What the in-kernel flow counter counted and did not deliver.
        if cap.kernel_counts_due() {
            let now = Timestamp::now();
            let mut s = lock(shared);
            if let Some(w) = s.pipeline.poll_window(now) {
                if s.queued.len() < MAX_QUEUED {
                    s.queued.push_back(w);
                }
            }
            if let Err(e) = cap.apply_kernel_counts(&mut s.pipeline, now, false) {
                tracing::error!(iface, error = %e, "reading the kernel's flow counts failed; stopped capturing on this interface");
                return;
            }
        }
    }
}

fn replay(path: &std::path::Path, shared: &Mutex<Shared>, stop: &AtomicBool) {
    // Frame times are shifted so the file plays from now, and from the end
    // of the previous pass on each loop, so time only moves forward.
    let mut base = Timestamp::now().as_nanos();
    while !stop.load(Ordering::Relaxed) {
        let mut reader = match CaptureReader::open(path) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot replay the capture file");
                return;
            }
        };
        let mut first: Option<u64> = None;
        let mut last_shifted = base;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let frame = match reader.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "capture file ends in an error; looping");
                    break;
                }
            };
            let t = frame.ts.as_nanos();
            let first_t = *first.get_or_insert(t);
            let shifted = base + t.saturating_sub(first_t);
            // Wait out the capture's own gaps in slices of at most a second,
            // so quiet phases stay quiet and a stop request is seen promptly.
            loop {
                let now = Timestamp::now().as_nanos();
                if shifted <= now {
                    break;
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_nanos((shifted - now).min(1_000_000_000)));
            }
            last_shifted = shifted.max(last_shifted);
            feed(
                shared,
                Timestamp::from_nanos(shifted),
                frame.link,
                frame.data,
                frame.orig_len,
            );
        }
        if first.is_none() {
            tracing::error!(path = %path.display(), "capture file has no frames");
            return;
        }
        base = last_shifted.max(Timestamp::now().as_nanos()) + 1_000_000;
    }
}

fn to_window(s: WindowSummary) -> QosWindow {
    QosWindow {
        start_ms: s.start.as_nanos() / 1_000_000,
        window_ms: u32::try_from(s.duration.as_millis()).unwrap_or(u32::MAX),
        classes: s.classes,
    }
}

impl QosSource for CaptureSource {
    fn poll_window(&mut self, now_ms: u64) -> Option<QosWindow> {
        let mut s = lock(&self.shared);
        if let Some(w) = s.queued.pop_front() {
            return Some(to_window(w));
        }
        let start = *self.last_close_ms.get_or_insert(now_ms);
        if s.pipeline.take_onset().is_some() && self.onset_due_ms.is_none() {
            // Report what came before now, and the new class's own short
            // window right after it.
            self.onset_due_ms = Some(now_ms + ONSET_WINDOW_MS);
            if now_ms > start {
                self.last_close_ms = Some(now_ms);
                let now = Timestamp::from_nanos(now_ms.saturating_mul(1_000_000));
                if let Some(w) = s.pipeline.flush_window(now) {
                    return Some(to_window(w));
                }
            }
        }
        let full = start + u64::from(self.window_ms);
        let due = self.onset_due_ms.map_or(full, |o| o.min(full));
        if now_ms < due {
            return None;
        }
        self.onset_due_ms = None;
        self.last_close_ms = Some(now_ms);
        let now = Timestamp::from_nanos(now_ms.saturating_mul(1_000_000));
        match s.pipeline.flush_window(now) {
            Some(w) => Some(to_window(w)),
            // Nothing seen: an empty window on the daemon's clock.
            None => Some(QosWindow {
                start_ms: start,
                window_ms: u32::try_from(now_ms - start).unwrap_or(u32::MAX),
                classes: Vec::new(),
            }),
        }
    }

    fn set_window(&mut self, window_ms: u32) {
        self.window_ms = window_ms;
    }
}

impl Drop for CaptureSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Live threads wake within their read timeout; replay threads within
        // one frame gap (at most a second).
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
