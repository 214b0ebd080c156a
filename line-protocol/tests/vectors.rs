//! The test vectors of `schemas/line-protocol-vectors.json`: every frame and message vector is
//! decoded and compared with the meaning written next to it, every valid one re-encoded to the same
//! bytes, and the channel vector recomputed from its published keys. The vectors above the codec
//! (certificate requests, firmware images, attestation, EC key delivery, ERROR frames, station
//! chains, replay and tampering, decompression) are checked with the crate's own meter-side code
//! and, where a meter answers, produced by a real meter session. The file itself is produced by
//! this code (`UPDATE_VECTORS=1 cargo test -p line-protocol --test vectors`) and must not drift.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use std::path::PathBuf;

use der::asn1::{BitString, OctetString, SetOfVec};
use der::oid::{AssociatedOid, ObjectIdentifier};
use der::{Decode, Encode};
use line_protocol::chain;
use line_protocol::crypto::{self, kcv_aes, wrap_key};
use line_protocol::frame::{self, Decoded, FrameDecoder, Header};
use line_protocol::host::{HostConfig, HostSession};
use line_protocol::meter::MeterSession;
use line_protocol::msg::*;
use line_protocol::receipt::Receipt;
use line_protocol::rework::ReworkToken;
use line_protocol::testkit::{MemMeter, STATION_DER, SeededRng, station_sign};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::signature::hazmat::PrehashSigner;
use p256::ecdsa::{DerSignature, SigningKey};
use p256::elliptic_curve::Generate;
use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use serde_json::{Value, json};
use x509_cert::Certificate;
use x509_cert::attr::Attribute;
use x509_cert::ext::Extension;
use x509_cert::ext::pkix::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages,
    SubjectKeyIdentifier,
};
use x509_cert::name::Name;
use x509_cert::request::{CertReq, CertReqInfo, ExtensionReq};
use x509_cert::spki::{AlgorithmIdentifierOwned, SubjectPublicKeyInfoOwned};

fn path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/line-protocol-vectors.json")
}

fn h(b: &[u8]) -> String {
    hex::encode(b)
}

/// The fields of a message, named as in the specification.
fn fields(m: &Message) -> Value {
    match m {
        Message::Hello(x) => {
            json!({"version_min": x.version_min, "version_max": x.version_max, "nonce": h(&x.nonce), "max_payload": x.max_payload, "window": x.window, "features": x.features})
        }
        Message::HelloAck(x) => {
            json!({"version": x.version, "lifecycle": x.lifecycle as u8, "uid": h(&x.uid), "model": x.model, "bootloader": h(&x.bootloader), "max_payload": x.max_payload, "window": x.window, "features": x.features, "max_block": x.max_block, "slot_size": x.slot_size, "nonce": h(&x.nonce), "eph_pub": h(&x.eph_pub)})
        }
        Message::ChannelOpen(x) => {
            json!({"eph_pub": h(&x.eph_pub), "kt_pub": h(&x.kt_pub), "certificates": x.chain.iter().map(|c| h(c)).collect::<Vec<_>>(), "signature": h(&x.signature)})
        }
        Message::ChannelReady { session_id } => json!({"session_id": h(session_id)}),
        Message::Ack | Message::Status | Message::FwEnd => json!({}),
        Message::StatusRsp(s) => {
            json!({"lifecycle": s.lifecycle, "identity": s.identity, "certs": s.certs, "keys": s.keys, "anchors": s.anchors, "fw_state": s.fw_state, "fw_size": s.fw_size, "fw_have": s.fw_have, "fw_sha256": h(&s.fw_sha256)})
        }
        Message::Identity(i) => {
            json!({"serial": i.serial, "system_title": h(&i.system_title), "ldn": i.ldn})
        }
        Message::KeyGen { slot, curve } => json!({"slot": *slot as u8, "curve": *curve as u8}),
        Message::KeyGenRsp { slot, csr } => json!({"slot": *slot as u8, "csr": h(csr)}),
        Message::PutCert { slot, der } => json!({"slot": *slot as u8, "der": h(der)}),
        Message::PutAnchor { kind, index, der } => {
            json!({"kind": *kind as u8, "index": index, "der": h(der)})
        }
        Message::PutKey(k) => {
            json!({"key_id": k.key_id as u8, "key_type": k.key_type as u8, "wrap": k.wrap as u8, "kcv": h(&k.kcv), "wrapped": h(&k.wrapped)})
        }
        Message::FwBegin {
            size,
            sha256,
            compression,
        } => json!({"size": size, "sha256": h(sha256), "compression": compression}),
        Message::FwBeginRsp { have } => json!({"have": have}),
        Message::FwData(d) => {
            json!({"offset": d.offset, "raw_len": d.raw_len, "encoding": d.encoding as u8, "data": h(&d.data)})
        }
        Message::FwAck(a) => {
            json!({"have": a.have, "ranges": a.ranges.iter().map(|(s, e)| json!([s, e])).collect::<Vec<_>>()})
        }
        Message::FwResult(r) => {
            json!({"status": r.status, "sha256": h(&r.sha256), "version": h(&r.version)})
        }
        Message::Seal { disable } => json!({"disable": disable}),
        Message::SealRsp {
            lifecycle,
            disabled,
        } => json!({"lifecycle": *lifecycle as u8, "disabled": disabled}),
        Message::Attest { nonce } => json!({"nonce": h(nonce)}),
        Message::AttestRsp { receipt, signature } => {
            json!({"receipt": h(receipt), "signature": h(signature)})
        }
        Message::Reset { mode } => json!({"mode": *mode as u8}),
        Message::Rework { token, signature } => {
            json!({"token": h(token), "signature": h(signature)})
        }
        Message::Error { code, detail } => json!({"code": code.code(), "detail": detail}),
        other => panic!("no description for {}", other.name()),
    }
}

fn sample_messages() -> Vec<(&'static str, Message)> {
    let deflated = miniz_oxide::deflate::compress_to_vec(&[0xFFu8; 4096], 6);
    vec![
        (
            "hello",
            Message::Hello(Hello {
                version_min: 1,
                version_max: 1,
                nonce: [0x11; 16],
                max_payload: 16384,
                window: 16,
                features: FEATURE_DEFLATE,
            }),
        ),
        (
            "hello_ack",
            Message::HelloAck(HelloAck {
                version: 1,
                lifecycle: Lifecycle::Blank,
                uid: vec![0xA5; 12],
                model: "EM-300".into(),
                bootloader: [2, 1, 0],
                max_payload: 8192,
                window: 8,
                features: 0x07,
                max_block: 65536,
                slot_size: 1 << 20,
                nonce: [0x22; 16],
                eph_pub: [0x04; 65],
            }),
        ),
        (
            "channel_ready",
            Message::ChannelReady {
                session_id: [0x33; 8],
            },
        ),
        ("ack", Message::Ack),
        ("status", Message::Status),
        (
            "status_rsp",
            Message::StatusRsp(Status {
                lifecycle: 1,
                identity: 1,
                certs: 5,
                keys: 0x000F,
                anchors: 1,
                fw_state: 1,
                fw_size: 262_144,
                fw_have: 65_536,
                fw_sha256: [0x44; 32],
            }),
        ),
        (
            "identity",
            Message::Identity(Identity {
                serial: SERIAL.into(),
                system_title: SYSTEM_TITLE,
                ldn: LDN.into(),
            }),
        ),
        (
            "keygen",
            Message::KeyGen {
                slot: CertSlot::KeyAgreement,
                curve: Curve::P384,
            },
        ),
        (
            "keygen_rsp",
            Message::KeyGenRsp {
                slot: CertSlot::Sign,
                csr: vec![0x30, 0x03, 0x02, 0x01, 0x00],
            },
        ),
        (
            "put_cert",
            Message::PutCert {
                slot: CertSlot::DeviceCa,
                der: vec![0x30, 0x00],
            },
        ),
        (
            "put_anchor",
            Message::PutAnchor {
                kind: AnchorKind::FirmwareVerification,
                index: 0,
                der: vec![0x30, 0x00],
            },
        ),
        (
            "put_key",
            Message::PutKey(PutKey {
                key_id: KeyId::Ak,
                key_type: KeyType::Aes256,
                wrap: WrapAlg::AesKwp,
                kcv: [1, 2, 3],
                wrapped: vec![0x55; 40],
            }),
        ),
        (
            "fw_begin",
            Message::FwBegin {
                size: 262_144,
                sha256: [0x66; 32],
                compression: 1,
            },
        ),
        ("fw_begin_rsp", Message::FwBeginRsp { have: 49_152 }),
        (
            "fw_data_raw",
            Message::FwData(FwData {
                offset: 16_384,
                raw_len: 4,
                encoding: Encoding::Raw,
                data: vec![0xDE, 0xAD, 0xBE, 0xEF],
            }),
        ),
        (
            "fw_data_deflate",
            Message::FwData(FwData {
                offset: 0,
                raw_len: 4096,
                encoding: Encoding::Deflate,
                data: deflated,
            }),
        ),
        (
            "fw_ack",
            Message::FwAck(FwAck {
                have: 8192,
                ranges: vec![(16_384, 24_576), (32_768, 40_960)],
            }),
        ),
        ("fw_end", Message::FwEnd),
        (
            "fw_result",
            Message::FwResult(FwResult {
                status: 0,
                sha256: [0x77; 32],
                version: [1, 4, 2, 0, 0, 0, 0, 0],
            }),
        ),
        (
            "seal",
            Message::Seal {
                disable: iface::PROVISIONING | iface::DEBUG,
            },
        ),
        (
            "seal_rsp",
            Message::SealRsp {
                lifecycle: Lifecycle::Sealed,
                disabled: 3,
            },
        ),
        ("attest", Message::Attest { nonce: [0x88; 16] }),
        (
            "attest_rsp",
            Message::AttestRsp {
                receipt: vec![0x4A, 0x49, 0x47, 0x52],
                signature: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
            },
        ),
        (
            "reset",
            Message::Reset {
                mode: ResetMode::Release,
            },
        ),
        (
            "rework",
            Message::Rework {
                token: b"JIGW\x01".to_vec(),
                signature: vec![0x30, 0x06, 0x02, 0x01, 0x01, 0x02, 0x01, 0x01],
            },
        ),
        (
            "error",
            Message::Error {
                code: ErrorCode::FwHashMismatch,
                detail: "image hash differs".into(),
            },
        ),
    ]
}

fn invalid_messages() -> Vec<(&'static str, u8, Vec<u8>, &'static str)> {
    vec![
        (
            "truncated identity",
            ty::IDENTITY,
            vec![5, b'A', b'B'],
            "MALFORMED",
        ),
        (
            "trailing byte after status",
            ty::STATUS,
            vec![0],
            "MALFORMED",
        ),
        ("undefined slot", ty::KEYGEN, vec![9, 1], "MALFORMED"),
        (
            "non-printable serial",
            ty::IDENTITY,
            [vec![2, b'A', 0x07], vec![0; 8], vec![1, b'L']].concat(),
            "MALFORMED",
        ),
        (
            "certificate longer than 2048",
            ty::PUT_CERT,
            [vec![1], 2049u16.to_le_bytes().to_vec()].concat(),
            "TOO_LARGE",
        ),
        (
            "nine sack ranges",
            ty::FW_ACK,
            [vec![0, 0, 0, 0, 9], vec![0; 72]].concat(),
            "TOO_LARGE",
        ),
        ("unknown type 0x55", 0x55, vec![], "UNKNOWN_TYPE"),
    ]
}

/// The name section 7 gives a code.
fn code_name(c: ErrorCode) -> &'static str {
    use ErrorCode::*;
    match c {
        Other(0) => "OK",
        Malformed => "MALFORMED",
        UnsupportedVersion => "UNSUPPORTED_VERSION",
        UnknownType => "UNKNOWN_TYPE",
        Unexpected => "UNEXPECTED",
        TooLarge => "TOO_LARGE",
        NoChannel => "NO_CHANNEL",
        BadCertChain => "BAD_CERT_CHAIN",
        BadSignature => "BAD_SIGNATURE",
        DecryptFailed => "DECRYPT_FAILED",
        Replay => "REPLAY",
        Locked => "LOCKED",
        NotReady => "NOT_READY",
        UnwrapFailed => "UNWRAP_FAILED",
        KcvMismatch => "KCV_MISMATCH",
        CertKeyMismatch => "CERT_KEY_MISMATCH",
        IdentityMismatch => "IDENTITY_MISMATCH",
        UnsupportedCurve => "UNSUPPORTED_CURVE",
        KeygenFailed => "KEYGEN_FAILED",
        Storage => "STORAGE",
        ReworkRefused => "REWORK_REFUSED",
        FwOutOfRange => "FW_OUT_OF_RANGE",
        FwDecompress => "FW_DECOMPRESS",
        FwIncomplete => "FW_INCOMPLETE",
        FwHashMismatch => "FW_HASH_MISMATCH",
        FwSignatureInvalid => "FW_SIGNATURE_INVALID",
        FwFormat => "FW_FORMAT",
        FwNoAnchor => "FW_NO_ANCHOR",
        FwTooLarge => "FW_TOO_LARGE",
        FwNotStarted => "FW_NOT_STARTED",
        Internal => "INTERNAL",
        _ => "OTHER",
    }
}

fn wire(msg_type: u8, flags: u8, seq: u32, reference: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode(
        &Header {
            msg_type,
            flags,
            seq,
            reference,
            len: 0,
        },
        payload,
        &mut out,
    );
    out
}

