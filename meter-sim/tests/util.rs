//! Harness for the emulator's integration tests: `meter-sim` as a separate process, an in-process
//! link emulator, a software PKI, and a reference host that provisions one meter through every
//! step of the design with software keys (the station does the same with its HSM).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use der::{Decode, Encode};
use line_protocol::crypto::{self, kcv_aes, parse_p256_point, wrap_key};
use line_protocol::firmware::{PlanParams, TransferPlan};
use line_protocol::host::HostConfig;
use line_protocol::image::ImageVersion;
use line_protocol::io::{self, HostLink, LinkError, PortAddr, PtySlave, TranscriptSigner};
use line_protocol::msg::{
    AnchorKind, CertSlot, Curve, Identity, KeyId, KeyType, Lifecycle, Message, PutKey, ResetMode,
    WrapAlg, iface,
};
use line_protocol::receipt::Receipt;
use line_protocol::testkit::{STATION_DER, SeededRng, station_sign};
use line_protocol::timing::LinkTiming;
use meter_sim::linksim::{self, LinkParams};
use p256::ecdsa::{DerSignature, SigningKey, VerifyingKey};
use p256::elliptic_curve::Generate;
use spki::{EncodePublicKey, SubjectPublicKeyInfoOwned};
use x509_cert::Certificate;
use x509_cert::builder::{Builder, CertificateBuilder, profile::BuilderProfile};
use x509_cert::certificate::TbsCertificate;
use x509_cert::ext::pkix::{BasicConstraints, KeyUsage, KeyUsages, SubjectKeyIdentifier};
use x509_cert::ext::{Extension, ToExtension};
use x509_cert::name::Name;
use x509_cert::serial_number::SerialNumber;
use x509_cert::time::Validity;

/// Path of the provisioning root certificate of the test PKI.
pub fn root_cert_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas/vectors/provisioning-root.der")
}

struct Profile {
    issuer: Name,
    subject: Name,
    ca: bool,
    usage: flagset::FlagSet<KeyUsages>,
}

impl BuilderProfile for Profile {
    fn get_issuer(&self, _subject: &Name) -> Name {
        self.issuer.clone()
    }
    fn get_subject(&self) -> Name {
        self.subject.clone()
    }
    fn build_extensions(
        &self,
        spk: spki::SubjectPublicKeyInfoRef<'_>,
        _issuer_spk: spki::SubjectPublicKeyInfoRef<'_>,
        tbs: &TbsCertificate,
    ) -> x509_cert::builder::Result<Vec<Extension>> {
        let ski = SubjectKeyIdentifier::try_from(spk)?;
        Ok(vec![
            BasicConstraints {
                ca: self.ca,
                path_len_constraint: None,
            }
            .to_extension(tbs.subject(), &[])?,
            KeyUsage(self.usage).to_extension(tbs.subject(), &[])?,
            ski.to_extension(tbs.subject(), &[])?,
        ])
    }
}

/// Issues a certificate for `spki` signed by `issuer_key`.
pub fn issue(
    issuer_key: &SigningKey,
    issuer: &str,
    subject: &str,
    spki: SubjectPublicKeyInfoOwned,
    ca: bool,
    usage: flagset::FlagSet<KeyUsages>,
    serial: u8,
) -> Vec<u8> {
    let profile = Profile {
        issuer: Name::from_str(issuer).unwrap(),
        subject: Name::from_str(subject).unwrap(),
        ca,
        usage,
    };
    let validity = Validity::from_now(Duration::from_secs(3600 * 24 * 365)).unwrap();
    let builder = CertificateBuilder::new(
        profile,
        SerialNumber::from(u32::from(serial) + 1),
        validity,
        spki,
    )
    .unwrap();
    let cert = builder.build::<_, DerSignature>(issuer_key).unwrap();
    cert.to_der().unwrap()
}

fn spki_of(key: &VerifyingKey) -> SubjectPublicKeyInfoOwned {
    SubjectPublicKeyInfoOwned::from_der(key.to_public_key_der().unwrap().as_bytes()).unwrap()
}

