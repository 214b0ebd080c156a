//! The manifest's content, `manifest.json`, as Rust types.
//!
//! These types are the executable form of `schemas/manifest.schema.json`: deserialising refuses
//! unknown fields, and [`Manifest::check_form`] checks every pattern the schema states (hex and
//! base64 fields, enumerations, lengths). The tests validate real exports against the JSON Schema
//! with an independent validator, so the two cannot drift apart unnoticed.

use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// `format` of every manifest.
pub const FORMAT: &str = "cell-batch-manifest";
/// The version this code writes and reads.
pub const VERSION: u32 = 1;

/// The whole manifest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u32,
    /// 16 random bytes, hex: tells two exports of a batch apart.
    pub manifest_id: String,
    /// When it was made (RFC 3339, UTC).
    pub created_at: String,
    /// The station that made it.
    pub station: StationInfo,
    /// The manufacturer.
    pub manufacturer: ManufacturerInfo,
    /// The batch.
    pub batch: BatchInfo,
    /// The firmware release every meter runs.
    pub firmware: FirmwareInfo,
    /// The utility the keys are for.
    pub customer: CustomerInfo,
    /// The batch transport key, wrapped for the utility.
    pub transport_key: TransportKey,
    /// The same keys as a PSKC container (RFC 6030) beside the manifest, for a utility's HSM
    /// import tools. Absent in manifests of earlier exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pskc: Option<PskcFile>,
    /// The CA that issued the meter certificates.
    pub device_ca: DeviceCa,
    /// The trust anchors every meter of the batch received, pinned when the batch opened, in
    /// the order they were installed. Absent in manifests of earlier exports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_anchors: Vec<TrustAnchor>,
    /// Every meter produced.
    pub meters: Vec<MeterRecord>,
    /// Certificates issued to meters that failed: never to be trusted.
    pub voided_certificates: Vec<VoidedCertificate>,
    /// The audit checkpoint that covers the batch.
    pub audit_checkpoint: AuditCheckpoint,
}

/// The PSKC container of the batch's keys (`keys.pskc`, [`super::pskc`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PskcFile {
    /// Its file name, beside the manifest.
    pub file: String,
    /// SHA-256 of the file, hex: the manifest's signature covers the container through it.
    pub sha256: String,
    /// What the container calls the transport key (`ds:KeyName`).
    pub transport_key_name: String,
}

/// The station.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct StationInfo {
    /// Station id.
    pub id: String,
    /// Software and version.
    pub software: String,
}

/// The manufacturer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ManufacturerInfo {
    /// Name.
    pub name: String,
    /// DLMS FLAG ID.
    pub flag_id: String,
}

/// The batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchInfo {
    /// Id in the cell's journal.
    pub id: i64,
    /// Work order.
    pub work_order: String,
    /// Meter model.
    pub model: String,
    /// Meters ordered.
    pub quantity: i64,
    /// Meters produced (listed under `meters`).
    pub produced: i64,
    /// Meters that failed.
    pub failed: i64,
    /// First serial of the range.
    pub serial_first: String,
    /// Last serial of the range.
    pub serial_last: String,
    /// Opened.
    pub opened_at: String,
    /// By.
    pub opened_by: String,
    /// Closed.
    pub closed_at: String,
    /// By.
    pub closed_by: String,
    /// The interfaces every meter had to disable when it sealed (line-protocol bits: 1 the jig
    /// interface, 2 debug, 4 optical), checked against each receipt. Absent in manifests of
    /// earlier exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interfaces_disabled: Option<u16>,
}

/// The firmware release.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FirmwareInfo {
    /// Version from the image header.
    pub version: String,
    /// SHA-256 of the image file, hex.
    pub sha256: String,
    /// Size in bytes.
    pub size: i64,
    /// SHA-256 of the signing key's SubjectPublicKeyInfo, hex.
    pub signer_key_sha256: String,
}

/// The utility.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CustomerInfo {
    /// Name as known to the cell.
    pub name: String,
    /// SHA-256 of its certificate (DER), hex.
    pub certificate_sha256: String,
    /// SHA-256 of its public key (SubjectPublicKeyInfo DER), hex.
    pub public_key_sha256: String,
}

