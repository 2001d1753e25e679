//! The whole loop on one machine, as real processes: shard libraries
//! installed with their SHA-256 in a catalog, an allocator (embedded broker
//! and store, or an external broker) with its signing key, an enrolled
//! device and its agent. Used by `cargo xtask demo`, `cargo xtask bench e2e`
//! and the workspace integration tests (`tests/tests/full_loop.rs`).

use super::json::Json;
use super::proc::{free_stable_udp_port, free_tcp_port, Proc};
use super::sha256;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Cargo packages the loop runs: the two programs and the first catalog's shards.
pub const PACKAGES: &[&str] = &[
    "shardline-agent",
    "shardline-allocator",
    "shard-vpn-tunnel",
    "shard-crypto-chacha20poly1305",
    "shard-crypto-aes256gcm",
    "shard-auth-psk",
    "shard-qos-shaper",
    "shard-qos-dscp",
];

/// `cargo build` of [`PACKAGES`] into `target_dir` (debug profile, or release).
pub fn build(root: &Path, target_dir: &Path, release: bool) -> Result<(), String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // SIGINT stays deliverable to cargo even under the demo's Ctrl-C handling.
    let mut cmd = super::interrupt::Interrupt::interruptible(&cargo);
    cmd.current_dir(root)
        .arg("build")
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        cmd.arg("--release");
    }
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    let st = cmd
        .status()
        .map_err(|e| format!("cannot run cargo build: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cargo build failed: {st}"))
    }
}

/// The built programs of one cargo profile directory (e.g. `target/debug`).
#[derive(Debug, Clone)]
pub struct Bins {
    pub profile_dir: PathBuf,
    pub agent: PathBuf,
    pub allocator: PathBuf,
    pub shardctl: PathBuf,
}

impl Bins {
    pub fn in_profile(profile_dir: &Path) -> Result<Bins, String> {
        let b = Bins {
            profile_dir: profile_dir.to_owned(),
            agent: profile_dir.join("shardline-agent"),
            allocator: profile_dir.join("shardline-allocator"),
            shardctl: profile_dir.join("shardctl"),
        };
        for p in [&b.agent, &b.allocator, &b.shardctl] {
            if !p.exists() {
                return Err(format!("{} is not built", p.display()));
            }
        }
        Ok(b)
    }
}

fn output(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{:?} {:?} failed ({}): {}{}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The loopback addresses the shards of the demo catalog use.
#[derive(Debug, Clone)]
pub struct ShardPorts {
    pub tunnel_bind: u16,
    pub tunnel_peer: u16,
    pub tunnel_inner_listen: u16,
    pub tunnel_inner_forward: u16,
    /// The qos-shaper listens here and forwards to `shaper_forward`.
    pub shaper_listen: u16,
    pub shaper_forward: u16,
}

impl ShardPorts {
    /// Below the ephemeral range: a renewal may restart a shard host,
    /// which binds its ports again (see [`free_stable_udp_port`]).
    pub fn pick() -> ShardPorts {
        ShardPorts {
            tunnel_bind: free_stable_udp_port(),
            tunnel_peer: free_stable_udp_port(),
            tunnel_inner_listen: free_stable_udp_port(),
            tunnel_inner_forward: free_stable_udp_port(),
            shaper_listen: free_stable_udp_port(),
            shaper_forward: free_stable_udp_port(),
        }
    }

    /// The loop device's own configuration of the vpn and qos shards, as
    /// `shardctl config set` arguments: (shard, clear `k=v`s, secret `k=v`s).
    /// Per device, not in the catalog: the catalog declares these keys
    /// `device_config` / `secret_config` and refuses a secret in clear.
    pub fn device_configs(&self) -> Vec<(&'static str, Vec<String>, Vec<String>)> {
        vec![
            (
                "vpn-tunnel",
                vec![
                    "role=initiator".into(),
                    format!("bind=127.0.0.1:{}", self.tunnel_bind),
                    format!("peer=127.0.0.1:{}", self.tunnel_peer),
                    format!("inner_listen=127.0.0.1:{}", self.tunnel_inner_listen),
                    format!("inner_forward=127.0.0.1:{}", self.tunnel_inner_forward),
                    "retry_ms=1000".into(),
                ],
                vec![],
            ),
            // A demo key, sealed to the device by the allocator.
            ("auth-psk", vec![], vec![format!("psk={}", "5d".repeat(32))]),
            // The catalog sets the rate; where traffic comes from and goes
            // to is the device's own.
            (
                "qos-shaper",
                vec![
                    format!("listen=127.0.0.1:{}", self.shaper_listen),
                    format!("forward=127.0.0.1:{}", self.shaper_forward),
                ],
                vec![],
            ),
        ]
    }

    /// Fleet-wide shard configuration bytes per shard id (in the catalog).
    fn configs(&self) -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        m.insert(
            "qos-dscp",
            "small_bytes = 256\nsmall_dscp = 46\nbulk_dscp = 10\n".into(),
        );
        m
    }
}