fn frame_vectors() -> Vec<Value> {
    let mut v = Vec::new();
    let hello = sample_messages()[0].1.to_bytes();
    let good = wire(ty::HELLO, 0, 0, 0, &hello);
    v.push(json!({"name": "HELLO, plaintext", "hex": h(&good)}));
    v.push(json!({"name": "STATUS_RSP answering seq 7, zeros in the payload", "hex": h(&wire(ty::STATUS_RSP, frame::FLAG_RSP, 3, 7, &sample_messages()[5].1.to_bytes()))}));
    v.push(
        json!({"name": "ACK, empty payload", "hex": h(&wire(ty::ACK, frame::FLAG_RSP, 1, 0, &[]))}),
    );
    let long: Vec<u8> = (0..600u32).map(|i| (i % 255 + 1) as u8).collect();
    v.push(json!({"name": "600-byte payload without zeros (COBS groups of 254)", "hex": h(&wire(ty::FW_DATA, 0, 9, 0, &long))}));
    // Invalid frames: build each from a good one.
    let mut raw = Vec::new();
    line_protocol::cobs::decode_into(&good[..good.len() - 1], &mut raw).unwrap();
    let restuff = |r: &[u8]| {
        let mut o = Vec::new();
        line_protocol::cobs::encode_into(r, &mut o);
        o.push(0);
        o
    };
    let fix_crc = |r: &mut Vec<u8>| {
        let n = r.len() - 4;
        let c = frame::crc32c(&r[..n]);
        r[n..].copy_from_slice(&c.to_le_bytes());
    };
    let mut bad = raw.clone();
    bad[20] ^= 0x01;
    v.push(json!({"name": "payload bit flipped", "hex": h(&restuff(&bad)), "error": "crc"}));
    let mut bad = raw.clone();
    bad[0] = 2;
    fix_crc(&mut bad);
    v.push(json!({"name": "version 2", "hex": h(&restuff(&bad)), "error": "version"}));
    let mut bad = raw.clone();
    bad[2] = 0x04;
    fix_crc(&mut bad);
    v.push(json!({"name": "reserved flag bit set", "hex": h(&restuff(&bad)), "error": "reserved"}));
    let mut bad = raw.clone();
    bad[12] = bad[12].wrapping_add(1);
    fix_crc(&mut bad);
    v.push(
        json!({"name": "length field one too large", "hex": h(&restuff(&bad)), "error": "length"}),
    );
    v.push(json!({"name": "ten bytes", "hex": h(&restuff(&raw[..10])), "error": "truncated"}));
    v.push(json!({"name": "code byte past the end", "hex": "05aabb00", "error": "stuffing"}));
    let big = wire(ty::FW_DATA, 0, 1, 0, &vec![0x5A; 5000]);
    v.push(json!({"name": "5000-byte payload for a 4096-byte receiver", "hex": h(&big), "error": "oversized"}));
    v.push(json!({"name": "noise, then a good frame: only the frame survives", "hex": h(&[vec![0x13, 0x37, 0x00], good.clone()].concat()), "then": h(&hello), "error": "stuffing"}));
    // The first counter for which the raw frame (header ‖ payload ‖ crc) ends in 0x00, i.e. the
    // CRC's most significant byte is zero: COBS then ends with the group 01.
    let (seq, trailing) = (0u32..)
        .map(|seq| (seq, wire(ty::ACK, frame::FLAG_RSP, seq, 7, &[])))
        .find(|(_, w)| {
            let mut r = Vec::new();
            line_protocol::cobs::decode_into(&w[..w.len() - 1], &mut r).unwrap();
            r.last() == Some(&0)
        })
        .unwrap();
    let mut trailing_raw = Vec::new();
    line_protocol::cobs::decode_into(&trailing[..trailing.len() - 1], &mut trailing_raw).unwrap();
    v.push(json!({"name": format!("ACK answering seq 7 with seq {seq}: the raw frame ends in 0x00, so the stuffed block ends with the group 01"), "hex": h(&trailing), "raw": h(&trailing_raw)}));
    // The COBS edge at 254: the first counter for which a 250-byte FW_DATA's raw frame has no
    // zero after the length field's high byte (byte 13), so that 254 non-zero bytes (payload and
    // CRC) end it. This encoder closes the final 0xFF group with an empty group 01; without it
    // the block is just as valid.
    let (seq, edge) = (0u32..)
        .map(|seq| (seq, wire(ty::FW_DATA, 0, seq, 0, &[0x5A; 250])))
        .find(|(_, w)| {
            let mut r = Vec::new();
            line_protocol::cobs::decode_into(&w[..w.len() - 1], &mut r).unwrap();
            !r[r.len() - 254..].contains(&0)
        })
        .unwrap();
    let mut edge_raw = Vec::new();
    line_protocol::cobs::decode_into(&edge[..edge.len() - 1], &mut edge_raw).unwrap();
    let without = [&edge[..edge.len() - 2], &[0u8][..]].concat();
    v.push(json!({"name": format!("250-byte FW_DATA with seq {seq}: its raw frame ends with 254 non-zero bytes after its last zero, so the stuffed block ends with a 0xFF group; this encoder then adds the empty group 01 (`hex`), an encoder may leave it out (`without_final_01`): a receiver takes both"), "hex": h(&edge), "raw": h(&edge_raw), "without_final_01": h(&without)}));
    // A 4096-byte receiver: 4096 bytes of payload is the limit, 4097 is over it.
    let limit: Vec<u8> = (0..4097u32).map(|i| (i % 255 + 1) as u8).collect();
    v.push(json!({"name": "4096-byte payload: exactly the limit of a 4096-byte receiver", "hex": h(&wire(ty::FW_DATA, 0, 10, 0, &limit[..4096]))}));
    v.push(json!({"name": "4097-byte payload: one byte over the limit of a 4096-byte receiver", "hex": h(&wire(ty::FW_DATA, 0, 11, 0, &limit)), "error": "oversized"}));
    // Zeros stuff one for one: within the stuffed budget, over the unstuffed limit.
    let zeros = wire(ty::FW_DATA, 0, 12, 0, &[0u8; 4100]);
    v.push(json!({"name": "4100-byte payload of zeros: its stuffed block (4119 bytes) is within a 4096-byte receiver's stuffed budget L + ceil(L/254) = 4131, but it unstuffs to 4118 bytes, above L = 4114", "hex": h(&zeros), "stuffed_len": zeros.len() - 1, "error": "oversized"}));
    v
}

fn expect_frames(vectors: &mut [Value]) {
    for vec in vectors.iter_mut() {
        let bytes = hex::decode(vec["hex"].as_str().unwrap()).unwrap();
        let mut dec = FrameDecoder::new(4096);
        let mut out = Vec::new();
        dec.push(&bytes, &mut out);
        if vec.get("error").is_none() {
            let Decoded::Frame(f) = &out[0] else {
                panic!("{}", vec["name"])
            };
            vec["expect"] = json!({"type": f.header.msg_type, "type_name": type_name(f.header.msg_type), "flags": f.header.flags, "seq": f.header.seq, "ref": f.header.reference, "len": f.header.len, "payload": h(&f.payload)});
        }
    }
}

