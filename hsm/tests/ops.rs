//! Key generation, signing, wrapping, the key-transport key, the policy, the pool and the PIN.

use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType};
use hsm::testkit::TestToken;
use hsm::{
    AesKeySize, Curve, Error, HsmConfig, KeyKind, KeyRole, PinSource, SecretString, WrapAlg,
};
use line_protocol::crypto;
use line_protocol::msg::WrapAlg as LineWrap;
use p256::elliptic_curve::sec1::ToSec1Point;
use sha2::Digest;

use crate::util::{self, openssl, token, write};

fn verify_sw(curve: Curve, point: &[u8], msg: &[u8], sig: &[u8]) -> bool {
    use signature::Verifier;
    match curve {
        Curve::P256 => p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
            .unwrap()
            .verify(msg, &p256::ecdsa::DerSignature::from_bytes(sig).unwrap())
            .is_ok(),
        Curve::P384 => p384::ecdsa::VerifyingKey::from_sec1_bytes(point)
            .unwrap()
            .verify(msg, &p384::ecdsa::DerSignature::from_bytes(sig).unwrap())
            .is_ok(),
    }
}

#[test]
fn ec_token_and_session_keys_sign_and_openssl_verifies() {
    let (_t, hsm) = token("ec", 2);
    let dir = tempfile::tempdir().unwrap();
    for (curve, md) in [(Curve::P256, "-sha256"), (Curve::P384, "-sha384")] {
        let label = format!("manifest-{}", curve.name());
        let token_pair = hsm
            .with_session(|s| s.generate_ec_keypair(KeyRole::ManifestSigner, curve, Some(&label)))
            .unwrap();
        assert_eq!(token_pair.point.len(), curve.point_len());
        assert_eq!(token_pair.id.len(), 16, "token keys carry a CKA_ID");
        assert_eq!(token_pair.private.label(), Some(label.as_str()));
        assert!(token_pair.private.is_token_object());
        let found = hsm.with_session(|s| s.find_ec_keypair(&label)).unwrap();
        assert_eq!(found.point, token_pair.point);
        assert_eq!(found.id, token_pair.id);
        assert_eq!(found.curve, curve);

        let session_pair = hsm
            .with_session(|s| s.generate_ec_keypair(KeyRole::MeterKeyPair, curve, None))
            .unwrap();
        assert!(!session_pair.private.is_token_object());
        assert!(session_pair.id.is_empty());

        let msg = b"manifest body to be signed";
        let sig = hsm.with_session(|s| s.sign(&found.private, msg)).unwrap();
        assert!(verify_sw(curve, &found.point, msg, &sig));
        assert!(!verify_sw(curve, &found.point, b"another body", &sig));

        let pem = hsm::cert::ec_public_key_pem(curve, &found.point).unwrap();
        let n = curve.name();
        write(dir.path(), &format!("{n}.pub.pem"), pem);
        write(dir.path(), &format!("{n}.msg"), msg);
        write(dir.path(), &format!("{n}.sig"), &sig);
        let (ok, out) = openssl(
            dir.path(),
            &[
                "dgst",
                md,
                "-verify",
                &format!("{n}.pub.pem"),
                "-signature",
                &format!("{n}.sig"),
                &format!("{n}.msg"),
            ],
        );
        assert!(ok && out.contains("Verified OK"), "{out}");
        write(dir.path(), &format!("{n}.msg"), b"tampered");
        let (ok, _) = openssl(
            dir.path(),
            &[
                "dgst",
                md,
                "-verify",
                &format!("{n}.pub.pem"),
                "-signature",
                &format!("{n}.sig"),
                &format!("{n}.msg"),
            ],
        );
        assert!(!ok, "openssl must reject a signature over other data");
    }
    // A label is unique per role: a second key under the same label is refused.
    let again = hsm.with_session(|s| {
        s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P256, Some("manifest-p-256"))
    });
    assert!(matches!(again, Err(Error::RoleExists { .. })), "{again:?}");
}

#[test]
fn random_bytes_come_from_the_token() {
    let (_t, hsm) = token("rng", 1);
    let a = hsm.with_session(|s| s.random(32)).unwrap();
    let b = hsm.with_session(|s| s.random(32)).unwrap();
    assert_eq!(a.len(), 32);
    assert_ne!(a, b);
}

/// The jig line protocol's key-transport key: HSM derivation equals the software derivation,
/// and per-meter keys wrapped under it in the HSM unwrap in software.
#[test]
fn ktk_equals_software_derivation_and_wrapped_meter_keys_unwrap() {
    let (_t, hsm) = token("ktk", 2);
    ktk_and_check_values_agree_with_software(&hsm);
}

