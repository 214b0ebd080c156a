//! PKI set-up of the cell's token: what `station pki init-dev`, `station pki csr`,
//! `station pki import` and `station hsm info` call.
//!
//! Objects are found by role through their CKA_LABEL; a key pair and its certificate share the
//! label and the CKA_ID:
//!
//! | label | objects |
//! | --- | --- |
//! | `manufacturer-root` | key pair (demo only) + self-signed CA certificate |
//! | `device-ca` | key pair + CA certificate (pathlen 0) issued by the manufacturer root |
//! | `manifest-signer` | key pair + certificate issued by the manufacturer root |
//! | `audit-signer` | key pair (sign-only) + certificate issued by the manufacturer root |
//! | `provisioning-root` | key pair (demo only) + self-signed CA certificate |
//! | `station` | key pair + certificate issued by the provisioning root |
//! | `firmware-verification` | certificate only (the signing key lives in the release process) |
//! | `customer-transport/<utility>` | a utility's RSA public key |
//! | `batch-transport/<batch>` | a batch's AES-256 transport key |
//!
//! Every function here either completes or leaves the token (and the output directory) as it
//! found them: what a failed call created is destroyed before the error is returned.
//!
//! This module does not decide who may call it (the station's permission table does) and does
//! not print: its results implement `Display`.

use std::fmt;
use std::path::{Path, PathBuf};

use der::{Decode, Encode};
use rcgen::{BasicConstraints, DnType, IsCa, KeyUsagePurpose};
use time::OffsetDateTime;
use x509_cert::Certificate;
use x509_cert::ext::pkix::{BasicConstraints as X509BasicConstraints, KeyUsage};

use crate::cert::{self, ID_CE_BASIC_CONSTRAINTS, ID_CE_KEY_USAGE, Issuer, key_identifier};
use crate::error::{CertError, Error, Result};
use crate::mechanisms::Mechanisms;
use crate::pool::{Hsm, TokenIdentity};
use crate::session::{Curve, HsmSession, KeyHandle, KeyKind, KeyPairHandle, ObjectInfo};
use crate::signer::SessionSigner;
use crate::{KeyRole, policy};

/// Organisation name used in the demo hierarchy.
pub const DEMO_ORGANIZATION: &str = "Demo Meter Works";
/// Label of the firmware verification certificate.
pub const FIRMWARE_LABEL: &str = "firmware-verification";
/// Label of the manufacturer root certificate (and, in the demo hierarchy only, its key).
pub const ROOT_LABEL: &str = "manufacturer-root";

/// The files `init_dev` writes, by name.
pub const DEV_FILES: [&str; 8] = [
    "root-ca.pem",
    "device-ca.pem",
    "manifest-signer.pem",
    "audit-signer.pem",
    "provisioning-root.pem",
    "station.pem",
    "firmware-verification.pem",
    "firmware-signing-key.pem",
];

/// What `init_dev` made.
#[derive(Debug, Clone)]
pub struct DevPki {
    /// The directory the PEM files were written to.
    pub out_dir: PathBuf,
    /// Every file written.
    pub files: Vec<PathBuf>,
    /// Every certificate made, by label: (label, subject, serial hex, SHA-256 hex).
    pub certificates: Vec<CertSummary>,
}

/// One certificate, for printing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// The label it is stored under.
    pub label: String,
    /// Its subject.
    pub subject: String,
    /// Its issuer.
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// SHA-256 fingerprint, hex.
    pub sha256: String,
}

impl fmt::Display for CertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<22} subject: {}\n{:<22} issuer:  {}\n{:<22} serial:  {}\n{:<22} sha-256: {}",
            self.label, self.subject, "", self.issuer, "", self.serial, "", self.sha256
        )
    }
}

impl fmt::Display for DevPki {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "demo pki written to {}", self.out_dir.display())?;
        for c in &self.certificates {
            writeln!(f, "{c}")?;
        }
        for file in &self.files {
            writeln!(f, "wrote {}", file.display())?;
        }
        Ok(())
    }
}

/// Undo log of a PKI operation: what to destroy and delete if it fails.
#[derive(Default)]
struct Undo {
    objects: Vec<KeyHandle>,
    files: Vec<PathBuf>,
}

impl Undo {
    fn pair(&mut self, pair: &KeyPairHandle) {
        self.objects.push(pair.private.clone());
        self.objects.push(pair.public.clone());
    }

