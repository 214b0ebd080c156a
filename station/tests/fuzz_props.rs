//! A bounded run of the station's fuzz entry points (`station::fuzz`) in the ordinary test
//! suite: each seed of `fuzz/corpus/<target>/`, and mutations of it (bits flipped, bytes cut,
//! inserted, duplicated). Each entry point must return for every input; a panic fails the test.
//! `cargo xtask fuzz` runs the same functions coverage-guided for longer.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use std::path::PathBuf;

use prost::Message as _;
use station::api::pb;
use station::fuzz;

fn fuzz_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out.sort();
    out
}

/// A small deterministic generator, so that a failure can be repeated.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) as usize
    }
}

/// `n` mutations of `seed`, each one to four edits.
fn mutations(seed: &[u8], n: usize, rng: &mut Lcg) -> Vec<Vec<u8>> {
    (0..n)
        .map(|_| {
            let mut m = seed.to_vec();
            for _ in 0..1 + rng.next() % 4 {
                if m.is_empty() {
                    m.push(rng.next() as u8);
                    continue;
                }
                let at = rng.next() % m.len();
                match rng.next() % 4 {
                    0 => m[at] ^= 1 << (rng.next() % 8),
                    1 => m.truncate(at),
                    2 => m.insert(at, rng.next() as u8),
                    _ => {
                        let end = (at + 1 + rng.next() % 16).min(m.len());
                        let piece = m[at..end].to_vec();
                        m.splice(at..at, piece);
                    }
                }
            }
            m
        })
        .collect()
}

fn run(target: &str, extra: Vec<Vec<u8>>, per_seed: usize, f: impl Fn(&[u8])) {
    let mut rng = Lcg(0xF022_2026);
    let mut all = seeds(target);
    all.extend(extra);
    for s in &all {
        f(s);
        for m in mutations(s, per_seed, &mut rng) {
            f(&m);
        }
    }
}

#[test]
fn manifests_in_their_envelope_never_panic() {
    let root = fuzz::manifest_root();
    // The seed is a whole demo batch that verifies: every signature in it is checked on each run.
    for s in seeds("manifest_envelope") {
        let (report, _) = station::manifest::verify::verify_bytes(&s, &root);
        assert!(report.ok(), "{:?}", report.failures);
    }
    run("manifest_envelope", Vec::new(), 12, |d| {
        fuzz::manifest_envelope(d, &root)
    });
}

#[test]
fn manifest_contents_never_panic() {
    let root = fuzz::manifest_root();
    run("manifest_content", Vec::new(), 150, |d| {
        fuzz::manifest_content(d, &root)
    });
}

#[test]
fn configurations_never_panic() {
    run("config", Vec::new(), 400, fuzz::config);
}

#[test]
fn api_messages_never_panic() {
    // Replies and events as the daemon sends them, besides the request seeds.
    let typed = |which: u8, bytes: Vec<u8>| [vec![which], bytes].concat();
    let extra = vec![
        typed(
            3,
            pb::LineView {
                nests: vec![pb::Nest::default(); 2],
                ..Default::default()
            }
            .encode_to_vec(),
        ),
        typed(4, pb::Event::default().encode_to_vec()),
        typed(
            5,
            pb::AuditEntries {
                entries: vec![pb::AuditEntry::default()],
            }
            .encode_to_vec(),
        ),
        typed(
            6,
            pb::BatchList {
                batches: vec![pb::Batch::default()],
            }
            .encode_to_vec(),
        ),
        typed(7, pb::Verification::default().encode_to_vec()),
    ];
    run("api_message", extra, 300, fuzz::api_message);
}

#[test]
fn registry_answers_never_panic() {
    // A factory view as the registry answers it, besides the text seeds.
    let view = pb::FleetViewReply {
        batches: vec![pb::FleetBatch {
            work_order: "WO-1".into(),
            station: "cell-01".into(),
            done: 12,
            failed: 1,
        }],
        yields: vec![pb::FleetYield {
            station: "cell-01".into(),
            nest: Some(2),
            done: 12,
            failed: 1,
        }],
        found: vec![pb::FleetMeter {
            station: "cell-01".into(),
            uid: "AA".into(),
            state: "done".into(),
            serial: Some("X000000001".into()),
            ..Default::default()
        }],
    };
    let extra = vec![[vec![3u8], view.encode_to_vec()].concat()];
    // The note seed reads as a checkpoint, so the mutations start from one.
    let note = seeds("registry_answer")
        .into_iter()
        .find(|s| s.first() == Some(&0))
        .unwrap();
    assert!(station::audit::checkpoint_tree_head(&String::from_utf8_lossy(&note[1..])).is_some());
    run("registry_answer", extra, 400, fuzz::registry_answer);
}
