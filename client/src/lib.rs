//! `shardline-client`: asks the Shardline agent on this device for units of
//! a compute or data shard, over the agent's local Unix socket.
//!
//! ```no_run
//! use shardline_client::{Answer, Client, Kind};
//! use std::time::Duration;
//! let mut c = Client::connect("/run/shardline/agent.sock")?;
//! match c.acquire("cam", "w1", Kind::Compute, 2, Duration::from_secs(30), Duration::from_secs(10))? {
//!     Answer::Granted { grant, .. } => println!("grant {grant}"),
//!     other => println!("{}", other.describe()),
//! }
//! # Ok::<(), shardline_client::ClientError>(())
//! ```
//!
//! The agent checks who connects (the socket's peer credentials) against
//! the applications its configuration declares, forwards the request signed
//! with the device key to the allocator, and relays the allocator's signed
//! answer. The protocol is in [`wire`] and `agent/REQUESTS.md`.
//!
//! Plain `std`: blocking calls, one request at a time per [`Client`].
#![forbid(unsafe_code)]

pub mod wire;

pub use wire::{Answer, Kind, Outcome, Request, DEFAULT_INSTANCE, MAX_LINE};

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The agent's default socket.
pub const DEFAULT_SOCKET: &str = "/run/shardline/agent.sock";

/// Longest answer line read (answers are far smaller; a longer line means
/// the other end is not the agent).
const MAX_ANSWER_LINE: usize = 16 * 1024;

/// How long past the request's own wait an answer may take before the
/// client gives up (the agent answers every request within its
/// `answer_timeout_ms`, 5 s by default).
const READ_SLACK: Duration = Duration::from_secs(60);

/// Why a call failed (an answer from the agent, a refusal included, is not
/// a failure: see [`Answer`]).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {path}: {source}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent closed the connection without an answer")]
    Closed,
    #[error("the agent sent a line that is not an answer: {0}")]
    Malformed(String),
    #[error("{0} is longer than a duration a request may carry")]
    Duration(String),
    /// The agent could not get an answer from the allocator (or refused the
    /// line): its `error` answer.
    #[error("{0}")]
    Agent(String),
}

/// A connection to the agent's request socket.
#[derive(Debug)]
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn millis(d: Duration) -> Result<u32, ClientError> {
    u32::try_from(d.as_millis()).map_err(|_| ClientError::Duration(format!("{d:?}")))
}

