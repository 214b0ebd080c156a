//! Crash safety: the station's daemon (`stationd`, the process that holds the journal and the HSM)
//! killed with SIGKILL at random points of a running batch, at least 20 times, restarted each
//! time, with the line driven by the real `station run` as its client. The batch still
//! completes; no serial number or certificate serial is used twice; every certificate is either
//! delivered to a done meter or voided; the audit log verifies.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::{Cell, CellOptions};

/// A small deterministic generator, so that a failing run can be repeated.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_twenty_times_the_batch_still_completes_cleanly() {
    killed_twenty_times(false).await;
}

/// The same on Kryoptic: its SQLite token store killed with the daemon twenty times.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_twenty_times_on_kryoptic_the_batch_still_completes_cleanly() {
    killed_twenty_times(true).await;
}

async fn killed_twenty_times(kryoptic: bool) {
    let quantity = 80;
    let cell = Cell::new(CellOptions {
        nests: 3,
        quantity,
        firmware_kib: 16,
        kryoptic,
        ..CellOptions::default()
    })
    .await;
    let mut rng = Lcg(0x5EED_2026);
    let mut kills = 0;
    let mut finished_early = false;
    while kills < 20 {
        let mut daemon = tokio::task::block_in_place(|| cell.spawn_stationd());
        let mut child = station_run(&cell, false);
        let delay = Duration::from_millis(200 + rng.next() % 1200);
        let t0 = Instant::now();
        while t0.elapsed() < delay {
            if child.try_wait().unwrap().is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if child.try_wait().unwrap().is_some() {
            finished_early = true;
            let _ = daemon.kill();
            let _ = daemon.wait();
            break;
        }
        daemon.kill().unwrap(); // SIGKILL, to the process holding the journal
        daemon.wait().unwrap();
        kills += 1;
        // Its client notices and gives up.
        let t1 = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(
                t1.elapsed() < Duration::from_secs(30),
                "station run did not notice that stationd was gone"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(!child.wait().unwrap().success());
    }
    assert!(
        !finished_early,
        "the batch finished after {kills} kills; make it larger so that every kill lands in a running batch"
    );
    assert_eq!(kills, 20);

    // Restart and let it finish.
    let daemon = tokio::task::block_in_place(|| cell.spawn_stationd());
    run_to_the_end(&cell, Duration::from_secs(600)).await;

    let db = cell.db();
    e2e::assert_journal_consistent(&db, quantity);
    let q = |sql: &str| -> i64 { db.query_row(sql, [], |r| r.get(0)).unwrap() };
    let interrupted = q("SELECT count(*) FROM meters WHERE failure LIKE 'interrupted%'");
    assert!(
        interrupted >= 3,
        "the kills should have caught meters in flight: {interrupted}"
    );
    // Every interrupted meter was failed by a start-up recovery, and audited there.
    let mut stmt = db
        .prepare("SELECT details FROM audit WHERE kind = 'station.recovery'")
        .unwrap();
    let recovered: usize = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .unwrap()
        .map(|d| {
            serde_json::from_str::<serde_json::Value>(&d.unwrap()).unwrap()["meters"]
                .as_array()
                .map(Vec::len)
                .unwrap_or(0)
        })
        .sum();
    drop(stmt);
    assert_eq!(
        recovered as i64, interrupted,
        "recovery events list every interrupted meter"
    );
    // Every done meter holds the certificate the journal says it was given.
    let mut stmt = db.prepare("SELECT m.uid, c.der FROM meters m JOIN certificates c ON c.meter_id = m.id AND c.slot = 'sign' WHERE m.state = 'done'").unwrap();
    for row in stmt
        .query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        })
        .unwrap()
    {
        let (uid, der) = row.unwrap();
        assert_eq!(
            std::fs::read(cell.meter_dir(&uid).join("cert-sign.der")).unwrap(),
            der,
            "{uid}"
        );
    }
    drop(stmt);
    drop(db);
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    // A clean stop: SIGTERM, the shut-down checkpoint, exit 0.
    e2e::stop_stationd(daemon);
}

