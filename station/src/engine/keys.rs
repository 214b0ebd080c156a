//! The cell's keys in the HSM, found once at start-up by role: the device CA, the station
//! identity and its chain, the audit signer, the firmware verification certificate, the
//! manifest signer and the manufacturer root. Also the adapters that let the audit log and the
//! jig protocol sign through the HSM.

use std::sync::Arc;

use der::{Decode, DecodePem};
use hsm::{Hsm, HsmConfig, KeyPairHandle, KeyRole, PinSource};
use line_protocol::io::TranscriptSigner;
use x509_cert::Certificate;

use super::{Error, Result};
use crate::audit::AuditSigner;
use crate::config::{Config, PinSourceSetting};

/// The cell's keys and certificates.
#[derive(Debug, Clone)]
pub struct CellKeys {
    /// Issues meter certificates.
    pub device_ca: hsm::Issuer,
    /// The station identity key pair.
    pub station: KeyPairHandle,
    /// The station chain sent to meters, leaf first.
    pub station_chain: Vec<Vec<u8>>,
    /// The audit signer key pair.
    pub audit: KeyPairHandle,
    /// Its certificate.
    pub audit_cert: Vec<u8>,
    /// The firmware verification certificate (a trust anchor of every meter).
    pub firmware_cert: Vec<u8>,
    /// Its key.
    pub firmware_key: p256::PublicKey,
    /// The manifest signer key pair.
    pub manifest: KeyPairHandle,
    /// Its certificate.
    pub manifest_cert: Vec<u8>,
    /// The manufacturer root certificate: every anchor above chains to it.
    pub root_cert: Vec<u8>,
}

fn missing(what: &str) -> Error {
    Error::Setup(format!(
        "the HSM token holds no {what}; set the cell up with `station pki init-dev` (demo) or `station pki csr` and `station pki import`"
    ))
}

/// Opens the configured HSM.
pub fn open_hsm(cfg: &Config) -> Result<Hsm> {
    let pin = match &cfg.hsm.pin {
        PinSourceSetting::Prompt => PinSource::Prompt,
        PinSourceSetting::Env(v) => PinSource::Env(v.clone()),
        PinSourceSetting::File(f) => PinSource::File(f.clone()),
    };
    let mut hc = HsmConfig::new(cfg.hsm.module.clone(), cfg.hsm.token.clone(), pin);
    hc.pool_size = cfg.hsm.pool_size;
    hc.trusted_wrap = cfg.hsm.trusted_wrap;
    Ok(Hsm::open(&hc)?)
}

impl CellKeys {
    /// Finds every key and certificate by role.
    pub async fn load(hsm: &Hsm) -> Result<CellKeys> {
        let found = hsm
            .run(|s| {
                let ca = hsm::Issuer::load(s, "device-ca");
                let station = s.find_ec_keypair("station");
                let station_cert = s.find_certificate("station")?;
                let audit = s.find_ec_keypair("audit-signer");
                let audit_cert = s.find_certificate("audit-signer")?;
                let fw = s.find_certificate("firmware-verification")?;
                let manifest = s.find_ec_keypair("manifest-signer");
                let manifest_cert = s.find_certificate("manifest-signer")?;
                let root = s.find_certificate("manufacturer-root")?;
                Ok((
                    ca,
                    station,
                    station_cert,
                    audit,
                    audit_cert,
                    fw,
                    manifest,
                    manifest_cert,
                    root,
                ))
            })
            .await?;
        let (ca, station, station_cert, audit, audit_cert, fw, manifest, manifest_cert, root) =
            found;
        let device_ca = ca.map_err(|_| missing("device CA (label device-ca)"))?;
        let station = station.map_err(|_| missing("station identity key (label station)"))?;
        let station_cert = station_cert.ok_or_else(|| missing("station certificate"))?;
        let audit = audit.map_err(|_| missing("audit signer key (label audit-signer)"))?;
        let audit_cert = audit_cert.ok_or_else(|| missing("audit signer certificate"))?;
        let firmware_cert = fw.ok_or_else(|| {
            missing("firmware verification certificate (label firmware-verification)")
        })?;
        let manifest =
            manifest.map_err(|_| missing("manifest signer key (label manifest-signer)"))?;
        let manifest_cert = manifest_cert.ok_or_else(|| missing("manifest signer certificate"))?;
        let fw_parsed = Certificate::from_der(&firmware_cert).map_err(|e| {
            Error::Setup(format!(
                "the firmware verification certificate does not parse: {e}"
            ))
        })?;
        let firmware_key = line_protocol::chain::p256_key(&fw_parsed).ok_or_else(|| {
            Error::Setup("the firmware verification certificate is not a P-256 key".into())
        })?;
        // The anchors every meter receives are the root's, or the cell does not start.
        let root =
            root.ok_or_else(|| missing("manufacturer root certificate (label manufacturer-root)"))?;
        hsm::pki::check_cell_anchors(&root, &device_ca.cert_der, &firmware_cert).map_err(|e| {
            Error::Setup(format!(
                "the trust anchors in the HSM token do not chain to the manufacturer root, so no meter is given them: {e}"
            ))
        })?;
        // And the signers: what verifies the audit log and the manifests is the root's word,
        // not whatever key pair the token holds under the label.
        for (role, cert, point) in [
            (KeyRole::AuditSigner, &audit_cert, &audit.point),
            (KeyRole::ManifestSigner, &manifest_cert, &manifest.point),
        ] {
            hsm::pki::check_cell_signer(&root, role, cert, point).map_err(|e| {
                Error::Setup(format!(
                    "the HSM token's {role:?} does not stand for the manufacturer root, so nothing is signed with it: {e}"
                ))
            })?;
        }
        Ok(CellKeys {
            device_ca,
            station,
            station_chain: vec![station_cert],
            audit,
            audit_cert,
            firmware_cert,
            firmware_key,
            manifest,
            manifest_cert,
            root_cert: root,
        })
    }

