//! PKI set-up: the demo hierarchy, the production CSR/import path, info, and roll-back.

use std::path::Path;

use hsm::pki::{self, CsrSubject};
use hsm::{CertError, Curve, Error, KeyRole};

use crate::util::{openssl, token, write};

fn verify(dir: &Path, ca: &str, cert: &str) -> (bool, String) {
    openssl(dir, &["verify", "-CAfile", ca, cert])
}

#[test]
fn init_dev_builds_the_whole_demo_hierarchy() {
    let (_t, hsm) = token("dev", 2);
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pki");
    let made = pki::init_dev(&hsm, &out).unwrap();
    for f in pki::DEV_FILES {
        assert!(out.join(f).is_file(), "{f} missing");
    }
    assert_eq!(made.files.len(), pki::DEV_FILES.len());
    assert!(made.to_string().contains("device-ca"));

    // Chains, as openssl sees them.
    for leaf in [
        "device-ca.pem",
        "manifest-signer.pem",
        "audit-signer.pem",
        "firmware-verification.pem",
    ] {
        let (ok, text) = verify(&out, "root-ca.pem", leaf);
        assert!(ok, "{leaf}: {text}");
    }
    let (ok, text) = verify(&out, "provisioning-root.pem", "station.pem");
    assert!(ok, "{text}");
    let (ok, _) = verify(&out, "root-ca.pem", "station.pem");
    assert!(!ok, "the station chains to the provisioning root only");
    let (ok, text) = openssl(&out, &["x509", "-in", "device-ca.pem", "-noout", "-text"]);
    assert!(
        ok && text.contains("CA:TRUE, pathlen:0") && text.contains("Certificate Sign, CRL Sign"),
        "{text}"
    );
    let (ok, text) = openssl(
        &out,
        &["x509", "-in", "audit-signer.pem", "-noout", "-text"],
    );
    assert!(
        ok && text.contains("CA:FALSE") && text.contains("Digital Signature"),
        "{text}"
    );

    // The demo firmware signing key belongs to the firmware verification certificate and is
    // owner-only.
    let (ok1, from_key) = openssl(
        &out,
        &["pkey", "-in", "firmware-signing-key.pem", "-pubout"],
    );
    let (ok2, from_cert) = openssl(
        &out,
        &[
            "x509",
            "-in",
            "firmware-verification.pem",
            "-noout",
            "-pubkey",
        ],
    );
    assert!(
        ok1 && ok2 && from_key == from_cert,
        "{from_key}\n{from_cert}"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(out.join("firmware-signing-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);

    // Certificates are in the token under their role labels, with the key pair's CKA_ID; the
    // demo firmware key is not.
    let report = pki::info(&hsm).unwrap();
    for label in [
        "manufacturer-root",
        "device-ca",
        "manifest-signer",
        "audit-signer",
        "provisioning-root",
        "station",
    ] {
        let objs: Vec<_> = report.objects.iter().filter(|o| o.label == label).collect();
        assert_eq!(objs.len(), 3, "{label}: {objs:?}");
        assert!(
            objs.iter().all(|o| o.id == objs[0].id && !o.id.is_empty()),
            "{label}: {objs:?}"
        );
        let private = objs.iter().find(|o| o.class == "private key").unwrap();
        let flags = private.flags.as_ref().unwrap();
        assert!(
            flags.sign && flags.sensitive && !flags.extractable && !flags.wrap && !flags.derive
        );
        assert_eq!(private.curve, Some(Curve::P256));
    }
    let fw: Vec<_> = report
        .objects
        .iter()
        .filter(|o| o.label == pki::FIRMWARE_LABEL)
        .collect();
    assert_eq!(fw.len(), 1);
    assert_eq!(fw[0].class, "certificate");
    let text = report.to_string();
    assert!(
        text.contains("CKM_AES_KEY_WRAP") && text.contains("role=DeviceCa"),
        "{text}"
    );
    assert!(pki::policy_table().contains("device-ca"));

    // A second run is refused and creates nothing.
    let before = pki::info(&hsm).unwrap().objects.len();
    let e = pki::init_dev(&hsm, &dir.path().join("again")).unwrap_err();
    assert!(matches!(e, Error::RoleExists { .. }), "{e}");
    assert_eq!(pki::info(&hsm).unwrap().objects.len(), before);
    assert!(!dir.path().join("again").exists());
}

#[test]
fn a_failed_init_dev_leaves_nothing_behind() {
    let (_t, hsm) = token("rollback", 1);
    let dir = tempfile::tempdir().unwrap();
    // The output "directory" is a file: writing fails after every key was generated.
    let not_a_dir = dir.path().join("file");
    std::fs::write(&not_a_dir, b"x").unwrap();
    let e = pki::init_dev(&hsm, &not_a_dir).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(
        pki::info(&hsm).unwrap().objects.is_empty(),
        "objects left behind"
    );

    // One PEM already exists: the files written before it are removed again, keys destroyed.
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("station.pem"), b"someone else's").unwrap();
    let e = pki::init_dev(&hsm, &out).unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
    assert!(
        pki::info(&hsm).unwrap().objects.is_empty(),
        "objects left behind"
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("station.pem")]);

    // And then it works.
    pki::init_dev(&hsm, &dir.path().join("ok")).unwrap();
}

/// An offline root made with openssl, as the security officer's ceremony would.
fn offline_root(dir: &Path, name: &str, curve: &str) {
    let (ok, text) = openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            &format!("ec_paramgen_curve:{curve}"),
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-subj",
            &format!("/O=Meter Works/CN={name}"),
            "-days",
            "3650",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    assert!(ok, "{text}");
}

fn sign_csr(dir: &Path, root: &str, csr: &str, out: &str, ext: &str) {
    write(dir, "ext.cnf", ext);
    let (ok, text) = openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            &format!("{root}.pem"),
            "-CAkey",
            &format!("{root}.key"),
            "-CAcreateserial",
            "-out",
            out,
            "-days",
            "3650",
            "-sha256",
            "-extfile",
            "ext.cnf",
        ],
    );
    assert!(ok, "{text}");
}

