//! What both ends of a session share: sequence numbers, the stream decoder, and sealing and
//! opening frames once the channel keys exist.

use crate::crypto::{Aead, TAG_LEN};
use crate::frame::{self, FLAG_ENC, FLAG_RSP, Frame, FrameDecoder, Header};
use crate::msg::Message;

/// A security violation: the session is over and an alarm is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// An authentic frame whose counter is not above the last one accepted: replayed or reordered.
    Replay {
        /// Its counter.
        seq: u32,
        /// The last counter accepted.
        last: u32,
    },
    /// An encrypted frame failed authentication although its CRC was good: tampering.
    AuthFailed {
        /// Its counter.
        seq: u32,
    },
    /// A plaintext frame other than ERROR arrived on an established channel.
    Downgrade {
        /// Its type.
        msg_type: u8,
    },
    /// CHANNEL_READY named another session.
    SessionMismatch,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Violation::Replay { seq, last } => {
                write!(
                    f,
                    "replayed or reordered frame (counter {seq} after {last})"
                )
            }
            Violation::AuthFailed { seq } => {
                write!(f, "frame {seq} failed authentication (tampered)")
            }
            Violation::Downgrade { msg_type } => write!(
                f,
                "plaintext {} frame on the secure channel",
                crate::msg::type_name(*msg_type)
            ),
            Violation::SessionMismatch => write!(f, "channel confirmation for another session"),
        }
    }
}

/// What opening a frame gave.
#[derive(Debug)]
pub(crate) enum Opened {
    /// A plaintext frame.
    Plain(Header, Vec<u8>),
    /// An authentic, fresh encrypted frame, decrypted.
    Decrypted(Header, Vec<u8>),
    /// An encrypted frame with no key to open it.
    NoKey(Header),
    /// A violation.
    Violation(Violation),
}

#[derive(Debug)]
pub(crate) struct Endpoint {
    tx_seq: u32,
    rx_last: Option<u32>,
    pub(crate) decoder: FrameDecoder,
    send: Option<Aead>,
    recv: Option<Aead>,
}

impl Endpoint {
    pub(crate) fn new(max_payload: usize) -> Self {
        Endpoint {
            tx_seq: 0,
            rx_last: None,
            decoder: FrameDecoder::new(max_payload),
            send: None,
            recv: None,
        }
    }

    /// Drops the keys and the receive counter (a new session is starting).
    pub(crate) fn clear_keys(&mut self) {
        self.send = None;
        self.recv = None;
        self.rx_last = None;
    }

    pub(crate) fn restart_tx(&mut self) {
        self.tx_seq = 0;
    }

    pub(crate) fn set_keys(&mut self, send: &[u8; 32], recv: &[u8; 32]) {
        self.send = Some(Aead::new(send));
        self.recv = Some(Aead::new(recv));
        self.rx_last = None;
    }

    /// Seq of the next frame sent.
    pub(crate) fn next_seq(&self) -> u32 {
        self.tx_seq
    }

    /// Encodes `msg` as one frame appended to `out`; encrypted when a send key is set and
    /// `encrypt` holds. `reference` makes it a response. Returns the frame's seq.
    pub(crate) fn encode(
        &mut self,
        msg: &Message,
        reference: Option<u32>,
        encrypt: bool,
        out: &mut Vec<u8>,
    ) -> u32 {
        let mut payload = Vec::with_capacity(64);
        msg.encode(&mut payload);
        self.encode_payload(msg.msg_type(), payload, reference, encrypt, out)
    }

    pub(crate) fn encode_payload(
        &mut self,
        msg_type: u8,
        mut payload: Vec<u8>,
        reference: Option<u32>,
        encrypt: bool,
        out: &mut Vec<u8>,
    ) -> u32 {
        let seq = self.tx_seq;
        self.tx_seq = self.tx_seq.wrapping_add(1);
        let aead = if encrypt { self.send.as_ref() } else { None };
        let mut flags = 0;
        if reference.is_some() {
            flags |= FLAG_RSP;
        }
        if aead.is_some() {
            flags |= FLAG_ENC;
        }
        let header = Header {
            msg_type,
            flags,
            seq,
            reference: reference.unwrap_or(0),
            len: (payload.len() + if aead.is_some() { TAG_LEN } else { 0 }) as u16,
        };
        if let Some(aead) = aead {
            aead.seal(seq, &header.to_bytes(), &mut payload);
        }
        frame::encode(&header, &payload, out);
        seq
    }

    /// Records `seq` as the last accepted counter.
    pub(crate) fn accept_seq(&mut self, seq: u32) {
        self.rx_last = Some(seq);
    }

    /// Authenticates, decrypts and checks the counter of an encrypted frame.
    pub(crate) fn open(&mut self, f: Frame) -> Opened {
        let h = f.header;
        if !h.is_encrypted() {
            return Opened::Plain(h, f.payload);
        }
        let Some(recv) = self.recv.as_ref() else {
            return Opened::NoKey(h);
        };
        let Some(plain) = recv.open(h.seq, &h.to_bytes(), &f.payload) else {
            return Opened::Violation(Violation::AuthFailed { seq: h.seq });
        };
        if let Some(last) = self.rx_last
            && h.seq <= last
        {
            return Opened::Violation(Violation::Replay { seq: h.seq, last });
        }
        self.rx_last = Some(h.seq);
        Opened::Decrypted(h, plain)
    }
}
