//! `station export`: the manifest of a closed batch.
//!
//! Order of work, so that a crash leaves nothing that looks finished but is not: an audit entry
//! and a checkpoint first (the manifest names that checkpoint); then `manifest.json`, written meter
//! by meter from the journal (memory stays flat however large the batch) and hashed on the way;
//! then `manifest.p7m`, a CMS SignedData made by the manifest signer in the HSM over that hash and
//! written around the content streamed from the file; both renamed into place only when complete;
//! last the export record and its audit entry.
//!
//! Nothing secret is read: meter keys are stored wrapped under the batch transport key, which is
//! itself stored wrapped for the utility.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cms::builder::{SignedDataBuilder, SignerInfoBuilder, create_signing_time_attribute};
use cms::cert::{CertificateChoices, IssuerAndSerialNumber};
use cms::content_info::ContentInfo;
use cms::signed_data::{EncapsulatedContentInfo, SignerIdentifier};
use der::{Decode, Encode};
use rusqlite::{Connection, params};
use serde::Serialize;
use sha2::{Digest, Sha256};
use spki::AlgorithmIdentifierOwned;
use x509_cert::Certificate;

use super::der as d;
use super::model::*;
use crate::audit::{NewEvent, Severity};
use crate::db::{now_ms, rfc3339};
use crate::engine::{Error, ExportOutcome, Inner, Result};
use crate::records;

const ID_DATA: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.1");
const ID_SIGNED_DATA: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_SHA256: der::asn1::ObjectIdentifier =
    der::asn1::ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");

/// A writer that hashes what passes through it.
struct Hashing<W: Write> {
    inner: W,
    hash: Sha256,
    written: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn io(path: &Path, e: std::io::Error) -> Error {
    if e.raw_os_error() == Some(libc::ENOSPC) {
        return Error::Invalid(format!(
            "the disk holding {} is full; free space and export again",
            path.display()
        ));
    }
    Error::Invalid(format!("cannot write {}: {e}", path.display()))
}

/// Writes `"name": value` at object depth 1, pretty-printed.
fn field(
    w: &mut impl Write,
    name: &str,
    value: &impl Serialize,
    last: bool,
) -> std::io::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)?;
    write!(w, "  \"{name}\": {}", text.replace('\n', "\n  "))?;
    w.write_all(if last { b"\n" } else { b",\n" })
}

fn write_list<T: Serialize>(
    w: &mut impl Write,
    name: &str,
    items: impl Iterator<Item = Result<T>>,
    last: bool,
) -> Result<usize> {
    let wio = |e: std::io::Error| Error::Invalid(format!("cannot write the manifest: {e}"));
    write!(w, "  \"{name}\": [").map_err(wio)?;
    let mut n = 0;
    for item in items {
        let item = item?;
        let text =
            serde_json::to_string_pretty(&item).map_err(|e| Error::Invalid(e.to_string()))?;
        w.write_all(if n == 0 { b"\n    " } else { b",\n    " })
            .map_err(wio)?;
        w.write_all(text.replace('\n', "\n    ").as_bytes())
            .map_err(wio)?;
        n += 1;
    }
    w.write_all(if n == 0 { b"]" } else { b"\n  ]" })
        .map_err(wio)?;
    w.write_all(if last { b"\n" } else { b",\n" })
        .map_err(wio)?;
    Ok(n)
}

/// The meters of a batch, read a page at a time.
fn meter_pages<'c>(
    conn: &'c Connection,
    batch: i64,
    receipt_alg: &'static str,
) -> impl Iterator<Item = Result<MeterRecord>> + 'c {
    let mut after = 0i64;
    let mut page: std::vec::IntoIter<Result<MeterRecord>> = Vec::new().into_iter();
    let mut done = false;
    std::iter::from_fn(move || {
        loop {
            if let Some(m) = page.next() {
                return Some(m);
            }
            if done {
                return None;
            }
            match load_page(conn, batch, after, receipt_alg) {
                Ok(rows) => {
                    if rows.len() < PAGE {
                        done = true;
                    }
                    if let Some((id, _)) = rows.last() {
                        after = *id;
                    }
                    page = rows
                        .into_iter()
                        .map(|(_, m)| Ok(m))
                        .collect::<Vec<_>>()
                        .into_iter();
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e));
                }
            }
        }
    })
}

