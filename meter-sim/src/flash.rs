//! The emulated meter's bootloader application: what a real meter keeps in flash, kept in files
//! so that tests can see exactly what the meter received.
//!
//! One directory per meter (named by its UID in hex) holds `meter.json` (lifecycle, identity,
//! firmware state, what is installed), the certificates (`cert-sign.der`, `cert-ka.der`,
//! `cert-device-ca.der`), trust anchors (`anchor-<kind>-<index>.der`), the meter's own private
//! keys (`key-sign.pk8`, `key-ka.pk8`), the delivered secret keys in clear (`secret-<id>.bin`:
//! inside a meter that is where they end up), the firmware staging area and active image
//! (`fw-staging.bin`, `image.bin`) and the last receipt. `meter.json` is written atomically
//! (temporary file and rename) so a killed emulator never leaves it half-written.
//!
//! Faults that change what the application answers (a wrong hash, an invalid proof of possession,
//! a false lifecycle, a fake seal) are applied here; faults on the byte stream and timing are in
//! [`crate::nest`].

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use der::{Decode, Encode};
use line_protocol::chain::p256_key;
use line_protocol::crypto::{self, kcv_ec_public};
use line_protocol::image::{self, ImageError};
use line_protocol::meter::{MeterApp, MeterInfo, Refusal};
use line_protocol::msg::{
    self, AnchorKind, CertSlot, Curve, ErrorCode, FwResult, Identity, KeyId, KeyType, Lifecycle,
    ResetMode, Status,
};
use line_protocol::receipt::Receipt;
use p256::elliptic_curve::Generate;
use serde::{Deserialize, Serialize};
use x509_cert::Certificate;

use crate::faults::Faults;

/// Capabilities an emulated meter advertises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// Model name.
    pub model: String,
    /// Bootloader version.
    pub bootloader: [u8; 3],
    /// Largest payload accepted.
    pub max_payload: u16,
    /// Frames buffered.
    pub window: u8,
    /// DEFLATE support.
    pub deflate: bool,
    /// On-chip key generation (a TRNG).
    pub keygen: bool,
    /// The X9.63 key transport (line protocol 5.3, feature bit 3) besides the AES-ECB one.
    pub ktk_x963: bool,
    /// REWORK of a sealed meter with a station-signed token (line protocol 4.16, feature bit 4).
    pub rework: bool,
    /// Largest decoded block.
    pub max_block: u32,
    /// Firmware slot size.
    pub slot_size: u32,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            model: "EM-300".into(),
            bootloader: [2, 1, 0],
            max_payload: 16384,
            window: 16,
            deflate: true,
            keygen: true,
            ktk_x963: true,
            rework: true,
            max_block: 65536,
            slot_size: 1 << 20,
        }
    }
}

/// What `meter.json` holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MeterState {
    /// UID, hex.
    pub uid: String,
    /// Model.
    pub model: String,
    /// "blank", "personalized" or "sealed".
    pub lifecycle: String,
    /// Identity once set.
    pub identity: Option<IdentityState>,
    /// Interfaces disabled at seal.
    pub disabled: u16,
    /// Installed certificate slots.
    pub certs: Vec<u8>,
    /// Slots with a generated key pair and its curve (1 = P-256, 2 = P-384).
    pub key_pairs: Vec<(u8, u8)>,
    /// Installed secret keys by id.
    pub secrets: Vec<u8>,
    /// Installed anchors (kind, index).
    pub anchors: Vec<(u8, u8)>,
    /// Image being received: size, SHA-256 (hex), contiguous bytes held.
    pub staging: Option<(u32, String, u32)>,
    /// The image being received is complete and its verification failed (`FW_FORMAT`,
    /// `FW_SIGNATURE_INVALID`, `FW_NO_ANCHOR`): STATUS `fw_state` 3 until it is activated or
    /// discarded.
    #[serde(default)]
    pub staging_failed: bool,
    /// Active image SHA-256 (hex) and version.
    pub active: Option<(String, String)>,
    /// Session in which each pending key was generated (slot, transcript hash hex).
    pub pending_keygen: Vec<(u8, String)>,
    /// The meter's own record of its reworks: for each rework token it accepted, the SHA-256
    /// (hex) of the signing certificate the token named.
    #[serde(default)]
    pub reworks: Vec<String>,
}

