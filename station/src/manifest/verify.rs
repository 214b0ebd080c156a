//! `station manifest verify`: everything a utility checks before it trusts a manifest, with
//! nothing but the manufacturer's root certificate — no HSM, no cell.
//!
//! The CMS signature and its chain to the given root; the content against the schema; the device
//! CA against the root; every meter certificate against the device CA and the meter's record;
//! every attestation receipt against the meter's certificate and record; the counts; duplicate
//! UIDs, serials, system titles and certificate serials; the audit checkpoint's signature. Every
//! failure is reported, not just the first.
//!
//! The manifest may be large: the content is located inside the file buffer and parsed from
//! there, without a copy, and the per-meter signature checks run on every core.

use std::collections::HashMap;
use std::path::Path;

use der::{Decode, DecodePem, Encode};
use sha2::{Digest, Sha256};
use x509_cert::Certificate;
use x509_cert::ext::pkix::KeyUsage;

use super::der as d;
use super::model::*;
use line_protocol::msg::Lifecycle;
use line_protocol::receipt::Receipt;

/// The outcome of a verification.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Report {
    /// Every failure found, each naming what and where.
    pub failures: Vec<String>,
    /// Meters listed.
    pub meters: usize,
    /// Voided certificates listed.
    pub voided: usize,
    /// Work order.
    pub work_order: Option<String>,
    /// Customer.
    pub customer: Option<String>,
    /// Subject of the manifest signer.
    pub signer: Option<String>,
    /// SHA-256 of the content, hex.
    pub content_sha256: Option<String>,
    /// Audit checkpoint named.
    pub checkpoint_seq: Option<i64>,
    /// The trust anchors every meter received: "kind index sha256 subject".
    pub anchors: Vec<String>,
    /// The PSKC container the manifest names: checked against its SHA-256 when it lies beside
    /// the manifest (a mismatch is a failure), or why it was not checked.
    pub pskc: Option<String>,
}

impl Report {
    /// Nothing failed.
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.ok() {
            writeln!(f, "manifest VERIFIED")?;
        } else {
            writeln!(
                f,
                "manifest FAILED verification ({} problem(s)):",
                self.failures.len()
            )?;
            for x in &self.failures {
                writeln!(f, "  - {x}")?;
            }
        }
        if let Some(w) = &self.work_order {
            writeln!(
                f,
                "  batch {w}, customer {}",
                self.customer.as_deref().unwrap_or("?")
            )?;
        }
        writeln!(
            f,
            "  {} meters, {} voided certificates",
            self.meters, self.voided
        )?;
        if let Some(s) = &self.signer {
            writeln!(f, "  signed by {s}")?;
        }
        if let Some(p) = &self.pskc {
            writeln!(f, "  PSKC container {p}")?;
        }
        if !self.anchors.is_empty() {
            writeln!(
                f,
                "  trust anchors in every meter (SHA-256 of the certificate):"
            )?;
            for a in &self.anchors {
                writeln!(f, "    {a}")?;
            }
        }
        if let Some(c) = self.checkpoint_seq {
            write!(f, "  audit checkpoint at entry {c}")?;
        }
        Ok(())
    }
}

/// A manifest that verified, for import.
#[derive(Debug)]
pub struct Verified {
    /// The content.
    pub manifest: Manifest,
    /// The report (no failures).
    pub report: Report,
}

/// Reads a certificate file (PEM or DER).
pub fn read_cert(path: &Path) -> Result<Certificate, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    Certificate::from_der(&bytes)
        .or_else(|_| Certificate::from_pem(&bytes))
        .map_err(|_| {
            format!(
                "{} is not an X.509 certificate (PEM or DER)",
                path.display()
            )
        })
}

