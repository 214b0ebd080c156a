//! Rules of `schemas/line-protocol.md` checked one by one against the meter session, the codec,
//! the frame decoder and the image parser: the order of checks (section 4), HELLO (4.1),
//! CHANNEL_OPEN (4.3), PUT_KEY (4.11), the firmware transfer (4.12), the frame limit (2, 3.1) and
//! the image TLVs (6.4).

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use line_protocol::crypto::{self, kcv_aes, wrap_key};
use line_protocol::frame::{self, Decoded, Frame, FrameDecoder, FrameError, Header};
use line_protocol::host::{HostConfig, HostSession, Inbound};
use line_protocol::image::{self, ImageError, ImageVersion};
use line_protocol::meter::{MeterEvent, MeterOutput};
use line_protocol::msg::{
    Encoding, ErrorCode, FwData, KeyId, KeyType, Lifecycle, Message, PutKey, WrapAlg, ty,
};
use line_protocol::testkit::Pair;
use p256::ecdsa::SigningKey;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::elliptic_curve::Generate;

/// A plaintext frame as a host (or anyone on the line) would put it there.
fn plain_frame(msg_type: u8, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(
        &Header {
            msg_type,
            flags: 0,
            seq,
            reference: 0,
            len: 0,
        },
        payload,
        &mut out,
    );
    out
}

fn frames(bytes: &[u8]) -> Vec<Frame> {
    let mut dec = FrameDecoder::new(32768);
    let mut out = Vec::new();
    dec.push(bytes, &mut out);
    out.into_iter()
        .map(|d| match d {
            Decoded::Frame(f) => f,
            other => panic!("the meter sent a damaged frame: {other:?}"),
        })
        .collect()
}

/// The meter's single answer: its header and the message (decrypted by the host if encrypted).
#[derive(Debug)]
struct Answer {
    encrypted: bool,
    seq: u32,
    reference: u32,
    msg: Message,
}

impl Answer {
    fn code(&self) -> ErrorCode {
        match &self.msg {
            Message::Error { code, .. } => *code,
            other => panic!("expected ERROR, got {other:?}"),
        }
    }
}

fn answer(p: &mut Pair, out: &MeterOutput) -> Answer {
    let fs = frames(&out.bytes);
    assert_eq!(fs.len(), 1, "one answer expected: {fs:?}");
    let h = fs[0].header;
    assert!(h.is_response());
    let msg = if h.is_encrypted() {
        match p.host.receive(&out.bytes).as_slice() {
            [Inbound::Message { msg, .. }] => msg.clone(),
            other => panic!("{other:?}"),
        }
    } else {
        Message::decode(h.msg_type, &fs[0].payload).unwrap()
    };
    Answer {
        encrypted: h.is_encrypted(),
        seq: h.seq,
        reference: h.reference,
        msg,
    }
}

/// Sends `bytes` to the meter and returns its single answer.
fn send(p: &mut Pair, bytes: &[u8]) -> Answer {
    let out = p.meter.receive(bytes, &mut p.app, &mut p.rng);
    answer(p, &out)
}

/// An encrypted request of type `t` with any payload, on the channel.
fn send_raw(p: &mut Pair, t: u8, payload: Vec<u8>) -> (u32, Answer) {
    let (seq, bytes) = p.host.request_raw(t, payload).unwrap();
    (seq, send(p, &bytes))
}

const METER_TO_HOST: [u8; 11] = [
    ty::HELLO_ACK,
    ty::CHANNEL_READY,
    ty::ACK,
    ty::STATUS_RSP,
    ty::KEYGEN_RSP,
    ty::FW_BEGIN_RSP,
    ty::FW_ACK,
    ty::FW_RESULT,
    ty::SEAL_RSP,
    ty::ATTEST_RSP,
    ty::ERROR,
];

// --- Section 4, order of checks, step 2 ---

