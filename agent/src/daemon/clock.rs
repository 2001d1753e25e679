//! When the device clock may raise the persisted time floor.
//!
//! The floor (`AcceptanceState::time_floor_ms`) keeps a router that reboots
//! into a 1970 clock from accepting old, captured instructions. It must only
//! ever take a time known to be right: a signed issue time of an accepted
//! instruction (done in `shared::accept`), or the local clock while NTP says
//! it is synchronised. Raising it from the raw clock would let one bad jump
//! ahead (a wrong RTC, a mistyped `date`) lock the device out until real time
//! caught up with the jump.
//!
//! "Synchronised" is what systemd-timesyncd says: it touches
//! [`TIMESYNC_FLAG`] on every successful synchronisation. The clock counts as
//! synchronised only while that touch is recent (within
//! [`MAX_SINCE_SYNC_MS`], twice timesyncd's longest default poll interval)
//! and not in the future: a clock that jumped ahead after the last sync
//! puts "now" far past the flag's time and so no longer qualifies. Devices
//! with another NTP client simply raise their floor from issue times only.

use std::path::Path;
use std::time::UNIX_EPOCH;

/// Touched by systemd-timesyncd on each successful synchronisation.
pub const TIMESYNC_FLAG: &str = "/run/systemd/timesync/synchronized";

/// How old the last synchronisation may be: twice timesyncd's default
/// `PollIntervalMaxSec` (2048 s).
pub const MAX_SINCE_SYNC_MS: u64 = 2 * 2_048_000;

/// A clock step back that is still "the same sync" (file times are rounded
/// and the flag is written just before the clock is read).
const SYNC_SLACK_MS: u64 = 5_000;

/// The sans-IO rule: the time `now_ms` may raise the floor to, given when
/// the clock was last synchronised.
pub fn trusted_time(now_ms: u64, last_sync_ms: Option<u64>) -> Option<u64> {
    let sync = last_sync_ms?;
    let fresh = now_ms.saturating_add(SYNC_SLACK_MS) >= sync
        && now_ms.saturating_sub(sync) <= MAX_SINCE_SYNC_MS;
    fresh.then_some(now_ms)
}

/// When `flag` was last touched, in ms since the epoch (`None` when it does
/// not exist: no synchronisation since boot, or no timesyncd).
pub fn last_sync_ms(flag: &Path) -> Option<u64> {
    let modified = std::fs::metadata(flag).ok()?.modified().ok()?;
    let since = modified.duration_since(UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// [`trusted_time`] against this machine's timesyncd flag.
pub fn trusted_now(now_ms: u64) -> Option<u64> {
    trusted_time(now_ms, last_sync_ms(Path::new(TIMESYNC_FLAG)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_780_000_000_000;

    #[test]
    fn an_unsynchronised_clock_never_raises_the_floor() {
        assert_eq!(trusted_time(T0, None), None);
    }

    #[test]
    fn a_recent_sync_makes_the_clock_trusted() {
        assert_eq!(trusted_time(T0, Some(T0 - 60_000)), Some(T0));
        assert_eq!(trusted_time(T0, Some(T0 - MAX_SINCE_SYNC_MS)), Some(T0));
    }

    #[test]
    fn a_jump_ahead_after_the_last_sync_is_not_trusted() {
        // Synced at T0, then the clock jumps a day ahead: "now" is far past
        // the sync, so the jumped clock cannot raise the floor.
        let day = 86_400_000;
        assert_eq!(trusted_time(T0 + day, Some(T0)), None);
        assert_eq!(trusted_time(T0 + MAX_SINCE_SYNC_MS + 1, Some(T0)), None);
    }

    #[test]
    fn a_sync_time_ahead_of_the_clock_is_not_trusted() {
        // The clock was stepped back behind its own last sync.
        assert_eq!(trusted_time(T0, Some(T0 + 60_000)), None);
        assert_eq!(trusted_time(T0, Some(T0 + 1_000)), Some(T0));
    }

    #[test]
    fn the_flag_time_is_read_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let flag = dir.path().join("synchronized");
        assert_eq!(last_sync_ms(&flag), None);
        std::fs::write(&flag, b"").unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let at = last_sync_ms(&flag).unwrap();
        assert!(now.abs_diff(at) < 5_000, "{now} vs {at}");
    }
}
