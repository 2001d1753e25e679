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
//!   [`Activation`], an optional library path and alternatives. Activating
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
//! Hosts die with the agent through `PR_SET_PDEATHSIG`, which fires when the
//! *thread* that spawned them exits: drive the supervisor from a long-lived
//! thread (not a short-lived blocking-pool thread).
#![forbid(unsafe_code)]

use super::ipc::{self, FromHost, HostSetup, HostShard, StatsWire, ToHost};
use super::limits::{CgroupBackend, HostCgroup};
use super::policy::{Action, CapabilityPolicy, Phase, PolicyConfig};
use shardline_shared::msg::{
    Activation, Enforcement, ResourceLimits, ShardFailure, ShardState, ShardStatus,
};
use shardline_shared::ShardRef;
use std::collections::BTreeMap;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One required shard of a capability, with its alternatives in order of preference.
#[derive(Debug, Clone, PartialEq)]
pub struct ShardSpec {
    pub activation: Activation,
    /// Library path; default `{shard_dir}/{id}@{version}.so`.
    pub path: Option<PathBuf>,
    /// Alternatives providing the same service (their own alternatives are ignored).
    pub alternatives: Vec<ShardSpec>,
}

impl ShardSpec {
    pub fn new(activation: Activation) -> Self {
        Self {
            activation,
            path: None,
            alternatives: Vec::new(),
        }
    }
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
    FailedOver {
        capability: String,
        from: ShardRef,
        to: ShardRef,
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
    /// Attribution hints from the host.
    refused: Option<(u32, String)>,
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

    fn current(&self, slot: usize) -> &ShardSpec {
        self.choice(slot, self.policy.selection()[slot])
    }
}

/// Runs shard hosts. See the module docs for the API contract.
#[derive(Debug)]
pub struct Supervisor {
    cfg: SupervisorConfig,
    epoch: Instant,
    backend: CgroupBackend,
    caps: BTreeMap<String, Capability>,
    sys: sysinfo::System,
    last_sample: Option<Instant>,
    spawned: u64,
}

fn same_except_lease(a: &[ShardSpec], b: &[ShardSpec]) -> bool {
    fn strip(s: &ShardSpec) -> ShardSpec {
        let mut s = s.clone();
        s.activation.lease_expires_at_ms = 0;
        s.alternatives = s.alternatives.iter().map(strip).collect();
        s
    }
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| strip(x) == strip(y))
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
        tracing::info!(enforcement = ?backend.enforcement(), "shard supervisor ready");
        Self {
            cfg,
            epoch: Instant::now(),
            backend,
            caps: BTreeMap::new(),
            sys: sysinfo::System::new(),
            last_sample: None,
            spawned: 0,
        }
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
            if same_except_lease(&cap.specs, &shards) {
                cap.specs = shards;
                return Ok(Vec::new());
            }
        }
        let mut events = self.deactivate(capability);
        events.retain(|e| !matches!(e, HostEvent::Stopped { .. }));
        let choices: Vec<usize> = shards.iter().map(|s| 1 + s.alternatives.len()).collect();
        let mut policy = CapabilityPolicy::new(self.cfg.policy, &choices);
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
        self.apply(capability, actions, now, &mut events);
        Ok(events)
    }

    /// Stops `capability`'s host (if any) and forgets it.
    pub fn deactivate(&mut self, capability: &str) -> Vec<HostEvent> {
        let Some(mut cap) = self.caps.remove(capability) else {
            return Vec::new();
        };
        cap.policy.stop();
        if let Some(host) = cap.host.take() {
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
            self.apply(&name, actions, now, &mut events);
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
        let host = cap.host.take().expect("host checked above");
        use std::os::unix::process::ExitStatusExt;
        let oom = host.cgroup.as_ref().is_some_and(|c| c.oom_killed());
        let (failure, slot) = if let Some((idx, reason)) = host.refused.clone() {
            (ShardFailure::LoadRefused { reason }, Some(idx))
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
        if let Some(cg) = host.cgroup {
            cg.remove();
        }
        // With a single shard there is only one possible culprit.
        let slot = slot
            .map(|s| s as usize)
            .filter(|&s| s < cap.specs.len())
            .or((cap.specs.len() == 1).then_some(0));
        let shard = slot.map(|s| cap.current(s).activation.shard.clone());
        tracing::warn!(capability = name, shard = ?shard.as_ref().map(|s| s.to_string()), failure = ?failure, "shard host failed");
        cap.errors += 1;
        cap.last_failure = Some(failure.clone());
        events.push(HostEvent::Failed {
            capability: name.to_owned(),
            shard,
            failure: failure.clone(),
        });
        let actions = cap.policy.on_failure(ms, slot, &failure);
        self.apply(name, actions, now, events);
    }

    fn apply(
        &mut self,
        name: &str,
        actions: Vec<Action>,
        now: Instant,
        events: &mut Vec<HostEvent>,
    ) {
        for action in actions {
            let Some(cap) = self.caps.get_mut(name) else {
                return;
            };
            match action {
                Action::Spawn { selection, restart } => {
                    let specs: Vec<&ShardSpec> = selection
                        .iter()
                        .enumerate()
                        .map(|(slot, &c)| cap.choice(slot, c))
                        .collect();
                    let acts: Vec<&Activation> = specs.iter().map(|s| &s.activation).collect();
                    let limits = combined_limits(&acts);
                    let shards: Vec<HostShard> = specs
                        .iter()
                        .map(|s| HostShard {
                            shard: s.activation.shard.clone(),
                            path: s.path.clone().unwrap_or_else(|| {
                                self.cfg
                                    .shard_dir
                                    .join(format!("{}.so", s.activation.shard))
                            }),
                            sha256: s.activation.sha256,
                            config: s.activation.config.clone(),
                        })
                        .collect();
                    if restart {
                        events.push(HostEvent::Restarted {
                            capability: name.to_owned(),
                            attempt: cap.policy.restarts(),
                        });
                    }
                    cap.limits = limits;
                    self.spawned += 1;
                    let cg_name =
                        format!("shardline-{}-{}-{}", name, std::process::id(), self.spawned);
                    match spawn_host(
                        &self.cfg,
                        &self.backend,
                        &cg_name,
                        name,
                        limits,
                        shards,
                        now,
                        // Distinct per host, and (mixing in the pid) unlikely to be shared
                        // with a host of another agent process on the same machine.
                        std::process::id()
                            .wrapping_mul(131)
                            .wrapping_add(self.spawned as u32)
                            % crate::shardhost::sandbox::PROBE_SLOT,
                    ) {
                        Ok(host) => {
                            cap.enforcement = host.enforcement;
                            cap.host = Some(host);
                        }
                        Err(e) => {
                            tracing::error!(capability = name, error = %e, "cannot spawn shard host");
                            let failure = ShardFailure::LoadRefused { reason: e };
                            events.push(HostEvent::Failed {
                                capability: name.to_owned(),
                                shard: None,
                                failure: failure.clone(),
                            });
                            cap.last_failure = Some(failure.clone());
                            let ms = now.saturating_duration_since(self.epoch).as_millis() as u64;
                            let more = cap.policy.on_failure(ms, None, &failure);
                            self.apply(name, more, now, events);
                            return;
                        }
                    }
                }
                Action::Quarantine { slot, choice } => events.push(HostEvent::Quarantined {
                    capability: name.to_owned(),
                    shard: cap.choice(slot, choice).activation.shard.clone(),
                }),
                Action::FailOver { slot, from, to } => events.push(HostEvent::FailedOver {
                    capability: name.to_owned(),
                    from: cap.choice(slot, from).activation.shard.clone(),
                    to: cap.choice(slot, to).activation.shard.clone(),
                }),
                Action::GiveUp => events.push(HostEvent::GaveUp {
                    capability: name.to_owned(),
                }),
            }
        }
    }

    /// Wire status of every shard of every capability (current choices, and
    /// quarantined alternatives).
    pub fn statuses(&self) -> Vec<ShardStatus> {
        let mut out = Vec::new();
        for cap in self.caps.values() {
            let phase = cap.policy.phase();
            let selection = cap.policy.selection();
            for (slot, spec) in cap.specs.iter().enumerate() {
                for choice in 0..=spec.alternatives.len() {
                    let s = cap.choice(slot, choice);
                    let quarantined = cap.policy.is_quarantined(slot, choice);
                    let current = selection[slot] == choice;
                    if !current && !quarantined {
                        continue;
                    }
                    let state = if quarantined {
                        ShardState::Quarantined
                    } else {
                        match phase {
                            Phase::Starting => ShardState::Starting,
                            Phase::Running { .. } => ShardState::Running,
                            Phase::Backoff { .. } => ShardState::Backoff,
                            Phase::Quarantined => ShardState::Quarantined,
                            Phase::Stopped => ShardState::Stopped,
                        }
                    };
                    let errors = cap
                        .host
                        .as_ref()
                        .filter(|_| current)
                        .and_then(|h| h.errors.get(slot).copied())
                        .unwrap_or(0);
                    out.push(ShardStatus {
                        shard: s.activation.shard.clone(),
                        capability: cap.name.clone(),
                        state,
                        cpu_permille: if current { cap.cpu_permille } else { 0 },
                        rss_kib: if current { cap.rss_kib } else { 0 },
                        restarts: cap.policy.restarts(),
                        errors: errors.saturating_add(cap.errors),
                        last_failure: cap.last_failure.clone(),
                        lease_expires_at_ms: s.activation.lease_expires_at_ms,
                        enforcement: cap.enforcement,
                    });
                }
            }
        }
        out
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
        FromHost::InitFailed { index, status } => {
            tracing::warn!(capability = name, index, status, "shard init failed");
            host.failed_shard = Some(index);
        }
        FromHost::Running => {
            host.last_msg = now;
            host.running = true;
            policy.on_running(now.saturating_duration_since(epoch).as_millis() as u64);
            let sel = policy.selection();
            let shards = specs
                .iter()
                .zip(sel)
                .map(|(s, c)| {
                    if c == 0 {
                        s.activation.shard.clone()
                    } else {
                        s.alternatives
                            .get(c - 1)
                            .unwrap_or(s)
                            .activation
                            .shard
                            .clone()
                    }
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
            if seq > host.last_seq && stats.len() == specs.len() {
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
    let _ = host.child.kill();
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
                let _ = host.child.kill();
                let _ = host.child.wait();
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
        refused: None,
        failed_shard: None,
        fatal_shard: None,
        stuck_shard: None,
        killed_for: None,
        stopping: false,
        rss_kib: 0,
        cpu_permille: 0,
    })
}
