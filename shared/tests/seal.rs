//! Secret configuration sealed to a device: only that device opens it, only
//! for the shard it was sealed for, and any change to the box is refused.

use crypto_box::aead::OsRng;
use shardline_shared::seal::{open_config, seal_config, SealError, MAX_SEALED_CONFIG};
use shardline_shared::sign::KeyPair;
use shardline_shared::{DeviceId, ShardRef};

fn dev(name: &str) -> DeviceId {
    DeviceId::new(name).unwrap()
}

fn psk_shard() -> ShardRef {
    ShardRef::new("auth-psk", "0.1.0").unwrap()
}

#[test]
fn the_device_opens_what_was_sealed_to_it() {
    let key = KeyPair::from_seed(&[7; 32]);
    let secret = b"psk = 00112233445566778899aabbccddeeff\n";
    let sealed = seal_config(
        &mut OsRng,
        &key.public_key(),
        &dev("gw-1"),
        &psk_shard(),
        secret,
    )
    .unwrap();
    assert!(
        !sealed.windows(8).any(|w| w == b"00112233"),
        "the secret must not appear in clear in the box"
    );
    let opened = open_config(&key, &dev("gw-1"), &psk_shard(), &sealed).unwrap();
    assert_eq!(opened, secret);
}

#[test]
fn two_seals_of_one_secret_differ() {
    let key = KeyPair::from_seed(&[7; 32]);
    let a = seal_config(
        &mut OsRng,
        &key.public_key(),
        &dev("gw-1"),
        &psk_shard(),
        b"psk=1",
    )
    .unwrap();
    let b = seal_config(
        &mut OsRng,
        &key.public_key(),
        &dev("gw-1"),
        &psk_shard(),
        b"psk=1",
    )
    .unwrap();
    assert_ne!(
        a, b,
        "an ephemeral key per box: equal secrets must not be linkable"
    );
}

#[test]
fn another_device_cannot_open_it() {
    let key = KeyPair::from_seed(&[7; 32]);
    let other = KeyPair::from_seed(&[8; 32]);
    let sealed = seal_config(
        &mut OsRng,
        &key.public_key(),
        &dev("gw-1"),
        &psk_shard(),
        b"psk=1",
    )
    .unwrap();
    assert_eq!(
        open_config(&other, &dev("gw-1"), &psk_shard(), &sealed),
        Err(SealError::DoesNotOpen)
    );
}

#[test]
fn a_box_for_another_shard_or_device_is_refused() {
    let key = KeyPair::from_seed(&[7; 32]);
    let sealed = seal_config(
        &mut OsRng,
        &key.public_key(),
        &dev("gw-1"),
        &psk_shard(),
        b"psk=1",
    )
    .unwrap();
    let tunnel = ShardRef::new("vpn-tunnel", "0.1.0").unwrap();
    assert!(matches!(
        open_config(&key, &dev("gw-1"), &tunnel, &sealed),
        Err(SealError::WrongRecipient { .. })
    ));
    assert!(matches!(
        open_config(&key, &dev("gw-2"), &psk_shard(), &sealed),
        Err(SealError::WrongRecipient { .. })
    ));
}

#[test]
fn every_flipped_bit_is_refused() {
    let key = KeyPair::from_seed(&[7; 32]);
    let sealed = seal_config(
        &mut OsRng,
        &key.public_key(),
        &dev("gw-1"),
        &psk_shard(),
        b"psk=1",
    )
    .unwrap();
    for i in 0..sealed.len() {
        let mut bad = sealed.clone();
        bad[i] ^= 0x01;
        assert!(
            open_config(&key, &dev("gw-1"), &psk_shard(), &bad).is_err(),
            "bit flip at byte {i} was accepted"
        );
    }
    assert!(open_config(&key, &dev("gw-1"), &psk_shard(), &[]).is_err());
    assert!(open_config(&key, &dev("gw-1"), &psk_shard(), &sealed[..40]).is_err());
}

#[test]
fn oversize_secrets_and_bad_keys_are_refused() {
    let key = KeyPair::from_seed(&[7; 32]);
    let huge = vec![b'x'; MAX_SEALED_CONFIG];
    assert!(matches!(
        seal_config(
            &mut OsRng,
            &key.public_key(),
            &dev("gw-1"),
            &psk_shard(),
            &huge
        ),
        Err(SealError::Oversize { .. })
    ));
    assert!(matches!(
        open_config(
            &key,
            &dev("gw-1"),
            &psk_shard(),
            &vec![0u8; MAX_SEALED_CONFIG + 1]
        ),
        Err(SealError::Oversize { .. })
    ));
    // The identity point: a small-order key nobody can hold a secret for.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    assert_eq!(
        seal_config(&mut OsRng, &identity, &dev("gw-1"), &psk_shard(), b"psk=1"),
        Err(SealError::BadDeviceKey)
    );
}
