//! The station end to end: a batch over several nests on SoftHSM and pseudo-terminals,
//! every meter-sim fault in its own nest while the others succeed, duplicate UIDs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::process::Stdio;
use std::time::Duration;

use e2e::{Cell, CellOptions, run_batch};

fn meters_done(cell: &Cell) -> Vec<(String, String, Vec<u8>, Vec<u8>)> {
    let db = cell.db();
    let mut stmt = db
        .prepare("SELECT m.uid, m.serial, c1.der, c2.der FROM meters m JOIN certificates c1 ON c1.meter_id = m.id AND c1.slot = 'sign' JOIN certificates c2 ON c2.meter_id = m.id AND c2.slot = 'ka' WHERE m.state = 'done'")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_of_40_over_4_nests() {
    let cell = Cell::new(CellOptions {
        nests: 4,
        quantity: 40,
        firmware_kib: 32,
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(600)).await;
    assert!(summary.batch_complete, "{summary}");
    assert_eq!(summary.done, 40);
    assert_eq!(summary.failed, 0, "{summary}");

    let done = meters_done(&cell);
    assert_eq!(done.len(), 40);
    let device_ca = cell.path("pki/device-ca.pem");
    let root = cell.path("pki/root-ca.pem");
    for (uid, serial, sign_der, ka_der) in &done {
        let dir = cell.meter_dir(uid);
        // Exactly the issued certificates, in the meter's flash.
        assert_eq!(
            &std::fs::read(dir.join("cert-sign.der")).unwrap(),
            sign_der,
            "{serial}"
        );
        assert_eq!(
            &std::fs::read(dir.join("cert-ka.der")).unwrap(),
            ka_der,
            "{serial}"
        );
        // The authentic image, active.
        assert_eq!(
            std::fs::read(dir.join("image.bin")).unwrap(),
            cell.firmware,
            "{serial}"
        );
        // The keys it should have: four, matching the check values the station journalled.
        let db = cell.db();
        let mut stmt = db.prepare("SELECT k.key_id, k.kcv FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id WHERE m.uid = ?1").unwrap();
        let kcvs: Vec<(String, String)> = stmt
            .query_map([uid], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(kcvs.len(), 4, "{serial}");
        for (id, kcv) in kcvs {
            let key = std::fs::read(dir.join(format!("secret-{id}.bin"))).unwrap();
            assert_eq!(
                hex::encode(line_protocol::crypto::kcv_aes(&key).unwrap()),
                kcv,
                "{serial} {id}"
            );
        }
        let state: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("meter.json")).unwrap())
                .unwrap();
        assert_eq!(state["lifecycle"], "sealed");
        assert_eq!(state["identity"]["serial"], serial.as_str());
        // Certificates chain to the device CA and the root: checked by openssl.
        let pem = dir.join("cert-sign.pem");
        let c = std::process::Command::new("openssl")
            .args(["x509", "-inform", "DER", "-in"])
            .arg(dir.join("cert-sign.der"))
            .arg("-out")
            .arg(&pem)
            .status()
            .unwrap();
        assert!(c.success());
        let out = std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&root)
            .arg("-untrusted")
            .arg(&device_ca)
            .arg(&pem)
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify {serial}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    // Serials and certificate serials are unique; every certificate is delivered.
    let db = cell.db();
    let n: i64 = db
        .query_row(
            "SELECT count(DISTINCT serial) FROM meters WHERE state = 'done'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 40);
    let undelivered: i64 = db
        .query_row(
            "SELECT count(*) FROM certificates WHERE state <> 'delivered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(undelivered, 0);
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
}

/// The X9.63 key-transport vector, recomputed by an implementation we did not write: Python's
/// `cryptography` (its `X963KDF`, the ANSI X9.63 KDF an HSM's `CKD_SHA256_KDF` computes), from
/// the vector's Z2 and SharedInfo, gives the vector's KTK.
#[test]
fn the_x963_key_transport_vector_matches_pythons_x963kdf() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../schemas/line-protocol-vectors.json");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let c = &v["channel_x963"];
    assert_eq!(c["ktk_method"], "x963");
    let python = std::env::var("CELL_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = "import sys\n\
        from cryptography.hazmat.primitives import hashes\n\
        from cryptography.hazmat.primitives.kdf.x963kdf import X963KDF\n\
        kdf = X963KDF(algorithm=hashes.SHA256(), length=32, sharedinfo=bytes.fromhex(sys.argv[2]))\n\
        print(kdf.derive(bytes.fromhex(sys.argv[1])).hex())\n";
    let out = std::process::Command::new(&python)
        .args(["-c", script])
        .arg(c["z2"].as_str().unwrap())
        .arg(c["ktk_data"].as_str().unwrap())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{python}: {} (run through `cargo xtask test`, which installs `cryptography`)",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), c["ktk"]);
    // And the SharedInfo is the label and the transcript hash.
    assert_eq!(
        c["ktk_data"].as_str().unwrap(),
        format!(
            "{}{}",
            hex::encode(b"jig-line-v1 ktk x963"),
            c["th"].as_str().unwrap()
        )
    );
}

/// One lost frame never fails a meter: the first answer to every request type in turn is lost
/// on the line (meter-sim `lose-response:all`: HELLO_ACK, CHANNEL_READY, every response of the
/// channel, the first FW_ACK, SEAL_RSP, ...) and the meter still ends done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_answer_to_any_request_never_fails_a_meter() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 2,
        firmware_kib: 16,
        faults: vec![(1, "lose-response:all".into())],
        ..CellOptions::default()
    })
    .await;
    // Not failed, and not refused and taken out either: the meter that lost its answers is one
    // of the two done.
    every_meter_done(&cell, 2).await;
}

