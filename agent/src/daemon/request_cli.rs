//! `shardline-agent request`: an explicit shard request from the command
//! line, through the running agent's request socket (with
//! [`shardline_client`], like any application).
//!
//! ```text
//! shardline-agent request --app cam [--instance w1] --type compute --units 2 --for 30s [--wait 10s]
//! shardline-agent request --app cam [--instance w1] --renew 5 --for 30s
//! shardline-agent request --app cam [--instance w1] --release 5 --outcome completed
//! shardline-agent request --app cam [--instance w1] --query
//! ```
//!
//! It prints each answer in words (a `queued` line first when it waits) and
//! exits with:
//!
//! | code | meaning |
//! |---|---|
//! | 0 | granted, renewed, released, or the standing was shown |
//! | 1 | no answer: the agent is unreachable, or answered with an error (not connected to the broker, no answer in time, still queued when `--wait` ran out, …) |
//! | 2 | usage error (clap's code) |
//! | 3 | refused (by the allocator, or by the agent: not authorised, rate limited, out of range) |
//! | 4 | queued, and not waited for (no `--wait`) |

use shardline_client::{Answer, Client, ClientError, Kind, Outcome, Request};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Exit code of a refusal.
pub const EXIT_REFUSED: u8 = 3;
/// Exit code of a request left queued.
pub const EXIT_QUEUED: u8 = 4;
/// Exit code of a missing answer.
pub const EXIT_NO_ANSWER: u8 = 1;
/// Exit code of a usage error (as clap's).
pub const EXIT_USAGE: u8 = 2;

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum KindArg {
    Compute,
    Data,
}

#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("what")
        .args(["kind", "renew", "release", "query"])
        .required(true)
        .multiple(false)
))]
pub struct RequestArgs {
    /// The agent's request socket.
    #[arg(long, default_value = shardline_client::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The application to act as (declared in the agent's [[apps]]).
    #[arg(long)]
    pub app: String,
    /// The application's instance.
    #[arg(long, default_value = shardline_client::DEFAULT_INSTANCE)]
    pub instance: String,
    /// Acquire units of this shard type.
    #[arg(long = "type", value_enum, value_name = "TYPE")]
    pub kind: Option<KindArg>,
    /// How many units to acquire.
    #[arg(long)]
    pub units: Option<u32>,
    /// Lease length of an acquire or renewal (e.g. 30s, 500ms, 2m).
    #[arg(long = "for", value_name = "DURATION", value_parser = parse_duration)]
    pub duration: Option<Duration>,
    /// Wait this long for a queued acquire's final answer.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub wait: Option<Duration>,
    /// Priority among the instance's own queued requests (higher first).
    #[arg(long, default_value_t = 0)]
    pub priority: u8,
    /// Renew this grant.
    #[arg(long, value_name = "GRANT")]
    pub renew: Option<u64>,
    /// Release this grant (or withdraw a queued request by its ticket).
    #[arg(long, value_name = "GRANT")]
    pub release: Option<u64>,
    /// How the work under the released grant went.
    #[arg(long, value_parser = parse_outcome)]
    pub outcome: Option<Outcome>,
    /// Show the instance's reputation, quota and units in use.
    #[arg(long)]
    pub query: bool,
}

/// `30s`, `500ms`, `2m`, `1h`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 30s, 500ms, 2m)"))?;
    let ms = match unit {
        "ms" => Some(n),
        "" | "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }
    .ok_or_else(|| format!("{s:?} is not a duration (units: ms, s, m, h)"))?;
    Ok(Duration::from_millis(ms))
}

fn parse_outcome(s: &str) -> Result<Outcome, String> {
    s.parse()
}

fn millis(d: Duration) -> Result<u32, String> {
    u32::try_from(d.as_millis()).map_err(|_| format!("{d:?} is too long"))
}

