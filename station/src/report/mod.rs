//! The batch evidence report: one self-contained HTML file (and a PDF printed from it) that an
//! auditor reads without the source. Per requirement of the seed documents (the map in
//! `schemas/requirements.toml`) it says how the cell meets it and shows the evidence of *this*
//! batch: the audit entries that bear on it, the checkpoints with their signatures verified, the
//! firmware release, the HSM's self-test read-back, the permission table and the tests of this
//! build that prove it. The batch's story follows in charts (meters per hour, cycle time against
//! its theoretical minimum, failures by reason and nest, alarms and how long until
//! acknowledged), then every voided certificate and the chain from each export's checkpoint back
//! to the audit log.
//!
//! Every number is computed here from the journal and the audit log ([`gather`]); the HTML
//! ([`html::render`]) only lays them out. The audit log is verified first, and a log that fails
//! says so at the top of the first page: nothing below it can then be taken as evidence.
//!
//! The daemon writes `report.html` into every export; `station report` makes one (and the PDF)
//! from a copy of the journal, as an auditor does, with the manufacturer root as the only trust.

pub mod html;
pub mod requirements;

use std::collections::BTreeMap;

use p256::ecdsa::VerifyingKey;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::audit::{self, Verification};
use crate::db::{DbError, rfc3339};

/// Why a report could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// The journal.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The journal, read directly.
    #[error("the journal: {0}")]
    Sql(#[from] rusqlite::Error),
    /// The requirement map compiled in.
    #[error("{0}")]
    Map(String),
}

/// The report's file name, in an export and in `station report`'s output directory.
pub const FILE: &str = "report.html";

/// How many example entries the report shows per audit kind.
pub const EXAMPLES: usize = 2;
/// The longest an example's details are shown, in characters.
const DETAIL_CHARS: usize = 240;
/// Bars of the cycle-time histogram.
const CYCLE_BINS: usize = 24;

/// The report's numbers, as [`gather`] computed them.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchReport {
    /// When the report was made (RFC 3339).
    pub generated_at: String,
    /// The station that made the batch.
    pub station_id: String,
    /// The station software that made the report.
    pub software: String,
    /// The audit log's verification.
    pub audit: AuditStatus,
    /// The batch.
    pub batch: BatchInfo,
    /// Its firmware release.
    pub firmware: FirmwareInfo,
    /// Counts.
    pub counts: Counts,
    /// Meters done and failed per nest.
    pub nests: Vec<NestRow>,
    /// Failures by reason (the reason's words without particulars), most first.
    pub failures_by_reason: Vec<Tally>,
    /// Failures by the step they happened at, most first.
    pub failures_by_step: Vec<Tally>,
    /// Meters finished per clock hour.
    pub per_hour: Vec<HourRow>,
    /// Cycle time of the meters done.
    pub cycle: CycleStats,
    /// The alarms raised while the batch ran.
    pub alarms: Vec<AlarmRow>,
    /// Every voided certificate of the batch.
    pub voided: Vec<VoidRow>,
    /// Every failed meter record of the batch, with what became of the meter.
    #[serde(default)]
    pub failed_meters: Vec<FailedMeter>,
    /// Each export of the batch, chained to the audit log.
    pub exports: Vec<ExportChain>,
    /// The HSM self-tests up to the batch's end (the newest before it opened, and every one
    /// while it ran).
    pub hsm_self_tests: Vec<SelfTest>,
    /// The batch's audit entries, per kind: those of its window, the import of its firmware
    /// release and the newest HSM self-test before it opened.
    pub audit_kinds: BTreeMap<String, KindEvidence>,
    /// The report's checks of this batch.
    pub checks: Vec<CheckResult>,
    /// The requirement table.
    pub requirements: Vec<RequirementRow>,
    /// The seed documents.
    pub documents: BTreeMap<String, requirements::Document>,
    /// SHA-256 of the requirement map this report was made with (hex).
    pub map_sha256: String,
    /// The permission table: action → roles.
    pub permissions: Vec<(String, Vec<String>)>,
}

/// The audit log's verification, as the report shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AuditStatus {
    /// Entries checked.
    pub entries: i64,
    /// Checkpoints checked.
    pub checkpoints: i64,
    /// The first bad entry and what is wrong with it.
    pub first_bad: Option<(i64, String)>,
    /// Whose key verified it.
    pub verified_with: String,
    /// Entries whose own signatures were checked: all, or (at export) those after the newest
    /// signed checkpoint; the others are covered by its signature over the chain.
    #[serde(default)]
    pub signatures_checked: i64,
}

impl AuditStatus {
    /// Whether the log verified.
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

/// The batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BatchInfo {
    /// Row id.
    pub id: i64,
    /// Work order.
    pub work_order: String,
    /// Meter model.
    pub model: String,
    /// The utility it is for.
    pub customer: String,
    /// Meters ordered.
    pub quantity: i64,
    /// open or closed.
    pub state: String,
    /// When opened, by whom.
    pub opened_at: String,
    /// Who opened it.
    pub opened_by: String,
    /// When closed.
    pub closed_at: Option<String>,
    /// Who closed it.
    pub closed_by: Option<String>,
    /// The window the report's audit evidence is drawn from, Unix ms: the batch's opening to
    /// its newest export (or its closing, or now).
    pub window_ms: (i64, i64),
}

/// The batch's firmware release.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FirmwareInfo {
    /// Version.
    pub version: String,
    /// SHA-256 of the image, hex.
    pub sha256: String,
    /// Image size, bytes.
    pub size: i64,
    /// SHA-256 of the key that signed it, as verified at import.
    pub signer_key_hash: String,
    /// When imported.
    pub imported_at: String,
    /// By whom.
    pub imported_by: String,
    /// Meters done that reported this image's hash.
    pub meters_matching: i64,
    /// Meters done that reported another (or none).
    pub meters_other: i64,
}

/// Counts of the batch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counts {
    /// Meter records done.
    pub meters_done: i64,
    /// Meter records failed.
    pub meters_failed: i64,
    /// Meter records neither.
    pub meters_unfinished: i64,
    /// Certificates delivered.
    pub certificates_delivered: i64,
    /// Certificates voided.
    pub certificates_voided: i64,
    /// Certificates in another state.
    pub certificates_other: i64,
    /// Wrapped keys of done meters.
    pub wrapped_keys: i64,
    /// Wrapped keys of done meters without their binding.
    pub keys_unbound: i64,
    /// Wrapped keys deleted once the retention period after the last export had passed (the
    /// `keys.purged` entry's count).
    #[serde(default)]
    pub keys_purged: i64,
    /// When they were deleted.
    #[serde(default)]
    pub keys_purged_at: Option<String>,
    /// Meters done whose seal (interfaces disabled) was never sent.
    pub meters_unsealed: i64,
    /// Alarms raised in the window.
    pub alarms: i64,
    /// Of those, acknowledged.
    pub alarms_acknowledged: i64,
}

