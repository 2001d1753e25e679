//! The Prometheus text exposition of the service's counters and gauges
//! (`GET /metrics`). The counters themselves live in the core crate
//! (`shardline_allocator_core::service::counters`); a scrape only reads them.

use shardline_allocator_core::service::counters::{
    Drop, Kind, Metrics, Overload, OverloadProbe, REFUSAL_REASONS,
};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// The stages in front of the core, read at each scrape: the verifier
/// threads' unverified stages and, with the embedded broker, its gate.
#[derive(Debug)]
pub struct OverloadStages {
    pub stage: super::verifiers::StageProbe,
    pub gate: Option<std::sync::Arc<super::ingest_gate::IngestGate>>,
}

impl OverloadProbe for OverloadStages {
    fn read(&self) -> Overload {
        let (stage_reports, stage_acks, stage_report_bytes, stage_ack_bytes) = self.stage.read();
        Overload {
            stage_reports,
            stage_acks,
            stage_report_bytes,
            stage_ack_bytes,
            gate: self.gate.as_ref().map(|g| g.stats()),
        }
    }
}

/// The overload stages' lines (issue 19): what waits for a signature check,
/// and the embedded broker's ingest gate (only with the embedded broker).
fn render_overload(out: &mut String, o: &Overload) {
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, String)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    metric(
        "shardline_preverify_reports",
        "gauge",
        "Reports waiting for their signature check (the conflating stage in front of the verifiers).",
        &[("", o.stage_reports.to_string())],
    );
    metric(
        "shardline_preverify_acks",
        "gauge",
        "Acks waiting for their signature check.",
        &[("", o.stage_acks.to_string())],
    );
    metric(
        "shardline_preverify_bytes",
        "gauge",
        "Payload bytes waiting for their signature check.",
        &[
            ("{kind=\"report\"}", o.stage_report_bytes.to_string()),
            ("{kind=\"ack\"}", o.stage_ack_bytes.to_string()),
        ],
    );
    let Some(g) = &o.gate else {
        return;
    };
    metric(
        "shardline_ingest_gate_behind_bytes",
        "gauge",
        "Bytes of device uplinks the embedded broker took in and the MQTT link has not taken out.",
        &[("", g.behind_bytes.to_string())],
    );
    metric(
        "shardline_ingest_gate_waiting_connections",
        "gauge",
        "Device connections held back now (the link is a window behind).",
        &[("", g.waiting.to_string())],
    );
    metric(
        "shardline_ingest_gate_held_seconds_total",
        "counter",
        "Time device connections were held back, summed over connections.",
        &[("", format!("{:.3}", g.held_seconds))],
    );
    metric(
        "shardline_ingest_gate_stall_reopens_total",
        "counter",
        "Times the gate opened because nothing came out of the MQTT link for 2 s.",
        &[("", g.stall_reopens.to_string())],
    );
    metric(
        "shardline_ingest_gate_groups",
        "gauge",
        "Groups whose routed uplinks the gate counts (their filter held by the link).",
        &[("", g.groups.to_string())],
    );
}