/// Verifies `p7m` against `root`; `Err` only when the file cannot be read.
pub fn verify_file(p7m: &Path, root: &Certificate) -> Result<(Report, Option<Manifest>), String> {
    let meta = std::fs::metadata(p7m).map_err(|e| format!("cannot read {}: {e}", p7m.display()))?;
    if meta.len() > (4u64 << 30) {
        return Err(format!(
            "{} is larger than 4 GiB; not a manifest",
            p7m.display()
        ));
    }
    let bytes = std::fs::read(p7m).map_err(|e| format!("cannot read {}: {e}", p7m.display()))?;
    let (mut r, manifest) = verify_bytes(&bytes, root);
    if let Some(p) = manifest.as_ref().and_then(|m| m.pskc.as_ref()) {
        check_pskc(p7m, p, &mut r);
    }
    Ok((r, manifest))
}

/// The PSKC container beside `p7m` has the SHA-256 the (signed) manifest names.
fn check_pskc(p7m: &Path, p: &PskcFile, r: &mut Report) {
    let plain =
        !p.file.is_empty() && !p.file.contains(['/', '\\']) && p.file != "." && p.file != "..";
    if !plain {
        r.failures.push(format!(
            "pskc: the file name {:?} is not a plain name",
            p.file
        ));
        return;
    }
    let path = p7m.with_file_name(&p.file);
    let hashed = std::fs::File::open(&path).and_then(|mut f| {
        use std::io::Read;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
        Ok(hex::encode(h.finalize()))
    });
    match hashed {
        Ok(h) if h == p.sha256 => {
            r.pskc = Some(format!("{}: its SHA-256 matches the manifest", p.file));
        }
        Ok(h) => r.failures.push(format!(
            "pskc: {} has SHA-256 {h}, the manifest names {}: the container was changed",
            p.file, p.sha256
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            r.pskc = Some(format!("{}: not beside the manifest, not checked", p.file));
        }
        Err(e) => r
            .failures
            .push(format!("pskc: cannot read {}: {e}", path.display())),
    }
}

/// Verifies a manifest held in memory.
pub fn verify_bytes(bytes: &[u8], root: &Certificate) -> (Report, Option<Manifest>) {
    let mut r = Report::default();
    let content = match check_envelope(bytes, root, &mut r) {
        Some(c) => c,
        None => return (r, None),
    };
    let manifest = check_manifest(content, root, &mut r);
    (r, manifest)
}

/// Checks the signed content of a manifest (the JSON inside the envelope): its form, and every
/// meter, certificate, key binding and anchor in it.
pub fn check_manifest(content: &[u8], root: &Certificate, r: &mut Report) -> Option<Manifest> {
    r.content_sha256 = Some(hex::encode(Sha256::digest(content)));
    let manifest: Manifest = match serde_json::from_slice(content) {
        Ok(m) => m,
        Err(e) => {
            r.failures
                .push(format!("schema: the content is not a valid manifest: {e}"));
            return None;
        }
    };
    for e in manifest.check_form() {
        r.failures.push(format!("schema: {}", e.0));
    }
    r.meters = manifest.meters.len();
    r.voided = manifest.voided_certificates.len();
    r.work_order = Some(manifest.batch.work_order.clone());
    r.customer = Some(manifest.customer.name.clone());
    r.anchors = manifest
        .trust_anchors
        .iter()
        .map(|a| format!("{} {} {} {}", a.kind, a.index, a.sha256, a.subject))
        .collect();
    r.checkpoint_seq = Some(manifest.audit_checkpoint.seq);
    if r.failures.iter().any(|f| f.starts_with("schema:")) {
        return Some(manifest);
    }
    check_content(&manifest, root, r);
    Some(manifest)
}

const ID_SIGNED_DATA: &str = "1.2.840.113549.1.7.2";
const ID_DATA: &str = "1.2.840.113549.1.7.1";
const ID_CONTENT_TYPE: &str = "1.2.840.113549.1.9.3";
const ID_MESSAGE_DIGEST: &str = "1.2.840.113549.1.9.4";
const ID_SHA256: &str = "2.16.840.1.101.3.4.2.1";
const ECDSA_SHA256: &str = "1.2.840.10045.4.3.2";
const ECDSA_SHA384: &str = "1.2.840.10045.4.3.3";

fn oid_of(t: &d::Tlv<'_>) -> Option<String> {
    <der::asn1::ObjectIdentifier>::from_der(t.raw)
        .ok()
        .map(|o| o.to_string())
}

/// Checks the CMS layer; returns the content if the signature is good.
fn check_envelope<'a>(bytes: &'a [u8], root: &Certificate, r: &mut Report) -> Option<&'a [u8]> {
    let mut fail = |m: String| {
        r.failures.push(m);
        None
    };
    match d::declared_size(bytes) {
        Some(n) if n > bytes.len() => {
            return fail(format!(
                "signature: the file is truncated: it has {} of the {n} bytes its encoding declares",
                bytes.len()
            ));
        }
        Some(n) if n < bytes.len() => {
            return fail(format!(
                "signature: the file has {} bytes after the signed data (extended or concatenated?)",
                bytes.len() - n
            ));
        }
        _ => {}
    }
    let walk = || -> Result<(&'a [u8], Vec<d::Tlv<'a>>, d::Tlv<'a>), d::DerError> {
        let ci = d::only(
            bytes,
            0x30,
            "the file is not one DER ContentInfo (truncated or extended?)",
        )?;
        let parts = d::children(ci.value)?;
        if parts.len() != 2
            || parts[1].tag != 0xA0
            || oid_of(&parts[0]).as_deref() != Some(ID_SIGNED_DATA)
        {
            return Err(d::DerError("the file is not a CMS SignedData"));
        }
        let sd = d::only(parts[1].value, 0x30, "SignedData is not a SEQUENCE")?;
        let f = d::children(sd.value)?;
        if f.len() < 4 {
            return Err(d::DerError("SignedData lacks fields"));
        }
        let eci = d::children(f[2].value)?;
        if eci.len() != 2 || oid_of(&eci[0]).as_deref() != Some(ID_DATA) || eci[1].tag != 0xA0 {
            return Err(d::DerError("the signed content is missing or not data"));
        }
        let octets = d::only(
            eci[1].value,
            0x04,
            "the signed content is not one OCTET STRING",
        )?;
        let certs = f
            .iter()
            .find(|t| t.tag == 0xA0)
            .map(|t| d::children(t.value))
            .transpose()?
            .unwrap_or_default();
        let infos = f
            .last()
            .copied()
            .filter(|t| t.tag == 0x31)
            .ok_or(d::DerError("no SignerInfos"))?;
        Ok((octets.value, certs, infos))
    };
    let (content, cert_tlvs, infos) = match walk() {
        Ok(x) => x,
        Err(e) => return fail(format!("signature: {}", e.0)),
    };
    let certs: Vec<Certificate> = cert_tlvs
        .iter()
        .filter_map(|t| Certificate::from_der(t.raw).ok())
        .collect();
    let infos = match d::children(infos.value) {
        Ok(i) if i.len() == 1 => i,
        _ => return fail("signature: expected exactly one signer".into()),
    };
    let si = infos[0];
    let fields = match d::children(si.value) {
        Ok(f) if f.len() >= 6 => f,
        _ => return fail("signature: the SignerInfo is malformed".into()),
    };
    let info = match cms::signed_data::SignerInfo::from_der(si.raw) {
        Ok(i) => i,
        Err(e) => return fail(format!("signature: the SignerInfo does not decode: {e}")),
    };
    if info.digest_alg.oid.to_string() != ID_SHA256 {
        return fail("signature: the digest algorithm is not SHA-256".into());
    }
    let Some(attrs) = &info.signed_attrs else {
        return fail("signature: no signed attributes".into());
    };
    let mut digest_ok = false;
    let mut type_ok = false;
    for a in attrs.iter() {
        let oid = a.oid.to_string();
        let v = a.values.iter().next();
        if oid == ID_MESSAGE_DIGEST {
            let got = v.and_then(|v| v.decode_as::<der::asn1::OctetString>().ok());
            digest_ok = got.is_some_and(|g| g.as_bytes() == Sha256::digest(content).as_slice());
        }
        if oid == ID_CONTENT_TYPE {
            type_ok = v
                .and_then(|v| v.decode_as::<der::asn1::ObjectIdentifier<39>>().ok())
                .is_some_and(|o| o.to_string() == ID_DATA);
        }
    }
    if !type_ok {
        return fail("signature: the content-type attribute is missing or not data".into());
    }
    if !digest_ok {
        return fail(
            "signature: the content does not match its signed digest (manifest.json was changed)"
                .into(),
        );
    }
    let signer = match &info.sid {
        cms::signed_data::SignerIdentifier::IssuerAndSerialNumber(ias) => certs.iter().find(|c| {
            c.tbs_certificate().serial_number() == &ias.serial_number
                && c.tbs_certificate().issuer() == &ias.issuer
        }),
        cms::signed_data::SignerIdentifier::SubjectKeyIdentifier(_) => None,
    };
    let Some(signer) = signer else {
        return fail("signature: the signer's certificate is not in the manifest".into());
    };
    r.signer = Some(signer.tbs_certificate().subject().to_string());
    // The signature covers the signed attributes as a SET OF (tag 0x31, not the [0] IMPLICIT).
    let Some(sa) = fields.iter().find(|f| f.tag == 0xA0) else {
        return fail("signature: the signed attributes are missing".into());
    };
    let mut signed = sa.raw.to_vec();
    signed[0] = 0x31;
    let alg = info.signature_algorithm.oid.to_string();
    if !verify_sig(signer, &alg, &signed, info.signature.as_bytes()) {
        return fail(
            "signature: the signature does not verify with the signer's certificate".into(),
        );
    }
    if let Ok(Some((_, ku))) = signer.tbs_certificate().get_extension::<KeyUsage>()
        && !ku.digital_signature()
    {
        return fail("signature: the signer's certificate may not sign".into());
    }
    if let Err(e) = chain_to_root(signer, &certs, root) {
        return fail(format!(
            "signature: the signer does not chain to the given root: {e}"
        ));
    }
    // Only the manifest signer signs manifests: a certificate the root issued itself, no CA,
    // carrying the role no other certificate of the cell has. A meter's signing certificate,
    // the audit or firmware signer's, all chain to the root too, and are refused here.
    if !hsm::cert::has_manifest_signing_role(signer) {
        return fail(format!(
            "signature: {} is not the manifest signer: its certificate lacks the manifest signer's extended key usage (id-kp-documentSigning, 1.3.6.1.5.5.7.3.36)",
            signer.tbs_certificate().subject()
        ));
    }
    if is_ca(signer) {
        return fail("signature: the signer's certificate is a CA's".into());
    }
    if !signed_by(signer, root) {
        return fail(format!(
            "signature: the signer {} was not issued by the given root itself",
            signer.tbs_certificate().subject()
        ));
    }
    Some(content)
}

