//! The on-disk outbox: every report and ack is stored here (one file per
//! message, written atomically and fsynced) before it is handed to MQTT, and
//! leaves only when the broker's PUBACK for it arrived. A broker or network
//! outage, or an agent crash, therefore loses nothing; a restarted agent
//! resends what is left (the allocator drops duplicates by sequence number).
//!
//! The outbox is bounded: past `cap` messages the oldest are dropped and
//! counted, so a device offline for days keeps its newest reports and a
//! bounded disk footprint. Only message ids are kept in memory.
//!
//! Reports have priority over acks ([`Kind`]): they are handed out first,
//! and when the outbox is full the oldest *ack* goes first; a report is
//! never dropped to make room for an ack (an ack that finds the outbox full
//! of reports is refused and counted instead). Whoever can make the device
//! emit acks (hostile publishers on its instruction topic) therefore cannot
//! push its reports out (issue 14).

use super::persist;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Reports (and files of older versions, which did not mark their kind).
const SUFFIX: &str = ".msg";
/// Acks.
const ACK_SUFFIX: &str = ".ack.msg";

/// What a stored message is; decides its priority.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A QoS report: sent first, dropped last.
    Report,
    /// An instruction ack: sent after reports, dropped first.
    Ack,
}

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
    reports: BTreeSet<u64>,
    acks: BTreeSet<u64>,
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
        let mut reports = BTreeSet::new();
        let mut acks = BTreeSet::new();
        for entry in std::fs::read_dir(dir).map_err(io)? {
            let entry = entry.map_err(io)?;
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let ack = name
                .strip_suffix(ACK_SUFFIX)
                .and_then(|n| n.parse::<u64>().ok());
            let report = name
                .strip_suffix(SUFFIX)
                .and_then(|n| n.parse::<u64>().ok());
            match (ack, report) {
                (Some(id), _) => {
                    acks.insert(id);
                }
                (None, Some(id)) => {
                    reports.insert(id);
                }
                // Leftover temporary files of an interrupted write.
                (None, None) if name.ends_with(".tmp") => {
                    let _ = std::fs::remove_file(entry.path());
                }
                (None, None) => {}
            }
        }
        let last = reports.last().max(acks.last()).copied();
        let next_id = last.map_or(1, |l| l + 1);
        let mut outbox = Self {
            dir: dir.to_owned(),
            cap,
            reports,
            acks,
            next_id,
            dropped: 0,
        };
        outbox.enforce_cap();
        Ok(outbox)
    }

    fn path_of(&self, id: u64, kind: Kind) -> PathBuf {
        match kind {
            Kind::Report => self.dir.join(format!("{id:020}{SUFFIX}")),
            Kind::Ack => self.dir.join(format!("{id:020}{ACK_SUFFIX}")),
        }
    }

    fn kind_of(&self, id: u64) -> Option<Kind> {
        if self.reports.contains(&id) {
            Some(Kind::Report)
        } else if self.acks.contains(&id) {
            Some(Kind::Ack)
        } else {
            None
        }
    }

    /// Stores a message durably; returns its id, or `None` for an ack that
    /// found the outbox full of reports (refused and counted: see the module
    /// docs).
    pub fn push(
        &mut self,
        kind: Kind,
        topic: &str,
        payload: &[u8],
    ) -> Result<Option<u64>, OutboxError> {
        let id = self.next_id;
        let path = self.path_of(id, kind);
        let topic_len =
            u16::try_from(topic.len()).map_err(|_| OutboxError::Corrupt { path: path.clone() })?;
        if kind == Kind::Ack && self.acks.is_empty() && self.reports.len() >= self.cap {
            self.dropped += 1;
            tracing::warn!(
                cap = self.cap,
                "outbox full of reports: ack not stored (reports keep priority)"
            );
            return Ok(None);
        }
        // Make room first, so the directory never holds more than `cap`.
        self.make_room(self.cap.saturating_sub(1));
        let mut bytes = Vec::with_capacity(2 + topic.len() + payload.len());
        bytes.extend_from_slice(&topic_len.to_be_bytes());
        bytes.extend_from_slice(topic.as_bytes());
        bytes.extend_from_slice(payload);
        persist::write_atomic(&path, &bytes, 0o600)
            .map_err(|source| OutboxError::Io { path, source })?;
        self.next_id += 1;
        match kind {
            Kind::Report => self.reports.insert(id),
            Kind::Ack => self.acks.insert(id),
        };
        Ok(Some(id))
    }

    /// Reads a stored message; `Ok(None)` when it is gone (acked or dropped).
    pub fn read(&self, id: u64) -> Result<Option<OutMessage>, OutboxError> {
        let Some(kind) = self.kind_of(id) else {
            return Ok(None);
        };
        let path = self.path_of(id, kind);
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
        if let Some(kind) = self.kind_of(id) {
            match kind {
                Kind::Report => self.reports.remove(&id),
                Kind::Ack => self.acks.remove(&id),
            };
            let _ = std::fs::remove_file(self.path_of(id, kind));
        }
    }

    /// Ids of the stored messages in sending order: reports oldest first,
    /// then acks oldest first.
    pub fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.reports.iter().chain(self.acks.iter()).copied()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.kind_of(id).is_some()
    }

    pub fn len(&self) -> usize {
        self.reports.len() + self.acks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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

    /// Drops messages until at most `keep` remain: the oldest acks first,
    /// then the oldest reports.
    fn make_room(&mut self, keep: usize) {
        while self.len() > keep {
            let (oldest, kind) = match self.acks.pop_first() {
                Some(id) => (id, Kind::Ack),
                None => match self.reports.pop_first() {
                    Some(id) => (id, Kind::Report),
                    None => return,
                },
            };
            let _ = std::fs::remove_file(self.path_of(oldest, kind));
            self.dropped += 1;
            tracing::warn!(
                id = oldest,
                ?kind,
                cap = self.cap,
                "outbox full: dropped the oldest message"
            );
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
        let a = o.push(Kind::Report, "t/a", b"one").unwrap().unwrap();
        let b = o.push(Kind::Report, "t/b", b"two").unwrap().unwrap();
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
        let c = o.push(Kind::Ack, "t/c", b"").unwrap().unwrap();
        assert!(c > b, "ids keep growing after a reopen");
        assert_eq!(o.read(a).unwrap(), None);
    }

    #[test]
    fn cap_drops_the_oldest_and_counts() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 3).unwrap();
        let ids: Vec<u64> = (0..5)
            .map(|i| o.push(Kind::Report, "t", &[i as u8]).unwrap().unwrap())
            .collect();
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
        let id = o.push(Kind::Report, "topic", b"x").unwrap().unwrap();
        std::fs::write(dir.path().join(format!("{id:020}.msg")), [0xff, 0xff, 1]).unwrap();
        assert!(matches!(o.read(id), Err(OutboxError::Corrupt { .. })));
    }

    #[test]
    fn reports_go_first_and_are_never_dropped_for_acks() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = Outbox::open(dir.path(), 4).unwrap();
        let a1 = o.push(Kind::Ack, "t/ack", b"a1").unwrap().unwrap();
        let r1 = o.push(Kind::Report, "t/report", b"r1").unwrap().unwrap();
        let a2 = o.push(Kind::Ack, "t/ack", b"a2").unwrap().unwrap();
        assert_eq!(
            o.ids().collect::<Vec<_>>(),
            vec![r1, a1, a2],
            "reports first"
        );
        // Full: a report pushes out the oldest ack, not the older report.
        let r2 = o.push(Kind::Report, "t/report", b"r2").unwrap().unwrap();
        let r3 = o.push(Kind::Report, "t/report", b"r3").unwrap().unwrap();
        assert_eq!(o.ids().collect::<Vec<_>>(), vec![r1, r2, r3, a2]);
        let r4 = o.push(Kind::Report, "t/report", b"r4").unwrap().unwrap();
        assert_eq!(o.ids().collect::<Vec<_>>(), vec![r1, r2, r3, r4]);
        // Full of reports: an ack is refused rather than dropping a report.
        assert_eq!(o.push(Kind::Ack, "t/ack", b"a3").unwrap(), None);
        assert_eq!(o.ids().collect::<Vec<_>>(), vec![r1, r2, r3, r4]);
        assert_eq!(o.dropped(), 3);
        drop(o);
        // Kinds survive a reopen.
        let o = Outbox::open(dir.path(), 4).unwrap();
        assert_eq!(o.ids().collect::<Vec<_>>(), vec![r1, r2, r3, r4]);
        let mut o = o;
        let a4 = o.push(Kind::Ack, "t/ack", b"a4").unwrap();
        assert_eq!(a4, None);
        o.remove(r1);
        let a5 = o.push(Kind::Ack, "t/ack", b"a5").unwrap().unwrap();
        assert_eq!(o.read(a5).unwrap().unwrap().payload, b"a5".to_vec());
        assert_eq!(o.ids().collect::<Vec<_>>(), vec![r2, r3, r4, a5]);
    }
}
