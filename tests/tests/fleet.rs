//! A factory of several cells against one registry: a real PostgreSQL server on loopback (see
//! `e2e::registry`), reached over TLS with client certificates the cells' own PKIs issued.
//! Stations provision from leased numbers and push their journals' outboxes; the registry is
//! killed, runs dry of numbers, and meets a journal restored from an old backup.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use e2e::registry::{Registry, RegistryDb, ServerInfo, station_id};
use e2e::{Cell, CellOptions};
use station::daemon::Daemon;

const FLAG: &str = "DMW";

/// A cell with a registry: its station id, its client certificate (from its own device CA, via
/// `station pki tls-cert`), enrolled with its audit certificate, its CAs trusted by the server.
struct FleetCell {
    cell: Cell,
    id: String,
}

async fn fleet_cell(
    reg: &RegistryDb,
    prefix: &str,
    opts: CellOptions,
    block: u32,
    low: u32,
) -> FleetCell {
    let id = station_id(prefix);
    let cert = format!("registry/{id}.pem");
    let key = format!("registry/{id}-key.pem");
    let cell = Cell::new(CellOptions {
        station_id: Some(id.clone()),
        leased_numbers: true,
        extra_config: reg.fleet_config(&cert, &key, block, low),
        ..opts
    })
    .await;
    let daemon = cell.daemon().await;
    issue_client_cert(&cell, &id, &cell.path("registry"));
    daemon.stop().await.unwrap();
    let read = |p: &str| std::fs::read_to_string(cell.path(p)).unwrap();
    reg.trust_client_ca(&format!(
        "{}\n{}",
        read("pki/device-ca.pem"),
        read("pki/root-ca.pem")
    ))
    .await;
    station::fleet::enrol(&reg.admin().await, &id, FLAG, &read("pki/audit-signer.pem"))
        .await
        .unwrap();
    FleetCell { cell, id }
}