/// basicConstraints cA.
fn is_ca(c: &Certificate) -> bool {
    c.tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::BasicConstraints>()
        .ok()
        .flatten()
        .is_some_and(|(_, bc)| bc.ca)
}

/// May `c` issue certificates: basicConstraints cA and, when it has a key usage, keyCertSign.
fn may_issue(c: &Certificate) -> bool {
    is_ca(c)
        && c.tbs_certificate()
            .get_extension::<KeyUsage>()
            .ok()
            .flatten()
            .is_none_or(|(_, ku)| ku.key_cert_sign())
}

/// Verifies `sig` (DER ECDSA) over `msg` with the key of `cert` and the algorithm `alg`.
fn verify_sig(cert: &Certificate, alg: &str, msg: &[u8], sig: &[u8]) -> bool {
    let spki = cert.tbs_certificate().subject_public_key_info();
    let Some(point) = spki.subject_public_key.as_bytes() else {
        return false;
    };
    match (alg, point.len()) {
        (ECDSA_SHA256, 65) => {
            use p256::ecdsa::signature::Verifier;
            let (Ok(k), Ok(s)) = (
                p256::ecdsa::VerifyingKey::from_sec1_bytes(point),
                p256::ecdsa::Signature::from_der(sig),
            ) else {
                return false;
            };
            k.verify(msg, &s).is_ok()
        }
        (ECDSA_SHA384, 97) => {
            use p384::ecdsa::signature::Verifier;
            let (Ok(k), Ok(s)) = (
                p384::ecdsa::VerifyingKey::from_sec1_bytes(point),
                p384::ecdsa::Signature::from_der(sig),
            ) else {
                return false;
            };
            k.verify(msg, &s).is_ok()
        }
        (ECDSA_SHA256, 97) => {
            // A P-384 issuer signing with SHA-256 is allowed by RFC 5758.
            use p384::ecdsa::signature::hazmat::PrehashVerifier;
            let (Ok(k), Ok(s)) = (
                p384::ecdsa::VerifyingKey::from_sec1_bytes(point),
                p384::ecdsa::Signature::from_der(sig),
            ) else {
                return false;
            };
            k.verify_prehash(&Sha256::digest(msg), &s).is_ok()
        }
        _ => false,
    }
}

