//! The request socket's I/O edge: a Unix stream socket, one task per
//! connection, newline-delimited JSON ([`shardline_client::wire`] and
//! `agent/REQUESTS.md`). Every decision is [`super::requests::RequestCore`]'s;
//! this file moves lines between connections and the daemon loop.
//!
//! - The caller's uid/gid/pid come from the kernel (`SO_PEERCRED`, read once
//!   at accept): the only identity the core trusts.
//! - The socket file is mode 0666: any local user may *connect*, the
//!   `[[apps]]` credentials decide what it may *do* (one place grants
//!   access; no group membership to keep in step). Connections are bounded
//!   (`max_connections`; one over the limit gets an error line and is
//!   closed), a line is at most [`wire::MAX_LINE`] bytes (longer: an error
//!   line, then the connection is closed), and a connection idle for
//!   [`IDLE_TIMEOUT`] between requests is closed.
//! - A connection's requests are handled one at a time: the next line is
//!   read only after the previous request's last answer was written.

use super::requests::{Caller, ConnId};
use shardline_client::wire::{self, Answer, Request};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};
use tokio::task::JoinHandle;

/// A connection waiting this long for its next request line is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

/// Mode of the socket file (see the module docs).
pub const SOCKET_MODE: u32 = 0o666;

/// One answer line for a connection; `last` ends its current request.
#[derive(Debug, Clone)]
pub struct Reply {
    pub answer: Answer,
    pub last: bool,
}

/// What connections tell the daemon loop.
#[derive(Debug)]
pub enum ApiEvent {
    /// A well-formed request line; answers go back through `reply`.
    Request {
        conn: ConnId,
        caller: Caller,
        request: Request,
        reply: UnboundedSender<Reply>,
    },
    /// A connection ended (its pending requests are forgotten).
    Closed { conn: ConnId },
    /// A line that was refused before it reached the core (log it).
    BadLine {
        conn: ConnId,
        caller: Caller,
        error: String,
    },
}

/// Why the socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("request socket {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("request socket {path}: another process answers on it (a second agent?)")]
    InUse { path: PathBuf },
    #[error("request socket {path}: exists and is not a socket")]
    NotASocket { path: PathBuf },
}

/// The open socket: the accept task and the events of its connections.
#[derive(Debug)]
pub struct LocalApi {
    pub path: PathBuf,
    pub events: UnboundedReceiver<ApiEvent>,
    accept: JoinHandle<()>,
}

impl LocalApi {
    /// Binds `path` (replacing a stale socket file, never a live one or
    /// another kind of file), sets its mode and starts accepting. Must run
    /// inside a tokio runtime.
    pub fn open(path: &Path, max_connections: usize) -> Result<LocalApi, SocketError> {
        let io = |source| SocketError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                // Under systemd the unit's RuntimeDirectory= made it already.
                std::fs::create_dir_all(dir).map_err(io)?;
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
                    .map_err(io)?;
            }
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) => {
                use std::os::unix::fs::FileTypeExt;
                if !meta.file_type().is_socket() {
                    return Err(SocketError::NotASocket {
                        path: path.to_owned(),
                    });
                }
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse {
                        path: path.to_owned(),
                    });
                }
                std::fs::remove_file(path).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        let listener = UnixListener::bind(path).map_err(io)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE)).map_err(io)?;
        let (tx, events) = unbounded_channel();
        let accept = tokio::spawn(accept_loop(listener, tx, max_connections));
        Ok(LocalApi {
            path: path.to_owned(),
            events,
            accept,
        })
    }

    /// Stops accepting and removes the socket file.
    pub fn close(self) {
        self.accept.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Counts a live connection; the count drops with it.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn accept_loop(listener: UnixListener, tx: UnboundedSender<ApiEvent>, max: usize) {
    let live = Arc::new(AtomicUsize::new(0));
    let mut next: ConnId = 0;
    loop {
        let mut stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and the like: back off instead of spinning.
                tracing::warn!(error = %e, "request socket: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if live.load(Ordering::Relaxed) >= max {
            tracing::warn!(max, "request socket: connection refused, too many open");
            let _ = write_answer(
                &mut stream,
                &Answer::Error {
                    error: format!("the agent has {max} request connections open; try again later"),
                },
            )
            .await;
            continue;
        }
        let caller = match peer(&stream) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "request socket: no peer credentials; closed");
                continue;
            }
        };
        live.fetch_add(1, Ordering::Relaxed);
        let slot = Slot(live.clone());
        next += 1;
        tokio::spawn(connection(next, caller, stream, tx.clone(), slot));
    }
}

