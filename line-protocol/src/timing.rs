//! Timeouts that scale with the link and the work asked of the meter.
//!
//! A request's deadline is the wire time of the request and the largest response it can get, at
//! the link's baud rate (10 wire bits per byte), twice over, plus the link's turnaround latency in
//! each direction, a fixed margin, and the processing time the specification allows the meter for
//! that message. Nothing here reads a clock.

use crate::cobs::max_encoded_len;
use crate::crypto::TAG_LEN;
use crate::frame::{CRC_LEN, HEADER_LEN};
use crate::msg::ty;

/// What the host knows about a link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinkTiming {
    /// Baud rate (8N1: 10 wire bits per byte).
    pub baud: u32,
    /// One-way latency allowance in milliseconds (adapter latency timers, device servers).
    pub latency_ms: u32,
}

/// Fixed margin added to every deadline.
pub const MARGIN_MS: u64 = 200;

/// The processing time a meter is allowed for a request of type `msg_type` about `size` bytes
/// (the image size for FW_END; otherwise unused).
pub fn processing_allowance_ms(msg_type: u8, size: u32) -> u64 {
    match msg_type {
        ty::HELLO => 1_000,
        ty::CHANNEL_OPEN => 3_000,
        ty::KEYGEN => 10_000,
        ty::ATTEST => 3_000,
        ty::SEAL => 2_000,
        // A factory wipe commits its erase before the ACK.
        ty::RESET => 2_000,
        // A signature check, then the erase committed.
        ty::REWORK => 3_000,
        ty::FW_BEGIN => 2_000,
        // Hashing and one signature check: 1 s plus 1 ms per KiB.
        ty::FW_END => 1_000 + u64::from(size) / 1024,
        _ => 500,
    }
}

/// Bytes a payload of `payload` bytes occupies on the wire, encrypted or not.
pub fn wire_bytes(payload: usize, encrypted: bool) -> usize {
    let raw = HEADER_LEN + payload + if encrypted { TAG_LEN } else { 0 } + CRC_LEN;
    max_encoded_len(raw) + 1
}

impl LinkTiming {
    /// Milliseconds to clock `bytes` onto the wire, rounded up.
    pub fn wire_ms(&self, bytes: usize) -> u64 {
        let bits = bytes as u64 * 10 * 1000;
        bits.div_ceil(u64::from(self.baud.max(1)))
    }

    /// The deadline for a request: `2·(wire(req) + wire(rsp)) + 2·latency + margin + allowance`.
    pub fn request_timeout_ms(
        &self,
        msg_type: u8,
        req_payload: usize,
        max_rsp_payload: usize,
        size: u32,
    ) -> u64 {
        let wire = self.wire_ms(wire_bytes(req_payload, true) + wire_bytes(max_rsp_payload, true));
        2 * wire
            + 2 * u64::from(self.latency_ms)
            + MARGIN_MS
            + processing_allowance_ms(msg_type, size)
    }

    /// Retransmission timeout for firmware blocks with `window` frames of `payload` bytes in flight:
    /// the whole window's wire time plus the same latency, margin and per-frame allowance.
    pub fn rto_ms(&self, window: usize, payload: usize) -> u64 {
        let wire = self.wire_ms(window * wire_bytes(payload, true));
        2 * wire
            + 2 * u64::from(self.latency_ms)
            + MARGIN_MS
            + processing_allowance_ms(ty::FW_DATA, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_scale_with_size_and_speed() {
        let slow = LinkTiming {
            baud: 9600,
            latency_ms: 4,
        };
        let fast = LinkTiming {
            baud: 921_600,
            latency_ms: 4,
        };
        assert_eq!(slow.wire_ms(960), 1000);
        assert!(
            slow.request_timeout_ms(ty::PUT_CERT, 1000, 0, 0)
                > fast.request_timeout_ms(ty::PUT_CERT, 1000, 0, 0)
        );
        assert!(
            fast.request_timeout_ms(ty::PUT_CERT, 2000, 0, 0)
                > fast.request_timeout_ms(ty::PUT_CERT, 100, 0, 0)
        );
        assert!(
            fast.request_timeout_ms(ty::FW_END, 0, 64, 1 << 20)
                > fast.request_timeout_ms(ty::FW_END, 0, 64, 1 << 10)
        );
    }
}
