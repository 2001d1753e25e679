//! The I/O edge that runs shard hosts: spawns one host process per active
//! capability (the agent binary re-executed as `shardline-agent host`),
//! places it in its cgroup, sends its setup, watches it (IPC heartbeats,
//! `waitpid`, sysinfo RSS/CPU) and carries out the decisions of the sans-IO
//! [`CapabilityPolicy`] (restart with backoff, quarantine, failover).
//!
//! API for the daemon (single-threaded, non-blocking except process spawn
//! and reaping a killed host):
//! - [`Supervisor::activate`] `(capability, Vec<ShardSpec>, now)` starts (or
//!   replaces) a capability; a [`ShardSpec`] carries the wire
//!   [`Activation`], an optional library path, its sealed secret
//!   configuration, its declared bandwidth and its alternatives
//!   ([`ShardSpec::from_shard_activation`] builds it from the wire
//!   `ShardActivation`). Activating
//!   the same shards again with only new leases is a renewal: it updates the
//!   leases and leaves the host running. Lease *expiry* is the caller's
//!   decision (it calls `deactivate`).
//! - [`Supervisor::poll`] `(now) -> Vec<HostEvent>`: call it at least every
//!   100 ms; crashes, hangs (no heartbeat for `hang_after`) and over-limit
//!   kills are reported within one second.
//! - [`Supervisor::statuses`] gives the wire [`ShardStatus`] list for reports.
//! - [`Supervisor::deactivate`] / [`Supervisor::shutdown`] stop hosts
//!   (graceful `Stop`, then SIGKILL) and remove their cgroups; dropping the
//!   supervisor does the same.
//!
//! A host and everything it may have started are killed together: the
//! host's cgroup is emptied (`cgroup.kill`, or SIGKILL to every pid in it,
//! repeated until empty) before it is removed, on stop, on failure and for
//! stale cgroups of a dead agent; its `pids` limit bounds what it can start.
//!
//! Local failover and sibling isolation are the policy's decisions (see
//! [`super::policy`]); this module carries them out: it maps the host's
//! shard index back to its slot (a host may run a subset of the slots), so
//! a failure is attributed to the shard the host was calling into — the
//! host's loop stores that index in an atomic before every call into a
//! shard, and its fatal-signal handler, its watchdog (`Stuck`), its panic
//! catch (`ShardFailed`) and its `init` check (`InitFailed`) report it. An
//! exit the host could not report (SIGKILL, `exit()` from a shard, the OOM
//! killer) stays unattributed and concerns the whole host.
//!
//! Secret configuration: a variant's `sealed_config` is opened with the
//! device key ([`SealKey`]) only when a host is about to be spawned with
//! it, appended to the clear configuration, sent to the host over the IPC
//! socket and dropped (zeroed); it is never logged, never in a `Debug`
//! output, never written to a file. A box that does not open is the
//! variant's `InitFailed` (an operator fault, deterministic), so the slot
//! fails over. Declared bandwidth is enforced by [`super::bandwidth`].
//!
//! Hosts die with the agent through `PR_SET_PDEATHSIG`, which fires when the
//! *thread* that spawned them exits: drive the supervisor from a long-lived
//! thread (not a short-lived blocking-pool thread).
#![forbid(unsafe_code)]

use super::bandwidth::Enforcer;
use super::ipc::{self, FromHost, HostSetup, HostShard, StatsWire, ToHost};
use super::limits::{CgroupBackend, HostCgroup};
use super::policy::{self, Action, CapabilityPolicy, Phase, PolicyConfig, SlotPhase};
use shardline_shared::msg::{
    Activation, Enforcement, ResourceLimits, ShardActivation, ShardFailure, ShardState,
    ShardStatus, ShardVariant,
};
use shardline_shared::sign::KeyPair;
use shardline_shared::{DeviceId, ShardRef};
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One required shard of a capability, with its alternatives in order of preference.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSpec {
    pub activation: Activation,
    /// Library path; default `{shard_dir}/{id}@{version}.so`.
    pub path: Option<PathBuf>,
    /// Secret `key = value` lines sealed to this device (`shared::seal`),
    /// empty when there are none; opened only when a host is spawned.
    pub sealed_config: Vec<u8>,
    /// Declared bandwidth, kbit/s (0 = none); see [`super::bandwidth`].
    pub bandwidth_kbps: u64,
    /// Alternatives providing the same service (their own alternatives are ignored).
    pub alternatives: Vec<ShardSpec>,
}

impl ShardSpec {
    pub fn new(activation: Activation) -> Self {
        Self {
            activation,
            path: None,
            sealed_config: Vec::new(),
            bandwidth_kbps: 0,
            alternatives: Vec::new(),
        }
    }

    /// The primary of a wire `ShardActivation` with its alternatives, in order.
    pub fn from_shard_activation(a: &ShardActivation) -> Self {
        let variant = |v: &ShardVariant| ShardSpec {
            activation: Activation {
                shard: v.shard.clone(),
                capability: a.capability.clone(),
                kind: a.kind,
                sha256: v.sha256,
                config: v.config.clone(),
                limits: v.limits,
                priority: a.priority,
                lease_expires_at_ms: a.lease_expires_at_ms,
            },
            path: None,
            sealed_config: v.sealed_config.clone(),
            bandwidth_kbps: v.bandwidth_kbps,
            alternatives: Vec::new(),
        };
        ShardSpec {
            alternatives: a.alternatives.iter().map(variant).collect(),
            ..variant(&a.primary)
        }
    }
}

/// The device identity that opens sealed configuration. `Debug` never shows
/// the key.
#[derive(Clone)]
pub struct SealKey {
    pub device: DeviceId,
    pub key: Arc<KeyPair>,
}

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SealKey")
            .field("device", &self.device)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// Opens a variant's sealed configuration and appends it to the clear one.
