//! Bootstrap-token enrolment: a device that is not enrolled yet introduces
//! itself to the allocator with an operator-issued token (`shardctl token
//! create`), read from `allocator.enroll_token_file`.
//!
//! - [`Enroller`] is the sans-IO decision part: given `now`, the link state
//!   and evidence of enrolment, it says when to publish the request. The
//!   daemon ([`super::agent`]) does the publishing and the file I/O.
//! - [`read_token`] reads the token file, refusing one that others can read
//!   (like the device key).
//! - [`Marker`] is `enrolled.json` in the state directory: once the device
//!   has evidence it is enrolled, the token is never sent again, even after
//!   a restart.
//!
//! Evidence: the allocator has no enrolment answer of its own, and it sends
//! signed instructions only to devices it has enrolled. So an instruction
//! signed by a pinned allocator key, addressed to this device, that the
//! device applied (or already had) proves it. A device whose traffic needs
//! nothing may never get an instruction; that is why the requests stop
//! after [`EnrollPolicy::max_attempts`] with exponential backoff (about 20
//! minutes with the defaults) instead of going on forever: repeating a
//! request is harmless (the allocator ignores one for a device already
//! enrolled with the same key), but a token should travel as few times as
//! possible. A restart of the agent starts a new round.
//!
//! The token goes only into the request on `dev/{device}/enroll`: not into
//! the outbox (which is on disk), not into logs, not into `status.json`.

use super::persist;
use shardline_shared::msg::{AckOutcome, MAX_ENROLL_TOKEN_LEN};
use shardline_support::secret_file::{self, SecretFileError};
use std::path::{Path, PathBuf};

/// Retry schedule of enrolment requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EnrollPolicy {
    /// Wait after the first request; doubled after each further one.
    pub first_retry_ms: u64,
    /// Longest wait between two requests.
    pub max_retry_ms: u64,
    /// Requests sent per agent start before giving up.
    pub max_attempts: u32,
}

impl Default for EnrollPolicy {
    /// 5 s, 10 s, 20 s … capped at 5 min, 10 requests: about 20 minutes,
    /// which covers an allocator restart or a broker failover during
    /// installation without republishing a token for days.
    fn default() -> Self {
        Self {
            first_retry_ms: 5_000,
            max_retry_ms: 300_000,
            max_attempts: 10,
        }
    }
}

/// Where enrolment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Requests are (still) being sent.
    Pending,
    /// Evidence seen (or remembered from an earlier run): nothing to send.
    Enrolled,
    /// `max_attempts` requests went unanswered; nothing more this run.
    GaveUp,
}

/// The enrolment decision core; see the module docs. Sans-IO.
#[derive(Debug, Clone)]
pub struct Enroller {
    policy: EnrollPolicy,
    phase: Phase,
    connected: bool,
    attempts: u32,
    last_sent_ms: Option<u64>,
    /// When the next request is due (while pending and connected).
    next_at_ms: Option<u64>,
}

impl Enroller {
    /// `enrolled`: the device already knows it is enrolled (marker file or
    /// an applied instruction in its persisted state).
    pub fn new(policy: EnrollPolicy, enrolled: bool) -> Self {
        Self {
            policy,
            phase: if enrolled {
                Phase::Enrolled
            } else {
                Phase::Pending
            },
            connected: false,
            attempts: 0,
            last_sent_ms: None,
            next_at_ms: None,
        }
    }

    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// Requests sent so far in this run.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The broker connection is up. A request lost with the previous
    /// connection is sent again at once, but never sooner than
    /// `first_retry_ms` after the last one (a flapping link must not turn
    /// into a stream of tokens).
    pub fn on_connected(&mut self, now_ms: u64) {
        self.connected = true;
        if self.phase == Phase::Pending {
            let earliest = self
                .last_sent_ms
                .map_or(now_ms, |t| t.saturating_add(self.policy.first_retry_ms));
            let due = now_ms.max(earliest);
            self.next_at_ms = Some(self.next_at_ms.map_or(due, |n| n.min(due)));
        }
    }

    /// The broker connection is down: nothing is sent until it is back.
    pub fn on_disconnected(&mut self) {
        self.connected = false;
    }

    /// `Some(attempt)` (1-based) when a request must be published now.
    pub fn poll(&mut self, now_ms: u64) -> Option<u32> {
        if self.phase != Phase::Pending || !self.connected {
            return None;
        }
        let due = self.next_at_ms?;
        if now_ms < due {
            return None;
        }
        if self.attempts >= self.policy.max_attempts {
            // The last request had its full wait and nothing came back.
            self.phase = Phase::GaveUp;
            self.next_at_ms = None;
            return None;
        }
        self.attempts += 1;
        self.last_sent_ms = Some(now_ms);
        self.next_at_ms = Some(now_ms.saturating_add(self.wait_after(self.attempts)));
        Some(self.attempts)
    }

