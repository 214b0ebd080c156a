//! Typed access to the journal's records: firmware releases, customers, batches, meters,
//! certificates and wrapped keys. Each function does one thing inside the caller's connection or
//! transaction; deciding *when* (and what to audit) is the engine's business.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;

use crate::db::{DbError, rfc3339};

/// A firmware release.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct FirmwareRow {
    /// Id.
    pub id: i64,
    /// SHA-256 of the image file, hex.
    pub sha256: String,
    /// Version from the image header.
    pub version: String,
    /// Size in bytes.
    pub size: i64,
    /// SHA-256 of the signing key (SPKI), hex.
    pub signer_key_hash: String,
    /// Import time.
    pub imported_at: String,
    /// Who imported it.
    pub imported_by: String,
}

/// A customer (utility).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CustomerRow {
    /// Id.
    pub id: i64,
    /// Name.
    pub name: String,
    /// SHA-256 of its certificate, hex.
    pub fingerprint: String,
    /// Import time.
    pub imported_at: String,
    /// Who imported it.
    pub imported_by: String,
}

/// A batch with its live counts.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct BatchRow {
    /// Id.
    pub id: i64,
    /// Work order.
    pub work_order: String,
    /// Model.
    pub model: String,
    /// Firmware id.
    pub firmware_id: i64,
    /// Firmware version.
    pub firmware_version: String,
    /// Firmware SHA-256.
    pub firmware_sha256: String,
    /// Customer id.
    pub customer_id: i64,
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
    /// Next serial number to assign.
    pub next_serial: i64,
    /// "open" or "closed".
    pub state: String,
    /// HSM label of the transport key.
    pub transport_key: String,
    /// OAEP hash used to wrap it.
    pub oaep_hash: String,
    /// Meters done.
    pub done: i64,
    /// Meters failed.
    pub failed: i64,
    /// Meters in progress.
    pub in_flight: i64,
    /// Opened.
    pub opened_at: String,
    /// By.
    pub opened_by: String,
    /// Closed.
    pub closed_at: Option<String>,
    /// By.
    pub closed_by: Option<String>,
    /// Its newest export.
    pub exported_at: Option<String>,
    /// When its wrapped keys were deleted, the retention period after its newest export.
    pub keys_deleted_at: Option<String>,
}

impl BatchRow {
    /// Meters still to produce.
    pub fn remaining(&self) -> i64 {
        (self.quantity - self.done).max(0)
    }

    /// Yield in percent (done over done + failed), if anything finished.
    pub fn yield_percent(&self) -> Option<f64> {
        let finished = self.done + self.failed;
        (finished > 0).then(|| 100.0 * self.done as f64 / finished as f64)
    }
}

/// Inserts a firmware release.
pub fn insert_firmware(
    conn: &Connection,
    sha256: &str,
    version: &str,
    image: &[u8],
    signer_key_hash: &str,
    by: &str,
    now: i64,
) -> Result<i64, DbError> {
    conn.execute(
        "INSERT INTO firmware (sha256, version, size, image, signer_key_hash, imported_at, imported_by) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        params![sha256, version, image.len() as i64, image, signer_key_hash, now, by],
    )?;
    Ok(conn.last_insert_rowid())
}

fn firmware_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<FirmwareRow> {
    Ok(FirmwareRow {
        id: r.get(0)?,
        sha256: r.get(1)?,
        version: r.get(2)?,
        size: r.get(3)?,
        signer_key_hash: r.get(4)?,
        imported_at: rfc3339(r.get(5)?),
        imported_by: r.get(6)?,
    })
}

const FIRMWARE_COLS: &str = "id, sha256, version, size, signer_key_hash, imported_at, imported_by";