const CA_EXT: &str = "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n";
const LEAF_EXT: &str = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n";

#[test]
fn production_csr_and_import_through_an_offline_root() {
    let (_t, hsm) = token("prod", 2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    offline_root(d, "root", "P-256");

    let subject = CsrSubject {
        common_name: "Line 3 Device CA".into(),
        organization: Some("Meter Works".into()),
        country: Some("DE".into()),
    };
    let req = pki::csr(&hsm, KeyRole::DeviceCa, Curve::P256, &subject).unwrap();
    assert_eq!(req.label, "device-ca");
    write(d, "device-ca.csr", &req.pem);
    let (ok, text) = openssl(
        d,
        &[
            "req",
            "-in",
            "device-ca.csr",
            "-verify",
            "-noout",
            "-subject",
        ],
    );
    assert!(ok && text.contains("CN = Line 3 Device CA"), "{text}");
    assert!(req.to_string().contains("BEGIN CERTIFICATE REQUEST"));
    // A second request for the role is refused while its key exists.
    assert!(matches!(
        pki::csr(&hsm, KeyRole::DeviceCa, Curve::P256, &subject),
        Err(Error::RoleExists { .. })
    ));
    // Roots are not made this way.
    assert!(matches!(
        pki::csr(&hsm, KeyRole::ManufacturerRoot, Curve::P256, &subject),
        Err(Error::InvalidInput(_))
    ));

    sign_csr(d, "root", "device-ca.csr", "device-ca.pem", CA_EXT);
    let cert = std::fs::read_to_string(d.join("device-ca.pem")).unwrap();
    let root = std::fs::read_to_string(d.join("root.pem")).unwrap();
    let key = std::fs::read_to_string(d.join("root.key")).unwrap();
    let count = |hsm: &hsm::Hsm| {
        pki::info(hsm)
            .unwrap()
            .objects
            .iter()
            .filter(|o| o.class == "certificate")
            .count()
    };

    // Refusals first: nothing is stored by any of them.
    let refuse = |cert: &str, chain: &[String]| {
        pki::import(&hsm, KeyRole::DeviceCa, cert, chain).unwrap_err()
    };
    let e = refuse(&key, std::slice::from_ref(&root));
    assert!(
        matches!(e, Error::Cert(CertError::NotACertificate(_))),
        "{e}"
    );
    assert!(e.to_string().contains("PRIVATE KEY"), "{e}");
    let e = refuse(&cert, &[]);
    assert!(
        matches!(e, Error::Cert(CertError::ChainBroken { .. })),
        "{e}"
    );
    offline_root(d, "stranger", "P-256");
    let stranger = std::fs::read_to_string(d.join("stranger.pem")).unwrap();
    let e = refuse(&cert, std::slice::from_ref(&stranger));
    assert!(
        matches!(e, Error::Cert(CertError::ChainBroken { .. })),
        "{e}"
    );
    let e = refuse(&cert, std::slice::from_ref(&key));
    assert!(
        matches!(e, Error::Cert(CertError::NotACertificate(_))),
        "{e}"
    );
    // The same request signed as a leaf does not fit the device CA role.
    sign_csr(d, "root", "device-ca.csr", "as-leaf.pem", LEAF_EXT);
    let e = refuse(
        &std::fs::read_to_string(d.join("as-leaf.pem")).unwrap(),
        std::slice::from_ref(&root),
    );
    assert!(
        matches!(e, Error::Cert(CertError::RoleMismatch { .. })),
        "{e}"
    );
    // A certificate for another key (another request's) does not match the HSM key.
    write(d, "other.csr", pki_other_csr(d));
    sign_csr(d, "root", "other.csr", "other.pem", CA_EXT);
    let e = refuse(
        &std::fs::read_to_string(d.join("other.pem")).unwrap(),
        std::slice::from_ref(&root),
    );
    assert!(
        matches!(e, Error::Cert(CertError::KeyMismatch { .. })),
        "{e}"
    );
    // A key of the wrong curve.
    write(d, "p384.csr", pki_other_csr_curve(d, "P-384"));
    sign_csr(d, "root", "p384.csr", "p384.pem", CA_EXT);
    let e = refuse(
        &std::fs::read_to_string(d.join("p384.pem")).unwrap(),
        std::slice::from_ref(&root),
    );
    assert!(
        matches!(e, Error::Cert(CertError::WrongCurve { .. })),
        "{e}"
    );
    assert_eq!(count(&hsm), 0, "a refused import stored something");

    // The real one.
    let outcome = pki::import(&hsm, KeyRole::DeviceCa, &cert, std::slice::from_ref(&root)).unwrap();
    assert_eq!(outcome.chain.len(), 2);
    assert!(outcome.to_string().contains("device-ca"));
    assert_eq!(count(&hsm), 1);
    // Importing again is refused.
    assert!(matches!(
        pki::import(&hsm, KeyRole::DeviceCa, &cert, std::slice::from_ref(&root)),
        Err(Error::RoleExists { .. })
    ));

    // The imported CA issues meter certificates that openssl chains to the offline root.
    let ca = hsm
        .with_session(|s| hsm::Issuer::load(s, "device-ca"))
        .unwrap();
    let meter = crate::util::SoftKey::new(Curve::P256, "prod meter");
    let profile = hsm::MeterProfile {
        system_title: *b"MMM\x00\x01\x02\x03\x04",
        meter_serial: "P-0001".into(),
        manufacturer: "Meter Works".into(),
        usage: hsm::MeterKeyUsage::DigitalSignature,
        curve: Curve::P256,
        not_after: None,
    };
    let csr = crate::util::meter_csr(&meter);
    let issued = hsm
        .with_session(|s| hsm::cert::issue_meter_certificate(s, &ca, &csr, &profile))
        .unwrap();
    write(d, "meter.pem", issued.pem());
    let (ok, text) = openssl(
        d,
        &[
            "verify",
            "-CAfile",
            "root.pem",
            "-untrusted",
            "device-ca.pem",
            "meter.pem",
        ],
    );
    assert!(ok, "{text}");

    // A signer role: CSR, leaf certificate, import.
    let req = pki::csr(
        &hsm,
        KeyRole::AuditSigner,
        Curve::P256,
        &CsrSubject {
            common_name: "Audit".into(),
            organization: None,
            country: None,
        },
    )
    .unwrap();
    write(d, "audit.csr", &req.pem);
    sign_csr(d, "root", "audit.csr", "audit.pem", LEAF_EXT);
    let audit = std::fs::read_to_string(d.join("audit.pem")).unwrap();
    pki::import(&hsm, KeyRole::AuditSigner, &audit, &[root]).unwrap();
}

/// A request by a software key (made with openssl), for refusal tests.
fn pki_other_csr(d: &Path) -> String {
    pki_other_csr_curve(d, "P-256")
}

fn pki_other_csr_curve(d: &Path, curve: &str) -> String {
    let key = format!("other-{curve}.key");
    let (ok, text) = openssl(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            &format!("ec_paramgen_curve:{curve}"),
            "-nodes",
            "-keyout",
            &key,
            "-subj",
            "/CN=other",
        ],
    );
    assert!(ok, "{text}");
    text
}

