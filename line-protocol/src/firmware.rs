//! Firmware transfer: the host's block plan and sliding window, the meter's range tracking.
//!
//! The image is cut into offset-addressed blocks. A block is sent DEFLATE-compressed when that
//! makes it smaller, and then grows (doubling, up to the meter's `max_block`) for as long as its
//! compressed form still fits one frame; otherwise it is sent raw. Data frames are idempotent: a
//! block received twice is acknowledged twice and written once.
//!
//! The sender keeps up to `window` frames in flight. Every FW_ACK names the data frame that
//! triggered it; since a serial line never reorders, any block sent in an earlier frame and still
//! missing from that acknowledgement was lost and is resent at once. A retransmission timer
//! covers a lost tail. No clock is read here: callers pass `now` in milliseconds.

use std::sync::Arc;

use crate::crypto::{TAG_LEN, sha256};
use crate::limits;
use crate::msg::{Encoding, ErrorCode, FwAck, FwData};

/// Bytes of FW_DATA payload before the block data (offset, raw_len, encoding).
pub const FW_DATA_OVERHEAD: usize = 9;

/// Decoded bytes of the first block of a plan; each next block may be a quarter longer, up to
/// what a frame and the meter allow.
pub const RAMP_FIRST: usize = 1024;

/// One block of the plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Block {
    /// Offset in the image.
    pub offset: u32,
    /// Decoded length.
    pub raw_len: u32,
    /// Encoding of `data`.
    pub encoding: Encoding,
    /// Encoded bytes.
    pub data: Vec<u8>,
}

impl Block {
    /// One past the last byte covered.
    pub fn end(&self) -> u32 {
        self.offset + self.raw_len
    }
}

/// Parameters of a plan, from the negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PlanParams {
    /// Negotiated maximum payload.
    pub max_payload: usize,
    /// The meter's largest decoded block.
    pub max_block: u32,
    /// Compression agreed by both sides.
    pub compress: bool,
}

impl PlanParams {
    /// Room for block data in one encrypted FW_DATA frame.
    pub fn max_data(&self) -> usize {
        self.max_payload.saturating_sub(FW_DATA_OVERHEAD + TAG_LEN)
    }
}

/// The image cut into blocks, computed once per image and negotiation and shared.
#[derive(Debug, Clone)]
pub struct TransferPlan {
    /// Image size.
    pub size: u32,
    /// SHA-256 of the image.
    pub sha256: [u8; 32],
    /// Blocks in ascending offset order, covering the image exactly.
    pub blocks: Vec<Block>,
    /// The parameters it was made for.
    pub params: PlanParams,
    /// The image itself, kept so that the plan can be cut again with smaller blocks.
    pub image: Arc<Vec<u8>>,
}

impl TransferPlan {
    /// Cuts `image` into blocks for `params`.
    pub fn new(image: &[u8], params: PlanParams) -> Arc<TransferPlan> {
        Self::cut(Arc::new(image.to_vec()), params)
    }

    /// The same image cut for frames of at most `max_payload` bytes (a noisy line loses fewer
    /// bytes to each damaged frame when frames are short).
    pub fn replan(&self, max_payload: usize) -> Arc<TransferPlan> {
        let params = PlanParams {
            max_payload,
            ..self.params
        };
        Self::cut(Arc::clone(&self.image), params)
    }

    fn cut(image_arc: Arc<Vec<u8>>, params: PlanParams) -> Arc<TransferPlan> {
        let image: &[u8] = &image_arc;
        let max_data = params.max_data().max(1);
        let max_block = (params.max_block as usize).max(max_data);
        let n = image.len();
        let mut blocks = Vec::new();
        let mut off = 0usize;
        // The first blocks grow from RAMP_FIRST by a quarter each: the meter starts writing its
        // flash after one short frame instead of a full one, and while the blocks grow each
        // one is on the wire before the flash has written the one before, so a meter whose
        // flash is up to 1.25 times slower than the wire is kept busy from the start (section
        // 6.5). On a meter with fast flash the ramp costs a dozen frame headers.
        let mut ramp = RAMP_FIRST;
        while off < n {
            let max_data = max_data.min(ramp);
            let max_block = max_block.min(ramp);
            let raw_take = max_data.min(n - off);
            let mut best: Option<(usize, Vec<u8>)> = None;
            if params.compress {
                let mut len = raw_take;
                loop {
                    let comp = miniz_oxide::deflate::compress_to_vec(&image[off..off + len], 6);
                    // Worth it only if it saves at least 1/32 of the frame.
                    if comp.len() <= max_data && comp.len() + len / 32 < len {
                        best = Some((len, comp));
                    } else {
                        break;
                    }
                    let next = (len * 2).min(max_block).min(n - off);
                    if next == len {
                        break;
                    }
                    len = next;
                }
            }
            let block = match best {
                Some((len, comp)) => Block {
                    offset: off as u32,
                    raw_len: len as u32,
                    encoding: Encoding::Deflate,
                    data: comp,
                },
                None => Block {
                    offset: off as u32,
                    raw_len: raw_take as u32,
                    encoding: Encoding::Raw,
                    data: image[off..off + raw_take].to_vec(),
                },
            };
            off += block.raw_len as usize;
            blocks.push(block);
            ramp = ramp.saturating_add(ramp / 4);
        }
        Arc::new(TransferPlan {
            size: n as u32,
            sha256: sha256(image),
            blocks,
            params,
            image: Arc::clone(&image_arc),
        })
    }

