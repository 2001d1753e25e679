//! Per-device shard configuration: the operator sets clear and secret
//! `key = value`s per device and shard (`shardctl config set`, `vpn pair`);
//! they live in the device record; the engine sees the clear values and the
//! *names* of the secrets (so it can refuse a capability a key is missing
//! for); the secret values are sealed to the device's enrolled key here, in
//! [`Core::seal_secrets`], just before an instruction is signed — so they
//! are never in clear in an instruction, on the broker, in a log line, in an
//! API answer or in the engine's state.
//!
//! Sealing needs randomness, which the core does not have: the runner hands
//! it a [`SealRng`] (the OS generator; tests a seeded one). Without one, an
//! activation that would carry a secret is not sent (logged and counted).

use super::*;
use crate::policy::catalog::valid_config_key;
use crate::records::DeviceShardConfig;
use crypto_box::aead::rand_core::CryptoRngCore;
use shardline_shared::msg::{Operation, ShardVariant};

/// Longest configuration value accepted (one line).
pub const MAX_CONFIG_VALUE: usize = 512;
/// Most bytes of secret lines per device and shard: the sealed box must
/// stay under [`shardline_shared::seal::MAX_SEALED_CONFIG`] with its envelope.
pub const MAX_SECRET_BYTES: usize = 2048;
/// Most keys per device and shard (clear and secret together).
pub const MAX_CONFIG_KEYS: usize = 32;

/// The randomness sealing takes (ephemeral keys of the sealed boxes).
pub struct SealRng(pub Box<dyn CryptoRngCore + Send>);

impl std::fmt::Debug for SealRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealRng")
    }
}

/// One shard's configuration as an operator may see it: secret *names* only.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardConfigShown {
    pub clear: BTreeMap<String, String>,
    pub secret_keys: Vec<String>,
    /// Keys the catalog requires for this shard that are not set.
    pub missing: Vec<String>,
}

/// `GET /v1/devices/{id}/config`: every shard of the catalog that has
/// per-device configuration or requires some.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfigShown {
    pub device: String,
    pub shards: BTreeMap<String, ShardConfigShown>,
}

/// One change to one shard's per-device configuration.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ConfigChange {
    pub clear: BTreeMap<String, String>,
    pub secret: BTreeMap<String, String>,
    /// Keys removed (clear or secret).
    pub unset: Vec<String>,
}

impl std::fmt::Debug for ConfigChange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigChange")
            .field("clear", &self.clear)
            .field("secret_keys", &self.secret.keys().collect::<Vec<_>>())
            .field("unset", &self.unset)
            .finish()
    }
}

/// The two ends of a tunnel (`shardctl vpn pair`).
#[derive(Clone, PartialEq, Eq)]
pub struct VpnPair {
    pub a: DeviceId,
    pub b: DeviceId,
    pub a_endpoint: std::net::SocketAddr,
    pub b_endpoint: std::net::SocketAddr,
    /// The pair's fresh pre-shared key, from the runner's RNG.
    pub psk: [u8; 32],
}

impl std::fmt::Debug for VpnPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VpnPair")
            .field("a", &self.a)
            .field("b", &self.b)
            .field("a_endpoint", &self.a_endpoint)
            .field("b_endpoint", &self.b_endpoint)
            .finish_non_exhaustive()
    }
}

fn check_value(key: &str, value: &str) -> Result<(), CommandError> {
    if value.len() > MAX_CONFIG_VALUE || value.contains(['\n', '\r', '\0']) {
        return Err(CommandError::Invalid(format!(
            "the value of {key:?} must be one line of at most {MAX_CONFIG_VALUE} bytes"
        )));
    }
    Ok(())
}

fn check_key(key: &str) -> Result<(), CommandError> {
    if valid_config_key(key) {
        Ok(())
    } else {
        Err(CommandError::Invalid(format!(
            "{:?} is not a configuration key (lowercase letters, digits, `_`, `-`)",
            super::commands::shown(key)
        )))
    }
}

impl Core {
    /// Installs the runner's randomness for sealing secrets.
    pub fn set_seal_rng(&mut self, rng: SealRng) {
        self.seal_rng = Some(rng);
    }

    /// Applies `change` to `device`'s configuration of `shard` (checked
    /// whole before anything changes) and re-plans the device.
    pub(super) fn set_device_config(
        &mut self,
        now_ms: u64,
        device: &DeviceId,
        shard: &str,
        change: ConfigChange,
    ) -> Result<(), CommandError> {
        self.set_device_configs(now_ms, device, vec![(shard.to_owned(), change)])
    }

