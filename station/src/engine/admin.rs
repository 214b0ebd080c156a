//! The commands behind [`super::Engine::execute`], after the permission check: line control,
//! batches, rework, alarms, firmware releases, customers, users, audit, HSM information.
//!
//! Each command that changes something writes its audit entry in the same transaction as the
//! change. Anything created in the HSM for a command that then fails is destroyed again.

use std::path::PathBuf;
use std::sync::Arc;

use hsm::KeyRole;
use rusqlite::{OptionalExtension as _, params};
use serde::Serialize;

use super::{Command, Engine, Error, Event, Inner, Reply, Result, recovery};
use crate::audit::{self, NewEvent, Severity};
use crate::auth::{self, User};
use crate::db::now_ms;
use crate::records::{self, NewBatch};

/// What opening a batch needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSpec {
    /// Work order.
    pub work_order: String,
    /// Model (as configured).
    pub model: String,
    /// Firmware release: SHA-256 (or a prefix of at least 8 hex digits) or version.
    pub firmware: String,
    /// Customer name.
    pub customer: String,
    /// Meters to produce.
    pub quantity: i64,
    /// Serial number prefix.
    pub serial_prefix: String,
    /// First serial number.
    pub serial_first: i64,
    /// Last serial number.
    pub serial_last: i64,
}

/// What an export produced.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ExportOutcome {
    /// Output directory.
    pub out_dir: PathBuf,
    /// Meters in the manifest.
    pub meters: usize,
    /// Voided certificates listed.
    pub voided: usize,
    /// SHA-256 of manifest.json.
    pub manifest_sha256: String,
    /// The audit checkpoint the manifest names.
    pub checkpoint_seq: i64,
}

fn ev(
    source: &str,
    kind: &str,
    sev: Severity,
    actor: &str,
    details: serde_json::Value,
) -> NewEvent {
    NewEvent::new(source, kind, sev, actor, details)
}

