//! The I/O edge of the assignment ([`super::assignment`]): the persisted
//! [`AssignmentState`] (`assignment.json` in the state directory, written
//! atomically and durably before the object's PUBACK, so the version floor
//! survives restarts and power cuts) and the broker settings for one
//! endpoint URL.

use super::config::BrokerConfig;
use super::persist;
use shardline_shared::assign::{AssignmentState, GroupId};
use std::path::{Path, PathBuf};

/// The file name in the state directory.
pub const FILE: &str = "assignment.json";

/// Why the persisted assignment could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum AssignmentFileError {
    #[error("assignment file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("assignment file {path} is not valid: {reason}")]
    Corrupt { path: PathBuf, reason: String },
}

/// Reads the state of `group`: a missing file is a first start (bootstrap);
/// a file for another group (the configured group changed) starts the new
/// group from bootstrap, logged: that floor belongs to the other group's
/// topic. A corrupt file is an error: silently starting over would drop the
/// version floor.
pub fn load(path: &Path, group: &GroupId) -> Result<AssignmentState, AssignmentFileError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(AssignmentState::bootstrap(group.clone()))
        }
        Err(source) => {
            return Err(AssignmentFileError::Io {
                path: path.to_owned(),
                source,
            })
        }
    };
    let state: AssignmentState =
        serde_json::from_slice(&bytes).map_err(|e| AssignmentFileError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if state.group != *group {
        tracing::warn!(
            path = %path.display(),
            held_group = %state.group,
            group = %group,
            "the configured assignment group changed; starting the new group from bootstrap"
        );
        return Ok(AssignmentState::bootstrap(group.clone()));
    }
    Ok(state)
}

/// Writes the state atomically and durably (mode 0600).
pub fn save(path: &Path, state: &AssignmentState) -> Result<(), AssignmentFileError> {
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| AssignmentFileError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    persist::write_atomic(path, &bytes, 0o600).map_err(|source| AssignmentFileError::Io {
        path: path.to_owned(),
        source,
    })
}

/// The configured broker settings pointed at `url` (TLS files, login,
/// keep-alive and backoff stay); `None` when the URL does not parse (the
/// assignment's own check is stricter, so only a bug gets here).
pub fn broker_for(base: &BrokerConfig, url: &str) -> Option<BrokerConfig> {
    let u = shardline_support::broker_url::BrokerUrl::parse(url).ok()?;
    let mut b = base.clone();
    b.tls = u.tls;
    b.port = u.port_or_default();
    b.host = u.host;
    Some(b)
}

/// How long a probe of the first endpoint may take.
pub const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Probes `url` for the route core's return home: whether a TCP connection
/// to its host and port is accepted within [`PROBE_TIMEOUT`]. Deliberately
/// not an MQTT CONNECT: one under the device's client id would take over
/// its live session on a cluster, and another id would need its own login.
/// A node that accepts TCP but not MQTT yet makes the return fail like any
/// connection, and the route core backs off.
pub async fn probe(url: &str) -> bool {
    let Ok(u) = shardline_support::broker_url::BrokerUrl::parse(url) else {
        return false;
    };
    let port = u.port_or_default();
    let connect = tokio::net::TcpStream::connect((u.host.as_str(), port));
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, connect).await,
        Ok(Ok(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_a_group_change_starts_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE);
        let g = GroupId::new("a.b.c").unwrap();
        assert_eq!(load(&p, &g).unwrap(), AssignmentState::bootstrap(g.clone()));
        let s = AssignmentState::bootstrap(g.clone());
        save(&p, &s).unwrap();
        assert_eq!(load(&p, &g).unwrap(), s);
        let other = GroupId::new("a.b.d").unwrap();
        assert_eq!(load(&p, &other).unwrap().group, other);
        std::fs::write(&p, b"{not json").unwrap();
        assert!(matches!(
            load(&p, &g),
            Err(AssignmentFileError::Corrupt { .. })
        ));
    }

    #[test]
    fn a_probe_is_accepted_by_a_listener_and_refused_by_a_closed_port() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let port = l.local_addr().unwrap().port();
            assert!(probe(&format!("mqtt://127.0.0.1:{port}")).await);
            drop(l);
            assert!(!probe(&format!("mqtt://127.0.0.1:{port}")).await);
            assert!(!probe("not a url").await);
        });
    }
}