    /// Bytes of block data the plan puts on the wire (before framing).
    pub fn data_bytes(&self) -> usize {
        self.blocks.iter().map(|b| b.data.len()).sum()
    }

    /// Index of the first block not entirely below `have`.
    pub fn first_block_at(&self, have: u32) -> usize {
        self.blocks.partition_point(|b| b.end() <= have)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BlockState {
    Pending,
    InFlight { seq: u32, sent_at: u64 },
    Acked,
}

/// Counters of one transfer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Data frames sent, first transmissions and retransmissions.
    pub frames_sent: u64,
    /// Retransmissions after a selective acknowledgement showed a gap.
    pub fast_retransmits: u64,
    /// Retransmissions after the timer expired.
    pub timeout_retransmits: u64,
}

/// Host side of the window.
#[derive(Debug)]
pub struct FirmwareSender {
    plan: Arc<TransferPlan>,
    state: Vec<BlockState>,
    window: usize,
    in_flight: usize,
    rto_ms: u64,
    acked_bytes: u64,
    stats: SenderStats,
}

impl FirmwareSender {
    /// A sender resuming at `have` (0 for a fresh transfer).
    pub fn new(plan: Arc<TransferPlan>, have: u32, window: usize, rto_ms: u64) -> Self {
        let mut state = vec![BlockState::Pending; plan.blocks.len()];
        let mut acked_bytes = 0u64;
        for (i, b) in plan.blocks.iter().enumerate() {
            if b.end() <= have {
                state[i] = BlockState::Acked;
                acked_bytes += u64::from(b.raw_len);
            }
        }
        FirmwareSender {
            plan,
            state,
            window: window.max(1),
            in_flight: 0,
            rto_ms,
            acked_bytes,
            stats: SenderStats::default(),
        }
    }

    /// The plan.
    pub fn plan(&self) -> &Arc<TransferPlan> {
        &self.plan
    }

    /// The next block to put on the wire, if the window has room.
    pub fn next_to_send(&self) -> Option<usize> {
        if self.in_flight >= self.window {
            return None;
        }
        self.state.iter().position(|s| *s == BlockState::Pending)
    }

    /// Records that block `i` went out in frame `seq` at `now`.
    pub fn sent(&mut self, i: usize, seq: u32, now: u64) {
        if self.state[i] == BlockState::Pending {
            self.in_flight += 1;
        }
        self.state[i] = BlockState::InFlight { seq, sent_at: now };
        self.stats.frames_sent += 1;
    }

    /// Applies an acknowledgement triggered by data frame `ack_ref`.
    pub fn on_ack(&mut self, ack: &FwAck, ack_ref: u32) {
        // Past the last reported range we cannot tell received from lost when the list was full.
        let horizon = if ack.ranges.len() >= limits::MAX_SACK_RANGES {
            ack.ranges.last().map(|r| r.1).unwrap_or(ack.have)
        } else {
            u32::MAX
        };
        for (i, b) in self.plan.blocks.iter().enumerate() {
            let held = b.end() <= ack.have
                || ack
                    .ranges
                    .iter()
                    .any(|&(s, e)| s <= b.offset && b.end() <= e);
            match self.state[i] {
                BlockState::Acked => {}
                st if held => {
                    if matches!(st, BlockState::InFlight { .. }) {
                        self.in_flight -= 1;
                    }
                    self.state[i] = BlockState::Acked;
                    self.acked_bytes += u64::from(b.raw_len);
                }
                BlockState::InFlight { seq, .. } if seq < ack_ref && b.end() <= horizon => {
                    self.state[i] = BlockState::Pending;
                    self.in_flight -= 1;
                    self.stats.fast_retransmits += 1;
                }
                _ => {}
            }
        }
    }

