//! The meter (bootloader) session: a sans-IO state machine over a [`MeterApp`].
//!
//! Phases: `Idle → HelloDone → Secure`. A HELLO restarts the session from any phase. The session
//! owns the protocol: framing, the channel handshake and keys, counters, lifecycle gating,
//! unwrapping of delivered keys and firmware block tracking. The [`MeterApp`] owns the device:
//! what is stored in flash, key generation, image verification and activation, sealing. A
//! C bootloader would be split the same way.

use p256::SecretKey;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::elliptic_curve::Generate;
use rand_core::CryptoRng;
use zeroize::Zeroizing;

use crate::chain::verify_chain;
use crate::crypto::{
    self, channel_signed_message, parse_p256_point, session_keys, transcript_hash,
};
use crate::endpoint::{Endpoint, Opened, Violation};
use crate::firmware::{FirmwareReceiver, deflate_block_limit};
use crate::frame::{Decoded, FrameError, FrameStats};
use crate::host::PROTOCOL_VERSION;
use crate::limits;
use crate::msg::{
    self, AnchorKind, CertSlot, ChannelOpen, Curve, ErrorCode, FwResult, Hello, HelloAck, Identity,
    KeyId, KeyType, Lifecycle, Message, PutKey, ResetMode, Status, ty,
};
use crate::rework::ReworkToken;

/// What a meter says about itself in HELLO_ACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterInfo {
    /// Hardware UID.
    pub uid: Vec<u8>,
    /// Model name.
    pub model: String,
    /// Bootloader version.
    pub bootloader: [u8; 3],
    /// Lifecycle as reported.
    pub lifecycle: Lifecycle,
    /// Largest payload accepted.
    pub max_payload: u16,
    /// Frames buffered.
    pub window: u8,
    /// Feature bits.
    pub features: u8,
    /// Largest decoded firmware block.
    pub max_block: u32,
    /// Firmware slot size.
    pub slot_size: u32,
}

/// A refusal by the application: an error code and a printable detail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// The code.
    pub code: ErrorCode,
    /// Detail, printable ASCII.
    pub detail: String,
}

impl Refusal {
    /// A refusal.
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        Refusal {
            code,
            detail: detail.into(),
        }
    }
}