/// The key-transport key and the check values of meter keys on `hsm`, against the software
/// implementation of the line protocol (run on each PKCS#11 implementation).
/// The X9.63 key-transport key derived in the token equals the meter's in software: a meter key
/// the token wraps under it unwraps there to the key of the token's check value, and the KTK
/// can only wrap.
pub(crate) fn x963_ktk_agrees_with_software(hsm: &hsm::Hsm) {
    let (kt, kt_pub) = hsm.with_session(|s| s.generate_kt_keypair()).unwrap();
    let (meter, point) = util::meter_point(9);
    let th = [0x33; 32];
    let ktk = hsm
        .with_session(|s| s.derive_ktk_x963(&kt, &point, &crypto::ktk_x963_shared_info(&th)))
        .unwrap();
    let sw = crypto::meter_ktk_with(
        crypto::KtkMethod::X963,
        &meter.to_nonzero_scalar(),
        &crypto::parse_p256_point(&kt_pub).unwrap(),
        &th,
    );
    let key = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None))
        .unwrap();
    let kcv = hsm.with_session(|s| s.kcv(&key)).unwrap();
    let wrapped = hsm
        .with_session(|s| s.wrap(&ktk, &key, WrapAlg::AesKw))
        .unwrap();
    let clear = crypto::unwrap_key(&sw, LineWrap::AesKw, &wrapped).unwrap();
    assert_eq!(crypto::kcv_aes(&clear), Some(kcv));
    let f = hsm.with_session(|s| s.key_flags(&ktk)).unwrap();
    assert!(
        f.wrap && f.sensitive && !f.extractable && !f.encrypt && !f.decrypt,
        "{f}"
    );
}

pub(crate) fn ktk_and_check_values_agree_with_software(hsm: &hsm::Hsm) {
    let (kt_private, kt_pub) = hsm.with_session(|s| s.generate_kt_keypair()).unwrap();
    assert_eq!(kt_pub[0], 0x04);
    let flags = hsm.with_session(|s| s.key_flags(&kt_private)).unwrap();
    assert!(flags.derive && flags.sensitive && !flags.extractable && !flags.sign && !flags.token);

    // The meter's side, in software.
    let meter_secret =
        p256::SecretKey::from_slice(&sha2::Sha256::digest(b"meter ephemeral")).unwrap();
    let meter_pub: [u8; 65] = meter_secret
        .public_key()
        .to_sec1_point(false)
        .as_bytes()
        .try_into()
        .unwrap();
    let th = sha2::Sha256::digest(b"transcript").into();
    let data = crypto::ktk_derivation_data(&th);

    let ktk = hsm
        .with_session(|s| s.derive_ktk(&kt_private, &meter_pub, &data))
        .unwrap();
    let ktk_flags = hsm.with_session(|s| s.key_flags(&ktk)).unwrap();
    assert!(ktk_flags.wrap && ktk_flags.sensitive && !ktk_flags.extractable);
    assert!(
        !ktk_flags.encrypt
            && !ktk_flags.decrypt
            && !ktk_flags.sign
            && !ktk_flags.unwrap
            && !ktk_flags.derive
    );

    let kt_public = crypto::parse_p256_point(&kt_pub).unwrap();
    let z = crypto::ecdh_x(&meter_secret.to_nonzero_scalar(), &kt_public);
    let ktk_sw = crypto::ktk_from_shared(&z, &th);
    assert_eq!(
        *ktk_sw,
        *crypto::meter_ktk(&meter_secret.to_nonzero_scalar(), &kt_public, &th)
    );

    for (role, size) in [
        (KeyRole::MeterGuek, AesKeySize::Aes128),
        (KeyRole::MeterGbek, AesKeySize::Aes128),
        (KeyRole::MeterAk, AesKeySize::Aes128),
        (KeyRole::MeterKek, AesKeySize::Aes256),
    ] {
        let key = hsm
            .with_session(|s| s.generate_aes_key(role, size, None))
            .unwrap();
        let kcv = hsm.with_session(|s| s.kcv(&key)).unwrap();
        for (alg, line_alg) in [
            (WrapAlg::AesKw, LineWrap::AesKw),
            (WrapAlg::AesKwPad, LineWrap::AesKwp),
        ] {
            let wrapped = hsm.with_session(|s| s.wrap(&ktk, &key, alg)).unwrap();
            let clear = crypto::unwrap_key(&ktk_sw, line_alg, &wrapped)
                .expect("the software-derived ktk unwraps what the hsm wrapped");
            assert_eq!(clear.len(), size.bytes());
            assert_eq!(
                crypto::kcv_aes(&clear),
                Some(kcv),
                "{role:?}: CKA_CHECK_VALUE = AES-ECB(key, 0)[..3]"
            );
        }
        hsm.with_session(|s| s.destroy(&key)).unwrap();
    }

    // The intermediate ECDH secret was destroyed: the only secret key left is the KTK.
    let secrets: Vec<_> = hsm
        .with_session(|s| s.list_objects())
        .unwrap()
        .into_iter()
        .filter(|o| o.class == "secret key")
        .collect();
    assert_eq!(secrets.len(), 1, "{secrets:?}");
    assert!(secrets[0].flags.as_ref().unwrap().wrap);

    // Another transcript gives another key: the software KTK of `th` no longer unwraps.
    let other = crypto::ktk_derivation_data(&sha2::Sha256::digest(b"other").into());
    let ktk2 = hsm
        .with_session(|s| s.derive_ktk(&kt_private, &meter_pub, &other))
        .unwrap();
    let key = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterAk, AesKeySize::Aes128, None))
        .unwrap();
    let wrapped = hsm
        .with_session(|s| s.wrap(&ktk2, &key, WrapAlg::AesKw))
        .unwrap();
    assert!(crypto::unwrap_key(&ktk_sw, LineWrap::AesKw, &wrapped).is_none());

    // A point off the curve is refused before the token sees it.
    let mut bad = meter_pub;
    bad[64] ^= 1;
    let r = hsm.with_session(|s| s.derive_ktk(&kt_private, &bad, &data));
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
}

