//! `CheckKey` (a device key decompressed once, kept by the allocator's
//! verifier threads) must accept and refuse exactly what `signature_check`
//! with the raw key does, with the same errors.

use shardline_shared::sign::{
    self, parse_envelope, signature_check, verify_checks, CheckKey, Domain, KeyPair,
};

fn sealed(key: &KeyPair, domain: Domain, text: &str) -> Vec<u8> {
    sign::seal(domain, &text.to_owned(), &[key])
}

fn both(public: [u8; 32], bytes: &[u8], domain: Domain) -> (String, String) {
    let env = parse_envelope(bytes, 1 << 20).unwrap();
    let key = CheckKey::new(public);
    let show = |r: Result<sign::SignatureCheck, sign::OpenError>| match r {
        Ok(c) => format!("{:?}", verify_checks(&[c])),
        Err(e) => format!("refused {e:?}"),
    };
    (
        show(signature_check(&env, domain, key.key_id(), &public)),
        show(key.check(&env, domain)),
    )
}

#[test]
fn check_key_agrees_with_signature_check() {
    let dev = KeyPair::from_seed(&[3; 32]);
    let other = KeyPair::from_seed(&[4; 32]);
    let good = sealed(&dev, Domain::Report, "r");
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    let cases: Vec<(&str, [u8; 32], Vec<u8>, Domain)> = vec![
        ("good", dev.public_key(), good.clone(), Domain::Report),
        ("wrong domain", dev.public_key(), good.clone(), Domain::Ack),
        (
            "other signer",
            dev.public_key(),
            sealed(&other, Domain::Report, "r"),
            Domain::Report,
        ),
        ("flipped bit", dev.public_key(), flipped, Domain::Report),
        (
            "two signers",
            dev.public_key(),
            sign::seal(Domain::Report, &"r".to_owned(), &[&dev, &other]),
            Domain::Report,
        ),
        // The identity point: a small-order (weak) key.
        (
            "weak key",
            {
                let mut k = [0u8; 32];
                k[0] = 1;
                k
            },
            good.clone(),
            Domain::Report,
        ),
        ("not a point", [0xff; 32], good, Domain::Report),
    ];
    for (name, public, bytes, domain) in cases {
        let (raw, prepared) = both(public, &bytes, domain);
        assert_eq!(raw, prepared, "{name}");
        if name == "good" {
            assert_eq!(prepared, "[Ok(())]");
        } else {
            assert_ne!(prepared, "[Ok(())]", "{name} must be refused");
        }
    }
}