/// The device behind the protocol.
pub trait MeterApp {
    /// Identity and capabilities for HELLO_ACK.
    fn info(&mut self) -> MeterInfo;
    /// The true lifecycle, used to gate requests.
    fn lifecycle(&mut self) -> Lifecycle;
    /// The provisioning root public key burned into the bootloader.
    fn provisioning_root(&self) -> p256::PublicKey;
    /// STATUS.
    fn status(&mut self) -> Status;
    /// IDENTITY.
    fn set_identity(&mut self, id: &Identity) -> Result<(), Refusal>;
    /// KEYGEN: generate a key pair for `slot` and return a PKCS#10 request signed with it.
    /// Within one channel session (`session` is its transcript hash) a repeated request for the
    /// same slot returns the same request.
    fn keygen(
        &mut self,
        slot: CertSlot,
        curve: Curve,
        session: &[u8; 32],
    ) -> Result<Vec<u8>, Refusal>;
    /// PUT_CERT.
    fn put_cert(&mut self, slot: CertSlot, der: &[u8]) -> Result<(), Refusal>;
    /// PUT_ANCHOR.
    fn put_anchor(&mut self, kind: AnchorKind, index: u8, der: &[u8]) -> Result<(), Refusal>;
    /// PUT_KEY, already unwrapped (and, for AES keys, checked against its KCV).
    fn put_key(
        &mut self,
        key_id: KeyId,
        key_type: KeyType,
        clear: &[u8],
        kcv: [u8; 3],
    ) -> Result<(), Refusal>;
    /// FW_BEGIN: prepare to receive; return how many leading bytes of this exact image are held.
    fn fw_begin(&mut self, size: u32, sha256: &[u8; 32]) -> Result<u32, Refusal>;
    /// Store a decoded block.
    fn fw_write(&mut self, offset: u32, data: &[u8]) -> Result<(), Refusal>;
    /// The contiguous prefix held grew to `have` bytes (persist it to resume after a reboot).
    fn fw_progress(&mut self, have: u32);
    /// FW_END with every byte held: hash, verify the signature, activate if good.
    fn fw_end(&mut self, size: u32, sha256: &[u8; 32]) -> FwResult;
    /// SEAL: disable the interfaces `disable` names (the provisioning bit is always set) and
    /// seal; returns the lifecycle and the interfaces now disabled. On a meter already sealed
    /// (a retry after a lost SEAL_RSP) it changes nothing: when every interface `disable` names
    /// is already disabled it answers as the first SEAL did, otherwise it refuses with `LOCKED`.
    fn seal(&mut self, disable: u16) -> Result<(Lifecycle, u16), Refusal>;
    /// ATTEST: the receipt bytes and its signature.
    fn attest(&mut self, nonce: &[u8; 16]) -> Result<(Vec<u8>, Vec<u8>), Refusal>;
    /// RESET (acknowledged before it takes effect).
    fn reset(&mut self, mode: ResetMode) -> Result<(), Refusal>;
    /// REWORK, after the session has checked the token's UID, channel and signature: refuse
    /// with `REWORK_REFUSED` unless `cert_sha256` is the SHA-256 of the signing (slot 1)
    /// certificate held (zeros when none is held); otherwise erase every key, certificate,
    /// identity, anchor and image, re-enable every interface and return to blank, keeping a
    /// record of the rework. A meter that cannot be reworked refuses with `UNKNOWN_TYPE`.
    fn rework(&mut self, cert_sha256: &[u8; 32]) -> Result<(), Refusal>;
}

/// What happened while processing input, for logs and for the emulator's fault hooks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MeterEvent {
    /// A request was handled (successfully or with an ERROR answer).
    Handled {
        /// Its type.
        msg_type: u8,
        /// The error answered, if any.
        error: Option<ErrorCode>,
    },
    /// The channel is up.
    ChannelUp {
        /// Session identifier (first 8 bytes of the transcript hash).
        session_id: [u8; 8],
    },
    /// A security violation; the channel was dropped.
    Violation(Violation),
    /// A damaged block on the line.
    Dropped(FrameError),
    /// RESET was acknowledged; the caller performs it.
    Reset(ResetMode),
    /// REWORK was accepted: the meter is blank again and the channel has ended.
    Reworked,
    /// A firmware block was stored.
    FwBlock {
        /// Its offset.
        offset: u32,
        /// Its decoded length.
        len: u32,
    },
}

/// Output of one call to [`MeterSession::receive`].
#[derive(Debug, Default)]
pub struct MeterOutput {
    /// Bytes to put on the line.
    pub bytes: Vec<u8>,
    /// What happened.
    pub events: Vec<MeterEvent>,
}

enum Phase {
    Idle,
    HelloDone {
        hello: Vec<u8>,
        ack: Vec<u8>,
        eph: SecretKey,
        compression: bool,
        ktk: crypto::KtkMethod,
        /// The largest `raw_len` of a DEFLATE block (section 4.12).
        max_deflate: u32,
    },
    Secure {
        th: [u8; 32],
        /// The station key that signed the transcript (it also signs rework tokens).
        station: p256::PublicKey,
        ktk: Zeroizing<[u8; 32]>,
        compression: bool,
        max_deflate: u32,
        slot_size: u32,
        /// Until the first encrypted host frame: the `seq` and payload of the CHANNEL_OPEN that
        /// opened the channel and the CHANNEL_READY frame it got, sent again, byte for byte, if
        /// the same CHANNEL_OPEN frame comes again (its answer was lost on the line).
        repeat: Option<(u32, Vec<u8>, Vec<u8>)>,
    },
}