/// A software PKI: device CA and firmware signing key with its verification certificate.
#[derive(Debug)]
pub struct SoftPki {
    pub ca_key: SigningKey,
    pub ca_der: Vec<u8>,
    pub fw_key: SigningKey,
    pub fw_cert: Vec<u8>,
}

impl Default for SoftPki {
    fn default() -> Self {
        Self::new()
    }
}

impl SoftPki {
    pub fn new() -> Self {
        let mut rng = SeededRng::new(0xCA);
        let ca_key = SigningKey::generate_from_rng(&mut rng);
        let ca_der = issue(
            &ca_key,
            "CN=Test Device CA",
            "CN=Test Device CA",
            spki_of(ca_key.verifying_key()),
            true,
            KeyUsages::KeyCertSign | KeyUsages::CRLSign,
            1,
        );
        let fw_key = SigningKey::generate_from_rng(&mut rng);
        let fw_cert = issue(
            &ca_key,
            "CN=Test Device CA",
            "CN=Firmware Signing",
            spki_of(fw_key.verifying_key()),
            false,
            KeyUsages::DigitalSignature.into(),
            2,
        );
        SoftPki {
            ca_key,
            ca_der,
            fw_key,
            fw_cert,
        }
    }

    /// An MCUboot image of `payload`, signed by the firmware key.
    pub fn image(&self, payload: &[u8]) -> Vec<u8> {
        meter_sim::firmware::sign_image(
            payload,
            ImageVersion {
                major: 1,
                minor: 4,
                revision: 2,
                build: 0,
            },
            0x200,
            &self.fw_key,
        )
    }
}

/// `meter-sim` running as its own process; killed on drop.
#[derive(Debug)]
pub struct MeterSim {
    child: Child,
    pub paths: Vec<String>,
    pub state: tempfile::TempDir,
}

impl MeterSim {
    pub fn spawn(nests: u32, extra: &[&str]) -> MeterSim {
        let state = tempfile::tempdir().unwrap();
        let Some(exe) = option_env!("CARGO_BIN_EXE_meter-sim") else {
            panic!("meter-sim binary: integration tests only")
        };
        let mut child = Command::new(exe)
            .arg("--nests")
            .arg(nests.to_string())
            .arg("--state-dir")
            .arg(state.path())
            .arg("--root")
            .arg(root_cert_path())
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null())
            .spawn()
            .expect("start meter-sim");
        let stdout = child.stdout.take().unwrap();
        let mut paths = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let line = line.unwrap();
            let v: serde_json::Value = serde_json::from_str(&line).unwrap();
            if let Some(p) = v.get("path").and_then(|p| p.as_str()) {
                paths.push(p.to_string());
            }
            if v.get("ready").is_some() {
                break;
            }
        }
        assert_eq!(paths.len(), nests as usize);
        MeterSim {
            child,
            paths,
            state,
        }
    }

    /// A meter's flash directory.
    pub fn meter_dir(&self, uid: &[u8]) -> PathBuf {
        self.state.path().join(hex::encode(uid))
    }
}

impl Drop for MeterSim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Joins a meter's port to a new pseudo-terminal through the link emulator; returns the path the
/// station opens. The returned guard keeps the terminal alive.
pub async fn link_through(
    meter_path: &str,
    params: LinkParams,
) -> (String, PtySlave, tokio::task::JoinHandle<()>) {
    let meter = io::open(&PortAddr::parse(meter_path).unwrap(), params.baud)
        .await
        .unwrap();
    let (master, slave, path) = io::pty_pair().unwrap();
    let (handle, _) = linksim::spawn(master, meter, params);
    (path, slave, handle)
}

pub async fn connect(path: &str, baud: u32, latency_ms: u32) -> HostLink {
    let port = io::open(&PortAddr::parse(path).unwrap(), baud)
        .await
        .unwrap();
    HostLink::new(port, HostConfig::default(), LinkTiming { baud, latency_ms })
}

#[derive(Debug)]
pub struct SoftSigner;

impl TranscriptSigner for SoftSigner {
    async fn sign(&self, message: &[u8]) -> Result<Vec<u8>, String> {
        Ok(station_sign(message))
    }
}