    /// When [`Enroller::poll`] next has something to do, if ever.
    pub fn next_deadline(&self) -> Option<u64> {
        (self.phase == Phase::Pending && self.connected)
            .then_some(self.next_at_ms)
            .flatten()
    }

    /// A signed instruction from the allocator took effect: the device is
    /// enrolled. True the first time (the caller writes the marker).
    pub fn on_evidence(&mut self) -> bool {
        let first = self.phase != Phase::Enrolled;
        self.phase = Phase::Enrolled;
        self.next_at_ms = None;
        first
    }

    /// The wait after request number `attempt` (1-based).
    fn wait_after(&self, attempt: u32) -> u64 {
        let doublings = attempt.saturating_sub(1).min(32);
        self.policy
            .first_retry_ms
            .saturating_mul(1u64 << doublings)
            .min(self.policy.max_retry_ms)
    }
}

/// Whether an instruction's outcome proves the allocator knows the device:
/// only outcomes of an instruction that verified under a pinned key and
/// named this device (applied, already applied, or applied but a shard
/// failed). Rejections prove nothing: a forged or misaddressed message is
/// rejected too.
pub fn is_evidence(outcome: &AckOutcome) -> bool {
    matches!(
        outcome,
        AckOutcome::Applied | AckOutcome::Duplicate | AckOutcome::Failed { .. }
    )
}

/// A bootstrap token read from its file. `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct BootstrapToken(String);

impl BootstrapToken {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BootstrapToken(..)")
    }
}

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EnrollTokenError {
    #[error("enrolment token file {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "enrolment token file {path}: mode {mode:o} lets others read the token; expected 0600 or stricter"
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("enrolment token file {path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
}

/// Reads the token at `path`: mode 0600 or stricter, one line of 1 to
/// [`MAX_ENROLL_TOKEN_LEN`] printable ASCII characters (surrounding
/// whitespace is ignored).
pub fn read_token(path: &Path) -> Result<BootstrapToken, EnrollTokenError> {
    let io = |source| EnrollTokenError::Io {
        path: path.to_owned(),
        source,
    };
    let malformed = |reason: String| EnrollTokenError::Malformed {
        path: path.to_owned(),
        reason,
    };
    // Read a little more than a token can be, so an oversize one is told
    // apart from a file that is not a token at all.
    let text = match secret_file::read_text(path, MAX_ENROLL_TOKEN_LEN + 256) {
        Ok(t) => t,
        Err(SecretFileError::TooOpen { mode, .. }) => {
            return Err(EnrollTokenError::TooOpen {
                path: path.to_owned(),
                mode,
            })
        }
        Err(SecretFileError::Io { source, .. }) => return Err(io(source)),
        Err(e @ (SecretFileError::NotRegular { .. } | SecretFileError::TooLarge { .. })) => {
            return Err(malformed(e.to_string()))
        }
    };
    let token = text.trim();
    if token.is_empty() || token.len() > MAX_ENROLL_TOKEN_LEN {
        return Err(malformed(format!(
            "the token must be 1 to {MAX_ENROLL_TOKEN_LEN} characters, found {}",
            token.len()
        )));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(malformed(
            "the token must be one word of printable ASCII".into(),
        ));
    }
    Ok(BootstrapToken(token.to_owned()))
}

/// `enrolled.json` in the state directory: the device key that was seen
/// enrolled, so a new key (a replaced key file) enrols afresh.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub device: String,
    /// Hex of the enrolled public key.
    pub public_key: String,
    pub at_ms: u64,
}

