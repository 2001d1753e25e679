//! A tiny W3C WebDriver client in plain `std` (one HTTP/1.1 request per
//! connection, the kit's own JSON reader), driving Debian's `chromium`
//! headless through `chromedriver`. Used by the dashboard's browser test
//! and `cargo xtask bench dashboard`.

use super::json::Json;
use super::proc::{free_tcp_port, Proc};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Where Debian's packages put the browser and its driver.
pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// The packages that bring them (`apt-get install chromium chromium-driver`).
pub const PACKAGES: [(&str, &str); 2] = [("chromium", CHROMIUM), ("chromium-driver", CHROMEDRIVER)];

/// W3C's key of an element reference in a JSON answer.
const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Why a browser is not there to drive, in words (`None`: it is).
pub fn missing() -> Option<String> {
    let absent: Vec<&str> = PACKAGES
        .iter()
        .filter(|(_, p)| !Path::new(p).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    (!absent.is_empty()).then(|| {
        format!(
            "{} not installed (apt-get install -y chromium chromium-driver; `cargo xtask test` does it as root)",
            absent.join(" and ")
        )
    })
}

/// A JSON string literal of `s`.
pub fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One HTTP request to `addr` (`host:port`); the status and the body.
pub fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let mut stream = TcpStream::connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|e| e.to_string())?;
    let body = body.unwrap_or("");
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        req.push_str("Content-Type: application/json; charset=utf-8\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream
        .write_all(req.as_bytes())
        .map_err(|e| format!("{method} {path}: {e}"))?;
    // Read the header, then exactly the body its length gives (a server
    // may keep the connection open despite `Connection: close`).
    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let read_err = |e: std::io::Error| format!("{method} {path}: reading the answer: {e}");
    let split = loop {
        if let Some(i) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = stream.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            return Err(format!("{method} {path}: no HTTP header in the answer"));
        }
        raw.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let mut payload = raw[split + 4..].to_vec();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: bad status line {head:?}"))?;
    let length = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    });
    let chunked = head.contains("transfer-encoding: chunked");
    loop {
        let done = match length {
            Some(len) => payload.len() >= len,
            None if chunked => payload.ends_with(b"0\r\n\r\n"),
            None => false,
        };
        if done {
            break;
        }
        let n = stream.read(&mut buf).map_err(read_err)?;
        if n == 0 {
            break;
        }
        payload.extend_from_slice(&buf[..n]);
    }
    if let Some(len) = length {
        payload.truncate(len);
    } else if chunked {
        payload = dechunk(&payload);
    }
    Ok((status, String::from_utf8_lossy(&payload).into_owned()))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next().unwrap_or("").trim(), 16).ok())
            .unwrap_or(0);
        if size == 0 || eol + 2 + size > b.len() {
            break;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
    out
}

