//! The emulated meter's application against the rules of `schemas/line-protocol.md` that it
//! owns: STATUS (4.6), KEYGEN (4.8), anchors (4.10), PUT_KEY (4.11), FW_END (4.12) and ATTEST
//! (4.14). The application is driven directly, as the meter session drives it.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

mod util;

use std::path::Path;

use der::Decode;
use line_protocol::crypto::{self, kcv_ec_public};
use line_protocol::meter::MeterApp;
use line_protocol::msg::{
    AnchorKind, CertSlot, Curve, ErrorCode, FwResult, Identity, KeyId, KeyType, Status,
};
use line_protocol::testkit::{SeededRng, provisioning_root};
use meter_sim::faults::Faults;
use meter_sim::flash::{Capabilities, FlashMeter};
use p256::elliptic_curve::Generate;
use p256::pkcs8::EncodePrivateKey;
use spki::{EncodePublicKey, SubjectPublicKeyInfoOwned};
use util::{SoftPki, issue};
use x509_cert::ext::pkix::KeyUsages;

const UID: [u8; 8] = [0x42, 0, 0, 0, 0, 0, 0, 7];

fn meter(dir: &Path) -> FlashMeter {
    FlashMeter::open(
        dir,
        &UID,
        Capabilities::default(),
        provisioning_root(),
        Faults::default(),
    )
    .unwrap()
}

/// FW_BEGIN, the whole image in one block and FW_END, as the session drives them.
fn transfer(m: &mut FlashMeter, file: &[u8], announced: &[u8; 32]) -> FwResult {
    let size = file.len() as u32;
    m.fw_begin(size, announced).unwrap();
    m.fw_write(0, file).unwrap();
    m.fw_progress(size);
    m.fw_end(size, announced)
}

fn status_code(r: &FwResult) -> ErrorCode {
    ErrorCode::from_code(r.status)
}

fn payload() -> Vec<u8> {
    meter_sim::firmware::random_payload(3000, 9)
}

fn ec_key(seed: u64) -> (Vec<u8>, [u8; 3], SubjectPublicKeyInfoOwned) {
    let k = p256::SecretKey::generate_from_rng(&mut SeededRng::new(seed));
    let pk8 = k.to_pkcs8_der().unwrap().as_bytes().to_vec();
    let kcv = kcv_ec_public(&k.public_key().to_sec1_bytes());
    let spki =
        SubjectPublicKeyInfoOwned::from_der(k.public_key().to_public_key_der().unwrap().as_bytes())
            .unwrap();
    (pk8, kcv, spki)
}

fn identity() -> Identity {
    Identity {
        serial: "T000000001".into(),
        system_title: *b"DMW\x00\x00\x00\x00\x01",
        ldn: "DMW0000000000001".into(),
    }
}

fn fw_view(s: &Status) -> (u8, u32, u32, [u8; 32]) {
    (s.fw_state, s.fw_size, s.fw_have, s.fw_sha256)
}

// --- 4.12 FW_END step 1 ---

/// FW_HASH_MISMATCH discards the received image: a later FW_BEGIN of it answers 0.
#[test]
fn hash_mismatch_discards_the_received_image() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    let pki = SoftPki::new();
    m.put_anchor(AnchorKind::FirmwareVerification, 0, &pki.fw_cert)
        .unwrap();
    let good = pki.image(&payload());
    let announced = crypto::sha256(&good);
    let mut bad = good.clone();
    bad[0x300] ^= 0x01;
    let r = transfer(&mut m, &bad, &announced);
    assert_eq!(status_code(&r), ErrorCode::FwHashMismatch);
    assert_eq!(r.sha256, crypto::sha256(&bad));
    assert_eq!(
        m.fw_begin(good.len() as u32, &announced).unwrap(),
        0,
        "the bytes held are not that image"
    );
    // Nothing of it is reported as held; after this FW_BEGIN it is a fresh transfer.
    assert_eq!(fw_view(&m.status()), (1, good.len() as u32, 0, announced));
    // The right bytes now verify and activate.
    m.fw_write(0, &good).unwrap();
    m.fw_progress(good.len() as u32);
    assert_eq!(m.fw_end(good.len() as u32, &announced).status, 0);
}