impl std::fmt::Debug for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Idle => "Idle",
            Phase::HelloDone { .. } => "HelloDone",
            Phase::Secure { .. } => "Secure",
        })
    }
}

/// The meter session.
#[derive(Debug)]
pub struct MeterSession {
    ep: Endpoint,
    phase: Phase,
    fw: Option<FirmwareReceiver>,
    /// The answer to this channel's last FW_END, repeated if the host asks again (its first
    /// FW_RESULT may have been lost on the line).
    fw_result: Option<FwResult>,
    max_payload: usize,
}

impl MeterSession {
    /// A session for a meter that accepts payloads up to `max_payload` bytes.
    pub fn new(max_payload: u16) -> Self {
        let max_payload =
            usize::from(max_payload).clamp(limits::MIN_MAX_PAYLOAD, limits::MAX_PAYLOAD);
        MeterSession {
            ep: Endpoint::new(max_payload.max(limits::INITIAL_MAX_PAYLOAD)),
            phase: Phase::Idle,
            fw: None,
            fw_result: None,
            max_payload,
        }
    }

    /// Forgets the channel, as a reboot does.
    pub fn reboot(&mut self) {
        self.ep.clear_keys();
        self.ep.decoder.reset();
        self.phase = Phase::Idle;
        self.fw = None;
        self.fw_result = None;
    }

    /// Is the channel up?
    pub fn is_secure(&self) -> bool {
        matches!(self.phase, Phase::Secure { .. })
    }

    /// Line counters.
    pub fn frame_stats(&self) -> FrameStats {
        self.ep.decoder.stats()
    }

    /// Processes bytes from the line.
    pub fn receive(
        &mut self,
        input: &[u8],
        app: &mut dyn MeterApp,
        rng: &mut dyn CryptoRng,
    ) -> MeterOutput {
        let mut decoded = Vec::new();
        self.ep.decoder.push(input, &mut decoded);
        let mut out = MeterOutput::default();
        for d in decoded {
            match d {
                Decoded::Dropped(e) => out.events.push(MeterEvent::Dropped(e)),
                Decoded::Frame(f) => self.on_frame(f, app, rng, &mut out),
            }
        }
        out
    }

    fn reply(&mut self, msg: &Message, reference: u32, out: &mut MeterOutput) {
        let secure = self.is_secure();
        self.ep.encode(msg, Some(reference), secure, &mut out.bytes);
    }

    fn reply_plain_error(
        &mut self,
        code: ErrorCode,
        detail: &str,
        reference: u32,
        out: &mut MeterOutput,
    ) {
        let msg = Message::Error {
            code,
            detail: detail.into(),
        };
        self.ep.encode(&msg, Some(reference), false, &mut out.bytes);
    }

    fn drop_channel(&mut self) {
        self.ep.clear_keys();
        self.phase = Phase::Idle;
        self.fw = None;
        self.fw_result = None;
    }

