//! Nameplates printed before the cell: the model's serials are scanned (`serial_source =
//! "scan"`). A barcode scanner on a pseudo-terminal sends garbage, an out-of-range serial, a good
//! one and the good one again: only good, unused serials of the batch are provisioned; each other
//! code refuses its meter with its own reason, and nothing of it reaches the journal's meters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use e2e::{Cell, CellOptions};
use tokio::io::AsyncWriteExt;

async fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < Duration::from_secs(30), "waited for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_a_good_unused_scanned_serial_of_the_batch_is_provisioned() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 2,
        firmware_kib: 8,
        scanners: true,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let engine = daemon.engine().clone();
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    client
        .execute(&oper, station::Command::StartLine)
        .await
        .unwrap();
    let db = cell.db();
    let q = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    let refused = |n: i64| -> String {
        db.query_row(
            "SELECT details FROM audit WHERE kind = 'meter.refused' ORDER BY seq LIMIT 1 OFFSET ?1",
            [n],
            |r| r.get(0),
        )
        .unwrap_or_default()
    };
    // The batch is E2E000001000 to E2E000001070.
    let cases = [
        ("NOT-A-SERIAL", Some("is not a serial number of this batch")),
        ("E2E000000001", Some("outside this batch's range")),
        ("E2E000001005", None),
        ("E2E000001005", Some("is already on meter")),
        ("E2E000001007", None),
    ];
    let mut refusals = 0;
    let mut done = 0;
    for (code, refusal) in cases {
        wait_until("the nest to ask for the nameplate", || {
            engine.snapshot().nests[0].message.as_deref() == Some("scan the meter's nameplate")
        })
        .await;
        cell.scanners.lock().await[0]
            .write_all(format!("{code}\r").as_bytes())
            .await
            .unwrap();
        match refusal {
            Some(why) => {
                refusals += 1;
                wait_until("the refusal", || {
                    q("SELECT count(*) FROM audit WHERE kind = 'meter.refused'") == refusals
                })
                .await;
                let details = refused(refusals - 1);
                assert!(details.contains(why), "{code}: {details}");
                assert!(
                    details.contains(code),
                    "the refusal names the code: {details}"
                );
            }
            None => {
                done += 1;
                wait_until("the meter done", || {
                    q("SELECT count(*) FROM meters WHERE state = 'done'") == done
                })
                .await;
                let serial: String = db
                    .query_row(
                        "SELECT serial FROM meters WHERE state = 'done' ORDER BY id DESC LIMIT 1",
                        [],
                        |r| r.get(0),
                    )
                    .unwrap();
                assert_eq!(serial, code, "the meter carries its nameplate's number");
            }
        }
    }
    // Only the good codes have records; the system titles follow the scanned numbers.
    assert_eq!(q("SELECT count(*) FROM meters"), 2);
    assert_eq!(
        q(
            "SELECT count(*) FROM meters WHERE system_title IN ('444d5700000003ed', '444d5700000003ef')"
        ),
        2
    );
    wait_until("the batch complete", || {
        engine.snapshot().batch.is_some_and(|b| b.done == 2)
    })
    .await;
    let _ = client.logout(&oper).await;
    daemon.stop().await.unwrap();
}