    fn roll_back(self, s: &HsmSession<'_>) {
        for o in self.objects.iter().rev() {
            if let Err(e) = s.destroy(o) {
                tracing::error!(label = ?o.label(), error = %e, "could not remove an object after a failed pki operation");
            }
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Creates the complete demo hierarchy in a fresh token and writes the public certificates (and
/// the demo firmware signing key) as PEM into `out_dir`. Blocks; see the module table for
/// what is created.
pub fn init_dev(hsm: &Hsm, out_dir: &Path) -> Result<DevPki> {
    hsm.with_session(|s| {
        let mut undo = Undo::default();
        match init_dev_in(s, out_dir, &mut undo) {
            Ok(made) => Ok(made),
            Err(e) => {
                undo.roll_back(s);
                Err(e)
            }
        }
    })
}

const DEV_ROLES: [KeyRole; 6] = [
    KeyRole::ManufacturerRoot,
    KeyRole::DeviceCa,
    KeyRole::ManifestSigner,
    KeyRole::AuditSigner,
    KeyRole::ProvisioningRoot,
    KeyRole::StationIdentity,
];

fn init_dev_in(s: &HsmSession<'_>, out_dir: &Path, undo: &mut Undo) -> Result<DevPki> {
    // The token must be fresh for these roles.
    for role in DEV_ROLES {
        let label = role_label(role)?;
        ensure_absent(s, label)?;
    }
    ensure_absent(s, FIRMWARE_LABEL)?;

    let years = |n: i64| cert::now() + time::Duration::days(365 * n + n / 4);
    let mut pairs = Vec::new();
    for role in DEV_ROLES {
        let pair = s.generate_ec_keypair(role, Curve::P256, None)?;
        undo.pair(&pair);
        pairs.push(pair);
    }
    let [root, device_ca, manifest, audit, prov_root, station] =
        <[KeyPairHandle; 6]>::try_from(pairs)
            .map_err(|_| Error::InvalidInput("key pair count".into()))?;

    let root_der = build(
        s,
        &Spec::ca("Demo Manufacturer Root CA", None, years(30)),
        &root,
        None,
    )?;
    let root_issuer = Issuer::new(root.clone(), root_der.clone())?;
    let device_ca_der = build(
        s,
        &Spec::ca("Demo Device CA", Some(0), years(20)),
        &device_ca,
        Some(&root_issuer),
    )?;
    let manifest_der = build(
        s,
        &Spec::leaf("Demo Manifest Signer", years(10))
            .with_eku(&[&cert::MANIFEST_SIGNING_EKU_ARCS]),
        &manifest,
        Some(&root_issuer),
    )?;
    let audit_der = build(
        s,
        &Spec::leaf("Demo Audit Signer", years(10)),
        &audit,
        Some(&root_issuer),
    )?;
    let prov_der = build(
        s,
        &Spec::ca("Demo Provisioning Root", Some(0), years(30)),
        &prov_root,
        None,
    )?;
    let prov_issuer = Issuer::new(prov_root.clone(), prov_der.clone())?;
    let station_der = build(
        s,
        &Spec::leaf("Demo Station", years(10)),
        &station,
        Some(&prov_issuer),
    )?;

    // The firmware signing key of the demo release process: a software key, from the token's
    // RNG, written out for the demo's image signing; the cell keeps only its certificate.
    let fw_secret = software_p256_key(s)?;
    let fw_point = {
        use p256::elliptic_curve::sec1::ToSec1Point;
        fw_secret
            .public_key()
            .to_sec1_point(false)
            .as_bytes()
            .to_vec()
    };
    let fw_key = SoftwarePublic {
        point: fw_point.clone(),
    };
    let fw_der = build_for(
        s,
        &Spec::leaf("Demo Firmware Signing", years(10)).with_eku(&[&cert::CODE_SIGNING_EKU_ARCS]),
        &fw_key,
        &root_issuer,
    )?;
    let fw_pem = {
        use p256::pkcs8::EncodePrivateKey;
        fw_secret
            .to_pkcs8_pem(p256::pkcs8::LineEnding::LF)
            .map_err(|e| Error::Encoding(e.to_string()))?
    };

    let certs: [(&str, &[u8], &[u8]); 7] = [
        ("root-ca.pem", &root_der, &root.id),
        ("device-ca.pem", &device_ca_der, &device_ca.id),
        ("manifest-signer.pem", &manifest_der, &manifest.id),
        ("audit-signer.pem", &audit_der, &audit.id),
        ("provisioning-root.pem", &prov_der, &prov_root.id),
        ("station.pem", &station_der, &station.id),
        ("firmware-verification.pem", &fw_der, &[]),
    ];
    let labels = [
        role_label(KeyRole::ManufacturerRoot)?,
        role_label(KeyRole::DeviceCa)?,
        role_label(KeyRole::ManifestSigner)?,
        role_label(KeyRole::AuditSigner)?,
        role_label(KeyRole::ProvisioningRoot)?,
        role_label(KeyRole::StationIdentity)?,
        FIRMWARE_LABEL,
    ];

    std::fs::create_dir_all(out_dir)
        .map_err(|e| Error::io("create the output directory", out_dir, e))?;
    let mut files = Vec::new();
    let mut write = |name: &str, contents: &[u8], secret: bool| -> Result<()> {
        let path = out_dir.join(name);
        write_new_file(&path, contents, secret)?;
        undo.files.push(path.clone());
        files.push(path);
        Ok(())
    };
    for (name, der, _) in &certs {
        write(name, cert::to_pem("CERTIFICATE", der).as_bytes(), false)?;
    }
    write("firmware-signing-key.pem", fw_pem.as_bytes(), true)?;

    let mut summaries = Vec::new();
    for ((_, der, id), label) in certs.iter().zip(labels) {
        let id = if id.is_empty() {
            key_identifier(&fw_point)
        } else {
            id.to_vec()
        };
        let h = s.import_certificate(label, &id, der, true)?;
        undo.objects.push(h);
        summaries.push(summary(label, der)?);
    }
    Ok(DevPki {
        out_dir: out_dir.to_owned(),
        files,
        certificates: summaries,
    })
}

fn ensure_absent(s: &HsmSession<'_>, label: &str) -> Result<()> {
    if s.find_key(KeyKind::EcPrivate(Curve::P256), label)?
        .is_some()
    {
        return Err(Error::RoleExists {
            label: label.to_owned(),
            what: "private key",
        });
    }
    if s.find_certificate(label)?.is_some() {
        return Err(Error::RoleExists {
            label: label.to_owned(),
            what: "certificate",
        });
    }
    Ok(())
}

fn role_label(role: KeyRole) -> Result<&'static str> {
    role.label()
        .ok_or_else(|| Error::InvalidInput(format!("{role:?} has no token label")))
}

/// Writes a new file (never overwrites); `secret` files are created owner-only.
fn write_new_file(path: &Path, contents: &[u8], secret: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(path)
        .map_err(|e| Error::io("create", path, e))?;
    f.write_all(contents)
        .map_err(|e| Error::io("write", path, e))
}

/// A P-256 software key from the token's RNG (for the demo firmware signer only).
fn software_p256_key(s: &HsmSession<'_>) -> Result<p256::SecretKey> {
    for _ in 0..8 {
        let bytes = zeroize::Zeroizing::new(s.random(32)?);
        if let Ok(k) = p256::SecretKey::from_slice(&bytes) {
            return Ok(k);
        }
    }
    Err(Error::InvalidInput(
        "the token's random numbers never made a valid p-256 key".into(),
    ))
}

struct SoftwarePublic {
    point: Vec<u8>,
}

impl rcgen::PublicKeyData for SoftwarePublic {
    fn der_bytes(&self) -> &[u8] {
        &self.point
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// What a CA or leaf certificate of the demo hierarchy looks like.
struct Spec<'a> {
    cn: &'a str,
    ca: Option<Option<u8>>,
    not_after: OffsetDateTime,
    /// Extended key usages, as arcs.
    eku: &'a [&'a [u64]],
}

impl<'a> Spec<'a> {
    fn ca(cn: &'a str, path_len: Option<u8>, not_after: OffsetDateTime) -> Self {
        Spec {
            cn,
            ca: Some(path_len),
            not_after,
            eku: &[],
        }
    }

    fn leaf(cn: &'a str, not_after: OffsetDateTime) -> Self {
        Spec {
            cn,
            ca: None,
            not_after,
            eku: &[],
        }
    }

    /// A leaf certificate with these extended key usages.
    fn with_eku(mut self, eku: &'a [&'a [u64]]) -> Self {
        self.eku = eku;
        self
    }

    fn params(&self, s: &HsmSession<'_>, point: &[u8]) -> Result<rcgen::CertificateParams> {
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, DEMO_ORGANIZATION);
        p.distinguished_name.push(DnType::CommonName, self.cn);
        p.not_before = cert::now();
        p.not_after = self.not_after;
        p.serial_number = Some(rcgen::SerialNumber::from_slice(&cert::random_serial(s)?));
        p.key_identifier_method = rcgen::KeyIdMethod::PreSpecified(key_identifier(point));
        match self.ca {
            Some(path_len) => {
                p.is_ca = IsCa::Ca(match path_len {
                    Some(n) => BasicConstraints::Constrained(n),
                    None => BasicConstraints::Unconstrained,
                });
                p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            }
            None => {
                p.is_ca = IsCa::ExplicitNoCa;
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
            }
        }
        p.extended_key_usages = self
            .eku
            .iter()
            .map(|arcs| rcgen::ExtendedKeyUsagePurpose::Other(arcs.to_vec()))
            .collect();
        Ok(p)
    }
}

/// A certificate for `pair`, self-signed when `issuer` is `None`.
fn build(
    s: &HsmSession<'_>,
    spec: &Spec<'_>,
    pair: &KeyPairHandle,
    issuer: Option<&Issuer>,
) -> Result<Vec<u8>> {
    match issuer {
        Some(issuer) => build_for(s, spec, &SessionSigner::new(s, pair), issuer),
        None => {
            let params = spec.params(s, &pair.point)?;
            let cert = params
                .self_signed(&SessionSigner::new(s, pair))
                .map_err(crate::signer::rcgen_error)?;
            Ok(cert::parse_and_verify(cert.der(), pair.curve, &pair.point)?.der)
        }
    }
}

/// A certificate for the public key `subject`, issued by `issuer`.
fn build_for(
    s: &HsmSession<'_>,
    spec: &Spec<'_>,
    subject: &impl rcgen::PublicKeyData,
    issuer: &Issuer,
) -> Result<Vec<u8>> {
    let mut params = spec.params(s, subject.der_bytes())?;
    params.use_authority_key_identifier_extension = true;
    let cert = params
        .signed_by(subject, &issuer.rcgen_issuer(s))
        .map_err(crate::signer::rcgen_error)?;
    Ok(cert::parse_and_verify(cert.der(), issuer.key.curve, &issuer.key.point)?.der)
}

fn summary(label: &str, der: &[u8]) -> Result<CertSummary> {
    let c = cert::parse_der(der)?;
    use sha2::Digest;
    Ok(CertSummary {
        label: label.to_owned(),
        subject: c.tbs_certificate().subject().to_string(),
        issuer: c.tbs_certificate().issuer().to_string(),
        serial: hex::encode(c.tbs_certificate().serial_number().as_bytes()),
        sha256: hex::encode(sha2::Sha256::digest(der)),
    })
}

// ----- production path: CSR out, certificate in ---------------------------------------------

/// Subject of a production CSR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrSubject {
    /// CN.
    pub common_name: String,
    /// O.
    pub organization: Option<String>,
    /// C (two letters).
    pub country: Option<String>,
}

