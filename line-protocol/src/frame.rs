//! Frames: header, CRC-32C, COBS stuffing and the bounded stream decoder.
//!
//! A frame on the wire is `COBS(header ‖ payload ‖ crc32c) ‖ 0x00`. This module knows nothing of
//! message meaning or encryption: it turns bytes into [`Frame`]s and back, drops what is damaged,
//! and counts every reason it dropped something. Memory is bounded by the decoder's limit, never by
//! what the peer sends.

use crate::cobs;

/// Protocol version carried in every header.
pub const VERSION: u8 = 1;
/// Length of the frame header in bytes.
pub const HEADER_LEN: usize = 14;
/// Length of the CRC-32C trailer in bytes.
pub const CRC_LEN: usize = 4;
/// The frame delimiter.
pub const DELIMITER: u8 = 0x00;

/// Header flag: the payload is AES-GCM ciphertext followed by its 16-byte tag.
pub const FLAG_ENC: u8 = 0x01;
/// Header flag: this frame answers the request whose sequence number is in `ref`.
pub const FLAG_RSP: u8 = 0x02;
const FLAGS_KNOWN: u8 = FLAG_ENC | FLAG_RSP;

/// The 14-byte frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Message type code.
    pub msg_type: u8,
    /// [`FLAG_ENC`] and [`FLAG_RSP`].
    pub flags: u8,
    /// The sender's frame counter (also the AES-GCM nonce counter).
    pub seq: u32,
    /// For responses, the `seq` of the request answered; otherwise 0.
    pub reference: u32,
    /// Payload length in bytes.
    pub len: u16,
}

impl Header {
    /// Serialises the header.
    pub fn to_bytes(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0] = VERSION;
        b[1] = self.msg_type;
        b[2] = self.flags;
        b[3] = 0;
        b[4..8].copy_from_slice(&self.seq.to_le_bytes());
        b[8..12].copy_from_slice(&self.reference.to_le_bytes());
        b[12..14].copy_from_slice(&self.len.to_le_bytes());
        b
    }

    /// Is the payload encrypted?
    pub fn is_encrypted(&self) -> bool {
        self.flags & FLAG_ENC != 0
    }

    /// Is this frame a response?
    pub fn is_response(&self) -> bool {
        self.flags & FLAG_RSP != 0
    }
}

/// A decoded, CRC-checked frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header as received.
    pub header: Header,
    /// The payload (still encrypted if [`Header::is_encrypted`]).
    pub payload: Vec<u8>,
}

/// Why a delimited block was dropped. Each reason has its own counter in [`FrameStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// More bytes than the limit arrived before a delimiter; they were discarded.
    Oversized,
    /// The COBS stuffing is broken.
    Stuffing,
    /// Shorter than a header and a CRC.
    Truncated,
    /// The CRC-32C does not match.
    Crc,
    /// The version byte is not [`VERSION`].
    Version,
    /// The length field disagrees with the bytes present.
    Length,
    /// Reserved header bits or the reserved byte are not zero.
    Reserved,
}

impl FrameError {
    /// A short machine-readable name, as used in the test vectors.
    pub fn name(self) -> &'static str {
        match self {
            FrameError::Oversized => "oversized",
            FrameError::Stuffing => "stuffing",
            FrameError::Truncated => "truncated",
            FrameError::Crc => "crc",
            FrameError::Version => "version",
            FrameError::Length => "length",
            FrameError::Reserved => "reserved",
        }
    }
}

/// Counters of what the decoder saw, for health reporting.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames accepted.
    pub frames: u64,
    /// Bytes consumed (including delimiters and noise).
    pub bytes: u64,
    /// Blocks dropped for exceeding the limit.
    pub oversized: u64,
    /// Blocks dropped for broken stuffing.
    pub stuffing: u64,
    /// Blocks dropped as too short.
    pub truncated: u64,
    /// Blocks dropped for a CRC mismatch.
    pub crc: u64,
    /// Blocks dropped for an unknown version.
    pub version: u64,
    /// Blocks dropped for a wrong length field.
    pub length: u64,
    /// Blocks dropped for non-zero reserved bits.
    pub reserved: u64,
}

