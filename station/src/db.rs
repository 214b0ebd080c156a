//! The journal: one SQLite file in WAL mode with `synchronous=FULL`, foreign keys on, secure
//! deletion on, and versioned migrations.
//!
//! Every state change that matters is one transaction, committed before the next step begins, so
//! that a crash leaves either the state before or the state after, never half of it. The schema
//! enforces what must never happen twice: a live meter record per UID, a serial number, a system
//! title, a certificate serial. A file that is not ours (wrong application id), from a newer
//! version, or corrupt is refused with a message that says what to do; nothing is ever rewritten
//! to "repair" it.
//!
//! One process at a time: opening takes an exclusive lock on `<journal>.lock` (holding the PID of
//! its owner) before SQLite touches the file, so a second station process on the same journal
//! is refused without changing anything. The journal and its WAL and shared-memory files are
//! owner-only: they hold the cell's users and its production record.

use std::io::{Read as _, Seek as _, Write as _};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, ffi};

/// `PRAGMA application_id` of a station journal: "CELL".
pub const APPLICATION_ID: i32 = 0x4345_4C4C;

/// Schema migrations, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[
    include_str!("schema/001_initial.sql"),
    include_str!("schema/002_guards.sql"),
    include_str!("schema/003_export_runs.sql"),
    include_str!("schema/004_batch_anchors.sql"),
    include_str!("schema/005_oaep_label.sql"),
    include_str!("schema/006_seal_sent.sql"),
    include_str!("schema/007_audit_tree.sql"),
    include_str!("schema/008_outbox.sql"),
    include_str!("schema/009_fail_step.sql"),
    include_str!("schema/010_line_baud.sql"),
    include_str!("schema/011_key_retention.sql"),
];

/// Why the journal cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DbError {
    /// Not a station journal.
    #[error(
        "{path} is not a station journal ({why}); point `database` in the configuration at the right file or a new one"
    )]
    Foreign {
        /// The file.
        path: PathBuf,
        /// What it is instead.
        why: String,
    },
    /// Written by a newer station.
    #[error(
        "{path} has schema version {found}, this station knows up to {known}; upgrade the station software"
    )]
    TooNew {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u32,
        /// Ours.
        known: u32,
    },
    /// Damaged.
    #[error(
        "the journal is damaged ({0}); stop the line and restore the last backup — nothing will be written to it"
    )]
    Corrupt(String),
    /// The disk is full.
    #[error(
        "the disk holding the journal is full; free space and retry — everything committed so far is kept"
    )]
    Full,
    /// Read-only file or file system.
    #[error("the journal is read-only ({0}); check permissions and the file system")]
    ReadOnly(String),
    /// A constraint the schema enforces.
    #[error("refused by the journal: {0}")]
    Constraint(String),
    /// Another process holds the journal.
    #[error(
        "the journal {path} is in use by another station process{}; only one process may hold a cell's journal — stop it first (`systemctl stop stationd`), or talk to it with the `station` command",
        pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
    )]
    Locked {
        /// The journal.
        path: PathBuf,
        /// The process holding it, as it wrote into the lock file.
        pid: Option<u32>,
    },
    /// A guarded update found the record in another state than expected: someone else changed
    /// it (a stale writer never overwrites).
    #[error(
        "the journal's record of {what} changed under this step (expected state {expected}); nothing was overwritten"
    )]
    Stale {
        /// What record.
        what: String,
        /// The state the update expected.
        expected: String,
    },
    /// Anything else SQLite reports.
    #[error("journal error: {0}")]
    Sqlite(String),
}

impl From<rusqlite::Error> for DbError {
    fn from(e: rusqlite::Error) -> Self {
        if let rusqlite::Error::SqliteFailure(f, msg) = &e {
            let text = msg.clone().unwrap_or_else(|| f.to_string());
            return match f.code {
                ffi::ErrorCode::DiskFull => DbError::Full,
                ffi::ErrorCode::DatabaseCorrupt | ffi::ErrorCode::NotADatabase => {
                    DbError::Corrupt(text)
                }
                ffi::ErrorCode::ReadOnly | ffi::ErrorCode::CannotOpen => DbError::ReadOnly(text),
                ffi::ErrorCode::ConstraintViolation => DbError::Constraint(text),
                _ => DbError::Sqlite(text),
            };
        }
        DbError::Sqlite(e.to_string())
    }
}