/// Installs the shard libraries of `bins` into `dir` (through the agent's own
/// `shards install`: `{id}@{version}.so`, root-owned when root, mode 0644)
/// and returns `file stem -> SHA-256 hex` of what was installed.
pub fn install_shards(bins: &Bins, dir: &Path) -> Result<BTreeMap<String, String>, String> {
    output(
        Command::new(&bins.agent)
            .args(["shards", "install"])
            .arg(&bins.profile_dir)
            .arg(dir),
    )?;
    let mut digests = BTreeMap::new();
    for e in std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))? {
        let p = e.map_err(|e| e.to_string())?.path();
        if p.extension().is_some_and(|x| x == "so") {
            let stem = p
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            digests.insert(stem, sha256::file_hex(&p)?);
        }
    }
    if digests.is_empty() {
        return Err(format!("no shard library installed into {}", dir.display()));
    }
    Ok(digests)
}

/// Smallest memory limit the loop's catalog gives a shard (one unit).
pub const MIN_SHARD_MEMORY_KIB: u64 = 16_384;

/// The catalog `template` with every `[[shard]]`'s `sha256` replaced by the
/// digest of the installed `{id}@{version}.so` (as packaging/build-debs.sh
/// does), the demo's shard configuration added, and memory limits of at
/// least [`MIN_SHARD_MEMORY_KIB`]. A shard with no installed
/// file is an error: its placeholder digest would make every activation fail.
pub fn catalog_with_digests(
    template: &str,
    digests: &BTreeMap<String, String>,
    ports: &ShardPorts,
) -> Result<String, String> {
    let configs = ports.configs();
    let mut out = String::new();
    // (id, version) of the [[shard]] table being read.
    let mut id: Option<String> = None;
    let mut version: Option<String> = None;
    let mut pending: Vec<String> = Vec::new();
    let value = |l: &str| {
        l.split_once('=')
            .map(|(_, v)| v.trim().trim_matches('"').to_owned())
    };
    let flush = |out: &mut String,
                 pending: &mut Vec<String>,
                 id: &Option<String>,
                 version: &Option<String>|
     -> Result<(), String> {
        if let (Some(id), Some(version)) = (id, version) {
            let key = format!("{id}@{version}");
            let digest = digests
                .get(&key)
                .ok_or_else(|| format!("catalog shard {key} has no installed library"))?;
            for l in pending.iter() {
                let t = l.trim_start();
                if t.starts_with("sha256") {
                    out.push_str(&format!("sha256 = \"{digest}\"\n"));
                } else if let Some(kib) = t
                    .strip_prefix("memory_kib")
                    .and_then(|v| v.trim_start().strip_prefix('='))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .filter(|&kib| kib < MIN_SHARD_MEMORY_KIB)
                {
                    // A host process's own RSS (a debug build's is ~9 MiB) is
                    // charged to its shards' memory limits: the example
                    // figures would have the agent kill the host at once.
                    out.push_str(&format!(
                        "memory_kib = {MIN_SHARD_MEMORY_KIB} # catalog example: {kib}; raised for a whole host process\n"
                    ));
                } else {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            if let Some(c) = configs.get(id.as_str()) {
                out.push_str(&format!("config = '''\n{c}'''\n"));
            }
        } else {
            for l in pending.iter() {
                out.push_str(l);
                out.push('\n');
            }
        }
        pending.clear();
        Ok(())
    };
    for line in template.lines() {
        let t = line.trim_start();
        if t.starts_with('[') {
            flush(&mut out, &mut pending, &id, &version)?;
            id = None;
            version = None;
            if t.starts_with("[[shard]]") {
                // Collect the table; it is written once id and version are known.
                id = Some(String::new());
            }
            if id.is_none() {
                out.push_str(line);
                out.push('\n');
                continue;
            }
            pending.push(line.to_owned());
            continue;
        }
        if id.is_some() {
            if t.starts_with("id") && t[2..].trim_start().starts_with('=') {
                id = value(t);
            } else if t.starts_with("version") {
                version = value(t);
            }
            pending.push(line.to_owned());
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    flush(&mut out, &mut pending, &id, &version)?;
    Ok(out)
}

/// How the allocator reaches its MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Broker {
    /// The allocator's embedded broker on a free loopback port.
    Embedded,
    /// An external broker, e.g. `mqtt://127.0.0.1:1883`.
    External(String),
}

/// What the agent watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capture {
    /// Replays this capture file with its original pacing.
    Pcap(PathBuf),
    /// Watches these live interfaces (needs root).
    Interfaces(Vec<String>),
}

/// Settings of one loop.
#[derive(Debug, Clone)]
pub struct LoopConfig {
    pub device: String,
    pub tier: String,
    pub broker: Broker,
    pub capture: Capture,
    /// The agent's QoS window (= report period), ms.
    pub window_ms: u32,
    /// The policy tick, ms.
    pub tick_ms: u64,
    /// How long a need keeps its capability after it was last seen, ms.
    pub hysteresis_ms: u64,
    /// The device is not enrolled by the operator: its agent enrols itself
    /// with the bootstrap token in [`Stack::enroll_token_file`] (which the
    /// caller writes, mode 0600, before starting the agent).
    pub enroll_with_token: bool,
    /// Appended to the agent's configuration as is, right after the
    /// `[requests]` section's `socket` line (`<dir>/agent.sock`): its first
    /// lines may set more request options, then come further sections (the
    /// applications, `[[apps]]`).
    pub agent_extra: String,
}

impl LoopConfig {
    /// Settings for a short demo: 1 s windows, 3 s hysteresis.
    pub fn demo(capture: Capture) -> LoopConfig {
        LoopConfig {
            device: "demo-router".into(),
            tier: "premium".into(),
            broker: Broker::Embedded,
            capture,
            window_ms: 1_000,
            tick_ms: 100,
            hysteresis_ms: 3_000,
            enroll_with_token: false,
            agent_extra: String::new(),
        }
    }
}

/// The running allocator and agent of one loop, and their files.
#[derive(Debug)]
pub struct Stack {
    pub dir: PathBuf,
    pub bins: Bins,
    pub cfg: LoopConfig,
    pub ports: ShardPorts,
    pub api: String,
    pub mqtt_port: u16,
    pub token_file: PathBuf,
    pub device_key: String,
    pub allocator: Proc,
    pub agent: Option<Proc>,
    /// shard id -> capability, from the catalog.
    pub capability_of: BTreeMap<String, String>,
    /// `shardctl enroll` output.
    pub enrolled: String,
    /// Bound at the vpn tunnel's peer address so its handshakes land
    /// somewhere (an unbound port answers with ICMP errors, which the tunnel
    /// counts and the allocator holds against the device's reputation).
    pub tunnel_peer: Option<std::net::UdpSocket>,
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

impl Stack {
    /// Installs the shards, writes the catalog, generates the allocator key,
    /// starts the allocator and waits for its API, creates the device key and
    /// enrols the device. The agent is started by [`Stack::start_agent`].
    pub fn prepare(root: &Path, bins: &Bins, dir: &Path, cfg: LoopConfig) -> Result<Stack, String> {
        let shard_dir = dir.join("shards");
        let digests = install_shards(bins, &shard_dir)?;
        let ports = ShardPorts::pick();
        let peer = std::net::UdpSocket::bind(("127.0.0.1", ports.tunnel_peer))
            .map_err(|e| format!("bind the tunnel peer port: {e}"))?;
        let template_path = root.join("allocator/catalog/catalog.toml");
        let template = std::fs::read_to_string(&template_path)
            .map_err(|e| format!("{}: {e}", template_path.display()))?;
        let catalog = catalog_with_digests(&template, &digests, &ports)?;
        write(&dir.join("catalog.toml"), &catalog)?;
        let mut capability_of = BTreeMap::new();
        let (mut id, mut cap) = (None::<String>, None::<String>);
        for l in catalog.lines().chain(std::iter::once("[end]")) {
            let l = l.trim();
            if l.starts_with('[') {
                if let (Some(i), Some(c)) = (id.take(), cap.take()) {
                    capability_of.insert(i, c);
                }
            } else if let Some((k, v)) = l.split_once('=') {
                match k.trim() {
                    "id" => id = Some(v.trim().trim_matches('"').to_owned()),
                    "capability" => cap = Some(v.trim().trim_matches('"').to_owned()),
                    _ => {}
                }
            }
        }
        let key = dir.join("allocator.key");
        let kg = output(
            Command::new(&bins.allocator)
                .arg("keygen")
                .arg("--out")
                .arg(&key),
        )?;
        let public = kg
            .lines()
            .find_map(|l| l.strip_prefix("public_key "))
            .ok_or_else(|| format!("keygen printed no public key: {kg}"))?
            .trim()
            .to_owned();
        let mqtt_port = free_tcp_port();
        let api_port = free_tcp_port();
        let token_file = dir.join("api-token");
        let broker_url = match &cfg.broker {
            Broker::Embedded => String::new(),
            Broker::External(u) => u.clone(),
        };
        let alloc_conf = dir.join("allocator.toml");
        write(
            &alloc_conf,
            &format!(
                "# Written by the Shardline loop (cargo xtask demo / tests): short policy\n\
                 # timings so that a need shows its effect within seconds.\n\
                 [broker]\nurl = \"{broker_url}\"\nlisten = \"127.0.0.1:{mqtt_port}\"\nclient_id = \"demo-allocator-{pid}\"\n\
                 [store]\npath = \"{d}/allocator.redb\"\n\
                 [signer]\nkey_file = \"{key}\"\n\
                 [api]\nlisten = \"127.0.0.1:{api_port}\"\ntoken_file = \"{tok}\"\n\
                 [policy]\ncatalog = \"{d}/catalog.toml\"\nagreements = \"{tiers}\"\ntick_ms = {tick}\n\
                 [policy.engine]\nhysteresis_ms = {hyst}\n\
                 [policy.engine.features]\ndemand_driven = true\nprediction = false\nborrowing = false\nshifting = false\n\
                 [dispatch]\nresend_after_ms = 2000\n",
                pid = std::process::id(),
                d = dir.display(),
                key = key.display(),
                tok = token_file.display(),
                tiers = root.join("allocator/catalog/tiers.toml").display(),
                tick = cfg.tick_ms,
                hyst = cfg.hysteresis_ms,
            ),
        )?;
        let mut cmd = Command::new(&bins.allocator);
        cmd.arg("run")
            .arg("--config")
            .arg(&alloc_conf)
            .env("RUST_LOG", "info");
        let allocator = Proc::spawn("allocator", cmd, &dir.join("allocator.log"))?;
        let mut stack = Stack {
            dir: dir.to_owned(),
            bins: bins.clone(),
            cfg,
            ports,
            api: format!("http://127.0.0.1:{api_port}"),
            mqtt_port,
            token_file,
            device_key: String::new(),
            allocator,
            agent: None,
            capability_of,
            enrolled: String::new(),
            tunnel_peer: Some(peer),
        };
        // Up when shardctl gets an answer (the token file exists by then too).
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = stack.allocator.exited() {
                return Err(format!(
                    "the allocator exited ({st}):\n{}",
                    stack.allocator.log_tail(20)
                ));
            }
            if stack.token_file.exists() && stack.shardctl(&["--json", "devices"]).is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "the allocator's API did not come up:\n{}",
                    stack.allocator.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The agent's configuration; `check-config --print-pubkey` creates the device key.
        let broker = match &stack.cfg.broker {
            Broker::Embedded => format!("mqtt://127.0.0.1:{mqtt_port}"),
            Broker::External(u) => u.clone(),
        };
        let monitor = match &stack.cfg.capture {
            Capture::Pcap(p) => format!("pcap = \"{}\"\n", p.display()),
            Capture::Interfaces(i) => format!(
                "interfaces = [{}]\n",
                i.iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        let enroll = if stack.cfg.enroll_with_token {
            format!(
                "enroll_token_file = \"{}\"\n",
                stack.enroll_token_file().display()
            )
        } else {
            String::new()
        };
        write(
            &stack.agent_config(),
            &format!(
                "[device]\nid = \"{dev}\"\nkey_file = \"{d}/device.key\"\n\n\
                 [allocator]\nkeys = [\"{public}\"]\n{enroll}\n\
                 [broker]\nurl = \"{broker}\"\nkeep_alive_s = 5\nreconnect_min_ms = 50\nreconnect_max_ms = 500\n\n\
                 [monitor]\n{monitor}window_ms = {win}\n\n\
                 [shards]\ndir = \"{d}/shards\"\n\n\
                 [state]\ndir = \"{d}/agent-state\"\n\n\
                 [requests]\nsocket = \"{d}/agent.sock\"\n{extra}",
                extra = stack.cfg.agent_extra,
                dev = stack.cfg.device,
                d = dir.display(),
                win = stack.cfg.window_ms,
            ),
        )?;
        stack.device_key = output(
            Command::new(&bins.agent)
                .args(["check-config", "--print-pubkey", "--config"])
                .arg(stack.agent_config()),
        )?
        .trim()
        .to_owned();
        let (device, key, tier) = (
            stack.cfg.device.clone(),
            stack.device_key.clone(),
            stack.cfg.tier.clone(),
        );
        if !stack.cfg.enroll_with_token {
            stack.enrolled = stack.shardctl(&["enroll", &device, &key, "--tier", &tier])?;
            stack.configure_device()?;
        }
        Ok(stack)
    }

    /// Sets the loop device's own vpn configuration (see
    /// [`ShardPorts::device_configs`]); the device must be enrolled. The
    /// secret goes through a 0600 file, as an operator's would.
    pub fn configure_device(&self) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        for (shard, clear, secret) in self.ports.device_configs() {
            let mut args: Vec<String> = vec![
                "config".into(),
                "set".into(),
                self.cfg.device.clone(),
                shard.into(),
            ];
            args.extend(clear);
            for (i, kv) in secret.iter().enumerate() {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                let file = self.dir.join(format!("secret-{shard}-{i}"));
                write(&file, v)?;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                args.push("--secret-file".into());
                args.push(format!("{k}={}", file.display()));
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.shardctl(&args)?;
        }
        Ok(())
    }

    pub fn agent_config(&self) -> PathBuf {
        self.dir.join("agent.toml")
    }

    /// Where the agent reads its bootstrap token when
    /// [`LoopConfig::enroll_with_token`] is set.
    pub fn enroll_token_file(&self) -> PathBuf {
        self.dir.join("enroll-token")
    }

    /// Starts `shardline-agent run` (optionally wrapped, e.g. in `ip netns exec`).
    pub fn start_agent(&mut self) -> Result<(), String> {
        let mut cmd = Command::new(&self.bins.agent);
        cmd.arg("run")
            .arg("--config")
            .arg(self.agent_config())
            .env("SHARDLINE_LOG", "info")
            .env_remove("NOTIFY_SOCKET");
        self.agent = Some(Proc::spawn("agent", cmd, &self.dir.join("agent.log"))?);
        Ok(())
    }

    /// Runs `shardctl` against this allocator; its standard output.
    pub fn shardctl(&self, args: &[&str]) -> Result<String, String> {
        output(
            Command::new(&self.bins.shardctl)
                .arg("--api")
                .arg(&self.api)
                .arg("--token-file")
                .arg(&self.token_file)
                .args(args),
        )
    }

    /// `shardctl --json device <device>`, parsed.
    pub fn device(&self) -> Result<DeviceView, String> {
        let text = self.shardctl(&["--json", "device", &self.cfg.device])?;
        let json = Json::parse(&text).map_err(|e| format!("shardctl device output: {e}"))?;
        Ok(DeviceView::from_json(&json, &self.capability_of))
    }

    /// The agent's `status.json` (rewritten every second), parsed.
    pub fn agent_status(&self) -> Option<Json> {
        let text = std::fs::read_to_string(self.dir.join("agent-state/status.json")).ok()?;
        Json::parse(&text).ok()
    }

    /// Fails with the logs' tails when either process has died.
    pub fn check_alive(&mut self) -> Result<(), String> {
        if let Some(st) = self.allocator.exited() {
            return Err(format!(
                "the allocator exited ({st}):\n{}",
                self.allocator.log_tail(30)
            ));
        }
        if let Some(agent) = self.agent.as_mut() {
            if let Some(st) = agent.exited() {
                return Err(format!("the agent exited ({st}):\n{}", agent.log_tail(30)));
            }
        }
        Ok(())
    }

    /// Stops the agent, then the allocator (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.stop(Duration::from_secs(5));
        }
        self.allocator.stop(Duration::from_secs(5));
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the allocator shows about the device, condensed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DeviceView {
    pub presence: String,
    pub applied_instruction_seq: u64,
    pub instructions_applied: u64,
    pub pending: usize,
    /// capability -> shard ids of the granted leases.
    pub leases: BTreeMap<String, Vec<String>>,
    /// capability -> shard ids the device's last report says are running.
    pub running: BTreeMap<String, Vec<String>>,
    /// Traffic classes of the last report with a need, e.g. `sensitive`.
    pub classes: Vec<String>,
    /// capability -> why the allocator does not grant it (e.g. `capacity`).
    pub refusals: BTreeMap<String, String>,
    /// (decision kind, capability) -> the allocator's latest explanation of
    /// it, e.g. ("grant", "vpn") -> "vpn granted: a reported need asks …".
    pub decisions: BTreeMap<(String, String), String>,
}

impl DeviceView {
    /// Why the allocator last made this kind of decision on `capability`.
    pub fn why(&self, kind: &str, capability: &str) -> Option<&str> {
        self.decisions
            .get(&(kind.to_owned(), capability.to_owned()))
            .map(String::as_str)
    }
}

fn shard_id(v: &Json) -> Option<String> {
    match v {
        Json::Str(s) => Some(s.split('@').next().unwrap_or(s).to_owned()),
        _ => v.get("id").as_str().map(str::to_owned),
    }
}

impl DeviceView {
    pub fn from_json(j: &Json, capability_of: &BTreeMap<String, String>) -> DeviceView {
        let mut v = DeviceView {
            presence: j.get("presence").as_str().unwrap_or("").to_owned(),
            applied_instruction_seq: j.get("applied_instruction_seq").as_u64().unwrap_or(0),
            instructions_applied: j.get("instructions_applied").as_u64().unwrap_or(0),
            pending: j.get("pending_instructions").items().len(),
            ..DeviceView::default()
        };
        let policy = j.get("policy");
        for l in policy.get("leases").items() {
            if let (Some(id), Some(cap)) = (shard_id(l.get("shard")), l.get("capability").as_str())
            {
                v.leases.entry(cap.to_owned()).or_default().push(id);
            }
        }
        let qos = policy.get("last_qos");
        for s in qos.get("running_shards").items() {
            if let Some(id) = shard_id(s) {
                let cap = capability_of
                    .get(&id)
                    .cloned()
                    .unwrap_or_else(|| "?".into());
                v.running.entry(cap).or_default().push(id);
            }
        }
        for c in qos.get("classes").items() {
            let need = c.get("need");
            let needs = ["latency_sensitive", "bandwidth_heavy", "needs_encryption"]
                .iter()
                .any(|k| need.get(k) == &Json::Bool(true));
            if let (true, Some(name)) = (needs, c.get("class").as_str()) {
                v.classes.push(name.to_owned());
            }
        }
        // The allocator's words for each refusal (with its numbers) when it
        // gives them; the bare variant otherwise.
        if let Json::Obj(m) = policy.get("refusal_reasons") {
            for (cap, why) in m {
                if let Json::Str(s) = why {
                    v.refusals.insert(cap.clone(), s.clone());
                }
            }
        }
        if let Json::Obj(m) = policy.get("refusals") {
            for (cap, why) in m {
                let why = match why {
                    Json::Str(s) => s.clone(),
                    Json::Obj(o) => o.keys().cloned().collect::<Vec<_>>().join(","),
                    other => format!("{other:?}"),
                };
                v.refusals.entry(cap.clone()).or_insert(why);
            }
        }
        // Oldest first: the latest explanation of each wins.
        for d in policy.get("decisions").items() {
            if let (Some(kind), Some(subject), Some(text)) = (
                d.get("kind").as_str(),
                d.get("subject").as_str(),
                d.get("explanation").as_str(),
            ) {
                v.decisions
                    .insert((kind.to_owned(), subject.to_owned()), text.to_owned());
            }
        }
        for s in v.leases.values_mut().chain(v.running.values_mut()) {
            s.sort();
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEMPLATE: &str = "[units]\nmemory_kib = 16384\n\n[[shard]]\nid = \"qos-dscp\"\nversion = \"0.1.0\"\n\
        sha256 = \"00\"\ncapability = \"qos\"\nmemory_kib = 1024\n\n[[shard]]\nid = \"other\"\nversion = \"0.2.0\"\n\
        sha256 = \"00\"\nmemory_kib = 32768\n\n[[rule]]\nneed = \"x\"\n";

    #[test]
    fn the_catalog_gets_the_installed_digests_configs_and_memory_floors() {
        let mut d = BTreeMap::new();
        d.insert("qos-dscp@0.1.0".to_owned(), "ab".repeat(32));
        d.insert("other@0.2.0".to_owned(), "cd".repeat(32));
        let out = catalog_with_digests(TEMPLATE, &d, &ShardPorts::pick()).unwrap();
        assert!(
            out.contains(&format!("sha256 = \"{}\"", "ab".repeat(32))),
            "{out}"
        );
        assert!(
            out.contains(&format!("sha256 = \"{}\"", "cd".repeat(32))),
            "{out}"
        );
        assert!(!out.contains("sha256 = \"00\""), "{out}");
        assert!(out.contains("config = '''\nsmall_bytes = 256"), "{out}");
        assert!(
            out.contains("memory_kib = 16384 # catalog example: 1024"),
            "{out}"
        );
        assert!(
            out.contains("memory_kib = 32768\n"),
            "larger limits stay: {out}"
        );
        assert!(
            out.starts_with("[units]\nmemory_kib = 16384\n")
                && out.contains("[[rule]]\nneed = \"x\""),
            "{out}"
        );
        d.remove("other@0.2.0");
        let err = catalog_with_digests(TEMPLATE, &d, &ShardPorts::pick()).unwrap_err();
        assert!(err.contains("other@0.2.0"), "{err}");
    }

    #[test]
    fn the_device_view_reads_shardctl_json() {
        let json = Json::parse(
            r#"{"presence":"online","applied_instruction_seq":2,"instructions_applied":2,"pending_instructions":[],
               "policy":{"leases":[{"shard":{"id":"qos-shaper","version":"0.1.0"},"capability":"qos"},
                                   {"shard":{"id":"qos-dscp","version":"0.1.0"},"capability":"qos"}],
                         "refusals":{"vpn":"capacity"},
                         "last_qos":{"running_shards":[{"id":"qos-dscp","version":"0.1.0"}],
                                     "classes":[{"class":"Gaming","need":{"latency_sensitive":true}},
                                                {"class":"Web","need":{"latency_sensitive":false}}]}}}"#,
        )
        .unwrap();
        let mut caps = BTreeMap::new();
        caps.insert("qos-dscp".to_owned(), "qos".to_owned());
        let v = DeviceView::from_json(&json, &caps);
        assert_eq!(v.leases["qos"], vec!["qos-dscp", "qos-shaper"]);
        assert_eq!(v.running["qos"], vec!["qos-dscp"]);
        assert_eq!(v.classes, vec!["Gaming"]);
        assert_eq!(v.refusals["vpn"], "capacity");
        assert_eq!((v.applied_instruction_seq, v.pending), (2, 0));
        let json = Json::parse(
            r#"{"policy":{"refusals":{"vpn":{"capacity":{}}},
               "refusal_reasons":{"vpn":"capacity: cpu needs 150‰, free 40‰ (other load 93 %)"}}}"#,
        )
        .unwrap();
        let v = DeviceView::from_json(&json, &caps);
        assert_eq!(
            v.refusals["vpn"],
            "capacity: cpu needs 150‰, free 40‰ (other load 93 %)"
        );
    }
}
