//! A minimal blocking HTTP/1.1 client for `shardctl` and `rotate`: one
//! request per connection, JSON bodies, plain `http://` to the admin API
//! (which listens on loopback by default) or `https://` trusting the CA
//! file given (rustls, `ring`).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// Why a request failed before an HTTP status came back.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("API URL {0:?} must be http://host:port or https://host:port")]
    Url(String),
    #[error("{0} is https://: give the CA that signed the API's certificate (--ca FILE)")]
    NoCa(String),
    #[error("TLS to the admin API at {addr} failed: {message}")]
    Tls { addr: String, message: String },
    #[error("cannot reach the admin API at {addr}: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed HTTP response: {0}")]
    Response(String),
}

/// A response: status and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// Sends one request to `base` (`http://host:port`).
pub fn request(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<HttpResponse, HttpError> {
    request_with_ca(base, None, method, path, token, body)
}

/// Sends one request to `base` (`http://host:port`, or `https://host:port`
/// whose certificate `ca` must have signed).
pub fn request_with_ca(
    base: &str,
    ca: Option<&Path>,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&serde_json::Value>,
) -> Result<HttpResponse, HttpError> {
    let (tls, rest) = match (base.strip_prefix("http://"), base.strip_prefix("https://")) {
        (Some(r), _) => (false, r),
        (_, Some(r)) => (true, r),
        _ => return Err(HttpError::Url(base.to_owned())),
    };
    let addr = Some(rest.trim_end_matches('/'))
        .filter(|a| !a.is_empty() && !a.contains('/'))
        .ok_or_else(|| HttpError::Url(base.to_owned()))?;
    let io = |source| HttpError::Io {
        addr: addr.to_owned(),
        source,
    };
    let tcp = TcpStream::connect(addr).map_err(io)?;
    tcp.set_read_timeout(Some(Duration::from_secs(60)))
        .map_err(io)?;
    let mut stream: Box<dyn ReadWrite> = if tls {
        let ca = ca.ok_or_else(|| HttpError::NoCa(base.to_owned()))?;
        Box::new(tls_stream(addr, ca, tcp)?)
    } else {
        Box::new(tcp)
    };
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    if !body.is_empty() {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(&body);
    let tls_err =
        |e: std::io::Error| match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
            Some(t) => HttpError::Tls {
                addr: addr.to_owned(),
                message: tls_message(t),
            },
            None => io(e),
        };
    stream.write_all(req.as_bytes()).map_err(tls_err)?;
    stream.flush().map_err(tls_err)?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        // A server that closes without TLS close_notify after a complete
        // answer: the answer is still whole (its length is checked below).
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
        Err(e) => return Err(tls_err(e)),
    }
    parse_response(&raw)
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// A TLS client stream to `addr` (`host:port`) trusting only `ca`.
fn tls_stream(
    addr: &str,
    ca: &Path,
    tcp: TcpStream,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, HttpError> {
    let err = |message: String| HttpError::Tls {
        addr: addr.to_owned(),
        message,
    };
    let config = super::tls::client_config(ca, None).map_err(|e| err(e.to_string()))?;
    let host = addr
        .rsplit_once(':')
        .map_or(addr, |(h, _)| h)
        .trim_start_matches('[')
        .trim_end_matches(']');
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())
        .map_err(|e| err(format!("{host:?} is not a server name: {e}")))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| err(e.to_string()))?;
    Ok(rustls::StreamOwned::new(conn, tcp))
}

/// A TLS failure in words an operator can act on.
fn tls_message(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InvalidCertificate(c) => format!(
            "the API's certificate is not trusted ({c:?}): is --ca the CA that signed it, \
             and does it name this host?"
        ),
        other => other.to_string(),
    }
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, HttpError> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| HttpError::Response("no header end".into()))?;
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| HttpError::Response("no status line".into()))?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:")
            && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok(HttpResponse { status, body })
}

fn dechunk(mut rest: &str) -> Result<String, HttpError> {
    let mut out = String::new();
    loop {
        let (size, after) = rest
            .split_once("\r\n")
            .ok_or_else(|| HttpError::Response("bad chunk".into()))?;
        let size = usize::from_str_radix(size.trim(), 16)
            .map_err(|_| HttpError::Response("bad chunk size".into()))?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = after
            .get(..size)
            .ok_or_else(|| HttpError::Response("short chunk".into()))?;
        out.push_str(chunk);
        rest = after.get(size + 2..).unwrap_or("");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_plain_and_chunked_responses() {
        let r = parse_response(b"HTTP/1.1 404 Not Found\r\ncontent-length: 2\r\n\r\n{}").unwrap();
        assert_eq!((r.status, r.body.as_str()), (404, "{}"));
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r.body, "abcde");
        assert!(parse_response(b"garbage").is_err());
    }
}