/// Identity as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityState {
    /// Serial number.
    pub serial: String,
    /// System title, hex.
    pub system_title: String,
    /// Logical device name.
    pub ldn: String,
}

/// An emulated meter backed by a directory.
#[derive(Debug)]
pub struct FlashMeter {
    dir: PathBuf,
    uid: Vec<u8>,
    caps: Capabilities,
    root: p256::PublicKey,
    state: MeterState,
    faults: Faults,
}

fn lifecycle_of(s: &str) -> Lifecycle {
    match s {
        "personalized" => Lifecycle::Personalized,
        "sealed" => Lifecycle::Sealed,
        _ => Lifecycle::Blank,
    }
}

fn storage(e: impl std::fmt::Display) -> Refusal {
    Refusal::new(ErrorCode::Storage, format!("flash: {e}"))
}

fn slot_name(slot: u8) -> &'static str {
    match slot {
        1 => "sign",
        2 => "ka",
        _ => "device-ca",
    }
}

impl FlashMeter {
    /// Opens (or creates, blank) the meter with `uid` under `root_dir`.
    pub fn open(
        root_dir: &Path,
        uid: &[u8],
        caps: Capabilities,
        root: p256::PublicKey,
        faults: Faults,
    ) -> std::io::Result<Self> {
        let dir = root_dir.join(hex::encode(uid));
        fs::create_dir_all(&dir)?;
        let state_path = dir.join("meter.json");
        let state = if state_path.exists() {
            let text = fs::read_to_string(&state_path)?;
            serde_json::from_str(&text)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?
        } else {
            MeterState {
                uid: hex::encode(uid),
                model: caps.model.clone(),
                lifecycle: "blank".into(),
                ..MeterState::default()
            }
        };
        let m = FlashMeter {
            dir,
            uid: uid.to_vec(),
            caps,
            root,
            state,
            faults,
        };
        m.save().map_err(|r| std::io::Error::other(r.detail))?;
        Ok(m)
    }

    /// The meter's directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The meter's UID.
    pub fn uid(&self) -> &[u8] {
        &self.uid
    }

    /// The persisted state.
    pub fn state(&self) -> &MeterState {
        &self.state
    }

    /// Mutable access to the fault plan of this meter.
    pub fn faults_mut(&mut self) -> &mut Faults {
        &mut self.faults
    }

    fn save(&self) -> Result<(), Refusal> {
        let tmp = self.dir.join("meter.json.tmp");
        let text = serde_json::to_string_pretty(&self.state).map_err(storage)?;
        let mut f = fs::File::create(&tmp).map_err(storage)?;
        f.write_all(text.as_bytes()).map_err(storage)?;
        fs::rename(&tmp, self.dir.join("meter.json")).map_err(storage)?;
        Ok(())
    }

    fn write_file(&self, name: &str, data: &[u8]) -> Result<(), Refusal> {
        let tmp = self.dir.join(format!("{name}.tmp"));
        fs::write(&tmp, data).map_err(storage)?;
        fs::rename(&tmp, self.dir.join(name)).map_err(storage)
    }

    fn true_lifecycle(&self) -> Lifecycle {
        lifecycle_of(&self.state.lifecycle)
    }

    fn set_lifecycle(&mut self, l: Lifecycle) {
        self.state.lifecycle = l.name().to_string();
    }

    fn identity(&self) -> Option<Identity> {
        let i = self.state.identity.as_ref()?;
        let st = hex::decode(&i.system_title).ok()?;
        Some(Identity {
            serial: i.serial.clone(),
            system_title: st.try_into().ok()?,
            ldn: i.ldn.clone(),
        })
    }

    fn key_pair_curve(&self, slot: u8) -> Option<u8> {
        self.state
            .key_pairs
            .iter()
            .find(|(s, _)| *s == slot)
            .map(|(_, c)| *c)
    }

    fn public_key_der(&self, slot: u8) -> Option<Vec<u8>> {
        use spki::EncodePublicKey;
        let pk8 = fs::read(self.dir.join(format!("key-{}.pk8", slot_name(slot)))).ok()?;
        match self.key_pair_curve(slot)? {
            1 => {
                use p256::pkcs8::DecodePrivateKey;
                let k = p256::SecretKey::from_pkcs8_der(&pk8).ok()?;
                Some(k.public_key().to_public_key_der().ok()?.as_bytes().to_vec())
            }
            _ => {
                use p384::pkcs8::DecodePrivateKey;
                let k = p384::SecretKey::from_pkcs8_der(&pk8).ok()?;
                Some(k.public_key().to_public_key_der().ok()?.as_bytes().to_vec())
            }
        }
    }

