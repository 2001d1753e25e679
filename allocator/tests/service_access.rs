//! Access and audit (issue 20) on a real allocator process over real HTTP:
//! operator tokens with roles made and revoked through the API and
//! `shardctl`, 401 before 403, every non-GET action audited (ok and
//! refused, with its actor) in the store and the journal, surviving
//! `kill -9`; token secrets never in the store file nor the log; the audit
//! log's bound; and HTTPS on the API listener with `shardctl --ca`.

mod service_common;

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use service_common::*;
use shardline_allocator::service::http;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Calls the API with `token` (or none).
fn call(
    alloc: &Allocator,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let r = http::request(&alloc.api_url(), method, path, token, body.as_ref()).unwrap();
    let v = serde_json::from_str(&r.body).unwrap_or(serde_json::Value::String(r.body));
    (r.status, v)
}

/// Creates an operator token as the token file's admin; (id, token).
fn create(alloc: &Allocator, name: &str, role: &str, ttl_s: Option<u64>) -> (String, String) {
    let (st, v) = alloc.api(
        "POST",
        "/v1/operators/tokens",
        Some(serde_json::json!({ "name": name, "role": role, "ttl_s": ttl_s })),
    );
    assert_eq!(st, 200, "{v}");
    assert_eq!(v["name"], name);
    assert_eq!(v["role"], role);
    (
        v["id"].as_str().unwrap().to_owned(),
        v["token"].as_str().unwrap().to_owned(),
    )
}

fn audit(alloc: &Allocator, query: &str) -> Vec<serde_json::Value> {
    let (st, v) = alloc.api("GET", &format!("/v1/audit{query}"), None);
    assert_eq!(st, 200, "{v}");
    v["entries"].as_array().unwrap().clone()
}

/// The entry of `actor` doing `action` (newest first), if any.
fn find<'a>(
    entries: &'a [serde_json::Value],
    actor: &str,
    action: &str,
) -> Option<&'a serde_json::Value> {
    entries
        .iter()
        .find(|e| e["actor"] == actor && e["action"] == action)
}

fn error_of(v: &serde_json::Value) -> String {
    v["error"].as_str().unwrap_or_default().to_owned()
}

