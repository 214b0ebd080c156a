//! `cargo xtask bench fleet`: the factory registry under load, on a real PostgreSQL server on
//! loopback (the `e2e-registry` binary), over TLS with client certificates, through the
//! station's own outbox code (`station::fleet::{pending, push, ack}`) reading real journals
//! whose outbox rows the journal's triggers wrote.
//!
//! Prints JSON lines:
//! - `ingest`: records per second the registry takes from 3 stations pushing at once, against
//!   20× the combined rate of 3 stations of 16 nests (the `station` benchmark's 16-nest figure);
//! - `drain`: how long a 16-nest station takes to send the backlog of a 10-minute outage, with
//!   the line still producing while it drains;
//! - `outbox_cost`: what the outbox costs the station per meter: the trigger's share of the
//!   transaction that finishes a meter (journal with and without it, `synchronous=FULL` as the
//!   station runs), and the push loop's time per record.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use e2e::registry::{Registry, RegistryDb, openssl_issue};
use rusqlite::params;
use sha2::Digest as _;

/// Meters per hour of one 16-nest station in the `station` benchmark (README).
const STATION_16_NESTS_PER_HOUR: f64 = 103_764.0;
const FLAG: &str = "BEN";

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(bench());
}

/// A journal with `meters` finished meters numbered from `first` (two delivered certificates
/// each), whose outbox the triggers filled.
fn journal(path: &Path, first: i64, meters: i64) -> station::db::Db {
    let db = station::db::Db::open(path).unwrap();
    db.with(|c| {
        let tx = c.transaction().unwrap();
        tx.execute(
            "INSERT INTO firmware (sha256, version, size, image, signer_key_hash, imported_at, imported_by) VALUES ('f', '2.0.0', 1, x'00', 'k', 0, 'o')",
            [],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO customers (name, cert_der, fingerprint, imported_at, imported_by) VALUES ('u', x'00', 'fp', 0, 'o')",
            [],
        )
        .unwrap();
        tx.execute(
            "INSERT INTO batches (work_order, model, firmware_id, customer_id, quantity, serial_prefix, serial_first, serial_last, next_serial, state, transport_key, transport_wrapped, transport_kcv, oaep_hash, opened_at, opened_by)
             VALUES ('WO-B', 'EM-300', 1, 1, 1000000, 'B', 0, 999999999, 0, 'open', 'tk', x'00', 'kcv', 'sha256', 0, 's')",
            [],
        )
        .unwrap();
        tx.commit().unwrap();
        let mut done = 0;
        while done < meters {
            let tx = c.transaction().unwrap();
            for _ in 0..1000.min(meters - done) {
                finish_meter(&tx, first + done);
                done += 1;
            }
            tx.commit().unwrap();
        }
    });
    db
}

/// One meter through its last step: assigned and sealed, its certificates delivered, done.
fn finish_meter(tx: &rusqlite::Transaction<'_>, n: i64) {
    tx.execute(
        "INSERT INTO meters (batch_id, uid, nest, state, serial, serial_no, system_title, ldn, fw_sha256, operator, started_at)
         VALUES (1, ?1, ?2, 'sealed', ?3, ?4, ?5, ?6, 'f', 'oper', ?7)",
        params![
            format!("{n:024X}"),
            n % 16 + 1,
            format!("B{n:09}"),
            n,
            format!("42454E{n:010X}"),
            format!("BEN{n:013}"),
            1_700_000_000_000i64 + n,
        ],
    )
    .unwrap();
    let id = tx.last_insert_rowid();
    for slot in ["sign", "ka"] {
        tx.execute(
            "INSERT INTO certificates (meter_id, slot, state, serial, der, fingerprint, created_at, updated_at) VALUES (?1, ?2, 'delivered', ?3, zeroblob(480), ?4, 0, 0)",
            params![id, slot, format!("{slot}{n:030}"), format!("{n:064x}")],
        )
        .unwrap();
    }
    tx.execute(
        "UPDATE meters SET state = 'done', finished_at = ?2 WHERE id = ?1",
        params![id, 1_700_000_000_500i64 + n],
    )
    .unwrap();
}

