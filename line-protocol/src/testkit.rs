//! Test support shared by this crate's tests, the fuzz targets and the test-vector generator:
//! a seeded RNG, the fixed test PKI of `schemas/vectors/`, an in-memory meter application, and
//! a helper that runs a host and a meter session against each other in memory.
//!
//! `MemMeter` is a protocol-level test double: it stores what it receives and answers KEYGEN
//! with a placeholder request instead of PKCS#10. The real emulator, with real requests, flash
//! files, image verification and fault injection, is `meter-sim`.

use std::collections::BTreeMap;
use std::convert::Infallible;

use p256::ecdsa::signature::Signer;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::elliptic_curve::Generate;
use p256::{PublicKey, SecretKey};
use rand_core::{TryCryptoRng, TryRng};
use sha2::{Digest, Sha256};

use crate::crypto::{self, sha256};
use crate::host::{HostConfig, HostSession, Inbound};
use crate::meter::{MeterApp, MeterInfo, MeterSession, Refusal};
use crate::msg::{
    self, AnchorKind, CertSlot, Curve, ErrorCode, FwResult, Identity, KeyId, KeyType, Lifecycle,
    Message, ResetMode, Status,
};

/// A deterministic RNG (SHA-256 in counter mode) for tests and vectors. Not for production.
#[derive(Debug, Clone)]
pub struct SeededRng {
    seed: [u8; 32],
    counter: u64,
    buf: [u8; 32],
    used: usize,
}

impl SeededRng {
    /// An RNG from a seed.
    pub fn new(seed: u64) -> Self {
        SeededRng {
            seed: sha256(&seed.to_le_bytes()),
            counter: 0,
            buf: [0; 32],
            used: 32,
        }
    }

    fn byte(&mut self) -> u8 {
        if self.used == 32 {
            let mut h = Sha256::new();
            h.update(self.seed);
            h.update(self.counter.to_le_bytes());
            self.buf = h.finalize().into();
            self.counter += 1;
            self.used = 0;
        }
        let b = self.buf[self.used];
        self.used += 1;
        b
    }
}