/// One nest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct NestRow {
    /// Nest number.
    pub nest: i64,
    /// Meters done.
    pub done: i64,
    /// Meters failed.
    pub failed: i64,
}

/// A label and a count.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Tally {
    /// What.
    pub label: String,
    /// How many.
    pub count: i64,
}

/// One clock hour.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HourRow {
    /// Start of the hour, Unix ms.
    pub start_ms: i64,
    /// Meters done.
    pub done: i64,
    /// Meters failed.
    pub failed: i64,
}

/// Cycle time of the meters done, ms.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct CycleStats {
    /// Meters counted.
    pub meters: i64,
    /// Shortest.
    pub min_ms: i64,
    /// Median.
    pub median_ms: i64,
    /// 90th percentile.
    pub p90_ms: i64,
    /// Longest.
    pub max_ms: i64,
    /// The theoretical minimum: the firmware image's wire time at the fastest line (10 bits a
    /// byte, deflated when that is smaller), if the lines' speeds are known.
    pub floor_ms: Option<i64>,
    /// Histogram: (from ms, to ms, meters).
    pub histogram: Vec<(i64, i64, i64)>,
    /// What the theoretical minimum was computed from: (line speed, baud; the image's bytes on
    /// the wire, deflated when that is smaller).
    pub floor_from: Option<(u32, u64)>,
}

/// One alarm.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AlarmRow {
    /// Id.
    pub id: i64,
    /// Kind.
    pub kind: String,
    /// In operator words.
    pub words: String,
    /// Nest.
    pub nest: Option<i64>,
    /// When raised.
    pub raised_at: String,
    /// When acknowledged.
    pub acked_at: Option<String>,
    /// By whom.
    pub acked_by: Option<String>,
    /// Seconds until acknowledged.
    pub ack_s: Option<f64>,
    /// Not acknowledged: seconds open when the report was made.
    pub open_s: Option<f64>,
}

/// One voided certificate.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VoidRow {
    /// Certificate serial, hex.
    pub serial: String,
    /// The meter's UID.
    pub uid: String,
    /// The meter's serial number, if it had one.
    pub meter_serial: Option<String>,
    /// sign or ka.
    pub slot: String,
    /// Why voided.
    pub reason: String,
    /// When.
    pub at: String,
}

/// A failed meter record and what became of the meter.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct FailedMeter {
    /// The meter's UID.
    pub uid: String,
    /// Its serial number, if it had been given one.
    pub serial: Option<String>,
    /// The nest.
    pub nest: i64,
    /// The step it failed at.
    pub step: String,
    /// Why.
    pub reason: String,
    /// When.
    pub at: String,
    /// What became of it: provisioned again (with that record's serial and state), a rework
    /// approved and not yet used, or nothing yet.
    pub fate: String,
    /// Whether the meter was provisioned again and is now done.
    pub recovered: bool,
}

/// An export of the batch, chained to the audit log.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExportChain {
    /// Where written.
    pub out_dir: String,
    /// SHA-256 of manifest.json.
    pub manifest_sha256: String,
    /// When.
    pub at: String,
    /// By whom.
    pub by: String,
    /// The checkpoint's entry.
    pub checkpoint_seq: i64,
    /// The checkpoint note whole, as signed (C2SP signed-note form: origin, size, tree head,
    /// chain hash, a blank line, the signature line), for checking it with any note verifier
    /// and the audit key.
    pub checkpoint_text: String,
    /// The number of the CRL the export carries (`voided.crl`): the checkpoint's row id.
    #[serde(default)]
    pub crl_number: i64,
    /// The note's signature verified with the audit key.
    pub signature_ok: bool,
    /// The note's chain hash is the stored entry's.
    pub chain_ok: bool,
    /// The `manifest.exported` entry that names this manifest's hash, if any.
    pub exported_entry: Option<i64>,
    /// That entry's kind: `manifest.exported`, or `manifest.export_recovered` for an export the
    /// station found complete and recorded at its next start.
    pub exported_kind: Option<String>,
    /// The export under way as this report is written into it (not yet recorded).
    pub pending: bool,
}

/// One HSM self-test.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SelfTest {
    /// Its audit entry.
    pub seq: i64,
    /// When.
    pub at: String,
    /// Passed.
    pub passed: bool,
    /// Checks run.
    pub checks: i64,
    /// What each check read back (newer logs), or the failures.
    pub findings: Vec<(String, bool, String)>,
}

/// The audit entries of one kind in the window.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct KindEvidence {
    /// How many.
    pub count: i64,
    /// The first few: (seq, time, actor, details).
    pub examples: Vec<(i64, String, String, String)>,
}

/// A check the report makes of the batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The audit log verifies: chain, signatures, signed head, checkpoints.
    AuditLog,
    /// Every export's checkpoint is signed by the audit key and matches the log.
    Checkpoints,
    /// Every meter done reported the batch's firmware, and the release was verified at import.
    Firmware,
    /// Every wrapped key of a meter done carries its binding.
    KeysBound,
    /// Every voided certificate has its reason.
    VoidsAccounted,
    /// Every meter done was sealed (its interfaces disabled).
    Sealed,
    /// The HSM self-test passed at the start and while the batch ran.
    HsmSelfTest,
    /// Every alarm of the batch was acknowledged.
    AlarmsAcknowledged,
    /// The permission table (shown; always holds, the engine checks every command with it).
    Permissions,
}

impl Check {
    /// Every check, in the report's order.
    pub const ALL: [Check; 9] = [
        Check::AuditLog,
        Check::Checkpoints,
        Check::Firmware,
        Check::KeysBound,
        Check::VoidsAccounted,
        Check::Sealed,
        Check::HsmSelfTest,
        Check::AlarmsAcknowledged,
        Check::Permissions,
    ];
    /// Their names in the map.
    pub const NAMES: [&'static str; 9] = [
        "audit-log",
        "checkpoints",
        "firmware",
        "keys-bound",
        "voids-accounted",
        "sealed",
        "hsm-self-test",
        "alarms-acknowledged",
        "permissions",
    ];

    /// Its name in the map.
    pub fn name(self) -> &'static str {
        Self::NAMES[Self::ALL.iter().position(|c| *c == self).unwrap_or(0)]
    }
}

/// A check's outcome.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckResult {
    /// The check's name.
    pub name: String,
    /// Held.
    pub ok: bool,
    /// What was found, in words.
    pub detail: String,
}

/// A requirement's verdict.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Met: tested in this build, and this batch's checks hold.
    Met,
    /// A check of this batch failed.
    Failed,
    /// The audit log did not verify: its evidence cannot be relied on.
    NotShown,
    /// Does not apply to a provisioning cell.
    NotApplicable,
}

impl Verdict {
    /// In words.
    pub fn word(self) -> &'static str {
        match self {
            Verdict::Met => "met",
            Verdict::Failed => "FAILED",
            Verdict::NotShown => "NOT SHOWN",
            Verdict::NotApplicable => "does not apply",
        }
    }
}