pub(super) async fn execute(engine: &Engine, user: &User, cmd: Command) -> Result<Reply> {
    let inner = engine.inner();
    let who = user.name.clone();
    let src = inner.source.clone();
    match cmd {
        Command::StartLine => {
            inner.flush_pending().await?;
            recovery::fail_orphans(inner).await?;
            let batch = inner
                .db
                .call(|c| records::open_batch(c).map_err(Error::from))
                .await?;
            let Some(batch) = batch else {
                return Err(Error::Conflict(
                    "no batch is open; a supervisor opens one with `station batch open`".into(),
                ));
            };
            if batch.remaining() == 0 {
                return Err(Error::Conflict(format!(
                    "batch {} has all its meters; close it",
                    batch.work_order
                )));
            }
            inner
                .record(ev(
                    &src,
                    "line.started",
                    Severity::Notice,
                    &who,
                    serde_json::json!({"batch": batch.work_order}),
                ))
                .await?;
            inner.set_running(true, Some(who));
            Ok(Reply::Done)
        }
        Command::StopLine => {
            // Stopping always works, even when the journal or the HSM cannot take the record now.
            inner.set_running(false, None);
            inner
                .record_or_keep(ev(
                    &src,
                    "line.stopped",
                    Severity::Notice,
                    &who,
                    serde_json::json!({}),
                ))
                .await;
            Ok(Reply::Done)
        }
        Command::EnableNest { nest, enabled } => {
            let i = nest_index(inner, nest)?;
            inner
                .record(ev(
                    &src,
                    if enabled {
                        "nest.enabled"
                    } else {
                        "nest.disabled"
                    },
                    Severity::Info,
                    &who,
                    serde_json::json!({"nest": nest}),
                ))
                .await?;
            inner.set_enabled(i, enabled);
            Ok(Reply::Done)
        }
        Command::ClearNest { nest } => {
            let i = nest_index(inner, nest)?;
            inner.update_nest(i, |n| {
                n.state = super::NestState::Idle;
                n.message = None;
                n.uid = None;
                n.serial = None;
                n.step = None;
            });
            Ok(Reply::Done)
        }
        Command::OpenBatch(spec) => open_batch(inner, &who, spec).await.map(Reply::Batch),
        Command::CloseBatch { id } => close_batch(inner, &who, id).await.map(Reply::Batch),
        Command::Rework { uid } => {
            let uid = uid.to_lowercase();
            let a = inner.audit.clone();
            inner
                .db
                .call(move |c| -> Result<()> {
                    let history = records::meters_by_uid(c, &uid)?;
                    if history.is_empty() {
                        return Err(Error::NotFound(format!("no meter with UID {uid} has been seen by this cell")));
                    }
                    if history.iter().any(|m| m.state != "failed") {
                        return Err(Error::Conflict(format!("UID {uid} is provisioned or in progress; only failed meters can be reworked")));
                    }
                    let tx = c.transaction()?;
                    tx.execute("INSERT INTO reworks (uid, approved_by, approved_at) VALUES (?1, ?2, ?3)", params![uid, who, now_ms()])?;
                    a.append(&tx, &ev(&src, "meter.rework_approved", Severity::Notice, &who, serde_json::json!({"uid": uid})))?;
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            Ok(Reply::Done)
        }
        Command::AckAlarm { id } => {
            let a = inner.audit.clone();
            let by = who.clone();
            inner
                .db
                .call(move |c| -> Result<()> {
                    let tx = c.transaction()?;
                    let kind: Option<String> =
                        rusqlite::OptionalExtension::optional(tx.query_row(
                            "SELECT kind FROM alarms WHERE id = ?1 AND acked_at IS NULL",
                            [id],
                            |r| r.get(0),
                        ))?;
                    let Some(kind) = kind else {
                        return Err(Error::NotFound(format!("no open alarm {id}")));
                    };
                    tx.execute(
                        "UPDATE alarms SET acked_at = ?1, acked_by = ?2 WHERE id = ?3",
                        params![now_ms(), by, id],
                    )?;
                    a.append(
                        &tx,
                        &ev(
                            &src,
                            "alarm.acknowledged",
                            Severity::Notice,
                            &by,
                            serde_json::json!({"alarm": id, "kind": kind}),
                        ),
                    )?;
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            inner.emit(Event::AlarmAcked { id, by: who });
            Ok(Reply::Done)
        }
        Command::ImportFirmware { name, image } => import_firmware(inner, &who, name, image)
            .await
            .map(Reply::Firmware),
        Command::ImportCustomer { name, cert } => import_customer(inner, &who, name, cert)
            .await
            .map(Reply::Customer),
        Command::AddUser { name, role, pin } => {
            let a = inner.audit.clone();
            auth::check_user_name(&name)?;
            auth::check_pin_policy(&pin, inner.cfg.access.min_pin_length)?;
            let pin = inner.pepper_pin(&pin).await?;
            let u = inner
                .db
                .call(move |c| -> Result<User> {
                    let tx = c.transaction()?;
                    let u = auth::add_user(&tx, &name, role, &pin, now_ms())?;
                    a.append(
                        &tx,
                        &ev(
                            &src,
                            "user.added",
                            Severity::Notice,
                            &who,
                            serde_json::json!({"user": name, "role": role.as_str()}),
                        ),
                    )?;
                    tx.commit()?;
                    Ok(u)
                })
                .await?;
            Ok(Reply::User(u))
        }
        Command::DisableUser { name } => {
            let a = inner.audit.clone();
            inner
                .db
                .call(move |c| -> Result<()> {
                    let tx = c.transaction()?;
                    auth::disable_user(&tx, &name, now_ms())?;
                    a.append(
                        &tx,
                        &ev(
                            &src,
                            "user.disabled",
                            Severity::Notice,
                            &who,
                            serde_json::json!({"user": name}),
                        ),
                    )?;
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            Ok(Reply::Done)
        }
        Command::ResetPin { name, pin } => {
            let a = inner.audit.clone();
            auth::check_pin_policy(&pin, inner.cfg.access.min_pin_length)?;
            let pin = inner.pepper_pin(&pin).await?;
            inner
                .db
                .call(move |c| -> Result<()> {
                    let tx = c.transaction()?;
                    auth::reset_pin(&tx, &name, &pin, now_ms())?;
                    a.append(
                        &tx,
                        &ev(
                            &src,
                            "user.pin_reset",
                            Severity::Notice,
                            &who,
                            serde_json::json!({"user": name}),
                        ),
                    )?;
                    tx.commit()?;
                    Ok(())
                })
                .await?;
            Ok(Reply::Done)
        }
        Command::ListUsers => Ok(Reply::Users(
            inner
                .db
                .call(|c| auth::list_users(c).map_err(Error::from))
                .await?,
        )),
        Command::ListBatches => Ok(Reply::Batches(
            inner
                .db
                .call(|c| records::list_batches(c).map_err(Error::from))
                .await?,
        )),
        Command::BatchStatus { id } => {
            let b = inner
                .db
                .call(move |c| match id {
                    Some(id) => records::batch(c, id).map_err(Error::from),
                    None => records::open_batch(c).map_err(Error::from),
                })
                .await?;
            b.map(Reply::Batch).ok_or_else(|| {
                Error::NotFound(match id {
                    Some(id) => format!("no batch {id}"),
                    None => "no batch is open".into(),
                })
            })
        }
        Command::ListFirmware => Ok(Reply::Firmwares(
            inner
                .db
                .call(|c| records::list_firmware(c).map_err(Error::from))
                .await?,
        )),
        Command::ListCustomers => Ok(Reply::Customers(
            inner
                .db
                .call(|c| records::list_customers(c).map_err(Error::from))
                .await?,
        )),
        Command::ReprintLabel { serial } => {
            if engine.config().labels.is_none() {
                return Err(Error::Conflict(
                    "this cell prints no labels (no [labels] printer in its configuration)".into(),
                ));
            }
            let inner = engine.inner();
            let (s2, who, src, a) = (
                serial.clone(),
                user.name.clone(),
                inner.source.clone(),
                inner.audit.clone(),
            );
            let found = inner
                .db
                .call(move |c| -> Result<bool> {
                    let tx = c.transaction()?;
                    let done: Option<i64> = tx
                        .query_row(
                            "SELECT id FROM meters WHERE serial = ?1 AND state = 'done'",
                            [&s2],
                            |r| r.get(0),
                        )
                        .optional()?;
                    if done.is_none() {
                        return Ok(false);
                    }
                    a.append(
                        &tx,
                        &ev(
                            &src,
                            "label.reprinted",
                            Severity::Notice,
                            &who,
                            serde_json::json!({
                                "message": format!("{who} had the label of {s2} printed again"),
                                "serial": s2,
                            }),
                        ),
                    )?;
                    tx.commit()?;
                    Ok(true)
                })
                .await?;
            if !found {
                return Err(Error::NotFound(format!(
                    "no done meter has serial number {serial}"
                )));
            }
            inner.queue_label(&serial);
            Ok(Reply::Done)
        }
        Command::FleetView { find } => {
            let Some(f) = engine.config().fleet.as_ref() else {
                return Err(Error::Conflict(
                    "this station has no factory registry (a [fleet] section in its configuration)"
                        .into(),
                ));
            };
            let ep = crate::fleet::Endpoint::station(&engine.config().station_id, f);
            let view = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                crate::fleet::view(&ep, find.as_deref()),
            )
            .await
            .map_err(|_| {
                Error::Unavailable("the factory registry did not answer within 10 s".into())
            })?
            .map_err(|e| Error::Unavailable(e.to_string()))?;
            Ok(Reply::Fleet(view))
        }
        Command::ShiftView { hours } => {
            if !(1..=24).contains(&hours) {
                return Err(Error::Invalid(format!(
                    "a shift view covers 1 to 24 hours, not {hours}"
                )));
            }
            let bauds: Vec<u32> = engine.config().nests.iter().map(|n| n.baud).collect();
            let until = now_ms();
            let since = until - i64::from(hours) * 3_600_000;
            // A long shift takes a while to read: on a read-only connection of its own (the
            // journal is in WAL mode), not on the one the line writes through.
            let path = engine.config().database.clone();
            let view = tokio::task::spawn_blocking(move || -> Result<_> {
                let c = rusqlite::Connection::open_with_flags(
                    &path,
                    rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY
                        | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .map_err(crate::db::DbError::from)?;
                Ok(crate::shift::read(&c, since, until, &bauds)?)
            })
            .await
            .map_err(|e| Error::Invalid(format!("the shift could not be read: {e}")))??;
            Ok(Reply::Shift(view))
        }
        Command::ListAlarms => Ok(Reply::Alarms(
            inner
                .db
                .call(|c| audit::open_alarms(c).map_err(Error::from))
                .await?,
        )),
        Command::AuditVerify => {
            let v = verify_audit(inner).await?;
            let (kind, sev) = if v.ok() {
                ("audit.verified", Severity::Info)
            } else {
                ("audit.verification_failed", Severity::Critical)
            };
            let details = serde_json::json!({
                "entries": v.entries, "checkpoints": v.checkpoints,
                "message": v.first_bad.as_ref().map(|(s, why)| format!("first bad entry {s}: {why}")),
            });
            // A log that fails verification still records that it was checked.
            let _ = inner.record(ev(&src, kind, sev, &who, details)).await;
            Ok(Reply::Verification(v))
        }
        Command::AuditTail { n } => Ok(Reply::Entries(
            inner
                .db
                .call(move |c| audit::tail(c, n.clamp(1, 100_000)).map_err(Error::from))
                .await?,
        )),
        Command::AuditSince { after } => Ok(Reply::Entries(
            inner
                .db
                .call(move |c| audit::read(c, after, 10_000).map_err(Error::from))
                .await?,
        )),
        Command::AuditExport => {
            let verification = verify_audit(inner).await?;
            let (entries, checkpoints) = inner
                .db
                .call(|c| -> Result<_> {
                    let entries = audit::read(c, 0, i64::MAX)?;
                    let mut stmt = c.prepare("SELECT note FROM audit_checkpoints ORDER BY id")?;
                    let notes = stmt
                        .query_map([], |r| r.get::<_, String>(0))?
                        .collect::<Result<Vec<_>, _>>()?;
                    Ok((entries, notes))
                })
                .await?;
            inner
                .record(ev(
                    &src,
                    "audit.exported",
                    Severity::Notice,
                    &who,
                    serde_json::json!({"entries": entries.len()}),
                ))
                .await?;
            Ok(Reply::AuditExport {
                entries,
                checkpoints,
                verification,
            })
        }
        Command::Export { batch, out_dir } => {
            crate::manifest::export::export(inner, &who, batch, out_dir)
                .await
                .map(Reply::Export)
        }
        Command::PkiCsr {
            role,
            subject,
            curve,
        } => {
            let hsm = inner.hsm.clone();
            let cn = subject.common_name.clone();
            let out =
                tokio::task::spawn_blocking(move || hsm::pki::csr(&hsm, role, curve, &subject))
                    .await
                    .map_err(|e| Error::Setup(e.to_string()))??;
            inner
                .record(ev(
                    &src,
                    "pki.csr",
                    Severity::Notice,
                    &who,
                    serde_json::json!({"role": format!("{role:?}"), "curve": curve.name(), "common_name": cn,
                        "message": format!("a new {role:?} key was generated in the HSM and its certificate request written")}),
                ))
                .await?;
            Ok(Reply::Text(out.pem))
        }
        Command::PkiImport {
            role,
            cert_pem,
            chain_pem,
        } => {
            let hsm = inner.hsm.clone();
            let fingerprint = crate::engine::keys::parse_cert(cert_pem.as_bytes())
                .map(|(_, der)| hex::encode(line_protocol::crypto::sha256(&der)))
                .map_err(Error::Invalid)?;
            let outcome = tokio::task::spawn_blocking(move || {
                hsm::pki::import(&hsm, role, &cert_pem, &chain_pem)
            })
            .await
            .map_err(|e| Error::Setup(e.to_string()))??;
            inner
                .record(ev(
                    &src,
                    "pki.import",
                    Severity::Notice,
                    &who,
                    serde_json::json!({"role": format!("{role:?}"), "fingerprint": fingerprint,
                        "message": format!("a {role:?} certificate was stored in the HSM")}),
                ))
                .await?;
            Ok(Reply::Text(format!(
                "{outcome}\nrestart stationd for the cell to use it"
            )))
        }
        Command::IssueTls {
            name,
            usage,
            spki_der,
            application_uri,
            days,
            dns_names,
            ip_addresses,
        } => {
            let key = tls_key(&spki_der, application_uri.is_some())?;
            let profile = hsm::TlsProfile {
                name: name.clone(),
                organization: inner.cfg.manufacturer.name.clone(),
                usage,
                key,
                application_uri: application_uri.clone(),
                days,
                dns_names,
                ip_addresses,
            };
            let ca = inner.keys.device_ca.clone();
            let issued = inner
                .hsm
                .run(move |s| hsm::cert::issue_tls_certificate(s, &ca, &profile))
                .await?;
            inner
                .record(ev(
                    &src,
                    "pki.tls_issued",
                    Severity::Notice,
                    &who,
                    serde_json::json!({"name": name, "usage": format!("{usage:?}").to_lowercase(),
                        "application_uri": application_uri, "serial": issued.serial_hex(), "fingerprint": issued.fingerprint_hex(), "days": days}),
                ))
                .await?;
            // The certificate, then the device CA it chains to (what a console checks the
            // daemon's own certificate by).
            Ok(Reply::Text(format!(
                "{}{}",
                issued.pem(),
                crate::api::pem("CERTIFICATE", &inner.keys.device_ca.cert_der)
            )))
        }
        Command::RecoverAudit { reason } => {
            let reason = reason.trim().to_string();
            if reason.len() < 10 || reason.len() > 500 {
                return Err(Error::Invalid(
                    "say why the log may be resumed, in 10 to 500 characters (it goes into the log)"
                        .into(),
                ));
            }
            if inner.audit.frozen().is_none() {
                return Err(Error::Conflict(
                    "the audit log is not frozen; there is nothing to recover".into(),
                ));
            }
            let a = inner.audit.clone();
            let (a2, src2, who2) = (a.clone(), src.clone(), who.clone());
            let r = inner
                .db
                .call(move |c| -> Result<(audit::Appended, String)> {
                    let tx = c.transaction()?;
                    let r = a2.recover(&tx, &src2, &who2, &reason)?;
                    tx.commit()?;
                    Ok(r)
                })
                .await;
            let (appended, why) = match r {
                Ok(x) => x,
                Err(e) => {
                    // Nothing was committed: the log stays frozen.
                    if a.frozen().is_none() {
                        a.freeze("a recovery of the log failed; run it again".into());
                    }
                    return Err(e);
                }
            };
            inner.anchor_audit(true).await?;
            if let Some(id) = appended.alarm {
                inner.publish_alarm(id).await;
            }
            tracing::warn!(by = %who, was = %why, "the audit log was resumed");
            Ok(Reply::Text(format!(
                "the audit log is resumed at entry {} (it had been frozen: {why}); `station audit verify` still reports what was damaged",
                appended.seq
            )))
        }
        Command::HsmCheck => {
            let report = super::self_test(inner).await?;
            if report.passed() {
                Ok(Reply::Text(report.to_string()))
            } else {
                Err(Error::Setup(format!(
                    "the HSM failed its self-test:\n{report}"
                )))
            }
        }
        Command::HsmInfo => {
            let hsm = inner.hsm.clone();
            let info = tokio::task::spawn_blocking(move || hsm::pki::info(&hsm))
                .await
                .map_err(|e| Error::Setup(e.to_string()))??;
            Ok(Reply::Text(format!(
                "{info}\n\nKey policy:\n{}",
                hsm::pki::policy_table()
            )))
        }
    }
}

fn nest_index(inner: &Inner, nest: u32) -> Result<usize> {
    let n = inner.cfg.nests.len() as u32;
    if nest == 0 || nest > n {
        return Err(Error::Invalid(format!(
            "nest {nest} does not exist; this cell has nests 1 to {n}"
        )));
    }
    Ok(nest as usize - 1)
}

/// Verifies the audit log with the audit key of the token.
pub(super) async fn verify_audit(inner: &Arc<Inner>) -> Result<audit::Verification> {
    let key = inner.keys.audit_verifying_key()?;
    inner
        .db
        .call(move |c| audit::verify(c, &key).map_err(Error::from))
        .await
}

async fn import_firmware(
    inner: &Arc<Inner>,
    who: &str,
    name: String,
    image: Vec<u8>,
) -> Result<records::FirmwareRow> {
    let src = inner.source.clone();
    let sha = hex::encode(line_protocol::crypto::sha256(&image));
    match line_protocol::image::verify(&image, &inner.keys.firmware_key) {
        Err(e) => {
            inner
                .record(ev(
                    &src,
                    "firmware.rejected",
                    Severity::Critical,
                    who,
                    serde_json::json!({"message": format!("firmware image {name} refused: {e}"), "file": name, "sha256": sha, "size": image.len()}),
                ))
                .await?;
            Err(Error::Invalid(format!(
                "{name} refused: {e}; only images signed by the firmware signing authority (certificate firmware-verification) are accepted"
            )))
        }
        Ok(info) => {
            let a = inner.audit.clone();
            let who = who.to_string();
            let version = info.version.to_string();
            let key_hash = hex::encode(line_protocol::image::key_hash(&inner.keys.firmware_key));
            let id = inner
                .db
                .call(move |c| -> Result<i64> {
                    if records::list_firmware(c)?.iter().any(|f| f.sha256 == sha) {
                        return Err(Error::Conflict(format!("firmware {sha} is already imported")));
                    }
                    let tx = c.transaction()?;
                    let id = records::insert_firmware(&tx, &sha, &version, &image, &key_hash, &who, now_ms())?;
                    a.append(
                        &tx,
                        &ev(&src, "firmware.imported", Severity::Notice, &who, serde_json::json!({"file": name, "sha256": sha, "version": version, "size": image.len()})),
                    )?;
                    tx.commit()?;
                    Ok(id)
                })
                .await?;
            let all = inner
                .db
                .call(|c| records::list_firmware(c).map_err(Error::from))
                .await?;
            all.into_iter()
                .find(|f| f.id == id)
                .ok_or_else(|| Error::NotFound("firmware just imported".into()))
        }
    }
}

fn customer_label(name: &str) -> String {
    format!("customer-transport/{name}")
}

/// A utility's key-transport certificate as the station accepts it (PEM or DER) for customer
/// `name`: its DER, once the name and [`check_customer_certificate`] pass.
pub fn accept_customer_certificate(name: &str, cert: &[u8]) -> Result<Vec<u8>> {
    if name.is_empty()
        || name.len() > 24
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(Error::Invalid(
            "customer names are 1 to 24 letters, digits, '-', '_' or '.'".into(),
        ));
    }
    let (parsed, der) = super::keys::parse_cert(cert)
        .map_err(|e| Error::Invalid(format!("the customer certificate: {e}")))?;
    let alg = parsed
        .tbs_certificate()
        .subject_public_key_info()
        .algorithm
        .oid
        .to_string();
    if alg != "1.2.840.113549.1.1.1" {
        return Err(Error::Invalid(format!(
            "the customer certificate must carry an RSA key (the batch transport key is wrapped to it with RSA-OAEP); it has {alg}"
        )));
    }
    check_customer_certificate(&parsed)?;
    Ok(der)
}

/// Records a customer whose transport key the token's security officer has installed
/// (`station hsm trust-customer`): the token object must be that certificate's key, trusted.
async fn import_customer(
    inner: &Arc<Inner>,
    who: &str,
    name: String,
    cert: Vec<u8>,
) -> Result<records::CustomerRow> {
    let der = accept_customer_certificate(&name, &cert)?;
    let fp = hex::encode(line_protocol::crypto::sha256(&der));
    let label = customer_label(&name);
    let hsm = inner.hsm.clone();
    let (l2, d2) = (name.clone(), der.clone());
    hsm.run(move |s| s.approved_customer_key(&l2, &d2).map(|_| ()))
        .await
        .map_err(|e| match e {
            hsm::Error::CustomerKeyNotApproved { .. } => Error::Invalid(format!(
                "{e}: on the station's host, `station hsm trust-customer {name} CERT` with the token's security officer PIN"
            )),
            other => Error::Invalid(format!(
                "the customer's key in the HSM cannot be checked: {other}"
            )),
        })?;
    let a = inner.audit.clone();
    let src = inner.source.clone();
    let who = who.to_string();
    let n2 = name.clone();
    let r = inner
        .db
        .call(move |c| -> Result<()> {
            let tx = c.transaction()?;
            records::insert_customer(&tx, &n2, &der, &fp, &who, now_ms()).map_err(|e| match e {
                crate::db::DbError::Constraint(_) => Error::Conflict(format!(
                    "a customer named {n2} or with this certificate already exists"
                )),
                other => other.into(),
            })?;
            a.append(
                &tx,
                &ev(
                    &src,
                    "customer.imported",
                    Severity::Notice,
                    &who,
                    serde_json::json!({"customer": n2, "fingerprint": fp, "hsm_label": label, "hsm_trusted": true}),
                ),
            )?;
            tx.commit()?;
            Ok(())
        })
        .await;
    r?;
    let all = inner
        .db
        .call(|c| records::list_customers(c).map_err(Error::from))
        .await?;
    all.into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| Error::NotFound("customer just imported".into()))
}

async fn open_batch(inner: &Arc<Inner>, who: &str, spec: BatchSpec) -> Result<records::BatchRow> {
    if spec.work_order.trim().is_empty()
        || spec.work_order.len() > 32
        || !spec
            .work_order
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
    {
        return Err(Error::Invalid(
            "work orders are 1 to 32 letters, digits, '-', '_', '.' or '/'".into(),
        ));
    }
    let Some(model) = inner.cfg.model(&spec.model) else {
        let known: Vec<_> = inner.cfg.models.iter().map(|m| m.name.as_str()).collect();
        return Err(Error::Invalid(format!(
            "model {} is not configured; configured models: {}",
            spec.model,
            known.join(", ")
        )));
    };
    let anchors = pin_anchors(inner, model)?;
    let disable = model.disable | line_protocol::msg::iface::PROVISIONING;
    if spec.quantity < 1 {
        return Err(Error::Invalid("the quantity must be at least 1".into()));
    }
    if spec.serial_first < 0
        || spec.serial_last > 999_999_999
        || spec.serial_first > spec.serial_last
    {
        return Err(Error::Invalid(
            "serial numbers are 0 to 999999999, first no greater than last".into(),
        ));
    }
    if spec.serial_last - spec.serial_first + 1 < spec.quantity {
        return Err(Error::Invalid(format!(
            "the serial range holds {} numbers, fewer than the {} meters ordered (failed meters use numbers too: leave room)",
            spec.serial_last - spec.serial_first + 1,
            spec.quantity
        )));
    }
    if spec.serial_prefix.len() > 16
        || !spec
            .serial_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    {
        return Err(Error::Invalid(
            "serial prefixes are up to 16 letters, digits or '-'".into(),
        ));
    }
    let leased = inner.cfg.fleet.is_some();
    if leased && (spec.serial_first != 0 || spec.serial_last != crate::fleet::LAST_NUMBER) {
        return Err(Error::Invalid(
            "this station has a factory registry: its numbers come from the registry's leases, not from a batch range; open the batch without --serials".into(),
        ));
    }
    let s2 = spec.clone();
    let (firmware, customer) = inner
        .db
        .call(
            move |c| -> Result<(records::FirmwareRow, records::CustomerRow)> {
                if let Some(open) = records::open_batch(c)? {
                    return Err(Error::Conflict(format!(
                        "batch {} is still open; close it first (a cell runs one batch at a time)",
                        open.work_order
                    )));
                }
                for b in records::list_batches(c)? {
                    if b.work_order == s2.work_order {
                        return Err(Error::Conflict(format!(
                            "work order {} already has a batch",
                            s2.work_order
                        )));
                    }
                    // System titles are the FLAG ID and the number alone: two batches may
                    // not share numbers, whatever their prefixes.
                    if !leased && b.serial_first <= s2.serial_last && s2.serial_first <= b.serial_last {
                        return Err(Error::Conflict(format!(
                            "serial numbers {}..{} overlap batch {} ({}{}..{}{}): a meter's system title is the FLAG ID and its number without the prefix, so batches may not share numbers; choose numbers after {}",
                            s2.serial_first,
                            s2.serial_last,
                            b.work_order,
                            b.serial_prefix,
                            b.serial_first,
                            b.serial_prefix,
                            b.serial_last,
                            b.serial_last
                        )));
                    }
                }
                let fw = records::find_firmware(c, &s2.firmware)?.ok_or_else(|| {
                    Error::NotFound(format!(
                        "no firmware release {}; list them with `station firmware list`",
                        s2.firmware
                    ))
                })?;
                let cust = records::list_customers(c)?
                    .into_iter()
                    .find(|x| x.name == s2.customer)
                    .ok_or_else(|| {
                        Error::NotFound(format!(
                            "no customer {}; import its certificate with `station customer import`",
                            s2.customer
                        ))
                    })?;
                Ok((fw, cust))
            },
        )
        .await?;
    // The batch transport key: AES-256 in the HSM, wrapped for the customer with RSA-OAEP.
    let tk_label = format!("batch-transport/{}", spec.work_order);
    let cust_id = customer.id;
    let cert = inner
        .db
        .call(move |c| records::customer_cert(c, cust_id).map_err(Error::from))
        .await?;
    // The certificate was accepted at import; it may have expired since.
    let (parsed, _) = super::keys::parse_cert(&cert)
        .map_err(|e| Error::Invalid(format!("the customer certificate: {e}")))?;
    check_customer_certificate(&parsed)?;
    let hsm = inner.hsm.clone();
    // On a token that takes OAEP labels, the work order is the label: the wrapped key then opens
    // only as the key of this work order.
    let oaep_label = hsm.mechanisms().oaep_label.then(|| spec.work_order.clone());
    let alg = match (&oaep_label, hsm.mechanisms().rsa_oaep) {
        (Some(l), Some(h)) => hsm::WrapAlg::RsaOaepLabelled(
            h,
            hsm::OaepLabel::new(l.as_bytes()).ok_or_else(|| {
                Error::Invalid(format!(
                    "work order {l} is longer than an OAEP label may be ({} bytes)",
                    hsm::OaepLabel::MAX
                ))
            })?,
        ),
        _ => hsm::WrapAlg::RsaOaep,
    };
    let (l1, l2) = (tk_label.clone(), customer.name.clone());
    let made = hsm
        .run(move |s| {
            let tk =
                s.generate_aes_key(KeyRole::BatchTransport, hsm::AesKeySize::Aes256, Some(&l1))?;
            let wrapped = (|| {
                // Read afresh from the token before the wrap: the key the security officer
                // approved for this certificate, or nothing.
                let ck = s.approved_customer_key(&l2, &cert)?;
                let w = s.wrap(&ck, &tk, alg)?;
                Ok((w, s.kcv(&tk)?))
            })();
            match wrapped {
                Ok((w, kcv)) => Ok((tk, w, kcv)),
                Err(e) => {
                    let _ = s.destroy(&tk);
                    Err(e)
                }
            }
        })
        .await
        .map_err(|e| match e {
            hsm::Error::CustomerKeyNotApproved { .. } => Error::Invalid(format!(
                "{e}: the token's security officer approves the customer's certificate again (`station hsm trust-customer {} CERT`)",
                customer.name
            )),
            other => other.into(),
        })?;
    let (tk, wrapped, kcv) = made;
    let oaep = match inner.hsm.mechanisms().rsa_oaep {
        Some(h) => format!("{h:?}").to_lowercase(),
        None => return Err(Error::Setup("the HSM offers no RSA-OAEP: the batch transport key cannot be wrapped for the customer".into())),
    };
    let nb = NewBatch {
        work_order: spec.work_order.clone(),
        model: spec.model.clone(),
        firmware_id: firmware.id,
        customer_id: customer.id,
        quantity: spec.quantity,
        serial_prefix: spec.serial_prefix.clone(),
        serial_first: spec.serial_first,
        serial_last: spec.serial_last,
        transport_key: tk_label.clone(),
        transport_wrapped: wrapped,
        transport_kcv: hex::encode(kcv),
        oaep_hash: oaep.clone(),
        oaep_label: oaep_label.clone(),
        line_baud: inner.cfg.nests.iter().map(|n| n.baud).max(),
    };
    let a = inner.audit.clone();
    let src = inner.source.clone();
    let who = who.to_string();
    let anchors_sha256 = records::anchors_digest(&anchors);
    let anchors_listed: Vec<serde_json::Value> = anchors
        .iter()
        .map(|x| {
            serde_json::json!({"kind": x.kind, "index": x.index, "sha256": x.sha256,
                "subject": cert_subject(&x.der)})
        })
        .collect();
    let r = inner
        .db
        .call(move |c| -> Result<i64> {
            let tx = c.transaction()?;
            let id = records::insert_batch(&tx, &nb, &who, now_ms())?;
            records::insert_anchors(&tx, id, &anchors)?;
            records::set_disable_mask(&tx, id, disable)?;
            a.append(
                &tx,
                &ev(&src, "batch.opened", Severity::Notice, &who, serde_json::json!({
                    "batch": id, "work_order": nb.work_order, "model": nb.model, "firmware": firmware.sha256,
                    "firmware_version": firmware.version, "customer": customer.name, "quantity": nb.quantity,
                    "serials": if leased {
                        format!("{}: numbers from the registry's leases", nb.serial_prefix)
                    } else {
                        format!("{}{:09}..{}{:09}", nb.serial_prefix, nb.serial_first, nb.serial_prefix, nb.serial_last)
                    },
                    "transport_key": nb.transport_key, "oaep": oaep, "oaep_label": nb.oaep_label,
                    "anchors": anchors_listed, "anchors_sha256": anchors_sha256,
                    "disable": disable, "disable_names": super::provision::iface_names(disable),
                })),
            )?;
            tx.commit()?;
            Ok(id)
        })
        .await;
    let id = match r {
        Ok(id) => id,
        Err(e) => {
            let _ = hsm.run(move |s| s.destroy(&tk)).await;
            return Err(e);
        }
    };
    let b = inner
        .db
        .call(move |c| records::batch(c, id).map_err(Error::from))
        .await?
        .ok_or_else(|| Error::NotFound("batch just opened".into()))?;
    inner.emit(Event::Batch(Some(b.clone())));
    inner.bump();
    Ok(b)
}

/// The trust anchors a batch of `model` installs into every meter, read and checked once, when
/// the batch opens: the device CA and the firmware-verification certificate from the token (both
/// checked against the manufacturer root at start-up), then the model's utility anchors from
/// their files, in the configured order.
fn pin_anchors(
    inner: &Arc<Inner>,
    model: &crate::config::ModelSettings,
) -> Result<Vec<records::AnchorRow>> {
    let row = |kind: &str, index: u8, der: Vec<u8>| records::AnchorRow {
        kind: kind.into(),
        index,
        sha256: hex::encode(line_protocol::crypto::sha256(&der)),
        der,
    };
    let mut out = vec![
        row("device-ca", 0, inner.keys.device_ca.cert_der.clone()),
        row("firmware-verification", 0, inner.keys.firmware_cert.clone()),
    ];
    if model.anchors.len() > 16 {
        return Err(Error::Invalid(format!(
            "model {} names {} utility trust anchors; a meter takes at most 16",
            model.name,
            model.anchors.len()
        )));
    }
    for (i, path) in model.anchors.iter().enumerate() {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::Invalid(format!(
                "cannot read the trust anchor {} of model {}: {e}",
                path.display(),
                model.name
            ))
        })?;
        let (cert, der) = super::keys::parse_cert(&bytes)
            .map_err(|e| Error::Invalid(format!("the trust anchor {}: {e}", path.display())))?;
        let is_ca = matches!(
            cert.tbs_certificate()
                .get_extension::<x509_cert::ext::pkix::BasicConstraints>(),
            Ok(Some((_, bc))) if bc.ca
        );
        let kind = if is_ca {
            "utility-ca"
        } else {
            "utility-client"
        };
        out.push(row(kind, i as u8, der));
    }
    Ok(out)
}

/// A certificate's subject, for people (empty when it does not parse).
fn cert_subject(der: &[u8]) -> String {
    use der::Decode;
    x509_cert::Certificate::from_der(der)
        .map(|c| c.tbs_certificate().subject().to_string())
        .unwrap_or_default()
}

async fn close_batch(inner: &Arc<Inner>, who: &str, id: i64) -> Result<records::BatchRow> {
    if inner.running().0 {
        return Err(Error::Conflict(
            "stop the line before closing the batch".into(),
        ));
    }
    let a = inner.audit.clone();
    let src = inner.source.clone();
    let who = who.to_string();
    let b = inner
        .db
        .call(move |c| -> Result<records::BatchRow> {
            let b = records::batch(c, id)?.ok_or_else(|| Error::NotFound(format!("no batch {id}")))?;
            if b.state != "open" {
                return Err(Error::Conflict(format!("batch {} is already closed", b.work_order)));
            }
            if b.in_flight > 0 {
                return Err(Error::Conflict(format!("{} meter(s) of batch {} are still in progress", b.in_flight, b.work_order)));
            }
            let tx = c.transaction()?;
            let n = tx.execute("UPDATE batches SET state = 'closed', closed_at = ?1, closed_by = ?2 WHERE id = ?3 AND state = 'open'", params![now_ms(), who, id])?;
            records::guarded(n, &format!("batch {id}"), "open")?;
            a.append(
                &tx,
                &ev(&src, "batch.closed", Severity::Notice, &who, serde_json::json!({
                    "batch": id, "work_order": b.work_order, "done": b.done, "failed": b.failed, "quantity": b.quantity,
                })),
            )?;
            tx.commit()?;
            Ok(records::batch(c, id)?.unwrap_or(b))
        })
        .await?;
    // Every meter key of the batch is wrapped under the transport key already: the key itself
    // is no longer needed in the HSM.
    let label = b.transport_key.clone();
    let destroyed = inner
        .hsm
        .run(move |s| match s.find_key(hsm::KeyKind::Aes(32), &label)? {
            Some(k) => s.destroy(&k).map(|_| true),
            None => Ok(false),
        })
        .await;
    let details = match &destroyed {
        Ok(d) => serde_json::json!({"key": b.transport_key, "destroyed": d, "batch": b.work_order}),
        Err(e) => {
            serde_json::json!({"key": b.transport_key, "destroyed": false, "message": e.to_string()})
        }
    };
    let _ = inner
        .record(ev(
            &inner.source,
            "key.destroyed",
            Severity::Notice,
            &b.closed_by.clone().unwrap_or_default(),
            details,
        ))
        .await;
    inner.emit(Event::Batch(None));
    Ok(b)
}

/// The P-256 point of a SubjectPublicKeyInfo (DER), refused for anything else.
/// The key of a certificate request: P-256 for the service API's TLS; RSA for an OPC UA
/// application (`opc_ua`), whose security policies need it.
fn tls_key(spki_der: &[u8], opc_ua: bool) -> Result<hsm::TlsKey> {
    use der::Decode;
    let spki = spki::SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|_| Error::Invalid("the public key is not a DER SubjectPublicKeyInfo".into()))?;
    if opc_ua {
        const RSA: der::asn1::ObjectIdentifier =
            der::asn1::ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
        if spki.algorithm.oid != RSA {
            return Err(Error::Invalid(
                "an OPC UA application certificate needs an RSA key (2048 to 4096 bits)".into(),
            ));
        }
        let bits = spki.subject_public_key.as_bytes().ok_or_else(|| {
            Error::Invalid("the RSA public key is not a whole number of bytes".into())
        })?;
        return Ok(hsm::TlsKey::Rsa(bits.to_vec()));
    }
    let key = p256::PublicKey::try_from(spki)
        .map_err(|_| Error::Invalid("the public key must be an EC P-256 key".into()))?;
    Ok(hsm::TlsKey::P256(key.to_sec1_bytes().to_vec()))
}

/// What a utility's key-transport certificate must be: an end-entity certificate valid now,
/// allowed keyEncipherment, for an RSA key of at least 3072 bits with the exponent 65537.
fn check_customer_certificate(c: &x509_cert::Certificate) -> Result<()> {
    use der::Decode;
    use x509_cert::ext::pkix::{BasicConstraints, KeyUsage};
    let bad = |why: String| Error::Invalid(format!("the customer certificate is refused: {why}"));
    let tbs = c.tbs_certificate();
    let key_bytes = tbs
        .subject_public_key_info()
        .subject_public_key
        .as_bytes()
        .ok_or_else(|| bad("its key cannot be read".into()))?;
    let key = rsa::pkcs1::RsaPublicKey::<der::asn1::UintRef<'_>>::from_der(key_bytes)
        .map_err(|e| bad(format!("its RSA key does not decode ({e})")))?;
    let modulus = key.modulus.as_bytes();
    let bits = modulus
        .iter()
        .position(|b| *b != 0)
        .map(|i| (modulus.len() - i) * 8 - modulus[i].leading_zeros() as usize)
        .unwrap_or(0);
    if bits < 3072 {
        return Err(bad(format!(
            "its RSA key has {bits} bits; at least 3072 are required"
        )));
    }
    if key.public_exponent.as_bytes() != [0x01, 0x00, 0x01] {
        return Err(bad(format!(
            "its RSA exponent is 0x{}; only 65537 is accepted",
            hex::encode(key.public_exponent.as_bytes())
        )));
    }
    if tbs
        .get_extension::<BasicConstraints>()
        .map_err(|e| bad(format!("its basic constraints do not decode ({e})")))?
        .is_some_and(|(_, bc)| bc.ca)
    {
        return Err(bad(
            "it is a CA certificate; import the utility's key-transport certificate itself".into(),
        ));
    }
    match tbs.get_extension::<KeyUsage>() {
        Ok(Some((_, ku))) if ku.key_encipherment() => {}
        Ok(_) => {
            return Err(bad(
                "it does not allow keyEncipherment, which wrapping the batch transport key is"
                    .into(),
            ));
        }
        Err(e) => return Err(bad(format!("its key usage does not decode ({e})"))),
    }
    let now = std::time::SystemTime::now();
    let validity = tbs.validity();
    if validity.not_before.to_system_time() > now {
        return Err(bad("it is not valid yet".into()));
    }
    if validity.not_after.to_system_time() < now {
        return Err(bad("it has expired".into()));
    }
    Ok(())
}