/// A minimal RFC 4180 reader (quoted fields, doubled quotes, CRLF).
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let (mut row, mut field, mut quoted) = (Vec::new(), String::new(), false);
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match (quoted, c) {
            (true, '"') if chars.peek() == Some(&'"') => {
                chars.next();
                field.push('"');
            }
            (true, '"') => quoted = false,
            (true, c) => field.push(c),
            (false, '"') if field.is_empty() => quoted = true,
            (false, ',') => row.push(std::mem::take(&mut field)),
            (false, '\r') => {}
            (false, '\n') => {
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            (false, c) => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quoted field");
    if !field.is_empty() || !row.is_empty() {
        row.push(field);
        rows.push(row);
    }
    rows
}

#[test]
fn roles_tokens_and_the_audit_log_on_a_real_allocator() {
    let dir = TempDir::new("access");
    let mut alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    let k = device_key(7);
    let (st, v) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "d1", "public_key": hex::encode(k.public_key()), "tier": "basic"})),
    );
    assert_eq!(st, 200, "{v}");

    // Tokens: one made with shardctl, one through the API.
    let out = alloc.shardctl(&["operators", "create", "--name", "vera", "--role", "viewer"]);
    assert!(out.status.success(), "{out:?}");
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (vera_id, vera) = (
        made["id"].as_str().unwrap().to_owned(),
        made["token"].as_str().unwrap().to_owned(),
    );
    assert!(vera.starts_with(&format!("slo_{vera_id}_")));
    let (olga_id, olga) = create(&alloc, "olga", "operator", None);

    // Authentication first: no token, a wrong one, or a forged id ⇒ 401,
    // whatever the route.
    for token in [
        None,
        Some("nope"),
        Some(&*format!("slo_{olga_id}_{}", "00".repeat(32))),
    ] {
        let (st, _) = call(&alloc, token, "POST", "/v1/devices/d1/pin", None);
        assert_eq!(st, 401, "{token:?}");
        let (st, _) = call(&alloc, token, "GET", "/v1/no/such/route", None);
        assert_eq!(st, 401, "{token:?}");
    }

    // A viewer reads but does not act.
    let (st, v) = call(&alloc, Some(&vera), "GET", "/v1/devices/d1", None);
    assert_eq!(st, 200, "{v}");
    let (st, v) = call(
        &alloc,
        Some(&vera),
        "POST",
        "/v1/devices/d1/pin",
        Some(serde_json::json!({"shard": "vpn-tunnel"})),
    );
    assert_eq!(st, 403, "{v}");
    assert!(error_of(&v).contains("needs the operator role"), "{v}");

    // An operator acts on devices but makes no tokens.
    let (st, v) = call(
        &alloc,
        Some(&olga),
        "POST",
        "/v1/devices/d1/pin",
        Some(serde_json::json!({"shard": "vpn-tunnel"})),
    );
    assert_eq!(st, 200, "{v}");
    for (path, body) in [
        ("/v1/tokens", serde_json::json!({"tier": "basic"})),
        (
            "/v1/operators/tokens",
            serde_json::json!({"name": "x", "role": "admin"}),
        ),
    ] {
        let (st, v) = call(&alloc, Some(&olga), "POST", path, Some(body));
        assert_eq!(st, 403, "{path}: {v}");
        assert!(error_of(&v).contains("needs the admin role"), "{v}");
    }
    // A bad request is refused (400) and audited with what was asked.
    let (st, v) = alloc.api(
        "POST",
        "/v1/operators/tokens",
        Some(serde_json::json!({"name": "mallory", "role": "root"})),
    );
    assert_eq!(st, 400, "{v}");
    // A refusal by the handler (unknown device) is audited too.
    let (st, _) = call(&alloc, Some(&olga), "POST", "/v1/devices/ghost/drain", None);
    assert_eq!(st, 404);

    // A configuration change is audited with key names, never a secret value.
    let (st, v) = call(
        &alloc,
        Some(&olga),
        "PUT",
        "/v1/devices/d1/config/auth-psk",
        Some(serde_json::json!({"secret": {"psk": "topsecretvalue-7f3a"}})),
    );
    assert_eq!(st, 200, "{v}");

    // shardctl with an operator token, from the environment.
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--api", &alloc.api_url(), "--token-file", "/nonexistent"])
        .args(["unpin", "d1", "vpn-tunnel"])
        .env("SHARDLINE_TOKEN", &olga)
        .env_remove("SHARDCTL_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let vera_file = dir.0.join("vera-token");
    std::fs::write(&vera_file, format!("{vera}\n")).unwrap();
    std::fs::set_permissions(&vera_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--api", &alloc.api_url(), "--token-file"])
        .arg(&vera_file)
        .args(["devices"])
        .env_remove("SHARDCTL_TOKEN")
        .env_remove("SHARDLINE_TOKEN")
        .output()
        .unwrap();
    assert!(out.status.success(), "a viewer token from a file: {out:?}");
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args(["--api", &alloc.api_url(), "--token", &vera, "drain", "d1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("(403)"),
        "{out:?}"
    );

    // The audit log: who did what, ok and refused.
    let entries = audit(&alloc, "");
    let pin_ok = find(&entries, "olga", "pin").expect("olga's pin is audited");
    assert_eq!(
        (
            &pin_ok["outcome"],
            &pin_ok["target"],
            &pin_ok["role"],
            &pin_ok["token_id"]
        ),
        (
            &serde_json::json!("ok"),
            &serde_json::json!("d1"),
            &serde_json::json!("operator"),
            &serde_json::json!(olga_id)
        )
    );
    assert_eq!(pin_ok["detail"], "shard=vpn-tunnel");
    let pin_refused = find(&entries, "vera", "pin").expect("vera's refused pin");
    assert_eq!(pin_refused["outcome"], "refused");
    assert_eq!(pin_refused["status"], 403);
    let drain_refused = find(&entries, "vera", "drain").expect("vera's refused drain");
    assert_eq!(drain_refused["outcome"], "refused");
    let refused = find(&entries, "olga", "enrolment token create").expect("refused");
    assert_eq!(
        (refused["outcome"].as_str(), refused["status"].as_u64()),
        (Some("refused"), Some(403))
    );
    let bad = entries
        .iter()
        .find(|e| e["status"] == 400)
        .expect("the 400 is audited");
    assert_eq!(
        (
            bad["actor"].as_str(),
            bad["action"].as_str(),
            bad["outcome"].as_str()
        ),
        (
            Some("token-file"),
            Some("operator token create"),
            Some("refused")
        )
    );
    assert!(
        bad["detail"].as_str().unwrap().contains("role=root"),
        "{bad}"
    );
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("viewer, operator or admin"),
        "{bad}"
    );
    let ghost = find(&entries, "olga", "drain").expect("the 404 is audited");
    assert_eq!(
        (ghost["status"].as_u64(), ghost["target"].as_str()),
        (Some(404), Some("ghost"))
    );
    assert!(
        ghost["message"].as_str().unwrap().contains("ghost"),
        "{ghost}"
    );
    assert!(
        find(&entries, "olga", "unpin").is_some(),
        "shardctl's unpin"
    );
    let config = find(&entries, "olga", "device config").expect("the config change");
    assert!(
        config["detail"].as_str().unwrap().contains("psk"),
        "{config}"
    );
    assert!(!entries
        .iter()
        .any(|e| e.to_string().contains("topsecretvalue")));
    let enrol = find(&entries, "token-file", "enrol").expect("the enrolment");
    assert_eq!(
        (enrol["target"].as_str(), enrol["role"].as_str()),
        (Some("d1"), Some("admin"))
    );
    let made = entries
        .iter()
        .find(|e| e["action"] == "operator token create" && e["target"] == olga_id)
        .expect("olga's token creation");
    assert_eq!(
        (made["actor"].as_str(), made["outcome"].as_str()),
        (Some("token-file"), Some("ok"))
    );
    assert!(made["detail"].as_str().unwrap().contains("role=operator"));
    // Newest first, and filters.
    let at: Vec<u64> = entries
        .iter()
        .map(|e| e["at_ms"].as_u64().unwrap())
        .collect();
    assert!(at.windows(2).all(|w| w[0] >= w[1]), "{at:?}");
    let only_vera = audit(&alloc, "?actor=vera");
    assert_eq!(only_vera.len(), 2, "{only_vera:?}");
    assert!(audit(&alloc, "?target=d1&limit=2").len() == 2);
    // Reads are not audited.
    assert!(entries.iter().all(|e| e["action"] != "get"), "{entries:?}");

    // The journal has them, under the target `audit`.
    let log = alloc.log();
    assert!(
        log.lines()
            .any(|l| l.contains("audit") && l.contains("actor=olga") && l.contains("pin")),
        "{log}"
    );

    // Revocation takes effect at once.
    let out = alloc.shardctl(&["operators", "revoke", &olga_id]);
    assert!(out.status.success(), "{out:?}");
    let (st, v) = call(&alloc, Some(&olga), "GET", "/v1/devices", None);
    assert_eq!(st, 401);
    assert!(error_of(&v).contains("revoked"), "{v}");

    // Expiry.
    let (_, brief) = create(&alloc, "brief", "viewer", Some(1));
    let (st, _) = call(&alloc, Some(&brief), "GET", "/v1/devices", None);
    assert_eq!(st, 200);
    std::thread::sleep(Duration::from_millis(1100));
    let (st, v) = call(&alloc, Some(&brief), "GET", "/v1/devices", None);
    assert_eq!(st, 401);
    assert!(error_of(&v).contains("expired"), "{v}");

    // The listing names tokens and their state, never a secret.
    let (st, v) = alloc.api("GET", "/v1/operators/tokens", None);
    assert_eq!(st, 200);
    let text = v.to_string();
    for secret in [&vera, &olga, &brief] {
        let hex = secret.rsplit('_').next().unwrap();
        assert!(!text.contains(hex), "listing leaks a secret: {text}");
    }
    let olga_row = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == olga_id)
        .unwrap();
    assert_eq!(olga_row["revoked"], true);
    let out = alloc.shardctl(&["operators", "list"]);
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.contains("olga") && l.contains("revoked")),
        "{listing}"
    );

    // CSV export parses, one row per entry.
    let out = alloc.shardctl(&["audit", "--limit", "1000", "--format", "csv"]);
    assert!(out.status.success(), "{out:?}");
    let rows = parse_csv(&String::from_utf8(out.stdout).unwrap());
    assert_eq!(
        rows[0].join(","),
        shardline_allocator::service::audit::CSV_HEADER
    );
    assert_eq!(rows.len() - 1, audit(&alloc, "?limit=1000").len());
    assert!(rows.iter().skip(1).all(|r| r.len() == 11), "{rows:?}");
    assert!(rows
        .iter()
        .any(|r| r[2] == "olga" && r[5] == "pin" && r[8] == "ok"));
    let out = alloc.shardctl(&["audit", "--device", "d1", "--format", "jsonl"]);
    let jsonl = String::from_utf8(out.stdout).unwrap();
    assert!(jsonl.lines().count() >= 3);
    for line in jsonl.lines() {
        let e: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(e["target"], "d1");
    }

    // kill -9 and start again: the log and the tokens are on disk.
    let before = audit(&alloc, "?limit=1000");
    alloc.kill9();
    alloc.spawn();
    let after = audit(&alloc, "?limit=1000");
    assert_eq!(
        after[after.len() - before.len()..],
        before[..],
        "every entry survived"
    );
    let (st, _) = call(&alloc, Some(&vera), "GET", "/v1/devices", None);
    assert_eq!(st, 200, "a token outlives a restart");
    let (st, _) = call(&alloc, Some(&olga), "GET", "/v1/devices", None);
    assert_eq!(st, 401, "and so does its revocation");
    alloc.kill9();

    // No secret in the store file or the log, in hex or raw.
    let store = std::fs::read(dir.0.join("allocator.redb")).unwrap();
    let log = alloc.log();
    for token in [&vera, &olga, &brief] {
        let hex_secret = token.rsplit('_').next().unwrap();
        let raw = hex::decode(hex_secret).unwrap();
        assert!(
            !store.windows(raw.len()).any(|w| w == raw.as_slice()),
            "raw secret in the store"
        );
        assert!(
            !store
                .windows(hex_secret.len())
                .any(|w| w == hex_secret.as_bytes()),
            "hex secret in the store"
        );
        assert!(!log.contains(hex_secret), "secret in the log");
    }
    assert!(
        !log.contains("topsecretvalue"),
        "a config secret in the log"
    );
}

