//! The host (station) session: a sans-IO state machine.
//!
//! Phases: `Idle → HelloSent → HelloDone → OpenSent → Secure`, and `Failed` after a security
//! violation. The caller drives it: [`HostSession::hello`] gives the bytes of a HELLO,
//! [`HostSession::receive`] turns the meter's bytes into [`Inbound`] events, the two-step
//! [`HostSession::prepare_open`] / [`HostSession::finish_open`] lets the transcript be signed by
//! whatever holds the station key (an HSM, asynchronously), and [`HostSession::request`] encodes
//! requests once the channel is up. It keeps no timers; the driver owns the deadlines.

use p256::elliptic_curve::Generate;
use p256::{PublicKey, SecretKey};
use rand_core::CryptoRng;

use crate::crypto::{
    self, KtkMethod, channel_signed_message, parse_p256_point, session_keys, transcript_hash,
};
use crate::endpoint::{Endpoint, Opened, Violation};
use crate::firmware::Block;
use crate::frame::{Decoded, FrameError, FrameStats};
use crate::limits;
use crate::msg::{self, ChannelOpen, DecodeError, ErrorCode, Hello, HelloAck, Message, ty};

/// Version of the protocol this implementation speaks.
pub const PROTOCOL_VERSION: u8 = 1;

/// The host's offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostConfig {
    /// Largest payload the host accepts and proposes.
    pub max_payload: u16,
    /// Frames the host keeps in flight at most.
    pub window: u8,
    /// Feature bits offered.
    pub features: u8,
}

impl Default for HostConfig {
    fn default() -> Self {
        HostConfig {
            max_payload: 16384,
            window: 16,
            features: msg::FEATURE_DEFLATE,
        }
    }
}

/// What both sides agreed at HELLO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    /// Protocol version.
    pub version: u8,
    /// Largest payload either side sends.
    pub max_payload: usize,
    /// Frames in flight.
    pub window: usize,
    /// DEFLATE firmware blocks allowed.
    pub compression: bool,
    /// Largest decoded firmware block.
    pub max_block: u32,
}

/// Something that came in from the meter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    /// A message; `reference` is the request it answers (0 if none).
    Message {
        /// Its seq.
        seq: u32,
        /// The request answered.
        reference: u32,
        /// The message.
        msg: Message,
    },
    /// The meter answered with a plaintext ERROR while the channel was up: it no longer has the
    /// channel (it rebooted, or it dropped the channel after an error of its own).
    ChannelLost {
        /// The request answered.
        reference: u32,
        /// Why.
        code: ErrorCode,
        /// Meter's detail.
        detail: String,
    },
    /// A damaged block on the line (counted; the sender's timers recover).
    Dropped(FrameError),
    /// A frame whose payload did not decode.
    Undecodable {
        /// Its type.
        msg_type: u8,
        /// Why.
        error: DecodeError,
    },
    /// A frame that makes no sense now, ignored.
    Ignored {
        /// Its type.
        msg_type: u8,
        /// Why.
        reason: &'static str,
    },
    /// The session is over; raise an alarm.
    Violation(Violation),
}

/// Misuse of the session by its caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// The operation needs another phase.
    #[error("operation not allowed in session phase {0}")]
    WrongPhase(&'static str),
    /// The meter's ephemeral key is not a valid P-256 point.
    #[error("meter sent an invalid ephemeral public key")]
    BadMeterKey,
    /// The message exceeds the negotiated payload size.
    #[error("message of {0} bytes exceeds the negotiated payload limit")]
    TooLarge(usize),
    /// The meter offered no protocol version we speak.
    #[error("meter speaks protocol version {0}, station speaks {PROTOCOL_VERSION}")]
    Version(u8),
}