    /// Returns blocks whose timer expired to the pending set; true if any did.
    pub fn on_timer(&mut self, now: u64) -> bool {
        let mut any = false;
        for s in self.state.iter_mut() {
            if let BlockState::InFlight { sent_at, .. } = *s
                && sent_at + self.rto_ms <= now
            {
                *s = BlockState::Pending;
                self.in_flight -= 1;
                self.stats.timeout_retransmits += 1;
                any = true;
            }
        }
        any
    }

    /// When the earliest retransmission timer fires.
    pub fn next_deadline(&self) -> Option<u64> {
        self.state
            .iter()
            .filter_map(|s| match s {
                BlockState::InFlight { sent_at, .. } => Some(sent_at + self.rto_ms),
                _ => None,
            })
            .min()
    }

    /// Every block acknowledged?
    pub fn is_complete(&self) -> bool {
        self.state.iter().all(|s| *s == BlockState::Acked)
    }

    /// Every byte below this offset is acknowledged.
    pub fn contiguous_acked(&self) -> u32 {
        let first_open = self.state.iter().position(|s| *s != BlockState::Acked);
        match first_open {
            Some(i) => self.plan.blocks[i].offset,
            None => self.plan.size,
        }
    }

    /// Decoded bytes acknowledged so far.
    pub fn acked_bytes(&self) -> u64 {
        self.acked_bytes
    }

    /// Counters.
    pub fn stats(&self) -> SenderStats {
        self.stats
    }
}

/// The largest `raw_len` a DEFLATE block may announce (section 4.12): max(`max_block`, A − 25),
/// A being the `max_payload` the meter advertised in HELLO_ACK (25: the 9 bytes before FW_DATA's
/// `data` and the tag). The host never cuts a block smaller than one frame's data room, so a
/// DEFLATE block may decode to that much even when `max_block` is smaller. Raw blocks have no
/// such limit: they are bounded by their frame.
pub fn deflate_block_limit(max_block: u32, advertised_max_payload: usize) -> u32 {
    let room = advertised_max_payload.saturating_sub(FW_DATA_OVERHEAD + TAG_LEN);
    max_block.max(u32::try_from(room).unwrap_or(u32::MAX))
}

/// Meter side: which byte ranges of the image are held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirmwareReceiver {
    /// Announced size.
    pub size: u32,
    /// Announced SHA-256.
    pub sha256: [u8; 32],
    /// Compression allowed by FW_BEGIN.
    pub compression: bool,
    max_deflate: u32,
    ranges: Vec<(u32, u32)>,
}

/// Most disjoint ranges a receiver tracks; blocks that would create more are dropped unacknowledged
/// (the host resends them).
pub const MAX_TRACKED_RANGES: usize = 64;

impl FirmwareReceiver {
    /// A receiver for an image of `size` bytes holding `[0, have)` already. `max_deflate` is the
    /// largest `raw_len` of a DEFLATE block, [`deflate_block_limit`].
    pub fn new(
        size: u32,
        sha256: [u8; 32],
        compression: bool,
        max_deflate: u32,
        have: u32,
    ) -> Self {
        let ranges = if have > 0 {
            vec![(0, have.min(size))]
        } else {
            Vec::new()
        };
        FirmwareReceiver {
            size,
            sha256,
            compression,
            max_deflate,
            ranges,
        }
    }

    /// Contiguous bytes held from offset 0.
    pub fn have(&self) -> u32 {
        match self.ranges.first() {
            Some(&(0, e)) => e,
            _ => 0,
        }
    }

    /// Is every byte held?
    pub fn complete(&self) -> bool {
        self.have() == self.size
    }

    fn holds(&self, s: u32, e: u32) -> bool {
        self.ranges.iter().any(|&(a, b)| a <= s && e <= b)
    }

    /// Checks and decodes a block, in the order of section 4.12. `Ok(None)`: already held
    /// (acknowledge only).
    pub fn decode(&self, d: &FwData) -> Result<Option<Vec<u8>>, ErrorCode> {
        let end = d
            .offset
            .checked_add(d.raw_len)
            .filter(|&e| e <= self.size && d.raw_len > 0)
            .ok_or(ErrorCode::FwOutOfRange)?;
        // Only DEFLATE blocks have a decoded-size limit; a raw block is bounded by its frame.
        if d.encoding == Encoding::Deflate && d.raw_len > self.max_deflate {
            return Err(ErrorCode::TooLarge);
        }
        if self.holds(d.offset, end) {
            return Ok(None);
        }
        match d.encoding {
            Encoding::Raw => {
                if d.data.len() != d.raw_len as usize {
                    return Err(ErrorCode::Malformed);
                }
                Ok(Some(d.data.clone()))
            }
            Encoding::Deflate => {
                if !self.compression {
                    return Err(ErrorCode::Unexpected);
                }
                let out =
                    miniz_oxide::inflate::decompress_to_vec_with_limit(&d.data, d.raw_len as usize)
                        .map_err(|_| ErrorCode::FwDecompress)?;
                if out.len() != d.raw_len as usize {
                    return Err(ErrorCode::FwDecompress);
                }
                Ok(Some(out))
            }
        }
    }