/// Between the mismatch and the next FW_BEGIN, STATUS shows no image being received.
#[test]
fn hash_mismatch_leaves_no_image_in_status() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    let file = vec![0x33u8; 1000];
    let r = transfer(&mut m, &file, &[0xEE; 32]);
    assert_eq!(status_code(&r), ErrorCode::FwHashMismatch);
    assert_eq!(fw_view(&m.status()), (0, 0, 0, [0; 32]));
    // Also after a restart of the emulator (the state is persisted).
    drop(m);
    let mut m = meter(dir.path());
    assert_eq!(fw_view(&m.status()), (0, 0, 0, [0; 32]));
    assert_eq!(m.fw_begin(1000, &[0xEE; 32]).unwrap(), 0);
}

// --- 4.6 fw_state 3 ---

/// A complete image whose verification failed (FW_NO_ANCHOR, FW_FORMAT, FW_SIGNATURE_INVALID)
/// is reported with fw_state 3, its size, the bytes held and the announced hash; the state is
/// persistent, the image kept (FW_BEGIN of it answers `have = size`), and a later FW_END that
/// verifies activates it.
#[test]
fn failed_verification_reports_fw_state_3() {
    let pki = SoftPki::new();
    let other = SoftPki {
        fw_key: p256::ecdsa::SigningKey::generate_from_rng(&mut SeededRng::new(77)),
        ..SoftPki::new()
    };
    let good = pki.image(&payload());
    let not_an_image = vec![0x5Au8; 2000];
    let other_signer = other.image(&payload());
    for (file, anchor, want) in [
        (&good, None, ErrorCode::FwNoAnchor),
        (&not_an_image, Some(&pki.fw_cert), ErrorCode::FwFormat),
        (
            &other_signer,
            Some(&pki.fw_cert),
            ErrorCode::FwSignatureInvalid,
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut m = meter(dir.path());
        if let Some(a) = anchor {
            m.put_anchor(AnchorKind::FirmwareVerification, 0, a)
                .unwrap();
        }
        let sha = crypto::sha256(file);
        let size = file.len() as u32;
        assert_eq!(fw_view(&m.status()), (0, 0, 0, [0; 32]));
        m.fw_begin(size, &sha).unwrap();
        assert_eq!(fw_view(&m.status()), (1, size, 0, sha), "{want:?}");
        m.fw_write(0, file).unwrap();
        m.fw_progress(size);
        assert_eq!(fw_view(&m.status()), (1, size, size, sha), "{want:?}");
        let r = m.fw_end(size, &sha);
        assert_eq!(status_code(&r), want);
        assert_eq!(fw_view(&m.status()), (3, size, size, sha), "{want:?}");
        // Persistent: a restarted meter reports the same.
        drop(m);
        let mut m = meter(dir.path());
        assert_eq!(fw_view(&m.status()), (3, size, size, sha), "{want:?}");
        // The image is kept: FW_BEGIN of it reports every byte held.
        assert_eq!(m.fw_begin(size, &sha).unwrap(), size);
        assert_eq!(fw_view(&m.status()), (3, size, size, sha), "{want:?}");
        // Another image replaces it: receiving again.
        assert_eq!(m.fw_begin(100, &[1; 32]).unwrap(), 0);
        assert_eq!(fw_view(&m.status()), (1, 100, 0, [1; 32]), "{want:?}");
    }
}

/// The next FW_END of a kept image checks it again: after the anchor arrives it activates.
#[test]
fn a_kept_image_verifies_once_its_anchor_is_installed() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    let pki = SoftPki::new();
    let good = pki.image(&payload());
    let sha = crypto::sha256(&good);
    let size = good.len() as u32;
    assert_eq!(
        status_code(&transfer(&mut m, &good, &sha)),
        ErrorCode::FwNoAnchor
    );
    assert_eq!(m.status().fw_state, 3);
    m.put_anchor(AnchorKind::FirmwareVerification, 0, &pki.fw_cert)
        .unwrap();
    assert_eq!(m.fw_begin(size, &sha).unwrap(), size);
    assert_eq!(m.fw_end(size, &sha).status, 0);
    assert_eq!(fw_view(&m.status()), (2, 0, 0, sha));
}

// --- 4.10 / 6.4: several firmware verification anchors ---