#[test]
fn only_the_manifest_signer_carries_the_manifest_signing_role() {
    let (_t, hsm) = token("roles", 2);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    offline_root(d, "root", "P-256");
    let root = std::fs::read_to_string(d.join("root.pem")).unwrap();
    let subject = |cn: &str| CsrSubject {
        common_name: cn.into(),
        organization: Some("Meter Works".into()),
        country: None,
    };
    for (role, file) in [
        (KeyRole::ManifestSigner, "manifest"),
        (KeyRole::AuditSigner, "audit"),
    ] {
        let req = pki::csr(&hsm, role, Curve::P256, &subject(file)).unwrap();
        write(d, &format!("{file}.csr"), &req.pem);
        sign_csr(
            d,
            "root",
            &format!("{file}.csr"),
            &format!("{file}-plain.pem"),
            LEAF_EXT,
        );
        sign_csr(
            d,
            "root",
            &format!("{file}.csr"),
            &format!("{file}-role.pem"),
            &format!("{LEAF_EXT}extendedKeyUsage=1.3.6.1.5.5.7.3.36\n"),
        );
    }
    let read = |f: &str| std::fs::read_to_string(d.join(f)).unwrap();
    let chain = std::slice::from_ref(&root);
    // A manifest signer without the role: refused; an audit signer with it: refused.
    let e = pki::import(
        &hsm,
        KeyRole::ManifestSigner,
        &read("manifest-plain.pem"),
        chain,
    )
    .unwrap_err();
    assert!(e.to_string().contains("1.3.6.1.5.5.7.3.36"), "{e}");
    let e = pki::import(&hsm, KeyRole::AuditSigner, &read("audit-role.pem"), chain).unwrap_err();
    assert!(e.to_string().contains("no other role may have"), "{e}");
    // Each with what fits it: stored.
    pki::import(
        &hsm,
        KeyRole::ManifestSigner,
        &read("manifest-role.pem"),
        chain,
    )
    .unwrap();
    pki::import(&hsm, KeyRole::AuditSigner, &read("audit-plain.pem"), chain).unwrap();
    // The demo hierarchy gives the role to its manifest signer alone.
    let (_t2, demo) = token("roles-demo", 2);
    let out = d.join("demo");
    pki::init_dev(&demo, &out).unwrap();
    for f in [
        "manifest-signer.pem",
        "audit-signer.pem",
        "device-ca.pem",
        "station.pem",
        "firmware-verification.pem",
    ] {
        let (ok, text) = openssl(
            &out,
            &["x509", "-in", f, "-noout", "-ext", "extendedKeyUsage"],
        );
        let has = ok && text.contains("1.3.6.1.5.5.7.3.36");
        assert_eq!(has, f == "manifest-signer.pem", "{f}: {text}");
    }
}