    /// Records `[offset, offset + len)` as held. Returns false (and records nothing) if that
    /// would exceed [`MAX_TRACKED_RANGES`].
    pub fn insert(&mut self, offset: u32, len: u32) -> bool {
        let (s, e) = (offset, offset + len);
        let mut merged = (s, e);
        let mut out = Vec::with_capacity(self.ranges.len() + 1);
        let mut placed = false;
        for &(a, b) in &self.ranges {
            if b < merged.0 {
                out.push((a, b));
            } else if merged.1 < a {
                if !placed {
                    out.push(merged);
                    placed = true;
                }
                out.push((a, b));
            } else {
                merged = (merged.0.min(a), merged.1.max(b));
            }
        }
        if !placed {
            out.push(merged);
        }
        if out.len() > MAX_TRACKED_RANGES {
            return false;
        }
        self.ranges = out;
        true
    }

    /// The acknowledgement to send now.
    pub fn ack(&self) -> FwAck {
        let have = self.have();
        let ranges = self
            .ranges
            .iter()
            .filter(|r| r.0 > have)
            .take(limits::MAX_SACK_RANGES)
            .copied()
            .collect();
        FwAck { have, ranges }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(compress: bool) -> PlanParams {
        PlanParams {
            max_payload: 1024,
            max_block: 8192,
            compress,
        }
    }

    fn reassemble(plan: &TransferPlan) -> Vec<u8> {
        let rx = FirmwareReceiver::new(plan.size, plan.sha256, true, 8192, 0);
        let mut out = vec![0u8; plan.size as usize];
        for b in &plan.blocks {
            let d = FwData {
                offset: b.offset,
                raw_len: b.raw_len,
                encoding: b.encoding,
                data: b.data.clone(),
            };
            let bytes = rx.decode(&d).unwrap().unwrap();
            out[b.offset as usize..b.end() as usize].copy_from_slice(&bytes);
        }
        out
    }

    #[test]
    fn plan_covers_the_image_exactly_and_compresses_padding() {
        let mut image: Vec<u8> = (0..20_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        image.extend(std::iter::repeat_n(0xFF, 30_000));
        for compress in [false, true] {
            let plan = TransferPlan::new(&image, params(compress));
            let mut off = 0;
            for b in &plan.blocks {
                assert_eq!(b.offset, off);
                assert!(b.data.len() <= params(compress).max_data());
                off = b.end();
            }
            assert_eq!(off as usize, image.len());
            assert_eq!(reassemble(&plan), image);
            if compress {
                assert!(
                    plan.data_bytes() < 22_000,
                    "padding must compress: {}",
                    plan.data_bytes()
                );
            } else {
                assert_eq!(plan.data_bytes(), image.len());
            }
        }
    }

    #[test]
    fn the_first_blocks_grow_from_one_kib_by_a_quarter() {
        let image: Vec<u8> = (0..200_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let p = PlanParams {
            max_payload: 16384,
            max_block: 65536,
            compress: false,
        };
        let plan = TransferPlan::new(&image, p);
        let lens: Vec<u32> = plan.blocks.iter().map(|b| b.raw_len).collect();
        assert_eq!(lens[0], RAMP_FIRST as u32);
        for w in lens.windows(2).take_while(|w| w[1] < p.max_data() as u32) {
            assert_eq!(w[1], w[0] + w[0] / 4, "{lens:?}");
        }
        let full = lens.iter().filter(|&&l| l == p.max_data() as u32).count();
        assert!(
            full >= lens.len() - 14,
            "the ramp ends at full frames: {lens:?}"
        );
    }

    #[test]
    fn sender_detects_gap_from_sack_and_resends() {
        let image = vec![0x5Au8; 10 * 999];
        let plan = TransferPlan::new(&image, params(false));
        assert_eq!(plan.blocks.len(), 10);
        let mut tx = FirmwareSender::new(plan.clone(), 0, 4, 1000);
        let mut rx = FirmwareReceiver::new(plan.size, plan.sha256, false, 8192, 0);
        let mut seq = 0;
        let mut sent = Vec::new();
        while let Some(i) = tx.next_to_send() {
            tx.sent(i, seq, 0);
            sent.push((i, seq));
            seq += 1;
        }
        assert_eq!(sent.len(), 4);
        // Frame 1 is lost; frames 0, 2 and 3 arrive.
        for &(i, s) in &sent {
            if s == 1 {
                continue;
            }
            let b = &plan.blocks[i];
            assert!(rx.insert(b.offset, b.raw_len));
            tx.on_ack(&rx.ack(), s);
        }
        assert_eq!(tx.stats().fast_retransmits, 1);
        assert_eq!(tx.next_to_send(), Some(1), "the lost block goes first");
    }

    #[test]
    fn timer_recovers_a_lost_tail() {
        let plan = TransferPlan::new(&[1u8; 500], params(false));
        let mut tx = FirmwareSender::new(plan, 0, 4, 100);
        tx.sent(0, 0, 10);
        assert_eq!(tx.next_deadline(), Some(110));
        assert!(!tx.on_timer(109));
        assert!(tx.on_timer(110));
        assert_eq!(tx.next_to_send(), Some(0));
    }

    #[test]
    fn resume_starts_after_have() {
        let plan = TransferPlan::new(&[1u8; 5000], params(false));
        let have = plan.blocks[2].end();
        let tx = FirmwareSender::new(plan, have, 4, 100);
        assert_eq!(tx.next_to_send(), Some(3));
    }

    #[test]
    fn receiver_bounds_and_duplicates() {
        let mut rx = FirmwareReceiver::new(1000, [0; 32], false, 4096, 0);
        let d = |offset, raw_len, data: Vec<u8>| FwData {
            offset,
            raw_len,
            encoding: Encoding::Raw,
            data,
        };
        assert_eq!(
            rx.decode(&d(900, 200, vec![0; 200])),
            Err(ErrorCode::FwOutOfRange)
        );
        assert_eq!(
            rx.decode(&d(u32::MAX, 2, vec![0; 2])),
            Err(ErrorCode::FwOutOfRange)
        );
        assert_eq!(rx.decode(&d(0, 10, vec![0; 9])), Err(ErrorCode::Malformed));
        assert!(rx.decode(&d(0, 10, vec![0; 10])).unwrap().is_some());
        rx.insert(0, 10);
        assert_eq!(rx.decode(&d(0, 10, vec![0; 10])), Ok(None));
        rx.insert(20, 10);
        rx.insert(40, 10);
        assert_eq!(
            rx.ack(),
            FwAck {
                have: 10,
                ranges: vec![(20, 30), (40, 50)]
            }
        );
        rx.insert(10, 10);
        assert_eq!(
            rx.ack(),
            FwAck {
                have: 30,
                ranges: vec![(40, 50)]
            }
        );
        let bomb = FwData {
            offset: 0,
            raw_len: 500,
            encoding: Encoding::Deflate,
            data: miniz_oxide::deflate::compress_to_vec(&[0u8; 900], 6),
        };
        let rx2 = FirmwareReceiver::new(1000, [0; 32], true, 4096, 0);
        assert_eq!(rx2.decode(&bomb), Err(ErrorCode::FwDecompress));
    }

    #[test]
    fn deflate_limit_is_max_block_or_one_frames_data_room() {
        assert_eq!(deflate_block_limit(4096, 8192), 8192 - 25);
        assert_eq!(deflate_block_limit(65536, 8192), 65536);
        assert_eq!(deflate_block_limit(0, 2048), 2048 - 25);
        let rx = FirmwareReceiver::new(100_000, [0; 32], false, 8167, 0);
        let d = |raw_len: u32, encoding| FwData {
            offset: 0,
            raw_len,
            encoding,
            data: vec![0; 10],
        };
        assert_eq!(
            rx.decode(&d(8168, Encoding::Deflate)),
            Err(ErrorCode::TooLarge)
        );
        // Raw blocks are bounded by their frame only: here the data does not match raw_len.
        assert_eq!(
            rx.decode(&d(40_000, Encoding::Raw)),
            Err(ErrorCode::Malformed)
        );
    }

    #[test]
    fn receiver_caps_tracked_ranges() {
        let mut rx = FirmwareReceiver::new(100_000, [0; 32], false, 4096, 0);
        for i in 0..MAX_TRACKED_RANGES as u32 {
            assert!(rx.insert(10 + i * 20, 10));
        }
        assert!(!rx.insert(5000, 10));
        assert!(
            rx.insert(0, 10),
            "extending an existing range is always possible"
        );
    }
}
