//! The device-CA meter certificate profile and the signers.

use der::{Decode, Encode};
use hsm::cert::{
    Issuer, MeterKeyUsage, MeterProfile, Verification, check_csr, issue_meter_certificate,
};
use hsm::{CertError, CsrError, Curve, Error, KeyRole};
use x509_cert::Certificate;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, KeyUsage, SubjectKeyIdentifier,
};

use crate::util::{SoftKey, csr_with, meter_csr, openssl, token, write};

fn date(y: i32, m: time::Month, d: u8, h: u8) -> time::OffsetDateTime {
    time::Date::from_calendar_date(y, m, d)
        .unwrap()
        .with_hms(h, 0, 0)
        .unwrap()
        .assume_utc()
}

fn profile(curve: Curve, usage: MeterKeyUsage) -> MeterProfile {
    MeterProfile {
        system_title: [0x4d, 0x4d, 0x4d, 0x00, 0x00, 0xbc, 0x61, 0x4e],
        meter_serial: "MMM-12345678".into(),
        manufacturer: "Demo Meter Works".into(),
        usage,
        curve,
        not_after: None,
    }
}

/// A token with the demo hierarchy, its device CA loaded, and the PEM directory.
fn demo() -> (hsm::Hsm, Issuer, tempfile::TempDir) {
    let (_t, hsm) = token("certs", 2);
    with_demo_pki(hsm)
}

/// The same on a Kryoptic token.
fn demo_on_kryoptic() -> (hsm::Hsm, Issuer, tempfile::TempDir) {
    let t = hsm::testkit::TestToken::kryoptic("certs").unwrap();
    with_demo_pki(t.open(2).unwrap())
}

fn with_demo_pki(hsm: hsm::Hsm) -> (hsm::Hsm, Issuer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    hsm::pki::init_dev(&hsm, dir.path()).unwrap();
    let ca = hsm.with_session(|s| Issuer::load(s, "device-ca")).unwrap();
    (hsm, ca, dir)
}

fn ext<'a, T: Decode<'a, Error = der::Error>>(c: &'a Certificate, oid: &str) -> (bool, T) {
    let oid = der::oid::ObjectIdentifier::new_unwrap(oid);
    let e = c
        .tbs_certificate()
        .extensions()
        .unwrap()
        .iter()
        .find(|e| e.extn_id == oid)
        .unwrap_or_else(|| panic!("extension {oid} missing"));
    (e.critical, T::from_der(e.extn_value.as_bytes()).unwrap())
}

#[test]
fn meter_certificates_follow_the_profile_and_openssl_verifies_them() {
    let (hsm, ca, dir) = demo();
    meter_certificates_follow_the_profile(&hsm, &ca, &dir);
}

#[test]
fn on_kryoptic_meter_certificates_follow_the_profile_and_openssl_verifies_them() {
    let (hsm, ca, dir) = demo_on_kryoptic();
    meter_certificates_follow_the_profile(&hsm, &ca, &dir);
}