/// The error names the shard and what failed, never the secret.
/// Also returns the keys of the secret lines (the host redacts their
/// values from what a shard logs or reports).
fn full_config(
    key: Option<&SealKey>,
    spec: &ShardSpec,
) -> Result<(zeroize::Zeroizing<Vec<u8>>, Vec<String>), String> {
    let mut config = zeroize::Zeroizing::new(spec.activation.config.clone());
    if spec.sealed_config.is_empty() {
        return Ok((config, Vec::new()));
    }
    let shard = &spec.activation.shard;
    let Some(k) = key else {
        return Err(format!(
            "sealed configuration of {shard}: this agent has no device key to open it"
        ));
    };
    let secret = zeroize::Zeroizing::new(
        shardline_shared::seal::open_config(&k.key, &k.device, shard, &spec.sealed_config)
            .map_err(|e| format!("sealed configuration of {shard}: {e}"))?,
    );
    if !config.is_empty() && !config.ends_with(b"\n") {
        config.push(b'\n');
    }
    config.extend_from_slice(&secret);
    Ok((config, line_keys(&secret)))
}

/// Keys of `key = value` lines (for the host to redact their values).
fn line_keys(lines: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(lines)
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim().to_owned()))
        .filter(|k| !k.is_empty() && !k.starts_with('#'))
        .collect()
}

/// Something that happened to a capability's host.
#[derive(Debug, Clone, PartialEq)]
pub enum HostEvent {
    Started {
        capability: String,
        shards: Vec<ShardRef>,
        pid: u32,
        enforcement: Enforcement,
    },
    /// The host failed (crash, exit, hang, over-limit, load refused).
    Failed {
        capability: String,
        shard: Option<ShardRef>,
        failure: ShardFailure,
    },
    /// A new host was spawned after a failure.
    Restarted {
        capability: String,
        attempt: u32,
    },
    Quarantined {
        capability: String,
        shard: ShardRef,
    },
    /// A slot moved to its next alternative on its own (local failover).
    FailedOver {
        capability: String,
        from: ShardRef,
        to: ShardRef,
        /// The failure that made the agent leave `from`.
        reason: String,
    },
    /// A failing shard left the host so its siblings keep running: until
    /// its backoff ends, or for good (`for_good`: quarantined, nothing left).
    Isolated {
        capability: String,
        shard: ShardRef,
        for_good: bool,
    },
    /// The capability has nothing left to run.
    GaveUp {
        capability: String,
    },
    Stopped {
        capability: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("capability {0:?} has no shards")]
    Empty(String),
    #[error("capability name refused: {0}")]
    BadCapability(#[from] shardline_shared::IdError),
    #[error("cannot find the agent executable: {0}")]
    Exe(std::io::Error),
}

#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    pub shard_dir: PathBuf,
    /// The binary to run as `… host` (default: this executable).
    pub agent_exe: PathBuf,
    pub heartbeat: Duration,
    /// No message for this long ⇒ hung.
    pub hang_after: Duration,
    pub policy: PolicyConfig,
    /// Try cgroups (else rlimits only).
    pub use_cgroups: bool,
    /// Extra environment for host processes (e.g. `RUST_LOG`).
    pub host_env: Vec<(String, String)>,
    /// Opens sealed configuration (`None`: a variant with a sealed
    /// configuration fails with `InitFailed`).
    pub seal_key: Option<SealKey>,
    /// Enforce declared bandwidth with nftables (see [`super::bandwidth`]).
    pub enforce_bandwidth: bool,
}

impl SupervisorConfig {
    pub fn new(shard_dir: impl Into<PathBuf>) -> Result<Self, SupervisorError> {
        Ok(Self {
            shard_dir: shard_dir.into(),
            agent_exe: std::env::current_exe().map_err(SupervisorError::Exe)?,
            heartbeat: Duration::from_millis(100),
            hang_after: Duration::from_millis(500),
            policy: PolicyConfig::default(),
            use_cgroups: true,
            host_env: Vec::new(),
            seal_key: None,
            enforce_bandwidth: true,
        })
    }
}

#[derive(Debug)]
struct RunningHost {
    child: Child,
    sock: OwnedFd,
    cgroup: Option<HostCgroup>,
    enforcement: Enforcement,
    /// Last sign of life: a valid heartbeat (or start-up progress). Other
    /// messages do not count, so nothing but the host loop keeps a host alive.
    last_msg: Instant,
    /// Sequence number of the last heartbeat accepted (they must increase).
    last_seq: u64,
    running: bool,
    stats: Vec<StatsWire>,
    errors: Vec<u32>,
    /// `(slot, choice)` of the host's shard `i`: a host may run a subset of
    /// the capability's slots (an isolated one sits out).
    slots: Vec<(usize, usize)>,
    /// The dedicated uid whose sent packets are rate-capped, if any.
    capped_uid: Option<u32>,
    /// Attribution hints from the host.
    refused: Option<(u32, String)>,
    init_failed: Option<(u32, String)>,
    failed_shard: Option<u32>,
    fatal_shard: Option<u32>,
    stuck_shard: Option<u32>,
    killed_for: Option<ShardFailure>,
    stopping: bool,
    rss_kib: u64,
    cpu_permille: u32,
}

#[derive(Debug)]
struct Capability {
    name: String,
    specs: Vec<ShardSpec>,
    policy: CapabilityPolicy,
    host: Option<RunningHost>,
    limits: ResourceLimits,
    /// The last failure nobody could attribute to one shard (attributed
    /// ones are kept per choice by the policy).
    last_failure: Option<ShardFailure>,
    errors: u32,
    enforcement: Enforcement,
    rss_kib: u64,
    cpu_permille: u32,
}