/// A meter key pair made by the HSM (meters without a TRNG) travels wrapped as PKCS#8.
#[test]
fn hsm_generated_meter_key_pair_travels_wrapped() {
    let (_t, hsm) = token("mkp", 1);
    let (kt_private, kt_pub) = hsm.with_session(|s| s.generate_kt_keypair()).unwrap();
    let meter_secret = p256::SecretKey::from_slice(&sha2::Sha256::digest(b"meter 2")).unwrap();
    let meter_pub: [u8; 65] = meter_secret
        .public_key()
        .to_sec1_point(false)
        .as_bytes()
        .try_into()
        .unwrap();
    let th: [u8; 32] = sha2::Sha256::digest(b"th 2").into();
    let ktk = hsm
        .with_session(|s| s.derive_ktk(&kt_private, &meter_pub, &crypto::ktk_derivation_data(&th)))
        .unwrap();
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::MeterKeyPair, Curve::P256, None))
        .unwrap();
    let wrapped = hsm
        .with_session(|s| s.wrap(&ktk, &pair.private, WrapAlg::AesKwPad))
        .unwrap();
    let z = crypto::ecdh_x(
        &meter_secret.to_nonzero_scalar(),
        &crypto::parse_p256_point(&kt_pub).unwrap(),
    );
    let pkcs8 = crypto::unwrap_key(
        &crypto::ktk_from_shared(&z, &th),
        LineWrap::AesKwp,
        &wrapped,
    )
    .unwrap();
    // SoftHSM 2.6.1 zero-pads the PKCS#8 encoding to a multiple of 8 before the RFC 5649 wrap;
    // DER is self-delimiting, so the receiver reads one TLV and checks the rest is zero.
    let len = match pkcs8[1] {
        n @ 0..=0x7f => usize::from(n) + 2,
        0x81 => usize::from(pkcs8[2]) + 3,
        _ => usize::from(u16::from_be_bytes([pkcs8[2], pkcs8[3]])) + 4,
    };
    assert!(pkcs8[len..].iter().all(|b| *b == 0));
    use p256::pkcs8::DecodePrivateKey;
    let sk = p256::SecretKey::from_pkcs8_der(&pkcs8[..len]).unwrap();
    assert_eq!(
        sk.public_key().to_sec1_point(false).as_bytes(),
        pair.point.as_slice()
    );
}

/// Wrap here, unwrap in a second token, as the utility would.
#[test]
fn rsa_oaep_transport_key_and_aes_kw_meter_keys_unwrap_in_a_second_token() {
    // The utility's RSA key lives in token 2; its public key reaches the station as a
    // certificate, which the station token's security officer installs as a trusted key before
    // the station opens the token.
    let (_t2, utility, rsa, cert_der) = utility_certificate();
    let t1 = TestToken::new("station").unwrap();
    let trusted = t1.trust_customer("utility-a", &cert_der).unwrap();
    assert!(trusted.trusted);
    assert_eq!(trusted.bits, 2048);
    let station = t1.open(2).unwrap();
    let oaep = station
        .mechanisms()
        .rsa_oaep
        .expect("the token offers rsa-oaep");
    assert!(station.mechanisms().chosen().contains("CKM_RSA_PKCS_OAEP"));
    // SoftHSM 2.6.1 refuses every OAEP label: the probe finds that, and a labelled wrap says
    // which mechanism is missing rather than failing inside the token.
    assert!(
        !station.mechanisms().oaep_label,
        "{}",
        station.mechanisms().chosen()
    );
    let customer = station
        .with_session(move |s| s.approved_customer_key("utility-a", &cert_der))
        .unwrap();
    assert_eq!(customer.label(), Some("customer-transport/utility-a"));
    assert_eq!(customer.kind(), KeyKind::RsaPublic);
    let flags = station.with_session(|s| s.key_flags(&customer)).unwrap();
    assert!(flags.trusted && flags.wrap && !flags.encrypt, "{flags}");

    // Batch transport key: AES-256 in the station's token, wrapped for the utility.
    let tk = station
        .with_session(|s| {
            s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/B-1"),
            )
        })
        .unwrap();
    let tk_wrapped = station
        .with_session(|s| s.wrap(&customer, &tk, WrapAlg::RsaOaep))
        .unwrap();
    assert_eq!(tk_wrapped.len(), 256);
    let labelled = WrapAlg::RsaOaepLabelled(oaep, hsm::OaepLabel::new(b"B-1").unwrap());
    let e = station
        .with_session(|s| s.wrap(&customer, &tk, labelled))
        .unwrap_err();
    assert!(matches!(e, Error::MechanismMissing { .. }), "{e}");

    // Per-meter keys wrapped under the transport key.
    let mut delivered = Vec::new();
    for (role, size, alg) in [
        (KeyRole::MeterGuek, AesKeySize::Aes128, WrapAlg::AesKw),
        (KeyRole::MeterGbek, AesKeySize::Aes128, WrapAlg::AesKw),
        (KeyRole::MeterAk, AesKeySize::Aes128, WrapAlg::AesKw),
        (KeyRole::MeterKek, AesKeySize::Aes256, WrapAlg::AesKwPad),
    ] {
        let key = station
            .with_session(|s| s.generate_aes_key(role, size, None))
            .unwrap();
        let wrapped = station.with_session(|s| s.wrap(&tk, &key, alg)).unwrap();
        let kcv = station.with_session(|s| s.kcv(&key)).unwrap();
        // A commitment to the key, computed in the token (the station binds each meter key to
        // its meter this way).
        let binding = station
            .with_session(|s| s.digest_key_sha256(b"binding-test", &key))
            .unwrap();
        station.with_session(|s| s.destroy(&key)).unwrap();
        delivered.push((size, alg, wrapped, kcv, binding));
    }

    // The utility: RSA-OAEP unwrap of the transport key (with the hash the station recorded),
    // then AES-KW unwrap of each meter key, never in clear.
    assert_eq!(utility.mechanisms().rsa_oaep, Some(oaep));
    let utk = utility
        .with_session(|s| {
            s.unwrap_aes(
                &rsa.private,
                &tk_wrapped,
                WrapAlg::RsaOaep,
                KeyRole::UtilityBatchTransport,
                AesKeySize::Aes256,
                None,
            )
        })
        .unwrap();
    for (i, (size, alg, wrapped, kcv, binding)) in delivered.into_iter().enumerate() {
        // Imported meter keys are token objects, labelled one by one.
        let label = format!("meter-key/{i}");
        assert!(matches!(
            utility.with_session(|s| {
                s.unwrap_aes(&utk, &wrapped, alg, KeyRole::UtilityMeterKey, size, None)
            }),
            Err(Error::InvalidInput(_))
        ));
        let k = utility
            .with_session(|s| {
                s.unwrap_aes(
                    &utk,
                    &wrapped,
                    alg,
                    KeyRole::UtilityMeterKey,
                    size,
                    Some(&label),
                )
            })
            .unwrap();
        assert_eq!(k.label(), Some(label.as_str()));
        assert_eq!(utility.with_session(|s| s.kcv(&k)).unwrap(), kcv);
        // The utility's token computes the same commitment over the imported key, which is
        // neither readable nor extractable.
        assert_eq!(
            utility
                .with_session(|s| s.digest_key_sha256(b"binding-test", &k))
                .unwrap(),
            binding
        );
        assert!(matches!(
            utility.with_session(|s| s.try_read_value(&k)),
            Err(Error::NotPermitted(_))
        ));
    }

    // A corrupted wrapped key is refused.
    let mut bad = tk_wrapped.clone();
    bad[10] ^= 0x55;
    let r = utility.with_session(|s| {
        s.unwrap_aes(
            &rsa.private,
            &bad,
            WrapAlg::RsaOaep,
            KeyRole::UtilityBatchTransport,
            AesKeySize::Aes256,
            None,
        )
    });
    assert!(r.is_err());
}