const PAGE: usize = 500;

fn load_page(
    conn: &Connection,
    batch: i64,
    after: i64,
    receipt_alg: &'static str,
) -> Result<Vec<(i64, MeterRecord)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT m.id, m.serial, m.uid, m.system_title, m.ldn, b.model, m.fw_sha256, m.nest, m.operator, m.started_at, m.finished_at, m.receipt, m.receipt_sig
         FROM meters m JOIN batches b ON b.id = m.batch_id
         WHERE m.batch_id = ?1 AND m.state = 'done' AND m.id > ?2 ORDER BY m.id LIMIT ?3",
    )?;
    let rows = stmt
        .query_map(params![batch, after, PAGE as i64], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                MeterRecord {
                    serial: r.get(1)?,
                    uid: r.get(2)?,
                    system_title: r.get::<_, String>(3)?.to_uppercase(),
                    logical_device_name: r.get(4)?,
                    model: r.get(5)?,
                    firmware_sha256: r.get(6)?,
                    nest: r.get(7)?,
                    operator: r.get(8)?,
                    started_at: rfc3339(r.get(9)?),
                    finished_at: rfc3339(r.get::<_, Option<i64>>(10)?.unwrap_or(0)),
                    certificates: Vec::new(),
                    keys: Vec::new(),
                    attestation: Attestation {
                        receipt: b64enc(&r.get::<_, Vec<u8>>(11)?),
                        signature: b64enc(&r.get::<_, Vec<u8>>(12)?),
                        algorithm: receipt_alg.to_string(),
                    },
                },
            ))
        })?
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let mut certs = conn.prepare_cached("SELECT slot, serial, fingerprint, der FROM certificates WHERE meter_id = ?1 AND state = 'delivered' ORDER BY slot DESC")?;
    let mut keys = conn.prepare_cached(
        "SELECT key_id, key_type, wrap_alg, wrapped, kcv, COALESCE(binding, '') FROM wrapped_keys WHERE meter_id = ?1
         ORDER BY CASE key_id WHEN 'guek' THEN 1 WHEN 'gbek' THEN 2 WHEN 'ak' THEN 3 ELSE 4 END",
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, mut m) in rows {
        m.certificates = certs
            .query_map([id], |r| {
                Ok(CertificateEntry {
                    slot: r.get(0)?,
                    serial: r.get(1)?,
                    sha256: r.get::<_, Option<String>>(2)?.unwrap_or_default(),
                    der: b64enc(&r.get::<_, Option<Vec<u8>>>(3)?.unwrap_or_default()),
                })
            })?
            .collect::<std::result::Result<_, _>>()?;
        m.keys = keys
            .query_map([id], |r| {
                Ok(KeyEntry {
                    id: r.get(0)?,
                    key_type: r.get(1)?,
                    wrap: r.get(2)?,
                    wrapped: b64enc(&r.get::<_, Vec<u8>>(3)?),
                    kcv: r.get(4)?,
                    binding: r.get(5)?,
                })
            })?
            .collect::<std::result::Result<_, _>>()?;
        out.push((id, m));
    }
    Ok(out)
}