    fn sign_with(&self, slot: u8, msg: &[u8]) -> Result<Vec<u8>, Refusal> {
        use p256::ecdsa::signature::Signer;
        // No key pair in the slot is NOT_READY (section 4.14); a key pair whose file cannot be
        // read is a storage failure.
        let curve = self
            .key_pair_curve(slot)
            .ok_or_else(|| Refusal::new(ErrorCode::NotReady, "no signing key"))?;
        let pk8 =
            fs::read(self.dir.join(format!("key-{}.pk8", slot_name(slot)))).map_err(storage)?;
        match curve {
            1 => {
                use p256::pkcs8::DecodePrivateKey;
                let k = p256::ecdsa::SigningKey::from_pkcs8_der(&pk8).map_err(storage)?;
                let sig: p256::ecdsa::DerSignature = k.sign(msg);
                Ok(sig.as_bytes().to_vec())
            }
            2 => {
                use p384::pkcs8::DecodePrivateKey;
                let k = p384::ecdsa::SigningKey::from_pkcs8_der(&pk8).map_err(storage)?;
                let sig: p384::ecdsa::DerSignature = k.sign(msg);
                Ok(sig.as_bytes().to_vec())
            }
            _ => Err(Refusal::new(ErrorCode::NotReady, "no signing key")),
        }
    }

    fn make_csr(&self, slot: CertSlot, curve: Curve, pk8: &[u8]) -> Result<Vec<u8>, Refusal> {
        use std::str::FromStr;
        use x509_cert::builder::{Builder, RequestBuilder};
        use x509_cert::ext::pkix::{KeyUsage, KeyUsages};
        let cn = match self.identity() {
            Some(id) => hex::encode_upper(id.system_title),
            None => hex::encode_upper(&self.uid),
        };
        let subject = x509_cert::name::Name::from_str(&format!("CN={cn}"))
            .map_err(|_| Refusal::new(ErrorCode::KeygenFailed, "subject"))?;
        let usage = if slot == CertSlot::Sign {
            KeyUsages::DigitalSignature
        } else {
            KeyUsages::KeyAgreement
        };
        let mut builder = RequestBuilder::new(subject)
            .map_err(|_| Refusal::new(ErrorCode::KeygenFailed, "request"))?;
        builder
            .add_extension(&KeyUsage(usage.into()))
            .map_err(|_| Refusal::new(ErrorCode::KeygenFailed, "request extension"))?;
        let req = match curve {
            Curve::P256 => {
                use p256::pkcs8::DecodePrivateKey;
                let k = p256::ecdsa::SigningKey::from_pkcs8_der(pk8).map_err(storage)?;
                builder.build::<_, p256::ecdsa::DerSignature>(&k)
            }
            Curve::P384 => {
                use p384::pkcs8::DecodePrivateKey;
                let k = p384::ecdsa::SigningKey::from_pkcs8_der(pk8).map_err(storage)?;
                builder.build::<_, p384::ecdsa::DerSignature>(&k)
            }
        }
        .map_err(|_| Refusal::new(ErrorCode::KeygenFailed, "signing the request"))?;
        let mut der = req
            .to_der()
            .map_err(|_| Refusal::new(ErrorCode::KeygenFailed, "encoding"))?;
        if self.faults.bad_pop {
            // Flip a bit in the last byte: the signature, which still parses but no longer verifies.
            if let Some(last) = der.last_mut() {
                *last ^= 0x01;
            }
        }
        Ok(der)
    }

    fn staging_path(&self) -> PathBuf {
        self.dir.join("fw-staging.bin")
    }