/// The journal leads the meter at SEAL too: a power cut right after the meter sealed, before
/// the journal's `sealed`, leaves a meter that start-up recovery knows may be sealed (SEAL was
/// sent), and says so — before, it was failed as a plain "interrupted", as if it never sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_right_after_seal_leaves_a_meter_that_may_be_sealed_and_a_signed_token_reworks_it()
{
    let (cell, uid, old_cert) = sealed_by_a_crash().await;
    // The meter is sealed; a supervisor approves its rework; the station's next run sends it a
    // token signed in the HSM (line protocol 4.16); the meter returns to blank and is
    // provisioned again in the same nest.
    let dir = cell.meter_dir(&uid);
    let state = || -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(dir.join("meter.json")).unwrap()).unwrap()
    };
    assert_eq!(state()["lifecycle"], "sealed");
    let d = tokio::task::block_in_place(|| cell.spawn_stationd());
    let (code, out, err) = cell.run(Some("super"), &["rework", &uid]);
    assert_eq!(code, 0, "{out}{err}");
    run_to_the_end(&cell, Duration::from_secs(120)).await;
    let q = |sql: &str| -> i64 { cell.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(q("SELECT count(*) FROM meters WHERE state = 'done'"), 1);
    assert_eq!(
        q("SELECT count(DISTINCT uid) FROM meters"),
        1,
        "the same meter"
    );
    assert_eq!(
        q("SELECT count(*) FROM reworks WHERE used_at IS NOT NULL"),
        1
    );
    let new_cert: Vec<u8> = cell
        .db()
        .query_row(
            "SELECT c.der FROM meters m JOIN certificates c ON c.meter_id = m.id AND c.slot = 'sign' WHERE m.state = 'done'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(std::fs::read(dir.join("cert-sign.der")).unwrap(), new_cert);
    // The meter's own record names the certificate the token was bound to.
    let s = state();
    assert_eq!(s["lifecycle"], "sealed");
    assert_eq!(
        s["reworks"],
        serde_json::json!([hex::encode(line_protocol::crypto::sha256(&old_cert))])
    );
    // The audit log has the approval, the token as sent (UID, channel, certificate) and the
    // rework; and it verifies.
    let token: String = cell
        .db()
        .query_row(
            "SELECT json_extract(details, '$.token') FROM audit WHERE kind = 'meter.rework_sent'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let token = line_protocol::rework::ReworkToken::decode(&hex::decode(token).unwrap()).unwrap();
    assert_eq!(hex::encode(&token.uid), uid);
    assert_eq!(token.cert_sha256, line_protocol::crypto::sha256(&old_cert));
    for kind in [
        "meter.rework_approved",
        "meter.rework_sent",
        "meter.reworked",
    ] {
        assert_eq!(
            q(&format!("SELECT count(*) FROM audit WHERE kind = '{kind}'")),
            1,
            "{kind}"
        );
    }
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    // The evidence report, made from the journal while the daemon runs, says what became of the
    // failed record: the same meter, provisioned again after the supervisor's approval.
    let out_dir = cell.path("report");
    let root = cell.path("root-ca.pem");
    let (_, out, err) = cell.run(
        None,
        &[
            "report",
            "--batch",
            &cell.batch_id.unwrap().to_string(),
            "--root",
            root.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
    );
    let html = std::fs::read_to_string(out_dir.join("report.html"))
        .unwrap_or_else(|e| panic!("no report ({e}): {out}{err}"));
    let report = station::report::html::data_of(&html).unwrap();
    assert!(report.audit.ok(), "{:?}", report.audit);
    assert_eq!(report.failed_meters.len(), 1, "{:?}", report.failed_meters);
    let failed = &report.failed_meters[0];
    assert_eq!(failed.uid, uid);
    assert!(failed.recovered, "{failed:?}");
    assert!(
        failed
            .fate
            .starts_with("provisioned again after a rework approved by super at ")
            && failed.fate.ends_with(": done"),
        "{failed:?}"
    );
    e2e::stop_stationd(d);
}

/// A one-meter cell whose daemon died right after the meter sealed (failpoint
/// `provision.sealed`), restarted once: start-up recovery failed the meter as one that may be
/// sealed. Returns the cell, the meter's UID and the signing certificate it was given.
async fn sealed_by_a_crash() -> (Cell, String, Vec<u8>) {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        firmware_kib: 16,
        ..CellOptions::default()
    })
    .await;
    let mut daemon = tokio::task::block_in_place(|| {
        cell.spawn_stationd_with(&[("STATION_FAILPOINT", "provision.sealed")])
    });
    let mut child = station_run(&cell, false);
    let t0 = Instant::now();
    while daemon.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the daemon never sealed a meter"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        !daemon.wait().unwrap().success(),
        "the daemon died at the crash point"
    );
    let _ = child.kill();
    let _ = child.wait();
    let q = |sql: &str| -> i64 { cell.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        q("SELECT count(*) FROM meters WHERE state = 'flashed' AND seal_sent_at IS NOT NULL"),
        1,
        "the journal knew SEAL was being sent"
    );
    // The next start fails it as a meter that may be sealed, and says so in the audit log.
    let d = tokio::task::block_in_place(|| cell.spawn_stationd());
    e2e::stop_stationd(d);
    let failure: String = cell
        .db()
        .query_row(
            "SELECT failure FROM meters WHERE state = 'failed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        failure,
        "interrupted after SEAL was sent: the meter may be sealed; take it out for rework"
    );
    assert_eq!(
        q(
            "SELECT count(*) FROM audit WHERE kind = 'station.recovery' AND json_extract(details, '$.may_have_sealed') = 1"
        ),
        1
    );

    let (uid, old_cert): (String, Vec<u8>) = cell
        .db()
        .query_row(
            "SELECT m.uid, c.der FROM meters m JOIN certificates c ON c.meter_id = m.id AND c.slot = 'sign'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    (cell, uid, old_cert)
}

/// A board that holds another signing certificate than the one the cell's records name for its
/// UID (a swapped or cloned board) refuses the token: the station raises a critical alarm, the
/// meter stays sealed and untouched, and the line goes on with the next meter.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_sealed_meter_holding_another_certificate_refuses_the_rework_token() {
    let (cell, uid, old_cert) = sealed_by_a_crash().await;
    let dir = cell.meter_dir(&uid);
    let mut other = old_cert.clone();
    let last = other.len() - 1;
    other[last] ^= 0x01;
    std::fs::write(dir.join("cert-sign.der"), &other).unwrap();
    let d = tokio::task::block_in_place(|| cell.spawn_stationd());
    let (code, out, err) = cell.run(Some("super"), &["rework", &uid]);
    assert_eq!(code, 0, "{out}{err}");
    run_to_the_end(&cell, Duration::from_secs(120)).await;
    let q = |sql: &str| -> i64 { cell.db().query_row(sql, [], |r| r.get(0)).unwrap() };
    assert_eq!(
        q("SELECT count(*) FROM audit WHERE kind = 'security.rework_refused'"),
        1
    );
    assert_eq!(
        q("SELECT count(*) FROM audit WHERE kind = 'meter.reworked'"),
        0
    );
    let done: String = cell
        .db()
        .query_row("SELECT uid FROM meters WHERE state = 'done'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_ne!(done, uid, "the next meter completed the batch");
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meter.json")).unwrap()).unwrap();
    assert_eq!(state["lifecycle"], "sealed");
    assert_eq!(state["reworks"], serde_json::json!([]));
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    e2e::stop_stationd(d);
}

/// `station run --plain` until the batch is complete; it must end well within `limit`.
async fn run_to_the_end(cell: &Cell, limit: Duration) {
    let mut child = station_run(cell, true);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(t0.elapsed() < limit, "the run did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let out = child.wait_with_output().unwrap();
    assert!(
        status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `station run --plain` as the operator, its output kept (`piped`) or dropped.
fn station_run(cell: &Cell, piped: bool) -> std::process::Child {
    let out = || if piped { Stdio::piped() } else { Stdio::null() };
    cell.station(Some("oper"))
        .args(["run", "--plain"])
        .stdout(out())
        .stderr(out())
        .spawn()
        .unwrap()
}