/// `station pki tls-cert --usage client --name NAME` (the daemon must run).
fn issue_client_cert(cell: &Cell, name: &str, out: &Path) {
    let (code, o, e) = cell.run(
        Some("officer"),
        &[
            "pki",
            "tls-cert",
            "--usage",
            "client",
            "--name",
            name,
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "tls-cert {name}: {o}{e}");
}

/// An auditor of the registry (a fleet_reader role) with a certificate from `cell`'s PKI, and
/// the connection file `station fleet --registry` reads.
async fn auditor(reg: &RegistryDb, cell: &Cell) -> std::path::PathBuf {
    let name = station_id("aud");
    reg.admin()
        .await
        .batch_execute(&format!(
            "CREATE ROLE \"{name}\" LOGIN IN ROLE fleet_reader"
        ))
        .await
        .unwrap();
    let dir = cell.path("auditor");
    let daemon = cell.daemon().await;
    issue_client_cert(cell, &name, &dir);
    daemon.stop().await.unwrap();
    let file = dir.join("registry.toml");
    std::fs::write(
        &file,
        format!(
            "host = \"127.0.0.1\"\nport = {}\ndatabase = \"{}\"\nuser = \"{name}\"\nserver_ca = \"{}\"\ncert = \"{name}.pem\"\nkey = \"{name}-key.pem\"\n",
            reg.info.port,
            reg.name,
            reg.info.server_ca.display()
        ),
    )
    .unwrap();
    file
}

async fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "waited {limit:?} for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Closes the cell's first batch and opens `work_order` (two meters, numbers from the leases).
async fn next_batch(
    fc: &FleetCell,
    client: &station::api::client::Client,
    sup: &station::Session,
    work_order: &str,
) {
    let id = fc.cell.batch_id.unwrap();
    client
        .execute(sup, station::Command::CloseBatch { id })
        .await
        .unwrap();
    client
        .execute(
            sup,
            station::Command::OpenBatch(station::engine::BatchSpec {
                work_order: work_order.into(),
                model: e2e::MODEL.into(),
                firmware: fc.cell.firmware_sha.clone(),
                customer: "utility".into(),
                quantity: 2,
                serial_prefix: "E2E".into(),
                serial_first: 0,
                serial_last: station::fleet::LAST_NUMBER,
            }),
        )
        .await
        .unwrap();
}

/// Waits until the daemon's health screen shows the registry as `ok` says.
async fn health_shows(d: &Daemon, what: &str, ok: impl Fn(&station::engine::FleetHealth) -> bool) {
    let engine = d.engine().clone();
    wait_for(
        &format!("the health screen to show {what}"),
        Duration::from_secs(20),
        || engine.snapshot().health.fleet.as_ref().is_some_and(&ok),
    )
    .await;
}

/// One number the registry answers.
async fn one(
    c: &tokio_postgres::Client,
    sql: &str,
    params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
) -> i64 {
    c.query_one(sql, params).await.unwrap().get(0)
}

fn q(db: &rusqlite::Connection, sql: &str) -> i64 {
    db.query_row(sql, [], |r| r.get(0)).unwrap()
}

/// Starts the cell's daemon, waits for its first lease, runs the line to the end of the batch
/// (or until the station stops it) and returns the daemon, still running, with the summary.
async fn run_leased_batch(fc: &FleetCell, limit: Duration) -> (Daemon, station::run::Summary) {
    let daemon = fc.cell.daemon().await;
    let db = fc.cell.db();
    wait_for("a lease", Duration::from_secs(20), || {
        q(&db, "SELECT count(*) FROM leases WHERE state = 'granted'") > 0
    })
    .await;
    let client = fc.cell.client().await;
    let oper = fc.cell.login(&client, "oper").await;
    let summary = tokio::time::timeout(limit, station::run::run_line(&client, &oper, false, true))
        .await
        .expect("the line did not end in time")
        .unwrap();
    let _ = client.logout(&oper).await;
    (daemon, summary)
}

/// Waits until the registry has acknowledged every outbox record of the cell.
async fn drained(cell: &Cell, limit: Duration) {
    let db = cell.db();
    wait_for("the outbox to drain", limit, || {
        q(
            &db,
            "SELECT coalesce(max(seq), 0) - (SELECT acked FROM outbox_state) FROM outbox",
        ) == 0
    })
    .await;
}

/// Every outbox record of the station is in the registry exactly once, as it was sent; its
/// meters are the journal's.
async fn arrived_exactly_once(reg: &RegistryDb, fc: &FleetCell) {
    let admin = reg.admin().await;
    let db = fc.cell.db();
    let mut stmt = db
        .prepare("SELECT seq, kind, body FROM outbox ORDER BY seq")
        .unwrap();
    let local: Vec<(i64, String, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let remote = admin
        .query(
            "SELECT seq, kind, body FROM fleet.records WHERE station = $1 ORDER BY seq",
            &[&fc.id],
        )
        .await
        .unwrap();
    assert_eq!(
        remote.len(),
        local.len(),
        "{}: records in the registry",
        fc.id
    );
    for (r, (seq, kind, body)) in remote.iter().zip(&local) {
        assert_eq!(r.get::<_, i64>(0), *seq);
        assert_eq!(&r.get::<_, String>(1), kind);
        if kind != "checkpoint" {
            assert_eq!(&r.get::<_, String>(2), body, "record {seq} as sent");
        }
    }
    let meters: i64 = one(
        &admin,
        "SELECT count(*) FROM fleet.meters WHERE station = $1",
        &[&fc.id],
    )
    .await;
    assert_eq!(
        meters,
        q(
            &db,
            "SELECT count(*) FROM meters WHERE state IN ('done', 'failed')"
        ),
        "{}: meters in the registry",
        fc.id
    );
}

/// The numbers the cell's journal issued, each inside one of its leases, which are the
/// registry's leases of that station.
async fn numbers_within_leases(reg: &RegistryDb, fc: &FleetCell) -> Vec<i64> {
    let leases = journal_leases(fc);
    let remote: Vec<(i64, i64)> = reg
        .admin()
        .await
        .query(
            "SELECT first, last FROM fleet.leases WHERE station = $1 ORDER BY first",
            &[&fc.id],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert_eq!(
        leases, remote,
        "{}: the journal's leases are the registry's",
        fc.id
    );
    numbers_in_journal_leases(fc)
}

fn journal_leases(fc: &FleetCell) -> Vec<(i64, i64)> {
    let db = fc.cell.db();
    let mut stmt = db
        .prepare("SELECT first, last FROM leases WHERE state = 'granted' ORDER BY first")
        .unwrap();
    stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The numbers the journal issued, each inside one of its leases, with the system title that
/// follows from it.
fn numbers_in_journal_leases(fc: &FleetCell) -> Vec<i64> {
    let leases = journal_leases(fc);
    let db = fc.cell.db();
    let mut stmt = db
        .prepare("SELECT serial_no, system_title FROM meters WHERE serial_no IS NOT NULL")
        .unwrap();
    let numbers: Vec<(i64, String)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    for (n, title) in &numbers {
        assert!(
            leases.iter().any(|(f, l)| f <= n && n <= l),
            "{}: number {n} is outside its leases {leases:?}",
            fc.id
        );
        // The system title is the FLAG ID and the number: unique with it.
        assert_eq!(title, &format!("{}{:010x}", hex::encode(FLAG), n));
    }
    numbers.into_iter().map(|(n, _)| n).collect()
}

async fn registry_alarms(reg: &RegistryDb, station: &str) -> Vec<(String, String)> {
    reg.admin()
        .await
        .query(
            "SELECT kind, message FROM fleet.alarms WHERE station = $1 ORDER BY id",
            &[&station],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn small(quantity: i64) -> CellOptions {
    CellOptions {
        nests: 2,
        quantity,
        firmware_kib: 8,
        ..CellOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_stations_share_one_registry_and_no_number_is_issued_twice() {
    let reg = RegistryDb::new(&Registry::shared(), FLAG).await;
    // Small leases, so each station takes several while the three run at once.
    let mut cells = Vec::new();
    for p in ["a", "b", "c"] {
        cells.push(fleet_cell(&reg, p, small(5), 4, 3).await);
    }
    let (ra, rb, rc) = tokio::join!(
        run_leased_batch(&cells[0], Duration::from_secs(120)),
        run_leased_batch(&cells[1], Duration::from_secs(120)),
        run_leased_batch(&cells[2], Duration::from_secs(120)),
    );
    let mut all = Vec::new();
    let mut daemons = Vec::new();
    for (fc, (daemon, summary)) in cells.iter().zip([ra, rb, rc]) {
        assert!(summary.batch_complete, "{}: {summary:?}", fc.id);
        drained(&fc.cell, Duration::from_secs(30)).await;
        arrived_exactly_once(&reg, fc).await;
        all.extend(numbers_within_leases(&reg, fc).await);
        let db = fc.cell.db();
        assert!(
            q(&db, "SELECT count(*) FROM leases") >= 2,
            "{}: several leases",
            fc.id
        );
        daemons.push(daemon);
    }
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all.len(),
        n,
        "a number was issued twice across the three journals"
    );
    assert_eq!(n, 15);
    for fc in &cells {
        assert!(registry_alarms(&reg, &fc.id).await.is_empty());
    }
    // A supervisor at any cell's console sees the whole factory through its station (counts,
    // and one meter looked up); an operator does not.
    let (serial, uid): (String, String) = cells[2]
        .cell
        .db()
        .query_row(
            "SELECT serial, uid FROM meters WHERE state = 'done' LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let client = cells[0].cell.client().await;
    let sup = cells[0].cell.login(&client, "super").await;
    let view = match client
        .execute(
            &sup,
            station::Command::FleetView {
                find: Some(serial.clone()),
            },
        )
        .await
        .unwrap()
    {
        station::Reply::Fleet(v) => v,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        view.batches.iter().map(|b| b.2).sum::<i64>(),
        15,
        "{view:?}"
    );
    assert_eq!(
        view.batches
            .iter()
            .map(|b| b.1.clone())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        3
    );
    assert_eq!(view.yields.iter().map(|y| y.2).sum::<i64>(), 15);
    assert_eq!(view.found.len(), 1);
    assert_eq!(
        (view.found[0].station.as_str(), view.found[0].uid.as_str()),
        (cells[2].id.as_str(), uid.as_str())
    );
    let oper = cells[0].cell.login(&client, "oper").await;
    let e = client
        .execute(&oper, station::Command::FleetView { find: None })
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("not allowed") || e.to_string().contains("may not"),
        "{e}"
    );
    // The station's own role reads only the view's functions: not another station's records.
    let own = |f: &str| cells[0].cell.path(&format!("registry/{}{f}", cells[0].id));
    let c0 = station::fleet::connect(&reg.endpoint(&cells[0].id, &own(".pem"), &own("-key.pem")))
        .await
        .unwrap();
    for sql in [
        "SELECT count(*) FROM fleet.meters",
        "SELECT count(*) FROM fleet.checkpoints",
    ] {
        let e = c0.query_one(sql, &[]).await.unwrap_err();
        assert!(
            station::fleet::pg_message(&e).contains("permission denied"),
            "{sql}: {e}"
        );
    }
    let n: i64 = c0
        .query_one("SELECT count(*) FROM fleet.records", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        n,
        q(&cells[0].cell.db(), "SELECT count(*) FROM outbox"),
        "its own records only"
    );
    drop(client);
    for d in daemons {
        d.stop().await.unwrap();
    }

    // The auditor's view: every station verified, the queries agree with the journals.
    let file = auditor(&reg, &cells[0].cell).await;
    let fleet = |args: &[&str]| {
        let mut full = vec!["fleet", "--registry", file.to_str().unwrap()];
        full.extend_from_slice(args);
        cells[0].cell.run(None, &full)
    };
    let (code, out, err) = fleet(&["audit"]);
    assert_eq!(code, 0, "{out}{err}");
    for fc in &cells {
        assert!(out.contains(&format!("{}: OK", fc.id)), "{out}");
    }
    let (_, out, _) = fleet(&["--json", "audit"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    for s in v.as_array().unwrap() {
        assert!(s["last_verified"].is_array(), "{s}");
        assert!(s["checkpoints"].as_i64().unwrap() >= 1, "{s}");
    }
    let (code, out, _) = fleet(&["--json", "batches"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let done: i64 = v
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["done"].as_i64().unwrap())
        .sum();
    assert_eq!(done, 15, "{v}");
    let (code, out, _) = fleet(&["yield", "--by-nest"]);
    assert_eq!(code, 0);
    assert!(out.contains(&cells[1].id), "{out}");
    // Where was a given serial provisioned, and by whom?
    let (code, out, _) = fleet(&["find", &serial]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&cells[2].id) && out.contains(&uid) && out.contains("oper"),
        "{out}"
    );
    let (code, out, _) = fleet(&["find", "E2E999999999"]);
    assert_eq!(code, 1, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_registry_killed_mid_batch_loses_nothing_and_duplicates_nothing() {
    let mut server = Registry::private();
    let reg = RegistryDb::new(&server.info, FLAG).await;
    let mut cells = Vec::new();
    for p in ["k", "l", "m"] {
        // One lease covers the batch: the line never needs the registry.
        cells.push(fleet_cell(&reg, p, small(10), 30, 5).await);
    }
    let dbs: Vec<_> = cells.iter().map(|fc| fc.cell.db()).collect();
    // Kill the server once every station has finished a meter, while the lines run.
    let killer = async {
        wait_for(
            "a first meter on every station",
            Duration::from_secs(60),
            || {
                dbs.iter()
                    .all(|db| q(db, "SELECT count(*) FROM meters WHERE state = 'done'") >= 1)
            },
        )
        .await;
        server.kill();
    };
    let (ra, rb, rc, ()) = tokio::join!(
        run_leased_batch(&cells[0], Duration::from_secs(120)),
        run_leased_batch(&cells[1], Duration::from_secs(120)),
        run_leased_batch(&cells[2], Duration::from_secs(120)),
        killer,
    );
    let mut daemons = Vec::new();
    for (daemon, summary) in [ra, rb, rc] {
        assert!(summary.batch_complete, "{summary:?}");
        daemons.push(daemon);
    }
    // The line went on; the backlog waits, and the health screen says so.
    for (d, fc) in daemons.iter().zip(cells.iter()) {
        health_shows(d, "the backlog", |f| {
            !f.reachable && f.backlog > 0 && f.oldest_unsent_s.is_some()
        })
        .await;
        let db = fc.cell.db();
        assert!(
            q(
                &db,
                "SELECT count(*) FROM outbox WHERE seq > (SELECT acked FROM outbox_state)"
            ) > 0
        );
    }
    server.start();
    for fc in cells.iter() {
        drained(&fc.cell, Duration::from_secs(60)).await;
        arrived_exactly_once(&reg, fc).await;
        numbers_within_leases(&reg, fc).await;
        assert!(registry_alarms(&reg, &fc.id).await.is_empty());
    }
    for d in &daemons {
        health_shows(d, "the registry back", |f| f.reachable && f.backlog == 0).await;
    }
    let admin = reg.admin().await;
    let audits = station::fleet::audit(&admin).await.unwrap();
    assert_eq!(audits.len(), 3);
    for a in &audits {
        assert!(a.ok(), "{a:?}");
        assert!(a.last_verified.is_some(), "{a:?}");
    }

    // The registry comes back from a backup that lacks the newest records it had acknowledged
    // (as a standby promoted too early would): the station sends them again.
    let fc = &cells[0];
    let local = q(&fc.cell.db(), "SELECT max(seq) FROM outbox");
    let keep = local - 4;
    admin
        .batch_execute(&format!(
            "ALTER TABLE fleet.records DISABLE TRIGGER records_append_only;
             ALTER TABLE fleet.checkpoints DISABLE TRIGGER checkpoints_append_only;
             DELETE FROM fleet.meters WHERE station = '{id}' AND seq > {keep};
             DELETE FROM fleet.checkpoints WHERE station = '{id}' AND seq > {keep};
             DELETE FROM fleet.records WHERE station = '{id}' AND seq > {keep};
             ALTER TABLE fleet.records ENABLE TRIGGER records_append_only;
             ALTER TABLE fleet.checkpoints ENABLE TRIGGER checkpoints_append_only;",
            id = fc.id
        ))
        .await
        .unwrap();
    drop(admin);
    server.kill();
    server.start();
    let admin = reg.admin().await;
    let t = Instant::now();
    loop {
        let n: i64 = one(
            &admin,
            "SELECT coalesce(max(seq), 0) FROM fleet.records WHERE station = $1",
            &[&fc.id],
        )
        .await;
        if n == local {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the station did not send records {keep}.. again"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    arrived_exactly_once(&reg, fc).await;
    assert!(
        q(
            &fc.cell.db(),
            "SELECT count(*) FROM audit WHERE kind = 'fleet.resent'"
        ) >= 1
    );
    let audits = station::fleet::audit(&admin).await.unwrap();
    assert!(
        audits.iter().all(station::fleet::StationAudit::ok),
        "{audits:?}"
    );
    for d in daemons {
        d.stop().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lease_used_up_while_the_registry_is_down_stops_the_line_before_a_number_outside_it() {
    let mut server = Registry::private();
    let reg = RegistryDb::new(&server.info, FLAG).await;
    let fc = fleet_cell(&reg, "x", small(6), 3, 1).await;
    let daemon = fc.cell.daemon().await;
    let db = fc.cell.db();
    wait_for("a lease", Duration::from_secs(20), || {
        q(&db, "SELECT count(*) FROM leases WHERE state = 'granted'") > 0
    })
    .await;
    let before_kill = q(&db, "SELECT max(seq) FROM audit");
    server.kill();
    let client = fc.cell.client().await;
    let oper = fc.cell.login(&client, "oper").await;
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        station::run::run_line(&client, &oper, false, true),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(!summary.batch_complete, "{summary:?}");
    let why = summary.halted.clone().expect("the station stops the line");
    assert!(why.contains("no leased number is left"), "{why}");
    // Three numbers leased, three used, none beyond.
    assert_eq!(
        q(
            &db,
            "SELECT count(*) FROM meters WHERE serial_no IS NOT NULL"
        ),
        3
    );
    assert_eq!(numbers_in_journal_leases(&fc).len(), 3);
    assert_eq!(q(&db, "SELECT count(*) FROM leases"), 1);
    // The station said it was running out before it stopped, or as it did.
    let low = format!(
        "SELECT count(*) FROM audit WHERE kind = 'fleet.leases_low' AND seq > {before_kill}"
    );
    wait_for(
        "the warning of leases running out",
        Duration::from_secs(40),
        || q(&db, &low) == 1,
    )
    .await;
    // The registry back: a new block, and the line runs to the end of the batch.
    server.start();
    wait_for("a second lease", Duration::from_secs(40), || {
        q(&db, "SELECT count(*) FROM leases WHERE state = 'granted'") == 2
    })
    .await;
    let summary = tokio::time::timeout(
        Duration::from_secs(120),
        station::run::run_line(&client, &oper, false, true),
    )
    .await
    .unwrap()
    .unwrap();
    assert!(summary.batch_complete, "{summary:?}");
    numbers_within_leases(&reg, &fc).await;
    drained(&fc.cell, Duration::from_secs(40)).await;
    arrived_exactly_once(&reg, &fc).await;
    let _ = client.logout(&oper).await;
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_journal_restored_from_an_old_backup_is_refused_by_the_registry() {
    let reg = RegistryDb::new(&Registry::shared(), FLAG).await;
    let fc = fleet_cell(&reg, "r", small(3), 20, 5).await;
    let (daemon, summary) = run_leased_batch(&fc, Duration::from_secs(120)).await;
    assert!(summary.batch_complete);
    drained(&fc.cell, Duration::from_secs(30)).await;
    daemon.stop().await.unwrap();
    // The backup.
    let backup = fc.cell.path("backup.db");
    std::fs::copy(fc.cell.path("station.db"), &backup).unwrap();
    assert!(
        !fc.cell.path("station.db-wal").exists()
            || std::fs::metadata(fc.cell.path("station.db-wal"))
                .unwrap()
                .len()
                == 0
    );
    // The station goes on: another batch, pushed and accepted.
    let daemon = fc.cell.daemon().await;
    let client = fc.cell.client().await;
    let sup = fc.cell.login(&client, "super").await;
    next_batch(&fc, &client, &sup, "WO-E2E-2").await;
    let oper = fc.cell.login(&client, "oper").await;
    let s = station::run::run_line(&client, &oper, false, true)
        .await
        .unwrap();
    assert!(s.batch_complete);
    drained(&fc.cell, Duration::from_secs(30)).await;
    daemon.stop().await.unwrap();
    let before = station::fleet::audit(&reg.admin().await).await.unwrap();
    let good = before[0]
        .last_verified
        .clone()
        .expect("a verified checkpoint");
    assert!(before[0].ok(), "{:?}", before[0]);

    // The journal is put back from the backup; the HSM's anchor freezes the log, a security
    // officer resumes it — and the registry sees a journal that does not continue.
    for f in ["station.db-wal", "station.db-shm"] {
        let _ = std::fs::remove_file(fc.cell.path(f));
    }
    std::fs::copy(&backup, fc.cell.path("station.db")).unwrap();
    let daemon = fc.cell.daemon().await;
    let (code, out, err) = fc.cell.run(
        Some("officer"),
        &[
            "audit",
            "recover",
            "--reason",
            "journal restored from the backup",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let alarms = {
        let mut found = Vec::new();
        let t = Instant::now();
        while found.is_empty() && t.elapsed() < Duration::from_secs(30) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            found = registry_alarms(&reg, &fc.id).await;
        }
        found
    };
    assert!(!alarms.is_empty(), "the registry raised no alarm");
    let (kind, message) = &alarms[0];
    assert!(
        kind == "checkpoint_refused" || kind == "divergence",
        "{kind}"
    );
    assert!(message.contains(&fc.id), "{message}");
    assert!(
        message.contains(&format!(
            "last good checkpoint: {} entries, root {}",
            good.0, good.1
        )),
        "{message} / {good:?}"
    );
    // The station itself raises it as a critical alarm on its console.
    let db = fc.cell.db();
    wait_for("the station's alarm", Duration::from_secs(20), || {
        q(
            &db,
            "SELECT count(*) FROM alarms WHERE kind = 'fleet.registry_alarm'",
        ) > 0
    })
    .await;
    // No checkpoint the restored journal writes is accepted; the audit view says so.
    let admin = reg.admin().await;
    let accepted_after: i64 = one(
        &admin,
        "SELECT count(*) FROM fleet.checkpoints WHERE station = $1 AND tree_size > $2",
        &[&fc.id, &good.0],
    )
    .await;
    assert_eq!(accepted_after, 0);
    let after = station::fleet::audit(&admin).await.unwrap();
    assert!(!after[0].ok());
    assert_eq!(after[0].last_verified, Some(good));

    // The restored journal's leases were behind the numbers it had issued since the backup: they
    // were moved past what the registry saw, and the next batch issues no number twice.
    let highest = one(
        &admin,
        "SELECT max((body::jsonb ->> 'serial_no')::bigint) FROM fleet.records WHERE station = $1 AND kind = 'meter'",
        &[&fc.id],
    )
    .await;
    let behind = format!(
        "SELECT count(*) FROM leases WHERE state = 'granted' AND first <= {highest} AND next <= {highest}"
    );
    wait_for(
        "the leases moved past the registry's numbers",
        Duration::from_secs(20),
        || q(&db, &behind) == 0,
    )
    .await;
    let client = fc.cell.client().await;
    let sup = fc.cell.login(&client, "super").await;
    next_batch(&fc, &client, &sup, "WO-E2E-3").await;
    let oper = fc.cell.login(&client, "oper").await;
    let s = station::run::run_line(&client, &oper, false, true)
        .await
        .unwrap();
    assert!(s.batch_complete, "{s:?}");
    let lowest_new = q(
        &db,
        "SELECT min(m.serial_no) FROM meters m JOIN batches b ON b.id = m.batch_id WHERE b.work_order = 'WO-E2E-3'",
    );
    assert!(lowest_new > highest, "{lowest_new} <= {highest}");
    wait_for("the skip audited", Duration::from_secs(20), || {
        q(
            &db,
            "SELECT count(*) FROM audit WHERE kind = 'fleet.numbers_skipped'",
        ) == 1
    })
    .await;
    drained(&fc.cell, Duration::from_secs(30)).await;
    let duplicates = one(
        &admin,
        "SELECT count(*) FROM fleet.alarms WHERE station = $1 AND kind = 'duplicate_number'",
        &[&fc.id],
    )
    .await;
    assert_eq!(duplicates, 0, "no number issued twice after the restore");
    daemon.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_of_another_pki_or_another_stations_rows_are_refused() {
    let reg = RegistryDb::new(&Registry::shared(), FLAG).await;
    let a = fleet_cell(&reg, "s", small(1), 5, 1).await;
    let b = fleet_cell(&reg, "t", small(1), 5, 1).await;
    let ep = |fc: &FleetCell, cert: &Path, key: &Path| reg.endpoint(&fc.id, cert, key);
    let own = |fc: &FleetCell, f: &str| fc.cell.path(&format!("registry/{}{f}", fc.id));
    let mut ca = station::fleet::connect(&ep(&a, &own(&a, ".pem"), &own(&a, "-key.pem")))
        .await
        .unwrap();

    // Another PKI: a CA of its own issues a certificate with station a's name.
    let dir = a.cell.path("rogue");
    std::fs::create_dir_all(&dir).unwrap();
    e2e::registry::openssl_issue(
        &dir,
        "rogue-ca",
        "cert",
        &a.id,
        "extendedKeyUsage = clientAuth\n",
    );
    let Err(e) = station::fleet::connect(&ep(&a, &own(&b, ".pem"), &own(&b, "-key.pem"))).await
    else {
        panic!("b's certificate is not a's");
    };
    assert!(
        e.to_string().contains("certificate authentication failed"),
        "{e}"
    );

    // Station a writing station b's rows, or what only the registry writes.
    let e = ca
        .execute(
            "INSERT INTO fleet.records (station, seq, kind, body) VALUES ($1, 1, 'meter', '{}')",
            &[&b.id],
        )
        .await
        .unwrap_err();
    assert!(
        station::fleet::pg_message(&e).contains("row-level security"),
        "{e}"
    );
    for sql in [
        "INSERT INTO fleet.meters (station, meter_id, seq, uid, state) VALUES (current_user, 1, 1, 'AA', 'done')",
        "INSERT INTO fleet.checkpoints (station, seq, tree_size, root, note) VALUES (current_user, 1, 1, '\\x00', '')",
        "INSERT INTO fleet.alarms (station, kind, message) VALUES (current_user, 'x', 'y')",
        "INSERT INTO fleet.leases (station, request, flag, first, last) VALUES (current_user, 'r', 'DMW', 900000000, 900000100)",
        "UPDATE fleet.number_spaces SET next = 1",
        "DELETE FROM fleet.records",
        "UPDATE fleet.records SET body = '{}'",
    ] {
        let e = ca.batch_execute(sql).await.unwrap_err();
        let m = station::fleet::pg_message(&e);
        assert!(
            m.contains("permission denied") || m.contains("append-only"),
            "{sql}: {m}"
        );
    }
    // Its own rows only, as far as it can see.
    let tx = ca.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO fleet.records (seq, kind, body) VALUES (1000, 'batch', '{\"work_order\": \"WO-X\"}')",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let admin = reg.admin().await;
    admin
        .execute(
            "INSERT INTO fleet.records (station, seq, kind, body) VALUES ($1, 1000, 'batch', '{}')",
            &[&b.id],
        )
        .await
        .unwrap();
    let seen: i64 = ca
        .query_one("SELECT count(*) FROM fleet.records", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen, 1, "a station sees its own records only");
    // A role that is a station but not enrolled in this registry gets no numbers.
    let ghost = station_id("ghost");
    admin
        .batch_execute(&format!(
            "CREATE ROLE \"{ghost}\" LOGIN IN ROLE fleet_station; SET SESSION AUTHORIZATION \"{ghost}\""
        ))
        .await
        .unwrap();
    let e = admin
        .query("SELECT * FROM fleet.take_lease('r1', 10)", &[])
        .await
        .unwrap_err();
    assert!(
        station::fleet::pg_message(&e).contains("is not enrolled"),
        "{e}"
    );
    let _ = &mut ca;
}

/// The registry's own check of consistency proofs (PL/pgSQL) agrees with RFC 9162 as the
/// station computes it, for every pair of tree sizes up to 24, and refuses altered proofs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_checks_consistency_proofs_as_rfc_9162_does() {
    let reg = RegistryDb::new(&Registry::shared(), FLAG).await;
    let admin = reg.admin().await;
    let leaves: Vec<[u8; 32]> = (0u8..24)
        .map(|i| station::merkle::leaf_hash(&[i]))
        .collect();
    let stmt = admin
        .prepare("SELECT fleet.verify_consistency($1, $2, $3, $4, $5)")
        .await
        .unwrap();
    let check = async |n1: i64, n2: i64, proof: &[Vec<u8>], r1: &[u8], r2: &[u8]| -> bool {
        admin
            .query_one(&stmt, &[&n1, &n2, &proof, &r1, &r2])
            .await
            .unwrap()
            .get(0)
    };
    for n2 in 1..=24usize {
        let r2 = station::merkle::root(&leaves[..n2]);
        for n1 in 1..=n2 {
            let r1 = station::merkle::root(&leaves[..n1]);
            let proof: Vec<Vec<u8>> = station::merkle::consistency_proof(n1, &leaves[..n2])
                .unwrap()
                .into_iter()
                .map(|h| h.to_vec())
                .collect();
            assert!(
                check(n1 as i64, n2 as i64, &proof, &r1, &r2).await,
                "{n1} -> {n2}"
            );
            if n1 < n2 {
                let mut bad_root = r1;
                bad_root[0] ^= 1;
                assert!(!check(n1 as i64, n2 as i64, &proof, &bad_root, &r2).await);
                let mut bad = proof.clone();
                if let Some(h) = bad.last_mut() {
                    h[31] ^= 1;
                    assert!(
                        !check(n1 as i64, n2 as i64, &bad, &r1, &r2).await,
                        "{n1} -> {n2}"
                    );
                }
                // A size the proof was not made for: whatever RFC 9162's algorithm says.
                let hashes: Vec<[u8; 32]> = proof
                    .iter()
                    .map(|h| h.as_slice().try_into().unwrap())
                    .collect();
                assert_eq!(
                    check(n1 as i64, n2 as i64 + 1, &proof, &r1, &r2).await,
                    station::merkle::verify_consistency(
                        n1 as u64,
                        n2 as u64 + 1,
                        &hashes,
                        &r1,
                        &r2
                    ),
                    "{n1} -> {n2} + 1"
                );
            }
        }
    }
    let _: &ServerInfo = &reg.info;
}

/// The registry's own trigger decides what continues a station's log: checkpoint records
/// written straight into the registry (as its administrator, past row-level security) with real
/// tree heads and proofs. A tree that extends the last accepted one is accepted; one that does
/// not, a smaller one, or a proof from another size is refused with an alarm naming the last good
/// checkpoint; a sequence number used again is dropped, with an alarm when the body differs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_registry_accepts_only_checkpoints_that_extend_the_last_one() {
    use base64::Engine as _;
    let reg = RegistryDb::new(&Registry::shared(), FLAG).await;
    let admin = reg.admin().await;
    let station = station_id("cp");
    let b64 = |h: &[u8]| base64::engine::general_purpose::STANDARD.encode(h);
    let tree = |tag: u8, n: u8| -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| station::merkle::leaf_hash(&[if i >= 3 { tag } else { 0 }, i]))
            .collect()
    };
    let (a, b) = (tree(1, 12), tree(2, 12));
    let push = async |seq: i64, leaves: &[[u8; 32]], size: usize, from: usize| {
        let root = station::merkle::root(&leaves[..size]);
        let proof: Vec<Vec<u8>> = if from > 0 && from < size {
            station::merkle::consistency_proof(from, &leaves[..size])
                .unwrap()
                .iter()
                .map(|h| h.to_vec())
                .collect()
        } else {
            Vec::new()
        };
        let body = serde_json::json!({
            "checkpoint_id": seq, "tree_size": size, "root": b64(&root), "proof_from": from,
            "note": format!("{station}\n{size}\n{}\n", b64(&root)),
        })
        .to_string();
        admin
            .execute(
                "INSERT INTO fleet.records (station, seq, kind, body, proof) VALUES ($1, $2, 'checkpoint', $3, $4)",
                &[&station, &seq, &body, &proof],
            )
            .await
            .unwrap();
    };
    let verdict = async |seq: i64| -> String {
        admin
            .query_one(
                "SELECT verdict FROM fleet.records WHERE station = $1 AND seq = $2",
                &[&station, &seq],
            )
            .await
            .unwrap()
            .get(0)
    };
    push(1, &a, 6, 0).await;
    push(2, &a, 10, 6).await;
    assert_eq!(
        (verdict(1).await, verdict(2).await),
        ("accepted".into(), "accepted".into())
    );
    // Another history from entry 4 on, with a proof that is right for it.
    push(3, &b, 12, 10).await;
    // A smaller tree; a proof from an older checkpoint than the last good one.
    push(4, &a, 8, 6).await;
    push(5, &a, 12, 6).await;
    for seq in 3..=5 {
        assert_eq!(verdict(seq).await, "refused", "record {seq}");
    }
    // The same history, extended: accepted.
    push(6, &a, 12, 10).await;
    assert_eq!(verdict(6).await, "accepted");
    let alarms = registry_alarms(&reg, &station).await;
    assert_eq!(alarms.len(), 3, "{alarms:?}");
    let good = b64(&station::merkle::root(&a[..10]));
    for (kind, message) in &alarms {
        assert_eq!(kind, "checkpoint_refused");
        assert!(
            message.contains(&station)
                && message.contains(&format!("last good checkpoint: 10 entries, root {good}")),
            "{message}"
        );
    }
    // A record sent again: the same body changes nothing, another body is an alarm.
    push(6, &a, 12, 10).await;
    assert_eq!(registry_alarms(&reg, &station).await.len(), 3);
    push(6, &b, 12, 10).await;
    let alarms = registry_alarms(&reg, &station).await;
    assert_eq!(alarms.len(), 4);
    assert!(
        alarms[3].1.contains("differs from the one received"),
        "{:?}",
        alarms[3]
    );
    let accepted = one(
        &admin,
        "SELECT count(*) FROM fleet.checkpoints WHERE station = $1",
        &[&station],
    )
    .await;
    assert_eq!(accepted, 3);
}

/// The registry's unique constraints are the last line of defence: a number arriving from a
/// second station (or twice from one) is an alarm naming both, and the push still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_number_issued_twice_is_an_alarm_not_a_failed_push() {
    let reg = RegistryDb::new(&Registry::shared(), FLAG).await;
    let admin = reg.admin().await;
    let (a, b) = (station_id("dupa"), station_id("dupb"));
    let meter = |id: i64, uid: &str, serial_no: i64| {
        serde_json::json!({
            "meter_id": id, "work_order": "WO-1", "uid": uid, "nest": 1, "state": "done",
            "serial": format!("E2E{serial_no:09}"), "serial_no": serial_no,
            "system_title": format!("444D57{serial_no:010X}"), "operator": "oper",
            "started_at": 0, "finished_at": 1,
        })
        .to_string()
    };
    for (station, seq, body) in [
        (&a, 1i64, meter(1, "AA01", 500)),
        (&b, 1, meter(1, "BB01", 501)),
        (&b, 2, meter(2, "BB02", 500)),
    ] {
        admin
            .execute(
                "INSERT INTO fleet.records (station, seq, kind, body) VALUES ($1, $2, 'meter', $3)",
                &[station, &seq, &body],
            )
            .await
            .unwrap();
    }
    assert_eq!(
        one(&admin, "SELECT count(*) FROM fleet.records", &[]).await,
        3,
        "every record is kept"
    );
    assert_eq!(
        one(&admin, "SELECT count(*) FROM fleet.meters", &[]).await,
        2
    );
    let alarms = registry_alarms(&reg, &b).await;
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    let (kind, message) = &alarms[0];
    assert_eq!(kind, "duplicate_number");
    assert!(
        message.contains(&b) && message.contains(&a) && message.contains("E2E000000500"),
        "{message}"
    );
}

/// A station's daemon with its line started by the operator.
async fn start_line(fc: &FleetCell) -> Daemon {
    let d = fc.cell.daemon().await;
    let client = fc.cell.client().await;
    let oper = fc.cell.login(&client, "oper").await;
    client
        .execute(&oper, station::Command::StartLine)
        .await
        .unwrap();
    d
}

/// Scans `code` into nest 1 once the nest asks for it.
async fn scan_nameplate(fc: &FleetCell, d: &Daemon, code: &str) {
    use tokio::io::AsyncWriteExt;
    let engine = d.engine().clone();
    wait_for(
        "the nest to ask for the nameplate",
        Duration::from_secs(30),
        || engine.snapshot().nests[0].message.as_deref() == Some("scan the meter's nameplate"),
    )
    .await;
    fc.cell.scanners.lock().await[0]
        .write_all(format!("{code}\r").as_bytes())
        .await
        .unwrap();
}

/// Nameplates printed before the cells, and a factory registry: a serial that one station
/// provisioned is refused at another (its nameplate was printed twice, or the meter was taken to a
/// second cell), named with the station that has it; a fresh serial goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scanned_serial_another_station_provisioned_is_refused_by_the_registry_check() {
    let reg = RegistryDb::new(&Registry::shared(), FLAG).await;
    let opts = || CellOptions {
        nests: 1,
        quantity: 2,
        firmware_kib: 8,
        scanners: true,
        ..CellOptions::default()
    };
    let a = fleet_cell(&reg, "scana", opts(), 100, 10).await;
    let b = fleet_cell(&reg, "scanb", opts(), 100, 10).await;
    let da = start_line(&a).await;
    scan_nameplate(&a, &da, "E2E000000777").await;
    let dba = a.cell.db();
    wait_for("station A's meter", Duration::from_secs(60), || {
        q(&dba, "SELECT count(*) FROM meters WHERE state = 'done'") == 1
    })
    .await;
    drained(&a.cell, Duration::from_secs(60)).await;
    let db_ = b.cell.db();
    let db_b = start_line(&b).await;
    scan_nameplate(&b, &db_b, "E2E000000777").await;
    wait_for("the refusal", Duration::from_secs(30), || {
        q(
            &db_,
            "SELECT count(*) FROM audit WHERE kind = 'meter.refused'",
        ) == 1
    })
    .await;
    let why: String = db_
        .query_row(
            "SELECT details FROM audit WHERE kind = 'meter.refused'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        why.contains("already provisioned at station") && why.contains(&a.id),
        "{why}"
    );
    assert_eq!(
        q(&db_, "SELECT count(*) FROM meters"),
        0,
        "no record for the refused meter"
    );
    // A serial no station has goes through.
    scan_nameplate(&b, &db_b, "E2E000000778").await;
    wait_for("station B's meter", Duration::from_secs(60), || {
        q(&db_, "SELECT count(*) FROM meters WHERE state = 'done'") == 1
    })
    .await;
    assert_eq!(
        q(
            &db_,
            "SELECT count(*) FROM audit WHERE kind = 'fleet.scan_unchecked'"
        ),
        0,
        "the registry answered every check"
    );
    db_b.stop().await.unwrap();
    da.stop().await.unwrap();
}