/// A PKCS#10 request made by an HSM key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrOutput {
    /// The role the key is for.
    pub role: KeyRole,
    /// The key's label.
    pub label: String,
    /// CKA_ID of the key pair (hex in `Display`).
    pub key_id: Vec<u8>,
    /// The key's curve.
    pub curve: Curve,
    /// The request, DER.
    pub der: Vec<u8>,
    /// The request, PEM.
    pub pem: String,
}

impl fmt::Display for CsrOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "# {} key {} (generated in the hsm), id {}",
            self.label,
            self.curve.name(),
            hex::encode(&self.key_id)
        )?;
        f.write_str(&self.pem)
    }
}

/// Roles whose keys are certified by the offline root (`csr` and `import`).
pub const PRODUCTION_ROLES: [KeyRole; 4] = [
    KeyRole::DeviceCa,
    KeyRole::ManifestSigner,
    KeyRole::AuditSigner,
    KeyRole::StationIdentity,
];

fn check_production_role(role: KeyRole) -> Result<&'static str> {
    if !PRODUCTION_ROLES.contains(&role) {
        return Err(Error::InvalidInput(format!(
            "{role:?} keys are not certified through a request; the roles are device-ca, manifest-signer, audit-signer and station"
        )));
    }
    role_label(role)
}

