//! The cell's HSM layer against SoftHSM made to behave like the HSMs factories buy, one quirk
//! at a time (the test-only `hsm-quirks` module): each quirk is either handled, or refused with
//! a message that names it — never a failure that a start-up check could have found first.

use hsm::testkit::TestToken;
use hsm::{AesKeySize, Curve, Error, KeyRole, WrapAlg};

fn token(prefix: &str, quirks: &str, pool: usize) -> (TestToken, hsm::Hsm) {
    let t = TestToken::with_quirks(prefix, quirks).expect("a token behind the quirks module");
    let h = t.open(pool).expect("open it");
    (t, h)
}

/// A YubiHSM 2 allows 16 sessions: a pool configured for 64 is cut to 15 and the anchor, and
/// many signers still share it. (Before: opening the 17th session failed with
/// CKR_SESSION_COUNT and the cell did not start.)
#[test]
fn a_token_of_sixteen_sessions_gets_a_pool_that_fits() {
    let (_t, hsm) = token("q-sessions", "sessions=16", 64);
    assert_eq!(hsm.session_limit(), Some(16));
    assert_eq!(hsm.pool_size(), 15);
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::StationIdentity, Curve::P256, None))
        .unwrap();
    std::thread::scope(|scope| {
        for t in 0..20 {
            let (hsm, key) = (hsm.clone(), pair.private.clone());
            scope.spawn(move || {
                for i in 0..5 {
                    let msg = format!("{t}/{i}");
                    hsm.with_session(|s| s.sign(&key, msg.as_bytes())).unwrap();
                }
            });
        }
    });
}

/// PKCS#11 3.0 numbering: RFC 5649 only as 0x210B. The known-answer probe finds it there and
/// meter KEKs are wrapped with it.
#[test]
fn rfc_5649_only_at_0x210b_is_found_and_used() {
    let (_t, hsm) = token("q-kwp", "kwp-at-210b", 1);
    assert_eq!(
        hsm.mechanisms().kwp.map(|t| *t),
        Some(0x210B),
        "{}",
        hsm.mechanisms().chosen()
    );
    let w = hsm
        .with_session(|s| {
            let tk = s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/Q-KWP"),
            )?;
            let kek = s.generate_aes_key(KeyRole::MeterKek, AesKeySize::Aes256, None)?;
            s.wrap(&tk, &kek, WrapAlg::AesKwPad)
        })
        .unwrap();
    assert_eq!(w.len(), 40);
}

/// No CKA_CHECK_VALUE: the probe notices, and a meter key's check value is computed in the
/// token with the ECB encryption its policy then allows.
#[test]
fn a_token_without_check_values_still_gives_every_meter_key_one() {
    let (_t, hsm) = token("q-kcv", "no-check-value", 1);
    assert!(
        !hsm.mechanisms().check_value,
        "{}",
        hsm.mechanisms().chosen()
    );
    let kcv = hsm
        .with_session(|s| {
            let k = s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None)?;
            s.kcv(&k)
        })
        .unwrap();
    assert_ne!(kcv, [0; 3]);
}

/// A network HSM under load answers CKR_DEVICE_ERROR now and then: certificate signatures are
/// retried like every other signature. (Before: "Remote key error" and a failed meter.)
#[test]
fn certificates_are_signed_through_transient_device_errors() {
    let (_t, hsm) = token("q-deverr", "device-error-every=2", 2);
    let dir = tempfile::tempdir().unwrap();
    hsm::pki::init_dev(&hsm, dir.path()).unwrap();
    let ca = hsm
        .with_session(|s| hsm::cert::Issuer::load(s, "device-ca"))
        .unwrap();
    let key = crate::util::SoftKey::new(Curve::P256, "q-deverr");
    let csr = crate::util::meter_csr(&key);
    let profile = hsm::cert::MeterProfile {
        system_title: [0x4d, 0x4d, 0x4d, 0x00, 0x00, 0x00, 0x00, 0x01],
        meter_serial: "MMM-00000001".into(),
        manufacturer: "Demo Meter Works".into(),
        usage: hsm::cert::MeterKeyUsage::DigitalSignature,
        curve: Curve::P256,
        not_after: None,
    };
    for _ in 0..6 {
        hsm.with_session(|s| hsm::cert::issue_meter_certificate(s, &ca, &csr, &profile))
            .unwrap();
    }
}

/// A token that makes unwrapped keys readable whatever the template asked: the read-back after
/// the unwrap catches it and the key is gone again. (Before: a readable key, unnoticed.)
#[test]
fn a_token_that_ignores_sensitive_on_unwrap_is_caught_and_the_key_destroyed() {
    let t = TestToken::with_quirks("q-sens", "ignore-sensitive-on-unwrap").unwrap();
    let mut config = t.config(1);
    config.trusted_wrap = false;
    let hsm = hsm::Hsm::open(&config).unwrap();
    let hash = hsm.mechanisms().rsa_oaep.unwrap();
    let before = hsm.with_session(|s| s.list_objects()).unwrap().len();
    let e = hsm
        .with_session(|s| {
            let pair = s.generate_rsa_keypair(2048, "utility-transport")?;
            let tk = s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/Q-SENS"),
            )?;
            let wrapped = s.wrap(&pair.public, &tk, WrapAlg::RsaOaepWith(hash))?;
            s.unwrap_aes(
                &pair.private,
                &wrapped,
                WrapAlg::RsaOaepWith(hash),
                KeyRole::UtilityBatchTransport,
                AesKeySize::Aes256,
                None,
            )
        })
        .unwrap_err();
    assert!(
        matches!(&e, Error::PolicyNotKept { operation: "unwrap", details } if details.contains("CKA_SENSITIVE is false, the policy says true")),
        "{e}"
    );
    // Only what the test made itself is left: the key pair and the batch key.
    let after = hsm.with_session(|s| s.list_objects()).unwrap().len();
    assert_eq!(after, before + 3);
}

