//! The cell's HSM operations on Kryoptic, a second PKCS#11 implementation that differs where
//! real HSMs differ (PKCS#11 3.0 numbering of AES-KWP, OAEP with SHA-256 and labels).

use hsm::testkit::TestToken;
use hsm::{AesKeySize, Curve, KeyRole, WrapAlg};

fn token(prefix: &str) -> (TestToken, hsm::Hsm) {
    let t = TestToken::kryoptic(prefix).expect("a kryoptic token");
    let h = t.open(2).expect("open the kryoptic token");
    (t, h)
}

#[test]
fn kryoptic_opens_signs_and_wraps_with_the_cell_policy() {
    let (_t, hsm) = token("kry-ops");
    let m = hsm.mechanisms();
    assert!(m.ec_keygen && m.ecdsa && m.aes_key_wrap && m.ecdh && m.aes_ecb_encrypt_data);
    assert_eq!(m.rsa_oaep, Some(hsm::OaepHash::Sha256), "{}", m.chosen());
    let pair = hsm
        .with_session(|s| s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P256, Some("m")))
        .unwrap();
    let sig = hsm
        .with_session(|s| s.sign(&pair.private, b"hello"))
        .unwrap();
    assert!(sig.len() > 8);
    let tk = hsm
        .with_session(|s| {
            s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/W"),
            )
        })
        .unwrap();
    let f = hsm.with_session(|s| s.key_flags(&tk)).unwrap();
    assert!(f.wrap_with_trusted && f.sensitive && f.extractable, "{f}");
    let key = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterGuek, AesKeySize::Aes128, None))
        .unwrap();
    let w = hsm
        .with_session(|s| s.wrap(&tk, &key, WrapAlg::AesKw))
        .unwrap();
    assert_eq!(w.len(), 24);
    // RFC 5649 is 0x210B here, found by its known answer.
    assert_eq!(m.kwp.map(|t| *t), Some(0x210B), "{}", m.chosen());
    let kek = hsm
        .with_session(|s| s.generate_aes_key(KeyRole::MeterKek, AesKeySize::Aes256, None))
        .unwrap();
    let w = hsm
        .with_session(|s| s.wrap(&tk, &kek, WrapAlg::AesKwPad))
        .unwrap();
    assert_eq!(w.len(), 40);
    // No CKA_CHECK_VALUE here: keys that need one may ECB-encrypt (and nothing else more).
    assert!(!m.check_value, "{}", m.chosen());
    let kcv = hsm.with_session(|s| s.kcv(&key)).unwrap();
    let f = hsm.with_session(|s| s.key_flags(&key)).unwrap();
    assert!(f.encrypt && !f.decrypt && !f.wrap && !f.sign, "{f}");
    assert_ne!(kcv, [0; 3]);
    hsm.with_session(|s| s.kcv(&tk)).unwrap();
    let e = hsm.with_session(|s| s.try_read_value(&key)).unwrap_err();
    assert!(
        matches!(e, hsm::Error::NotPermitted(_) | hsm::Error::Pkcs11 { .. }),
        "{e}"
    );
}

#[test]
fn kryoptic_derives_the_ktk_and_check_values_like_the_software_meter() {
    let (_t, hsm) = token("kry-ktk");
    crate::ops::ktk_and_check_values_agree_with_software(&hsm);
}