/// The journal. Cloning shares the one connection.
#[derive(Clone, Debug)]
pub struct Db {
    // One connection for the whole station: SQLite serialises writers anyway, and one connection
    // keeps every transaction's view simple. The mutex is held only for one closure at a time.
    conn: Arc<Mutex<Connection>>,
    path: PathBuf,
    // The exclusive lock on `<journal>.lock`: held while any clone lives, or until `release`.
    lock_file: Arc<Mutex<Option<std::fs::File>>>,
}

/// The lock file of the journal at `path`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Takes the journal's exclusive lock and writes our PID into the lock file; refuses, naming the
/// holder, when another process has it. Nothing is written unless the lock is ours.
fn take_lock(path: &Path) -> Result<std::fs::File, DbError> {
    let lp = lock_path(path);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&lp)
        .map_err(|e| {
            DbError::ReadOnly(format!("cannot open the lock file {}: {e}", lp.display()))
        })?;
    match f.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut text = String::new();
            let _ = f.read_to_string(&mut text);
            return Err(DbError::Locked {
                path: path.to_path_buf(),
                pid: text.trim().parse().ok(),
            });
        }
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(DbError::ReadOnly(format!(
                "cannot lock {}: {e}",
                lp.display()
            )));
        }
    }
    let _ = f.set_len(0);
    let _ = f.rewind();
    let _ = writeln!(f, "{}", std::process::id());
    let _ = f.sync_all();
    Ok(f)
}

/// Creates the journal file owner-only when it does not exist yet, and takes group and other
/// permissions away from an existing journal and its WAL and shared-memory files (SQLite gives
/// those the journal's own mode when it creates them).
fn owner_only(path: &Path) -> Result<(), DbError> {
    if !path.exists() {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| DbError::ReadOnly(format!("cannot create {}: {e}", path.display())))?;
    }
    for suffix in ["", "-wal", "-shm"] {
        let mut name = path.as_os_str().to_os_string();
        name.push(suffix);
        let p = PathBuf::from(name);
        if let Ok(meta) = std::fs::metadata(&p)
            && meta.permissions().mode() & 0o077 != 0
        {
            tracing::warn!(file = %p.display(), "the journal file could be read by others; made owner-only");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).map_err(|e| {
                DbError::ReadOnly(format!("cannot make {} owner-only: {e}", p.display()))
            })?;
        }
    }
    Ok(())
}

fn check_header(path: &Path) -> Result<(), DbError> {
    let Ok(mut f) = std::fs::File::open(path) else {
        return Ok(());
    };
    let mut head = [0u8; 16];
    let n = f.read(&mut head).unwrap_or(0);
    if n == 0 {
        return Ok(());
    }
    if n < 16 || &head != b"SQLite format 3\0" {
        return Err(DbError::Foreign {
            path: path.to_path_buf(),
            why: "not a SQLite database".into(),
        });
    }
    Ok(())
}