impl Capability {
    fn choice(&self, slot: usize, choice: usize) -> &ShardSpec {
        let spec = &self.specs[slot];
        if choice == 0 {
            spec
        } else {
            spec.alternatives.get(choice - 1).unwrap_or(spec)
        }
    }

    fn current_of(&self, slot: usize) -> &ShardSpec {
        self.choice(slot, self.policy.selection()[slot])
    }

    /// Slot of the host's shard `index` (the only one when there is one).
    fn slot_of(&self, host: &RunningHost, index: Option<u32>) -> Option<(usize, usize)> {
        match index {
            Some(i) => host.slots.get(i as usize).copied(),
            None if host.slots.len() == 1 => host.slots.first().copied(),
            None => None,
        }
    }
}

/// Distinct per host across every supervisor of the process: names cgroups
/// and picks sandbox identities (so two supervisors never share a uid).
static SPAWNED: AtomicU64 = AtomicU64::new(0);
/// Distinct per supervisor: names its bandwidth table.
static INSTANCES: AtomicU64 = AtomicU64::new(0);

/// Runs shard hosts. See the module docs for the API contract.
#[derive(Debug)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    epoch: Instant,
    backend: CgroupBackend,
    caps: BTreeMap<String, Capability>,
    sys: sysinfo::System,
    last_sample: Option<Instant>,
    bandwidth: Option<Enforcer>,
}

/// Whether `b` only renews `a` (same shards, configs and limits; other
/// leases). A sealed box is compared by what it holds, not its bytes: the
/// allocator may seal the same secret again for every renewal (a sealed box
/// has a fresh ephemeral key each time), and that must not restart a host.
fn same_except_lease(key: Option<&SealKey>, a: &[ShardSpec], b: &[ShardSpec]) -> bool {
    fn strip(key: Option<&SealKey>, s: &ShardSpec) -> ShardSpec {
        let mut out = s.clone();
        out.activation.lease_expires_at_ms = 0;
        out.sealed_config = sealed_fingerprint(key, s).to_vec();
        out.alternatives = s.alternatives.iter().map(|a| strip(key, a)).collect();
        out
    }
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| strip(key, x) == strip(key, y))
}

/// SHA-256 of the opened secret lines (of the raw box when it does not
/// open, so two different unopenable boxes differ); empty box ⇒ zeros.
fn sealed_fingerprint(key: Option<&SealKey>, s: &ShardSpec) -> [u8; 32] {
    use sha2::Digest;
    if s.sealed_config.is_empty() {
        return [0; 32];
    }
    let opened = key.and_then(|k| {
        shardline_shared::seal::open_config(
            &k.key,
            &k.device,
            &s.activation.shard,
            &s.sealed_config,
        )
        .ok()
        .map(zeroize::Zeroizing::new)
    });
    match opened {
        Some(secret) => sha2::Sha256::new()
            .chain_update(b"opened\0")
            .chain_update(&*secret)
            .finalize()
            .into(),
        None => sha2::Sha256::new()
            .chain_update(b"sealed\0")
            .chain_update(&s.sealed_config)
            .finalize()
            .into(),
    }
}

/// Limits of the host of a set of shards: sums of memory and CPU, the most
/// favourable niceness, the largest weight.
pub fn combined_limits(acts: &[&Activation]) -> ResourceLimits {
    ResourceLimits {
        cpu_quota_permille: acts.iter().map(|a| a.limits.cpu_quota_permille).sum(),
        cpu_weight: acts
            .iter()
            .map(|a| a.limits.cpu_weight)
            .max()
            .unwrap_or(100),
        memory_max_bytes: acts.iter().map(|a| a.limits.memory_max_bytes).sum(),
        nice: acts.iter().map(|a| a.limits.nice).min().unwrap_or(0),
    }
}

impl Supervisor {
    pub fn new(cfg: SupervisorConfig) -> Self {
        let backend = if cfg.use_cgroups {
            CgroupBackend::detect()
        } else {
            CgroupBackend::None
        };
        backend.remove_stale();
        // Rate caps need the host's dedicated uid (agent root, or ambient
        // CAP_SETUID + CAP_SETGID; else a user namespace with the agent's uid)
        // and an `nft` that may change rules (root, or ambient CAP_NET_ADMIN).
        // Decided by capability, not by uid 0 (issue 15).
        let dedicated_uids = crate::shardhost::sandbox::hosts_get_dedicated_uid();
        let nft_allowed = super::bandwidth::can_manage_rules();
        let bandwidth = (cfg.enforce_bandwidth && dedicated_uids && nft_allowed)
            .then(|| Enforcer::new(INSTANCES.fetch_add(1, Ordering::Relaxed)));
        tracing::info!(
            enforcement = ?backend.enforcement(),
            dedicated_uids,
            nft_allowed,
            bandwidth_caps = bandwidth.is_some(),
            "shard supervisor ready"
        );
        Self {
            cfg,
            epoch: Instant::now(),
            backend,
            caps: BTreeMap::new(),
            sys: sysinfo::System::new(),
            last_sample: None,
            bandwidth,
        }
    }

    /// The key that opens sealed configuration of hosts started from now on.
    pub fn set_seal_key(&mut self, key: SealKey) {
        self.cfg.seal_key = Some(key);
    }

    /// How limits are enforced for hosts started from now on.
    pub fn enforcement(&self) -> Enforcement {
        self.backend.enforcement()
    }

    fn ms(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_millis() as u64
    }