/// A certificate for an RSA public key, signed by an EC key of the station's token.
fn rsa_certificate(hsm: &hsm::Hsm, ca: &hsm::KeyPairHandle, rsa_spki: &[u8]) -> Vec<u8> {
    struct RsaPub(Vec<u8>);
    impl rcgen::PublicKeyData for RsaPub {
        fn der_bytes(&self) -> &[u8] {
            &self.0
        }
        fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
            &rcgen::PKCS_RSA_SHA256
        }
    }
    use der::Decode;
    use x509_cert::spki::SubjectPublicKeyInfoOwned as Spki;
    let spki = Spki::from_der(rsa_spki).unwrap();
    let key = RsaPub(spki.subject_public_key.raw_bytes().to_vec());
    let ca = ca.clone();
    hsm.with_session(move |s| {
        let mut params = rcgen::CertificateParams::default();
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&[1, 2, 3]));
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Utility A transport");
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(vec![1; 20]);
        let issuer = rcgen::Issuer::new(ca_params, hsm::SessionSigner::new(s, &ca));
        Ok(params.signed_by(&key, &issuer).unwrap().der().to_vec())
    })
    .unwrap()
}

#[test]
fn key_policy_is_enforced_by_the_token() {
    let (_t, hsm) = token("policy", 1);
    let audit = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::AuditSigner, Curve::P256, None))
        .unwrap();
    let tk = hsm
        .with_session(|s| {
            s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/P"),
            )
        })
        .unwrap();
    let meter_key = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None))
        .unwrap();
    let (kt_private, _) = hsm.with_session(|s| s.generate_kt_keypair()).unwrap();
    let meter_pub = p256::SecretKey::from_slice(&[7u8; 32])
        .unwrap()
        .public_key()
        .to_sec1_point(false);
    let ktk = hsm
        .with_session(|s| {
            s.derive_ktk(
                &kt_private,
                meter_pub.as_bytes().try_into().unwrap(),
                &[9u8; 32],
            )
        })
        .unwrap();

    // Flags read back from the token equal the policy table, role by role.
    for (key, role) in [
        (&audit.private, KeyRole::AuditSigner),
        (&tk, KeyRole::BatchTransport),
        (&meter_key, KeyRole::MeterGuek),
        (&ktk, KeyRole::KeyTransport),
        (&kt_private, KeyRole::KeyTransportAgreement),
    ] {
        let f = hsm.with_session(|s| s.key_flags(key)).unwrap();
        let p = hsm::policy::policy(role).key;
        assert_eq!(
            (
                f.token,
                f.private,
                f.sensitive,
                f.extractable,
                f.sign,
                f.unwrap,
                f.derive,
                f.decrypt
            ),
            (
                p.token,
                p.private,
                p.sensitive,
                p.extractable,
                p.usage.sign,
                p.usage.unwrap,
                p.usage.derive,
                p.usage.decrypt
            ),
            "{role:?}"
        );
        if !matches!(key.kind(), KeyKind::EcPrivate(_)) {
            assert_eq!(
                (f.wrap, f.encrypt, f.verify),
                (p.usage.wrap, p.usage.encrypt, p.usage.verify),
                "{role:?}"
            );
        }
    }

    hsm.with_session(|s| {
        let raw = s.raw_session_for_tests();
        // Non-extractable keys cannot be exported: CKA_VALUE is refused...
        for key in [&audit.private, &ktk, &kt_private, &meter_key, &tk] {
            assert!(
                matches!(s.try_read_value(key), Err(Error::NotPermitted(_))),
                "{key:?}"
            );
            let attrs = raw
                .get_attributes(key.raw_handle_for_tests(), &[AttributeType::Value])
                .unwrap();
            assert!(
                attrs.is_empty(),
                "C_GetAttributeValue(CKA_VALUE) must not return a sensitive value"
            );
        }
        // ...and wrapping them fails.
        for key in [&audit.private, &ktk, &kt_private] {
            let r = s.wrap(&tk, key, WrapAlg::AesKwPad);
            assert!(matches!(r, Err(Error::NotPermitted(_))), "{key:?}: {r:?}");
        }
        // A sign-only key cannot wrap.
        // A sign-only key cannot wrap: the audit signer is refused as a wrapping key, and the
        // token enforces its CKA_DERIVE=false too (ECDH would suit its key type).
        let r = raw.wrap_key(
            &Mechanism::AesKeyWrap,
            audit.private.raw_handle_for_tests(),
            meter_key.raw_handle_for_tests(),
        );
        assert!(r.is_err(), "the audit signer wrapped a key: {r:?}");
        let audit_flags = s.key_flags(&audit.private)?;
        assert!(
            audit_flags.sign
                && !audit_flags.wrap
                && !audit_flags.unwrap
                && !audit_flags.derive
                && !audit_flags.decrypt
        );
        let r = s.ecdh_derive(
            &audit.private,
            meter_pub.as_bytes(),
            KeyRole::KeyTransportSecret,
            AesKeySize::Aes256,
        );
        assert!(matches!(r, Err(Error::NotPermitted(_))), "{r:?}");
        // AES keys whose policy has CKA_WRAP=false are refused as wrapping keys by the token.
        let derive_only = s.ecdh_derive(
            &kt_private,
            meter_pub.as_bytes(),
            KeyRole::KeyTransportSecret,
            AesKeySize::Aes256,
        )?;
        for not_a_wrapper in [&derive_only, &meter_key] {
            let r = s.wrap(not_a_wrapper, &tk, WrapAlg::AesKw);
            assert!(matches!(r, Err(Error::NotPermitted(_))), "{r:?}");
        }
        // The KTK can wrap, and nothing else: no encryption, no signing.
        assert!(s.wrap(&ktk, &meter_key, WrapAlg::AesKw).is_ok());
        let e = raw
            .encrypt(&Mechanism::AesEcb, ktk.raw_handle_for_tests(), &[0u8; 16])
            .unwrap_err();
        assert!(not_permitted(&e), "{e}");
        // A meter key may be wrapped but not used.
        let e = raw
            .encrypt(
                &Mechanism::AesEcb,
                meter_key.raw_handle_for_tests(),
                &[0u8; 16],
            )
            .unwrap_err();
        assert!(not_permitted(&e), "{e}");
        // The key-transport agreement key only derives: it cannot sign.
        let e = raw
            .sign(
                &Mechanism::Ecdsa,
                kt_private.raw_handle_for_tests(),
                &[1u8; 32],
            )
            .unwrap_err();
        assert!(not_permitted(&e), "{e}");
        // The attribute set cannot be loosened afterwards.
        let r = raw.update_attributes(ktk.raw_handle_for_tests(), &[Attribute::Extractable(true)]);
        assert!(r.is_err(), "a non-extractable key became extractable");
        Ok(())
    })
    .unwrap();
}