/// Every firmware release.
pub fn list_firmware(conn: &Connection) -> Result<Vec<FirmwareRow>, DbError> {
    let mut stmt = conn.prepare(&format!("SELECT {FIRMWARE_COLS} FROM firmware ORDER BY id"))?;
    let rows = stmt.query_map([], firmware_from)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A firmware release by SHA-256 (or a unique prefix of it) or by version.
pub fn find_firmware(conn: &Connection, key: &str) -> Result<Option<FirmwareRow>, DbError> {
    let all = list_firmware(conn)?;
    let by_sha: Vec<_> = all
        .iter()
        .filter(|f| f.sha256.starts_with(&key.to_lowercase()) && key.len() >= 8)
        .collect();
    if by_sha.len() == 1 {
        return Ok(Some(by_sha[0].clone()));
    }
    let by_version: Vec<_> = all.iter().filter(|f| f.version == key).collect();
    Ok(if by_version.len() == 1 {
        Some(by_version[0].clone())
    } else {
        None
    })
}

/// The image bytes of a release.
pub fn firmware_image(conn: &Connection, id: i64) -> Result<Vec<u8>, DbError> {
    Ok(
        conn.query_row("SELECT image FROM firmware WHERE id = ?1", [id], |r| {
            r.get(0)
        })?,
    )
}

/// Inserts a customer.
pub fn insert_customer(
    conn: &Connection,
    name: &str,
    cert_der: &[u8],
    fingerprint: &str,
    by: &str,
    now: i64,
) -> Result<i64, DbError> {
    conn.execute(
        "INSERT INTO customers (name, cert_der, fingerprint, imported_at, imported_by) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![name, cert_der, fingerprint, now, by],
    )?;
    Ok(conn.last_insert_rowid())
}

/// Every customer.
pub fn list_customers(conn: &Connection) -> Result<Vec<CustomerRow>, DbError> {
    let mut stmt = conn.prepare(
        "SELECT id, name, fingerprint, imported_at, imported_by FROM customers ORDER BY name",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(CustomerRow {
            id: r.get(0)?,
            name: r.get(1)?,
            fingerprint: r.get(2)?,
            imported_at: rfc3339(r.get(3)?),
            imported_by: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A customer's certificate.
pub fn customer_cert(conn: &Connection, id: i64) -> Result<Vec<u8>, DbError> {
    Ok(
        conn.query_row("SELECT cert_der FROM customers WHERE id = ?1", [id], |r| {
            r.get(0)
        })?,
    )
}

const BATCH_SELECT: &str = "SELECT b.id, b.work_order, b.model, b.firmware_id, f.version, f.sha256, b.customer_id, c.name,
    b.quantity, b.serial_prefix, b.serial_first, b.serial_last, b.next_serial, b.state, b.transport_key, b.oaep_hash,
    (SELECT count(*) FROM meters m WHERE m.batch_id = b.id AND m.state = 'done'),
    (SELECT count(*) FROM meters m WHERE m.batch_id = b.id AND m.state = 'failed'),
    (SELECT count(*) FROM meters m WHERE m.batch_id = b.id AND m.state NOT IN ('done', 'failed')),
    b.opened_at, b.opened_by, b.closed_at, b.closed_by,
    (SELECT max(e.created_at) FROM exports e WHERE e.batch_id = b.id), b.keys_purged_at
    FROM batches b JOIN firmware f ON f.id = b.firmware_id JOIN customers c ON c.id = b.customer_id";

fn batch_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<BatchRow> {
    Ok(BatchRow {
        id: r.get(0)?,
        work_order: r.get(1)?,
        model: r.get(2)?,
        firmware_id: r.get(3)?,
        firmware_version: r.get(4)?,
        firmware_sha256: r.get(5)?,
        customer_id: r.get(6)?,
        customer: r.get(7)?,
        quantity: r.get(8)?,
        serial_prefix: r.get(9)?,
        serial_first: r.get(10)?,
        serial_last: r.get(11)?,
        next_serial: r.get(12)?,
        state: r.get(13)?,
        transport_key: r.get(14)?,
        oaep_hash: r.get(15)?,
        done: r.get(16)?,
        failed: r.get(17)?,
        in_flight: r.get(18)?,
        opened_at: rfc3339(r.get(19)?),
        opened_by: r.get(20)?,
        closed_at: r.get::<_, Option<i64>>(21)?.map(rfc3339),
        closed_by: r.get(22)?,
        exported_at: r.get::<_, Option<i64>>(23)?.map(rfc3339),
        keys_deleted_at: r.get::<_, Option<i64>>(24)?.map(rfc3339),
    })
}

/// Every batch, newest first.
pub fn list_batches(conn: &Connection) -> Result<Vec<BatchRow>, DbError> {
    let mut stmt = conn.prepare(&format!("{BATCH_SELECT} ORDER BY b.id DESC"))?;
    let rows = stmt.query_map([], batch_from)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One batch.
pub fn batch(conn: &Connection, id: i64) -> Result<Option<BatchRow>, DbError> {
    Ok(conn
        .query_row(&format!("{BATCH_SELECT} WHERE b.id = ?1"), [id], batch_from)
        .optional()?)
}

/// The open batch, if any (a cell runs one batch at a time).
pub fn open_batch(conn: &Connection) -> Result<Option<BatchRow>, DbError> {
    Ok(conn
        .query_row(
            &format!("{BATCH_SELECT} WHERE b.state = 'open' ORDER BY b.id LIMIT 1"),
            [],
            batch_from,
        )
        .optional()?)
}

/// What a new batch is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewBatch {
    /// Work order.
    pub work_order: String,
    /// Model.
    pub model: String,
    /// Firmware id.
    pub firmware_id: i64,
    /// Customer id.
    pub customer_id: i64,
    /// Meters to produce.
    pub quantity: i64,
    /// Serial prefix.
    pub serial_prefix: String,
    /// First serial.
    pub serial_first: i64,
    /// Last serial.
    pub serial_last: i64,
    /// HSM label of its transport key.
    pub transport_key: String,
    /// The transport key wrapped for the customer.
    pub transport_wrapped: Vec<u8>,
    /// Its check value, hex.
    pub transport_kcv: String,
    /// OAEP hash.
    pub oaep_hash: String,
    /// The OAEP label the transport key was wrapped with (the work order), if any.
    pub oaep_label: Option<String>,
    /// The fastest line's speed, baud, when the batch opened.
    pub line_baud: Option<u32>,
}

/// Inserts a batch.
pub fn insert_batch(
    tx: &Transaction<'_>,
    b: &NewBatch,
    by: &str,
    now: i64,
) -> Result<i64, DbError> {
    tx.execute(
        "INSERT INTO batches (work_order, model, firmware_id, customer_id, quantity, serial_prefix, serial_first, serial_last,
            next_serial, state, transport_key, transport_wrapped, transport_kcv, oaep_hash, opened_at, opened_by, oaep_label, line_baud)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?7, 'open', ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        params![b.work_order, b.model, b.firmware_id, b.customer_id, b.quantity, b.serial_prefix, b.serial_first, b.serial_last,
            b.transport_key, b.transport_wrapped, b.transport_kcv, b.oaep_hash, now, by, b.oaep_label, b.line_baud],
    )?;
    Ok(tx.last_insert_rowid())
}

/// One trust anchor a batch's meters receive, pinned when the batch opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnchorRow {
    /// "device-ca", "firmware-verification", "utility-ca" or "utility-client".
    pub kind: String,
    /// Index among the anchors of its kind.
    pub index: u8,
    /// SHA-256 of the certificate's DER, hex.
    pub sha256: String,
    /// The certificate.
    pub der: Vec<u8>,
}

/// The digest of a pinned anchor set, hex: SHA-256 over each anchor's `kind NUL index sha256`
/// (the index as one byte, the SHA-256 as 32 bytes), in order. Recorded in the batch's audit
/// entry; every use of the set recomputes and compares it.
pub fn anchors_digest(anchors: &[AnchorRow]) -> String {
    let mut buf = Vec::with_capacity(anchors.len() * 64);
    for a in anchors {
        buf.extend_from_slice(a.kind.as_bytes());
        buf.push(0);
        buf.push(a.index);
        buf.extend_from_slice(&hex::decode(&a.sha256).unwrap_or_default());
    }
    hex::encode(line_protocol::crypto::sha256(&buf))
}

/// Pins `anchors` for batch `batch_id`, in order.
pub fn insert_anchors(
    tx: &Transaction<'_>,
    batch_id: i64,
    anchors: &[AnchorRow],
) -> Result<(), DbError> {
    let mut st = tx.prepare(
        "INSERT INTO batch_anchors (batch_id, position, kind, idx, sha256, der) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?;
    for (i, a) in anchors.iter().enumerate() {
        st.execute(params![
            batch_id, i as i64, a.kind, a.index, a.sha256, a.der
        ])?;
    }
    Ok(())
}

/// The anchors pinned for batch `batch_id`, in order (none for a batch opened before anchors
/// were pinned).
pub fn batch_anchors(conn: &Connection, batch_id: i64) -> Result<Vec<AnchorRow>, DbError> {
    let mut st = conn.prepare(
        "SELECT kind, idx, sha256, der FROM batch_anchors WHERE batch_id = ?1 ORDER BY position",
    )?;
    let rows = st.query_map(params![batch_id], |r| {
        Ok(AnchorRow {
            kind: r.get(0)?,
            index: r.get(1)?,
            sha256: r.get(2)?,
            der: r.get(3)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// What the audit log recorded when batch `batch_id` opened: the anchor digest and the
/// interfaces its meters must disable.
pub fn audited_pins(
    conn: &Connection,
    batch_id: i64,
) -> Result<(Option<String>, Option<i64>), DbError> {
    Ok(conn
        .query_row(
            "SELECT json_extract(details, '$.anchors_sha256'), json_extract(details, '$.disable') FROM audit
             WHERE kind = 'batch.opened' AND json_extract(details, '$.batch') = ?1
             ORDER BY seq LIMIT 1",
            params![batch_id],
            |r| Ok((r.get::<_, Option<String>>(0)?, r.get::<_, Option<i64>>(1)?)),
        )
        .optional()?
        .unwrap_or((None, None)))
}

/// Records the interfaces batch `batch_id`'s meters must disable when they seal.
pub fn set_disable_mask(tx: &Transaction<'_>, batch_id: i64, mask: u16) -> Result<(), DbError> {
    tx.execute(
        "UPDATE batches SET disable_mask = ?1 WHERE id = ?2 AND disable_mask IS NULL",
        params![mask, batch_id],
    )?;
    Ok(())
}

/// The interfaces batch `batch_id`'s meters must disable (none recorded for a batch opened
/// before masks were).
pub fn disable_mask(conn: &Connection, batch_id: i64) -> Result<Option<u16>, DbError> {
    Ok(conn
        .query_row(
            "SELECT disable_mask FROM batches WHERE id = ?1",
            params![batch_id],
            |r| r.get::<_, Option<i64>>(0),
        )
        .optional()?
        .flatten()
        .and_then(|m| u16::try_from(m).ok()))
}

/// A meter record as the engine and reports see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct MeterRow {
    /// Id.
    pub id: i64,
    /// Batch.
    pub batch_id: i64,
    /// UID, hex.
    pub uid: String,
    /// Nest (1-based).
    pub nest: i64,
    /// State.
    pub state: String,
    /// Serial.
    pub serial: Option<String>,
    /// System title, hex.
    pub system_title: Option<String>,
    /// Logical device name.
    pub ldn: Option<String>,
    /// Firmware SHA-256.
    pub fw_sha256: Option<String>,
    /// Failure reason.
    pub failure: Option<String>,
    /// Operator.
    pub operator: String,
    /// Started (Unix ms).
    pub started_at: i64,
    /// Finished (Unix ms).
    pub finished_at: Option<i64>,
}

const METER_COLS: &str = "id, batch_id, uid, nest, state, serial, system_title, ldn, fw_sha256, failure, operator, started_at, finished_at";

fn meter_from(r: &rusqlite::Row<'_>) -> rusqlite::Result<MeterRow> {
    Ok(MeterRow {
        id: r.get(0)?,
        batch_id: r.get(1)?,
        uid: r.get(2)?,
        nest: r.get(3)?,
        state: r.get(4)?,
        serial: r.get(5)?,
        system_title: r.get(6)?,
        ldn: r.get(7)?,
        fw_sha256: r.get(8)?,
        failure: r.get(9)?,
        operator: r.get(10)?,
        started_at: r.get(11)?,
        finished_at: r.get(12)?,
    })
}

/// Every record of a UID, oldest first.
pub fn meters_by_uid(conn: &Connection, uid: &str) -> Result<Vec<MeterRow>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {METER_COLS} FROM meters WHERE uid = ?1 ORDER BY id"
    ))?;
    let rows = stmt.query_map([uid], meter_from)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Every meter of a batch.
pub fn meters_of_batch(conn: &Connection, batch: i64) -> Result<Vec<MeterRow>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {METER_COLS} FROM meters WHERE batch_id = ?1 ORDER BY id"
    ))?;
    let rows = stmt.query_map([batch], meter_from)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Meters in flight (any state but done or failed).
pub fn meters_in_flight(conn: &Connection) -> Result<Vec<MeterRow>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {METER_COLS} FROM meters WHERE state NOT IN ('done', 'failed') ORDER BY id"
    ))?;
    let rows = stmt.query_map([], meter_from)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// A certificate record.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CertRow {
    /// Id.
    pub id: i64,
    /// Meter.
    pub meter_id: i64,
    /// "sign" or "ka".
    pub slot: String,
    /// intent, issued, delivered, voided.
    pub state: String,
    /// Serial, hex.
    pub serial: String,
    /// DER, once issued.
    #[serde(skip)]
    pub der: Option<Vec<u8>>,
    /// SHA-256, hex.
    pub fingerprint: Option<String>,
    /// Why voided.
    pub void_reason: Option<String>,
}

/// Certificates of a meter.
pub fn certificates_of(conn: &Connection, meter_id: i64) -> Result<Vec<CertRow>, DbError> {
    let mut stmt = conn.prepare(
        "SELECT id, meter_id, slot, state, serial, der, fingerprint, void_reason FROM certificates WHERE meter_id = ?1 ORDER BY id",
    )?;
    let rows = stmt.query_map([meter_id], |r| {
        Ok(CertRow {
            id: r.get(0)?,
            meter_id: r.get(1)?,
            slot: r.get(2)?,
            state: r.get(3)?,
            serial: r.get(4)?,
            der: r.get(5)?,
            fingerprint: r.get(6)?,
            void_reason: r.get(7)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Fails a meter: state, reason (and the step it failed at, when known), certificates voided, wrapped keys deleted (securely).
/// Returns (certificates voided, keys deleted).
pub fn fail_meter(
    tx: &Transaction<'_>,
    meter_id: i64,
    reason: &str,
    step: Option<&str>,
    now: i64,
) -> Result<(usize, usize), DbError> {
    // A done meter stays done and a failed one keeps its first reason (the journal's triggers
    // refuse both changes too).
    tx.execute(
        "UPDATE meters SET state = 'failed', failure = ?1, finished_at = ?2, fail_step = ?4 WHERE id = ?3 AND state NOT IN ('done', 'failed')",
        params![reason, now, meter_id, step],
    )?;
    let voided = tx.execute(
        "UPDATE certificates SET state = 'voided', void_reason = ?1, updated_at = ?2 WHERE meter_id = ?3 AND state IN ('intent', 'issued')",
        params![reason, now, meter_id],
    )?;
    let keys = tx.execute("DELETE FROM wrapped_keys WHERE meter_id = ?1", [meter_id])?;
    Ok((voided, keys))
}

/// The state a meter must be in for the engine to move it to `state` (the journal's triggers
/// allow more: failing from any live state).
pub fn previous_state(state: &str) -> &'static str {
    match state {
        "assigned" => "started",
        "keyed" | "flashed" => "assigned",
        "sealed" => "flashed",
        "done" => "sealed",
        _ => "started",
    }
}

/// Checks the row count of a guarded update (`... WHERE id = ? AND state = <expected>`): exactly
/// one row, or the record was changed by someone else and nothing was written.
pub fn guarded(rows: usize, what: &str, expected: &str) -> Result<(), DbError> {
    if rows == 1 {
        Ok(())
    } else {
        Err(DbError::Stale {
            what: what.to_string(),
            expected: expected.to_string(),
        })
    }
}