fn check_frames(vectors: &[Value]) {
    for vec in vectors {
        let name = vec["name"].as_str().unwrap();
        let bytes = hex::decode(vec["hex"].as_str().unwrap()).unwrap();
        let mut dec = FrameDecoder::new(4096);
        let mut out = Vec::new();
        dec.push(&bytes, &mut out);
        if let Some(raw) = vec.get("raw") {
            // Framing-only detail: the unstuffed bytes, and COBS's last group, 01, both for a
            // trailing zero and after a final group of 254 non-zero bytes.
            let mut r = Vec::new();
            line_protocol::cobs::decode_into(&bytes[..bytes.len() - 1], &mut r).unwrap();
            assert_eq!(h(&r), *raw, "{name}");
            assert_eq!(&bytes[bytes.len() - 2..], [0x01, 0x00], "{name}");
            match vec.get("without_final_01") {
                None => assert_eq!(r.last(), Some(&0), "{name}"),
                Some(alt) => {
                    let n = r.len();
                    assert_eq!(r[n - 255], 0, "{name}");
                    assert!(!r[n - 254..].contains(&0), "{name}");
                    assert_eq!(bytes[bytes.len() - 2 - 255], 0xFF, "{name}");
                    let alt = hx(alt);
                    assert_eq!(alt, [&bytes[..bytes.len() - 2], &[0u8][..]].concat());
                    // The shorter form is the same frame.
                    let (mut dec, mut got) = (FrameDecoder::new(4096), Vec::new());
                    dec.push(&alt, &mut got);
                    let (mut dec2, mut want) = (FrameDecoder::new(4096), Vec::new());
                    dec2.push(&bytes, &mut want);
                    assert_eq!(got, want, "{name}");
                    assert_eq!(got.len(), 1, "{name}");
                }
            }
        }
        if let Some(n) = vec.get("stuffed_len") {
            assert_eq!(bytes.len() as u64 - 1, n.as_u64().unwrap(), "{name}");
            let l = 4096 + frame::HEADER_LEN + frame::CRC_LEN;
            assert!(bytes.len() - 1 <= l + l.div_ceil(254), "{name}");
        }
        match vec.get("error").and_then(Value::as_str) {
            Some(err) => {
                let Decoded::Dropped(e) = &out[0] else {
                    panic!("{name}: expected a drop, got {:?}", out[0])
                };
                assert_eq!(e.name(), err, "{name}");
                if let Some(then) = vec.get("then").and_then(Value::as_str) {
                    let Some(Decoded::Frame(f)) = out.get(1) else {
                        panic!("{name}: no frame after the noise")
                    };
                    assert_eq!(h(&f.payload), then, "{name}");
                }
            }
            None => {
                assert_eq!(out.len(), 1, "{name}");
                let Decoded::Frame(f) = &out[0] else {
                    panic!("{name}: {:?}", out[0])
                };
                let e = &vec["expect"];
                assert_eq!(
                    u64::from(f.header.msg_type),
                    e["type"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(type_name(f.header.msg_type), e["type_name"], "{name}");
                assert_eq!(
                    u64::from(f.header.flags),
                    e["flags"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    u64::from(f.header.seq),
                    e["seq"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(
                    u64::from(f.header.reference),
                    e["ref"].as_u64().unwrap(),
                    "{name}"
                );
                assert_eq!(h(&f.payload), e["payload"], "{name}");
                // And back: the same header and payload encode to the same wire bytes.
                let mut again = Vec::new();
                frame::encode(&f.header, &f.payload, &mut again);
                assert_eq!(again, bytes, "{name}");
            }
        }
    }
}

/// A whole handshake; `host_features` decides the key-transport derivation (the meter offers
/// both).
fn channel_vector(host_features: u8) -> Value {
    channel_run(host_features).0
}

/// Both ends of the channel vector's session, left as the vector leaves them: the channel is up,
/// the host has made its encrypted STATUS (seq 2) and the meter has not received it. Every run
/// is the same, byte for byte, so vectors that continue the session use the channel vector's keys.
struct Live {
    host: HostSession,
    meter: MeterSession,
    app: MemMeter,
    rng: SeededRng,
    hello_frame: Vec<u8>,
    open_frame: Vec<u8>,
    ready_frame: Vec<u8>,
    status_frame: Vec<u8>,
    k_hm: [u8; 32],
    k_mh: [u8; 32],
    ktk: [u8; 32],
}

impl Live {
    /// Delivers host bytes to the meter; its answer.
    fn send(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.meter
            .receive(bytes, &mut self.app, &mut self.rng)
            .bytes
    }
}

fn channel_run(host_features: u8) -> (Value, Live) {
    let (host_seed, meter_seed, kt_seed) = (101u64, 202u64, 303u64);
    let e_h = p256::SecretKey::generate_from_rng(&mut SeededRng::new(host_seed));
    let e_m = p256::SecretKey::generate_from_rng(&mut SeededRng::new(meter_seed));
    let kt = p256::SecretKey::generate_from_rng(&mut SeededRng::new(kt_seed));
    let config = HostConfig {
        features: host_features,
        ..HostConfig::default()
    };
    let mut host = HostSession::new(config);
    let mut meter = MeterSession::new(8192);
    let mut app = MemMeter::new(&[0xA5; 12]);
    // A meter that offers the X9.63 key transport when the host does (the version-1 vector's
    // meter offers only the AES-ECB one).
    app.info.features |= host_features & FEATURE_KTK_X963;
    let mut meter_rng = SeededRng::new(meter_seed);
    let mut host_rng = SeededRng::new(host_seed);

    let hello_frame = host.hello([0x11; 16]);
    let out = meter.receive(&hello_frame, &mut app, &mut meter_rng);
    let ack_frame = out.bytes;
    host.receive(&ack_frame);
    let mut kt_pub = [0u8; 65];
    kt_pub.copy_from_slice(&kt.public_key().to_sec1_bytes());
    let draft = host
        .prepare_open(&mut host_rng, kt_pub, vec![STATION_DER.to_vec()])
        .unwrap();
    let signature = station_sign(&draft.to_sign);
    let open_frame = host.finish_open(signature.clone()).unwrap();
    let out = meter.receive(&open_frame, &mut app, &mut meter_rng);
    let ready_frame = out.bytes;
    let ev = host.receive(&ready_frame);
    assert!(host.is_secure(), "{ev:?}");
    let (_, status_frame) = host.request(&Message::Status).unwrap();

    let ack = host.meter().unwrap().clone();
    let hello_payload = Message::Hello(Hello {
        version_min: 1,
        version_max: 1,
        nonce: [0x11; 16],
        max_payload: config.max_payload,
        window: config.window,
        features: config.features,
    })
    .to_bytes();
    let ack_payload = Message::HelloAck(ack.clone()).to_bytes();
    let mut eph_pub = [0u8; 65];
    eph_pub.copy_from_slice(&e_h.public_key().to_sec1_bytes());
    let open = ChannelOpen {
        eph_pub,
        kt_pub,
        chain: vec![STATION_DER.to_vec()],
        signature: signature.clone(),
    };
    let th = crypto::transcript_hash(&hello_payload, &ack_payload, &open.body_bytes());
    assert_eq!(th, draft.th);
    let z1 = crypto::ecdh_x(&e_m.to_nonzero_scalar(), &e_h.public_key());
    let keys = crypto::session_keys(&z1, &th);
    let z2 = crypto::ecdh_x(&e_m.to_nonzero_scalar(), &kt.public_key());
    let method = host.ktk_method().unwrap();
    let ktk = method.derive(&z2, &th);
    let guek = [0x0Fu8; 16];
    let wrapped = wrap_key(&ktk, WrapAlg::AesKw, &guek).unwrap();
    let put_key = Message::PutKey(PutKey {
        key_id: KeyId::Guek,
        key_type: KeyType::Aes128,
        wrap: WrapAlg::AesKw,
        kcv: kcv_aes(&guek).unwrap(),
        wrapped: wrapped.clone(),
    });
    let live = Live {
        host,
        meter,
        app,
        rng: meter_rng,
        hello_frame: hello_frame.clone(),
        open_frame: open_frame.clone(),
        ready_frame: ready_frame.clone(),
        status_frame: status_frame.clone(),
        k_hm: *keys.host_to_meter,
        k_mh: *keys.meter_to_host,
        ktk: *ktk,
    };
    let v = json!({
        "note": "ephemeral private keys are P-256 scalars, big-endian; ECDH values are x-coordinates",
        "e_h": h(&e_h.to_bytes()), "E_h": h(&eph_pub),
        "e_m": h(&e_m.to_bytes()), "E_m": h(&ack.eph_pub),
        "t_h": h(&kt.to_bytes()), "T_h": h(&kt_pub),
        "hello_frame": h(&hello_frame), "hello_payload": h(&hello_payload),
        "hello_ack_frame": h(&ack_frame), "hello_ack_payload": h(&ack_payload),
        "channel_open_frame": h(&open_frame), "open_body": h(&open.body_bytes()),
        "th": h(&th),
        "signed_message": h(&crypto::channel_signed_message(&th)),
        "signature": h(&signature),
        "z1": h(&z1[..]), "k_hm": h(&keys.host_to_meter[..]), "k_mh": h(&keys.meter_to_host[..]),
        "z2": h(&z2[..]), "ktk_method": method.name(),
        "ktk_data": match method {
            crypto::KtkMethod::AesEcb => h(&crypto::ktk_derivation_data(&th)),
            crypto::KtkMethod::X963 => h(&crypto::ktk_x963_shared_info(&th)),
        },
        "ktk": h(&ktk[..]),
        "channel_ready_frame": h(&ready_frame),
        "status_frame": h(&status_frame), "status_frame_seq": 2,
        "put_key": {"note": "a PUT_KEY payload for this channel (not sent in it): the GUEK, AES-128, wrapped under this channel's KTK with RFC 3394", "key_id": KeyId::Guek as u8, "key_type": KeyType::Aes128 as u8, "wrap": WrapAlg::AesKw as u8, "clear": h(&guek), "kcv": h(&kcv_aes(&guek).unwrap()), "wrapped": h(&wrapped), "payload": h(&put_key.to_bytes())}
    });
    (v, live)
}

fn check_channel(c: &Value) {
    let hx = |k: &str| hex::decode(c[k].as_str().unwrap()).unwrap();
    let e_m = p256::SecretKey::from_slice(&hx("e_m")).unwrap();
    let e_h = p256::SecretKey::from_slice(&hx("e_h")).unwrap();
    let t = p256::SecretKey::from_slice(&hx("t_h")).unwrap();
    assert_eq!(e_h.public_key().to_sec1_bytes().to_vec(), hx("E_h"));
    assert_eq!(t.public_key().to_sec1_bytes().to_vec(), hx("T_h"));
    let th = crypto::transcript_hash(
        &hx("hello_payload"),
        &hx("hello_ack_payload"),
        &hx("open_body"),
    );
    assert_eq!(th.to_vec(), hx("th"));
    assert_eq!(crypto::channel_signed_message(&th), hx("signed_message"));
    let z1 = crypto::ecdh_x(&e_m.to_nonzero_scalar(), &e_h.public_key());
    assert_eq!(z1.to_vec(), hx("z1"));
    let z1b = crypto::ecdh_x(
        &e_h.to_nonzero_scalar(),
        &p256::PublicKey::from_sec1_bytes(&hx("E_m")).unwrap(),
    );
    assert_eq!(z1, z1b, "both sides agree");
    let keys = crypto::session_keys(&z1, &th);
    assert_eq!(keys.host_to_meter.to_vec(), hx("k_hm"));
    assert_eq!(keys.meter_to_host.to_vec(), hx("k_mh"));
    let z2 = crypto::ecdh_x(&e_m.to_nonzero_scalar(), &t.public_key());
    assert_eq!(z2.to_vec(), hx("z2"));
    // The method both sides' feature bytes agree on, and its key.
    let host_features = match Message::decode(ty::HELLO, &hx("hello_payload")).unwrap() {
        Message::Hello(x) => x.features,
        other => panic!("{other:?}"),
    };
    let meter_features = match Message::decode(ty::HELLO_ACK, &hx("hello_ack_payload")).unwrap() {
        Message::HelloAck(x) => x.features,
        other => panic!("{other:?}"),
    };
    let method = crypto::KtkMethod::negotiate(host_features, meter_features);
    assert_eq!(method.name(), c["ktk_method"]);
    let ktk = method.derive(&z2, &th);
    assert_eq!(ktk.to_vec(), hx("ktk"));
    match method {
        crypto::KtkMethod::AesEcb => {
            assert_eq!(crypto::ktk_derivation_data(&th).to_vec(), hx("ktk_data"))
        }
        crypto::KtkMethod::X963 => {
            assert_eq!(crypto::ktk_x963_shared_info(&th), hx("ktk_data"))
        }
    }
    // The signature verifies with the station certificate's key.
    let station = Certificate::from_der(STATION_DER).unwrap();
    let key = chain::p256_key(&station).unwrap();
    use p256::ecdsa::signature::Verifier;
    p256::ecdsa::VerifyingKey::from(&key)
        .verify(
            &hx("signed_message"),
            &p256::ecdsa::Signature::from_der(&hx("signature")).unwrap(),
        )
        .unwrap();
    // The encrypted STATUS frame opens with K_hm and the published counter.
    let mut dec = FrameDecoder::new(8192);
    let mut out = Vec::new();
    dec.push(&hx("status_frame"), &mut out);
    let Decoded::Frame(f) = &out[0] else { panic!() };
    assert_eq!(
        u64::from(f.header.seq),
        c["status_frame_seq"].as_u64().unwrap()
    );
    let aead = crypto::Aead::new(&keys.host_to_meter);
    let plain = aead
        .open(f.header.seq, &f.header.to_bytes(), &f.payload)
        .unwrap();
    assert_eq!(f.header.msg_type, ty::STATUS);
    assert!(plain.is_empty());
    // CHANNEL_READY opens with K_mh and names the session.
    let mut out = Vec::new();
    dec.push(&hx("channel_ready_frame"), &mut out);
    let Decoded::Frame(f) = &out[0] else { panic!() };
    let plain = crypto::Aead::new(&keys.meter_to_host)
        .open(f.header.seq, &f.header.to_bytes(), &f.payload)
        .unwrap();
    assert_eq!(plain, th[..8].to_vec());
    let pk = &c["put_key"];
    let clear = hex::decode(pk["clear"].as_str().unwrap()).unwrap();
    assert_eq!(h(&kcv_aes(&clear).unwrap()), pk["kcv"]);
    let unwrapped = crypto::unwrap_key(
        &ktk,
        WrapAlg::AesKw,
        &hex::decode(pk["wrapped"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    assert_eq!(unwrapped.to_vec(), clear);
    let Message::PutKey(k) = Message::decode(
        ty::PUT_KEY,
        &hex::decode(pk["payload"].as_str().unwrap()).unwrap(),
    )
    .unwrap() else {
        panic!("not PUT_KEY")
    };
    assert_eq!(
        (
            u64::from(k.key_id as u8),
            u64::from(k.key_type as u8),
            u64::from(k.wrap as u8)
        ),
        (
            pk["key_id"].as_u64().unwrap(),
            pk["key_type"].as_u64().unwrap(),
            pk["wrap"].as_u64().unwrap()
        )
    );
    assert_eq!(h(&k.kcv), pk["kcv"]);
    assert_eq!(h(&k.wrapped), pk["wrapped"]);
}

/// SEAL on a sealed meter: a repeat answers as the first, asking for more is LOCKED. Each step is
/// the request's payload and the answer's type and payload (plaintext, as inside the channel).
fn sealing_vector() -> Value {
    let mut p = line_protocol::testkit::Pair::new(11);
    p.app.lifecycle = Lifecycle::Personalized;
    p.open();
    let steps: Vec<Value> = [
        ("seal", iface::DEBUG),
        ("seal repeated: its SEAL_RSP was lost", iface::DEBUG),
        ("seal naming an interface still enabled", iface::DEBUG | iface::OPTICAL),
    ]
    .into_iter()
    .map(|(what, disable)| {
        let req = Message::Seal { disable };
        let rsp = p.call(&req);
        json!({"step": what, "request": h(&req.to_bytes()), "response_type": rsp.msg_type(), "response_name": rsp.name(), "response": h(&rsp.to_bytes())})
    })
    .collect();
    json!(steps)
}

fn check_sealing(v: &Value) {
    let steps = v.as_array().unwrap();
    let answer = |i: usize| {
        Message::decode(
            steps[i]["response_type"].as_u64().unwrap() as u8,
            &hex::decode(steps[i]["response"].as_str().unwrap()).unwrap(),
        )
        .unwrap()
    };
    let first = answer(0);
    assert_eq!(
        first,
        Message::SealRsp {
            lifecycle: Lifecycle::Sealed,
            disabled: iface::DEBUG | iface::PROVISIONING
        }
    );
    assert_eq!(answer(1), first, "a repeated SEAL answers as the first");
    assert!(matches!(
        answer(2),
        Message::Error {
            code: ErrorCode::Locked,
            ..
        }
    ));
}

/// A sealed meter that offers REWORK (feature bit 4), its channel open, holding `REWORK_CERT` as
/// its signing certificate.
fn rework_pair() -> line_protocol::testkit::Pair {
    let mut p = line_protocol::testkit::Pair::new(12);
    p.app.info.features |= FEATURE_REWORK;
    p.app.lifecycle = Lifecycle::Sealed;
    p.app
        .certs
        .insert(CertSlot::Sign as u8, REWORK_CERT.to_vec());
    p.open();
    p
}

const REWORK_CERT: &[u8] = b"stands for the meter's signing certificate DER";

/// REWORK (section 4.16): the token for the channel of a deterministic pair, its signature by the
/// test station key, and the meter's answer to it and to each way it can be wrong.
fn rework_vector() -> Value {
    let p = rework_pair();
    let th = p.host.transcript_hash().unwrap();
    let token = ReworkToken {
        uid: p.app.info.uid.clone(),
        session: th,
        cert_sha256: crypto::sha256(REWORK_CERT),
    };
    let sign = station_sign;
    let good = token.encode();
    let case = |what: &str, token: Vec<u8>, signature: Vec<u8>| {
        let mut p = rework_pair();
        let req = Message::Rework { token, signature };
        let rsp = p.call(&req);
        json!({"case": what, "request": h(&req.to_bytes()), "response_type": rsp.msg_type(), "response": h(&rsp.to_bytes()), "lifecycle_after": p.app.lifecycle.name()})
    };
    let with = |f: &dyn Fn(&mut ReworkToken)| {
        let mut t = token.clone();
        f(&mut t);
        let b = t.encode();
        let sig = sign(&b);
        (b, sig)
    };
    let (other_uid, other_uid_sig) = with(&|t| t.uid = vec![0x5A; 12]);
    let (other_session, other_session_sig) = with(&|t| t.session = [0x11; 32]);
    let (other_cert, other_cert_sig) = with(&|t| t.cert_sha256 = crypto::sha256(b"another"));
    let forged: DerSignature = Signer::sign(&SigningKey::from_slice(&[7; 32]).unwrap(), &good);
    json!({
        "note": "the meter is the in-memory test meter with its state set in its memory, not provisioned over the line: sealed, feature bit 4, and `signing_certificate` as its slot 1 certificate (a stand-in byte string, not DER: PUT_CERT would refuse it; only its SHA-256 matters here). `th` is the transcript hash of a channel of that meter whose frames are not given; every case is sent on a fresh run of that same deterministic channel (the same TH), as the REWORK request payload inside it.",
        "uid": h(&token.uid),
        "th": h(&th),
        "station_public_key": h(&line_protocol::testkit::station_key().verifying_key().to_sec1_bytes()),
        "signing_certificate": h(REWORK_CERT),
        "cert_sha256": h(&token.cert_sha256),
        "token": h(&good),
        "signature": h(&sign(&good)),
        "cases": [
            case("good: the meter returns to blank", good.clone(), sign(&good)),
            case("for another meter", other_uid, other_uid_sig),
            case("for another channel", other_session, other_session_sig),
            case("naming another certificate", other_cert, other_cert_sig),
            case("signed by another key", good.clone(), forged.as_bytes().to_vec()),
        ],
    })
}

fn check_rework(v: &Value) {
    let bytes = |k: &str| hex::decode(v[k].as_str().unwrap()).unwrap();
    let token = ReworkToken::decode(&bytes("token")).unwrap();
    assert_eq!(token.uid, bytes("uid"));
    assert_eq!(token.session.to_vec(), bytes("th"));
    assert_eq!(
        token.cert_sha256,
        crypto::sha256(&bytes("signing_certificate"))
    );
    let key = p256::ecdsa::VerifyingKey::from_sec1_bytes(&bytes("station_public_key")).unwrap();
    let sig = p256::ecdsa::Signature::from_der(&bytes("signature")).unwrap();
    p256::ecdsa::signature::Verifier::verify(&key, &bytes("token"), &sig).unwrap();
    let cases = v["cases"].as_array().unwrap();
    for (i, c) in cases.iter().enumerate() {
        let rsp = Message::decode(
            c["response_type"].as_u64().unwrap() as u8,
            &hex::decode(c["response"].as_str().unwrap()).unwrap(),
        )
        .unwrap();
        if i == 0 {
            assert_eq!(rsp, Message::Ack);
            assert_eq!(c["lifecycle_after"], "blank");
        } else {
            assert!(
                matches!(
                    rsp,
                    Message::Error {
                        code: ErrorCode::ReworkRefused,
                        ..
                    }
                ),
                "{}: {rsp:?}",
                c["case"]
            );
            assert_eq!(c["lifecycle_after"], "sealed", "{}", c["case"]);
        }
    }
}

fn receipt_vector() -> Value {
    let r = Receipt {
        uid: vec![0xA5; 12],
        serial: SERIAL.into(),
        system_title: SYSTEM_TITLE,
        ldn: LDN.into(),
        lifecycle: Lifecycle::Sealed,
        disabled: 3,
        fw_sha256: [0x77; 32],
        certs: vec![(1, [0x01; 32]), (2, [0x02; 32]), (3, [0x03; 32])],
        nonce: [0x88; 16],
    };
    json!({"note": "the receipt of a meter whose model has a key-agreement key: the certificates of slots 1, 2 and 3 (section 4.14); the hashes are placeholders", "hex": h(&r.encode()), "uid": h(&r.uid), "serial": r.serial, "system_title": h(&r.system_title), "ldn": r.ldn, "lifecycle": 2, "disabled": 3, "fw_sha256": h(&r.fw_sha256), "certs": r.certs.iter().map(|(s, d)| json!([s, h(d)])).collect::<Vec<_>>(), "nonce": h(&r.nonce)})
}

/// The identity section 4.7 derives from a batch's serial prefix, the manufacturer's FLAG ID and
/// the meter's number `n`, as the station does.
fn derived_identity(prefix: &str, flag: &str, n: u64) -> Identity {
    let mut system_title = [0u8; 8];
    system_title[..3].copy_from_slice(flag.as_bytes());
    system_title[3..].copy_from_slice(&n.to_be_bytes()[3..]);
    Identity {
        serial: format!("{prefix}{n:09}"),
        system_title,
        ldn: format!("{flag}{n:013}"),
    }
}

fn check_receipt(r: &Value) {
    let decoded = Receipt::decode(&hx(&r["hex"])).unwrap();
    assert_eq!(h(&decoded.uid), r["uid"]);
    assert_eq!(decoded.serial, r["serial"].as_str().unwrap());
    assert_eq!(h(&decoded.system_title), r["system_title"]);
    assert_eq!(decoded.ldn, r["ldn"].as_str().unwrap());
    assert_eq!(
        decoded.lifecycle as u8 as u64,
        r["lifecycle"].as_u64().unwrap()
    );
    assert_eq!(u64::from(decoded.disabled), r["disabled"].as_u64().unwrap());
    assert_eq!(h(&decoded.fw_sha256), r["fw_sha256"]);
    let certs: Vec<Value> = decoded
        .certs
        .iter()
        .map(|(s, d)| json!([s, h(d)]))
        .collect();
    assert_eq!(json!(certs), r["certs"]);
    let slots: Vec<u8> = decoded.certs.iter().map(|c| c.0).collect();
    assert_eq!(
        slots,
        [1, 2, 3],
        "every certificate a meter holds, ascending"
    );
    assert_eq!(h(&decoded.nonce), r["nonce"]);
    // The identity is the one section 4.7 derives for FLAG EXM, prefix EM3- and number 42.
    let id = derived_identity("EM3-", "EXM", 42);
    assert_eq!(
        (decoded.serial, decoded.system_title, decoded.ldn),
        (id.serial, id.system_title, id.ldn)
    );
}

// ---------------------------------------------------------------------------------------------
// Vectors above the codec: certificates and requests, firmware images, attestation, EC key
// delivery, ERROR frames, the station chain, replay and tampering, decompression. Every key and
// every ECDSA signature is fixed: keys come from `SeededRng` seeds (or the files of
// `schemas/vectors/`), signatures are deterministic (RFC 6979), so the file never drifts.
// ---------------------------------------------------------------------------------------------

const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const PRIME256V1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const ID_EXTENSION_REQ: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.14");
const ID_KP_CODE_SIGNING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.3");

/// The system title of the message vectors' IDENTITY, as a certificate subject names it.
const SYSTEM_TITLE: [u8; 8] = *b"EXM\x00\x00\x00\x00\x2A";
/// The serial of that identity: prefix `EM3-` and the meter's number 42 in 9 decimal digits
/// (section 4.7).
const SERIAL: &str = "EM3-000000042";
/// Its logical device name: FLAG ID `EXM` and the number 42 in 13 decimal digits (section 4.7).
const LDN: &str = "EXM0000000000042";

fn hx(v: &Value) -> Vec<u8> {
    hex::decode(
        v.as_str()
            .unwrap_or_else(|| panic!("not a hex string: {v}")),
    )
    .unwrap()
}

fn seeded_key(seed: u64) -> SigningKey {
    SigningKey::generate_from_rng(&mut SeededRng::new(seed))
}

fn public(k: &SigningKey) -> p256::PublicKey {
    p256::PublicKey::from(k.verifying_key())
}

fn sec1(k: &p256::PublicKey) -> Vec<u8> {
    k.to_sec1_bytes().to_vec()
}

fn sign_der(k: &SigningKey, msg: &[u8]) -> Vec<u8> {
    let sig: DerSignature = k.sign(msg);
    sig.as_bytes().to_vec()
}

fn verifies(key: &p256::PublicKey, msg: &[u8], sig_der: &[u8]) -> bool {
    use p256::ecdsa::signature::Verifier;
    p256::ecdsa::Signature::from_der(sig_der)
        .is_ok_and(|s| p256::ecdsa::VerifyingKey::from(key).verify(msg, &s).is_ok())
}

/// The DER of a PEM file's body (the test PKI's PKCS#8 keys).
fn pem_der(pem: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        })
    };
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .flat_map(|l| l.trim().bytes())
        .filter(|&c| c != b'=')
    {
        acc = (acc << 6) | val(c);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    out
}

/// A private key of `schemas/vectors/` (`provisioning-root`, `foreign-root`).
fn file_key(name: &str) -> SigningKey {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas/vectors")
        .join(format!("{name}.key.pem"));
    SigningKey::from_pkcs8_der(&pem_der(&std::fs::read_to_string(p).unwrap())).unwrap()
}

/// DER tag-length-value.
fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der::Length::try_from(content.len())
        .unwrap()
        .encode_to_vec(&mut out)
        .unwrap();
    out.extend_from_slice(content);
    out
}

fn name(s: &str) -> Name {
    s.parse().unwrap()
}

fn ext<T: Encode + AssociatedOid>(critical: bool, value: &T) -> Extension {
    Extension {
        extn_id: T::OID,
        critical,
        extn_value: OctetString::new(value.to_der().unwrap()).unwrap(),
    }
}

/// RFC 7093 method 1: the leftmost 160 bits of SHA-256 of the public point.
fn key_id(key: &p256::PublicKey) -> Vec<u8> {
    crypto::sha256(&sec1(key))[..20].to_vec()
}

fn ski(key: &p256::PublicKey) -> Extension {
    ext(
        false,
        &SubjectKeyIdentifier(OctetString::new(key_id(key)).unwrap()),
    )
}

/// The authority key identifier naming the subject key identifier of `issuer`.
fn aki(issuer: &[u8]) -> Extension {
    let cert = Certificate::from_der(issuer).unwrap();
    let (_, id) = cert
        .tbs_certificate()
        .get_extension::<SubjectKeyIdentifier>()
        .unwrap()
        .unwrap();
    ext(
        false,
        &AuthorityKeyIdentifier {
            key_identifier: Some(id.0),
            authority_cert_issuer: None,
            authority_cert_serial_number: None,
        },
    )
}

/// basicConstraints, critical: an end entity, or a CA allowed `path_len` CAs below it.
fn basic_constraints(ca: bool, path_len: Option<u8>) -> Extension {
    ext(
        true,
        &BasicConstraints {
            ca,
            path_len_constraint: path_len,
        },
    )
}

fn key_usage(ku: impl Into<der::flagset::FlagSet<KeyUsages>>) -> Extension {
    ext(true, &KeyUsage(ku.into()))
}

/// The issuer side of a certificate: its subject name (DER-exact, from its certificate when it
/// has one) and its key.
struct Ca<'a> {
    name: Name,
    key: &'a SigningKey,
}

impl<'a> Ca<'a> {
    fn of(cert: &[u8], key: &'a SigningKey) -> Self {
        let c = Certificate::from_der(cert).unwrap();
        assert_eq!(
            chain::p256_key(&c),
            Some(public(key)),
            "the key belongs to the certificate"
        );
        Ca {
            name: c.tbs_certificate().subject().clone(),
            key,
        }
    }
}

/// An X.509 v3 certificate, ecdsa-with-SHA256, valid 2026-01-01 to 2126-01-01.
fn certificate(
    serial: u8,
    issuer: &Ca,
    subject: &Name,
    key: &p256::PublicKey,
    extensions: &[Extension],
) -> Vec<u8> {
    assert!(serial > 0 && serial < 0x80);
    let alg = tlv(0x30, &ECDSA_WITH_SHA256.to_der().unwrap());
    let validity = tlv(
        0x30,
        &[tlv(0x17, b"260101000000Z"), tlv(0x18, b"21260101000000Z")].concat(),
    );
    let exts: Vec<u8> = extensions
        .iter()
        .flat_map(|e| e.to_der().unwrap())
        .collect();
    let tbs = tlv(
        0x30,
        &[
            tlv(0xA0, &[0x02, 0x01, 0x02]),
            tlv(0x02, &[serial]),
            alg.clone(),
            issuer.name.to_der().unwrap(),
            validity,
            subject.to_der().unwrap(),
            key.to_public_key_der().unwrap().as_bytes().to_vec(),
            tlv(0xA3, &tlv(0x30, &exts)),
        ]
        .concat(),
    );
    let signature = sign_der(issuer.key, &tbs);
    let der = tlv(
        0x30,
        &[tbs, alg, tlv(0x03, &[&[0u8][..], &signature].concat())].concat(),
    );
    let parsed = Certificate::from_der(&der).unwrap();
    assert_eq!(parsed.to_der().unwrap(), der, "canonical DER");
    der
}

/// A self-signed CA certificate.
fn root_certificate(subject: &str, key: &SigningKey) -> Vec<u8> {
    let n = name(subject);
    let k = public(key);
    certificate(
        1,
        &Ca {
            name: n.clone(),
            key,
        },
        &n,
        &k,
        &[
            basic_constraints(true, None),
            key_usage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
            ski(&k),
        ],
    )
}

// --- csr ---

/// A PKCS#10 request for `key` with the subject a meter uses (its system title) and a keyUsage
/// request, signed by `signer` (the key itself for a proof of possession).
fn certification_request(key: &p256::PublicKey, usage: KeyUsages, signer: &SigningKey) -> Vec<u8> {
    let request = ExtensionReq(vec![key_usage(usage)]);
    let mut attributes = SetOfVec::new();
    attributes
        .insert(Attribute::try_from(request).unwrap())
        .unwrap();
    let info = CertReqInfo {
        version: x509_cert::request::Version::V1,
        subject: name(&format!("CN={}", hex::encode_upper(SYSTEM_TITLE))),
        public_key: SubjectPublicKeyInfoOwned::from_der(
            key.to_public_key_der().unwrap().as_bytes(),
        )
        .unwrap(),
        attributes,
    };
    let signature = sign_der(signer, &info.to_der().unwrap());
    CertReq {
        info,
        algorithm: AlgorithmIdentifierOwned {
            oid: ECDSA_WITH_SHA256,
            parameters: None,
        },
        signature: BitString::from_bytes(&signature).unwrap(),
    }
    .to_der()
    .unwrap()
}

/// The station's check of a meter's certificate request for a P-256 model, rule for rule as
/// `hsm::cert::check_csr` makes it: DER PKCS#10; an id-ecPublicKey key on a named curve, a valid
/// point; signed with ecdsa-with-SHA256; the signature verifies with the request's own key
/// (proof of possession); the key is on P-256; no attribute but an extension request, asking for
/// nothing but keyUsage and subjectKeyIdentifier. Refusals are named as `hsm::error::CsrError`.
fn station_csr_check(der: &[u8]) -> Result<p256::PublicKey, &'static str> {
    let req = CertReq::from_der(der).map_err(|_| "malformed")?;
    let spki = &req.info.public_key;
    if spki.algorithm.oid != ID_EC_PUBLIC_KEY {
        return Err("bad_key");
    }
    let curve: ObjectIdentifier = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as().ok())
        .ok_or("bad_key")?;
    if curve != PRIME256V1 {
        // The station verifies a P-384 request first and then refuses its curve; this check
        // knows P-256 only.
        return Err("wrong_curve");
    }
    let key = spki
        .subject_public_key
        .as_bytes()
        .and_then(|b| p256::PublicKey::from_sec1_bytes(b).ok())
        .ok_or("bad_key")?;
    if req.algorithm.oid != ECDSA_WITH_SHA256 {
        return Err("unsupported_signature_algorithm");
    }
    let tbs = req.info.to_der().map_err(|_| "malformed")?;
    let sig = req.signature.as_bytes().ok_or("malformed")?;
    if !verifies(&key, &tbs, sig) {
        return Err("bad_signature");
    }
    for attr in req.info.attributes.iter() {
        if attr.oid != ID_EXTENSION_REQ {
            return Err("unexpected_attribute");
        }
        for value in attr.values.iter() {
            let exts = Vec::<Extension>::from_der(&value.to_der().map_err(|_| "malformed")?)
                .map_err(|_| "malformed")?;
            for e in exts {
                if e.extn_id == KeyUsage::OID || e.extn_id == SubjectKeyIdentifier::OID {
                    continue;
                }
                if e.extn_id == BasicConstraints::OID
                    && BasicConstraints::from_der(e.extn_value.as_bytes())
                        .map_err(|_| "malformed")?
                        .ca
                {
                    return Err("requests_ca");
                }
                return Err("unexpected_extension");
            }
        }
    }
    Ok(key)
}

/// The meter's signing key: the key of the CSR, of the signing certificate and of the receipt.
fn meter_sign_key() -> SigningKey {
    seeded_key(401)
}

fn csr_vector() -> Value {
    let key = meter_sign_key();
    let other = seeded_key(402);
    let good = certification_request(&public(&key), KeyUsages::DigitalSignature, &key);
    let bad = certification_request(&public(&key), KeyUsages::DigitalSignature, &other);
    let case = |name: &str, der: &[u8], signer: &SigningKey| {
        let rsp = Message::KeyGenRsp {
            slot: CertSlot::Sign,
            csr: der.to_vec(),
        };
        let verdict = match station_csr_check(der) {
            Ok(k) => {
                assert_eq!(k, public(&key));
                json!({"verdict": "accept"})
            }
            Err(reason) => json!({"verdict": "refuse", "reason": reason}),
        };
        json!({"name": name, "der": h(der), "signed_by": h(&sec1(&public(signer))), "keygen_rsp_payload": h(&rsp.to_bytes()), "station": verdict})
    };
    json!({
        "note": "KEYGEN_RSP for slot 1 (signing), P-256. The request's key is `public` (private scalar `private`, big-endian); subject CN=<system title in upper-case hex>, one extension request: keyUsage digitalSignature. The signature is ecdsa-with-SHA256 over the DER CertificationRequestInfo, deterministic (RFC 6979). `station` is what the station does with the request (section 4.8).",
        "private": h(&key.to_bytes()),
        "public": h(&sec1(&public(&key))),
        "good": case("proof of possession: signed by its own key", &good, &key),
        "bad": case("signed by another key: no proof of possession", &bad, &other),
    })
}

fn check_csr(v: &Value) {
    let key = SigningKey::from_slice(&hx(&v["private"])).unwrap();
    assert_eq!(sec1(&public(&key)), hx(&v["public"]));
    for (case, want) in [
        (&v["good"], Ok(public(&key))),
        (&v["bad"], Err("bad_signature")),
    ] {
        let der = hx(&case["der"]);
        let got = station_csr_check(&der);
        assert_eq!(got, want, "{}", case["name"]);
        match got {
            Ok(_) => assert_eq!(case["station"], json!({"verdict": "accept"})),
            Err(r) => assert_eq!(case["station"], json!({"verdict": "refuse", "reason": r})),
        }
        // The request carries the meter's key either way; only its signature differs.
        let req = CertReq::from_der(&der).unwrap();
        assert_eq!(
            req.info.public_key.subject_public_key.as_bytes().unwrap(),
            hx(&v["public"])
        );
        let tbs = req.info.to_der().unwrap();
        let signer = p256::PublicKey::from_sec1_bytes(&hx(&case["signed_by"])).unwrap();
        assert!(verifies(&signer, &tbs, req.signature.as_bytes().unwrap()));
        assert_eq!(
            Message::decode(ty::KEYGEN_RSP, &hx(&case["keygen_rsp_payload"])).unwrap(),
            Message::KeyGenRsp {
                slot: CertSlot::Sign,
                csr: der
            }
        );
    }
}

// --- pki: the manufacturer side of the vectors ---

struct Pki {
    root_key: SigningKey,
    root: Vec<u8>,
    device_ca_key: SigningKey,
    device_ca: Vec<u8>,
    firmware_key: SigningKey,
    firmware_anchor: Vec<u8>,
    sign_cert: Vec<u8>,
}

fn pki() -> Pki {
    let root_key = seeded_key(403);
    let root = root_certificate("CN=Test Manufacturer Root,O=Example Meters", &root_key);
    let device_ca_key = seeded_key(404);
    let device_ca = certificate(
        2,
        &Ca::of(&root, &root_key),
        &name("CN=Test Device CA,O=Example Meters"),
        &public(&device_ca_key),
        &[
            basic_constraints(true, Some(0)),
            key_usage(KeyUsages::KeyCertSign | KeyUsages::CRLSign),
            ski(&public(&device_ca_key)),
            aki(&root),
        ],
    );
    let firmware_key = seeded_key(405);
    let firmware_anchor = certificate(
        3,
        &Ca::of(&root, &root_key),
        &name("CN=Test Firmware Signing,O=Example Meters"),
        &public(&firmware_key),
        &[
            basic_constraints(false, None),
            key_usage(KeyUsages::DigitalSignature),
            ext(false, &ExtendedKeyUsage(vec![ID_KP_CODE_SIGNING])),
            ski(&public(&firmware_key)),
            aki(&root),
        ],
    );
    let sign = public(&meter_sign_key());
    let sign_cert = certificate(
        4,
        &Ca::of(&device_ca, &device_ca_key),
        &name(&format!("CN={}", hex::encode_upper(SYSTEM_TITLE))),
        &sign,
        &[
            key_usage(KeyUsages::DigitalSignature),
            ski(&sign),
            aki(&device_ca),
        ],
    );
    Pki {
        root_key,
        root,
        device_ca_key,
        device_ca,
        firmware_key,
        firmware_anchor,
        sign_cert,
    }
}

fn pki_vector(p: &Pki) -> Value {
    json!({
        "note": "the manufacturer's side of the vectors (not the provisioning root): a root, the device CA that issues meter certificates (PUT_CERT slot 3), the firmware-verification certificate (PUT_ANCHOR kind 1: an end entity with extended key usage id-kp-codeSigning) and the meter's signing certificate (PUT_CERT slot 1) for the key of the `csr` vector. Private keys are P-256 scalars, big-endian (test PKI only).",
        "manufacturer_root": {"private": h(&p.root_key.to_bytes()), "der": h(&p.root)},
        "device_ca": {"private": h(&p.device_ca_key.to_bytes()), "der": h(&p.device_ca)},
        "firmware_anchor": {"private": h(&p.firmware_key.to_bytes()), "der": h(&p.firmware_anchor)},
        "sign_cert": {"der": h(&p.sign_cert)},
    })
}

fn check_pki(v: &Value) {
    let cert = |k: &str| Certificate::from_der(&hx(&v[k]["der"])).unwrap();
    let key_of = |k: &str| chain::p256_key(&cert(k)).unwrap();
    let issued_by = |k: &str, issuer: &str| {
        let c = cert(k);
        verifies(
            &key_of(issuer),
            &c.tbs_certificate().to_der().unwrap(),
            c.signature().as_bytes().unwrap(),
        )
    };
    for k in ["manufacturer_root", "device_ca", "firmware_anchor"] {
        let d = SigningKey::from_slice(&hx(&v[k]["private"])).unwrap();
        assert_eq!(public(&d), key_of(k), "{k}");
    }
    assert!(issued_by("manufacturer_root", "manufacturer_root"));
    assert!(issued_by("device_ca", "manufacturer_root"));
    assert!(issued_by("firmware_anchor", "manufacturer_root"));
    assert!(issued_by("sign_cert", "device_ca"));
    assert!(!issued_by("sign_cert", "manufacturer_root"));
    assert_eq!(key_of("sign_cert"), public(&meter_sign_key()));
}

// --- firmware ---

/// An MCUboot image as `imgtool sign` writes it: header padded to `hdr_size`, payload, TLV area
/// with the SHA-256 (0x10), the key hash (0x01) and the ECDSA P-256 signature of that hash
/// (0x22, the hash signed as the prehash).
fn mcuboot_image(
    payload: &[u8],
    version: line_protocol::image::ImageVersion,
    hdr_size: u16,
    key: &SigningKey,
) -> Vec<u8> {
    use line_protocol::image as img;
    let mut out = img::header_bytes(0, hdr_size, payload.len() as u32, version).to_vec();
    out.resize(usize::from(hdr_size), 0);
    out.extend_from_slice(payload);
    let hash = crypto::sha256(&out);
    let sig: p256::ecdsa::Signature = key.sign_prehash(&hash).unwrap();
    let mut tlvs = Vec::new();
    img::put_tlv(&mut tlvs, img::TLV_SHA256, &hash);
    img::put_tlv(&mut tlvs, img::TLV_KEYHASH, &img::key_hash(&public(key)));
    img::put_tlv(&mut tlvs, img::TLV_ECDSA_SIG, sig.to_der().as_bytes());
    out.extend_from_slice(&img::TLV_INFO_MAGIC.to_le_bytes());
    out.extend_from_slice(&((tlvs.len() + 4) as u16).to_le_bytes());
    out.extend_from_slice(&tlvs);
    out
}

/// The FW_RESULT status a meter gives an image whose file has the SHA-256 FW_BEGIN announced,
/// from the meter-side check (`image::verify` against the anchor's key): section 4.12.
fn image_status(image: &[u8], anchor: &p256::PublicKey) -> ErrorCode {
    use line_protocol::image::ImageError;
    match line_protocol::image::verify(image, anchor) {
        Ok(_) => ErrorCode::Other(0),
        Err(ImageError::Format(_)) => ErrorCode::FwFormat,
        // The hash TLV, the key hash and the signature are all "the signature does not verify".
        Err(ImageError::HashMismatch)
        | Err(ImageError::Unsigned)
        | Err(ImageError::WrongKey)
        | Err(ImageError::BadSignature) => ErrorCode::FwSignatureInvalid,
    }
}

fn image_error_name(image: &[u8], anchor: &p256::PublicKey) -> &'static str {
    use line_protocol::image::ImageError;
    match line_protocol::image::verify(image, anchor) {
        Ok(_) => "none",
        Err(ImageError::Format(_)) => "format",
        Err(ImageError::HashMismatch) => "hash_tlv_mismatch",
        Err(ImageError::Unsigned) => "unsigned",
        Err(ImageError::WrongKey) => "wrong_key",
        Err(ImageError::BadSignature) => "bad_signature",
    }
}

const FW_HDR_SIZE: u16 = 0x200;
const FW_VERSION: line_protocol::image::ImageVersion = line_protocol::image::ImageVersion {
    major: 1,
    minor: 4,
    revision: 2,
    build: 0,
};

fn firmware_image(p: &Pki) -> Vec<u8> {
    let mut body = vec![0u8; 1024];
    rand_core::Rng::fill_bytes(&mut SeededRng::new(409), &mut body);
    mcuboot_image(&body, FW_VERSION, FW_HDR_SIZE, &p.firmware_key)
}

fn flipped(image: &[u8], offset: usize, xor: u8) -> Vec<u8> {
    let mut b = image.to_vec();
    b[offset] ^= xor;
    b
}

/// FW_RESULT's status after FW_BEGIN (announcing `sha256`), one raw FW_DATA with `file` and
/// FW_END on the channel vector's channel (the in-memory meter checks the hash only).
fn transfer_status(file: &[u8], sha256: &[u8; 32]) -> u16 {
    let (_, mut l) = channel_run(HostConfig::default().features);
    let size = file.len() as u32;
    for msg in [
        Message::FwBegin {
            size,
            sha256: *sha256,
            compression: 0,
        },
        Message::FwData(FwData {
            offset: 0,
            raw_len: size,
            encoding: Encoding::Raw,
            data: file.to_vec(),
        }),
    ] {
        let (_, req) = l.host.request(&msg).unwrap();
        let answer = describe(&l.send(&req), &l.k_mh);
        assert!(answer.get("code").is_none(), "{answer}");
    }
    let (_, end) = l.host.request(&Message::FwEnd).unwrap();
    let answer = one_frame(&l.send(&end));
    let plain = crypto::Aead::new(&l.k_mh)
        .open(
            answer.header.seq,
            &answer.header.to_bytes(),
            &answer.payload,
        )
        .unwrap();
    match Message::decode(answer.header.msg_type, &plain).unwrap() {
        Message::FwResult(r) => r.status,
        other => panic!("{other:?}"),
    }
}

fn firmware_vector(p: &Pki) -> Value {
    let image = firmware_image(p);
    let anchor = public(&p.firmware_key);
    let info = line_protocol::image::verify(&image, &anchor).unwrap();
    let body_flip = usize::from(FW_HDR_SIZE) + 100;
    let sig_flip = image.len() - 1;
    let case = |name: &str, flip: Option<usize>| {
        let file = match flip {
            Some(at) => flipped(&image, at, 0x01),
            None => image.clone(),
        };
        let status = image_status(&file, &anchor);
        let mut c = json!({
            "name": name,
            "sha256": h(&crypto::sha256(&file)),
            "image_error": image_error_name(&file, &anchor),
            "status": status.code(),
            "status_name": code_name(status),
        });
        if let Some(at) = flip {
            // Announced as the good image but received flipped: the meter session's FW_END
            // compares the hash before anything else.
            assert_eq!(
                transfer_status(&file, &crypto::sha256(&image)),
                ErrorCode::FwHashMismatch.code()
            );
            c["flip"] = json!({"offset": at, "xor": 1});
            c["status_if_fw_begin_announced_the_good_sha256"] =
                json!(ErrorCode::FwHashMismatch.code());
        } else {
            c["version"] = json!(h(&info.version.to_bytes()));
        }
        c
    };
    json!({
        "note": "an MCUboot image (section 6.4) signed by the firmware-verification key of `pki` (its certificate is `anchor_der`, the PUT_ANCHOR kind 1 certificate). The hash TLV is SHA-256 over header, padding and payload; the signature TLV is ECDSA P-256 over that hash taken as the digest (prehashed, not hashed again), DER, deterministic (RFC 6979). Cases flip one bit (`flip`: byte offset in the image, XOR mask) and give the FW_RESULT status when FW_BEGIN announced the SHA-256 of the file as it is (`sha256`); had FW_BEGIN announced the good image's SHA-256, the flipped file is FW_HASH_MISMATCH before any signature check.",
        "anchor_der": h(&p.firmware_anchor),
        "anchor_public": h(&sec1(&anchor)),
        "anchor_key_hash": h(&line_protocol::image::key_hash(&anchor)),
        "image": h(&image),
        "hdr_size": FW_HDR_SIZE,
        "img_size": info.img_size,
        "hash_tlv": h(&info.hash),
        "signature": h(info.signature.as_deref().unwrap()),
        "version": "1.4.2",
        "cases": [
            case("good", None),
            case("one bit flipped in the payload", Some(body_flip)),
            case("last byte of the signature flipped", Some(sig_flip)),
        ],
    })
}

fn check_firmware(v: &Value) {
    let anchor = chain::p256_key(&Certificate::from_der(&hx(&v["anchor_der"])).unwrap()).unwrap();
    assert_eq!(sec1(&anchor), hx(&v["anchor_public"]));
    assert_eq!(
        line_protocol::image::key_hash(&anchor).to_vec(),
        hx(&v["anchor_key_hash"])
    );
    let image = hx(&v["image"]);
    let info = line_protocol::image::verify(&image, &anchor).unwrap();
    assert_eq!(info.key_hash.unwrap().to_vec(), hx(&v["anchor_key_hash"]));
    assert_eq!(info.hash.to_vec(), hx(&v["hash_tlv"]));
    assert_eq!(info.version.to_string(), v["version"].as_str().unwrap());
    assert_eq!(u64::from(info.hdr_size), v["hdr_size"].as_u64().unwrap());
    assert_eq!(u64::from(info.img_size), v["img_size"].as_u64().unwrap());
    // The signature is over the hash TLV as the digest.
    {
        use p256::ecdsa::signature::hazmat::PrehashVerifier;
        let sig = p256::ecdsa::Signature::from_der(&hx(&v["signature"])).unwrap();
        p256::ecdsa::VerifyingKey::from(&anchor)
            .verify_prehash(&info.hash, &sig)
            .unwrap();
    }
    // Another key is refused by the key hash before the signature.
    assert_eq!(
        line_protocol::image::verify(&image, &public(&seeded_key(1))),
        Err(line_protocol::image::ImageError::WrongKey)
    );
    let cases = v["cases"].as_array().unwrap();
    assert_eq!(cases[0]["status"], 0);
    for c in cases {
        let file = match c.get("flip") {
            Some(f) => flipped(
                &image,
                f["offset"].as_u64().unwrap() as usize,
                f["xor"].as_u64().unwrap() as u8,
            ),
            None => image.clone(),
        };
        assert_eq!(crypto::sha256(&file).to_vec(), hx(&c["sha256"]));
        let status = image_status(&file, &anchor);
        assert_eq!(
            u64::from(status.code()),
            c["status"].as_u64().unwrap(),
            "{}",
            c["name"]
        );
        assert_eq!(image_error_name(&file, &anchor), c["image_error"]);
        if c.get("flip").is_some() {
            assert_eq!(status, ErrorCode::FwSignatureInvalid, "{}", c["name"]);
            // Announced with the good image's hash, the flipped file fails the hash first.
            assert_ne!(hx(&c["sha256"]), hx(&cases[0]["sha256"]));
            assert_eq!(
                c["status_if_fw_begin_announced_the_good_sha256"],
                ErrorCode::FwHashMismatch.code()
            );
        } else {
            assert_eq!(h(&info.version.to_bytes()), c["version"]);
        }
    }
}

// --- attest ---

fn attest_vector(p: &Pki) -> Value {
    let key = meter_sign_key();
    let nonce = [0x5Cu8; 16];
    let image = firmware_image(p);
    let receipt = Receipt {
        uid: vec![0xA5; 12],
        serial: SERIAL.into(),
        system_title: SYSTEM_TITLE,
        ldn: LDN.into(),
        lifecycle: Lifecycle::Sealed,
        disabled: iface::PROVISIONING | iface::DEBUG,
        fw_sha256: crypto::sha256(&image),
        certs: vec![
            (CertSlot::Sign as u8, crypto::sha256(&p.sign_cert)),
            (CertSlot::DeviceCa as u8, crypto::sha256(&p.device_ca)),
        ],
        nonce,
    }
    .encode();
    let signature = sign_der(&key, &receipt);
    let rsp = Message::AttestRsp {
        receipt: receipt.clone(),
        signature: signature.clone(),
    };
    json!({
        "note": "ATTEST and its ATTEST_RSP (payloads, as inside the channel) from the sealed meter that holds the `pki` signing certificate (slot 1) and device CA (slot 3) and runs the `firmware` image. The signature is ECDSA P-256 with SHA-256 over the receipt bytes by the meter's signing key (the key of the `csr` vector), DER, deterministic (RFC 6979): a meter holding `sign_private` produces these bytes exactly.",
        "nonce": h(&nonce),
        "attest_payload": h(&Message::Attest { nonce }.to_bytes()),
        "attest_rsp_payload": h(&rsp.to_bytes()),
        "receipt": h(&receipt),
        "signature": h(&signature),
        "sign_private": h(&key.to_bytes()),
        "sign_public": h(&sec1(&public(&key))),
        "sign_cert_der": h(&p.sign_cert),
    })
}

fn check_attest(v: &Value, pki: &Value, firmware: &Value) {
    let nonce = match Message::decode(ty::ATTEST, &hx(&v["attest_payload"])).unwrap() {
        Message::Attest { nonce } => nonce,
        other => panic!("{other:?}"),
    };
    assert_eq!(nonce.to_vec(), hx(&v["nonce"]));
    let (receipt, signature) =
        match Message::decode(ty::ATTEST_RSP, &hx(&v["attest_rsp_payload"])).unwrap() {
            Message::AttestRsp { receipt, signature } => (receipt, signature),
            other => panic!("{other:?}"),
        };
    assert_eq!(receipt, hx(&v["receipt"]));
    assert_eq!(signature, hx(&v["signature"]));
    let r = Receipt::decode(&receipt).unwrap();
    assert_eq!(r.nonce, nonce, "the receipt answers this challenge");
    assert_eq!(r.lifecycle, Lifecycle::Sealed);
    assert_eq!(r.fw_sha256.to_vec(), hx(&firmware["cases"][0]["sha256"]));
    assert_eq!(
        r.certs,
        vec![
            (1, crypto::sha256(&hx(&pki["sign_cert"]["der"]))),
            (3, crypto::sha256(&hx(&pki["device_ca"]["der"]))),
        ]
    );
    assert_eq!(hx(&v["sign_cert_der"]), hx(&pki["sign_cert"]["der"]));
    let key = chain::p256_key(&Certificate::from_der(&hx(&v["sign_cert_der"])).unwrap()).unwrap();
    assert_eq!(sec1(&key), hx(&v["sign_public"]));
    let private = SigningKey::from_slice(&hx(&v["sign_private"])).unwrap();
    assert_eq!(public(&private), key);
    assert!(
        verifies(&key, &receipt, &signature),
        "the receipt signature verifies"
    );
    // Deterministic: the same key signs the same receipt to the same bytes.
    assert_eq!(sign_der(&private, &receipt), signature);
    // Any other receipt, or another key, does not verify.
    let mut other = receipt.clone();
    *other.last_mut().unwrap() ^= 1;
    assert!(!verifies(&key, &other, &signature));
    assert!(!verifies(&public(&seeded_key(402)), &receipt, &signature));
}

// --- frames on the channel: describing and checking them ---

/// One frame from its wire bytes.
fn one_frame(bytes: &[u8]) -> frame::Frame {
    let mut dec = FrameDecoder::new(line_protocol::limits::MAX_PAYLOAD);
    let mut out = Vec::new();
    dec.push(bytes, &mut out);
    assert_eq!(out.len(), 1, "one frame: {out:?}");
    match out.remove(0) {
        Decoded::Frame(f) => f,
        other => panic!("{other:?}"),
    }
}

/// A frame's header and message: decrypted with `key` if it is encrypted.
fn describe(bytes: &[u8], key: &[u8; 32]) -> Value {
    let f = one_frame(bytes);
    let plain = if f.header.is_encrypted() {
        crypto::Aead::new(key)
            .open(f.header.seq, &f.header.to_bytes(), &f.payload)
            .expect("authentic")
    } else {
        f.payload.clone()
    };
    // A request may be undecodable on purpose (a MALFORMED case): its plaintext says it all.
    let msg = Message::decode(f.header.msg_type, &plain).ok();
    let mut v = json!({
        "type": f.header.msg_type,
        "type_name": type_name(f.header.msg_type),
        "flags": f.header.flags,
        "encrypted": f.header.is_encrypted(),
        "seq": f.header.seq,
        "ref": f.header.reference,
        "plaintext": h(&plain),
    });
    if let Some(Message::Error { code, detail }) = &msg {
        v["code"] = json!(code.code());
        v["code_name"] = json!(code_name(*code));
        v["detail"] = json!(detail);
    }
    v
}

/// The frame with byte `at` of its payload XORed with 1 and its CRC made good again.
fn flip_payload_byte(wire: &[u8], at: usize) -> Vec<u8> {
    let mut raw = Vec::new();
    line_protocol::cobs::decode_into(&wire[..wire.len() - 1], &mut raw).unwrap();
    raw[frame::HEADER_LEN + at] ^= 0x01;
    let n = raw.len() - 4;
    let crc = frame::crc32c(&raw[..n]);
    raw[n..].copy_from_slice(&crc.to_le_bytes());
    let mut out = Vec::new();
    line_protocol::cobs::encode_into(&raw, &mut out);
    out.push(0);
    out
}

fn channel_keys(channel: &Value) -> ([u8; 32], [u8; 32], [u8; 32]) {
    let k = |n: &str| <[u8; 32]>::try_from(hx(&channel[n])).unwrap();
    (k("k_hm"), k("k_mh"), k("ktk"))
}

/// Checks a sequence of steps: each host frame is described with K_hm, each meter answer with
/// K_mh, both as the file says.
fn check_steps(steps: &Value, channel: &Value) {
    let (k_hm, k_mh, _) = channel_keys(channel);
    for s in steps.as_array().unwrap() {
        assert_eq!(
            describe(&hx(&s["send"]), &k_hm),
            s["send_is"],
            "{}",
            s["step"]
        );
        assert_eq!(
            describe(&hx(&s["answer"]), &k_mh),
            s["answer_is"],
            "{}",
            s["step"]
        );
    }
}

fn step(what: &str, send: &[u8], answer: &[u8], l: &Live) -> Value {
    json!({"step": what, "send": h(send), "send_is": describe(send, &l.k_hm), "answer": h(answer), "answer_is": describe(answer, &l.k_mh)})
}

/// A step whose request does not authenticate (tampered): only its header can be described.
fn step_tampered(what: &str, send: &[u8], answer: &[u8], l: &Live) -> Value {
    let f = one_frame(send);
    json!({"step": what, "send": h(send), "send_is": {"type": f.header.msg_type, "type_name": type_name(f.header.msg_type), "flags": f.header.flags, "seq": f.header.seq, "authentic": false}, "answer": h(answer), "answer_is": describe(answer, &l.k_mh)})
}

// --- put_key_ec ---

fn ec_key_to_deliver() -> p256::SecretKey {
    p256::SecretKey::generate_from_rng(&mut SeededRng::new(408))
}

fn put_key_ec_vector() -> Value {
    let (_, mut l) = channel_run(HostConfig::default().features);
    let key = ec_key_to_deliver();
    let clear = key.to_pkcs8_der().unwrap().as_bytes().to_vec();
    let point = sec1(&key.public_key());
    let kcv = crypto::kcv_ec_public(&point);
    let wrapped = wrap_key(&l.ktk, WrapAlg::AesKwp, &clear).unwrap();
    let msg = Message::PutKey(PutKey {
        key_id: KeyId::SignPrivate,
        key_type: KeyType::EcP256,
        wrap: WrapAlg::AesKwp,
        kcv,
        wrapped: wrapped.clone(),
    });
    let (_, frame) = l.host.request(&msg).unwrap();
    let answer = l.send(&frame);
    assert_eq!(
        l.app.secrets.get(&(KeyId::SignPrivate as u8)),
        Some(&clear),
        "the meter unwrapped the key"
    );
    json!({
        "note": "PUT_KEY of an HSM-generated signing private key (key_id 0x11, key_type 3 P-256 PKCS#8, wrap 2 AES key wrap with padding, RFC 5649) under the KTK of the `channel` vector; KCV = the first three bytes of SHA-256 of the uncompressed public point. `frame` is the request on the channel (K_hm, seq 3), `answer_frame` the meter's ACK (K_mh).",
        "key_id": KeyId::SignPrivate as u8, "key_type": KeyType::EcP256 as u8, "wrap": WrapAlg::AesKwp as u8,
        "private": h(&key.to_bytes()),
        "public": h(&point),
        "clear": h(&clear),
        "kcv": h(&kcv),
        "ktk": h(&l.ktk),
        "wrapped": h(&wrapped),
        "payload": h(&msg.to_bytes()),
        "frame": h(&frame),
        "answer_frame": h(&answer),
        "answer_is": describe(&answer, &l.k_mh),
    })
}

fn check_put_key_ec(v: &Value, channel: &Value) {
    let (k_hm, k_mh, ktk) = channel_keys(channel);
    assert_eq!(hx(&v["ktk"]), ktk.to_vec());
    let clear = crypto::unwrap_key(&ktk, WrapAlg::AesKwp, &hx(&v["wrapped"])).unwrap();
    assert_eq!(clear.to_vec(), hx(&v["clear"]));
    let key = p256::SecretKey::from_pkcs8_der(&clear).unwrap();
    assert_eq!(key.to_bytes().to_vec(), hx(&v["private"]));
    let point = sec1(&key.public_key());
    assert_eq!(point, hx(&v["public"]));
    assert_eq!(crypto::kcv_ec_public(&point).to_vec(), hx(&v["kcv"]));
    // The wrapping is bound to the KTK: under another key it does not unwrap.
    assert!(crypto::unwrap_key(&k_hm, WrapAlg::AesKwp, &hx(&v["wrapped"])).is_none());
    let Message::PutKey(k) = Message::decode(ty::PUT_KEY, &hx(&v["payload"])).unwrap() else {
        panic!("not PUT_KEY")
    };
    assert_eq!(
        (k.key_id as u8, k.key_type as u8, k.wrap as u8),
        (0x11, 3, 2)
    );
    assert_eq!(
        (
            u64::from(k.key_id as u8),
            u64::from(k.key_type as u8),
            u64::from(k.wrap as u8)
        ),
        (
            v["key_id"].as_u64().unwrap(),
            v["key_type"].as_u64().unwrap(),
            v["wrap"].as_u64().unwrap()
        )
    );
    assert_eq!(k.kcv.to_vec(), hx(&v["kcv"]));
    assert_eq!(k.wrapped, hx(&v["wrapped"]));
    let req = describe(&hx(&v["frame"]), &k_hm);
    assert_eq!(req["type"], ty::PUT_KEY);
    assert_eq!(req["plaintext"], v["payload"]);
    let ans = describe(&hx(&v["answer_frame"]), &k_mh);
    assert_eq!(ans, v["answer_is"]);
    assert_eq!(ans["type"], ty::ACK);
    assert_eq!(ans["ref"], req["seq"]);
}

// --- errors ---

fn errors_vector() -> Value {
    // A meter that rebooted since the channel came up gets the channel vector's STATUS.
    let (_, l) = channel_run(HostConfig::default().features);
    let mut meter = MeterSession::new(8192);
    let mut app = MemMeter::new(&[0xA5; 12]);
    let no_channel = meter
        .receive(&l.status_frame, &mut app, &mut SeededRng::new(1))
        .bytes;
    // On the channel: FW_END with no FW_BEGIN.
    let (_, mut l) = channel_run(HostConfig::default().features);
    let (_, fw_end) = l.host.request(&Message::FwEnd).unwrap();
    let not_started = l.send(&fw_end);
    json!([
        step(
            "the channel vector's STATUS (seq 2) reaches a meter without a channel (it rebooted): a plaintext ERROR NO_CHANNEL, RSP, ref 2, the meter's first frame (seq 0)",
            &l.status_frame,
            &no_channel,
            &l
        ),
        step(
            "FW_END without FW_BEGIN on the channel vector's channel (host seq 3): an encrypted ERROR FW_NOT_STARTED (K_mh, the meter's seq 2, ref 3)",
            &fw_end,
            &not_started,
            &l
        ),
    ])
}

fn check_errors(v: &Value, channel: &Value) {
    check_steps(v, channel);
    let a = |i: usize| &v[i]["answer_is"];
    assert_eq!(
        (
            a(0)["code"].as_u64(),
            a(0)["encrypted"].as_bool(),
            a(0)["flags"].as_u64()
        ),
        (Some(6), Some(false), Some(u64::from(frame::FLAG_RSP)))
    );
    assert_eq!(a(0)["ref"], channel["status_frame_seq"]);
    assert_eq!(
        (
            a(1)["code"].as_u64(),
            a(1)["encrypted"].as_bool(),
            a(1)["flags"].as_u64()
        ),
        (
            Some(0x28),
            Some(true),
            Some(u64::from(frame::FLAG_RSP | frame::FLAG_ENC))
        )
    );
    assert_eq!(a(1)["ref"], v[1]["send_is"]["seq"]);
}

// --- replay_tamper ---

fn replay_tamper_vector() -> Value {
    let (_, mut l) = channel_run(HostConfig::default().features);
    let status = l.status_frame.clone();
    let first = l.send(&status);
    let again = l.send(&status);
    let (_, next) = l.host.request(&Message::Status).unwrap();
    let after = l.send(&next);
    let replay = json!([
        step(
            "the channel vector's STATUS (seq 2): STATUS_RSP",
            &status,
            &first,
            &l
        ),
        step(
            "the same frame again (seq 2 is not above 2): a plaintext ERROR REPLAY; the meter forgets its keys",
            &status,
            &again,
            &l
        ),
        step(
            "the host's next STATUS (seq 3): the meter has no channel: a plaintext ERROR NO_CHANNEL",
            &next,
            &after,
            &l
        ),
    ]);
    let (_, mut l) = channel_run(HostConfig::default().features);
    let identity = Message::Identity(Identity {
        serial: SERIAL.into(),
        system_title: SYSTEM_TITLE,
        ldn: LDN.into(),
    });
    let (_, good) = l.host.request(&identity).unwrap();
    let bad = flip_payload_byte(&good, 0);
    let tampered = l.send(&bad);
    let after = l.send(&good);
    let tamper = json!([
        step_tampered(
            "IDENTITY (seq 3) with the first ciphertext byte flipped and the CRC made good: a plaintext ERROR DECRYPT_FAILED; the meter forgets its keys",
            &bad,
            &tampered,
            &l
        ),
        step(
            "the same IDENTITY untouched: the meter has no channel: a plaintext ERROR NO_CHANNEL",
            &good,
            &after,
            &l
        ),
    ]);
    json!({"note": "on the `channel` vector's keys, continuing its session (the meter has sent HELLO_ACK seq 0 and CHANNEL_READY seq 1). Each list starts from that point.", "replay": replay, "tamper": tamper})
}

fn check_replay_tamper(v: &Value, channel: &Value) {
    let (k_hm, _, _) = channel_keys(channel);
    let replay = &v["replay"];
    check_steps(replay, channel);
    // The replayed frame is authentic: only its counter gives it away.
    let f = one_frame(&hx(&replay[1]["send"]));
    assert!(
        crypto::Aead::new(&k_hm)
            .open(f.header.seq, &f.header.to_bytes(), &f.payload)
            .is_some()
    );
    assert_eq!(replay[0]["send"], replay[1]["send"]);
    assert_eq!(replay[0]["send"], channel["status_frame"]);
    assert_eq!(replay[0]["answer_is"]["type"], ty::STATUS_RSP);
    assert_eq!(replay[1]["answer_is"]["code"], 0x000A);
    assert_eq!(replay[1]["answer_is"]["encrypted"], false);
    assert_eq!(replay[1]["answer_is"]["ref"], 2);
    assert_eq!(replay[2]["answer_is"]["code"], 0x0006);
    let tamper = &v["tamper"];
    let (_, k_mh, _) = channel_keys(channel);
    let bad = hx(&tamper[0]["send"]);
    let f = one_frame(&bad);
    assert!(
        crypto::Aead::new(&k_hm)
            .open(f.header.seq, &f.header.to_bytes(), &f.payload)
            .is_none(),
        "the tampered frame fails authentication"
    );
    assert_eq!(
        describe(&hx(&tamper[0]["answer"]), &k_mh),
        tamper[0]["answer_is"]
    );
    assert_eq!(tamper[0]["answer_is"]["code"], 0x0009);
    assert_eq!(tamper[0]["answer_is"]["ref"], f.header.seq);
    assert_eq!(flip_payload_byte(&hx(&tamper[1]["send"]), 0), bad);
    assert_eq!(
        describe(&hx(&tamper[1]["send"]), &k_hm)["type"],
        ty::IDENTITY
    );
    assert_eq!(
        describe(&hx(&tamper[1]["answer"]), &k_mh),
        tamper[1]["answer_is"]
    );
    assert_eq!(tamper[1]["answer_is"]["code"], 0x0006);
}

// --- chains ---

struct StationPki {
    ca_key: SigningKey,
    leaf_key: SigningKey,
    ca: Vec<u8>,
    ca_foreign: Vec<u8>,
    leaf: Vec<u8>,
    leaf_key_agreement: Vec<u8>,
    leaf_no_key_usage: Vec<u8>,
}

fn station_pki() -> StationPki {
    let root_key = file_key("provisioning-root");
    assert_eq!(
        sec1(&public(&root_key)),
        line_protocol::testkit::PROVISIONING_ROOT_PUB.to_vec()
    );
    let foreign_key = file_key("foreign-root");
    let foreign_der = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/vectors/foreign-root.der"),
    )
    .unwrap();
    let ca_key = seeded_key(406);
    let leaf_key = seeded_key(407);
    let ca_name = name("CN=Test Station CA,O=Example Meters");
    let ca_ext = |issuer: &[u8]| {
        vec![
            basic_constraints(true, Some(0)),
            key_usage(KeyUsages::KeyCertSign),
            ski(&public(&ca_key)),
            aki(issuer),
        ]
    };
    let root = Ca::of(line_protocol::testkit::PROVISIONING_ROOT_DER, &root_key);
    let ca = certificate(
        10,
        &root,
        &ca_name,
        &public(&ca_key),
        &ca_ext(line_protocol::testkit::PROVISIONING_ROOT_DER),
    );
    // The same CA name and key, certified by the foreign root (whose name is the provisioning
    // root's): everything matches but the signature at the top.
    let ca_foreign = certificate(
        10,
        &Ca::of(&foreign_der, &foreign_key),
        &ca_name,
        &public(&ca_key),
        &ca_ext(&foreign_der),
    );
    let by_ca = Ca::of(&ca, &ca_key);
    let leaf_name = name("CN=Test Station 02,O=Example Meters");
    let leaf_with = |serial: u8, usage: Option<KeyUsages>| {
        let mut e = vec![basic_constraints(false, None)];
        e.extend(usage.map(key_usage));
        e.extend([ski(&public(&leaf_key)), aki(&ca)]);
        certificate(serial, &by_ca, &leaf_name, &public(&leaf_key), &e)
    };
    StationPki {
        leaf: leaf_with(20, Some(KeyUsages::DigitalSignature)),
        leaf_key_agreement: leaf_with(21, Some(KeyUsages::KeyAgreement)),
        leaf_no_key_usage: leaf_with(22, None),
        ca_key,
        leaf_key,
        ca,
        ca_foreign,
    }
}