/// An older bootloader answers a repeated SEAL with LOCKED; when its first SEAL_RSP is lost the
/// station does not scrap the sealed meter: the signed receipt decides, and it ends done.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meter_that_answers_a_repeated_seal_with_locked_is_decided_by_its_receipt() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        firmware_kib: 16,
        faults: vec![
            (1, "lose-response:seal".into()),
            (1, "locked-reseal".into()),
        ],
        ..CellOptions::default()
    })
    .await;
    every_meter_done(&cell, 1).await;
}

/// A one-nest cell whose batch wants one meter, the nest's first meter with `fault`.
async fn one_meter_with_fault(fault: &str) -> Cell {
    Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        firmware_kib: 16,
        faults: vec![(1, fault.into())],
        ..CellOptions::default()
    })
    .await
}

/// Runs the batch; every one of its `quantity` meters ends done, none failed or refused.
async fn every_meter_done(cell: &Cell, quantity: i64) {
    let (daemon, summary) = run_batch(cell, Duration::from_secs(180)).await;
    daemon.stop().await.unwrap();
    assert!(summary.batch_complete, "{summary}");
    assert_eq!((summary.failed, summary.refused), (0, 0), "{summary}");
    assert_eq!(summary.done, quantity, "{summary}");
}

/// A meter that buffers one frame (window 1) is provisioned end to end: every request and every
/// firmware block waits for the answer to the one before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_window_one_meter_is_provisioned() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 2,
        firmware_kib: 16,
        meter_window: Some(1),
        ..CellOptions::default()
    })
    .await;
    every_meter_done(&cell, 2).await;
}

/// What a meter reports is checked: a release that cannot fit the meter's slot (HELLO_ACK) is
/// refused before any key is made for the meter; a FW_RESULT whose version is not the image
/// header's fails the meter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meter_whose_slot_is_too_small_or_that_misreads_the_version_is_stopped() {
    let small = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        firmware_kib: 16,
        meter_slot_size: Some(8 * 1024),
        ..CellOptions::default()
    })
    .await;
    let reason = e2e::first_stopped_meter(&small).await;
    assert!(
        reason.contains("does not fit the meter's slot (8192 bytes)"),
        "{reason}"
    );
    let keys: i64 = small
        .db()
        .query_row("SELECT COUNT(*) FROM meters", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys, 0, "no meter record, no key");

    let reason = failure_with_fault("wrong-version").await;
    assert!(
        reason.contains("meter reported image version")
            && reason.contains("image header says 2.1.0"),
        "{reason}"
    );
}

/// The receipt lists exactly the certificates the station issued: a receipt with one listed
/// twice fails the meter at attestation (before: any receipt that included them passed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_receipt_listing_more_certificates_than_issued_fails_the_meter() {
    let reason = failure_with_fault("extra-receipt-cert").await;
    assert!(
        reason.contains("the receipt lists 4 certificates (slots [1, 2, 3, 1]), the meter was given 3 (slots [1, 2, 3])"),
        "{reason}"
    );
}

/// A one-meter batch whose meter has `fault`: the meter fails (the next one is done); returns
/// the failure recorded for it.
async fn failure_with_fault(fault: &str) -> String {
    let cell = one_meter_with_fault(fault).await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(120)).await;
    daemon.stop().await.unwrap();
    assert_eq!(summary.failed, 1, "{summary}");
    cell.db()
        .query_row(
            "SELECT failure FROM meters WHERE state = 'failed'",
            [],
            |r| r.get(0),
        )
        .unwrap()
}

/// A meter taken out of its nest in the middle of a request, the next one put in at once: the
/// station's retries reach the new meter, which knows no channel. The failure names what
/// happened (the meter was taken out, another UID answers) instead of blaming the old meter for
/// a dropped channel, raises no security alarm, and the new meter is provisioned.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meter_swapped_during_retries_is_recognised_as_a_new_meter() {
    for (fault, step) in [
        ("swap-at:put-anchor", "trust anchors"),
        ("swap-at:fw-data", "firmware"),
    ] {
        let cell = one_meter_with_fault(fault).await;
        let (daemon, summary) = run_batch(&cell, Duration::from_secs(120)).await;
        daemon.stop().await.unwrap();
        assert!(summary.batch_complete, "{fault}: {summary}");
        assert_eq!((summary.done, summary.failed), (1, 1), "{fault}: {summary}");
        let db = cell.db();
        let (failure, done_uid): (String, String) = db
            .query_row(
                "SELECT f.failure, d.uid FROM meters f, meters d WHERE f.state = 'failed' AND d.state = 'done'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            failure,
            format!(
                "meter taken out of the nest during {step} (another meter, UID {done_uid}, answers now)"
            ),
            "{fault}"
        );
        let alarms: i64 = db
            .query_row(
                "SELECT count(*) FROM audit WHERE kind LIKE 'security.%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(alarms, 0, "{fault}: a swap is no security event");
    }
}