    fn set_device_configs(
        &mut self,
        now_ms: u64,
        device: &DeviceId,
        changes: Vec<(String, ConfigChange)>,
    ) -> Result<(), CommandError> {
        let Some(rec) = self.records.get(device) else {
            return Err(CommandError::UnknownDevice(device.to_string()));
        };
        let mut next = rec.shard_config.clone();
        let mut changed = BTreeSet::new();
        for (shard, change) in &changes {
            let Some(spec) = self.engine.catalog().shard(shard) else {
                return Err(CommandError::Invalid(format!(
                    "unknown shard {:?}",
                    super::commands::shown(shard)
                )));
            };
            let entry = next.entry(shard.clone()).or_default();
            let before = entry.clone();
            for k in &change.unset {
                check_key(k)?;
                entry.clear.remove(k);
                entry.secret.remove(k);
            }
            for (k, v) in &change.clear {
                check_key(k)?;
                check_value(k, v)?;
                if spec.secret_config.contains(k) {
                    return Err(CommandError::Invalid(format!(
                        "{shard}:{k} is secret (secret_config): set it with --secret, it is never sent in clear"
                    )));
                }
                entry.secret.remove(k);
                entry.clear.insert(k.clone(), v.clone());
            }
            for (k, v) in &change.secret {
                check_key(k)?;
                check_value(k, "")?;
                if v.len() > MAX_CONFIG_VALUE || v.contains(['\n', '\r', '\0']) {
                    // The message never repeats a secret value.
                    return Err(CommandError::Invalid(format!(
                        "the secret value of {k:?} must be one line of at most {MAX_CONFIG_VALUE} bytes"
                    )));
                }
                entry.clear.remove(k);
                entry.secret.insert(k.clone(), v.clone());
            }
            if entry.clear.len() + entry.secret.len() > MAX_CONFIG_KEYS {
                return Err(CommandError::Invalid(format!(
                    "at most {MAX_CONFIG_KEYS} keys per device and shard"
                )));
            }
            if entry.secret_lines().len() > MAX_SECRET_BYTES {
                return Err(CommandError::Invalid(format!(
                    "the secret values of {shard} exceed {MAX_SECRET_BYTES} bytes"
                )));
            }
            if *entry != before {
                changed.insert(shard.clone());
            }
            if entry.clear.is_empty() && entry.secret.is_empty() {
                next.remove(shard);
            }
            tracing::info!(
                %device,
                shard = %shard,
                clear_keys = ?change.clear.keys().collect::<Vec<_>>(),
                secret_keys = ?change.secret.keys().collect::<Vec<_>>(),
                unset = ?change.unset,
                "device shard configuration set"
            );
        }
        if changed.is_empty() {
            return Ok(());
        }
        let Some(rec) = self.records.get_mut(device) else {
            return Err(CommandError::UnknownDevice(device.to_string()));
        };
        rec.shard_config = next;
        let config = rec.config_view();
        self.dirty.insert(device.clone());
        self.feed(
            now_ms,
            Event::DeviceConfig {
                device: device.clone(),
                config,
                changed,
            },
        );
        Ok(())
    }

    /// Writes both ends' tunnel configuration (initiator `a`, responder
    /// `b`) and one pre-shared key for the pair, sealed to each device
    /// separately when sent. The key is never returned.
    pub(super) fn vpn_pair(&mut self, now_ms: u64, pair: VpnPair) -> Result<(), CommandError> {
        let VpnPair {
            a,
            b,
            a_endpoint,
            b_endpoint,
            psk,
        } = pair;
        if a == b {
            return Err(CommandError::Invalid(
                "a tunnel needs two different devices".into(),
            ));
        }
        for d in [&a, &b] {
            if !self.records.contains_key(d) {
                return Err(CommandError::UnknownDevice(d.to_string()));
            }
        }
        let catalog = self.engine.catalog();
        let find = |pred: &dyn Fn(&crate::policy::catalog::ShardSpec) -> bool| {
            catalog
                .shards
                .values()
                .find(|s| s.capability == "vpn" && pred(s))
                .map(|s| s.shard.id().to_owned())
        };
        let tunnel = find(&|s| s.device_config.iter().any(|k| k == "peer"));
        let auth = find(&|s| s.secret_config.iter().any(|k| k == "psk"));
        let (Some(tunnel), Some(auth)) = (tunnel, auth) else {
            return Err(CommandError::Invalid(
                "the catalog has no vpn shard with device_config `peer` and one with secret_config `psk`".into(),
            ));
        };
        let psk_hex = hex::encode(psk);
        let end = |role: &str, bind: std::net::SocketAddr, peer: std::net::SocketAddr| {
            let mut clear = BTreeMap::new();
            clear.insert("role".to_owned(), role.to_owned());
            clear.insert("bind".to_owned(), bind.to_string());
            clear.insert("peer".to_owned(), peer.to_string());
            vec![
                (
                    tunnel.clone(),
                    ConfigChange {
                        clear,
                        ..ConfigChange::default()
                    },
                ),
                (
                    auth.clone(),
                    ConfigChange {
                        secret: [("psk".to_owned(), psk_hex.clone())].into(),
                        ..ConfigChange::default()
                    },
                ),
            ]
        };
        let a_changes = end("initiator", a_endpoint, b_endpoint);
        let b_changes = end("responder", b_endpoint, a_endpoint);
        self.set_device_configs(now_ms, &a, a_changes)?;
        self.set_device_configs(now_ms, &b, b_changes)?;
        tracing::info!(%a, %b, %a_endpoint, %b_endpoint, "vpn pair configured (fresh pre-shared key)");
        Ok(())
    }