/// A type the meter sends is `UNEXPECTED` on a channel whatever its payload: it is not decoded.
/// The answer is encrypted and the channel stays up.
#[test]
fn meter_to_host_types_on_a_channel_are_unexpected_before_decoding() {
    let mut p = Pair::new(101);
    p.open();
    for t in METER_TO_HOST {
        // One byte: undecodable as any of these types.
        let (seq, a) = send_raw(&mut p, t, vec![0xFF]);
        assert_eq!(a.code(), ErrorCode::Unexpected, "type 0x{t:02x}");
        assert!(a.encrypted, "type 0x{t:02x}");
        assert_eq!(a.reference, seq);
        assert!(p.meter.is_secure(), "type 0x{t:02x} ended the channel");
    }
    // Unknown types are UNKNOWN_TYPE, encrypted too.
    let (_, a) = send_raw(&mut p, 0x55, vec![0xFF]);
    assert_eq!(a.code(), ErrorCode::UnknownType);
    assert!(a.encrypted);
}

/// On a sealed meter the type check comes before the lifecycle gate: `UNEXPECTED`, not `LOCKED`.
#[test]
fn meter_to_host_types_on_a_sealed_meter_are_unexpected_not_locked() {
    let mut p = Pair::new(102);
    p.open();
    p.app.lifecycle = Lifecycle::Sealed;
    for m in [
        Message::Ack,
        Message::FwBeginRsp { have: 0 },
        Message::Error {
            code: ErrorCode::Internal,
            detail: String::new(),
        },
    ] {
        let (_, a) = send_raw(&mut p, m.msg_type(), m.to_bytes());
        assert_eq!(a.code(), ErrorCode::Unexpected, "{}", m.name());
    }
    // A host request it does not take once sealed is still LOCKED.
    let (_, a) = send_raw(&mut p, ty::FW_END, vec![]);
    assert_eq!(a.code(), ErrorCode::Locked);
    // An unknown type is UNKNOWN_TYPE before the gate too.
    let (_, a) = send_raw(&mut p, 0x55, vec![]);
    assert_eq!(a.code(), ErrorCode::UnknownType);
}

/// Without a channel a type the meter sends is `NO_CHANNEL` (plaintext), whatever its payload,
/// and changes nothing: the CHANNEL_OPEN that follows opens the channel.
#[test]
fn meter_to_host_types_without_a_channel_are_no_channel() {
    let mut p = Pair::new(103);
    let hello = p.host.hello([1; 16]);
    p.exchange(&hello);
    for (i, t) in METER_TO_HOST.into_iter().enumerate() {
        let seq = 100 + i as u32;
        let a = send(&mut p, &plain_frame(t, seq, &[0xFF]));
        assert_eq!(a.code(), ErrorCode::NoChannel, "type 0x{t:02x}");
        assert!(!a.encrypted);
        assert_eq!(a.reference, seq);
    }
    let a = send(&mut p, &plain_frame(0x55, 200, &[0xFF]));
    assert_eq!(a.code(), ErrorCode::UnknownType);
    let open = p.channel_open();
    let a = send(&mut p, &open);
    assert!(matches!(a.msg, Message::ChannelReady { .. }), "{a:?}");
}

// --- Section 4.1: a HELLO that fails to decode ---

/// A plaintext HELLO that does not decode, on a channel: the channel ends, the send counter
/// restarts at 0 and the ERROR is plaintext.
#[test]
fn a_plaintext_hello_that_fails_to_decode_ends_the_channel() {
    let mut p = Pair::new(104);
    p.open();
    assert_eq!(p.call(&Message::Status).msg_type(), ty::STATUS_RSP);
    let a = send(&mut p, &plain_frame(ty::HELLO, 50, &[1]));
    assert_eq!(a.code(), ErrorCode::Malformed);
    assert!(!a.encrypted, "the ERROR is plaintext");
    assert_eq!((a.seq, a.reference), (0, 50));
    assert!(!p.meter.is_secure(), "the channel ends");
    // The host's encrypted frames now find no channel.
    let (_, bytes) = p.host.request(&Message::Status).unwrap();
    let a = send(&mut p, &bytes);
    assert_eq!(a.code(), ErrorCode::NoChannel);
}

/// The same for an authentic encrypted HELLO that does not decode.
#[test]
fn an_encrypted_hello_that_fails_to_decode_ends_the_channel() {
    let mut p = Pair::new(105);
    p.open();
    let (seq, a) = send_raw(&mut p, ty::HELLO, vec![1, 1]);
    assert_eq!(a.code(), ErrorCode::Malformed);
    assert!(!a.encrypted);
    assert_eq!((a.seq, a.reference), (0, seq));
    assert!(!p.meter.is_secure());
}