    /// Starts `capability` with `shards` (replacing a running instance).
    pub fn activate(
        &mut self,
        capability: &str,
        shards: Vec<ShardSpec>,
        now: Instant,
    ) -> Result<Vec<HostEvent>, SupervisorError> {
        // The name becomes part of a cgroup directory name.
        shardline_shared::ids::check_capability(capability)?;
        if shards.is_empty() {
            return Err(SupervisorError::Empty(capability.to_owned()));
        }
        // A renewal (same shards, new lease) must not restart a running host.
        if let Some(cap) = self.caps.get_mut(capability) {
            if same_except_lease(self.cfg.seal_key.as_ref(), &cap.specs, &shards) {
                cap.specs = shards;
                return Ok(Vec::new());
            }
        }
        let mut events = self.deactivate(capability);
        events.retain(|e| !matches!(e, HostEvent::Stopped { .. }));
        let choices: Vec<usize> = shards.iter().map(|s| 1 + s.alternatives.len()).collect();
        let mut policy = CapabilityPolicy::new(
            self.cfg.policy,
            &choices,
            policy::isolatable_capability(capability),
        );
        let actions = policy.start(self.ms(now));
        let cap = Capability {
            name: capability.to_owned(),
            specs: shards,
            policy,
            host: None,
            limits: ResourceLimits {
                cpu_quota_permille: 0,
                cpu_weight: 100,
                memory_max_bytes: 0,
                nice: 0,
            },
            last_failure: None,
            errors: 0,
            enforcement: self.backend.enforcement(),
            rss_kib: 0,
            cpu_permille: 0,
        };
        self.caps.insert(capability.to_owned(), cap);
        self.apply(capability, actions, now, &mut events, None);
        Ok(events)
    }

    /// Stops `capability`'s host (if any) and forgets it.
    pub fn deactivate(&mut self, capability: &str) -> Vec<HostEvent> {
        let Some(mut cap) = self.caps.remove(capability) else {
            return Vec::new();
        };
        cap.policy.stop();
        if let Some(host) = cap.host.take() {
            self.release(&host);
            stop_host(host);
        }
        vec![HostEvent::Stopped {
            capability: capability.to_owned(),
        }]
    }

    /// Stops every host.
    pub fn shutdown(&mut self) -> Vec<HostEvent> {
        let names: Vec<String> = self.caps.keys().cloned().collect();
        names.iter().flat_map(|n| self.deactivate(n)).collect()
    }

    /// Active capabilities.
    pub fn capabilities(&self) -> Vec<String> {
        self.caps.keys().cloned().collect()
    }

    /// Pid of a capability's current host.
    pub fn host_pid(&self, capability: &str) -> Option<u32> {
        self.caps
            .get(capability)?
            .host
            .as_ref()
            .map(|h| h.child.id())
    }

    /// Latest per-shard counters of a capability's host.
    pub fn shard_stats(&self, capability: &str) -> Vec<StatsWire> {
        self.caps
            .get(capability)
            .and_then(|c| c.host.as_ref())
            .map(|h| h.stats.clone())
            .unwrap_or_default()
    }

    /// Watches every host; returns what happened since the last call.
    pub fn poll(&mut self, now: Instant) -> Vec<HostEvent> {
        let mut events = Vec::new();
        let sample = self
            .last_sample
            .is_none_or(|t| now.duration_since(t) >= Duration::from_millis(200));
        if sample {
            self.sample_resources();
            self.last_sample = Some(now);
        }
        let names: Vec<String> = self.caps.keys().cloned().collect();
        for name in names {
            self.poll_one(&name, now, &mut events);
            let ms = self.ms(now);
            let actions = match self.caps.get_mut(&name) {
                Some(c) => c.policy.tick(ms),
                None => continue,
            };
            self.apply(&name, actions, now, &mut events, None);
        }
        events
    }

    fn sample_resources(&mut self) {
        use sysinfo::{Pid, ProcessRefreshKind, ProcessesToUpdate};
        let pids: Vec<Pid> = self
            .caps
            .values()
            .filter_map(|c| c.host.as_ref().map(|h| Pid::from_u32(h.child.id())))
            .collect();
        if pids.is_empty() {
            return;
        }
        self.sys.refresh_processes_specifics(
            ProcessesToUpdate::Some(&pids),
            true,
            ProcessRefreshKind::nothing().with_memory().with_cpu(),
        );
        for cap in self.caps.values_mut() {
            let Some(host) = cap.host.as_mut() else {
                continue;
            };
            if let Some(p) = self.sys.process(Pid::from_u32(host.child.id())) {
                host.rss_kib = p.memory() / 1024;
                host.cpu_permille = (p.cpu_usage() * 10.0) as u32;
                cap.rss_kib = host.rss_kib;
                cap.cpu_permille = host.cpu_permille;
            }
        }
    }