/// What a meter answers a CHANNEL_OPEN carrying `chain`, signed by `leaf_key`: the type and
/// error code of its answer frame.
fn meter_answer_to_chain(chain: &[Vec<u8>], leaf_key: &SigningKey) -> (u8, Option<ErrorCode>) {
    let mut host = HostSession::new(HostConfig::default());
    let mut meter = MeterSession::new(8192);
    let mut app = MemMeter::new(&[0xA5; 12]);
    let mut rng = SeededRng::new(7);
    let hello = host.hello([0x11; 16]);
    let ack = meter.receive(&hello, &mut app, &mut rng).bytes;
    host.receive(&ack);
    let mut kt_pub = [0u8; 65];
    kt_pub.copy_from_slice(&sec1(&public(&seeded_key(303))));
    let draft = host.prepare_open(&mut rng, kt_pub, chain.to_vec()).unwrap();
    let open = host
        .finish_open(sign_der(leaf_key, &draft.to_sign))
        .unwrap();
    let answer = one_frame(&meter.receive(&open, &mut app, &mut rng).bytes);
    if answer.header.is_encrypted() {
        assert!(meter.is_secure());
        return (answer.header.msg_type, None);
    }
    match Message::decode(answer.header.msg_type, &answer.payload).unwrap() {
        Message::Error { code, .. } => (ty::ERROR, Some(code)),
        other => panic!("{other:?}"),
    }
}

