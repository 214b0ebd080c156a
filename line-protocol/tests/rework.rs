//! REWORK (line protocol 4.16): a sealed meter returns to blank only for a token the channel's
//! station key signed for this meter, this channel and the certificate it holds. Each test is an
//! attempt a forger or a careless station could make.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use line_protocol::crypto::sha256;
use line_protocol::meter::MeterEvent;
use line_protocol::msg::{self, CertSlot, ErrorCode, Identity, Lifecycle, Message, ResetMode};
use line_protocol::rework::ReworkToken;
use line_protocol::testkit::{Pair, station_sign};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{DerSignature, SigningKey};

const CERT: &[u8] = b"the signing certificate this cell issued";

/// A sealed meter that offers REWORK, with the channel open.
fn sealed(seed: u64) -> Pair {
    let mut p = Pair::new(seed);
    p.app.info.features |= msg::FEATURE_REWORK;
    p.app.lifecycle = Lifecycle::Sealed;
    p.app.disabled = msg::iface::ALL;
    p.app.identity = Some(Identity {
        serial: "SN1".into(),
        system_title: [1; 8],
        ldn: "LDN1".into(),
    });
    p.app.certs.insert(CertSlot::Sign as u8, CERT.to_vec());
    p.open();
    p
}

fn token(p: &Pair) -> ReworkToken {
    ReworkToken {
        uid: p.app.info.uid.clone(),
        session: p.host.transcript_hash().unwrap(),
        cert_sha256: sha256(CERT),
    }
}

fn rework(p: &mut Pair, token: Vec<u8>, signature: Vec<u8>) -> Message {
    p.call(&Message::Rework { token, signature })
}

fn refused(p: &mut Pair, token: Vec<u8>, signature: Vec<u8>) -> (ErrorCode, String) {
    match rework(p, token, signature) {
        Message::Error { code, detail } => {
            assert_eq!(
                p.app.lifecycle,
                Lifecycle::Sealed,
                "a refused token changes nothing"
            );
            assert!(p.app.certs.contains_key(&(CertSlot::Sign as u8)));
            assert_eq!(p.app.reworks, 0);
            (code, detail)
        }
        other => panic!("the meter accepted the token: {other:?}"),
    }
}

#[test]
fn a_token_for_this_meter_channel_and_certificate_returns_it_to_blank() {
    let mut p = sealed(31);
    let t = token(&p).encode();
    let sig = station_sign(&t);
    let (seq, bytes) = p
        .host
        .request(&Message::Rework {
            token: t,
            signature: sig,
        })
        .unwrap();
    let out = p.meter.receive(&bytes, &mut p.app, &mut p.rng);
    assert!(
        out.events.contains(&MeterEvent::Reworked),
        "{:?}",
        out.events
    );
    let ev = p.host.receive(&out.bytes);
    assert!(
        matches!(&ev[..], [line_protocol::host::Inbound::Message { msg: Message::Ack, reference, .. }] if *reference == seq),
        "{ev:?}"
    );
    assert_eq!(p.app.lifecycle, Lifecycle::Blank);
    assert!(p.app.certs.is_empty() && p.app.identity.is_none());
    assert_eq!(p.app.disabled, 0, "every interface is enabled again");
    assert_eq!(p.app.reworks, 1, "the meter keeps a record of the rework");
    assert!(!p.meter.is_secure(), "the channel ends with the rework");
}

#[test]
fn a_token_for_another_meter_is_refused() {
    let mut p = sealed(32);
    let mut t = token(&p);
    t.uid = vec![0x5A; 12];
    let t = t.encode();
    let sig = station_sign(&t);
    let (code, detail) = refused(&mut p, t, sig);
    assert_eq!(code, ErrorCode::ReworkRefused);
    assert_eq!(detail, "token is for another meter");
}

#[test]
fn a_token_from_an_earlier_channel_cannot_be_replayed() {
    let mut p = sealed(33);
    let old = token(&p).encode();
    let old_sig = station_sign(&old);
    // The token was recorded (say from the audit log) and the meter is back in a nest later.
    p.open();
    let (code, detail) = refused(&mut p, old, old_sig);
    assert_eq!(code, ErrorCode::ReworkRefused);
    assert_eq!(detail, "token is for another channel");
}

#[test]
fn a_token_naming_another_certificate_is_refused() {
    let mut p = sealed(34);
    let mut t = token(&p);
    t.cert_sha256 = sha256(b"a certificate of another meter");
    let t = t.encode();
    let sig = station_sign(&t);
    let (code, detail) = refused(&mut p, t, sig);
    assert_eq!(code, ErrorCode::ReworkRefused);
    assert_eq!(detail, "token names another certificate");
}

#[test]
fn a_token_signed_by_any_other_key_is_refused() {
    let mut p = sealed(35);
    let t = token(&p).encode();
    // A key that is not the channel's station key: a field meter's, a forger's.
    let other = SigningKey::from_slice(&[7; 32]).unwrap();
    let sig: DerSignature = other.sign(&t);
    let (code, _) = refused(&mut p, t.clone(), sig.as_bytes().to_vec());
    assert_eq!(code, ErrorCode::ReworkRefused);
    // A good signature over other bytes, and a token changed after it was signed.
    let (code, _) = refused(&mut p, t.clone(), station_sign(b"something else"));
    assert_eq!(code, ErrorCode::ReworkRefused);
    let mut changed = t.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    let (code, _) = refused(&mut p, changed, station_sign(&t));
    assert_eq!(code, ErrorCode::ReworkRefused);
    let (code, _) = refused(&mut p, t, b"not a signature".to_vec());
    assert_eq!(code, ErrorCode::ReworkRefused);
}

#[test]
fn a_malformed_token_is_malformed_and_a_meter_without_rework_says_so() {
    let mut p = sealed(36);
    let (code, _) = refused(&mut p, b"JIGW".to_vec(), station_sign(b"JIGW"));
    assert_eq!(code, ErrorCode::Malformed);
    let mut p = sealed(37);
    p.app.info.features &= !msg::FEATURE_REWORK;
    let t = token(&p).encode();
    let sig = station_sign(&t);
    let (code, _) = refused(&mut p, t, sig);
    assert_eq!(code, ErrorCode::UnknownType);
    // Without the feature the type is unknown whatever the payload.
    let (code, _) = refused(&mut p, b"JIGW".to_vec(), station_sign(b"JIGW"));
    assert_eq!(code, ErrorCode::UnknownType);
}

#[test]
fn without_a_token_a_sealed_meter_cannot_be_wiped() {
    let mut p = sealed(38);
    let answer = p.call(&Message::Reset {
        mode: ResetMode::FactoryWipe,
    });
    assert!(
        matches!(
            answer,
            Message::Error {
                code: ErrorCode::Locked,
                ..
            }
        ),
        "{answer:?}"
    );
    assert_eq!(p.app.lifecycle, Lifecycle::Sealed);
}