    fn poll_one(&mut self, name: &str, now: Instant, events: &mut Vec<HostEvent>) {
        let ms = self.ms(now);
        let epoch = self.epoch;
        let hang_after = self.cfg.hang_after;
        let Some(cap) = self.caps.get_mut(name) else {
            return;
        };
        let Some(host) = cap.host.as_mut() else {
            return;
        };
        let mut buf = vec![0u8; ipc::MAX_DATAGRAM];
        let mut closed = false;
        // Bounded per poll: a host flooding its socket cannot stall the agent.
        for _ in 0..256 {
            match ipc::recv(host.sock.as_fd(), &mut buf, true) {
                Ok(Some(n)) => match ipc::decode_from_host(&buf[..n]) {
                    Ok(msg) => handle_msg(
                        name,
                        host,
                        msg,
                        &mut cap.policy,
                        now,
                        epoch,
                        events,
                        &cap.specs,
                    ),
                    Err(e) => {
                        tracing::warn!(capability = name, error = %e, "malformed message from host");
                        cap.errors += 1;
                    }
                },
                Ok(None) => break,
                Err(_) => {
                    closed = true;
                    break;
                }
            }
        }
        // Over-limit: the RSS watchdog catches hosts the cgroup (or rlimit) has not yet.
        let limit_kib = cap.limits.memory_max_bytes / 1024;
        if host.killed_for.is_none() && limit_kib > 0 && host.rss_kib > limit_kib {
            tracing::warn!(
                capability = name,
                rss_kib = host.rss_kib,
                limit_kib,
                "host over its memory limit; killing"
            );
            kill(host, ShardFailure::OverLimit);
        }
        if host.killed_for.is_none() && !closed && now.duration_since(host.last_msg) > hang_after {
            tracing::warn!(capability = name, "host missed its heartbeats; killing");
            kill(host, ShardFailure::Hung);
        }
        let exited = match host.child.try_wait() {
            Ok(Some(st)) => Some(st),
            Ok(None) if closed || host.killed_for.is_some() => {
                // The socket closed (the host is exiting) or we killed it: reap now.
                let deadline = Instant::now() + Duration::from_millis(300);
                loop {
                    match host.child.try_wait() {
                        Ok(Some(st)) => break Some(st),
                        _ if Instant::now() >= deadline => {
                            kill(host, ShardFailure::Hung);
                            break host.child.wait().ok();
                        }
                        _ => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            }
            _ => None,
        };
        let Some(status) = exited else {
            return;
        };
        let Some(host) = cap.host.take() else {
            return;
        };
        use std::os::unix::process::ExitStatusExt;
        let oom = host.cgroup.as_ref().is_some_and(|c| c.oom_killed());
        let (failure, index) = if let Some((idx, reason)) = host.refused.clone() {
            (ShardFailure::LoadRefused { reason }, Some(idx))
        } else if let Some((idx, reason)) = host.init_failed.clone() {
            (ShardFailure::InitFailed { reason }, Some(idx))
        } else if let Some(f) = host.killed_for.clone() {
            (f, host.stuck_shard.or(host.fatal_shard))
        } else if let Some(idx) = host.stuck_shard {
            // The host's watchdog reported the stall and ended the host itself.
            (ShardFailure::Hung, Some(idx))
        } else if let Some(sig) = status.signal() {
            if sig == nix::sys::signal::Signal::SIGKILL as i32 && oom {
                (
                    ShardFailure::OverLimit,
                    host.fatal_shard.or(host.stuck_shard),
                )
            } else {
                (ShardFailure::Crashed { signal: sig }, host.fatal_shard)
            }
        } else {
            let code = status.code().unwrap_or(-1);
            (ShardFailure::Exited { code }, host.failed_shard)
        };
        let attributed = cap.slot_of(&host, index);
        let capped_uid = host.capped_uid;
        if let Some(cg) = host.cgroup {
            cg.remove();
        }
        let shard = attributed.map(|(s, c)| cap.choice(s, c).activation.shard.clone());
        tracing::warn!(capability = name, shard = ?shard.as_ref().map(|s| s.to_string()), failure = ?failure, "shard host failed");
        cap.errors += 1;
        if attributed.is_none() {
            cap.last_failure = Some(failure.clone());
        }
        events.push(HostEvent::Failed {
            capability: name.to_owned(),
            shard,
            failure: failure.clone(),
        });
        let actions = cap
            .policy
            .on_failure(ms, attributed.map(|(s, _)| s), &failure);
        if let (Some(uid), Some(bw)) = (capped_uid, self.bandwidth.as_mut()) {
            bw.clear(uid);
        }
        self.apply(name, actions, now, events, Some(&failure));
    }

    /// Frees what a host held outside its process (its rate cap).
    fn release(&mut self, host: &RunningHost) {
        if let (Some(uid), Some(bw)) = (host.capped_uid, self.bandwidth.as_mut()) {
            bw.clear(uid);
        }
    }

    fn apply(
        &mut self,
        name: &str,
        actions: Vec<Action>,
        now: Instant,
        events: &mut Vec<HostEvent>,
        cause: Option<&ShardFailure>,
    ) {
        let ms = self.ms(now);
        for action in actions {
            let Some(cap) = self.caps.get_mut(name) else {
                return;
            };
            match action {
                Action::Spawn {
                    shards: pairs,
                    restart,
                } => {
                    // Secrets are opened now, for this host only; a box that
                    // does not open is this variant's deterministic failure.
                    let mut shards = Vec::with_capacity(pairs.len());
                    for &(slot, choice) in &pairs {
                        let spec = cap.choice(slot, choice);
                        match full_config(self.cfg.seal_key.as_ref(), spec) {
                            Ok((mut config, secret_keys)) => shards.push(HostShard {
                                shard: spec.activation.shard.clone(),
                                path: spec.path.clone().unwrap_or_else(|| {
                                    self.cfg
                                        .shard_dir
                                        .join(format!("{}.so", spec.activation.shard))
                                }),
                                sha256: spec.activation.sha256,
                                config: std::mem::take(&mut *config),
                                secret_keys,
                            }),
                            Err(reason) => {
                                let shard = spec.activation.shard.clone();
                                tracing::warn!(capability = name, shard = %shard, %reason, "shard variant cannot run");
                                let failure = ShardFailure::InitFailed { reason };
                                events.push(HostEvent::Failed {
                                    capability: name.to_owned(),
                                    shard: Some(shard),
                                    failure: failure.clone(),
                                });
                                let more = cap.policy.on_failure(ms, Some(slot), &failure);
                                self.apply(name, more, now, events, Some(&failure));
                                return;
                            }
                        }
                    }
                    let specs: Vec<&ShardSpec> =
                        pairs.iter().map(|&(s, c)| cap.choice(s, c)).collect();
                    let acts: Vec<&Activation> = specs.iter().map(|s| &s.activation).collect();
                    let limits = combined_limits(&acts);
                    let bandwidth_kbps: u64 = specs.iter().map(|s| s.bandwidth_kbps).sum();
                    if restart {
                        events.push(HostEvent::Restarted {
                            capability: name.to_owned(),
                            attempt: cap.policy.restarts(),
                        });
                    }
                    cap.limits = limits;
                    let spawned = SPAWNED.fetch_add(1, Ordering::Relaxed) + 1;
                    let cg_name = format!("shardline-{}-{}-{}", name, std::process::id(), spawned);
                    // Distinct per host, and (mixing in the pid) unlikely to be shared
                    // with a host of another agent process on the same machine.
                    let sandbox_slot = std::process::id()
                        .wrapping_mul(131)
                        .wrapping_add(spawned as u32)
                        % crate::shardhost::sandbox::PROBE_SLOT;
                    // The cap is in the kernel before the host exists.
                    let capped_uid = if bandwidth_kbps == 0 {
                        None
                    } else if let Some(bw) = self.bandwidth.as_mut() {
                        let uid = crate::shardhost::sandbox::SandboxPlan::for_shard_dir(
                            &self.cfg.shard_dir,
                            sandbox_slot,
                        )
                        .dedicated_id();
                        match bw.set(uid, bandwidth_kbps) {
                            Ok(()) => {
                                tracing::info!(
                                    capability = name,
                                    uid,
                                    bandwidth_kbps,
                                    "bandwidth cap installed"
                                );
                                Some(uid)
                            }
                            Err(e) => {
                                tracing::error!(capability = name, bandwidth_kbps, error = %e, "declared bandwidth NOT enforced: nftables refused the cap");
                                None
                            }
                        }
                    } else {
                        tracing::warn!(capability = name, bandwidth_kbps, "declared bandwidth NOT enforced: hosts have no dedicated uid or nft may not change rules (agent neither root nor holding CAP_SETUID + CAP_SETGID + CAP_NET_ADMIN)");
                        None
                    };
                    match spawn_host(
                        &self.cfg,
                        &self.backend,
                        &cg_name,
                        name,
                        limits,
                        shards,
                        now,
                        sandbox_slot,
                    ) {
                        Ok(mut host) => {
                            host.slots = pairs;
                            host.capped_uid = capped_uid;
                            cap.enforcement = host.enforcement;
                            cap.host = Some(host);
                        }
                        Err(e) => {
                            if let (Some(uid), Some(bw)) = (capped_uid, self.bandwidth.as_mut()) {
                                bw.clear(uid);
                            }
                            let Some(cap) = self.caps.get_mut(name) else {
                                return;
                            };
                            tracing::error!(capability = name, error = %e, "cannot spawn shard host");
                            let failure = ShardFailure::LoadRefused { reason: e };
                            events.push(HostEvent::Failed {
                                capability: name.to_owned(),
                                shard: None,
                                failure: failure.clone(),
                            });
                            cap.last_failure = Some(failure.clone());
                            let more = cap.policy.on_failure(ms, None, &failure);
                            self.apply(name, more, now, events, Some(&failure));
                            return;
                        }
                    }
                }
                Action::Quarantine { slot, choice } => {
                    let shard = cap.choice(slot, choice).activation.shard.clone();
                    tracing::warn!(capability = name, shard = %shard, "shard quarantined");
                    events.push(HostEvent::Quarantined {
                        capability: name.to_owned(),
                        shard,
                    })
                }
                Action::FailOver { slot, from, to } => {
                    let from = cap.choice(slot, from).activation.shard.clone();
                    let to = cap.choice(slot, to).activation.shard.clone();
                    let reason = cause.map_or_else(|| "unknown".to_owned(), describe_failure);
                    tracing::warn!(capability = name, from = %from, to = %to, %reason, "local failover to an alternative");
                    events.push(HostEvent::FailedOver {
                        capability: name.to_owned(),
                        from,
                        to,
                        reason,
                    })
                }
                Action::Isolate { slot, until_ms } => {
                    let shard = cap.current_of(slot).activation.shard.clone();
                    tracing::warn!(capability = name, shard = %shard, until_ms, "failing shard isolated; its siblings keep running");
                    events.push(HostEvent::Isolated {
                        capability: name.to_owned(),
                        shard,
                        for_good: until_ms.is_none(),
                    })
                }
                Action::GiveUp => events.push(HostEvent::GaveUp {
                    capability: name.to_owned(),
                }),
            }
        }
    }

    /// Wire status of every shard of every capability: each slot's current
    /// choice (with the capability's phase, or `Backoff` while isolated,
    /// `Quarantined` when dropped) and every quarantined choice, each with
    /// its own last failure.
    pub fn statuses(&self) -> Vec<ShardStatus> {
        let mut out = Vec::new();
        for cap in self.caps.values() {
            let phase = cap.policy.phase();
            let selection = cap.policy.selection();
            for (slot, spec) in cap.specs.iter().enumerate() {
                let slot_phase = cap.policy.slot_phase(slot);
                let hosted_at = cap
                    .host
                    .as_ref()
                    .and_then(|h| h.slots.iter().position(|&(s, _)| s == slot));
                for choice in 0..=spec.alternatives.len() {
                    let s = cap.choice(slot, choice);
                    let quarantined = cap.policy.is_quarantined(slot, choice);
                    let current = selection[slot] == choice;
                    if !current && !quarantined {
                        continue;
                    }
                    let live = current && slot_phase == SlotPhase::Hosted;
                    let state = if quarantined {
                        ShardState::Quarantined
                    } else {
                        match (slot_phase, phase) {
                            (SlotPhase::Dropped, _) => ShardState::Quarantined,
                            (SlotPhase::Isolated { .. }, _) => ShardState::Backoff,
                            (SlotPhase::Hosted, Phase::Starting) => ShardState::Starting,
                            (SlotPhase::Hosted, Phase::Running { .. }) => ShardState::Running,
                            (SlotPhase::Hosted, Phase::Backoff { .. }) => ShardState::Backoff,
                            (SlotPhase::Hosted, Phase::Quarantined) => ShardState::Quarantined,
                            (SlotPhase::Hosted, Phase::Stopped) => ShardState::Stopped,
                        }
                    };
                    let errors = cap
                        .host
                        .as_ref()
                        .filter(|_| live)
                        .and_then(|h| hosted_at.and_then(|i| h.errors.get(i).copied()))
                        .unwrap_or(0);
                    let last_failure = cap
                        .policy
                        .last_failure(slot, choice)
                        .cloned()
                        .or_else(|| live.then(|| cap.last_failure.clone()).flatten());
                    out.push(ShardStatus {
                        shard: s.activation.shard.clone(),
                        capability: cap.name.clone(),
                        state,
                        cpu_permille: if live { cap.cpu_permille } else { 0 },
                        rss_kib: if live { cap.rss_kib } else { 0 },
                        restarts: cap.policy.restarts(),
                        errors: errors.saturating_add(if live { cap.errors } else { 0 }),
                        last_failure,
                        lease_expires_at_ms: s.activation.lease_expires_at_ms,
                        enforcement: cap.enforcement,
                    });
                }
            }
        }
        out
    }
}

/// The failure in words, for logs and events (no secrets: failures carry
/// only the reasons the supervisor and the host composed).
fn describe_failure(f: &ShardFailure) -> String {
    match f {
        ShardFailure::Crashed { signal } => format!("crashed (signal {signal})"),
        ShardFailure::Exited { code } => format!("exited with code {code}"),
        ShardFailure::Hung => "hung".to_owned(),
        ShardFailure::OverLimit => "over its limit".to_owned(),
        ShardFailure::LoadRefused { reason } => format!("load refused: {reason}"),
        ShardFailure::InitFailed { reason } => format!("init failed: {reason}"),
    }
}

// The daemon may move the supervisor into the thread that drives it.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<Supervisor>();
};

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[allow(clippy::too_many_arguments)]
fn handle_msg(
    name: &str,
    host: &mut RunningHost,
    msg: FromHost,
    policy: &mut CapabilityPolicy,
    now: Instant,
    epoch: Instant,
    events: &mut Vec<HostEvent>,
    specs: &[ShardSpec],
) {
    match msg {
        FromHost::Loaded { index, info } => {
            host.last_msg = now;
            tracing::debug!(capability = name, index, id = %info.id, "shard loaded");
        }
        FromHost::SandboxFailed { reason } => {
            tracing::error!(capability = name, %reason, "shard host sandbox failed");
            host.refused = Some((u32::MAX, format!("sandbox: {reason}")));
        }
        FromHost::LoadRefused { index, reason } => {
            tracing::warn!(capability = name, index, %reason, "shard load refused");
            host.refused = Some((index, reason));
        }
        FromHost::InitFailed {
            index,
            status,
            reason,
        } => {
            tracing::warn!(capability = name, index, status, %reason, "shard init refused its configuration");
            host.init_failed = Some((index, reason));
        }
        FromHost::Running => {
            host.last_msg = now;
            host.running = true;
            policy.on_running(now.saturating_duration_since(epoch).as_millis() as u64);
            let shards = host
                .slots
                .iter()
                .filter_map(|&(s, c)| {
                    let spec = specs.get(s)?;
                    let chosen = if c == 0 {
                        spec
                    } else {
                        spec.alternatives.get(c - 1).unwrap_or(spec)
                    };
                    Some(chosen.activation.shard.clone())
                })
                .collect();
            events.push(HostEvent::Started {
                capability: name.to_owned(),
                shards,
                pid: host.child.id(),
                enforcement: host.enforcement,
            });
        }
        FromHost::Heartbeat { seq, stats, errors } => {
            // The loop sends one stats entry per shard and numbers its
            // heartbeats; anything else (a replay, a datagram forged by a
            // shard thread with the wrong shape) is no sign of life.
            if seq > host.last_seq && stats.len() == host.slots.len() {
                host.last_seq = seq;
                host.last_msg = now;
                host.stats = stats;
                host.errors = errors;
            } else {
                tracing::debug!(capability = name, seq, "heartbeat ignored");
            }
        }
        FromHost::Stuck { index } => {
            // The host's own watchdog saw the loop stall inside a shard: that
            // is a hang now, whatever heartbeats arrive meanwhile.
            tracing::warn!(
                capability = name,
                index,
                "host loop stuck in a shard; killing"
            );
            host.stuck_shard = Some(index);
            if host.killed_for.is_none() {
                kill(host, ShardFailure::Hung);
            }
        }
        FromHost::ShardFailed { index, .. } => host.failed_shard = Some(index),
        FromHost::Fatal { index, signal } => {
            tracing::warn!(
                capability = name,
                ?index,
                signal,
                "host reported a fatal signal"
            );
            host.fatal_shard = index;
        }
    }
}

fn kill(host: &mut RunningHost, why: ShardFailure) {
    host.killed_for = Some(why);
    if let Err(e) = host.child.kill() {
        // A host the agent may not signal (it runs as another uid and the
        // agent lacks CAP_KILL) would outlive the verdict: say so loudly.
        tracing::error!(pid = host.child.id(), error = %e, "could not kill a shard host");
    }
}

fn stop_host(mut host: RunningHost) {
    host.stopping = true;
    let _ = ipc::send(host.sock.as_fd(), &ToHost::Stop);
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match host.child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            _ => {
                if let Err(e) = host.child.kill() {
                    tracing::error!(pid = host.child.id(), error = %e, "could not kill a shard host that ignored Stop");
                }
                // Bounded: a host that cannot be killed must not hang the
                // agent in wait(); it is left to its parent-death signal.
                let reap_by = Instant::now() + Duration::from_secs(2);
                while Instant::now() < reap_by {
                    if !matches!(host.child.try_wait(), Ok(None)) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                break;
            }
        }
    }
    if let Some(cg) = host.cgroup.take() {
        cg.remove();
    }
}