impl FrameStats {
    fn count(&mut self, e: FrameError) {
        let c = match e {
            FrameError::Oversized => &mut self.oversized,
            FrameError::Stuffing => &mut self.stuffing,
            FrameError::Truncated => &mut self.truncated,
            FrameError::Crc => &mut self.crc,
            FrameError::Version => &mut self.version,
            FrameError::Length => &mut self.length,
            FrameError::Reserved => &mut self.reserved,
        };
        *c += 1;
    }

    /// Total number of dropped blocks.
    pub fn dropped(&self) -> u64 {
        self.oversized
            + self.stuffing
            + self.truncated
            + self.crc
            + self.version
            + self.length
            + self.reserved
    }
}

/// CRC-32C (Castagnoli, reflected, init and xor-out `0xFFFFFFFF`; check value of `"123456789"`
/// is `0xE3069283`).
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Appends one complete wire frame (stuffed, with trailing delimiter) to `out`.
///
/// The caller guarantees `payload.len() <= u16::MAX`; the session layers enforce far smaller
/// negotiated limits before they get here.
pub fn encode(header: &Header, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= u16::MAX as usize);
    let mut h = *header;
    h.len = payload.len() as u16;
    let mut raw = Vec::with_capacity(HEADER_LEN + payload.len() + CRC_LEN);
    raw.extend_from_slice(&h.to_bytes());
    raw.extend_from_slice(payload);
    let crc = crc32c(&raw);
    raw.extend_from_slice(&crc.to_le_bytes());
    cobs::encode_into(&raw, out);
    out.push(DELIMITER);
}

/// Parses one unstuffed block (header ‖ payload ‖ crc).
pub fn parse(raw: &[u8]) -> Result<Frame, FrameError> {
    if raw.len() < HEADER_LEN + CRC_LEN {
        return Err(FrameError::Truncated);
    }
    let (body, crc_bytes) = raw.split_at(raw.len() - CRC_LEN);
    let mut crc = [0u8; 4];
    crc.copy_from_slice(crc_bytes);
    if crc32c(body) != u32::from_le_bytes(crc) {
        return Err(FrameError::Crc);
    }
    if body[0] != VERSION {
        return Err(FrameError::Version);
    }
    let flags = body[2];
    if flags & !FLAGS_KNOWN != 0 || body[3] != 0 {
        return Err(FrameError::Reserved);
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let header = Header {
        msg_type: body[1],
        flags,
        seq: le32(&body[4..8]),
        reference: le32(&body[8..12]),
        len: u16::from_le_bytes([body[12], body[13]]),
    };
    let payload = &body[HEADER_LEN..];
    if payload.len() != header.len as usize {
        return Err(FrameError::Length);
    }
    Ok(Frame {
        header,
        payload: payload.to_vec(),
    })
}

/// The stream decoder: feed it any bytes, get back whole frames.
///
/// The limit is on the unstuffed frame, `L = max_payload + 18` bytes (sections 2 and 3.1). The
/// decoder buffers at most `L + ceil(L / 254)` stuffed bytes of one block (no legal frame needs
/// more); a block longer than that is discarded up to the next delimiter without being buffered.
/// Since stuffing adds almost nothing to runs of zeros, a block within that budget may still
/// unstuff to more than `L` bytes: it is dropped too. Both are counted as
/// [`FrameError::Oversized`]; everything else that is wrong is dropped and counted as well, so
/// that noise on the line costs one frame, never the session.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// `L`: the largest unstuffed frame (header, payload and CRC).
    max_raw: usize,
    /// The stuffed bytes `L` may take.
    max_encoded: usize,
    overflow: bool,
    stats: FrameStats,
}

/// One result from [`FrameDecoder::push`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded {
    /// A good frame.
    Frame(Frame),
    /// A block that was dropped, and why.
    Dropped(FrameError),
}

