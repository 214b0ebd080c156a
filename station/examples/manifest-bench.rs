//! Manifest export and verification at scale (`cargo xtask bench manifest`). Prints one JSON
//! object per line, for batches of 1 000 and 20 000 meters:
//!
//! `{"meters": N, "export_s": F, "verify_s": F, "peak_rss_bytes": B, "manifest_bytes": B,
//! "pskc_bytes": B}`
//!
//! - `export_s`: `Command::Export` of the closed batch through the engine (journal to
//!   `manifest.json` and `manifest.p7m` signed in the HSM), in a process of its own;
//! - `verify_s`: `station::manifest::verify::verify_file` of that `manifest.p7m` against the
//!   root, in a process of its own — everything a utility checks;
//! - `peak_rss_bytes`: the larger peak resident set (VmHWM) of those two processes;
//! - `manifest_bytes`: the size of `manifest.p7m`;
//! - `pskc_bytes`: the size of `keys.pskc`, the PSKC container the export writes too (its time
//!   is part of `export_s`).
//!
//! Goals: 20 000 meters exported in at most 20 s and verified in at most 10 s, with peak memory
//! under four times the manifest's size.
//!
//! With `report` first (`cargo xtask bench report`), the journal also gets the audit entries the
//! line writes for each meter (signed by the audit key in the HSM), and the batch evidence
//! report is timed as `station report` makes it, in a process of its own: copy the journal,
//! verify the whole audit log, gather, render, write. One line per size:
//!
//! `{"meters": N, "audit_entries": N, "export_s": F, "export_peak_rss_bytes": B,
//! "pskc_bytes": B, "manifest_bytes": B, "report_s": F, "report_peak_rss_bytes": B,
//! "report_rss_growth_bytes": B, "report_bytes": B}`
//!
//! - `export_s`: the whole export, which writes the PSKC container, the manifest, the CRL and
//!   `report.html` (so it bounds the PSKC export's time);
//! - `report_rss_growth_bytes`: the report's peak resident set less the process's before it
//!   began (the binary, the runtime and SQLite's page cache are not the report's).
//!
//! Goals: the report of 20 000 meters in at most 10 s, the PSKC export in at most 5 s.
//!
//! Running 20 000 meters through the jig would take hours, so the batch is made directly in the
//! journal — with real content, so that export and verification do all their real work: a
//! SoftHSM token with the demo PKI, a signed firmware release, a customer and a batch as a cell
//! has them; per meter two certificates issued by the device CA in the HSM for software P-256
//! keys, the four AES keys generated in the HSM and wrapped there under the batch transport key
//! with their check values, and an attestation receipt signed with the meter's key. One meter in
//! 200 fails, leaving a voided certificate. Rows are written as the provisioning pipeline writes
//! them; the per-meter audit entries are left out (the export does not read them).

// A benchmark tool: a failed set-up step should stop it with the reason.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Instant;

use p256::ecdsa::signature::Signer;
use p256::elliptic_curve::Generate;
use rusqlite::params;
use station::config::Config;
use station::engine::BatchSpec;
use station::{Command, Engine, OpenOptions, Reply};

mod common;

const MODEL: &str = "EM-300";
const PIN: &str = "246810";
const SIZES: [usize; 2] = [1_000, 20_000];
/// Meters per HSM job.
const CHUNK: usize = 250;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("export") => child_export(Path::new(&args[1])),
        Some("verify") => child_verify(Path::new(&args[1])),
        Some("report-child") => child_report(Path::new(&args[1])),
        Some("report") => {
            let sizes: Vec<usize> = if args.len() == 1 {
                SIZES.to_vec()
            } else {
                args[1..]
                    .iter()
                    .map(|a| a.parse().expect("meter counts"))
                    .collect()
            };
            for n in sizes {
                bench_report(n);
            }
        }
        _ => {
            let sizes: Vec<usize> = if args.is_empty() {
                SIZES.to_vec()
            } else {
                args.iter()
                    .map(|a| a.parse().expect("meter counts"))
                    .collect()
            };
            for n in sizes {
                bench(n);
            }
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Peak resident set of this process, bytes (VmHWM).
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .expect("VmHWM in /proc/self/status")
}