/// No CKM_AES_ECB_ENCRYPT_DATA (CloudHSM, YubiHSM 2): the key-transport key cannot be
/// derived, and the error says which mechanism is missing.
#[test]
fn a_token_without_ecb_encrypt_data_names_it() {
    let (_t, hsm) = token("q-ecb", "no-ecb-encrypt-data", 1);
    assert!(!hsm.mechanisms().aes_ecb_encrypt_data);
    let e = hsm
        .with_session(|s| {
            let (kt, _) = s.generate_kt_keypair()?;
            s.derive_ktk(&kt, &[4; 65], &[0; 32])
        })
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::MechanismMissing {
                mechanism: "CKM_AES_ECB_ENCRYPT_DATA",
                ..
            }
        ),
        "{e}"
    );
}

/// ECDH with the null KDF refused, CKD_SHA256_KDF offered (FIPS-mode Luna): the probe finds
/// that only the X9.63 key transport works here (the mechanism list says both would), the
/// AES-ECB one is refused by name, and the X9.63 key equals the meter's in software.
#[test]
fn a_fips_token_without_the_null_kdf_does_the_x963_key_transport() {
    let (_t, hsm) = token("q-kdf", "no-null-kdf,x963-kdf", 1);
    let m = hsm.mechanisms();
    assert!(m.ecdh && m.aes_ecb_encrypt_data, "listed: {}", m.chosen());
    assert!(!m.ktk_aes_ecb && m.ktk_x963, "{}", m.chosen());
    let (kt, _) = hsm.with_session(|s| s.generate_kt_keypair()).unwrap();
    let (_, point) = crate::util::meter_point(7);
    let e = hsm
        .with_session(|s| s.derive_ktk(&kt, &point, &[0; 32]))
        .unwrap_err();
    assert!(
        matches!(
            e,
            Error::MechanismMissing {
                mechanism: "CKM_ECDH1_DERIVE with the null KDF",
                ..
            }
        ),
        "{e}"
    );
    crate::ops::x963_ktk_agrees_with_software(&hsm);
}

/// The null KDF refused and no other: no key transport at all, and the probe says so.
#[test]
fn a_token_with_no_usable_key_transport_is_found_out_by_the_probe() {
    let (_t, hsm) = token("q-none", "no-null-kdf", 1);
    let m = hsm.mechanisms();
    assert!(!m.ktk_aes_ecb && !m.ktk_x963, "{}", m.chosen());
    assert!(m.chosen().contains("ktk: unavailable"), "{}", m.chosen());
}

/// A token that keeps no session objects (YubiHSM 2): refused when it opens, by name, before
/// anything is made on it — not at the first meter.
#[test]
fn a_token_without_session_objects_is_refused_when_it_opens() {
    let t = TestToken::with_quirks("q-nosess", "no-session-objects").unwrap();
    let e = t.open(1).expect_err("the token is refused");
    assert!(matches!(e, Error::TokenUnfit { .. }), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("it keeps no session objects") && text.contains("CKR_TEMPLATE_INCONSISTENT"),
        "{text}"
    );
}

/// A token that ignores CKA_ALLOWED_MECHANISMS when it makes a key pair: what it reports back
/// no longer restricts the key, and the comparison with the policy says so.
#[test]
fn a_token_that_drops_allowed_mechanisms_is_caught_by_the_read_back() {
    let (_t, hsm) = token("q-mechs", "drop-allowed-mechanisms", 1);
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P256, None))
        .unwrap();
    let flags = hsm.with_session(|s| s.key_flags(&pair.private)).unwrap();
    let wrong = hsm::policy::policy(KeyRole::ManifestSigner)
        .key
        .mismatches(&flags);
    assert!(
        wrong
            .iter()
            .any(|w| w.starts_with("CKA_ALLOWED_MECHANISMS")),
        "{wrong:?} ({flags:?})"
    );
    // Where it is kept (plain SoftHSM), nothing is said.
    let (_u, plain) = crate::util::token("q-mechs-ok", 1);
    let pair = plain
        .with_session(|s| s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P256, None))
        .unwrap();
    let flags = plain.with_session(|s| s.key_flags(&pair.private)).unwrap();
    assert_eq!(
        hsm::policy::policy(KeyRole::ManifestSigner)
            .key
            .mismatches(&flags),
        Vec::<String>::new(),
        "{flags:?}"
    );
}