/// An image verifies with any kind-1 anchor: the one its KEYHASH TLV names, wherever it is.
#[test]
fn any_firmware_verification_anchor_may_verify_the_image() {
    let pki = SoftPki::new();
    let good = pki.image(&payload());
    let sha = crypto::sha256(&good);
    // The right anchor last, after an anchor of another key and one of another kind.
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    m.put_anchor(AnchorKind::UtilityCa, 0, &pki.fw_cert)
        .unwrap();
    m.put_anchor(AnchorKind::FirmwareVerification, 0, &pki.ca_der)
        .unwrap();
    m.put_anchor(AnchorKind::FirmwareVerification, 7, &pki.fw_cert)
        .unwrap();
    let r = transfer(&mut m, &good, &sha);
    assert_eq!(r.status, 0, "{:?}", status_code(&r));
    assert_eq!(fw_view(&m.status()), (2, 0, 0, sha));

    // An image whose key is none of them: FW_SIGNATURE_INVALID.
    let stranger = SoftPki {
        fw_key: p256::ecdsa::SigningKey::generate_from_rng(&mut SeededRng::new(78)),
        ..SoftPki::new()
    };
    let foreign = stranger.image(&payload());
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    m.put_anchor(AnchorKind::FirmwareVerification, 0, &pki.ca_der)
        .unwrap();
    m.put_anchor(AnchorKind::FirmwareVerification, 1, &pki.fw_cert)
        .unwrap();
    let r = transfer(&mut m, &foreign, &crypto::sha256(&foreign));
    assert_eq!(status_code(&r), ErrorCode::FwSignatureInvalid);

    // Only anchors of another kind: FW_NO_ANCHOR.
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    m.put_anchor(AnchorKind::UtilityClient, 0, &pki.fw_cert)
        .unwrap();
    let r = transfer(&mut m, &good, &sha);
    assert_eq!(status_code(&r), ErrorCode::FwNoAnchor);
}

// --- 4.6 keys bits 8 and 9 / 4.8 KEYGEN after PUT_KEY ---

#[test]
fn keygen_replacing_a_delivered_key_clears_its_status_bit() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    let (pk8, kcv, _) = ec_key(1);
    m.put_key(KeyId::SignPrivate, KeyType::EcP256, &pk8, kcv)
        .unwrap();
    let (pk8b, kcvb, _) = ec_key(2);
    m.put_key(KeyId::KaPrivate, KeyType::EcP256, &pk8b, kcvb)
        .unwrap();
    m.put_key(KeyId::Guek, KeyType::Aes128, &[9; 16], [0; 3])
        .unwrap();
    assert_eq!(m.status().keys, 0x0301);
    m.keygen(CertSlot::Sign, Curve::P256, &[7; 32]).unwrap();
    assert_eq!(m.status().keys, 0x0201, "bit 8 cleared, bit 9 kept");
    m.keygen(CertSlot::KeyAgreement, Curve::P384, &[7; 32])
        .unwrap();
    assert_eq!(m.status().keys, 0x0001);
    // A key delivered again sets its bit again.
    m.put_key(KeyId::SignPrivate, KeyType::EcP256, &pk8, kcv)
        .unwrap();
    assert_eq!(m.status().keys, 0x0101);
}

/// A key delivered by PUT_KEY is not "generated in this session": KEYGEN after it makes a new
/// key pair even within the session of an earlier KEYGEN.
#[test]
fn keygen_after_put_key_in_the_same_session_makes_a_new_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    let session = [3u8; 32];
    m.keygen(CertSlot::Sign, Curve::P256, &session).unwrap();
    let (pk8, kcv, _) = ec_key(4);
    m.put_key(KeyId::SignPrivate, KeyType::EcP256, &pk8, kcv)
        .unwrap();
    let key_file = m.dir().join("key-sign.pk8");
    assert_eq!(std::fs::read(&key_file).unwrap(), pk8);
    m.keygen(CertSlot::Sign, Curve::P256, &session).unwrap();
    assert_ne!(
        std::fs::read(&key_file).unwrap(),
        pk8,
        "KEYGEN kept the delivered key"
    );
    assert_eq!(m.status().keys & 0x0100, 0);
}

// --- 4.11 PUT_KEY ---

/// Step 1: a key id with a type it does not take is MALFORMED.
#[test]
fn put_key_with_a_key_type_its_id_does_not_take_is_malformed() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    let (pk8, kcv, _) = ec_key(5);
    for id in [KeyId::Guek, KeyId::Gbek, KeyId::Ak, KeyId::Kek] {
        for t in [KeyType::EcP256, KeyType::EcP384] {
            let e = m.put_key(id, t, &pk8, kcv).unwrap_err();
            assert_eq!(e.code, ErrorCode::Malformed, "{id:?} {t:?}");
        }
    }
    for id in [KeyId::SignPrivate, KeyId::KaPrivate] {
        for (t, len) in [(KeyType::Aes128, 16), (KeyType::Aes256, 32)] {
            let e = m.put_key(id, t, &vec![7u8; len], [0; 3]).unwrap_err();
            assert_eq!(e.code, ErrorCode::Malformed, "{id:?} {t:?}");
        }
    }
    assert_eq!(m.status().keys, 0, "nothing was stored");
    assert!(m.state().key_pairs.is_empty());
}