fn not_permitted(e: &cryptoki::error::Error) -> bool {
    matches!(
        e,
        cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::KeyFunctionNotPermitted, _)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_tasks_sign_at_once_through_the_pool() {
    let (_t, hsm) = token("conc", 4);
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::StationIdentity, Curve::P256, None))
        .unwrap();
    let mut tasks = Vec::new();
    for task in 0..32u32 {
        let hsm = hsm.clone();
        let key = pair.private.clone();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..25u32 {
                let msg = format!("task {task} message {i}").into_bytes();
                let m = msg.clone();
                let k = key.clone();
                let sig = hsm.run(move |s| s.sign(&k, &m)).await.unwrap();
                out.push((msg, sig));
            }
            out
        }));
    }
    let mut n = 0;
    for t in tasks {
        for (msg, sig) in t.await.unwrap() {
            assert!(verify_sw(Curve::P256, &pair.point, &msg, &sig));
            n += 1;
        }
    }
    assert_eq!(n, 800);
    assert_eq!(hsm.generation(), 0, "no recovery was needed");
}

#[test]
fn pin_and_token_errors_are_distinct() {
    let t = TestToken::new("pin").unwrap();
    let mut cfg = t.config(1);

    cfg.pin = PinSource::Secret(SecretString::from("wrong-pin"));
    let e = hsm::Hsm::open(&cfg).unwrap_err();
    assert!(matches!(e, Error::PinIncorrect { .. }), "{e}");
    assert!(e.to_string().contains("refused the user pin"), "{e}");
    assert!(
        !format!("{e:?}{e}").contains("wrong-pin"),
        "the pin leaked into the error"
    );

    let missing = HsmConfig {
        token_label: "no-such-token".into(),
        ..t.config(1)
    };
    let e = hsm::Hsm::open(&missing).unwrap_err();
    assert!(matches!(e, Error::TokenNotFound { .. }), "{e}");
    assert!(
        e.to_string().contains(&t.label),
        "lists the tokens present: {e}"
    );

    let dir = tempfile::tempdir().unwrap();
    let pin_file = dir.path().join("pin");
    std::fs::write(&pin_file, format!("{}\n", hsm::testkit::USER_PIN)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    cfg.pin = PinSource::File(pin_file.clone());
    let e = hsm::Hsm::open(&cfg).unwrap_err();
    assert!(
        matches!(e, Error::PinFileInsecure { mode: 0o644, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("chmod 600"), "{e}");
    std::fs::set_permissions(&pin_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let hsm = hsm::Hsm::open(&cfg).expect("an owner-only pin file is accepted");
    assert!(format!("{hsm:?}").contains(&t.label));
    drop(hsm);

    cfg.pin = PinSource::Env("HSM_TEST_PIN_THAT_IS_NOT_SET".into());
    let e = hsm::Hsm::open(&cfg).unwrap_err();
    assert!(matches!(e, Error::PinUnavailable(_)), "{e}");

    let debug = format!("{:?}", PinSource::Secret(SecretString::from("s3cret-pin")));
    assert!(!debug.contains("s3cret-pin"), "{debug}");
}

#[test]
fn session_objects_are_not_token_objects_and_destroy_works() {
    let (_t, hsm) = token("destroy", 1);
    let k = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterKek, AesKeySize::Aes256, None))
        .unwrap();
    assert!(!k.is_token_object());
    hsm.with_session(|s| s.destroy(&k)).unwrap();
    let r = hsm.with_session(|s| s.kcv(&k));
    assert!(r.is_err(), "a destroyed key is gone");
    // Token roles need a label.
    let r =
        hsm.with_session(|s| s.generate_aes_key(KeyRole::BatchTransport, AesKeySize::Aes256, None));
    assert!(matches!(r, Err(Error::InvalidInput(_))), "{r:?}");
}

#[test]
fn missing_mechanism_error_names_it() {
    let e = Error::MechanismMissing {
        mechanism: "CKM_AES_ECB_ENCRYPT_DATA",
        purpose: "the key-transport key",
    };
    assert_eq!(
        e.to_string(),
        "the token does not offer CKM_AES_ECB_ENCRYPT_DATA, which is needed for the key-transport key; use a token that supports it"
    );
    let (_t, hsm) = token("mech", 1);
    let m = hsm.mechanisms();
    assert!(m.ecdh && m.aes_ecb_encrypt_data && m.aes_key_wrap && m.aes_key_wrap_pad);
    // SoftHSM 2.6.1 derives with the null KDF only: the AES-ECB key transport.
    assert!(m.ktk_aes_ecb && !m.ktk_x963, "{}", m.chosen());
    assert!(
        m.listed.iter().any(|n| n == "CKM_AES_ECB_ENCRYPT_DATA"),
        "{:?}",
        m.listed
    );
}

/// A token's refusal names the operation, the mechanism and the CKR by its PKCS#11 name (not
/// the specification's prose), then what to do.
#[test]
fn a_token_error_names_the_operation_the_mechanism_and_the_ckr() {
    let (_t, hsm) = token("ckr", 1);
    let tk = hsm
        .with_session(|s| {
            s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/CKR"),
            )
        })
        .unwrap();
    // A failure of the token: garbage to unwrap under a key that may unwrap.
    let e = hsm
        .with_session(|s| {
            let kek =
                s.generate_aes_key(KeyRole::UtilityBatchTransport, AesKeySize::Aes256, None)?;
            s.unwrap_aes(
                &kek,
                &[0x5a; 24],
                WrapAlg::AesKw,
                KeyRole::MeterGuek,
                AesKeySize::Aes128,
                None,
            )
        })
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.starts_with("unwrap a key with CKM_AES_KEY_WRAP: C_UnwrapKey returned CKR_"),
        "{text}"
    );
    assert!(
        !text.contains("  "),
        "no prose from the specification: {text}"
    );
    // A refusal by the key's policy says so, and names the same.
    let e = hsm
        .with_session(|s| {
            s.unwrap_aes(
                &tk,
                &[0x5a; 24],
                WrapAlg::AesKw,
                KeyRole::MeterGuek,
                AesKeySize::Aes128,
                None,
            )
        })
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "the key policy forbids this: the key may not do this (unwrap a key with CKM_AES_KEY_WRAP: C_UnwrapKey returned CKR_KEY_FUNCTION_NOT_PERMITTED)"
    );
    use cryptoki::error::RvError;
    assert_eq!(
        hsm::ckr_name(RvError::MechanismInvalid),
        "CKR_MECHANISM_INVALID"
    );
    assert_eq!(
        hsm::ckr_name(RvError::SessionReadWriteSoExists),
        "CKR_SESSION_READ_WRITE_SO_EXISTS"
    );
    assert_eq!(
        hsm::ckr_name(RvError::VendorDefined(0x8000_0101)),
        "CKR_VENDOR_DEFINED (0x80000101)"
    );
}

