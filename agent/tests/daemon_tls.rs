//! The MQTT link over TLS (rustls with the ring provider) to a real
//! mosquitto that requires client certificates: with its certificate the
//! agent connects and its signed reports arrive; without one the broker
//! refuses it and nothing arrives. The PKI is generated here (rcgen).

mod daemon_support;

use daemon_support::{free_port, Agent, Broker, Cloud};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

fn write_key(path: &Path, pem: &str) {
    std::fs::write(path, pem).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

/// Writes ca.pem, server.pem/server-key.pem, device.pem/device-key.pem.
fn make_pki(dir: &Path) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "daemon test CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();

    let server_key = KeyPair::generate().unwrap();
    let mut sp =
        CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    sp.distinguished_name.push(DnType::CommonName, "broker");
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let server = sp.signed_by(&server_key, &ca_cert, &ca_key).unwrap();

    let device_key = KeyPair::generate().unwrap();
    let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
    cp.distinguished_name.push(DnType::CommonName, "tls-1");
    cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let device = cp.signed_by(&device_key, &ca_cert, &ca_key).unwrap();

    std::fs::write(dir.join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server.pem()).unwrap();
    write_key(&dir.join("server-key.pem"), &server_key.serialize_pem());
    std::fs::write(dir.join("device.pem"), device.pem()).unwrap();
    write_key(&dir.join("device-key.pem"), &device_key.serialize_pem());
}

#[test]
fn reports_flow_over_mutual_tls_and_a_device_without_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_pki(dir);
    let tls_port = free_port();
    let tls_listener = format!(
        "listener {tls_port} 127.0.0.1\nrequire_certificate true\ncafile {d}/ca.pem\n\
         certfile {d}/server.pem\nkeyfile {d}/server-key.pem\n",
        d = dir.display()
    );
    // The plain listener (first) is the cloud side's; the agent uses TLS.
    let Some(broker) = Broker::start_with(dir, &tls_listener) else {
        return;
    };
    let url = format!("mqtts://localhost:{tls_port}");

    let with_cert = dir.join("with");
    std::fs::create_dir_all(&with_cert).unwrap();
    let mut agent = Agent::new(&with_cert, "tls-1", &url, 100, "");
    let cfg = std::fs::read_to_string(&agent.config).unwrap().replace(
        &format!("url = \"{url}\"\n"),
        &format!(
            "url = \"{url}\"\nca_file = \"{d}/ca.pem\"\ncert_file = \"{d}/device.pem\"\n\
             key_file = \"{d}/device-key.pem\"\n",
            d = dir.display()
        ),
    );
    std::fs::write(&agent.config, cfg).unwrap();
    let cloud = Cloud::connect(broker.port, &agent.device);
    agent.start(&[]);
    let report = agent.open_report(
        &cloud
            .recv_kind("/report", Duration::from_secs(10))
            .expect("a report over TLS"),
    );
    assert_eq!(report.device.as_str(), "tls-1");
    agent.sigterm();

    // Same broker, no client certificate: the handshake is refused.
    let without = dir.join("without");
    std::fs::create_dir_all(&without).unwrap();
    let mut bare = Agent::new(&without, "tls-2", &url, 100, "");
    let cfg = std::fs::read_to_string(&bare.config).unwrap().replace(
        &format!("url = \"{url}\"\n"),
        &format!("url = \"{url}\"\nca_file = \"{}/ca.pem\"\n", dir.display()),
    );
    std::fs::write(&bare.config, cfg).unwrap();
    let cloud2 = Cloud::connect(broker.port, &bare.device);
    bare.start(&[("SHARDLINE_LOG", "debug")]);
    assert!(
        cloud2
            .recv_kind("/report", Duration::from_secs(3))
            .is_none(),
        "a device without a client certificate got through"
    );
    let status = std::fs::read_to_string(without.join("state/status.json")).unwrap();
    assert!(status.contains("\"connected\":false"), "{status}");
    bare.sigterm();
}
