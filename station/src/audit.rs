//! The tamper-evident audit log.
//!
//! Each entry carries a sequence number (1, 2, 3… without gaps), a timestamp, its source, kind,
//! severity, actor and details (a JSON object). Entries are chained: `hash_n = SHA-256(domain ‖
//! hash_{n−1} ‖ entry_n)`, and each is signed by the audit key in the HSM over its sequence number
//! and chain hash. A separately signed *head* names the newest entry, so that deleting the newest
//! entries shows. The log is also an RFC 6962 Merkle tree whose leaves are the chain hashes
//! (its right edge is kept in `audit_tree`, so the tree head costs O(log n) per entry). Every
//! `checkpoint_interval` entries, at shut-down and at every export, a checkpoint is written as a
//! C2SP signed note (signature type 0x02, ECDSA P-256) over a C2SP tlog checkpoint — the tree
//! head, with the chain hash as an extension line — the form a utility or an auditor can keep
//! outside the cell, and against which inclusion and consistency proofs ([`crate::merkle`])
//! verify.
//!
//! An entry is appended inside the caller's transaction, so an event and the state change it
//! records commit together or not at all. Kinds listed as critical in the configuration also raise
//! an alarm, which only a supervisor can acknowledge.
//!
//! Verification ([`verify`]) finds a modified, deleted, reordered or truncated entry and names the
//! first bad sequence number. What it cannot see is a whole-file rollback to an earlier state: the
//! checkpoints exported with every manifest are the defence against that.

use std::collections::BTreeSet;
use std::sync::Arc;

use base64::Engine as _;
use p256::ecdsa::signature::Verifier;
use p256::ecdsa::{Signature, VerifyingKey};
use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::db::{DbError, now_ms};
use crate::merkle::{Frontier, Hash, leaf_hash};

/// Domain of the chain hash.
const CHAIN_DOMAIN: &[u8] = b"cell-audit-chain-v1";
/// Domain of an entry signature.
const ENTRY_DOMAIN: &[u8] = b"cell-audit-entry-v1";
/// Domain of the head signature.
const HEAD_DOMAIN: &[u8] = b"cell-audit-head-v1";

/// How serious an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// Routine.
    Info,
    /// Worth noticing.
    Notice,
    /// Something went wrong.
    Warning,
    /// Security-relevant failure.
    Critical,
}

impl Severity {
    /// Lower-case name, as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Notice => "notice",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// An event to append.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// What produced it: "station", "nest 3", "cli", "gui".
    pub source: String,
    /// Dotted kind, e.g. "meter.provisioned", "auth.failure".
    pub kind: String,
    /// Severity.
    pub severity: Severity,
    /// Who: a user name, or "system".
    pub actor: String,
    /// Details.
    pub details: serde_json::Value,
    /// The nest concerned, for alarms.
    pub nest: Option<u32>,
}

impl NewEvent {
    /// An event with no nest.
    pub fn new(
        source: &str,
        kind: &str,
        severity: Severity,
        actor: &str,
        details: serde_json::Value,
    ) -> Self {
        NewEvent {
            source: source.into(),
            kind: kind.into(),
            severity,
            actor: actor.into(),
            details,
            nest: None,
        }
    }
}

/// Signs audit material with the audit key (the HSM in the station, software in unit tests).
pub trait AuditSigner: Send + Sync {
    /// DER ECDSA P-256/SHA-256 over `msg`.
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String>;
    /// The public key as DER SubjectPublicKeyInfo.
    fn spki_der(&self) -> Vec<u8>;
}

/// Audit failures.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The journal refused.
    #[error(transparent)]
    Db(#[from] DbError),
    /// The audit key could not sign: the event is not recorded and neither is what it describes.
    #[error("the audit key could not sign ({0}); check the HSM — nothing was recorded")]
    Sign(String),
    /// The log is frozen: its newest entries do not match the signed head.
    #[error(
        "the audit log is damaged ({0}); the cell is frozen: an auditor runs `station audit verify`, and a security officer resumes the log with `station audit recover --reason ...`"
    )]
    Frozen(String),
}

impl From<rusqlite::Error> for AuditError {
    fn from(e: rusqlite::Error) -> Self {
        AuditError::Db(e.into())
    }
}

/// What an append produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    /// Sequence number.
    pub seq: i64,
    /// The alarm it raised, if its kind is critical.
    pub alarm: Option<i64>,
    /// The checkpoint it triggered, if any.
    pub checkpoint: Option<i64>,
}

/// The log writer.
#[derive(Clone)]
pub struct Audit {
    signer: Arc<dyn AuditSigner>,
    origin: String,
    interval: u64,
    critical: BTreeSet<String>,
    // Set when the newest entries do not match the signed head: appending then would bury the
    // evidence, so nothing is appended until the log has been dealt with.
    frozen: Arc<std::sync::Mutex<Option<String>>>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("origin", &self.origin)
            .field("interval", &self.interval)
            .finish()
    }
}

fn put(h: &mut Sha256, s: &[u8]) {
    h.update((s.len() as u32).to_be_bytes());
    h.update(s);
}

/// The chain hash of an entry.
#[allow(clippy::too_many_arguments)]
pub fn chain_hash(
    prev: &[u8],
    seq: i64,
    ts: i64,
    source: &str,
    kind: &str,
    severity: &str,
    actor: &str,
    details: &str,
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(CHAIN_DOMAIN);
    put(&mut h, prev);
    h.update(seq.to_be_bytes());
    h.update(ts.to_be_bytes());
    for s in [source, kind, severity, actor, details] {
        put(&mut h, s.as_bytes());
    }
    h.finalize().into()
}

fn signed_message(domain: &[u8], seq: i64, hash: &[u8]) -> Vec<u8> {
    [domain, &seq.to_be_bytes(), hash].concat()
}

/// The C2SP key ID for an ECDSA key (signature type 0x02): SHA-256 of its DER
/// SubjectPublicKeyInfo, first 4 bytes.
pub fn note_key_id(spki_der: &[u8]) -> [u8; 4] {
    let d = Sha256::digest(spki_der);
    [d[0], d[1], d[2], d[3]]
}

/// The note text of a checkpoint: a C2SP tlog-checkpoint — origin, tree size (the newest entry
/// covered), the RFC 6962 tree head over the entries' chain hashes — with one extension line, the
/// chain hash after that entry.
pub fn checkpoint_text(origin: &str, seq: i64, root: &[u8], chain: &[u8]) -> String {
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    format!(
        "{origin}\n{seq}\n{}\n{CHAIN_LINE} {}\n",
        b64(root),
        b64(chain)
    )
}

/// The extension line of a checkpoint that names the chain hash.
const CHAIN_LINE: &str = "chain-head";
/// The fourth line of checkpoints written before the log was a Merkle tree, whose third line is
/// the chain hash.
const OLD_CHAIN_LINE: &str = "chain sha256 cell-audit-chain-v1";