    /// FW_END steps 2 and 3: the firmware verification anchors with a P-256 key (none is
    /// `FW_NO_ANCHOR`), then the image against any of them (section 4.10: the key-hash TLV names
    /// the one meant).
    fn verify_image(&self, img: &[u8]) -> Result<image::ImageInfo, (ErrorCode, String)> {
        let mut anchors: Vec<(u8, u8)> = self
            .state
            .anchors
            .iter()
            .filter(|(k, _)| *k == AnchorKind::FirmwareVerification as u8)
            .copied()
            .collect();
        anchors.sort_unstable();
        let mut keys = Vec::with_capacity(anchors.len());
        for (kind, index) in anchors {
            let der = fs::read(self.dir.join(format!("anchor-{kind}-{index}.der")))
                .map_err(|e| (ErrorCode::Storage, e.to_string()))?;
            // An anchor without a P-256 key counts as none.
            if let Some(key) = Certificate::from_der(&der).ok().and_then(|c| p256_key(&c)) {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err((
                ErrorCode::FwNoAnchor,
                "no firmware verification anchor with a P-256 key".into(),
            ));
        }
        image::verify_any(img, &keys)
            .map(|(info, _)| info)
            .map_err(|e| {
                let code = match e {
                    ImageError::Format(_) => ErrorCode::FwFormat,
                    _ => ErrorCode::FwSignatureInvalid,
                };
                (code, e.to_string())
            })
    }
}

/// The first DER element of `b`, if everything after it is zero padding.
fn one_der_element(b: &[u8]) -> Option<&[u8]> {
    if b.len() < 2 || b[0] != 0x30 {
        return None;
    }
    let (len, header): (usize, usize) = match b[1] {
        n if n < 0x80 => (usize::from(n), 2),
        0x81 => (usize::from(*b.get(2)?), 3),
        0x82 => ((usize::from(*b.get(2)?) << 8) | usize::from(*b.get(3)?), 4),
        _ => return None,
    };
    let end = header.checked_add(len)?;
    let (elem, rest) = (b.get(..end)?, b.get(end..)?);
    (rest.len() < 8 && rest.iter().all(|&x| x == 0)).then_some(elem)
}

impl MeterApp for FlashMeter {
    fn info(&mut self) -> MeterInfo {
        let mut features = 0;
        if self.caps.deflate {
            features |= msg::FEATURE_DEFLATE;
        }
        if self.caps.keygen {
            features |= msg::FEATURE_KEYGEN_P256 | msg::FEATURE_KEYGEN_P384;
        }
        if self.caps.rework {
            features |= msg::FEATURE_REWORK;
        }
        if self.caps.ktk_x963 {
            features |= msg::FEATURE_KTK_X963;
        }
        MeterInfo {
            uid: self.uid.clone(),
            model: self.caps.model.clone(),
            bootloader: self.caps.bootloader,
            lifecycle: self
                .faults
                .lie_lifecycle
                .unwrap_or_else(|| self.true_lifecycle()),
            max_payload: self.caps.max_payload,
            window: self.caps.window,
            features,
            max_block: self.caps.max_block,
            slot_size: self.caps.slot_size,
        }
    }

    fn lifecycle(&mut self) -> Lifecycle {
        self.true_lifecycle()
    }

    fn provisioning_root(&self) -> p256::PublicKey {
        self.root
    }

    fn status(&mut self) -> Status {
        let keys = self
            .state
            .secrets
            .iter()
            .fold(0, |a, &id| a | msg::status_key_bit(id));
        let (fw_state, fw_size, fw_have, fw_sha) = match (&self.state.active, &self.state.staging) {
            (Some((sha, _)), _) => (2, 0, 0, sha.clone()),
            (None, Some((size, sha, have))) => (
                if self.state.staging_failed { 3 } else { 1 },
                *size,
                *have,
                sha.clone(),
            ),
            _ => (0, 0, 0, String::new()),
        };
        let mut fw_sha256 = [0u8; 32];
        if let Ok(b) = hex::decode(&fw_sha)
            && b.len() == 32
        {
            fw_sha256.copy_from_slice(&b);
        }
        Status {
            lifecycle: self.info().lifecycle as u8,
            identity: u8::from(self.state.identity.is_some()),
            certs: self.state.certs.iter().fold(0, |a, s| a | 1 << (s - 1)),
            keys,
            anchors: self.state.anchors.len().min(255) as u8,
            fw_state,
            fw_size,
            fw_have,
            fw_sha256,
        }
    }