/// Pushes the whole outbox of `db` as the station's task does; returns the records sent and the
/// time spent in the journal (reading, acknowledging) on the station's side.
async fn push_all(
    db: &station::db::Db,
    client: &mut tokio_postgres::Client,
    batch: u32,
) -> (usize, Duration) {
    let mut sent = 0;
    let mut local = Duration::ZERO;
    loop {
        let t = Instant::now();
        let recs = db.with(|c| station::fleet::pending(c, batch)).unwrap();
        local += t.elapsed();
        if recs.is_empty() {
            return (sent, local);
        }
        let report = station::fleet::push(client, &recs).await.unwrap();
        assert!(report.alarms.is_empty(), "{:?}", report.alarms);
        let t = Instant::now();
        db.with(|c| station::fleet::ack(c, report.acked)).unwrap();
        local += t.elapsed();
        sent += recs.len();
    }
}

struct BenchStation {
    db: station::db::Db,
    client: tokio_postgres::Client,
}

async fn station(reg: &RegistryDb, dir: &Path, id: &str, first: i64, meters: i64) -> BenchStation {
    openssl_issue(dir, "bench-ca", id, id, "extendedKeyUsage = clientAuth\n");
    let pem = std::fs::read_to_string(dir.join(format!("{id}.pem"))).unwrap();
    station::fleet::enrol(&reg.admin().await, id, FLAG, &pem)
        .await
        .unwrap();
    let db = journal(&dir.join(format!("{id}.db")), first, meters);
    let ep = reg.endpoint(
        id,
        &dir.join(format!("{id}.pem")),
        &dir.join(format!("{id}-key.pem")),
    );
    let client = station::fleet::connect(&ep).await.unwrap();
    BenchStation { db, client }
}