/// The kernel's credentials of the peer (nix's safe `SO_PEERCRED`).
fn peer(stream: &UnixStream) -> Result<Caller, nix::Error> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    let c = getsockopt(stream, PeerCredentials)?;
    Ok(Caller {
        pid: c.pid(),
        uid: c.uid(),
        gid: c.gid(),
    })
}

async fn write_answer<W: AsyncWriteExt + Unpin>(
    stream: &mut W,
    answer: &Answer,
) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(answer).map_err(std::io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line).await
}

enum Line {
    Text(Vec<u8>),
    TooLong,
    Eof,
}

async fn read_line(
    reader: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let n = (&mut *reader)
        .take(wire::MAX_LINE as u64)
        .read_until(b'\n', &mut buf)
        .await?;
    if n == 0 {
        return Ok(Line::Eof);
    }
    if buf.last() != Some(&b'\n') {
        // Either MAX_LINE bytes without a newline, or EOF mid-line.
        return Ok(if n >= wire::MAX_LINE {
            Line::TooLong
        } else {
            Line::Eof
        });
    }
    Ok(Line::Text(buf))
}

async fn connection(
    conn: ConnId,
    caller: Caller,
    stream: UnixStream,
    tx: UnboundedSender<ApiEvent>,
    _slot: Slot,
) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let line = match tokio::time::timeout(IDLE_TIMEOUT, read_line(&mut reader)).await {
            Err(_) | Ok(Err(_)) | Ok(Ok(Line::Eof)) => break,
            Ok(Ok(Line::TooLong)) => {
                let error = format!("request line longer than {} bytes", wire::MAX_LINE);
                let _ = tx.send(ApiEvent::BadLine {
                    conn,
                    caller,
                    error: error.clone(),
                });
                let _ = write_answer(&mut write, &Answer::Error { error }).await;
                break;
            }
            Ok(Ok(Line::Text(t))) => t,
        };
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let request: Request = match serde_json::from_slice(&line) {
            Ok(r) => r,
            Err(e) => {
                let error = format!("not a request: {e}");
                let _ = tx.send(ApiEvent::BadLine {
                    conn,
                    caller,
                    error: error.clone(),
                });
                if write_answer(&mut write, &Answer::Error { error })
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
        };
        let (reply_tx, mut replies) = unbounded_channel();
        if tx
            .send(ApiEvent::Request {
                conn,
                caller,
                request,
                reply: reply_tx,
            })
            .is_err()
        {
            break; // the daemon is stopping
        }
        let mut ok = true;
        while let Some(r) = replies.recv().await {
            if write_answer(&mut write, &r.answer).await.is_err() {
                ok = false;
                break;
            }
            if r.last {
                break;
            }
        }
        if !ok {
            break;
        }
    }
    let _ = tx.send(ApiEvent::Closed { conn });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_live_socket_is_never_stolen_and_a_stale_one_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/agent.sock");
        let api = LocalApi::open(&path, 4).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, SOCKET_MODE);
        assert!(matches!(
            LocalApi::open(&path, 4),
            Err(SocketError::InUse { .. })
        ));
        // A socket file nobody answers on (a killed agent's) is replaced.
        api.accept.abort();
        tokio::task::yield_now().await;
        let api = LocalApi::open(&path, 4).unwrap();
        api.close();
        assert!(!path.exists(), "close removes the file");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            LocalApi::open(&path, 4),
            Err(SocketError::NotASocket { .. })
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"not a socket", "left alone");
    }
}