#[test]
fn a_revocation_on_one_instance_holds_on_another_sharing_postgres() {
    let dir = TempDir::new("access-pg");
    if !xtask::kit::postgres::installed() {
        println!("SKIP: PostgreSQL is not installed (`cargo xtask setup` as root installs it)");
        return;
    }
    let pg = xtask::kit::postgres::TestPostgres::start(&dir.0.join("pg"))
        .unwrap_or_else(|e| panic!("PostgreSQL is installed but did not start: {e}"));
    let a =
        Allocator::start_on_shared_store(&dir.0.join("a"), BrokerMode::Embedded, &pg.url(), None);
    let b = Allocator::start_on_shared_store(
        &dir.0.join("b"),
        BrokerMode::Embedded,
        &pg.url(),
        Some(&a),
    );
    // Made on A, known to B at its first use.
    let (id, token) = create(&a, "pat", "operator", None);
    let (st, v) = call(&b, Some(&token), "GET", "/v1/devices", None);
    assert_eq!(st, 200, "{v}");
    let (st, _) = call(&b, Some(&token), "POST", "/v1/devices/nobody/drain", None);
    assert_eq!(st, 404);
    // One audit log for both.
    let on_a = audit(&a, "?actor=pat");
    assert_eq!(on_a.len(), 1, "{on_a:?}");
    assert_eq!(on_a[0]["action"], "drain");

    // Revoked on A: refused on B within the shared cache's lifetime.
    let (st, _) = a.api("DELETE", &format!("/v1/operators/tokens/{id}"), None);
    assert_eq!(st, 200);
    let revoked_at = Instant::now();
    loop {
        let (st, _) = call(&b, Some(&token), "GET", "/v1/devices", None);
        if st == 401 {
            break;
        }
        assert_eq!(st, 200);
        assert!(
            revoked_at.elapsed()
                < Duration::from_millis(
                    shardline_allocator::service::access::SHARED_CACHE_MS + 500
                ),
            "B still accepts a token A revoked"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // The rows hold no secret, raw or in hex.
    let secret_hex = token.rsplit('_').next().unwrap().to_owned();
    let raw = hex::decode(&secret_hex).unwrap();
    let mut client = postgres::Client::connect(&pg.url(), postgres::NoTls).unwrap();
    let rows = client
        .query(
            "SELECT id::text, body FROM operator_tokens \
             UNION ALL SELECT actor || ' ' || target, body FROM audit",
            &[],
        )
        .unwrap();
    assert!(rows.len() >= 2);
    for row in rows {
        let (text, body): (String, Vec<u8>) = (row.get(0), row.get(1));
        assert!(!text.contains(&secret_hex));
        assert!(!body.windows(raw.len()).any(|w| w == raw.as_slice()));
        assert!(!body
            .windows(secret_hex.len())
            .any(|w| w == secret_hex.as_bytes()));
    }
}

#[test]
fn the_audit_log_keeps_within_its_bound() {
    let dir = TempDir::new("audit-bound");
    let alloc = Allocator::start(
        &dir.0,
        BrokerMode::Embedded,
        "[audit]\nmax_entries = 5\nretention_days = 30\n",
    );
    for i in 0..12 {
        let (st, _) = alloc.api("POST", &format!("/v1/devices/ghost-{i}/drain"), None);
        assert_eq!(st, 404);
    }
    let entries = audit(&alloc, "?limit=100");
    let targets: Vec<&str> = entries
        .iter()
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert_eq!(
        targets,
        ["ghost-11", "ghost-10", "ghost-9", "ghost-8", "ghost-7"]
    );
}

fn write_pem(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// A CA and a server certificate for 127.0.0.1 it signed; (ca, cert, key).
fn make_pki(dir: &Path, tag: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, format!("shardline test CA {tag}"));
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let sp = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let cert = sp.signed_by(&key, &ca_cert, &ca_key).unwrap();
    let paths = (
        dir.join(format!("{tag}-ca.pem")),
        dir.join(format!("{tag}-cert.pem")),
        dir.join(format!("{tag}-key.pem")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    write_pem(&paths.2, &key.serialize_pem());
    paths
}

/// The allocator process started with its own configuration.
struct Child9(Child);

fn start_with_config(dir: &Path, conf: &Path, log: &str) -> Child9 {
    let log = std::fs::File::create(dir.join(log)).unwrap();
    Child9(
        Command::new(env!("CARGO_BIN_EXE_shardline-allocator"))
            .args(["run", "--config"])
            .arg(conf)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

fn wait_healthy(
    child: &mut Child9,
    log: &Path,
    mut health: impl FnMut() -> Result<http::HttpResponse, http::HttpError>,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if matches!(health(), Ok(r) if r.status == 200) {
            return;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!(
                "allocator exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "the API did not come up");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_plain_api_beyond_loopback_is_warned_about() {
    let dir = TempDir::new("api-open");
    let mut alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    alloc.kill9();
    let conf = dir.0.join("allocator-open.toml");
    let text = alloc.config_text().replacen(
        &format!("listen = \"127.0.0.1:{}\"", alloc.api_port),
        &format!("listen = \"0.0.0.0:{}\"", alloc.api_port),
        1,
    );
    assert!(text.contains("0.0.0.0"));
    std::fs::write(&conf, text).unwrap();
    let mut child = start_with_config(&dir.0, &conf, "open.log");
    let url = alloc.api_url();
    wait_healthy(&mut child, &dir.0.join("open.log"), || {
        http::request(&url, "GET", "/v1/health", None, None)
    });
    let log = std::fs::read_to_string(dir.0.join("open.log")).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("beyond loopback without TLS")),
        "{log}"
    );
    // The loopback default says nothing of the kind.
    assert!(!alloc.log().contains("without TLS"), "{}", alloc.log());
}

impl Drop for Child9 {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_api_speaks_tls_and_shardctl_checks_the_certificate() {
    let dir = TempDir::new("api-tls");
    let (ca, cert, key) = make_pki(&dir.0, "good");
    let (other_ca, _, _) = make_pki(&dir.0, "other");
    // Made plain first (keys, token file, config), then restarted on TLS.
    let mut alloc = Allocator::start(&dir.0, BrokerMode::Embedded, "");
    alloc.kill9();
    let conf = dir.0.join("allocator-tls.toml");
    let text = alloc.config_text().replacen(
        "[api]\n",
        &format!(
            "[api]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n",
            cert.display(),
            key.display()
        ),
        1,
    );
    std::fs::write(&conf, &text).unwrap();
    // check-config loads the certificate and key as the service would.
    let check = |conf: &Path| {
        Command::new(env!("CARGO_BIN_EXE_shardline-allocator"))
            .args(["check-config", "--config"])
            .arg(conf)
            .output()
            .unwrap()
    };
    let out = check(&conf);
    assert!(out.status.success(), "{out:?}");
    let bad = dir.0.join("allocator-bad-tls.toml");
    std::fs::write(
        &bad,
        text.replace(&key.display().to_string(), &cert.display().to_string()),
    )
    .unwrap();
    let out = check(&bad);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("api.tls_cert/api.tls_key"), "{err}");
    let mut child = start_with_config(&dir.0, &conf, "tls.log");
    let https = format!("https://127.0.0.1:{}", alloc.api_port);
    wait_healthy(&mut child, &dir.0.join("tls.log"), || {
        http::request_with_ca(&https, Some(&ca), "GET", "/v1/health", None, None)
    });

    let shardctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_shardctl"))
            .args(["--api", &https, "--token", &alloc.token])
            .args(args)
            .env_remove("SHARDCTL_CA")
            .output()
            .unwrap()
    };
    let ca_arg = ca.display().to_string();
    let out = shardctl(&[
        "--ca",
        &ca_arg,
        "operators",
        "create",
        "--name",
        "tls-op",
        "--role",
        "operator",
        "--ttl",
        "1h",
    ]);
    assert!(out.status.success(), "{out:?}");
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let op_token = made["token"].as_str().unwrap().to_owned();
    let out = Command::new(env!("CARGO_BIN_EXE_shardctl"))
        .args([
            "--api", &https, "--ca", &ca_arg, "--token", &op_token, "devices",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "an operator token over HTTPS: {out:?}"
    );

    // A certificate from another CA is refused, saying so.
    let out = shardctl(&["--ca", &other_ca.display().to_string(), "devices"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not trusted"), "{err}");
    // https:// without a CA says what is missing.
    let out = shardctl(&["devices"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ca"));
    // Plain HTTP to the TLS listener gets no answer.
    let plain = http::request(&alloc.api_url(), "GET", "/v1/health", None, None);
    assert!(!matches!(plain, Ok(ref r) if r.status == 200), "{plain:?}");
    // The audit log saw the creation over HTTPS.
    let r = http::request_with_ca(
        &https,
        Some(&ca),
        "GET",
        "/v1/audit?actor=token-file",
        Some(&alloc.token),
        None,
    )
    .unwrap();
    assert!(r.body.contains("operator token create"), "{}", r.body);
}