/// Standard base64 (a WebDriver screenshot) to bytes.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' | b'\n' | b'\r' => continue,
            _ => return Err(format!("not base64: byte {c}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Ok(out)
}

/// A running chromedriver with one headless chromium session.
#[derive(Debug)]
pub struct Browser {
    addr: String,
    session: String,
    driver: Proc,
    /// The browser's profile (removed on drop).
    profile: PathBuf,
}

impl Browser {
    /// Starts chromedriver on a free port (its log at `log`) and opens a
    /// headless session with a `width`×`height` window.
    pub fn start(log: &Path, width: u32, height: u32) -> Result<Browser, String> {
        if let Some(why) = missing() {
            return Err(why);
        }
        let port = free_tcp_port();
        let mut cmd = Command::new(CHROMEDRIVER);
        cmd.arg(format!("--port={port}"));
        let mut driver = Proc::spawn("chromedriver", cmd, log)?;
        let addr = format!("127.0.0.1:{port}");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(st) = driver.exited() {
                return Err(format!(
                    "chromedriver exited ({st}):\n{}",
                    driver.log_tail(20)
                ));
            }
            if let Ok((200, body)) =
                http(&addr, "GET", "/status", &[], None, Duration::from_secs(2))
            {
                if Json::parse(&body)
                    .ok()
                    .and_then(|j| match j.get("value").get("ready") {
                        Json::Bool(b) => Some(*b),
                        _ => None,
                    })
                    .unwrap_or(false)
                {
                    break;
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "chromedriver did not come up:\n{}",
                    driver.log_tail(20)
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile =
            std::env::temp_dir().join(format!("sl-chromium-{}-{port}", std::process::id()));
        let caps = format!(
            r#"{{"capabilities":{{"alwaysMatch":{{"browserName":"chrome","goog:chromeOptions":{{"binary":{bin},"args":["--headless=new","--no-sandbox","--disable-gpu","--disable-dev-shm-usage","--no-first-run","--disable-extensions","--window-size={width},{height}","--user-data-dir={profile}"]}}}}}}}}"#,
            bin = json_str(CHROMIUM),
            profile = profile.display(),
        );
        let (status, body) = http(
            &addr,
            "POST",
            "/session",
            &[],
            Some(&caps),
            Duration::from_secs(60),
        )?;
        let j = Json::parse(&body).map_err(|e| format!("new session: {e}: {body}"))?;
        let session = j
            .get("value")
            .get("sessionId")
            .as_str()
            .ok_or_else(|| format!("new session refused ({status}): {body}"))?
            .to_owned();
        Ok(Browser {
            addr,
            session,
            driver,
            profile,
        })
    }

    /// A command of the session; its `value`, or the driver's error.
    pub fn cmd(&self, method: &str, path: &str, body: Option<&str>) -> Result<Json, String> {
        let full = format!("/session/{}{path}", self.session);
        let body = body.or((method == "POST").then_some("{}"));
        let (status, text) = http(
            &self.addr,
            method,
            &full,
            &[],
            body,
            Duration::from_secs(60),
        )?;
        let j = Json::parse(&text).map_err(|e| format!("{method} {path}: {e}: {text}"))?;
        if status != 200 {
            return Err(format!(
                "{method} {path}: {status} {}: {}",
                j.get("value").get("error").as_str().unwrap_or("?"),
                j.get("value").get("message").as_str().unwrap_or(&text)
            ));
        }
        Ok(j.get("value").clone())
    }

    pub fn goto(&self, url: &str) -> Result<(), String> {
        self.cmd(
            "POST",
            "/url",
            Some(&format!(r#"{{"url":{}}}"#, json_str(url))),
        )
        .map(|_| ())
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn eval(&self, script: &str) -> Result<Json, String> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&format!(r#"{{"script":{},"args":[]}}"#, json_str(script))),
        )
    }

    /// Polls `script` until it returns something truthy (not null, false,
    /// 0 or ""); that value, or an error naming `what` and the last value.
    pub fn wait_for(&self, what: &str, script: &str, within: Duration) -> Result<Json, String> {
        let deadline = Instant::now() + within;
        loop {
            let last = match self.eval(script) {
                Ok(v) => {
                    let truthy = match &v {
                        Json::Null => false,
                        Json::Bool(b) => *b,
                        Json::Num(n) => *n != 0.0,
                        Json::Str(s) => !s.is_empty(),
                        _ => true,
                    };
                    if truthy {
                        return Ok(v);
                    }
                    v
                }
                Err(e) => Json::Str(e),
            };
            if Instant::now() > deadline {
                return Err(format!("{what}: not within {within:?} (last: {last:?})"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Clicks the element `css` selects.
    pub fn click(&self, css: &str) -> Result<(), String> {
        let el = self.cmd(
            "POST",
            "/element",
            Some(&format!(
                r#"{{"using":"css selector","value":{}}}"#,
                json_str(css)
            )),
        )?;
        let id = el
            .get(ELEMENT_KEY)
            .as_str()
            .ok_or_else(|| format!("no element {css} (driver answered {el:?})"))?
            .to_owned();
        self.cmd("POST", &format!("/element/{id}/click"), None)
            .map(|_| ())
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&self, path: &Path) -> Result<u64, String> {
        let v = self.cmd("GET", "/screenshot", None)?;
        let png = base64_decode(v.as_str().ok_or("screenshot: no data")?)?;
        if !png.starts_with(b"\x89PNG") {
            return Err("screenshot: not a PNG".into());
        }
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        std::fs::write(path, &png).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(png.len() as u64)
    }

    /// The driver's log tail (for failure messages).
    pub fn log_tail(&self, n: usize) -> String {
        self.driver.log_tail(n)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = http(
            &self.addr,
            "DELETE",
            &format!("/session/{}", self.session),
            &[],
            None,
            Duration::from_secs(10),
        );
        self.driver.stop(Duration::from_secs(3));
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_and_json_strings() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("iVBORw==").unwrap(), b"\x89PNG");
        assert_eq!(json_str("a\"b\\c\n"), r#""a\"b\\c\n""#);
        assert_eq!(dechunk(b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"), b"abcde");
    }
}