fn voided(conn: &Connection, batch: i64) -> Result<Vec<VoidedCertificate>> {
    let mut stmt = conn.prepare(
        "SELECT c.serial, c.slot, m.uid, m.serial, COALESCE(c.void_reason, m.failure, 'voided'), c.fingerprint
         FROM certificates c JOIN meters m ON m.id = c.meter_id WHERE m.batch_id = ?1 AND c.state = 'voided' ORDER BY c.id",
    )?;
    let rows = stmt.query_map([batch], |r| {
        Ok(VoidedCertificate {
            serial: r.get(0)?,
            slot: r.get(1)?,
            meter_uid: r.get(2)?,
            meter_serial: r.get(3)?,
            reason: r.get(4)?,
            sha256: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<std::result::Result<_, _>>()?)
}

/// Validity of the device CA's CRL written at each export, days: the next export, or a CRL the
/// manufacturer publishes, replaces it.
const CRL_DAYS: u32 = 90;

/// Exports batch `batch_id` into `out_dir`.
pub(crate) async fn export(
    inner: &Arc<Inner>,
    who: &str,
    batch_id: i64,
    out_dir: PathBuf,
) -> Result<ExportOutcome> {
    let batch = inner
        .db
        .call(move |c| records::batch(c, batch_id).map_err(Error::from))
        .await?
        .ok_or_else(|| Error::NotFound(format!("no batch {batch_id}")))?;
    if batch.state != "closed" {
        return Err(Error::Conflict(format!(
            "batch {} is still open: a supervisor closes it before it is exported",
            batch.work_order
        )));
    }
    if let Some(why) = inner
        .db
        .call(move |c| crate::engine::retention::purged_reason(c, batch_id))
        .await?
    {
        return Err(Error::Conflict(format!(
            "{why}: it cannot be exported again"
        )));
    }
    // The export appears whole or not at all: its files are written into a staging directory
    // beside `out_dir`, which is renamed into place once everything is written.
    let (out_dir, staging) = staging_for(&out_dir)?;

    // 1. The audit checkpoint the manifest names, and the export's intent.
    let audit = inner.audit.clone();
    let (src, actor, dir_s, wo) = (
        inner.source.clone(),
        who.to_string(),
        out_dir.display().to_string(),
        batch.work_order.clone(),
    );
    let staging_s = staging.display().to_string();
    let (cp_id, cp_seq, note, run_id) = inner
        .db
        .call(move |c| -> Result<(i64, i64, String, i64)> {
            let tx = c.transaction()?;
            audit.append(
                &tx,
                &NewEvent::new(
                    &src,
                    "manifest.export",
                    Severity::Notice,
                    &actor,
                    serde_json::json!({"batch": wo, "out_dir": dir_s}),
                ),
            )?;
            let (id, note) = audit.checkpoint(&tx, "export")?;
            let seq: i64 = tx.query_row(
                "SELECT seq FROM audit_checkpoints WHERE id = ?1",
                [id],
                |r| r.get(0),
            )?;
            tx.execute(
                "INSERT INTO export_runs (batch_id, out_dir, staging_dir, checkpoint_id, state, started_at, started_by)
                 VALUES (?1, ?2, ?3, ?4, 'started', ?5, ?6)",
                params![batch_id, dir_s, staging_s, id, now_ms(), actor],
            )?;
            let run = tx.last_insert_rowid();
            tx.commit()?;
            Ok((id, seq, note, run))
        })
        .await?;
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(|e| io(&staging, e))?;

    // 2. The device CA's CRL: every certificate the cell ever voided (cumulative, as CRLs are),
    //    numbered by the checkpoint, so that the voided certificates are refused by anyone
    //    checking revocation, not only by this manifest's reader.
    let revoked: Vec<(Vec<u8>, time::OffsetDateTime)> = inner
        .db
        .call(|c| -> Result<Vec<(String, i64)>> {
            let mut st = c.prepare(
                "SELECT serial, updated_at FROM certificates WHERE state = 'voided' ORDER BY id",
            )?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
        .await?
        .into_iter()
        .filter_map(|(serial, at)| {
            let at =
                time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000_000).ok()?;
            Some((hex::decode(serial).ok()?, at))
        })
        .collect();
    let ca = inner.keys.device_ca.clone();
    let crl_number = u64::try_from(cp_id).unwrap_or(0);
    let crl = inner
        .hsm
        .run(move |s| hsm::cert::issue_crl(s, &ca, &revoked, crl_number, CRL_DAYS))
        .await?;
    let crl_path = staging.join("voided.crl");
    write_synced(&crl_path, &crl)?;

    // 3. manifest.json.
    let model = inner.cfg.model(&batch.model).cloned();
    let receipt_alg = if model.as_ref().is_some_and(|m| m.suite == 2) {
        "ecdsa-with-SHA384"
    } else {
        "ecdsa-with-SHA256"
    };
    let customer_cert = {
        let id = batch.customer_id;
        inner
            .db
            .call(move |c| records::customer_cert(c, id).map_err(Error::from))
            .await?
    };
    let customer_spki = Certificate::from_der(&customer_cert)
        .ok()
        .and_then(|c| c.tbs_certificate().subject_public_key_info().to_der().ok())
        .unwrap_or_default();
    type Sealed = (Vec<u8>, String, i64, String, Option<String>);
    let (wrapped_tk, tk_kcv, closed_at, closed_by, oaep_label): Sealed = {
        let id = batch.id;
        inner
            .db
            .call(move |c| -> Result<_> {
                Ok(c.query_row("SELECT transport_wrapped, transport_kcv, closed_at, closed_by, oaep_label FROM batches WHERE id = ?1", [id], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?)
            })
            .await?
    };
    let bid = batch.id;
    let disable_mask = inner
        .db
        .call(move |c| records::disable_mask(c, bid).map_err(Error::from))
        .await?;
    let anchors: Vec<TrustAnchor> = inner
        .db
        .call(move |c| records::batch_anchors(c, bid).map_err(Error::from))
        .await?
        .into_iter()
        .map(|a| TrustAnchor {
            subject: Certificate::from_der(&a.der)
                .map(|c| c.tbs_certificate().subject().to_string())
                .unwrap_or_default(),
            kind: a.kind,
            index: a.index,
            sha256: a.sha256,
        })
        .collect();
    let mut id = [0u8; 16];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut id);
    let oaep = batch.oaep_hash.clone();
    let head = (
        FORMAT.to_string(),
        VERSION,
        hex::encode(id),
        rfc3339(now_ms()),
        StationInfo {
            id: inner.cfg.station_id.clone(),
            software: format!("station {}", env!("CARGO_PKG_VERSION")),
        },
        ManufacturerInfo {
            name: inner.cfg.manufacturer.name.clone(),
            flag_id: inner.cfg.manufacturer.flag_id.clone(),
        },
        BatchInfo {
            id: batch.id,
            work_order: batch.work_order.clone(),
            model: batch.model.clone(),
            quantity: batch.quantity,
            produced: batch.done,
            failed: batch.failed,
            serial_first: format!("{}{:09}", batch.serial_prefix, batch.serial_first),
            serial_last: format!("{}{:09}", batch.serial_prefix, batch.serial_last),
            opened_at: batch.opened_at.clone(),
            opened_by: batch.opened_by.clone(),
            closed_at: rfc3339(closed_at),
            closed_by,
            interfaces_disabled: disable_mask,
        },
        FirmwareInfo {
            version: batch.firmware_version.clone(),
            sha256: batch.firmware_sha256.clone(),
            size: inner
                .db
                .call(move |c| -> Result<i64> {
                    Ok(c.query_row(
                        "SELECT size FROM firmware WHERE id = ?1",
                        [batch.firmware_id],
                        |r| r.get(0),
                    )?)
                })
                .await?,
            signer_key_sha256: hex::encode(line_protocol::image::key_hash(
                &inner.keys.firmware_key,
            )),
        },
        CustomerInfo {
            name: batch.customer.clone(),
            certificate_sha256: hex::encode(Sha256::digest(&customer_cert)),
            public_key_sha256: hex::encode(Sha256::digest(&customer_spki)),
        },
        TransportKey {
            algorithm: "AES-256".into(),
            wrapping: "RSA-OAEP".into(),
            oaep_hash: oaep.clone(),
            mgf1_hash: oaep,
            oaep_label,
            wrapped: b64enc(&wrapped_tk),
            kcv: tk_kcv,
        },
        DeviceCa {
            certificate: b64enc(&inner.keys.device_ca.cert_der),
            crl: Some(b64enc(&crl)),
        },
    );
    let checkpoint = AuditCheckpoint {
        seq: cp_seq,
        note,
        audit_certificate: b64enc(&inner.keys.audit_cert),
    };
    let json_tmp = staging.join("manifest.json");
    let (json_tmp2, batch_id2) = (json_tmp.clone(), batch.id);
    let db = inner.db.clone();
    let (digest, content_len, meters, voided_n) =
        tokio::task::spawn_blocking(move || -> Result<([u8; 32], u64, usize, usize)> {
            let (
                format,
                version,
                mid,
                created,
                station,
                manufacturer,
                batch,
                firmware,
                customer,
                tk,
                ca,
            ) = head;
            // The keys as PSKC first: the manifest names the container's hash.
            let pskc = db.with(|c| -> Result<PskcFile> {
                let path = json_tmp2.with_file_name(super::pskc::FILE);
                let file = File::create(&path).map_err(|e| io(&path, e))?;
                let mut w = Hashing {
                    inner: BufWriter::with_capacity(1 << 20, file),
                    hash: Sha256::new(),
                    written: 0,
                };
                let pio = |e| io(&path, e);
                let name = super::pskc::transport_key_name(&batch.work_order, &tk.kcv);
                super::pskc::begin(&mut w, &mid, &name).map_err(pio)?;
                for m in meter_pages(c, batch_id2, receipt_alg) {
                    super::pskc::meter(&mut w, &manufacturer.name, &m?).map_err(pio)?;
                }
                super::pskc::end(&mut w).map_err(pio)?;
                w.flush().map_err(pio)?;
                let digest = w.hash.finalize();
                let file = w
                    .inner
                    .into_inner()
                    .map_err(|e| io(&path, e.into_error()))?;
                file.sync_all().map_err(pio)?;
                Ok(PskcFile {
                    file: super::pskc::FILE.into(),
                    sha256: hex::encode(digest),
                    transport_key_name: name,
                })
            })?;
            let file = File::create(&json_tmp2).map_err(|e| io(&json_tmp2, e))?;
            let mut w = Hashing {
                inner: BufWriter::with_capacity(1 << 20, file),
                hash: Sha256::new(),
                written: 0,
            };
            let wio = |e| io(&json_tmp2, e);
            w.write_all(b"{\n").map_err(wio)?;
            field(&mut w, "format", &format, false).map_err(wio)?;
            field(&mut w, "version", &version, false).map_err(wio)?;
            field(&mut w, "manifest_id", &mid, false).map_err(wio)?;
            field(&mut w, "created_at", &created, false).map_err(wio)?;
            field(&mut w, "station", &station, false).map_err(wio)?;
            field(&mut w, "manufacturer", &manufacturer, false).map_err(wio)?;
            field(&mut w, "batch", &batch, false).map_err(wio)?;
            field(&mut w, "firmware", &firmware, false).map_err(wio)?;
            field(&mut w, "customer", &customer, false).map_err(wio)?;
            field(&mut w, "transport_key", &tk, false).map_err(wio)?;
            field(&mut w, "pskc", &pskc, false).map_err(wio)?;
            field(&mut w, "device_ca", &ca, false).map_err(wio)?;
            if !anchors.is_empty() {
                field(&mut w, "trust_anchors", &anchors, false).map_err(wio)?;
            }
            let (meters, voided_n) = db.with(|c| -> Result<(usize, usize)> {
                let n = write_list(
                    &mut w,
                    "meters",
                    meter_pages(c, batch_id2, receipt_alg),
                    false,
                )?;
                let v = voided(c, batch_id2)?;
                let vn = write_list(&mut w, "voided_certificates", v.into_iter().map(Ok), false)?;
                Ok((n, vn))
            })?;
            field(&mut w, "audit_checkpoint", &checkpoint, true).map_err(wio)?;
            w.write_all(b"}\n").map_err(wio)?;
            w.flush().map_err(wio)?;
            let written = w.written;
            let digest: [u8; 32] = w.hash.finalize().into();
            let file = w
                .inner
                .into_inner()
                .map_err(|e| io(&json_tmp2, e.into_error()))?;
            file.sync_all().map_err(wio)?;
            Ok((digest, written, meters, voided_n))
        })
        .await
        .map_err(|e| Error::Invalid(format!("export task failed: {e}")))??;
    if meters as i64 != batch.done {
        return Err(Error::Conflict(format!(
            "the journal lists {} meters done but {meters} were exported",
            batch.done
        )));
    }

    // 3. manifest.p7m around it.
    let hsm = inner.hsm.clone();
    let keys = inner.keys.clone();
    let p7m_tmp = staging.join("manifest.p7m");
    let (jt, pt) = (json_tmp.clone(), p7m_tmp.clone());
    tokio::task::spawn_blocking(move || -> Result<()> {
        let envelope = sign_detached(&hsm, &keys, &digest)?;
        write_attached(&envelope, &jt, content_len, &pt)
    })
    .await
    .map_err(|e| Error::Invalid(format!("signing task failed: {e}")))??;
    for f in [&json_tmp, &p7m_tmp] {
        File::open(f)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(f, e))?;
    }
    // 4. The evidence report, from the journal as it now stands (this export's checkpoint in
    //    it), on a read-only connection of its own: verifying a long log takes a while, and the
    //    line may be writing.
    let ctx = crate::report::Context {
        station_id: inner.cfg.station_id.clone(),
        bauds: inner.cfg.nests.iter().map(|n| n.baud).collect(),
        audit_key: inner.keys.audit_verifying_key()?,
        audit_signer: crate::engine::keys::parse_cert(&inner.keys.audit_cert)
            .map(|(c, _)| c.tbs_certificate().subject().to_string())
            .unwrap_or_else(|_| "the station's audit signer".into()),
        pending_export: Some((
            hex::encode(digest),
            cp_id,
            out_dir.display().to_string(),
            who.to_string(),
        )),
        now_ms: now_ms(),
        anchored: true,
    };
    let (path, report_path) = (
        inner.cfg.database.clone(),
        staging.join(crate::report::FILE),
    );
    tokio::task::spawn_blocking(move || -> Result<()> {
        let c = Connection::open_with_flags(
            &path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(crate::db::DbError::from)?;
        let report = crate::report::gather(&c, batch_id, &ctx)
            .map_err(|e| Error::Invalid(format!("the evidence report: {e}")))?;
        write_synced(
            &report_path,
            crate::report::html::render(&report).as_bytes(),
        )
    })
    .await
    .map_err(|e| Error::Invalid(format!("the evidence report: {e}")))??;
    crate::failpoint("export.staged");
    publish(&staging, &out_dir)?;
    crate::failpoint("export.published");

    // 5. The record.
    let audit = inner.audit.clone();
    let (src, actor, dir_s) = (
        inner.source.clone(),
        who.to_string(),
        out_dir.display().to_string(),
    );
    let sha = hex::encode(digest);
    let sha2 = sha.clone();
    let wo = batch.work_order.clone();
    inner
        .db
        .call(move |c| -> Result<()> {
            let tx = c.transaction()?;
            tx.execute(
                "INSERT INTO exports (batch_id, out_dir, manifest_sha256, checkpoint_id, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![batch_id, dir_s, sha2, cp_id, now_ms(), actor],
            )?;
            let n = tx.execute(
                "UPDATE export_runs SET state = 'done', finished_at = ?1 WHERE id = ?2 AND state = 'started'",
                params![now_ms(), run_id],
            )?;
            records::guarded(n, &format!("export run {run_id}"), "started")?;
            audit.append(
                &tx,
                &NewEvent::new(&src, "manifest.exported", Severity::Notice, &actor, serde_json::json!({
                    "batch": wo, "out_dir": dir_s, "manifest_sha256": sha2, "meters": meters, "voided_certificates": voided_n, "checkpoint": cp_seq,
                })),
            )?;
            tx.commit()?;
            Ok(())
        })
        .await?;
    // The export's checkpoint is anchored in the HSM at once, not a few seconds later.
    if let Err(e) = inner.anchor_audit(false).await {
        tracing::warn!(error = %e, "the audit anchor could not be moved after the export");
    }
    Ok(ExportOutcome {
        out_dir,
        meters,
        voided: voided_n,
        manifest_sha256: sha,
        checkpoint_seq: cp_seq,
    })
}

/// The absolute export directory for `out_dir` (which must not exist, or be empty) and a new
/// staging directory beside it.
fn staging_for(out_dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let abs = if out_dir.is_absolute() {
        out_dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| io(out_dir, e))?
            .join(out_dir)
    };
    let name = abs
        .file_name()
        .ok_or_else(|| Error::Invalid(format!("{} names no directory", out_dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = abs
        .parent()
        .ok_or_else(|| Error::Invalid(format!("{} has no parent directory", out_dir.display())))?;
    std::fs::create_dir_all(parent).map_err(|e| io(parent, e))?;
    let parent = std::fs::canonicalize(parent).map_err(|e| io(parent, e))?;
    let out = parent.join(&name);
    if let Ok(mut entries) = std::fs::read_dir(&out)
        && entries.next().is_some()
    {
        return Err(Error::Conflict(format!(
            "{} exists and is not empty: export into a new directory",
            out.display()
        )));
    }
    let mut tag = [0u8; 6];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut tag);
    let staging = parent.join(format!(".{name}.export-{}", hex::encode(tag)));
    Ok((out, staging))
}

/// Writes `bytes` to a new file and syncs it.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = File::create(path).map_err(|e| io(path, e))?;
    f.write_all(bytes).map_err(|e| io(path, e))?;
    f.sync_all().map_err(|e| io(path, e))
}

/// Moves the finished staging directory into place in one rename (an empty `out_dir` is
/// replaced), and syncs the parent directory so the rename survives a power cut.
fn publish(staging: &Path, out_dir: &Path) -> Result<()> {
    if out_dir.exists() {
        std::fs::remove_dir(out_dir).map_err(|e| io(out_dir, e))?;
    }
    std::fs::rename(staging, out_dir).map_err(|e| io(out_dir, e))?;
    if let Some(parent) = out_dir.parent() {
        File::open(parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(parent, e))?;
    }
    Ok(())
}

/// Start-up: finishes or abandons the exports a crash interrupted. One whose directory is in
/// place is complete (it appears in one rename) and is recorded now; one that never got there
/// is abandoned, its staging directory removed. Both are audited.
pub(crate) async fn recover_exports(inner: &Arc<Inner>) -> Result<usize> {
    let runs: Vec<(i64, i64, String, String, i64, String)> = inner
        .db
        .call(|c| -> Result<_> {
            let mut st = c.prepare(
                "SELECT id, batch_id, out_dir, staging_dir, checkpoint_id, started_by FROM export_runs WHERE state = 'started'",
            )?;
            let rows = st.query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?))
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
        .await?;
    let n = runs.len();
    for (run, batch, out_dir, staging, cp_id, by) in runs {
        let out = PathBuf::from(&out_dir);
        let json = std::fs::read(out.join("manifest.json")).ok();
        let complete = json.is_some() && out.join("manifest.p7m").exists();
        let staging = PathBuf::from(&staging);
        if staging.exists()
            && staging
                .file_name()
                .is_some_and(|n| n.to_string_lossy().contains(".export-"))
        {
            let _ = std::fs::remove_dir_all(&staging);
        }
        let audit = inner.audit.clone();
        let src = inner.source.clone();
        let sha = json.map(|j| hex::encode(Sha256::digest(&j)));
        inner
            .db
            .call(move |c| -> Result<()> {
                let tx = c.transaction()?;
                let now = now_ms();
                let (state, kind, sev, message) = match &sha {
                    Some(sha) if complete => {
                        tx.execute(
                            "INSERT INTO exports (batch_id, out_dir, manifest_sha256, checkpoint_id, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                            params![batch, out_dir, sha, cp_id, now, by],
                        )?;
                        ("done", "manifest.export_recovered", Severity::Warning,
                         "the export was written in full but the station stopped before recording it; it is recorded now")
                    }
                    _ => ("abandoned", "manifest.export_abandoned", Severity::Warning,
                          "the station stopped while the export was being written; nothing of it was published, export again"),
                };
                tx.execute(
                    "UPDATE export_runs SET state = ?1, finished_at = ?2 WHERE id = ?3 AND state = 'started'",
                    params![state, now, run],
                )?;
                audit.append(
                    &tx,
                    &NewEvent::new(&src, kind, sev, "system", serde_json::json!({
                        "batch_id": batch, "out_dir": out_dir, "manifest_sha256": sha, "message": message,
                    })),
                )?;
                tx.commit()?;
                Ok(())
            })
            .await?;
    }
    Ok(n)
}

/// Signs `json` as a manifest with the cell's manifest signer, writing `out` (a `.p7m`). Used by
/// the export, and by tests that need a validly signed manifest with chosen content.
pub fn resign(
    hsm: &hsm::Hsm,
    keys: &crate::engine::CellKeys,
    json: &Path,
    out: &Path,
) -> Result<()> {
    let bytes = std::fs::read(json).map_err(|e| io(json, e))?;
    let digest: [u8; 32] = Sha256::digest(&bytes).into();
    let envelope = sign_detached(hsm, keys, &digest)?;
    write_attached(&envelope, json, bytes.len() as u64, out)
}

/// A detached SignedData over `digest` by the manifest signer, as DER.
fn sign_detached(
    hsm: &hsm::Hsm,
    keys: &crate::engine::CellKeys,
    digest: &[u8; 32],
) -> Result<Vec<u8>> {
    let cms_err =
        |e: cms::builder::Error| Error::Invalid(format!("cannot build the CMS signature: {e}"));
    let cert = Certificate::from_der(&keys.manifest_cert)
        .map_err(|e| Error::Setup(format!("the manifest signer certificate: {e}")))?;
    let signer = hsm::HsmSigner::new(hsm.clone(), &keys.manifest)?;
    let encap = EncapsulatedContentInfo {
        econtent_type: ID_DATA,
        econtent: None,
    };
    let sha256 = AlgorithmIdentifierOwned {
        oid: ID_SHA256,
        parameters: None,
    };
    let sid = SignerIdentifier::IssuerAndSerialNumber(IssuerAndSerialNumber {
        issuer: cert.tbs_certificate().issuer().clone(),
        serial_number: cert.tbs_certificate().serial_number().clone(),
    });
    let mut sib =
        SignerInfoBuilder::new(sid, sha256.clone(), &encap, Some(digest)).map_err(cms_err)?;
    sib.add_signed_attribute(create_signing_time_attribute().map_err(cms_err)?)
        .map_err(cms_err)?;
    let mut builder = SignedDataBuilder::new(&encap);
    builder.add_digest_algorithm(sha256).map_err(cms_err)?;
    builder
        .add_certificate(CertificateChoices::Certificate(cert))
        .map_err(cms_err)?;
    let root = Certificate::from_der(&keys.root_cert)
        .map_err(|e| Error::Setup(format!("the manufacturer root certificate: {e}")))?;
    builder
        .add_certificate(CertificateChoices::Certificate(root))
        .map_err(cms_err)?;
    builder
        .add_signer_info::<_, p256::ecdsa::DerSignature>(sib, &signer)
        .map_err(cms_err)?;
    let ci: ContentInfo = builder.build().map_err(cms_err)?;
    ci.content
        .to_der()
        .map_err(|e| Error::Invalid(format!("cannot encode the signature: {e}")))
}

/// Writes `ContentInfo(SignedData)` with the content of `json` encapsulated, taking every other
/// part of SignedData from the detached `signed_data` DER.
fn write_attached(signed_data: &[u8], json: &Path, content_len: u64, out: &Path) -> Result<()> {
    let bad = |e: d::DerError| Error::Invalid(format!("unexpected signature encoding: {}", e.0));
    let sd = d::only(signed_data, 0x30, "SignedData is not a SEQUENCE").map_err(bad)?;
    let parts = d::children(sd.value).map_err(bad)?;
    // version, digestAlgorithms, encapContentInfo (detached), certificates [0], signerInfos
    if parts.len() < 4 || parts[2].tag != 0x30 {
        return Err(Error::Invalid("unexpected SignedData layout".into()));
    }
    let n = content_len as usize;
    let oid_data = ID_DATA
        .to_der()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let octet = d::size(n);
    let a0 = d::size(octet);
    let eci_len = oid_data.len() + a0;
    let others: usize = parts
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 2)
        .map(|(_, p)| p.raw.len())
        .sum();
    let sd_len = others + d::size(eci_len);
    let oid_sd = ID_SIGNED_DATA
        .to_der()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    let ci_len = oid_sd.len() + d::size(d::size(sd_len));
    let file = File::create(out).map_err(|e| io(out, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let wio = |e| io(out, e);
    w.write_all(&d::header(0x30, ci_len)).map_err(wio)?;
    w.write_all(&oid_sd).map_err(wio)?;
    w.write_all(&d::header(0xA0, d::size(sd_len)))
        .map_err(wio)?;
    w.write_all(&d::header(0x30, sd_len)).map_err(wio)?;
    w.write_all(parts[0].raw).map_err(wio)?;
    w.write_all(parts[1].raw).map_err(wio)?;
    w.write_all(&d::header(0x30, eci_len)).map_err(wio)?;
    w.write_all(&oid_data).map_err(wio)?;
    w.write_all(&d::header(0xA0, octet)).map_err(wio)?;
    w.write_all(&d::header(0x04, n)).map_err(wio)?;
    let mut src = File::open(json).map_err(|e| io(json, e))?;
    let copied = std::io::copy(&mut (&mut src).take(content_len), &mut w).map_err(wio)?;
    if copied != content_len {
        return Err(Error::Invalid(format!(
            "{} changed while it was being signed",
            json.display()
        )));
    }
    for p in &parts[3..] {
        w.write_all(p.raw).map_err(wio)?;
    }
    w.flush().map_err(wio)?;
    let file = w.into_inner().map_err(|e| io(out, e.into_error()))?;
    file.sync_all().map_err(wio)?;
    Ok(())
}