impl Db {
    /// Opens (creating and migrating if new) the journal at `path`.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let lock = take_lock(path)?;
        check_header(path)?;
        owner_only(path)?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::Sqlite(format!(
                "cannot switch the journal to WAL mode (got {mode})"
            )));
        }
        conn.execute_batch(
            "PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON; PRAGMA secure_delete=ON;",
        )?;
        let app: i32 = conn.query_row("PRAGMA application_id", [], |r| r.get(0))?;
        let version: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))?;
        if app == 0 && version == 0 && tables == 0 {
            conn.execute_batch(&format!("PRAGMA application_id={APPLICATION_ID};"))?;
        } else if app != APPLICATION_ID {
            return Err(DbError::Foreign {
                path: path.to_path_buf(),
                why: format!("application id 0x{app:08x}"),
            });
        }
        let known = MIGRATIONS.len() as u32;
        if version > known {
            return Err(DbError::TooNew {
                path: path.to_path_buf(),
                found: version,
                known,
            });
        }
        let db = Db {
            conn: Arc::new(Mutex::new(conn)),
            path: path.to_path_buf(),
            lock_file: Arc::new(Mutex::new(Some(lock))),
        };
        db.migrate(version)?;
        Ok(db)
    }

    /// Gives the journal's lock up (the owner stops using the journal): another process may
    /// open it from now on. Also happens when the last clone is dropped.
    pub fn release(&self) {
        let f = self
            .lock_file
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(f) = f {
            let _ = f.set_len(0);
            let _ = f.unlock();
        }
    }

    fn migrate(&self, from: u32) -> Result<(), DbError> {
        let mut conn = self.lock();
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute_batch(&format!("PRAGMA user_version={}", i + 1))?;
            tx.commit()?;
        }
        Ok(())
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite itself consistent (the transaction is
        // rolled back when dropped), so the connection stays usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` with the connection on the calling thread.
    pub fn with<T>(&self, f: impl FnOnce(&mut Connection) -> T) -> T {
        f(&mut self.lock())
    }

    /// Runs `f` with the connection off the async runtime's threads.
    pub async fn call<T, E>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, E> + Send + 'static,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: Send + 'static + From<DbError>,
    {
        let conn = Arc::clone(&self.conn);
        match tokio::task::spawn_blocking(move || {
            let mut guard = conn.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard)
        })
        .await
        {
            Ok(r) => r,
            Err(e) => Err(E::from(DbError::Sqlite(format!(
                "journal task failed: {e}"
            )))),
        }
    }

    /// Checks that the journal can still be written (for health reporting).
    pub fn writable(&self) -> bool {
        self.with(|c| c.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok())
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 (UTC, milliseconds) for a Unix millisecond timestamp.
pub fn rfc3339(ms: i64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    let f = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    t.format(&f).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_file_is_migrated_and_reopened() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.db");
        let db = Db::open(&p).unwrap();
        let v: u32 = db.with(|c| {
            c.query_row("PRAGMA user_version", [], |r| r.get(0))
                .unwrap()
        });
        assert_eq!(v, MIGRATIONS.len() as u32);
        drop(db);
        let db = Db::open(&p).unwrap();
        assert!(db.writable());
        let sync: i64 = db.with(|c| c.query_row("PRAGMA synchronous", [], |r| r.get(0)).unwrap());
        assert_eq!(sync, 2, "FULL");
    }

    #[test]
    fn a_second_opener_is_refused_naming_the_holder_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.db");
        let db = Db::open(&p).unwrap();
        db.with(|c| c.execute_batch("PRAGMA wal_checkpoint(TRUNCATE)").unwrap());
        let before = std::fs::read(&p).unwrap();
        match Db::open(&p) {
            Err(e @ DbError::Locked { pid, .. }) => {
                assert_eq!(pid, Some(std::process::id()));
                assert!(
                    e.to_string()
                        .contains(&format!("pid {}", std::process::id())),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            std::fs::read(&p).unwrap(),
            before,
            "the refused opener wrote nothing"
        );
        db.release();
        let again = Db::open(&p).unwrap();
        assert!(again.writable(), "released: the next process may open it");
    }

    #[test]
    fn the_journal_and_its_wal_and_shm_are_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.db");
        let db = Db::open(&p).unwrap();
        db.with(|c| {
            c.execute_batch("CREATE TABLE t(x); INSERT INTO t VALUES (1);")
                .unwrap()
        });
        for f in ["j.db", "j.db-wal", "j.db-shm", "j.db.lock"] {
            let mode = std::fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "{f} is {mode:o}");
        }
        // A journal made readable by others (a copy, a careless chmod) is closed again on open.
        drop(db);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let _db = Db::open(&p).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o077,
            0
        );
    }

    /// A meter row in each state, for the transition tests.
    fn meters_in_every_state(c: &Connection) {
        c.execute_batch(
            "INSERT INTO firmware VALUES (1, 'aa', '1.0.0', 1, x'00', 'bb', 0, 'o');
             INSERT INTO customers VALUES (1, 'u', x'00', 'cc', 0, 'o');
             INSERT INTO batches (id, work_order, model, firmware_id, customer_id, quantity, serial_prefix,
                 serial_first, serial_last, next_serial, state, transport_key, transport_wrapped,
                 transport_kcv, oaep_hash, opened_at, opened_by)
               VALUES (1, 'WO', 'M', 1, 1, 10, '', 1, 10, 1, 'open', 'k', x'00', 'kcv', 'sha1', 0, 's');
             INSERT INTO meters (id, batch_id, uid, nest, state, operator, started_at) VALUES
               (1, 1, 'u1', 1, 'failed', 'o', 0), (2, 1, 'u2', 1, 'done', 'o', 0),
               (3, 1, 'u3', 1, 'sealed', 'o', 0), (4, 1, 'u4', 1, 'assigned', 'o', 0);
             INSERT INTO certificates (id, meter_id, slot, state, serial, der, created_at, updated_at) VALUES
               (1, 1, 'sign', 'voided', 's1', NULL, 0, 0), (2, 2, 'sign', 'delivered', 's2', x'00', 0, 0);",
        )
        .unwrap();
    }

    #[test]
    fn no_writer_turns_a_failed_meter_into_a_done_one() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("j.db")).unwrap();
        db.with(|c| {
            meters_in_every_state(c);
            let refused = |sql: &str| {
                let e = c.execute(sql, []).unwrap_err().to_string();
                assert!(
                    e.contains("transition refused by the journal"),
                    "{sql}: {e}"
                );
            };
            // A stale writer's unguarded statements: the journal itself refuses them.
            refused("UPDATE meters SET state = 'done' WHERE id = 1");
            refused("UPDATE meters SET state = 'sealed' WHERE id = 1");
            refused("UPDATE meters SET state = 'failed' WHERE id = 2");
            refused("UPDATE meters SET state = 'done' WHERE id = 4");
            refused("UPDATE certificates SET state = 'delivered' WHERE id = 1");
            refused("UPDATE certificates SET state = 'voided' WHERE id = 2");
            // The engine's guarded statement finds nothing to change, and says so.
            let n = c
                .execute(
                    "UPDATE meters SET state = 'done' WHERE id = 1 AND state = 'sealed'",
                    [],
                )
                .unwrap();
            assert!(matches!(
                crate::records::guarded(n, "meter 1", "sealed"),
                Err(DbError::Stale { .. })
            ));
            // Failing a failed meter again keeps its first reason.
            let tx = c.transaction().unwrap();
            crate::records::fail_meter(&tx, 1, "second reason", None, 5).unwrap();
            tx.commit().unwrap();
            // The transitions the engine makes still work.
            c.execute("UPDATE meters SET state = 'done' WHERE id = 3", [])
                .unwrap();
            c.execute("UPDATE meters SET state = 'failed' WHERE id = 4", [])
                .unwrap();
            let states: Vec<String> = c
                .prepare("SELECT state FROM meters ORDER BY id")
                .unwrap()
                .query_map([], |r| r.get(0))
                .unwrap()
                .map(Result::unwrap)
                .collect();
            assert_eq!(states, ["failed", "done", "done", "failed"]);
        });
    }

    #[test]
    fn foreign_and_newer_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let text = dir.path().join("notes.txt");
        std::fs::write(&text, "hello, this is not a database at all").unwrap();
        assert!(matches!(Db::open(&text), Err(DbError::Foreign { .. })));
        let other = dir.path().join("other.db");
        Connection::open(&other)
            .unwrap()
            .execute_batch("PRAGMA application_id=7; CREATE TABLE t(x);")
            .unwrap();
        assert!(matches!(Db::open(&other), Err(DbError::Foreign { .. })));
        let newer = dir.path().join("newer.db");
        drop(Db::open(&newer).unwrap());
        Connection::open(&newer)
            .unwrap()
            .execute_batch("PRAGMA user_version=99")
            .unwrap();
        assert!(matches!(
            Db::open(&newer),
            Err(DbError::TooNew { found: 99, .. })
        ));
    }

    #[test]
    fn corrupt_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.db");
        drop(Db::open(&p).unwrap());
        let mut bytes = std::fs::read(&p).unwrap();
        for b in bytes.iter_mut().skip(100).take(3000) {
            *b = 0xA5;
        }
        std::fs::write(&p, bytes).unwrap();
        let _ = std::fs::remove_file(p.with_extension("db-wal"));
        match Db::open(&p) {
            Err(DbError::Corrupt(_) | DbError::Foreign { .. } | DbError::Sqlite(_)) => {}
            other => panic!("{other:?}"),
        }
    }
}