/// Why the reference host failed a meter.
#[derive(Debug)]
pub enum Failure {
    /// The link said so.
    Link(LinkError),
    /// A check of the host's failed.
    Check(String),
}

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Self {
        Failure::Link(e)
    }
}

/// What a provisioned meter got.
#[derive(Debug)]
pub struct Provisioned {
    pub uid: Vec<u8>,
    pub sign_cert: Vec<u8>,
    pub guek: [u8; 16],
    pub receipt: Receipt,
    pub resumed_from: u32,
}

/// Hello and channel; returns the KTK as the host would hold it (in the HSM, in the station).
pub async fn open(link: &mut HostLink) -> Result<(Vec<u8>, [u8; 32]), Failure> {
    let ack = link.hello().await?;
    let kt = p256::SecretKey::generate_from_rng(&mut io::system_rng());
    let mut kt_pub = [0u8; 65];
    kt_pub.copy_from_slice(&kt.public_key().to_sec1_bytes());
    let th = link
        .open_channel(kt_pub, vec![STATION_DER.to_vec()], &SoftSigner)
        .await?;
    let meter_eph = parse_p256_point(&ack.eph_pub).unwrap();
    let ktk = crypto::ktk_from_shared(&crypto::ecdh_x(&kt.to_nonzero_scalar(), &meter_eph), &th);
    Ok((ack.uid, *ktk))
}

/// Sends the image from wherever the meter is; reconnects and resumes up to `reconnects` times.
pub async fn firmware(link: &mut HostLink, image: &[u8]) -> Result<u32, Failure> {
    let neg = link.session().negotiated().unwrap();
    let plan = TransferPlan::new(
        image,
        PlanParams {
            max_payload: neg.max_payload,
            max_block: neg.max_block,
            compress: neg.compression,
        },
    );
    let have = match link
        .call(&Message::FwBegin {
            size: plan.size,
            sha256: plan.sha256,
            compression: u8::from(neg.compression),
        })
        .await?
    {
        Message::FwBeginRsp { have } => have,
        other => return Err(Failure::Check(format!("{other:?}"))),
    };
    link.send_firmware(Arc::clone(&plan), have, &mut |_, _| {})
        .await?;
    match link.call_sized(&Message::FwEnd, plan.size).await? {
        Message::FwResult(r) if r.status != 0 => Err(Failure::Check(format!(
            "meter rejected the image: status 0x{:04x}",
            r.status
        ))),
        Message::FwResult(r) if r.sha256 != plan.sha256 => Err(Failure::Check(
            "meter reported a different image hash".into(),
        )),
        Message::FwResult(_) => Ok(have),
        other => Err(Failure::Check(format!("{other:?}"))),
    }
}

