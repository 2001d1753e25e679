//! The agent's local request protocol: newline-delimited JSON on a Unix
//! socket (`[requests] socket` of `agent.toml`, default
//! `/run/shardline/agent.sock`). `agent/REQUESTS.md` is the reference; this
//! module is its one definition, used by the agent and by [`crate::Client`].
//!
//! One request object per line (at most [`MAX_LINE`] bytes, newline
//! included); the agent answers each request with one or more lines, in
//! order, and handles a connection's requests one at a time:
//!
//! ```text
//! → {"op":"acquire","app":"cam","instance":"w1","kind":"compute","units":2,"for_ms":30000,"priority":0,"wait_ms":10000}
//! ← {"answer":"queued","ticket":9,"position":1,"expected_wait_ms":4000}
//! ← {"answer":"granted","grant":9,"kind":"compute","units":2,"expires_at_ms":1796000030000}
//! → {"op":"renew","app":"cam","instance":"w1","grant":9,"for_ms":30000}
//! ← {"answer":"renewed","grant":9,"kind":"compute","units":2,"expires_at_ms":1796000060000}
//! → {"op":"release","app":"cam","instance":"w1","grant":9,"outcome":"completed"}
//! ← {"answer":"released","grant":9,"units":2}
//! → {"op":"query","app":"cam","instance":"w1"}
//! ← {"answer":"standing","reputation":52.5,"device_reputation":61.0,…}
//! ← {"answer":"refused","reason":"insufficient_quota","detail":"insufficient quota: …"}
//! ← {"answer":"error","error":"not connected to the allocator broker; request not sent"}
//! ```
//!
//! The only answer that is not the last for its request is `queued` on an
//! `acquire` with `wait_ms` > 0: the agent then sends further lines (a newer
//! `queued`, then the final `granted`, `refused` or — when `wait_ms` runs
//! out first — an `error`) on the same connection. Every other answer ends
//! its request.

use serde::{Deserialize, Serialize};

/// Longest request line the agent reads, newline included. A longer line is
/// answered with an `error` line and the connection is closed.
pub const MAX_LINE: usize = 4096;

/// The instance name used when a request names none.
pub const DEFAULT_INSTANCE: &str = "default";

fn default_instance() -> String {
    DEFAULT_INSTANCE.to_owned()
}

/// Which budget the units come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Compute,
    Data,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Compute => "compute",
            Kind::Data => "data",
        }
    }
}

/// How the work under a grant went (moves the instance's reputation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Completed,
    Unused,
    Errored,
    OverLimit,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::Unused => "unused",
            Outcome::Errored => "errored",
            Outcome::OverLimit => "over_limit",
        }
    }
}

impl std::str::FromStr for Outcome {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        [
            Outcome::Completed,
            Outcome::Unused,
            Outcome::Errored,
            Outcome::OverLimit,
        ]
        .into_iter()
        .find(|o| o.as_str() == s)
        .ok_or_else(|| format!("{s:?} is not one of completed, unused, errored, over_limit"))
    }
}

/// One request line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// `units` of `kind` for `for_ms`; with `wait_ms` > 0 the connection
    /// stays open for the final answer of a queued request (until `wait_ms`).
    Acquire {
        app: String,
        #[serde(default = "default_instance")]
        instance: String,
        kind: Kind,
        units: u32,
        for_ms: u32,
        #[serde(default)]
        priority: u8,
        #[serde(default)]
        wait_ms: u32,
    },
    /// Extends a held grant by `for_ms` from now.
    Renew {
        app: String,
        #[serde(default = "default_instance")]
        instance: String,
        grant: u64,
        for_ms: u32,
    },
    /// Gives a grant back (or withdraws a queued request by its ticket).
    Release {
        app: String,
        #[serde(default = "default_instance")]
        instance: String,
        grant: u64,
        outcome: Outcome,
    },
    /// The instance's reputation, quota and what it holds.
    Query {
        app: String,
        #[serde(default = "default_instance")]
        instance: String,
    },
}

impl Request {
    /// The application the caller acts as.
    pub fn app(&self) -> &str {
        match self {
            Request::Acquire { app, .. }
            | Request::Renew { app, .. }
            | Request::Release { app, .. }
            | Request::Query { app, .. } => app,
        }
    }

    /// The instance of the application.
    pub fn instance(&self) -> &str {
        match self {
            Request::Acquire { instance, .. }
            | Request::Renew { instance, .. }
            | Request::Release { instance, .. }
            | Request::Query { instance, .. } => instance,
        }
    }

    /// How long the caller waits for a queued request's final answer.
    pub fn wait_ms(&self) -> u32 {
        match self {
            Request::Acquire { wait_ms, .. } => *wait_ms,
            _ => 0,
        }
    }
}