#[allow(clippy::too_many_arguments)]
fn spawn_host(
    cfg: &SupervisorConfig,
    backend: &CgroupBackend,
    cg_name: &str,
    capability: &str,
    limits: ResourceLimits,
    shards: Vec<HostShard>,
    now: Instant,
    sandbox_slot: u32,
) -> Result<RunningHost, String> {
    let (agent_end, host_end) = ipc::socketpair().map_err(|e| format!("socketpair: {e}"))?;
    let mut cmd = Command::new(&cfg.agent_exe);
    cmd.arg("host")
        .stdin(Stdio::from(host_end))
        .stdout(Stdio::null())
        .stderr(Stdio::inherit());
    for (k, v) in &cfg.host_env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("spawn {}: {e}", cfg.agent_exe.display()))?;
    // Limits before the host loads anything: it waits for the setup we send after this.
    let (cgroup, enforcement) = match backend.create(cg_name, &limits) {
        Ok(Some(cg)) => match cg.attach(child.id()) {
            Ok(()) => {
                let e = backend.enforcement();
                (Some(cg), e)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot attach host to its cgroup; rlimits only");
                cg.remove();
                (None, Enforcement::RlimitsOnly)
            }
        },
        Ok(None) => (None, Enforcement::RlimitsOnly),
        Err(e) => {
            tracing::warn!(error = %e, "cannot create host cgroup; rlimits only");
            (None, Enforcement::RlimitsOnly)
        }
    };
    let setup = HostSetup {
        capability: capability.to_owned(),
        limits,
        heartbeat_ms: cfg.heartbeat.as_millis().clamp(10, 5_000) as u32,
        shard_dir: cfg.shard_dir.clone(),
        agent_uid: nix::unistd::geteuid().as_raw(),
        sandbox_slot,
        shards,
    };
    if let Err(e) = ipc::send(agent_end.as_fd(), &ToHost::Setup(setup)) {
        let _ = child.kill();
        let _ = child.wait();
        if let Some(cg) = cgroup {
            cg.remove();
        }
        return Err(format!("send setup: {e}"));
    }
    tracing::info!(
        capability,
        pid = child.id(),
        ?enforcement,
        "shard host spawned"
    );
    Ok(RunningHost {
        child,
        sock: agent_end,
        cgroup,
        enforcement,
        last_msg: now,
        last_seq: 0,
        running: false,
        stats: Vec::new(),
        errors: Vec::new(),
        slots: Vec::new(),
        capped_uid: None,
        refused: None,
        init_failed: None,
        failed_shard: None,
        fatal_shard: None,
        stuck_shard: None,
        killed_for: None,
        stopping: false,
        rss_kib: 0,
        cpu_permille: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::msg::ShardKind;

    fn spec_with(sealed: Vec<u8>, lease: u64) -> ShardSpec {
        ShardSpec {
            sealed_config: sealed,
            ..ShardSpec::new(Activation {
                shard: "auth-psk@0.1.0".parse().unwrap(),
                capability: "vpn".into(),
                kind: ShardKind::Compute,
                sha256: [3; 32],
                config: b"max_skew_ms = 1000\n".to_vec(),
                limits: super::super::config::DEFAULT_LIMITS,
                priority: 1,
                lease_expires_at_ms: lease,
            })
        }
    }

    #[test]
    fn a_resealed_identical_secret_is_a_renewal_and_a_new_secret_is_not() {
        let key = SealKey {
            device: DeviceId::new("gw-1").unwrap(),
            key: Arc::new(KeyPair::from_seed(&[5; 32])),
        };
        let shard: ShardRef = "auth-psk@0.1.0".parse().unwrap();
        let seal = |secret: &[u8]| {
            shardline_shared::seal::seal_config(
                &mut crypto_box::aead::OsRng,
                &key.key.public_key(),
                &key.device,
                &shard,
                secret,
            )
            .unwrap()
        };
        let a = spec_with(seal(b"psk = 0011\n"), 10);
        let b = spec_with(seal(b"psk = 0011\n"), 20);
        assert_ne!(a.sealed_config, b.sealed_config, "fresh ephemeral keys");
        assert!(same_except_lease(
            Some(&key),
            std::slice::from_ref(&a),
            &[b]
        ));
        let c = spec_with(seal(b"psk = 9999\n"), 20);
        assert!(!same_except_lease(
            Some(&key),
            std::slice::from_ref(&a),
            &[c]
        ));
        // Without the key, different boxes are different.
        let d = spec_with(seal(b"psk = 0011\n"), 20);
        assert!(!same_except_lease(None, &[a], &[d]));
        // The key never shows in Debug output.
        assert!(!format!("{key:?}").contains(&hex::encode(key.key.seed())));
    }

    #[test]
    fn a_host_shard_debug_shows_no_configuration() {
        let h = ipc::HostShard {
            shard: "auth-psk@0.1.0".parse().unwrap(),
            path: PathBuf::from("/x.so"),
            sha256: [0; 32],
            config: b"psk = SECRETVALUE\n".to_vec(),
            secret_keys: vec!["psk".into()],
        };
        let d = format!("{h:?}");
        assert!(!d.contains("SECRETVALUE") && d.contains("bytes"), "{d}");
    }
}