/// A request for the key pair of `role` that is already in the token (made with the HSM
/// vendor's tools, labelled as the role), for the offline root: adopted only if its private key
/// carries the policy's attributes (a token object, sensitive, not extractable, sign only) and
/// no certificate is stored for the role yet. Blocks.
pub fn csr_adopting(hsm: &Hsm, role: KeyRole, subject: &CsrSubject) -> Result<CsrOutput> {
    let label = check_production_role(role)?;
    let params = csr_params(subject)?;
    hsm.with_session(|s| {
        if s.find_certificate(label)?.is_some() {
            return Err(Error::RoleExists {
                label: label.to_owned(),
                what: "certificate",
            });
        }
        let pair = s.find_ec_keypair(label)?;
        let wrong = policy::policy(role)
            .key
            .mismatches(&s.key_flags(&pair.private)?);
        if !wrong.is_empty() {
            return Err(Error::PolicyNotKept {
                operation: "adopt",
                details: format!("the private key labelled {label:?}: {}", wrong.join(", ")),
            });
        }
        let req = params
            .serialize_request(&SessionSigner::new(s, &pair))
            .map_err(crate::signer::rcgen_error)?;
        Ok(CsrOutput {
            role,
            label: label.to_owned(),
            key_id: pair.id.clone(),
            curve: pair.curve,
            der: req.der().to_vec(),
            pem: cert::to_pem("CERTIFICATE REQUEST", req.der()),
        })
    })
}

/// The subject of a request.
fn csr_params(subject: &CsrSubject) -> Result<rcgen::CertificateParams> {
    let mut dn = rcgen::DistinguishedName::new();
    if let Some(c) = &subject.country {
        let c = rcgen::string::PrintableString::try_from(c.as_str())
            .ok()
            .filter(|_| c.len() == 2)
            .ok_or_else(|| {
                Error::InvalidInput(format!("country {c:?} is not a two-letter code"))
            })?;
        dn.push(DnType::CountryName, rcgen::DnValue::PrintableString(c));
    }
    if let Some(o) = &subject.organization {
        dn.push(DnType::OrganizationName, o.as_str());
    }
    if subject.common_name.trim().is_empty() || subject.common_name.len() > 64 {
        return Err(Error::InvalidInput(
            "the common name must have 1 to 64 characters".into(),
        ));
    }
    dn.push(DnType::CommonName, subject.common_name.as_str());
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = dn;
    Ok(params)
}