/// Everything before the firmware: identity, key pair with a checked request, certificates,
/// anchors, a wrapped secret key.
pub async fn personalize(
    link: &mut HostLink,
    pki: &SoftPki,
    uid: &[u8],
    ktk: &[u8; 32],
) -> Result<(Vec<u8>, [u8; 16]), Failure> {
    let id = Identity {
        serial: "EM3-0001".into(),
        system_title: *b"EXM\x00\x00\x00\x00\x01",
        ldn: "EXM0000000001".into(),
    };
    link.call(&Message::Identity(id)).await?;
    let csr = match link
        .call(&Message::KeyGen {
            slot: CertSlot::Sign,
            curve: Curve::P256,
        })
        .await?
    {
        Message::KeyGenRsp { csr, .. } => csr,
        other => return Err(Failure::Check(format!("{other:?}"))),
    };
    let req = x509_cert::request::CertReq::from_der(&csr)
        .map_err(|_| Failure::Check("request is not PKCS#10".into()))?;
    let spki = req.info.public_key.clone();
    let key = VerifyingKey::from_sec1_bytes(spki.subject_public_key.raw_bytes())
        .map_err(|_| Failure::Check("request key".into()))?;
    let sig = p256::ecdsa::Signature::from_der(req.signature.raw_bytes())
        .map_err(|_| Failure::Check("invalid proof of possession".into()))?;
    use p256::ecdsa::signature::Verifier;
    key.verify(&req.info.to_der().unwrap(), &sig)
        .map_err(|_| Failure::Check("invalid proof of possession".into()))?;
    let cert = issue(
        &pki.ca_key,
        "CN=Test Device CA",
        &format!("CN={}", hex::encode_upper(uid)),
        spki,
        false,
        KeyUsages::DigitalSignature.into(),
        9,
    );
    link.call(&Message::PutCert {
        slot: CertSlot::Sign,
        der: cert.clone(),
    })
    .await?;
    link.call(&Message::PutCert {
        slot: CertSlot::DeviceCa,
        der: pki.ca_der.clone(),
    })
    .await?;
    link.call(&Message::PutAnchor {
        kind: AnchorKind::FirmwareVerification,
        index: 0,
        der: pki.fw_cert.clone(),
    })
    .await?;
    let mut guek = [0u8; 16];
    rand_core::Rng::fill_bytes(&mut io::system_rng(), &mut guek);
    let wrapped = wrap_key(ktk, WrapAlg::AesKw, &guek).unwrap();
    link.call(&Message::PutKey(PutKey {
        key_id: KeyId::Guek,
        key_type: KeyType::Aes128,
        wrap: WrapAlg::AesKw,
        kcv: kcv_aes(&guek).unwrap(),
        wrapped,
    }))
    .await?;
    Ok((cert, guek))
}

/// Seal, attest (receipt checked against the certificate) and release.
pub async fn finish(link: &mut HostLink, cert: &[u8]) -> Result<Receipt, Failure> {
    match link
        .call(&Message::Seal {
            disable: iface::DEBUG,
        })
        .await?
    {
        Message::SealRsp {
            lifecycle: Lifecycle::Sealed,
            ..
        } => {}
        other => return Err(Failure::Check(format!("seal answered {other:?}"))),
    }
    let nonce = [0x5Au8; 16];
    let (receipt, signature) = match link.call(&Message::Attest { nonce }).await? {
        Message::AttestRsp { receipt, signature } => (receipt, signature),
        other => return Err(Failure::Check(format!("{other:?}"))),
    };
    let c = Certificate::from_der(cert).unwrap();
    let key = VerifyingKey::from_sec1_bytes(
        c.tbs_certificate()
            .subject_public_key_info()
            .subject_public_key
            .raw_bytes(),
    )
    .unwrap();
    use p256::ecdsa::signature::Verifier;
    let sig = p256::ecdsa::Signature::from_der(&signature)
        .map_err(|_| Failure::Check("receipt signature is not DER".into()))?;
    key.verify(&receipt, &sig)
        .map_err(|_| Failure::Check("receipt signature invalid".into()))?;
    let r = Receipt::decode(&receipt).ok_or_else(|| Failure::Check("receipt malformed".into()))?;
    if r.nonce != nonce {
        return Err(Failure::Check("receipt answers another challenge".into()));
    }
    if r.lifecycle != Lifecycle::Sealed {
        return Err(Failure::Check(format!(
            "receipt says lifecycle {}",
            r.lifecycle.name()
        )));
    }
    link.call(&Message::Reset {
        mode: ResetMode::Release,
    })
    .await?;
    Ok(r)
}

/// The whole of DESIGN.md section 4 for one meter.
pub async fn provision(
    link: &mut HostLink,
    pki: &SoftPki,
    image: &[u8],
) -> Result<Provisioned, Failure> {
    let ack_lifecycle = {
        let ack = link.hello().await?;
        ack.lifecycle
    };
    if ack_lifecycle != Lifecycle::Blank {
        return Err(Failure::Check(format!(
            "meter reports lifecycle {} for a new meter",
            ack_lifecycle.name()
        )));
    }
    let (uid, ktk) = open(link).await?;
    let (cert, guek) = personalize(link, pki, &uid, &ktk).await?;
    let resumed_from = firmware(link, image).await?;
    let receipt = finish(link, &cert).await?;
    Ok(Provisioned {
        uid,
        sign_cert: cert,
        guek,
        receipt,
        resumed_from,
    })
}