    fn on_frame(
        &mut self,
        f: crate::frame::Frame,
        app: &mut dyn MeterApp,
        rng: &mut dyn CryptoRng,
        out: &mut MeterOutput,
    ) {
        let seq = f.header.seq;
        let msg_type = f.header.msg_type;
        let (payload, encrypted) = match self.ep.open(f) {
            Opened::Plain(_, p) => (p, false),
            Opened::Decrypted(_, p) => (p, true),
            Opened::NoKey(_) => {
                self.reply_plain_error(ErrorCode::NoChannel, "no secure channel", seq, out);
                out.events.push(MeterEvent::Handled {
                    msg_type,
                    error: Some(ErrorCode::NoChannel),
                });
                return;
            }
            Opened::Violation(v) => {
                let code = match v {
                    Violation::Replay { .. } => ErrorCode::Replay,
                    _ => ErrorCode::DecryptFailed,
                };
                self.drop_channel();
                self.reply_plain_error(code, "channel closed", seq, out);
                out.events.push(MeterEvent::Violation(v));
                return;
            }
        };
        if let Phase::Secure { repeat, .. } = &mut self.phase {
            if encrypted {
                // The host has the channel: a CHANNEL_OPEN from now on is no repeat.
                *repeat = None;
            } else if msg_type == ty::CHANNEL_OPEN
                && let Some((open_seq, open, ready)) = repeat.as_ref()
                && *open_seq == seq
                && *open == payload
            {
                out.bytes.extend_from_slice(ready);
                out.events.push(MeterEvent::Handled {
                    msg_type,
                    error: None,
                });
                return;
            }
        }
        if self.is_secure() && !encrypted && msg_type != ty::HELLO {
            let v = Violation::Downgrade { msg_type };
            self.drop_channel();
            self.reply_plain_error(
                ErrorCode::Unexpected,
                "plaintext on secure channel",
                seq,
                out,
            );
            out.events.push(MeterEvent::Violation(v));
            return;
        }
        // Step 2, the type, before the payload is decoded: an unknown type, or one the meter
        // sends itself.
        // REWORK is a type only for a meter that offers it (feature bit 4).
        let offered = msg_type != ty::REWORK || app.info().features & msg::FEATURE_REWORK != 0;
        let refused_type = if !ty::is_known(msg_type) || !offered {
            Some((
                ErrorCode::UnknownType,
                format!("unknown message type 0x{msg_type:02x}"),
            ))
        } else if ty::sent_by_meter(msg_type) {
            let code = if self.is_secure() {
                ErrorCode::Unexpected
            } else {
                ErrorCode::NoChannel
            };
            Some((code, "not a host request".to_string()))
        } else {
            None
        };
        if let Some((code, detail)) = refused_type {
            self.reply(&Message::Error { code, detail }, seq, out);
            out.events.push(MeterEvent::Handled {
                msg_type,
                error: Some(code),
            });
            return;
        }
        // Step 3, the payload.
        let msg = match Message::decode(msg_type, &payload) {
            Ok(m) => m,
            Err(e) => {
                if msg_type == ty::HELLO {
                    // Every HELLO restarts the session, even one that does not decode: the
                    // channel ends and the ERROR is plaintext (section 4.1).
                    self.drop_channel();
                    self.ep.restart_tx();
                }
                let detail = e.to_string();
                self.reply(
                    &Message::Error {
                        code: e.code(),
                        detail,
                    },
                    seq,
                    out,
                );
                out.events.push(MeterEvent::Handled {
                    msg_type,
                    error: Some(e.code()),
                });
                return;
            }
        };
        let result = match msg {
            Message::Hello(h) => self.on_hello(h, payload, seq, app, rng, out),
            Message::ChannelOpen(o) => {
                let start = out.bytes.len();
                let r = self.on_open(o, seq, app, out);
                if r.is_ok()
                    && let Phase::Secure { repeat, .. } = &mut self.phase
                {
                    *repeat = Some((seq, payload.clone(), out.bytes[start..].to_vec()));
                }
                r
            }
            other => {
                if self.is_secure() {
                    self.on_secure(other, seq, app, out)
                } else {
                    Err(Refusal::new(
                        ErrorCode::NoChannel,
                        "secure channel required",
                    ))
                }
            }
        };
        let error = match result {
            Ok(()) => None,
            Err(r) => {
                let code = r.code;
                self.reply(
                    &Message::Error {
                        code,
                        detail: r.detail,
                    },
                    seq,
                    out,
                );
                Some(code)
            }
        };
        out.events.push(MeterEvent::Handled { msg_type, error });
    }

