//! The journal: one SQLite file in WAL mode with `synchronous=FULL`, foreign keys on, secure
//! deletion on, and versioned migrations.
//!
//! Every state change that matters is one transaction, committed before the next step begins, so
//! that a crash leaves either the state before or the state after, never half of it. The schema
//! enforces what must never happen twice: a live meter record per UID, a serial number, a system
//! title, a certificate serial. A file that is not ours (wrong application id), from a newer
//! version, or corrupt is refused with a message that says what to do; nothing is ever rewritten
//! to "repair" it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, ffi};

/// `PRAGMA application_id` of a station journal: "CELL".
pub const APPLICATION_ID: i32 = 0x4345_4C4C;

/// Schema migrations, applied in order; `user_version` counts those applied.
const MIGRATIONS: &[&str] = &[include_str!("schema/001_initial.sql")];

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
}

fn check_header(path: &Path) -> Result<(), DbError> {
    use std::io::Read;
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
        check_header(path)?;
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
        };
        db.migrate(version)?;
        Ok(db)
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