// --- Section 4 (decoding) and 4.3: chain_count ---

fn channel_open_payload(count: u8, certs: usize) -> Vec<u8> {
    let mut b = vec![4u8; 65];
    b.extend_from_slice(&[4u8; 65]);
    b.push(count);
    for _ in 0..certs {
        b.extend_from_slice(&3u16.to_le_bytes());
        b.extend_from_slice(&[0x30, 0x01, 0x00]);
    }
    b.push(2);
    b.extend_from_slice(&[0x30, 0x00]);
    b
}

/// A `chain_count` above 4 is `TOO_LARGE` (checked when it is read, so also when the
/// certificates it announces are missing); 0 is `MALFORMED`.
#[test]
fn channel_open_chain_count_above_four_is_too_large() {
    for (count, certs) in [(5u8, 5usize), (5, 0), (255, 0)] {
        let e = Message::decode(ty::CHANNEL_OPEN, &channel_open_payload(count, certs)).unwrap_err();
        assert_eq!(e.code(), ErrorCode::TooLarge, "count {count}");
    }
    let e = Message::decode(ty::CHANNEL_OPEN, &channel_open_payload(0, 0)).unwrap_err();
    assert_eq!(e.code(), ErrorCode::Malformed);
    assert!(Message::decode(ty::CHANNEL_OPEN, &channel_open_payload(4, 4)).is_ok());

    // At the meter, before the channel: a plaintext TOO_LARGE that changes nothing.
    let mut p = Pair::new(106);
    let hello = p.host.hello([2; 16]);
    p.exchange(&hello);
    let a = send(
        &mut p,
        &plain_frame(ty::CHANNEL_OPEN, 77, &channel_open_payload(5, 5)),
    );
    assert_eq!(a.code(), ErrorCode::TooLarge);
    assert!(!a.encrypted);
    assert_eq!(a.reference, 77);
}

// --- Section 4.12: FW_BEGIN compression ---

#[test]
fn fw_begin_compression_above_one_is_malformed() {
    let mut p = Pair::new(107);
    p.open();
    let begin = |size, compression| Message::FwBegin {
        size,
        sha256: [0x11; 32],
        compression,
    };
    let code = |m: Message| match m {
        Message::Error { code, .. } => code,
        other => panic!("{other:?}"),
    };
    assert_eq!(code(p.call(&begin(1000, 2))), ErrorCode::Malformed);
    assert_eq!(code(p.call(&begin(1000, 0xFF))), ErrorCode::Malformed);
    // The size is checked first.
    assert_eq!(code(p.call(&begin(0, 2))), ErrorCode::FwTooLarge);
    assert!(matches!(
        p.call(&begin(1000, 1)),
        Message::FwBeginRsp { .. }
    ));

    // 1 without DEFLATE negotiated stays UNEXPECTED.
    let mut q = Pair::new(108);
    q.host = HostSession::new(HostConfig {
        features: 0,
        ..HostConfig::default()
    });
    q.open();
    assert_eq!(code(q.call(&begin(1000, 1))), ErrorCode::Unexpected);
    assert_eq!(code(q.call(&begin(1000, 2))), ErrorCode::Malformed);
}

// --- Section 4.12: the decoded block limit ---

/// DEFLATE blocks may decode to max(`max_block`, A − 25), A the meter's advertised
/// `max_payload`; raw blocks are bounded by their frame only (a length mismatch is MALFORMED).
#[test]
fn deflate_block_limit_follows_max_block_and_the_advertised_payload() {
    let mut p = Pair::new(109);
    p.app.info.max_block = 4096;
    p.open();
    let advertised = usize::from(p.host.meter().unwrap().max_payload);
    assert_eq!(advertised, 8192);
    let limit = (advertised - 25) as u32; // 8167 > max_block
    let image: Vec<u8> = (0..100_000u32).map(|i| (i / 64 % 7) as u8).collect();
    assert!(matches!(
        p.call(&Message::FwBegin {
            size: image.len() as u32,
            sha256: crypto::sha256(&image),
            compression: 1,
        }),
        Message::FwBeginRsp { have: 0 }
    ));
    let deflate = |offset: u32, raw_len: u32| {
        let part = &image[offset as usize..(offset + raw_len) as usize];
        Message::FwData(FwData {
            offset,
            raw_len,
            encoding: Encoding::Deflate,
            data: miniz_oxide::deflate::compress_to_vec(part, 6),
        })
    };
    // At the limit: taken (above max_block, within one frame's data room).
    assert!(matches!(p.call(&deflate(0, limit)), Message::FwAck(_)));
    // One above: TOO_LARGE.
    match p.call(&deflate(limit, limit + 1)) {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("{other:?}"),
    }
    // A raw block is not checked against that limit: its data must simply match raw_len.
    let raw = Message::FwData(FwData {
        offset: 20_000,
        raw_len: 40_000,
        encoding: Encoding::Raw,
        data: image[20_000..20_100].to_vec(),
    });
    match p.call(&raw) {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::Malformed),
        other => panic!("{other:?}"),
    }
}

