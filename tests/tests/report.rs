//! The batch evidence report, read as an auditor reads it: made from the journal by `station
//! report` (and written into every export), its numbers checked against SQL over the journal,
//! printed to PDF and rendered to a picture by Debian's Chromium, and read back with poppler's
//! `pdftotext` — programs we did not write. A tampered audit log must be named on the first
//! page. The requirement map behind the report must name only tests that exist.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use e2e::{Cell, CellOptions, run_batch};
use station::report::{BatchReport, Verdict, html::data_of};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The text of the PDF's first page, as poppler's `pdftotext` reads it.
fn first_page(pdf: &Path) -> String {
    let out = std::process::Command::new("pdftotext")
        .args(["-f", "1", "-l", "1", "-layout", s(pdf), "-"])
        .output()
        .expect("pdftotext (poppler-utils) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `station report` for `batch` into `out`, with the PDF: (exit code, output, the report's data,
/// its HTML).
fn report(cell: &Cell, batch: &str, out: &Path) -> (i32, String, BatchReport, String) {
    let root = cell.path("root-ca.pem");
    let (code, o, e) = cell.run(
        None,
        &[
            "report",
            "--batch",
            batch,
            "--root",
            s(&root),
            "--out",
            s(out),
            "--pdf",
        ],
    );
    let html = std::fs::read_to_string(out.join("report.html"))
        .unwrap_or_else(|err| panic!("no report.html ({err}): {o}{e}"));
    let data = data_of(&html).expect("the report carries its data");
    (code, format!("{o}{e}"), data, html)
}

fn acknowledge_every_alarm(cell: &Cell) {
    let ids: Vec<i64> = {
        let db = cell.db();
        let mut st = db
            .prepare("SELECT id FROM alarms WHERE acked_at IS NULL ORDER BY id")
            .unwrap();
        st.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    for id in ids {
        let (code, out, err) = cell.run(Some("super"), &["alarm", "ack", &id.to_string()]);
        assert_eq!(code, 0, "alarm ack {id}: {out}{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reports_numbers_are_what_sql_says_of_a_batch_with_failures_voids_and_alarms() {
    // Nest 1's first meter reports a firmware it was not given (a critical alarm, a failure
    // after its certificate was issued: a void); nest 2's goes silent while it takes its
    // certificate (a failure, a void); nest 3 runs clean.
    let cell = Cell::new(CellOptions {
        nests: 3,
        quantity: 9,
        firmware_kib: 16,
        faults: vec![(1, "wrong-hash".into()), (2, "silent-at:put-cert".into())],
        ..CellOptions::default()
    })
    .await;
    let batch = cell.batch_id.unwrap();
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    assert!(summary.failed >= 2, "{summary}");
    // One alarm is acknowledged now; the report made before the others are must say so.
    let id = batch.to_string();
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "batch close: {out}{err}");
    let open_alarms: i64 = cell
        .db()
        .query_row(
            "SELECT count(*) FROM alarms WHERE acked_at IS NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(open_alarms >= 1, "the firmware mismatch raised an alarm");
    let early = cell.path("early-report");
    let (code, out, data, _) = report(&cell, &id, &early);
    assert_eq!(
        code, 3,
        "an unexported batch with open alarms fails its checks: {out}"
    );
    let check =
        |r: &BatchReport, name: &str| r.checks.iter().find(|c| c.name == name).unwrap().clone();
    assert!(!check(&data, "alarms-acknowledged").ok);
    assert!(!check(&data, "checkpoints").ok, "not exported yet");
    let alarms_row = data
        .requirements
        .iter()
        .find(|q| q.requirement.id == "SM-CG-A.alarms")
        .unwrap();
    assert_eq!(alarms_row.verdict, Verdict::Failed, "{alarms_row:?}");

    acknowledge_every_alarm(&cell);
    let dir = cell.path("export");
    let (code, out, err) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&dir)],
    );
    assert_eq!(code, 0, "export: {out}{err}");
    daemon.stop().await.unwrap();

    // The auditor's report, on demand, from the journal the configuration names.
    let out_dir = cell.path("report");
    let (code, out, r, html) = report(&cell, &id, &out_dir);
    assert_eq!(code, 0, "{out}");
    assert!(r.audit.ok(), "{:?}", r.audit);
    for q in &r.requirements {
        if q.requirement.applies {
            assert_eq!(q.verdict, Verdict::Met, "{}: {}", q.requirement.id, q.why);
        } else {
            assert_eq!(q.verdict, Verdict::NotApplicable);
        }
    }
    assert!(r.checks.iter().all(|c| c.ok), "{:?}", r.checks);

    // Every number against SQL over the journal.
    let db = cell.db();
    let q = |sql: &str| -> i64 { db.query_row(sql, [batch], |r| r.get(0)).unwrap() };
    let c = &r.counts;
    assert_eq!(
        c.meters_done,
        q("SELECT count(*) FROM meters WHERE batch_id = ?1 AND state = 'done'")
    );
    assert_eq!(
        c.meters_failed,
        q("SELECT count(*) FROM meters WHERE batch_id = ?1 AND state = 'failed'")
    );
    assert_eq!(c.meters_done, 9);
    assert!(c.meters_failed >= 2);
    let certs = |state: &str| {
        q(&format!(
            "SELECT count(*) FROM certificates c JOIN meters m ON m.id = c.meter_id WHERE m.batch_id = ?1 AND c.state = '{state}'"
        ))
    };
    assert_eq!(c.certificates_delivered, certs("delivered"));
    assert_eq!(c.certificates_voided, certs("voided"));
    assert!(
        c.certificates_voided >= 2,
        "both failures left a void: {c:?}"
    );
    assert_eq!(
        c.wrapped_keys,
        q(
            "SELECT count(*) FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id WHERE m.batch_id = ?1 AND m.state = 'done'"
        )
    );
    // Obsolete data: a failed meter keeps no wrapped key.
    assert_eq!(
        q(
            "SELECT count(*) FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id WHERE m.batch_id = ?1 AND m.state = 'failed'"
        ),
        0
    );
    // Per nest.
    let mut st = db
        .prepare("SELECT nest, sum(state = 'done'), sum(state = 'failed') FROM meters WHERE batch_id = ?1 GROUP BY nest ORDER BY nest")
        .unwrap();
    let nests: Vec<(i64, i64, i64)> = st
        .query_map([batch], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        r.nests
            .iter()
            .map(|n| (n.nest, n.done, n.failed))
            .collect::<Vec<_>>(),
        nests
    );
    // Failures by reason and by step.
    let mut st = db
        .prepare("SELECT failure, fail_step FROM meters WHERE batch_id = ?1 AND state = 'failed'")
        .unwrap();
    let mut reasons: BTreeMap<String, i64> = BTreeMap::new();
    let mut steps: BTreeMap<String, i64> = BTreeMap::new();
    for row in st
        .query_map([batch], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Option<String>>(1)?))
        })
        .unwrap()
    {
        let (reason, step) = row.unwrap();
        *reasons.entry(station::shift::cause(&reason)).or_default() += 1;
        *steps
            .entry(step.unwrap_or_else(|| "unknown".into()))
            .or_default() += 1;
    }
    let got: BTreeMap<String, i64> = r
        .failures_by_reason
        .iter()
        .map(|t| (t.label.clone(), t.count))
        .collect();
    assert_eq!(got, reasons);
    let got: BTreeMap<String, i64> = r
        .failures_by_step
        .iter()
        .map(|t| (t.label.clone(), t.count))
        .collect();
    assert_eq!(got, steps);
    assert!(
        html.contains("firmware"),
        "the firmware failure is in words"
    );
    // Meters per hour add up; cycle times are the journal's.
    assert_eq!(
        r.per_hour.iter().map(|h| h.done + h.failed).sum::<i64>(),
        q(
            "SELECT count(*) FROM meters WHERE batch_id = ?1 AND state IN ('done', 'failed') AND finished_at IS NOT NULL"
        )
    );
    let mut st = db
        .prepare("SELECT finished_at - started_at FROM meters WHERE batch_id = ?1 AND state = 'done' ORDER BY 1")
        .unwrap();
    let cycles: Vec<i64> = st
        .query_map([batch], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(r.cycle.meters, cycles.len() as i64);
    assert_eq!(r.cycle.min_ms, cycles[0]);
    assert_eq!(r.cycle.max_ms, *cycles.last().unwrap());
    assert_eq!(
        r.cycle.median_ms,
        cycles[((cycles.len() - 1) as f64 * 0.5).round() as usize]
    );
    assert_eq!(
        r.cycle.histogram.iter().map(|b| b.2).sum::<i64>(),
        cycles.len() as i64
    );
    let floor = r
        .cycle
        .floor_ms
        .expect("the configuration gives the lines' speeds");
    assert!(
        floor > 0 && floor <= r.cycle.min_ms,
        "{floor} vs {}",
        r.cycle.min_ms
    );
    // Voided certificates, each with its reason.
    let mut st = db
        .prepare("SELECT c.serial, c.void_reason FROM certificates c JOIN meters m ON m.id = c.meter_id WHERE m.batch_id = ?1 AND c.state = 'voided' ORDER BY c.id")
        .unwrap();
    let voids: Vec<(String, String)> = st
        .query_map([batch], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        r.voided
            .iter()
            .map(|v| (v.serial.clone(), v.reason.clone()))
            .collect::<Vec<_>>(),
        voids
    );
    for (serial, _) in &voids {
        assert!(html.contains(serial.as_str()), "void {serial} is listed");
    }
    // Failed meters, each with what became of it: a later record of its UID, or none.
    let mut st = db
        .prepare(
            "SELECT m.uid, m.nest, COALESCE(m.fail_step, 'unknown'),
                    (SELECT l.state FROM meters l WHERE l.uid = m.uid AND l.id > m.id ORDER BY l.id LIMIT 1)
               FROM meters m WHERE m.batch_id = ?1 AND m.state = 'failed' ORDER BY m.id",
        )
        .unwrap();
    let failed: Vec<(String, i64, String, Option<String>)> = st
        .query_map([batch], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(r.failed_meters.len(), failed.len());
    for (f, (uid, nest, step, later)) in r.failed_meters.iter().zip(&failed) {
        assert_eq!((&f.uid, f.nest, &f.step), (uid, *nest, step));
        match later {
            Some(state) => {
                assert!(f.fate.starts_with("provisioned again"), "{f:?}");
                assert_eq!(f.recovered, state == "done");
            }
            None => assert!(f.fate.starts_with("not provisioned again"), "{f:?}"),
        }
        assert!(html.contains(uid.as_str()));
    }
    // Alarms, and how long each took to acknowledge.
    let (from, to) = r.batch.window_ms;
    let mut st = db
        .prepare("SELECT id, kind, acked_at - raised_at FROM alarms WHERE raised_at BETWEEN ?1 AND ?2 ORDER BY id")
        .unwrap();
    let alarms: Vec<(i64, String, Option<i64>)> = st
        .query_map([from, to], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(!alarms.is_empty());
    assert_eq!(
        r.alarms
            .iter()
            .map(|a| (
                a.id,
                a.kind.clone(),
                a.ack_s.map(|x| (x * 1000.0).round() as i64)
            ))
            .collect::<Vec<_>>(),
        alarms
    );
    assert!(alarms.iter().any(|a| a.1 == "security.firmware_mismatch"));
    // Audit entries per kind: the window's, the firmware's import and the self-test before it.
    let mut st = db
        .prepare(
            "SELECT kind, count(*) FROM audit WHERE ts BETWEEN ?1 AND ?2
                OR seq = (SELECT max(seq) FROM audit WHERE kind = 'hsm.self_test' AND ts < ?1)
                OR seq = (SELECT max(seq) FROM audit WHERE kind = 'firmware.imported' AND ts <= ?1
                          AND json_extract(details, '$.sha256') = ?3)
              GROUP BY kind",
        )
        .unwrap();
    let fw: String = db
        .query_row(
            "SELECT f.sha256 FROM batches b JOIN firmware f ON f.id = b.firmware_id WHERE b.id = ?1",
            [batch],
            |r| r.get(0),
        )
        .unwrap();
    let kinds: BTreeMap<String, i64> = st
        .query_map(rusqlite::params![from, to, fw], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let got: BTreeMap<String, i64> = r
        .audit_kinds
        .iter()
        .map(|(k, e)| (k.clone(), e.count))
        .collect();
    assert_eq!(got, kinds);
    assert!(
        kinds["meter.failed"] >= 2 && kinds["alarm.acknowledged"] >= 1,
        "{kinds:?}"
    );
    assert_eq!(kinds.get("firmware.imported"), Some(&1), "{kinds:?}");
    assert_eq!(
        r.audit.entries,
        db.query_row("SELECT count(*) FROM audit", [], |r| r.get::<_, i64>(0))
            .unwrap()
    );
    // The chain: the export's checkpoint, signed, equal to the log, and the entry naming it.
    let (sha, cp_seq): (String, i64) = db
        .query_row(
            "SELECT e.manifest_sha256, c.seq FROM exports e JOIN audit_checkpoints c ON c.id = e.checkpoint_id WHERE e.batch_id = ?1",
            [batch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(r.exports.len(), 1);
    let e = &r.exports[0];
    assert_eq!(
        (e.manifest_sha256.as_str(), e.checkpoint_seq),
        (sha.as_str(), cp_seq)
    );
    assert!(e.signature_ok && e.chain_ok);
    let exported: i64 = db
        .query_row("SELECT seq FROM audit WHERE kind = 'manifest.exported' AND json_extract(details, '$.manifest_sha256') = ?1", [&sha], |r| r.get(0))
        .unwrap();
    assert_eq!(e.exported_entry, Some(exported));
    // The firmware every meter done reported.
    assert_eq!(r.firmware.meters_matching, c.meters_done);
    assert_eq!(r.firmware.sha256, db.query_row("SELECT f.sha256 FROM batches b JOIN firmware f ON f.id = b.firmware_id WHERE b.id = ?1", [batch], |r| r.get::<_, String>(0)).unwrap());
    // The HSM's self-test, with what it read back.
    let t = r
        .hsm_self_tests
        .last()
        .expect("a self-test at the daemon's start");
    assert!(t.passed && t.findings.len() as i64 == t.checks, "{t:?}");

    // The page shows what the data says.
    for (id, value) in [
        ("meters-done", c.meters_done.to_string()),
        ("meters-failed", c.meters_failed.to_string()),
        ("certificates-voided", c.certificates_voided.to_string()),
    ] {
        assert!(
            html.contains(&format!("id=\"{id}\">{value}<")),
            "{id} = {value}"
        );
    }
    let page = first_page(&out_dir.join("report.pdf"));
    assert!(page.contains("The audit log verifies"), "{page}");
    assert!(page.contains(&r.batch.work_order), "{page}");

    // An auditor with nothing but a copy of the journal and the root gets the same report: the
    // line speed the batch recorded gives the theoretical minimum without the configuration.
    let copy = cell.path("auditor");
    std::fs::create_dir_all(&copy).unwrap();
    std::fs::copy(cell.path("station.db"), copy.join("station.db")).unwrap();
    let _ = std::fs::copy(cell.path("station.db-wal"), copy.join("station.db-wal"));
    let out = std::process::Command::new(e2e::station_exe())
        .args([
            "--config",
            s(&copy.join("no-such.toml")),
            "report",
            "--batch",
            &id,
        ])
        .args([
            "--journal",
            s(&copy.join("station.db")),
            "--root",
            s(&cell.path("root-ca.pem")),
        ])
        .args(["--out", s(&copy.join("report"))])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let alone =
        data_of(&std::fs::read_to_string(copy.join("report/report.html")).unwrap()).unwrap();
    assert_eq!(alone.counts, r.counts);
    assert_eq!(alone.cycle, r.cycle);
    assert_eq!(alone.station_id, r.station_id);
    assert_eq!(alone.requirements, r.requirements);

    // The report written into the export says the same of the batch.
    let at_export = data_of(&std::fs::read_to_string(dir.join("report.html")).unwrap()).unwrap();
    assert_eq!(at_export.counts, r.counts);
    assert_eq!(at_export.voided, r.voided);
    assert!(at_export.audit.ok());
    // At export the signed head covers the log: the entries are checked through its chain hash,
    // not one signature each; the auditor's report checks every signature.
    assert_eq!(r.audit.signatures_checked, r.audit.entries);
    assert!(
        at_export.audit.signatures_checked < at_export.audit.entries,
        "{:?}",
        at_export.audit
    );
    assert_eq!(at_export.exports.len(), 1);
    assert!(at_export.exports[0].signature_ok && at_export.exports[0].chain_ok);
    assert_eq!(at_export.exports[0].manifest_sha256, sha);

    // The checkpoint is printed as signed, and the CRL number is the one OpenSSL reads from the
    // export's CRL.
    let (note, cp_id): (String, i64) = db
        .query_row(
            "SELECT c.note, c.id FROM exports e JOIN audit_checkpoints c ON c.id = e.checkpoint_id WHERE e.batch_id = ?1",
            [batch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(r.exports[0].checkpoint_text, note);
    assert!(
        html.contains(note.lines().last().unwrap()),
        "the signature line is printed"
    );
    assert_eq!(r.exports[0].crl_number, cp_id);
    let crl = std::process::Command::new("openssl")
        .args(["crl", "-inform", "DER", "-noout", "-crlnumber", "-in"])
        .arg(dir.join("voided.crl"))
        .output()
        .unwrap();
    let crl = String::from_utf8_lossy(&crl.stdout).to_string();
    let number = crl
        .trim()
        .strip_prefix("crlNumber=")
        .map(|n| n.trim_start_matches("0x"))
        .and_then(|n| i64::from_str_radix(n, 16).ok());
    assert_eq!(number, Some(cp_id), "{crl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tampered_audit_log_is_named_on_the_reports_first_page() {
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 2,
        ..CellOptions::default()
    })
    .await;
    let batch = cell.batch_id.unwrap().to_string();
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &batch]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, err) = cell.run(
        Some("officer"),
        &[
            "export",
            "--batch",
            &batch,
            "--out",
            s(&cell.path("export")),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
    // Start-up and shut-down are in the log.
    let kinds = |k: &str| -> i64 {
        cell.db()
            .query_row("SELECT count(*) FROM audit WHERE kind = ?1", [k], |r| {
                r.get(0)
            })
            .unwrap()
    };
    assert!(kinds("station.start") >= 1 && kinds("station.stop") >= 1);

    let (code, out, clean, _) = report(&cell, &batch, &cell.path("clean"));
    assert_eq!(code, 0, "{out}");
    assert!(clean.audit.ok());

    // Someone with a shell edits one entry of the batch: who provisioned a meter.
    let seq: i64 = cell
        .db()
        .query_row(
            "SELECT min(seq) FROM audit WHERE kind = 'meter.provisioned'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    cell.db()
        .execute("UPDATE audit SET actor = 'mallory' WHERE seq = ?1", [seq])
        .unwrap();
    let out_dir = cell.path("tampered");
    let (code, out, r, html) = report(&cell, &batch, &out_dir);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains(&format!("entry {seq}")), "{out}");
    assert_eq!(r.audit.first_bad.as_ref().map(|b| b.0), Some(seq));
    for q in r.requirements.iter().filter(|q| q.requirement.applies) {
        assert_eq!(q.verdict, Verdict::NotShown, "{}", q.requirement.id);
    }
    // First thing on the page, and on the PDF's first page.
    let banner = html.find("THE AUDIT LOG FAILED VERIFICATION").unwrap();
    assert!(banner < html.find("Checks of this batch").unwrap());
    let page = first_page(&out_dir.join("report.pdf"));
    let flat = page.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(
        flat.contains(&format!("THE AUDIT LOG FAILED VERIFICATION at entry {seq}")),
        "{page}"
    );
}

/// ImageMagick's count of pixels that differ by more than a few percent.
fn differing_pixels(a: &Path, b: &Path) -> u64 {
    let out = std::process::Command::new("compare")
        .args(["-metric", "AE", "-fuzz", "6%", s(a), s(b), "null:"])
        .output()
        .expect("ImageMagick's compare runs");
    let text = String::from_utf8_lossy(&out.stderr);
    let n = text.split_whitespace().next().unwrap_or("");
    n.parse::<f64>()
        .unwrap_or_else(|_| panic!("compare said {text:?}")) as u64
}

#[test]
fn chromium_renders_the_sample_report_as_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let html = dir.path().join("report.html");
    std::fs::write(
        &html,
        station::report::html::render(&station::report::sample()),
    )
    .unwrap();
    let shot = dir.path().join("report.png");
    let mut cmd = std::process::Command::new("chromium");
    cmd.args([
        "--headless",
        "--disable-gpu",
        "--no-first-run",
        "--hide-scrollbars",
        "--force-device-scale-factor=1",
        "--window-size=900,1300",
    ])
    .arg(format!(
        "--user-data-dir={}",
        dir.path().join("profile").display()
    ))
    .arg(format!("--screenshot={}", shot.display()));
    if std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
    {
        cmd.arg("--no-sandbox");
    }
    let out = cmd
        .arg(format!("file://{}", html.display()))
        .output()
        .expect("Debian's chromium runs");
    assert!(
        out.status.success() && shot.exists(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snapshot = repo().join("tests/snapshots/report.png");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::create_dir_all(snapshot.parent().unwrap()).unwrap();
        std::fs::copy(&shot, &snapshot).unwrap();
        return;
    }
    assert!(
        snapshot.exists(),
        "no snapshot at {}: run with UPDATE_SNAPSHOTS=1 and look at it",
        snapshot.display()
    );
    let diff = differing_pixels(&shot, &snapshot);
    // Font hinting may move a few edge pixels; a changed word or bar moves thousands.
    assert!(
        diff <= 900,
        "{diff} pixels differ from {} (the new picture: {})",
        snapshot.display(),
        shot.display()
    );
    // A changed figure is caught: the same page with one number changed differs.
    let mut changed = station::report::sample();
    changed.counts.meters_failed += 1;
    changed.audit.first_bad = Some((17, "its hash does not chain".into()));
    std::fs::write(&html, station::report::html::render(&changed)).unwrap();
    let shot2 = dir.path().join("changed.png");
    let mut cmd2 = std::process::Command::new("chromium");
    cmd2.args(cmd.get_args().filter(|a| {
        !a.to_string_lossy().starts_with("--screenshot")
            && !a.to_string_lossy().starts_with("file://")
    }))
    .arg(format!("--screenshot={}", shot2.display()))
    .arg(format!("file://{}", html.display()));
    assert!(cmd2.output().unwrap().status.success());
    assert!(differing_pixels(&shot2, &snapshot) > 5_000);
}

/// Every `FILE::NAME` of the requirement map is a test in that file; every place it names
/// exists; every audit kind it names is one the station writes; and it covers each seed list.
#[test]
fn the_requirement_map_names_only_tests_that_exist() {
    let map = station::report::requirements::map().unwrap();
    let root = repo();
    let mut missing = Vec::new();
    let sources: String = [
        "station/src",
        "station/src/engine",
        "station/src/manifest",
        "station/src/api",
    ]
    .iter()
    .flat_map(|d| std::fs::read_dir(root.join(d)).unwrap())
    .map(|e| e.unwrap().path())
    .filter(|p| p.extension().is_some_and(|x| x == "rs"))
    .map(|p| std::fs::read_to_string(p).unwrap())
    .collect();
    for r in &map.requirements {
        for t in &r.tests {
            let (file, name) = t.split_once("::").unwrap();
            let text = std::fs::read_to_string(root.join(file)).unwrap_or_default();
            // The function, with a test attribute in the lines above it.
            let found = text.find(&format!("fn {name}(")).is_some_and(|at| {
                let before = &text[..at];
                let head: Vec<&str> = before.lines().rev().take(4).collect();
                head.iter()
                    .any(|l| l.contains("#[test]") || l.contains("#[tokio::test"))
            });
            if !found {
                missing.push(format!("{}: no test {t}", r.id));
            }
        }
        for w in &r.places {
            if !root.join(w).exists() {
                missing.push(format!("{}: no file {w}", r.id));
            }
        }
        for k in &r.audit {
            // As a string the station writes, not a fail point's name.
            let quoted = format!("\"{k}\"");
            let written = sources
                .match_indices(&quoted)
                .any(|(at, _)| !sources[..at].trim_end().ends_with("failpoint("));
            if !written {
                missing.push(format!("{}: the station never writes audit kind {k}", r.id));
            }
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
    // Each letter of SM-CG A–I, the Annex A events DESIGN.md §8 lists, and NEMA SG-AMI 1's four
    // concerns have a row.
    let ids: Vec<&str> = map.requirements.iter().map(|r| r.id.as_str()).collect();
    for letter in ["A", "B", "C", "D", "E", "F", "G", "H", "I"] {
        assert!(
            ids.iter()
                .any(|i| i.starts_with(&format!("SM-CG-{letter}."))),
            "SM-CG {letter}"
        );
    }
    for event in [
        "authentication",
        "firmware",
        "time",
        "start-stop",
        "errors",
        "keys-and-parameters",
        "access-rights",
        "attacks",
    ] {
        assert!(
            ids.contains(&format!("SM-CG-AnnexA.{event}").as_str()),
            "Annex A {event}"
        );
    }
    for item in ["logging", "integrity", "trusted-source", "authorisation"] {
        assert!(
            ids.contains(&format!("NEMA-SG-AMI-1.{item}").as_str()),
            "NEMA {item}"
        );
    }
}

/// The cell's daemon with Debian's libfaketime preloaded: its wall clock (and only it: the
/// monotonic clock runs on) is moved by the offset in `offset`, which it reads at every call.
fn stationd_faked(cell: &Cell, offset: &Path) -> Stopped {
    let lib = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
    .expect("libfaketime (Debian's faketime package) is installed");
    Stopped(cell.spawn_stationd_with(&[
        ("LD_PRELOAD", lib),
        ("FAKETIME_TIMESTAMP_FILE", s(offset)),
        ("FAKETIME_NO_CACHE", "1"),
        ("DONT_FAKE_MONOTONIC", "1"),
    ]))
}

/// A daemon stopped (SIGTERM, then waited for) when dropped, a failed assertion included.
struct Stopped(std::process::Child);

impl Drop for Stopped {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .arg(self.0.id().to_string())
            .status();
        let _ = self.0.wait();
    }
}

/// The audit entries of `kind` in the cell's journal.
fn audit_count(cell: &Cell, kind: &str) -> i64 {
    cell.db()
        .query_row("SELECT count(*) FROM audit WHERE kind = ?1", [kind], |r| {
            r.get(0)
        })
        .unwrap()
}

/// Whether `needle` occurs in `hay`.
fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// The journal's bytes as they lie on disk: the database file and its write-ahead log.
fn journal_bytes(cell: &Cell) -> Vec<u8> {
    let mut bytes = std::fs::read(cell.path("station.db")).unwrap();
    if let Ok(wal) = std::fs::read(cell.path("station.db-wal")) {
        bytes.extend(wal);
    }
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrapped_keys_leave_the_journal_and_the_exports_once_their_retention_has_passed() {
    use base64::Engine as _;
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 4,
        ..CellOptions::default()
    })
    .await;
    let batch = cell.batch_id.unwrap();
    let id = batch.to_string();
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "batch close: {out}{err}");
    // Two exports: both hold the keys, both lose them.
    for n in 1..=2 {
        let dir = cell.path(&format!("fetched-{n}"));
        let (code, out, err) = cell.run(
            Some("officer"),
            &["export", "--batch", &id, "--out", s(&dir)],
        );
        assert_eq!(code, 0, "export: {out}{err}");
    }
    daemon.stop().await.unwrap();

    let db = cell.db();
    let blobs: Vec<Vec<u8>> = {
        let mut st = db
            .prepare("SELECT k.wrapped FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id WHERE m.batch_id = ?1")
            .unwrap();
        st.query_map([batch], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert!(
        blobs.len() >= 4,
        "every meter done has its keys: {}",
        blobs.len()
    );
    let dirs: Vec<PathBuf> = {
        let mut st = db
            .prepare("SELECT out_dir FROM exports WHERE batch_id = ?1 ORDER BY id")
            .unwrap();
        st.query_map([batch], |r| r.get::<_, String>(0))
            .unwrap()
            .map(|d| PathBuf::from(d.unwrap()))
            .collect()
    };
    assert_eq!(dirs.len(), 2);
    // Before: the keys lie in the journal's bytes and in each export's files, where this test
    // can find them (so that not finding them later means something).
    let bytes = journal_bytes(&cell);
    assert!(
        blobs.iter().any(|b| contains(&bytes, b)),
        "the journal holds wrapped keys"
    );
    let b64 = base64::engine::general_purpose::STANDARD.encode(&blobs[0]);
    for d in &dirs {
        let manifest = std::fs::read(d.join("manifest.json")).unwrap();
        assert!(
            contains(&manifest, b64.as_bytes()),
            "{} carries a key",
            d.display()
        );
        assert!(d.join("keys.pskc").exists());
    }
    // A done meter's keys cannot be deleted before their time, whatever statement tries.
    let refused = db
        .execute(
            "DELETE FROM wrapped_keys WHERE meter_id IN (SELECT id FROM meters WHERE batch_id = ?1)",
            [batch],
        )
        .unwrap_err()
        .to_string();
    assert!(refused.contains("retention"), "{refused}");
    drop(db);

    let offset = cell.path("faketime-offset");
    let faked = |days: i64| {
        std::fs::write(&offset, format!("+{}\n", days * 86_400)).unwrap();
        stationd_faked(&cell, &offset)
    };
    let keys_left = || -> i64 {
        cell.db()
            .query_row(
                "SELECT count(*) FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id WHERE m.batch_id = ?1",
                [batch],
                |r| r.get(0),
            )
            .unwrap()
    };
    let purges = || audit_count(&cell, "keys.purged");

    // 89 days on (the retention is 90): the daemon starts, sweeps, and keeps everything.
    let child = faked(89);
    let (code, out, err) = cell.run(Some("super"), &["batch", "status", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("last exported at "), "{out}");
    assert_eq!(purges(), 0);
    assert_eq!(keys_left(), blobs.len() as i64);
    assert!(dirs[0].join("manifest.json").exists());
    drop(child);

    // 91 days on: the start-up sweep deletes them. One key file cannot be removed (a directory
    // stands in its place): that is audited, and the rest goes regardless.
    let stuck = dirs[1].join("keys.pskc");
    std::fs::remove_file(&stuck).unwrap();
    std::fs::create_dir(&stuck).unwrap();
    std::fs::write(stuck.join("inside"), b"x").unwrap();
    let child = faked(91);
    assert_eq!(purges(), 1, "one entry for the batch");
    assert_eq!(keys_left(), 0);
    let (details, purged_at): (String, Option<i64>) = cell
        .db()
        .query_row(
            "SELECT a.details, b.keys_purged_at FROM audit a, batches b WHERE a.kind = 'keys.purged' AND b.id = ?1",
            [batch],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(purged_at.is_some());
    let details: serde_json::Value = serde_json::from_str(&details).unwrap();
    assert_eq!(details["batch"], batch);
    assert_eq!(details["keys"], blobs.len());
    assert_eq!(details["retention_days"], 90);
    assert_eq!(details["export_dirs"].as_array().unwrap().len(), 2);
    // Not one wrapped key is left in the journal's bytes: the rows' pages were overwritten and
    // the write-ahead log, which held older images of them, was emptied.
    let bytes = journal_bytes(&cell);
    for b in &blobs {
        assert!(
            !contains(&bytes, b),
            "a wrapped key survives in the journal's bytes"
        );
    }
    // The exports keep their CRL and report; the files with keys are gone.
    for d in &dirs {
        for f in ["manifest.json", "manifest.p7m", "keys.pskc"] {
            let path = d.join(f);
            assert!(
                path == stuck || !path.exists(),
                "{} is gone",
                path.display()
            );
        }
        assert!(d.join("voided.crl").exists());
        assert!(d.join("report.html").exists());
    }
    assert_eq!(audit_count(&cell, "keys.purge_incomplete"), 1);
    let incomplete: String = cell
        .db()
        .query_row(
            "SELECT json_extract(details, '$.path') FROM audit WHERE kind = 'keys.purge_incomplete'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(Path::new(&incomplete), stuck);
    // It is an alarm someone must acknowledge, in words that say whom to call.
    let alarm = cell
        .db()
        .query_row(
            "SELECT count(*) FROM alarms WHERE kind = 'keys.purge_incomplete' AND acked_at IS NULL",
            [],
            |r| r.get::<_, i64>(0),
        )
        .unwrap();
    assert_eq!(alarm, 1);
    // Exporting again, or fetching the old export, is refused in words.
    let (code, out, err) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&cell.path("again"))],
    );
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("retention period"), "{err}");
    let client = cell.client().await;
    let session = cell.login(&client, "officer").await;
    let fetch = client
        .fetch_export(&session, batch, &cell.path("fetch-again"))
        .await
        .unwrap_err()
        .to_string();
    assert!(fetch.contains("retention period"), "{fetch}");
    let (code, out, err) = cell.run(Some("super"), &["batch", "status", &id]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("wrapped keys deleted at "), "{out}");
    drop(child);

    // Once it can be, the next sweep removes it, and purges nothing twice.
    std::fs::remove_dir_all(&stuck).unwrap();
    std::fs::write(&stuck, b"a key file left behind").unwrap();
    let child = faked(92);
    assert!(!stuck.exists());
    assert_eq!(audit_count(&cell, "keys.purge_incomplete"), 1);
    assert_eq!(purges(), 1);
    drop(child);

    // The auditor's report still verifies, and says what was deleted and when.
    let (code, out, r, html) = report(&cell, &id, &cell.path("report"));
    assert_eq!(code, 0, "{out}");
    assert_eq!(r.counts.keys_purged, blobs.len() as i64);
    assert!(r.counts.keys_purged_at.is_some());
    assert_eq!(r.audit_kinds.get("keys.purged").map(|k| k.count), Some(1));
    let row = r
        .requirements
        .iter()
        .find(|q| q.requirement.id == "SM-CG-F.obsolete-data")
        .unwrap();
    assert_eq!(row.verdict, Verdict::Met, "{}", row.why);
    assert!(
        html.contains("deleted"),
        "the page says the keys were deleted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_clock_jump_under_the_daemon_is_audited() {
    // libfaketime moves the daemon's wall clock (and only it: the monotonic clock runs on) by
    // the offset in a file it reads at every call.
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        ..CellOptions::default()
    })
    .await;
    let offset = cell.path("faketime-offset");
    std::fs::write(&offset, "+0\n").unwrap();
    let child = stationd_faked(&cell, &offset);
    let jumps = || audit_count(&cell, "time.changed");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(jumps(), 0, "a steady clock is no change");
    std::fs::write(&offset, "+3600\n").unwrap();
    let mut seen = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        seen = jumps();
        if seen > 0 {
            break;
        }
    }
    drop(child);
    assert_eq!(seen, 1, "the jump is audited once");
    let jump: i64 = cell
        .db()
        .query_row(
            "SELECT json_extract(details, '$.jump_ms') FROM audit WHERE kind = 'time.changed'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!((3_590_000..=3_610_000).contains(&jump), "{jump}");
}