/// The Prometheus text exposition.
pub fn render(metrics: &Metrics) -> String {
    let mut out = String::with_capacity(4096);
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let mut counter = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
        );
    };
    counter(
        "shardline_reports_received_total",
        "Report messages received.",
        get(&metrics.reports_received),
    );
    counter(
        "shardline_reports_accepted_total",
        "Reports verified, in sequence and handed to the policy engine.",
        get(&metrics.reports_accepted),
    );
    counter(
        "shardline_acks_accepted_total",
        "Signed instruction acks accepted.",
        get(&metrics.acks_accepted),
    );
    counter(
        "shardline_status_messages_total",
        "Device status messages received.",
        get(&metrics.statuses),
    );
    counter(
        "shardline_decisions_total",
        "Instructions the policy engine decided.",
        get(&metrics.decisions),
    );
    counter(
        "shardline_instructions_sent_total",
        "Signed instructions published (first send).",
        get(&metrics.instructions_sent),
    );
    counter(
        "shardline_instructions_resent_total",
        "Instructions published again because they were not known applied.",
        get(&metrics.instructions_resent),
    );
    counter(
        "shardline_instructions_applied_total",
        "Instructions the device acked as applied.",
        get(&metrics.instructions_applied),
    );
    counter(
        "shardline_instructions_rejected_total",
        "Instructions the device rejected.",
        get(&metrics.instructions_rejected),
    );
    counter(
        "shardline_instructions_failed_total",
        "Instructions accepted but failed on the device.",
        get(&metrics.instructions_failed),
    );
    counter(
        "shardline_instructions_expired_total",
        "Pending instructions dropped because they expired.",
        get(&metrics.instructions_expired),
    );
    counter(
        "shardline_compliance_events_total",
        "Compliance events fed to reputation.",
        get(&metrics.compliance_events),
    );
    counter(
        "shardline_reputation_changes_total",
        "Reputation changes announced by the engine.",
        get(&metrics.reputation_changes),
    );
    counter(
        "shardline_requests_received_total",
        "Explicit requests received from devices (before verification).",
        get(&metrics.requests_received),
    );
    counter(
        "shardline_requests_granted_total",
        "Explicit requests granted (at once or from the queue).",
        get(&metrics.requests_granted),
    );
    counter(
        "shardline_requests_queued_total",
        "Explicit requests queued for units.",
        get(&metrics.requests_queued),
    );
    counter(
        "shardline_requests_released_total",
        "Grants released (or queued requests withdrawn).",
        get(&metrics.requests_released),
    );
    counter(
        "shardline_requests_renewed_total",
        "Grants renewed.",
        get(&metrics.requests_renewed),
    );
    counter(
        "shardline_requests_rate_limited_total",
        "Explicit requests refused by an instance's rate limit.",
        metrics.refused_counts()[3],
    );
    counter(
        "shardline_instance_reputation_adjustments_total",
        "Operator adjustments of an application instance's reputation.",
        get(&metrics.instance_adjustments),
    );
    counter(
        "shardline_alerts_total",
        "Alerts raised by the engine.",
        get(&metrics.alerts),
    );
    counter(
        "shardline_catalog_reloads_total",
        "Catalog and tier reloads applied (SIGHUP or the API).",
        get(&metrics.catalog_reloads),
    );
    counter(
        "shardline_catalog_reloads_refused_total",
        "Catalog and tier reloads refused as invalid (nothing changed).",
        get(&metrics.catalog_reloads_refused),
    );
    counter(
        "shardline_rollout_changes_total",
        "Staged rollouts started, promoted or rolled back.",
        get(&metrics.rollout_changes),
    );
    counter(
        "shardline_diagnostics_received_total",
        "Signed diagnostics answers of devices stored.",
        get(&metrics.diagnostics_received),
    );
    counter(
        "shardline_diagnostics_refused_total",
        "Diagnostics answers refused (bad signature, too large, not asked for).",
        get(&metrics.diagnostics_refused),
    );
    counter(
        "shardline_catalog_entries_failed_total",
        "Catalog entries marked failing on an architecture (operator faults).",
        get(&metrics.catalog_entries_failed),
    );
    counter(
        "shardline_duplicate_device_flags_total",
        "Devices flagged as probably cloned (two agents with one identity).",
        get(&metrics.duplicate_flags),
    );
    counter(
        "shardline_enrolments_total",
        "Devices enrolled (operator or token).",
        get(&metrics.enrolments),
    );
    counter(
        "shardline_rotations_sent_total",
        "Key rotation objects published to devices.",
        get(&metrics.rotations_sent),
    );
    counter(
        "shardline_store_commits_total",
        "Store transactions committed.",
        get(&metrics.store_commits),
    );
    counter(
        "shardline_store_errors_total",
        "Store transactions that failed.",
        get(&metrics.store_errors),
    );
    counter(
        "shardline_store_conflicts_total",
        "Commits refused because another allocator instance wrote one of their devices first (shared store).",
        get(&metrics.store_conflicts),
    );
    counter(
        "shardline_store_reloads_total",
        "Device records reloaded after another allocator instance changed them (shared store).",
        get(&metrics.store_reloads),
    );
    counter(
        "shardline_signatures_checked_total",
        "Device signatures checked by the verifier threads.",
        get(&metrics.signatures_checked),
    );
    counter(
        "shardline_signature_batches_total",
        "Batches those signatures were checked in (checked / batches = mean batch size).",
        get(&metrics.signature_batches),
    );
    counter(
        "shardline_publish_errors_total",
        "MQTT publishes that could not be queued.",
        get(&metrics.publish_errors),
    );
    counter(
        "shardline_mqtt_reconnects_total",
        "MQTT connection (re)establishments.",
        get(&metrics.mqtt_reconnects),
    );
    counter(
        "shardline_core_batches_total",
        "Batches the core handled (one store commit each at most).",
        get(&metrics.core_batches),
    );
    counter(
        "shardline_reports_conflated_total",
        "Reports dropped unhandled because a newer report of the same device arrived while they waited (overload).",
        get(&metrics.reports_conflated),
    );
    counter(
        "shardline_reports_shed_total",
        "Reports dropped because the core's inbox held its cap of reports of other devices (overload beyond the memory bound).",
        get(&metrics.reports_shed),
    );
    // The overload gauges: what waits for the core, and for how long.
    let oldest = match get(&metrics.inbox_oldest_at_ms) {
        0 => 0.0,
        at => super::inbound::now_ms().saturating_sub(at) as f64 / 1e3,
    };
    let _ = writeln!(out, "# HELP shardline_inbox_depth Verified device messages waiting for the core (at most one report per device).\n# TYPE shardline_inbox_depth gauge\nshardline_inbox_depth {}", get(&metrics.inbox_depth));
    let _ = writeln!(out, "# HELP shardline_inbox_oldest_seconds How long the oldest verified message waiting for the core has waited.\n# TYPE shardline_inbox_oldest_seconds gauge\nshardline_inbox_oldest_seconds {oldest:.3}");
    render_overload(&mut out, &metrics.overload());

    let _ = writeln!(out, "# HELP shardline_store_commit_seconds_total Time spent committing to the store.\n# TYPE shardline_store_commit_seconds_total counter\nshardline_store_commit_seconds_total {:.6}", get(&metrics.store_commit_micros) as f64 / 1e6);
    let _ = writeln!(out, "# HELP shardline_core_handle_seconds_total Time the core spent handling messages (verify excluded).\n# TYPE shardline_core_handle_seconds_total counter\nshardline_core_handle_seconds_total {:.6}", get(&metrics.core_handle_micros) as f64 / 1e6);
    let _ = writeln!(out, "# HELP shardline_core_publish_seconds_total Time the core spent queueing publishes.\n# TYPE shardline_core_publish_seconds_total counter\nshardline_core_publish_seconds_total {:.6}", get(&metrics.core_publish_micros) as f64 / 1e6);
    let _ = writeln!(out, "# HELP shardline_messages_dropped_total Inbound messages dropped, by kind and reason.\n# TYPE shardline_messages_dropped_total counter");
    for kind in Kind::ALL {
        for why in Drop::ALL {
            let v = metrics.dropped_count(kind, why);
            let _ = writeln!(
                out,
                "shardline_messages_dropped_total{{kind=\"{}\",reason=\"{}\"}} {v}",
                kind.as_str(),
                why.as_str()
            );
        }
    }
    let _ = writeln!(out, "# HELP shardline_requests_refused_total Explicit requests refused, by reason.\n# TYPE shardline_requests_refused_total counter");
    for (reason, v) in REFUSAL_REASONS.iter().zip(metrics.refused_counts()) {
        let _ = writeln!(
            out,
            "shardline_requests_refused_total{{reason=\"{reason}\"}} {v}"
        );
    }
    let g = metrics.gauges.lock().map(|g| g.clone()).unwrap_or_default();
    let _ = writeln!(out, "# HELP shardline_devices Enrolled devices.\n# TYPE shardline_devices gauge\nshardline_devices {}", g.devices);
    let _ = writeln!(out, "# HELP shardline_pending_instructions Instructions sent and not yet known applied.\n# TYPE shardline_pending_instructions gauge\nshardline_pending_instructions {}", g.pending_instructions);
    let _ = writeln!(out, "# HELP shardline_reports_per_second Reports accepted per second over the last tick interval.\n# TYPE shardline_reports_per_second gauge\nshardline_reports_per_second {:.1}", g.reports_per_second);
    let _ = writeln!(out, "# HELP shardline_key_epoch Instruction-signing key rotation epoch.\n# TYPE shardline_key_epoch gauge\nshardline_key_epoch {}", g.key_epoch);
    let _ = writeln!(out, "# HELP shardline_reputation_devices Devices per reputation bucket (le = upper bound).\n# TYPE shardline_reputation_devices gauge");
    for (i, n) in g.reputation_buckets.iter().enumerate() {
        let _ = writeln!(
            out,
            "shardline_reputation_devices{{le=\"{}\"}} {n}",
            (i + 1) * 10
        );
    }
    let _ = writeln!(out, "# HELP shardline_tier_units Resource units per tier, by kind and use.\n# TYPE shardline_tier_units gauge");
    for (tier, devices, cu, du, cb, db) in &g.tiers {
        let _ = writeln!(out, "shardline_tier_devices{{tier=\"{tier}\"}} {devices}");
        let _ = writeln!(
            out,
            "shardline_tier_units{{tier=\"{tier}\",kind=\"compute\",what=\"used\"}} {cu}"
        );
        let _ = writeln!(
            out,
            "shardline_tier_units{{tier=\"{tier}\",kind=\"data\",what=\"used\"}} {du}"
        );
        let _ = writeln!(
            out,
            "shardline_tier_units{{tier=\"{tier}\",kind=\"compute\",what=\"budget\"}} {cb}"
        );
        let _ = writeln!(
            out,
            "shardline_tier_units{{tier=\"{tier}\",kind=\"data\",what=\"budget\"}} {db}"
        );
    }
    let _ = writeln!(out, "# HELP shardline_catalog_entry_failing Catalog entries marked failing, by shard and architecture (1 = not planned there).\n# TYPE shardline_catalog_entry_failing gauge");
    for (shard, arch) in &g.catalog_failing {
        let _ = writeln!(
            out,
            "shardline_catalog_entry_failing{{shard=\"{}\",arch=\"{}\"}} 1",
            label(shard),
            label(arch)
        );
    }
    let _ = writeln!(out, "# HELP shardline_shard_start_failures_total Shard start failures (operator faults, never charged to the device), by shard and architecture.\n# TYPE shardline_shard_start_failures_total counter");
    for (shard, arch, n) in &g.start_failures {
        let _ = writeln!(
            out,
            "shardline_shard_start_failures_total{{shard=\"{}\",arch=\"{}\"}} {n}",
            label(shard),
            label(arch)
        );
    }
    let _ = writeln!(out, "# HELP shardline_duplicate_devices Devices flagged now as probably cloned (two agents with one identity).\n# TYPE shardline_duplicate_devices gauge\nshardline_duplicate_devices {}", g.duplicate_devices);
    out
}

/// A label value in the exposition format (the architecture is device-supplied).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