/// With `max_block` above the frame room, `max_block` is the DEFLATE limit.
#[test]
fn deflate_block_limit_is_max_block_when_larger() {
    let mut p = Pair::new(110);
    p.app.info.max_block = 16384;
    p.open();
    let image = vec![0x77u8; 40_000];
    assert!(matches!(
        p.call(&Message::FwBegin {
            size: image.len() as u32,
            sha256: crypto::sha256(&image),
            compression: 1,
        }),
        Message::FwBeginRsp { have: 0 }
    ));
    let d = |offset: u32, raw_len: u32| {
        Message::FwData(FwData {
            offset,
            raw_len,
            encoding: Encoding::Deflate,
            data: miniz_oxide::deflate::compress_to_vec(&image[..raw_len as usize], 6),
        })
    };
    assert!(matches!(p.call(&d(0, 16384)), Message::FwAck(_)));
    match p.call(&d(16384, 16385)) {
        Message::Error { code, .. } => assert_eq!(code, ErrorCode::TooLarge),
        other => panic!("{other:?}"),
    }
}

// --- Section 4.11: PUT_KEY pairing ---

/// A key id with a key type it does not take is MALFORMED, before anything is unwrapped.
#[test]
fn put_key_with_a_key_type_its_id_does_not_take_is_malformed() {
    let mut p = Pair::new(111);
    p.open();
    let ktk = p.host_ktk();
    let code = |m: Message| match m {
        Message::Error { code, .. } => code,
        other => panic!("{other:?}"),
    };
    // A secret key id with an EC type, and a wrapping that would not even unwrap.
    let put = PutKey {
        key_id: KeyId::Guek,
        key_type: KeyType::EcP256,
        wrap: WrapAlg::AesKwp,
        kcv: [0; 3],
        wrapped: vec![0x5A; 40],
    };
    assert_eq!(code(p.call(&Message::PutKey(put))), ErrorCode::Malformed);
    // A private-key id with an AES type, wrapped well and with the right check value.
    let aes = [0x42u8; 16];
    for key_id in [KeyId::SignPrivate, KeyId::KaPrivate] {
        let put = PutKey {
            key_id,
            key_type: KeyType::Aes128,
            wrap: WrapAlg::AesKw,
            kcv: kcv_aes(&aes).unwrap(),
            wrapped: wrap_key(&ktk, WrapAlg::AesKw, &aes).unwrap(),
        };
        assert_eq!(
            code(p.call(&Message::PutKey(put))),
            ErrorCode::Malformed,
            "{key_id:?}"
        );
    }
    assert!(p.app.secrets.is_empty(), "nothing was stored");
    // The right pairing is taken.
    let put = PutKey {
        key_id: KeyId::Guek,
        key_type: KeyType::Aes128,
        wrap: WrapAlg::AesKw,
        kcv: kcv_aes(&aes).unwrap(),
        wrapped: wrap_key(&ktk, WrapAlg::AesKw, &aes).unwrap(),
    };
    assert_eq!(p.call(&Message::PutKey(put)), Message::Ack);
}

// --- Sections 2 and 3.1: the frame limit is on the unstuffed frame ---