/// The batch transport key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TransportKey {
    /// "AES-256".
    pub algorithm: String,
    /// "RSA-OAEP".
    pub wrapping: String,
    /// OAEP hash: "sha1" or "sha256".
    pub oaep_hash: String,
    /// MGF1 hash: "sha1" or "sha256".
    pub mgf1_hash: String,
    /// The OAEP label the key was wrapped with: the batch's work order (UTF-8), on tokens that
    /// take labels. Absent: the empty label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub oaep_label: Option<String>,
    /// The key wrapped for the utility's certificate, base64.
    pub wrapped: String,
    /// Key check value (first 3 bytes of AES-ECB of a zero block), hex.
    pub kcv: String,
}

/// The device CA.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceCa {
    /// Its certificate, DER, base64.
    pub certificate: String,
    /// Its CRL at the export, listing every certificate the cell voided (DER, base64; the same
    /// bytes as `voided.crl` beside the manifest). Absent in manifests of earlier exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<String>,
}

/// A trust anchor installed into every meter of the batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TrustAnchor {
    /// "device-ca", "firmware-verification", "utility-ca" or "utility-client".
    pub kind: String,
    /// Its index among the meter's anchors of its kind.
    pub index: u8,
    /// SHA-256 of the certificate's DER, hex.
    pub sha256: String,
    /// The certificate's subject.
    pub subject: String,
}

/// The kinds of [`TrustAnchor`].
pub const ANCHOR_KINDS: [&str; 4] = [
    "device-ca",
    "firmware-verification",
    "utility-ca",
    "utility-client",
];

/// One meter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MeterRecord {
    /// Serial number.
    pub serial: String,
    /// Hardware UID, hex.
    pub uid: String,
    /// DLMS system title, 16 upper-case hex digits.
    pub system_title: String,
    /// COSEM logical device name.
    pub logical_device_name: String,
    /// Model.
    pub model: String,
    /// SHA-256 of the firmware it runs, hex.
    pub firmware_sha256: String,
    /// Nest it was provisioned in.
    pub nest: i64,
    /// Operator on the line.
    pub operator: String,
    /// Started.
    pub started_at: String,
    /// Finished.
    pub finished_at: String,
    /// Its certificates.
    pub certificates: Vec<CertificateEntry>,
    /// Its secret keys, wrapped.
    pub keys: Vec<KeyEntry>,
    /// The signed receipt.
    pub attestation: Attestation,
}

/// A meter certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CertificateEntry {
    /// "sign" or "ka".
    pub slot: String,
    /// Serial, hex.
    pub serial: String,
    /// SHA-256 of the DER, hex.
    pub sha256: String,
    /// DER, base64.
    pub der: String,
}

/// A wrapped secret key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyEntry {
    /// "guek", "gbek", "ak" or "kek".
    pub id: String,
    /// "aes-128" or "aes-256".
    #[serde(rename = "type")]
    pub key_type: String,
    /// "aes-kw" (RFC 3394 under the transport key).
    pub wrap: String,
    /// Wrapped key, base64.
    pub wrapped: String,
    /// Key check value, hex.
    pub kcv: String,
    /// The key's binding to this meter and key id: the first 16 bytes of SHA-256 over
    /// [`key_binding_prefix`] and the key, hex. The key's reader recomputes it.
    pub binding: String,
}

/// What precedes the key in its binding: `"cell-key-binding-v1" NUL ‖ system title (8 bytes) ‖
/// key id NUL`.
pub fn key_binding_prefix(system_title: &[u8], key_id: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(40);
    v.extend_from_slice(b"cell-key-binding-v1\0");
    v.extend_from_slice(system_title);
    v.extend_from_slice(key_id.as_bytes());
    v.push(0);
    v
}

/// The binding of `key` (clear, as a reader holds it after unwrapping) to a meter and key id.
pub fn key_binding(system_title: &[u8], key_id: &str, key: &[u8]) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(key_binding_prefix(system_title, key_id));
    h.update(key);
    hex::encode(&h.finalize()[..16])
}