impl Client {
    /// Connects to the agent's socket.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_owned(),
            source,
        })?;
        let writer = stream.try_clone()?;
        Ok(Client {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Asks for `units` of `kind` for `duration`. With a non-zero `wait`, a
    /// queued request is waited for (up to `wait`) and its final answer
    /// returned; use [`Client::call`] to see the `queued` answer too.
    pub fn acquire(
        &mut self,
        app: &str,
        instance: &str,
        kind: Kind,
        units: u32,
        duration: Duration,
        wait: Duration,
    ) -> Result<Answer, ClientError> {
        let req = Request::Acquire {
            app: app.to_owned(),
            instance: instance.to_owned(),
            kind,
            units,
            for_ms: millis(duration)?,
            priority: 0,
            wait_ms: millis(wait)?,
        };
        self.call(&req, |_| {})
    }

    /// Extends grant `grant` by `duration` from now.
    pub fn renew(
        &mut self,
        app: &str,
        instance: &str,
        grant: u64,
        duration: Duration,
    ) -> Result<Answer, ClientError> {
        let req = Request::Renew {
            app: app.to_owned(),
            instance: instance.to_owned(),
            grant,
            for_ms: millis(duration)?,
        };
        self.call(&req, |_| {})
    }

    /// Gives grant `grant` back (or withdraws a queued request by its ticket).
    pub fn release(
        &mut self,
        app: &str,
        instance: &str,
        grant: u64,
        outcome: Outcome,
    ) -> Result<Answer, ClientError> {
        let req = Request::Release {
            app: app.to_owned(),
            instance: instance.to_owned(),
            grant,
            outcome,
        };
        self.call(&req, |_| {})
    }

    /// The instance's standing (reputation, quota, units in use).
    pub fn query(&mut self, app: &str, instance: &str) -> Result<Answer, ClientError> {
        let req = Request::Query {
            app: app.to_owned(),
            instance: instance.to_owned(),
        };
        self.call(&req, |_| {})
    }

    /// Sends one request and returns its last answer; `progress` sees every
    /// answer before it (a `queued` one on an acquire that waits).
    pub fn call(
        &mut self,
        req: &Request,
        mut progress: impl FnMut(&Answer),
    ) -> Result<Answer, ClientError> {
        let mut line =
            serde_json::to_string(req).map_err(|e| ClientError::Malformed(e.to_string()))?;
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let wait = Duration::from_millis(u64::from(req.wait_ms()));
        self.reader
            .get_ref()
            .set_read_timeout(Some(wait + READ_SLACK))?;
        loop {
            let answer = self.read_answer()?;
            // Only a queued answer to a request that waits has a successor.
            if matches!(answer, Answer::Queued { .. }) && req.wait_ms() > 0 {
                progress(&answer);
                continue;
            }
            return match answer {
                Answer::Error { error } => Err(ClientError::Agent(error)),
                a => Ok(a),
            };
        }
    }

    fn read_answer(&mut self) -> Result<Answer, ClientError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_ANSWER_LINE as u64)
            .read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        if buf.last() != Some(&b'\n') {
            return Err(if n >= MAX_ANSWER_LINE {
                ClientError::Malformed("an answer line above 16 KiB".into())
            } else {
                ClientError::Closed
            });
        }
        serde_json::from_slice(&buf).map_err(|e| {
            ClientError::Malformed(format!("{e}: {}", String::from_utf8_lossy(&buf).trim_end()))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-connection server: for each request line it receives, it
    /// writes the next batch of canned answer lines; returns what it read.
    fn serve(
        dir: &Path,
        batches: Vec<Vec<&'static str>>,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut w = stream;
            let mut seen = Vec::new();
            for batch in batches {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(line.trim_end().to_owned());
                for a in batch {
                    w.write_all(a.as_bytes()).unwrap();
                    w.write_all(b"\n").unwrap();
                }
            }
            seen
        });
        (path, h)
    }

    #[test]
    fn acquire_sends_the_documented_line_and_returns_the_grant() {
        let dir = tempdir();
        let (path, server) = serve(
            &dir,
            vec![vec![
                r#"{"answer":"granted","grant":5,"kind":"compute","units":2,"expires_at_ms":99}"#,
            ]],
        );
        let mut c = Client::connect(&path).unwrap();
        let a = c
            .acquire(
                "cam",
                "w1",
                Kind::Compute,
                2,
                Duration::from_secs(30),
                Duration::ZERO,
            )
            .unwrap();
        assert_eq!(
            a,
            Answer::Granted {
                grant: 5,
                kind: Kind::Compute,
                units: 2,
                expires_at_ms: 99
            }
        );
        drop(c);
        let seen = server.join().unwrap();
        let sent: serde_json::Value = serde_json::from_str(&seen[0]).unwrap();
        assert_eq!(sent["op"], "acquire");
        assert_eq!(sent["for_ms"], 30_000);
        assert_eq!(sent["wait_ms"], 0);
    }

    #[test]
    fn a_waiting_acquire_sees_queued_then_returns_the_final_answer() {
        let dir = tempdir();
        let (path, server) = serve(
            &dir,
            vec![vec![
                r#"{"answer":"queued","ticket":9,"position":2,"expected_wait_ms":100}"#,
                r#"{"answer":"queued","ticket":9,"position":1,"expected_wait_ms":50}"#,
                r#"{"answer":"granted","grant":9,"kind":"data","units":1,"expires_at_ms":7}"#,
            ]],
        );
        let mut c = Client::connect(&path).unwrap();
        let req = Request::Acquire {
            app: "cam".into(),
            instance: "w1".into(),
            kind: Kind::Data,
            units: 1,
            for_ms: 1000,
            priority: 0,
            wait_ms: 5000,
        };
        let mut progress = Vec::new();
        let a = c.call(&req, |a| progress.push(a.clone())).unwrap();
        assert!(matches!(a, Answer::Granted { grant: 9, .. }));
        assert_eq!(progress.len(), 2);
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn refusals_are_answers_and_errors_are_errors() {
        let dir = tempdir();
        let (path, server) = serve(
            &dir,
            vec![
                vec![
                    r#"{"answer":"refused","reason":"insufficient_quota","detail":"insufficient quota"}"#,
                ],
                vec![
                    r#"{"answer":"error","error":"not connected to the allocator broker; request not sent"}"#,
                ],
                vec!["this is not json"],
            ],
        );
        let mut c = Client::connect(&path).unwrap();
        let a = c.query("cam", "w1").unwrap();
        assert!(matches!(a, Answer::Refused { ref reason, .. } if reason == "insufficient_quota"));
        let e = c.release("cam", "w1", 3, Outcome::Completed).unwrap_err();
        assert!(
            matches!(&e, ClientError::Agent(m) if m.contains("not connected")),
            "{e}"
        );
        let e = c.renew("cam", "w1", 3, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(e, ClientError::Malformed(_)), "{e}");
        drop(c);
        server.join().unwrap();
    }

    #[test]
    fn a_closed_connection_and_a_missing_socket_are_errors() {
        let dir = tempdir();
        let (path, server) = serve(&dir, vec![vec![]]);
        let mut c = Client::connect(&path).unwrap();
        // The server reads the line, answers nothing and closes.
        let e = c.query("cam", "w1").unwrap_err();
        assert!(matches!(e, ClientError::Closed), "{e}");
        server.join().unwrap();
        let e = Client::connect(dir.join("nope.sock")).unwrap_err();
        assert!(e.to_string().contains("nope.sock"), "{e}");
        assert!(matches!(
            millis(Duration::from_secs(u64::MAX / 2)),
            Err(ClientError::Duration(_))
        ));
    }

    /// A private temporary directory (std only: no tempfile dependency).
    fn tempdir() -> PathBuf {
        use std::sync::atomic::{AtomicU32, Ordering};
        static N: AtomicU32 = AtomicU32::new(0);
        let d = std::env::temp_dir().join(format!(
            "shardline-client-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