fn meter_certificates_follow_the_profile(hsm: &hsm::Hsm, ca: &Issuer, dir: &tempfile::TempDir) {
    for (curve, usage, seed, verification) in [
        (
            Curve::P256,
            MeterKeyUsage::DigitalSignature,
            "m1",
            Verification::Software,
        ),
        (
            Curve::P384,
            MeterKeyUsage::KeyAgreement,
            "m2",
            Verification::Software,
        ),
        (
            Curve::P256,
            MeterKeyUsage::KeyAgreement,
            "m3",
            Verification::Token,
        ),
        (
            Curve::P384,
            MeterKeyUsage::DigitalSignature,
            "m4",
            Verification::Token,
        ),
    ] {
        let ca = ca.clone().with_verification(verification);
        let key = SoftKey::new(curve, seed);
        // The request asks for another name and another usage: the profile decides.
        let mut req = rcgen::CertificateParams::default();
        req.distinguished_name = rcgen::DistinguishedName::new();
        req.distinguished_name
            .push(rcgen::DnType::CommonName, "meter chose this name");
        req.key_usages = vec![rcgen::KeyUsagePurpose::KeyEncipherment];
        let csr = csr_with(&key, &req);
        let p = profile(curve, usage);
        let issued = hsm
            .with_session(|s| issue_meter_certificate(s, &ca, &csr, &p))
            .unwrap();

        let c = Certificate::from_der(&issued.der).unwrap();
        let tbs = c.tbs_certificate();
        assert_eq!(
            tbs.subject().to_string(),
            "CN=4D4D4D0000BC614E,SERIALNUMBER=MMM-12345678,O=Demo Meter Works"
        );
        assert_eq!(
            tbs.issuer(),
            Certificate::from_der(&ca.cert_der)
                .unwrap()
                .tbs_certificate()
                .subject()
        );
        let serial = tbs.serial_number().as_bytes();
        assert_eq!(
            serial,
            issued.serial.as_slice(),
            "the serial is stored as parsed back"
        );
        assert_eq!(serial.len(), 16);
        assert!(serial[0] != 0 && serial[0] < 0x80, "positive, 16 octets");
        use sha2::Digest;
        assert_eq!(
            issued.sha256,
            <[u8; 32]>::from(sha2::Sha256::digest(&issued.der))
        );
        let not_after = tbs.validity().not_after;
        assert_eq!(not_after.to_der().unwrap()[0], 0x18, "GeneralizedTime");
        assert_eq!(
            not_after.to_unix_duration().as_secs(),
            253_402_300_799,
            "9999-12-31T23:59:59Z"
        );

        let (critical, ku): (bool, KeyUsage) = ext(&c, "2.5.29.15");
        assert!(critical);
        match usage {
            MeterKeyUsage::DigitalSignature => {
                assert!(ku.digital_signature() && !ku.key_agreement())
            }
            MeterKeyUsage::KeyAgreement => assert!(ku.key_agreement() && !ku.digital_signature()),
        }
        assert!(!ku.key_encipherment(), "nothing is copied from the request");
        let (critical, bc): (bool, BasicConstraints) = ext(&c, "2.5.29.19");
        assert!(critical && !bc.ca);
        let (_, ski): (bool, SubjectKeyIdentifier) = ext(&c, "2.5.29.14");
        assert_eq!(
            ski.0.as_bytes(),
            hsm::cert::key_identifier(&key.point()).as_slice()
        );
        let (_, aki): (bool, AuthorityKeyIdentifier) = ext(&c, "2.5.29.35");
        let ca_cert = Certificate::from_der(&ca.cert_der).unwrap();
        let (_, ca_ski): (bool, SubjectKeyIdentifier) = ext(&ca_cert, "2.5.29.14");
        assert_eq!(aki.key_identifier.unwrap().as_bytes(), ca_ski.0.as_bytes());
        assert_eq!(
            tbs.extensions().unwrap().len(),
            4,
            "ku, bc, ski, aki and nothing else"
        );

        let name = format!("meter-{seed}.pem");
        write(dir.path(), &name, issued.pem());
        let (ok, out) = openssl(
            dir.path(),
            &[
                "verify",
                "-CAfile",
                "root-ca.pem",
                "-untrusted",
                "device-ca.pem",
                &name,
            ],
        );
        assert!(ok && out.contains(": OK"), "{out}");
        let (ok, out) = openssl(dir.path(), &["x509", "-in", &name, "-noout", "-enddate"]);
        assert!(ok && out.contains("Dec 31 23:59:59 9999 GMT"), "{out}");
        // Against the wrong root, openssl refuses.
        let (ok, _) = openssl(
            dir.path(),
            &[
                "verify",
                "-CAfile",
                "provisioning-root.pem",
                "-untrusted",
                "device-ca.pem",
                &name,
            ],
        );
        assert!(!ok);
    }
}

#[test]
fn serials_are_unique_and_a_caller_can_choose_the_end_of_validity() {
    let (hsm, ca, _dir) = demo();
    let key = SoftKey::new(Curve::P256, "m3");
    let csr = meter_csr(&key);
    let mut p = profile(Curve::P256, MeterKeyUsage::DigitalSignature);
    p.not_after = Some(date(2045, time::Month::June, 30, 12));
    let a = hsm
        .with_session(|s| issue_meter_certificate(s, &ca, &csr, &p))
        .unwrap();
    let b = hsm
        .with_session(|s| issue_meter_certificate(s, &ca, &csr, &p))
        .unwrap();
    assert_ne!(a.serial, b.serial, "re-issuing gives a new serial");
    let c = Certificate::from_der(&a.der).unwrap();
    let not_after = c.tbs_certificate().validity().not_after;
    assert_eq!(not_after.to_unix_duration().as_secs(), 2_382_436_800);
    assert_eq!(not_after.to_der().unwrap()[0], 0x17, "UTCTime before 2050");
    p.not_after = Some(date(2001, time::Month::January, 1, 0));
    let e = hsm
        .with_session(|s| issue_meter_certificate(s, &ca, &csr, &p))
        .unwrap_err();
    assert!(matches!(e, Error::Profile(_)), "{e}");
}

#[test]
fn bad_requests_are_refused_each_with_its_own_error() {
    let (hsm, ca, _dir) = demo();
    for verification in [Verification::Software, Verification::Token] {
        bad_requests_are_refused(&hsm, &ca.clone().with_verification(verification));
    }
}