    fn set_identity(&mut self, id: &Identity) -> Result<(), Refusal> {
        if let Some(old) = self.identity() {
            if &old != id {
                return Err(Refusal::new(
                    ErrorCode::IdentityMismatch,
                    "meter holds another identity; wipe it first",
                ));
            }
            return Ok(());
        }
        self.state.identity = Some(IdentityState {
            serial: id.serial.clone(),
            system_title: hex::encode(id.system_title),
            ldn: id.ldn.clone(),
        });
        self.set_lifecycle(Lifecycle::Personalized);
        self.save()
    }

    fn keygen(
        &mut self,
        slot: CertSlot,
        curve: Curve,
        session: &[u8; 32],
    ) -> Result<Vec<u8>, Refusal> {
        if !self.caps.keygen {
            return Err(Refusal::new(
                ErrorCode::UnsupportedCurve,
                "this model has no key generator",
            ));
        }
        let s = slot as u8;
        if self.state.certs.contains(&s) {
            return Err(Refusal::new(
                ErrorCode::Unexpected,
                "slot already certified; wipe the meter first",
            ));
        }
        let key_file = format!("key-{}.pk8", slot_name(s));
        let session_hex = hex::encode(session);
        let same_session = self
            .state
            .pending_keygen
            .iter()
            .any(|(ps, sh)| *ps == s && *sh == session_hex)
            && self.key_pair_curve(s) == Some(curve as u8);
        let pk8 = if same_session {
            fs::read(self.dir.join(&key_file)).map_err(storage)?
        } else {
            use p256::pkcs8::EncodePrivateKey;
            let der = if self.faults.broken_trng {
                // The same "random" bytes every time, in every meter with this fault.
                let a = crypto::sha256(b"a broken random generator");
                let b = crypto::sha256(&a);
                match curve {
                    Curve::P256 => p256::SecretKey::from_slice(&a)
                        .map_err(storage)?
                        .to_pkcs8_der(),
                    Curve::P384 => p384::SecretKey::from_slice(&[&a[..], &b[..16]].concat())
                        .map_err(storage)?
                        .to_pkcs8_der(),
                }
            } else {
                let mut rng = line_protocol::io::system_rng();
                match curve {
                    Curve::P256 => p256::SecretKey::generate_from_rng(&mut rng).to_pkcs8_der(),
                    Curve::P384 => p384::SecretKey::generate_from_rng(&mut rng).to_pkcs8_der(),
                }
            }
            .map_err(storage)?;
            let bytes = der.as_bytes().to_vec();
            self.write_file(&key_file, &bytes)?;
            self.state.key_pairs.retain(|(ps, _)| *ps != s);
            self.state.key_pairs.push((s, curve as u8));
            // The slot's key is no longer the one PUT_KEY delivered (STATUS keys bits 8, 9).
            let delivered = match slot {
                CertSlot::Sign => KeyId::SignPrivate as u8,
                _ => KeyId::KaPrivate as u8,
            };
            self.state.secrets.retain(|id| *id != delivered);
            self.state.pending_keygen.retain(|(ps, _)| *ps != s);
            self.state.pending_keygen.push((s, session_hex));
            self.save()?;
            bytes
        };
        self.make_csr(slot, curve, &pk8)
    }

    fn put_cert(&mut self, slot: CertSlot, der: &[u8]) -> Result<(), Refusal> {
        let cert = Certificate::from_der(der)
            .map_err(|_| Refusal::new(ErrorCode::Malformed, "not a DER certificate"))?;
        let s = slot as u8;
        if slot != CertSlot::DeviceCa {
            let ours = self.public_key_der(s).ok_or_else(|| {
                Refusal::new(ErrorCode::CertKeyMismatch, "no key pair in this slot")
            })?;
            let theirs = cert
                .tbs_certificate()
                .subject_public_key_info()
                .to_der()
                .map_err(|_| Refusal::new(ErrorCode::Malformed, "certificate key"))?;
            if ours != theirs {
                return Err(Refusal::new(
                    ErrorCode::CertKeyMismatch,
                    "certificate is for another key",
                ));
            }
        }
        self.write_file(&format!("cert-{}.der", slot_name(s)), der)?;
        if !self.state.certs.contains(&s) {
            self.state.certs.push(s);
        }
        self.state.pending_keygen.retain(|(ps, _)| *ps != s);
        self.save()
    }