    /// The audit signer as the audit log wants it.
    pub fn audit_signer(&self, hsm: &Hsm) -> HsmAuditSigner {
        HsmAuditSigner {
            hsm: hsm.clone(),
            key: self.audit.clone(),
            spki: hsm::cert::ec_spki_der(self.audit.curve, &self.audit.point).unwrap_or_default(),
        }
    }

    /// The audit public key, for verification.
    pub fn audit_verifying_key(&self) -> Result<p256::ecdsa::VerifyingKey> {
        p256::ecdsa::VerifyingKey::from_sec1_bytes(&self.audit.point)
            .map_err(|_| Error::Setup("the audit signer key is not a P-256 key".into()))
    }

    /// The station identity as the jig protocol wants it.
    pub fn transcript_signer(&self, hsm: &Hsm) -> StationSigner {
        StationSigner {
            hsm: hsm.clone(),
            key: Arc::new(self.station.clone()),
        }
    }
}

/// Signs audit material with the audit key in the HSM.
#[derive(Debug)]
pub struct HsmAuditSigner {
    hsm: Hsm,
    key: KeyPairHandle,
    spki: Vec<u8>,
}

impl AuditSigner for HsmAuditSigner {
    fn sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, String> {
        // Called inside a journal transaction on a blocking thread: the synchronous pool is right.
        self.hsm
            .with_session(|s| s.sign(&self.key.private, msg))
            .map_err(|e| e.to_string())
    }

    fn spki_der(&self) -> Vec<u8> {
        self.spki.clone()
    }
}

/// Signs the channel transcript with the station identity key in the HSM.
#[derive(Debug, Clone)]
pub struct StationSigner {
    hsm: Hsm,
    key: Arc<KeyPairHandle>,
}

impl TranscriptSigner for StationSigner {
    async fn sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, String> {
        let key = Arc::clone(&self.key);
        let msg = message.to_vec();
        self.hsm
            .run(move |s| s.sign(&key.private, &msg))
            .await
            .map_err(|e| e.to_string())
    }
}

/// Label of the token data object that says the cell has been set up (its first security
/// officer exists). The token, not the journal, decides: an empty journal pointed at a token
/// that has served a cell bootstraps nothing.
pub const CELL_MARKER: &str = "station-cell";

/// Label of the token data object that anchors the audit log outside the journal's reach: the
/// newest entry the station has seen committed (sequence number, big-endian u64, and chain
/// hash). A journal put back from an older copy, or cut short, no longer reaches it.
pub const AUDIT_ANCHOR: &str = "audit-anchor";

/// Label of the PIN pepper key ([`hsm::KeyRole::PinPepper`]).
pub const PEPPER_LABEL: &str = "pin-pepper";

/// The PIN pepper and whether the cell has been set up, as the token says.
#[derive(Debug, Clone)]
pub struct CellAccess {
    /// The pepper key (created on a fresh token).
    pub pepper: hsm::KeyHandle,
    /// The set-up marker's content, when the cell has been set up.
    pub marker: Option<Vec<u8>>,
    /// The pepper was created now (a fresh cell).
    pub created: bool,
}

impl CellAccess {
    /// Finds the pepper and the marker. A fresh token (no marker) gets a new pepper; a token
    /// whose cell has been set up but whose pepper is gone is refused, as no PIN could be checked.
    pub async fn load(hsm: &Hsm) -> Result<CellAccess> {
        let found = hsm
            .run(|s| {
                Ok((
                    s.find_key(hsm::KeyKind::Hmac(32), PEPPER_LABEL)?,
                    s.find_data(CELL_MARKER)?,
                ))
            })
            .await?;
        match found {
            (Some(pepper), marker) => Ok(CellAccess {
                pepper,
                marker,
                created: false,
            }),
            (None, Some(_)) => Err(Error::Setup(format!(
                "the HSM token belongs to a cell that has been set up, but its PIN pepper key (label {PEPPER_LABEL}) is gone: no PIN can be checked; restore the token from its backup"
            ))),
            (None, None) => {
                let pepper = hsm
                    .run(|s| s.generate_hmac_key(KeyRole::PinPepper, PEPPER_LABEL))
                    .await?;
                Ok(CellAccess {
                    pepper,
                    marker: None,
                    created: true,
                })
            }
        }
    }
}

/// Parses a certificate given as PEM or DER.
pub fn parse_cert(bytes: &[u8]) -> std::result::Result<(Certificate, Vec<u8>), String> {
    if let Ok(c) = Certificate::from_der(bytes) {
        return Ok((c, bytes.to_vec()));
    }
    let c = Certificate::from_pem(bytes)
        .map_err(|_| "not an X.509 certificate (PEM or DER)".to_string())?;
    let der = der::Encode::to_der(&c).map_err(|e| e.to_string())?;
    Ok((c, der))
}