/// The attestation receipt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Attestation {
    /// Receipt bytes, base64 (layout in `schemas/line-protocol.md`).
    pub receipt: String,
    /// ECDSA signature (DER), base64.
    pub signature: String,
    /// "ecdsa-with-SHA256" or "ecdsa-with-SHA384".
    pub algorithm: String,
}

/// A voided certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VoidedCertificate {
    /// Serial, hex.
    pub serial: String,
    /// "sign" or "ka".
    pub slot: String,
    /// UID of the meter it was meant for.
    pub meter_uid: String,
    /// Serial of that meter, if one was assigned (present, `null` when none was).
    #[serde(deserialize_with = "Option::deserialize")]
    pub meter_serial: Option<String>,
    /// Why.
    pub reason: String,
    /// SHA-256 of the DER, if it was issued (present, `null` when it was not).
    #[serde(deserialize_with = "Option::deserialize")]
    pub sha256: Option<String>,
}

/// The audit checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuditCheckpoint {
    /// Entries it covers.
    pub seq: i64,
    /// The C2SP signed note.
    pub note: String,
    /// The audit signer's certificate, DER, base64.
    pub audit_certificate: String,
}

/// A form problem, naming where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormError(pub String);

fn hex_of(s: &str, bytes: Option<usize>) -> bool {
    s.len().is_multiple_of(2)
        && s.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        && bytes.is_none_or(|n| s.len() == 2 * n)
}

/// 1 to `max` printable ASCII characters: the `str8` strings of the line protocol.
fn printable(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len()) && s.bytes().all(|b| (0x20..=0x7E).contains(&b))
}

fn b64(s: &str) -> bool {
    !s.is_empty() && base64::engine::general_purpose::STANDARD.decode(s).is_ok()
}

/// An RFC 3339 date-time as the schema's pattern states it (upper-case `T` and `Z`), and a real
/// calendar date.
fn rfc3339(s: &str) -> bool {
    s.as_bytes().get(10) == Some(&b'T')
        && !s.contains('z')
        && time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).is_ok()
}