    /// The device's configuration as the operator may see it.
    pub(super) fn device_config_shown(
        &self,
        device: &DeviceId,
    ) -> Result<DeviceConfigShown, CommandError> {
        let Some(rec) = self.records.get(device) else {
            return Err(CommandError::UnknownDevice(device.to_string()));
        };
        let mut shards = BTreeMap::new();
        for (id, spec) in &self.engine.catalog().shards {
            let c = rec.shard_config.get(id);
            if c.is_none() && spec.device_config.is_empty() && spec.secret_config.is_empty() {
                continue;
            }
            let empty = DeviceShardConfig::default();
            let c = c.unwrap_or(&empty);
            let missing = spec
                .required_keys()
                .filter(|(k, secret)| {
                    if *secret {
                        !c.secret.contains_key(*k)
                    } else {
                        !c.clear.contains_key(*k)
                    }
                })
                .map(|(k, _)| k.to_owned())
                .collect();
            shards.insert(
                id.clone(),
                ShardConfigShown {
                    clear: c.clear.clone(),
                    secret_keys: c.secret.keys().cloned().collect(),
                    missing,
                },
            );
        }
        Ok(DeviceConfigShown {
            device: device.to_string(),
            shards,
        })
    }

    /// Seals the device's secrets into every activation variant of `ops`
    /// that has some. A variant whose secrets cannot be sealed is left out
    /// (an activation whose primary cannot be is dropped): a shard must not
    /// start without its secret, and a secret never leaves in clear.
    pub(super) fn seal_secrets(&mut self, device: &DeviceId, ops: &mut Vec<Operation>) {
        let Some(rec) = self.records.get(device) else {
            return;
        };
        let needs = |v: &ShardVariant| {
            rec.shard_config
                .get(v.shard.id())
                .is_some_and(|c| !c.secret.is_empty())
        };
        if !ops.iter().any(|op| match op {
            Operation::ActivateShard(a) => a.variants().any(needs),
            _ => false,
        }) {
            return;
        }
        let public_key = rec.public_key;
        let configs = &rec.shard_config;
        let rng = &mut self.seal_rng;
        let metrics = &self.metrics;
        let mut seal = |v: &mut ShardVariant| -> bool {
            let Some(c) = configs.get(v.shard.id()).filter(|c| !c.secret.is_empty()) else {
                return true;
            };
            let Some(SealRng(rng)) = rng.as_mut() else {
                tracing::error!(%device, shard = %v.shard, "no randomness for sealing: activation with a secret not sent");
                return false;
            };
            match shardline_shared::seal::seal_config(
                &mut &mut **rng,
                &public_key,
                device,
                &v.shard,
                &c.secret_lines(),
            ) {
                Ok(sealed) => {
                    v.sealed_config = sealed;
                    true
                }
                Err(e) => {
                    Metrics::inc(&metrics.alerts);
                    tracing::error!(%device, shard = %v.shard, error = %e, "secret configuration not sealed: activation not sent");
                    false
                }
            }
        };
        ops.retain_mut(|op| match op {
            Operation::ActivateShard(a) => {
                a.alternatives.retain_mut(&mut seal);
                seal(&mut a.primary)
            }
            _ => true,
        });
    }
}