/// Generates the key of `role` in the HSM (a token object per the policy table) and returns a
/// PKCS#10 request signed by it, for the offline root. Blocks.
pub fn csr(hsm: &Hsm, role: KeyRole, curve: Curve, subject: &CsrSubject) -> Result<CsrOutput> {
    let label = check_production_role(role)?;
    let params = csr_params(subject)?;
    hsm.with_session(|s| {
        ensure_absent(s, label)?;
        let pair = s.generate_ec_keypair(role, curve, None)?;
        let made = params
            .serialize_request(&SessionSigner::new(s, &pair))
            .map_err(crate::signer::rcgen_error);
        match made {
            Ok(req) => Ok(CsrOutput {
                role,
                label: label.to_owned(),
                key_id: pair.id.clone(),
                curve,
                der: req.der().to_vec(),
                pem: cert::to_pem("CERTIFICATE REQUEST", req.der()),
            }),
            Err(e) => {
                let _ = s.destroy(&pair.private);
                let _ = s.destroy(&pair.public);
                Err(e)
            }
        }
    })
}

/// What `import` stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportOutcome {
    /// The certificate stored.
    pub certificate: CertSummary,
    /// Subjects of the chain up to the self-signed root, leaf first.
    pub chain: Vec<String>,
}

impl fmt::Display for ImportOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "imported {}", self.certificate)?;
        for (i, s) in self.chain.iter().enumerate() {
            writeln!(f, "  chain[{i}]: {s}")?;
        }
        Ok(())
    }
}

/// Checks a certificate from the offline root for `role` and stores it in the token: its key
/// must be the role's HSM key, it must chain through `chain_pems` to a self-signed root with
/// every signature verified, and its basic constraints and key usage must fit the role. Blocks.
pub fn import(
    hsm: &Hsm,
    role: KeyRole,
    cert_pem: &str,
    chain_pems: &[String],
) -> Result<ImportOutcome> {
    let label = check_production_role(role)?;
    let (leaf_der, leaf) = parse_one_pem(cert_pem)?;
    let mut chain = Vec::new();
    for pem in chain_pems {
        chain.extend(parse_pem_bundle(pem)?);
    }
    check_role_fit(role, label, &leaf)?;
    let subjects = check_chain(&leaf, &chain)?;
    hsm.with_session(|s| {
        let pair = s.find_ec_keypair(label)?;
        let (curve, point) = cert::ec_key_of(leaf.tbs_certificate().subject_public_key_info())?;
        if curve != pair.curve {
            return Err(CertError::WrongCurve {
                expected: pair.curve.name().into(),
                found: curve.name().into(),
            }
            .into());
        }
        if point != pair.point {
            return Err(CertError::KeyMismatch { role: label.into() }.into());
        }
        s.import_certificate(label, &pair.id, &leaf_der, true)?;
        Ok(ImportOutcome {
            certificate: summary(label, &leaf_der)?,
            chain: subjects.clone(),
        })
    })
}

fn parse_one_pem(pem: &str) -> Result<(Vec<u8>, Certificate)> {
    let (label, der) = der::pem::decode_vec(pem.trim().as_bytes())
        .map_err(|e| CertError::NotACertificate(format!("not pem: {e}")))?;
    if label != "CERTIFICATE" {
        return Err(CertError::NotACertificate(format!(
            "the pem block is a {label}, not a CERTIFICATE"
        ))
        .into());
    }
    let cert = cert::parse_der(&der)?;
    Ok((der, cert))
}

fn parse_pem_bundle(pem: &str) -> Result<Vec<Certificate>> {
    let text = pem.trim();
    if !text.starts_with("-----BEGIN CERTIFICATE-----") {
        return Err(CertError::NotACertificate(
            "a chain file must hold CERTIFICATE pem blocks".into(),
        )
        .into());
    }
    Certificate::load_pem_chain(text.as_bytes())
        .map_err(|e| CertError::NotACertificate(e.to_string()).into())
}

fn basic_constraints(c: &Certificate) -> Result<Option<X509BasicConstraints>> {
    extension(c, &ID_CE_BASIC_CONSTRAINTS)
}

fn key_usage(c: &Certificate) -> Result<Option<KeyUsage>> {
    extension(c, &ID_CE_KEY_USAGE)
}

fn extension<'a, T: Decode<'a, Error = der::Error>>(
    c: &'a Certificate,
    oid: &der::oid::ObjectIdentifier,
) -> Result<Option<T>> {
    let Some(ext) = c
        .tbs_certificate()
        .extensions()
        .and_then(|e| e.iter().find(|e| &e.extn_id == oid))
    else {
        return Ok(None);
    };
    T::from_der(ext.extn_value.as_bytes())
        .map(Some)
        .map_err(|e| CertError::NotACertificate(format!("malformed extension {oid}: {e}")).into())
}