/// COBS adds almost nothing to a run of zeros, so a zero-filled payload above the limit fits the
/// stuffed budget: the decoder must still drop it as oversized.
#[test]
fn the_frame_decoder_limits_the_unstuffed_frame() {
    for (len, ok) in [
        (4096usize, true),
        (4097, false),
        (4100, false),
        (4112, false),
    ] {
        let mut dec = FrameDecoder::new(4096);
        let mut out = Vec::new();
        let w = plain_frame(ty::FW_DATA, 1, &vec![0u8; len]);
        // Its stuffed block is within the stuffed budget L + ceil(L / 254).
        let l: usize = 4096 + 18;
        assert!(w.len() - 1 <= l + l.div_ceil(254), "{len}");
        dec.push(&w, &mut out);
        if ok {
            assert!(matches!(&out[..], [Decoded::Frame(f)] if f.payload.len() == len));
        } else {
            let got: Vec<_> = out
                .iter()
                .map(|d| match d {
                    Decoded::Frame(f) => format!("frame with a {}-byte payload", f.payload.len()),
                    Decoded::Dropped(e) => format!("dropped: {}", e.name()),
                })
                .collect();
            assert_eq!(got, vec!["dropped: oversized"], "{len}");
            assert_eq!(dec.stats().oversized, 1);
        }
        // The next frame is received normally.
        let mut out = Vec::new();
        dec.push(&plain_frame(ty::ACK, 2, &[]), &mut out);
        assert!(matches!(&out[..], [Decoded::Frame(_)]), "{len}");
    }
}

/// The meter never answers an oversized frame.
#[test]
fn an_oversized_zero_filled_frame_is_dropped_by_the_meter_unanswered() {
    let mut p = Pair::new(112);
    // Before HELLO_ACK this meter (advertising 8192) takes 8192-byte payloads.
    let out = p.meter.receive(
        &plain_frame(ty::HELLO, 0, &vec![0u8; 8200]),
        &mut p.app,
        &mut p.rng,
    );
    assert!(out.bytes.is_empty(), "answered an oversized frame");
    assert_eq!(out.events, vec![MeterEvent::Dropped(FrameError::Oversized)]);
    assert_eq!(p.meter.frame_stats().oversized, 1);
    // On the channel the same: the channel survives it.
    p.open();
    let out = p.meter.receive(
        &plain_frame(ty::STATUS, 9, &vec![0u8; 8200]),
        &mut p.app,
        &mut p.rng,
    );
    assert!(out.bytes.is_empty());
    assert!(p.meter.is_secure());
}

// --- Section 6.4: image TLVs ---

/// An MCUboot image of a fixed payload with the given protected TLVs and the unprotected TLVs
/// `tlvs` makes from (hash, signature DER, key hash).
fn build_image(
    key: &SigningKey,
    protected: &[(u16, Vec<u8>)],
    tlvs: impl FnOnce([u8; 32], Vec<u8>, [u8; 32]) -> Vec<(u16, Vec<u8>)>,
) -> Vec<u8> {
    let payload: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
    let version = ImageVersion {
        major: 1,
        minor: 0,
        revision: 0,
        build: 0,
    };
    let mut prot = Vec::new();
    if !protected.is_empty() {
        let mut area = Vec::new();
        for (t, v) in protected {
            image::put_tlv(&mut area, *t, v);
        }
        prot.extend_from_slice(&image::TLV_PROT_INFO_MAGIC.to_le_bytes());
        prot.extend_from_slice(&((area.len() + 4) as u16).to_le_bytes());
        prot.extend_from_slice(&area);
    }
    let mut img = image::header_bytes(0, 32, payload.len() as u32, version).to_vec();
    img[10..12].copy_from_slice(&(prot.len() as u16).to_le_bytes());
    img.extend_from_slice(&payload);
    img.extend_from_slice(&prot);
    let hash = crypto::sha256(&img);
    let sig: p256::ecdsa::Signature = key.sign_prehash(&hash).unwrap();
    let kh = image::key_hash(&p256::PublicKey::from(key.verifying_key()));
    let mut area = Vec::new();
    for (t, v) in tlvs(hash, sig.to_der().as_bytes().to_vec(), kh) {
        image::put_tlv(&mut area, t, &v);
    }
    img.extend_from_slice(&image::TLV_INFO_MAGIC.to_le_bytes());
    img.extend_from_slice(&((area.len() + 4) as u16).to_le_bytes());
    img.extend_from_slice(&area);
    img
}

