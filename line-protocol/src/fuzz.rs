//! Fuzzing entry points. Each `fuzz/` target is a one-line wrapper over one of these, and the
//! test suite runs them over generated and mutated inputs, so the same code is exercised both
//! ways. Every function must return normally for every input: a panic is a bug.

use crate::frame::{Decoded, FrameDecoder};
use crate::host::{HostConfig, HostSession};
use crate::meter::MeterSession;
use crate::msg::Message;
use crate::testkit::{MemMeter, Pair, SeededRng};

/// The stream decoder, fed in pieces whose sizes come from the input itself.
pub fn frame_decoder(data: &[u8]) {
    let mut dec = FrameDecoder::new(4096);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = (usize::from(rest[0]) % 64 + 1).min(rest.len());
        dec.push(&rest[..n], &mut out);
        rest = &rest[n..];
    }
    for d in &out {
        if let Decoded::Frame(f) = d {
            assert!(f.payload.len() <= 4096);
            assert_eq!(usize::from(f.header.len), f.payload.len());
        }
    }
    let s = dec.stats();
    assert_eq!(s.frames + s.dropped(), out.len() as u64);
}

/// The message decoder: the first byte is the type. What decodes must re-encode to the same bytes.
pub fn message(data: &[u8]) {
    let Some((&t, payload)) = data.split_first() else {
        return;
    };
    if let Ok(m) = Message::decode(t, payload) {
        let again = m.to_bytes();
        assert_eq!(Message::decode(t, &again).as_ref(), Ok(&m));
    }
}

/// Raw line bytes into a meter session that has just answered a HELLO.
pub fn meter_input(data: &[u8]) {
    let mut pair = Pair::new(1);
    let hello = pair.host.hello([0; 16]);
    let _ = pair.meter.receive(&hello, &mut pair.app, &mut pair.rng);
    let _ = pair.meter.receive(data, &mut pair.app, &mut pair.rng);
    let mut fresh = MeterSession::new(4096);
    let mut app = MemMeter::new(&[1; 8]);
    let _ = fresh.receive(data, &mut app, &mut SeededRng::new(2));
}

/// Messages sent over an established channel: the input is a sequence of
/// `type ‖ len16 ‖ payload` records, each encrypted by the host and delivered to the meter.
pub fn meter_secure(data: &[u8]) {
    let mut pair = Pair::new(3);
    pair.open();
    let mut rest = data;
    while rest.len() >= 3 {
        let t = rest[0];
        let n = usize::from(u16::from_le_bytes([rest[1], rest[2]])).min(rest.len() - 3);
        let payload = &rest[3..3 + n];
        rest = &rest[3 + n..];
        if let Ok((_, bytes)) = pair.host.request_raw(t, payload.to_vec()) {
            let _ = pair.exchange(&bytes);
        }
    }
}

/// Raw line bytes into a host session in each phase.
pub fn host_input(data: &[u8]) {
    let mut host = HostSession::new(HostConfig::default());
    let _ = host.receive(data);
    let _ = host.hello([0; 16]);
    let _ = host.receive(data);
    let mut pair = Pair::new(4);
    pair.open();
    let _ = pair.host.receive(data);
}

/// MCUboot image parsing and verification (a firmware release from outside): what parses is
/// consistent with the bytes, and verification never panics.
pub fn image(data: &[u8]) {
    if let Ok(info) = crate::image::parse(data) {
        assert!(usize::from(info.hdr_size) <= data.len());
        assert!(info.img_size as usize <= data.len());
    }
    // A signature check against some key: it must refuse without panicking.
    let _ = crate::image::verify(data, &crate::testkit::provisioning_root());
}

/// The attestation receipt: what decodes re-encodes to the same bytes.
pub fn receipt(data: &[u8]) {
    if let Some(r) = crate::receipt::Receipt::decode(data) {
        assert_eq!(crate::receipt::Receipt::decode(&r.encode()), Some(r));
    }
}

/// A station certificate chain as CHANNEL_OPEN carries it: the input split into up to four
/// certificates, checked against the test provisioning root; never panics.
pub fn station_chain(data: &[u8]) {
    let root = crate::testkit::provisioning_root();
    let chain: Vec<Vec<u8>> = data
        .split(|b| *b == 0xFF)
        .take(4)
        .map(<[u8]>::to_vec)
        .collect();
    let _ = crate::chain::verify_chain(&chain, &root);
}