#[test]
fn meter_csr_helper_is_sane() {
    // Guards the harness itself: a request from it parses.
    let key = util::SoftKey::new(Curve::P256, "x");
    assert!(hsm::cert::check_csr(&util::meter_csr(&key), Curve::P256).is_ok());
}

/// A utility's RSA-2048 transport key in a token of its own, and its certificate.
pub(crate) fn utility_certificate() -> (TestToken, hsm::Hsm, hsm::RsaKeyPairHandle, Vec<u8>) {
    let (t, utility) = token("utility", 1);
    let rsa = utility
        .with_session(|s| s.generate_rsa_keypair(2048, "utility-transport"))
        .unwrap();
    let ca = utility
        .with_session(|s| {
            s.generate_ec_keypair(KeyRole::ManufacturerRoot, Curve::P256, Some("some-ca"))
        })
        .unwrap();
    let cert = rsa_certificate(&utility, &ca, &rsa.spki_der().unwrap());
    (t, utility, rsa, cert)
}

fn rv(r: cryptoki::error::Result<impl std::fmt::Debug>) -> Option<cryptoki::error::RvError> {
    match r {
        Err(cryptoki::error::Error::Pkcs11(rv, _)) => Some(rv),
        Err(e) => panic!("not a pkcs#11 refusal: {e}"),
        Ok(v) => panic!("the token allowed it: {v:?}"),
    }
}