impl Manifest {
    /// Checks every pattern of the schema; returns every problem found.
    pub fn check_form(&self) -> Vec<FormError> {
        let mut e = Vec::new();
        let mut need = |ok: bool, what: String| {
            if !ok {
                e.push(FormError(what));
            }
        };
        need(
            self.format == FORMAT,
            format!("format is {:?}, not {FORMAT:?}", self.format),
        );
        need(
            self.version == VERSION,
            format!("version {} is not {VERSION}", self.version),
        );
        need(
            hex_of(&self.manifest_id, Some(16)),
            "manifest_id is not 16 bytes of hex".into(),
        );
        need(
            rfc3339(&self.created_at),
            "created_at is not an RFC 3339 time".into(),
        );
        need(!self.station.id.is_empty(), "station.id is empty".into());
        need(
            self.manufacturer.flag_id.len() == 3
                && self
                    .manufacturer
                    .flag_id
                    .chars()
                    .all(|c| c.is_ascii_uppercase()),
            "manufacturer.flag_id is not three upper-case letters".into(),
        );
        let b = &self.batch;
        need(
            b.quantity >= 1 && b.produced >= 0 && b.failed >= 0,
            "batch counts are negative or zero quantity".into(),
        );
        for (n, t) in [("opened_at", &b.opened_at), ("closed_at", &b.closed_at)] {
            need(rfc3339(t), format!("batch.{n} is not an RFC 3339 time"));
        }
        need(
            hex_of(&self.firmware.sha256, Some(32)),
            "firmware.sha256 is not 32 bytes of hex".into(),
        );
        need(
            hex_of(&self.firmware.signer_key_sha256, Some(32)),
            "firmware.signer_key_sha256 is not 32 bytes of hex".into(),
        );
        need(
            hex_of(&self.customer.certificate_sha256, Some(32)),
            "customer.certificate_sha256 is not 32 bytes of hex".into(),
        );
        need(
            hex_of(&self.customer.public_key_sha256, Some(32)),
            "customer.public_key_sha256 is not 32 bytes of hex".into(),
        );
        let t = &self.transport_key;
        need(
            t.algorithm == "AES-256",
            "transport_key.algorithm is not AES-256".into(),
        );
        need(
            t.wrapping == "RSA-OAEP",
            "transport_key.wrapping is not RSA-OAEP".into(),
        );
        need(
            matches!(t.oaep_hash.as_str(), "sha1" | "sha256"),
            "transport_key.oaep_hash is not sha1 or sha256".into(),
        );
        need(
            matches!(t.mgf1_hash.as_str(), "sha1" | "sha256"),
            "transport_key.mgf1_hash is not sha1 or sha256".into(),
        );
        if let Some(label) = &t.oaep_label {
            need(
                *label == self.batch.work_order,
                format!(
                    "transport_key.oaep_label {label:?} is not the batch's work order {:?}",
                    self.batch.work_order
                ),
            );
        }
        need(
            b64(&t.wrapped),
            "transport_key.wrapped is not base64".into(),
        );
        need(
            hex_of(&t.kcv, Some(3)),
            "transport_key.kcv is not 3 bytes of hex".into(),
        );
        need(
            b64(&self.device_ca.certificate),
            "device_ca.certificate is not base64".into(),
        );
        need(
            self.trust_anchors.len() <= 18,
            "trust_anchors lists more than 18 anchors".into(),
        );
        for (i, a) in self.trust_anchors.iter().enumerate() {
            need(
                ANCHOR_KINDS.contains(&a.kind.as_str()),
                format!("trust_anchors[{i}].kind is not one of {ANCHOR_KINDS:?}"),
            );
            need(
                hex_of(&a.sha256, Some(32)),
                format!("trust_anchors[{i}].sha256 is not 32 bytes of hex"),
            );
            need(
                a.subject.len() <= 1024,
                format!("trust_anchors[{i}].subject is longer than 1024 bytes"),
            );
        }
        for (i, m) in self.meters.iter().enumerate() {
            let at = format!("meters[{i}] ({})", m.serial);
            need(
                printable(&m.serial, 32),
                format!("{at}: serial is not 1 to 32 printable ASCII characters"),
            );
            need(
                hex_of(&m.uid, None) && (2..=64).contains(&m.uid.len()),
                format!("{at}: uid is not 1 to 32 bytes of hex"),
            );
            need(
                m.system_title.len() == 16
                    && m.system_title
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase()),
                format!("{at}: system_title is not 16 upper-case hex digits"),
            );
            need(
                printable(&m.logical_device_name, 48),
                format!("{at}: logical_device_name is not 1 to 48 printable ASCII characters"),
            );
            need(m.nest >= 1, format!("{at}: nest is below 1"));
            need(
                hex_of(&m.firmware_sha256, Some(32)),
                format!("{at}: firmware_sha256 is not 32 bytes of hex"),
            );
            need(
                rfc3339(&m.started_at) && rfc3339(&m.finished_at),
                format!("{at}: started_at/finished_at are not RFC 3339 times"),
            );
            need(
                !m.certificates.is_empty() && m.certificates.len() <= 2,
                format!("{at}: needs one or two certificates"),
            );
            for c in &m.certificates {
                need(
                    matches!(c.slot.as_str(), "sign" | "ka"),
                    format!("{at}: certificate slot {:?} is not sign or ka", c.slot),
                );
                need(
                    hex_of(&c.serial, None) && !c.serial.is_empty() && c.serial.len() <= 40,
                    format!("{at}: certificate serial is not hex"),
                );
                need(
                    hex_of(&c.sha256, Some(32)),
                    format!("{at}: certificate sha256 is not 32 bytes of hex"),
                );
                need(b64(&c.der), format!("{at}: certificate der is not base64"));
            }
            need(
                m.keys.len() == 4
                    && ["guek", "gbek", "ak", "kek"]
                        .iter()
                        .all(|id| m.keys.iter().filter(|k| k.id == *id).count() == 1),
                format!("{at}: needs the four keys guek, gbek, ak, kek, each once"),
            );
            for k in &m.keys {
                need(
                    matches!(k.id.as_str(), "guek" | "gbek" | "ak" | "kek"),
                    format!("{at}: key id {:?} is unknown", k.id),
                );
                need(
                    matches!(k.key_type.as_str(), "aes-128" | "aes-256"),
                    format!("{at}: key type {:?} is unknown", k.key_type),
                );
                need(
                    k.wrap == "aes-kw",
                    format!("{at}: key wrap {:?} is not aes-kw", k.wrap),
                );
                need(b64(&k.wrapped), format!("{at}: wrapped key is not base64"));
                need(
                    hex_of(&k.kcv, Some(3)),
                    format!("{at}: kcv is not 3 bytes of hex"),
                );
            }
            need(
                b64(&m.attestation.receipt) && b64(&m.attestation.signature),
                format!("{at}: attestation is not base64"),
            );
            need(
                matches!(
                    m.attestation.algorithm.as_str(),
                    "ecdsa-with-SHA256" | "ecdsa-with-SHA384"
                ),
                format!("{at}: attestation algorithm is unknown"),
            );
        }
        for (i, v) in self.voided_certificates.iter().enumerate() {
            need(
                hex_of(&v.serial, None) && !v.serial.is_empty() && v.serial.len() <= 40,
                format!("voided_certificates[{i}]: serial is not hex"),
            );
            need(
                hex_of(&v.meter_uid, None) && (2..=64).contains(&v.meter_uid.len()),
                format!("voided_certificates[{i}]: meter_uid is not 1 to 32 bytes of hex"),
            );
            need(
                v.meter_serial.as_deref().is_none_or(|s| printable(s, 32)),
                format!(
                    "voided_certificates[{i}]: meter_serial is not 1 to 32 printable ASCII characters"
                ),
            );
            need(
                matches!(v.slot.as_str(), "sign" | "ka"),
                format!("voided_certificates[{i}]: slot is not sign or ka"),
            );
            need(
                !v.reason.is_empty(),
                format!("voided_certificates[{i}]: no reason"),
            );
            need(
                v.sha256.as_deref().is_none_or(|h| hex_of(h, Some(32))),
                format!("voided_certificates[{i}]: sha256 is not 32 bytes of hex"),
            );
        }
        need(
            self.audit_checkpoint.seq >= 1,
            "audit_checkpoint.seq is below 1".into(),
        );
        need(
            b64(&self.audit_checkpoint.audit_certificate),
            "audit_checkpoint.audit_certificate is not base64".into(),
        );
        e
    }
}