/// Is `cert` signed by `issuer`?
fn signed_by(cert: &Certificate, issuer: &Certificate) -> bool {
    let Ok(tbs) = cert.tbs_certificate().to_der() else {
        return false;
    };
    let Some(sig) = cert.signature().as_bytes() else {
        return false;
    };
    cert.tbs_certificate().issuer() == issuer.tbs_certificate().subject()
        && verify_sig(
            issuer,
            &cert.signature_algorithm().oid.to_string(),
            &tbs,
            sig,
        )
}

pub(crate) fn chain_to_root(
    cert: &Certificate,
    pool: &[Certificate],
    root: &Certificate,
) -> Result<(), String> {
    let mut cur = cert.clone();
    for _ in 0..6 {
        if signed_by(&cur, root) {
            return Ok(());
        }
        match pool.iter().find(|c| *c != &cur && signed_by(&cur, c)) {
            // Every certificate on the way must be a CA that may sign certificates.
            Some(next) if !may_issue(next) => {
                return Err(format!(
                    "{} is not a CA (basicConstraints cA and keyUsage keyCertSign are required of an issuer)",
                    next.tbs_certificate().subject()
                ));
            }
            Some(next) if next.to_der().ok() != root.to_der().ok() => cur = next.clone(),
            _ => {
                return Err(format!(
                    "no path from {} to {}",
                    cur.tbs_certificate().subject(),
                    root.tbs_certificate().subject()
                ));
            }
        }
    }
    Err("the chain is longer than 6 certificates".into())
}