#[derive(Debug)]
enum Phase {
    Idle,
    HelloSent {
        hello: Vec<u8>,
        seq: u32,
    },
    HelloDone {
        hello: Vec<u8>,
        ack: Vec<u8>,
        meter_eph: PublicKey,
    },
    Drafted {
        th: [u8; 32],
        draft: ChannelOpen,
        keys: crypto::SessionKeys,
    },
    OpenSent {
        th: [u8; 32],
        keys: crypto::SessionKeys,
    },
    Secure {
        th: [u8; 32],
    },
    Failed(Violation),
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::HelloSent { .. } => "hello-sent",
            Phase::HelloDone { .. } => "hello-done",
            Phase::Drafted { .. } => "open-drafted",
            Phase::OpenSent { .. } => "open-sent",
            Phase::Secure { .. } => "secure",
            Phase::Failed(_) => "failed",
        }
    }
}

/// A CHANNEL_OPEN waiting for its signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenDraft {
    /// The transcript hash.
    pub th: [u8; 32],
    /// The byte string to sign with ECDSA P-256/SHA-256.
    pub to_sign: Vec<u8>,
}

/// The host session.
#[derive(Debug)]
pub struct HostSession {
    cfg: HostConfig,
    ep: Endpoint,
    phase: Phase,
    negotiated: Option<Negotiated>,
    meter: Option<HelloAck>,
    /// The CHANNEL_READY frame accepted on this channel (counter and ciphertext): a copy of it
    /// arriving late — the meter's answer to a repeated CHANNEL_OPEN — is dropped, not taken
    /// for a replay.
    ready: Option<(u32, Vec<u8>)>,
}

impl HostSession {
    /// A session with the host's offer.
    pub fn new(cfg: HostConfig) -> Self {
        HostSession {
            cfg,
            ep: Endpoint::new(usize::from(cfg.max_payload).max(limits::INITIAL_MAX_PAYLOAD)),
            phase: Phase::Idle,
            negotiated: None,
            meter: None,
            ready: None,
        }
    }