fn chain_error_name(e: chain::ChainError) -> String {
    use chain::ChainError::*;
    match e {
        Length => "length".into(),
        Parse(i) => format!("parse({i})"),
        Algorithm(i) => format!("algorithm({i})"),
        IssuerMismatch(i) => format!("issuer_mismatch({i})"),
        NotCa(i) => format!("not_ca({i})"),
        LeafKeyUsage => "leaf_key_usage".into(),
        Signature(i) => format!("signature({i})"),
    }
}

fn chain_verdict(chain: &[Vec<u8>], leaf_key: &SigningKey) -> Value {
    let root = line_protocol::testkit::provisioning_root();
    let check = chain::verify_chain(chain, &root);
    let (answer, code) = meter_answer_to_chain(chain, leaf_key);
    match check {
        Ok(k) => {
            assert_eq!(k, public(leaf_key));
            assert_eq!((answer, code), (ty::CHANNEL_READY, None));
            json!({"accepted": true, "meter_answer": "CHANNEL_READY"})
        }
        Err(e) => {
            assert_eq!((answer, code), (ty::ERROR, Some(ErrorCode::BadCertChain)));
            json!({"accepted": false, "reason": chain_error_name(e), "meter_answer": "ERROR", "code": ErrorCode::BadCertChain.code(), "code_name": "BAD_CERT_CHAIN"})
        }
    }
}