    fn on_hello(
        &mut self,
        h: Hello,
        payload: Vec<u8>,
        seq: u32,
        app: &mut dyn MeterApp,
        rng: &mut dyn CryptoRng,
        out: &mut MeterOutput,
    ) -> Result<(), Refusal> {
        self.drop_channel();
        self.ep.restart_tx();
        if !(h.version_min..=h.version_max).contains(&PROTOCOL_VERSION) {
            return Err(Refusal::new(
                ErrorCode::UnsupportedVersion,
                "meter speaks version 1",
            ));
        }
        let info = app.info();
        let eph = SecretKey::generate_from_rng(rng);
        let mut eph_pub = [0u8; 65];
        eph_pub.copy_from_slice(&eph.public_key().to_sec1_bytes());
        let mut nonce = [0u8; 16];
        rng.fill_bytes(&mut nonce);
        let max_payload = info.max_payload.min(self.max_payload as u16);
        let ack = HelloAck {
            version: PROTOCOL_VERSION,
            lifecycle: info.lifecycle,
            uid: info.uid,
            model: info.model,
            bootloader: info.bootloader,
            max_payload,
            window: info.window,
            features: info.features,
            max_block: info.max_block,
            slot_size: info.slot_size,
            nonce,
            eph_pub,
        };
        let msg = Message::HelloAck(ack);
        let ack_bytes = msg.to_bytes();
        self.ep.encode(&msg, Some(seq), false, &mut out.bytes);
        self.ep.decoder.set_max_payload(usize::from(max_payload));
        self.phase = Phase::HelloDone {
            hello: payload,
            ack: ack_bytes,
            eph,
            compression: h.features & info.features & msg::FEATURE_DEFLATE != 0,
            ktk: crypto::KtkMethod::negotiate(h.features, info.features),
            max_deflate: deflate_block_limit(info.max_block, usize::from(max_payload)),
        };
        Ok(())
    }

    fn on_open(
        &mut self,
        o: ChannelOpen,
        seq: u32,
        app: &mut dyn MeterApp,
        out: &mut MeterOutput,
    ) -> Result<(), Refusal> {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let Phase::HelloDone {
            hello,
            ack,
            eph,
            compression,
            ktk: ktk_method,
            max_deflate,
        } = phase
        else {
            self.drop_channel();
            return Err(Refusal::new(
                ErrorCode::Unexpected,
                "CHANNEL_OPEN without HELLO",
            ));
        };
        let leaf = verify_chain(&o.chain, &app.provisioning_root())
            .map_err(|e| Refusal::new(ErrorCode::BadCertChain, e.to_string()))?;
        let th = transcript_hash(&hello, &ack, &o.body_bytes());
        let sig = Signature::from_der(&o.signature)
            .map_err(|_| Refusal::new(ErrorCode::BadSignature, "signature is not DER ECDSA"))?;
        VerifyingKey::from(&leaf)
            .verify(&channel_signed_message(&th), &sig)
            .map_err(|_| Refusal::new(ErrorCode::BadSignature, "transcript signature invalid"))?;
        let host_eph = parse_p256_point(&o.eph_pub)
            .ok_or_else(|| Refusal::new(ErrorCode::Malformed, "invalid host ephemeral key"))?;
        let kt_pub = parse_p256_point(&o.kt_pub)
            .ok_or_else(|| Refusal::new(ErrorCode::Malformed, "invalid key-transport key"))?;
        let scalar = eph.to_nonzero_scalar();
        let keys = session_keys(&crypto::ecdh_x(&scalar, &host_eph), &th);
        let ktk = crypto::meter_ktk_with(ktk_method, &scalar, &kt_pub, &th);
        self.ep.set_keys(&keys.meter_to_host, &keys.host_to_meter);
        let slot_size = app.info().slot_size;
        self.phase = Phase::Secure {
            th,
            station: leaf,
            ktk,
            compression,
            max_deflate,
            slot_size,
            repeat: None,
        };
        let mut session_id = [0u8; 8];
        session_id.copy_from_slice(&th[..8]);
        self.reply(&Message::ChannelReady { session_id }, seq, out);
        out.events.push(MeterEvent::ChannelUp { session_id });
        Ok(())
    }