/// Runs this example again as `what DIR`; returns its JSON answer.
fn child(what: &str, dir: &Path) -> serde_json::Value {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .arg(what)
        .arg(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "the {what} process failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn bench(n: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let t0 = Instant::now();
    runtime().block_on(make_cell(&dir, n, false));
    eprintln!(
        "manifest-bench: {n} meters made in the journal in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let export = child("export", &dir);
    let verify = child("verify", &dir);
    let p7m = dir.join("export/manifest.p7m");
    let manifest_bytes = std::fs::metadata(&p7m).unwrap().len();
    let pskc_bytes = std::fs::metadata(dir.join("export/keys.pskc"))
        .unwrap()
        .len();
    let (export_rss, verify_rss) = (
        export["peak_rss_bytes"].as_u64().unwrap(),
        verify["peak_rss_bytes"].as_u64().unwrap(),
    );
    eprintln!(
        "manifest-bench: {n} meters: export {:.2} s (peak RSS {:.1} MiB), verify {:.2} s (peak RSS {:.1} MiB), manifest {:.1} MiB",
        export["s"].as_f64().unwrap(),
        export_rss as f64 / 1048576.0,
        verify["s"].as_f64().unwrap(),
        verify_rss as f64 / 1048576.0,
        manifest_bytes as f64 / 1048576.0
    );
    println!(
        "{}",
        serde_json::json!({
            "meters": n,
            "export_s": round(export["s"].as_f64().unwrap()),
            "verify_s": round(verify["s"].as_f64().unwrap()),
            "peak_rss_bytes": export_rss.max(verify_rss),
            "manifest_bytes": manifest_bytes,
            "pskc_bytes": pskc_bytes,
        })
    );
}

fn bench_report(n: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    let t0 = Instant::now();
    runtime().block_on(make_cell(&dir, n, true));
    eprintln!(
        "report-bench: {n} meters and their audit entries made in the journal in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let export = child("export", &dir);
    let report = child("report-child", &dir);
    let size = |f: &str| std::fs::metadata(dir.join(f)).unwrap().len();
    let (pskc_bytes, report_bytes) = (size("export/keys.pskc"), size("report/report.html"));
    eprintln!(
        "report-bench: {n} meters, {} audit entries: export (PSKC, manifest, report) {:.2} s, report {:.2} s (peak RSS {:.1} MiB, {:.1} MiB of it the report's), report.html {:.0} KiB",
        report["entries"],
        export["s"].as_f64().unwrap(),
        report["s"].as_f64().unwrap(),
        report["peak_rss_bytes"].as_u64().unwrap() as f64 / 1048576.0,
        report["growth_bytes"].as_u64().unwrap() as f64 / 1048576.0,
        report_bytes as f64 / 1024.0
    );
    println!(
        "{}",
        serde_json::json!({
            "meters": n,
            "audit_entries": report["entries"],
            "export_s": round(export["s"].as_f64().unwrap()),
            "export_peak_rss_bytes": export["peak_rss_bytes"],
            "pskc_bytes": pskc_bytes,
            "manifest_bytes": size("export/manifest.p7m"),
            "report_s": round(report["s"].as_f64().unwrap()),
            "report_peak_rss_bytes": report["peak_rss_bytes"],
            "report_rss_growth_bytes": report["growth_bytes"],
            "report_bytes": report_bytes,
        })
    );
}

/// Child: the evidence report of batch 1, as `station report` makes it from the journal.
fn child_report(dir: &Path) {
    let before = current_rss();
    let root = station::manifest::verify::read_cert(&dir.join("pki/root-ca.pem")).unwrap();
    let cfg = Config::load(&dir.join("station.toml")).unwrap();
    let t0 = Instant::now();
    let copy = station::audit::JournalCopy::of(&cfg.database).unwrap();
    let (key, signer) = station::audit::offline_key(&copy.conn, &root, None).unwrap();
    let ctx = station::report::Context {
        station_id: cfg.station_id.clone(),
        bauds: cfg.nests.iter().map(|n| n.baud).collect(),
        audit_key: key,
        audit_signer: signer,
        pending_export: None,
        now_ms: station::db::now_ms(),
        anchored: false,
    };
    let r = station::report::gather(&copy.conn, 1, &ctx).unwrap();
    drop(copy);
    let html = station::report::html::render(&r);
    std::fs::create_dir_all(dir.join("report")).unwrap();
    station::report::write_file(&dir.join("report/report.html"), html.as_bytes()).unwrap();
    let s = t0.elapsed().as_secs_f64();
    assert!(r.audit.ok(), "{:?}", r.audit);
    assert_eq!(r.exports.len(), 1);
    let peak = peak_rss();
    println!(
        "{}",
        serde_json::json!({"s": s, "peak_rss_bytes": peak, "growth_bytes": peak.saturating_sub(before), "entries": r.audit.entries})
    );
}

/// Resident set of this process now, bytes (VmRSS).
fn current_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

async fn open(dir: &Path) -> Engine {
    Engine::open(
        Config::load(&dir.join("station.toml")).unwrap(),
        OpenOptions {
            source: "bench".into(),
            nests: false,
        },
    )
    .await
    .unwrap()
}

/// Child: exports the batch through the engine.
fn child_export(dir: &Path) {
    runtime().block_on(async {
        let engine = open(dir).await;
        let officer = engine.login("officer", PIN).await.unwrap();
        let t0 = Instant::now();
        let r = engine
            .execute(
                &officer,
                Command::Export {
                    batch: 1,
                    out_dir: dir.join("export"),
                },
            )
            .await
            .unwrap();
        let s = t0.elapsed().as_secs_f64();
        let Reply::Export(e) = r else {
            panic!("export answered {r:?}")
        };
        assert!(e.meters > 0);
        engine.shutdown().await.unwrap();
        println!(
            "{}",
            serde_json::json!({"s": s, "peak_rss_bytes": peak_rss()})
        );
    });
}

/// Child: verifies the manifest as a utility would.
fn child_verify(dir: &Path) {
    let root = station::manifest::verify::read_cert(&dir.join("pki/root-ca.pem")).unwrap();
    let t0 = Instant::now();
    let (report, manifest) =
        station::manifest::verify::verify_file(&dir.join("export/manifest.p7m"), &root).unwrap();
    let s = t0.elapsed().as_secs_f64();
    assert!(report.ok(), "{report}");
    drop(manifest);
    println!(
        "{}",
        serde_json::json!({"s": s, "peak_rss_bytes": peak_rss()})
    );
}

/// A cell with a closed batch of `n` done meters (and one failed in 200) in its journal.
async fn make_cell(dir: &Path, n: usize, audit: bool) {
    let common::BenchCell { pki, conf_head } = common::bench_cell(dir, "mbench", MODEL).await;
    std::fs::write(dir.join("station.toml"), conf_head).unwrap();

    // Firmware, as the release process signs it.
    let key_pem = std::fs::read_to_string(pki.join("firmware-signing-key.pem")).unwrap();
    let fw_key =
        <p256::ecdsa::SigningKey as p256::pkcs8::DecodePrivateKey>::from_pkcs8_pem(&key_pem)
            .unwrap();
    let payload = meter_sim::firmware::firmware_like_payload(64 * 1024, 0.6, 7);
    let version = line_protocol::image::ImageVersion {
        major: 3,
        minor: 0,
        revision: 0,
        build: 0,
    };
    let image = meter_sim::firmware::sign_image(&payload, version, 0x200, &fw_key);

    let engine = open(dir).await;
    let officer = common::add_users_in_process(&engine, PIN).await;
    let Reply::Firmware(fw) = engine
        .execute(
            &officer,
            Command::ImportFirmware {
                name: "fw.bin".into(),
                image,
            },
        )
        .await
        .unwrap()
    else {
        panic!("firmware import")
    };
    engine
        .execute(
            &officer,
            Command::ImportCustomer {
                name: "utility".into(),
                cert: std::fs::read(dir.join("utility.pem")).unwrap(),
            },
        )
        .await
        .unwrap();
    let sup = engine.login("super", PIN).await.unwrap();
    let failed = n / 200;
    let Reply::Batch(batch) = engine
        .execute(
            &sup,
            Command::OpenBatch(BatchSpec {
                work_order: format!("WO-BENCH-{n}"),
                model: MODEL.into(),
                firmware: fw.sha256.clone(),
                customer: "utility".into(),
                quantity: n as i64,
                serial_prefix: "DMW".into(),
                serial_first: 1,
                serial_last: (n + failed) as i64 + 10,
            }),
        )
        .await
        .unwrap()
    else {
        panic!("batch open")
    };

    // The meters, a chunk per HSM job, a few jobs at a time.
    let fw_sha: [u8; 32] = hex::decode(&fw.sha256).unwrap().try_into().unwrap();
    let numbers: Vec<usize> = (1..=n + failed).collect();
    let mut jobs = tokio::task::JoinSet::new();
    for chunk in numbers.chunks(CHUNK) {
        while jobs.len() >= 4 {
            let rows: Vec<MeterRows> = jobs.join_next().await.unwrap().unwrap();
            store(&engine, batch.id, rows, audit).await;
        }
        let (engine2, label) = (engine.clone(), batch.transport_key.clone());
        let numbers = chunk.to_vec();
        jobs.spawn(async move { make_meters(&engine2, &label, &numbers, failed, fw_sha).await });
    }
    while let Some(rows) = jobs.join_next().await {
        store(&engine, batch.id, rows.unwrap(), audit).await;
    }
    engine
        .db()
        .with(|c| {
            c.execute(
                "UPDATE batches SET next_serial = ?1 WHERE id = ?2",
                params![(n + failed + 1) as i64, batch.id],
            )
        })
        .unwrap();
    engine
        .execute(&sup, Command::CloseBatch { id: batch.id })
        .await
        .unwrap();
    engine.shutdown().await.unwrap();
}

/// What one meter leaves in the journal.
struct MeterRows {
    number: usize,
    uid: String,
    title: [u8; 8],
    done: bool,
    /// (slot, serial hex, DER, SHA-256 hex); a failed meter's certificate is voided at intent.
    certs: Vec<(&'static str, String, Vec<u8>, String)>,
    /// (key id, wrapped, KCV hex).
    keys: Vec<(&'static str, Vec<u8>, String)>,
    receipt: Vec<u8>,
    signature: Vec<u8>,
}

fn serial_of(number: usize) -> String {
    format!("DMW{number:09}")
}

/// A meter before minting: number, system title, signing key, public points of its two keys.
type Blank = (usize, [u8; 8], p256::ecdsa::SigningKey, [Vec<u8>; 2]);

/// Mints `numbers`' meters: certificates and keys in the HSM, receipts signed in software.
/// Every `failed`-th meter (spread over the batch) fails after its first certificate intent.
async fn make_meters(
    engine: &Engine,
    transport_label: &str,
    numbers: &[usize],
    failed: usize,
    fw_sha: [u8; 32],
) -> Vec<MeterRows> {
    let mut rng = line_protocol::io::system_rng();
    let total = numbers.len();
    let is_failed = move |number: usize| failed > 0 && number.is_multiple_of(201);
    let mut meters: Vec<Blank> = numbers
        .iter()
        .map(|&number| {
            let mut title = *b"DMW\0\0\0\0\0";
            title[3..].copy_from_slice(&(number as u64).to_be_bytes()[3..]);
            let sign = p256::ecdsa::SigningKey::generate_from_rng(&mut rng);
            let ka = p256::ecdsa::SigningKey::generate_from_rng(&mut rng);
            let points = [sign.verifying_key(), ka.verifying_key()]
                .map(|k| k.to_sec1_point(false).as_bytes().to_vec());
            (number, title, sign, points)
        })
        .collect();
    let ca = engine.keys().device_ca.clone();
    let ca_der = ca.cert_der.clone();
    let manufacturer = engine.config().manufacturer.name.clone();
    let label = transport_label.to_string();
    let jobs: Vec<(usize, [u8; 8], [Vec<u8>; 2])> = meters
        .iter()
        .map(|(n, t, _, p)| (*n, *t, p.clone()))
        .collect();
    // Per meter: (certificates (serial, DER)), (key id, wrapped, kcv).
    #[allow(clippy::type_complexity)]
    let minted: Vec<(
        Vec<([u8; 16], Vec<u8>)>,
        Vec<(&'static str, Vec<u8>, [u8; 3])>,
    )> = engine
        .hsm()
        .run(move |s| {
            let btk = s
                .find_key(hsm::KeyKind::Aes(32), &label)?
                .expect("the batch transport key");
            let mut out = Vec::with_capacity(jobs.len());
            for (number, title, points) in &jobs {
                let mut certs = Vec::new();
                for (slot, usage) in [
                    (0, hsm::MeterKeyUsage::DigitalSignature),
                    (1, hsm::MeterKeyUsage::KeyAgreement),
                ] {
                    let serial = hsm::cert::random_serial(s)?;
                    if is_failed(*number) {
                        certs.push((serial, Vec::new()));
                        break;
                    }
                    let profile = hsm::MeterProfile {
                        system_title: *title,
                        meter_serial: serial_of(*number),
                        manufacturer: manufacturer.clone(),
                        usage,
                        curve: hsm::Curve::P256,
                        not_after: None,
                    };
                    let subject = hsm::cert::Subject::Key {
                        curve: hsm::Curve::P256,
                        point: points[slot].clone(),
                    };
                    let issued = hsm::cert::issue_with_serial(s, &ca, &subject, &profile, &serial)?;
                    certs.push((serial, issued.der));
                }
                let mut keys = Vec::new();
                if !is_failed(*number) {
                    for (role, id) in [
                        (hsm::KeyRole::MeterGuek, "guek"),
                        (hsm::KeyRole::MeterGbek, "gbek"),
                        (hsm::KeyRole::MeterAk, "ak"),
                        (hsm::KeyRole::MeterKek, "kek"),
                    ] {
                        let k = s.generate_aes_key(role, hsm::AesKeySize::Aes128, None)?;
                        let wrapped = s.wrap(&btk, &k, hsm::WrapAlg::AesKw)?;
                        let kcv = s.kcv(&k)?;
                        s.destroy(&k)?;
                        keys.push((id, wrapped, kcv));
                    }
                }
                out.push((certs, keys));
            }
            Ok(out)
        })
        .await
        .unwrap();
    assert_eq!(minted.len(), total);
    meters
        .drain(..)
        .zip(minted)
        .map(|((number, title, sign, _), (certs, keys))| {
            let mut uid = [0u8; 12];
            rand_core::Rng::fill_bytes(&mut rng, &mut uid);
            let done = !is_failed(number);
            let certs: Vec<(&'static str, String, Vec<u8>, String)> = certs
                .into_iter()
                .zip(["sign", "ka"])
                .map(|((serial, der), slot)| {
                    let fp = if der.is_empty() {
                        String::new()
                    } else {
                        hex::encode(line_protocol::crypto::sha256(&der))
                    };
                    (slot, hex::encode(serial), der, fp)
                })
                .collect();
            let (receipt, signature) = if done {
                let mut nonce = [0u8; 16];
                rand_core::Rng::fill_bytes(&mut rng, &mut nonce);
                let r = line_protocol::receipt::Receipt {
                    uid: uid.to_vec(),
                    serial: serial_of(number),
                    system_title: title,
                    ldn: format!("DMW{number:013}"),
                    lifecycle: line_protocol::msg::Lifecycle::Sealed,
                    disabled: line_protocol::msg::iface::ALL,
                    fw_sha256: fw_sha,
                    // The meter's certificates and the device CA's (slot 3), as a meter reports
                    // them.
                    certs: certs
                        .iter()
                        .enumerate()
                        .map(|(i, (_, _, der, _))| {
                            (i as u8 + 1, line_protocol::crypto::sha256(der))
                        })
                        .chain([(3, line_protocol::crypto::sha256(&ca_der))])
                        .collect(),
                    nonce,
                }
                .encode();
                let sig: p256::ecdsa::DerSignature = sign.sign(&r);
                (r, sig.as_bytes().to_vec())
            } else {
                (Vec::new(), Vec::new())
            };
            MeterRows {
                number,
                uid: hex::encode(uid),
                title,
                done,
                certs,
                keys: keys
                    .into_iter()
                    .map(|(id, w, kcv)| (id, w, hex::encode(kcv)))
                    .collect(),
                receipt,
                signature,
            }
        })
        .collect()
}

/// Writes meters as the provisioning pipeline leaves them: done (certificates delivered, keys
/// wrapped, receipt kept) or failed (certificate voided, no keys).
async fn store(engine: &Engine, batch: i64, rows: Vec<MeterRows>, audit: bool) {
    let fw: String = engine
        .db()
        .with(|c| {
            c.query_row(
                "SELECT f.sha256 FROM batches b JOIN firmware f ON f.id = b.firmware_id WHERE b.id = ?1",
                [batch],
                |r| r.get(0),
            )
        })
        .unwrap();
    let log = engine.audit_log().clone();
    engine
        .db()
        .with(move |c| -> rusqlite::Result<()> {
            let tx = c.transaction()?;
            let now = station::db::now_ms();
            for m in rows {
                if audit {
                    // The entry the line writes for the meter's outcome, signed by the audit key.
                    let (kind, severity) = if m.done {
                        ("meter.provisioned", station::audit::Severity::Info)
                    } else {
                        ("meter.failed", station::audit::Severity::Warning)
                    };
                    log.append(
                        &tx,
                        &station::audit::NewEvent::new(
                            "bench",
                            kind,
                            severity,
                            "oper",
                            serde_json::json!({"uid": m.uid, "serial": serial_of(m.number), "nest": m.number % 4 + 1}),
                        ),
                    )
                    .unwrap();
                }
                let nest = (m.number % 4 + 1) as i64;
                tx.execute(
                    "INSERT INTO meters (batch_id, uid, nest, state, serial, serial_no, system_title, ldn, fw_sha256, receipt, receipt_sig, failure, operator, started_at, finished_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, 'oper', ?13, ?14)",
                    params![
                        batch,
                        m.uid,
                        nest,
                        if m.done { "done" } else { "failed" },
                        serial_of(m.number),
                        m.number as i64,
                        hex::encode(m.title),
                        format!("DMW{:013}", m.number),
                        m.done.then(|| fw.clone()),
                        m.done.then_some(m.receipt),
                        m.done.then_some(m.signature),
                        (!m.done).then_some("meter reported image hash 0000000000000000"),
                        now - 900,
                        now,
                    ],
                )?;
                let id = tx.last_insert_rowid();
                for (slot, serial, der, fp) in m.certs {
                    if m.done {
                        tx.execute(
                            "INSERT INTO certificates (meter_id, slot, state, serial, der, fingerprint, created_at, updated_at) VALUES (?1, ?2, 'delivered', ?3, ?4, ?5, ?6, ?6)",
                            params![id, slot, serial, der, fp, now],
                        )?;
                    } else {
                        tx.execute(
                            "INSERT INTO certificates (meter_id, slot, state, serial, void_reason, created_at, updated_at) VALUES (?1, ?2, 'voided', ?3, 'meter reported image hash 0000000000000000', ?4, ?4)",
                            params![id, slot, serial, now],
                        )?;
                    }
                }
                for (key_id, wrapped, kcv) in m.keys {
                    tx.execute(
                        "INSERT INTO wrapped_keys (meter_id, key_id, key_type, wrap_alg, wrapped, kcv, created_at) VALUES (?1, ?2, 'aes-128', 'aes-kw', ?3, ?4, ?5)",
                        params![id, key_id, wrapped, kcv, now],
                    )?;
                }
            }
            tx.commit()
        })
        .unwrap();
}