fn chains_vector() -> Value {
    let s = station_pki();
    let certificates = json!({
        "leaf": h(&s.leaf),
        "leaf_key_agreement": h(&s.leaf_key_agreement),
        "leaf_no_key_usage": h(&s.leaf_no_key_usage),
        "station_ca": h(&s.ca),
        "station_ca_foreign": h(&s.ca_foreign),
        "provisioning_root": h(line_protocol::testkit::PROVISIONING_ROOT_DER),
    });
    let cases = [
        (
            "leaf and intermediate CA, chaining to the provisioning root",
            &["leaf", "station_ca"][..],
        ),
        (
            "leaf, intermediate CA and the provisioning root's own certificate",
            &["leaf", "station_ca", "provisioning_root"],
        ),
        (
            "the same CA name and key certified by the foreign root (foreign-root.der)",
            &["leaf", "station_ca_foreign"],
        ),
        (
            "leaf with keyUsage keyAgreement, no digitalSignature",
            &["leaf_key_agreement", "station_ca"],
        ),
        (
            "leaf without a keyUsage extension",
            &["leaf_no_key_usage", "station_ca"],
        ),
    ];
    let cases: Vec<Value> = cases
        .into_iter()
        .map(|(n, names)| {
            let chain: Vec<Vec<u8>> = names.iter().map(|c| hx(&certificates[c])).collect();
            json!({"name": n, "chain": names, "expect": chain_verdict(&chain, &s.leaf_key)})
        })
        .collect();
    json!({
        "note": "station chains (CHANNEL_OPEN certificates, leaf first, named from `certificates`) checked against the provisioning root key (provisioning-root.pub) as in section 5.1. `reason` names the failed check and the certificate index counted from the leaf (informative: every failure is BAD_CERT_CHAIN). `meter_answer` is what a meter answered a CHANNEL_OPEN with this chain, signed by `leaf_private` over that session's transcript; the CHANNEL_OPEN frames and their transcripts are not given: a test builds its own CHANNEL_OPEN around each chain. station_ca_foreign has the serial number, subject, key, basicConstraints, keyUsage and subjectKeyIdentifier of station_ca, but its authorityKeyIdentifier names the foreign root's key and it is signed by foreign-root.key.pem (whose certificate has the provisioning root's name).",
        "ca_private": h(&s.ca_key.to_bytes()),
        "leaf_private": h(&s.leaf_key.to_bytes()),
        "leaf_public": h(&sec1(&public(&s.leaf_key))),
        "certificates": certificates,
        "cases": cases,
    })
}