    fn put_anchor(&mut self, kind: AnchorKind, index: u8, der: &[u8]) -> Result<(), Refusal> {
        Certificate::from_der(der)
            .map_err(|_| Refusal::new(ErrorCode::Malformed, "not a DER certificate"))?;
        self.write_file(&format!("anchor-{}-{}.der", kind as u8, index), der)?;
        let k = (kind as u8, index);
        if !self.state.anchors.contains(&k) {
            self.state.anchors.push(k);
        }
        self.save()
    }

    fn put_key(
        &mut self,
        key_id: KeyId,
        key_type: KeyType,
        clear: &[u8],
        kcv: [u8; 3],
    ) -> Result<(), Refusal> {
        // Step 1: the pairing of key id and key type (the session checks it too, before it
        // unwraps anything).
        if !key_id.takes(key_type) {
            return Err(Refusal::new(
                ErrorCode::Malformed,
                "key type does not fit the key id",
            ));
        }
        // An HSM may zero-pad a PKCS#8 key to a multiple of 8 bytes before the RFC 5649 wrap:
        // take one DER element and insist that only zeros follow it.
        let clear = match key_type {
            KeyType::EcP256 | KeyType::EcP384 => one_der_element(clear).ok_or_else(|| {
                Refusal::new(
                    ErrorCode::UnwrapFailed,
                    "not one DER element followed by zero padding",
                )
            })?,
            KeyType::Aes128 | KeyType::Aes256 => clear,
        };
        // Steps 3 and 4 for EC keys: the clear value and its check value; the public key as DER
        // SubjectPublicKeyInfo, as a certificate holds it.
        let public_der = match key_type {
            KeyType::EcP256 => {
                use p256::pkcs8::DecodePrivateKey;
                use spki::EncodePublicKey;
                let k = p256::SecretKey::from_pkcs8_der(clear)
                    .map_err(|_| Refusal::new(ErrorCode::UnwrapFailed, "not a P-256 PKCS#8 key"))?;
                if kcv_ec_public(&k.public_key().to_sec1_bytes()) != kcv {
                    return Err(Refusal::new(
                        ErrorCode::KcvMismatch,
                        "key check value mismatch",
                    ));
                }
                Some(k.public_key().to_public_key_der().map_err(storage)?)
            }
            KeyType::EcP384 => {
                use p384::pkcs8::DecodePrivateKey;
                use spki::EncodePublicKey;
                let k = p384::SecretKey::from_pkcs8_der(clear)
                    .map_err(|_| Refusal::new(ErrorCode::UnwrapFailed, "not a P-384 PKCS#8 key"))?;
                if kcv_ec_public(&k.public_key().to_sec1_bytes()) != kcv {
                    return Err(Refusal::new(
                        ErrorCode::KcvMismatch,
                        "key check value mismatch",
                    ));
                }
                Some(k.public_key().to_public_key_der().map_err(storage)?)
            }
            KeyType::Aes128 | KeyType::Aes256 => None,
        };
        let id = key_id as u8;
        match key_id {
            KeyId::SignPrivate | KeyId::KaPrivate => {
                let slot = if key_id == KeyId::SignPrivate { 1 } else { 2 };
                // Step 5: a certificate in the slot fixes its key; the same key again (a retried
                // PUT_KEY) is acknowledged.
                if self.state.certs.contains(&slot) {
                    let cert = fs::read(self.dir.join(format!("cert-{}.der", slot_name(slot))))
                        .map_err(storage)?;
                    let certified = Certificate::from_der(&cert)
                        .ok()
                        .and_then(|c| c.tbs_certificate().subject_public_key_info().to_der().ok());
                    if certified.as_deref() != public_der.as_ref().map(|d| d.as_bytes()) {
                        return Err(Refusal::new(
                            ErrorCode::Unexpected,
                            "slot holds a certificate for another key",
                        ));
                    }
                }
                let curve = if key_type == KeyType::EcP384 { 2 } else { 1 };
                self.write_file(&format!("key-{}.pk8", slot_name(slot)), clear)?;
                self.state.key_pairs.retain(|(s, _)| *s != slot);
                self.state.key_pairs.push((slot, curve));
                // A delivered key is not one KEYGEN made in this session (section 4.8).
                self.state.pending_keygen.retain(|(s, _)| *s != slot);
            }
            _ => self.write_file(&format!("secret-{}.bin", key_id.name()), clear)?,
        }
        if !self.state.secrets.contains(&id) {
            self.state.secrets.push(id);
        }
        self.save()
    }