    /// Current phase name, for logs.
    pub fn phase(&self) -> &'static str {
        self.phase.name()
    }

    /// Is the channel up?
    pub fn is_secure(&self) -> bool {
        matches!(self.phase, Phase::Secure { .. })
    }

    /// The violation that ended the session, if one did.
    pub fn violation(&self) -> Option<Violation> {
        match self.phase {
            Phase::Failed(v) => Some(v),
            _ => None,
        }
    }

    /// The transcript hash once CHANNEL_OPEN was drafted.
    pub fn transcript_hash(&self) -> Option<[u8; 32]> {
        match &self.phase {
            Phase::Drafted { th, .. } | Phase::OpenSent { th, .. } | Phase::Secure { th } => {
                Some(*th)
            }
            _ => None,
        }
    }

    /// The meter's HELLO_ACK.
    pub fn meter(&self) -> Option<&HelloAck> {
        self.meter.as_ref()
    }

    /// The key-transport derivation this host and the meter agreed on (after HELLO_ACK).
    pub fn ktk_method(&self) -> Option<KtkMethod> {
        self.meter
            .as_ref()
            .map(|a| KtkMethod::negotiate(self.cfg.features, a.features))
    }

    /// What was negotiated.
    pub fn negotiated(&self) -> Option<Negotiated> {
        self.negotiated
    }

    /// Line counters.
    pub fn frame_stats(&self) -> FrameStats {
        self.ep.decoder.stats()
    }

    /// Starts (or restarts) a session: the bytes of a HELLO frame.
    pub fn hello(&mut self, nonce: [u8; 16]) -> Vec<u8> {
        self.ep.clear_keys();
        self.ep.decoder.reset();
        self.ep.decoder.set_max_payload(limits::INITIAL_MAX_PAYLOAD);
        self.negotiated = None;
        self.meter = None;
        self.ready = None;
        let hello = Message::Hello(Hello {
            version_min: PROTOCOL_VERSION,
            version_max: PROTOCOL_VERSION,
            nonce,
            max_payload: self.cfg.max_payload,
            window: self.cfg.window,
            features: self.cfg.features,
        });
        let mut out = Vec::new();
        let seq = self.ep.encode(&hello, None, false, &mut out);
        self.phase = Phase::HelloSent {
            hello: hello.to_bytes(),
            seq,
        };
        out
    }

    /// Feeds bytes from the line; returns what they meant, in order.
    pub fn receive(&mut self, bytes: &[u8]) -> Vec<Inbound> {
        let mut decoded = Vec::new();
        self.ep.decoder.push(bytes, &mut decoded);
        let mut out = Vec::with_capacity(decoded.len());
        for d in decoded {
            if matches!(self.phase, Phase::Failed(_)) {
                break;
            }
            match d {
                Decoded::Dropped(e) => out.push(Inbound::Dropped(e)),
                Decoded::Frame(f) => {
                    if let Some(ev) = self.on_frame(f) {
                        out.push(ev);
                    }
                }
            }
        }
        out
    }

    fn fail(&mut self, v: Violation) -> Option<Inbound> {
        self.ep.clear_keys();
        self.phase = Phase::Failed(v);
        Some(Inbound::Violation(v))
    }

    fn on_frame(&mut self, f: crate::frame::Frame) -> Option<Inbound> {
        if f.header.is_encrypted() && matches!(self.phase, Phase::OpenSent { .. }) {
            return self.try_ready(&f);
        }
        if f.header.msg_type == ty::CHANNEL_READY
            && matches!(self.phase, Phase::Secure { .. })
            && self
                .ready
                .as_ref()
                .is_some_and(|(seq, p)| *seq == f.header.seq && *p == f.payload)
        {
            return Some(Inbound::Ignored {
                msg_type: f.header.msg_type,
                reason: "a second copy of CHANNEL_READY (the CHANNEL_OPEN was sent again)",
            });
        }
        let (h, payload, encrypted) = match self.ep.open(f) {
            Opened::Violation(v) => return self.fail(v),
            Opened::NoKey(h) => {
                return Some(Inbound::Ignored {
                    msg_type: h.msg_type,
                    reason: "encrypted frame without a channel",
                });
            }
            Opened::Plain(h, p) => (h, p, false),
            Opened::Decrypted(h, p) => (h, p, true),
        };
        let msg = match Message::decode(h.msg_type, &payload) {
            Ok(m) => m,
            Err(error) => {
                return Some(Inbound::Undecodable {
                    msg_type: h.msg_type,
                    error,
                });
            }
        };
        let secure = matches!(self.phase, Phase::Secure { .. });
        if secure && !encrypted {
            return match msg {
                Message::Error { code, detail } => {
                    self.ep.clear_keys();
                    self.phase = Phase::Idle;
                    Some(Inbound::ChannelLost {
                        reference: h.reference,
                        code,
                        detail,
                    })
                }
                _ => self.fail(Violation::Downgrade {
                    msg_type: h.msg_type,
                }),
            };
        }
        if let Message::HelloAck(ack) = &msg {
            return self.on_hello_ack(h.reference, ack.clone(), payload, h.seq);
        }
        if !secure && !matches!(msg, Message::Error { .. }) {
            return Some(Inbound::Ignored {
                msg_type: h.msg_type,
                reason: "not expected before the channel is up",
            });
        }
        Some(Inbound::Message {
            seq: h.seq,
            reference: h.reference,
            msg,
        })
    }

    fn on_hello_ack(
        &mut self,
        reference: u32,
        ack: HelloAck,
        payload: Vec<u8>,
        seq: u32,
    ) -> Option<Inbound> {
        let Phase::HelloSent {
            hello,
            seq: hello_seq,
        } = &self.phase
        else {
            return Some(Inbound::Ignored {
                msg_type: ty::HELLO_ACK,
                reason: "no HELLO outstanding",
            });
        };
        if reference != *hello_seq {
            return Some(Inbound::Ignored {
                msg_type: ty::HELLO_ACK,
                reason: "answers an earlier HELLO",
            });
        }
        let Some(meter_eph) = parse_p256_point(&ack.eph_pub) else {
            return Some(Inbound::Undecodable {
                msg_type: ty::HELLO_ACK,
                error: DecodeError::BadValue("eph_pub"),
            });
        };
        let max_payload = usize::from(ack.max_payload.min(self.cfg.max_payload))
            .clamp(limits::MIN_MAX_PAYLOAD, limits::MAX_PAYLOAD);
        self.negotiated = Some(Negotiated {
            version: ack.version,
            max_payload,
            window: usize::from(ack.window.min(self.cfg.window)).clamp(1, limits::MAX_WINDOW),
            compression: ack.features & self.cfg.features & msg::FEATURE_DEFLATE != 0,
            max_block: ack.max_block.min(limits::MAX_BLOCK),
        });
        self.ep.decoder.set_max_payload(max_payload);
        self.phase = Phase::HelloDone {
            hello: hello.clone(),
            ack: payload,
            meter_eph,
        };
        self.meter = Some(ack.clone());
        Some(Inbound::Message {
            seq,
            reference,
            msg: Message::HelloAck(ack),
        })
    }

    /// Drafts CHANNEL_OPEN: a fresh ephemeral key, the HSM's key-transport public key and the
    /// station chain (leaf first). Returns what to sign.
    pub fn prepare_open(
        &mut self,
        rng: &mut (impl CryptoRng + ?Sized),
        kt_pub: [u8; 65],
        chain: Vec<Vec<u8>>,
    ) -> Result<OpenDraft, HostError> {
        let Phase::HelloDone {
            hello,
            ack,
            meter_eph,
        } = &self.phase
        else {
            return Err(HostError::WrongPhase(self.phase.name()));
        };
        if let Some(m) = &self.meter
            && m.version != PROTOCOL_VERSION
        {
            return Err(HostError::Version(m.version));
        }
        let eph = SecretKey::generate_from_rng(rng);
        let mut eph_pub = [0u8; 65];
        eph_pub.copy_from_slice(&eph.public_key().to_sec1_bytes());
        let draft = ChannelOpen {
            eph_pub,
            kt_pub,
            chain,
            signature: Vec::new(),
        };
        let body = draft.body_bytes();
        // The whole CHANNEL_OPEN (body, signature length byte, a DER signature of at most 112
        // bytes) must fit the negotiated payload, or the meter drops it as oversized (spec 3.1).
        let largest = body.len() + 1 + limits::MAX_SIGNATURE;
        if let Some(n) = self.negotiated
            && largest > n.max_payload
        {
            return Err(HostError::TooLarge(largest));
        }
        let th = transcript_hash(hello, ack, &body);
        let z1 = crypto::ecdh_x(&eph.to_nonzero_scalar(), meter_eph);
        let keys = session_keys(&z1, &th);
        let to_sign = channel_signed_message(&th);
        self.phase = Phase::Drafted { th, draft, keys };
        Ok(OpenDraft { th, to_sign })
    }

    /// Completes CHANNEL_OPEN with the DER signature; returns the frame bytes.
    pub fn finish_open(&mut self, signature: Vec<u8>) -> Result<Vec<u8>, HostError> {
        let phase = std::mem::replace(&mut self.phase, Phase::Idle);
        let Phase::Drafted {
            th,
            mut draft,
            keys,
        } = phase
        else {
            let name = phase.name();
            self.phase = phase;
            return Err(HostError::WrongPhase(name));
        };
        draft.signature = signature;
        let msg = Message::ChannelOpen(draft);
        let mut out = Vec::new();
        self.ep.encode(&msg, None, false, &mut out);
        self.phase = Phase::OpenSent { th, keys };
        Ok(out)
    }

    /// The meter's CHANNEL_READY, the first frame under the new keys: keys are installed only once
    /// the meter proves it derived the same ones, so that a refused CHANNEL_OPEN leaves the
    /// plaintext path open for the meter's ERROR.
    fn try_ready(&mut self, f: &crate::frame::Frame) -> Option<Inbound> {
        let Phase::OpenSent { th, keys } = &self.phase else {
            return None;
        };
        let th = *th;
        let aead = crypto::Aead::new(&keys.meter_to_host);
        let plain = aead.open(f.header.seq, &f.header.to_bytes(), &f.payload);
        let Some(plain) = plain else {
            return self.fail(Violation::AuthFailed { seq: f.header.seq });
        };
        match Message::decode(f.header.msg_type, &plain) {
            Ok(Message::ChannelReady { session_id }) if session_id == th[..8] => {
                let (send, recv) = (*keys.host_to_meter, *keys.meter_to_host);
                self.ep.set_keys(&send, &recv);
                // CHANNEL_READY's counter is the first one accepted on this channel.
                self.ep.accept_seq(f.header.seq);
                self.ready = Some((f.header.seq, f.payload.clone()));
                self.phase = Phase::Secure { th };
                Some(Inbound::Message {
                    seq: f.header.seq,
                    reference: f.header.reference,
                    msg: Message::ChannelReady { session_id },
                })
            }
            Ok(Message::ChannelReady { .. }) => self.fail(Violation::SessionMismatch),
            _ => Some(Inbound::Ignored {
                msg_type: f.header.msg_type,
                reason: "expected CHANNEL_READY",
            }),
        }
    }

    /// Encodes a request on the secure channel; returns its seq and the frame bytes.
    pub fn request(&mut self, msg: &Message) -> Result<(u32, Vec<u8>), HostError> {
        let mut payload = Vec::with_capacity(64);
        msg.encode(&mut payload);
        self.request_raw(msg.msg_type(), payload)
    }

    /// Encodes any payload as a request of type `msg_type` on the secure channel, whether or not
    /// it decodes: for conformance tests of meter implementations and for fuzzing.
    pub fn request_raw(
        &mut self,
        msg_type: u8,
        payload: Vec<u8>,
    ) -> Result<(u32, Vec<u8>), HostError> {
        if !self.is_secure() {
            return Err(HostError::WrongPhase(self.phase.name()));
        }
        self.check_size(payload.len())?;
        let mut out = Vec::with_capacity(payload.len() + 64);
        let seq = self
            .ep
            .encode_payload(msg_type, payload, None, true, &mut out);
        Ok((seq, out))
    }

    /// Encodes one FW_DATA frame for `block` into `out`; returns its seq.
    pub fn encode_block(&mut self, block: &Block, out: &mut Vec<u8>) -> Result<u32, HostError> {
        if !self.is_secure() {
            return Err(HostError::WrongPhase(self.phase.name()));
        }
        let mut payload =
            Vec::with_capacity(crate::firmware::FW_DATA_OVERHEAD + block.data.len() + 16);
        payload.extend_from_slice(&block.offset.to_le_bytes());
        payload.extend_from_slice(&block.raw_len.to_le_bytes());
        payload.push(block.encoding as u8);
        payload.extend_from_slice(&block.data);
        self.check_size(payload.len())?;
        Ok(self
            .ep
            .encode_payload(ty::FW_DATA, payload, None, true, out))
    }

    fn check_size(&self, plain_len: usize) -> Result<(), HostError> {
        let limit = self
            .negotiated
            .map(|n| n.max_payload)
            .unwrap_or(limits::INITIAL_MAX_PAYLOAD);
        if plain_len + crypto::TAG_LEN > limit {
            return Err(HostError::TooLarge(plain_len));
        }
        Ok(())
    }

    /// Sequence number the next frame will carry.
    pub fn next_seq(&self) -> u32 {
        self.ep.next_seq()
    }
}
