//! MQTT over TLS (rustls, ring): the embedded broker's TLS listener requiring
//! device client certificates, and the allocator as an mqtts:// client of a
//! real mosquitto that requires client certificates. The CA, server and
//! client certificates are generated here (rcgen); no key is committed.

mod service_common;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use service_common::*;
use shardline_allocator::service::tls;
use shardline_shared::msg::AckOutcome;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

fn write_key(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

fn make_pki(dir: &Path) -> Pki {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "shardline test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp =
        CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "broker");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

    let client_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "tls-dev");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client = cp.signed_by(&client_key, &ca_cert, &ca_key).unwrap();

    let pki = Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&pki.ca, ca_cert.pem()).unwrap();
    std::fs::write(&pki.server_cert, server.pem()).unwrap();
    write_key(&pki.server_key, &server_key.serialize_pem());
    std::fs::write(&pki.client_cert, client.pem()).unwrap();
    write_key(&pki.client_key, &client_key.serialize_pem());
    pki
}

/// Connects a TLS client; returns the client once CONNACK arrived, or the error.
async fn tls_connect(
    id: &str,
    port: u16,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> Result<(AsyncClient, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>), String> {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(config)));
    opts.set_keep_alive(Duration::from_secs(5));
    let (client, mut ev) = AsyncClient::new(opts, 100);
    let first = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
                Ok(_) => {}
                Err(e) => return Err(e.to_string()),
            }
        }
    })
    .await
    .map_err(|_| "timed out".to_owned())?;
    first?;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let _ = tx.send(p.payload.to_vec());
                }
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    Ok((client, rx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_tls_listener_requires_device_certificates() {
    let dir = TempDir::new("tls-embedded");
    let pki = make_pki(&dir.0);
    let tls_port = free_port();
    let extra = format!(
        "tls_listen = \"127.0.0.1:{tls_port}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"\n",
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    );
    let alloc = Allocator::start(&dir.0, BrokerMode::Embedded, &extra);
    let key = device_key(5);
    let (st, _) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "tls-dev", "public_key": hex::encode(key.public_key()), "tier": "standard"})),
    );
    assert_eq!(st, 200);

    // Without a client certificate: refused during the handshake.
    let anon = tls::client_config(&pki.ca, None).unwrap();
    assert!(
        tls_connect("anon", tls_port, anon).await.is_err(),
        "a device without a certificate got in"
    );

    // With one: report in, signed instruction out, over TLS.
    let cfg = tls::client_config(&pki.ca, Some((&pki.client_cert, &pki.client_key))).unwrap();
    let (client, mut rx) = tls_connect("tls-dev", tls_port, cfg)
        .await
        .expect("TLS connect with a client certificate");
    let id = shardline_shared::DeviceId::new("tls-dev").unwrap();
    client
        .subscribe(shardline_shared::topics::instr(&id), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let report = report_for(&id, 1, 0);
    client
        .publish(
            shardline_shared::topics::report(&id),
            QoS::AtLeastOnce,
            false,
            shardline_shared::sign::seal(shardline_shared::sign::Domain::Report, &report, &[&key]),
        )
        .await
        .unwrap();
    let bytes = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("an instruction over TLS")
        .unwrap();
    let kid = shardline_shared::KeyId::of_public_key(&alloc.public_key);
    let (instr, _) = shardline_shared::sign::open::<shardline_shared::msg::Instruction>(
        &bytes,
        shardline_shared::sign::Domain::Instruction,
        1 << 20,
        |k| (k == kid).then_some(alloc.public_key),
    )
    .expect("verifies");
    assert_eq!(instr.device, id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allocator_uses_an_external_mosquitto_over_tls_with_a_client_certificate() {
    let dir = TempDir::new("tls-mosquitto");
    let pki = make_pki(&dir.0);
    let Some(plain) = Mosquitto::start(&dir.0) else {
        return;
    };
    drop(plain);
    // mosquitto with a TLS listener that requires client certificates.
    let port = free_port();
    let conf = dir.0.join("mosquitto-tls.conf");
    std::fs::write(
        &conf,
        format!(
            "listener {port} 127.0.0.1\nuser root\nallow_anonymous true\npersistence false\ncafile {}\ncertfile {}\nkeyfile {}\nrequire_certificate true\n",
            pki.ca.display(),
            pki.server_cert.display(),
            pki.server_key.display()
        ),
    )
    .unwrap();
    let mut child = std::process::Command::new("/usr/sbin/mosquitto")
        .arg("-c")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _guard = Kill(&mut child);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "mosquitto TLS did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let extra = format!(
        "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"\n",
        pki.ca.display(),
        pki.client_cert.display(),
        pki.client_key.display()
    );
    let alloc = Allocator::start(
        &dir.0,
        BrokerMode::External(format!("mqtts://127.0.0.1:{port}")),
        &extra,
    );
    let key = device_key(6);
    let (st, _) = alloc.api(
        "POST",
        "/v1/devices",
        Some(serde_json::json!({"device": "tls-dev", "public_key": hex::encode(key.public_key()), "tier": "standard"})),
    );
    assert_eq!(st, 200);
    let cfg = tls::client_config(&pki.ca, Some((&pki.client_cert, &pki.client_key))).unwrap();
    let (client, mut rx) = tls_connect("tls-dev", port, cfg)
        .await
        .expect("device TLS connect");
    let id = shardline_shared::DeviceId::new("tls-dev").unwrap();
    client
        .subscribe(shardline_shared::topics::instr(&id), QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let report = report_for(&id, 1, 0);
    client
        .publish(
            shardline_shared::topics::report(&id),
            QoS::AtLeastOnce,
            false,
            shardline_shared::sign::seal(shardline_shared::sign::Domain::Report, &report, &[&key]),
        )
        .await
        .unwrap();
    let bytes = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .unwrap_or_else(|_| panic!("no instruction via mosquitto TLS; log:\n{}", alloc.log()))
        .unwrap();
    let env = shardline_shared::sign::parse_envelope(&bytes, 1 << 20).unwrap();
    assert_eq!(env.domain, shardline_shared::sign::Domain::Instruction);
    let ack = shardline_shared::msg::InstructionAck {
        device: id.clone(),
        instruction_seq: shardline_shared::codec::decode::<shardline_shared::msg::Instruction>(
            &env.payload,
        )
        .unwrap()
        .seq,
        outcome: AckOutcome::Applied,
        at_ms: now_ms(),
    };
    client
        .publish(
            shardline_shared::topics::ack(&id),
            QoS::AtLeastOnce,
            false,
            shardline_shared::sign::seal(shardline_shared::sign::Domain::Ack, &ack, &[&key]),
        )
        .await
        .unwrap();
    alloc.wait_metric(
        "shardline_instructions_applied_total",
        1.0,
        Duration::from_secs(10),
    );
}