    fn fw_begin(&mut self, size: u32, sha256: &[u8; 32]) -> Result<u32, Refusal> {
        let sha_hex = hex::encode(sha256);
        if let Some((s, h, have)) = &self.state.staging
            && *s == size
            && *h == sha_hex
        {
            return Ok(*have);
        }
        // The record leads the file: the old partial image is forgotten before its bytes go, so
        // a failed write leaves no record of bytes that are not there.
        if self.state.staging.take().is_some() {
            self.save()?;
        }
        let f = fs::File::create(self.staging_path()).map_err(storage)?;
        f.set_len(u64::from(size)).map_err(storage)?;
        self.state.staging = Some((size, sha_hex, 0));
        self.state.staging_failed = false;
        self.save()?;
        Ok(0)
    }

    fn fw_write(&mut self, offset: u32, data: &[u8]) -> Result<(), Refusal> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(self.staging_path())
            .map_err(storage)?;
        f.seek(SeekFrom::Start(u64::from(offset)))
            .map_err(storage)?;
        f.write_all(data).map_err(storage)
    }

    fn fw_progress(&mut self, have: u32) {
        if let Some(st) = self.state.staging.as_mut() {
            st.2 = have;
        }
        // Progress is persisted in steps so resuming loses little and flash is spared; a failed
        // write only costs a longer resume.
        let _ = self.save();
    }

    fn fw_end(&mut self, size: u32, sha256: &[u8; 32]) -> FwResult {
        let mut img = Vec::with_capacity(size as usize);
        let read = fs::File::open(self.staging_path()).and_then(|mut f| f.read_to_end(&mut img));
        let fail = |code: ErrorCode, sha: [u8; 32]| FwResult {
            status: code.code(),
            sha256: sha,
            version: [0; 8],
        };
        if read.is_err() || img.len() != size as usize {
            return fail(ErrorCode::Storage, [0; 32]);
        }
        let got = crypto::sha256(&img);
        if &got != sha256 {
            // The bytes held are not that image: discard them, so that a later FW_BEGIN of it
            // answers `have` 0 (section 4.12, FW_END step 1).
            let _ = fs::remove_file(self.staging_path());
            self.state.staging = None;
            self.state.staging_failed = false;
            let _ = self.save();
            return fail(ErrorCode::FwHashMismatch, got);
        }
        let info = match self.verify_image(&img) {
            Ok(i) => i,
            Err((code, _)) => {
                // Steps 2 and 3 keep the image (a later FW_BEGIN of it answers `have = size`)
                // and STATUS reports it failed (fw_state 3) until it is activated or discarded.
                if matches!(
                    code,
                    ErrorCode::FwFormat | ErrorCode::FwSignatureInvalid | ErrorCode::FwNoAnchor
                ) {
                    self.state.staging_failed = true;
                    let _ = self.save();
                }
                return fail(code, got);
            }
        };
        if self.write_file("image.bin", &img).is_err() {
            return fail(ErrorCode::Storage, got);
        }
        let _ = fs::remove_file(self.staging_path());
        self.state.staging = None;
        self.state.staging_failed = false;
        self.state.active = Some((hex::encode(got), info.version.to_string()));
        let _ = self.save();
        let mut reported = got;
        if self.faults.wrong_hash {
            reported[0] ^= 0xFF;
        }
        let mut version = info.version.to_bytes();
        if self.faults.wrong_version {
            version[0] = version[0].wrapping_add(1);
        }
        FwResult {
            status: 0,
            sha256: reported,
            version,
        }
    }