/// Decodes standard base64 (callers have checked the form).
pub fn unb64(s: &str) -> Vec<u8> {
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .unwrap_or_default()
}

/// Encodes standard base64.
pub fn b64enc(b: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;

    const EXAMPLE: &str = include_str!("../../../schemas/manifest.example.json");

    #[test]
    fn the_documented_example_has_the_right_form() {
        let m: Manifest = serde_json::from_str(EXAMPLE).unwrap();
        assert_eq!(m.check_form(), Vec::new());
        assert_eq!((m.meters.len(), m.voided_certificates.len()), (2, 1));
    }

    #[test]
    fn nullable_fields_must_still_be_present() {
        let mut v: serde_json::Value = serde_json::from_str(EXAMPLE).unwrap();
        v["voided_certificates"][0]["sha256"] = serde_json::Value::Null;
        let m: Manifest = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(m.check_form(), Vec::new());
        v["voided_certificates"][0]
            .as_object_mut()
            .unwrap()
            .remove("meter_serial");
        let e = serde_json::from_value::<Manifest>(v).unwrap_err();
        assert!(
            e.to_string().contains("missing field `meter_serial`"),
            "{e}"
        );
    }

    #[test]
    fn times_take_the_schema_form() {
        for ok in ["2026-11-21T17:34:13.346Z", "2026-11-21T17:34:13+01:00"] {
            assert!(rfc3339(ok), "{ok}");
        }
        for bad in [
            "2026-11-21 17:34:13Z",
            "2026-11-21t17:34:13Z",
            "2026-11-21T17:34:13z",
            "2026-02-30T17:34:13Z",
            "2026-11-21T17:34Z",
        ] {
            assert!(!rfc3339(bad), "{bad}");
        }
    }
}
