//! The on-disk outbox: every report and ack is stored here (one file per
//! message, written atomically and fsynced) before it is handed to MQTT, and
//! leaves only when the broker's PUBACK for it arrived. A broker or network
//! outage, or an agent crash, therefore loses nothing; a restarted agent
//! resends what is left (the allocator drops duplicates by sequence number).
//!
//! The outbox is bounded: past `cap` messages the oldest are dropped and
//! counted, so a device offline for days keeps its newest reports and a
//! bounded disk footprint. Only message ids are kept in memory.

use super::persist;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const SUFFIX: &str = ".msg";

/// Why the outbox failed.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("outbox {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("outbox message {path} is corrupt")]
    Corrupt { path: PathBuf },
}

/// A stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutMessage {
    pub topic: String,
    pub payload: Vec<u8>,
}

/// See the module docs.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    cap: usize,
    ids: BTreeSet<u64>,
    next_id: u64,
    dropped: u64,
}

impl Outbox {
    /// Opens (creating if needed) the outbox in `dir`, picking up messages a
    /// previous run left behind.
    pub fn open(dir: &Path, cap: usize) -> Result<Self, OutboxError> {
        let io = |source| OutboxError::Io {
            path: dir.to_owned(),
            source,
        };
        persist::ensure_private_dir(dir).map_err(io)?;
        let mut ids = BTreeSet::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            match name
                .strip_suffix(SUFFIX)
                .and_then(|n| n.parse::<u64>().ok())
            {
                Some(id) => {
                    ids.insert(id);
                }
                // Leftover temporary files of an interrupted write.
                None if name.ends_with(".tmp") => {
                    let _ = std::fs::remove_file(entry.path());
                }
                None => {}
            }
        }
        let next_id = ids.last().map_or(1, |&l| l + 1);
        let mut outbox = Self {
            dir: dir.to_owned(),
            cap,
            ids,
            next_id,
            dropped: 0,
        };
        outbox.enforce_cap();
        Ok(outbox)
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id:020}{SUFFIX}"))
    }

    /// Stores a message durably; returns its id.
    pub fn push(&mut self, topic: &str, payload: &[u8]) -> Result<u64, OutboxError> {
        let id = self.next_id;
        let path = self.path(id);
        let topic_len =
            u16::try_from(topic.len()).map_err(|_| OutboxError::Corrupt { path: path.clone() })?;
        // Make room first, so the directory never holds more than `cap`.
        self.make_room(self.cap.saturating_sub(1));
        let mut bytes = Vec::with_capacity(2 + topic.len() + payload.len());
        bytes.extend_from_slice(&topic_len.to_be_bytes());
        bytes.extend_from_slice(topic.as_bytes());
        bytes.extend_from_slice(payload);
        persist::write_atomic(&path, &bytes, 0o600)
            .map_err(|source| OutboxError::Io { path, source })?;
        self.next_id += 1;
        self.ids.insert(id);
        Ok(id)
    }

    /// Reads a stored message; `Ok(None)` when it is gone (acked or dropped).
    pub fn read(&self, id: u64) -> Result<Option<OutMessage>, OutboxError> {
        let path = self.path(id);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(OutboxError::Io { path, source }),
        };
        let corrupt = || OutboxError::Corrupt { path: path.clone() };
        let (len, rest) = bytes.split_first_chunk::<2>().ok_or_else(corrupt)?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len {
            return Err(corrupt());
        }
        let topic = std::str::from_utf8(&rest[..len]).map_err(|_| corrupt())?;
        Ok(Some(OutMessage {
            topic: topic.to_owned(),
            payload: rest[len..].to_vec(),
        }))
    }

    /// Removes a message whose PUBACK arrived. No fsync: if the unlink is
    /// lost in a crash the message is sent again, which the allocator's
    /// sequence check absorbs.
    pub fn remove(&mut self, id: u64) {
        if self.ids.remove(&id) {
            let _ = std::fs::remove_file(self.path(id));
        }
    }

    /// Ids of the stored messages, oldest first.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.ids.iter().copied()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.ids.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Messages dropped because the cap was reached, since this process started.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Changes the cap (configuration reload); drops the oldest if needed.
    pub fn set_cap(&mut self, cap: usize) {
        self.cap = cap;
        self.enforce_cap();
    }

    fn enforce_cap(&mut self) {
        self.make_room(self.cap);
    }

    /// Drops the oldest messages until at most `keep` remain.
    fn make_room(&mut self, keep: usize) {
        while self.ids.len() > keep {
            if let Some(oldest) = self.ids.pop_first() {
                let _ = std::fs::remove_file(self.path(oldest));
                self.dropped += 1;
                tracing::warn!(
                    id = oldest,
                    cap = self.cap,
                    "outbox full: dropped the oldest message"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen_and_keeps_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 10).unwrap();
        let a = o.push("t/a", b"one").unwrap();
        let b = o.push("t/b", b"two").unwrap();
        o.remove(a);
        drop(o);
        let mut o = Outbox::open(dir.path(), 10).unwrap();
        assert_eq!(o.ids().collect::<Vec<_>>(), vec![b]);
        assert_eq!(
            o.read(b).unwrap().unwrap(),
            OutMessage {
                topic: "t/b".into(),
                payload: b"two".to_vec()
            }
        );
        let c = o.push("t/c", b"").unwrap();
        assert!(c > b, "ids keep growing after a reopen");
        assert_eq!(o.read(a).unwrap(), None);
    }

    #[test]
    fn cap_drops_the_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 3).unwrap();
        let ids: Vec<u64> = (0..5).map(|i| o.push("t", &[i as u8]).unwrap()).collect();
        assert_eq!(o.ids().collect::<Vec<_>>(), ids[2..].to_vec());
        assert_eq!(o.dropped(), 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
        o.set_cap(1);
        assert_eq!(o.ids().collect::<Vec<_>>(), vec![ids[4]]);
    }

    #[test]
    fn a_corrupt_file_is_reported_not_panicked_on() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 3).unwrap();
        let id = o.push("topic", b"x").unwrap();
        std::fs::write(dir.path().join(format!("{id:020}.msg")), [0xff, 0xff, 1]).unwrap();
        assert!(matches!(o.read(id), Err(OutboxError::Corrupt { .. })));
    }
}
