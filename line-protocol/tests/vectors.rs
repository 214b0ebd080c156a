//! The test vectors of `schemas/line-protocol-vectors.json`: every frame and message vector is
//! decoded and compared with the meaning written next to it, every valid one re-encoded to the same
//! bytes, and the channel vector recomputed from its published keys. The file itself is produced by
//! this code (`UPDATE_VECTORS=1 cargo test -p line-protocol --test vectors`) and must not drift.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use std::path::PathBuf;

use line_protocol::crypto::{self, kcv_aes, wrap_key};
use line_protocol::frame::{self, Decoded, FrameDecoder, Header};
use line_protocol::host::{HostConfig, HostSession};
use line_protocol::meter::MeterSession;
use line_protocol::msg::*;
use line_protocol::receipt::Receipt;
use line_protocol::testkit::{MemMeter, STATION_DER, SeededRng, station_sign};
use p256::elliptic_curve::Generate;
use serde_json::{Value, json};

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
                serial: "EM3-000042".into(),
                system_title: *b"EXM\x00\x00\x00\x00\x2A",
                ldn: "EXM000000002A".into(),
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

fn code_name(c: ErrorCode) -> &'static str {
    match c {
        ErrorCode::Malformed => "MALFORMED",
        ErrorCode::TooLarge => "TOO_LARGE",
        ErrorCode::UnknownType => "UNKNOWN_TYPE",
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
    json!({
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
        "put_key": {"clear": h(&guek), "kcv": h(&kcv_aes(&guek).unwrap()), "wrap": 1, "wrapped": h(&wrapped)}
    })
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
    let station = x509_cert::Certificate::from_der(STATION_DER).unwrap();
    let key = line_protocol::chain::p256_key(&station).unwrap();
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
}

use der::Decode;

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

fn receipt_vector() -> Value {
    let r = Receipt {
        uid: vec![0xA5; 12],
        serial: "EM3-000042".into(),
        system_title: *b"EXM\x00\x00\x00\x00\x2A",
        ldn: "EXM000000002A".into(),
        lifecycle: Lifecycle::Sealed,
        disabled: 3,
        fw_sha256: [0x77; 32],
        certs: vec![(1, [0x01; 32]), (2, [0x02; 32])],
        nonce: [0x88; 16],
    };
    json!({"hex": h(&r.encode()), "uid": h(&r.uid), "serial": r.serial, "system_title": h(&r.system_title), "ldn": r.ldn, "lifecycle": 2, "disabled": 3, "fw_sha256": h(&r.fw_sha256), "certs": [[1, h(&[0x01; 32])], [2, h(&[0x02; 32])]], "nonce": h(&r.nonce)})
}

fn generate() -> Value {
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
    let r = &file["receipt"];
    let decoded = Receipt::decode(&hex::decode(r["hex"].as_str().unwrap()).unwrap()).unwrap();
    assert_eq!(h(&decoded.uid), r["uid"]);
    assert_eq!(decoded.serial, r["serial"].as_str().unwrap());
    assert_eq!(
        decoded.lifecycle as u8 as u64,
        r["lifecycle"].as_u64().unwrap()
    );
    assert_eq!(h(&decoded.nonce), r["nonce"]);

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