fn check_chains(v: &Value) {
    let leaf_key = SigningKey::from_slice(&hx(&v["leaf_private"])).unwrap();
    assert_eq!(sec1(&public(&leaf_key)), hx(&v["leaf_public"]));
    let root = line_protocol::testkit::provisioning_root();
    let cases = v["cases"].as_array().unwrap();
    let mut accepted = 0;
    for c in cases {
        let chain: Vec<Vec<u8>> = c["chain"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| hx(&v["certificates"][n.as_str().unwrap()]))
            .collect();
        let e = &c["expect"];
        match chain::verify_chain(&chain, &root) {
            Ok(k) => {
                assert_eq!(e["accepted"], true, "{}", c["name"]);
                assert_eq!(sec1(&k), hx(&v["leaf_public"]));
                accepted += 1;
            }
            Err(err) => {
                assert_eq!(e["accepted"], false, "{}", c["name"]);
                assert_eq!(e["reason"], chain_error_name(err), "{}", c["name"]);
                assert_eq!(e["code"], ErrorCode::BadCertChain.code());
            }
        }
        let (answer, code) = meter_answer_to_chain(&chain, &leaf_key);
        assert_eq!(type_name(answer), e["meter_answer"], "{}", c["name"]);
        assert_eq!(code.map(|c| c.code()), e["code"].as_u64().map(|c| c as u16));
    }
    assert_eq!(accepted, 2);
    assert_eq!(
        hx(&v["certificates"]["provisioning_root"]),
        line_protocol::testkit::PROVISIONING_ROOT_DER
    );
    let ca_key = SigningKey::from_slice(&hx(&v["ca_private"])).unwrap();
    let ca = Certificate::from_der(&hx(&v["certificates"]["station_ca"])).unwrap();
    assert_eq!(chain::p256_key(&ca), Some(public(&ca_key)));
    // The foreign CA differs from station_ca only in its authority key identifier and its
    // signature.
    let foreign = Certificate::from_der(&hx(&v["certificates"]["station_ca_foreign"])).unwrap();
    let (t, f) = (ca.tbs_certificate(), foreign.tbs_certificate());
    assert_eq!(t.serial_number(), f.serial_number());
    assert_eq!(t.subject(), f.subject());
    assert_eq!(
        t.issuer(),
        f.issuer(),
        "the foreign root has the provisioning root's name"
    );
    assert_eq!(t.subject_public_key_info(), f.subject_public_key_info());
    let (te, fe) = (t.extensions().unwrap(), f.extensions().unwrap());
    assert_eq!(te.len(), fe.len());
    for (a, b) in te.iter().zip(fe) {
        assert_eq!(a.extn_id, b.extn_id);
        let same = a == b;
        assert_eq!(
            same,
            a.extn_id != AuthorityKeyIdentifier::OID,
            "{}",
            a.extn_id
        );
    }
    assert_eq!(cases[2]["expect"]["reason"], "signature(1)");
    assert_eq!(cases[3]["expect"]["reason"], "leaf_key_usage");
    assert_eq!(cases[4]["expect"]["reason"], "leaf_key_usage");
}

// --- fw_decompress ---

const FW_DEFLATE_SIZE: u32 = 4096;

fn fw_decompress_cases() -> Vec<(&'static str, FwData, Option<ErrorCode>)> {
    let block: Vec<u8> = (0..2048u32).map(|i| (i / 7 % 251) as u8).collect();
    let deflate = |n: usize| miniz_oxide::deflate::compress_to_vec(&block[..n], 6);
    let full = deflate(1024);
    let d = |raw_len: u32, data: Vec<u8>| FwData {
        offset: 0,
        raw_len,
        encoding: Encoding::Deflate,
        data,
    };
    vec![
        (
            "1024 bytes deflated, raw_len 1024",
            d(1024, full.clone()),
            None,
        ),
        (
            "512 bytes deflated, raw_len 1024: the stream ends early",
            d(1024, deflate(512)),
            Some(ErrorCode::FwDecompress),
        ),
        (
            "2048 bytes deflated, raw_len 1024: the stream runs past raw_len",
            d(1024, deflate(2048)),
            Some(ErrorCode::FwDecompress),
        ),
        (
            "the 1024-byte stream cut short by 4 bytes",
            d(1024, full[..full.len() - 4].to_vec()),
            Some(ErrorCode::FwDecompress),
        ),
        (
            "not a DEFLATE stream (block type 3)",
            d(1024, vec![0xFF; 16]),
            Some(ErrorCode::FwDecompress),
        ),
    ]
}

fn fw_receiver() -> line_protocol::firmware::FirmwareReceiver {
    line_protocol::firmware::FirmwareReceiver::new(FW_DEFLATE_SIZE, [0x66; 32], true, 32768, 0)
}

fn fw_decompress_vector() -> Value {
    let fw_begin = Message::FwBegin {
        size: FW_DEFLATE_SIZE,
        sha256: [0x66; 32],
        compression: 1,
    };
    let cases: Vec<Value> = fw_decompress_cases()
        .into_iter()
        .map(|(name, d, want)| {
            // The meter session on the channel vector's channel answers as the receiver decides.
            let (_, mut l) = channel_run(HostConfig::default().features);
            let (_, begin) = l.host.request(&fw_begin).unwrap();
            let rsp = describe(&l.send(&begin), &l.k_mh);
            assert_eq!(rsp["type"], ty::FW_BEGIN_RSP);
            let msg = Message::FwData(d.clone());
            let (_, data) = l.host.request(&msg).unwrap();
            let answer = describe(&l.send(&data), &l.k_mh);
            let got = fw_receiver().decode(&d).err();
            assert_eq!(got, want, "{name}");
            match want {
                None => {
                    assert_eq!(answer["type"], ty::FW_ACK, "{name}");
                    let ack = hx(&answer["plaintext"]);
                    let fw_ack = Message::decode(ty::FW_ACK, &ack).unwrap();
                    json!({"name": name, "payload": h(&msg.to_bytes()), "fields": fields(&msg), "expect": "FW_ACK", "fw_ack_payload": h(&ack), "fw_ack": fields(&fw_ack)})
                }
                Some(code) => {
                    assert_eq!(answer["code"], code.code(), "{name}");
                    json!({"name": name, "payload": h(&msg.to_bytes()), "fields": fields(&msg), "expect": "ERROR", "code": code.code(), "code_name": code_name(code)})
                }
            }
        })
        .collect();
    json!({
        "note": "FW_DATA payloads, each on a fresh start: a new channel (the `channel` vector's, which negotiated DEFLATE), the FW_BEGIN `fw_begin_payload` (size 4096, compression 1; nothing of the image held, FW_BEGIN_RSP have 0), then that one FW_DATA, so every case has offset 0 and raw_len 1024. A meter inflates with an output limit of raw_len bytes; anything but exactly raw_len bytes is ERROR FW_DECOMPRESS, ref = the data frame's seq (section 4.12). The good case is answered FW_ACK have 1024 with no ranges (`fw_ack`).",
        "fw_begin_payload": h(&fw_begin.to_bytes()),
        "cases": cases,
    })
}

fn check_fw_decompress(v: &Value) {
    let Message::FwBegin {
        size, compression, ..
    } = Message::decode(ty::FW_BEGIN, &hx(&v["fw_begin_payload"])).unwrap()
    else {
        panic!("not FW_BEGIN")
    };
    assert_eq!((size, compression), (FW_DEFLATE_SIZE, 1));
    let cases = v["cases"].as_array().unwrap();
    for c in cases {
        let Message::FwData(d) = Message::decode(ty::FW_DATA, &hx(&c["payload"])).unwrap() else {
            panic!("not FW_DATA")
        };
        assert_eq!(fields(&Message::FwData(d.clone())), c["fields"]);
        match fw_receiver().decode(&d) {
            Ok(Some(bytes)) => {
                assert_eq!(c["expect"], "FW_ACK", "{}", c["name"]);
                assert_eq!(bytes.len(), d.raw_len as usize);
                // What the meter acknowledges: the block held, from offset 0.
                let mut rx = fw_receiver();
                assert!(rx.insert(d.offset, d.raw_len));
                let ack = Message::FwAck(rx.ack());
                assert_eq!(h(&ack.to_bytes()), c["fw_ack_payload"]);
                assert_eq!(fields(&ack), c["fw_ack"]);
                assert_eq!(c["fw_ack"], json!({"have": 1024, "ranges": []}));
            }
            Ok(None) => panic!("nothing is held yet"),
            Err(e) => {
                assert_eq!(c["code"], e.code(), "{}", c["name"]);
                assert_eq!(e, ErrorCode::FwDecompress, "{}", c["name"]);
            }
        }
    }
    assert_eq!(cases.iter().filter(|c| c["expect"] == "ERROR").count(), 4);
}

// --- sessions: meter behaviour on the channel vector's session ---

/// One step of a meter that is not the channel vector's (a fresh one): frames in plaintext.
fn meter_step(
    what: &str,
    send: &[u8],
    meter: &mut MeterSession,
    app: &mut MemMeter,
    rng: &mut SeededRng,
    l: &Live,
) -> Value {
    let answer = meter.receive(send, app, rng).bytes;
    step(what, send, &answer, l)
}

/// A request on the live channel and the meter's answer, as a step.
fn call_step(what: &str, l: &mut Live, msg: &Message) -> Value {
    let (_, send) = l.host.request(msg).unwrap();
    let answer = l.send(&send);
    step(what, &send, &answer, l)
}