impl FrameDecoder {
    /// A decoder that accepts payloads up to `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        let max_raw = HEADER_LEN + max_payload + CRC_LEN;
        FrameDecoder {
            buf: Vec::new(),
            scratch: Vec::new(),
            max_raw,
            max_encoded: cobs::max_encoded_len(max_raw),
            overflow: false,
            stats: FrameStats::default(),
        }
    }

    /// Changes the payload limit (after negotiation).
    pub fn set_max_payload(&mut self, max_payload: usize) {
        self.max_raw = HEADER_LEN + max_payload + CRC_LEN;
        self.max_encoded = cobs::max_encoded_len(self.max_raw);
    }

    /// Counters so far.
    pub fn stats(&self) -> FrameStats {
        self.stats
    }

    /// Forgets a partly received frame (after the link was re-opened).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.overflow = false;
    }

    /// Consumes `bytes`, appending every completed frame or drop to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<Decoded>) {
        self.stats.bytes += bytes.len() as u64;
        let mut rest = bytes;
        while !rest.is_empty() {
            match rest.iter().position(|&b| b == DELIMITER) {
                None => {
                    self.absorb(rest);
                    return;
                }
                Some(pos) => {
                    self.absorb(&rest[..pos]);
                    rest = &rest[pos + 1..];
                    if let Some(d) = self.finish_block() {
                        out.push(d);
                    }
                }
            }
        }
    }

    fn absorb(&mut self, part: &[u8]) {
        if self.overflow {
            return;
        }
        if self.buf.len() + part.len() > self.max_encoded {
            self.overflow = true;
            self.buf.clear();
            return;
        }
        self.buf.extend_from_slice(part);
    }

    fn finish_block(&mut self) -> Option<Decoded> {
        if self.overflow {
            self.overflow = false;
            self.stats.count(FrameError::Oversized);
            return Some(Decoded::Dropped(FrameError::Oversized));
        }
        if self.buf.is_empty() {
            // Back-to-back delimiters are idle fill, not an error.
            return None;
        }
        let result = match cobs::decode_into(&self.buf, &mut self.scratch) {
            Err(_) => Err(FrameError::Stuffing),
            // The limit is on the unstuffed frame; with the length check of `parse` this bounds
            // the payload by `max_payload`.
            Ok(()) if self.scratch.len() > self.max_raw => Err(FrameError::Oversized),
            Ok(()) => parse(&self.scratch),
        };
        self.buf.clear();
        match result {
            Ok(frame) => {
                self.stats.frames += 1;
                Some(Decoded::Frame(frame))
            }
            Err(e) => {
                self.stats.count(e);
                Some(Decoded::Dropped(e))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(msg_type: u8, seq: u32) -> Header {
        Header {
            msg_type,
            flags: 0,
            seq,
            reference: 0,
            len: 0,
        }
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn roundtrip_and_resync_after_noise() {
        let mut wire = vec![0x55, 0x13, 0x37]; // noise before the first delimiter
        wire.push(0);
        encode(&header(0x10, 7), b"hello", &mut wire);
        wire.extend_from_slice(&[0xde, 0xad]); // noise, then a good frame
        wire.push(0);
        encode(&header(0x11, 8), &[0u8; 300], &mut wire);

        let mut dec = FrameDecoder::new(1024);
        let mut out = Vec::new();
        // Feed byte by byte to exercise partial input.
        for b in &wire {
            dec.push(std::slice::from_ref(b), &mut out);
        }
        let frames: Vec<_> = out
            .iter()
            .filter_map(|d| match d {
                Decoded::Frame(f) => Some(f),
                _ => None,
            })
            .collect();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].header.seq, 7);
        assert_eq!(frames[0].payload, b"hello");
        assert_eq!(frames[1].payload.len(), 300);
        assert_eq!(dec.stats().dropped(), 2);
    }

    #[test]
    fn oversized_is_dropped_and_the_next_frame_survives() {
        let mut wire = Vec::new();
        encode(&header(0x22, 1), &[7u8; 2000], &mut wire);
        encode(&header(0x22, 2), &[7u8; 10], &mut wire);
        let mut dec = FrameDecoder::new(1000);
        let mut out = Vec::new();
        dec.push(&wire, &mut out);
        assert_eq!(out[0], Decoded::Dropped(FrameError::Oversized));
        assert!(matches!(&out[1], Decoded::Frame(f) if f.header.seq == 2));
        assert_eq!(dec.stats().oversized, 1);
    }

    #[test]
    fn every_single_bit_flip_is_caught() {
        let mut wire = Vec::new();
        encode(&header(0x22, 99), b"offset-addressed data", &mut wire);
        for bit in 0..(wire.len() - 1) * 8 {
            let mut w = wire.clone();
            w[bit / 8] ^= 1 << (bit % 8);
            let mut dec = FrameDecoder::new(1000);
            let mut out = Vec::new();
            dec.push(&w, &mut out);
            dec.push(&[0], &mut out);
            assert!(
                out.iter().all(|d| matches!(d, Decoded::Dropped(_))),
                "bit {bit} flip produced a frame: {out:?}"
            );
        }
    }
}