/// The tree of the log (RFC 6962, leaves = the entries' chain hashes) as far as entry `seq`, read
/// from its stored right edge, or rebuilt from the entries when the edge is missing or behind
/// (a log written before the tree existed).
fn tree_at(c: &rusqlite::Connection, seq: i64) -> Result<Frontier, DbError> {
    let stored: Option<(i64, Vec<u8>)> = c
        .query_row(
            "SELECT size, frontier FROM audit_tree WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    if let Some((size, bytes)) = stored
        && size == seq
        && let Some(f) = Frontier::from_bytes(size as u64, &bytes)
    {
        return Ok(f);
    }
    let mut f = Frontier::new();
    let mut stmt = c.prepare("SELECT hash FROM audit WHERE seq <= ?1 ORDER BY seq")?;
    let mut rows = stmt.query([seq])?;
    while let Some(r) = rows.next()? {
        f.push(leaf_hash(&r.get::<_, Vec<u8>>(0)?));
    }
    Ok(f)
}

impl Audit {
    /// A writer signing with `signer`; `origin` names the log (the station id).
    pub fn new(
        signer: Arc<dyn AuditSigner>,
        station_id: &str,
        interval: u64,
        critical: BTreeSet<String>,
    ) -> Self {
        Audit {
            signer,
            origin: format!("{station_id}/audit"),
            interval: interval.max(1),
            critical,
            frozen: Arc::new(std::sync::Mutex::new(None)),
        }
    }

    /// Why the log is frozen, if it is.
    pub fn frozen(&self) -> Option<String> {
        self.frozen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Freezes the log for `why` (nothing is appended until a recovery).
    pub fn freeze(&self, why: String) {
        *self.frozen.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    fn set_frozen(&self, why: Option<String>) {
        *self.frozen.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }

    /// Checks the journal against the anchor the HSM keeps of it (`anchor`: the newest entry
    /// anchored, as sequence number and chain hash). The journal may run ahead of its anchor
    /// (the anchor follows a few seconds behind), never behind it or off it. Returns what is
    /// wrong.
    pub fn check_anchor(
        conn: &rusqlite::Connection,
        anchor: Option<(i64, [u8; 32])>,
    ) -> Result<Option<String>, AuditError> {
        let Some((aseq, ahash)) = anchor else {
            return Ok(None);
        };
        let newest: i64 =
            conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))?;
        if newest < aseq {
            return Ok(Some(format!(
                "the journal ends at entry {newest} but the HSM's anchor shows entry {aseq} was written: the newest entries were cut off, or an older copy of the journal was put back"
            )));
        }
        let hash: Option<Vec<u8>> = conn
            .query_row("SELECT hash FROM audit WHERE seq = ?1", [aseq], |r| {
                r.get(0)
            })
            .optional()?;
        if hash.as_deref() != Some(&ahash[..]) {
            return Ok(Some(format!(
                "entry {aseq} is not the entry the HSM anchored: the log was rewritten"
            )));
        }
        Ok(None)
    }

    /// The newest entry, as sequence number and chain hash.
    pub fn newest(conn: &rusqlite::Connection) -> Result<Option<(i64, Vec<u8>)>, AuditError> {
        Ok(conn
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?)
    }

    /// Resumes a frozen log inside `tx`: signs a new head over the newest entry there is,
    /// appends `audit.recovered` (critical: an alarm) with `reason` and why the log was frozen,
    /// and writes a checkpoint. What is damaged stays damaged — `verify` still names it — but
    /// the cell can record again. Returns the entry and why the log had been frozen; on error
    /// the log stays frozen.
    pub fn recover(
        &self,
        tx: &Transaction<'_>,
        source: &str,
        actor: &str,
        reason: &str,
    ) -> Result<(Appended, String), AuditError> {
        let Some(why) = self.frozen() else {
            return Err(AuditError::Frozen(
                "the log is not frozen; there is nothing to recover".into(),
            ));
        };
        let newest = Self::newest(tx)?;
        match &newest {
            Some((seq, hash)) => {
                let head_sig = self.sign(&signed_message(HEAD_DOMAIN, *seq, hash))?;
                tx.execute(
                    "INSERT INTO audit_head (id, seq, hash, signature) VALUES (1, ?1, ?2, ?3)
                     ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, signature = excluded.signature",
                    params![seq, hash, head_sig],
                )?;
            }
            None => {
                tx.execute("DELETE FROM audit_head", [])?;
            }
        }
        self.set_frozen(None);
        let r = self
            .append(
                tx,
                &NewEvent::new(
                    source,
                    "audit.recovered",
                    Severity::Critical,
                    actor,
                    serde_json::json!({
                        "message": format!("the audit log was resumed after it was frozen: {reason}"),
                        "reason": reason,
                        "frozen_because": why,
                        "newest_entry_before": newest.as_ref().map(|(s, _)| *s),
                    }),
                ),
            )
            .and_then(|a| self.checkpoint(tx, "recovery").map(|_| a));
        match r {
            Ok(a) => Ok((a, why)),
            Err(e) => {
                self.set_frozen(Some(why));
                Err(e)
            }
        }
    }

    /// Checks that the newest entry is the signed head (at start-up, before anything is
    /// appended); freezes the log if not. Returns the reason when frozen.
    pub fn check_tail(
        &self,
        conn: &rusqlite::Connection,
        key: &VerifyingKey,
    ) -> Result<Option<String>, AuditError> {
        let last: Option<(i64, Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT seq, hash, sig FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let head: Option<(i64, Vec<u8>, Vec<u8>)> = conn
            .query_row(
                "SELECT seq, hash, signature FROM audit_head WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        let problem = match (last, head) {
            (None, None) => None,
            (Some(_), None) => Some("the signed head of the log is missing".to_string()),
            (None, Some((hseq, ..))) => Some(format!(
                "the log is empty but its signed head names entry {hseq}"
            )),
            (Some((seq, hash, sig)), Some((hseq, hhash, hsig))) => {
                if !sig_ok(key, &signed_message(HEAD_DOMAIN, hseq, &hhash), &hsig) {
                    Some("the signed head is not signed by the audit key".into())
                } else if hseq != seq || hhash != hash {
                    Some(format!(
                        "the newest entry is {seq} but the signed head names entry {hseq}"
                    ))
                } else if !sig_ok(key, &signed_message(ENTRY_DOMAIN, seq, &hash), &sig) {
                    Some(format!("entry {seq} is not signed by the audit key"))
                } else {
                    None
                }
            }
        };
        *self.frozen.lock().unwrap_or_else(|p| p.into_inner()) = problem.clone();
        Ok(problem)
    }

    /// The key name in signed notes.
    pub fn key_name(&self) -> String {
        format!("{}-key", self.origin)
    }

    /// Is `kind` critical (raises an alarm)?
    pub fn is_critical(&self, kind: &str) -> bool {
        self.critical.contains(kind)
    }

    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, AuditError> {
        self.signer.sign(msg).map_err(AuditError::Sign)
    }

    /// Appends `e` inside `tx`.
    pub fn append(&self, tx: &Transaction<'_>, e: &NewEvent) -> Result<Appended, AuditError> {
        if let Some(why) = self.frozen() {
            return Err(AuditError::Frozen(why));
        }
        let head: Option<(i64, Vec<u8>)> = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let (prev_seq, prev_hash) = head.unwrap_or((0, vec![0u8; 32]));
        let seq = prev_seq + 1;
        let ts = now_ms();
        let details = serde_json::to_string(&e.details).unwrap_or_else(|_| "{}".into());
        let sev = e.severity.as_str();
        let hash = chain_hash(
            &prev_hash, seq, ts, &e.source, &e.kind, sev, &e.actor, &details,
        );
        let sig = self.sign(&signed_message(ENTRY_DOMAIN, seq, &hash))?;
        let mut tree = tree_at(tx, prev_seq)?;
        tree.push(leaf_hash(&hash));
        tx.execute(
            "INSERT INTO audit_tree (id, size, frontier) VALUES (1, ?1, ?2)
             ON CONFLICT(id) DO UPDATE SET size = excluded.size, frontier = excluded.frontier",
            params![seq, tree.to_bytes()],
        )?;
        tx.execute(
            "INSERT INTO audit (seq, ts, source, kind, severity, actor, details, hash, sig) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![seq, ts, e.source, e.kind, sev, e.actor, details, hash.to_vec(), sig],
        )?;
        let head_sig = self.sign(&signed_message(HEAD_DOMAIN, seq, &hash))?;
        tx.execute(
            "INSERT INTO audit_head (id, seq, hash, signature) VALUES (1, ?1, ?2, ?3)
             ON CONFLICT(id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash, signature = excluded.signature",
            params![seq, hash.to_vec(), head_sig],
        )?;
        let alarm = if self.is_critical(&e.kind) {
            let message = e
                .details
                .get("message")
                .and_then(|m| m.as_str())
                .map(str::to_string)
                .unwrap_or_else(|| e.kind.clone());
            tx.execute(
                "INSERT INTO alarms (audit_seq, kind, message, nest, raised_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![seq, e.kind, message, e.nest, ts],
            )?;
            Some(tx.last_insert_rowid())
        } else {
            None
        };
        let checkpoint = if (seq as u64).is_multiple_of(self.interval) {
            Some(self.write_checkpoint(tx, seq, &tree, &hash, "interval")?)
        } else {
            None
        };
        Ok(Appended {
            seq,
            alarm,
            checkpoint,
        })
    }

    fn write_checkpoint(
        &self,
        tx: &Transaction<'_>,
        seq: i64,
        tree: &Frontier,
        hash: &[u8],
        reason: &str,
    ) -> Result<i64, AuditError> {
        let text = checkpoint_text(&self.origin, seq, &tree.root(), hash);
        let sig = self.sign(text.as_bytes())?;
        let mut blob = note_key_id(&self.signer.spki_der()).to_vec();
        blob.extend_from_slice(&sig);
        let note = format!(
            "{text}\n\u{2014} {} {}\n",
            self.key_name(),
            base64::engine::general_purpose::STANDARD.encode(blob)
        );
        tx.execute(
            "INSERT INTO audit_checkpoints (seq, hash, note, reason, created_at, frontier) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![seq, hash.to_vec(), note, reason, now_ms(), tree.to_bytes()],
        )?;
        Ok(tx.last_insert_rowid())
    }

    /// Writes a checkpoint of the current head (at shut-down, at export); returns its id and note.
    pub fn checkpoint(
        &self,
        tx: &Transaction<'_>,
        reason: &str,
    ) -> Result<(i64, String), AuditError> {
        if let Some(why) = self.frozen() {
            return Err(AuditError::Frozen(why));
        }
        let (seq, hash): (i64, Vec<u8>) = tx
            .query_row(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?
            .unwrap_or((0, vec![0u8; 32]));
        let tree = tree_at(tx, seq)?;
        let id = self.write_checkpoint(tx, seq, &tree, &hash, reason)?;
        let note: String = tx.query_row(
            "SELECT note FROM audit_checkpoints WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?;
        Ok((id, note))
    }
}

/// One entry as stored.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Sequence number.
    pub seq: i64,
    /// RFC 3339 time.
    pub time: String,
    /// Unix milliseconds.
    pub ts: i64,
    /// Source.
    pub source: String,
    /// Kind.
    pub kind: String,
    /// Severity.
    pub severity: String,
    /// Actor.
    pub actor: String,
    /// Details.
    pub details: serde_json::Value,
}

/// Reads entries with `seq > after`, at most `limit`, ascending.
pub fn read(conn: &rusqlite::Connection, after: i64, limit: i64) -> Result<Vec<Entry>, DbError> {
    let mut stmt = conn.prepare(
        "SELECT seq, ts, source, kind, severity, actor, details FROM audit WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit], |r| {
        let ts: i64 = r.get(1)?;
        let details: String = r.get(6)?;
        Ok(Entry {
            seq: r.get(0)?,
            time: crate::db::rfc3339(ts),
            ts,
            source: r.get(2)?,
            kind: r.get(3)?,
            severity: r.get(4)?,
            actor: r.get(5)?,
            details: serde_json::from_str(&details).unwrap_or(serde_json::Value::String(details)),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The newest `n` entries, ascending.
pub fn tail(conn: &rusqlite::Connection, n: i64) -> Result<Vec<Entry>, DbError> {
    let last: i64 = conn.query_row("SELECT COALESCE(MAX(seq), 0) FROM audit", [], |r| r.get(0))?;
    read(conn, (last - n).max(0), n)
}

/// The result of [`verify`].
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Verification {
    /// Entries checked.
    pub entries: i64,
    /// Checkpoints checked.
    pub checkpoints: i64,
    /// The first bad sequence number and what is wrong with it.
    pub first_bad: Option<(i64, String)>,
    /// Entries whose own signatures were checked: all of them, or with [`verify_anchored`] those
    /// after the newest signed checkpoint or head.
    pub signatures_checked: i64,
}

impl Verification {
    /// Did everything verify?
    pub fn ok(&self) -> bool {
        self.first_bad.is_none()
    }
}

fn sig_ok(key: &VerifyingKey, msg: &[u8], der: &[u8]) -> bool {
    Signature::from_der(der)
        .map(|s| key.verify(msg, &s).is_ok())
        .unwrap_or(false)
}

/// What an off-line verification of a copied journal found.
#[derive(Debug, Clone, Serialize)]
pub struct OfflineVerification {
    /// The log's verification.
    pub verification: Verification,
    /// Subject of the audit certificate used, checked against the manufacturer root.
    pub audit_certificate: String,
}

/// Verifies the audit log of a copied journal without the HSM: the audit signer's certificate
/// (given, or as the journal recorded it) must chain to `root`, the manufacturer root the
/// auditor holds; then every entry, signature, the signed head and every checkpoint are checked
/// with its key. The copy is never written: it is copied (with its WAL) into a private temporary
/// directory and read there.
pub fn verify_offline(
    journal: &std::path::Path,
    root: &x509_cert::Certificate,
    audit_cert: Option<Vec<u8>>,
) -> Result<OfflineVerification, String> {
    let copy = JournalCopy::of(journal)?;
    let (key, subject) = offline_key(&copy.conn, root, audit_cert)?;
    let verification = verify(&copy.conn, &key).map_err(|e| e.to_string())?;
    Ok(OfflineVerification {
        verification,
        audit_certificate: subject,
    })
}

/// A private copy of a journal, open for reading; removed when dropped. The copy is one
/// consistent state of the journal, even of one a running daemon writes: SQLite makes it
/// (`VACUUM INTO`) inside a read transaction on a read-only connection, so nothing is written to
/// the original. (Copying the file and its write-ahead log byte for byte is not safe: a
/// checkpoint moving pages into the file during the copy tears it.)
#[derive(Debug)]
pub struct JournalCopy {
    /// The copy, open.
    pub conn: rusqlite::Connection,
    dir: std::path::PathBuf,
}

impl JournalCopy {
    /// Copies `journal` (with what its write-ahead log holds) into a new owner-only temporary
    /// directory and opens the copy, refusing a file that is not a station journal.
    pub fn of(journal: &std::path::Path) -> Result<JournalCopy, String> {
        use rusqlite::OpenFlags;
        let dir =
            tempdir_private().map_err(|e| format!("cannot make a temporary directory: {e}"))?;
        let unreadable =
            |e: rusqlite::Error| format!("{} is not a readable journal: {e}", journal.display());
        let open = || -> Result<rusqlite::Connection, String> {
            // SQLite would make an empty database of a missing file's name.
            std::fs::metadata(journal)
                .map_err(|e| format!("cannot read the journal {}: {e}", journal.display()))?;
            let original = rusqlite::Connection::open_with_flags(
                journal,
                OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(unreadable)?;
            original
                .busy_timeout(std::time::Duration::from_secs(10))
                .map_err(unreadable)?;
            let app: i32 = original
                .query_row("PRAGMA application_id", [], |r| r.get(0))
                .map_err(unreadable)?;
            if app != crate::db::APPLICATION_ID {
                return Err(format!("{} is not a station journal", journal.display()));
            }
            let copy = dir.join("journal.db");
            let target = copy
                .to_str()
                .ok_or("the temporary directory's name is not UTF-8")?;
            original
                .execute("VACUUM INTO ?1", [target])
                .map_err(|e| format!("cannot copy the journal {}: {e}", journal.display()))?;
            drop(original);
            rusqlite::Connection::open_with_flags(
                &copy,
                OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
            )
            .map_err(unreadable)
        };
        match open() {
            Ok(conn) => Ok(JournalCopy { conn, dir }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }
}

impl Drop for JournalCopy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The audit key of a copied journal, as an auditor trusts it: from the audit signer's
/// certificate (given, or as the journal recorded it), which must be issued by `root` itself and
/// be no CA. Returns the key and the certificate's subject.
pub fn offline_key(
    conn: &rusqlite::Connection,
    root: &x509_cert::Certificate,
    audit_cert: Option<Vec<u8>>,
) -> Result<(VerifyingKey, String), String> {
    let der = match audit_cert {
        Some(d) => d,
        None => conn
            .query_row(
                "SELECT der FROM cell_certificates WHERE label = 'audit-signer'",
                [],
                |r| r.get::<_, Vec<u8>>(0),
            )
            .map_err(|_| {
                "the journal records no audit certificate; pass --audit-cert FILE".to_string()
            })?,
    };
    let (cert, _) = crate::engine::keys::parse_cert(&der)?;
    // Issued by the root itself (no intermediate is taken from the copy, which anyone could
    // have edited), and no CA: a key under the device CA — a meter's — never qualifies.
    crate::manifest::verify::chain_to_root(&cert, &[], root).map_err(|e| {
        format!("the audit certificate does not chain to the given manufacturer root: {e}")
    })?;
    let is_ca = cert
        .tbs_certificate()
        .get_extension::<x509_cert::ext::pkix::BasicConstraints>()
        .ok()
        .flatten()
        .is_some_and(|(_, bc)| bc.ca);
    if is_ca {
        return Err(format!(
            "{} is a CA certificate, not the audit signer's",
            cert.tbs_certificate().subject()
        ));
    }
    let point = cert
        .tbs_certificate()
        .subject_public_key_info()
        .subject_public_key
        .as_bytes()
        .ok_or("the audit certificate's key cannot be read")?;
    let key = VerifyingKey::from_sec1_bytes(point)
        .map_err(|_| "the audit certificate's key is not a P-256 key".to_string())?;
    Ok((key, cert.tbs_certificate().subject().to_string()))
}

/// A new owner-only directory under the system's temporary directory.
fn tempdir_private() -> std::io::Result<std::path::PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    let mut raw = [0u8; 12];
    rand_core::Rng::fill_bytes(&mut line_protocol::io::system_rng(), &mut raw);
    let dir = std::env::temp_dir().join(format!("station-audit-{}", hex::encode(raw)));
    std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
    Ok(dir)
}

/// Entries whose signatures are checked together, split over the cores.
const SIGNATURE_BATCH: usize = 8192;

/// The lowest sequence number in `batch` (sequence, signed message, signature) whose signature
/// does not verify with `key`, checked on every core.
fn first_badly_signed(key: &VerifyingKey, batch: &[(i64, Vec<u8>, Vec<u8>)]) -> Option<i64> {
    if batch.is_empty() {
        return None;
    }
    let threads = std::thread::available_parallelism()
        .map(std::num::NonZeroUsize::get)
        .unwrap_or(1)
        .clamp(1, 8);
    let chunk = batch.len().div_ceil(threads);
    let check = |part: &[(i64, Vec<u8>, Vec<u8>)]| {
        part.iter()
            .find(|(_, msg, sig)| !sig_ok(key, msg, sig))
            .map(|(seq, _, _)| *seq)
    };
    if threads == 1 || batch.len() < 64 {
        return check(batch);
    }
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(chunk)
            .map(|part| (part, scope.spawn(move || check(part))))
            .collect();
        handles
            .into_iter()
            // A thread that failed checked nothing: its part is checked here.
            .filter_map(|(part, h)| h.join().unwrap_or_else(|_| check(part)))
            .min()
    })
}

/// Checks the whole log against the audit public key: every entry's place in the hash chain and
/// the Merkle tree, every entry's own signature, the signed head and every signed checkpoint.
pub fn verify(conn: &rusqlite::Connection, key: &VerifyingKey) -> Result<Verification, DbError> {
    verify_with(conn, key, false)
}

/// Like [`verify`], but an entry's own signature is checked only when no signed checkpoint or
/// signed head covers it: a checkpoint whose signature verifies names the chain hash of its
/// entry, which the chain recomputed from the entries must equal, and that hash commits to every
/// entry before it. This is what an export's report uses, so that its time does not grow with
/// the signatures of a year's log. What it does not see is a covered entry's signature bytes
/// replaced while its content stands; [`verify`] does. When anything fails, the log is checked
/// again as [`verify`] does, so that the first bad entry is named the same way.
pub fn verify_anchored(
    conn: &rusqlite::Connection,
    key: &VerifyingKey,
) -> Result<Verification, DbError> {
    let quick = verify_with(conn, key, true)?;
    if quick.ok() {
        Ok(quick)
    } else {
        verify(conn, key)
    }
}

fn verify_with(
    conn: &rusqlite::Connection,
    key: &VerifyingKey,
    anchored: bool,
) -> Result<Verification, DbError> {
    let mut first_bad: Option<(i64, String)> = None;
    let mut note = |seq: i64, why: String| {
        if first_bad.as_ref().is_none_or(|(s, _)| seq < *s) {
            first_bad = Some((seq, why));
        }
    };
    // The signed head and the checkpoints name the entries whose chain hash and tree head are
    // compared below: only those are kept from the pass over the log, so that verifying a log of
    // millions of entries holds a few hashes, not all of them.
    let head: Option<(i64, Vec<u8>, Vec<u8>)> = conn
        .query_row(
            "SELECT seq, hash, signature FROM audit_head WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let cps: Vec<(i64, Vec<u8>, String)> = {
        let mut stmt = conn.prepare("SELECT seq, hash, note FROM audit_checkpoints ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let mut wanted: BTreeSet<i64> = cps
        .iter()
        .flat_map(|(row_seq, _, text)| {
            [Some(*row_seq), checkpoint_values(text).map(|(seq, _)| seq)]
        })
        .flatten()
        .collect();
    wanted.extend(head.as_ref().map(|h| h.0));
    let spki = spki::EncodePublicKey::to_public_key_der(key)
        .map(|d| d.as_bytes().to_vec())
        .unwrap_or_default();
    let key_id = note_key_id(&spki);
    // The newest entry a validly signed head or checkpoint names: with `anchored`, entries up to
    // it are authenticated by the chain hash compared there below (any difference fails the
    // log), not by their own signatures.
    let covered = if anchored {
        let by_head = head
            .as_ref()
            .filter(|(seq, hash, sig)| sig_ok(key, &signed_message(HEAD_DOMAIN, *seq, hash), sig))
            .map_or(0, |h| h.0);
        let by_checkpoint = cps
            .iter()
            .filter(|(_, _, text)| verify_note(text, key, &key_id))
            .filter_map(|(_, _, text)| checkpoint_values(text).map(|(seq, _)| seq))
            .max()
            .unwrap_or(0);
        by_head.max(by_checkpoint)
    } else {
        0
    };
    let mut signatures_checked = 0i64;
    let mut stmt = conn.prepare(
        "SELECT seq, ts, source, kind, severity, actor, details, hash, sig FROM audit ORDER BY seq",
    )?;
    let mut rows = stmt.query([])?;
    let mut prev_seq = 0i64;
    let mut prev_hash = vec![0u8; 32];
    // For each wanted entry that verified: its chain hash and the tree head after it.
    let mut tree = Frontier::new();
    let mut kept: std::collections::BTreeMap<i64, (Vec<u8>, Hash)> = Default::default();
    kept.insert(0, (Vec::new(), tree.root()));
    let mut broken = false;
    // The entries' signatures are checked in batches on every core (they are most of the work);
    // the chain, in order, as the rows come.
    let mut unsigned: Vec<(i64, Vec<u8>, Vec<u8>)> = Vec::new();
    let mut first_unsigned: Option<i64> = None;
    let mut check_signatures = |batch: &mut Vec<(i64, Vec<u8>, Vec<u8>)>| {
        if let Some(seq) = first_badly_signed(key, batch) {
            first_unsigned = Some(first_unsigned.map_or(seq, |f| f.min(seq)));
        }
        batch.clear();
    };
    while let Some(r) = rows.next()? {
        let seq: i64 = r.get(0)?;
        let ts: i64 = r.get(1)?;
        let (source, kind, severity, actor, details): (String, String, String, String, String) =
            (r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?);
        let hash: Vec<u8> = r.get(7)?;
        let sig: Vec<u8> = r.get(8)?;
        if broken {
            // After the first break every later entry is suspect; report only the first.
            continue;
        }
        if seq != prev_seq + 1 {
            note(
                prev_seq + 1,
                format!("entry {} is missing (deleted)", prev_seq + 1),
            );
            broken = true;
            continue;
        }
        let expect = chain_hash(
            &prev_hash, seq, ts, &source, &kind, &severity, &actor, &details,
        );
        if expect.as_slice() != hash.as_slice() {
            note(
                seq,
                format!("entry {seq} was modified or moved (its chain hash does not match)"),
            );
            broken = true;
            continue;
        }
        if seq > covered {
            unsigned.push((seq, signed_message(ENTRY_DOMAIN, seq, &hash), sig));
            signatures_checked += 1;
            if unsigned.len() >= SIGNATURE_BATCH {
                check_signatures(&mut unsigned);
            }
        }
        tree.push(leaf_hash(&hash));
        if wanted.contains(&seq) {
            kept.insert(seq, (hash.clone(), tree.root()));
        }
        prev_seq = seq;
        prev_hash = hash;
    }
    check_signatures(&mut unsigned);
    if let Some(seq) = first_unsigned {
        // The log is good up to the entry before it, whatever the chain said of later ones.
        note(
            seq,
            format!("entry {seq} is not signed by the audit key (rewritten)"),
        );
        broken = true;
        kept.retain(|s, _| *s < seq);
        prev_seq = prev_seq.min(seq - 1);
    }
    let entries = prev_seq;
    let chain_at = |seq: i64| kept.get(&seq).filter(|_| seq > 0).map(|(h, _)| h);
    match head {
        None if entries > 0 => note(1, "the signed head of the log is missing".into()),
        None => {}
        Some((hseq, hhash, hsig)) => {
            if !sig_ok(key, &signed_message(HEAD_DOMAIN, hseq, &hhash), &hsig) {
                note(
                    hseq.min(entries + 1).max(1),
                    "the signed head of the log is not signed by the audit key".into(),
                );
            } else if hseq > entries && !broken {
                note(
                    entries + 1,
                    format!(
                        "entries {} to {hseq} were removed from the end (truncated)",
                        entries + 1
                    ),
                );
            } else if let Some(h) = chain_at(hseq) {
                if *h != hhash {
                    note(hseq, format!("entry {hseq} does not match the signed head"));
                }
                if hseq < entries {
                    note(
                        hseq + 1,
                        format!("entries after {hseq} were added without the audit key"),
                    );
                }
            }
        }
    }
    let mut checkpoints = 0;
    for (row_seq, row_hash, text) in cps {
        checkpoints += 1;
        if !verify_note(&text, key, &key_id) {
            note(
                row_seq.max(1),
                format!("checkpoint at entry {row_seq} is not signed by the audit key"),
            );
            continue;
        }
        // What counts is what the note signs, not the row's copy of it.
        let Some((seq, hash)) = checkpoint_values(&text) else {
            note(
                row_seq.max(1),
                format!("checkpoint at entry {row_seq}: its signed note is not a checkpoint"),
            );
            continue;
        };
        if seq != row_seq || hash != row_hash {
            note(
                seq.min(row_seq).max(1),
                format!(
                    "a checkpoint row says entry {row_seq} but its signed note says entry {seq}: the row was edited"
                ),
            );
        }
        if let Some((_, root)) = checkpoint_tree_head(&text)
            && let Some((_, head)) = kept.get(&seq)
            && *head != root
        {
            note(
                seq.max(1),
                format!("entry {seq}: the log's tree head is not the one its checkpoint signed"),
            );
        }
        if seq == 0 {
            continue;
        }
        match chain_at(seq) {
            Some(h) if *h == hash => {}
            Some(_) => note(
                seq,
                format!("entry {seq} does not match its signed checkpoint"),
            ),
            None if !broken && seq > entries => note(
                entries + 1,
                format!(
                    "entries {} to {seq} were removed (a checkpoint covers them)",
                    entries + 1
                ),
            ),
            None => {}
        }
    }
    Ok(Verification {
        entries,
        checkpoints,
        first_bad,
        signatures_checked,
    })
}

/// The entry and chain hash a checkpoint note's signed text names ([`checkpoint_text`]), if it
/// is one.
pub fn checkpoint_values(note: &str) -> Option<(i64, Vec<u8>)> {
    checkpoint_fields(note).map(|(seq, _, chain)| (seq, chain))
}

/// The entry and RFC 6962 tree head a checkpoint note's signed text names; `None` for a note
/// that is no checkpoint, or one written before the log was a Merkle tree.
pub fn checkpoint_tree_head(note: &str) -> Option<(i64, Hash)> {
    let (seq, root, _) = checkpoint_fields(note)?;
    Some((seq, root?))
}

/// (entry, tree head if the note has one, chain hash) of a checkpoint note, in either form.
fn checkpoint_fields(note: &str) -> Option<(i64, Option<Hash>, Vec<u8>)> {
    let (text, _) = note.split_once("\n\n")?;
    let b64 = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .ok()
            .filter(|h| h.len() == 32)
    };
    let mut lines = text.lines();
    let _origin = lines.next()?;
    let seq = lines.next()?.parse::<i64>().ok().filter(|s| *s >= 0)?;
    let third = b64(lines.next()?)?;
    let fourth = lines.next()?;
    if lines.next().is_some() {
        return None;
    }
    if fourth == OLD_CHAIN_LINE {
        return Some((seq, None, third));
    }
    let chain = b64(fourth.strip_prefix(CHAIN_LINE)?.strip_prefix(' ')?)?;
    Some((seq, third.try_into().ok(), chain))
}

/// Verifies a C2SP signed note made by [`Audit::checkpoint`].
pub fn verify_note(note: &str, key: &VerifyingKey, key_id: &[u8; 4]) -> bool {
    let Some((text, sigs)) = note.split_once("\n\n") else {
        return false;
    };
    let text = format!("{text}\n");
    sigs.lines().any(|line| {
        let Some(rest) = line.strip_prefix("\u{2014} ") else {
            return false;
        };
        let Some((_, b64)) = rest.rsplit_once(' ') else {
            return false;
        };
        let Ok(blob) = base64::engine::general_purpose::STANDARD.decode(b64) else {
            return false;
        };
        blob.len() > 4 && &blob[..4] == key_id && sig_ok(key, text.as_bytes(), &blob[4..])
    })
}

/// The alarms not yet acknowledged.
pub fn open_alarms(conn: &rusqlite::Connection) -> Result<Vec<Alarm>, DbError> {
    let mut stmt = conn.prepare("SELECT id, audit_seq, kind, message, nest, raised_at FROM alarms WHERE acked_at IS NULL ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok(Alarm {
            id: r.get(0)?,
            audit_seq: r.get(1)?,
            kind: r.get(2)?,
            message: r.get(3)?,
            nest: r.get(4)?,
            raised_at: crate::db::rfc3339(r.get(5)?),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// An alarm.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Alarm {
    /// Id.
    pub id: i64,
    /// The entry that raised it.
    pub audit_seq: i64,
    /// Kind.
    pub kind: String,
    /// Message.
    pub message: String,
    /// Nest.
    pub nest: Option<u32>,
    /// When.
    pub raised_at: String,
}

impl Alarm {
    /// The alarm in words an operator acts on: where, what happened and what to do (the
    /// technical kind and message stay in [`Alarm::kind`] and [`Alarm::message`] for the detail
    /// view and the audit log).
    pub fn in_words(&self) -> String {
        let what = match self.kind.as_str() {
            "security.firmware_mismatch" => {
                "the meter's firmware check failed — take it out for rework"
            }
            "security.replay" => {
                "the meter's messages came replayed or out of order — take it out and tell the security officer"
            }
            "security.tamper" => {
                "the meter's messages were changed on the way — take it out and tell the security officer"
            }
            "security.downgrade" => {
                "the meter asked for weaker security — take it out and tell the security officer"
            }
            "security.bad_certificate_request" => {
                "the meter's certificate request was refused — take it out for rework"
            }
            "security.attestation_failed" => {
                "the meter's final check failed — take it out for rework"
            }
            "security.reused_key" => {
                "the meter reused a key — take it out and tell the security officer"
            }
            "security.protocol_violation" => {
                "the meter did not follow the protocol — take it out for rework"
            }
            "security.rework_refused" => {
                "the meter refused the rework — put it aside for the rework bench"
            }
            "meter.duplicate_uid" => {
                "this meter was provisioned before — take it out and give it to the supervisor"
            }
            "meter.unknown_lifecycle" => {
                "the meter is in a state it should not be in — take it out for rework"
            }
            "auth.lockout" => "a user is locked out after wrong PINs",
            "firmware.rejected" => "a firmware release was refused",
            "audit.verification_failed" => {
                "the audit log does not verify — call the security officer"
            }
            "audit.recovered" => {
                "the audit log was resumed after a fault — the security officer reviews it"
            }
            "hsm.unavailable" => {
                "the HSM does not answer — the line cannot go on; call the security officer"
            }
            "station.halted" => "the station stopped the line — the line screen says why",
            "fleet.registry_alarm" => {
                "the factory registry found a problem with this station's records — call the supervisor"
            }
            "keys.purge_incomplete" => {
                "a file with meter keys past their retention could not be removed — call the security officer"
            }
            _ => self.message.as_str(),
        };
        match self.nest {
            Some(n) => format!("Nest {n}: {what}"),
            None => {
                let mut c = what.chars();
                c.next()
                    .map(|f| f.to_uppercase().chain(c).collect())
                    .unwrap_or_default()
            }
        }
    }
}

/// A software signer for tests and tools.
pub struct SoftSigner(pub p256::ecdsa::SigningKey);

impl std::fmt::Debug for SoftSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SoftSigner(<redacted>)")
    }
}

impl AuditSigner for SoftSigner {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, String> {
        use p256::ecdsa::signature::Signer;
        let s: p256::ecdsa::DerSignature = self.0.sign(msg);
        Ok(s.as_bytes().to_vec())
    }
    fn spki_der(&self) -> Vec<u8> {
        spki::EncodePublicKey::to_public_key_der(self.0.verifying_key())
            .map(|d| d.as_bytes().to_vec())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::elliptic_curve::Generate;

    fn setup() -> (tempfile::TempDir, crate::db::Db, Audit, VerifyingKey) {
        let dir = tempfile::tempdir().unwrap();
        let db = crate::db::Db::open(&dir.path().join("a.db")).unwrap();
        let key = p256::ecdsa::SigningKey::generate_from_rng(&mut line_protocol::io::system_rng());
        let vk = *key.verifying_key();
        let audit = Audit::new(
            Arc::new(SoftSigner(key)),
            "cell-t",
            5,
            ["security.replay".to_string()].into(),
        );
        (dir, db, audit, vk)
    }

    fn add(db: &crate::db::Db, audit: &Audit, n: usize) {
        db.with(|c| {
            for i in 0..n {
                let tx = c.transaction().unwrap();
                audit
                    .append(
                        &tx,
                        &NewEvent::new(
                            "test",
                            if i == 3 {
                                "security.replay"
                            } else {
                                "meter.provisioned"
                            },
                            Severity::Info,
                            "op",
                            serde_json::json!({"i": i}),
                        ),
                    )
                    .unwrap();
                tx.commit().unwrap();
            }
        });
    }

    fn verify_db(db: &crate::db::Db, vk: &VerifyingKey) -> Verification {
        db.with(|c| verify(c, vk).unwrap())
    }

    #[test]
    fn a_clean_log_verifies_with_checkpoints_and_alarms() {
        let (_d, db, audit, vk) = setup();
        add(&db, &audit, 12);
        let v = verify_db(&db, &vk);
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.entries, 12);
        assert_eq!(v.checkpoints, 2);
        assert_eq!(db.with(|c| open_alarms(c).unwrap()).len(), 1);
        let note: String = db.with(|c| {
            c.query_row("SELECT note FROM audit_checkpoints LIMIT 1", [], |r| {
                r.get(0)
            })
            .unwrap()
        });
        assert!(note.starts_with("cell-t/audit\n5\n"), "{note}");
        assert!(note.contains("\n\n\u{2014} cell-t/audit-key "), "{note}");
    }

    #[test]
    fn a_checkpoint_is_read_from_its_signed_note_not_from_its_row() {
        // Someone with a saved copy of the signed head (taken at entry 7) cuts the log back to
        // 7, puts the old head back, and points the checkpoint that covers entry 10 at entry 5
        // (row values that match the short log), keeping its signed note.
        let (_d, db, audit, vk) = setup();
        add(&db, &audit, 7);
        let head: (i64, Vec<u8>, Vec<u8>) = db.with(|c| {
            c.query_row("SELECT seq, hash, signature FROM audit_head", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
        });
        add(&db, &audit, 5);
        assert!(verify_db(&db, &vk).ok());
        db.with(|c| {
            c.execute("DELETE FROM alarms WHERE audit_seq > 7", [])
                .unwrap();
            c.execute("DELETE FROM audit WHERE seq > 7", []).unwrap();
            c.execute(
                "UPDATE audit_head SET seq = ?1, hash = ?2, signature = ?3",
                params![head.0, head.1, head.2],
            )
            .unwrap();
            let h5: Vec<u8> = c
                .query_row("SELECT hash FROM audit WHERE seq = 5", [], |r| r.get(0))
                .unwrap();
            let n = c
                .execute(
                    "UPDATE audit_checkpoints SET seq = 5, hash = ?1 WHERE seq = 10",
                    params![h5],
                )
                .unwrap();
            assert_eq!(n, 1);
        });
        let v = verify_db(&db, &vk);
        assert!(!v.ok(), "the cut went unnoticed: {v:?}");
        let (at, why) = v.first_bad.clone().unwrap();
        assert_eq!(at, 5, "{why}");
        assert!(why.contains("its signed note says entry 10"), "{why}");
        assert!(checkpoint_values("not a note").is_none());
    }

    /// The chain hashes of the log's entries, read straight from the table.
    fn leaves(db: &crate::db::Db) -> Vec<Hash> {
        db.with(|c| {
            let mut stmt = c.prepare("SELECT hash FROM audit ORDER BY seq").unwrap();
            stmt.query_map([], |r| r.get::<_, Vec<u8>>(0))
                .unwrap()
                .map(|h| leaf_hash(&h.unwrap()))
                .collect()
        })
    }

    fn notes(db: &crate::db::Db) -> Vec<String> {
        db.with(|c| {
            let mut stmt = c
                .prepare("SELECT note FROM audit_checkpoints ORDER BY id")
                .unwrap();
            stmt.query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect()
        })
    }

    #[test]
    fn a_checkpoint_is_the_rfc_6962_tree_head_and_proves_every_entry_it_covers() {
        let (_d, db, audit, vk) = setup();
        add(&db, &audit, 23);
        let leaves = leaves(&db);
        let notes = notes(&db);
        assert_eq!(notes.len(), 4);
        let mut previous: Option<(i64, Hash)> = None;
        for note in &notes {
            let (seq, head) = checkpoint_tree_head(note).unwrap();
            let n = seq as usize;
            assert_eq!(
                head,
                crate::merkle::root(&leaves[..n]),
                "checkpoint at {seq}"
            );
            for (i, leaf) in leaves[..n].iter().enumerate() {
                let proof = crate::merkle::inclusion_proof(i, &leaves[..n]).unwrap();
                assert!(crate::merkle::verify_inclusion(
                    leaf, i as u64, n as u64, &proof, &head
                ));
            }
            // Each checkpoint extends the one before: the log was only appended to.
            if let Some((old, old_head)) = previous {
                let proof = crate::merkle::consistency_proof(old as usize, &leaves[..n]).unwrap();
                assert!(crate::merkle::verify_consistency(
                    old as u64, n as u64, &proof, &old_head, &head
                ));
            }
            previous = Some((seq, head));
        }
        assert!(verify_db(&db, &vk).ok());
    }

    #[test]
    fn an_alarm_reads_as_what_to_do_and_keeps_its_kind() {
        let a = Alarm {
            id: 1,
            audit_seq: 9,
            kind: "security.firmware_mismatch".into(),
            message: "meter reported image hash 00 but was sent 01".into(),
            nest: Some(2),
            raised_at: String::new(),
        };
        assert_eq!(
            a.in_words(),
            "Nest 2: the meter's firmware check failed — take it out for rework"
        );
        let b = Alarm {
            kind: "station.error".into(),
            message: "the disk is full".into(),
            nest: None,
            ..a
        };
        assert_eq!(b.in_words(), "The disk is full");
    }

    #[test]
    fn a_checkpoint_whose_tree_head_is_not_the_logs_fails_verification() {
        let (_d, db, audit, vk) = setup();
        add(&db, &audit, 7);
        db.with(|c| {
            let tx = c.transaction().unwrap();
            let chain: Vec<u8> = tx
                .query_row("SELECT hash FROM audit WHERE seq = 7", [], |r| r.get(0))
                .unwrap();
            // Signed by the audit key, the chain hash right, the tree head another log's.
            let mut other = Frontier::new();
            for i in 0u8..7 {
                other.push(leaf_hash(&[i]));
            }
            audit
                .write_checkpoint(&tx, 7, &other, &chain, "test")
                .unwrap();
            tx.commit().unwrap();
        });
        let v = verify_db(&db, &vk);
        let (at, why) = v
            .first_bad
            .clone()
            .expect("a wrong tree head went unnoticed");
        assert_eq!(at, 7);
        assert!(why.contains("tree head"), "{why}");
    }

    #[test]
    fn checkpoints_written_before_the_tree_still_verify_and_the_tree_is_built_from_the_log() {
        let (_d, db, audit, vk) = setup();
        add(&db, &audit, 3);
        db.with(|c| {
            let tx = c.transaction().unwrap();
            let chain: Vec<u8> = tx
                .query_row("SELECT hash FROM audit WHERE seq = 3", [], |r| r.get(0))
                .unwrap();
            let text = format!(
                "cell-t/audit\n3\n{}\n{OLD_CHAIN_LINE}\n",
                base64::engine::general_purpose::STANDARD.encode(&chain)
            );
            let mut blob = note_key_id(&audit.signer.spki_der()).to_vec();
            blob.extend_from_slice(&audit.sign(text.as_bytes()).unwrap());
            let note = format!(
                "{text}\n\u{2014} cell-t/audit-key {}\n",
                base64::engine::general_purpose::STANDARD.encode(blob)
            );
            assert_eq!(checkpoint_values(&note), Some((3, chain.clone())));
            assert_eq!(checkpoint_tree_head(&note), None);
            tx.execute(
                "INSERT INTO audit_checkpoints (seq, hash, note, reason, created_at) VALUES (3, ?1, ?2, 'old', 0)",
                params![chain, note],
            )
            .unwrap();
            // A journal from before the tree: no stored edge.
            tx.execute("DELETE FROM audit_tree", []).unwrap();
            tx.commit().unwrap();
        });
        add(&db, &audit, 9);
        let leaves = leaves(&db);
        let (seq, head) = checkpoint_tree_head(notes(&db).last().unwrap()).unwrap();
        assert_eq!(head, crate::merkle::root(&leaves[..seq as usize]));
        let v = verify_db(&db, &vk);
        assert!(v.ok(), "{v:?}");
    }

    #[test]
    fn signatures_checked_on_every_core_name_the_lowest_bad_entry() {
        use p256::ecdsa::signature::Signer;
        let key = p256::ecdsa::SigningKey::generate_from_rng(&mut line_protocol::io::system_rng());
        let other =
            p256::ecdsa::SigningKey::generate_from_rng(&mut line_protocol::io::system_rng());
        let batch: Vec<(i64, Vec<u8>, Vec<u8>)> = (1..=300)
            .map(|seq| {
                let msg = signed_message(ENTRY_DOMAIN, seq, &[7u8; 32]);
                // Entries 250 and 171 signed by another key, in different parts of the batch.
                let signer = if seq == 250 || seq == 171 {
                    &other
                } else {
                    &key
                };
                let sig: Signature = signer.sign(&msg);
                (seq, msg, sig.to_der().as_bytes().to_vec())
            })
            .collect();
        let vk = *key.verifying_key();
        assert_eq!(first_badly_signed(&vk, &batch), Some(171));
        assert_eq!(first_badly_signed(&vk, &batch[..170]), None);
        assert_eq!(first_badly_signed(&vk, &batch[200..]), Some(250));
        assert_eq!(first_badly_signed(&vk, &[]), None);
    }

    #[test]
    fn tampering_is_found_at_the_first_bad_entry() {
        for (what, sql, bad) in [
            (
                "modified",
                "UPDATE audit SET actor = 'mallory' WHERE seq = 7",
                7,
            ),
            ("deleted", "DELETE FROM audit WHERE seq = 4", 4),
            (
                "reordered",
                "UPDATE audit SET seq = -1 WHERE seq = 6; UPDATE audit SET seq = 6 WHERE seq = 8; UPDATE audit SET seq = 8 WHERE seq = -1",
                6,
            ),
            ("truncated", "DELETE FROM audit WHERE seq > 9", 10),
            ("details rewritten with a fixed-up hash chain", "", 3),
        ] {
            let (_d, db, audit, vk) = setup();
            add(&db, &audit, 12);
            if sql.is_empty() {
                // Rewrite entry 3 and recompute every later chain hash: only the signatures tell.
                db.with(|c| {
                    c.execute("UPDATE audit SET details = '{\"i\":99}' WHERE seq = 3", []).unwrap();
                    let rows: Vec<(i64, i64, String, String, String, String, String)> = c
                        .prepare("SELECT seq, ts, source, kind, severity, actor, details FROM audit ORDER BY seq").unwrap()
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?, r.get(6)?))).unwrap()
                        .map(|r| r.unwrap()).collect();
                    let mut prev = vec![0u8; 32];
                    for (seq, ts, s, k, sev, a, d) in rows {
                        let h = chain_hash(&prev, seq, ts, &s, &k, &sev, &a, &d);
                        c.execute("UPDATE audit SET hash = ?1 WHERE seq = ?2", params![h.to_vec(), seq]).unwrap();
                        prev = h.to_vec();
                    }
                });
            } else {
                // Someone editing the file directly is not held back by foreign keys.
                db.with(|c| {
                    c.execute_batch(&format!("PRAGMA foreign_keys=OFF; {sql}"))
                        .unwrap()
                });
            }
            let v = verify_db(&db, &vk);
            assert_eq!(
                v.first_bad.as_ref().map(|b| b.0),
                Some(bad),
                "{what}: {v:?}"
            );
            // An export's quicker check finds it too, and names it the same way.
            let quick = db.with(|c| verify_anchored(c, &vk).unwrap());
            assert_eq!(quick.first_bad, v.first_bad, "{what}");
        }
    }

    #[test]
    fn anchored_verification_checks_only_the_signatures_no_checkpoint_covers() {
        let (_d, db, audit, vk) = setup();
        add(&db, &audit, 12);
        let full = verify_db(&db, &vk);
        assert!(full.ok(), "{full:?}");
        assert_eq!(full.signatures_checked, 12);
        let covered = db.with(|c| {
            c.query_row("SELECT max(seq) FROM audit_checkpoints", [], |r| {
                r.get::<_, i64>(0)
            })
            .unwrap()
        });
        let head = db.with(|c| {
            c.query_row("SELECT seq FROM audit_head", [], |r| r.get::<_, i64>(0))
                .optional()
                .unwrap()
        });
        let covered = covered.max(head.unwrap_or(0));
        assert!(covered > 0 && covered <= 12);
        let quick = db.with(|c| verify_anchored(c, &vk).unwrap());
        assert!(quick.ok(), "{quick:?}");
        assert_eq!(quick.entries, 12);
        assert_eq!(quick.signatures_checked, 12 - covered);

        // Entries added without the key behind a head put back from an older copy: they lie
        // after the newest anchor, so their signatures are checked, and the log fails as the
        // full check says.
        let saved: (i64, Vec<u8>, Vec<u8>) = db.with(|c| {
            c.query_row("SELECT seq, hash, signature FROM audit_head", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .unwrap()
        });
        add(&db, &audit, 2);
        db.with(|c| {
            let (prev, ts, s, k, sev, a): (Vec<u8>, i64, String, String, String, String) = c
                .query_row(
                    "SELECT p.hash, e.ts, e.source, e.kind, e.severity, e.actor FROM audit e, audit p WHERE e.seq = 14 AND p.seq = 13",
                    [],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
                )
                .unwrap();
            let h = chain_hash(&prev, 14, ts, &s, &k, &sev, &a, "{\"i\":99}");
            c.execute(
                "UPDATE audit SET details = '{\"i\":99}', hash = ?1 WHERE seq = 14",
                params![h.to_vec()],
            )
            .unwrap();
            c.execute(
                "UPDATE audit_head SET seq = ?1, hash = ?2, signature = ?3",
                params![saved.0, saved.1, saved.2],
            )
            .unwrap();
        });
        let full = verify_db(&db, &vk);
        assert!(!full.ok());
        let quick = db.with(|c| verify_anchored(c, &vk).unwrap());
        assert_eq!(quick.first_bad, full.first_bad);

        // What it does not see: a covered entry's signature bytes replaced while its content
        // stands (the content is still bound by the signed chain). The full check names it.
        let (_d, db, audit, vk) = setup();
        add(&db, &audit, 12);
        db.with(|c| {
            c.execute(
                "UPDATE audit SET sig = x'3006020101020101' WHERE seq = 2",
                [],
            )
            .unwrap()
        });
        assert!(db.with(|c| verify_anchored(c, &vk).unwrap()).ok());
        assert_eq!(verify_db(&db, &vk).first_bad.map(|b| b.0), Some(2));
    }
}

#[cfg(test)]
mod copy_tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // test code
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// An auditor copies the journal of a running daemon: the line commits, and the journal
    /// checkpoints its write-ahead log into the file, while the copy is taken. Every copy must be
    /// one consistent state of the journal.
    #[test]
    fn a_copy_of_a_journal_being_written_is_one_whole_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("station.db");
        let db = crate::db::Db::open(&path).unwrap();
        db.with(|c| {
            c.execute_batch(
                "PRAGMA wal_autocheckpoint = 1;
                 CREATE TABLE copy_probe (n INTEGER PRIMARY KEY, a BLOB NOT NULL, b BLOB NOT NULL);",
            )
            .unwrap()
        });
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (db, stop) = (db.clone(), Arc::clone(&stop));
            std::thread::spawn(move || {
                // Each row's two halves are written in one transaction: a copy that holds one
                // without the other, or fails to open, is torn. The oldest rows go as new ones
                // come, so the file's pages are reused and every commit is checkpointed into it.
                let mut commits = 0i64;
                while !stop.load(Ordering::Relaxed) {
                    db.with(|c| {
                        let tx = c.transaction().unwrap();
                        tx.execute(
                            "INSERT INTO copy_probe (a, b) VALUES (randomblob(1500), randomblob(1500))",
                            [],
                        )
                        .unwrap();
                        let n = tx.last_insert_rowid();
                        tx.execute("UPDATE copy_probe SET b = a WHERE n = ?1", [n])
                            .unwrap();
                        tx.execute("DELETE FROM copy_probe WHERE n <= ?1", [n - 300])
                            .unwrap();
                        tx.commit().unwrap();
                    });
                    commits += 1;
                }
                commits
            })
        };
        let mut problems = Vec::new();
        for i in 0..300 {
            match JournalCopy::of(&path) {
                Ok(copy) => {
                    let check: Result<String, _> =
                        copy.conn
                            .query_row("PRAGMA integrity_check", [], |r| r.get(0));
                    let torn: Result<i64, _> = copy.conn.query_row(
                        "SELECT count(*) FROM copy_probe WHERE a != b",
                        [],
                        |r| r.get(0),
                    );
                    match (check, torn) {
                        (Ok(ok), Ok(0)) if ok == "ok" => {}
                        other => problems.push(format!("copy {i}: {other:?}")),
                    }
                }
                Err(e) => problems.push(format!("copy {i}: {e}")),
            }
        }
        stop.store(true, Ordering::Relaxed);
        let commits = writer.join().unwrap();
        assert!(commits > 50, "the writer kept writing: {commits} commits");
        assert!(
            problems.is_empty(),
            "{} torn copies: {problems:?}",
            problems.len()
        );
    }
}
