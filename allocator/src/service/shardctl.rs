//! `shardctl`: the operator CLI over the admin API.
//!
//! The API address and token come from `--api` / `--token` / `--token-file`
//! (or the `SHARDCTL_API` / `SHARDCTL_TOKEN` or `SHARDLINE_TOKEN` environment
//! variables); the defaults match an allocator started with the default
//! configuration. An `https://` API needs `--ca` (the CA's PEM file).

use super::api_token::MAX_TOKEN_FILE;
use super::http;
use clap::{Parser, Subcommand};
use shardline_shared::DeviceId;
use shardline_support::secret_file;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "shardctl", version, about = "Operate a Shardline allocator")]
struct Cli {
    /// Admin API base URL.
    #[arg(long, env = "SHARDCTL_API", default_value = "http://127.0.0.1:8440")]
    api: String,
    /// Bearer token (prefer --token-file).
    #[arg(long, env = "SHARDCTL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, default_value = "/var/lib/shardline-allocator/api-token")]
    token_file: PathBuf,
    /// Print raw JSON.
    #[arg(long)]
    json: bool,
    /// CA certificate (PEM) the https:// API's certificate is checked against.
    #[arg(long, env = "SHARDCTL_CA")]
    ca: Option<PathBuf>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// List enrolled devices.
    Devices,
    /// One device: profile (leases), reputation history, last QoS, instructions.
    Device {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
    },
    /// A device's history (QoS windows, instructions, reputation changes,
    /// decisions), newest first, each with its reason.
    History {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        /// Only this kind of entry.
        #[arg(long, value_parser = ["qos", "instruction", "reputation", "decision"])]
        kind: Option<String>,
        /// At most this many entries.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Regional assignment (issue 19): every group's assignment, the
    /// instances and shortfalls; with GROUP that group; with `--history`
    /// the group's published versions, newest first.
    Assignment {
        group: Option<String>,
        #[arg(long, requires = "group")]
        history: bool,
    },
    /// Enrol a device with its public key (hex).
    Enroll {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        public_key: String,
        #[arg(long)]
        tier: String,
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Remove a device.
    Unenroll {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
    },
    /// Tiers (service agreements) and their units in use.
    Tiers,
    /// Credit balances of the market (seed 002), with each device's latest
    /// market event.
    Credits {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Ask units for an application instance (`device:app:instance`), as
    /// the instance would; a grant is also sent signed to the device.
    Request {
        instance: String,
        /// compute or data.
        #[arg(long = "type", value_parser = ["compute", "data"])]
        kind: String,
        #[arg(long)]
        units: u32,
        /// How long, e.g. 30s, 500ms, 2m.
        #[arg(long = "for", value_parser = parse_duration_ms)]
        duration: u32,
        #[arg(long, default_value_t = 0)]
        priority: u8,
    },
    /// An application instance's reputation and history; with --set or
    /// --delta (and --reason), an audited change of it.
    Reputation {
        instance: String,
        #[arg(long, conflicts_with = "delta", requires = "reason")]
        set: Option<f64>,
        #[arg(long, allow_hyphen_values = true, requires = "reason")]
        delta: Option<f64>,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Keep a shard active on a device.
    Pin {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        shard: String,
    },
    Unpin {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        shard: String,
    },
    /// End a shard's lease on a device now and never grant it until unrevoked.
    Revoke {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        shard: String,
    },
    Unrevoke {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        shard: String,
    },
    /// Deactivate everything on a device and grant nothing until resumed.
    Drain {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
    },
    Resume {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
    },
    /// Bootstrap tokens for devices that enrol themselves.
    Token {
        #[command(subcommand)]
        command: TokenCmd,
    },
    /// Catalog shards, with the entries marked failing per architecture.
    Catalog {
        #[command(subcommand)]
        command: Option<CatalogCmd>,
    },
    /// A device's own shard configuration (per-device keys, secrets).
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// VPN tunnels between devices.
    Vpn {
        #[command(subcommand)]
        command: VpnCmd,
    },
    /// Operator tokens with roles (viewer, operator, admin).
    Operators {
        #[command(subcommand)]
        command: super::shardctl_access::OperatorsCmd,
    },
    /// The audit log of operator actions, newest first.
    Audit(super::shardctl_access::AuditArgs),
    /// A device's latest diagnostics (recent log lines and status);
    /// `--ask` asks the device for fresh ones first and waits for them.
    Diagnostics {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        #[arg(long)]
        ask: bool,
    },
    /// Staged rollouts of changed catalog entries (canaries first).
    Rollouts {
        #[command(subcommand)]
        command: Option<RolloutCmd>,
    },
}

#[derive(Debug, Subcommand)]
enum RolloutCmd {
    /// Give every device the new entry now.
    Promote { shard: String },
    /// Give the canaries the previous entry again.
    Rollback { shard: String },
}

#[derive(Debug, Subcommand)]
enum CatalogCmd {
    /// Clear a shard's failing marks and start failures: try it again everywhere.
    Retry { shard: String },
    /// Read the catalog and tier files again (as SIGHUP does); changed
    /// entries are rolled out in stages. A bad file changes nothing.
    Reload,
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Set keys of DEVICE's configuration of SHARD: `key=value` in clear,
    /// `--secret key=value` sealed to the device (never shown again).
    Set {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
        shard: String,
        /// Clear `key=value` pairs.
        #[arg(value_parser = parse_pair)]
        pairs: Vec<(String, String)>,
        /// A secret `key=value` (visible in the process list while this
        /// runs; prefer --secret-file on shared machines).
        #[arg(long = "secret", value_parser = parse_pair)]
        secret: Vec<(String, String)>,
        /// A secret `key=PATH`: the value is the file's first line (mode
        /// 0600 or stricter).
        #[arg(long = "secret-file", value_parser = parse_pair)]
        secret_file: Vec<(String, String)>,
        /// Keys to remove.
        #[arg(long)]
        unset: Vec<String>,
    },
    /// Show DEVICE's configuration (secret key names only, and missing keys).
    Show {
        #[arg(value_parser = parse_device)]
        device: DeviceId,
    },
}

#[derive(Debug, Subcommand)]
enum VpnCmd {
    /// Configure a tunnel between DEV_A (initiator) and DEV_B (responder)
    /// with one fresh pre-shared key the allocator generates (never shown).
    Pair {
        #[arg(value_parser = parse_device)]
        dev_a: DeviceId,
        #[arg(value_parser = parse_device)]
        dev_b: DeviceId,
        /// DEV_A's tunnel address (IP:PORT), where DEV_B reaches it.
        #[arg(long)]
        a_endpoint: std::net::SocketAddr,
        /// DEV_B's tunnel address (IP:PORT), where DEV_A reaches it.
        #[arg(long)]
        b_endpoint: std::net::SocketAddr,
    },
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        // The argument is not echoed: it may be a secret.
        _ => Err("expected key=value".into()),
    }
}

#[derive(Debug, Subcommand)]
enum TokenCmd {
    /// Create a token (printed once).
    Create {
        #[arg(long)]
        tier: String,
        #[arg(long)]
        tenant: Option<String>,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_s: u64,
        /// How many devices may enrol with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
}

pub fn main_from_args(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<ExitCode> {
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return Ok(ExitCode::from(if e.use_stderr() { 2 } else { 0 }));
        }
    };
    let token = match (&cli.token, std::env::var("SHARDLINE_TOKEN")) {
        (Some(t), _) => t.clone(),
        (None, Ok(t)) if !t.is_empty() => t,
        _ => secret_file::read_text(&cli.token_file, MAX_TOKEN_FILE)
            .map_err(|e| anyhow::anyhow!("{e} (pass --token-file)"))?,
    };
    let (method, path, body) = match &cli.command {
        Cmd::Devices => ("GET", "/v1/devices".to_owned(), None),
        Cmd::Assignment {
            group: Some(g),
            history: true,
        } => ("GET", format!("/v1/assignments/{g}/history"), None),
        Cmd::Assignment { .. } => ("GET", "/v1/assignments".to_owned(), None),
        Cmd::Device { device } => ("GET", format!("/v1/devices/{device}"), None),
        Cmd::History {
            device,
            kind,
            limit,
        } => {
            let kind = kind
                .as_ref()
                .map_or(String::new(), |k| format!("&kind={k}"));
            (
                "GET",
                format!("/v1/devices/{device}/history?limit={limit}{kind}"),
                None,
            )
        }
        Cmd::Enroll {
            device,
            public_key,
            tier,
            tenant,
        } => (
            "POST",
            "/v1/devices".to_owned(),
            Some(serde_json::json!({
                "device": device, "public_key": public_key, "tier": tier, "tenant": tenant,
            })),
        ),
        Cmd::Unenroll { device } => ("DELETE", format!("/v1/devices/{device}"), None),
        Cmd::Tiers => ("GET", "/v1/tiers".to_owned(), None),
        Cmd::Credits { tenant: None } => ("GET", "/v1/credits".to_owned(), None),
        Cmd::Credits {
            tenant: Some(tenant),
        } => {
            if tenant.is_empty()
                || !tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                anyhow::bail!("bad tenant {tenant:?}");
            }
            ("GET", format!("/v1/credits?tenant={tenant}"), None)
        }
        Cmd::Request {
            instance,
            kind,
            units,
            duration,
            priority,
        } => (
            "POST",
            "/v1/shard/request".to_owned(),
            Some(serde_json::json!({
                "instance": instance, "op": "acquire", "kind": kind,
                "units": units, "duration_ms": duration, "priority": priority,
            })),
        ),
        Cmd::Reputation {
            instance,
            set: None,
            delta: None,
            ..
        } => ("GET", format!("/v1/reputation/{instance}"), None),
        Cmd::Reputation {
            instance,
            set,
            delta,
            reason,
        } => {
            let actor = std::env::var("USER").unwrap_or_else(|_| "shardctl".into());
            (
                "POST",
                format!("/v1/reputation/{instance}"),
                Some(serde_json::json!({
                    "set": set, "delta": delta, "reason": reason, "actor": actor,
                })),
            )
        }
        Cmd::Catalog { command: None } => ("GET", "/v1/catalog".to_owned(), None),
        Cmd::Catalog {
            command: Some(CatalogCmd::Retry { shard }),
        } => {
            if shard.is_empty() || shard.contains('/') {
                anyhow::bail!("bad shard id {shard:?}");
            }
            ("POST", format!("/v1/catalog/{shard}/retry"), None)
        }
        Cmd::Catalog {
            command: Some(CatalogCmd::Reload),
        } => ("POST", "/v1/catalog/reload".to_owned(), None),
        Cmd::Rollouts { command: None } => ("GET", "/v1/rollouts".to_owned(), None),
        Cmd::Diagnostics { device, ask } => {
            let path = format!("/v1/devices/{device}/diagnostics");
            if *ask {
                let before = http::request(&cli.api, "GET", &path, Some(&token), None)?;
                let r = http::request(&cli.api, "POST", &path, Some(&token), None)?;
                if r.status != 200 {
                    eprintln!("shardctl: {} ({})", r.body, r.status);
                    return Ok(ExitCode::from(1));
                }
                // Wait (up to 15 s) for an answer newer than the one before.
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
                while std::time::Instant::now() < deadline {
                    let now = http::request(&cli.api, "GET", &path, Some(&token), None)?;
                    if now.status == 200 && now.body != before.body {
                        break;
                    }
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
            }
            ("GET", path, None)
        }
        Cmd::Rollouts {
            command: Some(RolloutCmd::Promote { shard } | RolloutCmd::Rollback { shard }),
        } => {
            if shard.is_empty() || shard.contains('/') {
                anyhow::bail!("bad shard id {shard:?}");
            }
            let what = match &cli.command {
                Cmd::Rollouts {
                    command: Some(RolloutCmd::Promote { .. }),
                } => "promote",
                _ => "rollback",
            };
            ("POST", format!("/v1/rollouts/{shard}/{what}"), None)
        }
        Cmd::Pin { device, shard } => op(device, "pin", Some(shard)),
        Cmd::Unpin { device, shard } => op(device, "unpin", Some(shard)),
        Cmd::Revoke { device, shard } => op(device, "revoke", Some(shard)),
        Cmd::Unrevoke { device, shard } => op(device, "unrevoke", Some(shard)),
        Cmd::Drain { device } => op(device, "drain", None),
        Cmd::Resume { device } => op(device, "resume", None),
        Cmd::Token {
            command:
                TokenCmd::Create {
                    tier,
                    tenant,
                    ttl_s,
                    uses,
                },
        } => (
            "POST",
            "/v1/tokens".to_owned(),
            Some(
                serde_json::json!({ "tier": tier, "tenant": tenant, "ttl_s": ttl_s, "uses": uses }),
            ),
        ),
        Cmd::Config {
            command:
                ConfigCmd::Set {
                    device,
                    shard,
                    pairs,
                    secret,
                    secret_file,
                    unset,
                },
        } => {
            let mut secrets: serde_json::Map<String, serde_json::Value> = secret
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            for (k, path) in secret_file {
                let text = secret_file::read_text(std::path::Path::new(path), 4096)
                    .map_err(|e| anyhow::anyhow!("--secret-file {k}: {e}"))?;
                let value = text.lines().next().unwrap_or("").trim().to_owned();
                secrets.insert(k.clone(), serde_json::Value::String(value));
            }
            let clear: serde_json::Map<String, serde_json::Value> = pairs
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            (
                "PUT",
                format!("/v1/devices/{device}/config/{shard}"),
                Some(serde_json::json!({ "clear": clear, "secret": secrets, "unset": unset })),
            )
        }
        Cmd::Config {
            command: ConfigCmd::Show { device },
        } => ("GET", format!("/v1/devices/{device}/config"), None),
        Cmd::Vpn {
            command:
                VpnCmd::Pair {
                    dev_a,
                    dev_b,
                    a_endpoint,
                    b_endpoint,
                },
        } => (
            "POST",
            "/v1/vpn/pair".to_owned(),
            Some(serde_json::json!({
                "a": dev_a, "b": dev_b,
                "a_endpoint": a_endpoint.to_string(), "b_endpoint": b_endpoint.to_string(),
            })),
        ),
        Cmd::Operators { command } => super::shardctl_access::operators_request(command)?,
        Cmd::Audit(a) => ("GET", super::shardctl_access::audit_path(a), None),
    };
    if path.contains("//") || path.ends_with('/') {
        anyhow::bail!("empty device id");
    }
    let r = http::request_with_ca(
        &cli.api,
        cli.ca.as_deref(),
        method,
        &path,
        Some(token.trim()),
        body.as_ref(),
    )?;
    if let Cmd::Audit(a) = &cli.command {
        // Exports go out as the API wrote them.
        if r.status == 200 && a.format.as_deref().is_some_and(|f| f != "json") {
            print!("{}", r.body);
            return Ok(ExitCode::SUCCESS);
        }
    }
    let value: serde_json::Value =
        serde_json::from_str(&r.body).unwrap_or(serde_json::Value::String(r.body.clone()));
    if r.status != 200 {
        let msg = value
            .get("error")
            .and_then(|e| e.as_str())
            .map_or_else(|| r.body.clone(), str::to_owned);
        eprintln!("shardctl: {} ({})", msg, r.status);
        return Ok(ExitCode::from(1));
    }
    if !cli.json {
        match &cli.command {
            Cmd::Devices => {
                if let Some(rows) = value.as_array() {
                    print_devices(rows);
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Cmd::Device { .. } => {
                print!("{}", device_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::History { .. } => {
                print!("{}", super::shardctl_history::history_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Assignment { group, history } => {
                print!(
                    "{}",
                    super::shardctl_assign::assignment_text(&value, group.as_deref(), *history)
                );
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Credits { .. } => {
                if let Some(rows) = value.as_array() {
                    print!("{}", credits_text(rows));
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Cmd::Catalog { command: None } => {
                if let Some(rows) = value.as_array() {
                    print!("{}", catalog_text(rows));
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Cmd::Request { .. } => {
                println!("{}", answer_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Catalog {
                command: Some(CatalogCmd::Reload),
            } => {
                print!("{}", reload_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Rollouts { .. } => {
                print!("{}", rollouts_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Diagnostics { .. } => {
                print!("{}", diagnostics_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Reputation { .. } => {
                print!("{}", instance_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Operators {
                command: super::shardctl_access::OperatorsCmd::List,
            } => {
                print!("{}", super::shardctl_access::operators_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            Cmd::Audit(a) if a.format.is_none() => {
                print!("{}", super::shardctl_access::audit_text(&value));
                return Ok(ExitCode::SUCCESS);
            }
            _ => {}
        }
    }
    println!("{}", serde_json::to_string_pretty(&value)?);
    Ok(ExitCode::SUCCESS)
}

fn op(
    device: &DeviceId,
    op: &str,
    shard: Option<&String>,
) -> (&'static str, String, Option<serde_json::Value>) {
    (
        "POST",
        format!("/v1/devices/{device}/{op}"),
        Some(serde_json::json!({ "shard": shard })),
    )
}

fn print_devices(rows: &[serde_json::Value]) {
    println!(
        "{:<24} {:<10} {:>6} {:>4} {:>4} {:>6} {:<8} {:>7}",
        "DEVICE", "TIER", "REP", "CU", "DU", "SHARDS", "PRESENCE", "PENDING"
    );
    for r in rows {
        let s = |k: &str| r.get(k).and_then(|v| v.as_str()).unwrap_or("").to_owned();
        let n = |k: &str| r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        let rep = r.get("reputation").and_then(|v| v.as_f64()).unwrap_or(0.0);
        println!(
            "{:<24} {:<10} {:>6.1} {:>4} {:>4} {:>6} {:<8} {:>7}",
            s("device"),
            s("tier"),
            rep,
            n("compute_units"),
            n("data_units"),
            n("active_shards"),
            s("presence"),
            n("pending_instructions")
        );
    }
}

/// `shardctl credits` for people: one line per account, then its latest
/// market event in words.
pub fn credits_text(rows: &[serde_json::Value]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:<24} {:<12} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}",
        "DEVICE", "TENANT", "BALANCE", "EARNED", "SOLD", "BOUGHT", "HELD", "SOLD_U"
    );
    let credits = |r: &serde_json::Value, k: &str| {
        let m = r.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
        shardline_allocator_core::policy::market::Credits(m).to_string()
    };
    let units = |r: &serde_json::Value, k: &str| {
        let u: Vec<u64> = r
            .get(k)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|x| x.as_u64().unwrap_or(0)).collect())
            .unwrap_or_default();
        format!(
            "{}c{}d",
            u.first().copied().unwrap_or(0),
            u.get(1).copied().unwrap_or(0)
        )
    };
    for r in rows {
        let _ = writeln!(
            o,
            "{:<24} {:<12} {:>10} {:>10} {:>10} {:>10} {:>7} {:>7}",
            text(r, "device"),
            text(r, "tenant"),
            credits(r, "balance_milli"),
            credits(r, "earned_milli"),
            credits(r, "sold_milli"),
            credits(r, "bought_milli"),
            units(r, "market_units"),
            units(r, "sold_units"),
        );
        if let Some(last) = r.get("last").filter(|l| !l.is_null()) {
            let _ = writeln!(o, "    at {}: {}", text(last, "at_ms"), text(last, "text"));
        }
    }
    o
}

fn text(v: &serde_json::Value, k: &str) -> String {
    match v.get(k) {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    }
}

/// `shardctl device` for people: identity, reputation, profile, and every
/// refusal with its reason (the raw JSON is `--json`).
pub fn device_text(d: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let p = d.get("policy").cloned().unwrap_or_default();
    let _ = writeln!(
        o,
        "device {}  tier {}  presence {}  key {}",
        text(d, "device"),
        text(d, "tier"),
        text(d, "presence"),
        text(d, "key_id")
    );
    let rep = p.get("reputation").and_then(|v| v.as_f64()).unwrap_or(0.0);
    let _ = writeln!(
        o,
        "reputation {rep:.1}  budget compute {} data {}  flaps {}",
        text(&p, "budget_compute_units"),
        text(&p, "budget_data_units"),
        text(&p, "flaps")
    );
    let _ = writeln!(
        o,
        "reports up to seq {}  instructions next {} applied {} pending {}",
        text(d, "last_report_seq"),
        text(d, "next_instruction_seq"),
        text(d, "applied_instruction_seq"),
        d.get("pending_instructions")
            .and_then(|v| v.as_array())
            .map_or(0, Vec::len)
    );
    if let Some(f) = p.get("duplicate").filter(|f| !f.is_null()) {
        let _ = writeln!(
            o,
            "DUPLICATE: probably two agents with this id and key ({}; evidence {}); replayed_report not charged while flagged",
            text(f, "reason"),
            text(f, "evidence")
        );
    }
    if let Some(leases) = p.get("leases").and_then(|v| v.as_array()) {
        let _ = writeln!(o, "active shards ({}):", leases.len());
        for l in leases {
            let shard = l
                .get("shard")
                .map(|s| format!("{}@{}", text(s, "id"), text(s, "version")));
            let _ = writeln!(
                o,
                "  {:<28} {:<10} {:?} units {}",
                shard.unwrap_or_default(),
                text(l, "capability"),
                text(l, "kind"),
                text(l, "units")
            );
        }
    }
    let reasons = p.get("refusal_reasons").and_then(|v| v.as_object());
    match reasons {
        Some(r) if !r.is_empty() => {
            let _ = writeln!(o, "refused ({}):", r.len());
            for (cap, why) in r {
                let _ = writeln!(o, "  {cap:<12} {}", why.as_str().unwrap_or_default());
            }
        }
        _ => {
            let _ = writeln!(o, "refused: none");
        }
    }
    if let Some(sf) = p
        .get("start_failures")
        .and_then(|v| v.as_object())
        .filter(|m| !m.is_empty())
    {
        let _ = writeln!(o, "start failures (operator faults, not charged):");
        for (shard, f) in sf {
            let _ = writeln!(
                o,
                "  {shard:<24} {} (x{})",
                text(f, "reason"),
                text(f, "count")
            );
        }
    }
    if let Some(apps) = p
        .get("app_instances")
        .and_then(|v| v.as_array())
        .filter(|a| !a.is_empty())
    {
        let _ = writeln!(o, "application instances ({}):", apps.len());
        for a in apps {
            let rep = a.get("reputation").and_then(|v| v.as_f64()).unwrap_or(0.0);
            let _ = writeln!(
                o,
                "  {:<40} rep {rep:5.1}  compute {} data {}  queued {}",
                text(a, "instance"),
                text(a, "compute_in_use"),
                text(a, "data_in_use"),
                text(a, "queued")
            );
        }
    }
    if let Some(c) = p
        .get("credits")
        .filter(|c| c.get("opened").and_then(|v| v.as_bool()) == Some(true))
    {
        let cr = |k: &str| {
            shardline_allocator_core::policy::market::Credits(
                c.get(k).and_then(|v| v.as_u64()).unwrap_or(0),
            )
        };
        let _ = writeln!(
            o,
            "credits {}  (earned {} sold {} bought {})",
            cr("balance_milli"),
            cr("earned_milli"),
            cr("sold_milli"),
            cr("bought_milli")
        );
        for h in c
            .get("history")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let _ = writeln!(o, "  at {}: {}", text(h, "at_ms"), text(h, "text"));
        }
    }
    // Prediction per class: how often a pre-activation was followed by demand.
    if let Some(pr) = p
        .get("prediction")
        .and_then(|v| v.as_array())
        .filter(|a| !a.is_empty())
    {
        let _ = writeln!(o, "prediction:");
        for c in pr {
            let off = c
                .get("off_until_ms")
                .and_then(|v| v.as_u64())
                .map_or(String::new(), |t| {
                    format!("  OFF until {t} ms (did not pay)")
                });
            let _ = writeln!(
                o,
                "  {:<12} pre-activations {} followed by demand {}{off}",
                text(c, "class"),
                text(c, "preactivations"),
                text(c, "hits")
            );
        }
    }
    if let Some(sh) = p
        .get("shifts")
        .and_then(|v| v.as_array())
        .filter(|a| !a.is_empty())
    {
        let _ = writeln!(
            o,
            "shifts toward it (QoS points gained: {}):",
            text(&p, "shift_gain")
        );
        for r in sh {
            let _ = writeln!(
                o,
                "  at {} ms  {} {} unit(s) from {}: {}",
                text(r, "at_ms"),
                text(r, "units"),
                text(r, "kind").to_lowercase(),
                text(r, "from"),
                r.get("outcome")
                    .and_then(|v| v.as_str())
                    .unwrap_or("being judged")
            );
        }
    }
    // The engine's decisions, newest first, each with its reason; loans
    // keep their own record (seed 002).
    let mut decisions: Vec<(u64, String)> = Vec::new();
    for d in p
        .get("decisions")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        decisions.push((
            d.get("at_ms").and_then(|v| v.as_u64()).unwrap_or(0),
            format!("{:<11} {}", text(d, "kind"), text(d, "explanation")),
        ));
    }
    if let Some(l) = p.get("lending") {
        for d in l
            .get("decisions")
            .and_then(|v| v.as_array())
            .into_iter()
            .flatten()
        {
            let at = d.get("at_ms").and_then(|v| v.as_u64()).unwrap_or(0);
            let words = d
                .get("text")
                .or_else(|| d.get("explanation"))
                .and_then(|v| v.as_str())
                .map_or_else(|| d.to_string(), str::to_owned);
            decisions.push((at, format!("{:<11} {words}", "loan")));
        }
    }
    if !decisions.is_empty() {
        decisions.sort_by_key(|d| std::cmp::Reverse(d.0));
        let _ = writeln!(o, "decisions (newest first):");
        for (at, line) in decisions.iter().take(12) {
            let _ = writeln!(o, "  at {at:>14} ms  {line}");
        }
    }
    if let Some(h) = p.get("reputation_history").and_then(|v| v.as_array()) {
        if !h.is_empty() {
            let _ = writeln!(o, "reputation history:");
            for e in h {
                let old = e.get("old").and_then(|v| v.as_f64()).unwrap_or(0.0);
                let new = e.get("new").and_then(|v| v.as_f64()).unwrap_or(0.0);
                let _ = writeln!(
                    o,
                    "  at {:>14} ms  {old:5.1} → {new:5.1}  {}",
                    text(e, "at_ms"),
                    text(e, "reason")
                );
            }
        }
    }
    o
}

/// A request's answer in one line (`shardctl request`).
pub fn answer_text(a: &serde_json::Value) -> String {
    let who = format!(
        "{}:{}:{}",
        text(a, "device"),
        text(a, "app"),
        text(a, "instance")
    );
    if let Some(words) = a.get("explanation").and_then(|e| e.as_str()) {
        return format!("{who}: {words}");
    }
    let Some((what, body)) = a
        .get("answer")
        .and_then(|v| v.as_object())
        .and_then(|m| m.iter().next())
    else {
        return format!("{who}: {}", text(a, "answer"));
    };
    match what.as_str() {
        "Granted" | "Renewed" => format!(
            "{who}: {} grant {}: {} {} units until {} ms",
            what.to_lowercase(),
            text(body, "grant"),
            text(body, "units"),
            text(body, "kind").to_lowercase(),
            text(body, "expires_at_ms")
        ),
        "Queued" => format!(
            "{who}: queued, ticket {} position {} expected wait {} ms",
            text(body, "ticket"),
            text(body, "position"),
            text(body, "expected_wait_ms")
        ),
        "Refused" => format!("{who}: refused: {body}"),
        _ => format!("{who}: {what} {body}"),
    }
}

/// `shardctl reputation` for people.
pub fn instance_text(v: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let rep = v.get("reputation").and_then(|x| x.as_f64()).unwrap_or(0.0);
    let s = v.get("standing").cloned().unwrap_or_default();
    let _ = writeln!(o, "instance {}  reputation {rep:.1}", text(v, "instance"));
    let _ = writeln!(
        o,
        "app {}  tenant {}  tier {}  last active at {} ms",
        text(v, "app"),
        v.get("tenant").and_then(|t| t.as_str()).unwrap_or("(none)"),
        text(v, "tier"),
        text(v, "last_active_ms")
    );
    let _ = writeln!(
        o,
        "quota compute {} data {}  in use compute {} data {}  queued {}  rate-limited {}",
        text(&s, "compute_quota_units"),
        text(&s, "data_quota_units"),
        text(&s, "compute_in_use"),
        text(&s, "data_in_use"),
        text(&s, "queued"),
        text(v, "rate_limited")
    );
    if let Some(h) = v.get("history").and_then(|x| x.as_array()) {
        let _ = writeln!(o, "history ({}):", h.len());
        for e in h {
            let old = e.get("old").and_then(|x| x.as_f64()).unwrap_or(0.0);
            let new = e.get("new").and_then(|x| x.as_f64()).unwrap_or(0.0);
            let _ = writeln!(
                o,
                "  at {:>14} ms  {old:5.1} → {new:5.1}  {}",
                text(e, "at_ms"),
                text(e, "reason")
            );
        }
    }
    o
}

/// `30s`, `500ms`, `2m` or plain milliseconds.
fn parse_duration_ms(s: &str) -> Result<u32, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num.parse().map_err(|_| format!("not a duration: {s:?}"))?;
    let ms = match unit {
        "" | "ms" => n,
        "s" => n.saturating_mul(1_000),
        "m" => n.saturating_mul(60_000),
        _ => return Err(format!("unknown unit in {s:?} (ms, s or m)")),
    };
    u32::try_from(ms).map_err(|_| format!("too long: {s:?}"))
}

/// `shardctl catalog reload` for people.
fn reload_text(v: &serde_json::Value) -> String {
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
    let mut out = format!(
        "reloaded catalog {} and tiers {}: {}\n",
        s("catalog_source"),
        s("tiers_source"),
        s("summary")
    );
    for r in v["details"]["rollouts_started"]
        .as_array()
        .into_iter()
        .flatten()
    {
        out.push_str(&format!("  {}\n", r.as_str().unwrap_or("")));
    }
    out
}

/// `shardctl diagnostics` for people.
fn diagnostics_text(v: &serde_json::Value) -> String {
    let st = &v["status"];
    let s = |x: &serde_json::Value| x.as_str().unwrap_or("").to_owned();
    let mut out = format!(
        "{} (answer to instruction {}, at {} ms): agent {} {} up {} s, capture {}, broker {}\n",
        s(&v["device"]),
        v["request_seq"],
        v["at_ms"],
        s(&st["agent_version"]),
        s(&st["arch"]),
        st["uptime_s"],
        s(&st["capture_source"]),
        if st["broker_connected"] == true {
            "connected"
        } else {
            "disconnected"
        },
    );
    for sh in st["shards"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "  shard {}@{} ({}) {:?} restarts {}{}\n",
            s(&sh["shard"]["id"]),
            s(&sh["shard"]["version"]),
            s(&sh["capability"]),
            sh["state"],
            sh["restarts"],
            sh["last_failure"]
                .as_str()
                .map(|f| format!(", last failure {f}"))
                .unwrap_or_default()
        ));
    }
    for e in st["last_errors"].as_array().into_iter().flatten() {
        out.push_str(&format!("  error: {}\n", s(e)));
    }
    let lines = v["log_lines"].as_array().cloned().unwrap_or_default();
    out.push_str(&format!(
        "last {} log lines{}:\n",
        lines.len(),
        if v["truncated"] == true {
            " (older ones left out)"
        } else {
            ""
        }
    ));
    for l in &lines {
        out.push_str(&format!("  {}\n", s(l)));
    }
    out
}

/// `shardctl rollouts` for people.
fn rollouts_text(v: &serde_json::Value) -> String {
    let mut out = String::new();
    let row = |r: &serde_json::Value, out: &mut String| {
        let s = |k: &str| r.get(k).and_then(|x| x.as_str()).unwrap_or("").to_owned();
        let n = |k: &str| r.get(k).and_then(|x| x.as_f64()).unwrap_or(0.0);
        out.push_str(&format!(
            "{:<24} {:<12} {} → {}  canaries {} ran {} failed {} ({:.0} % / {:.0} %)\n    {}\n",
            s("shard"),
            s("phase"),
            s("previous_version"),
            s("new_version"),
            r["canaries"].as_array().map_or(0, Vec::len),
            n("exposed"),
            r["failures"].as_object().map_or(0, |m| m.len()),
            n("failure_pct"),
            n("threshold_pct"),
            s("reason"),
        ));
    };
    let active = v["active"].as_array().cloned().unwrap_or_default();
    if active.is_empty() {
        out.push_str("no rollout running\n");
    }
    for r in &active {
        row(r, &mut out);
    }
    let ended = v["ended"].as_array().cloned().unwrap_or_default();
    if !ended.is_empty() {
        out.push_str("ended:\n");
        for r in ended.iter().take(5) {
            row(r, &mut out);
        }
    }
    out
}

/// `shardctl catalog` for people.
fn catalog_text(rows: &[serde_json::Value]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(o, "{:<24} {:<10} STATUS", "SHARD", "CAPABILITY");
    for r in rows {
        let failing = r
            .get("failing")
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default();
        let status = if failing.is_empty() {
            "ok".to_owned()
        } else {
            failing
                .iter()
                .map(|f| {
                    format!(
                        "FAILING on {}: {} ({} devices)",
                        text(f, "arch"),
                        text(f, "reason"),
                        f.get("devices")
                            .and_then(|v| v.as_array())
                            .map_or(0, Vec::len)
                    )
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(
            o,
            "{:<24} {:<10} {status}",
            text(r, "shard"),
            text(r, "capability")
        );
    }
    o
}

/// Device ids are checked here as the allocator checks them (they end up
/// in URL paths, topics and file names), so a malformed one is refused
/// before any request.
fn parse_device(s: &str) -> Result<DeviceId, String> {
    DeviceId::new(s).map_err(|e| e.to_string())
}