fn signer() -> (SigningKey, p256::PublicKey) {
    let k = SigningKey::generate_from_rng(&mut line_protocol::testkit::SeededRng::new(61));
    let pk = p256::PublicKey::from(k.verifying_key());
    (k, pk)
}

#[test]
fn a_second_signature_or_key_hash_tlv_is_a_format_error() {
    let (k, pk) = signer();
    let good = build_image(&k, &[], |h, s, kh| {
        vec![
            (image::TLV_SHA256, h.to_vec()),
            (image::TLV_KEYHASH, kh.to_vec()),
            (image::TLV_ECDSA_SIG, s),
        ]
    });
    assert!(image::verify(&good, &pk).is_ok());
    // Each unprotected TLV at most once; not "the last one wins" either (a bad signature first
    // and the good one second).
    type Tlvs = fn([u8; 32], Vec<u8>, [u8; 32]) -> Vec<(u16, Vec<u8>)>;
    let cases: [(&str, Tlvs); 4] = [
        ("two signatures", |h, s, kh| {
            vec![
                (image::TLV_SHA256, h.to_vec()),
                (image::TLV_KEYHASH, kh.to_vec()),
                (image::TLV_ECDSA_SIG, s.clone()),
                (image::TLV_ECDSA_SIG, s),
            ]
        }),
        ("a bad signature, then the good one", |h, s, _| {
            vec![
                (image::TLV_SHA256, h.to_vec()),
                (image::TLV_ECDSA_SIG, vec![0x30, 0x00]),
                (image::TLV_ECDSA_SIG, s),
            ]
        }),
        ("two key hashes", |h, s, kh| {
            vec![
                (image::TLV_SHA256, h.to_vec()),
                (image::TLV_KEYHASH, kh.to_vec()),
                (image::TLV_KEYHASH, kh.to_vec()),
                (image::TLV_ECDSA_SIG, s),
            ]
        }),
        ("two hashes", |h, s, _| {
            vec![
                (image::TLV_SHA256, h.to_vec()),
                (image::TLV_SHA256, h.to_vec()),
                (image::TLV_ECDSA_SIG, s),
            ]
        }),
    ];
    for (what, tlvs) in cases {
        let img = build_image(&k, &[], tlvs);
        assert!(
            matches!(image::verify(&img, &pk), Err(ImageError::Format(_))),
            "{what}"
        );
    }
}

/// Of the protected area only the structure is checked: its TLVs count through the hash alone,
/// so repeated types there (0x10, 0x01, 0x22 included) are no error.
#[test]
fn repeated_tlvs_in_the_protected_area_count_through_the_hash_alone() {
    let (k, pk) = signer();
    let protected = vec![
        (image::TLV_SHA256, vec![1u8; 32]),
        (image::TLV_SHA256, vec![2u8; 7]),
        (image::TLV_KEYHASH, vec![3u8; 32]),
        (image::TLV_KEYHASH, vec![4u8; 32]),
        (image::TLV_ECDSA_SIG, vec![5u8; 10]),
        (image::TLV_ECDSA_SIG, vec![6u8; 10]),
    ];
    let img = build_image(&k, &protected, |h, s, kh| {
        vec![
            (image::TLV_SHA256, h.to_vec()),
            (image::TLV_KEYHASH, kh.to_vec()),
            (image::TLV_ECDSA_SIG, s),
        ]
    });
    let info = image::verify(&img, &pk).unwrap();
    assert_eq!(info.key_hash, Some(image::key_hash(&pk)));
    // The structure of the protected area is still checked: a TLV running past it.
    let mut broken = protected.clone();
    broken.push((0x40, vec![]));
    let mut img = build_image(&k, &broken, |h, s, _| {
        vec![(image::TLV_SHA256, h.to_vec()), (image::TLV_ECDSA_SIG, s)]
    });
    // The last protected TLV (type 0x40, length 0) now claims 9 bytes.
    let hdr = 32 + 300;
    let prot_size = u16::from_le_bytes([img[hdr + 2], img[hdr + 3]]) as usize;
    let last_len_at = hdr + prot_size - 2;
    img[last_len_at] = 9;
    assert!(matches!(image::parse(&img), Err(ImageError::Format(_))));
}
