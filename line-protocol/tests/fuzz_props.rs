//! A bounded property run over the fuzz entry points: random bytes, and valid frames and messages
//! with random mutations. Each entry point must return for every input; a panic fails the test.
//! The same functions are the bodies of the `fuzz/` targets for longer coverage-guided runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use line_protocol::Message;
use line_protocol::fuzz;
use line_protocol::testkit::Pair;
use proptest::prelude::*;

/// Valid line traffic to mutate: a whole handshake and a few requests, both directions.
fn corpus() -> Vec<Vec<u8>> {
    let mut p = Pair::new(99);
    let mut frames = Vec::new();
    let hello = p.host.hello([3; 16]);
    frames.push(hello.clone());
    let out = p.meter.receive(&hello, &mut p.app, &mut p.rng);
    frames.push(out.bytes.clone());
    p.host.receive(&out.bytes);
    let open = p.channel_open();
    frames.push(open.clone());
    let out = p.meter.receive(&open, &mut p.app, &mut p.rng);
    frames.push(out.bytes.clone());
    p.host.receive(&out.bytes);
    for m in [
        Message::Status,
        Message::FwEnd,
        Message::Attest { nonce: [1; 16] },
    ] {
        let (_, f) = p.host.request(&m).unwrap();
        frames.push(f.clone());
        frames.push(p.meter.receive(&f, &mut p.app, &mut p.rng).bytes);
    }
    frames
}

fn mutate(mut v: Vec<u8>, edits: &[(usize, u8, u8)]) -> Vec<u8> {
    for &(pos, kind, val) in edits {
        if v.is_empty() {
            v.push(val);
            continue;
        }
        let i = pos % v.len();
        match kind % 4 {
            0 => v[i] ^= val | 1,
            1 => {
                v.insert(i, val);
            }
            2 => {
                v.remove(i);
            }
            _ => v.truncate(i),
        }
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
        fuzz::frame_decoder(&data);
        fuzz::message(&data);
        fuzz::host_input(&data);
    }

    #[test]
    fn mutated_traffic_never_panics(
        which in 0usize..10,
        edits in proptest::collection::vec((any::<usize>(), any::<u8>(), any::<u8>()), 1..6),
    ) {
        let corpus = corpus();
        let input = mutate(corpus[which % corpus.len()].clone(), &edits);
        fuzz::frame_decoder(&input);
        fuzz::meter_input(&input);
        fuzz::host_input(&input);
    }

    #[test]
    fn random_images_receipts_and_chains_never_panic(data in proptest::collection::vec(any::<u8>(), 0..3000)) {
        fuzz::image(&data);
        fuzz::receipt(&data);
        fuzz::station_chain(&data);
    }

    #[test]
    fn random_messages_on_the_channel_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2000)) {
        fuzz::meter_secure(&data);
    }

    #[test]
    fn messages_decode_what_they_encode(t in any::<u8>(), payload in proptest::collection::vec(any::<u8>(), 0..600)) {
        let mut data = vec![t];
        data.extend_from_slice(&payload);
        fuzz::message(&data);
    }
}