/// A row of the requirement table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RequirementRow {
    /// The map's entry.
    pub requirement: requirements::Requirement,
    /// Audit entries of its kinds in the window: (kind, count).
    pub evidence: Vec<(String, i64)>,
    /// The verdict.
    pub verdict: Verdict,
    /// Why, in words.
    pub why: String,
}

/// What the report needs besides the journal.
#[derive(Debug, Clone)]
pub struct Context {
    /// The station.
    pub station_id: String,
    /// The nests' line speeds, if known, for the theoretical minimum cycle of a batch whose
    /// journal row does not record its line speed (batches opened before schema version 10).
    pub bauds: Vec<u32>,
    /// The audit key.
    pub audit_key: VerifyingKey,
    /// Whose key it is (the audit certificate's subject).
    pub audit_signer: String,
    /// An export under way that is not yet in the journal's exports: (manifest SHA-256,
    /// checkpoint id, out dir, by).
    pub pending_export: Option<(String, i64, String, String)>,
    /// The time of the report, Unix ms.
    pub now_ms: i64,
    /// Check entries' own signatures only where no signed checkpoint or head covers them
    /// ([`audit::verify_anchored`]): an export's report, whose time must not grow with the
    /// signatures of a year's log. An auditor's `station report` checks them all.
    pub anchored: bool,
}