    fn on_secure(
        &mut self,
        msg: Message,
        seq: u32,
        app: &mut dyn MeterApp,
        out: &mut MeterOutput,
    ) -> Result<(), Refusal> {
        let Phase::Secure {
            th,
            station,
            ktk,
            compression,
            max_deflate,
            slot_size,
            ..
        } = &self.phase
        else {
            return Err(Refusal::new(
                ErrorCode::NoChannel,
                "secure channel required",
            ));
        };
        let (th, station, compression, max_deflate, slot_size) =
            (*th, *station, *compression, *max_deflate, *slot_size);
        let sealed = app.lifecycle() == Lifecycle::Sealed;
        // SEAL too: a repeated SEAL (its answer was lost) answers as the first did.
        let allowed_when_sealed = matches!(
            msg,
            Message::Status
                | Message::Seal { .. }
                | Message::Attest { .. }
                | Message::Reset {
                    mode: ResetMode::Reboot | ResetMode::Release
                }
                | Message::Rework { .. }
        );
        if sealed && !allowed_when_sealed {
            return Err(Refusal::new(ErrorCode::Locked, "meter is sealed"));
        }
        let response = match msg {
            Message::Status => Message::StatusRsp(app.status()),
            Message::Identity(id) => {
                app.set_identity(&id)?;
                Message::Ack
            }
            Message::KeyGen { slot, curve } => {
                if slot == CertSlot::DeviceCa {
                    return Err(Refusal::new(
                        ErrorCode::Malformed,
                        "no key pair for the CA slot",
                    ));
                }
                Message::KeyGenRsp {
                    slot,
                    csr: app.keygen(slot, curve, &th)?,
                }
            }
            Message::PutCert { slot, der } => {
                app.put_cert(slot, &der)?;
                Message::Ack
            }
            Message::PutAnchor { kind, index, der } => {
                app.put_anchor(kind, index, &der)?;
                Message::Ack
            }
            Message::PutKey(k) => {
                let clear = unwrap_checked(ktk, &k)?;
                app.put_key(k.key_id, k.key_type, &clear, k.kcv)?;
                Message::Ack
            }
            Message::FwBegin {
                size,
                sha256,
                compression: want,
            } => {
                if size == 0 || size > slot_size {
                    return Err(Refusal::new(
                        ErrorCode::FwTooLarge,
                        "image does not fit the slot",
                    ));
                }
                if want > 1 {
                    return Err(Refusal::new(
                        ErrorCode::Malformed,
                        "undefined compression value",
                    ));
                }
                if want == 1 && !compression {
                    return Err(Refusal::new(
                        ErrorCode::Unexpected,
                        "compression not negotiated",
                    ));
                }
                let have = app.fw_begin(size, &sha256)?.min(size);
                self.fw_result = None;
                self.fw = Some(FirmwareReceiver::new(
                    size,
                    sha256,
                    want == 1,
                    max_deflate,
                    have,
                ));
                Message::FwBeginRsp { have }
            }
            Message::FwData(d) => {
                let fw = self
                    .fw
                    .as_mut()
                    .ok_or_else(|| Refusal::new(ErrorCode::FwNotStarted, "no FW_BEGIN"))?;
                let before = fw.have();
                if let Some(data) = fw.decode(&d).map_err(|c| Refusal::new(c, "bad block"))? {
                    app.fw_write(d.offset, &data)?;
                    if fw.insert(d.offset, d.raw_len) {
                        out.events.push(MeterEvent::FwBlock {
                            offset: d.offset,
                            len: d.raw_len,
                        });
                    }
                }
                if fw.have() != before {
                    app.fw_progress(fw.have());
                }
                Message::FwAck(fw.ack())
            }
            Message::FwEnd => {
                let Some(fw) = self.fw.take() else {
                    return match self.fw_result {
                        Some(r) => {
                            self.reply(&Message::FwResult(r), seq, out);
                            Ok(())
                        }
                        None => Err(Refusal::new(ErrorCode::FwNotStarted, "no FW_BEGIN")),
                    };
                };
                if !fw.complete() {
                    let status = ErrorCode::FwIncomplete.code();
                    self.fw = Some(fw);
                    Message::FwResult(FwResult {
                        status,
                        sha256: [0; 32],
                        version: [0; 8],
                    })
                } else {
                    let r = app.fw_end(fw.size, &fw.sha256);
                    self.fw_result = Some(r);
                    Message::FwResult(r)
                }
            }
            Message::Seal { disable } => {
                if disable & !msg::iface::ALL != 0 {
                    return Err(Refusal::new(ErrorCode::Malformed, "unknown interface bits"));
                }
                let (lifecycle, disabled) = app.seal(disable | msg::iface::PROVISIONING)?;
                Message::SealRsp {
                    lifecycle,
                    disabled,
                }
            }
            Message::Attest { nonce } => {
                let (receipt, signature) = app.attest(&nonce)?;
                Message::AttestRsp { receipt, signature }
            }
            Message::Reset { mode } => {
                app.reset(mode)?;
                self.reply(&Message::Ack, seq, out);
                self.drop_channel();
                out.events.push(MeterEvent::Reset(mode));
                return Ok(());
            }
            Message::Rework { token, signature } => {
                let token = check_rework(&token, &signature, &station, &th, &app.info().uid)?;
                app.rework(&token.cert_sha256)?;
                self.reply(&Message::Ack, seq, out);
                self.drop_channel();
                out.events.push(MeterEvent::Reworked);
                return Ok(());
            }
            _ => return Err(Refusal::new(ErrorCode::Unexpected, "not a host request")),
        };
        self.reply(&response, seq, out);
        Ok(())
    }
}