async fn bench() {
    let server = Registry::private_durable();
    let reg = RegistryDb::new(&server.info, FLAG).await;
    let dir = tempfile::tempdir().unwrap();
    openssl_issue(
        dir.path(),
        "bench-ca",
        "probe",
        "probe",
        "extendedKeyUsage = clientAuth\n",
    );
    reg.trust_client_ca(&std::fs::read_to_string(dir.path().join("bench-ca.pem")).unwrap())
        .await;
    let per_s = STATION_16_NESTS_PER_HOUR / 3600.0;

    // Ingest: three stations push 20 000 records each at once.
    let per_station = 20_000;
    let mut stations = Vec::new();
    for (i, id) in ["bench-a", "bench-b", "bench-c"].into_iter().enumerate() {
        stations.push(station(&reg, dir.path(), id, 1 + i as i64 * 1_000_000, per_station).await);
    }
    let t = Instant::now();
    let mut runs = Vec::new();
    for s in stations.iter_mut() {
        runs.push(push_all(&s.db, &mut s.client, 500));
    }
    let mut total = 0;
    for r in futures_join(runs).await {
        total += r.0;
    }
    let secs = t.elapsed().as_secs_f64();
    let rate = total as f64 / secs;
    let goal = 20.0 * 3.0 * per_s;
    let admin = reg.admin().await;
    let arrived: i64 = admin
        .query_one("SELECT count(*) FROM fleet.meters", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(arrived, 3 * per_station);
    println!(
        "{}",
        serde_json::json!({
            "bench": "fleet", "case": "ingest", "stations": 3, "records": total,
            "seconds": round(secs), "records_per_s": round(rate),
            "provisioning_per_s_3x16_nests": round(3.0 * per_s), "goal_records_per_s": round(goal),
            "ratio_to_provisioning": round(rate / (3.0 * per_s)), "meets_goal": rate >= goal,
        })
    );

    // Drain: the backlog of a 10-minute outage of one 16-nest station.
    let backlog = (600.0 * per_s).round() as i64;
    let mut s = station(&reg, dir.path(), "bench-d", 5_000_000, backlog).await;
    let t = Instant::now();
    let (sent, local) = push_all(&s.db, &mut s.client, 500).await;
    let secs = t.elapsed().as_secs_f64();
    let push_rate = sent as f64 / secs;
    // The line keeps producing while the backlog drains.
    let with_production = backlog as f64 / (push_rate - per_s);
    println!(
        "{}",
        serde_json::json!({
            "bench": "fleet", "case": "drain", "outage_s": 600, "backlog_records": backlog,
            "seconds": round(secs), "seconds_with_line_running": round(with_production),
            "records_per_s": round(push_rate),
        })
    );
    let push_ms_per_record = local.as_secs_f64() * 1000.0 / sent as f64;
    drop(s);

    // The outbox's cost per meter on the station: the same finishing transaction with and
    // without the trigger, alternately, one transaction per meter as the station commits.
    let with = journal(&dir.path().join("cost-with.db"), 1, 0);
    let without = journal(&dir.path().join("cost-without.db"), 1, 0);
    without.with(|c| {
        c.execute_batch("DROP TRIGGER outbox_meter; DROP TRIGGER outbox_void;")
            .unwrap();
    });
    let rounds = 5;
    let per_round = 400;
    let (mut t_with, mut t_without) = (Vec::new(), Vec::new());
    let mut n = 0;
    for _ in 0..rounds {
        for (db, out) in [(&with, &mut t_with), (&without, &mut t_without)] {
            let t = Instant::now();
            for k in 0..per_round {
                db.with(|c| {
                    let tx = c.transaction().unwrap();
                    finish_meter(&tx, n + k + 1);
                    tx.commit().unwrap();
                });
            }
            out.push(t.elapsed().as_secs_f64() * 1000.0 / f64::from(per_round as u32));
        }
        n += per_round;
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (mw, mo) = (median(&mut t_with), median(&mut t_without));
    let trigger_ms = (mw - mo).max(0.0);
    println!(
        "{}",
        serde_json::json!({
            "bench": "fleet", "case": "outbox_cost",
            "finish_meter_ms_with_outbox": round(mw), "finish_meter_ms_without": round(mo),
            "trigger_ms_per_meter": round(trigger_ms), "push_ms_per_record": round(push_ms_per_record),
            "total_ms_per_meter": round(trigger_ms + push_ms_per_record),
            "goal_ms": 1.0, "meets_goal": trigger_ms + push_ms_per_record <= 1.0,
        })
    );

    // A checkpoint's record on a station whose log is long: its consistency proof from the
    // previous checkpoint's kept right edge and the entries since, against the whole log.
    let (entries, gap) = (300_000i64, 1_000i64);
    let db = journal(&dir.path().join("long-log.db"), 1, 0);
    db.with(|c| {
        let tx = c.transaction().unwrap();
        let mut tree = station::merkle::Frontier::new();
        for seq in 1..=entries {
            let chain = sha2::Sha256::digest(seq.to_be_bytes()).to_vec();
            tx.execute(
                "INSERT INTO audit (seq, ts, source, kind, severity, actor, details, hash, sig) VALUES (?1, 0, 'b', 'k', 'info', 'a', '{}', ?2, x'00')",
                params![seq, chain],
            )
            .unwrap();
            tree.push(station::merkle::leaf_hash(&chain));
            if seq == entries - gap || seq == entries {
                let note = format!(
                    "{}\n\u{2014} bench AAAA\n",
                    station::audit::checkpoint_text("bench", seq, &tree.root(), &chain)
                );
                tx.execute(
                    "INSERT INTO audit_checkpoints (seq, hash, note, reason, created_at, frontier) VALUES (?1, ?2, ?3, 'interval', 0, ?4)",
                    params![seq, chain, note, tree.to_bytes()],
                )
                .unwrap();
            }
        }
        tx.commit().unwrap();
    });
    let time_record = |db: &station::db::Db| {
        let t = Instant::now();
        let recs = db.with(|c| station::fleet::pending(c, 10)).unwrap();
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        let cp = recs.iter().rfind(|r| r.kind == "checkpoint").unwrap();
        assert!(!cp.proof.as_ref().unwrap().is_empty());
        ms
    };
    let from_edge = (0..5).map(|_| time_record(&db)).fold(f64::MAX, f64::min);
    db.with(|c| c.execute("UPDATE audit_checkpoints SET frontier = NULL", []))
        .unwrap();
    let whole_log = (0..2).map(|_| time_record(&db)).fold(f64::MAX, f64::min);
    println!(
        "{}",
        serde_json::json!({
            "bench": "fleet", "case": "checkpoint_record", "log_entries": entries,
            "entries_since_previous": gap, "ms_from_kept_edge": round(from_edge),
            "ms_from_whole_log": round(whole_log),
        })
    );
    drop(server);
}

/// Runs futures on one task, concurrently.
async fn futures_join<F: Future>(fs: Vec<F>) -> Vec<F::Output> {
    let mut fs: Vec<_> = fs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = fs.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (f, o) in fs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *o = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.unwrap()).collect()
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