/// Step 5: PUT_KEY 0x11/0x12 for a slot that holds a certificate for another key is UNEXPECTED;
/// the same key again is acknowledged.
#[test]
fn put_key_for_a_slot_certified_for_another_key_is_unexpected() {
    let pki = SoftPki::new();
    for (id, slot, file) in [
        (KeyId::SignPrivate, CertSlot::Sign, "key-sign.pk8"),
        (KeyId::KaPrivate, CertSlot::KeyAgreement, "key-ka.pk8"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut m = meter(dir.path());
        let (pk8, kcv, spki) = ec_key(10);
        m.put_key(id, KeyType::EcP256, &pk8, kcv).unwrap();
        let cert = issue(
            &pki.ca_key,
            "CN=Test Device CA",
            "CN=444D570000000001",
            spki,
            false,
            KeyUsages::DigitalSignature.into(),
            9,
        );
        m.put_cert(slot, &cert).unwrap();
        let (other, other_kcv, _) = ec_key(11);
        let e = m
            .put_key(id, KeyType::EcP256, &other, other_kcv)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unexpected, "{id:?}");
        assert_eq!(
            std::fs::read(m.dir().join(file)).unwrap(),
            pk8,
            "the certified key stays"
        );
        // The same key again (a retried PUT_KEY) is acknowledged.
        m.put_key(id, KeyType::EcP256, &pk8, kcv).unwrap();
        // Checked after the key check value: a wrong KCV is still KCV_MISMATCH.
        let e = m
            .put_key(id, KeyType::EcP256, &other, [0, 0, 0])
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::KcvMismatch);
    }
}

// --- 4.14 ATTEST ---

/// ATTEST with an identity and an active image but no signing key pair: NOT_READY.
#[test]
fn attest_without_a_signing_key_is_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let mut m = meter(dir.path());
    let pki = SoftPki::new();
    m.set_identity(&identity()).unwrap();
    m.put_anchor(AnchorKind::FirmwareVerification, 0, &pki.fw_cert)
        .unwrap();
    let good = pki.image(&payload());
    assert_eq!(transfer(&mut m, &good, &crypto::sha256(&good)).status, 0);
    let e = m.attest(&[1; 16]).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotReady, "{}", e.detail);
    // A key-agreement key pair is not a signing key.
    m.keygen(CertSlot::KeyAgreement, Curve::P256, &[1; 32])
        .unwrap();
    let e = m.attest(&[1; 16]).unwrap_err();
    assert_eq!(e.code, ErrorCode::NotReady, "{}", e.detail);
    // With the signing key pair it attests.
    m.keygen(CertSlot::Sign, Curve::P256, &[1; 32]).unwrap();
    let (receipt, sig) = m.attest(&[1; 16]).unwrap();
    assert!(!receipt.is_empty() && !sig.is_empty());
}

/// FW_BEGIN of another image forgets the old partial image before it overwrites its bytes: when
/// the write fails (`STORAGE`), no record claims bytes that are gone, and a resume of the old image
/// starts from 0.
#[test]
fn a_failed_fw_begin_leaves_no_record_of_the_image_it_destroyed() {
    let dir = tempfile::tempdir().unwrap();
    let old = payload();
    let old_sha = crypto::sha256(&old);
    let mut m = meter(dir.path());
    m.fw_begin(old.len() as u32, &old_sha).unwrap();
    m.fw_write(0, &old[..1000]).unwrap();
    m.fw_progress(1000);
    assert_eq!(m.fw_begin(old.len() as u32, &old_sha).unwrap(), 1000);
    // The staging area cannot be written (here: a directory where the file should be).
    let staging = m.dir().join("fw-staging.bin");
    std::fs::remove_file(&staging).unwrap();
    std::fs::create_dir(&staging).unwrap();
    let other = crypto::sha256(b"another image");
    let e = m.fw_begin(2000, &other).unwrap_err();
    assert_eq!(e.code, ErrorCode::Storage);
    std::fs::remove_dir(&staging).unwrap();
    // After a reboot the old image is not "held" any more.
    drop(m);
    let mut m = meter(dir.path());
    assert_eq!(m.fw_begin(old.len() as u32, &old_sha).unwrap(), 0);
}