/// The session's checks of a rework token: well formed, signed by the channel's station key,
/// for this meter and for this channel.
fn check_rework(
    token: &[u8],
    signature: &[u8],
    station: &p256::PublicKey,
    th: &[u8; 32],
    uid: &[u8],
) -> Result<ReworkToken, Refusal> {
    let refused = |why: &str| Refusal::new(ErrorCode::ReworkRefused, why);
    let t = ReworkToken::decode(token)
        .ok_or_else(|| Refusal::new(ErrorCode::Malformed, "rework token malformed"))?;
    let sig = Signature::from_der(signature).map_err(|_| refused("signature is not DER ECDSA"))?;
    VerifyingKey::from(station)
        .verify(token, &sig)
        .map_err(|_| refused("token signature invalid"))?;
    if t.uid != uid {
        return Err(refused("token is for another meter"));
    }
    if t.session != *th {
        return Err(refused("token is for another channel"));
    }
    Ok(t)
}

/// PUT_KEY's checks that need the channel (section 4.11, steps 1 to 4 for AES keys; the
/// application checks an EC key's value, its check value and its slot).
fn unwrap_checked(ktk: &Zeroizing<[u8; 32]>, k: &PutKey) -> Result<Zeroizing<Vec<u8>>, Refusal> {
    if !k.key_id.takes(k.key_type) {
        return Err(Refusal::new(
            ErrorCode::Malformed,
            "key type does not fit the key id",
        ));
    }
    let clear = crypto::unwrap_key(ktk, k.wrap, &k.wrapped)
        .ok_or_else(|| Refusal::new(ErrorCode::UnwrapFailed, "integrity check failed"))?;
    if let Some(len) = crypto::clear_key_len(k.key_type) {
        if clear.len() != len {
            return Err(Refusal::new(
                ErrorCode::UnwrapFailed,
                "key length does not match its type",
            ));
        }
        if crypto::kcv_aes(&clear) != Some(k.kcv) {
            return Err(Refusal::new(
                ErrorCode::KcvMismatch,
                "key check value mismatch",
            ));
        }
    }
    Ok(clear)
}
