//! The emulator as a separate process over real pseudo-terminals: a whole provisioning exchange,
//! a 256 KiB image, resume after a dropped link and after a reboot, a noisy line, and every fault
//! with the error it must produce.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

mod util;

use std::time::Duration;

use line_protocol::Violation;
use line_protocol::io::LinkError;
use line_protocol::msg::ErrorCode;
use meter_sim::firmware::{firmware_like_payload, random_payload};
use meter_sim::linksim::LinkParams;
use util::{Failure, MeterSim, SoftPki, connect, provision};

fn read_json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_exchange_and_256_kib_image_over_a_pty() {
    let sim = MeterSim::spawn(1, &["--seed", "1"]);
    let pki = SoftPki::new();
    let image = pki.image(&random_payload(256 * 1024, 1));
    let mut link = connect(&sim.paths[0], 115_200, 4).await;
    let p = provision(&mut link, &pki, &image).await.unwrap();

    // What the meter's flash holds is exactly what it was given.
    let dir = sim.meter_dir(&p.uid);
    assert_eq!(
        std::fs::read(dir.join("image.bin")).unwrap(),
        image,
        "authentic image active"
    );
    assert_eq!(
        std::fs::read(dir.join("cert-sign.der")).unwrap(),
        p.sign_cert
    );
    assert_eq!(
        std::fs::read(dir.join("cert-device-ca.der")).unwrap(),
        pki.ca_der
    );
    assert_eq!(
        std::fs::read(dir.join("anchor-1-0.der")).unwrap(),
        pki.fw_cert
    );
    assert_eq!(std::fs::read(dir.join("secret-guek.bin")).unwrap(), p.guek);
    let state = read_json(&dir.join("meter.json"));
    assert_eq!(state["lifecycle"], "sealed");
    assert_eq!(state["disabled"], 3);
    assert_eq!(p.receipt.fw_sha256, line_protocol::crypto::sha256(&image));
    assert_eq!(p.receipt.uid, p.uid);
    assert_eq!(p.resumed_from, 0);
    // After the release the nest takes the next meter: a new UID answers.
    let next = link.hello().await.unwrap();
    assert_ne!(next.uid, p.uid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_link_drops_mid_image() {
    let sim = MeterSim::spawn(1, &["--seed", "2"]);
    let pki = SoftPki::new();
    let image = pki.image(&random_payload(256 * 1024, 2));
    let params = LinkParams {
        baud: 921_600,
        latency: Duration::from_millis(4),
        ..LinkParams::default()
    };
    let (path, _keep, _link_task) = util::link_through(&sim.paths[0], params).await;
    let mut link = connect(&path, 921_600, 4).await;
    assert!(link.hello().await.is_ok());
    let (uid, ktk) = util::open(&mut link).await.unwrap();
    let (cert, _) = util::personalize(&mut link, &pki, &uid, &ktk)
        .await
        .unwrap();
    // The transfer takes about 3 s on this line: pull the plug after 1.2 s.
    let cut = tokio::time::timeout(
        Duration::from_millis(1200),
        util::firmware(&mut link, &image),
    )
    .await;
    assert!(
        cut.is_err(),
        "the transfer must still be running when the link drops"
    );
    drop(link);
    tokio::time::sleep(Duration::from_millis(100)).await;

    let mut link = connect(&path, 921_600, 4).await;
    let (uid2, _) = util::open(&mut link).await.unwrap();
    assert_eq!(uid2, uid, "same meter");
    let resumed_from = util::firmware(&mut link, &image).await.unwrap();
    assert!(
        resumed_from > 64 * 1024,
        "resumed from {resumed_from}, not from the start"
    );
    assert!(resumed_from < image.len() as u32);
    assert!(
        link.stats().firmware.frames_sent < 20,
        "only the rest was sent"
    );
    util::finish(&mut link, &cert).await.unwrap();
    assert_eq!(
        std::fs::read(sim.meter_dir(&uid).join("image.bin")).unwrap(),
        image
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_after_the_meter_reboots_mid_image() {
    let sim = MeterSim::spawn(1, &["--seed", "3", "--fault", "reboot-at:50"]);
    let pki = SoftPki::new();
    let image = pki.image(&random_payload(200 * 1024, 3));
    let mut link = connect(&sim.paths[0], 921_600, 1).await;
    let (uid, ktk) = util::open(&mut link).await.unwrap();
    let (cert, _) = util::personalize(&mut link, &pki, &uid, &ktk)
        .await
        .unwrap();
    match util::firmware(&mut link, &image).await {
        Err(Failure::Link(
            LinkError::Timeout {
                what: "FW_DATA", ..
            }
            | LinkError::ChannelLost { .. },
        )) => {}
        other => panic!("a rebooting meter must stop the transfer: {other:?}"),
    }
    // Same port, new session: the station re-handshakes and resumes.
    util::open(&mut link).await.unwrap();
    let from = util::firmware(&mut link, &image).await.unwrap();
    assert!(from >= image.len() as u32 / 3, "resumed from {from}");
    util::finish(&mut link, &cert).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noisy_line_at_ber_1e5_still_delivers_the_image() {
    let sim = MeterSim::spawn(1, &["--seed", "4"]);
    let pki = SoftPki::new();
    let image = pki.image(&firmware_like_payload(256 * 1024, 0.7, 4));
    let params = LinkParams {
        baud: 921_600,
        latency: Duration::from_millis(4),
        ber: 1e-5,
        seed: 11,
        ..LinkParams::default()
    };
    let (path, _keep, _t) = util::link_through(&sim.paths[0], params).await;
    let mut link = connect(&path, 921_600, 4).await;
    let p = tokio::time::timeout(Duration::from_secs(60), provision(&mut link, &pki, &image))
        .await
        .expect("no hang")
        .unwrap();
    assert_eq!(
        std::fs::read(sim.meter_dir(&p.uid).join("image.bin")).unwrap(),
        image
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hopeless_line_fails_cleanly_without_activating_anything() {
    let sim = MeterSim::spawn(1, &["--seed", "5"]);
    let pki = SoftPki::new();
    let image = pki.image(&random_payload(64 * 1024, 5));
    let params = LinkParams {
        baud: 921_600,
        latency: Duration::from_millis(4),
        ber: 2e-3,
        seed: 12,
        ..LinkParams::default()
    };
    let (path, _keep, _t) = util::link_through(&sim.paths[0], params).await;
    let mut link = connect(&path, 921_600, 4).await;
    let r = tokio::time::timeout(Duration::from_secs(60), provision(&mut link, &pki, &image))
        .await
        .expect("no hang");
    match r {
        Err(Failure::Link(LinkError::Timeout { .. })) => {}
        other => panic!("expected a clean timeout, got {other:?}"),
    }
    for entry in std::fs::read_dir(sim.state.path()).unwrap().flatten() {
        assert!(
            !entry.path().join("image.bin").exists(),
            "nothing activated"
        );
    }
}

/// Runs the reference host against a meter with one fault.
async fn with_fault(fault: &str) -> (Result<util::Provisioned, Failure>, MeterSim) {
    let sim = MeterSim::spawn(1, &["--seed", "6", "--fault", fault]);
    let pki = SoftPki::new();
    let image = pki.image(&random_payload(32 * 1024, 6));
    let mut link = connect(&sim.paths[0], 921_600, 1).await;
    let r = tokio::time::timeout(Duration::from_secs(60), provision(&mut link, &pki, &image))
        .await
        .expect("no hang");
    (r, sim)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_drop_bytes_makes_the_meter_unreachable() {
    match with_fault("drop-bytes:1").await.0 {
        Err(Failure::Link(LinkError::Timeout { what: "HELLO", .. })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_corrupt_bytes_is_caught_by_the_crc_and_retried() {
    let sim = MeterSim::spawn(1, &["--seed", "7", "--fault", "corrupt-bytes:0.001"]);
    let mut link = connect(&sim.paths[0], 921_600, 1).await;
    let mut opened = false;
    for _ in 0..5 {
        if util::open(&mut link).await.is_ok() {
            opened = true;
            break;
        }
    }
    assert!(opened, "the channel opens despite the noise");
    for _ in 0..100 {
        match link.call(&line_protocol::Message::Status).await {
            Ok(line_protocol::Message::StatusRsp(_)) => {}
            other => panic!("{other:?}"),
        }
    }
    let fs = link.frame_stats();
    assert!(
        fs.crc + fs.stuffing + fs.length + fs.truncated > 0,
        "damaged frames were seen and dropped: {fs:?}"
    );
    assert!(link.stats().retries > 0, "lost requests were sent again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_corrupting_every_byte_leaves_the_meter_unreachable() {
    match with_fault("corrupt-bytes:1").await.0 {
        Err(Failure::Link(LinkError::Timeout { what: "HELLO", .. })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_delay_slows_but_does_not_break() {
    let sim = MeterSim::spawn(1, &["--seed", "8", "--fault", "delay:150"]);
    let mut link = connect(&sim.paths[0], 921_600, 1).await;
    let t = std::time::Instant::now();
    link.hello().await.unwrap();
    util::open(&mut link).await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(450),
        "three answers, each 150 ms late"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_wrong_hash_is_detected() {
    match with_fault("wrong-hash").await.0 {
        Err(Failure::Check(m)) => assert!(m.contains("different image hash"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_replayed_frame_is_a_security_violation() {
    let sim = MeterSim::spawn(1, &["--seed", "9", "--fault", "replay:status"]);
    let mut link = connect(&sim.paths[0], 921_600, 1).await;
    util::open(&mut link).await.unwrap();
    let first = link.call(&line_protocol::Message::Status).await;
    assert!(first.is_ok(), "the first copy is genuine");
    match link.call(&line_protocol::Message::Status).await {
        Err(LinkError::Security(Violation::Replay { .. })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_bad_proof_of_possession_is_detected() {
    match with_fault("bad-pop").await.0 {
        Err(Failure::Check(m)) => assert!(m.contains("proof of possession"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_false_lifecycle_is_detected() {
    match with_fault("lie-lifecycle:sealed").await.0 {
        Err(Failure::Check(m)) => assert!(m.contains("lifecycle sealed"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_fake_seal_is_caught_by_the_receipt() {
    match with_fault("fake-seal").await.0 {
        Err(Failure::Check(m)) => assert!(m.contains("receipt says lifecycle personalized"), "{m}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_silent_meter_times_out_naming_the_step() {
    match with_fault("silent-at:keygen").await.0 {
        Err(Failure::Link(LinkError::Timeout { what: "KEYGEN", .. })) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_reboot_is_reported_as_a_lost_channel_or_timeout() {
    let (r, _sim) = with_fault("reboot-at:30").await;
    match r {
        Err(Failure::Link(
            LinkError::Timeout {
                what: "FW_DATA", ..
            }
            | LinkError::ChannelLost {
                code: ErrorCode::NoChannel,
            },
        )) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_station_chain_is_refused_by_the_bootloader() {
    let sim = MeterSim::spawn(1, &["--seed", "10"]);
    let mut link = connect(&sim.paths[0], 921_600, 1).await;
    link.hello().await.unwrap();
    let r = link
        .open_channel(
            [4; 65],
            vec![line_protocol::testkit::STATION_FOREIGN_DER.to_vec()],
            &util::SoftSigner,
        )
        .await;
    match r {
        Err(LinkError::Refused {
            code: ErrorCode::BadCertChain,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_image_is_refused_before_activation() {
    let sim = MeterSim::spawn(1, &["--seed", "11"]);
    let pki = SoftPki::new();
    let mut image = pki.image(&random_payload(20 * 1024, 11));
    image[0x400] ^= 0x01;
    let mut link = connect(&sim.paths[0], 921_600, 1).await;
    let (uid, ktk) = util::open(&mut link).await.unwrap();
    util::personalize(&mut link, &pki, &uid, &ktk)
        .await
        .unwrap();
    match util::firmware(&mut link, &image).await {
        Err(Failure::Check(m)) => assert!(m.contains("0x0023") || m.contains("0x0024"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(!sim.meter_dir(&uid).join("image.bin").exists());
}