/// One answer line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// A lease: the units are the instance's until `expires_at_ms` (Unix
    /// ms) unless renewed.
    Granted {
        grant: u64,
        kind: Kind,
        units: u32,
        expires_at_ms: u64,
    },
    /// Waiting for units; `ticket` names the entry (release it to
    /// withdraw) and becomes the grant's id.
    Queued {
        ticket: u64,
        position: u32,
        expected_wait_ms: u64,
    },
    /// Refused, by the allocator or (`not_authorized`, `rate_limited`,
    /// `out_of_range`) by the agent; `reason` is a stable snake_case word,
    /// `detail` the explanation in words.
    Refused {
        reason: String,
        detail: String,
    },
    Released {
        grant: u64,
        units: u32,
    },
    Renewed {
        grant: u64,
        kind: Kind,
        units: u32,
        expires_at_ms: u64,
    },
    /// Reputations are 0–100 (from the allocator's tenths of a point).
    Standing {
        reputation: f64,
        device_reputation: f64,
        compute_quota_units: u32,
        data_quota_units: u32,
        compute_in_use: u32,
        data_in_use: u32,
        queued: u32,
    },
    /// A local failure: the request did not get an answer from the
    /// allocator (not connected, no answer in time, malformed line …).
    Error {
        error: String,
    },
}

impl Answer {
    /// The answer in words (what the CLI prints).
    pub fn describe(&self) -> String {
        match self {
            Answer::Granted {
                grant,
                kind,
                units,
                expires_at_ms,
            } => format!(
                "granted: grant {grant}, {units} {} units until {expires_at_ms} (Unix ms)",
                kind.as_str()
            ),
            Answer::Queued {
                ticket,
                position,
                expected_wait_ms,
            } => format!(
                "queued: ticket {ticket}, position {position}, expected wait {expected_wait_ms} ms"
            ),
            Answer::Refused { reason, detail } => format!("refused ({reason}): {detail}"),
            Answer::Released { grant, units } => {
                format!("released: grant {grant} ({units} units returned)")
            }
            Answer::Renewed {
                grant,
                kind,
                units,
                expires_at_ms,
            } => format!(
                "renewed: grant {grant}, {units} {} units until {expires_at_ms} (Unix ms)",
                kind.as_str()
            ),
            Answer::Standing {
                reputation,
                device_reputation,
                compute_quota_units,
                data_quota_units,
                compute_in_use,
                data_in_use,
                queued,
            } => format!(
                "standing: reputation {reputation:.1} (device {device_reputation:.1}); \
                 compute {compute_in_use}/{compute_quota_units} units, \
                 data {data_in_use}/{data_quota_units} units; {queued} queued"
            ),
            Answer::Error { error } => format!("error: {error}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_request_lines_parse() {
        let r: Request = serde_json::from_str(
            r#"{"op":"acquire","app":"cam","instance":"w1","kind":"compute","units":2,"for_ms":30000,"priority":0,"wait_ms":10000}"#,
        )
        .unwrap();
        assert_eq!(r.app(), "cam");
        assert_eq!(r.wait_ms(), 10_000);
        let r: Request = serde_json::from_str(r#"{"op":"query","app":"cam"}"#).unwrap();
        assert_eq!(r.instance(), DEFAULT_INSTANCE);
        let r: Request = serde_json::from_str(
            r#"{"op":"release","app":"cam","grant":5,"outcome":"over_limit"}"#,
        )
        .unwrap();
        assert!(matches!(
            r,
            Request::Release {
                outcome: Outcome::OverLimit,
                ..
            }
        ));
        for bad in [
            r#"{"op":"acquire","app":"cam","kind":"gpu","units":1,"for_ms":1}"#,
            r#"{"op":"fly","app":"cam"}"#,
            r#"{"op":"query","app":"cam","extra":1}"#,
            r#"{"op":"acquire","app":"cam","kind":"data","units":-1,"for_ms":1}"#,
            "[]",
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn answers_round_trip_with_their_tag() {
        let a = Answer::Refused {
            reason: "rate_limited".into(),
            detail: "rate limited: retry after 20 ms".into(),
        };
        let line = serde_json::to_string(&a).unwrap();
        assert_eq!(
            line,
            r#"{"answer":"refused","reason":"rate_limited","detail":"rate limited: retry after 20 ms"}"#
        );
        assert_eq!(serde_json::from_str::<Answer>(&line).unwrap(), a);
        assert!("completed".parse::<Outcome>().is_ok());
        assert!("done".parse::<Outcome>().is_err());
    }
}