fn subject_attr(cert: &Certificate, oid: &str) -> Option<String> {
    for atv in cert.tbs_certificate().subject().iter() {
        if atv.oid.to_string() == oid {
            if let Ok(s) = atv.value.decode_as::<der::asn1::PrintableStringRef<'_>>() {
                return Some(s.to_string());
            }
            if let Ok(s) = atv.value.decode_as::<der::asn1::Utf8StringRef<'_>>() {
                return Some(s.to_string());
            }
        }
    }
    None
}

const CN: &str = "2.5.4.3";
const SERIAL_NUMBER: &str = "2.5.4.5";

/// Checks one meter; returns its problems.
fn check_meter(m: &MeterRecord, batch: &BatchInfo, fw_sha: &str, ca: &Certificate) -> Vec<String> {
    let model = batch.model.as_str();
    let at = format!("meter {} (uid {})", m.serial, m.uid);
    let mut out = Vec::new();
    if m.firmware_sha256 != fw_sha {
        out.push(format!(
            "{at}: runs firmware {} but the batch firmware is {}",
            &m.firmware_sha256, fw_sha
        ));
    }
    if m.model != model {
        out.push(format!(
            "{at}: model {} is not the batch model {model}",
            m.model
        ));
    }
    let mut sign_cert = None;
    let mut fps = Vec::new();
    for c in &m.certificates {
        let der = unb64(&c.der);
        let Ok(cert) = Certificate::from_der(&der) else {
            out.push(format!("{at}: the {} certificate does not parse", c.slot));
            continue;
        };
        if hex::encode(Sha256::digest(&der)) != c.sha256 {
            out.push(format!(
                "{at}: the {} certificate does not have its listed SHA-256",
                c.slot
            ));
        }
        if hex::encode(cert.tbs_certificate().serial_number().as_bytes()) != c.serial {
            out.push(format!(
                "{at}: the {} certificate's serial is not the listed one",
                c.slot
            ));
        }
        if !signed_by(&cert, ca) {
            out.push(format!(
                "{at}: the {} certificate is not signed by the device CA",
                c.slot
            ));
        }
        if subject_attr(&cert, CN).as_deref() != Some(m.system_title.as_str()) {
            out.push(format!(
                "{at}: the {} certificate is for another system title",
                c.slot
            ));
        }
        if subject_attr(&cert, SERIAL_NUMBER).as_deref() != Some(m.serial.as_str()) {
            out.push(format!(
                "{at}: the {} certificate is for another serial number",
                c.slot
            ));
        }
        let usage_ok = match cert.tbs_certificate().get_extension::<KeyUsage>() {
            Ok(Some((_, ku))) => {
                if c.slot == "sign" {
                    ku.digital_signature()
                } else {
                    ku.key_agreement()
                }
            }
            _ => false,
        };
        if !usage_ok {
            out.push(format!(
                "{at}: the {} certificate has the wrong key usage",
                c.slot
            ));
        }
        fps.push((
            if c.slot == "sign" { 1u8 } else { 2u8 },
            Sha256::digest(&der),
        ));
        if c.slot == "sign" {
            sign_cert = Some(cert);
        }
    }
    let Some(sign_cert) = sign_cert else {
        out.push(format!("{at}: no signing certificate"));
        return out;
    };
    let receipt = unb64(&m.attestation.receipt);
    let alg = if m.attestation.algorithm == "ecdsa-with-SHA384" {
        ECDSA_SHA384
    } else {
        ECDSA_SHA256
    };
    if !verify_sig(&sign_cert, alg, &receipt, &unb64(&m.attestation.signature)) {
        out.push(format!(
            "{at}: the attestation receipt is not signed by the meter's certificate"
        ));
        return out;
    }
    let Some(rc) = Receipt::decode(&receipt) else {
        out.push(format!("{at}: the attestation receipt is malformed"));
        return out;
    };
    if hex::encode(&rc.uid) != m.uid {
        out.push(format!(
            "{at}: the receipt names UID {}",
            hex::encode(&rc.uid)
        ));
    }
    if rc.serial != m.serial
        || hex::encode_upper(rc.system_title) != m.system_title
        || rc.ldn != m.logical_device_name
    {
        out.push(format!(
            "{at}: the receipt names another identity ({}, {})",
            rc.serial,
            hex::encode_upper(rc.system_title)
        ));
    }
    if rc.lifecycle != Lifecycle::Sealed {
        out.push(format!(
            "{at}: the receipt says lifecycle {}",
            rc.lifecycle.name()
        ));
    }
    if hex::encode(rc.fw_sha256) != m.firmware_sha256 {
        out.push(format!("{at}: the receipt names another firmware image"));
    }
    if let Some(required) = batch.interfaces_disabled
        && rc.disabled & required != required
    {
        out.push(format!(
            "{at}: the receipt says interfaces are still enabled that the model disables: {}",
            crate::engine::iface_names(required & !rc.disabled)
        ));
    }
    // Exactly the meter's certificates and the device CA's (slot 3), each once.
    let ca_fp = ca
        .to_der()
        .map(|d| Sha256::digest(&d).to_vec())
        .unwrap_or_default();
    if rc.certs.len() != fps.len() + 1
        || !rc
            .certs
            .iter()
            .any(|(s, f)| *s == 3 && f.as_slice() == ca_fp.as_slice())
    {
        out.push(format!(
            "{at}: the receipt lists {} certificates; the meter holds its {} and the device CA's",
            rc.certs.len(),
            fps.len()
        ));
    }
    for (slot, fp) in &fps {
        if !rc
            .certs
            .iter()
            .any(|(s, f)| s == slot && f.as_slice() == fp.as_slice())
        {
            out.push(format!(
                "{at}: the receipt does not list its certificate in slot {slot}"
            ));
        }
    }
    out
}