fn check_role_fit(role: KeyRole, label: &str, c: &Certificate) -> Result<()> {
    let mismatch = |reason: &str| -> Error {
        CertError::RoleMismatch {
            role: label.to_owned(),
            reason: reason.to_owned(),
        }
        .into()
    };
    if c.tbs_certificate().subject() == c.tbs_certificate().issuer() {
        return Err(mismatch(
            "it is self-signed; it must be issued by the offline root",
        ));
    }
    let is_ca = basic_constraints(c)?.is_some_and(|b| b.ca);
    let ku = key_usage(c)?;
    // The manifest signer's role is its own: required of it, refused on any other.
    match (
        role == KeyRole::ManifestSigner,
        cert::has_manifest_signing_role(c),
    ) {
        (true, false) => {
            return Err(mismatch(
                "a manifest signer's certificate must carry the extended key usage id-kp-documentSigning (1.3.6.1.5.5.7.3.36), the role every manifest verifier requires",
            ));
        }
        (false, true) => {
            return Err(mismatch(
                "it carries the manifest signer's extended key usage (id-kp-documentSigning), which no other role may have",
            ));
        }
        _ => {}
    }
    if role == KeyRole::DeviceCa {
        if !is_ca {
            return Err(mismatch(
                "basicConstraints ca:true is required for a device ca",
            ));
        }
        if !ku.is_some_and(|k| k.key_cert_sign()) {
            return Err(mismatch("keyUsage keyCertSign is required for a device ca"));
        }
    } else {
        if is_ca {
            return Err(mismatch(
                "it is a ca certificate; this role signs, it does not issue",
            ));
        }
        if !ku.is_some_and(|k| k.digital_signature()) {
            return Err(mismatch("keyUsage digitalSignature is required"));
        }
    }
    Ok(())
}

/// Walks from `leaf` through `chain` to a self-signed root, verifying every signature.
fn check_chain(leaf: &Certificate, chain: &[Certificate]) -> Result<Vec<String>> {
    let name_der = |n: &x509_cert::name::Name| n.to_der().unwrap_or_default();
    let mut subjects = vec![leaf.tbs_certificate().subject().to_string()];
    let mut current = leaf;
    for _ in 0..8 {
        let issuer_name = name_der(current.tbs_certificate().issuer());
        let subject = current.tbs_certificate().subject().to_string();
        let issuer = chain.iter().find(|c| {
            name_der(c.tbs_certificate().subject()) == issuer_name
                && cert::ec_key_of(c.tbs_certificate().subject_public_key_info()).is_ok_and(
                    |(curve, point)| cert::verify_signed_by(current, curve, &point).is_ok(),
                )
        });
        let Some(issuer) = issuer else {
            return Err(CertError::ChainBroken { subject }.into());
        };
        let issuer_subject = issuer.tbs_certificate().subject().to_string();
        let is_ca = basic_constraints(issuer)?.is_some_and(|b| b.ca);
        let may_sign = key_usage(issuer)?.is_none_or(|k| k.key_cert_sign());
        if !is_ca || !may_sign {
            return Err(CertError::IssuerNotCa {
                subject: issuer_subject,
            }
            .into());
        }
        subjects.push(issuer_subject);
        let self_signed = issuer.tbs_certificate().subject() == issuer.tbs_certificate().issuer();
        if self_signed {
            let (curve, point) =
                cert::ec_key_of(issuer.tbs_certificate().subject_public_key_info())?;
            cert::verify_signed_by(issuer, curve, &point)?;
            return Ok(subjects);
        }
        current = issuer;
    }
    Err(CertError::ChainBroken {
        subject: current.tbs_certificate().subject().to_string(),
    }
    .into())
}

// ----- the cell's anchors ----------------------------------------------------------------------

/// The anchors the cell installs into every meter, checked against the manufacturer root at
/// start-up: the device CA (a CA with keyCertSign) and the firmware-verification certificate (an
/// end-entity certificate with id-kp-codeSigning), each issued by the self-signed root `root`
/// itself with a verifying signature. A token whose objects were swapped for others that do not
/// chain to the root is refused before any meter sees them.
pub fn check_cell_anchors(root: &[u8], device_ca: &[u8], firmware: &[u8]) -> Result<()> {
    let root = Root::parse(root)?;
    let ca = parse_anchor("device CA", device_ca)?;
    root.issued(role_label(KeyRole::DeviceCa)?, &ca)?;
    if !basic_constraints(&ca)?.is_some_and(|b| b.ca)
        || !key_usage(&ca)?.is_some_and(|k| k.key_cert_sign())
    {
        return Err(CertError::IssuerNotCa {
            subject: ca.tbs_certificate().subject().to_string(),
        }
        .into());
    }
    check_firmware_anchor(&root, &parse_anchor("firmware verification", firmware)?)
}

fn parse_anchor(what: &str, der: &[u8]) -> Result<Certificate> {
    Certificate::from_der(der)
        .map_err(|e| CertError::NotACertificate(format!("the {what} certificate: {e}")).into())
}

/// A manufacturer root: self-signed, its signature verifying with its own key.
struct Root {
    cert: Certificate,
    curve: Curve,
    point: Vec<u8>,
}