/// Someone holding the user PIN — a shell on the station, or the service's own session —
/// tries every way PKCS#11 offers to get the batch transport key out under a key of their own
/// (with it, every meter key of the batch). The token refuses each: the key is
/// CKA_WRAP_WITH_TRUSTED, not copyable, not modifiable, and only the security officer can make
/// a trusted key.
#[test]
fn the_batch_transport_key_cannot_be_wrapped_out_with_the_user_pin() {
    use cryptoki::error::RvError;
    use cryptoki::object::{KeyType, ObjectClass};
    let (_u, _utility, _, cert) = utility_certificate();
    let t = TestToken::new("wrap-out").unwrap();
    t.trust_customer("utility-a", &cert).unwrap();
    let station = t.open(1).unwrap();
    let tk = station
        .with_session(|s| {
            s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/WO-1"),
            )
        })
        .unwrap();
    let f = station.with_session(|s| s.key_flags(&tk)).unwrap();
    assert!(f.wrap_with_trusted && f.extractable && f.sensitive, "{f}");
    station
        .with_session(move |s| {
            let raw = s.raw_session_for_tests();
            let tkh = tk.raw_handle_for_tests();
            // 1. An AES key of their own.
            let own_aes = raw
                .generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32u64.into()),
                        Attribute::Token(false),
                        Attribute::Wrap(true),
                        Attribute::Unwrap(true),
                    ],
                )
                .unwrap();
            for m in [Mechanism::AesKeyWrap, Mechanism::AesKeyWrapPad] {
                assert_eq!(
                    rv(raw.wrap_key(&m, own_aes, tkh)),
                    Some(RvError::KeyNotWrappable)
                );
            }
            // 2. An RSA key pair of their own, with OAEP and with PKCS#1 v1.5.
            let (own_pub, _own_priv) = raw
                .generate_key_pair(
                    &Mechanism::RsaPkcsKeyPairGen,
                    &[
                        Attribute::Token(false),
                        Attribute::ModulusBits(2048u64.into()),
                        Attribute::PublicExponent(vec![1, 0, 1]),
                        Attribute::Wrap(true),
                    ],
                    &[Attribute::Token(false), Attribute::Unwrap(true)],
                )
                .unwrap();
            let oaep = hsm::OaepHash::Sha1;
            assert_eq!(
                rv(raw.wrap_key(&Mechanism::RsaPkcsOaep(oaep.params()), own_pub, tkh)),
                Some(RvError::KeyNotWrappable)
            );
            assert_eq!(
                rv(raw.wrap_key(&Mechanism::RsaPkcs, own_pub, tkh)),
                Some(RvError::KeyNotWrappable)
            );
            // 3. Make their own key trusted: only the security officer may.
            assert_eq!(
                rv(raw.update_attributes(own_aes, &[Attribute::Trusted(true)])),
                Some(RvError::AttributeReadOnly)
            );
            assert_eq!(
                rv(raw.generate_key(
                    &Mechanism::AesKeyGen,
                    &[
                        Attribute::Class(ObjectClass::SECRET_KEY),
                        Attribute::KeyType(KeyType::AES),
                        Attribute::ValueLen(32u64.into()),
                        Attribute::Token(false),
                        Attribute::Wrap(true),
                        Attribute::Trusted(true),
                    ],
                )),
                Some(RvError::AttributeReadOnly)
            );
            // 4. Clear the batch key's mark, or copy it without the mark.
            assert!(rv(raw.update_attributes(tkh, &[Attribute::WrapWithTrusted(false)])).is_some());
            assert!(rv(raw.copy_object(tkh, &[Attribute::WrapWithTrusted(false)])).is_some());
            assert_eq!(
                rv(raw.copy_object(tkh, &[Attribute::Token(false)])),
                Some(RvError::ActionProhibited),
                "the batch key is not copyable at all"
            );
            // 5. The trusted customer key, but with PKCS#1 v1.5 (its allowed mechanisms say
            //    RSA-OAEP only), or used to encrypt.
            let customer = s.approved_customer_key("utility-a", &cert)?;
            let ch = customer.raw_handle_for_tests();
            assert_eq!(
                rv(raw.wrap_key(&Mechanism::RsaPkcs, ch, tkh)),
                Some(RvError::MechanismInvalid)
            );
            // 6. What the station does: RSA-OAEP under the key the security officer approved.
            let oaep = s.mechanisms().rsa_oaep.expect("rsa-oaep");
            let wrapped = s.wrap(&customer, &tk, WrapAlg::RsaOaepWith(oaep))?;
            assert_eq!(wrapped.len(), 256);
            Ok(())
        })
        .unwrap();
}