fn check_content(m: &Manifest, root: &Certificate, r: &mut Report) {
    let ca = match Certificate::from_der(&unb64(&m.device_ca.certificate)) {
        Ok(c) => c,
        Err(e) => {
            r.failures
                .push(format!("device CA: the certificate does not parse: {e}"));
            return;
        }
    };
    if !signed_by(&ca, root) {
        r.failures
            .push("device CA: not issued by the given root".into());
    }
    if !may_issue(&ca) {
        r.failures.push(
            "device CA: not a CA (basicConstraints cA and keyUsage keyCertSign are required)"
                .into(),
        );
    }
    // The anchors the meters received: the device CA above among them, one firmware anchor.
    if !m.trust_anchors.is_empty() {
        let ca_sha = hex::encode(line_protocol::crypto::sha256(&unb64(
            &m.device_ca.certificate,
        )));
        let count = |kind: &str| m.trust_anchors.iter().filter(|a| a.kind == kind).count();
        if count("device-ca") != 1
            || !m
                .trust_anchors
                .iter()
                .any(|a| a.kind == "device-ca" && a.sha256 == ca_sha)
        {
            r.failures.push(
                "trust anchors: the device CA the meters received is not the manifest's device CA"
                    .into(),
            );
        }
        if count("firmware-verification") != 1 {
            r.failures.push(
                "trust anchors: the meters did not receive exactly one firmware-verification anchor"
                    .into(),
            );
        }
    }
    // Counts.
    if m.meters.len() as i64 != m.batch.produced {
        r.failures.push(format!(
            "counts: {} meters listed but the batch says {} were produced",
            m.meters.len(),
            m.batch.produced
        ));
    }
    if m.batch.produced > m.batch.quantity {
        r.failures.push(format!(
            "counts: {} produced for an order of {}",
            m.batch.produced, m.batch.quantity
        ));
    }
    // Duplicates.
    let mut seen: HashMap<(&str, &str), &str> = HashMap::new();
    for mr in &m.meters {
        for (kind, v) in [
            ("UID", mr.uid.as_str()),
            ("serial", mr.serial.as_str()),
            ("system title", mr.system_title.as_str()),
        ] {
            if let Some(prev) = seen.insert((kind, v), mr.serial.as_str()) {
                r.failures.push(format!(
                    "duplicates: {kind} {v} appears for meters {prev} and {}",
                    mr.serial
                ));
            }
        }
        for c in &mr.certificates {
            if let Some(prev) = seen.insert(
                ("certificate serial", c.serial.as_str()),
                mr.serial.as_str(),
            ) {
                r.failures.push(format!(
                    "duplicates: certificate serial {} appears for {prev} and {}",
                    c.serial, mr.serial
                ));
            }
        }
        for k in &mr.keys {
            if let Some(prev) = seen.insert(("wrapped key", k.wrapped.as_str()), mr.serial.as_str())
            {
                r.failures.push(format!(
                    "duplicates: the same wrapped key is listed for {prev} and {}",
                    mr.serial
                ));
            }
        }
    }
    for v in &m.voided_certificates {
        if let Some(prev) = seen.get(&("certificate serial", v.serial.as_str())) {
            r.failures.push(format!(
                "duplicates: certificate serial {} is voided but delivered to {prev}",
                v.serial
            ));
        }
    }
    check_crl(m, &ca, r);
    // Per meter, on every core.
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 8);
    let chunk = m.meters.len().div_ceil(threads).max(1);
    let problems: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = m
            .meters
            .chunks(chunk)
            .map(|part| {
                let ca = &ca;
                s.spawn(move || {
                    part.iter()
                        .flat_map(|mr| check_meter(mr, &m.batch, &m.firmware.sha256, ca))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| {
                h.join()
                    .unwrap_or_else(|_| vec!["internal: a verification thread failed".into()])
            })
            .collect()
    });
    r.failures.extend(problems);
    // The audit checkpoint.
    match Certificate::from_der(&unb64(&m.audit_checkpoint.audit_certificate)) {
        Ok(ac) => {
            if !signed_by(&ac, root) {
                r.failures.push(
                    "audit checkpoint: the audit signer is not issued by the given root".into(),
                );
            }
            let point = ac
                .tbs_certificate()
                .subject_public_key_info()
                .subject_public_key
                .as_bytes()
                .unwrap_or_default();
            let spki = ac
                .tbs_certificate()
                .subject_public_key_info()
                .to_der()
                .unwrap_or_default();
            let ok = p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(|k| {
                    crate::audit::verify_note(
                        &m.audit_checkpoint.note,
                        &k,
                        &crate::audit::note_key_id(&spki),
                    )
                })
                .unwrap_or(false);
            if !ok {
                r.failures.push(
                    "audit checkpoint: the signed note does not verify with the audit signer"
                        .into(),
                );
            }
            if !m
                .audit_checkpoint
                .note
                .contains(&format!("\n{}\n", m.audit_checkpoint.seq))
            {
                r.failures
                    .push("audit checkpoint: the note is for another entry".into());
            }
        }
        Err(e) => r.failures.push(format!(
            "audit checkpoint: the certificate does not parse: {e}"
        )),
    }
}

