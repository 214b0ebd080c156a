//! The cell's defences, end to end: every meter fault in its own nest while the others succeed,
//! duplicate UIDs, audit tampering found by `station audit verify`, the permission table for
//! every command and role with lock-out and session expiry, and firmware from MCUboot's imgtool.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code

use std::collections::BTreeMap;
use std::time::Duration;

use e2e::{Cell, CellOptions, run_batch};
use station::auth::{self, Action, AuthError, Role};
use station::engine::BatchSpec;
use station::{Command, Error};

fn audit_kinds(cell: &Cell) -> BTreeMap<String, i64> {
    let db = cell.db();
    let mut stmt = db
        .prepare("SELECT kind, count(*) FROM audit GROUP BY kind")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(|r| r.unwrap())
        .collect()
}

fn failures_by_nest(cell: &Cell) -> BTreeMap<i64, Vec<String>> {
    let db = cell.db();
    let mut stmt = db
        .prepare("SELECT nest, failure FROM meters WHERE state = 'failed' ORDER BY id")
        .unwrap();
    let mut out: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for r in stmt
        .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
        .unwrap()
    {
        let (n, f) = r.unwrap();
        out.entry(n).or_default().push(f);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_fault_in_its_own_nest_while_the_others_succeed() {
    let faults = [
        "wrong-hash",
        "replay:status",
        "bad-pop",
        "lie-lifecycle:sealed",
        "fake-seal",
        "silent-at:put-cert",
        "reboot-at:50",
        "delay:100",
        "corrupt-bytes:0.0002",
        "drop-bytes:0.0002",
    ];
    let opts = CellOptions {
        nests: faults.len() as u32 + 1,
        faults: faults
            .iter()
            .enumerate()
            .map(|(i, f)| (i as u32 + 1, f.to_string()))
            .collect(),
        quantity: 24,
        firmware_kib: 16,
        ..CellOptions::default()
    };
    let cell = Cell::new(opts).await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(600)).await;
    assert!(summary.batch_complete, "{summary}");

    let failed = failures_by_nest(&cell);
    let first = |nest: i64| {
        failed
            .get(&nest)
            .and_then(|v| v.first())
            .cloned()
            .unwrap_or_default()
    };
    // Each misbehaviour ends its meter with a reason a person can act on.
    for (nest, fault, reason) in [
        (1, "wrong-hash", "meter reported image hash"),
        (2, "replay", "replayed or reordered frame"),
        (3, "bad-pop", "certificate request was refused"),
        (5, "fake-seal", "receipt says lifecycle personalized"),
        (6, "silent", "stopped answering"),
    ] {
        assert!(
            first(nest).contains(reason),
            "{fault}: {:?}",
            failed.get(&nest)
        );
    }
    assert!(
        !failed.contains_key(&4),
        "a meter lying about its lifecycle is refused before it gets a record"
    );
    // Faults the station rides out: a reboot mid-image (resume), a slow meter, a noisy line.
    for nest in 7..=10 {
        assert!(
            failed.get(&nest).is_none_or(|v| v
                .iter()
                .all(|r| r.contains("stopped answering") || r.contains("link"))),
            "nest {nest}: {:?}",
            failed.get(&nest)
        );
    }
    // The healthy nest and the meters after each faulty one all pass.
    assert!(!failed.contains_key(&11), "{:?}", failed.get(&11));
    for nest in 1..=6 {
        assert!(
            failed.get(&nest).is_none_or(|v| v.len() <= 1),
            "nest {nest} failed more than its faulty meter: {:?}",
            failed.get(&nest)
        );
    }
    // Failed meters: certificates voided, wrapped keys gone.
    let db = cell.db();
    let live_certs: i64 = db
        .query_row("SELECT count(*) FROM certificates c JOIN meters m ON m.id = c.meter_id WHERE m.state = 'failed' AND c.state <> 'voided'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(live_certs, 0);
    let keys_of_failed: i64 = db
        .query_row("SELECT count(*) FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id WHERE m.state = 'failed'", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys_of_failed, 0);
    let voided: i64 = db
        .query_row(
            "SELECT count(*) FROM certificates WHERE state = 'voided'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        voided >= 3,
        "at least the wrong-hash, replay and fake-seal meters had certificates: {voided}"
    );
    // Audited, and the critical ones raised alarms.
    let kinds = audit_kinds(&cell);
    for k in [
        "security.firmware_mismatch",
        "security.replay",
        "security.bad_certificate_request",
        "meter.unknown_lifecycle",
        "security.attestation_failed",
        "meter.failed",
    ] {
        assert!(kinds.contains_key(k), "no {k} in the audit log: {kinds:?}");
    }
    // One firmware mismatch, one alarm (nest 1's faulted meter).
    let nest1: Vec<String> = db
        .prepare("SELECT kind FROM alarms WHERE nest = 1")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    assert_eq!(nest1, ["security.firmware_mismatch"]);
    let alarms: Vec<String> = db
        .prepare("SELECT kind FROM alarms")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(|r| r.unwrap())
        .collect();
    for k in [
        "security.firmware_mismatch",
        "security.replay",
        "security.bad_certificate_request",
        "meter.unknown_lifecycle",
        "security.attestation_failed",
    ] {
        assert!(alarms.iter().any(|a| a == k), "no alarm {k}: {alarms:?}");
    }
    // The supervisor's dashboards say what the journal says: per nest, per step and in all.
    let client = cell.client().await;
    let sup = cell.login(&client, "super").await;
    let view = match client
        .execute(&sup, Command::ShiftView { hours: 1 })
        .await
        .unwrap()
    {
        station::Reply::Shift(v) => v,
        other => panic!("{other:?}"),
    };
    let sql = |q: &str| -> Vec<(i64, String, i64)> {
        db.prepare(q)
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .map(|r| r.unwrap())
            .collect()
    };
    let by_state = sql(
        "SELECT nest, state, count(*) FROM meters WHERE state IN ('done', 'failed') GROUP BY nest, state",
    );
    assert!(!by_state.is_empty());
    for (nest, state, n) in &by_state {
        let v = &view.nests[*nest as usize - 1];
        let shown = if state == "done" { v.done } else { v.failed };
        assert_eq!(i64::from(shown), *n, "nest {nest} {state}: {view:?}");
    }
    assert_eq!(view.nests.len(), 11);
    let by_step = sql(
        "SELECT nest, fail_step, count(*) FROM meters WHERE state = 'failed' GROUP BY nest, fail_step",
    );
    for (nest, step, n) in &by_step {
        let i = view
            .steps
            .iter()
            .position(|s| s == step)
            .unwrap_or_else(|| panic!("step {step}"));
        assert_eq!(
            i64::from(view.nests[*nest as usize - 1].failed_at[i]),
            *n,
            "nest {nest} at {step}"
        );
    }
    let failed: i64 = by_state
        .iter()
        .filter(|r| r.1 == "failed")
        .map(|r| r.2)
        .sum();
    assert_eq!(
        i64::from(view.causes.iter().map(|c| c.1).sum::<u32>()),
        failed
    );
    assert!(
        view.causes
            .iter()
            .any(|c| c.0 == "meter reported image hash"),
        "{:?}",
        view.causes
    );
    let done: i64 = by_state.iter().filter(|r| r.1 == "done").map(|r| r.2).sum();
    assert_eq!(
        i64::from(view.cycle.iter().map(|c| c.meters).sum::<u32>()),
        done
    );
    assert!(view.floor_ms.is_some_and(|f| f > 0), "{:?}", view.floor_ms);
    // An operator does not see the dashboards.
    let oper = cell.login(&client, "oper").await;
    assert!(
        client
            .execute(&oper, Command::ShiftView { hours: 1 })
            .await
            .is_err()
    );
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_meter_with_a_provisioned_uid_is_refused_and_alarmed() {
    // Two nests whose emulators make the same UIDs: every UID shows up twice. A slow line (the
    // firmware takes seconds) so that each UID is in both nests at once however busy the
    // machine is: the second nest meets it while the first provisions it.
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 4,
        seeds: vec![Some(77), Some(77)],
        emulator_numbers: vec![1, 1],
        baud: 115_200,
        firmware_kib: 48,
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    daemon.stop().await.unwrap();
    assert!(summary.batch_complete, "{summary}");
    let db = cell.db();
    let dup_uids: i64 = db
        .query_row("SELECT count(*) FROM (SELECT uid FROM meters WHERE state = 'done' GROUP BY uid HAVING count(*) > 1)", [], |r| r.get(0))
        .unwrap();
    assert_eq!(dup_uids, 0, "no UID is provisioned twice");
    let alarms: i64 = db
        .query_row(
            "SELECT count(*) FROM alarms WHERE kind = 'meter.duplicate_uid'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(alarms >= 1, "duplicates raise an alarm");
    let msg: String = db
        .query_row(
            "SELECT details FROM audit WHERE kind = 'meter.duplicate_uid' ORDER BY seq LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        msg.contains("duplicate") || msg.contains("another nest"),
        "{msg}"
    );
}

/// Tampers with the journal of a fresh cell and runs `station audit verify` (through the
/// daemon, started after the tampering) and `station audit verify --offline` on a copy.
async fn tampered(sql: &str) -> (i32, String) {
    let cell = Cell::new(CellOptions {
        nests: 1,
        open_batch: true,
        ..CellOptions::default()
    })
    .await;
    let db = cell.db();
    db.execute_batch(&format!("PRAGMA foreign_keys=OFF; {sql}"))
        .unwrap();
    drop(db);
    let daemon = cell.daemon().await;
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    daemon.stop().await.unwrap();
    // The auditor's copy says the same, without the daemon or the HSM.
    let copy = cell.path("copy.db");
    std::fs::copy(cell.path("station.db"), &copy).unwrap();
    let _ = std::fs::copy(cell.path("station.db-wal"), cell.path("copy.db-wal"));
    let root = cell.path("root-ca.pem");
    let (code2, out2, err2) = cell.run(
        None,
        &[
            "audit",
            "verify",
            "--offline",
            "--journal",
            copy.to_str().unwrap(),
            "--root",
            root.to_str().unwrap(),
        ],
    );
    assert_eq!(code2, code, "off-line: {out2}{err2}");
    let first = |o: &str| o.lines().find(|l| l.contains("FAILED")).map(str::to_string);
    assert_eq!(first(&out2), first(&out), "off-line: {out2}");
    (code, format!("{out}{err}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_modified_entry_is_found() {
    let (code, out) = tampered("UPDATE audit SET actor = 'mallory' WHERE seq = 5").await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("FAILED VERIFICATION at entry 5"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_deleted_entry_is_found() {
    let (code, out) = tampered("DELETE FROM audit WHERE seq = 7").await;
    assert_eq!(code, 2, "{out}");
    assert!(
        out.contains("at entry 7") && out.contains("missing"),
        "{out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reordered_entries_are_found() {
    let (code, out) = tampered("UPDATE audit SET seq = -1 WHERE seq = 4; UPDATE audit SET seq = 4 WHERE seq = 6; UPDATE audit SET seq = 6 WHERE seq = -1").await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("at entry 4"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncated_newest_entries_are_found_and_the_cell_freezes() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let db = cell.db();
    let last: i64 = db
        .query_row("SELECT max(seq) FROM audit", [], |r| r.get(0))
        .unwrap();
    db.execute_batch(&format!("DELETE FROM audit WHERE seq > {}", last - 3))
        .unwrap();
    drop(db);
    let daemon = cell.daemon().await;
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        out.contains(&format!("at entry {}", last - 2)) && out.contains("truncated"),
        "{out}"
    );
    // Nothing was appended over the gap, and nothing else runs until the log is dealt with.
    let after: i64 = cell
        .db()
        .query_row("SELECT max(seq) FROM audit", [], |r| r.get(0))
        .unwrap();
    assert_eq!(after, last - 3);
    let (code, _, err) = cell.run(Some("super"), &["batch", "list"]);
    assert_ne!(code, 0);
    assert!(err.contains("frozen"), "{err}");
    daemon.stop().await.unwrap();
}

fn sample_commands() -> Vec<Command> {
    vec![
        Command::StartLine,
        Command::StopLine,
        Command::EnableNest {
            nest: 1,
            enabled: true,
        },
        Command::ClearNest { nest: 1 },
        Command::OpenBatch(BatchSpec {
            work_order: "WO-NOPE".into(),
            model: "no-such-model".into(),
            firmware: "x".into(),
            customer: "x".into(),
            quantity: 1,
            serial_prefix: "X".into(),
            serial_first: 1,
            serial_last: 2,
        }),
        Command::CloseBatch { id: 9999 },
        Command::Rework { uid: "00".into() },
        Command::AckAlarm { id: 9999 },
        Command::ImportFirmware {
            name: "junk.bin".into(),
            image: vec![0; 64],
        },
        Command::ImportCustomer {
            name: "bad name!".into(),
            cert: vec![],
        },
        Command::AddUser {
            name: "bad name!".into(),
            role: Role::Operator,
            pin: zeroize::Zeroizing::new("1".into()),
        },
        Command::DisableUser {
            name: "nobody-here".into(),
        },
        Command::ResetPin {
            name: "nobody-here".into(),
            pin: zeroize::Zeroizing::new("123456".into()),
        },
        Command::ListUsers,
        Command::ListBatches,
        Command::BatchStatus { id: None },
        Command::ListFirmware,
        Command::ListCustomers,
        Command::AuditVerify,
        Command::AuditTail { n: 5 },
        Command::AuditSince { after: 0 },
        Command::AuditExport,
        Command::ListAlarms,
        Command::HsmInfo,
        Command::HsmCheck,
        Command::RecoverAudit {
            reason: "nothing is frozen here".into(),
        },
        Command::Export {
            batch: 9999,
            out_dir: std::env::temp_dir().join("e2e-never-written"),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_command_for_every_role_goes_through_the_permission_table() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let engine = cell.engine(false).await;
    let users = [
        ("oper", Role::Operator),
        ("super", Role::Supervisor),
        ("officer", Role::SecurityOfficer),
        ("audit", Role::Auditor),
    ];
    let mut refused = 0;
    for (user, role) in users {
        let s = cell.login_engine(&engine, user).await;
        for cmd in sample_commands() {
            let action: Action = cmd.action();
            let r = engine.execute(&s, cmd).await;
            let forbidden = matches!(r, Err(Error::Auth(AuthError::Forbidden { .. })));
            assert_eq!(
                forbidden,
                !auth::allowed(role, action),
                "{user} {action:?}: {r:?}"
            );
            if forbidden {
                refused += 1;
            }
        }
    }
    engine.shutdown().await.unwrap();
    let audited: i64 = cell
        .db()
        .query_row(
            "SELECT count(*) FROM audit WHERE kind = 'auth.forbidden'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(audited, refused, "every refusal is audited");
    assert!(refused > 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_pins_lock_out_and_idle_sessions_expire() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let engine = cell.engine(false).await;
    for i in 0..4 {
        match engine.login("oper", "000000").await {
            Err(Error::Auth(
                e @ AuthError::BadCredentials {
                    remaining: Some(r), ..
                },
            )) => {
                assert_eq!(r, 4 - i);
                assert_eq!(
                    e.to_string(),
                    "wrong user name or PIN",
                    "nothing more is said"
                );
            }
            other => panic!("attempt {i}: {other:?}"),
        }
    }
    // The attempt that locks the user out reads as any wrong PIN.
    assert!(matches!(
        engine.login("oper", "000000").await,
        Err(Error::Auth(AuthError::BadCredentials {
            locked_now: true,
            ..
        }))
    ));
    let right = cell.pins["oper"].clone();
    assert!(
        matches!(
            engine.login("oper", &right).await,
            Err(Error::Auth(AuthError::Locked { .. }))
        ),
        "locked even with the right PIN"
    );
    // Expiry: a session idle for longer than the limit is refused.
    let s = cell.login_engine(&engine, "super").await;
    assert!(engine.execute(&s, Command::ListBatches).await.is_ok());
    cell.db()
        .execute(
            "UPDATE sessions SET last_seen = last_seen - 16 * 60000 WHERE ended_at IS NULL",
            [],
        )
        .unwrap();
    assert!(matches!(
        engine.execute(&s, Command::ListBatches).await,
        Err(Error::Auth(AuthError::Expired))
    ));
    engine.shutdown().await.unwrap();
    let kinds = audit_kinds(&cell);
    // Four wrong PINs, then the right one refused while locked out; the fifth wrong one locked.
    assert_eq!(kinds.get("auth.failure"), Some(&5));
    assert_eq!(kinds.get("auth.lockout"), Some(&1));
    assert_eq!(kinds.get("auth.session_expired"), Some(&1));
    let alarm: i64 = cell
        .db()
        .query_row(
            "SELECT count(*) FROM alarms WHERE kind = 'auth.lockout'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(alarm, 1);
}

fn imgtool() -> std::path::PathBuf {
    std::env::var_os("IMGTOOL")
        .map(Into::into)
        .unwrap_or_else(|| "imgtool".into())
}

fn sign_with_imgtool(key: &std::path::Path, payload: &std::path::Path, out: &std::path::Path) {
    let st = std::process::Command::new(imgtool())
        .args(["sign", "--key"])
        .arg(key)
        .args([
            "--header-size",
            "0x200",
            "--pad-header",
            "--align",
            "8",
            "--version",
            "3.1.4",
            "--slot-size",
            "0x100000",
        ])
        .arg(payload)
        .arg(out)
        .status()
        .expect("imgtool (MCUboot, from PyPI; `cargo xtask test` installs it)");
    assert!(st.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firmware_signed_by_imgtool_is_accepted_and_anything_else_refused() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let payload = cell.path("app.bin");
    std::fs::write(
        &payload,
        meter_sim::firmware::firmware_like_payload(40_000, 0.7, 9),
    )
    .unwrap();
    let good = cell.path("signed.bin");
    sign_with_imgtool(&cell.path("pki/firmware-signing-key.pem"), &payload, &good);
    let (code, out, err) = cell.run(
        Some("officer"),
        &["firmware", "import", good.to_str().unwrap()],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("imported firmware 3.1.4"), "{out}");

    let mut bytes = std::fs::read(&good).unwrap();
    bytes[0x200 + 1234] ^= 0x10;
    let flipped = cell.path("flipped.bin");
    std::fs::write(&flipped, &bytes).unwrap();
    let (code, _, err) = cell.run(
        Some("officer"),
        &["firmware", "import", flipped.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(
        err.contains("image hash does not match its content"),
        "{err}"
    );

    let other_key = cell.path("other-key.pem");
    assert!(
        std::process::Command::new(imgtool())
            .args(["keygen", "-t", "ecdsa-p256", "-k"])
            .arg(&other_key)
            .status()
            .unwrap()
            .success()
    );
    let foreign = cell.path("foreign.bin");
    sign_with_imgtool(&other_key, &payload, &foreign);
    let (code, _, err) = cell.run(
        Some("officer"),
        &["firmware", "import", foreign.to_str().unwrap()],
    );
    assert_ne!(code, 0);
    assert!(err.contains("signed by a different key"), "{err}");

    // Each refusal is audited and alarmed.
    let rejected: i64 = cell
        .db()
        .query_row(
            "SELECT count(*) FROM alarms WHERE kind = 'firmware.rejected'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(rejected, 2);
    // And imgtool accepts what the cell's own tooling signs.
    let st = std::process::Command::new(imgtool())
        .args(["verify", "-k"])
        .arg(cell.path("pki/firmware-signing-key.pem"))
        .arg(cell.path("firmware.bin"))
        .status()
        .unwrap();
    assert!(st.success());
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batches_may_not_share_numbers_whatever_their_prefixes() {
    // System titles are the FLAG ID and the serial number without its prefix: two batches with
    // different prefixes and the same numbers would make the same system titles.
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 2,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let id = cell.batch_id.unwrap().to_string();
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let open = |prefix: &str, serials: &str, wo: &str| {
        cell.run(
            Some("super"),
            &[
                "batch",
                "open",
                "--work-order",
                wo,
                "--model",
                e2e::MODEL,
                "--firmware",
                &cell.firmware_sha,
                "--customer",
                "utility",
                "--quantity",
                "2",
                "--serials",
                serials,
                "--prefix",
                prefix,
            ],
        )
    };
    let (code, _, err) = open("OTHER", "1010-1030", "WO-OVERLAP");
    assert_ne!(code, 0);
    assert!(
        err.contains("overlap batch WO-E2E-1") && err.contains("system title"),
        "{err}"
    );
    let (code, out, err) = open("OTHER", "5000-5010", "WO-NEXT");
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_number_another_batch_used_stops_the_line_instead_of_blaming_each_meter() {
    // A journal from before batches were kept apart: a meter of another batch holds the system
    // title the open batch will draw next.
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 2,
        ..CellOptions::default()
    })
    .await;
    let mut title = *b"DMW\0\0\0\0\0";
    title[3..].copy_from_slice(&1000u64.to_be_bytes()[3..]);
    cell.db()
        .execute(
            "INSERT INTO meters (batch_id, uid, nest, state, serial, system_title, operator, started_at)
             VALUES (?1, 'feedbeef', 1, 'failed', 'OLD000001000', ?2, 'oper', 0)",
            rusqlite::params![cell.batch_id.unwrap(), hex::encode(title)],
        )
        .unwrap();
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        station::run::run_line(&client, &oper, false, true),
    )
    .await
    .unwrap()
    .unwrap();
    let why = summary.halted.clone().expect("the line stopped");
    assert!(
        why.contains("already used by another batch's meter"),
        "{why}"
    );
    let kinds = audit_kinds(&cell);
    assert!(
        !kinds.contains_key("meter.duplicate_uid"),
        "no meter is blamed: {kinds:?}"
    );
    assert!(kinds.contains_key("station.halted"), "{kinds:?}");
    drop(client);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meter_whose_new_key_was_certified_before_is_refused() {
    // Two meters with a broken random generator make the same key pair: the first is
    // certified, the second refused, however the two nests race.
    let cell = Cell::new(CellOptions {
        nests: 2,
        quantity: 2,
        key_agreement: false,
        faults: vec![(1, "broken-trng".into()), (2, "broken-trng".into())],
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    daemon.stop().await.unwrap();
    assert!(summary.batch_complete, "{summary}");
    let failed = failures_by_nest(&cell);
    let reasons: Vec<&String> = failed.values().flatten().collect();
    assert_eq!(reasons.len(), 1, "{failed:?}");
    assert!(reasons[0].contains("certified"), "{failed:?}");
    assert!(audit_kinds(&cell).contains_key("security.reused_key"));
    let db = cell.db();
    let dup: i64 = db
        .query_row(
            "SELECT count(*) FROM (SELECT key_sha256 FROM certificates WHERE key_sha256 IS NOT NULL GROUP BY key_sha256 HAVING count(*) > 1)",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(dup, 0);
    let alarm: i64 = db
        .query_row(
            "SELECT count(*) FROM alarms WHERE kind = 'security.reused_key'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(alarm, 1);

    // The same meter with both its slots: the same pair twice is refused at once.
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        faults: vec![(1, "broken-trng".into())],
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(300)).await;
    daemon.stop().await.unwrap();
    assert!(summary.batch_complete, "{summary}");
    let failed = failures_by_nest(&cell);
    assert!(
        failed
            .get(&1)
            .is_some_and(|v| v.len() == 1 && v[0].contains("same key pair for both slots")),
        "{failed:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_certificate_must_be_fit_to_receive_the_batch_key() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let dir = cell.path("customers");
    std::fs::create_dir_all(&dir).unwrap();
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    for (name, bits, exp) in [
        ("k3072", "3072", "65537"),
        ("k2048", "2048", "65537"),
        ("ke3", "3072", "3"),
    ] {
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            &format!("rsa_keygen_bits:{bits}"),
            "-pkeyopt",
            &format!("rsa_keygen_pubexp:{exp}"),
            "-out",
            &format!("{name}.pem"),
        ]);
    }
    let leaf = "basicConstraints=critical,CA:FALSE";
    let cert = |out: &str, key: &str, days: &str, exts: &[&str]| {
        let mut args = vec![
            "req",
            "-x509",
            "-key",
            key,
            "-subj",
            "/CN=Utility Key Import",
            "-days",
            days,
            "-out",
            out,
        ];
        for e in exts {
            args.extend(["-addext", e]);
        }
        openssl(&args);
    };
    cert(
        "good.pem",
        "k3072.pem",
        "365",
        &[leaf, "keyUsage=critical,keyEncipherment"],
    );
    cert(
        "weak.pem",
        "k2048.pem",
        "365",
        &[leaf, "keyUsage=critical,keyEncipherment"],
    );
    cert(
        "e3.pem",
        "ke3.pem",
        "365",
        &[leaf, "keyUsage=critical,keyEncipherment"],
    );
    cert(
        "ca.pem",
        "k3072.pem",
        "365",
        &[
            "basicConstraints=critical,CA:TRUE",
            "keyUsage=critical,keyCertSign,keyEncipherment",
        ],
    );
    cert(
        "sign-only.pem",
        "k3072.pem",
        "365",
        &[leaf, "keyUsage=critical,digitalSignature"],
    );
    openssl(&[
        "req",
        "-new",
        "-key",
        "k3072.pem",
        "-subj",
        "/CN=Utility Key Import",
        "-out",
        "u.csr",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,keyEncipherment\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "u.csr",
        "-signkey",
        "k3072.pem",
        "-days",
        "-1",
        "-extfile",
        "ext.cnf",
        "-out",
        "expired.pem",
    ]);
    let import = |name: &str, file: &str| {
        cell.run(
            Some("officer"),
            &["customer", "import", name, dir.join(file).to_str().unwrap()],
        )
    };
    let trust = |name: &str, file: &str| {
        cell.run(
            None,
            &[
                "hsm",
                "trust-customer",
                name,
                dir.join(file).to_str().unwrap(),
                "--so-pin-file",
                cell.path("hsm-so-pin").to_str().unwrap(),
            ],
        )
    };
    for (file, why) in [
        ("weak.pem", "has 2048 bits; at least 3072"),
        ("e3.pem", "only 65537"),
        ("ca.pem", "is a CA certificate"),
        ("sign-only.pem", "does not allow keyEncipherment"),
        ("expired.pem", "has expired"),
    ] {
        // Neither the token's security officer nor the cell's takes it.
        let (code, _, err) = trust("refused", file);
        assert_ne!(code, 0, "{file}");
        assert!(err.contains(why), "trust {file}: {err}");
        let (code, _, err) = import("refused", file);
        assert_ne!(code, 0, "{file}");
        assert!(err.contains(why), "{file}: {err}");
    }
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_key_the_token_security_officer_did_not_trust_is_never_wrapped_for() {
    // The batch transport key can be wrapped only under a CKA_TRUSTED key, which only the
    // token's security officer can make. Someone with the user PIN (the station's own session)
    // who puts a key of their own into the token under a customer's label gets no batch key.
    let cell = Cell::new(CellOptions {
        nests: 1,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let cert = std::fs::read(cell.path("utility.pem")).unwrap();
    let der = der::pem::decode_vec(&cert).unwrap().1;
    let import = |name: &str| {
        cell.run(
            Some("officer"),
            &[
                "customer",
                "import",
                name,
                cell.path("utility.pem").to_str().unwrap(),
            ],
        )
    };
    // 1. Not installed by the token's security officer: the cell's security officer cannot
    //    record the customer.
    let (code, _, err) = import("second");
    assert_ne!(code, 0);
    assert!(err.contains("holds no such key"), "{err}");
    assert!(err.contains("station hsm trust-customer second"), "{err}");

    // 2. A user session plants the certificate's own key under the label, untrusted (it
    //    cannot be made trusted: the token refuses CKA_TRUSTED outside an SO session).
    let token = hsm::testkit::TestToken::softhsm(&cell.token);
    // Creates the certificate's key as a token object labelled for `name` in a user session
    // (`extra` added); whether the token took it.
    let plant = |name: &str, extra: Vec<cryptoki::object::Attribute>| {
        use cryptoki::object::{Attribute, KeyType, ObjectClass};
        let key = hsm::so::rsa_public_of_certificate(&der).unwrap();
        let mut t = vec![
            Attribute::Class(ObjectClass::PUBLIC_KEY),
            Attribute::KeyType(KeyType::RSA),
            Attribute::Token(true),
            Attribute::Wrap(true),
            Attribute::Modulus(key.modulus),
            Attribute::PublicExponent(key.exponent),
            Attribute::AllowedMechanisms(vec![cryptoki::mechanism::MechanismType::RSA_PKCS_OAEP]),
            Attribute::Label(format!("customer-transport/{name}").into_bytes()),
        ];
        t.extend(extra);
        let hsm = token.open(1).unwrap();
        hsm.with_session(move |s| Ok(s.raw_session_for_tests().create_object(&t).is_ok()))
            .unwrap()
    };
    assert!(
        !plant("second", vec![cryptoki::object::Attribute::Trusted(true)]),
        "a user session must not be able to make a trusted key"
    );
    assert!(plant("second", vec![]));
    let (code, _, err) = import("second");
    assert_ne!(code, 0);
    assert!(err.contains("not marked trusted"), "{err}");

    // 3. The customer the token's SO approved opens batches; when its token object is
    //    swapped for an untrusted one after the import, the next batch is refused before any
    //    wrap, and no batch key is left behind.
    let so_pin = cell.path("hsm-so-pin");
    let officer_so = |args: &[&str]| {
        let mut a = vec!["hsm"];
        a.extend_from_slice(args);
        a.extend(["--so-pin-file", so_pin.to_str().unwrap()]);
        cell.run(None, &a)
    };
    let (code, out, err) = officer_so(&["customers"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("utility") && out.contains("trusted"), "{out}");
    // The fingerprint the officer reads out is the one OpenSSL computes from the certificate.
    let fp = e2e::sha256_of_pipeline(&format!(
        "openssl x509 -in '{}' -pubkey -noout | openssl pkey -pubin -outform der",
        cell.path("utility.pem").display()
    ));
    assert!(
        out.lines()
            .any(|l| l.starts_with("utility ") && l.ends_with(&fp)),
        "{out}"
    );
    assert!(
        out.contains("second") && out.contains("NOT TRUSTED"),
        "{out}"
    );
    let (code, _, err) = officer_so(&["untrust-customer", "utility"]);
    assert_eq!(code, 0, "{err}");
    assert!(plant("utility", vec![]));
    let (code, _, err) = cell.run(
        Some("super"),
        &[
            "batch",
            "open",
            "--work-order",
            "WO-SWAP",
            "--model",
            e2e::MODEL,
            "--firmware",
            &cell.firmware_sha,
            "--customer",
            "utility",
            "--quantity",
            "1",
            "--prefix",
            "SWP",
            "--serials",
            "1-20",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("not marked trusted"), "{err}");
    let keys: i64 = cell
        .db()
        .query_row("SELECT COUNT(*) FROM batches", [], |r| r.get(0))
        .unwrap();
    assert_eq!(keys, 0, "no batch is recorded");
    let hsm = token.open(1).unwrap();
    let left = hsm
        .run(|s| s.find_key(hsm::KeyKind::Aes(32), "batch-transport/WO-SWAP"))
        .await
        .unwrap();
    assert!(left.is_none(), "the refused batch's key is destroyed");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn firmware_changed_in_the_journal_is_caught_before_any_meter_is_flashed() {
    // Someone with the journal swaps the batch's image for another release the firmware signer
    // signed (an older one, say): every meter would verify it and run it.
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        firmware_kib: 8,
        ..CellOptions::default()
    })
    .await;
    let key_pem = std::fs::read_to_string(cell.path("pki/firmware-signing-key.pem")).unwrap();
    let key = <p256::ecdsa::SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&key_pem)
        .unwrap();
    let other = meter_sim::firmware::sign_image(
        &meter_sim::firmware::firmware_like_payload(8 * 1024, 0.6, 99),
        line_protocol::image::ImageVersion {
            major: 1,
            minor: 9,
            revision: 0,
            build: 0,
        },
        0x200,
        &key,
    );
    cell.db()
        .execute("UPDATE firmware SET image = ?1", [other])
        .unwrap();
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        station::run::run_line(&client, &oper, false, true),
    )
    .await
    .unwrap()
    .unwrap();
    let why = summary.halted.clone().expect("the line stopped");
    assert!(why.contains("but the batch pinned"), "{why}");
    drop(client);
    daemon.stop().await.unwrap();
    // No meter got an image, and none was sealed.
    let db = cell.db();
    let sealed: i64 = db
        .query_row(
            "SELECT count(*) FROM meters WHERE state IN ('flashed', 'sealed', 'done')",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(sealed, 0);
    for entry in std::fs::read_dir(&cell.meters_dir).unwrap().flatten() {
        if entry.path().is_dir() {
            assert!(
                !entry.path().join("image.bin").exists(),
                "{}",
                entry.path().display()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_older_copy_of_the_journal_put_back_freezes_the_cell_until_a_security_officer_resumes_it()
 {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    // A saved copy of the journal, consistent in itself: its own signed head matches.
    let daemon = cell.daemon().await;
    daemon.stop().await.unwrap();
    let backup = cell.path("backup");
    std::fs::create_dir_all(&backup).unwrap();
    for f in ["station.db", "station.db-wal"] {
        if cell.path(f).exists() {
            std::fs::copy(cell.path(f), backup.join(f)).unwrap();
        }
    }
    // The cell goes on, and records more.
    let daemon = cell.daemon().await;
    let (code, out, err) = cell.run(Some("super"), &["batch", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
    // The copy is put back, cutting those entries off.
    for f in ["station.db", "station.db-wal", "station.db-shm"] {
        let _ = std::fs::remove_file(cell.path(f));
        if backup.join(f).exists() {
            std::fs::copy(backup.join(f), cell.path(f)).unwrap();
        }
    }
    let daemon = cell.daemon().await;
    let (code, _, err) = cell.run(Some("super"), &["batch", "list"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("an older copy of the journal was put back"),
        "{err}"
    );
    // Only a security officer resumes it, with a reason that goes into the log.
    let (code, _, err) = cell.run(
        Some("super"),
        &[
            "audit",
            "recover",
            "--reason",
            "restored from the backup of last night",
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("may not resume a frozen audit log"), "{err}");
    let (code, out, err) = cell.run(
        Some("officer"),
        &[
            "audit",
            "recover",
            "--reason",
            "restored from the backup of last night",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("resumed"), "{out}");
    let (code, out, err) = cell.run(Some("super"), &["batch", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
    let details: String = cell
        .db()
        .query_row(
            "SELECT details FROM audit WHERE kind = 'audit.recovered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        details.contains("older copy") && details.contains("last night"),
        "{details}"
    );
    let alarm: i64 = cell
        .db()
        .query_row(
            "SELECT count(*) FROM alarms WHERE kind = 'audit.recovered'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(alarm, 1);
    // The resumed log starts again cleanly: the next start is not frozen.
    let daemon = cell.daemon().await;
    let (code, out, err) = cell.run(Some("audit"), &["audit", "verify"]);
    assert_eq!(code, 0, "{out}{err}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pinned_anchor_changed_in_the_journal_halts_the_line_before_any_meter() {
    // Someone with the journal file puts a certificate of their own in place of the batch's
    // pinned utility anchor (the triggers refuse it; they drop the triggers first).
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        ..CellOptions::default()
    })
    .await;
    let db = cell.db();
    let refused = db.execute(
        "UPDATE batch_anchors SET der = x'00' WHERE position = 2",
        [],
    );
    assert!(
        refused.is_err(),
        "the journal refuses to change a pinned anchor"
    );
    assert!(db.execute("DELETE FROM batch_anchors", []).is_err());
    let rogue = cell.path("pki/provisioning-root.pem");
    let der = der::pem::decode_vec(&std::fs::read(rogue).unwrap())
        .unwrap()
        .1;
    let sha = hex::encode(sha2::Digest::finalize(sha2::Digest::chain_update(
        <sha2::Sha256 as sha2::Digest>::new(),
        &der,
    )));
    db.execute_batch("DROP TRIGGER batch_anchors_never_change")
        .unwrap();
    db.execute(
        "UPDATE batch_anchors SET der = ?1, sha256 = ?2 WHERE position = 2",
        rusqlite::params![der, sha],
    )
    .unwrap();
    drop(db);
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(120)).await;
    let halted = summary.halted.clone().unwrap_or_default();
    assert!(
        halted.contains("are not those its audit entry recorded"),
        "{summary}"
    );
    assert_eq!(summary.done + summary.failed, 0, "{summary}");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_firmware_anchor_swapped_into_the_token_stops_the_cell_at_start() {
    // Someone with the HSM user PIN replaces the firmware-verification certificate with one for
    // a key of their own: every meter would then accept their firmware. The cell checks its
    // anchors against the manufacturer root when it starts, and refuses.
    let cell = Cell::new(CellOptions {
        nests: 1,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    e2e::rogue_certificate(
        &cell.path("rogue-fw.der"),
        "/O=Demo Meter Works/CN=Demo Firmware Signing",
        &[
            "basicConstraints=critical,CA:FALSE",
            "extendedKeyUsage=codeSigning",
        ],
    );
    let rogue = std::fs::read(cell.path("rogue-fw.der")).unwrap();
    // The root issued the manifest signer's certificate: right issuer, wrong role.
    let wrong_role =
        der::pem::decode_vec(&std::fs::read(cell.path("pki/manifest-signer.pem")).unwrap())
            .unwrap()
            .1;
    let token = hsm::testkit::TestToken::softhsm(&cell.token);
    for (cert, why) in [
        (rogue, "is not issued by the manufacturer root"),
        (wrong_role, "id-kp-codeSigning"),
    ] {
        replace_token_certificate(&token, "firmware-verification", 7, &cert);
        let cfg = station::config::Config::load(&cell.config).unwrap();
        let opened = station::Engine::open(
            cfg,
            station::engine::OpenOptions {
                source: "test".into(),
                nests: false,
            },
        )
        .await;
        let e = match opened {
            Ok(_) => panic!("the cell started with a firmware anchor that is not the root's"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("do not chain to the manufacturer root"), "{e}");
        assert!(e.contains(why), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_seal_answer_lost_on_the_line_does_not_scrap_a_sealed_meter() {
    // The meter seals, its SEAL_RSP is lost; the station's retry must get the same answer, not
    // LOCKED (which scrapped a sealed meter holding valid keys).
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        faults: vec![(1, "lose-response:seal".into())],
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(120)).await;
    daemon.stop().await.unwrap();
    assert!(summary.batch_complete, "{summary}");
    assert_eq!((summary.done, summary.failed), (1, 0), "{summary}");
    assert_eq!(failures_by_nest(&cell), BTreeMap::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_meter_that_seals_with_its_debug_port_open_is_not_recorded_done() {
    // The model requires every interface disabled; the first meter leaves its debug port
    // enabled (and says so in SEAL_RSP and its receipt).
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        faults: vec![(1, "debug-open".into())],
        ..CellOptions::default()
    })
    .await;
    let (daemon, summary) = run_batch(&cell, Duration::from_secs(120)).await;
    daemon.stop().await.unwrap();
    assert!(summary.batch_complete, "{summary}");
    assert_eq!((summary.done, summary.failed), (1, 1), "{summary}");
    let failed = failures_by_nest(&cell);
    assert!(
        failed.get(&1).is_some_and(|v| v.len() == 1
            && v[0].contains("the meter sealed with interfaces still enabled: debug")),
        "{failed:?}"
    );
    // The batch fixed the mask when it opened, in its audit entry.
    let audited: String = cell
        .db()
        .query_row(
            "SELECT details FROM audit WHERE kind = 'batch.opened'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        audited.contains("\"disable_names\":\"provisioning, debug, optical\""),
        "{audited}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_signer_key_swapped_in_the_token_is_refused_at_start() {
    // Someone with the HSM user PIN replaces the audit signer's key pair with one of their own
    // (to sign a rewritten log), keeping the certificate; or puts another certificate the root
    // issued (the manifest signer's) under the audit signer's label. The cell refuses to start:
    // what it signs with must be what the root certified for the role.
    let cell = Cell::new(CellOptions {
        nests: 1,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    let token = hsm::testkit::TestToken::softhsm(&cell.token);
    let open = || async {
        let cfg = station::config::Config::load(&cell.config).unwrap();
        match station::Engine::open(
            cfg,
            station::engine::OpenOptions {
                source: "test".into(),
                nests: false,
            },
        )
        .await
        {
            Ok(_) => panic!("the cell started with a signer the root did not certify"),
            Err(e) => e.to_string(),
        }
    };
    // 1. Another certificate the root issued, under the audit signer's label.
    let manifest_cert =
        der::pem::decode_vec(&std::fs::read(cell.path("pki/manifest-signer.pem")).unwrap())
            .unwrap()
            .1;
    let original = der::pem::decode_vec(&std::fs::read(cell.path("pki/audit-signer.pem")).unwrap())
        .unwrap()
        .1;
    let swap_cert = |der: Vec<u8>| {
        replace_token_certificate(&token, "audit-signer", 9, &der);
    };
    swap_cert(manifest_cert);
    let e = open().await;
    assert!(
        e.contains("does not stand for the manufacturer root"),
        "{e}"
    );
    assert!(e.contains("documentSigning"), "{e}");
    swap_cert(original);

    // 2. A key pair of their own under the audit signer's label, the certificate kept.
    let hsm = token.open(1).unwrap();
    hsm.with_session(|s| {
        use cryptoki::object::{Attribute, ObjectClass};
        let raw = s.raw_session_for_tests();
        for class in [ObjectClass::PRIVATE_KEY, ObjectClass::PUBLIC_KEY] {
            for h in raw
                .find_objects(&[
                    Attribute::Class(class),
                    Attribute::Label(b"audit-signer".to_vec()),
                ])
                .unwrap()
            {
                raw.destroy_object(h).unwrap();
            }
        }
        s.generate_ec_keypair(
            hsm::KeyRole::AuditSigner,
            hsm::Curve::P256,
            Some("audit-signer"),
        )?;
        Ok(())
    })
    .unwrap();
    drop(hsm);
    let e = open().await;
    assert!(
        e.contains("does not stand for the manufacturer root"),
        "{e}"
    );
    assert!(e.contains("is not the audit-signer key"), "{e}");
}

/// The HSM self-test on both tokens: every check runs and passes, names what it compared,
/// and the start of the cell records it in the audit log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hsm_self_test_passes_on_both_tokens_and_reports_every_check() {
    use station::engine::hsm_check;
    let soft = hsm::testkit::TestToken::new("selftest").unwrap();
    let kry = hsm::testkit::TestToken::kryoptic("selftest").unwrap();
    let mut kry_config = kry.config(2);
    kry_config.trusted_wrap = false;
    for (name, hsm) in [
        ("softhsm", soft.open(2).unwrap()),
        ("kryoptic", hsm::Hsm::open(&kry_config).unwrap()),
    ] {
        // The demo hierarchy gives it every signing key of a cell.
        let pem = tempfile::tempdir().unwrap();
        let h = hsm.clone();
        let dir = pem.path().to_path_buf();
        tokio::task::spawn_blocking(move || hsm::pki::init_dev(&h, &dir))
            .await
            .unwrap()
            .unwrap();
        let report = tokio::task::spawn_blocking(move || hsm_check::run(&hsm))
            .await
            .unwrap();
        assert!(report.passed(), "{name}:\n{report}");
        let checks: Vec<&str> = report.findings.iter().map(|f| f.check).collect();
        assert_eq!(
            checks,
            [
                "token",
                "token flags",
                "signing keys",
                "key transport",
                "rsa-oaep"
            ],
            "{name}"
        );
        let text = report.to_string();
        assert!(
            text.contains("ECDH and the KTK derivation match the meter's; AES-KW and AES-KWP"),
            "{name}: {text}"
        );
        let oaep = match name {
            "softhsm" => "CKM_RSA_PKCS_OAEP(SHA-1, MGF1-SHA-1, empty label) opens in software",
            _ => {
                "CKM_RSA_PKCS_OAEP(SHA-256, MGF1-SHA-256, the work order as label) opens in software"
            }
        };
        assert!(text.contains(oaep), "{name}: {text}");
        assert!(
            text.contains("device-ca (p-256), manifest-signer (p-256), audit-signer (p-256)"),
            "{name}: {text}"
        );
        assert!(text.contains("\n5 checks, 0 failed, in "), "{text}");
    }

    // A cell records it at start; `hsm check` runs it on demand.
    let cell = Cell::new(CellOptions::default()).await;
    let n: i64 = cell
        .db()
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE kind = 'hsm.self_test' AND json_extract(details, '$.passed') = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(n >= 1);
}

#[test]
fn a_failed_self_test_finding_is_shown_with_the_others() {
    use station::engine::hsm_check::{Finding, Report};
    let report = Report {
        findings: vec![
            Finding {
                check: "ecdsa p-256",
                ok: true,
                detail: "verifies".into(),
            },
            Finding {
                check: "key transport",
                ok: false,
                detail: "the meter cannot unwrap".into(),
            },
            Finding {
                check: "rsa-oaep",
                ok: false,
                detail: "no usable RSA-OAEP".into(),
            },
        ],
        elapsed: Duration::from_millis(12),
    };
    assert!(!report.passed());
    assert_eq!(
        report.to_string(),
        "ok    ecdsa p-256: verifies\nFAIL  key transport: the meter cannot unwrap\nFAIL  rsa-oaep: no usable RSA-OAEP\n3 checks, 2 failed, in 12 ms"
    );
}

/// `openssl ARGS` in `dir`.
fn openssl_in(dir: &std::path::Path, args: &[&str]) {
    e2e::openssl(args, dir);
}

/// The offline root `ca` (`<ca>.pem`, `<ca>.key` in `dir`) certifies the request `csr` with
/// the extensions in the file `ext`, into `out`.
fn root_issues(dir: &std::path::Path, ca: &str, csr: &str, ext: &str, out: &str) {
    let (cert, key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl_in(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            csr,
            "-CA",
            &cert,
            "-CAkey",
            &key,
            "-CAcreateserial",
            "-days",
            "365",
            "-extfile",
            ext,
            "-out",
            out,
        ],
    );
}

/// The production set-up path on a token that is not SoftHSM, with OpenSSL as the offline
/// root: every role's key generated in the token with its request written, the certificates the
/// root issued imported, the manufacturer root and the firmware-verification certificate
/// stored — with the station's own commands only — and the cell then starts, its self-test
/// passing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cell_is_set_up_on_kryoptic_with_its_own_commands_and_an_offline_root() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let token = hsm::testkit::TestToken::kryoptic("prod").unwrap();
    station::demo::write_secret(&d.join("hsm-pin"), hsm::testkit::USER_PIN).unwrap();
    let config = d.join("station.toml");
    std::fs::write(
        &config,
        format!(
            "station_id = \"prod-cell\"\ndatabase = \"station.db\"\n\n[manufacturer]\nname = \"Meter Works\"\nflag_id = \"MWK\"\n\n\
             [hsm]\nmodule = \"{}\"\ntoken = \"{}\"\npin = {{ file = \"hsm-pin\" }}\nkryoptic_conf = \"{}\"\ntrusted_wrap = false\npool_size = 2\n",
            token.module.display(),
            token.label,
            hsm::testkit::kryoptic_conf().unwrap().display()
        ),
    )
    .unwrap();
    let station = |args: &[&str]| -> (bool, String) {
        let out = std::process::Command::new(e2e::station_exe())
            .arg("--config")
            .arg(&config)
            .args(args)
            .current_dir(d)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };

    let import_local = |role: &str, cert: &str| {
        station(&["pki", "import", "--local", "--role", role, "--cert", cert])
    };

    // The offline roots (manufacturer; provisioning, which the meters' bootloaders trust).
    for root in ["root", "prov-root"] {
        openssl_in(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{root}.key"),
                "-out",
                &format!("{root}.pem"),
                "-subj",
                &format!("/O=Meter Works/CN={root}"),
                "-days",
                "3650",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
    }
    let leaf = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n";
    let roles = [
        (
            "device-ca",
            "root",
            "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
                .to_string(),
        ),
        (
            "manifest-signer",
            "root",
            format!("{leaf}extendedKeyUsage=1.3.6.1.5.5.7.3.36\n"),
        ),
        ("audit-signer", "root", leaf.to_string()),
        ("station", "prov-root", leaf.to_string()),
    ];

    // Anchors: the firmware certificate needs the root in the token first.
    openssl_in(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "fw.key",
        ],
    );
    openssl_in(
        d,
        &[
            "req",
            "-new",
            "-key",
            "fw.key",
            "-subj",
            "/O=Meter Works/CN=Firmware Signer",
            "-out",
            "fw.csr",
        ],
    );
    std::fs::write(
        d.join("fw.cnf"),
        format!("{leaf}extendedKeyUsage=codeSigning\n"),
    )
    .unwrap();
    root_issues(d, "root", "fw.csr", "fw.cnf", "fw.pem");
    let (ok, out) = import_local("firmware-verification", "fw.pem");
    assert!(
        !ok && out.contains("holds no manufacturer root yet"),
        "{out}"
    );
    let (ok, out) = station(&[
        "pki",
        "import",
        "--role",
        "manufacturer-root",
        "--cert",
        "root.pem",
    ]);
    assert!(!ok && out.contains("add --local"), "{out}");
    let (ok, out) = import_local("manufacturer-root", "root.pem");
    assert!(ok, "{out}");
    let (ok, out) = import_local("manufacturer-root", "prov-root.pem");
    assert!(!ok && out.contains("an anchor is never replaced"), "{out}");
    // A firmware certificate without the code-signing role is refused.
    std::fs::write(d.join("leaf.cnf"), leaf).unwrap();
    root_issues(d, "root", "fw.csr", "leaf.cnf", "fw-plain.pem");
    let (ok, out) = import_local("firmware-verification", "fw-plain.pem");
    assert!(!ok && out.contains("id-kp-codeSigning"), "{out}");
    let (ok, out) = import_local("firmware-verification", "fw.pem");
    assert!(ok, "{out}");

    // The audit signer's key pair made with the HSM's own tools (OpenSC's pkcs11-tool), as a
    // factory with a vendor key ceremony would, and adopted: first one that may be extracted
    // (refused, by attribute), then one as the policy wants.
    // pkcs11-tool, logged in to the cell's token.
    let p11 = |args: &[&str]| {
        let out = std::process::Command::new("pkcs11-tool")
            .arg("--module")
            .arg(&token.module)
            .args(["--token-label", &token.label, "--login", "--pin"])
            .arg(hsm::testkit::USER_PIN)
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let keypair = |extra: &[&str]| {
        let mut args = vec![
            "--keypairgen",
            "--key-type",
            "EC:prime256v1",
            "--label",
            "audit-signer",
            "--id",
            "a1",
            "--usage-sign",
            "--sensitive",
            "--private",
        ];
        args.extend_from_slice(extra);
        p11(&args);
    };
    let adopt = || {
        station(&[
            "pki",
            "csr",
            "--local",
            "--adopt",
            "--role",
            "audit-signer",
            "--cn",
            "Line 1 audit",
            "--out",
            "audit-signer.csr",
        ])
        .1
    };
    keypair(&["--extractable"]);
    let out = adopt();
    assert!(
        out.contains("the token did not keep the key policy on adopt")
            && out.contains("CKA_EXTRACTABLE is true, the policy says false"),
        "{out}"
    );
    for class in ["privkey", "pubkey"] {
        p11(&[
            "--delete-object",
            "--type",
            class,
            "--label",
            "audit-signer",
        ]);
    }
    keypair(&[]);
    let out = adopt();
    assert!(out.contains("certificate request"), "{out}");

    // Every role: a key in the token (the audit signer's adopted above), its request, the
    // root's certificate imported.
    for (role, root, ext) in &roles {
        if *role != "audit-signer" {
            let (ok, out) = station(&[
                "pki",
                "csr",
                "--local",
                "--role",
                role,
                "--cn",
                &format!("Line 1 {role}"),
                "--out",
                &format!("{role}.csr"),
            ]);
            assert!(ok, "{role}: {out}");
        }
        std::fs::write(d.join(format!("{role}.cnf")), ext).unwrap();
        root_issues(
            d,
            root,
            &format!("{role}.csr"),
            &format!("{role}.cnf"),
            &format!("{role}.pem"),
        );
        let (ok, out) = station(&[
            "pki",
            "import",
            "--local",
            "--role",
            role,
            "--cert",
            &format!("{role}.pem"),
            "--chain",
            &format!("{root}.pem"),
        ]);
        assert!(ok, "{role}: {out}");
    }

    // The cell starts on it: anchors chained to the root, signers checked, the self-test passed.
    let cfg = station::config::Config::load(&config).unwrap();
    let engine = station::Engine::open(
        cfg,
        station::OpenOptions {
            source: "test".into(),
            nests: false,
        },
    )
    .await
    .unwrap();
    engine.shutdown().await.unwrap();
    let db = rusqlite::Connection::open(d.join("station.db")).unwrap();
    let passed: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM audit WHERE kind = 'hsm.self_test' AND json_extract(details, '$.passed') = 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(passed, 1);
}

/// `station demo --token kryoptic`: the whole demo — PKI, a batch on emulated meters, the export
/// and the utility's verification, the audit log verified off-line — on the second token.
#[test]
fn the_demo_runs_a_whole_batch_on_kryoptic() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let run = std::process::Command::new(e2e::station_exe())
        .args([
            "demo", "--token", "kryoptic", "--meters", "3", "--nests", "2", "--plain",
        ])
        .args(["--firmware-kib", "16", "--insert-delay-ms", "20", "--out"])
        .arg(&out)
        .env("KRYOPTIC_MODULE", hsm::testkit::kryoptic_module().unwrap())
        .env_remove("KRYOPTIC_CONF")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&run.stdout),
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(run.status.success(), "{text}");
    for line in [
        "HSM: Kryoptic token",
        "meters done: 3   failed: 0",
        "utility side: manifest VERIFIED",
        "audit log verified off-line",
    ] {
        assert!(text.contains(line), "{line}: {text}");
    }
    let config = std::fs::read_to_string(out.join("station.toml")).unwrap();
    assert!(config.contains("trusted_wrap = false"), "{config}");
}

/// Replaces the certificate labelled `label` in `token` with `der` (id `id` repeated), behind
/// the station's back: what an operator with the token's user PIN could do.
fn replace_token_certificate(token: &hsm::testkit::TestToken, label: &str, id: u8, der: &[u8]) {
    let hsm = token.open(1).unwrap();
    let (label, der) = (label.to_owned(), der.to_vec());
    hsm.with_session(move |s| {
        use cryptoki::object::{Attribute, ObjectClass};
        let raw = s.raw_session_for_tests();
        for h in raw
            .find_objects(&[
                Attribute::Class(ObjectClass::CERTIFICATE),
                Attribute::Label(label.as_bytes().to_vec()),
            ])
            .unwrap()
        {
            raw.destroy_object(h).unwrap();
        }
        s.import_certificate(&label, &[id; 20], &der, true)?;
        Ok(())
    })
    .unwrap();
}
