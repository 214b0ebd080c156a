//! `stationd` as the one trusted service of a cell, tried as an operator with a shell, a second
//! process, a copy of the journal, a remote console and a rogue board would: one daemon per
//! journal; every call of the API allowed or refused exactly as the permission table says, with
//! every refusal audited; nothing but the log-in without a session; no PIN in a copied journal;
//! remote consoles only with a console certificate of this cell; sessions bound to the peer that
//! opened them; PKI changes through the daemon only.

#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a failure is a test failure

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use e2e::{Cell, CellOptions, openssl};
use station::api::client::{Address, Client, TlsClient};
use station::api::convert::Update;
use station::api::pb;
use station::api::pb::station_client::StationClient;
use station::auth::{self, Action, Role};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

fn count(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

fn sha(p: &Path) -> Vec<u8> {
    line_protocol::crypto::sha256(&std::fs::read(p).unwrap_or_default()).to_vec()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

// ----- one daemon per journal ----------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_stationd_on_the_same_journal_refuses_to_start_and_changes_nothing() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let first = tokio::task::block_in_place(|| cell.spawn_stationd());
    // An idle daemon writes nothing: what is on disk now is what the second one must leave.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let files = ["station.db", "station.db-wal", "stationd.sock"];
    let before: Vec<Vec<u8>> = files.iter().map(|f| sha(&cell.path(f))).collect();
    let out = std::process::Command::new(e2e::stationd_exe())
        .arg("--config")
        .arg(&cell.config)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "in use by another station process (pid {})",
            first.id()
        )),
        "the refusal names the holder: {err}"
    );
    let after: Vec<Vec<u8>> = files.iter().map(|f| sha(&cell.path(f))).collect();
    assert_eq!(before, after, "the refused daemon changed nothing");
    // The first one still serves.
    let (code, out, err) = cell.run(Some("super"), &["batch", "list"]);
    assert_eq!(code, 0, "{out}{err}");
    e2e::stop_stationd(first);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_status_during_a_running_batch_changes_nothing() {
    let quantity = 8;
    let cell = Cell::new(CellOptions {
        nests: 4,
        quantity,
        firmware_kib: 16,
        ..CellOptions::default()
    })
    .await;
    let daemon = tokio::task::block_in_place(|| cell.spawn_stationd());
    let mut run = cell
        .station(Some("oper"))
        .args(["run", "--plain"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Another terminal asks for the batch again and again while meters are in flight.
    let mut asked = 0;
    let mut seen_in_flight = false;
    let t0 = Instant::now();
    while run.try_wait().unwrap().is_none() {
        assert!(
            t0.elapsed() < Duration::from_secs(300),
            "the batch did not finish"
        );
        let (code, out, err) = cell.run(Some("super"), &["--json", "batch", "status"]);
        assert_eq!(code, 0, "{out}{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        seen_in_flight |= v["Batch"]["in_flight"].as_i64().unwrap_or(0) > 0;
        asked += 1;
    }
    let out = run.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        asked >= 3 && seen_in_flight,
        "asked {asked} times, in flight seen: {seen_in_flight}"
    );
    let db = cell.db();
    e2e::assert_journal_consistent(&db, quantity);
    assert_eq!(
        count(&db, "SELECT count(*) FROM meters WHERE state = 'failed'"),
        0,
        "no meter was failed by the other terminal"
    );
    // The batch closes, exports and verifies as the utility would.
    let id = cell.batch_id.unwrap().to_string();
    let (code, out, err) = cell.run(Some("super"), &["batch", "close", &id]);
    assert_eq!(code, 0, "{out}{err}");
    let dir = cell.path("export");
    let (code, out, err) = cell.run(
        Some("officer"),
        &["export", "--batch", &id, "--out", s(&dir)],
    );
    assert_eq!(code, 0, "{out}{err}");
    let root = cell.path("root-ca.pem");
    let (code, out, err) = cell.run(
        None,
        &[
            "manifest",
            "verify",
            s(&dir.join("manifest.p7m")),
            "--root",
            s(&root),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("VERIFIED"), "{out}");
    e2e::stop_stationd(daemon);
}

// ----- every call, every role ----------------------------------------------------------------

/// Every call of the API but Login and Bootstrap, with the permission each needs (`None`: any
/// session).
const CALLS: &[(&str, Option<Action>)] = &[
    ("Logout", None),
    ("Snapshot", Some(Action::ViewLine)),
    ("Events", Some(Action::ViewLine)),
    ("StartLine", Some(Action::RunLine)),
    ("StopLine", Some(Action::RunLine)),
    ("EnableNest", Some(Action::RunLine)),
    ("ClearNest", Some(Action::ClearNest)),
    ("OpenBatch", Some(Action::OpenBatch)),
    ("CloseBatch", Some(Action::CloseBatch)),
    ("ListBatches", Some(Action::ViewLine)),
    ("BatchStatus", Some(Action::ViewLine)),
    ("Rework", Some(Action::Rework)),
    ("ReprintLabel", Some(Action::ReprintLabel)),
    ("ExportManifest", Some(Action::ExportManifest)),
    ("FetchExport", Some(Action::ExportManifest)),
    ("ListAlarms", Some(Action::ViewLine)),
    ("AckAlarm", Some(Action::AckAlarm)),
    ("FleetView", Some(Action::ViewFleet)),
    ("ShiftView", Some(Action::ViewShift)),
    ("ImportFirmware", Some(Action::ImportFirmware)),
    ("ListFirmware", Some(Action::ViewLine)),
    ("ImportCustomer", Some(Action::ImportCustomer)),
    ("ListCustomers", Some(Action::ViewLine)),
    ("AddUser", Some(Action::ManageUsers)),
    ("DisableUser", Some(Action::ManageUsers)),
    ("ResetPin", Some(Action::ManageUsers)),
    ("ListUsers", Some(Action::ManageUsers)),
    ("AuditVerify", Some(Action::VerifyAudit)),
    ("AuditTail", Some(Action::ViewAudit)),
    ("AuditSince", Some(Action::ViewAudit)),
    ("AuditExport", Some(Action::ExportAudit)),
    ("AuditRecover", Some(Action::RecoverAudit)),
    ("HsmInfo", Some(Action::ViewHsm)),
    ("HsmCheck", Some(Action::ViewHsm)),
    ("PkiCsr", Some(Action::ManagePki)),
    ("PkiImport", Some(Action::ManagePki)),
    ("IssueTlsCertificate", Some(Action::ManagePki)),
];

fn with<T>(m: T, token: Option<&str>) -> Request<T> {
    let mut r = Request::new(m);
    if let Some(t) = token {
        r.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

/// A P-256 public key as a SubjectPublicKeyInfo.
fn some_spki() -> Vec<u8> {
    use p256::elliptic_curve::Generate;
    use p256::pkcs8::EncodePublicKey;
    let k = p256::SecretKey::generate_from_rng(&mut line_protocol::io::system_rng());
    k.public_key()
        .to_public_key_der()
        .unwrap()
        .as_bytes()
        .to_vec()
}

/// Makes the call `name` with harmless arguments (nothing a refused call could have done, and
/// nothing an allowed one changes for the next role: unknown ids, bad names, a batch of a model
/// the cell does not have). Returns the call's status.
async fn call(
    c: &mut StationClient<Channel>,
    name: &str,
    token: Option<&str>,
) -> Result<(), Status> {
    let e = || pb::Empty {};
    match name {
        "Logout" => c.logout(with(e(), token)).await.map(drop),
        "Snapshot" => c.snapshot(with(e(), token)).await.map(drop),
        "Events" => c.events(with(e(), token)).await.map(drop),
        "StartLine" => c.start_line(with(e(), token)).await.map(drop),
        "StopLine" => c.stop_line(with(e(), token)).await.map(drop),
        "EnableNest" => c
            .enable_nest(with(
                pb::EnableNestRequest {
                    nest: 1,
                    enabled: true,
                },
                token,
            ))
            .await
            .map(drop),
        "ClearNest" => c
            .clear_nest(with(pb::NestRequest { nest: 1 }, token))
            .await
            .map(drop),
        "OpenBatch" => c
            .open_batch(with(
                pb::BatchSpec {
                    work_order: "WO-NOPE".into(),
                    model: "no-such-model".into(),
                    firmware: "x".into(),
                    customer: "x".into(),
                    quantity: 1,
                    serial_prefix: "X".into(),
                    serial_first: 1,
                    serial_last: 2,
                },
                token,
            ))
            .await
            .map(drop),
        "CloseBatch" => c
            .close_batch(with(pb::BatchRequest { id: 9999 }, token))
            .await
            .map(drop),
        "ListBatches" => c.list_batches(with(e(), token)).await.map(drop),
        "BatchStatus" => c
            .batch_status(with(pb::BatchQuery { id: Some(9999) }, token))
            .await
            .map(drop),
        "Rework" => c
            .rework(with(pb::ReworkRequest { uid: "00".into() }, token))
            .await
            .map(drop),
        "ReprintLabel" => c
            .reprint_label(with(pb::ReprintLabelRequest { serial: "X".into() }, token))
            .await
            .map(drop),
        "ExportManifest" => c
            .export_manifest(with(pb::BatchRequest { id: 9999 }, token))
            .await
            .map(drop),
        "FetchExport" => c
            .fetch_export(with(pb::BatchRequest { id: 9999 }, token))
            .await
            .map(drop),
        "ListAlarms" => c.list_alarms(with(e(), token)).await.map(drop),
        "AckAlarm" => c
            .ack_alarm(with(pb::AlarmRequest { id: 9999 }, token))
            .await
            .map(drop),
        "FleetView" => c
            .fleet_view(with(pb::FleetViewRequest { find: None }, token))
            .await
            .map(drop),
        "ShiftView" => c
            .shift_view(with(pb::ShiftViewRequest { hours: 8 }, token))
            .await
            .map(drop),
        "ImportFirmware" => c
            .import_firmware(with(
                pb::ImportFirmwareRequest {
                    name: "junk.bin".into(),
                    image: vec![0; 64],
                },
                token,
            ))
            .await
            .map(drop),
        "ListFirmware" => c.list_firmware(with(e(), token)).await.map(drop),
        "ImportCustomer" => c
            .import_customer(with(
                pb::ImportCustomerRequest {
                    name: "bad name!".into(),
                    certificate: vec![],
                },
                token,
            ))
            .await
            .map(drop),
        "ListCustomers" => c.list_customers(with(e(), token)).await.map(drop),
        "AddUser" => c
            .add_user(with(
                pb::AddUserRequest {
                    name: "bad name!".into(),
                    role: "operator".into(),
                    pin: "1".into(),
                },
                token,
            ))
            .await
            .map(drop),
        "DisableUser" => c
            .disable_user(with(
                pb::UserRequest {
                    name: "nobody-here".into(),
                },
                token,
            ))
            .await
            .map(drop),
        "ResetPin" => c
            .reset_pin(with(
                pb::ResetPinRequest {
                    name: "nobody-here".into(),
                    pin: "123456".into(),
                },
                token,
            ))
            .await
            .map(drop),
        "ListUsers" => c.list_users(with(e(), token)).await.map(drop),
        "AuditVerify" => c.audit_verify(with(e(), token)).await.map(drop),
        "AuditTail" => c
            .audit_tail(with(pb::AuditTailRequest { count: 5 }, token))
            .await
            .map(drop),
        "AuditSince" => c
            .audit_since(with(pb::AuditSinceRequest { after: 0 }, token))
            .await
            .map(drop),
        "AuditExport" => c.audit_export(with(e(), token)).await.map(drop),
        "HsmInfo" => c.hsm_info(with(e(), token)).await.map(drop),
        "HsmCheck" => c.hsm_check(with(e(), token)).await.map(drop),
        "AuditRecover" => c
            .audit_recover(with(
                pb::AuditRecoverRequest {
                    reason: "nothing is frozen here".into(),
                },
                token,
            ))
            .await
            .map(drop),
        "PkiCsr" => c
            .pki_csr(with(
                pb::PkiCsrRequest {
                    role: "device-ca".into(),
                    common_name: "Another Device CA".into(),
                    organization: None,
                    curve: "P-999".into(),
                },
                token,
            ))
            .await
            .map(drop),
        "PkiImport" => c
            .pki_import(with(
                pb::PkiImportRequest {
                    role: "device-ca".into(),
                    certificate_pem: "not a certificate".into(),
                    chain_pem: vec![],
                },
                token,
            ))
            .await
            .map(drop),
        "IssueTlsCertificate" => c
            .issue_tls_certificate(with(
                pb::TlsCertificateRequest {
                    name: "bad name!".into(),
                    usage: pb::TlsUsage::Client as i32,
                    public_key: some_spki(),
                    days: 30,
                    dns_names: vec![],
                    ip_addresses: vec![],
                    application_uri: None,
                },
                token,
            ))
            .await
            .map(drop),
        other => panic!("no such call {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_call_for_every_role_is_allowed_or_refused_as_the_permission_table_says() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let mut raw = client.raw();
    let db = cell.db();
    let forbidden_before = count(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'auth.forbidden'",
    );

    // Every call but the log-in, without a session: refused, and each refusal audited.
    let no_session_before = count(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'auth.no_session'",
    );
    for (name, _) in CALLS {
        let r = call(&mut raw, name, None).await;
        let e = r.expect_err(name);
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
        assert_eq!(
            e.metadata()
                .get("x-station-reason")
                .and_then(|v| v.to_str().ok()),
            Some("no-session"),
            "{name}"
        );
        // A made-up token fares no better.
        let e = call(&mut raw, name, Some(&"ab".repeat(32)))
            .await
            .expect_err(name);
        assert_eq!(e.code(), Code::Unauthenticated, "{name}: {e:?}");
    }
    let no_session = count(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'auth.no_session'",
    );
    assert_eq!(
        no_session - no_session_before,
        2 * CALLS.len() as i64,
        "every refusal without a session is audited"
    );
    // The first officer of a cell that has one cannot be made again, session or not.
    let e = raw
        .bootstrap(pb::BootstrapRequest {
            name: "mallory".into(),
            pin: "123456".into(),
        })
        .await
        .expect_err("bootstrap of a set-up cell");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    // Every call, every role: allowed or refused exactly as the table says.
    let mut refused = 0;
    for (user, role) in [
        ("oper", Role::Operator),
        ("super", Role::Supervisor),
        ("officer", Role::SecurityOfficer),
        ("audit", Role::Auditor),
    ] {
        for (name, action) in CALLS {
            let login = client.login(user, &cell.pins[user]).await.unwrap();
            let token = login.session.token().expose().to_string();
            let r = call(&mut raw, name, Some(&token)).await;
            let denied = matches!(&r, Err(e) if e.code() == Code::PermissionDenied);
            let allowed = action.is_none_or(|a| auth::allowed(role, a));
            assert_eq!(denied, !allowed, "{user} {name}: {r:?}");
            if let Err(e) = &r {
                assert_ne!(e.code(), Code::Unauthenticated, "{user} {name}: {e:?}");
                assert_ne!(e.code(), Code::Internal, "{user} {name}: {e:?}");
            }
            if denied {
                refused += 1;
            }
            if *name != "Logout" {
                let _ = client.logout(&login.session).await;
            }
        }
    }
    let forbidden = count(
        &db,
        "SELECT count(*) FROM audit WHERE kind = 'auth.forbidden'",
    );
    assert_eq!(
        forbidden - forbidden_before,
        refused,
        "every refusal is audited"
    );
    assert!(refused > 40, "{refused}");
    drop(raw);
    drop(client);
    daemon.stop().await.unwrap();
}

// ----- sessions, PINs, the journal on disk ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_copied_journal_yields_no_pin_and_the_cells_files_are_owner_only() {
    use argon2::password_hash::PasswordVerifier;
    use argon2::password_hash::phc::PasswordHash;
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    for f in [
        "station.db",
        "station.db-wal",
        "station.db-shm",
        "station.db.lock",
        "hsm-pin",
    ] {
        let mode = std::fs::metadata(cell.path(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
    }
    for d in ["pins", "exports"] {
        let mode = std::fs::metadata(cell.path(d))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{d}/ is {mode:o}");
    }
    for user in cell.pins.keys() {
        let mode = std::fs::metadata(cell.path(&format!("pins/{user}.pin")))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0);
    }
    // The socket lets the owner and the group in, nobody else.
    let mode = std::fs::metadata(cell.socket())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");

    // A copy of the journal, as someone with the file would take it.
    let copy = cell.path("stolen.db");
    std::fs::copy(cell.path("station.db"), &copy).unwrap();
    let _ = std::fs::copy(cell.path("station.db-wal"), cell.path("stolen.db-wal"));
    let stolen = rusqlite::Connection::open(&copy).unwrap();
    let hashes: Vec<(String, String)> = stolen
        .prepare("SELECT name, pin_hash FROM users")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(hashes.len(), 4);
    let hsm = daemon.engine().hsm();
    let pepper = hsm
        .run(|s| s.find_key(hsm::KeyKind::Hmac(32), "pin-pepper"))
        .await
        .unwrap()
        .expect("the pepper key is in the token");
    let argon = argon2::Argon2::default();
    for (name, phc) in &hashes {
        let hash = PasswordHash::new(phc).unwrap();
        let pin = &cell.pins[name.as_str()];
        // Knowing the right PIN is not enough to check it against the copy: the offline
        // brute force of a 6-digit PIN has nothing to test its guesses against.
        assert!(
            argon.verify_password(pin.as_bytes(), &hash).is_err(),
            "{name}: the stored hash must not be a hash of the PIN alone"
        );
        // With the token's pepper (only inside the HSM) it checks.
        let (input, key) = (auth::PepperedPin::mac_input(pin), pepper.clone());
        let mac = hsm.run(move |s| s.hmac_sha256(&key, &input)).await.unwrap();
        assert!(argon.verify_password(&mac, &hash).is_ok(), "{name}");
        // The pepper key cannot be read out of the token.
        let key = pepper.clone();
        let flags = hsm.run(move |s| s.key_flags(&key)).await.unwrap();
        assert!(
            flags.sensitive && !flags.extractable && flags.token,
            "{flags}"
        );
    }
    daemon.stop().await.unwrap();

    // An auditor verifies the copy without the daemon or the HSM, with the audit certificate the
    // journal recorded checked against the manufacturer root; against another root it fails.
    let copy = s(&copy);
    let (code, out, err) = cell.run(
        None,
        &[
            "audit",
            "verify",
            "--offline",
            "--journal",
            copy,
            "--root",
            s(&cell.path("root-ca.pem")),
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("chains to the given root") && out.contains("audit log verified"),
        "{out}"
    );
    let (code, out, err) = cell.run(
        None,
        &[
            "audit",
            "verify",
            "--offline",
            "--journal",
            copy,
            "--root",
            s(&cell.path("pki/provisioning-root.pem")),
        ],
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("does not chain to the given manufacturer root"),
        "{err}"
    );
    // Another certificate under the root — a CA's — is not the audit signer's.
    let (code, _, err) = cell.run(
        None,
        &[
            "audit",
            "verify",
            "--offline",
            "--journal",
            copy,
            "--root",
            s(&cell.path("root-ca.pem")),
            "--audit-cert",
            s(&cell.path("pki/device-ca.pem")),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("is a CA certificate"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_user_and_a_wrong_pin_get_the_same_answer_in_the_same_time() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let mut times: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    let mut answers = std::collections::BTreeSet::new();
    for _ in 0..9 {
        // Alternate, so that a slower moment of the machine hits both alike.
        for (i, user) in ["no-such-user", "oper"].iter().enumerate() {
            let t = Instant::now();
            let e = client.login(user, "000000").await.expect_err("refused");
            times[i].push(t.elapsed());
            // The real user is locked out after five: a wrong PIN then still reads the same.
            answers.insert((e.code as i32, e.reason.clone(), e.message.clone()));
        }
    }
    assert_eq!(answers.len(), 1, "one answer for both: {answers:?}");
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (unknown, known) = (median(&mut times[0]), median(&mut times[1]));
    let ratio = unknown.as_secs_f64() / known.as_secs_f64();
    assert!(
        (0.5..2.0).contains(&ratio),
        "unknown user {unknown:?} vs wrong PIN {known:?}: an Argon2id check costs tens of ms, so a missing one would show"
    );
    // The audit log knows which was which.
    let db = cell.db();
    assert!(
        count(
            &db,
            "SELECT count(*) FROM audit WHERE kind = 'auth.failure' AND details LIKE '%unknown user%'"
        ) >= 9
    );
    assert!(
        count(
            &db,
            "SELECT count(*) FROM audit WHERE kind = 'auth.lockout'"
        ) == 1
    );
    drop(client);
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_pin_reset_ends_the_users_sessions_and_their_event_streams() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    let client = cell.client().await;
    let oper = cell.login(&client, "oper").await;
    let mut events = client.events(&oper).await.unwrap();
    assert!(matches!(events.next().await, Some(Ok(Update::Snapshot(_)))));
    let officer = cell.login(&client, "officer").await;
    client
        .execute(
            &officer,
            station::Command::ResetPin {
                name: "oper".into(),
                pin: zeroize::Zeroizing::new("654321".into()),
            },
        )
        .await
        .unwrap();
    // The stream ends with the reason within a few seconds; commands are refused at once.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match events.next().await {
                Some(Ok(_)) => continue,
                Some(Err(e)) => return e,
                None => panic!("the stream ended without a reason"),
            }
        }
    })
    .await
    .expect("the stream of an ended session ends");
    assert!(ended.is_expired(), "{ended:?}");
    let e = client
        .execute(&oper, station::Command::ListAlarms)
        .await
        .unwrap_err();
    assert!(e.is_expired(), "{e:?}");
    assert!(client.login("oper", "654321").await.is_ok());
    drop(client);
    daemon.stop().await.unwrap();
}

// ----- the PKI through the daemon ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_pki_changes_through_the_daemon_only_and_a_set_up_token_bootstraps_nothing() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    // An operator may not; the refusal is audited.
    let out = cell.path("req.pem");
    let (code, _, err) = cell.run(
        Some("oper"),
        &[
            "pki",
            "csr",
            "--role",
            "manifest-signer",
            "--cn",
            "X",
            "--out",
            s(&out),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("may not change the PKI"), "{err}");
    assert!(
        count(
            &cell.db(),
            "SELECT count(*) FROM audit WHERE kind = 'auth.forbidden' AND details LIKE '%manage_pki%'"
        ) >= 1
    );
    // The security officer may; the HSM refuses a second key for a role that has one.
    let (code, _, err) = cell.run(
        Some("officer"),
        &[
            "pki",
            "csr",
            "--role",
            "manifest-signer",
            "--cn",
            "X",
            "--out",
            s(&out),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("manifest-signer"), "{err}");
    // Storing a role's certificate (here the manifest signer's own, again, after taking the
    // token's copy away as a renewal would): checked against the role's key and the chain,
    // stored, audited.
    daemon
        .engine()
        .hsm()
        .run(|s| {
            let c = s
                .find_key(hsm::KeyKind::Certificate, "manifest-signer")?
                .expect("the manifest signer's certificate");
            s.destroy(&c)
        })
        .await
        .unwrap();
    let (code, o, err) = cell.run(
        Some("officer"),
        &[
            "pki",
            "import",
            "--role",
            "manifest-signer",
            "--cert",
            s(&cell.path("pki/manifest-signer.pem")),
            "--chain",
            s(&cell.path("pki/root-ca.pem")),
        ],
    );
    assert_eq!(code, 0, "{o}{err}");
    assert!(o.contains("restart stationd"), "{o}");
    assert_eq!(
        count(
            &cell.db(),
            "SELECT count(*) FROM audit WHERE kind = 'pki.import' AND actor = 'officer'"
        ),
        1
    );
    // Another role's certificate for the manifest signer's key: refused.
    let (code, _, err) = cell.run(
        Some("officer"),
        &[
            "pki",
            "import",
            "--role",
            "manifest-signer",
            "--cert",
            s(&cell.path("pki/audit-signer.pem")),
            "--chain",
            s(&cell.path("pki/root-ca.pem")),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("manifest-signer"), "{err}");
    // A console certificate: issued, audited.
    let tls = cell.path("tls");
    let (code, o, err) = cell.run(
        Some("officer"),
        &[
            "pki",
            "tls-cert",
            "--usage",
            "client",
            "--name",
            "console-7",
            "--out",
            s(&tls),
        ],
    );
    assert_eq!(code, 0, "{o}{err}");
    assert!(
        count(
            &cell.db(),
            "SELECT count(*) FROM audit WHERE kind = 'pki.tls_issued' AND actor = 'officer'"
        ) == 1
    );
    let mode = std::fs::metadata(tls.join("console-7-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0);
    // openssl agrees: the console certificate chains to the device CA and says clientAuth.
    let v = std::process::Command::new("openssl")
        .args(["verify", "-purpose", "sslclient", "-CAfile"])
        .arg(cell.path("pki/root-ca.pem"))
        .arg("-untrusted")
        .arg(tls.join("ca.pem"))
        .arg(tls.join("console-7.pem"))
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    // Setting up a token "locally" is refused once the cell is set up.
    daemon.stop().await.unwrap();
    let (code, _, err) = cell.run(
        Some("officer"),
        &[
            "pki",
            "csr",
            "--local",
            "--role",
            "manifest-signer",
            "--cn",
            "X",
            "--out",
            s(&out),
        ],
    );
    assert_ne!(code, 0);
    assert!(err.contains("has been set up"), "{err}");
    assert!(!out.exists());

    // An empty journal pointed at this cell's token: the daemon starts, but the token says the
    // cell is set up, so no first officer can be made without a log-in.
    let text = std::fs::read_to_string(&cell.config).unwrap();
    let empty_cfg = cell.path("empty.toml");
    std::fs::write(
        &empty_cfg,
        text.replace("database = \"station.db\"", "database = \"empty.db\"")
            .replace("[[nests]]", "[api]\nsocket = \"empty.sock\"\n\n[[nests]]"),
    )
    .unwrap();
    let other = station::daemon::Daemon::start(
        station::config::Config::load(&empty_cfg).unwrap(),
        "stationd",
    )
    .await
    .unwrap();
    let c = Client::connect(&Address::Unix(cell.path("empty.sock")), "e2e")
        .await
        .unwrap();
    let e = c.bootstrap("mallory", "123456").await.unwrap_err();
    assert!(e.message.contains("set up already"), "{e:?}");
    assert!(c.login("mallory", "123456").await.is_err());
    drop(c);
    other.stop().await.unwrap();

    let daemon = cell.daemon().await;
    // A new key for a role (here the station identity's, taken out of the token first as a
    // renewal would): generated in the HSM, its request written, audited.
    daemon
        .engine()
        .hsm()
        .run(|s| {
            let pair = s.find_ec_keypair("station")?;
            s.destroy(&pair.private)?;
            s.destroy(&pair.public)?;
            if let Some(c) = s.find_key(hsm::KeyKind::Certificate, "station")? {
                s.destroy(&c)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let req = cell.path("station.csr");
    let (code, o, err) = cell.run(
        Some("officer"),
        &[
            "pki",
            "csr",
            "--role",
            "station",
            "--cn",
            "Line 3 Station",
            "--out",
            s(&req),
        ],
    );
    assert_eq!(code, 0, "{o}{err}");
    let v = std::process::Command::new("openssl")
        .args(["req", "-verify", "-noout", "-in"])
        .arg(&req)
        .output()
        .unwrap();
    assert!(v.status.success(), "{}", String::from_utf8_lossy(&v.stderr));
    assert_eq!(
        count(
            &cell.db(),
            "SELECT count(*) FROM audit WHERE kind = 'pki.csr' AND actor = 'officer'"
        ),
        1
    );
    daemon.stop().await.unwrap();

    // `pki init-dev` never overwrites PIN files.
    let dir = cell.path("dev");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("hsm-user.pin"), "keep me\n").unwrap();
    let (code, _, err) = cell.run(None, &["pki", "init-dev", "--token-dir", s(&dir)]);
    assert_ne!(code, 0);
    assert!(err.contains("never overwrites"), "{err}");
    assert_eq!(
        std::fs::read_to_string(dir.join("hsm-user.pin")).unwrap(),
        "keep me\n"
    );
}

// ----- remote consoles over mutual TLS -------------------------------------------------------

/// A CA and a console certificate (clientAuth) of another cell's PKI, made with openssl.
fn foreign_console(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-subj",
            "/CN=Another Cell Device CA",
            "-days",
            "30",
            "-out",
            "ca.pem",
        ],
        dir,
    );
    openssl(
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "k.key",
        ],
        dir,
    );
    openssl(
        &[
            "pkcs8",
            "-topk8",
            "-nocrypt",
            "-in",
            "k.key",
            "-out",
            "console-key.pem",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-new",
            "-key",
            "console-key.pem",
            "-subj",
            "/CN=console-1",
            "-out",
            "c.csr",
        ],
        dir,
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "extendedKeyUsage = clientAuth\nkeyUsage = digitalSignature\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "c.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-out",
            "console.pem",
        ],
        dir,
    );
    let key = dir.join("console-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    (dir.join("console.pem"), key)
}

fn tls_client(url: &str, ca: &Path, cert: &Path, key: &Path) -> Address {
    Address::Tls(TlsClient {
        url: url.into(),
        domain: Some("localhost".into()),
        ca_pem: std::fs::read(ca).unwrap(),
        cert_pem: std::fs::read(cert).unwrap(),
        key_pem: zeroize::Zeroizing::new(std::fs::read(key).unwrap()),
    })
}

/// A log-in over TLS as `user`: the error, if refused at any point (handshake or call).
async fn tls_login(
    addr: &Address,
    user: &str,
    pin: &str,
) -> Result<station::api::client::Login, String> {
    let c = Client::connect(addr, "remote-console")
        .await
        .map_err(|e| e.to_string())?;
    c.login(user, pin)
        .await
        .map_err(|e| format!("{:?} {}", e.reason, e.message))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn remote_consoles_need_a_console_certificate_of_this_cell() {
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        firmware_kib: 8,
        ..CellOptions::default()
    })
    .await;
    // One meter through the line: its signing key is what a rogue board in a nest would hold.
    let (daemon, summary) = e2e::run_batch(&cell, Duration::from_secs(300)).await;
    assert!(summary.batch_complete, "{summary}");
    // The daemon's own certificate and a console's, issued through the daemon.
    let tls = cell.path("tls");
    for (usage, name, extra) in [
        (
            "server",
            "localhost",
            vec!["--dns", "localhost", "--ip", "127.0.0.1"],
        ),
        ("client", "console-1", vec![]),
    ] {
        let mut args = vec![
            "pki",
            "tls-cert",
            "--usage",
            usage,
            "--name",
            name,
            "--out",
            s(&tls),
        ];
        args.extend(extra);
        let (code, o, e) = cell.run(Some("officer"), &args);
        assert_eq!(code, 0, "{o}{e}");
    }
    daemon.stop().await.unwrap();
    let mut cfg = std::fs::read_to_string(&cell.config).unwrap();
    cfg = cfg.replace(
        "[[nests]]",
        &format!(
            "[api.tls]\nlisten = \"127.0.0.1:0\"\ncert = \"{}\"\nkey = \"{}\"\n\n[[nests]]",
            tls.join("localhost.pem").display(),
            tls.join("localhost-key.pem").display()
        ),
    );
    std::fs::write(&cell.config, cfg).unwrap();
    let daemon = cell.daemon().await;
    let url = format!("https://localhost:{}", daemon.tls_addr().unwrap().port());
    let ca = tls.join("ca.pem");
    let pin = cell.pins["oper"].clone();

    // No client certificate: the handshake fails; nothing is asked of the daemon.
    let ep = tonic::transport::Endpoint::from_shared(url.clone())
        .unwrap()
        .tls_config(
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(
                    std::fs::read(&ca).unwrap(),
                ))
                .domain_name("localhost"),
        )
        .unwrap();
    let refused = match ep.connect().await {
        Err(_) => true,
        Ok(ch) => StationClient::new(ch)
            .login(pb::LoginRequest {
                user: "oper".into(),
                pin: pin.clone(),
                client: "no-cert".into(),
            })
            .await
            .is_err(),
    };
    assert!(refused, "a console without a certificate got in");

    // A console certificate of another cell's PKI: refused in the handshake.
    let (fc, fk) = foreign_console(&cell.path("foreign"));
    let r = tls_login(&tls_client(&url, &ca, &fc, &fk), "oper", &pin).await;
    assert!(r.is_err(), "another cell's console got in");

    // A meter's own certificate and key (issued by this cell's device CA, so the handshake
    // passes): refused, it is no console certificate.
    let uid: String = cell
        .db()
        .query_row(
            "SELECT uid FROM meters WHERE state = 'done' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let meter = cell.meter_dir(&uid);
    let mdir = cell.path("rogue");
    std::fs::create_dir_all(&mdir).unwrap();
    openssl(
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            s(&meter.join("cert-sign.der")),
            "-out",
            "meter.pem",
        ],
        &mdir,
    );
    openssl(
        &[
            "pkcs8",
            "-inform",
            "DER",
            "-nocrypt",
            "-in",
            s(&meter.join("key-sign.pk8")),
            "-out",
            "meter-key.pem",
        ],
        &mdir,
    );
    std::fs::set_permissions(
        mdir.join("meter-key.pem"),
        std::fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    let r = tls_login(
        &tls_client(
            &url,
            &ca,
            &mdir.join("meter.pem"),
            &mdir.join("meter-key.pem"),
        ),
        "oper",
        &pin,
    )
    .await;
    let e = r.expect_err("a meter's key opened a console session");
    assert!(e.contains("not-a-console-certificate"), "{e}");

    // The cell's console certificate: logs in, follows the line.
    let addr = tls_client(
        &url,
        &ca,
        &tls.join("console-1.pem"),
        &tls.join("console-1-key.pem"),
    );
    let remote = Client::connect(&addr, "remote-console").await.unwrap();
    let login = remote.login("oper", &pin).await.unwrap();
    let mut events = remote.events(&login.session).await.unwrap();
    let Some(Ok(Update::Snapshot(line))) = events.next().await else {
        panic!("the stream starts with the line");
    };
    assert_eq!(line.nests.len(), 1);
    // What a local supervisor does reaches the remote console.
    let local = cell.client().await;
    let sup = cell.login(&local, "super").await;
    local
        .execute(
            &sup,
            station::Command::EnableNest {
                nest: 1,
                enabled: false,
            },
        )
        .await
        .unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            if let Some(Ok(Update::Event(station::Event::Nest(n)))) = events.next().await
                && !n.enabled
            {
                return n;
            }
        }
    })
    .await
    .expect("the nest event reached the remote console");
    assert_eq!(got.nest, 1);
    // The log-in over TLS is audited with the console's certificate.
    let details: String = cell
        .db()
        .query_row(
            "SELECT details FROM audit WHERE kind = 'auth.success' AND details LIKE '%\"tls\"%' ORDER BY seq DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(details.contains("console-1"), "{details}");

    // A session opened on the local socket is no use over TLS, and the other way round.
    let stolen = sup.token().expose().to_string();
    let e = remote
        .raw()
        .list_alarms(with(pb::Empty {}, Some(&stolen)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    let remote_token = login.session.token().expose().to_string();
    let e = local
        .raw()
        .list_alarms(with(pb::Empty {}, Some(&remote_token)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(
        count(
            &cell.db(),
            "SELECT count(*) FROM audit WHERE kind = 'auth.no_session' AND details LIKE '%belongs to another client%'"
        ) == 2
    );
    drop((remote, local, events));
    daemon.stop().await.unwrap();
}

// ----- a client we did not write -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn python_grpcio_logs_in_opens_a_batch_and_follows_the_line_from_the_proto_alone() {
    let python = std::env::var("CELL_PYTHON").unwrap_or_else(|_| "python3".into());
    let cell = Cell::new(CellOptions {
        nests: 1,
        quantity: 1,
        firmware_kib: 8,
        open_batch: false,
        ..CellOptions::default()
    })
    .await;
    let daemon = cell.daemon().await;
    // Stubs from the contract, made now by grpcio-tools' protoc.
    let stubs = cell.path("py");
    std::fs::create_dir_all(&stubs).unwrap();
    let schemas = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    let gen_ = std::process::Command::new(&python)
        .args(["-m", "grpc_tools.protoc", "-I"])
        .arg(&schemas)
        .arg(format!("--python_out={}", stubs.display()))
        .arg(format!("--grpc_python_out={}", stubs.display()))
        .arg(schemas.join("station.proto"))
        .output()
        .unwrap();
    assert!(
        gen_.status.success(),
        "grpc_tools.protoc (grpcio-tools from PyPI; `cargo xtask test` installs it): {}",
        String::from_utf8_lossy(&gen_.stderr)
    );
    let script = r#"
import sys, grpc
sys.path.insert(0, sys.argv[1])
import station_pb2 as pb, station_pb2_grpc as rpc
sock, sup_pin, oper_pin, fw = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
# grpc-core sends the socket path as :authority unless told otherwise (see station.proto).
stub = rpc.StationStub(grpc.insecure_channel("unix:" + sock, options=[("grpc.default_authority", "localhost")]))
try:
    stub.ListBatches(pb.Empty())
    print("no session: ALLOWED")
except grpc.RpcError as e:
    print("no session:", e.code().name)
sup = stub.Login(pb.LoginRequest(user="super", pin=sup_pin, client="python-grpcio"))
md = [("authorization", "Bearer " + sup.token)]
print("logged in:", sup.user, sup.role, sup.station)
b = stub.OpenBatch(pb.BatchSpec(work_order="WO-PY-1", model=sup.models[0], firmware=fw,
    customer="utility", quantity=1, serial_prefix="PY", serial_first=1, serial_last=20), metadata=md)
print("batch:", b.id, b.work_order, b.state, b.quantity)
oper = stub.Login(pb.LoginRequest(user="oper", pin=oper_pin, client="python-grpcio"))
om = [("authorization", "Bearer " + oper.token)]
events = stub.Events(pb.Empty(), metadata=om)
first = next(events)
print("first:", first.WhichOneof("event"), first.snapshot.batch.work_order, len(first.snapshot.nests))
stub.StartLine(pb.Empty(), metadata=om)
states = []
for ev in events:
    kind = ev.WhichOneof("event")
    if kind == "nest":
        s = pb.NestState.Name(ev.nest.state)
        if not states or states[-1] != s:
            states.append(s)
    if kind == "meter_finished":
        print("finished:", ev.meter_finished.ok, ev.meter_finished.serial)
        break
events.cancel()
print("states:", " ".join(states))
stub.StopLine(pb.Empty(), metadata=om)
for t in (md, om):
    stub.Logout(pb.Empty(), metadata=t)
try:
    stub.ListBatches(pb.Empty(), metadata=md)
    print("after logout: ALLOWED")
except grpc.RpcError as e:
    print("after logout:", e.code().name)
"#;
    let out = tokio::task::spawn_blocking({
        let (python, stubs, sock) = (python.clone(), stubs.clone(), cell.socket());
        let (sp, op, fw) = (
            cell.pins["super"].clone(),
            cell.pins["oper"].clone(),
            cell.firmware_sha.clone(),
        );
        move || {
            std::process::Command::new(python)
                .args(["-c", script])
                .arg(&stubs)
                .arg(&sock)
                .args([sp, op, fw])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.contains(&"no session: UNAUTHENTICATED"), "{text}");
    assert!(
        lines.contains(&"logged in: super supervisor e2e-cell"),
        "{text}"
    );
    assert!(lines.contains(&"batch: 1 WO-PY-1 open 1"), "{text}");
    assert!(lines.contains(&"first: snapshot WO-PY-1 1"), "{text}");
    assert!(
        lines.iter().any(|l| l.starts_with("finished: True PY")),
        "{text}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("states:") && l.contains("NEST_STATE_BUSY")),
        "{text}"
    );
    assert!(lines.contains(&"after logout: UNAUTHENTICATED"), "{text}");
    // The log-ins name their client and the local peer process.
    assert!(
        count(
            &cell.db(),
            "SELECT count(*) FROM audit WHERE kind = 'auth.success' AND details LIKE '%python-grpcio%'"
        ) == 2
    );
    let details: String = cell
        .db()
        .query_row(
            "SELECT details FROM audit WHERE kind = 'auth.success' AND details LIKE '%python-grpcio%' LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    let d: serde_json::Value = serde_json::from_str(&details).unwrap();
    assert_eq!(d["origin"]["transport"], "unix", "{details}");
    assert_eq!(d["origin"]["uid"].as_u64(), Some(own_uid()), "{details}");
    assert!(
        d["origin"]["pid"].as_u64().is_some_and(|p| p > 0),
        "{details}"
    );
    daemon.stop().await.unwrap();
}

/// This process's user id (`id -u`), as the daemon sees its peers.
fn own_uid() -> u64 {
    let out = std::process::Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