/// The device CA's CRL: signed by the device CA, listing every voided certificate, and no
/// certificate of a meter this manifest delivers.
fn check_crl(m: &Manifest, ca: &Certificate, r: &mut Report) {
    let Some(b64) = &m.device_ca.crl else {
        if !m.voided_certificates.is_empty() {
            r.failures.push(
                "device CA: no CRL although certificates were voided (every verifier of them would still accept them)"
                    .into(),
            );
        }
        return;
    };
    let der = unb64(b64);
    let crl =
        match x509_cert::crl::CertificateList::<x509_cert::certificate::Rfc5280>::from_der(&der) {
            Ok(c) => c,
            Err(e) => {
                r.failures
                    .push(format!("device CA: the CRL does not parse: {e}"));
                return;
            }
        };
    let signed = crl.tbs_cert_list.to_der().unwrap_or_default();
    let ok = crl.tbs_cert_list.issuer == *ca.tbs_certificate().subject()
        && crl.signature.as_bytes().is_some_and(|sig| {
            verify_sig(ca, &crl.signature_algorithm.oid.to_string(), &signed, sig)
        });
    if !ok {
        r.failures
            .push("device CA: the CRL is not signed by the device CA".into());
        return;
    }
    let revoked: std::collections::HashSet<String> = crl
        .tbs_cert_list
        .revoked_certificates
        .iter()
        .flatten()
        .map(|rc| hex::encode(rc.serial_number.as_bytes()))
        .collect();
    for v in &m.voided_certificates {
        if !revoked.contains(&v.serial.to_lowercase()) {
            r.failures.push(format!(
                "device CA: voided certificate {} is missing from the CRL",
                v.serial
            ));
        }
    }
    for mr in &m.meters {
        for c in &mr.certificates {
            if revoked.contains(&c.serial.to_lowercase()) {
                r.failures.push(format!(
                    "device CA: the CRL revokes the {} certificate of {}, which the manifest delivers",
                    c.slot, mr.serial
                ));
            }
        }
    }
}