/// Kryoptic cannot mark a key trusted, not even for its security officer: a batch key that may
/// be wrapped only under a trusted key could never reach the utility there. The officer's
/// command says so by name; a cell on such a token runs with `trusted_wrap` off (and warns).
#[test]
fn kryoptic_cannot_mark_a_key_trusted_and_wraps_for_the_customer_without_the_mark() {
    let (_u, _utility, _, cert) = crate::ops::utility_certificate();
    let t = TestToken::kryoptic("kry-cust").unwrap();
    let e = t.trust_customer("utility-a", &cert).unwrap_err();
    use cryptoki::error::RvError;
    assert!(
        matches!(
            e,
            hsm::Error::Pkcs11 {
                rv: RvError::AttributeTypeInvalid | RvError::AttributeReadOnly,
                ..
            }
        ),
        "{e}"
    );
    let officer = hsm::SecurityOfficer::login(
        &t.module,
        &t.label,
        &hsm::SecretString::from(hsm::testkit::SO_PIN),
    )
    .unwrap();
    let k = officer
        .install_customer_key("utility-a", &cert, false)
        .unwrap();
    assert!(!k.trusted);
    drop(officer);

    let mut config = t.config(1);
    config.trusted_wrap = false;
    let hsm = hsm::Hsm::open(&config).unwrap();
    let tk = hsm
        .with_session(|s| {
            s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/W"),
            )
        })
        .unwrap();
    let f = hsm.with_session(|s| s.key_flags(&tk)).unwrap();
    assert!(!f.wrap_with_trusted, "{f}");
    let wrapped = hsm
        .with_session(move |s| {
            let c = s.approved_customer_key("utility-a", &cert)?;
            s.wrap(&c, &tk, WrapAlg::RsaOaep)
        })
        .unwrap();
    assert_eq!(wrapped.len(), 256);
}

/// Kryoptic takes RSA-OAEP labels: the batch key wrapped with its work order as the label
/// opens with that label only — under another work order, or with the empty label, the token
/// refuses it.
#[test]
fn kryoptic_binds_the_batch_key_to_its_work_order_with_an_oaep_label() {
    let t = TestToken::kryoptic("kry-label").unwrap();
    let mut config = t.config(1);
    config.trusted_wrap = false;
    let hsm = hsm::Hsm::open(&config).unwrap();
    let m = hsm.mechanisms();
    assert!(m.oaep_label, "{}", m.chosen());
    assert!(
        m.chosen().contains("the work order as label"),
        "{}",
        m.chosen()
    );
    let hash = m.rsa_oaep.unwrap();
    let label = |s: &str| hsm::OaepLabel::new(s.as_bytes()).unwrap();
    let (tk, wrapped) = hsm
        .with_session(|s| {
            let pair = s.generate_rsa_keypair(3072, "utility-transport")?;
            let tk = s.generate_aes_key(
                KeyRole::BatchTransport,
                AesKeySize::Aes256,
                Some("batch-transport/WO-A"),
            )?;
            let w = s.wrap(
                &pair.public,
                &tk,
                WrapAlg::RsaOaepLabelled(hash, label("WO-A")),
            )?;
            Ok((tk, w))
        })
        .unwrap();
    let kcv = hsm.with_session(|s| s.kcv(&tk)).unwrap();
    let unwrap = |alg: WrapAlg| {
        hsm.with_session(|s| {
            let private = s
                .find_key(hsm::KeyKind::RsaPrivate, "utility-transport")?
                .expect("the private key");
            let k = s.unwrap_aes(
                &private,
                &wrapped,
                alg,
                KeyRole::UtilityBatchTransport,
                AesKeySize::Aes256,
                None,
            )?;
            s.kcv(&k)
        })
    };
    assert_eq!(
        unwrap(WrapAlg::RsaOaepLabelled(hash, label("WO-A"))).unwrap(),
        kcv
    );
    unwrap(WrapAlg::RsaOaepLabelled(hash, label("WO-B"))).unwrap_err();
    unwrap(WrapAlg::RsaOaepWith(hash)).unwrap_err();
    assert!(hsm::OaepLabel::new(&[b'x'; 65]).is_none());
}

/// The X9.63 key transport in the token equals the meter's in software (and the probe finds it
/// here, with the AES-ECB one).
#[test]
fn kryoptic_derives_the_x963_ktk_like_the_software_meter() {
    let (_t, hsm) = token("kry-x963");
    let m = hsm.mechanisms();
    assert!(m.ktk_x963 && m.ktk_aes_ecb, "{}", m.chosen());
    crate::ops::x963_ktk_agrees_with_software(&hsm);
}