#[test]
fn on_kryoptic_bad_requests_are_refused_each_with_its_own_error() {
    let (hsm, ca, _dir) = demo_on_kryoptic();
    for verification in [Verification::Software, Verification::Token] {
        bad_requests_are_refused(&hsm, &ca.clone().with_verification(verification));
    }
}

fn bad_requests_are_refused(hsm: &hsm::Hsm, ca: &Issuer) {
    let p = profile(Curve::P256, MeterKeyUsage::DigitalSignature);
    let issue = |csr: &[u8]| hsm.with_session(|s| issue_meter_certificate(s, ca, csr, &p));
    let csr_err = |r: hsm::Result<hsm::IssuedCertificate>| match r {
        Err(Error::Csr(e)) => e,
        other => panic!("expected a request refusal, got {other:?}"),
    };
    let key = SoftKey::new(Curve::P256, "bad");

    // Proof of possession: a request whose signature does not verify.
    let mut tampered = meter_csr(&key);
    let n = tampered.len();
    tampered[n - 5] ^= 0x01;
    let e = csr_err(issue(&tampered));
    assert!(
        matches!(e, CsrError::BadSignature | CsrError::Malformed(_)),
        "{e}"
    );
    // A signature by another key over this request's body: still no proof of possession.
    let other = SoftKey::new(Curve::P256, "someone else");
    let good = meter_csr(&key);
    let req = x509_cert::request::CertReq::from_der(&good).unwrap();
    let body = req.info.to_der().unwrap();
    let sig = rcgen::SigningKey::sign(&other, &body).unwrap();
    let forged = x509_cert::request::CertReq {
        info: req.info.clone(),
        algorithm: req.algorithm.clone(),
        signature: der::asn1::BitString::from_bytes(&sig).unwrap(),
    }
    .to_der()
    .unwrap();
    assert_eq!(csr_err(issue(&forged)), CsrError::BadSignature);

    // The wrong curve.
    let p384 = SoftKey::new(Curve::P384, "wrong curve");
    let e = csr_err(issue(&meter_csr(&p384)));
    assert!(
        matches!(
            e,
            CsrError::WrongCurve {
                expected: "p-256",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("p-384"), "{e}");

    // A CA request.
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    assert_eq!(
        csr_err(issue(&csr_with(&key, &params))),
        CsrError::RequestsCa
    );

    // basicConstraints CA:FALSE is still an extension the profile does not take from requests.
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::ExplicitNoCa;
    let e = csr_err(issue(&csr_with(&key, &params)));
    assert!(
        matches!(e, CsrError::UnexpectedExtension { ref oid } if oid == "2.5.29.19"),
        "{e}"
    );

    // An unknown extension.
    let mut params = rcgen::CertificateParams::default();
    params
        .custom_extensions
        .push(rcgen::CustomExtension::from_oid_content(
            &[1, 3, 6, 1, 4, 1, 99999, 1],
            vec![0x05, 0x00],
        ));
    let e = csr_err(issue(&csr_with(&key, &params)));
    assert!(
        matches!(e, CsrError::UnexpectedExtension { ref oid } if oid == "1.3.6.1.4.1.99999.1"),
        "{e}"
    );

    // A subject alternative name.
    let params = rcgen::CertificateParams::new(vec!["meter.example".to_string()]).unwrap();
    let e = csr_err(issue(&csr_with(&key, &params)));
    assert!(
        matches!(e, CsrError::UnexpectedExtension { ref oid } if oid == "2.5.29.17"),
        "{e}"
    );

    // An attribute other than an extension request.
    let params = rcgen::CertificateParams::default();
    let challenge = rcgen::Attribute {
        oid: &[1, 2, 840, 113549, 1, 9, 7],
        values: vec![0x31, 0x05, 0x0c, 0x03, b'p', b'w', b'd'],
    };
    let csr = params
        .serialize_request_with_attributes(&key, vec![challenge])
        .unwrap();
    let e = csr_err(issue(csr.der()));
    assert!(matches!(e, CsrError::UnexpectedAttribute { .. }), "{e}");

    // Not a request at all.
    assert!(matches!(csr_err(issue(b"not der")), CsrError::Malformed(_)));
    assert!(matches!(
        csr_err(issue(&ca.cert_der)),
        CsrError::Malformed(_)
    ));

    // Profile inputs.
    let mut bad = p.clone();
    bad.meter_serial = "serial_with_underscore".into();
    let e = hsm
        .with_session(|s| issue_meter_certificate(s, ca, &good, &bad))
        .unwrap_err();
    assert!(matches!(e, Error::Profile(_)), "{e}");

    // Each message says what was wrong, in lower case.
    for e in [CsrError::BadSignature, CsrError::RequestsCa] {
        let m = e.to_string();
        assert!(m.starts_with(|c: char| c.is_lowercase()), "{m}");
    }
    // The check accepts the good one.
    assert!(check_csr(&good, Curve::P256).is_ok());
}

#[test]
fn an_issuer_must_hold_the_key_of_its_certificate() {
    let (hsm, ca, _dir) = demo();
    let other = hsm
        .with_session(|s| s.find_ec_keypair("manifest-signer"))
        .unwrap();
    let e = Issuer::new(other, ca.cert_der.clone()).unwrap_err();
    assert!(
        matches!(e, Error::Cert(CertError::KeyMismatch { .. })),
        "{e}"
    );
    let e = Issuer::new(ca.key.clone(), b"junk".to_vec()).unwrap_err();
    assert!(
        matches!(e, Error::Cert(CertError::NotACertificate(_))),
        "{e}"
    );
}

/// A certificate signature the token refuses surfaces as the token's error (operation, CKR),
/// not as the certificate library's "remote key error".
#[test]
fn a_failed_certificate_signature_names_the_token_error() {
    let (hsm, ca, _dir) = demo();
    let csr = meter_csr(&SoftKey::new(Curve::P256, "m9"));
    let p = profile(Curve::P256, MeterKeyUsage::DigitalSignature);
    // The CA's private key is gone from the token (deleted behind the station's back).
    hsm.with_session(|s| s.destroy(&ca.key.private)).unwrap();
    let e = hsm
        .with_session(|s| issue_meter_certificate(s, &ca, &csr, &p))
        .unwrap_err();
    let text = e.to_string();
    assert!(!text.to_lowercase().contains("remote key"), "{text}");
    assert!(text.contains("sign with CKM_ECDSA"), "{text}");
    assert!(text.contains("C_Sign"), "{text}");
}

#[test]
fn hsm_signer_serves_the_signature_traits() {
    use signature::{Keypair, Signer, Verifier};
    use spki::DynSignatureAlgorithmIdentifier;
    let (_t, hsm) = token("signer", 2);
    let pair = hsm
        .with_session(|s| {
            s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P256, Some("sig-256"))
        })
        .unwrap();
    let signer = hsm::HsmSigner::new(hsm.clone(), &pair).unwrap();
    let sig: p256::ecdsa::DerSignature = signer.try_sign(b"manifest.json bytes").unwrap();
    signer
        .verifying_key()
        .verify(b"manifest.json bytes", &sig)
        .unwrap();
    assert!(signer.verifying_key().verify(b"other bytes", &sig).is_err());
    let alg = signer.signature_algorithm_identifier().unwrap();
    assert_eq!(alg.oid.to_string(), "1.2.840.10045.4.3.2");
    assert!(alg.parameters.is_none());
    // P-384 keys are refused by the P-256 signer.
    let p384 = hsm
        .with_session(|s| {
            s.generate_ec_keypair(KeyRole::ManifestSigner, Curve::P384, Some("sig-384"))
        })
        .unwrap();
    assert!(hsm::HsmSigner::new(hsm.clone(), &p384).is_err());
    // By label.
    hsm.with_session(|s| {
        s.generate_ec_keypair(KeyRole::AuditSigner, Curve::P256, Some("audit-signer"))
    })
    .unwrap();
    let by_label = hsm::HsmSigner::from_label(&hsm, "audit-signer").unwrap();
    let sig: p256::ecdsa::DerSignature = by_label.try_sign(b"checkpoint").unwrap();
    by_label
        .verifying_key()
        .verify(b"checkpoint", &sig)
        .unwrap();
}

#[test]
fn the_token_verifies_signatures_too() {
    let (_t, hsm) = token("verify", 1);
    for curve in [Curve::P256, Curve::P384] {
        let pair = hsm
            .with_session(|s| s.generate_ec_keypair(KeyRole::MeterKeyPair, curve, None))
            .unwrap();
        let meter = SoftKey::new(curve, "verifier");
        let sig = rcgen::SigningKey::sign(&meter, b"body").unwrap();
        hsm.with_session(|s| {
            assert!(s.verify_with_point(curve, &meter.point(), b"body", &sig)?);
            assert!(!s.verify_with_point(curve, &meter.point(), b"other", &sig)?);
            assert!(
                !s.verify_with_point(curve, &pair.point, b"body", &sig)?,
                "another key"
            );
            assert!(!s.verify(&pair.public, b"body", b"not der")?);
            Ok(())
        })
        .unwrap();
    }
    // The imported keys were destroyed again.
    let publics = hsm::pki::info(&hsm)
        .unwrap()
        .objects
        .iter()
        .filter(|o| o.class == "public key")
        .count();
    assert_eq!(publics, 2, "only the two generated public keys remain");
}
