//! Host and meter sessions against each other in memory: the whole message set over the secure
//! channel, and what each kind of bad input produces.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use line_protocol::Violation;
use line_protocol::crypto::{self, kcv_aes, wrap_key};
use line_protocol::firmware::{FirmwareSender, PlanParams, TransferPlan};
use line_protocol::host::{HostConfig, HostSession, Inbound};
use line_protocol::meter::MeterEvent;
use line_protocol::msg::{
    AnchorKind, CertSlot, Curve, ErrorCode, Identity, KeyId, KeyType, Lifecycle, Message, PutKey,
    ResetMode, WrapAlg, iface,
};
use line_protocol::testkit::{self, Pair, STATION_DER, STATION_FOREIGN_DER, station_sign};

fn error_code(m: &Message) -> ErrorCode {
    match m {
        Message::Error { code, .. } => *code,
        other => panic!("expected ERROR, got {other:?}"),
    }
}

#[test]
fn full_provisioning_exchange_in_memory() {
    let mut p = Pair::new(10);
    p.open();
    assert!(p.host.is_secure() && p.meter.is_secure());

    let id = Identity {
        serial: "EM3000000001".into(),
        system_title: *b"EXM\x00\x00\x00\x00\x01",
        ldn: "EXM0000000001".into(),
    };
    assert_eq!(p.call(&Message::Identity(id.clone())), Message::Ack);
    assert_eq!(p.app.identity.as_ref(), Some(&id));

    let csr = match p.call(&Message::KeyGen {
        slot: CertSlot::Sign,
        curve: Curve::P256,
    }) {
        Message::KeyGenRsp {
            slot: CertSlot::Sign,
            csr,
        } => csr,
        other => panic!("{other:?}"),
    };
    // Idempotent within a session: asking again gives the same request.
    assert_eq!(
        p.call(&Message::KeyGen {
            slot: CertSlot::Sign,
            curve: Curve::P256
        }),
        Message::KeyGenRsp {
            slot: CertSlot::Sign,
            csr
        }
    );
    assert_eq!(
        p.call(&Message::PutCert {
            slot: CertSlot::Sign,
            der: vec![0x30, 3, 1, 2, 3]
        }),
        Message::Ack
    );
    assert_eq!(
        p.call(&Message::PutAnchor {
            kind: AnchorKind::FirmwareVerification,
            index: 0,
            der: vec![0x30, 0]
        }),
        Message::Ack
    );

    // A secret key wrapped under the key-transport key the host's HSM would derive.
    let ktk = p.host_ktk();
    let guek = [0x11u8; 16];
    let wrapped = wrap_key(&ktk, WrapAlg::AesKw, &guek).unwrap();
    let put = PutKey {
        key_id: KeyId::Guek,
        key_type: KeyType::Aes128,
        wrap: WrapAlg::AesKw,
        kcv: kcv_aes(&guek).unwrap(),
        wrapped: wrapped.clone(),
    };
    assert_eq!(p.call(&Message::PutKey(put.clone())), Message::Ack);
    assert_eq!(
        p.app.secrets.get(&(KeyId::Guek as u8)),
        Some(&guek.to_vec())
    );

    // Wrong KCV, wrong wrapping, wrong length for the type.
    let mut bad_kcv = put.clone();
    bad_kcv.kcv[0] ^= 1;
    assert_eq!(
        error_code(&p.call(&Message::PutKey(bad_kcv))),
        ErrorCode::KcvMismatch
    );
    let mut bad_wrap = put.clone();
    bad_wrap.wrapped[3] ^= 1;
    assert_eq!(
        error_code(&p.call(&Message::PutKey(bad_wrap))),
        ErrorCode::UnwrapFailed
    );
    let mut bad_type = put.clone();
    bad_type.key_type = KeyType::Aes256;
    assert_eq!(
        error_code(&p.call(&Message::PutKey(bad_type))),
        ErrorCode::UnwrapFailed
    );

    // Firmware, then seal, attest, release.
    let image: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    let neg = p.host.negotiated().unwrap();
    let plan = TransferPlan::new(
        &image,
        PlanParams {
            max_payload: neg.max_payload,
            max_block: neg.max_block,
            compress: neg.compression,
        },
    );
    let have = match p.call(&Message::FwBegin {
        size: plan.size,
        sha256: plan.sha256,
        compression: 1,
    }) {
        Message::FwBeginRsp { have } => have,
        other => panic!("{other:?}"),
    };
    assert_eq!(have, 0);
    let mut tx = FirmwareSender::new(plan.clone(), have, neg.window, 1000);
    let mut guard = 0;
    while !tx.is_complete() {
        guard += 1;
        assert!(guard < 10_000);
        let mut wire = Vec::new();
        let mut sent = Vec::new();
        while let Some(i) = tx.next_to_send() {
            let seq = p.host.encode_block(&plan.blocks[i], &mut wire).unwrap();
            tx.sent(i, seq, 0);
            sent.push(seq);
        }
        for ev in p.exchange(&wire) {
            match ev {
                Inbound::Message {
                    reference,
                    msg: Message::FwAck(a),
                    ..
                } => tx.on_ack(&a, reference),
                other => panic!("{other:?}"),
            }
        }
    }
    match p.call(&Message::FwEnd) {
        Message::FwResult(r) => {
            assert_eq!(r.status, 0);
            assert_eq!(r.sha256, crypto::sha256(&image));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.app.staging, image);

    match p.call(&Message::Seal {
        disable: iface::DEBUG,
    }) {
        Message::SealRsp {
            lifecycle,
            disabled,
        } => {
            assert_eq!(lifecycle, Lifecycle::Sealed);
            assert_eq!(
                disabled,
                iface::DEBUG | iface::PROVISIONING,
                "the jig port is always locked"
            );
        }
        other => panic!("{other:?}"),
    }
    // A repeated SEAL (its answer was lost) answers as the first; one that asks for more is
    // LOCKED and changes nothing.
    for disable in [iface::DEBUG, 0, iface::PROVISIONING | iface::DEBUG] {
        assert_eq!(
            p.call(&Message::Seal { disable }),
            Message::SealRsp {
                lifecycle: Lifecycle::Sealed,
                disabled: iface::DEBUG | iface::PROVISIONING,
            }
        );
    }
    assert_eq!(
        error_code(&p.call(&Message::Seal {
            disable: iface::OPTICAL
        })),
        ErrorCode::Locked
    );
    assert_eq!(p.app.disabled, iface::DEBUG | iface::PROVISIONING);
    // Sealed: provisioning messages are refused, status and attestation still answer.
    assert_eq!(
        error_code(&p.call(&Message::Identity(id))),
        ErrorCode::Locked
    );
    assert_eq!(
        error_code(&p.call(&Message::PutKey(put))),
        ErrorCode::Locked
    );
    assert!(
        matches!(p.call(&Message::Status), Message::StatusRsp(s) if s.lifecycle == Lifecycle::Sealed as u8)
    );
    assert!(matches!(
        p.call(&Message::Attest { nonce: [5; 16] }),
        Message::AttestRsp { .. }
    ));
    assert_eq!(
        p.call(&Message::Reset {
            mode: ResetMode::Release
        }),
        Message::Ack
    );
    assert_eq!(p.app.resets, vec![ResetMode::Release]);
    assert!(!p.meter.is_secure(), "the channel ends with a reset");
}

#[test]
fn chain_from_a_foreign_root_is_refused_and_the_meter_stays_usable() {
    let mut p = Pair::new(11);
    let hello = p.host.hello([2; 16]);
    p.exchange(&hello);
    let draft = p
        .host
        .prepare_open(&mut p.rng, [4; 65], vec![STATION_FOREIGN_DER.to_vec()])
        .unwrap();
    let open = p.host.finish_open(station_sign(&draft.to_sign)).unwrap();
    let ev = p.exchange(&open);
    assert!(
        matches!(
            &ev[..],
            [Inbound::Message {
                msg: Message::Error {
                    code: ErrorCode::BadCertChain,
                    ..
                },
                ..
            }]
        ),
        "{ev:?}"
    );
    // A correct handshake afterwards works.
    p.open();
}

#[test]
fn wrong_transcript_signature_is_refused() {
    let mut p = Pair::new(12);
    let hello = p.host.hello([2; 16]);
    p.exchange(&hello);
    let _draft = draft(&mut p);
    let open = p.host.finish_open(station_sign(b"something else")).unwrap();
    let ev = p.exchange(&open);
    assert!(
        matches!(
            &ev[..],
            [Inbound::Message {
                msg: Message::Error {
                    code: ErrorCode::BadSignature,
                    ..
                },
                ..
            }]
        ),
        "{ev:?}"
    );
}

#[test]
fn replayed_host_frame_aborts_the_meter_channel() {
    let mut p = Pair::new(13);
    p.open();
    let (_, frame) = p.host.request(&Message::Status).unwrap();
    let out = p.meter.receive(&frame, &mut p.app, &mut p.rng);
    assert!(!out.bytes.is_empty());
    let out = p.meter.receive(&frame, &mut p.app, &mut p.rng);
    assert!(
        out.events
            .iter()
            .any(|e| matches!(e, MeterEvent::Violation(Violation::Replay { .. }))),
        "{:?}",
        out.events
    );
    assert!(!p.meter.is_secure());
    // The host sees a plaintext ERROR: the channel is lost.
    let ev = p.host.receive(&out.bytes);
    assert!(
        matches!(
            &ev[..],
            [Inbound::ChannelLost {
                code: ErrorCode::Replay,
                ..
            }]
        ),
        "{ev:?}"
    );
}

#[test]
fn replayed_meter_frame_is_a_violation_at_the_host() {
    let mut p = Pair::new(14);
    p.open();
    let (_, req) = p.host.request(&Message::Status).unwrap();
    let out = p.meter.receive(&req, &mut p.app, &mut p.rng);
    let first = p.host.receive(&out.bytes);
    assert!(matches!(
        &first[..],
        [Inbound::Message {
            msg: Message::StatusRsp(_),
            ..
        }]
    ));
    let again = p.host.receive(&out.bytes);
    assert!(
        matches!(&again[..], [Inbound::Violation(Violation::Replay { .. })]),
        "{again:?}"
    );
    assert!(p.host.violation().is_some());
    assert!(
        p.host.request(&Message::Status).is_err(),
        "a failed session sends nothing more"
    );
}

#[test]
fn tampered_ciphertext_with_good_crc_is_a_violation() {
    let mut p = Pair::new(15);
    p.open();
    let (_, req) = p.host.request(&Message::Status).unwrap();
    // Re-frame the same header and a modified payload with a fresh, valid CRC.
    let mut dec = line_protocol::frame::FrameDecoder::new(8192);
    let mut out = Vec::new();
    dec.push(&req, &mut out);
    let line_protocol::frame::Decoded::Frame(mut f) = out.remove(0) else {
        panic!()
    };
    f.payload[0] ^= 0x80;
    let mut forged = Vec::new();
    line_protocol::frame::encode(&f.header, &f.payload, &mut forged);
    let out = p.meter.receive(&forged, &mut p.app, &mut p.rng);
    assert!(
        out.events
            .iter()
            .any(|e| matches!(e, MeterEvent::Violation(Violation::AuthFailed { .. })))
    );
}

#[test]
fn requests_without_a_channel_get_no_channel() {
    let mut p = Pair::new(16);
    let hello = p.host.hello([0; 16]);
    p.exchange(&hello);
    // Forge a plaintext STATUS: the meter must refuse it.
    let mut frame = Vec::new();
    let header = line_protocol::frame::Header {
        msg_type: 0x10,
        flags: 0,
        seq: 9,
        reference: 0,
        len: 0,
    };
    line_protocol::frame::encode(&header, &[], &mut frame);
    let out = p.meter.receive(&frame, &mut p.app, &mut p.rng);
    assert!(out.events.iter().any(|e| matches!(
        e,
        MeterEvent::Handled {
            error: Some(ErrorCode::NoChannel),
            ..
        }
    )));
}

#[test]
fn malformed_and_unknown_messages_get_error_codes_on_the_channel() {
    let mut p = Pair::new(17);
    p.open();
    // An unknown type and a truncated IDENTITY, sent encrypted as raw payloads.
    for (t, payload, want) in [
        (0x55u8, vec![], ErrorCode::UnknownType),
        (0x12u8, vec![5, b'A'], ErrorCode::Malformed),
        (0x14u8, vec![9, 1], ErrorCode::Malformed),
    ] {
        let frame = raw_request(&mut p.host, t, payload);
        let ev = p.exchange(&frame);
        match &ev[..] {
            [
                Inbound::Message {
                    msg: Message::Error { code, .. },
                    ..
                },
            ] => assert_eq!(*code, want),
            other => panic!("{other:?}"),
        }
    }
    assert!(
        p.meter.is_secure(),
        "a malformed message does not end the channel"
    );
}

fn raw_request(host: &mut HostSession, t: u8, payload: Vec<u8>) -> Vec<u8> {
    host.request_raw(t, payload).unwrap().1
}

#[test]
fn firmware_errors_have_their_codes() {
    let mut p = Pair::new(18);
    p.open();
    assert_eq!(
        error_code(&p.call(&Message::FwEnd)),
        ErrorCode::FwNotStarted
    );
    assert_eq!(
        error_code(&p.call(&Message::FwBegin {
            size: 2 << 20,
            sha256: [0; 32],
            compression: 0
        })),
        ErrorCode::FwTooLarge
    );
    let image = vec![7u8; 5000];
    let sha = crypto::sha256(&image);
    assert!(matches!(
        p.call(&Message::FwBegin {
            size: 5000,
            sha256: sha,
            compression: 0
        }),
        Message::FwBeginRsp { have: 0 }
    ));
    let d = line_protocol::msg::FwData {
        offset: 4990,
        raw_len: 20,
        encoding: line_protocol::msg::Encoding::Raw,
        data: vec![0; 20],
    };
    assert_eq!(
        error_code(&p.call(&Message::FwData(d))),
        ErrorCode::FwOutOfRange
    );
    match p.call(&Message::FwEnd) {
        Message::FwResult(r) => assert_eq!(r.status, ErrorCode::FwIncomplete.code()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn resume_after_reboot_continues_from_have() {
    let mut p = Pair::new(19);
    p.open();
    let image: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
    let plan = TransferPlan::new(
        &image,
        PlanParams {
            max_payload: 8192,
            max_block: 8192,
            compress: false,
        },
    );
    assert!(matches!(
        p.call(&Message::FwBegin {
            size: plan.size,
            sha256: plan.sha256,
            compression: 0
        }),
        Message::FwBeginRsp { have: 0 }
    ));
    // Send the first two blocks, then the meter reboots.
    for b in &plan.blocks[..2] {
        let mut wire = Vec::new();
        p.host.encode_block(b, &mut wire).unwrap();
        p.exchange(&wire);
    }
    let held = plan.blocks[1].end();
    p.meter.reboot();
    // The host notices on its next request (plaintext NO_CHANNEL), then re-opens and resumes.
    let (_, frame) = p.host.request(&Message::Status).unwrap();
    let ev = p.exchange(&frame);
    assert!(
        matches!(
            &ev[..],
            [Inbound::ChannelLost {
                code: ErrorCode::NoChannel,
                ..
            }]
        ),
        "{ev:?}"
    );
    p.open();
    match p.call(&Message::FwBegin {
        size: plan.size,
        sha256: plan.sha256,
        compression: 0,
    }) {
        Message::FwBeginRsp { have } => assert_eq!(have, held),
        other => panic!("{other:?}"),
    }
    let mut tx = FirmwareSender::new(plan.clone(), held, 4, 1000);
    let mut sent_blocks = 0;
    while !tx.is_complete() {
        let mut wire = Vec::new();
        while let Some(i) = tx.next_to_send() {
            let seq = p.host.encode_block(&plan.blocks[i], &mut wire).unwrap();
            tx.sent(i, seq, 0);
            sent_blocks += 1;
        }
        for ev in p.exchange(&wire) {
            if let Inbound::Message {
                reference,
                msg: Message::FwAck(a),
                ..
            } = ev
            {
                tx.on_ack(&a, reference);
            }
        }
    }
    assert_eq!(
        sent_blocks,
        plan.blocks.len() - 2,
        "nothing already held is resent"
    );
    let result = match p.call(&Message::FwEnd) {
        Message::FwResult(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(result.status, 0);
    // The host lost that answer and asks again: the same result, not FW_NOT_STARTED.
    assert_eq!(p.call(&Message::FwEnd), Message::FwResult(result));
    // A new transfer forgets it.
    assert!(matches!(
        p.call(&Message::FwBegin {
            size: plan.size,
            sha256: plan.sha256,
            compression: 0
        }),
        Message::FwBeginRsp { .. }
    ));
}

#[test]
fn hello_with_no_common_version_is_refused() {
    let mut p = Pair::new(20);
    let hello = line_protocol::msg::Hello {
        version_min: 2,
        version_max: 3,
        nonce: [0; 16],
        max_payload: 4096,
        window: 4,
        features: 0,
    };
    let mut frame = Vec::new();
    let m = Message::Hello(hello);
    let payload = m.to_bytes();
    let header = line_protocol::frame::Header {
        msg_type: 1,
        flags: 0,
        seq: 0,
        reference: 0,
        len: 0,
    };
    line_protocol::frame::encode(&header, &payload, &mut frame);
    let out = p.meter.receive(&frame, &mut p.app, &mut p.rng);
    assert!(out.events.iter().any(|e| matches!(
        e,
        MeterEvent::Handled {
            error: Some(ErrorCode::UnsupportedVersion),
            ..
        }
    )));
}

#[test]
fn stale_hello_ack_is_ignored() {
    let mut p = Pair::new(21);
    let h1 = p.host.hello([1; 16]);
    let out1 = p.meter.receive(&h1, &mut p.app, &mut p.rng);
    let h2 = p.host.hello([2; 16]);
    let out2 = p.meter.receive(&h2, &mut p.app, &mut p.rng);
    let ev = p.host.receive(&out1.bytes);
    assert!(matches!(&ev[..], [Inbound::Ignored { .. }]), "{ev:?}");
    let ev = p.host.receive(&out2.bytes);
    assert!(
        matches!(
            &ev[..],
            [Inbound::Message {
                msg: Message::HelloAck(_),
                ..
            }]
        ),
        "{ev:?}"
    );
    let _ = testkit::provisioning_root();
    let _ = HostConfig::default();
}

/// A pair whose host and meter both offer the X9.63 key transport.
fn x963_pair(seed: u64) -> Pair {
    let mut p = Pair::new(seed);
    p.host = HostSession::new(HostConfig {
        features: HostConfig::default().features | line_protocol::msg::FEATURE_KTK_X963,
        ..HostConfig::default()
    });
    p.app.info.features |= line_protocol::msg::FEATURE_KTK_X963;
    p
}

#[test]
fn both_sides_offering_x963_use_it_and_keys_unwrap_at_the_meter() {
    let mut p = x963_pair(21);
    p.open();
    assert_eq!(p.host.ktk_method(), Some(crypto::KtkMethod::X963));
    let ktk = p.host_ktk();
    let kek = [0x22u8; 32];
    let put = PutKey {
        key_id: KeyId::Kek,
        key_type: KeyType::Aes256,
        wrap: WrapAlg::AesKwp,
        kcv: kcv_aes(&kek).unwrap(),
        wrapped: wrap_key(&ktk, WrapAlg::AesKwp, &kek).unwrap(),
    };
    assert_eq!(p.call(&Message::PutKey(put)), Message::Ack);
    assert_eq!(p.app.secrets.get(&(KeyId::Kek as u8)), Some(&kek.to_vec()));
    // A key wrapped under the other derivation's key does not unwrap there.
    let mut q = x963_pair(21);
    q.open();
    let th = q.host.transcript_hash().unwrap();
    let meter_eph = crypto::parse_p256_point(&q.host.meter().unwrap().eph_pub).unwrap();
    let wrong = crypto::KtkMethod::AesEcb.derive(
        &crypto::ecdh_x(&q.kt_secret.to_nonzero_scalar(), &meter_eph),
        &th,
    );
    let put = PutKey {
        key_id: KeyId::Kek,
        key_type: KeyType::Aes256,
        wrap: WrapAlg::AesKwp,
        kcv: kcv_aes(&kek).unwrap(),
        wrapped: wrap_key(&wrong, WrapAlg::AesKwp, &kek).unwrap(),
    };
    assert_ne!(q.call(&Message::PutKey(put)), Message::Ack);
}

/// Someone on the line clears the host's X9.63 bit in HELLO to force the other derivation: the
/// meter's transcript then differs from the one the host signed, and the channel never opens.
#[test]
fn a_downgraded_key_transport_offer_fails_the_channel() {
    use line_protocol::frame::{self, Decoded, FrameDecoder};
    let mut p = x963_pair(22);
    let hello = p.host.hello([3; 16]);
    let mut dec = FrameDecoder::new(8192);
    let mut out = Vec::new();
    dec.push(&hello, &mut out);
    let Decoded::Frame(f) = &out[0] else {
        panic!("{out:?}")
    };
    let mut payload = f.payload.clone();
    // version_min, version_max, nonce[16], max_payload u16, window, features.
    assert_ne!(payload[21] & line_protocol::msg::FEATURE_KTK_X963, 0);
    payload[21] &= !line_protocol::msg::FEATURE_KTK_X963;
    let mut tampered = Vec::new();
    frame::encode(&f.header, &payload, &mut tampered);
    p.exchange(&tampered);
    let draft = draft(&mut p);
    let open = p.host.finish_open(station_sign(&draft.to_sign)).unwrap();
    let ev = p.exchange(&open);
    assert!(
        matches!(
            &ev[..],
            [Inbound::Message {
                msg: Message::Error {
                    code: ErrorCode::BadSignature,
                    ..
                },
                ..
            }]
        ),
        "{ev:?}"
    );
}

/// CHANNEL_READY lost on the line: the host sends the identical CHANNEL_OPEN again and the
/// meter answers with the identical CHANNEL_READY; a late copy of it is dropped by the host, not
/// taken for a replay. Once an encrypted frame has come, a CHANNEL_OPEN is a downgrade again.
#[test]
fn a_repeated_channel_open_gets_the_same_channel_ready() {
    let mut p = Pair::new(31);
    let hello = p.host.hello([5; 16]);
    p.exchange(&hello);
    let draft = draft(&mut p);
    let open = p.host.finish_open(station_sign(&draft.to_sign)).unwrap();
    // The first answer is lost.
    let first = p.meter.receive(&open, &mut p.app, &mut p.rng).bytes;
    assert!(!p.host.is_secure());
    // The same bytes again: the same answer.
    let second = p.meter.receive(&open, &mut p.app, &mut p.rng).bytes;
    assert_eq!(first, second);
    let ev = p.host.receive(&second);
    assert!(p.host.is_secure(), "{ev:?}");
    // The lost first answer arrives after all: dropped.
    let ev = p.host.receive(&first);
    assert!(matches!(&ev[..], [Inbound::Ignored { .. }]), "{ev:?}");
    assert!(p.host.is_secure());
    assert_eq!(
        p.call(&Message::Status).msg_type(),
        line_protocol::msg::ty::STATUS_RSP
    );
    // After an encrypted frame, the same CHANNEL_OPEN is a downgrade: the channel ends.
    let ev = p.exchange(&open);
    assert!(
        matches!(
            &ev[..],
            [Inbound::ChannelLost {
                code: ErrorCode::Unexpected,
                ..
            }]
        ),
        "{ev:?}"
    );
    assert!(!p.meter.is_secure());
}

/// The repeat is the same frame, `seq` included: the same CHANNEL_OPEN payload under another
/// `seq` is no repeat, and on the open channel it ends it.
#[test]
fn a_channel_open_with_the_same_payload_and_another_seq_is_no_repeat() {
    let mut p = Pair::new(32);
    let hello = p.host.hello([5; 16]);
    p.exchange(&hello);
    let open = p.channel_open();
    let first = p.meter.receive(&open, &mut p.app, &mut p.rng).bytes;
    assert!(!first.is_empty() && p.meter.is_secure());
    let mut dec = line_protocol::frame::FrameDecoder::new(8192);
    let mut frames = Vec::new();
    dec.push(&open, &mut frames);
    let [line_protocol::frame::Decoded::Frame(f)] = &frames[..] else {
        panic!("{frames:?}")
    };
    let mut other = Vec::new();
    let header = line_protocol::frame::Header {
        seq: f.header.seq + 1,
        ..f.header
    };
    line_protocol::frame::encode(&header, &f.payload, &mut other);
    let out = p.meter.receive(&other, &mut p.app, &mut p.rng);
    assert_ne!(out.bytes, first, "not answered as a repeat");
    assert!(!p.meter.is_secure(), "the channel ended");
}

/// The CHANNEL_OPEN draft with the pair's key-transport key and the test station chain (HELLO
/// already exchanged).
fn draft(p: &mut Pair) -> line_protocol::host::OpenDraft {
    let mut kt = [0u8; 65];
    kt.copy_from_slice(&p.kt_secret.public_key().to_sec1_bytes());
    p.host
        .prepare_open(&mut p.rng, kt, vec![STATION_DER.to_vec()])
        .unwrap()
}

/// A station chain that cannot fit the meter's negotiated payload is not sent (the meter would
/// drop the frame as oversized and every retry with it): the host says so before signing.
#[test]
fn a_chain_too_long_for_the_meter_is_refused_by_the_host() {
    let mut p = Pair::new(41);
    p.app.info.max_payload = 2048;
    let hello = p.host.hello([6; 16]);
    p.exchange(&hello);
    assert_eq!(p.host.negotiated().unwrap().max_payload, 2048);
    let mut kt = [0u8; 65];
    kt.copy_from_slice(&p.kt_secret.public_key().to_sec1_bytes());
    let e = p
        .host
        .prepare_open(&mut p.rng, kt, vec![STATION_DER.to_vec(), vec![0x30; 1700]])
        .unwrap_err();
    assert!(
        matches!(e, line_protocol::host::HostError::TooLarge(n) if n > 2048),
        "{e}"
    );
    // One certificate fits.
    p.open();
}