impl Root {
    fn parse(der: &[u8]) -> Result<Root> {
        let cert = parse_anchor("manufacturer root", der)?;
        let (curve, point) = cert::ec_key_of(cert.tbs_certificate().subject_public_key_info())?;
        if cert.tbs_certificate().subject() != cert.tbs_certificate().issuer()
            || cert::verify_signed_by(&cert, curve, &point).is_err()
        {
            return Err(CertError::ChainBroken {
                subject: cert.tbs_certificate().subject().to_string(),
            }
            .into());
        }
        Ok(Root { cert, curve, point })
    }

    /// `c` (of the role `what`) is issued by this root itself.
    fn issued(&self, what: &str, c: &Certificate) -> Result<()> {
        if c.tbs_certificate().issuer() != self.cert.tbs_certificate().subject()
            || cert::verify_signed_by(c, self.curve, &self.point).is_err()
        {
            return Err(CertError::RoleMismatch {
                role: what.to_owned(),
                reason: format!(
                    "{:?} is not issued by the manufacturer root {:?}",
                    c.tbs_certificate().subject().to_string(),
                    self.cert.tbs_certificate().subject().to_string()
                ),
            }
            .into());
        }
        Ok(())
    }
}

/// The firmware-verification certificate: issued by the root itself, an end entity with
/// id-kp-codeSigning and no other role's mark.
fn check_firmware_anchor(root: &Root, fw: &Certificate) -> Result<()> {
    root.issued(FIRMWARE_LABEL, fw)?;
    let mismatch = |reason: &str| -> Error {
        CertError::RoleMismatch {
            role: FIRMWARE_LABEL.to_owned(),
            reason: reason.to_owned(),
        }
        .into()
    };
    if basic_constraints(fw)?.is_some_and(|b| b.ca) {
        return Err(mismatch(
            "it is a ca certificate; it must be an end-entity certificate",
        ));
    }
    if !cert::has_eku(fw, cert::CODE_SIGNING_EKU) {
        return Err(mismatch(
            "it lacks the extended key usage id-kp-codeSigning (1.3.6.1.5.5.7.3.3), the firmware signer's role",
        ));
    }
    if cert::has_manifest_signing_role(fw) {
        return Err(mismatch(
            "it carries the manifest signer's extended key usage, which no other role may have",
        ));
    }
    Ok(())
}

/// A certificate the cell holds without its key: the manufacturer root (the anchor every check
/// at start-up leads to) or the firmware-verification certificate (what meters check firmware
/// against; its key signs releases offline).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anchor {
    /// `manufacturer-root`.
    ManufacturerRoot,
    /// `firmware-verification`.
    FirmwareVerification,
}

impl Anchor {
    /// Its token label.
    pub fn label(self) -> &'static str {
        match self {
            Anchor::ManufacturerRoot => ROOT_LABEL,
            Anchor::FirmwareVerification => FIRMWARE_LABEL,
        }
    }
}

/// Stores an anchor certificate in the token while a cell is set up. The manufacturer root must
/// be self-signed, a CA that may sign certificates; it is stored once and never replaced (the
/// same certificate again is accepted). The firmware-verification certificate must be issued by
/// the root already in the token, fit its role (id-kp-codeSigning, no CA) and hold a P-256 key
/// (what meters verify); it is stored once too. Blocks.
pub fn import_anchor(hsm: &Hsm, anchor: Anchor, cert_pem: &str) -> Result<ImportOutcome> {
    let (der, parsed) = parse_one_pem(cert_pem)?;
    let label = anchor.label();
    hsm.with_session(|s| {
        let subjects = match anchor {
            Anchor::ManufacturerRoot => {
                let root = Root::parse(&der)?;
                if !basic_constraints(&root.cert)?.is_some_and(|b| b.ca)
                    || !key_usage(&root.cert)?.is_some_and(|k| k.key_cert_sign())
                {
                    return Err(CertError::IssuerNotCa {
                        subject: root.cert.tbs_certificate().subject().to_string(),
                    }
                    .into());
                }
                vec![root.cert.tbs_certificate().subject().to_string()]
            }
            Anchor::FirmwareVerification => {
                let root_der = s.find_certificate(ROOT_LABEL)?.ok_or_else(|| {
                    Error::InvalidInput(
                        "the token holds no manufacturer root yet: import it first (`station pki import --role manufacturer-root --local`)".into(),
                    )
                })?;
                let root = Root::parse(&root_der)?;
                check_firmware_anchor(&root, &parsed)?;
                let (curve, _) = cert::ec_key_of(parsed.tbs_certificate().subject_public_key_info())?;
                if curve != Curve::P256 {
                    return Err(CertError::WrongCurve {
                        expected: Curve::P256.name().into(),
                        found: curve.name().into(),
                    }
                    .into());
                }
                vec![
                    parsed.tbs_certificate().subject().to_string(),
                    root.cert.tbs_certificate().subject().to_string(),
                ]
            }
        };
        match s.find_certificate(label)? {
            Some(existing) if existing == der => {}
            Some(_) => {
                return Err(Error::RoleExists {
                    label: label.to_owned(),
                    what: "different certificate (an anchor is never replaced)",
                });
            }
            None => {
                let (_, point) =
                    cert::ec_key_of(parsed.tbs_certificate().subject_public_key_info())?;
                s.import_certificate(label, &key_identifier(&point), &der, true)?;
            }
        }
        Ok(ImportOutcome {
            certificate: summary(label, &der)?,
            chain: subjects,
        })
    })
}