impl TryRng for SeededRng {
    type Error = Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Infallible> {
        let mut b = [0u8; 4];
        self.try_fill_bytes(&mut b)?;
        Ok(u32::from_le_bytes(b))
    }
    fn try_next_u64(&mut self) -> Result<u64, Infallible> {
        let mut b = [0u8; 8];
        self.try_fill_bytes(&mut b)?;
        Ok(u64::from_le_bytes(b))
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Infallible> {
        for d in dst {
            *d = self.byte();
        }
        Ok(())
    }
}

impl TryCryptoRng for SeededRng {}

/// The provisioning root's SEC1 public key (test PKI).
pub const PROVISIONING_ROOT_PUB: &[u8; 65] =
    include_bytes!("../../schemas/vectors/provisioning-root.pub");
/// The provisioning root certificate (test PKI).
pub const PROVISIONING_ROOT_DER: &[u8] =
    include_bytes!("../../schemas/vectors/provisioning-root.der");
/// The station identity certificate issued by the provisioning root (test PKI).
pub const STATION_DER: &[u8] = include_bytes!("../../schemas/vectors/station.der");
/// The same station key certified by a foreign root.
pub const STATION_FOREIGN_DER: &[u8] = include_bytes!("../../schemas/vectors/station-foreign.der");
/// The station identity private key as a raw 32-byte scalar (test PKI only).
pub const STATION_KEY_RAW: &[u8; 32] = include_bytes!("../../schemas/vectors/station.key.raw");

/// The provisioning root public key.
pub fn provisioning_root() -> PublicKey {
    // The test vector file is a valid point; a broken checkout fails every test loudly.
    PublicKey::from_sec1_bytes(PROVISIONING_ROOT_PUB)
        .unwrap_or_else(|_| panic!("bad test root key"))
}

/// The station's signing key.
pub fn station_key() -> SigningKey {
    SigningKey::from_slice(STATION_KEY_RAW).unwrap_or_else(|_| panic!("bad test station key"))
}

/// Signs `msg` with the station key (DER).
pub fn station_sign(msg: &[u8]) -> Vec<u8> {
    let sig: DerSignature = station_key().sign(msg);
    sig.as_bytes().to_vec()
}

/// An in-memory meter application.
#[derive(Debug, Clone)]
pub struct MemMeter {
    /// HELLO_ACK contents.
    pub info: MeterInfo,
    /// True lifecycle.
    pub lifecycle: Lifecycle,
    /// Stored identity.
    pub identity: Option<Identity>,
    /// Generated keys per slot, with the session they were made in.
    pub keys: BTreeMap<u8, (SecretKey, [u8; 32])>,
    /// Installed certificates.
    pub certs: BTreeMap<u8, Vec<u8>>,
    /// Installed anchors.
    pub anchors: BTreeMap<(u8, u8), Vec<u8>>,
    /// Delivered secret keys.
    pub secrets: BTreeMap<u8, Vec<u8>>,
    /// Firmware staging.
    pub staging: Vec<u8>,
    /// (size, sha) of the image in staging.
    pub staging_id: Option<(u32, [u8; 32])>,
    /// Contiguous bytes held.
    pub have: u32,
    /// Active image hash.
    pub active: Option<[u8; 32]>,
    /// Disabled interfaces.
    pub disabled: u16,
    /// Resets performed.
    pub resets: Vec<ResetMode>,
    /// Reworks performed.
    pub reworks: u32,
}

impl MemMeter {
    /// A blank meter with a UID.
    pub fn new(uid: &[u8]) -> Self {
        MemMeter {
            info: MeterInfo {
                uid: uid.to_vec(),
                model: "TEST-1".into(),
                bootloader: [1, 0, 0],
                lifecycle: Lifecycle::Blank,
                max_payload: 8192,
                window: 8,
                features: msg::FEATURE_DEFLATE
                    | msg::FEATURE_KEYGEN_P256
                    | msg::FEATURE_KEYGEN_P384,
                max_block: 32768,
                slot_size: 1 << 20,
            },
            lifecycle: Lifecycle::Blank,
            identity: None,
            keys: BTreeMap::new(),
            certs: BTreeMap::new(),
            anchors: BTreeMap::new(),
            secrets: BTreeMap::new(),
            staging: Vec::new(),
            staging_id: None,
            have: 0,
            active: None,
            disabled: 0,
            resets: Vec::new(),
            reworks: 0,
        }
    }
}

impl MeterApp for MemMeter {
    fn info(&mut self) -> MeterInfo {
        let mut i = self.info.clone();
        i.lifecycle = self.lifecycle;
        i
    }
    fn lifecycle(&mut self) -> Lifecycle {
        self.lifecycle
    }
    fn provisioning_root(&self) -> PublicKey {
        provisioning_root()
    }
    fn status(&mut self) -> Status {
        Status {
            lifecycle: self.lifecycle as u8,
            identity: u8::from(self.identity.is_some()),
            certs: self.certs.keys().fold(0, |a, s| a | 1 << (s - 1)),
            keys: self
                .secrets
                .keys()
                .fold(0, |a, &k| a | msg::status_key_bit(k)),
            anchors: self.anchors.len().min(255) as u8,
            fw_state: if self.active.is_some() {
                2
            } else {
                u8::from(self.staging_id.is_some())
            },
            fw_size: self.staging_id.map(|s| s.0).unwrap_or(0),
            fw_have: self.have,
            fw_sha256: self.staging_id.map(|s| s.1).unwrap_or([0; 32]),
        }
    }
    fn set_identity(&mut self, id: &Identity) -> Result<(), Refusal> {
        match &self.identity {
            Some(old) if old != id => Err(Refusal::new(
                ErrorCode::IdentityMismatch,
                "identity differs",
            )),
            _ => {
                self.identity = Some(id.clone());
                self.lifecycle = Lifecycle::Personalized;
                Ok(())
            }
        }
    }
    fn keygen(
        &mut self,
        slot: CertSlot,
        curve: Curve,
        session: &[u8; 32],
    ) -> Result<Vec<u8>, Refusal> {
        if curve != Curve::P256 {
            return Err(Refusal::new(ErrorCode::UnsupportedCurve, "P-256 only"));
        }
        let entry = self
            .keys
            .get(&(slot as u8))
            .filter(|(_, s)| s == session)
            .cloned();
        let key = match entry {
            Some((k, _)) => k,
            None => {
                let k = SecretKey::generate_from_rng(&mut SeededRng::new(
                    u64::from(session[0]) + slot as u64,
                ));
                self.keys.insert(slot as u8, (k.clone(), *session));
                k
            }
        };
        Ok([b"CSR:".as_slice(), &key.public_key().to_sec1_bytes()].concat())
    }
    fn put_cert(&mut self, slot: CertSlot, der: &[u8]) -> Result<(), Refusal> {
        self.certs.insert(slot as u8, der.to_vec());
        Ok(())
    }
    fn put_anchor(&mut self, kind: AnchorKind, index: u8, der: &[u8]) -> Result<(), Refusal> {
        self.anchors.insert((kind as u8, index), der.to_vec());
        Ok(())
    }
    fn put_key(
        &mut self,
        key_id: KeyId,
        _key_type: KeyType,
        clear: &[u8],
        _kcv: [u8; 3],
    ) -> Result<(), Refusal> {
        self.secrets.insert(key_id as u8, clear.to_vec());
        Ok(())
    }
    fn fw_begin(&mut self, size: u32, sha256: &[u8; 32]) -> Result<u32, Refusal> {
        if self.staging_id != Some((size, *sha256)) {
            self.staging = vec![0; size as usize];
            self.staging_id = Some((size, *sha256));
            self.have = 0;
        }
        Ok(self.have)
    }
    fn fw_write(&mut self, offset: u32, data: &[u8]) -> Result<(), Refusal> {
        let o = offset as usize;
        self.staging[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn fw_progress(&mut self, have: u32) {
        self.have = have;
    }
    fn fw_end(&mut self, _size: u32, sha256: &[u8; 32]) -> FwResult {
        let got = crypto::sha256(&self.staging);
        let status = if &got == sha256 {
            self.active = Some(got);
            0
        } else {
            ErrorCode::FwHashMismatch.code()
        };
        FwResult {
            status,
            sha256: got,
            version: [0; 8],
        }
    }
    fn seal(&mut self, disable: u16) -> Result<(Lifecycle, u16), Refusal> {
        if self.lifecycle == Lifecycle::Sealed {
            return if disable & !self.disabled == 0 {
                Ok((self.lifecycle, self.disabled))
            } else {
                Err(Refusal::new(
                    ErrorCode::Locked,
                    "sealed: its interfaces cannot change",
                ))
            };
        }
        self.lifecycle = Lifecycle::Sealed;
        self.disabled = disable;
        Ok((self.lifecycle, disable))
    }
    fn attest(&mut self, nonce: &[u8; 16]) -> Result<(Vec<u8>, Vec<u8>), Refusal> {
        Ok((nonce.to_vec(), Vec::new()))
    }
    fn reset(&mut self, mode: ResetMode) -> Result<(), Refusal> {
        self.resets.push(mode);
        Ok(())
    }
    fn rework(&mut self, cert_sha256: &[u8; 32]) -> Result<(), Refusal> {
        if self.info.features & msg::FEATURE_REWORK == 0 {
            return Err(Refusal::new(ErrorCode::UnknownType, "no rework"));
        }
        let held = self
            .certs
            .get(&(CertSlot::Sign as u8))
            .map(|der| sha256(der))
            .unwrap_or([0; 32]);
        if held != *cert_sha256 {
            return Err(Refusal::new(
                ErrorCode::ReworkRefused,
                "token names another certificate",
            ));
        }
        let (info, reworks) = (self.info.clone(), self.reworks + 1);
        *self = MemMeter::new(&info.uid);
        self.info = info;
        self.reworks = reworks;
        Ok(())
    }
}

/// A host and a meter joined in memory, with a software key-transport key.
#[derive(Debug)]
pub struct Pair {
    /// The host.
    pub host: HostSession,
    /// The meter session.
    pub meter: MeterSession,
    /// The meter application.
    pub app: MemMeter,
    /// The RNG both use.
    pub rng: SeededRng,
    /// The host's key-transport secret (an HSM holds it in production).
    pub kt_secret: SecretKey,
}

impl Pair {
    /// A fresh pair.
    pub fn new(seed: u64) -> Self {
        let mut rng = SeededRng::new(seed);
        let kt_secret = SecretKey::generate_from_rng(&mut rng);
        Pair {
            host: HostSession::new(HostConfig::default()),
            meter: MeterSession::new(8192),
            app: MemMeter::new(&[0xA5; 12]),
            rng,
            kt_secret,
        }
    }

    /// Delivers host bytes to the meter and returns what the host makes of the answer.
    pub fn exchange(&mut self, host_bytes: &[u8]) -> Vec<Inbound> {
        let out = self.meter.receive(host_bytes, &mut self.app, &mut self.rng);
        self.host.receive(&out.bytes)
    }

    /// HELLO and CHANNEL_OPEN with the test PKI; panics if the channel does not come up.
    pub fn open(&mut self) {
        let hello = self.host.hello([1; 16]);
        let ev = self.exchange(&hello);
        assert!(
            matches!(
                ev.as_slice(),
                [Inbound::Message {
                    msg: Message::HelloAck(_),
                    ..
                }]
            ),
            "{ev:?}"
        );
        let open = self.channel_open();
        let ev = self.exchange(&open);
        assert!(
            matches!(
                ev.as_slice(),
                [Inbound::Message {
                    msg: Message::ChannelReady { .. },
                    ..
                }]
            ),
            "{ev:?}"
        );
    }

    /// The CHANNEL_OPEN frame (HELLO already exchanged) with the pair's key-transport key and
    /// the test station chain, signed by the test station key.
    pub fn channel_open(&mut self) -> Vec<u8> {
        let mut kt_pub = [0u8; 65];
        kt_pub.copy_from_slice(&self.kt_secret.public_key().to_sec1_bytes());
        let draft = self
            .host
            .prepare_open(&mut self.rng, kt_pub, vec![STATION_DER.to_vec()])
            .unwrap_or_else(|e| panic!("{e}"));
        self.host
            .finish_open(station_sign(&draft.to_sign))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// The key-transport key as the host's HSM would derive it.
    pub fn host_ktk(&self) -> zeroize::Zeroizing<[u8; 32]> {
        let th = self
            .host
            .transcript_hash()
            .unwrap_or_else(|| panic!("no channel"));
        let meter_eph = crypto::parse_p256_point(
            &self
                .host
                .meter()
                .unwrap_or_else(|| panic!("no hello"))
                .eph_pub,
        )
        .unwrap_or_else(|| panic!("bad meter key"));
        let method = self.host.ktk_method().unwrap_or_else(|| panic!("no hello"));
        method.derive(
            &crypto::ecdh_x(&self.kt_secret.to_nonzero_scalar(), &meter_eph),
            &th,
        )
    }

    /// Sends a request and returns the single message answering it.
    pub fn call(&mut self, msg: &Message) -> Message {
        let (seq, bytes) = self.host.request(msg).unwrap_or_else(|e| panic!("{e}"));
        let ev = self.exchange(&bytes);
        match ev.as_slice() {
            [Inbound::Message { reference, msg, .. }] if *reference == seq => msg.clone(),
            other => panic!("unexpected answer to {}: {other:?}", msg.name()),
        }
    }
}