/// The batch's failed meter records, each with what became of the meter: the next record of
/// the same UID (in any batch), and the supervisor's rework approval that let it back in.
fn failed_meters(c: &Connection, batch_id: i64) -> Result<Vec<FailedMeter>, ReportError> {
    let mut st = c.prepare(
        "SELECT id, uid, serial, nest, COALESCE(fail_step, 'unknown'), COALESCE(failure, ''), COALESCE(finished_at, started_at)
           FROM meters WHERE batch_id = ?1 AND state = 'failed' ORDER BY id",
    )?;
    // (record id, failed at ms, the row without its fate yet).
    let rows: Vec<(i64, i64, FailedMeter)> = st
        .query_map([batch_id], |r| {
            let at: i64 = r.get(6)?;
            Ok((
                r.get(0)?,
                at,
                FailedMeter {
                    uid: r.get(1)?,
                    serial: r.get(2)?,
                    nest: r.get(3)?,
                    step: r.get(4)?,
                    reason: r.get(5)?,
                    at: rfc3339(at),
                    fate: String::new(),
                    recovered: false,
                },
            ))
        })?
        .collect::<Result<_, _>>()?;
    let mut next = c.prepare(
        "SELECT m.serial, m.state, b.work_order FROM meters m JOIN batches b ON b.id = m.batch_id
          WHERE m.uid = ?1 AND m.id > ?2 ORDER BY m.id LIMIT 1",
    )?;
    let mut rework = c.prepare(
        "SELECT approved_by, approved_at FROM reworks
          WHERE uid = ?1 AND approved_at >= ?2 ORDER BY id LIMIT 1",
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for (id, at, mut f) in rows {
        let later: Option<(Option<String>, String, String)> = next
            .query_row(params![f.uid, id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let approved: Option<String> = rework
            .query_row(params![f.uid, at], |r| {
                Ok(format!(
                    "rework approved by {} at {}",
                    r.get::<_, String>(0)?,
                    rfc3339(r.get(1)?)
                ))
            })
            .optional()?;
        (f.fate, f.recovered) = match (later, approved) {
            (Some((s, state, wo)), approved) => (
                format!(
                    "provisioned again{} as {} in batch {wo}: {state}",
                    approved
                        .map(|a| format!(" after a {a}"))
                        .unwrap_or_default(),
                    s.unwrap_or_else(|| "(no number yet)".into()),
                ),
                state == "done",
            ),
            (None, Some(a)) => (format!("{a}; not provisioned again yet"), false),
            (None, None) => (
                "not provisioned again: scrapped, or awaiting a supervisor's rework approval"
                    .into(),
                false,
            ),
        };
        out.push(f);
    }
    Ok(out)
}

/// Finds a batch by its id or its work order.
pub fn find_batch(c: &Connection, which: &str) -> Result<Option<i64>, ReportError> {
    if let Ok(id) = which.parse::<i64>()
        && c.query_row("SELECT 1 FROM batches WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some()
    {
        return Ok(Some(id));
    }
    Ok(c.query_row(
        "SELECT id FROM batches WHERE work_order = ?1",
        [which],
        |r| r.get(0),
    )
    .optional()?)
}

fn count(c: &Connection, sql: &str, p: impl rusqlite::Params) -> Result<i64, ReportError> {
    Ok(c.query_row(sql, p, |r| r.get(0))?)
}

/// Computes the report of batch `batch_id` from the journal and the audit log (verified first).
pub fn gather(c: &Connection, batch_id: i64, ctx: &Context) -> Result<BatchReport, ReportError> {
    let v: Verification = if ctx.anchored {
        audit::verify_anchored(c, &ctx.audit_key)?
    } else {
        audit::verify(c, &ctx.audit_key)?
    };
    let audit_status = AuditStatus {
        entries: v.entries,
        checkpoints: v.checkpoints,
        first_bad: v.first_bad.clone(),
        verified_with: ctx.audit_signer.clone(),
        signatures_checked: v.signatures_checked,
    };

    let (batch, fw_id, opened_ms, closed_ms) = c.query_row(
        "SELECT b.id, b.work_order, b.model, cu.name, b.quantity, b.state, b.opened_at, b.opened_by,
                b.closed_at, b.closed_by, b.firmware_id
           FROM batches b JOIN customers cu ON cu.id = b.customer_id WHERE b.id = ?1",
        [batch_id],
        |r| {
            let opened: i64 = r.get(6)?;
            let closed: Option<i64> = r.get(8)?;
            Ok((
                BatchInfo {
                    id: r.get(0)?,
                    work_order: r.get(1)?,
                    model: r.get(2)?,
                    customer: r.get(3)?,
                    quantity: r.get(4)?,
                    state: r.get(5)?,
                    opened_at: rfc3339(opened),
                    opened_by: r.get(7)?,
                    closed_at: closed.map(rfc3339),
                    closed_by: r.get(9)?,
                    window_ms: (opened, 0),
                },
                r.get::<_, i64>(10)?,
                opened,
                closed,
            ))
        },
    )?;
    // The newest export ends the window: its record, or the audit entry that records it (written
    // in the same transaction, a millisecond later at times).
    let last_export: Option<i64> = c.query_row(
        "SELECT MAX(t) FROM (
            SELECT MAX(created_at) AS t FROM exports WHERE batch_id = ?1
            UNION ALL
            SELECT MAX(ts) FROM audit WHERE kind = 'manifest.exported'
               AND json_extract(details, '$.batch') = (SELECT work_order FROM batches WHERE id = ?1)
            UNION ALL
            SELECT MAX(ts) FROM audit WHERE kind = 'manifest.export_recovered'
               AND json_extract(details, '$.batch_id') = ?1)",
        [batch_id],
        |r| r.get(0),
    )?;
    // Likewise the closing: its row's time, or its audit entry's.
    let closed_ms = match closed_ms {
        Some(t) => c
            .query_row(
                "SELECT MAX(ts) FROM audit WHERE kind = 'batch.closed'
                    AND json_extract(details, '$.batch') = ?1",
                [batch_id],
                |r| r.get::<_, Option<i64>>(0),
            )?
            .map_or(Some(t), |e| Some(e.max(t))),
        None => None,
    };
    let end_ms = if ctx.pending_export.is_some() {
        ctx.now_ms
    } else {
        last_export.or(closed_ms).unwrap_or(ctx.now_ms)
    };
    let batch = BatchInfo {
        window_ms: (opened_ms, end_ms),
        ..batch
    };

    // Meters.
    let mut nests: BTreeMap<i64, NestRow> = BTreeMap::new();
    let mut reasons: BTreeMap<String, i64> = BTreeMap::new();
    let mut steps: BTreeMap<String, i64> = BTreeMap::new();
    let mut hours: BTreeMap<i64, HourRow> = BTreeMap::new();
    let mut cycles: Vec<i64> = Vec::new();
    let mut counts = Counts::default();
    let fw_sha: String =
        c.query_row("SELECT sha256 FROM firmware WHERE id = ?1", [fw_id], |r| {
            r.get(0)
        })?;
    let (mut matching, mut other) = (0i64, 0i64);
    {
        let mut st = c.prepare(
            "SELECT nest, state, started_at, finished_at, failure, fail_step, fw_sha256, seal_sent_at
               FROM meters WHERE batch_id = ?1",
        )?;
        let mut rows = st.query([batch_id])?;
        while let Some(r) = rows.next()? {
            let nest: i64 = r.get(0)?;
            let state: String = r.get(1)?;
            let started: i64 = r.get(2)?;
            let finished: Option<i64> = r.get(3)?;
            let n = nests.entry(nest).or_insert(NestRow {
                nest,
                done: 0,
                failed: 0,
            });
            match state.as_str() {
                "done" => {
                    counts.meters_done += 1;
                    n.done += 1;
                    if let Some(f) = finished {
                        cycles.push((f - started).max(0));
                        hour_of(&mut hours, f).done += 1;
                    }
                    if r.get::<_, Option<String>>(6)?.as_deref() == Some(fw_sha.as_str()) {
                        matching += 1;
                    } else {
                        other += 1;
                    }
                    if r.get::<_, Option<i64>>(7)?.is_none() {
                        counts.meters_unsealed += 1;
                    }
                }
                "failed" => {
                    counts.meters_failed += 1;
                    n.failed += 1;
                    let reason: Option<String> = r.get(4)?;
                    *reasons
                        .entry(crate::shift::cause(reason.as_deref().unwrap_or("")))
                        .or_default() += 1;
                    let step: Option<String> = r.get(5)?;
                    *steps
                        .entry(step.unwrap_or_else(|| "unknown".into()))
                        .or_default() += 1;
                    if let Some(f) = finished {
                        hour_of(&mut hours, f).failed += 1;
                    }
                }
                _ => counts.meters_unfinished += 1,
            }
        }
    }
    let tallies = |m: BTreeMap<String, i64>| {
        let mut v: Vec<Tally> = m
            .into_iter()
            .map(|(label, count)| Tally { label, count })
            .collect();
        v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.label.cmp(&b.label)));
        v
    };

    // Certificates and keys.
    {
        let mut st = c.prepare(
            "SELECT c.state, COUNT(*) FROM certificates c JOIN meters m ON m.id = c.meter_id
              WHERE m.batch_id = ?1 GROUP BY c.state",
        )?;
        let mut rows = st.query([batch_id])?;
        while let Some(r) = rows.next()? {
            let state: String = r.get(0)?;
            let n: i64 = r.get(1)?;
            match state.as_str() {
                "delivered" => counts.certificates_delivered += n,
                "voided" => counts.certificates_voided += n,
                _ => counts.certificates_other += n,
            }
        }
    }
    counts.wrapped_keys = count(
        c,
        "SELECT COUNT(*) FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id
          WHERE m.batch_id = ?1 AND m.state = 'done'",
        [batch_id],
    )?;
    counts.keys_unbound = count(
        c,
        "SELECT COUNT(*) FROM wrapped_keys k JOIN meters m ON m.id = k.meter_id
          WHERE m.batch_id = ?1 AND m.state = 'done' AND (k.binding IS NULL OR k.binding = '')",
        [batch_id],
    )?;

    let failed_meters = failed_meters(c, batch_id)?;

    // Keys deleted after the retention period, as the log records it.
    let purge: Option<(i64, i64, i64)> = c
        .query_row(
            "SELECT seq, ts, COALESCE(json_extract(details, '$.keys'), 0) FROM audit
              WHERE kind = 'keys.purged' AND json_extract(details, '$.batch') = ?1
              ORDER BY seq DESC LIMIT 1",
            [batch_id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    if let Some((_, ts, keys)) = purge {
        counts.keys_purged = keys;
        counts.keys_purged_at = Some(rfc3339(ts));
    }

    let voided = {
        let mut st = c.prepare(
            "SELECT c.serial, m.uid, m.serial, c.slot, COALESCE(c.void_reason, ''), c.updated_at
               FROM certificates c JOIN meters m ON m.id = c.meter_id
              WHERE m.batch_id = ?1 AND c.state = 'voided' ORDER BY c.id",
        )?;
        let rows = st.query_map([batch_id], |r| {
            Ok(VoidRow {
                serial: r.get(0)?,
                uid: r.get(1)?,
                meter_serial: r.get(2)?,
                slot: r.get(3)?,
                reason: r.get(4)?,
                at: rfc3339(r.get(5)?),
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };

    // Alarms raised in the window.
    let alarms = {
        let mut st = c.prepare(
            "SELECT id, audit_seq, kind, message, nest, raised_at, acked_at, acked_by FROM alarms
              WHERE raised_at BETWEEN ?1 AND ?2 ORDER BY id",
        )?;
        let rows = st.query_map(params![opened_ms, end_ms], |r| {
            let raised: i64 = r.get(5)?;
            let acked: Option<i64> = r.get(6)?;
            let nest: Option<i64> = r.get(4)?;
            let a = audit::Alarm {
                id: r.get(0)?,
                audit_seq: r.get(1)?,
                kind: r.get(2)?,
                message: r.get(3)?,
                nest: nest.and_then(|n| u32::try_from(n).ok()),
                raised_at: rfc3339(raised),
            };
            Ok(AlarmRow {
                id: a.id,
                words: a.in_words(),
                kind: a.kind,
                nest,
                raised_at: a.raised_at,
                acked_at: acked.map(rfc3339),
                acked_by: r.get(7)?,
                ack_s: acked.map(|t| (t - raised).max(0) as f64 / 1000.0),
                open_s: acked
                    .is_none()
                    .then(|| (ctx.now_ms - raised).max(0) as f64 / 1000.0),
            })
        })?;
        rows.collect::<Result<Vec<_>, _>>()?
    };
    counts.alarms = alarms.len() as i64;
    counts.alarms_acknowledged = alarms.iter().filter(|a| a.acked_at.is_some()).count() as i64;

    // The audit entries of the window, per kind, with their first examples; and the HSM's
    // self-tests (the newest before the window too).
    let mut audit_kinds: BTreeMap<String, KindEvidence> = BTreeMap::new();
    let mut hsm_self_tests = Vec::new();
    let mut exported_entries: Vec<(i64, String, String)> = Vec::new();
    {
        let before: Option<i64> = c
            .query_row(
                "SELECT MAX(seq) FROM audit WHERE kind = 'hsm.self_test' AND ts < ?1",
                [opened_ms],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        // The import of the batch's firmware release, verified then.
        let import: Option<i64> = c
            .query_row(
                "SELECT MAX(seq) FROM audit WHERE kind = 'firmware.imported'
                    AND json_extract(details, '$.sha256') = ?1 AND ts <= ?2",
                params![fw_sha, opened_ms],
                |r| r.get(0),
            )
            .optional()?
            .flatten();
        let mut st = c.prepare(
            "SELECT seq, ts, kind, actor, details FROM audit
              WHERE (ts BETWEEN ?1 AND ?2) OR seq IN (?3, ?4, ?5) ORDER BY seq",
        )?;
        let mut rows = st.query(params![
            opened_ms,
            end_ms,
            before.unwrap_or(-1),
            import.unwrap_or(-1),
            purge.map_or(-1, |p| p.0)
        ])?;
        while let Some(r) = rows.next()? {
            let seq: i64 = r.get(0)?;
            let ts: i64 = r.get(1)?;
            let kind: String = r.get(2)?;
            let details: String = r.get(4)?;
            if kind == "hsm.self_test" {
                hsm_self_tests.push(self_test(seq, ts, &details));
            }
            if kind == "manifest.exported" || kind == "manifest.export_recovered" {
                exported_entries.push((seq, kind.clone(), details.clone()));
            }
            let e = audit_kinds.entry(kind).or_default();
            e.count += 1;
            if e.examples.len() < EXAMPLES {
                let mut d = details;
                if d.chars().count() > DETAIL_CHARS {
                    d = d.chars().take(DETAIL_CHARS).collect::<String>() + "…";
                }
                e.examples.push((seq, rfc3339(ts), r.get(3)?, d));
            }
        }
    }

    // Exports, chained to the log.
    let mut exports = Vec::new();
    {
        let mut st = c.prepare(
            "SELECT e.out_dir, e.manifest_sha256, e.created_at, e.created_by, e.checkpoint_id
               FROM exports e WHERE e.batch_id = ?1 ORDER BY e.id",
        )?;
        let mut list: Vec<(String, String, i64, String, i64, bool)> = st
            .query_map([batch_id], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, false))
            })?
            .collect::<Result<_, _>>()?;
        if let Some((sha, cp, dir, by)) = &ctx.pending_export {
            list.push((dir.clone(), sha.clone(), ctx.now_ms, by.clone(), *cp, true));
        }
        let key_id = audit::note_key_id(
            &p256::pkcs8::EncodePublicKey::to_public_key_der(&ctx.audit_key)
                .map(|d| d.as_bytes().to_vec())
                .unwrap_or_default(),
        );
        for (out_dir, sha, at, by, cp, pending) in list {
            let (seq, note): (i64, String) = c.query_row(
                "SELECT seq, note FROM audit_checkpoints WHERE id = ?1",
                [cp],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )?;
            let signature_ok = audit::verify_note(&note, &ctx.audit_key, &key_id);
            let stored: Option<Vec<u8>> = c
                .query_row("SELECT hash FROM audit WHERE seq = ?1", [seq], |r| r.get(0))
                .optional()?;
            let chain_ok = audit::checkpoint_values(&note)
                .is_some_and(|(s, h)| s == seq && stored.as_deref() == Some(h.as_slice()));
            let entry = exported_entries.iter().find(|(_, _, d)| {
                serde_json::from_str::<serde_json::Value>(d)
                    .ok()
                    .and_then(|v| v.get("manifest_sha256")?.as_str().map(|s| s == sha))
                    .unwrap_or(false)
            });
            exports.push(ExportChain {
                out_dir,
                manifest_sha256: sha,
                at: rfc3339(at),
                by,
                checkpoint_seq: seq,
                checkpoint_text: note.clone(),
                crl_number: cp,
                signature_ok,
                chain_ok,
                exported_entry: entry.map(|e| e.0),
                exported_kind: entry.map(|e| e.1.clone()),
                pending,
            });
        }
    }

    // Firmware.
    let firmware = c.query_row(
        "SELECT version, sha256, size, signer_key_hash, imported_at, imported_by FROM firmware WHERE id = ?1",
        [fw_id],
        |r| {
            Ok(FirmwareInfo {
                version: r.get(0)?,
                sha256: r.get(1)?,
                size: r.get(2)?,
                signer_key_hash: r.get(3)?,
                imported_at: rfc3339(r.get(4)?),
                imported_by: r.get(5)?,
                meters_matching: matching,
                meters_other: other,
            })
        },
    )?;
    // The speed the batch recorded when it opened; the configuration's for older batches.
    let recorded: Option<u32> = c.query_row(
        "SELECT line_baud FROM batches WHERE id = ?1",
        [batch_id],
        |r| r.get(0),
    )?;
    let bauds = recorded.map_or_else(|| ctx.bauds.clone(), |b| vec![b]);
    let floor_ms = crate::shift::floor_of(c, fw_id, &bauds)?.map(i64::from);
    let mut cycle = cycle_stats(cycles, floor_ms);
    if floor_ms.is_some()
        && let Some(baud) = bauds.iter().copied().max()
    {
        let (sha, image): (String, Vec<u8>) = c.query_row(
            "SELECT sha256, image FROM firmware WHERE id = ?1",
            [fw_id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        cycle.floor_from = Some((baud, crate::shift::wire_bytes(&sha, &image) as u64));
    }

    let permissions = crate::auth::PERMISSIONS
        .iter()
        .map(|(a, roles)| {
            (
                a.describe().to_string(),
                roles.iter().map(|r| r.as_str().to_string()).collect(),
            )
        })
        .collect();

    let mut report = BatchReport {
        generated_at: rfc3339(ctx.now_ms),
        station_id: ctx.station_id.clone(),
        software: format!("station {}", env!("CARGO_PKG_VERSION")),
        audit: audit_status,
        batch,
        firmware,
        counts,
        nests: nests.into_values().collect(),
        failures_by_reason: tallies(reasons),
        failures_by_step: tallies(steps),
        per_hour: hours.into_values().collect(),
        cycle,
        alarms,
        voided,
        failed_meters,
        exports,
        hsm_self_tests,
        audit_kinds,
        checks: Vec::new(),
        requirements: Vec::new(),
        documents: BTreeMap::new(),
        map_sha256: String::new(),
        permissions,
    };
    report.checks = Check::ALL.iter().map(|c| check(&report, *c)).collect();
    let map = requirements::map().map_err(ReportError::Map)?;
    report.requirements = map
        .requirements
        .into_iter()
        .map(|r| judge(&report, r))
        .collect();
    report.documents = map.documents;
    report.map_sha256 = requirements::map_sha256();
    Ok(report)
}

/// The row of the clock hour `ms` falls in.
fn hour_of(hours: &mut BTreeMap<i64, HourRow>, ms: i64) -> &mut HourRow {
    let start_ms = ms.div_euclid(3_600_000) * 3_600_000;
    hours.entry(start_ms).or_insert(HourRow {
        start_ms,
        done: 0,
        failed: 0,
    })
}

fn self_test(seq: i64, ts: i64, details: &str) -> SelfTest {
    let d: serde_json::Value = serde_json::from_str(details).unwrap_or_default();
    let list = |k: &str| {
        d.get(k)
            .and_then(|v| v.as_array())
            .map(|a| {
                a.iter()
                    .map(|f| {
                        (
                            f.get("check")
                                .and_then(|x| x.as_str())
                                .unwrap_or("")
                                .to_string(),
                            f.get("ok").and_then(|x| x.as_bool()).unwrap_or(false),
                            f.get("detail")
                                .and_then(|x| x.as_str())
                                .unwrap_or("")
                                .to_string(),
                        )
                    })
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default()
    };
    let mut findings = list("findings");
    if findings.is_empty() {
        findings = list("failures");
    }
    SelfTest {
        seq,
        at: rfc3339(ts),
        passed: d.get("passed").and_then(|x| x.as_bool()).unwrap_or(false),
        checks: d.get("checks").and_then(|x| x.as_i64()).unwrap_or(0),
        findings,
    }
}

fn cycle_stats(mut cycles: Vec<i64>, floor_ms: Option<i64>) -> CycleStats {
    if cycles.is_empty() {
        return CycleStats {
            floor_ms,
            ..CycleStats::default()
        };
    }
    cycles.sort_unstable();
    let at = |q: f64| cycles[((cycles.len() - 1) as f64 * q).round() as usize];
    let (min, max) = (cycles[0], cycles[cycles.len() - 1]);
    // From the floor (or the fastest meter) to the slowest, in equal bars.
    let lo = floor_ms.map_or(min, |f| f.min(min));
    let width = ((max - lo) / CYCLE_BINS as i64 + 1).max(1);
    let mut histogram: Vec<(i64, i64, i64)> = (0..CYCLE_BINS as i64)
        .map(|i| (lo + i * width, lo + (i + 1) * width, 0))
        .collect();
    for c in &cycles {
        let i = usize::try_from((c - lo) / width)
            .unwrap_or(0)
            .min(CYCLE_BINS - 1);
        histogram[i].2 += 1;
    }
    CycleStats {
        meters: cycles.len() as i64,
        min_ms: min,
        median_ms: at(0.5),
        p90_ms: at(0.9),
        max_ms: max,
        floor_ms,
        histogram,
        floor_from: None,
    }
}

fn check(r: &BatchReport, c: Check) -> CheckResult {
    let (ok, detail) = match c {
        Check::AuditLog => match &r.audit.first_bad {
            None => (
                true,
                format!(
                    "{} entries and {} checkpoints verified with the key of {}",
                    r.audit.entries, r.audit.checkpoints, r.audit.verified_with
                ),
            ),
            Some((seq, why)) => (false, format!("entry {seq}: {why}")),
        },
        Check::Checkpoints => {
            if r.exports.is_empty() {
                (false, "the batch has not been exported".into())
            } else {
                let bad = r
                    .exports
                    .iter()
                    .filter(|e| !e.signature_ok || !e.chain_ok)
                    .count();
                let unrecorded = r
                    .exports
                    .iter()
                    .filter(|e| !e.pending && e.exported_entry.is_none())
                    .count();
                (
                    bad == 0 && unrecorded == 0,
                    format!(
                        "{} export checkpoint(s), {} with a signature that verifies and the chain hash of its entry; {} export(s) no audit entry records",
                        r.exports.len(),
                        r.exports.len() - bad,
                        unrecorded
                    ),
                )
            }
        }
        Check::Firmware => {
            let imported = r.audit_kinds.contains_key("firmware.imported")
                || r.firmware.signer_key_hash.len() == 64;
            (
                r.firmware.meters_other == 0 && imported,
                format!(
                    "{} of {} meters done reported image {} ({}), signature verified at import by key {}",
                    r.firmware.meters_matching,
                    r.firmware.meters_matching + r.firmware.meters_other,
                    r.firmware.version,
                    short(&r.firmware.sha256),
                    short(&r.firmware.signer_key_hash)
                ),
            )
        }
        Check::KeysBound => (
            r.counts.keys_unbound == 0,
            match &r.counts.keys_purged_at {
                Some(at) => format!(
                    "{} wrapped keys of meters done, {} without their binding to the meter; {} were deleted at {at} once the retention period had passed (the report in the export shows them as they were)",
                    r.counts.wrapped_keys, r.counts.keys_unbound, r.counts.keys_purged
                ),
                None => format!(
                    "{} wrapped keys of meters done, {} without their binding to the meter",
                    r.counts.wrapped_keys, r.counts.keys_unbound
                ),
            },
        ),
        Check::VoidsAccounted => {
            let bare = r
                .voided
                .iter()
                .filter(|v| v.reason.trim().is_empty())
                .count();
            (
                bare == 0 && r.counts.certificates_other == 0,
                format!(
                    "{} voided certificate(s), {} without a reason; {} certificate(s) neither delivered nor voided",
                    r.voided.len(),
                    bare,
                    r.counts.certificates_other
                ),
            )
        }
        Check::Sealed => (
            r.counts.meters_unsealed == 0,
            format!(
                "{} of {} meters done sealed",
                r.counts.meters_done - r.counts.meters_unsealed,
                r.counts.meters_done
            ),
        ),
        Check::HsmSelfTest => {
            let failed = r.hsm_self_tests.iter().filter(|t| !t.passed).count();
            (
                !r.hsm_self_tests.is_empty() && failed == 0,
                if r.hsm_self_tests.is_empty() {
                    "no HSM self-test recorded before or during the batch".into()
                } else {
                    let token = r
                        .hsm_self_tests
                        .iter()
                        .rev()
                        .flat_map(|t| t.findings.iter())
                        .find(|f| f.0 == "token")
                        .map(|f| {
                            let first = f.2.split(';').next().unwrap_or("");
                            format!("; the token: {first}")
                        })
                        .unwrap_or_default();
                    format!(
                        "{} self-test(s), {} failed{token}",
                        r.hsm_self_tests.len(),
                        failed
                    )
                },
            )
        }
        Check::AlarmsAcknowledged => (
            r.counts.alarms == r.counts.alarms_acknowledged,
            format!(
                "{} alarm(s), {} acknowledged",
                r.counts.alarms, r.counts.alarms_acknowledged
            ),
        ),
        Check::Permissions => (
            true,
            format!(
                "{} actions, each allowed to the roles listed; every command is checked against it",
                r.permissions.len()
            ),
        ),
    };
    CheckResult {
        name: c.name().into(),
        ok,
        detail,
    }
}

fn judge(r: &BatchReport, q: requirements::Requirement) -> RequirementRow {
    let evidence: Vec<(String, i64)> = q
        .audit
        .iter()
        .map(|k| (k.clone(), r.audit_kinds.get(k).map_or(0, |e| e.count)))
        .collect();
    let (verdict, why) = if !q.applies {
        // The reason stands beside it, in the evidence column.
        (Verdict::NotApplicable, String::new())
    } else if !r.audit.ok() {
        (
            Verdict::NotShown,
            "the audit log failed verification, so its entries are no evidence".into(),
        )
    } else {
        let failed: Vec<&CheckResult> = r
            .checks
            .iter()
            .filter(|c| !c.ok && q.checks.contains(&c.name))
            .collect();
        if failed.is_empty() {
            let seen: i64 = evidence.iter().map(|(_, n)| n).sum();
            let batch = if q.checks.is_empty() {
                "by design: no check of this batch bears on it".to_string()
            } else {
                format!("its checks of this batch hold ({})", q.checks.join(", "))
            };
            (
                Verdict::Met,
                format!(
                    "{}; {} named test(s); {} audit entr{} of its kinds in this batch",
                    batch,
                    q.tests.len(),
                    seen,
                    if seen == 1 { "y" } else { "ies" }
                ),
            )
        } else {
            (
                Verdict::Failed,
                failed
                    .iter()
                    .map(|c| format!("{}: {}", c.name, c.detail))
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        }
    };
    RequirementRow {
        requirement: q,
        evidence,
        verdict,
        why,
    }
}

fn short(hex: &str) -> &str {
    hex.get(..16).unwrap_or(hex)
}

/// Writes a report file whole or not at all: into a temporary name beside it, synced, renamed.
pub fn write_file(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(".part");
    let tmp = std::path::PathBuf::from(tmp);
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// How long Chromium may take to print a report.
const PRINT_LIMIT: std::time::Duration = std::time::Duration::from_secs(180);

/// Prints `html` to `pdf` with headless Chromium (`chromium`, the program to run): A4 as the
/// page's CSS asks, no header or footer, in a throw-away profile. The page has no script and
/// loads nothing, so nothing but the file is read.
pub fn print_pdf(
    chromium: &std::path::Path,
    html: &std::path::Path,
    pdf: &std::path::Path,
) -> Result<(), String> {
    let html = std::fs::canonicalize(html).map_err(|e| format!("{}: {e}", html.display()))?;
    let profile = std::env::temp_dir().join(format!(
        "station-print-{}-{}",
        std::process::id(),
        crate::db::now_ms()
    ));
    let mut cmd = std::process::Command::new(chromium);
    cmd.arg("--headless")
        .arg("--disable-gpu")
        .arg("--no-first-run")
        .arg("--disable-extensions")
        .arg("--no-pdf-header-footer")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--print-to-pdf={}", pdf.display()));
    // Chromium refuses to run as root with its sandbox on.
    if running_as_root() {
        cmd.arg("--no-sandbox");
    }
    std::fs::create_dir_all(&profile).map_err(|e| format!("{}: {e}", profile.display()))?;
    let log_path = profile.join("chromium.log");
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{}: {e}", log_path.display()))?;
    cmd.arg(format!("file://{}", html.display()))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    let _ = std::fs::remove_file(pdf);
    let mut child = cmd.spawn().map_err(|e| {
        format!(
            "cannot run {} to print the PDF ({e}); install Debian's chromium or pass --chromium",
            chromium.display()
        )
    })?;
    let started = std::time::Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break s,
            Ok(None) if started.elapsed() > PRINT_LIMIT => {
                let _ = child.kill();
                let _ = child.wait();
                let _ = std::fs::remove_dir_all(&profile);
                return Err(format!(
                    "{} did not print the PDF within {} s",
                    chromium.display(),
                    PRINT_LIMIT.as_secs()
                ));
            }
            Ok(None) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for {}: {e}", chromium.display())),
        }
    };
    let err = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&profile);
    let printed = std::fs::metadata(pdf).map(|m| m.len() > 0).unwrap_or(false);
    if !status.success() || !printed {
        let tail: String = err.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        return Err(format!(
            "{} did not print {} ({status}): {tail}",
            chromium.display(),
            pdf.display()
        ));
    }
    Ok(())
}

/// Whether this process runs as root (its effective user id, from /proc).
fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|st| {
            st.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// A made-up report, the same every time, for the screenshot snapshot: a batch of 2 400 meters
/// on 8 nests with a few failures, two voided certificates and two alarms.
pub fn sample() -> BatchReport {
    let t0: i64 = 1_795_000_000_000;
    let map = requirements::map().unwrap_or_else(|_| requirements::Map {
        documents: BTreeMap::new(),
        requirements: Vec::new(),
    });
    let mut kinds = BTreeMap::new();
    for (k, n) in [
        ("auth.success", 14),
        ("auth.failure", 2),
        ("batch.opened", 1),
        ("batch.closed", 1),
        ("meter.provisioned", 2_376),
        ("meter.failed", 24),
        ("firmware.imported", 1),
        ("security.firmware_mismatch", 1),
        ("alarm.acknowledged", 2),
        ("manifest.export", 1),
        ("manifest.exported", 1),
        ("hsm.self_test", 1),
        ("station.start", 1),
    ] {
        kinds.insert(
            k.to_string(),
            KindEvidence {
                count: n,
                examples: vec![(
                    100,
                    rfc3339(t0 + 60_000),
                    "oper".into(),
                    "{\"nest\":3}".into(),
                )],
            },
        );
    }
    let mut r = BatchReport {
        generated_at: rfc3339(t0 + 9 * 3_600_000),
        station_id: "cell-07".into(),
        software: "station (sample)".into(),
        audit: AuditStatus {
            entries: 2_431,
            checkpoints: 3,
            first_bad: None,
            verified_with: "CN=cell-07 audit signer".into(),
            signatures_checked: 2_431,
        },
        batch: BatchInfo {
            id: 12,
            work_order: "WO-2026-0412".into(),
            model: "EM-300".into(),
            customer: "Utility North".into(),
            quantity: 2_400,
            state: "closed".into(),
            opened_at: rfc3339(t0),
            opened_by: "super".into(),
            closed_at: Some(rfc3339(t0 + 8 * 3_600_000)),
            closed_by: Some("super".into()),
            window_ms: (t0, t0 + 8 * 3_600_000 + 300_000),
        },
        firmware: FirmwareInfo {
            version: "2.4.1".into(),
            sha256: "9f2c".repeat(16),
            size: 262_144,
            signer_key_hash: "51ab".repeat(16),
            imported_at: rfc3339(t0 - 86_400_000),
            imported_by: "officer".into(),
            meters_matching: 2_376,
            meters_other: 0,
        },
        counts: Counts {
            meters_done: 2_376,
            meters_failed: 24,
            meters_unfinished: 0,
            certificates_delivered: 4_752,
            certificates_voided: 2,
            certificates_other: 0,
            wrapped_keys: 9_504,
            keys_unbound: 0,
            keys_purged: 0,
            keys_purged_at: None,
            meters_unsealed: 0,
            alarms: 2,
            alarms_acknowledged: 2,
        },
        nests: (1..=8)
            .map(|n| NestRow {
                nest: n,
                done: 297,
                failed: if n == 3 { 10 } else { 2 },
            })
            .collect(),
        failures_by_reason: vec![
            Tally {
                label: "meter stopped answering".into(),
                count: 14,
            },
            Tally {
                label: "meter refused firmware".into(),
                count: 6,
            },
            Tally {
                label: "firmware hash mismatch".into(),
                count: 4,
            },
        ],
        failures_by_step: vec![
            Tally {
                label: "firmware".into(),
                count: 18,
            },
            Tally {
                label: "keys".into(),
                count: 6,
            },
        ],
        per_hour: (0..8)
            .map(|h| HourRow {
                start_ms: t0 + h * 3_600_000,
                done: if h == 4 { 210 } else { 309 },
                failed: 3,
            })
            .collect(),
        cycle: cycle_stats(
            (0..2_376)
                .map(|i| 9_000 + (i * 7_919 % 2_400) + (i % 13) * 60)
                .collect(),
            Some(8_400),
        ),
        alarms: vec![
            AlarmRow {
                id: 1,
                kind: "security.firmware_mismatch".into(),
                words: "Nest 3: the meter reported a firmware it was not given. Take it out and keep it apart for inspection.".into(),
                nest: Some(3),
                raised_at: rfc3339(t0 + 7_200_000),
                acked_at: Some(rfc3339(t0 + 7_290_000)),
                acked_by: Some("super".into()),
                ack_s: Some(90.0),
                open_s: None,
            },
            AlarmRow {
                id: 2,
                kind: "nest.link_lost".into(),
                words: "Nest 5: the link to the jig was lost. Check its cable.".into(),
                nest: Some(5),
                raised_at: rfc3339(t0 + 18_000_000),
                acked_at: Some(rfc3339(t0 + 18_420_000)),
                acked_by: Some("super".into()),
                ack_s: Some(420.0),
                open_s: None,
            },
        ],
        voided: vec![
            VoidRow {
                serial: "4a1f".repeat(5),
                uid: "00112233445566778899aabb".into(),
                meter_serial: Some("EM3-00001207".into()),
                slot: "sign".into(),
                reason: "meter failed before the certificate was delivered".into(),
                at: rfc3339(t0 + 7_200_000),
            },
            VoidRow {
                serial: "4a20".repeat(5),
                uid: "00112233445566778899aabb".into(),
                meter_serial: Some("EM3-00001207".into()),
                slot: "ka".into(),
                reason: "meter failed before the certificate was delivered".into(),
                at: rfc3339(t0 + 7_200_000),
            },
        ],
        failed_meters: vec![FailedMeter {
            uid: "00112233445566778899aabb".into(),
            serial: Some("EM3-00001207".into()),
            nest: 3,
            step: "firmware".into(),
            reason: "the meter did not answer".into(),
            at: rfc3339(t0 + 7_200_000),
            fate: "provisioned again after a rework approved by super at 2026-04-12T08:10:00Z as EM3-00001290 in batch WO-2026-0412: done".into(),
            recovered: true,
        }],
        exports: vec![ExportChain {
            out_dir: "/var/lib/station/exports/WO-2026-0412".into(),
            manifest_sha256: "c0de".repeat(16),
            at: rfc3339(t0 + 8 * 3_600_000 + 300_000),
            by: "officer".into(),
            checkpoint_seq: 2_429,
            checkpoint_text: "cell-07/audit\n2429\nq83v...\n".into(),
            crl_number: 31,
            signature_ok: true,
            chain_ok: true,
            exported_entry: Some(2_430),
            exported_kind: Some("manifest.exported".into()),
            pending: false,
        }],
        hsm_self_tests: vec![SelfTest {
            seq: 3,
            at: rfc3339(t0 - 600_000),
            passed: true,
            checks: 2,
            findings: vec![
                (
                    "token".into(),
                    true,
                    "SoftHSM v2, firmware 2.6".into(),
                ),
                (
                    "key attributes".into(),
                    true,
                    "sensitive, not extractable, wrap only with trusted keys".into(),
                ),
            ],
        }],
        audit_kinds: kinds,
        checks: Vec::new(),
        requirements: Vec::new(),
        documents: BTreeMap::new(),
        // Fixed, so that the sample's picture does not change with the map's every edit.
        map_sha256: "5a3e".repeat(16),
        permissions: crate::auth::PERMISSIONS
            .iter()
            .map(|(a, roles)| {
                (
                    a.describe().to_string(),
                    roles.iter().map(|r| r.as_str().to_string()).collect(),
                )
            })
            .collect(),
    };
    r.checks = Check::ALL.iter().map(|c| check(&r, *c)).collect();
    r.requirements = map.requirements.into_iter().map(|q| judge(&r, q)).collect();
    r.documents = map.documents;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cycle_histogram_counts_every_meter_and_starts_at_the_floor() {
        let s = cycle_stats(vec![10_000, 12_000, 11_000, 30_000], Some(8_000));
        assert_eq!(s.meters, 4);
        assert_eq!(s.histogram.iter().map(|b| b.2).sum::<i64>(), 4);
        assert_eq!(s.histogram[0].0, 8_000);
        assert_eq!((s.min_ms, s.max_ms, s.median_ms), (10_000, 30_000, 12_000));
        assert!(s.histogram.last().unwrap().1 > 30_000);
    }

    #[test]
    fn a_broken_log_shows_nothing_and_a_failed_check_fails_its_requirements() {
        let mut r = sample();
        assert!(r.requirements.iter().all(|q| q.verdict != Verdict::Failed));
        r.counts.meters_unsealed = 1;
        r.checks = Check::ALL.iter().map(|c| check(&r, *c)).collect();
        let rows: Vec<RequirementRow> = r
            .requirements
            .iter()
            .map(|q| judge(&r, q.requirement.clone()))
            .collect();
        assert!(rows.iter().any(|q| q.verdict == Verdict::Failed
            && q.requirement.checks.contains(&"sealed".to_string())));
        r.audit.first_bad = Some((7, "hash".into()));
        let rows: Vec<RequirementRow> = r
            .requirements
            .iter()
            .map(|q| judge(&r, q.requirement.clone()))
            .collect();
        assert!(
            rows.iter()
                .filter(|q| q.requirement.applies)
                .all(|q| q.verdict == Verdict::NotShown)
        );
    }
}