fn sessions_vector() -> Value {
    // A CHANNEL_OPEN repeated before the first encrypted host frame, then after it.
    let (_, mut l) = channel_run(HostConfig::default().features);
    let (open, status) = (l.open_frame.clone(), l.status_frame.clone());
    let again = l.send(&open);
    assert_eq!(again, l.ready_frame);
    let mut repeat = vec![step(
        "the channel vector's CHANNEL_OPEN frame again (seq 1), before any encrypted host frame: the channel vector's CHANNEL_READY frame again, byte for byte (the meter's seq 1)",
        &open,
        &again,
        &l,
    )];
    let rsp = l.send(&status);
    repeat.push(step(
        "the channel vector's STATUS (seq 2): STATUS_RSP (the meter's seq 2)",
        &status,
        &rsp,
        &l,
    ));
    let down = l.send(&open);
    repeat.push(step(
        "the same CHANNEL_OPEN once more, now that an encrypted host frame has arrived: plaintext on the channel, answered with a plaintext ERROR UNEXPECTED (ref 1); the channel ends",
        &open,
        &down,
        &l,
    ));
    let (_, next) = l.host.request(&Message::Status).unwrap();
    let after = l.send(&next);
    repeat.push(step(
        "the host's next STATUS (seq 3): the meter has no channel: a plaintext ERROR NO_CHANNEL",
        &next,
        &after,
        &l,
    ));

    // A HELLO for versions 2 to 3 only, to a meter just powered up (it speaks version 1).
    let (_, l) = channel_run(HostConfig::default().features);
    let (mut meter, mut app, mut rng) = (
        MeterSession::new(8192),
        MemMeter::new(&[0xA5; 12]),
        SeededRng::new(202),
    );
    let hello = Message::Hello(Hello {
        version_min: 2,
        version_max: 3,
        nonce: [0x11; 16],
        max_payload: 16384,
        window: 16,
        features: FEATURE_DEFLATE,
    });
    let hello = wire(ty::HELLO, 0, 0, 0, &hello.to_bytes());
    let version = vec![
        meter_step(
            "HELLO (seq 0) with version_min 2, version_max 3: a plaintext ERROR UNSUPPORTED_VERSION (ref 0, the meter's seq 0); the meter stays in IDLE",
            &hello,
            &mut meter,
            &mut app,
            &mut rng,
            &l,
        ),
        meter_step(
            "the channel vector's CHANNEL_OPEN (seq 1): no HELLO was answered, so the meter is in IDLE: a plaintext ERROR UNEXPECTED (ref 1, the meter's seq 1)",
            &l.open_frame,
            &mut meter,
            &mut app,
            &mut rng,
            &l,
        ),
    ];

    // A CHANNEL_OPEN refused, then the same frame again (its ERROR was lost).
    let (mut meter, mut app, mut rng) = (
        MeterSession::new(8192),
        MemMeter::new(&[0xA5; 12]),
        SeededRng::new(202),
    );
    let open_len = one_frame(&l.open_frame).payload.len();
    let bad_open = flip_payload_byte(&l.open_frame, open_len - 1);
    let refused = vec![
        meter_step(
            "the channel vector's HELLO to a meter just powered up (the channel vector's meter): its HELLO_ACK",
            &l.hello_frame,
            &mut meter,
            &mut app,
            &mut rng,
            &l,
        ),
        meter_step(
            "the channel vector's CHANNEL_OPEN with the last byte of its signature flipped (CRC made good): a plaintext ERROR BAD_SIGNATURE; the meter returns to IDLE",
            &bad_open,
            &mut meter,
            &mut app,
            &mut rng,
            &l,
        ),
        meter_step(
            "the same frame again, as a host sends it when the ERROR was lost: the meter is in IDLE, a plaintext ERROR UNEXPECTED; the host starts over with HELLO",
            &bad_open,
            &mut meter,
            &mut app,
            &mut rng,
            &l,
        ),
    ];

    // The lifecycle gate: the meter sealed (set in the meter directly once the channel is up).
    let (_, mut l) = channel_run(HostConfig::default().features);
    l.app.lifecycle = Lifecycle::Sealed;
    let mut locked = vec![call_step(
        "IDENTITY (seq 3): LOCKED",
        &mut l,
        &Message::Identity(derived_identity("EM3-", "EXM", 42)),
    )];
    locked.push(call_step(
        "KEYGEN slot 3 (seq 4): well formed, so the gate answers first: LOCKED (an unsealed meter answers MALFORMED, see keygen_repeat)",
        &mut l,
        &Message::KeyGen {
            slot: CertSlot::DeviceCa,
            curve: Curve::P256,
        },
    ));
    let (_, send) = l.host.request_raw(ty::KEYGEN, vec![9, 1]).unwrap();
    let answer = l.send(&send);
    locked.push(step(
        "KEYGEN with slot 9 (seq 5): the payload does not decode, which is checked before the gate: MALFORMED",
        &send,
        &answer,
        &l,
    ));
    locked.push(call_step(
        "RESET 2, factory wipe (seq 6): LOCKED",
        &mut l,
        &Message::Reset {
            mode: ResetMode::FactoryWipe,
        },
    ));
    locked.push(call_step(
        "SEAL with the undefined bit 3 (seq 7): SEAL passes the gate, its own check answers MALFORMED",
        &mut l,
        &Message::Seal { disable: 0x0009 },
    ));
    locked.push(call_step(
        "STATUS (seq 8): STATUS_RSP, lifecycle 2; the channel is still up after every refusal",
        &mut l,
        &Message::Status,
    ));

    // KEYGEN repeated within one channel session.
    let (_, mut l) = channel_run(HostConfig::default().features);
    let keygen = Message::KeyGen {
        slot: CertSlot::Sign,
        curve: Curve::P256,
    };
    let keygen_repeat = vec![
        call_step("KEYGEN slot 1, P-256 (seq 3): KEYGEN_RSP", &mut l, &keygen),
        call_step(
            "the same KEYGEN again in the same channel session (seq 4): the same KEYGEN_RSP payload",
            &mut l,
            &keygen,
        ),
        call_step(
            "KEYGEN slot 3 (seq 5) on this unsealed meter: MALFORMED, from KEYGEN's own check",
            &mut l,
            &Message::KeyGen {
                slot: CertSlot::DeviceCa,
                curve: Curve::P256,
            },
        ),
    ];

    // FW_ACK ranges.
    let (_, mut l) = channel_run(HostConfig::default().features);
    let image: Vec<u8> = (0..4096u32).map(|i| (i % 251 + 1) as u8).collect();
    let block = |offset: u32, raw_len: u32| {
        Message::FwData(FwData {
            offset,
            raw_len,
            encoding: Encoding::Raw,
            data: image[offset as usize..(offset + raw_len) as usize].to_vec(),
        })
    };
    let mut fw = vec![call_step(
        "FW_BEGIN size 4096, compression 0 (seq 3): FW_BEGIN_RSP have 0",
        &mut l,
        &Message::FwBegin {
            size: 4096,
            sha256: crypto::sha256(&image),
            compression: 0,
        },
    )];
    for (what, offset, raw_len) in [
        (
            "[1024, 1536) (seq 4): have 0, ranges [1024, 1536)",
            1024,
            512,
        ),
        (
            "[2048, 2560) (seq 5): have 0, ranges [1024, 1536) and [2048, 2560)",
            2048,
            512,
        ),
        (
            "[1536, 2048) (seq 6), adjacent to both: merged, have 0, ranges [1024, 2560)",
            1536,
            512,
        ),
        ("[0, 1024) (seq 7): have 2560, no ranges", 0, 1024),
        (
            "[1024, 1536) again (seq 8): already held, acknowledged as it stands: have 2560, no ranges",
            1024,
            512,
        ),
    ] {
        fw.push(call_step(
            &format!("FW_DATA {what}"),
            &mut l,
            &block(offset, raw_len),
        ));
    }
    fw.push(call_step(
        "FW_DATA with raw_len 0 (seq 9): FW_OUT_OF_RANGE",
        &mut l,
        &Message::FwData(FwData {
            offset: 0,
            raw_len: 0,
            encoding: Encoding::Raw,
            data: Vec::new(),
        }),
    ));
    fw.push(call_step(
        "FW_DATA [3584, 4608) (seq 10), past the end of the image: FW_OUT_OF_RANGE",
        &mut l,
        &Message::FwData(FwData {
            offset: 3584,
            raw_len: 1024,
            encoding: Encoding::Raw,
            data: vec![0x5A; 1024],
        }),
    ));
    fw.push(call_step(
        "FW_END (seq 11) with [2560, 4096) missing: FW_RESULT FW_INCOMPLETE, hash and version zero; the transfer goes on",
        &mut l,
        &Message::FwEnd,
    ));
    fw.push(call_step(
        "FW_DATA [2560, 4096) (seq 12): have 4096, no ranges",
        &mut l,
        &block(2560, 1536),
    ));

    json!({
        "note": "steps as in `errors`, each list from its own start. `channel_open_repeat`, `locked`, `keygen_repeat` and `fw_ack_ranges` continue the `channel` vector's session on its keys from where that vector leaves it (the meter has sent HELLO_ACK seq 0 and CHANNEL_READY seq 1; the host's seq 2 is the `channel` vector's STATUS, and a list that does not send it goes on with seq 3: gaps are allowed). `hello_refused` and `channel_open_refused` start with a meter just powered up, all in plaintext. In `locked` the meter is sealed in its memory once the channel is up (its HELLO_ACK said blank, so that the keys are the channel vector's). KEYGEN_RSP carries the test meter's placeholder request (`CSR:` and the public point), not PKCS#10: what counts is that the repeat is byte-identical. ERROR details are the reference implementation's words.",
        "channel_open_repeat": repeat,
        "hello_refused": version,
        "channel_open_refused": refused,
        "locked": locked,
        "keygen_repeat": keygen_repeat,
        "fw_ack_ranges": fw,
    })
}

/// The message a step's answer carries (decrypted as `describe` left it).
fn answer_msg(s: &Value) -> Message {
    let a = &s["answer_is"];
    Message::decode(a["type"].as_u64().unwrap() as u8, &hx(&a["plaintext"])).unwrap()
}

fn error_code(s: &Value) -> Option<u16> {
    match answer_msg(s) {
        Message::Error { code, .. } => Some(code.code()),
        _ => None,
    }
}

fn check_sessions(v: &Value, channel: &Value) {
    for list in [
        "channel_open_repeat",
        "hello_refused",
        "channel_open_refused",
        "locked",
        "keygen_repeat",
        "fw_ack_ranges",
    ] {
        check_steps(&v[list], channel);
    }
    let encrypted = |s: &Value| s["answer_is"]["encrypted"].as_bool().unwrap();

    let r = &v["channel_open_repeat"];
    assert_eq!(r[0]["send"], channel["channel_open_frame"]);
    assert_eq!(r[0]["answer"], channel["channel_ready_frame"]);
    assert_eq!(r[1]["send"], channel["status_frame"]);
    assert!(matches!(answer_msg(&r[1]), Message::StatusRsp(_)));
    assert_eq!(r[2]["send"], channel["channel_open_frame"]);
    assert_eq!(error_code(&r[2]), Some(ErrorCode::Unexpected.code()));
    assert!(!encrypted(&r[2]));
    assert_eq!(r[2]["answer_is"]["ref"], 1);
    assert_eq!(error_code(&r[3]), Some(ErrorCode::NoChannel.code()));

    let h = &v["hello_refused"];
    let Message::Hello(hello) =
        Message::decode(ty::HELLO, &hx(&h[0]["send_is"]["plaintext"])).unwrap()
    else {
        panic!("not HELLO")
    };
    assert!(hello.version_min > 1 && hello.version_max >= hello.version_min);
    assert_eq!(
        error_code(&h[0]),
        Some(ErrorCode::UnsupportedVersion.code())
    );
    assert_eq!(
        (
            h[0]["answer_is"]["seq"].as_u64(),
            h[0]["answer_is"]["ref"].as_u64()
        ),
        (Some(0), Some(0))
    );
    assert_eq!(h[1]["send"], channel["channel_open_frame"]);
    assert_eq!(error_code(&h[1]), Some(ErrorCode::Unexpected.code()));

    let c = &v["channel_open_refused"];
    assert_eq!(c[0]["send"], channel["hello_frame"]);
    assert_eq!(c[0]["answer"], channel["hello_ack_frame"]);
    assert_eq!(error_code(&c[1]), Some(ErrorCode::BadSignature.code()));
    assert_eq!(c[2]["send"], c[1]["send"]);
    assert_eq!(error_code(&c[2]), Some(ErrorCode::Unexpected.code()));
    assert!(c.as_array().unwrap()[1..].iter().all(|s| !encrypted(s)));

    let l = v["locked"].as_array().unwrap();
    let codes: Vec<Option<u16>> = l.iter().map(error_code).collect();
    assert_eq!(
        codes,
        [
            Some(0x0B),
            Some(0x0B),
            Some(0x01),
            Some(0x0B),
            Some(0x01),
            None
        ]
    );
    assert!(l.iter().all(encrypted), "the channel stays up");
    match answer_msg(&l[5]) {
        Message::StatusRsp(s) => assert_eq!(s.lifecycle, Lifecycle::Sealed as u8),
        other => panic!("{other:?}"),
    }

    let k = &v["keygen_repeat"];
    assert!(matches!(
        answer_msg(&k[0]),
        Message::KeyGenRsp {
            slot: CertSlot::Sign,
            ..
        }
    ));
    assert_eq!(
        k[0]["answer_is"]["plaintext"],
        k[1]["answer_is"]["plaintext"]
    );
    assert_ne!(
        k[0]["answer"], k[1]["answer"],
        "another frame, the same payload"
    );
    assert_eq!(error_code(&k[2]), Some(ErrorCode::Malformed.code()));
    assert!(encrypted(&k[2]));

    let f = v["fw_ack_ranges"].as_array().unwrap();
    assert_eq!(answer_msg(&f[0]), Message::FwBeginRsp { have: 0 });
    let acks: Vec<Value> = f[1..6].iter().map(|s| fields(&answer_msg(s))).collect();
    assert_eq!(
        acks,
        [
            json!({"have": 0, "ranges": [[1024, 1536]]}),
            json!({"have": 0, "ranges": [[1024, 1536], [2048, 2560]]}),
            json!({"have": 0, "ranges": [[1024, 2560]]}),
            json!({"have": 2560, "ranges": []}),
            json!({"have": 2560, "ranges": []}),
        ]
    );
    assert_eq!(error_code(&f[6]), Some(ErrorCode::FwOutOfRange.code()));
    assert_eq!(error_code(&f[7]), Some(ErrorCode::FwOutOfRange.code()));
    assert_eq!(
        answer_msg(&f[8]),
        Message::FwResult(FwResult {
            status: ErrorCode::FwIncomplete.code(),
            sha256: [0; 32],
            version: [0; 8]
        })
    );
    assert_eq!(
        fields(&answer_msg(&f[9])),
        json!({"have": 4096, "ranges": []})
    );
    assert!(f.iter().all(encrypted));
}

fn generate() -> Value {
    let pki = pki();
    let mut frames = frame_vectors();
    expect_frames(&mut frames);
    let messages: Vec<Value> = sample_messages()
        .into_iter()
        .map(|(name, m)| json!({"name": name, "type": m.msg_type(), "type_name": m.name(), "payload": h(&m.to_bytes()), "fields": fields(&m)}))
        .chain(invalid_messages().into_iter().map(|(name, t, p, err)| json!({"name": name, "type": t, "payload": h(&p), "error": err})))
        .collect();
    json!({
        "protocol": "jig line protocol",
        "version": 1,
        "frames": frames,
        "messages": messages,
        "channel": channel_vector(HostConfig::default().features),
        "channel_x963": channel_vector(HostConfig::default().features | FEATURE_KTK_X963),
        "sealing": sealing_vector(),
        "receipt": receipt_vector(),
        "csr": csr_vector(),
        "pki": pki_vector(&pki),
        "firmware": firmware_vector(&pki),
        "attest": attest_vector(&pki),
        "put_key_ec": put_key_ec_vector(),
        "errors": errors_vector(),
        "chains": chains_vector(),
        "replay_tamper": replay_tamper_vector(),
        "fw_decompress": fw_decompress_vector(),
        "rework": rework_vector(),
        "sessions": sessions_vector(),
    })
}

#[test]
fn vectors_decode_to_their_stated_meaning_and_do_not_drift() {
    let generated = generate();
    if std::env::var_os("UPDATE_VECTORS").is_some() {
        std::fs::write(
            path(),
            serde_json::to_string_pretty(&generated).unwrap() + "\n",
        )
        .unwrap();
    }
    let text = std::fs::read_to_string(path()).expect("schemas/line-protocol-vectors.json");
    let file: Value = serde_json::from_str(&text).unwrap();

    check_frames(file["frames"].as_array().unwrap());
    for m in file["messages"].as_array().unwrap() {
        let name = m["name"].as_str().unwrap();
        let t = m["type"].as_u64().unwrap() as u8;
        let payload = hex::decode(m["payload"].as_str().unwrap()).unwrap();
        match m.get("error").and_then(Value::as_str) {
            Some(err) => {
                let e = Message::decode(t, &payload).expect_err(name);
                assert_eq!(code_name(e.code()), err, "{name}");
            }
            None => {
                let msg = Message::decode(t, &payload).unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(fields(&msg), m["fields"], "{name}");
                assert_eq!(msg.to_bytes(), payload, "{name}");
            }
        }
    }
    check_channel(&file["channel"]);
    assert_eq!(file["channel"]["ktk_method"], "aes-ecb");
    check_channel(&file["channel_x963"]);
    assert_eq!(file["channel_x963"]["ktk_method"], "x963");
    check_sealing(&file["sealing"]);
    check_rework(&file["rework"]);
    check_receipt(&file["receipt"]);
    // The IDENTITY message vector is the identity section 4.7 derives, as is its example.
    let identity = file["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["name"] == "identity")
        .unwrap();
    assert_eq!(
        identity["fields"],
        fields(&Message::Identity(derived_identity("EM3-", "EXM", 42)))
    );
    let example = derived_identity("", "DMW", 100);
    assert_eq!(h(&example.system_title), "444d570000000064");
    assert_eq!(example.ldn, "DMW0000000000100");

    // Above the codec.
    let channel = &file["channel"];
    check_csr(&file["csr"]);
    check_pki(&file["pki"]);
    check_firmware(&file["firmware"]);
    check_attest(&file["attest"], &file["pki"], &file["firmware"]);
    check_put_key_ec(&file["put_key_ec"], channel);
    check_errors(&file["errors"], channel);
    check_chains(&file["chains"]);
    check_replay_tamper(&file["replay_tamper"], channel);
    check_fw_decompress(&file["fw_decompress"]);
    check_sessions(&file["sessions"], channel);

    // Every message type of the specification has a vector.
    let mut types: Vec<u8> = file["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("error").is_none())
        .map(|m| m["type"].as_u64().unwrap() as u8)
        .collect();
    types.push(ty::CHANNEL_OPEN); // in the channel vector
    for t in [
        ty::HELLO,
        ty::HELLO_ACK,
        ty::CHANNEL_OPEN,
        ty::CHANNEL_READY,
        ty::ACK,
        ty::STATUS,
        ty::STATUS_RSP,
        ty::IDENTITY,
        ty::KEYGEN,
        ty::KEYGEN_RSP,
        ty::PUT_CERT,
        ty::PUT_ANCHOR,
        ty::PUT_KEY,
        ty::FW_BEGIN,
        ty::FW_BEGIN_RSP,
        ty::FW_DATA,
        ty::FW_ACK,
        ty::FW_END,
        ty::FW_RESULT,
        ty::SEAL,
        ty::SEAL_RSP,
        ty::ATTEST,
        ty::ATTEST_RSP,
        ty::RESET,
        ty::ERROR,
    ] {
        assert!(types.contains(&t), "no vector for {}", type_name(t));
    }
    assert_eq!(
        file, generated,
        "the vectors drifted from the implementation; regenerate with UPDATE_VECTORS=1 and review the diff"
    );
}