/// The request the arguments ask for, or what is missing.
pub fn to_request(a: &RequestArgs) -> Result<Request, String> {
    let app = a.app.clone();
    let instance = a.instance.clone();
    let need_for = || {
        a.duration
            .ok_or_else(|| "--for DURATION is required".to_owned())
            .and_then(millis)
    };
    if let Some(kind) = a.kind {
        let units = a.units.ok_or("--units N is required with --type")?;
        return Ok(Request::Acquire {
            app,
            instance,
            kind: match kind {
                KindArg::Compute => Kind::Compute,
                KindArg::Data => Kind::Data,
            },
            units,
            for_ms: need_for()?,
            priority: a.priority,
            wait_ms: a.wait.map(millis).transpose()?.unwrap_or(0),
        });
    }
    if a.units.is_some() || a.wait.is_some() {
        return Err("--units and --wait go with --type (an acquire)".into());
    }
    if let Some(grant) = a.renew {
        return Ok(Request::Renew {
            app,
            instance,
            grant,
            for_ms: need_for()?,
        });
    }
    if a.duration.is_some() {
        return Err("--for goes with --type or --renew".into());
    }
    if let Some(grant) = a.release {
        let outcome = a
            .outcome
            .ok_or("--outcome completed|unused|errored|over_limit is required with --release")?;
        return Ok(Request::Release {
            app,
            instance,
            grant,
            outcome,
        });
    }
    if a.outcome.is_some() {
        return Err("--outcome goes with --release".into());
    }
    Ok(Request::Query { app, instance })
}

/// The exit code of a last answer.
pub fn exit_code(answer: &Answer) -> u8 {
    match answer {
        Answer::Granted { .. }
        | Answer::Renewed { .. }
        | Answer::Released { .. }
        | Answer::Standing { .. } => 0,
        Answer::Refused { .. } => EXIT_REFUSED,
        Answer::Queued { .. } => EXIT_QUEUED,
        Answer::Error { .. } => EXIT_NO_ANSWER,
    }
}

pub fn request(args: RequestArgs) -> anyhow::Result<ExitCode> {
    let req = match to_request(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("shardline-agent request: {e}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    };
    let result = Client::connect(&args.socket)
        .and_then(|mut c| c.call(&req, |a| println!("{}", a.describe())));
    match result {
        Ok(answer) => {
            println!("{}", answer.describe());
            Ok(ExitCode::from(exit_code(&answer)))
        }
        Err(ClientError::Agent(error)) => {
            eprintln!("shardline-agent request: error: {error}");
            Ok(ExitCode::from(EXIT_NO_ANSWER))
        }
        Err(e) => {
            eprintln!("shardline-agent request: {e}");
            Ok(ExitCode::from(EXIT_NO_ANSWER))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        args: RequestArgs,
    }

    fn parse(line: &str) -> Result<Request, String> {
        let argv = std::iter::once("t").chain(line.split_whitespace());
        let t = T::try_parse_from(argv).map_err(|e| e.to_string())?;
        to_request(&t.args)
    }

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        for bad in ["", "s", "3d", "-1s", "1.5s", "99999999999999999999h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_mode_builds_its_request_and_says_what_is_missing() {
        let r =
            parse("--app cam --instance w1 --type compute --units 2 --for 30s --wait 10s").unwrap();
        assert_eq!(
            r,
            Request::Acquire {
                app: "cam".into(),
                instance: "w1".into(),
                kind: Kind::Compute,
                units: 2,
                for_ms: 30_000,
                priority: 0,
                wait_ms: 10_000
            }
        );
        assert!(matches!(
            parse("--app cam --renew 5 --for 1m").unwrap(),
            Request::Renew {
                grant: 5,
                for_ms: 60_000,
                ..
            }
        ));
        assert!(matches!(
            parse("--app cam --release 5 --outcome over_limit").unwrap(),
            Request::Release {
                outcome: Outcome::OverLimit,
                ..
            }
        ));
        assert!(
            matches!(parse("--app cam --query").unwrap(), Request::Query { ref instance, .. } if instance == "default")
        );
        assert!(parse("--app cam --type data --for 30s")
            .unwrap_err()
            .contains("--units"));
        assert!(parse("--app cam --renew 5").unwrap_err().contains("--for"));
        assert!(parse("--app cam --release 5")
            .unwrap_err()
            .contains("--outcome"));
        assert!(
            parse("--app cam --query --renew 5 --for 1s").is_err(),
            "one mode"
        );
        assert!(parse("--app cam").is_err(), "a mode is required");
        assert!(parse("--app cam --query --wait 1s").is_err());
    }

    #[test]
    fn exit_codes_follow_the_table() {
        assert_eq!(
            exit_code(&Answer::Refused {
                reason: "x".into(),
                detail: "y".into()
            }),
            EXIT_REFUSED
        );
        assert_eq!(
            exit_code(&Answer::Queued {
                ticket: 1,
                position: 1,
                expected_wait_ms: 1
            }),
            EXIT_QUEUED
        );
        assert_eq!(exit_code(&Answer::Released { grant: 1, units: 1 }), 0);
    }
}