    fn seal(&mut self, disable: u16) -> Result<(Lifecycle, u16), Refusal> {
        if self.faults.fake_seal {
            return Ok((Lifecycle::Sealed, disable));
        }
        if self.true_lifecycle() == Lifecycle::Sealed {
            if self.faults.locked_reseal {
                return Err(Refusal::new(ErrorCode::Locked, "meter is sealed"));
            }
            // A repeat (its answer was lost): the same answer, nothing changes.
            return if disable & !self.state.disabled == 0 {
                Ok((Lifecycle::Sealed, self.state.disabled))
            } else {
                Err(Refusal::new(
                    ErrorCode::Locked,
                    "sealed: its interfaces cannot change",
                ))
            };
        }
        // A board whose debug port stays open whatever it is told (and says so).
        let disable = if self.faults.debug_open {
            disable & !msg::iface::DEBUG
        } else {
            disable
        };
        if self.state.identity.is_none() {
            return Err(Refusal::new(ErrorCode::NotReady, "no identity"));
        }
        if !self.state.certs.contains(&(CertSlot::Sign as u8)) {
            return Err(Refusal::new(ErrorCode::NotReady, "no signing certificate"));
        }
        if self.state.active.is_none() {
            return Err(Refusal::new(ErrorCode::NotReady, "no verified firmware"));
        }
        self.set_lifecycle(Lifecycle::Sealed);
        self.state.disabled = disable;
        self.save()?;
        Ok((Lifecycle::Sealed, disable))
    }

    fn attest(&mut self, nonce: &[u8; 16]) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
        let id = self
            .identity()
            .ok_or_else(|| Refusal::new(ErrorCode::NotReady, "no identity"))?;
        let fw = self
            .state
            .active
            .as_ref()
            .and_then(|(h, _)| hex::decode(h).ok())
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| Refusal::new(ErrorCode::NotReady, "no active firmware"))?;
        if self.key_pair_curve(CertSlot::Sign as u8).is_none() {
            return Err(Refusal::new(ErrorCode::NotReady, "no signing key"));
        }
        let mut certs = Vec::new();
        let mut slots = self.state.certs.clone();
        slots.sort_unstable();
        for s in slots {
            let der =
                fs::read(self.dir.join(format!("cert-{}.der", slot_name(s)))).map_err(storage)?;
            certs.push((s, crypto::sha256(&der)));
        }
        if self.faults.extra_receipt_cert
            && let Some(first) = certs.first().copied()
        {
            // A certificate the station never issued, listed twice over.
            certs.push(first);
        }
        let receipt = Receipt {
            uid: self.uid.clone(),
            serial: id.serial,
            system_title: id.system_title,
            ldn: id.ldn,
            lifecycle: self.true_lifecycle(),
            disabled: self.state.disabled,
            fw_sha256: fw,
            certs,
            nonce: *nonce,
        }
        .encode();
        let sig = self.sign_with(CertSlot::Sign as u8, &receipt)?;
        self.write_file("receipt.bin", &receipt)?;
        self.write_file("receipt.sig", &sig)?;
        Ok((receipt, sig))
    }

    fn reset(&mut self, mode: ResetMode) -> Result<(), Refusal> {
        if mode == ResetMode::FactoryWipe {
            if self.true_lifecycle() == Lifecycle::Sealed {
                return Err(Refusal::new(
                    ErrorCode::Locked,
                    "sealed meters cannot be wiped over the jig",
                ));
            }
            self.wipe()?;
        }
        Ok(())
    }

    fn rework(&mut self, cert_sha256: &[u8; 32]) -> Result<(), Refusal> {
        if !self.caps.rework {
            return Err(Refusal::new(ErrorCode::UnknownType, "no REWORK"));
        }
        let held = fs::read(
            self.dir
                .join(format!("cert-{}.der", slot_name(CertSlot::Sign as u8))),
        )
        .map(|der| crypto::sha256(&der))
        .unwrap_or([0; 32]);
        if held != *cert_sha256 {
            return Err(Refusal::new(
                ErrorCode::ReworkRefused,
                "token names another certificate",
            ));
        }
        // The record of the rework outlives the wipe.
        let mut reworks = std::mem::take(&mut self.state.reworks);
        reworks.push(hex::encode(cert_sha256));
        self.wipe()?;
        self.state.reworks = reworks;
        self.save()
    }
}

impl FlashMeter {
    /// Erases everything back to blank.
    fn wipe(&mut self) -> Result<(), Refusal> {
        for entry in fs::read_dir(&self.dir).map_err(storage)?.flatten() {
            let _ = fs::remove_file(entry.path());
        }
        self.state = MeterState {
            uid: hex::encode(&self.uid),
            model: self.caps.model.clone(),
            lifecycle: "blank".into(),
            ..MeterState::default()
        };
        self.save()
    }
}