impl Marker {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("enrolled.json")
    }

    /// True when the marker in `state_dir` names `public_key`. A missing or
    /// unreadable marker means "not known to be enrolled".
    pub fn holds_for(state_dir: &Path, public_key: &[u8; 32]) -> bool {
        std::fs::read(Self::path(state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice::<Marker>(&b).ok())
            .is_some_and(|m| m.public_key == hex::encode(public_key))
    }

    /// Writes the marker durably.
    pub fn write(&self, state_dir: &Path) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        persist::write_atomic(&Self::path(state_dir), &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shardline_shared::msg::RejectReason;
    use std::os::unix::fs::PermissionsExt;

    fn policy() -> EnrollPolicy {
        EnrollPolicy {
            first_retry_ms: 1_000,
            max_retry_ms: 4_000,
            max_attempts: 4,
        }
    }

    #[test]
    fn nothing_is_sent_before_the_link_is_up() {
        let mut e = Enroller::new(policy(), false);
        assert_eq!(e.poll(0), None);
        assert_eq!(e.next_deadline(), None);
        e.on_connected(10);
        assert_eq!(e.next_deadline(), Some(10));
        assert_eq!(e.poll(10), Some(1));
    }

    #[test]
    fn retries_back_off_exponentially_up_to_the_cap_then_give_up() {
        let mut e = Enroller::new(policy(), false);
        e.on_connected(0);
        let mut sent = Vec::new();
        for now in (0..=30_000).step_by(100) {
            if let Some(n) = e.poll(now) {
                sent.push((n, now));
            }
        }
        // Waits of 1 s, 2 s, 4 s (capped), then the last wait of 4 s runs out.
        assert_eq!(sent, vec![(1, 0), (2, 1_000), (3, 3_000), (4, 7_000)]);
        assert_eq!(e.phase(), Phase::GaveUp);
        assert_eq!(e.attempts(), 4);
        assert_eq!(e.next_deadline(), None);
        e.on_connected(40_000);
        assert_eq!(e.poll(40_000), None, "given up stays given up this run");
    }

    #[test]
    fn evidence_stops_the_requests_and_counts_once() {
        let mut e = Enroller::new(policy(), false);
        e.on_connected(0);
        assert_eq!(e.poll(0), Some(1));
        assert!(e.on_evidence());
        assert!(
            !e.on_evidence(),
            "only the first evidence writes the marker"
        );
        assert_eq!(e.phase(), Phase::Enrolled);
        assert_eq!(e.poll(60_000), None);
        assert_eq!(e.next_deadline(), None);
    }

    #[test]
    fn an_enrolled_device_never_sends() {
        let mut e = Enroller::new(policy(), true);
        e.on_connected(0);
        assert_eq!(e.poll(0), None);
        assert_eq!(e.phase(), Phase::Enrolled);
    }

    #[test]
    fn a_reconnect_resends_promptly_but_not_in_a_burst() {
        let mut e = Enroller::new(policy(), false);
        e.on_connected(0);
        assert_eq!(e.poll(0), Some(1));
        // The link drops at once: the next request would be due at 1 000.
        e.on_disconnected();
        assert_eq!(e.poll(1_000), None, "offline: nothing goes out");
        assert_eq!(e.next_deadline(), None);
        // Back 200 ms after the request: not before first_retry_ms has passed.
        e.on_connected(200);
        assert_eq!(e.poll(200), None);
        assert_eq!(e.next_deadline(), Some(1_000));
        assert_eq!(e.poll(1_000), Some(2));
        // Back long after the scheduled time: sent at once.
        e.on_disconnected();
        e.on_connected(50_000);
        assert_eq!(e.next_deadline(), Some(3_000));
        assert_eq!(e.poll(50_000), Some(3));
    }

    #[test]
    fn only_outcomes_of_a_verified_instruction_are_evidence() {
        assert!(is_evidence(&AckOutcome::Applied));
        assert!(is_evidence(&AckOutcome::Duplicate));
        assert!(is_evidence(&AckOutcome::Failed { reason: "x".into() }));
        for r in [
            RejectReason::BadSignature,
            RejectReason::UnknownKey,
            RejectReason::WrongDevice,
            RejectReason::Malformed,
            RejectReason::Rollback,
        ] {
            assert!(!is_evidence(&AckOutcome::Rejected(r)), "{r:?}");
        }
    }

    #[test]
    fn the_token_file_must_be_private_and_one_word() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let write = |text: &str, mode: u32| {
            std::fs::write(&p, text).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        write(&format!("{}\n", "ab".repeat(32)), 0o600);
        assert_eq!(read_token(&p).unwrap().as_str(), "ab".repeat(32));
        assert!(!format!("{:?}", read_token(&p).unwrap()).contains("abab"));
        write("abc", 0o644);
        assert!(matches!(
            read_token(&p),
            Err(EnrollTokenError::TooOpen { mode: 0o644, .. })
        ));
        write("two words", 0o400);
        assert!(matches!(
            read_token(&p),
            Err(EnrollTokenError::Malformed { .. })
        ));
        write("\n", 0o600);
        assert!(matches!(
            read_token(&p),
            Err(EnrollTokenError::Malformed { .. })
        ));
        write(&"a".repeat(MAX_ENROLL_TOKEN_LEN + 1), 0o600);
        assert!(matches!(
            read_token(&p),
            Err(EnrollTokenError::Malformed { .. })
        ));
        assert!(matches!(
            read_token(&dir.path().join("missing")),
            Err(EnrollTokenError::Io { .. })
        ));
    }

    #[test]
    fn the_marker_holds_only_for_the_key_it_names() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!Marker::holds_for(dir.path(), &[1; 32]));
        Marker {
            device: "r1".into(),
            public_key: hex::encode([1u8; 32]),
            at_ms: 5,
        }
        .write(dir.path())
        .unwrap();
        assert!(Marker::holds_for(dir.path(), &[1; 32]));
        assert!(!Marker::holds_for(dir.path(), &[2; 32]));
    }
}