/// The customer key is read afresh before every wrap; a key that is not the approved
/// certificate's, or not trusted, or not restricted to RSA-OAEP, is refused by name.
#[test]
fn a_customer_key_is_compared_with_the_approved_certificate_before_a_wrap() {
    let (_u, _utility, _, cert) = utility_certificate();
    let (_u2, _utility2, _, other) = utility_certificate();
    let t = TestToken::new("cust-check").unwrap();
    t.trust_customer("utility-a", &cert).unwrap();
    // The security officer refuses a second key under the same name.
    let e = t.trust_customer("utility-a", &other).unwrap_err();
    assert!(matches!(e, Error::RoleExists { .. }), "{e}");
    let station = t.open(1).unwrap();
    let (c1, c2) = (cert.clone(), other.clone());
    station
        .with_session(move |s| {
            s.approved_customer_key("utility-a", &c1)?;
            let e = s.approved_customer_key("utility-a", &c2).unwrap_err();
            assert!(
                e.to_string()
                    .contains("not the key of the customer's approved certificate"),
                "{e}"
            );
            let e = s.approved_customer_key("utility-b", &c1).unwrap_err();
            assert!(e.to_string().contains("holds no such key"), "{e}");
            Ok(())
        })
        .unwrap();
    // A user session cannot install a customer key under the role's policy: the policy says
    // trusted, and the token refuses that outside a security officer's session.
    let row = hsm::policy::policy(KeyRole::CustomerTransport);
    assert!(row.key.trusted);
    drop(station);
    // The security officer's view, and the withdrawal.
    let officer = hsm::SecurityOfficer::login(
        std::path::Path::new(hsm::SOFTHSM_MODULE),
        &t.label,
        &SecretString::from(hsm::testkit::SO_PIN),
    )
    .unwrap();
    let keys = officer.customer_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert!(keys[0].trusted && keys[0].name == "utility-a");
    let spki = hsm::so::rsa_public_of_certificate(&cert).unwrap();
    assert_eq!(keys[0].spki_sha256, hex::encode(spki.spki_sha256));
    assert!(officer.remove_customer_key("utility-a").unwrap());
    assert!(!officer.remove_customer_key("utility-a").unwrap());
    drop(officer);
    let e = hsm::SecurityOfficer::login(
        std::path::Path::new(hsm::SOFTHSM_MODULE),
        &t.label,
        &SecretString::from("wrong-so-pin"),
    )
    .unwrap_err();
    assert!(
        matches!(e, Error::SoPinRefused { locked: false, .. }),
        "{e}"
    );
}

/// Meter secrets cannot be CKA_WRAP_WITH_TRUSTED: the KTK that wraps them for the meter is
/// derived per meter in the user session, and only a security officer may mark a key trusted.
/// What keeps them from being wrapped out is that they are session objects: `pkcs11-tool`, logged
/// in with the user PIN in a process of its own, sees the token's batch key but not the meter
/// key this process holds at the same moment.
#[test]
fn meter_secrets_are_invisible_to_another_process_holding_the_user_pin() {
    let (t, hsm) = token("sess-obj", 1);
    let tk = hsm
        .with_session(|s| {
            s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/WO-7"),
            )
        })
        .unwrap();
    let meter_key = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None))
        .unwrap();
    let here = hsm.with_session(|s| s.list_objects()).unwrap();
    let secret = |o: &&hsm::ObjectInfo| o.class == "secret key";
    assert_eq!(here.iter().filter(secret).count(), 2, "{here:?}");
    let out = std::process::Command::new("pkcs11-tool")
        .env(
            "SOFTHSM2_CONF",
            hsm::testkit::dir().unwrap().join("softhsm2.conf"),
        )
        .args(["--module", hsm::SOFTHSM_MODULE, "--token-label", &t.label])
        .args(["--login", "--pin", hsm::testkit::USER_PIN])
        .args(["--list-objects", "--type", "secrkey"])
        .output()
        .expect("pkcs11-tool (Debian's opensc; `cargo xtask test` installs it)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("Secret Key Object").count(), 1, "{text}");
    assert!(text.contains("batch-transport/WO-7"), "{text}");
    drop((tk, meter_key));
}