/// A signer of the cell (the audit signer, the manifest signer) checked against the manufacturer
/// root at start-up: its certificate `cert` is issued by the root `root` itself, is no CA, fits
/// the role (`role` is its policy role; the manifest signer's id-kp-documentSigning is required
/// of it and refused on any other), and certifies the key the token holds for the role (`point`,
/// SEC1). A key pair swapped in the token, or a certificate that no longer matches it, is refused
/// before anything is signed with it.
pub fn check_cell_signer(root: &[u8], role: KeyRole, cert: &[u8], point: &[u8]) -> Result<()> {
    let label = role_label(role)?;
    let parsed = Certificate::from_der(cert)
        .map_err(|e| CertError::NotACertificate(format!("the {label} certificate: {e}")))?;
    let root_c = Certificate::from_der(root)
        .map_err(|e| CertError::NotACertificate(format!("the manufacturer root: {e}")))?;
    let (curve, rpoint) = cert::ec_key_of(root_c.tbs_certificate().subject_public_key_info())?;
    if parsed.tbs_certificate().issuer() != root_c.tbs_certificate().subject()
        || cert::verify_signed_by(&parsed, curve, &rpoint).is_err()
    {
        return Err(CertError::RoleMismatch {
            role: label.to_owned(),
            reason: "it is not issued by the manufacturer root".into(),
        }
        .into());
    }
    check_role_fit(role, label, &parsed)?;
    let (_, p) = cert::ec_key_of(parsed.tbs_certificate().subject_public_key_info())?;
    if p != point {
        return Err(CertError::KeyMismatch {
            role: label.to_owned(),
        }
        .into());
    }
    Ok(())
}

// ----- info ------------------------------------------------------------------------------------

/// What `station hsm info` prints: nothing secret.
#[derive(Debug, Clone)]
pub struct TokenReport {
    /// The token.
    pub token: TokenIdentity,
    /// Mechanisms found and chosen.
    pub mechanisms: Mechanisms,
    /// Objects in the token.
    pub objects: Vec<ObjectInfo>,
}

impl fmt::Display for TokenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let t = &self.token;
        writeln!(f, "token:        {}", t.label)?;
        writeln!(f, "manufacturer: {}", t.manufacturer)?;
        writeln!(f, "model:        {}", t.model)?;
        writeln!(f, "serial:       {}", t.serial)?;
        writeln!(f, "chosen:       {}", self.mechanisms.chosen())?;
        writeln!(f, "mechanisms:   {}", self.mechanisms.listed.join(" "))?;
        writeln!(f, "objects:")?;
        for o in &self.objects {
            let role = KeyRole::from_label(&o.label)
                .or_else(|| o.label.split('/').next().and_then(KeyRole::from_label))
                .map(|r| format!("{r:?}"))
                .unwrap_or_else(|| "-".into());
            writeln!(f, "  {o}  role={role}")?;
        }
        Ok(())
    }
}

/// Describes the token: identity, mechanisms, objects by label. Blocks.
pub fn info(hsm: &Hsm) -> Result<TokenReport> {
    let objects = hsm.with_session(|s| s.list_objects())?;
    Ok(TokenReport {
        token: hsm.token().clone(),
        mechanisms: hsm.mechanisms().clone(),
        objects,
    })
}

/// The policy table as text, for `station hsm info --policy` and reviews.
pub fn policy_table() -> String {
    let mut out = String::from(
        "role                     label              token sensitive extractable usage (key) / usage (public)\n",
    );
    for row in &policy::POLICY {
        let u = |u: policy::Usage| {
            let names = [
                (u.sign, "sign"),
                (u.verify, "verify"),
                (u.wrap, "wrap"),
                (u.unwrap, "unwrap"),
                (u.derive, "derive"),
                (u.encrypt, "encrypt"),
                (u.decrypt, "decrypt"),
            ];
            let on: Vec<&str> = names.iter().filter(|(b, _)| *b).map(|(_, n)| *n).collect();
            if on.is_empty() {
                "-".to_owned()
            } else {
                on.join(",")
            }
        };
        out.push_str(&format!(
            "{:<24} {:<18} {:<5} {:<9} {:<11} {} / {}\n",
            format!("{:?}", row.role),
            row.label.unwrap_or("(session)"),
            row.key.token,
            row.key.sensitive,
            row.key.extractable,
            u(row.key.usage),
            row.public.map(|p| u(p.usage)).unwrap_or_else(|| "-".into()),
        ));
    }
    out
}
